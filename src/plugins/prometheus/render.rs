//! The exporter's metric families, built from a snapshot of the DRBD state at scrape time.
//!
//! One function, [`render_resource`], emits the samples of one resource, family by family, through a
//! [`Sink`]; [`render`] adds the global families and walks every resource. Two sinks exist:
//! [`Fragment`] keeps one resource's samples as text (Prometheus text exposition, format 0.0.4), per
//! family, so that a scrape only re-renders the resources that changed and concatenates the rest
//! ([`write_exposition`]); and [`ProtoSink`] builds `prometheus` crate `MetricFamily` values for the
//! [`Collector`](::prometheus::core::Collector) implementation. Both see the same families, in the same
//! order, with the same samples; a test checks that the crate's `TextEncoder` turns the second into
//! exactly the bytes of the first.
//!
//! Order is deterministic: families in the order of [`FAMILIES`]; within a family resources by name,
//! then devices by volume, connections by peer node id, peer devices by volume, paths in the order
//! DRBD reported them, and enum values in DRBD's own enum order.
//!
//! A `yes`/`no` field that DRBD reported as `unknown` (or did not report) has no sample: an absent series
//! says "not known", where 0 or 1 would be a guess. The one exception is `drbd_device_open`, which is 0
//! unless DRBD says `open:yes`: drbd-utils releases still in use (9.22, Debian 12's) print no `open:`
//! field at all, upstream drbd-reactor exports 0 for them (its parser's default), and dashboards sum it.

use crate::drbd::state::{Connection, Device, PeerDevice, Resource};
use crate::drbd::types::{Blocked, ConnState, DiskState, ReplState, Role, Tri, WriteOrdering};
use ::prometheus::proto;
use std::fmt::Write as _;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// One metric family of the exporter.
#[derive(Debug, Clone, Copy)]
pub struct FamilyDef {
    /// Position in [`FAMILIES`].
    pub index: usize,
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Label names, in output order (for enum families the last one is the state label).
    pub labels: &'static [&'static str],
    /// Same name, type, labels and unit as upstream drbd-reactor.
    pub upstream: bool,
    /// One-hot state family, emitted only when `enums` is on.
    pub enums_only: bool,
}

macro_rules! families {
    ($($id:ident = $name:literal, $kind:ident, [$($l:literal),*], upstream $up:literal, enums $en:literal, $help:literal;)+) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        enum FamilyIndex { $($id),+ }
        $(pub const $id: FamilyDef = FamilyDef {
            index: FamilyIndex::$id as usize,
            name: $name,
            help: $help,
            kind: Kind::$kind,
            labels: &[$($l),*],
            upstream: $up,
            enums_only: $en,
        };)+
        /// Every family of the exporter, in output order.
        pub const FAMILIES: &[FamilyDef] = &[$($id),+];
        /// Number of families.
        pub const FAMILY_COUNT: usize = [$(FamilyIndex::$id),+].len();
    };
}

