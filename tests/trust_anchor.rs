//! The trust anchor's protection checks, against real directories: writable, group-writable,
//! not owned by root, and (in a private mount namespace) a read-only mount, which is the one
//! case `Protection::Enforce` accepts. These tests run as root (as here and in CI): they chown
//! files and mount a tmpfs.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use ed25519_dalek::pkcs8::EncodePublicKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use update_agent::anchor::{AnchorError, MAX_KEYS, Protection, TrustAnchor};
use update_agent::keys::KeyError;

fn write_pub(dir: &Path, name: &str, seed: u8) {
    let pem = key(seed)
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    let path = dir.join(name);
    fs::write(&path, pem).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// A directory holding keys A and B, made as an integrator would (root-owned, 0755/0644), but on
/// the writable filesystem of the test machine.
fn anchor_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    write_pub(dir.path(), "a.pub", KEY_A);
    write_pub(dir.path(), "b.pem", KEY_B);
    dir
}

fn writable_problems(result: Result<TrustAnchor, AnchorError>) -> (String, Vec<String>) {
    match result {
        Err(err @ AnchorError::Writable { .. }) => {
            let message = err.to_string();
            let AnchorError::Writable { problems, .. } = err else {
                unreachable!()
            };
            (message, problems)
        }
        other => panic!("expected AnchorError::Writable, got {other:?}"),
    }
}

#[test]
fn writable_anchor_is_refused_under_enforce_and_the_error_says_how_to_fix_it() {
    let dir = anchor_dir();
    let (message, problems) = writable_problems(TrustAnchor::load(dir.path(), Protection::Enforce));
    assert!(
        problems.iter().any(|p| p.contains("mounted read-write")),
        "{problems:?}"
    );
    // One note per filesystem, not one per file.
    assert_eq!(
        problems
            .iter()
            .filter(|p| p.contains("mounted read-write"))
            .count(),
        1
    );
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("read-only root filesystem"), "{message}");
    assert!(message.contains("owned by root"), "{message}");
}

#[test]
fn writable_anchor_loads_with_warnings_when_allowed() {
    let dir = anchor_dir();
    let anchor = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap();
    assert_eq!(anchor.len(), 2, "both *.pub and *.pem are keys");
    assert!(
        anchor
            .get(&update_agent::keys::KeyId::of(&key(KEY_A).verifying_key()))
            .is_some()
    );
    assert!(
        anchor
            .warnings
            .iter()
            .any(|w| w.contains("mounted read-write")),
        "{:?}",
        anchor.warnings
    );
}

#[test]
fn group_writable_key_file_is_reported() {
    let dir = anchor_dir();
    let path = dir.path().join("a.pub");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o664)).unwrap();
    let expected = format!(
        "{} is writable by group or others (mode 664)",
        path.display()
    );
    let anchor = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap();
    assert!(anchor.warnings.contains(&expected), "{:?}", anchor.warnings);
    let (message, _) = writable_problems(TrustAnchor::load(dir.path(), Protection::Enforce));
    assert!(message.contains(&expected), "{message}");
    // The directory itself too.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let anchor = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap();
    let dir_note = format!(
        "{} is writable by group or others (mode 777)",
        dir.path().display()
    );
    assert!(anchor.warnings.contains(&dir_note), "{:?}", anchor.warnings);
}

#[test]
fn key_file_not_owned_by_root_is_reported() {
    const NOBODY: u32 = 65534;
    let dir = anchor_dir();
    let path = dir.path().join("b.pem");
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY))
        .expect("chown to nobody: these tests must run as root");
    let expected = format!("{} is owned by uid {NOBODY}, not root", path.display());
    let anchor = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap();
    assert!(anchor.warnings.contains(&expected), "{:?}", anchor.warnings);
    let (_, problems) = writable_problems(TrustAnchor::load(dir.path(), Protection::Enforce));
    assert!(problems.contains(&expected), "{problems:?}");
}

/// Set in the child that runs inside the private mount namespace: the read-only anchor to load.
const INNER_ENV: &str = "UPDATE_AGENT_TEST_RO_ANCHOR";
const INNER_TEST: &str = "read_only_mount_is_accepted_under_enforce";

