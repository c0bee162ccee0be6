//! The D-Bus adapter: `org.updateagent.Agent1` on the system bus, for the person who lives with
//! the device (EN 303 645 5.3-6, 5.3-11/12). Only this module knows the D-Bus types and names.
//!
//! The service owns no engine. The daemon's loop owns it (fed by the broker, or without one by
//! `dbus-serve` and the tests: `daemon::fed`) and hands over a [`Handle`]: a channel for user
//! requests, a `watch` of [`Snapshot`]s (the properties, and `PropertiesChanged` for what
//! changed between two snapshots) and a broadcast of the engine's [`Notice`]s (the signals):
//! `dbus::serve(&connection, handle, access)`. [`feed::Feed`] makes all three from the driver's
//! output.
//!
//! Authorisation has two layers. The bus policy file
//! (`systemd/dbus/org.updateagent.Agent1.conf`) lets only root and the admin group send the
//! mutating methods; and every mutating method asks the bus who called
//! (`GetConnectionCredentials`: uid and groups) and answers
//! `org.freedesktop.DBus.Error.AccessDenied` unless it is root or in `[dbus] admin_group`.
//! Properties and introspection are open to every local user.

pub mod client;
pub mod feed;

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use zbus::message::Header;
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::{Connection, OwnedVariant, interface};

use crate::config::Config;
use crate::engine::{Answer, Engine, Input, Notice, Phase, Postpone, Progress};

pub const BUS_NAME: &str = "org.updateagent.Agent1";
pub const OBJECT_PATH: &str = "/org/updateagent/Agent1";
pub const INTERFACE: &str = "org.updateagent.Agent1";

/// A user request on its way to the engine's owner, with where to send the answer.
pub struct Call {
    pub input: Input,
    pub reply: oneshot::Sender<Answer>,
}

/// What the service needs from the engine's owner.
pub struct Handle {
    pub calls: mpsc::Sender<Call>,
    pub snapshots: watch::Receiver<Snapshot>,
    pub notices: broadcast::Receiver<Notice>,
    /// How many notices the service has sent as signals (or dropped, said in the journal),
    /// so that the owner can wait for them before it reboots.
    pub sent: watch::Sender<u64>,
}

/// Everything the properties show, taken from the engine after each input. Times are seconds
/// since the Unix epoch, 0 for none; strings are empty for none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub state: String,
    /// Bytes written and total while writing; (0, 0) otherwise.
    pub progress: (u64, u64),
    /// Bytes downloaded for the write so far; 0 otherwise (or before any was counted).
    pub downloaded: u64,
    pub booted_slot: String,
    pub current_version: String,
    pub pending_version: String,
    pub pending_advisory: String,
    pub pending_security: bool,
    pub pending_severity: String,
    pub pending_deadline: i64,
    /// (reboot needed, expected downtime in seconds).
    pub pending_disruption: (bool, u64),
    pub auto_install: bool,
    pub postponed_until: i64,
    /// Why the pending release or reboot waits (`window`, `postponed`, `auto-install-off`,
    /// `manual-reboot`).
    pub waiting: String,
    /// When the reboot into the new slot is due (`reboot-scheduled`).
    pub reboot_at: i64,
    /// (reason code, message) of the last failure or refusal.
    pub last_error: (String, String),
    pub support_end: String,
    pub model: String,
    pub compatible: String,
    /// EN 303 645 §5.3 in short, and `provision:finding` for what this build and configuration
    /// weaken, separated by spaces (the start-up assessment; empty when the owner made none).
    pub conformance: (String, String),
}

