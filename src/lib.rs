//! update-agent: keeps embedded Linux gateways up to date, safely.
//!
//! See `ARCHITECTURE.md` for the bird's-eye view. Layout, one concept a module:
//!
//! - [`reason`]: stable reason codes for every refusal and failure.
//! - [`keys`]: Ed25519 keys in the PEM files openssl writes; key ids.
//! - [`anchor`]: the read-only trust anchor (a directory of public keys).
//! - [`release`]: the signed release envelope, the manifest, verification and creation.
//! - [`transfer`]: fetch an image (http/https/file, optionally zstd) and stream it into a slot,
//!   resumably, with hash checks on the way in and a read-back past the page cache.

pub mod anchor;
pub mod keys;
pub mod reason;
pub mod release;
pub mod transfer;
