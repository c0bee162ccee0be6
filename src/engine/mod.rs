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

pub mod policy;
pub mod state;

use jiff::{SignedDuration, Timestamp};

use crate::reason::ReasonCode;
use crate::release::VerifiedRelease;
use crate::release::manifest::{Disruption, Image, Severity};
pub use policy::{Clamp, Decision, PolicyConfig, RebootPolicy, UserChoices, Wait, Window};
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
    /// A release passed verification (signatures, compatible, floor, expiry). It installs when
    /// the policy lets it (automatic install, maintenance windows, postponement).
    ReleaseVerified(Box<VerifiedRelease>),
    /// The user asked to install this verified release now (`update-agent install`): the
    /// policy does not hold it back, and the reboot is the driver's to decide.
    UserInstall(Box<VerifiedRelease>),
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
    /// Time passed: the driver's timer ([`Engine::poll_timeout`]) fired. Harmless at any time.
    Tick,
    /// The user's requests (D-Bus, CLI). Each is answered with exactly one [`Action::Answer`].
    UserPostpone(Postpone),
    UserResume,
    UserSetAutoInstall(bool),
    /// Install the pending release now, or reboot into the activated one now.
    UserInstallNow,
    UserCheckNow,
    /// Mark the booted slot good (`good`), or the other slot bad.
    UserMark {
        good: bool,
    },
    /// The reboot the engine asked for did not happen (the command failed): reported; the
    /// phase stays, and the driver tries again.
    RebootFailed(Failure),
}

/// How long the user postpones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Postpone {
    For(SignedDuration),
    Until(Timestamp),
}

/// What the user is told, beyond events (D-Bus signals; EN 303 645 5.3-11/12).
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A release was accepted: what it fixes and what it will do to the device.
    UpdateAvailable {
        txn: String,
        version: String,
        advisory: String,
        security: bool,
        severity: Severity,
        deadline: Option<Timestamp>,
        disruption: Disruption,
    },
    /// The device will reboot in `seconds`; `postponable` when the user can still push it back.
    DisruptionAhead {
        txn: String,
        seconds: u64,
        postponable: bool,
        downtime_seconds: u64,
    },
    /// A transaction ended (`committed`, `failed`, `rolled-back`).
    Completed {
        txn: String,
        version: String,
        result: TxnState,
        reason: Option<ReasonCode>,
    },
}

