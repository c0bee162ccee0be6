//! The decision whether the device may act on a release. The order is the point: size, envelope,
//! signatures by distinct trusted keys, and only then the manifest's contents.

use alloc::collections::BTreeSet;

use jiff::Timestamp;
use sha2::{Digest, Sha256};

use crate::keys::KeyId;
use crate::keys::TrustedKeys;
use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::{Envelope, Manifest, Refusal, ReleaseId, escape_for_log};

/// What the device requires of a release, besides trusted signatures.
#[derive(Debug, Clone)]
pub struct Policy {
    /// How many distinct trusted keys must have signed (k of n).
    pub threshold: usize,
    /// The device's product string; `None` accepts any (operator tooling only).
    pub compatible: Option<String>,
    /// The lowest security version the device accepts (anti-rollback floor).
    pub floor: u64,
    /// Now, for `expires`; passed in so that the check is deterministic.
    pub now: Timestamp,
}

/// A release whose signatures and contents passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedRelease {
    pub manifest: Manifest,
    /// SHA-256 of the manifest bytes: the release's identity (two deliveries of the same
    /// release have the same id, whatever their signatures).
    pub id: [u8; 32],
    /// The distinct trusted keys whose signatures verified.
    pub signers: Vec<KeyId>,
    /// The manifest bytes exactly as signed.
    pub manifest_bytes: Vec<u8>,
    /// The release exactly as received (envelope and signatures), for handing on to the
    /// privileged installer, which verifies it again itself.
    pub signed: Vec<u8>,
}

impl VerifiedRelease {
    pub fn release_id(&self) -> ReleaseId {
        ReleaseId::from_digest(self.id)
    }
}

pub fn verify(
    release: &[u8],
    keys: &TrustedKeys,
    policy: &Policy,
) -> Result<VerifiedRelease, Refusal> {
    let envelope = Envelope::parse(release)?;
    let signers = check_signatures(&envelope, keys, policy.threshold)?;
    let manifest = Manifest::parse(&envelope.manifest_bytes)?;
    check_contents(&manifest, policy)?;
    Ok(VerifiedRelease {
        id: Sha256::digest(&envelope.manifest_bytes).into(),
        manifest,
        signers,
        manifest_bytes: envelope.manifest_bytes,
        signed: release.to_vec(),
    })
}

/// Counts distinct trusted keys with a valid signature. Unknown key ids are skipped: a release may
/// be signed for several fleets. A trusted key whose signature fails is a tamper sign and is
/// reported as such when the threshold is not met.
fn check_signatures(
    envelope: &Envelope,
    keys: &TrustedKeys,
    threshold: usize,
) -> Result<Vec<KeyId>, Refusal> {
    let threshold = threshold.max(1);
    let mut valid = BTreeSet::new();
    let mut failed = BTreeSet::new();
    for entry in &envelope.signatures {
        let Some(key) = keys.get(&entry.keyid) else {
            continue;
        };
        if key
            .verify_strict(&envelope.manifest_bytes, &entry.sig)
            .is_ok()
        {
            valid.insert(entry.keyid);
        } else {
            failed.insert(entry.keyid);
        }
    }
    if valid.len() >= threshold {
        return Ok(valid.into_iter().collect());
    }
    if let Some(keyid) = failed.iter().find(|id| !valid.contains(id)) {
        return Err(Refusal::new(
            ReasonCode::BadSignature,
            format!(
                "the signature by trusted key {} does not match the manifest: the release was altered or forged",
                keyid.short()
            ),
        ));
    }
    if valid.is_empty() {
        return Err(Refusal::new(
            ReasonCode::UntrustedKey,
            format!(
                "none of the {} signatures is by a key in the trust anchor",
                envelope.signatures.len()
            ),
        ));
    }
    Err(Refusal::new(
        ReasonCode::BelowThreshold,
        format!(
            "signed by {} distinct trusted key(s); {threshold} are required",
            valid.len()
        ),
    ))
}

fn check_contents(manifest: &Manifest, policy: &Policy) -> Result<(), Refusal> {
    if let Some(compatible) = &policy.compatible
        && &manifest.compatible != compatible
    {
        return Err(Refusal::new(
            ReasonCode::Incompatible,
            format!(
                "release is for {:?}, this device is {:?}",
                escape_for_log(&manifest.compatible, 64),
                compatible
            ),
        ));
    }
    if manifest.security_version < policy.floor {
        return Err(Refusal::new(
            ReasonCode::Downgrade,
            format!(
                "security version {} is below this device's floor {}",
                manifest.security_version, policy.floor
            ),
        ));
    }
    if let Some(expires) = manifest.expires
        && expires <= policy.now
    {
        return Err(Refusal::new(
            ReasonCode::Expired,
            format!("release expired at {expires} (now {})", policy.now),
        ));
    }
    Ok(())
}
