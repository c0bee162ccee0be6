//! Facts and config in, a report out. No IO: everything the device was asked is in [`Facts`].
//!
//! Each provision has a base status (met, or depending on a declaration) and may be lowered by
//! findings, each of which names one provision: a weakened configuration flips the provision
//! it weakens and no other.

use std::fmt::Write;
use std::time::Duration;

use crate::config::{BootloaderConfig, Config};
use crate::engine::RebootPolicy;

use super::facts::{AnchorCheck, Facts, Readout};
use super::selftest::Verdict;
use super::standard::{self, PROVISIONS, Provision};
use super::{
    Declaration, DeviceInfo, Finding, IxitField, ProvisionReport, REPORT_FORMAT, Report, Source,
    Status, UnitReport, test_map,
};

/// A periodic check rarer than this is flagged (TS 103 701 calls a daily check appropriate).
const LONGEST_RECHECK: Duration = Duration::from_secs(7 * 24 * 3600);

pub fn assess(config: &Config, facts: &Facts, config_path: &str) -> Report {
    let mut assessor = Assessor {
        config,
        facts,
        findings: Vec::new(),
    };
    let provisions = PROVISIONS.iter().map(|p| assessor.provision(p)).collect();
    let declarations = config
        .conformance
        .declarations()
        .into_iter()
        .map(|(key, value)| Declaration {
            key,
            value: value.map(str::to_owned),
            verified: false,
        })
        .collect();
    Report {
        format: REPORT_FORMAT,
        standard: format!(
            "{} V{} clause {} ({})",
            standard::STANDARD,
            standard::STANDARD_VERSION,
            standard::CLAUSE,
            standard::CLAUSE_TITLE
        ),
        test_specification: format!("{} V{}", standard::TEST_SPEC, standard::TEST_SPEC_VERSION),
        generated: facts.now,
        config: config_path.to_string(),
        agent: facts.build.clone(),
        device: DeviceInfo {
            compatible: config.device.compatible.clone(),
            device_id: config.mqtt.as_ref().map(|m| m.device_id.clone()),
            model: config.device.model.clone(),
            support_end: config.device.support_end,
        },
        provisions,
        findings: assessor.findings,
        ixit: ixit(config, facts),
        declarations,
        anchor: facts.anchor.clone(),
        live: facts.live.clone(),
    }
}

struct Assessor<'a> {
    config: &'a Config,
    facts: &'a Facts,
    findings: Vec<Finding>,
}

