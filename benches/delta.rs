//! Delta downloads with the block index, measured on the product's code (`cargo bench --bench
//! delta`, after `benches/delta-images` built the images under target/delta-bench/):
//!
//! 1. Per case (a)-(e): `release create`'s index and store of the new image (the library's
//!    builder, default parameters), the device's table of the old image (hashed from the slot)
//!    and the plan against it: bytes to download (index + planned ranges) and HTTP requests, for
//!    a single-range server and a multi-range one, beside the whole image at zstd -19 and the
//!    ideal (zstd -19 of just the blocks found nowhere in the old image).
//! 2. The device side for a 2 GiB slot: building its table (hashing the slot on every core),
//!    from the slot and from an index, and planning against it; wall time and peak RSS (VmHWM) of
//!    a child process doing only that, medians of 3.
//!
//! Built stores are cached under target/delta-bench/build/ (a level-19 store of a 320 MiB image
//! takes minutes on two cores). `CASE=curl` runs one case; `BENCH_SLOT_MIB` sets part 2's size
//! (0 skips it).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use update_agent::delta::lookup::{SlotTable, TableBuilder};
use update_agent::delta::plan::{PlanOptions, Sources, plan};
use update_agent::release::block_index::{self, IndexFile};
use update_agent::release::index_build::{self, BuiltIndex, StoreParams};
use update_agent::release::manifest::{ChunkIndexRef, Image};

const ROUNDS: usize = 3;

struct Case {
    label: &'static str,
    new: &'static str,
}

