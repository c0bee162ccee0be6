//! The engine's wire formats: the names of its enums as MQTT, D-Bus, the CLI and `state.json`
//! spell them, and `state.json` files written by earlier versions, which must still load into the
//! same document they were written as. A rename must fail here.

use super::*;
use crate::release::manifest::Compression;
use crate::wire_names;

/// Serialises to exactly `"name"`, and `"name"` deserialises to it.
fn assert_wire_name<T>(value: T, name: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + core::fmt::Debug,
{
    let quoted = format!("\"{name}\"");
    assert_eq!(serde_json::to_string(&value).unwrap(), quoted, "{value:?}");
    assert_eq!(serde_json::from_str::<T>(&quoted).unwrap(), value, "{name}");
}

/// [`wire_names!`] of an enum with `as_str`: each pair passes [`assert_wire_name`], and
/// `as_str` (the text the CLI, D-Bus and the log show) spells the same name.
macro_rules! assert_wire_and_text_names {
    ($ty:ident { $($listed:tt)* }) => {
        for (value, name) in wire_names!($ty { $($listed)* }) {
            assert_wire_name(value, name);
            assert_eq!(value.as_str(), name);
        }
    };
}

#[test]
fn event_kinds_keep_their_wire_names() {
    assert_wire_and_text_names!(EventKind {
        Refused => "refused",
        Accepted => "accepted",
        Writing => "writing",
        Written => "written",
        Activated => "activated",
        Rebooting => "rebooting",
        TrialBoot => "trial-boot",
        Committed => "committed",
        Failed => "failed",
        RollingBack => "rolling-back",
        RolledBack => "rolled-back",
        Pending => "pending",
        RebootScheduled => "reboot-scheduled",
        Superseded => "superseded",
        Withdrawn => "withdrawn",
        Postponed => "postponed",
        Resumed => "resumed",
        AutoInstallEnabled => "auto-install-enabled",
        AutoInstallDisabled => "auto-install-disabled",
        InstallNow => "install-now",
        CheckRequested => "check-requested",
        MarkedGood => "marked-good",
        MarkedBad => "marked-bad",
        RebootFailed => "reboot-failed",
    });
}

#[test]
fn policy_words_keep_their_wire_names() {
    assert_wire_and_text_names!(Wait {
        Window => "window",
        Postponed => "postponed",
        AutoInstallOff => "auto-install-off",
        ManualReboot => "manual-reboot",
        Rollout => "rollout",
    });
    assert_wire_and_text_names!(Clamp {
        MaxPostpone => "max-postpone",
        Deadline => "deadline",
    });
    // Also the configuration's words (`[policy] reboot`).
    assert_wire_and_text_names!(RebootPolicy {
        Immediate => "immediate",
        Window => "window",
        Manual => "manual",
    });
}

#[test]
fn manifest_words_keep_their_wire_names() {
    assert_wire_and_text_names!(Severity {
        None => "none",
        Low => "low",
        Medium => "medium",
        High => "high",
        Critical => "critical",
    });
    for (compression, name) in wire_names!(Compression { Zstd => "zstd" }) {
        assert_wire_name(compression, name);
    }
}

/// State files written by the agent at `0bedbaf` (its engine driven through transactions that
/// reach every phase: postponed, superseded, written, activated, scheduled, trial, rolled back,
/// committed), byte for byte as its state store wrote them.
const STATES_WRITTEN_BY_MAIN: &[(&str, &str)] = &[
    (
        "pending-postponed-clamped",
        include_str!("states-written-by-main/pending-postponed-clamped.json"),
    ),
    (
        "pending-superseded",
        include_str!("states-written-by-main/pending-superseded.json"),
    ),
    (
        "writing-install-now",
        include_str!("states-written-by-main/writing-install-now.json"),
    ),
    (
        "writing-checkpoint",
        include_str!("states-written-by-main/writing-checkpoint.json"),
    ),
    (
        "activating",
        include_str!("states-written-by-main/activating.json"),
    ),
    (
        "reboot-scheduled-manual",
        include_str!("states-written-by-main/reboot-scheduled-manual.json"),
    ),
    (
        "reboot-scheduled-postponed",
        include_str!("states-written-by-main/reboot-scheduled-postponed.json"),
    ),
    (
        "reboot-pending",
        include_str!("states-written-by-main/reboot-pending.json"),
    ),
    ("trial", include_str!("states-written-by-main/trial.json")),
    (
        "committing",
        include_str!("states-written-by-main/committing.json"),
    ),
    (
        "rolling-back-mark-bad-failed",
        include_str!("states-written-by-main/rolling-back-mark-bad-failed.json"),
    ),
    (
        "idle-after-rollback",
        include_str!("states-written-by-main/idle-after-rollback.json"),
    ),
    (
        "idle-after-commit-and-refusal",
        include_str!("states-written-by-main/idle-after-commit-and-refusal.json"),
    ),
];

#[test]
fn state_files_written_by_main_load_and_are_written_back_unchanged() {
    let mut phases = alloc::collections::BTreeSet::new();
    for (name, text) in STATES_WRITTEN_BY_MAIN {
        let state: PersistentState =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        phases.insert(state.phase.name());
        // The phase's status name (D-Bus `State`, `status`, the MQTT state) is its wire tag.
        let tag = serde_json::to_value(&state.phase).unwrap()["phase"].clone();
        assert_eq!(tag, state.phase.name(), "{name}");
        // What the state store writes (`to_vec_pretty`) is what it read: no field renamed,
        // dropped or added.
        let written = serde_json::to_string_pretty(&state).unwrap();
        assert_eq!(&written, text, "{name} is written back differently");
    }
    assert_eq!(
        phases.len(),
        9,
        "every phase has a state file written by main: {phases:?}"
    );
}

#[test]
fn an_install_interrupted_by_the_reboot_goes_on_from_a_state_written_by_main() {
    let (_, text) = STATES_WRITTEN_BY_MAIN
        .iter()
        .find(|(name, _)| *name == "reboot-pending")
        .unwrap();
    let mut h = Harness::restore(serde_json::from_str(text).unwrap());
    // The reboot happened and the new slot came up: its trial boot.
    assert_eq!(h.feed(boot(BOOT_2, "B")), vec![Job::CheckHealth]);
    assert_eq!(h.states().last(), Some(&EventKind::TrialBoot));
}
