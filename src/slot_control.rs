//! Who changes the slots and the bootloader, and reboots the device: a [`SlotControl`].
//!
//! - [`Local`] does it in this process, as root: the bootloader backend, the slot devices, the
//!   reboot command. The one-shot commands, the demo and the tests use it without `[installer]`,
//!   and the privileged installer uses it for what it carries out once it checked a request.
//! - [`crate::installer::RemoteInstaller`] asks the privileged installer over its socket: the
//!   unprivileged daemon (and its one-shot commands) with `[installer]` in the config.
//!
//! The driver hands every control the transaction's release as it kept it and verified it again
//! ([`Release`]); the installer verifies the signed bytes once more itself.

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::bootloader::{self, Bootloader, BootloaderError};
use crate::config::{Config, SlotClass};
use crate::engine::{Bootname, Failure};
use crate::reason::ReasonCode;
use crate::release::ReleaseId;
use crate::release::manifest::Image;
use crate::system;
use crate::transfer::{self, TransferError, TransferEvent, WriteRequest};

/// A control's answer, to be awaited (the trait is used as `dyn SlotControl`).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a slot write reports on the way: progress, durable checkpoints, the read-back's start.
pub type Events<'a> = &'a mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send);

/// The transaction's release, as the driver kept it next to the state and verified it again.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// The signed bytes: the installer is handed these and verifies them itself.
    pub signed: &'a str,
    pub id: ReleaseId,
    /// Its image for this device's slot class.
    pub image: &'a Image,
}

/// A slot write the driver asks for: the slot by bootname, the transaction's release, and how
/// to fetch and write its image (the slot's device, resume point, server, delta).
#[derive(Clone, Copy)]
pub struct SlotWrite<'a> {
    pub slot: &'a Bootname,
    pub release: Release<'a>,
    pub request: &'a WriteRequest,
}

/// How a slot write failed: this side's transfer (network, decompression, the slot) or the
/// installer's side (its refusal, or the conversation broken off).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Transfer(TransferError),
    #[error("{}: {}", .0.reason, .0.message)]
    Installer(Failure),
}

impl WriteError {
    /// Worth a retry from the last checkpoint: the network's moments, and an installer that
    /// broke off (killed or restarted: systemd starts it again on the next connection to its
    /// socket, and it re-hashes the slot up to the checkpoint). A refusal is an answer, not a
    /// moment.
    pub fn is_transient(&self) -> bool {
        match self {
            WriteError::Transfer(e) => e.is_transient(),
            WriteError::Installer(failure) => failure.reason == ReasonCode::InstallerUnavailable,
        }
    }

    pub fn into_failure(self) -> Failure {
        match self {
            WriteError::Transfer(e) => Failure::new(e.reason(), e.to_string()),
            WriteError::Installer(failure) => failure,
        }
    }
}

/// The reboot could not be started: what was run (or asked) and why it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootError {
    pub command: Vec<String>,
    pub message: String,
}

/// The privileged operations the engine's jobs need, by slot bootname.
pub trait SlotControl: Send + Sync {
    /// The bootloader never tries `slot` (before its bytes change, or after a failed trial).
    fn mark_bad<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>>;

    /// `slot` is committed: the bootloader keeps booting it.
    fn mark_good<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>>;

    /// Names `slot` for the next boot (one try), only once it holds `release`'s image.
    fn activate<'a>(
        &'a mut self,
        slot: &'a Bootname,
        release: Release<'a>,
    ) -> Pending<'a, Result<(), Failure>>;

    /// Fetches the request's image and writes it into the slot (the device the request names),
    /// resuming at `request.resume_from`, then reads it back. Where the fetching and the
    /// writing are two processes, this side fetches as [`WriteRequest::fetch_settings`] says.
    fn write<'a>(
        &'a mut self,
        write: SlotWrite<'a>,
        events: Events<'a>,
    ) -> Pending<'a, Result<(), WriteError>>;

    /// Starts the reboot (returns once it is under way; the process may be ended by it).
    fn reboot(&self) -> Result<(), RebootError>;
}

