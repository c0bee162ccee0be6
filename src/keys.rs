//! Ed25519 keys as files: private keys in PKCS#8 PEM, public keys in SPKI PEM — the files that
//! `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write — and the key id that
//! releases use to name a signer.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// A PEM key file is a few hundred bytes; anything much larger is not a key.
const MAX_KEY_FILE: u64 = 16 * 1024;

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

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is larger than {MAX_KEY_FILE} bytes; is it really a PEM key?")]
    TooLarge { path: PathBuf },
    #[error(
        "{path} is not an Ed25519 {what} in PEM; make one with `update-agent keygen` or `openssl {hint}`"
    )]
    NotAKey {
        path: PathBuf,
        what: &'static str,
        hint: &'static str,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a key: the system random generator failed: {0}")]
    Random(String),
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    if meta.len() > MAX_KEY_FILE {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
        });
    }
    fs::read_to_string(path).map_err(read_err)
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let pem = read_small(path)?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::NotAKey {
        path: path.to_owned(),
        what: "private key (PKCS#8)",
        hint: "genpkey -algorithm ed25519",
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let pem = read_small(path)?;
    parse_verifying_key(&pem).ok_or_else(|| KeyError::NotAKey {
        path: path.to_owned(),
        what: "public key (SPKI)",
        hint: "pkey -pubout",
    })
}

pub fn parse_verifying_key(pem: &str) -> Option<VerifyingKey> {
    VerifyingKey::from_public_key_pem(pem).ok()
}

pub fn generate_signing_key() -> Result<SigningKey, KeyError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// Writes `PREFIX.key` (mode 0600, PKCS#8 PEM) and `PREFIX.pub` (SPKI PEM). Refuses to overwrite
/// either file: losing a signing key by a typo is not recoverable.
pub fn write_key_pair(key: &SigningKey, prefix: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    let private_path = with_suffix(prefix, "key");
    let public_path = with_suffix(prefix, "pub");
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .expect("encoding a 32-byte Ed25519 key as PKCS#8 cannot fail");
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encoding an Ed25519 public key as SPKI cannot fail");
    write_new(&private_path, private_pem.as_bytes(), 0o600)?;
    write_new(&public_path, public_pem.as_bytes(), 0o644)?;
    Ok((private_path, public_path))
}

fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_through_hex() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let id = KeyId::of(&key.verifying_key());
        assert_eq!(KeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(KeyId::from_hex(&id.to_hex().to_uppercase()), Some(id));
        assert_eq!(KeyId::from_hex("abcd"), None);
        assert_eq!(KeyId::from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn written_pair_loads_back_and_private_key_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = generate_signing_key().unwrap();
        let (private, public) = write_key_pair(&key, &dir.path().join("k")).unwrap();
        assert_eq!(
            fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            load_signing_key(&private).unwrap().to_bytes(),
            key.to_bytes()
        );
        assert_eq!(load_verifying_key(&public).unwrap(), key.verifying_key());
        assert!(matches!(
            write_key_pair(&key, &dir.path().join("k")),
            Err(KeyError::Write { .. })
        ));
    }
}
