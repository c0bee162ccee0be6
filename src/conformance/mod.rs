//! The agent's own evidence for ETSI EN 303 645 §5.3 ("keep software updated"), for the exact
//! build and configuration it runs with (`update-agent conformance`).
//!
//! - [`standard`]: the provisions 5.3-1 … 5.3-16 and their ETSI TS 103 701 test units.
//! - [`facts`]: what is read from the device: the build, the trust anchor checked now, the
//!   last check for updates, the event log (time-to-patch, refusals, rollbacks).
//! - [`selftest`]: altered copies of a genuine release must be refused (in memory).
//! - [`assess`](assess()): facts and config in, a [`Report`] out: per provision a [`Status`],
//!   the control, the evidence and the test units; the IXIT fields; the findings that mark a
//!   weakened configuration. Pure: no IO.
//! - [`test_map`]: which automated tests of this repository exercise each test unit
//!   (`docs/conformance-test-map.md`, compiled in).
//! - [`text`], [`cyclonedx`]: the renderers (JSON is the report serialised).
//!
//! What the manufacturer must declare (where the support period is published, the product's
//! UI, its update procedure) comes from the config's `[conformance]` section and is always
//! reported as a declaration, never as verified.

mod assess;
pub mod cyclonedx;
pub mod facts;
pub mod selftest;
pub mod standard;
pub mod test_map;
pub mod text;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use assess::assess;
pub use facts::{Facts, LAST_CHECK_FILE, last_check, record_check};

use crate::mqtt::payload::ConformanceSummary;
use standard::{Level, UnitKind};

/// How this build and configuration stand against one provision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The agent meets it, by its build and configuration, checked on this device.
    Met,
    /// Met by what the manufacturer declares in `[conformance]`; not verified by the agent.
    Declared,
    /// Not applicable to this device (the report says why).
    NotApplicable,
    /// It depends on a declaration the manufacturer has not made (the report names the key).
    NeedsDeclaration,
    /// Met in part: a configuration choice weakens it (a finding says which and what still
    /// holds).
    Weakened,
    NotMet,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::Declared => "declared",
            Status::NotApplicable => "not-applicable",
            Status::NeedsDeclaration => "needs-declaration",
            Status::Weakened => "weakened",
            Status::NotMet => "not-met",
        }
    }
}

/// A configuration choice or a fact of this device that weakens a provision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable, for fleet tooling: `auto-install-off`, `plain-mqtt`, `writable-anchor-allowed`,
    /// `anchor-unprotected`, `anchor-unusable`, `threshold-unreachable`, `no-support-end`,
    /// `support-ended`, `no-model`, `dbus-off`, `no-mqtt`, `rare-check`,
    /// `no-automatic-install`, `self-test-failed`.
    pub code: &'static str,
    pub provision: &'static str,
    pub status: Status,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnitReport {
    pub id: &'static str,
    pub kind: UnitKind,
    pub checks: &'static str,
    /// The automated tests of this repository that exercise the unit (`file::test`).
    pub tests: Vec<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProvisionReport {
    pub id: &'static str,
    pub level: Level,
    pub condition: Option<&'static str>,
    pub title: &'static str,
    pub status: Status,
    /// What in the agent meets it.
    pub control: String,
    pub evidence: Vec<String>,
    /// Why it is not met or not applicable (TS 103 701 test case 4-1-1 asks for one for
    /// every recommendation not fulfilled): the manufacturer's from `[conformance]`, else the
    /// agent's own for what it knows.
    pub justification: Option<String>,
    pub test_units: Vec<UnitReport>,
}

/// Where an IXIT value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The binary itself.
    Build,
    /// The configuration file.
    Config,
    /// Checked on the device now.
    Checked,
    /// The manufacturer's declaration in `[conformance]` (not verified).
    Declaration,
}

/// One field of the Implementation eXtra Information for Testing (TS 103 701 Annex), e.g.
/// `7-UpdMech` / `Cryptographic Details`.
#[derive(Debug, Clone, Serialize)]
pub struct IxitField {
    pub ixit: &'static str,
    pub field: &'static str,
    pub value: String,
    pub sources: Vec<Source>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Declaration {
    /// The config key, `conformance.<key>`.
    pub key: &'static str,
    pub value: Option<String>,
    /// Always false: the agent cannot check what the manufacturer declares.
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub compatible: String,
    pub device_id: Option<String>,
    pub model: Option<String>,
    pub support_end: Option<jiff::civil::Date>,
}

/// The whole report; `--format json` is this, serialised.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Version of this document's shape.
    pub format: u32,
    pub standard: String,
    pub test_specification: String,
    pub generated: Timestamp,
    pub config: String,
    pub agent: facts::Build,
    pub device: DeviceInfo,
    pub provisions: Vec<ProvisionReport>,
    pub findings: Vec<Finding>,
    pub ixit: Vec<IxitField>,
    pub declarations: Vec<Declaration>,
    pub anchor: facts::AnchorCheck,
    pub live: Option<facts::Live>,
}

pub const REPORT_FORMAT: u32 = 1;

impl Report {
    pub fn provision(&self, id: &str) -> Option<&ProvisionReport> {
        self.provisions.iter().find(|p| p.id == id)
    }

    /// The status of 5.3-1 … 5.3-16, in order.
    pub fn statuses(&self) -> Vec<Status> {
        self.provisions.iter().map(|p| p.status).collect()
    }

    /// Nothing is not met and the self-test (when it ran) passed.
    pub fn passes(&self) -> bool {
        let self_test_failed = self
            .live
            .as_ref()
            .is_some_and(|live| live.self_test.verdict == selftest::Verdict::Fail);
        !self_test_failed && self.provisions.iter().all(|p| p.status != Status::NotMet)
    }

    pub fn summary(&self) -> ConformanceSummary {
        let ids = |status: Status| {
            self.provisions
                .iter()
                .filter(|p| p.status == status)
                .map(|p| p.id.to_string())
                .collect::<Vec<_>>()
        };
        ConformanceSummary {
            standard: format!(
                "{} V{} {}",
                standard::STANDARD,
                standard::STANDARD_VERSION,
                standard::CLAUSE
            ),
            met: ids(Status::Met).len() + ids(Status::Declared).len(),
            weakened: ids(Status::Weakened),
            not_met: ids(Status::NotMet),
            needs_declaration: ids(Status::NeedsDeclaration),
            findings: self
                .findings
                .iter()
                .map(|f| format!("{}:{}", f.provision, f.code))
                .collect(),
        }
    }
}

/// What the daemon publishes: the static part of the report.
pub fn summary_at_start(config: &crate::config::Config) -> ConformanceSummary {
    assess(config, &Facts::at_start(config), "").summary()
}

/// A level as the standard's annex abbreviates it.
pub fn level_letter(level: Level) -> &'static str {
    match level {
        Level::Shall => "M",
        Level::Should => "R",
    }
}
