//! rumqttc's two clients, MQTT 5 (`rumqttc::v5`) and MQTT 3.1.1 (`rumqttc`), behind one face,
//! so that the link and the operator's tools are written once for both protocol versions.
//!
//! Only what the agent uses is here: QoS 1 publishes and subscriptions, a last will, the
//! packet ids of outgoing requests, and the few incoming packets it acts on. What differs
//! between the versions is turned into the same [`Event`]s; what 3.1.1 cannot say (a refused
//! publish, the broker's reason for a disconnect) simply never appears.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;

use super::{Endpoint, MAX_INFLIGHT, MAX_PACKET_SIZE, MqttError, Protocol, tls};

/// A retained message the broker publishes when the connection drops without a DISCONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
}

/// Retained, at QoS 1, as in 3.1.1 (no will properties).
impl From<Will> for rumqttc::v5::mqttbytes::v5::LastWill {
    fn from(will: Will) -> Self {
        let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
        Self::new(will.topic, will.payload, qos, true, None)
    }
}

/// Retained, at QoS 1.
impl From<Will> for rumqttc::LastWill {
    fn from(will: Will) -> Self {
        Self::new(will.topic, will.payload, rumqttc::QoS::AtLeastOnce, true)
    }
}

/// What happened on the connection, the same for both protocol versions.
#[derive(Debug)]
pub enum Event {
    /// The broker accepted the connection (CONNACK).
    Connected,
    /// SUBACK: per filter, in order, `None` when granted or the broker's refusal.
    Subscribed {
        pkid: u16,
        refusals: Vec<Option<String>>,
    },
    /// A message on a subscribed topic; `retained` when the broker sent it from its retained
    /// store (because of a subscription), not live.
    Message {
        topic: Bytes,
        payload: Bytes,
        retained: bool,
    },
    /// PUBACK: `refusal` is the broker's reason when it did not take the message (MQTT 5 only;
    /// a 3.1.1 broker acknowledges what it drops).
    Acked { pkid: u16, refusal: Option<String> },
    /// The broker said why it closes the connection (MQTT 5 only).
    ClosedByBroker { reason: String },
    /// rumqttc sent a request: its packet id, in the order the requests were made.
    Sent(Outgoing),
    /// Anything else (pings, acknowledgements the agent does not track).
    Other,
}

/// Why the connection failed or broke.
#[derive(Debug)]
pub struct Down {
    pub detail: String,
    /// The broker sent a packet larger than [`MAX_PACKET_SIZE`] (its size): rumqttc refuses it
    /// by closing the connection. An MQTT 5 broker never does (it knows the limit); a 3.1.1
    /// broker without a limit of its own does, and a retained oversized message then arrives
    /// again after every reconnect.
    pub oversized: Option<usize>,
}

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// `$body` with `$inner` bound to the rumqttc value of either version, for the calls that are
/// spelled the same in both (their types differ, so one generic function cannot take both).
macro_rules! either {
    ($value:expr, $Wrapper:ident($inner:ident) => $body:expr) => {
        match $value {
            $Wrapper::V5($inner) => $body,
            $Wrapper::V311($inner) => $body,
        }
    };
    // `$packets` names the version's packet types (`QoS`, ...) in `$body`.
    ($value:expr, $Wrapper:ident($inner:ident), $packets:ident => $body:expr) => {
        match $value {
            $Wrapper::V5($inner) => {
                use rumqttc::v5::mqttbytes as $packets;
                $body
            }
            $Wrapper::V311($inner) => {
                use rumqttc::mqttbytes as $packets;
                $body
            }
        }
    };
}

/// The request side: cheap to clone, usable while the event loop runs elsewhere.
#[derive(Clone)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// The connection side: must be polled all the time (keep-alive, acknowledgements).
pub enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    V311(Box<rumqttc::EventLoop>),
}

/// Creates the client for `endpoint` without connecting (the first poll connects): a clean
/// session (the outbox, not the broker's session, makes delivery reliable), [`MAX_PACKET_SIZE`]
/// both ways, [`MAX_INFLIGHT`], TLS when the URL asks for it.
pub fn new(
    endpoint: &Endpoint,
    client_id: &str,
    keepalive: Duration,
    will: Option<Will>,
    queue: usize,
) -> Result<(Client, EventLoop), MqttError> {
    let transport = if endpoint.url.tls {
        let files = endpoint.tls.as_ref().ok_or(MqttError::NoCa)?;
        Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls::client_config(files)?),
        ))
    } else {
        None
    };
    let host = endpoint.url.host.clone();
    let port = endpoint.url.port;
    Ok(match endpoint.protocol {
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
            options.set_keep_alive(keepalive);
            options.set_clean_start(true);
            // Told to the broker in CONNECT: it drops larger messages for this client.
            options.set_max_packet_size(Some(MAX_PACKET_SIZE));
            options.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
            options.set_connection_timeout(10);
            if let Some(will) = will {
                options.set_last_will(will.into());
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, queue);
            (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
        }
        Protocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(client_id, host, port);
            options.set_keep_alive(keepalive);
            options.set_clean_session(true);
            // 3.1.1 has no way to tell the broker: a larger packet closes the connection
            // (see `Down::oversized`).
            let max = MAX_PACKET_SIZE as usize;
            options.set_max_packet_size(max, max);
            options.set_inflight(MAX_INFLIGHT);
            if let Some(will) = will {
                options.set_last_will(will.into());
            }
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, queue);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(10);
            eventloop.set_network_options(network);
            (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
        }
    })
}

