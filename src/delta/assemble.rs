//! Carrying out a plan: every block of the new image, in ascending order, checked against the
//! signed index before it is handed on. Local copies are read and hashed first; one that does not
//! match (the slot changed since its table was built, or a resume overwrote it) is taken from
//! its frame in the store instead. Fetched frames are decompressed with the index's dictionary
//! and each of their blocks checked too. Nothing unverified leaves this module.
//!
//! Where the bytes come from and where they go are the caller's: [`LocalSlot`] reads a block
//! of a local slot, [`FrameSource`] gives the compressed bytes of a frame of the store (from the
//! planned requests, or a request of its own for a frame the plan did not fetch), the sink
//! writes a block into the target slot.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::delta::plan::{Action, Plan, Slot};
use crate::reason::ReasonCode;
use crate::release::Refusal;
use crate::release::block_index::{FrameDecoder, IndexFile};

/// A local slot, read by block.
pub trait LocalSlot {
    fn read_block(&self, block: u64, block_size: u32, out: &mut [u8]) -> io::Result<()>;
}

impl LocalSlot for File {
    fn read_block(&self, block: u64, block_size: u32, out: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(out, block * u64::from(block_size))
    }
}

/// The store's frames, by number, as compressed bytes (not yet trusted).
pub trait FrameSource {
    fn compressed(&mut self, frame: u64) -> io::Result<Vec<u8>>;
}

/// What happens to one block of the target slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<'a> {
    /// Write these (verified) bytes.
    Bytes(&'a [u8]),
    /// The target already holds the block (verified): nothing to write.
    Kept,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblyStats {
    pub zero_blocks: u64,
    pub kept_blocks: u64,
    pub copied_blocks: u64,
    pub fetched_blocks: u64,
    /// Blocks the plan reused but whose local copy did not match: taken from the store.
    pub fallback_blocks: u64,
    /// Frames decompressed (a frame used by consecutive blocks counts once).
    pub frames_decoded: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A fetched frame or block is not what the signed index says.
    #[error("{0}")]
    Refused(Refusal),
    #[error("cannot read a local slot or the index: {0}")]
    Local(#[source] io::Error),
    #[error("cannot fetch frame {frame} of the block store: {source}")]
    Fetch {
        frame: u64,
        #[source]
        source: io::Error,
    },
    #[error("cannot write block {block}: {source}")]
    Sink {
        block: u64,
        #[source]
        source: io::Error,
    },
}

impl AssembleError {
    /// The reason code an install would fail with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            AssembleError::Refused(refusal) => refusal.code,
            AssembleError::Local(_) | AssembleError::Sink { .. } => ReasonCode::SlotIo,
            AssembleError::Fetch { .. } => ReasonCode::DownloadFailed,
        }
    }
}

/// The local slots a plan reuses from.
#[derive(Clone, Copy, Default)]
pub struct Locals<'a> {
    pub booted: Option<&'a dyn LocalSlot>,
    pub target: Option<&'a dyn LocalSlot>,
}

