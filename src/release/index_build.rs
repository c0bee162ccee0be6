//! The operator's side of the block index (feature `operator`): hash an image block by block,
//! train a zstd dictionary on its blocks, compress the non-zero blocks into the store (frames of
//! a few blocks, on every core) and write the index that binds them. The format is
//! [`crate::release::block_index`]'s; the choices and their measurements are in
//! `docs/block-index.md`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::release::block_index::{
    BODY_WINDOW_LOG, Hash, IndexHeader, MAX_BLOCK_SIZE, MAX_BLOCKS_PER_FRAME, MAX_DICTIONARY_SIZE,
    MIN_BLOCK_SIZE, read_full,
};

/// How to build the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreParams {
    pub block_size: u32,
    pub blocks_per_frame: u32,
    /// Largest dictionary to train (0: none).
    pub dictionary_size: u32,
    /// zstd level of the frames.
    pub level: i32,
    /// A block with at least this many zero bytes in 256 goes into the store's first section
    /// (257: none does, one section).
    pub sparse_per_256: u32,
}

impl Default for StoreParams {
    /// The measured choice (docs/block-index.md).
    fn default() -> StoreParams {
        StoreParams {
            block_size: 4096,
            blocks_per_frame: 4,
            dictionary_size: 64 * 1024,
            level: 19,
            sparse_per_256: SPARSE_PER_256,
        }
    }
}

/// What [`build`] wrote.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub header: IndexHeader,
    /// SHA-256 of the index file as written (the manifest's `chunks.sha256`).
    pub index_sha256: Hash,
    pub index_size: u64,
}

/// Blocks of at least 90 % zero bytes are a filesystem's metadata, mostly: inode tables,
/// directories, extent blocks, bitmaps. Every update changes a few of them all over the image;
/// in a section of their own they are one short range of the store (docs/block-index.md).
pub const SPARSE_PER_256: u32 = 231;

/// Sections of the store, as this builder assigns them.
const SECTION_SPARSE: u8 = 1;
const SECTION_DENSE: u8 = 2;

/// How many sample blocks the dictionary is trained on at most (about 100 times its size, as
/// zstd advises, for a 64 KiB dictionary at 4 KiB blocks).
const MAX_SAMPLES: u64 = 2048;
/// Below this many stored blocks no dictionary is trained: too few samples to learn from.
const MIN_SAMPLES: u64 = 64;
/// Frames compressed per batch and thread.
const BATCH_FRAMES_PER_THREAD: usize = 64;

