//! Releases: the signed JSON document that announces one update.
//!
//! The wire format (see `docs/wire-formats.md`): `{"manifest": "<base64 of the exact manifest bytes>",
//! "signatures": [{"keyid": "<hex sha256 of the raw public key>", "sig": "<base64>"}]}`, at most
//! [`MAX_RELEASE_SIZE`] bytes. Signatures are Ed25519 over the manifest bytes as sent.
//!
//! - [`envelope`]: the bounded outer parse.
//! - [`manifest`]: the strict inner parse, after signatures were checked.
//! - [`verify`](mod@verify): the order of checks that decides whether the device may act on a release.
//! - [`sign`]: the operator side of the envelope — serialise a manifest and sign it.
//! - [`ReleaseId`]: a release's identity, the hash of its manifest bytes.
//!
//! Reading a release file, hashing an image file and the block index (all file IO) are the
//! agent's: `update_agent::release` re-exports this module and adds them.

pub mod envelope;
mod id;
mod json;
pub mod manifest;
pub mod sign;
pub mod verify;

use core::fmt;

use crate::prelude::*;
use crate::reason::ReasonCode;

pub use envelope::{Envelope, MAX_RELEASE_SIZE};
pub use id::{BadReleaseId, ReleaseId};
pub use manifest::Manifest;
pub use verify::{Policy, VerifiedRelease, verify};

/// A release the device must not act on: a stable code plus a sentence naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ReasonCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl core::error::Error for Refusal {}

/// Makes a string that came from outside safe to put in a log line or a message: control
/// characters and non-ASCII are escaped, and the result is cut to at most `max` characters (plus
/// a final `…` when cut; an escape sequence is never split).
pub fn escape_for_log(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut len = 0;
    for c in text.chars() {
        let escaped: String = if c.is_ascii_graphic() || c == ' ' {
            c.into()
        } else {
            c.escape_default().collect()
        };
        if len + escaped.len() > max {
            out.push('…');
            break;
        }
        len += escaped.len();
        out.push_str(&escaped);
    }
    out
}

/// A refusal for JSON that serde would not take. serde's message quotes the offending key or
/// value, which is attacker-controlled: it is escaped and bounded like any outside text.
pub(crate) fn malformed_json(what: &str, error: &serde_json::Error) -> Refusal {
    Refusal::new(
        ReasonCode::Malformed,
        format!("{what}: {}", escape_for_log(&error.to_string(), 240)),
    )
}

#[cfg(test)]
mod tests {
    use super::escape_for_log;

    #[test]
    fn escape_for_log_neutralises_newlines_and_bounds_length() {
        assert_eq!(escape_for_log("a\nb", 10), "a\\nb");
        assert_eq!(escape_for_log("\u{1b}[31m", 10), "\\u{1b}[31m");
        assert_eq!(escape_for_log("abcdef", 3), "abc…");
        assert_eq!(escape_for_log("abc", 3), "abc");
        // The bound is on the output: escapes count at their escaped length and are not split.
        assert_eq!(escape_for_log("\u{1b}\u{1b}", 12), "\\u{1b}\\u{1b}");
        assert_eq!(escape_for_log("\u{1b}\u{1b}", 11), "\\u{1b}…");
    }
}