/// Outside: builds an anchor on a read-only tmpfs in a private mount namespace (`unshare -m`, so
/// the mount is invisible to the rest of the machine and vanishes with the child) and runs this
/// same test binary there, filtered to this test. Inside (`INNER_ENV` set): loads the anchor with
/// `Protection::Enforce` and reports. One test in two roles, so nothing passes without checking.
#[test]
fn read_only_mount_is_accepted_under_enforce() {
    if let Some(dir) = std::env::var_os(INNER_ENV) {
        match TrustAnchor::load(Path::new(&dir), Protection::Enforce) {
            Ok(anchor) => println!(
                "INNER-RESULT ok keys={} warnings={:?}",
                anchor.len(),
                anchor.warnings
            ),
            Err(err) => println!("INNER-RESULT err {err}"),
        }
        return;
    }

    // Accepted: read-only, root-owned, 0755 directory, 0644 keys.
    let out = load_in_read_only_namespace("");
    assert!(
        out.contains("INNER-RESULT ok keys=2 warnings=[]"),
        "a root-owned anchor on a read-only mount must load under Enforce:\n{out}"
    );

    // Still refused on a read-only mount: a key file that was group/other-writable when the
    // image was made (mode bits are checked as well as the mount).
    let out = load_in_read_only_namespace("chmod 0666 \"$1/a.pub\"");
    assert!(
        out.contains("INNER-RESULT err") && out.contains("writable by group or others (mode 666)"),
        "{out}"
    );
    assert!(!out.contains("mounted read-write"), "{out}");
}

/// Runs the inner role over an anchor with keys A and B on a read-only tmpfs; `tweak` is a shell
/// command run (with `$1` the mount point) before the remount. Returns the child's output.
fn load_in_read_only_namespace(tweak: &str) -> String {
    let source = anchor_dir();
    let mount_point = tempfile::tempdir().unwrap();
    let test_binary = std::env::current_exe().unwrap();
    let script = format!(
        r#"set -e
mount --make-rprivate /
mount -t tmpfs -o mode=0755,size=1m update-agent-test-anchor "$1"
cp "$2"/a.pub "$2"/b.pem "$1"/
chown root:root "$1"/*
chmod 0644 "$1"/*
{tweak}
mount -o remount,ro "$1"
exec "$3" --exact {INNER_TEST} --nocapture --test-threads 1"#
    );
    let output = in_mount_namespace(&script)
        .arg(mount_point.path())
        .arg(source.path())
        .arg(&test_binary)
        .env(INNER_ENV, mount_point.path())
        .output()
        .expect("cannot run unshare (util-linux); this test needs it and root");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the namespace child failed ({}); this test needs root for unshare -m and mount:\n{text}",
        output.status
    );
    text
}

#[test]
fn empty_anchor_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("README"), "keys go here\n").unwrap();
    fs::write(dir.path().join("a.pub.disabled"), "not loaded\n").unwrap();
    let err = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap_err();
    assert!(matches!(err, AnchorError::Empty { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("holds no public key"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn more_than_64_keys_is_refused_and_64_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..MAX_KEYS {
        write_pub(dir.path(), &format!("k{i:02}.pub"), 100 + i as u8);
    }
    let anchor = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap();
    assert_eq!(anchor.len(), MAX_KEYS);
    write_pub(dir.path(), "one-too-many.pub", 99);
    let err = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap_err();
    assert!(matches!(err, AnchorError::TooManyKeys { .. }), "{err:?}");
    assert!(err.to_string().contains("more than 64 keys"), "{err}");
}

#[test]
fn a_pub_file_that_is_not_a_public_key_is_a_clear_error() {
    let dir = anchor_dir();
    let bad = dir.path().join("notes.pub");
    fs::write(&bad, "this is not a key\n").unwrap();
    let err = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap_err();
    let AnchorError::Key(KeyError::NotAKey { path, .. }) = &err else {
        panic!("expected NotAKey, got {err:?}");
    };
    assert_eq!(path, &bad);
    let message = err.to_string();
    assert!(message.contains("notes.pub"), "{message}");
    assert!(message.contains("not an Ed25519 public key"), "{message}");
    assert!(message.contains("openssl pkey -pubout"), "{message}");

    // A private key put into the anchor by mistake is refused the same way.
    fs::remove_file(&bad).unwrap();
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    let private = key(KEY_C).to_pkcs8_pem(LineEnding::LF).unwrap();
    fs::write(dir.path().join("c.pem"), private.as_bytes()).unwrap();
    let err = TrustAnchor::load(dir.path(), Protection::AllowWritable).unwrap_err();
    assert!(
        matches!(err, AnchorError::Key(KeyError::NotAKey { .. })),
        "{err:?}"
    );
}

#[test]
fn missing_anchor_directory_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("keys.d");
    let err = TrustAnchor::load(&missing, Protection::Enforce).unwrap_err();
    assert!(matches!(err, AnchorError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("keys.d"), "{err}");
}
