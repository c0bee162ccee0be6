//! The least-privilege split with real processes: `update-agent installer` runs as root on a Unix
//! socket in a temporary directory, with root-owned 0600 file slots and a root-owned 0600
//! bootloader environment (the file backend, and U-Boot through the real `fw_setenv`); the daemon
//! role (`update-agent install` and `boot-check` with an `[installer]` section) runs as `nobody`
//! through `setpriv`, with a state directory of its own. Forged requests are sent with the
//! hidden `update-agent installer-request`, which streams whatever bytes it is given.
//!
//! `update-agent run` (the MQTT daemon) runs as `nobody` too, against a real mosquitto on a free
//! loopback port, with the same installer.
//!
//! Must run as root (it starts the installer as root and switches to `nobody`); CI does. Needs
//! `util-linux` (setpriv) and `libubootenv-tool` (fw_printenv, fw_setenv). The split is a
//! simulated gateway (`update_agent::sim`) built with `.split()`.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mqtt_state::committed_state;
use common::sim::mqtt::{ClientArgs, Mosquitto, Sub};
use common::sim::{User, states, tamper};
use common::split::*;
use common::{BIN, Backend, COMMITTED, describe as text, pattern, require, wait_for};
use serde_json::Value;

fn happy_path(backend: Backend) {
    let mut split = Split::new(backend);
    let release = split.release("2.0", IMAGE_PATH);
    let out = split.install_as_daemon(&release);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reboot to try it"),
        "{}",
        text(&out)
    );
    let slot_b = split.slot("B");
    assert_eq!(
        &slot_b[..IMAGE_LEN],
        &split.image[..],
        "slot B holds the image"
    );
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));

    split.boot_and_check("B", "the activated slot boots");
    split.assert_last_event("committed", "");
    assert_eq!(
        split.env_var("BOOT_B_LEFT").as_deref(),
        Some(&*ATTEMPTS.to_string())
    );
    let log = split.installer_log();
    for op in [
        "write for uid 65534 done",
        "activate for uid 65534 done",
        "mark-good for uid 65534 done",
    ] {
        assert!(log.contains(op), "installer log lacks {op:?}:\n{log}");
    }
    // The daemon's own state directory holds the signed release it handed on.
    assert!(split.path("state/releases").read_dir().unwrap().count() >= 1);

    // The commit raised the installer's own floor: an older signed release (security version
    // 1) is refused by the installer itself, whatever the daemon's state says.
    let ledger = split.ledger();
    assert_eq!(ledger["floor"], 2, "{ledger}");
    assert_eq!(ledger["slots"]["B"]["held"], "verified", "{ledger}");
    assert_eq!(ledger["slots"]["A"]["held"], "booted", "{ledger}");
    let old = split.release_at("1.5", 1, IMAGE_PATH);
    let slot_a = split.slot("A");
    let (out, reply) = split.write_request(Some("A"), &old, split.path("rootfs.img"), &[]);
    assert_refused(&out, &reply, "downgrade");
    assert_eq!(split.slot("A"), slot_a, "slot A untouched");
}

#[test]
fn a_compressed_image_is_decompressed_by_the_daemon_and_hashed_by_the_installer() {
    let split = Split::new(Backend::File);
    let compressed = zstd::encode_all(&split.image[..], 3).unwrap();
    let release = split.file_release("2.0", 2, "rootfs.img.zst", &compressed, Some(&split.image));
    split.install_as_daemon(&release);
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
    // The daemon's decoder output is what the installer hashed: a zstd stream the daemon
    // cannot fully trust still ends in the signed image hash, checked by the installer.
    let log = split.installer_log();
    assert!(log.contains("write for uid 65534 done"), "{log}");
}

#[test]
fn a_daemon_killed_mid_write_resumes_from_the_installers_checkpoint() {
    let split = Split::new(Backend::File);
    // Three checkpoints' worth (1 MiB each) and a bit.
    let big = pattern(3 * 1024 * 1024 + 4099, 7);
    let release = split.file_release("3.0", 3, "big.img", &big, None);
    // kill -9 of the daemon role right after it persisted the installer's first checkpoint.
    split.install_killed_at(&release, "checkpoint:1");
    // The same boot: boot-check finishes the interrupted install through the installer.
    let out = split.as_daemon(&["boot-check", "--no-reboot"]);
    assert!(out.status.success(), "boot-check: {}", text(&out));
    let log = split.installer_log();
    assert!(
        log.contains("write of slot B resumes at byte 1048576"),
        "the installer re-hashed the first checkpoint and took the rest: {log}"
    );
    assert_eq!(&split.slot("B")[..big.len()], &big[..]);
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}

