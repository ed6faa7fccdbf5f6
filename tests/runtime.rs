//! Plugin instance supervision: a stalled instance is bounded, a failing one is restarted with backoff
//! and a fresh replay, and neither disturbs the others.

use drbd_reactor::engine::runtime::{self, Health, InstanceState, RuntimeConfig, SourceMsg};
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::{
    Delivery, Inbox, InstanceId, InstanceSpec, Plugin, PluginCtx, PluginError, PluginFactory,
    Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Clone, Copy)]
enum Behaviour {
    Count,
    Stall,
    PanicOnThird,
}

struct P {
    b: Behaviour,
    seen: Arc<AtomicUsize>,
}

impl Plugin for P {
    fn subscription(&self) -> Subscription {
        Subscription::CHANGES
    }
    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        _ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            if let Behaviour::Stall = self.b {
                std::future::pending::<()>().await;
            }
            let mut n = 0;
            while let Some(d) = inbox.recv().await {
                if let Delivery::Change(_) = d {
                    n += 1;
                    self.seen.fetch_add(1, Ordering::SeqCst);
                    if matches!(self.b, Behaviour::PanicOnThird) && n == 3 {
                        panic!("plugin bug");
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}

#[derive(Default)]
struct F {
    builds: Mutex<Vec<String>>,
    seen: Mutex<std::collections::HashMap<String, Arc<AtomicUsize>>>,
}

impl PluginFactory for F {
    fn build(&self, spec: &InstanceSpec) -> Result<Box<dyn Plugin>, PluginError> {
        if let Some(why) = spec.config["fail"].as_str() {
            return Err(PluginError::Config(why.to_string()));
        }
        let b = match spec.id.policy.as_str() {
            "stall" => Behaviour::Stall,
            "panic" => Behaviour::PanicOnThird,
            _ => Behaviour::Count,
        };
        self.builds.lock().unwrap().push(spec.id.policy.clone());
        let seen = self
            .seen
            .lock()
            .unwrap()
            .entry(spec.id.policy.clone())
            .or_default()
            .clone();
        Ok(Box::new(P { b, seen }))
    }
}

fn spec(p: &str) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId {
            policy: p.into(),
            kind: "test".into(),
        },
        config: serde_json::Value::Null,
    }
}

fn lines(n: usize, offset: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            format!(
                "change resource name:r{} role:Primary may_promote:no promotion_score:{}\n",
                i % 7,
                i + offset
            )
        })
        .collect::<String>()
        .into_bytes()
}

