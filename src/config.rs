//! The agent's configuration file (`/etc/update-agent/agent.toml`), parsed strictly: an unknown
//! key is an error, so a typo never silently turns a safety setting off. `config/agent.toml` in
//! the repository is the annotated example.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::SignedDuration;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorError, Protection, TrustAnchor};
use crate::engine::{Bootname, PolicyConfig, RebootPolicy, Window};
use crate::mqtt::{BrokerUrl, Endpoint};

/// A config file is a few KiB; this bounds what a wrong path (a disk image, say) can cost.
const MAX_CONFIG_SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: Device,
    pub trust: Trust,
    pub bootloader: BootloaderConfig,
    /// Exactly one A/B pair in this version; see ARCHITECTURE.md.
    pub slots: SlotClass,
    #[serde(default)]
    pub install: Install,
    #[serde(default)]
    pub health: Health,
    #[serde(default)]
    pub system: System,
    /// The fleet's broker; only `update-agent run` needs it.
    #[serde(default)]
    pub mqtt: Option<Mqtt>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub dbus: DBus,
    /// The privileged installer (least-privilege split); absent: the agent itself writes slots
    /// and the bootloader environment (one-shot commands as root, the demo, tests).
    #[serde(default)]
    pub installer: Option<InstallerConfig>,
    /// What the manufacturer declares for the conformance report (`update-agent conformance`)
    /// and the agent cannot know; reported as declarations, never as verified.
    #[serde(default)]
    pub conformance: Conformance,
}

/// The manufacturer's declarations for ETSI EN 303 645 §5.3 that no device can check: where
/// things are published, what the product's UI shows, the manufacturer's own processes. Each
/// is free text (a URL, a sentence), at most [`MAX_DECLARATION`] bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conformance {
    /// Where the vulnerability disclosure policy is published (5.2-1; IXIT 2-UserInfo).
    pub vulnerability_disclosure: Option<String>,
    /// How and where the defined support period is published (5.3-13; IXIT 2-UserInfo).
    pub support_period_publication: Option<String>,
    /// How the model designation is recognisable on the device: type plate, label (5.3-16).
    pub model_label: Option<String>,
    /// Software outside the slot image the agent updates (boot loader, radio firmware, ...),
    /// with how each is updated or why it is not (5.3-1; IXIT 6-SoftComp).
    pub other_software: Option<String>,
    /// The manufacturer's procedure for producing and shipping security updates (5.3-8;
    /// IXIT 8-UpdProc "Description").
    pub update_procedure: Option<String>,
    /// How soon security updates ship once a vulnerability is known (5.3-8; IXIT 8-UpdProc
    /// "Time Frame").
    pub update_time_frame: Option<String>,
    /// How the product shows the user the agent's D-Bus notices (update available with its
    /// advisory, disruption ahead) (5.3-11, 5.3-12).
    pub user_interface: Option<String>,
    /// How the product can be taken off the network (IXIT 9-ReplSup "Isolation").
    pub isolation: Option<String>,
    /// How the hardware can be replaced (IXIT 9-ReplSup "Hardware Replacement").
    pub hardware_replacement: Option<String>,
    /// Why a provision is not met or not applicable, each `"5.3-N: why"`: ETSI TS 103 701
    /// test case 4-1-1 asks for one for every recommendation not fulfilled.
    #[serde(default)]
    pub justifications: Vec<String>,
}

/// The longest declaration accepted: a paragraph or a URL, not a document.
pub const MAX_DECLARATION: usize = 2048;

