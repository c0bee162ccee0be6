//! The demo's MQTT broker: rumqttd, embedded, on a free 127.0.0.1 port, plain TCP, MQTT 5. It
//! stands in for the fleet's broker so the demo needs nothing installed; a real fleet uses its
//! own broker (mosquitto, EMQX, …) with TLS. Built without rumqttd's TLS and websocket features,
//! so it pulls in neither aws-lc nor OpenSSL.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Starts the broker on its own threads (it lives until the process exits) and returns its
/// address once it accepts connections.
pub fn start() -> anyhow::Result<SocketAddr> {
    // rumqttd binds the address it is given; ask the kernel for a free port first.
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        // Room for a release (64 KiB) and its topic; the agent itself accepts up to 128 KiB.
        max_payload_size: 128 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "demo".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v5: Some(HashMap::from([("demo".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("demo broker stopped: {e}");
            }
        })
        .context("cannot start the demo broker")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("the embedded MQTT broker did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(addr)
}
