//! `update-agent run`: the daemon. Everything it does is in `update_agent::daemon`; this file
//! only loads the config and turns SIGTERM/SIGINT into a clean stop.

use std::path::PathBuf;
use std::process::ExitCode;

use update_agent::config::Config;
use update_agent::logging::LogTarget;

use super::install::DEFAULT_CONFIG;

#[derive(clap::Args)]
pub struct RunArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where diagnostics go: the journal when its socket exists (auto), the journal, or stderr
    #[arg(long, value_enum, default_value = "auto")]
    pub log: LogTarget,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    super::runtime()?.block_on(async {
        let shutdown = stop_signal()?;
        update_agent::daemon::run(config, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Completes on the first SIGTERM (systemd stopping the service) or SIGINT (Ctrl-C).
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
