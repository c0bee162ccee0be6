//! ETSI TS 103 701 "power cut at any point": whole install cycles through the built binary, each
//! cut short by `UPDATE_AGENT_CRASH_AT=<point>` on one agent process (it SIGKILLs itself there;
//! the test checks it died by signal 9 at that point, so a point that never fires fails), then
//! what a power cut means for the device: the boot simulator picks the next slot from the
//! bootloader environment as the boot script would, the kernel gets a new boot id and the booted
//! slot on its command line, and the bytes of slot B past the last persisted checkpoint (`durable`
//! in state.json) are overwritten with garbage, for the page cache that was lost. Then the agent
//! starts as a boot starts it (`boot-check`), `install` is offered again when nothing of the
//! transaction survived, and the cycle goes on through the reboots it asks for until it ends.
//!
//! After every step (the cut, each agent run, each simulated boot) the test checks:
//! 1. slot A, booted when the install started, is byte-identical to before;
//! 2. the bootloader never names B as the next slot unless B holds the image: the simulator run
//!    on a copy of the environment, and the agent's own `primary()` where it names one, agree;
//!    B reachable at all (by a reset of the counters or flags) holds its old content or the
//!    image, never a half-written mix; a slot the simulator actually boots holds the image. (B is
//!    compared with the image file, whose SHA-256 is the signed manifest's; the end of each cycle
//!    hashes slot B itself.)
//!
//! At the end of each cycle:
//! 3. `status --json` says phase `idle`, and the outcome is the expected one: committed (B's
//!    SHA-256 is the manifest's, B is primary, a `committed` event) or rolled back (an event
//!    `rolled-back` with reason `health-check-failed`, A primary, B not bootable);
//! 4. the event log holds the sequence numbers `0..next_seq`, each once, in order, and what it
//!    held at the cut is unchanged. The engine's contract (`PersistentState::recent_events`): a
//!    seq is persisted with its transition before the event is reported; the last transition's
//!    events are reported again after a restart with the same seq (at least once) and the log
//!    keeps each seq once; a transition not persisted is redone and its events get the same
//!    numbers. So no seq is reused for another event and no event of a transaction is lost: the
//!    log tells the whole story (accepted … committed / rolled-back).
//!
//! Cuts in the writing phase also check how the write resumed: from a checkpoint `D` inside the
//! image, the next download asks for `Range: bytes=D-`; from `D` = the image size, nothing is
//! downloaded again (only the read-back is left); from 0, without Range.
//!
//! Points covered (file bootloader unless said): in `install` — persist:writing:before|after,
//! bootloader:prepare:before|after (also U-Boot, GRUB), checkpoint:1|3|5 (5 = the whole image),
//! bytes:<2.5 MiB> (mid-interval, own test), readback:bytes:<1 MiB> (`readback_overlap`: the
//! read-back of the first region, done while the download goes on, own test),
//! readback:bytes:<4 MiB> (`readback_overlap`: the read-back behind the last bytes, own test),
//! readback:bytes:<2 MiB> (the read-back after the last byte), readback:before, persist:activating:before|after,
//! bootloader:activate:before|after (also U-Boot; after also GRUB),
//! persist:reboot-pending:before|after, reboot:before; in the trial boot's `boot-check` —
//! persist:trial:before|after, health:before|after, persist:committing:before|after,
//! bootloader:mark-good:before (also U-Boot, GRUB)|after, persist:idle:before|after; on the
//! rollback path (health check fails) — health:after, persist:rolling-back:before|after,
//! bootloader:mark-bad:before|after (after also U-Boot), reboot:before, and in the boot back in
//! A persist:idle:after and bootloader:mark-bad:before.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use Outcome::{Committed, RolledBack};
use Victim::{BootCheck, Install};
use common::sim::{Act, Throttle, states};
use common::{
    Backend, COMMITTED, Gateway, ImageServer, ROLLED_BACK, assert_exit, pattern, sha256_hex,
};
use serde_json::Value;
use update_agent::config::Config;

