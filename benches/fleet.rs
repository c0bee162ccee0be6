//! The fleet benchmark (issue 16): N real `update-agent run` processes — the device build, each
//! a simulated gateway (`update_agent::sim`: tiny file slots, file bootloader, boot facts and
//! state directory, distinct device ids) — against one mosquitto on loopback (the simulation's,
//! without persistence) (or, with `--rabbitmq 3`, a three-node
//! RabbitMQ cluster over MQTT 3.1.1), and `update-agent rollout start` publishing releases to
//! them. Reboots are simulated by the bench (stop the agent, let the boot script's rules pick
//! the slot, start it again), by a pool of workers.
//!
//! Measured, per rollout round: every device online (time from spawning the fleet), every device
//! accepting (time from the publish to the last `accepted`), the peak number of concurrent image
//! downloads (from the image server's log of each request's start and end), the events the tool
//! received and how many were missing by seq (and, independently, the bench's own subscriber),
//! the fleet's total RSS and PSS (idle and peak), and the CPU time of the broker, the tool and
//! the fleet. Then a round where `--fail-percent` of the devices fail their health check and the
//! tool halts at `--halt-at`. Without `--window` every device starts at once when the release
//! is published. With `--window 60` the releases carry a signed 60 s rollout schedule (an agent
//! that knows manifest format 2): a first round without one is the baseline, and each staged
//! round prints the moments the devices reported (histogram, largest gap from uniform against
//! the 95 % bound of a uniform draw), peak downloads against the baseline's, and in the failing
//! round the devices that reported `withdrawn` after the halt.
//!
//! With `--rabbitmq N` it first finds out whether a retained release published at one node
//! reaches devices connected to the others (RabbitMQ's MQTT retained store is node-local), then
//! rolls out with the release published at every node (`rollout start --broker …` per node).
//!
//! Not run in CI. Run it through `benches/fleet.sh` (builds the device binary, raises limits):
//!   benches/fleet.sh --devices 1000 [--window 60]
//!   benches/fleet.sh --devices 200 --rabbitmq 3
//! Work files go to /dev/shm by default (tmpfs): 1,000 devices fsyncing into this machine's one
//! disk would measure that disk, not the fleet; each real gateway has its own.

#[allow(dead_code)]
#[path = "../tests/mqtt/rabbitmq.rs"]
mod rabbitmq;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use update_agent::mqtt::oneshot::Watcher;
use update_agent::mqtt::{BrokerUrl, Endpoint, Protocol};
use update_agent::sim::mqtt::Mosquitto;
use update_agent::sim::{Gateway, Signer};

const COMPATIBLE: &str = "bench-gw";
const PREFIX: &str = "update-agent/v1";

#[derive(Parser, Debug, Clone)]
struct Opts {
    /// Devices in the fleet
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Healthy rollout rounds (each a new release); medians are over these
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Share of devices whose new system fails its health check in the last round
    #[arg(long, default_value_t = 10.0)]
    fail_percent: f64,
    /// The tool's halt threshold
    #[arg(long, default_value = "5%")]
    halt_at: String,
    /// The tool's minimum number of finished devices before it may halt
    #[arg(long, default_value_t = 10)]
    min_finished: usize,
    /// Image size in KiB
    #[arg(long, default_value_t = 64)]
    image_kib: usize,
    /// The image server's rate per download, KiB/s (so that downloads take time and overlap,
    /// as they do from a real server)
    #[arg(long, default_value_t = 256)]
    rate_kib: usize,
    /// mosquitto's per-client queue (`max_queued_messages`; its default is 1000)
    #[arg(long, default_value_t = 1000)]
    mosquitto_queue: usize,
    /// A RabbitMQ cluster of this many nodes instead of mosquitto (MQTT 3.1.1)
    #[arg(long)]
    rabbitmq: Option<usize>,
    /// Concurrent simulated reboots
    #[arg(long, default_value_t = 16)]
    reboot_workers: usize,
    /// Work directory (default: a new one under /dev/shm)
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the work directory
    #[arg(long)]
    keep: bool,
    /// The device build (`cargo build --release --no-default-features`)
    #[arg(long, env = "DEVICE_BIN")]
    device_bin: PathBuf,
    /// A staged rollout: each release carries a signed schedule of this many seconds
    /// (`release create --rollout-start/--rollout-duration`, manifest format 2; needs an agent
    /// that knows it), and each round prints the devices' moments (histogram, largest gap from
    /// uniform). Without it, every device starts at the publish: the baseline.
    #[arg(long)]
    window: Option<u64>,
    /// Seconds a rollout round may take
    #[arg(long, default_value_t = 900)]
    round_timeout: u64,
    // cargo bench passes --bench
    #[arg(long, hide = true)]
    bench: bool,
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

// ---------------------------------------------------------------- /proc

/// CPU seconds of a live process's threads, from the scheduler's nanosecond counters
/// (`/proc/PID/task/*/schedstat`; `/proc/PID/stat` counts in 10 ms ticks, too coarse for an
/// agent that spends milliseconds on an install).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut nanos = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(nanos as f64 / 1e9)
}

