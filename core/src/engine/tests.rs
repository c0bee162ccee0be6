//! Whole transactions driven through the core with a fake clock: no files, no sockets, no sleeps.

use alloc::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use jiff::{SignedDuration, Timestamp};

use super::*;
use crate::keys::TrustedKeys;
use crate::reason::ReasonCode;
use crate::release::manifest::{Disruption, FORMAT, Image, Severity};
use crate::release::sign::sign_manifest;
use crate::release::{Manifest, Policy, VerifiedRelease, verify};

const BOOT_1: &str = "boot-1";
const BOOT_2: &str = "boot-2";

fn release(version: &str, security_version: u64) -> VerifiedRelease {
    release_with(version, security_version, |_| {})
}

/// A release whose manifest `edit` changed (deadline, security flag, …) before signing.
fn release_with(
    version: &str,
    security_version: u64,
    edit: impl FnOnce(&mut Manifest),
) -> VerifiedRelease {
    let key = SigningKey::from_bytes(&[9; 32]);
    let manifest = Manifest {
        format: FORMAT,
        version: version.into(),
        security_version,
        compatible: "acme-gw".into(),
        created: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires: None,
        security: false,
        severity: Severity::None,
        advisory: String::new(),
        disruption: Disruption::default(),
        deadline: None,
        images: BTreeMap::from([(
            "rootfs".to_string(),
            Image::uncompressed("http://127.0.0.1/image", 4096, [0xab; 32]),
        )]),
        rollout: None,
    };
    let mut manifest = manifest;
    edit(&mut manifest);
    let envelope = sign_manifest(&manifest, &key).unwrap();
    let anchor = TrustedKeys::from_keys([key.verifying_key()]);
    let policy = Policy {
        threshold: 1,
        compatible: Some("acme-gw".into()),
        floor: 0,
        now: "2026-06-01T00:00:00Z".parse().unwrap(),
    };
    verify(envelope.to_json().as_bytes(), &anchor, &policy).unwrap()
}

struct Harness {
    engine: Engine,
    now: Timestamp,
    events: Vec<Event>,
    persisted: Vec<PersistentState>,
    notices: Vec<Notice>,
    answers: Vec<Answer>,
    /// The job the engine asked for last, which [`Harness::answer`] answers, as a driver does.
    running: Option<Job>,
}

impl Harness {
    fn new() -> Harness {
        Harness::restore(PersistentState::default())
    }

    /// A new engine that saw the factory boot in slot A (and asked to mark it good).
    fn booted() -> Harness {
        let mut h = Harness::new();
        h.feed(boot(BOOT_1, "A"));
        h
    }

    /// A new engine that saw the factory boot in slot A, asked to mark it good, and was told
    /// it is (which asks for nothing more).
    fn booted_and_marked_good() -> Harness {
        let mut h = Harness::new();
        assert_eq!(h.feed(boot(BOOT_1, "A")), vec![mark_good("A")]);
        assert!(h.answer(Ok(())).is_empty());
        h
    }

    /// The agent restarted: a new engine from the state persisted last.
    fn restarted(&self) -> Harness {
        Harness::restore(self.persisted.last().unwrap().clone())
    }

    fn restore(state: PersistentState) -> Harness {
        Harness::with_policy(PolicyConfig::default(), state)
    }

    fn with_policy(policy: PolicyConfig, state: PersistentState) -> Harness {
        let slots = SlotPair {
            class: "rootfs".into(),
            bootnames: [bootname("A"), bootname("B")],
        };
        Harness {
            engine: Engine::new(slots, state).with_policy(policy),
            now: "2026-06-01T00:00:00Z".parse().unwrap(),
            events: Vec::new(),
            persisted: Vec::new(),
            notices: Vec::new(),
            answers: Vec::new(),
            running: None,
        }
    }

    /// Feeds one input and returns the job it asks for, if any (what else comes out is
    /// recorded).
    fn feed(&mut self, input: Input) -> Vec<Job> {
        self.now += SignedDuration::from_secs(1);
        self.feed_now(input)
    }