const MIB: usize = 1024 * 1024;
/// With the minimum checkpoint interval of 1 MiB: five checkpoints, at 1, 2, 3 and 4 MiB and at
/// the whole image (reported once its hash matched).
const IMAGE_LEN: usize = 4 * MIB + 12345;
const SLOT_SIZE: usize = 5 * MIB;
const CHECKPOINT: usize = MIB;
const ATTEMPTS: u32 = 3;
/// More agent runs than any cycle needs: a cycle that does not end by then is stuck.
const MAX_RUNS: usize = 8;

// ------------------------------------------------------------------------------------------
// The device: a simulated gateway, an image server that logs each request's Range, a release

/// What a finished agent run left.
#[derive(Debug)]
enum Ran {
    Killed,
    Exited { reboot_requested: bool },
}

struct Device {
    gateway: Gateway,
    release: String,
    server: ImageServer,
    /// The image's SHA-256 as the signed manifest declares it.
    image_sha: String,
    /// Everything that happened, for failure messages.
    journal: Vec<String>,
}

derefs_to_gateway!(Device);
/// Whether slot bytes hold the image. They are compared with the image, whose SHA-256 is
/// checked against the signed manifest when a device is set up (hashing the slot at every step
/// would cost more than the cycle); the end of each cycle hashes the slot itself.
fn holds_image(slot: &[u8]) -> bool {
    slot[..IMAGE_LEN] == bytes().image[..]
}

/// The bytes every test uses, made once: the image, what the slots hold before the install, and
/// the garbage a power cut leaves.
struct Bytes {
    image: Vec<u8>,
    a: Vec<u8>,
    b: Vec<u8>,
    garbage: Vec<u8>,
}

fn bytes() -> &'static Bytes {
    static BYTES: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| Bytes {
        image: pattern(IMAGE_LEN, 0x1111),
        a: pattern(SLOT_SIZE, 0xaaaa),
        b: pattern(SLOT_SIZE, 0xbbbb),
        garbage: pattern(SLOT_SIZE, 0xdead),
    })
}

impl Device {
    fn new(case: &Case) -> Device {
        let healthy = case.outcome == Outcome::Committed;
        let mut server =
            ImageServer::builder(bytes().image.clone()).route("/image.img", Act::Serve);
        if let Some(t) = case.throttle {
            server = server.throttle(t.chunk, t.pause);
        }
        let server = server.start_background().unwrap();
        // A board as RAUC sets it up: both slots in the order, full try budgets.
        let interval = case.checkpoint_interval as u64;
        let overlap = case.readback_overlap;
        let gateway = common::gateway()
            .backend(case.loader)
            .compatible("acme-gw-1")
            .slot_size(SLOT_SIZE as u64)
            .slot_contents(bytes().a.clone(), bytes().b.clone())
            .health(&[&[if healthy { "true" } else { "false" }]])
            .configure(move |c| {
                c.device.factory_version = Some("2026.01.0".into());
                c.install.checkpoint_interval = interval;
                c.install.readback_overlap = overlap.into();
            })
            .build()
            .unwrap();
        let release = gateway
            .release("2026.07.0")
            .security_version(7)
            .image(&server.url("/image.img"), &bytes().image)
            .write(&gateway.path("release.json"))
            .unwrap()
            .display()
            .to_string();
        let out = std::process::Command::new(common::BIN)
            .args(["release", "inspect", "--json", &release])
            .output()
            .unwrap();
        assert_exit(&out, 0, "release inspect");
        let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
        let image_sha = inspected["manifest"]["images"]["rootfs"]["sha256"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            image_sha,
            sha256_hex(&bytes().image),
            "the release names the image's hash"
        );
        Device {
            journal: vec![format!("power on #1: booted {}", gateway.booted())],
            gateway,
            release,
            server,
            image_sha,
        }
    }

    fn note(&mut self, line: String) {
        self.journal.push(line);
    }

    fn journal(&self) -> String {
        self.journal.join("\n")
    }

    fn booted(&self) -> &str {
        self.gateway.booted()
    }

    /// Powers the device on: the boot script picks a slot, the kernel gets a new boot id and
    /// tells the system which slot it came from.
    fn power_on(&mut self) {
        let booted = self
            .gateway
            .try_boot()
            .unwrap_or_else(|e| panic!("the board does not boot: {e}\n{}", self.journal()));
        self.note(format!(
            "power on #{}: booted {booted}",
            self.gateway.boots()
        ));
        if booted == "B" {
            assert!(
                holds_image(&self.gateway.slot("B")),
                "the bootloader booted slot B, which does not hold the verified image\n{}",
                self.journal()
            );
        }
    }

