//! GRUB: a grubenv file read and written by `grub-editenv`, with the variables of RAUC's GRUB
//! integration: `ORDER` lists bootnames, `<name>_OK=1` means the slot may be booted,
//! `<name>_TRY=1` means it was tried since it was last marked.
//!
//! The script (`config/boot/grub.cfg`) presets `ORDER` to the configured order and every
//! `<name>_OK`/`<name>_TRY` to 0 before `load_env`, so the reads here treat unset the same way.
//! An `ORDER` that is set but empty stays empty, as it does in the script.

use std::ffi::OsString;
use std::path::PathBuf;

use super::slots::{Slots, order_with_first};
use super::store::{Change, ChangeLock, EnvStore, Vars, apply};
use super::tool::Tool;
use super::{Bootloader, BootloaderError, BootloaderKind, SlotBootState};
use crate::release::escape_for_log;

pub const ORDER_VAR: &str = "ORDER";

pub fn ok_var(name: &str) -> String {
    format!("{name}_OK")
}

pub fn try_var(name: &str) -> String {
    format!("{name}_TRY")
}

/// A grubenv file, through `grub-editenv`.
pub struct GrubEnv {
    pub editenv: Tool,
    pub file: PathBuf,
}

impl GrubEnv {
    pub fn new(editenv: PathBuf, file: PathBuf) -> GrubEnv {
        let failure_hint = format!(
            "check that {} is the grubenv your grub.cfg loads (is its partition mounted?) and that it \
             was made with `grub-editenv {} create`",
            file.display(),
            file.display()
        );
        GrubEnv {
            editenv: Tool {
                program: editenv,
                leading_args: vec![file.clone().into()],
                setting: "grub_editenv",
                package: "grub-common (grub-editenv)",
                failure_hint,
            },
            file,
        }
    }

    /// `grub-editenv FILE list` and `set` create a missing FILE. A grubenv that is not where it
    /// should be (an unmounted /boot) must be reported, not silently replaced by an empty one.
    fn require_file(&self) -> Result<(), BootloaderError> {
        match std::fs::metadata(&self.file) {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(BootloaderError::Malformed {
                store: self.file.display().to_string(),
                what: "it is not a regular file".to_owned(),
            }),
            Err(source) => Err(BootloaderError::Read {
                path: self.file.clone(),
                source,
                hint: self.editenv.failure_hint.clone(),
            }),
        }
    }
}

impl EnvStore for GrubEnv {
    fn read(&self) -> Result<Vars, BootloaderError> {
        self.require_file()?;
        let args: [OsString; 1] = ["list".into()];
        let out = self.editenv.run(&args)?;
        Vars::parse(&out, &self.editenv.display(&args))
    }

    fn write(&self, change: &Change) -> Result<(), BootloaderError> {
        self.require_file()?;
        // One `set` with every variable: grub-editenv rewrites the block once.
        let mut args: Vec<OsString> = vec!["set".into()];
        args.extend(change.0.iter().map(|(n, v)| format!("{n}={v}").into()));
        self.editenv.run(&args).map(drop)
    }

    fn describe(&self) -> String {
        self.editenv.display(&[])
    }
}

pub struct GrubBootloader {
    pub store: GrubEnv,
    pub slots: Slots,
    pub lock: ChangeLock,
}

impl GrubBootloader {
    fn order<'v>(&'v self, vars: &'v Vars) -> std::borrow::Cow<'v, str> {
        match vars.get(ORDER_VAR) {
            Some(order) => order.into(),
            None => self.slots.default_order().into(),
        }
    }

    /// `<name>_OK` or `<name>_TRY` as a number; unset is 0, as the script presets it.
    fn flag(&self, vars: &Vars, var: &str) -> Result<u32, BootloaderError> {
        let Some(value) = vars.get(var) else {
            return Ok(0);
        };
        if (1..=9).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(n) = value.parse() {
                return Ok(n);
            }
        }
        Err(BootloaderError::Malformed {
            store: self.store.describe(),
            what: format!(
                "{var} is \"{}\", not 0 or 1; mark the slot good, bad or active to rewrite it",
                escape_for_log(value, 32)
            ),
        })
    }

    /// What the script would do with this slot if it came to it in `ORDER`: boot it only when
    /// it is OK and not yet tried.
    fn bootable(&self, vars: &Vars, name: &str) -> Result<bool, BootloaderError> {
        Ok(self.flag(vars, &ok_var(name))? == 1 && self.flag(vars, &try_var(name))? == 0)
    }
}

impl Bootloader for GrubBootloader {
    fn kind(&self) -> BootloaderKind {
        BootloaderKind::Grub
    }

    fn primary(&self) -> Result<Option<String>, BootloaderError> {
        let vars = self.store.read()?;
        for name in self.slots.walk(&self.order(&vars)) {
            if self.bootable(&vars, name)? {
                return Ok(Some(name.to_owned()));
            }
        }
        Ok(None)
    }

    fn mark_active(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let vars = self.store.read()?;
        let change = Change::default()
            .set(ORDER_VAR, order_with_first(&self.order(&vars), name))
            .set(ok_var(name), "1")
            .set(try_var(name), "0");
        apply(&self.store, &change)
    }

    fn mark_good(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let change = Change::default()
            .set(ok_var(name), "1")
            .set(try_var(name), "0");
        apply(&self.store, &change)
    }

    fn mark_bad(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let change = Change::default()
            .set(ok_var(name), "0")
            .set(try_var(name), "0");
        apply(&self.store, &change)
    }

    fn slot_state(&self, name: &str) -> Result<SlotBootState, BootloaderError> {
        self.slots.check(name)?;
        let vars = self.store.read()?;
        let in_order = self.order(&vars).split_whitespace().any(|w| w == name);
        let bootable = self.bootable(&vars, name)?;
        Ok(SlotBootState {
            in_order,
            good: in_order && bootable,
            // The script gives a slot one try per mark: untried and OK is one left.
            tries_left: Some(u32::from(bootable)),
        })
    }
}