impl Snapshot {
    pub fn of(engine: &Engine, config: &Config) -> Snapshot {
        let state = engine.state();
        let mut snapshot = Snapshot {
            state: state.phase.name().to_string(),
            booted_slot: engine.booted().map(ToString::to_string).unwrap_or_default(),
            current_version: engine.booted_version().unwrap_or_default().to_string(),
            auto_install: engine.auto_install(),
            postponed_until: seconds(state.user.postponed_until),
            support_end: config
                .device
                .support_end
                .map(|d| d.to_string())
                .unwrap_or_default(),
            model: config.device.model.clone().unwrap_or_default(),
            compatible: config.device.compatible.clone(),
            ..Snapshot::default()
        };
        if let Some(txn) = state.phase.transaction() {
            let m = &txn.manifest;
            snapshot.pending_version = m.version.clone();
            snapshot.pending_advisory = m.advisory.clone();
            snapshot.pending_security = m.security;
            snapshot.pending_severity = m.severity.as_str().to_string();
            snapshot.pending_deadline = seconds(m.deadline);
            snapshot.pending_disruption = (m.disruption.reboot, m.disruption.downtime_seconds);
        }
        match &state.phase {
            Phase::Pending { waiting, .. } => snapshot.waiting = waiting.as_str().to_string(),
            Phase::RebootScheduled { waiting, at, .. } => {
                snapshot.waiting = waiting.as_str().to_string();
                snapshot.reboot_at = seconds(*at);
            }
            _ => {}
        }
        if let Some(last) = &state.last
            && let Some(reason) = last.reason
        {
            snapshot.last_error = (reason.to_string(), last.message.clone().unwrap_or_default());
        }
        snapshot
    }

    pub fn with_progress(mut self, progress: Option<&Progress>) -> Snapshot {
        self.progress = progress.map(|p| (p.done, p.total)).unwrap_or_default();
        self.downloaded = progress.and_then(|p| p.downloaded).unwrap_or_default();
        self
    }
}

fn seconds(at: Option<Timestamp>) -> i64 {
    at.map(|t| t.as_second()).unwrap_or(0)
}

/// Who may change things: root and the members of `group`.
#[derive(Debug, Clone)]
pub struct Access {
    group: Option<(String, u32)>,
}

impl Access {
    /// Resolves `[dbus] admin_group`. A group that does not exist grants nothing (root only),
    /// and says so in the journal.
    pub fn from_config(config: &Config) -> Access {
        let group = config.dbus.admin_group.as_ref().and_then(|name| {
            match nix::unistd::Group::from_name(name) {
                Ok(Some(group)) => Some((name.clone(), group.gid.as_raw())),
                _ => {
                    tracing::warn!(
                        "dbus.admin_group {name:?} does not exist: only root may change updates over D-Bus"
                    );
                    None
                }
            }
        });
        Access { group }
    }

    pub fn root_and_gid(name: &str, gid: u32) -> Access {
        Access {
            group: Some((name.to_string(), gid)),
        }
    }

    fn allows(&self, uid: u32, groups: &[u32]) -> bool {
        uid == 0
            || self
                .group
                .as_ref()
                .is_some_and(|(_, gid)| groups.contains(gid))
    }

    fn who(&self) -> String {
        match &self.group {
            Some((name, _)) => format!("root or members of group {name}"),
            None => "root".to_string(),
        }
    }
}

/// The errors the methods answer with. D-Bus error names are fixed per variant; the prefix
/// is split so that one enum can name both the standard AccessDenied and our own errors.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Not root and not in the admin group (the service's own check).
    #[zbus(name = "freedesktop.DBus.Error.AccessDenied")]
    AccessDenied(String),
    /// The engine refused the request: `<reason-code>: <sentence>`.
    #[zbus(name = "updateagent.Agent1.Error.Refused")]
    Refused(String),
    /// The engine's owner stopped.
    #[zbus(name = "updateagent.Agent1.Error.Unavailable")]
    Unavailable(String),
}

/// The error name clients see for refusals.
pub const ERROR_REFUSED: &str = "org.updateagent.Agent1.Error.Refused";
pub const ERROR_ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";

struct Agent1 {
    calls: mpsc::Sender<Call>,
    snapshot: watch::Receiver<Snapshot>,
    access: Access,
}