#[test]
fn happy_path_across_both_roles_with_the_file_backend() {
    happy_path(Backend::File);
}

#[test]
fn happy_path_across_both_roles_with_fw_setenv() {
    require("fw_setenv", "libubootenv-tool");
    happy_path(Backend::UBoot);
}

#[test]
fn the_daemon_user_cannot_open_a_slot_or_the_environment() {
    for backend in [Backend::File, Backend::UBoot] {
        let split = Split::new(backend);
        let env_file = split.env.file_path().to_owned();
        for file in [split.path("slot-b"), env_file.clone()] {
            // An open for reading and writing, as the writer and the bootloader backends do.
            let out = split.as_nobody_sh(&format!("exec 3<>'{}'", file.display()));
            assert!(!out.status.success(), "nobody opened {}", file.display());
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
                "{}",
                text(&out)
            );
        }
        // The agent's own code as nobody without the installer: the work fails with EACCES and
        // nothing changes.
        let before = (split.slot("B"), split.env_text());
        let release = split.release("2.0", IMAGE_PATH);
        let config = split.config_without_installer();
        let out = split.as_nobody(&[
            "install",
            "--config",
            config.to_str().unwrap(),
            release.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{backend:?}: {}", text(&out));
        let last = split.events().pop().expect("an event");
        assert_eq!(last["state"], "failed", "{last}");
        assert_eq!(last["reason"], "bootloader-failed", "{last}");
        if backend == Backend::File {
            // fw_printenv words EACCES as "Configuration file wrong or corrupted".
            assert!(
                text(&out).contains("Permission denied"),
                "the failure names EACCES: {}",
                text(&out)
            );
        }
        assert_eq!((split.slot("B"), split.env_text()), before);
    }
}

#[test]
fn a_caller_other_than_the_daemon_user_is_refused() {
    let split = Split::new(Backend::File);
    let before = split.env_text();
    let release = split.release("2.0", IMAGE_PATH);
    let image = split.path("rootfs.img");
    // Root can connect (it passes the socket's file mode) but is not the daemon user.
    for args in [
        vec!["--op", "mark-good", "--slot", "B"],
        vec![
            "--op",
            "write",
            "--release",
            release.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
    ] {
        let (out, reply) = split.request(true, &args);
        assert_refused(&out, &reply, "forbidden");
        assert!(
            reply["message"].as_str().unwrap().contains("uid 0"),
            "{reply}"
        );
    }
    assert_eq!(split.env_text(), before);
    assert_eq!(&split.slot("B")[..], &pattern(FACTORY_B_LEN, 3)[..]);
    assert!(
        split.installer_log().contains("forbidden"),
        "{}",
        split.installer_log()
    );
    // The daemon role under the wrong uid (root here) stops before it touches the state (see
    // tests/attacks.rs, item 4), and nothing changes.
    let events = split.events();
    let out = Command::new(BIN)
        .arg("install")
        .arg("--config")
        .arg(split.path("agent.toml"))
        .arg(&release)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("runuser -u nobody"), "{}", text(&out));
    assert_eq!(split.events(), events);
    assert_eq!(split.env_text(), before);
    assert_eq!(&split.slot("B")[..], &pattern(FACTORY_B_LEN, 3)[..]);
    // An unprivileged uid in the socket's group gets in, and is refused by the peer check.
    let stranger = |gid: &str| User::Ids("4242".into(), gid.into());
    let (out, reply) = split
        .gateway
        .request(&stranger("nogroup"), &["--op", "reboot"]);
    assert_refused(&out, &reply, "forbidden");
    assert!(
        reply["message"].as_str().unwrap().contains("uid 4242"),
        "{reply}"
    );
    // One outside the group does not get past the socket's mode (root:nogroup 0660).
    let out = stranger("4242")
        .command(BIN)
        .arg("installer-request")
        .arg("--socket")
        .arg(split.installer_socket())
        .args(["--op", "reboot"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Permission denied"), "{}", text(&out));
    assert!(!split.path("reboots").exists(), "no reboot was run");
}

#[test]
fn a_tampered_release_is_refused_and_the_slot_untouched() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let tampered = split.tampered(&release);
    let before = (split.slot("B"), split.env_text());
    let image = split.path("rootfs.img");
    for op in ["write", "activate"] {
        let (out, reply) = split.request(
            false,
            &[
                "--op",
                op,
                "--release",
                tampered.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
            ],
        );
        assert_refused(&out, &reply, "bad-signature");
    }
    assert_eq!(
        (split.slot("B"), split.env_text()),
        before,
        "slot B byte-identical"
    );
    let log = split.installer_log();
    assert!(
        log.contains("TAMPER ALERT") && log.contains("bad-signature"),
        "{log}"
    );
    // The booted slot is never written, whatever the release.
    let (out, reply) = split.write_request(Some("A"), &release, &image, &[]);
    assert_refused(&out, &reply, "booted-slot");
    assert_eq!(&split.slot("A")[..], &pattern(200_003, 2)[..]);
}

#[test]
fn image_bytes_that_do_not_match_the_manifest_are_refused_and_not_activated() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let wrong = split.path("wrong.img");
    // Activating B puts it first in the order with a fresh try budget.
    let b_not_activated = || {
        split.assert_b_not_first();
        assert_eq!(split.env_var("BOOT_B_LEFT").as_deref(), Some("0"));
    };
    let (out, reply) = split.write_request(None, &release, &wrong, &[]);
    assert_refused(&out, &reply, "hash-mismatch");
    // The installer marked the target bad before writing, and will not activate it.
    b_not_activated();
    let (out, reply) = split.request(
        false,
        &["--op", "activate", "--release", release.to_str().unwrap()],
    );
    assert_refused(&out, &reply, "readback-mismatch");
    b_not_activated();

    // Through the daemon: the server sends the wrong bytes; the daemon does not hash in this
    // role, the installer does, and the failure is reported with its reason code.
    let bad = split.release("2.0", WRONG_PATH);
    let out = split.as_daemon(&["install", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let last = split.events().pop().expect("an event");
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(last["reason"], "hash-mismatch", "{last}");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("installer refused"),
        "{last}"
    );
    b_not_activated();
    // The refused bytes do not stay: the installer wiped the slot's head (here all of it).
    assert!(split.slot("B")[..IMAGE_LEN].iter().all(|b| *b == 0));
}

#[test]
fn a_resumed_write_rehashes_the_slot_prefix_itself() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let image = split.path("rootfs.img");
    let write =
        |resume: &str| split.write_request(None, &release, &image, &["--resume-from", resume]);
    let (out, reply) = write("0");
    assert_eq!(reply["kind"], "done", "{}", text(&out));
    // A resume from a checkpoint the slot really holds: only the rest is sent, and it verifies.
    let (out, reply) = write("131072");
    assert_eq!(reply["kind"], "done", "{}", text(&out));
    // The slot's prefix changed behind the daemon's back: the installer's own re-hash covers
    // it, so a daemon claiming a checkpoint cannot make it accept bytes it never checked.
    let mut slot = split.slot("B");
    slot[1000] ^= 0xff;
    fs::write(split.path("slot-b"), &slot).unwrap();
    let (out, reply) = write("131072");
    assert_refused(&out, &reply, "hash-mismatch");
}

#[test]
fn the_installer_serves_on_the_socket_systemd_passes_it() {
    let split = Split::new(Backend::File);
    let tool = require("systemd-socket-activate", "systemd");
    let socket = split.path("activated.sock");
    let log = fs::File::create(split.path("activated.log")).unwrap();
    // Listens itself and hands the socket over as fd 3 with LISTEN_FDS=1, as the .socket unit
    // does; it execs the installer, so the pid is the installer's.
    let mut activated = Command::new(tool)
        .arg("--listen")
        .arg(&socket)
        .args([BIN, "installer", "--log", "stderr", "--config"])
        .arg(split.path("agent.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for(
        "systemd-socket-activate to listen",
        Duration::from_secs(20),
        || socket.exists(),
    );
    // Root is not the daemon user: the refusal shows the installer answered on this socket.
    let out = Command::new(BIN)
        .args(["installer-request", "--socket", socket.to_str().unwrap()])
        .args(["--op", "mark-good", "--slot", "A"])
        .output()
        .unwrap();
    let _ = activated.kill();
    let _ = activated.wait();
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{}\n{}",
            text(&out),
            fs::read_to_string(split.path("activated.log")).unwrap()
        )
    });
    assert_refused(&out, &reply, "forbidden");
}

