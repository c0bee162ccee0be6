//! `update-agent run` against a real mosquitto (Debian's `mosquitto` and `mosquitto-clients`):
//! plain and mutual-TLS connections under an ACL, the whole update cycle over MQTT, a broker
//! outage in the middle of an install, and hostile input. Each test starts its own broker on a
//! free loopback port and stops it by PID; the device is a simulated gateway
//! (`update_agent::sim`) whose agent runs as a child process. `UPDATE_AGENT_SIM_KEEP=1` keeps
//! its directory (config, state, daemon logs) for a post-mortem.

#[path = "../common/mod.rs"]
mod common;
mod rollout;
mod v311;
mod withdrawal;

use std::fs;
use std::time::Duration;

use common::mqtt_state::committed_state;
use common::sim::mqtt::{ClientArgs, Mosquitto, Sub};
use common::sim::states;
use common::sim::{Act, GatewayBuilder, tamper};
use common::{COMMITTED, Gateway, ImageServer, ROLLED_BACK, assert_exit, require, wait_for};
use serde_json::Value;
use update_agent::mqtt::Protocol;

const COMPATIBLE: &str = "test-gw";
const DEVICE: &str = common::sim::gateway::DEVICE_ID;
const PREFIX: &str = update_agent::mqtt::topics::DEFAULT_PREFIX;
const SLOT_SIZE: u64 = 8 * 1024 * 1024;
/// The events of an update that commits, up to the reboot request.
const UP_TO_THE_REBOOT: &[&str] = COMMITTED.split_at(5).0;

/// A gateway fresh from the factory on MQTT to `broker`: 1.0 in slot A, nothing in B.
fn device(broker: &str) -> GatewayBuilder {
    common::gateway()
        .compatible(COMPATIBLE)
        .slot_size(SLOT_SIZE)
        .slot_contents(vec![0xa5; SLOT_SIZE as usize], Vec::new())
        .empty_b()
        .mqtt(broker)
        .configure(|c| {
            c.device.factory_version = Some("1.0".into());
            c.device.model = Some("Test Gateway".into());
            c.device.support_end = Some(jiff::civil::date(2031, 12, 31));
        })
}

/// A broker for anonymous plain-TCP clients, and the operators' client of it.
fn plain_broker() -> (Mosquitto, ClientArgs) {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    (broker, client)
}

fn plain_device(broker: &Mosquitto) -> Gateway {
    device(&broker.url()).build().unwrap()
}

/// The image of release 2.0: three quarters of a slot.
fn image() -> Vec<u8> {
    common::sim::text_pattern("rootfs 2.0 ", (SLOT_SIZE * 3 / 4) as usize)
}

/// `image` at `/image.img` on a loopback server, `pause` after each 256 KiB (so that an install
/// takes long enough to interrupt).
fn serve(image: &[u8], pause: Duration) -> (ImageServer, String) {
    let server = ImageServer::builder(image.to_vec())
        .route("/image.img", Act::Serve)
        .throttle(256 * 1024, pause)
        .start_background()
        .unwrap();
    let url = server.url("/image.img");
    (server, url)
}

/// Release 2.0 of `image` at `url` (security version 2), signed by the device's key.
fn release(device: &Gateway, image: &[u8], url: &str) -> Vec<u8> {
    device
        .release("2.0")
        .security_version(2)
        .image(url, image)
        .sign()
}

fn state(device: &Gateway, client: &ClientArgs) -> Value {
    client.retained_json(&device.topic("state"))
}

/// Starts the daemon with `client` subscribed to its `leaf` topic and `online`; returns once the
/// daemon says it is online.
fn start_online(device: &mut Gateway, client: &ClientArgs, leaf: &str) -> Sub {
    let online = device.topic("online");
    let sub = client.subscribe(&[&device.topic(leaf), &online], None);
    device.start_daemon(&[]);
    sub.wait_raw(&online, "true", Duration::from_secs(10));
    sub
}

