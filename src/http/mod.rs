//! The agent's HTTP endpoints (warp): `/healthz`, `/readyz`, `/status`, `/status/resources/NAME`,
//! `/metrics`; 404 elsewhere.

use crate::engine::runtime::{EngineHandle, Health};
use crate::metrics::AgentMetrics;
use crate::plugins::prometheus::{self as exporter, ExporterHub};
use crate::policy::files::FileProblem;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use warp::http::{Response, StatusCode};
use warp::Filter;

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
        match tokio::net::TcpListener::bind(a).await {
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

pub fn routes(
    st: HttpState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = std::convert::Infallible> + Clone {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| text(StatusCode::OK, "ok\n"));
    let s = st.clone();
    let readyz = warp::path!("readyz").and(warp::get()).map(move || {
        let h = &s.health;
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
            why.push(
                "Kubernetes API unreachable (retrying; the last applied policies keep running)",
            );
        }
        if why.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", why.join("; ")),
            )
        }
    });
    let s = st.clone();
    let status = warp::path!("status").and(warp::get()).and_then(move || {
        let s = s.clone();
        async move {
            let snap = s.engine.snapshot().await;
            let policies = s.policies.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let body = match snap {
                Ok(snap) => serde_json::json!({
                    "node": s.node_name,
                    "ready": s.health.ready(),
                    "source": {
                        "up": s.health.source_up.load(Ordering::Relaxed),
                        "initialDumpComplete": snap.initial_dump_complete,
                        "lines": s.metrics.lines.get(),
                        "malformedLines": s.metrics.malformed.get(),
                        "restarts": s.metrics.source_restarts.get(),
                    },
                    "policies": policies,
                    "plugins": snap.instances,
                    "resources": snap.resources.iter().map(|r| summary(r)).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            Ok::<_, std::convert::Infallible>(json(StatusCode::OK, &body))
        }
    });
    // The complete kept state of one resource (every field events2 reported), for operators and for
    // comparing the agent's view with `drbdsetup status --json`.
    let s = st.clone();
    let resource = warp::path!("status" / "resources" / String)
        .and(warp::get())
        .and_then(move |name: String| {
            let s = s.clone();
            async move {
                let r = match s.engine.snapshot().await {
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
                };
                Ok::<_, std::convert::Infallible>(r)
            }
        });
    let s = st.clone();
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::optional::<String>("accept-encoding"))
        .and_then(move |accept: Option<String>| {
            let s = s.clone();
            async move {
                let gz = accept.as_deref().is_some_and(exporter::accepts_gzip);
                // Rendering is CPU work: keep it off the async workers the engine runs on.
                let r = tokio::task::spawn_blocking(move || {
                    metrics_response(exporter::scrape(&s.exporter, &s.metrics.registry, gz))
                })
                .await
                .unwrap_or_else(|_| {
                    warp::reply::Reply::into_response(text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics rendering failed\n",
                    ))
                });
                Ok::<_, std::convert::Infallible>(r)
            }
        });
    let not_found = warp::any().map(|| {
        text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /status, /status/resources/NAME or /metrics\n",
        )
    });
    healthz
        .or(readyz)
        .unify()
        .or(status)
        .unify()
        .or(resource)
        .unify()
        .map(warp::reply::Reply::into_response)
        .or(metrics)
        .unify()
        .or(not_found.map(warp::reply::Reply::into_response))
        .unify()
}

/// `/metrics` response: the Prometheus text format (0.0.4), gzip-compressed when the client allows it.
fn metrics_response(body: exporter::Body) -> warp::reply::Response {
    let gzipped = body.gzip;
    let mut r = Response::new(body.bytes.into());
    let h = r.headers_mut();
    h.insert(
        "content-type",
        warp::http::HeaderValue::from_static(prometheus::TEXT_FORMAT),
    );
    h.insert(
        "vary",
        warp::http::HeaderValue::from_static("accept-encoding"),
    );
    if gzipped {
        h.insert(
            "content-encoding",
            warp::http::HeaderValue::from_static("gzip"),
        );
    }
    r
}

fn json(code: StatusCode, body: &serde_json::Value) -> Response<String> {
    let mut r = Response::new(serde_json::to_string_pretty(body).unwrap_or_default() + "\n");
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("valid header"),
    );
    r
}

fn text(code: StatusCode, body: &str) -> Response<String> {
    let mut r = Response::new(body.to_string());
    *r.status_mut() = code;
    r.headers_mut().insert(
        "content-type",
        "text/plain; charset=utf-8".parse().expect("valid header"),
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