    /// A release arrives, verified.
    fn offer(&mut self, release: VerifiedRelease) -> Vec<Job> {
        self.feed(Input::ReleaseVerified(Box::new(release)))
    }

    /// Feeds one input at `at` (the fake clock jumps there).
    fn feed_at(&mut self, at: Timestamp, input: Input) -> Vec<Job> {
        self.now = at;
        self.feed_now(input)
    }

    /// Answers the job the engine asked for last with `result`, as a driver does.
    fn answer(&mut self, result: Result<(), Failure>) -> Vec<Job> {
        let job = self.running.take().expect("the engine asked for no job");
        self.feed(Input::JobDone(job, result))
    }

    fn feed_now(&mut self, input: Input) -> Vec<Job> {
        let first_new_seq = self.engine.state().next_seq;
        let actions = self.engine.handle(input, self.now);
        assert_driver_order(&actions, first_new_seq);
        let mut jobs = Vec::new();
        for action in actions {
            match action {
                Action::Persist => self.persisted.push(self.engine.state().clone()),
                // Like the event log: a seq reported again after a restart is kept once.
                Action::Report(event) => {
                    if self.events.last().is_none_or(|last| event.seq > last.seq) {
                        self.events.push(event);
                    }
                }
                Action::ReportProgress(_) | Action::Check => {}
                Action::Notify(notice) => self.notices.push(notice),
                Action::Answer(answer) => self.answers.push(answer),
                Action::Run(job) => jobs.push(job),
            }
        }
        if let Some(job) = jobs.last() {
            self.running = Some(job.clone());
        }
        jobs
    }

    /// The kind and reason of the last event reported.
    fn last_event(&self) -> (EventKind, Option<ReasonCode>) {
        let last = self.events.last().expect("an event was reported");
        (last.kind, last.reason)
    }

    fn states(&self) -> Vec<EventKind> {
        self.events.iter().map(|e| e.kind).collect()
    }

    /// Offers `release` and answers its prepare and its write with success: the jobs asked for
    /// next (the activation).
    fn write_until_activation(&mut self, release: VerifiedRelease) -> Vec<Job> {
        self.offer(release);
        self.answer(Ok(()));
        self.answer(Ok(()))
    }

    /// After [`Harness::install_until_reboot`]: boots the new slot B and answers its health
    /// check with success; the jobs asked for next.
    fn pass_the_trial_boot(&mut self) -> Vec<Job> {
        self.feed(boot(BOOT_2, "B"));
        self.answer(Ok(()))
    }

    /// After [`Harness::install_until_reboot`]: boots the new slot B and answers its health
    /// check with a failure (`unit app.service is failed`); the jobs asked for next.
    fn fail_the_trial_boot(&mut self) -> Vec<Job> {
        self.feed(boot(BOOT_2, "B"));
        let failure = Failure::new(ReasonCode::HealthCheckFailed, "unit app.service is failed");
        self.answer(Err(failure))
    }

    /// Runs from `ReleaseVerified` to the reboot request, answering every job with success.
    fn install_until_reboot(&mut self, release: VerifiedRelease) {
        let jobs = self.offer(release);
        assert_eq!(jobs, vec![prepare("B")]);
        let jobs = self.answer(Ok(()));
        assert!(matches!(&jobs[..], [Job::Write { slot, resume_from: 0, .. }] if slot == "B"));
        assert!(
            self.feed(Input::WriteCheckpoint { durable: 2048 })
                .is_empty()
        );
        let jobs = self.answer(Ok(()));
        assert_eq!(jobs, vec![activate("B")]);
        let jobs = self.answer(Ok(()));
        assert_eq!(jobs, vec![Job::Reboot]);
    }
}