/// Carries out `plan`: calls `sink` once for every block of the image, in ascending order, with
/// verified bytes (or [`Write::Kept`]).
pub fn assemble(
    plan: &Plan,
    index: &IndexFile,
    locals: Locals<'_>,
    frames: &mut dyn FrameSource,
    sink: &mut dyn FnMut(u64, Write<'_>) -> io::Result<()>,
) -> Result<AssemblyStats, AssembleError> {
    let header = index.header();
    let block_size = header.block_size;
    let dictionary = index.dictionary().map_err(AssembleError::Local)?;
    // zstd takes any bytes as a raw-content dictionary; one it refuses is the index's fault.
    let decoder = FrameDecoder::new(&dictionary).map_err(|e| {
        AssembleError::Refused(Refusal::new(
            ReasonCode::Malformed,
            format!("block index: its dictionary is not usable ({e})"),
        ))
    })?;
    let mut stored = StoredBlocks {
        index,
        frames,
        decoder,
        decoded: None,
        frames_decoded: 0,
    };
    let mut stats = AssemblyStats::default();
    let zeros = vec![0u8; block_size as usize];
    let mut local = vec![0u8; block_size as usize];
    let mut hashes = vec![[0u8; 32]; 1];

    for step in plan.steps() {
        let step = step.map_err(AssembleError::Local)?;
        for (k, block) in step.blocks.clone().enumerate() {
            let k = k as u64;
            let len = header.block_len(block);
            index
                .read_hashes(block, &mut hashes)
                .map_err(AssembleError::Local)?;
            let expected = hashes[0];
            let verified = |bytes: &[u8]| {
                <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(bytes)) == expected
            };
            let write = |sink: &mut dyn FnMut(u64, Write<'_>) -> io::Result<()>, w: Write<'_>| {
                sink(block, w).map_err(|source| AssembleError::Sink { block, source })
            };
            let local_source = match step.action {
                Action::Zero => {
                    stats.zero_blocks += 1;
                    write(sink, Write::Bytes(&zeros[..len]))?;
                    continue;
                }
                Action::Fetch { ordinal } => {
                    stats.fetched_blocks += 1;
                    let bytes = stored.checked(ordinal + k, block, verified)?;
                    write(sink, Write::Bytes(&bytes))?;
                    continue;
                }
                Action::Keep { ordinal } => (locals.target, block, ordinal + k, true),
                Action::Copy {
                    slot,
                    from,
                    ordinal,
                } => {
                    let source = match slot {
                        Slot::Booted => locals.booted,
                        Slot::Target => locals.target,
                    };
                    (source, from + k, ordinal + k, false)
                }
            };
            let (source, from, ordinal, keep) = local_source;
            let found = match source {
                Some(slot) => {
                    let bytes = &mut local[..len];
                    slot.read_block(from, block_size, bytes)
                        .map_err(AssembleError::Local)?;
                    verified(bytes)
                }
                None => false,
            };
            if found && keep {
                stats.kept_blocks += 1;
                write(sink, Write::Kept)?;
            } else if found {
                stats.copied_blocks += 1;
                write(sink, Write::Bytes(&local[..len]))?;
            } else {
                stats.fallback_blocks += 1;
                let bytes = stored.checked(ordinal, block, verified)?;
                write(sink, Write::Bytes(&bytes))?;
            }
        }
    }
    stats.frames_decoded = stored.frames_decoded;
    Ok(stats)
}

fn mismatch(block: u64) -> AssembleError {
    AssembleError::Refused(Refusal::new(
        ReasonCode::HashMismatch,
        format!(
            "block {block} from the block store does not have the SHA-256 the signed index gives"
        ),
    ))
}

/// The block store's blocks, each from its frame (decoded once for consecutive blocks).
struct StoredBlocks<'a, 'd> {
    index: &'a IndexFile,
    frames: &'a mut dyn FrameSource,
    decoder: FrameDecoder<'d>,
    /// The last decoded frame: its number and bytes.
    decoded: Option<(u64, Vec<u8>)>,
    frames_decoded: u64,
}

impl StoredBlocks<'_, '_> {
    /// Stored block `ordinal`, as the image's block `block`: refused unless `verified` (its
    /// SHA-256 is the one the signed index gives).
    fn checked(
        &mut self,
        ordinal: u64,
        block: u64,
        verified: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<u8>, AssembleError> {
        let bytes = self.block(ordinal)?;
        if !verified(&bytes) {
            return Err(mismatch(block));
        }
        Ok(bytes)
    }

    fn block(&mut self, ordinal: u64) -> Result<Vec<u8>, AssembleError> {
        let index = self.index;
        let frame = index.frame_of(ordinal);
        if self.decoded.as_ref().is_none_or(|(f, _)| *f != frame) {
            let compressed = self
                .frames
                .compressed(frame)
                .map_err(|source| AssembleError::Fetch { frame, source })?;
            let mut out = Vec::new();
            self.decoder
                .decode(&compressed, index.frame_len(frame), &mut out)
                .map_err(AssembleError::Refused)?;
            self.decoded = Some((frame, out));
            self.frames_decoded += 1;
        }
        let (_, bytes) = self.decoded.as_ref().expect("decoded above");
        let first = index.frame_blocks(frame).start;
        let at: usize = (first..ordinal).map(|o| index.stored_len(o)).sum();
        Ok(bytes[at..at + index.stored_len(ordinal)].to_vec())
    }
}
