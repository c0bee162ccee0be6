//! Transfer: fetch an image and stream it into a slot, safely and resumably.
//!
//! The adapter job behind "write slot": [`install_image`] reads the image from its URL
//! (`https://`, `http://`, `file://`), decompresses it when the release says zstd, hashes it,
//! writes it into the slot with fixed buffers, syncs it at checkpoints, and reads the slot
//! region back past the page cache while the download goes on, each region as soon as it is
//! synced, checking it against the release's block index (on every core) or, without one, the
//! image's hash. Nothing is ever buffered whole: memory stays flat whatever the image size.
//!
//! Inside (all private; the API is what this module re-exports):
//! - `source`: where bytes come from (http(s) or local files), held to the declared size.
//! - `http`: the HTTP/1.1 client (hyper, rustls+ring): redirects, ranges, kept connections.
//! - `writer`: the slot side — size checks, resume re-hash, decompress/hash/write/sync.
//! - `readback`: [`verify_slot`], also for the engine to re-check a slot after a restart.
//! - `stream`: the same path cut in two for the least-privilege split: [`send_image`] (the
//!   daemon: fetch, decompress, send) and [`SlotStream`] (the installer: hash, write, sync,
//!   read back).
//! - `error`: [`TransferError`], one variant per reason code.
//!
//! # What it guarantees
//!
//! - The image must fit the slot ([`WriteRequest::slot_capacity`], and a block device's own
//!   size) before the slot is opened for writing; a slot path that does not exist is never
//!   created; a block device is opened `O_EXCL`, so a mounted one (the booted slot) is refused.
//! - Only `[0, size)` of the slot is written: a body or a decompressed stream that goes on is
//!   refused before the first byte too many is written (also when the server sent no length).
//! - Memory is bounded by fixed buffers and queue depths (about 10–14 MiB RSS for a whole
//!   agent process in the benchmark, for a 128 MiB or a 1 GiB image alike).
//! - Success means: the bytes' SHA-256 matched while writing (and the transport SHA-256 for
//!   compressed images), all was `fdatasync`ed, and every byte of the region read back from the
//!   medium with `O_DIRECT` matched a signed hash again (its block's in the block index, or the
//!   image's).
//!
//! # Resuming
//!
//! Each `Checkpoint { durable }` event comes after an `fdatasync` covering `[0, durable)`; the
//! caller persists it and passes it back as [`WriteRequest::resume_from`]. The agent then
//! re-hashes the slot's first `durable` bytes to rebuild the SHA-256 state and asks the server
//! for the rest with `Range: bytes=durable-`. A server that answers `200` instead of `206`
//! sends the whole image, which is then written from 0.
//!
//! Compressed images always restart from 0: a zstd decoder's state at an output offset (its
//! window of up to 8 MiB of earlier output and its position inside a frame) cannot be rebuilt
//! from the slot bytes alone, and the matching offset in the compressed stream is unknown. So no
//! checkpoints are reported for them (the slot is still synced at each interval, which keeps the
//! amount of unwritten data in RAM bounded).
//!
//! After a `hash-mismatch`, `size-mismatch` or `readback-mismatch` the caller must drop its
//! checkpoint: resuming would re-hash the same wrong bytes and fail the same way.

mod delta;
mod error;
mod http;
mod readback;
mod source;
mod stream;
mod writer;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use url::Url;

use crate::release::block_index::IndexFile;
use crate::release::manifest::{Compression, Image};

pub use delta::{
    BootedSlot, CheckedIndex, DeltaOffer, DeltaSettings, DeltaStats, DeltaStreamRequest,
    DownloadCount, booted_table_key, fetch_checked_index, offer_delta, receive_delta, serve_delta,
};
pub use error::TransferError;
pub use http::MAX_REDIRECTS;
pub use readback::verify_slot;
pub use stream::{FetchSettings, SlotStream, SlotStreamRequest, send_image};
pub use writer::ZSTD_WINDOW_LOG_MAX;

use error::esc;
use readback::{Check, Origin, Readback};
use source::{HttpOptions, Source};
use writer::{Msg, SinkConfig};

