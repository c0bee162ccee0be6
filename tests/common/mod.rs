//! Helpers for the integration tests: the simulated gateway (`update_agent::sim`) running the
//! binary cargo built for them, and (in `releases`) fixed keys and releases assembled by hand.
//! Each test crate that says `mod common;` uses only part of it.
#![allow(dead_code, unused_imports)] // each test crate uses a different part

mod releases;
pub use releases::*;

pub use update_agent::sim::tools::{assert_exit, describe, in_mount_namespace, require};

pub use update_agent::sim::{self, Backend, Gateway, ImageServer, pattern, sha256_hex, wait_for};

/// The agent's binary, as cargo built it for the tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_update-agent");

/// `update-agent release create` of `image`, signed with the key at `signer_key`, version
/// `version` (security version `security_version`) for `compatible` devices, at `url`; the
/// caller adds the rest (`--out`, options).
pub fn release_create(
    signer_key: &std::path::Path,
    image: &std::path::Path,
    [version, security_version]: [&str; 2],
    compatible: &str,
    url: &str,
) -> std::process::Command {
    let mut command = std::process::Command::new(BIN);
    command
        .args(["release", "create", "--key"])
        .arg(signer_key)
        .arg("--image")
        .arg(image)
        .args(["--version", version, "--security-version", security_version])
        .args(["--compatible", compatible, "--url", url]);
    command
}

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

/// The events of an update that commits, in order, as the agent reports them.
#[rustfmt::skip]
pub const COMMITTED: [&str; 7] =
    ["accepted", "writing", "written", "activated", "rebooting", "trial-boot", "committed"];

/// The events of an update whose trial boot fails its health check.
#[rustfmt::skip]
pub const ROLLED_BACK: [&str; 8] = [
    "accepted", "writing", "written", "activated", "rebooting", "trial-boot", "rolling-back",
    "rolled-back",
];

/// `Deref`/`DerefMut` to the `gateway` field of a test's device type, which adds what the test
/// keeps beside the gateway (an image server, the image).
#[allow(unused_macros)] // each test crate uses a different part
macro_rules! derefs_to_gateway {
    ($device:ty) => {
        impl std::ops::Deref for $device {
            type Target = $crate::common::Gateway;
            fn deref(&self) -> &$crate::common::Gateway {
                &self.gateway
            }
        }

        impl std::ops::DerefMut for $device {
            fn deref_mut(&mut self) -> &mut $crate::common::Gateway {
                &mut self.gateway
            }
        }
    };
}

pub mod mqtt_state;

/// The least-privilege split (after the macros, which it uses).
pub mod split;
