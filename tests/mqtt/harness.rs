//! The world around `update-agent run` in the MQTT tests: a real mosquitto (started on a free
//! loopback port with a generated config, stopped by PID), a plain subscriber (`mosquitto_sub`),
//! an image server on 127.0.0.1, and a device in a temporary directory (file slots, the file
//! bootloader, simulated boots) whose agent runs as a child process.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::Value;
use update_agent::bootloader::simulator::{BootSim, SimEnv};
use update_agent::release::build::{digest_image, sign_manifest};
use update_agent::release::manifest::{Disruption, FORMAT, Image, Manifest, Severity};

pub const COMPATIBLE: &str = "test-gw";
pub const DEVICE: &str = "gw-0001";
pub const PREFIX: &str = "update-agent/v1";

pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed; install it with `apt-get install {package}`")
}

/// The test's directory; with `MQTT_TEST_KEEP=1` it is kept (and named) for a post-mortem.
pub fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix("mqtt-test-")
        .tempdir()
        .unwrap();
    if std::env::var_os("MQTT_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("test directory: {}", dir.path().display());
    }
    dir
}

/// The same release with one byte of the signed manifest changed: a bad signature.
pub fn tamper(release: &[u8]) -> Vec<u8> {
    let mut envelope = update_agent::release::Envelope::parse(release).unwrap();
    let at = envelope
        .manifest_bytes
        .windows(5)
        .position(|w| w == b"\"2.0\"")
        .unwrap();
    envelope.manifest_bytes[at + 1] = b'9';
    envelope.to_json().into_bytes()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 20 ms until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mosquitto of the test's own.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mosquitto {
    /// Starts mosquitto with `listener` lines added (TLS, ACL) to a config that keeps its
    /// database in `dir`, so that a restart keeps retained messages and persistent sessions.
    pub fn start(dir: &Path, extra: &str) -> Mosquitto {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let db = dir.join("mosquitto-db");
        fs::create_dir_all(&db).unwrap();
        // Run as root (as CI does), mosquitto would drop to its own user, which cannot read the
        // test's private directory: keep the user it was started as.
        let user = if nix::unistd::getuid().is_root() {
            "user root\n"
        } else {
            ""
        };
        fs::write(
            &conf,
            format!(
                "{user}per_listener_settings false\n\
                 persistence true\n\
                 persistence_location {db}/\n\
                 autosave_interval 1\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n\
                 log_type notice\n\
                 listener {port} 127.0.0.1\n\
                 {extra}\n",
                db = db.display()
            ),
        )
        .unwrap();
        let mut broker = Mosquitto {
            port,
            conf,
            child: None,
            log: dir.join("mosquitto.log"),
        };
        broker.resume();
        broker
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tool("mosquitto", "mosquitto"))
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Stops it (SIGTERM, so it saves its database) and waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([format!("-{name}"), child.id().to_string()])
        .status();
}

/// Connection options for the mosquitto clients: `-p PORT` plus TLS files if any.
#[derive(Clone, Debug, Default)]
pub struct ClientArgs {
    pub port: u16,
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl ClientArgs {
    fn apply(&self, command: &mut Command) {
        // With TLS the broker's name is checked: its certificate is for localhost.
        let host = if self.tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        command.args(["-h", host, "-p", &self.port.to_string()]);
        if let Some((ca, cert, key)) = &self.tls {
            command
                .arg("--cafile")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
    }
}

/// `mosquitto_sub -v` in the background, its lines collected.
pub struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    /// Subscribes to `topics` (QoS 1). `session` keeps a persistent session under that client
    /// id, so that messages published while it is disconnected are kept for it.
    pub fn start(client: &ClientArgs, topics: &[&str], session: Option<&str>) -> Sub {
        let mut command = Command::new(tool("mosquitto_sub", "mosquitto-clients"));
        client.apply(&mut command);
        command.args(["-q", "1", "-v"]);
        if let Some(id) = session {
            command.args(["-c", "-i", id]);
        }
        for topic in topics {
            command.args(["-t", topic]);
        }
        command.arg("-t").arg(format!("{PREFIX}/probe"));
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let sub = Sub { child, lines };
        // Ready once it receives its own probe.
        let probe = format!("{PREFIX}/probe");
        wait_for(
            "the subscriber to be ready",
            Duration::from_secs(10),
            || {
                publish(client, &probe, b"probe", false);
                std::thread::sleep(Duration::from_millis(50));
                sub.lines()
                    .iter()
                    .any(|l| l.starts_with(&probe))
                    .then_some(())
            },
        );
        sub
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The JSON payloads received on `topic`, in order.
    pub fn payloads(&self, topic: &str) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|line| line.strip_prefix(topic)?.strip_prefix(' '))
            .filter_map(|payload| serde_json::from_str(payload).ok())
            .collect()
    }

