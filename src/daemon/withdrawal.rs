//! When a pending release counts as withdrawn: its retained message was cleared or replaced on
//! the topic it came from, or a check found it on no release topic any more. Pure logic: the
//! daemon tells it what arrived and what is pending, and withdraws what it names.
//!
//! The rule (ARCHITECTURE.md, "Rollouts"): a release is installed while it is offered. An
//! operator halts a rollout by clearing the retained release (an empty retained message) on the
//! topic it was published on; a device that has not started drops it. A device that was offline
//! then learns it at its next connection: the broker sends what the topics retain when it
//! takes the subscription, and a topic that answers nothing within [`CHECK_GRACE`] holds no
//! release.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::mqtt::link::Received;
use crate::mqtt::topics::ReleaseSource;
use crate::release::{Envelope, ReleaseId};

/// How long after a subscription the retained releases have to arrive. Brokers send them with
/// the grant, on the same connection; the margin covers a slow broker and a busy daemon.
pub const CHECK_GRACE: Duration = Duration::from_secs(10);

/// The release id of a message on a release topic: `None` for an empty message (a cleared
/// topic) or one that is not a release envelope. Signatures are not checked: the id only tells
/// whether the topic still holds the pending release, never what to install.
pub fn release_id_of(payload: &[u8]) -> Option<ReleaseId> {
    if payload.is_empty() {
        return None;
    }
    let envelope = Envelope::parse(payload).ok()?;
    Some(ReleaseId::from_digest(
        Sha256::digest(&envelope.manifest_bytes).into(),
    ))
}

/// Why a pending release is withdrawn, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// An empty retained message on its topic.
    Cleared(ReleaseSource),
    /// Another message on its topic that did not supersede it.
    Replaced(ReleaseSource),
    /// A check found it on no release topic.
    Gone,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::Cleared(source) => write!(f, "the {} release topic was cleared", source.as_str()),
            Why::Replaced(source) => write!(
                f,
                "the {} release topic now holds another release",
                source.as_str()
            ),
            Why::Gone => f.write_str("no release topic holds it any more"),
        }
    }
}

#[derive(Default)]
pub struct Offers {
    /// What each release topic holds, as far as heard: the release id of its last message.
    held: HashMap<ReleaseSource, Option<ReleaseId>>,
    /// The latest subscription, and the topics that answered it.
    check: u64,
    answered: Vec<ReleaseSource>,
}

impl Offers {
    /// A new subscription (`check` counts them): the topics start answering anew. True when it
    /// is new, i.e. the grace period starts.
    pub fn checked(&mut self, check: u64) -> bool {
        if check == self.check {
            return false;
        }
        self.check = check;
        self.answered.clear();
        true
    }

    /// A message arrived on a release topic: what the topic holds now.
    pub fn heard(&mut self, message: &Received) -> Option<ReleaseId> {
        let id = release_id_of(&message.payload);
        self.held.insert(message.source, id);
        if message.check == self.check && !self.answered.contains(&message.source) {
            self.answered.push(message.source);
        }
        id
    }

    /// After a message on `source` was taken (and the engine had its say, e.g. a newer release
    /// superseded the pending one): whether `pending`, the release pending now, is withdrawn.
    /// It is when `source` held it before and holds something else now (`cleared`: an empty
    /// message), and no other topic holds it.
    pub fn after_message(
        &mut self,
        source: ReleaseSource,
        was: Option<ReleaseId>,
        cleared: bool,
        pending: Option<ReleaseId>,
    ) -> Option<Why> {
        let pending = pending?;
        let now = self.held.get(&source).copied().flatten();
        if was != Some(pending) || now == Some(pending) || self.held_elsewhere(source, pending) {
            return None;
        }
        Some(if cleared {
            Why::Cleared(source)
        } else {
            Why::Replaced(source)
        })
    }

    /// What `source` held before the message now arriving on it (call before [`Offers::heard`]).
    pub fn holds(&self, source: ReleaseSource) -> Option<ReleaseId> {
        self.held.get(&source).copied().flatten()
    }

    /// At the end of [`CHECK_GRACE`] after a subscription: `pending` is withdrawn when no topic that
    /// answered the check holds it (an unanswered topic is empty: it retains nothing).
    pub fn after_check(&mut self, pending: Option<ReleaseId>) -> Option<Why> {
        let pending = pending?;
        let offered = self
            .answered
            .iter()
            .any(|source| self.held.get(source) == Some(&Some(pending)));
        if offered {
            return None;
        }
        // Not answered means not retained: forget what those topics held before.
        for source in [ReleaseSource::Fleet, ReleaseSource::Device] {
            if !self.answered.contains(&source) {
                self.held.insert(source, None);
            }
        }
        Some(Why::Gone)
    }

