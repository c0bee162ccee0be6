//! Command-line front end: argument parsing and human/JSON output. No update logic lives here;
//! each subcommand calls into the library.

#[cfg(feature = "operator")]
mod broker;
mod conformance;
#[cfg(feature = "demo")]
mod demo;
#[cfg(feature = "demo")]
mod demo_broker;
#[cfg(feature = "operator")]
mod follow;
mod install;
mod installer;
#[cfg(feature = "operator")]
mod keygen;
#[cfg(feature = "operator")]
mod metrics_server;
#[cfg(feature = "operator")]
mod monitor;
#[cfg(feature = "operator")]
mod publish;
mod release;
#[cfg(feature = "operator")]
mod release_create;
mod release_summary;
#[cfg(feature = "operator")]
mod rollout;
mod run;
mod status;
mod user;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for a release or input the device refuses (the reason code is printed).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code for everything else that went wrong (usage, IO, configuration).
pub const EXIT_ERROR: u8 = 2;

/// The current-thread runtime every command's async part runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[derive(Parser)]
#[command(
    name = "update-agent",
    version,
    about = "Keeps embedded Linux gateways up to date, safely"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole update cycle on this machine: throwaway keys, file slots, local HTTP server
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Make an Ed25519 release signing key pair: PREFIX.key (private, 0600) and PREFIX.pub
    #[cfg(feature = "operator")]
    Keygen(keygen::Args),
    /// Inspect and verify releases (operator builds: also create, sign and publish them)
    #[command(subcommand)]
    Release(release::Command),
    /// Run the agent as a service: releases from MQTT in, state and events out
    Run(run::RunArgs),
    /// Watch the fleet: counts per version and state, failures, stragglers; or --json events
    #[cfg(feature = "operator")]
    Monitor(monitor::MonitorArgs),
    /// Roll a release out to the fleet over MQTT: start (publish, follow, halt on failures),
    /// status, halt
    #[cfg(feature = "operator")]
    #[command(subcommand)]
    Rollout(rollout::Command),
    /// Install a release from a file now (like `rauc install`); reboot to try it
    Install(install::InstallArgs),
    /// At boot: finish an interrupted install, run the trial's health checks, commit or roll back
    BootCheck(install::BootCheckArgs),
    /// What the agent does: from the running agent over D-Bus, else from the state on disk
    Status(status::StatusArgs),
    /// The device's own evidence for ETSI EN 303 645 §5.3: text, JSON or CycloneDX 1.6
    Conformance(conformance::ConformanceArgs),
    /// Postpone the pending update (and its reboot): `postpone 4h` or `postpone --until TIME`
    Postpone(user::PostponeArgs),
    /// Withdraw a postponement
    Resume(user::SimpleArgs),
    /// Switch automatic install on or off (off: updates are announced, not installed)
    Auto(user::AutoArgs),
    /// Install the pending update now (or reboot into the installed one now)
    InstallNow(user::SimpleArgs),
    /// Look for updates now
    Check(user::SimpleArgs),
    /// Host the D-Bus service with the one-shot driver (until the daemon does; for testing)
    #[command(hide = true)]
    DbusServe(user::ServeArgs),
    /// Change the bootloader state of a slot by hand: mark good|bad|active booted|other
    Mark(status::MarkArgs),
    /// The privileged installer (root): slots, bootloader and reboot, for the daemon's user only
    Installer(installer::InstallerArgs),
    /// Send the installer one hand-made request and print its answer (tests, debugging)
    #[command(hide = true)]
    InstallerRequest(installer::RequestArgs),
}

impl Cli {
    /// The daemon logs to the journal when there is one and at `info`; the commands a person
    /// runs log warnings and errors to stderr, keeping stdout for their output.
    pub fn init_logging(&self) {
        use update_agent::logging::{LogTarget, init};
        match &self.command {
            Command::Run(args) => init(args.log, "info"),
            Command::Installer(args) => init(args.log, "info"),
            // The story is told on stdout; stderr shows only errors (a tamper alert is one), and
            // the embedded broker's own chatter is not part of it.
            #[cfg(feature = "demo")]
            Command::Demo(_) => init(LogTarget::Stderr, "error,rumqttd=off"),
            _ => init(LogTarget::Stderr, "warn"),
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // Output commands die quietly when their reader goes away (`update-agent … | head`), as
    // other Unix tools do, instead of panicking on a failed print.
    restore_default_sigpipe();
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args),
        #[cfg(feature = "operator")]
        Command::Keygen(args) => keygen::run(args),
        Command::Release(command) => release::run(command),
        Command::Run(args) => run::run(args),
        #[cfg(feature = "operator")]
        Command::Monitor(args) => monitor::run(args),
        #[cfg(feature = "operator")]
        Command::Rollout(command) => rollout::run(command),
        Command::Install(args) => install::install(args),
        Command::BootCheck(args) => install::boot_check(args),
        Command::Status(args) => status::status(args),
        Command::Conformance(args) => conformance::run(args),
        Command::Mark(args) => status::mark(args),
        Command::Postpone(args) => user::postpone(args),
        Command::Resume(args) => user::resume(args),
        Command::Auto(args) => user::auto(args),
        Command::InstallNow(args) => user::install_now(args),
        Command::Check(args) => user::check(args),
        Command::DbusServe(args) => user::serve(args),
        Command::Installer(args) => installer::serve(args),
        Command::InstallerRequest(args) => installer::request(args),
    }
}

fn restore_default_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: no other thread exists yet and the default disposition installs no handler code.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}
