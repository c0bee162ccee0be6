//! The least-privilege split: a small privileged installer (`update-agent installer`, root) owns
//! the slots, the bootloader environment and the reboot; the daemon, which parses everything
//! that comes from the network, runs as an unprivileged user and asks the installer over a Unix
//! socket.
//!
//! - [`server`]: the installer role. It serves only the configured daemon user (the peer's
//!   credentials, `SO_PEERCRED`), verifies every release it is handed against its own trust
//!   anchor, hashes the image bytes it writes itself, never writes the booted slot, and activates
//!   only a slot it has just read back and found to hold that release's image.
//! - [`client`]: the daemon's side ([`RemoteInstaller`]).
//! - `ledger`: what the installer itself knows of each slot's bytes (verified, unverified, seen
//!   booted) and its own anti-rollback floor. It refuses every request that would let the
//!   bootloader choose a slot whose bytes it did not verify (see `ledger` for the rule).
//!
//! # Wire format (version [`PROTOCOL_VERSION`])
//!
//! One request per connection. A frame is a 4-byte big-endian length and that many bytes of
//! JSON: a [`Request`] (at most [`MAX_REQUEST`] bytes) from the daemon, then [`Reply`] frames
//! (each at most [`MAX_REPLY`]) from the installer, the last of them `done` or `refused`. A
//! `write` request carries one file descriptor (`SCM_RIGHTS`): the receiving end of a socket
//! pair the daemon sends into, after the installer's `ready`: the release's block index as the
//! daemon checked it (8-byte little-endian length, 0 for none, then its bytes), then the raw
//! image bytes from the offset `ready` names. A `write-delta` request carries one too: over it the daemon sends the block index,
//! the installer (which alone reads the slots) answers with the store ranges it needs, and the
//! daemon sends their bytes (`transfer::receive_delta`).

pub mod client;
pub(crate) mod ledger;
pub mod server;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use nix::poll::PollFlags;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::engine::Bootname;
use crate::reason::ReasonCode;
use crate::socket::{send_all_within, wait_ready};

pub use crate::socket::send_all;

pub use client::RemoteInstaller;

/// The daemon's user (`[installer] daemon_user`, a name or a numeric uid) and, when it has an
/// entry in the user database, its primary group. `None`: no such user.
pub fn daemon_user(
    settings: &crate::config::InstallerConfig,
) -> Option<(nix::unistd::Uid, Option<nix::unistd::Gid>)> {
    use nix::unistd::{Uid, User};
    let name = &settings.daemon_user;
    if let Ok(uid) = name.parse::<u32>() {
        let uid = Uid::from_raw(uid);
        let gid = User::from_uid(uid).ok().flatten().map(|user| user.gid);
        return Some((uid, gid));
    }
    let user = User::from_name(name).ok().flatten()?;
    Some((user.uid, Some(user.gid)))
}

/// 2: a `write` stream opens with the block index (or a length of 0), for the installer's
/// read-back against it. An installer refuses a request of another version, naming both.
pub const PROTOCOL_VERSION: u32 = 2;
/// A request holds at most a release (64 KiB of JSON) and a few names.
pub const MAX_REQUEST: usize = 256 * 1024;
/// A reply holds a reason code and a sentence.
pub const MAX_REPLY: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub op: Op,
}

