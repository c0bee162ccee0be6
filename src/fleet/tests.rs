use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::metrics::{Format, ToolState, render};
use super::*;

const RELEASE: &str = "ab12";

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn target() -> Target {
    Target {
        release_id: RELEASE.into(),
        version: "2.0".into(),
        created: t(0),
    }
}

fn state(version: &str, phase: &str, last_seq: Option<u64>) -> Vec<u8> {
    let last_event = last_seq.map(|seq| json!({"seq": seq, "state": "committed", "at": t(-100)}));
    serde_json::to_vec(&json!({
        "format": 1, "device": "x", "compatible": "acme", "version": version,
        "state": phase, "last_event": last_event, "pending": null, "progress": null,
    }))
    .unwrap()
}

fn event(seq: u64, state: &str, release: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"seq": seq, "at": t(1), "state": state, "release_id": release}))
        .unwrap()
}

/// Devices gw-00..gw-(n-1), each with a retained state on 1.0 (newest event seq 4), online.
fn fleet(n: usize) -> FleetView {
    let mut view = FleetView::new(Some("acme".into()), Some(target()));
    for i in 0..n {
        let id = format!("gw-{i:02}");
        view.observe(&id, "state", &state("1.0", "idle", Some(4)), t(1));
        view.observe(&id, "online", b"true", t(1));
    }
    view
}

fn run(view: &mut FleetView, id: &str, states: &[&[&str]], at: Timestamp) {
    for (i, state) in states.concat().iter().enumerate() {
        view.observe(id, "events", &event(5 + i as u64, state, RELEASE), at);
    }
}

/// A device's events up to and through its trial boot, then how the trial ended.
const TRIAL: &[&str] = &[
    "accepted",
    "writing",
    "written",
    "activated",
    "rebooting",
    "trial-boot",
];
const COMMIT: &[&[&str]] = &[TRIAL, &["committed"]];
const ROLLBACK: &[&[&str]] = &[TRIAL, &["rolling-back", "rolled-back"]];

/// `fleet(n)` after the release: the first `committed` devices committed it, the next one
/// (`gw-{committed}`) rolled back, the rest have not started.
fn fleet_after_rollout(n: usize, committed: usize) -> FleetView {
    let mut view = fleet(n);
    for i in 0..committed {
        run(&mut view, &format!("gw-{i:02}"), COMMIT, t(10));
    }
    run(&mut view, &format!("gw-{committed:02}"), ROLLBACK, t(10));
    view
}

#[test]
fn a_rollout_counts_stages_and_the_failure_rate_among_finished_devices() {
    let mut view = fleet_after_rollout(20, 16);
    run(&mut view, "gw-17", &[&["accepted", "failed"]], t(10));
    run(&mut view, "gw-18", &[&["accepted", "writing"]], t(10));
    let rules = Rules {
        halt_at: Some(0.05),
        min_finished: 10,
        ..Rules::default()
    };
    let summary = view.summary(&rules, t(20));
    let rollout = summary.rollout.as_ref().unwrap();
    assert_eq!(rollout.stages[&Stage::Committed], 16);
    assert_eq!(rollout.stages[&Stage::RolledBack], 1);
    assert_eq!(rollout.stages[&Stage::Failed], 1);
    assert_eq!(rollout.stages[&Stage::Installing], 1);
    assert_eq!(rollout.stages[&Stage::Waiting], 1);
    assert_eq!((rollout.finished, rollout.failed), (18, 2));
    assert_eq!(rollout.failure_rate, Some(2.0 / 18.0));
    assert!(!rollout.settled);
    let reason = halt_reason(rollout, &rules).expect("11 % is above 5 %");
    assert!(reason.contains("2 of 18"), "{reason}");
    assert_eq!(summary.failures_total, 2);
    assert_eq!(summary.events.received, 16 * 7 + 8 + 2 + 2);
    assert_eq!(summary.events.missing, 0);
    assert_eq!(summary.devices, 20);
    assert_eq!(summary.online, 20);

    // Below the minimum count, no rate and no halt, however bad.
    let strict = Rules {
        min_finished: 19,
        ..rules
    };
    let summary = view.summary(&strict, t(20));
    assert_eq!(summary.rollout.as_ref().unwrap().failure_rate, None);
    assert_eq!(
        halt_reason(summary.rollout.as_ref().unwrap(), &strict),
        None
    );
    // At or below the threshold: no halt.
    let lenient = Rules {
        halt_at: Some(2.0 / 18.0),
        ..rules
    };
    assert_eq!(
        halt_reason(&view.summary(&lenient, t(20)).rollout.unwrap(), &lenient),
        None
    );
}

