//! The U-Boot rules, shared by the U-Boot and the file backend: `BOOT_ORDER` lists bootnames,
//! `BOOT_<name>_LEFT` counts the tries a slot has left, in hex without `0x` as U-Boot's
//! `setexpr` writes it (and RAUC too).
//!
//! The boot script (`config/boot/uboot-boot.cmd`) fills in what is unset before it looks: a
//! missing `BOOT_ORDER` is the configured order, a missing `BOOT_<name>_LEFT` is the attempt
//! budget. The reads here apply the same defaults, so that they say what the script will do.

use std::borrow::Cow;

use super::BootloaderError;
use super::chooser::{Scheme, Tries};
use super::slots::{Slots, order_without};
use super::store::{Change, Vars};
use crate::release::escape_for_log;

pub const ORDER_VAR: &str = "BOOT_ORDER";

pub fn left_var(name: &str) -> String {
    format!("BOOT_{name}_LEFT")
}

pub struct Counter {
    /// The try budget written by mark-active and mark-good, and the script's default for an
    /// unset counter.
    pub attempts: u32,
}

/// 1 to 8 hex digits and nothing else. A `0x` prefix is refused on purpose: scripts that test
/// `0x${BOOT_A_LEFT} -gt 0` would read `0x0x3` as 0, so the value means different things to
/// different scripts.
fn parse_hex_count(value: &str) -> Option<u32> {
    if value.is_empty() || value.len() > 8 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(value, 16).ok()
}

impl Scheme for Counter {
    fn order_var(&self) -> &'static str {
        ORDER_VAR
    }

    fn order<'v>(&self, vars: &'v Vars, slots: &'v Slots) -> Cow<'v, str> {
        // U-Boot cannot hold an empty variable (setting one empty removes it), and the script
        // tests with `test -n`: empty and unset mean the same.
        match vars.get(ORDER_VAR) {
            Some(order) if !order.is_empty() => order.into(),
            _ => slots.default_order().into(),
        }
    }

    fn tries(&self, vars: &Vars, name: &str, origin: &str) -> Result<Tries, BootloaderError> {
        let var = left_var(name);
        let stored = match vars.get(&var) {
            None => None,
            Some(value) => Some(parse_hex_count(value).ok_or_else(|| {
                BootloaderError::Malformed {
                    store: origin.to_owned(),
                    what: format!(
                        "{var} is \"{}\", not a count of tries in hex digits (as U-Boot's setexpr writes it); \
                         mark the slot good, bad or active to rewrite it",
                        escape_for_log(value, 32)
                    ),
                }
            })?),
        };
        Ok(Tries {
            effective: stored.unwrap_or(self.attempts),
            reported: stored,
        })
    }

    fn good(&self, name: &str) -> Change {
        Change::default().set(left_var(name), format!("{:x}", self.attempts))
    }

    fn bad(&self, order: &str, name: &str) -> Change {
        Change::default()
            .set(ORDER_VAR, order_without(order, name))
            .set(left_var(name), "0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootloader::chooser::EnvBootloader;
    use crate::bootloader::store::tests::Memory;
    use crate::bootloader::uboot::render_script;
    use crate::bootloader::{Bootloader, BootloaderKind};

    #[test]
    fn each_operation_is_one_script_holding_all_its_variables() {
        let store = Memory::default();
        let writes = store.writes.clone();
        let take_writes = || -> Vec<String> {
            std::mem::take(&mut *writes.lock().unwrap())
                .iter()
                .map(render_script)
                .collect()
        };
        let bl = EnvBootloader::new(
            BootloaderKind::UBoot,
            Counter { attempts: 3 },
            Box::new(store),
            Slots::new(&["A".into(), "B".into()]).unwrap(),
        );
        let header = "# written by update-agent: one change, one environment write\n";
        bl.mark_active("B").unwrap();
        assert_eq!(
            take_writes(),
            vec![format!("{header}BOOT_ORDER=B A\nBOOT_B_LEFT=3\n")]
        );
        bl.mark_bad("B").unwrap();
        assert_eq!(
            take_writes(),
            vec![format!("{header}BOOT_ORDER=A\nBOOT_B_LEFT=0\n")]
        );
        bl.mark_good("A").unwrap();
        assert_eq!(take_writes(), vec![format!("{header}BOOT_A_LEFT=3\n")]);
        assert_eq!(bl.primary().unwrap().as_deref(), Some("A"));
    }

    #[test]
    fn counts_are_bare_hex() {
        assert_eq!(parse_hex_count("3"), Some(3));
        assert_eq!(parse_hex_count("a"), Some(10));
        assert_eq!(parse_hex_count("0"), Some(0));
        assert_eq!(parse_hex_count("ffffffff"), Some(u32::MAX));
        for bad in ["", "0x3", "-1", "3 ", "zz", "100000000", "３"] {
            assert_eq!(parse_hex_count(bad), None, "{bad:?}");
        }
    }
}