/// CPU seconds of every child process this bench has waited for (the agents it stopped).
fn children_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

/// Resident set in KiB, cheaply (statm), for frequent sampling.
fn rss_kib(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(pages * page / 1024)
}

/// (RSS, PSS) in KiB: PSS shares the binary's pages among the processes that map them, so its
/// sum is what the fleet really costs.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        rollup
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("Rss:")?, field("Pss:")?))
}

// ---------------------------------------------------------------- image server

/// One download: path, start, end.
type Download = (String, Instant, Instant);

/// A static file server on 127.0.0.1 that sends each body at a fixed rate and logs every
/// download's start and end.
struct ImageServer {
    port: u16,
    files: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>>,
    log: Arc<Mutex<Vec<Download>>>,
}

impl ImageServer {
    fn start(rate: usize) -> ImageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>> = Arc::default();
        let log: Arc<Mutex<Vec<Download>>> = Arc::default();
        let (f, l) = (files.clone(), log.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (files, log) = (f.clone(), l.clone());
                std::thread::spawn(move || serve(stream, &files, &log, rate));
            }
        });
        ImageServer { port, files, log }
    }

    fn add(&self, path: &str, body: Vec<u8>) -> String {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), Arc::new(body));
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Downloads of `path` and the most that ran at once.
    fn downloads(&self, path: &str) -> (usize, usize) {
        let log = self.log.lock().unwrap();
        let mut edges: Vec<(Instant, i32)> = Vec::new();
        for (p, start, end) in log.iter() {
            if p == path {
                edges.push((*start, 1));
                edges.push((*end, -1));
            }
        }
        edges.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        let (mut now, mut peak) = (0i32, 0i32);
        for (_, delta) in &edges {
            now += delta;
            peak = peak.max(now);
        }
        (edges.len() / 2, peak as usize)
    }
}

fn serve(
    mut stream: TcpStream,
    files: &Mutex<HashMap<String, Arc<Vec<u8>>>>,
    log: &Mutex<Vec<Download>>,
    rate: usize,
) {
    let start = Instant::now();
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        request.push(byte[0]);
    }
    let request = String::from_utf8_lossy(&request).to_string();
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let Some(body) = files.lock().unwrap().get(&path).cloned() else {
        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        return;
    };
    let from = request
        .to_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes=").map(str::to_string))
        .and_then(|r| r.trim().strip_suffix('-')?.parse::<usize>().ok())
        .filter(|n| *n < body.len());
    let (status, part) = match from {
        Some(n) => (
            format!(
                "206 Partial Content\r\nContent-Range: bytes {n}-{}/{}",
                body.len() - 1,
                body.len()
            ),
            &body[n..],
        ),
        None => ("200 OK".to_string(), &body[..]),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        part.len()
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    let chunk = 16 * 1024;
    let pause = Duration::from_secs_f64(chunk as f64 / (rate as f64 * 1024.0));
    for piece in part.chunks(chunk) {
        if stream.write_all(piece).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
    log.lock().unwrap().push((path, start, Instant::now()));
}

// ---------------------------------------------------------------- brokers

enum Brokers {
    Mosquitto(Mosquitto),
    Rabbit(rabbitmq::RabbitMq),
}

impl Brokers {
    fn urls(&self) -> Vec<String> {
        match self {
            Brokers::Mosquitto(broker) => vec![broker.url()],
            Brokers::Rabbit(r) => (0..r.nodes.len()).map(|i| r.url(i)).collect(),
        }
    }

    /// PIDs whose CPU is the broker's (for RabbitMQ, the nodes' Erlang VMs).
    fn pids(&self) -> Vec<u32> {
        match self {
            Brokers::Mosquitto(broker) => broker.pid().into_iter().collect(),
            Brokers::Rabbit(cluster) => cluster.vm_pids(),
        }
    }

    fn cpu(&self) -> f64 {
        self.pids().iter().filter_map(|p| cpu_seconds(*p)).sum()
    }
}

/// The simulation's mosquitto without persistence (1,000 sessions saved every second would be
/// measured too) and without its connection and queue limits.
fn start_mosquitto(dir: &Path, queue: usize) -> Brokers {
    let extra = format!(
        "allow_anonymous true\npersistence false\nmax_connections -1\nmax_queued_messages {queue}"
    );
    Brokers::Mosquitto(Mosquitto::start(dir, &extra))
}

// ---------------------------------------------------------------- devices

/// A gateway of the fleet and the broker (node) it talks to.
struct Device {
    id: String,
    broker: usize,
    gateway: Gateway,
}

struct Fleet {
    devices: Vec<Mutex<Device>>,
}

impl Fleet {
    fn create(opts: &Opts, dir: &Path, urls: &[String], protocol: Protocol) -> Fleet {
        let slot = opts.image_kib * 2 * 1024;
        let devices = (0..opts.devices)
            .map(|i| {
                let id = format!("bench-{:04}", i + 1);
                let broker = i % urls.len();
                let device_id = id.clone();
                let gateway = Gateway::builder()
                    .dir(&dir.join(&id))
                    .binary(&opts.device_bin)
                    .compatible(COMPATIBLE)
                    .slot_size(slot as u64)
                    .slot_contents(vec![0xa5; slot], Vec::new())
                    .empty_b()
                    .mqtt(&urls[broker])
                    .configure(move |c| {
                        c.device.factory_version = Some("1.0".into());
                        c.health.timeout = Duration::from_secs(30);
                        let mqtt = c.mqtt.as_mut().unwrap();
                        mqtt.device_id = device_id;
                        mqtt.protocol = protocol;
                        mqtt.keepalive = Duration::from_secs(30);
                        mqtt.reconnect_min = Duration::from_millis(500);
                        mqtt.reconnect_max = Duration::from_secs(10);
                    })
                    .build()
                    .unwrap();
                Mutex::new(Device {
                    id,
                    broker,
                    gateway,
                })
            })
            .collect();
        Fleet { devices }
    }

    fn start_all(&self) {
        for device in &self.devices {
            device.lock().unwrap().start();
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.devices
            .iter()
            .filter_map(|d| d.lock().unwrap().gateway.daemon_pid())
            .collect()
    }

    /// RSS summed over the running agents, KiB (cheap).
    fn rss(&self) -> u64 {
        self.pids().iter().filter_map(|p| rss_kib(*p)).sum()
    }

    /// (RSS, PSS) summed over the running agents, KiB.
    fn memory(&self) -> (u64, u64) {
        self.pids()
            .iter()
            .filter_map(|p| memory_kib(*p))
            .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2))
    }

    fn set_health(&self, index: usize, ok: bool) {
        let check = if ok { "true" } else { "false" };
        let mut device = self.devices[index].lock().unwrap();
        device.gateway.set_health(&[&[check]]);
    }
}

