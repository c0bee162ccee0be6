//! A [`Summary`] in the Prometheus text exposition format (0.0.4) or OpenMetrics 1.0 text, for
//! operators who watch fleets in Grafana (`rollout start --metrics 127.0.0.1:PORT`).
//!
//! Cardinality is bounded by construction: versions and states come from devices, but a
//! summary has at most [`super::MAX_ROWS`] (version, state) rows, and stages are a fixed set.
//! Label values are escaped as the format requires (`\`, `"`, newline).

use std::fmt::Write;

use super::{Stage, Summary};

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what Prometheus asks for by default.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`: ends with `# EOF`; a counter's family
    /// name has no `_total`, its sample does.
    OpenMetrics,
}

impl Format {
    /// The format a scraper asks for in its `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// What the tool itself adds to the summary.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToolState {
    /// The halt threshold (a fraction), when one is set.
    pub halt_at: Option<f64>,
    pub halted: bool,
}

struct Writer {
    out: String,
    format: Format,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let family = match (self.format, kind) {
            (Format::OpenMetrics, "counter") => name.trim_end_matches("_total"),
            _ => name,
        };
        let _ = writeln!(self.out, "# HELP {family} {help}");
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// `\` → `\\`, `"` → `\"`, newline → `\n`.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The exposition of `summary`.
pub fn render(summary: &Summary, tool: ToolState, format: Format) -> String {
    let mut w = Writer {
        out: String::new(),
        format,
    };
    w.one(
        "update_agent_fleet_devices",
        "gauge",
        "Devices seen under the topic prefix (of the product, when one is given).",
        summary.devices as f64,
    );
    w.family(
        "update_agent_fleet_devices_online",
        "gauge",
        "Devices by their retained online flag (unknown: none published yet).",
    );
    for (value, count) in [
        ("true", summary.online),
        ("false", summary.offline),
        ("unknown", summary.online_unknown),
    ] {
        w.sample(
            "update_agent_fleet_devices_online",
            &[("online", value)],
            count as f64,
        );
    }
    w.family(
        "update_agent_fleet_devices_by_state",
        "gauge",
        "Devices by running version and transaction phase, from their retained state.",
    );
    for row in &summary.by_state {
        w.sample(
            "update_agent_fleet_devices_by_state",
            &[("version", &row.version), ("state", &row.state)],
            row.devices as f64,
        );
    }
    let events = &summary.events;
    w.one(
        "update_agent_fleet_events_received_total",
        "counter",
        "Event records received.",
        events.received as f64,
    );
    w.one(
        "update_agent_fleet_events_duplicate_total",
        "counter",
        "Event records received again (same device and seq).",
        events.duplicates as f64,
    );
    w.one(
        "update_agent_fleet_events_missing",
        "gauge",
        "Event records expected by seq and not received.",
        events.missing as f64,
    );
    w.one(
        "update_agent_fleet_events_dropped_by_devices_total",
        "counter",
        "Event records the devices reported lost (outbox overflow).",
        events.dropped_by_devices as f64,
    );
    w.one(
        "update_agent_fleet_stragglers",
        "gauge",
        "Devices of the rollout that are offline or quiet without having settled.",
        summary.stragglers_total as f64,
    );
    if let Some(rollout) = &summary.rollout {
        w.family(
            "update_agent_rollout_info",
            "gauge",
            "The release this rollout follows.",
        );
        w.sample(
            "update_agent_rollout_info",
            &[
                ("release_id", &rollout.release_id),
                ("version", &rollout.version),
            ],
            1.0,
        );
        w.family(
            "update_agent_rollout_devices",
            "gauge",
            "Devices by where they stand with the release.",
        );
        for stage in Stage::ALL {
            let count = rollout.stages.get(&stage).copied().unwrap_or(0);
            w.sample(
                "update_agent_rollout_devices",
                &[("stage", stage.as_str())],
                count as f64,
            );
        }
        w.one(
            "update_agent_rollout_finished",
            "gauge",
            "Devices whose transaction ended (committed, rolled back or failed).",
            rollout.finished as f64,
        );
        w.one(
            "update_agent_rollout_failed",
            "gauge",
            "Devices that rolled back or failed.",
            rollout.failed as f64,
        );
        if let Some(rate) = rollout.failure_rate {
            w.one(
                "update_agent_rollout_failure_ratio",
                "gauge",
                "Failed over finished, once enough devices finished.",
                rate,
            );
        }
        if let Some(threshold) = tool.halt_at {
            w.one(
                "update_agent_rollout_halt_threshold_ratio",
                "gauge",
                "The failure ratio above which the rollout halts.",
                threshold,
            );
        }
        w.one(
            "update_agent_rollout_halted",
            "gauge",
            "1 once the tool halted the rollout (cleared the retained release).",
            if tool.halted { 1.0 } else { 0.0 },
        );
    }
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}
