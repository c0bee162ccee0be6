//! Interoperability with the real OpenSSL command line (`/usr/bin/openssl`), which
//! `docs/wire-formats.md` names as the reference for the key files: keys and signatures made by
//! either side are read and verified by the other. These tests fail (not skip) when openssl is missing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use ed25519_dalek::Signer;
use jiff::Timestamp;
use serde_json::Value;
use update_agent::anchor::{Protection, TrustAnchor};
use update_agent::keys::{self, KeyId};
use update_agent::release::{Policy, verify};

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");
const OPENSSL: &str = "/usr/bin/openssl";

fn openssl(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    assert!(
        Path::new(OPENSSL).exists(),
        "{OPENSSL} is required by the interoperability tests; install it (apt-get install openssl)"
    );
    let mut command = Command::new(OPENSSL);
    for arg in args {
        command.arg(arg);
    }
    command.output().expect("run openssl")
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `openssl genpkey` + `openssl pkey -pubout` into `dir`: (private PEM, public PEM).
fn openssl_key_pair(dir: &Path) -> (PathBuf, PathBuf) {
    let private = dir.join("key.pem");
    let public = dir.join("pub.pem");
    ok(
        openssl(&[&"genpkey", &"-algorithm", &"ed25519", &"-out", &private]),
        "openssl genpkey",
    );
    ok(
        openssl(&[&"pkey", &"-in", &private, &"-pubout", &"-out", &public]),
        "openssl pkey -pubout",
    );
    (private, public)
}

fn policy() -> Policy {
    Policy {
        threshold: 1,
        compatible: Some(COMPATIBLE.into()),
        floor: FLOOR,
        now: Timestamp::now(),
    }
}

#[test]
fn openssl_keys_load_in_our_tool() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = openssl_key_pair(dir.path());
    let signing = keys::load_signing_key(&private).expect("openssl's PKCS#8 private key");
    let verifying = keys::load_verifying_key(&public).expect("openssl's SPKI public key");
    assert_eq!(signing.verifying_key(), verifying);

    // The raw public key openssl reports is the one we read.
    let text = ok(
        openssl(&[&"pkey", &"-in", &public, &"-pubin", &"-text", &"-noout"]),
        "openssl pkey -text",
    );
    let hex: String = String::from_utf8_lossy(&text.stdout)
        .lines()
        .skip_while(|l| !l.starts_with("pub:"))
        .skip(1)
        .flat_map(|l| l.trim().split(':').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    assert_eq!(hex, hex::encode(verifying.as_bytes()));

    // And as a trust anchor directory (.pem files count as keys).
    let anchor_dir = dir.path().join("keys.d");
    fs::create_dir(&anchor_dir).unwrap();
    fs::copy(&public, anchor_dir.join("fleet.pem")).unwrap();
    let anchor = TrustAnchor::load(&anchor_dir, Protection::AllowWritable).unwrap();
    assert!(anchor.get(&KeyId::of(&verifying)).is_some());
}

#[test]
fn manifest_signed_by_openssl_verifies_with_library_and_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = openssl_key_pair(dir.path());
    let manifest = to_bytes(&base_manifest());
    let manifest_path = dir.path().join("manifest.json");
    let sig_path = dir.path().join("sig.bin");
    fs::write(&manifest_path, &manifest).unwrap();
    ok(
        openssl(&[
            &"pkeyutl",
            &"-sign",
            &"-rawin",
            &"-inkey",
            &private,
            &"-in",
            &manifest_path,
            &"-out",
            &sig_path,
        ]),
        "openssl pkeyutl -sign",
    );
    let sig = fs::read(&sig_path).unwrap();
    assert_eq!(sig.len(), 64);
    let keyid = KeyId::of(&keys::load_verifying_key(&public).unwrap()).to_hex();
    let release = envelope(&manifest, &[(keyid.clone(), STANDARD.encode(&sig))]);

    let anchor_dir = dir.path().join("keys.d");
    fs::create_dir(&anchor_dir).unwrap();
    fs::copy(&public, anchor_dir.join("openssl.pub")).unwrap();
    let anchor = TrustAnchor::load(&anchor_dir, Protection::AllowWritable).unwrap();
    let verified = verify(&release, &anchor, &policy()).expect("openssl's signature verifies");
    assert_eq!(verified.signers[0].to_hex(), keyid);
    assert_eq!(verified.manifest_bytes, manifest);

    let release_path = dir.path().join("release.json");
    fs::write(&release_path, &release).unwrap();
    let out = Command::new(BIN)
        .args(["release", "verify", "--compatible", COMPATIBLE, "--keys"])
        .arg(&anchor_dir)
        .arg(&release_path)
        .output()
        .unwrap();
    assert_exit(&out, 0, "update-agent release verify");

    // The control: the same signature over one changed byte is refused by both.
    let mut altered = manifest.clone();
    *altered.last_mut().unwrap() = b' ';
    let forged = envelope(&altered, &[(keyid, STANDARD.encode(&sig))]);
    assert_eq!(
        verify(&forged, &anchor, &policy())
            .unwrap_err()
            .code
            .as_str(),
        "bad-signature"
    );
}

