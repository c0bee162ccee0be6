//! `update-agent release create` and `release sign`: making and signing releases, on the
//! operator's machine (the `operator` feature; devices only verify).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use jiff::Timestamp;
use update_agent::durable;
use update_agent::keys::{self, KeyId};
use update_agent::release::Manifest;
use update_agent::release::build::{self, ImageDigest};
use update_agent::release::manifest::{
    ChunkIndexRef, Compression, Disruption, FORMAT, Image, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Rollout,
    Severity,
};

use super::release_summary::{print_summary, read_envelope};

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Private signing key (PKCS#8 PEM)
    #[arg(long)]
    key: PathBuf,
    /// The image as it is to be written to the slot
    #[arg(long)]
    image: PathBuf,
    /// Version shown to people, e.g. 2026.11.1
    #[arg(long)]
    version: String,
    /// Monotonic anti-rollback number; devices refuse releases below their floor
    #[arg(long)]
    security_version: u64,
    /// Product string the release is for; devices of another product refuse it
    #[arg(long)]
    compatible: String,
    /// Where devices download the image (https, http or file); with --compress, the compressed file
    #[arg(long)]
    url: String,
    /// What the update fixes, for the person who owns the device
    #[arg(long, default_value = "")]
    advisory: String,
    /// The release fixes a security problem
    #[arg(long)]
    security: bool,
    #[arg(long, value_enum, default_value = "none")]
    severity: SeverityArg,
    /// Latest install time (RFC 3339); users cannot postpone past it
    #[arg(long)]
    deadline: Option<Timestamp>,
    /// Staged rollout: when the window opens (RFC 3339; default: now). Each device installs
    /// at its own moment in [start, start + duration), drawn from the release and its device
    /// id. Makes the manifest format 2, which agents older than the rollout schedule refuse
    #[arg(long)]
    rollout_start: Option<Timestamp>,
    /// Staged rollout: the window's length in seconds (with --rollout-start, or from now)
    #[arg(long)]
    rollout_duration: Option<u64>,
    /// Devices refuse the release after this time (RFC 3339)
    #[arg(long)]
    expires: Option<Timestamp>,
    /// Installing needs a reboot
    #[arg(long)]
    reboot: bool,
    /// Expected downtime in seconds
    #[arg(long, default_value_t = 0)]
    downtime: u64,
    #[arg(long, default_value = "rootfs")]
    slot_class: String,
    /// Compress the image for transport; writes IMAGE.zst, to be served at --url
    #[arg(long, value_enum)]
    compress: Option<CompressArg>,
    /// Chunk size of the chunk index, in bytes (power of two, 4 KiB to 64 MiB)
    #[arg(long, default_value_t = 1024 * 1024)]
    chunk_size: u64,
    /// Where devices find the chunk index; defaults to the image URL with ".chunks" appended
    #[arg(long)]
    chunks_url: Option<String>,
    /// Do not write a chunk index
    #[arg(long)]
    no_chunks: bool,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SeverityArg {
    None,
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CompressArg {
    Zstd,
}

#[derive(clap::Args)]
pub struct SignArgs {
    #[arg(long)]
    key: PathBuf,
    release: PathBuf,
}

pub fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let key = keys::load_signing_key(&args.key)?;
    let chunk_size = (!args.no_chunks).then_some(args.chunk_size);
    let valid_chunk_size = MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE;
    if chunk_size.is_some_and(|c| !c.is_power_of_two() || !valid_chunk_size.contains(&c)) {
        anyhow::bail!("--chunk-size must be a power of two from 4096 to 67108864");
    }
    let digest = build::digest_image(&args.image, chunk_size)
        .with_context(|| format!("cannot read image {}", args.image.display()))?;
    let transport = match args.compress {
        None => None,
        Some(CompressArg::Zstd) => Some(compress_zstd(&args.image)?),
    };
    let chunks = if args.no_chunks {
        None
    } else {
        let path = with_extension(transport.as_ref().map_or(&args.image, |(p, _)| p), "chunks");
        fs::write(&path, &digest.chunk_hashes)
            .with_context(|| format!("cannot write chunk index {}", path.display()))?;
        Some(ChunkIndexRef {
            url: args
                .chunks_url
                .unwrap_or_else(|| format!("{}.chunks", args.url)),
            sha256: hex::encode(build::sha256_of(&digest.chunk_hashes)),
            chunk_size: args.chunk_size,
        })
    };
    let image = Image {
        url: args.url,
        size: digest.size,
        sha256: hex::encode(digest.sha256),
        compression: transport.as_ref().map(|_| Compression::Zstd),
        transport_size: transport.as_ref().map(|(_, d)| d.size),
        transport_sha256: transport.as_ref().map(|(_, d)| hex::encode(d.sha256)),
        chunks,
    };
    let created = Timestamp::now();
    let rollout = match (args.rollout_start, args.rollout_duration) {
        (None, None) => None,
        (start, duration) => Some(Rollout {
            start: start.unwrap_or(created),
            duration: duration.unwrap_or(0),
        }),
    };
    let mut manifest = Manifest {
        format: FORMAT,
        version: args.version,
        security_version: args.security_version,
        compatible: args.compatible,
        created,
        expires: args.expires,
        security: args.security,
        severity: match args.severity {
            SeverityArg::None => Severity::None,
            SeverityArg::Low => Severity::Low,
            SeverityArg::Medium => Severity::Medium,
            SeverityArg::High => Severity::High,
            SeverityArg::Critical => Severity::Critical,
        },
        advisory: args.advisory,
        disruption: Disruption {
            reboot: args.reboot,
            downtime_seconds: args.downtime,
        },
        deadline: args.deadline,
        images: [(args.slot_class, image)].into_iter().collect(),
        rollout,
    };
    manifest.format = manifest.required_format();
    let envelope = build::sign_manifest(&manifest, &key)
        .map_err(|refusal| anyhow::anyhow!("the release would be refused by devices: {refusal}"))?;
    write_atomically(&args.out, envelope.to_json().as_bytes())?;
    if let Some((path, _)) = &transport {
        println!(
            "compressed image: {} (serve it at the image URL)",
            path.display()
        );
    }
    println!("release: {}", args.out.display());
    print_summary(&manifest, &envelope);
    Ok(ExitCode::SUCCESS)
}

fn compress_zstd(image: &Path) -> anyhow::Result<(PathBuf, ImageDigest)> {
    let out = with_extension(image, "zst");
    let input =
        fs::File::open(image).with_context(|| format!("cannot read {}", image.display()))?;
    let output =
        fs::File::create(&out).with_context(|| format!("cannot write {}", out.display()))?;
    zstd::stream::copy_encode(input, output, 10)
        .with_context(|| format!("cannot compress {} into {}", image.display(), out.display()))?;
    let digest = build::digest_image(&out, None)
        .with_context(|| format!("cannot read {}", out.display()))?;
    Ok((out, digest))
}

pub fn sign(args: SignArgs) -> anyhow::Result<ExitCode> {
    let key = keys::load_signing_key(&args.key)?;
    let mut envelope = read_envelope(&args.release)?;
    // Never sign what a device would refuse to read: the signer vouches for these contents.
    let manifest = Manifest::parse(&envelope.manifest_bytes)
        .map_err(|refusal| anyhow::anyhow!("refusing to sign: {refusal}"))?;
    build::add_signature(&mut envelope, &key);
    write_atomically(&args.release, envelope.to_json().as_bytes())?;
    println!(
        "signed {} with key {}",
        args.release.display(),
        KeyId::of(&key.verifying_key())
    );
    print_summary(&manifest, &envelope);
    Ok(ExitCode::SUCCESS)
}

fn with_extension(path: &Path, extension: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(extension);
    PathBuf::from(name)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    // A release is public: mode 0644, so that it can be served as it is.
    durable::write_atomically(path, bytes, 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}
