//! The block store over HTTP: single-range and `multipart/byteranges` answers, each part put at
//! its offset, the server's Range support probed once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use hyper::header::{CONTENT_RANGE, CONTENT_TYPE};
use url::Url;

use crate::delta::plan::Request;
use crate::transfer::error::{TransferError, chain, esc};
use crate::transfer::http::{HttpClient, Response, ResponseBody};
use crate::transfer::source::HttpOptions;

/// A GET of `url` (with `range` as its `Range` header), answered within the stall timeout.
pub(super) async fn send(
    client: &HttpClient,
    url: &Url,
    range: Option<&str>,
    shown: &str,
    stall: Duration,
) -> Result<Response, TransferError> {
    tokio::time::timeout(stall, client.get(url, range))
        .await
        .map_err(|_| TransferError::Stall {
            url: shown.to_string(),
            after: stall,
            received: 0,
        })?
}

/// A response body read chunk by chunk, each within the stall timeout.
pub(super) struct Body {
    body: ResponseBody,
    shown: String,
    stall: Duration,
    pub(super) received: u64,
}

impl Body {
    pub(super) fn new(body: ResponseBody, shown: &str, stall: Duration) -> Body {
        Body {
            body,
            shown: shown.to_string(),
            stall,
            received: 0,
        }
    }

    pub(super) async fn next(&mut self) -> Result<Option<bytes::Bytes>, TransferError> {
        let chunk = tokio::time::timeout(self.stall, self.body.chunk())
            .await
            .map_err(|_| TransferError::Stall {
                url: self.shown.clone(),
                after: self.stall,
                received: self.received,
            })?
            .map_err(|e| TransferError::Download {
                url: self.shown.clone(),
                detail: format!(
                    "connection lost after {} bytes: {}",
                    self.received,
                    chain(&e)
                ),
            })?;
        if let Some(chunk) = &chunk {
            self.received += chunk.len() as u64;
        }
        Ok(chunk)
    }
}

/// How a server answers Range requests.
pub(super) enum RangeSupport {
    /// Several ranges in one request (`multipart/byteranges`).
    Multi,
    /// One range a request.
    Single,
    /// None: it sends the whole file (what it answered).
    None(String),
}

/// The block store, where its ranges are fetched from.
#[derive(Clone)]
pub(super) struct Store {
    url: Url,
    pub(super) shown: String,
    /// `None` for a `file://` store. Clones share its kept connection: the requests of an
    /// install, hundreds of small ranges, go over one connection and one TLS handshake.
    client: Option<HttpClient>,
    stall: Duration,
}

impl Store {
    pub(super) fn new(url: &Url, http: &HttpOptions<'_>) -> Result<Store, TransferError> {
        let shown = esc(url.as_str());
        let client = match url.scheme() {
            "http" | "https" => Some(HttpClient::new(http.connect_timeout, http.extra_roots)),
            "file" => None,
            other => {
                return Err(TransferError::UnsupportedUrl {
                    url: shown,
                    detail: format!(
                        "the scheme {:?} is not one of https, http, file",
                        esc(other)
                    ),
                });
            }
        };
        Ok(Store {
            url: url.clone(),
            shown,
            client,
            stall: http.stall_timeout,
        })
    }

