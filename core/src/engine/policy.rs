//! The user's say over *when* (EN 303 645 5.3-6): automatic install, maintenance windows, the
//! reboot policy and postponement — bounded so that a security fix still lands.
//!
//! Plain functions of the time passed in: no clock is read here. Maintenance windows are local
//! wall-clock times in the configured time zone; they are turned into instants per day with the
//! zone's rules, so a window opens at the same local time on both sides of a DST change, a window
//! that crosses midnight ends on the next day, and a window whose start falls into a DST gap
//! opens at the first instant after the gap.

use core::fmt;
use core::str::FromStr;

use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::prelude::*;
use crate::release::Manifest;

/// Days looked ahead for the next window: windows repeat daily, so two days always suffice;
/// the margin covers days on which a window vanishes in a DST gap.
const WINDOW_LOOKAHEAD_DAYS: i32 = 8;

/// When the device may reboot into a freshly installed slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    /// As soon as the new slot is activated (after postponement, if the user asked for one).
    #[default]
    Immediate,
    /// Only inside a maintenance window (at once when none is configured).
    Window,
    /// Only when the user asks (`InstallNow`), or at the signed deadline of a security release.
    Manual,
}

impl RebootPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RebootPolicy::Immediate => "immediate",
            RebootPolicy::Window => "window",
            RebootPolicy::Manual => "manual",
        }
    }
}

/// A daily maintenance window in local time, `start` inclusive, `end` exclusive. An `end` at or
/// before `start` means the window crosses midnight and ends the next day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Time,
    pub end: Time,
}

impl FromStr for Window {
    type Err = String;

    /// `HH:MM-HH:MM`, e.g. `02:00-05:00` or `22:30-01:00`.
    fn from_str(text: &str) -> Result<Window, String> {
        let err =
            || format!("window {text:?} is not HH:MM-HH:MM (local time, e.g. \"22:00-02:00\")");
        let (start, end) = text.split_once('-').ok_or_else(err)?;
        let parse = |part: &str| -> Result<Time, String> {
            let (h, m) = part.trim().split_once(':').ok_or_else(err)?;
            let (h, m): (i8, i8) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
            Time::new(h, m, 0, 0).map_err(|_| err())
        };
        let window = Window {
            start: parse(start)?,
            end: parse(end)?,
        };
        if window.start == window.end {
            return Err(format!(
                "window {text:?} is empty; leave `windows` empty to allow any time"
            ));
        }
        Ok(window)
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Window, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start.hour(),
            self.start.minute(),
            self.end.hour(),
            self.end.minute()
        )
    }
}

/// The integrator's policy (the `[policy]` section of the configuration).
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Automatic install when the user has not chosen (EN 303 645 5.3-6: on by default).
    pub auto_install: bool,
    /// Maintenance windows; empty: any time.
    pub windows: Vec<Window>,
    pub reboot: RebootPolicy,
    /// The longest the user may postpone, counted from the moment they ask.
    pub max_postpone: SignedDuration,
    /// With automatic install off, whether a security release's deadline still forces it.
    pub security_deadline_when_off: bool,
    /// How long before a scheduled reboot the user is told (the disruption signal).
    pub notice: SignedDuration,
    /// The zone the windows are in.
    pub time_zone: TimeZone,
}

impl Default for PolicyConfig {
    fn default() -> PolicyConfig {
        PolicyConfig {
            auto_install: true,
            windows: Vec::new(),
            reboot: RebootPolicy::Immediate,
            max_postpone: SignedDuration::from_hours(7 * 24),
            security_deadline_when_off: true,
            notice: SignedDuration::from_mins(5),
            time_zone: TimeZone::UTC,
        }
    }
}

/// What the person who lives with the device chose. Persisted with the engine's state, so it
/// survives restarts and reboots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserChoices {
    /// `None`: the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_install: Option<bool>,
    /// Nothing installs or reboots before this (unless a deadline comes first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postponed_until: Option<Timestamp>,
}

impl UserChoices {
    pub fn is_default(&self) -> bool {
        *self == UserChoices::default()
    }
}

/// What limited a postponement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clamp {
    /// The configured maximum postponement.
    MaxPostpone,
    /// The release's signed deadline.
    Deadline,
}

impl Clamp {
    pub fn as_str(self) -> &'static str {
        match self {
            Clamp::MaxPostpone => "max-postpone",
            Clamp::Deadline => "deadline",
        }
    }
}

/// Why an accepted release is not installing, or an activated slot not rebooted into, yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Wait {
    /// Outside the maintenance windows.
    Window,
    /// The user postponed it.
    Postponed,
    /// Automatic install is off: the user is told and decides (notify only).
    AutoInstallOff,
    /// Reboot policy `manual`: the user reboots (or asks for it).
    ManualReboot,
    /// The release's rollout schedule: this device's moment in the window has not come.
    Rollout,
}

impl Wait {
    pub fn as_str(self) -> &'static str {
        match self {
            Wait::Window => "window",
            Wait::Postponed => "postponed",
            Wait::AutoInstallOff => "auto-install-off",
            Wait::ManualReboot => "manual-reboot",
            Wait::Rollout => "rollout",
        }
    }
}

/// What the policy says about a step now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Now,
    /// Not yet; `until` is when to look again (`None`: only a user decision changes it).
    Wait {
        why: Wait,
        until: Option<Timestamp>,
    },
}

impl PolicyConfig {
    pub fn auto_install(&self, choices: &UserChoices) -> bool {
        choices.auto_install.unwrap_or(self.auto_install)
    }

