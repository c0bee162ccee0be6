//! The delta across the least-privilege split: the installer (root) reads the slots and makes
//! the plan, the daemon fetches. Over the image stream socket (both ways): the daemon sends the
//! served index (`u64` LE length, the bytes); the installer answers with the ranges to fetch
//! (`u32` LE count of requests, each a `u32` count of ranges and per range `u64` offset and
//! `u64` length); the daemon sends the ranges' bytes back to back, in that order. The installer
//! checks the index against its own verified manifest and every block against the index, as
//! without the split.

use std::fs::File;
use std::io::{self, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::index::{CheckedIndex, chunks_of, index_cap};
use super::slot::{
    SinkNote, SinkParams, SpoolFrames, assemble_into_slot, frame_offsets, make_plan,
};
use super::store::{RangeSupport, Store};
use super::{BootedSlot, DeltaFailure, DeltaStats, MULTI_RANGES, prepare_work_dir};
use crate::delta::plan::{self as planner, Request};
use crate::release::block_index::{self, IndexError, IndexFile};
use crate::transfer::error::{TransferError, esc};
use crate::transfer::readback::{Check, Origin, Readback};
use crate::transfer::{RateLimit, TransferEvent, Written, call};

/// What the installer writes where, from its own verified release.
#[derive(Debug, Clone)]
pub struct DeltaStreamRequest {
    pub image: crate::release::manifest::Image,
    pub slot_path: PathBuf,
    pub slot_capacity: u64,
    pub checkpoint_interval: u64,
    pub stall_timeout: Duration,
    /// The installer's own work directory (root's).
    pub work_dir: PathBuf,
    pub booted: Option<BootedSlot>,
    /// What the daemon found the server to answer: 1, or more for multi-range requests.
    pub ranges_per_request: usize,
    /// Read each region back as soon as it is synced (`[install] readback_overlap`).
    pub readback_overlap: bool,
}

/// Most ranges a request may hold on the wire.
pub const MAX_RANGES_PER_REQUEST: usize = 64;

/// The installer's side: reads the index from `stream`, plans against the local slots, asks
/// for the ranges, writes the verified blocks, reads the slot back. Blocking.
pub fn receive_delta(
    req: &DeltaStreamRequest,
    stream: &File,
    events: &mut dyn FnMut(TransferEvent) -> io::Result<()>,
) -> Result<(Written, DeltaStats), TransferError> {
    let image = &req.image;
    let chunks = chunks_of(image)?;
    let sha256 =
        crate::transfer::decode_sha256(&image.sha256).ok_or_else(|| TransferError::BadImage {
            url: esc(&image.url),
            detail: "sha256 is not 64 hex digits".into(),
        })?;
    let shown = "the daemon's stream".to_string();
    let wire = |detail: String| TransferError::Download {
        url: shown.clone(),
        detail,
    };
    let mut stats = DeltaStats::default();
    let mut reader = StreamReader {
        stream,
        stall: req.stall_timeout,
        shown: &shown,
    };

    let Some((index, len)) = receive_index(&mut reader, image, chunks, &req.work_dir)? else {
        return Err(wire("a delta without its block index".into()));
    };
    let index = Arc::new(index);
    stats.index_bytes = len;
    let mut buf = vec![0u8; 64 * 1024];

    // The plan, against the slots this process may read.
    let per_request = req.ranges_per_request.clamp(1, MAX_RANGES_PER_REQUEST);
    let planned = match make_plan(
        &index,
        &req.slot_path,
        req.slot_capacity,
        req.booted.clone(),
        &req.work_dir,
        image.size,
        per_request,
    ) {
        Ok(planned) => planned,
        Err(DeltaFailure::Failed(e) | DeltaFailure::Unavailable(e)) => return Err(e),
        Err(DeltaFailure::NotWorthIt(..) | DeltaFailure::LocalImage(_)) => {
            unreachable!("make_plan neither weighs the plan nor looks at the image's url")
        }
    };
    stats.summary = *planned.plan.summary();
    let requests: Vec<Request> = planned
        .plan
        .requests()
        .collect::<io::Result<_>>()
        .map_err(|e| TransferError::slot_io(&req.work_dir, "read the plan", e))?;
    let mut list = Vec::new();
    list.extend_from_slice(&(requests.len() as u32).to_le_bytes());
    for request in &requests {
        list.extend_from_slice(&(request.ranges.len() as u32).to_le_bytes());
        for range in &request.ranges {
            list.extend_from_slice(&range.offset.to_le_bytes());
            list.extend_from_slice(&range.len.to_le_bytes());
        }
    }
    crate::socket::send_all(stream, &list)
        .map_err(|e| wire(format!("cannot send the ranges: {e}")))?;

    // The ranges' bytes, into the spool.
    let spool = tempfile::tempfile_in(&req.work_dir)
        .map_err(|e| TransferError::slot_io(&req.work_dir, "make a spool file", e))?;
    let mut fetched = vec![false; index.header().frame_count as usize];
    for request in &requests {
        stats.requests += 1;
        for range in &request.ranges {
            let mut left = range.len;
            let mut at = range.offset;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                reader.read_exact(&mut buf[..n])?;
                spool
                    .write_all_at(&buf[..n], at)
                    .map_err(|e| TransferError::slot_io(&req.work_dir, "write the spool", e))?;
                at += n as u64;
                left -= n as u64;
            }
            stats.downloaded += range.len;
            for frame in range.frames.clone() {
                fetched[frame as usize] = true;
            }
        }
    }

    // The assembly, here.
    let offsets = frame_offsets(&index)
        .map_err(|e| TransferError::slot_io(&req.slot_path, "read the block index", e))?;
    let mut frames = SpoolFrames {
        spool,
        offsets,
        fetched,
        store: None,
        extra: Arc::new(AtomicU64::new(0)),
        extra_requests: Arc::new(AtomicU64::new(0)),
    };
    let mut last_progress = Instant::now();
    let mut failed: Option<io::Error> = None;
    // The read-back beside the assembly, each region once synced, block by block against the
    // index on the pool.
    let readback = Readback::start(
        &req.slot_path,
        image.size,
        Check::Blocks(index.clone(), Origin::EachBlockChecked),
        0,
        req.readback_overlap,
    )?;
    let feed = readback.feed();
    let mut notify = |note: SinkNote| {
        if let SinkNote::Checkpoint(durable) = note {
            feed.durable(durable);
        }
        let event = match note {
            SinkNote::Written(done) => {
                if last_progress.elapsed() < crate::transfer::PROGRESS_INTERVAL {
                    return;
                }
                last_progress = Instant::now();
                TransferEvent::Progress {
                    written: done,
                    total: image.size,
                }
            }
            SinkNote::Checkpoint(durable) => TransferEvent::Checkpoint { durable },
        };
        if failed.is_none()
            && let Err(e) = events(event)
        {
            failed = Some(e);
        }
    };
    let assembled = assemble_into_slot(
        &index,
        &planned,
        &mut frames,
        SinkParams {
            path: &req.slot_path,
            size: image.size,
            checkpoint_interval: req.checkpoint_interval,
        },
        &mut notify,
    );
    if let Some(source) = failed {
        return Err(TransferError::Cancelled { source });
    }
    stats.assembly = assembled?;
    call(
        events,
        TransferEvent::Progress {
            written: image.size,
            total: image.size,
        },
    )?;
    call(events, TransferEvent::Verifying)?;
    readback.finish()?;
    Ok((
        Written {
            bytes: image.size,
            sha256,
        },
        stats,
    ))
}