/// What the daemon asks for. Slots are bootnames (a request naming anything else does not parse);
/// a release is the signed envelope as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Op {
    MarkBad {
        slot: Bootname,
    },
    MarkGood {
        slot: Bootname,
    },
    /// Read `slot` back, and if it holds the release's image, tell the bootloader to try it.
    Activate {
        slot: Bootname,
        release: String,
    },
    /// Write the release's image into `slot` from the stream passed with the request.
    Write {
        slot: Bootname,
        release: String,
        resume_from: u64,
    },
    /// A delta update of `slot` (docs/wire-formats.md, installer protocol): over the stream
    /// passed with the request the daemon sends the block index, the installer asks for the
    /// store's ranges it finds in no local slot, the daemon sends their bytes.
    /// `ranges_per_request`: what the daemon found the server to answer (1: single ranges).
    WriteDelta {
        slot: Bootname,
        release: String,
        ranges_per_request: u32,
    },
    Reboot,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::MarkBad { .. } => "mark-bad",
            Op::MarkGood { .. } => "mark-good",
            Op::Activate { .. } => "activate",
            Op::Write { .. } => "write",
            Op::WriteDelta { .. } => "write-delta",
            Op::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    /// Carried out.
    Done,
    /// `write`: send the image bytes from `start` on (the slot holds, and the installer
    /// re-hashed, everything before).
    Ready {
        start: u64,
    },
    Progress {
        written: u64,
        total: u64,
    },
    /// `[0, durable)` of the slot is synced and hashed.
    Checkpoint {
        durable: u64,
    },
    /// All bytes written and their hash matched; the read-back starts.
    Verifying,
    Refused {
        reason: ReasonCode,
        message: String,
    },
}

impl Reply {
    pub fn is_final(&self) -> bool {
        matches!(self, Reply::Done | Reply::Refused { .. })
    }
}

/// Why a frame could not be exchanged.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("more file descriptors than expected came with the frame")]
    TooManyFds,
}

/// Sends one frame, with `fd` attached to its first byte, all of it before `deadline`.
pub fn send_frame(
    socket: &impl AsFd,
    message: &impl Serialize,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    deadline: Instant,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let raw = socket.as_fd().as_raw_fd();
    let sent = match fd {
        Some(fd) => {
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            loop {
                match sendmsg::<()>(
                    raw,
                    &[IoSlice::new(&frame)],
                    &cmsg,
                    MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(n) => break n,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => {
                        wait_ready(socket, PollFlags::POLLOUT, deadline)?;
                    }
                    Err(e) => return Err(io::Error::from(e).into()),
                }
            }
        }
        None => 0,
    };
    send_all_within(&socket.as_fd(), &frame[sent..], Some(deadline))?;
    Ok(())
}

/// Receives one frame of at most `max` bytes, and the file descriptor that came with it, if any:
/// all of it before `deadline` (a peer that sends a byte at a time gets no more time than one
/// that sends nothing). Reads never block: `poll`, then a read with `MSG_DONTWAIT`, so that no
/// socket option the peer chose (`SO_RCVLOWAT`) can hold this side in the kernel.
pub fn recv_frame<T: DeserializeOwned>(
    socket: &impl AsFd,
    max: usize,
    deadline: Instant,
) -> Result<(T, Option<OwnedFd>), FrameError> {
    let raw = socket.as_fd().as_raw_fd();
    let mut header = [0u8; 4];
    let mut fd = None;
    let mut got = 0;
    // The descriptor rides on the frame's first byte: take it with the header.
    while got < header.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let (n, truncated, fds) = {
            let mut iov = [IoSliceMut::new(&mut header[got..])];
            let message = loop {
                match recvmsg::<()>(
                    raw,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(message) => break message,
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(nix::errno::Errno::EAGAIN) => {
                        wait_ready(socket, PollFlags::POLLIN, deadline)?;
                    }
                    Err(e) => return Err(io::Error::from(e).into()),
                }
            };
            let mut fds = Vec::new();
            for control in message.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = control {
                    fds.extend(received);
                }
            }
            (
                message.bytes,
                message.flags.contains(MsgFlags::MSG_CTRUNC),
                fds,
            )
        };
        // SAFETY: SCM_RIGHTS gave this process these descriptors; nothing else owns them.
        let mut owned: Vec<OwnedFd> = fds
            .into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if truncated || owned.len() > 1 || (fd.is_some() && !owned.is_empty()) {
            return Err(FrameError::TooManyFds);
        }
        if let Some(received) = owned.pop() {
            fd = Some(received);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match nix::sys::socket::recv(raw, &mut body[filled..], MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => wait_ready(socket, PollFlags::POLLIN, deadline)?,
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    let message = serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(bounded(&e)))?;
    Ok((message, fd))
}