impl Conformance {
    /// Each declaration with its config key, in the order the report lists them.
    pub fn declarations(&self) -> [(&'static str, Option<&str>); 9] {
        [
            (
                "vulnerability_disclosure",
                self.vulnerability_disclosure.as_deref(),
            ),
            (
                "support_period_publication",
                self.support_period_publication.as_deref(),
            ),
            ("model_label", self.model_label.as_deref()),
            ("other_software", self.other_software.as_deref()),
            ("update_procedure", self.update_procedure.as_deref()),
            ("update_time_frame", self.update_time_frame.as_deref()),
            ("user_interface", self.user_interface.as_deref()),
            ("isolation", self.isolation.as_deref()),
            ("hardware_replacement", self.hardware_replacement.as_deref()),
        ]
    }

    fn validate(&self) -> Result<(), String> {
        for (key, value) in self.declarations() {
            if value.is_some_and(|text| text.len() > MAX_DECLARATION) {
                return Err(format!(
                    "conformance.{key} is longer than {MAX_DECLARATION} bytes: refer to a document instead"
                ));
            }
        }
        for entry in &self.justifications {
            let provision = entry.split(':').next().unwrap_or_default();
            let known = provision
                .strip_prefix("5.3-")
                .and_then(|n| n.parse::<u8>().ok())
                .is_some_and(|n| {
                    (1..=16).contains(&n) && provision.len() == 4 + n.to_string().len()
                });
            if !known || !entry.contains(':') {
                return Err(format!(
                    "conformance.justifications: {:?} does not start with a provision of EN 303 645 §5.3 and a colon (\"5.3-6: why\")",
                    crate::release::escape_for_log(entry, 40)
                ));
            }
            if entry.len() > MAX_DECLARATION {
                return Err(format!(
                    "conformance.justifications: the one for {provision} is longer than {MAX_DECLARATION} bytes"
                ));
            }
        }
        Ok(())
    }

    /// The manufacturer's justification for provision `id` (`5.3-6`), if any.
    pub fn justification(&self, id: &str) -> Option<&str> {
        self.justifications.iter().find_map(|entry| {
            let (provision, why) = entry.split_once(':')?;
            (provision == id).then(|| why.trim())
        })
    }
}

/// Where the privileged installer listens and whom it serves. The daemon and the installer read
/// the same file: the daemon connects to `socket`, the installer (`update-agent installer`)
/// listens on it unless systemd hands it the socket, and serves only `daemon_user`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerConfig {
    #[serde(default = "default_installer_socket")]
    pub socket: PathBuf,
    /// The only user (name or numeric uid) whose requests the installer carries out.
    #[serde(default = "default_daemon_user")]
    pub daemon_user: String,
    /// The installer's own state (its anti-rollback floor); root's alone. The daemon's
    /// `device.state_dir` may be a subdirectory (systemd's `StateDirectory=` nests them so).
    #[serde(default = "default_installer_state_dir")]
    pub state_dir: PathBuf,
}

fn default_installer_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/update-agent")
}

fn default_installer_socket() -> PathBuf {
    PathBuf::from("/run/update-agent/installer.sock")
}

