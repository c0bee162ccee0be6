//! A simulated gateway for `update-agent demo` and every integration test, built from typed
//! pieces instead of a config template copied into each harness. Behind the cargo feature `sim`:
//! the demo turns it on, the tests get it through the dev-dependency on this package, and a
//! device build (`--no-default-features`) has none of it.
//!
//! - [`gateway`]: [`Gateway`], a device in a directory: two file slots, a bootloader environment
//!   (the file backend, U-Boot through the real `fw_setenv`, GRUB through the real
//!   `grub-editenv`), the kernel's boot facts (boot id, command line) and `boot()`, which plays
//!   the boot script ([`crate::bootloader::simulator`]); MQTT, D-Bus, the policy and the
//!   least-privilege split switched on by its builder, which writes the typed
//!   [`crate::config::Config`] it assembled. It runs the agent's binary as a device would.
//! - [`bootenv`]: the bootloader environment and the boot scripts' view of it.
//! - [`http`]: the image server on 127.0.0.1 (Range, multi-range, a request log, a throttle and
//!   the faults a hostile or broken server shows).
//! - [`release`]: signing keys, signed releases and a tampered copy of one.
//! - [`mqtt`]: a mosquitto of the test's own and the mosquitto clients (tests only; the demo
//!   embeds its broker).
//! - [`bus`]: a `dbus-daemon` of the test's own with the project's bus policy.
//! - [`tools`]: the real programs the simulation needs, found on this machine or named with the
//!   Debian package to install; commands run as another user (`setpriv`).
//!
//! What it never is: a mock of the agent. Everything it simulates stands outside the agent (the
//! boot ROM's script, the kernel's facts, the fleet's servers); the agent's own code runs as it
//! does on a device.

pub mod bootenv;
pub mod bus;
pub mod gateway;
pub mod http;
pub mod mqtt;
pub mod release;
pub mod tools;

use std::time::{Duration, Instant};

pub use bootenv::{Backend, BootEnv};
pub use gateway::{Gateway, GatewayBuilder};
pub use http::{Act, ImageServer, RangeAnswers, Seen, Throttle};
pub use release::{Signer, tamper};
pub use tools::User;

/// What a [`wait_for`] check returns: `true`, or `Some(value)`, once what it waits for is there.
pub trait Ready {
    type Value;
    fn ready(self) -> Option<Self::Value>;
}

impl Ready for bool {
    type Value = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `check` every 20 ms until it is ready and returns its value; panics naming `what` after
/// `timeout`. For what a test sees from outside a process (a file, a message, a property); the
/// agent's own time is injected, never waited for.
#[track_caller]
pub fn wait_for<R: Ready>(what: &str, timeout: Duration, mut check: impl FnMut() -> R) -> R::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().ready() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic bytes that differ per `seed` and do not compress to nothing: images, slot
/// contents and the garbage a power cut leaves.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `text` repeated to `len` bytes: an image a person can recognise in a hex dump (the demo's).
pub fn text_pattern(text: &str, len: usize) -> Vec<u8> {
    text.bytes().cycle().take(len).collect()
}

/// The `state` of each event (of the event log, or received on MQTT), in order.
pub fn states(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let state = e["state"].as_str().expect("every event has a state");
            state.to_owned()
        })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// An IO error that says what the simulation was doing.
fn error(what: impl std::fmt::Display, source: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {source}"))
}