impl Device {
    fn start(&mut self) {
        self.gateway.start_daemon(&[("RUST_LOG", "warn".as_ref())]);
    }

    /// The reboot the agent asked for: stop it, the boot script's rules pick the slot, start.
    fn reboot(&mut self) {
        self.gateway.reboot();
        self.start();
    }
}

/// Reboots devices that asked for one, with `workers` threads, until `stop`.
fn reboot_loop(
    fleet: Arc<Fleet>,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<usize>();
    let rx = Arc::new(Mutex::new(rx));
    let queued: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (rx, fleet, queued, stop) = (rx.clone(), fleet.clone(), queued.clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let next = rx.lock().unwrap().recv_timeout(Duration::from_millis(200));
                if let Ok(index) = next {
                    fleet.devices[index].lock().unwrap().reboot();
                    queued.lock().unwrap().remove(&index);
                }
            }
        }));
    }
    let scanner = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (index, device) in fleet.devices.iter().enumerate() {
                // A device being rebooted holds its lock for a while: passed over.
                let asked = device
                    .try_lock()
                    .is_ok_and(|d| d.gateway.reboot_requested());
                if asked && queued.lock().unwrap().insert(index) {
                    let _ = tx.send(index);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    handles.push(scanner);
    handles
}

// ---------------------------------------------------------------- the bench's own subscriber

#[derive(Default)]
struct Seen {
    online: HashSet<String>,
    /// release id → device → when its first `accepted` arrived.
    accepted: HashMap<String, HashMap<String, Instant>>,
    /// release id → device → distinct seqs of its events for that release.
    seqs: HashMap<String, HashMap<String, HashSet<u64>>>,
    /// release id → device → final state (committed, rolled-back, failed).
    finished: HashMap<String, HashMap<String, String>>,
    /// release id → device → its rollout moment (`until` of a `pending` event waiting for
    /// `rollout`).
    moments: HashMap<String, HashMap<String, jiff::Timestamp>>,
    /// release id → devices that reported `withdrawn`.
    withdrawn: HashMap<String, HashSet<String>>,
}

fn subscribe(urls: &[String], protocol: Protocol) -> Arc<Mutex<Seen>> {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let endpoints: Vec<Endpoint> = urls
        .iter()
        .map(|u| Endpoint {
            url: BrokerUrl::parse(u).unwrap(),
            tls: None,
            protocol,
        })
        .collect();
    let shared = seen.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(8192);
            for endpoint in endpoints {
                let tx = tx.clone();
                let mut watcher = Watcher::new(&endpoint, PREFIX).unwrap();
                tokio::spawn(async move {
                    loop {
                        match watcher.next().await {
                            Ok(Some(message)) => {
                                if tx.send(message).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                        }
                    }
                });
            }
            while let Some(message) = rx.recv().await {
                let mut seen = shared.lock().unwrap();
                match message.leaf.as_str() {
                    "online" => {
                        if &message.payload[..] == b"true" {
                            seen.online.insert(message.device);
                        } else {
                            seen.online.remove(&message.device);
                        }
                    }
                    "events" => {
                        let Ok(event) = serde_json::from_slice::<Value>(&message.payload) else {
                            continue;
                        };
                        let (Some(seq), Some(release)) =
                            (event["seq"].as_u64(), event["release_id"].as_str())
                        else {
                            continue;
                        };
                        let release = release.to_string();
                        seen.seqs
                            .entry(release.clone())
                            .or_default()
                            .entry(message.device.clone())
                            .or_default()
                            .insert(seq);
                        let state = event["state"].as_str().unwrap_or("");
                        if state == "accepted" {
                            seen.accepted
                                .entry(release.clone())
                                .or_default()
                                .entry(message.device.clone())
                                .or_insert_with(Instant::now);
                        }
                        if state == "pending"
                            && event["waiting"] == "rollout"
                            && let Some(until) =
                                event["until"].as_str().and_then(|u| u.parse().ok())
                        {
                            seen.moments
                                .entry(release.clone())
                                .or_default()
                                .insert(message.device.clone(), until);
                        }
                        if state == "withdrawn" {
                            seen.withdrawn
                                .entry(release.clone())
                                .or_default()
                                .insert(message.device.clone());
                        }
                        if matches!(state, "committed" | "rolled-back" | "failed") {
                            seen.finished
                                .entry(release)
                                .or_default()
                                .insert(message.device, state.to_string());
                        }
                    }
                    _ => {}
                }
            }
        });
    });
    seen
}

