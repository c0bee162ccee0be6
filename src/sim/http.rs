//! The image server: HTTP/1.1 (or HTTPS) on 127.0.0.1, one blob of data served on the paths a
//! test names (or other bytes on a path of their own, [`Act::ServeFile`]: a release directory's
//! index and store; or the files of a directory, [`ServerBuilder::directory`]), each path
//! behaving in one chosen way ([`Act`]): honestly, with `Range` answered as the server-wide
//! [`RangeAnswers`] say (as nginx does, as S3 does, or not at all), or with a fault a broken or
//! hostile server shows. Every request is logged in the order it arrived, with the status and
//! the body bytes that went out ([`Seen`]); a [`Throttle`] slows the bodies down so that an
//! install takes long enough to interrupt.
//!
//! It runs on the caller's tokio runtime ([`ServerBuilder::start`], the demo and async tests), or
//! on a thread of its own for tests that block ([`ServerBuilder::start_background`]). Each
//! connection serves one request (`Connection: close`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// One request as the server saw it, and its answer so far.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    /// The answer's status; 0 until its head is sent (none is, for a head too long).
    pub status: u16,
    /// Body bytes sent (multipart framing included), up to the client's hang-up.
    pub body_bytes: u64,
}

/// How `Range` requests to [`Act::Serve`] are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswers {
    /// One range: 206; several: 206 `multipart/byteranges` (nginx, Apache).
    Multipart,
    /// One range: 206; several: 200 with the whole body (S3 and some CDNs).
    SingleOnly,
    /// Always 200 with the whole body.
    Never,
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
    range_answers: RangeAnswers,
    directory: Option<PathBuf>,
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

    /// How `Range` is answered ([`RangeAnswers::Multipart`] unless set).
    pub fn range_answers(mut self, answers: RangeAnswers) -> ServerBuilder {
        self.range_answers = answers;
        self
    }

    /// A path without a route is the file of that name in `dir` ([`Act::Serve`]d as it is
    /// when asked for: it may be written after the server starts), or 404.
    pub fn directory(mut self, dir: impl Into<PathBuf>) -> ServerBuilder {
        self.directory = Some(dir.into());
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
            range_answers: self.range_answers,
            directory: self.directory,
            log: Mutex::default(),
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
    range_answers: RangeAnswers,
    directory: Option<PathBuf>,
    log: Mutex<RequestLog>,
}

/// Every request, in the order they arrived. Entries are never removed: an answer still going
/// out updates its own entry after an [`ImageServer::forget_seen`].
#[derive(Default)]
struct RequestLog {
    entries: Vec<Seen>,
    /// Where [`ImageServer::seen`] starts.
    from: usize,
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
            range_answers: RangeAnswers::Multipart,
            directory: None,
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