impl Assessor<'_> {
    fn find(
        &mut self,
        provision: &'static str,
        code: &'static str,
        status: Status,
        message: String,
    ) {
        self.findings.push(Finding {
            code,
            provision,
            status,
            message,
        });
    }

    /// Declared when every one of `keys` is, else needing them; the evidence quotes them.
    fn declared(&self, keys: &[&str], evidence: &mut Vec<String>) -> Status {
        let mut status = Status::Declared;
        for (key, value) in self.config.conformance.declarations() {
            if !keys.contains(&key) {
                continue;
            }
            match value {
                Some(text) => evidence.push(format!(
                    "declared by the manufacturer, not verified (conformance.{key}): {}",
                    printable(text)
                )),
                None => {
                    evidence.push(format!("missing declaration: conformance.{key}"));
                    status = Status::NeedsDeclaration;
                }
            }
        }
        status
    }

    fn provision(&mut self, p: &'static Provision) -> ProvisionReport {
        let config = self.config;
        let facts = self.facts;
        let c = config;
        let mut evidence = Vec::new();
        let mut justification = None;
        let auto = c.policy.auto_install;
        let k = c.trust.threshold;
        let n = facts.anchor.keys().len();
        let (base, control) = match p.id {
            "5.3-1" => {
                let status = self.declared(&["other_software"], &mut evidence);
                (
                    status,
                    format!(
                        "the agent updates the whole root filesystem as one signed image (slot class `{}`, slots {}) through the mechanism of 5.3-2; software outside that image is the manufacturer's to declare",
                        c.slots.class,
                        slots(c)
                    ),
                )
            }
            "5.3-2" => {
                self.anchor_findings();
                evidence.push(format!(
                    "trust anchor checked now: {}",
                    anchor_summary(&facts.anchor)
                ));
                if let Some(live) = &facts.live {
                    let test = &live.self_test;
                    evidence.push(format!(
                        "self-test: {}",
                        match test.verdict {
                            Verdict::Pass => format!(
                                "pass: {} altered copies of release {} refused",
                                test.checks.len(),
                                test.release.as_ref().map_or("", |r| r.version.as_str())
                            ),
                            Verdict::Fail =>
                                format!("FAIL: {}", test.reason.as_deref().unwrap_or("")),
                            Verdict::NotRun =>
                                format!("not run: {}", test.reason.as_deref().unwrap_or("")),
                        }
                    ));
                    if test.checks.iter().any(|check| !check.passed) {
                        self.find(
                            "5.3-2",
                            "self-test-failed",
                            Status::NotMet,
                            test.reason.clone().unwrap_or_default(),
                        );
                    }
                }
                (Status::Met, install_mechanism(c))
            }
            "5.3-3" => {
                if !auto && !c.dbus.enabled {
                    self.find(
                        "5.3-3",
                        "no-simple-install",
                        Status::NotMet,
                        "policy.auto_install = false and [dbus] enabled = false: applying an update needs `update-agent install` with a release file at a root shell".into(),
                    );
                }
                (
                    Status::Met,
                    format!(
                        "accepted releases install without any user action (policy.auto_install = {auto}){}; or at once with one call: D-Bus InstallNow or `update-agent install-now` (root or group {})",
                        windows(c),
                        admin_group(c)
                    ),
                )
            }
            "5.3-4" => {
                if c.mqtt.is_none() {
                    self.no_mqtt("5.3-4");
                } else if !auto && !c.policy.security_deadline_when_off {
                    self.find(
                        "5.3-4",
                        "no-automatic-install",
                        Status::NotMet,
                        "policy.auto_install = false and policy.security_deadline_when_off = false: no update, not even a security release, installs without the user".into(),
                    );
                }
                (
                    Status::Met,
                    format!(
                        "the device checks for updates by itself (5.3-5) and installs them by itself (policy.auto_install = {auto}); with automatic install off a security release still installs at its signed deadline (policy.security_deadline_when_off = {})",
                        c.policy.security_deadline_when_off
                    ),
                )
            }
            "5.3-5" => {
                match &c.mqtt {
                    None => self.no_mqtt("5.3-5"),
                    Some(mqtt) if mqtt.recheck_interval > LONGEST_RECHECK => self.find(
                        "5.3-5",
                        "rare-check",
                        Status::Weakened,
                        format!(
                            "mqtt.recheck_interval = {} s: the periodic check runs less often than weekly (the check at every connection still runs)",
                            mqtt.recheck_interval.as_secs()
                        ),
                    ),
                    Some(_) => {}
                }
                if let Some(live) = &facts.live {
                    evidence.push(match &live.last_check {
                        Readout::Read(Some(at)) => format!("last check for updates: {at}"),
                        Readout::Read(None) => {
                            "last check for updates: none recorded on this device yet".into()
                        }
                        Readout::Unreadable { error } => format!("last check for updates: {error}"),
                    });
                }
                (Status::Met, update_checking(c))
            }
            "5.3-6" => {
                if !auto {
                    self.find(
                        "5.3-6",
                        "auto-install-off",
                        Status::NotMet,
                        format!(
                            "policy.auto_install = false: automatic updates are off in the initialized state; updates are announced, not installed{}",
                            if c.policy.security_deadline_when_off {
                                " (a security release still installs at its signed deadline)"
                            } else {
                                ""
                            }
                        ),
                    );
                }
                if !c.dbus.enabled {
                    self.dbus_off("5.3-6", "cannot switch automatic updates or postpone them");
                }
                (Status::Met, configuration(c))
            }
            "5.3-7" => (Status::Met, cryptography(c, facts)),
            "5.3-8" => {
                let status =
                    self.declared(&["update_procedure", "update_time_frame"], &mut evidence);
                if let Some(live) = &facts.live {
                    time_to_patch(&live.history, &mut evidence);
                }
                (
                    status,
                    "the agent installs an accepted release at once or in the next maintenance window, never past its signed deadline, and records every step with its time (events on MQTT, the local event log): per release, the time from its signing to its commit on this device is measured; producing updates in time is the manufacturer's procedure".into(),
                )
            }
            "5.3-9" => (
                Status::Met,
                format!(
                    "the device itself verifies before writing anything: Ed25519 signatures by {k} distinct key(s) of its trust anchor over the exact manifest bytes (authenticity, origin), the manifest's compatible = {:?} (target), and the image's SHA-256 from the signed manifest while writing and again on a read-back from the slot (integrity){}",
                    c.device.compatible,
                    if c.installer.is_some() {
                        "; the privileged installer verifies the release and hashes the image again itself"
                    } else {
                        ""
                    }
                ),
            ),
            "5.3-10" => {
                if let Some(mqtt) = &c.mqtt
                    && !mqtt.broker.tls
                {
                    self.find(
                        "5.3-10",
                        "plain-mqtt",
                        Status::Weakened,
                        "mqtt.broker is plain mqtt://: the channel to the broker is neither authenticated nor encrypted, so someone on the path can withhold releases, replay older ones (never below the anti-rollback floor) and read the device's state; the authenticity and integrity of every update still hold, through the signatures checked against the trust anchor".into(),
                    );
                }
                (
                    Status::Met,
                    format!(
                        "trust relationship: digital signatures, checked on the device against its read-only trust anchor ({n} key(s), {k} needed); channel: {}",
                        channel(c)
                    ),
                )
            }
            "5.3-11" | "5.3-12" => {
                let status = if c.dbus.enabled {
                    self.declared(&["user_interface"], &mut evidence)
                } else {
                    self.dbus_off(p.id, "hears of no update");
                    Status::Met
                };
                let control = if p.id == "5.3-11" {
                    "D-Bus signal UpdateAvailable(version, advisory, security, severity, deadline) when a release is accepted, and the properties PendingAdvisory, PendingSecurity, PendingSeverity (shown by `update-agent status`); the advisory, what the update mitigates, is part of the signed manifest; how the product shows it to the user is declared".to_string()
                } else {
                    format!(
                        "D-Bus signal DisruptionAhead(seconds, postponable, downtime) {} s before a scheduled reboot and again right before any reboot; the release's signed disruption (reboot needed, downtime) in PendingDisruption; how the product shows it to the user is declared",
                        c.policy.disruption_notice.as_secs()
                    )
                };
                (status, control)
            }
            "5.3-13" => {
                let status = match c.device.support_end {
                    None => {
                        self.find(
                            "5.3-13",
                            "no-support-end",
                            Status::NotMet,
                            "device.support_end is not set: the device has no defined support period to publish".into(),
                        );
                        Status::Met
                    }
                    Some(end) if end < jiff::tz::TimeZone::UTC.to_datetime(facts.now).date() => {
                        self.find(
                            "5.3-13",
                            "support-ended",
                            Status::NotMet,
                            format!("the support period ended on {end} (device.support_end)"),
                        );
                        Status::Met
                    }
                    Some(_) => self.declared(&["support_period_publication"], &mut evidence),
                };
                (
                    status,
                    format!(
                        "device.support_end = {}: in the retained MQTT state (support_end), the D-Bus property SupportEnd and `update-agent status`; its publication for the public is declared",
                        shown(c.device.support_end.map(|d| d.to_string()))
                    ),
                )
            }
            "5.3-14" | "5.3-15" => {
                justification = Some(
                    "the device's software is updated by the agent (5.3-2); the provision is for constrained devices that cannot be updated".to_string(),
                );
                (Status::NotApplicable, "none needed".into())
            }
            "5.3-16" => {
                if c.device.model.is_none() {
                    self.find(
                        "5.3-16",
                        "no-model",
                        Status::NotMet,
                        "device.model is not set: the device cannot tell its model designation"
                            .into(),
                    );
                }
                if let Some(label) = &c.conformance.model_label {
                    evidence.push(format!(
                        "declared by the manufacturer, not verified (conformance.model_label): {}",
                        printable(label)
                    ));
                }
                (
                    Status::Met,
                    format!(
                        "device.model = {}: shown by `update-agent status`, the D-Bus property Model and the retained MQTT state",
                        shown(c.device.model.clone())
                    ),
                )
            }
            other => unreachable!("provision {other} has no assessment"),
        };
        let status = self
            .findings
            .iter()
            .filter(|f| f.provision == p.id)
            .map(|f| f.status)
            .fold(base, Status::max);
        for finding in self.findings.iter().filter(|f| f.provision == p.id) {
            evidence.push(format!(
                "{} ({}): {}",
                finding.status.as_str(),
                finding.code,
                finding.message
            ));
        }
        if let Some(text) = c.conformance.justification(p.id) {
            justification = Some(format!("declared by the manufacturer: {}", printable(text)));
        }
        ProvisionReport {
            id: p.id,
            level: p.level,
            condition: p.condition,
            title: p.title,
            status,
            control,
            evidence,
            justification,
            test_units: p
                .units
                .iter()
                .map(|u| UnitReport {
                    id: u.id,
                    kind: u.kind,
                    checks: u.checks,
                    tests: test_map::tests_for(u.id),
                })
                .collect(),
        }
    }

    fn anchor_findings(&mut self) {
        let c = self.config;
        let insecure = c.trust.insecure_writable_anchor;
        match &self.facts.anchor {
            AnchorCheck::Unusable { dir, error } => self.find(
                "5.3-2",
                "anchor-unusable",
                Status::NotMet,
                format!(
                    "the trust anchor {} cannot be used ({error}): the agent does not start, so nothing installs",
                    dir.display()
                ),
            ),
            AnchorCheck::Unprotected { dir, problems, .. } if insecure => self.find(
                "5.3-2",
                "anchor-unprotected",
                Status::NotMet,
                format!(
                    "the trust anchor {} can be changed ({}) and trust.insecure_writable_anchor = true lets the agent use it: whoever can write it can make the device install anything",
                    dir.display(),
                    problems.join("; ")
                ),
            ),
            AnchorCheck::Unprotected { dir, problems, .. } => self.find(
                "5.3-2",
                "anchor-unprotected",
                Status::NotMet,
                format!(
                    "the trust anchor {} can be changed ({}): the agent refuses it and does not start",
                    dir.display(),
                    problems.join("; ")
                ),
            ),
            AnchorCheck::Protected { .. } if insecure => self.find(
                "5.3-2",
                "writable-anchor-allowed",
                Status::Weakened,
                "trust.insecure_writable_anchor = true: the anchor is protected now, but the agent would use it writable too (development mode); releases are still verified against it".into(),
            ),
            AnchorCheck::Protected { .. } => {}
        }
        let keys = self.facts.anchor.keys().len();
        if keys > 0 && c.trust.threshold > keys {
            self.find(
                "5.3-2",
                "threshold-unreachable",
                Status::NotMet,
                format!(
                    "trust.threshold = {} but the anchor holds {keys} key(s): no release can ever be accepted",
                    c.trust.threshold
                ),
            );
        }
    }

    fn no_mqtt(&mut self, provision: &'static str) {
        self.find(
            provision,
            "no-mqtt",
            Status::NotMet,
            "no [mqtt] section: the device never looks for updates by itself; releases reach it only as files given to `update-agent install`".into(),
        );
    }

    fn dbus_off(&mut self, provision: &'static str, consequence: &str) {
        self.find(
            provision,
            "dbus-off",
            Status::NotMet,
            format!("[dbus] enabled = false: the user {consequence}"),
        );
    }
}

