//! The policy with a fake clock: maintenance windows (across midnight, across DST changes in a
//! real time zone), postponement and its bounds, automatic install off, the reboot policy, and a
//! week of simulated time.

use std::time::Instant;

use jiff::tz::TimeZone;

use super::*;

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn berlin() -> TimeZone {
    TimeZone::get("Europe/Berlin")
        .expect("the Europe/Berlin zone is missing; install it with `apt-get install tzdata`")
}

fn policy(windows: &[&str], reboot: RebootPolicy) -> PolicyConfig {
    PolicyConfig {
        windows: windows.iter().map(|w| w.parse().unwrap()).collect(),
        reboot,
        time_zone: TimeZone::UTC,
        ..PolicyConfig::default()
    }
}

/// A harness at `now`, booted in slot A (its mark-good answered).
fn booted(policy: PolicyConfig, now: &str) -> Harness {
    let mut h = Harness::with_policy(policy, PersistentState::default());
    h.feed_at(ts(now), boot(BOOT_1, "A"));
    h.answer(Ok(()));
    h
}

/// Booted at noon with a 02:00-04:00 install window: a release accepted now waits for the
/// night, pending.
fn at_noon_before_the_window() -> Harness {
    booted(
        policy(&["02:00-04:00"], RebootPolicy::Immediate),
        "2026-06-01T12:00:00Z",
    )
}

fn security_release(deadline: &str) -> VerifiedRelease {
    let deadline = ts(deadline);
    release_with("2.0", 2, |m| {
        m.security = true;
        m.deadline = Some(deadline);
        m.advisory = "fixes CVE-2026-0001 in the web UI".into();
        m.disruption = Disruption {
            reboot: true,
            downtime_seconds: 90,
        };
    })
}

fn is_prepare(jobs: &[Job]) -> bool {
    jobs == [Job::PrepareTarget {
        slot: bootname("B"),
    }]
}

/// Answers the write and activation jobs with success, up to the activation's answer.
fn write_and_activate(h: &mut Harness) -> Vec<Job> {
    assert!(matches!(h.answer(Ok(()))[..], [Job::Write { .. }]));
    assert_eq!(
        h.answer(Ok(())),
        [Job::Activate {
            slot: bootname("B")
        }]
    );
    h.answer(Ok(()))
}

/// From `at`, the next moment `p`'s windows allow is `expected` (`at` itself inside one).
fn assert_next_window(p: &PolicyConfig, at: &str, expected: &str) {
    assert_eq!(p.next_window_start(ts(at)), Some(ts(expected)), "from {at}");
}

#[test]
fn window_across_midnight_is_open_at_night_and_closed_by_day() {
    let p = policy(&["22:00-02:00"], RebootPolicy::Window);
    assert!(p.in_window(ts("2026-06-01T23:00:00Z")));
    assert!(p.in_window(ts("2026-06-02T01:59:59Z")));
    assert!(p.in_window(ts("2026-06-01T22:00:00Z")));
    assert!(!p.in_window(ts("2026-06-02T02:00:00Z")));
    assert!(!p.in_window(ts("2026-06-01T12:00:00Z")));
    assert_next_window(&p, "2026-06-01T12:00:00Z", "2026-06-01T22:00:00Z");
    // Inside the window (after midnight, opened the day before), now is the time.
    assert_next_window(&p, "2026-06-02T01:00:00Z", "2026-06-02T01:00:00Z");

    // Through the engine: a release at noon waits for 22:00, then installs.
    let mut h = booted(p, "2026-06-01T12:00:00Z");
    assert!(h.offer(release("2.0", 1)).is_empty());
    let pending = h.events.last().unwrap();
    assert_eq!(pending.kind, EventKind::Pending);
    assert_eq!(pending.waiting, Some(Wait::Window));
    assert_eq!(pending.until, Some(ts("2026-06-01T22:00:00Z")));
    assert_eq!(h.engine.poll_timeout(), Some(ts("2026-06-01T22:00:00Z")));
    assert!(matches!(h.notices[..], [Notice::UpdateAvailable { .. }]));
    assert!(
        h.feed_at(ts("2026-06-01T21:59:59Z"), Input::Tick)
            .is_empty()
    );
    assert!(is_prepare(
        &h.feed_at(ts("2026-06-01T22:00:00Z"), Input::Tick)
    ));
}

