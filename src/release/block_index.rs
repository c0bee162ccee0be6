//! The block index: one SHA-256 per fixed-size block of an image, and where each block lives in
//! the release's block store. One index serves delta downloads (a block is looked up by its hash
//! in the local slots, the missing ones are fetched from the store), verification on every core
//! (block `i` is checked against entry `i`) and resume. The format is specified in
//! `docs/block-index.md`; this module is its only reader.
//!
//! The index is bound to the signed manifest by its SHA-256 (`images.<class>.chunks`); it binds
//! the store in turn: the store's name and size, every frame's size, every block's hash. A device
//! therefore trusts a byte of the store only after the block it decompresses to matched its
//! entry.
//!
//! The store holds the image's non-zero blocks, each in one of a few *sections* that the index
//! records per block; within a section in image order, sections one after the other. The builder
//! puts the blocks that are almost all zero bytes (a filesystem's inode tables, directories,
//! extent blocks: small, scattered, changed by every update) into a section of their own, so that
//! what a delta needs of them is one short range of the store instead of hundreds.
//!
//! Two encodings of one layout: as served, the body (dictionary, hashes, sections, frame sizes) is one
//! zstd frame, which turns the runs of zero blocks into almost nothing; on the device it is
//! expanded ([`expand`]) into a file with the raw body, which [`IndexFile`] reads by offset —
//! entry `i` at a fixed place, so a 2 GiB image's 16 MiB of hashes never need to be in memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::reason::ReasonCode;
use crate::release::Refusal;
use crate::release::manifest::{ChunkIndexRef, Image, MAX_IMAGE_SIZE};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The first bytes of every block index (version 1 and later).
pub const MAGIC: [u8; 8] = *b"UABLKIDX";
/// The version this agent reads and writes.
pub const VERSION: u16 = 1;
/// The fixed part of the header; the store's name follows it.
pub const FIXED_HEADER_LEN: usize = 72;
pub const MAX_STORE_NAME_LEN: usize = 128;
pub const MAX_HEADER_LEN: usize = FIXED_HEADER_LEN + MAX_STORE_NAME_LEN;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 64 * 1024;
/// A frame holds at most this many blocks: 1 MiB of 4 KiB blocks, so that a device decompresses
/// one frame into a bounded buffer.
pub const MAX_BLOCKS_PER_FRAME: u32 = 256;
/// The largest trained zstd dictionary an index may carry.
pub const MAX_DICTIONARY_SIZE: u32 = 1024 * 1024;
/// The window of the served body's zstd frame (1 MiB): what the device's decoder may allocate.
pub const BODY_WINDOW_LOG: u32 = 20;
/// Bytes per hash entry.
pub const ENTRY_LEN: u64 = 32;
/// Bytes per frame size.
pub const FRAME_SIZE_LEN: u64 = 4;
/// Sections of the store: a block's section is 0 (all zero, not stored) or 1 to this.
pub const MAX_SECTIONS: u8 = 8;

const FLAG_BODY_ZSTD: u16 = 1;
const KNOWN_FLAGS: u16 = FLAG_BODY_ZSTD;

/// The header of a block index: everything but the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexHeader {
    /// Bytes per block; the last block of the image may be shorter.
    pub block_size: u32,
    /// Bytes of the image the index describes (the manifest's `size`).
    pub image_size: u64,
    /// Blocks in the store: the image's blocks that are not all zero (duplicates included),
    /// section by section, in image order within a section.
    pub stored_blocks: u64,
    /// Frames of the store. A frame never spans two sections: each section starts a frame.
    pub frame_count: u64,
    /// Stored blocks per zstd frame of the store; a section's last frame may hold fewer.
    pub blocks_per_frame: u32,
    /// Bytes of the trained zstd dictionary the frames are compressed with (0: none).
    pub dictionary_size: u32,
    /// Bytes of the store file: the frames, back to back.
    pub store_size: u64,
    /// The store's file name, resolved against the index's URL (a sibling file).
    pub store_name: String,
    /// Whether the body in this file is one zstd frame (as served) or raw (as expanded).
    pub body_compressed: bool,
    /// Bytes of the body in this file.
    pub body_size: u64,
}

impl IndexHeader {
    pub fn block_count(&self) -> u64 {
        self.image_size.div_ceil(u64::from(self.block_size))
    }

    /// Bytes of block `block` (the last one may be short).
    pub fn block_len(&self, block: u64) -> usize {
        let start = block * u64::from(self.block_size);
        (self.image_size - start).min(u64::from(self.block_size)) as usize
    }

    /// Bytes of the raw body: dictionary, one hash and one section per block, one size per
    /// frame.
    pub fn raw_body_size(&self) -> u64 {
        u64::from(self.dictionary_size)
            + self.block_count() * (ENTRY_LEN + 1)
            + self.frame_count * FRAME_SIZE_LEN
    }

