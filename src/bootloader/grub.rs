//! GRUB: a grubenv file read and written by `grub-editenv`, with the variables of RAUC's GRUB
//! integration: `ORDER` lists bootnames, `<name>_OK=1` means the slot may be booted,
//! `<name>_TRY=1` means it was tried since it was last marked.
//!
//! The script (`config/boot/grub.cfg`) presets `ORDER` to the configured order and every
//! `<name>_OK`/`<name>_TRY` to 0 before `load_env`, so the reads here treat unset the same way.
//! An `ORDER` that is set but empty stays empty, as it does in the script.

use std::borrow::Cow;
use std::ffi::OsString;
use std::path::PathBuf;

use super::BootloaderError;
use super::chooser::{Scheme, Tries};
use super::slots::Slots;
use super::store::{Change, EnvStore, Vars};
use super::tool::Tool;
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

/// RAUC's GRUB variables: `ORDER`, `<name>_OK`, `<name>_TRY`.
pub struct OkTry;

/// `<name>_OK` or `<name>_TRY` as a number; unset is 0, as the script presets it.
fn flag(vars: &Vars, var: &str, origin: &str) -> Result<u32, BootloaderError> {
    let Some(value) = vars.get(var) else {
        return Ok(0);
    };
    if (1..=9).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = value.parse()
    {
        return Ok(n);
    }
    Err(BootloaderError::Malformed {
        store: origin.to_owned(),
        what: format!(
            "{var} is \"{}\", not 0 or 1; mark the slot good, bad or active to rewrite it",
            escape_for_log(value, 32)
        ),
    })
}

impl Scheme for OkTry {
    fn order_var(&self) -> &'static str {
        ORDER_VAR
    }

    fn order<'v>(&self, vars: &'v Vars, slots: &'v Slots) -> Cow<'v, str> {
        match vars.get(ORDER_VAR) {
            Some(order) => order.into(),
            None => slots.default_order().into(),
        }
    }

    /// The script boots a slot only when it is OK and not yet tried, and then only once: an OK,
    /// untried slot has one try left, any other none.
    fn tries(&self, vars: &Vars, name: &str, origin: &str) -> Result<Tries, BootloaderError> {
        let bootable =
            flag(vars, &ok_var(name), origin)? == 1 && flag(vars, &try_var(name), origin)? == 0;
        let tries = u32::from(bootable);
        Ok(Tries {
            effective: tries,
            reported: Some(tries),
        })
    }

    fn good(&self, name: &str) -> Change {
        Change::default()
            .set(ok_var(name), "1")
            .set(try_var(name), "0")
    }

    /// The order is left alone, as RAUC does: `<name>_OK=0` is enough for the script.
    fn bad(&self, _order: &str, name: &str) -> Change {
        Change::default()
            .set(ok_var(name), "0")
            .set(try_var(name), "0")
    }
}