    /// The deadline that bounds waiting to *install* this release. With automatic install on,
    /// the signed deadline; with it off, only a security release's, and only when the integrator
    /// configured it so.
    pub fn install_deadline(
        &self,
        manifest: &Manifest,
        choices: &UserChoices,
    ) -> Option<Timestamp> {
        if self.auto_install(choices) || (manifest.security && self.security_deadline_when_off) {
            manifest.deadline
        } else {
            None
        }
    }

    /// The deadline that bounds waiting to *reboot* into this release. Under reboot policy
    /// `manual` only a security release has one.
    pub fn reboot_deadline(&self, manifest: &Manifest, choices: &UserChoices) -> Option<Timestamp> {
        match self.reboot {
            RebootPolicy::Manual if !manifest.security => None,
            _ => self.install_deadline(manifest, choices),
        }
    }

    /// May installing (writing the inactive slot) start now? `moment` is this device's moment
    /// in the release's rollout window, if it has one: nothing installs before it unless the
    /// deadline comes first (a person's install-now does not ask the policy at all). After it,
    /// maintenance windows and postponement apply as to any release.
    pub fn install_decision(
        &self,
        now: Timestamp,
        choices: &UserChoices,
        manifest: &Manifest,
        moment: Option<Timestamp>,
    ) -> Decision {
        let deadline = self.install_deadline(manifest, choices);
        if deadline.is_some_and(|d| now >= d) {
            return Decision::Now;
        }
        if !self.auto_install(choices) {
            return wait(Wait::AutoInstallOff, None, deadline);
        }
        if let Some(until) = choices.postponed_until.filter(|&p| p > now) {
            return wait(Wait::Postponed, Some(until), deadline);
        }
        if let Some(moment) = moment.filter(|&m| m > now) {
            return wait(Wait::Rollout, Some(moment), deadline);
        }
        if !self.windows.is_empty() && !self.in_window(now) {
            return wait(Wait::Window, self.next_window_start(now), deadline);
        }
        Decision::Now
    }

    /// May the device reboot into the activated slot now?
    pub fn reboot_decision(
        &self,
        now: Timestamp,
        choices: &UserChoices,
        manifest: &Manifest,
    ) -> Decision {
        let deadline = self.reboot_deadline(manifest, choices);
        if deadline.is_some_and(|d| now >= d) {
            return Decision::Now;
        }
        if let Some(until) = choices.postponed_until.filter(|&p| p > now) {
            return wait(Wait::Postponed, Some(until), deadline);
        }
        match self.reboot {
            RebootPolicy::Immediate => Decision::Now,
            RebootPolicy::Window if self.windows.is_empty() || self.in_window(now) => Decision::Now,
            RebootPolicy::Window => wait(Wait::Window, self.next_window_start(now), deadline),
            RebootPolicy::Manual => wait(Wait::ManualReboot, None, deadline),
        }
    }

    /// The time a postponement asked for `requested` really lasts until: at most
    /// `max_postpone` from `now`, and never past `deadline`.
    pub fn clamp_postpone(
        &self,
        now: Timestamp,
        requested: Timestamp,
        deadline: Option<Timestamp>,
    ) -> (Timestamp, Option<Clamp>) {
        let mut until = requested;
        let mut clamp = None;
        let max = now
            .saturating_add(self.max_postpone)
            .unwrap_or(Timestamp::MAX);
        if until > max {
            until = max;
            clamp = Some(Clamp::MaxPostpone);
        }
        if let Some(deadline) = deadline
            && until > deadline
        {
            until = deadline;
            clamp = Some(Clamp::Deadline);
        }
        (until, clamp)
    }

    pub fn in_window(&self, at: Timestamp) -> bool {
        self.window_spans(at)
            .any(|(start, end)| start <= at && at < end)
    }

    /// When the next maintenance window opens at or after `at` (`at` itself inside a window);
    /// `None` when there are no windows.
    pub fn next_window_start(&self, at: Timestamp) -> Option<Timestamp> {
        if self.in_window(at) {
            return Some(at);
        }
        self.window_spans(at)
            .map(|(start, _)| start)
            .filter(|&start| start >= at)
            .min()
    }

    /// Every window's instants for the days around `at`, from the day before (a window that
    /// crossed midnight may still be open) to a week ahead.
    fn window_spans(&self, at: Timestamp) -> impl Iterator<Item = (Timestamp, Timestamp)> + '_ {
        let today = at.to_zoned_datetime(self.time_zone.clone()).date();
        (-1..=WINDOW_LOOKAHEAD_DAYS)
            .filter_map(move |offset| add_days(today, offset))
            .flat_map(move |day| self.windows.iter().filter_map(move |w| self.span(day, w)))
    }

    fn span(&self, day: Date, window: &Window) -> Option<(Timestamp, Timestamp)> {
        let end_day = if window.end > window.start {
            day
        } else {
            day.tomorrow().ok()?
        };
        let instant = |date: Date, time: Time| {
            date.to_datetime(time)
                .to_zoned_datetime(self.time_zone.clone())
                .ok()
                .map(|z| z.timestamp())
        };
        let start = instant(day, window.start)?;
        let end = instant(end_day, window.end)?;
        // A window entirely inside a DST gap has no instants that day.
        (start < end).then_some((start, end))
    }
}

fn wait(why: Wait, until: Option<Timestamp>, deadline: Option<Timestamp>) -> Decision {
    let until = match (until, deadline) {
        (Some(u), Some(d)) => Some(u.min(d)),
        (u, d) => u.or(d),
    };
    Decision::Wait { why, until }
}

fn add_days(date: Date, days: i32) -> Option<Date> {
    let mut date = date;
    for _ in 0..days.unsigned_abs() {
        date = if days < 0 {
            date.yesterday().ok()?
        } else {
            date.tomorrow().ok()?
        };
    }
    Some(date)
}
