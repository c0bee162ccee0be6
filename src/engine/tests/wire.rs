//! The engine's wire formats: `state.json` files written by earlier versions still load, and
//! load into the same document they were written as.

use super::*;

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
    let mut phases = std::collections::BTreeSet::new();
    for (name, text) in STATES_WRITTEN_BY_MAIN {
        let state: PersistentState =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        phases.insert(state.phase.name());
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
    assert_eq!(h.feed(boot(BOOT_2, "B")), vec![Action::RunHealthChecks]);
    assert_eq!(h.states().last(), Some(&TxnState::TrialBoot));
}