families! {
    UP = "drbdreactor_up", Gauge, [], upstream true, enums false,
        "Whether the drbd-reactor exporter is running (always 1)";
    VERSION = "drbd_version", Gauge, ["kmod", "utils"], upstream true, enums false,
        "Version of the loaded DRBD kernel module and of the DRBD utilities (0.0.0 when unknown); always 1";
    RESOURCES = "drbd_resource_resources", Gauge, [], upstream true, enums false,
        "Number of DRBD resources";
    RES_ROLE = "drbd_resource_role", Gauge, ["name", "drbd_resource_role"], upstream true, enums true,
        "DRBD role of the resource (1 for the current role, 0 for the others)";
    RES_SUSPENDED = "drbd_resource_suspended", Gauge, ["name"], upstream true, enums false,
        "Whether I/O on the resource is suspended (for any reason)";
    RES_MAYPROMOTE = "drbd_resource_maypromote", Gauge, ["name"], upstream true, enums false,
        "Whether the resource may be promoted to Primary";
    RES_PROMOTIONSCORE = "drbd_resource_promotionscore", Gauge, ["name"], upstream true, enums false,
        "Promotion score of the resource (higher is better)";
    RES_FORCEIOFAILURES = "drbd_resource_forceiofailures", Gauge, ["name"], upstream true, enums false,
        "Whether the resource is set, possibly temporarily, to fail I/O requests (e.g. after secondary --force)";
    RES_WRITE_ORDERING = "drbd_resource_write_ordering", Gauge, ["name", "drbd_resource_write_ordering"], upstream false, enums true,
        "Write ordering method of the resource (1 for the current method, 0 for the others)";
    CONN_STATE = "drbd_connection_state", Gauge, ["name", "conn_name", "peer_node_id", "drbd_connection_state"], upstream true, enums true,
        "DRBD connection state (1 for the current state, 0 for the others)";
    CONN_CONGESTED = "drbd_connection_congested", Gauge, ["name", "conn_name", "peer_node_id"], upstream true, enums false,
        "Whether the TCP send buffer of the data connection is more than 80% full";
    CONN_APINFLIGHT = "drbd_connection_apinflight_bytes", Gauge, ["name", "conn_name", "peer_node_id"], upstream true, enums false,
        "Application requests in flight to the peer (not yet completed), in bytes";
    CONN_RSINFLIGHT = "drbd_connection_rsinflight_bytes", Gauge, ["name", "conn_name", "peer_node_id"], upstream true, enums false,
        "Resync requests in flight to the peer, in bytes";
    PD_OUTOFSYNC = "drbd_peerdevice_outofsync_bytes", Gauge, ["name", "conn_name", "peer_node_id", "volume"], upstream true, enums false,
        "Bytes out of sync with this peer, according to the bitmap DRBD keeps for it";
    PD_SENT = "drbd_peerdevice_sent_bytes", Counter, ["name", "conn_name", "peer_node_id", "volume"], upstream true, enums false,
        "Bytes sent to this peer (upstream name, without the _total suffix)";
    PD_SENT_TOTAL = "drbd_peerdevice_sent_bytes_total", Counter, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Bytes sent to this peer";
    PD_RECEIVED = "drbd_peerdevice_received_bytes", Counter, ["name", "conn_name", "peer_node_id", "volume"], upstream true, enums false,
        "Bytes received from this peer (upstream name, without the _total suffix)";
    PD_RECEIVED_TOTAL = "drbd_peerdevice_received_bytes_total", Counter, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Bytes received from this peer";
    PD_REPLICATION = "drbd_peerdevice_replication_state", Gauge, ["name", "conn_name", "peer_node_id", "volume", "drbd_peerdevice_replication_state"], upstream false, enums true,
        "Replication state towards this peer (1 for the current state, 0 for the others)";
    PD_PEER_DISK = "drbd_peerdevice_peer_disk_state", Gauge, ["name", "conn_name", "peer_node_id", "volume", "drbd_peerdevice_peer_disk_state"], upstream false, enums true,
        "Disk state of the peer's replica (1 for the current state, 0 for the others)";
    PD_RESYNC_DONE = "drbd_peerdevice_resync_done_ratio", Gauge, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Progress of the running resync or online verify with this peer, 0 to 1 (absent when none runs)";
    PD_RESYNC_ETA = "drbd_peerdevice_resync_eta_seconds", Gauge, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Estimated time until the running resync or online verify with this peer ends (absent when unknown)";
    PD_PENDING = "drbd_peerdevice_pending_requests", Gauge, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Requests sent to this peer that it has not answered yet";
    PD_UNACKED = "drbd_peerdevice_unacked_requests", Gauge, ["name", "conn_name", "peer_node_id", "volume"], upstream false, enums false,
        "Requests received from this peer that have not been answered yet";
    DEV_STATE = "drbd_device_state", Gauge, ["name", "volume", "minor", "drbd_device_state"], upstream true, enums true,
        "Disk state of the local device (1 for the current state, 0 for the others)";
    DEV_CLIENT = "drbd_device_client", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Whether the device is a client (intentionally diskless)";
    DEV_UNINTENTIONALDISKLESS = "drbd_device_unintentionaldiskless", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Whether the device is diskless without being a client";
    DEV_QUORUM = "drbd_device_quorum", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Whether the device has DRBD quorum";
    DEV_OPEN = "drbd_device_open", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Whether the device is open (0 when DRBD does not report it)";
    DEV_SIZE = "drbd_device_size_bytes", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Size of the device in bytes";
    DEV_READ = "drbd_device_read_bytes_total", Counter, ["name", "volume", "minor"], upstream true, enums false,
        "Net data read from the local disk, in bytes";
    DEV_WRITTEN = "drbd_device_written_bytes_total", Counter, ["name", "volume", "minor"], upstream true, enums false,
        "Net data written to the local disk, in bytes";
    DEV_ALWRITES = "drbd_device_alwrites_total", Counter, ["name", "volume", "minor"], upstream true, enums false,
        "Updates of the activity log area of the metadata";
    DEV_BMWRITES = "drbd_device_bmwrites_total", Counter, ["name", "volume", "minor"], upstream true, enums false,
        "Updates of the bitmap area of the metadata";
    DEV_UPPERPENDING = "drbd_device_upperpending", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Block I/O requests forwarded to DRBD but not yet answered by DRBD";
    DEV_LOWERPENDING = "drbd_device_lowerpending", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Open requests to the local I/O subsystem issued by DRBD";
    DEV_ALSUSPENDED = "drbd_device_alsuspended", Gauge, ["name", "volume", "minor"], upstream true, enums false,
        "Whether the activity log is suspended";
    DEV_BLOCKED = "drbd_device_blocked", Gauge, ["name", "volume", "minor", "drbd_device_blocked"], upstream false, enums false,
        "Whether I/O of the device is blocked, towards the upper layers (upper) or the backing disk (lower)";
    PATH_ESTABLISHED = "drbd_path_established", Gauge, ["name", "conn_name", "peer_node_id", "local", "peer"], upstream false, enums false,
        "Whether the network path to the peer is established";
}