    /// The raw payloads received on `topic`.
    pub fn raw(&self, topic: &str) -> Vec<String> {
        self.lines()
            .iter()
            .filter_map(|line| Some(line.strip_prefix(topic)?.strip_prefix(' ')?.to_string()))
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto_pub`: one message from a file (binary-safe), QoS 1.
pub fn publish(client: &ClientArgs, topic: &str, payload: &[u8], retain: bool) {
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), payload).unwrap();
    let mut command = Command::new(tool("mosquitto_pub", "mosquitto-clients"));
    client.apply(&mut command);
    command
        .args(["-q", "1", "-t", topic])
        .arg("-f")
        .arg(file.path());
    if retain {
        command.arg("-r");
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One message per line of `lines`, in one connection (`mosquitto_pub -l`).
pub fn publish_lines(client: &ClientArgs, topic: &str, lines: &str) {
    let mut command = Command::new(tool("mosquitto_pub", "mosquitto-clients"));
    client.apply(&mut command);
    command.args(["-q", "1", "-t", topic, "-l"]);
    let mut child = command.stdin(Stdio::piped()).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// The retained message on `topic` (waits up to 5 s for one).
pub fn retained(client: &ClientArgs, topic: &str) -> Option<String> {
    let mut command = Command::new(tool("mosquitto_sub", "mosquitto-clients"));
    client.apply(&mut command);
    command.args(["-t", topic, "-C", "1", "-W", "5", "--retained-only"]);
    let out = command.output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    (!text.trim().is_empty()).then(|| text.trim_end().to_string())
}

/// A static file server on 127.0.0.1 with `Range` support; `chunk_delay` slows it down (so that
/// an install takes long enough to interrupt).
pub struct ImageServer {
    pub url: String,
    /// Requests still to be answered 404 (the image "not uploaded yet").
    pub missing: Arc<std::sync::atomic::AtomicUsize>,
}

impl ImageServer {
    pub fn start(image: Vec<u8>, chunk_delay: Duration) -> ImageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/image.img", listener.local_addr().unwrap());
        let image = Arc::new(image);
        let missing = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let answer_404 = missing.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let image = image.clone();
                let not_found = answer_404
                    .fetch_update(
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                        |n| n.checked_sub(1),
                    )
                    .is_ok();
                std::thread::spawn(move || serve(stream, &image, chunk_delay, not_found));
            }
        });
        ImageServer { url, missing }
    }
}

fn serve(mut stream: TcpStream, image: &[u8], chunk_delay: Duration, not_found: bool) {
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        request.push(byte[0]);
    }
    if not_found {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    }
    let request = String::from_utf8_lossy(&request).to_lowercase();
    let start = request
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.trim().strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < image.len());
    let (status, body) = match start {
        Some(n) => (
            format!(
                "206 Partial Content\r\nContent-Range: bytes {n}-{}/{}",
                image.len() - 1,
                image.len()
            ),
            &image[n..],
        ),
        None => ("200 OK".to_string(), image),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    for chunk in body.chunks(256 * 1024) {
        if stream.write_all(chunk).is_err() {
            return;
        }
        std::thread::sleep(chunk_delay);
    }
}

pub struct Signer {
    pub key: ed25519_dalek::SigningKey,
}

impl Signer {
    pub fn new() -> Signer {
        Signer {
            key: ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]),
        }
    }

    pub fn write_anchor(&self, dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        update_agent::keys::write_key_pair(&self.key, &dir.join("release")).unwrap();
        fs::remove_file(dir.join("release.key")).unwrap();
    }

    /// A signed release of `version` for `image` served at `url`.
    pub fn release(&self, version: &str, image: &Path, url: &str) -> Vec<u8> {
        self.release_with_deadline(version, image, url, None)
    }

    /// The same, with a signed install deadline.
    pub fn release_with_deadline(
        &self,
        version: &str,
        image: &Path,
        url: &str,
        deadline: Option<Timestamp>,
    ) -> Vec<u8> {
        let digest = digest_image(image, None).unwrap();
        let manifest = Manifest {
            format: FORMAT,
            version: version.into(),
            security_version: 2,
            compatible: COMPATIBLE.into(),
            created: Timestamp::now(),
            expires: None,
            security: true,
            severity: Severity::High,
            advisory: "Fixes the test's vulnerability.".into(),
            disruption: Disruption {
                reboot: true,
                downtime_seconds: 30,
            },
            deadline,
            rollout: None,
            images: [(
                "rootfs".to_string(),
                Image::uncompressed(url, digest.size, digest.sha256),
            )]
            .into_iter()
            .collect(),
        };
        sign_manifest(&manifest, &self.key)
            .unwrap()
            .to_json()
            .into_bytes()
    }
}

/// A gateway in a directory: two file slots, the file bootloader, boot facts, a config.
pub struct Device {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub boots: u32,
    agent: Option<Child>,
    runs: u32,
}

pub const SLOT_SIZE: u64 = 8 * 1024 * 1024;

impl Device {
    /// `mqtt` is the `[mqtt]` section's body (broker, TLS files) without device_id.
    pub fn new(dir: &Path, signer: &Signer, mqtt: &str) -> Device {
        Device::with_id(dir, signer, mqtt, DEVICE)
    }

    /// The same with another device id (several devices on one broker).
    pub fn with_id(dir: &Path, signer: &Signer, mqtt: &str, id: &str) -> Device {
        let keys = dir.join("keys.d");
        signer.write_anchor(&keys);
        fs::write(dir.join("slot-a.img"), vec![0xa5u8; SLOT_SIZE as usize]).unwrap();
        fs::write(dir.join("slot-b.img"), b"").unwrap();
        fs::write(
            dir.join("bootenv"),
            "BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\n",
        )
        .unwrap();
        let config = dir.join("agent.toml");
        let p = |name: &str| dir.join(name).display().to_string();
        fs::write(
            &config,
            format!(
                r#"[device]
compatible = "{COMPATIBLE}"
state_dir = "{state}"
factory_version = "1.0"
model = "Test Gateway"
support_end = "2031-12-31"

[trust]
keys_dir = "{keys}"
insecure_writable_anchor = true

[bootloader]
backend = "file"
path = "{bootenv}"

[slots]
a = {{ device = "{a}", bootname = "A", size = {SLOT_SIZE} }}
b = {{ device = "{b}", bootname = "B", size = {SLOT_SIZE} }}

[install]
checkpoint_interval = 1048576
stall_timeout = 10

[health]
commands = [["true"]]
timeout = 10

[system]
boot_id_path = "{boot_id}"
cmdline_path = "{cmdline}"
reboot_command = ["touch", "{reboot}"]

[dbus]
enabled = false

[mqtt]
device_id = "{id}"
keepalive = 5
reconnect_min = 0.05
reconnect_max = 0.5
{mqtt}
"#,
                state = p("state"),
                keys = keys.display(),
                bootenv = p("bootenv"),
                a = p("slot-a.img"),
                b = p("slot-b.img"),
                boot_id = p("boot_id"),
                cmdline = p("cmdline"),
                reboot = p("reboot-requested"),
            ),
        )
        .unwrap();
        let mut device = Device {
            dir: dir.to_owned(),
            config,
            boots: 0,
            agent: None,
            runs: 0,
        };
        device.set_boot("A");
        device
    }

    fn set_boot(&mut self, slot: &str) {
        self.boots += 1;
        fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        fs::write(
            self.dir.join("cmdline"),
            format!("console=ttyS0 update_agent.slot={slot}\n"),
        )
        .unwrap();
    }

    /// Starts `update-agent run`, logging to `agent-N.log` in the directory.
    pub fn start_agent(&mut self) {
        self.start_agent_with_env(&[]);
    }

    /// Starts `update-agent run` with extra environment variables.
    pub fn start_agent_with_env(&mut self, env: &[(&str, &std::ffi::OsStr)]) {
        assert!(self.agent.is_none());
        self.runs += 1;
        let log = fs::File::create(self.dir.join(format!("agent-{}.log", self.runs))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
            .args(["run", "--log", "stderr", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start update-agent run");
        self.agent = Some(child);
    }

    /// Stops the agent the way systemd does (SIGTERM) and waits for it.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut child = self.agent.take().expect("agent running");
        signal(&child, "TERM");
        child.wait().unwrap()
    }

    /// Kills the agent (SIGKILL: nothing cleaned up) and waits for it.
    pub fn kill_agent(&mut self) {
        let mut child = self.agent.take().expect("agent running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|child| child.try_wait().unwrap().is_none())
    }

    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|n| {
                let text =
                    fs::read_to_string(self.dir.join(format!("agent-{n}.log"))).unwrap_or_default();
                format!("--- agent run {n} ---\n{text}")
            })
            .collect()
    }

    pub fn reboot_requested(&self) -> bool {
        self.dir.join("reboot-requested").exists()
    }

    /// The reboot the agent asked for: stop it, let the boot script (simulated) pick the slot,
    /// change the boot facts; returns the slot that booted.
    pub fn reboot(&mut self) -> String {
        self.stop_agent();
        fs::remove_file(self.dir.join("reboot-requested")).unwrap();
        let booted = BootSim::new(
            SimEnv::File {
                path: self.dir.join("bootenv"),
            },
            &["A", "B"],
            3,
        )
        .boot()
        .unwrap();
        self.set_boot(&booted);
        booted
    }

    pub fn outbox_files(&self) -> usize {
        fs::read_dir(self.dir.join("state/outbox"))
            .map(|dir| {
                dir.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))
                })
                .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn topic(leaf: &str) -> String {
    topic_of(DEVICE, leaf)
}

pub fn topic_of(device: &str, leaf: &str) -> String {
    format!("{PREFIX}/devices/{device}/{leaf}")
}

pub fn fleet_topic() -> String {
    format!("{PREFIX}/fleet/{COMPATIBLE}/release")
}

/// An image that fills three quarters of a slot.
pub fn write_image(path: &Path) -> Vec<u8> {
    let image: Vec<u8> = b"rootfs 2.0 "
        .iter()
        .copied()
        .cycle()
        .take((SLOT_SIZE * 3 / 4) as usize)
        .collect();
    fs::write(path, &image).unwrap();
    image
}

/// The `state` field of each event received, in order.
pub fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["state"].as_str().unwrap_or("?").to_string())
        .collect()
}
