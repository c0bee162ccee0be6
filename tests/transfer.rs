//! Transfer tests against a real, hostile HTTP(S) server on 127.0.0.1: every way a download can
//! go wrong ends in a clean error with its reason code, never touches anything but the slot
//! it was given, and never writes past the image size.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::sim::Act;
use common::sim::tools::run_ok;
use common::{ImageServer, pattern, require, sha256_hex};
use sha2::{Digest, Sha256};
use update_agent::reason::ReasonCode;
use update_agent::release::manifest::{Compression, Image};
use update_agent::transfer::{
    TransferError, TransferEvent, WriteRequest, Written, install_image, verify_slot,
};

// ------------------------------------------------------------------------------------------
// Fixtures

const SIZE: usize = 1024 * 1024 + 4321;
const CHECKPOINT: u64 = 64 * 1024;
const BOOTED: &[u8] = b"the booted slot: must never change";

fn image(url: &str, data: &[u8]) -> Image {
    Image::uncompressed(url, data.len() as u64, Sha256::digest(data).into())
}

fn zstd_image(url: &str, data: &[u8], compressed: &[u8]) -> Image {
    Image {
        compression: Some(Compression::Zstd),
        transport_size: Some(compressed.len() as u64),
        transport_sha256: Some(sha256_hex(compressed)),
        ..image(url, data)
    }
}

struct Slots {
    dir: tempfile::TempDir,
    slot: PathBuf,
    booted: PathBuf,
}

impl Slots {
    /// An empty inactive slot file and a booted one with known content, side by side.
    fn new() -> Slots {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-b");
        let booted = dir.path().join("slot-a");
        std::fs::write(&slot, b"").unwrap();
        std::fs::write(&booted, BOOTED).unwrap();
        Slots { dir, slot, booted }
    }

    fn request(&self, image: Image) -> WriteRequest {
        let mut req = WriteRequest::new(image, &self.slot, 4 * SIZE as u64);
        req.checkpoint_interval = CHECKPOINT;
        req.server.stall_timeout = Duration::from_secs(5);
        req.server.connect_timeout = Duration::from_secs(5);
        req
    }

    fn slot_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.slot).unwrap()
    }

    /// What every test checks: the booted slot is as it was, and nothing lies past `size`.
    fn assert_safe(&self, size: usize) {
        assert_eq!(std::fs::read(&self.booted).unwrap(), BOOTED);
        let len = std::fs::metadata(&self.slot).unwrap().len();
        assert!(len <= size as u64, "slot grew to {len}, past {size}");
    }
}

async fn install(req: &WriteRequest) -> (Result<Written, TransferError>, Vec<TransferEvent>) {
    let mut events = Vec::new();
    let result = install_image(req, &mut |event| {
        events.push(event);
        Ok(())
    })
    .await;
    (result, events)
}

fn checkpoints(events: &[TransferEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            TransferEvent::Checkpoint { durable } => Some(*durable),
            _ => None,
        })
        .collect()
}

/// Runs a request that must fail, checks its reason and the safety invariants, and returns
/// the error for further checks.
async fn expect_failure(slots: &Slots, req: &WriteRequest, reason: ReasonCode) -> TransferError {
    let (result, _) = install(req).await;
    let err = result.expect_err("the install must fail");
    assert_eq!(err.reason(), reason, "unexpected error: {err}");
    let message = err.to_string();
    eprintln!("{reason}: {message}");
    assert!(
        message.chars().all(|c| !c.is_control()),
        "control characters in {message:?}"
    );
    assert!(!message.ends_with('.'), "trailing period: {message}");
    slots.assert_safe(req.image.size as usize);
    err
}

/// The test image, a server answering `/img` as `act` says (bound for as long as it must
/// serve), fresh slots, and a request for the image there.
async fn serve_img(act: Act) -> (Vec<u8>, ImageServer, Slots, WriteRequest) {
    let data = pattern(SIZE, 0x2545);
    let server = ImageServer::serve(data.clone(), vec![("/img", act)]).await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/img"), &data));
    (data, server, slots, req)
}

