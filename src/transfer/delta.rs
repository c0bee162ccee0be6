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

use std::fs::File;
use std::io::{self, BufReader};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::header::{CONTENT_RANGE, CONTENT_TYPE};
use url::Url;

use super::error::{TransferError, chain, esc};
use super::http::{HttpClient, Response, ResponseBody};
use super::readback::{Check, Origin, Readback};
use super::source::HttpOptions;
use super::writer::{self, WRITE_BUFFER};
use super::{
    DownloadTally, Plan, RateLimit, Reporter, TransferEvent, WriteRequest, Written, call,
    finish_read_back, join_error,
};
use crate::delta::assemble::{self, AssembleError, FrameSource, LocalSlot, Locals, Write};
use crate::delta::lookup::{SlotTable, TableBuilder, TableKey};
use crate::delta::plan::{self as planner, PlanOptions, Request, Sources, Summary};
use crate::release::block_index::{self, IndexError, IndexFile, MAX_DICTIONARY_SIZE};
use crate::release::manifest::ChunkIndexRef;

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

enum IndexFailure {
    Refused(crate::release::Refusal),
    Transfer(TransferError),
}

impl From<TransferError> for IndexFailure {
    fn from(e: TransferError) -> IndexFailure {
        IndexFailure::Transfer(e)
    }
}

/// The block index of `image` as an earlier fetch expanded it into `work_dir` (the file is
/// named after the SHA-256 the signed manifest gives, and only ever appears there, renamed into
/// place, once its bytes matched it), or `None`. Blocking: opening checks the whole file.
pub(crate) fn expanded_index(
    work_dir: &Path,
    image: &crate::release::manifest::Image,
    chunks: &ChunkIndexRef,
) -> Option<IndexFile> {
    if chunks.sha256.len() != 64 || !chunks.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let dest = work_dir.join(format!("{}.index", chunks.sha256.to_ascii_lowercase()));
    IndexFile::open(&dest).ok().filter(|index| {
        index.header().image_size == image.size
            && u64::from(index.header().block_size) == chunks.chunk_size
    })
}

/// The expanded index: reused when one of the same SHA-256 is in the work directory, else
/// downloaded (at most what an index for this image can be) and expanded. Returns it and the
/// bytes downloaded.
async fn fetch_index(
    url: &Url,
    image: &crate::release::manifest::Image,
    chunks: &ChunkIndexRef,
    settings: &DeltaSettings,
    http: &HttpOptions<'_>,
) -> Result<(IndexFile, u64), IndexFailure> {
    let name = format!("{}.index", chunks.sha256.to_ascii_lowercase());
    if !chunks.sha256.bytes().all(|b| b.is_ascii_hexdigit()) || chunks.sha256.len() != 64 {
        return Err(IndexFailure::Refused(crate::release::Refusal::new(
            crate::reason::ReasonCode::Malformed,
            "block index: the manifest's sha256 is not 64 hex digits",
        )));
    }
    let dest = settings.work_dir.join(&name);
    if let Some(index) = expanded_index(&settings.work_dir, image, chunks) {
        return Ok((index, 0));
    }
    // Indexes of other releases are of no more use.
    if let Ok(entries) = std::fs::read_dir(&settings.work_dir) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.ends_with(".index") && file != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    // The most a served index can be for this image: header, dictionary, one hash, one
    // section byte and one frame size per block, and zstd's worst case on top.
    let blocks = image.size.div_ceil(chunks.chunk_size.max(1));
    let raw = u64::from(MAX_DICTIONARY_SIZE) + blocks * (32 + 1 + 4);
    let cap = block_index::MAX_HEADER_LEN as u64 + raw + raw / 128 + 4096;
    let mut download = tempfile::tempfile_in(&settings.work_dir).map_err(|e| {
        TransferError::slot_io(&settings.work_dir, "make a file for the block index", e)
    })?;
    let bytes = download_whole(url, http, cap, &mut |chunk| {
        io::Write::write_all(&mut download, chunk)
            .map_err(|e| TransferError::slot_io(&settings.work_dir, "write the block index", e))
    })
    .await?;
    let image = image.clone();
    let chunks = chunks.clone();
    let work_dir = settings.work_dir.clone();
    let expanded = tokio::task::spawn_blocking(move || {
        io::Seek::rewind(&mut download)?;
        Ok::<_, io::Error>(block_index::expand(
            BufReader::with_capacity(64 * 1024, download),
            &image,
            &chunks,
            &dest,
        ))
    })
    .await
    .map_err(join_error)?
    .map_err(|e| TransferError::slot_io(&work_dir, "read the block index", e))?;
    match expanded {
        Ok(index) => Ok((index, bytes)),
        Err(IndexError::Refused(refusal)) => Err(IndexFailure::Refused(refusal)),
        Err(IndexError::Io { context, source }) => {
            Err(IndexFailure::Transfer(TransferError::slot_io(
                &work_dir,
                "expand the block index",
                io::Error::other(format!("{context}: {source}")),
            )))
        }
    }
}

