//! Read-back: hash a slot's first `size` bytes as the medium holds them, not as the page cache
//! remembers them, so a write the storage silently dropped or garbled is caught before the slot
//! is ever booted.
//!
//! The slot is read with `O_DIRECT` into an aligned buffer. Filesystems without `O_DIRECT`
//! (tmpfs, some FUSE and network filesystems) refuse it with `EINVAL`; then the region is synced
//! and dropped from the page cache with `posix_fadvise(POSIX_FADV_DONTNEED)` and read normally.
//! DONTNEED drops only clean pages — after the sync all of them are — so the reads go to the
//! storage; on tmpfs there is no storage behind the cache and the check is as good as it gets.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use sha2::{Digest, Sha256};

use super::error::TransferError;

/// Bytes per read: a multiple of every logical block size, so `O_DIRECT` offsets and lengths
/// stay aligned.
const READ_BUFFER: usize = 2 * 1024 * 1024;

/// Buffers in flight between the reading and the hashing thread.
const BUFFERS: usize = 2;

/// Memory alignment for `O_DIRECT` buffers: the largest logical block size in common use.
const ALIGN: usize = 4096;

/// Checks that the slot at `path` holds, in `[0, size)`, bytes with SHA-256 `sha256`, reading
/// them back past the page cache. Blocking; for the engine to re-check a slot after a restart.
pub fn verify_slot(path: &Path, size: u64, sha256: &[u8; 32]) -> Result<(), TransferError> {
    let actual = read_back(path, size)?;
    if actual != *sha256 {
        return Err(TransferError::ReadbackMismatch {
            path: path.to_path_buf(),
            detail: format!(
                "sha256 {} instead of {}",
                hex::encode(actual),
                hex::encode(sha256)
            ),
        });
    }
    Ok(())
}

fn read_back(path: &Path, size: u64) -> Result<[u8; 32], TransferError> {
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(file) => match hash_region(&file, path, size) {
            Err(Unread::Refused) => {}
            Err(Unread::Failed(e)) => return Err(e),
            Ok(digest) => return Ok(digest),
        },
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
        Err(e) => return Err(TransferError::slot_io(path, "open for read-back", e)),
    }
    read_back_uncached(path, size)
}

/// The fallback for filesystems without `O_DIRECT`.
fn read_back_uncached(path: &Path, size: u64) -> Result<[u8; 32], TransferError> {
    let file =
        File::open(path).map_err(|e| TransferError::slot_io(path, "open for read-back", e))?;
    file.sync_data()
        .map_err(|e| TransferError::slot_io(path, "sync", e))?;
    let len = i64::try_from(size).unwrap_or(i64::MAX);
    posix_fadvise(&file, 0, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| TransferError::slot_io(path, "drop cached pages of", e.into()))?;
    hash_region(&file, path, size).map_err(|unread| match unread {
        Unread::Failed(e) => e,
        Unread::Refused => TransferError::slot_io(
            path,
            "read back",
            io::Error::from_raw_os_error(nix::libc::EINVAL),
        ),
    })
}

enum Unread {
    /// The first read was refused with `EINVAL`: no `O_DIRECT` here after all.
    Refused,
    Failed(TransferError),
}

/// Reads `[0, size)` on a helper thread while this one hashes: the storage and SHA-256 each
/// take about as long, so overlapping them nearly halves the read-back.
fn hash_region(file: &File, path: &Path, size: u64) -> Result<[u8; 32], Unread> {
    let (full_tx, full_rx) =
        std::sync::mpsc::sync_channel::<io::Result<(AlignedBuf, usize)>>(BUFFERS);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<AlignedBuf>(BUFFERS);
    for _ in 0..BUFFERS {
        free_tx
            .send(AlignedBuf::new())
            .expect("room for every buffer");
    }
    // `move`: the hasher's channel ends drop when it returns, which unblocks a reader still
    // waiting on them before the scope joins it.
    std::thread::scope(move |scope| {
        scope.spawn(move || {
            let mut offset = 0u64;
            while offset < size {
                // The hasher gave up: it returns no more buffers.
                let Ok(mut buf) = free_rx.recv() else { return };
                // Always a whole buffer: O_DIRECT wants aligned lengths; bytes a block device
                // returns past `size` are not hashed.
                let read = loop {
                    match file.read_at(buf.as_mut(), offset) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other,
                    }
                };
                let stop = !matches!(read, Ok(n) if n > 0);
                if let Ok(n) = read {
                    offset += n as u64;
                }
                if full_tx.send(read.map(|n| (buf, n))).is_err() || stop {
                    return;
                }
            }
        });

        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        while offset < size {
            let (buf, n) = match full_rx.recv().expect("the reader reports before it stops") {
                Ok((_, 0)) => {
                    return Err(Unread::Failed(TransferError::ReadbackMismatch {
                        path: path.to_path_buf(),
                        detail: format!("the slot ends after {offset} of {size} bytes"),
                    }));
                }
                Ok(read) => read,
                Err(e) if offset == 0 && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    return Err(Unread::Refused);
                }
                Err(e) => {
                    return Err(Unread::Failed(TransferError::slot_io(path, "read back", e)));
                }
            };
            let take = (n as u64).min(size - offset) as usize;
            hasher.update(&buf.as_ref()[..take]);
            offset += n as u64;
            // The reader may be done already; the buffer is then simply dropped.
            let _ = free_tx.send(buf);
        }
        Ok(hasher.finalize().into())
    })
}

/// A buffer whose start is aligned for `O_DIRECT`: an aligned window into a slightly larger
/// Vec, so no unsafe allocation is needed.
struct AlignedBuf {
    storage: Vec<u8>,
    skew: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        let storage = vec![0u8; READ_BUFFER + ALIGN];
        let skew = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf { storage, skew }
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.skew..self.skew + READ_BUFFER]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.skew..self.skew + READ_BUFFER]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_without_o_direct_hashes_the_region() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot");
        let data: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let size = data.len() as u64 - 5;
        let expected: [u8; 32] = Sha256::digest(&data[..size as usize]).into();

        assert_eq!(read_back_uncached(&path, size).unwrap(), expected);
        assert_eq!(read_back(&path, size).unwrap(), expected);
        let err = read_back_uncached(&path, data.len() as u64 + 1).unwrap_err();
        assert!(matches!(err, TransferError::ReadbackMismatch { .. }));
    }
}
