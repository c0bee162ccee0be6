//! The block index end to end on real ext4 images (`mkfs.ext4 -d`): `release create` writes a
//! directory to serve (image, index, store); a device's side — the index expanded against the
//! signed manifest, the old slot's table, the plan, the assembly with every block checked —
//! rebuilds the new image exactly from the old slot and the planned store ranges. Tampering with
//! the served index or store is refused with a reason code, never written.
//!
//! The HTTP fetch and the slot writer are the install path's (not yet wired): here the planned
//! ranges are read from the served store file.
#![cfg(feature = "operator")]

mod common;
use common::assert_exit;

use std::fs;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use sha2::{Digest, Sha256};
use update_agent::delta::assemble::{AssembleError, FrameSource, Locals, Write, assemble};
use update_agent::delta::lookup::{SlotTable, TableBuilder};
use update_agent::delta::plan::{PlanOptions, Sources, plan};
use update_agent::reason::ReasonCode::{self, DecompressFailed, HashMismatch, Malformed};
use update_agent::release::block_index::{self, IndexError, IndexFile};
use update_agent::release::{Manifest, Refusal};

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");

/// A small root filesystem: binaries-like random files, text files, directories.
fn tree(dir: &Path, extra: bool) {
    for d in 0..12u64 {
        let sub = dir.join(format!("usr/lib/pkg{d}"));
        fs::create_dir_all(&sub).unwrap();
        for f in 0..6u64 {
            let len = 3000 + ((d * 7 + f * 13) % 9) as usize * 4096;
            fs::write(
                sub.join(format!("lib{f}.so")),
                common::pattern(len, d * 100 + f),
            )
            .unwrap();
            fs::write(
                sub.join(format!("README{f}")),
                format!("package {d} file {f}\n").repeat(40),
            )
            .unwrap();
        }
    }
    if extra {
        // One package more, and one file changed.
        let sub = dir.join("usr/lib/curl");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join("libcurl.so"), common::pattern(150_000, 4242)).unwrap();
        fs::write(dir.join("usr/lib/pkg3/README0"), "changed\n").unwrap();
    }
}

fn ext4(dir: &Path, name: &str, extra: bool) -> PathBuf {
    let mkfs = common::require("mkfs.ext4", "e2fsprogs");
    let root = dir.join(format!("tree-{name}"));
    tree(&root, extra);
    let image = dir.join(format!("{name}.img"));
    common::sim::tools::run_ok(
        Command::new(mkfs)
            .env("E2FSPROGS_FAKE_TIME", "1767225600")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-U",
                "5b1f0c0e-1d2a-4c3b-9e4f-0a1b2c3d4e5f",
            ])
            .args(["-E", "hash_seed=0d6a5c4b-3a29-4817-8f6e-5d4c3b2a1908", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("16M"),
    )
    .unwrap();
    image
}

struct Release {
    dir: tempfile::TempDir,
    old: PathBuf,
    new: PathBuf,
    serve: PathBuf,
    manifest: Manifest,
}

fn run(args: &[&str], paths: &[&Path]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args);
    command.args(paths);
    command.output().unwrap()
}

/// `refusal` gives one of `codes` as its reason.
fn assert_refused_for(refusal: &Refusal, codes: &[ReasonCode], what: &str) {
    assert!(codes.contains(&refusal.code), "{what}: {refusal}");
}

fn make_release() -> Release {
    let dir = tempfile::tempdir().unwrap();
    let old = ext4(dir.path(), "old", false);
    let new = ext4(dir.path(), "new", true);
    let key = dir.path().join("signer");
    let out = run(&["keygen", "--out"], &[&key]);
    assert_exit(&out, 0, "keygen");
    let serve = dir.path().join("serve");
    let out = common::release_create(
        &dir.path().join("signer.key"),
        &new,
        ["2", "2"],
        "gw",
        "http://updates.example.com/v2/new.img.zst",
    )
    .args(["--compress", "zstd"])
    .arg("--out-dir")
    .arg(&serve)
    .arg("--out")
    .arg(serve.join("release.json"))
    .output()
    .unwrap();
    assert_exit(&out, 0, "release create");
    let release: serde_json::Value =
        serde_json::from_slice(&fs::read(serve.join("release.json")).unwrap()).unwrap();
    let manifest_bytes = base64::engine::general_purpose::STANDARD
        .decode(release["manifest"].as_str().unwrap())
        .unwrap();
    let manifest = Manifest::parse(&manifest_bytes).unwrap();
    Release {
        dir,
        old,
        new,
        serve,
        manifest,
    }
}

