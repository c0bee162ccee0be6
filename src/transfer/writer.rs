//! The slot side of a transfer: open and size the slot, rebuild the hash for a resume, and the
//! sink that turns transport chunks into slot bytes — decompress, hash, write, sync — on a
//! blocking thread, so that slow storage never stalls the network side and vice versa.
//!
//! Memory is fixed: one write buffer, one decompression buffer, the zstd window (bounded by
//! [`ZSTD_WINDOW_LOG_MAX`]) and the chunks queued between the two sides.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::error::TransferError;
use super::readback::ReadbackFeed;

/// Bytes gathered before one `pwrite`: large enough that a block device sees big requests, as
/// with `dd bs=1M`.
pub(crate) const WRITE_BUFFER: usize = 1024 * 1024;

/// A chunk at least this large that arrives while the write buffer is empty is written as it is,
/// without first being copied into the buffer: the kernel still sees large requests.
pub(crate) const DIRECT_WRITE_MIN: usize = 256 * 1024;

/// Output of one zstd decompression step (zstd blocks are at most 128 KiB).
const DECODE_BUFFER: usize = 128 * 1024;

/// Largest zstd window accepted: 8 MiB, what `zstd -1` to `-19` use. A frame asking for more
/// (`--long`, `--ultra -22`) would make the decoder allocate up to 2 GiB on the device's word,
/// so it is refused instead.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// What the network side hands the sink.
pub(crate) enum Msg {
    Data(Bytes),
    /// The transport ended with all its bytes; anything else closing the queue is an abort.
    End,
}

/// Opens the slot for writing after checking that the image fits.
///
/// Only regular files (tests, the file backend) and block devices are slots. A block device is
/// opened with `O_EXCL`, which Linux refuses with `EBUSY` while the device is mounted: the
/// booted slot, or any mounted one, can never be written by mistake.
pub(crate) fn open_slot(path: &Path, capacity: u64, size: u64) -> Result<File, TransferError> {
    let too_large = |capacity| TransferError::ImageTooLarge {
        path: path.to_path_buf(),
        size,
        capacity,
    };
    if size > capacity {
        return Err(too_large(capacity));
    }
    let meta = std::fs::metadata(path).map_err(|e| TransferError::slot_io(path, "inspect", e))?;
    let block = meta.file_type().is_block_device();
    if !block && !meta.is_file() {
        return Err(TransferError::slot_io(
            path,
            "use",
            io::Error::other("it is neither a block device nor a regular file"),
        ));
    }
    let mut options = OpenOptions::new();
    // Never `create`: a mistyped device path must not become a file in /dev.
    options.read(true).write(true);
    if block {
        options.custom_flags(nix::libc::O_EXCL);
    }
    let file = options
        .open(path)
        .map_err(|e| TransferError::slot_io(path, "open", e))?;
    let opened = file
        .metadata()
        .map_err(|e| TransferError::slot_io(path, "inspect", e))?;
    if opened.dev() != meta.dev() || opened.ino() != meta.ino() {
        return Err(TransferError::slot_io(
            path,
            "open",
            io::Error::other("it was replaced while being opened"),
        ));
    }
    if block {
        let device_size =
            block_device_size(&file).map_err(|e| TransferError::slot_io(path, "size", e))?;
        if size > device_size {
            return Err(too_large(device_size.min(capacity)));
        }
    }
    Ok(file)
}

// BLKGETSIZE64 is declared `_IOR(0x12, 114, size_t)` but the kernel writes a u64: on 32-bit ARM
// the request number holds 4 while the data is 8 bytes, so the code is spelled out here rather
// than derived from the data type.
nix::ioctl_read_bad!(
    blkgetsize64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
    u64
);

pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: the fd is open for the whole call and `size` is a valid u64 the kernel fills.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

/// The hash state of the slot's first `upto` bytes, read back from the slot, or `None` when the
/// slot holds fewer bytes (a file slot that was truncated): the caller then starts from 0.
pub(crate) fn rehash(file: &File, path: &Path, upto: u64) -> Result<Option<Sha256>, TransferError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; WRITE_BUFFER];
    let mut offset = 0u64;
    while offset < upto {
        let want = (upto - offset).min(buf.len() as u64) as usize;
        match file.read_at(&mut buf[..want], offset) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::slot_io(path, "read back for resuming", e)),
        }
    }
    Ok(Some(hasher))
}

