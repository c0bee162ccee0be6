//! A simulated gateway: a directory with two file slots, a bootloader environment, a trust
//! anchor, the kernel's boot facts and the agent's config, which the builder assembles as a
//! typed [`Config`] and writes with [`Config::to_toml`]. A boot plays the boot script on the
//! environment and writes a new boot id and `update_agent.slot=` for the slot that came up. The
//! agent runs as on a device: the built binary as a process ([`Gateway::run`],
//! [`Gateway::start_daemon`]), as the daemon's user when the least-privilege split is on (then
//! [`Gateway`] also runs `update-agent installer` as root), or in-process from
//! [`Gateway::config`] (the demo).
//!
//! Layout of the directory: `keys/` (the trust anchor), `state/`, `slot-a`, `slot-b`, the
//! environment (`bootenv`, `uboot.env` with `fw_env.config`, or `grubenv`), `boot_id`, `cmdline`,
//! `reboots` (one line per reboot the agent asked for), `agent.toml`; with the split also
//! `run/installer.sock`, `installer-state/` and `installer.log`; `daemon-N.log` per daemon run.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::bootenv::{Backend, BootEnv};
use super::release::{ReleaseBuilder, Signer};
use super::tools::{User, describe};
use super::{error, pattern, sha256_hex, wait_for};
use crate::config::{
    Config, DBus, Device, Health, Install, InstallerConfig, Mqtt, Policy, Slot, SlotClass, System,
    Trust,
};
use crate::mqtt::{BrokerUrl, topics};

/// The device id of a simulated gateway on MQTT.
pub const DEVICE_ID: &str = "gw-0001";
/// `nobody`/`nogroup` on Debian: the daemon's user when the split is on.
pub const DAEMON_UID: u32 = 65534;
pub const DAEMON_GID: u32 = 65534;
/// Environment variables of the test hooks, never inherited from the test's own environment.
const HOOKS: [&str; 2] = ["UPDATE_AGENT_CRASH_AT", "UPDATE_AGENT_TEST_CLOCK_FILE"];
/// With this set, a gateway's temporary directory is kept (and named) for a post-mortem.
pub const KEEP_VAR: &str = "UPDATE_AGENT_SIM_KEEP";

type Tweak = Box<dyn FnOnce(&mut Config)>;

/// What a gateway is made of; [`GatewayBuilder::build`] makes it. Unless told otherwise: the file
/// backend with 3 tries, 4 MiB slots with A holding a factory image and B another, both
/// bootable, a trust anchor with the key of [`Signer::from_seed`]`(7)`, health check `true`,
/// checkpoints every MiB, no MQTT, no D-Bus, the default policy, no split.
pub struct GatewayBuilder {
    dir: Option<PathBuf>,
    binary: Option<PathBuf>,
    backend: Backend,
    compatible: String,
    slot_size: u64,
    slot_a: Vec<u8>,
    slot_b: Vec<u8>,
    b_bootable: bool,
    signer: Signer,
    mqtt: Option<BrokerUrl>,
    dbus: Option<String>,
    split: bool,
    reboot_script: String,
    tweaks: Vec<Tweak>,
}

/// The reboot command's shell script unless told otherwise: records that a reboot was asked
/// for (`$0` is the `reboots` file); the test does the rebooting.
const RECORD_REBOOT: &str = "echo reboot >> \"$0\"";

impl GatewayBuilder {
    /// Works in `dir` (created if missing, kept afterwards) instead of a temporary directory.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// The agent's binary, for what runs it as a process.
    pub fn binary(mut self, binary: impl Into<PathBuf>) -> Self {
        self.binary = Some(binary.into());
        self
    }

    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The product string releases must name.
    pub fn compatible(mut self, compatible: &str) -> Self {
        self.compatible = compatible.into();
        self
    }

    /// The capacity of each slot (the files hold what [`GatewayBuilder::slot_contents`] says).
    pub fn slot_size(mut self, size: u64) -> Self {
        self.slot_size = size;
        self
    }

    /// What the factory put into the slots.
    pub fn slot_contents(mut self, a: Vec<u8>, b: Vec<u8>) -> Self {
        self.slot_a = a;
        self.slot_b = b;
        self
    }

