//! Delta installs against a real HTTP server on 127.0.0.1 that serves a release directory
//! (image, block index, block store) with Range support as nginx has it (multi-range), as S3
//! has it (single ranges), or none: the new image is rebuilt from the booted slot and the
//! inactive slot's own blocks plus the few fetched, every block checked against the signed
//! index; a server that ignores Range, an index or a store that do not match are refused and
//! leave no unverified block in the slot; an agent killed (SIGKILL) during a delta resumes and
//! fetches only what it had not written yet.
#![cfg(feature = "operator")]

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::sim::RangeAnswers;
use common::{ImageServer, assert_exit, pattern, wait_for};
use sha2::{Digest, Sha256};
use update_agent::reason::ReasonCode;
use update_agent::release::index_build::{self, StoreParams};
use update_agent::release::manifest::{ChunkIndexRef, Image};
use update_agent::transfer::{
    self, BootedSlot, DeltaSettings, DeltaStats, TransferError, TransferEvent, WriteRequest,
};

const BS: usize = 4096;
/// 6 MiB of 4 KiB blocks.
const BLOCKS: usize = 1536;

/// The old image: distinct blocks, with runs of zeros as a filesystem has.
fn old_image() -> Vec<u8> {
    let mut image = Vec::with_capacity(BLOCKS * BS);
    for b in 0..BLOCKS {
        if b % 97 < 5 {
            image.extend_from_slice(&[0u8; BS]);
        } else {
            image.extend_from_slice(&pattern(BS, 1_000 + b as u64));
        }
    }
    image
}

/// The new image: the old one with files moved (runs shifted by three blocks), some blocks new
/// (a package added, a file changed) and a few zeroed.
fn new_image(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    // A run of 200 blocks moves three blocks up.
    let (from, to, run) = (300 * BS, 303 * BS, 200 * BS);
    new[to..to + run].copy_from_slice(&old[from..from + run]);
    // And one of 100 three blocks down.
    let (from, to, run) = (600 * BS, 597 * BS, 100 * BS);
    new[to..to + run].copy_from_slice(&old[from..from + run]);
    // 40 new blocks in two places.
    for b in (800..820).chain(1200..1220) {
        new[b * BS..(b + 1) * BS].copy_from_slice(&pattern(BS, 900_000 + b as u64));
    }
    // Ten blocks changed by a byte (a config file).
    for b in (1000..1010).map(|b| b * BS + 17) {
        new[b] ^= 0x5a;
    }
    new
}

struct Release {
    dir: tempfile::TempDir,
    server: ImageServer,
    image: Image,
    new: Vec<u8>,
    old: Vec<u8>,
}

impl Release {
    fn serve(&self) -> PathBuf {
        self.dir.path().join("serve")
    }

    fn store_len(&self) -> u64 {
        fs::metadata(self.serve().join("new.img.store"))
            .unwrap()
            .len()
    }

    fn index_len(&self) -> u64 {
        fs::metadata(self.serve().join("new.img.index"))
            .unwrap()
            .len()
    }

    /// The inactive slot, B, written with `content`: the install's target.
    fn target(&self, content: &[u8]) -> PathBuf {
        let target = self.dir.path().join("slot-b");
        fs::write(&target, content).unwrap();
        target
    }

    /// The booted slot, A, holding the old image.
    fn booted(&self) -> PathBuf {
        let booted = self.dir.path().join("slot-a");
        fs::write(&booted, &self.old).unwrap();
        booted
    }
}

fn release(mode: RangeAnswers) -> Release {
    let dir = tempfile::tempdir().unwrap();
    let serve = dir.path().join("serve");
    fs::create_dir(&serve).unwrap();
    let old = old_image();
    let new = new_image(&old);
    fs::write(serve.join("new.img"), &new).unwrap();
    let params = StoreParams {
        level: 3,
        ..StoreParams::default()
    };
    let built = index_build::build(
        &serve.join("new.img"),
        params,
        &serve.join("new.img.index"),
        &serve.join("new.img.store"),
    )
    .unwrap();
    let server = ImageServer::serve_directory(serve, mode);
    let mut image = Image::uncompressed(
        server.url("/new.img"),
        new.len() as u64,
        Sha256::digest(&new).into(),
    );
    image.chunks = Some(ChunkIndexRef {
        url: server.url("/new.img.index"),
        sha256: hex::encode(built.index_sha256),
        chunk_size: BS as u64,
    });
    Release {
        dir,
        server,
        image,
        new,
        old,
    }
}

