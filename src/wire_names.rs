//! The agent's own wire names, pinned: the words its enums are spelled as in the installer's
//! protocol and ledger, the fleet view, the conformance report and the configuration (the
//! engine's are pinned in the core crate). A rename, or a new variant without a pinned name,
//! must fail here: a daemon and an installer of different builds, a ledger written by an
//! earlier one, or a script reading the report depend on these words.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use update_agent_core::wire_names;

use crate::bootloader::BootloaderKind;
use crate::conformance::selftest::Verdict;
use crate::conformance::standard::{Level, UnitKind};
use crate::conformance::{Source, Status};
use crate::engine::Bootname;
#[cfg(feature = "operator")]
use crate::fleet::Stage;
use crate::installer::ledger::Held;
use crate::installer::{Op, Reply};
use crate::reason::ReasonCode;

/// Written as `name` (a JSON string).
fn assert_written_as<T: Serialize + std::fmt::Debug>(value: &T, name: &str) {
    assert_eq!(
        serde_json::to_value(value).unwrap(),
        json!(name),
        "{value:?}"
    );
}

/// [`assert_written_as`] for each pair.
fn assert_each_written_as<T: Serialize + std::fmt::Debug>(
    pairs: impl IntoIterator<Item = (T, &'static str)>,
) {
    for (value, name) in pairs {
        assert_written_as(&value, name);
    }
}

/// Written as `name`, and `name` read back as the same value.
fn assert_read_and_written_as<T>(value: T, name: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    assert_written_as(&value, name);
    assert_eq!(serde_json::from_value::<T>(json!(name)).unwrap(), value);
}

/// The value of `tag` in what `value` is written as.
fn tag_of(value: &impl Serialize, tag: &str) -> String {
    match serde_json::to_value(value).unwrap() {
        Value::Object(fields) => fields[tag].as_str().unwrap().to_owned(),
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn the_installer_protocol_keeps_its_words() {
    let slot = || Bootname::new("B").unwrap();
    let release = String::from("{}");
    let ops = [
        Op::MarkBad { slot: slot() },
        Op::MarkGood { slot: slot() },
        Op::Activate {
            slot: slot(),
            release: release.clone(),
        },
        Op::Write {
            slot: slot(),
            release: release.clone(),
            resume_from: 0,
        },
        Op::WriteDelta {
            slot: slot(),
            release,
            ranges_per_request: 1,
        },
        Op::Reboot,
    ];
    let kinds: Vec<_> = ops.iter().map(|op| tag_of(op, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "mark-bad",
            "mark-good",
            "activate",
            "write",
            "write-delta",
            "reboot"
        ]
    );
    // `Op::name` (the installer's log) says the same words, and names every variant.
    for (op, kind) in ops.iter().zip(&kinds) {
        assert_eq!(op.name(), kind);
    }

    let replies = [
        Reply::Done,
        Reply::Ready { start: 0 },
        Reply::Progress {
            written: 0,
            total: 1,
        },
        Reply::Checkpoint { durable: 0 },
        Reply::Verifying,
        Reply::Refused {
            reason: ReasonCode::Forbidden,
            message: String::new(),
        },
    ];
    let kinds: Vec<_> = replies.iter().map(|reply| tag_of(reply, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "done",
            "ready",
            "progress",
            "checkpoint",
            "verifying",
            "refused"
        ]
    );
    // A new reply fails to compile here until it is listed above.
    for reply in &replies {
        match reply {
            Reply::Done
            | Reply::Ready { .. }
            | Reply::Progress { .. }
            | Reply::Checkpoint { .. }
            | Reply::Verifying
            | Reply::Refused { .. } => {}
        }
    }
}

#[test]
fn the_installer_ledger_keeps_its_words() {
    let held = [
        Held::Unverified,
        Held::Verified {
            release_id: String::new(),
            security_version: 1,
        },
        Held::Booted,
    ];
    let tags: Vec<_> = held.iter().map(|h| tag_of(h, "held")).collect();
    assert_eq!(tags, ["unverified", "verified", "booted"]);
    for h in &held {
        match h {
            Held::Unverified | Held::Verified { .. } | Held::Booted => {}
        }
    }
}

/// The fleet view (`update-agent monitor`, `rollout`: the operator's tools).
#[cfg(feature = "operator")]
#[test]
fn the_fleet_view_keeps_its_words() {
    let stages = wire_names!(Stage {
        Waiting => "waiting",
        Pending => "pending",
        Installing => "installing",
        Committed => "committed",
        RolledBack => "rolled-back",
        Failed => "failed",
        Refused => "refused",
        Superseded => "superseded",
        Withdrawn => "withdrawn",
    });
    for (stage, name) in stages {
        assert_read_and_written_as(stage, name);
    }
}

#[test]
fn the_configuration_keeps_its_words() {
    let backends = wire_names!(BootloaderKind {
        UBoot => "uboot",
        Grub => "grub",
        File => "file",
    });
    for (backend, name) in backends {
        assert_read_and_written_as(backend, name);
        assert_eq!(backend.to_string(), name, "the CLI's word is the config's");
    }
}

#[test]
fn the_conformance_report_keeps_its_words() {
    let statuses = wire_names!(Status {
        Met => "met",
        Declared => "declared",
        NotApplicable => "not-applicable",
        NeedsDeclaration => "needs-declaration",
        Weakened => "weakened",
        NotMet => "not-met",
    });
    for (status, name) in statuses {
        assert_read_and_written_as(status, name);
    }
    assert_each_written_as(wire_names!(Verdict {
        Pass => "pass",
        Fail => "fail",
        NotRun => "not-run",
    }));
    let levels = wire_names!(Level {
        Shall => "shall",
        Should => "should",
    });
    assert_each_written_as(levels);
    for (level, name) in levels {
        assert_eq!(level.as_str(), name, "the text report's word is the JSON's");
    }
    assert_each_written_as(wire_names!(UnitKind {
        Conceptual => "conceptual",
        Functional => "functional",
    }));
    assert_each_written_as(wire_names!(Source {
        Build => "build",
        Config => "config",
        Checked => "checked",
        Declaration => "declaration",
    }));
}