#[test]
fn the_rollout_is_settled_when_no_device_waits_or_installs() {
    let mut view = fleet(3);
    run(&mut view, "gw-00", COMMIT, t(10));
    run(&mut view, "gw-01", &[&["refused"]], t(10));
    run(&mut view, "gw-02", &[&["accepted", "withdrawn"]], t(10));
    let summary = view.summary(&Rules::default(), t(20));
    let rollout = summary.rollout.unwrap();
    assert!(rollout.settled, "{rollout:?}");
    assert_eq!(rollout.stages[&Stage::Withdrawn], 1);
    assert_eq!(rollout.stages[&Stage::Refused], 1);
    assert_eq!(rollout.finished, 1);
}

#[test]
fn missing_duplicate_and_dropped_events_are_told_apart_by_seq() {
    let mut view = fleet(1);
    // Seq 4 and below happened before the tool followed: not expected.
    view.observe("gw-00", "events", &event(3, "committed", "old"), t(2));
    view.observe("gw-00", "events", &event(5, "accepted", RELEASE), t(2));
    view.observe("gw-00", "events", &event(5, "accepted", RELEASE), t(2));
    view.observe("gw-00", "events", &event(8, "written", RELEASE), t(2));
    let summary = view.summary(&Rules::default(), t(3));
    assert_eq!(summary.events.duplicates, 2, "the old one and the repeat");
    assert_eq!(summary.events.missing, 2, "6 and 7");
    // The device says it dropped 6..7 while offline: lost, not missing.
    view.observe(
        "gw-00",
        "events",
        br#"{"dropped": 2, "first_seq": 6, "last_seq": 7, "at": "2027-01-01T00:00:00Z"}"#,
        t(4),
    );
    let summary = view.summary(&Rules::default(), t(5));
    assert_eq!(summary.events.missing, 0);
    assert_eq!(summary.events.dropped_by_devices, 2);
    // The retained state names a newer event than any received: 9 and 10 are missing.
    view.observe("gw-00", "state", &state("1.0", "writing", Some(10)), t(6));
    assert_eq!(view.summary(&Rules::default(), t(7)).events.missing, 2);
    // Out of order: 10 first, then 9.
    view.observe("gw-00", "events", &event(10, "rebooting", RELEASE), t(8));
    view.observe("gw-00", "events", &event(9, "activated", RELEASE), t(8));
    let summary = view.summary(&Rules::default(), t(9));
    assert_eq!(summary.events.missing, 0);
    // The older event arriving last did not move the device back.
    assert_eq!(
        summary.rollout.unwrap().stages[&Stage::Installing],
        1,
        "still installing"
    );
    view.observe("gw-00", "events", b"not json", t(9));
    assert_eq!(view.summary(&Rules::default(), t(9)).events.unreadable, 1);
}

#[test]
fn a_device_heard_from_its_first_event_expects_everything_from_zero() {
    let mut view = FleetView::new(None, None);
    view.observe("new", "events", &event(0, "accepted", RELEASE), t(1));
    view.observe("new", "events", &event(2, "written", RELEASE), t(1));
    assert_eq!(view.summary(&Rules::default(), t(2)).events.missing, 1);
}

#[test]
fn endless_gaps_stay_bounded() {
    let mut view = fleet(1);
    for seq in (10..10 + 4 * MAX_SEQ_GAPS as u64).step_by(2) {
        view.observe("gw-00", "events", &event(seq, "writing", RELEASE), t(2));
    }
    let device = &view.devices["gw-00"];
    assert!(device.seqs.above.len() <= MAX_SEQ_GAPS);
    // Every odd seq and 5..9 are missing, given up or not.
    let summary = view.summary(&Rules::default(), t(3));
    assert_eq!(summary.events.missing, 5 + 2 * MAX_SEQ_GAPS as u64 - 1);
}

#[test]
fn stragglers_are_offline_or_quiet_devices_that_have_not_settled() {
    let mut view = fleet(4);
    run(&mut view, "gw-00", COMMIT, t(10));
    run(&mut view, "gw-01", &[&["accepted", "writing"]], t(10));
    view.observe("gw-02", "online", b"false", t(10));
    let rules = Rules {
        straggler_after: SignedDuration::from_secs(300),
        ..Rules::default()
    };
    let early = view.summary(&rules, t(60));
    assert_eq!(early.stragglers_total, 1, "{:?}", early.stragglers);
    assert_eq!(early.stragglers[0].device, "gw-02");
    assert_eq!(early.stragglers[0].online, Some(false));
    // Five minutes later the writer and the waiter are quiet too; the committed one is not a
    // straggler, however quiet.
    let late = view.summary(&rules, t(400));
    let names: Vec<&str> = late.stragglers.iter().map(|s| s.device.as_str()).collect();
    assert_eq!(names, ["gw-03", "gw-01", "gw-02"], "quietest first");
}

