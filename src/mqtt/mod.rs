//! The MQTT adapter: the only code that knows MQTT. It owns the connection to the fleet's
//! broker (rumqttc, MQTT 5 or 3.1.1), the topic scheme and the payloads; it knows nothing of
//! updates.
//!
//! - [`client`]: rumqttc's MQTT 5 and 3.1.1 clients behind one face.
//! - [`topics`]: the topic scheme (`docs/wire-formats.md`).
//! - [`payload`]: the retained state document and the event records, as JSON.
//! - [`tls`]: rustls (ring provider) client configuration: pinned CA, mutual TLS, TLS ≥ 1.2.
//! - [`backoff`]: reconnect back-off with jitter.
//! - [`link`]: the long-lived connection of `update-agent run`: reconnects, re-subscribes,
//!   publishes state and drains the outbox, hands received releases over.
//! - [`oneshot`]: short-lived connections for the operator tools (`release publish`, `monitor`).
//!
//! Why MQTT 5 is the default: the client tells the broker the largest packet it accepts
//! ([`MAX_PACKET_SIZE`]) in CONNECT, and a v5 broker then drops a larger message for this client
//! instead of sending it. With MQTT 3.1.1 (`[mqtt] protocol = "3.1.1"`, for brokers that speak
//! nothing newer) an oversized packet can only be refused by closing the connection, and a
//! retained oversized release would then close every reconnect. There the bound is the
//! broker's to keep (its own maximum packet size, set by the integrator: README, "MQTT 3.1.1");
//! should one arrive anyway, the link reconnects only after the longest back-off
//! ([`link`]), so a device neither hammers the broker nor holds more than 128 KiB.

pub mod backoff;
pub mod client;
pub mod link;
pub mod oneshot;
pub mod payload;
pub mod tls;
pub mod topics;

use crate::release::MAX_RELEASE_SIZE;

/// The largest MQTT packet the agent accepts. A release is at most 64 KiB; twice that leaves
/// room for the topic and properties, and lets a moderately oversized release arrive so that it
/// can be refused as `too-large` and reported. Anything larger an MQTT 5 broker drops (Maximum
/// Packet Size), so it cannot disconnect the agent; on 3.1.1 the broker's own limit must.
pub const MAX_PACKET_SIZE: u32 = 2 * MAX_RELEASE_SIZE as u32;

/// The MQTT protocol version to speak (`[mqtt] protocol`, `"5"` or `"3.1.1"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// MQTT 5.0: the broker learns the agent's maximum packet size and drops larger messages.
    #[default]
    V5,
    /// MQTT 3.1.1, for brokers and services that speak nothing newer (Azure IoT Hub, RabbitMQ
    /// before 3.13, older appliances). The broker must bound the message size itself.
    V311,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        }
    }
}

/// Written as the config spells it (the simulated gateway writes configs).
impl serde::Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(text: &str) -> Result<Protocol, String> {
        match text {
            "5" => Ok(Protocol::V5),
            "3.1.1" => Ok(Protocol::V311),
            other => Err(format!("MQTT protocol {other:?} is not \"5\" or \"3.1.1\"")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Outgoing QoS 1 publishes in flight at most. rumqttc allocates a slot per possible packet id
/// up front; its default (65,535) costs about 13 MiB of RAM, more than the rest of the agent.
/// The daemon keeps at most a dozen in flight (8 events, state, online, a subscription).
pub const MAX_INFLIGHT: u16 = 32;

/// `mqtt://host[:port]` or `mqtts://host[:port]`; parsed as a config is read, written back
/// with its port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
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

impl TryFrom<String> for BrokerUrl {
    type Error = String;

    fn try_from(text: String) -> Result<BrokerUrl, String> {
        BrokerUrl::parse(&text)
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match self.host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => write!(f, "{scheme}://[{}]:{}", self.host, self.port),
            Err(_) => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

impl serde::Serialize for BrokerUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where, as whom and in which protocol version to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub url: BrokerUrl,
    /// Required for `mqtts://`.
    pub tls: Option<tls::TlsFiles>,
    pub protocol: Protocol,
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
    pub fn shown(&self) -> String {
        self.url.to_string()
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

    #[test]
    fn protocol_versions() {
        assert_eq!("5".parse::<Protocol>(), Ok(Protocol::V5));
        assert_eq!("3.1.1".parse::<Protocol>(), Ok(Protocol::V311));
        for bad in ["3", "3.1", "4", "5.0", "v5", ""] {
            assert!(bad.parse::<Protocol>().is_err(), "{bad}");
        }
        assert_eq!(Protocol::default(), Protocol::V5);
    }
}