/// A new image stream: the end the daemon keeps and the end it passes with a write request.
/// Close-on-exec, so the installer's children never hold it open.
pub fn image_stream_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Checks that a descriptor the daemon passed is a stream socket (the image stream), not a
/// file, pipe or device whose reads could block or mean something else.
pub fn check_stream_socket(fd: &impl AsFd) -> io::Result<()> {
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(io::Error::from)?;
    let is_socket = nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode)
        .contains(nix::sys::stat::SFlag::S_IFSOCK);
    let stream = is_socket
        && nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::SockType)
            .is_ok_and(|kind| kind == nix::sys::socket::SockType::Stream);
    if stream {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptor passed with the request is not a stream socket",
        ))
    }
}

fn bounded(error: &serde_json::Error) -> String {
    crate::release::escape_for_log(&error.to_string(), 240)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn a_frame_carries_its_descriptor_and_is_bounded() {
        let (a, b) = UnixStream::pair().unwrap();
        let (keep, passed) = UnixStream::pair().unwrap();
        let request = Request {
            version: PROTOCOL_VERSION,
            op: Op::Write {
                slot: Bootname::new("B").unwrap(),
                release: "{}".into(),
                resume_from: 7,
            },
        };
        send_frame(&a, &request, Some(passed.as_fd()), soon()).unwrap();
        let (got, fd): (Request, _) = recv_frame(&b, MAX_REQUEST, soon()).unwrap();
        assert_eq!(got, request);
        let fd = fd.expect("the descriptor came along");
        drop(passed);
        send_all(&fd, b"xy").unwrap();
        let mut two = [0u8; 2];
        std::io::Read::read_exact(&mut (&keep), &mut two).unwrap();
        assert_eq!(&two, b"xy");

        send_frame(&a, &Reply::Done, None, soon()).unwrap();
        let result: Result<(Reply, _), _> = recv_frame(&b, 4, soon());
        assert!(matches!(result, Err(FrameError::TooLarge { max: 4, .. })));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let result = receive(br#"{"version":2,"op":{"kind":"reboot"},"extra":1}"#);
        assert!(matches!(result, Err(FrameError::Malformed(_))));
    }

    /// A slot is a bootname from the first byte the installer parses: a path, a word the boot
    /// scripts would misread or an empty name never reaches a lookup, a log line or a message
    /// unchecked.
    #[test]
    fn a_slot_that_is_not_a_bootname_is_malformed() {
        for slot in ["../../dev/sda", "B;reboot", "", "1A", "B\\u001b[2J"] {
            let body = format!(r#"{{"version":2,"op":{{"kind":"mark-good","slot":"{slot}"}}}}"#);
            match receive(body.as_bytes()) {
                Err(FrameError::Malformed(why)) => {
                    assert!(why.contains("slot bootname"), "{slot}: {why}");
                    assert!(!why.contains('\u{1b}'), "{slot}: escaped: {why}");
                }
                other => panic!("{slot}: {other:?}"),
            }
        }
        let good = receive(br#"{"version":2,"op":{"kind":"mark-good","slot":"system0"}}"#);
        assert_eq!(
            good.unwrap().0.op,
            Op::MarkGood {
                slot: Bootname::new("system0").unwrap()
            }
        );
    }

    /// `body` framed, sent and received as a request.
    fn receive(body: &[u8]) -> Result<(Request, Option<OwnedFd>), FrameError> {
        let (a, b) = UnixStream::pair().unwrap();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        send_all(&a, &frame).unwrap();
        recv_frame(&b, MAX_REQUEST, soon())
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn a_frame_sent_a_byte_at_a_time_gets_no_more_than_the_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        let body = br#"{"version":2,"op":{"kind":"reboot"}}"#;
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        // A slow peer: half the frame now, the rest never.
        send_all(&a, &frame[..frame.len() / 2]).unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        let result: Result<(Request, _), _> = recv_frame(&b, MAX_REQUEST, deadline);
        assert!(
            matches!(&result, Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::TimedOut),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn only_a_stream_socket_passes_as_the_image_stream() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(check_stream_socket(&a).is_ok());
        let file = tempfile::tempfile().unwrap();
        assert!(check_stream_socket(&file).is_err());
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(check_stream_socket(&r).is_err());
    }
}
