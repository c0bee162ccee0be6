//! What the engine remembers across restarts and reboots, and what it reports. All of it is plain
//! data: the state store writes it atomically, the reporters serialise the events.

use alloc::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::engine::names::{BootId, Bootname};
use crate::engine::policy::{Clamp, UserChoices, Wait};
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::{Manifest, ReleaseId};

/// How many refused-after-rollback release ids are remembered; older ones are forgotten first.
pub const MAX_ROLLED_BACK_REMEMBERED: usize = 32;

/// The engine's whole persistent state. Written before every irreversible step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PersistentState {
    pub phase: Phase,
    /// Lowest security version still accepted; raised when a release commits (anti-rollback).
    pub floor: u64,
    /// Next event sequence number: strictly increasing for the device's whole life.
    pub next_seq: u64,
    /// Next transaction number.
    pub next_txn: u64,
    /// What each slot (by bootname) holds, as far as this agent wrote it.
    pub slots: BTreeMap<Bootname, SlotRecord>,
    /// The outcome of the most recent transaction.
    pub last: Option<Outcome>,
    /// Releases that rolled back: never retried automatically.
    pub rolled_back: Vec<ReleaseId>,
    /// The events of the most recent transition, persisted with it. A power cut can fall between
    /// persisting a transition and reporting its events; so the engine reports these again when
    /// it learns of the next boot (`BootObserved`), with the same sequence numbers. Events are
    /// thus delivered at least once, and a receiver keeps each `seq` once (the local event log
    /// drops a `seq` it already has).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_events: Vec<Event>,
    /// What the user chose (automatic install, postponement); absent in states written before
    /// the policy engine existed.
    #[serde(default, skip_serializing_if = "UserChoices::is_default")]
    pub user: UserChoices,
}

/// Where the current transaction stands. Each variant names what the engine waits for next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Idle,
    /// Accepted, and waiting for the policy to let it install: a maintenance window, the
    /// user's postponement, or automatic install switched off (notify only). Nothing was
    /// written yet. `waiting` and `until` are the policy's last answer, kept for status.
    Pending {
        txn: Transaction,
        waiting: Wait,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Timestamp>,
    },
    /// Streaming the image into the target slot; `durable` bytes are on disk and hashed.
    Writing { txn: Transaction, durable: u64 },
    /// The image is written and read back; the bootloader is being told to try it.
    Activating { txn: Transaction },
    /// The target is activated; the reboot into it waits for the reboot policy (a window, the
    /// user's postponement, or the user under policy `manual`). `at` is when it is due.
    RebootScheduled {
        txn: Transaction,
        boot_id_at_activation: BootId,
        waiting: Wait,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Timestamp>,
    },
    /// The bootloader will try the target slot at the next boot.
    RebootPending {
        txn: Transaction,
        boot_id_at_activation: BootId,
    },
    /// Booted into the target slot for the first time; health checks decide.
    Trial { txn: Transaction, boot_id: BootId },
    /// Health checks passed; the slot is being marked good.
    Committing { txn: Transaction },
    /// The trial failed; the target was marked bad and the device reboots back.
    RollingBack {
        txn: Transaction,
        reason: ReasonCode,
        message: String,
    },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Pending { .. } => "pending",
            Phase::RebootScheduled { .. } => "reboot-scheduled",
            Phase::Writing { .. } => "writing",
            Phase::Activating { .. } => "activating",
            Phase::RebootPending { .. } => "reboot-pending",
            Phase::Trial { .. } => "trial",
            Phase::Committing { .. } => "committing",
            Phase::RollingBack { .. } => "rolling-back",
        }
    }

    pub fn transaction(&self) -> Option<&Transaction> {
        match self {
            Phase::Idle => None,
            Phase::Pending { txn, .. }
            | Phase::Writing { txn, .. }
            | Phase::Activating { txn }
            | Phase::RebootScheduled { txn, .. }
            | Phase::RebootPending { txn, .. }
            | Phase::Trial { txn, .. }
            | Phase::Committing { txn }
            | Phase::RollingBack { txn, .. } => Some(txn),
        }
    }
}

/// One attempt to take a release from accepted to committed or failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    pub id: String,
    pub release_id: ReleaseId,
    pub manifest: Manifest,
    /// Slot class being updated and the bootnames involved.
    pub class: String,
    pub from_slot: Bootname,
    pub to_slot: Bootname,
    pub from_version: Option<String>,
    pub started: Timestamp,
    /// The user asked for this install now (`install`, `InstallNow`): maintenance windows,
    /// postponement and the reboot policy no longer hold it back.
    #[serde(default, skip_serializing_if = "is_false")]
    pub user_now: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

