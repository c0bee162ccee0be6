//! The update state machine, as a sans-IO core: no filesystem, no sockets, no clock, no tokio.
//!
//! The driver feeds [`Input`]s to [`Engine::handle`] together with the current time and carries
//! out the [`Action`]s it returns, in the order they come (the order is fixed, see [`Action`]).
//! Of the actions, at most one is a [`Job`] (a write, a bootloader change, the health checks, the
//! reboot), always last; the driver answers it with [`Input::JobDone`] once the work finished,
//! and the engine waits for that one job only. [`Action::Persist`] always comes before the job it
//! protects, so that after a power cut the engine, restored from the persisted state and told of
//! the boot it finds itself in, redoes or finishes exactly the step that was cut.
//!
//! Events: a transition's events are reported after the `Persist` that records it (with the
//! sequence numbers they took), and they stay in the persisted state until the next transition.
//! After a restart the engine reports them again, with the same numbers: delivery is at least
//! once, the `seq` identifies a repeat, and a number is never given to two different events. A
//! transition that was not persisted is redone after a restart; its events were never reported
//! and get the same numbers again.
//!
//! Layout: [`input`] and [`action`] are the interface; `outputs` puts one input's actions in
//! order; the handlers are grouped by what starts them — `transaction` (a release, then writing
//! and activating it), `boot` (a boot observed, and the trial, commit or rollback it leads to),
//! `schedule` (waiting for the policy: the timer, pending installs, scheduled reboots), `user`
//! (the user's requests); [`state`] is what is persisted, [`policy`] the rules of *when*, and
//! `names` the bootnames and boot ids the engine is given, checked where they enter.
//!
//! Architecture invariants:
//! - the booted slot is never the target of a write or of `mark bad`;
//! - the bootloader is never told to try a slot whose content was not read back and verified:
//!   `Activate` is only asked for in `Activating`, which is only entered when the write job
//!   answered `Ok`;
//! - the target slot is made unbootable *before* its first byte is written;
//! - reboots are recognised by the kernel boot id and the booted slot, never by the clock;
//! - the slot that is meant to run is marked good at every boot (as RAUC's mark-good service
//!   does): the boot scripts spend a try (U-Boot) or set a try flag (GRUB) at every boot, and
//!   a slot whose budget is not given back is left by the bootloader a few boots later;
//! - one job at a time, and an answer is matched to the job it answers, never guessed from the
//!   phase.

pub mod action;
mod boot;
pub mod input;
mod names;
mod outputs;
pub mod policy;
pub mod rollout;
mod schedule;
pub mod state;
mod transaction;
mod user;

use jiff::Timestamp;

use crate::prelude::*;
use crate::release::ReleaseId;
pub use action::{Action, Answer, Job, Notice};
pub use input::{Failure, Input, Postpone};
pub use names::{BadName, BootId, Bootname};
use outputs::Outputs;
pub use policy::{Clamp, Decision, PolicyConfig, RebootPolicy, UserChoices, Wait, Window};
pub use state::{Event, EventKind, Outcome, PersistentState, Phase, Progress, Transaction};

/// Progress events are reported at most this often, so a fast write does not flood operators.
pub const PROGRESS_INTERVAL: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// The device's A/B pair as the engine sees it: names only, no paths.
#[derive(Debug, Clone)]
pub struct SlotPair {
    pub class: String,
    pub bootnames: [Bootname; 2],
}

impl SlotPair {
    fn other(&self, bootname: &Bootname) -> Option<&Bootname> {
        match &self.bootnames {
            [a, b] if a == bootname => Some(b),
            [a, b] if b == bootname => Some(a),
            _ => None,
        }
    }
}

/// The job the engine waits for, and what its answer leads to.
#[derive(Debug, Clone, PartialEq)]
#[must_use = "a job that is not returned to `handle` is never asked for"]
struct Awaiting {
    job: Job,
    then: Then,
}

/// What the answer to a job leads to.
#[derive(Debug, Clone, PartialEq)]
enum Then {
    /// The transaction's next step; the phase the job was asked for in tells which.
    Step,
    /// Nothing: the booted slot's mark-good at a boot, or a failed slot's mark-bad after its
    /// transaction ended. Either way the driver logs a failure.
    Nothing,
    /// Keep the slot that came back (mark it good: its boot spent a try too), whatever the
    /// mark-bad of the slot it fell back from gave.
    KeepBooted(Bootname),
    /// The user's mark: an event and the answer, with the result.
    AnswerMark { good: bool },
}

impl Awaiting {
    fn step(job: Job) -> Option<Awaiting> {
        Some(Awaiting {
            job,
            then: Then::Step,
        })
    }

    fn then(job: Job, then: Then) -> Option<Awaiting> {
        Some(Awaiting { job, then })
    }

    /// The reboot: the next boot observed answers it, not `JobDone`.
    fn reboot() -> Option<Awaiting> {
        Awaiting::then(Job::Reboot, Then::Nothing)
    }
}

