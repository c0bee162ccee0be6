//! What every environment backend does the same way, whatever its variables: check the
//! bootname, hold the change lock, read the environment, write one change, read it back. Which
//! variables there are and what they mean is a [`Scheme`]'s business.

use std::borrow::Cow;

use super::slots::{Slots, order_with_first};
use super::store::{Change, ChangeLock, EnvStore, Vars, apply};
use super::{Bootloader, BootloaderError, BootloaderKind, SlotBootState};

/// How many tries the boot script would give a slot when it reaches it in the order.
pub struct Tries {
    /// 0: the script passes the slot over.
    pub effective: u32,
    /// What `status` shows (see [`SlotBootState::tries_left`]).
    pub reported: Option<u32>,
}

/// One set of boot-script variables: U-Boot's counters or GRUB's OK/TRY flags.
pub trait Scheme: Send + Sync {
    /// The variable that lists the bootnames in boot order.
    fn order_var(&self) -> &'static str;
    /// The order the script walks, with the script's default where the variable is unset.
    fn order<'v>(&self, vars: &'v Vars, slots: &'v Slots) -> Cow<'v, str>;
    /// `origin` names the store, for the error about a value that is not a number.
    fn tries(&self, vars: &Vars, name: &str, origin: &str) -> Result<Tries, BootloaderError>;
    /// Mark-good; mark-active writes this too, after the new order.
    fn good(&self, name: &str) -> Change;
    /// Mark-bad, given the current order.
    fn bad(&self, order: &str, name: &str) -> Change;
}

pub struct EnvBootloader<S> {
    pub kind: BootloaderKind,
    pub scheme: S,
    pub store: Box<dyn EnvStore>,
    pub slots: Slots,
    pub lock: ChangeLock,
}

impl<S: Scheme> EnvBootloader<S> {
    pub fn new(
        kind: BootloaderKind,
        scheme: S,
        store: Box<dyn EnvStore>,
        slots: Slots,
    ) -> EnvBootloader<S> {
        EnvBootloader {
            kind,
            scheme,
            store,
            slots,
            lock: ChangeLock::default(),
        }
    }

    fn tries(&self, vars: &Vars, name: &str) -> Result<Tries, BootloaderError> {
        self.scheme.tries(vars, name, &self.store.describe())
    }
}

impl<S: Scheme> Bootloader for EnvBootloader<S> {
    fn kind(&self) -> BootloaderKind {
        self.kind
    }

    fn primary(&self) -> Result<Option<String>, BootloaderError> {
        let vars = self.store.read()?;
        for name in self.slots.walk(&self.scheme.order(&vars, &self.slots)) {
            if self.tries(&vars, name)?.effective > 0 {
                return Ok(Some(name.to_owned()));
            }
        }
        Ok(None)
    }

    fn mark_active(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let vars = self.store.read()?;
        let order = order_with_first(&self.scheme.order(&vars, &self.slots), name);
        let change = Change::default()
            .set(self.scheme.order_var(), order)
            .and(self.scheme.good(name));
        apply(self.store.as_ref(), &change)
    }

    fn mark_good(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        apply(self.store.as_ref(), &self.scheme.good(name))
    }

    fn mark_bad(&self, name: &str) -> Result<(), BootloaderError> {
        self.slots.check(name)?;
        let _change = self.lock.hold();
        let vars = self.store.read()?;
        let change = self
            .scheme
            .bad(&self.scheme.order(&vars, &self.slots), name);
        apply(self.store.as_ref(), &change)
    }

    fn slot_state(&self, name: &str) -> Result<SlotBootState, BootloaderError> {
        self.slots.check(name)?;
        let vars = self.store.read()?;
        let in_order = self
            .scheme
            .order(&vars, &self.slots)
            .split_whitespace()
            .any(|w| w == name);
        let tries = self.tries(&vars, name)?;
        Ok(SlotBootState {
            in_order,
            good: in_order && tries.effective > 0,
            tries_left: tries.reported,
        })
    }
}
