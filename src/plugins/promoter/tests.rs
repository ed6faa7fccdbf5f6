//! Effect sequencing of the plugin task against an in-memory, recording test double of the
//! `ServiceManager` (the real-systemd tests live with the D-Bus client).

use super::*;
use crate::drbd::state::{Connection, Device, PeerDevice, Resource};
use crate::drbd::{ConnState, DiskState, Role, Tri, Verb};
use crate::engine::update::{Change, DeviceState, ResourceState, Update};
use crate::metrics::AgentMetrics;
use crate::plugins::{channel, DetailHandle, EventSink, InstanceId, Outbox, PluginCtx};
use crate::systemd::{JobResult, SystemdError, UnitState};
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

/// Records every call; a started unit is active until stopped. `refuse_promotion` makes a start behave
/// like a lost promotion race (the target fails with 'dependency', the promote unit stays inactive).
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    active: Mutex<HashSet<String>>,
    refuse_promotion: std::sync::atomic::AtomicBool,
    /// Stopping a target leaves its promote unit `failed` (the demotion failed).
    fail_demote: std::sync::atomic::AtomicBool,
    failed: Mutex<HashSet<String>>,
    /// The units whose state was asked for.
    states: Mutex<Vec<String>>,
    /// A file that reloads and state queries are also appended to (to order them against processes).
    journal: Mutex<Option<std::path::PathBuf>>,
}

impl Recorder {
    fn note(&self, what: &str) {
        if let Some(p) = &*self.journal.lock().unwrap() {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .unwrap();
            writeln!(f, "{what}").unwrap();
        }
    }
    fn rec(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    /// Whether `call` was made.
    fn called(&self, call: &str) -> bool {
        self.calls.lock().unwrap().iter().any(|c| c == call)
    }
}

impl ServiceManager for Recorder {
    fn reload(&self) -> BoxFuture<'_, Result<(), SystemdError>> {
        self.rec("reload".into());
        self.note("reload");
        async { Ok(()) }.boxed()
    }
    fn start_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        self.rec(format!("start {unit}"));
        async move {
            if self
                .refuse_promotion
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(JobResult::Dependency);
            }
            let res = unit
                .strip_prefix("drbd-services@")
                .and_then(|u| u.strip_suffix(".target"))
                .unwrap_or("");
            let mut a = self.active.lock().unwrap();
            a.insert(unit.to_string());
            a.insert(format!("drbd-promote@{res}.service"));
            Ok(JobResult::Done)
        }
        .boxed()
    }
    fn stop_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        self.rec(format!("stop {unit}"));
        self.active.lock().unwrap().remove(unit);
        if self.fail_demote.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(res) = unit
                .strip_prefix("drbd-services@")
                .and_then(|u| u.strip_suffix(".target"))
            {
                self.failed
                    .lock()
                    .unwrap()
                    .insert(format!("drbd-promote@{res}.service"));
            }
        }
        async { Ok(JobResult::Done) }.boxed()
    }
    fn reset_failed_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        self.rec(format!("reset-failed {unit}"));
        async { Ok(()) }.boxed()
    }
    fn unit_state<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitState, SystemdError>> {
        self.states.lock().unwrap().push(unit.to_string());
        self.note(&format!("state {unit}"));
        let active = self.active.lock().unwrap().contains(unit);
        let failed = self.failed.lock().unwrap().contains(unit);
        async move {
            Ok(UnitState {
                active_state: if failed {
                    "failed"
                } else if active {
                    "active"
                } else {
                    "inactive"
                }
                .into(),
                sub_state: String::new(),
                freezer_state: "running".into(),
            })
        }
        .boxed()
    }
    fn freeze_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        self.rec(format!("freeze {unit}"));
        async { Ok(()) }.boxed()
    }
    fn thaw_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        self.rec(format!("thaw {unit}"));
        async { Ok(()) }.boxed()
    }
}

