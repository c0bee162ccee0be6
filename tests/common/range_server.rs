//! A static file server on 127.0.0.1 for the delta tests: serves a directory, answering Range
//! requests as nginx does (one range: 206; several: 206 `multipart/byteranges`), as S3 does (one
//! range: 206; several: 200 with the whole file), or not at all (200 with the whole file). It
//! logs every request, in the order the requests arrived, with the bytes of body it sent.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeMode {
    Multi,
    Single,
    Ignore,
}

#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    pub body_bytes: u64,
}

pub struct RangeServer {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Logged>>>,
    /// Where `log()` starts: entries are never removed, so an answer still being sent when the
    /// log is cleared updates its own entry, not a later request's.
    log_start: Mutex<usize>,
    mode: Arc<Mutex<RangeMode>>,
    stop: Arc<AtomicBool>,
}

impl RangeServer {
    pub fn start(root: PathBuf, mode: RangeMode) -> RangeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mode = Arc::new(Mutex::new(mode));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (log, mode, stop) = (log.clone(), mode.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (root, log, mode) = (root.clone(), log.clone(), *mode.lock().unwrap());
                    std::thread::spawn(move || {
                        let _ = serve(stream, &root, mode, &log);
                    });
                }
            });
        }
        RangeServer {
            addr,
            log,
            log_start: Mutex::new(0),
            mode,
            stop,
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    pub fn set_mode(&self, mode: RangeMode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn log(&self) -> Vec<Logged> {
        let start = *self.log_start.lock().unwrap();
        self.log.lock().unwrap()[start..].to_vec()
    }

    pub fn clear_log(&self) {
        *self.log_start.lock().unwrap() = self.log.lock().unwrap().len();
    }

    /// Body bytes sent for `name`.
    pub fn bytes_of(&self, name: &str) -> u64 {
        let path = format!("/{name}");
        self.log()
            .iter()
            .filter(|l| l.path == path)
            .map(|l| l.body_bytes)
            .sum()
    }

    /// Body bytes of `206` answers for `name`: the ranges, without what a `200` sent before the
    /// client hung up.
    pub fn ranged_bytes_of(&self, name: &str) -> u64 {
        let path = format!("/{name}");
        self.log()
            .iter()
            .filter(|l| l.path == path && l.status == 206)
            .map(|l| l.body_bytes)
            .sum()
    }

    pub fn requests_of(&self, name: &str) -> usize {
        let path = format!("/{name}");
        self.log().iter().filter(|l| l.path == path).count()
    }
}

impl Drop for RangeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn parse_ranges(value: &str, len: u64) -> Option<Vec<(u64, u64)>> {
    let list = value.trim().strip_prefix("bytes=")?;
    let mut out = Vec::new();
    for part in list.split(',') {
        let (a, b) = part.trim().split_once('-')?;
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            len - 1
        } else {
            b.parse::<u64>().ok()?.min(len - 1)
        };
        if start > end || start >= len {
            return None;
        }
        out.push((start, end));
    }
    Some(out)
}

fn serve(
    stream: TcpStream,
    root: &std::path::Path,
    mode: RangeMode,
    log: &Mutex<Vec<Logged>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = Some(value.trim().to_string());
        }
    }
    // Logged on arrival, not when answered: a whole-file answer to a client that hung up may
    // end after the client's next request, and the tests read the log as the client's order.
    let entry = {
        let mut log = log.lock().unwrap();
        log.push(Logged {
            path: path.clone(),
            range: range.clone(),
            status: 0,
            body_bytes: 0,
        });
        log.len() - 1
    };
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stream);
    let file = root.join(path.trim_start_matches('/'));
    let Ok(data) = std::fs::File::open(&file).and_then(Served::open) else {
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        record(log, entry, 404, 0);
        return out.flush();
    };
    let len = data.len;
    let ranges = range
        .as_deref()
        .filter(|_| mode != RangeMode::Ignore && len > 0)
        .and_then(|r| parse_ranges(r, len));
    let (status, body_bytes) = match ranges {
        Some(ranges) if ranges.len() == 1 => {
            let (s, e) = ranges[0];
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{e}/{len}\r\nConnection: close\r\n\r\n",
                e - s + 1
            )?;
            data.copy(s, e + 1, &mut out)?;
            (206, e - s + 1)
        }
        Some(ranges) if mode == RangeMode::Multi => {
            let boundary = "3d6b6a416f9b5";
            let mut body = Vec::new();
            for (s, e) in &ranges {
                write!(
                    body,
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {s}-{e}/{len}\r\n\r\n"
                )?;
                data.copy(*s, *e + 1, &mut body)?;
            }
            write!(body, "\r\n--{boundary}--\r\n")?;
            write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary={boundary}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            out.write_all(&body)?;
            (206, body.len() as u64)
        }
        _ => {
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
            )?;
            // A client that wanted ranges hangs up early: count what went out before that.
            let mut sent = 0;
            let _ = data.copy_counted(0, len, &mut out, &mut sent);
            (200, sent)
        }
    };
    record(log, entry, status, body_bytes);
    out.flush()
}

/// The answer to the request logged at `entry`.
fn record(log: &Mutex<Vec<Logged>>, entry: usize, status: u16, body_bytes: u64) {
    let logged = &mut log.lock().unwrap()[entry];
    logged.status = status;
    logged.body_bytes = body_bytes;
}

/// A served file, read by position: a range costs its own bytes, not the file's.
struct Served {
    file: std::fs::File,
    len: u64,
}

impl Served {
    fn open(file: std::fs::File) -> std::io::Result<Served> {
        let len = file.metadata()?.len();
        Ok(Served { file, len })
    }

    fn copy(&self, start: u64, end: u64, out: &mut impl Write) -> std::io::Result<()> {
        self.copy_counted(start, end, out, &mut 0)
    }

    fn copy_counted(
        &self,
        start: u64,
        end: u64,
        out: &mut impl Write,
        sent: &mut u64,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            self.file.read_exact_at(&mut buf[..n], at)?;
            out.write_all(&buf[..n])?;
            out.flush()?;
            *sent += n as u64;
            at += n as u64;
        }
        Ok(())
    }
}
