//! The operator side of releases: hash an image, write a manifest, sign it, add signatures.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use crate::keys::KeyId;
use crate::release::envelope::SignatureEntry;
use crate::release::{Envelope, Manifest, Refusal};

/// Size, SHA-256 and per-chunk SHA-256 of an image file, read once.
#[derive(Debug, Clone)]
pub struct ImageDigest {
    pub size: u64,
    pub sha256: [u8; 32],
    /// Raw 32-byte digests, one per `chunk_size` bytes (the last chunk may be short).
    pub chunk_hashes: Vec<u8>,
}

pub fn digest_image(path: &Path, chunk_size: u64) -> io::Result<ImageDigest> {
    assert!(chunk_size > 0, "chunk size is validated by the caller");
    let mut file = File::open(path)?;
    let mut whole = Sha256::new();
    let mut chunk = Sha256::new();
    let mut in_chunk = 0u64;
    let mut size = 0u64;
    let mut chunk_hashes = Vec::new();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        size += n as u64;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min((chunk_size - in_chunk) as usize);
            chunk.update(&rest[..take]);
            in_chunk += take as u64;
            rest = &rest[take..];
            if in_chunk == chunk_size {
                chunk_hashes.extend_from_slice(&chunk.finalize_reset());
                in_chunk = 0;
            }
        }
    }
    if in_chunk > 0 {
        chunk_hashes.extend_from_slice(&chunk.finalize());
    }
    Ok(ImageDigest {
        size,
        sha256: whole.finalize().into(),
        chunk_hashes,
    })
}

/// Serialises and signs a manifest. The manifest is validated first, so the tool cannot produce
/// a release that every device would refuse as malformed.
pub fn sign_manifest(manifest: &Manifest, key: &SigningKey) -> Result<Envelope, Refusal> {
    manifest.validate()?;
    let mut manifest_bytes =
        serde_json::to_vec_pretty(manifest).expect("a manifest always serialises");
    manifest_bytes.push(b'\n');
    let mut envelope = Envelope {
        manifest_bytes,
        signatures: Vec::new(),
    };
    add_signature(&mut envelope, key);
    Ok(envelope)
}

/// Adds `key`'s signature over the manifest bytes as they are; a key that already signed is
/// replaced, not listed twice.
pub fn add_signature(envelope: &mut Envelope, key: &SigningKey) {
    let keyid = KeyId::of(&key.verifying_key());
    envelope.signatures.retain(|entry| entry.keyid != keyid);
    envelope.signatures.push(SignatureEntry {
        keyid,
        sig: key.sign(&envelope.manifest_bytes),
    });
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
        let digest = digest_image(file.path(), 4096).unwrap();
        assert_eq!(digest.size, 10_000);
        assert_eq!(digest.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        assert_eq!(digest.chunk_hashes.len(), 3 * 32);
        assert_eq!(
            &digest.chunk_hashes[64..],
            Sha256::digest(&data[8192..]).as_slice()
        );
    }
}
