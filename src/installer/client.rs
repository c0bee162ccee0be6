//! The daemon's side of the split: asks the privileged installer, over its socket, for what the
//! unprivileged daemon may not do itself.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{FrameError, MAX_REPLY, Op, PROTOCOL_VERSION, Reply, Request, recv_frame, send_frame};
use crate::engine::{Bootname, Failure};
use crate::reason::ReasonCode;
use crate::slot_control::{
    Events, Pending, RebootError, Release, SlotControl, SlotWrite, WriteError,
};
use crate::transfer::{FetchSettings, TransferError, TransferEvent, send_image};

/// Longest wait for the answer to a bootloader change or a reboot (the installer bounds its
/// bootloader tools and reboot command well below this), and for a request to be taken.
const SHORT_ANSWER: Duration = Duration::from_secs(120);
/// Longest wait for an answer that comes after the installer read a whole slot (the re-hash
/// before `ready`, the read-back after `verifying`, an activation's read-back), and for the next
/// frame of a write (progress comes every second while bytes flow; the installer's own stall
/// timeout ends a write that gets none). A hung installer fails the request after this, with
/// `installer-unavailable`, instead of holding the daemon forever.
const LONG_ANSWER: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone)]
pub struct RemoteInstaller {
    socket: PathBuf,
    /// [`SHORT_ANSWER`] and [`LONG_ANSWER`]; shorter in this module's tests.
    short: Duration,
    long: Duration,
}