    /// Bytes of the header as encoded.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.store_name.len()
    }

    /// Where the hashes start, relative to the body.
    fn hashes_offset(&self) -> u64 {
        u64::from(self.dictionary_size)
    }

    fn sections_offset(&self) -> u64 {
        self.hashes_offset() + self.block_count() * ENTRY_LEN
    }

    fn frame_sizes_offset(&self) -> u64 {
        self.sections_offset() + self.block_count()
    }

    /// The largest compressed frame the store may hold: zstd's bound for a full frame.
    pub fn max_frame_size(&self) -> u64 {
        let raw = u64::from(self.blocks_per_frame) * u64::from(self.block_size);
        zstd::zstd_safe::compress_bound(raw as usize) as u64
    }

    /// The bytes of the header, for the builder and for [`expand`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.body_compressed {
            FLAG_BODY_ZSTD
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.stored_blocks.to_le_bytes());
        out.extend_from_slice(&self.frame_count.to_le_bytes());
        out.extend_from_slice(&self.blocks_per_frame.to_le_bytes());
        out.extend_from_slice(&self.dictionary_size.to_le_bytes());
        out.extend_from_slice(&self.store_size.to_le_bytes());
        out.extend_from_slice(&self.body_size.to_le_bytes());
        out.extend_from_slice(&(self.store_name.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0; 6]);
        debug_assert_eq!(out.len(), FIXED_HEADER_LEN);
        out.extend_from_slice(self.store_name.as_bytes());
        out
    }

    /// Parses the fixed part of a header: the first [`FIXED_HEADER_LEN`] bytes. Returns the
    /// header with an empty store name and the name's length, which the caller reads next.
    fn parse_fixed(bytes: &[u8]) -> Result<(IndexHeader, usize), Refusal> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(refused(
                ReasonCode::UnsupportedFormat,
                "it does not start with the block index magic \"UABLKIDX\" (a list of raw chunk digests, as release tools before the block index wrote, is not read)",
            ));
        }
        if bytes.len() < FIXED_HEADER_LEN {
            return Err(malformed(format!(
                "its header is cut short ({} of {FIXED_HEADER_LEN} bytes)",
                bytes.len()
            )));
        }
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let version = u16_at(8);
        if version != VERSION {
            return Err(refused(
                ReasonCode::UnsupportedFormat,
                format!("version {version} is not supported (this agent reads version {VERSION})"),
            ));
        }
        let flags = u16_at(10);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(refused(
                ReasonCode::UnsupportedFormat,
                format!("unknown flags {flags:#06x}"),
            ));
        }
        if bytes[66..72] != [0; 6] {
            return Err(malformed("reserved header bytes are not zero"));
        }
        let header = IndexHeader {
            block_size: u32_at(12),
            image_size: u64_at(16),
            stored_blocks: u64_at(24),
            frame_count: u64_at(32),
            blocks_per_frame: u32_at(40),
            dictionary_size: u32_at(44),
            store_size: u64_at(48),
            body_size: u64_at(56),
            store_name: String::new(),
            body_compressed: flags & FLAG_BODY_ZSTD != 0,
        };
        let name_len = usize::from(u16_at(64));
        header.validate_numbers()?;
        if name_len == 0 || name_len > MAX_STORE_NAME_LEN {
            return Err(malformed(format!(
                "the store name is {name_len} bytes long (1 to {MAX_STORE_NAME_LEN})"
            )));
        }
        Ok((header, name_len))
    }

    /// Parses a whole header from the start of `bytes` (which may go on with the body).
    pub fn parse(bytes: &[u8]) -> Result<IndexHeader, Refusal> {
        let (mut header, name_len) = IndexHeader::parse_fixed(bytes)?;
        let name = bytes
            .get(FIXED_HEADER_LEN..FIXED_HEADER_LEN + name_len)
            .ok_or_else(|| malformed("the store name is cut short"))?;
        header.store_name = check_store_name(name)?;
        Ok(header)
    }

    fn validate_numbers(&self) -> Result<(), Refusal> {
        let malformed = |msg: String| Err(malformed(msg));
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return malformed(format!(
                "block size {} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                self.block_size
            ));
        }
        if self.image_size == 0 || self.image_size > MAX_IMAGE_SIZE {
            return Err(refused(
                ReasonCode::TooLarge,
                format!(
                    "image size {} is out of range (1 byte to 1 TiB)",
                    self.image_size
                ),
            ));
        }
        if self.stored_blocks > self.block_count() {
            return malformed(format!(
                "{} stored blocks, more than the image's {} blocks",
                self.stored_blocks,
                self.block_count()
            ));
        }
        if self.blocks_per_frame == 0 || self.blocks_per_frame > MAX_BLOCKS_PER_FRAME {
            return malformed(format!(
                "{} blocks per frame (1 to {MAX_BLOCKS_PER_FRAME})",
                self.blocks_per_frame
            ));
        }
        if self.dictionary_size > MAX_DICTIONARY_SIZE {
            return Err(refused(
                ReasonCode::TooLarge,
                format!(
                    "a dictionary of {} bytes (at most {MAX_DICTIONARY_SIZE})",
                    self.dictionary_size
                ),
            ));
        }
        let frames = self.frame_count;
        // Full frames, but for at most one short frame a section.
        let fewest = self
            .stored_blocks
            .div_ceil(u64::from(self.blocks_per_frame));
        let most = (fewest + u64::from(MAX_SECTIONS) - 1).min(self.stored_blocks);
        if frames < fewest || frames > most {
            return malformed(format!(
                "{frames} frames cannot hold {} stored blocks in frames of {}",
                self.stored_blocks, self.blocks_per_frame
            ));
        }
        // Every frame is at least one byte and at most zstd's bound for a full frame.
        if self.store_size < frames || self.store_size > frames * self.max_frame_size() {
            return malformed(format!(
                "a store of {} bytes cannot hold {frames} frames",
                self.store_size
            ));
        }
        let raw = self.raw_body_size();
        let body_ok = if self.body_compressed {
            // A zstd frame is never larger than its bound, nor empty.
            self.body_size > 0 && self.body_size <= zstd_bound(raw)
        } else {
            self.body_size == raw
        };
        if !body_ok {
            return malformed(format!(
                "a body of {} bytes does not fit {raw} bytes of entries{}",
                self.body_size,
                if self.body_compressed {
                    " compressed"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }

    /// Checks that the index describes the manifest's image: same size, and the block size the
    /// manifest names.
    pub fn check_against(&self, image: &Image, chunks: &ChunkIndexRef) -> Result<(), Refusal> {
        if self.image_size != image.size {
            return Err(malformed(format!(
                "it describes an image of {} bytes, the manifest one of {}",
                self.image_size, image.size
            )));
        }
        if u64::from(self.block_size) != chunks.chunk_size {
            return Err(malformed(format!(
                "its block size is {}, the manifest's chunk_size {}",
                self.block_size, chunks.chunk_size
            )));
        }
        Ok(())
    }
}

fn zstd_bound(raw: u64) -> u64 {
    // zstd's ZSTD_COMPRESSBOUND, in u64 (the body of a 1 TiB image does not fit a usize on
    // 32-bit devices, and such an index is refused by its size anyway).
    raw + (raw >> 8)
        + if raw < (128 << 10) {
            ((128 << 10) - raw) >> 11
        } else {
            0
        }
}

/// A store name is a plain file name: the store is a sibling of the index, whatever the server.
fn check_store_name(name: &[u8]) -> Result<String, Refusal> {
    let ok = !name.is_empty()
        && name.len() <= MAX_STORE_NAME_LEN
        && name[0] != b'.'
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(String::from_utf8(name.to_vec()).expect("ASCII"))
    } else {
        Err(malformed(
            "the store name is not a plain file name (letters, digits, '.', '-', '_'; not starting with '.')",
        ))
    }
}

fn refused(code: ReasonCode, what: impl AsRef<str>) -> Refusal {
    Refusal::new(code, format!("block index: {}", what.as_ref()))
}

/// The index is not what it claims to be: the refusal almost every check makes.
fn malformed(what: impl AsRef<str>) -> Refusal {
    refused(ReasonCode::Malformed, what)
}

/// Why an index could not be taken: the index itself is refused (a stable reason), or local IO
/// failed (reading the source or the state directory).
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    Refused(Refusal),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl From<Refusal> for IndexError {
    fn from(refusal: Refusal) -> IndexError {
        IndexError::Refused(refusal)
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> IndexError {
    move |source| IndexError::Io {
        context: context.into(),
        source,
    }
}

/// SHA-256 of `len` zero bytes: the entry of an all-zero block, which the store leaves out.
pub fn zero_hash(len: usize) -> Hash {
    const CHUNK: [u8; 4096] = [0; 4096];
    let mut hasher = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK.len());
        hasher.update(&CHUNK[..n]);
        left -= n;
    }
    hasher.finalize().into()
}

/// Where one block of the image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLocation {
    /// All zero: not in the store.
    Zero,
    /// The `ordinal`-th block of the store, in section `section` (1 to [`MAX_SECTIONS`]).
    Stored { ordinal: u64, section: u8 },
}

