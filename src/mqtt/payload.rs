//! What the agent publishes, as JSON (version 1 of the payloads under `update-agent/v1`).
//!
//! - `state` (retained): one [`DeviceState`] document, replaced on every change.
//! - `events` (QoS 1): one [`crate::engine::Event`] record per transition, exactly as
//!   the engine made it (`seq`, `at`, `state`, `txn`, versions, `reason`, `message`), or a
//!   [`Dropped`](crate::outbox::Dropped) record when the outbox overflowed while the broker was unreachable.
//! - `online` (retained): `true` once connected and subscribed; the last will sets `false`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::engine::{Event, EventKind, PersistentState, Phase, Progress, Wait};
use crate::reason::ReasonCode;
use crate::release::manifest::{Disruption, Severity};

pub const ONLINE: &[u8] = b"true";
pub const OFFLINE: &[u8] = b"false";

/// The format version written into every state document.
pub const STATE_FORMAT: u32 = 1;

/// The retained state of one device (`docs/wire-formats.md`: versions, booted slot, state,
/// progress, pending release, policy, support end, model, last error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub format: u32,
    pub device: String,
    pub compatible: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_end: Option<jiff::civil::Date>,
    /// The version running now.
    pub version: Option<String>,
    pub booted_slot: Option<String>,
    /// What each slot holds, as far as the agent wrote it.
    pub slots: BTreeMap<String, SlotState>,
    /// The transaction phase: `idle`, `writing`, `activating`, `reboot-pending`, `trial`,
    /// `committing`, `rolling-back`.
    pub state: String,
    pub progress: Option<ProgressState>,
    /// The release being installed, with what it fixes and what it disrupts (5.3-11/12).
    pub pending: Option<PendingRelease>,
    pub policy: PolicyState,
    pub last_event: Option<LastEvent>,
    pub last_error: Option<LastError>,
    /// How this build and configuration stand against EN 303 645 §5.3, in short (computed at
    /// start; `update-agent conformance` on the device gives the whole report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformance: Option<ConformanceSummary>,
    pub updated: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    pub version: String,
    pub committed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressState {
    pub txn: String,
    /// Bytes of the image written to the slot.
    pub done: u64,
    pub total: u64,
    pub percent: u8,
    /// Bytes downloaded for the write so far (compressed, as they came; a delta update's are
    /// far fewer than `done`). Added within format 1: absent from older agents' documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRelease {
    pub txn: String,
    pub version: String,
    pub release_id: String,
    pub security: bool,
    pub severity: Severity,
    pub advisory: String,
    pub disruption: Disruption,
    pub deadline: Option<Timestamp>,
    /// While the release waits to install (phase `pending`): why, and until when — e.g.
    /// `rollout` and this device's moment in the release's rollout window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Wait>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    pub auto_install: bool,
    pub postponed_until: Option<Timestamp>,
    /// The lowest security version the device still accepts.
    pub floor: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastEvent {
    pub seq: u64,
    pub state: EventKind,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastError {
    pub reason: ReasonCode,
    pub message: Option<String>,
    pub at: Timestamp,
}

/// The report in a few words, for the fleet: in the retained MQTT state and the D-Bus
/// `Conformance` property. Computed when the daemon starts, from the build, the configuration
/// and the trust anchor (the event log and the self-test are the full report's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConformanceSummary {
    pub standard: String,
    /// Provisions met (by the agent, or by the manufacturer's declaration).
    pub met: usize,
    pub weakened: Vec<String>,
    pub not_met: Vec<String>,
    pub needs_declaration: Vec<String>,
    /// `provision:code` for each finding, e.g. `5.3-10:plain-mqtt`.
    pub findings: Vec<String>,
}

impl ConformanceSummary {
    /// One line: `EN 303 645 5.3: 13 met, weakened 5.3-10, not met 5.3-6`.
    pub fn text(&self) -> String {
        let mut text = format!("{}: {} met", self.standard, self.met);
        for (label, ids) in [
            ("weakened", &self.weakened),
            ("not met", &self.not_met),
            ("needs declaration", &self.needs_declaration),
        ] {
            if !ids.is_empty() {
                text.push_str(&format!(", {label} {}", ids.join(" ")));
            }
        }
        text
    }
}

/// What does not change while the agent runs.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub device: String,
    pub compatible: String,
    pub model: Option<String>,
    pub support_end: Option<jiff::civil::Date>,
    pub factory_version: Option<String>,
    /// The configured floor; the state's own floor rises with commits.
    pub floor: u64,
    pub conformance: Option<ConformanceSummary>,
}

impl DeviceState {
    pub fn new(facts: &DeviceFacts, now: Timestamp) -> DeviceState {
        DeviceState {
            format: STATE_FORMAT,
            device: facts.device.clone(),
            compatible: facts.compatible.clone(),
            model: facts.model.clone(),
            support_end: facts.support_end,
            version: facts.factory_version.clone(),
            booted_slot: None,
            slots: BTreeMap::new(),
            state: Phase::Idle.name().into(),
            progress: None,
            pending: None,
            policy: PolicyState {
                auto_install: true,
                postponed_until: None,
                floor: facts.floor,
            },
            last_event: None,
            last_error: None,
            conformance: facts.conformance.clone(),
            updated: now,
        }
    }

