//! Test support shared by the integration tests: fixed keys from fixed seeds, and releases
//! assembled by hand (not by the library under test), so a test can build any shape, hostile
//! or not.

use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use update_agent::keys::KeyId;

/// Seeds of the corpus keys: A and B are in the corpus trust anchor, C is not.
pub const KEY_A: u8 = 1;
pub const KEY_B: u8 = 2;
pub const KEY_C: u8 = 3;

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn keyid_hex(seed: u8) -> String {
    KeyId::of(&key(seed).verifying_key()).to_hex()
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// The compatible string, floor and clock of the corpus policy (see `tests/corpus/cases.toml`).
pub const COMPATIBLE: &str = "acme-gw-1";
pub const FLOOR: u64 = 10;
pub const NOW: &str = "2026-06-01T00:00:00Z";

pub const IMAGE_SHA256: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

/// A valid manifest for the corpus policy, as a JSON value to mutate.
pub fn base_manifest() -> Value {
    json!({
        "format": 1,
        "version": "2026.06.1",
        "security_version": 12,
        "compatible": COMPATIBLE,
        "created": "2026-05-01T00:00:00Z",
        "security": true,
        "severity": "high",
        "advisory": "Fixes CVE-2026-0001 in the MQTT client.",
        "disruption": {"reboot": true, "downtime_seconds": 90},
        "images": {
            "rootfs": {
                "url": "https://updates.example.com/acme-gw-1/2026.06.1/rootfs.img",
                "size": 1048576,
                "sha256": IMAGE_SHA256
            }
        }
    })
}

pub fn to_bytes(manifest: &Value) -> Vec<u8> {
    serde_json::to_vec(manifest).unwrap()
}

/// `(keyid, sig)` of `seed`'s signature over `manifest`, both as they go on the wire.
pub fn sig_entry(seed: u8, manifest: &[u8]) -> (String, String) {
    (keyid_hex(seed), b64(&key(seed).sign(manifest).to_bytes()))
}

/// An envelope, pretty-printed as the tool writes it.
pub fn envelope(manifest: &[u8], signatures: &[(String, String)]) -> Vec<u8> {
    envelope_with_manifest_text(&b64(manifest), signatures)
}

pub fn envelope_with_manifest_text(manifest: &str, signatures: &[(String, String)]) -> Vec<u8> {
    let sigs: Vec<Value> = signatures
        .iter()
        .map(|(keyid, sig)| json!({"keyid": keyid, "sig": sig}))
        .collect();
    let mut out = serde_json::to_vec_pretty(&json!({"manifest": manifest, "signatures": sigs}))
        .expect("a JSON value serialises");
    out.push(b'\n');
    out
}

/// `manifest` signed by each of `seeds`, in that order.
pub fn signed(manifest: &[u8], seeds: &[u8]) -> Vec<u8> {
    let sigs: Vec<_> = seeds.iter().map(|&s| sig_entry(s, manifest)).collect();
    envelope(manifest, &sigs)
}
