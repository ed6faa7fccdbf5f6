//! The HTTP/1.1 server under the endpoints: its own accept loop over hyper's HTTP/1 connections, with
//! bounds on what any client can make the agent hold.
//!
//! - **Connections**: at most [`HttpLimits::max_connections`] open (also at most half the soft
//!   `RLIMIT_NOFILE`, so the agent keeps descriptors for its policy directory, drbdsetup and systemd).
//!   A new connection over the limit closes the oldest connection that has no request in flight (idle
//!   keep-alive, or still sending its headers); when every connection has a request in flight, the new
//!   one is closed at once. Requests in flight are bounded (below), so a health probe always finds room;
//!   a connection whose request had already arrived when it was accepted is not evicted before that
//!   request is dispatched (up to a quarter of the limit), so a probe is answered during a flood of
//!   silent connections.
//! - **Requests**: at most [`HttpLimits::max_requests`] requests other than `/healthz` and `/readyz` in
//!   flight (from their start until the last piece of their response was handed to the socket); more
//!   are answered `503` at once, with `Retry-After: 1`. The probes are outside that limit.
//! - **Timeouts**: the request headers must arrive within [`HttpLimits::header_timeout`], which also runs
//!   while a keep-alive connection waits for its next request (the idle timeout): a connection without
//!   a complete request head for that long is closed. A response not sent within
//!   [`HttpLimits::response_timeout`] (a client that does not read) closes its connection.
//! - **HTTP/1.1 only**: no HTTP/2 (its streams and flow-control windows are what lets one connection
//!   hold many responses), no upgrades; headers up to 16 KiB.
//! - **Bodies** are lists of shared [`Bytes`] handed out in slices of at most [`SLICE`] bytes, so a body
//!   held by a slow client is the shared rendering, never a copy, and its request stays counted until
//!   the last slice was taken.

use super::HttpState;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

/// Largest piece of a body handed to hyper at once.
pub const SLICE: usize = 256 * 1024;
/// Longest time in-flight responses may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The bounds of the HTTP server (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub max_requests: usize,
    pub header_timeout: Duration,
    pub response_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 512,
            max_requests: 4,
            header_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
        }
    }
}

/// A response body: shared pieces, sent in order, in slices of at most [`SLICE`] bytes; holds its
/// request's place ([`Guard`]) until the last slice was taken.
pub struct Body {
    pieces: VecDeque<Bytes>,
    guard: Option<Guard>,
}

impl Body {
    pub fn new(pieces: impl IntoIterator<Item = Bytes>) -> Body {
        Body {
            pieces: pieces.into_iter().filter(|b| !b.is_empty()).collect(),
            guard: None,
        }
    }

    fn len(&self) -> u64 {
        self.pieces.iter().map(|b| b.len() as u64).sum()
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::new([Bytes::from(s)])
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(front) = this.pieces.front_mut() else {
            this.guard = None;
            return Poll::Ready(None);
        };
        let slice = if front.len() > SLICE {
            front.split_to(SLICE)
        } else {
            this.pieces.pop_front().expect("a front piece")
        };
        if this.pieces.is_empty() {
            this.guard = None;
        }
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len())
    }
}

