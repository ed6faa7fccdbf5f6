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
//! it, so the engine never waits for a scrape and a scrape never waits for the engine.
//!
//! The text of each resource's samples is kept per family ([`render::Fragment`]) together with the
//! resource state it was rendered from. A resource whose state is still the very same `Arc` (the engine
//! copies a resource before changing it while anyone holds it) has not changed, so a scrape re-renders
//! only the resources that changed since the previous scrape and concatenates the kept text of the
//! others, family by family, in the same order a full rendering has. The instances render changed
//! resources ahead of the scrape too ([`ExporterHub::prerender`], a second after a change, at most once
//! a second), so a scrape after a statistics round does not pay for rendering it.

pub mod render;

use super::{Delivery, Inbox, InstanceId, Plugin, PluginCtx, PluginError, Subscription};
use crate::drbd::state::Resource;
use ::prometheus::core::{Collector, Desc};
use ::prometheus::proto;
use futures::future::BoxFuture;
use futures::FutureExt;
pub use render::{DrbdVersion, Fragment, Options, PeerByteCounters, View};
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
    /// Names of the peer-device byte counters: `upstream` (default) keeps upstream drbd-reactor's
    /// `drbd_peerdevice_sent_bytes` / `drbd_peerdevice_received_bytes`, which existing dashboards and
    /// alert rules use; `total` exports them as `..._bytes_total` instead, as Prometheus naming
    /// conventions (and `promtool check metrics`) want; `both` exports both pairs, for a migration.
    /// With several policies on a node, every name any of them asks for is exported.
    #[serde(default, skip_serializing_if = "PeerByteCounters::is_default")]
    pub peer_byte_counters: PeerByteCounters,
}

/// How long after a change the exporter renders the changed resources ahead of the next scrape: it
/// coalesces a burst (a statistics round touches every resource) and bounds the background rendering to
/// once a second (about 11 ms of CPU for 1000 resources × 2 peers × 2 volumes that all changed).
const PRERENDER_DELAY: Duration = Duration::from_secs(1);

/// Longest time `drbdadm --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

type Map = BTreeMap<Arc<str>, Arc<Resource>>;

/// The state copy of one running exporter instance.
struct Slot {
    enums: bool,
    peer_byte_counters: PeerByteCounters,
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
    /// The rendered samples of each resource, reused while the resource does not change.
    fragments: Mutex<FragmentCache>,
}

