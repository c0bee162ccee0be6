//! A release becomes a transaction: accepted (or refused), written into the other slot, read
//! back, activated, and the reboot into it asked for — or the transaction fails on the way.

use jiff::Timestamp;

use super::names::BootId;
use super::outputs::Outputs;
use super::state::{MAX_ROLLED_BACK_REMEMBERED, SlotRecord};
use super::{
    Awaiting, Decision, Engine, EventKind, Failure, Job, Notice, Outcome, Phase, Progress, Then,
    Transaction,
};
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::VerifiedRelease;

impl Engine {
    pub(super) fn on_release(
        &mut self,
        release: VerifiedRelease,
        user_now: bool,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let release_id = release.release_id();
        let refuse = |engine: &mut Engine, reason, message: String, out: &mut Outputs| {
            let event = engine.event(EventKind::Refused, now, None, |e| {
                e.release_id = Some(release_id);
                e.to_version = Some(release.manifest.version.clone());
                e.reason = Some(reason);
                e.message = Some(message);
            });
            out.report(event);
            None
        };
        let Some((_, booted)) = self.boot.clone() else {
            return refuse(
                self,
                ReasonCode::NotReady,
                "the agent has not yet determined the booted slot".into(),
                out,
            );
        };
        // A pending transaction has written nothing: a newer release takes its place (once it
        // passed the checks below). One under way is finished first.
        let mut superseded = None;
        if let Some(txn) = self.state.phase.transaction() {
            if txn.release_id == release_id {
                return None;
            }
            let pending = matches!(self.state.phase, Phase::Pending { .. });
            if !pending {
                let message = format!(
                    "transaction {} for version {} is still in progress",
                    txn.id,
                    txn.to_version()
                );
                return refuse(self, ReasonCode::Busy, message, out);
            }
            // Newer: a higher security version, or the same one signed later. Never the other
            // way, so that two retained releases (fleet and device topic) seen again at each
            // re-check cannot take turns.
            let (new, old) = (&release.manifest, &txn.manifest);
            let newer = (new.security_version, new.created) > (old.security_version, old.created);
            if !newer {
                let message = format!(
                    "version {} (security version {}, created {}) is not newer than the pending {} ({}, {}); the pending one stays",
                    new.version,
                    new.security_version,
                    new.created,
                    old.version,
                    old.security_version,
                    old.created
                );
                return refuse(self, ReasonCode::Downgrade, message, out);
            }
            superseded = Some(txn.clone());
        }
        if self
            .state
            .slots
            .get(&booted)
            .is_some_and(|slot| slot.release_id == release_id)
        {
            // Already running this release: a retained message seen again is not news.
            return None;
        }
        if self.state.rolled_back.contains(&release_id) {
            let message =
                "this release rolled back on this device before; it is not retried automatically"
                    .to_string();
            return refuse(self, ReasonCode::PreviouslyRolledBack, message, out);
        }
        let Some(target) = self.slots.other(&booted).cloned() else {
            let message = format!("the booted slot {booted} is not one of the configured slots");
            return refuse(self, ReasonCode::NotReady, message, out);
        };
        if !release.manifest.images.contains_key(&self.slots.class) {
            let message = format!(
                "the release has no image for slot class {}",
                self.slots.class
            );
            return refuse(self, ReasonCode::Incompatible, message, out);
        }
        self.state.next_txn += 1;
        let txn = Transaction {
            id: format!("{}-{}", self.state.next_txn, release_id.short()),
            release_id,
            manifest: release.manifest,
            class: self.slots.class.clone(),
            from_slot: booted,
            to_slot: target,
            from_version: self.booted_version().map(str::to_owned),
            started: now,
            user_now,
        };
        if let Some(old) = superseded {
            let message = format!(
                "superseded by version {} (transaction {})",
                txn.manifest.version, txn.id
            );
            let event = self.event(EventKind::Superseded, now, Some(&old), |e| {
                e.message = Some(message);
            });
            out.report(event);
        }
        self.report(EventKind::Accepted, &txn, now, out);
        out.notify(Notice::update_available(&txn));
        let decision = if user_now {
            Decision::Now
        } else {
            self.install_decision(&txn, now)
        };
        match decision {
            Decision::Now => self.start_writing(txn, out),
            Decision::Wait { why, until } => {
                self.report_wait(EventKind::Pending, &txn, (why, until), now, out);
                self.state.phase = Phase::Pending {
                    txn,
                    waiting: why,
                    until,
                };
                None
            }
        }
    }

    /// Writing starts: the target is made unbootable first.
    pub(super) fn start_writing(
        &mut self,
        txn: Transaction,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let slot = txn.to_slot.clone();
        self.state.phase = Phase::Writing { txn, durable: 0 };
        out.persist();
        Awaiting::step(Job::PrepareTarget { slot })
    }

    pub(super) fn target_prepared(
        &mut self,
        txn: Transaction,
        durable: u64,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        // A slot record describes the content; while it is rewritten, it describes nothing.
        self.state.slots.remove(&txn.to_slot);
        self.report(EventKind::Writing, &txn, now, out);
        let job = Job::Write {
            slot: txn.to_slot.clone(),
            image: Box::new(txn.manifest.images[&txn.class].clone()),
            resume_from: durable,
        };
        self.state.phase = Phase::Writing { txn, durable };
        Awaiting::step(job)
    }