/// One entry, as [`IndexFile::entries`] yields them in image order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    pub block: u64,
    pub hash: Hash,
    pub location: BlockLocation,
}

/// An expanded block index on local storage, read by offset: the hash of any block, the frames
/// in order. Holds no entries in memory, so any number of threads may read it at once (`&self`,
/// positioned reads).
#[derive(Debug)]
pub struct IndexFile {
    file: File,
    header: IndexHeader,
    body_start: u64,
    zero: Hash,
    last_zero: Hash,
    /// The ordinal of each section's first block (index 0 unused: zero blocks are not stored).
    section_starts: [u64; MAX_SECTIONS as usize + 1],
    /// Stored blocks of each section.
    section_counts: [u64; MAX_SECTIONS as usize + 1],
    /// The first frame of each section.
    section_frames: [u64; MAX_SECTIONS as usize + 1],
    /// The ordinal of the image's last block when it is short and stored.
    short_ordinal: Option<u64>,
}

/// Entries read per positioned read when iterating (64 KiB).
const ITER_ENTRIES: usize = 2048;

impl IndexFile {
    /// Opens an expanded index and checks all of it: header, length, that the stored-block
    /// count matches the non-zero entries and that the frame sizes add up to the store's size.
    pub fn open(path: &Path) -> Result<IndexFile, IndexError> {
        let context = || format!("cannot read block index {}", path.display());
        let file = File::open(path).map_err(io_error(context()))?;
        let mut head = vec![0u8; MAX_HEADER_LEN];
        let n = read_up_to(&file, 0, &mut head).map_err(io_error(context()))?;
        let header = IndexHeader::parse(&head[..n])?;
        if header.body_compressed {
            return Err(malformed(format!(
                "{} is not expanded (its body is compressed)",
                path.display()
            ))
            .into());
        }
        let body_start = header.encoded_len() as u64;
        let len = file.metadata().map_err(io_error(context()))?.len();
        if len != body_start + header.body_size {
            return Err(malformed(format!(
                "{} is {len} bytes, its header says {}",
                path.display(),
                body_start + header.body_size
            ))
            .into());
        }
        let last_len = header.block_len(header.block_count() - 1);
        let mut index = IndexFile {
            zero: zero_hash(header.block_size as usize),
            last_zero: zero_hash(last_len),
            file,
            header,
            body_start,
            section_starts: [0; MAX_SECTIONS as usize + 1],
            section_counts: [0; MAX_SECTIONS as usize + 1],
            section_frames: [0; MAX_SECTIONS as usize + 1],
            short_ordinal: None,
        };
        index.check_counts().map_err(|e| match e {
            IndexError::Io { source, .. } => io_error(context())(source),
            refused => refused,
        })?;
        Ok(index)
    }

    /// Counts the blocks of each section (which fixes where each section starts in the store)
    /// and checks the sections against the hashes: section 0 exactly for all-zero blocks.
    fn check_counts(&mut self) -> Result<(), IndexError> {
        let mut counts = [0u64; MAX_SECTIONS as usize + 1];
        let mut hashes = vec![[0u8; 32]; ITER_ENTRIES];
        let mut sections = vec![0u8; ITER_ENTRIES];
        let mut first = 0;
        while first < self.block_count() {
            let n = (self.block_count() - first).min(ITER_ENTRIES as u64) as usize;
            self.read_hashes(first, &mut hashes[..n])
                .and_then(|()| self.read_sections(first, &mut sections[..n]))
                .map_err(io_error("entries"))?;
            for k in 0..n {
                let block = first + k as u64;
                let section = sections[k];
                if section > MAX_SECTIONS {
                    return Err(malformed(format!(
                        "block {block} is in section {section} (0 to {MAX_SECTIONS})"
                    ))
                    .into());
                }
                if (section == 0) != self.is_zero(block, &hashes[k]) {
                    return Err(malformed(format!(
                        "block {block} is in section {section}, but its hash says it is {}",
                        if section == 0 {
                            "not all zero"
                        } else {
                            "all zero"
                        }
                    ))
                    .into());
                }
                counts[section as usize] += 1;
            }
            first += n as u64;
        }
        let stored: u64 = counts[1..].iter().sum();
        if stored != self.header.stored_blocks {
            return Err(malformed(format!(
                "{stored} blocks are not zero, the header says {} are stored",
                self.header.stored_blocks
            ))
            .into());
        }
        let (mut start, mut frame) = (0, 0);
        let per = u64::from(self.header.blocks_per_frame);
        for (section, &count) in counts.iter().enumerate().skip(1) {
            self.section_starts[section] = start;
            self.section_frames[section] = frame;
            start += count;
            frame += count.div_ceil(per);
        }
        self.section_counts = counts;
        if frame != self.header.frame_count {
            return Err(malformed(format!(
                "its sections fill {frame} frames, the header says {}",
                self.header.frame_count
            ))
            .into());
        }
        // The last block is the last of its section.
        let last = self.block_count() - 1;
        let mut last_section = [0u8];
        self.read_sections(last, &mut last_section)
            .map_err(io_error("entries"))?;
        let last_section = usize::from(last_section[0]);
        if self.header.block_len(last) < self.header.block_size as usize && last_section > 0 {
            self.short_ordinal = Some(self.section_starts[last_section] + counts[last_section] - 1);
        }
        let max = self.header.max_frame_size();
        let mut total = 0u64;
        for frame in self.frames() {
            let frame = frame.map_err(io_error("frame sizes"))?;
            if frame.size == 0 || frame.size > max {
                return Err(malformed(format!(
                    "frame {} is {} bytes (1 to {max})",
                    frame.frame, frame.size
                ))
                .into());
            }
            total += frame.size;
        }
        if total != self.header.store_size {
            return Err(malformed(format!(
                "the frames add up to {total} bytes, the header says the store has {}",
                self.header.store_size
            ))
            .into());
        }
        Ok(())
    }

