//! `update-agent run`: the agent as a service. A thin loop around [`Agent`]: it connects to the
//! broker ([`crate::mqtt::link`]), takes received releases through [`intake`] (recognised
//! repeats, rate-limited refusals) to verification and to the engine, reports through
//! [`report`] (outbox + retained state), re-checks the retained releases periodically, and
//! reboots when the engine asks — after giving the outbox a moment to reach the broker. All
//! update logic stays in the engine.

pub mod intake;
pub mod notify;
pub mod report;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use crate::agent::{Agent, AgentError, RebootMode, Stop};
use crate::config::Config;
use crate::logging::message_id;
use crate::mqtt::backoff::{jittered, random_unit};
use crate::mqtt::link::{Link, LinkSettings};
use crate::mqtt::payload::DeviceFacts;
use crate::mqtt::topics::{ReleaseSource, Topics};
use crate::mqtt::{Endpoint, MqttError};
use crate::outbox::Outbox;
use crate::release::escape_for_log;
use crate::state_store::{StateStore, StoreError};
use intake::{Allowance, Intake};
use report::Reporter;

/// How long the daemon waits for the outbox to reach the broker before a reboot.
const REBOOT_FLUSH: Duration = Duration::from_secs(10);
/// How soon the policy timer looks again at a moment that brought nothing the last time.
const POLICY_RETRY: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);
/// How long a clean shutdown waits for the broker to take `online=false`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// The re-check interval varies by this fraction either way, so a fleet spreads out.
const RECHECK_JITTER: f64 = 0.2;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the config has no [mqtt] section; `update-agent run` needs the broker's address")]
    NoMqtt,
    #[error("config: {0}")]
    Config(String),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("outbox {path}: {source}")]
    Outbox {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// The monotonic instant at which the wall-clock time `at` is reached, seen from `now`; a time
/// in the past is now. Re-computed after every wake-up, so a wall clock set meanwhile (NTP on a
/// device without RTC) delays or hastens a wake-up by at most one cycle.
fn instant_of(at: Timestamp, now: Timestamp) -> Instant {
    let wait = at.duration_since(now);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    // A policy moment is at most a deadline away; a far-future one is re-checked daily anyway.
    Instant::now() + wait.min(Duration::from_secs(24 * 3600))
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs until `shutdown` completes (then says `online=false` and disconnects) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let mqtt = config.mqtt.clone().ok_or(DaemonError::NoMqtt)?;
    let endpoint = Endpoint::from_config(&mqtt).map_err(DaemonError::Config)?;
    if !endpoint.url.tls {
        tracing::warn!(
            "the broker connection {} is not encrypted: use mqtts:// outside development",
            endpoint.shown()
        );
    }
    let topics = Topics::new(
        &mqtt.topic_prefix,
        &config.device.compatible,
        &mqtt.device_id,
    );
    tracing::info!(
        "update-agent {} starting: device {}, broker {}",
        env!("CARGO_PKG_VERSION"),
        mqtt.device_id,
        endpoint.shown()
    );
    let mut agent = Agent::open(config.clone(), RebootMode::Defer)?;
    let store = StateStore::open(&config.device.state_dir)?;
    let outbox_dir = config.device.state_dir.join("outbox");
    let outbox_err = |source| DaemonError::Outbox {
        path: outbox_dir.clone(),
        source,
    };
    let mut outbox = Outbox::open(&outbox_dir, mqtt.outbox_capacity).map_err(outbox_err)?;
    let caught_up = outbox
        .catch_up(&store.events()?, Timestamp::now())
        .map_err(outbox_err)?;
    if caught_up > 0 {
        tracing::info!("{caught_up} logged event(s) taken into the outbox");
    }
    let outbox = Arc::new(Mutex::new(outbox));
    let link = Link::start(
        LinkSettings {
            endpoint,
            client_id: mqtt.device_id.clone(),
            keepalive: mqtt.keepalive,
            topics,
            reconnect_min: mqtt.reconnect_min,
            reconnect_max: mqtt.reconnect_max,
        },
        outbox.clone(),
    )?;
    let facts = DeviceFacts {
        device: mqtt.device_id.clone(),
        compatible: config.device.compatible.clone(),
        model: config.device.model.clone(),
        support_end: config.device.support_end,
        factory_version: config.device.factory_version.clone(),
        floor: config.trust.floor,
    };
    let mut reporter = Reporter::new(facts, outbox.clone(), link.publisher());
    reporter.publish();
    // Ready: configured, state and outbox open, the broker link running (it connects and
    // reconnects on its own). The D-Bus name is not held yet: the daemon does not host the
    // D-Bus service in this version.
    let notifier = notify::Notifier::from_env();
    notifier.notify("READY=1");
    // The keep-alive runs beside the main loop, which may spend minutes inside one install;
    // it stops when the runtime does.
    let watchdog = notifier.watchdog_interval().map(|every| {
        tokio::spawn(async move {
            let notifier = notify::Notifier::from_env();
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                notifier.notify("WATCHDOG=1");
            }
        })
    });
    let mut daemon = Daemon {
        agent: &mut agent,
        reporter,
        link: &link,
        outbox,
        store,
        intake: Intake::default(),
        recheck: mqtt.recheck_interval,
    };
    let result = tokio::select! {
        result = daemon.serve() => result,
        () = shutdown => {
            tracing::info!("stopping");
            Ok(())
        }
    };
    if let Err(err) = &result {
        tracing::error!(message_id = message_id::DAEMON_FAILED, "stopping: {err}");
    }
    notifier.notify("STOPPING=1");
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    link.shutdown(SHUTDOWN_GRACE).await;
    result
}

