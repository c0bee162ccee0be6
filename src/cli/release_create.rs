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
use update_agent::release::block_index::{MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use update_agent::release::build::{self, ImageDigest};
use update_agent::release::index_build::{self, StoreParams};
use update_agent::release::manifest::{
    ChunkIndexRef, Compression, Disruption, FORMAT, Image, Rollout, Severity,
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
    /// Compress the image for transport; writes NAME.zst, to be served at --url
    #[arg(long, value_enum)]
    compress: Option<CompressArg>,
    /// Block size of the block index, in bytes (power of two, 4 KiB to 64 KiB)
    #[arg(long, alias = "chunk-size", default_value_t = 4096)]
    block_size: u32,
    /// Where devices find the block index; defaults to NAME.index beside the --url
    #[arg(long, alias = "chunks-url")]
    index_url: Option<String>,
    /// Write no block index and no block store: devices download the whole image
    #[arg(long, alias = "no-chunks")]
    no_index: bool,
    /// zstd level of the block store's frames (1 to 19; 19 is the smallest download and the
    /// slowest to build)
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=19))]
    store_level: i32,
    /// The directory to serve: the image (NAME: the image's file name, NAME.zst with
    /// --compress), NAME.index and NAME.store go here; defaults to the image's directory
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// The release (signed manifest) to write
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
    if !args.no_index
        && (!args.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&args.block_size))
    {
        anyhow::bail!(
            "--block-size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        );
    }
    let image_name = args
        .image
        .file_name()
        .with_context(|| format!("{} names no file", args.image.display()))?
        .to_owned();
    let out_dir = match &args.out_dir {
        Some(dir) => dir.clone(),
        None => args
            .image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let digest = build::digest_image(&args.image, None)
        .with_context(|| format!("cannot read image {}", args.image.display()))?;
    let transport = match args.compress {
        None => {
            place_image(&args.image, &out_dir.join(&image_name))?;
            None
        }
        Some(CompressArg::Zstd) => {
            let mut name = image_name.clone();
            name.push(".zst");
            Some(compress_zstd(&args.image, &out_dir.join(name))?)
        }
    };
    // The served image's name; the index and the store are named after it.
    let served = match &transport {
        Some((path, _)) => path.file_name().expect("named above").to_owned(),
        None => image_name,
    };
    let chunks = if args.no_index {
        None
    } else {
        let index_path = out_dir.join(with_extension(Path::new(&served), "index"));
        let store_path = out_dir.join(with_extension(Path::new(&served), "store"));
        let params = StoreParams {
            block_size: args.block_size,
            level: args.store_level,
            ..StoreParams::default()
        };
        let built = index_build::build(&args.image, params, &index_path, &store_path)
            .with_context(|| {
                format!(
                    "cannot build the block index of {} into {} and {}",
                    args.image.display(),
                    index_path.display(),
                    store_path.display()
                )
            })?;
        let index_url = match args.index_url {
            Some(url) => url,
            None => url::Url::parse(&args.url)
                .and_then(|u| u.join(&index_path.file_name().unwrap().to_string_lossy()))
                .with_context(|| format!("cannot place the index beside {}", args.url))?
                .to_string(),
        };
        println!(
            "block index: {} ({} bytes: {} blocks of {}, {} in the store)",
            index_path.display(),
            built.index_size,
            built.header.block_count(),
            built.header.block_size,
            built.header.stored_blocks
        );
        println!(
            "block store: {} ({} bytes in {} frames{})",
            store_path.display(),
            built.header.store_size,
            built.header.frame_count,
            if built.header.dictionary_size > 0 {
                format!(", a {}-byte dictionary", built.header.dictionary_size)
            } else {
                String::new()
            }
        );
        Some(ChunkIndexRef {
            url: index_url,
            sha256: hex::encode(built.index_sha256),
            chunk_size: u64::from(args.block_size),
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
    println!(
        "serve {} (the image at its URL; the index and the store beside it)",
        out_dir.display()
    );
    println!("release: {}", args.out.display());
    print_summary(&manifest, &envelope);
    Ok(ExitCode::SUCCESS)
}

/// Puts the image into the directory to serve, unless it is there already: a hard link when
/// the file system allows, else a copy.
fn place_image(image: &Path, served: &Path) -> anyhow::Result<()> {
    let same = match (fs::canonicalize(image), fs::canonicalize(served)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Ok(());
    }
    let _ = fs::remove_file(served);
    if fs::hard_link(image, served).is_err() {
        fs::copy(image, served)
            .with_context(|| format!("cannot copy {} to {}", image.display(), served.display()))?;
    }
    Ok(())
}

fn compress_zstd(image: &Path, out: &Path) -> anyhow::Result<(PathBuf, ImageDigest)> {
    let out = out.to_path_buf();
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
