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
//! `util-linux` (setpriv) and `libubootenv-tool` (fw_printenv, fw_setenv).

mod common;
// The MQTT tests' world (broker, subscriber, publisher); this file uses part of it.
#[allow(dead_code)]
#[path = "mqtt/harness.rs"]
mod mqtt;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::boot_sim::{BootSim, SimEnv};
use common::http::{Act, BackgroundServer};
use common::{UBOOT_ENV_SIZE, UBootEnvFile, pattern, require_tool};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");
const COMPATIBLE: &str = "acme-gw-split";
const ATTEMPTS: u32 = 3;
const SLOT_SIZE: u64 = 4 * 1024 * 1024;
const IMAGE_LEN: usize = 300_017;
const FACTORY_B_LEN: usize = 400_009;
/// `nobody`/`nogroup` on Debian: the daemon's user in these tests.
const DAEMON_UID: u32 = 65534;
const DAEMON_GID: u32 = 65534;
const IMAGE_PATH: &str = "/rootfs.img";
const WRONG_PATH: &str = "/wrong.img";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    File,
    UBoot,
}

struct Split {
    dir: tempfile::TempDir,
    env: Option<UBootEnvFile>,
    sim: BootSim,
    server: BackgroundServer,
    image: Vec<u8>,
    wrong: Vec<u8>,
    installer: Child,
    boots: u32,
}

