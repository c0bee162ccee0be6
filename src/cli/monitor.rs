//! `update-agent monitor`: what the fleet is doing, from the broker. By default an aggregate
//! view that stays one screen at 1,000 devices and more — devices online, counts per version
//! and state, events received and missing (by `seq`), the newest failures and the stragglers —
//! redrawn live on a terminal. `--devices` lists one line per device instead; `--json` prints
//! one line per event record. Everything shown came over the network: the fleet view escapes
//! and bounds every string before it gets here.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use tokio::time::Instant;
use update_agent::fleet::{DeviceLine, FleetView, Named, Rules, Summary};
use update_agent::mqtt::oneshot::Seen;
use update_agent::mqtt::topics;
use update_agent::release::escape_for_log;

use super::broker::BrokerArgs;
use super::follow::{Heard, follow, observe};
use super::runtime;

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Only devices of this product (their retained state's compatible)
    #[arg(long)]
    fleet: Option<String>,
    /// Print each event record as one JSON line (with a "device" field) instead of the view
    #[arg(long)]
    json: bool,
    /// One line per device (id, version, state, progress, newest event, online) instead of
    /// the aggregate view
    #[arg(long, conflicts_with = "json")]
    devices: bool,
    /// Print the view of the retained state once and exit
    #[arg(long, conflicts_with = "json")]
    once: bool,
    /// With --json: exit after this many events
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many seconds
    #[arg(long)]
    timeout: Option<u64>,
    /// Seconds without a message after which an offline or busy device is listed as a
    /// straggler
    #[arg(long, default_value_t = 600)]
    straggler_after: u64,
}