fn mqtt_states(split: &Split, sub: &Sub) -> Vec<String> {
    states(&sub.payloads(&split.topic("events")))
}

fn retained_state(split: &Split, client: &ClientArgs) -> Value {
    client.retained_json(&split.topic("state"))
}

#[test]
fn the_mqtt_daemon_as_nobody_installs_through_the_installer_and_commits_after_the_reboot() {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let mut split = Split::with(Backend::File, |gw| gw.mqtt(&broker.url()));
    let slot_a = split.slot("A");
    let release = fs::read(split.release("2.0", IMAGE_PATH)).unwrap();
    let sub = client.subscribe(&[&split.topic("events")], None);
    client.publish(&split.topic("release"), &release, true);

    split.start_daemon(&[]);
    let reboots = split.path("reboots");
    wait_for(
        "the reboot through the installer",
        Duration::from_secs(60),
        || reboots.exists(),
    );
    // The reboot command ran in the installer: as root, in a directory `nobody` cannot write.
    assert_eq!(fs::metadata(&reboots).unwrap().uid(), 0);
    assert_eq!(fs::read_to_string(&reboots).unwrap(), "reboot\n");
    let before_reboot = ["accepted", "writing", "written", "activated", "rebooting"];
    wait_for(
        "the events up to the reboot on MQTT",
        Duration::from_secs(15),
        || mqtt_states(&split, &sub) == before_reboot,
    );
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
    assert_eq!(split.slot("A"), slot_a, "the active slot is never written");
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
    assert!(split.stop_daemon().success());

    split.boot_and_check("B", "the activated slot boots");
    split.start_daemon(&[]);
    let events = wait_for("the commit on MQTT", Duration::from_secs(30), || {
        let events = sub.payloads(&split.topic("events"));
        (events.len() >= 7).then_some(events)
    });
    assert_eq!(states(&events), COMMITTED, "daemon:\n{}", split.logs());
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert_eq!(events[6]["to_version"], "2.0");
    // The retained state: the new version, and the commit boot-check made as its last event
    // (taken over from the outbox, not recorded by this daemon).
    let state = committed_state(&split, &client, "2.0", "B");
    assert_eq!(state["last_event"]["seq"], 6, "{state}");
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
    let log = split.installer_log();
    for op in [
        "write for uid 65534 done",
        "activate for uid 65534 done",
        "reboot for uid 65534 done",
        "mark-good for uid 65534 done",
    ] {
        assert!(log.contains(op), "installer log lacks {op:?}:\n{log}");
    }
    assert!(split.stop_daemon().success());
}