/// [`serve_img`] over TLS, with a certificate of its own (returned) that no system trusts.
async fn serve_img_over_tls() -> (
    Vec<u8>,
    ImageServer,
    rustls::pki_types::CertificateDer<'static>,
    Slots,
    WriteRequest,
) {
    let data = pattern(SIZE, 0x2545);
    let (server, cert) = https(data.clone(), "/img", Act::Serve).await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/img"), &data));
    (data, server, cert, slots, req)
}

/// The test image and its zstd compression, a server answering `/img.zst` with the latter, and
/// fresh slots.
async fn serve_zstd_img() -> (Vec<u8>, Vec<u8>, ImageServer, Slots) {
    let data = pattern(SIZE, 0x2545);
    let compressed = zstd::encode_all(&data[..], 3).unwrap();
    let server = ImageServer::serve(compressed.clone(), vec![("/img.zst", Act::Serve)]).await;
    (data, compressed, server, Slots::new())
}

// ------------------------------------------------------------------------------------------
// Happy paths

#[tokio::test]
async fn http_image_is_written_checkpointed_and_read_back() {
    let (data, server, slots, req) = serve_img(Act::Serve).await;

    let (result, events) = install(&req).await;
    let written = result.unwrap();

    assert_eq!(written.bytes, SIZE as u64);
    assert_eq!(hex::encode(written.sha256), sha256_hex(&data));
    assert_eq!(slots.slot_bytes(), data);
    slots.assert_safe(SIZE);
    let cps = checkpoints(&events);
    let boundaries: Vec<u64> = (1..=SIZE as u64 / CHECKPOINT)
        .map(|k| k * CHECKPOINT)
        .collect();
    assert_eq!(cps[..cps.len() - 1], boundaries[..]);
    assert_eq!(*cps.last().unwrap(), SIZE as u64);
    assert_eq!(events.last(), Some(&TransferEvent::Verifying));
    assert!(events.contains(&TransferEvent::Progress {
        written: SIZE as u64,
        total: SIZE as u64
    }));
    assert_eq!(
        downloads(&events).last(),
        Some(&(SIZE as u64, SIZE as u64)),
        "the bytes downloaded are reported beside the bytes written"
    );
    assert_eq!(server.body_bytes(), SIZE as u64);
    assert!(server.seen().iter().all(|s| s.range.is_none()));
}

