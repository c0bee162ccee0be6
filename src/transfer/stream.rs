//! The image as a byte stream between the two roles of the least-privilege split.
//!
//! The daemon fetches and decompresses ([`send_image`]): the network and the zstd decoder, the
//! code that parses outside bytes, run without any privilege. It writes the raw image bytes into
//! a socket whose other end the privileged installer received over its control socket. The
//! installer ([`SlotStream`]) hashes every byte it writes, syncs at checkpoints, refuses a
//! stream that goes past the image, and reads the slot back past the page cache: it trusts
//! nothing of what the daemon says about the bytes, only the signed release.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sha2::{Digest, Sha256};

use super::error::TransferError;
use super::readback::{Check, Origin, Readback};
use super::source::Source;
use super::writer::{self, Msg, SinkConfig};
use super::{Plan, QUEUE_CHUNKS, Reporter, ServerAccess, TransferEvent, Written, call, join_error};
use crate::release::manifest::Image;

/// Bytes read from the stream at a time.
const STREAM_CHUNK: usize = 256 * 1024;

/// How the daemon reaches the image's server ([`super::WriteRequest::fetch_settings`]).
#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub server: ServerAccess,
    /// Delta updates under the split: where the daemon keeps the index and its spool (`None`:
    /// the whole image is sent).
    pub delta_work_dir: Option<PathBuf>,
    /// A delta that is not possible sends the whole image instead of failing.
    pub full_download_fallback: bool,
}

