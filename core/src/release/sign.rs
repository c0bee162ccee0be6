//! The operator side of the envelope: serialise a manifest and sign it. Hashing the image
//! files the manifest names is the agent's (`update_agent::release::build`).

use ed25519_dalek::{Signer, SigningKey};

use crate::keys::KeyId;
use crate::prelude::*;
use crate::release::envelope::SignatureEntry;
use crate::release::{Envelope, Manifest, Refusal};

/// Serialises and signs a manifest. The manifest is validated first, so the tool cannot produce
/// a release that every device would refuse as malformed.
pub fn sign_manifest(manifest: &Manifest, key: &SigningKey) -> Result<Envelope, Refusal> {
    manifest.validate()?;
    let mut manifest_bytes =
        serde_json::to_vec_pretty(manifest).expect("a manifest always serialises");
    manifest_bytes.push(b'\n');
    let mut envelope = Envelope {
        manifest_bytes,
        signatures: Vec::new(),
    };
    add_signature(&mut envelope, key);
    Ok(envelope)
}

/// Adds `key`'s signature over the manifest bytes as they are; a key that already signed is
/// replaced, not listed twice.
pub fn add_signature(envelope: &mut Envelope, key: &SigningKey) {
    let keyid = KeyId::of(&key.verifying_key());
    envelope.signatures.retain(|entry| entry.keyid != keyid);
    envelope.signatures.push(SignatureEntry {
        keyid,
        sig: key.sign(&envelope.manifest_bytes),
    });
}
