//! Arbitrary bytes into the release verifier, as a device receives them (and, signed with a
//! trusted key, as manifest bytes, so the manifest parser and the policy checks behind the
//! signature check are reached too). Besides "no panic", it checks what must hold for every
//! input: refusal messages are safe to log, accepted releases are valid, envelopes and manifests
//! round-trip through their serialisers.
#![no_main]

use std::sync::LazyLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use update_agent::anchor::TrustAnchor;
use update_agent::release::build::add_signature;
use update_agent::release::{Envelope, Manifest, Policy, Refusal, VerifiedRelease, verify};

/// The corpus keys (tests/corpus/keys): A and B are trusted.
fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

static ANCHOR: LazyLock<TrustAnchor> =
    LazyLock::new(|| TrustAnchor::from_keys([key(1).verifying_key(), key(2).verifying_key()]));

/// The corpus policy (tests/corpus/cases.toml).
static POLICY: LazyLock<Policy> = LazyLock::new(|| Policy {
    threshold: 1,
    compatible: Some("acme-gw-1".into()),
    floor: 10,
    now: "2026-06-01T00:00:00Z".parse().unwrap(),
});

static SIGNER: LazyLock<SigningKey> = LazyLock::new(|| key(1));

/// Manifest bytes up to this size still fit a 64 KiB release once in base64.
const MAX_MANIFEST: usize = 48_000;

fn check(result: Result<VerifiedRelease, Refusal>) {
    match result {
        Ok(verified) => {
            assert!(!verified.signers.is_empty());
            verified
                .manifest
                .validate()
                .expect("an accepted manifest is valid");
            assert!(verified.manifest.security_version >= POLICY.floor);
        }
        Err(refusal) => {
            assert!(
                !refusal.message.chars().any(char::is_control),
                "control character in refusal message {:?}",
                refusal.message
            );
            assert!(refusal.message.len() <= 1024, "refusal message too long");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The device's path, on the bytes as received.
    check(verify(data, &ANCHOR, &POLICY));

    // An envelope that parses is written back identically.
    if let Ok(envelope) = Envelope::parse(data) {
        let again = Envelope::parse(envelope.to_json().as_bytes()).expect("to_json output parses");
        assert_eq!(again, envelope);
    }

    // The bytes as a manifest: directly, and signed by a trusted key through verify.
    if let Ok(manifest) = Manifest::parse(data) {
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serialises");
        let again = Manifest::parse(&bytes).expect("a serialised manifest parses");
        assert_eq!(again, manifest);
    }
    if data.len() <= MAX_MANIFEST {
        let mut envelope = Envelope {
            manifest_bytes: data.to_vec(),
            signatures: Vec::new(),
        };
        add_signature(&mut envelope, &SIGNER);
        check(verify(envelope.to_json().as_bytes(), &ANCHOR, &POLICY));
    }
});
