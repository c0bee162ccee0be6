//! MQTT 3.1.1 against a real RabbitMQ (Debian's `rabbitmq-server` with the MQTT plugin, 3.10 on
//! Debian 12: it speaks nothing newer), started by the test on free loopback ports with its own
//! epmd, cookie and directories, and stopped by PID. RabbitMQ is slow to start, so one broker
//! serves the whole scenario, in phases:
//!
//! 1. a rollout (`rollout start --protocol 3.1.1`) takes a device from the retained release to
//!    the commit: every event arrives, none missing by seq, the retained state follows;
//! 2. the last will fires on a crash;
//! 3. an oversized retained release — RabbitMQ 3.10 has no MQTT packet limit — does not make
//!    the agent hammer the broker, and the agent recovers once the release is cleared.

mod common;
#[allow(dead_code)]
#[path = "mqtt/rabbitmq.rs"]
mod rabbitmq;

use std::process::Command;
use std::time::Duration;

use common::sim::mqtt::ClientArgs;
use common::{Gateway, wait_for};
use rabbitmq::RabbitMq;
use serde_json::Value;
use update_agent::mqtt::Protocol;

const COMPATIBLE: &str = "test-gw";
const SLOT_SIZE: u64 = 8 * 1024 * 1024;

/// How often the agent's connection was broken by an oversized packet, from its log.
fn device_oversized(device: &Gateway) -> usize {
    device
        .logs()
        .matches("more than the 131072 this agent takes")
        .count()
}

#[test]
fn mqtt_3_1_1_against_rabbitmq_rollout_last_will_and_an_oversized_retained_release() {
    let dir = tempfile::tempdir().unwrap();
    let broker = RabbitMq::start(dir.path(), 1);
    eprintln!("RabbitMQ started in {:?}", broker.started_in);
    let url = broker.url(0);
    let client = ClientArgs {
        port: broker.nodes[0].mqtt_port,
        tls: None,
    };

    // 1. A rollout to one device, over 3.1.1.
    let mut device = common::gateway()
        .compatible(COMPATIBLE)
        .slot_size(SLOT_SIZE)
        .empty_b()
        .mqtt(&url)
        .configure(|c| {
            c.device.factory_version = Some("1.0".into());
            c.mqtt.as_mut().unwrap().protocol = Protocol::V311;
        })
        .build()
        .unwrap();
    device.start_daemon(&[]);
    let state = wait_for("the retained state", Duration::from_secs(20), || {
        client.retained(&device.topic("state"))
    });
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["version"], "1.0", "{state}");
    let image = common::sim::text_pattern("rootfs 2.0 ", (SLOT_SIZE * 3 / 4) as usize);
    let server = common::ImageServer::builder(image.clone())
        .route("/image.img", common::sim::Act::Serve)
        .start_background()
        .unwrap();
    let release = device
        .release("2.0")
        .security_version(2)
        .image(&server.url("/image.img"), &image)
        .write(&dir.path().join("release.json"))
        .unwrap();
    let tool = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["rollout", "start", "--protocol", "3.1.1", "--broker", &url])
        .args(["--fleet", COMPATIBLE, "--json", "--timeout", "90"])
        .arg(&release)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the reboot request", Duration::from_secs(30), || {
        device.reboot_requested()
    });
    assert_eq!(device.reboot(), "B");
    device.start_daemon(&[]);
    let out = tool.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("{stderr}\n{}\n{}", device.logs(), broker.logs());
    assert_eq!(out.status.code(), Some(0), "{context}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: Value = serde_json::from_str(stdout.lines().last().expect(&context)).unwrap();
    assert_eq!(last["outcome"], "complete", "{last}");
    assert_eq!(
        last["summary"]["rollout"]["stages"]["committed"], 1,
        "{last}"
    );
    assert_eq!(last["summary"]["events"]["received"], 7, "{last}");
    assert_eq!(last["summary"]["events"]["missing"], 0, "{last}");
    let state = wait_for("the committed state", Duration::from_secs(10), || {
        let state: Value = serde_json::from_str(&client.retained(&device.topic("state"))?).ok()?;
        (state["version"] == "2.0").then_some(state)
    });
    assert_eq!(state["last_event"]["state"], "committed", "{state}");
    assert!(device.slot("B").starts_with(&image));
    assert!(device.logs().contains("(MQTT 3.1.1)"), "{}", device.logs());

    // 2. The last will, on a crash.
    device.kill_daemon();
    wait_for("the last will", Duration::from_secs(30), || {
        client.retained(&device.topic("online")).as_deref() == Some("false")
    });

    // 3. A 200 KiB retained release on the device's topic: RabbitMQ 3.10 takes and keeps it.
    client.publish(&device.topic("release"), &vec![b'x'; 200 * 1024], true);
    device.update_config(|c| c.mqtt.as_mut().unwrap().reconnect_max = Duration::from_millis(1500));
    device.start_daemon(&[]);
    std::thread::sleep(Duration::from_secs(6));
    let logs = device.logs();
    let run = logs.rsplit("--- agent run").next().unwrap();
    let connections = run.matches("connected to mqtt://").count();
    assert!(
        (1..=9).contains(&connections),
        "{connections} connections in 6 s (reconnect_max 1.5 s): {run}"
    );
    assert!(
        run.contains("more than the 131072 this agent takes"),
        "{run}"
    );
    // Cleared: after the next try (within reconnect_max) the connection holds.
    client.publish(&device.topic("release"), b"", true);
    let oversized = || device_oversized(&device);
    std::thread::sleep(Duration::from_secs(3));
    let before = oversized();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(oversized(), before, "{}", device.logs());
    assert_eq!(
        client.retained(&device.topic("online")).as_deref(),
        Some("true")
    );
    assert!(device.stop_daemon().success());
}