// ---------------------------------------------------------------- rounds

struct Round {
    name: String,
    devices: usize,
    accepted: usize,
    to_all_accepted: Option<Duration>,
    downloads: usize,
    peak_downloads: usize,
    tool_received: u64,
    tool_missing: u64,
    tool_duplicates: u64,
    bench_events: usize,
    committed: u64,
    failed: u64,
    outcome: String,
    halted_after: Option<Duration>,
    started_at_halt: Option<u64>,
    duration: Duration,
    peak_rss_mib: f64,
    end_pss_mib: f64,
    /// With `--window`: the moments' spread (histogram and largest gap from uniform).
    moments: Option<Moments>,
    /// Devices that reported `withdrawn` (the bench's subscriber) and the tool's count.
    withdrawn: usize,
    tool_withdrawn: u64,
    broker_cpu: f64,
    tool_cpu: f64,
    fleet_cpu: f64,
}

/// How the devices' rollout moments spread over the window.
struct Moments {
    window: u64,
    /// Devices that reported a moment.
    devices: usize,
    /// Moments per tenth of the window (before and after it: first and last bin).
    histogram: [usize; 10],
    /// The largest gap between the moments' distribution and a uniform one over the window
    /// (Kolmogorov–Smirnov: the largest difference of the cumulative shares).
    largest_gap: f64,
}

impl Moments {
    /// `offsets`: each moment as a share of the window (0 = its start, 1 = its end).
    fn of(mut offsets: Vec<f64>, window: u64) -> Moments {
        offsets.sort_by(f64::total_cmp);
        let n = offsets.len();
        let mut histogram = [0usize; 10];
        let mut largest_gap = 0.0f64;
        for (i, x) in offsets.iter().enumerate() {
            histogram[((x * 10.0).floor().clamp(0.0, 9.0)) as usize] += 1;
            let x = x.clamp(0.0, 1.0);
            let below = i as f64 / n as f64;
            let upto = (i + 1) as f64 / n as f64;
            largest_gap = largest_gap.max((x - below).abs()).max((upto - x).abs());
        }
        Moments {
            window,
            devices: n,
            histogram,
            largest_gap,
        }
    }

    /// What a sample of this size from a truly uniform draw stays under 95 % of the time
    /// (1.36 / sqrt(n)): the baseline the largest gap is compared with.
    fn expected_gap(&self) -> f64 {
        1.36 / (self.devices.max(1) as f64).sqrt()
    }

