//! A staged release and its halt through a real mosquitto: the device waits for its own
//! moment (`pending`, `waiting: rollout`, `until`), drops the release when the operator clears
//! the retained message — also when the clear happened while it was offline — and finishes an
//! install that had started.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use update_agent::release::ReleaseId;
use update_agent::release::manifest::Rollout;

use super::common::sim::mqtt::Sub;
use super::common::wait_for;
use super::{DEVICE, image, plain_broker, plain_device, serve};

/// Release 2.0 of `image` at `url`, staged over `rollout`, and its release id.
fn staged(
    device: &super::Gateway,
    image: &[u8],
    url: &str,
    rollout: Rollout,
) -> (Vec<u8>, ReleaseId) {
    let builder = device
        .release("2.0")
        .security_version(2)
        .image(url, image)
        .rollout(rollout.start, rollout.duration);
    let release = builder.sign();
    let envelope = update_agent::release::Envelope::parse(&release).unwrap();
    let id = ReleaseId::from_digest(update_agent::release::build::sha256_of(
        &envelope.manifest_bytes,
    ));
    (release, id)
}

fn events_in(sub: &Sub, topic: &str, state: &str) -> Vec<Value> {
    sub.payloads(topic)
        .into_iter()
        .filter(|e| e["state"] == state)
        .collect()
}

/// The `n`th event `state` on `topic` (1-based), waiting up to `timeout` for it.
fn nth(sub: &Sub, topic: &str, state: &str, n: usize, timeout: Duration) -> Value {
    wait_for(&format!("{n} '{state}' event(s)"), timeout, || {
        events_in(sub, topic, state).get(n - 1).cloned()
    })
}

#[test]
fn a_staged_release_waits_for_its_moment_and_a_cleared_topic_withdraws_it() {
    let (broker, client) = plain_broker();
    let mut device = plain_device(&broker);
    let (events, state) = (device.topic("events"), device.topic("state"));
    let sub = client.subscribe(&[&events, &state], None);
    device.start_daemon(&[]);
    wait_for("the device's state", Duration::from_secs(10), || {
        sub.payloads(&state).pop()
    });

    // A window an hour from now: the device waits for its own moment in it.
    let image = image();
    let (_server, url) = serve(&image, Duration::ZERO);
    let window = Rollout {
        start: Timestamp::now() + SignedDuration::from_hours(1),
        duration: 3600,
    };
    let (release, id) = staged(&device, &image, &url, window);
    let moment = update_agent::engine::rollout::moment(&window, &id, DEVICE);
    client.publish(&device.fleet_topic(), &release, true);
    let pending = nth(&sub, &events, "pending", 1, Duration::from_secs(10));
    assert_eq!(pending["waiting"], "rollout");
    assert_eq!(pending["until"], moment.to_string());
    assert_eq!(pending["release_id"], id.to_string());
    let retained = wait_for("the pending state", Duration::from_secs(5), || {
        sub.payloads(&state)
            .into_iter()
            .rev()
            .find(|s| s["state"] == "pending")
    });
    assert_eq!(retained["pending"]["waiting"], "rollout");
    assert_eq!(retained["pending"]["until"], moment.to_string());

    // The operator halts: the clear reaches the connected device, which drops the release.
    client.clear(&device.fleet_topic());
    let withdrawn = nth(&sub, &events, "withdrawn", 1, Duration::from_secs(10));
    assert_eq!(withdrawn["release_id"], id.to_string());
    assert_eq!(withdrawn["to_version"], "2.0");
    let message = withdrawn["message"].as_str().unwrap();
    assert!(
        message.contains("the fleet release topic was cleared"),
        "{message}"
    );
    wait_for("the idle state", Duration::from_secs(5), || {
        let last = sub.payloads(&state).pop()?;
        (last["state"] == "idle").then_some(())
    });

    // Published again (the rollout resumed): pending again, at the same moment. Then the
    // device goes offline, the topic is cleared meanwhile, and the device comes back: the
    // topic answers its subscription with nothing, and it drops the release.
    client.publish(&device.fleet_topic(), &release, true);
    let pending = nth(&sub, &events, "pending", 2, Duration::from_secs(10));
    assert_eq!(pending["until"], moment.to_string());
    assert!(device.stop_daemon().success(), "{}", device.logs());
    client.clear(&device.fleet_topic());
    device.start_daemon(&[]);
    let withdrawn = nth(&sub, &events, "withdrawn", 2, Duration::from_secs(30));
    let message = withdrawn["message"].as_str().unwrap();
    assert!(message.contains("no release topic holds it"), "{message}");
    assert!(
        events_in(&sub, &events, "writing").is_empty(),
        "{:#?}",
        sub.payloads(&events)
    );
}

#[test]
fn a_clear_after_the_install_started_does_not_stop_it() {
    let (broker, client) = plain_broker();
    let mut device = plain_device(&broker);
    let events = device.topic("events");
    let sub = client.subscribe(&[&events], None);
    device.start_daemon(&[]);
    // A window that is over: the device's moment has passed, it installs at once; the image
    // server is slow, so the clear comes while it writes.
    let image = image();
    let (_server, url) = serve(&image, Duration::from_millis(100));
    let window = Rollout {
        start: Timestamp::now() - SignedDuration::from_hours(2),
        duration: 3600,
    };
    let (release, _) = staged(&device, &image, &url, window);
    client.publish(&device.fleet_topic(), &release, true);
    nth(&sub, &events, "writing", 1, Duration::from_secs(10));
    client.clear(&device.fleet_topic());
    nth(&sub, &events, "rebooting", 1, Duration::from_secs(60));
    let all = sub.payloads(&events);
    assert!(events_in(&sub, &events, "withdrawn").is_empty(), "{all:#?}");
    assert!(events_in(&sub, &events, "pending").is_empty(), "{all:#?}");
}
