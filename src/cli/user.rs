//! The user's commands over D-Bus: `status` (when the agent runs), `postpone`, `resume`,
//! `auto on|off`, `install-now`, `check`; and the hidden `dbus-serve` that hosts the service
//! without a broker (the daemon, `run`, hosts it with MQTT). The bus is the system bus, or
//! `DBUS_SYSTEM_BUS_ADDRESS`.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use futures_util::StreamExt;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use update_agent::agent::{Agent, RebootMode};
use update_agent::config::Config;
use update_agent::daemon::fed::{Fed, Request};
use update_agent::dbus;
use update_agent::dbus::client::{self, AgentClient, ClientError, Status};
use update_agent::progress_line::ProgressLine;
use update_agent::release::escape_for_log;

use super::install::DEFAULT_CONFIG;
use super::{EXIT_ERROR, EXIT_REFUSED, runtime};

#[derive(clap::Args)]
pub struct PostponeArgs {
    /// How long: e.g. 30m, 4h, 2d, 1h30m
    #[arg(required_unless_present = "until", conflicts_with = "until")]
    duration: Option<String>,
    /// Until a time: RFC 3339 (2026-06-02T08:00:00+02:00) or local "2026-06-02 08:00"
    #[arg(long)]
    until: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct SimpleArgs {
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct AutoArgs {
    #[arg(value_enum)]
    switch: OnOff,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Offer this release file at start (a stand-in for MQTT)
    #[arg(long)]
    release: Option<PathBuf>,
    /// Run the reboot command when a reboot is due (default: log that it is due)
    #[arg(long)]
    reboot: bool,
}

/// Prints a client error for a person and picks the exit code: 1 for a refusal, 2 otherwise.
fn fail(err: ClientError, json: bool) -> ExitCode {
    let (kind, code) = match &err {
        ClientError::NotRunning { .. } => ("not-running", EXIT_ERROR),
        ClientError::AccessDenied(_) => ("access-denied", EXIT_ERROR),
        ClientError::Refused(_) => ("refused", EXIT_REFUSED),
        ClientError::Bus(_) => ("bus", EXIT_ERROR),
    };
    if json {
        println!(
            "{}",
            json!({"ok": false, "error": kind, "message": err.to_string()})
        );
    } else {
        eprintln!("error: {err}");
    }
    ExitCode::from(code)
}

/// Calls `method` of the running agent with its one argument, if it takes one. Not generic
/// over the argument: each copy of a call costs kilobytes of the device binary.
async fn call(
    json: bool,
    method: &str,
    argument: Option<zbus::Variant<'_>>,
) -> Result<zbus::Message, ExitCode> {
    let agent = client::connect().await.map_err(|e| fail(e, json))?;
    let reply = match argument {
        None => agent.call(method, &()).await,
        Some(argument) => {
            // The value itself as the one argument (`t`, `x`, `b`), not wrapped in a variant.
            match zbus::Structure::builder().append_field(argument).build() {
                Ok(arguments) => agent.call(method, &arguments).await,
                Err(err) => Err(err),
            }
        }
    };
    reply.map_err(|e| fail(ClientError::from_call(e), json))
}

pub fn postpone(args: PostponeArgs) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let request = match (&args.duration, &args.until) {
        (Some(text), None) => Postpone::For(parse_duration(text)?),
        (None, Some(text)) => Postpone::Until(parse_time(text)?),
        _ => anyhow::bail!("give a duration (4h) or --until TIME"),
    };
    runtime()?.block_on(async {
        let reply = match request {
            Postpone::For(d) => {
                let seconds = d.as_secs().max(0) as u64;
                call(json, "Postpone", Some(seconds.into())).await
            }
            Postpone::Until(t) => call(json, "PostponeUntil", Some(t.as_second().into())).await,
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(code) => return Ok(code),
        };
        let (until, clamped): (i64, String) = reply.body().deserialize()?;
        let until_text = client::time(until).unwrap_or_default();
        if json {
            let clamped = (!clamped.is_empty()).then_some(clamped.as_str());
            println!(
                "{}",
                json!({"ok": true, "postponed_until": until_text, "clamped": clamped})
            );
        } else if clamped.is_empty() {
            println!("postponed until {until_text}");
        } else {
            let why = match clamped.as_str() {
                "deadline" => "the release's deadline",
                "max-postpone" => "the longest postponement allowed",
                other => other,
            };
            println!("postponement clamped to {until_text} ({why})");
        }
        Ok(ExitCode::SUCCESS)
    })
}

enum Postpone {
    For(SignedDuration),
    Until(Timestamp),
}

/// `90s`, `30m`, `4h`, `2d`, `1h30m`.
fn parse_duration(text: &str) -> anyhow::Result<SignedDuration> {
    let bad = || anyhow::anyhow!("{text:?} is not a duration like 30m, 4h, 2d or 1h30m");
    let mut total = 0i64;
    let mut number = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: i64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() || total <= 0 {
        return Err(bad());
    }
    Ok(SignedDuration::from_secs(total))
}

fn parse_time(text: &str) -> anyhow::Result<Timestamp> {
    if let Ok(t) = text.parse::<Timestamp>() {
        return Ok(t);
    }
    let civil: jiff::civil::DateTime = text.parse().with_context(|| {
        format!("{text:?} is not a time like 2026-06-02T08:00:00+02:00 or \"2026-06-02 08:00\"")
    })?;
    Ok(civil
        .to_zoned_datetime(jiff::tz::TimeZone::system())?
        .timestamp())
}

pub fn resume(args: SimpleArgs) -> anyhow::Result<ExitCode> {
    simple(args.json, "postponement withdrawn", "Resume", None)
}

pub fn auto(args: AutoArgs) -> anyhow::Result<ExitCode> {
    let on = matches!(args.switch, OnOff::On);
    let done = if on {
        "automatic install is on"
    } else {
        "automatic install is off: updates are announced, not installed (security deadlines may still apply)"
    };
    simple(args.json, done, "SetAutoInstall", Some(on.into()))
}

pub fn install_now(args: SimpleArgs) -> anyhow::Result<ExitCode> {
    simple(args.json, "installing now", "InstallNow", None)
}

pub fn check(args: SimpleArgs) -> anyhow::Result<ExitCode> {
    simple(args.json, "check for updates requested", "CheckNow", None)
}

fn simple(
    json: bool,
    done: &str,
    method: &str,
    argument: Option<zbus::Variant<'_>>,
) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        if let Err(code) = call(json, method, argument).await {
            return Ok(code);
        }
        if json {
            println!("{}", json!({"ok": true}));
        } else {
            println!("{done}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `status` through the running agent. `Ok(None)` when it does not run: the caller falls back
/// to the state on disk.
pub fn status(json: bool, follow: bool) -> anyhow::Result<Option<ExitCode>> {
    runtime()?.block_on(async {
        let agent = match client::connect().await {
            Ok(agent) => agent,
            Err(ClientError::NotRunning { .. }) if !follow => return Ok(None),
            Err(err) => return Ok(Some(fail(err, json))),
        };
        let status = match Status::fetch(&agent).await {
            Ok(status) => status,
            Err(err) => return Ok(Some(fail(ClientError::from_call(err), json))),
        };
        if json {
            println!("{}", serde_json::to_string(&status)?);
        } else {
            print_status(&status);
        }
        if follow {
            follow_agent(&agent, json).await?;
        }
        Ok(Some(ExitCode::SUCCESS))
    })
}

fn print_status(status: &Status) {
    let show = |s: &str| escape_for_log(s, 200);
    println!("state:        {}", status.state);
    println!(
        "running:      {} in slot {}",
        show(&status.current_version),
        status.booted_slot
    );
    if !status.model.is_empty() {
        println!("model:        {}", show(&status.model));
    }
    if let Some(end) = &status.support_end {
        println!("support ends: {end}");
    }
    println!(
        "auto install: {}",
        if status.auto_install { "on" } else { "off" }
    );
    if let Some(until) = &status.postponed_until {
        println!("postponed:    until {until}");
    }
    if let Some(p) = &status.pending {
        println!(
            "pending:      {}{}{}",
            show(&p.version),
            if p.security { " (security" } else { " (" },
            format_args!(", severity {})", p.severity)
        );
        if !p.advisory.is_empty() {
            println!("  fixes:      {}", show(&p.advisory));
        }
        if let Some(deadline) = &p.deadline {
            println!("  deadline:   {deadline}");
        }
        if p.reboot {
            println!("  disruption: reboot, about {} s down", p.downtime_seconds);
        }
        if let Some(waiting) = &p.waiting {
            println!("  waiting:    {waiting}");
        }
        if let Some(at) = &p.reboot_at {
            println!("  reboot at:  {at}");
        }
    }
    if let Some(progress) = &status.progress {
        let downloaded = progress
            .downloaded
            .map(|d| format!(", {d} downloaded"))
            .unwrap_or_default();
        println!(
            "progress:     {} of {} bytes written{downloaded}",
            progress.done, progress.total
        );
    }
    if let Some(e) = &status.last_error {
        println!("last error:   {}: {}", e.reason, show(&e.message));
    }
}

/// Prints what changes until interrupted: state changes and signals as lines (JSON lines with
/// `--json`), a progress bar while writing on a terminal.
/// The properties `status --follow` shows as they change, in the order it shows them.
const FOLLOWED: [&str; 4] = ["State", "AutoInstall", "PostponedUntil", "Progress"];

/// What `status --follow` prints: lines, and a progress bar on a terminal during a write.
struct Follower {
    json: bool,
    terminal: bool,
    bar: Option<ProgressLine>,
}

impl Follower {
    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    fn property(&mut self, name: &str, value: &zbus::Variant<'_>) -> zbus::Result<()> {
        let json = self.json;
        match name {
            "State" => {
                let state: &str = value.downcast_ref()?;
                if state != "writing"
                    && let Some(bar) = self.bar.take()
                {
                    bar.finish_and_clear();
                }
                self.say(if json {
                    json!({"state": state}).to_string()
                } else {
                    format!("state: {state}")
                });
            }
            "AutoInstall" => {
                let on: bool = value.downcast_ref()?;
                self.say(if json {
                    json!({"auto_install": on}).to_string()
                } else {
                    format!("auto install: {}", if on { "on" } else { "off" })
                });
            }
            "PostponedUntil" => {
                let until = client::time(value.downcast_ref()?);
                self.say(if json {
                    json!({"postponed_until": until}).to_string()
                } else {
                    let until = until.map(|u| format!("until {u}"));
                    format!("postponed: {}", until.unwrap_or_else(|| "no".into()))
                });
            }
            "Progress" => {
                let (done, total): (u64, u64) = value.downcast_ref()?;
                if json {
                    self.say(json!({"progress": {"done": done, "total": total}}).to_string());
                } else if self.terminal && total > 0 {
                    let bar = self.bar.get_or_insert_with(|| ProgressLine::new(total));
                    bar.set_position(done);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn follow_agent(agent: &AgentClient, json: bool) -> anyhow::Result<()> {
    // The raw signals in one stream, not per-property streams: those keep only the latest
    // value, so a follower on a busy device would miss a short `writing` state.
    let mut signals = agent.signals().await?;
    let mut follower = Follower {
        json,
        terminal: std::io::stderr().is_terminal() && !json,
        bar: None,
    };
    // Subscribed first, then the current values: a change in between is shown, not lost.
    let current = agent.properties().await?;
    for name in FOLLOWED {
        if let Some(value) = current.get(name) {
            follower.property(name, value)?;
        }
    }
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            message = signals.next() => match message {
                Some(message) => message?,
                None => break,
            },
        };
        let header = message.header();
        let body = message.body();
        let interface = header.interface().map(|i| i.as_str());
        let line = match (interface, header.member().map(|m| m.as_str())) {
            (Some(client::PROPERTIES), Some("PropertiesChanged")) => {
                let (interface, changed, _): (&str, HashMap<&str, zbus::Variant<'_>>, Vec<&str>) =
                    body.deserialize()?;
                if interface == dbus::INTERFACE {
                    for name in FOLLOWED {
                        if let Some(value) = changed.get(name) {
                            follower.property(name, value)?;
                        }
                    }
                }
                continue;
            }
            (Some(dbus::INTERFACE), Some("UpdateAvailable")) => {
                let (version, advisory, security, severity, deadline): (
                    &str,
                    &str,
                    bool,
                    &str,
                    i64,
                ) = body.deserialize()?;
                if json {
                    json!({"update_available": {"version": version, "advisory": advisory, "security": security, "severity": severity, "deadline": client::time(deadline)}}).to_string()
                } else {
                    format!(
                        "update available: {} — {}",
                        escape_for_log(version, 64),
                        escape_for_log(advisory, 300)
                    )
                }
            }
            (Some(dbus::INTERFACE), Some("DisruptionAhead")) => {
                let (seconds, postponable, downtime_seconds): (u64, bool, u64) =
                    body.deserialize()?;
                if json {
                    json!({"disruption_ahead": {"seconds": seconds, "postponable": postponable, "downtime_seconds": downtime_seconds}}).to_string()
                } else {
                    format!(
                        "reboot in {} s{}",
                        seconds,
                        if postponable {
                            " (update-agent postpone can still move it)"
                        } else {
                            ""
                        }
                    )
                }
            }
            (Some(dbus::INTERFACE), Some("Completed")) => {
                let (result, version, reason): (&str, &str, &str) = body.deserialize()?;
                if json {
                    json!({"completed": {"result": result, "version": version, "reason": reason}})
                        .to_string()
                } else {
                    format!(
                        "{} {}{}",
                        result,
                        escape_for_log(version, 64),
                        if reason.is_empty() {
                            String::new()
                        } else {
                            format!(" ({reason})")
                        }
                    )
                }
            }
            _ => continue,
        };
        follower.say(line);
    }
    if let Some(bar) = follower.bar {
        bar.finish_and_clear();
    }
    Ok(())
}

/// `dbus-serve` (hidden): hosts the D-Bus service on the system bus without a broker, for
/// trying it by hand. A release given with `--release` is offered at start.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let mode = RebootMode::run_if(args.reboot);
    let release = match &args.release {
        Some(path) => Some(
            update_agent::release::read_release_file(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        ),
        None => None,
    };
    runtime()?.block_on(async {
        let agent = Agent::open(config, mode)?;
        let conn = zbus::connection::Builder::system()
            .build()
            .await
            .context("cannot connect to the system bus")?;
        let (fed, control) = Fed::start(agent, &conn)
            .await
            .with_context(|| format!("cannot serve {} on the system bus", dbus::BUS_NAME))?;
        if let Some(bytes) = release {
            control.requests.send(Request::Offer(bytes)).await?;
        }
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = fed.run() => result?,
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        drop(control);
        Ok(ExitCode::SUCCESS)
    })
}