fn ixit(c: &Config, facts: &Facts) -> Vec<IxitField> {
    use Source::*;
    let declared = |key: &str| {
        c.conformance
            .declarations()
            .into_iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, value)| value)
            .map(|text| format!("{} (declared, not verified)", printable(text)))
            .unwrap_or_else(|| format!("not declared (conformance.{key})"))
    };
    let field = |ixit, field, value: String, sources: &[Source]| IxitField {
        ixit,
        field,
        value,
        sources: sources.to_vec(),
    };
    let mut fields = vec![
        field(
            "2-UserInfo",
            "Support Period",
            match c.device.support_end {
                Some(end) => format!("security updates until {end} (device.support_end)"),
                None => "not defined (device.support_end is not set)".into(),
            },
            &[Config],
        ),
        field(
            "2-UserInfo",
            "Publication of Support Period",
            format!(
                "on the device: the retained MQTT state (support_end), the D-Bus property SupportEnd, `update-agent status`; for the public: {}",
                declared("support_period_publication")
            ),
            &[Config, Declaration],
        ),
        field(
            "2-UserInfo",
            "Model Designation",
            format!(
                "{} (device.model: `update-agent status`, D-Bus Model, MQTT state); on the device: {}",
                shown(c.device.model.clone()),
                declared("model_label")
            ),
            &[Config, Declaration],
        ),
        field(
            "2-UserInfo",
            "Publication of Vulnerability Disclosure Policy",
            declared("vulnerability_disclosure"),
            &[Declaration],
        ),
        field(
            "6-SoftComp",
            "Software Components",
            format!(
                "root filesystem image (slot class `{}`, slots {}): update mechanism UM-1 (update-agent); other software: {}",
                c.slots.class,
                slots(c),
                declared("other_software")
            ),
            &[Config, Declaration],
        ),
        field(
            "7-UpdMech",
            "Description",
            format!(
                "UM-1, update-agent {} ({}): signed releases over MQTT, images over https/http/file into the inactive slot of an A/B pair. {}",
                facts.build.version,
                if facts.build.device_build {
                    "device build"
                } else {
                    "workstation build"
                },
                install_mechanism(c)
            ),
            &[Build, Config],
        ),
        field(
            "7-UpdMech",
            "Security Guarantees",
            format!(
                "authenticity (origin: the manufacturer's signing keys; target: compatible = {:?}) and integrity of every release and image, verified on the device before a byte is written; no rollback below the security version floor; the running slot is never written; a failed trial boot rolls back",
                c.device.compatible
            ),
            &[Build, Config],
        ),
        field(
            "7-UpdMech",
            "Cryptographic Details",
            cryptography(c, facts),
            &[Build, Config, Checked],
        ),
        field(
            "7-UpdMech",
            "Initiation and Interaction",
            format!(
                "automatic: {}; installs without user action{}, reboots {}; the user may install at once (InstallNow, `update-agent install-now`) or check now (CheckNow, `update-agent check`)",
                update_checking(c),
                windows(c),
                match c.policy.reboot {
                    RebootPolicy::Immediate => "as soon as the new slot is ready",
                    RebootPolicy::Window => "in a maintenance window",
                    RebootPolicy::Manual =>
                        "when the user asks (a security release at its deadline)",
                }
            ),
            &[Config],
        ),
        field(
            "7-UpdMech",
            "Update Checking",
            update_checking(c),
            &[Config],
        ),
        field("7-UpdMech", "Configuration", configuration(c), &[Config]),
        field(
            "7-UpdMech",
            "User Notification",
            format!(
                "D-Bus signals UpdateAvailable (with the signed advisory: the risks mitigated), DisruptionAhead ({} s before a scheduled reboot), Completed; properties PendingAdvisory, PendingDisruption, Waiting, LastError; always on{}; the product's interface: {}",
                c.policy.disruption_notice.as_secs(),
                if c.dbus.enabled {
                    ""
                } else {
                    " — but [dbus] enabled = false"
                },
                declared("user_interface")
            ),
            &[Config, Declaration],
        ),
        field(
            "8-UpdProc",
            "Description",
            format!(
                "{}; the device reports every step with its time (MQTT events) and the time-to-patch per release (this report)",
                declared("update_procedure")
            ),
            &[Declaration],
        ),
        field(
            "8-UpdProc",
            "Time Frame",
            format!(
                "{}; security updates are provided until {}",
                declared("update_time_frame"),
                shown(c.device.support_end.map(|d| d.to_string()))
            ),
            &[Declaration, Config],
        ),
    ];
    for (name, key) in [
        ("Isolation", "isolation"),
        ("Hardware Replacement", "hardware_replacement"),
    ] {
        fields.push(field(
            "9-ReplSup",
            name,
            format!(
                "{}; needed for 5.3-15 only, which does not apply (the device is updateable)",
                declared(key)
            ),
            &[Declaration],
        ));
    }
    fields
}

