//! Waiting for the policy: a pending release until it may install, an activated slot until the
//! reboot into it may happen, the user told ahead of the reboot, and the timer that says when
//! to look again.

use jiff::Timestamp;

use super::outputs::Outputs;
use super::{Awaiting, Decision, Engine, Notice, Phase, Transaction};

impl Engine {
    /// May the pending `txn` start installing now: the policy, with this device's moment in the
    /// release's rollout window.
    pub(super) fn install_decision(&self, txn: &Transaction, now: Timestamp) -> Decision {
        self.policy
            .install_decision(now, &self.state.user, &txn.manifest, self.moment(txn))
    }

    /// This device's moment in the rollout window of `txn`'s release, if it has a schedule.
    pub fn moment(&self, txn: &Transaction) -> Option<Timestamp> {
        let rollout = txn.manifest.rollout.as_ref()?;
        Some(super::rollout::moment(
            rollout,
            &txn.release_id,
            &self.device_id,
        ))
    }

    pub(super) fn reboot_decision(&self, txn: &Transaction, now: Timestamp) -> Decision {
        if txn.user_now {
            Decision::Now
        } else {
            self.policy
                .reboot_decision(now, &self.state.user, &txn.manifest)
        }
    }

    /// The transaction's deadline for what it waits for now, if it waits.
    pub(super) fn current_deadline(&self) -> Option<Timestamp> {
        match &self.state.phase {
            Phase::Pending { txn, .. } => self
                .policy
                .install_deadline(&txn.manifest, &self.state.user),
            Phase::RebootScheduled { txn, .. }
            | Phase::Writing { txn, .. }
            | Phase::Activating { txn } => {
                self.policy.reboot_deadline(&txn.manifest, &self.state.user)
            }
            _ => None,
        }
    }

    /// When the engine next needs a `Tick`, from the state and the policy at `now`.
    pub(super) fn next_wake(&self, now: Timestamp) -> Option<Timestamp> {
        match &self.state.phase {
            Phase::Pending { txn, .. } => match self.install_decision(txn, now) {
                Decision::Now => Some(now),
                Decision::Wait { until, .. } => until,
            },
            Phase::RebootScheduled { txn, .. } => match self.reboot_decision(txn, now) {
                Decision::Now => Some(now),
                Decision::Wait { until: None, .. } => None,
                Decision::Wait {
                    until: Some(at), ..
                } => {
                    let notice_at = at - self.policy.notice;
                    if self.announced != Some(at) && notice_at > now {
                        Some(notice_at)
                    } else if self.announced != Some(at) {
                        Some(now)
                    } else {
                        Some(at)
                    }
                }
            },
            _ => None,
        }
    }

    /// Looks at the policy again (time passed, or the user changed something): a pending
    /// release may start installing, a scheduled reboot may fall due or need announcing.
    pub(super) fn reevaluate(&mut self, now: Timestamp, out: &mut Outputs) -> Option<Awaiting> {
        match core::mem::take(&mut self.state.phase) {
            Phase::Pending {
                txn,
                waiting,
                until,
            } => {
                let decision = self.install_decision(&txn, now);
                match decision {
                    Decision::Now => self.start_writing(txn, out),
                    Decision::Wait { why, until: next } => {
                        if (why, next) != (waiting, until) {
                            out.persist();
                        }
                        self.state.phase = Phase::Pending {
                            txn,
                            waiting: why,
                            until: next,
                        };
                        None
                    }
                }
            }
            Phase::RebootScheduled {
                txn,
                boot_id_at_activation,
                waiting,
                at,
            } => match self.reboot_decision(&txn, now) {
                Decision::Now => self.reboot_now(txn, boot_id_at_activation, now, out),
                Decision::Wait { why, until } => {
                    if (why, until) != (waiting, at) {
                        out.persist();
                    }
                    self.state.phase = Phase::RebootScheduled {
                        txn,
                        boot_id_at_activation,
                        waiting: why,
                        at: until,
                    };
                    self.announce_reboot(now, out);
                    None
                }
            },
            phase => {
                self.state.phase = phase;
                None
            }
        }
    }

    /// Tells the user of a scheduled reboot once it is within the notice period.
    pub(super) fn announce_reboot(&mut self, now: Timestamp, out: &mut Outputs) {
        let Phase::RebootScheduled {
            txn, at: Some(at), ..
        } = &self.state.phase
        else {
            return;
        };
        if self.announced == Some(*at) || now < *at - self.policy.notice {
            return;
        }
        let deadline = self.policy.reboot_deadline(&txn.manifest, &self.state.user);
        let notice = Notice::DisruptionAhead {
            txn: txn.id.clone(),
            seconds: u64::try_from((*at - now).as_secs()).unwrap_or(0),
            postponable: deadline.is_none_or(|d| *at < d),
            downtime_seconds: txn.manifest.disruption.downtime_seconds,
        };
        self.announced = Some(*at);
        out.notify(notice);
    }
}