    pub fn header(&self) -> &IndexHeader {
        &self.header
    }

    /// Bytes of the stored block `ordinal`.
    pub fn stored_len(&self, ordinal: u64) -> usize {
        if Some(ordinal) == self.short_ordinal {
            self.header.block_len(self.block_count() - 1)
        } else {
            self.header.block_size as usize
        }
    }

    /// The section a stored block is in.
    fn section_of_ordinal(&self, ordinal: u64) -> usize {
        (1..=MAX_SECTIONS as usize)
            .rev()
            .find(|&s| self.section_counts[s] > 0 && self.section_starts[s] <= ordinal)
            .unwrap_or(1)
    }

    /// The frame that holds stored block `ordinal`.
    pub fn frame_of(&self, ordinal: u64) -> u64 {
        let s = self.section_of_ordinal(ordinal);
        self.section_frames[s]
            + (ordinal - self.section_starts[s]) / u64::from(self.header.blocks_per_frame)
    }

    /// The stored blocks (ordinals) frame `frame` holds.
    pub fn frame_blocks(&self, frame: u64) -> std::ops::Range<u64> {
        let s = (1..=MAX_SECTIONS as usize)
            .rev()
            .find(|&s| self.section_counts[s] > 0 && self.section_frames[s] <= frame)
            .unwrap_or(1);
        let per = u64::from(self.header.blocks_per_frame);
        let first = self.section_starts[s] + (frame - self.section_frames[s]) * per;
        let end = self.section_starts[s] + self.section_counts[s];
        first..(first + per).min(end)
    }

    /// Bytes frame `frame` decompresses to.
    pub fn frame_len(&self, frame: u64) -> usize {
        self.frame_blocks(frame).map(|o| self.stored_len(o)).sum()
    }

    pub fn block_count(&self) -> u64 {
        self.header.block_count()
    }

    /// The signed hash of block `block`.
    pub fn hash(&self, block: u64) -> io::Result<Hash> {
        let mut hash = [0u8; 32];
        self.read_hashes(block, std::slice::from_mut(&mut hash))?;
        Ok(hash)
    }

    /// The hashes of `out.len()` blocks from `first` on, in one positioned read.
    pub fn read_hashes(&self, first: u64, out: &mut [Hash]) -> io::Result<()> {
        let end = first + out.len() as u64;
        if end > self.block_count() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "blocks {first}..{end} are past the index's {} blocks",
                    self.block_count()
                ),
            ));
        }
        let at = self.body_start + self.header.hashes_offset() + first * ENTRY_LEN;
        self.file.read_exact_at(out.as_flattened_mut(), at)
    }

    /// The sections of `out.len()` blocks from `first` on, in one positioned read.
    fn read_sections(&self, first: u64, out: &mut [u8]) -> io::Result<()> {
        let at = self.body_start + self.header.sections_offset() + first;
        self.file.read_exact_at(out, at)
    }

    /// Whether `hash` is the hash of block `block` being all zero.
    pub fn is_zero(&self, block: u64, hash: &Hash) -> bool {
        if block + 1 == self.block_count() {
            *hash == self.last_zero
        } else {
            *hash == self.zero
        }
    }

    /// Whether `bytes` are block `block` of the image.
    pub fn verify_block(&self, block: u64, bytes: &[u8]) -> io::Result<bool> {
        Ok(bytes.len() == self.header.block_len(block)
            && <Hash>::from(Sha256::digest(bytes)) == self.hash(block)?)
    }

    /// The trained dictionary of the store's frames (empty: none).
    pub fn dictionary(&self) -> io::Result<Vec<u8>> {
        let mut dictionary = vec![0u8; self.header.dictionary_size as usize];
        self.file.read_exact_at(&mut dictionary, self.body_start)?;
        Ok(dictionary)
    }

    /// Every block in image order, with its hash and place in the store.
    pub fn entries(&self) -> Entries<'_> {
        self.entries_from(0)
    }

    /// The blocks from `first` on. A block's place in the store depends on the blocks of its
    /// section before it, so starting in the middle costs a scan of the entries before `first`.
    pub fn entries_from(&self, first: u64) -> Entries<'_> {
        Entries {
            index: self,
            next: 0,
            ordinals: self.section_starts,
            hashes: Vec::new(),
            sections: Vec::new(),
            buffer_start: 0,
            skip_to: first,
        }
    }

    /// The frames of the store in order, with their byte offsets.
    pub fn frames(&self) -> Frames<'_> {
        Frames {
            index: self,
            next: 0,
            offset: 0,
            buffer: Vec::new(),
            buffer_start: 0,
        }
    }

    /// The frames from `first` on (the offset of `first` costs a scan of the sizes before it).
    pub fn frames_from(&self, first: u64) -> io::Result<Frames<'_>> {
        let mut frames = self.frames();
        while frames.next < first.min(self.header.frame_count) {
            frames.next().expect("before the count")?;
        }
        Ok(frames)
    }
}

/// [`read_full`] from `at` in `file`, with positional reads: the file's cursor, which others
/// may share, is left alone.
fn read_up_to(file: &File, at: u64, buf: &mut [u8]) -> io::Result<usize> {
    struct At<'f> {
        file: &'f File,
        at: u64,
    }
    impl Read for At<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.file.read_at(buf, self.at)?;
            self.at += n as u64;
            Ok(n)
        }
    }
    read_full(&mut At { file, at }, buf)
}

/// Iterator over an index's entries, reading `ITER_ENTRIES` hashes and sections at a time.
pub struct Entries<'a> {
    index: &'a IndexFile,
    next: u64,
    /// The next ordinal in each section.
    ordinals: [u64; MAX_SECTIONS as usize + 1],
    hashes: Vec<Hash>,
    sections: Vec<u8>,
    buffer_start: u64,
    skip_to: u64,
}

impl Iterator for Entries<'_> {
    type Item = io::Result<BlockEntry>;

    fn next(&mut self) -> Option<io::Result<BlockEntry>> {
        loop {
            let count = self.index.block_count();
            if self.next >= count {
                return None;
            }
            let in_buffer = self.next - self.buffer_start;
            if self.hashes.is_empty() || in_buffer >= self.hashes.len() as u64 {
                let n = (count - self.next).min(ITER_ENTRIES as u64) as usize;
                self.hashes.resize(n, [0; 32]);
                self.sections.resize(n, 0);
                self.buffer_start = self.next;
                let read = self
                    .index
                    .read_hashes(self.next, &mut self.hashes)
                    .and_then(|()| self.index.read_sections(self.next, &mut self.sections));
                if let Err(e) = read {
                    self.next = count;
                    return Some(Err(e));
                }
            }
            let block = self.next;
            let at = (block - self.buffer_start) as usize;
            let (hash, section) = (self.hashes[at], self.sections[at].min(MAX_SECTIONS));
            self.next += 1;
            // Checked when the index was opened: section 0 is exactly the zero blocks.
            let location = if section == 0 {
                BlockLocation::Zero
            } else {
                let ordinal = &mut self.ordinals[section as usize];
                *ordinal += 1;
                BlockLocation::Stored {
                    ordinal: *ordinal - 1,
                    section,
                }
            };
            if block < self.skip_to {
                continue;
            }
            return Some(Ok(BlockEntry {
                block,
                hash,
                location,
            }));
        }
    }
}

