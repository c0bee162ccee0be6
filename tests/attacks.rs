//! Attacks on the agent's boundaries, each played from the attacker's side with the real binary,
//! the real installer socket and the real bootloader tools: a compromised daemon (requests forged
//! with `installer-request` as the daemon's user, `nobody`), a hostile local user (another uid,
//! a writable state directory), concurrent commands. Each test names what the attacker tried and
//! asserts what it gets now.
//!
//! Must run as root (the installer runs as root, the daemon role as `nobody` through `setpriv`);
//! CI does. Needs `util-linux` (setpriv), `libubootenv-tool` and `grub-common`.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::sim::gateway::{DAEMON_GID, DAEMON_UID, DEVICE_ID};
use common::sim::mqtt::Mosquitto;
use common::sim::{User, states};
use common::split::*;
use common::{BIN, Backend, describe as text, pattern, wait_for};
use serde_json::Value;
use update_agent::mqtt::topics::{DEFAULT_PREFIX, device_topic};

/// `installer-request` as the daemon's user: what a compromised daemon can send.
fn ask(split: &Split, args: &[&str]) -> (Output, Value) {
    split.request(false, args)
}

fn assert_done(out: &Output, reply: &Value) {
    assert_eq!(reply["kind"], "done", "{}", text(out));
}

/// The command stopped before doing anything (exit code 2), naming each of `parts` on stderr.
#[track_caller]
fn assert_stopped_saying(out: &Output, parts: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let said = String::from_utf8_lossy(&out.stderr);
    for part in parts {
        assert!(said.contains(part), "{said}");
    }
}

/// Item 1 of the attack on `0bedbaf`: as the daemon's user, through the installer socket, write
/// slot B with a valid signed release but other bytes (refused `hash-mismatch`, but the bytes
/// stayed), then `mark-good B`, `mark-bad A`, `reboot`. All were answered `done` and the
/// bootloader then booted the attacker's bytes. Now the installer's ledger knows B holds bytes
/// it did not verify: every step that would let the bootloader choose B is refused, the
/// refused bytes' head is wiped, and the device keeps booting A.
fn item1_a_compromised_daemon_cannot_get_its_own_bytes_booted(backend: Backend) {
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

    let (out, reply) = split.write_request(Some("B"), release, evil_path, &[]);
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
            assert_eq!(split.env_var("B_OK").as_deref(), Some("0"), "{env}");
            assert_eq!(split.env_var("A_OK").as_deref(), Some("1"), "{env}");
        }
        Backend::File | Backend::UBoot => {
            assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("A"), "{env}");
            assert_eq!(split.env_var("BOOT_B_LEFT").as_deref(), Some("0"), "{env}");
        }
    }
    // What the installer itself records, root's alone.
    let ledger = split.ledger();
    assert_eq!(ledger["slots"]["B"]["held"], "unverified", "{ledger}");
    assert_eq!(ledger["slots"]["A"]["held"], "booted", "{ledger}");

    let status = split
        .command_as(&User::Current, &["status", "--offline"])
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
    let (out, reply) = split.write_request(Some("B"), release, split.path("rootfs.img"), &[]);
    assert_done(&out, &reply);
    let (out, reply) = ask(&split, &["--op", "mark-good", "--slot", "B"]);
    assert_done(&out, &reply);
}

// `file::`, `uboot::` (fw_setenv) and `grub::` (grub-editenv) tests of it; the simulated
// gateway names the package of a missing bootloader tool.
backend_tests!(item1_a_compromised_daemon_cannot_get_its_own_bytes_booted);

/// The manifest inside a signed release, as JSON, and the release id (hex SHA-256 of its bytes).
fn manifest_of(release: &std::path::Path) -> (Value, String) {
    use base64::Engine as _;
    use sha2::Digest as _;
    let envelope: Value = serde_json::from_slice(&fs::read(release).unwrap()).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(envelope["manifest"].as_str().unwrap())
        .unwrap();
    (
        serde_json::from_slice(&bytes).unwrap(),
        hex::encode(sha2::Sha256::digest(&bytes)),
    )
}

