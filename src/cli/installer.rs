//! `installer`: the privileged role of the least-privilege split (root; slots, bootloader
//! environment, reboot), and the hidden `installer-request`, which sends one hand-made request
//! to it (for the split's tests and for debugging a device: what the installer answers, and why).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use update_agent::config::Config;
use update_agent::engine::Bootname;
use update_agent::installer::server::Installer;
use update_agent::installer::{
    MAX_REPLY, Op, PROTOCOL_VERSION, Reply, Request, image_stream_pair, recv_frame, send_all,
    send_frame,
};
use update_agent::logging::LogTarget;

use super::install::DEFAULT_CONFIG;
use super::{EXIT_ERROR, EXIT_REFUSED};

#[derive(clap::Args)]
pub struct InstallerArgs {
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Where diagnostics go: the journal when its socket exists (auto), the journal, or stderr
    #[arg(long, value_enum, default_value = "auto")]
    pub log: LogTarget,
}

pub fn serve(args: InstallerArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let mut installer = Installer::open(config)?;
    let listener = installer.listener()?;
    installer
        .serve(listener)
        .context("the installer's socket failed")?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Kind {
    Write,
    Activate,
    MarkBad,
    MarkGood,
    Reboot,
}

#[derive(clap::Args)]
pub struct RequestArgs {
    /// The installer's socket
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum)]
    op: Kind,
    #[arg(long, default_value = "B")]
    slot: Bootname,
    /// The signed release (write, activate)
    #[arg(long)]
    release: Option<PathBuf>,
    /// The raw image bytes to stream (write), sent from the offset the installer names
    #[arg(long)]
    image: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    resume_from: u64,
    /// The block index to send ahead of the image (write); none by default
    #[arg(long)]
    index: Option<PathBuf>,
    #[arg(long, default_value_t = PROTOCOL_VERSION)]
    protocol_version: u32,
}

/// Prints the installer's final answer as one line of JSON; exits 0 on `done`, 1 on `refused`.
pub fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let release = match &args.release {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => String::new(),
    };
    let slot = args.slot.clone();
    let op = match args.op {
        Kind::Write => Op::Write {
            slot,
            release,
            resume_from: args.resume_from,
        },
        Kind::Activate => Op::Activate { slot, release },
        Kind::MarkBad => Op::MarkBad { slot },
        Kind::MarkGood => Op::MarkGood { slot },
        Kind::Reboot => Op::Reboot,
    };
    let request = Request {
        version: args.protocol_version,
        op,
    };
    let control = UnixStream::connect(&args.socket)
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    // Long enough for a write and its read-back in the tests; a request nobody answers fails.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = match args.op {
        Kind::Write => {
            let (ours, theirs) = image_stream_pair()?;
            let sent = send_frame(&control, &request, Some(theirs.as_fd()), deadline);
            drop(theirs);
            // A refusal may come before the request was all sent: the answer tells why.
            let (reply, _) = recv_frame::<Reply>(&control, MAX_REPLY, deadline).map_err(|e| {
                sent.err()
                    .map_or_else(|| anyhow::Error::from(e), Into::into)
            })?;
            if let Reply::Ready { start } = reply {
                let index = match &args.index {
                    Some(path) => std::fs::read(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    None => Vec::new(),
                };
                let mut head = (index.len() as u64).to_le_bytes().to_vec();
                head.extend_from_slice(&index);
                let _ = send_all(&ours, &head);
                let path = args.image.as_ref().context("a write needs --image")?;
                let mut image = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let start = usize::try_from(start)?.min(image.len());
                // The installer may refuse midway and close its end: what it answers counts.
                let _ = send_all(&ours, &image.split_off(start));
            }
            drop(ours);
            reply
        }
        _ => {
            let sent = send_frame(&control, &request, None, deadline);
            recv_frame::<Reply>(&control, MAX_REPLY, deadline)
                .map_err(|e| {
                    sent.err()
                        .map_or_else(|| anyhow::Error::from(e), Into::into)
                })?
                .0
        }
    };
    while !last.is_final() {
        last = recv_frame::<Reply>(&control, MAX_REPLY, deadline)?.0;
    }
    println!("{}", serde_json::to_string(&last)?);
    Ok(match last {
        Reply::Done => ExitCode::SUCCESS,
        Reply::Refused { .. } => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::from(EXIT_ERROR),
    })
}
