//! The operator's picture of a fleet, built from what the devices publish (`docs/wire-formats.md`
//! §3: retained `state` and `online`, `events`): devices per state and version, how one release's
//! rollout stands on each device, the failure rate among the devices that finished, the
//! stragglers, and whether an event went missing (by `seq`). `monitor` and `rollout` show it;
//! [`metrics`] exposes it for Prometheus.
//!
//! Sans IO: messages and the current time go in ([`FleetView::observe`]), a [`Summary`] comes
//! out. It scales with the number of devices, not of messages: per device it keeps a few short
//! strings and the sequence numbers seen above a contiguous prefix.
//!
//! Everything here came from the network, from devices the operator does not control: strings
//! are escaped and bounded when they enter ([`escape_for_log`]), the number of devices tracked is
//! bounded ([`MAX_DEVICES`]), and a device moves only its own counts (one device that lies
//! counts once, whatever it sends).

pub mod metrics;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::release::escape_for_log;

/// Devices tracked at most; messages from further device ids are counted, not kept.
pub const MAX_DEVICES: usize = 100_000;
/// Longest device id, version, state or reason kept (escaped).
const MAX_TEXT: usize = 40;
/// Longest message kept (escaped).
const MAX_MESSAGE: usize = 120;
/// Sequence numbers kept above the contiguous prefix per device; beyond, the oldest gap is
/// given up (counted missing).
const MAX_SEQ_GAPS: usize = 1024;
/// (version, state) rows in a summary at most; the rest are summed into one `other` row.
pub const MAX_ROWS: usize = 24;
/// Devices listed as failures or stragglers in a summary at most.
pub const MAX_LISTED: usize = 10;

/// The release a rollout follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Hex SHA-256 of the manifest bytes: the `release_id` in events and state.
    pub release_id: String,
    pub version: String,
    /// The manifest's `created`: a failure a device reports after it (from its retained state,
    /// which names no release) is taken to be this release's.
    pub created: Timestamp,
}

/// Where a device stands with the target release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// No sign of the release yet.
    Waiting,
    /// Accepted, waiting for its moment (policy, postponement, rollout schedule).
    Pending,
    /// Writing, rebooting, on its trial boot, or rolling back.
    Installing,
    Committed,
    RolledBack,
    Failed,
    /// Refused the release (a reason code says why).
    Refused,
    /// A newer release took its place before it was installed.
    Superseded,
    /// Dropped it before starting because the release was withdrawn (halted).
    Withdrawn,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Waiting,
        Stage::Pending,
        Stage::Installing,
        Stage::Committed,
        Stage::RolledBack,
        Stage::Failed,
        Stage::Refused,
        Stage::Superseded,
        Stage::Withdrawn,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Pending => "pending",
            Stage::Installing => "installing",
            Stage::Committed => "committed",
            Stage::RolledBack => "rolled-back",
            Stage::Failed => "failed",
            Stage::Refused => "refused",
            Stage::Superseded => "superseded",
            Stage::Withdrawn => "withdrawn",
        }
    }

    /// The transaction ended on the device (the failure rate's denominator).
    pub fn is_finished(self) -> bool {
        matches!(self, Stage::Committed | Stage::RolledBack | Stage::Failed)
    }

    pub fn is_failure(self) -> bool {
        matches!(self, Stage::RolledBack | Stage::Failed)
    }

    /// Nothing more will happen for this release on the device.
    pub fn is_settled(self) -> bool {
        !matches!(self, Stage::Waiting | Stage::Pending | Stage::Installing)
    }

    /// The stage an event's `state` moves a device to; `None` for states that do not move it
    /// (the user's decisions, and states this tool does not know yet).
    fn of_event(state: &str) -> Option<Stage> {
        Some(match state {
            "accepted" | "pending" | "postponed" | "resumed" => Stage::Pending,
            "writing" | "written" | "activated" | "reboot-scheduled" | "rebooting"
            | "trial-boot" | "rolling-back" => Stage::Installing,
            "committed" => Stage::Committed,
            "rolled-back" => Stage::RolledBack,
            "failed" => Stage::Failed,
            "refused" => Stage::Refused,
            "superseded" => Stage::Superseded,
            "withdrawn" => Stage::Withdrawn,
            _ => return None,
        })
    }

    /// The stage the retained state's phase shows for a transaction of the target release.
    fn of_phase(phase: &str) -> Stage {
        match phase {
            "pending" => Stage::Pending,
            _ => Stage::Installing,
        }
    }
}