/// Receives the families and samples of one rendering.
pub trait Sink {
    /// Starts a family; its header is written only if it gets a sample.
    fn family(&mut self, def: &'static FamilyDef);
    /// One sample of the current family: its labels, an optional trailing label, and the value.
    fn sample(&mut self, labels: &[&str], extra: Option<&str>, value: f64);
}

/// Versions reported by `drbdadm --version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrbdVersion {
    pub kmod: (u32, u32, u32),
    pub utils: (u32, u32, u32),
}

impl DrbdVersion {
    /// Reads `DRBD_KERNEL_VERSION_CODE=0x…` and `DRBDADM_VERSION_CODE=0x…` (major<<16 | minor<<8 | patch);
    /// a missing or unreadable code stays 0.0.0.
    pub fn parse(text: &str) -> DrbdVersion {
        let mut v = DrbdVersion::default();
        for line in text.lines() {
            let Some((k, val)) = line.trim().split_once('=') else {
                continue;
            };
            let Some(code) = parse_code(val.trim()) else {
                continue;
            };
            match k.trim() {
                "DRBD_KERNEL_VERSION_CODE" => v.kmod = code,
                "DRBDADM_VERSION_CODE" => v.utils = code,
                _ => {}
            }
        }
        v
    }
}

fn parse_code(s: &str) -> Option<(u32, u32, u32)> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let c = u32::from_str_radix(hex, 16).ok()?;
    Some((c >> 16, (c >> 8) & 0xff, c & 0xff))
}

fn dotted(v: (u32, u32, u32)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Names of the peer-device byte counters (`spec.prometheus.peerByteCounters`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PeerByteCounters {
    /// `drbd_peerdevice_sent_bytes` and `drbd_peerdevice_received_bytes`, as upstream drbd-reactor
    /// (counters without the `_total` suffix: `promtool check metrics` reports both).
    #[default]
    Upstream,
    /// `drbd_peerdevice_sent_bytes_total` and `drbd_peerdevice_received_bytes_total` (Prometheus naming
    /// conventions; dashboards written for upstream do not find them).
    Total,
    /// Both pairs, e.g. while dashboards move from the upstream names to the `_total` ones.
    Both,
}

impl PeerByteCounters {
    /// The default (`upstream`); left out of a serialized configuration, so that policies written before
    /// the option existed keep the same instance identity.
    pub fn is_default(&self) -> bool {
        *self == PeerByteCounters::Upstream
    }

    pub fn upstream(self) -> bool {
        matches!(self, PeerByteCounters::Upstream | PeerByteCounters::Both)
    }

    pub fn total(self) -> bool {
        matches!(self, PeerByteCounters::Total | PeerByteCounters::Both)
    }

    /// The names two settings ask for together.
    pub fn union(self, o: PeerByteCounters) -> PeerByteCounters {
        match (self.upstream() || o.upstream(), self.total() || o.total()) {
            (true, true) => PeerByteCounters::Both,
            (false, true) => PeerByteCounters::Total,
            _ => PeerByteCounters::Upstream,
        }
    }
}

/// How a rendering is done, besides the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Emit the one-hot state families.
    pub enums: bool,
    pub peer_byte_counters: PeerByteCounters,
}

/// What one rendering is built from.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Sorted by name.
    pub resources: Vec<Arc<Resource>>,
    pub enums: bool,
    pub version: DrbdVersion,
    pub peer_byte_counters: PeerByteCounters,
}

impl View {
    pub fn options(&self) -> Options {
        Options {
            enums: self.enums,
            peer_byte_counters: self.peer_byte_counters,
        }
    }
}

