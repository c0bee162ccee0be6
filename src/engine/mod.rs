//! The update state machine, as a sans-IO core: no filesystem, no sockets, no clock, no tokio.
//!
//! The driver feeds [`Input`]s to [`Engine::handle`] together with the current time and carries
//! out the [`Action`]s it returns, in order. An action that does work (write, bootloader change,
//! health checks) is answered by the driver with the matching input once that work finished; the
//! engine asks for at most one such job at a time. [`Action::Persist`] always comes before the
//! job it protects, so that after a power cut the engine, restored from the persisted state and
//! told of the boot it finds itself in, redoes or finishes exactly the step that was cut.
//!
//! Events: a transition's events are reported after the `Persist` that records it (with the
//! sequence numbers they took), and they stay in the persisted state until the next transition.
//! After a restart the engine reports them again, with the same numbers: delivery is at least
//! once, the `seq` identifies a repeat, and a number is never given to two different events. A
//! transition that was not persisted is redone after a restart; its events were never reported
//! and get the same numbers again.
//!
//! Architecture invariants:
//! - the booted slot is never the target of a write or of `mark bad`;
//! - the bootloader is never told to try a slot whose content was not read back and verified:
//!   `Activate` is only emitted from `Activating`, which is only entered after `WriteFinished(Ok)`;
//! - the target slot is made unbootable *before* its first byte is written;
//! - reboots are recognised by the kernel boot id and the booted slot, never by the clock;
//! - the slot that is meant to run is marked good at every boot (as RAUC's mark-good service
//!   does): the boot scripts spend a try (U-Boot) or set a try flag (GRUB) at every boot, and
//!   a slot whose budget is not given back is left by the bootloader a few boots later.

pub mod state;

use jiff::Timestamp;

use crate::reason::ReasonCode;
use crate::release::VerifiedRelease;
use crate::release::manifest::Image;
pub use state::{Event, Outcome, PersistentState, Phase, Progress, Transaction, TxnState};
use state::{MAX_ROLLED_BACK_REMEMBERED, SlotRecord};

/// Progress events are reported at most this often, so a fast write does not flood operators.
pub const PROGRESS_INTERVAL: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// What the driver tells the engine.
#[derive(Debug, Clone)]
pub enum Input {
    /// The agent started (or the device booted): the kernel boot id and the slot it booted from.
    BootObserved {
        boot_id: String,
        booted: String,
    },
    /// A release passed verification (signatures, compatible, floor, expiry).
    ReleaseVerified(Box<VerifiedRelease>),
    /// A release was refused by verification; reported, nothing else happens.
    ReleaseRefused {
        reason: ReasonCode,
        message: String,
    },
    /// The target slot was made unbootable; writing may start.
    TargetPrepared(Result<(), Failure>),
    WriteProgress {
        written: u64,
        total: u64,
    },
    /// `durable` bytes were written, synced and hashed; a restart may resume from there.
    WriteCheckpoint {
        durable: u64,
    },
    /// The image was written and read back with the right hash, or the write failed.
    WriteFinished(Result<(), Failure>),
    /// The bootloader change asked for by `Activate`, `MarkGood` or `MarkBad` is done.
    BootloaderDone(Result<(), Failure>),
    HealthFinished(Result<(), Failure>),
}

/// A failed job: a stable code plus a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: ReasonCode,
    pub message: String,
}

impl Failure {
    pub fn new(reason: ReasonCode, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}

/// What the engine asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write [`Engine::state`] atomically before carrying out the next action.
    Persist,
    Report(Event),
    /// Progress of the write, for the retained state (not an event: it has no sequence number).
    ReportProgress(Progress),
    /// Make `slot` unbootable (mark bad) so a half-written slot is never tried.
    PrepareTarget {
        slot: String,
    },
    StartWrite {
        slot: String,
        image: Box<Image>,
        resume_from: u64,
    },
    /// Tell the bootloader to try `slot` once at the next boot.
    Activate {
        slot: String,
    },
    Reboot,
    RunHealthChecks,
    MarkGood {
        slot: String,
    },
    MarkBad {
        slot: String,
    },
}

/// The device's A/B pair as the engine sees it: names only, no paths.
#[derive(Debug, Clone)]
pub struct SlotPair {
    pub class: String,
    pub bootnames: [String; 2],
}

impl SlotPair {
    fn other(&self, bootname: &str) -> Option<&str> {
        match &self.bootnames {
            [a, b] if a == bootname => Some(b),
            [a, b] if b == bootname => Some(a),
            _ => None,
        }
    }
}

