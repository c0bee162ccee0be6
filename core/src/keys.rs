//! Key ids, the names releases give their signers, and the set of trusted public keys a release
//! is verified against. Reading keys from files (PEM, the trust anchor directory) is the agent's
//! (`update_agent::keys`, `update_agent::anchor`): here keys are values.

use alloc::collections::BTreeMap;
use core::fmt;

use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};

use crate::prelude::*;

/// The hex SHA-256 of the raw 32-byte public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        KeyId(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses the 64-character lower- or upper-case hex form.
    pub fn from_hex(text: &str) -> Option<KeyId> {
        if text.len() != 64 {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(KeyId(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 bytes in hex: enough for a human to tell keys apart in a log line.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.short())
    }
}

/// The public keys whose signatures count, by key id: what [`crate::release::verify()`] checks
/// a release against. The agent loads them from its trust anchor.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl TrustedKeys {
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustedKeys {
        let mut trusted = TrustedKeys::default();
        for key in keys {
            trusted.insert(key);
        }
        trusted
    }

    /// Adds `key` under its id (a key added twice is there once).
    pub fn insert(&mut self, key: VerifyingKey) {
        self.keys.insert(KeyId::of(&key), key);
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    /// The ids of the trusted keys, in order.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    #[test]
    fn key_id_round_trips_through_hex() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let id = KeyId::of(&key.verifying_key());
        assert_eq!(KeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(KeyId::from_hex(&id.to_hex().to_uppercase()), Some(id));
        assert_eq!(KeyId::from_hex("abcd"), None);
        assert_eq!(KeyId::from_hex(&"zz".repeat(32)), None);
    }
}