struct Daemon<'a> {
    agent: &'a mut Agent,
    reporter: Reporter,
    link: &'a Link,
    outbox: Arc<Mutex<Outbox>>,
    store: StateStore,
    intake: Intake,
    recheck: Duration,
}

impl Daemon<'_> {
    async fn serve(&mut self) -> Result<(), DaemonError> {
        // First finish whatever this boot means: resume an install, run the trial, commit.
        let stop = self.agent.observe_boot(&mut self.reporter).await?;
        self.reporter.refresh(self.agent.engine());
        let mut rebooting = self.after(stop).await?;
        let mut next_check = Instant::now() + jittered(self.recheck, RECHECK_JITTER, random_unit());
        let link = self.link;
        let mut last_tick = None;
        loop {
            // The policy's next moment (a maintenance window opens, a postponement or deadline
            // ends, a scheduled reboot is due): the engine never reads a clock, so the daemon
            // wakes it with a tick then.
            let policy_wake = self.agent.poll_timeout().map(|at| {
                // A moment the engine was already woken for and still names (nothing it can do
                // yet) is looked at again a little later instead of in a busy loop.
                let at = if last_tick == Some(at) {
                    at + POLICY_RETRY
                } else {
                    at
                };
                instant_of(at, self.agent.now())
            });
            tokio::select! {
                () = sleep_until_some(policy_wake), if !rebooting => {
                    last_tick = self.agent.poll_timeout();
                    let stop = self.agent.tick(&mut self.reporter).await?;
                    self.reporter.refresh(self.agent.engine());
                    rebooting = self.after(stop).await?;
                }
                releases = link.inbox.next(), if !rebooting => {
                    for (source, payload) in releases {
                        let stop = self.take(source, &payload).await?;
                        rebooting = self.after(stop).await?;
                        if rebooting {
                            break;
                        }
                    }
                }
                () = tokio::time::sleep_until(next_check) => {
                    next_check = Instant::now() + jittered(self.recheck, RECHECK_JITTER, random_unit());
                    tracing::info!("periodic check of the retained releases");
                    self.intake.forget_offered();
                    self.catch_up();
                    self.link.recheck();
                }
            }
        }
    }

    /// One received release: recognised repeat, verified and offered, or refused and reported
    /// within the rate limit.
    async fn take(&mut self, source: ReleaseSource, payload: &[u8]) -> Result<Stop, DaemonError> {
        let (digest, seen) = self.intake.look(payload);
        if seen {
            tracing::debug!("{} release seen before; nothing to do", source.as_str());
            return Ok(Stop::Idle);
        }
        match self.agent.verify(payload) {
            Ok(verified) => {
                if !self.intake.offer(digest, &verified.id_hex()) {
                    return Ok(Stop::Idle);
                }
                tracing::info!(
                    "{} release {} verified",
                    source.as_str(),
                    escape_for_log(&verified.manifest.version, 64)
                );
                let stop = self
                    .agent
                    .offer_verified(verified, &mut self.reporter)
                    .await?;
                self.reporter.refresh(self.agent.engine());
                Ok(stop)
            }
            Err(mut refusal) => {
                self.intake.refused(digest);
                match self.intake.limiter.allow(std::time::Instant::now()) {
                    Allowance::Report { suppressed } => {
                        if suppressed > 0 {
                            refusal.message.push_str(&format!(
                                " ({suppressed} more refused release(s) were not reported: rate limit)"
                            ));
                        }
                        self.agent
                            .report_refusal(&refusal, &mut self.reporter)
                            .await?;
                        self.reporter.refresh(self.agent.engine());
                    }
                    Allowance::Suppress { summary } => {
                        if let Some(count) = summary {
                            tracing::warn!(
                                message_id = message_id::REFUSALS_SUPPRESSED,
                                "{count} refused release(s) not reported (rate limit: a flood of bad messages?); latest: {}",
                                refusal.code
                            );
                        }
                    }
                }
                Ok(Stop::Idle)
            }
        }
    }

    /// Acts on where the engine stopped; true once the reboot command ran.
    async fn after(&mut self, stop: Stop) -> Result<bool, DaemonError> {
        let Stop::RebootNeeded { slot } = stop else {
            return Ok(false);
        };
        self.flush(REBOOT_FLUSH).await;
        tracing::info!("rebooting to slot {slot}");
        self.agent.reboot()?;
        Ok(true)
    }

    /// Waits (bounded) until the broker acknowledged every event, while connected.
    async fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let status = self.link.status();
        while Instant::now() < deadline
            && status.borrow().connected
            && !self.outbox.lock().expect("outbox lock").is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Takes over events a one-shot command logged while the daemon ran.
    fn catch_up(&mut self) {
        let events = match self.store.events() {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(message_id = message_id::STORAGE_FAILED, "{e}");
                return;
            }
        };
        let taken = self
            .outbox
            .lock()
            .expect("outbox lock")
            .catch_up(&events, Timestamp::now());
        match taken {
            Ok(0) => {}
            Ok(_) => self.link.publisher().outbox_changed(),
            Err(e) => tracing::error!(message_id = message_id::STORAGE_FAILED, "outbox: {e}"),
        }
    }
}
