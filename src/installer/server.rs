//! The privileged role: `update-agent installer`. One connection at a time, one request per
//! connection; every refusal is answered with a reason code and logged.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::{Gid, Uid};

use super::ledger::Ledger;
use super::{
    FrameError, MAX_REQUEST, Op, PROTOCOL_VERSION, Reply, Request, recv_frame, send_frame,
};
use crate::anchor::{AnchorError, TrustAnchor};
use crate::bootloader::BootloaderError;
use crate::config::{Config, InstallerConfig};
use crate::engine::Bootname;
use crate::reason::ReasonCode;
use crate::release::{self, Policy, VerifiedRelease};
use crate::slot_control::Local;
use crate::system;
use crate::transfer::{SlotStream, SlotStreamRequest, TransferEvent, verify_slot};

/// How long a client may take to send its whole request, and to take each reply off the socket.
/// A deadline for the frame, not for each read: a caller that trickles a byte at a time gets no
/// more time than one that sends nothing.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "the configuration has no [installer] section; the installer needs its socket and daemon_user"
    )]
    NotConfigured,
    #[error("installer.daemon_user {0:?} is neither a user on this system nor a numeric uid")]
    UnknownUser(String),
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    #[error(transparent)]
    Bootloader(#[from] BootloaderError),
    #[error("the installer's state in {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the installer's socket directory {dir} must be a directory of root's that only root can \
         write (it is {owner}'s, mode {mode:04o}): whoever can write it could replace the socket \
         with a link while the installer sets its owner and mode. Use a root-only directory such \
         as /run/update-agent (`chown root: {dir}; chmod 0755 {dir}`)"
    )]
    UnsafeSocketDir {
        dir: String,
        owner: String,
        mode: u32,
    },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A refusal: a reason code for the daemon and a sentence for the journal and the operator.
struct Refused {
    reason: ReasonCode,
    message: String,
}

impl From<crate::engine::Failure> for Refused {
    fn from(failure: crate::engine::Failure) -> Refused {
        Refused::new(failure.reason, failure.message)
    }
}

impl Refused {
    fn new(reason: ReasonCode, message: impl Into<String>) -> Refused {
        Refused {
            reason,
            message: message.into(),
        }
    }
}

pub struct Installer {
    config: Config,
    anchor: TrustAnchor,
    /// What it carries out once a request passed its checks: the bootloader, the reboot.
    local: Local,
    daemon_uid: Uid,
    daemon_gid: Option<Gid>,
    ledger: Ledger,
    /// Slots this process wrote and read back, with the release id: activating one of those
    /// needs no second read-back. Forgotten when a write to the slot starts.
    written: std::collections::BTreeMap<Bootname, [u8; 32]>,
}

/// How much of a slot's head is overwritten with zeros after a write whose bytes were refused:
/// the superblocks of the filesystems a bootloader reads (ext2/3/4 at 1 KiB, squashfs and FAT
/// at 0, EROFS at 1 KiB) and the kernel a boot script would load are gone, so what stays of
/// the refused bytes is nothing a bootloader can start, whatever the environment says.
const WIPED_HEAD: u64 = 1024 * 1024;

impl Installer {
    pub fn open(config: Config) -> Result<Installer, ServeError> {
        let settings = config.installer.clone().ok_or(ServeError::NotConfigured)?;
        let (daemon_uid, daemon_gid) = resolve_user(&settings)?;
        let anchor = config.trust.anchor()?;
        let local = Local::open(&config)?;
        let ledger = Ledger::open(&settings.state_dir).map_err(|source| ServeError::State {
            path: settings.state_dir.display().to_string(),
            source,
        })?;
        Ok(Installer {
            written: Default::default(),
            ledger,
            config,
            anchor,
            local,
            daemon_uid,
            daemon_gid,
        })
    }