/// The order the driver relies on, checked on every output of every test that uses the
/// harness: events replayed from before this input come before the one `Persist`, the events
/// this input made after it; the answer after every report and notice; at most one job, last.
fn assert_driver_order(actions: &[Action], first_new_seq: u64) {
    let persist = actions.iter().position(|a| *a == Action::Persist);
    let count = |f: fn(&Action) -> bool| actions.iter().filter(|a| f(a)).count();
    assert!(count(|a| *a == Action::Persist) <= 1, "{actions:?}");
    assert!(
        count(|a| matches!(a, Action::Answer(_))) <= 1,
        "{actions:?}"
    );
    assert!(count(|a| matches!(a, Action::Run(_))) <= 1, "{actions:?}");
    for (i, action) in actions.iter().enumerate() {
        match action {
            Action::Report(event) if event.seq >= first_new_seq => {
                assert!(persist.is_some_and(|p| p < i), "{actions:?}")
            }
            Action::Report(_) => assert!(persist.is_some_and(|p| i < p), "{actions:?}"),
            Action::Answer(_) => assert!(
                actions[i..]
                    .iter()
                    .all(|a| !matches!(a, Action::Report(_) | Action::Notify(_) | Action::Persist)),
                "{actions:?}"
            ),
            Action::Run(_) => assert_eq!(i, actions.len() - 1, "{actions:?}"),
            _ => {}
        }
    }
}

mod policy;
mod rollout;

#[test]
fn install_reboot_trial_commit() {
    let mut h = Harness::booted_and_marked_good();
    h.install_until_reboot(release("2.0", 5));
    let jobs = h.feed(boot(BOOT_2, "B"));
    assert_eq!(jobs, vec![Job::CheckHealth]);
    let jobs = h.answer(Ok(()));
    assert_eq!(jobs, vec![mark_good("B")]);
    assert!(h.answer(Ok(())).is_empty());
    use EventKind::*;
    assert_eq!(
        h.states(),
        [
            Accepted, Writing, Written, Activated, Rebooting, TrialBoot, Committed
        ]
    );
    let state = h.engine.state();
    assert_eq!(state.phase, Phase::Idle);
    assert_eq!(state.floor, 5);
    assert!(state.slots["B"].committed);
    assert_eq!(h.engine.booted_version(), Some("2.0"));
    let seqs: Vec<u64> = h.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
}

#[test]
fn state_is_persisted_before_every_irreversible_job() {
    let mut h = Harness::booted();
    let actions = h
        .engine
        .handle(Input::ReleaseVerified(Box::new(release("2.0", 1))), h.now);
    let persist = actions.iter().position(|a| *a == Action::Persist).unwrap();
    let run = actions
        .iter()
        .position(|a| matches!(a, Action::Run(Job::PrepareTarget { .. })))
        .unwrap();
    assert!(persist < run);
    let actions = h.engine.handle(Input::JobDone(prepare("B"), Ok(())), h.now);
    let Some(Action::Run(write)) = actions.last().cloned() else {
        panic!("{actions:?}")
    };
    let actions = h.engine.handle(Input::JobDone(write, Ok(())), h.now);
    assert_eq!(actions.first(), Some(&Action::Persist));
    assert!(matches!(
        actions.last(),
        Some(Action::Run(Job::Activate { .. }))
    ));
    let actions = h
        .engine
        .handle(Input::JobDone(activate("B"), Ok(())), h.now);
    assert_eq!(actions.first(), Some(&Action::Persist));
    assert_eq!(actions.last(), Some(&Action::Run(Job::Reboot)));
}

#[test]
fn bootloader_fallback_is_reported_as_rolled_back_and_not_retried() {
    let mut h = Harness::booted();
    let rel = release("2.0", 1);
    h.install_until_reboot(rel.clone());
    // The new slot never came up healthy: the bootloader went back to A.
    let jobs = h.feed(boot(BOOT_2, "A"));
    assert_eq!(jobs, vec![mark_bad("B")]);
    let last = h.events.last().unwrap();
    assert_eq!(last.kind, EventKind::RolledBack);
    assert_eq!(last.reason, Some(ReasonCode::FellBack));
    assert_eq!(
        h.engine.state().floor,
        0,
        "a rolled-back release must not raise the floor"
    );
    // Then A, which came back, gets back the try its boot spent.
    assert_eq!(h.answer(Ok(())), vec![mark_good("A")]);
    assert!(h.answer(Ok(())).is_empty());
    // The same release, delivered again, is refused and not installed.
    let jobs = h.offer(rel);
    assert!(jobs.is_empty());
    assert_eq!(
        h.last_event(),
        (EventKind::Refused, Some(ReasonCode::PreviouslyRolledBack))
    );
}

