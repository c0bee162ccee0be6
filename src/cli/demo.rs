//! `update-agent demo`: the agent's main job, a whole update cycle, on this machine with nothing
//! but the binary — throwaway keys, an embedded MQTT broker, two file-backed slots, the file
//! bootloader and a loopback HTTP server in a temporary directory. The operator's side publishes
//! the release over MQTT and watches the device's topics; the device runs `update-agent run`
//! (the daemon's own code, in this process). It narrates what the operator sees on MQTT and
//! checks every outcome, so it doubles as a smoke test (CI runs it): any surprise makes it exit
//! non-zero.

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
use std::time::Duration;
use update_agent::bootloader::simulator::{BootSim, SimEnv};
use update_agent::config::Config;
use update_agent::engine::{Event, EventKind};
use update_agent::keys::{self, KeyId};
use update_agent::mqtt::oneshot::{self, Seen, Watcher};
use update_agent::mqtt::{BrokerUrl, Endpoint, Protocol, topics};
use update_agent::reason::ReasonCode;
use update_agent::release::Envelope;
use update_agent::release::build::{digest_image, sign_manifest};
use update_agent::release::manifest::{Disruption, FORMAT, Image, Manifest, Severity};
use update_agent::state_store::StateStore;

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
const DEVICE_ID: &str = "demo-gw-0001";

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
        "update-agent demo: a whole update cycle over MQTT in {}",
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
        "fleet",
        "an MQTT broker (embedded rumqttd, plain TCP on loopback: a fleet's broker uses TLS)",
    );
    let broker = super::demo_broker::start()?;
    let endpoint = Endpoint {
        url: BrokerUrl {
            host: broker.ip().to_string(),
            port: broker.port(),
            tls: false,
        },
        tls: None,
        protocol: Protocol::V5,
    };
    detail(&format!("listening on {}", endpoint.shown()));

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
    let reboot_marker = dir.join("reboot-requested");
    fs::write(
        &config_path,
        config_text(
            dir,
            &keys_dir,
            &slot_a,
            &slot_b,
            slot_size,
            &endpoint.shown(),
        ),
    )?;
    let config = Config::load(&config_path)?;
    let slot_a_hash = sha256_file(&slot_a)?;
    detail(&format!("config {}", config_path.display()));

    step(
        "operator",
        "watches the fleet's topics (as `update-agent monitor` does)",
    );
    let mut feed = Feed::start(&endpoint)?;
    feed.until("the subscription", Duration::from_secs(10), |f| {
        f.subscribed
    })
    .await?;

    step(
        "device",
        "update-agent run: connects, subscribes, says it is online",
    );
    let mut daemon = Daemon::start(config.clone());
    feed.until("the device to come online", Duration::from_secs(10), |f| {
        f.online == Some(true)
    })
    .await?;

    step(
        "operator",
        "builds release 2.0, serves its image over HTTP on 127.0.0.1, publishes the release (retained)",
    );
    let image = dir.join("rootfs-2.0.img");
    write_pattern(&image, slot_size * 3 / 4, b"rootfs 2.0 ")?;
    let server = ImageServer::start(&image).await?;
    let url = format!("http://{}/rootfs-2.0.img", server.addr);
    let release = make_release(&key, &image, &url)?;
    fs::write(dir.join("release-2.0.json"), &release)?;
    let fleet_topic = topics::fleet_release(topics::DEFAULT_PREFIX, COMPATIBLE);
    oneshot::publish_retained(
        &endpoint,
        &fleet_topic,
        release.clone(),
        Duration::from_secs(10),
    )
    .await?;
    detail(&format!(
        "{} bytes on {fleet_topic}; image at {url}",
        release.len()
    ));
    detail("what the operator sees on MQTT:");
    feed.until("the reboot request", Duration::from_secs(120), |_| {
        reboot_marker.exists()
    })
    .await?;
    ensure!(
        sha256_file(&slot_a)? == slot_a_hash,
        "slot A changed during the install"
    );

    step(
        "device",
        "reboots: the agent stops (online=false), the boot script (simulated) picks the slot",
    );
    daemon.stop().await?;
    fs::remove_file(&reboot_marker)?;
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
    feed.until("online=false", Duration::from_secs(10), |f| {
        f.online == Some(false)
    })
    .await?;
    detail(&format!("bootloader chose slot {booted} (one try used)"));

    step(
        "device",
        "update-agent run after the boot: trial boot, health checks, commit",
    );
    let mut daemon = Daemon::start(config.clone());
    feed.until("the commit", Duration::from_secs(60), |f| {
        f.states().contains(&EventKind::Committed)
    })
    .await?;

    step(
        "attacker",
        "changes one byte of the signed manifest and publishes it to the device",
    );
    let tampered = tamper(&release)?;
    let device_topic = format!(
        "{}/release",
        topics::device_topic(topics::DEFAULT_PREFIX, DEVICE_ID)
    );
    oneshot::publish_retained(&endpoint, &device_topic, tampered, Duration::from_secs(10)).await?;
    feed.until("the refusal", Duration::from_secs(20), |f| {
        f.states().contains(&EventKind::Refused)
    })
    .await?;
    let refusal = feed.events.last().cloned().context("no refusal event")?;
    ensure!(
        refusal.reason == Some(ReasonCode::BadSignature),
        "the tampered release was refused as {:?}, not bad-signature",
        refusal.reason
    );

    step("summary", "what the operators saw on MQTT");
    let state = feed.state.clone().context("no retained state was seen")?;
    detail(&format!(
        "retained state: version {}, slot {}, {}, last event #{} {}",
        state["version"].as_str().unwrap_or("?"),
        state["booted_slot"].as_str().unwrap_or("?"),
        state["state"].as_str().unwrap_or("?"),
        state["last_event"]["seq"],
        state["last_event"]["state"].as_str().unwrap_or("?"),
    ));
    use EventKind::*;
    let states = feed.states();
    ensure!(
        states
            == [
                Accepted, Writing, Written, Activated, Rebooting, TrialBoot, Committed, Refused
            ],
        "unexpected event sequence on MQTT {states:?}"
    );
    let seqs: Vec<u64> = feed.events.iter().map(|e| e.seq).collect();
    ensure!(
        seqs == (0..8).collect::<Vec<_>>(),
        "event sequence numbers {seqs:?}"
    );
    ensure!(
        state["version"] == "2.0" && state["booted_slot"] == "B" && state["state"] == "idle",
        "unexpected retained state {state}"
    );
    let logged = StateStore::open(&config.device.state_dir)?.events()?;
    ensure!(
        logged.iter().map(|e| e.seq).eq(seqs.iter().copied()),
        "the device's own event log differs from what MQTT carried"
    );
    ensure!(sha256_file(&slot_a)? == slot_a_hash, "slot A changed");
    ensure!(
        sha256_prefix(&slot_b, fs::metadata(&image)?.len())? == sha256_file(&image)?,
        "slot B does not hold the image"
    );
    detail("slot A (the old system) is byte-identical to before; slot B holds 2.0, committed");
    detail("the device's event log and the events on MQTT are the same 8 records");
    daemon.stop().await?;
    println!(
        "demo passed: install over MQTT, trial boot, commit, and a tampered release refused and reported"
    );
    server.stop();
    Ok(())
}

