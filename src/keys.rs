//! Ed25519 keys as files: private keys in PKCS#8 PEM, public keys in SPKI PEM — the files that
//! `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout` write — and the key id that
//! releases use to name a signer (the core's `KeyId`, re-exported).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, KeypairBytes};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// A PEM key file is a few hundred bytes; anything much larger is not a key.
const MAX_KEY_FILE: u64 = 16 * 1024;

pub use update_agent_core::keys::{KeyId, TrustedKeys};

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
    // Only regular files: a FIFO would block the open, and a device (`/dev/zero` linked as a key)
    // reports size 0 and never ends. The read is bounded too, since the size can change between
    // the metadata and the read.
    if !fs::metadata(path).map_err(read_err)?.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|file| file.take(MAX_KEY_FILE + 1).read_to_end(&mut bytes))
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
        });
    }
    String::from_utf8(bytes).map_err(|e| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.utf8_error(),
        ))
    })
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

/// An SPKI PEM public key as `openssl pkey -pubout` writes it: the label lines around the
/// base64 of the 44-byte DER (RFC 8410), which is this fixed prefix and the 32 key bytes.
/// Read by hand rather than with the generic PEM, DER and SPKI decoders, which cost 14 KiB of
/// the device binary for one fixed layout; anything else is refused.
pub fn parse_verifying_key(pem: &str) -> Option<VerifyingKey> {
    use base64::Engine;
    const SPKI_ED25519: [u8; 12] = [
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
    ];
    let body = pem
        .trim()
        .strip_prefix("-----BEGIN PUBLIC KEY-----")?
        .strip_suffix("-----END PUBLIC KEY-----")?;
    let text: String = body.split(['\r', '\n']).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    let key = der.strip_prefix(&SPKI_ED25519)?;
    VerifyingKey::from_bytes(key.try_into().ok()?).ok()
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
    // PKCS#8 v1 (RFC 5208), without the optional public key that ed25519-dalek would add by
    // default (v2, RFC 5958): OpenSSL 3.0 cannot read v2 Ed25519 keys, and v1 is exactly what
    // `openssl genpkey -algorithm ed25519` writes.
    let private_pem = KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    }
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
    fn public_key_pem_is_read_as_openssl_writes_it_and_nothing_else() {
        let key = SigningKey::from_bytes(&[5u8; 32]).verifying_key();
        let pem = key.to_public_key_pem(LineEnding::LF).unwrap();
        assert_eq!(parse_verifying_key(&pem), Some(key));
        assert_eq!(parse_verifying_key(&pem.replace('\n', "\r\n")), Some(key));
        // The generic decoder agrees on what it is.
        use ed25519_dalek::pkcs8::DecodePublicKey;
        assert_eq!(VerifyingKey::from_public_key_pem(&pem).unwrap(), key);
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(&body)
                .unwrap()
        };
        let wrap = |der: &[u8]| {
            use base64::Engine;
            let text = base64::engine::general_purpose::STANDARD.encode(der);
            format!("-----BEGIN PUBLIC KEY-----\n{text}\n-----END PUBLIC KEY-----\n")
        };
        assert_eq!(parse_verifying_key(&wrap(&der)), Some(key));
        // Another algorithm (X25519's OID 1.3.101.110), a short or long key, another label,
        // text inside the body: refused.
        let mut x25519 = der.clone();
        x25519[8] = 0x6e;
        assert_eq!(parse_verifying_key(&wrap(&x25519)), None);
        assert_eq!(parse_verifying_key(&wrap(&der[..43])), None);
        assert_eq!(parse_verifying_key(&wrap(&[&der[..], &[0]].concat())), None);
        assert_eq!(
            parse_verifying_key(&pem.replace("PUBLIC KEY", "PRIVATE KEY")),
            None
        );
        assert_eq!(
            parse_verifying_key(&pem.replace("\n-----END", " x\n-----END")),
            None
        );
        assert_eq!(parse_verifying_key(""), None);
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

    #[test]
    fn key_file_read_is_bounded_and_regular_files_only() {
        let (dir, big) = crate::scratch_path("big.pub");
        fs::write(&big, vec![b'A'; MAX_KEY_FILE as usize + 1]).unwrap();
        assert!(matches!(
            load_verifying_key(&big),
            Err(KeyError::TooLarge { .. })
        ));
        // A device reports size 0 and never ends: refused, not read until memory runs out.
        let zero = dir.path().join("zero.pub");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        let err = load_verifying_key(&zero).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn private_key_is_pkcs8_v1_as_openssl_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let (private, _) = write_key_pair(&key, &dir.path().join("k")).unwrap();
        let pem = fs::read_to_string(&private).unwrap();
        // openssl genpkey's layout: 48 bytes of DER (version 0, no public key) on one PEM line.
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(body.starts_with("MC4CAQAw"), "not a PKCS#8 v1 key: {pem}");
    }
}