/// Publishes `release` retained on the fleet topic, starts the daemon with `client` subscribed to
/// its events, and returns them up to the reboot request.
fn fleet_install_until_reboot(
    device: &mut Gateway,
    client: &ClientArgs,
    release: &[u8],
) -> Vec<Value> {
    client.publish(&device.fleet_topic(), release, true);
    let sub = client.subscribe(&[&device.topic("events")], None);
    device.start_daemon(&[]);
    sub.events_until(
        &device.topic("events"),
        "rebooting",
        Duration::from_secs(20),
    )
}

/// Stops the daemon as systemd does: it says itself, at once, that it is offline.
#[track_caller]
fn stop_and_see_offline(device: &mut Gateway, client: &ClientArgs) {
    assert!(device.stop_daemon().success(), "{}", device.logs());
    let online = client.retained(&device.topic("online"));
    assert_eq!(online.as_deref(), Some("false"));
}

#[test]
fn connects_over_plain_tcp_and_publishes_online_and_state_and_the_will_on_a_crash() {
    let (broker, client) = plain_broker();
    let mut device = plain_device(&broker);
    let sub = start_online(&mut device, &client, "state");
    let state = wait_for("a state document", Duration::from_secs(5), || {
        sub.payloads(&device.topic("state")).pop()
    });
    assert_eq!(state["device"], DEVICE);
    assert_eq!(state["version"], "1.0");
    assert_eq!(state["booted_slot"], "A");
    assert_eq!(state["state"], "idle");
    assert_eq!(state["model"], "Test Gateway");
    assert_eq!(state["support_end"], "2031-12-31");
    assert_eq!(state["policy"]["auto_install"], true);
    // What this build and configuration weaken (EN 303 645 §5.3), for the fleet: the test
    // device's plain MQTT, its writable anchor (allowed by its config) and no D-Bus service.
    let conformance = &state["conformance"];
    assert_eq!(
        conformance["weakened"],
        serde_json::json!(["5.3-10"]),
        "{conformance}"
    );
    assert_eq!(
        conformance["not_met"],
        serde_json::json!(["5.3-2", "5.3-6", "5.3-11", "5.3-12"]),
        "{conformance}"
    );
    let findings = conformance["findings"].to_string();
    assert!(findings.contains("5.3-10:plain-mqtt"), "{findings}");
    assert!(findings.contains("5.3-2:anchor-unprotected"), "{findings}");
    // The check for updates (the broker sent the retained releases) is recorded with its time.
    let last_check = device.dir().join("state/last-check");
    let checked: jiff::Timestamp = wait_for("the recorded check", Duration::from_secs(5), || {
        fs::read_to_string(&last_check).ok()?.trim().parse().ok()
    });
    assert!(jiff::Timestamp::now().duration_since(checked) < jiff::SignedDuration::from_secs(60));

    // A crash leaves the broker to say it: the last will, retained.
    device.kill_daemon();
    wait_for(
        "the last will (online=false)",
        Duration::from_secs(20),
        || client.retained(&device.topic("online")).as_deref() == Some("false"),
    );

    // A clean stop says it itself, at once.
    device.start_daemon(&[]);
    wait_for("online=true again", Duration::from_secs(10), || {
        client.retained(&device.topic("online")).as_deref() == Some("true")
    });
    stop_and_see_offline(&mut device, &client);
}

#[test]
fn whole_cycle_over_mqtt_retained_release_to_commit() {
    whole_cycle(Protocol::V5);
}

/// `update-agent ARGS` as the operator runs it against `broker`, speaking `protocol`.
fn tool(broker: &Mosquitto, protocol: Protocol, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"));
    command
        .args(args)
        .args(["--protocol", protocol.as_str(), "--broker", &broker.url()]);
    command
}

