//! The least-privilege split's world for the tests that run it (`tests/installer_split.rs`,
//! `tests/attacks.rs`): `update-agent installer` as root on a Unix socket in a temporary
//! directory, root-owned 0600 file slots and a root-owned bootloader environment (the file
//! backend, U-Boot through the real `fw_setenv`, or GRUB through the real `grub-editenv`), and
//! the daemon role as `nobody` through `setpriv`. Included by path; each test crate uses part.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::boot_sim::{BootSim, SimEnv};
use crate::common::http::{Act, BackgroundServer};
use crate::common::{GrubEnvFile, UBOOT_ENV_SIZE, UBootEnvFile, pattern, require_tool};
use crate::mqtt;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_update-agent");
pub const COMPATIBLE: &str = "acme-gw-split";
pub const ATTEMPTS: u32 = 3;
pub const SLOT_SIZE: u64 = 4 * 1024 * 1024;
pub const IMAGE_LEN: usize = 300_017;
pub const FACTORY_B_LEN: usize = 400_009;
/// `nobody`/`nogroup` on Debian: the daemon's user in these tests.
pub const DAEMON_UID: u32 = 65534;
pub const DAEMON_GID: u32 = 65534;
pub const IMAGE_PATH: &str = "/rootfs.img";
pub const WRONG_PATH: &str = "/wrong.img";
/// Sends the first 64 KiB of the image and then nothing, keeping the connection open.
pub const STALL_PATH: &str = "/stall.img";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    File,
    UBoot,
    Grub,
}

pub struct Split {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    /// The U-Boot environment (backend `UBoot`).
    pub env: Option<UBootEnvFile>,
    /// The grubenv (backend `Grub`).
    pub grub: Option<GrubEnvFile>,
    pub sim: BootSim,
    pub server: BackgroundServer,
    pub image: Vec<u8>,
    pub wrong: Vec<u8>,
    pub installer: Child,
    pub boots: u32,
}

