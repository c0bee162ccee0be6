//! The client side of `org.updateagent.Agent1`, for the CLI (`update-agent status`, `postpone`,
//! …) and the tests: a typed proxy, the status as one serialisable record, and the mapping of
//! D-Bus errors to what a person should read.

use serde::Serialize;
use zbus::Connection;

use crate::dbus::{BUS_NAME, ERROR_ACCESS_DENIED, ERROR_REFUSED};

#[zbus::proxy(
    interface = "org.updateagent.Agent1",
    default_service = "org.updateagent.Agent1",
    default_path = "/org/updateagent/Agent1"
)]
pub trait Agent1 {
    fn postpone(&self, seconds: u64) -> zbus::Result<(i64, String)>;
    fn postpone_until(&self, until: i64) -> zbus::Result<(i64, String)>;
    fn resume(&self) -> zbus::Result<()>;
    fn set_auto_install(&self, on: bool) -> zbus::Result<()>;
    fn install_now(&self) -> zbus::Result<()>;
    fn check_now(&self) -> zbus::Result<()>;
    fn mark_good(&self) -> zbus::Result<()>;
    fn mark_bad(&self) -> zbus::Result<()>;

    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<(u64, u64)>;
    #[zbus(property)]
    fn downloaded(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn booted_slot(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn current_version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pending_version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pending_advisory(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pending_security(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn pending_severity(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pending_deadline(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn pending_disruption(&self) -> zbus::Result<(bool, u64)>;
    #[zbus(property)]
    fn auto_install(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn postponed_until(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn waiting(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn reboot_at(&self) -> zbus::Result<i64>;
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<(String, String)>;
    #[zbus(property)]
    fn support_end(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn model(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn compatible(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn update_available(
        &self,
        version: String,
        advisory: String,
        security: bool,
        severity: String,
        deadline: i64,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn disruption_ahead(
        &self,
        seconds: u64,
        postponable: bool,
        downtime_seconds: u64,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    fn completed(&self, result: String, version: String, reason: String) -> zbus::Result<()>;
}

/// Why a call to the agent did not work, as a person should read it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the update agent is not running (no {BUS_NAME} on the system bus{where_})")]
    NotRunning { where_: String },
    #[error(
        "access denied: {0}. Run it as root or as a member of the admin group (update-admin by default)"
    )]
    AccessDenied(String),
    /// The agent refused: `<reason-code>: <sentence>`.
    #[error("refused: {0}")]
    Refused(String),
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

impl ClientError {
    pub fn from_call(err: zbus::Error) -> ClientError {
        // zbus reports the standard errors as `Error::FDO`, the others by name.
        if let zbus::Error::FDO(fdo) = &err {
            match fdo.as_ref() {
                zbus::fdo::Error::AccessDenied(text) => {
                    return ClientError::AccessDenied(text.clone());
                }
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    return ClientError::NotRunning {
                        where_: String::new(),
                    };
                }
                _ => {}
            }
        }
        if let zbus::Error::MethodError(name, description, _) = &err {
            let text = description.clone().unwrap_or_default();
            match name.as_str() {
                ERROR_ACCESS_DENIED => return ClientError::AccessDenied(text),
                ERROR_REFUSED => return ClientError::Refused(text),
                "org.freedesktop.DBus.Error.ServiceUnknown"
                | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                    return ClientError::NotRunning {
                        where_: String::new(),
                    };
                }
                _ => {}
            }
        }
        ClientError::Bus(err)
    }
}

/// Connects to the system bus (`DBUS_SYSTEM_BUS_ADDRESS` when set) and finds the agent.
pub async fn connect() -> Result<Agent1Proxy<'static>, ClientError> {
    let address = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .map(|a| format!(" at {a}"))
        .unwrap_or_default();
    let not_running = || ClientError::NotRunning {
        where_: address.clone(),
    };
    let conn = zbus::connection::Builder::system()
        .build()
        .await
        .map_err(|_| not_running())?;
    let bus = zbus::fdo::DBusProxy::new(&conn).await?;
    let name = zbus::names::BusName::try_from(BUS_NAME)?;
    if !bus.name_has_owner(name).await.map_err(zbus::Error::from)? {
        return Err(not_running());
    }
    Ok(Agent1Proxy::new(&conn).await?)
}

/// Connects to an agent on `conn` (tests hand in their own bus).
pub async fn proxy(conn: &Connection) -> zbus::Result<Agent1Proxy<'static>> {
    Agent1Proxy::new(conn).await
}

/// Everything the agent shows, as `update-agent status --json` prints it. Times are RFC 3339.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: String,
    pub progress: Option<ProgressOut>,
    pub booted_slot: String,
    pub current_version: String,
    pub model: String,
    pub compatible: String,
    pub support_end: Option<String>,
    pub auto_install: bool,
    pub postponed_until: Option<String>,
    pub pending: Option<PendingOut>,
    pub last_error: Option<ErrorOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgressOut {
    /// Bytes written.
    pub done: u64,
    pub total: u64,
    /// Bytes downloaded, when the agent says (older agents have no such property).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downloaded: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PendingOut {
    pub version: String,
    pub advisory: String,
    pub security: bool,
    pub severity: String,
    pub deadline: Option<String>,
    pub reboot: bool,
    pub downtime_seconds: u64,
    pub waiting: Option<String>,
    pub reboot_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorOut {
    pub reason: String,
    pub message: String,
}

impl Status {
    pub async fn fetch(agent: &Agent1Proxy<'_>) -> zbus::Result<Status> {
        let (done, total) = agent.progress().await?;
        // An agent before the property answers with an error: no count, not a failure.
        let downloaded = agent.downloaded().await.ok().filter(|&d| d > 0);
        let pending_version = agent.pending_version().await?;
        let pending = if pending_version.is_empty() {
            None
        } else {
            let (reboot, downtime_seconds) = agent.pending_disruption().await?;
            Some(PendingOut {
                version: pending_version,
                advisory: agent.pending_advisory().await?,
                security: agent.pending_security().await?,
                severity: agent.pending_severity().await?,
                deadline: time(agent.pending_deadline().await?),
                reboot,
                downtime_seconds,
                waiting: text(agent.waiting().await?),
                reboot_at: time(agent.reboot_at().await?),
            })
        };
        let (reason, message) = agent.last_error().await?;
        Ok(Status {
            state: agent.state().await?,
            progress: (total > 0).then_some(ProgressOut {
                done,
                total,
                downloaded,
            }),
            booted_slot: agent.booted_slot().await?,
            current_version: agent.current_version().await?,
            model: agent.model().await?,
            compatible: agent.compatible().await?,
            support_end: text(agent.support_end().await?),
            auto_install: agent.auto_install().await?,
            postponed_until: time(agent.postponed_until().await?),
            pending,
            last_error: (!reason.is_empty()).then_some(ErrorOut { reason, message }),
        })
    }
}

/// Seconds since the epoch (0: none) as RFC 3339.
pub fn time(seconds: i64) -> Option<String> {
    (seconds != 0)
        .then(|| jiff::Timestamp::from_second(seconds).ok())
        .flatten()
        .map(|t| t.to_string())
}

fn text(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}
