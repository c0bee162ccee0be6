//! Reconnect back-off: exponential, capped, with jitter, so that a fleet whose broker restarts
//! does not reconnect in lock-step (EN 303 645 5.9). Pure arithmetic: the random numbers come
//! in as parameters, so tests can pin them.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    /// Failures since the last successful connection.
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay before the next attempt after one more failure. "Equal jitter": half of the
    /// exponential step is fixed, the other half random (`random` uniform in [0, 1)), so that
    /// attempts spread out but never come back-to-back.
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let exp = self.failures.min(30);
        self.failures = self.failures.saturating_add(1);
        let step = self
            .min
            .checked_mul(1u32 << exp.min(20))
            .unwrap_or(self.max)
            .min(self.max);
        let half = step / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }

    /// The delay before the next attempt when retrying soon would only fail the same way: the
    /// longest step, jittered like the others.
    pub fn longest(&mut self, random: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let half = self.max / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }

    /// A connection succeeded: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A uniform random number in [0, 1) from the OS (jitter needs no cryptographic quality, but
/// the OS source is already there and never blocks after boot).
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// `interval` scaled by a random factor in [1 - spread, 1 + spread].
pub fn jittered(interval: Duration, spread: f64, random: f64) -> Duration {
    interval.mul_f64(1.0 - spread + 2.0 * spread * random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let top: Vec<u64> = (0..9).map(|_| b.next_delay(1.0).as_secs()).collect();
        assert_eq!(top, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
    }

    #[test]
    fn the_longest_step_is_the_cap_and_a_success_still_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(b.longest(0.0), Duration::from_secs(150));
        assert_eq!(b.longest(1.0), Duration::from_secs(300));
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_a_step_to_a_step() {
        let mut b = Backoff::new(Duration::from_secs(4), Duration::from_secs(300));
        for r in [0.0, 0.25, 0.999] {
            b.reset();
            let d = b.next_delay(r);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
        for _ in 0..100 {
            let r = random_unit();
            assert!((0.0..1.0).contains(&r));
        }
        let d = jittered(Duration::from_secs(100), 0.2, 0.0);
        assert_eq!(d, Duration::from_secs(80));
        let d = jittered(Duration::from_secs(100), 0.2, 1.0);
        assert_eq!(d, Duration::from_secs(120));
    }

    #[test]
    fn many_failures_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(300));
        for _ in 0..1000 {
            assert!(b.next_delay(0.5) <= Duration::from_secs(300));
        }
    }
}