/// Writes into the state directory what a local attacker puts there: a `writing` transaction for
/// slot B whose manifest is the signed one with the image swapped for `evil` (a file URL), under
/// the signed release's id. Returns the id.
fn forge_writing_state(split: &Split, release: &std::path::Path, evil: &[u8]) -> String {
    use sha2::Digest as _;
    let evil_path = split.path("evil.img");
    fs::write(&evil_path, evil).unwrap();
    let (mut manifest, release_id) = manifest_of(release);
    manifest["images"]["rootfs"] = serde_json::json!({
        "url": format!("file://{}", evil_path.display()),
        "size": evil.len(),
        "sha256": hex::encode(sha2::Sha256::digest(evil)),
    });
    let state = serde_json::json!({
        "phase": {
            "phase": "writing",
            "txn": {
                "id": "txn-forged",
                "release_id": release_id,
                "manifest": manifest,
                "class": "rootfs",
                "from_slot": "A",
                "to_slot": "B",
                "from_version": null,
                "started": "2026-01-01T00:00:00Z",
            },
            "durable": 0,
        },
        "floor": 0,
        "next_seq": 1,
        "next_txn": 1,
        "slots": {},
        "last": null,
        "rolled_back": [],
    });
    fs::write(
        split.path("state/state.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    release_id
}

/// `boot-check` as root in-process (no `[installer]`), as a device without the split runs it.
fn boot_check_as_root(split: &Split) -> Output {
    Command::new(BIN)
        .args(["boot-check", "--no-reboot", "--config"])
        .arg(split.config_without_installer())
        .output()
        .unwrap()
}

/// `boot_check_as_root`, which must succeed with `said` in the stream `pick` takes.
#[track_caller]
fn boot_check_as_root_saying(split: &Split, pick: fn(&Output) -> &Vec<u8>, said: &str) -> Output {
    let out = boot_check_as_root(split);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(pick(&out)).contains(said),
        "{}",
        text(&out)
    );
    out
}

fn chown_tree(path: &std::path::Path, uid: u32) {
    let out = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{uid}"))
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Item 2: without `[installer]`, a state directory another user can write (a service account's,
/// or mode 0777) let that user replace `state.json` with a `writing` transaction whose manifest
/// names their image; root's `boot-check` resumed it, wrote and activated the unsigned bytes.
/// Now root refuses such a directory before reading anything from it, and says how to fix it.
#[test]
fn item2_root_refuses_a_state_directory_another_user_can_write() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let before = (split.slot("B"), split.env_text());
    let evil = pattern(IMAGE_LEN, 77);

    // The state directory belongs to a service account (nobody, here), which forges the state.
    forge_writing_state(&split, &release, &evil);
    chown_tree(&split.path("state"), DAEMON_UID);
    let out = boot_check_as_root(&split);
    assert_stopped_saying(&out, &["belongs to uid 65534 (nobody)", "chown -R 0:0"]);
    assert_eq!((split.slot("B"), split.env_text()), before.clone());

    // Root's, but writable by everyone.
    chown_tree(&split.path("state"), 0);
    fs::set_permissions(split.path("state"), fs::Permissions::from_mode(0o777)).unwrap();
    let out = boot_check_as_root(&split);
    assert_stopped_saying(
        &out,
        &["writable by group or others (mode 0777)", "chmod 0700"],
    );
    assert_eq!((split.slot("B"), split.env_text()), before);
}

/// Item 2, the other half: a forged `writing` transaction in a directory only root can write
/// (say, restored from a backup) is resumed from the signed release bytes kept beside the
/// state, verified again against the anchor: the manifest kept in `state.json` is not signed
/// and names nothing that is written. Without the signed bytes, nothing is written.
#[test]
fn item2_a_forged_transaction_is_resumed_only_from_the_signed_release() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let evil = pattern(IMAGE_LEN, 77);
    chown_tree(&split.path("state"), 0);
    fs::set_permissions(split.path("state"), fs::Permissions::from_mode(0o700)).unwrap();

    // No signed release kept for the transaction: the resume fails and writes nothing.
    forge_writing_state(&split, &release, &evil);
    let out = boot_check_as_root_saying(
        &split,
        |out| &out.stdout,
        "install failed — not-ready: signed release",
    );
    assert_ne!(&split.slot("B")[..IMAGE_LEN], &evil[..], "{}", text(&out));
    assert_eq!(
        split.env_var("BOOT_ORDER").as_deref(),
        Some("A"),
        "{}",
        text(&out)
    );

    // The signed release kept, as an accepted release is: the signed image is written.
    let release_id = forge_writing_state(&split, &release, &evil);
    fs::create_dir_all(split.path("state/releases")).unwrap();
    fs::copy(
        &release,
        split.path(&format!("state/releases/{release_id}.json")),
    )
    .unwrap();
    fs::set_permissions(
        split.path(&format!("state/releases/{release_id}.json")),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = boot_check_as_root_saying(&split, |out| &out.stderr, "TAMPER ALERT");
    assert_eq!(
        &split.slot("B")[..IMAGE_LEN],
        &split.image[..],
        "{}",
        text(&out)
    );
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}

/// Files anywhere under `dir` that belong to `uid`.
fn owned_by(dir: &std::path::Path, uid: u32) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.uid() == uid {
                found.push(entry.path().display().to_string());
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found
}

/// Item 4: `sudo update-agent install` with the split's config left root-owned 0600 files
/// (`state.json`, `releases/`) in the daemon's state directory before the installer answered
/// `forbidden`; from then on the daemon, `boot-check` and `install` as the daemon's user failed
/// with "Permission denied", and the device never updated again. Now the wrong user is refused
/// before anything in the state directory is touched, naming the user to run as; and files of
/// another owner found there (left by an older version) are named with the `chown` that fixes
/// them, after which the daemon's user carries on.
#[test]
fn item4_the_wrong_user_is_refused_before_touching_the_state() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let state = split.path("state");
    let out = split
        .command_as(&User::Current, &["install", release.to_str().unwrap()])
        .output()
        .unwrap();
    assert_stopped_saying(
        &out,
        &[
            "daemon_user, uid 65534 (nobody)",
            "not as uid 0 (root)",
            "runuser -u nobody -- update-agent",
        ],
    );
    assert_eq!(
        owned_by(&state, 0),
        Vec::<String>::new(),
        "root left files behind"
    );
    let out = split.as_daemon(&["boot-check"]);
    assert!(
        out.status.success(),
        "the daemon's user carries on: {}",
        text(&out)
    );

    // What 0bedbaf's root install left: root-owned 0600 files among the daemon's.
    fs::write(
        state.join("state.json"),
        br#"{"phase":{"phase":"idle"},"floor":0,"next_seq":0,"next_txn":0,"slots":{},"last":null,"rolled_back":[]}"#,
    )
    .unwrap();
    fs::set_permissions(state.join("state.json"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir_all(state.join("releases")).unwrap();
    fs::copy(&release, state.join("releases/forgotten.json")).unwrap();
    let out = split.as_daemon(&["boot-check"]);
    let fix = format!("chown -R 65534:65534 {}", state.display());
    assert_stopped_saying(
        &out,
        &[
            "belong to another user than uid 65534 (nobody)",
            "state.json (uid 0 (root))",
            &fix,
        ],
    );
    // The fix it names, then the daemon's user carries on.
    let out = Command::new("sh").arg("-c").arg(&fix).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = split.as_daemon(&["install", release.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
}

/// Item 3: nothing kept the daemon and the one-shot commands apart. (a) `install` while `run`
/// was active: the daemon's next save overwrote `reboot-pending` with `idle`, and the trial boot
/// was then marked good without its health checks; (b) two `install`s at once both wrote B;
/// (c) `boot-check` during the daemon's install resumed the same transaction beside it. Now one
/// process owns the state directory (an exclusive `flock` on `state/lock`): a one-shot command
/// finding it taken stops and names the holder and what to do instead, and the daemon waits
/// for a one-shot command to finish before it starts.
#[test]
fn item3_one_process_owns_the_state_at_a_time() {
    let broker = Mosquitto::plain_temp();
    let mut split = Split::with(Backend::File, |gw| gw.mqtt(&broker.url()));
    let release = split.release("2.0", IMAGE_PATH);
    let release = release.to_str().unwrap();
    let refused_naming = |out: &Output, holder: &str| {
        assert_stopped_saying(
            out,
            &[
                &format!("is in use by {holder}"),
                "update-agent install-now",
            ],
        );
    };

    // (a) and (c): the daemon runs.
    split.start_daemon(&[]);
    let pid = split.daemon_pid().unwrap();
    let holder = wait_for(
        "the daemon to hold the state",
        Duration::from_secs(20),
        || {
            let holder = split.lock_holder();
            holder.starts_with(&format!("pid {pid} ")).then_some(holder)
        },
    );
    assert!(holder.ends_with("update-agent run)"), "{holder}");
    let events = split.events();
    refused_naming(&split.as_daemon(&["install", release]), &holder);
    refused_naming(&split.as_daemon(&["boot-check"]), &holder);
    assert_eq!(
        split.events(),
        events,
        "the refused commands recorded nothing"
    );
    assert_eq!(
        split.env_var("BOOT_ORDER").as_deref(),
        Some("A B"),
        "nothing was written"
    );
    assert!(split.stop_daemon().success());

    // (b): a one-shot install whose download stalls holds the state meanwhile.
    let stalled = split.release("2.1", STALL_PATH);
    let first_log = split.path("first-install.log");
    let mut first = split.spawn_as_daemon(&["install", stalled.to_str().unwrap()], &first_log);
    let holder = wait_for(
        "the install to hold the state",
        Duration::from_secs(20),
        || {
            let holder = split.lock_holder();
            holder
                .starts_with(&format!("pid {} ", first.id()))
                .then_some(holder)
        },
    );
    wait_for("the install to write", Duration::from_secs(20), || {
        fs::read_to_string(&first_log)
            .unwrap_or_default()
            .contains("writing slot B")
    });
    refused_naming(&split.as_daemon(&["install", release]), &holder);
    refused_naming(&split.as_daemon(&["boot-check"]), &holder);
    // The daemon started now waits for the install instead of driving the state beside it.
    split.start_daemon(&[]);
    wait_for("the daemon to wait", Duration::from_secs(20), || {
        split.daemon_log().contains("waiting for it to finish")
    });
    assert!(
        !split.daemon_log().contains("D-Bus service off"),
        "{}",
        split.daemon_log()
    );
    // The install this test started, by its pid; the daemon then takes over.
    first.kill().unwrap();
    first.wait().unwrap();
    wait_for("the daemon to start", Duration::from_secs(20), || {
        split.daemon_log().contains("D-Bus service off")
    });
    let pid = split.daemon_pid().unwrap();
    assert!(split.lock_holder().starts_with(&format!("pid {pid} ")));
    assert!(split.stop_daemon().success());
}

/// A hostile client of the installer's protocol (4-byte length + JSON, the image socket passed
/// with `SCM_RIGHTS`), in Python so that it can do what the agent never does: `rcvlowat` sends
/// a write whose image socket has `SO_RCVLOWAT` set to 16 MiB and then one byte, and prints the
/// installer's answers with the seconds it took; `trickle` sends a request one byte every 3 s.
const HOSTILE_CLIENT: &str = r#"
import json, socket, struct, sys, time
path, mode = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body
def exact(n):
    got = b""
    while len(got) < n:
        more = s.recv(n - len(got))
        if not more:
            raise EOFError("closed")
        got += more
    return got
def reply():
    return json.loads(exact(struct.unpack(">I", exact(4))[0]))
if mode == "rcvlowat":
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 16 * 1024 * 1024)
    op = {"kind": "write", "slot": "B", "release": open(sys.argv[3]).read(), "resume_from": 0}
    request = frame({"version": 2, "op": op})
    s.sendmsg([request[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", theirs.fileno()))])
    s.sendall(request[1:])
    theirs.close()
    print(json.dumps(reply()), flush=True)
    ours.send(b"x")
    started = time.time()
    while True:
        answer = reply()
        if answer["kind"] in ("done", "refused"):
            print(json.dumps(answer), flush=True)
            print("after %.1f" % (time.time() - started), flush=True)
            break
elif mode == "trickle":
    for byte in frame({"version": 2, "op": {"kind": "mark-good", "slot": "A"}}):
        try:
            s.send(bytes([byte]))
        except OSError:
            break
        time.sleep(3)
"#;

fn python() -> &'static str {
    // Not through PATH: a version manager's shims under /root are out of nobody's reach.
    let python = "/usr/bin/python3";
    assert!(
        std::path::Path::new(python).is_file(),
        "{python} is not installed; install it with `apt-get install python3`"
    );
    python
}

/// The hostile client as `uid`/`gid`, with `args` after the socket and the mode.
fn hostile(split: &Split, uid: &str, gid: &str, args: &[&str]) -> Command {
    let mut command = User::Ids(uid.into(), gid.into()).command("timeout");
    command
        .args(["60", python(), "-c", HOSTILE_CLIENT])
        .arg(split.installer_socket())
        .args(args);
    command
}

/// How long a request the daemon's user makes takes to be answered, and the answer.
fn timed_request(split: &Split) -> (Duration, Value) {
    let started = std::time::Instant::now();
    let (out, reply) = ask(split, &["--op", "mark-good", "--slot", "A"]);
    assert_done(&out, &reply);
    (started.elapsed(), reply)
}

/// Item 5: the installer could be stalled. An image socket passed with `SO_RCVLOWAT` at 16 MiB
/// and one byte sent made `poll` report it readable and the following `read` block: the
/// installer sat 150 s in the kernel (`stall_timeout = 5`). Now it never reads after `poll`
/// without `MSG_DONTWAIT`, and the stall timeout ends the write.
#[test]
fn item5_an_image_socket_with_a_huge_rcvlowat_cannot_hold_the_installer() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let out = hostile(
        &split,
        "nobody",
        "nogroup",
        &["rcvlowat", release.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "{}\ninstaller:\n{}",
        text(&out),
        split.installer_log()
    );
    assert!(lines[0].contains("\"ready\""), "{said}");
    let answer: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(answer["kind"], "refused", "{answer}");
    assert_eq!(answer["reason"], "stall-timeout", "{answer}");
    let after: f64 = lines[2].strip_prefix("after ").unwrap().parse().unwrap();
    assert!(after < 15.0, "the stall timeout is 5 s; it took {after} s");
    let (took, _) = timed_request(&split);
    assert!(
        took.as_secs() < 5,
        "the installer serves again at once: {took:?}"
    );
}

/// Item 5: a client sending its request one byte at a time held the installer (it serves one
/// connection at a time) for as long as it liked, since the 10 s timeout was per read; a
/// forbidden uid too, since the frame was read before the refusal. Now the whole request has
/// one deadline (10 s), and a forbidden uid is answered before anything is read.
#[test]
fn item5_a_slow_request_holds_the_installer_no_longer_than_its_deadline() {
    let split = Split::new(Backend::File);
    // A forbidden uid (in the socket's group) trickling: refused at once.
    let mut trickler = hostile(&split, "4242", "nogroup", &["trickle"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (took, _) = timed_request(&split);
    assert!(
        took.as_secs() < 3,
        "a forbidden caller held the installer: {took:?}"
    );
    trickler.kill().unwrap();
    trickler.wait().unwrap();
    // The daemon's own uid trickling: dropped at the request's deadline.
    let mut trickler = hostile(&split, "nobody", "nogroup", &["trickle"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let (took, _) = timed_request(&split);
    trickler.kill().unwrap();
    trickler.wait().unwrap();
    assert!(
        took.as_secs() < 15,
        "a trickling request held the installer for {took:?}: {}",
        split.installer_log()
    );
    assert!(
        split.installer_log().contains("no request from uid 65534"),
        "{}",
        split.installer_log()
    );
}

/// Item 6: a failing reboot command was a crash loop: the daemon exited, and on its restart
/// tried the reboot again before it had connected to MQTT, so no event said why, D-Bus went
/// down with it, and a fixing release could never arrive. Now the failure is an event
/// (`reboot-failed`, with the reason) on MQTT, the daemon stays up and tries again with
/// back-off; after a restart it reports again once connected, and the reboot happens as soon
/// as the command works.
#[test]
fn item6_a_failing_reboot_command_is_reported_and_retried_by_a_daemon_that_stays_up() {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    // Fails until `reboots.allow` exists (the board's reboot broken, then fixed).
    let mut split = Split::with(Backend::File, |gw| {
        gw.mqtt(&broker.url()).reboot_script(
            "[ -e \"$0.allow\" ] || { echo 'reboot: Failed to connect to bus' >&2; exit 1; }; echo reboot >> \"$0\"",
        )
    });
    let release = fs::read(split.release("2.0", IMAGE_PATH)).unwrap();
    let events_topic = split.topic("events");
    let sub = client.subscribe(&[&events_topic], None);
    client.publish(&split.topic("release"), &release, true);

    split.start_daemon(&[]);
    let failed = |count: usize| {
        wait_for("reboot-failed on MQTT", Duration::from_secs(60), || {
            let events = sub.payloads(&events_topic);
            let failed: Vec<Value> = events
                .into_iter()
                .filter(|e| e["state"] == "reboot-failed")
                .collect();
            (failed.len() >= count).then_some(failed)
        })
    };
    let first = failed(1);
    assert_eq!(first[0]["reason"], "reboot-failed", "{}", first[0]);
    assert!(
        first[0]["message"]
            .as_str()
            .unwrap()
            .contains("installer refused"),
        "{}",
        first[0]
    );
    assert_eq!(
        states(&sub.payloads(&events_topic))[..5],
        ["accepted", "writing", "written", "activated", "rebooting"]
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(split.daemon_running(), "the daemon stays up");
    let state = client.retained_json(&split.topic("state"));
    assert_eq!(state["last_error"]["reason"], "reboot-failed", "{state}");
    assert!(split.stop_daemon().success());

    // A restart in the same boot: connected first, then the reboot, and its failure reported.
    split.start_daemon(&[]);
    let again = failed(2);
    assert!(again[1]["seq"].as_u64() > again[0]["seq"].as_u64());
    assert!(split.daemon_running(), "the daemon stays up");
    // The command works again: the next try (10 s back-off) reboots.
    fs::write(split.path("reboots.allow"), "").unwrap();
    wait_for("the retried reboot", Duration::from_secs(30), || {
        split.path("reboots").exists()
    });
    let log = split.daemon_log();
    assert!(split.stop_daemon().success(), "{log}");
}

/// Item 7: `monitor` printed `last_event.seq` and an event's `seq` from the device's JSON as they
/// came, so bidi overrides, escape sequences and lines of any length reached the operator's
/// terminal. Now every field is escaped and bounded in the table, and `--json` writes every
/// non-ASCII character as a `\u` escape (the same JSON) and sums up an oversized record.
#[test]
fn item7_monitor_shows_nothing_a_device_sends_unescaped() {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let device = device_topic(DEFAULT_PREFIX, DEVICE_ID);
    let hostile_seq = format!("\u{202e}\u{1b}[2J{}", "9".repeat(60_000));
    let state = serde_json::json!({
        "version": "2.0\u{202e}",
        "state": "idle",
        "last_event": {"seq": hostile_seq, "state": "committed"},
    });
    client.publish(
        &format!("{device}/state"),
        &serde_json::to_vec(&state).unwrap(),
        true,
    );
    let broker_url = broker.url();
    // The aggregate view (versions and states counted) and the one-line-per-device table.
    for (view, shows) in [(&[][..], "2.0\\u{202e}"), (&["--devices"][..], DEVICE_ID)] {
        let out = Command::new(BIN)
            .args(["monitor", "--broker", &broker_url, "--once"])
            .args(view)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let shown = String::from_utf8(out.stdout.clone()).unwrap();
        assert!(shown.contains(shows), "{view:?}: {shown}");
        for line in shown.lines() {
            assert!(line.len() < 200, "a line of {} bytes", line.len());
            assert!(
                line.chars().all(|c| c == '…' || (' '..='~').contains(&c)),
                "{line:?}"
            );
        }
    }

    // --json: an event whose seq is a string with a bidi override and an escape sequence.
    let monitor = Command::new(BIN)
        .args(["monitor", "--broker", &broker_url, "--json", "--count", "2"])
        .args(["--timeout", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let event = serde_json::json!({"seq": "\u{202e}7\u{1b}[31m", "state": "committed"});
    client.publish(
        &format!("{device}/events"),
        &serde_json::to_vec(&event).unwrap(),
        false,
    );
    let huge = serde_json::json!({"seq": 8, "state": "committed", "message": "x".repeat(60_000)});
    client.publish(
        &format!("{device}/events"),
        &serde_json::to_vec(&huge).unwrap(),
        false,
    );
    let out = monitor.wait_with_output().unwrap();
    let lines = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.bytes().all(|b| (0x20..0x7f).contains(&b))),
        "{lines:?}"
    );
    let first: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        first["seq"], "\u{202e}7\u{1b}[31m",
        "the JSON means the same"
    );
    let second: Value = serde_json::from_str(lines[1]).unwrap();
    assert!(second["oversized"].as_u64().unwrap() > 60_000, "{second}");
}

/// Item 7: a FIFO put at the file backend's environment path blocked `open()` forever (a boot
/// check that never ends). Now it is opened without blocking and refused: not a regular file.
#[test]
fn item7_a_fifo_at_the_environment_path_is_refused_not_waited_on() {
    let split = Split::new(Backend::File);
    chown_tree(&split.path("state"), 0);
    let env = split.env.file_path().to_owned();
    fs::remove_file(&env).unwrap();
    nix::unistd::mkfifo(&env, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = Command::new("timeout")
        .arg("20")
        .arg(BIN)
        .args(["boot-check", "--no-reboot", "--config"])
        .arg(split.config_without_installer())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(124), "boot-check hung on the FIFO");
    assert!(
        text(&out).contains("is not a regular file"),
        "{}",
        text(&out)
    );
}

/// Item 7: the booted slot was read from the *first* `update_agent.slot=`/`rauc.slot=` on the
/// kernel command line, though boot scripts append theirs to `bootargs` (this project's U-Boot
/// script does): a stale earlier one made the agent take the booted slot for the inactive one
/// and write it. Now the last one counts (and where a slot's device holds `/`, it must agree).
#[test]
fn item7_the_last_slot_on_the_kernel_command_line_is_the_booted_one() {
    let split = Split::new(Backend::File);
    let running = split.slot("A");
    // Booted A; a stale default names B before the boot script's own `rauc.slot=A`.
    fs::write(
        split.path("cmdline"),
        "console=ttyS0 update_agent.slot=B root=/dev/mmcblk0p2 rauc.slot=A\n",
    )
    .unwrap();
    let release = split.release("2.0", IMAGE_PATH);
    let out = split.as_daemon(&["install", release.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        split.slot("A"),
        running,
        "the running slot is never written"
    );
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
}

/// Suspected in the attack: with `[installer] socket` in a directory the daemon's user can
/// write, the installer's remove → bind → chown → chmod of the socket path could be raced (the
/// new socket swapped for a link to another file, which root would then hand to the daemon's
/// group). Now the installer refuses to bind in a directory that is not root's alone, and says
/// how to fix it; it creates a missing one root's, 0755.
#[test]
fn the_installer_refuses_a_socket_directory_the_daemon_could_write() {
    let split = Split::new(Backend::File);
    let config = fs::read_to_string(split.config_path()).unwrap();
    for (name, uid, mode) in [("daemon-run", DAEMON_UID, 0o755), ("shared-run", 0, 0o775)] {
        let dir = split.path(name);
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(DAEMON_GID)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        let socket = dir.join("installer.sock");
        let moved = config.replace(
            &split.installer_socket().display().to_string(),
            &socket.display().to_string(),
        );
        assert_ne!(moved, config);
        let path = split.path(&format!("{name}.toml"));
        fs::write(&path, moved).unwrap();
        let out = Command::new("timeout")
            .arg("20")
            .arg(BIN)
            .args(["installer", "--log", "stderr", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("must be a directory of root's that only root can write"),
            "{said}"
        );
        assert!(!socket.exists(), "{name}: nothing was bound");
    }
    // A missing directory is made root's, 0755, and served in.
    let fresh = split.path("fresh/run");
    let path = split.path("fresh.toml");
    fs::write(
        &path,
        config.replace(
            &split.installer_socket().display().to_string(),
            &fresh.join("installer.sock").display().to_string(),
        ),
    )
    .unwrap();
    let mut installer = Command::new(BIN)
        .args(["installer", "--log", "stderr", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the socket", Duration::from_secs(20), || {
        fresh.join("installer.sock").exists()
    });
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(&fresh).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o755));
    // The installer this test started, by its pid.
    installer.kill().unwrap();
    installer.wait().unwrap();
}

/// A full write under the split carries the block index ahead of the image, for the
/// installer's read-back. A compromised daemon that sends an index the signed manifest does not
/// name, one longer than any index of the image can be, or the right index with a block of
/// other bytes, gets a refusal, the slot unverified in the installer's ledger and no
/// activation; the right index with the right bytes is carried out.
#[test]
fn item1_a_daemon_cannot_get_bytes_past_the_block_index_of_a_full_write() {
    let split = Split::new(Backend::File);
    let serve = split.path("serve");
    fs::create_dir(&serve).unwrap();
    // Two releases: the one the installer is asked to write, and another whose index a
    // compromised daemon sends instead of the right one.
    let create = |name: &str, image: &[u8], version: &str| {
        fs::write(serve.join(name), image).unwrap();
        let url = format!("http://127.0.0.1:1/{name}");
        split.indexed_release(&serve.join(name), version, &url, "1", None, name)
    };
    let good = pattern(300_003, 5);
    let release = create("good.img", &good, "3.0");
    let mut other = good.clone();
    other[20 * 4096 + 9] ^= 0x10;
    create("other.img", &other, "3.1");
    let release = release.to_str().unwrap();
    let (good_img, other_img) = (serve.join("good.img"), serve.join("other.img"));
    let good_index = serve.join("good.img.index");
    let other_index = serve.join("other.img.index");
    let b_not_bootable = || {
        split.assert_b_not_first();
        assert_eq!(split.ledger()["slots"]["B"]["held"], "unverified");
        let (out, reply) = ask(
            &split,
            &["--op", "activate", "--slot", "B", "--release", release],
        );
        assert_refused(&out, &reply, "readback-mismatch");
    };

    // A write of `image` with `index` ahead of it: refused hash-mismatch, saying `why`.
    let refused = |image: &Path, index: &Path, why: &str| {
        let index = ["--index", index.to_str().unwrap()];
        let (out, reply) = split.write_request(Some("B"), release, image, &index);
        assert_refused(&out, &reply, "hash-mismatch");
        assert!(reply["message"].as_str().unwrap().contains(why), "{reply}");
    };

    // The other release's index for the right bytes: refused against the signed manifest.
    refused(&good_img, &other_index, "block index");
    b_not_bootable();

    // The right index with a block of other bytes: refused, the head of those bytes wiped. With
    // an index the read-back is the one hash pass, so it is the block's check that refuses.
    refused(
        &other_img,
        &good_index,
        "block 20 (bytes 81920..86016) does not match the signed block index",
    );
    assert!(split.slot("B")[..good.len()].iter().all(|b| *b == 0));
    b_not_bootable();

    // More bytes than any index of this image can be: refused as not the signed index (not a
    // download failure that a retry would repeat), before a byte of the image is taken.
    let too_long = serve.join("too-long.index");
    fs::write(&too_long, vec![0u8; 2 * 1024 * 1024]).unwrap();
    refused(&good_img, &too_long, "more than one for this image can be");
    b_not_bootable();

    // Right index, right bytes: written, read back against the index, activated.
    let (out, reply) = split.write_request(
        Some("B"),
        release,
        &good_img,
        &["--index", good_index.to_str().unwrap()],
    );
    assert_done(&out, &reply);
    assert!(
        split
            .installer_log()
            .contains("checked against the block index"),
        "{}",
        split.installer_log()
    );
    let (out, reply) = ask(
        &split,
        &["--op", "activate", "--slot", "B", "--release", release],
    );
    assert_done(&out, &reply);
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
}