    fn held_elsewhere(&self, source: ReleaseSource, release: ReleaseId) -> bool {
        self.held
            .iter()
            .any(|(s, held)| *s != source && *held == Some(release))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn envelope(manifest: &[u8]) -> Bytes {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let (manifest, sig) = (b64.encode(manifest), b64.encode([0u8; 64]));
        let keyid = "00".repeat(32);
        Bytes::from(format!(
            r#"{{"manifest": "{manifest}", "signatures": [{{"keyid": "{keyid}", "sig": "{sig}"}}]}}"#
        ))
    }

    fn message(source: ReleaseSource, payload: Bytes, check: u64) -> Received {
        Received {
            source,
            payload,
            check,
        }
    }

    fn id(manifest: &[u8]) -> ReleaseId {
        ReleaseId::from_digest(Sha256::digest(manifest).into())
    }

    /// Hears `message` as the daemon does and says whether `pending` is withdrawn by it.
    fn hear(offers: &mut Offers, m: Received, pending: Option<ReleaseId>) -> Option<Why> {
        let was = offers.holds(m.source);
        offers.heard(&m);
        offers.after_message(m.source, was, m.payload.is_empty(), pending)
    }

    #[test]
    fn the_id_of_a_message_is_its_manifest_hash_or_none() {
        assert_eq!(release_id_of(&envelope(b"m1")), Some(id(b"m1")));
        assert_eq!(release_id_of(b""), None);
        assert_eq!(release_id_of(b"not json"), None);
    }

    #[test]
    fn a_clear_or_a_replacement_on_its_topic_withdraws_the_pending_release() {
        use ReleaseSource::*;
        let p = id(b"p");
        let mut offers = Offers::default();
        offers.checked(1);
        assert_eq!(
            hear(&mut offers, message(Fleet, envelope(b"p"), 1), Some(p)),
            None
        );
        // Something on the device topic is not about it.
        assert_eq!(
            hear(&mut offers, message(Device, Bytes::new(), 1), Some(p)),
            None
        );
        // The same release again (e.g. another signature set): still offered.
        assert_eq!(
            hear(&mut offers, message(Fleet, envelope(b"p"), 1), Some(p)),
            None
        );
        assert_eq!(
            hear(&mut offers, message(Fleet, Bytes::new(), 1), Some(p)),
            Some(Why::Cleared(Fleet))
        );

        let after_p = |next: &'static [u8], pending| {
            let mut offers = Offers::default();
            hear(&mut offers, message(Fleet, envelope(b"p"), 0), pending);
            let next = if next.is_empty() {
                Bytes::new()
            } else {
                envelope(next)
            };
            hear(&mut offers, message(Fleet, next, 0), pending)
        };
        assert_eq!(after_p(b"older", Some(p)), Some(Why::Replaced(Fleet)));
        // Replaced by garbage: replaced too (whoever writes the topic decides what it offers).
        let mut offers = Offers::default();
        hear(&mut offers, message(Fleet, envelope(b"p"), 0), Some(p));
        let garbage = message(Fleet, Bytes::from_static(b"{}"), 0);
        assert_eq!(
            hear(&mut offers, garbage, Some(p)),
            Some(Why::Replaced(Fleet))
        );
        // Superseded: the engine now has the newer one pending; nothing is withdrawn.
        assert_eq!(after_p(b"n", Some(id(b"n"))), None);
        // Nothing pending (installing, or idle): nothing to withdraw.
        assert_eq!(after_p(b"", None), None);
    }

    #[test]
    fn a_release_still_held_on_the_other_topic_stays() {
        use ReleaseSource::*;
        let p = id(b"p");
        let mut offers = Offers::default();
        hear(&mut offers, message(Fleet, envelope(b"p"), 0), Some(p));
        hear(&mut offers, message(Device, envelope(b"p"), 0), Some(p));
        assert_eq!(
            hear(&mut offers, message(Fleet, Bytes::new(), 0), Some(p)),
            None
        );
        assert_eq!(
            hear(&mut offers, message(Device, Bytes::new(), 0), Some(p)),
            Some(Why::Cleared(Device))
        );
    }

    #[test]
    fn a_check_that_finds_it_on_no_topic_withdraws_it() {
        use ReleaseSource::*;
        let p = id(b"p");
        let mut offers = Offers::default();
        assert!(offers.checked(1));
        hear(&mut offers, message(Fleet, envelope(b"p"), 1), Some(p));
        assert_eq!(offers.after_check(Some(p)), None);
        // The next connection's check: the topic answers nothing (cleared while offline).
        assert!(offers.checked(2));
        assert!(!offers.checked(2));
        // A message from before the grant does not answer it.
        hear(&mut offers, message(Device, envelope(b"other"), 1), Some(p));
        assert_eq!(offers.after_check(Some(p)), Some(Why::Gone));
        assert_eq!(offers.holds(Fleet), None);
        // After a restart nothing is known; the check answered with it keeps it.
        let mut offers = Offers::default();
        offers.checked(1);
        hear(&mut offers, message(Device, envelope(b"p"), 1), Some(p));
        assert_eq!(offers.after_check(Some(p)), None);
        assert_eq!(offers.after_check(None), None);
    }
}
