//! Design exploration for the block index (docs/block-index.md): for the image pairs that
//! `benches/delta-images` builds, how many bytes a device must fetch under each candidate design.
//! Not the product's code: the alternatives are computed here directly (`cargo bench --bench
//! delta` measures the implementation).
//!
//!     benches/delta-images && cargo bench --bench delta_explore
//!
//! Per case: blocks needed (not found anywhere in the old image by content), the ideal (zstd -19
//! of just those blocks), the whole image at zstd -19; block sizes and content-defined chunking;
//! stores of N-block zstd frames with and without a trained dictionary; the index's size for
//! full and truncated hashes; HTTP requests after merging gaps.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

const BS: usize = 4096;
const LEVEL: i32 = 19;

type Hash = [u8; 32];

struct Img {
    name: String,
    bytes: Vec<u8>,
}

impl Img {
    fn load(dir: &Path, name: &str) -> Img {
        let path = dir.join(format!("{name}.img"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the images first: benches/delta-images",
                path.display()
            )
        });
        Img {
            name: name.into(),
            bytes,
        }
    }

    fn blocks(&self, bs: usize) -> impl Iterator<Item = &[u8]> {
        self.bytes.chunks(bs)
    }
}

fn hashes(data: &[u8], bs: usize) -> Vec<Hash> {
    let chunks: Vec<&[u8]> = data.chunks(bs).collect();
    let half = chunks.len() / 2;
    std::thread::scope(|s| {
        let a = s.spawn(|| {
            chunks[..half]
                .iter()
                .map(|c| Sha256::digest(c).into())
                .collect::<Vec<Hash>>()
        });
        let mut out: Vec<Hash> = Vec::with_capacity(chunks.len());
        let b: Vec<Hash> = chunks[half..]
            .iter()
            .map(|c| Sha256::digest(c).into())
            .collect();
        out.extend(a.join().unwrap());
        out.extend(b);
        out
    })
}

fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

fn zstd_cli_size(path: &Path) -> u64 {
    let cache = PathBuf::from(format!("{}.zst19.size", path.display()));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        return text.trim().parse().unwrap();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -19 -T2 -c -q {} | wc -c", path.display()))
        .output()
        .expect("zstd");
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::fs::write(&cache, size.to_string()).unwrap();
    size
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// FastCDC-style content-defined chunking with a gear hash (min, average, max sizes).
fn cdc(data: &[u8], min: usize, avg: usize, max: usize) -> Vec<(usize, usize)> {
    let mut gear = [0u64; 256];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for g in &mut gear {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *g = x;
    }
    let bits = avg.trailing_zeros();
    let mask_hard = (1u64 << (bits + 2)) - 1;
    let mask_easy = (1u64 << (bits - 2)) - 1;
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let end_max = (start + max).min(data.len());
        let mut h = 0u64;
        let mut cut = end_max;
        let mut i = start + min.min(end_max - start);
        while i < end_max {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            let mask = if i - start < avg {
                mask_hard
            } else {
                mask_easy
            };
            if h & (mask << 20) == 0 {
                cut = i + 1;
                break;
            }
            i += 1;
        }
        out.push((start, cut));
        start = cut;
    }
    out
}

struct Case {
    label: &'static str,
    old: &'static str,
    new: &'static str,
}

const CASES: &[Case] = &[
    Case {
        label: "(a) same image",
        old: "base",
        new: "base",
    },
    Case {
        label: "(b) curl added",
        old: "base",
        new: "curl",
    },
    Case {
        label: "(c) libssl3 upgraded",
        old: "base",
        new: "libssl",
    },
    Case {
        label: "(d) 1% blocks random",
        old: "base",
        new: "random",
    },
    Case {
        label: "(e) half the files",
        old: "base",
        new: "major",
    },
];

/// Byte ranges of the needed frames in a store whose frame `f` has compressed size `sizes[f]`.
fn ranges_of(needed_frames: &[bool], sizes: &[u64]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0;
    for (f, &need) in needed_frames.iter().enumerate() {
        let end = offset + sizes[f];
        if need {
            match ranges.last_mut() {
                Some(last) if last.1 == offset => last.1 = end,
                _ => ranges.push((offset, end)),
            }
        }
        offset = end;
    }
    ranges
}

