//! The engine's persistent state on disk: one JSON file in the state directory, replaced
//! atomically, plus a bounded log of the events the engine reported.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::durable;
use crate::engine::{Event, PersistentState};

/// The state holds one manifest (≤ 64 KiB) and small records; 1 MiB is far beyond real use.
const MAX_STATE_SIZE: u64 = 1024 * 1024;
/// Events kept in the local log; older ones are dropped when it is rewritten.
pub const MAX_LOGGED_EVENTS: usize = 1000;
const MAX_EVENT_LOG_SIZE: u64 = 4 * 1024 * 1024;

pub struct StateStore {
    dir: PathBuf,
    /// What the end of the event log holds, read at the first append.
    log_tail: Mutex<Option<LogTail>>,
}

#[derive(Debug, Clone, Copy)]
struct LogTail {
    /// The highest `seq` in the log.
    last_seq: Option<u64>,
    /// The log ends in a line cut short (a power cut during an append): start a new line.
    torn: bool,
}

/// What [`StateStore::log_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    Appended,
    /// The log already holds this `seq` (an event reported again after a restart): not added.
    AlreadyLogged,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot read state {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "state {path} is corrupt ({message}); move it aside to start from an idle state (the slots are not touched)"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write state {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl StateStore {
    pub fn open(dir: &Path) -> Result<StateStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(StateStore {
            dir: dir.to_owned(),
            log_tail: Mutex::new(None),
        })
    }

    /// The store in `dir` for reading only (reports): unlike [`StateStore::open`] it creates
    /// nothing, so a missing directory reads as a device with no state and no events yet.
    pub fn existing(dir: &Path) -> StateStore {
        StateStore {
            dir: dir.to_owned(),
            log_tail: Mutex::new(None),
        }
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn event_log_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    /// The saved state, or the idle default on first start.
    ///
    /// Sequence numbers go on after the last one in the event log even when the state starts
    /// afresh (a state file moved aside): a number is never given to two events.
    pub fn load(&self) -> Result<PersistentState, StoreError> {
        let path = self.state_path();
        let mut state: PersistentState = match durable::read_bounded(&path, MAX_STATE_SIZE) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => PersistentState::default(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let tail = self.read_log_tail()?;
        *self.log_tail.lock().unwrap_or_else(|e| e.into_inner()) = Some(tail);
        if let Some(last) = tail.last_seq {
            state.next_seq = state.next_seq.max(last + 1);
        }
        Ok(state)
    }

    pub fn save(&self, state: &PersistentState) -> Result<(), StoreError> {
        let path = self.state_path();
        let json = serde_json::to_vec_pretty(state).expect("state always serialises");
        durable::write_atomically(&path, &json, 0o600)
            .map_err(|source| StoreError::Write { path, source })
    }

    /// Appends one event to the local log (synced: the log is the record of what happened).
    ///
    /// Sequence numbers only grow, so an event whose `seq` is not above the last one logged was
    /// logged before: the engine reports the events of its last transition again after a
    /// restart (see `PersistentState::recent_events`), and the log keeps each `seq` once.
    pub fn log_event(&self, event: &Event) -> Result<Logged, StoreError> {
        let path = self.event_log_path();
        let write_err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let mut tail_guard = self.log_tail.lock().unwrap_or_else(|e| e.into_inner());
        let tail = match *tail_guard {
            Some(tail) => tail,
            None => self.read_log_tail()?,
        };
        if tail.last_seq.is_some_and(|last| event.seq <= last) {
            *tail_guard = Some(tail);
            return Ok(Logged::AlreadyLogged);
        }
        let mut line = Vec::new();
        if tail.torn {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, event).expect("events always serialise");
        line.push(b'\n');
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size + line.len() as u64 > MAX_EVENT_LOG_SIZE / 2 {
            self.trim_event_log().map_err(write_err)?;
        }
        // Until the append is known to be complete, the log may end in a torn line.
        *tail_guard = Some(LogTail {
            last_seq: tail.last_seq,
            torn: true,
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(write_err)?;
        file.write_all(&line).map_err(write_err)?;
        file.sync_data().map_err(write_err)?;
        *tail_guard = Some(LogTail {
            last_seq: Some(event.seq),
            torn: false,
        });
        Ok(Logged::Appended)
    }

    fn read_log_tail(&self) -> Result<LogTail, StoreError> {
        let path = self.event_log_path();
        let bytes = match durable::read_bounded(&path, MAX_EVENT_LOG_SIZE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(LogTail {
            last_seq: parse_events(&bytes).map(|e| e.seq).max(),
            torn: bytes.last().is_some_and(|b| *b != b'\n'),
        })
    }

    /// The most recent events, oldest first.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        let path = self.event_log_path();
        let bytes = match durable::read_bounded(&path, MAX_EVENT_LOG_SIZE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        Ok(parse_events(&bytes).collect())
    }

    fn trim_event_log(&self) -> io::Result<()> {
        let events = self.events().map_err(io::Error::other)?;
        let keep = &events[events.len().saturating_sub(MAX_LOGGED_EVENTS / 2)..];
        let mut out = Vec::new();
        for event in keep {
            serde_json::to_writer(&mut out, event)?;
            out.push(b'\n');
        }
        durable::write_atomically(&self.event_log_path(), &out, 0o600)
    }
}

/// The events in a log, oldest first. A line cut by a power cut is skipped, not fatal: the
/// events before it still count.
fn parse_events(bytes: &[u8]) -> impl Iterator<Item = Event> + '_ {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EventKind;

    #[test]
    fn saved_state_loads_back_and_missing_state_is_idle() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), PersistentState::default());
        let state = PersistentState {
            floor: 7,
            next_seq: 3,
            ..Default::default()
        };
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
    }

    #[test]
    fn corrupt_state_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(store.state_path(), b"{not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("move it aside"), "{err}");
    }

    fn event(seq: u64, state: EventKind) -> Event {
        Event {
            seq,
            at: jiff::Timestamp::UNIX_EPOCH,
            kind: state,
            txn: None,
            release_id: None,
            from_version: None,
            to_version: None,
            slot: None,
            reason: None,
            message: None,
            waiting: None,
            until: None,
            clamped: None,
            created: None,
        }
    }

    #[test]
    fn an_event_reported_again_is_logged_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(
            store.log_event(&event(0, EventKind::Accepted)).unwrap(),
            Logged::Appended
        );
        assert_eq!(
            store.log_event(&event(1, EventKind::Writing)).unwrap(),
            Logged::Appended
        );
        // The agent restarts (a new store) and the engine reports its last events again.
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(
            store.log_event(&event(1, EventKind::Writing)).unwrap(),
            Logged::AlreadyLogged
        );
        assert_eq!(
            store.log_event(&event(2, EventKind::Written)).unwrap(),
            Logged::Appended
        );
        let seqs: Vec<u64> = store.events().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }

    #[test]
    fn an_append_after_a_torn_line_starts_a_new_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.log_event(&event(0, EventKind::Accepted)).unwrap();
        // A power cut in the middle of the next append.
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(store.event_log_path())
            .unwrap();
        log.write_all(br#"{"seq":1,"at":"1970-01-01T00:00:00Z","sta"#)
            .unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.log_event(&event(1, EventKind::Writing)).unwrap();
        let seqs: Vec<u64> = store.events().unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [0, 1]);
    }

    #[test]
    fn a_fresh_state_numbers_events_after_the_logged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.log_event(&event(6, EventKind::Committed)).unwrap();
        // state.json was moved aside (or never written): numbering goes on after the log.
        assert_eq!(store.load().unwrap().next_seq, 7);
    }

    #[test]
    fn event_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut event = Event {
            seq: 0,
            at: jiff::Timestamp::UNIX_EPOCH,
            kind: EventKind::Refused,
            txn: None,
            release_id: None,
            from_version: None,
            to_version: None,
            slot: None,
            reason: None,
            message: Some("x".repeat(2000)),
            waiting: None,
            until: None,
            clamped: None,
            created: None,
        };
        for seq in 0..3000 {
            event.seq = seq;
            store.log_event(&event).unwrap();
        }
        let size = std::fs::metadata(store.event_log_path()).unwrap().len();
        assert!(size <= MAX_EVENT_LOG_SIZE / 2, "{size}");
        let events = store.events().unwrap();
        assert_eq!(events.last().unwrap().seq, 2999);
    }
}
