//! `update-agent monitor`: what the fleet is doing, from the broker. A table of devices built
//! from their retained `state` and `online` topics (redrawn live on a terminal), or with
//! `--json` one line per event record. Everything shown came over the network, so every string
//! is escaped and bounded before it reaches the terminal.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use update_agent::mqtt::oneshot::{Seen, Watcher};
use update_agent::release::escape_for_log;

use super::broker::{BrokerArgs, runtime};

#[derive(clap::Args, Debug)]
pub struct MonitorArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Print each event record as one JSON line (with a "device" field) instead of the table
    #[arg(long)]
    json: bool,
    /// Print the table of the retained state once and exit
    #[arg(long, conflicts_with = "json")]
    once: bool,
    /// With --json: exit after this many events
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many seconds
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Debug, Default, Clone)]
struct Row {
    version: String,
    state: String,
    progress: String,
    last_event: String,
    online: String,
}

pub fn run(args: MonitorArgs) -> anyhow::Result<ExitCode> {
    let endpoint = args.broker.endpoint()?;
    let mut watcher = Watcher::new(&endpoint, &args.broker.prefix)?;
    runtime()?.block_on(async move {
        let deadline = args
            .timeout
            .map(|s| Instant::now() + Duration::from_secs(s));
        let mut table: BTreeMap<String, Row> = BTreeMap::new();
        let mut events = 0u64;
        let terminal = std::io::stdout().is_terminal();
        let mut subscribed = false;
        let mut last_draw: Option<Instant> = None;
        let mut dirty = false;
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
            match tokio::time::timeout(wait, watcher.next()).await {
                Ok(Ok(None)) => subscribed = true,
                Ok(Ok(Some(seen))) => {
                    if args.json {
                        if seen.leaf == "events" {
                            print_event(&seen);
                            events += 1;
                            if args.count.is_some_and(|n| events >= n) {
                                return Ok(ExitCode::SUCCESS);
                            }
                        }
                    } else {
                        update(&mut table, &seen);
                        dirty = true;
                    }
                }
                Ok(Err(e)) => {
                    eprintln!("monitor: {e}; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => {
                    if args.once && subscribed {
                        print!("{}", render(&table));
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                if !args.json {
                    print!("{}", render(&table));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let due = last_draw.is_none_or(|t| t.elapsed() >= Duration::from_millis(250));
            if dirty && due && !args.json && !args.once {
                if terminal {
                    print!("\x1b[H\x1b[2J");
                }
                print!("{}", render(&table));
                let _ = std::io::stdout().flush();
                last_draw = Some(Instant::now());
                dirty = false;
            }
        }
    })
}

/// The longest line `--json` prints for one event record; a device's records are a few hundred
/// bytes, and a longer one is summed up instead of flooding the terminal.
const MAX_JSON_LINE: usize = 8 * 1024;

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

/// A sequence number as the table shows it: the number, or (a device sending something else)
/// its escaped, bounded text.
fn seq_text(seq: &Value) -> String {
    match seq.as_u64() {
        Some(n) => n.to_string(),
        None => escape_for_log(&seq.to_string(), 12),
    }
}

fn update(table: &mut BTreeMap<String, Row>, seen: &Seen) {
    let row = table.entry(seen.device.clone()).or_default();
    let doc: Value = serde_json::from_slice(&seen.payload).unwrap_or(Value::Null);
    let text = |v: &Value| match v {
        Value::String(s) => escape_for_log(s, 32),
        Value::Null => "-".into(),
        other => escape_for_log(&other.to_string(), 32),
    };
    match seen.leaf.as_str() {
        "online" => {
            row.online = match &seen.payload[..] {
                b"true" => "yes".into(),
                b"false" => "no".into(),
                other => escape_for_log(&String::from_utf8_lossy(other), 8),
            }
        }
        "state" => {
            row.version = text(&doc["version"]);
            row.state = text(&doc["state"]);
            row.progress = match doc["progress"]["percent"].as_u64() {
                Some(p) => format!("{p}%"),
                None => "-".into(),
            };
            let last = &doc["last_event"];
            if last.is_object() {
                row.last_event = format!("#{} {}", seq_text(&last["seq"]), text(&last["state"]));
            }
        }
        "events" => {
            row.last_event = format!(
                "#{} {}{}",
                seq_text(&doc["seq"]),
                text(&doc["state"]),
                doc["reason"]
                    .as_str()
                    .map(|r| format!(" ({})", escape_for_log(r, 32)))
                    .unwrap_or_default()
            );
        }
        _ => {}
    }
}

fn render(table: &BTreeMap<String, Row>) -> String {
    let mut out = format!(
        "{:<20} {:<12} {:<15} {:<8} {:<34} {}\n",
        "DEVICE", "VERSION", "STATE", "PROGRESS", "LAST EVENT", "ONLINE"
    );
    for (device, row) in table {
        let cell = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        out.push_str(&format!(
            "{:<20} {:<12} {:<15} {:<8} {:<34} {}\n",
            escape_for_log(device, 20),
            cell(&row.version),
            cell(&row.state),
            cell(&row.progress),
            cell(&row.last_event),
            cell(&row.online)
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
        assert_eq!(seq_text(&serde_json::json!(17)), "17");
        let shown = seq_text(&serde_json::json!("\u{202e}".repeat(1000)));
        assert!(shown.is_ascii() || shown.ends_with('…'), "{shown}");
        assert!(shown.chars().count() <= 13, "{shown}");
    }
}
