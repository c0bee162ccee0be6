//! `update-agent run`: the agent as a service. A thin loop around [`Agent`]: it connects to the
//! broker ([`crate::mqtt::link`]), takes received releases through [`intake`] (recognised
//! repeats, rate-limited refusals) to verification and to the engine, reports through
//! [`report`] (outbox + retained state), re-checks the retained releases periodically, and
//! reboots when the engine asks — after giving the outbox a moment to reach the broker. It
//! hosts the D-Bus service (`[dbus] enabled`): the user's calls are inputs of the same loop,
//! and what the driver does reaches the service through a [`Feed`]. All update logic stays in
//! the engine.
//!
//! This loop is the only owner of the engine in a long-running process. Its operators' source
//! is the broker (`run`) or, without one, whoever holds a [`fed::Control`] (the hidden
//! `dbus-serve`, and the tests that host the service in-process on a fake clock): the same
//! loop, the same D-Bus side, releases offered through the control instead of MQTT, and a
//! reboot the engine asks for told back on the control instead of run.

pub mod fed;
pub mod intake;
pub mod notify;
pub mod report;
#[cfg(feature = "test-hooks")]
pub mod test_clock;
pub mod withdrawal;

mod broker;

use broker::{Broker, BrokerInput};

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use crate::agent::{Agent, AgentError, Observer, Output, RebootMode, Stop};
use crate::config::Config;
use crate::dbus::feed::Feed;
use crate::dbus::{self, Access};
use crate::engine::Input;
use crate::logging::message_id;
use crate::mqtt::MqttError;
use crate::mqtt::link::{Link, LinkSettings};
use crate::mqtt::payload::DeviceFacts;
use crate::mqtt::topics::Topics;
use crate::outbox::Outbox;
use crate::state_store::{StateStore, StoreError};
use report::Reporter;

/// How long it waits for the D-Bus signals (the user told of the reboot) before a reboot.
const SIGNAL_FLUSH: Duration = Duration::from_secs(2);
/// The longest the policy timer sleeps. Its moments are wall-clock times, and a gateway without
/// a battery-backed clock boots with a wrong one that NTP later moves, by years at once: a sleep
/// measured before that jump would act on a maintenance window or the end of a postponement
/// late by as much as it lasts. Waking once a minute bounds that (and only while the engine
/// names a moment ahead). Not tested against a real jump: that would set the test machine's
/// clock; the tests' clock file is polled instead (`test_clock::POLL`).
const MAX_POLICY_SLEEP: Duration = Duration::from_secs(60);
/// How soon the policy timer looks again at a moment that brought nothing the last time.
const POLICY_RETRY: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);
/// How long a clean shutdown waits for the broker to take `online=false`.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often the daemon looks again whether the state is free, while a one-shot command has it.
const LOCK_RETRY: Duration = Duration::from_secs(1);
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
    #[error(
        "D-Bus: cannot {what} the system bus {address}: {source}. The D-Bus service is on \
         ([dbus] enabled = true): start the system bus, or set enabled = false on a device \
         without one"
    )]
    DBus {
        what: &'static str,
        address: String,
        source: zbus::Error,
    },
}

