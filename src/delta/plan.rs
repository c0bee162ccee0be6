//! The fetch planner: for every block of the new image, where it comes from — zeros, the target
//! slot as it is, a copy from a local slot, or the store — and the HTTP Range requests that
//! fetch the store's part, with nearby ranges merged.
//!
//! A plan is made in one pass over the index (one or two table lookups a block) and kept in two
//! unnamed files in a scratch directory, so that a 2 GiB image's plan costs no more memory than
//! a 320 MiB one's: the steps (runs of blocks with one action) and the needed store ranges.
//! Reading it back ([`Plan::steps`], [`Plan::requests`]) is sequential.
//!
//! The plan proposes; the executor verifies. A block copied from a local slot is read, hashed
//! and compared with the signed index before it is written; one that does not match (the slot
//! changed since its table was built) is fetched instead — [`Action::Copy`] and [`Action::Keep`]
//! carry the block's store position for that. Blocks are written in ascending order: a copy from
//! the target slot is only planned from a block after the one being written, which is still
//! unwritten then (a resume from a checkpoint re-verifies it anyway).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::delta::lookup::SlotTable;
use crate::release::block_index::{BlockLocation, Frame, Frames, IndexFile, MAX_SECTIONS};

/// Where a reused block is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The running system's slot (never written).
    Booted,
    /// The slot being written, before its block is overwritten.
    Target,
}

/// What to do for a run of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Write zeros.
    Zero,
    /// The target slot already holds these blocks where they belong: nothing to write (the
    /// read-back still checks them). `ordinal` is the first block's place in the store.
    Keep { ordinal: u64 },
    /// Copy blocks `from..` of `slot`. `ordinal` is the first block's place in the store, for
    /// when the copy does not verify.
    Copy { slot: Slot, from: u64, ordinal: u64 },
    /// Take stored blocks `ordinal..` from the fetched frames.
    Fetch { ordinal: u64 },
}

/// A run of image blocks with one action; consecutive blocks map to consecutive sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub blocks: Range<u64>,
    pub action: Action,
}

/// Bytes of the store to fetch, and the frames they cover (some only because a gap between two
/// needed ranges was merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRange {
    pub offset: u64,
    pub len: u64,
    pub frames: Range<u64>,
}

impl StoreRange {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The value for an HTTP `Range: bytes=` header (inclusive end).
    pub fn http(&self) -> String {
        format!("{}-{}", self.offset, self.end() - 1)
    }
}

/// One HTTP request: one range, or several when the server answers multi-range requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub ranges: Vec<StoreRange>,
}

impl Request {
    /// The `Range` header's value.
    pub fn range_header(&self) -> String {
        let ranges: Vec<String> = self.ranges.iter().map(StoreRange::http).collect();
        format!("bytes={}", ranges.join(","))
    }

    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Gaps up to this many bytes between needed ranges are always fetched along: a separate
    /// range costs more (headers, a part boundary, on a single-range server a round trip).
    pub min_gap: u64,
    /// Gaps larger than this are never merged: a request costs less than fetching them.
    pub max_gap: u64,
    /// Aim for at most this many requests; larger gaps are merged (smallest first) until the
    /// ranges fit.
    pub max_requests: usize,
    /// Ranges per request: 1 for a server that answers only single ranges (S3), more when it
    /// answers multi-range requests (nginx, Apache).
    pub ranges_per_request: usize,
    /// Never merge gaps past this many bytes to download (needed frames and merged gaps):
    /// beyond it, more requests rather than more bytes. The caller passes what the full
    /// download would cost; `None`: no bound.
    pub max_download: Option<u64>,
}

impl Default for PlanOptions {
    /// The measured defaults (docs/block-index.md), for a single-range server.
    fn default() -> PlanOptions {
        PlanOptions {
            min_gap: 4096,
            // About what a cellular link carries during one round trip.
            max_gap: 64 * 1024,
            // 100 HTTP requests in all: the index and up to two probes of the server's Range
            // support come first.
            max_requests: 97,
            ranges_per_request: 1,
            max_download: None,
        }
    }
}

/// What a plan will cost, known before anything is fetched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub blocks: u64,
    pub zero_blocks: u64,
    pub kept_blocks: u64,
    pub copied_from_booted: u64,
    pub copied_from_target: u64,
    pub fetched_blocks: u64,
    /// Frames holding at least one fetched block.
    pub needed_frames: u64,
    /// Compressed bytes of those frames.
    pub needed_bytes: u64,
    /// Gaps up to this size are merged.
    pub merge_gap: u64,
    /// Bytes to download: the needed frames and the merged gaps.
    pub download_bytes: u64,
    pub ranges: u64,
    pub requests: u64,
}

