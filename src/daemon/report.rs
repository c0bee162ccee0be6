//! The daemon's [`Observer`]: every event goes into the outbox (on disk, before anything is
//! sent) and to the journal; the retained state document follows every change.

use std::sync::{Arc, Mutex};

use jiff::Timestamp;

use crate::agent::{Observer, Output};
use crate::engine::{Engine, Event, EventKind};
use crate::logging::message_id;
use crate::mqtt::link::Publisher;
use crate::mqtt::payload::{DeviceFacts, DeviceState};
use crate::outbox::Outbox;
use crate::release::escape_for_log;

pub struct Reporter {
    facts: DeviceFacts,
    booted: Option<String>,
    doc: DeviceState,
    outbox: Arc<Mutex<Outbox>>,
    publisher: Publisher,
}

impl Reporter {
    pub fn new(facts: DeviceFacts, outbox: Arc<Mutex<Outbox>>, publisher: Publisher) -> Reporter {
        Reporter {
            doc: DeviceState::new(&facts, Timestamp::now()),
            facts,
            booted: None,
            outbox,
            publisher,
        }
    }

    /// Takes the whole state from the engine (after it learnt the boot, after each input).
    pub fn refresh(&mut self, engine: &Engine) {
        self.booted = engine.booted().map(ToString::to_string);
        self.doc
            .apply_persisted(&self.facts, self.booted.as_deref(), engine.state());
        self.publish();
    }

    /// Events the device logged without this daemon (`boot-check`, `install`, an earlier run):
    /// the newest of them is the last event until the daemon records a newer one.
    pub fn logged(&mut self, events: &[Event]) {
        if let Some(newest) = events.iter().max_by_key(|event| event.seq) {
            self.doc.take_last_event(newest);
        }
    }

    pub fn publish(&mut self) {
        self.doc.updated = Timestamp::now();
        self.publisher.set_state(self.doc.to_json());
    }
}

/// The operators' view: events into the outbox, progress and saved state into the retained
/// state document. What is for the user (notices, answers) is the D-Bus feed's.
impl Observer for Reporter {
    fn observe(&mut self, output: Output<'_>) {
        match output {
            Output::Event(event) => self.event(event),
            Output::Progress(progress) => {
                self.doc.apply_progress(progress);
                self.publish();
            }
            Output::Persisted(state) => {
                self.doc
                    .apply_persisted(&self.facts, self.booted.as_deref(), state);
                self.publish();
            }
            Output::Notice(_) | Output::Answer(_) | Output::Check => {}
        }
    }
}

impl Reporter {
    fn event(&mut self, event: &Event) {
        log_event(event);
        let pushed = self
            .outbox
            .lock()
            .expect("outbox lock")
            .push(event, Timestamp::now());
        match pushed {
            Ok(()) => self.publisher.outbox_changed(),
            // The local event log has it; the next start's catch-up sends it.
            Err(e) => tracing::error!(
                message_id = message_id::STORAGE_FAILED,
                "cannot put event {} into the outbox: {e}",
                event.seq
            ),
        }
        self.doc.apply_event(event);
        self.publish();
    }
}

/// One journal line per event; failures with a stable MESSAGE_ID. Versions and messages can
/// come from a release, so they are escaped and bounded.
fn log_event(event: &Event) {
    let version = event
        .to_version
        .as_deref()
        .map(|v| escape_for_log(v, 64))
        .unwrap_or_default();
    let txn = event.txn.as_deref().unwrap_or("-");
    let reason = event.reason.map(|r| r.as_str()).unwrap_or("");
    let message = event
        .message
        .as_deref()
        .map(|m| escape_for_log(m, 300))
        .unwrap_or_default();
    let state = event.kind.as_str();
    match event.kind {
        EventKind::Failed | EventKind::RollingBack | EventKind::RolledBack => tracing::error!(
            message_id = message_id::INSTALL_FAILED,
            seq = event.seq,
            txn,
            reason,
            "{state} {version}: {reason}: {message}"
        ),
        EventKind::Refused => tracing::warn!(
            message_id = message_id::RELEASE_REFUSED,
            seq = event.seq,
            reason,
            "release refused: {reason}: {message}"
        ),
        _ => tracing::info!(seq = event.seq, txn, "{state} {version}"),
    }
}