/// The `Downloaded` reports: (downloaded, expected).
fn downloads(events: &[TransferEvent]) -> Vec<(u64, u64)> {
    events
        .iter()
        .filter_map(|event| match event {
            TransferEvent::Downloaded {
                downloaded,
                expected,
            } => Some((*downloaded, *expected)),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn file_url_image_is_written() {
    let data = pattern(SIZE, 0x2545);
    let slots = Slots::new();
    let source = slots.dir.path().join("image.raw");
    std::fs::write(&source, &data).unwrap();
    let url = url::Url::from_file_path(&source).unwrap();
    let req = slots.request(image(url.as_str(), &data));

    let (result, _) = install(&req).await;

    assert_eq!(result.unwrap().bytes, SIZE as u64);
    assert_eq!(slots.slot_bytes(), data);
}

#[tokio::test]
async fn https_image_is_written_with_an_extra_root() {
    let (data, _server, cert, slots, mut req) = serve_img_over_tls().await;
    req.server.extra_roots = vec![cert];

    let (result, _) = install(&req).await;

    result.unwrap();
    assert_eq!(slots.slot_bytes(), data);
}

#[tokio::test]
async fn https_server_with_an_unknown_certificate_is_refused() {
    let (_, _server, _, slots, req) = serve_img_over_tls().await;

    let err = expect_failure(&slots, &req, ReasonCode::TlsFailed).await;
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert_eq!(slots.slot_bytes(), b"");
}

#[tokio::test]
async fn zstd_image_is_decompressed_and_both_hashes_checked() {
    let (data, compressed, server, slots) = serve_zstd_img().await;
    let req = slots.request(zstd_image(&server.url("/img.zst"), &data, &compressed));

    let (result, events) = install(&req).await;

    assert_eq!(result.unwrap().bytes, SIZE as u64);
    assert_eq!(slots.slot_bytes(), data);
    assert!(
        checkpoints(&events).is_empty(),
        "compressed images are not resumable, so no checkpoints"
    );
    let len = compressed.len() as u64;
    assert_eq!(
        downloads(&events).last(),
        Some(&(len, len)),
        "the compressed bytes are what was downloaded"
    );
}

#[tokio::test]
async fn zstd_transport_hash_mismatch_is_refused() {
    let (data, compressed, server, slots) = serve_zstd_img().await;
    let mut image = zstd_image(&server.url("/img.zst"), &data, &compressed);
    image.transport_sha256 = Some(sha256_hex(b"something else"));
    let req = slots.request(image);

    let err = expect_failure(&slots, &req, ReasonCode::HashMismatch).await;
    assert!(err.to_string().contains("compressed image"), "{err}");
}

#[tokio::test]
async fn redirects_within_the_limit_are_followed() {
    let data = pattern(SIZE, 0x2545);
    let mut routes = vec![("/img", Act::Serve)];
    let hops = ["/r1", "/r2", "/r3", "/r4", "/r5"];
    for (i, hop) in hops.iter().enumerate() {
        let next = hops.get(i + 1).copied().unwrap_or("/img");
        routes.push((hop, Act::Redirect(next.to_string())));
    }
    let server = ImageServer::serve(data.clone(), routes).await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/r1"), &data));

    install(&req).await.0.unwrap();
    assert_eq!(slots.slot_bytes(), data);
}

// ------------------------------------------------------------------------------------------
// Hostile servers

/// A body that ends early, whether the server closes cleanly (truncated) or resets the
/// connection, is a download failure worth retrying.
#[tokio::test]
async fn body_cut_midway_is_a_transient_download_failure() {
    for act in [
        Act::Truncate { after: SIZE / 2 },
        Act::Reset { after: SIZE / 2 },
    ] {
        let (_, _server, slots, req) = serve_img(act).await;

        let err = expect_failure(&slots, &req, ReasonCode::DownloadFailed).await;
        assert!(err.is_transient());
    }
}

#[tokio::test]
async fn short_close_delimited_body_is_a_size_mismatch() {
    let data = pattern(SIZE, 0x2545);
    let server = ImageServer::serve(
        data.clone(),
        vec![("/img", Act::CloseDelimited { extra: vec![] })],
    )
    .await;
    let slots = Slots::new();
    let mut longer = data.clone();
    longer.extend_from_slice(b"the release says there is more");
    let req = slots.request(image(&server.url("/img"), &longer));

    expect_failure(&slots, &req, ReasonCode::SizeMismatch).await;
}

#[tokio::test]
async fn wrong_bytes_are_a_hash_mismatch() {
    let mut evil = pattern(SIZE, 0x2545);
    evil[SIZE / 3] ^= 0x40;
    let (_, _server, slots, req) = serve_img(Act::Body(evil)).await;

    let err = expect_failure(&slots, &req, ReasonCode::HashMismatch).await;
    assert!(err.reason().is_tamper_alert());
}

#[tokio::test]
async fn extra_bytes_without_length_stop_at_the_first_one() {
    let extra = vec![0xEE; 300 * 1024];
    let (data, _server, slots, req) = serve_img(Act::CloseDelimited { extra }).await;

    expect_failure(&slots, &req, ReasonCode::SizeMismatch).await;
    // Whatever was written is a prefix of the image: not one byte of the excess.
    let slot = slots.slot_bytes();
    assert_eq!(slot[..], data[..slot.len()]);
}

#[tokio::test]
async fn announced_longer_body_is_refused_before_writing() {
    let (_, _server, slots, req) = serve_img(Act::LongerLength { extra: vec![1; 10] }).await;

    expect_failure(&slots, &req, ReasonCode::SizeMismatch).await;
    assert_eq!(slots.slot_bytes(), b"");
}

#[tokio::test]
async fn stalled_server_times_out() {
    let (_, _server, slots, mut req) = serve_img(Act::Stall { after: 100_000 }).await;
    req.server.stall_timeout = Duration::from_secs(1);

    let begun = Instant::now();
    let (result, events) = install(&req).await;
    let err = result.unwrap_err();
    assert_eq!(err.reason(), ReasonCode::StallTimeout, "{err}");
    assert!(begun.elapsed() < Duration::from_secs(4));
    slots.assert_safe(SIZE);
    // What did arrive is durable and offered for a resume.
    assert_eq!(checkpoints(&events).last(), Some(&100_000));
}

#[tokio::test]
async fn redirect_loop_is_refused() {
    let data = pattern(SIZE, 0x2545);
    let server = ImageServer::serve(
        data.clone(),
        vec![
            ("/a", Act::Redirect("/b".into())),
            ("/b", Act::Redirect("/a".into())),
        ],
    )
    .await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/a"), &data));

    expect_failure(&slots, &req, ReasonCode::RedirectLoop).await;
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn too_many_redirects_are_refused() {
    let data = pattern(SIZE, 0x2545);
    let paths: Vec<String> = (0..10).map(|i| format!("/r{i}")).collect();
    let routes = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), Act::Redirect(format!("/r{}", i + 1))))
        .collect();
    let server = ImageServer::serve(data.clone(), routes).await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/r0"), &data));

    expect_failure(&slots, &req, ReasonCode::RedirectLoop).await;
    assert_eq!(
        server.seen().len(),
        1 + update_agent::transfer::MAX_REDIRECTS
    );
}

#[tokio::test]
async fn https_to_http_redirect_is_refused() {
    let data = pattern(SIZE, 0x2545);
    let plain = ImageServer::serve(data.clone(), vec![("/img", Act::Serve)]).await;
    let (secure, cert) = https(data.clone(), "/img", Act::Redirect(plain.url("/img"))).await;
    let slots = Slots::new();
    let mut req = slots.request(image(&secure.url("/img"), &data));
    req.server.extra_roots = vec![cert];

    let err = expect_failure(&slots, &req, ReasonCode::InsecureRedirect).await;
    assert!(err.to_string().contains(&plain.url("/img")), "{err}");
    assert!(
        plain.seen().is_empty(),
        "the plain-http server was contacted"
    );
    assert_eq!(slots.slot_bytes(), b"");
}

#[tokio::test]
async fn server_error_status_is_reported_with_the_status() {
    let (_, _server, slots, req) = serve_img(Act::Status(500)).await;

    let err = expect_failure(&slots, &req, ReasonCode::HttpStatus).await;
    assert!(matches!(err, TransferError::HttpStatus { status: 500, .. }));
    assert!(err.is_transient());
    assert_eq!(slots.slot_bytes(), b"");
}

#[tokio::test]
async fn missing_image_is_a_404() {
    let data = pattern(SIZE, 0x2545);
    let server = ImageServer::serve(data.clone(), vec![]).await;
    let slots = Slots::new();
    let req = slots.request(image(&server.url("/nope"), &data));

    let err = expect_failure(&slots, &req, ReasonCode::HttpStatus).await;
    assert!(!err.is_transient());
}

#[tokio::test]
async fn zstd_bomb_stops_at_the_image_size() {
    let data = vec![0u8; 64 * 1024];
    // 64 MiB of zeros: a few KiB on the wire.
    let bomb = zstd::encode_all(&vec![0u8; 64 * 1024 * 1024][..], 19).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let server = ImageServer::serve(bomb.clone(), vec![("/img.zst", Act::Serve)]).await;
    let slots = Slots::new();
    let req = slots.request(zstd_image(&server.url("/img.zst"), &data, &bomb));

    expect_failure(&slots, &req, ReasonCode::SizeMismatch).await;
    assert!(slots.slot_bytes().len() <= data.len());
}

#[tokio::test]
async fn zstd_frame_with_a_huge_window_is_refused() {
    let data = pattern(SIZE, 0x2545);
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.long_distance_matching(true).unwrap();
    encoder.window_log(27).unwrap();
    encoder.include_contentsize(false).unwrap();
    io::Write::write_all(&mut encoder, &data).unwrap();
    let compressed = encoder.finish().unwrap();
    let server = ImageServer::serve(compressed.clone(), vec![("/img.zst", Act::Serve)]).await;
    let slots = Slots::new();
    let req = slots.request(zstd_image(&server.url("/img.zst"), &data, &compressed));

    let err = expect_failure(&slots, &req, ReasonCode::DecompressFailed).await;
    assert!(err.to_string().contains("--long"), "{err}");
}

#[tokio::test]
async fn image_larger_than_the_slot_is_refused_before_anything() {
    let (_, server, slots, mut req) = serve_img(Act::Serve).await;
    std::fs::write(&slots.slot, b"old system").unwrap();
    req.slot_capacity = SIZE as u64 - 1;

    expect_failure(&slots, &req, ReasonCode::ImageTooLarge).await;
    assert_eq!(slots.slot_bytes(), b"old system");
    assert!(server.seen().is_empty(), "the server was contacted");
}

#[tokio::test]
async fn missing_slot_is_not_created() {
    let (_, server, slots, mut req) = serve_img(Act::Serve).await;
    req.slot_path = slots.slot.with_file_name("no-such-slot");

    let (result, _) = install(&req).await;
    assert_eq!(result.unwrap_err().reason(), ReasonCode::SlotIo);
    assert!(!req.slot_path.exists());
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn failing_checkpoint_handler_cancels_the_install() {
    let (_, _server, slots, req) = serve_img(Act::Serve).await;

    let result = install_image(&req, &mut |event| match event {
        TransferEvent::Checkpoint { .. } => Err(io::Error::other("state store is full")),
        _ => Ok(()),
    })
    .await;

    let err = result.unwrap_err();
    assert_eq!(err.reason(), ReasonCode::Cancelled);
    assert!(err.to_string().contains("state store is full"));
    slots.assert_safe(SIZE);
}

// ------------------------------------------------------------------------------------------
// Resume

#[tokio::test]
async fn resume_after_a_reset_continues_with_a_range_request() {
    let reset_at = 600 * 1024 + 123;
    let (data, server, slots, mut req) = serve_img(Act::once(Act::Reset { after: reset_at })).await;

    let (result, events) = install(&req).await;
    assert_eq!(result.unwrap_err().reason(), ReasonCode::DownloadFailed);
    slots.assert_safe(SIZE);
    // The caller persists the last checkpoint it heard of.
    let durable = *checkpoints(&events)
        .last()
        .expect("a checkpoint before the reset");
    assert!(durable > 0 && durable <= reset_at as u64, "{durable}");

    req.resume_from = durable;
    let (result, events) = install(&req).await;

    result.unwrap();
    assert_eq!(slots.slot_bytes(), data);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].range.as_deref(),
        Some(&*format!("bytes={durable}-"))
    );
    assert_eq!(
        events.first(),
        Some(&TransferEvent::Progress {
            written: durable,
            total: SIZE as u64
        })
    );
}