fn check_cap(copied: u64, cap: u64, shown: &str) -> Result<(), TransferError> {
    if copied > cap {
        return Err(TransferError::SizeMismatch {
            url: shown.to_string(),
            detail: format!(
                "the block index goes on past {cap} bytes, more than one for this image can hold"
            ),
        });
    }
    Ok(())
}

/// A GET of `url` (with `range` as its `Range` header), answered within the stall timeout.
async fn send(
    client: &HttpClient,
    url: &Url,
    range: Option<&str>,
    shown: &str,
    stall: Duration,
) -> Result<Response, TransferError> {
    tokio::time::timeout(stall, client.get(url, range))
        .await
        .map_err(|_| TransferError::Stall {
            url: shown.to_string(),
            after: stall,
            received: 0,
        })?
}

/// A response body read chunk by chunk, each within the stall timeout.
struct Body {
    body: ResponseBody,
    shown: String,
    stall: Duration,
    received: u64,
}

impl Body {
    fn new(body: ResponseBody, shown: &str, stall: Duration) -> Body {
        Body {
            body,
            shown: shown.to_string(),
            stall,
            received: 0,
        }
    }

    async fn next(&mut self) -> Result<Option<bytes::Bytes>, TransferError> {
        let chunk = tokio::time::timeout(self.stall, self.body.chunk())
            .await
            .map_err(|_| TransferError::Stall {
                url: self.shown.clone(),
                after: self.stall,
                received: self.received,
            })?
            .map_err(|e| TransferError::Download {
                url: self.shown.clone(),
                detail: format!(
                    "connection lost after {} bytes: {}",
                    self.received,
                    chain(&e)
                ),
            })?;
        if let Some(chunk) = &chunk {
            self.received += chunk.len() as u64;
        }
        Ok(chunk)
    }
}

/// A slot opened for the delta and its table.
struct Opened {
    file: File,
    table: Option<Arc<SlotTable>>,
}

struct Booted {
    file: Option<File>,
    table: Option<Arc<SlotTable>>,
}

/// What the assembly works on: the target slot, the booted one (when readable) and the plan
/// over them.
struct Planned {
    target: Opened,
    booted: Booted,
    plan: planner::Plan,
}

fn slot_len(file: &File, path: &Path) -> Result<u64, TransferError> {
    let meta = file
        .metadata()
        .map_err(|e| TransferError::slot_io(path, "inspect", e))?;
    if meta.file_type().is_block_device() {
        writer::block_device_size(file).map_err(|e| TransferError::slot_io(path, "size", e))
    } else {
        Ok(meta.len())
    }
}

/// Opens the target slot (for writing, refusing an image that does not fit), builds both
/// tables and makes a plan for a single-range server.
fn make_plan(
    index: &IndexFile,
    target_path: &Path,
    capacity: u64,
    booted: Option<BootedSlot>,
    work_dir: &Path,
    size: u64,
    ranges_per_request: usize,
) -> Result<Planned, DeltaFailure> {
    let block_size = index.header().block_size;
    let builder = TableBuilder::new(block_size);
    let io_error = |op: &'static str| move |e: io::Error| TransferError::slot_io(work_dir, op, e);

    let file = writer::open_slot(target_path, capacity, size)?;
    let target_len = slot_len(&file, target_path)?.min(capacity);
    let target_table = if target_len >= u64::from(block_size) {
        // What the slot holds now: drawn fresh, so a table is never taken for another content.
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| io_error("draw a table key")(io::Error::other(e)))?;
        let path = work_dir.join("target.table");
        builder
            .from_slot(&file, target_len, &key, &path)
            .map_err(|e| TransferError::slot_io(target_path, "hash the target slot", e))?;
        Some(Arc::new(
            SlotTable::open(&path).map_err(io_error("open the target slot's table"))?,
        ))
    } else {
        None
    };

    let booted = match booted {
        None => Booted {
            file: None,
            table: None,
        },
        Some(slot) => match File::open(&slot.path) {
            Err(e) => {
                tracing::warn!(
                    "cannot read the booted slot {} for a delta ({e}); its blocks are not reused",
                    slot.path.display()
                );
                Booted {
                    file: None,
                    table: None,
                }
            }
            Ok(file) => {
                let path = work_dir.join("booted.table");
                let cached = match &slot.key {
                    Some(key) => SlotTable::open_if_current(&path, key)
                        .ok()
                        .flatten()
                        .filter(|t| t.block_size() == block_size),
                    None => None,
                };
                let table = match cached {
                    Some(table) => table,
                    None => {
                        let len = slot_len(&file, &slot.path)?;
                        let key = slot.key.unwrap_or([0; 32]);
                        builder.from_slot(&file, len, &key, &path).map_err(|e| {
                            TransferError::slot_io(&slot.path, "hash the booted slot", e)
                        })?;
                        SlotTable::open(&path).map_err(io_error("open the booted slot's table"))?
                    }
                };
                Booted {
                    file: Some(file),
                    table: Some(Arc::new(table)),
                }
            }
        },
    };
    let sources = Sources {
        booted: booted.table.as_deref(),
        target: target_table.as_deref(),
    };
    let full = u64::MAX;
    let plan = planner::plan(index, sources, options(ranges_per_request, full), work_dir)
        .map_err(io_error("plan the delta"))?;
    Ok(Planned {
        target: Opened {
            file,
            table: target_table,
        },
        booted,
        plan,
    })
}

