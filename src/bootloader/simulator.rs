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
//! For U-Boot it can also run a boot script's own text ([`BootSim::with_uboot_script`], an
//! interpreter of the hush subset the scripts use, in [`uboot_script`]): the shipped
//! `config/boot/uboot-boot.cmd` and `config/boot/uboot-fat-boot.cmd` (for U-Boot builds without
//! `setexpr` and `saveenv`: the environment in a FAT file, tries counted down by comparison).
//! Its tests hold both scripts to the rules below on every environment the agent writes, and
//! the whole-cycle tests run the agent against each script.
//!
//! U-Boot rules (`config/boot/uboot-boot.cmd`, `config/boot/uboot-fat-boot.cmd`):
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

pub mod uboot_script;

/// `config/boot/uboot-boot.cmd`, the shipped U-Boot script (`setexpr`, `saveenv`).
pub const SHIPPED_UBOOT_SCRIPT: &str = include_str!("../../config/boot/uboot-boot.cmd");
/// `config/boot/uboot-fat-boot.cmd`, the variant for U-Boot builds without `setexpr` and
/// `saveenv` (the environment in a FAT file, loaded and saved by the script).
pub const FAT_UBOOT_SCRIPT: &str = include_str!("../../config/boot/uboot-fat-boot.cmd");

/// Which U-Boot script a simulated boot runs.
#[derive(Debug, Clone)]
pub enum UBootScript {
    /// The rules restated in Rust (the default).
    Rules,
    /// A script's text on a U-Boot that loads the stored environment at start and saves it
    /// with `saveenv` (CONFIG_ENV_IS_IN_MMC and friends): [`SHIPPED_UBOOT_SCRIPT`].
    EnvInRam(String),
    /// A script's text on a U-Boot with no environment storage: the script reaches the stored
    /// environment through `fatload` and `fatwrite` alone: [`FAT_UBOOT_SCRIPT`].
    EnvInFat(String),
}

/// U-Boot's own variables that the scripts read (addresses of a typical board; bootargs empty).
const UBOOT_DEFAULTS: &[(&str, &str)] = &[
    ("loadaddr", "0x2000000"),
    ("kernel_addr_r", "0x1000000"),
    ("fdt_addr_r", "0x4000000"),
    ("ramdisk_addr_r", "0x8000000"),
    ("fdtfile", "board.dtb"),
];

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
    /// What a U-Boot (or file environment) boot runs.
    pub uboot_script: UBootScript,
}

impl BootSim {
    pub fn new(env: SimEnv, slots: &[&str], attempts: u32) -> BootSim {
        BootSim {
            env,
            slots: slots.iter().map(|s| s.to_string()).collect(),
            attempts,
            uboot_script: UBootScript::Rules,
        }
    }

    /// Runs `script` for U-Boot boots instead of the rules restated in Rust. The script's
    /// slots are its own (A and B in the shipped ones), and so is its try budget (3).
    pub fn with_uboot_script(mut self, script: UBootScript) -> BootSim {
        self.uboot_script = script;
        self
    }

    /// Powers the device on once and returns the bootname of the slot that boots.
    pub fn boot(&self) -> Result<String, String> {
        match &self.env {
            SimEnv::Grub { .. } => self.boot_grub(),
            SimEnv::UBoot { .. } | SimEnv::File { .. } => match &self.uboot_script {
                UBootScript::Rules => self.boot_uboot(),
                UBootScript::EnvInRam(script) => self.run_uboot_script(script, true),
                UBootScript::EnvInFat(script) => self.run_uboot_script(script, false),
            },
        }
    }

    /// Power-on, and after a `reset` one more start (RAUC's behaviour); a second reset would
    /// repeat forever, which is an `Err`, as in the rules.
    fn run_uboot_script(&self, script: &str, env_in_ram: bool) -> Result<String, String> {
        for _start in 0..2 {
            match uboot_script::run(script, self, UBOOT_DEFAULTS, env_in_ram)? {
                uboot_script::Outcome::Boot(slot) => return Ok(slot),
                uboot_script::Outcome::Reset => {}
            }
        }
        Err("the script reset the board twice in a row: it would reset forever".into())
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
                // An empty value removes the variable, as libubootenv does.
                let text: String = all
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(n, v)| format!("{n}={v}\n"))
                    .collect();
                fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
            }
        }
    }
}

/// The environment as the interpreted script's U-Boot stores it: through the same tools.
impl uboot_script::Store for BootSim {
    fn load(&self) -> Result<Vec<(String, String)>, String> {
        self.read()
    }

