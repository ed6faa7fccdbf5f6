//! Prometheus exporter: DRBD state as metric families on the agent's `/metrics`.
//!
//! Every policy whose spec has a `prometheus` section yields one instance `(policy, "prometheus")`. The
//! agent has one HTTP server, so instances do not serve anything themselves: each keeps its own copy of
//! the DRBD state (resource name → current state, from every-event notifications) in a slot of the shared
//! [`ExporterHub`], and `/metrics` renders the DRBD families once from the hub:
//! - while no exporter instance runs, `/metrics` has only the agent's own metrics;
//! - `enums` is on when any running instance asks for it (the union of what the policies want);
//! - the state is read from the slot of the first running instance in (policy name) order; all instances
//!   are fed from the same engine stream, so their copies differ at most by notifications in flight.
//!
//! A scrape never talks to the engine: it clones the `Arc`s of one slot under its lock and renders outside
//! it, so the engine never waits for a scrape and a scrape never waits for the engine. Like upstream, the
//! rendered text is kept and reused until something changes (a notification, an instance coming or going,
//! a new version), so repeated scrapes of an unchanged state cost a copy.

pub mod render;

use super::{Delivery, Inbox, InstanceId, Plugin, PluginCtx, PluginError, Subscription};
use crate::drbd::state::Resource;
use ::prometheus::core::{Collector, Desc};
use ::prometheus::proto;
use futures::future::BoxFuture;
use futures::FutureExt;
pub use render::{DrbdVersion, View};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `spec.prometheus` of a ReactorPolicy: turns the exporter on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrometheusSpec {
    /// Also export the one-hot state families (resource role and write ordering, connection state,
    /// device disk state, peer-device replication and peer disk state): one series per possible state,
    /// 1 for the current one. Off by default, as upstream, because they multiply the series count. When
    /// several policies enable the exporter on a node, the families are on if any of them asks.
    #[serde(default)]
    pub enums: bool,
}

/// Longest time `drbdadm --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

type Map = BTreeMap<Arc<str>, Arc<Resource>>;

/// The state copy of one running exporter instance.
struct Slot {
    enums: bool,
    resources: Mutex<Map>,
}

/// Where running exporter instances publish their state, and what `/metrics` renders the DRBD families
/// from. One per agent.
pub struct ExporterHub {
    drbdadm: Vec<String>,
    slots: Mutex<BTreeMap<(InstanceId, u64), Arc<Slot>>>,
    next: AtomicU64,
    version: Mutex<DrbdVersion>,
    /// Bumped on every change of what would be rendered.
    generation: Arc<AtomicU64>,
    /// The last rendering and the generation it was made from.
    cache: Mutex<Option<(u64, Arc<String>)>>,
}

