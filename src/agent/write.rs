//! The slot write as the driver carries it out: the request built from the configuration and
//! the transaction's signed release (never the state's copy of it), the download's jitter, the
//! engine fed with progress and checkpoints while the slot is written, user requests handled
//! between two steps, and transient failures retried from the last checkpoint.

use std::time::Duration;

use crate::engine::{Action, Bootname, Engine, Failure, Input, Phase};
use crate::reason::ReasonCode;
use crate::slot_control::{Release, SlotWrite};
use crate::state_store::StateStore;
use crate::system;
use crate::transfer::{TransferEvent, WriteRequest};

use super::{Agent, Observer, Output};

/// How often a transient download failure (reset, stall) is retried, resuming from the last
/// checkpoint, before the transaction fails.
const TRANSFER_ATTEMPTS: u32 = 3;

impl Agent {
    /// Before a download starts from its first byte: this device's share of
    /// `install.download_jitter`, unless a person asked for the install (they wait for it).
    async fn download_jitter(&self) {
        let Some(txn) = self.engine.state().phase.transaction() else {
            return;
        };
        let bound = jiff::SignedDuration::try_from(self.config.install.download_jitter)
            .unwrap_or(jiff::SignedDuration::ZERO);
        if txn.user_now || bound.is_zero() {
            return;
        }
        let wait = crate::engine::rollout::download_jitter(
            &txn.release_id,
            self.engine.device_id(),
            bound,
        );
        tracing::info!(
            "download of {} starts in {:.1} s (this device's share of install.download_jitter)",
            txn.id,
            wait.as_secs_f64()
        );
        tokio::time::sleep(std::time::Duration::try_from(wait).unwrap_or_default()).await;
    }

