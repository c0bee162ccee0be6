//! `update-agent demo`: the agent's main job, a whole update cycle, on this machine with nothing
//! but the binary — throwaway keys, two file-backed slots, the file bootloader and a loopback
//! HTTP server in a temporary directory. It narrates for a person and checks every outcome, so
//! it doubles as a smoke test (CI runs it): any surprise makes it exit non-zero.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use update_agent::agent::{Agent, RebootMode, Stop};
use update_agent::bootloader::simulator::{BootSim, SimEnv};
use update_agent::config::Config;
use update_agent::engine::{Phase, TxnState};
use update_agent::keys::{self, KeyId};
use update_agent::reason::ReasonCode;
use update_agent::release::Envelope;
use update_agent::release::build::{digest_image, sign_manifest};
use update_agent::release::manifest::{Disruption, FORMAT, Image, Manifest, Severity};
use update_agent::state_store::StateStore;

use super::install::Narrator;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Work in this directory and keep it afterwards (default: a temporary directory, removed)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the slots in MiB (the image fills three quarters of a slot)
    #[arg(long, default_value_t = 32)]
    slot_mib: u64,
}

const COMPATIBLE: &str = "demo-gateway";

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("update-agent-demo-")
                .tempdir()?;
            temp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(&dir, args.slot_mib))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(dir: &Path, slot_mib: u64) -> anyhow::Result<()> {
    let slot_size = slot_mib.max(2) * 1024 * 1024;
    println!(
        "update-agent demo: a whole update cycle in {}",
        dir.display()
    );

    step("operator", "makes a throwaway release signing key");
    let key = keys::generate_signing_key()?;
    let keys_dir = dir.join("keys.d");
    fs::create_dir_all(&keys_dir)?;
    let (private_key, _) = keys::write_key_pair(&key, &dir.join("release-signing"))?;
    fs::copy(
        dir.join("release-signing.pub"),
        keys_dir.join("release-signing.pub"),
    )?;
    detail(&format!(
        "key id {} (private key {})",
        KeyId::of(&key.verifying_key()).short(),
        private_key.display()
    ));

    step(
        "device",
        "two file-backed slots and the file bootloader; running 1.0 from slot A",
    );
    let slot_a = dir.join("slot-a.img");
    let slot_b = dir.join("slot-b.img");
    write_pattern(&slot_a, slot_size, b"factory 1.0 ")?;
    fs::write(&slot_b, b"")?;
    let bootenv = dir.join("bootenv");
    fs::write(&bootenv, "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\n")?;
    let boot = BootFacts::new(dir)?;
    boot.set("boot-1", "A")?;
    let config_path = dir.join("agent.toml");
    fs::write(
        &config_path,
        config_text(dir, &keys_dir, &slot_a, &slot_b, slot_size),
    )?;
    let config = Config::load(&config_path)?;
    let slot_a_hash = sha256_file(&slot_a)?;
    detail(&format!("config {}", config_path.display()));

    step(
        "operator",
        "builds release 2.0 and serves its image over HTTP on 127.0.0.1",
    );
    let image = dir.join("rootfs-2.0.img");
    write_pattern(&image, slot_size * 3 / 4, b"rootfs 2.0 ")?;
    let server = ImageServer::start(&image).await?;
    let url = format!("http://{}/rootfs-2.0.img", server.addr);
    let release = make_release(&key, &image, &url)?;
    fs::write(dir.join("release-2.0.json"), &release)?;
    detail(&format!(
        "release {} ({} bytes), image at {url}",
        dir.join("release-2.0.json").display(),
        release.len()
    ));

    step("device", "update-agent install release-2.0.json");
    let mut narrator = Narrator::new();
    let mut agent = Agent::open(config.clone(), RebootMode::Defer)?;
    agent.observe_boot(&mut narrator).await?;
    let stop = agent.offer_release(&release, &mut narrator).await?;
    narrator.done();
    ensure!(
        matches!(stop, Ok(Stop::RebootNeeded { ref slot }) if slot == "B"),
        "expected the install to ask for a reboot into B, got {stop:?}"
    );
    ensure!(
        sha256_file(&slot_a)? == slot_a_hash,
        "slot A changed during the install"
    );

    step(
        "device",
        "reboots; the boot script (simulated) picks the slot",
    );
    let booted = BootSim::new(
        SimEnv::File {
            path: bootenv.clone(),
        },
        &["A", "B"],
        3,
    )
    .boot()
    .map_err(anyhow::Error::msg)?;
    ensure!(booted == "B", "the bootloader booted {booted}, expected B");
    boot.set("boot-2", &booted)?;
    detail(&format!("bootloader chose slot {booted} (one try used)"));

    step(
        "device",
        "update-agent boot-check: trial boot, health checks, commit",
    );
    let mut agent = Agent::open(config.clone(), RebootMode::Defer)?;
    agent.observe_boot(&mut narrator).await?;
    narrator.done();
    let state = agent.engine().state();
    ensure!(
        state.phase == Phase::Idle,
        "phase is {}",
        state.phase.name()
    );
    ensure!(
        state.last.as_ref().map(|l| l.result) == Some(TxnState::Committed),
        "the release was not committed: {:?}",
        state.last
    );

    step(
        "attacker",
        "changes one byte of the signed manifest and publishes it",
    );
    let tampered = tamper(&release)?;
    let outcome = agent.offer_release(&tampered, &mut narrator).await?;
    match outcome {
        Err(refusal) if refusal.code == ReasonCode::BadSignature => {
            detail(&format!("refused: {refusal}"));
        }
        other => bail!("the tampered release was not refused as bad-signature: {other:?}"),
    }

    step("summary", "what the operators' event log holds");
    let events = StateStore::open(&config.device.state_dir)?.events()?;
    for event in &events {
        detail(&super::install::describe(event));
    }
    let states: Vec<TxnState> = events.iter().map(|e| e.state).collect();
    use TxnState::*;
    ensure!(
        states
            == [
                Accepted, Writing, Written, Activated, Rebooting, TrialBoot, Committed, Refused
            ],
        "unexpected event sequence {states:?}"
    );
    ensure!(sha256_file(&slot_a)? == slot_a_hash, "slot A changed");
    ensure!(
        sha256_prefix(&slot_b, fs::metadata(&image)?.len())? == sha256_file(&image)?,
        "slot B does not hold the image"
    );
    detail("slot A (the old system) is byte-identical to before; slot B holds 2.0, committed");
    println!(
        "demo passed: install, trial boot, commit, and a tampered release refused and reported"
    );
    server.stop();
    Ok(())
}

