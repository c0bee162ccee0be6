//! The power-cut points of the tests (`UPDATE_AGENT_CRASH_AT`): compiled in only with the
//! `test-hooks` feature; a device build has empty functions in their place.

#[cfg(feature = "test-hooks")]
use std::sync::atomic::{AtomicU64, Ordering};

/// Power-cut simulation for tests: `UPDATE_AGENT_CRASH_AT=<point>` makes the process kill itself
/// with SIGKILL — a real `kill -9`, nothing cleaned up — when it reaches that point. Points are
/// named after what happens next (`persist:writing:after`, `bootloader:activate:before`,
/// `checkpoint:2`, `bytes:1048576`, …; the list is in tests/power_cut.rs). Without the variable
/// every check is a comparison against `None`. Only in builds with the `test-hooks` feature
/// (the tests'); elsewhere every point is an empty function.
#[cfg(feature = "test-hooks")]
pub(super) struct CrashPoints {
    at: Option<String>,
    checkpoints: AtomicU64,
}

#[cfg(not(feature = "test-hooks"))]
pub(super) struct CrashPoints;

#[cfg(not(feature = "test-hooks"))]
impl CrashPoints {
    pub(super) fn from_env() -> CrashPoints {
        CrashPoints
    }

    pub(super) fn point(&self, _name: &str) {}

    pub(super) fn checkpoint_persisted(&self) {}

    pub(super) fn bytes_written(&self, _written: u64) {}

    pub(super) fn bytes_downloaded(&self, _downloaded: u64) {}
}

#[cfg(feature = "test-hooks")]
impl CrashPoints {
    pub(super) fn from_env() -> CrashPoints {
        CrashPoints {
            at: crate::crash_point::requested(),
            checkpoints: AtomicU64::new(0),
        }
    }

    pub(super) fn point(&self, name: &str) {
        if self.at.as_deref() == Some(name) {
            crate::crash_point::crash(name);
        }
    }

    pub(super) fn checkpoint_persisted(&self) {
        let count = self.checkpoints.fetch_add(1, Ordering::Relaxed) + 1;
        self.point(&format!("checkpoint:{count}"));
    }

    pub(super) fn bytes_written(&self, written: u64) {
        if let Some(limit) = self.at.as_deref().and_then(|at| at.strip_prefix("bytes:"))
            && limit.parse::<u64>().is_ok_and(|limit| written >= limit)
        {
            crate::crash_point::crash(&format!("bytes:{limit}"));
        }
    }

    /// `downloaded:N`: the download reached N bytes (a delta's index and store ranges, or a
    /// full download's bytes as they came).
    pub(super) fn bytes_downloaded(&self, downloaded: u64) {
        if let Some(limit) = self
            .at
            .as_deref()
            .and_then(|at| at.strip_prefix("downloaded:"))
            && limit.parse::<u64>().is_ok_and(|limit| downloaded >= limit)
        {
            crate::crash_point::crash(&format!("downloaded:{limit}"));
        }
    }
}
