//! A bootloader environment in a directory, reached the way the board reaches it: a U-Boot
//! environment through libubootenv's `fw_printenv`/`fw_setenv`, a grubenv through
//! `grub-editenv`, or the agent's file backend. A test reads and changes it behind the agent's
//! back, and asks what the boot script would do with it ([`BootEnv::next_boot`],
//! [`BootEnv::bootable`]) by the rules of `config/boot/`, never through the agent's own parser.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::tools::{self, run_ok};
use crate::bootloader::simulator::{BootSim, SimEnv};
use crate::config::BootloaderConfig;

/// The size the U-Boot environment file and `fw_env.config` agree on (a common U-Boot setting).
pub const UBOOT_ENV_SIZE: usize = 0x4000;

/// The slots every simulated gateway has, in the boot menu's order.
pub const SLOTS: [&str; 2] = ["A", "B"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The agent's file backend (U-Boot's variables and rules in a plain file).
    File,
    /// A U-Boot environment in a file, through libubootenv's tools.
    UBoot,
    /// A grubenv through `grub-editenv` (RAUC's `ORDER`, `x_OK`, `x_TRY`).
    Grub,
}

#[derive(Clone, Debug)]
enum Store {
    File {
        path: PathBuf,
    },
    UBoot {
        fw_printenv: PathBuf,
        fw_setenv: PathBuf,
        config: PathBuf,
        env: PathBuf,
    },
    Grub {
        editenv: PathBuf,
        grubenv: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct BootEnv {
    store: Store,
    /// The boot script's try budget (U-Boot, file): `BOOT_x_LEFT`'s default and reset value.
    pub attempts: u32,
}

impl BootEnv {
    /// A fresh environment of `backend` in `dir`, as the board's first boot finds it: the file
    /// backend's file absent, an empty U-Boot environment, an empty grubenv.
    pub fn create(backend: Backend, dir: &Path) -> io::Result<BootEnv> {
        match backend {
            Backend::File => Ok(BootEnv::file(dir.join("bootenv"))),
            Backend::UBoot => BootEnv::uboot(dir, UBOOT_ENV_SIZE),
            Backend::Grub => BootEnv::grub(dir),
        }
    }

    /// The file backend's environment at `path` (not created).
    pub fn file(path: PathBuf) -> BootEnv {
        BootEnv {
            store: Store::File { path },
            attempts: 3,
        }
    }

    /// A U-Boot environment file of `size` bytes in `dir`, given a valid first write.
    ///
    /// What libubootenv 0.3.2 does with such a file, found by trying: a missing file and an
    /// empty (0-byte) file are errors for both tools; a file of the full size filled with 0xff
    /// (erased flash) has no valid CRC, so the tools fall back to the default environment and
    /// fail ("Cannot read default environment from file") unless one is given with `-f`. With
    /// `-f` naming an empty file, `fw_setenv` writes a valid environment, and from then on
    /// neither tool needs `-f`.
    pub fn uboot(dir: &Path, size: usize) -> io::Result<BootEnv> {
        let env = BootEnv::uboot_erased(dir, size)?;
        let Store::UBoot {
            fw_setenv, config, ..
        } = &env.store
        else {
            unreachable!()
        };
        let empty_default = dir.join("u-boot-initial-env");
        fs::write(&empty_default, "")?;
        run_ok(
            Command::new(fw_setenv)
                .arg("-c")
                .arg(config)
                .arg("-f")
                .arg(&empty_default)
                .args(["bootdelay", "2"]),
        )?;
        Ok(env)
    }

    /// A U-Boot environment as freshly erased flash: the tools cannot read it without a default.
    pub fn uboot_erased(dir: &Path, size: usize) -> io::Result<BootEnv> {
        let fw_printenv = tools::find("fw_printenv", "libubootenv-tool")?;
        let fw_setenv = tools::find("fw_setenv", "libubootenv-tool")?;
        let env = dir.join("uboot.env");
        fs::write(&env, vec![0xffu8; size])?;
        let config = dir.join("fw_env.config");
        fs::write(&config, format!("{} 0x0 {:#x}\n", env.display(), size))?;
        Ok(BootEnv {
            store: Store::UBoot {
                fw_printenv,
                fw_setenv,
                config,
                env,
            },
            attempts: 3,
        })
    }

    /// A grubenv made by `grub-editenv create` (1 KiB, like the one in /boot/grub).
    pub fn grub(dir: &Path) -> io::Result<BootEnv> {
        let editenv = tools::find("grub-editenv", "grub-common")?;
        let grubenv = dir.join("grubenv");
        run_ok(Command::new(&editenv).arg(&grubenv).arg("create"))?;
        Ok(BootEnv {
            store: Store::Grub { editenv, grubenv },
            attempts: 3,
        })
    }

    pub fn backend(&self) -> Backend {
        match self.store {
            Store::File { .. } => Backend::File,
            Store::UBoot { .. } => Backend::UBoot,
            Store::Grub { .. } => Backend::Grub,
        }
    }

    /// The file that holds the environment (for permissions, copies, corruption).
    pub fn file_path(&self) -> &Path {
        match &self.store {
            Store::File { path } => path,
            Store::UBoot { env, .. } => env,
            Store::Grub { grubenv, .. } => grubenv,
        }
    }

    /// U-Boot's `fw_env.config` (for a test that runs the tools itself).
    pub fn uboot_config(&self) -> Option<&Path> {
        match &self.store {
            Store::UBoot { config, .. } => Some(config),
            _ => None,
        }
    }

    /// The tool that writes the environment (`fw_setenv`, `grub-editenv`), if any.
    pub fn setter(&self) -> Option<&Path> {
        match &self.store {
            Store::File { .. } => None,
            Store::UBoot { fw_setenv, .. } => Some(fw_setenv),
            Store::Grub { editenv, .. } => Some(editenv),
        }
    }

    /// How the agent is told to reach this environment (`[bootloader]`).
    pub fn config(&self) -> BootloaderConfig {
        match &self.store {
            Store::File { path } => BootloaderConfig::File {
                path: path.clone(),
                attempts: self.attempts,
            },
            Store::UBoot {
                fw_printenv,
                fw_setenv,
                config,
                ..
            } => BootloaderConfig::Uboot {
                fw_env_config: Some(config.clone()),
                attempts: self.attempts,
                fw_printenv: fw_printenv.clone(),
                fw_setenv: fw_setenv.clone(),
            },
            Store::Grub { editenv, grubenv } => BootloaderConfig::Grub {
                grubenv: grubenv.clone(),
                grub_editenv: editenv.clone(),
            },
        }
    }

    /// The boot script at power-on, on this environment.
    pub fn boot_sim(&self) -> BootSim {
        let env = match &self.store {
            Store::File { path } => SimEnv::File { path: path.clone() },
            Store::UBoot {
                fw_printenv,
                fw_setenv,
                config,
                ..
            } => SimEnv::UBoot {
                fw_printenv: fw_printenv.clone(),
                fw_setenv: fw_setenv.clone(),
                config: config.clone(),
            },
            Store::Grub { editenv, grubenv } => SimEnv::Grub {
                editenv: editenv.clone(),
                grubenv: grubenv.clone(),
            },
        };
        BootSim::new(env, &SLOTS, self.attempts)
    }

    /// Powers the board on once: the boot script picks a slot and saves what it changed.
    pub fn boot(&self) -> Result<String, String> {
        self.boot_sim().boot()
    }

    /// Sets the variables a board leaves the factory with: the order A, B with full budgets
    /// (U-Boot, file) or both OK (GRUB); with `b_bootable` false, B has no tries (not OK).
    pub fn set_factory(&self, b_bootable: bool) -> io::Result<()> {
        let budget = self.attempts.to_string();
        let b_left = if b_bootable { budget.as_str() } else { "0" };
        let b_ok = if b_bootable { "1" } else { "0" };
        match self.backend() {
            Backend::Grub => self.set_all(&[
                ("ORDER", "A B"),
                ("A_OK", "1"),
                ("A_TRY", "0"),
                ("B_OK", b_ok),
                ("B_TRY", "0"),
            ]),
            Backend::UBoot | Backend::File => self.set_all(&[
                ("BOOT_ORDER", "A B"),
                ("BOOT_A_LEFT", &budget),
                ("BOOT_B_LEFT", b_left),
            ]),
        }
    }

    /// The whole environment as the tool lists it (the file backend: the file).
    pub fn text(&self) -> String {
        let listed = match &self.store {
            Store::File { path } => match fs::read_to_string(path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
                other => other,
            },
            Store::UBoot {
                fw_printenv,
                config,
                ..
            } => run_ok(Command::new(fw_printenv).arg("-c").arg(config)),
            Store::Grub { editenv, grubenv } => {
                run_ok(Command::new(editenv).arg(grubenv).arg("list"))
            }
        };
        listed.unwrap_or_else(|e| panic!("cannot list the bootloader environment: {e}"))
    }

    /// Every variable in listing order (a name listed twice is there twice).
    pub fn vars(&self) -> Vec<(String, String)> {
        self.text()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    /// One variable; a later line wins, as in the boot scripts.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars()
            .into_iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Sets a variable behind the agent's back, e.g. to something hostile.
    pub fn set(&self, name: &str, value: &str) {
        self.set_all(&[(name, value)])
            .unwrap_or_else(|e| panic!("cannot set {name}: {e}"));
    }

    /// Sets variables in one write, in this order.
    pub fn set_all(&self, vars: &[(&str, &str)]) -> io::Result<()> {
        match &self.store {
            Store::File { path } => {
                let mut text: String = fs::read_to_string(path)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| !vars.iter().any(|(n, _)| l.starts_with(&format!("{n}="))))
                    .map(|l| format!("{l}\n"))
                    .collect();
                for (name, value) in vars {
                    text.push_str(&format!("{name}={value}\n"));
                }
                fs::write(path, text)
            }
            Store::UBoot {
                fw_setenv, config, ..
            } => vars.iter().try_for_each(|(name, value)| {
                run_ok(
                    Command::new(fw_setenv)
                        .arg("-c")
                        .arg(config)
                        // A value such as "-1" must not be taken for an option.
                        .arg("--")
                        .arg(name)
                        .arg(value),
                )
                .map(drop)
            }),
            Store::Grub { editenv, grubenv } => run_ok(
                Command::new(editenv)
                    .arg(grubenv)
                    .arg("set")
                    .args(vars.iter().map(|(n, v)| format!("{n}={v}"))),
            )
            .map(drop),
        }
    }

    /// The variables that decide the boot, in one line, for messages and before/after checks
    /// (`bootdelay`, which U-Boot's environment always has, left out).
    pub fn summary(&self) -> String {
        let mut vars = self.vars();
        vars.sort();
        vars.iter()
            .filter(|(name, _)| name != "bootdelay")
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The boot order as stored (unset: the slots in menu order).
    pub fn order(&self) -> Vec<String> {
        let var = match self.backend() {
            Backend::Grub => "ORDER",
            Backend::UBoot | Backend::File => "BOOT_ORDER",
        };
        self.get(var)
            .filter(|order| !order.is_empty())
            .unwrap_or_else(|| SLOTS.join(" "))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Whether the boot script boots `slot` when it reaches it in the order: tries left
    /// (U-Boot, file; unset is the full budget), or OK and not tried (GRUB).
    pub fn bootable(&self, slot: &str) -> bool {
        match self.backend() {
            Backend::Grub => {
                self.get(&format!("{slot}_OK")).as_deref() == Some("1")
                    && self.get(&format!("{slot}_TRY")).as_deref().unwrap_or("0") == "0"
            }
            Backend::UBoot | Backend::File => {
                let left = self
                    .get(&format!("BOOT_{slot}_LEFT"))
                    .unwrap_or_else(|| self.attempts.to_string());
                u32::from_str_radix(&left, 16).expect("BOOT_x_LEFT is hex") > 0
            }
        }
    }

    /// The slot the next boot picks, without the scripts' last resort.
    pub fn primary(&self) -> Option<String> {
        self.order()
            .into_iter()
            .find(|slot| SLOTS.contains(&slot.as_str()) && self.bootable(slot))
    }

    /// Whether the boot script can ever pick `slot` again without the agent: on U-Boot any slot
    /// in the order (when no slot has tries left, the script gives every slot its tries back);
    /// on GRUB a slot in the order whose `OK` is 1 (the fallback clears the TRY flags of OK
    /// slots; when nothing qualifies it boots entry 0, which is A).
    pub fn reachable(&self, slot: &str) -> bool {
        let in_order = self.order().iter().any(|s| s == slot);
        match self.backend() {
            Backend::Grub => in_order && self.get(&format!("{slot}_OK")).as_deref() == Some("1"),
            Backend::UBoot | Backend::File => in_order,
        }
    }

    /// The slot the boot script would pick at the next power-on, found by running it on a copy
    /// of the environment in `scratch` (the real one is not touched).
    pub fn next_boot(&self, scratch: &Path) -> Result<String, String> {
        let _ = fs::remove_dir_all(scratch);
        fs::create_dir_all(scratch).map_err(|e| e.to_string())?;
        let copy = |from: &Path, name: &str| -> Result<PathBuf, String> {
            let to = scratch.join(name);
            if from.exists() {
                fs::copy(from, &to).map_err(|e| e.to_string())?;
            }
            Ok(to)
        };
        let store = match &self.store {
            Store::File { path } => Store::File {
                path: copy(path, "bootenv")?,
            },
            Store::UBoot {
                fw_printenv,
                fw_setenv,
                env,
                ..
            } => {
                let env = copy(env, "uboot.env")?;
                let size = fs::metadata(&env).map_err(|e| e.to_string())?.len();
                let config = scratch.join("fw_env.config");
                fs::write(&config, format!("{} 0x0 {:#x}\n", env.display(), size))
                    .map_err(|e| e.to_string())?;
                Store::UBoot {
                    fw_printenv: fw_printenv.clone(),
                    fw_setenv: fw_setenv.clone(),
                    config,
                    env,
                }
            }
            Store::Grub { editenv, grubenv } => Store::Grub {
                editenv: editenv.clone(),
                grubenv: copy(grubenv, "grubenv")?,
            },
        };
        BootEnv {
            store,
            attempts: self.attempts,
        }
        .boot()
    }
}