/// When a device counts as a straggler, and when a rollout halts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// A device of the rollout that has not settled and not been heard from for this long
    /// (or is offline) is a straggler.
    pub straggler_after: jiff::SignedDuration,
    /// Halt when (rolled-back + failed) / finished exceeds this fraction...
    pub halt_at: Option<f64>,
    /// ...once at least this many devices finished.
    pub min_finished: usize,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            straggler_after: jiff::SignedDuration::from_secs(600),
            halt_at: None,
            min_finished: 10,
        }
    }
}

/// The sequence numbers seen from one device: all of `(base, upto]`, plus some above.
#[derive(Debug, Clone, Default)]
struct SeqSet {
    /// The newest seq the tool does not expect (events before it started following). `None`
    /// until the first state or event arrives; `Some(None)`: every seq from 0 is expected.
    base: Option<Option<u64>>,
    /// Every seq in (base, upto] was seen (or reported dropped).
    upto: Option<u64>,
    above: BTreeSet<u64>,
    /// Gaps given up when `above` grew too large.
    given_up: u64,
}

impl SeqSet {
    fn start_at(&mut self, last_known: Option<u64>) {
        if self.base.is_none() {
            self.base = Some(last_known);
            self.upto = last_known;
        }
    }

    /// Records `seq`; false when it was seen before (a duplicate: delivery is at least once).
    fn insert(&mut self, seq: u64) -> bool {
        if self.base.is_none() {
            // The first thing heard is an event: nothing before it is expected, except from a
            // device that starts its life now.
            self.start_at(seq.checked_sub(1));
        }
        if self.upto.is_some_and(|upto| seq <= upto) {
            return false;
        }
        if !self.above.insert(seq) {
            return false;
        }
        self.advance();
        if self.above.len() > MAX_SEQ_GAPS {
            let lowest = *self.above.iter().next().expect("not empty");
            self.given_up += lowest - self.upto.map_or(0, |u| u + 1);
            self.upto = Some(lowest - 1);
            self.advance();
        }
        true
    }

    fn advance(&mut self) {
        loop {
            let next = self.upto.map_or(0, |u| u + 1);
            if !self.above.remove(&next) {
                break;
            }
            self.upto = Some(next);
        }
    }

    /// The device reported it dropped `first..=last` (outbox overflow): not missing, lost.
    fn dropped(&mut self, first: u64, last: u64) -> u64 {
        let mut newly = 0;
        for seq in first..=last.min(first.saturating_add(100_000)) {
            if self.insert(seq) {
                newly += 1;
            }
        }
        newly
    }

    fn newest(&self) -> Option<u64> {
        self.above.iter().next_back().copied().or(self.upto)
    }

    /// Expected sequence numbers not seen, up to `newest_known` (the retained state's newest
    /// event, which may be ahead of the events received).
    fn missing(&self, newest_known: Option<u64>) -> u64 {
        let Some(base) = self.base else { return 0 };
        let first = base.map_or(0, |b| b + 1);
        let newest = match (self.newest(), newest_known) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => match a.or(b) {
                Some(n) => n,
                None => return self.given_up,
            },
        };
        if newest < first {
            return self.given_up;
        }
        let expected = newest - first + 1;
        let seen = self.upto.map_or(0, |u| (u + 1).saturating_sub(first)) + self.above.len() as u64;
        self.given_up + expected.saturating_sub(seen)
    }
}

#[derive(Debug, Clone, Default)]
struct Device {
    online: Option<bool>,
    compatible: Option<String>,
    version: Option<String>,
    phase: Option<String>,
    percent: Option<u8>,
    /// Bytes downloaded for the write in progress, when the device says (agents before it
    /// do not).
    downloaded: Option<u64>,
    /// The retained state's newest event: (seq, state, at).
    state_last_event: Option<(u64, String, Option<Timestamp>)>,
    /// The release the retained state says is being installed.
    pending_release: Option<String>,
    /// From this device's events about the target release.
    stage_from_events: Option<Stage>,
    reason: Option<String>,
    message: Option<String>,
    seqs: SeqSet,
    /// When something last changed for this device (the tool's clock).
    heard: Option<Timestamp>,
}