/// One open connection, as the accept loop and the requests see it.
struct Conn {
    /// Requests of it in flight (hyper serves one at a time).
    busy: AtomicUsize,
    /// Milliseconds since the server started when the request in flight started.
    busy_since: AtomicU64,
    /// Close it now (evicted by a newer connection).
    close: Notify,
    /// Its request had arrived when it was accepted and has not been dispatched yet: not evicted (a
    /// probe that connects during a flood of silent connections gets its answer).
    pending: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// Clears [`Conn::pending`] (and its count).
    fn dispatched(&self, shared: &Shared) {
        if self.pending.swap(false, Ordering::AcqRel) {
            shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Whether bytes wait on the socket (without taking them).
fn has_data(s: &tokio::net::TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut b = 0u8;
    // SAFETY: a one-byte buffer on the stack for a non-blocking peek on an open socket.
    unsafe {
        libc::recv(
            s.as_raw_fd(),
            &mut b as *mut u8 as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        ) > 0
    }
}

/// A request in flight: counted on its connection, and holding a place among the limited requests.
pub struct Guard {
    conn: Arc<Conn>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.conn.busy.fetch_sub(1, Ordering::Release);
    }
}

/// What the connections share.
pub(crate) struct Shared {
    pub st: HttpState,
    limits: HttpLimits,
    requests: Arc<Semaphore>,
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    start: Instant,
    /// Connections [`Conn::pending`]; at most a quarter of the connection limit.
    pending: AtomicUsize,
    /// Connections closed to make room for newer ones, and refused because all were busy.
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A place among the limited requests, if one is free.
    pub(crate) fn limited(&self) -> Option<OwnedSemaphorePermit> {
        self.requests.clone().try_acquire_owned().ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one; returns the soft limit then in force.
fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
}

/// Serves `st`'s endpoints on `listener` until `stop` turns true; then lets responses in flight finish
/// for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    st: HttpState,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let nofile = raise_nofile();
    let max_connections = limits
        .max_connections
        .min((nofile / 2) as usize)
        .max(limits.max_requests + 2);
    tracing::info!(
        max_connections,
        max_requests = limits.max_requests,
        header_timeout = ?limits.header_timeout,
        response_timeout = ?limits.response_timeout,
        "HTTP/1.1 limits"
    );
    let shared = Arc::new(Shared {
        st,
        requests: Arc::new(Semaphore::new(limits.max_requests)),
        limits,
        conns: Mutex::new(BTreeMap::new()),
        start: Instant::now(),
        pending: AtomicUsize::new(0),
        evicted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    let mut accept_errors = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors (EMFILE/ENFILE) or a connection reset before it was accepted:
                // wait a little instead of spinning.
                accept_errors += 1;
                if accept_errors.is_power_of_two() {
                    tracing::warn!(error = %e, count = accept_errors, "cannot accept an HTTP connection");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Reap finished connection tasks.
        while tasks.try_join_next().is_some() {}
        next_id += 1;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            busy_since: AtomicU64::new(0),
            close: Notify::new(),
            pending: std::sync::atomic::AtomicBool::new(false),
        });
        if has_data(&stream) {
            if shared.pending.fetch_add(1, Ordering::AcqRel) < max_connections / 4 {
                conn.pending.store(true, Ordering::Release);
            } else {
                shared.pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
        {
            let mut conns = lock(&shared.conns);
            if conns.len() >= max_connections {
                let idle = conns
                    .iter()
                    .find(|(_, c)| {
                        c.busy.load(Ordering::Acquire) == 0 && !c.pending.load(Ordering::Acquire)
                    })
                    .map(|(id, _)| *id);
                match idle.and_then(|id| conns.remove(&id)) {
                    Some(old) => {
                        old.close.notify_one();
                        shared.evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        conn.dispatched(&shared);
                        drop(stream);
                        continue;
                    }
                }
            }
            conns.insert(next_id, conn.clone());
        }
        let _ = stream.set_nodelay(true);
        tasks.spawn(connection(
            shared.clone(),
            next_id,
            conn,
            stream,
            stop.clone(),
        ));
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_millis(500), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Serves one connection until it ends, is evicted, times out, or the server stops.
async fn connection(
    shared: Arc<Shared>,
    id: u64,
    conn: Arc<Conn>,
    stream: tokio::net::TcpStream,
    mut stop: watch::Receiver<bool>,
) {
    let (sh, c) = (shared.clone(), conn.clone());
    let svc = hyper::service::service_fn(move |req| {
        let (sh, c) = (sh.clone(), c.clone());
        async move {
            c.dispatched(&sh);
            c.busy.fetch_add(1, Ordering::AcqRel);
            c.busy_since.store(sh.now_ms(), Ordering::Release);
            let guard = Guard {
                conn: c,
                _permit: None,
            };
            Ok::<_, Infallible>(super::handle(&sh, guard, req).await)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_timeout)
        .max_buf_size(16 * 1024)
        .writev(true);
    let served = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(served);
    let response_timeout = shared.limits.response_timeout.as_millis() as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut served => break,
            _ = conn.close.notified() => break,
            _ = stop.wait_for(|s| *s), if stopping.is_none() => {
                served.as_mut().graceful_shutdown();
                stopping = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
            }
            _ = tick.tick() => {
                if stopping.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    break;
                }
                if conn.busy.load(Ordering::Acquire) > 0
                    && shared.now_ms().saturating_sub(conn.busy_since.load(Ordering::Acquire))
                        > response_timeout
                {
                    tracing::debug!("closing an HTTP connection whose response was not read in time");
                    break;
                }
            }
        }
    }
    conn.dispatched(&shared);
    lock(&shared.conns).remove(&id);
}

impl Guard {
    /// Takes a place among the limited requests.
    pub(crate) fn with_permit(mut self, p: OwnedSemaphorePermit) -> Guard {
        self._permit = Some(p);
        self
    }
}

/// Attaches the request's guard to its response body.
pub(crate) fn guarded(mut r: http::Response<Body>, guard: Guard) -> http::Response<Body> {
    if !r.body().pieces.is_empty() {
        r.body_mut().guard = Some(guard);
    }
    r
}