/// Berlin leaves CET (UTC+1) for CEST (UTC+2) on 2026-03-29 at 02:00 local, and goes back on
/// 2026-10-25 at 03:00 local. A window stays at its local time; its instants move.
#[test]
fn window_keeps_local_time_across_dst_changes_in_berlin() {
    let p = PolicyConfig {
        time_zone: berlin(),
        ..policy(&["01:00-03:00"], RebootPolicy::Window)
    };
    // Before the change, 01:00 CET is 00:00 UTC.
    assert_next_window(&p, "2026-03-28T12:00:00Z", "2026-03-29T00:00:00Z");
    // On the day of the change the window ends at 03:00 CEST = 01:00 UTC: one hour long. A
    // fixed +01:00 offset would call 01:30 UTC "02:30, inside".
    assert!(p.in_window(ts("2026-03-29T00:59:59Z")));
    assert!(!p.in_window(ts("2026-03-29T01:30:00Z")));
    // After the change, 01:00 CEST is 23:00 UTC the evening before.
    assert_next_window(&p, "2026-03-29T12:00:00Z", "2026-03-29T23:00:00Z");
    // Autumn: 01:00 CEST = 23:00 UTC; 03:00 CET = 02:00 UTC: the window lasts three hours.
    assert_next_window(&p, "2026-10-24T12:00:00Z", "2026-10-24T23:00:00Z");
    assert!(p.in_window(ts("2026-10-25T01:30:00Z")));
    assert!(!p.in_window(ts("2026-10-25T02:00:00Z")));
    // A window starting inside the spring gap (02:30 does not exist) opens right after it.
    let gap = PolicyConfig {
        time_zone: berlin(),
        ..policy(&["02:30-04:00"], RebootPolicy::Window)
    };
    assert_eq!(
        gap.next_window_start(ts("2026-03-28T12:00:00Z")),
        Some(ts("2026-03-29T01:30:00Z"))
    );
}

#[test]
fn postponing_beyond_the_maximum_is_clamped_to_it() {
    let p = PolicyConfig {
        max_postpone: SignedDuration::from_hours(24),
        ..policy(&["02:00-04:00"], RebootPolicy::Immediate)
    };
    let mut h = booted(p, "2026-06-01T12:00:00Z");
    h.offer(release("2.0", 1));
    let now = h.now + SignedDuration::from_secs(1);
    h.feed(Input::UserPostpone(Postpone::For(
        SignedDuration::from_hours(30 * 24),
    )));
    let until = now + SignedDuration::from_hours(24);
    assert_eq!(
        h.answers.last(),
        Some(&Answer::Postponed {
            until,
            requested: now + SignedDuration::from_hours(30 * 24),
            clamped: Some(Clamp::MaxPostpone),
        })
    );
    let event = h.events.last().unwrap();
    assert_eq!(
        (event.kind, event.until, event.clamped),
        (EventKind::Postponed, Some(until), Some(Clamp::MaxPostpone))
    );
    assert_eq!(event.to_version.as_deref(), Some("2.0"));
    assert_eq!(h.engine.state().user.postponed_until, Some(until));
    // The window at 02:00 the next night is skipped; the one after the postponement is used.
    assert!(
        h.feed_at(ts("2026-06-02T02:30:00Z"), Input::Tick)
            .is_empty()
    );
    assert_eq!(h.engine.poll_timeout(), Some(until));
    assert!(h.feed_at(until, Input::Tick).is_empty());
    assert_eq!(h.engine.poll_timeout(), Some(ts("2026-06-03T02:00:00Z")));
    assert!(is_prepare(
        &h.feed_at(ts("2026-06-03T02:00:00Z"), Input::Tick)
    ));
}