/// One frame of the store: where its compressed bytes are, and which stored blocks it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub frame: u64,
    /// Byte offset in the store.
    pub offset: u64,
    /// Compressed bytes.
    pub size: u64,
}

pub struct Frames<'a> {
    index: &'a IndexFile,
    next: u64,
    offset: u64,
    buffer: Vec<u8>,
    buffer_start: u64,
}

impl Iterator for Frames<'_> {
    type Item = io::Result<Frame>;

    fn next(&mut self) -> Option<io::Result<Frame>> {
        let count = self.index.header.frame_count;
        if self.next >= count {
            return None;
        }
        let per_read = ITER_ENTRIES as u64 * 8;
        let in_buffer = (self.next - self.buffer_start) * FRAME_SIZE_LEN;
        if self.buffer.is_empty() || in_buffer >= self.buffer.len() as u64 {
            let n = (count - self.next).min(per_read);
            self.buffer.resize((n * FRAME_SIZE_LEN) as usize, 0);
            self.buffer_start = self.next;
            let at = self.index.body_start
                + self.index.header.frame_sizes_offset()
                + self.next * FRAME_SIZE_LEN;
            if let Err(e) = self.index.file.read_exact_at(&mut self.buffer, at) {
                self.next = count;
                return Some(Err(e));
            }
        }
        let at = ((self.next - self.buffer_start) * FRAME_SIZE_LEN) as usize;
        let size = u64::from(u32::from_le_bytes(
            self.buffer[at..at + 4].try_into().unwrap(),
        ));
        let frame = Frame {
            frame: self.next,
            offset: self.offset,
            size,
        };
        self.next += 1;
        self.offset += size;
        Some(Ok(frame))
    }
}

/// Reads a served block index from `source`, checks it against the manifest (its SHA-256 and
/// what it describes), and writes it expanded to `dest` (atomically: a temporary file in the same
/// directory, synced, renamed). Memory stays bounded: the body is decompressed as a stream with
/// a window of at most [`BODY_WINDOW_LOG`].
pub fn expand(
    source: impl Read,
    image: &Image,
    chunks: &ChunkIndexRef,
    dest: &Path,
) -> Result<IndexFile, IndexError> {
    let expected: Hash = hex::decode(&chunks.sha256)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| malformed("the manifest's sha256 is not hex"))?;
    let mut source = HashingReader {
        inner: source,
        hasher: Sha256::new(),
        read: 0,
    };
    let read_context = format!("cannot read the block index {}", chunks.url);
    let mut fixed = [0u8; FIXED_HEADER_LEN];
    let n = read_full(&mut source, &mut fixed).map_err(io_error(read_context.clone()))?;
    let (mut header, name_len) = IndexHeader::parse_fixed(&fixed[..n])?;
    let mut name = vec![0u8; name_len];
    if read_full(&mut source, &mut name).map_err(io_error(read_context.clone()))? != name_len {
        return Err(malformed("the store name is cut short").into());
    }
    header.store_name = check_store_name(&name)?;
    header.check_against(image, chunks)?;

    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write_context = format!("cannot write the block index {}", dest.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-index-")
        .tempfile_in(dir)
        .map_err(io_error(write_context.clone()))?;
    let raw_size = header.raw_body_size();
    let local = IndexHeader {
        body_compressed: false,
        body_size: raw_size,
        ..header.clone()
    };
    let mut out = io::BufWriter::with_capacity(64 * 1024, tmp.as_file_mut());
    out.write_all(&local.encode())
        .map_err(io_error(write_context.clone()))?;
    let body = (&mut source).take(header.body_size);
    let copied = if header.body_compressed {
        let mut decoder = zstd::stream::read::Decoder::new(body)
            .and_then(|mut d| {
                d.window_log_max(BODY_WINDOW_LOG)?;
                Ok(d.single_frame())
            })
            .map_err(io_error(read_context.clone()))?;
        let copied = copy_exactly(&mut decoder, &mut out, raw_size);
        // The body is one frame: nothing of it may follow the frame.
        let mut rest = decoder.finish();
        if copied.is_ok()
            && read_full(&mut rest, &mut [0u8; 1]).map_err(io_error(read_context.clone()))? != 0
        {
            return Err(malformed("its body holds more than one zstd frame").into());
        }
        copied
    } else {
        copy_exactly(&mut body.take(raw_size + 1), &mut out, raw_size)
    };
    match copied {
        Ok(()) => {}
        Err(CopyError::Read(e))
            if header.body_compressed && e.kind() != io::ErrorKind::Interrupted =>
        {
            // The zstd decoder reports a bad frame as an IO error: it is the index that is bad.
            return Err(malformed(format!(
                "its body is not a valid zstd frame of {raw_size} bytes ({})",
                crate::release::escape_for_log(&e.to_string(), 120)
            ))
            .into());
        }
        Err(CopyError::Read(e)) => return Err(io_error(read_context)(e)),
        Err(CopyError::Write(e)) => return Err(io_error(write_context)(e)),
        Err(CopyError::Length(got)) => {
            return Err(malformed(format!(
                "its body holds {got} bytes of entries, the header says {raw_size}"
            ))
            .into());
        }
    }
    out.flush().map_err(io_error(write_context.clone()))?;
    drop(out);
    // Everything the header announced was read: nothing may follow.
    let mut extra = [0u8; 1];
    if read_full(&mut source, &mut extra).map_err(io_error(read_context))? != 0 {
        return Err(malformed("bytes follow the body its header announces").into());
    }
    let actual: Hash = source.hasher.finalize().into();
    if actual != expected {
        return Err(refused(
            ReasonCode::HashMismatch,
            format!(
                "its SHA-256 is {}, the signed manifest says {}",
                hex::encode(actual),
                chunks.sha256
            ),
        )
        .into());
    }
    tmp.as_file()
        .sync_all()
        .map_err(io_error(write_context.clone()))?;
    // Checked whole before it takes the place of an earlier one (the open file stays valid
    // across the rename).
    let index = IndexFile::open(tmp.path())?;
    tmp.persist(dest)
        .map_err(|e| io_error(write_context.clone())(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(write_context))?;
    Ok(index)
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Fills `buf` from `source` as far as it goes; fewer bytes only at its end.
pub(crate) fn read_full(source: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    /// The source ended early or went on past the expected length (the count read).
    Length(u64),
}

/// Copies exactly `len` bytes; one more byte from the source is an error, as is one less.
fn copy_exactly(source: &mut impl Read, out: &mut impl Write, len: u64) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = match source.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        if n == 0 {
            break;
        }
        let take = (len - copied).min(n as u64) as usize;
        if take < n {
            return Err(CopyError::Length(copied + n as u64));
        }
        out.write_all(&buf[..take]).map_err(CopyError::Write)?;
        copied += take as u64;
    }
    if copied != len {
        return Err(CopyError::Length(copied));
    }
    Ok(())
}