pub struct Engine {
    slots: SlotPair,
    state: PersistentState,
    /// Facts about the current boot, learnt from `BootObserved`: (boot id, booted slot).
    boot: Option<(BootId, Bootname)>,
    /// What a slot the agent never wrote runs (the image the device shipped with).
    factory_version: Option<String>,
    last_progress_report: Option<Timestamp>,
    /// The job asked for and not answered yet. Not persisted: after a restart the boot
    /// observed asks again for whatever the persisted phase still needs.
    awaiting: Option<Awaiting>,
    policy: PolicyConfig,
    /// When the engine wants [`Input::Tick`]; recomputed after every input.
    timer: Option<Timestamp>,
    /// The reboot time the user was last told of (`Notice::DisruptionAhead`), so that it is
    /// told once per schedule. Not persisted: after a restart the user is told again.
    announced: Option<Timestamp>,
    /// This device's id (its MQTT client id), from which its moment in a rollout is drawn.
    device_id: String,
}

impl Engine {
    pub fn new(slots: SlotPair, state: PersistentState) -> Engine {
        Engine {
            slots,
            state,
            boot: None,
            factory_version: None,
            last_progress_report: None,
            awaiting: None,
            policy: PolicyConfig::default(),
            timer: None,
            announced: None,
            device_id: String::new(),
        }
    }

    /// The device id the rollout moments are drawn from (the MQTT device id): the same id
    /// gives the same moment after every restart.
    pub fn with_device_id(mut self, device_id: impl Into<String>) -> Engine {
        self.device_id = device_id.into();
        self
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn with_policy(mut self, policy: PolicyConfig) -> Engine {
        self.policy = policy;
        self
    }

    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }

    /// Whether automatic install is on: the user's choice, else the configured default.
    pub fn auto_install(&self) -> bool {
        self.policy.auto_install(&self.state.user)
    }