pub struct Engine {
    slots: SlotPair,
    state: PersistentState,
    /// Facts about the current boot, learnt from `BootObserved`.
    boot: Option<(String, String)>,
    /// What a slot the agent never wrote runs (the image the device shipped with).
    factory_version: Option<String>,
    last_progress_report: Option<Timestamp>,
    /// A bootloader change to ask for once the current one is done. Not persisted: it is
    /// only ever the booted slot's mark-good, which the next boot observed in idle asks for
    /// anyway.
    then: Option<Action>,
}

impl Engine {
    pub fn new(slots: SlotPair, state: PersistentState) -> Engine {
        Engine {
            slots,
            state,
            boot: None,
            factory_version: None,
            last_progress_report: None,
            then: None,
        }
    }

    pub fn with_factory_version(mut self, version: Option<String>) -> Engine {
        self.factory_version = version;
        self
    }

    pub fn state(&self) -> &PersistentState {
        &self.state
    }

    pub fn booted(&self) -> Option<&str> {
        self.boot.as_ref().map(|(_, slot)| slot.as_str())
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
        let mut out = Vec::new();
        let first_new_seq = self.state.next_seq;
        match input {
            Input::BootObserved { boot_id, booted } => self.on_boot(boot_id, booted, now, &mut out),
            Input::ReleaseVerified(release) => self.on_release(*release, now, &mut out),
            Input::ReleaseRefused { reason, message } => {
                let event = self.event(TxnState::Refused, now, None, |e| {
                    e.reason = Some(reason);
                    e.message = Some(message);
                });
                out.push(Action::Persist);
                out.push(Action::Report(event));
            }
            Input::TargetPrepared(result) => self.on_target_prepared(result, now, &mut out),
            Input::WriteProgress { written, total } => {
                self.on_progress(written, total, now, &mut out)
            }
            Input::WriteCheckpoint { durable } => {
                if let Phase::Writing { durable: d, .. } = &mut self.state.phase {
                    *d = durable;
                    out.push(Action::Persist);
                }
            }
            Input::WriteFinished(result) => self.on_write_finished(result, now, &mut out),
            Input::BootloaderDone(result) => self.on_bootloader_done(result, now, &mut out),
            Input::HealthFinished(result) => self.on_health(result, now, &mut out),
        }
        // The events this input made are persisted with its transition (every transition that
        // makes events persists) and kept until the next one, so a restart can report them again.
        let made: Vec<Event> = out
            .iter()
            .filter_map(|action| match action {
                Action::Report(event) if event.seq >= first_new_seq => Some(event.clone()),
                _ => None,
            })
            .collect();
        if !made.is_empty() {
            self.state.recent_events = made;
        }
        out
    }