#[test]
fn postponing_beyond_the_deadline_is_clamped_to_the_deadline_and_the_deadline_installs() {
    let mut h = at_noon_before_the_window();
    h.offer(security_release("2026-06-03T09:00:00Z"));
    h.feed(Input::UserPostpone(Postpone::Until(ts(
        "2026-06-05T00:00:00Z",
    ))));
    let deadline = ts("2026-06-03T09:00:00Z");
    assert!(matches!(
        h.answers.last(),
        Some(Answer::Postponed { until, clamped: Some(Clamp::Deadline), .. }) if *until == deadline
    ));
    // Windows come and go while postponed; the deadline starts the install outside any window.
    for night in ["2026-06-02T02:30:00Z", "2026-06-03T02:30:00Z"] {
        assert!(h.feed_at(ts(night), Input::Tick).is_empty());
    }
    assert_eq!(h.engine.poll_timeout(), Some(deadline));
    assert!(
        h.feed_at(deadline - SignedDuration::from_secs(1), Input::Tick)
            .is_empty()
    );
    assert!(is_prepare(&h.feed_at(deadline, Input::Tick)));
    // Past the deadline, postponing is refused with a reason.
    h.feed(Input::UserPostpone(Postpone::For(
        SignedDuration::from_hours(1),
    )));
    assert!(matches!(
        h.answers.last(),
        Some(Answer::Refused(f)) if f.reason == ReasonCode::NotPostponable
    ));
}

#[test]
fn auto_install_off_only_notifies_and_the_security_deadline_applies_as_configured() {
    for deadline_applies in [true, false] {
        let p = PolicyConfig {
            security_deadline_when_off: deadline_applies,
            ..policy(&[], RebootPolicy::Immediate)
        };
        let mut h = booted(p, "2026-06-01T12:00:00Z");
        assert!(h.feed(Input::UserSetAutoInstall(false)).is_empty());
        assert_eq!(
            h.events.last().unwrap().kind,
            EventKind::AutoInstallDisabled
        );
        assert!(!h.engine.auto_install());

        // A plain release: announced (event and notice), never installed.
        h.offer(release("2.0", 1));
        let pending = h.events.last().unwrap();
        assert_eq!(
            (pending.kind, pending.waiting, pending.until),
            (EventKind::Pending, Some(Wait::AutoInstallOff), None)
        );
        assert!(matches!(
            h.notices.last(),
            Some(Notice::UpdateAvailable { .. })
        ));
        assert_eq!(h.engine.poll_timeout(), None);
        assert!(
            h.feed_at(ts("2026-06-08T12:00:00Z"), Input::Tick)
                .is_empty()
        );
        assert_eq!(h.engine.state().phase.name(), "pending");
        // The user decides: install now.
        assert!(is_prepare(&h.feed(Input::UserInstallNow)));
        assert_eq!(h.answers.last(), Some(&Answer::Done));

        // A security release with a deadline: installs at the deadline when configured so.
        let mut h = booted(
            PolicyConfig {
                auto_install: false,
                security_deadline_when_off: deadline_applies,
                ..PolicyConfig::default()
            },
            "2026-06-01T12:00:00Z",
        );
        h.offer(security_release("2026-06-04T00:00:00Z"));
        let jobs = h.feed_at(ts("2026-06-04T00:00:00Z"), Input::Tick);
        assert_eq!(is_prepare(&jobs), deadline_applies, "{jobs:?}");
    }
}

