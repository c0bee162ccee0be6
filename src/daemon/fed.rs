//! The daemon's loop without a broker: the owner of a [`Control`] offers releases and hears
//! where the agent stopped (the hidden `update-agent dbus-serve`, for trying the D-Bus service
//! by hand; the tests, which host the service in-process on a fake clock). Nothing reaches the
//! operators; the engine's reboot request is told back on the control, never run here (the
//! agent runs it itself in [`crate::agent::RebootMode::Run`]).

use tokio::sync::{mpsc, watch};

use super::{Core, Daemon, DaemonError, MAX_POLICY_SLEEP, Operators, UserSide};
use crate::agent::{Agent, Installs, Stop};

/// Requests waiting for the loop before the owner waits.
const REQUEST_QUEUE: usize = 16;

/// What the owner tells the loop besides the user's calls.
#[derive(Debug)]
pub enum Request {
    /// A release arrived (`dbus-serve --release`, and tests: a file).
    Offer(Vec<u8>),
    /// Look at the time now (a test moved its fake clock).
    #[cfg(feature = "test-hooks")]
    Tick,
}

/// The owner's side: requests in, where the agent stopped out. Dropping it ends the loop.
pub struct Control {
    pub requests: mpsc::Sender<Request>,
    /// `Some(RebootNeeded)` once the engine asked for a reboot the agent defers.
    pub stops: watch::Receiver<Option<Stop>>,
    /// The properties as the service shows them (tests wait for a state).
    #[cfg(feature = "test-hooks")]
    pub snapshots: watch::Receiver<crate::dbus::Snapshot>,
}

/// The loop's operators' source when fed: the owner's requests, and the watch it reads where
/// the agent stopped from.
pub(super) struct Owner {
    requests: mpsc::Receiver<Request>,
    stops: watch::Sender<Option<Stop>>,
}

/// The daemon's loop, fed by the owner of its [`Control`].
pub struct Fed(Daemon<'static>);

impl Fed {
    /// Serves the D-Bus service for `agent` on `connection` (the name taken once this returns);
    /// the loop runs with [`Fed::run`]. What the boot finishes (a commit, a rollback) is
    /// signalled then.
    pub async fn start(
        agent: Agent,
        connection: &zbus::Connection,
    ) -> zbus::Result<(Fed, Control)> {
        let conformance = crate::conformance::summary_at_start(agent.config());
        let user = UserSide::serve(connection.clone(), &agent, &conformance).await?;
        let (request_tx, requests) = mpsc::channel(REQUEST_QUEUE);
        let (stops, stop_rx) = watch::channel(None);
        let control = Control {
            requests: request_tx,
            stops: stop_rx,
            #[cfg(feature = "test-hooks")]
            snapshots: user.feed.snapshots(),
        };
        let daemon = Daemon {
            core: Core {
                agent,
                user: Some(user),
                check_asked: false,
            },
            operators: Operators::Fed(Owner { requests, stops }),
            longest_sleep: MAX_POLICY_SLEEP,
        };
        Ok((Fed(daemon), control))
    }

    /// Serves until the owner drops its [`Control`]. An error of the agent (the state cannot
    /// be written, say) ends the loop.
    pub async fn run(mut self) -> Result<(), DaemonError> {
        self.0.serve().await
    }
}

impl Owner {
    /// The owner's next request; `None` once it let go of its control.
    pub(super) async fn next(&mut self) -> Option<Request> {
        self.requests.recv().await
    }

    pub(super) async fn act(
        &mut self,
        core: &mut Core,
        request: Request,
    ) -> Result<(), DaemonError> {
        let (agent, mut audience) = core.audience(None);
        let stop = match request {
            Request::Offer(bytes) => match agent
                .accept_release(&bytes, Installs::AsThePolicyAllows, &mut audience)
                .await?
            {
                Ok(stop) => stop,
                Err(refusal) => {
                    tracing::warn!("release refused: {refusal}");
                    Stop::Idle
                }
            },
            #[cfg(feature = "test-hooks")]
            Request::Tick => agent.tick(&mut audience).await?,
        };
        self.refresh(core);
        self.stopped(stop);
        Ok(())
    }

    /// After each input: the whole state to the service. There is no broker to ask when the
    /// user asks for a check.
    pub(super) fn refresh(&mut self, core: &mut Core) {
        if core.publish() {
            tracing::info!("check for releases asked for over D-Bus: no broker to ask");
        }
    }

    /// Tells the owner where the agent stopped, unless idle.
    pub(super) fn stopped(&self, stop: Stop) {
        if stop != Stop::Idle {
            tracing::info!("the agent stopped: {stop}");
            self.stops.send_replace(Some(stop));
        }
    }
}
