//! Carrying a plan out in the target slot: the slots opened and hashed into tables, the plan,
//! the fetched frames from the spool, and the sink that writes verified blocks with checkpoints.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::Store;
use super::{BootedSlot, DeltaFailure, assembly_error, options};
use crate::delta::assemble::{self, AssembleError, FrameSource, LocalSlot, Locals, Write};
use crate::delta::lookup::{SlotTable, TableBuilder};
use crate::delta::plan::{self as planner, Request, Sources};
use crate::release::block_index::IndexFile;
use crate::transfer::error::TransferError;
use crate::transfer::writer::{self, WRITE_BUFFER};

/// A slot opened for the delta and its table.
pub(super) struct Opened {
    file: File,
    pub(super) table: Option<Arc<SlotTable>>,
}

pub(super) struct Booted {
    file: Option<File>,
    pub(super) table: Option<Arc<SlotTable>>,
}

/// What the assembly works on: the target slot, the booted one (when readable) and the plan
/// over them.
pub(super) struct Planned {
    pub(super) target: Opened,
    pub(super) booted: Booted,
    pub(super) plan: planner::Plan,
}

pub(super) fn slot_len(file: &File, path: &Path) -> Result<u64, TransferError> {
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
pub(super) fn make_plan(
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
pub(super) fn frame_offsets(index: &IndexFile) -> io::Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(index.header().frame_count as usize + 1);
    for frame in index.frames() {
        offsets.push(frame?.offset);
    }
    offsets.push(index.header().store_size);
    Ok(offsets)
}

/// The fetched frames, from the spool; a frame the plan did not fetch (a local copy that did
/// not match) with a request of its own.
pub(super) struct SpoolFrames {
    pub(super) spool: File,
    pub(super) offsets: Vec<u64>,
    pub(super) fetched: Vec<bool>,
    /// Where a frame the plan did not fetch comes from; `None` under the split, where the
    /// installer has no network: such a frame fails the attempt (transiently: a new plan
    /// follows).
    pub(super) store: Option<(Store, tokio::runtime::Handle)>,
    /// Bytes downloaded for frames the plan did not fetch, and the requests for them.
    pub(super) extra: Arc<AtomicU64>,
    pub(super) extra_requests: Arc<AtomicU64>,
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
pub(super) struct SlotSink<'a> {
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
pub(super) enum SinkNote {
    Written(u64),
    Checkpoint(u64),
}

/// Where the sink writes.
pub(super) struct SinkParams<'a> {
    pub(super) path: &'a Path,
    pub(super) size: u64,
    pub(super) checkpoint_interval: u64,
}

/// Carries the plan out into the target slot: verified blocks written in runs, checkpoints.
/// What was written stays on failure (synced): a resume finds it in place.
pub(super) fn assemble_into_slot(
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