/// `update-agent run`, in this process: the same code as the service, stopped like systemd
/// stops it.
struct Daemon {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), update_agent::daemon::DaemonError>>,
}

impl Daemon {
    fn start(config: Config) -> Daemon {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(update_agent::daemon::run(config, async move {
            let _ = stopped.await;
        }));
        Daemon {
            stop: Some(stop),
            task,
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

/// What the operator sees: the device's topics, narrated as they arrive.
struct Feed {
    rx: tokio::sync::mpsc::Receiver<Option<Seen>>,
    subscribed: bool,
    online: Option<bool>,
    state: Option<serde_json::Value>,
    events: Vec<Event>,
    last_percent: Option<u64>,
}

impl Feed {
    fn start(endpoint: &Endpoint) -> anyhow::Result<Feed> {
        let mut watcher = Watcher::new(endpoint, topics::DEFAULT_PREFIX)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                match watcher.next().await {
                    Ok(seen) => {
                        if tx.send(seen).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        eprintln!("demo monitor: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Ok(Feed {
            rx,
            subscribed: false,
            online: None,
            state: None,
            events: Vec::new(),
            last_percent: None,
        })
    }

    fn states(&self) -> Vec<EventKind> {
        self.events.iter().map(|e| e.kind).collect()
    }

    /// Shows what arrives until `done` holds; fails after `timeout`.
    async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Feed) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(self) {
            if tokio::time::Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            match tokio::time::timeout(Duration::from_millis(50), self.rx.recv()).await {
                Ok(Some(Some(seen))) => self.show(seen),
                Ok(Some(None)) => self.subscribed = true,
                Ok(None) => bail!("the monitor stopped"),
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn show(&mut self, seen: Seen) {
        match seen.leaf.as_str() {
            "online" => {
                let online = &seen.payload[..] == b"true";
                if self.online != Some(online) {
                    mqtt_line(&format!("{} online={online}", seen.device));
                }
                self.online = Some(online);
            }
            "events" => match serde_json::from_slice::<Event>(&seen.payload) {
                // At least once: a record sent again after a reconnect has a known seq.
                Ok(event) if self.events.iter().any(|e| e.seq == event.seq) => {}
                Ok(event) => {
                    mqtt_line(&super::install::describe(&event));
                    self.events.push(event);
                }
                Err(_) => mqtt_line("an event record this demo cannot read"),
            },
            "state" => {
                let Ok(state) = serde_json::from_slice::<serde_json::Value>(&seen.payload) else {
                    return;
                };
                let percent = state["progress"]["percent"].as_u64();
                if percent.is_some_and(|p| p > 0) && percent != self.last_percent {
                    mqtt_line(&format!(
                        "{} state: writing, {}% of {} MiB",
                        seen.device,
                        percent.unwrap_or(0),
                        state["progress"]["total"].as_u64().unwrap_or(0) / (1024 * 1024)
                    ));
                }
                self.last_percent = percent;
                self.state = Some(state);
            }
            _ => {}
        }
    }
}

fn mqtt_line(text: &str) {
    println!("   mqtt | {text}");
}

fn step(who: &str, what: &str) {
    println!("\n== {who}: {what}");
}

fn detail(text: &str) {
    println!("   {text}");
}

fn config_text(dir: &Path, keys: &Path, a: &Path, b: &Path, size: u64, broker: &str) -> String {
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
# The demo's "reboot": a marker file; the demo then simulates the boot.
reboot_command = ["touch", "{reboot}"]

# The demo runs on a workstation, whose system bus is not the demo's to serve on.
[dbus]
enabled = false

[mqtt]
broker = "{broker}"
device_id = "{DEVICE_ID}"
keepalive = 10
reconnect_min = 0.1
reconnect_max = 2
"#,
        dir = p(dir),
        state = p(&dir.join("state")),
        keys = p(keys),
        bootenv = p(&dir.join("bootenv")),
        a = p(a),
        b = p(b),
        boot_id = p(&dir.join("boot_id")),
        cmdline = p(&dir.join("cmdline")),
        reboot = p(&dir.join("reboot-requested")),
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
            Image::uncompressed(url, digest.size, digest.sha256),
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