fn toml_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn root_only(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

impl Split {
    fn new(backend: Backend) -> Split {
        Split::with_sections(backend, "")
    }

    /// The split with `sections` added to the config both roles read (`[mqtt]` for the daemon).
    fn with_sections(backend: Backend, sections: &str) -> Split {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the split's tests start the installer as root and switch to nobody: run them as root"
        );
        require_tool("setpriv", "util-linux");
        let dir = tempfile::tempdir().unwrap();
        // `nobody` must reach its state directory, the config and the socket.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = |name: &str| dir.path().join(name);

        let out = Command::new(BIN)
            .args(["keygen", "--out"])
            .arg(path("signer"))
            .output()
            .unwrap();
        assert!(out.status.success(), "keygen: {}", text(&out));
        fs::create_dir(path("keys")).unwrap();
        fs::copy(path("signer.pub"), path("keys/signer.pub")).unwrap();
        fs::set_permissions(path("keys"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(path("keys/signer.pub"), fs::Permissions::from_mode(0o644)).unwrap();

        let image = pattern(IMAGE_LEN, 1);
        let mut wrong = image.clone();
        wrong[IMAGE_LEN / 2] ^= 0x01;
        fs::write(path("rootfs.img"), &image).unwrap();
        fs::write(path("wrong.img"), &wrong).unwrap();
        fs::write(path("slot-a"), pattern(200_003, 2)).unwrap();
        fs::write(path("slot-b"), pattern(FACTORY_B_LEN, 3)).unwrap();
        root_only(&path("slot-a"));
        root_only(&path("slot-b"));

        let (env, sim_env) = match backend {
            Backend::File => {
                let file = path("bootenv");
                fs::write(&file, "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=3\n").unwrap();
                root_only(&file);
                (None, SimEnv::File { path: file })
            }
            Backend::UBoot => {
                let env = UBootEnvFile::create(dir.path(), UBOOT_ENV_SIZE);
                for (name, value) in [
                    ("BOOT_ORDER", "A B"),
                    ("BOOT_A_LEFT", "3"),
                    ("BOOT_B_LEFT", "3"),
                ] {
                    env.set(name, value);
                }
                root_only(&env.env);
                let sim = SimEnv::UBoot {
                    fw_printenv: env.fw_printenv.clone(),
                    fw_setenv: env.fw_setenv.clone(),
                    config: env.config.clone(),
                };
                (Some(env), sim)
            }
        };

        fs::create_dir(path("state")).unwrap();
        chown(path("state"), Some(DAEMON_UID), Some(DAEMON_GID)).unwrap();

        let server = BackgroundServer::start(
            image.clone(),
            vec![
                (IMAGE_PATH, Act::Serve),
                (WRONG_PATH, Act::Body(wrong.clone())),
            ],
        );
        let bootloader = match &env {
            None => format!(
                "backend = \"file\"\npath = {}\nattempts = {ATTEMPTS}\n",
                toml_path(&path("bootenv"))
            ),
            Some(env) => format!(
                "backend = \"uboot\"\nfw_env_config = {}\nattempts = {ATTEMPTS}\nfw_printenv = {}\nfw_setenv = {}\n",
                toml_path(&env.config),
                toml_path(&env.fw_printenv),
                toml_path(&env.fw_setenv),
            ),
        };
        let reboots = path("reboots");
        let reboot = [
            "sh",
            "-c",
            "echo reboot >> \"$0\"",
            reboots.to_str().unwrap(),
        ];
        let common = format!(
            r#"[device]
compatible = "{COMPATIBLE}"
state_dir = {state}

[trust]
keys_dir = {keys}
insecure_writable_anchor = true

[bootloader]
{bootloader}
[slots]
class = "rootfs"
a = {{ device = {a}, bootname = "A", size = {SLOT_SIZE} }}
b = {{ device = {b}, bootname = "B", size = {SLOT_SIZE} }}

[install]
checkpoint_interval = 1048576
stall_timeout = 5

[health]
commands = [["true"]]
timeout = 10

[system]
boot_id_path = {boot_id}
cmdline_path = {cmdline}
reboot_command = {reboot}

{sections}
"#,
            state = toml_path(&path("state")),
            keys = toml_path(&path("keys")),
            a = toml_path(&path("slot-a")),
            b = toml_path(&path("slot-b")),
            boot_id = toml_path(&path("boot_id")),
            cmdline = toml_path(&path("cmdline")),
            reboot = serde_json::to_string(&reboot).unwrap(),
        );
        // The same file for both roles, as on a device; the in-process one only for the check
        // that the daemon's user cannot do the installer's work itself.
        fs::write(path("in-process.toml"), &common).unwrap();
        fs::write(
            path("agent.toml"),
            format!(
                "{common}\n[installer]\nsocket = {}\ndaemon_user = \"nobody\"\nstate_dir = {}\n",
                toml_path(&path("run/installer.sock")),
                toml_path(&path("installer-state")),
            ),
        )
        .unwrap();

        let log = fs::File::create(path("installer.log")).unwrap();
        let installer = Command::new(BIN)
            .args(["installer", "--log", "stderr", "--config"])
            .arg(path("agent.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut split = Split {
            sim: BootSim::new(sim_env, &["A", "B"], ATTEMPTS),
            dir,
            env,
            server,
            image,
            wrong,
            installer,
            boots: 0,
        };
        split.wait_for_socket();
        assert_eq!(split.boot(), "A", "the factory boot");
        let out = split.as_daemon(&["boot-check"]);
        assert!(out.status.success(), "factory boot-check: {}", text(&out));
        split
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.path("run/installer.sock").exists() {
            if let Some(status) = self.installer.try_wait().unwrap() {
                panic!("the installer exited ({status}): {}", self.installer_log());
            }
            assert!(Instant::now() < deadline, "the installer never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn installer_log(&self) -> String {
        fs::read_to_string(self.path("installer.log")).unwrap_or_default()
    }

    fn boot(&mut self) -> String {
        let slot = self.sim.boot().expect("the boot script finds a slot");
        self.boots += 1;
        fs::write(
            self.path("boot_id"),
            format!("6a1c0f3e-0000-4000-8000-{:012x}\n", self.boots),
        )
        .unwrap();
        fs::write(
            self.path("cmdline"),
            format!("console=ttyS0 update_agent.slot={slot}\n"),
        )
        .unwrap();
        slot
    }

    /// Runs the binary as `nobody`/`nogroup` without supplementary groups: the daemon's user.
    fn as_nobody(&self, args: &[&str]) -> Output {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// The daemon role: a one-shot command with the `[installer]` config, as `nobody`.
    fn as_daemon(&self, args: &[&str]) -> Output {
        let config = self.path("agent.toml");
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        self.as_nobody(&all)
    }

    fn release(&self, version: &str, url_path: &str) -> PathBuf {
        self.release_at(version, 2, url_path)
    }

    fn release_at(&self, version: &str, security_version: u64, url_path: &str) -> PathBuf {
        let out_path = self.path(&format!("release-{version}.json"));
        let out = Command::new(BIN)
            .args(["release", "create", "--key"])
            .arg(self.path("signer.key"))
            .arg("--image")
            .arg(self.path("rootfs.img"))
            .args(["--version", version, "--security-version"])
            .arg(security_version.to_string())
            .args(["--compatible", COMPATIBLE, "--url"])
            .arg(self.server.url(url_path))
            .args(["--no-chunks", "--out"])
            .arg(&out_path)
            .output()
            .unwrap();
        assert!(out.status.success(), "release create: {}", text(&out));
        fs::set_permissions(&out_path, fs::Permissions::from_mode(0o644)).unwrap();
        out_path
    }

    /// The release with one byte of its signed manifest changed and the signatures kept.
    fn tampered(&self, release: &Path) -> PathBuf {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut envelope: Value = serde_json::from_slice(&fs::read(release).unwrap()).unwrap();
        let manifest = b64.decode(envelope["manifest"].as_str().unwrap()).unwrap();
        let text = String::from_utf8(manifest)
            .unwrap()
            .replace("\"2.0\"", "\"2.9\"");
        envelope["manifest"] = Value::String(b64.encode(text));
        let out = self.path("tampered.json");
        fs::write(&out, serde_json::to_vec(&envelope).unwrap()).unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
        out
    }

    /// A hand-made request to the installer, as `nobody` (the daemon's uid) or as root.
    fn request(&self, as_root: bool, args: &[&str]) -> (Output, Value) {
        let socket = self.path("run/installer.sock");
        let mut all = vec!["installer-request", "--socket", socket.to_str().unwrap()];
        all.extend(args);
        let out = if as_root {
            Command::new(BIN)
                .args(&all)
                .current_dir(self.dir.path())
                .output()
                .unwrap()
        } else {
            self.as_nobody(&all)
        };
        let reply = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("installer-request prints the reply: {}", text(&out)));
        (out, reply)
    }

    fn slot(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(&format!("slot-{}", name.to_ascii_lowercase()))).unwrap()
    }

    fn env_text(&self) -> String {
        match &self.env {
            None => fs::read_to_string(self.path("bootenv")).unwrap(),
            Some(env) => env.printenv(),
        }
    }

    fn env_var(&self, name: &str) -> Option<String> {
        self.env_text()
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    fn events(&self) -> Vec<Value> {
        fs::read_to_string(self.path("state/events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        // The installer this test started, by its pid.
        let _ = self.installer.kill();
        let _ = self.installer.wait();
    }
}

fn assert_refused(out: &Output, reply: &Value, reason: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert_eq!(reply["kind"], "refused", "{reply}");
    assert_eq!(reply["reason"], reason, "{reply}");
}

fn happy_path(backend: Backend) {
    let mut split = Split::new(backend);
    let release = split.release("2.0", IMAGE_PATH);
    let out = split.as_daemon(&["install", release.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "install as nobody: {}\ninstaller:\n{}",
        text(&out),
        split.installer_log()
    );
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

    assert_eq!(split.boot(), "B", "the activated slot boots");
    let out = split.as_daemon(&["boot-check"]);
    assert!(out.status.success(), "boot-check in B: {}", text(&out));
    let states: Vec<String> = split
        .events()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("committed"),
        "{states:?}"
    );
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
    let floor: Value =
        serde_json::from_slice(&fs::read(split.path("installer-state/floor.json")).unwrap())
            .unwrap();
    assert_eq!(floor["floor"], 2, "{floor}");
    let old = split.release_at("1.5", 1, IMAGE_PATH);
    let slot_a = split.slot("A");
    let (out, reply) = split.request(
        false,
        &[
            "--op",
            "write",
            "--slot",
            "A",
            "--release",
            old.to_str().unwrap(),
            "--image",
            split.path("rootfs.img").to_str().unwrap(),
        ],
    );
    assert_refused(&out, &reply, "downgrade");
    assert_eq!(split.slot("A"), slot_a, "slot A untouched");
}

#[test]
fn a_compressed_image_is_decompressed_by_the_daemon_and_hashed_by_the_installer() {
    let split = Split::new(Backend::File);
    let release = split.path("release-zstd.json");
    let url = format!("file://{}", split.path("rootfs.img.zst").display());
    let out = Command::new(BIN)
        .args(["release", "create", "--key"])
        .arg(split.path("signer.key"))
        .arg("--image")
        .arg(split.path("rootfs.img"))
        .args([
            "--version",
            "2.0",
            "--security-version",
            "2",
            "--compress",
            "zstd",
        ])
        .args([
            "--compatible",
            COMPATIBLE,
            "--url",
            &url,
            "--no-chunks",
            "--out",
        ])
        .arg(&release)
        .output()
        .unwrap();
    assert!(out.status.success(), "release create: {}", text(&out));
    let out = split.as_daemon(&["install", release.to_str().unwrap()]);
    assert!(out.status.success(), "install as nobody: {}", text(&out));
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
    fs::write(split.path("big.img"), &big).unwrap();
    let release = split.path("release-big.json");
    let url = format!("file://{}", split.path("big.img").display());
    let out = Command::new(BIN)
        .args(["release", "create", "--key"])
        .arg(split.path("signer.key"))
        .arg("--image")
        .arg(split.path("big.img"))
        .args(["--version", "3.0", "--security-version", "3"])
        .args([
            "--compatible",
            COMPATIBLE,
            "--url",
            &url,
            "--no-chunks",
            "--out",
        ])
        .arg(&release)
        .output()
        .unwrap();
    assert!(out.status.success(), "release create: {}", text(&out));
    // kill -9 of the daemon role right after it persisted the installer's first checkpoint.
    let config = split.path("agent.toml");
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(BIN)
        .args(["install", "--config", config.to_str().unwrap()])
        .arg(&release)
        .env("UPDATE_AGENT_CRASH_AT", "checkpoint:1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        None,
        "killed by its signal: {}",
        text(&out)
    );
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
    require_tool("fw_setenv", "libubootenv-tool");
    happy_path(Backend::UBoot);
}

#[test]
fn the_daemon_user_cannot_open_a_slot_or_the_environment() {
    for backend in [Backend::File, Backend::UBoot] {
        let split = Split::new(backend);
        let env_file = match &split.env {
            None => split.path("bootenv"),
            Some(env) => env.env.clone(),
        };
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
        let config = split.path("in-process.toml");
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

impl Split {
    fn as_nobody_sh(&self, script: &str) -> Output {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "sh",
                "-c",
            ])
            .arg(script)
            .output()
            .unwrap()
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
    // The daemon role under the wrong uid (root here): its install fails, reported with the
    // installer's reason code, and nothing changes.
    let out = Command::new(BIN)
        .arg("install")
        .arg("--config")
        .arg(split.path("agent.toml"))
        .arg(&release)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let last = split.events().pop().expect("an event");
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(last["reason"], "forbidden", "{last}");
    assert_eq!(split.env_text(), before);
    assert_eq!(&split.slot("B")[..], &pattern(FACTORY_B_LEN, 3)[..]);
    // An unprivileged uid in the socket's group gets in, and is refused by the peer check.
    let socket = split.path("run/installer.sock");
    let out = Command::new("setpriv")
        .args([
            "--reuid=4242",
            "--regid=nogroup",
            "--clear-groups",
            BIN,
            "installer-request",
        ])
        .args(["--socket", socket.to_str().unwrap(), "--op", "reboot"])
        .output()
        .unwrap();
    let reply: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_refused(&out, &reply, "forbidden");
    assert!(
        reply["message"].as_str().unwrap().contains("uid 4242"),
        "{reply}"
    );
    // One outside the group does not get past the socket's mode (root:nogroup 0660).
    let out = Command::new("setpriv")
        .args([
            "--reuid=4242",
            "--regid=4242",
            "--clear-groups",
            BIN,
            "installer-request",
        ])
        .args(["--socket", socket.to_str().unwrap(), "--op", "reboot"])
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
    let (out, reply) = split.request(
        false,
        &[
            "--op",
            "write",
            "--slot",
            "A",
            "--release",
            release.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ],
    );
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
        let order = split.env_var("BOOT_ORDER").unwrap_or_default();
        assert!(
            !order.starts_with('B'),
            "B was activated: {}",
            split.env_text()
        );
        assert_eq!(split.env_var("BOOT_B_LEFT").as_deref(), Some("0"));
    };
    let (out, reply) = split.request(
        false,
        &[
            "--op",
            "write",
            "--release",
            release.to_str().unwrap(),
            "--image",
            wrong.to_str().unwrap(),
        ],
    );
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
    assert_ne!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.wrong[..]);
}

#[test]
fn a_resumed_write_rehashes_the_slot_prefix_itself() {
    let split = Split::new(Backend::File);
    let release = split.release("2.0", IMAGE_PATH);
    let image = split.path("rootfs.img");
    let write = |resume: &str| {
        split.request(
            false,
            &[
                "--op",
                "write",
                "--release",
                release.to_str().unwrap(),
                "--image",
                image.to_str().unwrap(),
                "--resume-from",
                resume,
            ],
        )
    };
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
    let tool = require_tool("systemd-socket-activate", "systemd");
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// The `[mqtt]` and `[dbus]` sections of the daemon that talks to the broker on `port`.
fn mqtt_sections(port: u16) -> String {
    format!(
        "[dbus]\nenabled = false\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"{}\"\nkeepalive = 5\nreconnect_min = 0.05\nreconnect_max = 0.5\n",
        mqtt::DEVICE
    )
}

/// `update-agent run` as `nobody`, logging to `daemon-{run}.log`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(split: &Split, run: u32) -> Daemon {
        let log = split.path(&format!("daemon-{run}.log"));
        let child = Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(BIN)
            .args(["run", "--log", "stderr", "--config"])
            .arg(split.path("agent.toml"))
            .env("RUST_LOG", "info")
            .current_dir(split.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as systemd stops it (setpriv exec'd the agent: the pid is the agent's).
    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The daemon this test started, by its pid (a no-op once `stop` reaped it).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mqtt_states(sub: &mqtt::Sub) -> Vec<String> {
    mqtt::states(&sub.payloads(&mqtt::topic("events")))
}

fn retained_state(client: &mqtt::ClientArgs) -> Value {
    let text = mqtt::retained(client, &mqtt::topic("state")).expect("a retained state");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_mqtt_daemon_as_nobody_installs_through_the_installer_and_commits_after_the_reboot() {
    let broker_dir = mqtt::test_dir();
    let broker = mqtt::Mosquitto::start(broker_dir.path(), "allow_anonymous true");
    let client = mqtt::ClientArgs {
        port: broker.port,
        tls: None,
    };
    let mut split = Split::with_sections(Backend::File, &mqtt_sections(broker.port));
    let slot_a = split.slot("A");
    let release = fs::read(split.release("2.0", IMAGE_PATH)).unwrap();
    let sub = mqtt::Sub::start(&client, &[&mqtt::topic("events")], None);
    mqtt::publish(&client, &mqtt::topic("release"), &release, true);

    let daemon = Daemon::start(&split, 1);
    let reboots = split.path("reboots");
    mqtt::wait_for(
        "the reboot through the installer",
        Duration::from_secs(60),
        || reboots.exists().then_some(()),
    );
    // The reboot command ran in the installer: as root, in a directory `nobody` cannot write.
    assert_eq!(fs::metadata(&reboots).unwrap().uid(), 0);
    assert_eq!(fs::read_to_string(&reboots).unwrap(), "reboot\n");
    let before_reboot = ["accepted", "writing", "written", "activated", "rebooting"];
    mqtt::wait_for(
        "the events up to the reboot on MQTT",
        Duration::from_secs(15),
        || (mqtt_states(&sub) == before_reboot).then_some(()),
    );
    assert_eq!(&split.slot("B")[..IMAGE_LEN], &split.image[..]);
    assert_eq!(split.slot("A"), slot_a, "the active slot is never written");
    assert_eq!(split.env_var("BOOT_ORDER").as_deref(), Some("B A"));
    assert!(daemon.stop().success());

    assert_eq!(split.boot(), "B", "the activated slot boots");
    let out = split.as_daemon(&["boot-check"]);
    assert!(out.status.success(), "boot-check in B: {}", text(&out));
    let daemon = Daemon::start(&split, 2);
    let events = mqtt::wait_for("the commit on MQTT", Duration::from_secs(30), || {
        let events = sub.payloads(&mqtt::topic("events"));
        (events.len() >= 7).then_some(events)
    });
    assert_eq!(
        mqtt::states(&events),
        [
            "accepted",
            "writing",
            "written",
            "activated",
            "rebooting",
            "trial-boot",
            "committed"
        ],
        "daemon:\n{}",
        daemon.log()
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert_eq!(events[6]["to_version"], "2.0");
    // The retained state: the new version, and the commit boot-check made as its last event
    // (taken over from the outbox, not recorded by this daemon).
    let state = mqtt::wait_for("the committed state", Duration::from_secs(10), || {
        let state = retained_state(&client);
        (state["version"] == "2.0").then_some(state)
    });
    assert_eq!(state["booted_slot"], "B");
    assert_eq!(state["state"], "idle");
    assert_eq!(state["slots"]["B"]["committed"], true);
    assert_eq!(state["last_event"]["state"], "committed", "{state}");
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
    assert!(daemon.stop().success());
}

#[test]
fn a_tampered_release_on_mqtt_is_refused_by_the_daemon_and_never_reaches_the_installer() {
    let broker_dir = mqtt::test_dir();
    let broker = mqtt::Mosquitto::start(broker_dir.path(), "allow_anonymous true");
    let client = mqtt::ClientArgs {
        port: broker.port,
        tls: None,
    };
    let split = Split::with_sections(Backend::File, &mqtt_sections(broker.port));
    let slots = (split.slot("A"), split.slot("B"));
    let env = split.env_text();
    let release = fs::read(split.release("2.0", IMAGE_PATH)).unwrap();
    let sub = mqtt::Sub::start(&client, &[&mqtt::topic("events")], None);
    mqtt::publish(
        &client,
        &mqtt::topic("release"),
        &mqtt::tamper(&release),
        true,
    );

    let daemon = Daemon::start(&split, 1);
    let refusal = mqtt::wait_for("the refusal on MQTT", Duration::from_secs(30), || {
        sub.payloads(&mqtt::topic("events")).pop()
    });
    assert_eq!(refusal["state"], "refused", "{refusal}");
    assert_eq!(refusal["reason"], "bad-signature", "{refusal}");
    let state = mqtt::wait_for("the refusal in the state", Duration::from_secs(10), || {
        let state = retained_state(&client);
        (state["last_error"]["reason"] == "bad-signature").then_some(state)
    });
    assert_eq!(state["last_event"]["state"], "refused", "{state}");
    // A moment for anything that would follow (nothing should).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(mqtt_states(&sub), ["refused"], "daemon:\n{}", daemon.log());
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
    assert!(daemon.stop().success());
}
