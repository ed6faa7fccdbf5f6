//! [`ServiceManager`] over a D-Bus bus (the host's system bus, mounted into the pod) with zbus.
//!
//! One connection at a time, opened on first use and again after it broke: a bus daemon that goes away
//! makes calls fail with a clear error, and the next call reconnects. Each connection subscribes once
//! (AddMatch for `JobRemoved`, then `Manager.Subscribe`) and keeps that signal stream open for its whole
//! life, so the stream is always open *before* any StartUnit/StopUnit is sent on it: no job can finish
//! unseen. A dispatcher task hands each `JobRemoved` to the callers waiting for that job path, and keeps
//! recent results for callers that get the job path back after the job already finished (see [`Jobs`]).

use super::{JobResult, ServiceManager, SystemdError, UnitState};
use futures::future::BoxFuture;
use futures::StreamExt;
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use zbus::proxy::CacheProperties;
use zbus::Connection;
use zbus::OwnedObjectPath;

/// The host's system bus as mounted into the pod (`/run/dbus` from a hostPath volume).
pub const DEFAULT_BUS: &str = "unix:path=/run/dbus/system_bus_socket";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn subscribe(&self) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn freeze_unit(&self, name: &str) -> zbus::Result<()>;
    fn thaw_unit(&self, name: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: OwnedObjectPath,
        unit: String,
        result: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait Unit {
    #[zbus(property(emits_changed_signal = "false"))]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn freezer_state(&self) -> zbus::Result<String>;
}

/// Timeouts of a [`DbusManager`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbusOptions {
    /// How long start/stop wait for their job's `JobRemoved` (the job itself keeps running in systemd).
    pub job_timeout: Duration,
    /// How long any method call waits for its reply.
    pub call_timeout: Duration,
}

impl Default for DbusOptions {
    fn default() -> Self {
        DbusOptions {
            job_timeout: Duration::from_secs(300),
            call_timeout: Duration::from_secs(25),
        }
    }
}

/// How many results of finished jobs are kept (ours and other clients'), for callers that ask after the
/// job finished.
const RECENT_RESULTS: usize = 4096;

/// Finished jobs and the callers waiting for them. systemd merges a start/stop into a job already queued
/// for the unit and returns that job's path to every caller, so several callers may wait for one path, and
/// one may ask only after the job finished and another caller got the result: results stay in a bounded
/// ring of recent ones (job paths are unique for the life of a systemd).
#[derive(Default)]
struct Jobs {
    waiters: HashMap<String, Vec<oneshot::Sender<String>>>,
    recent: HashMap<String, String>,
    order: VecDeque<String>,
    closed: bool,
}

impl Jobs {
    fn finished(&mut self, job: String, result: String) {
        for tx in self.waiters.remove(&job).into_iter().flatten() {
            let _ = tx.send(result.clone());
        }
        if self.recent.insert(job.clone(), result).is_none() {
            self.order.push_back(job);
        }
        while self.order.len() > RECENT_RESULTS {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }

    /// The result if the job already finished, otherwise a receiver for it; `None` when the connection
    /// is gone.
    fn claim(&mut self, job: &str) -> Option<Result<String, oneshot::Receiver<String>>> {
        if let Some(r) = self.recent.get(job) {
            return Some(Ok(r.clone()));
        }
        if self.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(job.to_string()).or_default().push(tx);
        Some(Err(rx))
    }

    /// A caller gave up waiting (timeout): drop its dead sender.
    fn forget(&mut self, job: &str) {
        if let Some(v) = self.waiters.get_mut(job) {
            v.retain(|tx| !tx.is_closed());
            if v.is_empty() {
                self.waiters.remove(job);
            }
        }
    }
}

/// One live bus connection with its `JobRemoved` dispatcher.
struct Link {
    conn: Connection,
    manager: ManagerProxy<'static>,
    jobs: Arc<Mutex<Jobs>>,
    alive: Arc<AtomicBool>,
    dispatcher: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

fn lock(jobs: &Mutex<Jobs>) -> std::sync::MutexGuard<'_, Jobs> {
    jobs.lock().unwrap_or_else(|e| e.into_inner())
}

/// systemd's Manager on a bus (see the module documentation).
pub struct DbusManager {
    address: String,
    opts: DbusOptions,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
}

impl std::fmt::Debug for DbusManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbusManager")
            .field("address", &self.address)
            .field("opts", &self.opts)
            .finish()
    }
}

/// An error that means the connection itself is unusable (as opposed to an error reply from systemd).
fn is_link_error(e: &zbus::Error) -> bool {
    matches!(
        e,
        zbus::Error::InputOutput(_) | zbus::Error::Connection(..) | zbus::Error::Handshake(_)
    )
}

fn describe(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => format!("{}: {msg}", name.as_str()),
        zbus::Error::MethodError(name, None, _) => name.as_str().to_string(),
        zbus::Error::InputOutput(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            "no reply from the bus in time".to_string()
        }
        e => e.to_string(),
    }
}