/// The planned ranges of the store, as a server would send them; frames outside them are
/// counted (an executor would fetch them with a request of its own).
struct ServedStore {
    store: Vec<u8>,
    frames: Vec<block_index::Frame>,
    requested: Vec<bool>,
    unplanned: u64,
}

impl FrameSource for ServedStore {
    fn compressed(&mut self, frame: u64) -> std::io::Result<Vec<u8>> {
        let f = self.frames[frame as usize];
        let range = f.offset as usize..(f.offset + f.size) as usize;
        if !self.requested[range.clone()].iter().all(|&r| r) {
            self.unplanned += 1;
        }
        Ok(self.store[range].to_vec())
    }
}

#[test]
fn release_create_serves_a_directory_from_which_a_delta_rebuilds_the_image() {
    let r = make_release();
    let image = &r.manifest.images["rootfs"];
    assert_eq!(
        r.manifest.format, 1,
        "a release with a block index stays format 1"
    );
    let chunks = image.chunks.as_ref().expect("a block index by default");
    assert_eq!(
        chunks.url,
        "http://updates.example.com/v2/new.img.zst.index"
    );
    assert_eq!(chunks.chunk_size, 4096);
    let mut served: Vec<String> = fs::read_dir(&r.serve)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    served.sort();
    assert_eq!(
        served,
        [
            "new.img.zst",
            "new.img.zst.index",
            "new.img.zst.store",
            "release.json"
        ]
    );

    // The device's side: the served index, checked against the signed manifest.
    let state = r.dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let index = block_index::expand(
        BufReader::new(fs::File::open(r.serve.join("new.img.zst.index")).unwrap()),
        image,
        chunks,
        &state.join("new.index"),
    )
    .unwrap();
    assert_eq!(index.header().store_name, "new.img.zst.store");
    let store = fs::read(r.serve.join(&index.header().store_name)).unwrap();
    assert_eq!(store.len() as u64, index.header().store_size);

    // The booted slot holds the old image; its table, then the plan.
    let old = fs::File::open(&r.old).unwrap();
    let table = state.join("booted.table");
    TableBuilder::new(4096)
        .from_slot(&old, old.metadata().unwrap().len(), &[1; 32], &table)
        .unwrap();
    let booted = SlotTable::open(&table).unwrap();
    let sources = Sources::booted(&booted);
    let plan = plan(&index, sources, PlanOptions::default(), &state).unwrap();
    let summary = *plan.summary();
    let new_bytes = fs::read(&r.new).unwrap();
    let transport = image.transport_size.unwrap();
    let index_size = fs::metadata(r.serve.join("new.img.zst.index"))
        .unwrap()
        .len();
    assert!(
        summary.fetched_blocks > 0 && summary.copied_from_booted > 0,
        "{summary:?}"
    );
    assert!(
        index_size + summary.download_bytes < transport,
        "the delta ({} + {} bytes) is smaller than the compressed image ({transport})",
        index_size,
        summary.download_bytes
    );
    assert!(summary.requests <= 100);

    // Carry it out: every block checked, the result is the signed image.
    let mut requested = vec![false; store.len()];
    for request in plan.requests() {
        for range in request.unwrap().ranges {
            requested[range.offset as usize..range.end() as usize].fill(true);
        }
    }
    let mut frames = ServedStore {
        frames: index.frames().map(Result::unwrap).collect(),
        store,
        requested,
        unplanned: 0,
    };
    let target_path = r.dir.path().join("target-slot");
    let target = fs::File::create(&target_path).unwrap();
    let stats = assemble(
        &plan,
        &index,
        Locals {
            booted: Some(&old),
            target: None,
        },
        &mut frames,
        &mut |block, write| match write {
            Write::Bytes(bytes) => target.write_all_at(bytes, block * 4096),
            Write::Kept => unreachable!("no target table was given"),
        },
    )
    .unwrap();
    assert_eq!(frames.unplanned, 0);
    assert_eq!(stats.fallback_blocks, 0);
    assert_eq!(stats.fetched_blocks, summary.fetched_blocks);
    let written = fs::read(&target_path).unwrap();
    assert_eq!(written.len(), new_bytes.len());
    assert_eq!(hex::encode(Sha256::digest(&written)), image.sha256);
}

