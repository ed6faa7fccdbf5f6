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
//! copies a resource before changing it while anyone holds it) has not changed, so a rendering re-renders
//! only the resources that changed and concatenates the kept text of the others, family by family, in
//! the same order a full rendering has. Once a scraper asked for gzip, the body is also kept compressed
//! per family and group of resources, and only groups whose text changed are compressed again
//! ([`exposition`], [`gzip`]).
//!
//! The instances render (and compress) changes in the background, once the event stream has been quiet
//! for [`PRERENDER_QUIET`] (a statistics round is a burst of lines) and at most [`PRERENDER_MAX_WAIT`]
//! after a change, and publish the result as an immutable [`Exposition`]. A scrape serves the last
//! published one: it only concatenates kept text, or kept compressed groups, whatever changed. While a
//! change is being rendered the scrape serves the rendering before it (tens of milliseconds behind);
//! a scrape renders itself only when nothing was rendered yet, when the options changed, or when a
//! change has waited longer than [`MAX_LAG`].

pub mod exposition;
pub mod gzip;
pub mod render;

use super::{Delivery, Inbox, InstanceId, Plugin, PluginCtx, PluginError, Subscription};
use crate::drbd::state::Resource;
use ::prometheus::core::{Collector, Desc};
use ::prometheus::proto;
use bytes::Bytes;
use exposition::{Exposition, Renderings};
use futures::future::BoxFuture;
use futures::FutureExt;
use gzip::{Compressor, GzipBody};
pub use render::{DrbdVersion, Fragment, Options, PeerByteCounters, View};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The exporter instances render changes in the background once the stream has been quiet this long (a
/// statistics round arrives as a burst of lines within milliseconds)...
const PRERENDER_QUIET: Duration = Duration::from_millis(10);
/// ...or at the latest this long after the first change not rendered yet, when changes keep coming.
const PRERENDER_MAX_WAIT: Duration = Duration::from_millis(100);
/// While an instance renders in the background, a scrape serves the last complete rendering instead of
/// rendering itself, unless a change has waited longer than this (a rendering that fell behind).
const MAX_LAG: Duration = Duration::from_secs(1);

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
    generation: AtomicU64,
    /// When the oldest change that no rendering (finished or under way) includes happened.
    unrendered_since: Mutex<Option<Instant>>,
    /// The kept fragments and compressed groups; held while rendering.
    renderings: Mutex<Renderings>,
    /// The last complete rendering.
    published: Mutex<Option<Arc<Exposition>>>,
    /// A scraper asked for gzip: renderings compress too.
    gzip_wanted: AtomicBool,
    /// Running instances that render changes in the background ([`Registration::render_ahead`]).
    renderers: AtomicUsize,
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
    hub: Arc<ExporterHub>,
    key: (InstanceId, u64),
    slot: Arc<Slot>,
    renders_ahead: bool,
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
        // Still under the slot's lock: whoever sees the new state sees the new generation too.
        self.hub.changed();
        m.len()
    }

    /// Declares that this instance renders its changes in the background ([`ExporterHub::prerender`]
    /// within [`PRERENDER_MAX_WAIT`]), so scrapes may serve the last complete rendering meanwhile.
    pub fn render_ahead(&mut self) {
        if !self.renders_ahead {
            self.renders_ahead = true;
            self.hub.renderers.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.hub.slots).remove(&self.key);
        if self.renders_ahead {
            self.hub.renderers.fetch_sub(1, Ordering::Relaxed);
        }
        self.hub.changed();
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
            generation: AtomicU64::new(0),
            unrendered_since: Mutex::new(None),
            renderings: Mutex::new(Renderings::default()),
            published: Mutex::new(None),
            gzip_wanted: AtomicBool::new(false),
            renderers: AtomicUsize::new(0),
        }
    }

    /// Records a change of what would be rendered.
    fn changed(&self) {
        lock(&self.unrendered_since).get_or_insert_with(Instant::now);
        self.generation.fetch_add(1, Ordering::Release);
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
        self.changed();
        Registration {
            hub: self.clone(),
            key,
            slot,
            renders_ahead: false,
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
        self.changed();
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

    /// What a scrape serves (compressed groups included when `gzip`); `None` while no exporter instance
    /// runs. The last complete rendering when nothing changed since, or when an instance renders in the
    /// background and no change has waited longer than [`MAX_LAG`] (in practice the rendering lags a
    /// change by the quiet time and its own duration, tens of milliseconds); otherwise rendered now.
    pub fn exposition(&self, gzip: bool) -> Option<Arc<Exposition>> {
        if gzip {
            self.gzip_wanted.store(true, Ordering::Relaxed);
        }
        let (opts, _) = self.options()?;
        if let Some(e) = lock(&self.published).clone() {
            let generation = self.generation.load(Ordering::Acquire);
            let lag_ok = self.renderers.load(Ordering::Relaxed) > 0
                && lock(&self.unrendered_since).is_none_or(|t| t.elapsed() < MAX_LAG);
            if e.serves(opts, gzip, generation, lag_ok) {
                return Some(e);
            }
        }
        self.refresh(gzip).map(|(e, _)| e)
    }

    /// Renders what changed since the last rendering now (and compresses it when `gzip` or a scraper
    /// asked for gzip before), and publishes the result; with how many resources were rendered anew.
    fn refresh(&self, gzip: bool) -> Option<(Arc<Exposition>, usize)> {
        let (opts, first) = self.options()?;
        let gzip = gzip || self.gzip_wanted.load(Ordering::Relaxed);
        let mut r = lock(&self.renderings);
        // The generation is read before the state: a change racing with the rendering makes it look
        // stale, never the other way round.
        let generation = {
            let mut since = lock(&self.unrendered_since);
            *since = None;
            self.generation.load(Ordering::Acquire)
        };
        if let Some(e) = lock(&self.published).clone() {
            if e.serves(opts, gzip, generation, false) {
                // Published while this call waited for the lock.
                r.rendered = 0;
                return Some((e, 0));
            }
        }
        let current: Vec<(Arc<str>, Arc<Resource>)> = lock(&first.resources)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let version = self.version();
        r.update(opts, current);
        if gzip {
            r.compress();
        }
        let e = Arc::new(r.exposition(generation, version, gzip));
        *lock(&self.published) = Some(e.clone());
        Some((e, r.rendered))
    }

    /// Renders (and compresses, once a scraper asked for gzip) what changed, ahead of the next scrape,
    /// which then only concatenates kept text. Returns how many resources were rendered (0 while no
    /// exporter instance runs).
    pub fn prerender(&self) -> usize {
        self.refresh(false).map_or(0, |(_, n)| n)
    }

    /// Whether the last published rendering has every change (a scrape now serves the current state).
    pub fn up_to_date(&self) -> bool {
        lock(&self.published)
            .as_ref()
            .is_some_and(|e| e.generation == self.generation.load(Ordering::Acquire))
    }

    /// Resources rendered anew by the last rendering (the others reused their kept text).
    pub fn last_rendered(&self) -> usize {
        lock(&self.renderings).rendered
    }

    /// Groups compressed anew by the last rendering that compressed.
    pub fn last_compressed(&self) -> usize {
        lock(&self.renderings).compressed
    }

    /// The DRBD families in the text format, up to date; `None` while no exporter instance runs.
    pub fn text(&self) -> Option<String> {
        let (e, _) = self.refresh(false)?;
        let mut out = String::with_capacity(e.text_len());
        e.write_text(&mut out);
        Some(out)
    }

    /// Appends the DRBD families in the text format, up to date; nothing while no exporter instance runs.
    pub fn render_text(&self, out: &mut String) {
        if let Some(t) = self.text() {
            out.push_str(&t);
        }
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

/// One `/metrics` body, in pieces sent one after the other: the DRBD families, shared by every scrape
/// of the same state (reference counted [`Bytes`], never copied per scrape), then the agent's own
/// families (small, made per scrape).
pub struct Body {
    pub pieces: Vec<Bytes>,
    /// Gzip-compressed (together, the pieces are one gzip member).
    pub gzip: bool,
}

impl Body {
    /// Bytes in all pieces.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole body in one buffer (a copy; for tests and tools).
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

thread_local! {
    /// A compressor per scraping thread, reused: making one allocates and clears its tables.
    static COMPRESSOR: std::cell::RefCell<Compressor> = std::cell::RefCell::new(Compressor::default());
}

/// The whole `/metrics` body: the DRBD families (while an exporter runs, see [`ExporterHub::exposition`]),
/// then the agent's own families; with `gzip`, compressed, mostly from groups compressed ahead of time.
/// The DRBD part is made once per published rendering and shared by every scrape of it
/// ([`Exposition::text_bytes`], [`Exposition::gzip_prefix`]); a scrape itself allocates only the
/// agent's own families (about 10 KB).
pub fn scrape(hub: &ExporterHub, agent: &::prometheus::Registry, gzip: bool) -> Body {
    let mut own = String::with_capacity(16 * 1024);
    if let Err(e) = ::prometheus::TextEncoder::new().encode_utf8(&agent.gather(), &mut own) {
        tracing::warn!(error = %e, "cannot encode the agent's metrics");
    }
    let drbd = hub.exposition(gzip);
    if gzip {
        return COMPRESSOR.with_borrow_mut(|c| {
            let own = c.piece([own.as_bytes()]);
            let prefix = drbd.as_ref().and_then(|e| e.gzip_prefix());
            let pieces = match prefix {
                Some((start, crc)) => vec![start, Bytes::from(gzip::finish_after(&crc, &[&own]))],
                None => {
                    let mut body = GzipBody::new(own.compressed_len());
                    body.push(&own);
                    vec![Bytes::from(body.finish())]
                }
            };
            Body { pieces, gzip: true }
        });
    }
    let mut pieces = Vec::with_capacity(2);
    if let Some(e) = &drbd {
        pieces.push(e.text_bytes());
    }
    pieces.push(Bytes::from(own));
    Body {
        pieces,
        gzip: false,
    }
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
            let mut reg = self.hub.register_spec(ctx.id.clone(), &self.spec);
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
            // A change is rendered ahead of the next scrape once the stream is quiet (a burst is
            // rendered once), so a scrape only concatenates kept text.
            reg.render_ahead();
            let mut first: Option<tokio::time::Instant> = None;
            let mut due: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    d = inbox.recv() => match d {
                        None => break,
                        Some(Delivery::Resources(touched)) => {
                            detail(reg.apply(touched));
                            let now = tokio::time::Instant::now();
                            let first = *first.get_or_insert(now);
                            due = Some((now + PRERENDER_QUIET).min(first + PRERENDER_MAX_WAIT));
                        }
                        Some(Delivery::Change(_)) => {}
                    },
                    () = async { tokio::time::sleep_until(due.expect("checked")).await }, if due.is_some() => {
                        (first, due) = (None, None);
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
    fn a_rendering_is_reused_until_something_changes() {
        let hub = Arc::new(ExporterHub::default());
        let reg = hub.register(id("p"), false);
        reg.apply(vec![res("r1", Role::Primary)]);
        let a = hub.exposition(false).unwrap();
        let b = hub.exposition(false).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        reg.apply(vec![res("r1", Role::Secondary)]);
        let c = hub.exposition(false).unwrap();
        assert!(
            !Arc::ptr_eq(&a, &c),
            "no instance renders ahead: rendered now"
        );
        hub.set_version(DrbdVersion {
            kmod: (9, 2, 1),
            utils: (9, 30, 0),
        });
        assert!(hub.text().unwrap().contains("kmod=\"9.2.1\""));
        let e2 = hub.register(id("q"), true);
        assert!(hub.text().unwrap().contains("drbd_resource_role{"));
        drop(e2);
        assert!(!hub.text().unwrap().contains("drbd_resource_role{"));
        drop(reg);
        assert!(hub.text().is_none());
        assert!(hub.exposition(true).is_none());
    }

    #[test]
    fn a_scrape_serves_the_last_rendering_while_an_instance_renders_ahead() {
        let hub = Arc::new(ExporterHub::default());
        let mut reg = hub.register(id("p"), false);
        reg.render_ahead();
        reg.apply(vec![res("r1", Role::Primary)]);
        // Nothing rendered yet: the scrape renders.
        let a = hub.exposition(false).unwrap();
        assert_eq!(a.resources(), 1);
        reg.apply(vec![res("r1", Role::Secondary), res("r2", Role::Primary)]);
        let b = hub.exposition(false).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "the instance renders the change: served as it was"
        );
        assert_eq!(hub.prerender(), 2);
        let c = hub.exposition(false).unwrap();
        assert_eq!(c.resources(), 2);
        // gzip is asked for: a rendering without compressed groups cannot serve it.
        let z = hub.exposition(true).unwrap();
        assert!(z.has_gzip() && !Arc::ptr_eq(&c, &z));
        // A change the background rendering did not pick up within MAX_LAG: the scrape renders it.
        reg.apply(vec![(Arc::from("r2"), None)]);
        assert_eq!(hub.exposition(true).unwrap().resources(), 2);
        std::thread::sleep(MAX_LAG + Duration::from_millis(50));
        let d = hub.exposition(true).unwrap();
        assert_eq!(d.resources(), 1);
        assert!(d.has_gzip());
        // Other options (a second instance with enums) are never served from an older rendering.
        let e2 = hub.register(id("q"), true);
        assert!(hub.exposition(false).unwrap().opts.enums);
        drop(e2);
        // Without an instance rendering ahead, every scrape is up to date.
        drop(reg);
        let reg = hub.register(id("p"), false);
        reg.apply(vec![res("r9", Role::Primary)]);
        assert_eq!(hub.exposition(false).unwrap().resources(), 1);
        reg.apply(vec![res("r8", Role::Primary)]);
        assert_eq!(hub.exposition(false).unwrap().resources(), 2);
    }

    #[test]
    fn gzip_scrape_is_the_text_scrape_compressed() {
        use std::io::Read;
        let hub = Arc::new(ExporterHub::default());
        let agent = AgentMetrics::new();
        let gunzip = |b: &Body| {
            assert!(b.gzip);
            let mut out = String::new();
            flate2::read::GzDecoder::new(&b.to_vec()[..])
                .read_to_string(&mut out)
                .expect("one gzip member");
            out
        };
        let plain = |hub: &ExporterHub| {
            let b = scrape(hub, &agent.registry, false);
            assert!(!b.gzip);
            String::from_utf8(b.to_vec()).unwrap()
        };
        // No exporter instance: the agent's families only, still compressed.
        let z = scrape(&hub, &agent.registry, true);
        assert_eq!(gunzip(&z), plain(&hub));
        let reg = hub.register(id("p"), true);
        reg.apply(
            (0..150)
                .map(|i| res(&format!("r{i:03}"), Role::Secondary))
                .collect(),
        );
        let text = plain(&hub);
        assert!(
            text.contains("drbd_resource_role{name=\"r149\",drbd_resource_role=\"Secondary\"} 1\n")
        );
        assert!(text.contains("# TYPE drbdreactor_events2_lines_total counter\n"));
        assert_eq!(gunzip(&scrape(&hub, &agent.registry, true)), text);
        // One resource changed: one compressed group, the same text as a plain scrape.
        reg.apply(vec![res("r070", Role::Primary)]);
        let z = scrape(&hub, &agent.registry, true);
        assert_eq!(
            hub.last_compressed(),
            1,
            "the drbd_resource_role group of r070"
        );
        assert_eq!(gunzip(&z), plain(&hub));
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
        let scrape = |hub: &ExporterHub| hub.text().expect("an instance runs");
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
        let text = hub.text().unwrap();
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
        let after = hub.text().unwrap();
        assert_eq!(hub.last_rendered(), 0);
        assert_ne!(after, text);
        assert_eq!(after, render::to_text(&hub.view().unwrap()));
    }

    #[tokio::test]
    async fn the_plugin_renders_a_burst_once_it_is_quiet() {
        let hub = Arc::new(ExporterHub::default());
        let p = Prometheus::from_config(&serde_json::json!({}), hub.clone()).unwrap();
        let (mut outbox, inbox) = channel(p.subscription());
        let ctx = plugin_ctx();
        let task = tokio::spawn(Box::new(p).run(inbox, ctx));
        // Nothing scrapes here: a rendering can only come from the plugin itself.
        // Rendered, and nothing left to render.
        let published = || {
            let resources = lock(&hub.published).as_ref().map(|e| e.resources());
            resources.filter(|_| hub.up_to_date())
        };
        let wait_for = |n: usize| async move {
            let t0 = std::time::Instant::now();
            while published() != Some(n) {
                assert!(t0.elapsed() < Duration::from_secs(10), "never rendered {n}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        outbox.post(&[res("r1", Role::Primary), res("r2", Role::Primary)]);
        wait_for(2).await;
        assert_eq!(hub.last_rendered(), 2);
        // A burst of deliveries closer together than the quiet time is rendered once, at its end.
        for i in 0..5 {
            outbox.post(&[res(
                "r3",
                if i % 2 == 0 {
                    Role::Primary
                } else {
                    Role::Secondary
                },
            )]);
            tokio::time::sleep(PRERENDER_QUIET / 5).await;
        }
        wait_for(3).await;
        assert_eq!(hub.last_rendered(), 1, "r3 only");
        let text = hub.text().unwrap();
        assert_eq!(
            hub.last_rendered(),
            0,
            "the scrape found everything rendered"
        );
        assert!(text.contains("drbd_resource_suspended{name=\"r3\"} 0\n"));
        outbox.close();
        task.await.unwrap().unwrap();
    }
}
