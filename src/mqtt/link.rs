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
//!
//! An oversized packet from the broker (only a 3.1.1 broker without a limit of its own sends
//! one: MQTT 5 brokers know the agent's maximum) makes rumqttc close the connection. When it
//! is a retained message it arrives again after every reconnect, so the next try waits the
//! longest back-off (`reconnect_max`) instead of the shortest: the device stays reachable at
//! that interval (when an operator replaces the message, it recovers) without hammering the
//! broker, and says why in the journal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::backoff::{Backoff, random_unit};
use super::client::{self, Client, Down, Event, EventLoop, Will};
use super::payload;
use super::topics::{ReleaseSource, Topics};
use super::{Endpoint, MAX_PACKET_SIZE, MqttError};
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
    /// Connections the broker broke by sending a packet over the size bound (3.1.1 only).
    pub oversized: u64,
    /// When the broker last granted the subscription to the release topics, i.e. sent the
    /// retained releases: the device's latest check for updates.
    pub last_check: Option<jiff::Timestamp>,
}

/// A message on a release topic: a release, or empty (the retained release was cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub source: ReleaseSource,
    pub payload: Bytes,
    /// The number of the subscription it came after (see `Inbox::checked`).
    pub check: u64,
}

#[derive(Default)]
struct Unread {
    messages: Vec<Received>,
    /// Subscriptions sent so far: after each, the broker sends what the topics retain.
    checks: u64,
    /// `checks` as the daemon last took it.
    checks_taken: u64,
}

/// Received release-topic messages, newest per topic, in order with the subscriptions (a
/// message tagged with a subscription arrived after it was sent), so the daemon can tell which
/// topics answered a check with a retained message and which stayed empty.
#[derive(Default)]
pub struct Inbox {
    unread: Mutex<Unread>,
    notify: Notify,
}

impl Inbox {
    fn put(&self, source: ReleaseSource, payload: Bytes) {
        let mut unread = self.unread.lock().expect("inbox lock");
        let check = unread.checks;
        let message = Received {
            source,
            payload,
            check,
        };
        match unread.messages.iter_mut().find(|m| m.source == source) {
            // An unprocessed older message on the same topic is superseded, as a retained
            // message would be.
            Some(slot) => *slot = message,
            None => unread.messages.push(message),
        }
        drop(unread);
        self.notify.notify_one();
    }

    /// The subscription to the release topics is sent: what they retain follows.
    fn checked(&self) {
        self.unread.lock().expect("inbox lock").checks += 1;
        self.notify.notify_one();
    }

    /// Whether messages wait to be taken.
    pub fn has_unread(&self) -> bool {
        !self.unread.lock().expect("inbox lock").messages.is_empty()
    }

