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

#[allow(dead_code)]
#[path = "mqtt/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "mqtt/rabbitmq.rs"]
mod rabbitmq;

use std::fs;
use std::process::Command;
use std::time::Duration;

use harness::*;
use rabbitmq::RabbitMq;
use serde_json::Value;

/// How often the agent's connection was broken by an oversized packet, from its log.
fn device_oversized(device: &Device) -> usize {
    device
        .logs()
        .matches("more than the 131072 this agent takes")
        .count()
}

fn client(port: u16) -> ClientArgs {
    ClientArgs { port, tls: None }
}

#[test]
fn mqtt_3_1_1_against_rabbitmq_rollout_last_will_and_an_oversized_retained_release() {
    let dir = test_dir();
    let broker = RabbitMq::start(dir.path(), 1);
    eprintln!("RabbitMQ started in {:?}", broker.started_in);
    let url = broker.url(0);
    let client = client(broker.nodes[0].mqtt_port);
    let signer = Signer::new();
    let mqtt = format!("broker = \"{url}\"\nprotocol = \"3.1.1\"");

    // 1. A rollout to one device, over 3.1.1.
    let home = dir.path().join("gw-0001");
    fs::create_dir_all(&home).unwrap();
    let mut device = Device::new(&home, &signer, &mqtt);
    device.start_agent();
    let state = wait_for("the retained state", Duration::from_secs(20), || {
        retained(&client, &topic("state"))
    });
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["version"], "1.0", "{state}");
    let image_path = dir.path().join("rootfs-2.0.img");
    let image = write_image(&image_path);
    let server = ImageServer::start(image.clone(), Duration::ZERO);
    let release = dir.path().join("release.json");
    fs::write(&release, signer.release("2.0", &image_path, &server.url)).unwrap();
    let tool = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .args(["rollout", "start", "--protocol", "3.1.1", "--broker", &url])
        .args(["--fleet", COMPATIBLE, "--json", "--timeout", "90"])
        .arg(&release)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the reboot request", Duration::from_secs(30), || {
        device.reboot_requested().then_some(())
    });
    assert_eq!(device.reboot(), "B");
    device.start_agent();
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
        let state: Value = serde_json::from_str(&retained(&client, &topic("state"))?).ok()?;
        (state["version"] == "2.0").then_some(state)
    });
    assert_eq!(state["last_event"]["state"], "committed", "{state}");
    assert!(
        fs::read(home.join("slot-b.img"))
            .unwrap()
            .starts_with(&image)
    );
    assert!(device.logs().contains("(MQTT 3.1.1)"), "{}", device.logs());

    // 2. The last will, on a crash.
    device.kill_agent();
    wait_for("the last will", Duration::from_secs(30), || {
        (retained(&client, &topic("online")).as_deref() == Some("false")).then_some(())
    });

    // 3. A 200 KiB retained release on the device's topic: RabbitMQ 3.10 takes and keeps it.
    publish(&client, &topic("release"), &vec![b'x'; 200 * 1024], true);
    let config = fs::read_to_string(&device.config)
        .unwrap()
        .replace("reconnect_max = 0.5", "reconnect_max = 1.5");
    fs::write(&device.config, config).unwrap();
    device.start_agent();
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
    publish(&client, &topic("release"), b"", true);
    let oversized = || device_oversized(&device);
    std::thread::sleep(Duration::from_secs(3));
    let before = oversized();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(oversized(), before, "{}", device.logs());
    assert_eq!(retained(&client, &topic("online")).as_deref(), Some("true"));
    assert!(device.stop_agent().success());
}
