//! The local block table: which block of a slot holds a given content, by hash. Built once per
//! slot content (by hashing the slot, or for free from the signed index of the release it holds)
//! and kept on disk, sorted, with a fan-out table in memory: a lookup is one positioned read of
//! one bucket, so the table of a 2 GiB slot (524,288 blocks, 6 MiB) never has to be in memory.
//!
//! Entries carry the first 8 bytes of the SHA-256 only: a table only proposes candidates. The
//! caller reads the candidate block and checks its full hash against the signed index before it
//! uses it (the slot may also have changed since the table was built).
//!
//! File layout (little-endian header, then big-endian entries so that byte order is sort order):
//!
//! ```text
//! magic "UASLOTTB" | version u16 | fanout_bits u8 | reserved [u8; 5]
//! block_size u32 | reserved u32 | slot_blocks u64 | entries u64 | key [u8; 32]
//! fanout: 2^fanout_bits × u32, the end of each bucket (entries whose prefix starts with it)
//! entries: (prefix u64 BE, block u32 BE), sorted
//! ```
//!
//! All-zero blocks are left out (the planner writes zeros without a lookup), and one content is
//! listed at most [`MAX_COPIES`] times, so that a slot full of one pattern (erased flash, `0xff`)
//! cannot make a bucket huge.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::release::block_index::{Hash, IndexFile, zero_hash};

pub const MAGIC: [u8; 8] = *b"UASLOTTB";
pub const VERSION: u16 = 1;
const HEADER_LEN: u64 = 72;
const ENTRY_LEN: usize = 12;
/// At most this many blocks are listed for one content.
pub const MAX_COPIES: usize = 4;
/// Bytes a bucket is read in when it is larger than expected.
const BUCKET_READ: usize = 4096;

/// What a table describes, as the caller names it: e.g. the SHA-256 of the signed image a
/// committed slot holds, or an id the installer draws whenever it writes the slot. A table whose
/// key differs from the caller's is stale.
pub type TableKey = [u8; 32];

/// A table open for lookups: header and fan-out in memory, entries on disk.
#[derive(Debug)]
pub struct SlotTable {
    file: File,
    block_size: u32,
    slot_blocks: u64,
    entries: u64,
    fanout_bits: u8,
    /// End of each bucket, in entries.
    fanout: Vec<u32>,
    key: TableKey,
}

