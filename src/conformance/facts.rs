//! What the report is made of, gathered from the device: the build, the trust anchor checked
//! now, and (for the full report) the agent's own records — the time of the last check for
//! updates and the event log. Gathering only reads: nothing on the device is written.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use crate::anchor::{Protection, TrustAnchor};
use crate::config::Config;
use crate::engine::{Bootname, Event, EventKind};
use crate::reason::ReasonCode;
use crate::release::ReleaseId;
use crate::state_store::StateStore;

use super::selftest::SelfTest;

/// The file in the state directory that holds the time of the last check for updates.
pub const LAST_CHECK_FILE: &str = "last-check";

/// Records that the device looked for updates now (the daemon, when the broker granted its
/// subscription to the release topics and so sent the retained releases).
pub fn record_check(state_dir: &Path, at: Timestamp) -> std::io::Result<()> {
    crate::durable::write_atomically(
        &state_dir.join(LAST_CHECK_FILE),
        format!("{at}\n").as_bytes(),
        0o644,
    )
}

/// The time recorded by [`record_check`]; `None` when the device never checked.
pub fn last_check(state_dir: &Path) -> Result<Option<Timestamp>, String> {
    let path = state_dir.join(LAST_CHECK_FILE);
    match crate::durable::read_bounded(&path, 128) {
        Ok(bytes) => String::from_utf8_lossy(&bytes)
            .trim()
            .parse()
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// A record that could be read, or why not (reading it needs the agent's user or root).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Readout<T> {
    Read(T),
    Unreadable { error: String },
}

impl<T> Readout<T> {
    fn of(result: Result<T, String>) -> Readout<T> {
        match result {
            Ok(value) => Readout::Read(value),
            Err(error) => Readout::Unreadable { error },
        }
    }
}

/// This binary: its version and which optional parts it was built with.
#[derive(Debug, Clone, Serialize)]
pub struct Build {
    pub version: &'static str,
    /// The device build leaves the operator's tools and the demo out (`--no-default-features`).
    pub device_build: bool,
    pub features: Vec<&'static str>,
}

impl Build {
    pub fn this() -> Build {
        let mut features = Vec::new();
        if cfg!(feature = "operator") {
            features.push("operator");
        }
        if cfg!(feature = "demo") {
            features.push("demo");
        }
        Build {
            version: env!("CARGO_PKG_VERSION"),
            device_build: features.is_empty(),
            features,
        }
    }
}

/// The trust anchor as found now (not as the config assumes it).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum AnchorCheck {
    /// Read-only filesystem, owned by root, not writable by group or others.
    Protected { dir: PathBuf, keys: Vec<String> },
    /// Someone besides root could change it.
    Unprotected {
        dir: PathBuf,
        keys: Vec<String>,
        problems: Vec<String>,
    },
    /// No key could be loaded (missing, empty, unreadable, not a key).
    Unusable { dir: PathBuf, error: String },
}

impl AnchorCheck {
    pub fn run(config: &Config) -> AnchorCheck {
        let dir = config.trust.keys_dir.clone();
        // Loaded permissively so that the problems are listed, not just the first refusal.
        match TrustAnchor::load(&dir, Protection::AllowWritable) {
            Ok(anchor) => {
                let keys = anchor.key_ids().map(|id| id.to_hex()).collect();
                if anchor.warnings.is_empty() {
                    AnchorCheck::Protected { dir, keys }
                } else {
                    AnchorCheck::Unprotected {
                        dir,
                        keys,
                        problems: anchor.warnings,
                    }
                }
            }
            Err(err) => AnchorCheck::Unusable {
                dir,
                error: err.to_string(),
            },
        }
    }

    pub fn keys(&self) -> &[String] {
        match self {
            AnchorCheck::Protected { keys, .. } | AnchorCheck::Unprotected { keys, .. } => keys,
            AnchorCheck::Unusable { .. } => &[],
        }
    }
}

/// One release this device installed and committed, from its event log.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    pub version: Option<String>,
    pub release_id: Option<ReleaseId>,
    /// The release's signed `created` (absent in events logged by older agents).
    pub created: Option<Timestamp>,
    pub accepted: Option<Timestamp>,
    pub committed: Timestamp,
    /// `created` to `committed`: how long the release took to be running here.
    pub time_to_patch_seconds: Option<i64>,
    /// `accepted` to `committed`: how much of that the device itself took (policy included).
    pub on_device_seconds: Option<i64>,
}

/// A transaction that ended without a commit.
#[derive(Debug, Clone, Serialize)]
pub struct Ended {
    pub version: Option<String>,
    pub state: EventKind,
    pub reason: Option<ReasonCode>,
    pub at: Timestamp,
}

#[derive(Debug, Clone, Serialize)]
pub struct Refusals {
    pub reason: ReasonCode,
    pub count: u64,
}

