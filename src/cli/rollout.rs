//! `update-agent rollout start|status|halt`: a release rollout over plain MQTT, no update
//! server. `start` publishes the release retained on the fleet's topic, then follows what the
//! devices publish (the fleet view: stages, failure rate, stragglers, missing events) and halts
//! the rollout when the failure rate among the devices that finished passes `--halt-at`.
//! Halting clears the retained release on the topic (on every broker it was published on): a
//! device that has not started treats the release's disappearance as a withdrawal; one that
//! started finishes its transaction. `status` shows how the release now retained on the fleet
//! topic stands, from the devices' retained state; `halt` clears it by hand.
//!
//! Several `--broker`s are the nodes of one cluster whose retained store is node-local
//! (RabbitMQ's MQTT plugin): the release is published to, and cleared from, every node, and
//! the devices are followed at every node (README, "Rollouts").

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use tokio::time::Instant;
use update_agent::fleet::{FleetView, Rules, Summary, Target, halt_reason, parse_percent};
use update_agent::mqtt::{Endpoint, oneshot, topics};
use update_agent::release::manifest::Manifest;
use update_agent::release::{self, Envelope, build::sha256_of, escape_for_log};

use super::broker::Connection;
use super::follow::{Heard, follow, observe};
use super::metrics_server::{self, Exposed};
use super::monitor::render;
use super::runtime;

/// Exit code when the tool stopped before the rollout settled (`--timeout`, Ctrl-C).
pub const EXIT_UNSETTLED: u8 = 3;

/// How long the tool waits for a broker to answer a publish or a subscription.
const BROKER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Publish a release to the fleet and follow it; halt above a failure rate
    Start(StartArgs),
    /// How the release retained on the fleet topic stands, from the devices' retained state
    Status(StatusArgs),
    /// Clear the retained release on the fleet topic: devices that have not started drop it
    Halt(HaltArgs),
}

/// The fleet's brokers and topic, shared by the three subcommands.
#[derive(clap::Args, Debug)]
pub struct FleetArgs {
    /// mqtts://host[:port] or mqtt://host[:port]; repeat for every node of a cluster whose
    /// retained messages are node-local (RabbitMQ)
    #[arg(long = "broker", required = true)]
    brokers: Vec<String>,
    #[command(flatten)]
    connection: Connection,
    /// The product (compatible string) whose fleet topic carries the release
    #[arg(long)]
    fleet: String,
}

impl FleetArgs {
    fn endpoints(&self) -> anyhow::Result<Vec<Endpoint>> {
        topics::check_segment("--fleet", &self.fleet).map_err(anyhow::Error::msg)?;
        self.brokers
            .iter()
            .map(|broker| self.connection.endpoint(broker))
            .collect()
    }

    fn topic(&self) -> String {
        topics::fleet_release(&self.connection.prefix, &self.fleet)
    }
}

#[derive(clap::Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Halt when rolled-back + failed devices exceed this share of the finished ones (e.g. 5%)
    #[arg(long, value_parser = parse_percent)]
    halt_at: Option<f64>,
    /// The failure rate counts (and can halt) once this many devices finished
    #[arg(long, default_value_t = 10)]
    min_finished: usize,
    /// Seconds without a message after which an unsettled or offline device is a straggler
    #[arg(long, default_value_t = 600)]
    straggler_after: u64,
    /// Serve the fleet's numbers for Prometheus at http://ADDR/metrics (e.g. 127.0.0.1:9464)
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Print a JSON summary line on every change (at most one a second) instead of the view
    #[arg(long)]
    json: bool,
    /// Stop following after this many seconds (the rollout goes on on the devices)
    #[arg(long)]
    timeout: Option<u64>,
    /// The signed release (JSON)
    release: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// Seconds without a message after which an unsettled or offline device is a straggler
    #[arg(long, default_value_t = 600)]
    straggler_after: u64,
}

#[derive(clap::Args, Debug)]
pub struct HaltArgs {
    #[command(flatten)]
    fleet: FleetArgs,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Start(args) => start(args),
        Command::Status(args) => status(args),
        Command::Halt(args) => halt(args),
    }
}

/// The release a rollout follows, read from its file (signatures are the devices' to check).
fn target_of(bytes: &[u8], what: &str) -> anyhow::Result<Target> {
    let envelope =
        Envelope::parse(bytes).map_err(|refusal| anyhow::anyhow!("{what}: {refusal}"))?;
    let manifest = Manifest::parse(&envelope.manifest_bytes)
        .map_err(|refusal| anyhow::anyhow!("{what}: {refusal}"))?;
    Ok(Target {
        release_id: hex::encode(sha256_of(&envelope.manifest_bytes)),
        version: manifest.version,
        created: manifest.created,
    })
}

fn compatible_of(bytes: &[u8]) -> Option<String> {
    let envelope = Envelope::parse(bytes).ok()?;
    Some(Manifest::parse(&envelope.manifest_bytes).ok()?.compatible)
}

