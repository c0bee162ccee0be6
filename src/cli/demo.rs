//! `update-agent demo`: the agent's main job, a whole update cycle, on this machine with nothing
//! but the binary — throwaway keys, an embedded MQTT broker, two file-backed slots, the file
//! bootloader and a loopback HTTP server in a temporary directory. The operator's side publishes
//! the release over MQTT and watches the device's topics; the device runs `update-agent run`
//! (the daemon's own code, in this process). It narrates what the operator sees on MQTT and
//! checks every outcome, so it doubles as a smoke test (CI runs it): any surprise makes it exit
//! non-zero.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use update_agent::config::Config;
use update_agent::engine::{Event, EventKind};
use update_agent::mqtt::oneshot::{self, Seen, Watcher};
use update_agent::mqtt::{BrokerUrl, Endpoint, Protocol, topics};
use update_agent::reason::ReasonCode;
use update_agent::release::index_build::{self, StoreParams};
use update_agent::sim::{self, Act, Gateway, ImageServer, Signer};
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
    super::runtime()?.block_on(demo(&dir, args.slot_mib))?;
    Ok(ExitCode::SUCCESS)
}

async fn demo(dir: &Path, slot_mib: u64) -> anyhow::Result<()> {
    let slot_size = slot_mib.max(2) * 1024 * 1024;
    println!(
        "update-agent demo: a whole update cycle over MQTT in {}",
        dir.display()
    );

    step("operator", "makes a throwaway release signing key");
    let signer = Signer::generate()?;
    let (private_key, _) = signer.write_key_pair(&dir.join("release-signing"))?;
    detail(&format!(
        "key id {} (private key {})",
        signer.key_id().short(),
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
    let mut gateway = Gateway::builder()
        .dir(dir)
        .compatible(COMPATIBLE)
        .signer(signer)
        .slot_size(slot_size)
        .slot_contents(
            sim::text_pattern("factory 1.0 ", slot_size as usize),
            Vec::new(),
        )
        .empty_b()
        .mqtt(&endpoint.shown())
        .configure(|config| {
            config.device.factory_version = Some("1.0".into());
            config.install.checkpoint_interval = 4 * 1024 * 1024;
            if let Some(mqtt) = &mut config.mqtt {
                mqtt.device_id = DEVICE_ID.into();
                mqtt.keepalive = Duration::from_secs(10);
                mqtt.reconnect_min = Duration::from_millis(100);
                mqtt.reconnect_max = Duration::from_secs(2);
            }
        })
        .build()?;
    let config = gateway.config().clone();
    let slot_a_hash = gateway.slot_hash("A");
    detail(&format!("config {}", gateway.config_path().display()));

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
    let image = sim::text_pattern("rootfs 2.0 ", (slot_size * 3 / 4) as usize);
    let server = ImageServer::builder(image.clone())
        .route("/rootfs-2.0.img", Act::Serve)
        .start()
        .await?;
    let url = server.url("/rootfs-2.0.img");
    let release = gateway
        .release("2.0")
        .security_version(2)
        .advisory("Fixes a remote code execution in the demo's web UI.")
        .downtime(60)
        .image(&url, &image)
        .sign();
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
        gateway.reboots_requested() == 1
    })
    .await?;
    ensure!(
        gateway.slot_hash("A") == slot_a_hash,
        "slot A changed during the install"
    );

    step(
        "device",
        "reboots: the agent stops (online=false), the boot script (simulated) picks the slot",
    );
    daemon.stop().await?;
    boot_into(&mut gateway, "B")?;
    feed.until("online=false", Duration::from_secs(10), |f| {
        f.online == Some(false)
    })
    .await?;
    detail("bootloader chose slot B (one try used)");

    step(
        "device",
        "update-agent run after the boot: trial boot, health checks, commit",
    );
    let mut daemon = Daemon::start(config.clone());
    feed.until("the commit", Duration::from_secs(60), |f| {
        f.states().contains(&EventKind::Committed)
    })
    .await?;
    let slot_b_hash = gateway.slot_hash("B");

    step(
        "operator",
        "builds release 3.0, the 2.0 image with three files changed: `release create` writes its block index and block store beside the image; the server answers Range requests",
    );
    let delta = DeltaRelease::build(dir, &image).await?;
    feed.last_downloaded = None;
    let release_3 = gateway
        .release("3.0")
        .security_version(3)
        .advisory("Updates three files of the demo's web UI.")
        .downtime(60)
        .image(&delta.url("rootfs-3.0.img"), &delta.image)
        .block_index(
            &delta.url("rootfs-3.0.img.index"),
            delta.index_sha256,
            delta.block_size,
        )
        .sign();
    oneshot::publish_retained(&endpoint, &fleet_topic, release_3, Duration::from_secs(10)).await?;
    detail(&format!(
        "block index {} KiB, block store {} KiB, image {} MiB",
        delta.index_len / 1024,
        delta.store_len / 1024,
        delta.image.len() / (1024 * 1024)
    ));
    detail(
        "what the operator sees on MQTT (the device rebuilds 3.0 from the blocks it has: a delta update):",
    );
    feed.until(
        "the second reboot request",
        Duration::from_secs(120),
        |_| gateway.reboots_requested() == 2,
    )
    .await?;
    ensure!(
        gateway.slot_hash("B") == slot_b_hash,
        "slot B changed during the delta install"
    );
    let served = delta.server.body_bytes();
    let image_requests = delta
        .server
        .seen()
        .iter()
        .filter(|seen| seen.path == "/rootfs-3.0.img")
        .count();
    let reported = feed.last_downloaded.unwrap_or(0);
    ensure!(
        image_requests == 0
            && served < delta.image.len() as u64 / 4
            && (1..=served).contains(&reported),
        "not a delta: {served} bytes served ({image_requests} requests for the whole image), {reported} bytes downloaded by the device's own count"
    );
    detail(&format!(
        "downloaded {} KiB of a {} KiB image ({} KiB by the device's count on MQTT, in {} requests): {:.1} % saved",
        served / 1024,
        delta.image.len() / 1024,
        reported / 1024,
        delta.server.seen().len(),
        100.0 * (1.0 - served as f64 / delta.image.len() as f64)
    ));

    step(
        "device",
        "reboots into slot A (3.0); trial boot, health checks, commit",
    );
    daemon.stop().await?;
    boot_into(&mut gateway, "A")?;
    let mut daemon = Daemon::start(config.clone());
    feed.until("the second commit", Duration::from_secs(60), |f| {
        f.states()
            .iter()
            .filter(|&&s| s == EventKind::Committed)
            .count()
            == 2
    })
    .await?;

    step(
        "attacker",
        "changes one byte of the signed manifest and publishes it to the device",
    );
    let tampered = sim::tamper(&release);
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
    let install = [
        Accepted, Writing, Written, Activated, Rebooting, TrialBoot, Committed,
    ];
    ensure!(
        states == [&install[..], &install[..], &[Refused]].concat(),
        "unexpected event sequence on MQTT {states:?}"
    );
    let seqs: Vec<u64> = feed.events.iter().map(|e| e.seq).collect();
    ensure!(
        seqs == (0..15).collect::<Vec<_>>(),
        "event sequence numbers {seqs:?}"
    );
    ensure!(
        state["version"] == "3.0" && state["booted_slot"] == "A" && state["state"] == "idle",
        "unexpected retained state {state}"
    );
    let logged = StateStore::open(&config.device.state_dir)?.events()?;
    ensure!(
        logged.iter().map(|e| e.seq).eq(seqs.iter().copied()),
        "the device's own event log differs from what MQTT carried"
    );
    ensure!(gateway.slot_hash("B") == slot_b_hash, "slot B changed");
    ensure!(
        gateway.slot("A").get(..delta.image.len()) == Some(&delta.image[..]),
        "slot A does not hold the 3.0 image"
    );
    detail("slot B (2.0) is byte-identical to before the delta; slot A holds 3.0, committed");
    detail("the device's event log and the events on MQTT are the same 15 records");
    daemon.stop().await?;
    println!(
        "demo passed: a full install and a delta update over MQTT, trial boots, commits, and a tampered release refused and reported"
    );
    drop(server);
    Ok(())
}