/// What the agent's own event log says (it keeps the latest events, bounded).
#[derive(Debug, Clone, Default, Serialize)]
pub struct History {
    pub events: usize,
    /// The oldest logged event: the records below cover the time since.
    pub since: Option<Timestamp>,
    pub installed: Vec<Installed>,
    /// Refused releases by reason code (a `bad-signature` or `hash-mismatch` is a tamper sign).
    pub refusals: Vec<Refusals>,
    pub rollbacks: Vec<Ended>,
    pub failures: Vec<Ended>,
}

impl History {
    pub fn of(events: &[Event]) -> History {
        let mut history = History {
            events: events.len(),
            since: events.iter().map(|e| e.at).min(),
            ..History::default()
        };
        // Counts in the order of `ReasonCode::ALL`, so the report lists them in that order.
        let mut refused = vec![0u64; ReasonCode::ALL.len()];
        // Accepted events by transaction, to find when each committed release arrived. The log
        // is in `seq` order: events are appended as they happen and a `seq` is logged once.
        let mut accepted: Vec<(&str, &Event)> = Vec::new();
        for event in events {
            let txn = event.txn.as_deref().unwrap_or("");
            match event.kind {
                EventKind::Accepted => accepted.push((txn, event)),
                EventKind::Committed => {
                    let arrival = accepted.iter().rfind(|(t, _)| *t == txn).map(|(_, e)| e);
                    let created = event.created.or(arrival.and_then(|a| a.created));
                    let seconds = |from: Option<Timestamp>| {
                        from.map(|from| event.at.duration_since(from).as_secs())
                    };
                    history.installed.push(Installed {
                        version: event.to_version.clone(),
                        release_id: event.release_id,
                        created,
                        accepted: arrival.map(|a| a.at),
                        committed: event.at,
                        time_to_patch_seconds: seconds(created),
                        on_device_seconds: seconds(arrival.map(|a| a.at)),
                    });
                }
                EventKind::Refused => {
                    if let Some(index) = event
                        .reason
                        .and_then(|reason| ReasonCode::ALL.iter().position(|c| *c == reason))
                    {
                        refused[index] += 1;
                    }
                }
                EventKind::RolledBack | EventKind::Failed => {
                    let ended = Ended {
                        version: event.to_version.clone(),
                        state: event.kind,
                        reason: event.reason,
                        at: event.at,
                    };
                    if event.kind == EventKind::RolledBack {
                        history.rollbacks.push(ended);
                    } else {
                        history.failures.push(ended);
                    }
                }
                _ => {}
            }
        }
        history.refusals = ReasonCode::ALL
            .iter()
            .zip(refused)
            .filter(|(_, count)| *count > 0)
            .map(|(reason, count)| Refusals {
                reason: *reason,
                count,
            })
            .collect();
        history
    }

    pub fn tamper_signs(&self) -> u64 {
        self.refusals
            .iter()
            .filter(|r| r.reason.is_tamper_alert())
            .map(|r| r.count)
            .sum()
    }
}

/// Evidence from the running device, for the full report (the daemon's start-up summary does
/// without it).
#[derive(Debug, Clone, Serialize)]
pub struct Live {
    pub state_dir: PathBuf,
    /// The version running now: the booted slot's, as the agent recorded it, else the
    /// factory version.
    pub running_version: Option<String>,
    pub booted_slot: Option<Bootname>,
    pub last_check: Readout<Option<Timestamp>>,
    pub history: Readout<History>,
    pub self_test: SelfTest,
}

impl Live {
    pub fn gather(config: &Config, release: Option<&Path>) -> Live {
        let store = StateStore::existing(&config.device.state_dir);
        let state = store.load();
        let booted = crate::system::booted_slot(config).ok();
        let running_version = match (&state, &booted) {
            (Ok(state), Some(booted)) => state.slots.get(booted).map(|s| s.version.clone()),
            _ => None,
        }
        .or_else(|| config.device.factory_version.clone());
        let self_test = SelfTest::run(config, release, state.as_ref().ok());
        Live {
            state_dir: config.device.state_dir.clone(),
            running_version,
            booted_slot: booted,
            last_check: Readout::of(last_check(&config.device.state_dir)),
            history: Readout::of(
                store
                    .events()
                    .map(|events| History::of(&events))
                    .map_err(|e| e.to_string()),
            ),
            self_test,
        }
    }
}

/// Everything the assessment looks at besides the config.
#[derive(Debug, Clone)]
pub struct Facts {
    pub now: Timestamp,
    pub build: Build,
    pub anchor: AnchorCheck,
    pub live: Option<Live>,
}

impl Facts {
    /// What the configuration and the device are now, without the agent's records: cheap
    /// enough for the daemon's start.
    pub fn at_start(config: &Config) -> Facts {
        Facts {
            now: Timestamp::now(),
            build: Build::this(),
            anchor: AnchorCheck::run(config),
            live: None,
        }
    }

    /// Everything, the self-test included (`release`: the signed release to alter; else the
    /// one the device kept).
    pub fn gather(config: &Config, release: Option<&Path>) -> Facts {
        Facts {
            live: Some(Live::gather(config, release)),
            ..Facts::at_start(config)
        }
    }
}