impl Agent1 {
    async fn authorise(&self, header: &Header<'_>, conn: &Connection) -> Result<(), Error> {
        let sender = header
            .sender()
            .ok_or_else(|| Error::AccessDenied("the call has no sender".into()))?;
        // Read as a plain dictionary (the one `GetAll` of the CLI also uses): zbus's typed
        // `ConnectionCredentials` brings a decoder for each of its optional fields.
        let mut credentials: HashMap<String, OwnedVariant> = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetConnectionCredentials",
                &(sender.as_str(),),
            )
            .await
            .and_then(|reply| reply.body().deserialize())
            .map_err(|e| Error::AccessDenied(format!("cannot learn who called: {e}")))?;
        let uid: u32 = credentials
            .get("UnixUserID")
            .and_then(|id| id.downcast_ref().ok())
            .ok_or_else(|| Error::AccessDenied("the bus does not say who called".into()))?;
        // The bus gives the caller's groups (SO_PEERGROUPS); an older bus does not, and then
        // the user database's groups of the uid count.
        let groups: Vec<u32> = match credentials.remove("UnixGroupIDs") {
            Some(groups) => Vec::try_from(groups).map_err(|e| {
                Error::AccessDenied(format!("cannot read the caller's groups: {e}"))
            })?,
            None => user_groups(uid),
        };
        if self.access.allows(uid, &groups) {
            Ok(())
        } else {
            Err(Error::AccessDenied(format!(
                "update-agent: changing updates needs {}; uid {uid} is not allowed",
                self.access.who()
            )))
        }
    }

    async fn call(
        &self,
        input: Input,
        header: &Header<'_>,
        conn: &Connection,
    ) -> Result<Answer, Error> {
        self.authorise(header, conn).await?;
        let (reply, answer) = oneshot::channel();
        let gone = || Error::Unavailable("the update agent is stopping".into());
        self.calls
            .send(Call { input, reply })
            .await
            .map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Answer::Refused(failure) => Err(Error::Refused(format!(
                "{}: {}",
                failure.reason, failure.message
            ))),
            answer => Ok(answer),
        }
    }

    async fn done(
        &self,
        input: Input,
        header: &Header<'_>,
        conn: &Connection,
    ) -> Result<(), Error> {
        self.call(input, header, conn).await.map(|_| ())
    }

    async fn postponed(
        &self,
        postpone: Postpone,
        header: &Header<'_>,
        conn: &Connection,
    ) -> Result<(i64, String), Error> {
        match self
            .call(Input::UserPostpone(postpone), header, conn)
            .await?
        {
            Answer::Postponed { until, clamped, .. } => Ok((
                until.as_second(),
                clamped.map(|c| c.as_str().to_string()).unwrap_or_default(),
            )),
            other => Err(Error::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    fn snap(&self) -> watch::Ref<'_, Snapshot> {
        self.snapshot.borrow()
    }
}

#[interface(name = "org.updateagent.Agent1")]
impl Agent1 {
    /// Postpones installing and rebooting by `seconds`. Returns the time in force (seconds
    /// since the epoch) and what clamped it: "", "max-postpone" or "deadline".
    #[zbus(out_args("until", "clamped"))]
    async fn postpone(
        &self,
        seconds: u64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(i64, String), Error> {
        let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
        let duration = SignedDuration::from_secs(seconds);
        self.postponed(Postpone::For(duration), &header, conn).await
    }

    /// Postpones until `until` (seconds since the epoch); returns as `Postpone`.
    #[zbus(out_args("until", "clamped"))]
    async fn postpone_until(
        &self,
        until: i64,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(i64, String), Error> {
        let until = Timestamp::from_second(until)
            .map_err(|e| Error::Refused(format!("invalid-request: {e}")))?;
        self.postponed(Postpone::Until(until), &header, conn).await
    }

    /// Withdraws a postponement.
    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserResume, &header, conn).await
    }

    /// Switches automatic install on or off (off: updates are announced, not installed).
    async fn set_auto_install(
        &self,
        on: bool,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserSetAutoInstall(on), &header, conn)
            .await
    }

    /// Installs the pending release now, or reboots into the installed one now.
    async fn install_now(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserInstallNow, &header, conn).await
    }

    /// Looks for new releases now.
    async fn check_now(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserCheckNow, &header, conn).await
    }

    /// Marks the booted slot good.
    async fn mark_good(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserMark { good: true }, &header, conn)
            .await
    }

    /// Marks the other (not booted) slot bad.
    async fn mark_bad(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        self.done(Input::UserMark { good: false }, &header, conn)
            .await
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.snap().state.clone()
    }

    /// (bytes written, bytes in total) while writing.
    #[zbus(property)]
    fn progress(&self) -> (u64, u64) {
        self.snap().progress
    }

    /// Bytes downloaded for the write so far (a delta update's are far fewer than it writes);
    /// 0 when not writing.
    #[zbus(property)]
    fn downloaded(&self) -> u64 {
        self.snap().downloaded
    }

    #[zbus(property)]
    fn booted_slot(&self) -> String {
        self.snap().booted_slot.clone()
    }

    #[zbus(property)]
    fn current_version(&self) -> String {
        self.snap().current_version.clone()
    }

    #[zbus(property)]
    fn pending_version(&self) -> String {
        self.snap().pending_version.clone()
    }

    #[zbus(property)]
    fn pending_advisory(&self) -> String {
        self.snap().pending_advisory.clone()
    }

    #[zbus(property)]
    fn pending_security(&self) -> bool {
        self.snap().pending_security
    }

    #[zbus(property)]
    fn pending_severity(&self) -> String {
        self.snap().pending_severity.clone()
    }

    #[zbus(property)]
    fn pending_deadline(&self) -> i64 {
        self.snap().pending_deadline
    }

    /// (reboot needed, expected downtime in seconds).
    #[zbus(property)]
    fn pending_disruption(&self) -> (bool, u64) {
        self.snap().pending_disruption
    }

    #[zbus(property)]
    fn auto_install(&self) -> bool {
        self.snap().auto_install
    }

    #[zbus(property)]
    fn postponed_until(&self) -> i64 {
        self.snap().postponed_until
    }

    #[zbus(property)]
    fn waiting(&self) -> String {
        self.snap().waiting.clone()
    }

    #[zbus(property)]
    fn reboot_at(&self) -> i64 {
        self.snap().reboot_at
    }

    /// (reason code, message) of the last failure or refusal.
    #[zbus(property)]
    fn last_error(&self) -> (String, String) {
        self.snap().last_error.clone()
    }

    #[zbus(property)]
    fn support_end(&self) -> String {
        self.snap().support_end.clone()
    }

    #[zbus(property)]
    fn model(&self) -> String {
        self.snap().model.clone()
    }

    #[zbus(property)]
    fn compatible(&self) -> String {
        self.snap().compatible.clone()
    }

    /// ETSI EN 303 645 §5.3 for this build and configuration: a one-line summary, and
    /// `provision:finding` for each weakened or unmet provision, separated by spaces (e.g.
    /// `5.3-6:auto-install-off 5.3-10:plain-mqtt`). The same D-Bus type as `LastError`.
    #[zbus(property)]
    fn conformance(&self) -> (String, String) {
        self.snap().conformance.clone()
    }

    /// A release was accepted: its version, what it fixes, whether it is a security release,
    /// its severity and its deadline (0: none).
    #[zbus(signal)]
    async fn update_available(
        emitter: &SignalEmitter<'_>,
        version: &str,
        advisory: &str,
        security: bool,
        severity: &str,
        deadline: i64,
    ) -> zbus::Result<()>;

    /// The device reboots in `seconds`; `postponable` when a postponement can still move it.
    #[zbus(signal)]
    async fn disruption_ahead(
        emitter: &SignalEmitter<'_>,
        seconds: u64,
        postponable: bool,
        downtime_seconds: u64,
    ) -> zbus::Result<()>;

    /// A transaction ended: `committed`, `failed` or `rolled-back`, with its reason code.
    #[zbus(signal)]
    async fn completed(
        emitter: &SignalEmitter<'_>,
        result: &str,
        version: &str,
        reason: &str,
    ) -> zbus::Result<()>;
}