/// The whole cycle with the agent and the operator's tools speaking `protocol`.
fn whole_cycle(protocol: Protocol) {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let mut device = device(&broker.url())
        .configure(move |c| c.mqtt.as_mut().unwrap().protocol = protocol)
        .build()
        .unwrap();
    let image = image();
    let (_server, url) = serve(&image, Duration::ZERO);
    // The operator publishes before the device is even up: the retained message waits.
    let release_file = device.path("release.json");
    fs::write(&release_file, release(&device, &image, &url)).unwrap();
    let release_file = release_file.to_str().unwrap();
    let out = tool(&broker, protocol, &["release", "publish"])
        .args(["--fleet", COMPATIBLE, release_file])
        .output()
        .unwrap();
    assert_exit(&out, 0, "update-agent");
    let sub = client.subscribe(&[&device.topic("events")], None);
    // The operator's monitor, as a JSON event stream.
    let monitor_args = ["monitor", "--json", "--count", "7", "--timeout", "60"];
    let monitor = tool(&broker, protocol, &monitor_args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    device.start_daemon(&[]);
    wait_for("the reboot request", Duration::from_secs(30), || {
        device.reboot_requested()
    });
    assert_eq!(device.reboot(), "B");
    device.start_daemon(&[]);
    let events = sub.events_until(
        &device.topic("events"),
        "committed",
        Duration::from_secs(20),
    );
    assert_eq!(states(&events), COMMITTED, "{}", device.logs());
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    let connected = format!("connected to {} (MQTT {})", broker.url(), protocol.as_str());
    assert!(device.logs().contains(&connected), "{}", device.logs());
    let txn = &events[0]["txn"];
    assert!(events.iter().all(|e| &e["txn"] == txn));
    assert!(
        events
            .iter()
            .all(|e| e["at"].as_str().unwrap().ends_with('Z'))
    );
    assert_eq!(events[6]["to_version"], "2.0");
    assert_eq!(events[6]["from_version"], "1.0");

    let state = committed_state(&device, &client, "2.0", "B");
    assert_eq!(state["policy"]["floor"], 2);
    assert!(device.slot("B").starts_with(&image));

    let out = monitor.wait_with_output().unwrap();
    assert!(out.status.success());
    let streamed: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(states(&streamed), states(&events));
    assert!(streamed.iter().all(|e| e["device"] == DEVICE));
    // And as a table, one line per device, from the retained topics.
    let out = tool(&broker, protocol, &["monitor", "--once", "--devices"])
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with(DEVICE)).expect(&table);
    for cell in ["2.0", "idle", "#6 committed", "yes"] {
        assert!(row.contains(cell), "{cell} missing in {table}");
    }
    // The fleet at a glance: counts per version and state.
    let out = tool(&broker, protocol, &["monitor", "--once"])
        .output()
        .unwrap();
    let view = String::from_utf8(out.stdout).unwrap();
    assert!(view.contains("1 device: 1 online"), "{view}");
    let row = view
        .lines()
        .find(|l| l.trim_start().starts_with("2.0"))
        .expect(&view);
    assert!(
        row.contains("idle") && row.trim_end().ends_with('1'),
        "{view}"
    );

    // The retained release came again with the new connection: recognised, nothing happens.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sub.payloads(&device.topic("events")).len(), 7);
    assert_eq!(device.outbox_files(), 1, "only meta.json is left");
    assert!(device.stop_daemon().success());

    // A restarted daemon records nothing new: the last event it publishes is still the
    // commit, from the event log.
    let before = state["updated"].clone();
    device.start_daemon(&[]);
    let restarted = wait_for(
        "the restarted daemon's state",
        Duration::from_secs(10),
        || {
            let state = self::state(&device, &client);
            (state["updated"] != before).then_some(state)
        },
    );
    assert_eq!(restarted["last_event"]["state"], "committed", "{restarted}");
    assert_eq!(restarted["last_event"]["seq"], 6, "{restarted}");
    assert!(device.stop_daemon().success());
}