fn tri(t: Tri) -> Option<f64> {
    match t {
        Tri::Yes => Some(1.0),
        Tri::No => Some(0.0),
        Tri::Unknown => None,
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// `drbd_device_open`: 1 only for `open:yes`. Older drbd-utils (9.22 among them) print no `open:` field,
/// and kernels that cannot tell print `unknown`; both give 0, the value upstream drbd-reactor exports
/// when the field is absent (its parser's default), so that the series exists and sums over it keep
/// working.
fn open(t: Tri) -> f64 {
    flag(t == Tri::Yes)
}

const KIB: f64 = 1024.0;
const SECTOR: f64 = 512.0;

/// Emits every enum value with 1 for the current one and 0 for the others; a value this version does not
/// know gets a sample of its own (1) after the known ones.
fn one_hot<E: PartialEq>(
    sink: &mut dyn Sink,
    labels: &[&str],
    known: &[E],
    cur: &E,
    name: fn(&E) -> &str,
) {
    let mut seen = false;
    for k in known {
        let on = k == cur;
        seen |= on;
        sink.sample(labels, Some(name(k)), flag(on));
    }
    if !seen {
        sink.sample(labels, Some(name(cur)), 1.0);
    }
}

fn blocked_has(b: &Blocked, what: &str) -> bool {
    b.as_str().split(',').any(|x| x == what)
}

/// The three families that are not about one resource.
fn render_globals(resources: usize, version: DrbdVersion, sink: &mut dyn Sink) {
    sink.family(&UP);
    sink.sample(&[], None, 1.0);
    sink.family(&VERSION);
    sink.sample(&[&dotted(version.kmod), &dotted(version.utils)], None, 1.0);
    sink.family(&RESOURCES);
    sink.sample(&[], None, resources as f64);
}

/// Emits every family of `view` into `sink`: the global families, then each resource's
/// ([`render_resource`]). A sink that needs family-major order groups the samples by family.
pub fn render(view: &View, sink: &mut dyn Sink) {
    render_globals(view.resources.len(), view.version, sink);
    for r in &view.resources {
        render_resource(r, view.options(), sink);
    }
}

/// Emits the samples of one resource, family by family in [`FAMILIES`] order (each family at most once).
pub fn render_resource(r: &Resource, opts: Options, sink: &mut dyn Sink) {
    let enums = opts.enums;
    let name: &str = &r.name;
    let res_labels = [name];
    let tri_res = |sink: &mut dyn Sink, def: &'static FamilyDef, v: Option<f64>| {
        sink.family(def);
        if let Some(v) = v {
            sink.sample(&res_labels, None, v);
        }
    };
    if enums {
        sink.family(&RES_ROLE);
        one_hot(sink, &res_labels, Role::KNOWN, &r.role, Role::as_str);
    }
    tri_res(sink, &RES_SUSPENDED, Some(flag(r.suspended.any())));
    tri_res(sink, &RES_MAYPROMOTE, tri(r.may_promote));
    tri_res(
        sink,
        &RES_PROMOTIONSCORE,
        Some(f64::from(r.promotion_score)),
    );
    tri_res(sink, &RES_FORCEIOFAILURES, tri(r.force_io_failures));
    if enums {
        sink.family(&RES_WRITE_ORDERING);
        if let Some(w) = &r.write_ordering {
            one_hot(
                sink,
                &res_labels,
                WriteOrdering::KNOWN,
                w,
                WriteOrdering::as_str,
            );
        }
    }

    // Connections: labels name, conn_name, peer_node_id.
    let mut peers: Vec<String> = Vec::with_capacity(r.connections.len());
    for c in r.connections.values() {
        peers.push(c.peer_node_id.to_string());
    }
    let conns: Vec<(&Connection, [&str; 3])> = r
        .connections
        .values()
        .zip(&peers)
        .map(|(c, p)| (c, [name, c.conn_name.as_str(), p.as_str()]))
        .collect();
    let per_conn =
        |sink: &mut dyn Sink, def: &'static FamilyDef, f: &dyn Fn(&Connection) -> Option<f64>| {
            sink.family(def);
            for (c, labels) in &conns {
                if let Some(v) = f(c) {
                    sink.sample(labels, None, v);
                }
            }
        };
    if enums {
        sink.family(&CONN_STATE);
        for (c, labels) in &conns {
            one_hot(
                sink,
                labels,
                ConnState::KNOWN,
                &c.connection,
                ConnState::as_str,
            );
        }
    }
    per_conn(sink, &CONN_CONGESTED, &|c| tri(c.congested));
    per_conn(sink, &CONN_APINFLIGHT, &|c| {
        Some(c.ap_in_flight as f64 * SECTOR)
    });
    per_conn(sink, &CONN_RSINFLIGHT, &|c| {
        Some(c.rs_in_flight as f64 * SECTOR)
    });

    // Peer devices: connection labels plus volume.
    let mut pd_volumes: Vec<String> = Vec::new();
    for (c, _) in &conns {
        for p in c.peer_devices.values() {
            pd_volumes.push(p.volume.to_string());
        }
    }
    let mut pds: Vec<(&PeerDevice, [&str; 4])> = Vec::with_capacity(pd_volumes.len());
    let mut vols = pd_volumes.iter();
    for (c, l) in &conns {
        for p in c.peer_devices.values() {
            let v = vols.next().map_or("", String::as_str);
            pds.push((p, [l[0], l[1], l[2], v]));
        }
    }
    let per_pd =
        |sink: &mut dyn Sink, def: &'static FamilyDef, f: &dyn Fn(&PeerDevice) -> Option<f64>| {
            sink.family(def);
            for (p, labels) in &pds {
                if let Some(v) = f(p) {
                    sink.sample(labels, None, v);
                }
            }
        };
    per_pd(sink, &PD_OUTOFSYNC, &|p| Some(p.out_of_sync as f64 * KIB));
    let bytes = opts.peer_byte_counters;
    if bytes.upstream() {
        per_pd(sink, &PD_SENT, &|p| Some(p.sent as f64 * KIB));
    }
    if bytes.total() {
        per_pd(sink, &PD_SENT_TOTAL, &|p| Some(p.sent as f64 * KIB));
    }
    if bytes.upstream() {
        per_pd(sink, &PD_RECEIVED, &|p| Some(p.received as f64 * KIB));
    }
    if bytes.total() {
        per_pd(sink, &PD_RECEIVED_TOTAL, &|p| Some(p.received as f64 * KIB));
    }
    if enums {
        sink.family(&PD_REPLICATION);
        for (p, labels) in &pds {
            one_hot(
                sink,
                labels,
                ReplState::KNOWN,
                &p.replication,
                ReplState::as_str,
            );
        }
        sink.family(&PD_PEER_DISK);
        for (p, labels) in &pds {
            one_hot(
                sink,
                labels,
                DiskState::KNOWN,
                &p.peer_disk,
                DiskState::as_str,
            );
        }
    }
    per_pd(sink, &PD_RESYNC_DONE, &|p| {
        let s = p.sync.as_ref()?;
        s.done.is_finite().then(|| (s.done / 100.0).clamp(0.0, 1.0))
    });
    per_pd(sink, &PD_RESYNC_ETA, &|p| {
        let eta = p.sync.as_ref()?.eta?;
        (eta.is_finite() && eta >= 0.0).then_some(eta)
    });
    per_pd(sink, &PD_PENDING, &|p| Some(p.pending as f64));
    per_pd(sink, &PD_UNACKED, &|p| Some(p.unacked as f64));

    // Devices: labels name, volume, minor.
    let dev_strs: Vec<(String, String)> = r
        .devices
        .values()
        .map(|d| {
            (
                d.volume.to_string(),
                d.minor.map(|m| m.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    let devs: Vec<(&Device, [&str; 3])> = r
        .devices
        .values()
        .zip(&dev_strs)
        .map(|(d, (v, m))| (d, [name, v.as_str(), m.as_str()]))
        .collect();
    let per_dev =
        |sink: &mut dyn Sink, def: &'static FamilyDef, f: &dyn Fn(&Device) -> Option<f64>| {
            sink.family(def);
            for (d, labels) in &devs {
                if let Some(v) = f(d) {
                    sink.sample(labels, None, v);
                }
            }
        };
    if enums {
        sink.family(&DEV_STATE);
        for (d, labels) in &devs {
            one_hot(sink, labels, DiskState::KNOWN, &d.disk, DiskState::as_str);
        }
    }
    per_dev(sink, &DEV_CLIENT, &|d| tri(d.client));
    per_dev(sink, &DEV_UNINTENTIONALDISKLESS, &|d| {
        if d.disk != DiskState::Diskless {
            Some(0.0)
        } else {
            tri(d.client).map(|c| 1.0 - c)
        }
    });
    per_dev(sink, &DEV_QUORUM, &|d| tri(d.quorum));
    per_dev(sink, &DEV_OPEN, &|d| Some(open(d.open)));
    per_dev(sink, &DEV_SIZE, &|d| Some(d.size as f64 * KIB));
    per_dev(sink, &DEV_READ, &|d| Some(d.read as f64 * KIB));
    per_dev(sink, &DEV_WRITTEN, &|d| Some(d.written as f64 * KIB));
    per_dev(sink, &DEV_ALWRITES, &|d| Some(d.al_writes as f64));
    per_dev(sink, &DEV_BMWRITES, &|d| Some(d.bm_writes as f64));
    per_dev(sink, &DEV_UPPERPENDING, &|d| Some(d.upper_pending as f64));
    per_dev(sink, &DEV_LOWERPENDING, &|d| Some(d.lower_pending as f64));
    per_dev(sink, &DEV_ALSUSPENDED, &|d| tri(d.al_suspended));
    sink.family(&DEV_BLOCKED);
    for (d, labels) in &devs {
        for what in ["upper", "lower"] {
            sink.sample(labels, Some(what), flag(blocked_has(&d.blocked, what)));
        }
    }

    // Paths.
    sink.family(&PATH_ESTABLISHED);
    for (c, l) in &conns {
        for p in &c.paths {
            if let Some(v) = tri(p.established) {
                sink.sample(&[l[0], l[1], l[2], &p.local, &p.peer], None, v);
            }
        }
    }
}

fn push_escaped(out: &mut String, s: &str, quote: bool) {
    if !s
        .bytes()
        .any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"'))
    {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Formats a value exactly like the `prometheus` crate's text encoder (Rust's `f64` display), with fast
/// paths for integers.
pub fn push_value(out: &mut String, v: f64) {
    if v == 0.0 && v.is_sign_positive() {
        out.push('0');
    } else if v == 1.0 {
        out.push('1');
    } else if v.fract() == 0.0 && v.abs() < 9.0e15 {
        out.push_str(itoa::Buffer::new().format(v as i64));
    } else {
        let _ = write!(out, "{v}");
    }
}

/// `{name="value",...` of a label set, without the closing brace; nothing without labels.
fn push_labels(out: &mut String, names: &[&str], values: &[&str]) {
    let mut sep = '{';
    for (n, v) in names.iter().zip(values) {
        out.push(sep);
        out.push_str(n);
        out.push_str("=\"");
        push_escaped(out, v, true);
        out.push('"');
        sep = ',';
    }
}

/// `# HELP` and `# TYPE` lines of a family.
pub fn push_header(out: &mut String, def: &FamilyDef) {
    out.push_str("# HELP ");
    out.push_str(def.name);
    out.push(' ');
    push_escaped(out, def.help, false);
    out.push_str("\n# TYPE ");
    out.push_str(def.name);
    out.push(' ');
    out.push_str(def.kind.as_str());
    out.push('\n');
}

/// The text of one resource's samples, per family, without family headers: what a scrape reuses
/// while the resource does not change.
#[derive(Debug, Clone)]
pub struct Fragment {
    text: String,
    /// End of each family's samples in `text`, by family index; a family starts where the one before
    /// ends.
    ends: [u32; FAMILY_COUNT],
    /// Per family: 0 when it has no samples, otherwise a stamp that changes whenever its text does (a
    /// fresh stamp for new text; the previous fragment's stamp when the text is the same).
    stamps: [u64; FAMILY_COUNT],
}

/// Source of fresh [`Fragment`] stamps (never 0).
static STAMPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Whether the one-hot family `def` has the same samples for both states of a resource: the same labels
/// (names, peers, volumes, minors) and the same current value. The one-hot families are most of the text
/// with `enums` and change rarely, while statistics change all the time.
fn same_one_hot(def: &FamilyDef, old: &Resource, new: &Resource) -> bool {
    fn same_conns(
        old: &Resource,
        new: &Resource,
        each: impl Fn(&Connection, &Connection) -> bool,
    ) -> bool {
        old.connections.len() == new.connections.len()
            && old
                .connections
                .iter()
                .zip(new.connections.iter())
                .all(|((ko, o), (kn, n))| ko == kn && o.conn_name == n.conn_name && each(o, n))
    }
    fn same_pds(
        o: &Connection,
        n: &Connection,
        each: impl Fn(&PeerDevice, &PeerDevice) -> bool,
    ) -> bool {
        o.peer_devices.len() == n.peer_devices.len()
            && o.peer_devices
                .iter()
                .zip(n.peer_devices.iter())
                .all(|((ko, po), (kn, pn))| ko == kn && each(po, pn))
    }
    if old.name != new.name {
        return false;
    }
    match def.index {
        i if i == RES_ROLE.index => old.role == new.role,
        i if i == RES_WRITE_ORDERING.index => old.write_ordering == new.write_ordering,
        i if i == CONN_STATE.index => same_conns(old, new, |o, n| o.connection == n.connection),
        i if i == PD_REPLICATION.index => same_conns(old, new, |o, n| {
            same_pds(o, n, |po, pn| po.replication == pn.replication)
        }),
        i if i == PD_PEER_DISK.index => same_conns(old, new, |o, n| {
            same_pds(o, n, |po, pn| po.peer_disk == pn.peer_disk)
        }),
        i if i == DEV_STATE.index => {
            old.devices.len() == new.devices.len()
                && old
                    .devices
                    .iter()
                    .zip(new.devices.iter())
                    .all(|((ko, o), (kn, n))| ko == kn && o.minor == n.minor && o.disk == n.disk)
        }
        _ => false,
    }
}

impl Fragment {
    /// Renders one resource's samples.
    pub fn of(r: &Resource, opts: Options) -> Fragment {
        Fragment::update(r, opts, None)
    }

    /// Renders one resource's samples; with `previous` (an earlier state of the resource and its
    /// fragment, rendered with the same options), copies the one-hot families whose samples are the same.
    pub fn update(
        r: &Resource,
        opts: Options,
        previous: Option<(&Resource, &Fragment)>,
    ) -> Fragment {
        let text = String::with_capacity(
            previous.map_or(if opts.enums { 32 * 1024 } else { 8 * 1024 }, |(_, f)| {
                f.len() + 256
            }),
        );
        let mut w = FragmentWriter::new(text, r, previous);
        render_resource(r, opts, &mut w);
        w.finish()
    }

    /// Identifies the text of family `i`: equal stamps, equal text; 0 for no samples. Stamps are unique
    /// in the process, so stamps of different resources never compare equal.
    pub fn stamp(&self, i: usize) -> u64 {
        self.stamps[i]
    }

    /// The samples of family `i`.
    pub fn family(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }

    /// Bytes of text.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

/// Identity of a label set: the addresses and lengths of its values. The samples of one object, in every
/// family, share the very same strings (alive while the resource renders), so their label text is
/// written once per resource and copied.
type LabelsId = ([(usize, usize); 5], usize);

fn labels_id(labels: &[&str]) -> Option<LabelsId> {
    if labels.len() > 5 {
        return None;
    }
    let mut id = [(0, 0); 5];
    for (slot, l) in id.iter_mut().zip(labels) {
        *slot = (l.as_ptr() as usize, l.len());
    }
    Some((id, labels.len()))
}

/// The [`Sink`] that renders a [`Fragment`].
struct FragmentWriter<'a> {
    frag: Fragment,
    /// Index of the family being written.
    next: usize,
    current: Option<&'static FamilyDef>,
    /// `{label="value",...` (without the closing brace) of each label set met in this resource, by label
    /// names and [`LabelsId`]: an object's labels are the same in every family it has samples in.
    labels: Vec<(&'static [&'static str], LabelsId, String)>,
    /// Index in `labels` of the last sample's label set.
    hit: usize,
    /// An earlier state of the resource and its fragment, to copy unchanged one-hot families from.
    previous: Option<(&'a Resource, &'a Fragment)>,
    resource: &'a Resource,
    /// The current family was copied from `previous`: its samples are not written.
    copied: bool,
}

impl<'a> FragmentWriter<'a> {
    /// A writer appending to `text`, for `resource` (and an earlier state of it with its fragment).
    fn new(
        text: String,
        resource: &'a Resource,
        previous: Option<(&'a Resource, &'a Fragment)>,
    ) -> FragmentWriter<'a> {
        FragmentWriter {
            frag: Fragment {
                text,
                ends: [0; FAMILY_COUNT],
                stamps: [0; FAMILY_COUNT],
            },
            next: 0,
            current: None,
            labels: Vec::new(),
            hit: 0,
            previous,
            resource,
            copied: false,
        }
    }

    /// Ends the families before `i`, and stamps the one being written.
    fn close_until(&mut self, i: usize) {
        let len = self.frag.text.len() as u32;
        while self.next < i {
            let f = self.next;
            let start = if f == 0 { 0 } else { self.frag.ends[f - 1] };
            self.frag.ends[f] = len;
            self.frag.stamps[f] = if start == len {
                0
            } else {
                match self.previous {
                    // Copied, or rendered to the same text (a statistics change left it alone).
                    Some((_, prev))
                        if self.copied && self.current.is_some_and(|d| d.index == f)
                            || prev.family(f) == &self.frag.text[start as usize..len as usize] =>
                    {
                        prev.stamps[f]
                    }
                    _ => STAMPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                }
            };
            self.next += 1;
        }
    }

    fn finish(mut self) -> Fragment {
        self.close_until(FAMILY_COUNT);
        self.frag
    }
}

impl Sink for FragmentWriter<'_> {
    fn family(&mut self, def: &'static FamilyDef) {
        debug_assert!(def.index >= self.next, "families out of order");
        self.close_until(def.index);
        self.current = Some(def);
        self.copied = false;
        if let Some((old, frag)) = self.previous {
            if def.enums_only && same_one_hot(def, old, self.resource) {
                self.frag.text.push_str(frag.family(def.index));
                self.copied = true;
            }
        }
    }

    fn sample(&mut self, labels: &[&str], extra: Option<&str>, value: f64) {
        if self.copied {
            return;
        }
        let Some(def) = self.current else { return };
        let written = def.labels.len().min(labels.len());
        let names = &def.labels[..written];
        let values = &labels[..written];
        let out = &mut self.frag.text;
        out.push_str(def.name);
        match labels_id(values) {
            Some(id) => {
                // Consecutive samples mostly share their labels (one-hot families); look there first.
                let same = |(n, i, _): &(&[&str], LabelsId, String)| *i == id && *n == names;
                let at = if self.labels.get(self.hit).is_some_and(same) {
                    self.hit
                } else if let Some(at) = self.labels.iter().position(same) {
                    at
                } else {
                    let mut body = String::with_capacity(64);
                    push_labels(&mut body, names, values);
                    self.labels.push((names, id, body));
                    self.labels.len() - 1
                };
                self.hit = at;
                out.push_str(&self.labels[at].2);
            }
            None => push_labels(out, names, values),
        }
        let mut any = written > 0;
        if let (Some(e), Some(n)) = (extra, def.labels.get(labels.len())) {
            out.push(if any { ',' } else { '{' });
            out.push_str(n);
            out.push_str("=\"");
            push_escaped(out, e, true);
            out.push('"');
            any = true;
        }
        if any {
            out.push('}');
        }
        out.push(' ');
        push_value(out, value);
        out.push('\n');
    }
}