impl DbusManager {
    /// A manager for the bus at `address` (a D-Bus address such as `unix:path=/run/dbus/system_bus_socket`).
    /// Nothing is connected until the first call; only the address syntax is checked here.
    pub fn new(address: &str, opts: DbusOptions) -> Result<DbusManager, SystemdError> {
        zbus::Address::try_from(address).map_err(|e| SystemdError::Connect {
            address: address.to_string(),
            message: format!("invalid D-Bus address: {e}"),
        })?;
        Ok(DbusManager {
            address: address.to_string(),
            opts,
            link: tokio::sync::Mutex::new(None),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether a connection is open now (for status pages; calls reconnect on their own).
    pub async fn is_connected(&self) -> bool {
        self.link
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.alive.load(Ordering::Relaxed))
    }

    async fn connect(&self) -> Result<Link, SystemdError> {
        let err = |e: zbus::Error| SystemdError::Connect {
            address: self.address.clone(),
            message: describe(&e),
        };
        let conn = zbus::connection::Builder::address(self.address.as_str())
            .method_timeout(self.opts.call_timeout)
            .max_queued(NonZeroUsize::new(RECENT_RESULTS).unwrap_or(NonZeroUsize::MIN))
            .build();
        let conn = tokio::time::timeout(self.opts.call_timeout, conn)
            .await
            .map_err(|_| SystemdError::Connect {
                address: self.address.clone(),
                message: "no answer from the bus in time".to_string(),
            })?
            .map_err(err)?;
        let manager = ManagerProxy::new(&conn).await.map_err(err)?;
        // AddMatch first, Subscribe second: from here on every JobRemoved reaches the stream.
        let mut stream = manager.receive_job_removed().await.map_err(err)?;
        manager.subscribe().await.map_err(err)?;
        let jobs = Arc::new(Mutex::new(Jobs::default()));
        let alive = Arc::new(AtomicBool::new(true));
        let (j, a) = (jobs.clone(), alive.clone());
        let address = self.address.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(sig) = stream.next().await {
                match sig.args() {
                    Ok(args) => lock(&j).finished(args.job.to_string(), args.result),
                    Err(e) => tracing::warn!(error = %e, "ignoring a malformed JobRemoved signal"),
                }
            }
            a.store(false, Ordering::Relaxed);
            let mut jobs = lock(&j);
            jobs.closed = true;
            // Waiters see their sender dropped: "connection lost".
            jobs.waiters.clear();
            tracing::warn!(%address, "the D-Bus connection to systemd closed; the next call reconnects");
        });
        tracing::info!(address = %self.address, "connected to systemd over D-Bus");
        Ok(Link {
            conn,
            manager,
            jobs,
            alive,
            dispatcher,
        })
    }

    /// The live connection, opening one if there is none or the last one broke.
    async fn link(&self) -> Result<Arc<Link>, SystemdError> {
        let mut guard = self.link.lock().await;
        if let Some(l) = guard.as_ref() {
            if l.alive.load(Ordering::Relaxed) {
                return Ok(l.clone());
            }
        }
        *guard = None;
        let l = Arc::new(self.connect().await?);
        *guard = Some(l.clone());
        Ok(l)
    }

    /// Forgets `link` if it is still the current one and the error says it is broken.
    async fn check(&self, link: &Arc<Link>, e: &zbus::Error) {
        if is_link_error(e) || !link.alive.load(Ordering::Relaxed) {
            link.alive.store(false, Ordering::Relaxed);
            let mut guard = self.link.lock().await;
            if guard.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                *guard = None;
            }
        }
    }

    async fn call_err(
        &self,
        link: &Arc<Link>,
        method: &'static str,
        unit: &str,
        e: zbus::Error,
    ) -> SystemdError {
        self.check(link, &e).await;
        let mut message = describe(&e);
        if is_link_error(&e) {
            message.push_str(" (bus connection dropped; the next call reconnects)");
        }
        SystemdError::Call {
            method,
            unit: unit.to_string(),
            message,
        }
    }

    async fn job(&self, method: &'static str, unit: &str) -> Result<JobResult, SystemdError> {
        let link = self.link().await?;
        tracing::debug!(target: "systemd", method, unit, "calling");
        let called = match method {
            "StartUnit" => link.manager.start_unit(unit, "replace").await,
            _ => link.manager.stop_unit(unit, "replace").await,
        };
        let job = match called {
            Ok(j) => j,
            Err(e) => return Err(self.call_err(&link, method, unit, e).await),
        };
        tracing::debug!(target: "systemd", method, unit, job = job.as_str(), "job queued");
        let claimed = lock(&link.jobs).claim(job.as_str());
        let lost = || SystemdError::Call {
            method,
            unit: unit.to_string(),
            message: format!("bus connection lost while waiting for job {}", job.as_str()),
        };
        let rx = match claimed {
            Some(Ok(result)) => return Ok(JobResult::parse(&result)),
            Some(Err(rx)) => rx,
            None => return Err(lost()),
        };
        match tokio::time::timeout(self.opts.job_timeout, rx).await {
            Ok(Ok(result)) => Ok(JobResult::parse(&result)),
            Ok(Err(_)) => {
                link.alive.store(false, Ordering::Relaxed);
                Err(lost())
            }
            Err(_) => {
                lock(&link.jobs).forget(job.as_str());
                Err(SystemdError::JobTimeout {
                    method,
                    unit: unit.to_string(),
                    secs: self.opts.job_timeout.as_secs(),
                })
            }
        }
    }

    async fn simple<'a, F, Fut>(
        &'a self,
        method: &'static str,
        unit: &'a str,
        f: F,
    ) -> Result<(), SystemdError>
    where
        F: FnOnce(Arc<Link>) -> Fut,
        Fut: std::future::Future<Output = zbus::Result<()>>,
    {
        let link = self.link().await?;
        match f(link.clone()).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.call_err(&link, method, unit, e).await),
        }
    }

    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let link = self.link().await?;
        let r: zbus::Result<UnitState> = async {
            let path = link.manager.load_unit(unit).await?;
            let u = UnitProxy::builder(&link.conn)
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            let (active_state, sub_state, freezer_state) =
                futures::try_join!(u.active_state(), u.sub_state(), u.freezer_state())?;
            Ok(UnitState {
                active_state,
                sub_state,
                freezer_state,
            })
        }
        .await;
        match r {
            Ok(s) => Ok(s),
            Err(e) => Err(self.call_err(&link, "LoadUnit", unit, e).await),
        }
    }
}