    /// Waits for and takes the messages received since the last call (at most one per topic),
    /// with the number of the latest subscription; also returns (maybe without messages) when
    /// a new one was sent.
    pub async fn next(&self) -> (u64, Vec<Received>) {
        loop {
            {
                let mut unread = self.unread.lock().expect("inbox lock");
                if !unread.messages.is_empty() || unread.checks != unread.checks_taken {
                    unread.checks_taken = unread.checks;
                    return (unread.checks, std::mem::take(&mut unread.messages));
                }
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
        let will = Will {
            topic: settings.topics.online.clone(),
            payload: Bytes::from_static(payload::OFFLINE),
        };
        let (client, eventloop) = client::new(
            &settings.endpoint,
            &settings.client_id,
            settings.keepalive,
            Some(will),
            REQUEST_QUEUE,
        )?;
        let protocol = settings.endpoint.protocol.as_str();
        let (events_tx, events_rx) = mpsc::channel(64);
        let (state_tx, state_rx) = watch::channel(None);
        let (status_tx, status_rx) = watch::channel(Status::default());
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let inbox = Arc::new(Inbox::default());
        let kick = Arc::new(Notify::new());
        let session = Session {
            client,
            broker: settings.endpoint.shown(),
            protocol,
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
    Down(Down, oneshot::Sender<Duration>),
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
                eventloop.forget_requests();
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
    client: Client,
    broker: String,
    /// "5" or "3.1.1", for the log.
    protocol: &'static str,
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
                    Some(FromLoop::Down(down, delay)) => {
                        self.on_down(&down);
                        if self.closing.is_some() {
                            self.finish();
                            return;
                        }
                        let wait = if down.oversized.is_some() {
                            self.backoff.longest(random_unit())
                        } else {
                            self.backoff.next_delay(random_unit())
                        };
                        let _ = delay.send(wait);
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
            Event::Connected => {
                self.connected = true;
                self.backoff.reset();
                self.failures_logged = 0;
                self.update_status(|s| {
                    s.connected = true;
                    s.connections += 1;
                });
                tracing::info!("connected to {} (MQTT {})", self.broker, self.protocol);
                self.subscribe();
            }
            Event::Subscribed { pkid, refusals } => {
                self.awaiting.remove(&pkid);
                let topics = [&self.topics.fleet_release, &self.topics.device_release];
                let mut granted = true;
                for (refusal, topic) in refusals.iter().zip(topics) {
                    if let Some(code) = refusal {
                        granted = false;
                        tracing::error!(
                            message_id = message_id::MQTT_REFUSED,
                            "the broker refused the subscription to {topic} ({code}); releases sent there will not arrive: check the broker's ACL for this device"
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
            Event::Message { topic, payload, .. } => {
                match self.topics.release_source(&topic) {
                    // An empty message too: it cleared the retained release (a halt).
                    Some(source) => self.inbox.put(source, payload),
                    None => tracing::debug!(
                        "ignoring a message on {}",
                        escape_for_log(&String::from_utf8_lossy(&topic), 200)
                    ),
                }
            }
            Event::Acked { pkid, refusal } => {
                let accepted = refusal.is_none();
                match self.awaiting.remove(&pkid) {
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
                                "the broker refused an event on {} ({}); it stays in the outbox, retried in {} s: check the broker's ACL for this device",
                                self.topics.events,
                                refusal.unwrap_or_default(),
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
                        "the broker refused the {what:?} publish ({}): check the broker's ACL for this device",
                        refusal.unwrap_or_default()
                    ),
                    _ => {}
                }
            }
            Event::ClosedByBroker { reason } => tracing::warn!(
                message_id = message_id::MQTT_CONNECTION,
                "the broker closed the connection: {reason}"
            ),
            Event::Sent(Outgoing::Publish(pkid) | Outgoing::Subscribe(pkid)) => {
                if let Some(issued) = self.issued.pop_front() {
                    self.awaiting.insert(pkid, issued);
                }
            }
            Event::Sent(Outgoing::Disconnect) => {
                self.issued.pop_front();
                if self.closing.is_some() {
                    self.finish();
                }
            }
            Event::Sent(Outgoing::AwaitAck(pkid)) => {
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

    fn on_down(&mut self, down: &Down) {
        let was_connected = self.connected;
        self.connected = false;
        self.ready = false;
        self.issued.clear();
        self.awaiting.clear();
        self.in_flight.clear();
        self.update_status(|s| {
            s.connected = false;
            s.subscribed = false;
            s.oversized += u64::from(down.oversized.is_some());
        });
        if self.closing.is_some() {
            return;
        }
        let detail = escape_for_log(&down.detail, 300);
        if let Some(size) = down.oversized {
            tracing::error!(
                message_id = message_id::MQTT_CONNECTION,
                "the broker {} sent a packet of {size} bytes, more than the {MAX_PACKET_SIZE} this \
                 agent takes: the connection is closed, and tried again only after the longest \
                 back-off. With MQTT 3.1.1 the broker must refuse such messages itself (mosquitto: \
                 max_packet_size 131072); a retained release this large must be replaced",
                self.broker
            );
        } else if was_connected {
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
        let filters = [
            self.topics.fleet_release.clone(),
            self.topics.device_release.clone(),
        ];
        match self.client.try_subscribe(&filters) {
            Ok(()) => {
                self.issued.push_back(Issued::Subscribe);
                // What the topics retain comes from here on (some brokers send it before the
                // grant, some after).
                self.inbox.checked();
            }
            Err(e) => tracing::warn!("cannot queue the subscription: {e}"),
        }
    }

    fn publish(&mut self, what: Issued, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
        match self.client.try_publish(topic, payload, retain) {
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
