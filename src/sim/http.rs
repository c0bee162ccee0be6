//! The image server: HTTP/1.1 (or HTTPS) on 127.0.0.1, one blob of data served on the paths a
//! test names (or other bytes on a path of their own, [`Act::ServeFile`]: a release directory's
//! index and store), each path behaving in one chosen way ([`Act`]): honestly, with `Range` (single
//! ranges, and multi-range `multipart/byteranges` replies unless switched off), or with a fault
//! a broken or hostile server shows. Every request is logged ([`Seen`]); a [`Throttle`] slows the
//! bodies down so that an install takes long enough to interrupt.
//!
//! It runs on the caller's tokio runtime ([`ServerBuilder::start`], the demo and async tests), or
//! on a thread of its own for tests that block ([`ServerBuilder::start_background`]). Each
//! connection serves one request (`Connection: close`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does for one path.
#[derive(Clone, Debug)]
pub enum Act {
    /// Serves the data, honouring `Range` with 206.
    Serve,
    /// Serves these bytes as [`Act::Serve`] serves the data: a release directory's other files
    /// (a block index, a block store) beside its image.
    ServeFile(Arc<Vec<u8>>),
    /// Serves these bytes instead, with their Content-Length.
    Body(Vec<u8>),
    /// Ignores Range: always 200 with everything.
    IgnoreRange,
    /// Announces the full length, sends `after` bytes, closes cleanly.
    Truncate {
        after: usize,
    },
    /// No Content-Length (the end is the close): the data followed by `extra`.
    CloseDelimited {
        extra: Vec<u8>,
    },
    /// Announces a longer body than the data, then sends all of it plus `extra`.
    LongerLength {
        extra: Vec<u8>,
    },
    /// Sends headers and `after` bytes, then nothing, keeping the connection open.
    Stall {
        after: usize,
    },
    /// Sends `after` bytes, then resets the connection (TCP RST).
    Reset {
        after: usize,
    },
    /// Answers with this status and a short body.
    Status(u16),
    Redirect(String),
    /// The first `times` requests for the path get `act`, later ones are served.
    First {
        times: usize,
        act: Box<Act>,
    },
}

impl Act {
    /// `act` for the first request, then [`Act::Serve`].
    pub fn once(act: Act) -> Act {
        Act::First {
            times: 1,
            act: Box::new(act),
        }
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

/// Bodies go out `chunk` bytes at a time with `pause` after each.
#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    pub chunk: usize,
    pub pause: Duration,
}

pub struct ServerBuilder {
    data: Arc<Vec<u8>>,
    routes: HashMap<String, Act>,
    throttle: Option<Throttle>,
    multipart: bool,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl ServerBuilder {
    /// What to do for `path` (a path without a route is answered 404).
    pub fn route(mut self, path: &str, act: Act) -> ServerBuilder {
        self.routes.insert(path.to_owned(), act);
        self
    }

    pub fn throttle(mut self, chunk: usize, pause: Duration) -> ServerBuilder {
        self.throttle = Some(Throttle { chunk, pause });
        self
    }

    /// Whether a request for several ranges gets them as `multipart/byteranges` (the default)
    /// or, as some servers and CDNs do, the whole body with 200.
    pub fn multipart(mut self, on: bool) -> ServerBuilder {
        self.multipart = on;
        self
    }

    /// HTTPS with this acceptor.
    pub fn tls(mut self, acceptor: tokio_rustls::TlsAcceptor) -> ServerBuilder {
        self.tls = Some(acceptor);
        self
    }

    /// Starts serving on the current tokio runtime; stops when dropped.
    pub async fn start(self) -> io::Result<ImageServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tls = self.tls.clone();
        let shared = Arc::new(Shared {
            data: self.data,
            routes: self.routes,
            throttle: self.throttle,
            multipart: self.multipart,
            seen: Mutex::new(Vec::new()),
            body_bytes: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), tls.clone()));
        Ok(ImageServer {
            addr,
            tls: tls.is_some(),
            shared,
            stop: Stop::Task(task),
        })
    }

