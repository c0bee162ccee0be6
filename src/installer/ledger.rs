//! The installer's own ledger of what each slot holds, and its anti-rollback floor. The daemon
//! keeps a record of its own, but the installer takes the daemon's word for nothing: this
//! ledger is what lets it refuse to make bootable a slot whose bytes it did not verify.
//!
//! Kept in `ledger.json` under `[installer] state_dir` (root's), replaced atomically before every
//! step it vouches for: a slot is recorded [`Held::Unverified`] *before* the first byte of a
//! write reaches it, and [`Held::Verified`] only after the installer read it back against a
//! release it verified itself.
//!
//! # What counts as verified
//!
//! - A slot the installer wrote (or read back at activation) and found to hold the image of a
//!   signed release it verified, with nothing written to it since: [`Held::Verified`].
//! - The booted slot, unless a write to it is recorded and was not verified since: the device
//!   runs it, so it is what the device trusts today. The installer records it as
//!   [`Held::Booted`] whenever it sees it booted, so that it still counts once the device runs
//!   the other slot (the way back of a rollback).
//! - Anything else is not: a slot written and not verified since ([`Held::Unverified`]), and a
//!   slot the installer has never seen booted nor verified (no entry).
//!
//! A security version is known only from a verified release. A slot trusted because it booted
//! counts as the configured `[trust] floor`: once a commit has raised the floor above that,
//! falling back to it would be a rollback, and it no longer counts as a slot to fall back to.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

/// The file is a few hundred bytes.
const MAX_LEDGER_FILE: u64 = 64 * 1024;
const LEDGER_FILE: &str = "ledger.json";
/// The floor's file before the ledger existed (`{"floor": N, "slots": {"B": N}}`); read once
/// so that an upgraded installer keeps its floor.
const OLD_FLOOR_FILE: &str = "floor.json";

/// What the installer knows of one slot's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "held", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Held {
    /// A write started and the bytes were not verified since: never made bootable.
    Unverified,
    /// Read back by the installer: the image of this release (hex manifest hash; empty when
    /// carried over from the old floor file), with this security version.
    Verified {
        release_id: String,
        security_version: u64,
    },
    /// Seen booted with no write since: the system the device runs.
    Booted,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    /// The lowest security version the installer still accepts: raised when a verified slot is
    /// marked good while booted (a commit, or an ordinary boot of it).
    floor: u64,
    /// By bootname.
    slots: BTreeMap<String, Held>,
}

#[derive(Debug, Deserialize)]
struct OldFloorRecord {
    floor: u64,
    slots: BTreeMap<String, u64>,
}

/// Why a slot may not be made bootable, for the refusal's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrusted(pub String);

pub struct Ledger {
    path: PathBuf,
    record: Record,
}

impl Ledger {
    /// Loads the ledger (none yet: floor 0, nothing known), creating the directory. A ledger
    /// that does not parse is an error: starting afresh would forget which slot is unverified.
    pub fn open(dir: &Path) -> io::Result<Ledger> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LEDGER_FILE);
        let unreadable = |path: &Path, e: serde_json::Error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {e}; it is the installer's record of which slot holds verified bytes: \
                     restore it, or remove it only after writing both slots anew",
                    path.display()
                ),
            )
        };
        let record = match durable::read_bounded(&path, MAX_LEDGER_FILE) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| unreadable(&path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let old = dir.join(OLD_FLOOR_FILE);
                match durable::read_bounded(&old, MAX_LEDGER_FILE) {
                    Ok(bytes) => {
                        let old_record: OldFloorRecord =
                            serde_json::from_slice(&bytes).map_err(|e| unreadable(&old, e))?;
                        Record {
                            floor: old_record.floor,
                            slots: old_record
                                .slots
                                .into_iter()
                                .map(|(slot, security_version)| {
                                    let held = Held::Verified {
                                        release_id: String::new(),
                                        security_version,
                                    };
                                    (slot, held)
                                })
                                .collect(),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Record::default(),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(Ledger { path, record })
    }

    pub fn floor(&self) -> u64 {
        self.record.floor
    }

    pub fn held(&self, slot: &str) -> Option<&Held> {
        self.record.slots.get(slot)
    }

    /// The slot's bytes are about to change: from now on they are unverified. Durable before
    /// the caller writes the first byte.
    pub fn writing(&mut self, slot: &str) -> io::Result<()> {
        self.set(slot, Held::Unverified)
    }

    /// The slot was read back and holds the image of this verified release.
    pub fn verified(
        &mut self,
        slot: &str,
        release_id: &str,
        security_version: u64,
    ) -> io::Result<()> {
        self.set(
            slot,
            Held::Verified {
                release_id: release_id.to_string(),
                security_version,
            },
        )
    }

    /// The device runs `slot`: unless a write to it is recorded unverified, it counts as
    /// verified, and is recorded so that it still counts once the other slot boots.
    pub fn saw_booted(&mut self, slot: &str) -> io::Result<()> {
        if self.record.slots.contains_key(slot) {
            return Ok(());
        }
        self.set(slot, Held::Booted)
    }

    /// The booted slot was marked good: what it holds is now the lowest acceptable version.
    pub fn committed(&mut self, slot: &str) -> io::Result<()> {
        if let Some(Held::Verified {
            security_version, ..
        }) = self.record.slots.get(slot)
            && *security_version > self.record.floor
        {
            self.record.floor = *security_version;
            self.save()?;
        }
        Ok(())
    }

    /// Whether `slot` may be marked good: the booted slot unless its bytes are recorded
    /// unverified (it runs; marking it good keeps it as it is), any other only with bytes the
    /// installer verified, of a release not below `floor`.
    pub fn may_mark_good(
        &self,
        slot: &str,
        booted: Option<&str>,
        floor: u64,
    ) -> Result<(), Untrusted> {
        if booted == Some(slot) {
            return match self.held(slot) {
                Some(Held::Unverified) => Err(unverified(slot)),
                _ => Ok(()),
            };
        }
        self.verified_at_floor(slot, floor)
    }

    /// Whether `slot` is one the bootloader may fall back to when the other is marked bad: the
    /// booted slot, a verified one not below `floor`, or one seen booted when nothing above the
    /// configured floor was committed since (`configured_floor`).
    pub fn may_fall_back_to(
        &self,
        slot: &str,
        booted: Option<&str>,
        floor: u64,
        configured_floor: u64,
    ) -> Result<(), Untrusted> {
        match self.held(slot) {
            Some(Held::Unverified) => Err(unverified(slot)),
            _ if booted == Some(slot) => Ok(()),
            Some(Held::Booted) if configured_floor >= floor => Ok(()),
            Some(Held::Booted) => Err(Untrusted(format!(
                "slot {slot} is trusted only because it booted before, and a release of \
                 security version {floor} was committed since: booting it again would be a rollback"
            ))),
            _ => self.verified_at_floor(slot, floor),
        }
    }

    fn verified_at_floor(&self, slot: &str, floor: u64) -> Result<(), Untrusted> {
        match self.held(slot) {
            Some(Held::Verified {
                security_version, ..
            }) if *security_version >= floor => Ok(()),
            Some(Held::Verified {
                security_version, ..
            }) => Err(Untrusted(format!(
                "slot {slot} holds a release of security version {security_version}, below the \
                 installer's floor {floor}"
            ))),
            Some(Held::Unverified) => Err(unverified(slot)),
            Some(Held::Booted) | None => Err(Untrusted(format!(
                "the installer has not verified slot {slot}'s bytes against a signed release"
            ))),
        }
    }

    fn set(&mut self, slot: &str, held: Held) -> io::Result<()> {
        if self.record.slots.get(slot) == Some(&held) {
            return Ok(());
        }
        self.record.slots.insert(slot.to_string(), held);
        self.save()
    }

    fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.record).map_err(io::Error::other)?;
        durable::write_atomically(&self.path, &bytes, 0o600)
    }
}

