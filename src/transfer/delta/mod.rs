//! A delta install: the image rebuilt from the blocks the device already holds and the few it
//! fetches from the release's block store, every block checked against the signed block index
//! before it is written.
//!
//! 1. The block index (`images.<class>.chunks`) is downloaded whole (bounded by what the image's
//!    size allows), checked against the manifest's SHA-256 and expanded into the work directory
//!    ([`block_index::expand`]); an expanded index of the same hash is reused.
//! 2. A table of the target slot's blocks is built by hashing it (its content is whatever the
//!    last write, finished or not, left there), and one of the booted slot's, cached under the
//!    caller's key (the boot: a booted slot does not change under a running system, and a table
//!    only proposes candidates anyway).
//! 3. The plan ([`crate::delta::plan`]) says per block: zeros, kept in place, copied from a
//!    local slot, or fetched; the store ranges to fetch are coalesced into at most about 100
//!    HTTP requests, several ranges each when the server answers multi-range requests (probed
//!    with one tiny request first). A plan that would download as much as the whole image is not
//!    followed: the whole image is downloaded instead.
//! 4. The ranges are downloaded into an unnamed spool file in the work directory (memory stays
//!    flat), then the image is assembled in ascending block order ([`crate::delta::assemble`]):
//!    a block reaches the slot only after its SHA-256 matched the signed index. A local copy that
//!    does not match is fetched with a request of its own.
//! 5. Checkpoints (`fdatasync`) at the configured interval; the read-back past the page cache,
//!    block by block against the index on the read-back's pool, runs beside the assembly, each
//!    region once it is synced.
//!
//! Resuming needs nothing from the checkpoint: a new attempt hashes the target slot again, and
//! every block an earlier attempt wrote is then found in place and kept.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use url::Url;

use super::error::{TransferError, esc};
use super::readback::{Check, Origin, Readback};
use super::{
    DownloadTally, Plan, RateLimit, Reporter, TransferEvent, WriteRequest, Written,
    finish_read_back, join_error,
};
use crate::delta::assemble::{self, AssembleError};
use crate::delta::lookup::TableKey;
use crate::delta::plan::{self as planner, PlanOptions, Request, Sources, Summary};
use crate::release::block_index::IndexFile;
use crate::release::manifest::ChunkIndexRef;

mod index;
mod slot;
mod split;
mod store;

pub(crate) use index::expanded_index;
use index::{IndexFailure, fetch_index};
use slot::{SinkNote, SinkParams, SpoolFrames, assemble_into_slot, frame_offsets, make_plan};
use store::{RangeSupport, Store};

pub use index::{CheckedIndex, fetch_checked_index};
pub use split::{
    DeltaOffer, DeltaStreamRequest, DownloadCount, offer_delta, receive_delta, serve_delta,
};
pub(super) use split::{StreamReader, receive_index};

/// Ranges per request when the server answers multi-range requests.
const MULTI_RANGES: usize = 16;

/// How a delta install may reuse local data.
#[derive(Debug, Clone)]
pub struct DeltaSettings {
    /// Where the expanded index, the slot tables and the spool of fetched ranges live (the
    /// agent's state directory; created 0700 when missing).
    pub work_dir: PathBuf,
    /// The booted slot, read (never written) for blocks to reuse.
    pub booted: Option<BootedSlot>,
    /// Download the whole image when a delta is not possible, instead of refusing.
    pub full_download_fallback: bool,
}

/// The booted slot and the key its table is cached under (`None`: hashed again each time).
#[derive(Debug, Clone)]
pub struct BootedSlot {
    pub path: PathBuf,
    pub key: Option<TableKey>,
}

/// Why a delta install did not happen or did not finish.
pub(crate) enum DeltaFailure {
    /// Nothing was written: the index or the server do not allow a delta. A full download may
    /// take over when the operator allows it.
    Unavailable(TransferError),
    /// The plan would download about as much as the whole image: the whole image is cheaper.
    /// The index, expanded and checked, is for its read-back.
    NotWorthIt(Summary, Arc<IndexFile>),
    /// The image is a local file ([`super::is_local`]): no plan is made; the index, expanded
    /// and checked, is for the read-back of the whole image.
    LocalImage(Arc<IndexFile>),
    /// The install failed (the slot may have been written).
    Failed(TransferError),
}

impl From<TransferError> for DeltaFailure {
    fn from(e: TransferError) -> DeltaFailure {
        DeltaFailure::Failed(e)
    }
}

/// What a delta install did, for the log and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeltaStats {
    pub index_bytes: u64,
    pub downloaded: u64,
    pub requests: u64,
    pub summary: Summary,
    pub assembly: assemble::AssemblyStats,
}

