//! Stable reason codes: the one word that operators (MQTT), users (D-Bus, CLI) and the journal see
//! for every refusal or failure. The strings are part of the wire format: never rename one.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Why a release was refused or an install failed.
///
/// Grouped by who is at fault, as rustls does: the release (a bad or hostile input), the transfer
/// (the network or the server), the device (local IO), the trial boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReasonCode {
    // --- the release itself ---
    /// The envelope or manifest is larger than the parser accepts.
    TooLarge,
    /// Not the JSON shape of a release or manifest (syntax, missing/extra/mistyped field, bad value).
    Malformed,
    /// The manifest declares a format version this agent does not understand.
    UnsupportedFormat,
    /// A signature by a trusted key does not verify: the release was altered or forged.
    BadSignature,
    /// No signature is by a key in the trust anchor.
    UntrustedKey,
    /// Fewer distinct trusted keys signed than the configured threshold.
    BelowThreshold,
    /// The release is for another product (`compatible` differs).
    Incompatible,
    /// The security version is below the device's floor (anti-rollback).
    Downgrade,
    /// The release's `expires` time has passed.
    Expired,
    /// An image URL uses a scheme the agent does not fetch from.
    UnsupportedUrl,

    // --- the transfer: fetching an image and writing it into a slot (`crate::transfer`) ---
    /// The image could not be fetched: no connection, the connection broke, a local source file
    /// is unreadable. Usually temporary; a retry resumes from the last checkpoint.
    DownloadFailed,
    /// The TLS handshake failed: an untrusted or expired certificate (or a wrong device clock).
    TlsFailed,
    /// The server answered with an HTTP status other than 200/206.
    HttpStatus,
    /// No byte arrived for longer than the stall timeout.
    StallTimeout,
    /// The redirects did not end: a loop, or more than the agent follows.
    RedirectLoop,
    /// An https URL redirected to plain http.
    InsecureRedirect,
    /// The server sent more or fewer bytes than the release declares.
    SizeMismatch,
    /// The bytes fetched do not have the SHA-256 the signed release declares.
    HashMismatch,
    /// The image does not fit in the slot; refused before writing.
    ImageTooLarge,
    /// The slot, read back from the medium after writing, does not hold the image.
    ReadbackMismatch,
    /// The compressed image is not a valid zstd stream (or needs more memory than allowed).
    DecompressFailed,
    /// Opening, writing, syncing or reading the slot failed.
    SlotIo,
    /// The agent stopped the install (its progress or checkpoint handler failed).
    Cancelled,
    /// A delta download needs HTTP Range requests and the server answers them with the whole
    /// file; refused (the data budget) unless `[install] full_download_fallback` allows the
    /// full download.
    RangeUnsupported,

    // --- the transaction ---
    /// Another transaction is in progress; the release will be looked at again later.
    Busy,
    /// The agent does not yet know which slot is booted.
    NotReady,
    /// This release rolled back on this device before and is not retried automatically.
    PreviouslyRolledBack,
    /// The bootloader environment could not be read or changed.
    BootloaderFailed,
    /// The device booted a slot the transaction did not expect.
    UnexpectedBoot,

    // --- the trial boot ---
    /// A health check failed during the trial boot of the new slot.
    HealthCheckFailed,
    /// The device came back in the old slot: the bootloader gave up on the new one.
    FellBack,

    // --- the user's requests (D-Bus, CLI) ---
    /// A request names nothing to act on: no update is pending or waiting for its reboot.
    NothingPending,
    /// A request is out of range (e.g. a postponement that ends in the past).
    InvalidRequest,
    /// The release's deadline has passed: it can no longer be postponed.
    NotPostponable,
    /// The request would make the running slot unbootable.
    BootedSlot,

    // --- the least-privilege split (`crate::installer`) ---
    /// The privileged installer refused the caller: not the configured daemon user.
    Forbidden,
    /// The privileged installer could not be reached, or broke off the conversation.
    InstallerUnavailable,
    /// The installer has not verified the slot's bytes against a signed release since they were
    /// last written: it does not let the bootloader choose that slot.
    UnverifiedSlot,
    /// The reboot command failed; the agent reports it and tries again later.
    RebootFailed,
}

