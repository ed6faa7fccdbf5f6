//! Kubernetes mode: the agent reads ReactorPolicies, its own Node and the ConfigMaps of its namespace
//! through reflectors, runs the policies that select its node, and writes its entry into each policy's
//! status. The decisions are client-free ([`crate::policy::node`], [`crate::policy::status`]); this module
//! is the I/O around them: `dereference → validate → build` (pure, from the reflector stores) → `apply`
//! (a reload of the engine) → `update_status` (server-side apply, one field manager per node).
//!
//! - Changes are debounced; status-only updates of policies (other agents' entries) do not wake the
//!   agent: only a new generation, a new or deleted policy, a label change of the own Node or a ConfigMap
//!   change does ([`Triggers`]).
//! - API server unreachable: the watchers retry with backoff, the last applied set keeps running, and
//!   `/readyz` and `drbdreactor_kubernetes_api_up` say so.
//! - No finalizers: deleting a policy just shrinks the desired set.
//! - Policies are listed and watched as dynamic objects and decoded one by one ([`node::decode`]): one
//!   the agent cannot read (stored before the CRD was tightened) is reported on its own status and as
//!   an Event, and the others run; the watch, and so `/readyz`, is not affected by it.

use crate::agent::serve_http;
use crate::engine::runtime::{
    self, EngineHandle, Health, InstanceStatus, RuntimeConfig, SourceMsg,
};
use crate::http::{HttpState, ListenAddr, PolicyStatus};
use crate::metrics::AgentMetrics;
use crate::plugins::prometheus::ExporterHub;
use crate::plugins::{Builtin, EventSink, InstanceSpec, PluginEvent};
use crate::policy::files::FileProblem;
use crate::policy::node::{self, LastGood, Outcome, Plan, Undecodable};
use crate::policy::status::{self, NodeStatus};
use crate::policy::{ReactorPolicy, API_VERSION, KIND};
use crate::source::{self, SourceConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use prometheus::{IntCounterVec, IntGauge, Opts};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

/// The one field manager all agents share for `status.plugins` (the same value from every agent).
pub const SHARED_FIELD_MANAGER: &str = "drbd-reactor";

#[derive(Debug, Clone)]
pub struct K8sOptions {
    pub drbdsetup: Vec<String>,
    pub drbdadm: Vec<String>,
    pub node_name: String,
    /// The agent's own namespace: ConfigMap scripts are read from here only.
    pub namespace: String,
    pub statistics_interval: Duration,
    pub listen: ListenAddr,
    /// Bounds of the HTTP server.
    pub http: crate::http::HttpLimits,
    pub umh: crate::plugins::umh::UmhOptions,
    /// Quiet time after a change before the policies are recomputed.
    pub debounce: Duration,
    /// How often the status entries are compared with what runs (and written when they differ).
    pub status_interval: Duration,
    /// How often entries of nodes that no longer exist (an agent that went away with its Node) are
    /// removed from the policies' status.
    pub stale_sweep_interval: Duration,
    /// Service manager, unit directory and unit commands of promoter instances.
    pub promoter: crate::plugins::promoter::PromoterOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    Client(#[from] kube::Error),
    #[error("the engine stopped unexpectedly")]
    EngineGone,
}

/// The field manager of a node's status entries: `drbd-reactor/<node>` (at most 128 bytes).
pub fn field_manager(node: &str) -> String {
    let m = format!("{SHARED_FIELD_MANAGER}/{node}");
    if m.len() <= 128 {
        return m;
    }
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    format!("{SHARED_FIELD_MANAGER}/{}~{:016x}", &node[..96], h.finish())
}

/// Which watch events call for recomputing the plan: decided on what the event changes, so that status
/// writes (N agents writing their entries) never wake anybody.
#[derive(Debug, Default)]
pub struct Triggers {
    generations: BTreeMap<String, (Option<String>, Option<i64>)>,
    labels: Option<BTreeMap<String, String>>,
    config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

impl Triggers {
    pub fn policy<K: Resource>(&mut self, ev: &watcher::Event<K>) -> bool {
        match ev {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let key = (p.meta().uid.clone(), p.meta().generation);
                self.generations.insert(p.name_any(), key.clone()) != Some(key)
            }
            watcher::Event::Delete(p) => {
                self.generations.remove(&p.name_any());
                true
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }

    pub fn node(&mut self, ev: &watcher::Event<Node>) -> bool {
        match ev {
            watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                let l = Some(n.labels().clone());
                let changed = self.labels != l;
                self.labels = l;
                changed
            }
            watcher::Event::Delete(_) => {
                self.labels = None;
                true
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }

    pub fn config_map(&mut self, ev: &watcher::Event<ConfigMap>) -> bool {
        match ev {
            watcher::Event::Apply(c) | watcher::Event::InitApply(c) => {
                let d = Some(c.data.clone().unwrap_or_default());
                self.config_maps.insert(c.name_any(), d.clone()) != Some(d)
            }
            watcher::Event::Delete(c) => {
                self.config_maps.remove(&c.name_any());
                true
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }
}

#[derive(Clone)]
struct K8sMetrics {
    api_up: IntGauge,
    recomputes: prometheus::IntCounter,
    watch_errors: IntCounterVec,
    status_writes: IntCounterVec,
    events: IntCounterVec,
}

impl K8sMetrics {
    fn new(m: &AgentMetrics) -> K8sMetrics {
        let api_up = IntGauge::new(
            "drbdreactor_kubernetes_api_up",
            "Whether the agent's watches on the Kubernetes API server are working (0 = unreachable; the last applied policies keep running)",
        )
        .expect("valid metric");
        let recomputes = prometheus::IntCounter::new(
            "drbdreactor_kubernetes_recomputes_total",
            "Times the plugin set was recomputed after a change of policies (new generation), the Node's labels or ConfigMaps",
        )
        .expect("valid metric");
        let watch_errors = IntCounterVec::new(
            Opts::new(
                "drbdreactor_kubernetes_watch_errors_total",
                "Errors of the watches on the Kubernetes API server, by watched resource (retried with backoff)",
            ),
            &["resource"],
        )
        .expect("valid metric");
        let status_writes = IntCounterVec::new(
            Opts::new(
                "drbdreactor_kubernetes_status_writes_total",
                "Server-side applies of this node's ReactorPolicy status entries, by result (ok, conflict, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new(
                "drbdreactor_kubernetes_events_total",
                "Kubernetes Events recorded on policies, by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [&watch_errors] {
            for r in ["reactorpolicies", "nodes", "configmaps"] {
                c.with_label_values(&[r]);
            }
        }
        for r in ["ok", "conflict", "error"] {
            status_writes.with_label_values(&[r]);
        }
        for r in ["ok", "error"] {
            events.with_label_values(&[r]);
        }
        for c in [
            Box::new(api_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(recomputes.clone()),
            Box::new(watch_errors.clone()),
            Box::new(status_writes.clone()),
            Box::new(events.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        K8sMetrics {
            api_up,
            recomputes,
            watch_errors,
            status_writes,
            events,
        }
    }
}

/// Reachability of the API server. A watch error marks it unreachable. A watch that reconnects
/// without news says nothing, so while unreachable a probe (a LIST of one policy) marks it reachable again;
/// a watch that still fails marks it unreachable again at its next retry.
struct ApiState {
    health: Arc<Health>,
    metrics: K8sMetrics,
}

impl ApiState {
    fn set(&self, reachable: bool) {
        let was = !self
            .health
            .kubernetes_api_unreachable
            .swap(!reachable, Ordering::Relaxed);
        if reachable && !was {
            tracing::info!("Kubernetes API reachable again");
        }
        self.metrics.api_up.set(reachable as i64);
    }

    fn report(&self, resource: &'static str, ok: bool, err: Option<&watcher::Error>) {
        if let Some(e) = err {
            self.metrics
                .watch_errors
                .with_label_values(&[resource])
                .inc();
            tracing::warn!(resource, error = %e, "Kubernetes watch failed; retrying with backoff, the last applied policies keep running");
        }
        if !ok {
            self.set(false);
        } else if self
            .health
            .kubernetes_api_unreachable
            .load(Ordering::Relaxed)
        {
            self.set(true);
        }
    }

    /// While unreachable, probes every `every`.
    async fn probe(self: Arc<Self>, client: Client, every: Duration) {
        let api: Api<ReactorPolicy> = Api::all(client);
        loop {
            tokio::time::sleep(every).await;
            if self
                .health
                .kubernetes_api_unreachable
                .load(Ordering::Relaxed)
                && api
                    .list_metadata(&kube::api::ListParams::default().limit(1))
                    .await
                    .is_ok()
            {
                self.set(true);
            }
        }
    }
}

/// Runs a reflector over `api`, waking `wake` when `trigger` says so.
fn spawn_reflector<K>(
    name: &'static str,
    api: Api<K>,
    dyntype: K::DynamicType,
    cfg: watcher::Config,
    wake: Arc<Notify>,
    api_state: Arc<ApiState>,
    mut trigger: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
) -> (Store<K>, Arc<AtomicBool>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K: serde::de::DeserializeOwned,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let stream = reflector::reflector(writer, watcher::watcher(api, cfg).default_backoff());
    let listed = Arc::new(AtomicBool::new(false));
    let l = listed.clone();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    api_state.report(name, true, None);
                    if matches!(ev, watcher::Event::InitDone) {
                        l.store(true, Ordering::Relaxed);
                    }
                    if trigger(&ev) {
                        wake.notify_one();
                    }
                }
                Err(e) => api_state.report(name, false, Some(&e)),
            }
        }
    });
    (store, listed, task)
}

/// The policies as the watch holds them, each decoded on its own.
#[derive(Default)]
struct Decoded {
    good: Vec<Arc<ReactorPolicy>>,
    /// With the resourceVersion each was read at.
    bad: Vec<(Undecodable, Option<String>)>,
}

fn decode_all(store: &Store<DynamicObject>) -> Decoded {
    let mut out = Decoded::default();
    for o in store.state() {
        let v = serde_json::to_value(&*o).unwrap_or_default();
        match node::decode(v) {
            Ok(p) => out.good.push(Arc::new(p)),
            Err(u) => out.bad.push((*u, o.resource_version())),
        }
    }
    out
}

/// The reference of a policy by name (for Events), from the watched objects.
fn policy_ref_by_name(
    store: &Store<DynamicObject>,
    ar: &ApiResource,
    name: &str,
) -> Option<ObjectReference> {
    store
        .state()
        .iter()
        .find(|o| o.name_any() == name)
        .map(|o| o.object_ref(ar))
}

/// A policy's status part, read on its own (an undecodable spec does not hide it).
fn status_of(o: &DynamicObject) -> Option<crate::policy::ReactorPolicyStatus> {
    serde_json::from_value(o.data.get("status")?.clone()).ok()
}

/// What a status write needs of one policy, decodable or not.
struct StatusTarget {
    name: String,
    generation: Option<i64>,
    status: Option<crate::policy::ReactorPolicyStatus>,
    /// `None` for an undecodable policy: no summary is computed for it.
    spec: Option<crate::policy::ReactorPolicySpec>,
    resource_version: Option<String>,
}

impl Decoded {
    fn targets(&self) -> Vec<StatusTarget> {
        let good = self.good.iter().map(|p| StatusTarget {
            name: p.name_any(),
            generation: p.metadata.generation,
            status: p.status.clone(),
            spec: Some(p.spec.clone()),
            resource_version: p.resource_version(),
        });
        let bad = self.bad.iter().map(|(u, rv)| StatusTarget {
            name: u.name.clone(),
            generation: u.generation,
            status: u.status.clone(),
            spec: None,
            resource_version: rv.clone(),
        });
        good.chain(bad).collect()
    }
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Everything the reconcile and status steps share.
struct Agent {
    opts: K8sOptions,
    client: Client,
    engine: EngineHandle,
    health: Arc<Health>,
    metrics: AgentMetrics,
    k8s_metrics: K8sMetrics,
    /// ReactorPolicies as dynamic objects, decoded one by one ([`decode_all`]).
    policies: Store<DynamicObject>,
    policy_resource: ApiResource,
    nodes: Store<Node>,
    config_maps: Store<ConfigMap>,
    http_policies: Arc<Mutex<PolicyStatus>>,
    recorder: Recorder,
    /// What the last reload applied, and its result.
    applied: Option<Vec<InstanceSpec>>,
    apply_errors: BTreeMap<crate::plugins::InstanceId, String>,
    last_good: LastGood,
    plan: Option<Plan>,
    /// Our entry per policy as last written (`None` = removed).
    written: BTreeMap<String, Option<NodeStatus>>,
    /// Problems already reported as Events (policy → message).
    reported: BTreeMap<String, String>,
    /// Instances seen failed (for one PluginFailed Event per failure).
    failed: BTreeSet<(crate::plugins::InstanceId, u32)>,
}

impl Agent {
    fn node_labels(&self) -> Option<BTreeMap<String, String>> {
        self.nodes
            .state()
            .into_iter()
            .find(|n| n.name_any() == self.opts.node_name)
            .map(|n| n.labels().clone())
    }

    /// dereference → validate → build → apply.
    async fn reconcile(&mut self) -> Result<(), K8sError> {
        let Some(labels) = self.node_labels() else {
            tracing::warn!(node = %self.opts.node_name, "own Node not found; keeping the policies in force, no status entries");
            let mut st = self.http_policies.lock().unwrap_or_else(|e| e.into_inner());
            st.source = format!(
                "kubernetes: Node {} not found (the last applied policies keep running)",
                self.opts.node_name
            );
            self.plan = None;
            return Ok(());
        };
        let decoded = decode_all(&self.policies);
        let policies: Vec<ReactorPolicy> = decoded.good.iter().map(|p| (**p).clone()).collect();
        let undecodable: Vec<Undecodable> = decoded.bad.iter().map(|(u, _)| u.clone()).collect();
        let ns = self.opts.namespace.clone();
        let cms = self.config_maps.clone();
        let lookup = move |name: &str| -> Option<BTreeMap<String, String>> {
            cms.state()
                .into_iter()
                .find(|c| c.name_any() == name && c.namespace().as_deref() == Some(ns.as_str()))
                .map(|c| c.data.clone().unwrap_or_default())
        };
        self.k8s_metrics.recomputes.inc();
        let (mut plan, mut good) = node::plan(
            &policies,
            &labels,
            &self.opts.namespace,
            &lookup,
            &self.last_good,
        );
        node::add_undecodable(&mut plan, &mut good, &self.last_good, &undecodable, &labels);
        self.last_good = good;
        if self.applied.as_ref() != Some(&plan.instances) {
            let report = self
                .engine
                .apply(plan.instances.clone())
                .await
                .map_err(|_| K8sError::EngineGone)?;
            self.apply_errors = report.errors.into_iter().collect();
            for (id, e) in &self.apply_errors {
                tracing::error!(instance = %id, error = %e, "plugin instance not started");
            }
            self.applied = Some(plan.instances.clone());
            self.health.policies_loaded.store(true, Ordering::Relaxed);
        }
        // /status, metrics and Events about the policies.
        let mut applied = Vec::new();
        let mut problems = Vec::new();
        let (mut n_applied, mut n_other, mut n_invalid) = (0, 0, 0);
        for (name, o) in &plan.outcomes {
            match o {
                Outcome::NotSelected => n_other += 1,
                Outcome::Selected { problem: None, .. } => {
                    n_applied += 1;
                    applied.push(name.clone());
                }
                Outcome::Selected {
                    problem: Some(p), ..
                } => {
                    n_invalid += 1;
                    problems.push(FileProblem {
                        file: format!("reactorpolicy/{name}"),
                        error: format!("{}: {}", p.reason, p.message),
                    });
                    if self.reported.get(name) != Some(&p.message) {
                        self.reported.insert(name.clone(), p.message.clone());
                        tracing::error!(policy = %name, reason = %p.reason, "{}", p.message);
                        if let Some(r) =
                            policy_ref_by_name(&self.policies, &self.policy_resource, name)
                        {
                            self.publish(true, &p.reason, &p.message, r).await;
                        }
                    }
                }
            }
        }
        self.reported.retain(|n, _| {
            matches!(
                plan.outcomes.get(n),
                Some(Outcome::Selected {
                    problem: Some(_),
                    ..
                })
            )
        });
        for (state, n) in [
            ("applied", n_applied),
            ("other-nodes", n_other),
            ("invalid", n_invalid),
        ] {
            self.metrics.policies.with_label_values(&[state]).set(n);
        }
        {
            let mut st = self.http_policies.lock().unwrap_or_else(|e| e.into_inner());
            st.source = format!(
                "kubernetes (ConfigMaps from namespace {})",
                self.opts.namespace
            );
            st.applied = applied;
            st.problems = problems;
        }
        self.plan = Some(plan);
        Ok(())
    }

    async fn publish(&self, warning: bool, reason: &str, message: &str, r: ObjectReference) {
        publish(
            &self.recorder,
            &self.k8s_metrics,
            &self.opts.node_name,
            warning,
            reason,
            message,
            &r,
        )
        .await;
    }

    /// Writes this node's entry into every policy whose entry changed (server-side apply).
    async fn update_status(&mut self) -> Result<(), K8sError> {
        let snap = self
            .engine
            .snapshot()
            .await
            .map_err(|_| K8sError::EngineGone)?;
        let api: Api<ReactorPolicy> = Api::all(self.client.clone());
        let fm = field_manager(&self.opts.node_name);
        let now = now_rfc3339();
        let node_present = self.node_labels().is_some();
        for (i, failed) in snap
            .instances
            .iter()
            .filter(|i| i.state == runtime::InstanceState::Failed)
            .map(|i| (i, (i.id.clone(), i.restarts)))
        {
            if self.failed.insert(failed) {
                if let Some(r) =
                    policy_ref_by_name(&self.policies, &self.policy_resource, &i.id.policy)
                {
                    let msg = format!(
                        "plugin {} failed: {}",
                        i.id.kind,
                        i.last_error.as_deref().unwrap_or("ended")
                    );
                    self.publish(true, "PluginFailed", &msg, r).await;
                }
            }
        }
        let targets = decode_all(&self.policies).targets();
        for p in &targets {
            let name = p.name.clone();
            let prev_in_store: Option<NodeStatus> = p
                .status
                .as_ref()
                .and_then(|s| s.nodes.iter().find(|n| n.node == self.opts.node_name))
                .cloned();
            let desired = match (&self.plan, node_present) {
                (Some(plan), true) => {
                    let outcome = plan
                        .outcomes
                        .get(&name)
                        .cloned()
                        .unwrap_or(Outcome::NotSelected);
                    let ids: BTreeSet<_> = match &outcome {
                        Outcome::Selected { instances, .. } => instances.iter().cloned().collect(),
                        Outcome::NotSelected => BTreeSet::new(),
                    };
                    let insts: Vec<&InstanceStatus> = snap
                        .instances
                        .iter()
                        .filter(|i| ids.contains(&i.id))
                        .collect();
                    let errs: Vec<(String, String)> = self
                        .apply_errors
                        .iter()
                        .filter(|(id, _)| ids.contains(*id))
                        .map(|(id, e)| (id.kind.clone(), e.clone()))
                        .collect();
                    let prev = self
                        .written
                        .get(&name)
                        .cloned()
                        .flatten()
                        .or(prev_in_store.clone());
                    status::node_entry(
                        &self.opts.node_name,
                        p.generation,
                        &outcome,
                        &insts,
                        &errs,
                        prev.as_ref(),
                        &now,
                    )
                }
                _ => None,
            };
            let last = match self.written.get(&name) {
                Some(w) => w.clone(),
                None => prev_in_store,
            };
            let same = match (&last, &desired) {
                (None, None) => true,
                (Some(a), Some(b)) => status::same_entry(a, b),
                _ => false,
            };
            if !same {
                let body = match &desired {
                    Some(e) => serde_json::json!({
                        "apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": name},
                        "status": {"nodes": [e]},
                    }),
                    None => serde_json::json!({
                        "apiVersion": API_VERSION, "kind": KIND,
                        "metadata": {"name": name},
                        "status": {},
                    }),
                };
                match api
                    .patch_status(&name, &PatchParams::apply(&fm), &Patch::Apply(&body))
                    .await
                {
                    Ok(_) => {
                        self.k8s_metrics
                            .status_writes
                            .with_label_values(&["ok"])
                            .inc();
                        self.written.insert(name.clone(), desired.clone());
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        self.written.remove(&name); // deleted meanwhile
                    }
                    Err(e) => {
                        let conflict = matches!(&e, kube::Error::Api(s) if s.code == 409);
                        self.k8s_metrics
                            .status_writes
                            .with_label_values(&[if conflict { "conflict" } else { "error" }])
                            .inc();
                        tracing::warn!(policy = %name, error = %e, "cannot write the status entry; retrying");
                    }
                }
            } else if !self.written.contains_key(&name) {
                self.written.insert(name.clone(), desired.clone());
            }
            // Summary fields: every agent computes them from the same data and writes them under one
            // shared field manager (no conflicts between managers), with the resourceVersion it computed
            // them from as precondition (a count from an outdated view is refused, and recomputed later).
            let nodes = p
                .status
                .as_ref()
                .map(|s| s.nodes.clone())
                .unwrap_or_default();
            let Some(spec) = &p.spec else {
                continue; // undecodable: no summary
            };
            let (plugins, applied, degraded) = status::summary(spec, &nodes);
            let shown = p
                .status
                .as_ref()
                .map(|s| (s.plugins.clone(), s.applied_nodes, s.degraded_nodes));
            let want = (Some(plugins.clone()), Some(applied), Some(degraded));
            if node_present && shown.as_ref() != Some(&want) {
                let body = serde_json::json!({
                    "apiVersion": API_VERSION, "kind": KIND,
                    "metadata": {"name": name, "resourceVersion": p.resource_version},
                    "status": {"plugins": plugins, "appliedNodes": applied, "degradedNodes": degraded},
                });
                if let Err(e) = api
                    .patch_status(
                        &name,
                        &PatchParams::apply(SHARED_FIELD_MANAGER),
                        &Patch::Apply(&body),
                    )
                    .await
                {
                    tracing::debug!(policy = %name, error = %e, "summary not written (recomputed on the next round)");
                }
            }
        }
        let live: BTreeSet<String> = targets.iter().map(|p| p.name.clone()).collect();
        self.written.retain(|n, _| live.contains(n));
        Ok(())
    }
}

impl Agent {
    /// Removes entries of Nodes that no longer exist (their agent cannot). Any agent may do it; a JSON
    /// patch that first tests the entry's node name at its index makes concurrent sweeps harmless.
    async fn sweep_stale_entries(&self) {
        let me = &self.opts.node_name;
        let statuses: Vec<(String, crate::policy::ReactorPolicyStatus)> = self
            .policies
            .state()
            .iter()
            .filter_map(|o| Some((o.name_any(), status_of(o)?)))
            .collect();
        let others: BTreeSet<String> = statuses
            .iter()
            .flat_map(|(_, s)| s.nodes.iter().map(|n| n.node.clone()))
            .filter(|n| n != me)
            .collect();
        if others.is_empty() {
            return;
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let alive: BTreeSet<String> = match nodes.list_metadata(&Default::default()).await {
            Ok(l) => l.items.iter().map(|n| n.name_any()).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list Nodes for the stale-entry sweep");
                return;
            }
        };
        let api: Api<ReactorPolicy> = Api::all(self.client.clone());
        for (name, st) in &statuses {
            let ops = stale_entry_ops(&st.nodes, &alive);
            if ops.is_empty() {
                continue;
            }
            let patch: Result<Patch<()>, _> =
                serde_json::from_value(serde_json::Value::Array(ops)).map(Patch::Json);
            let Ok(patch) = patch else { continue };
            match api
                .patch_status(name, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    tracing::info!(policy = %name, "removed status entries of deleted Nodes")
                }
                Err(e) => {
                    tracing::debug!(policy = %name, error = %e, "stale-entry sweep raced; retried later")
                }
            }
        }
    }
}

/// JSON patch operations removing the entries of nodes not in `alive`, each guarded by a test of the
/// node name at its index, highest index first (so earlier removals do not shift later ones).
pub fn stale_entry_ops(nodes: &[NodeStatus], alive: &BTreeSet<String>) -> Vec<serde_json::Value> {
    let mut ops = Vec::new();
    for (i, n) in nodes.iter().enumerate().rev() {
        if !alive.contains(&n.node) {
            let path = format!("/status/nodes/{i}");
            ops.push(
                serde_json::json!({"op": "test", "path": format!("{path}/node"), "value": n.node}),
            );
            ops.push(serde_json::json!({"op": "remove", "path": path}));
        }
    }
    ops
}

/// The Kubernetes Event for a notable action: the node leads the note; reason, action and note are cut
/// to the API's limits (128 characters, 1 kB).
pub fn k8s_event(node: &str, warning: bool, reason: &str, message: &str) -> KEvent {
    let note: String = format!("node {node}: {message}")
        .chars()
        .take(1000)
        .collect();
    let reason: String = reason.chars().take(128).collect();
    KEvent {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        action: reason.clone(),
        reason,
        note: Some(note),
        secondary: None,
    }
}

/// The Event for a plugin instance's action, and the policy it is attached to (`policy`: its reference
/// when it is known).
pub fn plugin_event(
    node: &str,
    ev: &PluginEvent,
    policy: Option<ObjectReference>,
) -> (KEvent, ObjectReference) {
    let r = policy.unwrap_or_else(|| {
        ReactorPolicy::new(&ev.instance.policy, Default::default()).object_ref(&())
    });
    let msg = format!("{}: {}", ev.instance.kind, ev.message);
    (k8s_event(node, ev.warning, &ev.reason, &msg), r)
}

async fn publish(
    recorder: &Recorder,
    m: &K8sMetrics,
    node: &str,
    warning: bool,
    reason: &str,
    message: &str,
    r: &ObjectReference,
) {
    send(recorder, m, &k8s_event(node, warning, reason, message), r).await;
}

async fn send(recorder: &Recorder, m: &K8sMetrics, ev: &KEvent, r: &ObjectReference) {
    match recorder.publish(ev, r).await {
        Ok(()) => m.events.with_label_values(&["ok"]).inc(),
        Err(e) => {
            m.events.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, reason = %ev.reason, "cannot record the Kubernetes Event");
        }
    }
}

/// Turns plugin events into Kubernetes Events on the instance's policy.
async fn forward_plugin_events(
    mut rx: mpsc::UnboundedReceiver<PluginEvent>,
    recorder: Recorder,
    policies: Store<DynamicObject>,
    ar: ApiResource,
    m: K8sMetrics,
    node: String,
) {
    while let Some(ev) = rx.recv().await {
        let reference = policy_ref_by_name(&policies, &ar, &ev.instance.policy);
        let (e, r) = plugin_event(&node, &ev, reference);
        send(&recorder, &m, &e, &r).await;
    }
}

/// Runs the agent in Kubernetes mode until SIGTERM/SIGINT.
pub async fn run(opts: K8sOptions) -> Result<(), K8sError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(K8sError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(K8sError::Signal)?;
    let client = Client::try_default().await?;

    let exporter = Arc::new(ExporterHub::new(opts.drbdadm.clone()));
    let factory = Arc::new(
        Builtin::new(exporter.clone())
            .with_umh(opts.umh.clone())
            .with_promoter(opts.promoter.clone()),
    );
    let metrics = AgentMetrics::new();
    for result in ["ok", "error"] {
        metrics.reloads.with_label_values(&[result]);
    }
    for kind in ["debugger", "prometheus", "umh"] {
        metrics.plugin_errors.with_label_values(&[kind]);
        metrics.plugin_restarts.with_label_values(&[kind]);
    }
    let k8s_metrics = K8sMetrics::new(&metrics);
    let health = Arc::new(Health::default());
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (src_tx, src_rx) = mpsc::channel::<SourceMsg>(64);
    let cfg = RuntimeConfig {
        node_name: opts.node_name.clone(),
        events: EventSink::new(ev_tx),
        ..Default::default()
    };
    let (engine, engine_task) =
        runtime::spawn(cfg, factory, metrics.clone(), health.clone(), src_rx);
    let (stop_tx, stop_rx) = watch::channel(false);
    let src_cfg = SourceConfig::new(opts.drbdsetup.clone(), opts.statistics_interval);
    let source_task = tokio::spawn(source::run(src_cfg, src_tx, stop_rx.clone()));
    let http_policies = Arc::new(Mutex::new(PolicyStatus {
        source: "kubernetes (connecting)".into(),
        ..Default::default()
    }));
    let http_task = tokio::spawn(serve_http(
        opts.listen.clone(),
        HttpState {
            node_name: opts.node_name.clone(),
            health: health.clone(),
            engine: engine.clone(),
            metrics: metrics.clone(),
            policies: http_policies.clone(),
            exporter,
            limits: opts.http.clone(),
        },
        health.clone(),
        stop_rx.clone(),
    ));

    let api_state = Arc::new(ApiState {
        health: health.clone(),
        metrics: k8s_metrics.clone(),
    });
    api_state.set(true);
    let t5 = tokio::spawn(
        api_state
            .clone()
            .probe(client.clone(), Duration::from_secs(2)),
    );
    let wake = Arc::new(Notify::new());
    let triggers = Arc::new(Mutex::new(Triggers::default()));
    let t = triggers.clone();
    // Dynamic objects: a policy the agent cannot decode must not fail the list of all of them.
    let policy_resource = ApiResource::erase::<ReactorPolicy>(&());
    let (policies, l1, t1) = spawn_reflector(
        "reactorpolicies",
        Api::<DynamicObject>::all_with(client.clone(), &policy_resource),
        policy_resource.clone(),
        watcher::Config::default(),
        wake.clone(),
        api_state.clone(),
        move |ev| t.lock().unwrap_or_else(|e| e.into_inner()).policy(ev),
    );
    let t = triggers.clone();
    let (nodes, l2, t2) = spawn_reflector(
        "nodes",
        Api::<Node>::all(client.clone()),
        (),
        watcher::Config::default().fields(&format!("metadata.name={}", opts.node_name)),
        wake.clone(),
        api_state.clone(),
        move |ev| t.lock().unwrap_or_else(|e| e.into_inner()).node(ev),
    );
    let t = triggers.clone();
    let (config_maps, l3, t3) = spawn_reflector(
        "configmaps",
        Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace),
        (),
        watcher::Config::default(),
        wake.clone(),
        api_state.clone(),
        move |ev| t.lock().unwrap_or_else(|e| e.into_inner()).config_map(ev),
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "drbd-reactor".into(),
            instance: Some(opts.node_name.clone()),
        },
    );
    let t4 = tokio::spawn(forward_plugin_events(
        ev_rx,
        recorder.clone(),
        policies.clone(),
        policy_resource.clone(),
        k8s_metrics.clone(),
        opts.node_name.clone(),
    ));
    tracing::info!(node = %opts.node_name, namespace = %opts.namespace, "Kubernetes mode: watching ReactorPolicies, Node {}, ConfigMaps in {}", opts.node_name, opts.namespace);

    let mut agent = Agent {
        opts: opts.clone(),
        client,
        engine: engine.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        k8s_metrics,
        policies,
        policy_resource,
        nodes,
        config_maps,
        http_policies,
        recorder,
        applied: None,
        apply_errors: BTreeMap::new(),
        last_good: LastGood::new(),
        plan: None,
        written: BTreeMap::new(),
        reported: BTreeMap::new(),
        failed: BTreeSet::new(),
    };
    let mut ready = false;
    let mut due: Option<tokio::time::Instant> = None;
    let mut status_tick = tokio::time::interval(opts.status_interval);
    let mut sweep_tick = tokio::time::interval(opts.stale_sweep_interval);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = wake.notified() => {
                if due.is_none() {
                    due = Some(tokio::time::Instant::now() + opts.debounce);
                }
                continue;
            }
            _ = async { tokio::time::sleep_until(due.expect("checked")).await }, if due.is_some() => {
                due = None;
            }
            _ = status_tick.tick() => {
                if ready {
                    if let Err(e) = agent.update_status().await {
                        break Err(e);
                    }
                }
                continue;
            }
            _ = sweep_tick.tick() => {
                if ready {
                    agent.sweep_stale_entries().await;
                }
                continue;
            }
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
        }
        // Debounced change: recompute once all three stores have their first list.
        if !ready {
            if ![&l1, &l2, &l3].iter().all(|l| l.load(Ordering::Relaxed)) {
                continue;
            }
            ready = true;
        }
        if let Err(e) = agent.reconcile().await {
            break Err(e);
        }
        if let Err(e) = agent.update_status().await {
            break Err(e);
        }
    };
    tracing::info!("shutting down: stopping plugins");
    for t in [t1, t2, t3, t4, t5] {
        t.abort();
    }
    // Promoter instances now exit without a successor: only stopServicesOnExit resources stop, unit
    // files stay for the next agent.
    opts.promoter.registry.begin_shutdown();
    let r = engine.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = engine_task.await;
    let _ = source_task.await;
    let _ = http_task.await;
    tracing::info!("stopped");
    result?;
    r.map_err(|_| K8sError::EngineGone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_ref(p: &ReactorPolicy) -> ObjectReference {
        p.object_ref(&())
    }

    fn pol(name: &str, generation: i64, status_nodes: usize) -> ReactorPolicy {
        let mut p = ReactorPolicy::new(name, Default::default());
        p.metadata.uid = Some("u".into());
        p.metadata.generation = Some(generation);
        p.status = Some(crate::policy::ReactorPolicyStatus {
            nodes: (0..status_nodes)
                .map(|i| NodeStatus {
                    node: format!("n{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        p
    }

    #[test]
    fn status_writes_do_not_wake_agents() {
        let mut t = Triggers::default();
        assert!(t.policy(&watcher::Event::InitApply(pol("a", 1, 0))));
        assert!(t.policy(&watcher::Event::<ReactorPolicy>::InitDone));
        // another agent wrote its entry: same generation
        assert!(!t.policy(&watcher::Event::Apply(pol("a", 1, 1))));
        assert!(!t.policy(&watcher::Event::Apply(pol("a", 1, 3))));
        // a spec change
        assert!(t.policy(&watcher::Event::Apply(pol("a", 2, 3))));
        assert!(t.policy(&watcher::Event::Apply(pol("b", 1, 0))));
        assert!(t.policy(&watcher::Event::Delete(pol("b", 1, 0))));
    }

    #[test]
    fn node_label_and_config_map_triggers() {
        let mut t = Triggers::default();
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        assert!(t.node(&watcher::Event::Apply(n.clone())));
        n.metadata.resource_version = Some("2".into());
        assert!(
            !t.node(&watcher::Event::Apply(n.clone())),
            "heartbeat-like updates are ignored"
        );
        n.metadata.labels = Some([("zone".to_string(), "a".to_string())].into());
        assert!(t.node(&watcher::Event::Apply(n.clone())));
        let mut c = ConfigMap::default();
        c.metadata.name = Some("s".into());
        assert!(t.config_map(&watcher::Event::Apply(c.clone())));
        assert!(!t.config_map(&watcher::Event::Apply(c.clone())));
        c.data = Some([("k".to_string(), "v".to_string())].into());
        assert!(t.config_map(&watcher::Event::Apply(c.clone())));
    }

    #[test]
    fn stale_entries_are_removed_from_the_end_with_guards() {
        let nodes: Vec<NodeStatus> = ["a", "gone1", "b", "gone2"]
            .iter()
            .map(|n| NodeStatus {
                node: n.to_string(),
                ..Default::default()
            })
            .collect();
        let alive: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let ops = stale_entry_ops(&nodes, &alive);
        assert_eq!(
            ops,
            vec![
                serde_json::json!({"op": "test", "path": "/status/nodes/3/node", "value": "gone2"}),
                serde_json::json!({"op": "remove", "path": "/status/nodes/3"}),
                serde_json::json!({"op": "test", "path": "/status/nodes/1/node", "value": "gone1"}),
                serde_json::json!({"op": "remove", "path": "/status/nodes/1"}),
            ]
        );
        let all: BTreeSet<String> = ["a", "b", "gone1", "gone2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(stale_entry_ops(&nodes, &all).is_empty());
    }

    #[test]
    fn plugin_events_name_the_node_and_attach_to_the_policy() {
        let mut p = ReactorPolicy::new("ha", Default::default());
        p.metadata.uid = Some("uid-1".into());
        let ev = PluginEvent {
            instance: crate::plugins::InstanceId {
                policy: "ha".into(),
                kind: "promoter".into(),
            },
            warning: true,
            reason: "StartFailed".into(),
            message: "r0: mount failed".into(),
        };
        let (e, r) = plugin_event("n7", &ev, Some(policy_ref(&p)));
        assert_eq!(e.type_, EventType::Warning);
        assert_eq!(e.reason, "StartFailed");
        assert_eq!(
            e.note.as_deref(),
            Some("node n7: promoter: r0: mount failed")
        );
        assert_eq!(
            (r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()),
            (Some("ReactorPolicy"), Some("ha"), Some("uid-1"))
        );
        assert_eq!(r.namespace, None);
        let long = k8s_event("n", false, &"R".repeat(300), &"x".repeat(5000));
        assert_eq!(long.type_, EventType::Normal);
        assert_eq!(long.reason.len(), 128);
        assert_eq!(long.note.unwrap().len(), 1000);
    }

    #[test]
    fn field_managers_fit() {
        assert_eq!(field_manager("n1"), "drbd-reactor/n1");
        let long = "a".repeat(253);
        let m = field_manager(&long);
        assert!(m.len() <= 128, "{}", m.len());
        assert_ne!(m, field_manager(&"a".repeat(252)));
    }
}