    /// An empty value removes the variable (libubootenv's `fw_setenv -s`, and the file's).
    fn save(&self, changes: &[(String, Option<String>)]) -> Result<(), String> {
        let vars: Vec<(String, String)> = changes
            .iter()
            .map(|(n, v)| (n.clone(), v.clone().unwrap_or_default()))
            .collect();
        self.write(&vars)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The BOOT_* variables of a file environment after one boot, and the slot that booted.
    fn boot_with(script: UBootScript, env: &[(&str, &str)]) -> (Result<String, String>, String) {
        let (_dir, path) = crate::scratch_path("boot.env");
        let text: String = env.iter().map(|(n, v)| format!("{n}={v}\n")).collect();
        fs::write(&path, text).unwrap();
        let sim = BootSim::new(SimEnv::File { path: path.clone() }, &["A", "B"], 3)
            .with_uboot_script(script);
        let booted = sim.boot();
        let mut after: Vec<String> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("BOOT_"))
            .map(str::to_owned)
            .collect();
        after.sort();
        (booted, after.join(" "))
    }

    /// Both U-Boot scripts do what the rules say on every environment the agent writes (and a
    /// hostile order besides): the same slot boots and the same BOOT_* variables are stored.
    #[test]
    fn both_uboot_scripts_follow_the_rules() {
        let orders = [
            None,
            Some("A B"),
            Some("B A"),
            Some("A"),
            Some("B"),
            Some("B x A"),
            Some("x"),
            Some("A A"),
        ];
        let counters = [
            None,
            Some("0"),
            Some("1"),
            Some("2"),
            Some("3"),
            Some("a"),
            Some("f"),
        ];
        let mut cases = 0;
        for order in orders {
            for a in counters {
                for b in counters {
                    let mut env = vec![("bootdelay", "2")];
                    env.extend(order.map(|o| ("BOOT_ORDER", o)));
                    env.extend(a.map(|v| ("BOOT_A_LEFT", v)));
                    env.extend(b.map(|v| ("BOOT_B_LEFT", v)));
                    let rules = boot_with(UBootScript::Rules, &env);
                    let shipped =
                        boot_with(UBootScript::EnvInRam(SHIPPED_UBOOT_SCRIPT.into()), &env);
                    let fat = boot_with(UBootScript::EnvInFat(FAT_UBOOT_SCRIPT.into()), &env);
                    match &rules.0 {
                        Ok(_) => {
                            assert_eq!(shipped, rules, "uboot-boot.cmd on {env:?}");
                            assert_eq!(fat, rules, "uboot-fat-boot.cmd on {env:?}");
                        }
                        // A board that would reset forever: every script must say so too.
                        Err(_) => {
                            assert!(shipped.0.is_err(), "uboot-boot.cmd on {env:?}: {shipped:?}");
                            assert!(fat.0.is_err(), "uboot-fat-boot.cmd on {env:?}: {fat:?}");
                        }
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 8 * 7 * 7);
    }

    /// Where the scripts part: counters the agent never writes. The shipped script reads any
    /// hex number (`setexpr`), the FAT one only the digits 1 to f; documented in its header.
    #[test]
    fn the_fat_script_counts_only_single_hex_digits() {
        let env = [
            ("BOOT_ORDER", "B A"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "10"),
        ];
        let shipped = boot_with(UBootScript::EnvInRam(SHIPPED_UBOOT_SCRIPT.into()), &env);
        let fat = boot_with(UBootScript::EnvInFat(FAT_UBOOT_SCRIPT.into()), &env);
        assert_eq!(shipped.0.as_deref(), Ok("B"));
        assert!(shipped.1.contains("BOOT_B_LEFT=f"), "{shipped:?}");
        assert_eq!(fat.0.as_deref(), Ok("A"));
    }

    /// The FAT script's file holds its three variables and nothing else, whatever was there.
    #[test]
    fn the_fat_script_stores_only_its_variables() {
        let (_dir, path) = crate::scratch_path("boot.env");
        fs::write(&path, "bootcmd=evil\nBOOT_ORDER=B A\nBOOT_B_LEFT=3\n").unwrap();
        let sim = BootSim::new(SimEnv::File { path: path.clone() }, &["A", "B"], 3)
            .with_uboot_script(UBootScript::EnvInFat(FAT_UBOOT_SCRIPT.into()));
        assert_eq!(sim.boot().as_deref(), Ok("B"));
        let mut stored: Vec<String> = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        stored.sort();
        assert_eq!(stored, ["BOOT_A_LEFT=3", "BOOT_B_LEFT=2", "BOOT_ORDER=B A"]);
    }
}