fn install_mechanism(c: &Config) -> String {
    let health = &c.health;
    let split = match &c.installer {
        Some(installer) => format!(
            "The network-facing daemon runs unprivileged; slot writes, bootloader changes and reboots go to the privileged installer ({}, serving only user {}), which verifies the release and hashes the image again itself.",
            installer.socket.display(),
            installer.daemon_user
        ),
        None => "Without [installer] the agent runs as root in one process.".into(),
    };
    format!(
        "Verify before writing: signatures by {} distinct key(s) of the trust anchor before any manifest field is read, then product, anti-rollback floor (security version >= {}, raised at every commit) and expiry; the image's SHA-256 checked while it streams into the inactive slot (the booted slot is never written) and again on a read-back past the page cache; the bootloader ({}) tries the new slot once; commit after the health checks ({} command(s), {} unit(s), {} s), else roll back. {split}",
        c.trust.threshold,
        c.trust.floor,
        match &c.bootloader {
            BootloaderConfig::Uboot { .. } => "U-Boot, fw_setenv",
            BootloaderConfig::Grub { .. } => "GRUB, grub-editenv",
            BootloaderConfig::File { .. } => "a key=value file, for tests and demos",
        },
        health.commands.len(),
        health.units.len(),
        health.timeout.as_secs()
    )
}