/// A [`Sink`] writing the global families' text (headers included).
struct GlobalsWriter<'a> {
    out: &'a mut String,
    current: Option<&'static FamilyDef>,
}

impl Sink for GlobalsWriter<'_> {
    fn family(&mut self, def: &'static FamilyDef) {
        self.current = Some(def);
        push_header(self.out, def);
    }

    fn sample(&mut self, labels: &[&str], extra: Option<&str>, value: f64) {
        let Some(def) = self.current else { return };
        let none = Resource::default();
        let mut w = FragmentWriter::new(std::mem::take(self.out), &none, None);
        w.current = Some(def);
        w.sample(labels, extra, value);
        *self.out = w.frag.text;
    }
}

/// Bytes [`write_exposition`] will write for these fragments, headers included (an upper bound).
pub fn exposition_len<'a>(fragments: impl IntoIterator<Item = &'a Fragment>) -> usize {
    let headers: usize = FAMILIES
        .iter()
        .map(|f| f.help.len() + 2 * f.name.len() + 24)
        .sum();
    headers + fragments.into_iter().map(Fragment::len).sum::<usize>()
}

/// Appends the text of the three global families (headers included).
pub fn write_globals(out: &mut String, resources: usize, version: DrbdVersion) {
    render_globals(
        resources,
        version,
        &mut GlobalsWriter { out, current: None },
    );
}