impl RemoteInstaller {
    pub fn new(socket: impl Into<PathBuf>) -> RemoteInstaller {
        RemoteInstaller {
            socket: socket.into(),
            short: SHORT_ANSWER,
            long: LONG_ANSWER,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A bootloader change or the reboot: one request, one answer. Blocking.
    pub fn call(&self, op: Op) -> Result<(), Failure> {
        let wait = match op {
            // Activation reads the whole slot back first.
            Op::Activate { .. } => self.long,
            _ => self.short,
        };
        let stream = self.send(op, None)?;
        match recv_frame::<Reply>(&stream, MAX_REPLY, Instant::now() + wait) {
            Ok((Reply::Done, _)) => Ok(()),
            Ok((Reply::Refused { reason, message }, _)) => Err(refused(reason, &message)),
            Ok((other, _)) => Err(self.unavailable(&format!("unexpected answer {other:?}"))),
            Err(e) => Err(self.unavailable(&e)),
        }
    }

    fn send(&self, op: Op, fd: Option<std::os::fd::BorrowedFd<'_>>) -> Result<UnixStream, Failure> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| self.unavailable(&e))?;
        let request = Request {
            version: PROTOCOL_VERSION,
            op,
        };
        if let Err(e) = send_frame(&stream, &request, fd, Instant::now() + self.short) {
            // The installer refuses a caller before reading its request: its answer says why.
            return match recv_frame::<Reply>(&stream, MAX_REPLY, Instant::now() + self.short) {
                Ok((Reply::Refused { reason, message }, _)) => Err(refused(reason, &message)),
                _ => Err(self.unavailable(&e)),
            };
        }
        Ok(stream)
    }

    fn unavailable(&self, error: &dyn std::fmt::Display) -> Failure {
        Failure::new(
            ReasonCode::InstallerUnavailable,
            format!("installer at {}: {error}", self.socket.display()),
        )
    }

    /// Has the installer write the release's image into the slot: the installer re-hashes the
    /// slot up to `resume_from` and names where the stream starts; this side fetches (as
    /// [`crate::transfer::WriteRequest::fetch_settings`] says) and decompresses from there and
    /// sends the image bytes. Progress, checkpoints (the installer's, after its `fdatasync`)
    /// and the start of the read-back reach `events`.
    pub async fn write_image(
        &self,
        write: SlotWrite<'_>,
        events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
    ) -> Result<(), WriteError> {
        let (slot, release) = (write.slot, write.release.signed);
        let (image, resume_from) = (&write.request.image, write.request.resume_from);
        let settings = &write.request.fetch_settings();
        // The block index, checked against the manifest here (a bad one falls back, or
        // fails, before the slot is touched): for a delta, else sent ahead of the whole image
        // for the installer's read-back, block by block on its pool.
        let mut index = None;
        if let (Some(work_dir), Some(_)) = (&settings.delta_work_dir, &image.chunks) {
            match crate::transfer::fetch_checked_index(image, settings, work_dir).await {
                // Nothing to save on a local file: the whole image goes (`transfer::is_local`).
                Ok(checked) if crate::transfer::is_local(image) => index = Some(checked),
                fetched => {
                    let offered = match fetched {
                        Ok(checked) => crate::transfer::offer_delta(checked, settings)
                            .await
                            .map_err(|(e, checked)| (e, Some(checked))),
                        Err(e) => Err((e, None)),
                    };
                    match offered {
                        Ok(offer) => {
                            return self
                                .write_delta(slot, release, offer, settings, work_dir, events)
                                .await;
                        }
                        Err((e, _)) if e.is_transient() => return Err(WriteError::Transfer(e)),
                        Err((e, checked)) if settings.full_download_fallback => {
                            tracing::warn!(
                                "no delta update ({e}); the whole image goes to the installer, as [install] full_download_fallback allows"
                            );
                            index = checked;
                        }
                        Err((e, _)) => return Err(WriteError::Transfer(e)),
                    }
                }
            }
        }
        // A zstd decoder cannot restart in the middle of its output: a compressed image is
        // always sent from 0, and the installer must expect it so.
        let resume_from = if image.compression.is_some() {
            0
        } else {
            resume_from
        };
        let op = Op::Write {
            slot: slot.clone(),
            release: release.to_string(),
            resume_from,
        };
        let (control, start, ours) = self.open_write(op).await?;
        let count = crate::transfer::DownloadCount::default();
        let producer = send_image(image, start, settings, index, File::from(ours), &count);
        self.converse(control, producer, &count, events).await
    }

    /// A delta: the installer reads the slots and asks for the store's ranges it lacks; this
    /// side sends the index and those ranges (`transfer::serve_delta`), and counts the bytes it
    /// downloads for the progress reports (the installer sees only what it was sent).
    async fn write_delta(
        &self,
        slot: &Bootname,
        release: &str,
        offer: crate::transfer::DeltaOffer,
        settings: &FetchSettings,
        work_dir: &Path,
        events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
    ) -> Result<(), WriteError> {
        let op = Op::WriteDelta {
            slot: slot.clone(),
            release: release.to_string(),
            ranges_per_request: offer.ranges_per_request as u32,
        };
        let (control, _, ours) = self.open_write(op).await?;
        let count = crate::transfer::DownloadCount::default();
        let producer = async {
            crate::transfer::serve_delta(
                offer,
                UnixStream::from(ours),
                work_dir,
                settings.server.max_rate,
                &count,
            )
            .await
            .map(|downloaded| {
                tracing::info!("delta: {downloaded} bytes downloaded for the installer");
            })
        };
        self.converse(control, producer, &count, events).await
    }

    /// Sends a write request with one end of a new socket pair and waits for `ready` (the
    /// installer may read a whole slot first). Returns the control connection, where the
    /// stream starts, and this side's end of the pair.
    async fn open_write(
        &self,
        op: Op,
    ) -> Result<(UnixStream, u64, std::os::fd::OwnedFd), WriteError> {
        let unavailable = |e: &dyn std::fmt::Display| WriteError::Installer(self.unavailable(e));
        let (ours, theirs) = super::image_stream_pair().map_err(|e| unavailable(&e))?;
        let this = self.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let control = this.send(op, Some(theirs.as_fd()))?;
            drop(theirs);
            // Re-hashing the slot up to the checkpoint comes before `ready`.
            match recv_frame::<Reply>(&control, MAX_REPLY, Instant::now() + this.long) {
                Ok((Reply::Ready { start }, _)) => Ok((control, start)),
                Ok((Reply::Refused { reason, message }, _)) => Err(refused(reason, &message)),
                Ok((other, _)) => Err(this.unavailable(&format!("unexpected answer {other:?}"))),
                Err(e) => Err(this.unavailable(&e)),
            }
        })
        .await
        .map_err(|e| unavailable(&e))?;
        let (control, start) = opened.map_err(WriteError::Installer)?;
        Ok((control, start, ours))
    }

