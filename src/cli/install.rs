//! `install` (one-shot local install, like `rauc install`) and `boot-check` (run at every boot by
//! the commit unit: finishes what a reboot or power cut left, runs the trial's health checks and
//! commits or rolls back).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use update_agent::agent::{Agent, Installs, Observer, Output, RebootMode};
use update_agent::config::Config;
use update_agent::engine::{Event, EventKind, Phase, Progress};
use update_agent::progress_line::ProgressLine;
use update_agent::release::{self, escape_for_log};

use super::{EXIT_REFUSED, runtime};

pub const DEFAULT_CONFIG: &str = "/etc/update-agent/agent.toml";

#[derive(clap::Args)]
pub struct InstallArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Reboot into the new slot when it is ready (default: leave the reboot to you)
    #[arg(long)]
    reboot: bool,
    /// The signed release (JSON); its image URL may be file://, http:// or https://
    release: PathBuf,
}

#[derive(clap::Args)]
pub struct BootCheckArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Do not reboot, even when rolling back needs it (report and stop instead)
    #[arg(long)]
    no_reboot: bool,
}

pub fn install(args: InstallArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let bytes = release::read_release_file(&args.release)
        .with_context(|| format!("cannot read {}", args.release.display()))?;
    let mode = RebootMode::run_if(args.reboot);
    let mut agent = Agent::open(config, mode)?;
    let mut narrator = Narrator::new();
    runtime()?.block_on(async {
        agent.observe_boot(&mut narrator).await?;
        // The person at the console asked for this install: "install now", past any
        // maintenance window, postponement or automatic-install setting.
        if let Err(refusal) = agent
            .accept_release(&bytes, Installs::Now, &mut narrator)
            .await?
        {
            eprintln!("refused: {refusal}");
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
        Ok(finish(&agent, &narrator, Outcome::FailureIsError))
    })
}

pub fn boot_check(args: BootCheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let mode = RebootMode::run_if(!args.no_reboot);
    let mut agent = Agent::open(config, mode)?;
    let mut narrator = Narrator::new();
    runtime()?.block_on(async {
        agent.observe_boot(&mut narrator).await?;
        Ok(finish(&agent, &narrator, Outcome::Reported))
    })
}

/// How a failed or rolled-back transaction shows in the exit code.
enum Outcome {
    /// `install`: the person who asked for the install learns that it failed.
    FailureIsError,
    /// `boot-check`: finishing a rollback is the command doing its job (the outcome is in the
    /// events and `status`); a unit running it at boot must not show as failed for that.
    Reported,
}

/// Sums up where the agent stopped.
fn finish(agent: &Agent, narrator: &Narrator, outcome: Outcome) -> ExitCode {
    narrator.done();
    let state = agent.engine().state();
    match &state.phase {
        Phase::RebootPending { txn, .. } => {
            println!(
                "slot {} holds {} and is activated: reboot to try it; it is committed after a healthy boot",
                txn.to_slot,
                escape_for_log(txn.to_version(), 64)
            );
            ExitCode::SUCCESS
        }
        Phase::Idle => match narrator.last_outcome {
            Some(EventKind::Failed | EventKind::RolledBack)
                if matches!(outcome, Outcome::FailureIsError) =>
            {
                ExitCode::from(EXIT_REFUSED)
            }
            _ => ExitCode::SUCCESS,
        },
        phase => {
            println!("stopped in phase {}", phase.name());
            ExitCode::SUCCESS
        }
    }
}

/// Tells a person what happens: one line per event, a progress bar while writing on a terminal.
pub struct Narrator {
    bar: Option<ProgressLine>,
    terminal: bool,
    last_outcome: Option<EventKind>,
}

impl Narrator {
    pub fn new() -> Narrator {
        Narrator {
            bar: None,
            terminal: std::io::stderr().is_terminal(),
            last_outcome: None,
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Narrator {
    fn observe(&mut self, output: Output<'_>) {
        match output {
            Output::Event(event) => self.event(event),
            Output::Progress(progress) => self.progress(progress),
            _ => {}
        }
    }
}

impl Narrator {
    fn event(&mut self, event: &Event) {
        let line = describe(event);
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
        if matches!(
            event.kind,
            EventKind::Committed | EventKind::Failed | EventKind::RolledBack
        ) {
            self.last_outcome = Some(event.kind);
            self.done();
        }
    }

    fn progress(&mut self, progress: &Progress) {
        if !self.terminal {
            return;
        }
        let bar = self
            .bar
            .get_or_insert_with(|| ProgressLine::new(progress.total));
        bar.set_position(progress.done);
    }
}

fn until(event: &Event) -> String {
    event
        .until
        .map(|t| format!(" until {t}"))
        .unwrap_or_default()
}

pub fn describe(event: &Event) -> String {
    let version = event.to_version.as_deref().map(|v| escape_for_log(v, 64));
    let slot = event.slot.as_deref().unwrap_or("?");
    let what = match event.kind {
        EventKind::Refused => "release refused".to_string(),
        EventKind::Accepted => format!(
            "release {} accepted; installing into slot {slot}",
            version.as_deref().unwrap_or("?")
        ),
        EventKind::Writing => format!("writing slot {slot}"),
        EventKind::Written => format!("slot {slot} written and read back; hash verified"),
        EventKind::Activated => format!("bootloader set to try slot {slot} once"),
        EventKind::Rebooting => "reboot requested".to_string(),
        EventKind::TrialBoot => format!("trial boot of slot {slot}; running health checks"),
        EventKind::Committed => format!(
            "committed: slot {slot} runs {} and is marked good",
            version.as_deref().unwrap_or("?")
        ),
        EventKind::Failed => "install failed".to_string(),
        EventKind::RollingBack => format!("rolling back from slot {slot}"),
        EventKind::RolledBack => format!("rolled back; slot {slot} marked bad"),
        EventKind::Pending => format!(
            "release {} waits: {}{}",
            version.as_deref().unwrap_or("?"),
            event.waiting.map(|w| w.as_str()).unwrap_or("?"),
            until(event)
        ),
        EventKind::Superseded => format!(
            "release {} superseded before it was written",
            version.as_deref().unwrap_or("?")
        ),
        EventKind::RebootScheduled => format!(
            "reboot into slot {slot} scheduled: {}{}",
            event.waiting.map(|w| w.as_str()).unwrap_or("?"),
            until(event)
        ),
        EventKind::Postponed => format!(
            "postponed{}{}",
            until(event),
            event
                .clamped
                .map(|c| format!(" (clamped: {})", c.as_str()))
                .unwrap_or_default()
        ),
        EventKind::Resumed => "postponement withdrawn".to_string(),
        EventKind::AutoInstallEnabled => "automatic install switched on".to_string(),
        EventKind::AutoInstallDisabled => {
            "automatic install switched off: updates are announced, not installed".to_string()
        }
        EventKind::InstallNow => "install now, as the user asked".to_string(),
        EventKind::CheckRequested => "check for updates requested".to_string(),
        EventKind::MarkedGood => format!("slot {slot} marked good by hand"),
        EventKind::MarkedBad => format!("slot {slot} marked bad by hand"),
        EventKind::RebootFailed => "the reboot failed; it is tried again later".to_string(),
        EventKind::Withdrawn => format!(
            "version {} withdrawn before it started installing",
            version.as_deref().unwrap_or("?")
        ),
    };
    let mut line = format!("[{}] #{} {what}", event.at, event.seq);
    if let Some(reason) = event.reason {
        line.push_str(&format!(" — {reason}"));
        if let Some(message) = &event.message {
            line.push_str(&format!(": {}", escape_for_log(message, 300)));
        }
    }
    line
}