/// Ranges after merging every gap up to `gap` bytes: (ranges, bytes including merged gaps).
fn merge(ranges: &[(u64, u64)], gap: u64) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    let mut current: Option<(u64, u64)> = None;
    for &(s, e) in ranges {
        current = match current {
            Some((cs, ce)) if s - ce <= gap => Some((cs, e)),
            Some((cs, ce)) => {
                count += 1;
                bytes += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = current {
        count += 1;
        bytes += ce - cs;
    }
    (count, bytes)
}

/// The smallest extra bytes to reach at most `max` ranges: merge the smallest gaps first.
fn merge_to(ranges: &[(u64, u64)], max: usize) -> (usize, u64) {
    let payload: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    if ranges.len() <= max {
        return (ranges.len(), payload);
    }
    let mut gaps: Vec<u64> = ranges.windows(2).map(|w| w[1].0 - w[0].1).collect();
    gaps.sort_unstable();
    let merged = ranges.len() - max;
    (max, payload + gaps[..merged].iter().sum::<u64>())
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/delta-bench");
    let only: Option<String> = std::env::var("CASE").ok();
    let base = Img::load(&dir, "base");
    let base_hashes = hashes(&base.bytes, BS);
    let base_set: HashSet<Hash> = base_hashes.iter().copied().collect();

    for case in CASES {
        if only.as_deref().is_some_and(|o| !case.label.contains(o)) {
            continue;
        }
        assert_eq!(case.old, "base");
        let new = if case.new == "base" {
            Img {
                name: "base".into(),
                bytes: base.bytes.clone(),
            }
        } else {
            Img::load(&dir, case.new)
        };
        let new_hashes = hashes(&new.bytes, BS);
        let blocks: Vec<&[u8]> = new.blocks(BS).collect();
        let zero: Vec<bool> = blocks.iter().map(|b| is_zero(b)).collect();
        let zero_count = zero.iter().filter(|&&z| z).count();
        let mut seen = HashSet::new();
        let dup_nonzero = (0..blocks.len())
            .filter(|&i| !zero[i] && !seen.insert(new_hashes[i]))
            .count();
        let needed: Vec<bool> = (0..blocks.len())
            .map(|i| !zero[i] && !base_set.contains(&new_hashes[i]))
            .collect();
        let needed_count = needed.iter().filter(|&&n| n).count();
        let runs = needed.windows(2).filter(|w| w[1] && !w[0]).count()
            + usize::from(needed.first() == Some(&true));
        let positional_same = (0..blocks.len().min(base_hashes.len()))
            .filter(|&i| base_hashes[i] == new_hashes[i])
            .count();
        let needed_bytes: Vec<u8> = (0..blocks.len())
            .filter(|&i| needed[i])
            .flat_map(|i| blocks[i].iter().copied())
            .collect();
        let ideal = if needed_bytes.is_empty() {
            0
        } else {
            zstd::bulk::compress(&needed_bytes, LEVEL).unwrap().len() as u64
        };
        let full = zstd_cli_size(&dir.join(format!("{}.img", new.name)));
        println!("\n=== {} ({} -> {}) ===", case.label, case.old, case.new);
        println!(
            "blocks {} (zero {}, nonzero duplicates {}), same at same offset {:.1} %",
            blocks.len(),
            zero_count,
            dup_nonzero,
            100.0 * positional_same as f64 / blocks.len() as f64
        );
        println!(
            "needed 4 KiB blocks: {} ({:.2} %, {:.1} MiB) in {} runs; ideal (zstd -19 of them) {}; whole image zstd -19 {}",
            needed_count,
            100.0 * needed_count as f64 / blocks.len() as f64,
            needed_bytes.len() as f64 / 1048576.0,
            runs,
            mb(ideal),
            mb(full)
        );

        // Other block sizes, content-addressed.
        for bs in [8192usize, 16384, 65536] {
            let old: HashSet<Hash> = hashes(&base.bytes, bs).into_iter().collect();
            let nh = hashes(&new.bytes, bs);
            let need: usize = new
                .bytes
                .chunks(bs)
                .zip(&nh)
                .filter(|(c, h)| !is_zero(c) && !old.contains(*h))
                .map(|(c, _)| c.len())
                .sum();
            println!(
                "  block size {:>2} KiB: needed {:.1} MiB ({:.1} %)",
                bs / 1024,
                need as f64 / 1048576.0,
                100.0 * need as f64 / new.bytes.len() as f64
            );
        }
        if std::env::var("CDC").is_ok() {
            for (min, avg, max) in [(1024, 4096, 16384), (2048, 8192, 32768)] {
                let old: HashSet<Hash> = cdc(&base.bytes, min, avg, max)
                    .into_iter()
                    .map(|(s, e)| Sha256::digest(&base.bytes[s..e]).into())
                    .collect();
                let chunks = cdc(&new.bytes, min, avg, max);
                let need: usize = chunks
                    .iter()
                    .filter(|&&(s, e)| {
                        let c = &new.bytes[s..e];
                        !is_zero(c) && !old.contains(&<Hash>::from(Sha256::digest(c)))
                    })
                    .map(|(s, e)| e - s)
                    .sum();
                println!(
                    "  CDC avg {} KiB: {} chunks, needed {:.1} MiB ({:.1} %)",
                    avg / 1024,
                    chunks.len(),
                    need as f64 / 1048576.0,
                    100.0 * need as f64 / new.bytes.len() as f64
                );
            }
        }

        // The index: hashes per block, zstd -19 with a 1 MiB window.
        for hash_len in [32usize, 16, 8] {
            let raw: Vec<u8> = new_hashes
                .iter()
                .flat_map(|h| h[..hash_len].iter().copied())
                .collect();
            let c = compress_window(&raw, 20);
            println!(
                "  index entries {hash_len:>2} B: raw {}, zstd {}",
                mb(raw.len() as u64),
                mb(c.len() as u64)
            );
        }

        // Stores: the new image's non-zero blocks in image order, frames of N blocks.
        let stored: Vec<usize> = (0..blocks.len()).filter(|&i| !zero[i]).collect();
        let dict_started = Instant::now();
        let step = (stored.len() / 2048).max(1);
        let samples: Vec<&[u8]> = stored.iter().step_by(step).map(|&i| blocks[i]).collect();
        let dict = zstd::dict::from_samples(&samples, 64 * 1024).unwrap();
        let dict_time = dict_started.elapsed();
        println!(
            "  dictionary: {} from {} samples in {:.1} s",
            mb(dict.len() as u64),
            samples.len(),
            dict_time.as_secs_f64()
        );
        if needed_count == 0 {
            continue;
        }
        // Variants (VARIANTS="N:d|n:i|s:LEVEL[:PERCENT],..."): blocks a frame, dictionary or
        // none, store order (image order, or the blocks of at least PERCENT % zero bytes (90)
        // first), zstd level.
        let variants: Vec<(usize, bool, bool, i32, usize)> = std::env::var("VARIANTS")
            .unwrap_or_else(|_| {
                "1:n:i:19,1:d:i:19,4:d:i:19,1:n:s:19,1:d:s:19,2:d:s:19,1:d:s:12,1:d:s:6,1:d:s:3"
                    .into()
            })
            .split(',')
            .map(|v| {
                let p: Vec<&str> = v.split(':').collect();
                let threshold = p.get(4).map_or(90, |t| t.parse().unwrap());
                (
                    p[0].parse().unwrap(),
                    p[1] == "d",
                    p[2] == "s",
                    p[3].parse().unwrap(),
                    threshold,
                )
            })
            .collect();
        let zero_bytes: Vec<usize> = blocks
            .iter()
            .map(|b| b.iter().filter(|&&x| x == 0).count())
            .collect();
        for &(n, use_dict, sparse_first, level, threshold) in &variants {
            let sparse: Vec<bool> = (0..blocks.len())
                .map(|i| zero_bytes[i] * 100 >= blocks[i].len() * threshold)
                .collect();
            {
                let sections: Vec<Vec<usize>> = if sparse_first {
                    vec![
                        stored.iter().copied().filter(|&i| sparse[i]).collect(),
                        stored.iter().copied().filter(|&i| !sparse[i]).collect(),
                    ]
                } else {
                    vec![stored.clone()]
                };
                let frames: Vec<&[usize]> = sections.iter().flat_map(|s| s.chunks(n)).collect();
                let needed_frames: Vec<bool> = frames
                    .iter()
                    .map(|f| f.iter().any(|&i| needed[i]))
                    .collect();
                let started = Instant::now();
                // The whole store's size is estimated once, for case (b), from every 16th frame.
                let estimate = case.new == "curl";
                let want = |idx: usize| needed_frames[idx] || (estimate && idx.is_multiple_of(16));
                let half = frames.len() / 2;
                let work = |range: std::ops::Range<usize>| {
                    let mut c = if use_dict {
                        zstd::bulk::Compressor::with_dictionary(level, &dict).unwrap()
                    } else {
                        zstd::bulk::Compressor::new(level).unwrap()
                    };
                    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))
                        .unwrap();
                    c.set_parameter(zstd::zstd_safe::CParameter::DictIdFlag(false))
                        .unwrap();
                    range
                        .map(|idx| {
                            if !want(idx) {
                                return 0;
                            }
                            let data: Vec<u8> = frames[idx]
                                .iter()
                                .flat_map(|&i| blocks[i].iter().copied())
                                .collect();
                            c.compress(&data).unwrap().len() as u64
                        })
                        .collect::<Vec<u64>>()
                };
                let sizes: Vec<u64> = std::thread::scope(|scope| {
                    let a = scope.spawn(|| work(0..half));
                    let mut b = work(half..frames.len());
                    let mut out = a.join().unwrap();
                    out.append(&mut b);
                    out
                });
                let sample_total: u64 = if estimate {
                    sizes.iter().step_by(16).sum()
                } else {
                    0
                };
                let store_estimate =
                    sample_total * frames.len() as u64 / frames.len().div_ceil(16).max(1) as u64;
                // Unneeded frames (gaps) get the average size of the needed ones.
                let needed_count_f = needed_frames.iter().filter(|&&x| x).count().max(1) as u64;
                let needed_total: u64 = (0..frames.len())
                    .filter(|&f| needed_frames[f])
                    .map(|f| sizes[f])
                    .sum();
                let avg = if estimate {
                    sample_total / frames.len().div_ceil(16) as u64
                } else {
                    needed_total / needed_count_f
                };
                let sizes: Vec<u64> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| if needed_frames[i] { s } else { avg })
                    .collect();
                let fetched = needed_total;
                let ranges = ranges_of(&needed_frames, &sizes);
                let index = {
                    let mut raw: Vec<u8> = new_hashes.iter().flatten().copied().collect();
                    for s in &sizes {
                        raw.extend_from_slice(&(*s as u32).to_le_bytes());
                    }
                    compress_window(&raw, 20).len() as u64
                        + if use_dict { dict.len() as u64 } else { 0 }
                };
                let (r0, b0) = merge(&ranges, 0);
                let (r4, b4) = merge(&ranges, 4096);
                let (r16, b16) = merge(&ranges, 16384);
                let (r64, b64) = merge(&ranges, 65536);
                let (r100, b100) = merge_to(&ranges, 100);
                println!(
                    "  N={n:>2} {} {} {threshold}% -{level:<2}: store ~{}, fetched {} ({:.2}x ideal), +index {} = {:.2}x ideal; ranges {r0} ({}) | gap 4K: {r4} ({}) | 16K: {r16} ({}) | 64K: {r64} ({}) | 100 single: {r100} ({} = {:.2}x ideal with index) [{:.1}s]",
                    if use_dict { "dict" } else { "    " },
                    if sparse_first {
                        "sparse-first"
                    } else {
                        "image-order "
                    },
                    if estimate {
                        mb(store_estimate)
                    } else {
                        "-".into()
                    },
                    mb(fetched),
                    fetched as f64 / ideal.max(1) as f64,
                    mb(index),
                    (fetched + index) as f64 / ideal.max(1) as f64,
                    mb(b0),
                    mb(b4),
                    mb(b16),
                    mb(b64),
                    mb(b100),
                    (b100 + index) as f64 / ideal.max(1) as f64,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
}

fn compress_window(raw: &[u8], window_log: u32) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(LEVEL).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window_log))
        .unwrap();
    c.compress(raw).unwrap()
}