impl ReasonCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: &'static [ReasonCode] = &[
        ReasonCode::TooLarge,
        ReasonCode::Malformed,
        ReasonCode::UnsupportedFormat,
        ReasonCode::BadSignature,
        ReasonCode::UntrustedKey,
        ReasonCode::BelowThreshold,
        ReasonCode::Incompatible,
        ReasonCode::Downgrade,
        ReasonCode::Expired,
        ReasonCode::UnsupportedUrl,
        // transfer
        ReasonCode::DownloadFailed,
        ReasonCode::TlsFailed,
        ReasonCode::HttpStatus,
        ReasonCode::StallTimeout,
        ReasonCode::RedirectLoop,
        ReasonCode::InsecureRedirect,
        ReasonCode::SizeMismatch,
        ReasonCode::HashMismatch,
        ReasonCode::ImageTooLarge,
        ReasonCode::ReadbackMismatch,
        ReasonCode::DecompressFailed,
        ReasonCode::SlotIo,
        ReasonCode::Cancelled,
        ReasonCode::RangeUnsupported,
        ReasonCode::Busy,
        ReasonCode::NotReady,
        ReasonCode::PreviouslyRolledBack,
        ReasonCode::BootloaderFailed,
        ReasonCode::UnexpectedBoot,
        ReasonCode::HealthCheckFailed,
        ReasonCode::FellBack,
        ReasonCode::NothingPending,
        ReasonCode::InvalidRequest,
        ReasonCode::NotPostponable,
        ReasonCode::BootedSlot,
        ReasonCode::Forbidden,
        ReasonCode::InstallerUnavailable,
        ReasonCode::UnverifiedSlot,
        ReasonCode::RebootFailed,
    ];

    /// True for the codes release verification can give (`release::verify`).
    pub fn is_verification(self) -> bool {
        matches!(
            self,
            ReasonCode::TooLarge
                | ReasonCode::Malformed
                | ReasonCode::UnsupportedFormat
                | ReasonCode::BadSignature
                | ReasonCode::UntrustedKey
                | ReasonCode::BelowThreshold
                | ReasonCode::Incompatible
                | ReasonCode::Downgrade
                | ReasonCode::Expired
                | ReasonCode::UnsupportedUrl
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasonCode::TooLarge => "too-large",
            ReasonCode::Malformed => "malformed",
            ReasonCode::UnsupportedFormat => "unsupported-format",
            ReasonCode::BadSignature => "bad-signature",
            ReasonCode::UntrustedKey => "untrusted-key",
            ReasonCode::BelowThreshold => "below-threshold",
            ReasonCode::Incompatible => "incompatible",
            ReasonCode::Downgrade => "downgrade",
            ReasonCode::Expired => "expired",
            ReasonCode::UnsupportedUrl => "unsupported-url",
            // transfer
            ReasonCode::DownloadFailed => "download-failed",
            ReasonCode::TlsFailed => "tls-failed",
            ReasonCode::HttpStatus => "http-status",
            ReasonCode::StallTimeout => "stall-timeout",
            ReasonCode::RedirectLoop => "redirect-loop",
            ReasonCode::InsecureRedirect => "insecure-redirect",
            ReasonCode::SizeMismatch => "size-mismatch",
            ReasonCode::HashMismatch => "hash-mismatch",
            ReasonCode::ImageTooLarge => "image-too-large",
            ReasonCode::ReadbackMismatch => "readback-mismatch",
            ReasonCode::DecompressFailed => "decompress-failed",
            ReasonCode::SlotIo => "slot-io",
            ReasonCode::Cancelled => "cancelled",
            ReasonCode::RangeUnsupported => "range-unsupported",

            ReasonCode::Busy => "busy",
            ReasonCode::NotReady => "not-ready",
            ReasonCode::PreviouslyRolledBack => "previously-rolled-back",
            ReasonCode::BootloaderFailed => "bootloader-failed",
            ReasonCode::UnexpectedBoot => "unexpected-boot",
            ReasonCode::HealthCheckFailed => "health-check-failed",
            ReasonCode::FellBack => "fell-back",
            ReasonCode::NothingPending => "nothing-pending",
            ReasonCode::InvalidRequest => "invalid-request",
            ReasonCode::NotPostponable => "not-postponable",
            ReasonCode::BootedSlot => "booted-slot",
            ReasonCode::Forbidden => "forbidden",
            ReasonCode::InstallerUnavailable => "installer-unavailable",
            ReasonCode::UnverifiedSlot => "unverified-slot",
            ReasonCode::RebootFailed => "reboot-failed",
        }
    }

    /// True when the code means someone may have tampered with a release or its image: the
    /// operators, the user and the journal are alerted (EN 303 645 5.7-2), not just told.
    pub fn is_tamper_alert(self) -> bool {
        // An image whose hash differs from the signed one was altered after signing (or broken
        // in transit): either way the integrity check failed, which 5.7-2 asks to report.
        matches!(self, ReasonCode::BadSignature | ReasonCode::HashMismatch)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes are wire format (MQTT events, D-Bus errors, `state.json`, the CLI): each one's
    /// string is pinned here, not derived from the code, so a rename fails this test.
    #[test]
    fn every_code_keeps_its_wire_name() {
        use ReasonCode::*;
        let pinned = [
            (TooLarge, "too-large"),
            (Malformed, "malformed"),
            (UnsupportedFormat, "unsupported-format"),
            (BadSignature, "bad-signature"),
            (UntrustedKey, "untrusted-key"),
            (BelowThreshold, "below-threshold"),
            (Incompatible, "incompatible"),
            (Downgrade, "downgrade"),
            (Expired, "expired"),
            (UnsupportedUrl, "unsupported-url"),
            (DownloadFailed, "download-failed"),
            (TlsFailed, "tls-failed"),
            (HttpStatus, "http-status"),
            (StallTimeout, "stall-timeout"),
            (RedirectLoop, "redirect-loop"),
            (InsecureRedirect, "insecure-redirect"),
            (SizeMismatch, "size-mismatch"),
            (HashMismatch, "hash-mismatch"),
            (ImageTooLarge, "image-too-large"),
            (ReadbackMismatch, "readback-mismatch"),
            (DecompressFailed, "decompress-failed"),
            (SlotIo, "slot-io"),
            (Cancelled, "cancelled"),
            (RangeUnsupported, "range-unsupported"),
            (Busy, "busy"),
            (NotReady, "not-ready"),
            (PreviouslyRolledBack, "previously-rolled-back"),
            (BootloaderFailed, "bootloader-failed"),
            (UnexpectedBoot, "unexpected-boot"),
            (HealthCheckFailed, "health-check-failed"),
            (FellBack, "fell-back"),
            (NothingPending, "nothing-pending"),
            (InvalidRequest, "invalid-request"),
            (NotPostponable, "not-postponable"),
            (BootedSlot, "booted-slot"),
            (Forbidden, "forbidden"),
            (InstallerUnavailable, "installer-unavailable"),
            (UnverifiedSlot, "unverified-slot"),
            (RebootFailed, "reboot-failed"),
        ];
        // A code missing from the table does not compile: the match has no wildcard.
        #[allow(dead_code)]
        fn every_code_is_listed(code: ReasonCode) {
            match code {
                TooLarge | Malformed | UnsupportedFormat | BadSignature | UntrustedKey
                | BelowThreshold | Incompatible | Downgrade | Expired | UnsupportedUrl
                | DownloadFailed | TlsFailed | HttpStatus | StallTimeout | RedirectLoop
                | InsecureRedirect | SizeMismatch | HashMismatch | ImageTooLarge
                | ReadbackMismatch | DecompressFailed | SlotIo | Cancelled | RangeUnsupported
                | Busy | NotReady | PreviouslyRolledBack | BootloaderFailed | UnexpectedBoot
                | HealthCheckFailed | FellBack | NothingPending | InvalidRequest
                | NotPostponable | BootedSlot | Forbidden | InstallerUnavailable
                | UnverifiedSlot | RebootFailed => {}
            }
        }
        assert_eq!(pinned.len(), ReasonCode::ALL.len());
        for (code, name) in pinned {
            let quoted = format!("\"{name}\"");
            assert_eq!(serde_json::to_string(&code).unwrap(), quoted);
            assert_eq!(serde_json::from_str::<ReasonCode>(&quoted).unwrap(), code);
            assert_eq!(code.to_string(), name);
        }
    }

    #[test]
    fn serde_name_matches_as_str_for_every_code() {
        for code in ReasonCode::ALL {
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