/// Builds the index of `image` and its store: writes `index_out` and `store_out` (whose file
/// name the index records: serve the two side by side).
pub fn build(
    image: &Path,
    params: StoreParams,
    index_out: &Path,
    store_out: &Path,
) -> io::Result<BuiltIndex> {
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    if !params.block_size.is_power_of_two()
        || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&params.block_size)
    {
        return Err(invalid(format!(
            "block size {} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
            params.block_size
        )));
    }
    if !(1..=MAX_BLOCKS_PER_FRAME).contains(&params.blocks_per_frame) {
        return Err(invalid(format!(
            "{} blocks per frame (1 to {MAX_BLOCKS_PER_FRAME})",
            params.blocks_per_frame
        )));
    }
    if params.dictionary_size > MAX_DICTIONARY_SIZE {
        return Err(invalid(format!(
            "a dictionary of at most {MAX_DICTIONARY_SIZE} bytes"
        )));
    }
    let store_name = store_out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid(format!("{} has no file name", store_out.display())))?
        .to_owned();

    let file = File::open(image)?;
    let bs = params.block_size as usize;
    // Pass 1: every block's hash and section.
    let (hashes, sections, image_size) = hash_blocks(&file, bs, params.sparse_per_256)?;
    if image_size == 0 {
        return Err(invalid(format!("{} is empty", image.display())));
    }
    // The store's order: section by section, image order within one.
    let mut stored: Vec<u64> = Vec::new();
    let mut section_ends = Vec::new();
    for section in [SECTION_SPARSE, SECTION_DENSE] {
        stored.extend((0..hashes.len() as u64).filter(|&i| sections[i as usize] == section));
        section_ends.push(stored.len());
    }

    let dictionary = if params.dictionary_size > 0 && stored.len() as u64 >= MIN_SAMPLES {
        let mut in_image_order = stored.clone();
        in_image_order.sort_unstable();
        train_dictionary(
            &file,
            bs,
            image_size,
            &in_image_order,
            params.dictionary_size,
        )?
    } else {
        Vec::new()
    };

    // Pass 2: the store; a section starts a frame.
    let per = params.blocks_per_frame as usize;
    let mut frames: Vec<&[u64]> = Vec::new();
    let mut start = 0;
    for &end in &section_ends {
        frames.extend(stored[start..end].chunks(per));
        start = end;
    }
    let mut store = BufWriter::new(File::create(store_out)?);
    let mut frame_sizes: Vec<u32> = Vec::with_capacity(frames.len());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for batch in frames.chunks(threads * BATCH_FRAMES_PER_THREAD) {
        let per_thread = batch.len().div_ceil(threads);
        let compressed: Vec<io::Result<Vec<Vec<u8>>>> = std::thread::scope(|s| {
            let workers: Vec<_> = batch
                .chunks(per_thread)
                .map(|part| {
                    let file = &file;
                    let dictionary = &dictionary;
                    s.spawn(move || {
                        compress_frames(file, bs, image_size, part, dictionary, params.level)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("a compression thread panicked"))
                .collect()
        });
        for part in compressed {
            for frame in part? {
                store.write_all(&frame)?;
                frame_sizes.push(u32::try_from(frame.len()).expect("a frame is at most 16 MiB"));
            }
        }
    }
    store.flush()?;
    store.get_ref().sync_all()?;
    let store_size: u64 = frame_sizes.iter().map(|&s| u64::from(s)).sum();

    // The index: header, then the body as one zstd frame.
    let mut body = Vec::with_capacity(dictionary.len() + hashes.len() * 32 + frame_sizes.len() * 4);
    body.extend_from_slice(&dictionary);
    body.extend(hashes.iter().flatten());
    body.extend_from_slice(&sections);
    for size in &frame_sizes {
        body.extend_from_slice(&size.to_le_bytes());
    }
    let compressed_body = compress_body(&body)?;
    let header = IndexHeader {
        block_size: params.block_size,
        image_size,
        stored_blocks: stored.len() as u64,
        frame_count: frame_sizes.len() as u64,
        blocks_per_frame: params.blocks_per_frame,
        dictionary_size: dictionary.len() as u32,
        store_size,
        store_name,
        body_compressed: true,
        body_size: compressed_body.len() as u64,
    };
    let mut index = header.encode();
    index.extend_from_slice(&compressed_body);
    // Never write what a device would refuse.
    IndexHeader::parse(&index).map_err(|r| invalid(r.to_string()))?;
    crate::durable::write_atomically(index_out, &index, 0o644)?;
    Ok(BuiltIndex {
        header,
        index_sha256: Sha256::digest(&index).into(),
        index_size: index.len() as u64,
    })
}

/// Every block's hash and section (0: all zero), and the image's size.
fn hash_blocks(
    file: &File,
    bs: usize,
    sparse_per_256: u32,
) -> io::Result<(Vec<Hash>, Vec<u8>, u64)> {
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut hashes = Vec::new();
    let mut sections = Vec::new();
    let mut block = vec![0u8; bs];
    let mut size = 0u64;
    loop {
        let n = read_full(&mut reader, &mut block)?;
        if n == 0 {
            break;
        }
        let bytes = &block[..n];
        hashes.push(Sha256::digest(bytes).into());
        let zeros = bytes.iter().filter(|&&b| b == 0).count();
        sections.push(if zeros == n {
            0
        } else if zeros as u64 * 256 >= u64::from(sparse_per_256) * n as u64 {
            SECTION_SPARSE
        } else {
            SECTION_DENSE
        });
        size += n as u64;
        if n < bs {
            break;
        }
    }
    Ok((hashes, sections, size))
}

fn read_block(
    file: &File,
    bs: usize,
    image_size: u64,
    block: u64,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let start = block * bs as u64;
    let len = (image_size - start).min(bs as u64) as usize;
    let at = out.len();
    out.resize(at + len, 0);
    file.read_exact_at(&mut out[at..], start)
}

/// A dictionary trained on stored blocks spread evenly over the image. zstd's trainer fails on
/// data it cannot learn from (e.g. random bytes): the store is then built without one.
fn train_dictionary(
    file: &File,
    bs: usize,
    image_size: u64,
    stored: &[u64],
    max_size: u32,
) -> io::Result<Vec<u8>> {
    let step = (stored.len() as u64).div_ceil(MAX_SAMPLES).max(1) as usize;
    let mut samples = Vec::new();
    let mut sizes = Vec::new();
    for &block in stored.iter().step_by(step) {
        let before = samples.len();
        read_block(file, bs, image_size, block, &mut samples)?;
        sizes.push(samples.len() - before);
    }
    Ok(zstd::dict::from_continuous(&samples, &sizes, max_size as usize).unwrap_or_default())
}

fn frame_compressor(dictionary: &[u8], level: i32) -> io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::CParameter;
    let mut compressor = if dictionary.is_empty() {
        zstd::bulk::Compressor::new(level)?
    } else {
        zstd::bulk::Compressor::with_dictionary(level, dictionary)?
    };
    // Each block is checked against its SHA-256, and the dictionary is the index's: zstd's own
    // checksum and dictionary id would only add 8 bytes to every frame.
    compressor.set_parameter(CParameter::ChecksumFlag(false))?;
    compressor.set_parameter(CParameter::DictIdFlag(false))?;
    Ok(compressor)
}

fn compress_frames(
    file: &File,
    bs: usize,
    image_size: u64,
    frames: &[&[u64]],
    dictionary: &[u8],
    level: i32,
) -> io::Result<Vec<Vec<u8>>> {
    let mut compressor = frame_compressor(dictionary, level)?;
    let mut raw = Vec::new();
    frames
        .iter()
        .map(|blocks| {
            raw.clear();
            for &block in *blocks {
                read_block(file, bs, image_size, block, &mut raw)?;
            }
            compressor.compress(&raw)
        })
        .collect()
}

fn compress_body(body: &[u8]) -> io::Result<Vec<u8>> {
    use zstd::zstd_safe::CParameter;
    let mut compressor = zstd::bulk::Compressor::new(19)?;
    compressor.set_parameter(CParameter::WindowLog(BODY_WINDOW_LOG))?;
    compressor.set_parameter(CParameter::ChecksumFlag(false))?;
    compressor.compress(body)
}
