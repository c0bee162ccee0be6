//! Delta updates on the device: reuse the blocks a gateway already has, fetch only the rest.
//!
//! - [`lookup`]: a slot's blocks by content hash (a sorted table on disk, cached per slot
//!   content), built by hashing the slot or from the signed index of the release it holds.
//! - [`plan`]: for each block of the new image, where it comes from (zeros, the target slot as
//!   it is, a local copy, the store), and the coalesced HTTP Range requests for the store.
//! - [`assemble`]: carries a plan out block by block, each block checked against the signed
//!   index before it is handed to the writer; a local copy that does not match is fetched.
//!
//! Both are pure building blocks over files: no network, no slot writes. The image's own index
//! is [`crate::release::block_index`].

pub mod assemble;
pub mod lookup;
pub mod plan;