/// The fragments of the last scrape, by resource name (sorted), with the state each was rendered from.
#[derive(Default)]
struct FragmentCache {
    opts: Options,
    entries: Vec<(Arc<str>, Arc<Resource>, Fragment)>,
    /// Resources rendered anew by the last [`ExporterHub::write_drbd`] (for benchmarks and tests).
    rendered: usize,
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
            fragments: Mutex::new(FragmentCache::default()),
        }
    }

    pub fn register(self: &Arc<Self>, id: InstanceId, enums: bool) -> Registration {
        self.register_spec(
            id,
            &PrometheusSpec {
                enums,
                ..Default::default()
            },
        )
    }

    /// Registers a running instance with its configuration.
    pub fn register_spec(self: &Arc<Self>, id: InstanceId, spec: &PrometheusSpec) -> Registration {
        let key = (id, self.next.fetch_add(1, Ordering::Relaxed));
        let slot = Arc::new(Slot {
            enums: spec.enums,
            peer_byte_counters: spec.peer_byte_counters,
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

    /// What the running instances ask for together, and the slot whose state is rendered.
    fn options(&self) -> Option<(Options, Arc<Slot>)> {
        let slots = lock(&self.slots);
        let first = slots.values().next()?.clone();
        let opts = Options {
            enums: slots.values().any(|s| s.enums),
            peer_byte_counters: slots
                .values()
                .map(|s| s.peer_byte_counters)
                .reduce(PeerByteCounters::union)
                .unwrap_or_default(),
        };
        Some((opts, first))
    }

    /// What to render now; `None` while no exporter instance runs.
    pub fn view(&self) -> Option<View> {
        let (opts, first) = self.options()?;
        let resources = lock(&first.resources).values().cloned().collect();
        Some(View {
            resources,
            enums: opts.enums,
            version: self.version(),
            peer_byte_counters: opts.peer_byte_counters,
        })
    }

    /// Appends the DRBD families in the text format, rendering anew only the resources that changed since
    /// the last call; false (nothing written) while no exporter instance runs.
    pub fn write_drbd(&self, out: &mut String) -> bool {
        let Some((cache, version)) = self.refresh_fragments() else {
            return false;
        };
        let frags: Vec<&Fragment> = cache.entries.iter().map(|(_, _, f)| f).collect();
        // Room for the agent's own families too, which `render_metrics` appends.
        out.reserve(render::exposition_len(frags.iter().copied()) + 16 * 1024);
        render::write_exposition(out, frags.len(), version, &frags);
        true
    }

    /// Renders the fragments of the resources that changed since the last rendering, ahead of the next
    /// scrape, which then only concatenates kept text. Returns how many were rendered (0 while no
    /// exporter instance runs).
    pub fn prerender(&self) -> usize {
        self.refresh_fragments().map_or(0, |(c, _)| c.rendered)
    }

    /// Brings the kept fragments up to date with the rendered slot's state; `None` while no exporter
    /// instance runs.
    fn refresh_fragments(&self) -> Option<(std::sync::MutexGuard<'_, FragmentCache>, DrbdVersion)> {
        let (opts, first) = self.options()?;
        let current: Vec<(Arc<str>, Arc<Resource>)> = lock(&first.resources)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let version = self.version();
        let mut cache = lock(&self.fragments);
        if cache.opts != opts {
            cache.entries.clear();
            cache.opts = opts;
        }
        let mut old = std::mem::take(&mut cache.entries).into_iter().peekable();
        let mut entries = Vec::with_capacity(current.len());
        let mut rendered = 0;
        for (name, res) in current {
            while old.next_if(|(n, _, _)| *n < name).is_some() {}
            let frag = match old.next_if(|(n, _, _)| *n == name) {
                Some((_, r, f)) if Arc::ptr_eq(&r, &res) => f,
                // Changed: rendered anew, but one-hot families whose samples are the same are copied.
                Some((_, r, f)) => {
                    rendered += 1;
                    Fragment::update(&res, opts, Some((&r, &f)))
                }
                None => {
                    rendered += 1;
                    Fragment::of(&res, opts)
                }
            };
            entries.push((name, res, frag));
        }
        drop(old);
        cache.entries = entries;
        cache.rendered = rendered;
        Some((cache, version))
    }

    /// Resources rendered anew by the last scrape (the others reused their kept text).
    pub fn last_rendered(&self) -> usize {
        lock(&self.fragments).rendered
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
        let mut text = String::new();
        if !self.write_drbd(&mut text) {
            return None;
        }
        let text = Arc::new(text);
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
/// Only resources that changed since the last scrape are rendered anew (see [`ExporterHub::write_drbd`]).
pub fn render_metrics(hub: &ExporterHub, agent: &::prometheus::Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    hub.write_drbd(&mut out);
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
        Subscription::EVENTS
    }

    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            let reg = self.hub.register_spec(ctx.id.clone(), &self.spec);
            // Like upstream, the versions are read when an exporter starts; the state keeps flowing
            // meanwhile.
            let hub = self.hub.clone();
            let version = tokio::spawn(async move { hub.refresh_version().await });
            let detail = |n: usize| {
                ctx.detail.set(serde_json::json!({
                    "enums": self.spec.enums,
                    "peerByteCounters": self.spec.peer_byte_counters,
                    "resources": n,
                }))
            };
            detail(0);
            // A change is rendered ahead of the next scrape, at most once per PRERENDER_DELAY, so a
            // scrape mostly concatenates kept text.
            let mut due: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    d = inbox.recv() => match d {
                        None => break,
                        Some(Delivery::Resources(touched)) => {
                            detail(reg.apply(touched));
                            due.get_or_insert_with(|| tokio::time::Instant::now() + PRERENDER_DELAY);
                        }
                        Some(Delivery::Change(_)) => {}
                    },
                    () = async { tokio::time::sleep_until(due.expect("checked")).await }, if due.is_some() => {
                        due = None;
                        let hub = self.hub.clone();
                        let _ = tokio::task::spawn_blocking(move || hub.prerender()).await;
                    }
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

    fn plugin_ctx() -> PluginCtx {
        PluginCtx {
            id: id("p"),
            node_name: "n".into(),
            metrics: AgentMetrics::new(),
            detail: DetailHandle::default(),
            events: Default::default(),
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
    fn a_scrape_renders_only_what_changed_and_matches_a_full_rendering() {
        let hub = Arc::new(ExporterHub::default());
        let reg = hub.register(id("p"), false);
        let mut engine = crate::engine::Engine::new();
        let mut out = Vec::new();
        let mut feed = |engine: &mut crate::engine::Engine, text: &str| {
            engine.apply_chunk(text.as_bytes(), &mut out);
            reg.apply(engine.state.take_dirty());
        };
        let mut dump = String::new();
        for r in ["r1", "r2", "r3"] {
            dump.push_str(&format!("exists resource name:{r} role:Secondary suspended:no force-io-failures:no may_promote:yes promotion_score:1\n"));
            dump.push_str(&format!("exists connection name:{r} peer-node-id:1 conn-name:p connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0\n"));
            dump.push_str(&format!("exists device name:{r} volume:0 minor:1 disk:UpToDate client:no open:no quorum:yes size:8 read:0 written:0 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no\n"));
            dump.push_str(&format!("exists peer-device name:{r} peer-node-id:1 conn-name:p volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0\n"));
        }
        feed(&mut engine, &dump);
        let full = |hub: &ExporterHub| render::to_text(&hub.view().expect("view"));
        let scrape = |hub: &ExporterHub| {
            let mut s = String::new();
            assert!(hub.write_drbd(&mut s));
            s
        };
        assert_eq!(scrape(&hub), full(&hub));
        assert_eq!(hub.last_rendered(), 3);
        assert_eq!(scrape(&hub), full(&hub));
        assert_eq!(hub.last_rendered(), 0, "nothing changed");
        feed(&mut engine, "change device name:r2 volume:0 minor:1 disk:UpToDate client:no open:yes quorum:yes size:8 read:4 written:4 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no\n");
        let text = scrape(&hub);
        assert_eq!(hub.last_rendered(), 1);
        assert_eq!(text, full(&hub));
        assert!(text
            .contains("drbd_device_read_bytes_total{name=\"r2\",volume=\"0\",minor=\"1\"} 4096\n"));
        // a resource goes, another comes (sorted in between)
        feed(&mut engine, "destroy resource name:r1\nexists resource name:r20 role:Primary suspended:no force-io-failures:no may_promote:no promotion_score:0\n");
        assert_eq!(scrape(&hub), full(&hub));
        assert_eq!(hub.last_rendered(), 1);
        // other options render everything anew
        let e = hub.register_spec(
            id("q"),
            &PrometheusSpec {
                enums: true,
                peer_byte_counters: PeerByteCounters::Total,
            },
        );
        let text = scrape(&hub);
        assert_eq!(hub.last_rendered(), 3);
        assert_eq!(text, full(&hub));
        assert!(text.contains("drbd_resource_role{") && text.contains("_sent_bytes_total{"));
        assert!(
            text.contains("drbd_peerdevice_sent_bytes{"),
            "union with the other policy's names"
        );
        // With enums, a changed resource copies the one-hot families that did not change and renders
        // the others: both must give what a full rendering gives.
        feed(&mut engine, "change peer-device name:r2 peer-node-id:1 conn-name:p volume:0 replication:SyncSource peer-disk:Inconsistent peer-client:no resync-suspended:no received:0 sent:8 out-of-sync:4 pending:0 unacked:0 done:50.00\n\
            change resource name:r3 role:Primary suspended:no force-io-failures:no may_promote:no promotion_score:1\n\
            change device name:r20 volume:0 minor:2 disk:Diskless client:no open:no quorum:yes size:8 read:0 written:0 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no\n\
            change device name:r3 volume:0 minor:1 disk:UpToDate client:no open:yes quorum:yes size:8 read:9 written:9 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no\n");
        let text = scrape(&hub);
        assert_eq!(hub.last_rendered(), 3);
        assert_eq!(text, full(&hub));
        assert!(text.contains("drbd_peerdevice_replication_state{name=\"r2\",conn_name=\"p\",peer_node_id=\"1\",volume=\"0\",drbd_peerdevice_replication_state=\"SyncSource\"} 1\n"));
        assert!(text.contains("drbd_resource_role{name=\"r3\",drbd_resource_role=\"Primary\"} 1\n"));
        assert!(text.contains("drbd_device_state{name=\"r20\",volume=\"0\",minor=\"2\",drbd_device_state=\"Diskless\"} 1\n"));
        drop(e);
        assert!(!scrape(&hub).contains("drbd_resource_role{"));
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
        let ctx = plugin_ctx();
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

    #[test]
    fn prerender_leaves_the_scrape_nothing_to_render_and_the_same_text() {
        let hub = Arc::new(ExporterHub::default());
        assert_eq!(hub.prerender(), 0, "no instance, nothing to render");
        let reg = hub.register(id("p"), false);
        reg.apply(vec![res("r1", Role::Primary), res("r2", Role::Secondary)]);
        assert_eq!(hub.prerender(), 2);
        assert_eq!(hub.prerender(), 0, "nothing changed since");
        let mut text = String::new();
        assert!(hub.write_drbd(&mut text));
        assert_eq!(
            hub.last_rendered(),
            0,
            "the scrape reused the prerendered fragments"
        );
        assert_eq!(text, render::to_text(&hub.view().unwrap()));

        let mut r2 = Resource::new("r2");
        r2.promotion_score = 10102;
        reg.apply(vec![(Arc::from("r2"), Some(Arc::new(r2)))]);
        assert_eq!(hub.prerender(), 1, "only the changed resource");
        let mut after = String::new();
        hub.write_drbd(&mut after);
        assert_eq!(hub.last_rendered(), 0);
        assert_ne!(after, text);
        assert_eq!(after, render::to_text(&hub.view().unwrap()));
    }

    #[tokio::test]
    async fn the_plugin_prerenders_a_second_after_a_change() {
        let hub = Arc::new(ExporterHub::default());
        let p = Prometheus::from_config(&serde_json::json!({}), hub.clone()).unwrap();
        let (mut outbox, inbox) = channel(p.subscription());
        let ctx = plugin_ctx();
        let task = tokio::spawn(Box::new(p).run(inbox, ctx));
        let t0 = std::time::Instant::now();
        outbox.post(&[res("r1", Role::Primary), res("r2", Role::Primary)]);
        // Nothing scrapes here: kept fragments can only come from the plugin's own rendering.
        let kept = || lock(&hub.fragments).entries.len();
        let mut seen_applied = false;
        while kept() == 0 {
            seen_applied |= hub.view().map(|v| v.resources.len()) == Some(2);
            assert!(t0.elapsed() < Duration::from_secs(10), "never prerendered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(seen_applied, "applied before it was rendered");
        assert!(
            t0.elapsed() >= PRERENDER_DELAY,
            "rendered after the delay, not at once"
        );
        assert_eq!(kept(), 2);
        let mut text = String::new();
        hub.write_drbd(&mut text);
        assert_eq!(
            hub.last_rendered(),
            0,
            "the scrape found everything rendered"
        );
        outbox.close();
        task.await.unwrap().unwrap();
    }
}
