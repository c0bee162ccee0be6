//! The operator side of releases: hash an image, write a manifest, sign it, add signatures (the
//! signing itself is the core's, `release::sign`, re-exported here).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

pub use crate::release::sign::{add_signature, sign_manifest};

/// Size, SHA-256 and per-chunk SHA-256 of an image file, read once.
#[derive(Debug, Clone)]
pub struct ImageDigest {
    pub size: u64,
    pub sha256: [u8; 32],
    /// Raw 32-byte digests, one per `chunk_size` bytes (the last chunk may be short).
    pub chunk_hashes: Vec<u8>,
}

/// Reads the image once; `chunk_size` `None` skips the chunk index.
pub fn digest_image(path: &Path, chunk_size: Option<u64>) -> io::Result<ImageDigest> {
    let mut file = File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunker = chunk_size.map(ChunkHasher::new);
    let mut size = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        size += n as u64;
        if let Some(chunker) = &mut chunker {
            chunker.update(&buf[..n]);
        }
    }
    Ok(ImageDigest {
        size,
        sha256: whole.finalize().into(),
        chunk_hashes: chunker.map(ChunkHasher::finish).unwrap_or_default(),
    })
}

struct ChunkHasher {
    chunk_size: u64,
    in_chunk: u64,
    current: Sha256,
    hashes: Vec<u8>,
}

impl ChunkHasher {
    fn new(chunk_size: u64) -> ChunkHasher {
        assert!(chunk_size > 0, "chunk size is validated by the caller");
        ChunkHasher {
            chunk_size,
            in_chunk: 0,
            current: Sha256::new(),
            hashes: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.chunk_size - self.in_chunk;
            let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            self.current.update(&bytes[..take]);
            self.in_chunk += take as u64;
            bytes = &bytes[take..];
            if self.in_chunk == self.chunk_size {
                self.hashes
                    .extend_from_slice(&self.current.finalize_reset());
                self.in_chunk = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.in_chunk > 0 {
            self.hashes.extend_from_slice(&self.current.finalize());
        }
        self.hashes
    }
}

pub fn sha256_of(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn chunk_hashes_cover_the_image_with_a_short_last_chunk() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).unwrap();
        let digest = digest_image(file.path(), Some(4096)).unwrap();
        assert_eq!(digest.size, 10_000);
        assert_eq!(digest.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(digest.chunk_hashes.len(), 3 * 32);
        assert_eq!(
            &digest.chunk_hashes[64..],
            Sha256::digest(&data[8192..]).as_slice()
        );
    }
}
