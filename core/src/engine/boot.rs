//! A boot observed: what the boot id and the booted slot say about the step the last run was
//! in (restarted, rebooted, fallen back), and the trial, commit or rollback that follows.

use jiff::Timestamp;

use super::names::{BootId, Bootname};
use super::outputs::Outputs;
use super::{Awaiting, Engine, EventKind, Failure, Job, Notice, Outcome, Phase, Then, Transaction};
use crate::prelude::*;
use crate::reason::ReasonCode;

impl Engine {
    pub(super) fn on_boot(
        &mut self,
        boot_id: BootId,
        booted: Bootname,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.boot = Some((boot_id.clone(), booted.clone()));
        // The last transition was persisted, but the agent may have stopped before it reported
        // the events: report them again (same seq; receivers drop what they have), then forget
        // them durably so that later boots do not repeat them.
        out.replay(core::mem::take(&mut self.state.recent_events));
        match core::mem::take(&mut self.state.phase) {
            Phase::Writing { txn, .. } if booted == txn.to_slot => {
                // The target cannot have booted: it was made unbootable before writing.
                let failure = Failure::new(
                    ReasonCode::UnexpectedBoot,
                    "the device booted the slot that was being written; the install was abandoned",
                );
                self.finish_failed(txn, EventKind::Failed, failure, now, out);
                None
            }
            Phase::Activating { txn } if booted == txn.to_slot => {
                // The power failed after the bootloader was switched but before that was
                // persisted, and the bootloader tried the new slot: this is its trial boot.
                self.report(EventKind::Activated, &txn, now, out);
                self.enter_trial(txn, boot_id, now, out)
            }
            Phase::RebootScheduled {
                txn,
                boot_id_at_activation,
                ..
            }
            | Phase::RebootPending {
                txn,
                boot_id_at_activation,
            } if boot_id != boot_id_at_activation => self.rebooted(txn, boot_id, &booted, now, out),
            // Agent restart during the trial, or the trial boot crashed and the bootloader
            // tried again: the health checks decide again.
            Phase::Trial { txn, .. } if booted == txn.to_slot => {
                self.enter_trial(txn, boot_id, now, out)
            }
            Phase::Trial { txn, .. } => {
                let failure = Failure::new(
                    ReasonCode::FellBack,
                    format!(
                        "the trial boot of the new slot did not complete; the bootloader fell back to slot {booted}"
                    ),
                );
                self.roll_back_finished(txn, failure, now, out)
            }
            Phase::RollingBack {
                txn,
                reason,
                message,
            } if booted != txn.to_slot => {
                self.roll_back_finished(txn, Failure::new(reason, message), now, out)
            }
            // The same step goes on (an agent restart or a power cut in it): its job is asked
            // for again; every job is idempotent.
            phase => {
                let next = match &phase {
                    // Nothing was written for a pending release: the boot is an ordinary one.
                    // Whether it may install now is the next `Tick`'s question (a one-shot
                    // `boot-check` never ticks, so it never starts an install). The boot
                    // scripts count every boot against the booted slot (U-Boot's BOOT_x_LEFT,
                    // GRUB's x_TRY): the running system is marked good at each boot, as RAUC's
                    // mark-good service does, or the bootloader falls back to the other slot
                    // after a few ordinary reboots (GRUB: the second one).
                    Phase::Idle | Phase::Pending { .. } => match self.slots.other(&booted) {
                        Some(_) => Awaiting::then(Job::MarkGood { slot: booted }, Then::Nothing),
                        None => None,
                    },
                    // Interrupted: make sure the target is still unbootable, then continue
                    // from the last durable checkpoint.
                    Phase::Writing { txn, .. } => Awaiting::step(Job::PrepareTarget {
                        slot: txn.to_slot.clone(),
                    }),
                    Phase::Activating { txn } => Awaiting::step(Job::Activate {
                        slot: txn.to_slot.clone(),
                    }),
                    // The device did not reboot: a scheduled reboot waits for its time (the
                    // next `Tick`), a due one is asked for again.
                    Phase::RebootScheduled { .. } => None,
                    Phase::RebootPending { .. } => Awaiting::reboot(),
                    Phase::Committing { txn } => Awaiting::step(Job::MarkGood {
                        slot: txn.to_slot.clone(),
                    }),
                    Phase::RollingBack { txn, .. } => Awaiting::step(Job::MarkBad {
                        slot: txn.to_slot.clone(),
                    }),
                    Phase::Trial { .. } => unreachable!("every boot in a trial is handled above"),
                };
                self.state.phase = phase;
                next
            }
        }
    }

    /// The device rebooted after the new slot was activated: into it (its trial), or not (the
    /// bootloader fell back).
    fn rebooted(
        &mut self,
        txn: Transaction,
        boot_id: BootId,
        booted: &Bootname,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        if *booted == txn.to_slot {
            return self.enter_trial(txn, boot_id, now, out);
        }
        let failure = Failure::new(
            ReasonCode::FellBack,
            format!(
                "the device rebooted into slot {booted} instead of the new slot: the bootloader fell back"
            ),
        );
        self.roll_back_finished(txn, failure, now, out)
    }

    /// The first boot of the new slot (or a boot of it before the trial decided): the health
    /// checks decide.
    fn enter_trial(
        &mut self,
        txn: Transaction,
        boot_id: BootId,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.report(EventKind::TrialBoot, &txn, now, out);
        self.state.phase = Phase::Trial { txn, boot_id };
        Awaiting::step(Job::CheckHealth)
    }

    /// The new system is healthy: its slot is marked good next.
    pub(super) fn health_checked(
        &mut self,
        txn: Transaction,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let slot = txn.to_slot.clone();
        self.state.phase = Phase::Committing { txn };
        out.persist();
        Awaiting::step(Job::MarkGood { slot })
    }

    /// The new slot was marked good: committed. (Had it failed, the bootloader would fall back
    /// when its tries run out: `on_job_done` goes back the orderly way instead.)
    pub(super) fn committed(
        &mut self,
        txn: Transaction,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        if let Some(record) = self.state.slots.get_mut(&txn.to_slot) {
            record.committed = true;
        }
        self.state.floor = self.state.floor.max(txn.manifest.security_version);
        self.report(EventKind::Committed, &txn, now, out);
        self.state.last = Some(Outcome::of(&txn, EventKind::Committed, None, None, now));
        out.notify(Notice::completed(&txn, EventKind::Committed, None));
        self.state.phase = Phase::Idle;
        None
    }

    pub(super) fn start_rollback(
        &mut self,
        txn: Transaction,
        failure: Failure,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.report_failure(EventKind::RollingBack, &txn, &failure, now, out);
        let slot = txn.to_slot.clone();
        self.state.phase = Phase::RollingBack {
            txn,
            reason: failure.reason,
            message: failure.message,
        };
        Awaiting::step(Job::MarkBad { slot })
    }

    /// The failed slot was marked bad: reboot into the old one. Marking bad failed: reboot
    /// anyway, the bootloader's try counter still falls back; the event says why.
    pub(super) fn marked_bad_for_rollback(
        &mut self,
        txn: Transaction,
        (reason, message): (ReasonCode, String),
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        if let Err(failure) = result {
            // The event took a sequence number: it is persisted before it is reported, or the
            // next boot would give the same number to another event.
            self.report_failure(EventKind::RollingBack, &txn, &failure, now, out);
        }
        self.state.phase = Phase::RollingBack {
            txn,
            reason,
            message,
        };
        Awaiting::reboot()
    }
}