#[test]
fn from_the_retained_state_alone_a_rollout_is_estimated() {
    let mut view = FleetView::new(None, Some(target()));
    view.observe("up", "state", &state("2.0", "idle", Some(9)), t(1));
    let mut pending = serde_json::from_slice::<Value>(&state("1.0", "writing", Some(7))).unwrap();
    pending["pending"] = json!({"release_id": RELEASE});
    view.observe(
        "busy",
        "state",
        &serde_json::to_vec(&pending).unwrap(),
        t(1),
    );
    let mut failed = serde_json::from_slice::<Value>(&state("1.0", "idle", Some(7))).unwrap();
    failed["last_event"] = json!({"seq": 7, "state": "rolled-back", "at": t(5)});
    view.observe("back", "state", &serde_json::to_vec(&failed).unwrap(), t(1));
    failed["last_event"]["at"] = json!(t(-5));
    view.observe(
        "before",
        "state",
        &serde_json::to_vec(&failed).unwrap(),
        t(1),
    );
    let lines = view.devices();
    let stage = |id: &str| lines.iter().find(|l| l.device == id).unwrap().stage;
    assert_eq!(stage("up"), Some(Stage::Committed));
    assert_eq!(stage("busy"), Some(Stage::Installing));
    assert_eq!(stage("back"), Some(Stage::RolledBack));
    assert_eq!(
        stage("before"),
        Some(Stage::Waiting),
        "rolled back before the release"
    );
}

#[test]
fn another_products_devices_do_not_count() {
    let mut view = fleet(2);
    let mut other = serde_json::from_slice::<Value>(&state("9.9", "idle", None)).unwrap();
    other["compatible"] = json!("other-product");
    view.observe(
        "foreign",
        "state",
        &serde_json::to_vec(&other).unwrap(),
        t(1),
    );
    assert_eq!(view.summary(&Rules::default(), t(2)).devices, 2);
}

#[test]
fn what_devices_send_is_escaped_bounded_and_cannot_grow_the_view() {
    let mut view = FleetView::new(None, Some(target()));
    let hostile = "\x1b[2J\x1b]0;pwned\x07evil\ngw";
    let doc = json!({"version": "\x1b[31m2.0\u{202e}", "state": "idle\r", "compatible": "x"});
    view.observe(hostile, "state", &serde_json::to_vec(&doc).unwrap(), t(1));
    view.observe(
        hostile,
        "events",
        &serde_json::to_vec(&json!({"seq": 1, "state": "failed", "release_id": RELEASE,
            "reason": "\x1b[H", "message": "x".repeat(10_000)}))
        .unwrap(),
        t(1),
    );
    let summary = view.summary(&Rules::default(), t(2));
    let text = serde_json::to_string(&summary).unwrap() + &format!("{:?}", view.devices());
    for bad in ['\x1b', '\x07', '\r', '\u{202e}'] {
        assert!(!text.contains(bad), "{bad:?} reached the output: {text}");
    }
    let failure = &summary.failures[0];
    assert!(failure.message.as_ref().unwrap().chars().count() <= MAX_MESSAGE + 1);
    assert!(
        failure.device.starts_with("\\u{1b}[2J"),
        "{}",
        failure.device
    );

    // Many versions: the view keeps a bounded number of rows.
    for i in 0..(MAX_ROWS * 3) {
        view.observe(
            &format!("d{i}"),
            "state",
            &state(&format!("v{i}"), "idle", None),
            t(1),
        );
    }
    let summary = view.summary(&Rules::default(), t(2));
    assert_eq!(summary.by_state.len(), MAX_ROWS);
    assert_eq!(
        summary.by_state.iter().map(|r| r.devices).sum::<usize>(),
        summary.devices
    );
}

#[test]
fn the_number_of_devices_tracked_is_bounded() {
    let mut view = FleetView::new(None, None);
    for i in 0..MAX_DEVICES + 5 {
        view.observe(&format!("d{i}"), "online", b"true", t(1));
    }
    let summary = view.summary(&Rules::default(), t(1));
    assert_eq!(summary.devices, MAX_DEVICES);
    assert_eq!(summary.ignored_devices, 5);
}