impl SlotTable {
    /// Opens a table and checks its header and fan-out against its size.
    pub fn open(path: &Path) -> io::Result<SlotTable> {
        let bad = |msg: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("slot table {}: {msg}", path.display()),
            )
        };
        let file = File::open(path)?;
        let mut header = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        if header[..8] != MAGIC {
            return Err(bad("not a slot table".into()));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != VERSION {
            return Err(bad(format!(
                "version {version} (this agent reads {VERSION})"
            )));
        }
        let fanout_bits = header[10];
        let block_size = u32::from_le_bytes(header[16..20].try_into().unwrap());
        let slot_blocks = u64::from_le_bytes(header[24..32].try_into().unwrap());
        let entries = u64::from_le_bytes(header[32..40].try_into().unwrap());
        let key: TableKey = header[40..72].try_into().unwrap();
        if header[11..16] != [0; 5] || header[20..24] != [0; 4] {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        if !(1..=20).contains(&fanout_bits) || !block_size.is_power_of_two() {
            return Err(bad("header out of range".into()));
        }
        let buckets = 1usize << fanout_bits;
        let mut raw = vec![0u8; buckets * 4];
        file.read_exact_at(&mut raw, HEADER_LEN)
            .map_err(|e| bad(format!("cannot read the fan-out: {e}")))?;
        let fanout: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ordered = fanout.windows(2).all(|w| w[0] <= w[1]);
        if !ordered || u64::from(*fanout.last().unwrap()) != entries {
            return Err(bad("the fan-out does not add up".into()));
        }
        let expected = HEADER_LEN + raw.len() as u64 + entries * ENTRY_LEN as u64;
        if file.metadata()?.len() != expected {
            return Err(bad("its length does not match its header".into()));
        }
        Ok(SlotTable {
            file,
            block_size,
            slot_blocks,
            entries,
            fanout_bits,
            fanout,
            key,
        })
    }

    /// Opens the table at `path` if it describes `key`; `None` when it is missing or stale.
    pub fn open_if_current(path: &Path, key: &TableKey) -> io::Result<Option<SlotTable>> {
        match SlotTable::open(path) {
            Ok(table) if table.key == *key => Ok(Some(table)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn key(&self) -> &TableKey {
        &self.key
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks of the slot the table was built from.
    pub fn slot_blocks(&self) -> u64 {
        self.slot_blocks
    }

    /// Entries listed (non-zero blocks, at most [`MAX_COPIES`] per content).
    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Blocks whose hash starts like `hash` (candidates: check the full hash before use), in
    /// ascending order, into `out` (cleared first).
    pub fn candidates(&self, hash: &Hash, out: &mut Vec<u32>) -> io::Result<()> {
        out.clear();
        let prefix = u64::from_be_bytes(hash[..8].try_into().unwrap());
        let bucket = (prefix >> (64 - u32::from(self.fanout_bits))) as usize;
        let start = if bucket == 0 {
            0
        } else {
            self.fanout[bucket - 1]
        } as u64;
        let end = self.fanout[bucket] as u64;
        // Binary search for the first entry with this prefix, reading one entry at a time,
        // until the range fits one read.
        let (mut lo, mut hi) = (start, end);
        let mut entry = [0u8; ENTRY_LEN];
        while hi - lo > (BUCKET_READ / ENTRY_LEN) as u64 {
            let mid = lo + (hi - lo) / 2;
            self.read_entry(mid, &mut entry)?;
            if u64::from_be_bytes(entry[..8].try_into().unwrap()) < prefix {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        // From `lo` on, read until past the prefix (at most MAX_COPIES entries can match, so
        // this ends within one or two reads).
        let mut at = lo;
        let mut buf = [0u8; BUCKET_READ];
        while at < end {
            let n = ((end - at) as usize).min(BUCKET_READ / ENTRY_LEN);
            let bytes = &mut buf[..n * ENTRY_LEN];
            self.file.read_exact_at(bytes, self.entry_offset(at))?;
            for e in bytes.chunks_exact(ENTRY_LEN) {
                let p = u64::from_be_bytes(e[..8].try_into().unwrap());
                if p > prefix {
                    return Ok(());
                }
                if p == prefix {
                    out.push(u32::from_be_bytes(e[8..].try_into().unwrap()));
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    fn entry_offset(&self, entry: u64) -> u64 {
        HEADER_LEN + (self.fanout.len() * 4) as u64 + entry * ENTRY_LEN as u64
    }

    fn read_entry(&self, entry: u64, out: &mut [u8; ENTRY_LEN]) -> io::Result<()> {
        self.file.read_exact_at(out, self.entry_offset(entry))
    }
}

/// How much memory a build may use for sorting (entries held at once): 2 MiB, so that a 2 GiB
/// slot's 6 MiB of entries is sorted in three passes.
pub const DEFAULT_SORT_BUDGET: usize = 2 * 1024 * 1024;

/// Builds tables: from a slot's bytes (hashed on every core) or from a signed index.
#[derive(Debug, Clone, Copy)]
pub struct TableBuilder {
    pub block_size: u32,
    /// Bytes of entries sorted in memory at once.
    pub sort_budget: usize,
    /// Threads that hash the slot.
    pub threads: usize,
}

impl TableBuilder {
    pub fn new(block_size: u32) -> TableBuilder {
        TableBuilder {
            block_size,
            sort_budget: DEFAULT_SORT_BUDGET,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Hashes the first `len` bytes of `slot` block by block (the threads each read their own
    /// contiguous part) and writes the table to `out` (atomically). `len` is the slot's size:
    /// for a block device, from `BLKGETSIZE64` (its metadata says 0).
    pub fn from_slot(&self, slot: &File, len: u64, key: &TableKey, out: &Path) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        let blocks = len.div_ceil(bs);
        let threads = self.threads.max(1) as u64;
        let per_thread = blocks.div_ceil(threads).max(1);
        let dir = parent(out);
        let spills: Vec<io::Result<File>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let first = (t * per_thread).min(blocks);
                    let last = ((t + 1) * per_thread).min(blocks);
                    s.spawn(move || hash_range(slot, bs, len, first..last, dir))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a hashing thread panicked"))
                .collect()
        });
        let spills = spills.into_iter().collect::<io::Result<Vec<File>>>()?;
        self.write_sorted(spills, blocks, key, out)
    }

    /// The table of a slot that holds exactly the image `index` describes: no slot read, the
    /// hashes are the index's.
    pub fn from_index(&self, index: &IndexFile, key: &TableKey, out: &Path) -> io::Result<()> {
        if index.header().block_size != self.block_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the index's block size differs from the table's",
            ));
        }
        let mut spill = BufWriter::new(tempfile::tempfile_in(parent(out))?);
        for entry in index.entries() {
            let entry = entry?;
            if !index.is_zero(entry.block, &entry.hash) {
                spill.write_all(&encode_entry(&entry.hash, entry.block))?;
            }
        }
        let spill = spill.into_inner().map_err(|e| e.into_error())?;
        self.write_sorted(vec![spill], index.block_count(), key, out)
    }

    /// Sorts the spilled entries in passes of at most `sort_budget` bytes (each pass takes the
    /// buckets that fit, reading every spill file once), caps copies, writes the table.
    fn write_sorted(
        &self,
        mut spills: Vec<File>,
        slot_blocks: u64,
        key: &TableKey,
        out: &Path,
    ) -> io::Result<()> {
        let mut total = 0u64;
        for spill in &mut spills {
            total += spill.seek(SeekFrom::End(0))? / ENTRY_LEN as u64;
        }
        // About 8 entries a bucket: one small read a lookup.
        let fanout_bits = (64 - (total / 8).max(1).leading_zeros()).clamp(8, 20) as u8;
        let buckets = 1usize << fanout_bits;
        let bucket_of = |e: &[u8]| {
            (u64::from_be_bytes(e[..8].try_into().unwrap()) >> (64 - u32::from(fanout_bits)))
                as usize
        };
        // Count per bucket, to cut the passes.
        let mut counts = vec![0u32; buckets];
        for_each_entry(&mut spills, |e| counts[bucket_of(e)] += 1)?;
        let budget = (self.sort_budget / ENTRY_LEN).max(1) as u64;
        let mut passes: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        let mut held = 0u64;
        for (b, &count) in counts.iter().enumerate() {
            if held > 0 && held + u64::from(count) > budget {
                passes.push((start, b));
                start = b;
                held = 0;
            }
            held += u64::from(count);
        }
        passes.push((start, buckets));

        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-slot-table-")
            .tempfile_in(parent(out))?;
        let fanout_len = buckets * 4;
        {
            let mut writer = BufWriter::with_capacity(64 * 1024, tmp.as_file_mut());
            writer.write_all(&[0u8; HEADER_LEN as usize])?;
            writer.write_all(&vec![0u8; fanout_len])?;
            let mut fanout = vec![0u32; buckets];
            let mut written = 0u32;
            let mut batch: Vec<[u8; ENTRY_LEN]> = Vec::new();
            for (lo, hi) in passes {
                batch.clear();
                for_each_entry(&mut spills, |e| {
                    let b = bucket_of(e);
                    if (lo..hi).contains(&b) {
                        batch.push(e.try_into().unwrap());
                    }
                })?;
                batch.sort_unstable();
                let mut run_prefix = None;
                let mut run_len = 0;
                for e in &batch {
                    let prefix = &e[..8];
                    if run_prefix == Some(prefix) {
                        run_len += 1;
                        if run_len > MAX_COPIES {
                            continue;
                        }
                    } else {
                        run_prefix = Some(prefix);
                        run_len = 1;
                    }
                    writer.write_all(e)?;
                    written += 1;
                    fanout[bucket_of(e)] = written;
                }
                // Empty buckets end where the one before them ended.
                for b in lo..hi {
                    if b > 0 && fanout[b] < fanout[b - 1] {
                        fanout[b] = fanout[b - 1];
                    }
                }
            }
            let mut header = Vec::with_capacity(HEADER_LEN as usize);
            header.extend_from_slice(&MAGIC);
            header.extend_from_slice(&VERSION.to_le_bytes());
            header.push(fanout_bits);
            header.extend_from_slice(&[0; 5]);
            header.extend_from_slice(&self.block_size.to_le_bytes());
            header.extend_from_slice(&[0; 4]);
            header.extend_from_slice(&slot_blocks.to_le_bytes());
            header.extend_from_slice(&u64::from(written).to_le_bytes());
            header.extend_from_slice(key);
            debug_assert_eq!(header.len() as u64, HEADER_LEN);
            writer.flush()?;
            let file = writer.get_ref();
            let mut raw = Vec::with_capacity(fanout_len);
            for end in &fanout {
                raw.extend_from_slice(&end.to_le_bytes());
            }
            file.write_all_at(&header, 0)?;
            file.write_all_at(&raw, HEADER_LEN)?;
        }
        tmp.as_file().sync_all()?;
        tmp.persist(out).map_err(|e| e.error)?;
        File::open(parent(out))?.sync_all()
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn encode_entry(hash: &Hash, block: u64) -> [u8; ENTRY_LEN] {
    let mut e = [0u8; ENTRY_LEN];
    e[..8].copy_from_slice(&hash[..8]);
    e[8..].copy_from_slice(&(block as u32).to_be_bytes());
    e
}

/// Hashes blocks `range` of the slot into a spill file of unsorted entries.
fn hash_range(
    slot: &File,
    bs: u64,
    len: u64,
    range: std::ops::Range<u64>,
    dir: &Path,
) -> io::Result<File> {
    const READ: u64 = 256 * 1024;
    let zero = zero_hash(bs as usize);
    let last_zero = zero_hash((len - (len.div_ceil(bs) - 1) * bs) as usize);
    let mut spill = BufWriter::new(tempfile::tempfile_in(dir)?);
    let mut buf = vec![0u8; READ as usize];
    let mut block = range.start;
    while block < range.end {
        let start = block * bs;
        let end = (range.end * bs).min(len).min(start + READ);
        let bytes = &mut buf[..(end - start) as usize];
        slot.read_exact_at(bytes, start)?;
        for chunk in bytes.chunks(bs as usize) {
            let hash: Hash = Sha256::digest(chunk).into();
            let zero = if chunk.len() < bs as usize {
                &last_zero
            } else {
                &zero
            };
            if hash != *zero {
                spill.write_all(&encode_entry(&hash, block))?;
            }
            block += 1;
        }
    }
    spill.into_inner().map_err(|e| e.into_error())
}

fn for_each_entry(spills: &mut [File], mut f: impl FnMut(&[u8])) -> io::Result<()> {
    for spill in spills {
        spill.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::with_capacity(64 * 1024, &*spill);
        let mut e = [0u8; ENTRY_LEN];
        loop {
            match reader.read_exact(&mut e) {
                Ok(()) => f(&e),
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(err) => return Err(err),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::block_index::testing;

    /// Blocks with distinct content, some zero, one content five times.
    fn slot_image(blocks: u32) -> Vec<u8> {
        let mut image = Vec::new();
        for i in 0..blocks {
            let block: Vec<u8> = match i % 7 {
                3 => vec![0; 4096],
                5 => vec![0xff; 4096],
                _ => (0..4096u32)
                    .map(|j| ((j * 31 + i * 17) % 253) as u8)
                    .collect(),
            };
            image.extend_from_slice(&block);
        }
        image
    }

    fn hash(bytes: &[u8]) -> Hash {
        Sha256::digest(bytes).into()
    }

    /// `image` written as `slot` in a fresh directory, and its table built as `table` there
    /// (4 KiB blocks).
    fn table_of_slot(image: &[u8], key: &Hash) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        std::fs::write(&slot, image).unwrap();
        let out = dir.path().join("table");
        TableBuilder::new(4096)
            .from_slot(&File::open(&slot).unwrap(), image.len() as u64, key, &out)
            .unwrap();
        (dir, out)
    }

    #[test]
    fn every_non_zero_block_is_found_by_its_hash_and_zeros_are_left_out() {
        let image = slot_image(40);
        let key = [7u8; 32];
        let (dir, out) = table_of_slot(&image, &key);
        let table = SlotTable::open(&out).unwrap();
        assert_eq!(table.slot_blocks(), 40);
        // 40 blocks: 6 zero (i % 7 == 3), 5 of 0xff (capped at MAX_COPIES), 29 distinct.
        assert_eq!(table.len(), 29 + MAX_COPIES as u64);
        let mut found = Vec::new();
        for (i, block) in image.chunks(4096).enumerate() {
            table.candidates(&hash(block), &mut found).unwrap();
            match i % 7 {
                3 => assert!(found.is_empty(), "zero block {i} listed"),
                5 => assert_eq!(found, vec![5, 12, 19, 26], "the first copies, in order"),
                _ => assert_eq!(found, vec![i as u32]),
            }
        }
        table.candidates(&hash(b"elsewhere"), &mut found).unwrap();
        assert!(found.is_empty());
        assert!(SlotTable::open_if_current(&out, &key).unwrap().is_some());
        assert!(
            SlotTable::open_if_current(&out, &[8u8; 32])
                .unwrap()
                .is_none(),
            "stale key"
        );
        assert!(
            SlotTable::open_if_current(&dir.path().join("none"), &key)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_table_does_not_depend_on_threads_sort_budget_or_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = slot_image(300);
        image.extend_from_slice(&[3u8; 1000]); // a short last block
        let slot = dir.path().join("slot");
        std::fs::write(&slot, &image).unwrap();
        let key = [1u8; 32];
        let build = |threads: usize, sort_budget: usize, name: &str| {
            let out = dir.path().join(name);
            let builder = TableBuilder {
                block_size: 4096,
                sort_budget,
                threads,
            };
            builder
                .from_slot(&File::open(&slot).unwrap(), image.len() as u64, &key, &out)
                .unwrap();
            std::fs::read(out).unwrap()
        };
        let reference = build(1, 1 << 20, "one");
        assert_eq!(build(3, 1 << 20, "three"), reference);
        // 120 bytes: ten entries a pass, dozens of passes.
        assert_eq!(build(2, 120, "small"), reference);
        let (index, _) = testing::expanded(dir.path(), &image, 4096, 4);
        let out = dir.path().join("from-index");
        TableBuilder::new(4096)
            .from_index(&index, &key, &out)
            .unwrap();
        assert_eq!(std::fs::read(out).unwrap(), reference);
    }

    #[test]
    fn a_damaged_table_is_refused_not_read() {
        let image = slot_image(50);
        let key = [0u8; 32];
        let (_dir, out) = table_of_slot(&image, &key);
        let good = std::fs::read(&out).unwrap();
        for (what, edit) in [
            ("magic", 0usize),
            ("version", 8),
            ("fan-out", HEADER_LEN as usize + 4),
            ("reserved", 12),
        ] {
            let mut bad = good.clone();
            bad[edit] ^= 0x55;
            std::fs::write(&out, &bad).unwrap();
            let err = SlotTable::open(&out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
            assert!(SlotTable::open_if_current(&out, &key).unwrap().is_none());
        }
        std::fs::write(&out, &good[..good.len() - 1]).unwrap();
        assert!(SlotTable::open(&out).is_err(), "cut short");
    }
}