#[test]
fn a_changed_store_is_refused_block_by_block_and_nothing_unverified_is_written() {
    let r = make_release();
    let image = &r.manifest.images["rootfs"];
    let chunks = image.chunks.as_ref().unwrap();
    let state = tempfile::tempdir().unwrap();
    let index = block_index::expand(
        BufReader::new(fs::File::open(r.serve.join("new.img.zst.index")).unwrap()),
        image,
        chunks,
        &state.path().join("new.index"),
    )
    .unwrap();
    let plan = plan(
        &index,
        Sources::default(),
        PlanOptions::default(),
        state.path(),
    )
    .unwrap();
    let good = fs::read(r.serve.join("new.img.zst.store")).unwrap();
    let frames: Vec<block_index::Frame> = index.frames().map(Result::unwrap).collect();
    // Another frame in the place of one of the same size (a server mixing up offsets), and a
    // flipped byte in a frame (broken on the way).
    let twins = frames
        .iter()
        .find_map(|a| {
            frames
                .iter()
                .find(|b| b.size == a.size && b.frame != a.frame)
                .map(|b| (a.frame as usize, b.frame as usize))
        })
        .expect("two frames of one size");
    for (what, edit) in [("swapped", twins.0), ("flipped", 9)] {
        let mut store = good.clone();
        let f = frames[edit];
        let range = f.offset as usize..(f.offset + f.size) as usize;
        if what == "swapped" {
            let other = frames[twins.1];
            let bytes = good[other.offset as usize..(other.offset + other.size) as usize].to_vec();
            store[range].copy_from_slice(&bytes);
        } else {
            store[range.start + range.len() / 2] ^= 0x40;
        }
        let mut source = ServedStore {
            frames: frames.clone(),
            requested: vec![true; store.len()],
            store,
            unplanned: 0,
        };
        let mut written = Vec::new();
        let err = assemble(
            &plan,
            &index,
            Locals::default(),
            &mut source,
            &mut |block, write| {
                if let Write::Bytes(bytes) = write {
                    assert!(
                        index.verify_block(block, bytes).unwrap(),
                        "{what}: unverified block {block}"
                    );
                }
                written.push(block);
                Ok(())
            },
        )
        .unwrap_err();
        match &err {
            AssembleError::Refused(refusal) => {
                assert_refused_for(refusal, &[HashMismatch, DecompressFailed], what)
            }
            other => panic!("{what}: {other}"),
        }
        assert!(err.reason().is_tamper_alert() || err.reason() == ReasonCode::DecompressFailed);
        // Blocks went out in order, each verified (checked in the sink), and the install
        // stopped at a block of the bad frame: a flipped byte may leave the frame's first blocks
        // intact, so the refusal comes at the first block it changed, never later.
        assert!(
            written.iter().enumerate().all(|(i, &b)| b == i as u64),
            "{what}: written in order from block 0"
        );
        let stopped_at = written.len() as u64;
        let entry = index
            .entries()
            .map(Result::unwrap)
            .nth(stopped_at as usize)
            .unwrap();
        match entry.location {
            block_index::BlockLocation::Stored { ordinal, .. } => {
                assert_eq!(index.frame_of(ordinal), edit as u64, "{what}")
            }
            other => panic!("{what}: stopped at block {stopped_at}, {other:?}"),
        }
    }
}

#[test]
fn a_changed_index_is_refused_before_anything_is_read_from_it() {
    let r = make_release();
    let index_path = r.serve.join("new.img.zst.index");
    let mut bytes = fs::read(&index_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let tampered = r.dir.path().join("tampered.index");
    fs::write(&tampered, &bytes).unwrap();
    let image = &r.manifest.images["rootfs"];
    let state = tempfile::tempdir().unwrap();
    let dest = state.path().join("new.index");
    let err =
        block_index::expand(&bytes[..], image, image.chunks.as_ref().unwrap(), &dest).unwrap_err();
    match err {
        IndexError::Refused(refusal) => {
            assert_refused_for(&refusal, &[HashMismatch, Malformed], "a changed index")
        }
        other => panic!("{other}"),
    }
    assert!(!dest.exists());
    assert!(IndexFile::open(&dest).is_err());

    // The operator's check says the same.
    let out = run(
        &["release", "inspect", "--index"],
        &[&tampered, &r.serve.join("release.json")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hash-mismatch") || stderr.contains("malformed"),
        "{stderr}"
    );
    let out = run(
        &["release", "inspect", "--json", "--index"],
        &[&index_path, &r.serve.join("release.json")],
    );
    assert_exit(&out, 0, "release inspect");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["index"]["block_size"], 4096);
    assert_eq!(json["index"]["blocks"], 4096);
    assert!(json["index"]["zero_blocks"].as_u64().unwrap() > 0);
}

#[test]
fn an_old_agent_reads_the_release_as_a_full_download() {
    // What every agent before the block index checks: the manifest, strictly. It has no field
    // those agents do not know, so `release verify` (the same parser) accepts it.
    let r = make_release();
    let keys = r.dir.path().join("keys");
    fs::create_dir(&keys).unwrap();
    fs::copy(r.dir.path().join("signer.pub"), keys.join("signer.pub")).unwrap();
    let out = run(
        &["release", "verify", "--compatible", "gw", "--keys"],
        &[&keys, &r.serve.join("release.json")],
    );
    assert_exit(&out, 0, "release verify");
    let manifest = serde_json::to_value(&r.manifest).unwrap();
    let chunks = &manifest["images"]["rootfs"]["chunks"];
    let mut keys: Vec<&str> = chunks
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["chunk_size", "sha256", "url"],
        "format 1's chunk index, unchanged"
    );
}