#[tokio::test]
async fn resume_answered_with_200_restarts_from_zero() {
    let (data, server, slots, mut req) = serve_img(Act::IgnoreRange).await;
    // A slot left half-written with garbage by an earlier attempt at some other image.
    std::fs::write(&slots.slot, vec![0x55; SIZE / 2]).unwrap();
    req.resume_from = (SIZE / 2) as u64;

    install(&req).await.0.unwrap();

    assert_eq!(slots.slot_bytes(), data);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].range.as_deref(),
        Some(&*format!("bytes={}-", SIZE / 2))
    );
}

#[tokio::test]
async fn resume_from_the_full_size_only_reads_back() {
    let (data, server, slots, mut req) = serve_img(Act::Serve).await;
    std::fs::write(&slots.slot, &data).unwrap();
    req.resume_from = SIZE as u64;

    install(&req).await.0.unwrap();
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn resume_past_a_truncated_slot_starts_over() {
    let (data, server, slots, mut req) = serve_img(Act::Serve).await;
    std::fs::write(&slots.slot, &data[..1000]).unwrap();
    req.resume_from = 500_000;

    install(&req).await.0.unwrap();
    assert_eq!(slots.slot_bytes(), data);
    assert_eq!(server.seen()[0].range, None);
}

// ------------------------------------------------------------------------------------------
// Read-back

#[test]
fn verify_slot_catches_a_changed_byte() {
    let data = pattern(SIZE, 0x2545);
    let slots = Slots::new();
    let mut stored = data.clone();
    stored.extend_from_slice(b"bytes past the image are not part of it");
    std::fs::write(&slots.slot, &stored).unwrap();
    let digest: [u8; 32] = Sha256::digest(&data).into();

    verify_slot(&slots.slot, SIZE as u64, &digest).unwrap();

    stored[SIZE - 1] ^= 1;
    std::fs::write(&slots.slot, &stored).unwrap();
    let err = verify_slot(&slots.slot, SIZE as u64, &digest).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ReadbackMismatch);

    let err = verify_slot(&slots.slot, stored.len() as u64 + 1, &digest).unwrap_err();
    assert_eq!(err.reason(), ReasonCode::ReadbackMismatch);
    assert!(err.to_string().contains("ends after"), "{err}");
}