/// Default bytes between two `fdatasync` checkpoints.
pub const DEFAULT_CHECKPOINT_INTERVAL: u64 = 64 * 1024 * 1024;
/// Default time without a byte before a download is given up.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to establish a TCP (and TLS) connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two progress events.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Chunks queued between the network and the slot writer: enough to keep both busy, few enough
/// that memory stays small (hyper hands out chunks of at most a few hundred KiB; a file source
/// 256 KiB ones). 4: with 8 here and 8 in the hashing thread's queue, up to 4 MiB of chunks
/// were alive at once and a 2 GiB install peaked at 17.5 MiB RSS (measured).
const QUEUE_CHUNKS: usize = 4;

/// What to install where.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    /// The image, as the verified manifest describes it.
    pub image: Image,
    /// The inactive slot: a block device, or a regular file that already exists.
    pub slot_path: PathBuf,
    /// The slot's size as configured. For a block device the device's own size also bounds it;
    /// a regular file may grow up to it.
    pub slot_capacity: u64,
    /// A checkpoint from an earlier attempt at the same image (0: from the start). Ignored for
    /// compressed images, and treated as 0 when past the image or the slot's content.
    pub resume_from: u64,
    /// Bytes between checkpoints (an `fdatasync` each); 0 for none but the last.
    pub checkpoint_interval: u64,
    pub server: ServerAccess,
    /// Delta updates: when set and the image has a block index, reuse local blocks and fetch
    /// only the others.
    pub delta: Option<DeltaSettings>,
    /// Read each region back as soon as it is synced, while the rest arrives (`[install]
    /// readback_overlap`); else after the last byte.
    pub readback_overlap: bool,
}

impl WriteRequest {
    /// A request with the default intervals and timeouts, starting from 0.
    pub fn new(image: Image, slot_path: impl Into<PathBuf>, slot_capacity: u64) -> WriteRequest {
        WriteRequest {
            image,
            slot_path: slot_path.into(),
            slot_capacity,
            resume_from: 0,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            server: ServerAccess::default(),
            delta: None,
            readback_overlap: false,
        }
    }

    /// What the daemon's side of the split needs of this request to fetch its image (the
    /// installer owns the slots, so their paths and the booted slot stay out).
    pub fn fetch_settings(&self) -> FetchSettings {
        FetchSettings {
            server: self.server.clone(),
            delta_work_dir: self.delta.as_ref().map(|delta| delta.work_dir.clone()),
            full_download_fallback: self
                .delta
                .as_ref()
                .is_some_and(|delta| delta.full_download_fallback),
        }
    }
}

/// How the image's server is reached: the same for an install in this process
/// ([`WriteRequest`]) and for the daemon's side of the split ([`FetchSettings`]).
#[derive(Debug, Clone)]
pub struct ServerAccess {
    /// Longest wait for the next byte (or the response headers).
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    /// CA certificates trusted besides the system's, e.g. a private update server's CA.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Bandwidth cap for downloads, bytes per second.
    pub max_rate: Option<u64>,
}

impl Default for ServerAccess {
    /// The default timeouts, the system's roots only, no bandwidth cap.
    fn default() -> ServerAccess {
        ServerAccess {
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            extra_roots: Vec::new(),
            max_rate: None,
        }
    }
}

impl ServerAccess {
    fn http(&self) -> HttpOptions<'_> {
        HttpOptions {
            connect_timeout: self.connect_timeout,
            stall_timeout: self.stall_timeout,
            extra_roots: &self.extra_roots,
        }
    }
}

/// What the caller hears during an install. Returning an error from the handler stops the
/// install with `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferEvent {
    /// Bytes of the image written to the slot so far; at most every [`PROGRESS_INTERVAL`], and
    /// once at the start and the end.
    Progress { written: u64, total: u64 },
    /// `[0, durable)` is on the storage (after `fdatasync`): persist it to resume from. Also
    /// sent, when possible, after a failed download for what did arrive.
    Checkpoint { durable: u64 },
    /// All bytes are written and their hash matched; what is left of the read-back (which ran
    /// beside the write) is awaited.
    Verifying,
    /// Bytes downloaded so far in this attempt and what it expects to download in all: a
    /// delta's block index and store ranges (as its plan expects), or a full download's bytes
    /// as they come over the network (compressed, for a zstd image). `Progress` still counts
    /// the image's bytes in place.
    Downloaded { downloaded: u64, expected: u64 },
}