    /// A device as it leaves the factory with nothing in B: B empty and out of the rotation (no
    /// tries left, or not OK).
    pub fn empty_b(mut self) -> Self {
        self.slot_b = Vec::new();
        self.b_bootable = false;
        self
    }

    /// The key whose public half is the trust anchor.
    pub fn signer(mut self, signer: Signer) -> Self {
        self.signer = signer;
        self
    }

    /// The trial boot's health checks (argv each).
    pub fn health(self, commands: &[&[&str]]) -> Self {
        let commands = argvs(commands);
        self.configure(move |c| c.health.commands = commands)
    }

    /// `update-agent run` talks to `broker` as [`DEVICE_ID`], with short keepalive and
    /// reconnect times.
    pub fn mqtt(mut self, broker: &str) -> Self {
        self.mqtt = Some(BrokerUrl::parse(broker).expect("a broker URL"));
        self
    }

    /// The D-Bus service on, with `admin_group` allowed to change things.
    pub fn dbus(mut self, admin_group: &str) -> Self {
        self.dbus = Some(admin_group.into());
        self
    }

    pub fn policy(self, policy: Policy) -> Self {
        self.configure(move |c| c.policy = policy)
    }

    /// The least-privilege split: root-owned 0600 slots and environment, `update-agent
    /// installer` running as root on a socket in the directory, and the agent's commands run as
    /// `nobody` with a state directory of its own. Needs root.
    pub fn split(mut self) -> Self {
        self.split = true;
        self
    }

    /// The reboot command is the shell `script`, run with `$0` = the `reboots` file (a reboot that
    /// works appends a line to it, as the default script does).
    pub fn reboot_script(mut self, script: &str) -> Self {
        self.reboot_script = script.into();
        self
    }