fn request(r: &Release, target: &Path, booted: Option<&Path>, fallback: bool) -> WriteRequest {
    let mut req = WriteRequest::new(r.image.clone(), target, (BLOCKS * BS * 2) as u64);
    req.checkpoint_interval = 1024 * 1024;
    req.delta = Some(DeltaSettings {
        work_dir: r.dir.path().join("work"),
        booted: booted.map(|path| BootedSlot {
            path: path.to_path_buf(),
            key: None,
        }),
        full_download_fallback: fallback,
    });
    req
}

fn install(
    req: &WriteRequest,
) -> (
    Result<Option<DeltaStats>, TransferError>,
    Vec<TransferEvent>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = Vec::new();
    let result = runtime.block_on(async {
        let mut on_event = |e: TransferEvent| {
            events.push(e);
            Ok(())
        };
        transfer::install_image_with_stats(req, &mut on_event)
            .await
            .map(|(_, stats)| stats)
    });
    (result, events)
}

fn store_ranges(r: &Release) -> Vec<String> {
    r.server
        .seen()
        .into_iter()
        .filter(|l| l.path == "/new.img.store")
        .filter_map(|l| l.range)
        .collect()
}

#[test]
fn the_booted_slot_is_reused_and_only_missing_blocks_are_fetched_in_multi_range_requests() {
    let r = release(RangeAnswers::Multipart);
    let booted = r.booted();
    // The inactive slot holds nothing of use.
    let target = r.target(&vec![0xffu8; BLOCKS * BS]);
    let booted_before = fs::read(&booted).unwrap();

    let (result, events) = install(&request(&r, &target, Some(&booted), false));
    let stats = result.unwrap().expect("a delta, not a full download");
    assert!(
        fs::read(&target).unwrap()[..r.new.len()] == r.new[..],
        "the slot holds the new image"
    );
    assert_eq!(
        fs::read(&booted).unwrap(),
        booted_before,
        "the booted slot is never written"
    );

    // Nothing of the full image; the store only for the blocks found nowhere.
    assert_eq!(r.server.requests_of("/new.img"), 0);
    let store = r.server.bytes_of("/new.img.store");
    assert!(stats.summary.copied_from_booted > 1000, "{stats:?}");
    assert_eq!(stats.assembly.fallback_blocks, 0, "{stats:?}");
    assert!(
        stats.summary.fetched_blocks >= 40 && stats.summary.fetched_blocks <= 60,
        "{stats:?}"
    );
    assert!(
        store * 10 < r.store_len(),
        "{store} of the store's {} bytes were downloaded",
        r.store_len()
    );
    // The probe and the ranges: multi-range requests, at most 100.
    let ranges = store_ranges(&r);
    assert!(ranges.iter().any(|r| r.contains(',')), "{ranges:?}");
    assert!(ranges.len() <= 101, "{}", ranges.len());
    assert_eq!(stats.requests as usize, ranges.len());
    assert_eq!(stats.downloaded, store + r.index_len(), "{stats:?}");

    // Progress: bytes downloaded, and bytes of the image in place, up to the whole image.
    let downloaded = events.iter().rev().find_map(|e| match e {
        TransferEvent::Downloaded { downloaded, .. } => Some(*downloaded),
        _ => None,
    });
    assert_eq!(downloaded, Some(stats.downloaded));
    assert!(events.contains(&TransferEvent::Progress {
        written: r.new.len() as u64,
        total: r.new.len() as u64
    }));
    assert!(events.contains(&TransferEvent::Verifying));
}

