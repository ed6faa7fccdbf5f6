//! The engine task: reads chunks from the event source, applies them, fans updates out to plugin
//! instances, and applies reloads between two chunks so that no event is lost or duplicated.
//!
//! Delivery guarantees:
//! - change updates go to each instance's unbounded queue in order; the engine never waits for a plugin.
//!   Memory stays bounded because an instance whose queue exceeds `max_queued` is declared failed
//!   (`overrun`), its queue is dropped, and it is restarted with backoff from a fresh replay of the state,
//!   exactly like an instance that crashed.
//! - every-event notifications go through a coalescing mailbox holding at most one entry per resource.
//! - a newly started instance gets the replay of the whole state before any live update, atomically with
//!   respect to the stream, because replay and live fan-out happen in the same task.

use super::update::Update;
use super::Engine;
use crate::drbd::state::Resource;
use crate::metrics::AgentMetrics;
use crate::plugins::{
    channel, channel_with, DetailHandle, FetchRequests, InstanceId, InstanceSpec, Outbox,
    PluginCtx, PluginFactory, Subscription,
};
use futures::FutureExt;
use serde::Serialize;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the event source sends to the engine.
#[derive(Debug)]
pub enum SourceMsg {
    /// A new drbdsetup process started; its `exists` dump follows.
    Started,
    /// Complete lines.
    Chunk(Vec<u8>),
    /// A line rejected by the reader (too long, cut off by the process exiting).
    Rejected { sample: String, reason: String },
    /// The process exited or could not be started.
    Stopped { reason: String },
}

/// Liveness facts read by `/readyz` without asking the engine.
#[derive(Debug, Default)]
pub struct Health {
    pub source_up: AtomicBool,
    pub initial_dump_complete: AtomicBool,
    pub policies_loaded: AtomicBool,
    pub http_bound: AtomicBool,
    /// Kubernetes mode: the API server cannot be reached (the last applied policies keep running).
    pub kubernetes_api_unreachable: AtomicBool,
}