#[test]
fn a_tampered_release_on_mqtt_is_refused_by_the_daemon_and_never_reaches_the_installer() {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let mut split = Split::with(Backend::File, |gw| gw.mqtt(&broker.url()));
    let slots = (split.slot("A"), split.slot("B"));
    let env = split.env_text();
    let release = fs::read(split.release("2.0", IMAGE_PATH)).unwrap();
    let sub = client.subscribe(&[&split.topic("events")], None);
    client.publish(&split.topic("release"), &tamper(&release), true);

    split.start_daemon(&[]);
    let refusal = wait_for("the refusal on MQTT", Duration::from_secs(30), || {
        sub.payloads(&split.topic("events")).pop()
    });
    assert_eq!(refusal["state"], "refused", "{refusal}");
    assert_eq!(refusal["reason"], "bad-signature", "{refusal}");
    let state = wait_for("the refusal in the state", Duration::from_secs(10), || {
        let state = retained_state(&split, &client);
        (state["last_error"]["reason"] == "bad-signature").then_some(state)
    });
    assert_eq!(state["last_event"]["state"], "refused", "{state}");
    // A moment for anything that would follow (nothing should).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        mqtt_states(&split, &sub),
        ["refused"],
        "daemon:\n{}",
        split.logs()
    );
    assert_eq!(
        (split.slot("A"), split.slot("B")),
        slots,
        "slots byte-identical"
    );
    assert_eq!(split.env_text(), env, "bootloader environment unchanged");
    assert!(!split.path("reboots").exists());
    let log = split.installer_log();
    for asked in [
        "write for uid",
        "refused write",
        "installer: write",
        "activate",
    ] {
        assert!(!log.contains(asked), "the installer saw {asked:?}:\n{log}");
    }
    assert!(split.stop_daemon().success());
}

