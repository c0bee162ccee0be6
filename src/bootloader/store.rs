//! Where a bootloader's variables live. A store reads every variable at once and writes one
//! change at once; the rules (which variables mean what) are in `counter` and `grub`.

use std::sync::{Mutex, MutexGuard, PoisonError};

use super::BootloaderError;
use crate::release::escape_for_log;

/// Every variable of an environment, in the order the store listed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars(Vec<(String, String)>);

impl Vars {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets or, with an empty value, removes a variable (U-Boot's `setenv NAME` with no value).
    pub fn set(&mut self, name: &str, value: &str) {
        match self.0.iter().position(|(n, _)| n == name) {
            Some(i) if value.is_empty() => {
                self.0.remove(i);
            }
            Some(i) => self.0[i].1 = value.to_owned(),
            None if value.is_empty() => {}
            None => self.0.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Parses `NAME=value` lines as `fw_printenv` and `grub-editenv list` print them.
    ///
    /// Both tools print a value that holds a newline as it is, so a line that does not start with
    /// `NAME=` (a name without spaces) continues the value before it; such lines before the
    /// first variable belong to a variable we cannot name (libubootenv makes names with spaces
    /// out of over-long script lines) and are passed over — none of ours can hide there. A
    /// variable listed twice is refused: that happens only when some value contains a newline
    /// followed by `NAME=`, i.e. it imitates another variable, and we cannot tell which of the
    /// two the bootloader sees.
    pub fn parse(text: &[u8], origin: &str) -> Result<Vars, BootloaderError> {
        let malformed = |what: String| BootloaderError::Malformed {
            store: origin.to_owned(),
            what,
        };
        let text = std::str::from_utf8(text)
            .map_err(|_| malformed("the environment is not UTF-8 text".to_owned()))?;
        let mut vars: Vec<(String, String)> = Vec::new();
        let body = text.strip_suffix('\n').unwrap_or(text);
        if body.is_empty() {
            return Ok(Vars(vars));
        }
        for line in body.split('\n') {
            match line.split_once('=') {
                Some((name, value)) if is_var_name(name) => {
                    if vars.iter().any(|(n, _)| n == name) {
                        return Err(malformed(format!(
                            "variable {} is listed twice; a value with an embedded newline imitates it",
                            escape_for_log(name, 64)
                        )));
                    }
                    vars.push((name.to_owned(), value.to_owned()));
                }
                _ => {
                    if let Some((_, value)) = vars.last_mut() {
                        value.push('\n');
                        value.push_str(line);
                    }
                }
            }
        }
        Ok(Vars(vars))
    }
}

/// What both tools accept as a variable name in their listing: printable ASCII without spaces.
fn is_var_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic())
}

/// The variables one operation sets, written in one go. An empty value removes the variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change(pub Vec<(String, String)>);

impl Change {
    pub fn set(mut self, name: impl Into<String>, value: impl Into<String>) -> Change {
        self.0.push((name.into(), value.into()));
        self
    }