pub(crate) async fn install(
    req: &WriteRequest,
    settings: &DeltaSettings,
    chunks: &ChunkIndexRef,
    events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
) -> Result<(Written, DeltaStats), DeltaFailure> {
    let image = &req.image;
    let plan_image = Plan::new(image)?;
    let size = image.size;
    let full_size = plan_image.transport_size;
    prepare_work_dir(&settings.work_dir)
        .map_err(|e| TransferError::slot_io(&settings.work_dir, "create the work directory", e))?;
    let http = req.server.http();
    let mut stats = DeltaStats::default();
    let mut rate = RateLimit::new(req.server.max_rate);

    // 1. The index.
    let index_url = parse_url(&chunks.url)?;
    let (index, index_bytes) = match fetch_index(&index_url, image, chunks, settings, &http).await {
        Ok(found) => found,
        Err(IndexFailure::Refused(refusal)) => {
            return Err(DeltaFailure::Unavailable(TransferError::BlockIndex {
                url: esc(&chunks.url),
                refusal,
            }));
        }
        Err(IndexFailure::Transfer(e)) if e.is_transient() => return Err(DeltaFailure::Failed(e)),
        Err(IndexFailure::Transfer(e)) => return Err(DeltaFailure::Unavailable(e)),
    };
    stats.index_bytes = index_bytes;
    if super::is_local(image) {
        return Err(DeltaFailure::LocalImage(Arc::new(index)));
    }
    rate.take(index_bytes).await;
    let store_url =
        index_url
            .join(&index.header().store_name)
            .map_err(|e| TransferError::UnsupportedUrl {
                url: esc(&chunks.url),
                detail: format!("the store's url cannot be made: {e}"),
            })?;

    // 2 and 3: the tables and the plan, off the async threads.
    let target_path = req.slot_path.clone();
    let capacity = req.slot_capacity;
    let work_dir = settings.work_dir.clone();
    let booted = settings.booted.clone();
    let index = Arc::new(index);
    let probe_store = Store::new(&store_url, &http)?;
    let mut planned = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || {
            make_plan(&index, &target_path, capacity, booted, &work_dir, size, 1)
        })
        .await
        .map_err(join_error)??
    };

    // The server's Range support decides how ranges go into requests: re-plan for it.
    let mut probed = 0;
    if planned.plan.summary().fetched_blocks > 0 {
        let support = probe_store
            .probe(index.header().store_size, &mut |n| {
                probed += n;
                n
            })
            .await?;
        stats.requests += 1;
        match support {
            RangeSupport::None(answer) => {
                return Err(DeltaFailure::Unavailable(TransferError::RangeUnsupported {
                    url: probe_store.shown.clone(),
                    answer,
                }));
            }
            RangeSupport::Multi => {
                let index = index.clone();
                let work_dir = settings.work_dir.clone();
                let (booted_table, target_table) =
                    (planned.booted.table.clone(), planned.target.table.clone());
                planned.plan = tokio::task::spawn_blocking(move || {
                    let sources = Sources {
                        booted: booted_table.as_deref(),
                        target: target_table.as_deref(),
                    };
                    planner::plan(&index, sources, options(MULTI_RANGES, full_size), &work_dir)
                })
                .await
                .map_err(join_error)?
                .map_err(|e| TransferError::slot_io(&settings.work_dir, "plan the delta", e))?;
            }
            RangeSupport::Single => {}
        }
    }
    let summary = *planned.plan.summary();
    stats.summary = summary;
    tracing::info!(
        "delta plan: {} blocks: {} zero, {} kept, {} from the booted slot, {} moved in the target slot, {} fetched ({} bytes in {} requests; the whole image is {full_size} bytes)",
        summary.blocks,
        summary.zero_blocks,
        summary.kept_blocks,
        summary.copied_from_booted,
        summary.copied_from_target,
        summary.fetched_blocks,
        summary.download_bytes,
        summary.requests,
    );
    if summary.download_bytes + index_bytes >= full_size {
        return Err(DeltaFailure::NotWorthIt(summary, index));
    }

    // 4. The ranges, into the spool.
    let spool = tempfile::tempfile_in(&settings.work_dir)
        .map_err(|e| TransferError::slot_io(&settings.work_dir, "make a spool file", e))?;
    let frame_count = index.header().frame_count as usize;
    let mut fetched = vec![false; frame_count];
    let mut download =
        DownloadTally::new(index_bytes + probed, index_bytes + summary.download_bytes);
    download.tell(events)?;
    let requests: Vec<Request> = planned
        .plan
        .requests()
        .collect::<io::Result<_>>()
        .map_err(|e| TransferError::slot_io(&settings.work_dir, "read the plan", e))?;
    for request in &requests {
        stats.requests += 1;
        probe_store
            .fetch(request, &spool, &mut |n| {
                download.downloaded += n;
                n
            })
            .await
            .map_err(|e| match e {
                e @ TransferError::RangeUnsupported { .. } => DeltaFailure::Unavailable(e),
                e => DeltaFailure::Failed(e),
            })?;
        rate.take(request.bytes()).await;
        for range in &request.ranges {
            for frame in range.frames.clone() {
                fetched[frame as usize] = true;
            }
        }
        download.tell_if_due(events)?;
    }

    // 5. The assembly, on a blocking thread; progress and checkpoints come back through the
    // reporter.
    let (checkpoint_tx, checkpoints) = std::sync::mpsc::channel();
    let written = Arc::new(AtomicU64::new(0));
    // The read-back beside the assembly, each region once synced, block by block against the
    // index on the pool.
    let readback = Readback::start(
        &req.slot_path,
        size,
        Check::Blocks(index.clone(), Origin::EachBlockChecked),
        0,
        req.readback_overlap,
    )?;
    let feed = readback.feed();
    let extra = Arc::new(AtomicU64::new(0));
    let extra_requests = Arc::new(AtomicU64::new(0));
    let assembly = {
        let index = index.clone();
        let written = written.clone();
        let extra = extra.clone();
        let extra_requests = extra_requests.clone();
        let runtime = tokio::runtime::Handle::current();
        let store = probe_store.clone();
        let checkpoint_interval = req.checkpoint_interval;
        let path = req.slot_path.clone();
        tokio::task::spawn_blocking(move || {
            let offsets = frame_offsets(&index)
                .map_err(|e| TransferError::slot_io(&path, "read the block index", e))?;
            let mut frames = SpoolFrames {
                spool,
                offsets,
                fetched,
                store: Some((store, runtime)),
                extra,
                extra_requests,
            };
            let mut notify = |note: SinkNote| match note {
                SinkNote::Written(done) => written.store(done, Ordering::Relaxed),
                SinkNote::Checkpoint(durable) => {
                    feed.durable(durable);
                    let _ = checkpoint_tx.send(durable);
                }
            };
            assemble_into_slot(
                &index,
                &planned,
                &mut frames,
                SinkParams {
                    path: &path,
                    size,
                    checkpoint_interval,
                },
                &mut notify,
            )
        })
    };
    let mut reporter = Reporter::new(events, checkpoints, written, size);
    reporter.progress(true)?;
    tokio::pin!(assembly);
    let outcome = loop {
        tokio::select! {
            done = &mut assembly => break done.map_err(join_error)?,
            () = tokio::time::sleep(super::PROGRESS_INTERVAL) => reporter.update(false)?,
        }
    };
    reporter.checkpoints()?;
    stats.assembly = outcome?;
    let extra = extra.load(Ordering::Relaxed);
    download.downloaded += extra;
    stats.downloaded = download.downloaded;
    stats.requests += extra_requests.load(Ordering::Relaxed);
    reporter.progress(true)?;
    download.tell(reporter.events)?;
    let written = finish_read_back(readback, &plan_image, size, reporter.events).await?;
    tracing::info!(
        "delta install: {} bytes downloaded (index {}) in {} requests; {} blocks written from the store, {} copied, {} kept, {} zero, {} local copies that did not match fetched again",
        stats.downloaded,
        stats.index_bytes,
        stats.requests,
        stats.assembly.fetched_blocks,
        stats.assembly.copied_blocks,
        stats.assembly.kept_blocks,
        stats.assembly.zero_blocks,
        stats.assembly.fallback_blocks,
    );
    Ok((written, stats))
}

