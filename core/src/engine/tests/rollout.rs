//! A staged rollout on the fake clock: each device waits for its own moment in the signed
//! window, under the policy; a deadline earlier than the moment and a person's install-now win;
//! a withdrawn release is dropped only while nothing was written.

use super::*;
use crate::release::manifest::{FORMAT_ROLLOUT, Rollout};

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// A harness for device `device_id` at 2026-06-01T00:00Z, booted in slot A.
fn device(device_id: &str, policy: PolicyConfig) -> Harness {
    let mut h = Harness::with_policy(policy, PersistentState::default());
    h.engine.device_id = device_id.to_string();
    h.feed_at(ts("2026-06-01T00:00:00Z"), boot(BOOT_1, "A"));
    h.answer(Ok(()));
    h
}

const WINDOW_START: &str = "2026-06-01T01:00:00Z";
const WINDOW_SECONDS: u64 = 24 * 3600;

fn staged(edit: impl FnOnce(&mut Manifest)) -> VerifiedRelease {
    release_with("2.0", 2, |m| {
        m.format = FORMAT_ROLLOUT;
        m.rollout = Some(Rollout {
            start: ts(WINDOW_START),
            duration: WINDOW_SECONDS,
        });
        edit(m);
    })
}

fn moment_of(h: &Harness) -> Timestamp {
    let txn = h.engine.state().phase.transaction().unwrap();
    h.engine.moment(txn).unwrap()
}

fn is_prepare(jobs: &[Job]) -> bool {
    jobs == [Job::PrepareTarget {
        slot: bootname("B"),
    }]
}

#[test]
fn a_device_waits_for_its_moment_and_reports_it() {
    let mut h = device("gw-0001", PolicyConfig::default());
    let release = staged(|_| {});
    let expected = crate::engine::rollout::moment(
        release.manifest.rollout.as_ref().unwrap(),
        &release.release_id(),
        "gw-0001",
    );
    assert!(expected >= ts(WINDOW_START));
    assert!(h.offer(release).is_empty());
    assert_eq!(
        h.states()[h.states().len() - 2..],
        [EventKind::Accepted, EventKind::Pending]
    );
    let pending = h.events.last().unwrap();
    assert_eq!(pending.waiting, Some(Wait::Rollout));
    assert_eq!(pending.until, Some(expected));
    assert!(matches!(
        h.engine.state().phase,
        Phase::Pending { waiting: Wait::Rollout, until: Some(u), .. } if u == expected
    ));
    assert_eq!(h.engine.poll_timeout(), Some(expected));
    // A tick a second early changes nothing; at the moment it installs.
    let before = h.events.len();
    assert!(
        h.feed_at(expected - SignedDuration::from_secs(1), Input::Tick)
            .is_empty()
    );
    assert_eq!(h.events.len(), before);
    assert!(is_prepare(&h.feed_at(expected, Input::Tick)));
}

#[test]
fn the_moment_survives_a_restart_and_differs_between_devices() {
    let mut h = device("gw-0001", PolicyConfig::default());
    h.offer(staged(|_| {}));
    let moment = moment_of(&h);
    // After a restart the same device computes the same moment from the persisted release.
    let persisted = h.persisted.last().unwrap().clone();
    let mut again = Harness::with_policy(PolicyConfig::default(), persisted);
    again.engine.device_id = "gw-0001".into();
    again.feed_at(ts("2026-06-01T00:10:00Z"), boot(BOOT_1, "A"));
    again.answer(Ok(()));
    assert_eq!(moment_of(&again), moment);
    assert_eq!(again.engine.poll_timeout(), Some(moment));
    // Another device draws another moment for the same release.
    let mut other = device("gw-0002", PolicyConfig::default());
    other.offer(staged(|_| {}));
    assert_ne!(moment_of(&other), moment);
}

#[test]
fn a_signed_deadline_before_the_moment_wins() {
    // The moment of some device is late in the window; the deadline an hour into it.
    let deadline = ts("2026-06-01T02:00:00Z");
    let release = staged(|m| m.deadline = Some(deadline));
    let late = (0..100)
        .map(|i| format!("gw-{i:04}"))
        .find(|d| {
            crate::engine::rollout::moment(
                release.manifest.rollout.as_ref().unwrap(),
                &release.release_id(),
                d,
            ) > deadline
        })
        .expect("some device's moment is after the first hour of a day-long window");
    let mut h = device(&late, PolicyConfig::default());
    assert!(h.offer(release).is_empty());
    let pending = h.events.last().unwrap();
    assert_eq!(pending.waiting, Some(Wait::Rollout));
    assert_eq!(pending.until, Some(deadline));
    assert_eq!(h.engine.poll_timeout(), Some(deadline));
    assert!(moment_of(&h) > deadline);
    assert!(is_prepare(&h.feed_at(deadline, Input::Tick)));
}

