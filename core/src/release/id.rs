//! A release's identity: the SHA-256 of its manifest bytes. Two deliveries of the same release
//! have the same id, whatever their signatures; it is written as 64 lowercase hex digits in
//! events, `state.json` and file names.

use core::fmt;
use core::str::FromStr;

use crate::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseId([u8; 32]);

/// Text that is not 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a release id is 64 lowercase hex digits (the manifest's sha256), not \"{0}\"")]
pub struct BadReleaseId(String);

impl ReleaseId {
    /// The id of the release whose manifest bytes hash to `digest`.
    pub fn from_digest(digest: [u8; 32]) -> ReleaseId {
        ReleaseId(digest)
    }

    pub fn digest(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 12 hex digits, to name a transaction by.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl FromStr for ReleaseId {
    type Err = BadReleaseId;

    fn from_str(text: &str) -> Result<ReleaseId, BadReleaseId> {
        let bad = || BadReleaseId(crate::release::escape_for_log(text, 80));
        let lowercase_hex = text.len() == 64
            && text
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        if !lowercase_hex {
            return Err(bad());
        }
        let mut digest = [0; 32];
        hex::decode_to_slice(text, &mut digest).map_err(|_| bad())?;
        Ok(ReleaseId(digest))
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReleaseId({self})")
    }
}

impl Serialize for ReleaseId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReleaseId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ReleaseId, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_id_is_written_and_read_as_64_lowercase_hex_digits() {
        let id = ReleaseId::from_digest([0xab; 32]);
        let text = "ab".repeat(32);
        assert_eq!(id.to_string(), text);
        assert_eq!(id.short(), "abababababab");
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
        assert_eq!(text.parse::<ReleaseId>().unwrap(), id);
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "ab".repeat(33),
            format!("{}zz", "ab".repeat(31)),
            String::new(),
        ] {
            assert!(bad.parse::<ReleaseId>().is_err(), "{bad}");
            assert!(serde_json::from_str::<ReleaseId>(&format!("\"{bad}\"")).is_err());
        }
    }
}