/// Step records: kind, slot, then block range and source.
const STEP_RECORD: usize = 40;
const RANGE_RECORD: usize = 32;
/// Gap histogram ([`gap_bucket`]): exact up to 7 bytes, then four buckets per power of two, so
/// a chosen threshold is within 25 % of the gap it had to reach.
const GAP_BUCKETS: usize = 8 + 61 * 4;

/// The gaps between needed ranges: how many fall in each bucket, and their bytes.
#[derive(Debug, Clone)]
struct Gaps {
    count: [u64; GAP_BUCKETS],
    bytes: [u64; GAP_BUCKETS],
}

impl Gaps {
    fn new() -> Gaps {
        Gaps {
            count: [0; GAP_BUCKETS],
            bytes: [0; GAP_BUCKETS],
        }
    }

    fn add(&mut self, gap: u64) {
        let b = gap_bucket(gap);
        self.count[b] += 1;
        self.bytes[b] += gap;
    }
}

/// A made plan: its summary in memory, its steps and ranges in unnamed scratch files.
#[derive(Debug)]
pub struct Plan {
    summary: Summary,
    steps: File,
    step_count: u64,
    /// The needed ranges of each section of the store (in store order), and how many.
    ranges: Vec<(File, u64)>,
    options: PlanOptions,
}

/// The needed ranges of one section of the store, collected in image order: within a section
/// the store is in image order too, so its frames only go forward.
struct SectionRanges<'a> {
    out: BufWriter<File>,
    count: u64,
    open: Option<StoreRange>,
    frames: Option<Frames<'a>>,
    last_frame: Option<u64>,
    first_start: Option<u64>,
    last_end: u64,
}

impl<'a> SectionRanges<'a> {
    fn new(scratch: &Path) -> io::Result<Self> {
        Ok(SectionRanges {
            out: BufWriter::with_capacity(16 * 1024, tempfile::tempfile_in(scratch)?),
            count: 0,
            open: None,
            frames: None,
            last_frame: None,
            first_start: None,
            last_end: 0,
        })
    }

    /// Adds frame `n` (the frame of a fetched block); returns its size when it is newly needed.
    fn need(&mut self, index: &'a IndexFile, n: u64, gaps: &mut Gaps) -> io::Result<Option<u64>> {
        if self.last_frame == Some(n) {
            return Ok(None);
        }
        self.last_frame = Some(n);
        let frames = match &mut self.frames {
            Some(frames) => frames,
            None => self.frames.insert(index.frames_from(n)?),
        };
        let frame = advance_to(frames, n)?;
        self.first_start.get_or_insert(frame.offset);
        self.last_end = frame.offset + frame.size;
        self.open = Some(match self.open.take() {
            Some(r) if r.end() == frame.offset => StoreRange {
                len: r.len + frame.size,
                frames: r.frames.start..frame.frame + 1,
                ..r
            },
            previous => {
                if let Some(r) = previous {
                    gaps.add(frame.offset - r.end());
                    write_range(&mut self.out, &r)?;
                    self.count += 1;
                }
                StoreRange {
                    offset: frame.offset,
                    len: frame.size,
                    frames: frame.frame..frame.frame + 1,
                }
            }
        });
        Ok(Some(frame.size))
    }

    fn finish(mut self) -> io::Result<(File, u64)> {
        if let Some(r) = self.open.take() {
            write_range(&mut self.out, &r)?;
            self.count += 1;
        }
        Ok((
            self.out.into_inner().map_err(|e| e.into_error())?,
            self.count,
        ))
    }
}

/// The local slots a plan may reuse blocks from, with their tables.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sources<'a> {
    pub booted: Option<&'a SlotTable>,
    pub target: Option<&'a SlotTable>,
}