    fn show(&self) -> String {
        let most = self.histogram.iter().copied().max().unwrap_or(1).max(1);
        let mut out = format!(
            "  moments of {} devices over the {} s window (each row a tenth):\n",
            self.devices, self.window
        );
        for (bin, count) in self.histogram.iter().enumerate() {
            let from = self.window as f64 * bin as f64 / 10.0;
            out.push_str(&format!(
                "  {:>6.1} s {:>5} {}\n",
                from,
                count,
                "#".repeat(count * 50 / most)
            ));
        }
        out.push_str(&format!(
            "  largest gap from uniform: {:.2} % of the fleet ({:.2}× the 95 % bound of a uniform draw, {:.2} %)",
            self.largest_gap * 100.0,
            self.largest_gap / self.expected_gap(),
            self.expected_gap() * 100.0
        ));
        out
    }
}

struct Bench {
    opts: Opts,
    dir: PathBuf,
    tool: PathBuf,
    key: PathBuf,
    urls: Vec<String>,
    protocol: Protocol,
    server: ImageServer,
    fleet: Arc<Fleet>,
    brokers: Brokers,
    seen: Arc<Mutex<Seen>>,
}

impl Bench {
    /// A signed release of `version` for an image of its own, served by the image server.
    /// With `window`, a staged release whose window opens in 3 s (returned too).
    fn release(
        &self,
        version: &str,
        security_version: u64,
        window: Option<u64>,
    ) -> (PathBuf, String, String, Option<jiff::Timestamp>) {
        let image: Vec<u8> = format!("rootfs {version} ")
            .bytes()
            .cycle()
            .take(self.opts.image_kib * 1024)
            .collect();
        let image_path = self.dir.join(format!("rootfs-{version}.img"));
        fs::write(&image_path, &image).unwrap();
        let path = format!("/rootfs-{version}.img");
        let url = self.server.add(&path, image);
        let out = self.dir.join(format!("release-{version}.json"));
        let mut command = Command::new(&self.tool);
        command.args(["release", "create"]);
        let start = window.map(|_| jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3));
        if let (Some(window), Some(start)) = (window, start) {
            // The window opens about when the tool publishes.
            command
                .args(["--rollout-start", &start.to_string()])
                .args(["--rollout-duration", &window.to_string()]);
        }
        let status = command
            .arg("--key")
            .arg(&self.key)
            .arg("--image")
            .arg(&image_path)
            .args(["--version", version])
            .args(["--security-version", &security_version.to_string()])
            .args([
                "--compatible",
                COMPATIBLE,
                "--url",
                &url,
                "--reboot",
                "--no-chunks",
            ])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let inspect = Command::new(&self.tool)
            .args(["release", "inspect", "--json"])
            .arg(&out)
            .output()
            .unwrap();
        let id = serde_json::from_slice::<Value>(&inspect.stdout).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        (out, id, path, start)
    }

    fn round(
        &self,
        name: &str,
        version: &str,
        security_version: u64,
        window: Option<u64>,
    ) -> Round {
        let (release, id, path, window_start) = self.release(version, security_version, window);
        let mut command = Command::new(&self.tool);
        command.args([
            "rollout",
            "start",
            "--json",
            "--protocol",
            self.protocol.as_str(),
        ]);
        for url in &self.urls {
            command.args(["--broker", url]);
        }
        command
            .args(["--fleet", COMPATIBLE, "--halt-at", &self.opts.halt_at])
            .args(["--min-finished", &self.opts.min_finished.to_string()])
            .args(["--timeout", &self.opts.round_timeout.to_string()])
            .arg(&release)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let broker_cpu = self.brokers.cpu();
        // The agents' CPU: of the processes the reboots stopped (waited for) during the round.
        // Sampled before the tool is reaped, so that the tool is not in it.
        let children_before = children_cpu();
        let mut children_after;
        let started = Instant::now();
        let mut tool = command.spawn().unwrap();
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = lines.clone();
        let stdout = tool.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        let published: Arc<Mutex<Option<Instant>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let (p, e) = (published.clone(), errors.clone());
        let stderr = tool.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.starts_with("published") {
                    *p.lock().unwrap() = Some(Instant::now());
                }
                e.lock().unwrap().push(line);
            }
        });
        let mut peak_rss = 0u64;
        let mut tool_cpu = 0.0;
        let status = loop {
            children_after = children_cpu();
            if let Some(status) = tool.try_wait().unwrap() {
                break status;
            }
            tool_cpu = cpu_seconds(tool.id()).unwrap_or(tool_cpu);
            peak_rss = peak_rss.max(self.fleet.rss());
            std::thread::sleep(Duration::from_secs(1));
        };
        // PSS once, at the end of the round (smaps_rollup is too costly to sample often).
        let (_, end_pss) = self.fleet.memory();
        let duration = started.elapsed();
        let broker_cpu = self.brokers.cpu() - broker_cpu;
        let fleet_cpu = children_after - children_before;
        let lines = lines.lock().unwrap().clone();
        let Some((_, last)) = lines.last() else {
            panic!(
                "rollout start printed nothing ({status}): {}",
                errors.lock().unwrap().join("\n")
            );
        };
        let last: Value = serde_json::from_str(last).unwrap();
        let published = published.lock().unwrap().unwrap_or(started);
        let halted = lines.iter().find_map(|(at, line)| {
            let line: Value = serde_json::from_str(line).ok()?;
            (line["halted"] == true).then(|| {
                let stages = &line["summary"]["rollout"]["stages"];
                // Started: writing or further. Waiting (no sign yet) and pending (accepted,
                // waiting for its moment) devices have written nothing.
                let not_started = stages["waiting"].as_u64().unwrap_or(0)
                    + stages["pending"].as_u64().unwrap_or(0);
                (
                    at.duration_since(published),
                    self.opts.devices as u64 - not_started,
                )
            })
        });
        // Let the bench's own subscriber catch the last events.
        std::thread::sleep(Duration::from_secs(2));
        let seen = self.seen.lock().unwrap();
        let accepted = seen.accepted.get(&id);
        // From the publish (the tool says so once the broker acknowledged it, so the first
        // devices may be quicker: then from the first acceptance) to the last.
        let to_all_accepted = accepted.filter(|a| a.len() == self.opts.devices).map(|a| {
            let first = a.values().min().unwrap();
            a.values()
                .max()
                .unwrap()
                .saturating_duration_since(published.min(*first))
        });
        let bench_events = seen
            .seqs
            .get(&id)
            .map(|d| d.values().map(HashSet::len).sum())
            .unwrap_or(0);
        let (downloads, peak_downloads) = self.server.downloads(&path);
        let moments = window.zip(window_start).map(|(window, start)| {
            let offsets: Vec<f64> = seen
                .moments
                .get(&id)
                .map(|m| {
                    m.values()
                        .map(|t| t.duration_since(start).as_secs_f64() / window as f64)
                        .collect()
                })
                .unwrap_or_default();
            Moments::of(offsets, window)
        });
        let withdrawn = seen.withdrawn.get(&id).map_or(0, HashSet::len);
        let events = &last["summary"]["events"];
        let stages = &last["summary"]["rollout"]["stages"];
        Round {
            name: name.to_string(),
            devices: last["summary"]["devices"].as_u64().unwrap_or(0) as usize,
            accepted: accepted.map_or(0, HashMap::len),
            to_all_accepted,
            downloads,
            peak_downloads,
            tool_received: events["received"].as_u64().unwrap_or(0),
            tool_missing: events["missing"].as_u64().unwrap_or(0),
            tool_duplicates: events["duplicates"].as_u64().unwrap_or(0),
            bench_events,
            committed: stages["committed"].as_u64().unwrap_or(0),
            failed: stages["rolled-back"].as_u64().unwrap_or(0)
                + stages["failed"].as_u64().unwrap_or(0),
            outcome: last["outcome"].as_str().unwrap_or("?").to_string(),
            halted_after: halted.map(|h| h.0),
            started_at_halt: halted.map(|h| h.1),
            duration,
            peak_rss_mib: peak_rss as f64 / 1024.0,
            end_pss_mib: end_pss as f64 / 1024.0,
            moments,
            withdrawn,
            tool_withdrawn: stages["withdrawn"].as_u64().unwrap_or(0),
            broker_cpu,
            tool_cpu,
            fleet_cpu,
        }
    }
}

