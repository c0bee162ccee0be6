//! The state the agent keeps retained on MQTT, as the operators read it, for the test crates
//! that run the daemon on a broker (`mqtt`, `installer_split`).

use std::time::Duration;

use serde_json::Value;

use super::sim::mqtt::ClientArgs;
use super::{Gateway, wait_for};

/// The state `client` finds retained for `gateway` once it reports `version`, which must have
/// committed: the agent idle, `slot` booted and committed, `committed` its last event.
#[track_caller]
pub fn committed_state(gateway: &Gateway, client: &ClientArgs, version: &str, slot: &str) -> Value {
    let state = wait_for("the committed state", Duration::from_secs(10), || {
        let state = client.retained_json(&gateway.topic("state"));
        (state["version"] == version).then_some(state)
    });
    assert_eq!(state["state"], "idle", "{state}");
    assert_eq!(state["booted_slot"], slot, "{state}");
    assert_eq!(state["slots"][slot]["committed"], true, "{state}");
    assert_eq!(state["last_event"]["state"], "committed", "{state}");
    state
}
