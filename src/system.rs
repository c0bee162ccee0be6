//! Facts about the running system that the engine needs: which boot this is (kernel boot id) and
//! which slot it booted from. Paths come from the config so tests can simulate boots.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    #[error(
        "the kernel command line says slot {cmdline} is booted, but / is on slot {root}'s device; \
         refusing to guess which slot may be written: check the boot script's bootargs (the \
         last update_agent.slot= or rauc.slot= counts) and the slots' devices in the config"
    )]
    BootedMismatch { cmdline: Bootname, root: Bootname },
    #[error("cannot run {command:?}: {message}")]
    Command { command: String, message: String },
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
/// whose block device holds `/`. Where a slot's block device holds `/`, the command line must
/// name that slot: a disagreement is an error, since acting on the wrong one would write the
/// running system.
pub fn booted_slot(config: &Config) -> Result<Bootname, SystemError> {
    let (a, b) = (&config.slots.a, &config.slots.b);
    let name = match &config.system.booted_slot {
        Some(name) => Some(name.clone()),
        None => durable::read_bounded(&config.system.cmdline_path, 64 * 1024)
            .ok()
            .and_then(|bytes| slot_from_cmdline(&String::from_utf8_lossy(&bytes))),
    };
    // The configured slot's name: only a name the configuration holds goes on.
    let named = match name {
        Some(name) => match config.slot_by_bootname(&name) {
            Some(slot) => Some(slot.bootname.clone()),
            None => {
                return Err(SystemError::BootedNotConfigured {
                    name: crate::release::escape_for_log(&name, 32),
                    a: a.bootname.to_string(),
                    b: b.bootname.to_string(),
                });
            }
        },
        None => None,
    };
    let root = [a, b]
        .into_iter()
        .find(|slot| holds_root(&slot.device))
        .map(|slot| slot.bootname.clone());
    reconcile(named, root).ok_or_else(|| SystemError::BootedUnknown {
        cmdline: config.system.cmdline_path.clone(),
        a: a.device.clone(),
        b: b.device.clone(),
    })?
}

/// The booted slot from what the command line names and which slot's device holds `/`.
fn reconcile(
    cmdline: Option<Bootname>,
    root: Option<Bootname>,
) -> Option<Result<Bootname, SystemError>> {
    match (cmdline, root) {
        (Some(cmdline), Some(root)) if cmdline != root => {
            Some(Err(SystemError::BootedMismatch { cmdline, root }))
        }
        (Some(name), _) | (None, Some(name)) => Some(Ok(name)),
        (None, None) => None,
    }
}

/// `update_agent.slot=B` (ours) or `rauc.slot=B` (RAUC's, so boards set up for RAUC work): the
/// last one on the line. Boot scripts append theirs to `bootargs` (this project's U-Boot
/// script does), so an earlier one is a stale default and the last is the bootloader's choice,
/// as the kernel itself lets a later parameter override an earlier one.
pub fn slot_from_cmdline(cmdline: &str) -> Option<String> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .find_map(|word| {
            word.strip_prefix("update_agent.slot=")
                .or_else(|| word.strip_prefix("rauc.slot="))
        })
        .map(str::to_owned)
}