    /// The socket systemd passed (socket activation, `LISTEN_FDS`), else one bound at the
    /// configured path: owned by root and the daemon user's group, mode 0660 (0666 when the
    /// daemon user has no group; the peer check still keeps everyone else out).
    ///
    /// The socket's directory must be root's and writable by root alone (it is created so when
    /// missing): the path is removed, bound, then chowned and chmodded, and a user who could
    /// write the directory could swap the new socket for a link in between and have root
    /// hand them another file.
    pub fn listener(&self) -> Result<UnixListener, ServeError> {
        if let Some(listener) = inherited_listener() {
            return Ok(listener);
        }
        let path = &self
            .config
            .installer
            .as_ref()
            .expect("checked in open")
            .socket;
        let listen_err = |source| ServeError::Listen {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(listen_err)?;
                // Reachable for the daemon's user (the socket's own mode decides who connects).
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(listen_err)?;
            }
            let meta = std::fs::symlink_metadata(dir).map_err(listen_err)?;
            use std::os::unix::fs::MetadataExt;
            if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return Err(ServeError::UnsafeSocketDir {
                    dir: dir.display().to_string(),
                    owner: crate::state_store::describe_uid(meta.uid()),
                    mode: meta.mode() & 0o7777,
                });
            }
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        let mode = match self.daemon_gid {
            Some(gid) => {
                // Not following a link, should one be there after all.
                std::os::unix::fs::lchown(path, None, Some(gid.as_raw())).map_err(listen_err)?;
                0o660
            }
            None => 0o666,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(listen_err)?;
        Ok(listener)
    }

    /// Serves until the listener fails.
    pub fn serve(&mut self, listener: UnixListener) -> std::io::Result<()> {
        tracing::info!(
            "installer serving uid {} on its socket",
            self.daemon_uid.as_raw()
        );
        loop {
            let (stream, _) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.handle(stream);
        }
    }