    fn on_boot(&mut self, boot_id: String, booted: String, now: Timestamp, out: &mut Vec<Action>) {
        self.boot = Some((boot_id.clone(), booted.clone()));
        // The last transition was persisted, but the agent may have stopped before it reported
        // the events: report them again (same seq; receivers drop what they have), then forget
        // them durably so that later boots do not repeat them.
        let replay = std::mem::take(&mut self.state.recent_events);
        if !replay.is_empty() {
            out.extend(replay.into_iter().map(Action::Report));
            out.push(Action::Persist);
        }
        match self.state.phase.clone() {
            Phase::Idle => {
                // The boot scripts count every boot against the booted slot (U-Boot's
                // BOOT_x_LEFT, GRUB's x_TRY): the running system is marked good at each boot,
                // as RAUC's mark-good service does, or the bootloader falls back to the other
                // slot after a few ordinary reboots (GRUB: the second one).
                if self.slots.other(&booted).is_some() {
                    out.push(Action::MarkGood { slot: booted });
                }
            }
            Phase::Writing { txn, .. } => {
                if booted == txn.to_slot {
                    // The target cannot have booted: it was made unbootable before writing.
                    self.finish_failed(
                        txn,
                        TxnState::Failed,
                        Failure::new(
                            ReasonCode::UnexpectedBoot,
                            "the device booted the slot that was being written; the install was abandoned",
                        ),
                        now,
                        out,
                    );
                } else {
                    // Interrupted (agent restart or power cut): make sure the target is still
                    // unbootable, then continue from the last durable checkpoint.
                    out.push(Action::PrepareTarget { slot: txn.to_slot });
                }
            }
            Phase::Activating { txn } => {
                if booted == txn.to_slot {
                    // The power failed after the bootloader was switched but before that was
                    // persisted, and the bootloader tried the new slot: this is its trial boot.
                    let activated = self.txn_event(TxnState::Activated, &txn, now);
                    let start = out.len();
                    self.enter_trial(txn, boot_id, now, out);
                    // Reported after the Persist that enter_trial starts with, like every event.
                    debug_assert_eq!(out.get(start), Some(&Action::Persist));
                    out.insert(start + 1, Action::Report(activated));
                } else {
                    out.push(Action::Activate { slot: txn.to_slot });
                }
            }
            Phase::RebootPending {
                txn,
                boot_id_at_activation,
            } => {
                if boot_id == boot_id_at_activation {
                    out.push(Action::Reboot);
                } else if booted == txn.to_slot {
                    self.enter_trial(txn, boot_id, now, out);
                } else {
                    self.roll_back_finished(
                        txn,
                        Failure::new(
                            ReasonCode::FellBack,
                            format!(
                                "the device rebooted into slot {booted} instead of the new slot: the bootloader fell back"
                            ),
                        ),
                        now,
                        out,
                    );
                }
            }
            Phase::Trial { txn, .. } => {
                if booted == txn.to_slot {
                    // Agent restart during the trial, or the trial boot crashed and the bootloader
                    // tried again: the health checks decide again.
                    self.enter_trial(txn, boot_id, now, out);
                } else {
                    self.roll_back_finished(
                        txn,
                        Failure::new(
                            ReasonCode::FellBack,
                            format!(
                                "the trial boot of the new slot did not complete; the bootloader fell back to slot {booted}"
                            ),
                        ),
                        now,
                        out,
                    );
                }
            }
            Phase::Committing { txn } => out.push(Action::MarkGood { slot: txn.to_slot }),
            Phase::RollingBack {
                txn,
                reason,
                message,
            } => {
                if booted == txn.to_slot {
                    out.push(Action::MarkBad { slot: txn.to_slot });
                } else {
                    self.roll_back_finished(txn, Failure::new(reason, message), now, out);
                }
            }
        }
    }

    fn on_release(&mut self, release: VerifiedRelease, now: Timestamp, out: &mut Vec<Action>) {
        let release_id = release.id_hex();
        let refuse = |engine: &mut Engine, reason, message: String, out: &mut Vec<Action>| {
            let event = engine.event(TxnState::Refused, now, None, |e| {
                e.release_id = Some(release_id.clone());
                e.to_version = Some(release.manifest.version.clone());
                e.reason = Some(reason);
                e.message = Some(message);
            });
            out.push(Action::Persist);
            out.push(Action::Report(event));
        };
        let Some((_, booted)) = self.boot.clone() else {
            refuse(
                self,
                ReasonCode::NotReady,
                "the agent has not yet determined the booted slot".into(),
                out,
            );
            return;
        };
        if let Some(txn) = self.state.phase.transaction() {
            if txn.release_id != release_id {
                let message = format!(
                    "transaction {} for version {} is still in progress",
                    txn.id,
                    txn.to_version()
                );
                refuse(self, ReasonCode::Busy, message, out);
            }
            return;
        }
        if self
            .state
            .slots
            .get(&booted)
            .is_some_and(|slot| slot.release_id == release_id)
        {
            // Already running this release: a retained message seen again is not news.
            return;
        }
        if self.state.rolled_back.contains(&release_id) {
            let message =
                "this release rolled back on this device before; it is not retried automatically"
                    .to_string();
            refuse(self, ReasonCode::PreviouslyRolledBack, message, out);
            return;
        }
        let Some(target) = self.slots.other(&booted).map(str::to_owned) else {
            refuse(
                self,
                ReasonCode::NotReady,
                format!("the booted slot {booted} is not one of the configured slots"),
                out,
            );
            return;
        };
        if !release.manifest.images.contains_key(&self.slots.class) {
            let message = format!(
                "the release has no image for slot class {}",
                self.slots.class
            );
            refuse(self, ReasonCode::Incompatible, message, out);
            return;
        }
        self.state.next_txn += 1;
        let txn = Transaction {
            id: format!("{}-{}", self.state.next_txn, &release_id[..12]),
            release_id,
            manifest: release.manifest,
            class: self.slots.class.clone(),
            from_slot: booted,
            to_slot: target.clone(),
            from_version: self.booted_version().map(str::to_owned),
            started: now,
        };
        let event = self.txn_event(TxnState::Accepted, &txn, now);
        self.state.phase = Phase::Writing { txn, durable: 0 };
        out.push(Action::Persist);
        out.push(Action::Report(event));
        out.push(Action::PrepareTarget { slot: target });
    }

