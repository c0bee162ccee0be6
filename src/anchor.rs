//! The trust anchor: a directory of Ed25519 public keys (SPKI PEM, `*.pub` or `*.pem`) that
//! decides which releases the device may install. An attacker who can write it can install
//! anything, so the agent insists that it lives on a read-only filesystem and that no one but
//! root could change it (EN 303 645 5.4).

use std::fs;
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use nix::sys::statvfs::{FsFlags, statvfs};

use crate::keys::{self, KeyError, TrustedKeys};

/// More keys than this is a mistake (or an attack on start-up time), not a key ring.
pub const MAX_KEYS: usize = 64;

/// How strictly the anchor's protection is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// The device: a writable anchor is refused.
    Enforce,
    /// Development and operator tooling: a writable anchor is used, with warnings.
    AllowWritable,
}

/// The trusted keys as loaded from the anchor directory. It derefs to the core's
/// [`TrustedKeys`], which is what [`crate::release::verify()`] takes.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchor {
    keys: TrustedKeys,
    /// What made the anchor unsafe, when it was loaded with [`Protection::AllowWritable`].
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("cannot read trust anchor {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "trust anchor {path} holds no public key (*.pub or *.pem); put the release signing keys' SPKI PEM files there"
    )]
    Empty { path: PathBuf },
    #[error("trust anchor {path} holds more than {MAX_KEYS} keys")]
    TooManyKeys { path: PathBuf },
    #[error(
        "trust anchor {path} is not protected: {}; put it on the read-only root filesystem (e.g. /usr/share/update-agent/keys.d) owned by root, or, for development only, set `insecure_writable_anchor = true` in the config's [trust] section",
        problems.join("; ")
    )]
    Writable {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl TrustAnchor {
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> TrustAnchor {
        TrustAnchor {
            keys: TrustedKeys::from_keys(keys),
            warnings: Vec::new(),
        }
    }

    pub fn load(dir: &Path, protection: Protection) -> Result<TrustAnchor, AnchorError> {
        let read_err = |source| AnchorError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut problems = Problems::default();
        problems.check(dir).map_err(read_err)?;
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            let is_key = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("pub" | "pem")
            );
            if is_key {
                paths.push(path);
            }
        }
        if paths.len() > MAX_KEYS {
            return Err(AnchorError::TooManyKeys {
                path: dir.to_owned(),
            });
        }
        paths.sort();
        let mut anchor = TrustAnchor::default();
        for path in &paths {
            problems.check(path).map_err(|source| AnchorError::Read {
                path: path.clone(),
                source,
            })?;
            let key = keys::load_verifying_key(path)?;
            anchor.keys.insert(key);
        }
        if anchor.keys.is_empty() {
            return Err(AnchorError::Empty {
                path: dir.to_owned(),
            });
        }
        let problems = problems.notes;
        if !problems.is_empty() {
            match protection {
                Protection::Enforce => {
                    return Err(AnchorError::Writable {
                        path: dir.to_owned(),
                        problems,
                    });
                }
                Protection::AllowWritable => anchor.warnings = problems,
            }
        }
        Ok(anchor)
    }
}

impl Deref for TrustAnchor {
    type Target = TrustedKeys;

    fn deref(&self) -> &TrustedKeys {
        &self.keys
    }
}

/// Why the anchor could be changed by someone, one note per problem.
#[derive(Default)]
struct Problems {
    notes: Vec<String>,
    /// Filesystems already reported as read-write: one note each, not one per key file.
    writable_devices: Vec<u64>,
}

impl Problems {
    /// Records why `path` could be changed by someone: its filesystem is writable, it is not
    /// owned by root, or group/others may write it.
    fn check(&mut self, path: &Path) -> std::io::Result<()> {
        let meta = fs::metadata(path)?;
        let flags = statvfs(path).map_err(std::io::Error::from)?.flags();
        if !flags.contains(FsFlags::ST_RDONLY) && !self.writable_devices.contains(&meta.dev()) {
            self.writable_devices.push(meta.dev());
            self.notes.push(format!(
                "the filesystem holding {} is mounted read-write",
                path.display()
            ));
        }
        check_owner_and_mode(path, &meta, &mut self.notes);
        Ok(())
    }
}

fn check_owner_and_mode(path: &Path, meta: &fs::Metadata, problems: &mut Vec<String>) {
    if meta.uid() != 0 {
        problems.push(format!(
            "{} is owned by uid {}, not root",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        problems.push(format!(
            "{} is writable by group or others (mode {:o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
}