/// A local image (`file://`, a USB stick) with a block index: a delta would save nothing, since
/// reading the file costs no more than reading the booted slot to plan one. The whole image is
/// written; the booted slot is not hashed (the planner's table of it never appears in the work
/// directory), and the index is expanded there for the read-back, which checks every block.
#[test]
fn a_local_image_is_written_whole_without_hashing_the_booted_slot() {
    let r = release(RangeAnswers::Multipart);
    let booted = r.booted();
    let target = r.target(b"");
    let mut req = request(&r, &target, Some(&booted), false);
    let local = |name: &str| format!("file://{}", r.serve().join(name).display());
    req.image.url = local("new.img");
    req.image.chunks.as_mut().unwrap().url = local("new.img.index");

    let (result, events) = install(&req);
    assert!(
        matches!(result, Ok(None)),
        "the whole image, not a delta: {result:?}"
    );
    assert!(
        fs::read(&target).unwrap() == r.new,
        "the slot holds the new image"
    );
    assert!(events.contains(&TransferEvent::Verifying));
    let work = r.dir.path().join("work");
    assert!(
        !work.join("booted.table").exists(),
        "the booted slot was hashed for a plan"
    );
    let index = format!("{}.index", req.image.chunks.as_ref().unwrap().sha256);
    assert!(
        work.join(&index).exists(),
        "no expanded index for the read-back"
    );
    assert!(r.server.seen().is_empty(), "nothing came from the server");
}

#[test]
fn the_inactive_slot_is_reused_with_single_range_requests() {
    let r = release(RangeAnswers::SingleOnly);
    // The inactive slot holds the old release (the one before the booted one, say).
    let target = r.target(&r.old);

    let (result, _) = install(&request(&r, &target, None, false));
    let stats = result.unwrap().expect("a delta");
    assert!(fs::read(&target).unwrap() == r.new);
    assert!(stats.summary.kept_blocks > 1000, "{stats:?}");
    // Blocks moved down are copied from further up the slot (not yet overwritten); blocks
    // moved up would have been overwritten first, and are fetched.
    assert!(
        stats.summary.copied_from_target >= 90,
        "moved blocks: {stats:?}"
    );
    let ranges = store_ranges(&r);
    assert!(
        ranges.iter().skip(2).all(|r| !r.contains(',')),
        "{ranges:?}"
    );
    // (S3's answer to the multi-range probe, the whole store, is dropped after its head.)
    assert!(r.server.ranged_bytes_of("/new.img.store") * 2 < r.store_len());
}

#[test]
fn a_server_that_ignores_range_is_refused_unless_the_full_download_is_allowed() {
    let r = release(RangeAnswers::Never);
    let booted = r.booted();
    let target = r.target(&r.old);

    let (result, _) = install(&request(&r, &target, Some(&booted), false));
    let err = result.unwrap_err();
    assert_eq!(err.reason(), ReasonCode::RangeUnsupported, "{err}");
    assert!(err.to_string().contains("full_download_fallback"), "{err}");
    assert!(fs::read(&target).unwrap() == r.old, "nothing was written");
    assert_eq!(r.server.requests_of("/new.img"), 0, "no full download");

    let (result, _) = install(&request(&r, &target, Some(&booted), true));
    assert!(result.unwrap().is_none(), "the whole image, as allowed");
    assert!(fs::read(&target).unwrap() == r.new);
    assert_eq!(r.server.bytes_of("/new.img"), r.new.len() as u64);
}

/// Every block of the slot is what it was before, or the new image's block at that place.
fn assert_only_verified_blocks(slot: &[u8], before: &[u8], new: &[u8]) {
    for (b, block) in slot.chunks(BS).enumerate() {
        let at = b * BS..(b + 1) * BS;
        assert!(
            block == &before[at.clone()] || block == &new[at],
            "block {b} is neither the old nor the new content"
        );
    }
}

/// Changes the served file `name` after the release was signed.
fn alter_served(r: &Release, name: &str, change: impl FnOnce(&mut Vec<u8>)) {
    let path = r.serve().join(name);
    let mut bytes = fs::read(&path).unwrap();
    change(&mut bytes);
    fs::write(&path, &bytes).unwrap();
}

/// The install's error, whose reason must be one of `reasons`.
fn failure_of(
    result: Result<Option<DeltaStats>, TransferError>,
    reasons: &[ReasonCode],
) -> TransferError {
    let err = result.unwrap_err();
    assert!(reasons.contains(&err.reason()), "{err}");
    err
}

#[test]
fn a_store_that_does_not_match_the_index_is_refused_block_by_block() {
    let r = release(RangeAnswers::Multipart);
    let before = vec![0xffu8; BLOCKS * BS];
    let target = r.target(&before);
    let booted = r.booted();
    // The served store changed after signing: a byte in every 512.
    alter_served(&r, "new.img.store", |store| {
        for at in (300..store.len()).step_by(512) {
            store[at] ^= 0x10;
        }
    });

    let (result, _) = install(&request(&r, &target, Some(&booted), true));
    failure_of(
        result,
        &[ReasonCode::HashMismatch, ReasonCode::DecompressFailed],
    );
    // Not silently replaced by a full download either: the store's bytes are wrong, not absent.
    assert_eq!(r.server.requests_of("/new.img"), 0);
    assert_only_verified_blocks(&fs::read(&target).unwrap(), &before, &r.new);
}