    fn on_target_prepared(
        &mut self,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let Phase::Writing { txn, durable } = self.state.phase.clone() else {
            return;
        };
        match result {
            Err(failure) => self.finish_failed(txn, TxnState::Failed, failure, now, out),
            Ok(()) => {
                // A slot record describes the content; while it is rewritten, it describes nothing.
                self.state.slots.remove(&txn.to_slot);
                let event = self.txn_event(TxnState::Writing, &txn, now);
                let image = txn.manifest.images[&txn.class].clone();
                out.push(Action::Persist);
                out.push(Action::Report(event));
                out.push(Action::StartWrite {
                    slot: txn.to_slot.clone(),
                    image: Box::new(image),
                    resume_from: durable,
                });
            }
        }
    }

    fn on_progress(&mut self, written: u64, total: u64, now: Timestamp, out: &mut Vec<Action>) {
        let Phase::Writing { txn, .. } = &self.state.phase else {
            return;
        };
        let due = self
            .last_progress_report
            .is_none_or(|last| now.duration_since(last) >= PROGRESS_INTERVAL);
        if due || written == total {
            self.last_progress_report = Some(now);
            out.push(Action::ReportProgress(Progress {
                txn: txn.id.clone(),
                done: written,
                total,
            }));
        }
    }

    fn on_write_finished(
        &mut self,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let Phase::Writing { txn, .. } = self.state.phase.clone() else {
            return;
        };
        match result {
            Err(failure) => self.finish_failed(txn, TxnState::Failed, failure, now, out),
            Ok(()) => {
                let image = &txn.manifest.images[&txn.class];
                self.state.slots.insert(
                    txn.to_slot.clone(),
                    SlotRecord {
                        version: txn.manifest.version.clone(),
                        release_id: txn.release_id.clone(),
                        security_version: txn.manifest.security_version,
                        sha256: image.sha256.clone(),
                        written: now,
                        committed: false,
                    },
                );
                let event = self.txn_event(TxnState::Written, &txn, now);
                let slot = txn.to_slot.clone();
                self.state.phase = Phase::Activating { txn };
                out.push(Action::Persist);
                out.push(Action::Report(event));
                out.push(Action::Activate { slot });
            }
        }
    }

    fn on_bootloader_done(
        &mut self,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        match (self.state.phase.clone(), result) {
            (Phase::Activating { txn }, Ok(())) => {
                let Some((boot_id, _)) = self.boot.clone() else {
                    return;
                };
                let activated = self.txn_event(TxnState::Activated, &txn, now);
                let rebooting = self.txn_event(TxnState::Rebooting, &txn, now);
                self.state.phase = Phase::RebootPending {
                    txn,
                    boot_id_at_activation: boot_id,
                };
                out.push(Action::Persist);
                out.push(Action::Report(activated));
                out.push(Action::Report(rebooting));
                out.push(Action::Reboot);
            }
            (Phase::Activating { txn }, Err(failure)) => {
                // The slot may be half-activated: make it unbootable again before giving up.
                self.finish_failed(txn.clone(), TxnState::Failed, failure, now, out);
                out.push(Action::MarkBad { slot: txn.to_slot });
            }
            (Phase::Committing { txn }, Ok(())) => {
                if let Some(record) = self.state.slots.get_mut(&txn.to_slot) {
                    record.committed = true;
                }
                self.state.floor = self.state.floor.max(txn.manifest.security_version);
                let event = self.txn_event(TxnState::Committed, &txn, now);
                self.state.last = Some(Outcome {
                    txn: txn.id.clone(),
                    version: txn.manifest.version.clone(),
                    result: TxnState::Committed,
                    reason: None,
                    message: None,
                    at: now,
                });
                self.state.phase = Phase::Idle;
                out.push(Action::Persist);
                out.push(Action::Report(event));
            }
            (Phase::Committing { txn }, Err(failure)) => {
                // The new slot is healthy but could not be marked good: the bootloader will fall
                // back when its tries run out. Go back the orderly way instead.
                self.start_rollback(txn, failure, now, out);
            }
            (Phase::RollingBack { .. }, Ok(())) => out.push(Action::Reboot),
            (Phase::RollingBack { txn, .. }, Err(failure)) => {
                // Marking bad failed; rebooting still lets the bootloader's try counter fall back.
                let mut event = self.txn_event(TxnState::RollingBack, &txn, now);
                event.reason = Some(failure.reason);
                event.message = Some(failure.message);
                // The event took a sequence number: persist it before the event is reported, or
                // the next boot would give the same number to another event.
                out.push(Action::Persist);
                out.push(Action::Report(event));
                out.push(Action::Reboot);
            }
            // MarkBad after a failure or a rollback, MarkGood of the booted slot, or a stale
            // answer: at most the booted slot's mark-good is left to do.
            _ => out.extend(self.then.take()),
        }
    }