#[test]
fn manual_reboot_waits_for_the_user_but_a_security_release_reboots_at_its_deadline() {
    // Not a security release: the activated slot waits for the user.
    let mut h = booted(policy(&[], RebootPolicy::Manual), "2026-06-01T12:00:00Z");
    h.offer(release("2.0", 1));
    assert!(write_and_activate(&mut h).is_empty());
    assert_eq!(h.engine.state().phase.name(), "reboot-scheduled");
    assert_eq!(h.events.last().unwrap().waiting, Some(Wait::ManualReboot));
    assert_eq!(h.engine.poll_timeout(), None);
    assert!(
        h.feed_at(ts("2026-07-01T00:00:00Z"), Input::Tick)
            .is_empty()
    );
    assert_eq!(h.feed(Input::UserInstallNow), [Job::Reboot]);
    assert!(matches!(
        h.notices.last(),
        Some(Notice::DisruptionAhead {
            seconds: 0,
            postponable: false,
            ..
        })
    ));

    // A security release: the reboot is due at the deadline, announced `notice` before it.
    let deadline = ts("2026-06-02T03:00:00Z");
    let mut h = booted(policy(&[], RebootPolicy::Manual), "2026-06-01T12:00:00Z");
    h.offer(security_release("2026-06-02T03:00:00Z"));
    assert!(write_and_activate(&mut h).is_empty());
    let notice_at = deadline - SignedDuration::from_mins(5);
    assert_eq!(h.engine.poll_timeout(), Some(notice_at));
    assert!(h.feed_at(notice_at, Input::Tick).is_empty());
    assert!(matches!(
        h.notices.last(),
        Some(Notice::DisruptionAhead {
            seconds: 300,
            postponable: false,
            downtime_seconds: 90,
            ..
        })
    ));
    assert_eq!(h.engine.poll_timeout(), Some(deadline));
    assert_eq!(h.feed_at(deadline, Input::Tick), [Job::Reboot]);
    assert_eq!(h.events.last().unwrap().kind, EventKind::Rebooting);
}

#[test]
fn install_now_bypasses_the_window_and_the_reboot_policy() {
    let mut h = booted(
        policy(&["02:00-04:00"], RebootPolicy::Window),
        "2026-06-01T12:00:00Z",
    );
    h.offer(release("2.0", 1));
    assert!(is_prepare(&h.feed(Input::UserInstallNow)));
    assert_eq!(write_and_activate(&mut h), [Job::Reboot]);
    use EventKind::*;
    assert_eq!(
        h.states(),
        [
            Accepted, Pending, InstallNow, Writing, Written, Activated, Rebooting
        ]
    );
    // The one-shot `install` does the same without a pending phase.
    let mut h = booted(
        policy(&["02:00-04:00"], RebootPolicy::Manual),
        "2026-06-01T12:00:00Z",
    );
    assert!(is_prepare(
        &h.feed(Input::UserInstall(Box::new(release("2.0", 1))))
    ));
    assert_eq!(write_and_activate(&mut h), [Job::Reboot]);
    assert_eq!(
        h.states(),
        [Accepted, Writing, Written, Activated, Rebooting]
    );
}

#[test]
fn user_choices_persist_across_restarts_and_old_states_load() {
    let mut h = booted(
        policy(&["02:00-04:00"], RebootPolicy::Window),
        "2026-06-01T12:00:00Z",
    );
    h.feed(Input::UserSetAutoInstall(false));
    h.feed(Input::UserPostpone(Postpone::For(
        SignedDuration::from_hours(4),
    )));
    let saved = h.persisted.last().unwrap().clone();
    let json = serde_json::to_string(&saved).unwrap();
    let restored: PersistentState = serde_json::from_str(&json).unwrap();
    let h = Harness::with_policy(policy(&[], RebootPolicy::Immediate), restored);
    assert!(!h.engine.auto_install());
    assert_eq!(
        h.engine.state().user.postponed_until,
        Some(ts("2026-06-01T16:00:03Z"))
    );
    // A state written before the policy existed has no `user`: the defaults hold.
    let old = r#"{"phase":{"phase":"idle"},"floor":3,"next_seq":7,"next_txn":2,"slots":{},"last":null,"rolled_back":[]}"#;
    let old: PersistentState = serde_json::from_str(old).unwrap();
    assert!(old.user.is_default());
    // And a state without user choices is written without the field.
    assert!(!serde_json::to_string(&old).unwrap().contains("\"user\""));
}