#[test]
fn failed_health_check_marks_bad_reboots_and_reports_rolled_back() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    let jobs = h.fail_the_trial_boot();
    assert_eq!(jobs, vec![mark_bad("B")]);
    assert_eq!(h.answer(Ok(())), vec![Job::Reboot]);
    let jobs = h.feed(boot("boot-3", "A"));
    assert_eq!(jobs, vec![mark_bad("B")]);
    let last = h.events.last().unwrap();
    assert_eq!(last.kind, EventKind::RolledBack);
    assert_eq!(last.reason, Some(ReasonCode::HealthCheckFailed));
    assert_eq!(last.message.as_deref(), Some("unit app.service is failed"));
    // Even when marking B bad failed, A is kept.
    let failure = Failure::new(ReasonCode::BootloaderFailed, "fw_setenv failed");
    assert_eq!(h.answer(Err(failure)), vec![mark_good("A")]);
    assert!(h.answer(Ok(())).is_empty());
}

/// Regression: nothing gave the running slot back the try its boot spent, so a committed slot
/// was left by U-Boot after `attempts` boots and by GRUB at the second (tests/install_cycle.rs,
/// `stays_in_the_running_slot_across_reboots`).
#[test]
fn every_boot_in_idle_marks_the_booted_slot_good() {
    let mut h = Harness::booted_and_marked_good();
    h.install_until_reboot(release("2.0", 1));
    h.pass_the_trial_boot();
    assert!(h.answer(Ok(())).is_empty());
    let count = h.events.len();
    for boot_id in ["boot-3", "boot-4", "boot-5"] {
        assert_eq!(h.feed(boot(boot_id, "B")), vec![mark_good("B")]);
        assert!(h.answer(Ok(())).is_empty());
    }
    assert_eq!(h.events.len(), count, "an ordinary boot is not an event");
    assert_eq!(h.persisted.last(), Some(h.engine.state()));
}

#[test]
fn restart_during_write_resumes_from_the_durable_checkpoint() {
    let mut h = Harness::booted();
    h.offer(release("2.0", 1));
    h.answer(Ok(()));
    h.feed(Input::WriteCheckpoint { durable: 1024 });
    h.feed(Input::WriteProgress {
        written: 3000,
        total: 4096,
        downloaded: None,
    });
    // Power cut: only what was persisted survives.
    let saved = h.persisted.last().unwrap().clone();
    let mut h = Harness::restore(saved);
    let jobs = h.feed(boot(BOOT_2, "A"));
    assert_eq!(jobs, vec![prepare("B")]);
    let jobs = h.answer(Ok(()));
    assert!(matches!(
        &jobs[..],
        [Job::Write {
            resume_from: 1024,
            ..
        }]
    ));
}

#[test]
fn restart_while_reboot_pending_in_the_same_boot_asks_for_the_reboot_again() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    let mut h = h.restarted();
    assert_eq!(h.feed(boot(BOOT_1, "A")), vec![Job::Reboot]);
}

#[test]
fn restart_after_activation_was_persisted_activates_again() {
    let mut h = Harness::booted();
    h.write_until_activation(release("2.0", 1));
    let mut h = h.restarted();
    assert_eq!(h.feed(boot(BOOT_1, "A")), vec![activate("B")]);
}

#[test]
fn booting_the_new_slot_while_activating_is_its_trial_boot() {
    let mut h = Harness::booted();
    h.write_until_activation(release("2.0", 1));
    // Cut after the bootloader switched, before RebootPending was persisted; B came up.
    let mut h = h.restarted();
    let actions = h.engine.handle(boot(BOOT_2, "B"), h.now);
    let kinds: Vec<_> = actions
        .iter()
        .map(|a| match a {
            Action::Report(e) => e.kind.as_str(),
            Action::Persist => "persist",
            Action::Run(Job::CheckHealth) => "health",
            _ => "other",
        })
        .collect();
    // First the replay of the last persisted transition's events, then the trial.
    assert!(
        kinds.ends_with(&["persist", "activated", "trial-boot", "health"]),
        "{kinds:?}"
    );
}

