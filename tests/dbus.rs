//! The D-Bus service against a real `dbus-daemon` that this test starts on a socket in a
//! temporary directory, with a bus configuration that includes the project's policy file
//! (`systemd/dbus/org.updateagent.Agent1.conf`, its group set to `adm`). Callers are the real
//! `busctl` and the real `update-agent` binary, as root and as `nobody` (through `setpriv`).
//! Most tests host the service in this process on a fake clock (the daemon's own loop without a
//! broker, `daemon::fed::Fed`), so time is injected, never waited for; the last ones run the daemon,
//! `update-agent run`, as a process with a mosquitto of their own and move its test clock
//! (`UPDATE_AGENT_TEST_CLOCK_FILE`). The device is a simulated gateway (`update_agent::sim`) with
//! D-Bus on; the bus is `sim::bus::Bus`.
//!
//! Must run as root (it switches to `nobody`); CI does. Needs `dbus` (dbus-daemon, and
//! dbus-send from dbus-bin), `systemd` (busctl) and `util-linux` (setpriv).

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sim::bus::{Bus, BusPolicy};
use common::sim::mqtt::{ClientArgs, Mosquitto, Sub};
use common::sim::{Act, GatewayBuilder, User, states};
use common::{Gateway, ImageServer, pattern, require, wait_for};
use futures_util::StreamExt;
use jiff::Timestamp;
use tokio::sync::mpsc;
use update_agent::agent::{Agent, RebootMode, Stop};
use update_agent::config::{Config, Policy};
use update_agent::daemon::fed::{Control, Fed, Request};
use update_agent::dbus::{self, Snapshot};
use update_agent::engine::RebootPolicy;

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
/// The events of a security release postponed by the user, installed in the next window and
/// rebooted at its deadline.
#[rustfmt::skip]
const POSTPONED_TO_THE_WINDOW: [&str; 8] = [
    "accepted", "pending", "postponed", "writing", "written", "activated", "reboot-scheduled",
    "rebooting",
];
/// How long a test waits for what it sees from outside the service (a property, a line).
const WAIT: Duration = Duration::from_secs(20);

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

/// A child process this test started, killed (by its pid) and reaped when the test ends early.
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

fn bus(policy: BusPolicy) -> Bus {
    Bus::start(policy, GROUP)
}

/// Updates between 02:00 and 04:00 UTC, reboots when the user says (or at the deadline),
/// postponements of up to `max_postpone` seconds, the user told 300 s before a reboot.
fn window_manual(max_postpone: u64) -> Policy {
    Policy {
        windows: vec!["02:00-04:00".parse().unwrap()],
        time_zone: Some(jiff::tz::TimeZone::get("UTC").unwrap()),
        reboot: RebootPolicy::Manual,
        max_postpone: Duration::from_secs(max_postpone),
        disruption_notice: Duration::from_secs(300),
        ..Policy::default()
    }
}

/// A gateway on files with the D-Bus service on for group `adm`: 1.0 in slot A, B empty.
fn gateway(policy: Policy) -> GatewayBuilder {
    let slot_size = 4 * 1024 * 1024;
    common::gateway()
        .compatible("test-gw")
        .slot_size(slot_size)
        .slot_contents(pattern(slot_size as usize, 1), Vec::new())
        .empty_b()
        .dbus(GROUP)
        .policy(policy)
        .configure(|c| {
            c.device.factory_version = Some("1.0".into());
            c.device.model = Some("Test Gateway 1".into());
            c.device.support_end = Some(jiff::civil::date(2031, 12, 31));
        })
}

/// A device and a signed security release of 2.0 (image by file://) with a deadline.
struct Device {
    gateway: Gateway,
    release: Vec<u8>,
}

derefs_to_gateway!(Device);
impl Device {
    fn new(policy: Policy) -> Device {
        let gateway = gateway(policy).build().unwrap();
        let image = pattern(1024 * 1024, 2);
        let path = gateway.path("rootfs-2.0.img");
        fs::write(&path, &image).unwrap();
        let release = gateway
            .release("2.0")
            .security_version(2)
            .created(ts("2026-05-01T00:00:00Z"))
            .deadline(ts(DEADLINE))
            .advisory("Fixes CVE-2026-0001 in the web UI.")
            .downtime(90)
            .image(&format!("file://{}", path.display()), &image)
            .sign();
        Device { gateway, release }
    }
}

/// A bus with `policy`, a device with updates in a night window and reboots when the user says
/// (postponements up to a week), and its service hosted here.
fn hosted(policy: BusPolicy) -> (Bus, Device, Service) {
    let bus = bus(policy);
    let device = Device::new(window_manual(604_800));
    let service = Service::start(&bus, &device);
    (bus, device, service)
}

