//! The user's requests (D-Bus, CLI): postpone, resume, automatic install, install now, check,
//! mark a slot. Each is answered once; each decision that takes effect is an event, persisted
//! with the choice it made.

use jiff::Timestamp;

use super::names::Bootname;
use super::outputs::Outputs;
use super::{Answer, Awaiting, Engine, Event, EventKind, Failure, Job, Phase, Postpone, Then};
use crate::prelude::*;
use crate::reason::ReasonCode;

impl Engine {
    pub(super) fn on_postpone(
        &mut self,
        postpone: Postpone,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let requested = match postpone {
            Postpone::For(duration) => now.checked_add(duration).unwrap_or(Timestamp::MAX),
            Postpone::Until(until) => until,
        };
        if requested <= now {
            out.answer(Answer::Refused(Failure::new(
                ReasonCode::InvalidRequest,
                format!("a postponement must end in the future (asked for {requested})"),
            )));
            return None;
        }
        let (until, clamped) = self
            .policy
            .clamp_postpone(now, requested, self.current_deadline());
        if until <= now {
            out.answer(Answer::Refused(Failure::new(
                ReasonCode::NotPostponable,
                format!("the release's deadline {until} has passed; it installs now"),
            )));
            return None;
        }
        self.state.user.postponed_until = Some(until);
        // A new time for the reboot is announced anew.
        self.announced = None;
        self.user_decision(EventKind::Postponed, now, out, |e| {
            e.until = Some(until);
            e.clamped = clamped;
        });
        out.answer(Answer::Postponed {
            until,
            requested,
            clamped,
        });
        self.reevaluate(now, out)
    }

    pub(super) fn on_resume(&mut self, now: Timestamp, out: &mut Outputs) -> Option<Awaiting> {
        self.state.user.postponed_until = None;
        self.user_decision(EventKind::Resumed, now, out, |_| {});
        out.answer(Answer::Done);
        self.reevaluate(now, out)
    }

    pub(super) fn on_set_auto_install(
        &mut self,
        on: bool,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.state.user.auto_install = Some(on);
        let state = if on {
            EventKind::AutoInstallEnabled
        } else {
            EventKind::AutoInstallDisabled
        };
        self.user_decision(state, now, out, |_| {});
        out.answer(Answer::Done);
        self.reevaluate(now, out)
    }

    pub(super) fn on_check_now(&mut self, now: Timestamp, out: &mut Outputs) {
        self.user_decision(EventKind::CheckRequested, now, out, |_| {});
        out.answer(Answer::Done);
        out.check();
    }

    pub(super) fn on_install_now(&mut self, now: Timestamp, out: &mut Outputs) -> Option<Awaiting> {
        match core::mem::take(&mut self.state.phase) {
            Phase::Pending { mut txn, .. } => {
                txn.user_now = true;
                self.report(EventKind::InstallNow, &txn, now, out);
                out.answer(Answer::Done);
                self.start_writing(txn, out)
            }
            Phase::RebootScheduled {
                mut txn,
                boot_id_at_activation,
                ..
            } => {
                txn.user_now = true;
                self.report(EventKind::InstallNow, &txn, now, out);
                out.answer(Answer::Done);
                self.reboot_now(txn, boot_id_at_activation, now, out)
            }
            // Under way: the reboot will not wait for the policy.
            mut phase @ (Phase::Writing { .. } | Phase::Activating { .. }) => {
                if let Phase::Writing { txn, .. } | Phase::Activating { txn } = &mut phase {
                    txn.user_now = true;
                }
                self.state.phase = phase;
                self.user_decision(EventKind::InstallNow, now, out, |_| {});
                out.answer(Answer::Done);
                None
            }
            phase => {
                let message = match phase.transaction() {
                    Some(txn) => format!(
                        "transaction {} is past installing (phase {})",
                        txn.id,
                        phase.name()
                    ),
                    None => "no update is pending".to_string(),
                };
                self.state.phase = phase;
                out.answer(Answer::Refused(Failure::new(
                    ReasonCode::NothingPending,
                    message,
                )));
                None
            }
        }
    }

    /// Marks the booted slot good or the other one bad; the answer waits for the bootloader,
    /// so that the caller hears whether the change was made.
    pub(super) fn on_user_mark(&mut self, good: bool, out: &mut Outputs) -> Option<Awaiting> {
        let refuse = |out: &mut Outputs, reason, message: String| {
            out.answer(Answer::Refused(Failure::new(reason, message)));
            None
        };
        if !matches!(self.state.phase, Phase::Idle | Phase::Pending { .. }) {
            let message = format!(
                "a transaction is in phase {}; slots are marked by it",
                self.state.phase.name()
            );
            return refuse(out, ReasonCode::Busy, message);
        }
        let Some(booted) = self.booted().cloned() else {
            return refuse(
                out,
                ReasonCode::NotReady,
                "the booted slot is not known yet".into(),
            );
        };
        let Some(other) = self.slots.other(&booted).cloned() else {
            let message = format!("the booted slot {booted} is not one of the configured slots");
            return refuse(out, ReasonCode::BootedSlot, message);
        };
        let job = if good {
            Job::MarkGood { slot: booted }
        } else {
            Job::MarkBad { slot: other }
        };
        Awaiting::then(job, Then::AnswerMark { good })
    }

    /// The user's mark is done or failed: an event either way (with the reason when it
    /// failed), then the answer.
    pub(super) fn user_mark_done(
        &mut self,
        good: bool,
        slot: Bootname,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let state = if good {
            EventKind::MarkedGood
        } else {
            EventKind::MarkedBad
        };
        let failure = result.err();
        self.user_decision(state, now, out, |e| {
            e.slot = Some(slot);
            if let Some(failure) = &failure {
                e.reason = Some(failure.reason);
                e.message = Some(failure.message.clone());
            }
        });
        out.answer(match failure {
            None => Answer::Done,
            Some(failure) => Answer::Refused(failure),
        });
    }

    /// Records a user decision as an event (about the current transaction, if any), persisted
    /// with the choice it made.
    fn user_decision(
        &mut self,
        state: EventKind,
        now: Timestamp,
        out: &mut Outputs,
        fill: impl FnOnce(&mut Event),
    ) {
        let seq = self.take_seq();
        let mut event = Event::about(seq, now, state, self.state.phase.transaction());
        fill(&mut event);
        out.report(event);
    }
}
