//! The broker options the operator tools share (`release publish`, `monitor`, `rollout`).

use std::path::PathBuf;

use update_agent::mqtt::tls::TlsFiles;
use update_agent::mqtt::topics::{self, DEFAULT_PREFIX};
use update_agent::mqtt::{BrokerUrl, Endpoint, Protocol};

#[derive(clap::Args, Debug)]
pub struct BrokerArgs {
    /// mqtts://host[:port] (TLS) or mqtt://host[:port] (plain, development only)
    #[arg(long)]
    broker: String,
    #[command(flatten)]
    pub connection: Connection,
}

impl BrokerArgs {
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        self.connection.endpoint(&self.broker)
    }
}

/// How a tool connects, besides the broker's URL: TLS files, topic prefix, protocol version.
#[derive(clap::Args, Debug)]
pub struct Connection {
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
    #[arg(long, default_value = "5", value_parser = |s: &str| s.parse::<Protocol>())]
    pub protocol: Protocol,
}

impl Connection {
    /// The endpoint for the broker at `broker`.
    pub fn endpoint(&self, broker: &str) -> anyhow::Result<Endpoint> {
        let url = BrokerUrl::parse(broker).map_err(anyhow::Error::msg)?;
        topics::check_prefix(&self.prefix).map_err(anyhow::Error::msg)?;
        let tls = match (&self.ca, url.tls) {
            (Some(ca), true) => Some(TlsFiles {
                ca: ca.clone(),
                client: self.cert.clone().zip(self.key.clone()),
            }),
            (None, true) => anyhow::bail!("{broker} needs --ca (the broker's CA certificate)"),
            (Some(_), false) => anyhow::bail!("--ca/--cert/--key need an mqtts:// broker"),
            (None, false) => None,
        };
        Ok(Endpoint {
            url,
            tls,
            protocol: self.protocol,
        })
    }
}