/// Writes the text exposition: the global families, then per family its header (when any resource has
/// samples of it) and the samples of every fragment, in the given order (resources by name).
pub fn write_exposition(
    out: &mut String,
    resources: usize,
    version: DrbdVersion,
    fragments: &[&Fragment],
) {
    write_globals(out, resources, version);
    for def in FAMILIES.iter().skip(RESOURCES.index + 1) {
        let mut header = false;
        for f in fragments {
            let text = f.family(def.index);
            if text.is_empty() {
                continue;
            }
            if !header {
                push_header(out, def);
                header = true;
            }
            out.push_str(text);
        }
    }
}

/// Builds `prometheus` crate metric families.
pub struct ProtoSink {
    /// By family index.
    families: Vec<Option<proto::MetricFamily>>,
    current: Option<&'static FamilyDef>,
}

impl Default for ProtoSink {
    fn default() -> Self {
        ProtoSink {
            families: vec![None; FAMILY_COUNT],
            current: None,
        }
    }
}

impl ProtoSink {
    /// The families that got at least one sample, in [`FAMILIES`] order.
    pub fn finish(self) -> Vec<proto::MetricFamily> {
        self.families
            .into_iter()
            .flatten()
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }
}

impl Sink for ProtoSink {
    fn family(&mut self, def: &'static FamilyDef) {
        self.current = Some(def);
        self.families[def.index].get_or_insert_with(|| {
            let mut f = proto::MetricFamily::default();
            f.set_name(def.name.to_string());
            f.set_help(def.help.to_string());
            f.set_field_type(match def.kind {
                Kind::Gauge => proto::MetricType::GAUGE,
                Kind::Counter => proto::MetricType::COUNTER,
            });
            f
        });
    }

