//! The operator CLI end to end, through the built binary: keygen, release create / sign /
//! inspect / verify, exit codes and output.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use sha2::{Digest, Sha256};
use update_agent::keys::{self, KeyId};
use update_agent::release::block_index::IndexHeader;

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");

fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut command = Command::new(BIN);
    for arg in args {
        command.arg(arg);
    }
    command.output().expect("run update-agent")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// A work directory with a key pair `signer.{key,pub}`, an anchor `keys/` holding only the public
/// key, and an image.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        assert_exit(&run(&[&"keygen", &"--out", &dir.path().join("signer")]), 0);
        fs::create_dir(dir.path().join("keys")).unwrap();
        fs::copy(
            dir.path().join("signer.pub"),
            dir.path().join("keys/signer.pub"),
        )
        .unwrap();
        // 300 KB that compress well but not to nothing.
        let image: Vec<u8> = (0..300_000u32)
            .map(|i| (i / 7 % 251) as u8 ^ (i % 3) as u8)
            .collect();
        fs::write(dir.path().join("rootfs.img"), image).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn create(&self, extra: &[&str]) -> Output {
        let mut command = common::release_create(
            &self.path("signer.key"),
            &self.path("rootfs.img"),
            ["2026.06.1", "12"],
            "acme-gw-1",
            "https://updates.example.com/rootfs.img",
        );
        command
            .args([
                "--advisory",
                "Fixes CVE-2026-0001",
                "--security",
                "--severity",
                "high",
                "--reboot",
                "--out",
            ])
            .arg(self.path("release.json"))
            .args(extra);
        command.output().unwrap()
    }

    fn verify(&self, extra: &[&str]) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(["release", "verify", "--keys"])
            .arg(self.path("keys"))
            .args(extra)
            .arg(self.path("release.json"));
        command.output().unwrap()
    }

    fn release(&self) -> Value {
        serde_json::from_slice(&fs::read(self.path("release.json")).unwrap()).unwrap()
    }

    fn manifest(&self) -> Value {
        let release = self.release();
        let bytes = STANDARD
            .decode(release["manifest"].as_str().unwrap())
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_writes_a_private_and_a_public_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("release-2026");
    let out = run(&[&"keygen", &"--out", &prefix]);
    assert_exit(&out, 0);
    let private = dir.path().join("release-2026.key");
    let public = dir.path().join("release-2026.pub");
    assert_eq!(mode(&private), 0o600, "the private key is the owner's only");
    assert_eq!(
        mode(&public) & 0o022,
        0,
        "the public key is not writable by others"
    );
    assert_eq!(mode(&public) & 0o400, 0o400);

    let signing = keys::load_signing_key(&private).unwrap();
    let verifying = keys::load_verifying_key(&public).unwrap();
    assert_eq!(signing.verifying_key(), verifying);
    let keyid = KeyId::of(&verifying).to_hex();
    assert!(stdout(&out).contains(&keyid), "{}", stdout(&out));

    // A second keygen to the same prefix fails and leaves the key as it was.
    let before = fs::read(&private).unwrap();
    let again = run(&[&"keygen", &"--out", &prefix]);
    assert_exit(&again, 2);
    assert!(
        stderr(&again).contains("release-2026.key"),
        "{}",
        stderr(&again)
    );
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(fs::read(&private).unwrap(), before);
}

#[test]
fn created_release_verifies() {
    let setup = Setup::new();
    let out = setup.create(&["--no-chunks"]);
    assert_exit(&out, 0);
    assert_eq!(mode(&setup.path("release.json")), 0o644);
    let verified = setup.verify(&["--compatible", "acme-gw-1", "--floor", "12"]);
    assert_exit(&verified, 0);
    assert!(
        stdout(&verified).starts_with("accepted: 2026.06.1 (security version 12) for acme-gw-1")
    );

    let manifest = setup.manifest();
    let image = &manifest["images"]["rootfs"];
    let expected = hex::encode(Sha256::digest(fs::read(setup.path("rootfs.img")).unwrap()));
    assert_eq!(image["sha256"], expected.as_str());
    assert_eq!(image["size"], 300_000);
    assert_eq!(manifest["advisory"], "Fixes CVE-2026-0001");
    assert_eq!(manifest["severity"], "high");
    assert!(image.get("chunks").is_none());
}

