//! Short-lived connections for the operator tools: publish one retained message and wait for
//! the broker's acknowledgement (`release publish`, `rollout start|halt`), or watch the
//! devices' topics (`monitor`, `rollout`).

use std::time::Duration;

use bytes::Bytes;

use super::client::{self, Client, Event, EventLoop};
use super::topics::monitor;
use super::{Endpoint, MqttError};

/// A client id for a tool run: the tool's name and a random suffix, so two runs never collide.
pub fn tool_client_id(tool: &str) -> String {
    format!(
        "{tool}-{:08x}",
        (super::backoff::random_unit() * f64::from(u32::MAX)) as u32
    )
}

/// A tool's connection: its own client id, a small request queue (a tool's messages arrive on
/// the event loop).
fn tool_client(endpoint: &Endpoint, tool: &str) -> Result<(Client, EventLoop), MqttError> {
    client::new(
        endpoint,
        &tool_client_id(tool),
        Duration::from_secs(30),
        None,
        8,
    )
}

fn connect_failed(endpoint: &Endpoint, detail: String) -> MqttError {
    MqttError::Connect {
        url: endpoint.shown(),
        detail,
    }
}

/// Publishes `payload` retained at QoS 1 and returns once the broker acknowledged it.
/// An empty payload clears the retained message.
pub async fn publish_retained(
    endpoint: &Endpoint,
    topic: &str,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<(), MqttError> {
    let (client, mut eventloop) = tool_client(endpoint, "update-agent-publish")?;
    let failed = |detail| connect_failed(endpoint, detail);
    client.publish(topic, payload, true).await.map_err(failed)?;
    let acked = tokio::time::timeout(timeout, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Acked { refusal: None, .. }) => return Ok(()),
                Ok(Event::Acked {
                    refusal: Some(reason),
                    ..
                }) => {
                    return Err(MqttError::Refused {
                        what: format!("the publish to {topic}"),
                        reason,
                    });
                }
                Ok(_) => {}
                Err(down) => return Err(failed(down.detail)),
            }
        }
    })
    .await
    .map_err(|_| MqttError::Timeout {
        url: endpoint.shown(),
        seconds: timeout.as_secs(),
    })?;
    acked?;
    disconnect(&client, &mut eventloop, Duration::from_millis(500)).await;
    Ok(())
}

/// Disconnects, letting the DISCONNECT go out for up to `linger`, so the broker does not log a
/// dropped connection.
async fn disconnect(client: &Client, eventloop: &mut EventLoop, linger: Duration) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(linger, async { while eventloop.poll().await.is_ok() {} }).await;
}

/// One message seen by [`Watcher`].
#[derive(Debug, Clone)]
pub struct Seen {
    pub device: String,
    /// `state`, `online` or `events`.
    pub leaf: String,
    pub payload: Bytes,
    /// From the broker's retained store (sent because of the subscription), not live.
    pub retained: bool,
}

/// See [`Watcher::resubscriber`].
pub struct Resubscriber {
    client: Client,
    filters: Vec<String>,
}

impl Resubscriber {
    /// Queues the subscription again; false when the request queue is full or closed.
    pub fn resubscribe(&self) -> bool {
        self.client.try_subscribe(&self.filters).is_ok()
    }
}

/// Watches every device's `state`, `online` and `events` under a prefix.
pub struct Watcher {
    prefix: String,
    broker: String,
    eventloop: EventLoop,
    client: Client,
}

impl Watcher {
    pub fn new(endpoint: &Endpoint, prefix: &str) -> Result<Watcher, MqttError> {
        // The queue holds the subscription only; a fleet's messages arrive on the event loop.
        let (client, eventloop) = tool_client(endpoint, "update-agent-monitor")?;
        Ok(Watcher {
            prefix: prefix.to_string(),
            broker: endpoint.shown(),
            eventloop,
            client,
        })
    }

    /// The broker this watcher is connected to, as shown to people.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// A handle that subscribes again from another task (`next` must not be cancelled, so it
    /// cannot be raced against a timer): the broker then sends every retained `state` and
    /// `online` again — how a follower recovers what a broker dropped while it was behind.
    pub fn resubscriber(&self) -> Resubscriber {
        Resubscriber {
            client: self.client.clone(),
            filters: monitor::filters(&self.prefix).to_vec(),
        }
    }

    /// The next message, or an error when the connection failed (call again to reconnect; the
    /// subscription is made on every connection).
    /// `Ok(None)` means the subscription was granted: retained messages follow at once.
    pub async fn next(&mut self) -> Result<Option<Seen>, MqttError> {
        loop {
            let failed = |detail: String| MqttError::Connect {
                url: self.broker.clone(),
                detail,
            };
            match self.eventloop.poll().await {
                Ok(Event::Message {
                    topic,
                    payload,
                    retained,
                }) => {
                    let topic = String::from_utf8_lossy(&topic);
                    if let Some((device, leaf)) = monitor::parse(&self.prefix, &topic) {
                        return Ok(Some(Seen {
                            device: device.to_string(),
                            leaf: leaf.to_string(),
                            payload,
                            retained,
                        }));
                    }
                }
                Ok(Event::Connected) => {
                    self.client
                        .try_subscribe(&monitor::filters(&self.prefix))
                        .map_err(failed)?;
                }
                Ok(Event::Subscribed { refusals, .. }) => {
                    if let Some(code) = refusals.into_iter().flatten().next() {
                        return Err(MqttError::Refused {
                            what: "the subscription".into(),
                            reason: code,
                        });
                    }
                    return Ok(None);
                }
                Ok(_) => {}
                Err(down) => return Err(failed(down.detail)),
            }
        }
    }
}

/// The retained message on `topic`, if any: subscribes, and takes what arrives within `quiet`
/// after the broker granted the subscription (a retained message comes at once).
pub async fn read_retained(
    endpoint: &Endpoint,
    topic: &str,
    quiet: Duration,
    timeout: Duration,
) -> Result<Option<Bytes>, MqttError> {
    let (client, mut eventloop) = tool_client(endpoint, "update-agent-read")?;
    let failed = |detail| connect_failed(endpoint, detail);
    let read = async {
        loop {
            match eventloop.poll().await.map_err(|d| failed(d.detail))? {
                Event::Connected => client.try_subscribe(&[topic.to_string()]).map_err(failed)?,
                Event::Subscribed { refusals, .. } => {
                    if let Some(reason) = refusals.into_iter().flatten().next() {
                        return Err(MqttError::Refused {
                            what: format!("the subscription to {topic}"),
                            reason,
                        });
                    }
                    break;
                }
                _ => {}
            }
        }
        let message = tokio::time::timeout(quiet, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Message {
                        topic: t, payload, ..
                    }) if t == topic.as_bytes() => {
                        return Ok(payload);
                    }
                    Ok(_) => {}
                    Err(down) => return Err(failed(down.detail)),
                }
            }
        })
        .await;
        match message {
            Ok(Ok(payload)) if !payload.is_empty() => Ok(Some(payload)),
            Ok(Ok(_)) | Err(_) => Ok(None),
            Ok(Err(e)) => Err(e),
        }
    };
    let result = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| MqttError::Timeout {
            url: endpoint.shown(),
            seconds: timeout.as_secs(),
        })?;
    disconnect(&client, &mut eventloop, Duration::from_millis(200)).await;
    result
}
