//! Short-lived connections for the operator tools: publish one retained message and wait for
//! the broker's acknowledgement (`release publish`), or watch the devices' topics (`monitor`).

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};

use super::topics::monitor;
use super::{Endpoint, MqttError};

/// A client id for a tool run: the tool's name and a random suffix, so two runs never collide.
pub fn tool_client_id(tool: &str) -> String {
    format!(
        "{tool}-{:08x}",
        (super::backoff::random_unit() * f64::from(u32::MAX)) as u32
    )
}

/// Publishes `payload` retained at QoS 1 and returns once the broker acknowledged it.
/// An empty payload clears the retained message.
pub async fn publish_retained(
    endpoint: &Endpoint,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), MqttError> {
    let options = endpoint.options(
        &tool_client_id("update-agent-publish"),
        Duration::from_secs(30),
    )?;
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .map_err(|e| MqttError::Connect {
            url: endpoint.shown(),
            detail: e.to_string(),
        })?;
    let acked = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    return match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                        reason => Err(MqttError::Refused {
                            what: format!("the publish to {topic}"),
                            reason: format!("{reason:?}"),
                        }),
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(MqttError::Connect {
                        url: endpoint.shown(),
                        detail: e.to_string(),
                    });
                }
            }
        }
    })
    .await
    .map_err(|_| MqttError::Timeout {
        url: endpoint.shown(),
        seconds: timeout.as_secs(),
    })?;
    acked?;
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out, so the broker does not log a dropped connection.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// One message seen by [`Watcher`].
#[derive(Debug, Clone)]
pub struct Seen {
    pub device: String,
    /// `state`, `online` or `events`.
    pub leaf: String,
    pub payload: Bytes,
}

/// Watches every device's `state`, `online` and `events` under a prefix.
pub struct Watcher {
    prefix: String,
    eventloop: EventLoop,
    client: AsyncClient,
}

impl Watcher {
    pub fn new(endpoint: &Endpoint, prefix: &str) -> Result<Watcher, MqttError> {
        let options = endpoint.options(
            &tool_client_id("update-agent-monitor"),
            Duration::from_secs(30),
        )?;
        let (client, eventloop) = AsyncClient::new(options, 8);
        Ok(Watcher {
            prefix: prefix.to_string(),
            eventloop,
            client,
        })
    }

    /// The next message, or an error when the connection failed (call again to reconnect; the
    /// subscription is made on every connection).
    /// `Ok(None)` means the subscription was granted: retained messages follow at once.
    pub async fn next(&mut self) -> Result<Option<Seen>, MqttError> {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let topic = String::from_utf8_lossy(&publish.topic);
                    if let Some((device, leaf)) = monitor::parse(&self.prefix, &topic) {
                        return Ok(Some(Seen {
                            device: device.to_string(),
                            leaf: leaf.to_string(),
                            payload: publish.payload,
                        }));
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let filters =
                        monitor::filters(&self.prefix).map(|f| Filter::new(f, QoS::AtLeastOnce));
                    self.client
                        .try_subscribe_many(filters)
                        .map_err(|e| MqttError::Connect {
                            url: format!("{:?}", self.eventloop.options.broker_address()),
                            detail: e.to_string(),
                        })?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if let Some(code) = ack
                        .return_codes
                        .iter()
                        .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    {
                        return Err(MqttError::Refused {
                            what: "the subscription".into(),
                            reason: format!("{code:?}"),
                        });
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(MqttError::Connect {
                        url: format!("{:?}", self.eventloop.options.broker_address()),
                        detail: e.to_string(),
                    });
                }
            }
        }
    }
}
