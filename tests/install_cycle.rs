//! Whole update cycles through the real binary, once per bootloader backend, against the real
//! tools: U-Boot through `fw_printenv`/`fw_setenv` on a file-backed environment, GRUB through
//! `grub-editenv` on a 1 KiB grubenv, and the agent's file backend.
//!
//! A [`Device`] is a simulated gateway (`update_agent::sim`: two file slots, a bootloader
//! environment, a config, the kernel facts a boot changes) with an image server on loopback. A
//! reboot runs the boot scripts' rules on the environment with the same tools. The agent only
//! ever runs as a process: `install`, `boot-check`, `status`, `mark`, as on a device.
//!
//! Every device starts as it leaves the factory: slot A holds the factory image, the
//! environment says "A, then B" with both slots bootable, and the device has booted A once and
//! run `boot-check` there.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::sim::{Act, Signer, states, tamper};
use common::{
    Backend, COMMITTED, Gateway, ImageServer, ROLLED_BACK, assert_exit, pattern, sha256_hex,
};
use serde_json::Value;

const COMPATIBLE: &str = "acme-gw-cycle";
/// The try budget of the U-Boot script and the file backend (`bootloader.attempts`).
const ATTEMPTS: u32 = 3;
/// Capacity of each file slot.
const SLOT_SIZE: u64 = 1024 * 1024;
/// The image: a little over 300 KB, not a multiple of any block size.
const IMAGE_LEN: usize = 300_017;
/// What the factory put into the slots. B's is longer than the image, so a write that stops
/// early or starts late shows.
const FACTORY_A_LEN: usize = 200_003;
const FACTORY_B_LEN: usize = 400_009;

/// Where the loopback server serves the image, and the same number of other bytes.
const IMAGE_PATH: &str = "/rootfs.img";
const WRONG_PATH: &str = "/wrong.img";

const HEALTHY: &[&[&str]] = &[&["true"]];
const UNHEALTHY: &[&[&str]] = &[&["false"]];

struct Device {
    gateway: Gateway,
    backend: Backend,
    server: ImageServer,
    image: Vec<u8>,
}

/// See [`Device::untouched`].
struct Untouched {
    a: String,
    b: String,
    env: String,
}

derefs_to_gateway!(Device);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

