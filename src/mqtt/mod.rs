//! The MQTT adapter: the only code that knows MQTT. It owns the connection to the fleet's
//! broker (rumqttc, MQTT 5), the topic scheme and the payloads; it knows nothing of updates.
//!
//! - [`topics`]: the topic scheme (`docs/wire-formats.md`).
//! - [`payload`]: the retained state document and the event records, as JSON.
//! - [`tls`]: rustls (ring provider) client configuration: pinned CA, mutual TLS, TLS ≥ 1.2.
//! - [`backoff`]: reconnect back-off with jitter.
//! - [`link`]: the long-lived connection of `update-agent run`: reconnects, re-subscribes,
//!   publishes state and drains the outbox, hands received releases over.
//! - [`oneshot`]: short-lived connections for the operator tools (`release publish`, `monitor`).
//!
//! Why MQTT 5: the client tells the broker the largest packet it accepts
//! ([`MAX_PACKET_SIZE`]) in CONNECT, and a v5 broker then drops a larger message for this client
//! instead of sending it. With MQTT 3.1.1 an oversized packet can only be refused by closing the
//! connection, and a retained oversized release would then close every reconnect — an easy way
//! to keep a fleet offline.

pub mod backoff;
pub mod link;
pub mod oneshot;
pub mod payload;
pub mod tls;
pub mod topics;

use std::time::Duration;

use rumqttc::v5::MqttOptions;

use crate::release::MAX_RELEASE_SIZE;

/// The largest MQTT packet the agent accepts. A release is at most 64 KiB; twice that leaves
/// room for the topic and properties, and lets a moderately oversized release arrive so that it
/// can be refused as `too-large` and reported. Anything larger the broker drops (MQTT 5
/// Maximum Packet Size), so it cannot disconnect the agent.
pub const MAX_PACKET_SIZE: u32 = 2 * MAX_RELEASE_SIZE as u32;

/// Outgoing QoS 1 publishes in flight at most. rumqttc allocates a slot per possible packet id
/// up front; its default (65,535) costs about 13 MiB of RAM, more than the rest of the agent.
/// The daemon keeps at most a dozen in flight (8 events, state, online, a subscription).
pub const MAX_INFLIGHT: u16 = 32;

/// `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let tls = match url.scheme() {
            "mqtts" => true,
            "mqtt" => false,
            other => {
                return Err(format!(
                    "scheme {other:?} is not mqtts:// (TLS) or mqtt:// (plain TCP)"
                ));
            }
        };
        if !url.username().is_empty()
            || url.password().is_some()
            || !matches!(url.path(), "" | "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(format!(
                "{text:?}: only mqtt[s]://host[:port] is accepted (no credentials, path or query)"
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(format!("{text:?} names no host")),
        };
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        Ok(BrokerUrl { host, port, tls })
    }
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: BrokerUrl,
    /// Required for `mqtts://`.
    pub tls: Option<tls::TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("mqtts:// needs a CA certificate (--ca or mqtt.ca_file)")]
    NoCa,
    #[error("cannot reach the broker at {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the broker refused {what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("no answer from the broker at {url} within {seconds} s")]
    Timeout { url: String, seconds: u64 },
}

impl Endpoint {
    pub fn from_config(mqtt: &crate::config::Mqtt) -> Result<Endpoint, String> {
        let url = BrokerUrl::parse(&mqtt.broker)?;
        let tls = mqtt.ca_file.as_ref().map(|ca| tls::TlsFiles {
            ca: ca.clone(),
            client: mqtt.cert_file.clone().zip(mqtt.key_file.clone()),
        });
        Ok(Endpoint { url, tls })
    }

    pub fn shown(&self) -> String {
        let scheme = if self.url.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}:{}", self.url.host, self.url.port)
    }

    /// rumqttc options for this endpoint: MQTT 5, a clean start (the outbox, not the broker's
    /// session, is what makes delivery reliable), the maximum packet size, TLS if asked for.
    pub fn options(&self, client_id: &str, keepalive: Duration) -> Result<MqttOptions, MqttError> {
        let mut options = MqttOptions::new(client_id, self.url.host.clone(), self.url.port);
        options.set_keep_alive(keepalive);
        options.set_clean_start(true);
        options.set_max_packet_size(Some(MAX_PACKET_SIZE));
        options.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
        options.set_connection_timeout(10);
        if self.url.tls {
            let files = self.tls.as_ref().ok_or(MqttError::NoCa)?;
            let config = tls::client_config(files)?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let u = BrokerUrl::parse("mqtts://broker.example.net").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.example.net", 8883, true)
        );
        let u = BrokerUrl::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 1884, false));
        for bad in [
            "http://x",
            "mqtt://user:pw@x",
            "mqtt://x/path",
            "mqtt://x?q=1",
            "mqtt:///",
            "x:1883",
        ] {
            assert!(BrokerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
