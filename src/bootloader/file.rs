//! A plain file of `NAME=value` lines with the U-Boot variables, for tests and the demo. It is
//! replaced atomically on every change (temporary file in the same directory, fsync, rename,
//! fsync of the directory), so a power cut leaves the old or the new file, never half of one.
//!
//! A missing file reads as an empty environment, as an erased U-Boot environment does with an
//! empty default: the boot script's defaults apply.

use std::io::{self, Read};
use std::path::PathBuf;

use super::BootloaderError;
use super::store::{Change, EnvStore, Vars};
use super::tool::MAX_TOOL_OUTPUT;
use crate::durable;

/// The file is held to the same bound as a tool's listing.
pub const MAX_ENV_FILE: usize = MAX_TOOL_OUTPUT;

pub struct FileEnv {
    pub path: PathBuf,
}

impl FileEnv {
    fn read_text(&self) -> Result<Vec<u8>, BootloaderError> {
        let read_err = |source| BootloaderError::Read {
            path: self.path.clone(),
            source,
            hint: "check the path in `bootloader.env_file`".to_owned(),
        };
        // Not a plain open: a FIFO put at the path would block it forever.
        let file = match durable::open_regular(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read_err(e)),
        };
        let mut text = Vec::new();
        file.take(MAX_ENV_FILE as u64 + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        if text.len() > MAX_ENV_FILE {
            return Err(BootloaderError::Malformed {
                store: self.path.display().to_string(),
                what: format!("it is larger than {MAX_ENV_FILE} bytes"),
            });
        }
        Ok(text)
    }
}

impl EnvStore for FileEnv {
    fn read(&self) -> Result<Vars, BootloaderError> {
        Vars::parse(&self.read_text()?, &self.path.display().to_string())
    }

    fn write(&self, change: &Change) -> Result<(), BootloaderError> {
        let mut vars = self.read()?;
        for (name, value) in &change.0 {
            vars.set(name, value);
        }
        let mut text = String::new();
        for (name, value) in vars.iter() {
            text.push_str(name);
            text.push('=');
            text.push_str(value);
            text.push('\n');
        }
        durable::write_atomically(&self.path, text.as_bytes(), 0o644).map_err(|source| {
            BootloaderError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn change_is_merged_into_the_file_and_removal_drops_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileEnv {
            path: dir.path().join("boot.env"),
        };
        assert_eq!(store.read().unwrap(), Vars::default());
        store
            .write(&Change::default().set("BOOT_ORDER", "A B").set("X", "1"))
            .unwrap();
        store
            .write(&Change::default().set("X", "").set("BOOT_A_LEFT", "3"))
            .unwrap();
        assert_eq!(
            fs::read_to_string(&store.path).unwrap(),
            "BOOT_ORDER=A B\nBOOT_A_LEFT=3\n"
        );
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
    }

    #[test]
    fn oversized_file_is_refused() {
        let (_dir, path) = crate::scratch_path("boot.env");
        fs::write(&path, "X=".to_owned() + &"y".repeat(MAX_ENV_FILE)).unwrap();
        let err = FileEnv { path }.read().unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