    /// The files of `dir`, Range answered as `answers` say, on a thread of its own.
    pub fn serve_directory(dir: impl Into<PathBuf>, answers: RangeAnswers) -> ImageServer {
        ImageServer::builder(Vec::new())
            .directory(dir)
            .range_answers(answers)
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

    /// Every request so far (since [`ImageServer::forget_seen`]), in the order they arrived.
    pub fn seen(&self) -> Vec<Seen> {
        let log = self.shared.log.lock().unwrap();
        log.entries[log.from..].to_vec()
    }

    /// [`ImageServer::seen`] starts again with the next request.
    pub fn forget_seen(&self) {
        let mut log = self.shared.log.lock().unwrap();
        log.from = log.entries.len();
    }

    /// How many requests for `path` were seen.
    pub fn requests_of(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }

    /// Body bytes sent for `path`.
    pub fn bytes_of(&self, path: &str) -> u64 {
        self.seen()
            .iter()
            .filter(|s| s.path == path)
            .map(|s| s.body_bytes)
            .sum()
    }

    /// Body bytes of `206` answers for `path`: the ranges, without what a `200` sent before the
    /// client hung up.
    pub fn ranged_bytes_of(&self, path: &str) -> u64 {
        self.seen()
            .iter()
            .filter(|s| s.path == path && s.status == 206)
            .map(|s| s.body_bytes)
            .sum()
    }

    /// Bytes of response bodies sent so far (since [`ImageServer::forget_seen`]; multipart
    /// framing included): what the clients downloaded.
    pub fn body_bytes(&self) -> u64 {
        self.seen().iter().map(|s| s.body_bytes).sum()
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
    let (entry, earlier) = {
        let seen = &mut shared.log.lock().unwrap().entries;
        let earlier = seen.iter().filter(|s| s.path == path).count();
        seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
            status: 0,
            body_bytes: 0,
        });
        (seen.len() - 1, earlier)
    };
    let route = shared.routes.get(&path).cloned();
    let file = match route {
        None => in_directory(shared.directory.as_deref(), &path)?,
        Some(_) => None,
    };
    let act = match route {
        Some(Act::First { times, act }) if earlier < times => *act,
        Some(Act::First { .. }) => Act::Serve,
        Some(act) => act,
        None if file.is_some() => Act::Serve,
        None => Act::Status(404),
    };
    let mut out = Writer {
        stream,
        throttle: shared.throttle,
        shared,
        entry,
    };
    let range = range.filter(|_| shared.range_answers != RangeAnswers::Never);
    let data = &shared.data[..];
    let served = match (&act, &file) {
        (Act::ServeFile(bytes), _) => Content::Bytes(bytes),
        (_, Some((file, len))) => Content::File(file, *len),
        _ => Content::Bytes(data),
    };
    match act {
        Act::Serve | Act::ServeFile(_) => serve(&mut out, served, range.as_deref()).await?,
        Act::Body(body) => out.ok(Content::Bytes(&body), body.len()).await?,
        Act::IgnoreRange => out.ok(Content::Bytes(data), data.len()).await?,
        Act::Truncate { after } => out.ok(Content::Bytes(&data[..after]), data.len()).await?,
        Act::CloseDelimited { extra } => {
            out.head("200 OK").await?;
            out.body(data).await?;
            out.body(&extra).await?;
        }
        Act::LongerLength { extra } => {
            out.ok(Content::Bytes(data), data.len() + extra.len())
                .await?;
            out.body(&extra).await?;
        }
        Act::Stall { after } => {
            out.ok(Content::Bytes(&data[..after]), data.len()).await?;
            out.stream.flush().await?;
            // Far longer than any stall timeout in the tests; the runtime ends with the test.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Act::Reset { after } => {
            out.ok(Content::Bytes(&data[..after]), data.len()).await?;
            out.stream.flush().await?;
            // Let the client read what was sent: an RST drops data still unread in its buffer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(Ending::Reset);
        }
        Act::First { .. } => unreachable!("resolved above"),
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

/// The honest answer: the whole content, or the ranges asked for as the server answers them.
async fn serve<S: AsyncWrite + Unpin>(
    out: &mut Writer<'_, S>,
    content: Content<'_>,
    range: Option<&str>,
) -> io::Result<()> {
    let len = content.len();
    match ranges(range, len) {
        Ranges::Whole => out.ok(content, len).await,
        Ranges::Unsatisfiable => {
            out.head(&format!(
                "416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0"
            ))
            .await
        }
        Ranges::Some(list) if list.len() == 1 => {
            let (start, end) = list[0];
            out.head(&format!(
                "206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{len}",
                end + 1 - start,
            ))
            .await?;
            out.part(content, start, end + 1).await
        }
        Ranges::Some(_) if out.shared.range_answers == RangeAnswers::SingleOnly => {
            out.ok(content, len).await
        }
        Ranges::Some(list) => {
            let body = multipart(content, &list)?;
            out.head(&format!(
                "206 Partial Content\r\nContent-Type: multipart/byteranges; boundary={BOUNDARY}\r\nContent-Length: {}",
                body.len()
            ))
            .await?;
            out.body(&body).await
        }
    }
}

/// What [`serve`] sends: bytes in memory, or a file of the served directory, read by position
/// (a range costs its own bytes, not the file's: the benchmarks serve images of gigabytes).
#[derive(Clone, Copy)]
enum Content<'a> {
    Bytes(&'a [u8]),
    File(&'a std::fs::File, usize),
}

impl Content<'_> {
    fn len(&self) -> usize {
        match self {
            Content::Bytes(bytes) => bytes.len(),
            Content::File(_, len) => *len,
        }
    }

    /// Bytes `[start, end)` into `into`.
    fn read(&self, start: usize, end: usize, into: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Content::Bytes(bytes) => into.extend_from_slice(&bytes[start..end]),
            Content::File(file, _) => {
                use std::os::unix::fs::FileExt;
                let at = into.len();
                into.resize(at + end - start, 0);
                file.read_exact_at(&mut into[at..], start as u64)?;
            }
        }
        Ok(())
    }
}

/// The file `path` names directly in the served directory, and its length (`None`: there is
/// none).
fn in_directory(
    directory: Option<&Path>,
    path: &str,
) -> io::Result<Option<(std::fs::File, usize)>> {
    let name = path.strip_prefix('/').unwrap_or("");
    let directly_below = !(name.is_empty() || name.contains('/') || name == "..");
    let file = directory
        .filter(|_| directly_below)
        .and_then(|dir| std::fs::File::open(dir.join(name)).ok());
    let Some(file) = file else { return Ok(None) };
    let len = usize::try_from(file.metadata()?.len()).map_err(io::Error::other)?;
    Ok(Some((file, len)))
}

/// Unthrottled bodies go out in pieces of this size, each counted as it goes (a client may hang
/// up in the middle).
const PIECE: usize = 64 * 1024;

struct Writer<'a, S> {
    stream: &'a mut S,
    throttle: Option<Throttle>,
    shared: &'a Shared,
    /// The request's entry in `shared.log`.
    entry: usize,
}

