//! The on-device self-test of the update mechanism (what ETSI TS 103 701 unit 5.3-2-2b asks a
//! laboratory to try): copies of a release this device accepts are altered the way an attacker
//! would alter them, verified exactly as a received release is, and each must be refused. It
//! also loads the trust anchor as the agent does, so an anchor someone could write fails it.
//! Everything happens in memory: no slot, bootloader variable or state file is touched.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;

use crate::anchor::{AnchorError, Protection, TrustAnchor};
use crate::config::Config;
use crate::engine::PersistentState;
use crate::keys::KeyId;
use crate::reason::ReasonCode;
use crate::release::{self, Envelope, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// No release to alter was found; the anchor part still ran (see `anchor`).
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelfTest {
    pub verdict: Verdict,
    /// Why it failed or did not run.
    pub reason: Option<String>,
    /// The trust anchor loaded as the agent loads it (protection enforced).
    pub anchor: String,
    /// The release whose copies were altered.
    pub release: Option<UsedRelease>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UsedRelease {
    pub path: PathBuf,
    pub release_id: String,
    pub version: String,
}

/// One altered copy and what verification made of it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub alteration: &'static str,
    pub expected: ReasonCode,
    /// `accepted` or the reason code it was refused with.
    pub outcome: String,
    pub passed: bool,
}

impl SelfTest {
    /// `release`: the signed release to alter; without it, the one the device kept of its
    /// running (or newest) release in `{state_dir}/releases/`.
    pub fn run(
        config: &Config,
        release: Option<&Path>,
        state: Option<&PersistentState>,
    ) -> SelfTest {
        let mut test = SelfTest {
            verdict: Verdict::NotRun,
            reason: None,
            anchor: String::new(),
            release: None,
            checks: Vec::new(),
        };
        let keys_dir = &config.trust.keys_dir;
        let anchor = match TrustAnchor::load(keys_dir, Protection::Enforce) {
            Ok(anchor) => {
                test.anchor = format!("{} loaded with its protection enforced", keys_dir.display());
                Some(anchor)
            }
            Err(err) => {
                test.anchor = err.to_string();
                test.fail(match err {
                    AnchorError::Writable { .. } => format!(
                        "the trust anchor fails the agent's own check: whoever can change {} can make the device install anything ({err})",
                        keys_dir.display()
                    ),
                    _ => format!("the trust anchor cannot be loaded: {err}"),
                });
                // The alterations still run against it, to show the signature checks.
                TrustAnchor::load(keys_dir, Protection::AllowWritable).ok()
            }
        };
        let Some(anchor) = anchor else {
            return test;
        };
        let kept = config.device.state_dir.join("releases");
        let found = match release {
            Some(path) => Ok(Some(path.to_owned())),
            None => kept_release(&kept, state),
        };
        let path = match found {
            Ok(Some(path)) => path,
            Ok(None) | Err(_) if test.verdict == Verdict::Fail => return test,
            Ok(None) => {
                test.reason = Some(format!(
                    "no signed release to alter: none kept in {} (the daemon keeps the newest with [installer]); give one with --release FILE",
                    kept.display()
                ));
                return test;
            }
            Err(err) => {
                test.reason = Some(format!(
                    "cannot look for the kept release in {}: {err} (run as root or as the agent's user, or give one with --release FILE)",
                    kept.display()
                ));
                return test;
            }
        };
        let bytes = match release::read_release_file(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                test.fail(format!("cannot read {}: {err}", path.display()));
                return test;
            }
        };
        // The release is already installed or was given to test with: its floor and expiry no
        // longer matter, its signatures and product do. The epoch is before any `expires`.
        let policy = Policy {
            threshold: config.trust.threshold,
            compatible: Some(config.device.compatible.clone()),
            floor: 0,
            now: Timestamp::UNIX_EPOCH,
        };
        let verified = match release::verify(&bytes, &anchor, &policy) {
            Ok(verified) => verified,
            Err(refusal) => {
                test.fail(format!(
                    "{} is not a release this device accepts ({refusal}); the altered copies would prove nothing",
                    path.display()
                ));
                return test;
            }
        };
        test.release = Some(UsedRelease {
            path,
            release_id: verified.release_id().to_string(),
            version: crate::release::escape_for_log(&verified.manifest.version, 64),
        });
        let envelope = Envelope::parse(&bytes).expect("verified, so it parses");
        for (alteration, expected, copy) in alterations(&envelope, &anchor) {
            let outcome = match release::verify(copy.to_json().as_bytes(), &anchor, &policy) {
                Ok(_) => "accepted".to_string(),
                Err(refusal) => refusal.code.to_string(),
            };
            let passed = outcome == expected.as_str();
            if !passed {
                test.fail(format!(
                    "an altered copy ({alteration}) was {outcome}, not refused as {expected}"
                ));
            }
            test.checks.push(Check {
                alteration,
                expected,
                outcome,
                passed,
            });
        }
        if test.verdict == Verdict::NotRun {
            test.verdict = Verdict::Pass;
        }
        test
    }

    fn fail(&mut self, reason: String) {
        if self.verdict != Verdict::Fail {
            self.verdict = Verdict::Fail;
            self.reason = Some(reason);
        }
    }
}

/// The copies an attacker could make of a genuine release without a signing key.
fn alterations(
    envelope: &Envelope,
    anchor: &TrustAnchor,
) -> Vec<(&'static str, ReasonCode, Envelope)> {
    let mut out = Vec::new();

    let mut manifest = envelope.clone();
    let middle = manifest.manifest_bytes.len() / 2;
    manifest.manifest_bytes[middle] ^= 0x01;
    out.push((
        "one bit of the signed manifest flipped",
        ReasonCode::BadSignature,
        manifest,
    ));

    let mut signatures = envelope.clone();
    for entry in &mut signatures.signatures {
        if anchor.get(&entry.keyid).is_some() {
            let mut bytes = entry.sig.to_bytes();
            bytes[0] ^= 0x01;
            entry.sig = ed25519_dalek::Signature::from_bytes(&bytes);
        }
    }
    out.push((
        "one bit of each trusted signature flipped",
        ReasonCode::BadSignature,
        signatures,
    ));

    // Signatures claimed by a key the device does not trust (an attacker's own key).
    let foreign = KeyId([0x5a; 32]);
    let mut signers = envelope.clone();
    for entry in &mut signers.signatures {
        entry.keyid = foreign;
    }
    out.push((
        "signatures attributed to a key outside the anchor",
        ReasonCode::UntrustedKey,
        signers,
    ));
    out
}

/// The release the device kept (in `{state_dir}/releases/`, named by release id): a committed
/// slot's if there is one, else the newest. A missing directory is no release, not an error.
fn kept_release(dir: &Path, state: Option<&PersistentState>) -> Result<Option<PathBuf>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let files: Vec<(PathBuf, std::time::SystemTime)> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .filter_map(|path| {
            let modified = path.metadata().and_then(|m| m.modified()).ok()?;
            Some((path, modified))
        })
        .collect();
    let committed: Vec<String> = state
        .map(|s| {
            s.slots
                .values()
                .filter(|slot| slot.committed)
                .map(|slot| slot.release_id.to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(files
        .into_iter()
        .max_by_key(|(path, modified)| {
            let is_committed = path
                .file_stem()
                .is_some_and(|stem| committed.iter().any(|id| stem == id.as_str()));
            (is_committed, *modified)
        })
        .map(|(path, _)| path))
}