    /// Starts serving on a thread of its own with its own runtime, for a test that blocks (it
    /// runs the agent as a process); stops when dropped.
    pub fn start_background(self) -> io::Result<ImageServer> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            runtime.block_on(async move {
                let server = self.start().await;
                let ok = server.is_ok();
                let _ = ready_tx.send(server);
                if ok {
                    // Serve until the server is dropped (or the test goes away).
                    let _ = stopped.await;
                }
            });
        });
        let mut server = ready_rx
            .recv()
            .map_err(|_| io::Error::other("the image server's thread ended"))??;
        // The accept task lives in the thread's runtime, which ends with the thread.
        server.stop = Stop::Thread(Some(stop), Some(thread));
        Ok(server)
    }
}

struct Shared {
    data: Arc<Vec<u8>>,
    routes: HashMap<String, Act>,
    throttle: Option<Throttle>,
    multipart: bool,
    seen: Mutex<Vec<Seen>>,
    /// Bytes of response bodies sent, all paths together.
    body_bytes: AtomicU64,
}

enum Stop {
    Task(tokio::task::JoinHandle<()>),
    Thread(
        Option<tokio::sync::oneshot::Sender<()>>,
        Option<std::thread::JoinHandle<()>>,
    ),
}

pub struct ImageServer {
    pub addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    stop: Stop,
}

impl ImageServer {
    /// A server for `data`; nothing is served until a route says so.
    pub fn builder(data: Vec<u8>) -> ServerBuilder {
        ServerBuilder {
            data: Arc::new(data),
            routes: HashMap::new(),
            throttle: None,
            multipart: true,
            tls: None,
        }
    }

    /// `data` with these routes, on the current runtime.
    pub async fn serve(data: Vec<u8>, routes: Vec<(&str, Act)>) -> ImageServer {
        ImageServer::with_routes(data, routes)
            .start()
            .await
            .expect("an image server on 127.0.0.1")
    }

    /// `data` with these routes, on a thread of its own.
    pub fn background(data: Vec<u8>, routes: Vec<(&str, Act)>) -> ImageServer {
        ImageServer::with_routes(data, routes)
            .start_background()
            .expect("an image server on 127.0.0.1")
    }

    fn with_routes(data: Vec<u8>, routes: Vec<(&str, Act)>) -> ServerBuilder {
        routes
            .into_iter()
            .fold(ImageServer::builder(data), |b, (path, act)| {
                b.route(path, act)
            })
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Every request so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Bytes of response bodies sent so far (multipart framing included): what the clients
    /// downloaded.
    pub fn body_bytes(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::Relaxed)
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        match &mut self.stop {
            Stop::Task(task) => task.abort(),
            Stop::Thread(stop, thread) => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(mut stream) = acceptor.accept(stream).await {
                        let _ = respond(&mut stream, &shared).await;
                        let _ = stream.shutdown().await;
                    }
                }
                None => {
                    let mut stream = stream;
                    match respond(&mut stream, &shared).await {
                        Ok(Ending::Reset) => reset(stream),
                        _ => {
                            let _ = stream.shutdown().await;
                        }
                    }
                }
            }
        });
    }
}

fn reset(stream: TcpStream) {
    // Zero linger makes the close an RST rather than a FIN.
    let _ = stream.set_zero_linger();
    drop(stream);
}

enum Ending {
    Close,
    Reset,
}

