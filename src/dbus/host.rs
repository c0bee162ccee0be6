//! A small owner of the engine for the D-Bus service, until the daemon hosts the service: it
//! owns the [`Agent`], feeds it the user's calls, release offers and timer ticks one at a time,
//! and publishes a [`Snapshot`] after each, plus the engine's notices. The daemon can replace
//! it with its own loop (MQTT in, outbox out) and keep `dbus::serve` as it is.
//!
//! Limit: the agent runs a job (a slot write) to its end inside one input, so a call that
//! arrives during a write is answered after it. Progress and state still reach the
//! properties during the write (the observer publishes them as they happen).

use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::agent::{Agent, AgentError, Observer, Stop};
use crate::dbus::{Call, Handle, Snapshot};
use crate::engine::{Answer, Event, Notice, Progress, TxnState};

/// The longest the host sleeps before it looks at the clock again: a gateway's clock may jump
/// (NTP after a boot without RTC), and an extra tick is harmless.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// What the engine's owner is told besides user calls.
#[derive(Debug)]
pub enum Request {
    /// A release arrived (the daemon: from MQTT; `dbus-serve --release` and tests: a file).
    Offer(Vec<u8>),
    /// Look at the time now (a test moved its fake clock).
    Tick,
}

/// The observer of one input, borrowing the host's fields beside its agent.
macro_rules! told {
    ($host:ident, $reply:ident) => {
        Told {
            reply: &mut $reply,
            snapshots: &$host.snapshots,
            notices: &$host.notices,
            last_error: &mut $host.last_error,
        }
    };
}

pub struct Host {
    agent: Agent,
    calls: mpsc::Receiver<Call>,
    requests: mpsc::Receiver<Request>,
    snapshots: watch::Sender<Snapshot>,
    notices: broadcast::Sender<Notice>,
    stops: watch::Sender<Option<Stop>>,
    /// The last failure or refusal seen in an event, newer than the state's last outcome
    /// (a refused release is not a transaction outcome, yet the user must hear of it: 5.7-2).
    last_error: Option<(String, String)>,
}

/// The host's side for its owner: requests in, where the agent stopped out.
pub struct Control {
    pub requests: mpsc::Sender<Request>,
    /// `Some(RebootNeeded)` once the engine asked for a reboot the driver defers.
    pub stops: watch::Receiver<Option<Stop>>,
}

impl Host {
    /// The host, the service's handle and the owner's control. The agent observes its boot when
    /// the host runs, so that what the boot finishes (a commit, a rollback) is signalled.
    pub fn new(agent: Agent) -> (Host, Handle, Control) {
        let (call_tx, calls) = mpsc::channel(16);
        let (request_tx, requests) = mpsc::channel(16);
        let snapshot = Snapshot::of(agent.engine(), agent.config());
        let (snapshots, snapshot_rx) = watch::channel(snapshot);
        let (notices, notice_rx) = broadcast::channel(64);
        let (stops, stop_rx) = watch::channel(None);
        let host = Host {
            agent,
            calls,
            requests,
            snapshots,
            notices,
            stops,
            last_error: None,
        };
        let handle = Handle {
            calls: call_tx,
            snapshots: snapshot_rx,
            notices: notice_rx,
        };
        let control = Control {
            requests: request_tx,
            stops: stop_rx,
        };
        (host, handle, control)
    }

    /// Serves until the owner drops its [`Control`]. An error of the agent (the state cannot be
    /// written, say) stops the host.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut reply = None;
        let stop = self.agent.observe_boot(&mut told!(self, reply)).await?;
        if stop != Stop::Idle {
            self.stops.send_replace(Some(stop));
        }
        self.publish();
        loop {
            let sleep = match self.agent.poll_timeout() {
                Some(at) => {
                    let wait = at.duration_since(self.agent.now());
                    Duration::try_from(wait)
                        .unwrap_or(Duration::ZERO)
                        .min(MAX_SLEEP)
                }
                None => MAX_SLEEP,
            };
            let mut reply = None;
            let stop = tokio::select! {
                call = self.calls.recv() => match call {
                    Some(Call { input, reply: to }) => {
                        reply = Some(to);
                        let mut observer = told!(self, reply);
                        self.agent.handle(input, &mut observer).await?
                    }
                    None => return Ok(()),
                },
                request = self.requests.recv() => match request {
                    Some(Request::Offer(bytes)) => {
                        let mut observer = told!(self, reply);
                        match self.agent.offer_release(&bytes, &mut observer).await? {
                            Ok(stop) => stop,
                            Err(refusal) => {
                                tracing::warn!("release refused: {refusal}");
                                Stop::Idle
                            }
                        }
                    }
                    Some(Request::Tick) => self.tick().await?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(sleep) => self.tick().await?,
            };
            if let Some(reply) = reply {
                // The engine answers every user input; a missing answer would hang the caller.
                let _ = reply.send(Answer::Refused(crate::engine::Failure::new(
                    crate::reason::ReasonCode::NotReady,
                    "the engine gave no answer",
                )));
            }
            if stop != Stop::Idle {
                self.stops.send_replace(Some(stop));
            }
            self.publish();
        }
    }

    async fn tick(&mut self) -> Result<Stop, AgentError> {
        let mut reply = None;
        let mut observer = told!(self, reply);
        self.agent.tick(&mut observer).await
    }

    fn publish(&self) {
        let mut snapshot = Snapshot::of(self.agent.engine(), self.agent.config());
        let writing = snapshot.state == "writing";
        snapshot.progress = if writing {
            self.snapshots.borrow().progress
        } else {
            (0, 0)
        };
        if let Some(error) = &self.last_error {
            snapshot.last_error = error.clone();
        }
        self.snapshots.send_if_modified(|current| {
            let changed = *current != snapshot;
            *current = snapshot;
            changed
        });
    }
}

/// The observer of one input: answers the caller, sends notices, and keeps the properties up
/// to date while a long job runs.
struct Told<'a> {
    reply: &'a mut Option<oneshot::Sender<Answer>>,
    snapshots: &'a watch::Sender<Snapshot>,
    notices: &'a broadcast::Sender<Notice>,
    last_error: &'a mut Option<(String, String)>,
}

impl Observer for Told<'_> {
    fn event(&mut self, event: &Event) {
        tracing::info!(seq = event.seq, state = event.state.as_str(), "event");
        if let Some(reason) = event.reason {
            *self.last_error = Some((
                reason.to_string(),
                event.message.clone().unwrap_or_default(),
            ));
        } else if event.state == TxnState::Committed {
            *self.last_error = None;
        }
        // The phase an event leads into, for the `State` property during a long job.
        let state = match event.state {
            TxnState::Writing => Some("writing"),
            TxnState::Written => Some("activating"),
            TxnState::Rebooting => Some("reboot-pending"),
            _ => None,
        };
        if let Some(state) = state {
            self.snapshots.send_if_modified(|s| {
                let changed = s.state != state;
                s.state = state.to_string();
                changed
            });
        }
    }

    fn progress(&mut self, progress: &Progress) {
        self.snapshots.send_if_modified(|s| {
            let now = (progress.done, progress.total);
            let changed = s.progress != now;
            s.progress = now;
            changed
        });
    }

    fn notice(&mut self, notice: &Notice) {
        // No subscriber (no bus connection yet) is not an error.
        let _ = self.notices.send(notice.clone());
    }

    fn answer(&mut self, answer: &Answer) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(answer.clone());
        }
    }

    fn check(&mut self) {
        tracing::info!("check for releases requested; the release source is the daemon's (MQTT)");
    }
}