/// The service on `bus`, hosted in this process on its own thread and runtime (the test's
/// thread blocks on `busctl` and the CLI), with a fake clock.
struct Service {
    clock: Arc<Mutex<Timestamp>>,
    control: Option<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    fn start(bus: &Bus, device: &Device) -> Service {
        let config = Config::load(device.config_path()).unwrap();
        let clock = Arc::new(Mutex::new(ts(T0)));
        let now = clock.clone();
        let agent = Agent::open(config, RebootMode::Defer)
            .unwrap()
            .with_clock(Arc::new(move || *now.lock().unwrap()));
        let (thread, control) = on_bus_thread(bus, async move |conn, ready| {
            let (fed, control) = Fed::start(agent, &conn).await.unwrap();
            ready.send(control).unwrap();
            fed.run().await.unwrap();
        });
        let service = Service {
            clock,
            control: Some(control),
            thread: Some(thread),
        };
        service.wait_state("the first boot", |s| s.booted_slot == "A");
        service
    }

    fn request(&self, request: Request) {
        self.control().requests.blocking_send(request).unwrap();
    }

    /// Moves the fake clock to `at` and lets the daemon's loop look at it.
    fn set_time(&self, at: &str) {
        *self.clock.lock().unwrap() = ts(at);
        self.request(Request::Tick);
    }

    fn control(&self) -> &Control {
        self.control.as_ref().unwrap()
    }

    fn wait_state(&self, what: &str, ready: impl Fn(&Snapshot) -> bool) -> Snapshot {
        let snapshots = &self.control().snapshots;
        wait_for(what, WAIT, || ready(&snapshots.borrow()));
        snapshots.borrow().clone()
    }

    fn stop(&self) -> Option<Stop> {
        self.control().stops.borrow().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Dropping the control ends the loop, then the thread.
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
    match who {
        Who::Root => User::Current,
        Who::Nobody => User::Nobody,
        Who::NobodyInGroup => User::NobodyInGroup(admin_gid()),
    }
    .command(program)
}

fn busctl(bus: &Bus, who: Who, args: &[&str]) -> Output {
    let busctl = require("busctl", "systemd");
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
    let dbus_send = require("dbus-send", "dbus-bin");
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

#[test]
fn mutating_calls_need_root_or_the_admin_group_at_the_bus_while_reading_is_open() {
    let (bus, _device, service) = hosted(BusPolicy::Project);

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
        assert_denied_to_nobody(&bus, method, "Rejected send message");
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

/// `method` sent by `nobody` fails with the standard AccessDenied error, saying `why`.
#[track_caller]
fn assert_denied_to_nobody(bus: &Bus, method: &[&str], why: &str) {
    let out = send(bus, Who::Nobody, method);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{method:?} as nobody succeeded");
    assert!(
        stderr.contains("org.freedesktop.DBus.Error.AccessDenied") && stderr.contains(why),
        "{method:?} as nobody: {stderr}"
    );
}

#[test]
fn the_service_denies_nobody_itself_when_the_bus_policy_lets_everyone_through() {
    let (bus, device, service) = hosted(BusPolicy::Permissive);
    for method in MUTATING {
        // The service's own answer.
        let why = "update-agent: changing updates needs root or members of group adm";
        assert_denied_to_nobody(&bus, method, why);
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
    let (bus, device, service) = hosted(BusPolicy::Project);
    let bootenv = device.env.file_path().to_owned();
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
    let (bus, _device, _service) = hosted(BusPolicy::Project);
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
        ".Downloaded",
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
    assert_eq!(get_property(&bus, Who::Root, "Downloaded"), "t 0");
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
    let (bus, device, service) = hosted(BusPolicy::Project);
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
    let states = states(&device.events());
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
        &["status", "--config", device.config_path().to_str().unwrap()],
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
    let log = seen.clone();
    on_bus_thread(bus, async move |conn, ready_tx| {
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
                    let (version, advisory, security, _, deadline): (
                        String,
                        String,
                        bool,
                        String,
                        i64,
                    ) = body.deserialize().unwrap();
                    push(format!(
                        "UpdateAvailable {version} security={security} deadline={deadline} {advisory}"
                    ));
                }
                Some("DisruptionAhead") => {
                    let (seconds, postponable, downtime): (u64, bool, u64) =
                        body.deserialize().unwrap();
                    push(format!(
                        "DisruptionAhead {seconds} postponable={postponable} downtime={downtime}"
                    ));
                }
                Some("PropertiesChanged") => {
                    let (_, changed, _): (
                        String,
                        std::collections::HashMap<String, zbus::zvariant::OwnedVariant>,
                        Vec<String>,
                    ) = body.deserialize().unwrap();
                    if let Some(state) = changed.get("State") {
                        let state: String = state.try_clone().unwrap().try_into().unwrap();
                        push(format!("State {state}"));
                    }
                }
                _ => {}
            }
        }
    });
    (seen, stop_tx)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(address: &str) -> zbus::Connection {
    zbus::connection::Builder::address(address)
        .build()
        .await
        .unwrap()
}

/// Runs `body` on a thread of its own with a connection to `bus`; returns once `body` said it
/// is ready, with what it said.
fn on_bus_thread<T: Send + 'static>(
    bus: &Bus,
    body: impl AsyncFnOnce(zbus::Connection, std::sync::mpsc::Sender<T>) + Send + 'static,
) -> (std::thread::JoinHandle<()>, T) {
    let address = bus.address.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        runtime().block_on(async move { body(connect(&address).await, ready_tx).await })
    });
    let said = ready.recv_timeout(Duration::from_secs(20)).unwrap();
    (thread, said)
}