/// How the sink is to treat the stream.
pub(crate) struct SinkConfig {
    pub path: PathBuf,
    /// The URL, escaped, for messages.
    pub shown: String,
    pub size: u64,
    /// Slot offset of the first byte to come; the hasher already holds `[0, start)`.
    pub start: u64,
    pub hasher: Sha256,
    /// The image's SHA-256 to match in the stream; `None` when the read-back checks every block
    /// against the signed block index instead (each byte is then hashed once, there), or when
    /// the stream goes to the installer, which hashes what it is sent.
    pub expected: Option<[u8; 32]>,
    /// 0: no intermediate syncs.
    pub checkpoint_interval: u64,
    /// Whether checkpoints are reported: only a resumable (uncompressed) image has any use for
    /// them.
    pub report_checkpoints: bool,
    /// The expected transport SHA-256 of a zstd-compressed image.
    pub zstd: Option<[u8; 32]>,
    /// The read-back running beside the write: told each durable offset, also where no
    /// checkpoint is reported (compressed images).
    pub readback: Option<ReadbackFeed>,
}

/// Where the sink's bytes go.
pub(crate) trait Destination: Send {
    /// What [`Destination::put`] does, for messages (`cannot write …`).
    const PUT: &'static str;
    /// Takes `bytes`, whose place in the slot is offset `at`.
    fn put(&mut self, bytes: &[u8], at: u64) -> io::Result<()>;
    /// Makes everything put so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// The slot itself (a block device or a regular file): written at offsets, `fdatasync`ed.
pub(crate) struct SlotFile(pub File);

impl Destination for SlotFile {
    const PUT: &'static str = "write";

