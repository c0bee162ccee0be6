//! The D-Bus service against a real `dbus-daemon` that this test starts on a socket in a
//! temporary directory, with a bus configuration that includes the project's policy file
//! (`systemd/dbus/org.updateagent.Agent1.conf`, its group set to `adm`). Callers are the real
//! `busctl` and the real `update-agent` binary, as root and as `nobody` (through `setpriv`).
//! Most tests host the service in this process on a fake clock (`dbus::host::Host`, with the
//! daemon's own `Feed`), so time is injected, never waited for; the last ones run the daemon,
//! `update-agent run`, as a process with a mosquitto of their own (`mqtt/harness.rs`) and move
//! its test clock (`UPDATE_AGENT_TEST_CLOCK_FILE`).
//!
//! Must run as root (it switches to `nobody`); CI does. Needs `dbus` (dbus-daemon, and
//! dbus-send from dbus-bin), `systemd` (busctl) and `util-linux` (setpriv).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::require_tool;
use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::sync::mpsc;
use update_agent::agent::{Agent, RebootMode, Stop};
use update_agent::config::Config;
use update_agent::dbus::host::{Control, Host, Request};
use update_agent::dbus::{self, Access, Snapshot};
use update_agent::keys;
use update_agent::release::build::{digest_image, sign_manifest};
use update_agent::release::manifest::{Disruption, FORMAT, Image, Manifest, Severity};

/// The admin group of the tests: one that exists on every Debian system and that `nobody` is
/// not in.
const GROUP: &str = "adm";
const T0: &str = "2026-06-01T12:00:00Z";
const DEADLINE: &str = "2026-06-04T12:00:00Z";
const MUTATING: &[&[&str]] = &[
    &["Postpone", "t", "3600"],
    &["PostponeUntil", "x", "1780400000"],
    &["Resume"],
    &["SetAutoInstall", "b", "true"],
    &["InstallNow"],
    &["CheckNow"],
    &["MarkGood"],
    &["MarkBad"],
];

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn admin_gid() -> u32 {
    nix::unistd::Group::from_name(GROUP)
        .unwrap()
        .unwrap_or_else(|| panic!("group {GROUP} is missing"))
        .gid
        .as_raw()
}

/// A `dbus-daemon` of our own; killed (by its pid) when dropped.
struct Bus {
    /// Holds the socket and the configuration until the bus is gone.
    _dir: tempfile::TempDir,
    child: Child,
    address: String,
}

#[derive(Clone, Copy, PartialEq)]
enum BusPolicy {
    /// The project's policy file, as installed.
    Project,
    /// The project's file plus a rule after it that lets everyone call everything: only the
    /// service's own check stands between `nobody` and the methods.
    Permissive,
}

impl Bus {
    fn start(policy: BusPolicy) -> Bus {
        let daemon = require_tool("dbus-daemon", "dbus");
        let dir = tempfile::tempdir().unwrap();
        // `nobody` must reach the socket.
        set_mode(dir.path(), 0o755);
        let project = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/dbus/org.updateagent.Agent1.conf"),
        )
        .unwrap();
        let adapted = project.replace("group=\"update-admin\"", &format!("group=\"{GROUP}\""));
        assert_ne!(
            adapted, project,
            "the policy file names no group update-admin"
        );
        fs::write(dir.path().join("org.updateagent.Agent1.conf"), adapted).unwrap();
        let socket = dir.path().join("bus");
        let permissive = match policy {
            BusPolicy::Project => "",
            BusPolicy::Permissive => {
                r#"<policy context="default"><allow send_destination="org.updateagent.Agent1"/></policy>"#
            }
        };
        // Debian's system bus defaults (system.conf): method calls denied unless a rule
        // allows them; the project's file is included as from /usr/share/dbus-1/system.d.
        let config = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{dir}/org.updateagent.Agent1.conf</include>
  {permissive}
</busconfig>
"#,
            socket = socket.display(),
            dir = dir.path().display(),
        );
        let config_path = dir.path().join("bus.conf");
        fs::write(&config_path, config).unwrap();
        let child = Command::new(daemon)
            .arg(format!("--config-file={}", config_path.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("the bus socket", || socket.exists());
        Bus {
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
            child,
        }
    }
}

/// A child process this test started, killed (by pid) and reaped when the test ends early.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut()
            && let Ok(None) = child.try_wait()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A device on files: two slots, the file bootloader, a key, and a signed security release
/// (image by file://) with a deadline.
struct Device {
    dir: tempfile::TempDir,
    config: PathBuf,
    release: Vec<u8>,
}