/// This process does it, as root.
pub struct Local {
    bootloader: Box<dyn Bootloader>,
    slots: SlotClass,
    reboot_command: Vec<String>,
    /// The slot this control wrote and read back, with the release: activating it needs no
    /// second read-back. Forgotten when a write starts.
    written: Option<(Bootname, ReleaseId)>,
}

impl Local {
    /// The bootloader backend the configuration names (checked now), the configured slots and
    /// reboot command.
    pub fn open(config: &Config) -> Result<Local, BootloaderError> {
        Ok(Local {
            bootloader: bootloader::open(config)?,
            slots: config.slots.clone(),
            reboot_command: config.system.reboot_command.clone(),
            written: None,
        })
    }

    pub fn mark_bad_now(&self, slot: &Bootname) -> Result<(), Failure> {
        self.bootloader.mark_bad(slot).map_err(bootloader_failed)
    }

    pub fn mark_good_now(&self, slot: &Bootname) -> Result<(), Failure> {
        self.bootloader.mark_good(slot).map_err(bootloader_failed)
    }

    pub fn mark_active_now(&self, slot: &Bootname) -> Result<(), Failure> {
        self.bootloader.mark_active(slot).map_err(bootloader_failed)
    }

    /// Runs the configured reboot command, at most [`system::REBOOT_TIMEOUT`]: the one place
    /// the device is rebooted from.
    pub fn reboot_now(&self) -> Result<(), RebootError> {
        system::run_bounded(&self.reboot_command, system::REBOOT_TIMEOUT).map_err(|e| RebootError {
            command: self.reboot_command.clone(),
            message: e.to_string(),
        })
    }

    /// The slot must hold `release`'s image: written and read back by this control, or read
    /// back now.
    async fn check_holds(&self, slot: &Bootname, release: Release<'_>) -> Result<(), Failure> {
        if matches!(&self.written, Some((written, id)) if written == slot && *id == release.id) {
            return Ok(());
        }
        let target = [&self.slots.a, &self.slots.b]
            .into_iter()
            .find(|target| target.bootname == *slot)
            .ok_or_else(|| {
                Failure::new(ReasonCode::SlotIo, format!("slot {slot} is not configured"))
            })?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&release.image.sha256, &mut sha256)
            .map_err(|_| Failure::new(ReasonCode::Malformed, "image sha256 is not hex"))?;
        let device = target.device.clone();
        let size = release.image.size;
        tokio::task::spawn_blocking(move || transfer::verify_slot(&device, size, &sha256))
            .await
            .map_err(|e| Failure::new(ReasonCode::SlotIo, e.to_string()))?
            .map_err(|e| Failure::new(e.reason(), e.to_string()))
    }
}

fn bootloader_failed(err: BootloaderError) -> Failure {
    Failure::new(ReasonCode::BootloaderFailed, err.to_string())
}

impl SlotControl for Local {
    fn mark_bad<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>> {
        Box::pin(async move { self.mark_bad_now(slot) })
    }

    fn mark_good<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>> {
        Box::pin(async move { self.mark_good_now(slot) })
    }

    fn activate<'a>(
        &'a mut self,
        slot: &'a Bootname,
        release: Release<'a>,
    ) -> Pending<'a, Result<(), Failure>> {
        Box::pin(async move {
            self.check_holds(slot, release).await?;
            self.mark_active_now(slot)
        })
    }

    fn write<'a>(
        &'a mut self,
        write: SlotWrite<'a>,
        events: Events<'a>,
    ) -> Pending<'a, Result<(), WriteError>> {
        Box::pin(async move {
            self.written = None;
            transfer::install_image(write.request, events)
                .await
                .map_err(WriteError::Transfer)?;
            self.written = Some((write.slot.clone(), write.release.id));
            Ok(())
        })
    }

    fn reboot(&self) -> Result<(), RebootError> {
        self.reboot_now()
    }
}