impl Device {
    /// A device fresh from the factory, booted once into A.
    fn new(backend: Backend) -> Device {
        let gateway = common::gateway()
            .backend(backend)
            .compatible(COMPATIBLE)
            .slot_size(SLOT_SIZE)
            .slot_contents(pattern(FACTORY_A_LEN, 2), pattern(FACTORY_B_LEN, 3))
            .configure(|c| c.install.stall_timeout = std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let image = pattern(IMAGE_LEN, 1);
        let mut wrong = image.clone();
        wrong[IMAGE_LEN / 2] ^= 0x01;
        let server = ImageServer::background(
            image.clone(),
            vec![(IMAGE_PATH, Act::Serve), (WRONG_PATH, Act::Body(wrong))],
        );
        let device = Device {
            gateway,
            backend,
            server,
            image,
        };
        assert_exit(&device.boot_check(), 0, "boot-check at the factory boot");
        device
    }

    fn install(&self, release: &Path) -> Output {
        self.run(&["install", release.to_str().unwrap()])
    }

    fn boot_check(&self) -> Output {
        self.run(&["boot-check"])
    }

    /// `update-agent ARGS`, which must succeed with `said` on stdout.
    #[track_caller]
    fn run_saying(&self, args: &[&str], said: &str) {
        let out = self.run(args);
        assert_exit(&out, 0, &args.join(" "));
        assert!(stdout(&out).contains(said), "{}", stdout(&out));
    }

    /// A release of the device's image signed by `signer` (the device trusts its own), served
    /// at `url_path` on the loopback server.
    fn release_by(
        &self,
        signer: &Signer,
        version: &str,
        security_version: u64,
        url_path: &str,
    ) -> PathBuf {
        let out = self.path(&format!(
            "release-{version}-{}.json",
            signer.key_id().short()
        ));
        signer
            .release(COMPATIBLE, version)
            .security_version(security_version)
            .advisory("Fixes the frobnicator")
            .image(&self.server.url(url_path), &self.image)
            .write(&out)
            .unwrap()
    }

    fn release_at(&self, version: &str, security_version: u64) -> PathBuf {
        self.release_by(self.signer(), version, security_version, IMAGE_PATH)
    }

    /// Both slots' contents and the bootloader environment, for [`Device::assert_untouched`].
    fn untouched(&self) -> Untouched {
        Untouched {
            a: self.slot_hash("A"),
            b: self.slot_hash("B"),
            env: self.env.summary(),
        }
    }

    /// A refused release wrote neither slot and switched nothing since `before`.
    #[track_caller]
    fn assert_untouched(&self, before: &Untouched) {
        assert_eq!(self.slot_hash("A"), before.a, "slot A was written");
        assert_eq!(self.slot_hash("B"), before.b, "slot B was written");
        assert_eq!(self.env.summary(), before.env, "the environment changed");
    }

    /// `slot` is first in the order with its full budget: activated or marked good.
    #[track_caller]
    fn assert_env_first_and_good(&self, slot: &str) {
        let env = self.env.summary();
        assert_eq!(
            self.env.order().first().map(String::as_str),
            Some(slot),
            "{env}"
        );
        match self.backend {
            Backend::Grub => {
                assert_eq!(self.env.get(&format!("{slot}_OK")).unwrap(), "1", "{env}");
                assert_eq!(self.env.get(&format!("{slot}_TRY")).unwrap(), "0", "{env}");
            }
            Backend::UBoot | Backend::File => {
                let left = self.env.get(&format!("BOOT_{slot}_LEFT")).unwrap();
                assert_eq!(left, format!("{ATTEMPTS:x}"), "{env}");
            }
        }
        assert_eq!(self.env.primary().as_deref(), Some(slot), "{env}");
    }

    /// `status --json` after a transaction that ended in `result` for `reason`: idle, A next.
    #[track_caller]
    fn assert_idle_after(&self, result: &str, reason: &str) -> Value {
        let status = self.status_json();
        assert_eq!(status["primary"], "A", "{status:#}");
        assert_eq!(status["phase"], "idle", "{status:#}");
        assert_eq!(status["last"]["result"], result, "{status:#}");
        assert_eq!(status["last"]["reason"], reason, "{status:#}");
        status
    }

    /// B out of the rotation, A the slot that boots next.
    #[track_caller]
    fn assert_back_to_a(&self) {
        self.assert_env_bad("B");
        let env = self.env.summary();
        assert_eq!(self.env.primary().as_deref(), Some("A"), "{env}");
    }

    /// `slot` is marked bad: out of the order with no tries (U-Boot, file) or not OK (GRUB).
    #[track_caller]
    fn assert_env_bad(&self, slot: &str) {
        let env = self.env.summary();
        match self.backend {
            Backend::Grub => {
                assert_eq!(self.env.get(&format!("{slot}_OK")).unwrap(), "0", "{env}");
            }
            Backend::UBoot | Backend::File => {
                assert!(!self.env.order().iter().any(|s| s == slot), "{env}");
                assert_eq!(
                    self.env.get(&format!("BOOT_{slot}_LEFT")).unwrap(),
                    "0",
                    "{env}"
                );
            }
        }
        assert!(!self.env.bootable(slot), "{env}");
    }

    /// Installs `release`, boots into B and commits it there.
    fn install_and_commit(&mut self, release: &Path) {
        assert_exit(&self.install(release), 0, "install");
        assert_eq!(self.boot(), "B");
        assert_exit(&self.boot_check(), 0, "boot-check in the new slot");
        assert_eq!(self.last_event()["state"], "committed");
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM|-HH:MM)`, and a real instant.
fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        range
            .into_iter()
            .all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
    };
    let head_ok = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !head_ok {
        return false;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    let zone_ok = rest == "Z"
        || (rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && rest.as_bytes()[3] == b':');
    zone_ok && text.parse::<jiff::Timestamp>().is_ok()
}

/// What every event log must be: sequence numbers strictly increasing over the device's life,
/// RFC 3339 timestamps. (Not that the timestamps increase: they are wall-clock time, which a
/// gateway without RTC may set back.)
#[track_caller]
fn assert_event_log_well_formed(events: &[Value]) {
    let mut last: Option<u64> = None;
    for event in events {
        let seq = event["seq"].as_u64().expect("seq is a number");
        let at = event["at"].as_str().expect("at is a string");
        assert!(is_rfc3339(at), "not an RFC 3339 timestamp: {at}");
        if let Some(last) = last {
            assert!(seq > last, "seq {seq} after {last}: {events:#?}");
        }
        last = Some(seq);
    }
}

/// The events of one transaction all name it, the release, the version and the target slot.
#[track_caller]
fn assert_one_transaction(events: &[Value], version: &str, slot: &str) {
    let txn = events[0]["txn"].as_str().expect("a transaction id");
    let release_id = events[0]["release_id"].as_str().expect("a release id");
    assert_eq!(release_id.len(), 64);
    for event in events {
        assert_eq!(event["txn"], txn, "{event}");
        assert_eq!(event["release_id"], release_id, "{event}");
        assert_eq!(event["to_version"], version, "{event}");
        assert_eq!(event["slot"], slot, "{event}");
    }
}

// ------------------------------------------------------------------------------------------
// Scenarios, each run for every backend (see `backend_tests!` at the end)

/// Install from the loopback server, reboot into B, health checks pass, commit.
fn happy_path(backend: Backend) {
    let mut dev = Device::new(backend);
    let a_before = dev.slot_hash("A");
    let release = dev.release_at("2026.06.1", 5);

    dev.run_saying(&["install", release.to_str().unwrap()], "reboot to try it");
    assert_eq!(
        dev.reboots_requested(),
        0,
        "install without --reboot leaves the reboot"
    );
    dev.assert_env_first_and_good("B");
    let status = dev.status_json();
    assert_eq!(status["phase"], "reboot-pending");
    assert_eq!(status["booted"], "A");
    assert_eq!(status["primary"], "B");

    assert_eq!(dev.boot(), "B");
    let out = dev.boot_check();
    assert_exit(&out, 0, "boot-check in the new slot");

    let events = dev.events();
    assert_eq!(states(&events), COMMITTED);
    assert_event_log_well_formed(&events);
    assert_one_transaction(&events, "2026.06.1", "B");
    assert!(
        events.iter().all(|e| e.get("reason").is_none()),
        "{events:#?}"
    );

    let status = dev.status_json();
    assert_eq!(status["booted"], "B", "{status:#}");
    assert_eq!(status["primary"], "B", "{status:#}");
    assert_eq!(status["phase"], "idle", "{status:#}");
    assert_eq!(status["last"]["result"], "committed", "{status:#}");
    assert_eq!(status["last"]["version"], "2026.06.1", "{status:#}");
    assert_eq!(status["floor"], 5, "{status:#}");
    let slot_b = &status["slots"][1];
    assert_eq!(slot_b["bootname"], "B");
    assert_eq!(slot_b["committed"], true, "{status:#}");
    assert_eq!(slot_b["version"], "2026.06.1", "{status:#}");
    assert_eq!(slot_b["sha256"], sha256_hex(&dev.image), "{status:#}");

    assert_eq!(dev.slot_hash("A"), a_before, "the booted slot was written");
    let b = dev.slot("B");
    assert_eq!(
        sha256_hex(&b[..IMAGE_LEN]),
        sha256_hex(&dev.image),
        "slot B holds the image"
    );
    assert_eq!(b.len(), FACTORY_B_LEN, "slot B grew or shrank");
    dev.assert_env_first_and_good("B");
    assert_eq!(dev.reboots_requested(), 0);
    let fetched: Vec<_> = dev.server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(fetched, [IMAGE_PATH]);
}

/// The trial boot's health check fails: B is marked bad, the device reboots back into A and
/// reports the rollback; the same release offered again is refused and touches nothing.
fn health_check_fails(backend: Backend) {
    let mut dev = Device::new(backend);
    let a_before = dev.slot_hash("A");
    let release = dev.release_at("2026.06.1", 5);
    assert_exit(&dev.install(&release), 0, "install");

    dev.set_health(UNHEALTHY);
    assert_eq!(dev.boot(), "B");
    let out = dev.boot_check();
    assert_exit(&out, 0, "boot-check in the unhealthy slot");
    assert_eq!(dev.reboots_requested(), 1, "the rollback reboots");
    let last = dev.last_event();
    assert_eq!(last["state"], "rolling-back", "{last}");
    assert_eq!(last["reason"], "health-check-failed", "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("false"),
        "{last}"
    );
    dev.assert_back_to_a();
    assert_eq!(dev.status_json()["phase"], "rolling-back");

    dev.set_health(HEALTHY);
    assert_eq!(dev.boot(), "A", "the rollback boots the old slot");
    let out = dev.boot_check();
    assert_exit(
        &out,
        0,
        "boot-check finishes the rollback: its job, not a failure of its own",
    );
    assert_eq!(dev.reboots_requested(), 1, "no second reboot");

    let events = dev.events();
    assert_eq!(states(&events), ROLLED_BACK);
    assert_event_log_well_formed(&events);
    assert_one_transaction(&events, "2026.06.1", "B");
    assert_eq!(
        events[7]["reason"], "health-check-failed",
        "{:#}",
        events[7]
    );

    let status = dev.status_json();
    assert_eq!(status["booted"], "A", "{status:#}");
    assert_eq!(status["primary"], "A", "{status:#}");
    assert_eq!(status["phase"], "idle", "{status:#}");
    assert_eq!(status["last"]["result"], "rolled-back", "{status:#}");
    assert_eq!(
        status["last"]["reason"], "health-check-failed",
        "{status:#}"
    );
    assert_eq!(status["floor"], 0, "a rollback does not raise the floor");
    dev.assert_env_bad("B");
    assert_eq!(dev.slot_hash("A"), a_before);

    // The same release once more: refused, nothing downloaded or written, nothing switched.
    let before = dev.untouched();
    let fetches = dev.server.seen().len();
    let out = dev.install(&release);
    assert_exit(&out, 1, "install of a release that rolled back");
    assert!(
        stderr(&out).contains("previously-rolled-back"),
        "{}",
        stderr(&out)
    );
    let last = dev.last_event();
    assert_eq!(last["state"], "refused", "{last}");
    assert_eq!(last["reason"], "previously-rolled-back", "{last}");
    assert_event_log_well_formed(&dev.events());
    dev.assert_untouched(&before);
    assert_eq!(
        dev.server.seen().len(),
        fetches,
        "the image was fetched again"
    );
    assert_eq!(dev.reboots_requested(), 1);
}

/// The new slot never gets as far as `boot-check` (its init hangs): the boot script tries it
/// until its budget is gone and falls back to A, where the agent reports `fell-back`.
fn new_slot_never_comes_up(backend: Backend) {
    let mut dev = Device::new(backend);
    let a_before = dev.slot_hash("A");
    let release = dev.release_at("2026.06.1", 5);
    assert_exit(&dev.install(&release), 0, "install");

    let mut tries_of_b = 0;
    // Power on again and again; B's init hangs every time, so no boot-check runs there.
    while dev.boot() == "B" {
        tries_of_b += 1;
        assert!(tries_of_b <= 10, "the boot script never falls back");
    }
    let expected_tries = match backend {
        Backend::UBoot | Backend::File => ATTEMPTS,
        Backend::Grub => 1,
    };
    assert_eq!(tries_of_b, expected_tries, "tries of B before the fallback");

    let out = dev.boot_check();
    assert_exit(
        &out,
        0,
        "boot-check records the fallback: its job, not a failure of its own",
    );
    let events = dev.events();
    assert_eq!(
        states(&events),
        [
            "accepted",
            "writing",
            "written",
            "activated",
            "rebooting",
            "rolled-back"
        ]
    );
    assert_event_log_well_formed(&events);
    assert_one_transaction(&events, "2026.06.1", "B");
    assert_eq!(events[5]["reason"], "fell-back", "{:#}", events[5]);

    dev.assert_back_to_a();
    let status = dev.assert_idle_after("rolled-back", "fell-back");
    assert_eq!(status["booted"], "A", "{status:#}");
    assert_eq!(
        status["slots"][1]["bootloader"]["good"], false,
        "{status:#}"
    );
    assert_eq!(dev.slot_hash("A"), a_before);
    assert_eq!(dev.reboots_requested(), 0);
    // And it stays in A.
    assert_eq!(dev.boot(), "A");
}

/// A release altered after signing, and one signed by a key the device does not trust: both
/// refused before anything is fetched, written or switched, and both logged.
fn tampered_release(backend: Backend) {
    let dev = Device::new(backend);
    let before = dev.untouched();

    // One byte of the signed manifest changed, the signature kept; and a key it does not trust.
    let genuine = dev.release_at("2026.06.1", 5);
    let tampered = dev.path("tampered.json");
    fs::write(&tampered, tamper(&fs::read(&genuine).unwrap())).unwrap();
    let untrusted = dev.release_by(&Signer::from_seed(99), "2026.06.2", 5, IMAGE_PATH);

    for (release, reason) in [(&tampered, "bad-signature"), (&untrusted, "untrusted-key")] {
        let out = dev.install(release);
        assert_exit(&out, 1, reason);
        assert!(stderr(&out).contains(reason), "{reason}: {}", stderr(&out));
        let last = dev.last_event();
        assert_eq!(last["state"], "refused", "{last}");
        assert_eq!(last["reason"], reason, "{last}");
        assert!(
            last.get("txn").is_none(),
            "a refusal starts no transaction: {last}"
        );
    }
    let events = dev.events();
    assert_eq!(states(&events), ["refused", "refused"]);
    assert_event_log_well_formed(&events);

    dev.assert_untouched(&before);
    assert!(dev.server.seen().is_empty(), "an image was fetched");
    assert_eq!(dev.reboots_requested(), 0);
    let status = dev.status_json();
    assert_eq!(status["phase"], "idle", "{status:#}");
    assert_eq!(status["primary"], "A", "{status:#}");
}

/// The server sends other bytes than the signed hash: the install fails `hash-mismatch` and the
/// bootloader is never told to try B.
fn wrong_image_bytes(backend: Backend) {
    let dev = Device::new(backend);
    let a_before = dev.slot_hash("A");
    let release = dev.release_by(dev.signer(), "2026.06.1", 5, WRONG_PATH);

    let out = dev.install(&release);
    assert_exit(&out, 1, "install of wrong bytes");
    let events = dev.events();
    assert_eq!(states(&events), ["accepted", "writing", "failed"]);
    assert_event_log_well_formed(&events);
    assert_one_transaction(&events, "2026.06.1", "B");
    assert_eq!(events[2]["reason"], "hash-mismatch", "{:#}", events[2]);

    // B was made unbootable before its first byte was written and stays so.
    dev.assert_back_to_a();
    let status = dev.assert_idle_after("failed", "hash-mismatch");
    assert_eq!(status["slots"][1]["version"], Value::Null, "{status:#}");
    assert_eq!(dev.slot_hash("A"), a_before);
    assert_eq!(dev.reboots_requested(), 0);
}

/// After security version 5 committed, a release with security version 4 is refused.
fn downgrade(backend: Backend) {
    let mut dev = Device::new(backend);
    let release = dev.release_at("2026.06.1", 5);
    dev.install_and_commit(&release);
    assert_eq!(dev.status_json()["floor"], 5);

    // A now is the inactive slot: the one a downgrade would overwrite.
    let before = dev.untouched();
    let older = dev.release_at("2026.05.3", 4);
    let out = dev.install(&older);
    assert_exit(&out, 1, "install of a downgrade");
    assert!(stderr(&out).contains("downgrade"), "{}", stderr(&out));
    let last = dev.last_event();
    assert_eq!(last["state"], "refused", "{last}");
    assert_eq!(last["reason"], "downgrade", "{last}");
    assert_event_log_well_formed(&dev.events());

    dev.assert_untouched(&before);
    let status = dev.status_json();
    assert_eq!(status["floor"], 5, "{status:#}");
    assert_eq!(status["booted"], "B", "{status:#}");
    assert_eq!(status["primary"], "B", "{status:#}");
    assert_eq!(status["last"]["result"], "committed", "{status:#}");
}

/// `mark` and `status` by hand, as an integrator at the console would use them.
fn mark_cli(backend: Backend) {
    let dev = Device::new(backend);
    let env_before = dev.env.summary();

    // B holds nothing the agent wrote: activating it needs --force.
    let out = dev.run(&["mark", "active", "other"]);
    assert_exit(&out, 2, "mark active other");
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(
        dev.env.summary(),
        env_before,
        "a refused mark changed the environment"
    );

    dev.run_saying(&["mark", "good", "booted"], "marked slot A good");
    dev.assert_env_first_and_good("A");

    let out = dev.run(&["status"]);
    assert_exit(&out, 0, "status");
    let text = stdout(&out);
    assert!(text.contains("booted slot:  A"), "{text}");
    for slot in ["A", "B"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("slot {slot}: ")))
            .unwrap_or_else(|| panic!("no line for slot {slot}:\n{text}"));
        assert!(
            line.contains(&format!("slot-{}", slot.to_ascii_lowercase())),
            "{line}"
        );
    }

    dev.run_saying(
        &["mark", "active", "other", "--force"],
        "marked slot B active",
    );
    dev.assert_env_first_and_good("B");
    assert!(
        dev.events().is_empty(),
        "marks by hand are not transactions"
    );
}

/// The slot that runs keeps running, boot after boot: after a commit, and after a second update
/// (from B into A) rolled back. The boot scripts count tries (U-Boot) or flag them (GRUB) at
/// every boot; `boot-check` must give the booted slot its budget back each time, as RAUC's
/// mark-good service does, or the device drifts back to the other slot by itself.
fn stays_in_the_running_slot_across_reboots(backend: Backend) {
    let mut dev = Device::new(backend);
    let release = dev.release_at("2026.06.1", 5);
    dev.install_and_commit(&release);
    for boot in 1..=ATTEMPTS + 1 {
        assert_eq!(
            dev.boot(),
            "B",
            "boot {boot} after the commit: {}",
            dev.env.summary()
        );
        assert_exit(&dev.boot_check(), 0, "boot-check");
    }

    // The next update goes into A, fails its trial and rolls back into B.
    let second = dev.release_at("2026.07.1", 6);
    assert_exit(&dev.install(&second), 0, "install into A");
    dev.set_health(UNHEALTHY);
    assert_eq!(dev.boot(), "A");
    assert_exit(&dev.boot_check(), 0, "boot-check in the unhealthy slot");
    dev.set_health(HEALTHY);
    assert_eq!(dev.boot(), "B");
    assert_exit(&dev.boot_check(), 0, "boot-check after the rollback");
    assert_eq!(dev.last_event()["state"], "rolled-back");
    for boot in 1..=ATTEMPTS + 1 {
        assert_eq!(
            dev.boot(),
            "B",
            "boot {boot} after the rollback: {}",
            dev.env.summary()
        );
        assert_exit(&dev.boot_check(), 0, "boot-check");
    }
    dev.assert_env_bad("A");
    assert_event_log_well_formed(&dev.events());
    let status = dev.status_json();
    assert_eq!(status["floor"], 5, "{status:#}");
    assert_eq!(status["primary"], "B", "{status:#}");
}

backend_tests!(
    happy_path,
    health_check_fails,
    new_slot_never_comes_up,
    tampered_release,
    wrong_image_bytes,
    downgrade,
    mark_cli,
    stays_in_the_running_slot_across_reboots,
);