fn cryptography(c: &Config, facts: &Facts) -> String {
    let mut text = format!(
        "Ed25519 signatures (RFC 8032, strict verification) over the exact manifest bytes, {} of {} distinct key(s) of the trust anchor; SHA-256 for images (streamed, then read back) and key ids. Trust anchor {}: {}.",
        c.trust.threshold,
        facts.anchor.keys().len(),
        c.trust.keys_dir.display(),
        anchor_summary(&facts.anchor)
    );
    let _ = write!(
        text,
        " Transport: {}; image downloads over https with TLS 1.2/1.3 (rustls, ring) against the system's roots, no redirect from https to http.",
        channel(c)
    );
    text
}

fn channel(c: &Config) -> String {
    match &c.mqtt {
        None => "no broker ([mqtt] absent)".into(),
        Some(mqtt) if mqtt.broker.tls => format!(
            "MQTT over TLS 1.2/1.3 (rustls, ring) to {}, only the CA in {} trusted{}",
            mqtt.broker,
            mqtt.ca_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            if mqtt.cert_file.is_some() {
                ", the device authenticated by its client certificate (mutual TLS)"
            } else {
                ", no client certificate"
            }
        ),
        Some(mqtt) => format!("plain MQTT to {} (no TLS)", mqtt.broker),
    }
}

