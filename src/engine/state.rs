//! What the engine remembers across restarts and reboots, and what it reports. All of it is plain
//! data: the state store writes it atomically, the reporters serialise the events.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

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
}

/// Where the current transaction stands. Each variant names what the engine waits for next.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Idle,
    /// Streaming the image into the target slot; `durable` bytes are on disk and hashed.
    Writing { txn: Transaction, durable: u64 },
    /// The image is written and read back; the bootloader is being told to try it.
    Activating { txn: Transaction },
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
            Phase::Writing { txn, .. }
            | Phase::Activating { txn }
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub txn: String,
    pub done: u64,
    pub total: u64,
}