/// An image installed and read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Fetches `req.image` and writes it into `req.slot_path`; see the module documentation.
///
/// The future is `Send`, so the engine can `tokio::spawn` it as the adapter job.
///
/// The slot is opened only after the image was found to fit, and only `[0, size)` of it is ever
/// written. On success every byte was read back from the medium and matched a signed hash: each
/// block its entry of the block index when the release has one, else the whole image's SHA-256,
/// which the stream was hashed against too.
pub async fn install_image(
    req: &WriteRequest,
    events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
) -> Result<Written, TransferError> {
    install_image_with_stats(req, events).await.map(|(w, _)| w)
}

/// [`install_image`], telling what a delta install did (`None`: the whole image was
/// downloaded).
pub async fn install_image_with_stats(
    req: &WriteRequest,
    events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
) -> Result<(Written, Option<DeltaStats>), TransferError> {
    // The block index a delta step expanded and checked without writing, for the read-back.
    let mut index = None;
    if let (Some(settings), Some(chunks)) = (&req.delta, &req.image.chunks) {
        match delta::install(req, settings, chunks, events).await {
            Ok((written, stats)) => return Ok((written, Some(stats))),
            Err(delta::DeltaFailure::Failed(e)) => return Err(e),
            Err(delta::DeltaFailure::Unavailable(e)) if settings.full_download_fallback => {
                tracing::warn!(
                    "no delta update ({e}); downloading the whole image, as [install] full_download_fallback allows"
                );
            }
            Err(delta::DeltaFailure::Unavailable(e)) => return Err(e),
            Err(delta::DeltaFailure::LocalImage(expanded)) => {
                tracing::info!(
                    "the image is a local file: written whole, without a delta plan; its block index checks the read-back"
                );
                index = Some(expanded);
            }
            Err(delta::DeltaFailure::NotWorthIt(summary, expanded)) => {
                tracing::info!(
                    "a delta would download {} bytes, no less than the whole image: downloading the whole image",
                    summary.download_bytes
                );
                index = Some(expanded);
            }
        }
    }
    install_full(req, index, events).await.map(|w| (w, None))
}

