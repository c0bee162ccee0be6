//! Following a fleet from one or more brokers at once (`monitor`, `rollout`): one watcher per
//! broker, their messages merged into one channel. Every [`RESYNC`] each watcher subscribes
//! again, so the brokers send the retained state again: a broker drops live messages for a
//! subscriber that falls behind (mosquitto: beyond `max_queued_messages`, 1,000 by default),
//! and the view then still converges on where every device is (what was lost is counted as
//! missing by `seq`). Several brokers are the nodes of a cluster
//! whose retained messages are node-local (RabbitMQ): each node holds the retained state of
//! the devices connected to it, and a live message reaches a watcher once per node it is
//! subscribed at (the fleet view tells repeats by `seq`).

use std::time::Duration;

use tokio::sync::mpsc;
use update_agent::fleet::FleetView;
use update_agent::mqtt::Endpoint;
use update_agent::mqtt::oneshot::{Seen, Watcher};

/// What a watcher heard from the fleet, into `view`, as of now.
pub fn observe(view: &mut FleetView, seen: &Seen) {
    let now = jiff::Timestamp::now();
    view.observe_as(&seen.device, &seen.leaf, &seen.payload, seen.retained, now);
}

/// How often the retained state is read again.
pub const RESYNC: Duration = Duration::from_secs(30);

/// What a watcher heard.
pub enum Heard {
    /// The subscription at broker `index` was granted: its retained messages follow.
    Subscribed(usize),
    Message(Seen),
    /// The connection to a broker failed; it is retried every second.
    Trouble(String),
}

/// Starts one watcher per endpoint (on the current runtime) and returns their merged messages.
/// Messages from a broker wait when the channel is full, so a slow reader slows the brokers'
/// deliveries (TCP back-pressure) instead of growing a queue here.
pub fn follow(endpoints: &[Endpoint], prefix: &str) -> anyhow::Result<mpsc::Receiver<Heard>> {
    let (tx, rx) = mpsc::channel(4096);
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut watcher = Watcher::new(endpoint, prefix)?;
        let resubscriber = watcher.resubscriber();
        let resync = tx.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(RESYNC);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if resync.is_closed() {
                    return;
                }
                resubscriber.resubscribe();
            }
        });
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let heard = match watcher.next().await {
                    Ok(None) => Heard::Subscribed(index),
                    Ok(Some(seen)) => Heard::Message(seen),
                    Err(e) => {
                        let trouble =
                            Heard::Trouble(format!("{}: {e}; reconnecting", watcher.broker()));
                        if tx.send(trouble).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if tx.send(heard).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}
