//! `update-agent release`: looking at a release (`inspect`, `verify`, in every build) and, with
//! the `operator` feature, making, signing and publishing one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use jiff::Timestamp;
use serde_json::json;
use update_agent::anchor::{Protection, TrustAnchor};
use update_agent::keys::KeyId;
use update_agent::release::block_index::{self, IndexHeader};
use update_agent::release::build;
use update_agent::release::{self, Manifest, Policy, escape_for_log};

use super::EXIT_REFUSED;
use super::release_summary::{print_summary, read_envelope};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Hash an image, write its manifest and sign it
    #[cfg(feature = "operator")]
    Create(Box<super::release_create::CreateArgs>),
    /// Add one more signature to a release (k-of-n signing, offline signing machines)
    #[cfg(feature = "operator")]
    Sign(super::release_create::SignArgs),
    /// Show a release for a human, without checking its signatures
    Inspect(InspectArgs),
    /// Check a release as a device would: exit 0 when it would be accepted
    Verify(VerifyArgs),
    /// Publish a release (retained) on the fleet's or one device's MQTT release topic
    #[cfg(feature = "operator")]
    Publish(Box<super::publish::PublishArgs>),
}

#[derive(clap::Args)]
pub struct InspectArgs {
    #[arg(long)]
    json: bool,
    /// A block index file to check against the release (its SHA-256 and what it describes) and
    /// show, as a device would read it
    #[arg(long)]
    index: Option<PathBuf>,
    /// The slot class whose index --index is (default: the only image)
    #[arg(long)]
    slot_class: Option<String>,
    release: PathBuf,
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Directory of trusted public keys (SPKI PEM), as on the device
    #[arg(long)]
    keys: PathBuf,
    /// Distinct trusted signatures required
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// The device's compatible string
    #[arg(long)]
    compatible: Option<String>,
    /// The device's security version floor
    #[arg(long, default_value_t = 0)]
    floor: u64,
    #[arg(long)]
    json: bool,
    release: PathBuf,
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        #[cfg(feature = "operator")]
        Command::Create(args) => super::release_create::create(*args),
        #[cfg(feature = "operator")]
        Command::Sign(args) => super::release_create::sign(args),
        Command::Inspect(args) => inspect(args),
        Command::Verify(args) => verify(args),
        #[cfg(feature = "operator")]
        Command::Publish(args) => super::publish::publish(*args),
    }
}

fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let envelope = read_envelope(&args.release)?;
    let manifest = Manifest::parse(&envelope.manifest_bytes)
        .map_err(|refusal| anyhow::anyhow!("{}: {refusal}", args.release.display()))?;
    let index = match &args.index {
        Some(path) => Some(inspect_index(&manifest, args.slot_class.as_deref(), path)?),
        None => None,
    };
    if args.json {
        let mut out = json!({
            "id": hex::encode(build::sha256_of(&envelope.manifest_bytes)),
            "manifest": manifest,
            "signatures": envelope.signatures.iter().map(|s| s.keyid.to_hex()).collect::<Vec<_>>(),
            "signatures_checked": false,
        });
        if let Some(index) = &index {
            out["index"] = index.to_json();
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_summary(&manifest, &envelope);
        if let Some(index) = &index {
            index.print();
        }
        println!("(signatures not checked; use `update-agent release verify --keys DIR`)");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `inspect --index` found in a block index.
struct IndexReport {
    header: IndexHeader,
    zero_blocks: u64,
}

impl IndexReport {
    fn to_json(&self) -> serde_json::Value {
        let h = &self.header;
        json!({
            "version": block_index::VERSION,
            "block_size": h.block_size,
            "image_size": h.image_size,
            "blocks": h.block_count(),
            "zero_blocks": self.zero_blocks,
            "stored_blocks": h.stored_blocks,
            "blocks_per_frame": h.blocks_per_frame,
            "frames": h.frame_count,
            "dictionary_size": h.dictionary_size,
            "store": h.store_name,
            "store_size": h.store_size,
        })
    }

    fn print(&self) {
        let h = &self.header;
        println!(
            "  block index:      version {}, {} blocks of {} bytes ({} zero, {} stored)",
            block_index::VERSION,
            h.block_count(),
            h.block_size,
            self.zero_blocks,
            h.stored_blocks
        );
        println!(
            "  block store:      {} ({} bytes, {} frames of up to {} blocks{})",
            h.store_name,
            h.store_size,
            h.frame_count,
            h.blocks_per_frame,
            if h.dictionary_size > 0 {
                format!(", {}-byte zstd dictionary", h.dictionary_size)
            } else {
                String::new()
            }
        );
    }
}

/// Reads a block index as a device does: checked against the manifest's hash and image,
/// expanded (into a temporary directory), every count checked.
fn inspect_index(
    manifest: &Manifest,
    class: Option<&str>,
    path: &Path,
) -> anyhow::Result<IndexReport> {
    let (class, image) = match class {
        Some(class) => manifest
            .images
            .get_key_value(class)
            .with_context(|| format!("the release has no image for slot class {class:?}"))?,
        None if manifest.images.len() == 1 => manifest.images.iter().next().expect("one image"),
        None => anyhow::bail!("the release has several images: name one with --slot-class"),
    };
    let chunks = image.chunks.as_ref().with_context(|| {
        format!(
            "the image for {} names no block index",
            escape_for_log(class, 32)
        )
    })?;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let scratch = tempfile::tempdir().context("cannot make a temporary directory")?;
    let index = block_index::expand(
        std::io::BufReader::new(file),
        image,
        chunks,
        &scratch.path().join("index"),
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut zero_blocks = 0;
    for entry in index.entries() {
        if entry?.location == block_index::BlockLocation::Zero {
            zero_blocks += 1;
        }
    }
    Ok(IndexReport {
        header: index.header().clone(),
        zero_blocks,
    })
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    // A check by hand, on a workstation (whose key directory is writable) or a device: the
    // protection check of the device's trust anchor is the daemon's, not this tool's.
    let anchor = TrustAnchor::load(&args.keys, Protection::AllowWritable)?;
    let bytes = release::read_release_file(&args.release)
        .with_context(|| format!("cannot read {}", args.release.display()))?;
    let policy = Policy {
        threshold: args.threshold,
        compatible: args.compatible,
        floor: args.floor,
        now: Timestamp::now(),
    };
    match release::verify(&bytes, &anchor, &policy) {
        Ok(verified) => {
            if args.json {
                let out = json!({
                    "accepted": true,
                    "id": verified.release_id(),
                    "version": verified.manifest.version,
                    "security_version": verified.manifest.security_version,
                    "compatible": verified.manifest.compatible,
                    "signers": verified.signers.iter().map(KeyId::to_hex).collect::<Vec<_>>(),
                });
                println!("{out}");
            } else {
                println!(
                    "accepted: {} (security version {}) for {}, signed by {} trusted key(s); release id {}",
                    escape_for_log(&verified.manifest.version, 64),
                    verified.manifest.security_version,
                    escape_for_log(&verified.manifest.compatible, 64),
                    verified.signers.len(),
                    verified.release_id()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => {
            if args.json {
                let out = json!({
                    "accepted": false,
                    "reason": refusal.code,
                    "message": refusal.message,
                });
                println!("{out}");
            } else {
                eprintln!("refused: {refusal}");
            }
            Ok(ExitCode::from(EXIT_REFUSED))
        }
    }
}