    /// Carries out one connection's request and answers it.
    pub fn handle(&mut self, stream: UnixStream) {
        let peer = match getsockopt(&stream, PeerCredentials) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::error!("installer: cannot read the caller's credentials: {e}");
                return;
            }
        };
        let (uid, pid) = (peer.uid(), peer.pid());
        // The caller is checked before a byte of its request is read: anyone else is answered
        // at once and the connection closed, so it cannot hold the installer for a moment.
        if uid != self.daemon_uid.as_raw() {
            let refused = Refused::new(
                ReasonCode::Forbidden,
                format!(
                    "uid {uid} (pid {pid}) is not the daemon user (uid {})",
                    self.daemon_uid.as_raw()
                ),
            );
            self.answer(&stream, "request", uid, Err(refused));
            return;
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let (request, fd) = match recv_frame::<Request>(&stream, MAX_REQUEST, deadline) {
            Ok(received) => received,
            Err(FrameError::Io(e)) => {
                tracing::warn!("installer: no request from uid {uid} (pid {pid}): {e}");
                return;
            }
            Err(e) => {
                let refused = Refused::new(ReasonCode::Malformed, e.to_string());
                self.answer(&stream, "request", uid, Err(refused));
                return;
            }
        };
        let name = request.op.name();
        let result = if request.version != PROTOCOL_VERSION {
            Err(Refused::new(
                ReasonCode::InvalidRequest,
                format!(
                    "protocol version {} (this installer speaks {PROTOCOL_VERSION}): the daemon \
                     and the installer come from different releases of update-agent; install \
                     the same release of both and restart them",
                    request.version
                ),
            ))
        } else {
            self.carry_out(request.op, fd, &stream)
        };
        self.answer(&stream, name, uid, result);
    }

    fn answer(&self, stream: &UnixStream, op: &str, uid: u32, result: Result<(), Refused>) {
        let reply = match result {
            Ok(()) => {
                tracing::info!("installer: {op} for uid {uid} done");
                Reply::Done
            }
            Err(refused) => {
                if refused.reason.is_tamper_alert() {
                    crate::logging::tamper_alert(
                        refused.reason,
                        format_args!("installer refused {op} for uid {uid}: {}", refused.message),
                    );
                } else {
                    tracing::warn!(
                        reason = %refused.reason,
                        "installer refused {op} for uid {uid}: {}",
                        refused.message
                    );
                }
                Reply::Refused {
                    reason: refused.reason,
                    message: refused.message,
                }
            }
        };
        if let Err(e) = send_frame(stream, &reply, None, Instant::now() + REQUEST_TIMEOUT) {
            tracing::warn!("installer: cannot answer {op} to uid {uid}: {e}");
        }
    }

    fn carry_out(
        &mut self,
        op: Op,
        fd: Option<OwnedFd>,
        stream: &UnixStream,
    ) -> Result<(), Refused> {
        // The booted slot counts as verified (it is what the device runs) unless the ledger
        // holds an unverified write of it; recorded now, it still counts after the device
        // boots the other slot.
        let booted = system::booted_slot(&self.config).ok();
        if let Some(booted) = &booted {
            self.ledger.saw_booted(booted).map_err(ledger_failed)?;
        }
        match op {
            Op::MarkBad { slot } => {
                self.configured(&slot)?;
                self.may_mark_bad(&slot, booted.as_deref())?;
                self.local.mark_bad_now(&slot).map_err(Refused::from)
            }
            Op::MarkGood { slot } => {
                self.configured(&slot)?;
                self.ledger
                    .may_mark_good(&slot, booted.as_deref(), self.floor())
                    .map_err(|why| {
                        Refused::new(
                            ReasonCode::UnverifiedSlot,
                            format!("slot {slot} is not marked good: {}", why.0),
                        )
                    })?;
                self.local.mark_good_now(&slot).map_err(Refused::from)?;
                // Good while booted: the commit (or an ordinary boot) of what the slot holds.
                if booted.as_deref() == Some(slot.as_str())
                    && let Err(e) = self.ledger.committed(&slot)
                {
                    tracing::error!("installer: cannot raise its anti-rollback floor: {e}");
                }
                Ok(())
            }
            Op::Activate { slot, release } => self.activate(&slot, &release),
            Op::Write {
                slot,
                release,
                resume_from,
            } => {
                let stream_fd = image_stream(fd)?;
                self.write(&slot, &release, resume_from, stream_fd, stream)
            }
            Op::WriteDelta {
                slot,
                release,
                ranges_per_request,
            } => {
                let stream_fd = image_stream(fd)?;
                self.write_delta(&slot, &release, ranges_per_request, stream_fd, stream)
            }
            Op::Reboot => self.reboot(),
        }
    }

    /// The floor releases and verified slots are held to: the configured one or the one the
    /// ledger raised at a commit.
    fn floor(&self) -> u64 {
        self.config.trust.floor.max(self.ledger.floor())
    }

    /// A slot may be marked bad only while another one stays that the bootloader may fall back
    /// to: verified bytes, or the running system. Otherwise the boot scripts' last resort
    /// (U-Boot: an emptied `BOOT_ORDER` reads as "A B" with every counter reset; GRUB: entry 0
    /// when no slot is OK) could start bytes the installer never verified.
    fn may_mark_bad(&self, slot: &Bootname, booted: Option<&str>) -> Result<(), Refused> {
        let mut why = Vec::new();
        for other in [&self.config.slots.a, &self.config.slots.b] {
            if other.bootname == *slot {
                continue;
            }
            match self.ledger.may_fall_back_to(
                &other.bootname,
                booted,
                self.floor(),
                self.config.trust.floor,
            ) {
                Ok(()) => return Ok(()),
                Err(untrusted) => why.push(untrusted.0),
            }
        }
        Err(Refused::new(
            ReasonCode::UnverifiedSlot,
            format!(
                "slot {slot} is not marked bad: the bootloader would be left with no slot to fall back to that holds verified bytes ({})",
                why.join("; ")
            ),
        ))
    }

    fn configured(&self, slot: &Bootname) -> Result<&crate::config::Slot, Refused> {
        self.config.slot_by_bootname(slot).ok_or_else(|| {
            Refused::new(
                ReasonCode::InvalidRequest,
                format!(
                    "slot {} is not configured",
                    release::escape_for_log(slot, 32)
                ),
            )
        })
    }

    /// Records that `slot` now holds `verified`'s image, written and read back by this process:
    /// in the ledger (what may boot) and in memory (what `activate` need not read back again).
    fn record_verified(
        &mut self,
        slot: &Bootname,
        verified: &VerifiedRelease,
    ) -> Result<(), Refused> {
        self.ledger_verified(slot, verified)?;
        self.written.insert(slot.clone(), verified.id);
        Ok(())
    }

    /// The ledger's record that `slot` holds bytes read back against `verified`.
    fn ledger_verified(
        &mut self,
        slot: &Bootname,
        verified: &VerifiedRelease,
    ) -> Result<(), Refused> {
        self.ledger
            .verified(
                slot,
                &verified.release_id().to_string(),
                verified.manifest.security_version,
            )
            .map_err(ledger_failed)
    }

    /// The installer's own verification, against its own trust anchor (what the daemon says a
    /// release is counts for nothing), and the image the release holds for this device, with
    /// its SHA-256.
    fn verify(
        &self,
        release: &str,
    ) -> Result<(VerifiedRelease, crate::release::manifest::Image, [u8; 32]), Refused> {
        let verified = self.verify_release(release)?;
        let (image, sha256) = self.image(&verified)?;
        Ok((verified, image, sha256))
    }

    fn verify_release(&self, release: &str) -> Result<VerifiedRelease, Refused> {
        let policy = Policy {
            threshold: self.config.trust.threshold,
            compatible: Some(self.config.device.compatible.clone()),
            floor: self.floor(),
            now: Timestamp::now(),
        };
        release::verify(release.as_bytes(), &self.anchor, &policy)
            .map_err(|refusal| Refused::new(refusal.code, refusal.message))
    }

    /// The image the verified release holds for this device's slot class, with its SHA-256.
    fn image(
        &self,
        verified: &VerifiedRelease,
    ) -> Result<(crate::release::manifest::Image, [u8; 32]), Refused> {
        let class = &self.config.slots.class;
        let image = verified.manifest.images.get(class).ok_or_else(|| {
            Refused::new(
                ReasonCode::Incompatible,
                format!("the release has no image for slot class {class}"),
            )
        })?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(&image.sha256, &mut sha256)
            .map_err(|_| Refused::new(ReasonCode::Malformed, "image sha256 is not hex"))?;
        Ok((image.clone(), sha256))
    }

    /// What every write does before its first byte: the slot checked writable, marked bad
    /// (the bootloader must never name a slot whose bytes are changing, whatever the daemon did
    /// or did not ask before) and recorded unverified in the ledger before the first byte
    /// changes.
    fn begin_write(&mut self, slot: &Bootname) -> Result<crate::config::Slot, Refused> {
        let target = self.writable(slot)?;
        self.local.mark_bad_now(slot).map_err(Refused::from)?;
        self.written.remove(slot);
        self.ledger.writing(slot).map_err(ledger_failed)?;
        Ok(target)
    }

    /// The installer's own work directory (root's): expanded block indexes, slot tables.
    fn work_dir(&self) -> std::path::PathBuf {
        let settings = self.config.installer.as_ref().expect("checked at open");
        settings.state_dir.join("delta")
    }

    /// The slot to write: configured, and neither the booted one nor the device behind `/`.
    fn writable(&self, slot: &Bootname) -> Result<crate::config::Slot, Refused> {
        let target = self.configured(slot)?.clone();
        let booted = system::booted_slot(&self.config)
            .map_err(|e| Refused::new(ReasonCode::NotReady, e.to_string()))?;
        system::refuse_running_system(slot, &booted, &target.device)?;
        Ok(target)
    }

    fn write(
        &mut self,
        slot: &Bootname,
        release: &str,
        resume_from: u64,
        image_stream: OwnedFd,
        control: &UnixStream,
    ) -> Result<(), Refused> {
        let (verified, image, sha256) = self.verify(release)?;
        let target = self.begin_write(slot)?;
        let slot_stream = SlotStream::open(SlotStreamRequest {
            slot_path: target.device.clone(),
            slot_capacity: target.capacity(),
            size: image.size,
            sha256,
            resume_from,
            checkpoint_interval: self.config.install.checkpoint_interval,
            stall_timeout: self.config.install.stall_timeout,
            readback_overlap: self
                .config
                .install
                .readback_overlap
                .for_slot(&target.device),
            image,
            work_dir: self.work_dir(),
        })
        .map_err(transfer_refused)?;
        let replies = WriteReplies(control);
        if slot_stream.start() > 0 {
            tracing::info!(
                "installer: write of slot {slot} resumes at byte {} (re-hashed)",
                slot_stream.start()
            );
        }
        replies.ready(slot_stream.start())?;
        let mut events = |event| replies.progress(event);
        if let Err(e) = slot_stream.run(File::from(image_stream), &mut events) {
            // Bytes that were refused go. A stream that stopped early (the network, the daemon
            // gone) keeps its checkpoint for the resume: the ledger keeps the slot unverified,
            // and so unbootable, meanwhile.
            if matches!(
                e.reason(),
                ReasonCode::HashMismatch | ReasonCode::ReadbackMismatch | ReasonCode::SizeMismatch
            ) {
                wipe_head(&target.device, slot);
            }
            return Err(transfer_refused(e));
        }
        self.record_verified(slot, &verified)?;
        tracing::info!(
            "installer: slot {slot} holds release {} (sha256 {})",
            verified.release_id(),
            hex::encode(sha256)
        );
        Ok(())
    }

    /// A delta update: the installer reads the local slots (the target and the booted one) for
    /// blocks to reuse, and takes from the daemon only the store's bytes it asks for; every block
    /// is checked against the index its own verified release binds, and the slot read back.
    fn write_delta(
        &mut self,
        slot: &Bootname,
        release: &str,
        ranges_per_request: u32,
        image_stream: OwnedFd,
        control: &UnixStream,
    ) -> Result<(), Refused> {
        let (verified, image, _) = self.verify(release)?;
        if image.chunks.is_none() {
            return Err(Refused::new(
                ReasonCode::InvalidRequest,
                "a delta of an image without a block index",
            ));
        }
        let booted = system::booted_slot(&self.config).ok().and_then(|name| {
            let device = self.config.slot_by_bootname(&name)?.device.clone();
            let key = system::boot_id(&self.config)
                .ok()
                .map(|id| crate::transfer::booted_table_key(id.as_str(), &device));
            Some(crate::transfer::BootedSlot { path: device, key })
        });
        let target = self.begin_write(slot)?;
        let replies = WriteReplies(control);
        replies.ready(0)?;
        let mut events = |event| replies.progress(event);
        let request = crate::transfer::DeltaStreamRequest {
            image,
            slot_path: target.device.clone(),
            slot_capacity: target.capacity(),
            checkpoint_interval: self.config.install.checkpoint_interval,
            stall_timeout: self.config.install.stall_timeout,
            work_dir: self.work_dir(),
            booted,
            ranges_per_request: ranges_per_request as usize,
            readback_overlap: self
                .config
                .install
                .readback_overlap
                .for_slot(&target.device),
        };
        let (written, stats) =
            crate::transfer::receive_delta(&request, &File::from(image_stream), &mut events)
                .map_err(transfer_refused)?;
        self.record_verified(slot, &verified)?;
        tracing::info!(
            "installer: slot {slot} holds release {} (sha256 {}) by delta: {} bytes of the store received in {} requests, {} blocks reused",
            verified.release_id(),
            hex::encode(written.sha256),
            stats.downloaded,
            stats.requests,
            stats.assembly.copied_blocks + stats.assembly.kept_blocks,
        );
        Ok(())
    }

    /// Activates `slot` only when it holds the image of a release this installer verified
    /// itself: written and read back by this process, or else read back from the medium now.
    fn activate(&mut self, slot: &Bootname, release: &str) -> Result<(), Refused> {
        let (verified, image, sha256) = self.verify(release)?;
        let target = self.configured(slot)?;
        if self.written.get(slot) != Some(&verified.id) {
            verify_slot(&target.device, image.size, &sha256)
                .map_err(|e| Refused::new(e.reason(), e.to_string()))?;
        }
        self.ledger_verified(slot, &verified)?;
        self.local.mark_active_now(slot).map_err(Refused::from)
    }

    fn reboot(&self) -> Result<(), Refused> {
        self.local
            .reboot_now()
            .map_err(|e| Refused::new(ReasonCode::RebootFailed, e.message))
    }
}

