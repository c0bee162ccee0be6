//! The client side of `org.updateagent.Agent1`, for the CLI (`update-agent status`, `postpone`,
//! …): the agent called with plain D-Bus messages, the status as one serialisable record, and
//! the mapping of D-Bus errors to what a person should read. The tests also use a typed proxy
//! (feature `sim`, which turns on zbus's `proxy`): `#[zbus::proxy]` (its property cache, a
//! stream per signal, the proxy builder) cost 129 KiB of the device binary for a handful of
//! calls and one `GetAll`.

use std::collections::HashMap;

use serde::Serialize;
use zbus::{Connection, Message, MessageStream, OwnedVariant, Variant};

use crate::dbus::{BUS_NAME, ERROR_ACCESS_DENIED, ERROR_REFUSED, INTERFACE, OBJECT_PATH};

/// The message bus itself and the standard properties interface.
const DBUS: &str = "org.freedesktop.DBus";
const DBUS_PATH: &str = "/org/freedesktop/DBus";
pub const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

#[cfg(feature = "sim")]
#[zbus::proxy(
    interface = "org.updateagent.Agent1",
    default_service = "org.updateagent.Agent1",
    default_path = "/org/updateagent/Agent1"
)]
pub trait Agent1 {
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;

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

/// Connects to an agent on `conn` through the typed proxy (tests hand in their own bus).
#[cfg(feature = "sim")]
pub async fn proxy(conn: &Connection) -> zbus::Result<Agent1Proxy<'static>> {
    Agent1Proxy::new(conn).await
}

/// The running agent, as the CLI calls it.
pub struct AgentClient {
    conn: Connection,
}

impl AgentClient {
    /// Calls `method` of [`INTERFACE`] with `body` (a tuple of the arguments).
    pub async fn call<B>(&self, method: &str, body: &B) -> zbus::Result<Message>
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        self.conn
            .call_method(Some(BUS_NAME), OBJECT_PATH, Some(INTERFACE), method, body)
            .await
    }

    /// Every property of [`INTERFACE`], with one `GetAll`.
    pub async fn properties(&self) -> zbus::Result<HashMap<String, OwnedVariant>> {
        self.conn
            .call_method(
                Some(BUS_NAME),
                OBJECT_PATH,
                Some(PROPERTIES),
                "GetAll",
                &(INTERFACE,),
            )
            .await?
            .body()
            .deserialize()
    }

    /// The agent's signals, its `PropertiesChanged` among them, in the order it sent them.
    /// The bus matches the sender by [`BUS_NAME`], so an agent that restarts under a new unique
    /// name is still followed (zbus itself cannot check a well-known sender: it only knows the
    /// unique one in the message).
    pub async fn signals(&self) -> zbus::Result<MessageStream> {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(BUS_NAME)
            .path(OBJECT_PATH)
            .build()?;
        MessageStream::for_match_rule(rule, &self.conn, None).await
    }
}

/// The property `name` out of a `GetAll` answer.
pub fn property<'a, T>(properties: &'a HashMap<String, OwnedVariant>, name: &str) -> zbus::Result<T>
where
    T: TryFrom<&'a Variant<'a>>,
    <T as TryFrom<&'a Variant<'a>>>::Error: Into<zbus::Error>,
{
    properties
        .get(name)
        .ok_or_else(|| zbus::Error::Failure(format!("the agent has no property {name}")))?
        .downcast_ref()
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
pub async fn connect() -> Result<AgentClient, ClientError> {
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
    let running: bool = conn
        .call_method(
            Some(DBUS),
            DBUS_PATH,
            Some(DBUS),
            "NameHasOwner",
            &(BUS_NAME,),
        )
        .await?
        .body()
        .deserialize()?;
    if !running {
        return Err(not_running());
    }
    Ok(AgentClient { conn })
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
    pub async fn fetch(agent: &AgentClient) -> zbus::Result<Status> {
        Status::from_properties(&agent.properties().await?)
    }

    /// The status out of the agent's properties (one `GetAll`).
    pub fn from_properties(p: &HashMap<String, OwnedVariant>) -> zbus::Result<Status> {
        let text_of = |name| property::<&str>(p, name).map(str::to_owned);
        let time_of = |name| property::<i64>(p, name).map(time);
        let (done, total): (u64, u64) = property(p, "Progress")?;
        // An agent before the property does not have it: no count, not a failure.
        let downloaded = property::<u64>(p, "Downloaded").ok().filter(|&d| d > 0);
        let pending_version = text_of("PendingVersion")?;
        let pending = if pending_version.is_empty() {
            None
        } else {
            let (reboot, downtime_seconds) = property(p, "PendingDisruption")?;
            Some(PendingOut {
                version: pending_version,
                advisory: text_of("PendingAdvisory")?,
                security: property(p, "PendingSecurity")?,
                severity: text_of("PendingSeverity")?,
                deadline: time_of("PendingDeadline")?,
                reboot,
                downtime_seconds,
                waiting: text(text_of("Waiting")?),
                reboot_at: time_of("RebootAt")?,
            })
        };
        let (reason, message): (String, String) = property(p, "LastError")?;
        Ok(Status {
            state: text_of("State")?,
            progress: (total > 0).then_some(ProgressOut {
                done,
                total,
                downloaded,
            }),
            booted_slot: text_of("BootedSlot")?,
            current_version: text_of("CurrentVersion")?,
            model: text_of("Model")?,
            compatible: text_of("Compatible")?,
            support_end: text(text_of("SupportEnd")?),
            auto_install: property(p, "AutoInstall")?,
            postponed_until: time_of("PostponedUntil")?,
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