/// The longest a reboot command may take (`systemctl reboot` only queues the job and returns).
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `argv` (a reboot command) and waits at most `timeout` for it; past that its whole
/// process group is killed and the run is an error.
pub fn run_bounded(argv: &[String], timeout: Duration) -> Result<(), SystemError> {
    use std::os::unix::process::CommandExt;
    let shown = crate::release::escape_for_log(&argv.join(" "), 200);
    let failed = |message: String| SystemError::Command {
        command: shown.clone(),
        message,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| failed("the command is empty".into()))?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(failed(status.to_string())),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.wait();
                return Err(failed(format!(
                    "it did not finish within {} s and was killed",
                    timeout.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(failed(e.to_string())),
        }
    }
}

/// SIGKILL to the process group a child leads (started with `process_group(0)`): its own
/// children go with it.
pub fn kill_group(leader: u32) {
    if let Ok(pid) = i32::try_from(leader) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// True when `device` is the block device the running system's `/` is on.
pub fn holds_root(device: &Path) -> bool {
    let (Ok(dev), Ok(root)) = (std::fs::metadata(device), std::fs::metadata("/")) else {
        return false;
    };
    dev.file_type().is_block_device() && dev.rdev() == root.dev()
}

/// Refuses to write `slot` (at `device`) when it is the `booted` slot or the device behind `/`:
/// whoever writes slots checks this last, whatever asked for the write.
pub fn refuse_running_system(
    slot: &str,
    booted: &str,
    device: &Path,
) -> Result<(), crate::engine::Failure> {
    if slot == booted || holds_root(device) {
        return Err(crate::engine::Failure::new(
            crate::reason::ReasonCode::BootedSlot,
            format!(
                "slot {slot} ({}) is the booted slot; it is never written",
                device.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_booted_slot_is_refused_by_name_and_another_slot_is_not() {
        let (_dir, file) = crate::scratch_path("slot-b");
        std::fs::write(&file, b"").unwrap();
        let refused = refuse_running_system("A", "A", &file).unwrap_err();
        assert_eq!(refused.reason, crate::reason::ReasonCode::BootedSlot);
        assert!(refused.message.contains("slot A"), "{}", refused.message);
        refuse_running_system("B", "A", &file).unwrap();
    }

    #[test]
    fn cmdline_names_the_slot_ours_or_raucs() {
        assert_eq!(
            slot_from_cmdline("root=/dev/vda3 update_agent.slot=B quiet"),
            Some("B".into())
        );
        assert_eq!(slot_from_cmdline("rauc.slot=A"), Some("A".into()));
        assert_eq!(slot_from_cmdline("root=/dev/vda3 quiet"), None);
    }

    #[test]
    fn the_last_slot_on_the_cmdline_counts() {
        // A stale default in bootargs, then the boot script's append.
        assert_eq!(
            slot_from_cmdline("rauc.slot=A root=/dev/mmcblk0p3 rauc.slot=B"),
            Some("B".into())
        );
        assert_eq!(
            slot_from_cmdline("update_agent.slot=A quiet rauc.slot=B"),
            Some("B".into())
        );
    }

    #[test]
    fn the_root_device_and_the_cmdline_must_agree() {
        let some = |s: &str| Some(Bootname::new(s).unwrap());
        assert!(matches!(reconcile(some("B"), some("B")), Some(Ok(s)) if s == "B"));
        assert!(matches!(reconcile(some("B"), None), Some(Ok(s)) if s == "B"));
        assert!(matches!(reconcile(None, some("A")), Some(Ok(s)) if s == "A"));
        assert!(matches!(
            reconcile(some("A"), some("B")),
            Some(Err(SystemError::BootedMismatch { .. }))
        ));
        assert!(reconcile(None, None).is_none());
    }

    #[test]
    fn a_command_that_hangs_is_killed_with_its_children() {
        let hang = Hanging::new("");
        let argv = ["sh".to_string(), "-c".to_string(), hang.script.clone()];
        let started = Instant::now();
        let err = run_bounded(&argv, Duration::from_millis(500)).unwrap_err();
        assert!(err.to_string().contains("did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(hang.child_gone(), "the command's child survived");
        assert!(run_bounded(&["true".to_string()], Duration::from_secs(5)).is_ok());
        assert!(run_bounded(&["false".to_string()], Duration::from_secs(5)).is_err());
    }

    /// A shell script that hangs the way a stuck command does: a long `sleep` started in the
    /// background (its pid written to a file), waited for, then `then`.
    pub(crate) struct Hanging {
        pub script: String,
        pidfile: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Hanging {
        pub fn new(then: &str) -> Hanging {
            let (dir, pidfile) = crate::scratch_path("pid");
            let script = format!("sleep 300 & echo $! > {}; wait{then}", pidfile.display());
            Hanging {
                script,
                pidfile,
                _dir: dir,
            }
        }

        /// Whether the script's `sleep` ended (killed with the script, as it must be).
        pub fn child_gone(&self) -> bool {
            let pid = std::fs::read_to_string(&self.pidfile).unwrap();
            gone(pid.trim().parse().unwrap())
        }
    }

    /// Ended: no such process, or a zombie waiting for whoever reaps orphans here.
    pub(crate) fn gone(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .chars()
                .next();
            if matches!(state, None | Some('Z') | Some('X')) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