impl<'a> Sources<'a> {
    /// Only the booted slot's blocks: what a target slot that holds nothing usable offers.
    pub fn booted(table: &'a SlotTable) -> Sources<'a> {
        Sources {
            booted: Some(table),
            target: None,
        }
    }
}

/// Makes the plan for writing the image `index` describes into the target slot.
pub fn plan(
    index: &IndexFile,
    sources: Sources<'_>,
    options: PlanOptions,
    scratch: &Path,
) -> io::Result<Plan> {
    let header = index.header();
    let block_size = header.block_size;
    let (booted, target) = (
        sources.booted.filter(|t| t.block_size() == block_size),
        sources.target.filter(|t| t.block_size() == block_size),
    );

    let mut steps = StepWriter {
        out: BufWriter::with_capacity(64 * 1024, tempfile::tempfile_in(scratch)?),
        current: None,
        count: 0,
    };
    let mut sections: Vec<Option<SectionRanges>> = (0..=MAX_SECTIONS).map(|_| None).collect();
    let mut summary = Summary::default();
    let mut gaps = Gaps::new();
    let mut candidates = Vec::new();

    for entry in index.entries() {
        let entry = entry?;
        let block = entry.block;
        summary.blocks += 1;
        let action = match entry.location {
            BlockLocation::Zero => {
                summary.zero_blocks += 1;
                Action::Zero
            }
            BlockLocation::Stored { ordinal, section } => {
                let mut found = None;
                if let Some(t) = target {
                    t.candidates(&entry.hash, &mut candidates)?;
                    if candidates.contains(&(block as u32)) {
                        found = Some(Action::Keep { ordinal });
                    }
                }
                if found.is_none()
                    && let Some(b) = booted
                {
                    b.candidates(&entry.hash, &mut candidates)?;
                    if let Some(&from) = candidates.first() {
                        found = Some(Action::Copy {
                            slot: Slot::Booted,
                            from: u64::from(from),
                            ordinal,
                        });
                    }
                }
                if found.is_none()
                    && let Some(t) = target
                {
                    t.candidates(&entry.hash, &mut candidates)?;
                    if let Some(&from) = candidates.iter().find(|&&c| u64::from(c) > block) {
                        found = Some(Action::Copy {
                            slot: Slot::Target,
                            from: u64::from(from),
                            ordinal,
                        });
                    }
                }
                match found {
                    Some(Action::Keep { .. }) => summary.kept_blocks += 1,
                    Some(Action::Copy {
                        slot: Slot::Booted, ..
                    }) => summary.copied_from_booted += 1,
                    Some(_) => summary.copied_from_target += 1,
                    None => {
                        summary.fetched_blocks += 1;
                        let ranges = match &mut sections[usize::from(section)] {
                            Some(ranges) => ranges,
                            slot => slot.insert(SectionRanges::new(scratch)?),
                        };
                        if let Some(size) =
                            ranges.need(index, index.frame_of(ordinal), &mut gaps)?
                        {
                            summary.needed_frames += 1;
                            summary.needed_bytes += size;
                        }
                    }
                }
                found.unwrap_or(Action::Fetch { ordinal })
            }
        };
        steps.push(block, action)?;
    }
    steps.finish()?;
    // The gaps between one section's last range and the next one's first.
    let mut previous_end = None;
    for ranges in sections.iter().flatten() {
        if let (Some(end), Some(start)) = (previous_end, ranges.first_start) {
            gaps.add(start - end);
        }
        previous_end = Some(ranges.last_end);
    }
    let ranges = sections
        .into_iter()
        .flatten()
        .map(SectionRanges::finish)
        .collect::<io::Result<Vec<_>>>()?;
    let range_count = ranges.iter().map(|(_, n)| n).sum();

    summary.merge_gap = choose_merge_gap(&gaps, range_count, summary.needed_bytes, &options);
    let mut plan = Plan {
        summary,
        step_count: steps.count,
        steps: steps.out.into_inner().map_err(|e| e.into_error())?,
        ranges,
        options,
    };
    // The totals after merging, from the same code that makes the requests.
    let (mut download, mut merged, mut requests) = (0, 0, 0);
    for request in plan.requests() {
        let request = request?;
        requests += 1;
        merged += request.ranges.len() as u64;
        download += request.bytes();
    }
    plan.summary.download_bytes = download;
    plan.summary.ranges = merged;
    plan.summary.requests = requests;
    Ok(plan)
}

fn advance_to(frames: &mut Frames<'_>, n: u64) -> io::Result<Frame> {
    for frame in frames.by_ref() {
        let frame = frame?;
        if frame.frame == n {
            return Ok(frame);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the index has no frame {n}"),
    ))
}

fn gap_bucket(gap: u64) -> usize {
    // Exact below 8; above, four buckets per power of two (the two bits below the top one).
    if gap < 8 {
        return gap as usize;
    }
    let log = 63 - gap.leading_zeros() as usize;
    let frac = ((gap >> (log - 2)) & 3) as usize;
    8 + (log - 3) * 4 + frac
}

/// The largest gap that falls into bucket `b`, so that merging "gaps ≤ it" merges the whole
/// bucket.
fn gap_bucket_max(b: usize) -> u64 {
    let smallest = |b: usize| -> u64 {
        if b < 8 {
            return b as u64;
        }
        let log = 3 + (b - 8) / 4;
        let frac = ((b - 8) % 4) as u64;
        (4 + frac) << (log - 2)
    };
    if b + 1 >= GAP_BUCKETS {
        u64::MAX
    } else {
        smallest(b + 1) - 1
    }
}

/// The gap up to which ranges are merged: at least `min_gap`; larger while more ranges remain
/// than fit in `max_requests`, taking whole histogram buckets, smallest gaps first, up to
/// `max_gap` and as long as the bytes to download stay within `max_download`.
fn choose_merge_gap(gaps: &Gaps, ranges: u64, needed: u64, options: &PlanOptions) -> u64 {
    let fit = (options.max_requests.max(1) * options.ranges_per_request.max(1)) as u64;
    let budget = options.max_download.unwrap_or(u64::MAX);
    let mut remaining = ranges;
    let mut download = needed;
    for b in 0..GAP_BUCKETS {
        if gap_bucket_max(b) <= options.min_gap {
            remaining -= gaps.count[b];
            download += gaps.bytes[b];
        }
    }
    let mut gap = options.min_gap;
    for b in 0..GAP_BUCKETS {
        if remaining <= fit {
            break;
        }
        let max = gap_bucket_max(b);
        if max > gap && gaps.count[b] > 0 {
            if max > options.max_gap || download.saturating_add(gaps.bytes[b]) > budget {
                break;
            }
            remaining -= gaps.count[b];
            download += gaps.bytes[b];
            gap = max;
        }
    }
    gap
}

struct StepWriter {
    out: BufWriter<File>,
    current: Option<Step>,
    count: u64,
}

impl StepWriter {
    fn push(&mut self, block: u64, action: Action) -> io::Result<()> {
        if let Some(step) = &mut self.current
            && step.blocks.end == block
            && continues(&step.action, step.blocks.end - step.blocks.start, &action)
        {
            step.blocks.end += 1;
            return Ok(());
        }
        if let Some(step) = self.current.take() {
            self.write(&step)?;
        }
        self.current = Some(Step {
            blocks: block..block + 1,
            action,
        });
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(step) = self.current.take() {
            self.write(&step)?;
        }
        self.out.flush()
    }

