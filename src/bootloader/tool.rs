//! Running the bootloader's own tools (`fw_printenv`, `fw_setenv`, `grub-editenv`) with bounded
//! output, so that a confused or hostile tool cannot make the agent allocate without limit.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use super::BootloaderError;
use crate::release::escape_for_log;

/// The most a tool may print on stdout. A U-Boot environment's text is a few KiB; a grubenv is
/// 1 KiB. More than this is not an environment.
pub const MAX_TOOL_OUTPUT: usize = 64 * 1024;
/// The longest a tool may run: reading or writing an environment takes well under a second,
/// even with a flash erase; a tool that hangs (a device that never answers, a lock never
/// released) must not hold the installer or a boot.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a tool's stderr is kept for the error message.
const MAX_STDERR_KEPT: usize = 4096;
/// How much of that stderr is shown in the message.
const STDERR_SHOWN: usize = 300;

/// One bootloader tool: where it is, the arguments every call gets (e.g. `-c CONFIG`), and what
/// to tell the user when it is missing or fails.
#[derive(Debug, Clone)]
pub struct Tool {
    pub program: PathBuf,
    pub leading_args: Vec<OsString>,
    /// The setting that names the program, for "set `bootloader.fw_printenv`" hints.
    pub setting: &'static str,
    /// The Debian/Yocto package that ships the program.
    pub package: &'static str,
    /// What to check when the tool runs but fails, e.g. the environment's configuration.
    pub failure_hint: String,
}

impl Tool {
    /// The command line as the user would type it, for messages.
    pub fn display(&self, args: &[OsString]) -> String {
        let mut text = self.program.display().to_string();
        for arg in self.leading_args.iter().chain(args) {
            text.push(' ');
            text.push_str(&arg.to_string_lossy());
        }
        text
    }

    /// Runs the tool and returns its stdout; a non-zero exit is an error that carries the
    /// tool's stderr and the hint. A tool that has not finished after [`TOOL_TIMEOUT`] is
    /// killed with its process group.
    pub fn run(&self, args: &[OsString]) -> Result<Vec<u8>, BootloaderError> {
        self.run_within(args, TOOL_TIMEOUT)
    }

    fn run_within(&self, args: &[OsString], timeout: Duration) -> Result<Vec<u8>, BootloaderError> {
        let command = self.display(args);
        let mut child = Command::new(&self.program)
            .args(&self.leading_args)
            .args(args)
            // The messages we quote back to the user should not depend on the caller's locale.
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group: the watchdog below kills whatever the tool started, too.
            .process_group(0)
            .spawn()
            .map_err(|source| self.spawn_error(&command, source))?;
        let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            unreachable!("stdout and stderr were set to piped")
        };
        let pid = child.id();
        let timed_out = AtomicBool::new(false);
        let (finished, watched) = std::sync::mpsc::channel::<()>();
        let (stdout_result, stderr_text, status) = std::thread::scope(|scope| {
            let timed_out = &timed_out;
            scope.spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = watched.recv_timeout(timeout) {
                    timed_out.store(true, Ordering::SeqCst);
                    crate::system::kill_group(pid);
                }
            });
            // stderr is drained on its own thread: a tool that fills the stderr pipe while we
            // wait on stdout would otherwise never finish.
            let stderr_reader = scope.spawn(move || read_capped_then_drain(stderr));
            let mut out = Vec::new();
            let result = (&mut stdout)
                .take(MAX_TOOL_OUTPUT as u64 + 1)
                .read_to_end(&mut out)
                .map(|_| out);
            if !matches!(&result, Ok(out) if out.len() <= MAX_TOOL_OUTPUT) {
                // The child we started is still writing: stop it so the stderr reader ends too.
                let _ = child.kill();
            }
            drop(stdout);
            let stderr_text = stderr_reader.join().unwrap_or_default();
            let status = child.wait();
            let _ = finished.send(());
            (result, stderr_text, status)
        });
        if timed_out.load(Ordering::SeqCst) {
            return Err(BootloaderError::ToolTimedOut {
                command,
                seconds: timeout.as_secs(),
                hint: self.failure_hint.clone(),
            });
        }
        let status = status.map_err(|source| self.spawn_error(&command, source))?;
        let out = stdout_result.map_err(|source| self.spawn_error(&command, source))?;
        if out.len() > MAX_TOOL_OUTPUT {
            return Err(BootloaderError::OutputTooLarge {
                command,
                limit: MAX_TOOL_OUTPUT,
            });
        }
        if !status.success() {
            let status = match status.code() {
                Some(code) => format!("exit status {code}"),
                None => "killed by a signal".to_owned(),
            };
            let stderr = String::from_utf8_lossy(&stderr_text);
            return Err(BootloaderError::ToolFailed {
                command,
                status,
                stderr: escape_for_log(stderr.trim(), STDERR_SHOWN),
                hint: self.failure_hint.clone(),
            });
        }
        Ok(out)
    }

    fn spawn_error(&self, command: &str, source: io::Error) -> BootloaderError {
        let hint = if source.kind() == io::ErrorKind::NotFound {
            format!(
                "install {} or point `bootloader.{}` at the program",
                self.package, self.setting
            )
        } else {
            self.failure_hint.clone()
        };
        BootloaderError::Spawn {
            command: command.to_owned(),
            source,
            hint,
        }
    }
}