#[test]
fn a_persons_install_now_wins_over_the_moment() {
    let mut h = device("gw-0001", PolicyConfig::default());
    h.offer(staged(|_| {}));
    assert!(moment_of(&h) > h.now);
    assert!(is_prepare(&h.feed(Input::UserInstallNow)));
    assert_eq!(h.events.last().unwrap().kind, EventKind::InstallNow);
    // And `update-agent install` of a staged release does not wait either.
    let mut h = device("gw-0001", PolicyConfig::default());
    assert!(is_prepare(
        &h.feed(Input::UserInstall(Box::new(staged(|_| {}))))
    ));
}

#[test]
fn after_its_moment_a_device_still_waits_for_its_maintenance_window() {
    // Windows at night only; a window of zero seconds puts every device's moment at 01:00.
    let policy = PolicyConfig {
        windows: vec!["22:00-23:00".parse().unwrap()],
        ..PolicyConfig::default()
    };
    let mut h = device("gw-0001", policy);
    let release = staged(|m| m.rollout.as_mut().unwrap().duration = 0);
    h.offer(release);
    let pending = h.events.last().unwrap();
    assert_eq!(
        (pending.waiting, pending.until),
        (Some(Wait::Rollout), Some(ts(WINDOW_START)))
    );
    assert!(h.feed_at(ts(WINDOW_START), Input::Tick).is_empty());
    assert!(matches!(
        h.engine.state().phase,
        Phase::Pending { waiting: Wait::Window, until: Some(u), .. } if u == ts("2026-06-01T22:00:00Z")
    ));
    assert!(is_prepare(
        &h.feed_at(ts("2026-06-01T22:00:00Z"), Input::Tick)
    ));
}

#[test]
fn a_postponement_past_the_moment_holds_the_install() {
    let mut h = device("gw-0001", PolicyConfig::default());
    h.offer(staged(|m| m.rollout.as_mut().unwrap().duration = 0));
    let until = ts("2026-06-02T12:00:00Z");
    h.feed(Input::UserPostpone(Postpone::Until(until)));
    assert!(h.feed_at(ts(WINDOW_START), Input::Tick).is_empty());
    assert!(matches!(
        h.engine.state().phase,
        Phase::Pending {
            waiting: Wait::Postponed,
            ..
        }
    ));
    assert!(is_prepare(&h.feed_at(until, Input::Tick)));
}

#[test]
fn a_release_without_a_schedule_installs_at_once_as_before() {
    let mut h = device("gw-0001", PolicyConfig::default());
    let release = release("2.0", 2);
    assert_eq!(release.manifest.format, crate::release::manifest::FORMAT);
    assert!(is_prepare(&h.offer(release)));
    let txn = h.engine.state().phase.transaction().unwrap();
    assert_eq!(h.engine.moment(txn), None);
}

#[test]
fn a_withdrawn_release_is_dropped_while_pending_only() {
    let mut h = device("gw-0001", PolicyConfig::default());
    let release = staged(|_| {});
    let id = release.release_id();
    h.offer(release);
    // Another release's withdrawal is not about this one.
    let other = crate::release::ReleaseId::from_digest([1; 32]);
    h.feed(Input::Withdrawn {
        release_id: other,
        why: "cleared".into(),
    });
    assert_eq!(h.events.last().unwrap().kind, EventKind::Pending);
    h.feed(Input::Withdrawn {
        release_id: id,
        why: "the fleet release topic was cleared".into(),
    });
    let withdrawn = h.events.last().unwrap();
    assert_eq!(withdrawn.kind, EventKind::Withdrawn);
    assert_eq!(withdrawn.release_id, Some(id));
    assert_eq!(withdrawn.to_version.as_deref(), Some("2.0"));
    assert_eq!(withdrawn.reason, None);
    assert!(
        withdrawn
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("the fleet release topic was cleared")),
        "{withdrawn:?}"
    );
    assert_eq!(h.engine.state().phase, Phase::Idle);
    assert_eq!(
        h.engine.state().last.as_ref().map(|o| o.result),
        Some(EventKind::Withdrawn)
    );
    assert_eq!(
        h.persisted.last().unwrap().phase,
        Phase::Idle,
        "the withdrawal is persisted"
    );
    assert_eq!(h.engine.poll_timeout(), None);
    // Published again (the operator resumed the rollout): accepted again, same moment.
    h.offer(staged(|_| {}));
    assert_eq!(h.events.last().unwrap().kind, EventKind::Pending);

    // Once writing started, a withdrawal changes nothing: the install goes on.
    let mut h = device("gw-0001", PolicyConfig::default());
    let release = staged(|m| m.rollout.as_mut().unwrap().start = ts("2026-05-01T00:00:00Z"));
    let id = release.release_id();
    assert!(is_prepare(&h.offer(release)));
    let events = h.events.len();
    let withdrawn = Input::Withdrawn {
        release_id: id,
        why: "cleared".into(),
    };
    assert!(h.feed(withdrawn).is_empty());
    assert_eq!(h.events.len(), events);
    assert!(matches!(h.answer(Ok(()))[..], [Job::Write { .. }]));
}
