//! Slot bootnames and boot orders: the only text of ours that goes into a bootloader
//! environment, so it is checked before it gets there.

use super::BootloaderError;
use crate::engine::Bootname;

/// An A/B setup has two slots, A/B/recovery three; more is a configuration mistake.
pub const MAX_SLOTS: usize = 8;
/// A boot order longer than this is not kept when the agent rewrites it: the entries past it
/// are dropped, so a hostile or corrupt order cannot grow the environment.
pub const MAX_ORDER_ENTRIES: usize = 16;

/// A name the boot scripts can use in a variable name: the rule of [`Bootname`].
pub fn check_bootname(name: &str) -> Result<(), BootloaderError> {
    Bootname::new(name)
        .map(drop)
        .map_err(|e| BootloaderError::BadBootname(e.to_string()))
}

fn is_bootname(name: &str) -> bool {
    check_bootname(name).is_ok()
}

/// The configured bootnames, in their default boot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots(Vec<String>);

impl Slots {
    pub fn new(names: &[String]) -> Result<Slots, BootloaderError> {
        if names.is_empty() || names.len() > MAX_SLOTS {
            return Err(BootloaderError::Config(format!(
                "`bootloader.slots` must name 1 to {MAX_SLOTS} slot bootnames, e.g. [\"A\", \"B\"]"
            )));
        }
        for (i, name) in names.iter().enumerate() {
            check_bootname(name)?;
            if names[..i].contains(name) {
                return Err(BootloaderError::Config(format!(
                    "`bootloader.slots` names {name} twice"
                )));
            }
        }
        Ok(Slots(names.to_vec()))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|n| n == name)
    }

    /// Checks that an operation names a configured slot.
    pub fn check(&self, name: &str) -> Result<(), BootloaderError> {
        check_bootname(name)?;
        if self.contains(name) {
            Ok(())
        } else {
            Err(BootloaderError::UnknownSlot {
                name: name.to_owned(),
                configured: self.0.join(", "),
            })
        }
    }

    /// The order the boot scripts assume when the environment has none: the configured order.
    pub fn default_order(&self) -> String {
        self.0.join(" ")
    }

    /// The configured slots in `order`, first to last, as the boot scripts walk it. Words that
    /// are not configured slots (a recovery entry, garbage) are passed over, as the scripts do.
    pub fn walk<'a>(&'a self, order: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        order.split_whitespace().filter(|w| self.contains(w))
    }
}

/// `order` with `first` in front and everything else after it in the order it had. Words that
/// could not be bootnames are dropped, as are repeats and entries past [`MAX_ORDER_ENTRIES`];
/// names we do not manage (e.g. a recovery slot) stay, as RAUC keeps them.
pub fn order_with_first(order: &str, first: &str) -> String {
    let mut out = vec![first];
    keep_sane(order, &mut out, |w| w != first);
    out.join(" ")
}

/// `order` without `name`, cleaned up as in [`order_with_first`].
pub fn order_without(order: &str, name: &str) -> String {
    let mut out = Vec::new();
    keep_sane(order, &mut out, |w| w != name);
    out.join(" ")
}

fn keep_sane<'a>(order: &'a str, out: &mut Vec<&'a str>, keep: impl Fn(&str) -> bool) {
    for word in order.split_whitespace() {
        if out.len() == MAX_ORDER_ENTRIES {
            break;
        }
        if keep(word) && is_bootname(word) && !out.contains(&word) {
            out.push(word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(names: &[&str]) -> Slots {
        Slots::new(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn bootnames_that_could_break_a_script_are_refused() {
        for good in ["A", "B", "system0", "rootfs1"] {
            assert!(check_bootname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "0",
            "A B",
            "A\nB",
            "A=B",
            "A_B",
            "ä",
            "A;reset",
            "abcdefghijklmnopq",
        ] {
            assert!(check_bootname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slot_list_must_be_distinct_and_nonempty() {
        assert!(Slots::new(&[]).is_err());
        assert!(Slots::new(&["A".into(), "A".into()]).is_err());
        assert!(Slots::new(&["A".into(), "B C".into()]).is_err());
        let s = slots(&["A", "B"]);
        assert!(s.check("A").is_ok());
        assert!(matches!(
            s.check("C"),
            Err(BootloaderError::UnknownSlot { .. })
        ));
    }

    #[test]
    fn reorder_keeps_foreign_entries_and_drops_garbage() {
        assert_eq!(order_with_first("A B", "B"), "B A");
        assert_eq!(order_with_first("A", "B"), "B A");
        assert_eq!(order_with_first("", "B"), "B");
        assert_eq!(order_with_first(" A  R B B ", "B"), "B A R");
        assert_eq!(order_with_first("A x=y ;reset B", "B"), "B A");
        assert_eq!(order_without("B A R", "B"), "A R");
        assert_eq!(order_without("B", "B"), "");
        let long = (0..1000)
            .map(|i| format!("S{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            order_with_first(&long, "A").split(' ').count(),
            MAX_ORDER_ENTRIES
        );
    }

    #[test]
    fn walk_passes_over_names_it_does_not_manage() {
        let s = slots(&["A", "B"]);
        assert_eq!(s.walk("R B x A").collect::<Vec<_>>(), vec!["B", "A"]);
    }
}