fn step(who: &str, what: &str) {
    println!("\n== {who}: {what}");
}

fn detail(text: &str) {
    println!("   {text}");
}

fn config_text(dir: &Path, keys: &Path, a: &Path, b: &Path, size: u64) -> String {
    let p = |path: &Path| path.display().to_string();
    format!(
        r#"# Written by `update-agent demo`: file slots and the file bootloader in {dir}.
[device]
compatible = "{COMPATIBLE}"
state_dir = "{state}"
factory_version = "1.0"

[trust]
keys_dir = "{keys}"
# The demo's keys live in a writable temporary directory; a device's never do.
insecure_writable_anchor = true

[bootloader]
backend = "file"
path = "{bootenv}"

[slots]
a = {{ device = "{a}", bootname = "A", size = {size} }}
b = {{ device = "{b}", bootname = "B", size = {size} }}

[install]
checkpoint_interval = 4194304

[health]
commands = [["true"]]
timeout = 10

[system]
boot_id_path = "{boot_id}"
cmdline_path = "{cmdline}"
reboot_command = ["true"]
"#,
        dir = p(dir),
        state = p(&dir.join("state")),
        keys = p(keys),
        bootenv = p(&dir.join("bootenv")),
        a = p(a),
        b = p(b),
        boot_id = p(&dir.join("boot_id")),
        cmdline = p(&dir.join("cmdline")),
    )
}