    pub(super) fn on_progress(
        &mut self,
        written: u64,
        total: u64,
        downloaded: Option<u64>,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let Phase::Writing { txn, .. } = &self.state.phase else {
            return;
        };
        let due = self
            .last_progress_report
            .is_none_or(|last| now.duration_since(last) >= super::PROGRESS_INTERVAL);
        if due || written == total {
            self.last_progress_report = Some(now);
            out.progress(Progress {
                txn: txn.id.clone(),
                done: written,
                total,
                downloaded,
            });
        }
    }

    pub(super) fn on_checkpoint(&mut self, durable: u64, out: &mut Outputs) {
        if let Phase::Writing { durable: d, .. } = &mut self.state.phase {
            *d = durable;
            out.persist();
        }
    }

    pub(super) fn written(
        &mut self,
        txn: Transaction,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let image = &txn.manifest.images[&txn.class];
        self.state.slots.insert(
            txn.to_slot.clone(),
            SlotRecord {
                version: txn.manifest.version.clone(),
                release_id: txn.release_id,
                security_version: txn.manifest.security_version,
                sha256: image.sha256.clone(),
                written: now,
                committed: false,
            },
        );
        self.report(EventKind::Written, &txn, now, out);
        let slot = txn.to_slot.clone();
        self.state.phase = Phase::Activating { txn };
        Awaiting::step(Job::Activate { slot })
    }

    pub(super) fn activated(
        &mut self,
        txn: Transaction,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        let Some((boot_id, _)) = self.boot.clone() else {
            // Activation is only asked for after a boot was observed.
            self.state.phase = Phase::Activating { txn };
            return None;
        };
        self.report(EventKind::Activated, &txn, now, out);
        match self.reboot_decision(&txn, now) {
            Decision::Now => self.reboot_now(txn, boot_id, now, out),
            Decision::Wait { why, until } => {
                self.report_wait(EventKind::RebootScheduled, &txn, (why, until), now, out);
                self.state.phase = Phase::RebootScheduled {
                    txn,
                    boot_id_at_activation: boot_id,
                    waiting: why,
                    at: until,
                };
                self.announce_reboot(now, out);
                None
            }
        }
    }

    /// The reboot into the activated slot is due: persisted as `reboot-pending`, the user told
    /// first, then the reboot asked for.
    pub(super) fn reboot_now(
        &mut self,
        txn: Transaction,
        boot_id_at_activation: BootId,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.report(EventKind::Rebooting, &txn, now, out);
        out.warn(Notice::DisruptionAhead {
            txn: txn.id.clone(),
            seconds: 0,
            postponable: false,
            downtime_seconds: txn.manifest.disruption.downtime_seconds,
        });
        self.state.phase = Phase::RebootPending {
            txn,
            boot_id_at_activation,
        };
        Awaiting::reboot()
    }

    /// The transaction ends without its release running: failed, or rolled back.
    pub(super) fn finish_failed(
        &mut self,
        txn: Transaction,
        result: EventKind,
        failure: Failure,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        self.report_failure(result, &txn, &failure, now, out);
        self.state.slots.remove(&txn.to_slot);
        let (reason, message) = (Some(failure.reason), Some(failure.message));
        self.state.last = Some(Outcome::of(&txn, result, reason, message, now));
        self.state.phase = Phase::Idle;
        out.notify(Notice::completed(&txn, result, Some(failure.reason)));
    }

    /// The transaction rolled back (the trial failed, or the bootloader fell back): its release
    /// is not retried automatically.
    pub(super) fn roll_back_finished(
        &mut self,
        txn: Transaction,
        failure: Failure,
        now: Timestamp,
        out: &mut Outputs,
    ) -> Option<Awaiting> {
        self.state.rolled_back.retain(|id| id != &txn.release_id);
        self.state.rolled_back.push(txn.release_id);
        if self.state.rolled_back.len() > MAX_ROLLED_BACK_REMEMBERED {
            self.state.rolled_back.remove(0);
        }
        let slot = txn.to_slot.clone();
        self.finish_failed(txn, EventKind::RolledBack, failure, now, out);
        // The bootloader may have given up on the slot only because its tries ran out; take it
        // out of the boot order for good. Then keep the slot that came back: its boot spent a
        // try too (GRUB: its try flag is set, and with no untried OK slot left GRUB boots menu
        // entry 0, whatever it holds).
        let then = match self.booted() {
            Some(booted) => Then::KeepBooted(booted.clone()),
            None => Then::Nothing,
        };
        Awaiting::then(Job::MarkBad { slot }, then)
    }
}

impl Engine {
    /// The release is no longer offered where it came from. Only a pending transaction of that
    /// release ends (`withdrawn`); once writing started, the install goes on (a half-done
    /// install is what a halt must not cause), and anything else is not about this release.
    pub(super) fn on_withdrawn(
        &mut self,
        release_id: crate::release::ReleaseId,
        why: &str,
        now: Timestamp,
        out: &mut Outputs,
    ) {
        let Phase::Pending { txn, .. } = &self.state.phase else {
            return;
        };
        if txn.release_id != release_id {
            return;
        }
        let Phase::Pending { txn, .. } = core::mem::take(&mut self.state.phase) else {
            unreachable!("matched above")
        };
        let event = self.event(EventKind::Withdrawn, now, Some(&txn), |e| {
            e.message = Some(format!(
                "{why}: version {} is dropped; this device had not started installing it",
                txn.manifest.version
            ));
        });
        let message = event.message.clone();
        self.state.last = Some(Outcome::of(&txn, EventKind::Withdrawn, None, message, now));
        out.report(event);
    }
}
