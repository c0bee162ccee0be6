//! Attacks on the agent's boundaries, each played from the attacker's side with the real binary,
//! the real installer socket and the real bootloader tools: a compromised daemon (requests forged
//! with `installer-request` as the daemon's user, `nobody`), a hostile local user (another uid,
//! a writable state directory), concurrent commands. Each test names what the attacker tried and
//! asserts what it gets now.
//!
//! Must run as root (the installer runs as root, the daemon role as `nobody` through `setpriv`);
//! CI does. Needs `util-linux` (setpriv), `libubootenv-tool` and `grub-common`.

mod common;
#[allow(dead_code)]
#[path = "mqtt/harness.rs"]
mod mqtt;
#[path = "split/harness.rs"]
mod split;

use std::fs;
use std::process::{Command, Output};

use common::{pattern, require_tool};
use serde_json::Value;
use split::*;

/// `installer-request` as the daemon's user: what a compromised daemon can send.
fn ask(split: &Split, args: &[&str]) -> (Output, Value) {
    split.request(false, args)
}

fn assert_done(out: &Output, reply: &Value) {
    assert_eq!(reply["kind"], "done", "{}", text(out));
}

/// Item 1 of the attack on `0bedbaf`: as the daemon's user, through the installer socket, write
/// slot B with a valid signed release but other bytes (refused `hash-mismatch`, but the bytes
/// stayed), then `mark-good B`, `mark-bad A`, `reboot`. All were answered `done` and the
/// bootloader then booted the attacker's bytes. Now the installer's ledger knows B holds bytes
/// it did not verify: every step that would let the bootloader choose B is refused, the
/// refused bytes' head is wiped, and the device keeps booting A.
fn a_compromised_daemon_cannot_get_its_own_bytes_booted(backend: Backend) {
    let mut split = Split::new(backend);
    let release = split.release("2.0", IMAGE_PATH);
    let release = release.to_str().unwrap();
    let evil = pattern(IMAGE_LEN, 99);
    let evil_path = split.path("evil.img");
    fs::write(&evil_path, &evil).unwrap();
    let evil_path = evil_path.to_str().unwrap();

    // Before any write: B holds bytes the installer never verified, so neither making it good
    // nor leaving the bootloader only B is allowed.
    let (out, reply) = ask(&split, &["--op", "mark-good", "--slot", "B"]);
    assert_refused(&out, &reply, "unverified-slot");
    let (out, reply) = ask(&split, &["--op", "mark-bad", "--slot", "A"]);
    assert_refused(&out, &reply, "unverified-slot");

    let (out, reply) = ask(
        &split,
        &[
            "--op",
            "write",
            "--slot",
            "B",
            "--release",
            release,
            "--image",
            evil_path,
        ],
    );
    assert_refused(&out, &reply, "hash-mismatch");
    let slot_b = split.slot("B");
    assert!(
        slot_b[..(1024 * 1024).min(slot_b.len())]
            .iter()
            .all(|b| *b == 0),
        "the head of the refused bytes is wiped"
    );
    assert_ne!(
        &slot_b[..IMAGE_LEN],
        &evil[..],
        "B does not hold the refused image"
    );

    let (out, reply) = ask(&split, &["--op", "mark-good", "--slot", "B"]);
    assert_refused(&out, &reply, "unverified-slot");
    assert!(
        reply["message"].as_str().unwrap().contains("not verified"),
        "{reply}"
    );
    let (out, reply) = ask(&split, &["--op", "mark-bad", "--slot", "A"]);
    assert_refused(&out, &reply, "unverified-slot");
    let (out, reply) = ask(
        &split,
        &["--op", "activate", "--slot", "B", "--release", release],
    );
    assert_refused(&out, &reply, "readback-mismatch");
    // Rebooting is the daemon's to ask (denial of service, not a write of its bytes).
    let (out, reply) = ask(&split, &["--op", "reboot"]);
    assert_done(&out, &reply);

    let env = split.env_text();
    match backend {
        Backend::Grub => {
            assert_eq!(
                split.grub.as_ref().unwrap().get("B_OK").as_deref(),
                Some("0"),
                "{env}"
            );
            assert_eq!(
                split.grub.as_ref().unwrap().get("A_OK").as_deref(),
                Some("1"),
                "{env}"
            );
        }
        Backend::File | Backend::UBoot => {
            assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("A"), "{env}");
            assert_eq!(split.env_var("BOOT_B_LEFT").as_deref(), Some("0"), "{env}");
        }
    }
    // What the installer itself records, root's alone.
    let ledger: Value =
        serde_json::from_slice(&fs::read(split.path("installer-state/ledger.json")).unwrap())
            .unwrap();
    assert_eq!(ledger["slots"]["B"]["held"], "unverified", "{ledger}");
    assert_eq!(ledger["slots"]["A"]["held"], "booted", "{ledger}");

    let status = Command::new(BIN)
        .args(["status", "--offline", "--config"])
        .arg(split.path("agent.toml"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("next boot:    A"),
        "{}",
        text(&status)
    );
    // The boot scripts' rules, also past the tries' fallback: four boots without any mark-good
    // (U-Boot spends A's three tries and resets; GRUB gives A one try and then falls back to
    // the slot that is OK) all start A.
    for boot in 0..4 {
        assert_eq!(split.boot(), "A", "boot {boot}: {}", split.env_text());
    }

    // The same request after a correct write is carried out: the ledger vouches for B now.
    let good = split.path("rootfs.img");
    let (out, reply) = ask(
        &split,
        &[
            "--op",
            "write",
            "--slot",
            "B",
            "--release",
            release,
            "--image",
            good.to_str().unwrap(),
        ],
    );
    assert_done(&out, &reply);
    let (out, reply) = ask(&split, &["--op", "mark-good", "--slot", "B"]);
    assert_done(&out, &reply);
}

#[test]
fn item1_a_compromised_daemon_cannot_boot_its_bytes_with_the_file_backend() {
    a_compromised_daemon_cannot_get_its_own_bytes_booted(Backend::File);
}

#[test]
fn item1_a_compromised_daemon_cannot_boot_its_bytes_with_fw_setenv() {
    require_tool("fw_setenv", "libubootenv-tool");
    a_compromised_daemon_cannot_get_its_own_bytes_booted(Backend::UBoot);
}

#[test]
fn item1_a_compromised_daemon_cannot_boot_its_bytes_with_grub_editenv() {
    require_tool("grub-editenv", "grub-common");
    a_compromised_daemon_cannot_get_its_own_bytes_booted(Backend::Grub);
}