fn check_limits(opts: &Opts) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // The bench holds a socket per concurrent download; mosquitto (which inherits the limit)
    // one per device and tool.
    let need = opts.devices as u64 * 2 + 256;
    if soft < need {
        let raised = need.min(hard);
        setrlimit(Resource::RLIMIT_NOFILE, raised, hard).unwrap();
        println!("ulimit -n: raised {soft} -> {raised} (hard {hard})");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        soft >= need,
        "ulimit -n is {soft}, the bench needs {need}: raise the hard limit (ulimit -Hn)"
    );
    let (procs, _) = getrlimit(Resource::RLIMIT_NPROC).unwrap();
    assert!(
        procs >= opts.devices as u64 + 100,
        "ulimit -u is {procs}; {} devices need more",
        opts.devices
    );
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap();
    let available_kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // Measured idle RSS of one agent is about 6 MiB, most of it shared text; be generous.
    let estimate_kib = opts.devices as u64 * 6 * 1024;
    println!(
        "memory: {} MiB available, {} devices x 6 MiB RSS = {} MiB at most",
        available_kib / 1024,
        opts.devices,
        estimate_kib / 1024
    );
    assert!(
        estimate_kib < available_kib / 2,
        "not enough memory for {} devices",
        opts.devices
    );
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let opts = Opts::parse();
    check_limits(&opts);
    let dir = match &opts.dir {
        Some(dir) => dir.clone(),
        None if Path::new("/dev/shm").is_dir() => PathBuf::from(format!(
            "/dev/shm/update-agent-fleet-{}",
            std::process::id()
        )),
        None => std::env::temp_dir().join(format!("update-agent-fleet-{}", std::process::id())),
    };
    fs::create_dir_all(&dir).unwrap();
    println!("work directory: {}", dir.display());
    let tool = PathBuf::from(env!("CARGO_BIN_EXE_update-agent"));
    let protocol = if opts.rabbitmq.is_some() {
        Protocol::V311
    } else {
        Protocol::V5
    };

    // The operator's key pair; each device's anchor holds its public half.
    let key_prefix = dir.join("release");
    Signer::from_seed(7).write_key_pair(&key_prefix).unwrap();

    let brokers = match opts.rabbitmq {
        Some(nodes) => {
            let cluster = rabbitmq::RabbitMq::start(&dir, nodes);
            println!(
                "RabbitMQ cluster of {nodes} nodes running in {:.1} s",
                cluster.started_in.as_secs_f64()
            );
            Brokers::Rabbit(cluster)
        }
        None => start_mosquitto(&dir, opts.mosquitto_queue),
    };
    let urls = brokers.urls();
    let server = ImageServer::start(opts.rate_kib);
    let seen = subscribe(&urls, protocol);
    let fleet = Arc::new(Fleet::create(&opts, &dir, &urls, protocol));
    let bench = Bench {
        opts: opts.clone(),
        dir: dir.clone(),
        tool: tool.clone(),
        key: key_prefix.with_extension("key"),
        urls: urls.clone(),
        protocol,
        server,
        fleet: fleet.clone(),
        brokers,
        seen: seen.clone(),
    };

    // RabbitMQ: a retained release published at the first node before the devices connect.
    let mut cluster_finding = None;
    let mut next_version = 2;
    if opts.rabbitmq.is_some() {
        let (release, id, _, _) = bench.release("2.0", 2, None);
        let status = Command::new(&tool)
            .args([
                "release",
                "publish",
                "--protocol",
                "3.1.1",
                "--broker",
                &urls[0],
            ])
            .args(["--fleet", COMPATIBLE])
            .arg(&release)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        cluster_finding = Some(id);
        next_version = 3;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let workers = reboot_loop(fleet.clone(), opts.reboot_workers, stop.clone());
    let spawned = Instant::now();
    fleet.start_all();
    let spawn_time = spawned.elapsed();
    wait_until("every device online", Duration::from_secs(300), || {
        seen.lock().unwrap().online.len() >= opts.devices
    });
    let online = spawned.elapsed();
    println!(
        "{} devices spawned in {:.1} s, all online {:.1} s after the first spawn",
        opts.devices,
        spawn_time.as_secs_f64(),
        online.as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    let (idle_rss, idle_pss) = fleet.memory();
    let per_device_rss = idle_rss as f64 / opts.devices as f64 / 1024.0;
    println!(
        "idle fleet: RSS {:.0} MiB ({per_device_rss:.2} MiB per device), PSS {:.0} MiB ({:.2} MiB per device)",
        idle_rss as f64 / 1024.0,
        idle_pss as f64 / 1024.0,
        idle_pss as f64 / opts.devices as f64 / 1024.0
    );

    let mut finding_text = String::new();
    if let Some(id) = &cluster_finding {
        // Wait for the devices at the first node to take it; give the others as long again.
        std::thread::sleep(Duration::from_secs(15));
        let seen = seen.lock().unwrap();
        let accepted = seen.accepted.get(id);
        let mut by_node: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
        for device in &fleet.devices {
            let d = device.lock().unwrap();
            let entry = by_node.entry(d.broker).or_default();
            entry.1 += 1;
            if accepted.is_some_and(|a| a.contains_key(&d.id)) {
                entry.0 += 1;
            }
        }
        finding_text = by_node
            .iter()
            .map(|(node, (got, of))| {
                format!("node {}: {got} of {of} devices accepted it", node + 1)
            })
            .collect::<Vec<_>>()
            .join("; ");
        println!(
            "retained release published at node 1 only, before the devices connected: {finding_text}"
        );
    }

    // With a window: first a round without one, the baseline the staged rounds compare with.
    let baseline = opts.window.map(|_| {
        let version = format!("{next_version}.0");
        let round = bench.round("baseline, no schedule", &version, next_version, None);
        next_version += 1;
        report(&round);
        round
    });
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        let version = format!("{next_version}.0");
        let round = bench.round(
            &format!("healthy {}", r + 1),
            &version,
            next_version,
            opts.window,
        );
        next_version += 1;
        report(&round);
        rounds.push(round);
    }
    // The last round: some devices' new system fails its health check.
    let failing = ((opts.devices as f64 * opts.fail_percent / 100.0).round() as usize).max(1);
    let step = opts.devices / failing;
    for i in 0..failing {
        fleet.set_health(i * step, false);
    }
    let version = format!("{next_version}.0");
    let failing_round = bench.round(
        &format!("{failing} of {} fail health", opts.devices),
        &version,
        next_version,
        opts.window,
    );
    report(&failing_round);

    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }

    println!(
        "\n== fleet benchmark: {} devices, {} ==",
        opts.devices,
        match opts.rabbitmq {
            Some(n) => format!("RabbitMQ cluster of {n} nodes, MQTT 3.1.1"),
            None => "one mosquitto, MQTT 5".into(),
        }
    );
    println!(
        "online: all {} after {:.1} s; idle RSS {:.0} MiB ({per_device_rss:.2} MiB/device), PSS {:.0} MiB",
        opts.devices,
        online.as_secs_f64(),
        idle_rss as f64 / 1024.0,
        idle_pss as f64 / 1024.0
    );
    if !finding_text.is_empty() {
        println!("retained at one node: {finding_text}");
    }
    let m = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "healthy rounds (median of {}): all accepted {:.2} s after publish; peak concurrent downloads {:.0} of {} ({:.0} %); \
         tool received {:.0} events, {:.0} missing; round {:.1} s; peak fleet RSS {:.0} MiB, PSS at the end {:.0} MiB; \
         CPU s: broker {:.2}, tool {:.2}, fleet {:.1} (tool/broker {:.2})",
        rounds.len(),
        m(|r| r.to_all_accepted.map_or(f64::NAN, |d| d.as_secs_f64())),
        m(|r| r.peak_downloads as f64),
        opts.devices,
        m(|r| r.peak_downloads as f64) * 100.0 / opts.devices as f64,
        m(|r| r.tool_received as f64),
        m(|r| r.tool_missing as f64),
        m(|r| r.duration.as_secs_f64()),
        m(|r| r.peak_rss_mib),
        m(|r| r.end_pss_mib),
        m(|r| r.broker_cpu),
        m(|r| r.tool_cpu),
        m(|r| r.fleet_cpu),
        m(|r| r.tool_cpu) / m(|r| r.broker_cpu),
    );
    if let Some(baseline) = &baseline {
        println!(
            "staged over {} s: peak concurrent downloads {:.0} against {} without a schedule ({:.2}×); \
             largest gap from uniform (median) {:.2} %; the failing round: {} devices withdrawn \
             (the tool counted {}), {} had started",
            opts.window.unwrap_or(0),
            m(|r| r.peak_downloads as f64),
            baseline.peak_downloads,
            m(|r| r.peak_downloads as f64) / baseline.peak_downloads.max(1) as f64,
            m(|r| r
                .moments
                .as_ref()
                .map_or(f64::NAN, |m| m.largest_gap * 100.0)),
            failing_round.withdrawn,
            failing_round.tool_withdrawn,
            failing_round
                .started_at_halt
                .map_or("-".into(), |n| n.to_string()),
        );
    }
    if !opts.keep {
        drop(bench);
        let _ = fs::remove_dir_all(&dir);
    }
}

