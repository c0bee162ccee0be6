//! MQTT 3.1.1 (`[mqtt] protocol = "3.1.1"`) against a real mosquitto: the whole update cycle,
//! and the size bound, which on 3.1.1 is the broker's. These use the process helpers of
//! `harness.rs` (older than the sim); the same cycle over MQTT 5 is in `main.rs`.

use std::fs;
use std::time::Duration;

use crate::harness::*;
use serde_json::Value;

const PLAIN: &str = "allow_anonymous true";

fn state(client: &ClientArgs) -> Value {
    serde_json::from_str(&retained(client, &topic("state")).expect("a retained state")).unwrap()
}

#[test]
fn whole_cycle_over_mqtt_3_1_1_retained_release_to_commit() {
    whole_cycle("3.1.1");
}

/// The whole cycle with the agent and the operator's tools speaking `protocol`.
fn whole_cycle(protocol: &str) {
    let dir = test_dir();
    let broker = Mosquitto::start(dir.path(), PLAIN);
    let client = ClientArgs {
        port: broker.port,
        tls: None,
    };
    let signer = Signer::new();
    let mut device = Device::new(
        dir.path(),
        &signer,
        &format!(
            "broker = \"mqtt://127.0.0.1:{}\"\nprotocol = \"{protocol}\"",
            broker.port
        ),
    );
    let image_path = dir.path().join("rootfs-2.0.img");
    let image = write_image(&image_path);
    let server = ImageServer::start(image.clone(), Duration::ZERO);
    let release = signer.release("2.0", &image_path, &server.url);
    // The operator publishes before the device is even up: the retained message waits.
    let release_file = dir.path().join("release.json");
    fs::write(&release_file, &release).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["release", "publish", "--protocol", protocol, "--broker"])
        .arg(format!("mqtt://127.0.0.1:{}", broker.port))
        .args(["--fleet", COMPATIBLE])
        .arg(&release_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sub = Sub::start(&client, &[&topic("events")], None);
    // The operator's monitor, as a JSON event stream.
    let monitor = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args([
            "monitor",
            "--json",
            "--count",
            "7",
            "--timeout",
            "60",
            "--protocol",
            protocol,
            "--broker",
        ])
        .arg(format!("mqtt://127.0.0.1:{}", broker.port))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    device.start_agent();
    wait_for("the reboot request", Duration::from_secs(30), || {
        device.reboot_requested().then_some(())
    });
    let booted = device.reboot();
    assert_eq!(booted, "B");
    device.start_agent();
    let events = wait_for("the commit event", Duration::from_secs(20), || {
        let events = sub.payloads(&topic("events"));
        states(&events)
            .contains(&"committed".to_string())
            .then_some(events)
    });
    assert_eq!(
        states(&events),
        [
            "accepted",
            "writing",
            "written",
            "activated",
            "rebooting",
            "trial-boot",
            "committed"
        ],
        "{}",
        device.logs()
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert!(
        device.logs().contains(&format!(
            "connected to mqtt://127.0.0.1:{} (MQTT {protocol})",
            broker.port
        )),
        "{}",
        device.logs()
    );
    let txn = &events[0]["txn"];
    assert!(events.iter().all(|e| &e["txn"] == txn));
    assert!(
        events
            .iter()
            .all(|e| e["at"].as_str().unwrap().ends_with('Z'))
    );
    assert_eq!(events[6]["to_version"], "2.0");
    assert_eq!(events[6]["from_version"], "1.0");

    let state = wait_for("the committed state", Duration::from_secs(5), || {
        let state = state(&client);
        (state["version"] == "2.0").then_some(state)
    });
    assert_eq!(state["state"], "idle");
    assert_eq!(state["booted_slot"], "B");
    assert_eq!(state["slots"]["B"]["committed"], true);
    assert_eq!(state["last_event"]["state"], "committed");
    assert_eq!(state["policy"]["floor"], 2);
    assert!(
        fs::read(dir.path().join("slot-b.img"))
            .unwrap()
            .starts_with(&image)
    );

    let out = monitor.wait_with_output().unwrap();
    assert!(out.status.success());
    let streamed: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(states(&streamed), states(&events));
    assert!(streamed.iter().all(|e| e["device"] == DEVICE));
    // And as a table, from the retained topics.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args([
            "monitor",
            "--once",
            "--devices",
            "--protocol",
            protocol,
            "--broker",
        ])
        .arg(format!("mqtt://127.0.0.1:{}", broker.port))
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with(DEVICE)).expect(&table);
    for cell in ["2.0", "idle", "#6 committed", "yes"] {
        assert!(row.contains(cell), "{cell} missing in {table}");
    }
    // The fleet at a glance: counts per version and state.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["monitor", "--once", "--protocol", protocol, "--broker"])
        .arg(format!("mqtt://127.0.0.1:{}", broker.port))
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
    assert_eq!(sub.payloads(&topic("events")).len(), 7);
    assert_eq!(device.outbox_files(), 1, "only meta.json is left");
    assert!(device.stop_agent().success());

    // A restarted daemon records nothing new: the last event it publishes is still the
    // commit, from the event log.
    let before = state["updated"].clone();
    device.start_agent();
    let restarted = wait_for(
        "the restarted daemon's state",
        Duration::from_secs(10),
        || {
            let state = self::state(&client);
            (state["updated"] != before).then_some(state)
        },
    );
    assert_eq!(restarted["last_event"]["state"], "committed", "{restarted}");
    assert_eq!(restarted["last_event"]["seq"], 6, "{restarted}");
    assert!(device.stop_agent().success());
}