const CASES: &[Case] = &[
    Case {
        label: "(a) same image",
        new: "base",
    },
    Case {
        label: "(b) curl added",
        new: "curl",
    },
    Case {
        label: "(c) libssl3 upgraded",
        new: "libssl",
    },
    Case {
        label: "(d) 1 % blocks random",
        new: "random",
    },
    Case {
        label: "(e) half the files changed",
        new: "major",
    },
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/delta-bench");
    if !dir.join("base.img").exists() {
        eprintln!("no images: run benches/delta-images first (as root)");
        std::process::exit(2);
    }
    let only = std::env::var("CASE").ok();
    let scratch = tempfile::tempdir_in(&dir).unwrap();
    println!("delta: images in {}", dir.display());
    let params = StoreParams::default();
    println!(
        "store parameters: {} B blocks, {} block(s) a frame, {} B dictionary, zstd -{}",
        params.block_size, params.blocks_per_frame, params.dictionary_size, params.level
    );

    // The device's table of the old image, hashed from the slot as a device would.
    let old = dir.join("base.img");
    let table_path = scratch.path().join("booted.table");
    let started = Instant::now();
    TableBuilder::new(params.block_size)
        .from_slot(
            &File::open(&old).unwrap(),
            std::fs::metadata(&old).unwrap().len(),
            &[0; 32],
            &table_path,
        )
        .unwrap();
    println!(
        "table of the old image (320 MiB, hashed): {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let booted = SlotTable::open(&table_path).unwrap();

    println!(
        "\n{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:>8} {:>8}",
        "case",
        "needed",
        "ideal",
        "full",
        "index",
        "single",
        "req",
        "multi",
        "req",
        "x ideal",
        "x full"
    );
    for case in CASES {
        if only.as_deref().is_some_and(|o| o != case.new) {
            continue;
        }
        let new = dir.join(format!("{}.img", case.new));
        let (built, index_file, store_path) = build_cached(&dir, case.new, &new, params);
        let index = expand(&index_file, &new, &built, scratch.path());
        let sources = Sources {
            booted: Some(&booted),
            target: None,
        };
        let full = zstd_size(&new);
        // Never more than the full download would cost: past it, more requests.
        let budget = Some(full.saturating_sub(built.index_size));
        let single = PlanOptions {
            max_download: budget,
            ..PlanOptions::default()
        };
        let multi = PlanOptions {
            ranges_per_request: 32,
            max_download: budget,
            ..PlanOptions::default()
        };
        let started = Instant::now();
        let plan_single = plan(&index, sources, single, scratch.path()).unwrap();
        let plan_time = started.elapsed();
        let plan_multi = plan(&index, sources, multi, scratch.path()).unwrap();
        let s = *plan_single.summary();
        let m = *plan_multi.summary();
        let ideal = ideal_bytes(&new, &index, &plan_single);
        let single_bytes = built.index_size + s.download_bytes;
        let multi_bytes = built.index_size + m.download_bytes;
        // The index is one more request.
        let single_requests = 1 + s.requests;
        let multi_requests = 1 + m.requests;
        println!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:>8} {:>8}",
            case.label,
            mib(s.fetched_blocks * u64::from(params.block_size)),
            mb(ideal),
            mb(full),
            mb(built.index_size),
            mb(single_bytes),
            single_requests,
            mb(multi_bytes),
            multi_requests,
            if ideal == 0 {
                "-".into()
            } else {
                format!("{:.2}", single_bytes as f64 / ideal as f64)
            },
            format!("{:.3}", single_bytes as f64 / full as f64),
        );
        println!(
            "{:<28} {} blocks fetched in {} frames ({} compressed, {} with merged gaps up to {} B), {} copied, {} zero; store {}; plan {:.2} s",
            "",
            s.fetched_blocks,
            s.needed_frames,
            mb(s.needed_bytes),
            mb(s.download_bytes),
            s.merge_gap,
            s.copied_from_booted,
            s.zero_blocks,
            mb(std::fs::metadata(&store_path).unwrap().len()),
            plan_time.as_secs_f64()
        );
    }
    println!(
        "(needed: 4 KiB blocks found nowhere in the old image; ideal: zstd -19 of just them; full: the whole new image at zstd -19; single/multi: index + planned ranges for a single-range / 32-range server; req: HTTP requests incl. the index)"
    );

    let slot_mib: u64 = std::env::var("BENCH_SLOT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    if slot_mib > 0 {
        device_side(scratch.path(), slot_mib);
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// Builds (or takes from the cache) the index and store of `image`.
fn build_cached(
    dir: &Path,
    name: &str,
    image: &Path,
    params: StoreParams,
) -> (BuiltIndex, PathBuf, PathBuf) {
    let tag = format!(
        "{name}-{}-{}-{}-{}",
        params.block_size, params.blocks_per_frame, params.dictionary_size, params.level
    );
    let out = dir.join("build").join(&tag);
    std::fs::create_dir_all(&out).unwrap();
    let index = out.join(format!("{name}.img.index"));
    let store = out.join(format!("{name}.img.store"));
    let stamp = out.join("built");
    let image_time = std::fs::metadata(image).unwrap().modified().unwrap();
    let fresh = std::fs::metadata(&stamp)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t > image_time);
    if !fresh {
        let started = Instant::now();
        index_build::build(image, params, &index, &store).unwrap();
        std::fs::write(&stamp, b"").unwrap();
        println!(
            "built the index and store of {name}.img in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    let bytes = std::fs::read(&index).unwrap();
    let header = block_index::IndexHeader::parse(&bytes).unwrap();
    let built = BuiltIndex {
        header,
        index_sha256: Sha256::digest(&bytes).into(),
        index_size: bytes.len() as u64,
    };
    (built, index, store)
}

fn refs(image: &Path, built: &BuiltIndex) -> (Image, ChunkIndexRef) {
    let chunks = ChunkIndexRef {
        url: "https://updates.example.com/image.index".into(),
        sha256: hex::encode(built.index_sha256),
        chunk_size: u64::from(built.header.block_size),
    };
    let mut entry = Image::uncompressed(
        "https://updates.example.com/image",
        std::fs::metadata(image).unwrap().len(),
        [0; 32],
    );
    entry.chunks = Some(chunks.clone());
    (entry, chunks)
}

fn expand(index: &Path, image: &Path, built: &BuiltIndex, scratch: &Path) -> IndexFile {
    let (entry, chunks) = refs(image, built);
    block_index::expand(
        std::io::BufReader::new(File::open(index).unwrap()),
        &entry,
        &chunks,
        &scratch.join("new.index"),
    )
    .unwrap()
}

/// zstd -19 of just the blocks the plan fetches.
fn ideal_bytes(image: &Path, index: &IndexFile, plan: &update_agent::delta::plan::Plan) -> u64 {
    use std::os::unix::fs::FileExt;
    let file = File::open(image).unwrap();
    let mut needed = Vec::new();
    for step in plan.steps() {
        let step = step.unwrap();
        if let update_agent::delta::plan::Action::Fetch { .. } = step.action {
            for block in step.blocks {
                let len = index.header().block_len(block);
                let at = needed.len();
                needed.resize(at + len, 0);
                file.read_exact_at(
                    &mut needed[at..],
                    block * u64::from(index.header().block_size),
                )
                .unwrap();
            }
        }
    }
    if needed.is_empty() {
        return 0;
    }
    zstd::bulk::compress(&needed, 19).unwrap().len() as u64
}

/// The whole image at zstd -19 (the zstd tool, two threads; cached beside the image).
fn zstd_size(image: &Path) -> u64 {
    let cache = PathBuf::from(format!("{}.zst19.size", image.display()));
    if let Ok(text) = std::fs::read_to_string(&cache) {
        return text.trim().parse().unwrap();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -19 -T2 -c -q '{}' | wc -c", image.display()))
        .output()
        .expect("zstd");
    let size: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::fs::write(&cache, size.to_string()).unwrap();
    size
}

/// Part 2: a slot of `mib` MiB of distinct blocks; its table built by a child process from the
/// slot and from an index, and a plan against it; wall time and peak RSS.
fn device_side(scratch: &Path, mib: u64) {
    println!(
        "\ndevice side, {mib} MiB slot ({} blocks of 4 KiB):",
        mib * 256
    );
    let slot = scratch.join("slot");
    {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(File::create(&slot).unwrap());
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut block = [0u8; 4096];
        for _ in 0..mib * 256 {
            for word in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            out.write_all(&block).unwrap();
        }
    }
    // The slot's index, as its release would carry it (no store compression needed here: the
    // frames are not read; level 1 keeps this quick).
    let index_path = scratch.join("slot.index");
    let params = StoreParams {
        dictionary_size: 0,
        level: 1,
        ..StoreParams::default()
    };
    let built =
        index_build::build(&slot, params, &index_path, &scratch.join("slot.store")).unwrap();
    let expanded = expand(&index_path, &slot, &built, scratch);
    drop(expanded);
    std::fs::remove_file(scratch.join("slot.store")).unwrap();
    let exe = std::env::current_exe().unwrap();
    for what in ["from-slot", "from-index", "plan"] {
        let mut times = Vec::new();
        let mut peaks = Vec::new();
        for _ in 0..ROUNDS {
            let started = Instant::now();
            let out = Command::new(&exe)
                .args(["--child", what])
                .arg(scratch)
                .output()
                .unwrap();
            times.push(started.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let kib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            peaks.push(kib);
        }
        times.sort();
        peaks.sort();
        println!(
            "  {what:<11} median {:.2} s, peak RSS {:.1} MiB (rounds: {})",
            times[ROUNDS / 2].as_secs_f64(),
            peaks[ROUNDS / 2] as f64 / 1024.0,
            times
                .iter()
                .map(|t: &Duration| format!("{:.2}", t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    std::fs::remove_file(&slot).unwrap();
}

/// Prints the peak RSS in KiB after doing one thing.
fn child(args: &[String]) {
    let scratch = Path::new(&args[1]);
    let slot = scratch.join("slot");
    let table = scratch.join(format!("child-{}.table", args[0]));
    let builder = TableBuilder::new(4096);
    match args[0].as_str() {
        "from-slot" => {
            let file = File::open(&slot).unwrap();
            let len = file.metadata().unwrap().len();
            builder.from_slot(&file, len, &[1; 32], &table).unwrap();
        }
        "from-index" => {
            let index = IndexFile::open(&scratch.join("new.index")).unwrap();
            builder.from_index(&index, &[1; 32], &table).unwrap();
        }
        "plan" => {
            // The slot's own index against the table of the slot: every block is found.
            let index = IndexFile::open(&scratch.join("new.index")).unwrap();
            let table = scratch.join("child-from-slot.table");
            let booted = SlotTable::open(&table).unwrap();
            let p = plan(
                &index,
                Sources {
                    booted: Some(&booted),
                    target: None,
                },
                PlanOptions::default(),
                scratch,
            )
            .unwrap();
            assert_eq!(p.summary().fetched_blocks, 0);
        }
        other => panic!("unknown child {other}"),
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .to_string();
    println!("{hwm}");
}
