//! The broker options the operator tools share (`release publish`, `monitor`, `rollout`).

use std::path::PathBuf;

use anyhow::Context;
use update_agent::mqtt::tls::TlsFiles;
use update_agent::mqtt::topics::{self, DEFAULT_PREFIX};
use update_agent::mqtt::{BrokerUrl, Endpoint, Protocol};

#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// mqtts://host[:port] (TLS) or mqtt://host[:port] (plain, development only)
    #[arg(long)]
    broker: String,
    /// CA certificate (PEM) the broker's certificate must chain to; needed for mqtts://
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Topic prefix the devices use
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// MQTT version to speak: 5 or 3.1.1 (for brokers that speak nothing newer)
    #[arg(long, default_value = "5", value_parser = parse_protocol)]
    pub protocol: Protocol,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    text.parse()
}

impl BrokerArgs {
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        endpoint_for(
            &self.broker,
            self.ca.as_ref(),
            self.cert.as_ref().zip(self.key.as_ref()),
            &self.prefix,
            self.protocol,
        )
    }
}

/// The endpoint for one broker URL with the tool's TLS files and protocol version.
pub fn endpoint_for(
    broker: &str,
    ca: Option<&PathBuf>,
    client: Option<(&PathBuf, &PathBuf)>,
    prefix: &str,
    protocol: Protocol,
) -> anyhow::Result<Endpoint> {
    let url = BrokerUrl::parse(broker).map_err(anyhow::Error::msg)?;
    topics::check_prefix(prefix).map_err(anyhow::Error::msg)?;
    let tls = match (ca, url.tls) {
        (Some(ca), true) => Some(TlsFiles {
            ca: ca.clone(),
            client: client.map(|(cert, key)| (cert.clone(), key.clone())),
        }),
        (None, true) => anyhow::bail!("{broker} needs --ca (the broker's CA certificate)"),
        (Some(_), false) => anyhow::bail!("--ca/--cert/--key need an mqtts:// broker"),
        (None, false) => None,
    };
    Ok(Endpoint { url, tls, protocol })
}

/// A current-thread runtime for a tool.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
