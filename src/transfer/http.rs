//! The HTTP/1.1 client behind `http://` and `https://` sources: hyper's connection-level client
//! over tokio's TCP, TLS 1.2/1.3 through rustls with the ring provider, servers verified against
//! the platform's roots plus the configured ones, redirects followed by this module's policy.
//!
//! Not a general-purpose client on purpose: a GET with an optional `Range` (the resume of a
//! download, the block store's ranges of a delta install), nothing else (no proxies, cookies,
//! compression or HTTP/2). reqwest, which it replaced, carried a connector
//! stack, a pool and proxy handling the device never needs (see Cargo.toml for the bytes).
//!
//! A client keeps the connection of a response that was read to its end and sends the next
//! request to the same origin over it (HTTP/1.1 keep-alive), so many small range requests cost
//! one TCP connection and one TLS handshake. A kept connection that the server closed meanwhile
//! is replaced by a new one without an error: a GET can be repeated.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper::header::{
    ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, HOST, HeaderMap, HeaderValue, LOCATION, RANGE,
    USER_AGENT,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use url::{Host, Position, Url};

use super::error::{TransferError, chain, esc};

/// Most redirects followed for one request (curl's default is 50; a release URL needs one or two).
pub const MAX_REDIRECTS: usize = 5;

const USER_AGENT_VALUE: &str = concat!("update-agent/", env!("CARGO_PKG_VERSION"));

/// A response's head, after the redirects were followed.
pub(crate) struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: ResponseBody,
}

/// A response's body; its connection goes back to the client when it was read to its end.
pub(crate) struct ResponseBody {
    body: Incoming,
    connection: Option<Connection>,
    idle: Arc<Mutex<Option<Connection>>>,
}

impl ResponseBody {
    /// The length the server announced (`Content-Length`), if it did.
    pub(crate) fn announced_len(&self) -> Option<u64> {
        self.body.size_hint().exact()
    }

    /// The next piece of the body, `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, hyper::Error> {
        loop {
            match self.body.frame().await {
                None => {
                    if let Some(connection) = self.connection.take() {
                        *self.idle.lock().unwrap_or_else(|e| e.into_inner()) = Some(connection);
                    }
                    return Ok(None);
                }
                Some(Err(e)) => return Err(e),
                // Trailers carry nothing a download needs.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Ok(Some(data)),
                    _ => {}
                },
            }
        }
    }
}

/// Clones share the kept connection.
#[derive(Clone)]
pub(crate) struct HttpClient {
    /// The TLS setup for https origins, or why there is none (no CA could be loaded).
    tls: Result<Arc<rustls::ClientConfig>, String>,
    connect_timeout: Duration,
    /// A connection whose last response was read to its end, for the next request.
    idle: Arc<Mutex<Option<Connection>>>,
}

