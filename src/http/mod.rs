//! The agent's HTTP endpoints: `/healthz`, `/readyz`, `/status`, `/status/resources/NAME`, `/metrics`;
//! 404 elsewhere. Served over HTTP/1.1 with bounded connections, requests and time ([`server`]).

pub mod server;

use crate::engine::runtime::{EngineHandle, Health};
use crate::metrics::AgentMetrics;
use crate::plugins::prometheus::{self as exporter, ExporterHub};
use crate::policy::files::FileProblem;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use serde::Serialize;
pub use server::{Body, HttpLimits};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid listen address '{0}': use ':PORT', 'IPv4:PORT' or '[IPv6]:PORT'")]
    Address(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// `:PORT` (all addresses, IPv6 with fallback to IPv4) or an explicit socket address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Any(u16),
    Exact(SocketAddr),
}

impl std::str::FromStr for ListenAddr {
    type Err = HttpError;
    fn from_str(s: &str) -> Result<Self, HttpError> {
        if let Some(port) = s.strip_prefix(':') {
            return port
                .parse()
                .map(ListenAddr::Any)
                .map_err(|_| HttpError::Address(s.to_string()));
        }
        s.parse()
            .map(ListenAddr::Exact)
            .map_err(|_| HttpError::Address(s.to_string()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Any(p) => write!(f, ":{p}"),
            ListenAddr::Exact(a) => write!(f, "{a}"),
        }
    }
}

/// Binds the listener: for `:PORT` first `[::]:PORT` (dual stack), then `0.0.0.0:PORT` on hosts without IPv6.
pub async fn bind(addr: &ListenAddr) -> Result<tokio::net::TcpListener, HttpError> {
    let candidates = match addr {
        ListenAddr::Any(p) => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *p),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *p),
        ],
        ListenAddr::Exact(a) => vec![*a],
    };
    let mut last = None;
    for a in candidates {
        match listen(a) {
            Ok(l) => return Ok(l),
            Err(e) => {
                // Only fall back when IPv6 itself is unavailable; "address in use" is final.
                let final_err = e.kind() == std::io::ErrorKind::AddrInUse;
                last = Some(HttpError::Bind {
                    addr: a.to_string(),
                    source: e,
                });
                if final_err {
                    break;
                }
            }
        }
    }
    Err(last.expect("at least one candidate"))
}

/// Backlog of the listening socket: a burst of connections waits in the kernel instead of being
/// dropped (and retried by the client a second later) while the accept loop catches up.
const BACKLOG: u32 = 4096;

fn listen(a: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if a.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(a)?;
    socket.listen(BACKLOG)
}

/// What `/status` shows about policies.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub source: String,
    pub applied: Vec<String>,
    pub problems: Vec<FileProblem>,
}

#[derive(Clone)]
pub struct HttpState {
    pub node_name: String,
    pub health: Arc<Health>,
    pub engine: EngineHandle,
    pub metrics: AgentMetrics,
    pub policies: Arc<Mutex<PolicyStatus>>,
    /// DRBD families of the running exporter instances (none while no policy enables the exporter).
    pub exporter: Arc<ExporterHub>,
    /// Bounds of the HTTP server.
    pub limits: HttpLimits,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSummary {
    name: String,
    role: String,
    may_promote: String,
    promotion_score: u32,
    force_io_failures: String,
    suspended: String,
    devices: Vec<String>,
    peers: Vec<String>,
}

/// The one-object summary of a resource shown under `resources` in `/status`.
pub fn summary(r: &crate::drbd::state::Resource) -> ResourceSummary {
    ResourceSummary {
        name: r.name.clone(),
        role: r.role.to_string(),
        may_promote: r.may_promote.to_string(),
        promotion_score: r.promotion_score,
        force_io_failures: r.force_io_failures.to_string(),
        suspended: r.suspended.render(),
        devices: r
            .devices
            .values()
            .map(|d| {
                format!(
                    "volume {}: {} quorum:{} open:{}",
                    d.volume, d.disk, d.quorum, d.open
                )
            })
            .collect(),
        peers: r
            .connections
            .values()
            .map(|c| {
                let disks: Vec<String> = c
                    .peer_devices
                    .values()
                    .map(|p| format!("{}/{}", p.peer_disk, p.replication))
                    .collect();
                format!(
                    "{} (node {}): {} {} [{}]",
                    c.conn_name,
                    c.peer_node_id,
                    c.connection,
                    c.peer_role,
                    disks.join(", ")
                )
            })
            .collect(),
    }
}

/// Answers one request. `/healthz` and `/readyz` are answered at once, outside the request limit; the
/// others take a place among the limited requests ([`HttpLimits::max_requests`]) or get `503`.
pub(crate) async fn handle(
    sh: &server::Shared,
    guard: server::Guard,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let st = &sh.st;
    let path = req.uri().path();
    if req.method() != Method::GET {
        return not_found();
    }
    match path {
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/readyz" => return readyz(&st.health),
        _ => {}
    }
    let Some(permit) = sh.limited() else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy: too many requests in flight, retry later\n",
        );
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        return r;
    };
    let guard = guard.with_permit(permit);
    let r = match path {
        "/metrics" => {
            let gz = req
                .headers()
                .get_all("accept-encoding")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(exporter::accepts_gzip);
            let st = st.clone();
            // Rendering is CPU work: keep it off the async workers the engine runs on.
            tokio::task::spawn_blocking(move || {
                metrics_response(exporter::scrape(&st.exporter, &st.metrics.registry, gz))
            })
            .await
            .unwrap_or_else(|_| {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics rendering failed\n",
                )
            })
        }
        "/status" => status(st).await,
        p => match p.strip_prefix("/status/resources/") {
            Some(name) if !name.is_empty() && !name.contains('/') => {
                resource(st, &percent_decode(name)).await
            }
            _ => not_found(),
        },
    };
    server::guarded(r, guard)
}