const SHOW: &str = r#"[{"resource":"r0","options":{"quorum":"majority","on-no-quorum":"io-error","on-no-data-accessible":"io-error","on-suspended-primary-outdated":"force-secondary","auto-promote":false},"connections":[{"net":{"fencing":"dont-care"}}]}]"#;

struct Env {
    dir: tempfile::TempDir,
    rec: Arc<Recorder>,
    opts: PromoterOptions,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let show = dir.path().join("drbdsetup");
    std::fs::write(&show, format!("#!/bin/sh\ncat <<'EOF'\n{SHOW}\nEOF\n")).unwrap();
    std::fs::set_permissions(&show, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.path().join("units")).unwrap();
    let rec = Arc::new(Recorder::default());
    let opts = PromoterOptions {
        manager: Some(rec.clone()),
        unit_dir: dir.path().join("units"),
        templates: Templates::Always,
        drbdsetup: vec![show.display().to_string()],
        ..PromoterOptions::default()
    };
    Env { dir, rec, opts }
}

fn instance(policy: &str, resources: serde_json::Value) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId {
            policy: policy.into(),
            kind: "promoter".into(),
        },
        config: serde_json::json!({ "resources": resources }),
    }
}

fn ctx(metrics: &AgentMetrics, detail: &DetailHandle) -> PluginCtx {
    PluginCtx {
        id: InstanceId {
            policy: "p".into(),
            kind: "promoter".into(),
        },
        node_name: "n1".into(),
        metrics: metrics.clone(),
        detail: detail.clone(),
        events: EventSink::default(),
    }
}

fn state(role: Role, may_promote: bool, quorum: bool) -> Arc<Resource> {
    let mut r = Resource::new("r0");
    r.role = role;
    r.may_promote = Tri::from_bool(may_promote);
    let mut d = Device::new(0);
    d.disk = DiskState::UpToDate;
    d.quorum = Tri::from_bool(quorum);
    d.client = Tri::No;
    r.devices.insert(0, d);
    let mut c = Connection::new(1);
    c.conn_name = "n2".into();
    c.connection = ConnState::Connected;
    c.peer_role = Role::Secondary;
    let mut p = PeerDevice::new(0);
    p.peer_disk = DiskState::UpToDate;
    c.peer_devices.insert(0, p);
    r.connections.insert(1, c);
    Arc::new(r)
}