/// Where each frame of the store starts (one more entry: the store's end). 8 bytes a frame: a
/// 2 GiB image of 4 KiB blocks in frames of 4 has 131,072 frames, 1 MiB.
fn frame_offsets(index: &IndexFile) -> io::Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(index.header().frame_count as usize + 1);
    for frame in index.frames() {
        offsets.push(frame?.offset);
    }
    offsets.push(index.header().store_size);
    Ok(offsets)
}

/// The fetched frames, from the spool; a frame the plan did not fetch (a local copy that did
/// not match) with a request of its own.
struct SpoolFrames {
    spool: File,
    offsets: Vec<u64>,
    fetched: Vec<bool>,
    /// Where a frame the plan did not fetch comes from; `None` under the split, where the
    /// installer has no network: such a frame fails the attempt (transiently: a new plan
    /// follows).
    store: Option<(Store, tokio::runtime::Handle)>,
    /// Bytes downloaded for frames the plan did not fetch, and the requests for them.
    extra: Arc<AtomicU64>,
    extra_requests: Arc<AtomicU64>,
}

impl FrameSource for SpoolFrames {
    fn compressed(&mut self, frame: u64) -> io::Result<Vec<u8>> {
        let f = frame as usize;
        let (start, end) = match (self.offsets.get(f), self.offsets.get(f + 1)) {
            (Some(&s), Some(&e)) => (s, e),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("frame {frame} is past the store"),
                ));
            }
        };
        if !self.fetched[f] {
            let Some((store, runtime)) = &self.store else {
                return Err(io::Error::other(format!(
                    "frame {frame} of the block store was not fetched (a local block changed while the image was assembled)"
                )));
            };
            let request = Request {
                ranges: vec![planner::StoreRange {
                    offset: start,
                    len: end - start,
                    frames: frame..frame + 1,
                }],
            };
            let mut counted = 0;
            runtime
                .block_on(store.fetch(&request, &self.spool, &mut |n| {
                    counted += n;
                    n
                }))
                .map_err(io::Error::other)?;
            self.extra.fetch_add(counted, Ordering::Relaxed);
            self.extra_requests.fetch_add(1, Ordering::Relaxed);
            self.fetched[f] = true;
        }
        let mut bytes = vec![0u8; (end - start) as usize];
        self.spool.read_exact_at(&mut bytes, start)?;
        Ok(bytes)
    }
}

/// Writes verified blocks into the target slot, in runs of up to [`WRITE_BUFFER`], with an
/// `fdatasync` and a checkpoint at each interval.
struct SlotSink<'a> {
    file: &'a File,
    path: &'a Path,
    block_size: u64,
    size: u64,
    buf: Vec<u8>,
    buf_start: u64,
    interval: u64,
    next_checkpoint: u64,
    done: u64,
    notify: &'a mut dyn FnMut(SinkNote),
    error: Option<TransferError>,
}

/// What the sink tells: image bytes in place so far, and checkpoints (after `fdatasync`).
enum SinkNote {
    Written(u64),
    Checkpoint(u64),
}

/// Where the sink writes.
struct SinkParams<'a> {
    path: &'a Path,
    size: u64,
    checkpoint_interval: u64,
}