pub fn run(args: MonitorArgs) -> anyhow::Result<ExitCode> {
    let endpoint = args.broker.endpoint()?;
    if let Some(fleet) = &args.fleet {
        topics::check_segment("--fleet", fleet).map_err(anyhow::Error::msg)?;
    }
    let shown = format!("{}, {}", endpoint.shown(), args.broker.connection.prefix);
    runtime()?.block_on(async move {
        let mut heard = follow(
            std::slice::from_ref(&endpoint),
            &args.broker.connection.prefix,
        )?;
        let deadline = args
            .timeout
            .map(|s| Instant::now() + Duration::from_secs(s));
        let rules = Rules {
            straggler_after: SignedDuration::from_secs(args.straggler_after as i64),
            ..Rules::default()
        };
        let mut view = FleetView::new(args.fleet.clone(), None);
        let mut events = 0u64;
        let terminal = std::io::stdout().is_terminal();
        let mut subscribed = false;
        let mut last_draw: Option<Instant> = None;
        let mut dirty = false;
        let draw = |view: &FleetView| {
            if args.devices {
                render_devices(&view.devices())
            } else {
                render(&view.summary(&rules, Timestamp::now()), &shown)
            }
        };
        loop {
            // With --once: the retained messages come right after the subscription; a short
            // quiet spell means they are all in.
            let quiet = if args.once && subscribed {
                Duration::from_millis(300)
            } else {
                Duration::from_millis(500)
            };
            let wait = match deadline {
                Some(d) => quiet.min(d.saturating_duration_since(Instant::now())),
                None => quiet,
            };
            match tokio::time::timeout(wait, heard.recv()).await {
                Ok(Some(Heard::Subscribed(_))) => subscribed = true,
                Ok(Some(Heard::Message(seen))) => {
                    if args.json {
                        if seen.leaf == "events" {
                            print_event(&seen);
                            events += 1;
                            if args.count.is_some_and(|n| events >= n) {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                    } else {
                        observe(&mut view, &seen);
                        dirty = true;
                    }
                }
                Ok(Some(Heard::Trouble(e))) => eprintln!("monitor: {e}"),
                Ok(None) => anyhow::bail!("the connection tasks stopped"),
                Err(_) => {
                    if args.once && subscribed {
                        print!("{}", draw(&view));
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                if !args.json {
                    print!("{}", draw(&view));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let due = last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
            if dirty && due && !args.json && !args.once {
                let mut out = std::io::stdout().lock();
                if terminal {
                    let _ = write!(out, "\x1b[H\x1b[2J");
                }
                let _ = write!(out, "{}", draw(&view));
                let _ = out.flush();
                last_draw = Some(Instant::now());
                dirty = false;
            }
        }
    })
}

/// The longest line `--json` prints for one event record; a device's records are a few hundred
/// bytes, and a longer one is summed up instead of flooding the terminal.
const MAX_JSON_LINE: usize = 8 * 1024;

/// One event record as a JSON line with the device's id added, bounded and ASCII-only.
fn print_event(seen: &Seen) {
    let record = match serde_json::from_slice::<Value>(&seen.payload) {
        Ok(Value::Object(mut map)) => {
            map.insert("device".into(), Value::String(seen.device.clone()));
            Value::Object(map)
        }
        _ => serde_json::json!({
            "device": seen.device,
            "unreadable": escape_for_log(&String::from_utf8_lossy(&seen.payload), 200),
        }),
    };
    let line = terminal_safe_json(&record);
    if line.len() > MAX_JSON_LINE {
        let summary = serde_json::json!({"device": seen.device, "oversized": line.len()});
        println!("{}", terminal_safe_json(&summary));
    } else {
        println!("{line}");
    }
}

/// JSON with every character outside printable ASCII written as a `\uXXXX` escape: still the
/// same JSON for a program reading it, but nothing a device sent (bidi overrides, escape
/// sequences, look-alike letters) reaches the operator's terminal as it is. serde_json already
/// escapes the C0 controls; DEL and everything non-ASCII are escaped here.
fn terminal_safe_json(value: &Value) -> String {
    let text = value.to_string();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && c != '\x7f' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// The aggregate view: one screen whatever the fleet's size.
pub(super) fn render(summary: &Summary, shown: &str) -> String {
    let mut out = format!(
        "{} device{}: {} online, {} offline, {} unknown  ({shown})\n",
        summary.devices,
        if summary.devices == 1 { "" } else { "s" },
        summary.online,
        summary.offline,
        summary.online_unknown,
    );
    let e = &summary.events;
    out.push_str(&format!(
        "events: {} received, {} missing, {} duplicate, {} dropped by devices, {} unreadable\n",
        e.received, e.missing, e.duplicates, e.dropped_by_devices, e.unreadable
    ));
    if summary.ignored_devices > 0 {
        out.push_str(&format!(
            "{} messages from devices beyond the first {} ignored\n",
            summary.ignored_devices,
            update_agent::fleet::MAX_DEVICES
        ));
    }
    out.push_str(&format!(
        "\n{:<24} {:<18} {:>8}\n",
        "VERSION", "STATE", "DEVICES"
    ));
    for row in &summary.by_state {
        out.push_str(&format!(
            "{:<24} {:<18} {:>8}\n",
            row.version, row.state, row.devices
        ));
    }
    if let Some(rollout) = &summary.rollout {
        out.push_str(&format!(
            "\nrollout of {} (release {}…):",
            rollout.version,
            &rollout.release_id[..rollout.release_id.len().min(12)]
        ));
        for (stage, count) in &rollout.stages {
            out.push_str(&format!(" {count} {}", stage.as_str()));
        }
        out.push('\n');
        match rollout.failure_rate {
            Some(rate) => out.push_str(&format!(
                "failure rate {:.1} %: {} of {} finished devices rolled back or failed\n",
                rate * 100.0,
                rollout.failed,
                rollout.finished
            )),
            None => out.push_str(&format!(
                "failure rate: not yet ({} finished, {} rolled back or failed)\n",
                rollout.finished, rollout.failed
            )),
        }
    }
    list(
        &mut out,
        "failures",
        "newest first",
        &summary.failures,
        summary.failures_total,
    );
    list(
        &mut out,
        "stragglers",
        "quietest first",
        &summary.stragglers,
        summary.stragglers_total,
    );
    out
}

fn list(out: &mut String, title: &str, order: &str, named: &[Named], total: usize) {
    if total == 0 {
        return;
    }
    out.push_str(&format!(
        "\n{title} ({} of {total}, {order}):\n",
        named.len()
    ));
    for n in named {
        let stage = n.stage.map(|s| s.as_str()).unwrap_or("-");
        let online = match n.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "online?",
        };
        let quiet = n
            .quiet_for
            .map(|s| format!("quiet {s} s"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<24} {:<12} {:<14} {:<12} {:<8} {:<12} {}{}\n",
            n.device,
            stage,
            n.state,
            n.version,
            online,
            quiet,
            n.reason.as_deref().unwrap_or(""),
            n.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
}

/// One line per device (`--devices`).
fn render_devices(lines: &[DeviceLine]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:<15} {:<16} {:<34} {}\n",
        "DEVICE", "VERSION", "STATE", "PROGRESS", "LAST EVENT", "ONLINE"
    );
    for line in lines {
        let online = match line.online {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        // Written, and downloaded when the device says (a delta downloads far less).
        let progress = match (line.percent, line.downloaded) {
            (Some(p), Some(d)) => format!("{p}% {:.1} MB dl", d as f64 / 1e6),
            (Some(p), None) => format!("{p}%"),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<24} {:<12} {:<15} {:<16} {:<34} {}\n",
            line.device,
            line.version.as_deref().unwrap_or("-"),
            line.state.as_deref().unwrap_or("-"),
            progress,
            line.last_event.as_deref().unwrap_or("-"),
            online
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_meaning_and_lose_what_a_terminal_would_act_on() {
        let hostile = serde_json::json!({"seq": "\u{202e}1\u{7f}\u{1b}[2J", "state": "\u{1F600}"});
        let line = terminal_safe_json(&hostile);
        assert!(line.bytes().all(|b| (0x20..0x7f).contains(&b)), "{line}");
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back, hostile);
    }
}