/// The kernel facts a real boot would change: the boot id and the slot on the command line.
struct BootFacts {
    boot_id: PathBuf,
    cmdline: PathBuf,
}

impl BootFacts {
    fn new(dir: &Path) -> anyhow::Result<BootFacts> {
        Ok(BootFacts {
            boot_id: dir.join("boot_id"),
            cmdline: dir.join("cmdline"),
        })
    }

    fn set(&self, boot_id: &str, slot: &str) -> anyhow::Result<()> {
        fs::write(&self.boot_id, format!("{boot_id}\n"))?;
        fs::write(
            &self.cmdline,
            format!("console=ttyS0 update_agent.slot={slot}\n"),
        )?;
        Ok(())
    }
}

fn make_release(
    key: &ed25519_dalek::SigningKey,
    image: &Path,
    url: &str,
) -> anyhow::Result<Vec<u8>> {
    let digest = digest_image(image, None)?;
    let manifest = Manifest {
        format: FORMAT,
        version: "2.0".into(),
        security_version: 2,
        compatible: COMPATIBLE.into(),
        created: Timestamp::now(),
        expires: None,
        security: true,
        severity: Severity::High,
        advisory: "Fixes a remote code execution in the demo's web UI.".into(),
        disruption: Disruption {
            reboot: true,
            downtime_seconds: 60,
        },
        deadline: None,
        images: [(
            "rootfs".to_string(),
            Image {
                url: url.into(),
                size: digest.size,
                sha256: hex::encode(digest.sha256),
                compression: None,
                transport_size: None,
                transport_sha256: None,
                chunks: None,
            },
        )]
        .into_iter()
        .collect(),
    };
    let envelope = sign_manifest(&manifest, key).map_err(|r| anyhow::anyhow!("{r}"))?;
    Ok(envelope.to_json().into_bytes())
}

/// The same release with one byte of the signed manifest changed (the version's first digit).
fn tamper(release: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut envelope = Envelope::parse(release).map_err(|r| anyhow::anyhow!("{r}"))?;
    let at = envelope
        .manifest_bytes
        .windows(5)
        .position(|w| w == b"\"2.0\"")
        .context("the manifest has no version 2.0")?;
    envelope.manifest_bytes[at + 1] = b'9';
    Ok(envelope.to_json().into_bytes())
}

fn write_pattern(path: &Path, size: u64, pattern: &[u8]) -> anyhow::Result<()> {
    let block: Vec<u8> = pattern.iter().copied().cycle().take(1024 * 1024).collect();
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        std::io::Write::write_all(&mut out, &block[..n])?;
        left -= n as u64;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    sha256_prefix(path, u64::MAX)
}

fn sha256_prefix(path: &Path, len: u64) -> anyhow::Result<[u8; 32]> {
    let mut file = std::io::Read::take(fs::File::open(path)?, len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// A static file server on 127.0.0.1 (an ephemeral port), standing in for the fleet's image
/// server. The image is held in memory: it is the demo's, not the agent's, memory.
struct ImageServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ImageServer {
    async fn start(image: &Path) -> anyhow::Result<ImageServer> {
        let body = Bytes::from(fs::read(image)?);
        let name = format!(
            "/{}",
            image.file_name().unwrap_or_default().to_string_lossy()
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new((name, body));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(respond(
                                &shared.0, &shared.1, &request,
                            ))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(ImageServer { addr, task })
    }

    fn stop(self) {
        self.task.abort();
    }
}

fn respond(
    name: &str,
    body: &Bytes,
    request: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let builder = hyper::Response::builder();
    if request.uri().path() != name {
        return builder
            .status(404)
            .body(Full::new(Bytes::new()))
            .expect("a static response is valid");
    }
    // Resume support, as a real image server has: `Range: bytes=N-`.
    let start = request
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|start| *start < body.len());
    match start {
        Some(start) => builder
            .status(206)
            .header(
                hyper::header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )
            .body(Full::new(body.slice(start..))),
        None => builder.status(200).body(Full::new(body.clone())),
    }
    .expect("a static response is valid")
}