/// The monotonic instant at which the wall-clock time `at` is reached, seen from `now`; a time
/// in the past is now. Re-computed after every wake-up, so a wall clock set meanwhile (NTP on a
/// device without RTC) delays or hastens a wake-up by at most one cycle.
fn instant_of(at: Timestamp, now: Timestamp, longest: Duration) -> Instant {
    let wait = at.duration_since(now);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    Instant::now() + wait.min(longest)
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Opens the agent once no other process holds the state: a one-shot `install` or
/// `boot-check` started by hand finishes first (never two writers). `None`: asked to stop
/// meanwhile.
async fn open_when_free(
    config: &Config,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<Option<Agent>, DaemonError> {
    let mut told = false;
    loop {
        match Agent::open(config.clone(), RebootMode::Defer) {
            Err(AgentError::Store(StoreError::Locked { holder, .. })) => {
                if !told {
                    tracing::warn!(
                        "the state is in use by {holder}; waiting for it to finish before starting"
                    );
                    told = true;
                }
            }
            other => return Ok(Some(other?)),
        }
        tokio::select! {
            () = &mut *shutdown => return Ok(None),
            () = tokio::time::sleep(LOCK_RETRY) => {}
        }
    }
}

/// Runs until `shutdown` completes (then says `online=false` and disconnects) or a fatal error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    tokio::pin!(shutdown);
    let mqtt = config.mqtt.clone().ok_or(DaemonError::NoMqtt)?;
    let endpoint = mqtt.endpoint();
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
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
    let Some(mut agent) = open_when_free(&config, &mut shutdown).await? else {
        tracing::info!("stopping");
        return Ok(());
    };
    #[cfg_attr(not(feature = "test-hooks"), allow(unused_mut))]
    let mut longest_sleep = MAX_POLICY_SLEEP;
    #[cfg(feature = "test-hooks")]
    if let Some((clock, path)) = test_clock::from_env() {
        tracing::warn!(
            "TEST CLOCK: the time is read from {} ({}); never set this outside tests",
            path.display(),
            test_clock::ENV
        );
        agent = agent.with_clock(clock);
        longest_sleep = test_clock::POLL;
    }
    let store = StateStore::open(&config.device.state_dir)?;
    let outbox_dir = config.device.state_dir.join("outbox");
    let outbox_err = |source| DaemonError::Outbox {
        path: outbox_dir.clone(),
        source,
    };
    let mut outbox = Outbox::open(&outbox_dir, mqtt.outbox_capacity).map_err(outbox_err)?;
    let logged = store.events()?;
    let caught_up = outbox
        .catch_up(&logged, Timestamp::now())
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
    // What this build and configuration leave weakened (EN 303 645 §5.3), for the operators
    // (retained state) and the user (D-Bus); the full report is `update-agent conformance`.
    let conformance = crate::conformance::summary_at_start(&config);
    if !conformance.weakened.is_empty() || !conformance.not_met.is_empty() {
        tracing::warn!("conformance: {}", conformance.text());
    }
    record_checks(&link, config.device.state_dir.clone());
    let facts = DeviceFacts {
        device: mqtt.device_id.clone(),
        compatible: config.device.compatible.clone(),
        model: config.device.model.clone(),
        support_end: config.device.support_end,
        factory_version: config.device.factory_version.clone(),
        floor: config.trust.floor,
        conformance: Some(conformance.clone()),
    };
    let mut reporter = Reporter::new(facts, outbox.clone(), link.publisher());
    reporter.logged(&logged);
    reporter.publish();
    let user = if config.dbus.enabled {
        Some(UserSide::start(&agent, &conformance).await?)
    } else {
        tracing::info!("D-Bus service off ([dbus] enabled = false)");
        None
    };
    // Ready: configured, state and outbox open, the broker link running (it connects and
    // reconnects on its own), and the D-Bus name held when the service is on.
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
        core: Core {
            agent,
            user,
            check_asked: false,
        },
        operators: Operators::Mqtt(Box::new(Broker::new(
            reporter,
            &link,
            outbox,
            store,
            mqtt.recheck_interval,
        ))),
        longest_sleep,
    };
    let result = tokio::select! {
        result = daemon.serve() => result,
        () = &mut shutdown => {
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

/// The D-Bus service as the daemon hosts it: the connection that holds the name and the feed
/// that brings the user's calls and tells the service what happens.
struct UserSide {
    feed: Feed,
    _signals: tokio::task::JoinHandle<()>,
    _connection: zbus::Connection,
}

impl UserSide {
    /// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` when set), serves the object and
    /// takes the name.
    async fn start(
        agent: &Agent,
        conformance: &crate::mqtt::payload::ConformanceSummary,
    ) -> Result<UserSide, DaemonError> {
        let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .unwrap_or_else(|_| "unix:path=/var/run/dbus/system_bus_socket".into());
        let failed = |what| {
            let address = address.clone();
            move |source| DaemonError::DBus {
                what,
                address,
                source,
            }
        };
        let connection = zbus::connection::Builder::system()
            .build()
            .await
            .map_err(failed("connect to"))?;
        let user = UserSide::serve(connection, agent, conformance)
            .await
            .map_err(failed("serve org.updateagent.Agent1 on"))?;
        tracing::info!("D-Bus service {} on the system bus", dbus::BUS_NAME);
        Ok(user)
    }

    /// Serves the object on `connection` and takes the name.
    async fn serve(
        connection: zbus::Connection,
        agent: &Agent,
        conformance: &crate::mqtt::payload::ConformanceSummary,
    ) -> zbus::Result<UserSide> {
        let (mut feed, handle) = Feed::new(agent.engine(), agent.config());
        feed.set_conformance(conformance);
        let access = Access::from_config(agent.config());
        // The task that sends signals and PropertiesChanged ends with the feed.
        let signals = dbus::serve(&connection, handle, access).await?;
        Ok(UserSide {
            feed,
            _signals: signals,
            _connection: connection,
        })
    }
}

/// Keeps the time of the latest check for updates (the broker granted the subscription to
/// the release topics, so it sent the retained releases) in the state directory, for the
/// conformance report's 5.3-5 evidence. Ends with the link.
fn record_checks(link: &Link, state_dir: std::path::PathBuf) {
    let mut status = link.status();
    tokio::spawn(async move {
        let mut recorded = None;
        while status.changed().await.is_ok() {
            let checked = status.borrow_and_update().last_check;
            if let Some(at) = checked
                && checked != recorded
            {
                recorded = checked;
                if let Err(e) = crate::conformance::record_check(&state_dir, at) {
                    tracing::warn!("cannot record the time of the check for updates: {e}");
                }
            }
        }
    });
}

/// The next user call, as an input; never, without the service.
async fn next_call(user: &mut Option<UserSide>) -> Input {
    match user {
        Some(user) => user.feed.next_call().await,
        None => std::future::pending().await,
    }
}

/// The one loop around the engine: inputs from the user (D-Bus), from the operators' source
/// and from the policy's timer, one at a time.
struct Daemon<'a> {
    core: Core,
    operators: Operators<'a>,
    longest_sleep: Duration,
}

/// The engine and the user's side of it, whichever source the operators' releases come from.
struct Core {
    agent: Agent,
    user: Option<UserSide>,
    /// The user asked for a check during the last input (`Action::Check`).
    check_asked: bool,
}

/// Where the releases come from and who, besides the user, hears what the driver does.
enum Operators<'a> {
    /// `update-agent run`: the broker's release topics; the outbox and the retained state.
    Mqtt(Box<Broker<'a>>),
    /// `dbus-serve` and the tests: the owner of a [`fed::Control`] offers releases.
    Fed(fed::Owner),
}

/// What the operators' source brought, with the source, to act on it.
enum Heard<'o, 'a> {
    Broker(&'o mut Broker<'a>, BrokerInput),
    /// `None`: the owner let go of its control.
    Owner(&'o mut fed::Owner, Option<fed::Request>),
}

/// Everyone who hears what the driver does: the operators (outbox, retained state) when they
/// are on MQTT and, when the service runs, the user (D-Bus).
struct Audience<'a> {
    reporter: Option<&'a mut Reporter>,
    feed: Option<&'a mut Feed>,
    check_asked: &'a mut bool,
}

impl Observer for Audience<'_> {
    fn observe(&mut self, output: Output<'_>) {
        if let Output::Check = output {
            *self.check_asked = true;
        }
        if let Some(reporter) = self.reporter.as_deref_mut() {
            reporter.observe(output);
        }
        if let Some(feed) = self.feed.as_deref_mut() {
            feed.observe(output);
        }
    }

    fn interjection(&mut self) -> Option<Input> {
        self.feed.as_deref_mut()?.interjection()
    }
}

impl Daemon<'_> {
    async fn serve(&mut self) -> Result<(), DaemonError> {
        // First finish whatever this boot means: resume an install, run the trial, commit.
        let (agent, mut audience) = self.audience();
        let stop = agent.observe_boot(&mut audience).await?;
        let mut rebooting = self.settle(stop).await?;
        if let Operators::Mqtt(broker) = &mut self.operators {
            broker.schedule_recheck();
        }
        let mut last_tick = None;
        loop {
            // The policy's next moment (a maintenance window opens, a postponement or deadline
            // ends, a scheduled reboot is due): the engine never reads a clock, so the daemon
            // wakes it with a tick then.
            let agent = &self.core.agent;
            let policy_wake = agent.poll_timeout().map(|at| {
                // A moment the engine was already woken for and still names (nothing it can do
                // yet) is looked at again a little later instead of in a busy loop.
                let at = if last_tick == Some(at) {
                    at + POLICY_RETRY
                } else {
                    at
                };
                instant_of(at, agent.now(), self.longest_sleep)
            });
            tokio::select! {
                () = sleep_until_some(policy_wake), if !rebooting => {
                    // Only a moment that was due counts as woken for: a sleep cut short by
                    // the longest sleep ends before it, and must not put it off.
                    let agent = &self.core.agent;
                    last_tick = agent.poll_timeout().filter(|at| *at <= agent.now());
                    let (agent, mut audience) = self.audience();
                    let stop = agent.tick(&mut audience).await?;
                    rebooting = self.settle(stop).await?;
                }
                // Calls are answered also once the reboot command ran (the engine refuses
                // what no longer applies), so no caller waits for a timeout.
                input = next_call(&mut self.core.user) => {
                    let (agent, mut audience) = self.audience();
                    let stop = agent.handle(input, &mut audience).await?;
                    self.operators.refresh(&mut self.core);
                    if !rebooting {
                        rebooting = self.operators.after(&mut self.core, stop).await?;
                    }
                }
                // The operators' source: the broker's releases and timers, or the owner's
                // requests; a fed loop ends when its owner lets go of the control.
                heard = self.operators.next(rebooting) => match heard {
                    Heard::Broker(broker, input) => {
                        // Once the reboot command ran only the periodic check still comes,
                        // and it must not clear `rebooting`.
                        rebooting |= broker.act(&mut self.core, input).await?;
                    }
                    Heard::Owner(owner, Some(request)) => owner.act(&mut self.core, request).await?,
                    Heard::Owner(_, None) => return Ok(()),
                },
            }
        }
    }

    /// The driver and who hears what it does, borrowed side by side.
    fn audience(&mut self) -> (&mut Agent, Audience<'_>) {
        let reporter = self.operators.reporter();
        self.core.audience(reporter)
    }

    /// After an input: the whole state out, then what follows where the engine stopped; true
    /// once the reboot command ran.
    async fn settle(&mut self, stop: Stop) -> Result<bool, DaemonError> {
        self.operators.refresh(&mut self.core);
        self.operators.after(&mut self.core, stop).await
    }
}

