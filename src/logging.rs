//! Diagnostics: to the systemd journal (structured fields) when its socket exists, else to
//! stderr. Failures carry a stable `MESSAGE_ID` field (a 128-bit id, as journald catalogs use),
//! so that `journalctl MESSAGE_ID=…` finds every occurrence whatever the wording. Strings that
//! came from the network go through [`crate::release::escape_for_log`] before they reach a log.

use std::path::Path;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Stable ids for the failures operators look for in the journal. Never change one.
pub mod message_id {
    /// A release was refused by verification (reason code in the `REASON` field).
    pub const RELEASE_REFUSED: &str = "5c8e1f0a7b3d4c2e9f61a8b7c4d3e2f1";
    /// A release or image failed an integrity check: possible tampering (EN 303 645 5.7-2).
    pub const TAMPER_ALERT: &str = "e3a9c1d27f5b48e6a0b3c9d8e7f61a25";
    /// A transaction failed or rolled back.
    pub const INSTALL_FAILED: &str = "9b2d4e6f8a1c43b5a7d9e0f2c4b6a8d1";
    /// The connection to the broker failed or was lost.
    pub const MQTT_CONNECTION: &str = "1f7e3a5c9b2d4e68a0c2e4f6a8b0d2c4";
    /// The broker refused a subscription or a publish (check its ACL for this device).
    pub const MQTT_REFUSED: &str = "7a6c5e4d3b2a41f0e9d8c7b6a5f4e3d2";
    /// The outbox overflowed while the broker was unreachable; events were dropped.
    pub const OUTBOX_OVERFLOW: &str = "2c4e6a8b0d1f43e5a7c9b1d3f5e7a9c0";
    /// The outbox or the state could not be written.
    pub const STORAGE_FAILED: &str = "8e0a2c4e6b8d4f1a3c5e7a9b1d3f5a7c";
    /// Release refusals were suppressed by the rate limit (a flood of bad messages).
    pub const REFUSALS_SUPPRESSED: &str = "4d6f8a0c2e4b46d8a1c3e5f7b9d1a3c5";
    /// The daemon stopped with an error.
    pub const DAEMON_FAILED: &str = "b1d3f5a7c9e04b2d8f6a4c2e0b8d6f4a";
}

/// Logs a refusal that may be tampering: an error with [`message_id::TAMPER_ALERT`] and its
/// reason code, worded `TAMPER ALERT: …` wherever it is found (the agent or the installer).
pub fn tamper_alert(reason: crate::reason::ReasonCode, detail: std::fmt::Arguments<'_>) {
    tracing::error!(
        message_id = message_id::TAMPER_ALERT,
        reason = %reason,
        "TAMPER ALERT: {detail}"
    );
}

/// Where diagnostics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogTarget {
    /// The journal if its socket exists, else stderr.
    Auto,
    Journal,
    Stderr,
}

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Installs the global subscriber, filtered by `RUST_LOG` (else `default_level`).
pub fn init(target: LogTarget, default_level: &str) {
    let filter = filter_from(std::env::var("RUST_LOG").ok().as_deref(), default_level);
    let journal = match target {
        LogTarget::Stderr => None,
        LogTarget::Auto if !Path::new(JOURNAL_SOCKET).exists() => None,
        LogTarget::Auto | LogTarget::Journal => match tracing_journald::layer() {
            // Fields keep their names (`message_id` becomes `MESSAGE_ID`), no `F_` prefix.
            Ok(layer) => Some(
                layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("update-agent".into()),
            ),
            Err(e) => {
                eprintln!("update-agent: cannot log to the journal ({e}); logging to stderr");
                None
            }
        },
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(layer) => {
            let _ = registry.with(layer).try_init();
        }
        None => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                        .with_target(false),
                )
                .try_init();
        }
    }
}

/// `RUST_LOG`-style directives (`warn`, `update_agent=debug,rumqttc=off`): a default level and
/// per-module levels. `Targets` rather than `EnvFilter`: the span and field-value directives
/// only `EnvFilter` knows cost its regex engine, about 200 KiB of the device binary, and the agent
/// has no spans to filter on. A value that does not parse falls back to `default_level`, with a
/// note on stderr, so a typo never silences the agent.
fn filter_from(directives: Option<&str>, default_level: &str) -> Targets {
    let fallback = || {
        default_level
            .parse()
            .expect("the default log level is a valid directive")
    };
    match directives {
        None => fallback(),
        Some(text) => text.parse().unwrap_or_else(|e| {
            eprintln!("update-agent: RUST_LOG={text:?} is not understood ({e}); logging at {default_level}");
            fallback()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::{filter_from, message_id};
    use tracing::Level;

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let ids = [
            message_id::RELEASE_REFUSED,
            message_id::TAMPER_ALERT,
            message_id::INSTALL_FAILED,
            message_id::MQTT_CONNECTION,
            message_id::MQTT_REFUSED,
            message_id::OUTBOX_OVERFLOW,
            message_id::STORAGE_FAILED,
            message_id::REFUSALS_SUPPRESSED,
            message_id::DAEMON_FAILED,
        ];
        for id in ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn rust_log_sets_the_default_and_per_module_levels() {
        let filter = filter_from(Some("warn,update_agent::mqtt=debug,rumqttc=off"), "info");
        assert!(filter.would_enable("update_agent::mqtt::link", &Level::DEBUG));
        assert!(!filter.would_enable("update_agent::mqtt::link", &Level::TRACE));
        assert!(filter.would_enable("update_agent::engine", &Level::WARN));
        assert!(!filter.would_enable("update_agent::engine", &Level::INFO));
        assert!(!filter.would_enable("rumqttc::state", &Level::ERROR));
    }

    #[test]
    fn without_or_with_a_bad_rust_log_the_default_level_applies() {
        for directives in [None, Some("update_agent=loud")] {
            let filter = filter_from(directives, "info");
            assert!(
                filter.would_enable("update_agent::daemon", &Level::INFO),
                "{directives:?}"
            );
            assert!(
                !filter.would_enable("update_agent::daemon", &Level::DEBUG),
                "{directives:?}"
            );
        }
    }
}
