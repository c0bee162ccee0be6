//! The topic scheme (`docs/wire-formats.md`), in one place. Every topic the agent and the operator
//! tools use is built here from the prefix, the product's `compatible` and the device id.

/// The prefix when the configuration names none. The `v1` versions the payloads below it.
pub const DEFAULT_PREFIX: &str = "update-agent/v1";

/// Longest prefix, device id or compatible accepted (a topic is at most 64 KiB; far less here).
const MAX_SEGMENT: usize = 64;

/// Where a release came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleaseSource {
    /// `{prefix}/fleet/{compatible}/release`: the newest release for the product (retained).
    Fleet,
    /// `{prefix}/devices/{device_id}/release`: a release for this device only.
    Device,
}

impl ReleaseSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseSource::Fleet => "fleet",
            ReleaseSource::Device => "device",
        }
    }
}

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub fleet_release: String,
    pub device_release: String,
    pub state: String,
    pub events: String,
    pub online: String,
}

impl Topics {
    pub fn new(prefix: &str, compatible: &str, device_id: &str) -> Topics {
        let device = device_topic(prefix, device_id);
        Topics {
            fleet_release: fleet_release(prefix, compatible),
            device_release: format!("{device}/release"),
            state: format!("{device}/state"),
            events: format!("{device}/events"),
            online: format!("{device}/online"),
        }
    }

    /// Which release topic `topic` is, if it is one of this device's.
    pub fn release_source(&self, topic: &[u8]) -> Option<ReleaseSource> {
        if topic == self.fleet_release.as_bytes() {
            Some(ReleaseSource::Fleet)
        } else if topic == self.device_release.as_bytes() {
            Some(ReleaseSource::Device)
        } else {
            None
        }
    }
}

pub fn fleet_release(prefix: &str, compatible: &str) -> String {
    format!("{prefix}/fleet/{compatible}/release")
}

pub fn device_topic(prefix: &str, device_id: &str) -> String {
    format!("{prefix}/devices/{device_id}")
}

/// The filters an operator's monitor subscribes to, and how to read a topic back.
pub mod monitor {
    /// `{prefix}/devices/+/state`, `…/online`, `…/events`.
    pub fn filters(prefix: &str) -> [String; 3] {
        ["state", "online", "events"].map(|leaf| format!("{prefix}/devices/+/{leaf}"))
    }

    /// Splits `{prefix}/devices/{id}/{leaf}` into (id, leaf).
    pub fn parse<'t>(prefix: &str, topic: &'t str) -> Option<(&'t str, &'t str)> {
        let rest = topic.strip_prefix(prefix)?.strip_prefix("/devices/")?;
        let (id, leaf) = rest.split_once('/')?;
        (!id.is_empty() && !leaf.contains('/')).then_some((id, leaf))
    }
}

/// A device id or compatible string becomes one topic level: it must not contain `/`, the
/// wildcards `+` and `#`, or anything a person could misread (only letters, digits, `-`, `_`,
/// `.`; at most 64).
pub fn check_segment(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SEGMENT
        && value
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {value:?} must be 1 to {MAX_SEGMENT} letters, digits, '-', '_' or '.'"
        ))
    }
}

/// The prefix: levels of letters, digits, `-`, `_`, `.` separated by single `/`, no leading or
/// trailing `/` and no wildcards.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let ok = prefix.len() <= 4 * MAX_SEGMENT
        && prefix
            .split('/')
            .all(|level| check_segment("", level).is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "mqtt.topic_prefix {prefix:?} must be levels of letters, digits, '-', '_' or '.' separated by '/'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_design() {
        let t = Topics::new(DEFAULT_PREFIX, "acme-gw-1", "gw-7");
        assert_eq!(t.fleet_release, "update-agent/v1/fleet/acme-gw-1/release");
        assert_eq!(t.device_release, "update-agent/v1/devices/gw-7/release");
        assert_eq!(t.state, "update-agent/v1/devices/gw-7/state");
        assert_eq!(t.events, "update-agent/v1/devices/gw-7/events");
        assert_eq!(t.online, "update-agent/v1/devices/gw-7/online");
        assert_eq!(
            t.release_source(b"update-agent/v1/fleet/acme-gw-1/release"),
            Some(ReleaseSource::Fleet)
        );
        assert_eq!(
            t.release_source(b"update-agent/v1/devices/gw-8/release"),
            None
        );
        assert_eq!(
            monitor::parse(DEFAULT_PREFIX, "update-agent/v1/devices/gw-7/state"),
            Some(("gw-7", "state"))
        );
        assert_eq!(
            monitor::parse(DEFAULT_PREFIX, "update-agent/v1/devices/a/b/c"),
            None
        );
    }

    #[test]
    fn segments_and_prefixes_cannot_smuggle_levels_or_wildcards() {
        for bad in ["", "a/b", "+", "#", "a b", "é", &"x".repeat(65)] {
            assert!(check_segment("id", bad).is_err(), "{bad:?}");
        }
        assert!(check_segment("id", "gw-0001.eu_1").is_ok());
        for bad in ["/a", "a/", "a//b", "a/+/b", "a/#"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(check_prefix("update-agent/v1").is_ok());
    }
}
