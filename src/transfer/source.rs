//! Where image bytes come from: `https://` and `http://` through the [`super::http`] client, or
//! a `file://` path.
//!
//! A source is opened at an offset (a `Range` request for http) and then yields chunks, each
//! within the stall timeout. It checks what the transport itself tells about lengths (a
//! `Content-Length` or file size that disagrees with the release is refused before any byte is
//! taken); counting the bytes as they arrive is the caller's job, so the same check covers every
//! source.

use std::time::Duration;

use std::io::{Read, Seek};
use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{CONTENT_RANGE, HeaderMap};
use rustls::pki_types::CertificateDer;
use url::Url;

use super::error::{TransferError, chain, esc};
use super::http::{HttpClient, ResponseBody};

/// Bytes read from a `file://` source at a time: large enough that the sink writes each chunk as
/// it is ([`super::writer::DIRECT_WRITE_MIN`]), small enough that the chunks queued between the
/// two sides stay a few MiB.
const FILE_CHUNK: usize = super::writer::DIRECT_WRITE_MIN;

/// How to reach an http(s) server.
pub(crate) struct HttpOptions<'a> {
    /// For the TCP connection and the TLS handshake together.
    pub connect_timeout: Duration,
    pub stall_timeout: Duration,
    pub extra_roots: &'a [CertificateDer<'static>],
}

pub(crate) struct Source {
    /// The URL as it may be shown: escaped.
    shown: String,
    stall_timeout: Duration,
    /// Where the bytes this source yields start in the transport stream: the requested offset,
    /// or 0 when a server answered a range request with the whole body.
    start: u64,
    received: u64,
    /// The transport size the release declares: the body must end exactly there.
    total: u64,
    body: Body,
}

enum Body {
    Http(ResponseBody),
    /// Read on a blocking thread straight into the chunk: `tokio::fs` would read into a buffer
    /// of its own and copy from there, one more pass over every byte.
    File {
        file: Arc<std::fs::File>,
        /// A regular file fills each chunk; a pipe or a device gives what it has, so that a
        /// slow writer is not taken for a stall while a chunk fills.
        regular: bool,
    },
}

