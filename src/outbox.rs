//! The outbox: events on their way to the broker, on disk, so that none is lost while the
//! broker is unreachable, across agent restarts and across reboots.
//!
//! One file per event (`{seq:020}.json`, the exact bytes to publish) in a directory of the
//! state directory, written atomically before the event is handed to MQTT, and removed only
//! when the broker acknowledged it (PUBACK). Bounded: beyond `capacity` events the oldest are
//! dropped and a [`Dropped`] record — published first — says how many and which sequence
//! numbers. `meta.json` keeps that record and the high-water mark (the next sequence number not
//! yet seen), which lets [`Outbox::catch_up`] take over events that the one-shot commands
//! (`boot-check`, `install`) wrote to the local event log while the daemon was not running.
//!
//! Delivery is at least once: an event whose acknowledgement was lost is sent again, with the
//! same sequence number, so receivers can drop duplicates.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::engine::Event;

/// An event record is a few hundred bytes; a file larger than this is not one of ours.
const MAX_RECORD_SIZE: u64 = 64 * 1024;
const META: &str = "meta.json";

/// Which record a publish carried, to acknowledge it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// The overflow record, in the version that was sent (a later overflow changes it).
    Dropped {
        generation: u64,
    },
    Event {
        seq: u64,
    },
}

/// The outbox overflowed: `count` events, sequence numbers `first_seq..=last_seq`, were dropped
/// unsent. A later record may cover an earlier one's range again (counts are cumulative until
/// one is acknowledged). Published on the events topic, first, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub dropped: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub at: Timestamp,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// The next sequence number not yet taken into the outbox.
    next_seq: u64,
    dropped: Option<Dropped>,
    /// Changes whenever `dropped` does.
    generation: u64,
}

pub struct Outbox {
    dir: PathBuf,
    capacity: usize,
    events: BTreeMap<u64, Vec<u8>>,
    meta: Meta,
}