/// The engine's answer to one user request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The postponement in force: `until`, which is `requested` unless `clamped`.
    Postponed {
        until: Timestamp,
        requested: Timestamp,
        clamped: Option<Clamp>,
    },
    Refused(Failure),
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
    /// Tell the user (D-Bus signals). Comes after the `Persist` of the transition it tells of.
    Notify(Notice),
    /// The answer to the user request just handled, after the `Persist` that makes it hold.
    Answer(Answer),
    /// Look for new releases now (the user asked): the driver re-reads its release source.
    Check,
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
    policy: PolicyConfig,
    /// When the engine wants [`Input::Tick`]; recomputed after every input.
    timer: Option<Timestamp>,
    /// The reboot time the user was last told of (`Notice::DisruptionAhead`), so that it is
    /// told once per schedule. Not persisted: after a restart the user is told again.
    announced: Option<Timestamp>,
    /// The user's mark-good/bad under way (good, slot): answered with the bootloader's result.
    /// Not persisted: a restart loses the caller too.
    marking: Option<(bool, String)>,
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
            policy: PolicyConfig::default(),
            timer: None,
            announced: None,
            marking: None,
        }
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
    pub fn rolled_back_before(&self, release_id: &str) -> bool {
        self.state.rolled_back.iter().any(|id| id == release_id)
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
            Input::ReleaseVerified(release) => self.on_release(*release, false, now, &mut out),
            Input::UserInstall(release) => self.on_release(*release, true, now, &mut out),
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
            Input::Tick => self.reevaluate(now, &mut out),
            Input::UserPostpone(postpone) => self.on_postpone(postpone, now, &mut out),
            Input::UserResume => {
                self.state.user.postponed_until = None;
                self.user_decision(TxnState::Resumed, now, &mut out, |_| {});
                out.push(Action::Answer(Answer::Done));
                self.reevaluate(now, &mut out);
            }
            Input::UserSetAutoInstall(on) => {
                self.state.user.auto_install = Some(on);
                let state = if on {
                    TxnState::AutoInstallEnabled
                } else {
                    TxnState::AutoInstallDisabled
                };
                self.user_decision(state, now, &mut out, |_| {});
                out.push(Action::Answer(Answer::Done));
                self.reevaluate(now, &mut out);
            }
            Input::UserInstallNow => self.on_install_now(now, &mut out),
            Input::UserCheckNow => {
                self.user_decision(TxnState::CheckRequested, now, &mut out, |_| {});
                out.push(Action::Answer(Answer::Done));
                out.push(Action::Check);
            }
            Input::UserMark { good } => self.on_user_mark(good, &mut out),
            Input::RebootFailed(failure) => {
                let txn = self.state.phase.transaction().cloned();
                let event = self.event(TxnState::RebootFailed, now, txn.as_ref(), |e| {
                    e.reason = Some(failure.reason);
                    e.message = Some(failure.message);
                });
                out.push(Action::Persist);
                out.push(Action::Report(event));
            }
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
        self.timer = self.next_wake(now);
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
            // Nothing was written for a pending release: the boot is an ordinary one. Whether
            // it may install now is the next `Tick`'s question (a one-shot `boot-check` never
            // ticks, so it never starts an install).
            Phase::Idle | Phase::Pending { .. } => {
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
            Phase::RebootScheduled {
                txn,
                boot_id_at_activation,
                ..
            }
            | Phase::RebootPending {
                txn,
                boot_id_at_activation,
            } => {
                if boot_id == boot_id_at_activation {
                    // The agent restarted, the device did not: a due reboot is asked for again;
                    // a scheduled one waits for its time (the next `Tick`).
                    if matches!(self.state.phase, Phase::RebootPending { .. }) {
                        out.push(Action::Reboot);
                    }
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

    fn on_release(
        &mut self,
        release: VerifiedRelease,
        user_now: bool,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
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
        // A pending transaction has written nothing: a newer release takes its place (once it
        // passed the checks below). One under way is finished first.
        let mut superseded = None;
        if let Some(txn) = self.state.phase.transaction() {
            if txn.release_id == release_id {
                return;
            }
            let pending = matches!(self.state.phase, Phase::Pending { .. });
            if !pending {
                let message = format!(
                    "transaction {} for version {} is still in progress",
                    txn.id,
                    txn.to_version()
                );
                refuse(self, ReasonCode::Busy, message, out);
                return;
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
                refuse(self, ReasonCode::Downgrade, message, out);
                return;
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
            user_now,
        };
        let mut events = Vec::new();
        if let Some(old) = superseded {
            let message = format!(
                "superseded by version {} (transaction {})",
                txn.manifest.version, txn.id
            );
            events.push(self.event(TxnState::Superseded, now, Some(&old), |e| {
                e.message = Some(message);
            }));
        }
        events.push(self.txn_event(TxnState::Accepted, &txn, now));
        let available = update_available(&txn);
        let decision = if user_now {
            Decision::Now
        } else {
            self.policy
                .install_decision(now, &self.state.user, &txn.manifest)
        };
        match decision {
            Decision::Now => {
                self.start_writing(txn, events, out);
                out.push(Action::Notify(available));
            }
            Decision::Wait { why, until } => {
                let pending = self.event(TxnState::Pending, now, Some(&txn), |e| {
                    e.waiting = Some(why);
                    e.until = until;
                });
                self.state.phase = Phase::Pending {
                    txn,
                    waiting: why,
                    until,
                };
                out.push(Action::Persist);
                out.extend(events.into_iter().map(Action::Report));
                out.push(Action::Report(pending));
                out.push(Action::Notify(available));
            }
        }
    }

    /// Writing starts: the target is made unbootable first (`PrepareTarget`).
    fn start_writing(&mut self, txn: Transaction, events: Vec<Event>, out: &mut Vec<Action>) {
        let target = txn.to_slot.clone();
        self.state.phase = Phase::Writing { txn, durable: 0 };
        out.push(Action::Persist);
        out.extend(events.into_iter().map(Action::Report));
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
        // Nothing else is asked of the bootloader while a user's mark runs (one job at a time,
        // and a mark is only taken between transactions): this answer is the mark's.
        if let Some((good, slot)) = self.marking.take() {
            return self.user_mark_done(good, slot, result, now, out);
        }
        match (self.state.phase.clone(), result) {
            (Phase::Activating { txn }, Ok(())) => {
                let Some((boot_id, _)) = self.boot.clone() else {
                    return;
                };
                let activated = self.txn_event(TxnState::Activated, &txn, now);
                match self.reboot_decision(&txn, now) {
                    Decision::Now => self.reboot_now(txn, boot_id, vec![activated], now, out),
                    Decision::Wait { why, until } => {
                        let scheduled =
                            self.event(TxnState::RebootScheduled, now, Some(&txn), |e| {
                                e.waiting = Some(why);
                                e.until = until;
                            });
                        self.state.phase = Phase::RebootScheduled {
                            txn,
                            boot_id_at_activation: boot_id,
                            waiting: why,
                            at: until,
                        };
                        out.push(Action::Persist);
                        out.push(Action::Report(activated));
                        out.push(Action::Report(scheduled));
                        self.announce_reboot(now, out);
                    }
                }
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
                out.push(Action::Notify(completed(&txn, TxnState::Committed, None)));
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
        out.push(Action::Notify(completed(
            &txn,
            result,
            Some(failure.reason),
        )));
    }

    // --- policy: when to install and reboot, and the user's say ---

    fn reboot_decision(&self, txn: &Transaction, now: Timestamp) -> Decision {
        if txn.user_now {
            Decision::Now
        } else {
            self.policy
                .reboot_decision(now, &self.state.user, &txn.manifest)
        }
    }

    /// The transaction's deadline for what it waits for now, if it waits.
    fn current_deadline(&self) -> Option<Timestamp> {
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
    fn next_wake(&self, now: Timestamp) -> Option<Timestamp> {
        match &self.state.phase {
            Phase::Pending { txn, .. } => {
                match self
                    .policy
                    .install_decision(now, &self.state.user, &txn.manifest)
                {
                    Decision::Now => Some(now),
                    Decision::Wait { until, .. } => until,
                }
            }
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
    fn reevaluate(&mut self, now: Timestamp, out: &mut Vec<Action>) {
        match self.state.phase.clone() {
            Phase::Pending {
                txn,
                waiting,
                until,
            } => match self
                .policy
                .install_decision(now, &self.state.user, &txn.manifest)
            {
                Decision::Now => self.start_writing(txn, Vec::new(), out),
                Decision::Wait { why, until: next } => {
                    if (why, next) != (waiting, until) {
                        self.state.phase = Phase::Pending {
                            txn,
                            waiting: why,
                            until: next,
                        };
                        out.push(Action::Persist);
                    }
                }
            },
            Phase::RebootScheduled {
                txn,
                boot_id_at_activation,
                waiting,
                at,
            } => match self.reboot_decision(&txn, now) {
                Decision::Now => self.reboot_now(txn, boot_id_at_activation, Vec::new(), now, out),
                Decision::Wait { why, until } => {
                    if (why, until) != (waiting, at) {
                        self.state.phase = Phase::RebootScheduled {
                            txn,
                            boot_id_at_activation,
                            waiting: why,
                            at: until,
                        };
                        out.push(Action::Persist);
                    }
                    self.announce_reboot(now, out);
                }
            },
            _ => {}
        }
    }

    /// Tells the user of a scheduled reboot once it is within the notice period.
    fn announce_reboot(&mut self, now: Timestamp, out: &mut Vec<Action>) {
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
        out.push(Action::Notify(notice));
    }

    /// The reboot into the activated slot is due: persisted as `reboot-pending` first, the user
    /// told, then the reboot asked for.
    fn reboot_now(
        &mut self,
        txn: Transaction,
        boot_id_at_activation: String,
        mut events: Vec<Event>,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        events.push(self.txn_event(TxnState::Rebooting, &txn, now));
        let notice = Notice::DisruptionAhead {
            txn: txn.id.clone(),
            seconds: 0,
            postponable: false,
            downtime_seconds: txn.manifest.disruption.downtime_seconds,
        };
        self.state.phase = Phase::RebootPending {
            txn,
            boot_id_at_activation,
        };
        out.push(Action::Persist);
        // The user hears of the disruption before anything else of this step is told.
        out.push(Action::Notify(notice));
        out.extend(events.into_iter().map(Action::Report));
        out.push(Action::Reboot);
    }

    /// Records a user decision as an event (about the current transaction, if any), persisted
    /// with the choice it made.
    fn user_decision(
        &mut self,
        state: TxnState,
        now: Timestamp,
        out: &mut Vec<Action>,
        fill: impl FnOnce(&mut Event),
    ) {
        let txn = self.state.phase.transaction().cloned();
        let event = self.event(state, now, txn.as_ref(), fill);
        out.push(Action::Persist);
        out.push(Action::Report(event));
    }

    fn on_postpone(&mut self, postpone: Postpone, now: Timestamp, out: &mut Vec<Action>) {
        let requested = match postpone {
            Postpone::For(duration) => now.checked_add(duration).unwrap_or(Timestamp::MAX),
            Postpone::Until(until) => until,
        };
        if requested <= now {
            out.push(Action::Answer(Answer::Refused(Failure::new(
                ReasonCode::InvalidRequest,
                format!("a postponement must end in the future (asked for {requested})"),
            ))));
            return;
        }
        let (until, clamped) = self
            .policy
            .clamp_postpone(now, requested, self.current_deadline());
        if until <= now {
            out.push(Action::Answer(Answer::Refused(Failure::new(
                ReasonCode::NotPostponable,
                format!("the release's deadline {until} has passed; it installs now"),
            ))));
            return;
        }
        self.state.user.postponed_until = Some(until);
        // A new time for the reboot is announced anew.
        self.announced = None;
        self.user_decision(TxnState::Postponed, now, out, |e| {
            e.until = Some(until);
            e.clamped = clamped;
        });
        out.push(Action::Answer(Answer::Postponed {
            until,
            requested,
            clamped,
        }));
        self.reevaluate(now, out);
    }

    fn on_install_now(&mut self, now: Timestamp, out: &mut Vec<Action>) {
        match &mut self.state.phase {
            Phase::Pending { txn, .. } => {
                txn.user_now = true;
                let txn = txn.clone();
                let event = self.txn_event(TxnState::InstallNow, &txn, now);
                self.start_writing(txn, vec![event], out);
                out.push(Action::Answer(Answer::Done));
            }
            Phase::RebootScheduled {
                txn,
                boot_id_at_activation,
                ..
            } => {
                txn.user_now = true;
                let (txn, boot_id) = (txn.clone(), boot_id_at_activation.clone());
                let event = self.txn_event(TxnState::InstallNow, &txn, now);
                self.reboot_now(txn, boot_id, vec![event], now, out);
                out.insert(out.len() - 1, Action::Answer(Answer::Done));
            }
            // Under way: the reboot will not wait for the policy.
            Phase::Writing { txn, .. } | Phase::Activating { txn } => {
                txn.user_now = true;
                self.user_decision(TxnState::InstallNow, now, out, |_| {});
                out.push(Action::Answer(Answer::Done));
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
                out.push(Action::Answer(Answer::Refused(Failure::new(
                    ReasonCode::NothingPending,
                    message,
                ))));
            }
        }
    }

    fn on_user_mark(&mut self, good: bool, out: &mut Vec<Action>) {
        let refuse = |out: &mut Vec<Action>, reason, message: String| {
            out.push(Action::Answer(Answer::Refused(Failure::new(
                reason, message,
            ))));
        };
        if !matches!(self.state.phase, Phase::Idle | Phase::Pending { .. }) {
            let message = format!(
                "a transaction is in phase {}; slots are marked by it",
                self.state.phase.name()
            );
            return refuse(out, ReasonCode::Busy, message);
        }
        let Some(booted) = self.booted().map(str::to_owned) else {
            return refuse(
                out,
                ReasonCode::NotReady,
                "the booted slot is not known yet".into(),
            );
        };
        let Some(other) = self.slots.other(&booted).map(str::to_owned) else {
            let message = format!("the booted slot {booted} is not one of the configured slots");
            return refuse(out, ReasonCode::BootedSlot, message);
        };
        // The answer waits for the bootloader: the caller hears whether the change was made.
        let (slot, action) = if good {
            let action = Action::MarkGood {
                slot: booted.clone(),
            };
            (booted, action)
        } else {
            let action = Action::MarkBad {
                slot: other.clone(),
            };
            (other, action)
        };
        self.marking = Some((good, slot));
        out.push(action);
    }

    /// The user's mark is done or failed: an event either way (with the reason when it
    /// failed), then the answer.
    fn user_mark_done(
        &mut self,
        good: bool,
        slot: String,
        result: Result<(), Failure>,
        now: Timestamp,
        out: &mut Vec<Action>,
    ) {
        let state = if good {
            TxnState::MarkedGood
        } else {
            TxnState::MarkedBad
        };
        let failure = result.err();
        self.user_decision(state, now, out, |e| {
            e.slot = Some(slot);
            if let Some(failure) = &failure {
                e.reason = Some(failure.reason);
                e.message = Some(failure.message.clone());
            }
        });
        out.push(Action::Answer(match failure {
            None => Answer::Done,
            Some(failure) => Answer::Refused(failure),
        }));
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
            waiting: None,
            until: None,
            clamped: None,
        };
        fill(&mut event);
        event
    }
}

fn update_available(txn: &Transaction) -> Notice {
    let m = &txn.manifest;
    Notice::UpdateAvailable {
        txn: txn.id.clone(),
        version: m.version.clone(),
        advisory: m.advisory.clone(),
        security: m.security,
        severity: m.severity,
        deadline: m.deadline,
        disruption: m.disruption.clone(),
    }
}

fn completed(txn: &Transaction, result: TxnState, reason: Option<ReasonCode>) -> Notice {
    Notice::Completed {
        txn: txn.id.clone(),
        version: txn.manifest.version.clone(),
        result,
        reason,
    }
}

#[cfg(test)]
mod tests;
