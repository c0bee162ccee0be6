//! The manifest: the signed part of a release. Parsed strictly — unknown fields, wrong types and
//! out-of-range values are refused — and only after its signatures were verified.

use alloc::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::prelude::*;
use crate::reason::ReasonCode;
use crate::release::Refusal;
use crate::release::json::{self, Object};

/// The manifest format of a release without a rollout schedule: every agent reads it.
pub const FORMAT: u32 = 1;
/// The format of a release with a rollout schedule (`rollout`). Agents that predate the
/// schedule read format 1 only and refuse it as `unsupported-format` ("update the agent
/// first"): a schedule is never silently ignored by an agent that would install at once.
pub const FORMAT_ROLLOUT: u32 = 2;
/// The formats this agent reads.
pub const SUPPORTED_FORMATS: [u32; 2] = [FORMAT, FORMAT_ROLLOUT];
/// The longest rollout window: a bound on arithmetic and on how long a device holds a release.
pub const MAX_ROLLOUT_DURATION: u64 = 90 * 24 * 3600;

/// Largest image the agent will consider (1 TiB): a bound on arithmetic, not on real slots.
pub const MAX_IMAGE_SIZE: u64 = 1 << 40;
pub const MIN_CHUNK_SIZE: u64 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u64 = 64 * 1024 * 1024;
const MAX_VERSION_LEN: usize = 64;
const MAX_COMPATIBLE_LEN: usize = 128;
const MAX_ADVISORY_LEN: usize = 8 * 1024;
const MAX_URL_LEN: usize = 2048;
const MAX_IMAGES: usize = 8;
const MAX_DOWNTIME_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Shown to people; never compared. Ordering is `security_version`'s job.
    pub version: String,
    pub security_version: u64,
    pub compatible: String,
    pub created: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Timestamp>,
    #[serde(default)]
    pub security: bool,
    #[serde(default, deserialize_with = "json::string_enum")]
    pub severity: Severity,
    /// What risks the update mitigates, for the user (EN 303 645 5.3-11).
    #[serde(default)]
    pub advisory: String,
    /// What the install will do to the device (EN 303 645 5.3-12).
    #[serde(default, deserialize_with = "json::object")]
    pub disruption: Disruption,
    /// Latest time to install: postponement never goes past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// One image per slot class, e.g. `rootfs`. A class named twice is refused, not resolved.
    #[serde(deserialize_with = "images_without_duplicates")]
    pub images: BTreeMap<String, Image>,
    /// The staged rollout (format 2): each device installs at its own moment in the window.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "json::optional_object"
    )]
    pub rollout: Option<Rollout>,
}

/// A signed rollout schedule: the window `[start, start + duration)` over which the fleet's
/// devices spread their installs, each at a moment derived from the release id and its device
/// id (`engine::rollout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    pub start: Timestamp,
    /// Seconds; 0 means every device at `start`.
    pub duration: u64,
}

impl Rollout {
    pub fn end(&self) -> Timestamp {
        let duration =
            jiff::SignedDuration::from_secs(self.duration.min(MAX_ROLLOUT_DURATION) as i64);
        self.start
            .saturating_add(duration)
            .unwrap_or(Timestamp::MAX)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    None,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::None => "none",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disruption {
    #[serde(default)]
    pub reboot: bool,
    #[serde(default)]
    pub downtime_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub url: String,
    /// Bytes as written to the slot.
    pub size: u64,
    /// Hex SHA-256 of the bytes as written to the slot.
    pub sha256: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "json::optional_string_enum"
    )]
    pub compression: Option<Compression>,
    /// Size of the bytes on the wire, when compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_size: Option<u64>,
    /// Hex SHA-256 of the bytes on the wire, when compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport_sha256: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "json::optional_object"
    )]
    pub chunks: Option<ChunkIndexRef>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
}

/// Where to find the per-chunk hashes of an image (for delta downloads): a separate file of raw
/// 32-byte SHA-256 digests, one per `chunk_size` bytes of the image, the last chunk possibly short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndexRef {
    pub url: String,
    pub sha256: String,
    pub chunk_size: u64,
}