fn options(ranges_per_request: usize, full_size: u64) -> PlanOptions {
    PlanOptions {
        ranges_per_request,
        max_download: Some(full_size),
        ..PlanOptions::default()
    }
}

fn parse_url(url: &str) -> Result<Url, TransferError> {
    Url::parse(url).map_err(|e| TransferError::UnsupportedUrl {
        url: esc(url),
        detail: format!("not a url: {e}"),
    })
}

fn prepare_work_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn assembly_error(e: AssembleError, path: &Path, store: &str) -> TransferError {
    match e {
        AssembleError::Refused(refusal) => match refusal.code {
            crate::reason::ReasonCode::HashMismatch => TransferError::HashMismatch {
                url: store.to_string(),
                what: "a block of the block store",
                expected: "the block's hash in the signed index".into(),
                actual: refusal.message,
            },
            crate::reason::ReasonCode::DecompressFailed => TransferError::Decompress {
                url: store.to_string(),
                detail: refusal.message,
            },
            _ => TransferError::BlockIndex {
                url: store.to_string(),
                refusal,
            },
        },
        AssembleError::Local(e) => TransferError::slot_io(path, "read a local slot", e),
        AssembleError::Fetch { source, .. } => TransferError::Download {
            url: store.to_string(),
            detail: source.to_string(),
        },
        AssembleError::Sink { source, .. } => TransferError::slot_io(path, "write", source),
    }
}

/// The key a booted slot's table is cached under: it holds for one boot of one device path (a
/// booted slot does not change under the running system, and a table only proposes).
pub fn booted_table_key(boot_id: &str, device: &Path) -> TableKey {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"booted slot table\0");
    hasher.update(boot_id.as_bytes());
    hasher.update(b"\0");
    hasher.update(device.as_os_str().as_encoded_bytes());
    hasher.finalize().into()
}
