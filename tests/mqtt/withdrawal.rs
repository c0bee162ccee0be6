//! A staged release and its halt through a real mosquitto: the device waits for its own
//! moment (`pending`, `waiting: rollout`, `until`), drops the release when the operator clears
//! the retained message — also when the clear happened while it was offline — and finishes an
//! install that had started. Self-contained: it needs only the harness's broker, device and
//! image server.

use std::process::Command;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use update_agent::release::ReleaseId;
use update_agent::release::build::{digest_image, sha256_of, sign_manifest};
use update_agent::release::manifest::{
    Disruption, FORMAT_ROLLOUT, Image, Manifest, Rollout, Severity,
};

use super::harness::*;

/// A signed release of 2.0 staged over `[start, start + duration)`, and its release id.
fn staged_release(
    signer: &Signer,
    image: &std::path::Path,
    url: &str,
    rollout: Rollout,
) -> (Vec<u8>, ReleaseId) {
    let digest = digest_image(image, None).unwrap();
    let manifest = Manifest {
        format: FORMAT_ROLLOUT,
        version: "2.0".into(),
        security_version: 2,
        compatible: COMPATIBLE.into(),
        created: Timestamp::now(),
        expires: None,
        security: false,
        severity: Severity::None,
        advisory: String::new(),
        disruption: Disruption::default(),
        deadline: None,
        images: [(
            "rootfs".to_string(),
            Image::uncompressed(url, digest.size, digest.sha256),
        )]
        .into_iter()
        .collect(),
        rollout: Some(rollout),
    };
    let envelope = sign_manifest(&manifest, &signer.key).unwrap();
    let id = ReleaseId::from_digest(sha256_of(&envelope.manifest_bytes));
    (envelope.to_json().into_bytes(), id)
}

/// What `rollout halt` does: an empty retained message on the topic.
fn clear(port: u16, topic: &str) {
    let out = Command::new(tool("mosquitto_pub", "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", "1", "-r", "-n", "-t", topic])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn events_of(sub: &Sub) -> Vec<Value> {
    sub.payloads(&topic("events"))
}

fn count(sub: &Sub, state: &str) -> usize {
    events_of(sub)
        .iter()
        .filter(|e| e["state"] == state)
        .count()
}

fn wait_for_count(sub: &Sub, state: &str, n: usize, timeout: Duration) -> Value {
    wait_for(&format!("{n} '{state}' event(s)"), timeout, || {
        let matching: Vec<Value> = events_of(sub)
            .into_iter()
            .filter(|e| e["state"] == state)
            .collect();
        (matching.len() >= n).then(|| matching[n - 1].clone())
    })
}

#[test]
fn a_staged_release_waits_for_its_moment_and_a_cleared_topic_withdraws_it() {
    let dir = test_dir();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let client = ClientArgs {
        port: broker.port,
        tls: None,
    };
    let signer = Signer::new();
    let mut device = Device::new(
        dir.path(),
        &signer,
        &format!("broker = \"mqtt://127.0.0.1:{}\"", broker.port),
    );
    let sub = Sub::start(&client, &[&topic("events"), &topic("state")], None);
    device.start_agent();
    wait_for("the device's state", Duration::from_secs(10), || {
        sub.payloads(&topic("state")).pop()
    });

    // A window an hour from now: the device waits for its own moment in it.
    let image_path = dir.path().join("rootfs-2.0.img");
    let image = write_image(&image_path);
    let server = ImageServer::start(image, Duration::ZERO);
    let window = Rollout {
        start: Timestamp::now() + SignedDuration::from_hours(1),
        duration: 3600,
    };
    let (release, id) = staged_release(&signer, &image_path, &server.url, window);
    let moment = update_agent::engine::rollout::moment(&window, &id, DEVICE);
    publish(&client, &fleet_topic(), &release, true);
    let pending = wait_for_count(&sub, "pending", 1, Duration::from_secs(10));
    assert_eq!(pending["waiting"], "rollout");
    assert_eq!(pending["until"], moment.to_string());
    assert_eq!(pending["release_id"], id.to_string());
    let state = wait_for("the pending state", Duration::from_secs(5), || {
        sub.payloads(&topic("state"))
            .into_iter()
            .rev()
            .find(|s| s["state"] == "pending")
    });
    assert_eq!(state["pending"]["waiting"], "rollout");
    assert_eq!(state["pending"]["until"], moment.to_string());

    // The operator halts: the clear reaches the connected device, which drops the release.
    clear(broker.port, &fleet_topic());
    let withdrawn = wait_for_count(&sub, "withdrawn", 1, Duration::from_secs(10));
    assert_eq!(withdrawn["release_id"], id.to_string());
    assert_eq!(withdrawn["to_version"], "2.0");
    assert!(
        withdrawn["message"]
            .as_str()
            .unwrap()
            .contains("the fleet release topic was cleared"),
        "{withdrawn}"
    );
    wait_for("the idle state", Duration::from_secs(5), || {
        let last = sub.payloads(&topic("state")).pop()?;
        (last["state"] == "idle").then_some(())
    });

    // Published again (the rollout resumed): pending again, at the same moment. Then the
    // device goes offline, the topic is cleared meanwhile, and the device comes back: the
    // topic answers its subscription with nothing, and it drops the release.
    publish(&client, &fleet_topic(), &release, true);
    let pending = wait_for_count(&sub, "pending", 2, Duration::from_secs(10));
    assert_eq!(pending["until"], moment.to_string());
    device.stop_agent();
    clear(broker.port, &fleet_topic());
    device.start_agent();
    let withdrawn = wait_for_count(&sub, "withdrawn", 2, Duration::from_secs(30));
    assert!(
        withdrawn["message"]
            .as_str()
            .unwrap()
            .contains("no release topic holds it"),
        "{withdrawn}"
    );
    assert_eq!(count(&sub, "writing"), 0, "{:#?}", events_of(&sub));
    device.stop_agent();
}

#[test]
fn a_clear_after_the_install_started_does_not_stop_it() {
    let dir = test_dir();
    let broker = Mosquitto::start(dir.path(), "allow_anonymous true");
    let client = ClientArgs {
        port: broker.port,
        tls: None,
    };
    let signer = Signer::new();
    let mut device = Device::new(
        dir.path(),
        &signer,
        &format!("broker = \"mqtt://127.0.0.1:{}\"", broker.port),
    );
    let sub = Sub::start(&client, &[&topic("events")], None);
    device.start_agent();
    // A window that is over: the device's moment has passed, it installs at once; the image
    // server is slow, so the clear comes while it writes.
    let image_path = dir.path().join("rootfs-2.0.img");
    let image = write_image(&image_path);
    let server = ImageServer::start(image, Duration::from_millis(100));
    let window = Rollout {
        start: Timestamp::now() - SignedDuration::from_hours(2),
        duration: 3600,
    };
    let (release, _) = staged_release(&signer, &image_path, &server.url, window);
    publish(&client, &fleet_topic(), &release, true);
    wait_for_count(&sub, "writing", 1, Duration::from_secs(10));
    clear(broker.port, &fleet_topic());
    wait_for_count(&sub, "rebooting", 1, Duration::from_secs(60));
    assert_eq!(count(&sub, "withdrawn"), 0, "{:#?}", events_of(&sub));
    assert_eq!(count(&sub, "pending"), 0, "{:#?}", events_of(&sub));
    device.stop_agent();
}
