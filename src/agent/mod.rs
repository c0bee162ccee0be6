//! The driver: owns the outside things (state store, bootloader, slots, network, health checks)
//! and carries out the engine's actions in order. The one-shot commands (`install`,
//! `boot-check`) and the daemon use it; none of the update logic lives here.
//!
//! Slot writes, bootloader changes and the reboot go to a [`SlotControl`]: [`Local`] in this
//! process (root: the one-shot commands, the demo, tests), or the privileged installer over its
//! socket when the configuration has an `[installer]` section (the unprivileged daemon).

use std::fmt;
use std::sync::Arc;

use jiff::Timestamp;

use crate::anchor::{AnchorError, TrustAnchor};
use crate::bootloader;
use crate::config::Config;
use crate::engine::{
    Action, Answer, Bootname, Engine, Event, EventKind, Failure, Input, Job, Notice,
    PersistentState, Phase, Progress, SlotPair,
};
use crate::health;
use crate::installer::RemoteInstaller;
use crate::reason::ReasonCode;
use crate::release::{self, Policy, Refusal, VerifiedRelease};
use crate::slot_control::{Local, RebootError, Release, SlotControl};
use crate::state_store::{Logged, StateStore, StoreError};
use crate::system::{self, SystemError};

mod crash_points;
mod releases;
mod write;

use crash_points::CrashPoints;

/// Whether the driver may reboot the device when the engine asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    /// Run the configured reboot command.
    Run,
    /// Stop and leave the reboot to the caller (`install` without `--reboot`, like `rauc install`).
    Defer,
}

impl RebootMode {
    /// `Run` when the command line lets the agent reboot, else `Defer`.
    pub fn run_if(allowed: bool) -> RebootMode {
        if allowed {
            RebootMode::Run
        } else {
            RebootMode::Defer
        }
    }
}

/// When an accepted release installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installs {
    /// When the policy lets it: automatic install, maintenance windows, postponement (a
    /// release the fleet offered).
    AsThePolicyAllows,
    /// Now, as the user asked (`update-agent install`): the policy's windows, postponement and
    /// automatic-install setting do not hold it back.
    Now,
}

