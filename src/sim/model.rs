//! The simulated cluster: a pure, deterministic state machine.
//!
//! [`Cluster::apply`] takes one [`Op`] (a journal entry) and mutates the cluster. Every kernel-level
//! state change inside an operation is a *step*: after each one the caller's `step` callback is invoked
//! with the name of the resource that changed, so an events2 printer can diff its node's view after every
//! step and never lose an intermediate state (DRBD prints one netlink group per kernel state change).
//! No I/O happens here; time enters only as the `at` timestamp of the operation.

use crate::drbd::types::{ConnState, DiskState, ReplState, Role};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Volume size used when a resource is created without `--size-kib` (1 GiB).
pub const DEFAULT_SIZE_KIB: u64 = 1024 * 1024;
/// Resync speed when the resource does not set `sync-rate-kib` (100 MiB/s).
pub const DEFAULT_SYNC_RATE_KIB: u64 = 100 * 1024;

/// Errors of an operation. The drbdsetup front end maps them to drbdsetup's messages and exit codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// Bad input: unknown node, malformed option, impossible request.
    #[error("{0}")]
    Invalid(String),
    /// drbdsetup "Failure" (error code > 100), e.g. `(158) Unknown resource`; exit code 10.
    #[error("{res}: Failure: ({code}) {msg}")]
    Failure { res: String, code: i32, msg: String },
    /// A refused state change (`SS_*` code < 0).
    #[error("{res}: State change failed: ({code}) {msg}")]
    StateChange { res: String, code: i32, msg: String },
    /// The node is down: no DRBD kernel to talk to.
    #[error("Could not connect to 'drbd' generic netlink family")]
    NodeDown(String),
    /// An I/O request (write/open) failed the way the block layer would report it.
    #[error("{0}")]
    Io(String),
}

impl SimError {
    /// drbdsetup's exit code for this error (`check_error()` in drbdsetup.c).
    pub fn exit_code(&self) -> i32 {
        match self {
            SimError::Invalid(_) => 20,
            SimError::Failure { .. } => 10,
            SimError::StateChange { code, .. } => match code {
                -2 => 17, // SS_NO_UP_TO_DATE_DISK
                -16 => 5, // SS_LOWER_THAN_OUTDATED
                -4 => 16, // SS_NO_LOCAL_DISK
                _ => 11,
            },
            SimError::NodeDown(_) => 20,
            SimError::Io(_) => 1,
        }
    }

    fn unknown_resource(res: &str) -> SimError {
        SimError::Failure {
            res: res.to_string(),
            code: 158,
            msg: "Unknown resource".into(),
        }
    }