    /// Any other setting, on the config as assembled (paths filled in).
    pub fn configure(mut self, tweak: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Makes the gateway and boots it once: it comes up in slot A.
    pub fn build(self) -> io::Result<Gateway> {
        let (dir, temp) = match &self.dir {
            Some(dir) => {
                fs::create_dir_all(dir)?;
                (dir.clone(), None)
            }
            None => {
                let mut temp = tempfile::Builder::new().prefix("sim-gw-").tempdir()?;
                if std::env::var_os(KEEP_VAR).is_some() {
                    temp.disable_cleanup(true);
                    eprintln!("gateway directory: {}", temp.path().display());
                }
                (temp.path().to_owned(), Some(temp))
            }
        };
        if self.split {
            if !nix::unistd::geteuid().is_root() {
                return Err(io::Error::other(
                    "the split starts the installer as root and switches to nobody: run as root",
                ));
            }
            // `nobody` must reach its state directory, the config and the socket.
            set_mode(&dir, 0o755)?;
        }
        let keys = dir.join("keys");
        let public = self.signer.write_anchor(&keys, "release")?;
        set_mode(&keys, 0o755)?;
        set_mode(&public, 0o644)?;
        let (slot_a, slot_b) = (dir.join("slot-a"), dir.join("slot-b"));
        fs::write(&slot_a, &self.slot_a)?;
        fs::write(&slot_b, &self.slot_b)?;
        let env = BootEnv::create(self.backend, &dir)?;
        env.set_factory(self.b_bootable)?;
        let state_dir = dir.join("state");
        if self.split {
            for file in [&slot_a, &slot_b, &env.file_path().to_owned()] {
                set_mode(file, 0o600)?;
            }
            fs::create_dir_all(&state_dir)?;
            std::os::unix::fs::chown(&state_dir, Some(DAEMON_UID), Some(DAEMON_GID))?;
        }
        let slot = |device: PathBuf, name: &str| Slot {
            device,
            bootname: name.parse().expect("A and B are bootnames"),
            size: Some(self.slot_size),
        };
        let reboots = dir.join("reboots");
        let mut config = Config {
            device: Device {
                compatible: self.compatible.clone(),
                state_dir,
                factory_version: None,
                model: None,
                support_end: None,
            },
            trust: Trust {
                keys_dir: keys,
                threshold: 1,
                floor: 0,
                // The anchor is in a temporary directory anyone with the test's uid can write.
                insecure_writable_anchor: true,
            },
            bootloader: env.config(),
            slots: SlotClass {
                class: "rootfs".into(),
                a: slot(slot_a, "A"),
                b: slot(slot_b, "B"),
            },
            install: Install {
                checkpoint_interval: 1024 * 1024,
                stall_timeout: Duration::from_secs(10),
                // Tests wait for installs; the jitter's spread is tested in `engine::rollout`.
                download_jitter: Duration::ZERO,
                ..Install::default()
            },
            health: Health {
                commands: argvs(&[&["true"]]),
                timeout: Duration::from_secs(10),
                ..Health::default()
            },
            system: System {
                boot_id_path: dir.join("boot_id"),
                cmdline_path: dir.join("cmdline"),
                booted_slot: None,
                reboot_command: vec![
                    "sh".into(),
                    "-c".into(),
                    self.reboot_script.clone(),
                    reboots.display().to_string(),
                ],
            },
            mqtt: self.mqtt.as_ref().map(|broker| Mqtt {
                keepalive: Duration::from_secs(5),
                reconnect_min: Duration::from_millis(50),
                reconnect_max: Duration::from_millis(500),
                ..Mqtt::new(broker.clone(), DEVICE_ID)
            }),
            policy: Policy::default(),
            dbus: DBus {
                enabled: self.dbus.is_some(),
                admin_group: self.dbus.clone().or(DBus::default().admin_group),
            },
            installer: self.split.then(|| InstallerConfig {
                socket: dir.join("run/installer.sock"),
                daemon_user: "nobody".into(),
                state_dir: dir.join("installer-state"),
            }),
            conformance: Default::default(),
        };
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let mut gateway = Gateway {
            config_path: dir.join("agent.toml"),
            dir,
            _temp: temp,
            binary: self.binary,
            env,
            config,
            signer: self.signer,
            installer: None,
            daemon: None,
            runs: 0,
            boots: 0,
            booted: String::new(),
            reboots_answered: 0,
        };
        gateway.write_config()?;
        if gateway.config.installer.is_some() {
            gateway.start_installer()?;
        }
        let first = gateway
            .try_boot()
            .map_err(|e| error("the factory boot", e))?;
        if first != "A" {
            return Err(error("the factory boot", format!("booted {first}, not A")));
        }
        Ok(gateway)
    }
}

fn argvs(commands: &[&[&str]]) -> Vec<Vec<String>> {
    commands
        .iter()
        .map(|argv| argv.iter().map(|a| a.to_string()).collect())
        .collect()
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

pub struct Gateway {
    dir: PathBuf,
    /// Removes the directory with the gateway (absent when the caller named the directory).
    _temp: Option<tempfile::TempDir>,
    binary: Option<PathBuf>,
    pub env: BootEnv,
    config: Config,
    config_path: PathBuf,
    signer: Signer,
    installer: Option<Child>,
    daemon: Option<Child>,
    /// `update-agent run` processes started so far (each logs to `daemon-N.log`).
    runs: u32,
    boots: u32,
    booted: String,
    /// Reboots the agent asked for that [`Gateway::reboot`] carried out.
    reboots_answered: usize,
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            dir: None,
            binary: None,
            backend: Backend::File,
            compatible: "sim-gw".into(),
            slot_size: 4 * 1024 * 1024,
            slot_a: pattern(200_003, 2),
            slot_b: pattern(400_009, 3),
            b_bootable: true,
            signer: Signer::from_seed(7),
            mqtt: None,
            dbus: None,
            split: false,
            reboot_script: RECORD_REBOOT.into(),
            tweaks: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Changes the config and writes it again: the config a boot reads is the one of the slot
    /// that booted, so a test changes it before booting into the new slot.
    pub fn update_config(&mut self, change: impl FnOnce(&mut Config)) {
        change(&mut self.config);
        self.write_config()
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    pub fn set_health(&mut self, commands: &[&[&str]]) {
        let commands = argvs(commands);
        self.update_config(|c| c.health.commands = commands);
    }

    fn write_config(&self) -> io::Result<()> {
        let text = self
            .config
            .to_toml()
            .map_err(|e| error("the gateway's config", e))?;
        fs::write(&self.config_path, text)
    }

    /// The config without `[installer]`, written beside the other: the agent's own code doing
    /// the installer's work (which the split's file modes must stop).
    pub fn config_without_installer(&self) -> PathBuf {
        let path = self.path("in-process.toml");
        let mut config = self.config.clone();
        config.installer = None;
        fs::write(&path, config.to_toml().expect("the config serialises")).unwrap();
        path
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// A release for this gateway (its compatible string), signed by its trusted key.
    pub fn release(&self, version: &str) -> ReleaseBuilder<'_> {
        self.signer.release(&self.config.device.compatible, version)
    }

    // --- boots ------------------------------------------------------------------------------

    /// Powers the device on: the boot script picks a slot and updates the environment, the
    /// kernel gets a new boot id and names the slot on its command line. Returns the slot.
    #[track_caller]
    pub fn boot(&mut self) -> String {
        self.try_boot()
            .unwrap_or_else(|e| panic!("the board does not boot: {e}"))
    }

    pub fn try_boot(&mut self) -> Result<String, String> {
        let slot = self.env.boot()?;
        self.boots += 1;
        let write = |path: &Path, text: String| {
            fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
        };
        write(
            &self.config.system.boot_id_path,
            format!("6a1c0f3e-0000-4000-8000-{:012x}\n", self.boots),
        )?;
        write(
            &self.config.system.cmdline_path,
            format!("console=ttyS0 rootwait update_agent.slot={slot} quiet\n"),
        )?;
        self.booted.clone_from(&slot);
        Ok(slot)
    }

    /// The reboot the agent asked for: the daemon (if one runs) stops as systemd stops it, the
    /// board boots. Returns the slot that came up.
    #[track_caller]
    pub fn reboot(&mut self) -> String {
        assert!(self.reboot_requested(), "the agent asked for no reboot");
        if self.daemon.is_some() {
            self.stop_daemon();
        }
        self.reboots_answered = self.reboots_requested();
        self.boot()
    }

    /// How many boots so far, the factory boot included.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// The slot that booted last.
    pub fn booted(&self) -> &str {
        &self.booted
    }

    /// How many times the agent ran the reboot command.
    pub fn reboots_requested(&self) -> usize {
        fs::read_to_string(self.path("reboots"))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    }

    /// Whether the agent asked for a reboot that has not happened.
    pub fn reboot_requested(&self) -> bool {
        self.reboots_requested() > self.reboots_answered
    }

    // --- what a test looks at ---------------------------------------------------------------

    pub fn slot_path(&self, name: &str) -> &Path {
        let slots = &self.config.slots;
        let slot = [&slots.a, &slots.b]
            .into_iter()
            .find(|slot| slot.bootname == *name)
            .unwrap_or_else(|| panic!("no slot {name}"));
        &slot.device
    }

    pub fn slot(&self, name: &str) -> Vec<u8> {
        fs::read(self.slot_path(name)).unwrap()
    }

    pub fn slot_hash(&self, name: &str) -> String {
        sha256_hex(&self.slot(name))
    }

    /// The event log, oldest first, as the agent wrote it.
    pub fn events(&self) -> Vec<Value> {
        let path = self.config.device.state_dir.join("events.jsonl");
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("event log line {line:?} is not JSON: {e}"))
            })
            .collect()
    }