/// serde_json keeps the last of two equal keys in a map without a word. Two images for one slot
/// class would let the signed bytes mean different things to different readers (a reviewer's
/// tool that keeps the first, the device that keeps the last), so they are refused. Struct fields
/// need no such care: serde already refuses a duplicate field.
fn images_without_duplicates<'de, D>(deserializer: D) -> Result<BTreeMap<String, Image>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Images;
    impl<'de> serde::de::Visitor<'de> for Images {
        type Value = BTreeMap<String, Image>;

        fn expecting(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
            f.write_str("a map from slot class to image")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut images = BTreeMap::new();
            while let Some((class, Object(image))) = map.next_entry::<String, Object<Image>>()? {
                if images.contains_key(&class) {
                    return Err(serde::de::Error::custom(format_args!(
                        "images: slot class {class:?} is given twice"
                    )));
                }
                images.insert(class, image);
            }
            Ok(images)
        }
    }
    deserializer.deserialize_map(Images)
}

impl Manifest {
    /// The format a manifest with this content is written in: 2 with a rollout schedule, so
    /// that older agents refuse it as a format they do not read; 1 otherwise, so that every
    /// agent reads it.
    pub fn required_format(&self) -> u32 {
        if self.rollout.is_some() {
            FORMAT_ROLLOUT
        } else {
            FORMAT
        }
    }

    /// Strict parse of manifest bytes whose signatures have already been verified.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, Refusal> {
        // Look at `format` first, so a newer manifest is refused as such rather than as malformed.
        #[derive(Deserialize)]
        struct FormatOnly {
            format: serde_json::Value,
        }
        if let Ok(Object(FormatOnly { format })) =
            serde_json::from_slice::<Object<FormatOnly>>(bytes)
            && format.is_u64()
            && !SUPPORTED_FORMATS
                .iter()
                .any(|&f| format.as_u64() == Some(u64::from(f)))
        {
            return Err(Refusal::new(
                ReasonCode::UnsupportedFormat,
                format!(
                    "manifest format {format} is not supported (this agent reads formats {FORMAT} and {FORMAT_ROLLOUT}); update the agent first"
                ),
            ));
        }
        let Object(manifest) = serde_json::from_slice::<Object<Manifest>>(bytes)
            .map_err(|e| crate::release::malformed_json("manifest", &e))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the values serde cannot: ranges, lengths, hex digests and URL schemes.
    pub fn validate(&self) -> Result<(), Refusal> {
        let malformed = |msg: String| Err(Refusal::new(ReasonCode::Malformed, msg));
        if !SUPPORTED_FORMATS.contains(&self.format) {
            return Err(Refusal::new(
                ReasonCode::UnsupportedFormat,
                format!(
                    "manifest format {} is not supported (this agent reads formats {FORMAT} and {FORMAT_ROLLOUT})",
                    self.format
                ),
            ));
        }
        // The format says what an agent must understand: a schedule in format 1 would be
        // ignored by the agents that read only format 1, so it is refused here too.
        if self.format != self.required_format() {
            return malformed(format!(
                "manifest format {} does not match its content: a release {} rollout is format {}",
                self.format,
                if self.rollout.is_some() {
                    "with a"
                } else {
                    "without a"
                },
                self.required_format()
            ));
        }
        if let Some(rollout) = &self.rollout {
            if rollout.duration > MAX_ROLLOUT_DURATION {
                return malformed(format!(
                    "rollout.duration {} s is longer than 90 days",
                    rollout.duration
                ));
            }
            if let Some(expires) = self.expires
                && rollout.end() > expires
            {
                return malformed(
                    "the rollout window ends after the release expires: some devices would never install it"
                        .into(),
                );
            }
        }
        check_text("version", &self.version, MAX_VERSION_LEN)?;
        check_text("compatible", &self.compatible, MAX_COMPATIBLE_LEN)?;
        if self.advisory.len() > MAX_ADVISORY_LEN {
            return malformed(format!("advisory is longer than {MAX_ADVISORY_LEN} bytes"));
        }
        if self
            .advisory
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            return malformed("advisory contains control characters".into());
        }
        if self.disruption.downtime_seconds > MAX_DOWNTIME_SECONDS {
            return malformed(format!(
                "disruption.downtime_seconds {} exceeds a week",
                self.disruption.downtime_seconds
            ));
        }
        if let Some(expires) = self.expires
            && expires <= self.created
        {
            return malformed("expires is not after created".into());
        }
        if let Some(deadline) = self.deadline
            && deadline < self.created
        {
            return malformed("deadline is before created".into());
        }
        if self.images.is_empty() {
            return malformed("images is empty: a release must carry at least one image".into());
        }
        if self.images.len() > MAX_IMAGES {
            return malformed(format!("more than {MAX_IMAGES} images"));
        }
        for (class, image) in &self.images {
            check_slot_class(class)?;
            image.validate(class)?;
        }
        Ok(())
    }
}