fn update_checking(c: &Config) -> String {
    match &c.mqtt {
        None => "none: no [mqtt] section, the device does not look for updates by itself".into(),
        Some(mqtt) => format!(
            "at every connection to the broker the device subscribes to the release topics of its product and of itself and receives the retained releases (the check after start-up), again every {} s ±20 % (jittered), and when the user asks",
            mqtt.recheck_interval.as_secs()
        ),
    }
}

fn configuration(c: &Config) -> String {
    format!(
        "automatic install {} in the initialized state (policy.auto_install); the user (root or group {}) switches it off and on over D-Bus (SetAutoInstall, `update-agent auto on|off`) and postpones (Postpone, `update-agent postpone`) by at most {} s and never past a release's signed deadline; the choices persist across reboots; notifications are always on",
        if c.policy.auto_install { "on" } else { "OFF" },
        admin_group(c),
        c.policy.max_postpone.as_secs()
    )
}

fn time_to_patch(history: &Readout<super::facts::History>, evidence: &mut Vec<String>) {
    let history = match history {
        Readout::Read(history) => history,
        Readout::Unreadable { error } => {
            evidence.push(format!("event log: {error}"));
            return;
        }
    };
    if history.installed.is_empty() {
        evidence.push(format!(
            "no release committed in the {} logged event(s)",
            history.events
        ));
    }
    for installed in &history.installed {
        let version = installed.version.as_deref().map_or("?".into(), printable);
        evidence.push(
            match (installed.time_to_patch_seconds, installed.on_device_seconds) {
                (Some(total), on_device) => format!(
                    "release {version}: signed {} → committed {}: {} ({} of it on the device)",
                    installed.created.map(|t| t.to_string()).unwrap_or_default(),
                    installed.committed,
                    duration(total),
                    on_device.map_or("?".into(), duration)
                ),
                (None, on_device) => format!(
                    "release {version}: committed {} ({} on the device; signing time not logged)",
                    installed.committed,
                    on_device.map_or("?".into(), duration)
                ),
            },
        );
    }
}