fn unverified(slot: &str) -> Untrusted {
    Untrusted(format!(
        "slot {slot} was written and its bytes were not verified against a signed release since"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_rises_only_with_a_verified_slot_marked_good_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.floor(), 0);
        ledger.committed("B").unwrap();
        assert_eq!(ledger.floor(), 0, "nothing known of B");
        ledger.verified("B", "b1", 5).unwrap();
        ledger.committed("B").unwrap();
        assert_eq!(ledger.floor(), 5);
        ledger.verified("A", "a1", 3).unwrap();
        ledger.committed("A").unwrap();
        assert_eq!(ledger.floor(), 5, "never lowered");
        ledger.writing("B").unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.floor(), 5);
        assert_eq!(ledger.held("B"), Some(&Held::Unverified));
    }

    #[test]
    fn an_unverified_slot_is_never_trusted_and_the_booted_one_is_unless_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(dir.path()).unwrap();
        let booted = Some("A");
        // The factory: A runs, B was never seen.
        assert_eq!(ledger.may_mark_good("A", booted, 0), Ok(()));
        assert!(ledger.may_mark_good("B", booted, 0).is_err());
        assert!(ledger.may_fall_back_to("B", booted, 0, 0).is_err());
        ledger.saw_booted("A").unwrap();
        // A write of B that was refused: B is unverified.
        ledger.writing("B").unwrap();
        assert!(ledger.may_mark_good("B", booted, 0).is_err());
        assert!(ledger.may_fall_back_to("B", booted, 0, 0).is_err());
        // Booted B after all (the bootloader's own last resort): still not trusted.
        assert!(ledger.may_mark_good("B", Some("B"), 0).is_err());
        // Verified: trusted; A, seen booted, is the way back while nothing was committed.
        ledger.verified("B", "b1", 2).unwrap();
        assert_eq!(ledger.may_mark_good("B", booted, 2), Ok(()));
        assert_eq!(ledger.may_fall_back_to("A", Some("B"), 0, 0), Ok(()));
        // B committed at 2: the factory A is older than the floor.
        ledger.committed("B").unwrap();
        assert!(ledger.may_fall_back_to("A", Some("B"), 2, 0).is_err());
        assert_eq!(ledger.may_fall_back_to("A", Some("B"), 2, 2), Ok(()));
        // Below the floor: not trusted either.
        assert!(ledger.may_mark_good("B", booted, 3).is_err());
    }

    #[test]
    fn the_old_floor_file_is_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(OLD_FLOOR_FILE),
            br#"{"floor": 4, "slots": {"B": 4}}"#,
        )
        .unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        assert_eq!(ledger.floor(), 4);
        assert_eq!(ledger.may_fall_back_to("B", Some("A"), 4, 0), Ok(()));
    }
}
