//! ETSI TS 103 701 "power cut at any point": whole install cycles through the built binary, each
//! cut short by `UPDATE_AGENT_CRASH_AT=<point>` on one agent process (it SIGKILLs itself there;
//! the test checks it died by signal 9 at that point, so a point that never fires fails), then
//! what a power cut means for the device: the boot simulator picks the next slot from the
//! bootloader environment as the boot script would, the kernel gets a new boot id and the booted
//! slot on its command line, and the bytes of slot B past the last persisted checkpoint (`durable`
//! in state.json) are overwritten with garbage, for the page cache that was lost. Then the agent
//! starts as a boot starts it (`boot-check`), `install` is offered again when nothing of the
//! transaction survived, and the cycle goes on through the reboots it asks for until it ends.
//!
//! After every step (the cut, each agent run, each simulated boot) the test checks:
//! 1. slot A, booted when the install started, is byte-identical to before;
//! 2. the bootloader never names B as the next slot unless B holds the image: the simulator run
//!    on a copy of the environment, and the agent's own `primary()` where it names one, agree;
//!    B reachable at all (by a reset of the counters or flags) holds its old content or the
//!    image, never a half-written mix; a slot the simulator actually boots holds the image. (B is
//!    compared with the image file, whose SHA-256 is the signed manifest's; the end of each cycle
//!    hashes slot B itself.)
//!
//! At the end of each cycle:
//! 3. `status --json` says phase `idle`, and the outcome is the expected one: committed (B's
//!    SHA-256 is the manifest's, B is primary, a `committed` event) or rolled back (an event
//!    `rolled-back` with reason `health-check-failed`, A primary, B not bootable);
//! 4. the event log holds the sequence numbers `0..next_seq`, each once, in order, and what it
//!    held at the cut is unchanged. The engine's contract (`PersistentState::recent_events`): a
//!    seq is persisted with its transition before the event is reported; the last transition's
//!    events are reported again after a restart with the same seq (at least once) and the log
//!    keeps each seq once; a transition not persisted is redone and its events get the same
//!    numbers. So no seq is reused for another event and no event of a transaction is lost: the
//!    log tells the whole story (accepted … committed / rolled-back).
//!
//! Cuts in the writing phase also check how the write resumed: from a checkpoint `D` inside the
//! image, the next download asks for `Range: bytes=D-`; from `D` = the image size, nothing is
//! downloaded again (only the read-back is left); from 0, without Range.
//!
//! Points covered (file bootloader unless said): in `install` — persist:writing:before|after,
//! bootloader:prepare:before|after (also U-Boot, GRUB), checkpoint:1|3|5 (5 = the whole image),
//! bytes:<2.5 MiB> (mid-interval, own test), readback:before, persist:activating:before|after,
//! bootloader:activate:before|after (also U-Boot; after also GRUB),
//! persist:reboot-pending:before|after, reboot:before; in the trial boot's `boot-check` —
//! persist:trial:before|after, health:before|after, persist:committing:before|after,
//! bootloader:mark-good:before (also U-Boot, GRUB)|after, persist:idle:before|after; on the
//! rollback path (health check fails) — health:after, persist:rolling-back:before|after,
//! bootloader:mark-bad:before|after (after also U-Boot), reboot:before, and in the boot back in
//! A persist:idle:after and bootloader:mark-bad:before.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use Outcome::{Committed, RolledBack};
use Victim::{BootCheck, Install};
use common::boot_sim::{BootSim, SimEnv};
use common::{GrubEnvFile, UBootEnvFile, pattern, sha256_hex};
use serde_json::Value;
use update_agent::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_update-agent");
const MIB: usize = 1024 * 1024;
/// With the minimum checkpoint interval of 1 MiB: five checkpoints, at 1, 2, 3 and 4 MiB and at
/// the whole image (reported once its hash matched).
const IMAGE_LEN: usize = 4 * MIB + 12345;
const SLOT_SIZE: usize = 5 * MIB;
const CHECKPOINT: usize = MIB;
const ATTEMPTS: u32 = 3;
/// More agent runs than any cycle needs: a cycle that does not end by then is stuck.
const MAX_RUNS: usize = 8;

// ------------------------------------------------------------------------------------------
// A small HTTP server on 127.0.0.1 that honours `Range: bytes=N-` and logs every request

#[derive(Debug, Clone)]
struct Request {
    range: Option<String>,
}

struct Server {
    port: u16,
    log: Arc<Mutex<Vec<Request>>>,
}

/// How fast the server sends a whole image (a request without `Range`): `chunk` bytes, then a
/// pause. Resumed downloads go at full speed.
#[derive(Clone, Copy)]
struct Throttle {
    chunk: usize,
    pause: Duration,
}