/// Decompresses frames of the store with the index's dictionary, into a buffer bounded by the
/// frame's declared content (never more than [`MAX_BLOCKS_PER_FRAME`] blocks).
pub struct FrameDecoder<'d> {
    decompressor: zstd::bulk::Decompressor<'d>,
}

impl<'d> FrameDecoder<'d> {
    pub fn new(dictionary: &'d [u8]) -> io::Result<FrameDecoder<'d>> {
        let mut decompressor = if dictionary.is_empty() {
            zstd::bulk::Decompressor::new()?
        } else {
            zstd::bulk::Decompressor::with_dictionary(dictionary)?
        };
        // A frame is at most MAX_BLOCKS_PER_FRAME * MAX_BLOCK_SIZE = 16 MiB.
        decompressor.window_log_max(24)?;
        Ok(FrameDecoder { decompressor })
    }

    /// Decompresses `compressed` into `out` (cleared first), which must come to exactly
    /// `expected_len` bytes. The bytes are not yet trusted: each block is checked against the
    /// index by the caller before it is used.
    pub fn decode(
        &mut self,
        compressed: &[u8],
        expected_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        out.clear();
        // One byte of room past the expected length: a frame that fills it is too long.
        out.reserve(expected_len + 1);
        let n = self
            .decompressor
            .decompress_to_buffer(compressed, out)
            .map_err(|e| {
                Refusal::new(
                    ReasonCode::DecompressFailed,
                    format!(
                        "a frame of the block store does not decompress ({})",
                        crate::release::escape_for_log(&e.to_string(), 120)
                    ),
                )
            })?;
        if n != expected_len {
            return Err(Refusal::new(
                ReasonCode::HashMismatch,
                format!(
                    "a frame of the block store holds {n} bytes, the index says {expected_len}"
                ),
            ));
        }
        Ok(())
    }
}

/// Served indexes and stores for tests, made without the operator's builder (which the device
/// build leaves out): frames compressed without a dictionary.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// The served index (body compressed) and the store of `image`.
    pub(crate) fn served(image: &[u8], block_size: u32, per_frame: u32) -> (Vec<u8>, Vec<u8>) {
        let bs = block_size as usize;
        let blocks: Vec<&[u8]> = image.chunks(bs).collect();
        let hashes: Vec<Hash> = blocks.iter().map(|b| Sha256::digest(b).into()).collect();
        let stored: Vec<&[u8]> = blocks
            .iter()
            .copied()
            .filter(|b| b.iter().any(|&x| x != 0))
            .collect();
        // Two sections, by a rule of the test's own (the device never needs the builder's):
        // blocks whose first byte is even, then the others.
        let section = |b: &[u8]| {
            if b.iter().all(|&x| x == 0) {
                0u8
            } else {
                1 + b[0] % 2
            }
        };
        let sections: Vec<u8> = blocks.iter().map(|b| section(b)).collect();
        let mut store = Vec::new();
        let mut sizes = Vec::new();
        for s in [1u8, 2] {
            let in_section: Vec<&[u8]> =
                stored.iter().copied().filter(|b| section(b) == s).collect();
            for frame in in_section.chunks(per_frame as usize) {
                let compressed = zstd::bulk::compress(&frame.concat(), 3).unwrap();
                sizes.push(compressed.len() as u32);
                store.extend_from_slice(&compressed);
            }
        }
        let mut body: Vec<u8> = hashes.iter().flatten().copied().collect();
        body.extend_from_slice(&sections);
        for size in &sizes {
            body.extend_from_slice(&size.to_le_bytes());
        }
        let compressed_body = zstd::bulk::compress(&body, 3).unwrap();
        let header = IndexHeader {
            block_size,
            image_size: image.len() as u64,
            stored_blocks: stored.len() as u64,
            frame_count: sizes.len() as u64,
            blocks_per_frame: per_frame,
            dictionary_size: 0,
            store_size: store.len() as u64,
            store_name: "image.store".into(),
            body_compressed: true,
            body_size: compressed_body.len() as u64,
        };
        let mut index = header.encode();
        index.extend_from_slice(&compressed_body);
        (index, store)
    }

    /// The manifest's view of `image` and of its served index.
    pub(crate) fn manifest_refs(
        image: &[u8],
        index: &[u8],
        block_size: u32,
    ) -> (Image, ChunkIndexRef) {
        let chunks = ChunkIndexRef {
            url: "https://updates.example.com/image.index".into(),
            sha256: hex::encode(Sha256::digest(index)),
            chunk_size: u64::from(block_size),
        };
        let mut entry = Image::uncompressed(
            "https://updates.example.com/image",
            image.len() as u64,
            Sha256::digest(image).into(),
        );
        entry.chunks = Some(chunks.clone());
        (entry, chunks)
    }

