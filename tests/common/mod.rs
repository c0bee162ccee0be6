//! Helpers for the integration tests: real bootloader environments in a temporary directory, the
//! boot scripts' simulator, (in `releases`) fixed keys and hand-assembled releases, and (in
//! `http`) a hostile HTTP server on 127.0.0.1. Each test crate that says `mod common;` uses only
//! part of it.
#![allow(dead_code, unused_imports)] // each test crate uses a different part

pub use update_agent::bootloader::simulator as boot_sim;

pub mod http;
pub mod range_server;
mod releases;
pub use releases::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Finds a program on `PATH`. A missing tool fails the test, naming the package to install: a
/// test that skipped itself would report success for something it never checked.
pub fn require_tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed; install it with `apt-get install {package}`")
        })
}

/// Runs a command that must succeed and returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

/// A U-Boot environment kept in a plain file, as libubootenv can use one.
pub struct UBootEnvFile {
    pub fw_printenv: PathBuf,
    pub fw_setenv: PathBuf,
    pub config: PathBuf,
    pub env: PathBuf,
}

/// The size the environment file and `fw_env.config` agree on (a common U-Boot setting).
pub const UBOOT_ENV_SIZE: usize = 0x4000;

impl UBootEnvFile {
    /// Sets up a file-backed environment in `dir` and gives it a valid first write.
    ///
    /// What libubootenv 0.3.2 does with such a file, found by trying: a missing file and an
    /// empty (0-byte) file are errors for both tools; a file of the full size filled with 0xff
    /// (erased flash) has no valid CRC, so the tools fall back to the default environment and
    /// fail ("Cannot read default environment from file") unless one is given with `-f`. With
    /// `-f` naming an empty file, `fw_setenv` writes a valid environment, and from then on
    /// neither tool needs `-f`.
    pub fn create(dir: &Path, size: usize) -> UBootEnvFile {
        let fixture = UBootEnvFile::erased(dir, size);
        let empty_default = dir.join("u-boot-initial-env");
        fs::write(&empty_default, "").unwrap();
        run_ok(
            Command::new(&fixture.fw_setenv)
                .arg("-c")
                .arg(&fixture.config)
                .arg("-f")
                .arg(&empty_default)
                .args(["bootdelay", "2"]),
        );
        fixture
    }

    /// An environment file as freshly erased flash: the tools cannot read it without a default.
    pub fn erased(dir: &Path, size: usize) -> UBootEnvFile {
        let fw_printenv = require_tool("fw_printenv", "libubootenv-tool");
        let fw_setenv = require_tool("fw_setenv", "libubootenv-tool");
        let env = dir.join("uboot.env");
        fs::write(&env, vec![0xffu8; size]).unwrap();
        let config = dir.join("fw_env.config");
        fs::write(&config, format!("{} 0x0 {:#x}\n", env.display(), size)).unwrap();
        UBootEnvFile {
            fw_printenv,
            fw_setenv,
            config,
            env,
        }
    }

    /// The whole environment as `fw_printenv -c CONFIG` prints it.
    pub fn printenv(&self) -> String {
        run_ok(Command::new(&self.fw_printenv).arg("-c").arg(&self.config))
    }

    /// One variable as `fw_printenv` lists it; `None` when unset.
    pub fn get(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.printenv()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    /// Sets a variable behind the agent's back, e.g. to something hostile.
    pub fn set(&self, name: &str, value: &str) {
        run_ok(
            Command::new(&self.fw_setenv)
                .arg("-c")
                .arg(&self.config)
                // A value such as "-1" must not be taken for an option.
                .arg("--")
                .arg(name)
                .arg(value),
        );
    }
}

/// A grubenv file made by `grub-editenv create` (1 KiB, like the one in /boot/grub).
pub struct GrubEnvFile {
    pub editenv: PathBuf,
    pub grubenv: PathBuf,
}

impl GrubEnvFile {
    pub fn create(dir: &Path) -> GrubEnvFile {
        let editenv = require_tool("grub-editenv", "grub-common");
        let grubenv = dir.join("grubenv");
        run_ok(Command::new(&editenv).arg(&grubenv).arg("create"));
        GrubEnvFile { editenv, grubenv }
    }

    /// The environment as `grub-editenv FILE list` prints it.
    pub fn list(&self) -> String {
        run_ok(Command::new(&self.editenv).arg(&self.grubenv).arg("list"))
    }

    pub fn get(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.list()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    pub fn set(&self, name: &str, value: &str) {
        run_ok(
            Command::new(&self.editenv)
                .arg(&self.grubenv)
                .arg("set")
                .arg(format!("{name}={value}")),
        );
    }
}

/// Deterministic bytes that differ per `seed` and do not compress to nothing: images, slot
/// contents and the garbage a power cut leaves.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
