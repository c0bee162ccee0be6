//! **For tests only**: a clock the test sets, so that the daemon as a process can be run
//! through days of policy time (windows, postponements, deadlines) in seconds.
//!
//! `UPDATE_AGENT_TEST_CLOCK_FILE=<path>` makes the daemon's agent read "now" from that file (an
//! RFC 3339 time, at most 64 bytes) at every look at the clock, instead of the system clock; the
//! daemon then also looks at its policy timer at least every [`POLL`], since the test moves time
//! without telling it. The engine sees only the time it is given, so it does not know; events
//! carry the test's time. The system clock still times the MQTT link, the outbox and the
//! journal. Never set in production: the daemon says so loudly at start when it is.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

use crate::agent::Clock;

pub const ENV: &str = "UPDATE_AGENT_TEST_CLOCK_FILE";
/// How often the daemon re-reads a test clock when nothing else wakes it.
pub const POLL: Duration = Duration::from_millis(100);
const MAX_SIZE: u64 = 64;

/// The test clock named by [`ENV`], if set.
pub fn from_env() -> Option<(Clock, PathBuf)> {
    let path = PathBuf::from(std::env::var_os(ENV)?);
    let file = path.clone();
    let clock: Clock = Arc::new(move || read(&file));
    Some((clock, path))
}

/// The file's time; the system clock (and an error in the journal) when it cannot be read,
/// which fails a test that depends on the time rather than hang it.
fn read(path: &Path) -> Timestamp {
    use std::io::Read;
    let mut text = String::new();
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SIZE).read_to_string(&mut text))
        .map_err(|e| e.to_string())
        .and_then(|_| text.trim().parse::<Timestamp>().map_err(|e| e.to_string()));
    match read {
        Ok(now) => now,
        Err(err) => {
            tracing::error!(
                "test clock {}: {err}; using the system clock",
                path.display()
            );
            Timestamp::now()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_time_from_the_file_each_time() {
        let (_dir, path) = crate::scratch_path("now");
        std::fs::write(&path, "2026-06-01T12:00:00Z\n").unwrap();
        assert_eq!(read(&path), "2026-06-01T12:00:00Z".parse().unwrap());
        std::fs::write(&path, "2026-06-03T02:00:00Z").unwrap();
        assert_eq!(read(&path), "2026-06-03T02:00:00Z".parse().unwrap());
    }

    #[test]
    fn an_unreadable_file_falls_back_to_the_system_clock() {
        let (_dir, path) = crate::scratch_path("now");
        std::fs::write(&path, "not a time").unwrap();
        let before = Timestamp::now();
        let now = read(&path);
        assert!(now >= before && now <= Timestamp::now());
    }
}