/// The installer's ledger refuses to leave the bootloader only unverified bytes, and a rollback
/// is not that: the failed trial marks the booted new slot bad while the old one, seen booted,
/// is the way back. With every backend, through the installer as `nobody`.
#[test]
fn a_failed_trial_rolls_back_through_the_installer() {
    for backend in [Backend::File, Backend::UBoot, Backend::Grub] {
        let mut split = Split::with(backend, |gw| gw.health(&[&["sh", "-c", "exit 3"]]));
        let slot_a = split.slot("A");
        let release = split.release("2.0", IMAGE_PATH);
        let out = split.as_daemon(&["install", release.to_str().unwrap()]);
        assert!(out.status.success(), "{backend:?}: {}", text(&out));
        split.boot_and_check("B", &format!("{backend:?}: the activated slot boots"));
        assert!(
            split
                .installer_log()
                .contains("mark-bad for uid 65534 done"),
            "{backend:?}: {}",
            split.installer_log()
        );
        assert_eq!(
            fs::read_to_string(split.path("reboots")).unwrap(),
            "reboot\n",
            "{backend:?}: the rollback's reboot (`install` leaves its own to the caller)"
        );
        split.boot_and_check("A", &format!("{backend:?}: back in the old slot"));
        split.assert_last_event("rolled-back", &format!("{backend:?}: "));
        assert_eq!(split.slot("A"), slot_a, "{backend:?}");
        for _ in 0..3 {
            assert_eq!(split.boot(), "A", "{backend:?}: B stays out");
        }
    }
}

/// A delta update under the split: the installer (root) reads slot A, which the daemon
/// (`nobody`) cannot even open, and asks the daemon for just the store's ranges it lacks; the
/// daemon fetches them from a static server with Range support and never touches a slot.
#[test]
fn a_delta_under_the_split_reads_the_slots_in_the_installer_and_fetches_only_the_rest() {
    use common::sim::RangeAnswers;
    let split = Split::new(Backend::File);
    // The new image: slot A's content with one block changed, and 100 KB more.
    let mut new = split.slot("A")[..200_003].to_vec();
    new[10 * 4096 + 5] ^= 0x55;
    new.extend_from_slice(&pattern(100_000, 77));
    let (server, release) =
        split.served_indexed_release(&new, RangeAnswers::Multipart, "3", None, "delta");
    let serve = split.path("serve");

    split.install_as_daemon(&release);
    assert_eq!(
        &split.slot("B")[..new.len()],
        &new[..],
        "slot B holds the image"
    );
    assert_eq!(server.requests_of("/new.img"), 0, "never the whole image");
    let store = fs::metadata(serve.join("new.img.store")).unwrap().len();
    let fetched = server.ranged_bytes_of("/new.img.store");
    assert!(
        fetched > 0 && fetched * 2 < store,
        "{fetched} of the store's {store} bytes"
    );
    assert!(
        split.installer_log().contains("by delta"),
        "{}",
        split.installer_log()
    );
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}

