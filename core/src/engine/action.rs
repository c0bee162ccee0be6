//! What the engine asks of the driver: records and reports, and at most one job at a time.

use jiff::Timestamp;

use super::input::Failure;
use super::names::Bootname;
use super::policy::Clamp;
use super::state::{Event, EventKind, Progress, Transaction};
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::manifest::{Disruption, Image, Severity};

/// What the engine asks the driver to do. [`Engine::handle`](super::Engine::handle) returns
/// them in this order (the order of the variants), which the driver keeps:
///
/// 1. `Report` of the events a restart replays (see `PersistentState::recent_events`): they were
///    persisted with their transition, and are told again before the `Persist` that forgets them;
/// 2. `Persist`, at most once: the state after this input, written before anything is told of it
///    (an event's sequence number is durable before the event is reported);
/// 3. `Notify` of a disruption the job at the end causes now (the reboot): the person at home
///    hears of it before anything else of this step is told;
/// 4. `Report` of this step's events, then `ReportProgress`;
/// 5. `Notify` of what this step means for the user (update available, completed, reboot ahead);
/// 6. `Answer` to the user's request, once it is durable and before any job it started;
/// 7. `Check`;
/// 8. `Run` of one job, last: everything before it is recorded and told when the job starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Write [`Engine::state`](super::Engine::state) atomically before the next action.
    Persist,
    Report(Event),
    /// Progress of the write, for the retained state (not an event: it has no sequence number).
    ReportProgress(Progress),
    /// Tell the user (D-Bus signals).
    Notify(Notice),
    /// The answer to the user request just handled.
    Answer(Answer),
    /// Look for new releases now (the user asked): the driver re-reads its release source.
    Check,
    /// Carry out the job and answer with [`Input::JobDone`](super::Input::JobDone), handing the
    /// job back (a reboot is answered by the next boot instead).
    Run(Job),
}

/// Work the driver does for the engine, one at a time; each is answered with
/// [`Input::JobDone`](super::Input::JobDone) except the reboot.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Make `slot` unbootable (mark bad) so a half-written slot is never tried.
    PrepareTarget {
        slot: Bootname,
    },
    /// Stream the image into `slot` from byte `resume_from`, then read it back against its hash.
    Write {
        slot: Bootname,
        image: Box<Image>,
        resume_from: u64,
    },
    /// Tell the bootloader to try `slot` once at the next boot.
    Activate {
        slot: Bootname,
    },
    MarkGood {
        slot: Bootname,
    },
    MarkBad {
        slot: Bootname,
    },
    CheckHealth,
    /// Reboot (or leave the reboot to the caller). Answered by the next
    /// [`Input::BootObserved`](super::Input::BootObserved), never by `JobDone`.
    Reboot,
}

/// What the user is told, beyond events (D-Bus signals; EN 303 645 5.3-11/12).
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A release was accepted: what it fixes and what it will do to the device.
    UpdateAvailable {
        txn: String,
        version: String,
        advisory: String,
        security: bool,
        severity: Severity,
        deadline: Option<Timestamp>,
        disruption: Disruption,
    },
    /// The device will reboot in `seconds`; `postponable` when the user can still push it back.
    DisruptionAhead {
        txn: String,
        seconds: u64,
        postponable: bool,
        downtime_seconds: u64,
    },
    /// A transaction ended (`committed`, `failed`, `rolled-back`).
    Completed {
        txn: String,
        version: String,
        result: EventKind,
        reason: Option<ReasonCode>,
    },
}

impl Notice {
    pub(super) fn update_available(txn: &Transaction) -> Notice {
        let m = &txn.manifest;
        Notice::UpdateAvailable {
            txn: txn.id.clone(),
            version: m.version.clone(),
            advisory: m.advisory.clone(),
            security: m.security,
            severity: m.severity,
            deadline: m.deadline,
            disruption: m.disruption.clone(),
        }
    }

    pub(super) fn completed(
        txn: &Transaction,
        result: EventKind,
        reason: Option<ReasonCode>,
    ) -> Notice {
        Notice::Completed {
            txn: txn.id.clone(),
            version: txn.manifest.version.clone(),
            result,
            reason,
        }
    }
}

/// The engine's answer to one user request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Done,
    /// The postponement in force: `until`, which is `requested` unless `clamped`.
    Postponed {
        until: Timestamp,
        requested: Timestamp,
        clamped: Option<Clamp>,
    },
    Refused(Failure),
}
