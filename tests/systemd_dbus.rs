//! The systemd effector against a real systemd: a throw-away instance per test (tests/common/systemd.rs,
//! recipe A), driven through the D-Bus client (zbus over the dbus-daemon inside) and through the
//! `systemctl` fallback (nsenter into its namespaces as the host-exec prefix). The same core checks run
//! against both backends; D-Bus-only checks (bus going away, concurrent jobs) follow.

mod common;

use common::systemd::SystemdNs;
use drbd_reactor::systemd::{
    DbusManager, DbusOptions, JobResult, ServiceManager, SystemctlManager, SystemdError,
};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLEEPER: &str = "[Service]\nExecStart=/bin/sleep infinity\n";
const FAILING: &str = "[Service]\nType=oneshot\nExecStart=/bin/false\n";

fn marker_unit(file: &str) -> String {
    format!("[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/touch /run/{file}\n")
}

#[derive(Clone, Copy)]
enum Backend {
    Dbus,
    Systemctl,
}

fn manager(ns: &SystemdNs, b: Backend, job_timeout: Duration) -> Arc<dyn ServiceManager> {
    match b {
        Backend::Dbus => Arc::new(
            DbusManager::new(
                &ns.bus,
                DbusOptions {
                    job_timeout,
                    call_timeout: Duration::from_secs(20),
                },
            )
            .unwrap(),
        ),
        Backend::Systemctl => Arc::new(SystemctlManager::new(
            &ns.host_exec(),
            "systemctl",
            job_timeout,
            Duration::from_secs(20),
        )),
    }
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn frozen_in_cgroup(ns: &SystemdNs, unit: &str) -> Option<bool> {
    let ev = std::fs::read_to_string(ns.unit_cgroup(unit).join("cgroup.events")).ok()?;
    ev.lines()
        .find_map(|l| l.strip_prefix("frozen "))
        .map(|v| v.trim() == "1")
}

async fn start_and_stop_real_units(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit("marker.service", &marker_unit("marker"));
    ns.write_unit("sleeper.service", SLEEPER);
    m.reload().await.unwrap();

    // Never loaded: inactive, not an error.
    let st = m.unit_state("sleeper.service").await.unwrap();
    assert_eq!(
        (st.active_state.as_str(), st.sub_state.as_str()),
        ("inactive", "dead")
    );

    assert_eq!(
        m.start_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    assert!(ns.run_path("marker").exists(), "the oneshot ran");
    let st = m.unit_state("marker.service").await.unwrap();
    assert_eq!(
        (st.active_state.as_str(), st.sub_state.as_str()),
        ("active", "exited")
    );

    assert_eq!(
        m.start_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    let st = m.unit_state("sleeper.service").await.unwrap();
    assert!(st.is_active(), "{st:?}");
    assert_eq!(st.sub_state, "running");
    assert_eq!(st.freezer_state, "running");
    let pid: u32 = ns.show("sleeper.service", "MainPID").parse().unwrap();
    assert!(pid > 0, "a real process runs");
    // Starting what runs is a finished no-op job.
    assert_eq!(
        m.start_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );

    assert_eq!(
        m.stop_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    let st = m.unit_state("sleeper.service").await.unwrap();
    assert_eq!(
        (st.active_state.as_str(), st.sub_state.as_str()),
        ("inactive", "dead")
    );
    assert_eq!(ns.show("sleeper.service", "MainPID"), "0");
    assert_eq!(
        m.stop_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    assert!(!m.unit_state("marker.service").await.unwrap().is_active());
}

async fn failing_unit_and_reset_failed(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit("fail.service", FAILING);
    m.reload().await.unwrap();
    assert_eq!(
        m.start_unit("fail.service").await.unwrap(),
        JobResult::Failed
    );
    let st = m.unit_state("fail.service").await.unwrap();
    assert_eq!(
        (st.active_state.as_str(), st.sub_state.as_str()),
        ("failed", "failed")
    );
    m.reset_failed_unit("fail.service").await.unwrap();
    let st = m.unit_state("fail.service").await.unwrap();
    assert_eq!(
        (st.active_state.as_str(), st.sub_state.as_str()),
        ("inactive", "dead")
    );
    assert_eq!(ns.show("fail.service", "Result"), "success");
}

/// The promoter's model: a target and its services `BindsTo=` a promote unit whose `ExecCondition=`
/// (drbdsetup primary) decides. An unmet condition is no failure of the promote unit itself, but its
/// dependents' jobs end with result `dependency` and nothing of them runs.
async fn unmet_exec_condition(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit(
        "cond.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecCondition=/bin/false\nExecStart=/usr/bin/touch /run/cond-ran\n",
    );
    ns.write_unit(
        "dep.service",
        "[Unit]\nBindsTo=cond.service\nAfter=cond.service\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/touch /run/dep-ran\n",
    );
    ns.write_unit(
        "t.target",
        "[Unit]\nBindsTo=cond.service\nRequires=dep.service\nAfter=dep.service\n",
    );
    m.reload().await.unwrap();
    assert_eq!(
        m.start_unit("t.target").await.unwrap(),
        JobResult::Dependency
    );
    assert!(!ns.run_path("dep-ran").exists());
    assert!(!ns.run_path("cond-ran").exists());
    assert!(!m.unit_state("t.target").await.unwrap().is_active());
    assert!(!m.unit_state("dep.service").await.unwrap().is_active());
    let st = m.unit_state("cond.service").await.unwrap();
    assert_eq!(st.active_state, "inactive", "a condition is no failure");
    assert_eq!(ns.show("cond.service", "ConditionResult"), "no");
    // The promote unit on its own: its job is done (systemd 252 reports no `skipped` for a condition),
    // the unit stays inactive.
    assert_eq!(m.start_unit("cond.service").await.unwrap(), JobResult::Done);
    assert_eq!(
        m.unit_state("cond.service").await.unwrap().active_state,
        "inactive"
    );
    // Met condition: everything starts.
    ns.write_unit(
        "cond.service.d/10-met.conf",
        "[Service]\nExecCondition=\nExecCondition=/bin/true\n",
    );
    m.reload().await.unwrap();
    assert_eq!(m.start_unit("t.target").await.unwrap(), JobResult::Done);
    assert!(ns.run_path("cond-ran").exists() && ns.run_path("dep-ran").exists());
    // Stopping the bound-to unit takes its dependents down.
    assert_eq!(m.stop_unit("cond.service").await.unwrap(), JobResult::Done);
    assert!(!m.unit_state("t.target").await.unwrap().is_active());
    assert!(!m.unit_state("dep.service").await.unwrap().is_active());
}

async fn reload_picks_up_a_drop_in(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit("marker.service", &marker_unit("before"));
    m.reload().await.unwrap();
    // Active, so the unit stays loaded: systemd keeps its old definition until the reload.
    assert_eq!(
        m.start_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    assert!(ns.run_path("before").exists());
    ns.write_unit(
        "marker.service.d/reactor.conf",
        "[Service]\nExecStart=\nExecStart=/usr/bin/touch /run/after\n",
    );
    assert_eq!(ns.show("marker.service", "DropInPaths"), "");
    m.reload().await.unwrap();
    assert_eq!(
        ns.show("marker.service", "DropInPaths"),
        "/run/systemd/system/marker.service.d/reactor.conf"
    );
    assert_eq!(
        m.stop_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    std::fs::remove_file(ns.run_path("before")).unwrap();
    assert_eq!(
        m.start_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    assert!(ns.run_path("after").exists(), "the drop-in's ExecStart ran");
    assert!(!ns.run_path("before").exists(), "the old ExecStart did not");
}

async fn freeze_and_thaw(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit("sleeper.service", SLEEPER);
    m.reload().await.unwrap();
    assert_eq!(
        m.start_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    m.freeze_unit("sleeper.service").await.unwrap();
    let st = m.unit_state("sleeper.service").await.unwrap();
    assert!(st.is_frozen(), "{st:?}");
    assert!(st.is_active(), "frozen is still active: {st:?}");
    assert_eq!(
        frozen_in_cgroup(ns, "sleeper.service"),
        Some(true),
        "the kernel froze the cgroup"
    );
    m.thaw_unit("sleeper.service").await.unwrap();
    let st = m.unit_state("sleeper.service").await.unwrap();
    assert_eq!(st.freezer_state, "running");
    assert_eq!(frozen_in_cgroup(ns, "sleeper.service"), Some(false));
    // Freezing what does not run is an error, reported as such.
    assert_eq!(
        m.stop_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    match m.freeze_unit("sleeper.service").await {
        Err(SystemdError::Call { method, unit, .. }) => {
            assert_eq!((method, unit.as_str()), ("FreezeUnit", "sleeper.service"))
        }
        other => panic!("freezing a stopped unit: {other:?}"),
    }
}

async fn job_timeout_leaves_the_job_running(ns: &SystemdNs, m: &dyn ServiceManager) {
    ns.write_unit(
        "slow.service",
        "[Service]\nType=oneshot\nExecStart=/bin/sleep 600\n",
    );
    m.reload().await.unwrap();
    let t = Instant::now();
    match m.start_unit("slow.service").await {
        Err(SystemdError::JobTimeout { method, unit, secs }) => {
            assert_eq!(
                (method, unit.as_str(), secs),
                ("StartUnit", "slow.service", 1)
            )
        }
        other => panic!("expected a job timeout, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(ns.show("slow.service", "ActiveState"), "activating");
    // Stopping cancels the start job and ends the unit (a oneshot killed while starting counts as failed).
    assert_eq!(m.stop_unit("slow.service").await.unwrap(), JobResult::Done);
    let st = ns.show("slow.service", "ActiveState");
    assert!(st == "inactive" || st == "failed", "{st}");
    assert_eq!(ns.show("slow.service", "MainPID"), "0");
}

async fn unknown_unit_is_a_call_error(m: &dyn ServiceManager) {
    match m.start_unit("no-such-unit.service").await {
        Err(SystemdError::Call { unit, message, .. }) => {
            assert_eq!(unit, "no-such-unit.service");
            assert!(message.contains("not found"), "{message}");
        }
        other => panic!("expected a call error, got {other:?}"),
    }
}

macro_rules! both_backends {
    ($($name:ident => |$ns:ident, $m:ident, $b:ident| $body:expr;)*) => {
        mod dbus_backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some($ns) = SystemdNs::boot(concat!("dbus::", stringify!($name))) else { return };
                    let $b = Backend::Dbus;
                    let $m = manager(&$ns, $b, Duration::from_secs(60));
                    $body;
                }
            )*
        }
        mod systemctl_backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some($ns) = SystemdNs::boot(concat!("systemctl::", stringify!($name))) else { return };
                    let $b = Backend::Systemctl;
                    let $m = manager(&$ns, $b, Duration::from_secs(60));
                    $body;
                }
            )*
        }
    };
}

both_backends! {
    start_and_stop => |ns, m, _b| start_and_stop_real_units(&ns, &*m).await;
    failing_unit => |ns, m, _b| failing_unit_and_reset_failed(&ns, &*m).await;
    exec_condition => |ns, m, _b| unmet_exec_condition(&ns, &*m).await;
    reload_drop_in => |ns, m, _b| reload_picks_up_a_drop_in(&ns, &*m).await;
    freeze_thaw => |ns, m, _b| freeze_and_thaw(&ns, &*m).await;
    job_timeout => |ns, _m, b| {
        let m = manager(&ns, b, Duration::from_secs(1));
        job_timeout_leaves_the_job_running(&ns, &*m).await
    };
    unknown_unit => |ns, m, _b| { let _ = &ns; unknown_unit_is_a_call_error(&*m).await };
}

/// The bus daemon goes away: calls fail promptly with a clear error instead of hanging; once it is back,
/// the next call reconnects (and re-subscribes: job results arrive again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_bus_going_away_and_coming_back() {
    let Some(ns) = SystemdNs::boot("dbus_bus_going_away_and_coming_back") else {
        return;
    };
    ns.write_unit("sleeper.service", SLEEPER);
    ns.write_unit("marker.service", &marker_unit("marker"));
    let m = DbusManager::new(&ns.bus, DbusOptions::default()).unwrap();
    assert!(
        !m.is_connected().await,
        "nothing connects before the first call"
    );
    assert_eq!(
        m.start_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    assert!(m.is_connected().await);

    ns.stop_bus();
    let t = Instant::now();
    let e = m.unit_state("sleeper.service").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "failed promptly: {:?}",
        t.elapsed()
    );
    let text = e.to_string();
    assert!(
        matches!(e, SystemdError::Call { .. } | SystemdError::Connect { .. }),
        "{e:?}"
    );
    assert!(!m.is_connected().await, "the broken connection is dropped");
    // Still gone: a connect error naming the address.
    match m.start_unit("marker.service").await {
        Err(SystemdError::Connect { address, message }) => {
            assert_eq!(address, ns.bus);
            assert!(!message.is_empty());
        }
        other => panic!("expected a connect error while the bus is down ({text}), got {other:?}"),
    }
    assert!(!ns.run_path("marker").exists());
    // The services themselves are untouched by the bus outage.
    assert_eq!(ns.show("sleeper.service", "ActiveState"), "active");

    ns.start_bus();
    assert!(
        eventually(Duration::from_secs(60), || async {
            m.unit_state("sleeper.service").await.is_ok()
        })
        .await,
        "no reconnect after the bus came back; log:\n{}",
        ns.log_tail()
    );
    assert_eq!(
        m.start_unit("marker.service").await.unwrap(),
        JobResult::Done
    );
    assert!(ns.run_path("marker").exists());
    assert_eq!(
        m.stop_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
}

/// Many jobs at once on one connection: each caller gets its own job's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_concurrent_jobs_each_get_their_result() {
    let Some(ns) = SystemdNs::boot("dbus_concurrent_jobs_each_get_their_result") else {
        return;
    };
    ns.write_unit("w@.service", "[Service]\nExecStart=/bin/sleep infinity\n");
    ns.write_unit(
        "f@.service",
        "[Service]\nType=oneshot\nExecStart=/bin/false %i\n",
    );
    let m = Arc::new(DbusManager::new(&ns.bus, DbusOptions::default()).unwrap());
    m.reload().await.unwrap();
    let n = 24;
    let jobs = (0..n).map(|i| {
        let m = m.clone();
        tokio::spawn(async move {
            // Even instances run, odd ones fail.
            let unit = if i % 2 == 0 {
                format!("w@{i}.service")
            } else {
                format!("f@{i}.service")
            };
            let r = m.start_unit(&unit).await;
            (unit, r)
        })
    });
    for (i, j) in futures::future::join_all(jobs)
        .await
        .into_iter()
        .enumerate()
    {
        let (unit, r) = j.unwrap();
        let want = if i % 2 == 0 {
            JobResult::Done
        } else {
            JobResult::Failed
        };
        assert_eq!(r.unwrap(), want, "{unit}");
    }
    let stops = (0..n).step_by(2).map(|i| {
        let m = m.clone();
        tokio::spawn(async move { m.stop_unit(&format!("w@{i}.service")).await })
    });
    for s in futures::future::join_all(stops).await {
        assert_eq!(s.unwrap().unwrap(), JobResult::Done);
    }
    for i in (0..n).step_by(2) {
        assert_eq!(
            ns.show(&format!("w@{i}.service"), "ActiveState"),
            "inactive"
        );
    }
}

/// Teardown leaves nothing: no process in the cgroup, no cgroup, no run dir.
#[test]
fn teardown_leaves_nothing_behind() {
    let Some(ns) = SystemdNs::boot("teardown_leaves_nothing_behind") else {
        return;
    };
    let (run_dir, cgroup, pid) = (ns.run_dir.clone(), ns.cgroup.clone(), ns.pid);
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let o = ns.systemctl(&["start", "dbus.service"]);
    assert!(o.status.success());
    drop(ns);
    assert!(!run_dir.exists(), "{} left", run_dir.display());
    assert!(!cgroup.exists(), "{} left", cgroup.display());
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_ne!(comm.trim(), "systemd", "the namespace's systemd still runs");
}

/// The bus-side observer the latency benchmark uses sees our StopUnit call, with its unit argument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_monitor_sees_the_stop_unit_call() {
    use futures::StreamExt;
    let Some(ns) = SystemdNs::boot("a_bus_monitor_sees_the_stop_unit_call") else {
        return;
    };
    ns.write_unit("sleeper.service", SLEEPER);
    let (_c, mut mon) =
        common::systemd::bus_monitor(&ns.bus, &["type='method_call',member='StopUnit'"])
            .await
            .unwrap();
    let m = DbusManager::new(&ns.bus, DbusOptions::default()).unwrap();
    assert_eq!(
        m.start_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    assert_eq!(
        m.stop_unit("sleeper.service").await.unwrap(),
        JobResult::Done
    );
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(Ok(msg)) = mon.next().await {
            let h = msg.header();
            if h.member().map(|m| m.as_str()) == Some("StopUnit") {
                let (unit, mode): (String, String) = msg.body().deserialize().unwrap();
                return Some((unit, mode));
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(
        seen,
        Some(("sleeper.service".to_string(), "replace".to_string()))
    );
}

/// The agent checks --systemd-bus up front but connects only when a promoter needs systemd: a malformed
/// address stops it with a message naming the flag; a bus that is not there does not keep it from running.
#[test]
fn agent_checks_the_bus_address_but_does_not_need_a_bus() {
    let dir = tempfile::tempdir().unwrap();
    let agent = env!("CARGO_BIN_EXE_drbd-reactor");
    let sim = env!("CARGO_BIN_EXE_drbd-sim");
    let script = dir.path().join("events2.txt");
    std::fs::write(&script, "exists -\n").unwrap();
    let base = |bus: &str| {
        let mut c = std::process::Command::new(agent);
        c.arg("agent")
            .arg("--policy-dir")
            .arg(dir.path())
            .arg("--drbdsetup")
            .arg(format!("{sim} --replay {}", script.display()))
            .arg("--drbdadm")
            .arg("true")
            .arg("--systemd-bus")
            .arg(bus)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c
    };
    let out = base("nonsense:foo=bar")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--systemd-bus"), "{err}");
    assert!(err.contains("nonsense:foo=bar"), "{err}");

    let port = common::free_port();
    let missing = format!("unix:path={}/no-bus-here", dir.path().display());
    let mut child = base(&missing)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .spawn()
        .unwrap();
    let ready = common::wait_until(Duration::from_secs(60), || {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/readyz"))
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "the agent did not become ready without a bus");
}