#[test]
fn failed_write_ends_the_transaction_with_its_reason() {
    let mut h = Harness::booted();
    h.offer(release("2.0", 1));
    h.answer(Ok(()));
    let jobs = h.answer(Err(Failure::new(ReasonCode::SlotIo, "short write")));
    assert!(jobs.is_empty());
    let state = h.engine.state();
    assert_eq!(state.phase, Phase::Idle);
    assert!(!state.slots.contains_key("B"));
    assert_eq!(
        state.last.as_ref().unwrap().reason,
        Some(ReasonCode::SlotIo)
    );
    assert_eq!(h.events.last().unwrap().kind, EventKind::Failed);
}

#[test]
fn a_second_release_during_a_transaction_is_refused_as_busy_and_the_same_one_ignored() {
    let mut h = Harness::booted();
    let first = release("2.0", 1);
    h.offer(first.clone());
    let count = h.events.len();
    assert!(h.offer(first).is_empty());
    assert_eq!(h.events.len(), count, "a repeated delivery is not news");
    assert!(h.offer(release("3.0", 1)).is_empty());
    assert_eq!(h.events.last().unwrap().reason, Some(ReasonCode::Busy));
}

#[test]
fn the_running_release_delivered_again_is_ignored() {
    let mut h = Harness::booted();
    let rel = release("2.0", 1);
    h.install_until_reboot(rel.clone());
    h.pass_the_trial_boot();
    h.answer(Ok(()));
    let count = h.events.len();
    assert!(h.offer(rel).is_empty());
    assert_eq!(h.events.len(), count);
}

#[test]
fn progress_is_rate_limited_by_injected_time() {
    let mut h = Harness::booted();
    h.offer(release("2.0", 1));
    h.answer(Ok(()));
    let now = h.now;
    let mut reports = 0;
    for i in 0..100u64 {
        // 100 progress inputs over 10 simulated seconds.
        let at = now + SignedDuration::from_millis(100 * i as i64);
        let actions = h.engine.handle(
            Input::WriteProgress {
                written: i,
                total: 4096,
                downloaded: Some(i / 2),
            },
            at,
        );
        for action in &actions {
            if let Action::ReportProgress(progress) = action {
                reports += 1;
                assert_eq!(
                    (progress.done, progress.downloaded),
                    (i, Some(i / 2)),
                    "the report carries the bytes written and downloaded it was given"
                );
            }
        }
    }
    assert!((5..=6).contains(&reports), "got {reports} progress reports");
}

/// `mark_good("A")`, `mark_bad`, `prepare`, `activate`: the job of that kind for that slot.
macro_rules! slot_jobs {
    ($($name:ident: $variant:ident),*) => {
        $(fn $name(slot: &str) -> Job { Job::$variant { slot: bootname(slot) } })*
    };
}
slot_jobs!(mark_good: MarkGood, mark_bad: MarkBad, prepare: PrepareTarget, activate: Activate);

fn bootname(name: &str) -> Bootname {
    Bootname::new(name).unwrap()
}

fn boot(boot_id: &str, booted: &str) -> Input {
    Input::BootObserved {
        boot_id: BootId::new(boot_id).unwrap(),
        booted: bootname(booted),
    }
}