    /// Expands the served index of `image` into `dir`.
    pub(crate) fn expanded(
        dir: &Path,
        image: &[u8],
        block_size: u32,
        per_frame: u32,
    ) -> (IndexFile, Vec<u8>) {
        let (index, store) = served(image, block_size, per_frame);
        let (entry, chunks) = manifest_refs(image, &index, block_size);
        let file = expand(&index[..], &entry, &chunks, &dir.join("image.index")).unwrap();
        (file, store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> IndexHeader {
        IndexHeader {
            block_size: 4096,
            image_size: 10 * 4096 + 100,
            stored_blocks: 5,
            frame_count: 3,
            blocks_per_frame: 2,
            dictionary_size: 0,
            store_size: 300,
            store_name: "rootfs.img.store".into(),
            body_compressed: false,
            body_size: 11 * 33 + 3 * 4,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = header();
        let bytes = h.encode();
        assert_eq!(bytes.len(), h.encoded_len());
        assert_eq!(IndexHeader::parse(&bytes).unwrap(), h);
    }

    fn refusal_of(bytes: &[u8]) -> Refusal {
        IndexHeader::parse(bytes).unwrap_err()
    }

    #[test]
    fn foreign_and_newer_files_are_unsupported_not_malformed() {
        let legacy = [0xabu8; 64];
        assert_eq!(refusal_of(&legacy).code, ReasonCode::UnsupportedFormat);
        let mut newer = header().encode();
        newer[8] = 2;
        let refusal = refusal_of(&newer);
        assert_eq!(refusal.code, ReasonCode::UnsupportedFormat);
        assert!(refusal.message.contains("version 2"), "{}", refusal.message);
        let mut flagged = header().encode();
        flagged[10] = 0x80;
        assert_eq!(refusal_of(&flagged).code, ReasonCode::UnsupportedFormat);
    }

    #[test]
    fn every_out_of_range_field_is_refused() {
        type Edit = Box<dyn Fn(&mut IndexHeader)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("block size", Box::new(|h| h.block_size = 1000)),
            ("block size", Box::new(|h| h.block_size = 1 << 20)),
            ("image size", Box::new(|h| h.image_size = 0)),
            (
                "image size",
                Box::new(|h| h.image_size = MAX_IMAGE_SIZE + 1),
            ),
            ("stored blocks", Box::new(|h| h.stored_blocks = 12)),
            ("per frame", Box::new(|h| h.blocks_per_frame = 0)),
            ("per frame", Box::new(|h| h.blocks_per_frame = 257)),
            ("frames cannot", Box::new(|h| h.frame_count = 2)),
            ("frames cannot", Box::new(|h| h.frame_count = 6)),
            ("dictionary", Box::new(|h| h.dictionary_size = 2 << 20)),
            ("store of", Box::new(|h| h.store_size = 2)),
            ("store of", Box::new(|h| h.store_size = u64::MAX / 2)),
            ("body of", Box::new(|h| h.body_size += 1)),
            (
                "body of",
                Box::new(|h| {
                    h.body_compressed = true;
                    h.body_size = 0;
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut h = header();
            edit(&mut h);
            let refusal = refusal_of(&h.encode());
            assert!(
                matches!(refusal.code, ReasonCode::Malformed | ReasonCode::TooLarge),
                "{what}: {refusal}"
            );
            assert!(
                refusal.message.contains(what),
                "{what}: {}",
                refusal.message
            );
        }
    }

    #[test]
    fn store_names_are_plain_file_names() {
        for bad in ["", "../x", ".hidden", "a/b", "a b", "x\u{7f}", "é"] {
            let mut h = header();
            h.store_name = bad.into();
            let bytes = h.encode();
            assert_eq!(refusal_of(&bytes).code, ReasonCode::Malformed, "{bad:?}");
        }
        let mut h = header();
        h.store_name = "x".repeat(MAX_STORE_NAME_LEN + 1);
        assert_eq!(refusal_of(&h.encode()).code, ReasonCode::Malformed);
    }

    #[test]
    fn a_header_cut_anywhere_is_refused() {
        let bytes = header().encode();
        for len in 0..bytes.len() {
            assert!(IndexHeader::parse(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut reserved = bytes.clone();
        reserved[60] = 1;
        assert_eq!(refusal_of(&reserved).code, ReasonCode::Malformed);
    }

    #[test]
    fn zero_hash_matches_sha256_of_zeros() {
        assert_eq!(zero_hash(4096), <Hash>::from(Sha256::digest([0u8; 4096])));
        assert_eq!(zero_hash(100), <Hash>::from(Sha256::digest([0u8; 100])));
        assert_eq!(
            zero_hash(9000),
            <Hash>::from(Sha256::digest(vec![0u8; 9000]))
        );
    }

    /// An image of 4 KiB blocks: distinct content, zeros, a duplicate, a short last block.
    fn sample_image() -> Vec<u8> {
        let mut image = Vec::new();
        for i in 0..23u32 {
            let block: Vec<u8> = if i % 5 == 2 {
                vec![0; 4096]
            } else if i == 17 {
                image[4096..8192].to_vec()
            } else {
                (0..4096u32)
                    .map(|j| (j.wrapping_mul(i + 7) % 251) as u8)
                    .collect()
            };
            image.extend_from_slice(&block);
        }
        image.extend_from_slice(&[9u8; 1000]);
        image
    }

    #[test]
    fn expanded_index_gives_every_hash_and_the_frames_decode_to_the_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let image = sample_image();
        let (index, store) = testing::expanded(dir.path(), &image, 4096, 3);
        let h = index.header().clone();
        assert_eq!(index.block_count(), 24);
        assert_eq!(h.block_len(23), 1000);
        assert_eq!(h.stored_blocks, 24 - 5);
        for (i, block) in image.chunks(4096).enumerate() {
            assert_eq!(
                index.hash(i as u64).unwrap(),
                <Hash>::from(Sha256::digest(block))
            );
            assert!(index.verify_block(i as u64, block).unwrap());
        }
        assert!(!index.verify_block(0, &image[4096..8192]).unwrap());
        assert!(index.hash(24).is_err(), "past the end");
        // Decode every frame and place its blocks by the entries' ordinals.
        let frames: Vec<Frame> = index.frames().map(Result::unwrap).collect();
        // Two sections (first byte even, odd) of frames of 3.
        assert!(frames.len() >= 7 && frames.len() <= 8, "{}", frames.len());
        assert_eq!(frames.len() as u64, h.frame_count);
        assert_eq!(
            frames.last().unwrap().offset + frames.last().unwrap().size,
            h.store_size
        );
        let mut decoder = FrameDecoder::new(&[]).unwrap();
        // Every stored block, by ordinal.
        let mut stored: Vec<Vec<u8>> = Vec::new();
        let mut out = Vec::new();
        for frame in &frames {
            let bytes = &store[frame.offset as usize..(frame.offset + frame.size) as usize];
            decoder
                .decode(bytes, index.frame_len(frame.frame), &mut out)
                .unwrap();
            let mut at = 0;
            for ordinal in index.frame_blocks(frame.frame) {
                let len = index.stored_len(ordinal);
                stored.push(out[at..at + len].to_vec());
                at += len;
            }
        }
        assert_eq!(stored.len() as u64, h.stored_blocks);
        let mut rebuilt = Vec::new();
        let mut seen_sections = std::collections::BTreeSet::new();
        for entry in index.entries() {
            let entry = entry.unwrap();
            let len = h.block_len(entry.block);
            match entry.location {
                BlockLocation::Zero => rebuilt.extend(std::iter::repeat_n(0u8, len)),
                BlockLocation::Stored { ordinal, .. } => {
                    assert_eq!(stored[ordinal as usize].len(), len);
                    seen_sections.insert(stored[ordinal as usize][0] % 2);
                    rebuilt.extend_from_slice(&stored[ordinal as usize]);
                }
            }
        }
        assert_eq!(seen_sections.len(), 2, "both sections are used");
        assert_eq!(rebuilt, image);
        // Entries from the middle keep the ordinals a scan from the start gives.
        let all: Vec<BlockEntry> = index.entries().map(Result::unwrap).collect();
        let tail: Vec<BlockEntry> = index.entries_from(10).map(Result::unwrap).collect();
        assert_eq!(&all[10..], &tail[..]);
    }

    #[test]
    fn a_frame_that_decompresses_to_more_or_other_bytes_is_refused() {
        let mut decoder = FrameDecoder::new(&[]).unwrap();
        let mut out = Vec::new();
        let frame = zstd::bulk::compress(&[7u8; 8192], 3).unwrap();
        let refusal = decoder.decode(&frame, 4096, &mut out).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::DecompressFailed, "{refusal}");
        let refusal = decoder.decode(&frame, 12288, &mut out).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::HashMismatch, "{refusal}");
        let refusal = decoder.decode(b"not zstd", 4096, &mut out).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::DecompressFailed);
    }

    fn expand_bytes(
        served: &[u8],
        image: &[u8],
        sha_of: &[u8],
    ) -> (Result<IndexFile, IndexError>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (entry, chunks) = testing::manifest_refs(image, sha_of, 4096);
        let result = expand(served, &entry, &chunks, &dir.path().join("index"));
        (result, dir)
    }

    fn code(result: Result<IndexFile, IndexError>) -> ReasonCode {
        match result {
            Err(IndexError::Refused(r)) => r.code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn expand_refuses_a_changed_cut_or_extended_index_and_leaves_no_file() {
        let image = sample_image();
        let (served, _) = testing::served(&image, 4096, 2);
        // A changed byte in the body: the signed hash no longer matches (or the frame breaks).
        let mut changed = served.clone();
        let last = changed.len() - 3;
        changed[last] ^= 1;
        let (result, dir) = expand_bytes(&changed, &image, &served);
        assert!(matches!(
            code(result),
            ReasonCode::HashMismatch | ReasonCode::Malformed
        ));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left behind"
        );
        // Signed as it is, but cut short or extended.
        let cut = &served[..served.len() - 1];
        assert_eq!(
            code(expand_bytes(cut, &image, cut).0),
            ReasonCode::Malformed
        );
        let mut longer = served.clone();
        longer.push(0);
        assert_eq!(
            code(expand_bytes(&longer, &image, &longer).0),
            ReasonCode::Malformed
        );
        // The right bytes for another image size.
        let (result, _) = expand_bytes(&served, &image[..image.len() - 1], &served);
        assert_eq!(code(result), ReasonCode::Malformed);
        // The right bytes but another signed hash.
        let (result, _) = expand_bytes(&served, &image, b"other");
        assert_eq!(code(result), ReasonCode::HashMismatch);
        // And as signed: accepted.
        assert!(expand_bytes(&served, &image, &served).0.is_ok());
    }

    #[test]
    fn expand_refuses_a_body_of_two_frames() {
        let image = sample_image();
        let (served, _) = testing::served(&image, 4096, 2);
        let header = IndexHeader::parse(&served).unwrap();
        let body = zstd::bulk::decompress(
            &served[header.encoded_len()..],
            header.raw_body_size() as usize,
        )
        .unwrap();
        // The same body as two frames, and as one frame followed by an empty one.
        let half = body.len() / 2;
        for parts in [vec![&body[..half], &body[half..]], vec![&body[..], &[][..]]] {
            let mut compressed = Vec::new();
            for part in parts {
                compressed.extend(zstd::bulk::compress(part, 3).unwrap());
            }
            let forged_header = IndexHeader {
                body_size: compressed.len() as u64,
                ..header.clone()
            };
            let mut forged = forged_header.encode();
            forged.extend_from_slice(&compressed);
            let (result, _) = expand_bytes(&forged, &image, &forged);
            assert_eq!(code(result), ReasonCode::Malformed);
        }
    }

    #[test]
    fn expand_refuses_a_body_whose_counts_do_not_add_up() {
        let image = sample_image();
        let (served, _) = testing::served(&image, 4096, 2);
        let mut header = IndexHeader::parse(&served).unwrap();
        let body = &served[header.encoded_len()..];
        // One stored block more than the entries show (and a store size to match the frames).
        header.stored_blocks -= 1;
        let mut forged = header.encode();
        forged.extend_from_slice(body);
        let refusal = code(expand_bytes(&forged, &image, &forged).0);
        assert_eq!(refusal, ReasonCode::Malformed);
        // A store size the frames do not add up to.
        let mut header = IndexHeader::parse(&served).unwrap();
        header.store_size += 1;
        let mut forged = header.encode();
        forged.extend_from_slice(body);
        assert_eq!(
            code(expand_bytes(&forged, &image, &forged).0),
            ReasonCode::Malformed
        );
    }

    #[test]
    fn expand_refuses_a_body_that_needs_a_larger_window() {
        // 40,000 entries (1.28 MB of body) compressed with an 8 MiB window: the device's decoder
        // allows 1 MiB.
        let blocks = 40_000u64;
        let mut body = Vec::new();
        for i in 0..blocks {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i % 1000).to_le_bytes());
            h[8] = 1;
            body.extend_from_slice(&h);
        }
        body.extend_from_slice(&[0u8; 0]);
        let mut c = zstd::bulk::Compressor::new(19).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(23))
            .unwrap();
        let compressed = c.compress(&body).unwrap();
        let header = IndexHeader {
            block_size: 4096,
            image_size: blocks * 4096,
            stored_blocks: 0,
            frame_count: 0,
            blocks_per_frame: 1,
            dictionary_size: 0,
            store_size: 0,
            store_name: "s".into(),
            body_compressed: true,
            body_size: compressed.len() as u64,
        };
        let mut served = header.encode();
        served.extend_from_slice(&compressed);
        let image = vec![0u8; 1]; // only its size matters: the manifest must agree
        let dir = tempfile::tempdir().unwrap();
        let (mut entry, chunks) = testing::manifest_refs(&image, &served, 4096);
        entry.size = blocks * 4096;
        let result = expand(&served[..], &entry, &chunks, &dir.path().join("index"));
        let refusal = code(result);
        assert_eq!(refusal, ReasonCode::Malformed);
    }
}
