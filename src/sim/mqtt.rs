//! The fleet's broker for the tests: a real mosquitto started on a free loopback port with a
//! generated config and stopped by its pid, and the real mosquitto clients (`mosquitto_sub`,
//! `mosquitto_pub`) as the operators' side.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::tools::{assert_exit, require};
use super::wait_for;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A mosquitto of the test's own.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// Its own directory, when the test gave none.
    _dir: Option<tempfile::TempDir>,
}

impl Mosquitto {
    /// Starts mosquitto on a free port with `extra` lines (TLS, ACL) added to a config that keeps
    /// its database in `dir`, so that a restart keeps retained messages and persistent sessions.
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
            _dir: None,
        };
        broker.resume();
        broker
    }

    /// Anonymous clients welcome, no TLS, its database in `dir`.
    pub fn plain(dir: &Path) -> Mosquitto {
        Mosquitto::start(dir, "allow_anonymous true")
    }

    /// The same in a temporary directory of its own.
    pub fn plain_temp() -> Mosquitto {
        Mosquitto::temp("allow_anonymous true")
    }

    /// [`Mosquitto::start`] with `extra` lines, in a temporary directory of its own.
    pub fn temp(extra: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("sim-mosquitto-")
            .tempdir()
            .unwrap();
        let mut broker = Mosquitto::start(dir.path(), extra);
        broker._dir = Some(dir);
        broker
    }

    /// `mqtt://127.0.0.1:PORT`, for the agent's config and the operator's tools.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The mosquitto clients' connection to this broker, without TLS.
    pub fn client(&self) -> ClientArgs {
        ClientArgs {
            port: self.port,
            tls: None,
        }
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(require("mosquitto", "mosquitto"))
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
            terminate(&child);
            let _ = child.wait();
        }
    }

    /// The running broker's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

/// SIGTERM to a child this process started, by its pid.
pub fn terminate(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// Connection options for the mosquitto clients: `-p PORT` plus TLS files if any.
#[derive(Clone, Debug, Default)]
pub struct ClientArgs {
    pub port: u16,
    /// CA, certificate and key files for mutual TLS.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl ClientArgs {
    /// `program` (a mosquitto client) connected to the broker.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(require(program, "mosquitto-clients"));
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
        command
    }

    /// An empty retained message on `topic`, QoS 1: it removes what the topic retains (what
    /// `rollout halt` and `release publish --clear` send).
    pub fn clear(&self, topic: &str) {
        let out = self
            .command("mosquitto_pub")
            .args(["-q", "1", "-r", "-n", "-t", topic])
            .output()
            .unwrap();
        assert_exit(&out, 0, "mosquitto_pub -n");
    }

    /// One message from a file (binary-safe), QoS 1.
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let file = tempfile::NamedTempFile::new().unwrap();
        fs::write(file.path(), payload).unwrap();
        let mut command = self.command("mosquitto_pub");
        command
            .args(["-q", "1", "-t", topic])
            .arg("-f")
            .arg(file.path());
        if retain {
            command.arg("-r");
        }
        let out = command.output().unwrap();
        assert_exit(&out, 0, "mosquitto_pub");
    }

    /// One message per line of `lines`, in one connection (`mosquitto_pub -l`).
    pub fn publish_lines(&self, topic: &str, lines: &str) {
        let mut command = self.command("mosquitto_pub");
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
    pub fn retained(&self, topic: &str) -> Option<String> {
        let mut command = self.command("mosquitto_sub");
        command.args(["-t", topic, "-C", "1", "-W", "5", "--retained-only"]);
        let out = command.output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        (!text.trim().is_empty()).then(|| text.trim_end().to_string())
    }

    /// The retained message on `topic`, as JSON.
    pub fn retained_json(&self, topic: &str) -> Value {
        let text = self
            .retained(topic)
            .unwrap_or_else(|| panic!("no retained message on {topic}"));
        serde_json::from_str(&text).unwrap()
    }

    /// `mosquitto_sub -v` in the background on `topics` (QoS 1), its lines collected. `session`
    /// keeps a persistent session under that client id, so that messages published while it is
    /// disconnected are kept for it.
    pub fn subscribe(&self, topics: &[&str], session: Option<&str>) -> Sub {
        let mut command = self.command("mosquitto_sub");
        command.args(["-q", "1", "-v"]);
        if let Some(id) = session {
            command.args(["-c", "-i", id]);
        }
        // Under the default prefix, where a test's ACL lets the operators read and write.
        let probe = &format!("{}/probe", crate::mqtt::topics::DEFAULT_PREFIX);
        for topic in topics.iter().chain([&probe.as_str()]) {
            command.args(["-t", topic]);
        }
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
        wait_for(
            "the subscriber to be ready",
            Duration::from_secs(10),
            || {
                self.publish(probe, b"probe", false);
                std::thread::sleep(Duration::from_millis(50));
                sub.lines().iter().any(|l| l.starts_with(probe))
            },
        );
        sub
    }
}

/// A running `mosquitto_sub -v`; ended by its pid when dropped.
pub struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The JSON payloads received on `topic`, in order.
    pub fn payloads(&self, topic: &str) -> Vec<Value> {
        self.raw(topic)
            .iter()
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

    /// Waits until an event whose `state` is `state` arrived on `topic`; every event so far.
    pub fn events_until(&self, topic: &str, state: &str, timeout: Duration) -> Vec<Value> {
        wait_for(&format!("{state} on {topic}"), timeout, || {
            let events = self.payloads(topic);
            events.iter().any(|e| e["state"] == state).then_some(events)
        })
    }

    /// Waits until `payload` arrived on `topic`.
    pub fn wait_raw(&self, topic: &str, payload: &str, timeout: Duration) {
        wait_for(&format!("{payload} on {topic}"), timeout, || {
            self.raw(topic).iter().any(|p| p == payload)
        })
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