#[test]
fn broker_outage_and_agent_restart_mid_install_lose_no_event() {
    let (mut broker, client) = plain_broker();
    let mut device = plain_device(&broker);
    // 6 MiB at 256 KiB per 60 ms: about 1.5 s of writing, long enough to cut into.
    let (_server, url) = serve(&image(), Duration::from_millis(60));
    let release = release(&device, &image(), &url);
    client.publish(&device.topic("release"), &release, true);
    // A persistent session: what is published while it is away is kept for it.
    let sub = client.subscribe(&[&device.topic("events")], Some("observer"));

    device.start_daemon(&[]);
    sub.events_until(&device.topic("events"), "writing", Duration::from_secs(10));
    broker.stop();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!device.reboot_requested(), "the install finished too soon");
    device.kill_daemon();
    // Restarted while the broker is down: it resumes the install and asks for the reboot; the
    // events wait in the outbox.
    device.start_daemon(&[]);
    wait_for("the reboot request", Duration::from_secs(30), || {
        device.reboot_requested()
    });
    assert!(device.outbox_files() > 1, "events wait in the outbox");
    broker.resume();
    let events = sub.events_until(
        &device.topic("events"),
        "rebooting",
        Duration::from_secs(20),
    );
    // At least once, each with its sequence number; none missing.
    let mut by_seq = std::collections::BTreeMap::new();
    for event in &events {
        by_seq.insert(event["seq"].as_u64().unwrap(), event["state"].clone());
    }
    let seqs: Vec<u64> = by_seq.keys().copied().collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "{events:?}"
    );
    let unique: Vec<&str> = by_seq.values().map(|s| s.as_str().unwrap()).collect();
    // A second "writing" (progress) once the install resumed, then the rest up to the reboot.
    let resumed = [&["accepted", "writing"][..], &UP_TO_THE_REBOOT[1..]].concat();
    assert_eq!(unique, resumed, "{}", device.logs());
    wait_for("an empty outbox", Duration::from_secs(5), || {
        device.outbox_files() == 1
    });
}

#[test]
fn hostile_input_is_refused_rate_limited_and_bounded_and_the_agent_stays_connected() {
    let (broker, client) = plain_broker();
    let mut device = plain_device(&broker);
    let sub = start_online(&mut device, &client, "events");
    let release_topic = device.topic("release");
    let refused = |sub: &Sub| -> Vec<Value> {
        sub.payloads(&device.topic("events"))
            .into_iter()
            .filter(|e| e["state"] == "refused")
            .collect()
    };

    // Larger than the agent's maximum packet size: the broker drops it for the agent.
    client.publish(&release_topic, &vec![b'x'; 200 * 1024], false);
    // Larger than a release may be, within the packet size: refused as too-large.
    let mut big = b"{\"manifest\": \"".to_vec();
    big.resize(70 * 1024, b'A');
    client.publish(&release_topic, &big, false);
    wait_for("too-large", Duration::from_secs(5), || {
        refused(&sub).iter().any(|e| e["reason"] == "too-large")
    });
    client.publish(&release_topic, b"{not json", false);
    wait_for("malformed", Duration::from_secs(5), || {
        refused(&sub).iter().any(|e| e["reason"] == "malformed")
    });
    let good = release(&device, &image(), "http://127.0.0.1:9/none");
    client.publish(&release_topic, &tamper(&good), false);
    wait_for("bad-signature", Duration::from_secs(5), || {
        refused(&sub).iter().any(|e| e["reason"] == "bad-signature")
    });
    // The same bad bytes again: recognised, not reported twice.
    client.publish(&release_topic, b"{not json", false);

    // 1,000 bad messages in a burst. The agent looks at the newest message per topic when it
    // gets to it, so how many of the burst it sees depends on the machine's speed; a trickle of
    // distinct bad messages afterwards makes sure the limit is reached either way.
    let burst: String = (0..1000).map(|i| format!("{{\"n\": {i}}}\n")).collect();
    client.publish_lines(&release_topic, &burst);
    for i in 0..6 {
        client.publish(&release_topic, format!("[{i}]").as_bytes(), false);
        std::thread::sleep(Duration::from_millis(100));
    }
    let limit = update_agent::daemon::intake::REFUSAL_BURST as usize;
    wait_for(
        "the rate limit to be reached",
        Duration::from_secs(10),
        || refused(&sub).len() >= limit,
    );
    std::thread::sleep(Duration::from_millis(500));
    let reports = refused(&sub);
    assert_eq!(reports.len(), limit, "{reports:?}");

    // Still connected (no last will, no reconnect) and responsive: a good release is acted on.
    assert!(
        !sub.raw(&device.topic("online"))
            .contains(&"false".to_string())
    );
    let logs = device.logs();
    assert_eq!(
        logs.matches("connected to mqtt://").count(),
        1,
        "{logs}\n--- broker ---\n{}",
        broker.log()
    );
    assert!(logs.contains("not reported (rate limit"), "{logs}");
    assert!(
        logs.lines().count() < 60,
        "the log is rate-limited too: {logs}"
    );
    client.publish(&release_topic, &good, false);
    sub.events_until(&device.topic("events"), "accepted", Duration::from_secs(10));

    // Bounded: the outbox never held more than its capacity, and the state directory is small.
    assert!(device.outbox_files() <= 256 + 1);
    let state_bytes: u64 = walk_size(&device.config().device.state_dir);
    assert!(
        state_bytes < 256 * 1024,
        "state directory grew to {state_bytes} bytes"
    );
}