    pub(super) async fn write(
        &mut self,
        slot: &Bootname,
        image: crate::release::manifest::Image,
        resume_from: u64,
        observer: &mut dyn Observer,
    ) -> Result<(), Failure> {
        let (signed, verified) = self.transaction_release()?;
        let signed_image = self.signed_image(&verified)?;
        if signed_image != image {
            tracing::error!(
                message_id = crate::logging::message_id::TAMPER_ALERT,
                "TAMPER ALERT: the image in the saved state differs from the transaction's signed release; writing the signed release's"
            );
        }
        if resume_from == 0 {
            self.download_jitter().await;
        }
        let mut request = self.write_request(slot, signed_image, resume_from)?;
        let mut attempt = 1;
        loop {
            let result = {
                let engine = &mut self.engine;
                let store = &self.store;
                let crash = &self.crash;
                let clock = &self.clock;
                // Progress carries both counts: bytes written (`Progress`) and downloaded
                // (`Downloaded`, which for a delta also comes while nothing is written yet: the
                // ranges are fetched first).
                let (mut written_so_far, mut total_so_far) =
                    (request.resume_from, request.image.size);
                let mut downloaded_so_far = None;
                let mut on_event = |event: TransferEvent| -> std::io::Result<()> {
                    let input = match event {
                        TransferEvent::Progress { written, total } => {
                            crash.bytes_written(written);
                            (written_so_far, total_so_far) = (written, total);
                            Input::WriteProgress {
                                written,
                                total,
                                downloaded: downloaded_so_far,
                            }
                        }
                        TransferEvent::Checkpoint { durable } => Input::WriteCheckpoint { durable },
                        TransferEvent::Verifying => {
                            crash.point("readback:before");
                            return Ok(());
                        }
                        TransferEvent::Downloaded {
                            downloaded,
                            expected,
                        } => {
                            crash.bytes_downloaded(downloaded);
                            tracing::debug!("{downloaded} of {expected} bytes downloaded");
                            downloaded_so_far = Some(downloaded);
                            Input::WriteProgress {
                                written: written_so_far,
                                total: total_so_far,
                                downloaded: downloaded_so_far,
                            }
                        }
                    };
                    for action in engine.handle(input, clock()) {
                        if record_during_write(action, engine, store, observer)? {
                            crash.checkpoint_persisted();
                        }
                    }
                    // User requests during a write only record choices (postpone, automatic
                    // install, install now, check); none starts a job.
                    while let Some(input) = observer.interjection() {
                        for action in engine.handle(input, clock()) {
                            if record_during_write(action, engine, store, observer)? {
                                observer.observe(Output::Persisted(engine.state()));
                            }
                        }
                    }
                    Ok(())
                };
                let write = SlotWrite {
                    slot,
                    release: Release {
                        signed: &signed,
                        id: verified.release_id(),
                        image: &request.image,
                    },
                    request: &request,
                };
                self.control.write(write, &mut on_event).await
            };
            match result {
                Ok(()) => return Ok(()),
                Err(err) if err.is_transient() && attempt < TRANSFER_ATTEMPTS => {
                    tracing::warn!("write interrupted (attempt {attempt}): {err}; resuming");
                    attempt += 1;
                    if let Phase::Writing { durable, .. } = self.engine.state().phase {
                        request.resume_from = durable;
                    }
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
                Err(err) => return Err(err.into_failure()),
            }
        }
    }

    fn write_request(
        &self,
        slot: &Bootname,
        image: crate::release::manifest::Image,
        resume_from: u64,
    ) -> Result<WriteRequest, Failure> {
        let target = self.config.slot_by_bootname(slot).ok_or_else(|| {
            Failure::new(ReasonCode::SlotIo, format!("slot {slot} is not configured"))
        })?;
        // Defence in depth: the engine never targets the booted slot, and the device behind
        // the target must not be the one the running system was booted from either.
        let booted = self.engine.booted().map(|b| b.as_str()).unwrap_or_default();
        system::refuse_running_system(slot, booted, &target.device)?;
        let mut request = WriteRequest::new(image, target.device.clone(), target.capacity());
        request.resume_from = resume_from;
        request.checkpoint_interval = self.config.install.checkpoint_interval;
        request.server.stall_timeout = self.config.install.stall_timeout;
        request.server.max_rate = self.config.install.max_rate;
        request.readback_overlap = self
            .config
            .install
            .readback_overlap
            .for_slot(&target.device);
        // A delta reads the local slots: this request is for when this process owns them (no
        // split); under the split the installer reads them and the daemon fetches what it asks
        // for (`FetchSettings::delta_work_dir`).
        if self.config.install.delta {
            let booted = self
                .config
                .slot_by_bootname(booted)
                .filter(|_| !booted.is_empty())
                .map(|slot| crate::transfer::BootedSlot {
                    path: slot.device.clone(),
                    // A booted slot does not change under the running system: its table holds
                    // for this boot (and only proposes candidates, each checked before use).
                    key: system::boot_id(&self.config)
                        .ok()
                        .map(|id| crate::transfer::booted_table_key(id.as_str(), &slot.device)),
                });
            request.delta = Some(crate::transfer::DeltaSettings {
                work_dir: self.config.device.state_dir.join("delta"),
                booted,
                full_download_fallback: self.config.install.full_download_fallback,
            });
        }
        Ok(request)
    }
}

/// Carries out what the engine asks for in the middle of a slot write, where only records and
/// reports can come (from progress, checkpoints, or a user's choice); true when the state was
/// persisted. Anything that would start a job is logged, not run.
fn record_during_write(
    action: Action,
    engine: &Engine,
    store: &StateStore,
    observer: &mut dyn Observer,
) -> std::io::Result<bool> {
    match action {
        Action::Persist => {
            store.save(engine.state()).map_err(std::io::Error::other)?;
            return Ok(true);
        }
        Action::ReportProgress(progress) => observer.observe(Output::Progress(&progress)),
        Action::Report(event) => {
            // The write itself reports no transition; keep any such event rather than drop it.
            let _ = store.log_event(&event);
            observer.observe(Output::Event(&event));
        }
        Action::Answer(answer) => observer.observe(Output::Answer(&answer)),
        Action::Notify(notice) => observer.observe(Output::Notice(&notice)),
        Action::Check => observer.observe(Output::Check),
        other => tracing::error!("engine asked for {other:?} during a write"),
    }
    Ok(false)
}
