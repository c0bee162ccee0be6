//! Helpers for the integration tests: the simulated gateway (`update_agent::sim`) running the
//! binary cargo built for them, and (in `releases`) fixed keys and releases assembled by hand.
//! Each test crate that says `mod common;` uses only part of it.
#![allow(dead_code, unused_imports)] // each test crate uses a different part

mod releases;
pub use releases::*;

pub use update_agent::sim::tools::{assert_exit, describe, require};

pub use update_agent::sim::{self, Backend, Gateway, ImageServer, pattern, sha256_hex, wait_for};

/// The agent's binary, as cargo built it for the tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_update-agent");

/// A simulated gateway whose agent is [`BIN`].
pub fn gateway() -> sim::GatewayBuilder {
    Gateway::builder().binary(BIN)
}

/// One test per backend for each scenario `fn NAME(backend: Backend)` of the test crate:
/// `uboot::NAME`, `grub::NAME`, `file::NAME`.
#[allow(unused_macros)] // each test crate uses a different part
macro_rules! backend_tests {
    ($($scenario:ident),* $(,)?) => {
        backend_tests!(@module uboot UBoot $($scenario),*);
        backend_tests!(@module grub Grub $($scenario),*);
        backend_tests!(@module file File $($scenario),*);
    };
    (@module $module:ident $backend:ident $($scenario:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(super::Backend::$backend);
                }
            )*
        }
    };
}
