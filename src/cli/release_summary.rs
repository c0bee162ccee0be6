//! How `release inspect`, `create` and `sign` show a release to the operator, and how they
//! read one from a file.

use std::path::Path;

use anyhow::Context;
use update_agent::release::manifest::Compression;
use update_agent::release::{self, Envelope, Manifest, escape_for_log};

pub(super) fn read_envelope(path: &Path) -> anyhow::Result<Envelope> {
    let bytes = release::read_release_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Envelope::parse(&bytes).map_err(|refusal| anyhow::anyhow!("{}: {refusal}", path.display()))
}

pub(super) fn print_summary(manifest: &Manifest, envelope: &Envelope) {
    let show = |text: &str| escape_for_log(text, 200);
    println!("  version:          {}", show(&manifest.version));
    println!("  security version: {}", manifest.security_version);
    println!("  compatible:       {}", show(&manifest.compatible));
    println!("  created:          {}", manifest.created);
    if let Some(expires) = manifest.expires {
        println!("  expires:          {expires}");
    }
    if let Some(deadline) = manifest.deadline {
        println!("  deadline:         {deadline}");
    }
    if let Some(rollout) = &manifest.rollout {
        println!(
            "  rollout:          {} to {} ({} s; each device at its own moment)",
            rollout.start,
            rollout.end(),
            rollout.duration
        );
    }
    println!(
        "  security fix:     {} (severity {})",
        if manifest.security { "yes" } else { "no" },
        manifest.severity.as_str()
    );
    if !manifest.advisory.is_empty() {
        println!("  advisory:         {}", show(&manifest.advisory));
    }
    println!(
        "  disruption:       {}, about {} s downtime",
        if manifest.disruption.reboot {
            "reboot"
        } else {
            "no reboot"
        },
        manifest.disruption.downtime_seconds
    );
    for (class, image) in &manifest.images {
        println!(
            "  image {}:  {} bytes, sha256 {}{}",
            show(class),
            image.size,
            image.sha256,
            match image.compression {
                Some(Compression::Zstd) => ", zstd in transport",
                None => "",
            }
        );
        println!("    from {}", show(&image.url));
        if let Some(chunks) = &image.chunks {
            println!(
                "    block index {} (sha256 {}, {}-byte blocks)",
                show(&chunks.url),
                chunks.sha256,
                chunks.chunk_size
            );
        }
    }
    for entry in &envelope.signatures {
        println!("  signed by key:    {}", entry.keyid);
    }
}