/// `update-agent keygen --out DIR/name` in a fresh directory DIR, which must succeed: the key
/// pair is `name.key` and `name.pub` there.
fn keygen_in_scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(dir.path().join(name))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    dir
}

#[test]
fn signature_by_update_agent_release_create_verifies_with_openssl() {
    let dir = keygen_in_scratch("signer");
    let image = dir.path().join("rootfs.img");
    fs::write(&image, vec![0x5a; 10_000]).unwrap();
    let release_path = dir.path().join("release.json");
    let create = common::release_create(
        &dir.path().join("signer.key"),
        &image,
        ["1.0", "1"],
        COMPATIBLE,
        "https://updates.example.com/rootfs.img",
    )
    .args(["--no-chunks", "--out"])
    .arg(&release_path)
    .output()
    .unwrap();
    assert_exit(&create, 0, "release create");

    let release: Value = serde_json::from_slice(&fs::read(&release_path).unwrap()).unwrap();
    let manifest = STANDARD
        .decode(release["manifest"].as_str().unwrap())
        .unwrap();
    let sig = STANDARD
        .decode(release["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    let manifest_path = dir.path().join("manifest.json");
    let sig_path = dir.path().join("sig.bin");
    fs::write(&manifest_path, &manifest).unwrap();
    fs::write(&sig_path, &sig).unwrap();
    let public = dir.path().join("signer.pub");
    let verify_with_openssl = || {
        openssl(&[
            &"pkeyutl",
            &"-verify",
            &"-rawin",
            &"-pubin",
            &"-inkey",
            &public,
            &"-sigfile",
            &sig_path,
            &"-in",
            &manifest_path,
        ])
    };
    let out = ok(verify_with_openssl(), "openssl pkeyutl -verify");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The control: openssl refuses the signature over altered bytes.
    let mut altered = manifest;
    altered[0] = b' ';
    fs::write(&manifest_path, &altered).unwrap();
    assert!(
        !verify_with_openssl().status.success(),
        "openssl accepted a signature over altered bytes"
    );
}

#[test]
fn key_made_by_update_agent_keygen_is_read_by_openssl() {
    let dir = keygen_in_scratch("k");
    let private = dir.path().join("k.key");
    let public = dir.path().join("k.pub");
    ok(
        openssl(&[&"pkey", &"-in", &private, &"-noout"]),
        "openssl pkey -in k.key (update-agent keygen's private key)",
    );
    ok(
        openssl(&[&"pkey", &"-pubin", &"-in", &public, &"-noout"]),
        "openssl pkey -pubin -in k.pub",
    );
    // openssl derives the same public key file from our private key.
    let derived = ok(
        openssl(&[&"pkey", &"-in", &private, &"-pubout"]),
        "openssl pkey -pubout",
    );
    assert_eq!(derived.stdout, fs::read(&public).unwrap());

    // And a signature openssl makes with our private key verifies with our public key.
    let message = dir.path().join("m");
    fs::write(&message, b"release manifest bytes").unwrap();
    let sig = ok(
        openssl(&[
            &"pkeyutl", &"-sign", &"-rawin", &"-inkey", &private, &"-in", &message,
        ]),
        "openssl pkeyutl -sign with our key",
    )
    .stdout;
    let ours = keys::load_signing_key(&private).unwrap();
    assert_eq!(sig, ours.sign(b"release manifest bytes").to_bytes());
}