#[test]
fn mutual_tls_with_a_pinned_ca_under_an_acl_that_only_allows_the_device_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "fleet");
    let (server_cert, server_key) = pki.issue("broker", &["localhost", "127.0.0.1"]);
    let (device_cert, device_key) = pki.issue(DEVICE, &[]);
    let (operator_cert, operator_key) = pki.issue("operator", &[]);
    // The device may read its release topics and write its own state, events and online.
    let acl = dir.path().join("acl");
    fs::write(
        &acl,
        format!(
            "user operator\n\
             topic readwrite {PREFIX}/#\n\
             \n\
             pattern read {PREFIX}/fleet/{COMPATIBLE}/release\n\
             pattern read {PREFIX}/devices/%u/release\n\
             pattern write {PREFIX}/devices/%u/state\n\
             pattern write {PREFIX}/devices/%u/events\n\
             pattern write {PREFIX}/devices/%u/online\n"
        ),
    )
    .unwrap();
    let broker = Mosquitto::start(
        dir.path(),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
             use_identity_as_username true\ntls_version tlsv1.2\nacl_file {}",
            pki.ca().display(),
            server_cert.display(),
            server_key.display(),
            acl.display()
        ),
    );
    let operator = ClientArgs {
        port: broker.port,
        tls: Some((pki.ca(), operator_cert, operator_key)),
    };
    // The device's identity, trusting the broker's certificates under `ca`.
    let over_tls = |ca: std::path::PathBuf| {
        let (cert, key) = (device_cert.clone(), device_key.clone());
        device(&format!("mqtts://127.0.0.1:{}", broker.port))
            .configure(move |c| {
                let mqtt = c.mqtt.as_mut().unwrap();
                (mqtt.ca_file, mqtt.cert_file, mqtt.key_file) = (Some(ca), Some(cert), Some(key));
            })
            .build()
            .unwrap()
    };

    // A device that pins another CA does not talk to this broker.
    let other = Pki::new(dir.path(), "other");
    let mut wrong = over_tls(other.ca());
    wrong.start_daemon(&[]);
    wait_for(
        "the refused connection to be logged",
        Duration::from_secs(10),
        || wrong.logs().contains("cannot connect to mqtts://"),
    );
    assert!(
        wrong.daemon_running(),
        "a broker it cannot trust is retried, not fatal"
    );
    assert!(
        wrong.logs().to_lowercase().contains("certificate"),
        "{}",
        wrong.logs()
    );
    wrong.kill_daemon();

    let mut device = over_tls(pki.ca());
    let sub = start_online(&mut device, &operator, "events");
    // The fleet topic: a tampered release is read, refused, and the report is written.
    let (_server, url) = serve(&image(), Duration::ZERO);
    let good = release(&device, &image(), &url);
    operator.publish(&device.fleet_topic(), &tamper(&good), true);
    wait_for(
        "the refusal on the events topic",
        Duration::from_secs(10),
        || {
            sub.payloads(&device.topic("events"))
                .iter()
                .any(|e| e["reason"] == "bad-signature")
        },
    );
    // The device topic: a good release is installed, reported all the way to the reboot.
    operator.publish(&device.topic("release"), &good, false);
    sub.events_until(
        &device.topic("events"),
        "rebooting",
        Duration::from_secs(20),
    );
    let state: Value =
        serde_json::from_str(&operator.retained(&device.topic("state")).unwrap()).unwrap();
    assert_eq!(state["state"], "reboot-pending");
    assert_eq!(state["pending"]["version"], "2.0");
    let logs = device.logs();
    assert!(
        !logs.contains("refused the"),
        "the ACL refused something: {logs}"
    );

    // The ACL holds: the device's identity cannot read another device's topics.
    operator.publish(
        &format!("{PREFIX}/devices/gw-0002/state"),
        b"secret-of-gw-0002",
        true,
    );
    let (device_cert2, device_key2) = (
        pki.dir.join(format!("{DEVICE}.pem")),
        pki.dir.join(format!("{DEVICE}.key")),
    );
    let mut probe = std::process::Command::new(require("mosquitto_sub", "mosquitto-clients"));
    probe
        .args(["-h", "localhost", "-p", &broker.port.to_string()])
        .arg("--cafile")
        .arg(pki.ca())
        .arg("--cert")
        .arg(device_cert2)
        .arg("--key")
        .arg(device_key2)
        .args([
            "-i",
            "probe",
            "-t",
            &format!("{PREFIX}/devices/gw-0002/state"),
        ])
        .args(["-C", "1", "-W", "2", "-V", "mqttv5"]);
    let out = probe.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("secret-of-gw-0002"),
        "the ACL let the device read {stdout}"
    );
    // Under the operator's identity the same topic does give the message: the probe can see it.
    assert_eq!(
        operator
            .retained(&format!("{PREFIX}/devices/gw-0002/state"))
            .as_deref(),
        Some("secret-of-gw-0002")
    );

    stop_and_see_offline(&mut device, &operator);
}