/// MQTT 3.1.1 cannot tell the broker the agent's maximum packet size. With the broker's own
/// limit (as the README tells integrators) an oversized publish never gets in and the agent
/// stays connected; without it, a retained oversized release closes the agent's connection
/// every time it subscribes, and the agent then waits its longest back-off instead of
/// reconnecting at once — and recovers when the release is replaced.
#[test]
fn over_3_1_1_the_size_bound_is_the_brokers_and_an_oversized_retained_release_does_not_make_the_agent_hammer_it()
 {
    // With the broker's limit.
    let dir = test_dir();
    let broker = Mosquitto::start(dir.path(), &format!("{PLAIN}\nmax_packet_size 131072"));
    let client = ClientArgs {
        port: broker.port,
        tls: None,
    };
    let signer = Signer::new();
    let mut device = Device::new(
        dir.path(),
        &signer,
        &format!(
            "broker = \"mqtt://127.0.0.1:{}\"\nprotocol = \"3.1.1\"",
            broker.port
        ),
    );
    let sub = Sub::start(&client, &[&topic("events"), &topic("online")], None);
    device.start_agent();
    wait_for("online=true", Duration::from_secs(10), || {
        sub.raw(&topic("online"))
            .contains(&"true".to_string())
            .then_some(())
    });
    let oversized = tempfile::NamedTempFile::new().unwrap();
    fs::write(oversized.path(), vec![b'x'; 200 * 1024]).unwrap();
    let refused_by_broker = std::process::Command::new(tool("mosquitto_pub", "mosquitto-clients"))
        .args(["-p", &broker.port.to_string(), "-q", "1", "-r", "-t"])
        .arg(topic("release"))
        .arg("-f")
        .arg(oversized.path())
        .output()
        .unwrap();
    assert!(
        !refused_by_broker.status.success(),
        "mosquitto took a 200 KiB publish despite max_packet_size"
    );
    let mut big = b"{\"manifest\": \"".to_vec();
    big.resize(70 * 1024, b'A');
    publish(&client, &topic("release"), &big, false);
    wait_for("too-large", Duration::from_secs(5), || {
        sub.payloads(&topic("events"))
            .iter()
            .any(|e| e["state"] == "refused" && e["reason"] == "too-large")
            .then_some(())
    });
    assert_eq!(retained(&client, &topic("release")), None);
    let logs = device.logs();
    assert_eq!(logs.matches("connected to mqtt://").count(), 1, "{logs}");
    assert!(device.stop_agent().success());
    drop(sub);
    drop(broker);

    // Without it: the retained 200 KiB release is in, and the agent meets it on every connect.
    let dir = test_dir();
    let broker = Mosquitto::start(dir.path(), PLAIN);
    let client = ClientArgs {
        port: broker.port,
        tls: None,
    };
    let reconnect_max = 1.5;
    let mut device = Device::new(
        dir.path(),
        &signer,
        &format!(
            "broker = \"mqtt://127.0.0.1:{}\"\nprotocol = \"3.1.1\"",
            broker.port
        ),
    );
    let config = fs::read_to_string(&device.config).unwrap().replace(
        "reconnect_max = 0.5",
        &format!("reconnect_max = {reconnect_max}"),
    );
    fs::write(&device.config, config).unwrap();
    publish(&client, &fleet_topic(), &vec![b'x'; 200 * 1024], true);
    device.start_agent();
    let watched = Duration::from_secs(6);
    std::thread::sleep(watched);
    let logs = device.logs();
    let connections = logs.matches("connected to mqtt://").count();
    // Every connection but the last is cut by the release; each is followed by a wait of
    // reconnect_max/2..reconnect_max, so at most watched/(reconnect_max/2) + 1 of them. The
    // shortest back-off (0.05 s, reset by every successful connection) would allow ~100.
    let most = (watched.as_secs_f64() / (reconnect_max / 2.0)) as usize + 1;
    assert!(
        (2..=most).contains(&connections),
        "{connections} connections in {watched:?}: {logs}"
    );
    assert!(
        logs.contains("more than the 131072 this agent takes") && logs.contains("max_packet_size"),
        "{logs}"
    );
    assert!(device.agent_running());

    // The operator replaces the release: the agent recovers at its next try and acts on it.
    let sub = Sub::start(&client, &[&topic("events")], None);
    let image_path = dir.path().join("rootfs-2.0.img");
    write_image(&image_path);
    let good = signer.release("2.0", &image_path, "http://127.0.0.1:9/none");
    publish(&client, &fleet_topic(), &good, true);
    wait_for(
        "the replacement release accepted",
        Duration::from_secs(10),
        || {
            states(&sub.payloads(&topic("events")))
                .contains(&"accepted".to_string())
                .then_some(())
        },
    );
}