impl<S: AsyncWrite + Unpin> Writer<'_, S> {
    /// The status line and these header lines, then `Connection: close` and the blank line.
    async fn head(&mut self, status_and_headers: &str) -> io::Result<()> {
        let status = status_and_headers
            .split(' ')
            .next()
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        self.shared.log.lock().unwrap().entries[self.entry].status = status;
        let head = format!("HTTP/1.1 {status_and_headers}\r\nConnection: close\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await
    }

    fn count(&self, sent: usize) {
        self.shared.log.lock().unwrap().entries[self.entry].body_bytes += sent as u64;
    }

    /// 200 announcing `length` bytes, then `body` (which may be shorter or longer).
    async fn ok(&mut self, body: Content<'_>, length: usize) -> io::Result<()> {
        self.head(&format!("200 OK\r\nContent-Length: {length}"))
            .await?;
        self.part(body, 0, body.len()).await
    }

    /// Bytes `[start, end)` of `content`, a piece at a time.
    async fn part(&mut self, content: Content<'_>, start: usize, end: usize) -> io::Result<()> {
        if let Content::Bytes(bytes) = content {
            return self.body(&bytes[start..end]).await;
        }
        let mut piece = Vec::with_capacity(PIECE);
        for at in (start..end).step_by(PIECE) {
            piece.clear();
            content.read(at, end.min(at + PIECE), &mut piece)?;
            self.body(&piece).await?;
        }
        Ok(())
    }

    async fn body(&mut self, body: &[u8]) -> io::Result<()> {
        let piece_size = self.throttle.map_or(PIECE, |t| t.chunk.max(1));
        for piece in body.chunks(piece_size) {
            self.stream.write_all(piece).await?;
            self.count(piece.len());
            if let Some(Throttle { pause, .. }) = self.throttle {
                self.stream.flush().await?;
                tokio::time::sleep(pause).await;
            }
        }
        Ok(())
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
fn multipart(content: Content<'_>, list: &[(usize, usize)]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    for &(first, last) in list {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/{}\r\n\r\n",
                content.len()
            )
            .as_bytes(),
        );
        content.read(first, last + 1, &mut body)?;
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    Ok(body)
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

    /// One GET with an optional Range header; the whole answer, as text.
    fn get(server: &ImageServer, path: &str, range: Option<&str>) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
        let range = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n{range}\r\n").unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[test]
    fn a_directory_is_served_by_position_with_range_answered_as_chosen_and_logged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f.img"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        let start = |answers| {
            ImageServer::builder(Vec::new())
                .directory(dir.path())
                .range_answers(answers)
                .start_background()
                .unwrap()
        };

        let nginx = start(RangeAnswers::Multipart);
        let one = get(&nginx, "/f.img", Some("bytes=2-4"));
        assert!(
            one.starts_with("HTTP/1.1 206 ") && one.ends_with("\r\n\r\n234"),
            "{one}"
        );
        let two = get(&nginx, "/f.img", Some("bytes=0-1,8-"));
        assert!(two.contains("multipart/byteranges"), "{two}");
        assert!(two.contains("bytes 8-9/10\r\n\r\n89\r\n"), "{two}");
        assert!(get(&nginx, "/../secret", None).starts_with("HTTP/1.1 404 "));
        assert!(get(&nginx, "/missing", None).starts_with("HTTP/1.1 404 "));
        let seen = nginx.seen();
        let answers: Vec<_> = seen.iter().map(|s| (s.status, s.body_bytes)).collect();
        let multipart_len = two.split_once("\r\n\r\n").unwrap().1.len() as u64;
        assert_eq!(
            answers,
            [(206, 3), (206, multipart_len), (404, 5), (404, 5)]
        );
        assert_eq!(nginx.requests_of("/f.img"), 2);
        assert_eq!(nginx.ranged_bytes_of("/f.img"), 3 + multipart_len);
        nginx.forget_seen();
        assert!(nginx.seen().is_empty());
        get(&nginx, "/f.img", None);
        assert_eq!(nginx.bytes_of("/f.img"), 10, "{:?}", nginx.seen());

        let s3 = start(RangeAnswers::SingleOnly);
        assert!(get(&s3, "/f.img", Some("bytes=2-4")).ends_with("\r\n\r\n234"));
        let whole = get(&s3, "/f.img", Some("bytes=0-1,8-"));
        assert!(whole.starts_with("HTTP/1.1 200 ") && whole.ends_with("\r\n\r\n0123456789"));
        assert_eq!(s3.ranged_bytes_of("/f.img"), 3);

        let plain = start(RangeAnswers::Never);
        let whole = get(&plain, "/f.img", Some("bytes=2-4"));
        assert!(whole.starts_with("HTTP/1.1 200 ") && whole.ends_with("\r\n\r\n0123456789"));
        assert_eq!(plain.bytes_of("/f.img"), 10);
    }

    #[test]
    fn several_ranges_are_parts_of_a_multipart_body() {
        let data: Vec<u8> = (0..10).collect();
        assert_eq!(
            ranges(Some("bytes=0-1, 8-"), 10),
            Ranges::Some(vec![(0, 1), (8, 9)])
        );
        let body = multipart(Content::Bytes(&data), &[(0, 1), (8, 9)]).unwrap();
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