    /// What a power cut loses besides the running process: slot bytes past the last persisted
    /// checkpoint that were only in the page cache. Only while writing, and only if the agent
    /// wrote anything at all (a slot it never touched has nothing in the page cache).
    fn lose_page_cache(&mut self) -> Option<u64> {
        let state = self.gateway.state();
        if state["phase"]["phase"] != "writing" {
            return None;
        }
        let durable = state["phase"]["durable"].as_u64().unwrap();
        let mut b = self.gateway.slot("B");
        if b != bytes().b {
            let garbage = &bytes().garbage;
            b[durable as usize..].copy_from_slice(&garbage[durable as usize..]);
            fs::write(self.gateway.slot_path("B"), &b).unwrap();
            self.note(format!(
                "power cut: slot B scribbled from {durable} (last checkpoint)"
            ));
        }
        Some(durable)
    }

    /// The SHA-256 of slot B's first `IMAGE_LEN` bytes, read from the file.
    fn b_sha(&self) -> String {
        sha256_hex(&self.gateway.slot("B")[..IMAGE_LEN])
    }

    /// The slot the boot script would pick at the next power-on (on a copy of the environment).
    fn next_boot(&self) -> Result<String, String> {
        self.gateway.env.next_boot(&self.gateway.path("peek"))
    }