    fn write(&mut self, step: &Step) -> io::Result<()> {
        let (kind, slot, source, ordinal) = match step.action {
            Action::Zero => (0u8, 0u8, 0, 0),
            Action::Keep { ordinal } => (1, 0, 0, ordinal),
            Action::Copy {
                slot,
                from,
                ordinal,
            } => (2, (slot == Slot::Target) as u8, from, ordinal),
            Action::Fetch { ordinal } => (3, 0, 0, ordinal),
        };
        let mut record = [0u8; STEP_RECORD];
        record[0] = kind;
        record[1] = slot;
        record[8..16].copy_from_slice(&step.blocks.start.to_le_bytes());
        record[16..24].copy_from_slice(&step.blocks.end.to_le_bytes());
        record[24..32].copy_from_slice(&source.to_le_bytes());
        record[32..40].copy_from_slice(&ordinal.to_le_bytes());
        self.count += 1;
        self.out.write_all(&record)
    }
}

/// Whether `next` continues a run of `len` blocks with action `run`: same kind, sources in step.
fn continues(run: &Action, len: u64, next: &Action) -> bool {
    match (run, next) {
        (Action::Zero, Action::Zero) => true,
        (Action::Keep { ordinal: a }, Action::Keep { ordinal: b }) => a + len == *b,
        (Action::Fetch { ordinal: a }, Action::Fetch { ordinal: b }) => a + len == *b,
        (
            Action::Copy {
                slot: s1,
                from: f1,
                ordinal: o1,
            },
            Action::Copy {
                slot: s2,
                from: f2,
                ordinal: o2,
            },
        ) => s1 == s2 && f1 + len == *f2 && o1 + len == *o2,
        _ => false,
    }
}

fn write_range(out: &mut impl Write, r: &StoreRange) -> io::Result<()> {
    let mut record = [0u8; RANGE_RECORD];
    record[..8].copy_from_slice(&r.offset.to_le_bytes());
    record[8..16].copy_from_slice(&r.len.to_le_bytes());
    record[16..24].copy_from_slice(&r.frames.start.to_le_bytes());
    record[24..32].copy_from_slice(&r.frames.end.to_le_bytes());
    out.write_all(&record)
}

/// Reads fixed-size records from an unnamed file by position, a buffer at a time.
struct Records<'a, const N: usize> {
    file: &'a File,
    next: u64,
    count: u64,
    buffer: Vec<u8>,
    buffer_start: u64,
}

impl<'a, const N: usize> Records<'a, N> {
    fn new(file: &'a File, count: u64) -> Self {
        Records {
            file,
            next: 0,
            count,
            buffer: Vec::new(),
            buffer_start: 0,
        }
    }

