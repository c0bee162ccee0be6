//! The progress bar of the CLI's `install` and `status --follow` on a terminal: one line on stderr,
//! redrawn in place, with other output printed above it.
//!
//! Hand-written rather than indicatif: this one line is all the CLI draws, and the crate's
//! template engine and terminal layer were about 45 KiB of the device binary (see Cargo.toml).

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

/// Redraws at most this often: progress events come far more often than a person reads.
const REDRAW: Duration = Duration::from_millis(100);
/// Characters of the bar itself.
const WIDTH: u64 = 30;

/// `  writing [=====>        ] 12.5 MiB/100.0 MiB 20.1 MiB/s eta 5s`
pub struct ProgressLine {
    total: u64,
    done: Cell<u64>,
    started: Instant,
    drawn_at: Cell<Option<Instant>>,
}

impl ProgressLine {
    pub fn new(total: u64) -> ProgressLine {
        ProgressLine {
            total,
            done: Cell::new(0),
            started: Instant::now(),
            drawn_at: Cell::new(None),
        }
    }

    pub fn set_position(&self, done: u64) {
        self.done.set(done.min(self.total));
        let now = Instant::now();
        let due = self
            .drawn_at
            .get()
            .is_none_or(|at| now.duration_since(at) >= REDRAW);
        if due || done >= self.total {
            self.draw(now);
        }
    }

    /// Prints `line` on stdout above the bar.
    pub fn println(&self, line: impl std::fmt::Display) {
        self.clear();
        println!("{line}");
        if self.drawn_at.get().is_some() {
            self.draw(Instant::now());
        }
    }

    /// Takes the bar off the screen for good.
    pub fn finish_and_clear(&self) {
        self.clear();
        self.drawn_at.set(None);
    }

    fn clear(&self) {
        if self.drawn_at.get().is_some() {
            // Carriage return, then erase the line.
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }

    fn draw(&self, now: Instant) {
        let line = render(
            self.done.get(),
            self.total,
            now.duration_since(self.started),
        );
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        self.drawn_at.set(Some(now));
    }
}

fn render(done: u64, total: u64, elapsed: Duration) -> String {
    let filled = if total == 0 {
        WIDTH
    } else {
        (u128::from(done) * u128::from(WIDTH) / u128::from(total)) as u64
    };
    let mut bar = "=".repeat(filled as usize);
    if filled < WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat((WIDTH - filled - 1) as usize));
    }
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        done as f64 / seconds
    } else {
        0.0
    };
    let eta = if rate > 0.0 {
        format_duration((total - done) as f64 / rate)
    } else {
        "?".into()
    };
    format!(
        "  writing [{bar}] {}/{} {}/s eta {eta}",
        format_bytes(done as f64),
        format_bytes(total as f64),
        format_bytes(rate)
    )
}

/// Binary units, one decimal from KiB on: `512 B`, `1.5 KiB`, `12.0 MiB`.
fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024.0 {
        return format!("{bytes:.0} B");
    }
    let mut value = bytes / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `45s`, `3m05s`, `2h10m`.
fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_line_shows_share_amounts_rate_and_eta() {
        let line = render(25 << 20, 100 << 20, Duration::from_secs(5));
        assert_eq!(
            line,
            "  writing [=======>                      ] 25.0 MiB/100.0 MiB 5.0 MiB/s eta 15s"
        );
        let full = render(100, 100, Duration::from_secs(1));
        assert!(full.contains(&format!("[{}]", "=".repeat(30))), "{full}");
        let start = render(0, 100, Duration::ZERO);
        assert!(start.ends_with("0 B/s eta ?"), "{start}");
    }

    #[test]
    fn units_and_durations() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(format_duration(59.4), "59s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(7800.0), "2h10m");
    }
}
