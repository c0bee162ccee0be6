//! The signed releases the driver keeps next to the state (`{state_dir}/releases`): what a
//! resumed install writes and activates, verified again each time.

use crate::engine::Failure;
use crate::reason::ReasonCode;
use crate::release::{self, VerifiedRelease};

use super::Agent;

impl Agent {
    /// Keeps the signed release, by release id, next to the state: an install resumed after a
    /// restart is carried out from these bytes, verified again (the state's copy of the
    /// manifest is not signed), and the privileged installer is handed them at write and at
    /// activation. Only the current transaction's and this one are kept.
    pub(super) fn remember_release(&self, verified: &VerifiedRelease) {
        let dir = self.releases_dir();
        let keep = self
            .engine
            .state()
            .phase
            .transaction()
            .map(|txn| format!("{}.json", txn.release_id));
        let name = format!("{}.json", verified.release_id());
        let result = std::fs::create_dir_all(&dir).and_then(|()| {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                let file = entry.file_name();
                if Some(file.to_string_lossy().as_ref()) != keep.as_deref() && file != *name {
                    std::fs::remove_file(entry.path())?;
                }
            }
            crate::durable::write_atomically(&dir.join(&name), &verified.signed, 0o600)
        });
        if let Err(err) = result {
            // The write or activation of this release then fails with the reason below.
            tracing::error!("cannot keep release {name} for the installer: {err}");
        }
    }

    fn releases_dir(&self) -> std::path::PathBuf {
        self.config.device.state_dir.join("releases")
    }

    /// The signed release of the transaction in progress, as kept by `remember_release`.
    fn current_release(&self) -> Result<String, Failure> {
        let missing = |detail: String| Failure::new(ReasonCode::NotReady, detail);
        let txn = self
            .engine
            .state()
            .phase
            .transaction()
            .ok_or_else(|| missing("no transaction in progress".into()))?;
        let path = self.releases_dir().join(format!("{}.json", txn.release_id));
        let bytes = crate::durable::read_bounded(&path, release::MAX_RELEASE_SIZE as u64)
            .map_err(|e| missing(format!("signed release {}: {e}", path.display())))?;
        String::from_utf8(bytes).map_err(|_| missing(format!("{} is not text", path.display())))
    }

    /// The transaction's signed release as kept by `remember_release`, verified again against
    /// the trust anchor and the policy now, and checked to be the transaction's: what a resumed
    /// install writes and activates comes from these bytes only.
    pub(super) fn transaction_release(&self) -> Result<(String, VerifiedRelease), Failure> {
        let signed = self.current_release()?;
        let txn_id = self
            .engine
            .state()
            .phase
            .transaction()
            .map(|txn| txn.release_id);
        let verified = self.verify(signed.as_bytes()).map_err(|refusal| {
            Failure::new(
                refusal.code,
                format!(
                    "the transaction's signed release does not verify: {}",
                    refusal.message
                ),
            )
        })?;
        if txn_id != Some(verified.release_id()) {
            return Err(Failure::new(
                ReasonCode::Malformed,
                format!(
                    "the signed release kept for the transaction (release {}) is release {}",
                    txn_id.map_or_else(|| "none".to_string(), |id| id.to_string()),
                    verified.release_id()
                ),
            ));
        }
        Ok((signed, verified))
    }

    /// The image the verified release holds for this device's slot class.
    pub(super) fn signed_image(
        &self,
        verified: &VerifiedRelease,
    ) -> Result<crate::release::manifest::Image, Failure> {
        let class = &self.config.slots.class;
        verified.manifest.images.get(class).cloned().ok_or_else(|| {
            Failure::new(
                ReasonCode::Incompatible,
                format!("the release has no image for slot class {class}"),
            )
        })
    }
}