/// Event counts over the whole fleet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    pub received: u64,
    /// Seen before (same device and seq): at-least-once delivery, harmless.
    pub duplicates: u64,
    /// Expected by seq and not received (gaps, and newer than the newest received while the
    /// retained state names a newer one).
    pub missing: u64,
    /// Reported lost by the devices themselves (outbox overflow while offline).
    pub dropped_by_devices: u64,
    /// Not an event record (not JSON, or without a seq).
    pub unreadable: u64,
}

/// One row of the per-state view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub version: String,
    pub state: String,
    pub devices: usize,
}

/// One device named in a summary (a failure or a straggler). Every string is escaped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Named {
    pub device: String,
    pub stage: Option<Stage>,
    pub state: String,
    pub version: String,
    pub online: Option<bool>,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// Seconds since the tool last heard from it.
    pub quiet_for: Option<i64>,
}

/// How the target release stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutSummary {
    pub release_id: String,
    pub version: String,
    /// Devices per stage (every stage, zeros included).
    pub stages: BTreeMap<Stage, usize>,
    pub finished: usize,
    /// Rolled back or failed.
    pub failed: usize,
    /// failed / finished, once `min_finished` devices finished.
    pub failure_rate: Option<f64>,
    /// Every device of the rollout settled.
    pub settled: bool,
}

/// What the fleet looks like now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub devices: usize,
    pub online: usize,
    pub offline: usize,
    /// Devices that published no `online` yet.
    pub online_unknown: usize,
    /// Messages from device ids beyond [`MAX_DEVICES`].
    pub ignored_devices: u64,
    /// (version, state) rows, largest first, at most [`MAX_ROWS`].
    pub by_state: Vec<Row>,
    pub events: EventCounts,
    pub rollout: Option<RolloutSummary>,
    /// Failed or rolled-back devices (with a target) or devices whose last error is recent
    /// (without one), at most [`MAX_LISTED`].
    pub failures: Vec<Named>,
    pub failures_total: usize,
    /// Devices of the rollout that have not settled and were quiet or offline for too long,
    /// at most [`MAX_LISTED`].
    pub stragglers: Vec<Named>,
    pub stragglers_total: usize,
}

/// The fleet as the tool has seen it.
#[derive(Debug, Default)]
pub struct FleetView {
    /// Only devices of this product count (from their retained state).
    compatible: Option<String>,
    target: Option<Target>,
    devices: HashMap<String, Device>,
    events: EventCounts,
    ignored_devices: u64,
}

impl FleetView {
    pub fn new(compatible: Option<String>, target: Option<Target>) -> FleetView {
        FleetView {
            compatible,
            target,
            ..FleetView::default()
        }
    }

    pub fn target(&self) -> Option<&Target> {
        self.target.as_ref()
    }

    /// Follows another release from now on (what `rollout status` finds on the fleet topic).
    pub fn set_target(&mut self, target: Option<Target>) {
        self.target = target;
        for device in self.devices.values_mut() {
            device.stage_from_events = None;
        }
    }

    /// Takes one message from `{prefix}/devices/{device}/{leaf}` (leaf `state`, `online` or
    /// `events`) as the broker's retained one; others are ignored.
    pub fn observe(&mut self, device: &str, leaf: &str, payload: &[u8], now: Timestamp) {
        self.observe_as(device, leaf, payload, true, now);
    }

    /// The same, saying whether the message came from the retained store or live. Only a
    /// retained state sets where a device's expected events start: a live one may have
    /// overtaken the events it names (and RabbitMQ sends no retained messages to a wildcard
    /// subscription at all, so there the first event does).
    pub fn observe_as(
        &mut self,
        device: &str,
        leaf: &str,
        payload: &[u8],
        retained: bool,
        now: Timestamp,
    ) {
        if !matches!(leaf, "online" | "state" | "events") {
            return;
        }
        let key = escape_for_log(device, MAX_TEXT);
        if !self.devices.contains_key(&key) && self.devices.len() >= MAX_DEVICES {
            self.ignored_devices += 1;
            return;
        }
        let entry = self.devices.entry(key.clone()).or_default();
        entry.heard = Some(now);
        match leaf {
            "online" => {
                entry.online = match payload {
                    b"true" => Some(true),
                    b"false" => Some(false),
                    _ => None,
                };
            }
            "state" => Self::take_state(entry, payload, retained),
            _ => self.take_event(&key, payload),
        }
    }