impl Default for ExporterHub {
    fn default() -> Self {
        ExporterHub::new(Vec::new())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running instance's place in the hub; leaving it (drop) removes the instance's families.
pub struct Registration {
    generation: Arc<AtomicU64>,
    hub: Arc<ExporterHub>,
    key: (InstanceId, u64),
    slot: Arc<Slot>,
}

impl Registration {
    /// Applies one every-event notification: current state per touched resource, `None` = destroyed.
    pub fn apply(&self, touched: Vec<(Arc<str>, Option<Arc<Resource>>)>) -> usize {
        let mut m = lock(&self.slot.resources);
        for (name, r) in touched {
            match r {
                Some(r) => {
                    m.insert(name, r);
                }
                None => {
                    m.remove(&name);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
        m.len()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.hub.slots).remove(&self.key);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

impl ExporterHub {
    /// `drbdadm`: the command line that runs the host's drbdadm (`--version` is appended); empty = the
    /// version is not queried and stays 0.0.0.
    pub fn new(drbdadm: Vec<String>) -> ExporterHub {
        ExporterHub {
            drbdadm,
            slots: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            version: Mutex::new(DrbdVersion::default()),
            generation: Arc::new(AtomicU64::new(0)),
            cache: Mutex::new(None),
        }
    }

    pub fn register(self: &Arc<Self>, id: InstanceId, enums: bool) -> Registration {
        let key = (id, self.next.fetch_add(1, Ordering::Relaxed));
        let slot = Arc::new(Slot {
            enums,
            resources: Mutex::new(BTreeMap::new()),
        });
        lock(&self.slots).insert(key.clone(), slot.clone());
        self.generation.fetch_add(1, Ordering::Release);
        Registration {
            generation: self.generation.clone(),
            hub: self.clone(),
            key,
            slot,
        }
    }

    /// Number of running exporter instances.
    pub fn instances(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn version(&self) -> DrbdVersion {
        *lock(&self.version)
    }

    pub fn set_version(&self, v: DrbdVersion) {
        *lock(&self.version) = v;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Runs `drbdadm --version` through the configured host-exec command line and records what it reports
    /// (0.0.0 for what it does not).
    pub async fn refresh_version(&self) {
        let Some((prog, args)) = self.drbdadm.split_first() else {
            return;
        };
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(args)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let v = match tokio::time::timeout(VERSION_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => DrbdVersion::parse(&String::from_utf8_lossy(&out.stdout)),
            Ok(Err(e)) => {
                tracing::warn!(command = ?self.drbdadm, error = %e, "cannot run drbdadm --version; drbd_version reports 0.0.0");
                DrbdVersion::default()
            }
            Err(_) => {
                tracing::warn!(command = ?self.drbdadm, "drbdadm --version timed out; drbd_version reports 0.0.0");
                DrbdVersion::default()
            }
        };
        self.set_version(v);
    }

    /// What to render now; `None` while no exporter instance runs.
    pub fn view(&self) -> Option<View> {
        let (enums, first) = {
            let slots = lock(&self.slots);
            let first = slots.values().next()?.clone();
            (slots.values().any(|s| s.enums), first)
        };
        let resources = lock(&first.resources).values().cloned().collect();
        Some(View {
            resources,
            enums,
            version: self.version(),
        })
    }

    /// Appends the DRBD families in the text format; nothing while no exporter instance runs.
    pub fn render_text(&self, out: &mut String) {
        if let Some(text) = self.text() {
            out.push_str(&text);
        }
    }

    /// The DRBD families in the text format, rendered anew only when something changed since the last
    /// call; `None` while no exporter instance runs.
    pub fn text(&self) -> Option<Arc<String>> {
        // Read the generation before the state: a change racing with the rendering makes the kept text
        // look stale, never the other way round.
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((g, text)) = lock(&self.cache).as_ref() {
            if *g == generation {
                return Some(text.clone());
            }
        }
        let view = self.view()?;
        let text = Arc::new(render::to_text(&view));
        *lock(&self.cache) = Some((generation, text.clone()));
        Some(text)
    }

    /// A `prometheus` crate collector of the DRBD families, for registering in a `Registry`.
    pub fn collector(self: &Arc<Self>) -> HubCollector {
        let descs = render::FAMILIES
            .iter()
            .filter_map(|f| {
                Desc::new(
                    f.name.to_string(),
                    f.help.to_string(),
                    f.labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .ok()
            })
            .collect();
        HubCollector {
            hub: self.clone(),
            descs,
        }
    }
}

/// Builds the DRBD families from the hub's current snapshot on every `collect`.
pub struct HubCollector {
    hub: Arc<ExporterHub>,
    descs: Vec<Desc>,
}

impl Collector for HubCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        match self.hub.view() {
            Some(v) => render::to_families(&v),
            None => Vec::new(),
        }
    }
}

/// The whole `/metrics` body: the DRBD families (while an exporter runs), then the agent's own families.
pub fn render_metrics(hub: &ExporterHub, agent: &::prometheus::Registry) -> String {
    let drbd = hub.text();
    let mut out = String::with_capacity(drbd.as_ref().map_or(0, |t| t.len()) + 16 * 1024);
    if let Some(t) = drbd {
        out.push_str(&t);
    }
    if let Err(e) = ::prometheus::TextEncoder::new().encode_utf8(&agent.gather(), &mut out) {
        tracing::warn!(error = %e, "cannot encode the agent's metrics");
    }
    out
}

/// Whether an `Accept-Encoding` header value allows gzip (`gzip`, `x-gzip` or `*`, with a non-zero q).
pub fn accepts_gzip(header: &str) -> bool {
    header.split(',').any(|part| {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim().to_ascii_lowercase();
        if !matches!(coding.as_str(), "gzip" | "x-gzip" | "*") {
            return false;
        }
        it.all(|p| {
            let p = p.trim();
            match p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                Some(q) => q.trim().parse::<f64>().map(|q| q > 0.0).unwrap_or(false),
                None => true,
            }
        })
    })
}

/// Gzip-compresses a body (fast level: scrapes are frequent, the text compresses well anyway).
pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// The exporter plugin instance.
pub struct Prometheus {
    spec: PrometheusSpec,
    hub: Arc<ExporterHub>,
}

impl Prometheus {
    pub fn from_config(
        v: &serde_json::Value,
        hub: Arc<ExporterHub>,
    ) -> Result<Prometheus, PluginError> {
        let spec =
            serde_json::from_value(v.clone()).map_err(|e| PluginError::Config(e.to_string()))?;
        Ok(Prometheus { spec, hub })
    }
}

impl Plugin for Prometheus {
    fn subscription(&self) -> Subscription {
        Subscription {
            changes: false,
            events: true,
        }
    }

    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            let reg = self.hub.register(ctx.id.clone(), self.spec.enums);
            // Like upstream, the versions are read when an exporter starts; the state keeps flowing
            // meanwhile.
            let hub = self.hub.clone();
            let version = tokio::spawn(async move { hub.refresh_version().await });
            let detail = |n: usize| {
                ctx.detail.set(serde_json::json!({
                    "enums": self.spec.enums,
                    "resources": n,
                }))
            };
            detail(0);
            while let Some(d) = inbox.recv().await {
                if let Delivery::Resources(touched) = d {
                    detail(reg.apply(touched));
                }
            }
            version.abort();
            drop(reg);
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drbd::types::Role;
    use crate::metrics::AgentMetrics;
    use crate::plugins::{channel, DetailHandle};

    fn id(p: &str) -> InstanceId {
        InstanceId {
            policy: p.to_string(),
            kind: "prometheus".to_string(),
        }
    }

    fn res(name: &str, role: Role) -> (Arc<str>, Option<Arc<Resource>>) {
        let mut r = Resource::new(name);
        r.role = role;
        (Arc::from(name), Some(Arc::new(r)))
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(accepts_gzip("x-gzip"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("br, deflate"));
        assert!(!accepts_gzip(""));
    }

    #[test]
    fn spec_defaults_and_rejects_unknown_fields() {
        let s: PrometheusSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert!(!s.enums);
        assert!(
            serde_json::from_value::<PrometheusSpec>(serde_json::json!({"enum": true})).is_err()
        );
    }

    #[test]
    fn hub_combines_instances() {
        let hub = Arc::new(ExporterHub::default());
        assert!(hub.view().is_none());
        let mut out = String::new();
        hub.render_text(&mut out);
        assert!(out.is_empty());

        let b = hub.register(id("b"), false);
        b.apply(vec![res("r1", Role::Primary)]);
        let v = hub.view().unwrap();
        assert!(!v.enums);
        assert_eq!(v.resources.len(), 1);

        // A second instance asking for enums turns them on; the state still comes from the first in
        // policy order.
        let a = hub.register(id("a"), true);
        a.apply(vec![res("r1", Role::Primary), res("r2", Role::Secondary)]);
        let v = hub.view().unwrap();
        assert!(v.enums);
        assert_eq!(v.resources.len(), 2);
        a.apply(vec![(Arc::from("r2"), None)]);
        assert_eq!(hub.view().unwrap().resources.len(), 1);

        drop(a);
        assert!(!hub.view().unwrap().enums);
        drop(b);
        assert!(hub.view().is_none());
        assert_eq!(hub.instances(), 0);
    }

    #[test]
    fn text_is_reused_until_something_changes() {
        let hub = Arc::new(ExporterHub::default());
        let reg = hub.register(id("p"), false);
        reg.apply(vec![res("r1", Role::Primary)]);
        let a = hub.text().unwrap();
        let b = hub.text().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        reg.apply(vec![res("r1", Role::Secondary)]);
        let c = hub.text().unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        hub.set_version(DrbdVersion {
            kmod: (9, 2, 1),
            utils: (9, 30, 0),
        });
        let d = hub.text().unwrap();
        assert!(d.contains("kmod=\"9.2.1\""));
        let e2 = hub.register(id("q"), true);
        assert!(hub.text().unwrap().contains("drbd_resource_role{"));
        drop(e2);
        assert!(!hub.text().unwrap().contains("drbd_resource_role{"));
        drop(reg);
        assert!(hub.text().is_none());
    }

    #[test]
    fn collector_matches_text() {
        let hub = Arc::new(ExporterHub::default());
        let reg = hub.register(id("p"), true);
        reg.apply(vec![res("r1", Role::Primary)]);
        let registry = ::prometheus::Registry::new();
        registry.register(Box::new(hub.collector())).unwrap();
        let mut text = String::new();
        hub.render_text(&mut text);
        let fams = hub.collector().collect();
        let enc = ::prometheus::TextEncoder::new()
            .encode_to_string(&fams)
            .unwrap();
        assert_eq!(enc, text);
        // Through a registry too (which sorts families by name).
        assert_eq!(registry.gather().len(), fams.len());
    }

    #[tokio::test]
    async fn plugin_follows_deliveries_and_leaves_the_hub() {
        let hub = Arc::new(ExporterHub::default());
        let p = Prometheus::from_config(&serde_json::json!({"enums": true}), hub.clone()).unwrap();
        let sub = p.subscription();
        assert!(sub.events && !sub.changes);
        let (mut outbox, inbox) = channel(sub);
        let ctx = PluginCtx {
            id: id("p"),
            node_name: "n".into(),
            metrics: AgentMetrics::new(),
            detail: DetailHandle::default(),
            events: Default::default(),
        };
        let task = tokio::spawn(Box::new(p).run(inbox, ctx.clone()));
        outbox.post(&[res("r1", Role::Primary), res("r2", Role::Primary)]);
        let wait = |n: usize| {
            let hub = hub.clone();
            async move {
                for _ in 0..200 {
                    if hub.view().map(|v| v.resources.len()) == Some(n) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                panic!("never saw {n} resources");
            }
        };
        wait(2).await;
        outbox.post(&[(Arc::from("r1"), None)]);
        wait(1).await;
        assert_eq!(ctx.detail.get().unwrap()["resources"], 1);
        outbox.close();
        task.await.unwrap().unwrap();
        assert!(hub.view().is_none());
    }
}