/// The issue's end-to-end without MQTT (the release is offered as the daemon will offer what
/// MQTT delivers; the operators' view is the event log the MQTT outbox will publish): a
/// security release arrives outside the maintenance window, the user postpones it over D-Bus,
/// injected time passes, it installs in the next window after the postponement, the reboot
/// (policy `manual`) is due at the signed deadline, the user is told 300 s before, and the
/// reboot is asked for.
#[test]
fn end_to_end_postponed_over_dbus_installs_as_time_passes_and_announces_the_reboot() {
    let (bus, device, service) = hosted(BusPolicy::Project);
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
    let followed_any = |part: &str| followed.lock().unwrap().iter().any(|l| l.contains(part));
    // The first lines are the status and the properties' current values: subscribed.
    wait_for("status --follow to start", WAIT, || {
        followed_any("\"state\":\"idle\"}")
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
    let postponed = last_event(&device, "postponed");
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
    wait_for("the disruption notice", WAIT, || {
        seen_lines(&seen)
            .iter()
            .any(|l| l.starts_with("DisruptionAhead 300"))
    });
    assert_eq!(service.stop(), None, "no reboot before the deadline");
    service.set_time(DEADLINE);
    service.wait_state("reboot pending", |s| s.state == "reboot-pending");
    wait_for("the reboot request", WAIT, || service.stop().is_some());
    assert!(matches!(service.stop(), Some(Stop::RebootNeeded { ref slot }) if slot == "B"));
    wait_for("the client to see reboot-pending", WAIT, || {
        seen_lines(&seen)
            .iter()
            .any(|l| l == "State reboot-pending")
    });
    let _ = stop_watching.blocking_send(());
    wait_for("status --follow to see the reboot notice", WAIT, || {
        followed_any("\"seconds\":0")
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
    let states = states(&device.events());
    assert_eq!(states, POSTPONED_TO_THE_WINDOW);
    let writing = last_event(&device, "writing");
    assert_eq!(writing["at"], "2026-06-03T02:00:00Z");
}

/// Moves the daemon's test clock (`UPDATE_AGENT_TEST_CLOCK_FILE`): it reads the file at every
/// look at the time. Replaced atomically, so the daemon never reads half a time.
/// The last event in `state` the gateway's agent recorded; there must be one.
#[track_caller]
fn last_event(gateway: &Gateway, state: &str) -> serde_json::Value {
    let events = gateway.events();
    let found = events.iter().rfind(|e| e["state"] == state).cloned();
    found.unwrap_or_else(|| panic!("no {state:?} event in {events:#?}"))
}

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
    _broker: Mosquitto,
    _server: ImageServer,
    client: ClientArgs,
    device: Gateway,
    bus: Bus,
    clock: PathBuf,
    sub: Sub,
    events_topic: String,
    release: Vec<u8>,
}

impl DaemonWorld {
    fn start(policy: Policy, chunk_delay: Duration, t0: Timestamp, deadline: Timestamp) -> Self {
        let broker = Mosquitto::plain_temp();
        let client = broker.client();
        let slot_size = 8 * 1024 * 1024;
        let device = gateway(policy)
            .slot_size(slot_size)
            .mqtt(&broker.url())
            .build()
            .unwrap();
        let image = common::sim::text_pattern("rootfs 2.0 ", slot_size as usize * 3 / 4);
        let server = ImageServer::builder(image.clone())
            .route("/image.img", Act::Serve)
            .throttle(256 * 1024, chunk_delay)
            .start_background()
            .unwrap();
        let release = device
            .release("2.0")
            .security_version(2)
            .deadline(deadline)
            .image(&server.url("/image.img"), &image)
            .sign();
        let bus = bus(BusPolicy::Project);
        let clock = device.path("now");
        set_daemon_time(&clock, t0);
        let events_topic = device.topic("events");
        let sub = client.subscribe(&[&events_topic], None);
        DaemonWorld {
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
        let runtime = runtime();
        let bus = runtime.block_on(async {
            zbus::fdo::DBusProxy::new(&connect(&self.bus.address).await)
                .await
                .unwrap()
        });
        let notify_path = self.device.path("notify.sock");
        let _ = fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        self.device.start_daemon(&[
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

    let mut world = DaemonWorld::start(window_manual(86_400), Duration::ZERO, t0, deadline);
    let (seen, stop_watching) = watch_signals(&world.bus);
    world.start_daemon();
    let (bus, clock, device) = (&world.bus, &world.clock, &world.device);
    let event = |state: &str| world.events().into_iter().rfind(|e| e["state"] == state);

    world
        .client
        .publish(&device.fleet_topic(), &world.release, true);
    let pending = wait_for("pending on MQTT", WAIT, || event("pending"));
    assert_eq!(pending["waiting"], "window", "{}", device.logs());
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
    let postponed = wait_for("postponed on MQTT", WAIT, || event("postponed"));
    assert_eq!(postponed["until"], clamped_until.to_string());
    assert_eq!(postponed["clamped"], "max-postpone");
    assert_eq!(postponed["to_version"], "2.0");
    assert_eq!(postponed["at"], t0.to_string());

    // The night's window passes while postponed; the postponement ends outside a window.
    set_daemon_time(clock, at(1, 2) + jiff::SignedDuration::from_mins(30));
    set_daemon_time(clock, clamped_until);
    wait_for("waiting for the window", WAIT, || {
        get_property(bus, Who::Nobody, "Waiting") == "s \"window\""
    });
    assert!(event("writing").is_none(), "{:#?}", world.events());

    // The next window: the install runs; the reboot waits for the deadline.
    set_daemon_time(clock, at(2, 2));
    let scheduled = wait_for("reboot-scheduled on MQTT", Duration::from_secs(60), || {
        event("reboot-scheduled")
    });
    assert_eq!(
        scheduled["until"],
        deadline.to_string(),
        "{}",
        device.logs()
    );
    set_daemon_time(clock, deadline - jiff::SignedDuration::from_mins(5));
    wait_for("the disruption notice", WAIT, || {
        seen_lines(&seen)
            .iter()
            .any(|l| l.starts_with("DisruptionAhead 300"))
    });
    assert!(!device.reboot_requested(), "rebooted before the deadline");

    set_daemon_time(clock, deadline);
    wait_for("the reboot command", WAIT, || device.reboot_requested());
    let rebooted_at = fs::metadata(device.path("reboots"))
        .unwrap()
        .modified()
        .unwrap();
    let rebooting = wait_for("rebooting on MQTT", WAIT, || event("rebooting"));
    assert_eq!(rebooting["at"], deadline.to_string());
    let _ = stop_watching.blocking_send(());

    // Told before the disruption: both notices arrived before the reboot command ran (the
    // reboot log's modification time is when the reboot command ran).
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
    let events = world.events();
    let states = states(&events);
    assert_eq!(states, POSTPONED_TO_THE_WINDOW, "{}", device.logs());
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(event("writing").unwrap()["at"], at(2, 2).to_string());
    world.device.stop_daemon();
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
        Policy {
            reboot: RebootPolicy::Manual,
            ..Policy::default()
        },
        Duration::from_millis(150),
        t0,
        deadline,
    );
    world.start_daemon();
    world
        .client
        .publish(&world.device.fleet_topic(), &world.release, true);
    wait_for("writing on MQTT", WAIT, || {
        world.events().iter().any(|e| e["state"] == "writing")
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
    let events = wait_for("reboot-scheduled on MQTT", Duration::from_secs(30), || {
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
    wait_for("check-requested on MQTT", WAIT, || {
        world
            .events()
            .iter()
            .any(|e| e["state"] == "check-requested")
    });
    wait_for("the release read again", WAIT, || {
        let logs = world.device.logs();
        logs.matches("fleet release 2.0 verified").count() == 2
    });
    world.device.stop_daemon();
}

/// With the service on and no bus, the daemon stops at once and says what to do, instead of
/// running with a user who cannot be told of updates.
#[test]
fn the_daemon_stops_with_a_clear_error_when_the_service_is_on_and_the_bus_is_unreachable() {
    let broker = Mosquitto::plain_temp();
    let device = gateway(Policy::default())
        .mqtt(&broker.url())
        .build()
        .unwrap();
    let missing = device.path("no-bus");
    let out = device
        .command(&["run", "--log", "stderr"])
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
