//! A RabbitMQ of the test's own (Debian's `rabbitmq-server`, MQTT plugin): one node or a cluster
//! of several on this machine, everything on 127.0.0.1 and free ports, with its own Erlang port
//! mapper (epmd), cookie, node names, configuration, data and logs in the test's directory.
//! Nothing of the machine's RabbitMQ (if any) is used or touched; every process is stopped by
//! its PID. RabbitMQ takes seconds to start (about 13 s for a node on a 2-core machine), so a
//! test starts it once.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One node: its name, its MQTT port, its server process (the `rabbitmq-server` script, which
/// stops the Erlang VM cleanly on SIGTERM).
pub struct Node {
    pub name: String,
    pub mqtt_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

pub struct RabbitMq {
    pub nodes: Vec<Node>,
    home: PathBuf,
    epmd_port: u16,
    epmd: Option<Child>,
    /// How long the nodes took until every one accepted MQTT connections.
    pub started_in: Duration,
}

impl RabbitMq {
    /// Starts `count` nodes (a cluster when more than one) and waits until every node accepts
    /// MQTT connections and, for a cluster, every node runs in it.
    pub fn start(dir: &Path, count: usize) -> RabbitMq {
        assert!(
            Path::new(SERVER).exists(),
            "RabbitMQ is not installed; install it with `apt-get install rabbitmq-server`"
        );
        let home = dir.join("rabbitmq");
        fs::create_dir_all(&home).unwrap();
        // The cookie that lets the nodes (and rabbitmqctl) talk to each other: random, ours.
        let cookie = home.join(".erlang.cookie");
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).unwrap();
        fs::write(&cookie, hex::encode(secret)).unwrap();
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400)).unwrap();
        let epmd_port = free_port();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start epmd (from erlang-base, a dependency of rabbitmq-server)");
        wait_until("epmd to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", epmd_port)).is_ok()
        });
        // Unique per run, so that two test runs never meet even through a shared epmd.
        let tag = format!("{:x}", std::process::id());
        let names: Vec<String> = (1..=count)
            .map(|n| format!("ua{n}-{tag}@localhost"))
            .collect();
        let started = Instant::now();
        let mut broker = RabbitMq {
            nodes: Vec::new(),
            home: home.clone(),
            epmd_port,
            epmd: Some(epmd),
            started_in: Duration::ZERO,
        };
        // One node after the other: the MQTT plugin's client-id registry (a Raft cluster)
        // refuses a node that asks to join before the first node has elected itself leader
        // ("NOT appended to log"), and the joining node then never accepts MQTT connections
        // (seen on 3.10.8 with three nodes started at once on a loaded machine).
        // An open port is not enough: until the registry has its quorum, a node answers
        // CONNECT with "server unavailable".
        for name in &names {
            let node = broker.start_node(name, &names);
            let port = node.mqtt_port;
            broker.nodes.push(node);
            wait_until(
                &format!("RabbitMQ node {name} to accept MQTT connections"),
                Duration::from_secs(180),
                || mqtt_accepts(port),
            );
        }
        if count > 1 {
            wait_until(
                "every node to run in the cluster",
                Duration::from_secs(60),
                || broker.running_nodes() == count,
            );
        }
        broker.started_in = started.elapsed();
        broker
    }

    fn start_node(&self, name: &str, cluster: &[String]) -> Node {
        let short = name.split('@').next().unwrap();
        let dir = self.home.join(short);
        fs::create_dir_all(&dir).unwrap();
        let mqtt_port = free_port();
        let mut conf = format!(
            "listeners.tcp = none\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n\
             mqtt.allow_anonymous = true\n\
             loopback_users = none\n\
             log.console = false\n\
             log.file.level = info\n"
        );
        if cluster.len() > 1 {
            conf.push_str("cluster_formation.peer_discovery_backend = classic_config\n");
            for (i, node) in cluster.iter().enumerate() {
                conf.push_str(&format!(
                    "cluster_formation.classic_config.nodes.{} = {node}\n",
                    i + 1
                ));
            }
        }
        fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        let log = fs::File::create(dir.join("server.log")).unwrap();
        let child = self
            .command(SERVER)
            .env("RABBITMQ_NODENAME", name)
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_PID_FILE", dir.join("beam.pid"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rabbitmq-server");
        Node {
            name: name.to_string(),
            mqtt_port,
            dir,
            child: Some(child),
        }
    }

    /// A command that finds this broker's epmd and cookie, and none of the machine's.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("HOME", &self.home)
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null")
            .current_dir(&self.home);
        command
    }

    /// The nodes' Erlang VMs (the PIDs they wrote to `RABBITMQ_PID_FILE`).
    pub fn vm_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|node| {
                fs::read_to_string(node.dir.join("beam.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// How many nodes the first node sees running in its cluster.
    pub fn running_nodes(&self) -> usize {
        let out = self
            .command(CTL)
            .args([
                "-n",
                &self.nodes[0].name,
                "cluster_status",
                "--formatter",
                "json",
            ])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["running_nodes"].as_array().map_or(0, Vec::len)
    }

    pub fn url(&self, node: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[node].mqtt_port)
    }

    /// The nodes' logs, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for node in &self.nodes {
            let log = node.dir.join("log").join(format!("{}.log", node.name));
            let body = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            text.push_str(&format!("--- {} ---\n", node.name));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Stops every node (SIGTERM to its server script, which stops the VM cleanly), then epmd.
    /// A VM that is still up after 30 s is killed by the PID it wrote, so that none outlives
    /// the test even when the script's clean stop hangs.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = &node.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let deadline = Instant::now() + Duration::from_secs(30);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if child.try_wait().ok().flatten().is_none() {
                    let vm = fs::read_to_string(node.dir.join("beam.pid")).unwrap_or_default();
                    if let Ok(pid) = vm.trim().parse::<u32>() {
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut epmd) = self.epmd.take() {
            let _ = epmd.kill();
            let _ = epmd.wait();
        }
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether an MQTT 3.1.1 CONNECT on `port` is answered with CONNACK "accepted".
fn mqtt_accepts(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let id = b"ready-probe";
    let mut packet = vec![0x10, (10 + 2 + id.len()) as u8];
    packet.extend_from_slice(b"\x00\x04MQTT\x04\x02\x00\x3c");
    packet.extend_from_slice(&[0, id.len() as u8]);
    packet.extend_from_slice(id);
    let mut answer = [0u8; 4];
    let accepted = stream.write_all(&packet).is_ok()
        && stream.read_exact(&mut answer).is_ok()
        && answer == [0x20, 0x02, 0x00, 0x00];
    let _ = stream.write_all(&[0xe0, 0x00]);
    accepted
}

fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
