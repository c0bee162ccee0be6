//! What the engine remembers across restarts and reboots, and what it reports. All of it is plain
//! data: the state store writes it atomically, the reporters serialise the events.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::engine::policy::{Clamp, UserChoices, Wait};
use crate::reason::ReasonCode;
use crate::release::Manifest;

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
    pub slots: BTreeMap<String, SlotRecord>,
    /// The outcome of the most recent transaction.
    pub last: Option<Outcome>,
    /// Releases (manifest sha256, hex) that rolled back: never retried automatically.
    pub rolled_back: Vec<String>,
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
        boot_id_at_activation: String,
        waiting: Wait,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Timestamp>,
    },
    /// The bootloader will try the target slot at the next boot.
    RebootPending {
        txn: Transaction,
        boot_id_at_activation: String,
    },
    /// Booted into the target slot for the first time; health checks decide.
    Trial { txn: Transaction, boot_id: String },
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
    /// Hex SHA-256 of the manifest bytes.
    pub release_id: String,
    pub manifest: Manifest,
    /// Slot class being updated and the bootnames involved.
    pub class: String,
    pub from_slot: String,
    pub to_slot: String,
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
    pub release_id: String,
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
    pub result: TxnState,
    pub reason: Option<ReasonCode>,
    pub message: Option<String>,
    pub at: Timestamp,
}

/// The states a transaction passes through, as operators see them in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TxnState {
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

impl TxnState {
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Refused => "refused",
            TxnState::Accepted => "accepted",
            TxnState::Writing => "writing",
            TxnState::Written => "written",
            TxnState::Activated => "activated",
            TxnState::Rebooting => "rebooting",
            TxnState::TrialBoot => "trial-boot",
            TxnState::Committed => "committed",
            TxnState::Failed => "failed",
            TxnState::RollingBack => "rolling-back",
            TxnState::RolledBack => "rolled-back",
            TxnState::Pending => "pending",
            TxnState::RebootScheduled => "reboot-scheduled",
            TxnState::Superseded => "superseded",
            TxnState::Postponed => "postponed",
            TxnState::Resumed => "resumed",
            TxnState::AutoInstallEnabled => "auto-install-enabled",
            TxnState::AutoInstallDisabled => "auto-install-disabled",
            TxnState::InstallNow => "install-now",
            TxnState::CheckRequested => "check-requested",
            TxnState::MarkedGood => "marked-good",
            TxnState::MarkedBad => "marked-bad",
            TxnState::RebootFailed => "reboot-failed",
        }
    }
}

/// One record per transition, for operators (MQTT `events`) and the local event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: Timestamp,
    pub state: TxnState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
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
}

impl TxnState {
    /// The states that end a transaction.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TxnState::Committed | TxnState::Failed | TxnState::RolledBack
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub txn: String,
    pub done: u64,
    pub total: u64,
}