impl HttpClient {
    /// A client that verifies servers against the system's roots plus `extra_roots`, never
    /// against nothing: with no roots at all, https requests fail and say so.
    /// `connect_timeout` bounds each new connection's TCP connect and TLS handshake together.
    pub(crate) fn new(
        connect_timeout: Duration,
        extra_roots: &[CertificateDer<'static>],
    ) -> HttpClient {
        HttpClient {
            tls: tls_config(extra_roots),
            connect_timeout,
            idle: Arc::default(),
        }
    }

    /// GETs `url`, with `range` as its `Range` header (`bytes=…`, one range or several) when
    /// given, following redirects; any answer that is not a followed redirect is returned, the
    /// caller judges its status. Errors name `url`, the one first asked for.
    pub(crate) async fn get(
        &self,
        url: &Url,
        range: Option<&str>,
    ) -> Result<Response, TransferError> {
        let shown = esc(url.as_str());
        let mut visited: Vec<Url> = Vec::new();
        let mut current = url.clone();
        let mut credentials = Credentials::of(url);
        loop {
            let (response, connection) = self
                .send(&current, range, credentials.as_ref(), &shown)
                .await?;
            visited.push(current.clone());
            let Some(next) = redirect_target(&response, &current) else {
                let (head, body) = response.into_parts();
                return Ok(Response {
                    status: head.status.as_u16(),
                    headers: head.headers,
                    body: ResponseBody {
                        body,
                        connection: Some(connection),
                        idle: self.idle.clone(),
                    },
                });
            };
            // The redirect's body is not read: its connection closes with it.
            drop((response, connection));
            check_redirect(&next, &visited).map_err(|refused| refused.into_error(&shown))?;
            // Credentials from the URL go along to the same origin only, as a browser does.
            let origin = Origin::of(&next);
            credentials = Credentials::of(&next)
                .or_else(|| credentials.filter(|c| Some(&c.origin) == origin.as_ref()));
            current = next;
        }
    }

    /// One request, over the kept connection when it leads to the same origin.
    async fn send(
        &self,
        url: &Url,
        range: Option<&str>,
        credentials: Option<&Credentials>,
        shown: &str,
    ) -> Result<(hyper::Response<Incoming>, Connection), TransferError> {
        let origin = Origin::of(url).ok_or_else(|| TransferError::UnsupportedUrl {
            url: shown.to_string(),
            detail: format!("{} names no host to connect to", esc(url.as_str())),
        })?;
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut connection) = kept.filter(|c| c.origin == origin)
            && connection.sender.ready().await.is_ok()
        {
            let request = request(url, range, credentials, shown)?;
            if let Ok(response) = connection.sender.send_request(request).await {
                return Ok((response, connection));
            }
        }
        let mut connection = self.connect(origin, shown).await?;
        let request = request(url, range, credentials, shown)?;
        let response =
            connection
                .sender
                .send_request(request)
                .await
                .map_err(|e| TransferError::Download {
                    url: shown.to_string(),
                    detail: format!("request failed: {}", chain(&e)),
                })?;
        Ok((response, connection))
    }

    /// A new connection to `origin`: TCP, TLS for https, the HTTP/1.1 handshake, all within
    /// the connect timeout.
    async fn connect(&self, origin: Origin, shown: &str) -> Result<Connection, TransferError> {
        let timeout = self.connect_timeout;
        let failed = |detail: String| TransferError::Download {
            url: shown.to_string(),
            detail,
        };
        let connecting = async {
            let tcp = match &origin.host {
                Host::Domain(name) => TcpStream::connect((name.as_str(), origin.port)).await,
                Host::Ipv4(ip) => TcpStream::connect((*ip, origin.port)).await,
                Host::Ipv6(ip) => TcpStream::connect((*ip, origin.port)).await,
            }
            .map_err(|e| failed(format!("cannot connect to {origin}: {e}")))?;
            // Requests are small and answered at once: no point in batching them.
            let _ = tcp.set_nodelay(true);
            let stream = if origin.https {
                let tls = self.tls.as_ref().map_err(|why| {
                    failed(format!(
                        "no trusted CA certificates ({why}); install the system's CA certificates or configure the update server's CA"
                    ))
                })?;
                let name = match &origin.host {
                    Host::Domain(name) => ServerName::try_from(name.clone())
                        .map_err(|e| failed(format!("{e}: {}", esc(name))))?,
                    Host::Ipv4(ip) => ServerName::from(std::net::IpAddr::from(*ip)),
                    Host::Ipv6(ip) => ServerName::from(std::net::IpAddr::from(*ip)),
                };
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| tls_error(e, &origin, shown))?;
                Stream::Tls(Box::new(stream))
            } else {
                Stream::Plain(tcp)
            };
            let (sender, driver) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| failed(format!("cannot talk to {origin}: {}", chain(&e))))?;
            // The connection's own task reads and writes for the sender and the body; it ends
            // when both are gone or the server closes.
            tokio::spawn(async move {
                let _ = driver.await;
            });
            Ok(Connection {
                origin: origin.clone(),
                sender,
            })
        };
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| {
                failed(format!(
                    "cannot connect to {origin}: no connection within {} s",
                    timeout.as_secs_f32()
                ))
            })?
    }
}

/// Where a connection leads; a kept connection is only used for the same one.
#[derive(Clone, PartialEq, Eq)]
struct Origin {
    https: bool,
    host: Host<String>,
    port: u16,
}

