//! The report for a person (`--format text`).

use std::fmt::Write;

use super::assess::{anchor_summary, duration, printable};
use super::facts::{Live, Readout};
use super::selftest::Verdict;
use super::standard::UnitKind;
use super::{Report, Status};

const WIDTH: usize = 100;

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let o = &mut out;
    let agent = &report.agent;
    let _ = writeln!(
        o,
        "{} — update-agent {}, {}",
        report.standard,
        agent.version,
        if agent.device_build {
            "device build".to_string()
        } else {
            format!("workstation build ({})", agent.features.join(", "))
        }
    );
    let _ = writeln!(
        o,
        "test units: {} · config {} · {}",
        report.test_specification, report.config, report.generated
    );
    let device = &report.device;
    let _ = writeln!(
        o,
        "device: {}{} · model {} · support until {}",
        device.compatible,
        device
            .device_id
            .as_deref()
            .map(|id| format!(" {id}"))
            .unwrap_or_default(),
        device.model.as_deref().map_or("not set".into(), printable),
        device
            .support_end
            .map_or("not set".into(), |d| d.to_string())
    );
    let _ = writeln!(o, "\nSUMMARY  {}", report.summary().text());

    if !report.findings.is_empty() {
        let _ = writeln!(
            o,
            "\nFINDINGS (what weakens a provision in this build and configuration)"
        );
        for f in &report.findings {
            let head = format!("  {:<7} {:<9} {}: ", f.provision, f.status.as_str(), f.code);
            wrap(o, &head, &f.message);
        }
    }

    let _ = writeln!(o, "\nPROVISIONS");
    for p in &report.provisions {
        let status = match p.status {
            Status::NotMet => "NOT MET",
            Status::Weakened => "WEAKENED",
            other => other.as_str(),
        };
        let _ = writeln!(
            o,
            "{:<7} {:<6} {:<17} {}",
            p.id,
            p.level.as_str(),
            status,
            p.title
        );
        wrap(o, "  control   ", &p.control);
        for e in &p.evidence {
            wrap(o, "  evidence  ", e);
        }
        if let Some(j) = &p.justification {
            wrap(o, "  why       ", j);
        }
        let units: Vec<String> = p
            .test_units
            .iter()
            .map(|u| {
                let kind = match u.kind {
                    UnitKind::Conceptual => "c",
                    UnitKind::Functional => "f",
                };
                match u.tests.len() {
                    0 => format!("{} ({kind})", u.id),
                    n => format!("{} ({kind}, tests: {n})", u.id),
                }
            })
            .collect();
        wrap(o, "  units     ", &units.join(", "));
    }

    let _ = writeln!(
        o,
        "\nIXIT (implementation information for testing, TS 103 701)"
    );
    for field in &report.ixit {
        let _ = writeln!(o, "  {} / {}", field.ixit, field.field);
        wrap(o, "      ", &field.value);
    }

    match &report.live {
        Some(live) => live_evidence(o, report, live),
        None => {
            let _ = writeln!(o, "\nTRUST ANCHOR (checked now)");
            wrap(o, "  ", &anchor_summary(&report.anchor));
        }
    }

    let _ = writeln!(
        o,
        "\nDECLARATIONS (the manufacturer's, from [conformance]; not verified by the agent)"
    );
    for d in &report.declarations {
        let head = format!("  {:<28}", d.key);
        match &d.value {
            Some(value) => wrap(o, &head, &printable(value)),
            None => wrap(o, &head, "— not declared"),
        }
    }
    out
}

