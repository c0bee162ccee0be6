//! Where in a staged rollout this device installs: its own moment in the signed window, and a
//! small jitter for the start of every download. Both come from SHA-256 of the release id and
//! the device id, so a device computes the same moment after every restart (nothing to
//! persist), devices spread evenly over the window, and each release draws new cohorts (a
//! device that went first last time is not always first).

use jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use crate::release::ReleaseId;
use crate::release::manifest::Rollout;

/// Separates the two uses of the hash, so the moment and the jitter are independent draws.
const MOMENT_DOMAIN: &[u8] = b"update-agent rollout moment v1\0";
const JITTER_DOMAIN: &[u8] = b"update-agent download jitter v1\0";

/// A number uniform in [0, 2^64) for this release, device and purpose.
fn draw(domain: &[u8], release: &ReleaseId, device_id: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update(domain);
    hash.update(release.digest());
    hash.update(device_id.as_bytes());
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `span` scaled by `draw / 2^64`: a point uniform in [0, span), to the nanosecond, in integers
/// (the same answer on every architecture).
fn scale(span: SignedDuration, draw: u64) -> SignedDuration {
    let nanos = span.as_nanos().max(0) as u128;
    let offset = (nanos * u128::from(draw)) >> 64;
    SignedDuration::from_nanos(offset as i64)
}

/// The fraction of the window at which this device installs, in [0, 1): `u` of
/// `start + duration * u`. For tests and for the tools that show a fleet's spread.
pub fn fraction(release: &ReleaseId, device_id: &str) -> f64 {
    draw(MOMENT_DOMAIN, release, device_id) as f64 / TWO_TO_THE_64
}

/// 2^64, exactly (`f64::powi` is std's, not core's).
const TWO_TO_THE_64: f64 = 18_446_744_073_709_551_616.0;

/// This device's moment in the rollout window: `start + duration * u`, `u` uniform in [0, 1).
pub fn moment(rollout: &Rollout, release: &ReleaseId, device_id: &str) -> Timestamp {
    let duration = SignedDuration::from_secs(
        rollout
            .duration
            .min(crate::release::manifest::MAX_ROLLOUT_DURATION) as i64,
    );
    let offset = scale(duration, draw(MOMENT_DOMAIN, release, device_id));
    rollout
        .start
        .saturating_add(offset)
        .unwrap_or(Timestamp::MAX)
}

/// How long this device waits before it starts downloading this release: uniform in
/// [0, `bound`), so that a fleet told at once does not hit the image server in one second.
pub fn download_jitter(
    release: &ReleaseId,
    device_id: &str,
    bound: SignedDuration,
) -> SignedDuration {
    scale(bound, draw(JITTER_DOMAIN, release, device_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(n: u8) -> ReleaseId {
        ReleaseId::from_digest([n; 32])
    }

    fn window(duration: u64) -> Rollout {
        Rollout {
            start: "2026-03-01T00:00:00Z".parse().unwrap(),
            duration,
        }
    }

    #[test]
    fn a_moment_is_the_same_every_time_and_inside_the_window() {
        let rollout = window(3600);
        let first = moment(&rollout, &release(1), "gw-0001");
        for _ in 0..3 {
            assert_eq!(moment(&rollout, &release(1), "gw-0001"), first);
        }
        assert!(first >= rollout.start && first < rollout.end(), "{first}");
        // Pinned, so that a change of the derivation (which would move every device of a
        // fleet in the middle of a rollout) cannot pass unnoticed.
        assert_eq!(first.to_string(), "2026-03-01T00:04:20.157988373Z");
        let expected = rollout.start
            + scale(
                SignedDuration::from_secs(3600),
                draw(MOMENT_DOMAIN, &release(1), "gw-0001"),
            );
        assert_eq!(first, expected);
        // A window of zero: everyone at the start.
        assert_eq!(moment(&window(0), &release(1), "gw-0001"), rollout.start);
    }

    #[test]
    fn the_derivation_is_sha256_of_domain_release_and_device() {
        let mut input = MOMENT_DOMAIN.to_vec();
        input.extend_from_slice(&[7; 32]);
        input.extend_from_slice(b"gw-0042");
        let digest = Sha256::digest(&input);
        let u = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(draw(MOMENT_DOMAIN, &release(7), "gw-0042"), u);
        let expected = (u128::from(u) * 86_400_000_000_000u128) >> 64;
        let got = moment(&window(86_400), &release(7), "gw-0042") - window(86_400).start;
        assert_eq!(got.as_nanos(), expected as i128);
    }

    #[test]
    fn different_releases_draw_different_cohorts() {
        let devices: Vec<String> = (0..1000).map(|i| format!("gw-{i:04}")).collect();
        let first_tenth = |r: &ReleaseId| -> Vec<&String> {
            devices
                .iter()
                .filter(|d| fraction(r, d) < 0.1)
                .collect::<Vec<_>>()
        };
        let (a, b) = (first_tenth(&release(1)), first_tenth(&release(2)));
        let both = a.iter().filter(|d| b.contains(d)).count();
        // Independent draws share about 10 % of a tenth (10 devices); the same cohort would
        // share all of it (about 100).
        assert!(both < 30, "{both} of {} devices are first in both", a.len());
        // And the jitter is not the moment again.
        let same = devices
            .iter()
            .filter(|d| {
                let u = fraction(&release(1), d);
                let j = download_jitter(&release(1), d, SignedDuration::from_secs(1000));
                (u * 1000.0 - j.as_secs_f64()).abs() < 1.0
            })
            .count();
        assert!(same < 20, "{same}");
    }

    /// 10,000 simulated device ids over a 10-bin histogram of their moments. With n = 10,000
    /// and 10 bins, each bin count is Binomial(10,000, 0.1): mean 1,000, standard deviation 30.
    /// The chi-square statistic has 9 degrees of freedom; its 0.999 quantile is 27.88, so a
    /// uniform hash fails this test once in a thousand id sets — and the ids are fixed, so it
    /// either always passes or never. Each bin is also within 5 standard deviations (150).
    #[test]
    fn moments_are_uniform_over_the_window_for_ten_thousand_devices() {
        const DEVICES: usize = 10_000;
        const BINS: usize = 10;
        let rollout = window(60);
        let id = release(42);
        let mut bins = [0usize; BINS];
        for i in 0..DEVICES {
            let at = moment(&rollout, &id, &format!("bench-{i:05}"));
            let offset = (at - rollout.start).as_secs_f64();
            assert!((0.0..60.0).contains(&offset), "{offset}");
            bins[(offset / 60.0 * BINS as f64) as usize] += 1;
        }
        let expected = (DEVICES / BINS) as f64;
        let chi_square: f64 = bins
            .iter()
            .map(|&n| (n as f64 - expected).powi(2) / expected)
            .sum();
        eprintln!("chi-square {chi_square:.2} (bound 27.88), bins {bins:?}");
        assert!(chi_square < 27.88, "chi-square {chi_square:.2}: {bins:?}");
        let worst = bins
            .iter()
            .map(|&n| (n as f64 - expected).abs())
            .fold(0.0, f64::max);
        assert!(worst < 150.0, "largest deviation {worst}: {bins:?}");
    }

    #[test]
    fn the_download_jitter_is_bounded_and_spread() {
        let bound = SignedDuration::from_secs(10);
        let jitters: Vec<SignedDuration> = (0..1000)
            .map(|i| download_jitter(&release(3), &format!("gw-{i}"), bound))
            .collect();
        assert!(
            jitters
                .iter()
                .all(|j| *j >= SignedDuration::ZERO && *j < bound)
        );
        let early = jitters
            .iter()
            .filter(|j| **j < SignedDuration::from_secs(5))
            .count();
        assert!((400..600).contains(&early), "{early}");
        assert_eq!(
            download_jitter(&release(3), "gw-1", SignedDuration::ZERO),
            SignedDuration::ZERO
        );
    }
}