fn default_daemon_user() -> String {
    "update-agent".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// Product string; releases for another product are refused.
    pub compatible: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Version of the software the device shipped with, shown until the agent installs one.
    #[serde(default)]
    pub factory_version: Option<String>,
    /// The product model, shown to the user and operators (EN 303 645 5.3-16).
    #[serde(default)]
    pub model: Option<String>,
    /// The last day security updates are provided for this device (EN 303 645 5.3-13).
    #[serde(default)]
    pub support_end: Option<Date>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trust {
    #[serde(default = "default_keys_dir")]
    pub keys_dir: PathBuf,
    /// Distinct trusted signatures a release needs (k of n).
    #[serde(default = "one")]
    pub threshold: usize,
    /// The lowest security version ever accepted, whatever the state says (e.g. set per image).
    #[serde(default)]
    pub floor: u64,
    /// Development only: accept a trust anchor that someone could modify.
    #[serde(default)]
    pub insecure_writable_anchor: bool,
}

impl Trust {
    /// The anchor `[trust]` names, enforced unless the config says `insecure_writable_anchor`;
    /// what enforcement would have refused is logged as a warning then.
    pub fn anchor(&self) -> Result<TrustAnchor, AnchorError> {
        let protection = if self.insecure_writable_anchor {
            Protection::AllowWritable
        } else {
            Protection::Enforce
        };
        let anchor = TrustAnchor::load(&self.keys_dir, protection)?;
        for warning in &anchor.warnings {
            tracing::warn!("insecure trust anchor (development mode): {warning}");
        }
        Ok(anchor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum BootloaderConfig {
    /// U-Boot through libubootenv's fw_printenv/fw_setenv.
    Uboot {
        /// `fw_env.config` to pass as `-c`; the tools' default (/etc/fw_env.config) when absent.
        #[serde(default)]
        fw_env_config: Option<PathBuf>,
        #[serde(default = "default_attempts")]
        attempts: u32,
        #[serde(default = "default_fw_printenv")]
        fw_printenv: PathBuf,
        #[serde(default = "default_fw_setenv")]
        fw_setenv: PathBuf,
    },
    /// GRUB through grub-editenv on a grubenv file.
    Grub {
        grubenv: PathBuf,
        #[serde(default = "default_grub_editenv")]
        grub_editenv: PathBuf,
    },
    /// A key=value file with U-Boot's semantics, for tests and the demo.
    File {
        path: PathBuf,
        #[serde(default = "default_attempts")]
        attempts: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotClass {
    /// The slot class images are given for in manifests, e.g. `rootfs`.
    #[serde(default = "default_class")]
    pub class: String,
    pub a: Slot,
    pub b: Slot,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    /// Block device or, for tests and the demo, a regular file.
    pub device: PathBuf,
    /// The name the bootloader knows the slot by (`A`, `B`).
    pub bootname: Bootname,
    /// Capacity in bytes for a regular-file slot; a block device's size is read from the device.
    #[serde(default)]
    pub size: Option<u64>,
}

impl Slot {
    /// What a write may fill: a file slot's configured size (it may grow up to it); for a block
    /// device no bound here, the writer reads the device's own size.
    pub fn capacity(&self) -> u64 {
        self.size.unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// Bytes between durable checkpoints (fdatasync + persisted offset).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// A download that delivers no byte for this long fails.
    #[serde(default = "default_stall_timeout", with = "seconds")]
    pub stall_timeout: Duration,
    /// Delta updates: when the release has a block index, reuse the blocks the device already
    /// holds (booted and inactive slot) and fetch only the others with HTTP Range requests.
    #[serde(default = "yes")]
    pub delta: bool,
    /// Bandwidth cap for image downloads, in bytes per second (none when absent).
    #[serde(default)]
    pub max_rate: Option<u64>,
    /// When a delta update is not possible (the server ignores Range requests, the block index
    /// is refused), download the whole image instead of refusing. Off: the data budget holds.
    #[serde(default)]
    pub full_download_fallback: bool,
    /// Bound of the wait before a release's download starts, in seconds: each device waits
    /// its own share of it (drawn from the release id and its device id), so that a fleet told
    /// at once does not reach the image server in the same second. 0: none.
    #[serde(default = "default_download_jitter", with = "seconds")]
    pub download_jitter: Duration,
    /// When the read-back of a checkpointed region starts: as soon as it is synced, while the
    /// rest downloads, or after the last byte ([`ReadbackOverlap`]).
    #[serde(default)]
    pub readback_overlap: ReadbackOverlap,
}

/// `install.readback_overlap`: `"auto"` (the default), `true` or `false`.
///
/// Reading a synced region back while the rest is still written hides the read-back behind the
/// download, where the storage can serve both. A block device can: into a loop device that
/// writes straight to its backing file (as a partition has no second page cache under it), a
/// 512 MiB download capped at 200 MiB/s finished about the read-back's 0.3 s sooner, and a
/// local image, bound by the disk, took as long as without. A regular file cannot: the kernel
/// serialises a file's `O_DIRECT` reads with its buffered writes, and on the test VM's disk a
/// 2 GiB install into a file slot ran 1.4x slower. So `auto` overlaps for block devices only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadbackOverlap {
    /// Beside the download where the slot is a block device, after it where it is a file.
    #[default]
    Auto,
    /// Always beside the download (`true`).
    Always,
    /// Always after the last byte (`false`).
    Never,
}

impl ReadbackOverlap {
    /// Whether the read-back of an install into `slot` starts before the last byte is written.
    pub fn for_slot(self, slot: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt;
        match self {
            ReadbackOverlap::Always => true,
            ReadbackOverlap::Never => false,
            // A slot that cannot be looked at fails as it is opened, with the reason.
            ReadbackOverlap::Auto => {
                std::fs::metadata(slot).is_ok_and(|meta| meta.file_type().is_block_device())
            }
        }
    }
}

impl From<bool> for ReadbackOverlap {
    fn from(overlap: bool) -> ReadbackOverlap {
        if overlap {
            ReadbackOverlap::Always
        } else {
            ReadbackOverlap::Never
        }
    }
}

impl Serialize for ReadbackOverlap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ReadbackOverlap::Auto => s.serialize_str("auto"),
            ReadbackOverlap::Always => s.serialize_bool(true),
            ReadbackOverlap::Never => s.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for ReadbackOverlap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReadbackOverlap, D::Error> {
        struct Expecting;
        impl serde::de::Visitor<'_> for Expecting {
            type Value = ReadbackOverlap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""auto", true or false"#)
            }
            fn visit_bool<E: serde::de::Error>(self, overlap: bool) -> Result<ReadbackOverlap, E> {
                Ok(overlap.into())
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ReadbackOverlap, E> {
                match text {
                    "auto" => Ok(ReadbackOverlap::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
        }
        d.deserialize_any(Expecting)
    }
}

impl Default for Install {
    fn default() -> Install {
        Install {
            checkpoint_interval: default_checkpoint_interval(),
            stall_timeout: default_stall_timeout(),
            delta: true,
            max_rate: None,
            full_download_fallback: false,
            download_jitter: default_download_jitter(),
            readback_overlap: ReadbackOverlap::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Commands (argv) that must exit 0 during the trial boot.
    #[serde(default)]
    pub commands: Vec<Vec<String>>,
    /// systemd units that must be active during the trial boot.
    #[serde(default)]
    pub units: Vec<String>,
    /// How long all checks together may take before the trial counts as failed.
    #[serde(default = "default_health_timeout", with = "seconds")]
    pub timeout: Duration,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            commands: Vec::new(),
            units: Vec::new(),
            timeout: default_health_timeout(),
        }
    }
}

/// Where the agent reads facts about the running system. The defaults are the kernel's files;
/// tests point them at files of their own to simulate boots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    #[serde(default = "default_boot_id_path")]
    pub boot_id_path: PathBuf,
    #[serde(default = "default_cmdline_path")]
    pub cmdline_path: PathBuf,
    /// Bootname of the booted slot, overriding detection (for tests and unusual boards).
    #[serde(default)]
    pub booted_slot: Option<String>,
    /// The command that reboots the device.
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
}

impl Default for System {
    fn default() -> System {
        System {
            boot_id_path: default_boot_id_path(),
            cmdline_path: default_cmdline_path(),
            booted_slot: None,
            reboot_command: default_reboot_command(),
        }
    }
}

/// The MQTT connection of `update-agent run` (topics: see `mqtt::topics`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtts://host[:port]` (TLS, port 8883 by default) or `mqtt://host[:port]` (plain TCP, for
    /// development and tests only; 1883 by default).
    pub broker: BrokerUrl,
    /// This device's id: its MQTT client id and its topic segment (`devices/{device_id}/…`).
    pub device_id: String,
    /// `"5"` (default) or `"3.1.1"`, for brokers that speak nothing newer; then the broker
    /// must bound the message size itself (README, "MQTT 3.1.1").
    #[serde(default)]
    pub protocol: crate::mqtt::Protocol,
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// PEM file with the CA certificate(s) the broker's certificate must chain to. Only these
    /// are trusted (the system's roots are not). Required for `mqtts://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// This device's client certificate (PEM) and private key (PEM, PKCS#8/SEC1/PKCS#1) for
    /// mutual TLS. The key file must not be readable by group or others.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_keepalive", with = "seconds")]
    pub keepalive: Duration,
    /// The retained releases are looked at again this often (with ±20 % jitter).
    #[serde(default = "default_recheck_interval", with = "seconds")]
    pub recheck_interval: Duration,
    /// Reconnect back-off: doubles from `reconnect_min` up to `reconnect_max` (seconds,
    /// fractions allowed), with jitter.
    #[serde(default = "default_reconnect_min", with = "fractional_seconds")]
    pub reconnect_min: Duration,
    #[serde(default = "default_reconnect_max", with = "fractional_seconds")]
    pub reconnect_max: Duration,
    /// Events kept for the broker while it is unreachable; beyond, the oldest are dropped (and a
    /// record says how many).
    #[serde(default = "default_outbox_capacity")]
    pub outbox_capacity: usize,
}

/// When updates install and reboot, and how far the user may push them back (EN 303 645 5.3-6).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Install releases automatically unless the user turned it off.
    #[serde(default = "yes")]
    pub auto_install: bool,
    /// Daily maintenance windows in local time, `"HH:MM-HH:MM"`; may cross midnight. Empty:
    /// any time.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// `immediate`, `window` or `manual`.
    #[serde(default)]
    pub reboot: RebootPolicy,
    /// The longest postponement a user may ask for, in seconds.
    #[serde(default = "default_max_postpone", with = "seconds")]
    pub max_postpone: Duration,
    /// With automatic install off, a security release still installs at its signed deadline.
    #[serde(default = "yes")]
    pub security_deadline_when_off: bool,
    /// Seconds before a scheduled reboot the user is told (D-Bus `DisruptionAhead`).
    #[serde(default = "default_notice", with = "seconds")]
    pub disruption_notice: Duration,
    /// IANA time zone of the windows (e.g. `Europe/Berlin`); default: the system's.
    #[serde(default, with = "zone")]
    pub time_zone: Option<TimeZone>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            auto_install: true,
            windows: Vec::new(),
            reboot: RebootPolicy::default(),
            max_postpone: default_max_postpone(),
            security_deadline_when_off: true,
            disruption_notice: default_notice(),
            time_zone: None,
        }
    }
}

impl Policy {
    /// The engine's form of this section.
    pub fn engine_policy(&self) -> PolicyConfig {
        let time_zone = self.time_zone.clone().unwrap_or_else(TimeZone::system);
        PolicyConfig {
            auto_install: self.auto_install,
            windows: self.windows.clone(),
            reboot: self.reboot,
            max_postpone: to_signed(self.max_postpone),
            security_deadline_when_off: self.security_deadline_when_off,
            notice: to_signed(self.disruption_notice),
            time_zone,
        }
    }
}

fn to_signed(duration: Duration) -> SignedDuration {
    SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
}

/// The D-Bus service (`org.updateagent.Agent1` on the system bus).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DBus {
    /// Whether `update-agent run` hosts the service. On, the daemon stops with an error when
    /// it cannot connect to the system bus or take the name: a device whose user cannot be
    /// told of updates is a misconfiguration, not something to run past. Off (a gateway
    /// without a system bus), the daemon runs without it.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Members of this group (and root) may call the mutating methods; everyone local may
    /// read. Must match the group in the bus policy file
    /// (`/usr/share/dbus-1/system.d/org.updateagent.Agent1.conf`).
    #[serde(default = "default_admin_group")]
    pub admin_group: Option<String>,
}

impl Default for DBus {
    fn default() -> DBus {
        DBus {
            enabled: true,
            admin_group: default_admin_group(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is larger than {MAX_CONFIG_SIZE} bytes")]
    TooLarge { path: PathBuf },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        if std::fs::metadata(path).map_err(read_err)?.len() > MAX_CONFIG_SIZE {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Config::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// The file [`Config::parse`] reads back as this config: every key written out, defaults
    /// included. Fails only for a path that is not UTF-8 (TOML cannot hold it).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    fn validate(&self) -> Result<(), String> {
        // Each bootname was checked as it was read (`Bootname`).
        let (a, b) = (&self.slots.a, &self.slots.b);
        if a.bootname == b.bootname {
            return Err("slots a and b have the same bootname".into());
        }
        if a.device == b.device {
            return Err("slots a and b name the same device".into());
        }
        if self.trust.threshold == 0 {
            return Err("trust.threshold must be at least 1".into());
        }
        if self.install.checkpoint_interval < 1024 * 1024 {
            return Err("install.checkpoint_interval must be at least 1 MiB".into());
        }
        if self.system.reboot_command.is_empty() {
            return Err("system.reboot_command must name a program".into());
        }
        if let Some(mqtt) = &self.mqtt {
            mqtt.validate(&self.device.compatible)?;
        }
        self.conformance.validate()?;
        if self.install.download_jitter > MAX_DOWNLOAD_JITTER {
            return Err("install.download_jitter is at most 3600 seconds".into());
        }
        Ok(())
    }

    pub fn slot_by_bootname(&self, bootname: &str) -> Option<&Slot> {
        [&self.slots.a, &self.slots.b]
            .into_iter()
            .find(|slot| slot.bootname == *bootname)
    }
}

impl Mqtt {
    /// Where and as whom the daemon connects.
    pub fn endpoint(&self) -> Endpoint {
        let tls = self.ca_file.as_ref().map(|ca| crate::mqtt::tls::TlsFiles {
            ca: ca.clone(),
            client: self.cert_file.clone().zip(self.key_file.clone()),
        });
        Endpoint {
            url: self.broker.clone(),
            tls,
            protocol: self.protocol,
        }
    }

    /// A connection to `broker` as `device_id`, with every other setting at its default.
    pub fn new(broker: BrokerUrl, device_id: impl Into<String>) -> Mqtt {
        Mqtt {
            broker,
            device_id: device_id.into(),
            topic_prefix: default_topic_prefix(),
            protocol: crate::mqtt::Protocol::default(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            keepalive: default_keepalive(),
            recheck_interval: default_recheck_interval(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
            outbox_capacity: default_outbox_capacity(),
        }
    }

    fn validate(&self, compatible: &str) -> Result<(), String> {
        crate::mqtt::topics::check_segment("mqtt.device_id", &self.device_id)?;
        crate::mqtt::topics::check_segment(
            "device.compatible (it is part of a topic)",
            compatible,
        )?;
        crate::mqtt::topics::check_prefix(&self.topic_prefix)?;
        if self.broker.tls && self.ca_file.is_none() {
            return Err("mqtt.ca_file is required for an mqtts:// broker".into());
        }
        if !self.broker.tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err("mqtt.ca_file/cert_file need an mqtts:// broker".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("mqtt.cert_file and mqtt.key_file go together".into());
        }
        if self.keepalive < Duration::from_secs(5) || self.keepalive > Duration::from_secs(65535) {
            return Err("mqtt.keepalive must be 5 to 65535 seconds".into());
        }
        if self.recheck_interval < Duration::from_secs(1) {
            return Err("mqtt.recheck_interval must be at least 1 second".into());
        }
        if self.reconnect_min < Duration::from_millis(10) || self.reconnect_max < self.reconnect_min
        {
            return Err(
                "mqtt.reconnect_min must be at least 0.01 and at most reconnect_max".into(),
            );
        }
        if !(1..=100_000).contains(&self.outbox_capacity) {
            return Err("mqtt.outbox_capacity must be 1 to 100000".into());
        }
        Ok(())
    }
}

mod fractional_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(duration.as_secs_f64())
    }
}

/// Whole seconds; a sub-second part is cut off when written (the file cannot say it).
/// An IANA time zone by its name, looked up in the system's tzdata as the file is read.
mod zone {
    use jiff::tz::TimeZone;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TimeZone>, D::Error> {
        let Some(name) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        TimeZone::get(&name).map(Some).map_err(|e| {
            D::Error::custom(format!(
                "policy.time_zone {name:?} is not a known time zone ({e}); is tzdata installed?"
            ))
        })
    }

    pub fn serialize<S: Serializer>(zone: &Option<TimeZone>, s: S) -> Result<S::Ok, S::Error> {
        match zone.as_ref().and_then(TimeZone::iana_name) {
            Some(name) => s.serialize_some(name),
            None => s.serialize_none(),
        }
    }
}

mod seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }

    pub fn serialize<S: Serializer>(duration: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(duration.as_secs())
    }
}

fn yes() -> bool {
    true
}
fn default_max_postpone() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_download_jitter() -> Duration {
    Duration::from_secs(10)
}
/// The longest `install.download_jitter` taken: it delays every install, so it stays small.
pub const MAX_DOWNLOAD_JITTER: Duration = Duration::from_secs(3600);
fn default_notice() -> Duration {
    Duration::from_secs(300)
}
fn default_admin_group() -> Option<String> {
    Some("update-admin".into())
}
fn default_state_dir() -> PathBuf {
    "/var/lib/update-agent".into()
}
fn default_keys_dir() -> PathBuf {
    "/usr/share/update-agent/keys.d".into()
}
fn one() -> usize {
    1
}
/// Tries a freshly activated slot gets when `[bootloader] attempts` is not set; the shipped boot
/// scripts start an unset counter at the same number.
pub const DEFAULT_BOOT_ATTEMPTS: u32 = 3;

fn default_attempts() -> u32 {
    DEFAULT_BOOT_ATTEMPTS
}
fn default_fw_printenv() -> PathBuf {
    "/usr/bin/fw_printenv".into()
}
fn default_fw_setenv() -> PathBuf {
    "/usr/bin/fw_setenv".into()
}
fn default_grub_editenv() -> PathBuf {
    "/usr/bin/grub-editenv".into()
}
fn default_class() -> String {
    "rootfs".into()
}
fn default_checkpoint_interval() -> u64 {
    64 * 1024 * 1024
}
fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_topic_prefix() -> String {
    crate::mqtt::topics::DEFAULT_PREFIX.into()
}
fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_recheck_interval() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_reconnect_min() -> Duration {
    Duration::from_secs(1)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(300)
}
fn default_outbox_capacity() -> usize {
    256
}
fn default_boot_id_path() -> PathBuf {
    "/proc/sys/kernel/random/boot_id".into()
}
fn default_cmdline_path() -> PathBuf {
    "/proc/cmdline".into()
}
fn default_reboot_command() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../config/agent.toml");
        let config = Config::parse(text).unwrap();
        assert_eq!(config.slots.class, "rootfs");
        assert!(matches!(config.bootloader, BootloaderConfig::Uboot { .. }));
        let mqtt = config.mqtt.unwrap();
        assert_eq!(mqtt.topic_prefix, "update-agent/v1");
        assert_eq!(mqtt.reconnect_min, Duration::from_secs(1));
    }

    #[test]
    fn mqtt_settings_are_checked() {
        let example = include_str!("../config/agent.toml");
        for (from, to, expect) in [
            ("mqtts://", "ftp://", "is not mqtts:// (TLS) or mqtt://"),
            (
                "device_id = \"gw-0001\"",
                "device_id = \"gw/+\"",
                "mqtt.device_id",
            ),
            ("ca_file =", "# ca_file =", "ca_file is required"),
            ("key_file =", "# key_file =", "go together"),
            (
                "reconnect_min = 1",
                "reconnect_min = 0.001",
                "reconnect_min",
            ),
        ] {
            assert!(example.contains(from), "{from}");
            let err = Config::parse(&example.replace(from, to)).unwrap_err();
            assert!(err.contains(expect), "{from}: {err}");
        }
    }

    /// A bootname becomes a `Bootname` as the file is read: the rule is checked there, once,
    /// and the error names the rule and the line.
    #[test]
    fn bootnames_are_checked_as_the_config_is_read() {
        let example = include_str!("../config/agent.toml");
        let good = Config::parse(example).unwrap();
        assert_eq!(good.slots.a.bootname, "A");
        for bad in [
            "",
            "A B",
            "B;reset",
            "ABCDEFGHIJKLMNOPQ",
            "A\\nB",
            "0",
            "A_B",
        ] {
            let text = example.replace("bootname = \"B\"", &format!("bootname = \"{bad}\""));
            let err = Config::parse(&text).unwrap_err();
            assert!(
                err.contains("must be 1 to 16 ASCII letters and digits"),
                "{bad:?}: {err}"
            );
            assert!(err.contains("line 44"), "{bad:?}: {err}");
        }
        let same = example.replace("bootname = \"B\"", "bootname = \"A\"");
        assert!(Config::parse(&same).unwrap_err().contains("same bootname"));
    }

    /// What `to_toml` writes reads back as the same config (the simulated gateway's configs
    /// are written so), with every section of the example present.
    #[test]
    fn a_config_written_as_toml_reads_back_the_same() {
        let example = Config::parse(include_str!("../config/agent.toml")).unwrap();
        let written = example.to_toml().unwrap();
        let again = Config::parse(&written).unwrap();
        assert_eq!(again.to_toml().unwrap(), written);
        assert_eq!(format!("{again:?}"), format!("{example:?}"));
        for section in [
            "[device]",
            "[trust]",
            "[bootloader]",
            "[slots",
            "[install]",
            "[mqtt]",
        ] {
            assert!(written.contains(section), "{section} missing:\n{written}");
        }
    }

    /// `"auto"` overlaps the read-back with the download into a block device only; `true` and
    /// `false` still force it; anything else is refused with what is allowed.
    #[test]
    fn readback_overlap_is_auto_true_or_false_and_auto_overlaps_block_devices() {
        let example = include_str!("../config/agent.toml");
        let with = |value: &str| {
            Config::parse(&example.replace(
                "readback_overlap = \"auto\"",
                &format!("readback_overlap = {value}"),
            ))
        };
        assert_eq!(
            with("\"auto\"").unwrap().install.readback_overlap,
            ReadbackOverlap::Auto
        );
        assert_eq!(
            with("true").unwrap().install.readback_overlap,
            ReadbackOverlap::Always
        );
        assert_eq!(
            with("false").unwrap().install.readback_overlap,
            ReadbackOverlap::Never
        );
        for bad in ["\"yes\"", "1"] {
            let err = with(bad).unwrap_err();
            assert!(err.contains(r#""auto", true or false"#), "{bad}: {err}");
        }
        let without = example.replace("readback_overlap = \"auto\"", "");
        let default = Config::parse(&without).unwrap().install.readback_overlap;
        assert_eq!(default, ReadbackOverlap::Auto);

        let (_dir, file) = crate::scratch_path("slot");
        std::fs::write(&file, b"a file slot").unwrap();
        assert!(!ReadbackOverlap::Auto.for_slot(&file));
        assert!(ReadbackOverlap::Always.for_slot(&file));
        // One of this machine's block devices, only looked at.
        let block = std::fs::read_dir("/sys/block")
            .unwrap()
            .map(|entry| Path::new("/dev").join(entry.unwrap().file_name()))
            .find(|dev| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(dev).is_ok_and(|m| m.file_type().is_block_device())
            })
            .expect("a block device node under /dev to look at");
        assert!(ReadbackOverlap::Auto.for_slot(&block));
        assert!(!ReadbackOverlap::Never.for_slot(&block));
    }

    #[test]
    fn conformance_declarations_are_bounded_and_justifications_name_a_provision() {
        let example = include_str!("../config/agent.toml");
        let with = |extra: &str| Config::parse(&format!("{example}{extra}\n"));
        let config = with("justifications = [\"5.3-6: the user installs by hand\"]").unwrap();
        assert_eq!(
            config.conformance.justification("5.3-6"),
            Some("the user installs by hand")
        );
        assert_eq!(config.conformance.justification("5.3-1"), None);
        assert!(config.conformance.model_label.is_some());
        for bad in [
            "5.3-17: no such provision",
            "5.3-06: padded",
            "5.3-6 no colon",
            "why",
        ] {
            let err = with(&format!("justifications = [{bad:?}]")).unwrap_err();
            assert!(
                err.contains("does not start with a provision"),
                "{bad}: {err}"
            );
        }
        let long = "x".repeat(MAX_DECLARATION + 1);
        let text = example.replace(
            "model_label = \"type plate",
            &format!("model_label = \"{long} type plate"),
        );
        assert!(
            Config::parse(&text)
                .unwrap_err()
                .contains("conformance.model_label is longer")
        );
        let typo = example.replace("[conformance]", "[conformance]\nmodel_lable = \"x\"");
        assert!(Config::parse(&typo).unwrap_err().contains("model_lable"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text =
            include_str!("../config/agent.toml").replace("[trust]", "[trust]\nthreshhold = 2");
        assert!(Config::parse(&text).unwrap_err().contains("threshhold"));
    }
}
