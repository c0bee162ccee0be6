//! What the engine's owner (the daemon's loop, with a broker or without) feeds the service: the
//! one place that turns the driver's output into D-Bus updates. As an [`Observer`] it answers the
//! caller of the input being handled, sends notices (signals) and keeps the properties current
//! during a long job; [`Feed::publish`] takes the whole snapshot after each input.

use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::agent::{Observer, Output};
use crate::config::Config;
use crate::dbus::{Call, Handle, Snapshot};
use crate::engine::{
    Answer, Engine, Event, EventKind, Failure, Input, Notice, PersistentState, Progress,
};
use crate::reason::ReasonCode;

/// User calls waiting for the engine's owner before the service makes callers wait.
const CALL_QUEUE: usize = 16;
/// Notices waiting for the bus before the oldest are dropped (and said to be).
const NOTICE_QUEUE: usize = 64;

pub struct Feed {
    snapshots: watch::Sender<Snapshot>,
    notices: broadcast::Sender<Notice>,
    calls: mpsc::Receiver<Call>,
    /// How many notices the service has put on the bus (see [`Handle::sent`]).
    sent: watch::Receiver<u64>,
    queued: u64,
    /// The caller of the input being handled.
    reply: Option<oneshot::Sender<Answer>>,
    /// The last failure or refusal seen in an event, newer than the state's last outcome
    /// (a refused release is not a transaction outcome, yet the user must hear of it: 5.7-2).
    last_error: Option<(String, String)>,
    /// The `Conformance` property, as the owner assessed it at start.
    conformance: (String, String),
}

impl Feed {
    /// The feed and the service's handle (for `dbus::serve`).
    pub fn new(engine: &Engine, config: &Config) -> (Feed, Handle) {
        let (call_tx, calls) = mpsc::channel(CALL_QUEUE);
        let (snapshots, snapshot_rx) = watch::channel(Snapshot::of(engine, config));
        let (notices, notice_rx) = broadcast::channel(NOTICE_QUEUE);
        let (sent_tx, sent) = watch::channel(0);
        let feed = Feed {
            snapshots,
            notices,
            calls,
            sent,
            queued: 0,
            reply: None,
            last_error: None,
            conformance: Default::default(),
        };
        let handle = Handle {
            calls: call_tx,
            snapshots: snapshot_rx,
            notices: notice_rx,
            sent: sent_tx,
        };
        (feed, handle)
    }

    /// The next user call, as the input to hand to the driver; its answer goes to its caller
    /// while the input is handled. Never completes once the service is gone.
    pub async fn next_call(&mut self) -> Input {
        match self.calls.recv().await {
            Some(call) => self.take(call),
            None => std::future::pending().await,
        }
    }

    fn take(&mut self, call: Call) -> Input {
        self.reply = Some(call.reply);
        call.input
    }

    /// The properties after an input. A caller the engine did not answer is told so, not left
    /// waiting (the engine answers every user input; this is a guard).
    pub fn publish(&mut self, engine: &Engine, config: &Config) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Answer::Refused(Failure::new(
                ReasonCode::NotReady,
                "the engine gave no answer",
            )));
        }
        let mut snapshot = Snapshot::of(engine, config);
        // Progress comes from the job, not the engine's state: kept while writing.
        (snapshot.progress, snapshot.downloaded) = if snapshot.state == "writing" {
            let last = self.snapshots.borrow();
            (last.progress, last.downloaded)
        } else {
            ((0, 0), 0)
        };
        if let Some(error) = &self.last_error {
            snapshot.last_error = error.clone();
        }
        snapshot.conformance = self.conformance.clone();
        self.snapshots.send_if_modified(|current| {
            let changed = *current != snapshot;
            *current = snapshot;
            changed
        });
    }

    /// Sets the `Conformance` property (kept in every later snapshot).
    pub fn set_conformance(&mut self, summary: &crate::mqtt::payload::ConformanceSummary) {
        self.conformance = (summary.text(), summary.findings.join(" "));
        let conformance = self.conformance.clone();
        self.snapshots.send_if_modified(|s| {
            let changed = s.conformance != conformance;
            s.conformance = conformance;
            changed
        });
    }

    /// Waits (at most `limit`) until the service has put every notice on the bus: the user is
    /// told of a reboot before the reboot command runs.
    pub async fn flushed(&mut self, limit: Duration) {
        let queued = self.queued;
        let sent = tokio::time::timeout(limit, self.sent.wait_for(|sent| *sent >= queued)).await;
        if sent.is_err() {
            tracing::warn!("D-Bus signals not all sent after {limit:?}; going on");
        }
    }

    /// What the properties show now (tests, and the owner's own checks).
    pub fn snapshots(&self) -> watch::Receiver<Snapshot> {
        self.snapshots.subscribe()
    }
}

/// The user's view: properties (state, progress, choices, last error), notices as signals, the
/// answer to the caller waiting for it.
impl Observer for Feed {
    fn observe(&mut self, output: Output<'_>) {
        match output {
            Output::Event(event) => self.event(event),
            Output::Progress(progress) => self.progress(progress),
            Output::Persisted(state) => self.persisted(state),
            Output::Notice(notice) => self.notice(notice),
            Output::Answer(answer) => self.answer(answer),
            Output::Check => {}
        }
    }

    /// A call that arrived during a job, once the previous caller was answered.
    fn interjection(&mut self) -> Option<Input> {
        if self.reply.is_some() {
            return None;
        }
        let call = self.calls.try_recv().ok()?;
        Some(self.take(call))
    }
}

impl Feed {
    fn event(&mut self, event: &Event) {
        if let Some(reason) = event.reason {
            self.last_error = Some((
                reason.to_string(),
                event.message.clone().unwrap_or_default(),
            ));
        } else if event.kind == EventKind::Committed {
            self.last_error = None;
        }
        // The phase an event leads into, for the `State` property during a long job.
        let state = match event.kind {
            EventKind::Writing => Some("writing"),
            EventKind::Written => Some("activating"),
            EventKind::Rebooting => Some("reboot-pending"),
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
            let downloaded = progress.downloaded.unwrap_or(s.downloaded);
            let changed = s.progress != now || s.downloaded != downloaded;
            s.progress = now;
            s.downloaded = downloaded;
            changed
        });
    }

    fn notice(&mut self, notice: &Notice) {
        // No subscriber (the service is not serving yet) is not an error; nothing waits then.
        if self.notices.send(notice.clone()).is_ok() {
            self.queued += 1;
        }
    }

    fn answer(&mut self, answer: &Answer) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(answer.clone());
        }
    }

    /// The user's choices as saved, for the properties while a job runs (the whole snapshot
    /// follows after the input).
    fn persisted(&mut self, state: &PersistentState) {
        let postponed_until = state.user.postponed_until.map_or(0, |t| t.as_second());
        let auto_install = state.user.auto_install;
        self.snapshots.send_if_modified(|s| {
            let before = (s.postponed_until, s.auto_install);
            s.postponed_until = postponed_until;
            s.auto_install = auto_install.unwrap_or(s.auto_install);
            before != (s.postponed_until, s.auto_install)
        });
    }
}