    /// Runs `install` or `boot-check`, SIGKILLed at `crash` when given.
    fn run(&mut self, command: &str, crash: Option<&str>) -> Ran {
        let requests_before = self.gateway.reboots_requested();
        let mut args = vec![command];
        if command == "install" {
            args.push(&self.release);
        }
        let mut cmd = self.gateway.command(&args);
        if let Some(point) = crash {
            cmd.env("UPDATE_AGENT_CRASH_AT", point);
        }
        let out = cmd.output().expect("run update-agent");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.note(format!(
            "{command} in {} (crash at {crash:?}): {:?}\n{stdout}{stderr}",
            self.booted(),
            out.status
        ));
        if let Some(point) = crash {
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{command} was to be killed at {point} but was not: the point never fired\n{}",
                self.journal()
            );
            assert!(
                stderr.contains(&format!("crash point {point}:")),
                "killed, but not at {point}\n{}",
                self.journal()
            );
            return Ran::Killed;
        }
        // `install` exits 0 when it stops for the reboot; `boot-check` exits 1 when it reports a
        // failed or rolled-back transaction (also one reported again after a restart).
        let code = out.status.code();
        assert!(
            code == Some(0) || (command == "boot-check" && code == Some(1)),
            "{command} ended with {:?}\n{}",
            out.status,
            self.journal()
        );
        let phase = self.gateway.state()["phase"]["phase"].clone();
        Ran::Exited {
            reboot_requested: self.gateway.reboots_requested() > requests_before
                || phase == "reboot-pending",
        }
    }

    /// The invariants that hold at every moment, crash or not.
    fn check(&self, when: &str) {
        let ctx = || format!("{when}\n{}", self.journal());
        assert!(
            self.gateway.slot("A") == bytes().a,
            "slot A (booted when the install started) changed: {}",
            ctx()
        );
        let b = self.gateway.slot("B");
        let next = self
            .next_boot()
            .unwrap_or_else(|e| panic!("no slot would boot: {e}: {}", ctx()));
        if next == "B" {
            assert!(
                holds_image(&b),
                "the bootloader names slot B as next, but B does not hold the verified image: {}",
                ctx()
            );
        }
        // The agent's own reading of the environment (what `status` shows as primary) agrees
        // with the boot script; `None` (no slot has tries left) is where the script resets.
        let config = Config::load(self.gateway.config_path()).unwrap();
        let primary = update_agent::bootloader::open(&config)
            .unwrap()
            .primary()
            .unwrap();
        if let Some(primary) = &primary {
            assert_eq!(
                *primary,
                next,
                "the agent's primary and the boot script disagree: {}",
                ctx()
            );
        }
        // B reachable at all (by a reset of the counters or flags) holds its old content or
        // the image, never a mix.
        if self.gateway.env.reachable("B") {
            assert!(
                b == bytes().b || holds_image(&b),
                "slot B can still be booted ({:?}) but holds a partial write: {}",
                self.gateway.env.vars(),
                ctx()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// One cycle with one power cut

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// `install`, started in slot A.
    Install,
    /// The n-th `boot-check` of the cycle (1: the first boot after the install's reboot).
    BootCheck(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// The trial's health check fails: rolled back to A.
    RolledBack,
}

struct Case {
    point: String,
    victim: Victim,
    outcome: Outcome,
    loader: Backend,
    throttle: Option<Throttle>,
    checkpoint_interval: usize,
    /// `[install] readback_overlap`: the read-back beside the download.
    readback_overlap: bool,
}

/// What a cycle observed, for the case-specific checks.
struct Cycle {
    device: Device,
    /// `durable` of the writing phase at the crash, if it was writing.
    durable_at_crash: Option<u64>,
    /// How many HTTP requests were made before the crash.
    requests_at_crash: usize,
    /// Slot B's bytes at the crash, before the page cache was lost.
    b_at_crash: Vec<u8>,
}

fn cut(point: &'static str, victim: Victim, outcome: Outcome) -> Cycle {
    cut_on(Backend::File, point, victim, outcome)
}

fn cut_on(loader: Backend, point: &'static str, victim: Victim, outcome: Outcome) -> Cycle {
    run_case(&Case {
        victim,
        outcome,
        loader,
        ..install_cut(point.to_owned())
    })
}

/// A cut at `point` in the install on the file backend, ending committed, with the download at
/// full speed, the default checkpoint interval and no read-back overlap; a test changes the rest.
fn install_cut(point: String) -> Case {
    Case {
        point,
        victim: Install,
        outcome: Committed,
        loader: Backend::File,
        throttle: None,
        checkpoint_interval: CHECKPOINT,
        readback_overlap: false,
    }
}

/// The download slowed to 32 KiB every 5 ms: about 160 ms per MiB.
const SLOW_DOWNLOAD: Throttle = Throttle {
    chunk: 32 * 1024,
    pause: Duration::from_millis(5),
};

/// `#[test] fn NAME()`: a cycle on `loader` cut at `point` in `victim`, ending in `outcome`.
macro_rules! cut_tests {
    ($loader:ident: $($name:ident => $point:literal, $victim:expr, $outcome:ident;)*) => {
        $(
            #[test]
            fn $name() {
                cut_on(Backend::$loader, $point, $victim, $outcome);
            }
        )*
    };
}

/// `#[test] fn NAME()`: an install on the file bootloader cut at `point` commits, and the
/// writing phase's `durable` at the cut was `durable` (`None`: not writing yet).
macro_rules! durable_cut_tests {
    ($($name:ident => $point:literal, $durable:expr;)*) => {
        $(
            #[test]
            fn $name() {
                let cycle = cut($point, Install, Committed);
                assert_eq!(cycle.durable_at_crash, $durable, "durable at the cut");
            }
        )*
    };
}

/// Runs `case`, whose cut must come in the writing phase; returns the cycle, the device's
/// journal and the writing phase's `durable` at the cut.
#[track_caller]
fn cut_while_writing(case: Case) -> (Cycle, String, u64) {
    let cycle = run_case(&case);
    let journal = cycle.device.journal();
    assert!(
        cycle.durable_at_crash.is_some(),
        "the cut was not in the writing phase\n{journal}"
    );
    let durable = cycle.durable_at_crash.unwrap();
    (cycle, journal, durable)
}

fn run_case(case: &Case) -> Cycle {
    let mut dev = Device::new(case);
    assert_eq!(dev.booted(), "A", "the device starts in slot A");
    // The commit unit runs boot-check at every boot; with nothing to do it marks A good.
    dev.run("boot-check", None);
    dev.check("before the install");

    let mut crashed = None;
    let mut boot_checks = 0;
    let mut installs = 1;
    let victim_now = |v: Victim| (v == case.victim).then_some(case.point.as_str());
    let mut ran = dev.run("install", victim_now(Victim::Install));
    for _ in 0..MAX_RUNS {
        match ran {
            Ran::Killed => {
                dev.check(&format!("right after the crash at {}", case.point));
                let b = dev.gateway.slot("B");
                let requests = dev.server.seen().len();
                let events = dev.events();
                let durable = dev.lose_page_cache();
                crashed = Some((durable, requests, b, events));
                dev.power_on();
            }
            Ran::Exited {
                reboot_requested: true,
            } => dev.power_on(),
            Ran::Exited {
                reboot_requested: false,
            } => {
                let state = dev.state();
                assert_eq!(
                    state["phase"]["phase"],
                    "idle",
                    "the agent stopped in the middle of a transaction without asking for a \
                     reboot: stuck\n{}",
                    dev.journal()
                );
                if state["last"].is_null() && installs < 2 {
                    // Nothing of the transaction survived the cut: the release is offered again
                    // (as the retained MQTT message would be at start-up).
                    installs += 1;
                    dev.check("before installing again");
                    ran = dev.run("install", None);
                    dev.check("after installing again");
                    continue;
                }
                break;
            }
        }
        dev.check(&format!(
            "after power-on #{} into {}",
            dev.gateway.boots(),
            dev.booted()
        ));
        boot_checks += 1;
        ran = dev.run("boot-check", victim_now(Victim::BootCheck(boot_checks)));
        dev.check(&format!("after boot-check #{boot_checks}"));
    }
    assert!(
        matches!(
            ran,
            Ran::Exited {
                reboot_requested: false
            }
        ),
        "the cycle did not end within {MAX_RUNS} runs\n{}",
        dev.journal()
    );
    let Some((durable_at_crash, requests_at_crash, b_at_crash, events_at_crash)) = crashed else {
        panic!(
            "the crash at {} never happened\n{}",
            case.point,
            dev.journal()
        );
    };

    check_outcome(&dev, case.outcome);
    check_events(&dev, case.outcome);
    // What was logged before the cut stays as it was: later events only come after it.
    let events = dev.events();
    assert_eq!(
        events[..events_at_crash.len()],
        events_at_crash[..],
        "the event log changed under the cut\n{}",
        dev.journal()
    );
    check_resume(&dev, durable_at_crash, requests_at_crash);
    Cycle {
        device: dev,
        durable_at_crash,
        requests_at_crash,
        b_at_crash,
    }
}

/// Assertion 3: idle, and the expected end.
fn check_outcome(dev: &Device, outcome: Outcome) {
    let status = dev.status_json();
    let journal = dev.journal();
    assert_eq!(status["phase"], "idle", "{status:#}\n{journal}");
    let state = dev.state();
    let next = dev.next_boot().unwrap();
    match outcome {
        Outcome::Committed => {
            assert_eq!(state["last"]["result"], "committed", "{state:#}\n{journal}");
            assert_eq!(
                dev.b_sha(),
                dev.image_sha,
                "slot B, read from the file, does not have the image's SHA-256\n{journal}"
            );
            assert_eq!(state["slots"]["B"]["sha256"], dev.image_sha, "{journal}");
            assert_eq!(status["primary"], "B", "{status:#}\n{journal}");
            assert_eq!(next, "B", "{journal}");
            assert_eq!(state["slots"]["B"]["committed"], true, "{journal}");
            assert_eq!(state["floor"], 7, "the floor rises on commit\n{journal}");
        }
        Outcome::RolledBack => {
            assert_eq!(
                state["last"]["result"], "rolled-back",
                "{state:#}\n{journal}"
            );
            assert_eq!(
                state["last"]["reason"], "health-check-failed",
                "{state:#}\n{journal}"
            );
            assert_eq!(status["primary"], "A", "{status:#}\n{journal}");
            assert_eq!(next, "A", "{journal}");
            assert!(
                !dev.gateway.env.reachable("B"),
                "the rolled-back slot can still be booted: {:?}\n{journal}",
                dev.gateway.env.vars()
            );
            assert_eq!(state["floor"], 0, "a rolled-back release raises no floor");
        }
    }
}

/// Assertion 4: every persisted seq is in the log exactly once, in order, and the log tells
/// the whole story of the transaction.
fn check_events(dev: &Device, outcome: Outcome) {
    let events = dev.events();
    let journal = dev.journal();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let next_seq = dev.state()["next_seq"].as_u64().unwrap();
    let expected: Vec<u64> = (0..next_seq).collect();
    assert_eq!(
        seqs, expected,
        "event sequence numbers must be 0..next_seq, each once, in order\n{journal}"
    );
    let states = states(&events);
    let story: &[&str] = match outcome {
        Outcome::Committed => &COMMITTED,
        Outcome::RolledBack => &ROLLED_BACK,
    };
    // `rebooting` is the agent asking for the reboot. When the power failed after the
    // bootloader was switched and before that was persisted, the bootloader tried the new slot
    // at the next power-on without being asked: the trial follows `activated` directly.
    let unasked = states
        .windows(2)
        .any(|pair| pair == ["activated", "trial-boot"]);
    let mut rest = states.iter();
    for wanted in story {
        if *wanted == "rebooting" && unasked {
            continue;
        }
        assert!(
            rest.any(|s| s == wanted),
            "event {wanted} is missing or out of order in {states:?}\n{journal}"
        );
    }
    // One transaction, and nothing after its end.
    let txns: BTreeSet<&str> = events.iter().filter_map(|e| e["txn"].as_str()).collect();
    assert_eq!(txns.len(), 1, "{states:?}");
    let last = events.last().unwrap();
    match outcome {
        Outcome::Committed => assert_eq!(last["state"], "committed", "{states:?}"),
        Outcome::RolledBack => {
            assert_eq!(last["state"], "rolled-back", "{states:?}");
            assert!(last["reason"].is_string(), "{last}");
        }
    }
    // Every failure or rollback event says why.
    for event in &events {
        if matches!(
            event["state"].as_str(),
            Some("failed" | "rolled-back" | "rolling-back")
        ) {
            assert!(event["reason"].is_string(), "{event}");
        }
    }
}

/// How the write went on after a cut in the writing phase.
fn check_resume(dev: &Device, durable: Option<u64>, requests_at_crash: usize) {
    let requests = dev.server.seen();
    let after: Vec<_> = requests[requests_at_crash..].to_vec();
    let journal = dev.journal();
    match durable {
        Some(d) if d == IMAGE_LEN as u64 => assert!(
            after.is_empty(),
            "the whole image was durable: only the read-back was left, yet it was downloaded \
             again: {after:?}\n{journal}"
        ),
        Some(d) if d > 0 => {
            assert!(!after.is_empty(), "{journal}");
            assert_eq!(
                after[0].range.as_deref(),
                Some(format!("bytes={d}-").as_str()),
                "the write did not resume from the checkpoint {d}\n{journal}"
            );
        }
        _ => {
            if let Some(first) = after.first() {
                assert_eq!(first.range, None, "{journal}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The sweep, file bootloader

durable_cut_tests! {
    // Before anything is persisted: nothing survives (no transaction), the release is offered
    // again.
    persist_writing_before => "persist:writing:before", None;
    // The transaction is persisted, the target not yet marked bad, nothing written.
    persist_writing_after => "persist:writing:after", Some(0);
    // Checkpoints: the fdatasync'ed offset is persisted, then the cut.
    checkpoint_1 => "checkpoint:1", Some(CHECKPOINT as u64);
    checkpoint_3 => "checkpoint:3", Some(3 * CHECKPOINT as u64);
    // The last checkpoint is the whole image, reported once its hash matched.
    checkpoint_5_whole_image => "checkpoint:5", Some(IMAGE_LEN as u64);
    readback_before => "readback:before", Some(IMAGE_LEN as u64);
}

cut_tests! { File:
    prepare_before => "bootloader:prepare:before", Install, Committed;
    prepare_after => "bootloader:prepare:after", Install, Committed;
    persist_activating_before => "persist:activating:before", Install, Committed;
    persist_activating_after => "persist:activating:after", Install, Committed;
    activate_before => "bootloader:activate:before", Install, Committed;
    // B is activated but the state still says "activating": the next power-on boots B.
    activate_after => "bootloader:activate:after", Install, Committed;
    persist_reboot_pending_before => "persist:reboot-pending:before", Install, Committed;
    persist_reboot_pending_after => "persist:reboot-pending:after", Install, Committed;
    reboot_before => "reboot:before", Install, Committed;
    // The trial boot in B.
    persist_trial_before => "persist:trial:before", BootCheck(1), Committed;
    persist_trial_after => "persist:trial:after", BootCheck(1), Committed;
    health_before => "health:before", BootCheck(1), Committed;
    health_after => "health:after", BootCheck(1), Committed;
    persist_committing_before => "persist:committing:before", BootCheck(1), Committed;
    persist_committing_after => "persist:committing:after", BootCheck(1), Committed;
    mark_good_before => "bootloader:mark-good:before", BootCheck(1), Committed;
    mark_good_after => "bootloader:mark-good:after", BootCheck(1), Committed;
    persist_idle_before_commit => "persist:idle:before", BootCheck(1), Committed;
    // Committed and persisted, the `committed` event not yet logged.
    persist_idle_after_commit => "persist:idle:after", BootCheck(1), Committed;
    // The rollback path: the trial's health check fails.
    rollback_health_after => "health:after", BootCheck(1), RolledBack;
    rollback_persist_rolling_back_before => "persist:rolling-back:before", BootCheck(1), RolledBack;
    rollback_persist_rolling_back_after => "persist:rolling-back:after", BootCheck(1), RolledBack;
    rollback_mark_bad_before => "bootloader:mark-bad:before", BootCheck(1), RolledBack;
    rollback_mark_bad_after => "bootloader:mark-bad:after", BootCheck(1), RolledBack;
    rollback_reboot_before => "reboot:before", BootCheck(1), RolledBack;
    // Back in A: the rollback is finished and persisted, the `rolled-back` event not yet logged.
    rollback_persist_idle_after => "persist:idle:after", BootCheck(2), RolledBack;
    // Back in A: the final mark-bad that takes B out of the order for good.
    rollback_final_mark_bad_before => "bootloader:mark-bad:before", BootCheck(2), RolledBack;
}

// ------------------------------------------------------------------------------------------
// A cut in the middle of a checkpoint interval resumes from the checkpoint

/// The slot writer hands data to the kernel in 1 MiB buffers, so with the minimum interval of
/// 1 MiB every write ends on a checkpoint: bytes past the last checkpoint are only ever in flight
/// at the interval's end. With 2 MiB, the writer writes 3 MiB (the second buffer) while only
/// 2 MiB are synced and persisted: a cut at `bytes:2.5 MiB` fires at the first progress report
/// after that write, in the middle of the interval from 2 to 4 MiB.
#[test]
fn mid_interval_cut_resumes_from_the_checkpoint() {
    let interval = 2 * MIB;
    let limit = interval + MIB / 2;
    let (cycle, journal, durable) = cut_while_writing(Case {
        // Slow enough that progress (at most every 100 ms) is reported several times while the
        // writer is between 3 and 4 MiB.
        throttle: Some(SLOW_DOWNLOAD),
        checkpoint_interval: interval,
        ..install_cut(format!("bytes:{limit}"))
    });
    let durable = durable as usize;
    assert_eq!(durable, interval, "the persisted checkpoint\n{journal}");
    // The agent had written past the checkpoint when it died: the cut was mid-interval, and
    // those bytes are what the power cut lost.
    let image = &bytes().image;
    assert!(
        cycle.b_at_crash[durable..durable + MIB] == image[durable..durable + MIB],
        "the slot did not hold unsynced image bytes past the checkpoint at the cut\n{journal}"
    );
    let requests = cycle.device.server.seen();
    assert_eq!(cycle.requests_at_crash, 1, "{requests:?}");
    assert_eq!(requests[0].range, None);
    assert_eq!(
        requests.len(),
        2,
        "one download, one resumed download: {requests:?}"
    );
    assert_eq!(
        requests[1].range.as_deref(),
        Some(format!("bytes={durable}-").as_str()),
        "the second download did not resume from the checkpoint\n{journal}"
    );
}

// ------------------------------------------------------------------------------------------
// Cuts in the read-back, which runs beside the download

/// The read-back of a region starts once its `fdatasync` is done, while the download goes on:
/// with the download slowed down, the cut comes after the first region (1 MiB) was read back
/// and matched, and before the next checkpoint (2 MiB). The resumed write keeps nothing of that
/// read-back: it reads `[0, checkpoint)` back again, and the slot is only activated once all of
/// it matched.
#[test]
fn cut_after_a_region_is_read_back_before_the_next_checkpoint() {
    let (cycle, journal, durable) = cut_while_writing(Case {
        // About 160 ms per MiB: the read-back of a region takes a few.
        throttle: Some(SLOW_DOWNLOAD),
        readback_overlap: true,
        ..install_cut(format!("readback:bytes:{CHECKPOINT}"))
    });
    // The first checkpoint may or may not have been persisted yet when its region's read-back
    // ended (two threads), the second cannot have been.
    assert!(
        durable <= CHECKPOINT as u64,
        "the cut came after checkpoint {durable}, not during the download of the second region
{journal}"
    );
    assert_eq!(cycle.requests_at_crash, 1, "{journal}");
}

/// A cut while the read-back is behind the download: the last bytes are written (or nearly),
/// the read-back has matched 4 MiB of the 4 MiB and a bit.
#[test]
fn cut_during_the_read_back_behind_the_last_bytes() {
    // Still writing: the slot was neither activated nor marked written. Which checkpoint was
    // persisted by then is a race the test leaves open (the download may have queued every
    // byte before the first checkpoint reached the state file); the cycle's own checks say
    // the write resumed from it and B was only ever bootable holding the image.
    cut_while_writing(Case {
        readback_overlap: true,
        ..install_cut("readback:bytes:4194304".into())
    });
}

durable_cut_tests! {
    // Without the overlap (the default) the read-back starts after the last byte, once the
    // whole image's checkpoint is persisted: a cut in it, after 2 MiB were read back, leaves
    // only the read-back to redo.
    cut_during_the_read_back_after_the_last_byte => "readback:bytes:2097152", Some(IMAGE_LEN as u64);
}

// ------------------------------------------------------------------------------------------
// The bootloader points again, with U-Boot's own tools on a file environment

cut_tests! { UBoot:
    uboot_prepare_after => "bootloader:prepare:after", Install, Committed;
    uboot_activate_before => "bootloader:activate:before", Install, Committed;
    uboot_activate_after => "bootloader:activate:after", Install, Committed;
    uboot_mark_good_before => "bootloader:mark-good:before", BootCheck(1), Committed;
    uboot_rollback_mark_bad_after => "bootloader:mark-bad:after", BootCheck(1), RolledBack;
}

// And a few on GRUB (grub-editenv on a grubenv file), whose scheme gives a trial slot one try.
cut_tests! { Grub:
    grub_prepare_after => "bootloader:prepare:after", Install, Committed;
    grub_activate_after => "bootloader:activate:after", Install, Committed;
    grub_mark_good_before => "bootloader:mark-good:before", BootCheck(1), Committed;
}

// ------------------------------------------------------------------------------------------
// After the cycle: ordinary reboots keep the committed slot

/// No power cut: install, commit, then reboot the device a few times as its owner would, with
/// `boot-check` at every boot (the commit unit runs it). The committed slot must keep booting:
/// the boot scripts count every boot against the booted slot (U-Boot's `BOOT_x_LEFT`, GRUB's
/// `x_TRY`), so the running system has to be marked good at every boot, as RAUC's mark-good
/// service does.
fn committed_slot_keeps_booting(loader: Backend) {
    let case = Case {
        loader,
        ..install_cut(String::new())
    };
    let mut dev = Device::new(&case);
    dev.run("boot-check", None);
    assert!(matches!(
        dev.run("install", None),
        Ran::Exited {
            reboot_requested: true
        }
    ));
    dev.power_on();
    assert_eq!(dev.booted(), "B");
    dev.run("boot-check", None);
    assert_eq!(
        dev.state()["last"]["result"],
        "committed",
        "{}",
        dev.journal()
    );
    for _ in 0..2 * ATTEMPTS {
        dev.power_on();
        assert_eq!(
            dev.booted(),
            "B",
            "the committed slot fell back after ordinary reboots\n{}",
            dev.journal()
        );
        assert!(matches!(
            dev.run("boot-check", None),
            Ran::Exited {
                reboot_requested: false
            }
        ));
        dev.check("after an ordinary reboot");
    }
    assert_eq!(dev.status_json()["primary"], "B");
    check_events(&dev, Committed);
}

#[test]
fn committed_slot_keeps_booting_file() {
    committed_slot_keeps_booting(Backend::File);
}

#[test]
fn committed_slot_keeps_booting_grub() {
    committed_slot_keeps_booting(Backend::Grub);
}
