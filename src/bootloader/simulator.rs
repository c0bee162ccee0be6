//! A boot simulator: what the boot scripts in `config/boot/` do at power-on, applied to the
//! same environment through the same tools (`fw_printenv`/`fw_setenv`, `grub-editenv`, or the
//! file), so that a test can "reboot" the device and see which slot comes up.
//!
//! Used by the tests' whole cycles and by `update-agent demo`, never by the agent itself. It
//! parses the environment on its own, deliberately not with the backends' code: a test whose
//! oracle shares the code under test proves little. Numbers are read the way the bootloaders'
//! C code reads them (leading digits, anything else stops the number, no digits is 0), not as
//! strictly as the agent does.
//!
//! U-Boot rules (`config/boot/uboot-boot.cmd`):
//! 1. unset `BOOT_ORDER` is the slots in order; unset `BOOT_<x>_LEFT` is `attempts`;
//! 2. the first known slot in `BOOT_ORDER` with `BOOT_<x>_LEFT` > 0 has its counter decremented
//!    (hex, as `setexpr`), the environment is saved, and it boots;
//! 3. if none qualifies, every slot's counter is set to `attempts`, the environment is saved and
//!    the board resets — the simulator then runs the script once more (RAUC's behaviour); if
//!    that boot finds nothing either, the board would reset forever, which is an `Err`.
//!
//! GRUB rules (`config/boot/grub.cfg`, after RAUC's documented example):
//! 1. unset `ORDER` is the slots in order; unset `<x>_OK` and `<x>_TRY` are 0;
//! 2. walking `ORDER`, every known slot looked at gets `TRY=1`; the first whose `OK` was 1 and
//!    `TRY` was 0 boots;
//! 3. if none qualifies, every slot with `OK=1` and `TRY=1` gets `TRY=0`, and the first slot in
//!    `ORDER` with `OK=1` boots and gets `TRY=1`; only when no slot is OK does menu entry 0 (the
//!    first slot) boot;
//! 4. only the `<x>_TRY` flags are saved.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// Where the environment is and how to reach it.
#[derive(Debug, Clone)]
pub enum SimEnv {
    UBoot {
        fw_printenv: PathBuf,
        fw_setenv: PathBuf,
        config: PathBuf,
    },
    Grub {
        editenv: PathBuf,
        grubenv: PathBuf,
    },
    /// The agent's file backend, with the U-Boot rules.
    File {
        path: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct BootSim {
    pub env: SimEnv,
    /// The slots the script knows, in menu order; the first is GRUB's entry 0.
    pub slots: Vec<String>,
    /// The script's default and reset value for `BOOT_<x>_LEFT`.
    pub attempts: u32,
}

impl BootSim {
    pub fn new(env: SimEnv, slots: &[&str], attempts: u32) -> BootSim {
        BootSim {
            env,
            slots: slots.iter().map(|s| s.to_string()).collect(),
            attempts,
        }
    }

    /// Powers the device on once and returns the bootname of the slot that boots.
    pub fn boot(&self) -> Result<String, String> {
        match &self.env {
            SimEnv::Grub { .. } => self.boot_grub(),
            SimEnv::UBoot { .. } | SimEnv::File { .. } => self.boot_uboot(),
        }
    }

    fn boot_uboot(&self) -> Result<String, String> {
        let vars = self.read()?;
        // What the script sets in RAM; saveenv stores the whole environment, but only these
        // differ from what is stored, so only these are written. (Writing an unchanged hostile
        // BOOT_ORDER back through `fw_setenv -s` would even change it: libubootenv splits
        // script lines longer than 1023 bytes, where U-Boot's saveenv would not.)
        let mut changed: Vec<(String, String)> = Vec::new();
        let order = match get(&vars, "BOOT_ORDER") {
            Some(order) if !order.is_empty() => order.to_owned(),
            _ => {
                let order = self.slots.join(" ");
                changed.push(("BOOT_ORDER".to_owned(), order.clone()));
                order
            }
        };
        let budget = format!("{:x}", self.attempts);
        let left_var = |slot: &str| format!("BOOT_{slot}_LEFT");
        let mut left: Vec<String> = Vec::new();
        for slot in &self.slots {
            match get(&vars, &left_var(slot)) {
                Some(v) if !v.is_empty() => left.push(v.to_owned()),
                _ => {
                    left.push(budget.clone());
                    changed.push((left_var(slot), budget.clone()));
                }
            }
        }
        // The second pass is the start after the script's `reset`.
        for _pass in 0..2 {
            let mut chosen = None;
            for word in order.split_whitespace() {
                let Some(i) = self.slots.iter().position(|s| s == word) else {
                    continue;
                };
                // `test 0x${BOOT_x_LEFT} -gt 0`, then `setexpr ... - 1`: both read hex.
                let n = leading_number(&left[i], 16);
                if n > 0 {
                    left[i] = format!("{:x}", n - 1);
                    changed.push((left_var(word), left[i].clone()));
                    chosen = Some(i);
                    break;
                }
            }
            if chosen.is_none() {
                for (slot, l) in self.slots.iter().zip(left.iter_mut()) {
                    l.clone_from(&budget);
                    changed.push((left_var(slot), budget.clone()));
                }
            }
            self.write(&std::mem::take(&mut changed))?;
            if let Some(i) = chosen {
                return Ok(self.slots[i].clone());
            }
        }
        Err(format!(
            "no slot in BOOT_ORDER \"{}\" is bootable even after resetting the counters: \
             the board would reset forever",
            order.chars().take(200).collect::<String>()
        ))
    }

    fn boot_grub(&self) -> Result<String, String> {
        let vars = self.read()?;
        let order = get(&vars, "ORDER")
            .map(str::to_owned)
            .unwrap_or_else(|| self.slots.join(" "));
        // The flags keep their text: save_env writes back what it did not change as it was.
        let flag = |name: String| get(&vars, &name).unwrap_or("0").to_owned();
        let ok: Vec<u64> = self
            .slots
            .iter()
            .map(|s| leading_number(&flag(format!("{s}_OK")), 10))
            .collect();
        let mut tried: Vec<String> = self
            .slots
            .iter()
            .map(|s| flag(format!("{s}_TRY")))
            .collect();
        let mut chosen = None;
        for word in order.split_whitespace() {
            let Some(i) = self.slots.iter().position(|s| s == word) else {
                continue;
            };
            let was_tried = leading_number(&tried[i], 10);
            tried[i] = "1".to_owned();
            if ok[i] == 1 && was_tried == 0 {
                chosen = Some(i);
                break;
            }
        }
        if chosen.is_none() {
            for (ok, tried) in ok.iter().zip(tried.iter_mut()) {
                if *ok == 1 && leading_number(tried, 10) == 1 {
                    *tried = "0".to_owned();
                }
            }
            chosen = order
                .split_whitespace()
                .filter_map(|word| self.slots.iter().position(|s| s == word))
                .find(|&i| ok[i] == 1);
            if let Some(i) = chosen {
                tried[i] = "1".to_owned();
            }
        }
        let save: Vec<(String, String)> = self
            .slots
            .iter()
            .zip(tried)
            .map(|(s, t)| (format!("{s}_TRY"), t))
            .collect();
        self.write(&save)?;
        Ok(self.slots[chosen.unwrap_or(0)].clone())
    }

    /// Every variable, as `NAME=value` pairs; a later line for the same name wins.
    fn read(&self) -> Result<Vec<(String, String)>, String> {
        let text = match &self.env {
            SimEnv::UBoot {
                fw_printenv,
                config,
                ..
            } => run(Command::new(fw_printenv).arg("-c").arg(config))?,
            SimEnv::Grub { editenv, grubenv } => {
                run(Command::new(editenv).arg(grubenv).arg("list"))?
            }
            SimEnv::File { path } => match fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            },
        };
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect())
    }