/// Carries the plan out into the target slot: verified blocks written in runs, checkpoints.
/// What was written stays on failure (synced): a resume finds it in place.
fn assemble_into_slot(
    index: &IndexFile,
    planned: &Planned,
    frames: &mut SpoolFrames,
    params: SinkParams<'_>,
    notify: &mut dyn FnMut(SinkNote),
) -> Result<assemble::AssemblyStats, TransferError> {
    let target = &planned.target.file;
    let mut sink = SlotSink {
        file: target,
        path: params.path,
        block_size: u64::from(index.header().block_size),
        size: params.size,
        buf: Vec::with_capacity(WRITE_BUFFER),
        buf_start: 0,
        interval: params.checkpoint_interval,
        next_checkpoint: params.checkpoint_interval,
        done: 0,
        notify,
        error: None,
    };
    let locals = Locals {
        booted: planned.booted.file.as_ref().map(|f| f as &dyn LocalSlot),
        target: Some(target as &dyn LocalSlot),
    };
    let result = assemble::assemble(&planned.plan, index, locals, frames, &mut |block, write| {
        sink.put(block, write)
    });
    match result {
        Ok(stats) => {
            sink.finish()?;
            Ok(stats)
        }
        Err(AssembleError::Sink { .. }) if sink.error.is_some() => {
            let _ = sink.finish();
            Err(sink.error.take().expect("checked"))
        }
        Err(e) => {
            let _ = sink.finish();
            let shown = match &frames.store {
                Some((store, _)) => store.shown.clone(),
                None => "the block store (sent by the daemon)".to_string(),
            };
            Err(assembly_error(e, params.path, &shown))
        }
    }
}