/// `90061` → `1d 1h 1m 1s`.
pub(super) fn duration(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let mut rest = seconds.unsigned_abs();
    let mut parts = Vec::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        let value = rest / size;
        rest %= size;
        if value > 0 {
            parts.push(format!("{value}{unit}"));
        }
    }
    if parts.is_empty() {
        parts.push("0s".into());
    }
    format!("{sign}{}", parts.join(" "))
}

pub(super) fn anchor_summary(anchor: &AnchorCheck) -> String {
    match anchor {
        AnchorCheck::Protected { keys, .. } => format!(
            "protected (read-only filesystem, owned by root, not writable by group or others); keys {}",
            short_ids(keys)
        ),
        AnchorCheck::Unprotected { keys, problems, .. } => format!(
            "NOT protected: {}; keys {}",
            problems.join("; "),
            short_ids(keys)
        ),
        AnchorCheck::Unusable { error, .. } => format!("UNUSABLE: {error}"),
    }
}

fn short_ids(keys: &[String]) -> String {
    keys.iter()
        .map(|k| k.get(..16).unwrap_or(k))
        .collect::<Vec<_>>()
        .join(", ")
}

fn slots(c: &Config) -> String {
    format!(
        "{} ({}) and {} ({})",
        c.slots.a.bootname,
        c.slots.a.device.display(),
        c.slots.b.bootname,
        c.slots.b.device.display()
    )
}

fn windows(c: &Config) -> String {
    if c.policy.windows.is_empty() {
        String::new()
    } else {
        let windows: Vec<String> = c.policy.windows.iter().map(|w| w.to_string()).collect();
        format!(
            " in the maintenance windows {} ({})",
            windows.join(", "),
            c.policy
                .time_zone
                .as_ref()
                .and_then(|zone| zone.iana_name())
                .unwrap_or("system time zone")
        )
    }
}

fn admin_group(c: &Config) -> &str {
    c.dbus.admin_group.as_deref().unwrap_or("(none)")
}

fn shown(value: Option<String>) -> String {
    value.map_or_else(|| "not set".into(), |v| printable(&v))
}

/// Config text as it may be shown: control characters escaped (a declaration is the
/// integrator's, but a terminal still must not act on it).
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}