#[test]
fn user_requests_that_cannot_apply_are_refused_with_a_reason() {
    let mut h = booted(PolicyConfig::default(), "2026-06-01T12:00:00Z");
    let count = h.events.len();
    h.feed(Input::UserInstallNow);
    h.feed(Input::UserPostpone(Postpone::Until(ts(
        "2026-01-01T00:00:00Z",
    ))));
    h.feed(Input::UserResume);
    let reasons: Vec<_> = h
        .answers
        .iter()
        .map(|a| match a {
            Answer::Refused(f) => Some(f.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            Some(ReasonCode::NothingPending),
            Some(ReasonCode::InvalidRequest),
            None
        ]
    );
    // Only the decision that took effect is an event.
    assert_eq!(h.events.len(), count + 1);
    assert_eq!(h.events.last().unwrap().kind, EventKind::Resumed);
    // Marking: the booted slot good, the other bad, never the booted bad. The answer and the
    // event wait for the bootloader's result.
    let answered = h.answers.len();
    assert_eq!(
        h.feed(Input::UserMark { good: false }),
        [Job::MarkBad {
            slot: bootname("B")
        }]
    );
    assert_eq!(
        h.answers.len(),
        answered,
        "answered before the bootloader ran"
    );
    assert_eq!(h.events.last().unwrap().kind, EventKind::Resumed);
    assert!(h.answer(Ok(())).is_empty());
    assert_eq!(h.answers.last(), Some(&Answer::Done));
    let marked = h.events.last().unwrap();
    assert_eq!(
        (marked.kind, marked.slot.as_deref(), marked.reason),
        (EventKind::MarkedBad, Some("B"), None)
    );
}

#[test]
fn a_mark_the_bootloader_fails_is_answered_with_its_reason() {
    let mut h = booted(policy(&[], RebootPolicy::Immediate), "2026-06-01T12:00:00Z");
    assert_eq!(
        h.feed(Input::UserMark { good: true }),
        [Job::MarkGood {
            slot: bootname("A")
        }]
    );
    let failure = Failure::new(ReasonCode::BootloaderFailed, "fw_setenv: no space left");
    assert!(h.answer(Err(failure.clone())).is_empty());
    assert_eq!(h.answers.last(), Some(&Answer::Refused(failure)));
    let marked = h.events.last().unwrap();
    assert_eq!(
        (marked.kind, marked.reason),
        (EventKind::MarkedGood, Some(ReasonCode::BootloaderFailed))
    );
    // The next bootloader answer (an unrelated one) is no longer taken for the mark's.
    let answers = h.answers.len();
    h.feed(Input::JobDone(
        Job::MarkGood {
            slot: bootname("A"),
        },
        Ok(()),
    ));
    assert_eq!(h.answers.len(), answers);
}

/// Seven days of a gateway's life with a night window in Berlin, driven only by the engine's
/// own timer: a release arrives, the user postpones it over a night, it installs in the next
/// window, the reboot (still inside the window, so not scheduled) is announced and happens, the
/// trial commits.
#[test]
fn a_week_of_simulated_time_runs_in_well_under_a_second() {
    let started = Instant::now();
    let p = PolicyConfig {
        time_zone: berlin(),
        ..policy(&["02:00-04:00"], RebootPolicy::Window)
    };
    let mut h = booted(p, "2026-06-01T10:00:00Z");
    let end = ts("2026-06-08T10:00:00Z");
    let mut ticks = 0;
    let mut boots = 1;
    let mut reboot_told: Option<(Timestamp, Notice)> = None;
    h.offer(release("2.0", 1));
    h.feed(Input::UserPostpone(Postpone::For(
        SignedDuration::from_hours(20),
    )));
    let mut jobs = Vec::new();
    while h.now < end {
        if reboot_told.is_none() {
            reboot_told = h
                .notices
                .iter()
                .find(|n| matches!(n, Notice::DisruptionAhead { .. }))
                .map(|n| (h.now, n.clone()));
        }
        // Answer every job as a driver would; then sleep until the engine's timer (or an hour,
        // which the engine must treat as a harmless extra tick).
        if let Some(job) = jobs.pop() {
            let input = match job {
                Job::Reboot => {
                    assert!(reboot_told.is_some(), "rebooted without telling the user");
                    boots += 1;
                    boot(&format!("boot-{boots}"), "B")
                }
                job => Input::JobDone(job, Ok(())),
            };
            jobs = h.feed(input);
            continue;
        }
        let next = h
            .engine
            .poll_timeout()
            .unwrap_or(h.now + SignedDuration::from_hours(1))
            .min(h.now + SignedDuration::from_hours(1))
            .max(h.now);
        ticks += 1;
        jobs = h.feed_at(next, Input::Tick);
    }
    let elapsed = started.elapsed();
    use EventKind::*;
    let states: Vec<_> = h.states().into_iter().filter(|s| *s != Postponed).collect();
    assert_eq!(
        states,
        [
            Accepted, Pending, Writing, Written, Activated, Rebooting, TrialBoot, Committed
        ]
    );
    let at = |state| h.events.iter().find(|e| e.kind == state).unwrap().at;
    // Postponed over the first night (02:00 CEST on 2 June = 00:00 UTC); the second night's
    // window opens at 2026-06-03T00:00Z, and the write and reboot happen inside it.
    let window = ts("2026-06-03T00:00:00Z");
    assert!(at(Writing) >= window && at(Writing) < window + SignedDuration::from_mins(1));
    let rebooting = at(Rebooting);
    assert!(rebooting >= ts("2026-06-03T00:00:00Z") && rebooting < ts("2026-06-03T02:00:00Z"));
    let (told_at, notice) = reboot_told.unwrap();
    assert!(told_at <= rebooting);
    assert!(matches!(notice, Notice::DisruptionAhead { .. }));
    assert!(matches!(
        h.notices.last(),
        Some(Notice::Completed {
            result: Committed,
            ..
        })
    ));
    assert!(ticks < 400, "{ticks} ticks for a week");
    assert!(
        elapsed.as_millis() < 500,
        "a simulated week took {elapsed:?}"
    );
}

/// A release that waits for a window: version, security version, and the same deadline.
fn pending_release(version: &str, security_version: u64) -> VerifiedRelease {
    release_with(version, security_version, |m| {
        m.security = true;
        m.deadline = Some(ts("2026-06-05T12:00:00Z"));
    })
}

fn pending_version(h: &Harness) -> Option<String> {
    match &h.engine.state().phase {
        Phase::Pending { txn, .. } => Some(txn.manifest.version.clone()),
        _ => None,
    }
}

/// The release offered last was refused for `reason`, and `version` is still the one pending.
fn assert_refused_and_still_pending(h: &Harness, reason: ReasonCode, version: &str) {
    assert_eq!(h.last_event(), (EventKind::Refused, Some(reason)));
    assert_eq!(pending_version(h).as_deref(), Some(version));
}

#[test]
fn a_newer_release_supersedes_a_pending_one_and_the_postponement_still_holds() {
    let mut h = at_noon_before_the_window();
    assert!(h.offer(pending_release("2.0", 2)).is_empty());
    let old_txn = h.events.last().unwrap().txn.clone().unwrap();
    h.feed(Input::UserPostpone(Postpone::For(
        SignedDuration::from_hours(20),
    )));
    let postponed_until = h.engine.state().user.postponed_until;
    assert!(postponed_until.is_some());
    let before = h.events.len();

    let jobs = h.offer(pending_release("2.1", 3));
    assert!(jobs.is_empty(), "nothing is written outside the window");
    let new: Vec<_> = h.events[before..].to_vec();
    assert_eq!(
        new.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            EventKind::Superseded,
            EventKind::Accepted,
            EventKind::Pending
        ]
    );
    assert_eq!(new[0].txn.as_deref(), Some(old_txn.as_str()));
    assert_eq!(new[0].to_version.as_deref(), Some("2.0"));
    assert_eq!(new[0].reason, None, "superseding is not a failure");
    assert!(new[0].message.as_deref().unwrap().contains("2.1"));
    assert_ne!(new[1].txn, new[0].txn);
    assert!(new.windows(2).all(|w| w[0].seq < w[1].seq));
    // Persisted before reported: the state saved last holds the new release, pending.
    let saved = h.persisted.last().unwrap();
    assert!(matches!(&saved.phase, Phase::Pending { txn, .. } if txn.manifest.version == "2.1"));
    assert_eq!(pending_version(&h).as_deref(), Some("2.1"));
    assert_eq!(h.engine.state().user.postponed_until, postponed_until);
    assert!(matches!(
        h.notices.last(),
        Some(Notice::UpdateAvailable { version, .. }) if version == "2.1"
    ));

    // The postponement (until 08:00 the next day) covers the night's window; the window after
    // it installs 2.1.
    assert!(
        h.feed_at(ts("2026-06-02T02:30:00Z"), Input::Tick)
            .is_empty()
    );
    let jobs = h.feed_at(ts("2026-06-03T02:00:00Z"), Input::Tick);
    assert!(is_prepare(&jobs));
    let Phase::Writing { txn, .. } = &h.engine.state().phase else {
        panic!("not writing: {:?}", h.engine.state().phase);
    };
    assert_eq!(txn.manifest.version, "2.1");
}