    fn state(res: &str, code: i32) -> SimError {
        let msg = match code {
            -1 => "Multiple primaries not allowed by config",
            -2 => "Need access to UpToDate data",
            -12 => "Device is held open by someone",
            -25 => "No quorum",
            _ => "State change failed",
        };
        SimError::StateChange {
            res: res.to_string(),
            code,
            msg: msg.into(),
        }
    }
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, SimError> {
    Err(SimError::Invalid(msg.into()))
}

/// Checks a resource or node name: DRBD names must be printable without spaces; we are stricter so a
/// name can never be mistaken for an option or break the events2 `key:value` format.
pub fn check_name(kind: &str, name: &str) -> Result<(), SimError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'));
    if ok && name != "all" {
        Ok(())
    } else {
        invalid(format!(
            "invalid {kind} name '{}': use letters, digits, '_', '-', '.', '+' (not starting with '-', not 'all')",
            name.escape_debug()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumOpt {
    #[default]
    Off,
    Majority,
    All,
    Count(u32),
}

impl QuorumOpt {
    pub fn parse(s: &str) -> Option<QuorumOpt> {
        Some(match s {
            "off" => QuorumOpt::Off,
            "majority" => QuorumOpt::Majority,
            "all" => QuorumOpt::All,
            n => QuorumOpt::Count(n.parse().ok().filter(|n| (1..=32).contains(n))?),
        })
    }

    pub fn as_string(&self) -> String {
        match self {
            QuorumOpt::Off => "off".into(),
            QuorumOpt::Majority => "majority".into(),
            QuorumOpt::All => "all".into(),
            QuorumOpt::Count(n) => n.to_string(),
        }
    }
}

/// Resource and connection options the simulator models (names and values as in drbd.conf).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResOpts {
    pub quorum: QuorumOpt,
    /// `io-error` or `suspend-io`.
    pub on_no_quorum: String,
    /// `io-error` or `suspend-io`.
    pub on_no_data_accessible: String,
    /// `disconnect` or `force-secondary`.
    pub on_suspended_primary_outdated: String,
    pub auto_promote: bool,
    pub allow_two_primaries: bool,
    /// net `fencing`: `dont-care`, `resource-only`, `resource-and-stonith`.
    pub fencing: String,
    /// net `rr-conflict`: `disconnect`, `retry-connect`, `violently`, `call-pri-lost`.
    pub rr_conflict: String,
    /// Resync speed in KiB/s.
    pub sync_rate_kib: u64,
}

impl Default for ResOpts {
    fn default() -> Self {
        ResOpts {
            quorum: QuorumOpt::Off,
            on_no_quorum: "suspend-io".into(),
            on_no_data_accessible: "io-error".into(),
            on_suspended_primary_outdated: "disconnect".into(),
            auto_promote: true,
            allow_two_primaries: false,
            fencing: "dont-care".into(),
            rr_conflict: "disconnect".into(),
            sync_rate_kib: DEFAULT_SYNC_RATE_KIB,
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, SimError> {
    match v {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => invalid(format!("option {key}: '{v}' is not yes/no")),
    }
}

fn one_of(key: &str, v: &str, allowed: &[&str]) -> Result<String, SimError> {
    if allowed.contains(&v) {
        Ok(v.to_string())
    } else {
        invalid(format!(
            "option {key}: '{v}' is not one of {}",
            allowed.join(", ")
        ))
    }
}

impl ResOpts {
    /// Sets one option by its drbd.conf name.
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), SimError> {
        match key {
            "quorum" => {
                self.quorum = QuorumOpt::parse(v).ok_or_else(|| {
                    SimError::Invalid(format!(
                        "option quorum: '{v}' is not off, majority, all or 1..32"
                    ))
                })?
            }
            "on-no-quorum" => self.on_no_quorum = one_of(key, v, &["io-error", "suspend-io"])?,
            "on-no-data-accessible" => {
                self.on_no_data_accessible = one_of(key, v, &["io-error", "suspend-io"])?
            }
            "on-suspended-primary-outdated" => {
                self.on_suspended_primary_outdated =
                    one_of(key, v, &["disconnect", "force-secondary"])?
            }
            "auto-promote" => self.auto_promote = parse_bool(key, v)?,
            "allow-two-primaries" => self.allow_two_primaries = parse_bool(key, v)?,
            "fencing" => {
                self.fencing = one_of(
                    key,
                    v,
                    &["dont-care", "resource-only", "resource-and-stonith"],
                )?
            }
            "rr-conflict" => {
                self.rr_conflict = one_of(
                    key,
                    v,
                    &["disconnect", "retry-connect", "violently", "call-pri-lost"],
                )?
            }
            "sync-rate-kib" => {
                self.sync_rate_kib = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| SimError::Invalid(format!("option {key}: '{v}' is not a positive number")))?
            }
            _ => return invalid(format!("unknown option '{key}' (known: quorum, on-no-quorum, on-no-data-accessible, on-suspended-primary-outdated, auto-promote, allow-two-primaries, fencing, rr-conflict, sync-rate-kib)")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub up: bool,
    /// IPv4 address used for paths.
    pub ip: String,
}

/// A resync from the peer-device that holds this record (SyncSource) to the peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resync {
    pub total_kib: u64,
    pub start_ms: u64,
    pub rate_kib: u64,
}

impl Resync {
    pub fn done_kib(&self, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.start_ms) as u128;
        ((elapsed * self.rate_kib as u128 / 1000).min(self.total_kib as u128)) as u64
    }

    pub fn remaining_kib(&self, now_ms: u64) -> u64 {
        self.total_kib - self.done_kib(now_ms)
    }

    pub fn due_ms(&self) -> u64 {
        let ms = (self.total_kib as u128 * 1000).div_ceil(self.rate_kib.max(1) as u128);
        self.start_ms
            .saturating_add(ms.min(u64::MAX as u128) as u64)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vol {
    pub minor: u32,
    /// Configured backing device; `None` for an intentionally diskless (client) volume.
    pub backing: Option<String>,
    /// Intentionally diskless (a DRBD client / quorum tiebreaker).
    #[serde(default)]
    pub client: bool,
    pub attached: bool,
    /// Disk state while attached; the state of the data on disk while detached or down.
    pub disk: DiskState,
    pub open: bool,
    pub read: u64,
    pub written: u64,
    pub al_writes: u64,
    pub bm_writes: u64,
}

impl Vol {
    pub fn client(&self) -> bool {
        self.client
    }

    /// The disk state the kernel reports.
    pub fn shown_disk(&self) -> DiskState {
        if self.attached {
            self.disk.clone()
        } else {
            DiskState::Diskless
        }
    }

    /// Holds replicated data (attached or not): writes it misses must be resynced later.
    pub fn holds_data(&self) -> bool {
        self.backing.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerVol {
    pub repl: ReplState,
    pub sent: u64,
    pub received: u64,
    /// Present on the SyncSource side while a resync runs.
    pub resync: Option<Resync>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathCfg {
    pub local: String,
    pub remote: String,
    pub established: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub node_id: u32,
    /// `connect` was issued (not StandAlone by configuration).
    pub want: bool,
    pub cstate: ConnState,
    pub split_brain: bool,
    pub paths: Vec<PathCfg>,
    pub vols: BTreeMap<u32, PeerVol>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub node_id: u32,
    pub role: Role,
    pub fail_io: bool,
    pub auto_promoted: bool,
    /// `ip:port` of this node for this resource.
    pub address: String,
    pub vols: BTreeMap<u32, Vol>,
    pub peers: BTreeMap<String, Peer>,
}

impl Member {
    /// A diskless tiebreaker/client: has volumes and all of them are intentionally diskless.
    pub fn is_diskless(&self) -> bool {
        !self.vols.is_empty() && self.vols.values().all(Vol::client)
    }

    pub fn any_open(&self) -> bool {
        self.vols.values().any(|v| v.open)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Res {
    pub name: String,
    pub opts: ResOpts,
    pub size_kib: u64,
    pub port: u32,
    pub members: BTreeMap<String, Member>,
    /// `ahead[a][b][vol]`: KiB of data `a` holds that `b` lacks (DRBD's per-peer bitmap, directed).
    pub ahead: BTreeMap<String, BTreeMap<String, BTreeMap<u32, u64>>>,
}

impl Res {
    pub fn ahead(&self, a: &str, b: &str, vol: u32) -> u64 {
        self.ahead
            .get(a)
            .and_then(|m| m.get(b))
            .and_then(|m| m.get(&vol))
            .copied()
            .unwrap_or(0)
    }

    fn set_ahead(&mut self, a: &str, b: &str, vol: u32, kib: u64) {
        let kib = kib.min(self.size_kib);
        if kib == 0 {
            if let Some(m) = self.ahead.get_mut(a) {
                if let Some(mm) = m.get_mut(b) {
                    mm.remove(&vol);
                    if mm.is_empty() {
                        m.remove(b);
                    }
                }
                if m.is_empty() {
                    self.ahead.remove(a);
                }
            }
        } else {
            self.ahead
                .entry(a.to_string())
                .or_default()
                .entry(b.to_string())
                .or_default()
                .insert(vol, kib);
        }
    }

    /// The remote side of `a`'s connection to `b`, if both are configured.
    pub fn connected(&self, a: &str, b: &str) -> bool {
        self.members
            .get(a)
            .and_then(|m| m.peers.get(b))
            .is_some_and(|p| p.cstate == ConnState::Connected)
    }

    /// Whether member `x` has DRBD quorum (GRAMMAR-independent; DRBD's rules simplified: voters are
    /// the members with a backing disk, diskless members break a tie).
    pub fn has_quorum(&self, x: &str) -> bool {
        let Some(me) = self.members.get(x) else {
            return false;
        };
        if self.opts.quorum == QuorumOpt::Off {
            return true;
        }
        let diskless_of = |name: &str| {
            self.members
                .get(name)
                .map(Member::is_diskless)
                .unwrap_or(false)
        };
        let mut voters = 0u32;
        let mut present = 0u32;
        let mut tiebreakers_present = 0u32;
        if me.is_diskless() {
            tiebreakers_present += 1;
        } else {
            voters += 1;
            present += 1;
        }
        for (pname, p) in &me.peers {
            let connected = p.cstate == ConnState::Connected;
            if diskless_of(pname) {
                if connected {
                    tiebreakers_present += 1;
                }
            } else {
                voters += 1;
                if connected {
                    present += 1;
                }
            }
        }
        if voters == 0 {
            return true;
        }
        match self.opts.quorum {
            QuorumOpt::Off => true,
            QuorumOpt::Majority => {
                present * 2 > voters || (present * 2 == voters && tiebreakers_present > 0)
            }
            QuorumOpt::All => present == voters,
            QuorumOpt::Count(n) => present >= n,
        }
    }

    /// Members reachable from `x` over Connected connections (DRBD relays two-phase commits).
    pub fn component(&self, x: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![x.to_string()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(m) = self.members.get(&n) {
                for (p, c) in &m.peers {
                    if c.cstate == ConnState::Connected && !seen.contains(p) {
                        todo.push(p.clone());
                    }
                }
            }
        }
        seen
    }

    /// I/O on `x` is suspended because it is Primary without quorum and `on-no-quorum suspend-io`.
    pub fn suspended_quorum(&self, x: &str) -> bool {
        self.members.get(x).is_some_and(|m| {
            m.role == Role::Primary && !self.has_quorum(x) && self.opts.on_no_quorum == "suspend-io"
        })
    }

    /// Volume `vol` on `x` can reach UpToDate data (local, or a connected peer's).
    pub fn data_accessible(&self, x: &str, vol: u32) -> bool {
        let Some(me) = self.members.get(x) else {
            return false;
        };
        if me
            .vols
            .get(&vol)
            .is_some_and(|v| v.attached && v.disk == DiskState::UpToDate)
        {
            return true;
        }
        me.peers.iter().any(|(pname, p)| {
            p.cstate == ConnState::Connected
                && p.vols.get(&vol).is_some_and(|pv| pv.repl != ReplState::Off)
                && self
                    .members
                    .get(pname)
                    .and_then(|m| m.vols.get(&vol))
                    .is_some_and(|v| v.attached && v.disk == DiskState::UpToDate)
        })
    }

    /// The SyncSource record of a resync between `a` and `b` on `vol`, in either direction.
    pub fn resync_between<'a>(
        &'a self,
        a: &'a str,
        b: &'a str,
        vol: u32,
    ) -> Option<(&'a str, &'a Resync)> {
        for (src, dst) in [(a, b), (b, a)] {
            if let Some(r) = self
                .members
                .get(src)
                .and_then(|m| m.peers.get(dst))
                .and_then(|p| p.vols.get(&vol))
                .and_then(|pv| pv.resync.as_ref())
            {
                return Some((if src == a { a } else { b }, r));
            }
        }
        None
    }
}

/// The whole simulated cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Cluster {
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Cut links, as (smaller, larger) node-name pairs.
    pub cut: BTreeSet<(String, String)>,
    pub resources: BTreeMap<String, Res>,
    /// Time of the last applied operation (ms since the cluster's epoch).
    pub now_ms: u64,
    pub next_port: u32,
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Operations

/// Initial data on a newly attached disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InitialDisk {
    /// All replicas start identical (like `new-current-uuid --clear-bitmap`).
    #[default]
    UpToDate,
    /// Fresh metadata: needs a full sync from an UpToDate peer.
    Inconsistent,
    Outdated,
}

impl InitialDisk {
    pub fn parse(s: &str) -> Option<InitialDisk> {
        Some(match s.to_ascii_lowercase().as_str() {
            "uptodate" | "up-to-date" => InitialDisk::UpToDate,
            "inconsistent" => InitialDisk::Inconsistent,
            "outdated" => InitialDisk::Outdated,
            _ => return None,
        })
    }

    fn state(self) -> DiskState {
        match self {
            InitialDisk::UpToDate => DiskState::UpToDate,
            InitialDisk::Inconsistent => DiskState::Inconsistent,
            InitialDisk::Outdated => DiskState::Outdated,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub diskless: bool,
    #[serde(default)]
    pub disk: InitialDisk,
    /// `ip:port`; default `10.0.0.<n>:<resource port>`.
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CreateSpec {
    pub name: String,
    pub nodes: Vec<NodeSpec>,
    pub volumes: u32,
    pub size_kib: u64,
    /// First minor; default 1000 + 10 * resource number.
    pub minor: Option<u32>,
    /// Backing device on every disk node; default `/dev/drbdpool/<res>_<vol>`.
    pub backing_dev: Option<String>,
    pub options: BTreeMap<String, String>,
    /// Establish connections (default true).
    pub connect: bool,
}

/// One journal operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    Create(CreateSpec),
    Delete {
        res: String,
    },
    NodeDown {
        node: String,
    },
    NodeUp {
        node: String,
    },
    Cut {
        a: String,
        b: String,
    },
    Heal {
        a: String,
        b: String,
    },
    Detach {
        node: String,
        res: String,
        vol: Option<u32>,
    },
    Attach {
        node: String,
        res: String,
        vol: Option<u32>,
    },
    Write {
        node: String,
        res: String,
        vol: Option<u32>,
        kib: u64,
    },
    Open {
        node: String,
        res: String,
        vol: Option<u32>,
        rw: bool,
    },
    Close {
        node: String,
        res: String,
        vol: Option<u32>,
    },
    Primary {
        node: String,
        res: String,
        force: bool,
    },
    Secondary {
        node: String,
        res: String,
        force: bool,
    },
    SetOptions {
        res: String,
        options: BTreeMap<String, String>,
    },
    /// Time passes: resyncs due by now complete.
    Tick,
    // Kernel-level configuration, as `drbdsetup new-resource` & co. issue it on one node.
    NewResource {
        node: String,
        res: String,
        node_id: Option<u32>,
    },
    NewMinor {
        node: String,
        res: String,
        minor: u32,
        vol: u32,
    },
    NewPeer {
        node: String,
        res: String,
        peer: String,
        peer_node_id: Option<u32>,
    },
    NewPath {
        node: String,
        res: String,
        peer: String,
        local: String,
        remote: String,
    },
    AttachDisk {
        node: String,
        res: String,
        vol: u32,
        backing: String,
        disk: InitialDisk,
    },
    Connect {
        node: String,
        res: String,
        peer: String,
    },
    Disconnect {
        node: String,
        res: String,
        peer: String,
    },
    DelPath {
        node: String,
        res: String,
        peer: String,
    },
    DelPeer {
        node: String,
        res: String,
        peer: String,
    },
    DelMinor {
        node: String,
        res: String,
        vol: u32,
    },
    DelResource {
        node: String,
        res: String,
    },
}

/// Callback invoked after every kernel-level state change with the affected resource.
pub type Step<'a> = dyn FnMut(&Cluster, &str) + 'a;

impl Cluster {
    pub fn node_up(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.up)
    }

    fn ensure_node(&mut self, node: &str) -> Result<(), SimError> {
        check_name("node", node)?;
        if !self.nodes.contains_key(node) {
            let n = self.nodes.len() + 1;
            self.nodes.insert(
                node.to_string(),
                NodeInfo {
                    up: true,
                    ip: format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                },
            );
        }
        Ok(())
    }

    fn link_ok(&self, a: &str, b: &str) -> bool {
        self.node_up(a) && self.node_up(b) && !self.cut.contains(&pair(a, b))
    }

    fn res(&self, res: &str) -> Result<&Res, SimError> {
        self.resources
            .get(res)
            .ok_or_else(|| SimError::unknown_resource(res))
    }

    fn res_mut(&mut self, res: &str) -> Result<&mut Res, SimError> {
        self.resources
            .get_mut(res)
            .ok_or_else(|| SimError::unknown_resource(res))
    }

    /// The member on `node`, which must be up (drbdsetup on a down node cannot reach a kernel).
    pub fn member(&self, node: &str, res: &str) -> Result<&Member, SimError> {
        if !self.node_up(node) && self.nodes.contains_key(node) {
            return Err(SimError::NodeDown(node.into()));
        }
        self.resources
            .get(res)
            .and_then(|r| r.members.get(node))
            .ok_or_else(|| SimError::unknown_resource(res))
    }

    fn member_mut(&mut self, node: &str, res: &str) -> Result<&mut Member, SimError> {
        self.member(node, res)?;
        Ok(self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .expect("checked"))
    }

    /// Earliest time a running resync completes.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.resources
            .values()
            .flat_map(|r| r.members.values())
            .flat_map(|m| m.peers.values())
            .flat_map(|p| p.vols.values())
            .filter_map(|pv| pv.resync.as_ref().map(Resync::due_ms))
            .min()
    }

    /// Applies one operation at time `at`. On error the cluster may be partially changed: callers
    /// validate on a copy (the journal writer) or only replay operations that succeeded before.
    pub fn apply(&mut self, op: &Op, at: u64, step: &mut Step<'_>) -> Result<(), SimError> {
        self.now_ms = self.now_ms.max(at);
        self.complete_resyncs(step);
        match op {
            Op::Tick => Ok(()),
            Op::Create(spec) => self.create(spec, step),
            Op::Delete { res } => self.delete(res, step),
            Op::NodeDown { node } => self.node_down(node, step),
            Op::NodeUp { node } => self.node_up_op(node, step),
            Op::Cut { a, b } => self.cut_link(a, b, step),
            Op::Heal { a, b } => self.heal_link(a, b, step),
            Op::Detach { node, res, vol } => {
                for v in self.vols_of(node, res, *vol)? {
                    self.detach(node, res, v, step)?;
                }
                Ok(())
            }
            Op::Attach { node, res, vol } => {
                for v in self.vols_of(node, res, *vol)? {
                    self.attach(node, res, v, None, None, step)?;
                }
                Ok(())
            }
            Op::Write {
                node,
                res,
                vol,
                kib,
            } => {
                for v in self.vols_of(node, res, *vol)? {
                    self.write(node, res, v, *kib)?;
                }
                Ok(())
            }
            Op::Open { node, res, vol, rw } => self.open(node, res, *vol, *rw, step),
            Op::Close { node, res, vol } => self.close(node, res, *vol, step),
            Op::Primary { node, res, force } => self.primary(node, res, *force, false, step),
            Op::Secondary { node, res, force } => self.secondary(node, res, *force, step),
            Op::SetOptions { res, options } => {
                let r = self.res_mut(res)?;
                let mut opts = r.opts.clone();
                for (k, v) in options {
                    opts.set(k, v)?;
                }
                r.opts = opts;
                step(self, res);
                self.reconnect_all(res, step);
                Ok(())
            }
            Op::NewResource { node, res, node_id } => self.new_resource(node, res, *node_id, step),
            Op::NewMinor {
                node,
                res,
                minor,
                vol,
            } => self.new_minor(node, res, *minor, *vol, None, step),
            Op::NewPeer {
                node,
                res,
                peer,
                peer_node_id,
            } => self.new_peer(node, res, peer, *peer_node_id, step),
            Op::NewPath {
                node,
                res,
                peer,
                local,
                remote,
            } => self.new_path(node, res, peer, local, remote, step),
            Op::AttachDisk {
                node,
                res,
                vol,
                backing,
                disk,
            } => self.attach(node, res, *vol, Some(backing), Some(*disk), step),
            Op::Connect { node, res, peer } => self.connect(node, res, peer, step),
            Op::Disconnect { node, res, peer } => self.disconnect(node, res, peer, step),
            Op::DelPath { node, res, peer } => self.del_path(node, res, peer, step),
            Op::DelPeer { node, res, peer } => self.del_peer(node, res, peer, step),
            Op::DelMinor { node, res, vol } => self.del_minor(node, res, *vol, step),
            Op::DelResource { node, res } => self.del_resource(node, res, step),
        }
    }

    fn vols_of(&self, node: &str, res: &str, vol: Option<u32>) -> Result<Vec<u32>, SimError> {
        let m = self.member(node, res)?;
        match vol {
            Some(v) if m.vols.contains_key(&v) => Ok(vec![v]),
            Some(v) => invalid(format!("{res}: volume {v} does not exist on {node}")),
            None => Ok(m.vols.keys().copied().collect()),
        }
    }

    // --- resync -------------------------------------------------------------------------------

    fn complete_resyncs(&mut self, step: &mut Step<'_>) {
        let now = self.now_ms;
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            let mut done = Vec::new();
            let r = &self.resources[&rn];
            for (a, m) in &r.members {
                for (b, p) in &m.peers {
                    for (v, pv) in &p.vols {
                        if pv.resync.as_ref().is_some_and(|rs| rs.due_ms() <= now) {
                            done.push((a.clone(), b.clone(), *v));
                        }
                    }
                }
            }
            if done.is_empty() {
                continue;
            }
            let r = self.resources.get_mut(&rn).expect("exists");
            for (src, dst, v) in done {
                finish_resync(r, &src, &dst, v);
            }
            step(self, &rn);
        }
    }

    // --- high level ---------------------------------------------------------------------------

    fn create(&mut self, spec: &CreateSpec, step: &mut Step<'_>) -> Result<(), SimError> {
        check_name("resource", &spec.name)?;
        if self.resources.contains_key(&spec.name) {
            return invalid(format!("resource {} exists already", spec.name));
        }
        if spec.nodes.is_empty() {
            return invalid("a resource needs at least one node");
        }
        if spec.volumes > 64 {
            return invalid("at most 64 volumes");
        }
        if spec.size_kib == 0 {
            return invalid("size must be > 0");
        }
        let mut seen = BTreeSet::new();
        for n in &spec.nodes {
            check_name("node", &n.name)?;
            if !seen.insert(&n.name) {
                return invalid(format!("node {} listed twice", n.name));
            }
        }
        let mut opts = ResOpts::default();
        for (k, v) in &spec.options {
            opts.set(k, v)?;
        }
        let port = 7000 + self.next_port;
        let minor0 = spec
            .minor
            .unwrap_or(1000 + 10 * self.next_port.min(100_000));
        self.next_port += 1;
        for n in &spec.nodes {
            self.ensure_node(&n.name)?;
        }
        self.resources.insert(
            spec.name.clone(),
            Res {
                name: spec.name.clone(),
                opts,
                size_kib: spec.size_kib,
                port,
                members: BTreeMap::new(),
                ahead: BTreeMap::new(),
            },
        );
        let res = spec.name.as_str();
        let addr_of = |c: &Cluster, n: &NodeSpec| -> String {
            n.address
                .clone()
                .unwrap_or_else(|| format!("{}:{port}", c.nodes[&n.name].ip))
        };
        // Per node, the steps `drbdadm up` takes (down nodes only get the configuration).
        for (i, n) in spec.nodes.iter().enumerate() {
            let address = addr_of(self, n);
            check_address(&address)?;
            self.add_member(res, &n.name, i as u32, address.clone());
            step(self, res);
            for v in 0..spec.volumes {
                let backing = if n.diskless {
                    None
                } else {
                    Some(
                        spec.backing_dev
                            .clone()
                            .unwrap_or_else(|| format!("/dev/drbdpool/{res}_{v:05}")),
                    )
                };
                self.new_minor_inner(res, &n.name, minor0 + v, v, backing, n.diskless);
                step(self, res);
            }
            for (j, p) in spec.nodes.iter().enumerate() {
                if j == i {
                    continue;
                }
                self.new_peer_inner(res, &n.name, &p.name, j as u32);
                step(self, res);
            }
            for (j, p) in spec.nodes.iter().enumerate() {
                if j == i {
                    continue;
                }
                let local = format!("ipv4:{address}");
                let remote = format!("ipv4:{}", addr_of(self, p));
                self.new_path_inner(res, &n.name, &p.name, local, remote);
                step(self, res);
            }
            if !n.diskless {
                for v in 0..spec.volumes {
                    self.attach_inner(res, &n.name, v, None, Some(n.disk), step);
                }
            }
        }
        if spec.connect {
            for (i, a) in spec.nodes.iter().enumerate() {
                for b in spec.nodes.iter().skip(i + 1) {
                    for (x, y) in [(&a.name, &b.name), (&b.name, &a.name)] {
                        let r = self.resources.get_mut(res).expect("created");
                        r.members
                            .get_mut(x.as_str())
                            .and_then(|m| m.peers.get_mut(y.as_str()))
                            .expect("configured")
                            .want = true;
                    }
                    self.try_connect(res, &a.name, &b.name, step);
                    // Unreachable peers (down, cut): the connection keeps trying.
                    let r = self.resources.get_mut(res).expect("created");
                    let mut changed = false;
                    for (x, y) in [(&a.name, &b.name), (&b.name, &a.name)] {
                        let p = r
                            .members
                            .get_mut(x.as_str())
                            .and_then(|m| m.peers.get_mut(y.as_str()))
                            .expect("configured");
                        if p.cstate == ConnState::StandAlone && !p.split_brain {
                            p.cstate = ConnState::Connecting;
                            changed = true;
                        }
                    }
                    if changed {
                        step(self, res);
                    }
                }
            }
        }
        Ok(())
    }

    fn delete(&mut self, res: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        let r = self.res(res)?;
        if let Some((n, _)) = r
            .members
            .iter()
            .find(|(n, m)| self.node_up(n) && m.any_open())
        {
            return Err(SimError::state(&format!("{res} (on {n})"), -12));
        }
        let members: Vec<String> = r.members.keys().cloned().collect();
        for node in members {
            let up = self.node_up(&node);
            if up {
                self.down_member(&node, res, step)?;
            } else {
                self.resources
                    .get_mut(res)
                    .expect("exists")
                    .members
                    .remove(&node);
            }
        }
        self.resources.remove(res);
        Ok(())
    }

    /// `drbdadm down` on one node: demote, disconnect, detach, then delete every object.
    fn down_member(&mut self, node: &str, res: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        let m = self.member(node, res)?.clone();
        if m.role == Role::Primary {
            self.member_mut(node, res)?.role = Role::Secondary;
            step(self, res);
        }
        for peer in m.peers.keys() {
            self.disconnect(node, res, peer, step)?;
        }
        for v in m.vols.keys() {
            if m.vols[v].attached {
                self.detach(node, res, *v, step)?;
            }
        }
        for peer in m.peers.keys() {
            self.del_path(node, res, peer, step)?;
            self.del_peer(node, res, peer, step)?;
        }
        for v in m.vols.keys() {
            self.del_minor(node, res, *v, step)?;
        }
        self.del_resource(node, res, step)
    }

    fn node_down(&mut self, node: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        if !self.nodes.contains_key(node) {
            return invalid(format!("unknown node {node}"));
        }
        if !self.node_up(node) {
            return invalid(format!("node {node} is down already"));
        }
        self.nodes.get_mut(node).expect("exists").up = false;
        let names: Vec<String> = self
            .resources
            .iter()
            .filter(|(_, r)| r.members.contains_key(node))
            .map(|(n, _)| n.clone())
            .collect();
        for rn in names {
            // The crashed node's kernel state is gone; what persists is the data on its disks.
            {
                let r = self.resources.get_mut(&rn).expect("exists");
                let m = r.members.get_mut(node).expect("member");
                m.role = Role::Secondary;
                m.fail_io = false;
                m.auto_promoted = false;
                for v in m.vols.values_mut() {
                    v.open = false;
                }
            }
            let peers: Vec<String> = self.resources[&rn].members[node]
                .peers
                .keys()
                .cloned()
                .collect();
            self.lose_connections(&rn, node, &peers, true, step);
            let r = self.resources.get_mut(&rn).expect("exists");
            for p in r.members.get_mut(node).expect("member").peers.values_mut() {
                p.cstate = if p.want {
                    ConnState::Connecting
                } else {
                    ConnState::StandAlone
                };
            }
        }
        Ok(())
    }

    /// Connections between `node` and `peers` break (crash or cut link): the surviving sides go
    /// NetworkFailure → Unconnected → Connecting, one state change each. With `only_peers`, the
    /// side on `node` is not updated (it crashed).
    fn lose_connections(
        &mut self,
        res: &str,
        node: &str,
        peers: &[String],
        only_peers: bool,
        step: &mut Step<'_>,
    ) {
        let now = self.now_ms;
        let r = self.resources.get_mut(res).expect("exists");
        let mut sides: Vec<(String, String)> = Vec::new();
        for p in peers {
            let was = r.connected(node, p)
                || r.members
                    .get(p)
                    .and_then(|m| m.peers.get(node))
                    .is_some_and(|c| c.cstate == ConnState::Connected);
            if !was {
                continue;
            }
            abort_resyncs(r, node, p, now);
            sides.push((p.clone(), node.to_string()));
            if !only_peers {
                sides.push((node.to_string(), p.clone()));
            }
        }
        if sides.is_empty() {
            return;
        }
        for (i, st) in [
            ConnState::NetworkFailure,
            ConnState::Unconnected,
            ConnState::Connecting,
        ]
        .into_iter()
        .enumerate()
        {
            let r = self.resources.get_mut(res).expect("exists");
            for (a, b) in &sides {
                if let Some(c) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                    if !c.want && st == ConnState::Connecting {
                        c.cstate = ConnState::StandAlone;
                    } else {
                        c.cstate = st.clone();
                    }
                    if i == 0 {
                        for path in &mut c.paths {
                            path.established = false;
                        }
                        for pv in c.vols.values_mut() {
                            pv.repl = ReplState::Off;
                        }
                    }
                }
            }
            step(self, res);
        }
    }

    fn node_up_op(&mut self, node: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        if !self.nodes.contains_key(node) {
            return invalid(format!("unknown node {node}"));
        }
        if self.node_up(node) {
            return invalid(format!("node {node} is up already"));
        }
        self.nodes.get_mut(node).expect("exists").up = true;
        let names: Vec<String> = self
            .resources
            .iter()
            .filter(|(_, r)| r.members.contains_key(node))
            .map(|(n, _)| n.clone())
            .collect();
        for rn in names {
            step(self, &rn);
            let peers: Vec<String> = self.resources[&rn].members[node]
                .peers
                .keys()
                .cloned()
                .collect();
            for p in peers {
                self.try_connect(&rn, node, &p, step);
            }
        }
        Ok(())
    }

    fn cut_link(&mut self, a: &str, b: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        for n in [a, b] {
            if !self.nodes.contains_key(n) {
                return invalid(format!("unknown node {n}"));
            }
        }
        if a == b {
            return invalid("cannot cut a node from itself");
        }
        if !self.cut.insert(pair(a, b)) {
            return invalid(format!("link {a} - {b} is cut already"));
        }
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            let r = &self.resources[&rn];
            if r.members.contains_key(a) && r.members.contains_key(b) {
                self.lose_connections(&rn, a, &[b.to_string()], false, step);
            }
        }
        Ok(())
    }

    fn heal_link(&mut self, a: &str, b: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        if !self.cut.remove(&pair(a, b)) {
            return invalid(format!("link {a} - {b} is not cut"));
        }
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            self.try_connect(&rn, a, b, step);
        }
        Ok(())
    }

    /// Connection attempts of every pair in `res` (after an option or role change).
    fn reconnect_all(&mut self, res: &str, step: &mut Step<'_>) {
        let Some(r) = self.resources.get(res) else {
            return;
        };
        let names: Vec<String> = r.members.keys().cloned().collect();
        for (i, a) in names.iter().enumerate() {
            for b in names.iter().skip(i + 1) {
                self.try_connect(res, a, b, step);
            }
        }
    }

    /// Establishes the connection `a` – `b` if both want it and can reach each other: paths
    /// established, then Connected, then the per-volume handshake (each a state change).
    fn try_connect(&mut self, res: &str, a: &str, b: &str, step: &mut Step<'_>) {
        if !self.link_ok(a, b) {
            return;
        }
        let Some(r) = self.resources.get(res) else {
            return;
        };
        let (Some(ma), Some(mb)) = (r.members.get(a), r.members.get(b)) else {
            return;
        };
        let (Some(pa), Some(pb)) = (ma.peers.get(b), mb.peers.get(a)) else {
            return;
        };
        if !pa.want || !pb.want || pa.split_brain || pb.split_brain {
            return;
        }
        if pa.cstate == ConnState::Connected && pb.cstate == ConnState::Connected {
            return;
        }
        // Two Primaries may not end up connected; a Primary suspended for lack of quorum yields to
        // one with quorum if `on-suspended-primary-outdated force-secondary`.
        if !r.opts.allow_two_primaries {
            let mut union = r.component(a);
            union.extend(r.component(b));
            let prims: Vec<String> = union
                .iter()
                .filter(|n| r.members.get(*n).is_some_and(|m| m.role == Role::Primary))
                .cloned()
                .collect();
            if prims.len() > 1 {
                let force = r.opts.on_suspended_primary_outdated == "force-secondary";
                let any_quorate = prims.iter().any(|p| r.has_quorum(p));
                let victims: Vec<String> = prims
                    .iter()
                    .filter(|p| force && any_quorate && r.suspended_quorum(p))
                    .cloned()
                    .collect();
                if prims.len() - victims.len() > 1 || victims.is_empty() {
                    return;
                }
                for x in victims {
                    let m = self
                        .resources
                        .get_mut(res)
                        .and_then(|r| r.members.get_mut(&x))
                        .expect("member");
                    m.role = Role::Secondary;
                    m.auto_promoted = false;
                    if m.any_open() {
                        m.fail_io = true;
                    }
                    step(self, res);
                }
            }
        }
        let r = self.resources.get_mut(res).expect("exists");
        let mut any_path = false;
        for (x, y) in [(a, b), (b, a)] {
            let p = r
                .members
                .get_mut(x)
                .and_then(|m| m.peers.get_mut(y))
                .expect("peer");
            for path in &mut p.paths {
                any_path = true;
                path.established = true;
            }
        }
        if any_path {
            step(self, res);
        }
        let r = self.resources.get_mut(res).expect("exists");
        for (x, y) in [(a, b), (b, a)] {
            r.members
                .get_mut(x)
                .and_then(|m| m.peers.get_mut(y))
                .expect("peer")
                .cstate = ConnState::Connected;
        }
        step(self, res);
        let r = self.resources.get_mut(res).expect("exists");
        let vols: Vec<u32> = r.members[a]
            .vols
            .keys()
            .filter(|v| r.members[b].vols.contains_key(v))
            .copied()
            .collect();
        let now = self.now_ms;
        let mut changed = false;
        let mut split = false;
        for v in vols {
            changed |= handshake(r, a, b, v, now, &mut split);
        }
        if split {
            for (x, y) in [(a, b), (b, a)] {
                let p = r
                    .members
                    .get_mut(x)
                    .and_then(|m| m.peers.get_mut(y))
                    .expect("peer");
                p.split_brain = true;
                p.cstate = ConnState::StandAlone;
                p.want = false;
                for path in &mut p.paths {
                    path.established = false;
                }
                for pv in p.vols.values_mut() {
                    pv.repl = ReplState::Off;
                    pv.resync = None;
                }
            }
            changed = true;
        }
        if changed {
            step(self, res);
        }
    }

    fn detach(
        &mut self,
        node: &str,
        res: &str,
        vol: u32,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let v = m
            .vols
            .get(&vol)
            .ok_or_else(|| SimError::Invalid(format!("{res}: no volume {vol} on {node}")))?;
        if !v.attached {
            return Ok(());
        }
        let now = self.now_ms;
        let r = self.resources.get_mut(res).expect("exists");
        let peers: Vec<String> = r.members[node].peers.keys().cloned().collect();
        for p in &peers {
            abort_resync_vol(r, node, p, vol, now);
        }
        let m = r.members.get_mut(node).expect("member");
        let v = m.vols.get_mut(&vol).expect("vol");
        v.attached = false;
        step(self, res);
        Ok(())
    }

    fn attach(
        &mut self,
        node: &str,
        res: &str,
        vol: u32,
        backing: Option<&str>,
        initial: Option<InitialDisk>,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let v = m
            .vols
            .get(&vol)
            .ok_or_else(|| SimError::Invalid(format!("{res}: no volume {vol} on {node}")))?;
        if v.attached {
            return Ok(());
        }
        if v.client {
            return invalid(format!(
                "{res}: volume {vol} on {node} is intentionally diskless (a client)"
            ));
        }
        if v.backing.is_none() && backing.is_none() {
            return invalid(format!(
                "{res}: volume {vol} on {node} has no backing device; give one"
            ));
        }
        if let Some(b) = backing {
            if !b.starts_with('/') || b.contains(char::is_whitespace) {
                return invalid(format!("backing device '{b}' must be an absolute path"));
            }
        }
        self.attach_inner(res, node, vol, backing, initial, step);
        Ok(())
    }

    fn attach_inner(
        &mut self,
        res: &str,
        node: &str,
        vol: u32,
        backing: Option<&str>,
        initial: Option<InitialDisk>,
        step: &mut Step<'_>,
    ) {
        let r = self.resources.get_mut(res).expect("exists");
        let size = r.size_kib;
        let others: Vec<String> = r.members.keys().filter(|n| *n != node).cloned().collect();
        {
            let v = r
                .members
                .get_mut(node)
                .and_then(|m| m.vols.get_mut(&vol))
                .expect("vol");
            if let Some(b) = backing {
                v.backing = Some(b.to_string());
            }
            v.attached = true;
            if let Some(init) = initial {
                v.disk = init.state();
            }
        }
        if initial == Some(InitialDisk::Inconsistent) {
            // Fresh metadata: every replica with data holds blocks this one lacks.
            for o in &others {
                if r.members[o].vols.get(&vol).is_some_and(Vol::holds_data) {
                    r.set_ahead(o, node, vol, size);
                    r.set_ahead(node, o, vol, 0);
                }
            }
        }
        step(self, res);
        // Connected peers: compare data, start resyncs.
        let r = self.resources.get_mut(res).expect("exists");
        let now = self.now_ms;
        let peers: Vec<String> = r.members[node]
            .peers
            .keys()
            .filter(|p| r.connected(node, p) && r.members[*p].vols.contains_key(&vol))
            .cloned()
            .collect();
        let mut changed = false;
        let mut split = false;
        for p in peers {
            changed |= handshake(r, node, &p, vol, now, &mut split);
        }
        if changed {
            step(self, res);
        }
    }

    fn write(&mut self, node: &str, res: &str, vol: u32, kib: u64) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let r = self.res(res)?;
        if m.role != Role::Primary {
            return Err(SimError::Io(format!(
                "{node}: {res}/{vol}: write refused: not Primary (DRBD only writes on a Primary)"
            )));
        }
        if m.fail_io {
            return Err(SimError::Io(format!(
                "{node}: {res}/{vol}: I/O error (force-io-failures)"
            )));
        }
        if !r.has_quorum(node) {
            return Err(SimError::Io(if r.opts.on_no_quorum == "suspend-io" {
                format!("{node}: {res}/{vol}: I/O suspended (no quorum)")
            } else {
                format!("{node}: {res}/{vol}: I/O error (no quorum)")
            }));
        }
        if !r.data_accessible(node, vol) {
            return Err(SimError::Io(format!(
                "{node}: {res}/{vol}: I/O error (no access to UpToDate data)"
            )));
        }
        if kib == 0 {
            return Ok(());
        }
        let r = self.resources.get_mut(res).expect("exists");
        let size = r.size_kib;
        // Who gets the data: the writer (if it has a disk) and every connected peer with a disk.
        let mut got: BTreeSet<String> = BTreeSet::new();
        let holds = |m: &Member| {
            m.vols
                .get(&vol)
                .is_some_and(|v| v.attached && v.holds_data())
        };
        if holds(&r.members[node]) {
            got.insert(node.to_string());
        }
        let peers: Vec<String> = r.members[node].peers.keys().cloned().collect();
        for p in &peers {
            let replicating = r.members[node].peers[p]
                .vols
                .get(&vol)
                .is_some_and(|pv| pv.repl != ReplState::Off)
                && r.connected(node, p);
            if replicating && holds(&r.members[p]) {
                got.insert(p.clone());
            }
        }
        let all: Vec<String> = r.members.keys().cloned().collect();
        for a in &got {
            for b in &all {
                if !got.contains(b) && r.members[b].vols.get(&vol).is_some_and(Vol::holds_data) {
                    let cur = r.ahead(a, b, vol);
                    r.set_ahead(a, b, vol, cur.saturating_add(kib).min(size));
                }
            }
        }
        let me = r.members.get_mut(node).expect("member");
        if let Some(v) = me.vols.get_mut(&vol) {
            if got.contains(node) {
                v.written += kib;
                v.al_writes += 1;
            }
        }
        for p in &peers {
            if got.contains(p) || r.connected(node, p) {
                if let Some(pv) = r
                    .members
                    .get_mut(node)
                    .and_then(|m| m.peers.get_mut(p))
                    .and_then(|c| c.vols.get_mut(&vol))
                {
                    if pv.repl != ReplState::Off {
                        pv.sent += kib;
                    }
                }
            }
            if got.contains(p) {
                let pm = r.members.get_mut(p).expect("member");
                if let Some(v) = pm.vols.get_mut(&vol) {
                    v.written += kib;
                }
                if let Some(pv) = pm.peers.get_mut(node).and_then(|c| c.vols.get_mut(&vol)) {
                    pv.received += kib;
                }
            }
        }
        Ok(())
    }

    fn open(
        &mut self,
        node: &str,
        res: &str,
        vol: Option<u32>,
        rw: bool,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let vols = self.vols_of(node, res, vol)?;
        let m = self.member(node, res)?;
        if rw && m.role != Role::Primary {
            if !self.res(res)?.opts.auto_promote {
                return Err(SimError::Io(format!(
                    "{node}: open {res} read-write: Read-only file system (Secondary, auto-promote no)"
                )));
            }
            self.primary(node, res, false, true, step).map_err(|e| {
                SimError::Io(format!(
                    "{node}: open {res} read-write: Wrong medium type (auto-promote failed: {e})"
                ))
            })?;
        }
        let m = self.member_mut(node, res)?;
        let mut changed = false;
        for v in vols {
            let vv = m.vols.get_mut(&v).expect("vol");
            changed |= !vv.open;
            vv.open = true;
        }
        if changed {
            step(self, res);
        }
        Ok(())
    }

    fn close(
        &mut self,
        node: &str,
        res: &str,
        vol: Option<u32>,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let vols = self.vols_of(node, res, vol)?;
        let m = self.member_mut(node, res)?;
        let mut changed = false;
        for v in vols {
            let vv = m.vols.get_mut(&v).expect("vol");
            changed |= vv.open;
            vv.open = false;
        }
        if !m.any_open() {
            if m.fail_io {
                m.fail_io = false;
                changed = true;
            }
            if m.auto_promoted {
                m.auto_promoted = false;
                m.role = Role::Secondary;
                changed = true;
            }
        }
        if changed {
            step(self, res);
            self.reconnect_all(res, step);
        }
        Ok(())
    }

    /// Why `node` may not become Primary now, as DRBD's state-change code; `None` if it may.
    pub fn promote_refusal(&self, node: &str, res: &str) -> Result<Option<i32>, SimError> {
        let m = self.member(node, res)?;
        let r = self.res(res)?;
        if m.role == Role::Primary {
            return Ok(None);
        }
        if !r.opts.allow_two_primaries
            && r.component(node)
                .iter()
                .any(|p| p != node && r.members.get(p).is_some_and(|pm| pm.role == Role::Primary))
        {
            return Ok(Some(-1));
        }
        if !r.has_quorum(node) {
            return Ok(Some(-25));
        }
        if m.vols.keys().any(|v| !r.data_accessible(node, *v)) {
            return Ok(Some(-2));
        }
        Ok(None)
    }

    fn primary(
        &mut self,
        node: &str,
        res: &str,
        force: bool,
        auto: bool,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        if m.role == Role::Primary {
            return Ok(());
        }
        match self.promote_refusal(node, res)? {
            None => {}
            Some(-2) if force => {
                // `primary --force`: this node's data becomes the truth.
                let r = self.resources.get_mut(res).expect("exists");
                let size = r.size_kib;
                let others: Vec<String> =
                    r.members.keys().filter(|n| *n != node).cloned().collect();
                let vols: Vec<u32> = r.members[node].vols.keys().copied().collect();
                let mut any_disk = false;
                for v in vols {
                    let vv = r
                        .members
                        .get_mut(node)
                        .and_then(|m| m.vols.get_mut(&v))
                        .expect("vol");
                    if vv.attached && vv.holds_data() {
                        any_disk = true;
                        vv.disk = DiskState::UpToDate;
                        for o in &others {
                            if r.members[o].vols.get(&v).is_some_and(|x| x.holds_data()) {
                                r.set_ahead(node, o, v, size);
                            }
                        }
                    }
                }
                if !any_disk {
                    return Err(SimError::state(res, -2));
                }
            }
            Some(code) => return Err(SimError::state(res, code)),
        }
        let m = self.member_mut(node, res)?;
        m.role = Role::Primary;
        m.auto_promoted = auto;
        step(self, res);
        Ok(())
    }

    fn secondary(
        &mut self,
        node: &str,
        res: &str,
        force: bool,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        if m.role != Role::Primary {
            return Ok(());
        }
        if m.any_open() && !force {
            return Err(SimError::state(res, -12));
        }
        let m = self.member_mut(node, res)?;
        m.role = Role::Secondary;
        m.auto_promoted = false;
        if m.any_open() {
            m.fail_io = true;
        }
        step(self, res);
        self.reconnect_all(res, step);
        Ok(())
    }

    // --- kernel-level configuration -------------------------------------------------------------

    fn add_member(&mut self, res: &str, node: &str, node_id: u32, address: String) {
        let r = self.resources.get_mut(res).expect("exists");
        r.members.insert(
            node.to_string(),
            Member {
                node_id,
                role: Role::Secondary,
                fail_io: false,
                auto_promoted: false,
                address,
                vols: BTreeMap::new(),
                peers: BTreeMap::new(),
            },
        );
    }

    fn new_resource(
        &mut self,
        node: &str,
        res: &str,
        node_id: Option<u32>,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        check_name("resource", res)?;
        self.ensure_node(node)?;
        if !self.node_up(node) {
            return Err(SimError::NodeDown(node.into()));
        }
        if !self.resources.contains_key(res) {
            let port = 7000 + self.next_port;
            self.next_port += 1;
            self.resources.insert(
                res.to_string(),
                Res {
                    name: res.to_string(),
                    opts: ResOpts::default(),
                    size_kib: DEFAULT_SIZE_KIB,
                    port,
                    members: BTreeMap::new(),
                    ahead: BTreeMap::new(),
                },
            );
        }
        let r = &self.resources[res];
        if r.members.contains_key(node) {
            return Err(SimError::Failure {
                res: res.into(),
                code: 161,
                msg: "Already exists".into(),
            });
        }
        let id = node_id.unwrap_or_else(|| {
            (0..)
                .find(|i| r.members.values().all(|m| m.node_id != *i))
                .expect("free id")
        });
        if r.members.values().any(|m| m.node_id == id) {
            return invalid(format!("{res}: node-id {id} is used by another node"));
        }
        let address = format!("{}:{}", self.nodes[node].ip, r.port);
        self.add_member(res, node, id, address);
        step(self, res);
        Ok(())
    }

    fn new_minor_inner(
        &mut self,
        res: &str,
        node: &str,
        minor: u32,
        vol: u32,
        backing: Option<String>,
        client: bool,
    ) {
        let r = self.resources.get_mut(res).expect("exists");
        let m = r.members.get_mut(node).expect("member");
        m.vols.insert(
            vol,
            Vol {
                minor,
                backing,
                client,
                attached: false,
                disk: DiskState::Diskless,
                open: false,
                read: 0,
                written: 0,
                al_writes: 0,
                bm_writes: 0,
            },
        );
        for p in m.peers.values_mut() {
            p.vols.insert(vol, new_peer_vol());
        }
    }

    fn new_minor(
        &mut self,
        node: &str,
        res: &str,
        minor: u32,
        vol: u32,
        backing: Option<String>,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        if m.vols.contains_key(&vol) {
            return Err(SimError::Failure {
                res: res.into(),
                code: 163,
                msg: "Minor or volume exists already (delete it first)".into(),
            });
        }
        let used = self
            .resources
            .values()
            .filter_map(|r| r.members.get(node))
            .any(|m| m.vols.values().any(|v| v.minor == minor));
        if used {
            return Err(SimError::Failure {
                res: res.into(),
                code: 163,
                msg: "Minor or volume exists already (delete it first)".into(),
            });
        }
        self.new_minor_inner(res, node, minor, vol, backing, false);
        step(self, res);
        Ok(())
    }

    fn new_peer_inner(&mut self, res: &str, node: &str, peer: &str, peer_node_id: u32) {
        let r = self.resources.get_mut(res).expect("exists");
        let m = r.members.get_mut(node).expect("member");
        let vols = m.vols.keys().map(|v| (*v, new_peer_vol())).collect();
        m.peers.insert(
            peer.to_string(),
            Peer {
                node_id: peer_node_id,
                want: false,
                cstate: ConnState::StandAlone,
                split_brain: false,
                paths: Vec::new(),
                vols,
            },
        );
    }

    fn new_peer(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        peer_node_id: Option<u32>,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        check_name("node", peer)?;
        let m = self.member(node, res)?;
        if peer == node {
            return invalid("a node cannot be its own peer");
        }
        if m.peers.contains_key(peer) {
            return Err(SimError::Failure {
                res: res.into(),
                code: 161,
                msg: "Already exists".into(),
            });
        }
        let r = self.res(res)?;
        let id = match (peer_node_id, r.members.get(peer)) {
            (Some(id), _) => id,
            (None, Some(pm)) => pm.node_id,
            (None, None) => {
                return invalid(format!(
                    "{res}: peer {peer} has no node-id yet; give --peer-node-id"
                ))
            }
        };
        if id == m.node_id || m.peers.values().any(|p| p.node_id == id) {
            return Err(SimError::Failure {
                res: res.into(),
                code: 174,
                msg: "Invalid peer-node-id".into(),
            });
        }
        self.ensure_node(peer)?;
        self.new_peer_inner(res, node, peer, id);
        step(self, res);
        Ok(())
    }

    fn new_path_inner(&mut self, res: &str, node: &str, peer: &str, local: String, remote: String) {
        let r = self.resources.get_mut(res).expect("exists");
        let p = r
            .members
            .get_mut(node)
            .and_then(|m| m.peers.get_mut(peer))
            .expect("peer");
        p.paths.push(PathCfg {
            local,
            remote,
            established: false,
        });
    }

    fn new_path(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        local: &str,
        remote: &str,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(p) = m.peers.get(peer) else {
            return invalid(format!("{res}: no connection to {peer} on {node}"));
        };
        let local = normalize_addr(local)?;
        let remote = normalize_addr(remote)?;
        if p.paths
            .iter()
            .any(|x| x.local == local && x.remote == remote)
        {
            return Err(SimError::Failure {
                res: res.into(),
                code: 161,
                msg: "Already exists".into(),
            });
        }
        self.new_path_inner(res, node, peer, local, remote);
        step(self, res);
        Ok(())
    }

    fn connect(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(p) = m.peers.get(peer) else {
            return invalid(format!("{res}: no connection to {peer} on {node}"));
        };
        if p.want {
            return Ok(());
        }
        let r = self.resources.get_mut(res).expect("exists");
        let p = r
            .members
            .get_mut(node)
            .and_then(|m| m.peers.get_mut(peer))
            .expect("peer");
        p.want = true;
        p.split_brain = false;
        let reachable = self.link_ok(node, peer)
            && self.resources[res]
                .members
                .get(peer)
                .and_then(|m| m.peers.get(node))
                .is_some_and(|c| c.want && !c.split_brain);
        if !reachable {
            self.resources
                .get_mut(res)
                .and_then(|r| r.members.get_mut(node))
                .and_then(|m| m.peers.get_mut(peer))
                .expect("peer")
                .cstate = ConnState::Connecting;
            step(self, res);
            return Ok(());
        }
        self.try_connect(res, node, peer, step);
        Ok(())
    }

    fn disconnect(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(p) = m.peers.get(peer) else {
            return invalid(format!("{res}: no connection to {peer} on {node}"));
        };
        if !p.want && p.cstate == ConnState::StandAlone {
            return Ok(());
        }
        let was_connected = p.cstate == ConnState::Connected;
        let now = self.now_ms;
        let r = self.resources.get_mut(res).expect("exists");
        abort_resyncs(r, node, peer, now);
        let set = |c: &mut Cluster, who: &str, other: &str, st: ConnState, reset: bool| {
            if let Some(p) = c
                .resources
                .get_mut(res)
                .and_then(|r| r.members.get_mut(who))
                .and_then(|m| m.peers.get_mut(other))
            {
                p.cstate = st;
                if reset {
                    for path in &mut p.paths {
                        path.established = false;
                    }
                    for pv in p.vols.values_mut() {
                        pv.repl = ReplState::Off;
                    }
                }
            }
        };
        set(self, node, peer, ConnState::Disconnecting, false);
        if was_connected {
            set(self, peer, node, ConnState::TearDown, false);
        }
        step(self, res);
        set(self, node, peer, ConnState::StandAlone, true);
        if was_connected {
            set(self, peer, node, ConnState::Unconnected, true);
        }
        step(self, res);
        if was_connected {
            let want = self.resources[res]
                .members
                .get(peer)
                .and_then(|m| m.peers.get(node))
                .is_some_and(|p| p.want);
            set(
                self,
                peer,
                node,
                if want {
                    ConnState::Connecting
                } else {
                    ConnState::StandAlone
                },
                false,
            );
            step(self, res);
        }
        if let Some(p) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .and_then(|m| m.peers.get_mut(peer))
        {
            p.want = false;
        }
        Ok(())
    }

    fn del_path(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(p) = m.peers.get(peer) else {
            return invalid(format!("{res}: no connection to {peer} on {node}"));
        };
        if p.paths.is_empty() {
            return Ok(());
        }
        if p.cstate == ConnState::Connected {
            return Err(SimError::Failure {
                res: res.into(),
                code: 152,
                msg: "Need to be StandAlone".into(),
            });
        }
        self.member_mut(node, res)?
            .peers
            .get_mut(peer)
            .expect("peer")
            .paths
            .clear();
        step(self, res);
        Ok(())
    }

    fn del_peer(
        &mut self,
        node: &str,
        res: &str,
        peer: &str,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(p) = m.peers.get(peer) else {
            return invalid(format!("{res}: no connection to {peer} on {node}"));
        };
        if p.cstate == ConnState::Connected {
            self.disconnect(node, res, peer, step)?;
        }
        // Peer devices go first, then the connection (two state changes, as the kernel reports them).
        let m = self.member_mut(node, res)?;
        let p = m.peers.get_mut(peer).expect("peer");
        if !p.vols.is_empty() {
            p.vols.clear();
            step(self, res);
        }
        self.member_mut(node, res)?.peers.remove(peer);
        step(self, res);
        Ok(())
    }

    fn del_minor(
        &mut self,
        node: &str,
        res: &str,
        vol: u32,
        step: &mut Step<'_>,
    ) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        let Some(v) = m.vols.get(&vol) else {
            return Err(SimError::Failure {
                res: res.into(),
                code: 127,
                msg: "Device minor not allocated".into(),
            });
        };
        if v.open {
            return Err(SimError::state(res, -12));
        }
        if v.attached {
            self.detach(node, res, vol, step)?;
        }
        let m = self.member_mut(node, res)?;
        m.vols.remove(&vol);
        for p in m.peers.values_mut() {
            p.vols.remove(&vol);
        }
        step(self, res);
        Ok(())
    }

    fn del_resource(&mut self, node: &str, res: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        let m = self.member(node, res)?;
        if !m.vols.is_empty() || !m.peers.is_empty() {
            return Err(SimError::Failure {
                res: res.into(),
                code: 159,
                msg: "Resource still in use (delete all minors first)".into(),
            });
        }
        let r = self.resources.get_mut(res).expect("exists");
        r.members.remove(node);
        r.ahead.remove(node);
        for m in r.ahead.values_mut() {
            m.remove(node);
        }
        step(self, res);
        if self.resources[res].members.is_empty() {
            self.resources.remove(res);
        }
        Ok(())
    }
}

fn new_peer_vol() -> PeerVol {
    PeerVol {
        repl: ReplState::Off,
        sent: 0,
        received: 0,
        resync: None,
    }
}

fn check_address(addr: &str) -> Result<(), SimError> {
    let Some((ip, port)) = addr.rsplit_once(':') else {
        return invalid(format!("address '{addr}' must be ip:port"));
    };
    if ip.parse::<std::net::Ipv4Addr>().is_err() || port.parse::<u16>().is_err() {
        return invalid(format!("address '{addr}' must be an IPv4 ip:port"));
    }
    Ok(())
}

/// `ipv4:1.2.3.4:7789`, `1.2.3.4:7789` → `ipv4:1.2.3.4:7789`.
fn normalize_addr(a: &str) -> Result<String, SimError> {
    let bare = a.strip_prefix("ipv4:").unwrap_or(a);
    check_address(bare)?;
    Ok(format!("ipv4:{bare}"))
}

/// Compares the data of `a` and `b` on `vol` after they connected; returns whether anything changed.
fn handshake(r: &mut Res, a: &str, b: &str, vol: u32, now: u64, split: &mut bool) -> bool {
    let da = r.members[a].vols[&vol].clone();
    let db = r.members[b].vols[&vol].clone();
    let set_repl = |r: &mut Res, x: &str, y: &str, st: ReplState| {
        r.members
            .get_mut(x)
            .and_then(|m| m.peers.get_mut(y))
            .and_then(|p| p.vols.get_mut(&vol))
            .expect("peer vol")
            .repl = st;
    };
    let both_data = da.attached && db.attached && da.holds_data() && db.holds_data();
    if !both_data {
        set_repl(r, a, b, ReplState::Established);
        set_repl(r, b, a, ReplState::Established);
        return true;
    }
    let (mut ha, mut hb) = (r.ahead(a, b, vol), r.ahead(b, a, vol));
    // Inconsistent data without a bitmap (fresh metadata) meets real data: full sync.
    if ha == 0 && hb == 0 {
        let inc = |d: &Vol| d.disk == DiskState::Inconsistent;
        if inc(&da) && !inc(&db) {
            hb = r.size_kib;
        } else if inc(&db) && !inc(&da) {
            ha = r.size_kib;
        }
    }
    if ha > 0 && hb > 0 {
        *split = true;
        return true;
    }
    if ha == 0 && hb == 0 {
        set_repl(r, a, b, ReplState::Established);
        set_repl(r, b, a, ReplState::Established);
        // Same data: an Outdated replica learns it is current again.
        let up = |d: &DiskState| *d == DiskState::UpToDate;
        let fix = |r: &mut Res, x: &str| {
            let v = r
                .members
                .get_mut(x)
                .and_then(|m| m.vols.get_mut(&vol))
                .expect("vol");
            if v.disk == DiskState::Outdated || v.disk == DiskState::Consistent {
                v.disk = DiskState::UpToDate;
            }
        };
        if up(&da.disk) {
            fix(r, b);
        }
        if up(&db.disk) {
            fix(r, a);
        }
        return true;
    }
    let (src, dst, total) = if ha > 0 { (a, b, ha) } else { (b, a, hb) };
    let rate = r.opts.sync_rate_kib;
    set_repl(r, src, dst, ReplState::SyncSource);
    set_repl(r, dst, src, ReplState::SyncTarget);
    r.members
        .get_mut(src)
        .and_then(|m| m.peers.get_mut(dst))
        .and_then(|p| p.vols.get_mut(&vol))
        .expect("peer vol")
        .resync = Some(Resync {
        total_kib: total,
        start_ms: now,
        rate_kib: rate,
    });
    r.members
        .get_mut(dst)
        .and_then(|m| m.vols.get_mut(&vol))
        .expect("vol")
        .disk = DiskState::Inconsistent;
    true
}

/// A resync ran to completion: the target now holds the source's data.
fn finish_resync(r: &mut Res, src: &str, dst: &str, vol: u32) {
    let others: Vec<String> = r
        .members
        .keys()
        .filter(|n| *n != src && *n != dst)
        .cloned()
        .collect();
    for c in &others {
        let from_c = r.ahead(c, src, vol);
        let to_c = r.ahead(src, c, vol);
        r.set_ahead(c, dst, vol, from_c);
        r.set_ahead(dst, c, vol, to_c);
    }
    r.set_ahead(src, dst, vol, 0);
    r.set_ahead(dst, src, vol, 0);
    let src_disk = r.members[src].vols[&vol].disk.clone();
    if let Some(pv) = r
        .members
        .get_mut(src)
        .and_then(|m| m.peers.get_mut(dst))
        .and_then(|p| p.vols.get_mut(&vol))
    {
        pv.repl = ReplState::Established;
        pv.resync = None;
    }
    if let Some(pv) = r
        .members
        .get_mut(dst)
        .and_then(|m| m.peers.get_mut(src))
        .and_then(|p| p.vols.get_mut(&vol))
    {
        pv.repl = ReplState::Established;
    }
    if let Some(v) = r.members.get_mut(dst).and_then(|m| m.vols.get_mut(&vol)) {
        v.disk = if src_disk == DiskState::Inconsistent {
            DiskState::Inconsistent
        } else {
            src_disk
        };
    }
}

/// A resync between `a` and `b` on `vol` stops (connection lost, detach): what is left stays in the
/// bitmap; the target stays Inconsistent.
fn abort_resync_vol(r: &mut Res, a: &str, b: &str, vol: u32, now: u64) {
    for (src, dst) in [(a, b), (b, a)] {
        let taken = r
            .members
            .get_mut(src)
            .and_then(|m| m.peers.get_mut(dst))
            .and_then(|p| p.vols.get_mut(&vol))
            .and_then(|pv| {
                let rs = pv.resync.take();
                if rs.is_some() {
                    pv.repl = ReplState::Established;
                }
                rs
            });
        if let Some(rs) = taken {
            r.set_ahead(src, dst, vol, rs.remaining_kib(now));
            if let Some(pv) = r
                .members
                .get_mut(dst)
                .and_then(|m| m.peers.get_mut(src))
                .and_then(|p| p.vols.get_mut(&vol))
            {
                pv.repl = ReplState::Established;
            }
        }
    }
}

fn abort_resyncs(r: &mut Res, a: &str, b: &str, now: u64) {
    let vols: Vec<u32> = r
        .members
        .get(a)
        .map(|m| m.vols.keys().copied().collect())
        .unwrap_or_default();
    for v in vols {
        abort_resync_vol(r, a, b, v, now);
    }
}