/// One JSON line of `start --json`.
#[derive(Serialize)]
struct Line<'a> {
    at: Timestamp,
    halted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    halt_reason: Option<&'a str>,
    /// `complete`, `halted` or `unsettled` on the last line.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'a str>,
    summary: &'a Summary,
}

fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let endpoints = args.fleet.endpoints()?;
    let topic = args.fleet.topic();
    let bytes = release::read_release_file(&args.release)
        .with_context(|| format!("cannot read {}", args.release.display()))?;
    let target = target_of(&bytes, &args.release.display().to_string())?;
    match compatible_of(&bytes) {
        Some(compatible) if compatible == args.fleet.fleet => {}
        other => anyhow::bail!(
            "{} is for {:?}, not the fleet {:?}: its devices would refuse it (incompatible)",
            args.release.display(),
            other.map(|c| escape_for_log(&c, 64)).unwrap_or_default(),
            args.fleet.fleet
        ),
    }
    let rules = Rules {
        straggler_after: SignedDuration::from_secs(args.straggler_after as i64),
        halt_at: args.halt_at,
        min_finished: args.min_finished,
    };
    let shown = format!(
        "{}, {}",
        endpoints
            .iter()
            .map(Endpoint::shown)
            .collect::<Vec<_>>()
            .join(" "),
        args.fleet.connection.prefix
    );
    let terminal = std::io::stdout().is_terminal() && !args.json;
    runtime()?.block_on(async move {
        let exposed = Arc::new(Mutex::new(Exposed::default()));
        exposed.lock().expect("metrics lock").tool.halt_at = args.halt_at;
        if let Some(addr) = args.metrics {
            let bound = metrics_server::serve(addr, exposed.clone()).await?;
            eprintln!("metrics: http://{bound}/metrics");
        }
        // Follow first, so that no event of the rollout is missed, and take in the retained
        // state (each device's newest event so far) before the release goes out.
        let mut heard = follow(&endpoints, &args.fleet.connection.prefix)?;
        let mut view = FleetView::new(Some(args.fleet.fleet.clone()), Some(target.clone()));
        settle(&mut heard, &mut view, endpoints.len()).await?;
        for endpoint in &endpoints {
            oneshot::publish_retained(endpoint, &topic, bytes.clone(), BROKER_TIMEOUT).await?;
        }
        let announce = format!(
            "published {} (release {}) to {topic} (retained) at {}",
            escape_for_log(&target.version, 64),
            target.release_id,
            endpoints
                .iter()
                .map(Endpoint::shown)
                .collect::<Vec<_>>()
                .join(", ")
        );
        if args.json {
            eprintln!("{announce}");
        } else {
            println!("{announce}");
        }
        let deadline = args
            .timeout
            .map(|s| Instant::now() + Duration::from_secs(s));
        let mut halted: Option<String> = None;
        let mut last_shown: Option<Instant> = None;
        let mut dirty = true;
        let interval = if args.json {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(250)
        };
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        let outcome = loop {
            let tick = tokio::time::sleep(interval);
            tokio::select! {
                next = heard.recv() => match next {
                    Some(Heard::Message(seen)) => {
                        observe(&mut view, &seen);
                        dirty = true;
                    }
                    Some(Heard::Subscribed(_)) => {}
                    Some(Heard::Trouble(e)) => eprintln!("rollout: {e}"),
                    None => anyhow::bail!("the connection tasks stopped"),
                },
                () = tick => {}
                _ = &mut interrupt => break "interrupted",
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break "unsettled";
            }
            if !dirty || last_shown.is_some_and(|t| t.elapsed() < interval) {
                continue;
            }
            dirty = false;
            last_shown = Some(Instant::now());
            let now = Timestamp::now();
            let summary = view.summary(&rules, now);
            let rollout = summary.rollout.as_ref().expect("a target is set");
            if halted.is_none()
                && let Some(reason) = halt_reason(rollout, &rules)
            {
                for endpoint in &endpoints {
                    oneshot::publish_retained(endpoint, &topic, Vec::new(), BROKER_TIMEOUT)
                        .await?;
                }
                eprintln!(
                    "halted: {reason}; cleared the retained release on {topic}: devices that have not started drop it"
                );
                halted = Some(reason);
                exposed.lock().expect("metrics lock").tool.halted = true;
            }
            {
                let mut exposed = exposed.lock().expect("metrics lock");
                exposed.summary = Some(summary.clone());
            }
            show(&args, terminal, &summary, &shown, halted.as_deref(), None);
            // Done: every device settled; after a halt, once no device is still installing
            // or about to (those that had not started drop the release).
            let busy = rollout.stages[&update_agent::fleet::Stage::Installing]
                + rollout.stages[&update_agent::fleet::Stage::Pending];
            if summary.devices > 0 && rollout.settled {
                break if halted.is_some() { "halted" } else { "complete" };
            }
            if halted.is_some() && busy == 0 {
                break "halted";
            }
        };
        let summary = view.summary(&rules, Timestamp::now());
        exposed.lock().expect("metrics lock").summary = Some(summary.clone());
        show(&args, false, &summary, &shown, halted.as_deref(), Some(outcome));
        Ok(ExitCode::from(match outcome {
            "complete" => 0,
            "halted" => super::EXIT_REFUSED,
            _ => EXIT_UNSETTLED,
        }))
    })
}