    fn put(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        self.0.write_all_at(bytes, at)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// The byte stream to the privileged installer (a socket): bytes go out in order, nothing is
/// synced here, and the image hash is the installer's to check (it alone sees the whole image
/// when resuming).
pub(crate) struct InstallerStream(pub File);

impl Destination for InstallerStream {
    const PUT: &'static str = "send to";

    fn put(&mut self, bytes: &[u8], _at: u64) -> io::Result<()> {
        crate::socket::send_all(&self.0, bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) enum SinkOutcome {
    /// Every byte written, synced, and the image hash matched.
    Finished,
    /// The queue closed without [`Msg::End`]: what arrived was written and synced, a checkpoint
    /// for it reported.
    Aborted,
}

/// How a transfer into a sink ended, from the feeding side's `failure` and the sink's
/// `outcome`: a slot that cannot be written is the bigger problem (it tells the operator more),
/// then the feeding side's failure; a sink that stopped early without either tells that `what`
/// (from `shown`) stopped before its end.
pub(crate) fn ended(
    failure: Option<TransferError>,
    outcome: Result<SinkOutcome, TransferError>,
    shown: &str,
    what: &str,
) -> Result<(), TransferError> {
    match (failure, outcome) {
        (_, Err(sink_error)) => Err(sink_error),
        (Some(failure), Ok(_)) => Err(failure),
        (None, Ok(SinkOutcome::Aborted)) => Err(TransferError::Download {
            url: shown.to_owned(),
            detail: format!("{what} stopped before its end"),
        }),
        (None, Ok(SinkOutcome::Finished)) => Ok(()),
    }
}

/// Runs the sink until the queue ends. `written` is updated after each write;
/// `checkpoints` receives each durable offset after its `fdatasync`.
pub(crate) fn run_sink<D: Destination>(
    destination: D,
    mut config: SinkConfig,
    mut queue: tokio::sync::mpsc::Receiver<Msg>,
    written: Arc<AtomicU64>,
    checkpoints: std::sync::mpsc::Sender<u64>,
) -> Result<SinkOutcome, TransferError> {
    let mut unzstd = match config.zstd {
        Some(expected) => Some(Unzstd::new(expected, &config.shown)?),
        None => None,
    };
    let state = std::mem::take(&mut config.hasher);
    let hash = match unzstd {
        _ if config.expected.is_none() => ImageHash::Off,
        // Decompressed output lives in a reused buffer: nothing to share with another thread,
        // and the decoder is the slow part anyway.
        Some(_) => ImageHash::Inline(state),
        None => ImageHash::threaded(state),
    };
    let mut slot = SlotWriter {
        hash,
        next_checkpoint: next_multiple(config.start, config.checkpoint_interval),
        destination,
        buf: Vec::with_capacity(WRITE_BUFFER),
        flushed: config.start,
        durable: config.start,
        written,
        checkpoints: config.report_checkpoints.then_some(checkpoints),
        config,
        timing: SinkTiming::default(),
    };
    while let Some(msg) = queue.blocking_recv() {
        match msg {
            Msg::Data(chunk) => match &mut unzstd {
                Some(unzstd) => unzstd.feed(&chunk, &mut slot)?,
                None => slot.accept_shared(chunk)?,
            },
            Msg::End => {
                if let Some(unzstd) = &mut unzstd {
                    unzstd.finish(&mut slot)?;
                }
                slot.finish()?;
                return Ok(SinkOutcome::Finished);
            }
        }
    }
    // Keep what arrived before the failure: a resume continues from here instead of from the
    // last interval boundary.
    slot.flush()?;
    if slot.flushed > slot.durable {
        slot.sync_and_report()?;
    }
    Ok(SinkOutcome::Aborted)
}

fn next_multiple(offset: u64, interval: u64) -> Option<u64> {
    if interval == 0 {
        return None;
    }
    Some((offset / interval + 1).saturating_mul(interval))
}

struct SlotWriter<D> {
    destination: D,
    hash: ImageHash,
    config: SinkConfig,
    buf: Vec<u8>,
    /// Slot offset where `buf` starts: everything before it was handed to the kernel.
    flushed: u64,
    /// Slot offset up to which the last `fdatasync` covered.
    durable: u64,
    next_checkpoint: Option<u64>,
    written: Arc<AtomicU64>,
    checkpoints: Option<std::sync::mpsc::Sender<u64>>,
    timing: SinkTiming,
}

/// Where a sink's time went, logged at debug level when it finishes: what the install costs
/// beside the bare write (`benches/install_vs_limits.sh` compares it with `dd`).
#[derive(Default)]
struct SinkTiming {
    puts: std::time::Duration,
    syncs: std::time::Duration,
    sync_count: u32,
}

impl<D: Destination> SlotWriter<D> {
    fn accepted(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Refuses, before any of them is written, bytes that would go past the declared size.
    fn check_room(&self, len: usize) -> Result<(), TransferError> {
        if len as u64 > self.config.size - self.accepted() {
            return Err(TransferError::SizeMismatch {
                url: self.config.shown.clone(),
                detail: format!(
                    "the image goes on past the declared {} bytes",
                    self.config.size
                ),
            });
        }
        Ok(())
    }

    /// Hashes and writes image bytes.
    fn accept(&mut self, data: &[u8]) -> Result<(), TransferError> {
        self.check_room(data.len())?;
        self.hash.update(data);
        self.write(data)
    }

    /// [`SlotWriter::accept`] for a chunk the hashing thread can share without a copy.
    fn accept_shared(&mut self, chunk: Bytes) -> Result<(), TransferError> {
        self.check_room(chunk.len())?;
        self.hash.update_shared(chunk.clone());
        self.write(&chunk)
    }

    fn write(&mut self, mut data: &[u8]) -> Result<(), TransferError> {
        while !data.is_empty() {
            let mut room = WRITE_BUFFER - self.buf.len();
            if let Some(at) = self.next_checkpoint {
                room = room.min((at - self.accepted()) as usize);
            }
            let take = room.min(data.len());
            if self.buf.is_empty() && (take == room || take >= DIRECT_WRITE_MIN) {
                self.put(&data[..take])?;
            } else {
                self.buf.extend_from_slice(&data[..take]);
            }
            data = &data[take..];
            let at_checkpoint = self.next_checkpoint == Some(self.accepted());
            if self.buf.len() == WRITE_BUFFER || at_checkpoint {
                self.flush()?;
            }
            if at_checkpoint {
                self.sync_and_report()?;
                self.next_checkpoint = self
                    .next_checkpoint
                    .and_then(|at| at.checked_add(self.config.checkpoint_interval));
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransferError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let put = self.put(&buf);
        self.buf = buf;
        self.buf.clear();
        put
    }

    /// Hands `bytes`, which follow everything flushed so far, to the destination. The buffer
    /// must be empty (flushed) first.
    fn put(&mut self, bytes: &[u8]) -> Result<(), TransferError> {
        debug_assert!(self.buf.is_empty());
        let started = std::time::Instant::now();
        self.destination
            .put(bytes, self.flushed)
            .map_err(|e| TransferError::slot_io(&self.config.path, D::PUT, e))?;
        self.timing.puts += started.elapsed();
        self.flushed += bytes.len() as u64;
        self.written.store(self.flushed, Ordering::Relaxed);
        Ok(())
    }

    /// `fdatasync`, and only then tell the caller: a checkpoint it persists must never be ahead
    /// of what the storage holds.
    fn sync_and_report(&mut self) -> Result<(), TransferError> {
        self.sync()?;
        self.durable = self.flushed;
        if let Some(readback) = &self.config.readback {
            readback.durable(self.durable);
        }
        if let Some(checkpoints) = &self.checkpoints {
            // The receiver is gone only when the caller already gave up: nothing to tell.
            let _ = checkpoints.send(self.durable);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), TransferError> {
        let started = std::time::Instant::now();
        self.destination
            .sync()
            .map_err(|e| TransferError::slot_io(&self.config.path, "sync", e))?;
        self.timing.syncs += started.elapsed();
        self.timing.sync_count += 1;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), TransferError> {
        self.flush()?;
        self.sync()?;
        self.durable = self.flushed;
        if let Some(readback) = &self.config.readback {
            readback.durable(self.durable);
        }
        if self.flushed != self.config.size {
            return Err(TransferError::SizeMismatch {
                url: self.config.shown.clone(),
                detail: format!(
                    "the image ends after {} bytes, the release declares {}",
                    self.flushed, self.config.size
                ),
            });
        }
        let waited = std::time::Instant::now();
        let actual = self.hash.finalize();
        tracing::debug!(
            "sink: {} bytes to {}: {:.3} s in {}, {} syncs {:.3} s, {:.3} s waiting for the image hash",
            self.flushed,
            self.config.shown,
            self.timing.puts.as_secs_f64(),
            D::PUT,
            self.timing.sync_count,
            self.timing.syncs.as_secs_f64(),
            waited.elapsed().as_secs_f64(),
        );
        if let Some(expected) = self.config.expected
            && actual != expected
        {
            return Err(TransferError::HashMismatch {
                url: self.config.shown.clone(),
                what: "image",
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        // Reported only once the hash matched: a caller resuming from `size` skips the download.
        if let Some(checkpoints) = &self.checkpoints {
            let _ = checkpoints.send(self.durable);
        }
        Ok(())
    }
}

/// The image hash: inline, or on a thread of its own so that hashing and writing use both cores.
enum ImageHash {
    /// Not hashed here: the receiving end of the stream hashes.
    Off,
    Inline(Sha256),
    Thread {
        chunks: Option<std::sync::mpsc::SyncSender<Bytes>>,
        worker: Option<std::thread::JoinHandle<Sha256>>,
    },
}

/// Chunks queued for the hashing thread (each still held there after it was written).
const HASH_QUEUE: usize = 4;

impl ImageHash {
    fn threaded(state: Sha256) -> ImageHash {
        let (chunks, queue) = std::sync::mpsc::sync_channel::<Bytes>(HASH_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("image-hash".into())
            .spawn({
                let mut state = state.clone();
                move || {
                    for chunk in queue {
                        state.update(&chunk);
                    }
                    state
                }
            });
        match spawned {
            Ok(worker) => ImageHash::Thread {
                chunks: Some(chunks),
                worker: Some(worker),
            },
            // No thread to be had: hash inline, only slower.
            Err(_) => ImageHash::Inline(state),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            ImageHash::Off => {}
            ImageHash::Inline(state) => state.update(data),
            ImageHash::Thread { .. } => self.update_shared(Bytes::copy_from_slice(data)),
        }
    }

    fn update_shared(&mut self, chunk: Bytes) {
        match self {
            ImageHash::Off => {}
            ImageHash::Inline(state) => state.update(&chunk),
            ImageHash::Thread { chunks, .. } => chunks
                .as_ref()
                .expect("no update after finalize")
                .send(chunk)
                .expect("the hashing thread runs until its queue closes"),
        }
    }

    fn finalize(&mut self) -> [u8; 32] {
        match self {
            ImageHash::Off => [0; 32],
            ImageHash::Inline(state) => state.clone().finalize().into(),
            ImageHash::Thread { chunks, worker } => {
                drop(chunks.take());
                let worker = worker.take().expect("finalize once");
                match worker.join() {
                    Ok(state) => state.finalize().into(),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        }
    }
}

/// zstd decompression between the transport and the slot, with the transport hash.
struct Unzstd {
    decoder: Decoder<'static>,
    out: Vec<u8>,
    hasher: Sha256,
    expected: [u8; 32],
    /// The decoder stopped at a frame boundary: the stream may end here.
    frame_done: bool,
}

impl Unzstd {
    fn new(expected: [u8; 32], shown: &str) -> Result<Self, TransferError> {
        let mut decoder = Decoder::new().map_err(|e| decompress_error(shown, &e))?;
        decoder
            .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
            .map_err(|e| decompress_error(shown, &e))?;
        Ok(Unzstd {
            decoder,
            out: vec![0; DECODE_BUFFER],
            hasher: Sha256::new(),
            expected,
            frame_done: false,
        })
    }

    fn feed<D: Destination>(
        &mut self,
        data: &[u8],
        slot: &mut SlotWriter<D>,
    ) -> Result<(), TransferError> {
        self.hasher.update(data);
        let mut input = InBuffer::around(data);
        loop {
            let consumed = input.pos();
            let mut output = OutBuffer::around(&mut self.out[..]);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(|e| decompress_error(&slot.config.shown, &e))?;
            let produced = output.pos();
            // A call that did nothing answers with the next header's size even at a frame
            // boundary, so only a step that moved tells where the stream stands.
            if produced > 0 || input.pos() > consumed {
                self.frame_done = hint == 0;
            }
            // `accept` refuses output past the image size before writing it: a small stream
            // that expands without end stops here, one buffer past the limit at most.
            slot.accept(&self.out[..produced])?;
            if input.pos() == data.len() && produced < self.out.len() {
                return Ok(());
            }
        }
    }

    fn finish<D: Destination>(&mut self, slot: &mut SlotWriter<D>) -> Result<(), TransferError> {
        let actual: [u8; 32] = self.hasher.clone().finalize().into();
        if actual != self.expected {
            return Err(TransferError::HashMismatch {
                url: slot.config.shown.clone(),
                what: "compressed image",
                expected: hex::encode(self.expected),
                actual: hex::encode(actual),
            });
        }
        // Drain what the decoder still holds.
        self.feed(&[], slot)?;
        if !self.frame_done {
            return Err(TransferError::Decompress {
                url: slot.config.shown.clone(),
                detail: "the compressed stream ends inside a zstd frame".into(),
            });
        }
        Ok(())
    }
}

fn decompress_error(shown: &str, e: &io::Error) -> TransferError {
    // zstd's words for a frame whose window is over `WindowLogMax`.
    let hint = if e.to_string().contains("too much memory") {
        format!(
            "; frames must use a window of at most {} MiB (compress without --long)",
            (1u64 << ZSTD_WINDOW_LOG_MAX) >> 20
        )
    } else {
        String::new()
    };
    TransferError::Decompress {
        url: shown.to_string(),
        detail: format!("{e}{hint}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_fall_on_multiples_of_the_interval() {
        assert_eq!(next_multiple(0, 64), Some(64));
        assert_eq!(next_multiple(63, 64), Some(64));
        assert_eq!(next_multiple(64, 64), Some(128));
        assert_eq!(next_multiple(10, 0), None);
        assert_eq!(next_multiple(u64::MAX - 1, 1 << 40), Some(u64::MAX));
    }

    /// What a sink handed its destination: each put's offset and bytes, and where it synced.
    #[derive(Default)]
    struct Recorded {
        puts: Vec<(u64, Vec<u8>)>,
        syncs: Vec<u64>,
    }

    struct Recording(std::sync::Arc<std::sync::Mutex<Recorded>>);

    impl Destination for Recording {
        const PUT: &'static str = "record";

        fn put(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
            self.0.lock().unwrap().puts.push((at, bytes.to_vec()));
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            let mut recorded = self.0.lock().unwrap();
            let end = recorded
                .puts
                .last()
                .map_or(0, |(at, b)| at + b.len() as u64);
            recorded.syncs.push(end);
            Ok(())
        }
    }

    /// Large chunks go out as they are, small ones are gathered first; either way the bytes
    /// arrive in order, no put is larger than the write buffer or crosses a checkpoint, and each
    /// sync falls on a checkpoint (or the end).
    #[test]
    fn chunks_are_written_in_order_directly_or_gathered_and_synced_at_checkpoints() {
        const KIB: usize = 1024;
        let sizes = [
            100 * KIB,
            300 * KIB,
            1536 * KIB,
            256 * KIB,
            7,
            16 * KIB,
            2048 * KIB,
            256 * KIB,
            5,
        ];
        let mut image = Vec::new();
        let chunks: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(n, &len)| {
                let chunk: Vec<u8> = (0..len).map(|i| (i * 31 + n * 7) as u8).collect();
                image.extend_from_slice(&chunk);
                Bytes::from(chunk)
            })
            .collect();
        let interval = 3 * 1024 * KIB as u64;
        let (queue, queue_rx) = tokio::sync::mpsc::channel(chunks.len() + 1);
        for chunk in &chunks {
            queue.try_send(Msg::Data(chunk.clone())).unwrap();
        }
        queue.try_send(Msg::End).unwrap();
        let recorded = std::sync::Arc::new(std::sync::Mutex::new(Recorded::default()));
        let config = SinkConfig {
            path: PathBuf::from("recording"),
            shown: "test".into(),
            size: image.len() as u64,
            start: 0,
            hasher: Sha256::new(),
            expected: Some(Sha256::digest(&image).into()),
            checkpoint_interval: interval,
            report_checkpoints: true,
            zstd: None,
            readback: None,
        };
        let (checkpoint_tx, checkpoints) = std::sync::mpsc::channel();
        let outcome = run_sink(
            Recording(recorded.clone()),
            config,
            queue_rx,
            Arc::new(AtomicU64::new(0)),
            checkpoint_tx,
        )
        .unwrap();
        assert!(matches!(outcome, SinkOutcome::Finished));

        let recorded = recorded.lock().unwrap();
        let mut written = Vec::new();
        for (at, bytes) in &recorded.puts {
            assert_eq!(*at, written.len() as u64, "puts follow each other");
            assert!(bytes.len() <= WRITE_BUFFER, "a put of {}", bytes.len());
            let next_checkpoint = (at / interval + 1) * interval;
            assert!(
                at + bytes.len() as u64 <= next_checkpoint,
                "a put at {at} crosses a checkpoint"
            );
            written.extend_from_slice(bytes);
        }
        assert!(written == image, "the bytes arrive as they were sent");
        let size = image.len() as u64;
        assert!(
            recorded
                .syncs
                .iter()
                .all(|&end| end % interval == 0 || end == size),
            "{:?}",
            recorded.syncs
        );
        assert_eq!(recorded.syncs.len() as u64, size / interval + 1);
        // The 256 KiB chunk after the 1.5 MiB one (which ends on an empty buffer) is put as it
        // came: no copy into the buffer, no put merged with its neighbours.
        let at = (100 + 300 + 1536) as u64 * KIB as u64;
        assert!(
            recorded
                .puts
                .iter()
                .any(|(put_at, bytes)| *put_at == at && bytes.len() == 256 * KIB),
            "{:?}",
            recorded
                .puts
                .iter()
                .map(|(at, b)| (at, b.len()))
                .collect::<Vec<_>>()
        );
        let reported: Vec<u64> = checkpoints.try_iter().collect();
        assert_eq!(
            reported.last(),
            Some(&size),
            "the end is reported once the hash matched"
        );
    }
}