    /// One small request: two single-byte ranges (a multi-range answer), and when the server
    /// answers that with the whole file, one (a single-range answer).
    pub(super) async fn probe(
        &self,
        store_size: u64,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<RangeSupport, TransferError> {
        let Some(client) = &self.client else {
            return Ok(RangeSupport::Multi);
        };
        let get =
            |range: &'static str| send(client, &self.url, Some(range), &self.shown, self.stall);
        if store_size >= 3 {
            let response = get("bytes=0-0,2-2").await?;
            let status = response.status;
            let multipart = response
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/byteranges"));
            match status {
                206 if multipart => {
                    // Two bytes and their part headers: read (and counted), at most 4 KiB.
                    let mut body = Body::new(response.body, &self.shown, self.stall);
                    while body.next().await?.is_some() && body.received <= 4096 {}
                    counted(body.received);
                    return Ok(RangeSupport::Multi);
                }
                206 | 200 => {}
                status => {
                    return Err(TransferError::HttpStatus {
                        url: self.shown.clone(),
                        status,
                    });
                }
            }
        }
        let response = get("bytes=0-0").await?;
        match response.status {
            206 => {
                // One byte, read (and counted) so that its connection is kept for the ranges.
                let mut body = Body::new(response.body, &self.shown, self.stall);
                while body.next().await?.is_some() && body.received <= 4096 {}
                counted(body.received);
                Ok(RangeSupport::Single)
            }
            200 => Ok(RangeSupport::None("200 with the whole file".into())),
            status => Err(TransferError::HttpStatus {
                url: self.shown.clone(),
                status,
            }),
        }
    }

    /// Fetches the request's ranges into `spool` at their offsets in the store. `counted` is
    /// told every body byte received.
    pub(super) async fn fetch(
        &self,
        request: &Request,
        spool: &File,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<(), TransferError> {
        let Some(client) = &self.client else {
            return self.fetch_file(request, spool, counted);
        };
        let spool_error = |e| TransferError::slot_io(Path::new("the delta spool"), "write", e);
        let range = request.range_header();
        let response = send(client, &self.url, Some(&range), &self.shown, self.stall).await?;
        let status = response.status;
        if status == 200 {
            return Err(TransferError::RangeUnsupported {
                url: self.shown.clone(),
                answer: "200 with the whole file".into(),
            });
        }
        if status != 206 {
            return Err(TransferError::HttpStatus {
                url: self.shown.clone(),
                status,
            });
        }
        let first = request.ranges.first().map_or(0, |r| r.offset);
        let last = request.ranges.last().map_or(0, |r| r.end());
        // Everything asked for, the gaps between, and room for part headers.
        let most = last - first + 512 * request.ranges.len() as u64 + 4096;
        let content_type = response
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let single = response
            .headers
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        let mut body = Body::new(response.body, &self.shown, self.stall);
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let boundary = content_type.as_deref().and_then(multipart_boundary);
        match (boundary, single) {
            (Some(boundary), _) => {
                let mut parser = Multipart::new(&boundary);
                while let Some(chunk) = body.next().await? {
                    counted(chunk.len() as u64);
                    if body.received > most {
                        return Err(self.bad("the multipart answer goes on past what was asked"));
                    }
                    parser.feed(
                        &chunk,
                        &mut |offset, bytes| spool.write_all_at(bytes, offset).map_err(spool_error),
                        &self.shown,
                    )?;
                }
                covered = parser.finish(&self.shown)?;
            }
            (None, Some((start, end))) => {
                let mut at = start;
                while let Some(chunk) = body.next().await? {
                    counted(chunk.len() as u64);
                    if at + chunk.len() as u64 > end {
                        return Err(self.bad("the body goes on past its Content-Range"));
                    }
                    spool.write_all_at(&chunk, at).map_err(spool_error)?;
                    at += chunk.len() as u64;
                }
                if at != end {
                    return Err(self.bad("the body ends before its Content-Range"));
                }
                covered.push((start, end));
            }
            (None, None) => return Err(self.bad("a 206 answer without a Content-Range")),
        }
        for range in &request.ranges {
            if !covered
                .iter()
                .any(|&(s, e)| s <= range.offset && range.end() <= e)
            {
                return Err(self.bad(&format!(
                    "bytes {} were asked for and not sent",
                    range.http()
                )));
            }
        }
        Ok(())
    }

    fn fetch_file(
        &self,
        request: &Request,
        spool: &File,
        counted: &mut (dyn FnMut(u64) -> u64 + Send),
    ) -> Result<(), TransferError> {
        let path = crate::transfer::source::local_path(&self.url, &self.shown)?;
        let file = File::open(&path).map_err(|e| TransferError::Download {
            url: self.shown.clone(),
            detail: format!("cannot open: {e}"),
        })?;
        let mut buf = Vec::new();
        for range in &request.ranges {
            buf.resize(range.len as usize, 0);
            file.read_exact_at(&mut buf, range.offset)
                .map_err(|e| TransferError::Download {
                    url: self.shown.clone(),
                    detail: format!("cannot read bytes {}: {e}", range.http()),
                })?;
            counted(range.len);
            spool
                .write_all_at(&buf, range.offset)
                .map_err(|e| TransferError::slot_io(Path::new("the delta spool"), "write", e))?;
        }
        Ok(())
    }

    fn bad(&self, what: &str) -> TransferError {
        TransferError::Download {
            url: self.shown.clone(),
            detail: format!("a range answer is not usable: {what}"),
        }
    }
}

/// `bytes first-last/length` as the half-open range `[first, last + 1)`.
pub(super) fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, _length) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (number(first)?, number(last)?);
    (first <= last).then_some((first, last + 1))
}

/// The boundary of a `multipart/byteranges` content type.
pub(super) fn multipart_boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim().trim_matches('"');
        (!value.is_empty() && value.len() <= 70).then(|| value.to_string())
    })
}

/// Where a part's bytes go: their offset in the store, the bytes.
pub(super) type PartSink<'a> = dyn FnMut(u64, &[u8]) -> Result<(), TransferError> + 'a;

/// Most bytes of part headers (and delimiters) held at once.
pub(super) const MAX_PART_HEAD: usize = 8 * 1024;

/// A streaming `multipart/byteranges` parser: each part's bytes go to the callback at the store
/// offset its `Content-Range` names; the head of a part is held (bounded), never its body.
pub(super) struct Multipart {
    delimiter: Vec<u8>,
    head: Vec<u8>,
    /// In a part's body: the next offset and the bytes left.
    body: Option<(u64, u64)>,
    parts: Vec<(u64, u64)>,
    done: bool,
}