    #[track_caller]
    pub fn last_event(&self) -> Value {
        self.events().pop().expect("an event was logged")
    }

    /// The engine's persisted state (`state.json`); before the first transaction, idle.
    pub fn state(&self) -> Value {
        match fs::read(self.config.device.state_dir.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                serde_json::json!({"phase": {"phase": "idle"}, "next_seq": 0})
            }
            Err(e) => panic!("cannot read state.json: {e}"),
        }
    }

    /// Records in the MQTT outbox (its `meta.json` counted).
    pub fn outbox_files(&self) -> usize {
        fs::read_dir(self.config.device.state_dir.join("outbox"))
            .map(|dir| {
                dir.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    /// `topic`'s leaf of this device's MQTT topics (`…/devices/gw-0001/{leaf}`).
    pub fn topic(&self, leaf: &str) -> String {
        let mqtt = self.config.mqtt.as_ref().expect("MQTT is on");
        format!(
            "{}/{leaf}",
            topics::device_topic(&mqtt.topic_prefix, &mqtt.device_id)
        )
    }

    /// The release topic of this device's fleet.
    pub fn fleet_topic(&self) -> String {
        let mqtt = self.config.mqtt.as_ref().expect("MQTT is on");
        topics::fleet_release(&mqtt.topic_prefix, &self.config.device.compatible)
    }

    // --- the agent as a process -------------------------------------------------------------

    fn binary(&self) -> &Path {
        self.binary
            .as_deref()
            .expect("the gateway was built without the agent's binary")
    }

    /// The user the agent runs as: `nobody` with the split, else the test's own.
    pub fn agent_user(&self) -> User {
        if self.config.installer.is_some() {
            User::Nobody
        } else {
            User::Current
        }
    }

    /// `update-agent ARGS --config agent.toml` as `user`, in the gateway's directory, without
    /// the test hooks of the test's own environment.
    pub fn command_as(&self, user: &User, args: &[&str]) -> Command {
        let mut command = user.command(self.binary());
        command
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(&self.dir);
        for hook in HOOKS {
            command.env_remove(hook);
        }
        command
    }

    /// The same as the agent's user.
    pub fn command(&self, args: &[&str]) -> Command {
        self.command_as(&self.agent_user(), args)
    }

    /// A one-shot command (`install`, `boot-check`, `status`, `mark`) as on a device.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run update-agent")
    }

    /// `status --json`, which must succeed.
    #[track_caller]
    pub fn status_json(&self) -> Value {
        let out = self.run(&["status", "--json"]);
        assert!(out.status.success(), "status --json: {}", describe(&out));
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// Starts `update-agent run` (as the agent's user) with extra environment variables,
    /// logging to `daemon-N.log`.
    pub fn start_daemon(&mut self, env: &[(&str, &std::ffi::OsStr)]) {
        assert!(self.daemon.is_none(), "a daemon runs already");
        self.runs += 1;
        let log = fs::File::create(self.path(&format!("daemon-{}.log", self.runs))).unwrap();
        let mut command = self.command(&["run", "--log", "stderr"]);
        let child = command
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start update-agent run");
        self.daemon = Some(child);
    }

    /// Stops the daemon the way systemd does (SIGTERM) and waits for it.
    pub fn stop_daemon(&mut self) -> ExitStatus {
        let mut child = self.daemon.take().expect("a daemon runs");
        super::mqtt::terminate(&child);
        child.wait().unwrap()
    }

    /// Kills the daemon (SIGKILL: nothing cleaned up) and waits for it.
    pub fn kill_daemon(&mut self) {
        let mut child = self.daemon.take().expect("a daemon runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The running daemon's pid (the agent's: `setpriv` execs it).
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// The log of the daemon started last.
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.path(&format!("daemon-{}.log", self.runs))).unwrap_or_default()
    }

    pub fn daemon_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    /// Every daemon run's log, each under a `--- agent run N ---` line.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| {
                let text =
                    fs::read_to_string(self.path(&format!("daemon-{n}.log"))).unwrap_or_default();
                format!("--- agent run {n} ---\n{text}")
            })
            .collect()
    }

    // --- the installer (split) --------------------------------------------------------------

    fn start_installer(&mut self) -> io::Result<()> {
        let log = fs::File::create(self.path("installer.log"))?;
        let child = self
            .command_as(&User::Current, &["installer", "--log", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let socket = self.installer_socket();
        let log = self.dir.join("installer.log");
        let installer = self.installer.insert(child);
        wait_for("the installer to listen", Duration::from_secs(20), || {
            if let Some(status) = installer.try_wait().unwrap() {
                let log = fs::read_to_string(&log).unwrap_or_default();
                panic!("the installer exited ({status}): {log}");
            }
            socket.exists()
        });
        Ok(())
    }

    pub fn installer_socket(&self) -> PathBuf {
        let installer = self.config.installer.as_ref().expect("the split is on");
        installer.socket.clone()
    }

    pub fn installer_log(&self) -> String {
        fs::read_to_string(self.path("installer.log")).unwrap_or_default()
    }

    /// A hand-made request to the installer (`update-agent installer-request`, which streams
    /// whatever it is given) as `user`; its output and the reply it printed.
    #[track_caller]
    pub fn request(&self, user: &User, args: &[&str]) -> (Output, Value) {
        let out = user
            .command(self.binary())
            .arg("installer-request")
            .arg("--socket")
            .arg(self.installer_socket())
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        let reply = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("installer-request prints the reply: {}", describe(&out)));
        (out, reply)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The processes this gateway started, by their pids.
        for child in [self.daemon.as_mut(), self.installer.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
