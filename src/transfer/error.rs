//! Why a transfer failed: one variant per reason code, each naming the URL or slot path it is
//! about and what to do next.
//!
//! URLs and anything else a server chose are escaped with [`escape_for_log`] when the error is
//! made, so every field is safe to log and to publish as it is.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::reason::ReasonCode;
use crate::release::escape_for_log;

/// How many characters of a URL or server-provided text an error keeps.
const MAX_LOGGED: usize = 256;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("image url {url} cannot be fetched: {detail}")]
    UnsupportedUrl { url: String, detail: String },

    #[error("image description for {url} is not usable: {detail}; the release is malformed")]
    BadImage { url: String, detail: String },

    #[error(
        "cannot download {url}: {detail}; check the network and the server, a retry resumes from the last checkpoint"
    )]
    Download { url: String, detail: String },

    #[error(
        "no trusted tls connection to {url}: {detail}; check the device's clock and that the server's CA is trusted (system roots or the configured extra roots)"
    )]
    Tls { url: String, detail: String },

    #[error("{url} answered HTTP {status}; check that the server publishes the image at this url")]
    HttpStatus { url: String, status: u16 },

    #[error(
        "no data from {url} for {} s (after {received} bytes); check the network, a retry resumes from the last checkpoint",
        .after.as_secs_f32()
    )]
    Stall {
        url: String,
        after: Duration,
        received: u64,
    },

    #[error(
        "redirects from {url} do not end: {detail}; fix the server's redirects or the release's url"
    )]
    RedirectLoop { url: String, detail: String },

    #[error(
        "{url} redirects from https to the plain-http {to}; refused, fix the server so the image stays on https"
    )]
    InsecureRedirect { url: String, to: String },

    #[error(
        "{url}: {detail}; the server does not hold the image this release describes, check the release and the server's copy"
    )]
    SizeMismatch { url: String, detail: String },

    #[error(
        "{what} from {url} has sha256 {actual}, the signed release says {expected}; the image was altered or damaged, the slot must not be booted (a retry downloads it again)"
    )]
    HashMismatch {
        url: String,
        /// `image` (the bytes as written to the slot) or `compressed image` (the bytes on the wire).
        what: &'static str,
        expected: String,
        actual: String,
    },

    #[error(
        "image of {size} bytes does not fit slot {} ({capacity} bytes); nothing was written, use a release built for this device's partition layout",
        .path.display()
    )]
    ImageTooLarge {
        path: PathBuf,
        size: u64,
        capacity: u64,
    },

    #[error(
        "slot {} does not read back as written: {detail}; the storage may be failing, the slot must not be booted",
        .path.display()
    )]
    ReadbackMismatch { path: PathBuf, detail: String },

    /// A block read back from the slot does not match the signed block index. With an index
    /// the image is hashed once, in the read-back, so this cannot tell bytes that came wrong
    /// from bytes the storage did not keep.
    #[error(
        "slot {}: {detail}; the bytes there are not the signed image (altered or damaged on the way, or not kept by the storage), the slot must not be booted (a retry downloads it again)",
        .path.display()
    )]
    BlockMismatch { path: PathBuf, detail: String },

    #[error("cannot decompress {url}: {detail}")]
    Decompress { url: String, detail: String },

    #[error("slot {}: cannot {op}: {source}{}", .path.display(), slot_io_hint(.source))]
    SlotIo {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    #[error(
        "{url} ignores HTTP Range requests (it answered {answer}); a delta update fetches single blocks, so it was refused rather than downloading the whole image: serve the release from a server that answers Range requests (nginx, Apache, S3), or set [install] full_download_fallback = true"
    )]
    RangeUnsupported { url: String, answer: String },

    #[error(
        "the block index {url} is refused: {refusal}; a delta update cannot be trusted without it (set [install] full_download_fallback = true to download the whole image instead)"
    )]
    BlockIndex {
        url: String,
        refusal: crate::release::Refusal,
    },

    #[error("install stopped by the agent: {source}")]
    Cancelled {
        #[source]
        source: io::Error,
    },
}

impl TransferError {
    /// The stable reason code operators and users see.
    pub fn reason(&self) -> ReasonCode {
        match self {
            TransferError::UnsupportedUrl { .. } => ReasonCode::UnsupportedUrl,
            TransferError::BadImage { .. } => ReasonCode::Malformed,
            TransferError::Download { .. } => ReasonCode::DownloadFailed,
            TransferError::Tls { .. } => ReasonCode::TlsFailed,
            TransferError::HttpStatus { .. } => ReasonCode::HttpStatus,
            TransferError::Stall { .. } => ReasonCode::StallTimeout,
            TransferError::RedirectLoop { .. } => ReasonCode::RedirectLoop,
            TransferError::InsecureRedirect { .. } => ReasonCode::InsecureRedirect,
            TransferError::SizeMismatch { .. } => ReasonCode::SizeMismatch,
            TransferError::HashMismatch { .. } => ReasonCode::HashMismatch,
            TransferError::ImageTooLarge { .. } => ReasonCode::ImageTooLarge,
            TransferError::ReadbackMismatch { .. } => ReasonCode::ReadbackMismatch,
            TransferError::BlockMismatch { .. } => ReasonCode::HashMismatch,
            TransferError::Decompress { .. } => ReasonCode::DecompressFailed,
            TransferError::SlotIo { .. } => ReasonCode::SlotIo,
            TransferError::Cancelled { .. } => ReasonCode::Cancelled,
            TransferError::RangeUnsupported { .. } => ReasonCode::RangeUnsupported,
            TransferError::BlockIndex { refusal, .. } => refusal.code,
        }
    }

    /// True when retrying later, with the last checkpoint, may well succeed: the network or the
    /// server had a moment, not a lasting disagreement with the release.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TransferError::Download { .. }
                | TransferError::Stall { .. }
                | TransferError::HttpStatus {
                    status: 408 | 429 | 500..=599,
                    ..
                }
        )
    }

    pub(crate) fn slot_io(path: &std::path::Path, op: &'static str, source: io::Error) -> Self {
        TransferError::SlotIo {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

fn slot_io_hint(err: &io::Error) -> &'static str {
    match err.raw_os_error() {
        Some(nix::libc::EBUSY) => {
            "; the slot is in use (mounted, or the booted slot?), check the slot configuration"
        }
        Some(nix::libc::ENOENT) => "; check the slot's device path in the configuration",
        Some(nix::libc::EACCES | nix::libc::EPERM | nix::libc::EROFS) => {
            "; the installer needs write access to the slot"
        }
        Some(nix::libc::ENOSPC) => "; the filesystem holding the slot file is full",
        Some(nix::libc::EIO) => "; the storage reported an error, it may be failing",
        _ => "",
    }
}

/// Escapes a URL or other outside text for a message, bounded in length.
pub(crate) fn esc(text: &str) -> String {
    escape_for_log(text, MAX_LOGGED)
}

/// An error and its causes on one line, escaped: hyper's, rustls' and io errors may carry
/// server-chosen text and URLs.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    esc(&text)
}
