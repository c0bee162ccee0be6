//! Install throughput and memory, printed as plain numbers (`cargo bench --bench
//! install_throughput`).
//!
//! 1. Time: a 512 MiB image (`BENCH_MIB` to change) served by a loopback HTTP server, installed
//!    into a file slot with hashing, checkpoints (`fdatasync` every 64 MiB) and the `O_DIRECT`
//!    read-back, against `dd bs=1M conv=fsync` of the same bytes into the same kind of file, in
//!    the same run, alternating, three rounds each; medians and their ratio.
//! 2. Peak RSS (VmHWM) of a child process doing one install, for 128 MiB and 1 GiB images.
//!
//! The release has no block index: this is the path of releases without one, where the stream
//! is hashed and the read-back hashes every byte again. `benches/install_vs_limits.sh` measures
//! the indexed path (one hash pass, in the read-back) against the machine's limits and RAUC.
//!
//! Knobs for finding where time goes: `BENCH_SOURCE=file` (no network), `BENCH_CHECKPOINT_MIB`
//! (0: no intermediate syncs), `BENCH_RSS=0` (skip the memory part).
//!
//! Data lives in a temporary directory under the target directory and is deleted at the end.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use update_agent::release::manifest::Image;
use update_agent::transfer::{TransferEvent, WriteRequest, install_image};

const MIB: u64 = 1024 * 1024;
const ROUNDS: usize = 3;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2..]);
        return;
    }
    // `cargo bench` passes `--bench`; any other argument is a filter meant for libtest.
    let mib: u64 = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);

    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    println!("install_throughput: data in {}", dir.path().display());

    let image_path = dir.path().join("image.raw");
    let sha = make_image(&image_path, mib * MIB);
    let server = Server::start(dir.path().to_path_buf());
    // BENCH_SOURCE=file takes the network out of the measurement.
    let url = match std::env::var("BENCH_SOURCE").as_deref() {
        Ok("file") => url::Url::from_file_path(&image_path).unwrap().to_string(),
        _ => server.url("image.raw"),
    };

    let mut dd_times = Vec::new();
    let mut install_times = Vec::new();
    let mut readback_times = Vec::new();
    for round in 1..=ROUNDS {
        let slot = dir.path().join("slot-dd");
        std::fs::write(&slot, b"").unwrap();
        let begun = Instant::now();
        let status = Command::new("dd")
            .arg(format!("if={}", image_path.display()))
            .arg(format!("of={}", slot.display()))
            .args(["bs=1M", "conv=fsync,notrunc", "status=none"])
            .status()
            .expect("dd");
        assert!(status.success());
        let dd = begun.elapsed();
        std::fs::remove_file(&slot).unwrap();

        let slot = dir.path().join("slot-install");
        std::fs::write(&slot, b"").unwrap();
        let (total, readback) = install_once(&url, &slot, mib * MIB, &sha);
        std::fs::remove_file(&slot).unwrap();

        println!(
            "  round {round}: dd {:.3} s, install {:.3} s (read-back {:.3} s)",
            dd.as_secs_f64(),
            total.as_secs_f64(),
            readback.as_secs_f64()
        );
        dd_times.push(dd);
        install_times.push(total);
        readback_times.push(readback);
    }
    let dd = median(&mut dd_times);
    let install = median(&mut install_times);
    let readback = median(&mut readback_times);
    let mb = (mib * MIB) as f64 / 1e6;
    println!(
        "{mib} MiB, median of {ROUNDS}: dd bs=1M conv=fsync {:.3} s ({:.0} MB/s); install {:.3} s ({:.0} MB/s, of which read-back {:.3} s); ratio {:.2}x",
        dd.as_secs_f64(),
        mb / dd.as_secs_f64(),
        install.as_secs_f64(),
        mb / install.as_secs_f64(),
        readback.as_secs_f64(),
        install.as_secs_f64() / dd.as_secs_f64()
    );
    std::fs::remove_file(&image_path).unwrap();

    // The floor under any install that hashes every byte twice (in, and read back).
    let block = vec![0x5au8; MIB as usize];
    let begun = Instant::now();
    let mut hasher = Sha256::new();
    for _ in 0..mib {
        hasher.update(&block);
    }
    std::hint::black_box(hasher.finalize());
    println!(
        "SHA-256 of {mib} MiB in memory, one thread: {:.3} s",
        begun.elapsed().as_secs_f64()
    );

    let rss_sizes: &[u64] = match std::env::var("BENCH_RSS").as_deref() {
        Ok("0") => &[],
        _ => &[128, 1024],
    };
    for &rss_mib in rss_sizes {
        let name = format!("image-{rss_mib}.raw");
        let path = dir.path().join(&name);
        let sha = make_image(&path, rss_mib * MIB);
        let slot = dir.path().join("slot-rss");
        std::fs::write(&slot, b"").unwrap();
        let output = Command::new(std::env::current_exe().unwrap())
            .arg("--child")
            .arg(server.url(&name))
            .arg(&slot)
            .arg((rss_mib * MIB).to_string())
            .arg(&sha)
            .output()
            .expect("child");
        assert!(
            output.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let hwm = String::from_utf8_lossy(&output.stdout).trim().to_string();
        println!("peak RSS (VmHWM) installing {rss_mib} MiB: {hwm}");
        std::fs::remove_file(&slot).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}

/// One install; returns the total time and the read-back part of it.
fn install_once(url: &str, slot: &Path, size: u64, sha: &str) -> (Duration, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut req = WriteRequest::new(image(url, size, sha), slot, size);
    if let Some(mib) = std::env::var("BENCH_CHECKPOINT_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        req.checkpoint_interval = mib * MIB;
    }
    let begun = Instant::now();
    let mut verifying = None;
    runtime
        .block_on(install_image(&req, &mut |event| {
            if event == TransferEvent::Verifying {
                verifying = Some(Instant::now());
            }
            Ok(())
        }))
        .expect("install");
    let total = begun.elapsed();
    (total, verifying.map_or(Duration::ZERO, |v| v.elapsed()))
}

fn child(args: &[String]) {
    let [url, slot, size, sha] = args else {
        panic!("--child URL SLOT SIZE SHA256");
    };
    install_once(url, Path::new(slot), size.parse().unwrap(), sha);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .map(|l| l["VmHWM:".len()..].trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("{hwm}");
}

fn image(url: &str, size: u64, sha: &str) -> Image {
    Image {
        url: url.to_string(),
        size,
        sha256: sha.to_string(),
        compression: None,
        transport_size: None,
        transport_sha256: None,
        chunks: None,
    }
}

/// Writes `size` pseudo-random bytes (incompressible, so no storage layer can cheat) and returns
/// their hex SHA-256.
fn make_image(path: &Path, size: u64) -> String {
    let mut file =
        std::io::BufWriter::with_capacity(MIB as usize, std::fs::File::create(path).unwrap());
    let mut hasher = Sha256::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    let mut block = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(MIB) as usize;
        hasher.update(&block[..n]);
        file.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
    hex::encode(hasher.finalize())
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The smallest HTTP/1.1 server that serves files from a directory: one thread per connection,
/// `std::io::copy` (sendfile on Linux) for the body, so the server costs the client little CPU.
struct Server {
    port: u16,
}

impl Server {
    fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let root = root.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &root);
                });
            }
        });
        Server { port }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

fn serve(mut stream: TcpStream, root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let name = request
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .trim_start_matches('/');
    let Ok(mut file) = std::fs::File::open(root.join(name)) else {
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return Ok(());
    };
    let len = file.metadata()?.len();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    std::io::copy(&mut file, &mut stream)?;
    Ok(())
}