/// Regression: when marking the failed slot bad failed during a rollback, the engine reported a
/// `rolling-back` event without persisting the sequence number it took, so after the reboot the
/// next event (`rolled-back`) was reported with the same number.
#[test]
fn a_sequence_number_is_persisted_before_its_event_is_reported() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    h.fail_the_trial_boot();
    let failed = Failure::new(ReasonCode::BootloaderFailed, "fw_setenv failed");
    let mark_bad = mark_bad("B");
    let actions = h
        .engine
        .handle(Input::JobDone(mark_bad, Err(failed)), h.now);
    let reported: Vec<u64> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(event) => Some(event.seq),
            _ => None,
        })
        .collect();
    assert_eq!(reported.len(), 1);
    let persist = actions.iter().position(|a| *a == Action::Persist);
    let report = actions
        .iter()
        .position(|a| matches!(a, Action::Report(_)))
        .unwrap();
    assert!(
        persist.is_some_and(|p| p < report),
        "the event's seq must be persisted before it is reported: {actions:?}"
    );
    assert_eq!(actions.last(), Some(&Action::Run(Job::Reboot)));
    // The reboot: what the last `Persist` wrote is all that is left.
    let saved = match persist {
        Some(_) => h.engine.state().clone(),
        None => h.persisted.last().unwrap().clone(),
    };
    let mut h = Harness::restore(saved);
    h.feed(boot("boot-3", "A"));
    let rolled_back = h
        .events
        .iter()
        .find(|e| e.kind == EventKind::RolledBack)
        .unwrap();
    assert!(
        rolled_back.seq > reported[0],
        "seq {} was reused for another event",
        reported[0]
    );
}

/// Regression: a power cut after a transition was persisted but before its events were reported
/// lost those events for good (the restarted engine was already past them), e.g. the
/// `committed` or `rolled-back` event of a transaction. The events of the last transition are
/// persisted with it and reported again, with the same seq, at the next boot.
#[test]
fn events_persisted_but_not_reported_before_a_power_cut_are_reported_after_it() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    h.pass_the_trial_boot();
    // Commit: the state is persisted, then the agent dies before it reports `committed`.
    let mark_good = mark_good("B");
    let actions = h.engine.handle(Input::JobDone(mark_good, Ok(())), h.now);
    assert_eq!(actions.first(), Some(&Action::Persist));
    let Some(Action::Report(committed)) = actions.get(1).cloned() else {
        panic!("{actions:?}");
    };
    assert_eq!(committed.kind, EventKind::Committed);
    let saved = h.engine.state().clone();
    assert_eq!(saved.phase, Phase::Idle);

    let mut h = Harness::restore(saved);
    let actions = h.engine.handle(boot("boot-3", "B"), h.now);
    let reported: Vec<&Event> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Report(event) => Some(event),
            _ => None,
        })
        .collect();
    assert_eq!(reported, [&committed], "reported again, with the same seq");
    // ... and then forgotten durably, so the boot after that does not repeat it.
    let persist = actions.iter().position(|a| *a == Action::Persist).unwrap();
    let report = actions
        .iter()
        .position(|a| matches!(a, Action::Report(_)))
        .unwrap();
    assert!(report < persist);
    assert!(h.engine.state().recent_events.is_empty());
    let mut h = Harness::restore(h.engine.state().clone());
    h.feed(boot("boot-4", "B"));
    assert!(h.events.is_empty(), "{:?}", h.events);
}

#[test]
fn a_transition_that_was_not_persisted_is_redone_with_the_same_seq() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    let saved = h.persisted.last().unwrap().clone();
    let next_seq = saved.next_seq;
    // In the trial boot, the agent dies before it persists the trial phase.
    let mut h = Harness::restore(saved.clone());
    h.feed(boot(BOOT_2, "B"));
    assert_eq!(h.events.last().unwrap().kind, EventKind::TrialBoot);
    assert_eq!(h.events.last().unwrap().seq, next_seq);
    // The power comes back: nothing of that boot was persisted, nothing of it was reported.
    let mut h = Harness::restore(saved);
    h.feed(boot("boot-3", "B"));
    let trial = h.events.last().unwrap();
    assert_eq!((trial.kind, trial.seq), (EventKind::TrialBoot, next_seq));
}

