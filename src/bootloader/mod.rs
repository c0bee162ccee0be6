//! Bootloader backends: how the agent tells U-Boot, GRUB or a plain file which slot to boot
//! next, and reads back what the bootloader will do. The backend is chosen once, at start-up,
//! by [`open`] from the agent's `[bootloader]` and `[slots]` (or by [`from_config`] from the
//! settings alone); everything after that goes through the [`Bootloader`] trait.
//!
//! Slots are named by their **bootname** (`A`, `B`, `system0`), the word the boot script uses.
//! The variables and their meaning are RAUC's, so a board set up for RAUC works unchanged.
//!
//! # What each operation writes
//!
//! Every operation is a single write of the environment: one `fw_setenv -s SCRIPT`, one
//! `grub-editenv FILE set A=… B=…`, or one atomic rename of the file. The result is read back
//! and compared, so a tool that reports success without writing is an error, not a silent
//! no-op.
//!
//! | operation        | U-Boot and file                                          | GRUB                                           |
//! |------------------|----------------------------------------------------------|------------------------------------------------|
//! | `mark_active(x)` | `BOOT_ORDER` = x, then the rest of the order; `BOOT_x_LEFT` = attempts | `ORDER` = x, then the rest of the order; `x_OK=1`; `x_TRY=0` |
//! | `mark_good(x)`   | `BOOT_x_LEFT` = attempts                                 | `x_OK=1`; `x_TRY=0`                            |
//! | `mark_bad(x)`    | `BOOT_ORDER` = the order without x; `BOOT_x_LEFT=0`      | `x_OK=0`; `x_TRY=0`                            |
//!
//! "The rest of the order" is the current order (or, when unset, the configured slots) without
//! x, repeats, words that cannot be bootnames, and entries past
//! [`slots::MAX_ORDER_ENTRIES`]; names the agent does not manage, such as a recovery slot,
//! stay. `BOOT_x_LEFT` is written in hex without `0x`, as RAUC and U-Boot's `setexpr` do.
//! Mark-good and mark-bad leave the order alone on GRUB (as RAUC does); on U-Boot, mark-good
//! does not put a slot back into `BOOT_ORDER` (also as RAUC does).
//!
//! # What the reads mean
//!
//! [`Bootloader::primary`] is the slot the boot script will pick at the next boot: the first
//! configured slot in the order that is bootable — on U-Boot with `BOOT_x_LEFT` > 0, on GRUB
//! with `x_OK=1` and `x_TRY=0`. Unset variables get the defaults the scripts in `config/boot/`
//! give them (order: the configured slots; U-Boot counter: `attempts`; GRUB: `OK=0`, `TRY=0`).
//! `None` means no slot is bootable by these rules: the scripts then fall back (U-Boot resets
//! every counter and resets the board; GRUB clears the TRY flags of OK slots and boots its first
//! entry). A counter or flag that is not a number is an error naming the variable, not a
//! guess; marking the slot rewrites it.
//!
//! Note the two schemes differ during a trial boot: U-Boot keeps the trial slot primary while it
//! has tries left, GRUB gives it exactly one try, so right after that try `primary()` already
//! names the fallback.
//!
//! # Inside
//!
//! `chooser` does what all backends share (check the bootname, serialise changes, read, write
//! one change, read back); a scheme says what the variables mean (`counter`: U-Boot's
//! `BOOT_ORDER`/`BOOT_x_LEFT`, `grub`: `ORDER`/`x_OK`/`x_TRY`); a store reads and writes them
//! (`uboot`, `grub`, `file`), the tools through `tool`, which bounds what they may print.
//! `simulator` plays the boot scripts for the tests and the demo; the agent never uses it.

mod chooser;
mod counter;
mod file;
mod grub;
#[cfg(feature = "sim")]
pub mod simulator;
pub mod slots;
mod store;
mod tool;
mod uboot;

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use file::MAX_ENV_FILE;
pub use tool::MAX_TOOL_OUTPUT;

use self::chooser::EnvBootloader;
use self::slots::Slots;
use crate::config::BootloaderConfig;

/// The most tries a slot may get. Scripts test the counter either as `0x${BOOT_x_LEFT}` or as
/// plain `${BOOT_x_LEFT}` (decimal); with one digit both read the same.
pub const MAX_ATTEMPTS: u32 = 9;

/// The operations the agent needs from a bootloader, by slot bootname.
pub trait Bootloader: Send + Sync {
    fn kind(&self) -> BootloaderKind;

    /// The slot the bootloader will try at the next boot, if any is bootable.
    fn primary(&self) -> Result<Option<String>, BootloaderError>;

    /// Makes `name` the first slot in the boot order, with a fresh try budget.
    fn mark_active(&self, name: &str) -> Result<(), BootloaderError>;

    /// Keeps `name` bootable with its full try budget (after a successful boot).
    fn mark_good(&self, name: &str) -> Result<(), BootloaderError>;

    /// Makes `name` unbootable until it is marked active again.
    fn mark_bad(&self, name: &str) -> Result<(), BootloaderError>;

    /// What the environment says about one slot, for `status`.
    fn slot_state(&self, name: &str) -> Result<SlotBootState, BootloaderError>;
}

