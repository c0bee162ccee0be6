//! Releases: the signed JSON document that announces one update.
//!
//! The envelope, the manifest, their verification against the trusted keys and the signing are
//! the core's (`update_agent_core::release`, no IO), re-exported here under the same paths; this
//! module adds what reads files:
//!
//! - [`build`]: the operator side — hash an image file, then create and sign.
//! - [`block_index`]: the block index of an image (delta downloads, per-block verification).
//! - [`index_build`]: the operator side of the block index and its store (feature `operator`).
//! - [`read_release_file`]: a release file, read with its size bound.

pub mod block_index;
pub mod build;
#[cfg(feature = "operator")]
pub mod index_build;

pub use update_agent_core::release::*;

/// Reads a release file, never more than one byte past [`MAX_RELEASE_SIZE`] (so that an oversized
/// file is refused as `too-large` by [`Envelope::parse`] without being read whole).
pub fn read_release_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_RELEASE_SIZE as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}
