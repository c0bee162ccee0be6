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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
use sha2::{Digest, Sha256};

use super::error::TransferError;
use crate::release::block_index::IndexFile;

/// Bytes per read: a multiple of every logical block size, so `O_DIRECT` offsets and lengths
/// stay aligned. 2 MiB: with reads past the page cache one at a time per thread, larger reads
/// are faster (1 MiB ones made a 2 GiB install about 1.3x slower on a virtio disk, measured).
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
        AlignedBuf::with_len(READ_BUFFER)
    }

    /// `len`: a multiple of [`ALIGN`].
    fn with_len(len: usize) -> AlignedBuf {
        let storage = vec![0u8; len + ALIGN];
        let skew = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf { storage, skew }
    }

    fn len(&self) -> usize {
        self.storage.len() - ALIGN
    }

    fn as_ref(&self) -> &[u8] {
        &self.storage[self.skew..self.skew + self.len()]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.storage[self.skew..self.skew + len]
    }
}

// ------------------------------------------------------------------------------------------
// The read-back that overlaps the write

/// What each region read back during an install is checked against.
pub(crate) enum Check {
    /// The image's SHA-256: the regions are hashed in order, one thread reading and one hashing.
    Whole([u8; 32]),
    /// Every block against its entry of the release's signed block index, the regions spread
    /// over a pool of threads. This is the image's one hash pass: the signed manifest names the
    /// index's SHA-256, and the index binds the image's size and every block of it, so a slot
    /// whose every block matches holds the signed image; the stream does not hash it again.
    Blocks(Arc<IndexFile>, Origin),
}

/// How the bytes checked against the block index reached the slot: what a block that differs
/// then means.
#[derive(Clone, Copy)]
pub(crate) enum Origin {
    /// As they came (a full download): nothing hashed them before they were written, so a block
    /// that differs came wrong or was not kept (`hash-mismatch`).
    AsReceived,
    /// Each block matched the index before it was written (a delta's assembly), so a block that
    /// differs is the storage's doing (`readback-mismatch`).
    EachBlockChecked,
}

/// Bytes one thread reads and checks at a time during an install (a multiple of every block
/// size and of [`ALIGN`]): smaller than [`READ_BUFFER`], since these buffers live beside the
/// write's (peak RSS 18.7 MiB with 2 MiB ones, measured).
const PIECE: usize = 512 * 1024;

/// Most threads of the pool, whatever the core count: each holds a buffer of 2 MiB (512 KiB
/// with the overlap).
const MAX_THREADS: usize = 4;

/// Fewest threads of the pool: with one core, one thread reads while the other hashes (as the
/// sequential read-back does); one thread alone would wait for each read before hashing it.
const MIN_THREADS: usize = 2;