impl ServiceManager for DbusManager {
    fn reload(&self) -> BoxFuture<'_, Result<(), SystemdError>> {
        Box::pin(self.simple("Reload", "", |l| async move { l.manager.reload().await }))
    }

    fn start_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        Box::pin(self.job("StartUnit", unit))
    }

    fn stop_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        Box::pin(self.job("StopUnit", unit))
    }

    fn reset_failed_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(self.simple("ResetFailedUnit", unit, move |l| async move {
            l.manager.reset_failed_unit(unit).await
        }))
    }

    fn unit_state<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitState, SystemdError>> {
        Box::pin(self.state(unit))
    }

    fn freeze_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(self.simple("FreezeUnit", unit, move |l| async move {
            l.manager.freeze_unit(unit).await
        }))
    }

    fn thaw_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(self.simple("ThawUnit", unit, move |l| async move {
            l.manager.thaw_unit(unit).await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_that_arrives_before_its_callers_is_kept_for_all_of_them() {
        let mut j = Jobs::default();
        j.finished("/org/freedesktop/systemd1/job/7".into(), "done".into());
        // systemd merged two calls into job 7: both callers get its result, also after the first one.
        for _ in 0..2 {
            assert_eq!(
                j.claim("/org/freedesktop/systemd1/job/7").map(|r| r.ok()),
                Some(Some("done".to_string()))
            );
        }
    }

    #[test]
    fn callers_waiting_for_one_merged_job_all_get_its_result() {
        let mut j = Jobs::default();
        let (Some(Err(mut a)), Some(Err(mut b))) = (j.claim("/job/3"), j.claim("/job/3")) else {
            panic!("expected receivers")
        };
        j.finished("/job/3".into(), "canceled".into());
        assert_eq!(a.try_recv().ok().as_deref(), Some("canceled"));
        assert_eq!(b.try_recv().ok().as_deref(), Some("canceled"));
    }

    #[test]
    fn a_waiter_gets_its_own_job_only() {
        let mut j = Jobs::default();
        let Some(Err(mut rx)) = j.claim("/job/1") else {
            panic!("expected a receiver")
        };
        j.finished("/job/2".into(), "failed".into());
        assert!(rx.try_recv().is_err());
        j.finished("/job/1".into(), "dependency".into());
        assert_eq!(rx.try_recv().ok().as_deref(), Some("dependency"));
        assert_eq!(j.recent.get("/job/2").map(String::as_str), Some("failed"));
    }

    #[test]
    fn recent_results_are_bounded_and_closed_links_refuse_waiters() {
        let mut j = Jobs::default();
        for i in 0..RECENT_RESULTS + 10 {
            j.finished(format!("/job/{i}"), "done".into());
        }
        assert_eq!(j.recent.len(), RECENT_RESULTS);
        assert!(!j.recent.contains_key("/job/0"));
        assert!(j
            .recent
            .contains_key(&format!("/job/{}", RECENT_RESULTS + 9)));
        j.closed = true;
        assert!(j.claim("/job/none").is_none());
    }

    #[test]
    fn an_invalid_address_is_refused_up_front() {
        assert!(matches!(
            DbusManager::new("no-such-transport:x=1", DbusOptions::default()),
            Err(SystemdError::Connect { .. })
        ));
        assert!(DbusManager::new(DEFAULT_BUS, DbusOptions::default()).is_ok());
    }

    #[tokio::test]
    async fn a_missing_bus_is_a_connect_error_not_a_hang() {
        let d = tempfile::tempdir().unwrap();
        let addr = format!("unix:path={}/nothing", d.path().display());
        let m = DbusManager::new(&addr, DbusOptions::default()).unwrap();
        match m.start_unit("x.service").await {
            Err(SystemdError::Connect { address, .. }) => assert_eq!(address, addr),
            other => panic!("expected a connect error, got {other:?}"),
        }
        assert!(!m.is_connected().await);
    }
}