/// Reads a block index from the daemon's stream (its length, 8 bytes little-endian, then its
/// bytes; a length of 0: no index), bounded by what one for `image` can be, and expands it
/// into `work_dir` after its SHA-256 matched the one the installer's own verified manifest
/// names (`block_index::expand`). Returns it and its length on the wire.
pub(in crate::transfer) fn receive_index(
    reader: &mut StreamReader<'_>,
    image: &crate::release::manifest::Image,
    chunks: &crate::release::manifest::ChunkIndexRef,
    work_dir: &Path,
) -> Result<Option<(IndexFile, u64)>, TransferError> {
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len == 0 {
        return Ok(None);
    }
    let cap = index_cap(image.size, chunks.chunk_size);
    if len > cap {
        // Only a daemon that is not ours sends this: no signed hash can vouch for the bytes, and
        // a retry would get the same, so it is a refusal, not a transient download failure.
        return Err(TransferError::BlockIndex {
            url: esc(&chunks.url),
            refusal: crate::release::Refusal::new(
                crate::reason::ReasonCode::HashMismatch,
                format!(
                    "the daemon sent {len} bytes as the block index, more than one for this image can be ({cap}), so they are not the index the signed release names"
                ),
            ),
        });
    }
    prepare_work_dir(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "create the work directory", e))?;
    let mut download = tempfile::tempfile_in(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "make a file for the index", e))?;
    let mut left = len;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = (left as usize).min(buf.len());
        reader.read_exact(&mut buf[..n])?;
        io::Write::write_all(&mut download, &buf[..n])
            .map_err(|e| TransferError::slot_io(work_dir, "write the index", e))?;
        left -= n as u64;
    }
    io::Seek::rewind(&mut download)
        .map_err(|e| TransferError::slot_io(work_dir, "read the index", e))?;
    let dest = work_dir.join(format!("{}.index", chunks.sha256.to_ascii_lowercase()));
    match block_index::expand(BufReader::new(download), image, chunks, &dest) {
        Ok(index) => Ok(Some((index, len))),
        Err(IndexError::Refused(refusal)) => Err(TransferError::BlockIndex {
            url: esc(&chunks.url),
            refusal,
        }),
        Err(IndexError::Io { context, source }) => Err(TransferError::slot_io(
            work_dir,
            "expand the block index",
            io::Error::other(format!("{context}: {source}")),
        )),
    }
}