#[test]
fn refused_release_exits_1_with_the_reason_code_on_stderr() {
    let setup = Setup::new();
    assert_exit(&setup.create(&["--no-chunks"]), 0);
    for (flags, code) in [
        (&["--compatible", "acme-gw-2"][..], "incompatible"),
        (&["--floor", "13"][..], "downgrade"),
        (&["--threshold", "2"][..], "below-threshold"),
    ] {
        let out = setup.verify(flags);
        assert_exit(&out, 1);
        assert!(
            stderr(&out).starts_with(&format!("refused: {code}: ")),
            "{flags:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty());
    }

    // Tampering: one character of the manifest's base64 changed.
    let mut release = setup.release();
    let manifest = release["manifest"].as_str().unwrap().to_string();
    let mut bytes = STANDARD.decode(&manifest).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"\"12\"\n" || w == b": 12,")
        .unwrap();
    bytes[at + 2] = b'9'; // security_version 12 -> 92
    release["manifest"] = STANDARD.encode(&bytes).into();
    fs::write(setup.path("release.json"), release.to_string()).unwrap();
    let out = setup.verify(&[]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).starts_with("refused: bad-signature: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn corpus_files_are_refused_by_the_binary_too() {
    // The corpus keys and a few hostile files, through the command line.
    let corpus = common::corpus_dir();
    for (name, code) in [
        ("sig-bit-flipped", "bad-signature"),
        ("signed-by-untrusted-key", "untrusted-key"),
        ("too-large-64kib-plus-1", "too-large"),
        ("envelope-extra-field-control-chars", "malformed"),
    ] {
        let out = run(&[
            &"release",
            &"verify",
            &"--keys",
            &corpus.join("keys/trusted"),
            &corpus.join(format!("releases/{name}.release")),
        ]);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.starts_with(&format!("refused: {code}: ")),
            "{name}: {err}"
        );
        assert!(
            !err.trim_end().chars().any(char::is_control),
            "{name}: raw control character on stderr: {err:?}"
        );
    }
}

#[test]
fn json_output_parses_for_acceptance_and_refusal() {
    let setup = Setup::new();
    assert_exit(&setup.create(&["--no-chunks"]), 0);
    let out = setup.verify(&["--json"]);
    assert_exit(&out, 0);
    let accepted: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(accepted["accepted"], true);
    assert_eq!(accepted["version"], "2026.06.1");
    assert_eq!(accepted["security_version"], 12);
    assert_eq!(accepted["compatible"], "acme-gw-1");
    let signer = KeyId::of(&keys::load_verifying_key(&setup.path("signer.pub")).unwrap());
    assert_eq!(accepted["signers"], serde_json::json!([signer.to_hex()]));
    let manifest_bytes = STANDARD
        .decode(setup.release()["manifest"].as_str().unwrap())
        .unwrap();
    assert_eq!(accepted["id"], hex::encode(Sha256::digest(&manifest_bytes)));

    let out = setup.verify(&["--json", "--compatible", "other"]);
    assert_exit(&out, 1);
    let refused: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(refused["accepted"], false);
    assert_eq!(refused["reason"], "incompatible");
    assert!(refused["message"].as_str().unwrap().contains("other"));
}

