//! Reloads interleaved with a long event stream: every instance sees the replay of the state at its start
//! followed by exactly the live updates from that point on — nothing lost, nothing duplicated — and an
//! instance kept across reloads sees exactly what an instance that was never reloaded sees.

mod common;

use drbd_reactor::engine::runtime::{self, Health, RuntimeConfig, SourceMsg};
use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::{
    Delivery, Inbox, InstanceId, InstanceSpec, Plugin, PluginCtx, PluginError, PluginFactory,
    Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

type Log = Arc<Mutex<Vec<String>>>;
type View = Arc<Mutex<BTreeMap<String, String>>>;

struct Recorder {
    sub: Subscription,
    log: Log,
    view: View,
}

impl Plugin for Recorder {
    fn subscription(&self) -> Subscription {
        self.sub
    }
    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        _ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            while let Some(d) = inbox.recv().await {
                match d {
                    Delivery::Change(u) => self.log.lock().unwrap().push(u.to_json()),
                    Delivery::Resources(rs) => {
                        let mut v = self.view.lock().unwrap();
                        for (name, r) in rs {
                            match r {
                                Some(r) => {
                                    v.insert(name.to_string(), serde_json::to_string(&*r).unwrap())
                                }
                                None => v.remove(&*name),
                            };
                        }
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}

/// Every instance it built, in order: (spec, log, view).
#[derive(Default)]
struct Factory {
    built: Mutex<Vec<(InstanceSpec, Log, View)>>,
}

impl PluginFactory for Factory {
    fn build(&self, spec: &InstanceSpec) -> Result<Box<dyn Plugin>, PluginError> {
        let sub = Subscription {
            changes: spec.config["changes"].as_bool().unwrap_or(true),
            events: spec.config["events"].as_bool().unwrap_or(false),
        };
        let (log, view) = (Log::default(), View::default());
        self.built
            .lock()
            .unwrap()
            .push((spec.clone(), log.clone(), view.clone()));
        Ok(Box::new(Recorder { sub, log, view }))
    }
}

fn spec(policy: &str, version: u64, events: bool) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId {
            policy: policy.into(),
            kind: "recorder".into(),
        },
        config: serde_json::json!({ "version": version, "events": events }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reloads_lose_and_duplicate_nothing() {
    for seed in [7u64, 1234, 99_999] {
        run_seed(seed).await;
    }
}

async fn run_seed(seed: u64) {
    let mut rng = common::Rng::new(seed);
    let mut gen = common::StreamGen::new(seed, 8, 2, 2);
    // The stream, in chunks, and for every chunk boundary the replay a new instance would get there.
    let mut chunks: Vec<String> = vec![gen.initial().join("\n") + "\n"];
    for _ in 0..1500 {
        let n = 1 + rng.below(4);
        let mut c = String::new();
        for _ in 0..n {
            c.push_str(&(gen.step().join("\n") + "\n"));
        }
        chunks.push(c);
    }
    let mut reference = Engine::new();
    let mut live: Vec<String> = Vec::new();
    let mut boundaries: Vec<(Vec<String>, usize)> = vec![(Vec::new(), 0)];
    for c in &chunks {
        let mut out = Vec::new();
        reference.apply_chunk(c.as_bytes(), &mut out);
        live.extend(out.iter().map(|u| u.to_json()));
        let replay: Vec<String> = reference
            .state
            .replay()
            .iter()
            .map(|u| u.to_json())
            .collect();
        boundaries.push((replay, live.len()));
    }

    let total_lines: u64 = chunks.iter().map(|c| c.lines().count() as u64).sum();
    let factory = Arc::new(Factory::default());
    let metrics = AgentMetrics::new();
    let (tx, rx) = mpsc::channel(8);
    let (engine, task) = runtime::spawn(
        RuntimeConfig::default(),
        factory.clone(),
        metrics.clone(),
        Arc::new(Health::default()),
        rx,
    );
    // "steady" is never reloaded; "kept" is re-applied unchanged every time; the others come, go and change.
    let mut versions: BTreeMap<&str, Option<u64>> = [
        ("steady", Some(0)),
        ("kept", Some(0)),
        ("a", None),
        ("b", None),
        ("c", Some(1)),
    ]
    .into();
    let desired = |v: &BTreeMap<&str, Option<u64>>| -> Vec<InstanceSpec> {
        v.iter()
            .filter_map(|(p, ver)| ver.map(|ver| spec(p, ver, *p == "b" || *p == "steady")))
            .collect()
    };
    engine.apply(desired(&versions)).await.unwrap();
    let mut reloads = 0;
    for c in &chunks {
        tx.send(SourceMsg::Chunk(c.clone().into_bytes()))
            .await
            .unwrap();
        if rng.chance(20) {
            for p in ["a", "b", "c"] {
                match rng.below(3) {
                    0 => {
                        versions.insert(p, None);
                    }
                    1 => {
                        versions.insert(p, Some(rng.below(3)));
                    }
                    _ => {}
                }
            }
            let report = engine.apply(desired(&versions)).await.unwrap();
            assert!(report.errors.is_empty());
            assert!(
                report.kept.iter().any(|i| i.policy == "steady")
                    && report.kept.iter().any(|i| i.policy == "kept")
            );
            reloads += 1;
        }
    }
    assert!(reloads >= 200, "only {reloads} reloads");
    // Control messages may overtake queued chunks: wait until the engine has applied the whole stream.
    let want_final = reference.state.snapshot();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let final_state = loop {
        let s = engine.snapshot().await.unwrap();
        if s.resources == want_final && metrics.lines.get() == total_lines {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "engine did not catch up (seed {seed})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    engine.shutdown().await.unwrap();
    task.await.unwrap();

    let built = factory.built.lock().unwrap();
    let steady: Vec<_> = built
        .iter()
        .filter(|(s, _, _)| s.id.policy == "steady" || s.id.policy == "kept")
        .collect();
    assert_eq!(steady.len(), 2, "steady and kept were built once each");
    for (s, log, _) in &steady {
        let log = log.lock().unwrap();
        let first_diff = log.iter().zip(&live).position(|(a, b)| a != b);
        assert!(
            first_diff.is_none() && log.len() == live.len(),
            "{} differs from the live stream (seed {seed}): lengths {} vs {}, first difference at {first_diff:?}: {:?} vs {:?}",
            s.id.policy,
            log.len(),
            live.len(),
            first_diff.map(|i| &log[i]),
            first_diff.map(|i| &live[i]),
        );
    }
    // Every other instance: the replay at some chunk boundary, then a contiguous run of the live stream.
    let mut checked = 0;
    for (s, log, _) in built.iter() {
        let log = log.lock().unwrap();
        let ok = boundaries.iter().any(|(replay, at)| {
            log.len() >= replay.len()
                && log[..replay.len()] == replay[..]
                && live[*at..].starts_with(&log[replay.len()..])
        });
        assert!(
            ok,
            "instance {} v{} saw a stream with a gap or duplicate (seed {seed})",
            s.id, s.config["version"]
        );
        checked += 1;
    }
    assert!(checked > 50, "only {checked} instances");
    // Every-event subscribers that lived to the end hold the final state of every resource.
    let want: BTreeMap<String, String> = final_state
        .resources
        .iter()
        .map(|r| (r.name.clone(), serde_json::to_string(&**r).unwrap()))
        .collect();
    let last_b = built.iter().rev().find(|(s, _, _)| s.id.policy == "b");
    for (s, _, view) in steady
        .iter()
        .copied()
        .chain(last_b.filter(|_| versions["b"].is_some()))
    {
        if s.config["events"] == true {
            assert_eq!(
                *view.lock().unwrap(),
                want,
                "{} every-event view (seed {seed})",
                s.id
            );
        }
    }
}
