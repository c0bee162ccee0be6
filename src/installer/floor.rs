//! The installer's own anti-rollback floor, so that a compromised daemon cannot have an older,
//! validly signed release written and activated: the daemon's engine keeps a floor too, but the
//! installer does not take the daemon's word for anything.
//!
//! The installer records the security version of the release whose image it wrote and read back
//! into each slot; when a slot is marked good while booted (the commit, or an ordinary boot), the
//! floor rises to that slot's version. Kept in `floor.json` under `[installer] state_dir`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::durable;

/// The file is a few hundred bytes.
const MAX_FLOOR_FILE: u64 = 64 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    floor: u64,
    /// Security version of the verified content of each slot, by bootname.
    slots: BTreeMap<String, u64>,
}

pub struct Floor {
    path: PathBuf,
    record: Record,
}

impl Floor {
    /// Loads the record (none yet: floor 0), creating the directory.
    pub fn open(dir: &Path) -> io::Result<Floor> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("floor.json");
        let record = match durable::read_bounded(&path, MAX_FLOOR_FILE) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Record::default(),
            Err(e) => return Err(e),
        };
        Ok(Floor { path, record })
    }

    pub fn floor(&self) -> u64 {
        self.record.floor
    }

    /// The slot's content is about to change: it no longer holds a verified release.
    pub fn forget(&mut self, slot: &str) -> io::Result<()> {
        if self.record.slots.remove(slot).is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// The slot holds, read back, the image of a release with this security version.
    pub fn wrote(&mut self, slot: &str, security_version: u64) -> io::Result<()> {
        self.record.slots.insert(slot.to_string(), security_version);
        self.save()
    }

    /// The booted slot was marked good: what it runs is now the lowest acceptable version.
    pub fn committed(&mut self, slot: &str) -> io::Result<()> {
        if let Some(&version) = self.record.slots.get(slot)
            && version > self.record.floor
        {
            self.record.floor = version;
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.record).map_err(io::Error::other)?;
        durable::write_atomically(&self.path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_rises_only_with_a_verified_slot_marked_good_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut floor = Floor::open(dir.path()).unwrap();
        assert_eq!(floor.floor(), 0);
        floor.committed("B").unwrap();
        assert_eq!(floor.floor(), 0, "nothing known of B");
        floor.wrote("B", 5).unwrap();
        floor.committed("B").unwrap();
        assert_eq!(floor.floor(), 5);
        floor.wrote("A", 3).unwrap();
        floor.committed("A").unwrap();
        assert_eq!(floor.floor(), 5, "never lowered");
        floor.forget("B").unwrap();
        let floor = Floor::open(dir.path()).unwrap();
        assert_eq!(floor.floor(), 5);
        assert_eq!(floor.record.slots.get("B"), None);
    }
}