#[test]
fn sign_adds_a_second_distinct_signature_for_threshold_2() {
    let setup = Setup::new();
    assert_exit(&setup.create(&["--no-chunks"]), 0);
    assert_exit(&run(&[&"keygen", &"--out", &setup.path("second")]), 0);
    fs::copy(setup.path("second.pub"), setup.path("keys/second.pub")).unwrap();

    let out = setup.verify(&["--threshold", "2"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("below-threshold"), "{}", stderr(&out));

    let sign_with_second = || {
        run(&[
            &"release",
            &"sign",
            &"--key",
            &setup.path("second.key"),
            &setup.path("release.json"),
        ])
    };
    let manifest_before = setup.release()["manifest"].clone();
    let out = sign_with_second();
    assert_exit(&out, 0);
    let release = setup.release();
    assert_eq!(
        release["manifest"], manifest_before,
        "signing must not touch the manifest"
    );
    let keyids: Vec<&str> = release["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["keyid"].as_str().unwrap())
        .collect();
    assert_eq!(keyids.len(), 2);
    assert_ne!(keyids[0], keyids[1]);
    assert_exit(&setup.verify(&["--threshold", "2"]), 0);
    assert_exit(&setup.verify(&["--threshold", "3"]), 1);

    // Signing again with the same key replaces its signature rather than counting it twice.
    let again = sign_with_second();
    assert_exit(&again, 0);
    assert_eq!(setup.release()["signatures"].as_array().unwrap().len(), 2);
}

#[test]
fn inspect_shows_the_release_without_claiming_it_was_checked() {
    let setup = Setup::new();
    assert_exit(&setup.create(&["--no-chunks", "--downtime", "120"]), 0);
    let out = run(&[&"release", &"inspect", &setup.path("release.json")]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    for expected in [
        "version:          2026.06.1",
        "security version: 12",
        "compatible:       acme-gw-1",
        "security fix:     yes (severity high)",
        "advisory:         Fixes CVE-2026-0001",
        "disruption:       reboot, about 120 s downtime",
        "from https://updates.example.com/rootfs.img",
        "signatures not checked",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    let out = run(&[
        &"release",
        &"inspect",
        &"--json",
        &setup.path("release.json"),
    ]);
    assert_exit(&out, 0);
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["signatures_checked"], false);
    assert_eq!(json["manifest"]["version"], "2026.06.1");
    assert_eq!(json["manifest"]["disruption"]["downtime_seconds"], 120);
    assert_eq!(json["signatures"].as_array().unwrap().len(), 1);
}

#[test]
fn create_with_zstd_writes_a_compressed_image_the_manifest_describes() {
    let setup = Setup::new();
    let out = setup.create(&["--compress", "zstd", "--chunk-size", "65536"]);
    assert_exit(&out, 0);
    let image = fs::read(setup.path("rootfs.img")).unwrap();
    let compressed = fs::read(setup.path("rootfs.img.zst")).unwrap();
    assert!(
        compressed.len() < image.len() / 2,
        "{} bytes",
        compressed.len()
    );

    let manifest = setup.manifest();
    let entry = &manifest["images"]["rootfs"];
    assert_eq!(entry["compression"], "zstd");
    assert_eq!(entry["transport_size"], compressed.len());
    assert_eq!(
        entry["transport_sha256"],
        hex::encode(Sha256::digest(&compressed))
    );
    assert_eq!(entry["size"], image.len());
    assert_eq!(entry["sha256"], hex::encode(Sha256::digest(&image)));
    assert_eq!(zstd::decode_all(compressed.as_slice()).unwrap(), image);

    // The block index beside the served image, bound by its hash; it names the store beside it
    // (`--chunk-size` is the old spelling of `--block-size`).
    let index = fs::read(setup.path("rootfs.img.zst.index")).unwrap();
    assert_eq!(
        entry["chunks"]["sha256"],
        hex::encode(Sha256::digest(&index))
    );
    assert_eq!(entry["chunks"]["chunk_size"], 65536);
    assert_eq!(
        entry["chunks"]["url"],
        "https://updates.example.com/rootfs.img.zst.index"
    );
    let header = IndexHeader::parse(&index).unwrap();
    assert_eq!(header.block_size, 65536);
    assert_eq!(header.image_size, image.len() as u64);
    assert_eq!(header.store_name, "rootfs.img.zst.store");
    assert_eq!(
        fs::metadata(setup.path("rootfs.img.zst.store"))
            .unwrap()
            .len(),
        header.store_size
    );

    assert_exit(&setup.verify(&[]), 0);
}

#[test]
fn create_refuses_what_devices_would_refuse() {
    let setup = Setup::new();
    let out = setup.create(&["--no-chunks", "--expires", "2020-01-01T00:00:00Z"]);
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("would be refused by devices: malformed"),
        "{err}"
    );
    assert!(err.contains("expires is not after created"), "{err}");
    assert!(!setup.path("release.json").exists());
}

#[test]
fn verify_with_a_missing_key_directory_is_an_error_not_a_refusal() {
    let setup = Setup::new();
    assert_exit(&setup.create(&["--no-chunks"]), 0);
    let out = run(&[
        &"release",
        &"verify",
        &"--keys",
        &setup.path("no-such-keys"),
        &setup.path("release.json"),
    ]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("no-such-keys"), "{}", stderr(&out));
}