#[test]
fn metrics_in_both_text_formats() {
    let mut view = fleet_after_rollout(10, 9);
    let mut odd = serde_json::from_slice::<Value>(&state("3\"\\x", "idle", None)).unwrap();
    odd["compatible"] = json!("acme");
    view.observe("odd", "state", &serde_json::to_vec(&odd).unwrap(), t(10));
    let rules = Rules {
        halt_at: Some(0.05),
        min_finished: 5,
        ..Rules::default()
    };
    let summary = view.summary(&rules, t(11));
    let tool = ToolState {
        halt_at: Some(0.05),
        halted: true,
    };
    let text = render(&summary, tool, Format::Prometheus);
    for line in [
        "# TYPE update_agent_fleet_devices gauge",
        "update_agent_fleet_devices 11",
        "update_agent_fleet_devices_online{online=\"true\"} 10",
        "# TYPE update_agent_fleet_events_received_total counter",
        "update_agent_fleet_events_received_total 71",
        "update_agent_rollout_devices{stage=\"committed\"} 9",
        "update_agent_rollout_devices{stage=\"rolled-back\"} 1",
        "update_agent_rollout_failure_ratio 0.1",
        "update_agent_rollout_halted 1",
        "update_agent_fleet_devices_by_state{version=\"3\\\"\\\\x\",state=\"idle\"} 1",
        "update_agent_rollout_info{release_id=\"ab12\",version=\"2.0\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    assert!(!text.contains("# EOF"));
    let open = render(&summary, tool, Format::OpenMetrics);
    assert!(open.ends_with("# EOF\n"));
    assert!(open.contains("# TYPE update_agent_fleet_events_received counter\n"));
    assert!(open.contains("\nupdate_agent_fleet_events_received_total 71\n"));
    assert_eq!(
        Format::from_accept(Some("application/openmetrics-text; version=1.0.0")),
        Format::OpenMetrics
    );
    assert_eq!(Format::from_accept(None), Format::Prometheus);
}

#[test]
fn percentages() {
    assert_eq!(parse_percent("5%"), Ok(0.05));
    assert_eq!(parse_percent("2.5 %"), Ok(0.025));
    assert_eq!(parse_percent("10"), Ok(0.1));
    for bad in ["x", "-1%", "101%", ""] {
        assert!(parse_percent(bad).is_err(), "{bad}");
    }
}

/// A broker may drop live messages for a slow subscriber: the retained state, read again, still
/// tells where each device is, and the lost events count as missing.
#[test]
fn the_retained_state_settles_devices_whose_last_events_were_lost() {
    let mut view = fleet(2);
    run(&mut view, "gw-00", &[&["accepted", "writing"]], t(10));
    run(&mut view, "gw-01", &[&["accepted", "writing"]], t(10));
    // gw-00's later events are lost; its state, re-read, shows 2.0 committed.
    view.observe("gw-00", "state", &state("2.0", "idle", Some(11)), t(30));
    // gw-01 rolled back; its state says so (after the release was created).
    let mut back = serde_json::from_slice::<Value>(&state("1.0", "idle", Some(12))).unwrap();
    back["last_event"] = json!({"seq": 12, "state": "rolled-back", "at": t(25)});
    view.observe("gw-01", "state", &serde_json::to_vec(&back).unwrap(), t(30));
    let summary = view.summary(&Rules::default(), t(31));
    let rollout = summary.rollout.unwrap();
    assert_eq!(rollout.stages[&Stage::Committed], 1);
    assert_eq!(rollout.stages[&Stage::RolledBack], 1);
    assert!(rollout.settled);
    assert_eq!(summary.events.missing, 5 + 6, "7..11 and 7..12");
}

/// A live state may overtake the event it names (several brokers, or RabbitMQ, which sends no
/// retained messages to wildcard subscriptions): it does not set where events start.
#[test]
fn a_live_state_does_not_make_the_event_it_names_a_duplicate() {
    let mut view = FleetView::new(None, Some(target()));
    view.observe_as(
        "gw",
        "state",
        &state("1.0", "writing", Some(5)),
        false,
        t(1),
    );
    view.observe_as("gw", "events", &event(5, "accepted", RELEASE), false, t(1));
    view.observe_as("gw", "events", &event(6, "writing", RELEASE), false, t(1));
    let summary = view.summary(&Rules::default(), t(2));
    assert_eq!(summary.events.duplicates, 0);
    assert_eq!(summary.events.missing, 0);
}

#[test]
fn a_device_writing_by_delta_shows_the_bytes_it_downloaded() {
    let mut view = FleetView::new(Some("acme".into()), None);
    let writing = |progress: serde_json::Value| {
        serde_json::to_vec(&json!({
            "format": 1, "device": "x", "compatible": "acme", "version": "1.0",
            "state": "writing", "last_event": null, "pending": null, "progress": progress,
        }))
        .unwrap()
    };
    let progress = json!({"txn": "1-ab", "done": 50, "total": 200, "percent": 25});
    view.observe("gw-full", "state", &writing(progress.clone()), t(1));
    let mut delta = progress;
    delta["downloaded"] = json!(1_500_000);
    view.observe("gw-delta", "state", &writing(delta), t(1));
    let lines = view.devices();
    let shown: Vec<_> = lines
        .iter()
        .map(|l| (l.device.as_str(), l.percent, l.downloaded))
        .collect();
    assert_eq!(
        shown,
        [
            ("gw-delta", Some(25), Some(1_500_000)),
            ("gw-full", Some(25), None)
        ]
    );
}