    fn take_state(device: &mut Device, payload: &[u8], retained: bool) {
        #[derive(Deserialize)]
        struct StateDoc {
            compatible: Option<String>,
            version: Option<String>,
            state: Option<String>,
            progress: Option<Value>,
            pending: Option<Value>,
            last_event: Option<Value>,
            last_error: Option<Value>,
        }
        // Clearing the retained state (an empty message) leaves what was known.
        let Ok(doc) = serde_json::from_slice::<StateDoc>(payload) else {
            return;
        };
        device.compatible = doc.compatible.map(|c| escape_for_log(&c, MAX_TEXT));
        device.version = doc.version.map(|v| escape_for_log(&v, MAX_TEXT));
        device.phase = doc.state.map(|s| escape_for_log(&s, MAX_TEXT));
        device.percent = doc
            .progress
            .as_ref()
            .and_then(|p| p.get("percent")?.as_u64())
            .map(|p| p.min(100) as u8);
        device.downloaded = doc
            .progress
            .as_ref()
            .and_then(|p| p.get("downloaded")?.as_u64());
        device.pending_release = doc
            .pending
            .as_ref()
            .and_then(|p| p.get("release_id")?.as_str())
            .map(|id| escape_for_log(id, 64));
        device.state_last_event = doc.last_event.as_ref().and_then(|last| {
            let seq = last.get("seq")?.as_u64()?;
            let state = escape_for_log(last.get("state")?.as_str()?, MAX_TEXT);
            let at = last.get("at").and_then(|a| a.as_str()?.parse().ok());
            Some((seq, state, at))
        });
        if retained {
            device
                .seqs
                .start_at(device.state_last_event.as_ref().map(|(seq, _, _)| *seq));
        }
        if let Some(error) = doc.last_error
            && device.reason.is_none()
        {
            device.reason = error
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| escape_for_log(r, MAX_TEXT));
            device.message = error
                .get("message")
                .and_then(Value::as_str)
                .map(|m| escape_for_log(m, MAX_MESSAGE));
        }
    }

    fn take_event(&mut self, key: &str, payload: &[u8]) {
        let target = self.target.as_ref();
        let Some(device) = self.devices.get_mut(key) else {
            return;
        };
        let Ok(Value::Object(record)) = serde_json::from_slice::<Value>(payload) else {
            self.events.unreadable += 1;
            return;
        };
        if let Some(dropped) = record.get("dropped").and_then(Value::as_u64) {
            let first = record.get("first_seq").and_then(Value::as_u64);
            let last = record.get("last_seq").and_then(Value::as_u64);
            self.events.received += 1;
            match (first, last) {
                (Some(first), Some(last)) if first <= last => {
                    self.events.dropped_by_devices += device.seqs.dropped(first, last);
                }
                _ => self.events.dropped_by_devices += dropped,
            }
            return;
        }
        let Some(seq) = record.get("seq").and_then(Value::as_u64) else {
            self.events.unreadable += 1;
            return;
        };
        self.events.received += 1;
        if !device.seqs.insert(seq) {
            self.events.duplicates += 1;
            return;
        }
        let state = record.get("state").and_then(Value::as_str).unwrap_or("");
        let for_target = target.is_some_and(|t| {
            record.get("release_id").and_then(Value::as_str) == Some(t.release_id.as_str())
        });
        // Out-of-order delivery (a resend after a reconnect): an older event never moves a
        // device back; the retained state still shows where it is.
        let newest = device.seqs.newest() == Some(seq);
        if let Some(reason) = record.get("reason").and_then(Value::as_str) {
            device.reason = Some(escape_for_log(reason, MAX_TEXT));
            device.message = record
                .get("message")
                .and_then(Value::as_str)
                .map(|m| escape_for_log(m, MAX_MESSAGE));
        }
        if for_target
            && (newest || device.stage_from_events.is_none())
            && let Some(stage) = Stage::of_event(state)
        {
            device.stage_from_events = Some(stage);
        }
    }

    /// Where `device` stands with the target release.
    ///
    /// An event that ended the release's transaction settles it. Otherwise the retained state
    /// comes first: a broker may drop live messages for a slow subscriber (mosquitto's
    /// `max_queued_messages`), and the tool re-reads the retained state periodically, so the
    /// state is what converges; the events' stage counts only while the state shows nothing.
    fn stage(&self, device: &Device, target: &Target) -> Stage {
        let from_events = device.stage_from_events;
        if let Some(stage) = from_events.filter(|s| s.is_settled()) {
            return stage;
        }
        let up_to_date =
            device.version.as_deref() == Some(escape_for_log(&target.version, MAX_TEXT).as_str());
        if up_to_date && device.pending_release.is_none() {
            return Stage::Committed;
        }
        if device.pending_release.as_deref() == Some(target.release_id.as_str()) {
            return Stage::of_phase(device.phase.as_deref().unwrap_or(""));
        }
        // A failure the retained state reports after the release was created is taken to be
        // this release's (the state names no release for its last event).
        if let Some((_, state, Some(at))) = &device.state_last_event
            && *at >= target.created
        {
            match state.as_str() {
                "rolled-back" => return Stage::RolledBack,
                "failed" => return Stage::Failed,
                _ => {}
            }
        }
        from_events.unwrap_or(Stage::Waiting)
    }

    fn counts(&self, device: &Device) -> bool {
        match (&self.compatible, &device.compatible) {
            (None, _) => true,
            (Some(want), Some(have)) => escape_for_log(want, MAX_TEXT) == *have,
            // Not known yet (no retained state): counted, so that a device never hides.
            (Some(_), None) => true,
        }
    }

    /// The fleet now, under `rules`.
    pub fn summary(&self, rules: &Rules, now: Timestamp) -> Summary {
        let mut rows: HashMap<(String, String), usize> = HashMap::new();
        let mut stages: BTreeMap<Stage, usize> = Stage::ALL.iter().map(|s| (*s, 0)).collect();
        let (mut online, mut offline, mut unknown, mut devices) = (0, 0, 0, 0);
        let mut failures = Vec::new();
        let mut stragglers = Vec::new();
        let mut missing = 0;
        for (id, device) in &self.devices {
            if !self.counts(device) {
                continue;
            }
            devices += 1;
            match device.online {
                Some(true) => online += 1,
                Some(false) => offline += 1,
                None => unknown += 1,
            }
            let version = device.version.clone().unwrap_or_else(|| "-".into());
            let phase = device.phase.clone().unwrap_or_else(|| "-".into());
            *rows.entry((version, phase)).or_default() += 1;
            missing += device
                .seqs
                .missing(device.state_last_event.as_ref().map(|(seq, _, _)| *seq));
            let named = |stage| self.named(id, device, stage, now);
            match &self.target {
                Some(target) => {
                    let stage = self.stage(device, target);
                    *stages.entry(stage).or_default() += 1;
                    if stage.is_failure() {
                        failures.push(named(Some(stage)));
                    }
                    let quiet = device
                        .heard
                        .is_none_or(|heard| now.duration_since(heard) >= rules.straggler_after);
                    if !stage.is_settled() && (quiet || device.online == Some(false)) {
                        stragglers.push(named(Some(stage)));
                    }
                }
                None => {
                    if matches!(
                        device.state_last_event.as_ref().map(|e| e.1.as_str()),
                        Some("failed" | "rolled-back")
                    ) {
                        failures.push(named(None));
                    }
                    if device.online == Some(false) {
                        stragglers.push(named(None));
                    }
                }
            }
        }
        let mut by_state: Vec<Row> = rows
            .into_iter()
            .map(|((version, state), devices)| Row {
                version,
                state,
                devices,
            })
            .collect();
        by_state.sort_by(|a, b| {
            b.devices
                .cmp(&a.devices)
                .then_with(|| (&a.version, &a.state).cmp(&(&b.version, &b.state)))
        });
        if by_state.len() > MAX_ROWS {
            let rest: usize = by_state[MAX_ROWS - 1..].iter().map(|r| r.devices).sum();
            by_state.truncate(MAX_ROWS - 1);
            by_state.push(Row {
                version: "(other)".into(),
                state: "(other)".into(),
                devices: rest,
            });
        }
        let rollout = self.target.as_ref().map(|target| {
            let finished = stages
                .iter()
                .filter(|(s, _)| s.is_finished())
                .map(|(_, n)| n)
                .sum();
            let failed = stages
                .iter()
                .filter(|(s, _)| s.is_failure())
                .map(|(_, n)| n)
                .sum();
            let settled = stages
                .iter()
                .all(|(stage, n)| stage.is_settled() || *n == 0);
            RolloutSummary {
                release_id: target.release_id.clone(),
                version: escape_for_log(&target.version, MAX_TEXT),
                stages,
                finished,
                failed,
                failure_rate: (finished >= rules.min_finished.max(1))
                    .then(|| failed as f64 / finished as f64),
                settled,
            }
        });
        // The newest failures first; stragglers quietest first; ties by device id.
        failures.sort_by(|a, b| a.quiet_for.cmp(&b.quiet_for).then(a.device.cmp(&b.device)));
        stragglers.sort_by(|a, b| b.quiet_for.cmp(&a.quiet_for).then(a.device.cmp(&b.device)));
        let (failures_total, stragglers_total) = (failures.len(), stragglers.len());
        failures.truncate(MAX_LISTED);
        stragglers.truncate(MAX_LISTED);
        Summary {
            devices,
            online,
            offline,
            online_unknown: unknown,
            ignored_devices: self.ignored_devices,
            by_state,
            events: EventCounts {
                missing,
                ..self.events
            },
            rollout,
            failures,
            failures_total,
            stragglers,
            stragglers_total,
        }
    }

    fn named(&self, id: &str, device: &Device, stage: Option<Stage>, now: Timestamp) -> Named {
        let state = match device.percent {
            Some(p) if device.phase.as_deref() == Some("writing") => format!("writing {p}%"),
            _ => device.phase.clone().unwrap_or_else(|| "-".into()),
        };
        Named {
            device: id.to_string(),
            stage,
            state,
            version: device.version.clone().unwrap_or_else(|| "-".into()),
            online: device.online,
            reason: device.reason.clone(),
            message: device.message.clone(),
            quiet_for: device
                .heard
                .map(|heard| now.duration_since(heard).as_secs()),
        }
    }

    /// Per device: id, version, state, progress, newest event, online — for `monitor --devices`.
    /// Every string is escaped.
    pub fn devices(&self) -> Vec<DeviceLine> {
        let mut lines: Vec<DeviceLine> = self
            .devices
            .iter()
            .filter(|(_, d)| self.counts(d))
            .map(|(id, d)| DeviceLine {
                device: id.clone(),
                version: d.version.clone(),
                state: d.phase.clone(),
                percent: d.percent,
                downloaded: d.downloaded,
                last_event: d
                    .state_last_event
                    .as_ref()
                    .map(|(seq, state, _)| format!("#{seq} {state}")),
                online: d.online,
                stage: self.target.as_ref().map(|t| self.stage(d, t)),
                reason: d.reason.clone(),
            })
            .collect();
        lines.sort_by(|a, b| a.device.cmp(&b.device));
        lines
    }
}

/// One device, for a per-device listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceLine {
    pub device: String,
    pub version: Option<String>,
    pub state: Option<String>,
    pub percent: Option<u8>,
    /// Bytes downloaded for the write in progress, when the device says (a delta's are far
    /// fewer than the bytes written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downloaded: Option<u64>,
    pub last_event: Option<String>,
    pub online: Option<bool>,
    pub stage: Option<Stage>,
    pub reason: Option<String>,
}

/// Whether the rollout must halt now: the reason, or `None`.
pub fn halt_reason(rollout: &RolloutSummary, rules: &Rules) -> Option<String> {
    let threshold = rules.halt_at?;
    let rate = rollout.failure_rate?;
    (rate > threshold).then(|| {
        format!(
            "failure rate {:.1} % ({} of {} finished devices rolled back or failed) is above {:.1} %",
            rate * 100.0,
            rollout.failed,
            rollout.finished,
            threshold * 100.0
        )
    })
}

/// Parses a percentage like `5%`, `2.5 %` or `5` into a fraction (0.05).
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let number = text.trim().trim_end_matches('%').trim();
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage like 5%"))?;
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("{text:?} is not between 0% and 100%"));
    }
    Ok(value / 100.0)
}

#[cfg(test)]
mod tests;
