//! How much CPU it costs to verify a release: the library call (in-process, many iterations)
//! and the whole `update-agent release verify` process (spawned N times; CPU from
//! getrusage(RUSAGE_CHILDREN)). Each is set against a baseline measured in the same run, so the
//! ratios mean something on a busy shared machine: a bare `Envelope::parse`, and `/bin/true`.
//!
//! Run: `cargo bench --bench verify`. Target: under 5 ms of CPU per `release verify`.

use std::fs;
use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePublicKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use jiff::Timestamp;
use nix::sys::resource::{UsageWho, getrusage};
use update_agent::anchor::TrustAnchor;
use update_agent::release::build::sign_manifest;
use update_agent::release::manifest::{ChunkIndexRef, Compression, Disruption, Image, Severity};
use update_agent::release::{Envelope, Manifest, Policy, verify};

const LIBRARY_ITERATIONS: usize = 5_000;
const PROCESS_RUNS: usize = 200;
const TARGET_CPU: Duration = Duration::from_millis(5);

/// A realistic release: every field, a compressed image with a chunk index, an advisory.
fn release(key: &SigningKey) -> Vec<u8> {
    let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".to_string();
    let manifest = Manifest {
        format: 1,
        version: "2026.06.1".into(),
        security_version: 12,
        compatible: "acme-gw-1".into(),
        created: "2026-05-01T00:00:00Z".parse().unwrap(),
        expires: Some("2099-01-01T00:00:00Z".parse().unwrap()),
        security: true,
        severity: Severity::High,
        advisory: "Fixes CVE-2026-0001 (remote code execution in the MQTT client) and \
                   CVE-2026-0002 (denial of service in the DHCP client)."
            .into(),
        disruption: Disruption {
            reboot: true,
            downtime_seconds: 90,
        },
        deadline: Some("2026-07-01T00:00:00Z".parse().unwrap()),
        images: [(
            "rootfs".to_string(),
            Image {
                url: "https://updates.example.com/acme-gw-1/2026.06.1/rootfs.img.zst".into(),
                size: 512 << 20,
                sha256: sha.clone(),
                compression: Some(Compression::Zstd),
                transport_size: Some(180 << 20),
                transport_sha256: Some(sha.clone()),
                chunks: Some(ChunkIndexRef {
                    url: "https://updates.example.com/acme-gw-1/2026.06.1/rootfs.img.chunks".into(),
                    sha256: sha,
                    chunk_size: 1 << 20,
                }),
            },
        )]
        .into_iter()
        .collect(),
        rollout: None,
    };
    sign_manifest(&manifest, key)
        .unwrap()
        .to_json()
        .into_bytes()
}

struct Stats {
    median: Duration,
    mean: Duration,
    /// User + system CPU per iteration, from getrusage.
    cpu: Duration,
}

fn cpu_time(who: UsageWho) -> Duration {
    let usage = getrusage(who).expect("getrusage");
    let to_duration = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    to_duration(usage.user_time()) + to_duration(usage.system_time())
}

fn measure(iterations: usize, who: UsageWho, mut f: impl FnMut()) -> Stats {
    for _ in 0..iterations / 10 {
        f(); // warm up caches and the allocator
    }
    let mut samples = Vec::with_capacity(iterations);
    let cpu_before = cpu_time(who);
    for _ in 0..iterations {
        let start = Instant::now();
        f();
        samples.push(start.elapsed());
    }
    let cpu = (cpu_time(who) - cpu_before) / iterations as u32;
    samples.sort();
    Stats {
        median: samples[iterations / 2],
        mean: samples.iter().sum::<Duration>() / iterations as u32,
        cpu,
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

/// One line per measurement: its median, mean and CPU time per iteration.
fn print_rows(rows: &[(&str, &Stats)]) {
    for (name, stats) in rows {
        println!(
            "  {name:<28} median {:>8.1} µs   mean {:>8.1} µs   cpu {:>8.1} µs",
            us(stats.median),
            us(stats.mean),
            us(stats.cpu)
        );
    }
}

fn main() {
    if cfg!(debug_assertions) {
        eprintln!("note: debug build; run `cargo bench --bench verify` for meaningful numbers");
    }
    let key = SigningKey::from_bytes(&[1; 32]);
    let release = release(&key);
    let anchor = TrustAnchor::from_keys([key.verifying_key()]);
    let policy = Policy {
        threshold: 1,
        compatible: Some("acme-gw-1".into()),
        floor: 10,
        now: Timestamp::now(),
    };
    verify(&release, &anchor, &policy).expect("the benchmark release verifies");

    println!("release: {} bytes\n", release.len());
    println!("library (in process, {LIBRARY_ITERATIONS} iterations each):");
    let parse = measure(LIBRARY_ITERATIONS, UsageWho::RUSAGE_SELF, || {
        black_box(Envelope::parse(black_box(&release)).unwrap());
    });
    let full = measure(LIBRARY_ITERATIONS, UsageWho::RUSAGE_SELF, || {
        black_box(verify(black_box(&release), &anchor, &policy).unwrap());
    });
    print_rows(&[("Envelope::parse (baseline)", &parse), ("verify", &full)]);
    println!(
        "  verify / parse: {:.1}x (median)\n",
        ratio(full.median, parse.median)
    );

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    fs::create_dir(&keys).unwrap();
    let pem = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    fs::write(keys.join("release.pub"), pem).unwrap();
    let release_path = dir.path().join("release.json");
    fs::write(&release_path, &release).unwrap();
    let binary = env!("CARGO_BIN_EXE_update-agent");

    let spawn = |command: &mut Command| {
        let status = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn");
        assert!(status.success(), "{command:?} failed: {status}");
    };
    println!("process ({PROCESS_RUNS} runs each, wall time per run, CPU = user+sys of the child):");
    let truth = measure(PROCESS_RUNS, UsageWho::RUSAGE_CHILDREN, || {
        spawn(&mut Command::new("/bin/true"))
    });
    let process = measure(PROCESS_RUNS, UsageWho::RUSAGE_CHILDREN, || {
        spawn(
            Command::new(binary)
                .args(["release", "verify", "--compatible", "acme-gw-1", "--keys"])
                .arg(&keys)
                .arg(&release_path),
        )
    });
    print_rows(&[
        ("/bin/true (baseline)", &truth),
        ("update-agent release verify", &process),
    ]);
    println!(
        "  release verify / true: {:.1}x wall (mean), {:.1}x cpu",
        ratio(process.mean, truth.mean),
        ratio(process.cpu, truth.cpu.max(Duration::from_micros(1)))
    );
    println!(
        "\ntarget: < {} ms CPU per `release verify`: {} ({:.2} ms)",
        TARGET_CPU.as_millis(),
        if process.cpu < TARGET_CPU {
            "met"
        } else {
            "NOT MET"
        },
        process.cpu.as_secs_f64() * 1e3
    );
}