/// Reads the stream socket: each wait bounded by the stall timeout, never a blocking read.
pub(in crate::transfer) struct StreamReader<'a> {
    pub(in crate::transfer) stream: &'a File,
    pub(in crate::transfer) stall: Duration,
    pub(in crate::transfer) shown: &'a str,
}

impl StreamReader<'_> {
    pub(in crate::transfer) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        use std::os::fd::AsRawFd;
        let mut filled = 0;
        while filled < buf.len() {
            crate::transfer::stream::wait_readable(
                self.stream,
                self.stall,
                self.shown,
                filled as u64,
            )?;
            match nix::sys::socket::recv(
                self.stream.as_raw_fd(),
                &mut buf[filled..],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    return Err(TransferError::Download {
                        url: self.shown.to_string(),
                        detail: "the stream ended early".into(),
                    });
                }
                Ok(n) => filled += n,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
                Err(e) => {
                    return Err(TransferError::Download {
                        url: self.shown.to_string(),
                        detail: format!("cannot read: {e}"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// What the daemon found before it asks the installer for a delta.
pub struct DeltaOffer {
    index: CheckedIndex,
    store: Store,
    pub ranges_per_request: usize,
}

/// The store's Range support probed, for a delta with `index`. Refused: the error and the
/// index back, for a full write that still sends it to the installer's read-back.
pub async fn offer_delta(
    index: CheckedIndex,
    settings: &crate::transfer::FetchSettings,
) -> Result<DeltaOffer, (TransferError, CheckedIndex)> {
    let http = settings.server.http();
    let store = match Store::new(&index.store_url, &http) {
        Ok(store) => store,
        Err(e) => return Err((e, index)),
    };
    let support = match store.probe(index.store_size, &mut |n| n).await {
        Ok(support) => support,
        Err(e) => return Err((e, index)),
    };
    let ranges_per_request = match support {
        RangeSupport::Multi => MULTI_RANGES,
        RangeSupport::Single => 1,
        RangeSupport::None(answer) => {
            let e = TransferError::RangeUnsupported {
                url: store.shown.clone(),
                answer,
            };
            return Err((e, index));
        }
    };
    Ok(DeltaOffer {
        index,
        store,
        ranges_per_request,
    })
}

/// What the daemon's side of a write under the split downloaded so far and expects to in all
/// ([`serve_delta`]: the index, then the store's ranges the installer asked for;
/// [`crate::transfer::send_image`]: the image as it comes), for its progress reports while it
/// runs: the installer sees only what it is sent.
#[derive(Debug, Default)]
pub struct DownloadCount {
    pub downloaded: AtomicU64,
    pub expected: AtomicU64,
}

/// The daemon's side, once the installer took the request: sends the index, reads the ranges
/// the installer asks for, fetches them and sends their bytes, counting them in `progress`.
/// Returns the bytes downloaded.
pub async fn serve_delta(
    offer: DeltaOffer,
    stream: std::os::unix::net::UnixStream,
    work_dir: &Path,
    max_rate: Option<u64>,
    progress: &DownloadCount,
) -> Result<u64, TransferError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let shown = "the installer's stream";
    let lost = |e: io::Error| TransferError::Download {
        url: shown.to_string(),
        detail: format!("the installer's stream broke: {e}"),
    };
    let DeltaOffer { index, store, .. } = offer;
    let index_len = index.len;
    // The index first (the installer reads it before it plans).
    let stream = CheckedIndex::send(Some(index), stream).await?;
    progress.downloaded.store(index_len, Ordering::Relaxed);
    progress.expected.store(index_len, Ordering::Relaxed);
    stream.set_nonblocking(true).map_err(lost)?;
    let mut stream = tokio::net::UnixStream::from_std(stream).map_err(lost)?;
    let mut buf = vec![0u8; 64 * 1024];
    // The ranges, bounded: no more requests than the index has frames, no more ranges each
    // than the wire allows.
    let count = stream.read_u32_le().await.map_err(lost)? as usize;
    if count > 1 << 22 {
        return Err(lost(io::Error::other(format!(
            "{count} requests asked for"
        ))));
    }
    let mut requests = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let n = stream.read_u32_le().await.map_err(lost)? as usize;
        if n == 0 || n > MAX_RANGES_PER_REQUEST {
            return Err(lost(io::Error::other(format!("a request of {n} ranges"))));
        }
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let offset = stream.read_u64_le().await.map_err(lost)?;
            let len = stream.read_u64_le().await.map_err(lost)?;
            ranges.push(planner::StoreRange {
                offset,
                len,
                frames: 0..0,
            });
        }
        requests.push(Request { ranges });
    }
    let spool = tempfile::tempfile_in(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "make a spool file", e))?;
    let mut rate = RateLimit::new(max_rate);
    let mut downloaded = index_len;
    progress.expected.store(
        index_len + requests.iter().map(Request::bytes).sum::<u64>(),
        Ordering::Relaxed,
    );
    for request in &requests {
        store
            .fetch(request, &spool, &mut |n| {
                downloaded += n;
                progress.downloaded.store(downloaded, Ordering::Relaxed);
                n
            })
            .await?;
        rate.take(request.bytes()).await;
        for range in &request.ranges {
            let mut at = range.offset;
            let end = range.end();
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                spool
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(|e| TransferError::slot_io(work_dir, "read the spool", e))?;
                stream.write_all(&buf[..n]).await.map_err(lost)?;
                at += n as u64;
            }
        }
    }
    stream.flush().await.map_err(lost)?;
    Ok(downloaded)
}
