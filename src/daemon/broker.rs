//! The operators on MQTT, as the daemon hears them and reports to them: the release topics
//! (through the intake, with the withdrawal of a pending release), the outbox and the retained
//! state, the periodic re-check, and the reboot after the outbox had its moment.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio::time::Instant;

use super::intake::{Allowance, Intake};
use super::report::Reporter;
use super::withdrawal::{CHECK_GRACE, Offers, Why};
use super::{Core, DaemonError, SIGNAL_FLUSH, sleep_until_some};
use crate::agent::{Agent, Stop};
use crate::engine::Input;
use crate::logging::message_id;
use crate::mqtt::backoff::{jittered, random_unit};
use crate::mqtt::link::{Link, Received};
use crate::mqtt::topics::ReleaseSource;
use crate::outbox::Outbox;
use crate::release::escape_for_log;
use crate::state_store::StateStore;

/// How long the daemon waits for the outbox to reach the broker before a reboot.
const REBOOT_FLUSH: Duration = Duration::from_secs(10);
/// The first wait before a failed reboot command is tried again; it doubles up to
/// [`REBOOT_RETRY_MAX`].
const REBOOT_RETRY_MIN: Duration = Duration::from_secs(10);
const REBOOT_RETRY_MAX: Duration = Duration::from_secs(600);
/// The re-check interval varies by this fraction either way, so a fleet spreads out.
const RECHECK_JITTER: f64 = 0.2;

/// The broker's side of the daemon: the link, the outbox and the state reported, and what
/// the release topics hold.
pub(super) struct Broker<'a> {
    pub(super) reporter: Reporter,
    link: &'a Link,
    outbox: Arc<Mutex<Outbox>>,
    store: StateStore,
    intake: Intake,
    /// What the release topics hold, to tell when the pending release was withdrawn.
    offers: Offers,
    /// When the topics must have answered the latest subscription.
    check_grace: Option<Instant>,
    recheck: Duration,
    /// When the retained releases are looked at again.
    next_check: Instant,
    /// A reboot whose command failed: the slot and when to try again, and the next back-off.
    reboot_retry: Option<(String, Instant)>,
    reboot_backoff: Duration,
}

/// What the broker's side waits for.
pub(super) enum BrokerInput {
    /// Messages on the release topics, with the number of the latest subscription.
    Releases(u64, Vec<Received>),
    /// The topics' time to answer the latest subscription is over.
    CheckGrace,
    /// The time to run a failed reboot command again.
    RebootRetry,
    /// The periodic look at the retained releases.
    Recheck,
}

impl<'a> Broker<'a> {
    pub(super) fn new(
        reporter: Reporter,
        link: &'a Link,
        outbox: Arc<Mutex<Outbox>>,
        store: StateStore,
        recheck: Duration,
    ) -> Broker<'a> {
        Broker {
            reporter,
            link,
            outbox,
            store,
            intake: Intake::default(),
            offers: Offers::default(),
            check_grace: None,
            recheck,
            next_check: Instant::now(),
            reboot_retry: None,
            reboot_backoff: REBOOT_RETRY_MIN,
        }
    }
}