    /// Saves variables in one write, as `saveenv` / `save_env` do.
    fn write(&self, vars: &[(String, String)]) -> Result<(), String> {
        match &self.env {
            SimEnv::UBoot {
                fw_setenv, config, ..
            } => {
                let mut script = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
                for (n, v) in vars {
                    writeln!(script, "{n}={v}").map_err(|e| e.to_string())?;
                }
                script.flush().map_err(|e| e.to_string())?;
                run(Command::new(fw_setenv)
                    .arg("-c")
                    .arg(config)
                    .arg("-s")
                    .arg(script.path()))
                .map(drop)
            }
            SimEnv::Grub { editenv, grubenv } => run(Command::new(editenv)
                .arg(grubenv)
                .arg("set")
                .args(vars.iter().map(|(n, v)| format!("{n}={v}"))))
            .map(drop),
            SimEnv::File { path } => {
                let mut all = self.read()?;
                for (n, v) in vars {
                    match all.iter_mut().find(|(name, _)| name == n) {
                        Some(entry) => entry.1.clone_from(v),
                        None => all.push((n.clone(), v.clone())),
                    }
                }
                let text: String = all.iter().map(|(n, v)| format!("{n}={v}\n")).collect();
                fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
            }
        }
    }
}

fn get<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The number at the start of `text`, as C's `strtoul` reads it: leading digits of the radix,
/// anything else ends it, no digits is 0.
fn leading_number(text: &str, radix: u32) -> u64 {
    text.chars()
        .map_while(|c| c.to_digit(radix))
        .fold(0u64, |n, d| {
            n.saturating_mul(u64::from(radix))
                .saturating_add(u64::from(d))
        })
}

fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("{command:?} printed non-UTF-8"))
}