/// One slot as the bootloader environment describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotBootState {
    /// Listed in `BOOT_ORDER` / `ORDER` (or, when that is unset, among the configured slots).
    pub in_order: bool,
    /// RAUC's "good": in the order and bootable (U-Boot: tries left; GRUB: OK and not tried).
    pub good: bool,
    /// U-Boot and file: `BOOT_x_LEFT` as stored, `None` when unset (the script then starts at
    /// the attempt budget). GRUB: 1 when OK and untried, else 0 — its script allows one try.
    pub tries_left: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootloaderKind {
    #[serde(rename = "uboot")]
    UBoot,
    #[serde(rename = "grub")]
    Grub,
    #[serde(rename = "file")]
    File,
}

impl fmt::Display for BootloaderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootloaderKind::UBoot => "uboot",
            BootloaderKind::Grub => "grub",
            BootloaderKind::File => "file",
        })
    }
}

/// Chooses and checks the backend once, for the slots' bootnames (in the order the boot script
/// uses when the environment has none) and the typed `[bootloader]` settings: a missing program
/// or a bad setting is reported here, at start-up, rather than at the first switch.
pub fn from_config(
    slots: &[String],
    config: &BootloaderConfig,
) -> Result<Box<dyn Bootloader>, BootloaderError> {
    let slots = Slots::new(slots)?;
    let counter = |attempts: u32| {
        if (1..=MAX_ATTEMPTS).contains(&attempts) {
            Ok(counter::Counter { attempts })
        } else {
            Err(BootloaderError::Config(format!(
                "`bootloader.attempts` is {attempts}; it must be 1 to {MAX_ATTEMPTS} (the boot scripts read one digit)"
            )))
        }
    };
    Ok(match config {
        BootloaderConfig::Uboot {
            fw_env_config,
            attempts,
            fw_printenv,
            fw_setenv,
        } => {
            let counter = counter(*attempts)?;
            tool::require_program(fw_printenv, "fw_printenv", "libubootenv-tool")?;
            tool::require_program(fw_setenv, "fw_setenv", "libubootenv-tool")?;
            if let Some(config) = fw_env_config
                && !config.is_file()
            {
                return Err(BootloaderError::Config(format!(
                    "`bootloader.fw_env_config` {} does not exist; it must describe where the U-Boot environment is",
                    config.display()
                )));
            }
            let store = uboot::UBootEnv::new(
                fw_printenv.clone(),
                fw_setenv.clone(),
                fw_env_config.as_deref(),
            );
            let kind = BootloaderKind::UBoot;
            Box::new(EnvBootloader::new(kind, counter, Box::new(store), slots))
        }
        BootloaderConfig::Grub {
            grubenv,
            grub_editenv,
        } => {
            tool::require_program(grub_editenv, "grub_editenv", "grub-common")?;
            let store = grub::GrubEnv::new(grub_editenv.clone(), grubenv.clone());
            Box::new(EnvBootloader::new(
                BootloaderKind::Grub,
                grub::OkTry,
                Box::new(store),
                slots,
            ))
        }
        BootloaderConfig::File { path, attempts } => {
            let counter = counter(*attempts)?;
            let store = file::FileEnv { path: path.clone() };
            let kind = BootloaderKind::File;
            Box::new(EnvBootloader::new(kind, counter, Box::new(store), slots))
        }
    })
}

/// Chooses the bootloader backend once, from the agent's configuration: the slots' bootnames
/// and the backend's `[bootloader]` settings.
pub fn open(config: &crate::config::Config) -> Result<Box<dyn Bootloader>, BootloaderError> {
    let slots = [
        config.slots.a.bootname.to_string(),
        config.slots.b.bootname.to_string(),
    ];
    from_config(&slots, &config.bootloader)
}

/// Why a bootloader operation failed; each message names the command or file and what to check.
#[derive(Debug, thiserror::Error)]
pub enum BootloaderError {
    #[error("invalid bootloader setting: {0}")]
    Config(String),
    #[error("{0}")]
    BadBootname(String),
    #[error(
        "slot {name} is not one of the configured slots ({configured}); check `bootloader.slots`"
    )]
    UnknownSlot { name: String, configured: String },
    #[error("cannot run `{command}`: {source}; {hint}")]
    Spawn {
        command: String,
        source: std::io::Error,
        hint: String,
    },
    #[error("`{command}` failed ({status}): {stderr}; {hint}")]
    ToolFailed {
        command: String,
        status: String,
        stderr: String,
        hint: String,
    },
    #[error("`{command}` did not finish within {seconds} s and was killed; {hint}")]
    ToolTimedOut {
        command: String,
        seconds: u64,
        hint: String,
    },
    #[error(
        "`{command}` printed more than {limit} bytes, more than any bootloader environment; check that it is the right program"
    )]
    OutputTooLarge { command: String, limit: usize },
    #[error("bootloader environment from {store} is unusable: {what}")]
    Malformed { store: String, what: String },
    #[error("cannot read {path}: {source}; {hint}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the change did not reach the environment ({store}): {name} is \"{found}\", expected \"{expected}\"; \
         check that the tool is libubootenv's or GRUB's and that the environment is writable"
    )]
    NotApplied {
        store: String,
        name: String,
        expected: String,
        found: String,
    },
}
