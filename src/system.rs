//! Facts about the running system that the engine needs: which boot this is (kernel boot id) and
//! which slot it booted from. Paths come from the config so tests can simulate boots.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::durable;
use crate::engine::{BootId, Bootname};

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("cannot read the boot id from {path}: {source}")]
    BootId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot tell which slot is booted: no update_agent.slot= or rauc.slot= on the kernel command line ({cmdline}) and / is on neither {a} nor {b}; add `update_agent.slot=<bootname>` to the kernel command line or set system.booted_slot"
    )]
    BootedUnknown {
        cmdline: PathBuf,
        a: PathBuf,
        b: PathBuf,
    },
    #[error("the kernel command line names slot {name:?}, which is neither {a:?} nor {b:?}")]
    BootedNotConfigured { name: String, a: String, b: String },
}

pub fn boot_id(config: &Config) -> Result<BootId, SystemError> {
    let path = &config.system.boot_id_path;
    let bytes = durable::read_bounded(path, 256).map_err(|source| SystemError::BootId {
        path: path.clone(),
        source,
    })?;
    BootId::new(String::from_utf8_lossy(&bytes).trim()).map_err(|e| SystemError::BootId {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// The bootname of the booted slot: the override, else the kernel command line, else the slot
/// whose block device holds `/`.
pub fn booted_slot(config: &Config) -> Result<Bootname, SystemError> {
    let (a, b) = (&config.slots.a, &config.slots.b);
    let name = match &config.system.booted_slot {
        Some(name) => Some(name.clone()),
        None => durable::read_bounded(&config.system.cmdline_path, 64 * 1024)
            .ok()
            .and_then(|bytes| slot_from_cmdline(&String::from_utf8_lossy(&bytes))),
    };
    if let Some(name) = name {
        // The configured slot's name: only a name the configuration holds goes on.
        return match config.slot_by_bootname(&name) {
            Some(slot) => Ok(slot.bootname.clone()),
            None => Err(SystemError::BootedNotConfigured {
                name: crate::release::escape_for_log(&name, 32),
                a: a.bootname.to_string(),
                b: b.bootname.to_string(),
            }),
        };
    }
    for slot in [a, b] {
        if holds_root(&slot.device) {
            return Ok(slot.bootname.clone());
        }
    }
    Err(SystemError::BootedUnknown {
        cmdline: config.system.cmdline_path.clone(),
        a: a.device.clone(),
        b: b.device.clone(),
    })
}

/// `update_agent.slot=B` (ours) or `rauc.slot=B` (RAUC's, so boards set up for RAUC work).
pub fn slot_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline.split_ascii_whitespace().find_map(|word| {
        word.strip_prefix("update_agent.slot=")
            .or_else(|| word.strip_prefix("rauc.slot="))
            .map(str::to_owned)
    })
}

/// True when `device` is the block device the running system's `/` is on.
pub fn holds_root(device: &Path) -> bool {
    let (Ok(dev), Ok(root)) = (std::fs::metadata(device), std::fs::metadata("/")) else {
        return false;
    };
    dev.file_type().is_block_device() && dev.rdev() == root.dev()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_the_slot_ours_or_raucs() {
        assert_eq!(
            slot_from_cmdline("root=/dev/vda3 update_agent.slot=B quiet"),
            Some("B".into())
        );
        assert_eq!(slot_from_cmdline("rauc.slot=A"), Some("A".into()));
        assert_eq!(slot_from_cmdline("root=/dev/vda3 quiet"), None);
    }
}
