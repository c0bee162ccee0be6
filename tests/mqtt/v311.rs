//! MQTT 3.1.1 (`[mqtt] protocol = "3.1.1"`) against a real mosquitto: the whole update cycle
//! (the MQTT 5 scenario of `main.rs`, spoken in 3.1.1), and the size bound, which on 3.1.1 is the
//! broker's.

use std::time::Duration;

use update_agent::mqtt::Protocol;

use super::common::sim::mqtt::Mosquitto;
use super::common::sim::states;
use super::common::{Gateway, require, wait_for};
use super::{device, image, start_online, whole_cycle};

#[test]
fn whole_cycle_over_mqtt_3_1_1_retained_release_to_commit() {
    whole_cycle(Protocol::V311);
}

/// A gateway speaking 3.1.1 to `broker`, its longest back-off `reconnect_max`.
fn device_311(broker: &Mosquitto, reconnect_max: Duration) -> Gateway {
    device(&broker.url())
        .configure(move |c| {
            let mqtt = c.mqtt.as_mut().unwrap();
            mqtt.protocol = Protocol::V311;
            mqtt.reconnect_max = reconnect_max;
        })
        .build()
        .unwrap()
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
    let broker = Mosquitto::temp("allow_anonymous true\nmax_packet_size 131072");
    let client = broker.client();
    let mut device = device_311(&broker, Duration::from_millis(500));
    let events = device.topic("events");
    let sub = start_online(&mut device, &client, "events");
    let oversized = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(oversized.path(), vec![b'x'; 200 * 1024]).unwrap();
    let refused_by_broker =
        std::process::Command::new(require("mosquitto_pub", "mosquitto-clients"))
            .args(["-p", &broker.port.to_string(), "-q", "1", "-r", "-t"])
            .arg(device.topic("release"))
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
    client.publish(&device.topic("release"), &big, false);
    wait_for("too-large", Duration::from_secs(5), || {
        sub.payloads(&events)
            .iter()
            .any(|e| e["state"] == "refused" && e["reason"] == "too-large")
    });
    assert_eq!(client.retained(&device.topic("release")), None);
    let logs = device.logs();
    assert_eq!(logs.matches("connected to mqtt://").count(), 1, "{logs}");
    assert!(device.stop_daemon().success());
    drop(sub);
    drop(broker);

    // Without it: the retained 200 KiB release is in, and the agent meets it on every connect.
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let reconnect_max = 1.5;
    let mut device = device_311(&broker, Duration::from_secs_f64(reconnect_max));
    client.publish(&device.fleet_topic(), &vec![b'x'; 200 * 1024], true);
    device.start_daemon(&[]);
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
    assert!(device.daemon_running());

    // The operator replaces the release: the agent recovers at its next try and acts on it.
    let events = device.topic("events");
    let sub = client.subscribe(&[&events], None);
    let good = device
        .release("2.0")
        .security_version(2)
        .image("http://127.0.0.1:9/none", &image())
        .sign();
    client.publish(&device.fleet_topic(), &good, true);
    wait_for(
        "the replacement release accepted",
        Duration::from_secs(10),
        || states(&sub.payloads(&events)).contains(&"accepted".to_string()),
    );
}
