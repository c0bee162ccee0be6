//! A `dbus-daemon` of the test's own on a socket in a temporary directory, configured as
//! Debian's system bus with the project's bus policy (`systemd/dbus/org.updateagent.Agent1.conf`)
//! included, its admin group set to one that exists on the test machine.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::tools::require;
use super::wait_for;

/// The project's bus policy, as installed to /usr/share/dbus-1/system.d.
const PROJECT_POLICY: &str = include_str!("../../systemd/dbus/org.updateagent.Agent1.conf");

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BusPolicy {
    /// The project's policy file, as installed.
    Project,
    /// The project's file plus a rule after it that lets everyone call everything: only the
    /// service's own check stands between `nobody` and the methods.
    Permissive,
}

/// A running bus; killed (by its pid) when dropped.
pub struct Bus {
    /// Holds the socket and the configuration until the bus is gone.
    _dir: tempfile::TempDir,
    child: Child,
    /// `unix:path=…`, for `DBUS_SYSTEM_BUS_ADDRESS` and the clients.
    pub address: String,
}

impl Bus {
    /// A bus whose policy gives `admin_group` what the project's gives `update-admin`.
    pub fn start(policy: BusPolicy, admin_group: &str) -> Bus {
        let daemon = require("dbus-daemon", "dbus");
        let dir = tempfile::tempdir().unwrap();
        // `nobody` must reach the socket.
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let adapted = PROJECT_POLICY.replace(
            "group=\"update-admin\"",
            &format!("group=\"{admin_group}\""),
        );
        assert_ne!(
            adapted, PROJECT_POLICY,
            "the policy file names no group update-admin"
        );
        fs::write(dir.path().join("org.updateagent.Agent1.conf"), adapted).unwrap();
        let socket = dir.path().join("bus");
        let permissive = match policy {
            BusPolicy::Project => "",
            BusPolicy::Permissive => {
                r#"<policy context="default"><allow send_destination="org.updateagent.Agent1"/></policy>"#
            }
        };
        let config_path = dir.path().join("bus.conf");
        fs::write(&config_path, bus_config(&socket, dir.path(), permissive)).unwrap();
        let child = Command::new(daemon)
            .arg(format!("--config-file={}", config_path.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("the bus socket", Duration::from_secs(20), || {
            socket.exists()
        });
        Bus {
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
            child,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's system bus defaults (system.conf): method calls denied unless a rule allows them;
/// the project's file is included as from /usr/share/dbus-1/system.d.
fn bus_config(socket: &Path, dir: &Path, permissive: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <deny own="*"/> <deny send_type="method_call"/> <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/> <allow receive_type="method_return"/>
    <allow receive_type="error"/> <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{dir}/org.updateagent.Agent1.conf</include>
  {permissive}
</busconfig>
"#,
        socket = socket.display(),
        dir = dir.display(),
    )
}