/// The daemon's side of a write: the installer's replies go back on the request's connection.
struct WriteReplies<'a>(&'a UnixStream);

impl WriteReplies<'_> {
    fn send(&self, reply: &Reply) -> std::io::Result<()> {
        send_frame(self.0, reply, None, Instant::now() + REQUEST_TIMEOUT)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Asks the daemon for the image's bytes from `start` on.
    fn ready(&self, start: u64) -> Result<(), Refused> {
        self.send(&Reply::Ready { start })
            .map_err(|e| Refused::new(ReasonCode::Cancelled, e.to_string()))
    }

    /// Passes the write's progress on, as the daemon hears it ([`reply_for`]).
    fn progress(&self, event: TransferEvent) -> std::io::Result<()> {
        reply_for(event).map_or(Ok(()), |reply| self.send(&reply))
    }
}

fn transfer_refused(e: crate::transfer::TransferError) -> Refused {
    Refused::new(e.reason(), e.to_string())
}

/// What the daemon hears of a write's progress. The installer downloads nothing (the stream
/// brings it the image or the store's ranges; the daemon counts what it fetched), so it has no
/// download count to pass on.
fn reply_for(event: TransferEvent) -> Option<Reply> {
    match event {
        TransferEvent::Progress { written, total } => Some(Reply::Progress { written, total }),
        TransferEvent::Checkpoint { durable } => Some(Reply::Checkpoint { durable }),
        TransferEvent::Verifying => Some(Reply::Verifying),
        TransferEvent::Downloaded { .. } => None,
    }
}