/// Registers the object at [`OBJECT_PATH`], takes [`BUS_NAME`], and starts the task that
/// turns snapshots into `PropertiesChanged` and notices into signals. The task ends when the
/// owner drops its snapshot sender.
pub async fn serve(
    conn: &Connection,
    handle: Handle,
    access: Access,
) -> zbus::Result<tokio::task::JoinHandle<()>> {
    let iface = Agent1 {
        calls: handle.calls,
        snapshot: handle.snapshots.clone(),
        access,
    };
    conn.object_server().at(OBJECT_PATH, iface).await?;
    conn.request_name(BUS_NAME).await?;
    let iface: InterfaceRef<Agent1> = conn.object_server().interface(OBJECT_PATH).await?;
    Ok(tokio::spawn(publish(
        iface,
        handle.snapshots,
        handle.notices,
        handle.sent,
    )))
}

async fn publish(
    iface: InterfaceRef<Agent1>,
    mut snapshots: watch::Receiver<Snapshot>,
    mut notices: broadcast::Receiver<Notice>,
    sent: watch::Sender<u64>,
) {
    let mut last = snapshots.borrow_and_update().clone();
    loop {
        tokio::select! {
            // Signals first: a notice is sent before the snapshot of the state it announces.
            biased;
            notice = notices.recv() => match notice {
                Ok(notice) => {
                    if let Err(err) = signal(&iface, &notice).await {
                        tracing::warn!("cannot send D-Bus signal: {err}");
                    }
                    sent.send_modify(|sent| *sent += 1);
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("{n} D-Bus signals were dropped: the bus is too slow");
                    sent.send_modify(|sent| *sent += n);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = snapshots.borrow_and_update().clone();
                if let Err(err) = properties_changed(&iface, &last, &now).await {
                    tracing::warn!("cannot send PropertiesChanged: {err}");
                }
                last = now;
            }
        }
    }
}

async fn signal(iface: &InterfaceRef<Agent1>, notice: &Notice) -> zbus::Result<()> {
    let emitter = iface.signal_emitter();
    match notice {
        Notice::UpdateAvailable {
            version,
            advisory,
            security,
            severity,
            deadline,
            ..
        } => {
            Agent1::update_available(
                emitter,
                version,
                advisory,
                *security,
                severity.as_str(),
                seconds(*deadline),
            )
            .await
        }
        Notice::DisruptionAhead {
            seconds,
            postponable,
            downtime_seconds,
            ..
        } => Agent1::disruption_ahead(emitter, *seconds, *postponable, *downtime_seconds).await,
        Notice::Completed {
            result,
            version,
            reason,
            ..
        } => {
            let reason = reason.map(|r| r.as_str()).unwrap_or_default();
            Agent1::completed(emitter, result.as_str(), version, reason).await
        }
    }
}

async fn properties_changed(
    iface: &InterfaceRef<Agent1>,
    old: &Snapshot,
    new: &Snapshot,
) -> zbus::Result<()> {
    use zbus::{Structure, Variant};
    // One `PropertiesChanged` with every property that changed (a pair is a D-Bus struct, as
    // its getter answers it), rather than zbus's `<property>_changed` one signal each: the
    // same information in one message, and one encoder instead of twenty.
    let mut changed: HashMap<&str, Variant<'_>> = HashMap::new();
    macro_rules! changed {
        ($($field:ident => $name:literal),* $(,)?) => {
            $(if old.$field != new.$field {
                changed.insert($name, new.$field.variant());
            })*
        };
    }
    /// A snapshot field as its property's D-Bus value.
    trait Value {
        fn variant(&self) -> Variant<'_>;
    }
    impl Value for String {
        fn variant(&self) -> Variant<'_> {
            Variant::from(self.as_str())
        }
    }
    macro_rules! plain {
        ($($t:ty),*) => {$(impl Value for $t {
            fn variant(&self) -> Variant<'_> {
                Variant::from(*self)
            }
        })*};
    }
    plain!(bool, u64, i64);
    impl Value for (u64, u64) {
        fn variant(&self) -> Variant<'_> {
            Variant::from(Structure::from(*self))
        }
    }
    impl Value for (bool, u64) {
        fn variant(&self) -> Variant<'_> {
            Variant::from(Structure::from(*self))
        }
    }
    impl Value for (String, String) {
        fn variant(&self) -> Variant<'_> {
            Variant::from(Structure::from((self.0.as_str(), self.1.as_str())))
        }
    }
    changed!(
        state => "State",
        progress => "Progress",
        downloaded => "Downloaded",
        booted_slot => "BootedSlot",
        current_version => "CurrentVersion",
        pending_version => "PendingVersion",
        pending_advisory => "PendingAdvisory",
        pending_security => "PendingSecurity",
        pending_severity => "PendingSeverity",
        pending_deadline => "PendingDeadline",
        pending_disruption => "PendingDisruption",
        auto_install => "AutoInstall",
        postponed_until => "PostponedUntil",
        waiting => "Waiting",
        reboot_at => "RebootAt",
        last_error => "LastError",
        support_end => "SupportEnd",
        model => "Model",
        compatible => "Compatible",
        conformance => "Conformance",
    );
    if changed.is_empty() {
        return Ok(());
    }
    let interface = zbus::names::InterfaceName::from_static_str_unchecked(INTERFACE);
    zbus::fdo::Properties::properties_changed(
        iface.signal_emitter(),
        interface,
        changed,
        std::borrow::Cow::Borrowed(&[]),
    )
    .await
}

/// The groups of `uid` in the user database (when the bus does not tell the caller's).
fn user_groups(uid: u32) -> Vec<u32> {
    use nix::unistd::{Uid, User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return Vec::new();
    };
    getgrouplist(&name, user.gid)
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}
