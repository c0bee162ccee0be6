//! update-agent: keeps embedded Linux gateways up to date, safely.
//!
//! See `ARCHITECTURE.md` for the bird's-eye view. The engine, the release types and the reason
//! codes live in the workspace's `update-agent-core` crate (`core/`, `no_std`: it cannot do IO)
//! and are re-exported here under the paths they always had. Layout, one concept a module:
//!
//! - [`agent`]: the driver that carries out the engine's actions with the real adapters.
//! - [`reason`] (the core's): stable reason codes for every refusal and failure.
//! - [`keys`]: Ed25519 keys in the PEM files openssl writes; key ids.
//! - [`anchor`]: the read-only trust anchor (a directory of public keys).
//! - [`health`]: the trial boot's health checks (commands, systemd units, timeout).
//! - [`release`]: the signed release envelope, the manifest, verification and creation (the
//!   core's, plus reading release, image and block index files).
//! - [`state_store`]: the engine's persisted state and the local event log.
//! - [`system`]: facts about the running system: boot id, booted slot.
//! - [`config`]: the agent's TOML configuration, parsed strictly.
//! - [`conformance`]: the agent's own EN 303 645 §5.3 evidence (ICS, IXIT, live checks,
//!   CycloneDX attestation).
//! - [`durable`]: atomic file replacement and size-bounded reads.
//! - `crash_point` (feature `test-hooks`: the tests, never a device build): the power cuts the
//!   tests cause at named points.
//! - [`engine`] (the core's): the update state machine, sans IO: inputs and time in, actions out.
//! - [`dbus`]: the D-Bus service `org.updateagent.Agent1` (zbus) for the person at home; the
//!   daemon's loop owns the agent for it.
//! - [`bootloader`]: U-Boot, GRUB and file backends (RAUC's variables), chosen once at start-up.
//! - [`mqtt`]: the broker connection (rumqttc, MQTT 5 or 3.1.1, TLS), topics and payloads.
//! - `fleet` (feature `operator`): the operator's aggregate view of a fleet from what the
//!   devices publish: states, a rollout's stages and failure rate, stragglers, missing events.
//! - [`outbox`]: events on disk until the broker acknowledged them; bounded.
//! - [`daemon`]: `update-agent run`, the service loop around the agent (the only one: fed by
//!   the broker, or without one by `dbus-serve` and the tests).
//! - [`logging`]: journald or stderr, stable MESSAGE_IDs for failures.
//! - [`delta`]: delta updates on the device: local block tables and the fetch planner.
//! - [`slot_control`]: who writes slots, changes the bootloader and reboots: this process
//!   ([`slot_control::Local`]) or the privileged installer.
//! - [`socket`]: non-blocking socket sends and waits with deadlines (the installer's sockets).
//! - `sim` (feature `sim`: the demo and the tests, never a device build): a simulated gateway
//!   built from typed parts, the image server, releases, and the brokers and bus around it.
//! - [`transfer`]: fetch an image (http/https/file, optionally zstd) and stream it into a slot,
//!   resumably, with hash checks on the way in and a read-back past the page cache.

pub mod agent;
pub mod anchor;
pub mod bootloader;
pub mod config;
pub mod conformance;
#[cfg(feature = "test-hooks")]
pub mod crash_point;
pub mod daemon;
pub mod dbus;
pub mod delta;
pub mod durable;
#[cfg(feature = "operator")]
pub mod fleet;
pub mod health;
pub mod installer;
pub mod keys;
pub mod logging;
pub mod mqtt;
pub mod outbox;
pub mod progress_line;
pub mod release;
#[cfg(feature = "sim")]
pub mod sim;
pub mod slot_control;
pub mod socket;
pub mod state_store;
pub mod system;
pub mod transfer;

/// A file's path in a fresh directory that is removed when the returned guard drops: the
/// opening of most unit tests that touch the file system.
#[cfg(test)]
mod wire_names;

#[cfg(test)]
pub(crate) fn scratch_path(
    name: impl AsRef<std::path::Path>,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    (dir, path)
}

pub use update_agent_core::{engine, reason};