/// Release 3.0 as `release create` lays it out: the image, its block index and its block
/// store side by side, served with Range support (single ranges and multi-range).
struct DeltaRelease {
    image: Vec<u8>,
    index_sha256: [u8; 32],
    block_size: u64,
    index_len: u64,
    store_len: u64,
    server: ImageServer,
}

impl DeltaRelease {
    /// `base` with three "files" rewritten (new bytes, not block-aligned, 8 KiB to 192 KiB).
    async fn build(dir: &Path, base: &[u8]) -> anyhow::Result<DeltaRelease> {
        let mut image = base.to_vec();
        for (seed, at, len) in [
            (31, 1_000_000, 64 * 1024),
            (32, 7_340_100, 8 * 1024),
            (33, base.len() / 2 + 513, 192 * 1024),
        ] {
            let at = at.min(image.len() - len);
            image[at..at + len].copy_from_slice(&sim::pattern(len, seed));
        }
        let out = dir.join("release-3.0");
        fs::create_dir_all(&out)?;
        let (image_path, index_path, store_path) = (
            out.join("rootfs-3.0.img"),
            out.join("rootfs-3.0.img.index"),
            out.join("rootfs-3.0.img.store"),
        );
        fs::write(&image_path, &image)?;
        let params = StoreParams::default();
        let built = index_build::build(&image_path, params, &index_path, &store_path)
            .context("building the block index")?;
        let (index, store) = (fs::read(&index_path)?, fs::read(&store_path)?);
        let server = ImageServer::builder(image.clone())
            .route("/rootfs-3.0.img", Act::Serve)
            .route(
                "/rootfs-3.0.img.index",
                Act::ServeFile(Arc::new(index.clone())),
            )
            .route(
                "/rootfs-3.0.img.store",
                Act::ServeFile(Arc::new(store.clone())),
            )
            .start()
            .await?;
        Ok(DeltaRelease {
            image,
            index_sha256: built.index_sha256,
            block_size: u64::from(params.block_size),
            index_len: index.len() as u64,
            store_len: store.len() as u64,
            server,
        })
    }

