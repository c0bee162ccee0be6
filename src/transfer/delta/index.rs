//! The block index of a release: fetched whole (bounded by what an index for the image can be),
//! checked against the signed manifest, expanded into the work directory and reused from there.

use std::fs::File;
use std::io::{self, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;

use url::Url;

use super::store::{Body, send};
use super::{DeltaSettings, parse_url, prepare_work_dir};
use crate::release::block_index::{self, IndexError, IndexFile, MAX_DICTIONARY_SIZE};
use crate::release::manifest::ChunkIndexRef;
use crate::transfer::error::{TransferError, esc};
use crate::transfer::http::HttpClient;
use crate::transfer::join_error;
use crate::transfer::source::HttpOptions;

pub(super) enum IndexFailure {
    Refused(crate::release::Refusal),
    Transfer(TransferError),
}

impl From<TransferError> for IndexFailure {
    fn from(e: TransferError) -> IndexFailure {
        IndexFailure::Transfer(e)
    }
}

/// The block index of `image` as an earlier fetch expanded it into `work_dir` (the file is
/// named after the SHA-256 the signed manifest gives, and only ever appears there, renamed into
/// place, once its bytes matched it), or `None`. Blocking: opening checks the whole file.
pub(crate) fn expanded_index(
    work_dir: &Path,
    image: &crate::release::manifest::Image,
    chunks: &ChunkIndexRef,
) -> Option<IndexFile> {
    if chunks.sha256.len() != 64 || !chunks.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let dest = work_dir.join(format!("{}.index", chunks.sha256.to_ascii_lowercase()));
    IndexFile::open(&dest).ok().filter(|index| {
        index.header().image_size == image.size
            && u64::from(index.header().block_size) == chunks.chunk_size
    })
}

/// The expanded index: reused when one of the same SHA-256 is in the work directory, else
/// downloaded (at most what an index for this image can be) and expanded. Returns it and the
/// bytes downloaded.
pub(super) async fn fetch_index(
    url: &Url,
    image: &crate::release::manifest::Image,
    chunks: &ChunkIndexRef,
    settings: &DeltaSettings,
    http: &HttpOptions<'_>,
) -> Result<(IndexFile, u64), IndexFailure> {
    let name = format!("{}.index", chunks.sha256.to_ascii_lowercase());
    if !chunks.sha256.bytes().all(|b| b.is_ascii_hexdigit()) || chunks.sha256.len() != 64 {
        return Err(IndexFailure::Refused(crate::release::Refusal::new(
            crate::reason::ReasonCode::Malformed,
            "block index: the manifest's sha256 is not 64 hex digits",
        )));
    }
    let dest = settings.work_dir.join(&name);
    if let Some(index) = expanded_index(&settings.work_dir, image, chunks) {
        return Ok((index, 0));
    }
    // Indexes of other releases are of no more use.
    if let Ok(entries) = std::fs::read_dir(&settings.work_dir) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.ends_with(".index") && file != name {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    // The most a served index can be for this image: header, dictionary, one hash, one
    // section byte and one frame size per block, and zstd's worst case on top.
    let blocks = image.size.div_ceil(chunks.chunk_size.max(1));
    let raw = u64::from(MAX_DICTIONARY_SIZE) + blocks * (32 + 1 + 4);
    let cap = block_index::MAX_HEADER_LEN as u64 + raw + raw / 128 + 4096;
    let mut download = tempfile::tempfile_in(&settings.work_dir).map_err(|e| {
        TransferError::slot_io(&settings.work_dir, "make a file for the block index", e)
    })?;
    let bytes = download_whole(url, http, cap, &mut |chunk| {
        io::Write::write_all(&mut download, chunk)
            .map_err(|e| TransferError::slot_io(&settings.work_dir, "write the block index", e))
    })
    .await?;
    let image = image.clone();
    let chunks = chunks.clone();
    let work_dir = settings.work_dir.clone();
    let expanded = tokio::task::spawn_blocking(move || {
        io::Seek::rewind(&mut download)?;
        Ok::<_, io::Error>(block_index::expand(
            BufReader::with_capacity(64 * 1024, download),
            &image,
            &chunks,
            &dest,
        ))
    })
    .await
    .map_err(join_error)?
    .map_err(|e| TransferError::slot_io(&work_dir, "read the block index", e))?;
    match expanded {
        Ok(index) => Ok((index, bytes)),
        Err(IndexError::Refused(refusal)) => Err(IndexFailure::Refused(refusal)),
        Err(IndexError::Io { context, source }) => {
            Err(IndexFailure::Transfer(TransferError::slot_io(
                &work_dir,
                "expand the block index",
                io::Error::other(format!("{context}: {source}")),
            )))
        }
    }
}

pub(super) fn check_cap(copied: u64, cap: u64, shown: &str) -> Result<(), TransferError> {
    if copied > cap {
        return Err(TransferError::SizeMismatch {
            url: shown.to_string(),
            detail: format!(
                "the block index goes on past {cap} bytes, more than one for this image can hold"
            ),
        });
    }
    Ok(())
}

/// The most a served index can be for an image: header, dictionary, one hash, one section byte
/// and one frame size per block, and zstd's worst case on top.
pub(super) fn index_cap(size: u64, chunk_size: u64) -> u64 {
    let blocks = size.div_ceil(chunk_size.max(1));
    let raw = u64::from(MAX_DICTIONARY_SIZE) + blocks * (32 + 1 + 4);
    block_index::MAX_HEADER_LEN as u64 + raw + raw / 128 + 4096
}

/// A block index the daemon downloaded and found to match the signed manifest's SHA-256, to
/// send to the installer (which checks it again against its own verified release).
pub struct CheckedIndex {
    file: File,
    pub(super) len: u64,
    pub(super) store_url: Url,
    pub(super) store_size: u64,
}

impl CheckedIndex {
    /// Sends `index` ahead of the image into the installer's stream `out`, on a blocking thread
    /// (the installer reads it before anything else), and gives `out` back.
    pub async fn send<S: std::os::fd::AsFd + Send + 'static>(
        index: Option<CheckedIndex>,
        out: S,
    ) -> Result<S, TransferError> {
        tokio::task::spawn_blocking(move || {
            CheckedIndex::write_to(index.as_ref(), &out)?;
            Ok(out)
        })
        .await
        .map_err(crate::transfer::join_error)?
    }

    /// The index's length (8 bytes, little-endian), then its bytes; `None` writes the length 0
    /// (no index). Blocking.
    fn write_to(
        index: Option<&CheckedIndex>,
        out: &impl std::os::fd::AsFd,
    ) -> Result<(), TransferError> {
        let lost = |e: io::Error| TransferError::Download {
            url: "the installer's stream".to_string(),
            detail: format!("the installer's stream broke: {e}"),
        };
        let len = index.map_or(0, |index| index.len);
        crate::socket::send_all(out, &len.to_le_bytes()).map_err(lost)?;
        let Some(index) = index else { return Ok(()) };
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0;
        while at < len {
            let n = ((len - at) as usize).min(buf.len());
            index
                .file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| TransferError::slot_io(Path::new("the block index"), "read", e))?;
            crate::socket::send_all(out, &buf[..n]).map_err(lost)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// The daemon's side, before the installer is asked: the index downloaded and checked against
/// the manifest's hash (so that a bad one falls back, or fails, before the slot is touched).
pub async fn fetch_checked_index(
    image: &crate::release::manifest::Image,
    settings: &crate::transfer::FetchSettings,
    work_dir: &Path,
) -> Result<CheckedIndex, TransferError> {
    use sha2::Digest;
    let chunks = chunks_of(image)?;
    prepare_work_dir(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "create the work directory", e))?;
    let http = settings.server.http();
    let url = parse_url(&chunks.url)?;
    let shown = esc(url.as_str());
    let cap = index_cap(image.size, chunks.chunk_size);
    let mut file = tempfile::tempfile_in(work_dir)
        .map_err(|e| TransferError::slot_io(work_dir, "make a file for the index", e))?;
    let mut hasher = sha2::Sha256::new();
    let mut head = Vec::new();
    let len = download_whole(&url, &http, cap, &mut |chunk| {
        hasher.update(chunk);
        if head.len() < block_index::MAX_HEADER_LEN {
            let take = (block_index::MAX_HEADER_LEN - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
        }
        io::Write::write_all(&mut file, chunk)
            .map_err(|e| TransferError::slot_io(work_dir, "write the index", e))
    })
    .await?;
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(&chunks.sha256) {
        return Err(TransferError::BlockIndex {
            url: shown,
            refusal: crate::release::Refusal::new(
                crate::reason::ReasonCode::HashMismatch,
                format!(
                    "block index: its SHA-256 is {actual}, the signed manifest says {}",
                    chunks.sha256
                ),
            ),
        });
    }
    let header =
        block_index::IndexHeader::parse(&head).map_err(|refusal| TransferError::BlockIndex {
            url: shown.clone(),
            refusal,
        })?;
    let store_url = url
        .join(&header.store_name)
        .map_err(|e| TransferError::UnsupportedUrl {
            url: shown.clone(),
            detail: format!("the store's url cannot be made: {e}"),
        })?;
    Ok(CheckedIndex {
        file,
        len,
        store_url,
        store_size: header.store_size,
    })
}

/// The image's block index reference; an image without one is refused.
pub(super) fn chunks_of(
    image: &crate::release::manifest::Image,
) -> Result<&crate::release::manifest::ChunkIndexRef, TransferError> {
    image
        .chunks
        .as_ref()
        .ok_or_else(|| TransferError::BadImage {
            url: esc(&image.url),
            detail: "no block index (chunks) for the image".into(),
        })
}

/// Downloads a whole (small) file, at most `cap` bytes, handing each chunk on: the block index,
/// for the install here and for the daemon's offer under the split. Over http(s), anything but
/// a 200 answer is refused.
pub(super) async fn download_whole(
    url: &Url,
    http: &HttpOptions<'_>,
    cap: u64,
    each: &mut (dyn FnMut(&[u8]) -> Result<(), TransferError> + Send),
) -> Result<u64, TransferError> {
    let shown = esc(url.as_str());
    match url.scheme() {
        "file" => {
            let path = crate::transfer::source::local_path(url, &shown)?;
            let mut source = File::open(&path).map_err(|e| TransferError::Download {
                url: shown.clone(),
                detail: format!("cannot open: {e}"),
            })?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut copied = 0u64;
            loop {
                let n = match io::Read::read(&mut source, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(TransferError::Download {
                            url: shown,
                            detail: format!("cannot read: {e}"),
                        });
                    }
                };
                copied += n as u64;
                check_cap(copied, cap, &shown)?;
                each(&buf[..n])?;
            }
            Ok(copied)
        }
        "http" | "https" => {
            let client = HttpClient::new(http.connect_timeout, http.extra_roots);
            let response = send(&client, url, None, &shown, http.stall_timeout).await?;
            if response.status != 200 {
                return Err(TransferError::HttpStatus {
                    url: shown,
                    status: response.status,
                });
            }
            let mut body = Body::new(response.body, &shown, http.stall_timeout);
            while let Some(chunk) = body.next().await? {
                check_cap(body.received, cap, &shown)?;
                each(&chunk)?;
            }
            Ok(body.received)
        }
        other => Err(TransferError::UnsupportedUrl {
            url: shown,
            detail: format!(
                "the scheme {:?} is not one of https, http, file",
                esc(other)
            ),
        }),
    }
}