impl Transaction {
    pub fn to_version(&self) -> &str {
        &self.manifest.version
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    pub version: String,
    pub release_id: ReleaseId,
    pub security_version: u64,
    pub sha256: String,
    pub written: Timestamp,
    /// Set once the slot passed a trial boot.
    pub committed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub txn: String,
    pub version: String,
    pub result: EventKind,
    pub reason: Option<ReasonCode>,
    pub message: Option<String>,
    pub at: Timestamp,
}

impl Outcome {
    /// How `txn` ended, at `at`.
    pub fn of(
        txn: &Transaction,
        result: EventKind,
        reason: Option<ReasonCode>,
        message: Option<String>,
        at: Timestamp,
    ) -> Outcome {
        let (txn, version) = (txn.id.clone(), txn.manifest.version.clone());
        Outcome {
            txn,
            version,
            result,
            reason,
            message,
            at,
        }
    }
}

/// What an event records: a step of a transaction (as operators see it), a refusal, or a
/// user's decision. On the wire (events, `state.json`) it is the event's `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A release arrived and was refused before any transaction started.
    Refused,
    Accepted,
    Writing,
    Written,
    Activated,
    Rebooting,
    TrialBoot,
    Committed,
    Failed,
    RollingBack,
    RolledBack,
    /// Accepted, waiting for the policy (`waiting`, `until`).
    Pending,
    /// Activated; the reboot waits for the policy until `until`.
    RebootScheduled,
    /// A pending transaction (nothing written) ended: a newer release took its place
    /// (`message` names it). Not a failure, so no reason code.
    Superseded,
    /// A pending transaction (nothing written) ended: its release is no longer offered on the
    /// topic it came from (cleared by an operator's halt, or replaced; `message` says which).
    /// Not a failure, so no reason code. A release whose install started is never withdrawn.
    Withdrawn,
    // --- user decisions (D-Bus or CLI): each is an event, operators see every one ---
    /// The user postponed installing/rebooting to `until` (`clamped` when limited).
    Postponed,
    /// The user withdrew a postponement.
    Resumed,
    /// The user switched automatic install on (`auto_install`).
    AutoInstallEnabled,
    /// The user switched automatic install off: updates are only announced.
    AutoInstallDisabled,
    /// The user asked to install (or reboot into) the pending release now.
    InstallNow,
    /// The user asked for a check for new releases.
    CheckRequested,
    /// The user marked a slot good or bad by hand.
    MarkedGood,
    MarkedBad,
    /// The reboot command failed (`reason` `reboot-failed`, `message` why); the agent stays up
    /// and tries again later. Not an end: the transaction still waits for its reboot.
    RebootFailed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Refused => "refused",
            EventKind::Accepted => "accepted",
            EventKind::Writing => "writing",
            EventKind::Written => "written",
            EventKind::Activated => "activated",
            EventKind::Rebooting => "rebooting",
            EventKind::TrialBoot => "trial-boot",
            EventKind::Committed => "committed",
            EventKind::Failed => "failed",
            EventKind::RollingBack => "rolling-back",
            EventKind::RolledBack => "rolled-back",
            EventKind::Pending => "pending",
            EventKind::RebootScheduled => "reboot-scheduled",
            EventKind::Superseded => "superseded",
            EventKind::Withdrawn => "withdrawn",
            EventKind::Postponed => "postponed",
            EventKind::Resumed => "resumed",
            EventKind::AutoInstallEnabled => "auto-install-enabled",
            EventKind::AutoInstallDisabled => "auto-install-disabled",
            EventKind::InstallNow => "install-now",
            EventKind::CheckRequested => "check-requested",
            EventKind::MarkedGood => "marked-good",
            EventKind::MarkedBad => "marked-bad",
            EventKind::RebootFailed => "reboot-failed",
        }
    }
}

/// One record per transition, for operators (MQTT `events`) and the local event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: Timestamp,
    #[serde(rename = "state")]
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_id: Option<ReleaseId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<Bootname>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ReasonCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why a release or reboot waits (`pending`, `reboot-scheduled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Wait>,
    /// Until when it waits or is postponed (`pending`, `reboot-scheduled`, `postponed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// What limited a postponement (`postponed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamped: Option<Clamp>,
    /// When the release was signed (its manifest's `created`), on `accepted` and `committed`:
    /// with `at` it gives the time from release to installation on this device (5.3-8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
}

impl Event {
    /// An event with sequence number `seq`, about `txn` if it is about a transaction.
    pub fn about(seq: u64, at: Timestamp, kind: EventKind, txn: Option<&Transaction>) -> Event {
        Event {
            seq,
            at,
            kind,
            txn: txn.map(|t| t.id.clone()),
            release_id: txn.map(|t| t.release_id),
            from_version: txn.and_then(|t| t.from_version.clone()),
            to_version: txn.map(|t| t.manifest.version.clone()),
            slot: txn.map(|t| t.to_slot.clone()),
            reason: None,
            message: None,
            waiting: None,
            until: None,
            clamped: None,
            created: txn
                .filter(|_| matches!(kind, EventKind::Accepted | EventKind::Committed))
                .map(|t| t.manifest.created),
        }
    }
}

impl EventKind {
    /// The kinds that end a transaction.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EventKind::Committed | EventKind::Failed | EventKind::RolledBack
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub txn: String,
    /// Bytes of the image written to the slot (a delta counts reused blocks too).
    pub done: u64,
    pub total: u64,
    /// Bytes downloaded for this write so far (compressed, as they came; a delta's block index
    /// and store ranges), once the transfer counted any; a delta downloads far fewer than it
    /// writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded: Option<u64>,
}