/// A full write under the split (the server ignores Range requests, so no delta; the daemon may
/// fall back) still sends the installer the block index the daemon checked: the installer
/// checks it against its own verified release and reads the slot back block by block against
/// it, the whole-image SHA-256 matched in the stream. The same for an image compressed for
/// transport, which the daemon decompresses.
#[test]
fn a_full_write_under_the_split_is_read_back_against_the_block_index() {
    use common::sim::RangeAnswers;
    for compress in [None, Some("zstd")] {
        let split = Split::with(Backend::File, |gateway| {
            gateway.configure(|c| c.install.full_download_fallback = true)
        });
        let new = pattern(300_003, 41);
        let (server, release) =
            split.served_indexed_release(&new, RangeAnswers::Never, "1", compress, "full");
        let served = compress.map_or("/new.img", |_| "/new.img.zst");

        split.install_as_daemon(&release);
        assert_eq!(
            &split.slot("B")[..new.len()],
            &new[..],
            "{compress:?}: slot B holds the image"
        );
        assert_eq!(
            server.requests_of(served),
            1,
            "{compress:?}: the whole image"
        );
        let log = split.installer_log();
        assert!(
            log.contains("checked against the block index"),
            "{compress:?}: {log}"
        );
        assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
    }
}

/// A local image (`file://`) with a block index under the split: a delta would save nothing, so
/// the daemon sends the whole image, with the index it checked ahead of it, and the installer
/// reads the slot back block by block against that index. No fallback needs to be allowed: this
/// is not a delta that failed.
#[test]
fn a_local_indexed_image_under_the_split_is_sent_whole_with_its_index() {
    let split = Split::new(Backend::File);
    let mut new = split.slot("A")[..200_003].to_vec();
    new[10 * 4096 + 5] ^= 0x55;
    let serve = split.path("serve");
    fs::create_dir(&serve).unwrap();
    fs::write(serve.join("new.img"), &new).unwrap();
    let url = format!("file://{}", serve.join("new.img").display());
    let release = split.indexed_release(&serve.join("new.img"), "3.0", &url, "3", None, "local");

    split.install_as_daemon(&release);
    assert_eq!(
        &split.slot("B")[..new.len()],
        &new[..],
        "slot B holds the image"
    );
    let log = split.installer_log();
    assert!(!log.contains("by delta"), "{log}");
    assert!(log.contains("checked against the block index"), "{log}");
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}

/// Protocol version 2 changed the write stream (the block index ahead of the image): a daemon
/// of another release is refused with both versions named, before anything is done.
#[test]
fn a_daemon_speaking_another_protocol_version_is_refused_clearly() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let (slot_before, env_before) = (split.slot("B"), split.env_text());
    let (out, reply) = split.write_request(
        Some("B"),
        &release,
        split.path("rootfs.img"),
        &["--protocol-version", "1"],
    );
    assert_refused(&out, &reply, "invalid-request");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("protocol version 1 (this installer speaks 2)")
            && message.contains("different releases"),
        "{reply}"
    );
    // Nothing was done: neither the slot nor the bootloader's environment changed.
    assert!(split.slot("B") == slot_before, "slot B changed");
    assert_eq!(split.env_text(), env_before);
}

/// A power cut of the daemon between the block index and the image's first byte (crash point
/// `index:sent`): the installer sees the stream end, keeps the slot marked bad and unverified,
/// and the next attempt (boot-check in the same boot) sends the index again and writes it all.
#[test]
fn a_daemon_killed_after_sending_the_index_leaves_the_slot_unverified_and_resumes() {
    use common::sim::RangeAnswers;
    let split = Split::with(Backend::File, |gateway| {
        gateway.configure(|c| c.install.full_download_fallback = true)
    });
    let new = pattern(2 * 1024 * 1024 + 11, 23);
    let (_server, release) =
        split.served_indexed_release(&new, RangeAnswers::Never, "1", None, "cut");

    split.install_killed_at(&release, "index:sent");
    wait_for(
        "the installer to end the write",
        Duration::from_secs(20),
        || split.installer_log().contains("refused write"),
    );
    assert_eq!(split.ledger()["slots"]["B"]["held"], "unverified");
    split.assert_b_not_first();

    let out = split.as_daemon(&["boot-check", "--no-reboot"]);
    assert!(out.status.success(), "boot-check: {}", text(&out));
    assert_eq!(&split.slot("B")[..new.len()], &new[..]);
    let log = split.installer_log();
    assert_eq!(
        log.matches("checked against the block index").count(),
        2,
        "both attempts got the index: {log}"
    );
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}
