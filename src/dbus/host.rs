//! A small owner of the engine for the D-Bus service without MQTT: the tests host it in-process
//! on a fake clock, and the hidden `update-agent dbus-serve` hosts it for trying the service by
//! hand without a broker. It owns the [`Agent`], feeds it the user's calls, release offers and
//! timer ticks one at a time, and tells the service through a [`Feed`], as the daemon does.
//!
//! The agent runs a job (a slot write) to its end inside one input; a call that arrives
//! during a write is taken between two of its steps (`Observer::interjection`) and answered
//! then. Other jobs (bootloader, health checks) are short and are waited for.

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::agent::{Agent, AgentError, Stop};
use crate::dbus::Handle;
use crate::dbus::feed::Feed;

/// The longest the host sleeps before it looks at the clock again: a gateway's clock may jump
/// (NTP after a boot without RTC), and an extra tick is harmless.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// What the engine's owner is told besides user calls.
#[derive(Debug)]
pub enum Request {
    /// A release arrived (`dbus-serve --release` and tests: a file).
    Offer(Vec<u8>),
    /// Look at the time now (a test moved its fake clock).
    Tick,
}

pub struct Host {
    agent: Agent,
    feed: Feed,
    requests: mpsc::Receiver<Request>,
    stops: watch::Sender<Option<Stop>>,
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
        let (mut feed, handle) = Feed::new(agent.engine(), agent.config());
        feed.set_conformance(&crate::conformance::summary_at_start(agent.config()));
        let (request_tx, requests) = mpsc::channel(16);
        let (stops, stop_rx) = watch::channel(None);
        let host = Host {
            agent,
            feed,
            requests,
            stops,
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
        let stop = self.agent.observe_boot(&mut self.feed).await?;
        self.after(stop);
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
            let stop = tokio::select! {
                input = self.feed.next_call() => self.agent.handle(input, &mut self.feed).await?,
                request = self.requests.recv() => match request {
                    Some(Request::Offer(bytes)) => {
                        match self.agent.offer_release(&bytes, &mut self.feed).await? {
                            Ok(stop) => stop,
                            Err(refusal) => {
                                tracing::warn!("release refused: {refusal}");
                                Stop::Idle
                            }
                        }
                    }
                    Some(Request::Tick) => self.agent.tick(&mut self.feed).await?,
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(sleep) => self.agent.tick(&mut self.feed).await?,
            };
            self.after(stop);
        }
    }

    fn after(&mut self, stop: Stop) {
        if stop != Stop::Idle {
            self.stops.send_replace(Some(stop));
        }
        self.feed.publish(self.agent.engine(), self.agent.config());
    }
}