impl Multipart {
    fn new(boundary: &str) -> Multipart {
        Multipart {
            delimiter: format!("--{boundary}").into_bytes(),
            head: Vec::new(),
            body: None,
            parts: Vec::new(),
            done: false,
        }
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut PartSink<'_>,
        shown: &str,
    ) -> Result<(), TransferError> {
        let bad = |what: &str| TransferError::Download {
            url: shown.to_string(),
            detail: format!("the multipart answer is malformed: {what}"),
        };
        while !data.is_empty() {
            if let Some((offset, left)) = self.body {
                let take = (left as usize).min(data.len());
                out(offset, &data[..take])?;
                data = &data[take..];
                self.body =
                    (left > take as u64).then_some((offset + take as u64, left - take as u64));
                continue;
            }
            if self.done {
                // The epilogue: ignored, but bounded by the caller's length check.
                return Ok(());
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.len() > MAX_PART_HEAD {
                return Err(bad("a part's head is too long"));
            }
            let Some(at) = find(&self.head, &self.delimiter) else {
                continue;
            };
            let after = &self.head[at + self.delimiter.len()..];
            if after.len() < 2 {
                continue;
            }
            if after.starts_with(b"--") {
                self.done = true;
                continue;
            }
            let Some(end) = find(after, b"\r\n\r\n") else {
                continue;
            };
            let headers = String::from_utf8_lossy(&after[..end]).into_owned();
            let range = headers
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.trim()
                        .eq_ignore_ascii_case("content-range")
                        .then(|| parse_content_range(value))
                        .flatten()
                })
                .ok_or_else(|| bad("a part without a Content-Range"))?;
            if self.parts.len() >= 4096 {
                return Err(bad("too many parts"));
            }
            self.parts.push(range);
            self.body = Some((range.0, range.1 - range.0));
            self.head.clear();
        }
        Ok(())
    }

    fn finish(self, shown: &str) -> Result<Vec<(u64, u64)>, TransferError> {
        if !self.done || self.body.is_some() {
            return Err(TransferError::Download {
                url: shown.to_string(),
                detail: "the multipart answer ends early".into(),
            });
        }
        Ok(self.parts)
    }
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_parts_land_at_their_offsets_whatever_the_chunking() {
        let body = b"\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 10-13/100\r\n\r\nabcd\r\n--XyZ\r\nContent-Range: bytes 50-51/100\r\n\r\nef\r\n--XyZ--\r\n";
        for step in [1, 3, 7, body.len()] {
            let mut parser = Multipart::new("XyZ");
            let mut got = Vec::new();
            for chunk in body.chunks(step) {
                parser
                    .feed(
                        chunk,
                        &mut |offset, bytes| {
                            got.push((offset, bytes.to_vec()));
                            Ok(())
                        },
                        "u",
                    )
                    .unwrap();
            }
            let parts = parser.finish("u").unwrap();
            assert_eq!(parts, vec![(10, 14), (50, 52)]);
            let mut flat: Vec<(u64, u8)> = Vec::new();
            for (offset, bytes) in got {
                for (i, b) in bytes.into_iter().enumerate() {
                    flat.push((offset + i as u64, b));
                }
            }
            let expected: Vec<(u64, u8)> =
                (10..14).zip(*b"abcd").chain((50..52).zip(*b"ef")).collect();
            assert_eq!(flat, expected, "step {step}");
        }
    }

    #[test]
    fn a_multipart_answer_cut_short_or_without_ranges_is_refused() {
        let mut parser = Multipart::new("b");
        parser
            .feed(
                b"--b\r\nContent-Range: bytes 0-9/10\r\n\r\nabc",
                &mut |_, _| Ok(()),
                "u",
            )
            .unwrap();
        assert!(parser.finish("u").is_err());
        let mut parser = Multipart::new("b");
        let result = parser.feed(
            b"--b\r\nContent-Type: x\r\n\r\nabc",
            &mut |_, _| Ok(()),
            "u",
        );
        assert!(result.is_err());
        let mut parser = Multipart::new("b");
        let result = parser.feed(&vec![b'x'; MAX_PART_HEAD + 1], &mut |_, _| Ok(()), "u");
        assert!(result.is_err());
    }

    #[test]
    fn boundaries_and_ranges_parse_strictly() {
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=00000000000000000001").as_deref(),
            Some("00000000000000000001")
        );
        assert_eq!(
            multipart_boundary("multipart/byteranges; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(multipart_boundary("text/plain; boundary=x"), None);
        assert_eq!(parse_content_range("bytes 0-9/10"), Some((0, 10)));
        assert_eq!(parse_content_range("bytes 9-0/10"), None);
        assert_eq!(parse_content_range("bytes 0-99999999999999999999/10"), None);
    }
}