impl Broker<'_> {
    pub(super) async fn next(&mut self, rebooting: bool) -> BrokerInput {
        let reboot_retry = self.reboot_retry.as_ref().map(|(_, at)| *at);
        tokio::select! {
            (check, messages) = self.link.inbox.next(), if !rebooting => {
                BrokerInput::Releases(check, messages)
            }
            () = sleep_until_some(self.check_grace), if !rebooting => BrokerInput::CheckGrace,
            () = sleep_until_some(reboot_retry), if !rebooting => BrokerInput::RebootRetry,
            () = tokio::time::sleep_until(self.next_check) => BrokerInput::Recheck,
        }
    }

    /// Acts on one input; true once the reboot command ran.
    pub(super) async fn act(
        &mut self,
        core: &mut Core,
        input: BrokerInput,
    ) -> Result<bool, DaemonError> {
        match input {
            BrokerInput::Releases(check, messages) => {
                if self.offers.checked(check) {
                    self.check_grace = Some(Instant::now() + CHECK_GRACE);
                }
                for message in messages {
                    let stop = self.receive(core, message).await?;
                    if self.after(core, stop).await? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            BrokerInput::CheckGrace => {
                self.check_answered(core).await?;
                Ok(false)
            }
            BrokerInput::RebootRetry => match self.reboot_retry.take() {
                Some((slot, _)) => self.after(core, Stop::RebootNeeded { slot }).await,
                None => Ok(false),
            },
            BrokerInput::Recheck => {
                self.schedule_recheck();
                tracing::info!("periodic check of the retained releases");
                self.check_releases();
                Ok(false)
            }
        }
    }

    /// The next periodic check, jittered so that a fleet spreads out.
    pub(super) fn schedule_recheck(&mut self) {
        self.next_check = Instant::now() + jittered(self.recheck, RECHECK_JITTER, random_unit());
    }

    /// One message on a release topic: the release is taken (below); then, if the topic held
    /// the pending release and now holds something else that did not supersede it (an empty
    /// message: a halt), the pending release is withdrawn and the replacement looked at on its
    /// own.
    async fn receive(&mut self, core: &mut Core, message: Received) -> Result<Stop, DaemonError> {
        let source = message.source;
        let was = self.offers.holds(source);
        self.offers.heard(&message);
        let cleared = message.payload.is_empty();
        let mut stop = Stop::Idle;
        if cleared {
            tracing::info!("the {} release topic was cleared", source.as_str());
        } else {
            stop = self.take(core, source, &message.payload).await?;
        }
        let pending = pending_release(&core.agent);
        if let Some(why) = self.offers.after_message(source, was, cleared, pending) {
            self.withdraw(core, why).await?;
            if !cleared {
                stop = self.take(core, source, &message.payload).await?;
            }
        }
        Ok(stop)
    }

    /// The grace after a subscription ended: a pending release that no topic answered
    /// with is no longer offered (cleared while this device was offline).
    async fn check_answered(&mut self, core: &mut Core) -> Result<(), DaemonError> {
        if self.link.inbox.has_unread() {
            // Answers wait to be taken (the daemon was busy): take them first.
            self.check_grace = Some(Instant::now() + Duration::from_secs(1));
            return Ok(());
        }
        self.check_grace = None;
        let status = self.link.status().borrow().clone();
        if !status.connected || !status.subscribed {
            // The connection broke before the topics answered, or the broker refused the
            // subscription (logged): nothing can be concluded; the next one is checked anew.
            return Ok(());
        }
        if let Some(why) = self.offers.after_check(pending_release(&core.agent)) {
            self.withdraw(core, why).await?;
        }
        Ok(())
    }

    /// Drops the pending release (`withdrawn`); it is looked at anew if offered again.
    async fn withdraw(&mut self, core: &mut Core, why: Why) -> Result<(), DaemonError> {
        let Some(release_id) = pending_release(&core.agent) else {
            return Ok(());
        };
        tracing::info!(
            "the pending release {} is withdrawn: {why}",
            release_id.short()
        );
        let input = Input::Withdrawn {
            release_id,
            why: why.to_string(),
        };
        let (agent, mut audience) = core.audience(Some(&mut self.reporter));
        agent.handle(input, &mut audience).await?;
        self.refresh(core);
        self.intake.forget_offered();
        Ok(())
    }

    /// One received release: recognised repeat, verified and offered, or refused and reported
    /// within the rate limit.
    async fn take(
        &mut self,
        core: &mut Core,
        source: ReleaseSource,
        payload: &[u8],
    ) -> Result<Stop, DaemonError> {
        let (digest, seen) = self.intake.look(payload);
        if seen {
            tracing::debug!("{} release seen before; nothing to do", source.as_str());
            return Ok(Stop::Idle);
        }
        match core.agent.verify(payload) {
            Ok(verified) => {
                if !self
                    .intake
                    .offer(digest, &verified.release_id().to_string())
                {
                    return Ok(Stop::Idle);
                }
                // The engine would refuse it (`previously-rolled-back`) and report that at
                // every re-check; the rollback itself was reported when it happened.
                if core
                    .agent
                    .engine()
                    .rolled_back_before(&verified.release_id())
                {
                    tracing::info!(
                        "{} release {} rolled back on this device before; not retried",
                        source.as_str(),
                        escape_for_log(&verified.manifest.version, 64)
                    );
                    return Ok(Stop::Idle);
                }
                tracing::info!(
                    "{} release {} verified",
                    source.as_str(),
                    escape_for_log(&verified.manifest.version, 64)
                );
                let (agent, mut audience) = core.audience(Some(&mut self.reporter));
                let stop = agent.offer_verified(verified, &mut audience).await?;
                self.refresh(core);
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
                        let (agent, mut audience) = core.audience(Some(&mut self.reporter));
                        agent.report_refusal(&refusal, &mut audience).await?;
                        self.refresh(core);
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

    /// After each input: the whole state to the operators and to the service; a check the user
    /// asked for runs.
    pub(super) fn refresh(&mut self, core: &mut Core) {
        self.reporter.refresh(core.agent.engine());
        if core.publish() {
            tracing::info!("check for releases asked for over D-Bus");
            self.check_releases();
        }
    }

    /// Looks at the retained releases again (periodically, and when the user asks).
    fn check_releases(&mut self) {
        self.intake.forget_offered();
        self.catch_up();
        self.link.recheck();
    }

    /// Acts on where the engine stopped; true once the reboot command ran.
    pub(super) async fn after(&mut self, core: &mut Core, stop: Stop) -> Result<bool, DaemonError> {
        let Stop::RebootNeeded { slot } = stop else {
            return Ok(false);
        };
        // The user first (DisruptionAhead is on the bus before the device goes down), then
        // the operators.
        if let Some(user) = core.user.as_mut() {
            user.feed.flushed(SIGNAL_FLUSH).await;
        }
        self.flush(REBOOT_FLUSH).await;
        tracing::info!("rebooting to slot {slot}");
        match core.agent.reboot() {
            Ok(()) => {
                self.reboot_retry = None;
                self.reboot_backoff = REBOOT_RETRY_MIN;
                Ok(true)
            }
            // The daemon stays up: the failure is reported, the reboot tried again later, and
            // meanwhile MQTT and D-Bus keep working (a fixing release can still arrive).
            Err(err) => {
                let wait = self.reboot_backoff;
                tracing::error!(
                    message_id = message_id::DAEMON_FAILED,
                    "{err}; trying again in {} s",
                    wait.as_secs()
                );
                let (agent, mut audience) = core.audience(Some(&mut self.reporter));
                agent.report_reboot_failed(&err, &mut audience).await?;
                self.refresh(core);
                self.reboot_retry = Some((slot, Instant::now() + wait));
                self.reboot_backoff = (wait * 2).min(REBOOT_RETRY_MAX);
                Ok(false)
            }
        }
    }

    /// Waits (bounded) until the broker is connected and acknowledged every event: right after a
    /// start the link may not be up yet, and the events before a reboot must reach the
    /// operators first.
    async fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let status = self.link.status();
        while Instant::now() < deadline
            && !(status.borrow().connected && self.outbox.lock().expect("outbox lock").is_empty())
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
            Ok(_) => {
                self.link.publisher().outbox_changed();
                self.reporter.logged(&events);
                self.reporter.publish();
            }
            Err(e) => tracing::error!(message_id = message_id::STORAGE_FAILED, "outbox: {e}"),
        }
    }
}

/// The release pending now (accepted, nothing written), unless a person asked for it.
fn pending_release(agent: &Agent) -> Option<crate::release::ReleaseId> {
    match &agent.engine().state().phase {
        crate::engine::Phase::Pending { txn, .. } if !txn.user_now => Some(txn.release_id),
        _ => None,
    }
}