impl Source {
    /// Opens `url` to read the transport bytes `[start, total)`.
    pub(crate) async fn open(
        url: &Url,
        start: u64,
        total: u64,
        http: &HttpOptions<'_>,
    ) -> Result<Source, TransferError> {
        let shown = esc(url.as_str());
        match url.scheme() {
            "http" | "https" => open_http(url, shown, start, total, http).await,
            "file" => open_file(url, shown, start, total, http.stall_timeout).await,
            other => Err(TransferError::UnsupportedUrl {
                url: shown,
                detail: format!(
                    "the scheme {:?} is not one of https, http, file",
                    esc(other)
                ),
            }),
        }
    }

    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// The next chunk, `None` at the end of the body; an error when nothing arrives within the
    /// stall timeout, or when the body ends before or goes on past the declared size.
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<Bytes>, TransferError> {
        let next = async {
            match &mut self.body {
                Body::Http(body) => body.chunk().await.map_err(|e| TransferError::Download {
                    url: self.shown.clone(),
                    detail: format!(
                        "connection lost after {} bytes: {}",
                        self.start + self.received,
                        chain(&e)
                    ),
                }),
                Body::File { file, regular } => {
                    let (file, regular) = (file.clone(), *regular);
                    // Allocated here, on the runtime's thread, not on whichever blocking thread
                    // reads: the chunks then come from one allocator arena instead of one per
                    // thread, which raised the peak RSS of a 2 GiB install by up to 3 MiB.
                    let mut chunk = Vec::with_capacity(FILE_CHUNK);
                    let read = tokio::task::spawn_blocking(move || {
                        if regular {
                            // Into the chunk's spare capacity: no pass to zero it first.
                            file.as_ref()
                                .take(FILE_CHUNK as u64)
                                .read_to_end(&mut chunk)
                                .map(|_| chunk)
                        } else {
                            chunk.resize(FILE_CHUNK, 0);
                            let n = file.as_ref().read(&mut chunk)?;
                            chunk.truncate(n);
                            Ok(chunk)
                        }
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .flatten();
                    match read {
                        Ok(chunk) if chunk.is_empty() => Ok(None),
                        Ok(chunk) => Ok(Some(Bytes::from(chunk))),
                        Err(e) => Err(TransferError::Download {
                            url: self.shown.clone(),
                            detail: format!("cannot read the source file: {e}"),
                        }),
                    }
                }
            }
        };
        let chunk = tokio::time::timeout(self.stall_timeout, next)
            .await
            .map_err(|_| TransferError::Stall {
                url: self.shown.clone(),
                after: self.stall_timeout,
                received: self.start + self.received,
            })??;
        let at = self.start + self.received;
        match &chunk {
            None if at < self.total => {
                return Err(TransferError::SizeMismatch {
                    url: self.shown.clone(),
                    detail: format!(
                        "the body ends after {at} bytes, the release declares {}",
                        self.total
                    ),
                });
            }
            Some(chunk) if chunk.len() as u64 > self.total - at => {
                return Err(TransferError::SizeMismatch {
                    url: self.shown.clone(),
                    detail: format!("the body goes on past the declared {} bytes", self.total),
                });
            }
            Some(chunk) => self.received += chunk.len() as u64,
            None => {}
        }
        Ok(chunk)
    }
}

async fn open_http(
    url: &Url,
    shown: String,
    start: u64,
    total: u64,
    options: &HttpOptions<'_>,
) -> Result<Source, TransferError> {
    let client = HttpClient::new(options.connect_timeout, options.extra_roots);
    let range = (start > 0).then(|| format!("bytes={start}-"));
    let response = tokio::time::timeout(options.stall_timeout, client.get(url, range.as_deref()))
        .await
        .map_err(|_| TransferError::Stall {
            url: shown.clone(),
            after: options.stall_timeout,
            received: start,
        })??;

    let start = match response.status {
        206 if start > 0 => {
            check_content_range(&response.headers, start, total, &shown)?;
            start
        }
        // A server without range support sends everything: start over rather than fail, the
        // image hash still decides.
        200 => 0,
        status => {
            return Err(TransferError::HttpStatus { url: shown, status });
        }
    };
    if let Some(length) = response.body.announced_len() {
        let expected = total - start;
        if length != expected {
            return Err(TransferError::SizeMismatch {
                url: shown,
                detail: format!(
                    "the server announces {length} bytes from offset {start}, the release declares {expected}"
                ),
            });
        }
    }
    Ok(Source {
        shown,
        stall_timeout: options.stall_timeout,
        start,
        received: 0,
        total,
        body: Body::Http(response.body),
    })
}

async fn open_file(
    url: &Url,
    shown: String,
    start: u64,
    total: u64,
    stall_timeout: Duration,
) -> Result<Source, TransferError> {
    let path = local_path(url, &shown)?;
    let fail = |what: &str, e: std::io::Error| TransferError::Download {
        url: shown.clone(),
        detail: format!("cannot {what} the source file: {e}"),
    };
    let (file, meta) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| ("open", e))?;
        let meta = file.metadata().map_err(|e| ("inspect", e))?;
        Ok((file, meta))
    })
    .await
    .map_err(|e| fail("open", std::io::Error::other(e)))?
    .map_err(|(what, e)| fail(what, e))?;
    // Pipes and devices have no length to compare; their bytes are counted as they come.
    if meta.is_file() && meta.len() != total {
        return Err(TransferError::SizeMismatch {
            url: shown,
            detail: format!(
                "the file holds {} bytes, the release declares {total}",
                meta.len()
            ),
        });
    }
    if start > 0 {
        (&file)
            .seek(std::io::SeekFrom::Start(start))
            .map_err(|e| fail("seek in", e))?;
    }
    Ok(Source {
        shown,
        stall_timeout,
        start,
        received: 0,
        total,
        body: Body::File {
            file: Arc::new(file),
            regular: meta.is_file(),
        },
    })
}

