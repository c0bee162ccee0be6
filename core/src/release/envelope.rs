//! The outer layer of a release: base64 manifest bytes plus signatures. This is the only parse
//! that runs on unauthenticated bytes, so it is bounded in size and in the number of signatures.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::Signature;
use serde::{Deserialize, Serialize};

use crate::keys::KeyId;
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::Refusal;
use crate::release::json::{self, Object};

/// A release is at most 64 KiB on the wire (MQTT payload, file, HTTP body).
pub const MAX_RELEASE_SIZE: usize = 64 * 1024;
/// More signatures than this is not a k-of-n setup anyone runs; it bounds the verification work.
pub const MAX_SIGNATURES: usize = 16;

/// A parsed envelope. The manifest bytes are kept exactly as sent: signatures cover them, and
/// nothing in them has been interpreted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub manifest_bytes: Vec<u8>,
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    pub keyid: KeyId,
    pub sig: Signature,
}

/// The JSON shape, with strings still undecoded.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    manifest: String,
    #[serde(deserialize_with = "json::objects")]
    signatures: Vec<WireSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: String,
    sig: String,
}

impl Envelope {
    pub fn parse(bytes: &[u8]) -> Result<Envelope, Refusal> {
        if bytes.len() > MAX_RELEASE_SIZE {
            return Err(Refusal::new(
                ReasonCode::TooLarge,
                format!(
                    "release is {} bytes; at most {MAX_RELEASE_SIZE} are accepted",
                    bytes.len()
                ),
            ));
        }
        let Object(wire) = serde_json::from_slice::<Object<Wire>>(bytes)
            .map_err(|e| crate::release::malformed_json("release envelope", &e))?;
        if wire.signatures.is_empty() {
            return Err(Refusal::new(
                ReasonCode::UntrustedKey,
                "release carries no signature",
            ));
        }
        if wire.signatures.len() > MAX_SIGNATURES {
            return Err(Refusal::new(
                ReasonCode::Malformed,
                format!(
                    "release carries {} signatures; at most {MAX_SIGNATURES} are accepted",
                    wire.signatures.len()
                ),
            ));
        }
        let manifest_bytes = STANDARD.decode(wire.manifest.as_bytes()).map_err(|e| {
            Refusal::new(
                ReasonCode::Malformed,
                format!("manifest is not valid base64: {e}"),
            )
        })?;
        let signatures = wire
            .signatures
            .iter()
            .enumerate()
            .map(|(index, entry)| decode_signature(index, entry))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Envelope {
            manifest_bytes,
            signatures,
        })
    }

    pub fn to_json(&self) -> String {
        let wire = Wire {
            manifest: STANDARD.encode(&self.manifest_bytes),
            signatures: self
                .signatures
                .iter()
                .map(|entry| WireSignature {
                    keyid: entry.keyid.to_hex(),
                    sig: STANDARD.encode(entry.sig.to_bytes()),
                })
                .collect(),
        };
        let mut json = serde_json::to_string_pretty(&wire).expect("strings always serialise");
        json.push('\n');
        json
    }
}

fn decode_signature(index: usize, entry: &WireSignature) -> Result<SignatureEntry, Refusal> {
    let malformed = |what: &str| {
        Refusal::new(
            ReasonCode::Malformed,
            format!("signatures[{index}]: {what}"),
        )
    };
    let keyid =
        KeyId::from_hex(&entry.keyid).ok_or_else(|| malformed("keyid is not 64 hex digits"))?;
    let raw = STANDARD
        .decode(entry.sig.as_bytes())
        .map_err(|_| malformed("sig is not valid base64"))?;
    let bytes: [u8; 64] = raw
        .try_into()
        .map_err(|_| malformed("sig is not 64 bytes"))?;
    Ok(SignatureEntry {
        keyid,
        sig: Signature::from_bytes(&bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_messages_escape_attacker_text() {
        // serde's messages quote the offending key or value: a terminal escape or a newline in
        // an unknown field name must not reach a log line or a terminal as it is.
        let long = "x".repeat(10_000);
        for input in [
            r#"{"manifest": "", "\u001b[2J\nFAKE LOG LINE": 1}"#.to_string(),
            format!(r#"{{"{long}": 1}}"#),
            format!(r#"{{"manifest": 1, "signatures": [{{"keyid": "{long}", "sig": 5}}]}}"#),
        ] {
            let refusal = Envelope::parse(input.as_bytes()).unwrap_err();
            assert_eq!(refusal.code, ReasonCode::Malformed);
            assert!(
                !refusal.message.chars().any(char::is_control),
                "{:?}",
                refusal.message
            );
            assert!(refusal.message.len() < 400, "{}", refusal.message.len());
        }
    }
}