async fn wait_for(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn wait(what: &str, f: impl FnMut() -> bool) {
    assert!(wait_for(f).await, "timed out: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_instance_overruns_and_others_keep_going() {
    let f = Arc::new(F::default());
    let (tx, rx) = mpsc::channel(8);
    let cfg = RuntimeConfig {
        max_queued: 5000,
        restart_backoff: Duration::from_secs(30),
        ..Default::default()
    };
    let metrics = AgentMetrics::new();
    let (engine, task) = runtime::spawn(
        cfg,
        f.clone(),
        metrics.clone(),
        Arc::new(Health::default()),
        rx,
    );
    engine.apply(vec![spec("stall"), spec("ok")]).await.unwrap();
    // chunks of 100 lines; "ok" keeps up (the test waits for it), "stall" never reads
    let ok = f.seen.lock().unwrap()["ok"].clone();
    for i in 0..100 {
        tx.send(SourceMsg::Chunk(lines(100, i * 100)))
            .await
            .unwrap();
        let want = (i + 1) * 100;
        if !wait_for(|| ok.load(Ordering::SeqCst) == want).await {
            panic!(
                "ok saw {} of {want}: {:#?}",
                ok.load(Ordering::SeqCst),
                engine.snapshot().await.unwrap().instances
            );
        }
    }
    let snap = engine.snapshot().await.unwrap();
    let stall = snap
        .instances
        .iter()
        .find(|i| i.id.policy == "stall")
        .unwrap();
    assert_eq!(stall.state, InstanceState::Failed);
    assert!(
        stall.last_error.as_deref().unwrap().starts_with("overrun"),
        "{:?}",
        stall.last_error
    );
    assert_eq!(stall.queued, 0, "its queue was freed");
    assert!(stall.restart_in_seconds.unwrap() > 20.0);
    assert_eq!(
        metrics.plugin_errors.with_label_values(&["test"]).get(),
        1,
        "{:#?}",
        snap.instances
    );
    let ok_status = snap.instances.iter().find(|i| i.id.policy == "ok").unwrap();
    assert_eq!(ok_status.state, InstanceState::Running);
    engine.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_instance_is_restarted_with_a_fresh_replay() {
    let f = Arc::new(F::default());
    let (tx, rx) = mpsc::channel(8);
    let cfg = RuntimeConfig {
        restart_backoff: Duration::from_millis(50),
        ..Default::default()
    };
    let metrics = AgentMetrics::new();
    let (engine, task) = runtime::spawn(
        cfg,
        f.clone(),
        metrics.clone(),
        Arc::new(Health::default()),
        rx,
    );
    engine.apply(vec![spec("panic"), spec("ok")]).await.unwrap();
    tx.send(SourceMsg::Chunk(lines(2, 0))).await.unwrap();
    tx.send(SourceMsg::Chunk(lines(10, 100))).await.unwrap();
    let ok = f.seen.lock().unwrap()["ok"].clone();
    wait("ok saw everything", || ok.load(Ordering::SeqCst) == 12).await;
    // it panics on its third update; each restart replays the 7 resources and it panics again
    wait("two restarts", || {
        f.builds
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == "panic")
            .count()
            >= 3
    })
    .await;
    let snap = engine.snapshot().await.unwrap();
    let p = snap
        .instances
        .iter()
        .find(|i| i.id.policy == "panic")
        .unwrap();
    assert!(p.restarts >= 2);
    assert_eq!(p.last_error.as_deref(), Some("panicked: plugin bug"));
    assert!(metrics.plugin_restarts.with_label_values(&["test"]).get() >= 2);
    // backoff grows: 50 ms, 100 ms, 200 ms, ... so there are few restarts in a short time
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        f.builds
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == "panic")
            .count()
            <= 6
    );
    let okst = snap.instances.iter().find(|i| i.id.policy == "ok").unwrap();
    assert_eq!(
        (okst.state.clone(), okst.restarts),
        (InstanceState::Running, 0)
    );
    engine.shutdown().await.unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn an_invalid_instance_reports_its_latest_configuration_error() {
    let f = Arc::new(F::default());
    let (_tx, rx) = mpsc::channel(8);
    let (engine, task) = runtime::spawn(
        RuntimeConfig::default(),
        f.clone(),
        AgentMetrics::new(),
        Arc::new(Health::default()),
        rx,
    );
    let bad = |why: &str| InstanceSpec {
        id: InstanceId {
            policy: "bad".into(),
            kind: "test".into(),
        },
        config: serde_json::json!({ "fail": why }),
    };
    for why in ["first mistake", "second mistake"] {
        let report = engine.apply(vec![bad(why), spec("ok")]).await.unwrap();
        assert_eq!(report.errors.len(), 1);
        let snap = engine.snapshot().await.unwrap();
        let b = snap
            .instances
            .iter()
            .find(|i| i.id.policy == "bad")
            .unwrap();
        assert_eq!(b.state, InstanceState::Invalid);
        assert_eq!(
            b.last_error.as_deref(),
            Some(format!("invalid configuration: {why}").as_str())
        );
    }
    // fixed: it starts
    let report = engine.apply(vec![spec("bad"), spec("ok")]).await.unwrap();
    assert!(report.errors.is_empty() && report.started.iter().any(|i| i.policy == "bad"));
    engine.shutdown().await.unwrap();
    task.await.unwrap();
}