impl Origin {
    fn of(url: &Url) -> Option<Origin> {
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        Some(Origin {
            https,
            host: url.host()?.to_owned(),
            port: url.port_or_known_default()?,
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // url::Host writes IPv6 addresses in brackets; a domain is escaped like any URL.
        match &self.host {
            Host::Domain(name) => write!(f, "{}:{}", esc(name), self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

struct Connection {
    origin: Origin,
    sender: http1::SendRequest<Empty<Bytes>>,
}

/// A URL's user name and password, sent as HTTP Basic authentication.
#[derive(Clone)]
struct Credentials {
    origin: Origin,
    header: HeaderValue,
}

impl Credentials {
    fn of(url: &Url) -> Option<Credentials> {
        if url.username().is_empty() && url.password().is_none() {
            return None;
        }
        fn decode(s: &str) -> std::borrow::Cow<'_, str> {
            percent_encoding::percent_decode_str(s).decode_utf8_lossy()
        }
        let pair = format!(
            "{}:{}",
            decode(url.username()),
            decode(url.password().unwrap_or(""))
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut header = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
        header.set_sensitive(true);
        Some(Credentials {
            origin: Origin::of(url)?,
            header,
        })
    }
}

fn request(
    url: &Url,
    range: Option<&str>,
    credentials: Option<&Credentials>,
    shown: &str,
) -> Result<hyper::Request<Empty<Bytes>>, TransferError> {
    let invalid = |what: &str| TransferError::UnsupportedUrl {
        url: shown.to_string(),
        detail: format!("{} is not a valid {what}", esc(url.as_str())),
    };
    let mut request = hyper::Request::get(&url[Position::BeforePath..Position::AfterQuery])
        .header(
            HOST,
            HeaderValue::from_str(&url[Position::BeforeHost..Position::AfterPort])
                .map_err(|_| invalid("host"))?,
        )
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(ACCEPT, "*/*")
        // identity: the hashes are over the bytes as published; a server-side gzip layer would
        // only make them disagree.
        .header(ACCEPT_ENCODING, "identity");
    if let Some(range) = range {
        request = request.header(RANGE, range);
    }
    if let Some(credentials) = credentials {
        request = request.header(AUTHORIZATION, credentials.header.clone());
    }
    request
        .body(Empty::new())
        .map_err(|_| invalid("http request target"))
}

/// Where a redirect answer points, resolved against the URL that answered it; `None` for an
/// answer that is not a redirect, or one without a usable `Location` (which is then returned
/// as it is, for its status to be reported).
fn redirect_target(response: &hyper::Response<Incoming>, from: &Url) -> Option<Url> {
    if !matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = response.headers().get(LOCATION)?.to_str().ok()?;
    from.join(location).ok()
}

/// Why a redirect was not followed.
#[derive(Debug, PartialEq, Eq)]
enum RedirectRefused {
    Loop(Url),
    TooMany,
    Insecure(Url),
    Scheme(Url),
}

/// The redirect policy: `visited` holds every URL asked for so far, the first one included.
fn check_redirect(next: &Url, visited: &[Url]) -> Result<(), RedirectRefused> {
    if visited.contains(next) {
        Err(RedirectRefused::Loop(next.clone()))
    } else if visited.len() > MAX_REDIRECTS {
        // `visited` starts with the URL first asked for, so this allows MAX_REDIRECTS hops.
        Err(RedirectRefused::TooMany)
    } else if next.scheme() != "https" && visited.iter().any(|u| u.scheme() == "https") {
        // Once the chain was on TLS, leaving it would let anyone on the path serve the rest
        // (the hash would catch altered bytes, but not a stall or a tracking server).
        Err(RedirectRefused::Insecure(next.clone()))
    } else if !matches!(next.scheme(), "http" | "https") {
        Err(RedirectRefused::Scheme(next.clone()))
    } else {
        Ok(())
    }
}

impl RedirectRefused {
    fn into_error(self, shown: &str) -> TransferError {
        let url = shown.to_string();
        match self {
            RedirectRefused::Insecure(to) => TransferError::InsecureRedirect {
                url,
                to: esc(to.as_str()),
            },
            RedirectRefused::Loop(to) => TransferError::RedirectLoop {
                url,
                detail: format!("redirect loop back to {}", esc(to.as_str())),
            },
            RedirectRefused::TooMany => TransferError::RedirectLoop {
                url,
                detail: format!("more than {MAX_REDIRECTS} redirects"),
            },
            RedirectRefused::Scheme(to) => TransferError::UnsupportedUrl {
                url,
                detail: format!("redirect to {}", esc(to.as_str())),
            },
        }
    }
}

/// A failed TLS handshake: the rustls error when that is what failed (a certificate the roots
/// do not vouch for, a protocol mismatch), else the connection's.
fn tls_error(error: io::Error, origin: &Origin, shown: &str) -> TransferError {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => TransferError::Tls {
            url: shown.to_string(),
            detail: esc(&tls.to_string()),
        },
        None => TransferError::Download {
            url: shown.to_string(),
            detail: format!("tls handshake with {origin} failed: {}", chain(&error)),
        },
    }
}

/// TLS 1.2/1.3 through rustls with the ring provider, verifying servers with WebPKI against the
/// platform's roots plus `extra_roots`.
fn tls_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up tls: {e}"))?;
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        extra_roots.iter().cloned(),
        provider,
    )
    .map_err(|e| e.to_string())?;
    // `dangerous()` is only rustls' door to a custom verifier; this one is WebPKI over the
    // platform's roots.
    let mut config = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The byte stream under hyper, plain or TLS: one type, so that hyper's connection code is
/// compiled once.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::CONTENT_RANGE;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn redirect_policy() {
        let first = url("https://a.example/img");
        let visited = vec![first.clone()];
        assert_eq!(
            check_redirect(&url("https://b.example/img"), &visited),
            Ok(())
        );
        assert_eq!(
            check_redirect(&first, &visited),
            Err(RedirectRefused::Loop(first.clone()))
        );
        let plain = url("http://b.example/img");
        assert_eq!(
            check_redirect(&plain, &visited),
            Err(RedirectRefused::Insecure(plain.clone()))
        );
        let ftp = url("ftp://b.example/img");
        assert_eq!(
            check_redirect(&ftp, &[url("http://a.example/")]),
            Err(RedirectRefused::Scheme(ftp.clone()))
        );
        let hops: Vec<Url> = (0..=MAX_REDIRECTS)
            .map(|i| url(&format!("http://a.example/{i}")))
            .collect();
        assert_eq!(
            check_redirect(&url("http://a.example/x"), &hops[..MAX_REDIRECTS]),
            Ok(())
        );
        assert_eq!(
            check_redirect(&url("http://a.example/x"), &hops),
            Err(RedirectRefused::TooMany)
        );
    }

    #[test]
    fn credentials_come_from_the_url_decoded() {
        let with = Credentials::of(&url("https://us%40er:p%3Ass@a.example/img")).unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(with.header.to_str().unwrap(), format!("Basic {expected}"));
        assert!(with.header.is_sensitive());
        assert!(Credentials::of(&url("https://a.example/img")).is_none());
    }

    #[test]
    fn request_target_host_and_range() {
        let target = url("http://[::1]:8080/a%20b/img?v=1#frag");
        let request = request(&target, Some("bytes=7-"), None, "u").unwrap();
        assert_eq!(request.uri(), "/a%20b/img?v=1");
        assert_eq!(request.headers()[HOST], "[::1]:8080");
        assert_eq!(request.headers()[RANGE], "bytes=7-");
        assert_eq!(request.headers()[ACCEPT_ENCODING], "identity");
        let whole = request_for_range(None);
        assert!(whole.headers().get(RANGE).is_none());
        assert_eq!(whole.headers()[HOST], "a.example");
        let span = request_for_range(Some("bytes=4-9,20-29"));
        assert_eq!(span.headers()[RANGE], "bytes=4-9,20-29");
    }

    fn request_for_range(range: Option<&str>) -> hyper::Request<Empty<Bytes>> {
        request(&url("https://a.example:443/img"), range, None, "u").unwrap()
    }

    /// A loopback server that answers range requests with 206 and keeps each connection open
    /// for more requests until it served `close_after` on it; then it closes the connection,
    /// saying so in that last answer when `announce`. Counts the connections.
    async fn keep_alive_server(
        data: Vec<u8>,
        close_after: usize,
        announce: bool,
    ) -> (Url, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}/blob", listener.local_addr().unwrap())).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let data = Arc::new(data);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let data = data.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    for served in 1.. {
                        let mut range = None;
                        loop {
                            let mut line = String::new();
                            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(value) =
                                line.to_ascii_lowercase().strip_prefix("range: bytes=")
                            {
                                let (first, last) = value.trim().split_once('-').unwrap();
                                range = Some((
                                    first.parse::<usize>().unwrap(),
                                    last.parse::<usize>().unwrap(),
                                ));
                            }
                        }
                        let (first, last) = range.expect("a range request");
                        let close = served == close_after;
                        let head = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {first}-{last}/{}\r\n{}\r\n",
                            last + 1 - first,
                            data.len(),
                            if close && announce {
                                "Connection: close\r\n"
                            } else {
                                ""
                            },
                        );
                        let stream = stream.get_mut();
                        stream.write_all(head.as_bytes()).await.unwrap();
                        stream.write_all(&data[first..=last]).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (url, connections)
    }

