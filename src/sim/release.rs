//! The operator's side of a release: a signing key, a release signed with it (built with the
//! library's own `release::build`, as `update-agent release create` does), and a tampered copy of
//! one. Releases of hostile shapes the library would never write are assembled by hand in the
//! tests that need them (`tests/common/releases.rs`), not here.

use std::io;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use jiff::Timestamp;

use crate::keys::{self, KeyId};
use crate::release::Envelope;
use crate::release::build::{sha256_of, sign_manifest};
use crate::release::manifest::{
    ChunkIndexRef, Compression, Disruption, FORMAT, Image, Manifest, Rollout, Severity,
};

/// A release signing key.
#[derive(Clone)]
pub struct Signer {
    pub key: SigningKey,
}

impl Signer {
    /// The same key every run: tests are reproducible.
    pub fn from_seed(seed: u8) -> Signer {
        Signer {
            key: SigningKey::from_bytes(&[seed; 32]),
        }
    }

    /// A fresh random key (the demo's throwaway key).
    pub fn generate() -> io::Result<Signer> {
        let key = keys::generate_signing_key().map_err(|e| super::error("signing key", e))?;
        Ok(Signer { key })
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.key.verifying_key())
    }

    /// `{prefix}.key` and `{prefix}.pub`, as `update-agent keygen` writes them.
    pub fn write_key_pair(&self, prefix: &Path) -> io::Result<(PathBuf, PathBuf)> {
        keys::write_key_pair(&self.key, prefix)
            .map_err(|e| super::error(format_args!("{}", prefix.display()), e))
    }

    /// Puts the public key into the trust anchor `dir` (created if missing) as `{name}.pub`.
    pub fn write_anchor(&self, dir: &Path, name: &str) -> io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let (private, public) = self.write_key_pair(&dir.join(name))?;
        std::fs::remove_file(private)?;
        Ok(public)
    }

    /// A release of `version` for `compatible` to fill in; see [`ReleaseBuilder`] for what it
    /// says unless told otherwise.
    pub fn release(&self, compatible: &str, version: &str) -> ReleaseBuilder<'_> {
        ReleaseBuilder {
            signer: self,
            manifest: Manifest {
                format: FORMAT,
                version: version.into(),
                security_version: 1,
                compatible: compatible.into(),
                created: Timestamp::now(),
                expires: None,
                security: true,
                severity: Severity::High,
                advisory: "Fixes the test's vulnerability.".into(),
                disruption: Disruption {
                    reboot: true,
                    downtime_seconds: 30,
                },
                deadline: None,
                images: Default::default(),
                rollout: None,
            },
        }
    }
}

/// A manifest being written: a security release (severity high, reboot, 30 s downtime, created
/// now, security version 1) until told otherwise; signed by [`ReleaseBuilder::sign`].
pub struct ReleaseBuilder<'a> {
    signer: &'a Signer,
    pub manifest: Manifest,
}

impl ReleaseBuilder<'_> {
    pub fn security_version(mut self, version: u64) -> Self {
        self.manifest.security_version = version;
        self
    }

    pub fn created(mut self, at: Timestamp) -> Self {
        self.manifest.created = at;
        self
    }

    pub fn deadline(mut self, at: Timestamp) -> Self {
        self.manifest.deadline = Some(at);
        self
    }

    /// A staged rollout over `[start, start + duration)` (manifest format 2).
    pub fn rollout(mut self, start: Timestamp, duration: u64) -> Self {
        self.manifest.rollout = Some(Rollout { start, duration });
        self.manifest.format = self.manifest.required_format();
        self
    }

    pub fn advisory(mut self, text: &str) -> Self {
        self.manifest.advisory = text.into();
        self
    }

    pub fn downtime(mut self, seconds: u64) -> Self {
        self.manifest.disruption.downtime_seconds = seconds;
        self
    }

    /// The `rootfs` image: `image`'s bytes, fetched from `url`.
    pub fn image(mut self, url: &str, image: &[u8]) -> Self {
        let entry = Image::uncompressed(url, image.len() as u64, sha256_of(image));
        self.manifest.images.insert("rootfs".into(), entry);
        self
    }

    /// The `rootfs` image's block index (as `release create` writes it beside the image): at
    /// `url`, whose SHA-256 is `index_sha256`, of `block_size`-byte blocks. Set after
    /// [`ReleaseBuilder::image`].
    pub fn block_index(mut self, url: &str, index_sha256: [u8; 32], block_size: u64) -> Self {
        let entry = self
            .manifest
            .images
            .get_mut("rootfs")
            .expect("block_index() comes after image()");
        entry.chunks = Some(ChunkIndexRef {
            url: url.into(),
            sha256: hex::encode(index_sha256),
            chunk_size: block_size,
        });
        self
    }

    /// The `rootfs` image sent as the zstd stream `compressed` of `image`.
    pub fn zstd_image(mut self, url: &str, image: &[u8], compressed: &[u8]) -> Self {
        let entry = Image {
            compression: Some(Compression::Zstd),
            transport_size: Some(compressed.len() as u64),
            transport_sha256: Some(hex::encode(sha256_of(compressed))),
            ..Image::uncompressed(url, image.len() as u64, sha256_of(image))
        };
        self.manifest.images.insert("rootfs".into(), entry);
        self
    }

    /// The signed release, as it goes on the wire.
    pub fn sign(self) -> Vec<u8> {
        sign_manifest(&self.manifest, &self.signer.key)
            .unwrap_or_else(|refusal| {
                panic!("the sim wrote a manifest the library refuses: {refusal}")
            })
            .to_json()
            .into_bytes()
    }

    /// The signed release, written to `path` (readable by everyone: the daemon's user too).
    pub fn write(self, path: &Path) -> io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, self.sign())?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path.to_owned())
    }
}

/// The same release with one byte of its signed manifest changed (the version's first digit)
/// and the signatures kept: a bad signature, and still a release that parses.
pub fn tamper(release: &[u8]) -> Vec<u8> {
    let mut envelope = Envelope::parse(release).expect("tamper() is given a release that parses");
    let bytes = &mut envelope.manifest_bytes;
    let key = b"\"version\"";
    let after_key = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the manifest has a version")
        + key.len();
    // Past the colon, any white space and the opening quote.
    let at = after_key
        + bytes[after_key..]
            .iter()
            .position(|b| !matches!(b, b':' | b' ' | b'\n' | b'"'))
            .expect("the version has a value");
    let byte = &mut bytes[at];
    *byte = if *byte == b'9' { b'8' } else { b'9' };
    envelope.to_json().into_bytes()
}