/// Seeds for the fuzzer (`fuzz/README.md`): served indexes made by the builder from fixed
/// synthetic images — with and without a dictionary, one and three blocks a frame, a short last
/// block, an image of zeros only.
fn seed_indexes() -> Vec<(&'static str, Vec<u8>)> {
    use update_agent::release::index_build::{self, StoreParams};
    let dir = tempfile::tempdir().unwrap();
    let mixed: Vec<u8> = (0..300u64)
        .flat_map(|i| match i % 5 {
            0 => vec![0u8; 4096],
            1 => {
                let mut sparse = vec![0u8; 4096];
                sparse[..64].copy_from_slice(&common::pattern(64, i));
                sparse
            }
            _ => common::pattern(4096, i % 40),
        })
        .collect();
    let mut short = mixed[..20 * 4096].to_vec();
    short.extend_from_slice(&common::pattern(1000, 7));
    let cases: [(&str, &[u8], StoreParams); 3] = [
        (
            "dictionary",
            &mixed,
            StoreParams {
                level: 3,
                ..StoreParams::default()
            },
        ),
        (
            "short-last-block-3-per-frame",
            &short,
            StoreParams {
                blocks_per_frame: 3,
                dictionary_size: 0,
                level: 3,
                ..StoreParams::default()
            },
        ),
        (
            "zeros-only",
            &[0u8; 5 * 4096],
            StoreParams {
                level: 3,
                ..StoreParams::default()
            },
        ),
    ];
    cases
        .into_iter()
        .map(|(name, image, params)| {
            let path = dir.path().join(name);
            fs::write(&path, image).unwrap();
            let index = dir.path().join(format!("{name}.index"));
            index_build::build(
                &path,
                params,
                &index,
                &dir.path().join(format!("{name}.store")),
            )
            .unwrap();
            (name, fs::read(index).unwrap())
        })
        .collect()
}

#[test]
fn index_seed_corpus_is_what_the_builder_makes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/indexes");
    let seeds = seed_indexes();
    if std::env::var_os("UPDATE_AGENT_WRITE_CORPUS").is_some() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        for (name, bytes) in &seeds {
            fs::write(root.join(format!("{name}.index")), bytes).unwrap();
        }
    }
    let regenerate = "regenerate with UPDATE_AGENT_WRITE_CORPUS=1 cargo test --test block_index";
    let mut on_disk: Vec<String> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}; {regenerate}", root.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = seeds.iter().map(|(n, _)| format!("{n}.index")).collect();
    expected.sort();
    assert_eq!(on_disk, expected, "{regenerate}");
    for (name, bytes) in &seeds {
        assert!(
            fs::read(root.join(format!("{name}.index"))).unwrap() == *bytes,
            "{name}.index differs from the builder's; {regenerate}"
        );
        // Each seed is a valid index for its image.
        let header = block_index::IndexHeader::parse(bytes).unwrap();
        let chunks = update_agent::release::manifest::ChunkIndexRef {
            url: "https://updates.example.com/seed.index".into(),
            sha256: hex::encode(Sha256::digest(bytes)),
            chunk_size: u64::from(header.block_size),
        };
        let mut image = update_agent::release::manifest::Image::uncompressed(
            "https://u.example/i",
            header.image_size,
            [0; 32],
        );
        image.chunks = Some(chunks.clone());
        let dir = tempfile::tempdir().unwrap();
        block_index::expand(&bytes[..], &image, &chunks, &dir.path().join("i")).unwrap();
    }
}