impl Client {
    /// Queues a QoS 1 publish without waiting; fails when the request queue is full.
    pub fn try_publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        either!(self, Client(c), packets => c
            .try_publish(topic, packets::QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string()))
    }

    /// Queues a QoS 1 publish, waiting for room in the request queue.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), String> {
        either!(self, Client(c), packets => c
            .publish(topic, packets::QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| e.to_string()))
    }

    /// Queues one SUBSCRIBE for `filters`, all at QoS 1.
    pub fn try_subscribe(&self, filters: &[String]) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::{QoS, v5::Filter};
                let filters = filters
                    .iter()
                    .map(|f| Filter::new(f.clone(), QoS::AtLeastOnce));
                c.try_subscribe_many(filters).map_err(|e| e.to_string())
            }
            Client::V311(c) => {
                use rumqttc::{QoS, SubscribeFilter};
                let filters = filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                c.try_subscribe_many(filters).map_err(|e| e.to_string())
            }
        }
    }

    pub fn try_disconnect(&self) -> Result<(), String> {
        either!(self, Client(c) => c.try_disconnect().map_err(|e| e.to_string()))
    }

    pub async fn disconnect(&self) -> Result<(), String> {
        either!(self, Client(c) => c.disconnect().await.map_err(|e| e.to_string()))
    }
}

impl EventLoop {
    /// The next event; an error when the connection failed or broke (the next call reconnects).
    pub async fn poll(&mut self) -> Result<Event, Down> {
        match self {
            EventLoop::V5(eventloop) => eventloop.poll().await.map(from_v5).map_err(down_v5),
            EventLoop::V311(eventloop) => eventloop.poll().await.map(from_v311).map_err(down_v311),
        }
    }

    /// Forgets every request made for the connection that broke: a new connection starts a
    /// clean session, and whoever made them sends again what still matters.
    pub fn forget_requests(&mut self) {
        either!(self, EventLoop(eventloop) => {
            eventloop.clean();
            eventloop.pending.clear();
        })
    }
}

fn from_v5(event: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::Event as E;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    match event {
        E::Incoming(Packet::ConnAck(_)) => Event::Connected,
        E::Incoming(Packet::SubAck(ack)) => subscribed(ack.pkid, &ack.return_codes, |code| {
            matches!(code, SubscribeReasonCode::Success(_))
        }),
        E::Incoming(Packet::Publish(publish)) => Event::Message {
            topic: publish.topic,
            payload: publish.payload,
            retained: publish.retain,
        },
        E::Incoming(Packet::PubAck(ack)) => Event::Acked {
            pkid: ack.pkid,
            refusal: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                other => Some(format!("{other:?}")),
            },
        },
        E::Incoming(Packet::Disconnect(disconnect)) => Event::ClosedByBroker {
            reason: format!("{:?}", disconnect.reason_code),
        },
        E::Outgoing(outgoing) => Event::Sent(outgoing),
        E::Incoming(_) => Event::Other,
    }
}

fn from_v311(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Packet, SubscribeReasonCode};
    match event {
        E::Incoming(Packet::ConnAck(_)) => Event::Connected,
        E::Incoming(Packet::SubAck(ack)) => subscribed(ack.pkid, &ack.return_codes, |code| {
            matches!(code, SubscribeReasonCode::Success(_))
        }),
        E::Incoming(Packet::Publish(publish)) => Event::Message {
            topic: Bytes::from(publish.topic),
            payload: publish.payload,
            retained: publish.retain,
        },
        E::Incoming(Packet::PubAck(ack)) => Event::Acked {
            pkid: ack.pkid,
            refusal: None,
        },
        E::Outgoing(outgoing) => Event::Sent(outgoing),
        E::Incoming(_) => Event::Other,
    }
}

/// A SUBACK, either version: its return codes, one per filter in order, become `None` where
/// `granted`, else the code's name (MQTT 5's reason, or 3.1.1's one `Failure`).
fn subscribed<Code: std::fmt::Debug>(
    pkid: u16,
    codes: &[Code],
    granted: fn(&Code) -> bool,
) -> Event {
    Event::Subscribed {
        pkid,
        refusals: codes
            .iter()
            .map(|code| (!granted(code)).then(|| format!("{code:?}")))
            .collect(),
    }
}

fn down_v5(err: rumqttc::v5::ConnectionError) -> Down {
    use rumqttc::v5::mqttbytes::Error;
    use rumqttc::v5::{ConnectionError, StateError};
    let oversized = match &err {
        ConnectionError::MqttState(StateError::Deserialization(
            Error::PayloadSizeLimitExceeded { pkt_size, .. },
        )) => Some(*pkt_size),
        ConnectionError::MqttState(StateError::IncomingPacketTooLarge { pkt_size, .. }) => {
            Some(*pkt_size)
        }
        _ => None,
    };
    Down {
        detail: err.to_string(),
        oversized,
    }
}

fn down_v311(err: rumqttc::ConnectionError) -> Down {
    use rumqttc::{ConnectionError, Error, StateError};
    let oversized = match &err {
        ConnectionError::MqttState(StateError::Deserialization(
            Error::PayloadSizeLimitExceeded(size),
        )) => Some(*size),
        _ => None,
    };
    Down {
        detail: err.to_string(),
        oversized,
    }
}