fn send_resource(out: &Outbox, old: (Role, bool), new: Arc<Resource>) {
    let u = Update {
        event: Verb::Change,
        resource: "r0".into(),
        change: Change::Resource {
            old: ResourceState {
                role: old.0,
                may_promote: Tri::from_bool(old.1),
                promotion_score: 0,
            },
            new: ResourceState::from(&*new),
        },
        state: new,
    };
    out.send(&Arc::new(u));
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn detail_state(d: &DetailHandle) -> Option<(String, String)> {
    let v = d.get()?;
    let r = &v["resources"][0];
    Some((
        r["state"].as_str()?.to_string(),
        r["reason"].as_str()?.to_string(),
    ))
}

#[test]
fn refuses_to_build_without_a_manager_unless_shell_only() {
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service"]}]),
    );
    let e = Promoter::from_spec(&inst, &PromoterOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--systemd-bus"), "{e}");
    let shell = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["true"], "runner": "shell"}]),
    );
    assert!(Promoter::from_spec(&shell, &PromoterOptions::default()).is_ok());
    // an agent without the promoter (the chart's unprivileged default) refuses even the shell runner
    let off = PromoterOptions {
        enabled: false,
        ..PromoterOptions::default()
    };
    let e = Promoter::from_spec(&shell, &off).err().unwrap().to_string();
    assert!(e.contains("--allow-promoter=false"), "{e}");
    let bad = instance("p", serde_json::json!([{"name": "r0", "start": ["ocf:x"]}]));
    assert!(Promoter::from_spec(&bad, &env().opts).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_then_stop_on_quorum_loss_then_files_removed_on_exit() {
    let e = env();
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service", "b.service"]}]),
    );
    let plugin = Box::new(Promoter::from_spec(&inst, &e.opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(plugin.run(inbox, ctx(&metrics, &detail)));
    let units = e.opts.unit_dir.clone();

    // files first, one reload, then the observation of the target
    eventually("reload", || e.rec.called("reload")).await;
    assert!(
        units.join("drbd-promote@.service").exists(),
        "templates installed"
    );
    assert!(units
        .join("drbd-services@r0.target.d/reactor.conf")
        .exists());
    assert!(units.join("b.service.d/reactor.conf").exists());

    // promotable: detection (drbdsetup show), no delay (UpToDate, no preferred nodes), start
    send_resource(
        &out,
        (Role::Secondary, false),
        state(Role::Secondary, true, true),
    );
    eventually("start", || e.rec.called("start drbd-services@r0.target")).await;
    let calls = e.rec.calls();
    let pos = |s: &str| calls.iter().position(|c| c == s).unwrap();
    assert!(pos("reload") < pos("reset-failed drbd-services@r0.target"));
    assert!(pos("reset-failed drbd-services@r0.target") < pos("start drbd-services@r0.target"));
    send_resource(
        &out,
        (Role::Secondary, true),
        state(Role::Primary, false, true),
    );
    eventually("active in the detail", || {
        detail_state(&detail).is_some_and(|s| s.0 == "active")
    })
    .await;
    assert_eq!(
        metrics
            .promoter_actions
            .with_label_values(&["r0", "start", "ok"])
            .get(),
        1
    );
    assert_eq!(
        metrics
            .promoter_state
            .with_label_values(&["r0", "active"])
            .get(),
        1
    );
    assert!(
        !prometheus::TextEncoder::new()
            .encode_to_string(&metrics.registry.gather())
            .unwrap()
            .contains("state=\"\""),
        "no series with an empty state"
    );
    let v = detail.get().unwrap();
    assert_eq!(v["resources"][0]["name"], "r0");
    assert_eq!(v["resources"][0]["lastAction"]["action"], "start");
    assert_eq!(v["resources"][0]["lastAction"]["result"], "ok");
    assert!(v["resources"][0]["lastAction"]["at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // quorum loss: the target is stopped
    let lost = state(Role::Primary, false, false);
    let dev = DeviceState::from(lost.devices.values().next().unwrap());
    let u = Update {
        event: Verb::Change,
        resource: "r0".into(),
        change: Change::Device {
            volume: 0,
            old: DeviceState {
                quorum: Tri::Yes,
                ..dev.clone()
            },
            new: dev,
        },
        state: lost,
    };
    out.send(&Arc::new(u));
    eventually("stop", || e.rec.called("stop drbd-services@r0.target")).await;
    eventually("stopped", || {
        metrics
            .promoter_actions
            .with_label_values(&["r0", "stop", "ok"])
            .get()
            == 1
    })
    .await;

    // the policy goes away: services are not running, so the files go (and systemd reloads)
    out.close();
    task.await.unwrap().unwrap();
    assert!(!units.join("drbd-services@r0.target.d").exists());
    assert!(!units.join("a.service.d").exists());
    assert_eq!(e.rec.calls().iter().filter(|c| *c == "reload").count(), 2);
    assert!(
        units.join("drbd-promote@.service").exists(),
        "templates stay"
    );
    drop(e.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_race_stops_the_target_and_counts_no_failure() {
    let e = env();
    e.rec
        .refuse_promotion
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service"]}]),
    );
    let plugin = Box::new(Promoter::from_spec(&inst, &e.opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(plugin.run(inbox, ctx(&metrics, &detail)));
    send_resource(
        &out,
        (Role::Secondary, false),
        state(Role::Secondary, true, true),
    );
    eventually("stop after the refused start", || {
        e.rec.called("stop drbd-services@r0.target")
    })
    .await;
    eventually("explained", || {
        detail_state(&detail).is_some_and(|s| s.1.starts_with("last start did not promote DRBD"))
    })
    .await;
    assert_eq!(
        metrics
            .promoter_actions
            .with_label_values(&["r0", "start", "not-promoted"])
            .get(),
        1
    );
    out.close();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_without_stop_or_file_removal() {
    let e = env();
    let spec =
        serde_json::json!([{"name": "r0", "start": ["a.service"], "stopServicesOnExit": true}]);
    let first = Box::new(Promoter::from_spec(&instance("p", spec.clone()), &e.opts).unwrap());
    let (mut out, inbox) = channel(first.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(first.run(inbox, ctx(&metrics, &detail)));
    eventually("files", || {
        e.opts
            .unit_dir
            .join("drbd-services@r0.target.d/reactor.conf")
            .exists()
    })
    .await;
    // a changed configuration: the successor is built (claims r0) before the first one exits
    let mut changed = spec.clone();
    changed[0]["evict"] = serde_json::json!(["n9"]);
    let second = Promoter::from_spec(&instance("p", changed), &e.opts).unwrap();
    out.close();
    task.await.unwrap().unwrap();
    assert!(
        !e.rec.calls().iter().any(|c| c.starts_with("stop ")),
        "handed over: no stop, {:?}",
        e.rec.calls()
    );
    assert!(e
        .opts
        .unit_dir
        .join("drbd-services@r0.target.d/reactor.conf")
        .exists());
    // the successor exits for good (policy removed): stopServicesOnExit stops, files go
    let (mut out, inbox) = channel(second.subscription());
    let task = tokio::spawn(Box::new(second).run(inbox, ctx(&metrics, &detail)));
    out.close();
    task.await.unwrap().unwrap();
    assert!(e.rec.called("stop drbd-services@r0.target"));
    assert!(!e.opts.unit_dir.join("drbd-services@r0.target.d").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_keeps_files_and_running_services() {
    let e = env();
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service"]}]),
    );
    let plugin = Box::new(Promoter::from_spec(&inst, &e.opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(plugin.run(inbox, ctx(&metrics, &detail)));
    eventually("reload", || e.rec.called("reload")).await;
    e.opts.registry.begin_shutdown();
    out.close();
    task.await.unwrap().unwrap();
    assert!(!e.rec.calls().iter().any(|c| c.starts_with("stop ")));
    assert!(e
        .opts
        .unit_dir
        .join("drbd-services@r0.target.d/reactor.conf")
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_runner_runs_entries_with_the_resource_in_the_environment() {
    let e = env();
    let log = e.dir.path().join("log");
    let l = log.display().to_string();
    let inst = instance(
        "p",
        serde_json::json!([{
            "name": "r0",
            "runner": "shell",
            "start": [format!("echo \"start1 $DRBD_RES_NAME $DRBD_NODE_NAME\" >> {l}"), format!("echo start2 >> {l}")],
            "stopServicesOnExit": true,
        }]),
    );
    let opts = PromoterOptions {
        manager: None,
        ..e.opts.clone()
    };
    let plugin = Box::new(Promoter::from_spec(&inst, &opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(plugin.run(inbox, ctx(&metrics, &detail)));
    send_resource(
        &out,
        (Role::Secondary, false),
        state(Role::Secondary, true, true),
    );
    eventually("started", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("start2"))
    })
    .await;
    out.close();
    task.await.unwrap().unwrap();
    // stop entries default to the start entries reversed
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "start1 r0 n1\nstart2\nstart2\nstart1 r0 n1\n"
    );
    assert!(
        std::fs::read_dir(&e.opts.unit_dir)
            .unwrap()
            .next()
            .is_none(),
        "no unit files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_demotion_is_reported_as_escalation() {
    let e = env();
    e.rec
        .fail_demote
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service"], "onDrbdDemoteFailure": "reboot"}]),
    );
    let plugin = Box::new(Promoter::from_spec(&inst, &e.opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
    let mut c = ctx(&metrics, &detail);
    c.events = EventSink::new(etx);
    let task = tokio::spawn(plugin.run(inbox, c));
    send_resource(
        &out,
        (Role::Secondary, false),
        state(Role::Secondary, true, true),
    );
    eventually("start", || e.rec.called("start drbd-services@r0.target")).await;
    send_resource(
        &out,
        (Role::Secondary, true),
        state(Role::Primary, false, true),
    );
    eventually("active", || {
        detail_state(&detail).is_some_and(|s| s.0 == "active")
    })
    .await;
    // DRBD demoted under the services (they died): the stop finds the promote unit failed
    send_resource(
        &out,
        (Role::Primary, false),
        state(Role::Secondary, true, true),
    );
    eventually("stop failed", || {
        metrics
            .promoter_actions
            .with_label_values(&["r0", "stop", "failed"])
            .get()
            == 1
    })
    .await;
    let mut found = None;
    while let Ok(ev) = erx.try_recv() {
        if ev.reason == "StopFailed" {
            found = Some(ev);
        }
    }
    let ev = found.expect("a StopFailed event");
    assert!(ev.warning);
    assert!(
        ev.message.contains("demoting DRBD failed")
            && ev.message.contains("onDrbdDemoteFailure reboot"),
        "{}",
        ev.message
    );
    out.close();
    task.await.unwrap().unwrap();
}

/// At start-up the freezer state of the start units is asked only when the services run (an inactive
/// target's units are not frozen): two D-Bus round trips less per start unit before the first decision,
/// which cost 0.8 s on the real-DRBD lab's guests.
#[tokio::test]
async fn observe_asks_for_frozen_units_only_when_the_services_run() {
    let e = env();
    let spec: PromotedResource = serde_json::from_value(serde_json::json!({
        "name": "r0", "start": ["a.mount", "b.service"]
    }))
    .unwrap();
    let eff = effects::Effects {
        manager: Some(e.rec.clone()),
        host_exec: Vec::new(),
        drbdsetup: Vec::new(),
        drbdadm: Vec::new(),
        node: "n1".into(),
        cgroup2: true,
    };
    assert_eq!(eff.observe(&spec).await, Some((false, false)));
    assert_eq!(
        *e.rec.states.lock().unwrap(),
        vec!["drbd-services@r0.target".to_string()]
    );
    e.rec.states.lock().unwrap().clear();
    e.rec
        .active
        .lock()
        .unwrap()
        .insert("drbd-services@r0.target".into());
    assert_eq!(eff.observe(&spec).await, Some((true, false)));
    assert_eq!(
        *e.rec.states.lock().unwrap(),
        vec![
            "drbd-services@r0.target".to_string(),
            "b.service".to_string()
        ]
    );
}

/// `drbdadm adjust` (which may bring the resource up) runs only after the reload and the observation of
/// the services: once the promoter can act. Run side by side with a slow reload, a returning preferred
/// node finished its resync before its promoter was ready, the Primary failed back to it, and a less
/// preferred node took the services (real DRBD in QEMU guests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjust_runs_after_the_reload_and_the_observation() {
    let mut e = env();
    let journal = e.dir.path().join("journal");
    *e.rec.journal.lock().unwrap() = Some(journal.clone());
    let adm = e.dir.path().join("drbdadm");
    std::fs::write(
        &adm,
        format!("#!/bin/sh\necho \"adjust $2\" >> '{}'\n", journal.display()),
    )
    .unwrap();
    std::fs::set_permissions(&adm, std::fs::Permissions::from_mode(0o755)).unwrap();
    e.opts.drbdadm = vec![adm.display().to_string()];
    let inst = instance(
        "p",
        serde_json::json!([{"name": "r0", "start": ["a.service"]}]),
    );
    let plugin = Box::new(Promoter::from_spec(&inst, &e.opts).unwrap());
    let (mut out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let task = tokio::spawn(plugin.run(inbox, ctx(&metrics, &detail)));
    eventually("adjust", || {
        std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("adjust"))
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap(),
        "reload\nstate drbd-services@r0.target\nadjust r0\n"
    );
    out.close();
    task.await.unwrap().unwrap();
}