    fn next_record(&mut self) -> Option<io::Result<[u8; N]>> {
        if self.next >= self.count {
            return None;
        }
        let per_read = (64 * 1024 / N) as u64;
        let at = ((self.next - self.buffer_start) * N as u64) as usize;
        if self.buffer.is_empty() || at >= self.buffer.len() {
            let n = (self.count - self.next).min(per_read) as usize;
            self.buffer.resize(n * N, 0);
            self.buffer_start = self.next;
            if let Err(e) = self
                .file
                .read_exact_at(&mut self.buffer, self.next * N as u64)
            {
                self.next = self.count;
                return Some(Err(e));
            }
        }
        let at = ((self.next - self.buffer_start) * N as u64) as usize;
        self.next += 1;
        Some(Ok(self.buffer[at..at + N].try_into().unwrap()))
    }
}

fn u64_at(record: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(record[at..at + 8].try_into().unwrap())
}

impl Plan {
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The steps in image order.
    pub fn steps(&self) -> Steps<'_> {
        Steps {
            records: Records::new(&self.steps, self.step_count),
        }
    }

    /// The requests in store order: needed ranges with gaps up to the chosen size merged, up to
    /// `ranges_per_request` ranges each.
    pub fn requests(&self) -> Requests<'_> {
        Requests {
            files: &self.ranges,
            records: None,
            pending: None,
            merge_gap: self.summary.merge_gap,
            per_request: self.options.ranges_per_request.max(1),
            done: false,
        }
    }
}

pub struct Steps<'a> {
    records: Records<'a, STEP_RECORD>,
}

impl Iterator for Steps<'_> {
    type Item = io::Result<Step>;

    fn next(&mut self) -> Option<io::Result<Step>> {
        let record = match self.records.next_record()? {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let blocks = u64_at(&record, 8)..u64_at(&record, 16);
        let (source, ordinal) = (u64_at(&record, 24), u64_at(&record, 32));
        let action = match record[0] {
            0 => Action::Zero,
            1 => Action::Keep { ordinal },
            2 => Action::Copy {
                slot: if record[1] == 1 {
                    Slot::Target
                } else {
                    Slot::Booted
                },
                from: source,
                ordinal,
            },
            _ => Action::Fetch { ordinal },
        };
        Some(Ok(Step { blocks, action }))
    }
}

pub struct Requests<'a> {
    /// The sections' range files, still to read.
    files: &'a [(File, u64)],
    records: Option<Records<'a, RANGE_RECORD>>,
    pending: Option<StoreRange>,
    merge_gap: u64,
    per_request: usize,
    done: bool,
}

impl Requests<'_> {
    /// The next range after merging small gaps.
    fn next_range(&mut self) -> Option<io::Result<StoreRange>> {
        loop {
            let next = match &mut self.records {
                Some(records) => records.next_record(),
                None => None,
            };
            match next {
                None => {
                    // This section's file is read: on to the next, or the end.
                    match self.files.split_first() {
                        Some(((file, count), rest)) => {
                            self.files = rest;
                            self.records = Some(Records::new(file, *count));
                            continue;
                        }
                        None => return self.pending.take().map(Ok),
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(record)) => {
                    let r = StoreRange {
                        offset: u64_at(&record, 0),
                        len: u64_at(&record, 8),
                        frames: u64_at(&record, 16)..u64_at(&record, 24),
                    };
                    match self.pending.take() {
                        Some(p) if r.offset - p.end() <= self.merge_gap => {
                            self.pending = Some(StoreRange {
                                offset: p.offset,
                                len: r.end() - p.offset,
                                frames: p.frames.start..r.frames.end,
                            });
                        }
                        Some(p) => {
                            self.pending = Some(r);
                            return Some(Ok(p));
                        }
                        None => self.pending = Some(r),
                    }
                }
            }
        }
    }
}

