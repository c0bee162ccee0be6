//! A hostile HTTP(S) server on 127.0.0.1 for the transfer and whole-cycle tests: it serves one
//! blob of data and, per path, misbehaves in one chosen way ([`Act`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does for one path.
#[derive(Clone)]
pub enum Act {
    /// Serves the data, honouring `Range: bytes=N-` with 206.
    Serve,
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
    /// The first request is reset after `after` bytes; later ones are served.
    ResetOnce {
        after: usize,
    },
    Status(u16),
    Redirect(String),
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
}

pub struct Server {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: bool,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

struct Shared {
    data: Vec<u8>,
    routes: HashMap<String, Act>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

pub async fn serve(data: Vec<u8>, routes: Vec<(&str, Act)>) -> Server {
    start(data, routes, None).await
}

pub async fn start(
    data: Vec<u8>,
    routes: Vec<(&str, Act)>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::new(Shared {
        data,
        routes: routes
            .into_iter()
            .map(|(p, a)| (p.to_string(), a))
            .collect(),
        seen: seen.clone(),
    });
    let is_tls = tls.is_some();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
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
    });
    Server {
        addr,
        seen,
        tls: is_tls,
    }
}

fn reset(stream: TcpStream) {
    // Zero linger makes the close an RST rather than a FIN.
    stream.set_zero_linger().unwrap();
    drop(stream);
}

enum Ending {
    Close,
    Reset,
}

async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    shared: &Shared,
) -> io::Result<Ending> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 || head.len() > 16 * 1024 {
            return Ok(Ending::Close);
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    let range = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    let first_time = {
        let mut seen = shared.seen.lock().unwrap();
        let first = !seen.iter().any(|s| s.path == path);
        seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
        });
        first
    };
    let data = &shared.data;
    let act = shared
        .routes
        .get(&path)
        .cloned()
        .unwrap_or(Act::Status(404));
    let act = match act {
        Act::ResetOnce { after } if first_time => Act::Reset { after },
        Act::ResetOnce { .. } => Act::Serve,
        act => act,
    };
    let ok = |len: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    match act {
        Act::Serve => {
            let start = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok());
            match start {
                Some(start) if start < data.len() => {
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                        data.len() - start,
                        data.len() - 1,
                        data.len()
                    );
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(&data[start..]).await?;
                }
                _ => {
                    stream.write_all(ok(data.len()).as_bytes()).await?;
                    stream.write_all(data).await?;
                }
            }
        }
        Act::Body(body) => {
            stream.write_all(ok(body.len()).as_bytes()).await?;
            stream.write_all(&body).await?;
        }
        Act::IgnoreRange => {
            stream.write_all(ok(data.len()).as_bytes()).await?;
            stream.write_all(data).await?;
        }
        Act::Truncate { after } => {
            stream.write_all(ok(data.len()).as_bytes()).await?;
            stream.write_all(&data[..after]).await?;
        }
        Act::CloseDelimited { extra } => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            stream.write_all(data).await?;
            stream.write_all(&extra).await?;
        }
        Act::LongerLength { extra } => {
            stream
                .write_all(ok(data.len() + extra.len()).as_bytes())
                .await?;
            stream.write_all(data).await?;
            stream.write_all(&extra).await?;
        }
        Act::Stall { after } => {
            stream.write_all(ok(data.len()).as_bytes()).await?;
            stream.write_all(&data[..after]).await?;
            stream.flush().await?;
            // Far longer than any stall timeout in these tests; the runtime ends with the test.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Act::Reset { after } => {
            stream.write_all(ok(data.len()).as_bytes()).await?;
            stream.write_all(&data[..after]).await?;
            stream.flush().await?;
            // Let the client read what was sent: an RST drops data still unread in its buffer.
            tokio::time::sleep(Duration::from_millis(300)).await;
            return Ok(Ending::Reset);
        }
        Act::ResetOnce { .. } => unreachable!(),
        Act::Status(status) => {
            let head = format!(
                "HTTP/1.1 {status} Oops\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops\n"
            );
            stream.write_all(head.as_bytes()).await?;
        }
        Act::Redirect(location) => {
            let head = format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
        }
    }
    stream.flush().await?;
    Ok(Ending::Close)
}

/// A TLS acceptor with a fresh self-signed certificate for 127.0.0.1, and that certificate for
/// the client to trust.
pub fn tls_pair() -> (
    tokio_rustls::TlsAcceptor,
    rustls::pki_types::CertificateDer<'static>,
) {
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()),
    );
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], private)
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), cert)
}

/// A server for tests that are not async themselves (they run the agent as a process): it runs
/// on its own thread with its own runtime until dropped.
pub struct BackgroundServer {
    pub server: Server,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    pub fn start(data: Vec<u8>, routes: Vec<(&str, Act)>) -> BackgroundServer {
        let routes: Vec<(String, Act)> = routes
            .into_iter()
            .map(|(p, a)| (p.to_string(), a))
            .collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async move {
                let routes = routes
                    .iter()
                    .map(|(p, a)| (p.as_str(), a.clone()))
                    .collect();
                let server = serve(data, routes).await;
                ready_tx
                    .send(server)
                    .expect("the test waits for the server");
                // Serve until the test drops the server (or goes away).
                let _ = stopped.await;
            });
        });
        let server = ready_rx.recv().expect("the server thread started");
        BackgroundServer {
            server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.server.seen()
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