impl Image {
    fn validate(&self, class: &str) -> Result<(), Refusal> {
        let malformed = |msg: String| Err(Refusal::new(ReasonCode::Malformed, msg));
        check_url(&format!("images.{class}.url"), &self.url)?;
        if self.size == 0 || self.size > MAX_IMAGE_SIZE {
            return malformed(format!(
                "images.{class}.size {} is out of range (1 byte to 1 TiB)",
                self.size
            ));
        }
        check_sha256(&format!("images.{class}.sha256"), &self.sha256)?;
        match (
            self.compression,
            self.transport_size,
            &self.transport_sha256,
        ) {
            (None, None, None) => {}
            (Some(_), Some(size), Some(hash)) => {
                if size == 0 || size > MAX_IMAGE_SIZE {
                    return malformed(format!(
                        "images.{class}.transport_size {size} is out of range"
                    ));
                }
                check_sha256(&format!("images.{class}.transport_sha256"), hash)?;
            }
            _ => {
                return malformed(format!(
                    "images.{class}: compression, transport_size and transport_sha256 go together"
                ));
            }
        }
        if let Some(chunks) = &self.chunks {
            check_url(&format!("images.{class}.chunks.url"), &chunks.url)?;
            check_sha256(&format!("images.{class}.chunks.sha256"), &chunks.sha256)?;
            if !chunks.chunk_size.is_power_of_two()
                || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunks.chunk_size)
            {
                return malformed(format!(
                    "images.{class}.chunks.chunk_size {} is not a power of two from 4 KiB to 64 MiB",
                    chunks.chunk_size
                ));
            }
        }
        Ok(())
    }

    /// An image fetched as it is written to the slot: no compression, no chunk index.
    pub fn uncompressed(url: impl Into<String>, size: u64, sha256: [u8; 32]) -> Image {
        Image {
            url: url.into(),
            size,
            sha256: hex::encode(sha256),
            compression: None,
            transport_size: None,
            transport_sha256: None,
            chunks: None,
        }
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > max {
        return Err(Refusal::new(
            ReasonCode::Malformed,
            format!("{field} must be 1 to {max} bytes long"),
        ));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err(Refusal::new(
            ReasonCode::Malformed,
            format!("{field} contains control characters"),
        ));
    }
    Ok(())
}

fn check_slot_class(class: &str) -> Result<(), Refusal> {
    let ok = !class.is_empty()
        && class.len() <= 32
        && class
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            ReasonCode::Malformed,
            "an image's slot class must be 1 to 32 characters of letters, digits, '-' and '_'",
        ))
    }
}

pub(crate) fn check_sha256(field: &str, value: &str) -> Result<(), Refusal> {
    let ok = value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Refusal::new(
            ReasonCode::Malformed,
            format!("{field} must be 64 lower-case hex digits"),
        ))
    }
}

/// The schemes images may come from; anything else is refused before any connection is made.
pub const URL_SCHEMES: &[&str] = &["https", "http", "file"];

