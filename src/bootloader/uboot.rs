//! The U-Boot environment through libubootenv's `fw_printenv` and `fw_setenv`.
//!
//! Reads are one `fw_printenv` call that lists every variable (libubootenv prints `NAME=` for a
//! missing variable it is asked for, the older U-Boot tools fail instead; listing all works with
//! both). Each change is one `fw_setenv -s SCRIPT` call, so all its variables land in one
//! environment write: a power cut leaves either the old or the new environment (with a redundant
//! environment configured in fw_env.config), never a new order with an old counter.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::BootloaderError;
use super::store::{Change, EnvStore, Vars};
use super::tool::Tool;

pub struct UBootEnv {
    printenv: Tool,
    setenv: Tool,
}

impl UBootEnv {
    pub fn new(fw_printenv: PathBuf, fw_setenv: PathBuf, config: Option<&Path>) -> UBootEnv {
        let (leading_args, config_name) = match config {
            Some(path) => (
                vec![OsString::from("-c"), path.into()],
                path.display().to_string(),
            ),
            None => (Vec::new(), "/etc/fw_env.config".to_owned()),
        };
        let failure_hint = format!(
            "check {config_name}: it must name the device (or file) holding the U-Boot environment, \
             its offset and its size, as the board's U-Boot has them; an erased environment also \
             needs the default one in /etc/u-boot-initial-env"
        );
        let tool = |program, setting| Tool {
            program,
            leading_args: leading_args.clone(),
            setting,
            package: "libubootenv-tool (fw_printenv/fw_setenv)",
            failure_hint: failure_hint.clone(),
        };
        UBootEnv {
            printenv: tool(fw_printenv, "fw_printenv"),
            setenv: tool(fw_setenv, "fw_setenv"),
        }
    }
}

/// The script `fw_setenv -s` reads: libubootenv takes one `NAME=value` a line (an empty value
/// removes the variable) and skips lines without `=`, which is why [`super::store::apply`] reads
/// the result back. (The old U-Boot `fw_setenv` wanted `NAME value`; it is not supported.)
/// libubootenv reads at most 1023 bytes a line and takes the rest as a line of its own; ours
/// stay far below that (a boot order is at most 16 bootnames of 16 characters).
pub fn render_script(change: &Change) -> String {
    let mut script = String::from("# written by update-agent: one change, one environment write\n");
    for (name, value) in &change.0 {
        debug_assert!(!name.contains(['=', '\n']) && !value.contains('\n'));
        debug_assert!(name.len() + value.len() < 1000);
        script.push_str(name);
        script.push('=');
        script.push_str(value);
        script.push('\n');
    }
    script
}

impl EnvStore for UBootEnv {
    fn read(&self) -> Result<Vars, BootloaderError> {
        let out = self.printenv.run(&[])?;
        Vars::parse(&out, &self.printenv.display(&[]))
    }

    fn write(&self, change: &Change) -> Result<(), BootloaderError> {
        let mut file = tempfile::Builder::new()
            .prefix("update-agent-fw_setenv.")
            .tempfile()
            .map_err(|source| BootloaderError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        let path = file.path().to_owned();
        let write_err = |source| BootloaderError::Write {
            path: path.clone(),
            source,
        };
        file.write_all(render_script(change).as_bytes())
            .map_err(write_err)?;
        file.flush().map_err(write_err)?;
        let args = [OsString::from("-s"), path.into()];
        self.setenv.run(&args).map(drop)
    }

    fn describe(&self) -> String {
        self.printenv.display(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_change_is_one_script_with_all_its_variables() {
        let change = Change::default()
            .set("BOOT_ORDER", "B A")
            .set("BOOT_B_LEFT", "3");
        assert_eq!(
            render_script(&change),
            "# written by update-agent: one change, one environment write\n\
             BOOT_ORDER=B A\n\
             BOOT_B_LEFT=3\n"
        );
    }
}