/// The most a request head may be; a longer one is dropped unanswered.
const MAX_HEAD: usize = 16 * 1024;
const BOUNDARY: &str = "update-agent-sim-byteranges";

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
) -> io::Result<Ending> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > MAX_HEAD {
            return Ok(Ending::Close);
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
    let range = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_owned())
    });
    let earlier = {
        let mut seen = shared.seen.lock().unwrap();
        let earlier = seen.iter().filter(|s| s.path == path).count();
        seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
        });
        earlier
    };
    let act = match shared.routes.get(&path).cloned() {
        Some(Act::First { times, act }) if earlier < times => *act,
        Some(Act::First { .. }) => Act::Serve,
        Some(act) => act,
        None => Act::Status(404),
    };
    let (act, data) = match act {
        Act::ServeFile(file) => (Act::Serve, file),
        act => (act, shared.data.clone()),
    };
    let data = &data[..];
    let mut out = Writer {
        stream,
        throttle: shared.throttle,
        sent: &shared.body_bytes,
    };
    match act {
        Act::Serve => match ranges(range.as_deref(), data.len()) {
            Ranges::Whole => out.ok(data, data.len()).await?,
            Ranges::Unsatisfiable => {
                out.head(&format!(
                    "416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0",
                    data.len()
                ))
                .await?
            }
            Ranges::Some(list) if list.len() == 1 => {
                let (start, end) = list[0];
                out.head(&format!(
                    "206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}",
                    end + 1 - start,
                    data.len()
                ))
                .await?;
                out.body(&data[start..=end]).await?;
            }
            Ranges::Some(_) if !shared.multipart => out.ok(data, data.len()).await?,
            Ranges::Some(list) => {
                let body = multipart(data, &list);
                out.head(&format!(
                    "206 Partial Content\r\nContent-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {}",
                    body.len()
                ))
                .await?;
                out.body(&body).await?;
            }
        },
        Act::Body(body) => out.ok(&body, body.len()).await?,
        Act::IgnoreRange => out.ok(data, data.len()).await?,
        Act::Truncate { after } => out.ok(&data[..after], data.len()).await?,
        Act::CloseDelimited { extra } => {
            out.head("200 OK").await?;
            out.body(data).await?;
            out.body(&extra).await?;
        }
        Act::LongerLength { extra } => {
            out.ok(data, data.len() + extra.len()).await?;
            out.body(&extra).await?;
        }
        Act::Stall { after } => {
            out.ok(&data[..after], data.len()).await?;
            out.stream.flush().await?;
            // Far longer than any stall timeout in the tests; the runtime ends with the test.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Act::Reset { after } => {
            out.ok(&data[..after], data.len()).await?;
            out.stream.flush().await?;
            // Let the client read what was sent: an RST drops data still unread in its buffer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(Ending::Reset);
        }
        Act::First { .. } | Act::ServeFile(_) => unreachable!("resolved above"),
        Act::Status(status) => {
            out.head(&format!("{status} Oops\r\nContent-Length: 5"))
                .await?;
            out.body(b"oops\n").await?;
        }
        Act::Redirect(location) => {
            out.head(&format!(
                "302 Found\r\nLocation: {location}\r\nContent-Length: 0"
            ))
            .await?
        }
    }
    out.stream.flush().await?;
    Ok(Ending::Close)
}

struct Writer<'a, S> {
    stream: &'a mut S,
    throttle: Option<Throttle>,
    sent: &'a AtomicU64,
}