/// `index`: the release's block index as the delta step just expanded it; `None` looks for one
/// an earlier step left ([`readback_check`]).
async fn install_full(
    req: &WriteRequest,
    index: Option<Arc<IndexFile>>,
    events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
) -> Result<Written, TransferError> {
    let image = &req.image;
    let plan = Plan::new(image)?;
    let size = image.size;

    let path = req.slot_path.clone();
    let capacity = req.slot_capacity;
    let file = blocking(move || writer::open_slot(&path, capacity, size)).await?;

    // Resume: rebuild the hash of what the slot already holds.
    let mut start = match plan.zstd {
        Some(_) => 0,
        None if req.resume_from > size => 0,
        None => req.resume_from,
    };
    let mut hasher = Sha256::new();
    let file = if start > 0 {
        let path = req.slot_path.clone();
        let (file, rehashed) = blocking(move || {
            let rehashed = writer::rehash(&file, &path, start)?;
            Ok((file, rehashed))
        })
        .await?;
        match rehashed {
            Some(state) => hasher = state,
            None => start = 0,
        }
        file
    } else {
        file
    };
    let check = match index {
        Some(index) => Check::Blocks(index, Origin::AsReceived),
        None => {
            let (req, sha256) = (req.clone(), plan.sha256);
            blocking(move || Ok(readback_check(&req, sha256))).await?
        }
    };
    if start == size {
        // Everything was written before; only the read-back is left — unless the bytes are wrong,
        // then the only way on is a fresh download.
        if <[u8; 32]>::from(hasher.clone().finalize()) == plan.sha256 {
            call(
                events,
                TransferEvent::Progress {
                    written: size,
                    total: size,
                },
            )?;
            drop(file);
            let readback =
                Readback::start(&req.slot_path, size, check, size, req.readback_overlap)?;
            return finish_read_back(readback, &plan, size, events).await;
        }
        start = 0;
        hasher = Sha256::new();
    }

    let http = req.server.http();
    let mut source = Source::open(&plan.url, start, plan.transport_size, &http).await?;
    if source.start() != start {
        start = source.start();
        hasher = Sha256::new();
    }

    // With a block index the read-back is the image's one hash pass; without, the stream is
    // hashed too, so that bytes that came wrong are told from bytes the storage lost.
    let in_stream = match &check {
        Check::Blocks(..) => None,
        Check::Whole(_) => Some(plan.sha256),
    };
    // The read-back runs beside the download: each region is read back once it is durable.
    let readback = Readback::start(&req.slot_path, size, check, start, req.readback_overlap)?;
    let RunningSink {
        queue,
        checkpoints,
        written,
        result: sink,
    } = start_sink(
        writer::SlotFile(file),
        SinkConfig {
            path: req.slot_path.clone(),
            shown: plan.shown.clone(),
            size,
            start,
            hasher,
            expected: in_stream,
            checkpoint_interval: req.checkpoint_interval,
            report_checkpoints: plan.zstd.is_none(),
            zstd: plan.zstd,
            readback: Some(readback.feed()),
        },
    );

    let mut reporter = Reporter::new(events, checkpoints, written, size);
    let mut rate = RateLimit::new(req.server.max_rate);
    // Bytes as they came over the network (compressed, for a zstd image), for the progress
    // reports beside the bytes written.
    let mut download = DownloadTally::new(0, plan.transport_size - source.start());
    let failure: Option<TransferError> = async {
        reporter.progress(true)?;
        pump(&mut source, &queue, &mut rate, |chunk| {
            download.downloaded += chunk.len() as u64;
            download.tell_if_due(reporter.events)?;
            reporter.update(false)
        })
        .await
    }
    .await
    .err();
    drop(queue);
    drop(source);

    // A read-back failure waits for the sink: without an index, bytes the source got wrong fail
    // the image's hash there, which tells more than the read-back can (it only sees that the
    // slot differs).
    let outcome = sink.await.map_err(join_error)?;
    // Checkpoints the sink made are durable whatever went wrong on the network: hand them over so
    // the next attempt resumes from the furthest one. Not after a lasting failure (the server's
    // bytes disagree with the release): resuming could only repeat it.
    let reported = match &failure {
        None => reporter.checkpoints(),
        Some(failure) if failure.is_transient() => reporter.checkpoints(),
        Some(_) => Ok(()),
    };
    writer::ended(failure, outcome, &plan.shown, "the transfer")?;
    reported?;
    download.tell(reporter.events)?;
    reporter.progress(true)?;
    finish_read_back(readback, &plan, size, reporter.events).await
}

/// Whether the image is a local file (`file://`: a USB stick, a download another tool made). A
/// delta would save nothing for it: reading the file costs no more than reading the booted slot
/// to plan one, so the whole image is written; its block index still serves the read-back.
pub fn is_local(image: &Image) -> bool {
    Url::parse(&image.url).is_ok_and(|url| url.scheme() == "file")
}

/// How the read-back checks the slot: against the release's block index when an earlier step
/// (a delta attempt) left it expanded in the work directory, else against the image's SHA-256.
/// Blocking.
fn readback_check(req: &WriteRequest, sha256: [u8; 32]) -> Check {
    if let (Some(settings), Some(chunks)) = (&req.delta, &req.image.chunks)
        && let Some(index) = delta::expanded_index(&settings.work_dir, &req.image, chunks)
    {
        return Check::Blocks(Arc::new(index), Origin::AsReceived);
    }
    Check::Whole(sha256)
}

/// The end of an install: every byte written and durable, the image's SHA-256 matched (in the
/// stream, or by the read-back itself); waits for the rest of the read-back.
async fn finish_read_back(
    readback: Readback,
    plan: &Plan,
    size: u64,
    events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
) -> Result<Written, TransferError> {
    call(events, TransferEvent::Verifying)?;
    blocking(move || readback.finish()).await?;
    Ok(Written {
        bytes: size,
        sha256: plan.sha256,
    })
}