    /// Runs `producer` (what feeds the image stream) while passing the installer's replies on
    /// to `events`, until the installer's last word. The bytes the producer downloaded
    /// (`count`) go to `events` too, every progress interval while they change and before each
    /// of the installer's progress reports: the installer sees only what it is sent.
    async fn converse(
        &self,
        control: UnixStream,
        producer: impl std::future::Future<Output = Result<(), TransferError>>,
        count: &crate::transfer::DownloadCount,
        events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send),
    ) -> Result<(), WriteError> {
        let mut reported = None;
        let mut report_download =
            |events: &mut (dyn FnMut(TransferEvent) -> io::Result<()> + Send)| {
                let downloaded = count.downloaded.load(Ordering::Relaxed);
                if reported == Some(downloaded) {
                    return Ok(());
                }
                reported = Some(downloaded);
                events(TransferEvent::Downloaded {
                    downloaded,
                    expected: count.expected.load(Ordering::Relaxed),
                })
                .map_err(cancelled)
            };
        let mut ticks = tokio::time::interval(crate::transfer::PROGRESS_INTERVAL);
        let unavailable = |e: &dyn std::fmt::Display| WriteError::Installer(self.unavailable(e));
        let (replies_tx, mut replies) = tokio::sync::mpsc::channel::<Result<Reply, FrameError>>(16);
        let long = self.long;
        std::thread::Builder::new()
            .name("installer-replies".into())
            .spawn(move || {
                loop {
                    let reply = recv_frame::<Reply>(&control, MAX_REPLY, Instant::now() + long)
                        .map(|(reply, _)| reply);
                    let last = !matches!(&reply, Ok(reply) if !reply.is_final());
                    if replies_tx.blocking_send(reply).is_err() || last {
                        return;
                    }
                }
            })
            .map_err(|e| unavailable(&e))?;

        tokio::pin!(producer);
        let mut produced: Option<Result<(), TransferError>> = None;
        let answer = loop {
            tokio::select! {
                result = &mut producer, if produced.is_none() => {
                    produced = Some(result);
                    report_download(events)?;
                }
                _ = ticks.tick(), if produced.is_none() => {
                    report_download(events)?;
                }
                reply = replies.recv() => {
                    let event = match reply {
                        None => break Err(self.unavailable(&"the installer closed the connection")),
                        Some(Err(e)) => break Err(self.unavailable(&e)),
                        Some(Ok(Reply::Done)) => break Ok(()),
                        Some(Ok(Reply::Refused { reason, message })) => {
                            break Err(refused(reason, &message));
                        }
                        Some(Ok(Reply::Progress { written, total })) => {
                            report_download(events)?;
                            TransferEvent::Progress { written, total }
                        }
                        Some(Ok(Reply::Checkpoint { durable })) => {
                            TransferEvent::Checkpoint { durable }
                        }
                        Some(Ok(Reply::Verifying)) => TransferEvent::Verifying,
                        Some(Ok(Reply::Ready { .. })) => {
                            break Err(self.unavailable(&"a second `ready`"));
                        }
                    };
                    events(event).map_err(cancelled)?;
                }
            }
        };
        match (produced, answer) {
            (_, Ok(())) => Ok(()),
            // The network failing is the cause; the installer only saw the stream end early.
            // Not so when sending into the stream failed (the only "slot" this side writes):
            // then the installer went away first, and its end of the conversation says why.
            (Some(Err(e)), Err(_)) if !matches!(e, TransferError::SlotIo { .. }) => {
                Err(WriteError::Transfer(e))
            }
            (_, Err(failure)) => Err(WriteError::Installer(failure)),
        }
    }
}

