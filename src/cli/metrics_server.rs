//! The tiny HTTP server behind `--metrics ADDR`: `GET /metrics` answers the newest fleet
//! summary in the Prometheus text format, or OpenMetrics when the scraper asks for it
//! (`Accept`). hyper (HTTP/1.1 only), in the operator's build only.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use update_agent::fleet::Summary;
use update_agent::fleet::metrics::{Format, ToolState, render};

/// What the server exposes; the tool replaces it as the fleet changes.
#[derive(Default)]
pub struct Exposed {
    pub summary: Option<Summary>,
    pub tool: ToolState,
}

pub type Shared = Arc<Mutex<Exposed>>;

/// Binds `addr` and serves until the runtime stops; returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Shared) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for --metrics"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors, say: try again shortly rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(respond(&shared, &request)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn respond(
    shared: &Shared,
    request: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let response = hyper::Response::builder();
    if request.uri().path() != "/metrics" {
        return response
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
            .expect("a static response");
    }
    if request.method() != hyper::Method::GET && request.method() != hyper::Method::HEAD {
        return response
            .status(405)
            .header(hyper::header::ALLOW, "GET, HEAD")
            .body(Full::new(Bytes::new()))
            .expect("a static response");
    }
    let format = Format::from_accept(
        request
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let text = {
        let exposed = shared.lock().expect("metrics lock");
        match &exposed.summary {
            Some(summary) => render(summary, exposed.tool, format),
            None if format == Format::OpenMetrics => "# EOF\n".to_string(),
            None => String::new(),
        }
    };
    response
        .header(hyper::header::CONTENT_TYPE, format.content_type())
        .body(Full::new(Bytes::from(text)))
        .expect("a valid response")
}
