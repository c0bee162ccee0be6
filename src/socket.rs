//! Non-blocking socket sends and waits with deadlines, for the least-privilege split's sockets
//! (the installer's frames and the image stream the transfer writes into): no `SIGPIPE` when
//! the peer went away, and no wait past a deadline or a stall, whatever the peer does.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::MsgFlags;

/// How long a send may make no progress before it fails (`send_all`: the image stream, whose
/// reader syncs checkpoints to slow storage between reads).
pub const SEND_STALL: Duration = Duration::from_secs(300);

/// Waits until `socket` is ready for `events` or `deadline` passes (`TimedOut`). Every wait of
/// the split's sockets goes through here: a peer cannot hold either side past a deadline.
pub fn wait_ready(socket: &impl AsFd, events: PollFlags, deadline: Instant) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not keep up with the deadline",
            ));
        }
        let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(socket.as_fd(), events)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => {}
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends all of `bytes` on a socket, without `SIGPIPE` when the peer went away (the CLI restores
/// the default `SIGPIPE` disposition, which would end the process), and failing when the peer
/// takes nothing for [`SEND_STALL`].
pub fn send_all(socket: &impl AsFd, bytes: &[u8]) -> io::Result<()> {
    send_all_within(socket, bytes, None)
}

/// [`send_all`] that also fails once `deadline` passes.
pub fn send_all_within(
    socket: &impl AsFd,
    mut bytes: &[u8],
    deadline: Option<Instant>,
) -> io::Result<()> {
    let raw = socket.as_fd().as_raw_fd();
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    let mut stall = Instant::now() + SEND_STALL;
    while !bytes.is_empty() {
        match nix::sys::socket::send(raw, bytes, flags) {
            Ok(n) => {
                bytes = &bytes[n..];
                stall = Instant::now() + SEND_STALL;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                let until = deadline.map_or(stall, |deadline| deadline.min(stall));
                wait_ready(socket, PollFlags::POLLOUT, until)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