/// What `install_image` needs from the image, checked once.
struct Plan {
    url: Url,
    shown: String,
    sha256: [u8; 32],
    /// Bytes on the wire: `size`, or `transport_size` when compressed.
    transport_size: u64,
    /// The transport SHA-256, when the image is zstd-compressed.
    zstd: Option<[u8; 32]>,
}

impl Plan {
    /// The manifest was validated when parsed; this re-checks what a hand-built `Image` could
    /// get wrong, without panicking.
    fn new(image: &Image) -> Result<Plan, TransferError> {
        let shown = esc(&image.url);
        let bad = |detail: String| TransferError::BadImage {
            url: shown.clone(),
            detail,
        };
        let url = Url::parse(&image.url).map_err(|e| TransferError::UnsupportedUrl {
            url: shown.clone(),
            detail: format!("not a url: {e}"),
        })?;
        if image.size == 0 {
            return Err(bad("size is 0".into()));
        }
        let sha256 = decode_sha256(&image.sha256)
            .ok_or_else(|| bad("sha256 is not 64 hex digits".into()))?;
        let (transport_size, zstd) = match (
            image.compression,
            image.transport_size,
            &image.transport_sha256,
        ) {
            (None, None, None) => (image.size, None),
            (Some(Compression::Zstd), Some(size), Some(hash)) if size > 0 => {
                let hash = decode_sha256(hash)
                    .ok_or_else(|| bad("transport_sha256 is not 64 hex digits".into()))?;
                (size, Some(hash))
            }
            _ => {
                return Err(bad(
                    "compression, a non-zero transport_size and transport_sha256 go together"
                        .into(),
                ));
            }
        };
        Ok(Plan {
            url,
            shown,
            sha256,
            transport_size,
            zstd,
        })
    }
}

fn decode_sha256(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

/// A sink running on a blocking thread.
struct RunningSink {
    /// What feeds it.
    queue: tokio::sync::mpsc::Sender<Msg>,
    /// The offsets it made durable, each after its `fdatasync`.
    checkpoints: std::sync::mpsc::Receiver<u64>,
    /// The bytes it has written so far.
    written: Arc<AtomicU64>,
    result: tokio::task::JoinHandle<Result<writer::SinkOutcome, TransferError>>,
}

/// Starts `config`'s sink into `destination` on a blocking thread.
fn start_sink<D: writer::Destination + 'static>(destination: D, config: SinkConfig) -> RunningSink {
    let (queue, queue_rx) = tokio::sync::mpsc::channel(QUEUE_CHUNKS);
    let (checkpoint_tx, checkpoints) = std::sync::mpsc::channel();
    let written = Arc::new(AtomicU64::new(config.start));
    let result = {
        let written = written.clone();
        tokio::task::spawn_blocking(move || {
            writer::run_sink(destination, config, queue_rx, written, checkpoint_tx)
        })
    };
    RunningSink {
        queue,
        checkpoints,
        written,
        result,
    }
}

/// Moves the source's chunks into the sink's queue, no faster than `rate`, until the source
/// ends (the sink is then told) or the sink stops taking them (its own result says why).
/// `each` sees every chunk before it is queued: it counts it, may cut bytes off its front
/// (nothing is queued when none are left), or fails the transfer.
async fn pump(
    source: &mut Source,
    queue: &tokio::sync::mpsc::Sender<Msg>,
    rate: &mut RateLimit,
    mut each: impl FnMut(&mut bytes::Bytes) -> Result<(), TransferError>,
) -> Result<(), TransferError> {
    loop {
        let Some(mut chunk) = source.next_chunk().await? else {
            // The sink may have failed meanwhile; its own error then tells why.
            let _ = queue.send(Msg::End).await;
            return Ok(());
        };
        each(&mut chunk)?;
        if chunk.is_empty() {
            continue;
        }
        let len = chunk.len() as u64;
        if queue.send(Msg::Data(chunk)).await.is_err() {
            return Ok(());
        }
        rate.take(len).await;
    }
}

/// A bandwidth cap: after each chunk, waits until the bytes so far fit the rate.
pub(crate) struct RateLimit {
    rate: Option<u64>,
    started: Instant,
    bytes: u64,
}