impl Device {
    fn new(policy: &str) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = keys::generate_signing_key().unwrap();
        fs::create_dir_all(d.join("keys.d")).unwrap();
        keys::write_key_pair(&key, &d.join("keys.d/release")).unwrap();
        fs::remove_file(d.join("keys.d/release.key")).unwrap();
        let slot_size = 4 * 1024 * 1024u64;
        fs::write(d.join("slot-a.img"), common::pattern(slot_size as usize, 1)).unwrap();
        fs::write(d.join("slot-b.img"), b"").unwrap();
        fs::write(
            d.join("bootenv"),
            "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\n",
        )
        .unwrap();
        fs::write(d.join("boot_id"), "boot-1\n").unwrap();
        fs::write(d.join("cmdline"), "root=/dev/x update_agent.slot=A\n").unwrap();
        let image = d.join("rootfs-2.0.img");
        fs::write(&image, common::pattern(1024 * 1024, 2)).unwrap();
        let digest = digest_image(&image, None).unwrap();
        let manifest = Manifest {
            format: FORMAT,
            version: "2.0".into(),
            security_version: 2,
            compatible: "test-gw".into(),
            created: ts("2026-05-01T00:00:00Z"),
            expires: None,
            security: true,
            severity: Severity::High,
            advisory: "Fixes CVE-2026-0001 in the web UI.".into(),
            disruption: Disruption {
                reboot: true,
                downtime_seconds: 90,
            },
            deadline: Some(ts(DEADLINE)),
            images: [(
                "rootfs".to_string(),
                Image::uncompressed(
                    format!("file://{}", image.display()),
                    digest.size,
                    digest.sha256,
                ),
            )]
            .into_iter()
            .collect(),
        };
        let release = sign_manifest(&manifest, &key)
            .unwrap()
            .to_json()
            .into_bytes();
        let p = |name: &str| d.join(name).display().to_string();
        let config = format!(
            r#"[device]
compatible = "test-gw"
state_dir = "{state}"
factory_version = "1.0"
model = "Test Gateway 1"
support_end = "2031-12-31"

[trust]
keys_dir = "{keys}"
insecure_writable_anchor = true

[bootloader]
backend = "file"
path = "{bootenv}"

[slots]
a = {{ device = "{a}", bootname = "A", size = {slot_size} }}
b = {{ device = "{b}", bootname = "B", size = {slot_size} }}

[install]
checkpoint_interval = 1048576

[health]
commands = [["true"]]
timeout = 10

[system]
boot_id_path = "{boot_id}"
cmdline_path = "{cmdline}"
reboot_command = ["true"]

[policy]
{policy}

[dbus]
admin_group = "{GROUP}"
"#,
            state = p("state"),
            keys = p("keys.d"),
            bootenv = p("bootenv"),
            a = p("slot-a.img"),
            b = p("slot-b.img"),
            boot_id = p("boot_id"),
            cmdline = p("cmdline"),
        );
        let config_path = d.join("agent.toml");
        fs::write(&config_path, config).unwrap();
        Device {
            dir,
            config: config_path,
            release,
        }
    }

    fn events(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.path().join("state/events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// The service on `bus`, hosted in this process on its own thread and runtime (the test's
/// thread blocks on `busctl` and the CLI), with a fake clock.
struct Service {
    clock: Arc<Mutex<Timestamp>>,
    control: Option<Control>,
    snapshots: tokio::sync::watch::Receiver<Snapshot>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    fn start(bus: &Bus, device: &Device) -> Service {
        let config = Config::load(&device.config).unwrap();
        let access = Access::from_config(&config);
        let clock = Arc::new(Mutex::new(ts(T0)));
        let now = clock.clone();
        let agent = Agent::open(config, RebootMode::Defer)
            .unwrap()
            .with_clock(Arc::new(move || *now.lock().unwrap()));
        let (host, handle, control) = Host::new(agent);
        let snapshots = handle.snapshots.clone();
        let address = bus.address.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let conn = zbus::connection::Builder::address(address.as_str())
                    .build()
                    .await
                    .unwrap();
                let _publisher = dbus::serve(&conn, handle, access).await.unwrap();
                ready_tx.send(()).unwrap();
                host.run().await.unwrap();
            });
        });
        ready.recv_timeout(Duration::from_secs(20)).unwrap();
        let service = Service {
            clock,
            control: Some(control),
            snapshots,
            thread: Some(thread),
        };
        service.wait_state("the first boot", |s| s.booted_slot == "A");
        service
    }

    fn request(&self, request: Request) {
        self.control
            .as_ref()
            .unwrap()
            .requests
            .blocking_send(request)
            .unwrap();
    }

    /// Moves the fake clock to `at` and lets the host look at it.
    fn set_time(&self, at: &str) {
        *self.clock.lock().unwrap() = ts(at);
        self.request(Request::Tick);
    }

    fn wait_state(&self, what: &str, ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
        wait_for(what, || ready(&self.snapshots.borrow()));
        self.snapshots.borrow().clone()
    }

    fn stop(&self) -> Option<Stop> {
        self.control.as_ref().unwrap().stops.borrow().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Dropping the control ends the host, then the thread.
        self.control.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Who {
    Root,
    Nobody,
    /// `nobody` with the admin group as its only supplementary group.
    NobodyInGroup,
}

fn command(who: Who, program: &Path) -> Command {
    let setpriv = require_tool("setpriv", "util-linux");
    match who {
        Who::Root => Command::new(program),
        Who::Nobody | Who::NobodyInGroup => {
            let mut c = Command::new(setpriv);
            c.args(["--reuid=nobody", "--regid=nogroup"]);
            match who {
                Who::NobodyInGroup => c.arg(format!("--groups={}", admin_gid())),
                _ => c.arg("--clear-groups"),
            };
            c.arg(program);
            c
        }
    }
}

fn busctl(bus: &Bus, who: Who, args: &[&str]) -> Output {
    let busctl = require_tool("busctl", "systemd");
    command(who, &busctl)
        .arg(format!("--address={}", bus.address))
        .args(args)
        .output()
        .unwrap()
}

fn call(bus: &Bus, who: Who, method: &[&str]) -> Output {
    let mut args = vec!["call", dbus::BUS_NAME, dbus::OBJECT_PATH, dbus::INTERFACE];
    args.extend_from_slice(method);
    busctl(bus, who, &args)
}

/// The same call through `dbus-send`, which prints the error's message (busctl prints only a
/// summary of the name): the tests tell the bus's denial from the service's by it.
fn send(bus: &Bus, who: Who, method: &[&str]) -> Output {
    let dbus_send = require_tool("dbus-send", "dbus-bin");
    let mut c = command(who, &dbus_send);
    c.arg(format!("--bus={}", bus.address))
        .arg("--print-reply")
        .arg(format!("--dest={}", dbus::BUS_NAME))
        .arg(dbus::OBJECT_PATH)
        .arg(format!("{}.{}", dbus::INTERFACE, method[0]));
    for pair in method[1..].chunks(2) {
        let kind = match pair[0] {
            "t" => "uint64",
            "x" => "int64",
            "b" => "boolean",
            other => panic!("no dbus-send type for {other}"),
        };
        c.arg(format!("{kind}:{}", pair[1]));
    }
    c.output().unwrap()
}

fn agent_cli(bus_address: &str, who: Who, args: &[&str]) -> Output {
    command(who, Path::new(env!("CARGO_BIN_EXE_update-agent")))
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus_address)
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn get_property(bus: &Bus, who: Who, name: &str) -> String {
    let out = busctl(
        bus,
        who,
        &[
            "get-property",
            dbus::BUS_NAME,
            dbus::OBJECT_PATH,
            dbus::INTERFACE,
            name,
        ],
    );
    assert!(
        out.status.success(),
        "get-property {name}: {}",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

const POLICY_WINDOW_MANUAL: &str = r#"windows = ["02:00-04:00"]
time_zone = "UTC"
reboot = "manual"
max_postpone = 604800
disruption_notice = 300"#;

#[test]
fn mutating_calls_need_root_or_the_admin_group_at_the_bus_while_reading_is_open() {
    let bus = Bus::start(BusPolicy::Project);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let service = Service::start(&bus, &device);

    // Root: every call reaches the service. InstallNow with nothing pending is the engine's
    // refusal, not an access denial.
    for method in MUTATING {
        let out = call(&bus, Who::Root, method);
        let stderr = text(&out.stderr);
        if method[0] == "InstallNow" {
            assert!(stderr.contains("nothing-pending"), "{method:?}: {stderr}");
        } else {
            assert!(out.status.success(), "{method:?} as root: {stderr}");
        }
    }
    service.wait_state("auto install on", |s| s.auto_install);

    // nobody: the bus refuses every mutating method before the service sees it (busctl says
    // "Access denied"; dbus-send shows the bus's own message).
    for method in MUTATING {
        let out = call(&bus, Who::Nobody, method);
        assert!(!out.status.success(), "{method:?} as nobody succeeded");
        assert!(
            text(&out.stderr).contains("Access denied"),
            "{}",
            text(&out.stderr)
        );
        let out = send(&bus, Who::Nobody, method);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{method:?} as nobody succeeded");
        assert!(
            stderr.contains("org.freedesktop.DBus.Error.AccessDenied")
                && stderr.contains("Rejected send message"),
            "{method:?} as nobody: {stderr}"
        );
    }
    // Setting a property is mutating too (and none is writable).
    let out = busctl(
        &bus,
        Who::Nobody,
        &[
            "set-property",
            dbus::BUS_NAME,
            dbus::OBJECT_PATH,
            dbus::INTERFACE,
            "AutoInstall",
            "b",
            "false",
        ],
    );
    assert!(!out.status.success());

    // Reading is open: properties, introspection, the CLI's status.
    assert_eq!(
        get_property(&bus, Who::Nobody, "Model"),
        "s \"Test Gateway 1\""
    );
    assert_eq!(get_property(&bus, Who::Nobody, "AutoInstall"), "b true");
    let out = busctl(
        &bus,
        Who::Nobody,
        &["introspect", dbus::BUS_NAME, dbus::OBJECT_PATH],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = agent_cli(&bus.address, Who::Nobody, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["booted_slot"], "A");
    assert_eq!(status["support_end"], "2031-12-31");

    // A member of the admin group passes both layers.
    let out = call(&bus, Who::NobodyInGroup, &["SetAutoInstall", "b", "false"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    service.wait_state("auto install off", |s| !s.auto_install);
}

#[test]
fn the_service_denies_nobody_itself_when_the_bus_policy_lets_everyone_through() {
    let bus = Bus::start(BusPolicy::Permissive);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let service = Service::start(&bus, &device);
    for method in MUTATING {
        let out = send(&bus, Who::Nobody, method);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{method:?} as nobody succeeded");
        assert!(
            stderr.contains("org.freedesktop.DBus.Error.AccessDenied")
                && stderr
                    .contains("update-agent: changing updates needs root or members of group adm"),
            "{method:?}: the service's own answer expected, got: {stderr}"
        );
    }
    // Nothing changed: no user decision was recorded.
    let decisions = device
        .events()
        .into_iter()
        .filter(|e| e["state"] != "refused")
        .count();
    assert_eq!(decisions, 0);
    // The error name is the standard one, for any client.
    let out = agent_cli(&bus.address, Who::Nobody, &["auto", "off", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["error"], "access-denied");
    // The group passes the service's check too (groups from the bus's credentials).
    let out = call(&bus, Who::NobodyInGroup, &["SetAutoInstall", "b", "false"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    service.wait_state("auto install off", |s| !s.auto_install);
}

/// MarkGood and MarkBad answer after the bootloader ran: success once the change is made, and
/// a refusal with the reason when it failed (here the environment file became a directory).
#[test]
fn mark_good_and_bad_answer_with_the_bootloaders_result() {
    let bus = Bus::start(BusPolicy::Project);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let service = Service::start(&bus, &device);
    let bootenv = device.dir.path().join("bootenv");
    let out = send(&bus, Who::Root, &["MarkBad"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Answered after the change: the file already says so when the caller has its answer.
    let env = fs::read_to_string(&bootenv).unwrap();
    assert!(env.contains("BOOT_ORDER=A\n"), "{env}");
    assert_eq!(device.events().last().unwrap()["state"], "marked-bad");

    fs::remove_file(&bootenv).unwrap();
    fs::create_dir(&bootenv).unwrap();
    let out = send(&bus, Who::Root, &["MarkGood"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(dbus::ERROR_REFUSED) && stderr.contains("bootloader-failed: "),
        "{stderr}"
    );
    let last = device.events().last().unwrap().clone();
    assert_eq!(
        (last["state"].as_str(), last["reason"].as_str()),
        (Some("marked-good"), Some("bootloader-failed"))
    );
    service.wait_state("the failure as last error", |s| {
        s.last_error.0 == "bootloader-failed"
    });
}

#[test]
fn busctl_introspects_reads_properties_and_postpones_with_clamping() {
    let bus = Bus::start(BusPolicy::Project);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let _service = Service::start(&bus, &device);
    let out = busctl(
        &bus,
        Who::Root,
        &[
            "introspect",
            dbus::BUS_NAME,
            dbus::OBJECT_PATH,
            dbus::INTERFACE,
        ],
    );
    let listing = text(&out.stdout);
    for member in [
        ".Postpone",
        ".PostponeUntil",
        ".Resume",
        ".SetAutoInstall",
        ".InstallNow",
        ".CheckNow",
        ".MarkGood",
        ".MarkBad",
        ".State",
        ".Progress",
        ".PendingAdvisory",
        ".PostponedUntil",
        ".LastError",
        ".SupportEnd",
        ".UpdateAvailable",
        ".DisruptionAhead",
        ".Completed",
    ] {
        assert!(
            listing.contains(member),
            "{member} missing from:\n{listing}"
        );
    }
    assert_eq!(
        get_property(&bus, Who::Root, "SupportEnd"),
        "s \"2031-12-31\""
    );
    assert_eq!(get_property(&bus, Who::Root, "State"), "s \"idle\"");
    // 30 days asked, 7 days (max_postpone) given.
    let out = call(&bus, Who::Root, &["Postpone", "t", "2592000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let expected = ts(T0).as_second() + 7 * 86400;
    assert_eq!(
        text(&out.stdout).trim(),
        format!("xs {expected} \"max-postpone\"")
    );
    assert_eq!(
        get_property(&bus, Who::Root, "PostponedUntil"),
        format!("x {expected}")
    );
}

#[test]
fn the_cli_talks_to_the_running_agent_and_says_clearly_what_went_wrong() {
    let bus = Bus::start(BusPolicy::Project);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let service = Service::start(&bus, &device);
    let ok = |args: &[&str]| {
        let out = agent_cli(&bus.address, Who::Root, args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    assert_eq!(
        ok(&["postpone", "4h"]).trim(),
        "postponed until 2026-06-01T16:00:00Z"
    );
    assert_eq!(
        ok(&["postpone", "30d"]).trim(),
        "postponement clamped to 2026-06-08T12:00:00Z (the longest postponement allowed)"
    );
    let answer: serde_json::Value = serde_json::from_str(&ok(&[
        "postpone",
        "--until",
        "2026-06-02T00:00:00+02:00",
        "--json",
    ]))
    .unwrap();
    assert_eq!(answer["postponed_until"], "2026-06-01T22:00:00Z");
    assert!(answer["clamped"].is_null());
    ok(&["resume"]);
    ok(&["auto", "off"]);
    ok(&["check", "--json"]);
    service.wait_state("auto off, not postponed", |s| {
        !s.auto_install && s.postponed_until == 0
    });
    let status: serde_json::Value = serde_json::from_str(&ok(&["status", "--json"])).unwrap();
    assert_eq!(status["auto_install"], false);
    assert_eq!(status["model"], "Test Gateway 1");

    // Refused by the engine: exit 1 with the reason code.
    let out = agent_cli(&bus.address, Who::Root, &["install-now"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused: nothing-pending"),
        "{}",
        text(&out.stderr)
    );
    // Denied: exit 2, and what to do about it.
    let out = agent_cli(&bus.address, Who::Nobody, &["postpone", "4h"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: access denied:"), "{stderr}");
    assert!(
        stderr.contains("Run it as root or as a member of the admin group"),
        "{stderr}"
    );
    // Every user decision above is an event for the operators.
    let states: Vec<String> = device
        .events()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states,
        [
            "postponed",
            "postponed",
            "postponed",
            "resumed",
            "auto-install-disabled",
            "check-requested"
        ]
    );

    // No agent on the bus: `status` falls back to the state on disk, with a note; the other
    // commands say the agent is not running.
    drop(service);
    let out = agent_cli(
        &bus.address,
        Who::Root,
        &["status", "--config", device.config.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the update agent is not running; showing the state on disk")
    );
    assert!(text(&out.stdout).contains("booted slot:  A"));
    let out = agent_cli("unix:path=/nonexistent/bus", Who::Root, &["postpone", "4h"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("the update agent is not running"),
        "{}",
        text(&out.stderr)
    );
}

/// What a D-Bus client saw, in order: signals and `State` changes, each with the wall-clock
/// time it arrived.
type Seen = Arc<Mutex<Vec<(std::time::SystemTime, String)>>>;

fn seen_lines(seen: &Seen) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, l)| l.clone())
        .collect()
}

fn watch_signals(bus: &Bus) -> (Seen, mpsc::Sender<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, mut stop) = mpsc::channel::<()>(1);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let log = seen.clone();
    let address = bus.address.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let conn = zbus::connection::Builder::address(address.as_str())
                .build()
                .await
                .unwrap();
            let agent = dbus::client::proxy(&conn).await.unwrap();
            // The proxy's subscriptions add the match rules; one stream of every message the
            // connection receives keeps the order in which the service sent them.
            let _available = agent.receive_update_available().await.unwrap();
            let _disruption = agent.receive_disruption_ahead().await.unwrap();
            let _states = agent.receive_state_changed().await;
            let mut all = zbus::MessageStream::from(&conn);
            ready_tx.send(()).unwrap();
            let push = |line: String| {
                log.lock()
                    .unwrap()
                    .push((std::time::SystemTime::now(), line))
            };
            loop {
                let message = tokio::select! {
                    _ = stop.recv() => break,
                    Some(Ok(message)) = all.next() => message,
                };
                let header = message.header();
                let body = message.body();
                match header.member().map(|m| m.as_str()) {
                    Some("UpdateAvailable") => {
                        let (version, advisory, security, _, deadline): (String, String, bool, String, i64) =
                            body.deserialize().unwrap();
                        push(format!("UpdateAvailable {version} security={security} deadline={deadline} {advisory}"));
                    }
                    Some("DisruptionAhead") => {
                        let (seconds, postponable, downtime): (u64, bool, u64) = body.deserialize().unwrap();
                        push(format!("DisruptionAhead {seconds} postponable={postponable} downtime={downtime}"));
                    }
                    Some("PropertiesChanged") => {
                        let (_, changed, _): (String, std::collections::HashMap<String, zbus::zvariant::OwnedVariant>, Vec<String>) =
                            body.deserialize().unwrap();
                        if let Some(state) = changed.get("State") {
                            let state: String = state.try_clone().unwrap().try_into().unwrap();
                            push(format!("State {state}"));
                        }
                    }
                    _ => {}
                }
            }
        });
    });
    ready.recv_timeout(Duration::from_secs(20)).unwrap();
    (seen, stop_tx)
}

/// The issue's end-to-end without MQTT (the release is offered as the daemon will offer what
/// MQTT delivers; the operators' view is the event log the MQTT outbox will publish): a
/// security release arrives outside the maintenance window, the user postpones it over D-Bus,
/// injected time passes, it installs in the next window after the postponement, the reboot
/// (policy `manual`) is due at the signed deadline, the user is told 300 s before, and the
/// reboot is asked for.
#[test]
fn end_to_end_postponed_over_dbus_installs_as_time_passes_and_announces_the_reboot() {
    let bus = Bus::start(BusPolicy::Project);
    let device = Device::new(POLICY_WINDOW_MANUAL);
    let service = Service::start(&bus, &device);
    let (seen, stop_watching) = watch_signals(&bus);
    // What `update-agent status --follow --json` prints meanwhile, line by line.
    let follow = command(Who::Nobody, Path::new(env!("CARGO_BIN_EXE_update-agent")))
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .args(["status", "--follow", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Ended by its pid if an assertion fails first: left running, it would hold the test
    // harness's output pipe open.
    let mut follow = KillOnDrop(Some(follow));
    let follow = follow.0.as_mut().unwrap();
    let followed = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let followed = followed.clone();
        let stdout = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                followed.lock().unwrap().push(line.unwrap());
            }
        })
    };
    // The first lines are the status and the properties' current values: subscribed.
    wait_for("status --follow to start", || {
        followed
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"state\":\"idle\"}"))
    });

    service.request(Request::Offer(device.release.clone()));
    let s = service.wait_state("pending", |s| s.state == "pending");
    assert_eq!(
        (s.pending_version.as_str(), s.waiting.as_str()),
        ("2.0", "window")
    );
    assert_eq!(s.pending_deadline, ts(DEADLINE).as_second());

    // The user postpones by a day, with the real CLI over the real bus.
    let out = agent_cli(&bus.address, Who::Root, &["postpone", "24h", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["postponed_until"], "2026-06-02T12:00:00Z");
    let postponed = device
        .events()
        .into_iter()
        .rfind(|e| e["state"] == "postponed")
        .unwrap();
    assert_eq!(postponed["until"], "2026-06-02T12:00:00Z");
    assert_eq!(postponed["to_version"], "2.0");
    service.wait_state("waiting for the postponement", |s| s.waiting == "postponed");

    // The night's window passes while postponed; then the postponement ends outside a window.
    service.set_time("2026-06-02T02:30:00Z");
    service.set_time("2026-06-02T12:00:00Z");
    service.wait_state("waiting for the window", |s| s.waiting == "window");
    assert!(!device.events().iter().any(|e| e["state"] == "writing"));

    // The next window: the install runs, and the reboot waits for the deadline (manual policy,
    // security release).
    service.set_time("2026-06-03T02:00:00Z");
    let s = service.wait_state("reboot scheduled", |s| s.state == "reboot-scheduled");
    assert_eq!(s.reboot_at, ts(DEADLINE).as_second());
    assert_eq!(
        get_property(&bus, Who::Nobody, "RebootAt"),
        format!("x {}", ts(DEADLINE).as_second())
    );

    // 300 s before the deadline the user is told; at the deadline the reboot is asked for.
    service.set_time("2026-06-04T11:55:00Z");
    wait_for("the disruption notice", || {
        seen_lines(&seen)
            .iter()
            .any(|l| l.starts_with("DisruptionAhead 300"))
    });
    assert_eq!(service.stop(), None, "no reboot before the deadline");
    service.set_time(DEADLINE);
    service.wait_state("reboot pending", |s| s.state == "reboot-pending");
    wait_for("the reboot request", || service.stop().is_some());
    assert!(matches!(service.stop(), Some(Stop::RebootNeeded { ref slot }) if slot == "B"));
    wait_for("the client to see reboot-pending", || {
        seen_lines(&seen)
            .iter()
            .any(|l| l == "State reboot-pending")
    });
    let _ = stop_watching.blocking_send(());
    wait_for("status --follow to see the reboot notice", || {
        followed
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"seconds\":0"))
    });
    // Interrupted like a person would (Ctrl-C), by the pid of the child this test started.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follow.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert!(follow.wait().unwrap().success());
    reader.join().unwrap();
    let followed = followed.lock().unwrap().clone();
    for expected in [
        r#"{"update_available":{"advisory":"Fixes CVE-2026-0001 in the web UI.","deadline":"2026-06-04T12:00:00Z","security":true,"severity":"high","version":"2.0"}}"#,
        r#"{"postponed_until":"2026-06-02T12:00:00Z"}"#,
        r#"{"state":"writing"}"#,
        r#"{"progress":{"done":1048576,"total":1048576}}"#,
        r#"{"disruption_ahead":{"downtime_seconds":90,"postponable":false,"seconds":300}}"#,
        r#"{"state":"reboot-pending"}"#,
    ] {
        assert!(
            followed.iter().any(|l| l == expected),
            "{expected} not in {followed:#?}"
        );
    }

    let seen = seen_lines(&seen);
    let position = |prefix: &str| {
        seen.iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} not seen in {seen:#?}"))
    };
    assert!(seen[position("UpdateAvailable")].contains("security=true"));
    assert!(seen[position("UpdateAvailable")].contains("CVE-2026-0001"));
    assert_eq!(
        seen[position("DisruptionAhead 300")],
        "DisruptionAhead 300 postponable=false downtime=90"
    );
    assert!(
        position("DisruptionAhead 300") < position("State reboot-pending"),
        "{seen:#?}"
    );
    assert!(
        position("DisruptionAhead 0") < position("State reboot-pending"),
        "{seen:#?}"
    );
    let states: Vec<String> = device
        .events()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states,
        [
            "accepted",
            "pending",
            "postponed",
            "writing",
            "written",
            "activated",
            "reboot-scheduled",
            "rebooting"
        ]
    );
    let writing = device
        .events()
        .into_iter()
        .find(|e| e["state"] == "writing")
        .unwrap();
    assert_eq!(writing["at"], "2026-06-03T02:00:00Z");
}

/// The MQTT world of `tests/mqtt/` (mosquitto on a free port, a device on files, an image
/// server), for the end-to-end test of the daemon as a process.
#[allow(dead_code)]
#[path = "mqtt/harness.rs"]
mod mqtt;

/// Moves the daemon's test clock (`UPDATE_AGENT_TEST_CLOCK_FILE`): it reads the file at every
/// look at the time. Replaced atomically, so the daemon never reads half a time.
fn set_daemon_time(file: &Path, at: Timestamp) {
    let next = file.with_extension("next");
    fs::write(&next, at.to_string()).unwrap();
    fs::rename(&next, file).unwrap();
}

/// Everything around `update-agent run` as a process, with the D-Bus service on: mosquitto, a
/// device on files whose config has `[dbus] enabled` and the given `[policy]`, an image server
/// (`chunk_delay` between 256 KiB chunks), a signed security release of 2.0 with `deadline`,
/// the bus with the project's policy file, a subscriber to the events, and the daemon's test
/// clock at `t0`.
struct DaemonWorld {
    dir: tempfile::TempDir,
    _broker: mqtt::Mosquitto,
    _server: mqtt::ImageServer,
    client: mqtt::ClientArgs,
    device: mqtt::Device,
    bus: Bus,
    clock: PathBuf,
    sub: mqtt::Sub,
    events_topic: String,
    release: Vec<u8>,
}

impl DaemonWorld {
    fn start(policy: &str, chunk_delay: Duration, t0: Timestamp, deadline: Timestamp) -> Self {
        let dir = mqtt::test_dir();
        let broker = mqtt::Mosquitto::start(dir.path(), "allow_anonymous true");
        let client = mqtt::ClientArgs {
            port: broker.port,
            tls: None,
        };
        let signer = mqtt::Signer::new();
        let device = mqtt::Device::new(
            dir.path(),
            &signer,
            &format!("broker = \"mqtt://127.0.0.1:{}\"", broker.port),
        );
        let config = fs::read_to_string(&device.config).unwrap();
        let with_dbus = config.replace(
            "[dbus]\nenabled = false\n",
            &format!("[dbus]\nenabled = true\nadmin_group = \"{GROUP}\"\n"),
        );
        assert_ne!(
            with_dbus, config,
            "the harness config has no [dbus] section"
        );
        fs::write(&device.config, format!("{with_dbus}\n[policy]\n{policy}")).unwrap();
        let image_path = dir.path().join("rootfs-2.0.img");
        let image = mqtt::write_image(&image_path);
        let server = mqtt::ImageServer::start(image, chunk_delay);
        let release = signer.release_with_deadline("2.0", &image_path, &server.url, Some(deadline));
        let bus = Bus::start(BusPolicy::Project);
        let clock = dir.path().join("now");
        set_daemon_time(&clock, t0);
        let events_topic = mqtt::topic("events");
        let sub = mqtt::Sub::start(&client, &[&events_topic], None);
        DaemonWorld {
            dir,
            _broker: broker,
            _server: server,
            client,
            device,
            bus,
            clock,
            sub,
            events_topic,
            release,
        }
    }

    /// Starts the daemon as systemd would (`NOTIFY_SOCKET`) and waits for READY=1, which must
    /// come only once the daemon holds the name: the test asks the bus at that moment, over a
    /// connection it opened before.
    fn start_daemon(&mut self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let bus = runtime.block_on(async {
            let conn = zbus::connection::Builder::address(self.bus.address.as_str())
                .build()
                .await
                .unwrap();
            zbus::fdo::DBusProxy::new(&conn).await.unwrap()
        });
        let notify_path = self.dir.path().join("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        self.device.start_agent_with_env(&[
            ("DBUS_SYSTEM_BUS_ADDRESS", self.bus.address.as_ref()),
            ("UPDATE_AGENT_TEST_CLOCK_FILE", self.clock.as_os_str()),
            ("NOTIFY_SOCKET", notify_path.as_os_str()),
        ]);
        let mut buf = [0u8; 256];
        let n = notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no READY=1 ({e})\n{}", self.device.logs()));
        assert_eq!(&buf[..n], b"READY=1");
        let name = zbus::names::BusName::try_from(dbus::BUS_NAME).unwrap();
        let held = runtime.block_on(bus.name_has_owner(name)).unwrap();
        assert!(
            held,
            "READY=1 came before the daemon held {}",
            dbus::BUS_NAME
        );
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.sub.payloads(&self.events_topic)
    }
}

/// The issue's end-to-end, all real and all in processes: mosquitto, `dbus-daemon` with the
/// project's policy file, `update-agent run` hosting the D-Bus service, the CLI. A security
/// release is published retained on MQTT outside the maintenance window; the user postpones it
/// over D-Bus for longer than `max_postpone`; the operators see `postponed` with the clamped
/// time on MQTT; injected time passes (the daemon's test clock); the install runs in the next
/// window after the postponement; the reboot (policy `manual`) waits for the signed deadline,
/// and the user is told (DisruptionAhead) before the reboot command runs.
#[test]
fn end_to_end_over_mqtt_and_dbus_with_the_daemon_as_a_process() {
    let hour = jiff::SignedDuration::from_hours(1);
    // The manifest's `created` is the real now and its deadline must follow it: the injected
    // days start two days from today, at noon UTC.
    const DAY: i64 = 86_400;
    let day0 = (Timestamp::now().as_second() / DAY + 2) * DAY;
    let at = |days: i64, hh: i64| Timestamp::from_second(day0 + days * DAY + hh * 3600).unwrap();
    let t0 = at(0, 12);
    let deadline = at(3, 12);

    let policy = "windows = [\"02:00-04:00\"]\ntime_zone = \"UTC\"\nreboot = \"manual\"\n\
                  max_postpone = 86400\ndisruption_notice = 300\n";
    let mut world = DaemonWorld::start(policy, Duration::ZERO, t0, deadline);
    let (seen, stop_watching) = watch_signals(&world.bus);
    world.start_daemon();
    let DaemonWorld {
        dir,
        client,
        device,
        bus,
        clock,
        sub,
        events_topic,
        release,
        ..
    } = &mut world;
    let (client, bus, clock, sub, release) = (&*client, &*bus, &*clock, &*sub, &*release);
    let logs = |device: &mqtt::Device| device.logs();
    let events = || sub.payloads(events_topic);
    let event = |state: &str| events().into_iter().rfind(|e| e["state"] == state);

    mqtt::publish(client, &mqtt::fleet_topic(), release, true);
    let pending = mqtt::wait_for("pending on MQTT", Duration::from_secs(20), || {
        event("pending")
    });
    assert_eq!(pending["waiting"], "window", "{}", logs(device));
    assert_eq!(get_property(bus, Who::Nobody, "State"), "s \"pending\"");
    // Any local user sees what this configuration weakens (EN 303 645 §5.3): the test
    // device's plain MQTT and its writable anchor.
    let conformance = get_property(bus, Who::Nobody, "Conformance");
    assert!(
        conformance.starts_with("(ss) \"ETSI EN 303 645"),
        "{conformance}"
    );
    assert!(conformance.contains("5.3-10:plain-mqtt"), "{conformance}");
    assert!(
        conformance.contains("5.3-2:anchor-unprotected"),
        "{conformance}"
    );

    // The user asks for two days; max_postpone (a day) clamps it.
    let out = agent_cli(&bus.address, Who::Root, &["postpone", "48h", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let clamped_until = t0.checked_add(24 * hour).unwrap();
    assert_eq!(answer["postponed_until"], clamped_until.to_string());
    let postponed = mqtt::wait_for("postponed on MQTT", Duration::from_secs(20), || {
        event("postponed")
    });
    assert_eq!(postponed["until"], clamped_until.to_string());
    assert_eq!(postponed["clamped"], "max-postpone");
    assert_eq!(postponed["to_version"], "2.0");
    assert_eq!(postponed["at"], t0.to_string());

    // The night's window passes while postponed; the postponement ends outside a window.
    set_daemon_time(clock, at(1, 2) + jiff::SignedDuration::from_mins(30));
    set_daemon_time(clock, clamped_until);
    wait_for("waiting for the window", || {
        get_property(bus, Who::Nobody, "Waiting") == "s \"window\""
    });
    assert!(event("writing").is_none(), "{:#?}", events());

    // The next window: the install runs; the reboot waits for the deadline.
    set_daemon_time(clock, at(2, 2));
    let scheduled = mqtt::wait_for("reboot-scheduled on MQTT", Duration::from_secs(60), || {
        event("reboot-scheduled")
    });
    assert_eq!(scheduled["until"], deadline.to_string(), "{}", logs(device));
    set_daemon_time(clock, deadline - jiff::SignedDuration::from_mins(5));
    wait_for("the disruption notice", || {
        seen_lines(&seen)
            .iter()
            .any(|l| l.starts_with("DisruptionAhead 300"))
    });
    assert!(!device.reboot_requested(), "rebooted before the deadline");

    set_daemon_time(clock, deadline);
    mqtt::wait_for("the reboot command", Duration::from_secs(20), || {
        device.reboot_requested().then_some(())
    });
    let rebooted_at = fs::metadata(dir.path().join("reboot-requested"))
        .unwrap()
        .modified()
        .unwrap();
    let rebooting = mqtt::wait_for("rebooting on MQTT", Duration::from_secs(20), || {
        event("rebooting")
    });
    assert_eq!(rebooting["at"], deadline.to_string());
    let _ = stop_watching.blocking_send(());

    // Told before the disruption: both notices arrived before the reboot command ran (the
    // marker file's modification time is when `touch` ran).
    let seen = seen.lock().unwrap().clone();
    let arrived = |prefix: &str| {
        seen.iter()
            .find(|(_, l)| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} not seen in {seen:#?}"))
            .clone()
    };
    let (notice_300, line_300) = arrived("DisruptionAhead 300");
    assert_eq!(
        line_300,
        "DisruptionAhead 300 postponable=false downtime=30"
    );
    let (notice_0, _) = arrived("DisruptionAhead 0");
    assert!(notice_300 < notice_0);
    assert!(
        notice_0 <= rebooted_at,
        "DisruptionAhead 0 at {notice_0:?}, reboot command at {rebooted_at:?}"
    );
    assert!(
        arrived("UpdateAvailable 2.0 security=true")
            .1
            .contains("Fixes")
    );

    // The operators' record: one transaction, in order, with increasing sequence numbers.
    let events = events();
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "accepted",
            "pending",
            "postponed",
            "writing",
            "written",
            "activated",
            "reboot-scheduled",
            "rebooting"
        ],
        "{}",
        logs(device)
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(event("writing").unwrap()["at"], at(2, 2).to_string());
    device.stop_agent();
}

/// The daemon answers a D-Bus call while it writes a slot (taken between two steps of the
/// write), instead of after the write: the user's `postponed` lies between `writing` and
/// `written`, and the property shows it while the write still runs.
#[test]
fn the_daemon_answers_a_call_during_a_slot_write() {
    const DAY: i64 = 86_400;
    let t0 = Timestamp::from_second((Timestamp::now().as_second() / DAY + 2) * DAY).unwrap();
    let deadline = t0
        .checked_add(jiff::SignedDuration::from_hours(72))
        .unwrap();
    // 6 MiB in 256 KiB chunks, 150 ms apart: the write takes about 3.6 s.
    let mut world = DaemonWorld::start(
        "reboot = \"manual\"\n",
        Duration::from_millis(150),
        t0,
        deadline,
    );
    world.start_daemon();
    mqtt::publish(&world.client, &mqtt::fleet_topic(), &world.release, true);
    mqtt::wait_for("writing on MQTT", Duration::from_secs(20), || {
        world
            .events()
            .iter()
            .any(|e| e["state"] == "writing")
            .then_some(())
    });
    let asked = Instant::now();
    let out = agent_cli(&world.bus.address, Who::Root, &["postpone", "1h", "--json"]);
    let answered_in = asked.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let until = t0.checked_add(jiff::SignedDuration::from_hours(1)).unwrap();
    assert_eq!(
        get_property(&world.bus, Who::Nobody, "PostponedUntil"),
        format!("x {}", until.as_second())
    );
    assert_eq!(
        get_property(&world.bus, Who::Nobody, "State"),
        "s \"writing\"",
        "the write ended before the answer came ({answered_in:?})"
    );
    let events = mqtt::wait_for("reboot-scheduled on MQTT", Duration::from_secs(30), || {
        let events = world.events();
        events
            .iter()
            .any(|e| e["state"] == "reboot-scheduled")
            .then_some(events)
    });
    let seq_of = |state: &str| {
        events
            .iter()
            .find(|e| e["state"] == state)
            .unwrap_or_else(|| panic!("no {state} in {events:#?}"))["seq"]
            .as_u64()
            .unwrap()
    };
    assert!(
        seq_of("writing") < seq_of("postponed") && seq_of("postponed") < seq_of("written"),
        "{events:#?}"
    );
    assert!(
        answered_in < Duration::from_secs(2),
        "answered after {answered_in:?}"
    );

    // CheckNow: recorded for the operators, and the retained release is read (and verified)
    // again; the engine knows it already.
    let out = agent_cli(&world.bus.address, Who::Root, &["check", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    mqtt::wait_for("check-requested on MQTT", Duration::from_secs(20), || {
        world
            .events()
            .iter()
            .any(|e| e["state"] == "check-requested")
            .then_some(())
    });
    mqtt::wait_for("the release read again", Duration::from_secs(20), || {
        (world
            .device
            .logs()
            .matches("fleet release 2.0 verified")
            .count()
            == 2)
            .then_some(())
    });
    world.device.stop_agent();
}

/// With the service on and no bus, the daemon stops at once and says what to do, instead of
/// running with a user who cannot be told of updates.
#[test]
fn the_daemon_stops_with_a_clear_error_when_the_service_is_on_and_the_bus_is_unreachable() {
    let dir = mqtt::test_dir();
    let broker = mqtt::Mosquitto::start(dir.path(), "allow_anonymous true");
    let device = mqtt::Device::new(
        dir.path(),
        &mqtt::Signer::new(),
        &format!("broker = \"mqtt://127.0.0.1:{}\"", broker.port),
    );
    let config = fs::read_to_string(&device.config).unwrap();
    fs::write(
        &device.config,
        config.replace("[dbus]\nenabled = false\n", "[dbus]\nenabled = true\n"),
    )
    .unwrap();
    let missing = dir.path().join("no-bus");
    let out = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["run", "--log", "stderr", "--config"])
        .arg(&device.config)
        .env(
            "DBUS_SYSTEM_BUS_ADDRESS",
            format!("unix:path={}", missing.display()),
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("D-Bus: cannot connect to the system bus unix:path=")
            && stderr.contains("set enabled = false"),
        "{stderr}"
    );
}