impl Server {
    fn start(data: Arc<Vec<u8>>, throttle: Option<Throttle>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = log.clone();
        // The thread ends with the test process; it only ever serves this test's agent.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (data, log) = (data.clone(), shared.clone());
                std::thread::spawn(move || {
                    // The agent may be killed mid-body: a failed write just ends the response.
                    let _ = respond(stream, &data, &log, throttle);
                });
            }
        });
        Server { port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/image.img", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

fn respond(
    stream: TcpStream,
    data: &[u8],
    log: &Mutex<Vec<Request>>,
    throttle: Option<Throttle>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_owned());
        }
    }
    log.lock().unwrap().push(Request {
        range: range.clone(),
    });
    let mut stream = stream;
    if !request_line.starts_with("GET /image.img ") {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    }
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < data.len());
    let head = match start {
        Some(n) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {n}-{}/{}\r\nConnection: close\r\n\r\n",
            data.len() - n,
            data.len() - 1,
            data.len()
        ),
        None => format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        ),
    };
    stream.write_all(head.as_bytes())?;
    let body = &data[start.unwrap_or(0)..];
    match throttle.filter(|_| start.is_none()) {
        None => stream.write_all(body)?,
        Some(t) => {
            for chunk in body.chunks(t.chunk) {
                stream.write_all(chunk)?;
                std::thread::sleep(t.pause);
            }
        }
    }
    stream.flush()
}

// ------------------------------------------------------------------------------------------
// The device: two file slots, a bootloader environment, the agent's config and a release

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loader {
    /// The agent's file backend (U-Boot rules), for the fast sweep.
    File,
    /// A real U-Boot environment in a file, through libubootenv's fw_printenv/fw_setenv.
    UBoot,
    /// A grubenv file through grub-editenv (RAUC's ORDER, x_OK, x_TRY).
    Grub,
}

enum BootEnv {
    File(PathBuf),
    UBoot(UBootEnvFile),
    Grub(GrubEnvFile),
}

impl BootEnv {
    fn sim_env(&self) -> SimEnv {
        match self {
            BootEnv::File(path) => SimEnv::File { path: path.clone() },
            BootEnv::UBoot(env) => SimEnv::UBoot {
                fw_printenv: env.fw_printenv.clone(),
                fw_setenv: env.fw_setenv.clone(),
                config: env.config.clone(),
            },
            BootEnv::Grub(env) => SimEnv::Grub {
                editenv: env.editenv.clone(),
                grubenv: env.grubenv.clone(),
            },
        }
    }

    /// The variables as stored (a later line wins, as in the simulator).
    fn vars(&self) -> Vec<(String, String)> {
        let text = match self {
            BootEnv::File(path) => fs::read_to_string(path).unwrap_or_default(),
            BootEnv::UBoot(env) => env.printenv(),
            BootEnv::Grub(env) => env.list(),
        };
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    fn var(&self, name: &str) -> Option<String> {
        self.vars()
            .into_iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Whether the boot script can ever pick B again without the agent: on U-Boot any slot in
    /// `BOOT_ORDER` (when no slot has tries left, the script gives every slot its tries back);
    /// on GRUB a slot in `ORDER` whose `OK` is 1 (the fallback clears the TRY flags of OK slots;
    /// when nothing qualifies it boots entry 0, which is A).
    fn b_reachable(&self) -> bool {
        let order_var = match self {
            BootEnv::Grub(_) => "ORDER",
            _ => "BOOT_ORDER",
        };
        let order = self
            .var(order_var)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "A B".into());
        let in_order = order.split_whitespace().any(|w| w == "B");
        match self {
            BootEnv::Grub(_) => in_order && self.var("B_OK").as_deref() == Some("1"),
            _ => in_order,
        }
    }

    /// The slot the boot script would pick at the next power-on, found by running the simulator
    /// on a copy of the environment (the real one is not touched).
    fn peek_next(&self, scratch: &Path) -> Result<String, String> {
        let _ = fs::remove_dir_all(scratch);
        fs::create_dir_all(scratch).unwrap();
        let env = match self {
            BootEnv::File(path) => {
                let copy = scratch.join("bootenv");
                if path.exists() {
                    fs::copy(path, &copy).unwrap();
                }
                SimEnv::File { path: copy }
            }
            BootEnv::UBoot(env) => {
                let copy = scratch.join("uboot.env");
                fs::copy(&env.env, &copy).unwrap();
                let config = scratch.join("fw_env.config");
                let size = fs::metadata(&copy).unwrap().len();
                fs::write(&config, format!("{} 0x0 {:#x}\n", copy.display(), size)).unwrap();
                SimEnv::UBoot {
                    fw_printenv: env.fw_printenv.clone(),
                    fw_setenv: env.fw_setenv.clone(),
                    config,
                }
            }
            BootEnv::Grub(env) => {
                let copy = scratch.join("grubenv");
                fs::copy(&env.grubenv, &copy).unwrap();
                SimEnv::Grub {
                    editenv: env.editenv.clone(),
                    grubenv: copy,
                }
            }
        };
        BootSim::new(env, &["A", "B"], ATTEMPTS).boot()
    }
}

/// What a finished agent run left.
#[derive(Debug)]
enum Ran {
    Killed,
    Exited { reboot_requested: bool },
}

struct Device {
    dir: tempfile::TempDir,
    config: PathBuf,
    release: PathBuf,
    slot_a: PathBuf,
    slot_b: PathBuf,
    state_dir: PathBuf,
    reboots: PathBuf,
    boot_env: BootEnv,
    server: Server,
    image: Arc<Vec<u8>>,
    /// The image's SHA-256 as the signed manifest declares it.
    image_sha: String,
    a_original: Arc<Vec<u8>>,
    b_original: Arc<Vec<u8>>,
    boots: u32,
    booted: String,
    /// Everything that happened, for failure messages.
    journal: Vec<String>,
}

/// Whether slot bytes hold the image. They are compared with the image file, whose SHA-256 is
/// checked against the signed manifest when a device is set up (hashing the slot at every step
/// would cost more than the cycle); the end of each cycle hashes the slot itself.
fn holds_image(slot: &[u8]) -> bool {
    slot[..IMAGE_LEN] == bytes().image[..]
}

/// The bytes every test uses, made once: the image, what the slots hold before the install, and
/// the garbage a power cut leaves.
struct Bytes {
    image: Arc<Vec<u8>>,
    a: Arc<Vec<u8>>,
    b: Arc<Vec<u8>>,
    garbage: Vec<u8>,
}

fn bytes() -> &'static Bytes {
    static BYTES: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| Bytes {
        image: Arc::new(pattern(IMAGE_LEN, 0x1111)),
        a: Arc::new(pattern(SLOT_SIZE, 0xaaaa)),
        b: Arc::new(pattern(SLOT_SIZE, 0xbbbb)),
        garbage: pattern(SLOT_SIZE, 0xdead),
    })
}