    /// Takes over what the engine persisted: phase, slots, floor, the pending transaction and
    /// the last failure.
    pub fn apply_persisted(
        &mut self,
        facts: &DeviceFacts,
        booted: Option<&str>,
        state: &PersistentState,
    ) {
        self.booted_slot = booted.map(str::to_owned);
        self.version = booted
            .and_then(|b| state.slots.get(b))
            .map(|record| record.version.clone())
            .or_else(|| facts.factory_version.clone());
        self.slots = state
            .slots
            .iter()
            .map(|(name, record)| {
                let slot = SlotState {
                    version: record.version.clone(),
                    committed: record.committed,
                };
                (name.to_string(), slot)
            })
            .collect();
        self.state = state.phase.name().into();
        self.policy.floor = facts.floor.max(state.floor);
        self.pending = state.phase.transaction().map(|txn| PendingRelease {
            txn: txn.id.clone(),
            version: txn.manifest.version.clone(),
            release_id: txn.release_id.to_string(),
            security: txn.manifest.security,
            severity: txn.manifest.severity,
            advisory: txn.manifest.advisory.clone(),
            disruption: txn.manifest.disruption.clone(),
            deadline: txn.manifest.deadline,
            waiting: match &state.phase {
                Phase::Pending { waiting, .. } => Some(*waiting),
                _ => None,
            },
            until: match &state.phase {
                Phase::Pending { until, .. } => *until,
                _ => None,
            },
        });
        if !matches!(state.phase, Phase::Writing { .. }) {
            self.progress = None;
        }
        if let Some(last) = &state.last {
            self.last_error = last.reason.map(|reason| LastError {
                reason,
                message: last.message.clone(),
                at: last.at,
            });
        }
    }

    pub fn apply_event(&mut self, event: &Event) {
        self.take_last_event(event);
        // A refused release leaves the transaction alone but is the latest thing that went
        // wrong; transaction failures arrive through the persisted outcome as well.
        if let Some(reason) = event.reason {
            self.last_error = Some(LastError {
                reason,
                message: event.message.clone(),
                at: event.at,
            });
        }
    }

    /// `event` becomes the last event unless a newer one is already known: events a one-shot
    /// command logged (taken over from the event log) arrive after the daemon started.
    pub fn take_last_event(&mut self, event: &Event) {
        if self
            .last_event
            .as_ref()
            .is_some_and(|last| last.seq > event.seq)
        {
            return;
        }
        self.last_event = Some(LastEvent {
            seq: event.seq,
            state: event.kind,
            at: event.at,
        });
    }

    pub fn apply_progress(&mut self, progress: &Progress) {
        let percent = (progress.done.min(progress.total).saturating_mul(100))
            .checked_div(progress.total)
            .unwrap_or(100) as u8;
        self.progress = Some(ProgressState {
            txn: progress.txn.clone(),
            done: progress.done,
            total: progress.total,
            percent,
            downloaded: progress.downloaded,
        });
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the state document always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_document_has_the_designed_fields() {
        let facts = DeviceFacts {
            device: "gw-1".into(),
            compatible: "acme".into(),
            model: Some("ACME 1".into()),
            support_end: Some(jiff::civil::date(2031, 12, 31)),
            factory_version: Some("1.0".into()),
            floor: 3,
            conformance: Some(ConformanceSummary {
                standard: "ETSI EN 303 645 V2.1.1 5.3".into(),
                met: 13,
                weakened: vec!["5.3-10".into()],
                findings: vec!["5.3-10:plain-mqtt".into()],
                ..ConformanceSummary::default()
            }),
        };
        let mut state = DeviceState::new(&facts, Timestamp::UNIX_EPOCH);
        state.apply_persisted(&facts, Some("A"), &PersistentState::default());
        state.apply_progress(&Progress {
            txn: "1-ab".into(),
            done: 50,
            total: 200,
            downloaded: Some(20),
        });
        let json: serde_json::Value = serde_json::from_slice(&state.to_json()).unwrap();
        for field in [
            "format",
            "device",
            "compatible",
            "model",
            "support_end",
            "version",
            "booted_slot",
            "slots",
            "state",
            "progress",
            "pending",
            "policy",
            "last_event",
            "last_error",
            "conformance",
            "updated",
        ] {
            assert!(json.get(field).is_some(), "{field} missing in {json}");
        }
        assert_eq!(json["version"], "1.0");
        assert_eq!(json["state"], "idle");
        assert_eq!(json["progress"]["percent"], 25);
        assert_eq!(json["progress"]["done"], 50);
        assert_eq!(json["progress"]["downloaded"], 20);
        assert_eq!(json["policy"]["floor"], 3);
        assert_eq!(json["support_end"], "2031-12-31");
        assert_eq!(json["conformance"]["weakened"][0], "5.3-10");
        assert_eq!(json["conformance"]["findings"][0], "5.3-10:plain-mqtt");
    }

    fn event(seq: u64, state: &str) -> Event {
        let json = format!(r#"{{"seq":{seq},"at":"2026-01-01T00:00:00Z","state":"{state}"}}"#);
        serde_json::from_str(&json).unwrap()
    }

    #[test]
    fn the_last_event_is_the_newest_whatever_order_events_arrive_in() {
        let facts = DeviceFacts {
            device: "gw-1".into(),
            compatible: "acme".into(),
            model: None,
            support_end: None,
            factory_version: None,
            floor: 0,
            conformance: None,
        };
        let mut state = DeviceState::new(&facts, Timestamp::UNIX_EPOCH);
        state.take_last_event(&event(6, "committed"));
        state.take_last_event(&event(5, "trial-boot"));
        let last = state.last_event.as_ref().unwrap();
        assert_eq!((last.seq, last.state), (6, EventKind::Committed));
        state.apply_event(&event(7, "accepted"));
        assert_eq!(state.last_event.unwrap().seq, 7);
    }
}