fn live_evidence(o: &mut String, report: &Report, live: &Live) {
    let _ = writeln!(
        o,
        "\nLIVE EVIDENCE (read from {} now)",
        live.state_dir.display()
    );
    wrap(
        o,
        "  running         ",
        &format!(
            "{} (slot {})",
            live.running_version
                .as_deref()
                .map_or("unknown".into(), printable),
            live.booted_slot
                .as_ref()
                .map_or("not known", |b| b.as_str())
        ),
    );
    wrap(o, "  trust anchor    ", &anchor_summary(&report.anchor));
    wrap(
        o,
        "  last check      ",
        &match &live.last_check {
            Readout::Read(Some(at)) => at.to_string(),
            Readout::Read(None) => "none recorded yet".into(),
            Readout::Unreadable { error } => error.clone(),
        },
    );
    match &live.history {
        Readout::Unreadable { error } => wrap(o, "  event log       ", error),
        Readout::Read(history) => {
            wrap(
                o,
                "  event log       ",
                &format!(
                    "{} event(s){}",
                    history.events,
                    history
                        .since
                        .map(|t| format!(" since {t}"))
                        .unwrap_or_default()
                ),
            );
            if history.installed.is_empty() {
                wrap(o, "  installed       ", "none");
            }
            for i in &history.installed {
                wrap(
                    o,
                    "  installed       ",
                    &format!(
                        "{}: signed {} → committed {}: time-to-patch {} ({} on the device)",
                        i.version.as_deref().map_or("?".into(), printable),
                        i.created.map_or("(not logged)".into(), |t| t.to_string()),
                        i.committed,
                        i.time_to_patch_seconds.map_or("?".into(), duration),
                        i.on_device_seconds.map_or("?".into(), duration)
                    ),
                );
            }
            let refusals: Vec<String> = history
                .refusals
                .iter()
                .map(|r| {
                    format!(
                        "{} {}{}",
                        r.reason,
                        r.count,
                        if r.reason.is_tamper_alert() {
                            " (tamper sign)"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            wrap(
                o,
                "  refusals        ",
                &if refusals.is_empty() {
                    "none".into()
                } else {
                    refusals.join(", ")
                },
            );
            for (label, ended) in [
                ("  rollbacks       ", &history.rollbacks),
                ("  failed installs ", &history.failures),
            ] {
                if ended.is_empty() {
                    wrap(o, label, "none");
                }
                for e in ended {
                    wrap(
                        o,
                        label,
                        &format!(
                            "{} at {}: {}",
                            e.version.as_deref().map_or("?".into(), printable),
                            e.at,
                            e.reason.map_or("", |r| r.as_str())
                        ),
                    );
                }
            }
        }
    }
    let test = &live.self_test;
    let _ = writeln!(
        o,
        "\nSELF-TEST (TS 103 701 5.3-2-2b on this device: altered copies verified in memory, nothing written)"
    );
    wrap(o, "  anchor   ", &test.anchor);
    if let Some(release) = &test.release {
        wrap(
            o,
            "  release  ",
            &format!(
                "{} ({}) from {}",
                release.version,
                release.release_id.get(..16).unwrap_or(&release.release_id),
                release.path.display()
            ),
        );
    }
    for check in &test.checks {
        wrap(
            o,
            if check.passed {
                "  pass     "
            } else {
                "  FAIL     "
            },
            &format!(
                "{}: {} (expected {})",
                check.alteration, check.outcome, check.expected
            ),
        );
    }
    let verdict = match test.verdict {
        Verdict::Pass => "PASS".to_string(),
        Verdict::Fail => format!("FAIL: {}", test.reason.as_deref().unwrap_or("")),
        Verdict::NotRun => format!("NOT RUN: {}", test.reason.as_deref().unwrap_or("")),
    };
    wrap(o, "  verdict  ", &verdict);
}

/// Writes `head` then `text`, wrapped at [`WIDTH`] with continuation lines indented to the
/// width of `head`.
fn wrap(out: &mut String, head: &str, text: &str) {
    let indent = head.chars().count();
    let mut line = head.to_string();
    let mut column = indent;
    let mut first = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !first && column + 1 + len > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = " ".repeat(indent);
            column = indent;
            first = true;
        }
        if !first {
            line.push(' ');
            column += 1;
        }
        line.push_str(word);
        column += len;
        first = false;
    }
    out.push_str(&line);
    out.push('\n');
}
