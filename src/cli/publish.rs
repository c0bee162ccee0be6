//! `update-agent release publish`: put a release on the fleet's or one device's release topic,
//! retained, so devices find it when they connect and at their periodic check.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use update_agent::mqtt::oneshot;
use update_agent::mqtt::topics;
use update_agent::release::{self, Envelope};

use super::broker::BrokerArgs;
use super::runtime;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["fleet", "device"])))]
pub struct PublishArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// Publish for every device of this product (compatible string)
    #[arg(long)]
    fleet: Option<String>,
    /// Publish for one device (its id)
    #[arg(long)]
    device: Option<String>,
    /// Remove the retained release from the topic instead (no release file)
    #[arg(long, conflicts_with = "release")]
    clear: bool,
    /// The signed release (JSON)
    #[arg(required_unless_present = "clear")]
    release: Option<PathBuf>,
}

pub fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let endpoint = args.broker.endpoint()?;
    let prefix = &args.broker.connection.prefix;
    let topic = match (&args.fleet, &args.device) {
        (Some(compatible), _) => {
            topics::check_segment("--fleet", compatible).map_err(anyhow::Error::msg)?;
            topics::fleet_release(prefix, compatible)
        }
        (_, Some(device)) => {
            topics::check_segment("--device", device).map_err(anyhow::Error::msg)?;
            format!("{}/release", topics::device_topic(prefix, device))
        }
        (None, None) => unreachable!("clap requires one of --fleet and --device"),
    };
    let payload = match &args.release {
        None => Vec::new(),
        Some(path) => {
            let bytes = release::read_release_file(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            // Devices refuse what does not parse; better to learn it here than from the fleet.
            Envelope::parse(&bytes)
                .map_err(|refusal| anyhow::anyhow!("{}: {refusal}", path.display()))?;
            bytes
        }
    };
    let size = payload.len();
    runtime()?.block_on(oneshot::publish_retained(
        &endpoint,
        &topic,
        payload,
        Duration::from_secs(15),
    ))?;
    if size == 0 {
        println!("cleared the retained release on {topic}");
    } else {
        println!(
            "published {size} bytes to {topic} (retained) at {}",
            endpoint.shown()
        );
    }
    Ok(ExitCode::SUCCESS)
}