impl Iterator for Requests<'_> {
    type Item = io::Result<Request>;

    fn next(&mut self) -> Option<io::Result<Request>> {
        if self.done {
            return None;
        }
        let mut ranges = Vec::new();
        while ranges.len() < self.per_request {
            match self.next_range() {
                Some(Ok(r)) => ranges.push(r),
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    self.done = true;
                    break;
                }
            }
        }
        (!ranges.is_empty()).then_some(Ok(Request { ranges }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::delta::assemble::{AssemblyStats, FrameSource, LocalSlot, Locals, Write, assemble};
    use crate::delta::lookup::TableBuilder;
    use crate::release::block_index::{IndexFile, testing};
    const BS: usize = 4096;

    /// 4 KiB that no other seed gives.
    fn block(seed: u32) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        (0..BS / 32)
            .flat_map(|k| Sha256::digest(format!("{seed}/{k}")).to_vec())
            .collect()
    }

    /// An old image of distinct blocks with zeros between.
    fn old_image() -> Vec<u8> {
        (0..200u32)
            .flat_map(|i| if i % 9 == 4 { vec![0; BS] } else { block(i) })
            .collect()
    }

    /// A slot in memory: the booted one, or the target being written.
    struct MemorySlot(std::cell::RefCell<Vec<u8>>);

    impl LocalSlot for MemorySlot {
        fn read_block(&self, block: u64, block_size: u32, out: &mut [u8]) -> io::Result<()> {
            let at = (block * u64::from(block_size)) as usize;
            out.copy_from_slice(&self.0.borrow()[at..at + out.len()]);
            Ok(())
        }
    }

    /// The store, serving the frames the plan's requests cover and counting the others (which
    /// an executor fetches with a request of its own).
    struct Store<'a> {
        store: &'a [u8],
        frames: Vec<Frame>,
        requested: Vec<bool>,
        unplanned: u64,
    }

    impl FrameSource for Store<'_> {
        fn compressed(&mut self, frame: u64) -> io::Result<Vec<u8>> {
            let f = self.frames[frame as usize];
            let range = f.offset as usize..(f.offset + f.size) as usize;
            if !range.clone().all(|at| self.requested[at]) {
                self.unplanned += 1;
            }
            Ok(self.store[range].to_vec())
        }
    }

    /// Carries out a plan with [`assemble`], the way the installer will: the target is written
    /// in ascending order as it is read; returns the image and the frames the plan had not
    /// fetched.
    /// [`execute`], which must assemble `expected` from what the plan fetched alone.
    fn execute_as_planned(
        plan: &Plan,
        index: &IndexFile,
        store: &[u8],
        booted: &[u8],
        target: &mut Vec<u8>,
        expected: &[u8],
    ) -> AssemblyStats {
        let (image, stats, unplanned) = execute(plan, index, store, booted, target);
        assert!(image == expected, "the assembled image differs");
        assert_eq!((stats.fallback_blocks, unplanned), (0, 0), "{stats:?}");
        stats
    }

    fn execute(
        plan: &Plan,
        index: &IndexFile,
        store: &[u8],
        booted: &[u8],
        target: &mut Vec<u8>,
    ) -> (Vec<u8>, AssemblyStats, u64) {
        let h = index.header().clone();
        let mut requested = vec![false; store.len()];
        for request in plan.requests() {
            for r in request.unwrap().ranges {
                requested[r.offset as usize..r.end() as usize].fill(true);
            }
        }
        let mut frames = Store {
            store,
            frames: index.frames().map(Result::unwrap).collect(),
            requested,
            unplanned: 0,
        };
        let booted = MemorySlot(std::cell::RefCell::new(booted.to_vec()));
        let target_slot = MemorySlot(std::cell::RefCell::new(std::mem::take(target)));
        let mut next = 0u64;
        let stats = assemble(
            plan,
            index,
            Locals {
                booted: Some(&booted),
                target: Some(&target_slot),
            },
            &mut frames,
            &mut |block, write| {
                assert_eq!(block, next, "blocks come in ascending order");
                next += 1;
                if let Write::Bytes(bytes) = write {
                    let at = block as usize * BS;
                    let mut t = target_slot.0.borrow_mut();
                    if t.len() < at + bytes.len() {
                        t.resize(at + bytes.len(), 0xee);
                    }
                    t[at..at + bytes.len()].copy_from_slice(bytes);
                }
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(next, index.block_count());
        *target = target_slot.0.into_inner();
        (
            target[..h.image_size as usize].to_vec(),
            stats,
            frames.unplanned,
        )
    }

    fn table(dir: &Path, name: &str, bytes: &[u8]) -> SlotTable {
        let slot = dir.join(name);
        std::fs::write(&slot, bytes).unwrap();
        let out = dir.join(format!("{name}.table"));
        TableBuilder::new(BS as u32)
            .from_slot(
                &File::open(&slot).unwrap(),
                bytes.len() as u64,
                &[0; 32],
                &out,
            )
            .unwrap();
        SlotTable::open(&out).unwrap()
    }

    #[test]
    fn moved_blocks_are_copied_and_only_new_ones_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let old = old_image();
        // The new image: the old blocks shifted by 3 (files moved), 10 new blocks in two runs,
        // one short last block.
        let mut new: Vec<u8> = vec![0; 3 * BS];
        new.extend_from_slice(&old[..100 * BS]);
        for i in 0..10 {
            new.extend_from_slice(&block(10_000 + i));
            if i == 4 {
                new.extend_from_slice(&old[150 * BS..170 * BS]);
            }
        }
        new.extend_from_slice(&block(20_000)[..777]);
        let (index, store) = testing::expanded(dir.path(), &new, BS as u32, 2);
        let booted = table(dir.path(), "booted", &old);
        let sources = Sources::booted(&booted);
        let plan = plan(&index, sources, PlanOptions::default(), dir.path()).unwrap();
        let s = *plan.summary();
        assert_eq!(s.blocks, index.block_count());
        assert_eq!(
            s.fetched_blocks, 11,
            "the ten new blocks and the short last one"
        );
        assert_eq!(
            s.zero_blocks + s.copied_from_booted + s.fetched_blocks,
            s.blocks
        );
        assert!(s.needed_frames <= 11 && s.needed_frames >= 6, "{s:?}");
        assert!(s.download_bytes >= s.needed_bytes);
        assert!(s.download_bytes < store.len() as u64, "{s:?}");
        let mut target = vec![0xaa; new.len()];
        let stats = execute_as_planned(&plan, &index, &store, &old, &mut target, &new);
        assert_eq!(stats.fetched_blocks, 11);
    }

    #[test]
    fn the_target_slot_is_kept_in_place_and_copied_only_from_unwritten_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let old = old_image();
        // The target holds the new image's block 0..50 in place, and blocks 60.. only at later
        // positions (not yet overwritten when they are needed) and one at an earlier one.
        let mut new = old[..50 * BS].to_vec();
        new.extend_from_slice(&block(5000)); // 50: only at target position 120
        new.extend_from_slice(&block(5001)); // 51: only at target position 10
        new.extend_from_slice(&old[60 * BS..100 * BS]);
        let mut target_bytes = old.clone();
        target_bytes[120 * BS..121 * BS].copy_from_slice(&block(5000));
        target_bytes[10 * BS..11 * BS].copy_from_slice(&block(5001));
        let (index, store) = testing::expanded(dir.path(), &new, BS as u32, 4);
        let target = table(dir.path(), "target", &target_bytes);
        let sources = Sources {
            booted: None,
            target: Some(&target),
        };
        let plan = plan(&index, sources, PlanOptions::default(), dir.path()).unwrap();
        let steps: Vec<Step> = plan.steps().map(Result::unwrap).collect();
        let step_of = |block: u64| {
            steps
                .iter()
                .find(|s| s.blocks.contains(&block))
                .unwrap()
                .action
        };
        assert!(matches!(step_of(0), Action::Keep { .. }));
        assert!(matches!(
            step_of(50),
            Action::Copy {
                slot: Slot::Target,
                from: 120,
                ..
            }
        ));
        // Block 51's content sits at target block 10, which is written before 51: fetched.
        assert!(
            matches!(step_of(51), Action::Fetch { .. }),
            "{:?}",
            step_of(51)
        );
        // And block 10, whose old content the target no longer holds anywhere.
        assert!(
            matches!(step_of(10), Action::Fetch { .. }),
            "{:?}",
            step_of(10)
        );
        assert_eq!(plan.summary().fetched_blocks, 2);
        let mut target_now = target_bytes.clone();
        let stats = execute_as_planned(&plan, &index, &store, &old, &mut target_now, &new);
        // Blocks 0..50 but the 6 zero ones and block 10.
        assert_eq!(stats.kept_blocks, 43, "{stats:?}");
        assert_eq!(stats.fetched_blocks, 2);
    }

    #[test]
    fn a_stale_table_costs_a_fetch_not_a_wrong_block() {
        let dir = tempfile::tempdir().unwrap();
        let old = old_image();
        let new = old[..120 * BS].to_vec();
        let (index, store) = testing::expanded(dir.path(), &new, BS as u32, 1);
        let booted = table(dir.path(), "booted", &old);
        let plan = plan(
            &index,
            Sources::booted(&booted),
            PlanOptions::default(),
            dir.path(),
        )
        .unwrap();
        assert_eq!(plan.summary().fetched_blocks, 0);
        assert_eq!(plan.summary().requests, 0);
        // The booted slot changed after its table was built: the copy does not verify, and
        // that one block comes from its frame, which the plan had not fetched.
        let mut changed = old.clone();
        changed[7 * BS] ^= 1;
        let mut target = vec![0; new.len()];
        let (image, stats, unplanned) = execute(&plan, &index, &store, &changed, &mut target);
        assert_eq!(
            image, new,
            "a changed local block is never written as it is"
        );
        assert_eq!((stats.fallback_blocks, unplanned), (1, 1));
    }

    #[test]
    fn requests_stay_within_the_limit_and_cover_every_needed_frame() {
        let dir = tempfile::tempdir().unwrap();
        let old = old_image();
        // Every third block new: many small ranges.
        let new: Vec<u8> = (0..300u32)
            .flat_map(|i| {
                if i % 3 == 0 {
                    block(90_000 + i)
                } else {
                    old[(i as usize % 200) * BS..][..BS].to_vec()
                }
            })
            .collect();
        let (index, store) = testing::expanded(dir.path(), &new, BS as u32, 1);
        let booted = table(dir.path(), "booted", &old);
        let sources = Sources::booted(&booted);
        for (max_requests, per_request) in [(1000, 1), (10, 1), (3, 1), (2, 16), (1, 1)] {
            let options = PlanOptions {
                min_gap: 0,
                max_gap: u64::MAX,
                max_requests,
                ranges_per_request: per_request,
                max_download: None,
            };
            let plan = plan(&index, sources, options, dir.path()).unwrap();
            let s = *plan.summary();
            assert_eq!(s.fetched_blocks, 100);
            assert!(s.requests <= max_requests as u64, "{max_requests}: {s:?}");
            let requests: Vec<Request> = plan.requests().map(Result::unwrap).collect();
            let mut last_end = 0;
            for request in &requests {
                assert!(request.ranges.len() <= per_request);
                for r in &request.ranges {
                    assert!(r.offset >= last_end, "ranges ascend without overlap");
                    last_end = r.end();
                }
            }
            if max_requests == 1000 {
                assert_eq!(s.download_bytes, s.needed_bytes, "no gap merged");
                // One request per run of needed frames in the store: fewer than the 100 blocks
                // where two new blocks of one section lie side by side in the store.
                assert_eq!(s.requests, s.ranges);
                assert!((50..=100).contains(&s.requests), "{s:?}");
            }
            let mut target = vec![0; new.len()];
            let (image, _, unplanned) = execute(&plan, &index, &store, &old, &mut target);
            assert_eq!(image, new);
            assert_eq!(unplanned, 0, "every fetched block's frame was requested");
        }
        let one = plan(
            &index,
            sources,
            PlanOptions {
                min_gap: 0,
                max_gap: u64::MAX,
                max_requests: 1,
                ranges_per_request: 1,
                max_download: None,
            },
            dir.path(),
        )
        .unwrap();
        let request = one.requests().next().unwrap().unwrap();
        assert!(request.range_header().starts_with("bytes="));
        assert!(!request.range_header().contains(','));
    }

    #[test]
    fn gap_buckets_are_ordered_and_their_bounds_hold() {
        let mut last = 0;
        for gap in [
            0u64,
            1,
            2,
            3,
            4,
            5,
            7,
            8,
            9,
            12,
            15,
            16,
            100,
            4096,
            4097,
            65536,
            1 << 40,
            u64::MAX,
        ] {
            let b = gap_bucket(gap);
            assert!(b >= last, "{gap}");
            last = b;
            assert!(gap <= gap_bucket_max(b), "{gap} in bucket {b}");
            if b > 0 {
                assert!(gap > gap_bucket_max(b - 1), "{gap} above bucket {}", b - 1);
            }
        }
    }

    #[test]
    fn merge_gap_grows_only_until_the_ranges_fit_and_within_the_budget() {
        let mut gaps = Gaps::new();
        // 10 ranges: 9 gaps, five of 1 KiB, four of 1 MiB.
        for _ in 0..5 {
            gaps.add(1024);
        }
        for _ in 0..4 {
            gaps.add(1 << 20);
        }
        let options = |max_requests| PlanOptions {
            min_gap: 0,
            max_gap: u64::MAX,
            max_requests,
            ranges_per_request: 1,
            max_download: None,
        };
        assert_eq!(choose_merge_gap(&gaps, 10, 0, &options(10)), 0);
        let gap = choose_merge_gap(&gaps, 10, 0, &options(5));
        assert!((1024..1 << 20).contains(&gap), "{gap}");
        let gap = choose_merge_gap(&gaps, 10, 0, &options(1));
        assert!(gap >= 1 << 20, "{gap}");
        // Multi-range requests: 10 ranges fit in 2 requests of 5.
        let multi = PlanOptions {
            ranges_per_request: 5,
            ..options(2)
        };
        assert_eq!(choose_merge_gap(&gaps, 10, 0, &multi), 0);
        // A budget of 1 MiB: the 1 KiB gaps may be merged, the 1 MiB ones not, whatever the
        // request count.
        let bounded = PlanOptions {
            max_download: Some(1 << 20),
            ..options(1)
        };
        let gap = choose_merge_gap(&gaps, 10, 100_000, &bounded);
        assert!((1024..1 << 20).contains(&gap), "{gap}");
        let gap = choose_merge_gap(&gaps, 10, 2 << 20, &bounded);
        assert_eq!(
            gap, 0,
            "the needed bytes alone are over the budget: nothing merged"
        );
        // Gaps over max_gap stay requests of their own.
        let capped = PlanOptions {
            max_gap: 64 * 1024,
            ..options(1)
        };
        let gap = choose_merge_gap(&gaps, 10, 0, &capped);
        assert!((1024..=64 * 1024).contains(&gap), "{gap}");
    }
}