impl RateLimit {
    pub(crate) fn new(rate: Option<u64>) -> RateLimit {
        RateLimit {
            rate: rate.filter(|&r| r > 0),
            started: Instant::now(),
            bytes: 0,
        }
    }

    pub(crate) async fn take(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Passes sink news on to the caller's handler, at the pace the caller was promised.
/// Hands the sink's checkpoints and the progress to the caller's event callback, progress at
/// most every [`PROGRESS_INTERVAL`] unless asked for now.
struct Reporter<'a, E: ?Sized> {
    events: &'a mut E,
    checkpoints: std::sync::mpsc::Receiver<u64>,
    written: Arc<AtomicU64>,
    total: u64,
    last_progress: Instant,
}

impl<'a, E: ?Sized + FnMut(TransferEvent) -> io::Result<()>> Reporter<'a, E> {
    /// Reports the sink's checkpoints and its progress out of `total` bytes to `events`.
    fn new(
        events: &'a mut E,
        checkpoints: std::sync::mpsc::Receiver<u64>,
        written: Arc<AtomicU64>,
        total: u64,
    ) -> Reporter<'a, E> {
        Reporter {
            events,
            checkpoints,
            written,
            total,
            last_progress: Instant::now(),
        }
    }

    fn checkpoints(&mut self) -> Result<(), TransferError> {
        while let Ok(durable) = self.checkpoints.try_recv() {
            call(self.events, TransferEvent::Checkpoint { durable })?;
        }
        Ok(())
    }

    fn progress(&mut self, now: bool) -> Result<(), TransferError> {
        if now || self.last_progress.elapsed() >= PROGRESS_INTERVAL {
            self.last_progress = Instant::now();
            let written = self.written.load(Ordering::Relaxed);
            call(
                self.events,
                TransferEvent::Progress {
                    written,
                    total: self.total,
                },
            )?;
        }
        Ok(())
    }

    /// The checkpoints made so far, then the progress.
    fn update(&mut self, now: bool) -> Result<(), TransferError> {
        self.checkpoints()?;
        self.progress(now)
    }
}

/// The bytes one download attempt has brought and what it expects in all, told to `events` as
/// `Downloaded` whenever the caller must (`tell`) and, while bytes flow, at most every
/// `PROGRESS_INTERVAL` (`tell_if_due`).
struct DownloadTally {
    downloaded: u64,
    expected: u64,
    last_told: Instant,
}

impl DownloadTally {
    fn new(downloaded: u64, expected: u64) -> Self {
        DownloadTally {
            downloaded,
            expected,
            last_told: Instant::now(),
        }
    }

    fn tell<E: ?Sized + FnMut(TransferEvent) -> io::Result<()>>(
        &mut self,
        events: &mut E,
    ) -> Result<(), TransferError> {
        self.last_told = Instant::now();
        call(
            events,
            TransferEvent::Downloaded {
                downloaded: self.downloaded,
                expected: self.expected,
            },
        )
    }

    fn tell_if_due<E: ?Sized + FnMut(TransferEvent) -> io::Result<()>>(
        &mut self,
        events: &mut E,
    ) -> Result<(), TransferError> {
        if self.last_told.elapsed() >= PROGRESS_INTERVAL {
            self.tell(events)
        } else {
            Ok(())
        }
    }
}

fn call<E: ?Sized + FnMut(TransferEvent) -> io::Result<()>>(
    events: &mut E,
    event: TransferEvent,
) -> Result<(), TransferError> {
    events(event).map_err(|source| TransferError::Cancelled { source })
}

/// Runs blocking slot IO off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, TransferError> + Send + 'static,
) -> Result<T, TransferError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(join_error)?
}

fn join_error(e: tokio::task::JoinError) -> TransferError {
    match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(e) => TransferError::Cancelled {
            source: io::Error::other(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn install_future_can_be_spawned() {
        let image = Image::uncompressed("file:///nonexistent", 1, [0; 32]);
        let req = WriteRequest::new(image, "/nonexistent", 1);
        let mut events = |_| Ok(());
        let future = install_image(&req, &mut events);
        assert_send(&future);
    }
}