/// The read-back of an install, running while the image is still being written: each region
/// is read back past the page cache (as [`verify_slot`] does) as soon as the writer reports it
/// durable ([`ReadbackFeed::durable`]), and checked against the signed hashes ([`Check`]).
/// [`Readback::finish`] waits for the rest once everything is durable. Dropping it stops the
/// threads.
pub(crate) struct Readback {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

/// The writer's end: tells the read-back how far the slot is durable.
#[derive(Clone)]
pub(crate) struct ReadbackFeed(Arc<Shared>);

impl ReadbackFeed {
    /// `[0, upto)` is on the storage (after `fdatasync`): it may be read back.
    pub(crate) fn durable(&self, upto: u64) {
        let mut state = self.0.lock();
        if upto > state.durable {
            state.durable = upto.min(self.0.size);
            if self.0.overlap {
                state.released = state.durable;
                self.0.wake.notify_all();
            }
        }
    }
}

struct Shared {
    path: PathBuf,
    size: u64,
    /// Bytes read and checked at a time: [`PIECE`] beside the write (its buffers are still
    /// there), [`READ_BUFFER`] after it (fewer, larger reads: measured faster on a virtio disk).
    piece: usize,
    /// Whether regions are read back as they become durable, or only once all of them are.
    overlap: bool,
    /// A region handed out ends on a multiple of this (or at `size`): block boundaries, or
    /// `O_DIRECT`'s alignment.
    granule: u64,
    direct: Option<File>,
    plain: File,
    /// `O_DIRECT` was refused: every region is read through the page cache after dropping it.
    plain_only: AtomicBool,
    /// Bytes read back and matched so far.
    verified: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    /// `UPDATE_AGENT_CRASH_AT=readback:bytes:N`: a power cut once N bytes are read back.
    #[cfg(feature = "test-hooks")]
    crash_at: Option<u64>,
}

struct State {
    /// The writer's last `fdatasync` covered `[0, durable)`.
    durable: u64,
    /// What may be read back: `durable` with the overlap, else nothing until
    /// [`Readback::finish`].
    released: u64,
    /// Where the next region to hand out starts.
    next: u64,
    failure: Option<TransferError>,
    stop: bool,
}

impl Readback {
    /// Starts the read-back of `[0, size)` of the slot at `path`; `[0, durable)` is already on
    /// the storage (a resumed write's checkpoint). With `overlap` each region is read back once
    /// durable; without, nothing is read before [`Readback::finish`] (all of it durable by then).
    pub(crate) fn start(
        path: &Path,
        size: u64,
        check: Check,
        durable: u64,
        overlap: bool,
    ) -> Result<Readback, TransferError> {
        let durable = durable.min(size);
        if overlap {
            tracing::info!("read-back: each region as soon as it is synced, beside the write");
        }
        let plain =
            File::open(path).map_err(|e| TransferError::slot_io(path, "open for read-back", e))?;
        let direct = match OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => None,
            Err(e) => return Err(TransferError::slot_io(path, "open for read-back", e)),
        };
        let granule = match &check {
            Check::Whole(_) => ALIGN as u64,
            Check::Blocks(index, _) => u64::from(index.header().block_size),
        };
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            size,
            piece: if overlap { PIECE } else { READ_BUFFER },
            overlap,
            granule,
            plain_only: AtomicBool::new(direct.is_none()),
            direct,
            plain,
            verified: AtomicU64::new(0),
            state: Mutex::new(State {
                durable,
                released: if overlap { durable } else { 0 },
                next: 0,
                failure: None,
                stop: false,
            }),
            wake: Condvar::new(),
            #[cfg(feature = "test-hooks")]
            crash_at: crate::crash_point::requested()
                .and_then(|at| at.strip_prefix("readback:bytes:")?.parse().ok()),
        });
        let mut readback = Readback {
            shared: shared.clone(),
            workers: Vec::new(),
        };
        let spawn = |name: &str, work: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(work)
                .map_err(|e| TransferError::slot_io(path, "start the read-back", e))
        };
        match check {
            Check::Whole(sha256) => {
                let (full_tx, full_rx) = std::sync::mpsc::sync_channel(BUFFERS);
                let (free_tx, free_rx) = std::sync::mpsc::sync_channel(BUFFERS);
                for _ in 0..BUFFERS {
                    free_tx
                        .send(AlignedBuf::with_len(shared.piece))
                        .expect("room for every buffer");
                }
                let reader = shared.clone();
                readback.workers.push(spawn(
                    "readback-read",
                    Box::new(move || reader.read_in_order(&free_rx, &full_tx)),
                )?);
                let hasher = shared;
                readback.workers.push(spawn(
                    "readback-hash",
                    Box::new(move || hasher.hash_in_order(&sha256, &full_rx, &free_tx)),
                )?);
            }
            Check::Blocks(index, origin) => {
                let threads = std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .clamp(MIN_THREADS, MAX_THREADS);
                tracing::info!(
                    "read-back: each durable region checked against the block index, {threads} threads"
                );
                for _ in 0..threads {
                    let worker = shared.clone();
                    let index = index.clone();
                    readback.workers.push(spawn(
                        "readback-blocks",
                        Box::new(move || worker.check_blocks(&index, origin)),
                    )?);
                }
            }
        }
        Ok(readback)
    }

    pub(crate) fn feed(&self) -> ReadbackFeed {
        ReadbackFeed(self.shared.clone())
    }

    /// Waits until every byte is read back and matched. Blocking. The writer must have reported
    /// all of `[0, size)` durable; a read-back that already failed says why.
    pub(crate) fn finish(mut self) -> Result<(), TransferError> {
        let started = std::time::Instant::now();
        let verified_before = self.shared.verified.load(Ordering::Relaxed);
        {
            let mut state = self.shared.lock();
            if state.failure.is_none() && state.durable < self.shared.size {
                // Never reached with a sink that finished; stop rather than wait forever.
                state.stop = true;
                self.shared.wake.notify_all();
                drop(state);
                self.join();
                return Err(self.shared.mismatch(format!(
                    "only {} of {} bytes were made durable",
                    self.shared.lock().durable,
                    self.shared.size
                )));
            }
            state.released = self.shared.size;
            self.shared.wake.notify_all();
        }
        self.join();
        let mut state = self.shared.lock();
        if let Some(failure) = state.failure.take() {
            return Err(failure);
        }
        let verified = self.shared.verified.load(Ordering::Relaxed);
        tracing::debug!(
            "read-back: {} bytes matched before the write ended, {} after it in {:.3} s",
            verified_before,
            verified.saturating_sub(verified_before),
            started.elapsed().as_secs_f64()
        );
        if verified != self.shared.size {
            return Err(self.shared.mismatch(format!(
                "only {verified} of {} bytes were read back",
                self.shared.size
            )));
        }
        Ok(())
    }

    fn stop(&self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
    }

    fn join(&mut self) {
        for worker in self.workers.drain(..) {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for Readback {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            self.stop();
            for worker in self.workers.drain(..) {
                let _ = worker.join();
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A thread that panicked holding the lock is re-raised by `join`; the state itself is
        // a few numbers that stay consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mismatch(&self, detail: String) -> TransferError {
        TransferError::ReadbackMismatch {
            path: self.path.clone(),
            detail,
        }
    }

    /// Records the first failure and stops every thread.
    fn fail(&self, failure: TransferError) {
        let mut state = self.lock();
        state.failure.get_or_insert(failure);
        state.stop = true;
        self.wake.notify_all();
    }

    /// The next region of at most `max` bytes that is durable and not yet handed out; waits
    /// for the writer when there is none yet. `None`: all handed out, or stopped.
    fn take(&self, max: u64) -> Option<(u64, usize)> {
        let mut state = self.lock();
        loop {
            if state.stop || state.next >= self.size {
                return None;
            }
            let limit = if state.released >= self.size {
                self.size
            } else {
                state.released / self.granule * self.granule
            };
            let end = (state.next + max).min(limit);
            if end > state.next {
                let region = (state.next, (end - state.next) as usize);
                state.next = end;
                return Some(region);
            }
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Reads `[at, at + len)` into `buf` from the medium, not from the page cache.
    fn read(&self, buf: &mut AlignedBuf, at: u64, len: usize) -> Result<(), TransferError> {
        if !self.plain_only.load(Ordering::Relaxed)
            && let Some(direct) = &self.direct
        {
            // O_DIRECT wants aligned lengths: a whole granule past the image's end is read, and
            // what a block device returns there is not checked.
            let want = len.next_multiple_of(ALIGN).min(buf.len());
            match read_fully(direct, &mut buf.as_mut()[..want], at, len) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                    self.plain_only.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(self.read_error(e, at, len)),
                Ok(()) => return Ok(()),
            }
        }
        // Without O_DIRECT: the region is synced, so its pages are clean and DONTNEED drops
        // them; the read then comes from the storage.
        let len_i64 = i64::try_from(len).unwrap_or(i64::MAX);
        let at_i64 = i64::try_from(at).unwrap_or(i64::MAX);
        posix_fadvise(
            &self.plain,
            at_i64,
            len_i64,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(|e| TransferError::slot_io(&self.path, "drop cached pages of", e.into()))?;
        read_fully(&self.plain, &mut buf.as_mut()[..len], at, len)
            .map_err(|e| self.read_error(e, at, len))
    }

    fn read_error(&self, e: io::Error, at: u64, len: usize) -> TransferError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.mismatch(format!(
                "the slot ends inside bytes {at}..{} of {}",
                at + len as u64,
                self.size
            ))
        } else {
            TransferError::slot_io(&self.path, "read back", e)
        }
    }

    fn matched(&self, len: usize) {
        let verified = self.verified.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        #[cfg(feature = "test-hooks")]
        if let Some(limit) = self.crash_at
            && verified >= limit
        {
            crate::crash_point::crash(&format!("readback:bytes:{limit}"));
        }
        let _ = verified;
    }

    /// [`Check::Whole`]'s reader: the regions in order, into the hasher's queue.
    fn read_in_order(
        &self,
        free: &std::sync::mpsc::Receiver<AlignedBuf>,
        full: &std::sync::mpsc::SyncSender<(AlignedBuf, usize)>,
    ) {
        while let Some((at, len)) = self.take(self.piece as u64) {
            // The hasher gave up: it returns no more buffers.
            let Ok(mut buf) = free.recv() else { return };
            if let Err(e) = self.read(&mut buf, at, len) {
                return self.fail(e);
            }
            if full.send((buf, len)).is_err() {
                return;
            }
        }
    }

    /// [`Check::Whole`]'s hasher: the image's SHA-256 over the regions as read back.
    fn hash_in_order(
        &self,
        sha256: &[u8; 32],
        full: &std::sync::mpsc::Receiver<(AlignedBuf, usize)>,
        free: &std::sync::mpsc::SyncSender<AlignedBuf>,
    ) {
        let mut hasher = Sha256::new();
        let mut hashed = 0u64;
        while hashed < self.size {
            // The reader stopped (failed, or told to).
            let Ok((buf, len)) = full.recv() else { return };
            hasher.update(&buf.as_ref()[..len]);
            hashed += len as u64;
            let _ = free.send(buf);
            if hashed < self.size {
                self.matched(len);
            } else {
                let actual: [u8; 32] = hasher.clone().finalize().into();
                if actual != *sha256 {
                    return self.fail(self.mismatch(format!(
                        "sha256 {} instead of {}",
                        hex::encode(actual),
                        hex::encode(sha256)
                    )));
                }
                self.matched(len);
            }
        }
    }

    /// [`Check::Blocks`]: one thread of the pool, taking regions until none is left.
    fn check_blocks(&self, index: &IndexFile, origin: Origin) {
        let block_size = index.header().block_size as usize;
        let mut buf = AlignedBuf::with_len(self.piece);
        let mut hashes = vec![[0u8; 32]; self.piece / block_size];
        while let Some((at, len)) = self.take(self.piece as u64) {
            if let Err(e) = self.read(&mut buf, at, len) {
                return self.fail(e);
            }
            let first = at / block_size as u64;
            let count = len.div_ceil(block_size);
            if let Err(e) = index.read_hashes(first, &mut hashes[..count]) {
                return self.fail(TransferError::slot_io(
                    &self.path,
                    "read the block index for the read-back of",
                    e,
                ));
            }
            let bytes = &buf.as_ref()[..len];
            for (k, (block, expected)) in bytes.chunks(block_size).zip(&hashes).enumerate() {
                let number = first + k as u64;
                // An all-zero block's signed hash is the zero hash: comparing the bytes with
                // zero is the same check without hashing them.
                let good = if index.is_zero(number, expected) {
                    block.iter().all(|&b| b == 0)
                } else {
                    <[u8; 32]>::from(Sha256::digest(block)) == *expected
                };
                if !good {
                    let start = number * block_size as u64;
                    let detail = format!(
                        "block {number} (bytes {start}..{}) does not match the signed block index",
                        start + block.len() as u64
                    );
                    return self.fail(match origin {
                        Origin::AsReceived => TransferError::BlockMismatch {
                            path: self.path.clone(),
                            detail,
                        },
                        Origin::EachBlockChecked => self.mismatch(detail),
                    });
                }
            }
            self.matched(len);
        }
    }
}

/// Reads exactly `need` bytes at `at` (reading `buf.len()`, for O_DIRECT's aligned lengths);
/// `UnexpectedEof` when the file ends first.
fn read_fully(file: &File, buf: &mut [u8], at: u64, need: usize) -> io::Result<()> {
    let mut filled = 0;
    while filled < need {
        match file.read_at(&mut buf[filled..], at + filled as u64) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_readback_mismatch(err: &TransferError) {
        assert!(
            matches!(err, TransferError::ReadbackMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn fallback_without_o_direct_hashes_the_region() {
        let (_dir, path) = crate::scratch_path("slot");
        let data: Vec<u8> = (0..3 * READ_BUFFER + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let size = data.len() as u64 - 5;
        let expected: [u8; 32] = Sha256::digest(&data[..size as usize]).into();

        assert_eq!(read_back_uncached(&path, size).unwrap(), expected);
        assert_eq!(read_back(&path, size).unwrap(), expected);
        let err = read_back_uncached(&path, data.len() as u64 + 1).unwrap_err();
        assert_readback_mismatch(&err);
    }

    /// 5 MiB and a bit, of 4 KiB blocks: distinct content, some all-zero blocks, a short end.
    fn image() -> Vec<u8> {
        let mut image: Vec<u8> = (0..5 * PIECE + 4096 * 3 + 1000)
            .map(|i| ((i / 7) % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        image[PIECE..PIECE + 3 * 4096].fill(0);
        image
    }

    /// Writes `image` into a new slot file in steps, telling the read-back each step is
    /// durable, as the writer does; then finishes it.
    fn overlapped(
        check: impl Fn() -> Check,
        image: &[u8],
        slot_bytes: &[u8],
    ) -> Result<(), TransferError> {
        let (_dir, path) = crate::scratch_path("slot");
        std::fs::write(&path, b"").unwrap();
        let slot = OpenOptions::new().write(true).open(&path).unwrap();
        let readback = Readback::start(&path, image.len() as u64, check(), 0, true)?;
        let feed = readback.feed();
        // Steps that do not fall on block boundaries: the read-back takes whole blocks only.
        for step in slot_bytes.chunks(700_001) {
            let at = step.as_ptr() as usize - slot_bytes.as_ptr() as usize;
            slot.write_all_at(step, at as u64).unwrap();
            slot.sync_data().unwrap();
            feed.durable((at + step.len()) as u64);
        }
        readback.finish()
    }

    #[test]
    fn overlapped_read_back_checks_every_block_against_the_index() {
        let image = image();
        let dir = tempfile::tempdir().unwrap();
        let (index, _) =
            crate::release::block_index::testing::expanded(dir.path(), &image, 4096, 4);
        let index = Arc::new(index);
        let blocks = || Check::Blocks(index.clone(), Origin::AsReceived);
        overlapped(blocks, &image, &image).unwrap();
        // After a delta's assembly, whose blocks each matched before they were written, a block
        // that differs is the storage's.
        let checked = || Check::Blocks(index.clone(), Origin::EachBlockChecked);
        let mut bad = image.clone();
        bad[3 * PIECE + 5] ^= 0x40;
        let err = overlapped(checked, &image, &bad).unwrap_err();
        assert_eq!(
            err.reason(),
            crate::reason::ReasonCode::ReadbackMismatch,
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("does not match the signed block index"),
            "{err}"
        );

        for (at, what) in [
            (3 * PIECE + 5, "a changed byte"),
            (PIECE + 4096 + 7, "a byte in an all-zero block"),
            (image.len() - 1, "the last byte"),
        ] {
            let mut bad = image.clone();
            bad[at] ^= 0x40;
            let err = overlapped(blocks, &image, &bad).unwrap_err();
            let block = at / 4096;
            assert!(
                matches!(&err, TransferError::BlockMismatch { detail, .. }
                    if detail.contains(&format!("block {block} "))),
                "{what}: {err}"
            );
            assert_eq!(
                err.reason(),
                crate::reason::ReasonCode::HashMismatch,
                "{what}"
            );
        }
        let err = overlapped(blocks, &image, &image[..image.len() - 10]).unwrap_err();
        assert_readback_mismatch(&err);
    }

    #[test]
    fn overlapped_read_back_without_an_index_hashes_the_image_in_order() {
        let image = image();
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let whole = || Check::Whole(sha256);
        overlapped(whole, &image, &image).unwrap();
        let mut bad = image.clone();
        bad[2 * PIECE + 3] ^= 1;
        let err = overlapped(whole, &image, &bad).unwrap_err();
        assert_readback_mismatch(&err);
    }

    #[test]
    fn read_back_waits_for_durable_bytes_and_finish_refuses_a_write_not_all_durable() {
        let image = image();
        let sha256: [u8; 32] = Sha256::digest(&image).into();
        let (_dir, path) = crate::scratch_path("slot");
        // The whole image is in the file, but only a part was reported durable.
        std::fs::write(&path, &image).unwrap();
        let readback =
            Readback::start(&path, image.len() as u64, Check::Whole(sha256), 0, true).unwrap();
        readback.feed().durable(2 * PIECE as u64 + 1);
        let started = std::time::Instant::now();
        while readback.shared.verified.load(Ordering::Relaxed) < 2 * PIECE as u64 {
            assert!(
                started.elapsed().as_secs() < 10,
                "the durable part was not read back"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Nothing past the last whole granule below the durable offset is read.
        assert_eq!(
            readback.shared.verified.load(Ordering::Relaxed),
            2 * PIECE as u64
        );
        let err = readback.finish().unwrap_err();
        assert_readback_mismatch(&err);
    }
}
