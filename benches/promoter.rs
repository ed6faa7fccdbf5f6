//! Promoter reaction latency inside the agent: from the change update that loses quorum being queued
//! to the plugin's `StopUnit` call on the service manager (an in-memory recording double here; the
//! end-to-end figure over D-Bus against a real systemd is the systemd client's benchmark). Measured with
//! 1 and with 1000 configured resources (in one policy), 1000 samples each, on a 2-worker runtime.
//!
//! `cargo bench --bench promoter` prints p50/p99/max per configuration.

use drbd_reactor::drbd::state::{Connection, Device, PeerDevice, Resource};
use drbd_reactor::drbd::{ConnState, DiskState, Role, Tri, Verb};
use drbd_reactor::engine::update::{Change, DeviceState, ResourceState, Update};
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::promoter::decide::Timing;
use drbd_reactor::plugins::promoter::{Promoter, PromoterOptions, Templates};
use drbd_reactor::plugins::{
    channel, DetailHandle, EventSink, InstanceId, InstanceSpec, Plugin, PluginCtx,
};
use drbd_reactor::systemd::{JobResult, ServiceManager, SystemdError, UnitState};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::os::unix::fs::PermissionsExt;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

struct Fake {
    stops: mpsc::Sender<(String, Instant)>,
}

impl ServiceManager for Fake {
    fn reload(&self) -> BoxFuture<'_, Result<(), SystemdError>> {
        async { Ok(()) }.boxed()
    }
    fn start_unit<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        async { Ok(JobResult::Done) }.boxed()
    }
    fn stop_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        let at = Instant::now();
        let _ = self.stops.send((unit.to_string(), at));
        async { Ok(JobResult::Done) }.boxed()
    }
    fn reset_failed_unit<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        async { Ok(()) }.boxed()
    }
    fn unit_state<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<UnitState, SystemdError>> {
        async {
            Ok(UnitState {
                active_state: "active".into(),
                ..Default::default()
            })
        }
        .boxed()
    }
    fn freeze_unit<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        async { Ok(()) }.boxed()
    }
    fn thaw_unit<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        async { Ok(()) }.boxed()
    }
}

fn name(i: usize) -> String {
    format!("pvc-{i:08x}")
}

fn state(res: &str, role: Role, may_promote: bool, quorum: bool) -> Arc<Resource> {
    let mut r = Resource::new(res);
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
    let mut p = PeerDevice::new(0);
    p.peer_disk = DiskState::UpToDate;
    c.peer_devices.insert(0, p);
    r.connections.insert(1, c);
    Arc::new(r)
}

fn percentile(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn run(resources: usize, samples: usize) {
    let dir = tempfile::tempdir().unwrap();
    let show = dir.path().join("drbdsetup");
    std::fs::write(
        &show,
        "#!/bin/sh\necho '[{\"options\":{\"quorum\":\"majority\"},\"connections\":[{\"net\":{}}]}]'\n",
    )
    .unwrap();
    std::fs::set_permissions(&show, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (tx, rx) = mpsc::channel();
    let opts = PromoterOptions {
        manager: Some(Arc::new(Fake { stops: tx })),
        unit_dir: dir.path().join("units"),
        templates: Templates::Never,
        drbdsetup: vec![show.display().to_string()],
        timing: Timing {
            min_start_interval: Duration::ZERO,
            retry_interval: Duration::from_secs(3600),
            ..Timing::default()
        },
        ..PromoterOptions::default()
    };
    let list: Vec<serde_json::Value> = (0..resources)
        .map(|i| serde_json::json!({"name": name(i), "start": [format!("app-{i}.service")], "adjustResourceOnStart": false}))
        .collect();
    let spec = InstanceSpec {
        id: InstanceId {
            policy: "bench".into(),
            kind: "promoter".into(),
        },
        config: serde_json::json!({ "resources": list }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let plugin = Box::new(Promoter::from_spec(&spec, &opts).unwrap());
    let (out, inbox) = channel(plugin.subscription());
    let metrics = AgentMetrics::new();
    let detail = DetailHandle::default();
    let ctx = PluginCtx {
        id: spec.id.clone(),
        node_name: "n1".into(),
        metrics: metrics.clone(),
        detail: detail.clone(),
        events: EventSink::default(),
    };
    let _task = rt.spawn(plugin.run(inbox, ctx));
    let send = |u: Update| {
        out.send(&Arc::new(u));
    };
    // Every resource starts out with its services running (the double reports every target active)
    // and a known Primary role.
    for i in 0..resources {
        let n = name(i);
        let s = state(&n, Role::Primary, false, true);
        send(Update {
            event: Verb::Exists,
            resource: n.clone(),
            change: Change::Resource {
                old: ResourceState::default(),
                new: ResourceState::from(&*s),
            },
            state: s,
        });
    }
    // ready: unit files written, every target observed active
    let last = metrics
        .promoter_state
        .with_label_values(&[&name(resources - 1), "active"]);
    let deadline = Instant::now() + Duration::from_secs(300);
    while last.get() != 1 {
        assert!(Instant::now() < deadline, "the plugin did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    // steady state: every resource's split-brain-avoidance policy detected (one drbdsetup show each)
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let detected = detail.get().is_some_and(|d| {
            d["resources"]
                .as_array()
                .is_some_and(|a| a.iter().all(|r| r["splitBrainAvoidance"] == "Quorum"))
        });
        if detected {
            break;
        }
        assert!(Instant::now() < deadline, "detection did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut lat = Vec::with_capacity(samples);
    for k in 0..samples {
        let i = k % resources;
        let n = name(i);
        if k >= resources {
            // re-arm: promotable again, the start (delay 0) makes the services run again
            let s = state(&n, Role::Secondary, true, true);
            send(Update {
                event: Verb::Change,
                resource: n.clone(),
                change: Change::Resource {
                    old: ResourceState {
                        role: Role::Secondary,
                        may_promote: Tri::No,
                        promotion_score: 0,
                    },
                    new: ResourceState::from(&*s),
                },
                state: s,
            });
            let want = (k / resources) as u64;
            let c = metrics
                .promoter_actions
                .with_label_values(&[&n, "start", "ok"]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.get() < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let s = state(&n, Role::Primary, false, false);
        let dev = DeviceState::from(s.devices.values().next().unwrap());
        let u = Update {
            event: Verb::Change,
            resource: n.clone(),
            change: Change::Device {
                volume: 0,
                old: DeviceState {
                    quorum: Tri::Yes,
                    ..dev.clone()
                },
                new: dev,
            },
            state: s,
        };
        let u = Arc::new(u);
        let t0 = Instant::now();
        out.send(&u);
        let Ok((unit, at)) = rx.recv_timeout(Duration::from_secs(10)) else {
            panic!(
                "no StopUnit for {n} (sample {k}); metrics:\n{}",
                prometheus::TextEncoder::new()
                    .encode_to_string(&metrics.registry.gather())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("promoter"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        };
        assert_eq!(
            unit,
            drbd_reactor::plugins::promoter::units::target_unit(&n)
        );
        lat.push(at - t0);
        // let the stop finish before the same resource is used again
        let c = metrics
            .promoter_actions
            .with_label_values(&[&n, "stop", "ok"]);
        let want = (k / resources + 1) as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.get() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    lat.sort();
    println!(
        "promoter quorum-loss → StopUnit, {resources:>4} resources, {samples} samples: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    drop(out);
    rt.shutdown_timeout(Duration::from_secs(5));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    run(1, 1000);
    run(1000, 1000);
}