fn check_url(field: &str, value: &str) -> Result<(), Refusal> {
    if value.len() > MAX_URL_LEN {
        return Err(Refusal::new(
            ReasonCode::Malformed,
            format!("{field} is longer than {MAX_URL_LEN} bytes"),
        ));
    }
    let url = url::Url::parse(value)
        .map_err(|e| Refusal::new(ReasonCode::Malformed, format!("{field} is not a URL: {e}")))?;
    if !URL_SCHEMES.contains(&url.scheme()) {
        return Err(Refusal::new(
            ReasonCode::UnsupportedUrl,
            format!(
                "{field} uses the scheme {:?}; images are fetched only over https, http or file",
                crate::release::escape_for_log(url.scheme(), 16)
            ),
        ));
    }
    if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) {
        return Err(Refusal::new(
            ReasonCode::Malformed,
            format!("{field} has no host"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn manifest_with_images(images: &str) -> String {
        format!(
            r#"{{"format": 1, "version": "1", "security_version": 1, "compatible": "c",
                "created": "2026-01-01T00:00:00Z", "images": {images}}}"#
        )
    }

    #[test]
    fn duplicate_slot_class_is_refused_not_resolved() {
        let one = format!(r#"{{"url": "https://a.example/1", "size": 1, "sha256": "{SHA}"}}"#);
        let two = format!(r#"{{"url": "https://b.example/2", "size": 2, "sha256": "{SHA}"}}"#);
        let single = manifest_with_images(&format!(r#"{{"rootfs": {one}}}"#));
        assert!(Manifest::parse(single.as_bytes()).is_ok());
        let twice = manifest_with_images(&format!(r#"{{"rootfs": {one}, "rootfs": {two}}}"#));
        let refusal = Manifest::parse(twice.as_bytes()).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::Malformed);
        assert!(
            refusal.message.contains("given twice"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn internationalised_image_hosts_are_taken_in_punycode_only() {
        // Cargo.toml pins idna_adapter 1.0.0, which has no Unicode tables.
        assert!(check_url("image url", "https://xn--bcher-kva.example/a.img").is_ok());
        let refusal = check_url("image url", "https://bücher.example/a.img").unwrap_err();
        assert_eq!(refusal.code, ReasonCode::Malformed);
        assert!(
            refusal.message.contains("is not a URL"),
            "{}",
            refusal.message
        );
    }

    fn with(format: u32, extra: &str) -> String {
        let image = format!(
            r#"{{"rootfs": {{"url": "https://a.example/1", "size": 1, "sha256": "{SHA}"}}}}"#
        );
        manifest_with_images(&image)
            .replacen(r#""format": 1"#, &format!(r#""format": {format}"#), 1)
            .replacen(r#""images""#, &format!(r#"{extra}"images""#), 1)
    }

    const WINDOW: &str = r#""rollout": {"start": "2026-02-01T00:00:00Z", "duration": 86400}, "#;

    #[test]
    fn a_rollout_schedule_is_format_2_and_format_1_stays_as_it_was() {
        // Format 1 without a schedule: as every agent reads it.
        let old = Manifest::parse(with(1, "").as_bytes()).unwrap();
        assert_eq!((old.format, old.rollout), (1, None));
        assert_eq!(old.required_format(), FORMAT);
        // Format 2 with one.
        let staged = Manifest::parse(with(2, WINDOW).as_bytes()).unwrap();
        let rollout = staged.rollout.unwrap();
        assert_eq!(rollout.start.to_string(), "2026-02-01T00:00:00Z");
        assert_eq!(rollout.end().to_string(), "2026-02-02T00:00:00Z");
        // A schedule in format 1 would be ignored by the agents that read only format 1.
        let refusal = Manifest::parse(with(1, WINDOW).as_bytes()).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::Malformed, "{}", refusal.message);
        let refusal = Manifest::parse(with(2, "").as_bytes()).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::Malformed, "{}", refusal.message);
        // A format from the future is refused as such, not as malformed.
        let refusal = Manifest::parse(with(3, WINDOW).as_bytes()).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::UnsupportedFormat);
        // The schedule is strict too.
        for bad in [
            r#""rollout": {"start": "2026-02-01T00:00:00Z", "duration": 86400, "percent": 5}, "#,
            r#""rollout": {"start": "2026-02-01T00:00:00Z"}, "#,
            r#""rollout": {"start": "soon", "duration": 60}, "#,
            r#""rollout": {"start": "2026-02-01T00:00:00Z", "duration": -1}, "#,
            r#""rollout": {"start": "2026-02-01T00:00:00Z", "duration": 7776001}, "#,
            r#""rollout": [], "#,
        ] {
            let refusal = Manifest::parse(with(2, bad).as_bytes()).unwrap_err();
            assert_eq!(
                refusal.code,
                ReasonCode::Malformed,
                "{bad}: {}",
                refusal.message
            );
        }
        // A window that outlasts the release would leave devices that never install it.
        let expiring = format!(r#"{WINDOW}"expires": "2026-02-01T12:00:00Z", "#);
        let refusal = Manifest::parse(with(2, &expiring).as_bytes()).unwrap_err();
        assert!(refusal.message.contains("expires"), "{}", refusal.message);
    }

    #[test]
    fn duplicate_field_is_refused() {
        let doubled = manifest_with_images("{}").replacen(
            r#""version": "1","#,
            r#""version": "1", "version": "2","#,
            1,
        );
        let refusal = Manifest::parse(doubled.as_bytes()).unwrap_err();
        assert_eq!(refusal.code, ReasonCode::Malformed);
        assert!(
            refusal.message.contains("duplicate field"),
            "{}",
            refusal.message
        );
    }
}
