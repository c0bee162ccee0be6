//! What the daemon lets through to verification and to reports: received releases are
//! recognised when seen before (by the bytes, and by the manifest hash once verified), and
//! refusals are rate-limited, so that a flood of bad messages neither repeats work nor grows the
//! disk (every report is an event in the state directory). Pure logic; time is a parameter.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Refusals reported at once before the rate limit applies.
pub const REFUSAL_BURST: u32 = 5;
/// Then one more refusal may be reported per this interval.
pub const REFUSAL_INTERVAL: Duration = Duration::from_secs(60);
/// Received payloads and release ids remembered (oldest forgotten first).
const REMEMBERED: usize = 256;

/// A bounded set that forgets the oldest entry first.
struct Recent<T> {
    items: VecDeque<T>,
}

impl<T: PartialEq> Recent<T> {
    fn new() -> Recent<T> {
        Recent {
            items: VecDeque::new(),
        }
    }

    fn contains(&self, item: &T) -> bool {
        self.items.contains(item)
    }

    /// True if the item was new.
    fn insert(&mut self, item: T) -> bool {
        if self.items.contains(&item) {
            return false;
        }
        if self.items.len() == REMEMBERED {
            self.items.pop_front();
        }
        self.items.push_back(item);
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Refused,
    Offered,
}

pub struct Intake {
    payloads: Recent<([u8; 32], Look)>,
    releases: Recent<String>,
    pub limiter: RefusalLimiter,
}

impl Default for Intake {
    fn default() -> Intake {
        Intake {
            payloads: Recent::new(),
            releases: Recent::new(),
            limiter: RefusalLimiter::new(REFUSAL_BURST, REFUSAL_INTERVAL),
        }
    }
}

impl Intake {
    /// The payload's digest, and whether these exact bytes were looked at before (a retained
    /// message delivered again on reconnect, or a repeated bad message).
    pub fn look(&self, payload: &[u8]) -> ([u8; 32], bool) {
        let digest: [u8; 32] = Sha256::digest(payload).into();
        let seen = self.payloads.contains(&(digest, Look::Refused))
            || self.payloads.contains(&(digest, Look::Offered));
        (digest, seen)
    }

    pub fn refused(&mut self, digest: [u8; 32]) {
        self.payloads.insert((digest, Look::Refused));
    }

    /// A verified release: true the first time its manifest hash is offered.
    pub fn offer(&mut self, digest: [u8; 32], release_id: &str) -> bool {
        self.payloads.insert((digest, Look::Offered));
        self.releases.insert(release_id.to_string())
    }

    /// The periodic re-check: verified releases are looked at again (an install that failed
    /// for a passing reason is retried; the engine ignores one it runs or runs already), while
    /// refused payloads stay refused without another report.
    pub fn forget_offered(&mut self) {
        self.payloads
            .items
            .retain(|(_, look)| *look == Look::Refused);
        self.releases.items.clear();
    }
}

/// Whether a refusal may be reported now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// Report it; `suppressed` refusals were not reported since the last report.
    Report { suppressed: u64 },
    /// Do not; `summary` is set (to the count so far) at most once per interval, for a log line.
    Suppress { summary: Option<u64> },
}

/// A token bucket: `burst` reports at once, then one per `interval`.
pub struct RefusalLimiter {
    burst: u32,
    interval: Duration,
    tokens: u32,
    refilled: Option<Instant>,
    suppressed: u64,
    last_summary: Option<Instant>,
}

impl RefusalLimiter {
    pub fn new(burst: u32, interval: Duration) -> RefusalLimiter {
        RefusalLimiter {
            burst,
            interval,
            tokens: burst,
            refilled: None,
            suppressed: 0,
            last_summary: None,
        }
    }

    pub fn allow(&mut self, now: Instant) -> Allowance {
        let refilled = *self.refilled.get_or_insert(now);
        let periods = now.saturating_duration_since(refilled).as_nanos() / self.interval.as_nanos();
        if periods > 0 {
            self.tokens = self
                .tokens
                .saturating_add(periods.min(u128::from(self.burst)) as u32)
                .min(self.burst);
            self.refilled =
                Some(refilled + self.interval * periods.min(u128::from(u32::MAX)) as u32);
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            let suppressed = std::mem::take(&mut self.suppressed);
            return Allowance::Report { suppressed };
        }
        self.suppressed += 1;
        let due = self
            .last_summary
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last_summary = Some(now);
        }
        Allowance::Suppress {
            summary: due.then_some(self.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_refusals_is_reported_up_to_the_limit_then_one_per_interval() {
        let mut limiter = RefusalLimiter::new(5, Duration::from_secs(60));
        let t0 = Instant::now();
        let reported = (0..1000)
            .filter(|_| matches!(limiter.allow(t0), Allowance::Report { .. }))
            .count();
        assert_eq!(reported, 5);
        // Summaries for the log: one, not 995.
        let mut limiter = RefusalLimiter::new(5, Duration::from_secs(60));
        let summaries = (0..1000)
            .filter(|_| matches!(limiter.allow(t0), Allowance::Suppress { summary: Some(_) }))
            .count();
        assert_eq!(summaries, 1);
        // A minute later one more is reported, and it carries the count of those suppressed.
        assert_eq!(
            limiter.allow(t0 + Duration::from_secs(61)),
            Allowance::Report { suppressed: 995 }
        );
        assert!(matches!(
            limiter.allow(t0 + Duration::from_secs(62)),
            Allowance::Suppress { .. }
        ));
        // After a long quiet time the full burst is available again, no more.
        let later = t0 + Duration::from_secs(3600);
        let reported = (0..10)
            .filter(|_| matches!(limiter.allow(later), Allowance::Report { .. }))
            .count();
        assert_eq!(reported, 5);
    }

    #[test]
    fn the_same_bytes_are_looked_at_once_and_a_release_offered_once() {
        let mut intake = Intake::default();
        let (digest, seen) = intake.look(b"bad");
        assert!(!seen);
        intake.refused(digest);
        assert!(intake.look(b"bad").1);
        let (d1, _) = intake.look(b"release, one signature");
        assert!(intake.offer(d1, "abc"));
        assert!(intake.look(b"release, one signature").1);
        // The same manifest with another signature set: new bytes, same release.
        let (d2, seen) = intake.look(b"release, two signatures");
        assert!(!seen);
        assert!(!intake.offer(d2, "abc"));
        intake.forget_offered();
        assert!(!intake.look(b"release, one signature").1);
        assert!(intake.look(b"bad").1);
        assert!(intake.offer(d1, "abc"));
    }

    #[test]
    fn memory_is_bounded() {
        let mut intake = Intake::default();
        for i in 0..10_000u32 {
            let (digest, _) = intake.look(&i.to_le_bytes());
            intake.refused(digest);
        }
        assert_eq!(intake.payloads.items.len(), REMEMBERED);
    }
}