impl Health {
    pub fn ready(&self) -> bool {
        self.source_up.load(Ordering::Relaxed)
            && self.initial_dump_complete.load(Ordering::Relaxed)
            && self.policies_loaded.load(Ordering::Relaxed)
            && !self.kubernetes_api_unreachable.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub node_name: String,
    /// Queued change updates after which an instance is declared overrun.
    pub max_queued: usize,
    /// Time allowed for all instances to run their exit actions at shutdown.
    pub stop_timeout: Duration,
    /// First restart delay after a failure; doubles per consecutive failure.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// Where plugin instances publish notable actions (Kubernetes Events in Kubernetes mode).
    pub events: crate::plugins::EventSink,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            node_name: String::new(),
            max_queued: 100_000,
            stop_timeout: Duration::from_secs(7),
            restart_backoff: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(60),
            events: crate::plugins::EventSink::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum InstanceState {
    Running,
    /// Ended with an error, panicked or overran its queue; restarts at `restartAt`.
    Failed,
    /// Could not be built from its configuration; waits for a new configuration.
    Invalid,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    pub id: InstanceId,
    pub state: InstanceState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub restarts: u32,
    pub queued: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_in_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyReport {
    pub started: Vec<InstanceId>,
    pub stopped: Vec<InstanceId>,
    pub kept: Vec<InstanceId>,
    pub errors: Vec<(InstanceId, String)>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub resources: Vec<Arc<Resource>>,
    pub instances: Vec<InstanceStatus>,
    pub initial_dump_complete: bool,
}

enum Control {
    Apply {
        specs: Vec<InstanceSpec>,
        reply: oneshot::Sender<ApplyReport>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

struct Exited {
    id: InstanceId,
    generation: u64,
    result: Result<(), String>,
}

/// Handle to the engine task.
#[derive(Clone)]
pub struct EngineHandle {
    ctl: mpsc::Sender<Control>,
}

#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineGone;

impl EngineHandle {
    /// Applies a desired set of plugin instances as a reload.
    pub async fn apply(&self, specs: Vec<InstanceSpec>) -> Result<ApplyReport, EngineGone> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send(Control::Apply { specs, reply })
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }

    pub async fn snapshot(&self) -> Result<Snapshot, EngineGone> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send(Control::Snapshot { reply })
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }

    /// Stops every instance (running exit actions, newest first) and ends the engine task.
    pub async fn shutdown(&self) -> Result<(), EngineGone> {
        let (reply, rx) = oneshot::channel();
        self.ctl
            .send(Control::Shutdown { reply })
            .await
            .map_err(|_| EngineGone)?;
        rx.await.map_err(|_| EngineGone)
    }
}

struct Instance {
    spec: InstanceSpec,
    sub: Subscription,
    generation: u64,
    seq: u64,
    outbox: Outbox,
    task: Option<JoinHandle<()>>,
    state: InstanceState,
    last_error: Option<String>,
    restarts: u32,
    restart_at: Option<Instant>,
    detail: DetailHandle,
}

pub struct Runtime {
    engine: Engine,
    cfg: RuntimeConfig,
    factory: Arc<dyn PluginFactory>,
    metrics: AgentMetrics,
    health: Arc<Health>,
    instances: BTreeMap<InstanceId, Instance>,
    next_generation: u64,
    exit_tx: mpsc::UnboundedSender<Exited>,
    exit_rx: mpsc::UnboundedReceiver<Exited>,
    /// Tasks of instances that were stopped and are running their exit actions.
    stopping: Vec<(InstanceId, JoinHandle<()>)>,
    /// Every-event readers asking for the states of the names posted to them.
    fetch: Arc<FetchRequests>,
}

/// Starts the engine task. Returns its handle and the task.
pub fn spawn(
    cfg: RuntimeConfig,
    factory: Arc<dyn PluginFactory>,
    metrics: AgentMetrics,
    health: Arc<Health>,
    source: mpsc::Receiver<SourceMsg>,
) -> (EngineHandle, JoinHandle<()>) {
    let (ctl_tx, ctl_rx) = mpsc::channel(16);
    let rt = Runtime::new(cfg, factory, metrics, health);
    let task = tokio::spawn(rt.run(ctl_rx, source));
    (EngineHandle { ctl: ctl_tx }, task)
}

impl Runtime {
    fn new(
        cfg: RuntimeConfig,
        factory: Arc<dyn PluginFactory>,
        metrics: AgentMetrics,
        health: Arc<Health>,
    ) -> Self {
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        Runtime {
            engine: Engine::new(),
            cfg,
            factory,
            metrics,
            health,
            instances: BTreeMap::new(),
            next_generation: 1,
            exit_tx,
            exit_rx,
            stopping: Vec::new(),
            fetch: Arc::new(FetchRequests::default()),
        }
    }

    async fn run(
        mut self,
        mut ctl: mpsc::Receiver<Control>,
        mut source: mpsc::Receiver<SourceMsg>,
    ) {
        let mut source_open = true;
        let fetch = self.fetch.clone();
        loop {
            let next_restart = self.instances.values().filter_map(|i| i.restart_at).min();
            tokio::select! {
                biased;
                c = ctl.recv() => match c {
                    Some(Control::Apply { specs, reply }) => {
                        let r = self.apply(specs);
                        let _ = reply.send(r);
                    }
                    Some(Control::Snapshot { reply }) => {
                        let _ = reply.send(self.snapshot());
                    }
                    Some(Control::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                Some(e) = self.exit_rx.recv() => self.on_exit(e),
                _ = fetch.requested() => self.serve_fetches(),
                _ = sleep_until_opt(next_restart) => self.restart_due(),
                m = source.recv(), if source_open => match m {
                    Some(m) => self.on_source(m),
                    None => source_open = false,
                },
            }
            self.reap_stopped();
        }
    }

    fn on_source(&mut self, m: SourceMsg) {
        match m {
            SourceMsg::Started => {
                self.engine.state.begin_resync();
                self.health.source_up.store(true, Ordering::Relaxed);
                self.health
                    .initial_dump_complete
                    .store(false, Ordering::Relaxed);
                self.metrics.source_up.set(1);
                self.metrics.initial_dump_complete.set(0);
            }
            SourceMsg::Stopped { reason } => {
                tracing::warn!(%reason, "drbdsetup events2 stopped");
                self.metrics.source_restarts.inc();
                self.health.source_up.store(false, Ordering::Relaxed);
                self.metrics.source_up.set(0);
            }
            SourceMsg::Rejected { sample, reason } => {
                self.metrics.lines.inc();
                self.metrics.malformed.inc();
                self.engine.reject(&sample, &reason);
            }
            SourceMsg::Chunk(bytes) => self.on_chunk(&bytes),
        }
    }

    fn on_chunk(&mut self, bytes: &[u8]) {
        let t = std::time::Instant::now();
        let mut out = Vec::new();
        let st = self.engine.apply_chunk(bytes, &mut out);
        self.metrics.lines.inc_by(st.lines);
        self.metrics.malformed.inc_by(st.malformed);
        self.metrics.capped.inc_by(st.capped);
        let done = self.engine.state.initial_dump_complete();
        self.health
            .initial_dump_complete
            .store(done, Ordering::Relaxed);
        self.metrics.initial_dump_complete.set(done as i64);
        self.fan_out(out);
        if self.fetch.take() {
            self.serve_fetches();
        }
        self.metrics
            .batch_seconds
            .observe(t.elapsed().as_secs_f64());
    }

    fn fan_out(&mut self, updates: Vec<Update>) {
        let updates: Vec<Arc<Update>> = updates.into_iter().map(Arc::new).collect();
        let want_events = self
            .instances
            .values()
            .any(|i| i.sub.events && i.state == InstanceState::Running);
        // Names only: each reader fetches the states when it is ready for them (see `Mailbox`).
        let dirty = if want_events {
            self.engine.state.take_dirty_names()
        } else {
            self.engine.state.clear_dirty();
            Vec::new()
        };
        let state = &self.engine.state;
        let lookup = |n: &str| state.get(n).cloned();
        let max = self.cfg.max_queued;
        let mut overrun = Vec::new();
        for (id, inst) in self.instances.iter() {
            if inst.state != InstanceState::Running {
                continue;
            }
            if inst.sub.changes {
                let mut q = 0;
                for u in &updates {
                    q = inst.outbox.send(u);
                }
                if q > max {
                    overrun.push((id.clone(), q));
                }
            }
            if inst.sub.events {
                inst.outbox.post_names(&dirty, &lookup);
            }
        }
        for (id, q) in overrun {
            let gen = self.instances[&id].generation;
            self.fail(
                &id,
                gen,
                format!("overrun: {q} change updates queued (limit {max})"),
            );
        }
    }

    /// Fills in the states every-event readers asked for.
    fn serve_fetches(&self) {
        let state = &self.engine.state;
        let lookup = |n: &str| state.get(n).cloned();
        for inst in self.instances.values() {
            if inst.sub.events {
                inst.outbox.fill(&lookup, false);
            }
        }
    }

    /// Closes an instance's inbox after filling in every state its reader has yet to fetch, so that it
    /// sees the last state before its exit actions.
    fn close_outbox(state: &super::apply::State, outbox: &mut Outbox) {
        outbox.fill(&|n: &str| state.get(n).cloned(), true);
        outbox.close();
    }

    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        Snapshot {
            resources: self.engine.state.snapshot(),
            initial_dump_complete: self.engine.state.initial_dump_complete(),
            instances: self
                .instances
                .values()
                .map(|i| InstanceStatus {
                    id: i.spec.id.clone(),
                    state: i.state.clone(),
                    last_error: i.last_error.clone(),
                    restarts: i.restarts,
                    queued: i.outbox.queued(),
                    restart_in_seconds: i
                        .restart_at
                        .map(|t| t.saturating_duration_since(now).as_secs_f64()),
                    detail: i.detail.get(),
                })
                .collect(),
        }
    }

    fn apply(&mut self, specs: Vec<InstanceSpec>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut desired: BTreeMap<InstanceId, InstanceSpec> = BTreeMap::new();
        for s in specs {
            if desired.contains_key(&s.id) {
                report
                    .errors
                    .push((s.id.clone(), "duplicate plugin instance".into()));
                continue;
            }
            desired.insert(s.id.clone(), s);
        }
        // Removed instances.
        let removed: Vec<InstanceId> = self
            .instances
            .keys()
            .filter(|id| !desired.contains_key(*id))
            .cloned()
            .collect();
        for id in removed {
            if let Some(inst) = self.instances.remove(&id) {
                self.retire(inst);
                report.stopped.push(id);
            }
        }
        // New and changed instances; an unchanged one is left alone (an invalid one is retried).
        for (id, spec) in desired {
            let previous = self.instances.get(&id);
            if let Some(p) = previous {
                if p.spec == spec && p.state != InstanceState::Invalid {
                    report.kept.push(id);
                    continue;
                }
            }
            match self.factory.build(&spec) {
                Ok(plugin) => {
                    let prev_task = match self.instances.remove(&id) {
                        Some(mut old) => {
                            Self::close_outbox(&self.engine.state, &mut old.outbox);
                            report.stopped.push(id.clone());
                            old.task.take()
                        }
                        None => None,
                    };
                    let sub = plugin.subscription();
                    let inst = self.start(spec, plugin, sub, prev_task, 0, None);
                    self.instances.insert(id.clone(), inst);
                    report.started.push(id);
                }
                Err(e) => {
                    let msg = e.to_string();
                    tracing::error!(instance = %id, error = %msg, "cannot start plugin instance");
                    report.errors.push((id.clone(), msg.clone()));
                    // An instance that was invalid before shows the latest configuration's error; a
                    // running one keeps running on its previous configuration.
                    if let Some(old) = self
                        .instances
                        .get_mut(&id)
                        .filter(|i| i.state == InstanceState::Invalid)
                    {
                        old.spec = spec;
                        old.last_error = Some(msg);
                    } else if !self.instances.contains_key(&id) {
                        let (outbox, _) = channel(Subscription::NONE);
                        self.instances.insert(
                            id.clone(),
                            Instance {
                                spec,
                                sub: Subscription::NONE,
                                generation: 0,
                                seq: 0,
                                outbox,
                                task: None,
                                state: InstanceState::Invalid,
                                last_error: Some(msg),
                                restarts: 0,
                                restart_at: None,
                                detail: DetailHandle::default(),
                            },
                        );
                    }
                }
            }
        }
        let ok = report.errors.is_empty();
        self.metrics
            .reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
        self.update_instance_gauges();
        tracing::info!(
            started = report.started.len(),
            stopped = report.stopped.len(),
            kept = report.kept.len(),
            errors = report.errors.len(),
            "applied plugin configuration"
        );
        report
    }

    /// Starts an instance: replay of the current state first, then the live stream.
    fn start(
        &mut self,
        spec: InstanceSpec,
        plugin: Box<dyn crate::plugins::Plugin>,
        sub: Subscription,
        prev_task: Option<JoinHandle<()>>,
        restarts: u32,
        last_error: Option<String>,
    ) -> Instance {
        let (outbox, inbox) = channel_with(sub, Some(self.fetch.clone()));
        if sub.changes {
            for u in self.engine.state.replay() {
                outbox.send(&Arc::new(u));
            }
        }
        if sub.events {
            let state = &self.engine.state;
            outbox.post_names(&state.names(), &|n: &str| state.get(n).cloned());
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let detail = DetailHandle::default();
        let ctx = PluginCtx {
            id: spec.id.clone(),
            node_name: self.cfg.node_name.clone(),
            metrics: self.metrics.clone(),
            detail: detail.clone(),
            events: self.cfg.events.clone(),
        };
        let exit_tx = self.exit_tx.clone();
        let id = spec.id.clone();
        let task = tokio::spawn(async move {
            // A replaced instance finishes its exit actions before its successor acts.
            if let Some(prev) = prev_task {
                let _ = prev.await;
            }
            let run = AssertUnwindSafe(async move { plugin.run(inbox, ctx).await })
                .catch_unwind()
                .await;
            let result = match run {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(panic) => Err(format!("panicked: {}", panic_message(&panic))),
            };
            let _ = exit_tx.send(Exited {
                id,
                generation,
                result,
            });
        });
        tracing::info!(instance = %spec.id, generation, "started plugin instance");
        Instance {
            spec,
            sub,
            generation,
            seq: generation,
            outbox,
            task: Some(task),
            state: InstanceState::Running,
            last_error,
            restarts,
            restart_at: None,
            detail,
        }
    }

    /// Stops an instance that is no longer wanted: it drains its queue, runs its exit actions, ends.
    fn retire(&mut self, mut inst: Instance) {
        Self::close_outbox(&self.engine.state, &mut inst.outbox);
        tracing::info!(instance = %inst.spec.id, "stopping plugin instance");
        if let Some(t) = inst.task.take() {
            self.stopping.push((inst.spec.id.clone(), t));
        }
    }

    fn reap_stopped(&mut self) {
        self.stopping.retain(|(_, t)| !t.is_finished());
    }

    fn on_exit(&mut self, e: Exited) {
        let Some(inst) = self.instances.get(&e.id) else {
            return;
        };
        if inst.generation != e.generation || inst.state != InstanceState::Running {
            return; // an instance we stopped on purpose
        }
        let msg = match e.result {
            Ok(()) => "ended unexpectedly".to_string(),
            Err(m) => m,
        };
        self.fail(&e.id, e.generation, msg);
    }

    fn fail(&mut self, id: &InstanceId, generation: u64, msg: String) {
        let backoff =
            |n: u32, base: Duration, max: Duration| base.saturating_mul(1u32 << n.min(16)).min(max);
        let (base, max) = (self.cfg.restart_backoff, self.cfg.restart_backoff_max);
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        if inst.generation != generation {
            return;
        }
        tracing::error!(instance = %id, error = %msg, "plugin instance failed");
        self.metrics
            .plugin_errors
            .with_label_values(&[&id.kind])
            .inc();
        inst.outbox.close();
        inst.outbox = channel(Subscription::NONE).0;
        let delay = backoff(inst.restarts, base, max);
        inst.state = InstanceState::Failed;
        inst.last_error = Some(msg);
        inst.restart_at = Some(Instant::now() + delay);
        if let Some(t) = inst.task.take() {
            self.stopping.push((id.clone(), t));
        }
        self.update_instance_gauges();
    }

    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<InstanceId> = self
            .instances
            .iter()
            .filter(|(_, i)| i.restart_at.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(old) = self.instances.remove(&id) else {
                continue;
            };
            match self.factory.build(&old.spec) {
                Ok(plugin) => {
                    let sub = plugin.subscription();
                    tracing::info!(instance = %id, restarts = old.restarts + 1, "restarting plugin instance");
                    self.metrics
                        .plugin_restarts
                        .with_label_values(&[&id.kind])
                        .inc();
                    let inst = self.start(
                        old.spec,
                        plugin,
                        sub,
                        None,
                        old.restarts + 1,
                        old.last_error,
                    );
                    self.instances.insert(id, inst);
                }
                Err(e) => {
                    let mut old = old;
                    old.state = InstanceState::Invalid;
                    old.restart_at = None;
                    old.last_error = Some(e.to_string());
                    self.instances.insert(id, old);
                }
            }
        }
        self.update_instance_gauges();
    }

    fn update_instance_gauges(&self) {
        self.metrics.plugin_instances.reset();
        for i in self.instances.values() {
            let state = match i.state {
                InstanceState::Running => "running",
                InstanceState::Failed => "failed",
                InstanceState::Invalid => "invalid",
            };
            self.metrics
                .plugin_instances
                .with_label_values(&[&i.spec.id.kind, state])
                .inc();
        }
    }

    /// Stops every instance, newest first, within `stop_timeout` in all: an instance still running at the
    /// deadline (a long backlog, a run that takes its time) is aborted, which kills what it started.
    async fn shutdown(&mut self) {
        let deadline = Instant::now() + self.cfg.stop_timeout;
        let mut insts: Vec<Instance> = std::mem::take(&mut self.instances).into_values().collect();
        insts.sort_by_key(|i| std::cmp::Reverse(i.seq));
        let mut tasks = Vec::new();
        for mut inst in insts {
            Self::close_outbox(&self.engine.state, &mut inst.outbox);
            if let Some(t) = inst.task.take() {
                tasks.push((inst.spec.id.clone(), t));
            }
        }
        tasks.extend(std::mem::take(&mut self.stopping));
        let mut aborted = Vec::new();
        for (id, mut t) in tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!(instance = %id, "plugin instance did not stop in time: aborted");
                t.abort();
                aborted.push(t);
            }
        }
        // An aborted task ends at its next await (dropping what it started); one that never yields is
        // left behind.
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            futures::future::join_all(aborted),
        )
        .await;
        self.update_instance_gauges();
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
