//! update-agent's core: the update engine and the release types, with no IO at all.
//!
//! The crate is `no_std`: it links `core` and `alloc`, never `std`, so the compiler itself
//! refuses a file, a socket, a process, a thread, an environment variable or a clock read in
//! here. What the engine needs from the world comes in as values (the time, the boot id, the
//! bytes of a release, the trusted keys); what it wants done goes out as actions. The agent
//! (the package `update-agent`) does the IO and re-exports these modules under its own paths
//! (`update_agent::engine`, `update_agent::release`, `update_agent::reason`, ...).
//!
//! - [`engine`]: the update state machine: inputs and time in, actions out.
//! - [`release`]: the signed release envelope, the manifest, verification against trusted keys,
//!   signing.
//! - [`keys`]: key ids and the set of trusted public keys a release is verified against.
//! - [`reason`]: stable reason codes for every refusal and failure.
//!
//! The unit tests run with std (they time the policy's search and read a real time zone);
//! everything else is built without it.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod engine;
pub mod keys;
pub mod reason;
pub mod release;

/// The pinned wire name of every variant of a serde enum of unit variants, for the tests of the
/// wire formats (this crate's and the agent's): `wire_names!(Severity { Low => "low", ... })`
/// is the array of `(variant, name)` pairs. A variant left out does not compile (the match has
/// no wildcard), so a new variant gets its name pinned too.
#[doc(hidden)]
#[macro_export]
macro_rules! wire_names {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {{
        #[allow(dead_code)]
        fn every_variant_is_listed(value: $ty) {
            match value {
                $($ty::$variant => {}),*
            }
        }
        [$(($ty::$variant, $name)),*]
    }};
}

/// What `std`'s prelude would have given every module: the `alloc` types and macros.
mod prelude {
    pub use alloc::borrow::ToOwned;
    pub use alloc::boxed::Box;
    pub use alloc::format;
    pub use alloc::string::{String, ToString};
    pub use alloc::vec::Vec;
}