impl Core {
    /// The driver and who hears what it does: the user and `reporter`.
    fn audience<'b>(
        &'b mut self,
        reporter: Option<&'b mut Reporter>,
    ) -> (&'b mut Agent, Audience<'b>) {
        let audience = Audience {
            reporter,
            feed: self.user.as_mut().map(|user| &mut user.feed),
            check_asked: &mut self.check_asked,
        };
        (&mut self.agent, audience)
    }

    /// After each input, the user's part: the whole state to the service. True when the user
    /// asked for a check during the input.
    fn publish(&mut self) -> bool {
        if let Some(user) = self.user.as_mut() {
            user.feed.publish(self.agent.engine(), self.agent.config());
        }
        std::mem::take(&mut self.check_asked)
    }
}

impl<'a> Operators<'a> {
    fn reporter(&mut self) -> Option<&mut Reporter> {
        match self {
            Operators::Mqtt(broker) => Some(&mut broker.reporter),
            Operators::Fed(_) => None,
        }
    }

    /// Waits for the source's next input. While the reboot command runs, the broker's
    /// releases and timers wait (the periodic check excepted).
    async fn next(&mut self, rebooting: bool) -> Heard<'_, 'a> {
        match self {
            Operators::Mqtt(broker) => {
                let input = broker.next(rebooting).await;
                Heard::Broker(broker, input)
            }
            Operators::Fed(owner) => {
                let request = owner.next().await;
                Heard::Owner(owner, request)
            }
        }
    }

    /// After each input: the whole state to the operators and to the service; a check the user
    /// asked for runs.
    fn refresh(&mut self, core: &mut Core) {
        match self {
            Operators::Mqtt(broker) => broker.refresh(core),
            Operators::Fed(owner) => owner.refresh(core),
        }
    }

    /// Acts on where the engine stopped; true once the reboot command ran.
    async fn after(&mut self, core: &mut Core, stop: Stop) -> Result<bool, DaemonError> {
        match self {
            Operators::Mqtt(broker) => broker.after(core, stop).await,
            Operators::Fed(owner) => {
                owner.stopped(stop);
                Ok(false)
            }
        }
    }
}