#[test]
fn every_reported_event_is_kept_for_a_report_again_with_its_reason() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    h.fail_the_trial_boot();
    let persisted = h.persisted.last().unwrap();
    assert_eq!(persisted.recent_events, h.events[h.events.len() - 1..]);
    let kept = &persisted.recent_events[0];
    assert_eq!(kept.kind, EventKind::RollingBack);
    assert_eq!(kept.reason, Some(ReasonCode::HealthCheckFailed));
    // Every transition that reports an event persists, with that event kept.
    for state in &h.persisted {
        for event in &state.recent_events {
            assert!(event.seq < state.next_seq);
        }
    }
}

/// Regression: an idle boot did nothing, so the booted slot was never marked good after its
/// trial. The boot scripts count every boot against the booted slot, so a committed slot fell
/// back to the old one after ordinary reboots: on GRUB at the second (x_TRY stays 1), on U-Boot
/// once BOOT_x_LEFT ran out.
#[test]
fn idle_boot_mark_good_survives_a_failed_write_and_skips_unknown_slots() {
    let mut h = Harness::booted();
    h.install_until_reboot(release("2.0", 1));
    h.pass_the_trial_boot();
    h.answer(Ok(()));
    assert_eq!(h.engine.state().phase, Phase::Idle);
    for (i, slot) in ["B", "B", "A"].into_iter().enumerate() {
        let jobs = h.feed(boot(&format!("boot-{}", i + 3), slot));
        assert_eq!(
            jobs,
            vec![Job::MarkGood {
                slot: bootname(slot)
            }]
        );
        assert!(h.answer(Ok(())).is_empty());
        // A second answer to the same job is stale.
        let failed = Failure::new(ReasonCode::BootloaderFailed, "fw_setenv failed");
        let mark = Job::MarkGood {
            slot: bootname(slot),
        };
        assert!(h.feed(Input::JobDone(mark, Err(failed))).is_empty());
        assert_eq!(h.engine.state().phase, Phase::Idle);
    }
    // A slot the configuration does not know is left alone.
    assert!(h.feed(boot("boot-9", "recovery")).is_empty());
}

mod wire;

/// The engine waits for one job and matches its answer to it: an answer to any other job
/// (an earlier run's, a repeat, a bootloader change that was not asked for) leads nowhere, and
/// the job asked for is still answered afterwards.
#[test]
fn an_answer_to_another_job_than_the_one_asked_for_is_ignored() {
    let mut h = Harness::booted();
    h.answer(Ok(()));
    assert_eq!(
        h.write_until_activation(release("2.0", 1)),
        vec![activate("B")]
    );
    let count = (h.events.len(), h.persisted.len());
    for stale in [
        mark_good("A"),
        mark_bad("B"),
        prepare("B"),
        activate("A"),
        Job::CheckHealth,
    ] {
        let failed = Failure::new(ReasonCode::BootloaderFailed, "not asked for");
        assert!(h.feed(Input::JobDone(stale.clone(), Ok(()))).is_empty());
        assert!(h.feed(Input::JobDone(stale, Err(failed))).is_empty());
    }
    assert_eq!((h.events.len(), h.persisted.len()), count);
    assert_eq!(h.engine.state().phase.name(), "activating");
    assert_eq!(h.answer(Ok(())), vec![Job::Reboot]);
}

#[test]
fn a_failed_reboot_is_reported_and_the_reboot_stays_due() {
    let mut h = Harness::booted();
    h.answer(Ok(()));
    h.install_until_reboot(release("2.0", 5));
    let failure = Failure::new(ReasonCode::RebootFailed, "`systemctl reboot` exited 1");
    assert!(h.feed(Input::RebootFailed(failure)).is_empty());
    let last = h.events.last().unwrap();
    assert_eq!(last.kind, EventKind::RebootFailed);
    assert_eq!(last.reason, Some(ReasonCode::RebootFailed));
    assert_eq!(last.slot.as_ref().map(|s| s.as_str()), Some("B"));
    assert!(matches!(
        h.persisted.last().unwrap().phase,
        Phase::RebootPending { .. }
    ));
    // The agent restarts in the same boot: the reboot is asked for again.
    let state = h.engine.state().clone();
    let mut h = Harness::restore(state);
    assert_eq!(h.feed(boot(BOOT_1, "A")), vec![Job::Reboot]);
}