#[test]
fn the_periodic_check_retries_a_release_whose_install_failed() {
    let (broker, client) = plain_broker();
    let mut device = device(&broker.url())
        .configure(|c| c.mqtt.as_mut().unwrap().recheck_interval = Duration::from_secs(1))
        .build()
        .unwrap();
    // The image is not on the server yet when the release is first seen.
    let server = ImageServer::builder(image())
        .route("/image.img", Act::once(Act::Status(404)))
        .start_background()
        .unwrap();
    let release = release(&device, &image(), &server.url("/image.img"));
    let events = fleet_install_until_reboot(&mut device, &client, &release);
    // The failed attempt, then the retry up to the reboot.
    let retried = [&["accepted", "writing", "failed"][..], UP_TO_THE_REBOOT].concat();
    assert_eq!(states(&events), retried, "{}", device.logs());
    assert_eq!(events[2]["reason"], "http-status");
    assert!(device.logs().contains("periodic check"));
}

/// A release that rolled back is not retried, and seeing it again (the retained message after
/// the reboot, then every periodic check) is not news for the operators: no `refused` event.
#[test]
fn a_rolled_back_release_seen_again_at_each_periodic_check_is_passed_over_quietly() {
    let (broker, client) = plain_broker();
    // The new system fails its health check.
    let mut device = device(&broker.url())
        .configure(|c| c.mqtt.as_mut().unwrap().recheck_interval = Duration::from_secs(1))
        .health(&[&["false"]])
        .build()
        .unwrap();
    let (_server, url) = serve(&image(), Duration::ZERO);
    let release = release(&device, &image(), &url);
    client.publish(&device.fleet_topic(), &release, true);
    let sub = client.subscribe(&[&device.topic("events")], None);

    device.start_daemon(&[]);
    wait_for(
        "the reboot into the new slot",
        Duration::from_secs(30),
        || device.reboot_requested(),
    );
    assert_eq!(device.reboot(), "B");
    device.start_daemon(&[]);
    wait_for("the reboot back", Duration::from_secs(30), || {
        device.reboot_requested()
    });
    assert_eq!(device.reboot(), "A");
    device.start_daemon(&[]);
    sub.events_until(
        &device.topic("events"),
        "rolled-back",
        Duration::from_secs(20),
    );
    // Three periodic checks after this start, each of which sees the retained release again.
    wait_for("three periodic checks", Duration::from_secs(20), || {
        let logs = device.logs();
        let third = logs.split("--- agent run 3 ---").nth(1)?.to_string();
        (third.matches("periodic check").count() >= 3).then_some(())
    });
    let logs = device.logs();
    let third = logs.split("--- agent run 3 ---").nth(1).unwrap();
    assert!(
        third
            .matches("rolled back on this device before; not retried")
            .count()
            >= 3,
        "{third}"
    );
    let events = sub.payloads(&device.topic("events"));
    assert_eq!(states(&events), ROLLED_BACK, "{logs}");
}