#[test]
fn an_index_that_does_not_match_the_manifest_is_refused_before_the_slot_is_touched() {
    let r = release(RangeAnswers::Multipart);
    let target = r.target(&r.old);
    alter_served(&r, "new.img.index", |index| {
        let last = index.len() - 1;
        index[last] ^= 1;
    });

    let (result, _) = install(&request(&r, &target, None, false));
    let err = failure_of(result, &[ReasonCode::HashMismatch, ReasonCode::Malformed]);
    assert!(err.to_string().contains("block index"), "{err}");
    assert!(fs::read(&target).unwrap() == r.old);
    assert_eq!(r.server.requests_of("/new.img.store"), 0);
    assert_eq!(r.server.requests_of("/new.img"), 0);
}

// ------------------------------------------------------------------------------------------
// Through the agent binary: kill -9 during a delta, then resume.

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");
const COMPATIBLE: &str = "acme-gw-delta";

fn toml_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

struct Device {
    r: Release,
}

impl Device {
    fn new() -> Device {
        Device::with(RangeAnswers::Multipart, "")
    }

    /// A device whose image server answers Range as `mode` says, with `install` added to the
    /// configuration's `[install]` table.
    fn with(mode: RangeAnswers, install: &str) -> Device {
        let r = release(mode);
        let path = |name: &str| r.dir.path().join(name);
        let out = Command::new(BIN)
            .arg("keygen")
            .arg("--out")
            .arg(path("signer"))
            .output()
            .unwrap();
        assert!(out.status.success());
        fs::create_dir(path("keys")).unwrap();
        fs::copy(path("signer.pub"), path("keys/signer.pub")).unwrap();
        fs::write(path("slot-a"), &r.old).unwrap();
        fs::write(path("slot-b"), vec![0u8; BLOCKS * BS]).unwrap();
        fs::write(
            path("bootenv"),
            "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n",
        )
        .unwrap();
        fs::write(path("boot_id"), "6a1c0f3e-0000-4000-8000-000000000001\n").unwrap();
        fs::write(path("cmdline"), "console=ttyS0 update_agent.slot=A\n").unwrap();
        let config = format!(
            r#"[device]
compatible = "{COMPATIBLE}"
state_dir = {state}

[trust]
keys_dir = {keys}
insecure_writable_anchor = true

[bootloader]
backend = "file"
path = {env}
attempts = 3

[slots]
class = "rootfs"
a = {{ device = {a}, bootname = "A", size = {size} }}
b = {{ device = {b}, bootname = "B", size = {size} }}

[install]
checkpoint_interval = 1048576
stall_timeout = 5
{install}

[system]
boot_id_path = {boot_id}
cmdline_path = {cmdline}
reboot_command = ["true"]
"#,
            state = toml_path(&path("state")),
            keys = toml_path(&path("keys")),
            env = toml_path(&path("bootenv")),
            a = toml_path(&path("slot-a")),
            b = toml_path(&path("slot-b")),
            size = BLOCKS * BS * 2,
            boot_id = toml_path(&path("boot_id")),
            cmdline = toml_path(&path("cmdline")),
            install = install,
        );
        fs::write(path("agent.toml"), config).unwrap();
        let dev = Device { r };
        assert!(dev.agent(&["boot-check"], None).status.success());
        dev
    }

    fn path(&self, name: &str) -> PathBuf {
        self.r.dir.path().join(name)
    }