impl<S: AsyncWrite + Unpin> Writer<'_, S> {
    /// The status line and these header lines, then `Connection: close` and the blank line.
    async fn head(&mut self, status_and_headers: &str) -> io::Result<()> {
        let head = format!("HTTP/1.1 {status_and_headers}\r\nConnection: close\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await
    }

    /// 200 announcing `length` bytes, then `body` (which may be shorter or longer).
    async fn ok(&mut self, body: &[u8], length: usize) -> io::Result<()> {
        self.head(&format!("200 OK\r\nContent-Length: {length}"))
            .await?;
        self.body(body).await
    }

    async fn body(&mut self, body: &[u8]) -> io::Result<()> {
        match self.throttle {
            None => {
                self.stream.write_all(body).await?;
                self.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Some(Throttle { chunk, pause }) => {
                for piece in body.chunks(chunk.max(1)) {
                    self.stream.write_all(piece).await?;
                    self.sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
                    self.stream.flush().await?;
                    tokio::time::sleep(pause).await;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Ranges {
    /// No Range header, or one this server does not understand (a server may ignore Range).
    Whole,
    /// Inclusive `(first, last)` byte positions, each within the data.
    Some(Vec<(usize, usize)>),
    Unsatisfiable,
}

/// `Range: bytes=N-`, `N-M`, `-SUFFIX`, and lists of them (RFC 9110 §14.1.2).
fn ranges(header: Option<&str>, len: usize) -> Ranges {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ranges::Whole;
    };
    let mut list = Vec::new();
    for part in spec.split(',') {
        let Some((first, last)) = part.trim().split_once('-') else {
            return Ranges::Whole;
        };
        let range = if first.is_empty() {
            match last.parse::<usize>() {
                Ok(0) => None,
                Ok(suffix) => Some((len.saturating_sub(suffix), len)),
                Err(_) => return Ranges::Whole,
            }
        } else {
            let Ok(first) = first.parse::<usize>() else {
                return Ranges::Whole;
            };
            let last = match last.parse::<usize>() {
                _ if last.is_empty() => len,
                Ok(last) if last >= first => last.min(len.saturating_sub(1)),
                _ => return Ranges::Whole,
            };
            (first < len).then_some((first, last))
        };
        // A suffix or open range ends at the last byte; none starts past it.
        if let Some((first, last)) = range.filter(|_| len > 0) {
            list.push((first, last.min(len - 1)));
        }
    }
    if list.is_empty() {
        Ranges::Unsatisfiable
    } else {
        Ranges::Some(list)
    }
}

/// A `multipart/byteranges` body with one part per range.
fn multipart(data: &[u8], list: &[(usize, usize)]) -> Vec<u8> {
    let mut body = Vec::new();
    for &(first, last) in list {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/{}\r\n\r\n",
                data.len()
            )
            .as_bytes(),
        );
        body.extend_from_slice(&data[first..=last]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_of_every_form() {
        assert_eq!(ranges(None, 10), Ranges::Whole);
        assert_eq!(ranges(Some("bytes=4-"), 10), Ranges::Some(vec![(4, 9)]));
        assert_eq!(ranges(Some("bytes=2-5"), 10), Ranges::Some(vec![(2, 5)]));
        assert_eq!(ranges(Some("bytes=2-50"), 10), Ranges::Some(vec![(2, 9)]));
        assert_eq!(ranges(Some("bytes=-3"), 10), Ranges::Some(vec![(7, 9)]));
        assert_eq!(ranges(Some("bytes=-30"), 10), Ranges::Some(vec![(0, 9)]));
        assert_eq!(ranges(Some("bytes=10-"), 10), Ranges::Unsatisfiable);
        assert_eq!(ranges(Some("bytes=5-2"), 10), Ranges::Whole);
        assert_eq!(ranges(Some("items=1-2"), 10), Ranges::Whole);
    }

    #[test]
    fn several_ranges_are_parts_of_a_multipart_body() {
        let data: Vec<u8> = (0..10).collect();
        assert_eq!(
            ranges(Some("bytes=0-1, 8-"), 10),
            Ranges::Some(vec![(0, 1), (8, 9)])
        );
        let body = multipart(&data, &[(0, 1), (8, 9)]);
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{BOUNDARY}\r\n")), "{text}");
        assert!(
            text.contains("Content-Range: bytes 0-1/10\r\n\r\n\u{0}\u{1}\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Content-Range: bytes 8-9/10\r\n\r\n\u{8}\u{9}\r\n"),
            "{text}"
        );
        assert!(text.ends_with(&format!("--{BOUNDARY}--\r\n")), "{text}");
    }
}