/// tmpfs refuses O_DIRECT before Linux 6.6 (the read-back then falls back to fadvise and plain
/// reads, unit-tested in `readback.rs`) and accepts it since.
#[test]
fn verify_slot_works_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    assert!(shm.is_dir(), "this test needs a tmpfs at /dev/shm");
    let dir = tempfile::tempdir_in(shm).unwrap();
    let slot = dir.path().join("slot");
    let data = pattern(SIZE, 0x2545);
    std::fs::write(&slot, &data).unwrap();
    let digest: [u8; 32] = Sha256::digest(&data).into();

    verify_slot(&slot, SIZE as u64, &digest).unwrap();
}

// ------------------------------------------------------------------------------------------
// Block-device slots (loop devices: the tests run as root, which can have them)

/// A loop device over a sparse file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    /// Fails the test, saying why, where no loop device can be had.
    #[track_caller]
    fn attach(size: u64) -> LoopDevice {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let mut losetup = std::process::Command::new(require("losetup", "mount"));
        losetup.args(["--find", "--show"]).arg(&backing);
        let dev = run_ok(&mut losetup).unwrap_or_else(|e| {
            panic!("no loop device (this test must run as root, with /dev/loop-control): {e}")
        });
        LoopDevice {
            dev: PathBuf::from(dev.trim()),
            _dir: dir,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("--detach")
            .arg(&self.dev)
            .status();
    }
}