    pub fn and(mut self, more: Change) -> Change {
        self.0.extend(more.0);
        self
    }
}

/// One environment: read all of it, write one change in one write.
pub trait EnvStore: Send + Sync {
    fn read(&self) -> Result<Vars, BootloaderError>;
    fn write(&self, change: &Change) -> Result<(), BootloaderError>;
    /// The command or path the store works through, for messages.
    fn describe(&self) -> String;
}

/// Serialises this process's changes: each is a read-modify-write of the environment, and two
/// at once (say a D-Bus mark-bad during an install's mark-active) could lose one of them.
#[derive(Debug, Default)]
pub struct ChangeLock(Mutex<()>);

impl ChangeLock {
    pub fn hold(&self) -> MutexGuard<'_, ()> {
        // The mutex guards no data, so a panic while it was held left nothing inconsistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `change` and reads the environment back to check that it holds. The tools can
/// report success without having written (libubootenv's `fw_setenv -s` skips lines it does not
/// understand), and a switch that did not happen must not be reported as done.
///
/// A change the environment already holds is not written: every boot marks the running slot
/// good, and an environment write costs a flash erase cycle.
pub fn apply(store: &dyn EnvStore, change: &Change) -> Result<(), BootloaderError> {
    if first_difference(&store.read()?, change).is_none() {
        return Ok(());
    }
    store.write(change)?;
    match first_difference(&store.read()?, change) {
        None => Ok(()),
        Some((name, expected, found)) => Err(BootloaderError::NotApplied {
            store: store.describe(),
            name: name.to_owned(),
            expected: expected.to_owned(),
            found: escape_for_log(found, 64),
        }),
    }
}

/// The first variable of `change` whose value in `vars` differs: (name, wanted, found).
fn first_difference<'a>(vars: &'a Vars, change: &'a Change) -> Option<(&'a str, &'a str, &'a str)> {
    change.0.iter().find_map(|(name, expected)| {
        let found = vars.get(name).unwrap_or("");
        (found != expected).then_some((name.as_str(), expected.as_str(), found))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn parses_listing_with_multiline_value() {
        let vars = Vars::parse(
            b"BOOT_ORDER=B A\nbootcmd=run a\nrun b\nBOOT_A_LEFT=3\n",
            "t",
        )
        .unwrap();
        assert_eq!(vars.get("BOOT_ORDER"), Some("B A"));
        assert_eq!(vars.get("bootcmd"), Some("run a\nrun b"));
        assert_eq!(vars.get("BOOT_A_LEFT"), Some("3"));
        assert_eq!(vars.get("BOOT_B_LEFT"), None);
        assert_eq!(Vars::parse(b"", "t").unwrap(), Vars::default());
        assert_eq!(Vars::parse(b"X=\n", "t").unwrap().get("X"), Some(""));
    }

    #[test]
    fn imitated_variable_is_refused() {
        let err = Vars::parse(b"BOOT_B_LEFT=3\nML=x\nBOOT_B_LEFT=9\n", "fw_printenv").unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
    }

    #[test]
    fn garbage_is_refused_or_passed_over_not_panicked_on() {
        assert!(Vars::parse(b"\xff\xfe=1\n", "t").is_err());
        let vars = Vars::parse(b"no equals sign\n=1\nname with spaces=2\nA=1\n", "t").unwrap();
        assert_eq!(vars.iter().collect::<Vec<_>>(), vec![("A", "1")]);
    }

    /// A store that keeps the environment in memory and records every write.
    #[derive(Default)]
    pub(crate) struct Memory {
        pub vars: Mutex<Vars>,
        pub writes: Arc<Mutex<Vec<Change>>>,
    }

    impl EnvStore for Memory {
        fn read(&self) -> Result<Vars, BootloaderError> {
            Ok(self.vars.lock().unwrap().clone())
        }
        fn write(&self, change: &Change) -> Result<(), BootloaderError> {
            let mut vars = self.vars.lock().unwrap();
            for (name, value) in &change.0 {
                vars.set(name, value);
            }
            self.writes.lock().unwrap().push(change.clone());
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".to_owned()
        }
    }

    #[test]
    fn a_change_already_in_place_is_not_written_again() {
        let store = Memory {
            vars: Mutex::new(Vars::parse(b"BOOT_A_LEFT=3\n", "t").unwrap()),
            ..Memory::default()
        };
        apply(&store, &Change::default().set("BOOT_A_LEFT", "3")).unwrap();
        assert_eq!(store.writes.lock().unwrap().len(), 0);
        apply(&store, &Change::default().set("BOOT_A_LEFT", "2")).unwrap();
        assert_eq!(store.writes.lock().unwrap().len(), 1);
        assert_eq!(store.read().unwrap().get("BOOT_A_LEFT"), Some("2"));
    }

    #[test]
    fn set_with_empty_value_removes() {
        let mut vars = Vars::parse(b"A=1\nB=2\n", "t").unwrap();
        vars.set("A", "");
        vars.set("C", "3");
        vars.set("D", "");
        vars.set("B", "4");
        assert_eq!(
            vars.iter().collect::<Vec<_>>(),
            vec![("B", "4"), ("C", "3")]
        );
    }
}
