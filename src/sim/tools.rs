//! The real programs a simulated gateway uses (`fw_setenv`, `grub-editenv`, `mosquitto`,
//! `dbus-daemon`, `setpriv`, ...), and commands run as another user.
//!
//! A missing tool is an error that names the Debian package to install: a test that skipped
//! itself would report success for something it never checked.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where tools are looked for after `PATH`: the sbin directories a non-root `PATH` lacks.
const SYSTEM_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"];

/// Finds `name` on `PATH` or in the system's bin and sbin directories.
pub fn find(name: &str, package: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} is not installed; install it with `apt-get install {package}`"),
            )
        })
}

/// [`find`] for a test: a missing tool fails it, naming the package.
#[track_caller]
pub fn require(name: &str, package: &str) -> PathBuf {
    find(name, package).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command that must succeed and returns its stdout.
pub fn run_ok(command: &mut Command) -> io::Result<String> {
    let out = command
        .output()
        .map_err(|e| super::error(format_args!("cannot run {command:?}"), e))?;
    if !out.status.success() {
        return Err(super::error(
            format_args!("{command:?} failed"),
            String::from_utf8_lossy(&out.stderr),
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| super::error(format_args!("{command:?}"), e))
}

/// A finished process's status and both outputs, for failure messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts a process's exit code, showing its output when it is another.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32, what: &str) {
    assert_eq!(out.status.code(), Some(code), "{what}: {}", describe(out));
}

/// Who runs a command. Switching users needs root (CI runs the tests as root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    /// The test's own user.
    Current,
    /// `nobody`/`nogroup` without supplementary groups or capabilities: the daemon's user in the
    /// tests of the least-privilege split and D-Bus.
    Nobody,
    /// `nobody` with this group id as its only supplementary group.
    NobodyInGroup(u32),
    /// Any uid and gid (names or numbers), without supplementary groups.
    Ids(String, String),
}

impl User {
    /// `program` as this user (through `setpriv`, which execs it: the pid is the program's).
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let (uid, gid, groups) = match self {
            User::Current => return Command::new(program.as_ref()),
            User::Nobody => ("nobody", "nogroup", "--clear-groups".to_owned()),
            User::NobodyInGroup(gid) => ("nobody", "nogroup", format!("--groups={gid}")),
            User::Ids(uid, gid) => (uid.as_str(), gid.as_str(), "--clear-groups".to_owned()),
        };
        let mut command = Command::new(require("setpriv", "util-linux"));
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg(groups)
            .arg("--inh-caps=-all")
            .arg(program.as_ref());
        command
    }
}

/// `sh -c script` in a mount namespace of its own (private propagation: its mounts stay in
/// it), through `unshare` from util-linux; needs root. The arguments added become `$1`, ….
pub fn in_mount_namespace(script: &str) -> Command {
    let mut command = Command::new(require("unshare", "util-linux"));
    command.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]);
    command
}