    fn agent(&self, args: &[&str], crash_at: Option<&str>) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .arg("--config")
            .arg(self.path("agent.toml"));
        if let Some(point) = crash_at {
            command.env("UPDATE_AGENT_CRASH_AT", point);
        }
        command.output().unwrap()
    }

    /// An install run `out` that succeeded, slot B holding the new image.
    #[track_caller]
    fn assert_installed(&self, out: &Output) {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(fs::read(self.path("slot-b")).unwrap()[..self.r.new.len()] == self.r.new[..]);
    }

    /// `update-agent status --json`.
    fn status(&self) -> serde_json::Value {
        let out = self.agent(&["status", "--json"], None);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A release of the new image whose index and store are the ones served.
    fn release(&self) -> PathBuf {
        let out_path = self.path("release.json");
        let image = &self.r.image;
        let chunks = image.chunks.as_ref().unwrap();
        let out = common::release_create(
            &self.path("signer.key"),
            &self.r.serve().join("new.img"),
            ["2.0", "2"],
            COMPATIBLE,
            &image.url,
        )
        .args(["--index-url", &chunks.url, "--store-level", "3"])
        .arg("--out-dir")
        .arg(self.path("made"))
        .arg("--out")
        .arg(&out_path)
        .output()
        .unwrap();
        assert_exit(&out, 0, "release create");
        // Serve what release create made (the same image, so the same index and store).
        for name in ["new.img.index", "new.img.store"] {
            fs::copy(self.path("made").join(name), self.r.serve().join(name)).unwrap();
        }
        out_path
    }
}

#[test]
fn an_agent_killed_during_a_delta_resumes_and_fetches_only_what_it_had_not_written() {
    let dev = Device::new();
    let release = dev.release();
    let release = release.to_str().unwrap();

    // Killed after the fourth checkpoint (4 MiB of the image in place and synced: the blocks
    // fetched for 800..820 and 1000..1010 among them, not those for 1200..1220).
    let out = dev.agent(&["install", release], Some("checkpoint:4"));
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the crash point fired: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = dev.r.server.bytes_of("/new.img.store");
    assert!(first > 0);
    let slot = fs::read(dev.path("slot-b")).unwrap();
    assert_only_verified_blocks(&slot, &vec![0u8; BLOCKS * BS], &dev.r.new);
    assert!(
        slot[..4 * 1024 * 1024] == dev.r.new[..4 * 1024 * 1024],
        "the first four MiB were written before the cut"
    );
    dev.r.server.forget_seen();

    // The next run takes up the transaction: what was written is kept in place.
    let out = dev.agent(&["install", release], None);
    dev.assert_installed(&out);
    let second = dev.r.server.bytes_of("/new.img.store");
    assert!(
        second < first,
        "the resume fetched {second} bytes of the store, the first run {first}"
    );
    assert_eq!(
        dev.r.server.requests_of("/new.img"),
        0,
        "never the whole image"
    );
    let status = dev.status();
    assert_eq!(status["phase"], "reboot-pending", "{status}");
}

/// A release with a block index whose delta is not possible (the server ignores Range) on a
/// device that allows the whole download instead: the read-back of that download checks each
/// synced region against the block index the delta attempt fetched, on the pool, while the rest
/// arrives. Cut (SIGKILL) after 2 MiB were read back, the next run writes and reads back
/// everything again and only then activates.
#[test]
fn a_whole_download_of_an_indexed_release_is_read_back_against_the_index_and_survives_a_cut() {
    let dev = Device::with(
        RangeAnswers::Never,
        "full_download_fallback = true\nreadback_overlap = true",
    );
    let release = dev.release();
    let release = release.to_str().unwrap();
    let run = |crash_at: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .args(["install", release, "--config"])
            .arg(dev.path("agent.toml"))
            .env("RUST_LOG", "info");
        if let Some(point) = crash_at {
            command.env("UPDATE_AGENT_CRASH_AT", point);
        }
        command.output().unwrap()
    };
    let out = run(Some("readback:bytes:2097152"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the crash point fired: {stderr}"
    );
    assert!(
        stderr.contains("crash point readback:bytes:2097152:"),
        "{stderr}"
    );
    assert!(
        stderr.contains("checked against the block index"),
        "the read-back used the index: {stderr}"
    );
    // The server logs a request once it has sent the body or seen the client go: the SIGKILL
    // can be seen here before that.
    wait_for(
        "the whole image's download in the server's log",
        Duration::from_secs(10),
        || dev.r.server.requests_of("/new.img") >= 1,
    );
    let status = dev.status();
    assert_eq!(
        status["phase"], "writing",
        "not activated at the cut: {status}"
    );

    let out = run(None);
    dev.assert_installed(&out);
    let status = dev.status();
    assert_eq!(status["phase"], "reboot-pending", "{status}");
}
