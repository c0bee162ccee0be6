//! The long-lived connection of `update-agent run`.
//!
//! Two tasks. The *driver* only calls rumqttc's `EventLoop::poll` (which must run all the time
//! for keep-alive and acknowledgements, and is not safe to cancel inside `select!`) and hands
//! every event to the *session*. The session owns everything else: it (re-)subscribes on every
//! connection, publishes `online`, the retained state and the outbox's events, matches
//! acknowledgements to outbox records, and passes received releases to the daemon through an
//! [`Inbox`] that keeps only the newest message per release topic — so a flood of messages
//! costs a constant amount of memory.
//!
//! Matching acknowledgements: rumqttc reports `Outgoing::Publish(pkid)` for the requests in the
//! order they were made, so the session keeps that order (`issued`) and learns each packet id.
//! When a connection breaks, the driver waits until the session has forgotten every request of
//! the old connection, then discards whatever rumqttc still holds for it; the outbox sends its
//! records again on the next connection (at least once; the sequence numbers tell duplicates).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, LastWill, Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::backoff::{Backoff, random_unit};
use super::payload;
use super::topics::{ReleaseSource, Topics};
use super::{Endpoint, MqttError};
use crate::logging::message_id;
use crate::outbox::{Key, Outbox};
use crate::release::escape_for_log;

/// Outbox records published and not yet acknowledged, at most.
const WINDOW: usize = 8;
/// rumqttc's request queue; the session never has more than `WINDOW` + 4 requests unprocessed.
const REQUEST_QUEUE: usize = 32;
/// How long the outbox waits after the broker refused one of its publishes (e.g. an ACL).
const REFUSED_PAUSE: Duration = Duration::from_secs(30);

pub struct LinkSettings {
    pub endpoint: Endpoint,
    pub client_id: String,
    pub keepalive: Duration,
    pub topics: Topics,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

/// The connection as the rest of the daemon sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub connected: bool,
    /// Subscribed to both release topics (the broker granted them).
    pub subscribed: bool,
    /// Successful connections so far.
    pub connections: u64,
    /// When the broker last granted the subscription to the release topics, i.e. sent the
    /// retained releases: the device's latest check for updates.
    pub last_check: Option<jiff::Timestamp>,
}

/// Received releases, newest per topic.
#[derive(Default)]
pub struct Inbox {
    latest: Mutex<Vec<(ReleaseSource, Bytes)>>,
    notify: Notify,
}

impl Inbox {
    fn put(&self, source: ReleaseSource, payload: Bytes) {
        let mut latest = self.latest.lock().expect("inbox lock");
        match latest.iter_mut().find(|(s, _)| *s == source) {
            // An unprocessed older message on the same topic is superseded, as a retained
            // message would be.
            Some(slot) => slot.1 = payload,
            None => latest.push((source, payload)),
        }
        drop(latest);
        self.notify.notify_one();
    }

    /// Waits for and takes the releases received since the last call (at most one per topic).
    pub async fn next(&self) -> Vec<(ReleaseSource, Bytes)> {
        loop {
            let taken = std::mem::take(&mut *self.latest.lock().expect("inbox lock"));
            if !taken.is_empty() {
                return taken;
            }
            self.notify.notified().await;
        }
    }
}

/// What the reporter hands to the link: the newest state document, and "the outbox grew".
#[derive(Clone)]
pub struct Publisher {
    state: Arc<watch::Sender<Option<Vec<u8>>>>,
    kick: Arc<Notify>,
}

impl Publisher {
    /// Replaces the retained state; only the newest is published.
    pub fn set_state(&self, json: Vec<u8>) {
        self.state.send_replace(Some(json));
    }

    /// New records are in the outbox.
    pub fn outbox_changed(&self) {
        self.kick.notify_one();
    }
}

enum Control {
    Recheck,
    Shutdown(oneshot::Sender<()>),
}

