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
const READ_BUFFER: usize = 1024 * 1024;

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

fn hash_region(file: &File, path: &Path, size: u64) -> Result<[u8; 32], Unread> {
    // An aligned window into a slightly larger Vec: no unsafe allocation needed.
    let mut storage = vec![0u8; READ_BUFFER + ALIGN];
    let skew = storage.as_ptr().align_offset(ALIGN);
    let buf = &mut storage[skew..skew + READ_BUFFER];

    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    while offset < size {
        // Always a whole buffer: O_DIRECT wants aligned lengths, and the bytes past `size` that a
        // block device returns are simply not hashed.
        match file.read_at(buf, offset) {
            Ok(0) => {
                return Err(Unread::Failed(TransferError::ReadbackMismatch {
                    path: path.to_path_buf(),
                    detail: format!("the slot ends after {offset} of {size} bytes"),
                }));
            }
            Ok(n) => {
                let take = (n as u64).min(size - offset) as usize;
                hasher.update(&buf[..take]);
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if offset == 0 && e.raw_os_error() == Some(nix::libc::EINVAL) => {
                return Err(Unread::Refused);
            }
            Err(e) => {
                return Err(Unread::Failed(TransferError::slot_io(path, "read back", e)));
            }
        }
    }
    Ok(hasher.finalize().into())
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
