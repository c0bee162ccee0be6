//! Arbitrary bytes as a served block index, the way a device reads one: the header parser, then
//! `expand` (bound to a manifest whose hash and image size match the bytes, so that the body's
//! decompression and every count check are reached), then every entry and frame of what was
//! accepted. Besides "no panic", it checks that refusal messages are safe to log and that an
//! accepted index is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use update_agent::release::block_index::{self, BlockLocation, IndexError, IndexHeader};
use update_agent::release::manifest::{ChunkIndexRef, Image};

fn check_message(message: &str) {
    assert!(
        !message.chars().any(char::is_control),
        "control character in refusal message {message:?}"
    );
    assert!(message.len() <= 1024, "refusal message too long");
}

fuzz_target!(|data: &[u8]| {
    let header = match IndexHeader::parse(data) {
        Ok(header) => header,
        Err(refusal) => {
            check_message(&refusal.message);
            return;
        }
    };
    // Keep the expanded file small: the fuzzer's disk is not the point.
    if header.raw_body_size() > 64 << 20 {
        return;
    }
    let chunks = ChunkIndexRef {
        url: "https://updates.example.com/image.index".into(),
        sha256: hex::encode(Sha256::digest(data)),
        chunk_size: u64::from(header.block_size),
    };
    let mut image = Image::uncompressed(
        "https://updates.example.com/image",
        header.image_size,
        [0; 32],
    );
    image.chunks = Some(chunks.clone());
    let dir = tempfile::tempdir().unwrap();
    match block_index::expand(data, &image, &chunks, &dir.path().join("index")) {
        Ok(index) => {
            let h = index.header();
            assert!(!h.body_compressed);
            let mut stored = 0;
            for entry in index.entries() {
                let entry = entry.unwrap();
                if let BlockLocation::Stored { ordinal, .. } = entry.location {
                    assert!(ordinal < h.stored_blocks);
                    assert!(index.frame_of(ordinal) < h.frame_count);
                    stored += 1;
                }
            }
            assert_eq!(stored, h.stored_blocks);
            let mut total = 0;
            for frame in index.frames() {
                let frame = frame.unwrap();
                assert_eq!(frame.offset, total);
                assert!(!index.frame_blocks(frame.frame).is_empty());
                total += frame.size;
            }
            assert_eq!(total, h.store_size);
        }
        Err(IndexError::Refused(refusal)) => check_message(&refusal.message),
        Err(IndexError::Io { .. }) => panic!("local IO failed in the fuzzer's temporary directory"),
    }
});