fn readyz(h: &Health) -> Response<Body> {
    let mut why = Vec::new();
    if !h.source_up.load(Ordering::Relaxed) {
        why.push("drbdsetup events2 is not running");
    } else if !h.initial_dump_complete.load(Ordering::Relaxed) {
        why.push("initial events2 dump not complete");
    }
    if !h.policies_loaded.load(Ordering::Relaxed) {
        why.push("policies not loaded");
    }
    if h.kubernetes_api_unreachable.load(Ordering::Relaxed) {
        why.push("Kubernetes API unreachable (retrying; the last applied policies keep running)");
    }
    if why.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {}\n", why.join("; ")),
        )
    }
}

/// `/status`: the snapshot is taken on the async side; building and serialising the document (seconds
/// for 100 000 resources) runs on a blocking thread, so the probes keep answering meanwhile.
async fn status(st: &HttpState) -> Response<Body> {
    let snap = st.engine.snapshot().await;
    let policies = st
        .policies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let st = st.clone();
    tokio::task::spawn_blocking(move || {
        let body = match snap {
            Ok(snap) => serde_json::json!({
                "node": st.node_name,
                "ready": st.health.ready(),
                "source": {
                    "up": st.health.source_up.load(Ordering::Relaxed),
                    "initialDumpComplete": snap.initial_dump_complete,
                    "lines": st.metrics.lines.get(),
                    "malformedLines": st.metrics.malformed.get(),
                    "restarts": st.metrics.source_restarts.get(),
                },
                "policies": policies,
                "plugins": snap.instances,
                "resources": snap.resources.iter().map(|r| summary(r)).collect::<Vec<_>>(),
            }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        json(StatusCode::OK, &body)
    })
    .await
    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "status failed\n"))
}

/// `/status/resources/NAME`: the complete kept state of one resource (every field events2 reported),
/// for operators and for comparing the agent's view with `drbdsetup status --json`.
async fn resource(st: &HttpState, name: &str) -> Response<Body> {
    match st.engine.snapshot().await {
        Ok(snap) => match snap.resources.iter().find(|r| r.name == name) {
            Some(r) => json(
                StatusCode::OK,
                &serde_json::to_value(&**r).unwrap_or_default(),
            ),
            None => text(
                StatusCode::NOT_FOUND,
                &format!("no resource {name:?} in the kept state\n"),
            ),
        },
        Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, &format!("{e}\n")),
    }
}

fn not_found() -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        "not found: try /healthz, /readyz, /status, /status/resources/NAME or /metrics\n",
    )
}

/// `%XX` escapes of a path segment decoded (invalid ones kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/metrics` response: the Prometheus text format (0.0.4), gzip-compressed when the client allows it;
/// the pieces of the body are shared with every other scrape of the same rendering.
fn metrics_response(body: exporter::Body) -> Response<Body> {
    let gzipped = body.gzip;
    let mut r = Response::new(Body::new(body.pieces));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    h.insert("vary", HeaderValue::from_static("accept-encoding"));
    if gzipped {
        h.insert("content-encoding", HeaderValue::from_static("gzip"));
    }
    r
}

fn json(code: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut out = serde_json::to_vec_pretty(body).unwrap_or_default();
    out.push(b'\n');
    let mut r = Response::new(Body::new([Bytes::from(out)]));
    *r.status_mut() = code;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn text(code: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ":9942".parse::<ListenAddr>().unwrap(),
            ListenAddr::Any(9942)
        );
        assert_eq!(
            "127.0.0.1:1".parse::<ListenAddr>().unwrap(),
            ListenAddr::Exact("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            "[::1]:2".parse::<ListenAddr>().unwrap(),
            ListenAddr::Exact("[::1]:2".parse().unwrap())
        );
        assert!("::9942".parse::<ListenAddr>().is_err());
        assert!(":x".parse::<ListenAddr>().is_err());
    }
}