/// Waits until every broker granted the subscription and the retained messages stopped
/// arriving (300 ms of quiet).
async fn settle(
    heard: &mut tokio::sync::mpsc::Receiver<Heard>,
    view: &mut FleetView,
    brokers: usize,
) -> anyhow::Result<()> {
    let mut subscribed = std::collections::HashSet::new();
    let deadline = Instant::now() + BROKER_TIMEOUT;
    loop {
        let quiet = if subscribed.len() == brokers {
            Duration::from_millis(300)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(quiet, heard.recv()).await {
            Ok(Some(Heard::Subscribed(index))) => {
                subscribed.insert(index);
            }
            Ok(Some(Heard::Message(seen))) => {
                observe(view, &seen);
            }
            Ok(Some(Heard::Trouble(e))) => eprintln!("rollout: {e}"),
            Ok(None) => anyhow::bail!("the connection tasks stopped"),
            Err(_) if subscribed.len() == brokers => return Ok(()),
            Err(_) => anyhow::bail!(
                "no subscription granted by {} of {brokers} brokers within {} s",
                brokers - subscribed.len(),
                BROKER_TIMEOUT.as_secs()
            ),
        }
    }
}

fn show(
    args: &StartArgs,
    terminal: bool,
    summary: &Summary,
    shown: &str,
    halted: Option<&str>,
    outcome: Option<&str>,
) {
    let mut out = std::io::stdout().lock();
    if args.json {
        let line = Line {
            at: Timestamp::now(),
            halted: halted.is_some(),
            halt_reason: halted,
            outcome,
            summary,
        };
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(&line).expect("summaries serialise")
        );
    } else if terminal || outcome.is_some() {
        if terminal {
            let _ = write!(out, "\x1b[H\x1b[2J");
        }
        let _ = write!(out, "{}", render(summary, shown));
        if let Some(reason) = halted {
            let _ = writeln!(out, "\nHALTED: {reason}");
        }
        if let Some(outcome) = outcome {
            let _ = writeln!(out, "\noutcome: {outcome}");
        }
    }
    let _ = out.flush();
}

fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let endpoints = args.fleet.endpoints()?;
    let topic = args.fleet.topic();
    let rules = Rules {
        straggler_after: SignedDuration::from_secs(args.straggler_after as i64),
        ..Rules::default()
    };
    runtime()?.block_on(async move {
        // The release retained at each broker: they should agree.
        let mut retained = Vec::new();
        for endpoint in &endpoints {
            let bytes = oneshot::read_retained(
                endpoint,
                &topic,
                Duration::from_millis(500),
                BROKER_TIMEOUT,
            )
            .await?;
            retained.push((endpoint.shown(), bytes));
        }
        let first = retained.iter().find_map(|(_, b)| b.clone());
        for (broker, bytes) in &retained {
            if *bytes != first {
                eprintln!(
                    "warning: {broker} holds {} on {topic} than the other brokers: publish or clear it on every node",
                    if bytes.is_some() { "another release" } else { "no release" }
                );
            }
        }
        let target = match &first {
            Some(bytes) => Some(target_of(bytes, &topic)?),
            None => None,
        };
        let mut heard = follow(&endpoints, &args.fleet.connection.prefix)?;
        let mut view = FleetView::new(Some(args.fleet.fleet.clone()), target.clone());
        settle(&mut heard, &mut view, endpoints.len()).await?;
        let summary = view.summary(&rules, Timestamp::now());
        if args.json {
            println!(
                "{}",
                serde_json::json!({"topic": topic, "retained": target.is_some(), "summary": summary})
            );
        } else {
            match &target {
                Some(t) => println!(
                    "{topic}: release {} ({}) retained",
                    escape_for_log(&t.version, 64),
                    t.release_id
                ),
                None => println!("{topic}: no release retained (halted, or none published)"),
            }
            let shown = endpoints
                .iter()
                .map(Endpoint::shown)
                .collect::<Vec<_>>()
                .join(" ");
            print!("{}", render(&summary, &shown));
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn halt(args: HaltArgs) -> anyhow::Result<ExitCode> {
    let endpoints = args.fleet.endpoints()?;
    let topic = args.fleet.topic();
    runtime()?.block_on(async {
        for endpoint in &endpoints {
            oneshot::publish_retained(endpoint, &topic, Vec::new(), BROKER_TIMEOUT).await?;
            println!(
                "cleared the retained release on {topic} at {}",
                endpoint.shown()
            );
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