/// What the driver tells its observer: the engine's actions other than jobs, in the engine's
/// order, as they are carried out.
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// The engine's state was just saved (it comes before the events it explains). The daemon
    /// publishes it; the one-shot commands do not need it.
    Persisted(&'a PersistentState),
    /// An event, once it is in the local event log.
    Event(&'a Event),
    Progress(&'a Progress),
    /// What the user is to be told (D-Bus signals).
    Notice(&'a Notice),
    /// The engine's answer to a user request, as soon as it is durable (before any job the
    /// request started runs).
    Answer(&'a Answer),
    /// The user asked for a check for new releases; the release source is the caller's.
    Check,
}

/// What the caller sees while the driver works.
pub trait Observer: Send {
    /// One output; each observer takes what concerns it and passes over the rest.
    fn observe(&mut self, output: Output<'_>);
    /// A user request that arrived while a job runs, to be handled between two of its steps
    /// (so that a D-Bus caller is answered during a slot write, not after it).
    fn interjection(&mut self) -> Option<Input> {
        None
    }
}

/// Where the driver reads the time: the system clock, or a test's fake one.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    Bootloader(#[from] bootloader::BootloaderError),
    #[error(
        "with [installer] in the config the agent runs as the installer's daemon_user, {expected}, \
         not as {actual}: the state it keeps must stay the daemon's, and the installer serves no \
         one else. As root: `runuser -u {name} -- update-agent …`"
    )]
    WrongUser {
        expected: String,
        actual: String,
        name: String,
    },
    #[error("[installer] daemon_user {0:?} is neither a user on this system nor a numeric uid")]
    UnknownUser(String),
    #[error("cannot reboot with {command:?}: {message}")]
    Reboot {
        command: Vec<String>,
        message: String,
    },
}

/// Where the driver stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Nothing left to do until something new arrives.
    Idle,
    /// The engine asked for a reboot and the reboot mode deferred it.
    RebootNeeded { slot: String },
    /// The reboot command was run.
    Rebooting,
}

/// A bootloader change the engine asked for.
#[derive(Debug, Clone, Copy)]
enum BootChange {
    Bad,
    Active,
    Good,
}

pub struct Agent {
    config: Config,
    anchor: TrustAnchor,
    store: StateStore,
    /// Who carries out slot writes, bootloader changes and the reboot.
    control: Box<dyn SlotControl>,
    engine: Engine,
    /// This process owns the state directory while the agent lives: never two writers.
    _lock: crate::state_store::StateLock,
    reboot: RebootMode,
    crash: CrashPoints,
    clock: Clock,
    /// The reboot command failed in [`RebootMode::Run`]: reported to the engine, then returned
    /// by `drive`.
    reboot_failed: Option<AgentError>,
}

/// The id a device's rollout moment and download jitter are drawn from: its MQTT device id, or
/// (a device without MQTT, whose releases come from `install`) the compatible string.
fn device_id(config: &Config) -> String {
    match &config.mqtt {
        Some(mqtt) => mqtt.device_id.clone(),
        None => config.device.compatible.clone(),
    }
}

impl Agent {
    pub fn open(config: Config, reboot: RebootMode) -> Result<Agent, AgentError> {
        let anchor = config.trust.anchor()?;
        // Before anything in the state directory is created or read.
        if let Some(installer) = &config.installer {
            check_daemon_user(installer)?;
        }
        let store = StateStore::open(&config.device.state_dir)?;
        let lock = store.lock()?;
        let state = store.load()?;
        let control: Box<dyn SlotControl> = match &config.installer {
            // The daemon's user can neither open the environment nor the slots: it never tries.
            Some(installer) => Box::new(RemoteInstaller::new(&installer.socket)),
            None => Box::new(Local::open(&config)?),
        };
        let slots = SlotPair {
            class: config.slots.class.clone(),
            bootnames: [
                config.slots.a.bootname.clone(),
                config.slots.b.bootname.clone(),
            ],
        };
        Ok(Agent {
            engine: Engine::new(slots, state)
                .with_factory_version(config.device.factory_version.clone())
                .with_policy(config.policy.engine_policy())
                .with_device_id(device_id(&config)),
            config,
            anchor,
            store,
            _lock: lock,
            control,
            reboot,
            crash: CrashPoints::from_env(),
            clock: Arc::new(Timestamp::now),
            reboot_failed: None,
        })
    }

    /// Reads the time from `clock` instead of the system clock: tests inject time. A device
    /// build has no way to set it.
    #[cfg(feature = "test-hooks")]
    pub fn with_clock(mut self, clock: Clock) -> Agent {
        self.clock = clock;
        self
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the engine wants [`Agent::tick`] (see `Engine::poll_timeout`).
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.engine.poll_timeout()
    }

    /// Time passed: lets the engine start what the policy now allows.
    pub async fn tick(&mut self, observer: &mut dyn Observer) -> Result<Stop, AgentError> {
        self.drive(Input::Tick, observer).await
    }

    /// Feeds one input (a user request, typically) and carries out what follows.
    pub async fn handle(
        &mut self,
        input: Input,
        observer: &mut dyn Observer,
    ) -> Result<Stop, AgentError> {
        self.drive(input, observer).await
    }

    /// Tells the engine which boot this is; it resumes or finishes whatever a restart, power
    /// cut or reboot interrupted.
    pub async fn observe_boot(&mut self, observer: &mut dyn Observer) -> Result<Stop, AgentError> {
        let boot_id = system::boot_id(&self.config)?;
        let booted = system::booted_slot(&self.config)?;
        self.drive(Input::BootObserved { boot_id, booted }, observer)
            .await
    }

    /// The device's acceptance policy now: the configured floor or the one raised by commits.
    pub fn policy(&self) -> Policy {
        Policy {
            threshold: self.config.trust.threshold,
            compatible: Some(self.config.device.compatible.clone()),
            floor: self.config.trust.floor.max(self.engine.state().floor),
            now: self.now(),
        }
    }

    pub fn verify(&self, release: &[u8]) -> Result<VerifiedRelease, Refusal> {
        release::verify(release, &self.anchor, &self.policy())
    }

    /// Verifies a release and, when the device may act on it, accepts it, to install when
    /// `when` says. A refusal is reported like every other outcome and returned.
    pub async fn accept_release(
        &mut self,
        release: &[u8],
        when: Installs,
        observer: &mut dyn Observer,
    ) -> Result<Result<Stop, Refusal>, AgentError> {
        match self.verify(release) {
            Ok(verified) => {
                self.remember_release(&verified);
                // The engine refuses some verified releases too (rolled back before, another
                // transaction in progress): those are returned like the verifier's refusals.
                let mut noted = NoteRefusal {
                    inner: observer,
                    refusal: None,
                };
                let verified = Box::new(verified);
                let input = match when {
                    Installs::Now => Input::UserInstall(verified),
                    Installs::AsThePolicyAllows => Input::ReleaseVerified(verified),
                };
                let stop = self.drive(input, &mut noted).await?;
                Ok(match noted.refusal {
                    Some(refusal) => Err(refusal),
                    None => Ok(stop),
                })
            }
            Err(refusal) => {
                self.report_refusal(&refusal, observer).await?;
                Ok(Err(refusal))
            }
        }
    }

    /// Hands a release that passed [`Agent::verify`] to the engine, which installs it unless
    /// it is already installed, in progress, or rolled back before.
    pub async fn offer_verified(
        &mut self,
        verified: VerifiedRelease,
        observer: &mut dyn Observer,
    ) -> Result<Stop, AgentError> {
        self.remember_release(&verified);
        self.drive(Input::ReleaseVerified(Box::new(verified)), observer)
            .await
    }

    /// Records and reports a refused release (the daemon rate-limits these before calling).
    pub async fn report_refusal(
        &mut self,
        refusal: &Refusal,
        observer: &mut dyn Observer,
    ) -> Result<(), AgentError> {
        if refusal.code.is_tamper_alert() {
            crate::logging::tamper_alert(refusal.code, format_args!("{}", refusal.message));
        }
        self.drive(
            Input::ReleaseRefused {
                reason: refusal.code,
                message: refusal.message.clone(),
            },
            observer,
        )
        .await?;
        Ok(())
    }

    /// Feeds one input and carries out the resulting actions, and the actions their results
    /// lead to, until the engine waits for something from outside.
    async fn drive(
        &mut self,
        input: Input,
        observer: &mut dyn Observer,
    ) -> Result<Stop, AgentError> {
        let mut next = Some(input);
        let mut stop = Stop::Idle;
        while let Some(input) = next.take() {
            let now = self.now();
            for action in self.engine.handle(input, now) {
                if let Some(result) = self.act(action, observer, &mut stop).await? {
                    next = Some(result);
                }
            }
        }
        if let Some(err) = self.reboot_failed.take() {
            return Err(err);
        }
        Ok(stop)
    }

    async fn act(
        &mut self,
        action: Action,
        observer: &mut dyn Observer,
        stop: &mut Stop,
    ) -> Result<Option<Input>, AgentError> {
        Ok(match action {
            Action::Persist => {
                let phase = self.engine.state().phase.name();
                self.crash.point(&format!("persist:{phase}:before"));
                self.store.save(self.engine.state())?;
                self.crash.point(&format!("persist:{phase}:after"));
                observer.observe(Output::Persisted(self.engine.state()));
                None
            }
            Action::Report(event) => {
                self.report(&event, observer);
                None
            }
            Action::ReportProgress(progress) => {
                observer.observe(Output::Progress(&progress));
                None
            }
            Action::Notify(notice) => {
                observer.observe(Output::Notice(&notice));
                None
            }
            Action::Answer(answer) => {
                observer.observe(Output::Answer(&answer));
                None
            }
            Action::Check => {
                observer.observe(Output::Check);
                None
            }
            Action::Run(job) => self.run(job, observer, stop).await?,
        })
    }

    /// Carries out one job; its answer is the next input (a reboot is answered by the next
    /// boot instead).
    async fn run(
        &mut self,
        job: Job,
        observer: &mut dyn Observer,
        stop: &mut Stop,
    ) -> Result<Option<Input>, AgentError> {
        let result = match &job {
            Job::PrepareTarget { slot } => {
                self.bootloader_op("prepare", slot, BootChange::Bad).await
            }
            Job::Write {
                slot,
                image,
                resume_from,
            } => {
                self.write(slot, (**image).clone(), *resume_from, observer)
                    .await
            }
            Job::Activate { slot } => {
                self.bootloader_op("activate", slot, BootChange::Active)
                    .await
            }
            Job::MarkGood { slot } => {
                self.bootloader_op("mark-good", slot, BootChange::Good)
                    .await
            }
            Job::MarkBad { slot } => self.bootloader_op("mark-bad", slot, BootChange::Bad).await,
            Job::CheckHealth => {
                self.crash.point("health:before");
                let result = health::run_checks(&self.config.health).await;
                self.crash.point("health:after");
                result
            }
            Job::Reboot => {
                let slot = match &self.engine.state().phase {
                    Phase::RebootPending { txn, .. } => txn.to_slot.to_string(),
                    _ => self
                        .engine
                        .booted()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                self.crash.point("reboot:before");
                return Ok(match self.reboot {
                    RebootMode::Defer => {
                        *stop = Stop::RebootNeeded { slot };
                        None
                    }
                    RebootMode::Run => match self.reboot() {
                        Ok(()) => {
                            *stop = Stop::Rebooting;
                            None
                        }
                        // Reported (an event with its reason) before the caller hears of it.
                        Err(err) => {
                            let failure = reboot_failure(&err);
                            self.reboot_failed = Some(err);
                            Some(Input::RebootFailed(failure))
                        }
                    },
                });
            }
        };
        Ok(Some(Input::JobDone(job, result)))
    }

    fn report(&mut self, event: &Event, observer: &mut dyn Observer) {
        // The event log is the device's own record; a full disk must not stop an install that
        // is already under way, so a failed append is logged, not fatal.
        match self.store.log_event(event) {
            Ok(Logged::Appended) => {}
            // Reported again after a restart (engine::PersistentState::recent_events), and
            // already told the first time.
            Ok(Logged::AlreadyLogged) => return,
            Err(err) => tracing::error!("cannot record event {}: {err}", event.seq),
        }
        observer.observe(Output::Event(event));
    }

    async fn bootloader_op(
        &mut self,
        name: &str,
        slot: &Bootname,
        change: BootChange,
    ) -> Result<(), Failure> {
        self.crash.point(&format!("bootloader:{name}:before"));
        let result = match change {
            BootChange::Bad => self.control.mark_bad(slot).await,
            BootChange::Good => self.control.mark_good(slot).await,
            BootChange::Active => self.activate(slot).await,
        };
        if let Err(failure) = &result {
            // Some of these failures end no transaction (the running slot's mark-good at an
            // idle boot), so the journal must hear of every one.
            tracing::error!(
                "bootloader {name} of slot {slot} failed: {}",
                failure.message
            );
        }
        self.crash.point(&format!("bootloader:{name}:after"));
        result
    }

    /// The slot is activated only when it holds the image of the transaction's signed release,
    /// verified again now, never on the state's word.
    async fn activate(&mut self, slot: &Bootname) -> Result<(), Failure> {
        let (signed, verified) = self.transaction_release()?;
        let image = self.signed_image(&verified)?;
        let release = Release {
            signed: &signed,
            id: verified.release_id(),
            image: &image,
        };
        self.control.activate(slot, release).await
    }

    /// Reports that the reboot the engine asked for failed (`reboot-failed`, an event for the
    /// operators and the user); the transaction still waits for its reboot.
    pub async fn report_reboot_failed(
        &mut self,
        err: &AgentError,
        observer: &mut dyn Observer,
    ) -> Result<(), AgentError> {
        self.drive(Input::RebootFailed(reboot_failure(err)), observer)
            .await
            .map(drop)
    }

    /// Runs the configured reboot command (for callers that deferred the reboot and are now
    /// ready for it, like the daemon once its outbox is flushed).
    pub fn reboot(&self) -> Result<(), AgentError> {
        self.control
            .reboot()
            .map_err(|RebootError { command, message }| AgentError::Reboot { command, message })
    }
}

fn reboot_failure(err: &AgentError) -> Failure {
    Failure::new(
        ReasonCode::RebootFailed,
        crate::release::escape_for_log(&err.to_string(), 1024),
    )
}

/// Passes everything on and keeps the refusal the engine reported, if any.
struct NoteRefusal<'a> {
    inner: &'a mut dyn Observer,
    refusal: Option<Refusal>,
}

impl Observer for NoteRefusal<'_> {
    fn observe(&mut self, output: Output<'_>) {
        if let Output::Event(event) = output
            && event.kind == EventKind::Refused
        {
            self.refusal = Some(Refusal::new(
                event.reason.unwrap_or(ReasonCode::NotReady),
                event.message.clone().unwrap_or_default(),
            ));
        }
        self.inner.observe(output);
    }

    fn interjection(&mut self) -> Option<Input> {
        self.inner.interjection()
    }
}

/// With the split, the agent must run as the installer's daemon user: as anyone else it would
/// leave files in the state directory the daemon cannot use (root's 0600 `state.json`), and
/// the installer would refuse it anyway.
fn check_daemon_user(installer: &crate::config::InstallerConfig) -> Result<(), AgentError> {
    let (uid, _) = crate::installer::daemon_user(installer)
        .ok_or_else(|| AgentError::UnknownUser(installer.daemon_user.clone()))?;
    let euid = nix::unistd::geteuid();
    if euid == uid {
        return Ok(());
    }
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |user| user.name);
    Err(AgentError::WrongUser {
        expected: crate::state_store::describe_uid(uid.as_raw()),
        actual: crate::state_store::describe_uid(euid.as_raw()),
        name,
    })
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Idle => f.write_str("idle"),
            Stop::RebootNeeded { slot } => write!(f, "reboot needed to try slot {slot}"),
            Stop::Rebooting => f.write_str("rebooting"),
        }
    }
}