fn ledger_failed(e: std::io::Error) -> Refused {
    Refused::new(
        ReasonCode::SlotIo,
        format!("cannot record the installer's ledger: {e}"),
    )
}

/// Overwrites the head of a slot whose new bytes were refused (see [`WIPED_HEAD`]) and syncs
/// it. Best effort: the slot is marked bad and recorded unverified either way.
fn wipe_head(device: &std::path::Path, slot: &Bootname) {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .and_then(|mut file| {
            let len = file.seek(SeekFrom::End(0))?.min(WIPED_HEAD);
            file.write_all_at(&vec![0u8; len as usize], 0)?;
            file.sync_data()?;
            Ok(len)
        });
    match result {
        Ok(len) => tracing::warn!(
            "installer: the first {len} bytes of slot {slot} overwritten with zeros: its new bytes were refused"
        ),
        Err(e) => tracing::error!(
            "installer: cannot overwrite the head of slot {slot} ({}) after refusing its bytes: {e}; it stays marked bad and unverified",
            device.display()
        ),
    }
}

fn resolve_user(settings: &InstallerConfig) -> Result<(Uid, Option<Gid>), ServeError> {
    super::daemon_user(settings)
        .ok_or_else(|| ServeError::UnknownUser(settings.daemon_user.clone()))
}

/// The listening socket systemd passes when `update-agent-installer.socket` activates the
/// service: fd 3, announced by `LISTEN_FDS=1` for this process's `LISTEN_PID`.
fn inherited_listener() -> Option<UnixListener> {
    let pid = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?.parse::<u32>().ok()?;
    if pid != std::process::id() || fds != 1 {
        return None;
    }
    // SAFETY: systemd hands this process fd 3 as its listening socket (sd_listen_fds(3)); the
    // variables checked above say it is ours, and nothing else in the process took it.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    Some(UnixListener::from(fd))
}

/// The image stream a write or a delta write came with: present, and a stream socket.
fn image_stream(fd: Option<OwnedFd>) -> Result<OwnedFd, Refused> {
    let stream_fd = fd.ok_or_else(|| {
        Refused::new(ReasonCode::InvalidRequest, "a write needs the image stream")
    })?;
    super::check_stream_socket(&stream_fd)
        .map_err(|e| Refused::new(ReasonCode::InvalidRequest, e.to_string()))?;
    Ok(stream_fd)
}
