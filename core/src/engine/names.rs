//! Names the engine is given from outside: a slot's bootname and the kernel's boot id. Each is
//! checked once, where it enters (the configuration, the boot id file, `state.json`), so that
//! the engine and its callers hold a valid one by type and never check again.

use core::borrow::Borrow;
use core::fmt;
use core::ops::Deref;
use core::str::FromStr;

use serde::{Deserialize, Serialize, Serializer};

use crate::prelude::*;
use crate::release::escape_for_log;

/// The name the bootloader knows a slot by (`A`, `B`, `system0`), and the only text of ours
/// that goes into a bootloader environment: a word the boot scripts can use in a variable name
/// (`BOOT_<name>_LEFT`, `<name>_OK`). 1 to [`Bootname::MAX_LEN`] ASCII letters and digits,
/// starting with a letter (in GRUB's script `$0_OK` would be a positional parameter). The one
/// rule for the configuration, `state.json`, the bootloader environments and the kernel's
/// command line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Bootname(String);

/// A text that is not a valid [`Bootname`] or [`BootId`]; says which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadName(String);

impl Bootname {
    pub const MAX_LEN: usize = 16;

    pub fn new(name: impl Into<String>) -> Result<Bootname, BadName> {
        let name = name.into();
        let why = if name.is_empty() {
            "it is empty"
        } else if name.len() > Bootname::MAX_LEN {
            "it is too long"
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
            "it has a character other than an ASCII letter or digit"
        } else if !name.as_bytes()[0].is_ascii_alphabetic() {
            "it does not start with a letter"
        } else {
            return Ok(Bootname(name));
        };
        Err(BadName(format!(
            "slot bootname \"{}\" must be 1 to {} ASCII letters and digits, starting with a letter: {why}",
            escape_for_log(&name, 32),
            Bootname::MAX_LEN
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The kernel's id of the current boot (`/proc/sys/kernel/random/boot_id`): a reboot is a
/// new one. Any text the kernel (or a test's file) gives, trimmed, not empty, at most
/// [`BootId::MAX_LEN`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct BootId(String);

impl BootId {
    pub const MAX_LEN: usize = 256;

    pub fn new(id: impl Into<String>) -> Result<BootId, BadName> {
        let id = id.into();
        if id.is_empty() || id.len() > BootId::MAX_LEN || id.trim() != id {
            return Err(BadName(format!(
                "boot id \"{}\" must be 1 to {} bytes without surrounding white space",
                escape_for_log(&id, 40),
                BootId::MAX_LEN
            )));
        }
        Ok(BootId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! text_name {
    ($name:ident) => {
        impl FromStr for $name {
            type Err = BadName;

            fn from_str(text: &str) -> Result<$name, BadName> {
                $name::new(text)
            }
        }

        impl TryFrom<String> for $name {
            type Error = BadName;

            fn try_from(text: String) -> Result<$name, BadName> {
                $name::new(text)
            }
        }

        /// Written as the plain string it is (also as a map key).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

text_name!(Bootname);
text_name!(BootId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootname_is_one_to_sixteen_letters_and_digits_starting_with_a_letter() {
        for good in ["A", "B", "system0", "rootfs1", "ABCDEFGHIJKLMNOP"] {
            assert_eq!(Bootname::new(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "0",
            "A_B",
            "rootfs_a",
            "ABCDEFGHIJKLMNOPQ",
            "A B",
            "A\nBOOT_B_LEFT=9",
            "B;reset",
            "A=1",
            "a-b",
            "Ä",
        ] {
            let err = Bootname::new(bad).unwrap_err().to_string();
            assert!(
                err.contains("must be 1 to 16 ASCII letters"),
                "{bad:?}: {err}"
            );
            assert!(!err.contains('\n'), "the name is escaped: {err}");
        }
    }

    #[test]
    fn names_are_checked_where_they_are_read_from_json_too() {
        let name: Bootname = serde_json::from_str("\"B\"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"B\"");
        assert!(serde_json::from_str::<Bootname>("\"B;reset\"").is_err());
        let id: BootId = serde_json::from_str("\"4f1c2a3e-aa55\"").unwrap();
        assert_eq!(id, "4f1c2a3e-aa55");
        for bad in ["\"\"", "\" boot-1\"", "\"boot-1\\n\""] {
            assert!(serde_json::from_str::<BootId>(bad).is_err(), "{bad}");
        }
        let long = "x".repeat(BootId::MAX_LEN + 1);
        assert!(BootId::new(long).is_err());
    }

    #[test]
    fn a_bootname_is_a_map_key_in_json() {
        let map = alloc::collections::BTreeMap::from([(Bootname::new("B").unwrap(), 1)]);
        let json = serde_json::to_string(&map).unwrap();
        assert_eq!(json, r#"{"B":1}"#);
        let back: alloc::collections::BTreeMap<Bootname, u32> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(back["B"], 1);
        assert!(
            serde_json::from_str::<alloc::collections::BTreeMap<Bootname, u32>>(r#"{"":1}"#)
                .is_err()
        );
    }
}
