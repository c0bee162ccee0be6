//! What the driver tells the engine: what happened outside, the answer to a job, a user's request.

use jiff::{SignedDuration, Timestamp};

use super::action::Job;
use super::names::{BootId, Bootname};
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::{ReleaseId, VerifiedRelease};

/// What the driver tells the engine.
#[derive(Debug, Clone)]
pub enum Input {
    /// The agent started (or the device booted): the kernel boot id and the slot it booted from.
    /// Whatever job was asked of the previous run is answered by what this boot shows.
    BootObserved {
        boot_id: BootId,
        booted: Bootname,
    },
    /// A release passed verification (signatures, compatible, floor, expiry). It installs when
    /// the policy lets it (automatic install, maintenance windows, postponement).
    ReleaseVerified(Box<VerifiedRelease>),
    /// The user asked to install this verified release now (`update-agent install`): the
    /// policy does not hold it back, and the reboot is the driver's to decide.
    UserInstall(Box<VerifiedRelease>),
    /// A release was refused by verification; reported, nothing else happens.
    ReleaseRefused {
        reason: ReasonCode,
        message: String,
    },
    /// The job the engine asked for ([`Action::Run`](super::Action::Run)) is done, or failed.
    /// The job is handed back as it was asked for; an answer to any other job than the one the
    /// engine waits for is stale and ignored.
    JobDone(Job, Result<(), Failure>),
    /// Bytes of the image written so far, during [`Job::Write`], and the bytes downloaded for
    /// it so far once the transfer counted any.
    WriteProgress {
        written: u64,
        total: u64,
        downloaded: Option<u64>,
    },
    /// `durable` bytes were written, synced and hashed; a restart may resume from there.
    WriteCheckpoint {
        durable: u64,
    },
    /// Time passed: the driver's timer ([`Engine::poll_timeout`](super::Engine::poll_timeout))
    /// fired. Harmless at any time.
    Tick,
    /// The user's requests (D-Bus, CLI). Each is answered with exactly one
    /// [`Action::Answer`](super::Action::Answer).
    UserPostpone(Postpone),
    UserResume,
    UserSetAutoInstall(bool),
    /// Install the pending release now, or reboot into the activated one now.
    UserInstallNow,
    UserCheckNow,
    /// Mark the booted slot good (`good`), or the other slot bad.
    UserMark {
        good: bool,
    },
    /// The release is no longer offered where it came from: its retained message was cleared
    /// (an operator's halt) or replaced by something that does not supersede it. A release
    /// still pending is dropped (`withdrawn`); one whose install started goes on.
    Withdrawn {
        release_id: ReleaseId,
        /// Why, for the event's message (e.g. "the fleet release topic was cleared").
        why: String,
    },
    /// The reboot the engine asked for ([`Job::Reboot`]) did not happen: the command failed.
    /// Reported; the phase stays and the driver tries again.
    RebootFailed(Failure),
}

/// How long the user postpones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Postpone {
    For(SignedDuration),
    Until(Timestamp),
}

/// A failed job: a stable code plus a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: ReasonCode,
    pub message: String,
}

impl Failure {
    pub fn new(reason: ReasonCode, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }
}