/// The daemon's side: sends the block index it checked (or its absence) for the installer's
/// read-back, then fetches `image` from `start` (the offset the installer resumes at; 0 for a
/// compressed image), decompresses it, and writes the image bytes `[start, size)` into `out`,
/// counting the bytes it downloads (compressed, as they came) in `progress`. Returns when all
/// were sent; closing `out` then tells the installer the stream ended.
pub async fn send_image(
    image: &Image,
    start: u64,
    settings: &FetchSettings,
    index: Option<super::CheckedIndex>,
    out: File,
    progress: &super::DownloadCount,
) -> Result<(), TransferError> {
    let plan = Plan::new(image)?;
    let out = super::CheckedIndex::send(index, out).await?;
    // `UPDATE_AGENT_CRASH_AT=index:sent`: a power cut of the daemon between the index and the
    // image's first byte.
    #[cfg(feature = "test-hooks")]
    crate::crash_point::at("index:sent");
    let size = image.size;
    let start = if plan.zstd.is_some() || start > size {
        0
    } else {
        start
    };
    if start == size {
        return Ok(());
    }
    let mut source = Source::open(
        &plan.url,
        start,
        plan.transport_size,
        &settings.server.http(),
    )
    .await?;
    // A server that ignored the range sends the whole image: the installer still expects it
    // from `start`.
    let mut skip = start - source.start();
    progress.expected.store(
        plan.transport_size - source.start(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut downloaded = 0;

    let super::RunningSink {
        queue,
        result: sink,
        ..
    } = super::start_sink(
        writer::InstallerStream(out),
        SinkConfig {
            path: PathBuf::from("the installer's stream"),
            shown: plan.shown.clone(),
            size,
            start,
            hasher: Sha256::new(),
            // The installer hashes what it is sent; the daemon's sink never does.
            expected: None,
            checkpoint_interval: 0,
            report_checkpoints: false,
            zstd: plan.zstd,
            readback: None,
        },
    );
    let mut rate = super::RateLimit::new(settings.server.max_rate);
    let failure = super::pump(&mut source, &queue, &mut rate, |chunk| {
        downloaded += chunk.len() as u64;
        progress
            .downloaded
            .store(downloaded, std::sync::atomic::Ordering::Relaxed);
        let cut = skip.min(chunk.len() as u64);
        skip -= cut;
        let _ = chunk.split_to(cut as usize);
        Ok(())
    })
    .await
    .err();
    drop(queue);
    drop(source);
    let outcome = sink.await.map_err(join_error)?;
    writer::ended(failure, outcome, &plan.shown, "the transfer")
}

/// What the installer writes where: the image as its own verified manifest describes it.
#[derive(Debug, Clone)]
pub struct SlotStreamRequest {
    pub slot_path: PathBuf,
    pub slot_capacity: u64,
    pub size: u64,
    pub sha256: [u8; 32],
    /// The daemon's checkpoint; the installer re-hashes the slot up to it itself.
    pub resume_from: u64,
    pub checkpoint_interval: u64,
    /// Longest wait for the next byte of the stream.
    pub stall_timeout: Duration,
    /// Read each region back as soon as it is synced (`[install] readback_overlap`).
    pub readback_overlap: bool,
    /// The image as the installer's own verified release describes it: its `chunks` name the
    /// block index the daemon may send ahead of the image's bytes.
    pub image: Image,
    /// Where the installer expands that index (root's).
    pub work_dir: PathBuf,
}

/// The installer's side: a slot opened for one image, with the hash of the prefix it resumes
/// after already rebuilt from the slot's own bytes.
pub struct SlotStream {
    request: SlotStreamRequest,
    file: File,
    start: u64,
    hasher: Sha256,
}

impl SlotStream {
    /// Opens the slot (refusing an image that does not fit) and re-hashes `[0, resume_from)`.
    /// Blocking.
    pub fn open(request: SlotStreamRequest) -> Result<SlotStream, TransferError> {
        let file = writer::open_slot(&request.slot_path, request.slot_capacity, request.size)?;
        let mut start = request.resume_from.min(request.size);
        let mut hasher = Sha256::new();
        if start > 0 {
            match writer::rehash(&file, &request.slot_path, start)? {
                Some(state) => hasher = state,
                None => start = 0,
            }
        }
        Ok(SlotStream {
            request,
            file,
            start,
            hasher,
        })
    }

    /// Where the stream must start: the slot's bytes before it are kept.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Writes the stream's bytes from [`SlotStream::start`] on, then reads the slot back.
    /// Blocking. `stream` must be a stream socket (the installer checks the descriptor it was
    /// passed); each wait for it is bounded by the stall timeout. A stream that ends early leaves a checkpoint for what arrived and fails with
    /// a transient `download-failed`.
    pub fn run(
        self,
        stream: File,
        events: &mut dyn FnMut(TransferEvent) -> io::Result<()>,
    ) -> Result<Written, TransferError> {
        let SlotStream {
            request,
            file,
            start,
            hasher,
        } = self;
        let shown = "the daemon's stream".to_string();
        // The stream opens with the block index (or its absence); with one, each region read
        // back is checked block by block on the pool, the one hash pass over the image;
        // without, the stream is hashed against the image's SHA-256 and the regions read back
        // in order against it too.
        let (check, in_stream) = match receive_block_index(&request, &stream, &shown)? {
            Some(index) => (Check::Blocks(Arc::new(index), Origin::AsReceived), None),
            None => (Check::Whole(request.sha256), Some(request.sha256)),
        };
        // The read-back runs beside the stream, each region once it is durable (with the
        // overlap), else after the last byte.
        let readback = Readback::start(
            &request.slot_path,
            request.size,
            check,
            start,
            request.readback_overlap,
        )?;
        let (queue, queue_rx) = tokio::sync::mpsc::channel(QUEUE_CHUNKS);
        let (checkpoint_tx, checkpoints) = std::sync::mpsc::channel();
        let written = Arc::new(AtomicU64::new(start));
        let sink = {
            let config = SinkConfig {
                path: request.slot_path.clone(),
                shown: shown.clone(),
                size: request.size,
                start,
                hasher,
                expected: in_stream,
                checkpoint_interval: request.checkpoint_interval,
                report_checkpoints: true,
                zstd: None,
                readback: Some(readback.feed()),
            };
            let written = written.clone();
            std::thread::Builder::new()
                .name("slot-writer".into())
                .spawn(move || {
                    writer::run_sink(
                        writer::SlotFile(file),
                        config,
                        queue_rx,
                        written,
                        checkpoint_tx,
                    )
                })
                .map_err(|e| TransferError::slot_io(&request.slot_path, "start writing", e))?
        };
        let mut reporter = Reporter::new(events, checkpoints, written, request.size);
        let expected = request.size - start;
        let mut received = 0u64;
        let failure = (|| {
            reporter.update(true)?;
            loop {
                wait_readable(&stream, request.stall_timeout, &shown, start + received)?;
                let mut buf = BytesMut::zeroed(STREAM_CHUNK);
                // Never a blocking read after `poll`: a stream socket whose sender set
                // `SO_RCVLOWAT` high is readable for `poll` and would block a plain read until
                // that many bytes came. With MSG_DONTWAIT the read takes what is there.
                let n = match nix::sys::socket::recv(
                    stream.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
                    Err(e) => {
                        return Err(TransferError::Download {
                            url: shown.clone(),
                            detail: format!("cannot read: {e}"),
                        });
                    }
                };
                if n == 0 {
                    if received < expected {
                        return Err(TransferError::Download {
                            url: shown.clone(),
                            detail: format!(
                                "the stream ended after {} of {} bytes",
                                start + received,
                                request.size
                            ),
                        });
                    }
                    let _ = queue.blocking_send(Msg::End);
                    return Ok(());
                }
                buf.truncate(n);
                received += n as u64;
                // Bytes past the image are refused by the sink before any is written.
                if queue.blocking_send(Msg::Data(buf.freeze())).is_err() {
                    return Ok(());
                }
                reporter.update(false)?;
            }
        })()
        .err();
        drop(queue);
        let outcome = match sink.join() {
            Ok(outcome) => outcome,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        // Checkpoints are durable whatever went wrong with the stream.
        let reported = reporter.update(true);
        writer::ended(failure, outcome, &shown, "the stream")?;
        reported?;
        call(reporter.events, TransferEvent::Verifying)?;
        readback.finish()?;
        Ok(Written {
            bytes: request.size,
            sha256: request.sha256,
        })
    }
}

/// The block index the daemon sends ahead of the image (`transfer::CheckedIndex::send`),
/// checked against the installer's own verified release; `None` when the daemon sent none. An
/// index for a release that names none is refused.
fn receive_block_index(
    request: &SlotStreamRequest,
    stream: &File,
    shown: &str,
) -> Result<Option<crate::release::block_index::IndexFile>, TransferError> {
    let mut reader = super::delta::StreamReader {
        stream,
        stall: request.stall_timeout,
        shown,
    };
    match &request.image.chunks {
        Some(chunks) => Ok(super::delta::receive_index(
            &mut reader,
            &request.image,
            chunks,
            &request.work_dir,
        )?
        .map(|(index, _)| index)),
        None => {
            let mut len = [0u8; 8];
            reader.read_exact(&mut len)?;
            match u64::from_le_bytes(len) {
                0 => Ok(None),
                // As for an over-long index: a refusal, since a retry would get the same.
                len => Err(TransferError::BlockIndex {
                    url: shown.to_string(),
                    refusal: crate::release::Refusal::new(
                        crate::reason::ReasonCode::HashMismatch,
                        format!(
                            "the daemon sent a block index of {len} bytes, but the signed release names none"
                        ),
                    ),
                }),
            }
        }
    }
}

pub(super) fn wait_readable(
    stream: &File,
    timeout: Duration,
    shown: &str,
    received: u64,
) -> Result<(), TransferError> {
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let deadline = Instant::now() + timeout;
    loop {
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransferError::Stall {
                url: shown.to_string(),
                after: timeout,
                received,
            });
        }
        let wait = PollTimeout::from(u16::try_from(left.as_millis()).unwrap_or(millis));
        match poll(&mut fds, wait) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(TransferError::Download {
                    url: shown.to_string(),
                    detail: format!("cannot wait for the stream: {e}"),
                });
            }
        }
    }
}