#[tokio::test]
async fn block_device_slot_is_bounded_by_its_size_and_exclusive() {
    let device = LoopDevice::attach(2 * 1024 * 1024);
    let (data, server, _slots, mut req) = serve_img(Act::Serve).await;
    req.slot_path = device.dev.clone();
    req.slot_capacity = 1 << 40;

    install(&req).await.0.unwrap();
    let written = std::fs::read(&device.dev).unwrap();
    assert_eq!(written[..SIZE], data[..]);
    assert!(written[SIZE..].iter().all(|&b| b == 0));

    // The configured capacity is generous; the device's own size still refuses a larger image.
    let big = pattern(3 * 1024 * 1024, 0x2545);
    req.image = image(&server.url("/img"), &big);
    let (result, _) = install(&req).await;
    let err = result.unwrap_err();
    assert!(
        matches!(err, TransferError::ImageTooLarge { capacity, .. } if capacity == 2 * 1024 * 1024),
        "{err}"
    );

    // A device someone holds exclusively (as a mount does) is never written.
    use std::os::unix::fs::OpenOptionsExt;
    let _held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(&device.dev)
        .unwrap();
    req.image = image(&server.url("/img"), &data);
    let (result, _) = install(&req).await;
    let err = result.unwrap_err();
    assert_eq!(err.reason(), ReasonCode::SlotIo, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[tokio::test]
async fn compressed_image_ignores_resume_from() {
    let (data, compressed, server, slots) = serve_zstd_img().await;
    std::fs::write(&slots.slot, &data[..SIZE / 2]).unwrap();
    let mut req = slots.request(zstd_image(&server.url("/img.zst"), &data, &compressed));
    req.resume_from = (SIZE / 2) as u64;

    install(&req).await.0.unwrap();
    assert_eq!(slots.slot_bytes(), data);
    assert_eq!(server.seen()[0].range, None);
}

/// An HTTPS image server with a fresh self-signed certificate for 127.0.0.1 serving `act` at
/// `path`, and that certificate for the client to trust.
async fn https(
    data: Vec<u8>,
    path: &str,
    act: Act,
) -> (ImageServer, rustls::pki_types::CertificateDer<'static>) {
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = key.cert.der().clone();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.signing_key.serialize_der()),
    );
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.clone()], private)
    .unwrap();
    let server = ImageServer::builder(data)
        .route(path, act)
        .tls(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
        .start()
        .await
        .unwrap();
    (server, cert)
}
