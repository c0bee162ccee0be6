//! `conformance`: the agent's own evidence for ETSI EN 303 645 §5.3, for this build, this
//! configuration and this device (see `update_agent::conformance`). Reads only; writes nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use update_agent::config::Config;
use update_agent::conformance::{self, Facts};

use super::EXIT_REFUSED;
use super::install::DEFAULT_CONFIG;

#[derive(clap::Args)]
pub struct ConformanceArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// The signed release whose altered copies the self-test must see refused (default: the
    /// one the daemon kept of the running release in the state directory)
    #[arg(long)]
    release: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    /// For a person
    Text,
    /// The whole report as one JSON document
    Json,
    /// A CycloneDX 1.6 attestation (standards, claims, evidence), for a test laboratory
    Cyclonedx,
}

/// Exit 0 when nothing is "not met" and the self-test did not fail; 1 otherwise (the report
/// says why); 2 when there is no report (configuration unreadable).
pub fn run(args: ConformanceArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let facts = Facts::gather(&config, args.release.as_deref());
    let report = conformance::assess(&config, &facts, &args.config.display().to_string());
    let out = match args.format {
        Format::Text => conformance::text::render(&report),
        Format::Json => {
            let mut json = serde_json::to_string_pretty(&report)?;
            json.push('\n');
            json
        }
        Format::Cyclonedx => {
            let mut json = serde_json::to_string_pretty(&conformance::cyclonedx::render(&report))?;
            json.push('\n');
            json
        }
    };
    std::io::stdout().write_all(out.as_bytes())?;
    if let Some(live) = &report.live
        && live.self_test.verdict == conformance::selftest::Verdict::Fail
    {
        eprintln!(
            "update-agent: SELF-TEST FAILED: {}",
            live.self_test.reason.as_deref().unwrap_or("")
        );
    }
    for finding in report
        .findings
        .iter()
        .filter(|f| f.status == conformance::Status::NotMet)
    {
        eprintln!(
            "update-agent: {} NOT MET ({}): {}",
            finding.provision, finding.code, finding.message
        );
    }
    Ok(if report.passes() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    })
}