/// The daemon's control: every operation is a request to the installer, which verifies the
/// release itself and keeps its own ledger of what each slot holds.
impl SlotControl for RemoteInstaller {
    fn mark_bad<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>> {
        Box::pin(self.ask(Op::MarkBad { slot: slot.clone() }))
    }

    fn mark_good<'a>(&'a mut self, slot: &'a Bootname) -> Pending<'a, Result<(), Failure>> {
        Box::pin(self.ask(Op::MarkGood { slot: slot.clone() }))
    }

    /// The installer reads the slot back against the release it verifies itself.
    fn activate<'a>(
        &'a mut self,
        slot: &'a Bootname,
        release: Release<'a>,
    ) -> Pending<'a, Result<(), Failure>> {
        Box::pin(self.ask(Op::Activate {
            slot: slot.clone(),
            release: release.signed.to_string(),
        }))
    }

    fn write<'a>(
        &'a mut self,
        write: SlotWrite<'a>,
        events: Events<'a>,
    ) -> Pending<'a, Result<(), WriteError>> {
        Box::pin(self.write_image(write, events))
    }

    fn reboot(&self) -> Result<(), RebootError> {
        self.call(Op::Reboot).map_err(|failure| RebootError {
            command: vec![format!("installer at {}", self.socket().display())],
            message: failure.message,
        })
    }
}

impl RemoteInstaller {
    /// One request, off the async threads (an activation reads the whole slot).
    fn ask(&self, op: Op) -> impl Future<Output = Result<(), Failure>> + Send + 'static {
        let installer = self.clone();
        async move {
            tokio::task::spawn_blocking(move || installer.call(op))
                .await
                .unwrap_or_else(|e| {
                    Err(Failure::new(
                        ReasonCode::InstallerUnavailable,
                        e.to_string(),
                    ))
                })
        }
    }
}

fn refused(reason: ReasonCode, message: &str) -> Failure {
    Failure::new(
        reason,
        format!(
            "installer refused: {}",
            crate::release::escape_for_log(message, 1024)
        ),
    )
}

fn cancelled(source: io::Error) -> WriteError {
    WriteError::Transfer(TransferError::Cancelled { source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn an_installer_that_broke_off_is_retried_a_refusal_is_not() {
        let broke_off = WriteError::Installer(Failure::new(
            ReasonCode::InstallerUnavailable,
            "installer at /run/update-agent/installer.sock: unexpected end of file",
        ));
        assert!(broke_off.is_transient());
        for reason in [
            ReasonCode::Forbidden,
            ReasonCode::BadSignature,
            ReasonCode::SlotIo,
        ] {
            let refused = WriteError::Installer(Failure::new(reason, "refused"));
            assert!(!refused.is_transient(), "{reason}");
        }
    }

    /// An installer that takes requests and never answers: every call fails at its deadline
    /// with `installer-unavailable` instead of holding the daemon.
    #[test]
    fn a_silent_installer_fails_the_call_at_its_deadline() {
        let (_dir, path) = crate::scratch_path("installer.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || {
            let mut kept = Vec::new();
            for stream in listener.incoming().take(2) {
                kept.push(stream.unwrap());
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        let installer = RemoteInstaller {
            short: Duration::from_millis(300),
            long: Duration::from_millis(600),
            ..RemoteInstaller::new(&path)
        };
        for op in [
            Op::MarkGood {
                slot: Bootname::new("A").unwrap(),
            },
            Op::Activate {
                slot: Bootname::new("B").unwrap(),
                release: "{}".into(),
            },
        ] {
            let started = Instant::now();
            let failure = installer.call(op).unwrap_err();
            assert_eq!(failure.reason, ReasonCode::InstallerUnavailable);
            assert!(started.elapsed() < Duration::from_secs(3), "{failure:?}");
        }
        drop(held);
    }
}