impl SlotSink<'_> {
    fn put(&mut self, block: u64, write: Write<'_>) -> io::Result<()> {
        let result = self.put_inner(block, write);
        if let Err(e) = &result {
            let kind = e.kind();
            self.error = Some(TransferError::slot_io(
                self.path,
                "write",
                io::Error::new(kind, e.to_string()),
            ));
        }
        result
    }

    fn put_inner(&mut self, block: u64, write: Write<'_>) -> io::Result<()> {
        let at = block * self.block_size;
        match write {
            Write::Kept => self.flush()?,
            Write::Bytes(bytes) => {
                if !self.buf.is_empty() && self.buf_start + self.buf.len() as u64 != at {
                    self.flush()?;
                }
                if self.buf.is_empty() {
                    self.buf_start = at;
                }
                self.buf.extend_from_slice(bytes);
                if self.buf.len() >= WRITE_BUFFER {
                    self.flush()?;
                }
            }
        }
        let done = (at + self.block_size).min(self.size);
        self.done = done;
        (self.notify)(SinkNote::Written(done));
        if self.interval > 0 && done >= self.next_checkpoint && done < self.size {
            self.flush()?;
            self.file.sync_data()?;
            (self.notify)(SinkNote::Checkpoint(done));
            self.next_checkpoint = (done / self.interval + 1) * self.interval;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.buf_start)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), TransferError> {
        self.flush()
            .and_then(|()| self.file.sync_data())
            .map_err(|e| TransferError::slot_io(self.path, "write", e))?;
        (self.notify)(SinkNote::Checkpoint(self.done));
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// The least-privilege split: the installer (root) reads the slots and makes the plan, the daemon
// fetches. Over the image stream socket (both ways): the daemon sends the served index
// (`u64` LE length, the bytes); the installer answers with the ranges to fetch (`u32` LE count
// of requests, each a `u32` count of ranges and per range `u64` offset and `u64` length); the
// daemon sends the ranges' bytes back to back, in that order. The installer checks the index
// against its own verified manifest and every block against the index, as without the split.

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
    let sha256 = super::decode_sha256(&image.sha256).ok_or_else(|| TransferError::BadImage {
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
                if last_progress.elapsed() < super::PROGRESS_INTERVAL {
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
pub(super) fn receive_index(
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
pub(super) struct StreamReader<'a> {
    pub(super) stream: &'a File,
    pub(super) stall: Duration,
    pub(super) shown: &'a str,
}

impl StreamReader<'_> {
    pub(super) fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        use std::os::fd::AsRawFd;
        let mut filled = 0;
        while filled < buf.len() {
            super::stream::wait_readable(self.stream, self.stall, self.shown, filled as u64)?;
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

/// The most a served index can be for an image: header, dictionary, one hash, one section byte
/// and one frame size per block, and zstd's worst case on top.
fn index_cap(size: u64, chunk_size: u64) -> u64 {
    let blocks = size.div_ceil(chunk_size.max(1));
    let raw = u64::from(MAX_DICTIONARY_SIZE) + blocks * (32 + 1 + 4);
    block_index::MAX_HEADER_LEN as u64 + raw + raw / 128 + 4096
}

/// A block index the daemon downloaded and found to match the signed manifest's SHA-256, to
/// send to the installer (which checks it again against its own verified release).
pub struct CheckedIndex {
    file: File,
    len: u64,
    store_url: Url,
    store_size: u64,
}

impl CheckedIndex {
    /// Sends `index` ahead of the image into the installer's stream `out`, on a blocking thread
    /// (the installer reads it before anything else), and gives `out` back.
    pub async fn send<S: std::os::fd::AsFd + Send + 'static>(
        index: Option<CheckedIndex>,
        out: S,
    ) -> Result<S, TransferError> {
        tokio::task::spawn_blocking(move || {
            CheckedIndex::write_to(index.as_ref(), &out)?;
            Ok(out)
        })
        .await
        .map_err(super::join_error)?
    }

    /// The index's length (8 bytes, little-endian), then its bytes; `None` writes the length 0
    /// (no index). Blocking.
    fn write_to(
        index: Option<&CheckedIndex>,
        out: &impl std::os::fd::AsFd,
    ) -> Result<(), TransferError> {
        let lost = |e: io::Error| TransferError::Download {
            url: "the installer's stream".to_string(),
            detail: format!("the installer's stream broke: {e}"),
        };
        let len = index.map_or(0, |index| index.len);
        crate::socket::send_all(out, &len.to_le_bytes()).map_err(lost)?;
        let Some(index) = index else { return Ok(()) };
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            index
                .file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| TransferError::slot_io(Path::new("the block index"), "read", e))?;
            crate::socket::send_all(out, &buf[..n]).map_err(lost)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// The daemon's side, before the installer is asked: the index downloaded and checked against
/// the manifest's hash (so that a bad one falls back, or fails, before the slot is touched).
pub async fn fetch_checked_index(
    image: &crate::release::manifest::Image,
    settings: &super::FetchSettings,
    work_dir: &Path,
) -> Result<CheckedIndex, TransferError> {
    use sha2::Digest;
    let chunks = chunks_of(image)?;
    prepare_work_dir(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "create the work directory", e))?;
    let http = settings.server.http();
    let url = parse_url(&chunks.url)?;
    let shown = esc(url.as_str());
    let cap = index_cap(image.size, chunks.chunk_size);
    let mut file = tempfile::tempfile_in(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "make a file for the index", e))?;
    let mut hasher = sha2::Sha256::new();
    let mut head = Vec::new();
    let len = download_whole(&url, &http, cap, &mut |chunk| {
        hasher.update(chunk);
        if head.len() < block_index::MAX_HEADER_LEN {
            let take = (block_index::MAX_HEADER_LEN - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        io::Write::write_all(&mut file, chunk)
            .map_err(|e| TransferError::slot_io(work_dir, "write the index", e))
    })
    .await?;
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&chunks.sha256) {
        return Err(TransferError::BlockIndex {
            url: shown,
            refusal: crate::release::Refusal::new(
                crate::reason::ReasonCode::HashMismatch,
                format!(
                    "block index: its SHA-256 is {actual}, the signed manifest says {}",
                    chunks.sha256
                ),
            ),
        });
    }
    let header =
        block_index::IndexHeader::parse(&head).map_err(|refusal| TransferError::BlockIndex {
            url: shown.clone(),
            refusal,
        })?;
    let store_url = url
        .join(&header.store_name)
        .map_err(|e| TransferError::UnsupportedUrl {
            url: shown.clone(),
            detail: format!("the store's url cannot be made: {e}"),
        })?;
    Ok(CheckedIndex {
        file,
        len,
        store_url,
        store_size: header.store_size,
    })
}

/// The image's block index reference; an image without one is refused.
fn chunks_of(
    image: &crate::release::manifest::Image,
) -> Result<&crate::release::manifest::ChunkIndexRef, TransferError> {
    image
        .chunks
        .as_ref()
        .ok_or_else(|| TransferError::BadImage {
            url: esc(&image.url),
            detail: "no block index (chunks) for the image".into(),
        })
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
    settings: &super::FetchSettings,
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
/// [`super::send_image`]: the image as it comes), for its progress reports while it runs: the
/// installer sees only what it is sent.
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

/// Downloads a whole (small) file, at most `cap` bytes, handing each chunk on: the block index,
/// for the install here and for the daemon's offer under the split. Over http(s), anything but
/// a 200 answer is refused.
async fn download_whole(
    url: &Url,
    http: &HttpOptions<'_>,
    cap: u64,
    each: &mut (dyn FnMut(&[u8]) -> Result<(), TransferError> + Send),
) -> Result<u64, TransferError> {
    let shown = esc(url.as_str());
    match url.scheme() {
        "file" => {
            let path = super::source::local_path(url, &shown)?;
            let mut source = File::open(&path).map_err(|e| TransferError::Download {
                url: shown.clone(),
                detail: format!("cannot open: {e}"),
            })?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut copied = 0u64;
            loop {
                let n = match io::Read::read(&mut source, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(TransferError::Download {
                            url: shown,
                            detail: format!("cannot read: {e}"),
                        });
                    }
                };
                copied += n as u64;
                check_cap(copied, cap, &shown)?;
                each(&buf[..n])?;
            }
            Ok(copied)
        }
        "http" | "https" => {
            let client = HttpClient::new(http.connect_timeout, http.extra_roots);
            let response = send(&client, url, None, &shown, http.stall_timeout).await?;
            if response.status != 200 {
                return Err(TransferError::HttpStatus {
                    url: shown,
                    status: response.status,
                });
            }
            let mut body = Body::new(response.body, &shown, http.stall_timeout);
            while let Some(chunk) = body.next().await? {
                check_cap(body.received, cap, &shown)?;
                each(&chunk)?;
            }
            Ok(body.received)
        }
        other => Err(TransferError::UnsupportedUrl {
            url: shown,
            detail: format!(
                "the scheme {:?} is not one of https, http, file",
                esc(other)
            ),
        }),
    }
}

/// How a server answers Range requests.
enum RangeSupport {
    /// Several ranges in one request (`multipart/byteranges`).
    Multi,
    /// One range a request.
    Single,
    /// None: it sends the whole file (what it answered).
    None(String),
}

/// The block store, where its ranges are fetched from.
#[derive(Clone)]
struct Store {
    url: Url,
    shown: String,
    /// `None` for a `file://` store. Clones share its kept connection: the requests of an
    /// install, hundreds of small ranges, go over one connection and one TLS handshake.
    client: Option<HttpClient>,
    stall: Duration,
}

impl Store {
    fn new(url: &Url, http: &HttpOptions<'_>) -> Result<Store, TransferError> {
        let shown = esc(url.as_str());
        let client = match url.scheme() {
            "http" | "https" => Some(HttpClient::new(http.connect_timeout, http.extra_roots)),
            "file" => None,
            other => {
                return Err(TransferError::UnsupportedUrl {
                    url: shown,
                    detail: format!(
                        "the scheme {:?} is not one of https, http, file",
                        esc(other)
                    ),
                });
            }
        };
        Ok(Store {
            url: url.clone(),
            shown,
            client,
            stall: http.stall_timeout,
        })
    }

    /// One small request: two single-byte ranges (a multi-range answer), and when the server
    /// answers that with the whole file, one (a single-range answer).
    async fn probe(
        &self,
        store_size: u64,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<RangeSupport, TransferError> {
        let Some(client) = &self.client else {
            return Ok(RangeSupport::Multi);
        };
        let get =
            |range: &'static str| send(client, &self.url, Some(range), &self.shown, self.stall);
        if store_size >= 3 {
            let response = get("bytes=0-0,2-2").await?;
            let status = response.status;
            let multipart = response
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/byteranges"));
            match status {
                206 if multipart => {
                    // Two bytes and their part headers: read (and counted), at most 4 KiB.
                    let mut body = Body::new(response.body, &self.shown, self.stall);
                    while body.next().await?.is_some() && body.received <= 4096 {}
                    counted(body.received);
                    return Ok(RangeSupport::Multi);
                }
                206 | 200 => {}
                status => {
                    return Err(TransferError::HttpStatus {
                        url: self.shown.clone(),
                        status,
                    });
                }
            }
        }
        let response = get("bytes=0-0").await?;
        match response.status {
            206 => {
                // One byte, read (and counted) so that its connection is kept for the ranges.
                let mut body = Body::new(response.body, &self.shown, self.stall);
                while body.next().await?.is_some() && body.received <= 4096 {}
                counted(body.received);
                Ok(RangeSupport::Single)
            }
            200 => Ok(RangeSupport::None("200 with the whole file".into())),
            status => Err(TransferError::HttpStatus {
                url: self.shown.clone(),
                status,
            }),
        }
    }

    /// Fetches the request's ranges into `spool` at their offsets in the store. `counted` is
    /// told every body byte received.
    async fn fetch(
        &self,
        request: &Request,
        spool: &File,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<(), TransferError> {
        let Some(client) = &self.client else {
            return self.fetch_file(request, spool, counted);
        };
        let spool_error = |e| TransferError::slot_io(Path::new("the delta spool"), "write", e);
        let range = request.range_header();
        let response = send(client, &self.url, Some(&range), &self.shown, self.stall).await?;
        let status = response.status;
        if status == 200 {
            return Err(TransferError::RangeUnsupported {
                url: self.shown.clone(),
                answer: "200 with the whole file".into(),
            });
        }
        if status != 206 {
            return Err(TransferError::HttpStatus {
                url: self.shown.clone(),
                status,
            });
        }
        let first = request.ranges.first().map_or(0, |r| r.offset);
        let last = request.ranges.last().map_or(0, |r| r.end());
        // Everything asked for, the gaps between, and room for part headers.
        let most = last - first + 512 * request.ranges.len() as u64 + 4096;
        let content_type = response
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let single = response
            .headers
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let mut body = Body::new(response.body, &self.shown, self.stall);
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let boundary = content_type.as_deref().and_then(multipart_boundary);
        match (boundary, single) {
            (Some(boundary), _) => {
                let mut parser = Multipart::new(&boundary);
                while let Some(chunk) = body.next().await? {
                    counted(chunk.len() as u64);
                    if body.received > most {
                        return Err(self.bad("the multipart answer goes on past what was asked"));
                    }
                    parser.feed(
                        &chunk,
                        &mut |offset, bytes| spool.write_all_at(bytes, offset).map_err(spool_error),
                        &self.shown,
                    )?;
                }
                covered = parser.finish(&self.shown)?;
            }
            (None, Some((start, end))) => {
                let mut at = start;
                while let Some(chunk) = body.next().await? {
                    counted(chunk.len() as u64);
                    if at + chunk.len() as u64 > end {
                        return Err(self.bad("the body goes on past its Content-Range"));
                    }
                    spool.write_all_at(&chunk, at).map_err(spool_error)?;
                    at += chunk.len() as u64;
                }
                if at != end {
                    return Err(self.bad("the body ends before its Content-Range"));
                }
                covered.push((start, end));
            }
            (None, None) => return Err(self.bad("a 206 answer without a Content-Range")),
        }
        for range in &request.ranges {
            if !covered
                .iter()
                .any(|&(s, e)| s <= range.offset && range.end() <= e)
            {
                return Err(self.bad(&format!(
                    "bytes {} were asked for and not sent",
                    range.http()
                )));
            }
        }
        Ok(())
    }

    fn fetch_file(
        &self,
        request: &Request,
        spool: &File,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<(), TransferError> {
        let path = super::source::local_path(&self.url, &self.shown)?;
        let file = File::open(&path).map_err(|e| TransferError::Download {
            url: self.shown.clone(),
            detail: format!("cannot open: {e}"),
        })?;
        let mut buf = Vec::new();
        for range in &request.ranges {
            buf.resize(range.len as usize, 0);
            file.read_exact_at(&mut buf, range.offset)
                .map_err(|e| TransferError::Download {
                    url: self.shown.clone(),
                    detail: format!("cannot read bytes {}: {e}", range.http()),
                })?;
            counted(range.len);
            spool
                .write_all_at(&buf, range.offset)
                .map_err(|e| TransferError::slot_io(Path::new("the delta spool"), "write", e))?;
        }
        Ok(())
    }

    fn bad(&self, what: &str) -> TransferError {
        TransferError::Download {
            url: self.shown.clone(),
            detail: format!("a range answer is not usable: {what}"),
        }
    }
}

/// `bytes first-last/length` as the half-open range `[first, last + 1)`.
fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, _length) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (number(first)?, number(last)?);
    (first <= last).then_some((first, last + 1))
}

/// The boundary of a `multipart/byteranges` content type.
fn multipart_boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && value.len() <= 70).then(|| value.to_string())
    })
}

/// Where a part's bytes go: their offset in the store, the bytes.
type PartSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), TransferError> + 'a;