    fn sample(&mut self, labels: &[&str], extra: Option<&str>, value: f64) {
        let Some(def) = self.current else {
            return;
        };
        let Some(f) = self.families[def.index].as_mut() else {
            return;
        };
        let pairs = def
            .labels
            .iter()
            .zip(labels.iter().copied().chain(extra))
            .map(|(n, v)| {
                let mut lp = proto::LabelPair::default();
                lp.set_name(n.to_string());
                lp.set_value(v.to_string());
                lp
            })
            .collect();
        let mut m = proto::Metric::from_label(pairs);
        match def.kind {
            Kind::Gauge => {
                let mut g = proto::Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
            Kind::Counter => {
                let mut c = proto::Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
        }
        f.mut_metric().push(m);
    }
}

/// The text exposition of `view`.
pub fn to_text(view: &View) -> String {
    let frags: Vec<Fragment> = view
        .resources
        .iter()
        .map(|r| Fragment::of(r, view.options()))
        .collect();
    let refs: Vec<&Fragment> = frags.iter().collect();
    let mut out = String::with_capacity(exposition_len(refs.iter().copied()));
    write_exposition(&mut out, view.resources.len(), view.version, &refs);
    out
}

/// The metric families of `view`, as the `prometheus` crate models them.
pub fn to_families(view: &View) -> Vec<proto::MetricFamily> {
    let mut sink = ProtoSink::default();
    render(view, &mut sink);
    sink.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes() {
        let out = "DRBDADM_BUILDTAG=GIT-hash:\\ abc\nDRBDADM_API_VERSION=2\nDRBD_KERNEL_VERSION_CODE=0x09020c\nDRBD_KERNEL_VERSION=9.2.12\nDRBDADM_VERSION_CODE=0x091e00\nDRBDADM_VERSION=9.30.0\n";
        let v = DrbdVersion::parse(out);
        assert_eq!(v.kmod, (9, 2, 12));
        assert_eq!(v.utils, (9, 30, 0));
        assert_eq!(DrbdVersion::parse(""), DrbdVersion::default());
        let v = DrbdVersion::parse("DRBD_KERNEL_VERSION_CODE=0xzz\nDRBDADM_VERSION_CODE=0x091c01");
        assert_eq!(v.kmod, (0, 0, 0));
        assert_eq!(v.utils, (9, 28, 1));
    }

    #[test]
    fn family_names_are_unique_and_labels_valid() {
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
        for f in FAMILIES {
            assert!(f.name.starts_with("drbd"), "{}", f.name);
            if f.enums_only {
                assert_eq!(f.labels.last(), Some(&f.name), "state label of {}", f.name);
            }
        }
    }

    #[test]
    fn values_format_like_the_crate() {
        for v in [0.0, 1.0, 1024.0, 0.375, 12.5, 1e15, 123456789012.0] {
            let mut s = String::new();
            push_value(&mut s, v);
            assert_eq!(s, v.to_string());
        }
    }

    #[test]
    fn escaping() {
        let mut s = String::new();
        push_escaped(&mut s, "a\"b\\c\nd", true);
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }
}
