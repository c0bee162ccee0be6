//! The engine's persistent state on disk: one JSON file in the state directory, replaced
//! atomically, plus a bounded log of the events the engine reported.
//!
//! The state says what the agent does next with the slots and the bootloader, so only the user
//! the agent runs as may change it: [`StateStore::open`] refuses a state directory (or a file in
//! it) that belongs to another user or that group or others may write, and an ancestor another
//! user could rename it in. Each refusal says how to fix it.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
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
    #[error(
        "state directory {path} {problem}: another user could change the transaction the agent \
         carries out as {user}; {fix}"
    )]
    Exposed {
        path: PathBuf,
        problem: String,
        user: String,
        fix: String,
    },
    #[error(
        "the state in {} is in use by {holder}: one process at a time carries out updates. \
         While the daemon (`update-agent run`) runs, ask it (`update-agent install-now` installs \
         the pending update, `update-agent status` shows it); stop it first \
         (`systemctl stop update-agent`) to install a file or run the boot check by hand",
        .dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "{count} file(s) in the state directory {dir} belong to another user than {user}, which \
         the agent runs as, and it cannot use them ({files}); as root: `chown -R {owner} {dir}` \
         (were they made by running the agent as another user?)",
        count = .files.len(),
        files = .files.join(", "),
        dir = .dir.display()
    )]
    ForeignFiles {
        dir: PathBuf,
        user: String,
        owner: String,
        files: Vec<String>,
    },
}

/// The state directory taken by one process: an exclusive `flock` on `{state_dir}/lock`, held
/// while this value lives (and released by the kernel when the process ends, however it ends).
/// The file names the holder (pid and command) for the others' refusal.
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// A uid as people read it: `65534 (nobody)`.
pub fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// `user:group` for a chown command line, by number (names may not resolve in every sandbox).
fn chown_spec(uid: u32) -> String {
    let gid = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or(uid, |user| user.gid.as_raw());
    format!("{uid}:{gid}")
}

/// Checks that only the agent's user (`uid`) can change what is in `dir`: the directory is
/// theirs and not writable by group or others; each ancestor is root's or theirs and not
/// writable by group or others unless sticky (as `/tmp`: others cannot rename what is not
/// theirs); and every entry, one level into subdirectories, is theirs and not writable by
/// group or others.
fn check_private(dir: &Path, uid: u32) -> Result<(), StoreError> {
    let user = describe_uid(uid);
    let exposed = |path: &Path, problem: String, fix: String| StoreError::Exposed {
        path: path.to_owned(),
        problem,
        user: user.clone(),
        fix,
    };
    let stat = |path: &Path| {
        std::fs::metadata(path).map_err(|source| StoreError::Dir {
            path: path.to_owned(),
            source,
        })
    };
    let meta = stat(dir)?;
    if meta.uid() != uid {
        return Err(exposed(
            dir,
            format!("belongs to {}", describe_uid(meta.uid())),
            format!(
                "run the agent as the directory's owner, or (as root) `chown -R {} {}` and `chmod 0700 {}`",
                chown_spec(uid),
                dir.display(),
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(exposed(
            dir,
            format!(
                "is writable by group or others (mode {:04o})",
                meta.mode() & 0o7777
            ),
            format!("`chmod 0700 {}`", dir.display()),
        ));
    }
    let canonical = dir.canonicalize().map_err(|source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    for ancestor in canonical.ancestors().skip(1) {
        let meta = stat(ancestor)?;
        let owner_ok = meta.uid() == 0 || meta.uid() == uid;
        let sticky = meta.mode() & 0o1000 != 0;
        if !owner_ok || (meta.mode() & 0o022 != 0 && !sticky) {
            return Err(exposed(
                dir,
                format!(
                    "is inside {}, which {} may change (owner {}, mode {:04o})",
                    ancestor.display(),
                    if owner_ok {
                        "group or others"
                    } else {
                        "its owner"
                    },
                    describe_uid(meta.uid()),
                    meta.mode() & 0o7777
                ),
                format!(
                    "keep the state directory where only root and {user} can rename it (`chmod go-w {}`)",
                    ancestor.display()
                ),
            ));
        }
    }
    let mut foreign = Vec::new();
    let mut writable = Vec::new();
    let mut look = |path: &Path, meta: &std::fs::Metadata| {
        if meta.uid() != uid {
            foreign.push(format!("{} ({})", path.display(), describe_uid(meta.uid())));
        } else if meta.mode() & 0o022 != 0 && !meta.file_type().is_symlink() {
            writable.push(path.display().to_string());
        }
    };
    for entry in read_dir(dir)? {
        let (path, meta) = entry;
        look(&path, &meta);
        if meta.is_dir() && meta.uid() == uid {
            for (inner, inner_meta) in read_dir(&path)? {
                look(&inner, &inner_meta);
            }
        }
    }
    if !foreign.is_empty() {
        return Err(StoreError::ForeignFiles {
            dir: dir.to_owned(),
            user,
            owner: chown_spec(uid),
            files: foreign,
        });
    }
    if !writable.is_empty() {
        return Err(exposed(
            dir,
            format!(
                "holds files group or others may write ({})",
                writable.join(", ")
            ),
            format!("`chmod -R go-w {}`", dir.display()),
        ));
    }
    Ok(())
}

/// The entries of a directory with their (not followed) metadata.
fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>, StoreError> {
    let failed = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(failed)? {
        let entry = entry.map_err(failed)?;
        let meta = entry.metadata().map_err(failed)?;
        entries.push((entry.path(), meta));
    }
    Ok(entries)
}

impl StateStore {
    /// The agent's store: creates the directory (0700) if need be and refuses one that anyone
    /// but the user this process runs as could change (see `check_private`).
    pub fn open(dir: &Path) -> Result<StateStore, StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        check_private(dir, nix::unistd::geteuid().as_raw())?;
        Ok(StateStore::existing(dir))
    }

    /// Takes the state for this process, or says who holds it ([`StoreError::Locked`]).
    pub fn lock(&self) -> Result<StateLock, StoreError> {
        use std::io::{Read, Seek};
        let path = self.dir.join("lock");
        let failed = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(failed)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = (&mut file).take(256).read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    text => crate::release::escape_for_log(text, 120),
                };
                return Err(StoreError::Locked {
                    dir: self.dir.clone(),
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
        let command: Vec<String> = std::env::args().take(2).collect();
        let holder = format!("pid {} ({})", std::process::id(), command.join(" "));
        file.set_len(0).map_err(failed)?;
        file.rewind().map_err(failed)?;
        file.write_all(holder.as_bytes()).map_err(failed)?;
        Ok(StateLock { _file: file })
    }

    /// The store in `dir` for reading only (reports, `status --offline`, run by root over the
    /// daemon's state): unlike [`StateStore::open`] it creates and checks nothing, so a missing
    /// directory reads as a device with no state and no events yet.
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
        Event::about(seq, jiff::Timestamp::UNIX_EPOCH, state, None)
    }

    #[test]
    fn an_event_reported_again_is_logged_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = |store: &StateStore, seq, kind| store.log_event(&event(seq, kind)).unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(log(&store, 0, EventKind::Accepted), Logged::Appended);
        assert_eq!(log(&store, 1, EventKind::Writing), Logged::Appended);
        // The agent restarts (a new store) and the engine reports its last events again.
        let store = StateStore::open(dir.path()).unwrap();
        assert_eq!(log(&store, 1, EventKind::Writing), Logged::AlreadyLogged);
        assert_eq!(log(&store, 2, EventKind::Written), Logged::Appended);
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