/// Keeps the first [`MAX_STDERR_KEPT`] bytes and reads the rest away, so that the writer never
/// blocks on a full pipe.
fn read_capped_then_drain(mut pipe: impl Read) -> Vec<u8> {
    let mut kept = Vec::new();
    let _ = (&mut pipe)
        .take(MAX_STDERR_KEPT as u64)
        .read_to_end(&mut kept);
    let _ = io::copy(&mut pipe, &mut io::sink());
    kept
}

/// Checks at start-up that a configured program exists, so that a wrong path is reported once,
/// clearly, and not at the first reboot.
pub fn require_program(
    program: &Path,
    setting: &str,
    package: &str,
) -> Result<(), BootloaderError> {
    match std::fs::metadata(program) {
        Ok(meta) if meta.is_file() => Ok(()),
        _ => Err(BootloaderError::Config(format!(
            "{} does not exist or is not a file; install {package} or point `bootloader.{setting}` at the program",
            program.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> (Tool, Vec<OsString>) {
        let tool = Tool {
            program: PathBuf::from("/bin/sh"),
            leading_args: vec!["-c".into()],
            setting: "test",
            package: "dash",
            failure_hint: "check the test".into(),
        };
        (tool, vec![script.into()])
    }

    #[test]
    fn stdout_is_returned_and_failure_carries_stderr_and_hint() {
        let (tool, args) = sh("printf 'A=1\\n'");
        assert_eq!(tool.run(&args).unwrap(), b"A=1\n");
        let (tool, args) = sh("echo 'bad \x1b[31m env' >&2; exit 3");
        let err = tool.run(&args).unwrap_err().to_string();
        assert!(err.contains("exit status 3"), "{err}");
        assert!(err.contains("bad \\u{1b}[31m env"), "{err}");
        assert!(err.contains("check the test"), "{err}");
    }

    #[test]
    fn endless_output_is_cut_off_and_the_tool_stopped() {
        let (tool, args) = sh("exec yes 'BOOT_ORDER=A B'");
        assert!(matches!(
            tool.run(&args),
            Err(BootloaderError::OutputTooLarge { .. })
        ));
    }

    #[test]
    fn a_tool_that_hangs_is_killed_with_what_it_started() {
        let hang = crate::system::tests::Hanging::new("");
        let (tool, args) = sh(&hang.script);
        let started = std::time::Instant::now();
        let err = tool
            .run_within(&args, Duration::from_millis(500))
            .unwrap_err();
        assert!(matches!(err, BootloaderError::ToolTimedOut { .. }), "{err}");
        assert!(
            err.to_string().contains("did not finish within 0 s"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(hang.child_gone(), "the tool's child survived");
    }

    #[test]
    fn a_flood_on_stderr_does_not_block_the_tool() {
        let (tool, args) = sh("head -c 1000000 /dev/zero >&2; echo done");
        assert_eq!(tool.run(&args).unwrap(), b"done\n");
    }

    #[test]
    fn missing_program_names_the_package_to_install() {
        let tool = Tool {
            program: PathBuf::from("/nonexistent/fw_printenv"),
            leading_args: vec![],
            setting: "fw_printenv",
            package: "libubootenv-tool",
            failure_hint: String::new(),
        };
        let err = tool.run(&[]).unwrap_err().to_string();
        assert!(err.contains("install libubootenv-tool"), "{err}");
    }
}
