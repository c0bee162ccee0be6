//! Delta downloads with the block index, measured on the product's code (`cargo bench --bench
//! delta`, after `benches/delta-images` built the images under target/delta-bench/):
//!
//! 1. Per case (a)-(e): `release create`'s index and store of the new image (the library's
//!    builder, default parameters), the device's table of the old image (hashed from the slot)
//!    and the plan against it: bytes to download (index + planned ranges) and HTTP requests, for
//!    a single-range server and a multi-range one, beside the whole image at zstd -19 and the
//!    ideal (zstd -19 of just the blocks found nowhere in the old image).
//! 2. The device side for a 2 GiB slot: building its table (hashing the slot on every core),
//!    from the slot and from an index, and planning against it; then a whole delta install of a
//!    2 GiB image (the slot with 64 runs of new blocks) into an empty 2 GiB slot, the slot as
//!    the booted one, on loopback (index, table, plan, fetch, assembly, read-back). Wall time and
//!    peak RSS (VmHWM) of a child process doing only that, medians of 3, against the issue's
//!    budget of 16 MiB. Runs without the Debian images too (then alone).
//!
//! 3. Per case, the install itself on loopback (`INSTALL=0` skips it): a child process runs the
//!    product's `transfer::install_image` against a static file server on 127.0.0.1 that answers
//!    multi-range requests (the simulated gateway's image server, `sim::ImageServer`), the old
//!    image as the booted slot and an empty inactive slot; beside it the full download of the
//!    whole image at zstd -19 into the same slot. Bytes downloaded (counted by the server), HTTP requests, wall time, the
//!    child's CPU time and peak RSS; medians of 3 rounds, interleaved.
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
use update_agent::delta::plan::{Plan, PlanOptions, Sources, plan};
use update_agent::release::block_index::{self, IndexFile};
use update_agent::release::index_build::{self, BuiltIndex, StoreParams};
use update_agent::release::manifest::{ChunkIndexRef, Image};
use update_agent::sim::{ImageServer, RangeAnswers};

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

/// The table of the slot image `slot`, hashed from it as a device does, written to `out`.
fn build_table(slot: &Path, block_size: u32, out: &Path) {
    TableBuilder::new(block_size)
        .from_slot(
            &File::open(slot).unwrap(),
            std::fs::metadata(slot).unwrap().len(),
            &[0; 32],
            out,
        )
        .unwrap();
}