/// Most bytes of part headers (and delimiters) held at once.
const MAX_PART_HEAD: usize = 8 * 1024;

/// A streaming `multipart/byteranges` parser: each part's bytes go to the callback at the store
/// offset its `Content-Range` names; the head of a part is held (bounded), never its body.
struct Multipart {
    delimiter: Vec<u8>,
    head: Vec<u8>,
    /// In a part's body: the next offset and the bytes left.
    body: Option<(u64, u64)>,
    parts: Vec<(u64, u64)>,
    done: bool,
}

impl Multipart {
    fn new(boundary: &str) -> Multipart {
        Multipart {
            delimiter: format!("--{boundary}").into_bytes(),
            head: Vec::new(),
            body: None,
            parts: Vec::new(),
            done: false,
        }
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut PartSink<'_>,
        shown: &str,
    ) -> Result<(), TransferError> {
        let bad = |what: &str| TransferError::Download {
            url: shown.to_string(),
            detail: format!("the multipart answer is malformed: {what}"),
        };
        while !data.is_empty() {
            if let Some((offset, left)) = self.body {
                let take = (left as usize).min(data.len());
                out(offset, &data[..take])?;
                data = &data[take..];
                self.body =
                    (left > take as u64).then_some((offset + take as u64, left - take as u64));
                continue;
            }
            if self.done {
                // The epilogue: ignored, but bounded by the caller's length check.
                return Ok(());
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.len() > MAX_PART_HEAD {
                return Err(bad("a part's head is too long"));
            }
            let Some(at) = find(&self.head, &self.delimiter) else {
                continue;
            };
            let after = &self.head[at + self.delimiter.len()..];
            if after.len() < 2 {
                continue;
            }
            if after.starts_with(b"--") {
                self.done = true;
                continue;
            }
            let Some(end) = find(after, b"\r\n\r\n") else {
                continue;
            };
            let headers = String::from_utf8_lossy(&after[..end]).into_owned();
            let range = headers
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-range")
                        .then(|| parse_content_range(value))
                        .flatten()
                })
                .ok_or_else(|| bad("a part without a Content-Range"))?;
            if self.parts.len() >= 4096 {
                return Err(bad("too many parts"));
            }
            self.parts.push(range);
            self.body = Some((range.0, range.1 - range.0));
            self.head.clear();
        }
        Ok(())
    }

    fn finish(self, shown: &str) -> Result<Vec<(u64, u64)>, TransferError> {
        if !self.done || self.body.is_some() {
            return Err(TransferError::Download {
                url: shown.to_string(),
                detail: "the multipart answer ends early".into(),
            });
        }
        Ok(self.parts)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parts_land_at_their_offsets_whatever_the_chunking() {
        let body = b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 10-13/100\r\n\r\nabcd\r\n--XyZ\r\nContent-Range: bytes 50-51/100\r\n\r\nef\r\n--XyZ--\r\n";
        for step in [1, 3, 7, body.len()] {
            let mut parser = Multipart::new("XyZ");
            let mut got = Vec::new();
            for chunk in body.chunks(step) {
                parser
                    .feed(
                        chunk,
                        &mut |offset, bytes| {
                            got.push((offset, bytes.to_vec()));
                            Ok(())
                        },
                        "u",
                    )
                    .unwrap();
            }
            let parts = parser.finish("u").unwrap();
            assert_eq!(parts, vec![(10, 14), (50, 52)]);
            let mut flat: Vec<(u64, u8)> = Vec::new();
            for (offset, bytes) in got {
                for (i, b) in bytes.into_iter().enumerate() {
                    flat.push((offset + i as u64, b));
                }
            }
            let expected: Vec<(u64, u8)> =
                (10..14).zip(*b"abcd").chain((50..52).zip(*b"ef")).collect();
            assert_eq!(flat, expected, "step {step}");
        }
    }

    #[test]
    fn a_multipart_answer_cut_short_or_without_ranges_is_refused() {
        let mut parser = Multipart::new("b");
        parser
            .feed(
                b"--b\r\nContent-Range: bytes 0-9/10\r\n\r\nabc",
                &mut |_, _| Ok(()),
                "u",
            )
            .unwrap();
        assert!(parser.finish("u").is_err());
        let mut parser = Multipart::new("b");
        let result = parser.feed(
            b"--b\r\nContent-Type: x\r\n\r\nabc",
            &mut |_, _| Ok(()),
            "u",
        );
        assert!(result.is_err());
        let mut parser = Multipart::new("b");
        let result = parser.feed(&vec![b'x'; MAX_PART_HEAD + 1], &mut |_, _| Ok(()), "u");
        assert!(result.is_err());
    }

    #[test]
    fn boundaries_and_ranges_parse_strictly() {
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=00000000000000000001").as_deref(),
            Some("00000000000000000001")
        );
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(multipart_boundary("text/plain; boundary=x"), None);
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 10)));
        assert_eq!(parse_content_range("bytes 9-0/10"), None);
        assert_eq!(parse_content_range("bytes 0-99999999999999999999/10"), None);
    }
}