fn report(r: &Round) {
    println!(
        "round {}: outcome {}, {} devices, {} accepted (all {} s after publish), {} committed, {} failed; \
         downloads {} (peak {} at once); tool: {} events received, {} missing, {} duplicate; \
         bench subscriber: {} distinct events; {:.1} s; halted {} ({} devices had started); \
         peak fleet RSS {:.0} MiB, PSS at the end {:.0} MiB; CPU s: broker {:.2}, tool {:.2}, fleet {:.1}",
        r.name,
        r.outcome,
        r.devices,
        r.accepted,
        r.to_all_accepted
            .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64())),
        r.committed,
        r.failed,
        r.downloads,
        r.peak_downloads,
        r.tool_received,
        r.tool_missing,
        r.tool_duplicates,
        r.bench_events,
        r.duration.as_secs_f64(),
        r.halted_after
            .map_or("no".into(), |d| format!("after {:.2} s", d.as_secs_f64())),
        r.started_at_halt.map_or("-".into(), |n| n.to_string()),
        r.peak_rss_mib,
        r.end_pss_mib,
        r.broker_cpu,
        r.tool_cpu,
        r.fleet_cpu,
    );
    if r.withdrawn > 0 || r.tool_withdrawn > 0 {
        println!(
            "  withdrawn: {} devices reported it (the tool counted {})",
            r.withdrawn, r.tool_withdrawn
        );
    }
    if let Some(moments) = &r.moments {
        println!("{}", moments.show());
    }
}