    fn url(&self, name: &str) -> String {
        self.server.url(&format!("/{name}"))
    }
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
    /// The bytes downloaded the last progress report said.
    last_downloaded: Option<u64>,
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
            last_downloaded: None,
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
                let downloaded = state["progress"]["downloaded"].as_u64();
                if percent.is_some_and(|p| p > 0) && percent != self.last_percent {
                    let downloaded = downloaded
                        .map(|d| format!(", {} KiB downloaded", d / 1024))
                        .unwrap_or_default();
                    mqtt_line(&format!(
                        "{} state: writing, {}% of {} MiB written{downloaded}",
                        seen.device,
                        percent.unwrap_or(0),
                        state["progress"]["total"].as_u64().unwrap_or(0) / (1024 * 1024)
                    ));
                }
                self.last_percent = percent;
                if downloaded.is_some() {
                    self.last_downloaded = downloaded;
                }
                self.state = Some(state);
            }
            _ => {}
        }
    }
}

/// Powers the gateway on (the simulated boot script picks the slot): it must come up in
/// `expected`.
fn boot_into(gateway: &mut Gateway, expected: &str) -> anyhow::Result<()> {
    let booted = gateway.try_boot().map_err(anyhow::Error::msg)?;
    ensure!(
        booted == expected,
        "the bootloader booted {booted}, expected {expected}"
    );
    Ok(())
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