impl Outbox {
    /// Opens (creating) the outbox directory and loads what a previous run left.
    pub fn open(dir: &Path, capacity: usize) -> io::Result<Outbox> {
        std::fs::create_dir_all(dir)?;
        let meta = match durable::read_bounded(&dir.join(META), MAX_RECORD_SIZE) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("outbox {}: ignoring corrupt {META}: {e}", dir.display());
                Meta::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e),
        };
        let mut events = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(".tmp-") {
                // Left by a power cut between create and rename: never published, never counted.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".json")
                .and_then(|stem| stem.parse::<u64>().ok())
            else {
                continue;
            };
            match durable::read_bounded(&path, MAX_RECORD_SIZE) {
                Ok(bytes) if serde_json::from_slice::<Event>(&bytes).is_ok() => {
                    events.insert(seq, bytes);
                }
                _ => {
                    tracing::warn!("outbox: removing unreadable record {}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let mut outbox = Outbox {
            dir: dir.to_owned(),
            capacity: capacity.max(1),
            events,
            meta,
        };
        outbox.enforce_capacity(Timestamp::now())?;
        Ok(outbox)
    }

    /// Takes one event in; it is on disk when this returns.
    pub fn push(&mut self, event: &Event, now: Timestamp) -> io::Result<()> {
        // The record on the events topic is the event exactly as the engine made it.
        let bytes = serde_json::to_vec(event).expect("events always serialise");
        durable::write_atomically(&self.event_path(event.seq), &bytes, 0o600)?;
        self.events.insert(event.seq, bytes);
        self.meta.next_seq = event.seq + 1;
        if !self.enforce_capacity(now)? {
            self.save_meta()?;
        }
        Ok(())
    }

    /// Takes in the logged events this outbox has not seen (sequence numbers from the
    /// high-water mark on), e.g. those `boot-check` recorded before the daemon started.
    pub fn catch_up(&mut self, logged: &[Event], now: Timestamp) -> io::Result<usize> {
        let mut taken = 0;
        let from = self.meta.next_seq;
        for event in logged.iter().filter(|e| e.seq >= from) {
            self.push(event, now)?;
            taken += 1;
        }
        Ok(taken)
    }

    /// Records waiting for the broker, in the order to send them: the overflow record first,
    /// then events by sequence number.
    pub fn pending(&self) -> impl Iterator<Item = (Key, Vec<u8>)> + '_ {
        let dropped = self.meta.dropped.as_ref().map(|d| {
            let key = Key::Dropped {
                generation: self.meta.generation,
            };
            (key, serde_json::to_vec(d).expect("always serialises"))
        });
        let events = self
            .events
            .iter()
            .map(|(seq, bytes)| (Key::Event { seq: *seq }, bytes.clone()));
        dropped.into_iter().chain(events)
    }

    /// The broker acknowledged the record: it is removed for good. An unknown key (already
    /// dropped, or acknowledged twice) is no error.
    pub fn ack(&mut self, key: Key) -> io::Result<()> {
        match key {
            Key::Event { seq } => {
                if self.events.remove(&seq).is_some() {
                    match std::fs::remove_file(self.event_path(seq)) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            Key::Dropped { generation } => {
                if self.meta.dropped.is_some() && self.meta.generation == generation {
                    self.meta.dropped = None;
                    self.save_meta()?;
                }
            }
        }
        Ok(())
    }

    /// Records not yet acknowledged (events plus the overflow record).
    pub fn len(&self) -> usize {
        self.events.len() + usize::from(self.meta.dropped.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The overflow record waiting to be sent, if any.
    pub fn dropped(&self) -> Option<&Dropped> {
        self.meta.dropped.as_ref()
    }

    /// Drops the oldest events beyond the capacity; true if it did (and saved the meta file).
    fn enforce_capacity(&mut self, now: Timestamp) -> io::Result<bool> {
        let mut changed = false;
        while self.events.len() > self.capacity {
            let Some((seq, _)) = self.events.pop_first() else {
                break;
            };
            let _ = std::fs::remove_file(self.event_path(seq));
            let dropped = self.meta.dropped.get_or_insert(Dropped {
                dropped: 0,
                first_seq: seq,
                last_seq: seq,
                at: now,
            });
            dropped.dropped += 1;
            dropped.first_seq = dropped.first_seq.min(seq);
            dropped.last_seq = dropped.last_seq.max(seq);
            dropped.at = now;
            changed = true;
        }
        if changed {
            self.meta.generation += 1;
            let d = self.meta.dropped.as_ref().expect("set above");
            tracing::warn!(
                message_id = crate::logging::message_id::OUTBOX_OVERFLOW,
                "outbox full ({} events): dropped {} unsent event(s), seq {} to {}",
                self.capacity,
                d.dropped,
                d.first_seq,
                d.last_seq
            );
            self.save_meta()?;
        }
        Ok(changed)
    }

    fn save_meta(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&self.meta).expect("always serialises");
        durable::write_atomically(&self.dir.join(META), &bytes, 0o600)
    }

    fn event_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventKind;

    fn event(seq: u64) -> Event {
        Event::about(seq, Timestamp::UNIX_EPOCH, EventKind::Refused, None)
    }

    /// The outbox of `capacity` in `dir` with the events `seqs` pushed, in order.
    fn pushed(dir: &Path, capacity: usize, seqs: std::ops::Range<u64>) -> Outbox {
        let mut outbox = Outbox::open(dir, capacity).unwrap();
        for seq in seqs {
            outbox.push(&event(seq), Timestamp::UNIX_EPOCH).unwrap();
        }
        outbox
    }

    fn keys(outbox: &Outbox) -> Vec<Key> {
        outbox.pending().map(|(k, _)| k).collect()
    }

    #[test]
    fn events_survive_a_restart_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = pushed(dir.path(), 10, 0..3);
        outbox.ack(Key::Event { seq: 1 }).unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 10).unwrap();
        assert_eq!(
            keys(&outbox),
            [Key::Event { seq: 0 }, Key::Event { seq: 2 }]
        );
        let (_, bytes) = outbox.pending().next().unwrap();
        let back: Event = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, event(0));
    }

    #[test]
    fn overflow_drops_the_oldest_and_says_how_many_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = pushed(dir.path(), 3, 0..5);
        let pending = keys(&outbox);
        assert_eq!(pending.len(), 4);
        assert!(matches!(pending[0], Key::Dropped { .. }));
        assert_eq!(pending[1..], [2, 3, 4].map(|seq| Key::Event { seq }));
        let d = outbox.dropped().unwrap();
        assert_eq!((d.dropped, d.first_seq, d.last_seq), (2, 0, 1));
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3 + 1, "three events and the meta file");

        // Acknowledging an outdated overflow record keeps the newer count.
        let sent = pending[0];
        outbox.push(&event(5), Timestamp::UNIX_EPOCH).unwrap();
        outbox.ack(sent).unwrap();
        assert_eq!(outbox.dropped().unwrap().dropped, 3);
        let current = keys(&outbox)[0];
        outbox.ack(current).unwrap();
        assert!(outbox.dropped().is_none());
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 3).unwrap();
        assert!(outbox.dropped().is_none());
        assert_eq!(outbox.len(), 3);
    }

    #[test]
    fn catch_up_takes_only_unseen_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), 10).unwrap();
        outbox.push(&event(0), Timestamp::UNIX_EPOCH).unwrap();
        outbox.ack(Key::Event { seq: 0 }).unwrap();
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 10).unwrap();
        let logged: Vec<Event> = (0..4).map(event).collect();
        assert_eq!(outbox.catch_up(&logged, Timestamp::UNIX_EPOCH).unwrap(), 3);
        assert_eq!(outbox.catch_up(&logged, Timestamp::UNIX_EPOCH).unwrap(), 0);
        assert_eq!(keys(&outbox), [1, 2, 3].map(|seq| Key::Event { seq }));
    }

    #[test]
    fn a_smaller_capacity_on_restart_applies_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = pushed(dir.path(), 10, 0..6);
        std::fs::write(dir.path().join(".tmp-x"), b"half").unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 2).unwrap();
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.dropped().unwrap().dropped, 4);
        assert!(!dir.path().join(".tmp-x").exists());
    }
}