/// Accepts `Content-Range: bytes start-(total-1)/total` (or `/*`): anything else means the
/// server would send other bytes than the ones asked for.
fn check_content_range(
    headers: &HeaderMap,
    start: u64,
    total: u64,
    shown: &str,
) -> Result<(), TransferError> {
    let value = headers
        .get(CONTENT_RANGE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let parsed = value.as_deref().and_then(parse_content_range);
    let bad = |why: &str| TransferError::Download {
        url: shown.to_string(),
        detail: format!(
            "asked for bytes={start}-, the server answered 206 with Content-Range {:?} ({why})",
            esc(value.as_deref().unwrap_or("(none)"))
        ),
    };
    let Some((first, last, length)) = parsed else {
        return Err(bad("not a byte range"));
    };
    if let Some(length) = length
        && length != total
    {
        return Err(TransferError::SizeMismatch {
            url: shown.to_string(),
            detail: format!(
                "the server's copy has {length} bytes (Content-Range), the release declares {total}"
            ),
        });
    }
    if first != start || last != total - 1 {
        return Err(bad("a different range"));
    }
    Ok(())
}

/// `bytes first-last/length`, with `*` for an unknown length.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, length) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (number(first)?, number(last)?);
    let length = match length.trim() {
        "*" => None,
        n => Some(number(n)?),
    };
    (first <= last).then_some((first, last, length))
}

/// The local path a `file://` url names (`shown`: the url as it may be shown).
pub(crate) fn local_path(url: &Url, shown: &str) -> Result<std::path::PathBuf, TransferError> {
    url.to_file_path()
        .map_err(|()| TransferError::UnsupportedUrl {
            url: shown.to_string(),
            detail: "a file url must name an absolute local path (file:///...)".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing_is_strict() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, 99, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 10-99/*"), Some((10, 99, None)));
        assert_eq!(parse_content_range("bytes 99-10/100"), None);
        assert_eq!(parse_content_range("bytes -1-99/100"), None);
        assert_eq!(parse_content_range("bytes +1-99/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes */100"), None);
    }

    /// A pipe as the source: each piece is handed on as it comes, so a writer slower than a
    /// chunk's worth per stall timeout, but never silent for that long, is not a stall.
    #[test]
    fn a_pipe_source_yields_what_it_has_without_waiting_for_a_whole_chunk() {
        let (_dir, fifo) = crate::scratch_path("image.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let pieces: [&[u8]; 3] = [b"first piece ", b"second piece ", b"last"];
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut pipe = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
                for piece in pieces {
                    std::io::Write::write_all(&mut pipe, piece).unwrap();
                    std::thread::sleep(Duration::from_millis(600));
                }
            })
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let received = runtime.block_on(async {
            let url = Url::from_file_path(&fifo).unwrap();
            let options = HttpOptions {
                connect_timeout: Duration::from_secs(5),
                stall_timeout: Duration::from_secs(1),
                extra_roots: &[],
            };
            let mut source = Source::open(&url, 0, total as u64, &options).await.unwrap();
            let mut received = Vec::new();
            while let Some(chunk) = source.next_chunk().await.unwrap() {
                received.extend_from_slice(&chunk);
            }
            received
        });
        writer.join().unwrap();
        assert_eq!(received, pieces.concat());
    }

    #[test]
    fn content_range_must_match_the_request() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_RANGE, "bytes 10-99/100".parse().unwrap());
        assert!(check_content_range(&headers, 10, 100, "u").is_ok());
        let err = check_content_range(&headers, 20, 100, "u").unwrap_err();
        assert_eq!(err.reason(), crate::reason::ReasonCode::DownloadFailed);
        let err = check_content_range(&headers, 10, 200, "u").unwrap_err();
        assert_eq!(err.reason(), crate::reason::ReasonCode::SizeMismatch);
        headers.insert(CONTENT_RANGE, "bytes 10-50/100".parse().unwrap());
        assert!(check_content_range(&headers, 10, 100, "u").is_err());
    }
}
