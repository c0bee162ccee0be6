//! `update-agent rollout` against real devices: six `update-agent run` processes on one
//! mosquitto, two of whose new systems fail their health check. The tool publishes the release,
//! follows the fleet (JSON lines and the Prometheus endpoint), halts when the failure rate among
//! finished devices passes its threshold, and the cleared topic keeps the release from devices
//! that come online afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::common::sim::mqtt::{Mosquitto, free_port};
use super::common::{Gateway, assert_exit, wait_for};
use super::{COMPATIBLE, device, image, serve};

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_update-agent"))
}

/// `GET /metrics` on 127.0.0.1:port; the body.
fn scrape(port: u16, accept: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response.split_once("\r\n\r\n")?.1.to_string())
}

/// The lines `output` gives, collected in the background as they come.
fn collect_lines(output: impl Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn gauge(metrics: &str, line_start: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

#[test]
fn a_rollout_follows_the_fleet_and_halts_above_its_failure_threshold() {
    let broker = Mosquitto::plain_temp();
    let client = broker.client();
    let url = broker.url();
    let image = image();
    let (_server, image_url) = serve(&image, Duration::ZERO);

    // gw-1 and gw-2 fail their trial boot; gw-3 and gw-4 are fine; gw-5 and gw-6 are known
    // to the broker (retained state) but offline when the rollout starts.
    let mut devices: Vec<(String, Gateway)> = (1..=6)
        .map(|n| {
            let id = format!("gw-{n}");
            let health: &[&str] = if n <= 2 { &["false"] } else { &["true"] };
            let device_id = id.clone();
            let device = device(&url)
                .health(&[health])
                .configure(move |c| c.mqtt.as_mut().unwrap().device_id = device_id)
                .build()
                .unwrap();
            (id, device)
        })
        .collect();
    let release = devices[0].1.path("release.json");
    std::fs::write(&release, super::release(&devices[0].1, &image, &image_url)).unwrap();
    for (_, device) in &mut devices {
        device.start_daemon(&[]);
        wait_for("the retained state", Duration::from_secs(10), || {
            client.retained(&device.topic("state"))
        });
    }
    for (_, device) in &mut devices[4..] {
        assert!(device.stop_daemon().success());
        assert_eq!(
            client.retained(&device.topic("online")).as_deref(),
            Some("false")
        );
    }

    let metrics_port = free_port();
    let mut tool = agent()
        .args(["rollout", "start", "--broker", &url, "--fleet", COMPATIBLE])
        .args(["--halt-at", "25%", "--min-finished", "4", "--json"])
        .args(["--timeout", "120", "--metrics"])
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg(&release)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_lines(tool.stdout.take().unwrap());
    let stderr_lines = collect_lines(tool.stderr.take().unwrap());
    let logs = |devices: &[(String, Gateway)]| -> String {
        let tool = stderr_lines.lock().unwrap().join("\n");
        let agents: String = devices
            .iter()
            .map(|(id, d)| format!("== {id}\n{}", d.logs()))
            .collect();
        format!("--- tool ---\n{tool}\n{agents}")
    };

    // Each online device installs; the tool sees it happen.
    for (_, device) in &mut devices[..4] {
        wait_for(
            "the reboot into the new slot",
            Duration::from_secs(30),
            || device.reboot_requested(),
        );
    }
    let metrics = wait_for(
        "the metrics to show four devices installing",
        Duration::from_secs(10),
        || {
            scrape(metrics_port, "text/plain").filter(|m| {
                gauge(m, "update_agent_rollout_devices{stage=\"installing\"}") == Some(4.0)
            })
        },
    );
    assert!(
        metrics.contains(&format!(
            "update_agent_rollout_info{{release_id=\"{}\",version=\"2.0\"}} 1",
            release_id(&release)
        )),
        "{metrics}"
    );
    assert_eq!(gauge(&metrics, "update_agent_fleet_devices "), Some(6.0));
    assert_eq!(
        gauge(
            &metrics,
            "update_agent_fleet_devices_online{online=\"false\"}"
        ),
        Some(2.0)
    );
    assert_eq!(gauge(&metrics, "update_agent_rollout_halted "), Some(0.0));
    let open = scrape(metrics_port, "application/openmetrics-text; version=1.0.0").unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");

    for (n, (_, device)) in devices[..4].iter_mut().enumerate() {
        assert_eq!(device.reboot(), "B");
        device.start_daemon(&[]);
        if n < 2 {
            wait_for("the reboot back", Duration::from_secs(30), || {
                device.reboot_requested()
            });
            assert_eq!(device.reboot(), "A");
            device.start_daemon(&[]);
        }
    }
    let status = wait_for("the tool to stop", Duration::from_secs(60), || {
        tool.try_wait().unwrap()
    });
    let all = logs(&devices);
    assert_eq!(status.code(), Some(1), "halted is exit code 1: {all}");
    let stderr = stderr_lines.lock().unwrap().join("\n");
    assert!(
        stderr.contains("halted: failure rate 50.0 % (2 of 4"),
        "{stderr}"
    );
    assert_eq!(
        client.retained(&devices[0].1.fleet_topic()),
        None,
        "the release is cleared"
    );

    // The JSON lines: one summary per change, the last with the outcome.
    let lines = lines.lock().unwrap().clone();
    let last: Value = serde_json::from_str(lines.last().expect("JSON lines")).unwrap();
    assert_eq!(last["outcome"], "halted", "{last}");
    assert_eq!(last["halted"], true);
    let rollout = &last["summary"]["rollout"];
    assert_eq!(rollout["stages"]["committed"], 2, "{last}");
    assert_eq!(rollout["stages"]["rolled-back"], 2, "{last}");
    assert_eq!(rollout["stages"]["waiting"], 2, "{last}");
    assert_eq!(rollout["failure_rate"], 0.5);
    assert_eq!(last["summary"]["events"]["missing"], 0, "{last}");
    assert_eq!(last["summary"]["stragglers_total"], 2, "the offline ones");
    // 7 events for each committed device, 8 for each rolled-back one; none missing by seq.
    assert_eq!(
        last["summary"]["events"]["received"],
        2 * 7 + 2 * 8,
        "{all}"
    );
    for line in &lines {
        let summary: Value = serde_json::from_str(line).unwrap();
        assert!(summary["summary"]["devices"].as_u64().unwrap() <= 6);
    }

    // The devices that come online after the halt never see the release.
    for (_, device) in &mut devices[4..] {
        device.start_daemon(&[]);
        wait_for("online again", Duration::from_secs(10), || {
            client.retained(&device.topic("online")).as_deref() == Some("true")
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    for (id, device) in &devices[4..] {
        let state = client.retained_json(&device.topic("state"));
        assert_eq!(state["version"], "1.0", "{id}: {state}");
        assert_eq!(state["state"], "idle", "{id}: {state}");
        assert!(state["last_event"].is_null(), "{id}: {state}");
    }

    // `rollout status` finds no release on the fleet topic and shows where the devices are.
    let out = agent()
        .args([
            "rollout", "status", "--broker", &url, "--fleet", COMPATIBLE, "--json",
        ])
        .output()
        .unwrap();
    assert_exit(&out, 0, "update-agent");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["retained"], false);
    assert_eq!(status["summary"]["devices"], 6);
    assert_eq!(status["summary"]["online"], 6);
    let rows = status["summary"]["by_state"].as_array().unwrap();
    let count = |version: &str| {
        rows.iter()
            .find(|r| r["version"] == version && r["state"] == "idle")
            .map(|r| r["devices"].as_u64().unwrap())
    };
    assert_eq!((count("2.0"), count("1.0")), (Some(2), Some(4)), "{status}");
}

fn release_id(path: &std::path::Path) -> String {
    let envelope = update_agent::release::Envelope::parse(&std::fs::read(path).unwrap()).unwrap();
    hex::encode(update_agent::release::build::sha256_of(
        &envelope.manifest_bytes,
    ))
}