    fn on_health(&mut self, result: Result<(), Failure>, now: Timestamp, out: &mut Vec<Action>) {
        let Phase::Trial { txn, .. } = self.state.phase.clone() else {
            return;
        };
        match result {
            Ok(()) => {
                let slot = txn.to_slot.clone();
                self.state.phase = Phase::Committing { txn };
                out.push(Action::Persist);
                out.push(Action::MarkGood { slot });
            }
            Err(failure) => self.start_rollback(txn, failure, now, out),
        }
    }

    fn enter_trial(
        &mut self,
        txn: Transaction,
        boot_id: String,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let event = self.txn_event(TxnState::TrialBoot, &txn, now);
        self.state.phase = Phase::Trial { txn, boot_id };
        out.push(Action::Persist);
        out.push(Action::Report(event));
        out.push(Action::RunHealthChecks);
    }

    fn start_rollback(
        &mut self,
        txn: Transaction,
        failure: Failure,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let mut event = self.txn_event(TxnState::RollingBack, &txn, now);
        event.reason = Some(failure.reason);
        event.message = Some(failure.message.clone());
        let slot = txn.to_slot.clone();
        self.state.phase = Phase::RollingBack {
            txn,
            reason: failure.reason,
            message: failure.message,
        };
        out.push(Action::Persist);
        out.push(Action::Report(event));
        out.push(Action::MarkBad { slot });
    }

    fn roll_back_finished(
        &mut self,
        txn: Transaction,
        failure: Failure,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        self.state.rolled_back.retain(|id| id != &txn.release_id);
        self.state.rolled_back.push(txn.release_id.clone());
        if self.state.rolled_back.len() > MAX_ROLLED_BACK_REMEMBERED {
            self.state.rolled_back.remove(0);
        }
        let slot = txn.to_slot.clone();
        self.finish_failed(txn, TxnState::RolledBack, failure, now, out);
        // The bootloader may have given up on the slot only because its tries ran out; take it
        // out of the boot order for good.
        out.push(Action::MarkBad { slot });
        // Then keep the slot that came back: its boot spent a try too (GRUB: its try flag is
        // set, and with no untried OK slot left GRUB boots menu entry 0, whatever it holds).
        self.then = self.booted().map(|slot| Action::MarkGood {
            slot: slot.to_owned(),
        });
    }

    fn finish_failed(
        &mut self,
        txn: Transaction,
        result: TxnState,
        failure: Failure,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let mut event = self.txn_event(result, &txn, now);
        event.reason = Some(failure.reason);
        event.message = Some(failure.message.clone());
        self.state.slots.remove(&txn.to_slot);
        self.state.last = Some(Outcome {
            txn: txn.id.clone(),
            version: txn.manifest.version.clone(),
            result,
            reason: Some(failure.reason),
            message: Some(failure.message),
            at: now,
        });
        self.state.phase = Phase::Idle;
        out.push(Action::Persist);
        out.push(Action::Report(event));
    }

    fn txn_event(&mut self, state: TxnState, txn: &Transaction, now: Timestamp) -> Event {
        self.event(state, now, Some(txn), |_| {})
    }

    fn event(
        &mut self,
        state: TxnState,
        now: Timestamp,
        txn: Option<&Transaction>,
        fill: impl FnOnce(&mut Event),
    ) -> Event {
        let seq = self.state.next_seq;
        self.state.next_seq += 1;
        let mut event = Event {
            seq,
            at: now,
            state,
            txn: txn.map(|t| t.id.clone()),
            release_id: txn.map(|t| t.release_id.clone()),
            from_version: txn.and_then(|t| t.from_version.clone()),
            to_version: txn.map(|t| t.manifest.version.clone()),
            slot: txn.map(|t| t.to_slot.clone()),
            reason: None,
            message: None,
        };
        fill(&mut event);
        event
    }
}

#[cfg(test)]
mod tests;