pub fn toml_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn root_only(path: &Path) {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

impl Split {
    pub fn new(backend: Backend) -> Split {
        Split::with_sections(backend, "")
    }

    /// The split with `sections` added to the config both roles read (`[mqtt]` for the daemon).
    pub fn with_sections(backend: Backend, sections: &str) -> Split {
        Split::with_reboot(backend, sections, "echo reboot >> \"$0\"")
    }

    /// The split whose reboot command is the shell `script`, run with `$0` = the `reboots` file
    /// (a successful reboot appends a line to it).
    pub fn with_reboot(backend: Backend, sections: &str, script: &str) -> Split {
        Split::with_health(backend, sections, script, r#"[["true"]]"#)
    }

    /// The split whose trial boot runs the health `commands` (a TOML array of argv arrays).
    pub fn with_health(backend: Backend, sections: &str, script: &str, commands: &str) -> Split {
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

        let mut grub = None;
        let (env, sim_env) = match backend {
            Backend::Grub => {
                let env = GrubEnvFile::create(dir.path());
                for (name, value) in [
                    ("ORDER", "A B"),
                    ("A_OK", "1"),
                    ("A_TRY", "0"),
                    ("B_OK", "1"),
                    ("B_TRY", "0"),
                ] {
                    env.set(name, value);
                }
                root_only(&env.grubenv);
                let sim = SimEnv::Grub {
                    editenv: env.editenv.clone(),
                    grubenv: env.grubenv.clone(),
                };
                grub = Some(env);
                (None, sim)
            }
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
                (STALL_PATH, Act::Stall { after: 65536 }),
            ],
        );
        let bootloader = match (&env, &grub) {
            (None, Some(grub)) => format!(
                "backend = \"grub\"\ngrubenv = {}\ngrub_editenv = {}\n",
                toml_path(&grub.grubenv),
                toml_path(&grub.editenv),
            ),
            (None, None) => format!(
                "backend = \"file\"\npath = {}\nattempts = {ATTEMPTS}\n",
                toml_path(&path("bootenv"))
            ),
            (Some(env), _) => format!(
                "backend = \"uboot\"\nfw_env_config = {}\nattempts = {ATTEMPTS}\nfw_printenv = {}\nfw_setenv = {}\n",
                toml_path(&env.config),
                toml_path(&env.fw_printenv),
                toml_path(&env.fw_setenv),
            ),
        };
        let reboots = path("reboots");
        let reboot = ["sh", "-c", script, reboots.to_str().unwrap()];
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
commands = {commands}
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
            backend,
            env,
            grub,
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.path("run/installer.sock").exists() {
            if let Some(status) = self.installer.try_wait().unwrap() {
                panic!("the installer exited ({status}): {}", self.installer_log());
            }
            assert!(Instant::now() < deadline, "the installer never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn installer_log(&self) -> String {
        fs::read_to_string(self.path("installer.log")).unwrap_or_default()
    }

    pub fn boot(&mut self) -> String {
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
    pub fn as_nobody(&self, args: &[&str]) -> Output {
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

    /// The daemon role started in the background (setpriv execs it: the pid is the agent's).
    pub fn spawn_as_daemon(&self, args: &[&str], log: &Path) -> Child {
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--inh-caps=-all",
            ])
            .arg(BIN)
            .args(args)
            .arg("--config")
            .arg(self.path("agent.toml"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Who holds the state directory's lock, as its lock file says.
    pub fn lock_holder(&self) -> String {
        fs::read_to_string(self.path("state/lock")).unwrap_or_default()
    }

    /// The daemon role: a one-shot command with the `[installer]` config, as `nobody`.
    pub fn as_daemon(&self, args: &[&str]) -> Output {
        let config = self.path("agent.toml");
        let mut all = args.to_vec();
        all.extend(["--config", config.to_str().unwrap()]);
        self.as_nobody(&all)
    }

    pub fn release(&self, version: &str, url_path: &str) -> PathBuf {
        self.release_at(version, 2, url_path)
    }

    pub fn release_at(&self, version: &str, security_version: u64, url_path: &str) -> PathBuf {
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
    pub fn tampered(&self, release: &Path) -> PathBuf {
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
    pub fn request(&self, as_root: bool, args: &[&str]) -> (Output, Value) {
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

    pub fn slot(&self, name: &str) -> Vec<u8> {
        fs::read(self.path(&format!("slot-{}", name.to_ascii_lowercase()))).unwrap()
    }

    pub fn env_text(&self) -> String {
        match (&self.env, &self.grub) {
            (Some(env), _) => env.printenv(),
            (None, Some(grub)) => grub.list(),
            (None, None) => fs::read_to_string(self.path("bootenv")).unwrap(),
        }
    }

    /// The file that holds the bootloader environment.
    pub fn env_file(&self) -> PathBuf {
        match (&self.env, &self.grub) {
            (Some(env), _) => env.env.clone(),
            (None, Some(grub)) => grub.grubenv.clone(),
            (None, None) => self.path("bootenv"),
        }
    }

    pub fn env_var(&self, name: &str) -> Option<String> {
        self.env_text()
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")).map(str::to_owned))
    }

    pub fn events(&self) -> Vec<Value> {
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

pub fn assert_refused(out: &Output, reply: &Value, reason: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(out));
    assert_eq!(reply["kind"], "refused", "{reply}");
    assert_eq!(reply["reason"], reason, "{reply}");
}

impl Split {
    pub fn as_nobody_sh(&self, script: &str) -> Output {
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

/// The `[mqtt]` and `[dbus]` sections of the daemon that talks to the broker on `port`.
pub fn mqtt_sections(port: u16) -> String {
    format!(
        "[dbus]\nenabled = false\n\n[mqtt]\nbroker = \"mqtt://127.0.0.1:{port}\"\ndevice_id = \"{}\"\nkeepalive = 5\nreconnect_min = 0.05\nreconnect_max = 0.5\n",
        mqtt::DEVICE
    )
}

/// `update-agent run` as `nobody`, logging to `daemon-{run}.log`.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(split: &Split, run: u32) -> Daemon {
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

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as systemd stops it (setpriv exec'd the agent: the pid is the agent's).
    pub fn stop(mut self) -> std::process::ExitStatus {
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

pub fn mqtt_states(sub: &mqtt::Sub) -> Vec<String> {
    mqtt::states(&sub.payloads(&mqtt::topic("events")))
}

pub fn retained_state(client: &mqtt::ClientArgs) -> Value {
    let text = mqtt::retained(client, &mqtt::topic("state")).expect("a retained state");
    serde_json::from_str(&text).unwrap()
}