    /// When the driver should feed [`Input::Tick`] (quinn-proto's `poll_timeout`): a maintenance
    /// window opening, a postponement or deadline ending, a disruption notice or reboot falling
    /// due. `None`: nothing is waiting for time. A time in the past means "now".
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.timer
    }

    pub fn with_factory_version(mut self, version: Option<String>) -> Engine {
        self.factory_version = version;
        self
    }

    pub fn state(&self) -> &PersistentState {
        &self.state
    }

    /// Whether this release rolled back on this device before (it is not retried
    /// automatically; a receiver that sees it again may pass it over without a report).
    pub fn rolled_back_before(&self, release_id: &ReleaseId) -> bool {
        self.state.rolled_back.contains(release_id)
    }

    pub fn booted(&self) -> Option<&Bootname> {
        self.boot.as_ref().map(|(_, slot)| slot)
    }

    /// The version running now: what the agent installed in the booted slot, else the factory
    /// version.
    pub fn booted_version(&self) -> Option<&str> {
        let booted = self.booted()?;
        match self.state.slots.get(booted) {
            Some(record) => Some(&record.version),
            None => self.factory_version.as_deref(),
        }
    }

    pub fn handle(&mut self, input: Input, now: Timestamp) -> Vec<Action> {
        let mut out = Outputs::default();
        let next = match input {
            Input::BootObserved { boot_id, booted } => {
                // A new run: nothing asked of the one before is answered any more.
                self.awaiting = None;
                self.on_boot(boot_id, booted, now, &mut out)
            }
            Input::ReleaseVerified(release) => self.on_release(*release, false, now, &mut out),
            Input::UserInstall(release) => self.on_release(*release, true, now, &mut out),
            Input::ReleaseRefused { reason, message } => {
                let event = self.event(EventKind::Refused, now, None, |e| {
                    e.reason = Some(reason);
                    e.message = Some(message);
                });
                out.report(event);
                None
            }
            Input::JobDone(job, result) => self.on_job_done(job, result, now, &mut out),
            Input::WriteProgress {
                written,
                total,
                downloaded,
            } => {
                self.on_progress(written, total, downloaded, now, &mut out);
                None
            }
            Input::WriteCheckpoint { durable } => {
                self.on_checkpoint(durable, &mut out);
                None
            }
            Input::Tick => self.reevaluate(now, &mut out),
            Input::UserPostpone(postpone) => self.on_postpone(postpone, now, &mut out),
            Input::UserResume => self.on_resume(now, &mut out),
            Input::UserSetAutoInstall(on) => self.on_set_auto_install(on, now, &mut out),
            Input::UserInstallNow => self.on_install_now(now, &mut out),
            Input::UserCheckNow => {
                self.on_check_now(now, &mut out);
                None
            }
            Input::UserMark { good } => self.on_user_mark(good, &mut out),
            Input::Withdrawn { release_id, why } => {
                self.on_withdrawn(release_id, &why, now, &mut out);
                None
            }
            Input::RebootFailed(failure) => {
                let txn = self.state.phase.transaction().cloned();
                let event = self.event(EventKind::RebootFailed, now, txn.as_ref(), |e| {
                    e.reason = Some(failure.reason);
                    e.message = Some(failure.message);
                });
                out.report(event);
                None
            }
        };
        // The events this input made are persisted with its transition (every event makes its
        // step persist) and kept until the next one, so a restart can report them again.
        if !out.made().is_empty() {
            self.state.recent_events = out.made().to_vec();
        }
        self.timer = self.next_wake(now);
        let job = next.map(|next| {
            let job = next.job.clone();
            self.awaiting = Some(next);
            job
        });
        out.finish(job)
    }

    /// The answer to the job the engine waits for leads on; any other answer is stale (a job
    /// of an earlier run, or answered twice) and ignored.
    ///
    /// A step of the transaction is done: the phase it was asked for in goes on. The phase is
    /// taken out of the state and each handler stores its successor. What a failed step leads
    /// to is decided here: before the new slot was activated the transaction fails; once it
    /// booted, it rolls back.
    fn on_job_done(
        &mut self,
        job: Job,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let awaited = self.awaiting.take_if(|awaited| awaited.job == job)?;
        match awaited.then {
            Then::Step => {}
            Then::Nothing => return None,
            Then::KeepBooted(slot) => return Awaiting::then(Job::MarkGood { slot }, Then::Nothing),
            Then::AnswerMark { good } => {
                let (Job::MarkGood { slot } | Job::MarkBad { slot }) = job else {
                    unreachable!("a user's mark is a mark-good or mark-bad job")
                };
                self.user_mark_done(good, slot, result, now, out);
                return None;
            }
        }
        match (core::mem::take(&mut self.state.phase), job, result) {
            (Phase::Writing { txn, .. }, Job::PrepareTarget { .. } | Job::Write { .. }, Err(f)) => {
                self.finish_failed(txn, EventKind::Failed, f, now, out);
                None
            }
            (Phase::Activating { txn }, Job::Activate { .. }, Err(failure)) => {
                // The slot may be half-activated: make it unbootable again before giving up.
                let slot = txn.to_slot.clone();
                self.finish_failed(txn, EventKind::Failed, failure, now, out);
                Awaiting::then(Job::MarkBad { slot }, Then::Nothing)
            }
            (Phase::Trial { txn, .. }, Job::CheckHealth, Err(failure))
            | (Phase::Committing { txn }, Job::MarkGood { .. }, Err(failure)) => {
                self.start_rollback(txn, failure, now, out)
            }
            (Phase::Writing { txn, durable }, Job::PrepareTarget { .. }, Ok(())) => {
                self.target_prepared(txn, durable, now, out)
            }
            (Phase::Writing { txn, .. }, Job::Write { .. }, Ok(())) => self.written(txn, now, out),
            (Phase::Activating { txn }, Job::Activate { .. }, Ok(())) => {
                self.activated(txn, now, out)
            }
            (Phase::Trial { txn, .. }, Job::CheckHealth, Ok(())) => self.health_checked(txn, out),
            (Phase::Committing { txn }, Job::MarkGood { .. }, Ok(())) => {
                self.committed(txn, now, out)
            }
            (
                Phase::RollingBack {
                    txn,
                    reason,
                    message,
                },
                Job::MarkBad { .. },
                result,
            ) => self.marked_bad_for_rollback(txn, (reason, message), result, now, out),
            // A step's job is only asked for in its phase, and the phase only moves on with
            // the step's answer: this does not happen. Keep the phase as it is.
            (phase, job, _) => {
                debug_assert!(false, "{job:?} answered in phase {}", phase.name());
                self.state.phase = phase;
                None
            }
        }
    }

    /// Reports an event of `txn`.
    fn report(&mut self, kind: EventKind, txn: &Transaction, now: Timestamp, out: &mut Outputs) {
        let event = self.event(kind, now, Some(txn), |_| {});
        out.report(event);
    }

    /// Reports an event of `txn` that says what went wrong.
    fn report_failure(
        &mut self,
        kind: EventKind,
        txn: &Transaction,
        failure: &Failure,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let event = self.event(kind, now, Some(txn), |e| {
            e.reason = Some(failure.reason);
            e.message = Some(failure.message.clone());
        });
        out.report(event);
    }

    /// Reports an event of `txn` that says what it waits for (`pending`, `reboot-scheduled`).
    fn report_wait(
        &mut self,
        kind: EventKind,
        txn: &Transaction,
        (why, until): (policy::Wait, Option<Timestamp>),
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let event = self.event(kind, now, Some(txn), |e| {
            e.waiting = Some(why);
            e.until = until;
        });
        out.report(event);
    }

    /// A new event, with the next sequence number (the caller reports it, which persists).
    fn event(
        &mut self,
        kind: EventKind,
        now: Timestamp,
        txn: Option<&Transaction>,
        fill: impl FnOnce(&mut Event),
    ) -> Event {
        let mut event = Event::about(self.take_seq(), now, kind, txn);
        fill(&mut event);
        event
    }

    /// The next event sequence number: it must be persisted before its event is reported.
    fn take_seq(&mut self) -> u64 {
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        seq
    }
}

#[cfg(test)]
mod tests;