/// The plan of `index` with the default options against the booted slot's table at `table`.
fn plan_against_booted(index: &IndexFile, table: &Path, scratch: &Path) -> Plan {
    let booted = SlotTable::open(table).unwrap();
    plan(
        index,
        Sources::booted(&booted),
        PlanOptions::default(),
        scratch,
    )
    .unwrap()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/delta-bench");
    std::fs::create_dir_all(&dir).unwrap();
    let only = std::env::var("CASE").ok();
    let scratch = tempfile::tempdir_in(&dir).unwrap();
    let slot_mib: u64 = std::env::var("BENCH_SLOT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    if !dir.join("base.img").exists() {
        // Part 2 makes its own slot: it runs without the Debian images.
        eprintln!(
            "no images in {}: parts 1 and 3 need benches/delta-images (as root); part 2 only",
            dir.display()
        );
        if slot_mib == 0 {
            std::process::exit(2);
        }
        device_side(scratch.path(), slot_mib);
        return;
    }
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
    build_table(&old, params.block_size, &table_path);
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
        let sources = Sources::booted(&booted);
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

    if std::env::var("INSTALL").as_deref() != Ok("0") {
        install_part(&dir, scratch.path(), only.as_deref(), params);
    }

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

/// The whole image at zstd -19 (the zstd tool, two threads; cached under build/).
fn zstd_size(image: &Path) -> u64 {
    std::fs::metadata(zstd_file(image)).unwrap().len()
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
    install_into_slot(scratch, &slot, mib);
    std::fs::remove_file(&slot).unwrap();
}

/// The peak RSS budget of a delta install for a 2 GiB slot (issue 14).
const RSS_BUDGET_MIB: f64 = 16.0;

/// Part 2's whole install: the slot with 64 runs of 8 new blocks (2 MiB, a few files) as the
/// new image, its index and store served by a multi-range server on loopback, installed into an
/// empty slot by a child process with `slot` as the booted slot (its table hashed, as on a
/// device's first delta).
fn install_into_slot(scratch: &Path, slot: &Path, slot_mib: u64) {
    use std::os::unix::fs::FileExt;
    let serve = scratch.join("serve-slot");
    std::fs::create_dir_all(&serve).unwrap();
    let new = serve.join("changed.img");
    std::fs::copy(slot, &new).unwrap();
    {
        let file = std::fs::OpenOptions::new().write(true).open(&new).unwrap();
        let blocks = slot_mib * 256;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut run = vec![0u8; 8 * 4096];
        for i in 0..64u64 {
            for word in run.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                word.copy_from_slice(&x.to_le_bytes());
            }
            let at = (i * (blocks / 64) + 17) % (blocks - 8);
            file.write_all_at(&run, at * 4096).unwrap();
        }
    }
    let params = StoreParams {
        dictionary_size: 0,
        level: 1,
        ..StoreParams::default()
    };
    let started = Instant::now();
    let built = index_build::build(
        &new,
        params,
        &serve.join("changed.img.index"),
        &serve.join("changed.img.store"),
    )
    .unwrap();
    println!(
        "  (index and store of the changed image built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let size = std::fs::metadata(&new).unwrap().len();
    let server = ImageServer::serve_directory(&serve, RangeAnswers::Multipart);
    let mut image = Image::uncompressed(server.url("/changed.img"), size, sha256_file(&new));
    image.chunks = Some(ChunkIndexRef {
        url: server.url("/changed.img.index"),
        sha256: hex::encode(built.index_sha256),
        chunk_size: u64::from(built.header.block_size),
    });
    let (mut walls, mut cpus, mut peaks, mut downloads) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        let target = scratch.join("target-slot");
        File::create(&target).unwrap().set_len(size).unwrap();
        let work = scratch.join("work");
        let _ = std::fs::remove_dir_all(&work);
        let job = serde_json::json!({
            "image": image, "target": target, "booted": slot, "work": work,
        });
        let (report, wall) = install_in_child(&scratch.join("job.json"), &job, &server);
        walls.push(wall);
        assert_eq!(report["delta"], true, "the install took the delta path");
        assert_eq!(sha256_file(&target), sha256_file(&new));
        cpus.push(report["cpu"].as_f64().unwrap());
        peaks.push(report["rss_kib"].as_f64().unwrap() / 1024.0);
        downloads.push(server.body_bytes() as f64);
        std::fs::remove_file(&target).unwrap();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let peak = median(&mut peaks);
    println!(
        "  {:<11} median {:.2} s (cpu {:.2} s), peak RSS {:.1} MiB ({}: budget {RSS_BUDGET_MIB} MiB), downloaded {} of {} (rounds, RSS MiB: {})",
        "install",
        median(&mut walls),
        median(&mut cpus),
        peak,
        if peak <= RSS_BUDGET_MIB {
            "within"
        } else {
            "OVER"
        },
        mb(median(&mut downloads) as u64),
        mib(size),
        peaks
            .iter()
            .map(|p| format!("{p:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(server);
    std::fs::remove_dir_all(&serve).unwrap();
}

/// Part 3: installs on loopback, delta and full, in child processes.
fn install_part(dir: &Path, scratch: &Path, only: Option<&str>, params: StoreParams) {
    println!(
        "\ninstall on loopback (server: static files, multi-range; booted slot: base.img; inactive slot: empty; medians of {ROUNDS}):"
    );
    println!(
        "{:<28} {:<6} {:>10} {:>5} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "case", "how", "download", "req", "wall s", "cpu s", "RSS MiB", "x ideal", "x full"
    );
    let old = dir.join("base.img");
    for case in CASES {
        if only.is_some_and(|o| o != case.new) {
            continue;
        }
        let new = dir.join(format!("{}.img", case.new));
        let (built, index_file, store_path) = build_cached(dir, case.new, &new, params);
        let full_zst = zstd_file(&new);
        // The served directory: links to the cached files.
        let serve = scratch.join(format!("serve-{}", case.new));
        let _ = std::fs::remove_dir_all(&serve);
        std::fs::create_dir_all(&serve).unwrap();
        let name = format!("{}.img", case.new);
        std::fs::hard_link(&index_file, serve.join(format!("{name}.index"))).unwrap();
        std::fs::hard_link(&store_path, serve.join(format!("{name}.store"))).unwrap();
        std::fs::hard_link(&full_zst, serve.join(format!("{name}.zst"))).unwrap();
        let server = ImageServer::serve_directory(&serve, RangeAnswers::Multipart);
        let size = std::fs::metadata(&new).unwrap().len();
        let sha256: [u8; 32] = sha256_file(&new);
        let zst_len = std::fs::metadata(&full_zst).unwrap().len();
        let mut image = Image {
            url: server.url(&format!("/{name}.zst")),
            size,
            sha256: hex::encode(sha256),
            compression: Some(update_agent::release::manifest::Compression::Zstd),
            transport_size: Some(zst_len),
            transport_sha256: Some(hex::encode(sha256_file(&full_zst))),
            chunks: None,
        };
        let full_image = image.clone();
        image.chunks = Some(ChunkIndexRef {
            url: server.url(&format!("/{name}.index")),
            sha256: hex::encode(built.index_sha256),
            chunk_size: u64::from(built.header.block_size),
        });
        // The ideal, from a plan against the booted slot as the install makes it.
        let index = expand(&index_file, &new, &built, scratch);
        let table = scratch.join("ideal.table");
        build_table(&old, params.block_size, &table);
        let p = plan_against_booted(&index, &table, scratch);
        let ideal = ideal_bytes(&new, &index, &p);
        drop((index, p));

        let mut rows: Vec<(&str, Vec<[f64; 5]>)> =
            vec![("delta", Vec::new()), ("full", Vec::new())];
        for _ in 0..ROUNDS {
            for (how, results) in rows.iter_mut() {
                let target = scratch.join("target-slot");
                let _ = std::fs::remove_file(&target);
                File::create(&target).unwrap().set_len(size).unwrap();
                let image = if *how == "delta" { &image } else { &full_image };
                let job = serde_json::json!({
                    "image": image,
                    "target": target,
                    "booted": old,
                    "work": scratch.join("work"),
                });
                // A device meets each release once: the index is downloaded every round.
                let _ = std::fs::remove_dir_all(scratch.join("work"));
                let (report, wall) = install_in_child(&scratch.join("job.json"), &job, &server);
                let downloaded: u64 = server.body_bytes();
                let requests = server.seen().len() as f64;
                results.push([
                    downloaded as f64,
                    requests,
                    wall,
                    report["cpu"].as_f64().unwrap(),
                    report["rss_kib"].as_f64().unwrap() / 1024.0,
                ]);
                let _ = std::fs::remove_file(&target);
            }
        }
        for (how, results) in &rows {
            let median = |k: usize| {
                let mut v: Vec<f64> = results.iter().map(|r| r[k]).collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                v[v.len() / 2]
            };
            let bytes = median(0);
            println!(
                "{:<28} {:<6} {:>10} {:>5} {:>8.2} {:>8.2} {:>8.1} {:>9} {:>9.3}",
                case.label,
                how,
                mb(bytes as u64),
                median(1),
                median(2),
                median(3),
                median(4),
                if ideal == 0 {
                    "-".into()
                } else {
                    format!("{:.2}", bytes / ideal as f64)
                },
                bytes / zst_len as f64,
            );
        }
        println!(
            "{:<28} ideal {} (zstd -19 of the blocks found nowhere locally), full {} (zstd -19 of the image), index {}",
            "",
            mb(ideal),
            mb(zst_len),
            mb(built.index_size)
        );
        drop(server);
        std::fs::remove_dir_all(&serve).unwrap();
    }
    println!(
        "(download: body bytes the server sent, index and probe included; req: HTTP requests; cpu: the installing process's user+system time; the images are in the page cache)"
    );
}

/// One install job (image, target, booted slot, work directory) written to `job_path` and run
/// by a fresh child process of this bench, so that its peak RSS is the install's alone; the
/// server's request log is cleared first. The child's report and the wall time in seconds.
fn install_in_child(
    job_path: &Path,
    job: &serde_json::Value,
    server: &ImageServer,
) -> (serde_json::Value, f64) {
    std::fs::write(job_path, serde_json::to_vec(job).unwrap()).unwrap();
    server.forget_seen();
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--child", "install"])
        .arg(job_path)
        .output()
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout).expect("the child's report");
    (report, wall)
}

fn sha256_file(path: &Path) -> [u8; 32] {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut file = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().into()
}

/// The whole image at zstd -19 as a file (cached beside the builds).
fn zstd_file(image: &Path) -> PathBuf {
    let out = image.parent().unwrap().join("build").join(format!(
        "{}.zst",
        image.file_name().unwrap().to_string_lossy()
    ));
    if !out.exists() {
        let part = out.with_extension("zst.part");
        let status = Command::new("zstd")
            .args(["-19", "-T2", "-q", "-f", "-o"])
            .arg(&part)
            .arg(image)
            .status()
            .expect("zstd");
        assert!(status.success());
        std::fs::rename(&part, &out).unwrap();
    }
    out
}

/// The child of part 3: one install, then its CPU time and peak RSS as JSON.
fn child_install(job: &Path) {
    let job: serde_json::Value = serde_json::from_slice(&std::fs::read(job).unwrap()).unwrap();
    let image: Image = serde_json::from_value(job["image"].clone()).unwrap();
    let path = |k: &str| PathBuf::from(job[k].as_str().unwrap());
    let size = image.size;
    let mut req = update_agent::transfer::WriteRequest::new(image, path("target"), size);
    req.delta = Some(update_agent::transfer::DeltaSettings {
        work_dir: path("work"),
        booted: Some(update_agent::transfer::BootedSlot {
            path: path("booted"),
            key: None,
        }),
        full_download_fallback: false,
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = runtime
        .block_on(update_agent::transfer::install_image_with_stats(
            &req,
            &mut |_| Ok(()),
        ))
        .unwrap()
        .1;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    println!(
        "{}",
        serde_json::json!({
            "cpu": secs(usage.user_time()) + secs(usage.system_time()),
            "rss_kib": peak_rss_kib(),
            "delta": stats.is_some(),
        })
    );
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// Prints the peak RSS in KiB after doing one thing.
fn child(args: &[String]) {
    if args[0] == "install" {
        child_install(Path::new(&args[1]));
        return;
    }
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
            let p = plan_against_booted(&index, &table, scratch);
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