pub struct Link {
    pub inbox: Arc<Inbox>,
    publisher: Publisher,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<Status>,
    driver: tokio::task::JoinHandle<()>,
    session: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Starts connecting (in the background; failures are retried with back-off, never fatal).
    pub fn start(settings: LinkSettings, outbox: Arc<Mutex<Outbox>>) -> Result<Link, MqttError> {
        let mut options = settings
            .endpoint
            .options(&settings.client_id, settings.keepalive)?;
        options.set_last_will(LastWill::new(
            settings.topics.online.clone(),
            payload::OFFLINE,
            QoS::AtLeastOnce,
            true,
            None,
        ));
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(64);
        let (state_tx, state_rx) = watch::channel(None);
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inbox = Arc::new(Inbox::default());
        let kick = Arc::new(Notify::new());
        let session = Session {
            client,
            broker: settings.endpoint.shown(),
            topics: settings.topics,
            outbox,
            inbox: inbox.clone(),
            status: status_tx,
            backoff: Backoff::new(settings.reconnect_min, settings.reconnect_max),
            started: Instant::now(),
            connected: false,
            ready: false,
            issued: VecDeque::new(),
            awaiting: HashMap::new(),
            in_flight: HashSet::new(),
            paused_until: None,
            closing: None,
            failures_logged: 0,
        };
        let driver = tokio::spawn(drive(eventloop, events_tx));
        let session = tokio::spawn(session.run(events_rx, state_rx, kick.clone(), control_rx));
        Ok(Link {
            inbox,
            publisher: Publisher {
                state: Arc::new(state_tx),
                kick,
            },
            control: control_tx,
            status: status_rx,
            driver,
            session,
        })
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Subscribes again, so the broker sends the retained releases again (the periodic check).
    pub fn recheck(&self) {
        let _ = self.control.send(Control::Recheck);
    }

    /// Says `online=false`, disconnects cleanly (so the last will does not fire) and stops;
    /// gives up after `timeout` when the broker does not answer.
    pub async fn shutdown(self, timeout: Duration) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.control.send(Control::Shutdown(done_tx)).is_ok() {
            let _ = tokio::time::timeout(timeout, done_rx).await;
        }
        self.session.abort();
        self.driver.abort();
    }
}

enum FromLoop {
    // Boxed: an event is large, and the channel holds 64 of them.
    Event(Box<Event>),
    /// The connection failed or broke; the session answers with the delay before the next try,
    /// once it has forgotten the requests of the old connection.
    Down(ConnectionError, oneshot::Sender<Duration>),
}