    async fn read_all(body: &mut ResponseBody) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = body.chunk().await.unwrap() {
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[tokio::test]
    async fn many_small_ranges_share_one_connection() {
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        let (url, connections) = keep_alive_server(data.clone(), usize::MAX, false).await;
        let client = HttpClient::new(Duration::from_secs(5), &[]);
        for block in 0..32u64 {
            let (first, last) = (block * 2000 + 3, block * 2000 + 1002);
            let range = format!("bytes={first}-{last}");
            let mut response = client.get(&url, Some(&range)).await.unwrap();
            assert_eq!(response.status, 206);
            assert_eq!(
                response.headers[CONTENT_RANGE],
                format!("bytes {first}-{last}/{}", data.len()).as_str()
            );
            assert_eq!(response.body.announced_len(), Some(1000));
            let bytes = read_all(&mut response.body).await;
            assert_eq!(bytes[..], data[first as usize..=last as usize]);
        }
        let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(opened, 1, "one connection for all 32 ranges");
    }

    #[tokio::test]
    async fn a_connection_the_server_closed_is_replaced() {
        for announce in [true, false] {
            a_closed_connection_is_replaced(announce).await;
        }
    }

    async fn a_closed_connection_is_replaced(announce: bool) {
        let data: Vec<u8> = (0..10_000).map(|i| (i % 253) as u8).collect();
        // The server closes every connection after its second answer.
        let (url, connections) = keep_alive_server(data.clone(), 2, announce).await;
        let client = HttpClient::new(Duration::from_secs(5), &[]);
        for block in 0..6u64 {
            let range = format!("bytes={}-{}", block * 100, block * 100 + 99);
            let mut response = client.get(&url, Some(&range)).await.unwrap();
            assert_eq!(response.status, 206);
            let bytes = read_all(&mut response.body).await;
            assert_eq!(bytes[..], data[block as usize * 100..][..100]);
        }
        let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(opened, 3, "a new connection after each close");
    }

    #[tokio::test]
    async fn a_body_still_held_does_not_hold_up_the_next_request() {
        let data: Vec<u8> = (0..10_000).map(|i| (i % 253) as u8).collect();
        let (url, connections) = keep_alive_server(data.clone(), usize::MAX, false).await;
        let client = HttpClient::new(Duration::from_secs(5), &[]);
        let unread = client.get(&url, Some("bytes=0-8999")).await.unwrap();
        // Still held: the next request must not wait for it but take a connection of its own.
        let mut second = client.get(&url, Some("bytes=5-9")).await.unwrap();
        assert_eq!(read_all(&mut second.body).await, data[5..10]);
        drop(unread);
        let opened = connections.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(opened, 2);
    }
}
