//! The U-Boot rules, shared by the U-Boot and the file backend: `BOOT_ORDER` lists bootnames,
//! `BOOT_<name>_LEFT` counts the tries a slot has left, in hex without `0x` as U-Boot's
//! `setexpr` writes it (and RAUC too).
//!
//! The boot script (`config/boot/uboot-boot.cmd`) fills in what is unset before it looks: a
//! missing `BOOT_ORDER` is the configured order, a missing `BOOT_<name>_LEFT` is the attempt
//! budget. The reads here apply the same defaults, so that they say what the script will do.

use super::slots::{Slots, order_with_first, order_without};
use super::store::{Change, ChangeLock, EnvStore, Vars, apply};
use super::{Bootloader, BootloaderError, BootloaderKind, SlotBootState};
use crate::release::escape_for_log;

pub const ORDER_VAR: &str = "BOOT_ORDER";

pub fn left_var(name: &str) -> String {
    format!("BOOT_{name}_LEFT")
}

pub struct CounterBootloader<S> {
    pub kind: BootloaderKind,
    pub store: S,
    pub slots: Slots,
    /// The try budget written by mark-active and mark-good, and the script's default for an
    /// unset counter.
    pub attempts: u32,
    pub lock: ChangeLock,
}

impl<S: EnvStore> CounterBootloader<S> {
    fn order<'v>(&'v self, vars: &'v Vars) -> std::borrow::Cow<'v, str> {
        // U-Boot cannot hold an empty variable (setting one empty removes it), and the script
        // tests with `test -n`: empty and unset mean the same.
        match vars.get(ORDER_VAR) {
            Some(order) if !order.is_empty() => order.into(),
            _ => self.slots.default_order().into(),
        }
    }

    /// The counter as stored; `None` when unset.
    fn left(&self, vars: &Vars, name: &str) -> Result<Option<u32>, BootloaderError> {
        let var = left_var(name);
        let Some(value) = vars.get(&var) else {
            return Ok(None);
        };
        parse_hex_count(value).map(Some).ok_or_else(|| BootloaderError::Malformed {
            store: self.store.describe(),
            what: format!(
                "{var} is \"{}\", not a count of tries in hex digits (as U-Boot's setexpr writes it); \
                 mark the slot good, bad or active to rewrite it",
                escape_for_log(value, 32)
            ),
        })
    }

    fn tries_left(&self, vars: &Vars, name: &str) -> Result<u32, BootloaderError> {
        Ok(self.left(vars, name)?.unwrap_or(self.attempts))
    }

    fn budget(&self) -> String {
        format!("{:x}", self.attempts)
    }
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

impl<S: EnvStore> Bootloader for CounterBootloader<S> {
    fn kind(&self) -> BootloaderKind {
        self.kind
    }

    fn primary(&self) -> Result<Option<String>, BootloaderError> {
        let vars = self.store.read()?;
        for name in self.slots.walk(&self.order(&vars)) {
            if self.tries_left(&vars, name)? > 0 {
                return Ok(Some(name.to_owned()));
            }
        }
        Ok(None)
    }

    fn mark_active(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let vars = self.store.read()?;
        let change = Change::default()
            .set(ORDER_VAR, order_with_first(&self.order(&vars), name))
            .set(left_var(name), self.budget());
        apply(&self.store, &change)
    }

    fn mark_good(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        apply(
            &self.store,
            &Change::default().set(left_var(name), self.budget()),
        )
    }

    fn mark_bad(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let vars = self.store.read()?;
        let change = Change::default()
            .set(ORDER_VAR, order_without(&self.order(&vars), name))
            .set(left_var(name), "0");
        apply(&self.store, &change)
    }

    fn slot_state(&self, name: &str) -> Result<SlotBootState, BootloaderError> {
        self.slots.check(name)?;
        let vars = self.store.read()?;
        let in_order = self.order(&vars).split_whitespace().any(|w| w == name);
        let left = self.left(&vars, name)?;
        Ok(SlotBootState {
            in_order,
            good: in_order && left.unwrap_or(self.attempts) > 0,
            tries_left: left,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::bootloader::uboot::render_script;

    /// A store that keeps the environment in memory and records every write.
    #[derive(Default)]
    struct Recording {
        vars: Mutex<Vars>,
        writes: Mutex<Vec<Change>>,
    }

    impl EnvStore for Recording {
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

    fn take_writes(bl: &CounterBootloader<Recording>) -> Vec<String> {
        let writes = std::mem::take(&mut *bl.store.writes.lock().unwrap());
        writes.iter().map(render_script).collect()
    }

    #[test]
    fn each_operation_is_one_script_holding_all_its_variables() {
        let bl = CounterBootloader {
            kind: BootloaderKind::UBoot,
            store: Recording::default(),
            slots: Slots::new(&["A".into(), "B".into()]).unwrap(),
            attempts: 3,
            lock: ChangeLock::default(),
        };
        let header = "# written by update-agent: one change, one environment write\n";
        bl.mark_active("B").unwrap();
        assert_eq!(
            take_writes(&bl),
            vec![format!("{header}BOOT_ORDER=B A\nBOOT_B_LEFT=3\n")]
        );
        bl.mark_bad("B").unwrap();
        assert_eq!(
            take_writes(&bl),
            vec![format!("{header}BOOT_ORDER=A\nBOOT_B_LEFT=0\n")]
        );
        bl.mark_good("A").unwrap();
        assert_eq!(take_writes(&bl), vec![format!("{header}BOOT_A_LEFT=3\n")]);
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