/// The engine never reads a clock: the daemon must wake it when the policy's next moment comes.
/// With automatic install off, a security release waits (`pending`) and installs at its signed
/// deadline — a few seconds away here — without any other input.
#[test]
fn the_daemon_wakes_the_policy_at_a_security_deadline() {
    let (broker, client) = plain_broker();
    let mut device = device(&broker.url())
        .policy(update_agent::config::Policy {
            auto_install: false,
            security_deadline_when_off: true,
            ..Default::default()
        })
        .build()
        .unwrap();
    let (_server, url) = serve(&image(), Duration::ZERO);
    let deadline = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
    let release = device
        .release("2.0")
        .security_version(2)
        .deadline(deadline)
        .image(&url, &image())
        .sign();
    let events = fleet_install_until_reboot(&mut device, &client, &release);
    let seen = states(&events);
    let pending = seen.iter().position(|s| s == "pending");
    let writing = seen.iter().position(|s| s == "writing");
    assert!(
        matches!((pending, writing), (Some(p), Some(w)) if p < w),
        "{seen:?}\n{}",
        device.logs()
    );
    let written_at: jiff::Timestamp = events[writing.unwrap()]["at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        written_at >= deadline,
        "the install started at {written_at}, before the deadline {deadline}"
    );
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): READY=1 once the daemon runs, then WATCHDOG=1
/// at half the watchdog interval, through the socket systemd names in $NOTIFY_SOCKET.
#[test]
fn the_daemon_tells_systemd_it_is_ready_and_keeps_the_watchdog_fed() {
    let broker = Mosquitto::plain_temp();
    let mut device = plain_device(&broker);
    let socket_path = device.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    device.start_daemon(&[
        ("NOTIFY_SOCKET", socket_path.as_os_str()),
        ("WATCHDOG_USEC", std::ffi::OsStr::new("200000")),
    ]);
    let mut messages = Vec::new();
    let mut buf = [0u8; 256];
    while messages.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
        let n = socket.recv(&mut buf).unwrap_or_else(|e| {
            panic!("no notification ({e}); got {messages:?}\n{}", device.logs())
        });
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(messages[0], "READY=1", "{messages:?}");
}

fn walk_size(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk_size(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// A test PKI: a CA, the broker's certificate, and client certificates by common name.
struct Pki {
    dir: std::path::PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(dir: &std::path::Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = dir.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// Writes `{name}.pem` and `{name}.key` (mode 0600); returns their paths.
    fn issue(&self, name: &str, sans: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        fs::write(&cert_path, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }
}