fn signed_later(version: &str, security_version: u64, created: &str) -> VerifiedRelease {
    let created = ts(created);
    release_with(version, security_version, |m| {
        m.security = true;
        m.created = created;
    })
}

#[test]
fn the_same_security_version_signed_later_supersedes_and_the_earlier_one_does_not_come_back() {
    let mut h = at_noon_before_the_window();
    let first = signed_later("2.0", 2, "2026-05-01T00:00:00Z");
    h.offer(first.clone());
    h.offer(signed_later("2.0.1", 2, "2026-05-02T00:00:00Z"));
    assert_eq!(pending_version(&h).as_deref(), Some("2.0.1"));
    assert!(h.states().contains(&EventKind::Superseded));
    // The first one again (a periodic re-check sees both retained releases): refused.
    h.offer(first);
    assert_refused_and_still_pending(&h, ReasonCode::Downgrade, "2.0.1");
}

#[test]
fn an_older_release_does_not_supersede_the_pending_one() {
    let mut h = at_noon_before_the_window();
    h.offer(pending_release("2.1", 3));
    let jobs = h.offer(pending_release("2.0", 2));
    assert!(jobs.is_empty());
    assert_refused_and_still_pending(&h, ReasonCode::Downgrade, "2.1");
    assert!(!h.states().contains(&EventKind::Superseded));
}

#[test]
fn a_newer_release_that_the_engine_refuses_leaves_the_pending_one() {
    let mut h = at_noon_before_the_window();
    h.offer(pending_release("2.0", 2));
    // No image for this device's slot class.
    let other_class = release_with("3.0", 4, |m| {
        let image = m.images.remove("rootfs").unwrap();
        m.images.insert("appfs".into(), image);
    });
    h.offer(other_class);
    assert_refused_and_still_pending(&h, ReasonCode::Incompatible, "2.0");
    assert!(!h.states().contains(&EventKind::Superseded));
}

#[test]
fn a_newer_release_while_one_is_being_written_is_refused_busy() {
    let mut h = booted(policy(&[], RebootPolicy::Immediate), "2026-06-01T12:00:00Z");
    assert!(is_prepare(&h.offer(pending_release("2.0", 2))));
    h.offer(pending_release("2.1", 3));
    assert_eq!(h.last_event(), (EventKind::Refused, Some(ReasonCode::Busy)));
}