async fn drive(mut eventloop: EventLoop, to_session: mpsc::Sender<FromLoop>) {
    loop {
        match eventloop.poll().await {
            Ok(event) => {
                if to_session
                    .send(FromLoop::Event(Box::new(event)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(err) => {
                let (delay_tx, delay_rx) = oneshot::channel();
                if to_session
                    .send(FromLoop::Down(err, delay_tx))
                    .await
                    .is_err()
                {
                    return;
                }
                let Ok(delay) = delay_rx.await else {
                    return;
                };
                // Requests the session made for the broken connection: a new connection starts
                // a clean session, and the outbox sends its records again.
                eventloop.clean();
                eventloop.pending.clear();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// A request made through the client, waiting for its packet id or acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Issued {
    Subscribe,
    Online(bool),
    State,
    Record(Key),
    Disconnect,
}

struct Session {
    client: AsyncClient,
    broker: String,
    topics: Topics,
    outbox: Arc<Mutex<Outbox>>,
    inbox: Arc<Inbox>,
    status: watch::Sender<Status>,
    backoff: Backoff,
    started: Instant,
    connected: bool,
    /// Subscribed (granted or not): state, online and events may go out.
    ready: bool,
    /// Requests in the order they were made, until rumqttc reports their packet id.
    issued: VecDeque<Issued>,
    /// Packet id → request, until acknowledged.
    awaiting: HashMap<u16, Issued>,
    /// Outbox records sent on this connection and not yet acknowledged.
    in_flight: HashSet<Key>,
    /// After the broker refused an event, wait before sending events again.
    paused_until: Option<Instant>,
    /// Shutting down: who to tell, and when to give up waiting for the broker.
    closing: Option<(oneshot::Sender<()>, Instant)>,
    /// Connection failures logged since the last success (the first few are warnings).
    failures_logged: u32,
}

impl Session {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<FromLoop>,
        mut state: watch::Receiver<Option<Vec<u8>>>,
        kick: Arc<Notify>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let far = Duration::from_secs(86400 * 365);
        loop {
            let paused = self.paused_until.unwrap_or_else(|| Instant::now() + far);
            let closing_deadline = self
                .closing
                .as_ref()
                .map(|(_, at)| *at)
                .unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                from_loop = events.recv() => match from_loop {
                    Some(FromLoop::Event(event)) => self.on_event(*event, &mut state),
                    Some(FromLoop::Down(err, delay)) => {
                        self.on_down(&err);
                        if self.closing.is_some() {
                            self.finish();
                            return;
                        }
                        let _ = delay.send(self.backoff.next_delay(random_unit()));
                    }
                    None => return,
                },
                changed = state.changed(), if self.ready && self.closing.is_none() => {
                    if changed.is_err() {
                        return;
                    }
                    self.publish_state(&mut state);
                }
                _ = kick.notified(), if self.ready => self.fill_outbox(),
                _ = tokio::time::sleep_until(paused), if self.paused_until.is_some() => {
                    self.paused_until = None;
                    self.fill_outbox();
                }
                command = control.recv() => match command {
                    Some(Control::Recheck) => {
                        if self.ready {
                            self.subscribe();
                        }
                    }
                    Some(Control::Shutdown(done)) => {
                        if !self.connected {
                            let _ = done.send(());
                            return;
                        }
                        self.closing = Some((done, Instant::now() + Duration::from_secs(2)));
                        self.publish(Issued::Online(false), &self.topics.online.clone(), payload::OFFLINE.to_vec(), true);
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(closing_deadline), if self.closing.is_some() => {
                    self.finish();
                    return;
                }
            }
        }
    }

    fn on_event(&mut self, event: Event, state: &mut watch::Receiver<Option<Vec<u8>>>) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.connected = true;
                self.backoff.reset();
                self.failures_logged = 0;
                self.update_status(|s| {
                    s.connected = true;
                    s.connections += 1;
                });
                tracing::info!("connected to {}", self.broker);
                self.subscribe();
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                self.awaiting.remove(&ack.pkid);
                let topics = [&self.topics.fleet_release, &self.topics.device_release];
                let mut granted = true;
                for (code, topic) in ack.return_codes.iter().zip(topics) {
                    if !matches!(code, SubscribeReasonCode::Success(_)) {
                        granted = false;
                        tracing::error!(
                            message_id = message_id::MQTT_REFUSED,
                            "the broker refused the subscription to {topic} ({code:?}); releases sent there will not arrive: check the broker's ACL for this device"
                        );
                    }
                }
                if granted {
                    self.update_status(|s| s.last_check = Some(jiff::Timestamp::now()));
                }
                if !self.ready {
                    self.ready = true;
                    self.update_status(|s| s.subscribed = granted);
                    tracing::info!(
                        since_start_us = self.started.elapsed().as_micros() as u64,
                        "connected and subscribed to {} and {}",
                        self.topics.fleet_release,
                        self.topics.device_release
                    );
                    let online = self.topics.online.clone();
                    self.publish(
                        Issued::Online(true),
                        &online,
                        payload::ONLINE.to_vec(),
                        true,
                    );
                    self.publish_state(state);
                    self.fill_outbox();
                }
            }
            Event::Incoming(Packet::Publish(publish)) => {
                match self.topics.release_source(&publish.topic) {
                    // An empty retained message clears the topic: nothing to look at.
                    Some(source) if !publish.payload.is_empty() => {
                        self.inbox.put(source, publish.payload)
                    }
                    Some(_) => {}
                    None => tracing::debug!(
                        "ignoring a message on {}",
                        escape_for_log(&String::from_utf8_lossy(&publish.topic), 200)
                    ),
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let accepted = matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                );
                match self.awaiting.remove(&ack.pkid) {
                    Some(Issued::Record(key)) => {
                        self.in_flight.remove(&key);
                        if accepted {
                            let acked = self.outbox.lock().expect("outbox lock").ack(key);
                            if let Err(e) = acked {
                                tracing::error!(
                                    message_id = message_id::STORAGE_FAILED,
                                    "cannot remove an acknowledged event from the outbox: {e}"
                                );
                            }
                            self.fill_outbox();
                        } else {
                            tracing::error!(
                                message_id = message_id::MQTT_REFUSED,
                                "the broker refused an event on {} ({:?}); it stays in the outbox, retried in {} s: check the broker's ACL for this device",
                                self.topics.events,
                                ack.reason,
                                REFUSED_PAUSE.as_secs()
                            );
                            self.paused_until = Some(Instant::now() + REFUSED_PAUSE);
                        }
                    }
                    Some(Issued::Online(false)) if self.closing.is_some() => {
                        if self.client.try_disconnect().is_ok() {
                            self.issued.push_back(Issued::Disconnect);
                        } else {
                            self.finish();
                        }
                    }
                    Some(what) if !accepted => tracing::error!(
                        message_id = message_id::MQTT_REFUSED,
                        "the broker refused the {what:?} publish ({:?}): check the broker's ACL for this device",
                        ack.reason
                    ),
                    _ => {}
                }
            }
            Event::Incoming(Packet::Disconnect(disconnect)) => tracing::warn!(
                message_id = message_id::MQTT_CONNECTION,
                "the broker closed the connection: {:?}",
                disconnect.reason_code
            ),
            Event::Outgoing(Outgoing::Publish(pkid) | Outgoing::Subscribe(pkid)) => {
                if let Some(issued) = self.issued.pop_front() {
                    self.awaiting.insert(pkid, issued);
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                self.issued.pop_front();
                if self.closing.is_some() {
                    self.finish();
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                // rumqttc ran out of packet ids and holds the publish back: its packet id will
                // be reported later, out of order. Start over on a fresh connection rather than
                // guess which record it was.
                tracing::warn!("packet id {pkid} still in use; reconnecting to resynchronise");
                self.issued.pop_front();
                if self.client.try_disconnect().is_ok() {
                    self.issued.push_back(Issued::Disconnect);
                }
            }
            _ => {}
        }
    }

    fn on_down(&mut self, err: &ConnectionError) {
        let was_connected = self.connected;
        self.connected = false;
        self.ready = false;
        self.issued.clear();
        self.awaiting.clear();
        self.in_flight.clear();
        self.update_status(|s| {
            s.connected = false;
            s.subscribed = false;
        });
        if self.closing.is_some() {
            return;
        }
        let detail = escape_for_log(&err.to_string(), 300);
        if was_connected {
            tracing::warn!(
                message_id = message_id::MQTT_CONNECTION,
                "lost the connection to {}: {detail}; reconnecting",
                self.broker
            );
        } else if self.failures_logged < 3 {
            tracing::warn!(
                message_id = message_id::MQTT_CONNECTION,
                "cannot connect to {}: {detail}; retrying with back-off",
                self.broker
            );
        } else {
            tracing::debug!("cannot connect to {}: {detail}", self.broker);
        }
        self.failures_logged += 1;
    }

    fn subscribe(&mut self) {
        let filters = [&self.topics.fleet_release, &self.topics.device_release]
            .map(|topic| Filter::new(topic.clone(), QoS::AtLeastOnce));
        match self.client.try_subscribe_many(filters) {
            Ok(()) => self.issued.push_back(Issued::Subscribe),
            Err(e) => tracing::warn!("cannot queue the subscription: {e}"),
        }
    }

    fn publish(&mut self, what: Issued, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.issued.push_back(what);
                true
            }
            Err(e) => {
                tracing::warn!("cannot queue a publish to {topic}: {e}");
                false
            }
        }
    }

    fn publish_state(&mut self, state: &mut watch::Receiver<Option<Vec<u8>>>) {
        let json = state.borrow_and_update().clone();
        if let Some(json) = json {
            let topic = self.topics.state.clone();
            self.publish(Issued::State, &topic, json, true);
        }
    }

    fn fill_outbox(&mut self) {
        if !self.ready || self.paused_until.is_some() || self.closing.is_some() {
            return;
        }
        let room = WINDOW.saturating_sub(self.in_flight.len());
        if room == 0 {
            return;
        }
        let batch: Vec<(Key, Vec<u8>)> = {
            let outbox = self.outbox.lock().expect("outbox lock");
            outbox
                .pending()
                .filter(|(key, _)| !self.in_flight.contains(key))
                .take(room)
                .collect()
        };
        let topic = self.topics.events.clone();
        for (key, bytes) in batch {
            if !self.publish(Issued::Record(key), &topic, bytes, false) {
                break;
            }
            self.in_flight.insert(key);
        }
    }

    fn update_status(&self, change: impl FnOnce(&mut Status)) {
        self.status.send_modify(|status| {
            change(status);
            status.connected = self.connected;
        });
    }

    fn finish(&mut self) {
        if let Some((done, _)) = self.closing.take() {
            let _ = done.send(());
        }
    }
}
