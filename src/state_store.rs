//! The engine's persistent state on disk: one JSON file in the state directory, replaced
//! atomically, plus a bounded log of the events the engine reported.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::durable;
use crate::engine::{Event, PersistentState};

/// The state holds one manifest (≤ 64 KiB) and small records; 1 MiB is far beyond real use.
const MAX_STATE_SIZE: u64 = 1024 * 1024;
/// Events kept in the local log; older ones are dropped when it is rewritten.
pub const MAX_LOGGED_EVENTS: usize = 1000;
const MAX_EVENT_LOG_SIZE: u64 = 4 * 1024 * 1024;

pub struct StateStore {
    dir: PathBuf,
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
        })
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn event_log_path(&self) -> PathBuf {
        self.dir.join("events.jsonl")
    }

    /// The saved state, or the idle default on first start.
    pub fn load(&self) -> Result<PersistentState, StoreError> {
        let path = self.state_path();
        let bytes = match durable::read_bounded(&path, MAX_STATE_SIZE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PersistentState::default()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    pub fn save(&self, state: &PersistentState) -> Result<(), StoreError> {
        let path = self.state_path();
        let json = serde_json::to_vec_pretty(state).expect("state always serialises");
        durable::write_atomically(&path, &json, 0o600)
            .map_err(|source| StoreError::Write { path, source })
    }

    /// Appends one event to the local log (synced: the log is the record of what happened).
    pub fn log_event(&self, event: &Event) -> Result<(), StoreError> {
        let path = self.event_log_path();
        let write_err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(event).expect("events always serialise");
        line.push(b'\n');
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size + line.len() as u64 > MAX_EVENT_LOG_SIZE / 2 {
            self.trim_event_log().map_err(write_err)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(write_err)?;
        file.write_all(&line).map_err(write_err)?;
        file.sync_data().map_err(write_err)
    }

    /// The most recent events, oldest first.
    pub fn events(&self) -> Result<Vec<Event>, StoreError> {
        let path = self.event_log_path();
        let bytes = match durable::read_bounded(&path, MAX_EVENT_LOG_SIZE) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        // A line cut by a power cut is skipped, not fatal: the events before it still count.
        Ok(bytes
            .split(|b| *b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TxnState;

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

    #[test]
    fn event_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut event = Event {
            seq: 0,
            at: jiff::Timestamp::UNIX_EPOCH,
            state: TxnState::Refused,
            txn: None,
            release_id: None,
            from_version: None,
            to_version: None,
            slot: None,
            reason: None,
            message: Some("x".repeat(2000)),
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