fn run_bin(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut command = Command::new(BIN);
    for arg in args {
        command.arg(arg);
    }
    command.env_remove("UPDATE_AGENT_CRASH_AT");
    command.output().expect("run update-agent")
}

fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Device {
    fn new(case: &Case) -> Device {
        let healthy = case.outcome == Outcome::Committed;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let image = bytes().image.clone();
        let server = Server::start(image.clone(), case.throttle);

        let out = run_bin(&[&"keygen", &"--out", &root.join("signer")]);
        assert_ok(&out, "keygen");
        fs::create_dir(root.join("keys")).unwrap();
        fs::rename(root.join("signer.pub"), root.join("keys/signer.pub")).unwrap();
        fs::write(root.join("image.img"), &*image).unwrap();
        let release = root.join("release.json");
        let out = run_bin(&[
            &"release",
            &"create",
            &"--key",
            &root.join("signer.key"),
            &"--image",
            &root.join("image.img"),
            &"--version",
            &"2026.07.0",
            &"--security-version",
            &"7",
            &"--compatible",
            &"acme-gw-1",
            &"--url",
            &server.url(),
            &"--no-chunks",
            &"--reboot",
            &"--out",
            &release,
        ]);
        assert_ok(&out, "release create");
        let out = run_bin(&[&"release", &"inspect", &"--json", &release]);
        assert_ok(&out, "release inspect");
        let inspected: Value = serde_json::from_slice(&out.stdout).unwrap();
        let image_sha = inspected["manifest"]["images"]["rootfs"]["sha256"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            image_sha,
            sha256_hex(&image),
            "the release names the image's hash"
        );

        let slot_a = root.join("slot-a.img");
        let slot_b = root.join("slot-b.img");
        let (a, b) = (bytes().a.clone(), bytes().b.clone());
        fs::write(&slot_a, &*a).unwrap();
        fs::write(&slot_b, &*b).unwrap();

        // A board as RAUC sets it up: both slots in the order, full try budgets.
        let (boot_env, bootloader_toml) = match case.loader {
            Loader::File => {
                let path = root.join("bootenv");
                fs::write(
                    &path,
                    format!("BOOT_ORDER=A B\nBOOT_A_LEFT={ATTEMPTS}\nBOOT_B_LEFT={ATTEMPTS}\n"),
                )
                .unwrap();
                let toml = format!(
                    "backend = \"file\"\npath = \"{}\"\nattempts = {ATTEMPTS}\n",
                    path.display()
                );
                (BootEnv::File(path), toml)
            }
            Loader::UBoot => {
                let env = UBootEnvFile::create(root, common::UBOOT_ENV_SIZE);
                env.set("BOOT_ORDER", "A B");
                env.set("BOOT_A_LEFT", &ATTEMPTS.to_string());
                env.set("BOOT_B_LEFT", &ATTEMPTS.to_string());
                let toml = format!(
                    "backend = \"uboot\"\nfw_env_config = \"{}\"\nattempts = {ATTEMPTS}\nfw_printenv = \"{}\"\nfw_setenv = \"{}\"\n",
                    env.config.display(),
                    env.fw_printenv.display(),
                    env.fw_setenv.display()
                );
                (BootEnv::UBoot(env), toml)
            }
            Loader::Grub => {
                let env = GrubEnvFile::create(root);
                for (name, value) in [
                    ("ORDER", "A B"),
                    ("A_OK", "1"),
                    ("A_TRY", "0"),
                    ("B_OK", "1"),
                    ("B_TRY", "0"),
                ] {
                    env.set(name, value);
                }
                let toml = format!(
                    "backend = \"grub\"\ngrubenv = \"{}\"\ngrub_editenv = \"{}\"\n",
                    env.grubenv.display(),
                    env.editenv.display()
                );
                (BootEnv::Grub(env), toml)
            }
        };

        let state_dir = root.join("state");
        let reboots = root.join("reboot-requests");
        let health = if healthy { "true" } else { "false" };
        let config = root.join("agent.toml");
        fs::write(
            &config,
            format!(
                r#"[device]
compatible = "acme-gw-1"
state_dir = "{state}"
factory_version = "2026.01.0"

[trust]
keys_dir = "{keys}"
insecure_writable_anchor = true

[bootloader]
{bootloader_toml}
[slots]
class = "rootfs"
a = {{ device = "{a}", bootname = "A", size = {SLOT_SIZE} }}
b = {{ device = "{b}", bootname = "B", size = {SLOT_SIZE} }}

[install]
checkpoint_interval = {interval}
stall_timeout = 10

[health]
commands = [["{health}"]]
timeout = 10

[system]
boot_id_path = "{boot_id}"
cmdline_path = "{cmdline}"
reboot_command = ["sh", "-c", "echo reboot >> {reboots}"]
"#,
                state = state_dir.display(),
                keys = root.join("keys").display(),
                a = slot_a.display(),
                b = slot_b.display(),
                boot_id = root.join("boot_id").display(),
                cmdline = root.join("cmdline").display(),
                reboots = reboots.display(),
                interval = case.checkpoint_interval,
            ),
        )
        .unwrap();

        Device {
            config,
            release,
            slot_a,
            slot_b,
            state_dir,
            reboots,
            boot_env,
            server,
            image_sha,
            image,
            a_original: a,
            b_original: b,
            boots: 0,
            booted: String::new(),
            journal: Vec::new(),
            dir,
        }
    }

    fn note(&mut self, line: String) {
        self.journal.push(line);
    }

    fn journal(&self) -> String {
        self.journal.join("\n")
    }

    /// Powers the device on: the boot script picks a slot, the kernel gets a new boot id and
    /// tells the system which slot it came from.
    fn power_on(&mut self) {
        let sim = BootSim::new(self.boot_env.sim_env(), &["A", "B"], ATTEMPTS);
        let booted = sim
            .boot()
            .unwrap_or_else(|e| panic!("the board does not boot: {e}\n{}", self.journal()));
        self.boots += 1;
        let root = self.dir.path();
        fs::write(root.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        fs::write(
            root.join("cmdline"),
            format!("console=ttyS0 update_agent.slot={booted} rootwait\n"),
        )
        .unwrap();
        self.note(format!("power on #{}: booted {booted}", self.boots));
        if booted == "B" {
            assert!(
                self.b_holds_image(),
                "the bootloader booted slot B, which does not hold the verified image\n{}",
                self.journal()
            );
        }
        self.booted = booted;
    }

    /// What a power cut loses besides the running process: slot bytes past the last persisted
    /// checkpoint that were only in the page cache. Only while writing, and only if the agent
    /// wrote anything at all (a slot it never touched has nothing in the page cache).
    fn lose_page_cache(&mut self) -> Option<u64> {
        let state = self.state();
        if state["phase"]["phase"] != "writing" {
            return None;
        }
        let durable = state["phase"]["durable"].as_u64().unwrap();
        let mut b = fs::read(&self.slot_b).unwrap();
        if b != *self.b_original {
            let garbage = &bytes().garbage;
            b[durable as usize..].copy_from_slice(&garbage[durable as usize..]);
            fs::write(&self.slot_b, &b).unwrap();
            self.note(format!(
                "power cut: slot B scribbled from {durable} (last checkpoint)"
            ));
        }
        Some(durable)
    }

    fn b_holds_image(&self) -> bool {
        holds_image(&fs::read(&self.slot_b).unwrap())
    }

    /// The SHA-256 of slot B's first `IMAGE_LEN` bytes, read from the file.
    fn b_sha(&self) -> String {
        let b = fs::read(&self.slot_b).unwrap();
        sha256_hex(&b[..IMAGE_LEN])
    }

    fn state(&self) -> Value {
        match fs::read(self.state_dir.join("state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                serde_json::json!({"phase": {"phase": "idle"}, "next_seq": 0})
            }
            Err(e) => panic!("cannot read state.json: {e}"),
        }
    }

    fn events(&self) -> Vec<Value> {
        let text = fs::read_to_string(self.state_dir.join("events.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("event log line {l:?} is not JSON: {e}"))
            })
            .collect()
    }

    fn reboot_requests(&self) -> usize {
        fs::read_to_string(&self.reboots)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn status(&self) -> Value {
        let out = run_bin(&[&"status", &"--config", &self.config, &"--json"]);
        assert_ok(&out, "status --json");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs `install` or `boot-check`, SIGKILLed at `crash` when given.
    fn run(&mut self, command: &str, crash: Option<&str>) -> Ran {
        let requests_before = self.reboot_requests();
        let mut cmd = Command::new(BIN);
        cmd.arg(command).arg("--config").arg(&self.config);
        if command == "install" {
            cmd.arg(&self.release);
        }
        match crash {
            Some(point) => cmd.env("UPDATE_AGENT_CRASH_AT", point),
            None => cmd.env_remove("UPDATE_AGENT_CRASH_AT"),
        };
        let out = cmd.output().expect("run update-agent");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        self.note(format!(
            "{command} in {} (crash at {crash:?}): {:?}\n{stdout}{stderr}",
            self.booted, out.status
        ));
        if let Some(point) = crash {
            assert_eq!(
                out.status.signal(),
                Some(9),
                "{command} was to be killed at {point} but was not: the point never fired\n{}",
                self.journal()
            );
            assert!(
                stderr.contains(&format!("crash point {point}:")),
                "killed, but not at {point}\n{}",
                self.journal()
            );
            return Ran::Killed;
        }
        // `install` exits 0 when it stops for the reboot; `boot-check` exits 1 when it reports a
        // failed or rolled-back transaction (also one reported again after a restart).
        let code = out.status.code();
        assert!(
            code == Some(0) || (command == "boot-check" && code == Some(1)),
            "{command} ended with {:?}\n{}",
            out.status,
            self.journal()
        );
        let phase = self.state()["phase"]["phase"].clone();
        Ran::Exited {
            reboot_requested: self.reboot_requests() > requests_before || phase == "reboot-pending",
        }
    }

    /// The invariants that hold at every moment, crash or not.
    fn check(&self, when: &str) {
        let ctx = || format!("{when}\n{}", self.journal());
        assert!(
            fs::read(&self.slot_a).unwrap() == *self.a_original,
            "slot A (booted when the install started) changed: {}",
            ctx()
        );
        let b = fs::read(&self.slot_b).unwrap();
        let next = self
            .boot_env
            .peek_next(&self.dir.path().join("peek"))
            .unwrap_or_else(|e| panic!("no slot would boot: {e}: {}", ctx()));
        if next == "B" {
            assert!(
                holds_image(&b),
                "the bootloader names slot B as next, but B does not hold the verified image: {}",
                ctx()
            );
        }
        // The agent's own reading of the environment (what `status` shows as primary) agrees
        // with the boot script; `None` (no slot has tries left) is where the script resets.
        let config = Config::load(&self.config).unwrap();
        let primary = update_agent::bootloader::open(&config)
            .unwrap()
            .primary()
            .unwrap();
        if let Some(primary) = &primary {
            assert_eq!(
                *primary,
                next,
                "the agent's primary and the boot script disagree: {}",
                ctx()
            );
        }
        // B reachable at all (by a reset of the counters or flags) holds its old content or
        // the image, never a mix.
        if self.boot_env.b_reachable() {
            assert!(
                b == *self.b_original || holds_image(&b),
                "slot B can still be booted ({:?}) but holds a partial write: {}",
                self.boot_env.vars(),
                ctx()
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// One cycle with one power cut

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    /// `install`, started in slot A.
    Install,
    /// The n-th `boot-check` of the cycle (1: the first boot after the install's reboot).
    BootCheck(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// The trial's health check fails: rolled back to A.
    RolledBack,
}

struct Case {
    point: String,
    victim: Victim,
    outcome: Outcome,
    loader: Loader,
    throttle: Option<Throttle>,
    checkpoint_interval: usize,
}

/// What a cycle observed, for the case-specific checks.
struct Cycle {
    device: Device,
    /// `durable` of the writing phase at the crash, if it was writing.
    durable_at_crash: Option<u64>,
    /// How many HTTP requests were made before the crash.
    requests_at_crash: usize,
    /// Slot B's bytes at the crash, before the page cache was lost.
    b_at_crash: Vec<u8>,
}

fn cut(point: &'static str, victim: Victim, outcome: Outcome) -> Cycle {
    run_case(&Case {
        point: point.to_owned(),
        victim,
        outcome,
        loader: Loader::File,
        throttle: None,
        checkpoint_interval: CHECKPOINT,
    })
}

fn run_case(case: &Case) -> Cycle {
    let mut dev = Device::new(case);
    dev.power_on();
    assert_eq!(dev.booted, "A", "the device starts in slot A");
    // The commit unit runs boot-check at every boot; with nothing to do it marks A good.
    dev.run("boot-check", None);
    dev.check("before the install");

    let mut crashed = None;
    let mut boot_checks = 0;
    let mut installs = 1;
    let victim_now = |v: Victim| (v == case.victim).then_some(case.point.as_str());
    let mut ran = dev.run("install", victim_now(Victim::Install));
    for _ in 0..MAX_RUNS {
        match ran {
            Ran::Killed => {
                dev.check(&format!("right after the crash at {}", case.point));
                let b = fs::read(&dev.slot_b).unwrap();
                let requests = dev.server.requests().len();
                let events = dev.events();
                let durable = dev.lose_page_cache();
                crashed = Some((durable, requests, b, events));
                dev.power_on();
            }
            Ran::Exited {
                reboot_requested: true,
            } => dev.power_on(),
            Ran::Exited {
                reboot_requested: false,
            } => {
                let state = dev.state();
                assert_eq!(
                    state["phase"]["phase"],
                    "idle",
                    "the agent stopped in the middle of a transaction without asking for a \
                     reboot: stuck\n{}",
                    dev.journal()
                );
                if state["last"].is_null() && installs < 2 {
                    // Nothing of the transaction survived the cut: the release is offered again
                    // (as the retained MQTT message would be at start-up).
                    installs += 1;
                    dev.check("before installing again");
                    ran = dev.run("install", None);
                    dev.check("after installing again");
                    continue;
                }
                break;
            }
        }
        dev.check(&format!(
            "after power-on #{} into {}",
            dev.boots, dev.booted
        ));
        boot_checks += 1;
        ran = dev.run("boot-check", victim_now(Victim::BootCheck(boot_checks)));
        dev.check(&format!("after boot-check #{boot_checks}"));
    }
    assert!(
        matches!(
            ran,
            Ran::Exited {
                reboot_requested: false
            }
        ),
        "the cycle did not end within {MAX_RUNS} runs\n{}",
        dev.journal()
    );
    let Some((durable_at_crash, requests_at_crash, b_at_crash, events_at_crash)) = crashed else {
        panic!(
            "the crash at {} never happened\n{}",
            case.point,
            dev.journal()
        );
    };

    check_outcome(&dev, case.outcome);
    check_events(&dev, case.outcome);
    // What was logged before the cut stays as it was: later events only come after it.
    let events = dev.events();
    assert_eq!(
        events[..events_at_crash.len()],
        events_at_crash[..],
        "the event log changed under the cut\n{}",
        dev.journal()
    );
    check_resume(&dev, durable_at_crash, requests_at_crash);
    Cycle {
        device: dev,
        durable_at_crash,
        requests_at_crash,
        b_at_crash,
    }
}

/// Assertion 3: idle, and the expected end.
fn check_outcome(dev: &Device, outcome: Outcome) {
    let status = dev.status();
    let journal = dev.journal();
    assert_eq!(status["phase"], "idle", "{status:#}\n{journal}");
    let state = dev.state();
    let next = dev
        .boot_env
        .peek_next(&dev.dir.path().join("peek"))
        .unwrap();
    match outcome {
        Outcome::Committed => {
            assert_eq!(state["last"]["result"], "committed", "{state:#}\n{journal}");
            assert_eq!(
                dev.b_sha(),
                dev.image_sha,
                "slot B, read from the file, does not have the image's SHA-256\n{journal}"
            );
            assert_eq!(state["slots"]["B"]["sha256"], dev.image_sha, "{journal}");
            assert_eq!(status["primary"], "B", "{status:#}\n{journal}");
            assert_eq!(next, "B", "{journal}");
            assert_eq!(state["slots"]["B"]["committed"], true, "{journal}");
            assert_eq!(state["floor"], 7, "the floor rises on commit\n{journal}");
        }
        Outcome::RolledBack => {
            assert_eq!(
                state["last"]["result"], "rolled-back",
                "{state:#}\n{journal}"
            );
            assert_eq!(
                state["last"]["reason"], "health-check-failed",
                "{state:#}\n{journal}"
            );
            assert_eq!(status["primary"], "A", "{status:#}\n{journal}");
            assert_eq!(next, "A", "{journal}");
            assert!(
                !dev.boot_env.b_reachable(),
                "the rolled-back slot can still be booted: {:?}\n{journal}",
                dev.boot_env.vars()
            );
            assert_eq!(state["floor"], 0, "a rolled-back release raises no floor");
        }
    }
}

/// Assertion 4: every persisted seq is in the log exactly once, in order, and the log tells
/// the whole story of the transaction.
fn check_events(dev: &Device, outcome: Outcome) {
    let events = dev.events();
    let journal = dev.journal();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let next_seq = dev.state()["next_seq"].as_u64().unwrap();
    let expected: Vec<u64> = (0..next_seq).collect();
    assert_eq!(
        seqs, expected,
        "event sequence numbers must be 0..next_seq, each once, in order\n{journal}"
    );
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    let story: &[&str] = match outcome {
        Outcome::Committed => &[
            "accepted",
            "writing",
            "written",
            "activated",
            "rebooting",
            "trial-boot",
            "committed",
        ],
        Outcome::RolledBack => &[
            "accepted",
            "writing",
            "written",
            "activated",
            "rebooting",
            "trial-boot",
            "rolling-back",
            "rolled-back",
        ],
    };
    // `rebooting` is the agent asking for the reboot. When the power failed after the
    // bootloader was switched and before that was persisted, the bootloader tried the new slot
    // at the next power-on without being asked: the trial follows `activated` directly.
    let unasked = states
        .windows(2)
        .any(|pair| pair == ["activated", "trial-boot"]);
    let mut rest = states.iter();
    for wanted in story {
        if *wanted == "rebooting" && unasked {
            continue;
        }
        assert!(
            rest.any(|s| s == wanted),
            "event {wanted} is missing or out of order in {states:?}\n{journal}"
        );
    }
    // One transaction, and nothing after its end.
    let txns: BTreeSet<&str> = events.iter().filter_map(|e| e["txn"].as_str()).collect();
    assert_eq!(txns.len(), 1, "{states:?}");
    let last = events.last().unwrap();
    match outcome {
        Outcome::Committed => assert_eq!(last["state"], "committed", "{states:?}"),
        Outcome::RolledBack => {
            assert_eq!(last["state"], "rolled-back", "{states:?}");
            assert!(last["reason"].is_string(), "{last}");
        }
    }
    // Every failure or rollback event says why.
    for event in &events {
        if matches!(
            event["state"].as_str(),
            Some("failed" | "rolled-back" | "rolling-back")
        ) {
            assert!(event["reason"].is_string(), "{event}");
        }
    }
}

/// How the write went on after a cut in the writing phase.
fn check_resume(dev: &Device, durable: Option<u64>, requests_at_crash: usize) {
    let requests = dev.server.requests();
    let after: Vec<_> = requests[requests_at_crash..].to_vec();
    let journal = dev.journal();
    match durable {
        Some(d) if d == IMAGE_LEN as u64 => assert!(
            after.is_empty(),
            "the whole image was durable: only the read-back was left, yet it was downloaded \
             again: {after:?}\n{journal}"
        ),
        Some(d) if d > 0 => {
            assert!(!after.is_empty(), "{journal}");
            assert_eq!(
                after[0].range.as_deref(),
                Some(format!("bytes={d}-").as_str()),
                "the write did not resume from the checkpoint {d}\n{journal}"
            );
        }
        _ => {
            if let Some(first) = after.first() {
                assert_eq!(first.range, None, "{journal}");
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// The sweep, file bootloader

// Before anything is persisted: nothing survives, the release is offered again.
#[test]
fn persist_writing_before() {
    let cycle = cut("persist:writing:before", Install, Committed);
    assert_eq!(cycle.durable_at_crash, None, "no transaction was persisted");
}

// The transaction is persisted, the target not yet marked bad, nothing written.
#[test]
fn persist_writing_after() {
    let cycle = cut("persist:writing:after", Install, Committed);
    assert_eq!(cycle.durable_at_crash, Some(0));
}

#[test]
fn prepare_before() {
    cut("bootloader:prepare:before", Install, Committed);
}

#[test]
fn prepare_after() {
    cut("bootloader:prepare:after", Install, Committed);
}

// Checkpoints: the fdatasync'ed offset is persisted, then the cut.
#[test]
fn checkpoint_1() {
    let cycle = cut("checkpoint:1", Install, Committed);
    assert_eq!(cycle.durable_at_crash, Some(CHECKPOINT as u64));
}

#[test]
fn checkpoint_3() {
    let cycle = cut("checkpoint:3", Install, Committed);
    assert_eq!(cycle.durable_at_crash, Some(3 * CHECKPOINT as u64));
}

// The last checkpoint is the whole image, reported once its hash matched.
#[test]
fn checkpoint_5_whole_image() {
    let cycle = cut("checkpoint:5", Install, Committed);
    assert_eq!(cycle.durable_at_crash, Some(IMAGE_LEN as u64));
}

#[test]
fn readback_before() {
    let cycle = cut("readback:before", Install, Committed);
    assert_eq!(cycle.durable_at_crash, Some(IMAGE_LEN as u64));
}

#[test]
fn persist_activating_before() {
    cut("persist:activating:before", Install, Committed);
}

#[test]
fn persist_activating_after() {
    cut("persist:activating:after", Install, Committed);
}

#[test]
fn activate_before() {
    cut("bootloader:activate:before", Install, Committed);
}

// B is activated but the state still says "activating": the next power-on boots B.
#[test]
fn activate_after() {
    cut("bootloader:activate:after", Install, Committed);
}

#[test]
fn persist_reboot_pending_before() {
    cut("persist:reboot-pending:before", Install, Committed);
}

#[test]
fn persist_reboot_pending_after() {
    cut("persist:reboot-pending:after", Install, Committed);
}

#[test]
fn reboot_before() {
    cut("reboot:before", Install, Committed);
}

// The trial boot in B.
#[test]
fn persist_trial_before() {
    cut("persist:trial:before", BootCheck(1), Committed);
}

#[test]
fn persist_trial_after() {
    cut("persist:trial:after", BootCheck(1), Committed);
}

#[test]
fn health_before() {
    cut("health:before", BootCheck(1), Committed);
}

#[test]
fn health_after() {
    cut("health:after", BootCheck(1), Committed);
}

#[test]
fn persist_committing_before() {
    cut("persist:committing:before", BootCheck(1), Committed);
}

#[test]
fn persist_committing_after() {
    cut("persist:committing:after", BootCheck(1), Committed);
}

#[test]
fn mark_good_before() {
    cut("bootloader:mark-good:before", BootCheck(1), Committed);
}

#[test]
fn mark_good_after() {
    cut("bootloader:mark-good:after", BootCheck(1), Committed);
}

#[test]
fn persist_idle_before_commit() {
    cut("persist:idle:before", BootCheck(1), Committed);
}

// Committed and persisted, the `committed` event not yet logged.
#[test]
fn persist_idle_after_commit() {
    cut("persist:idle:after", BootCheck(1), Committed);
}

// The rollback path: the trial's health check fails.
#[test]
fn rollback_health_after() {
    cut("health:after", BootCheck(1), RolledBack);
}

#[test]
fn rollback_persist_rolling_back_before() {
    cut("persist:rolling-back:before", BootCheck(1), RolledBack);
}

#[test]
fn rollback_persist_rolling_back_after() {
    cut("persist:rolling-back:after", BootCheck(1), RolledBack);
}

#[test]
fn rollback_mark_bad_before() {
    cut("bootloader:mark-bad:before", BootCheck(1), RolledBack);
}

#[test]
fn rollback_mark_bad_after() {
    cut("bootloader:mark-bad:after", BootCheck(1), RolledBack);
}

#[test]
fn rollback_reboot_before() {
    cut("reboot:before", BootCheck(1), RolledBack);
}

// Back in A: the rollback is finished and persisted, the `rolled-back` event not yet logged.
#[test]
fn rollback_persist_idle_after() {
    cut("persist:idle:after", BootCheck(2), RolledBack);
}

// Back in A: the final mark-bad that takes B out of the order for good.
#[test]
fn rollback_final_mark_bad_before() {
    cut("bootloader:mark-bad:before", BootCheck(2), RolledBack);
}

// ------------------------------------------------------------------------------------------
// A cut in the middle of a checkpoint interval resumes from the checkpoint

/// The slot writer hands data to the kernel in 1 MiB buffers, so with the minimum interval of
/// 1 MiB every write ends on a checkpoint: bytes past the last checkpoint are only ever in flight
/// at the interval's end. With 2 MiB, the writer writes 3 MiB (the second buffer) while only
/// 2 MiB are synced and persisted: a cut at `bytes:2.5 MiB` fires at the first progress report
/// after that write, in the middle of the interval from 2 to 4 MiB.
#[test]
fn mid_interval_cut_resumes_from_the_checkpoint() {
    let interval = 2 * MIB;
    let limit = interval + MIB / 2;
    let cycle = run_case(&Case {
        point: format!("bytes:{limit}"),
        victim: Install,
        outcome: Committed,
        loader: Loader::File,
        // Slow enough that progress (at most every 100 ms) is reported several times while the
        // writer is between 3 and 4 MiB.
        throttle: Some(Throttle {
            chunk: 32 * 1024,
            pause: Duration::from_millis(5),
        }),
        checkpoint_interval: interval,
    });
    let journal = cycle.device.journal();
    let durable = cycle
        .durable_at_crash
        .expect("the cut was in the writing phase") as usize;
    assert_eq!(durable, interval, "the persisted checkpoint\n{journal}");
    // The agent had written past the checkpoint when it died: the cut was mid-interval, and
    // those bytes are what the power cut lost.
    let image = &cycle.device.image;
    assert!(
        cycle.b_at_crash[durable..durable + MIB] == image[durable..durable + MIB],
        "the slot did not hold unsynced image bytes past the checkpoint at the cut\n{journal}"
    );
    let requests = cycle.device.server.requests();
    assert_eq!(cycle.requests_at_crash, 1, "{requests:?}");
    assert_eq!(requests[0].range, None);
    assert_eq!(
        requests.len(),
        2,
        "one download, one resumed download: {requests:?}"
    );
    assert_eq!(
        requests[1].range.as_deref(),
        Some(format!("bytes={durable}-").as_str()),
        "the second download did not resume from the checkpoint\n{journal}"
    );
}

// ------------------------------------------------------------------------------------------
// The bootloader points again, with U-Boot's own tools on a file environment

fn cut_uboot(point: &'static str, victim: Victim, outcome: Outcome) -> Cycle {
    run_case(&Case {
        point: point.to_owned(),
        victim,
        outcome,
        loader: Loader::UBoot,
        throttle: None,
        checkpoint_interval: CHECKPOINT,
    })
}

#[test]
fn uboot_prepare_after() {
    cut_uboot("bootloader:prepare:after", Install, Committed);
}

#[test]
fn uboot_activate_before() {
    cut_uboot("bootloader:activate:before", Install, Committed);
}

#[test]
fn uboot_activate_after() {
    cut_uboot("bootloader:activate:after", Install, Committed);
}

#[test]
fn uboot_mark_good_before() {
    cut_uboot("bootloader:mark-good:before", BootCheck(1), Committed);
}

#[test]
fn uboot_rollback_mark_bad_after() {
    cut_uboot("bootloader:mark-bad:after", BootCheck(1), RolledBack);
}

// And a few on GRUB (grub-editenv on a grubenv file), whose scheme gives a trial slot one try.

fn cut_grub(point: &'static str, victim: Victim, outcome: Outcome) -> Cycle {
    run_case(&Case {
        point: point.to_owned(),
        victim,
        outcome,
        loader: Loader::Grub,
        throttle: None,
        checkpoint_interval: CHECKPOINT,
    })
}

#[test]
fn grub_prepare_after() {
    cut_grub("bootloader:prepare:after", Install, Committed);
}

#[test]
fn grub_activate_after() {
    cut_grub("bootloader:activate:after", Install, Committed);
}

#[test]
fn grub_mark_good_before() {
    cut_grub("bootloader:mark-good:before", BootCheck(1), Committed);
}

// ------------------------------------------------------------------------------------------
// After the cycle: ordinary reboots keep the committed slot

/// No power cut: install, commit, then reboot the device a few times as its owner would, with
/// `boot-check` at every boot (the commit unit runs it). The committed slot must keep booting:
/// the boot scripts count every boot against the booted slot (U-Boot's `BOOT_x_LEFT`, GRUB's
/// `x_TRY`), so the running system has to be marked good at every boot, as RAUC's mark-good
/// service does.
fn committed_slot_keeps_booting(loader: Loader) {
    let case = Case {
        point: String::new(),
        victim: Install,
        outcome: Committed,
        loader,
        throttle: None,
        checkpoint_interval: CHECKPOINT,
    };
    let mut dev = Device::new(&case);
    dev.power_on();
    dev.run("boot-check", None);
    assert!(matches!(
        dev.run("install", None),
        Ran::Exited {
            reboot_requested: true
        }
    ));
    dev.power_on();
    assert_eq!(dev.booted, "B");
    dev.run("boot-check", None);
    assert_eq!(
        dev.state()["last"]["result"],
        "committed",
        "{}",
        dev.journal()
    );
    for _ in 0..2 * ATTEMPTS {
        dev.power_on();
        assert_eq!(
            dev.booted,
            "B",
            "the committed slot fell back after ordinary reboots\n{}",
            dev.journal()
        );
        assert!(matches!(
            dev.run("boot-check", None),
            Ran::Exited {
                reboot_requested: false
            }
        ));
        dev.check("after an ordinary reboot");
    }
    assert_eq!(dev.status()["primary"], "B");
    check_events(&dev, Committed);
}

#[test]
fn committed_slot_keeps_booting_file() {
    committed_slot_keeps_booting(Loader::File);
}

#[test]
fn committed_slot_keeps_booting_grub() {
    committed_slot_keeps_booting(Loader::Grub);
}
