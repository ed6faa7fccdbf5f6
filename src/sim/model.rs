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
    /// net `ping-int` in seconds: how long a peer that crashed or a cut link goes unnoticed (DRBD's
    /// default is 10). 0, the simulator's default, notices at once.
    #[serde(default)]
    pub ping_int: u64,
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
            ping_int: 0,
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
            "ping-int" => {
                self.ping_int = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= 120)
                    .ok_or_else(|| SimError::Invalid(format!("option {key}: '{v}' is not 0..120 (seconds)")))?
            }
            "sync-rate-kib" => {
                self.sync_rate_kib = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| SimError::Invalid(format!("option {key}: '{v}' is not a positive number")))?
            }
            _ => return invalid(format!("unknown option '{key}' (known: quorum, on-no-quorum, on-no-data-accessible, on-suspended-primary-outdated, auto-promote, allow-two-primaries, fencing, rr-conflict, sync-rate-kib, ping-int)")),
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
    /// `Attaching` or `Detaching` while the kernel is in the middle of it (one state change).
    #[serde(default)]
    pub transit: Option<DiskState>,
}

impl Vol {
    pub fn client(&self) -> bool {
        self.client
    }

    /// The disk state the kernel reports.
    pub fn shown_disk(&self) -> DiskState {
        if let Some(t) = &self.transit {
            t.clone()
        } else if self.attached {
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
    /// What this node knows of the peer's disk while not connected to it: `Outdated` when the Primary
    /// outdated the peer through a third node (DRBD relays the state change); `None` is `DUnknown`.
    #[serde(default)]
    pub known_disk: Option<DiskState>,
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
    /// The link to this peer broke at this time (peer crashed, cable cut) and DRBD has not noticed
    /// yet: it does after `ping-int`.
    #[serde(default)]
    pub lost_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub node_id: u32,
    pub role: Role,
    pub fail_io: bool,
    pub auto_promoted: bool,
    /// Was Primary since the resource came up on this node: DRBD reports `write-ordering:none` until
    /// the first promotion (every real capture shows it), `flush` after.
    #[serde(default)]
    pub promoted_once: bool,
    /// The node crashed while Primary: its data comes back UpToDate on reboot (a Secondary's comes
    /// back Consistent).
    #[serde(default)]
    pub crashed_primary: bool,
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
        // Without a local disk, quorum comes only from peers: none connected, no quorum (DRBD
        // reports `quorum:no` for a device created before its peers and its disk). Without any peer
        // configured there is none either (a device whose connections `drbdadm down` deleted stays
        // `quorum:no`).
        let attached = me.vols.values().any(|v| v.attached && v.holds_data());
        if me.peers.is_empty()
            || (!attached && !me.peers.values().any(|p| p.cstate == ConnState::Connected))
        {
            return false;
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
    /// User-mode helpers called in the current step (`call helper`/`response helper` lines); only
    /// set while the step callback runs.
    #[serde(skip)]
    pub helpers: Vec<HelperCall>,
    /// A node whose device statistics the kernel pushes in the current step (after a write): DRBD
    /// sends a `change device` with fresh counters without a poll. Only set while the step runs.
    #[serde(skip)]
    pub stats_push: Option<(String, String)>,
}

/// A user-mode helper DRBD runs on `node` (and its exit status 0: the simulator has no handlers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperCall {
    pub node: String,
    pub res: String,
    pub peer: Option<String>,
    pub vol: Option<u32>,
    pub helper: &'static str,
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
    /// `drbdadm down RES` on one node: it leaves gracefully (the peers see `TearDown`).
    Down {
        node: String,
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

    /// Earliest time something is due: a running resync completes, or DRBD notices a lost peer.
    pub fn next_due_ms(&self) -> Option<u64> {
        let mut due: Option<u64> = None;
        let mut at = |t: u64| due = Some(due.map_or(t, |d| d.min(t)));
        for r in self.resources.values() {
            let ping = r.opts.ping_int.saturating_mul(1000);
            for (a, m) in &r.members {
                for (b, p) in &m.peers {
                    if let Some(t) = p.lost_at {
                        if self.node_up(a) {
                            at(t.saturating_add(ping));
                        }
                    }
                    if !self.link_ok(a, b) {
                        continue;
                    }
                    for pv in p.vols.values() {
                        if let Some(rs) = &pv.resync {
                            at(rs.due_ms());
                        }
                    }
                }
            }
        }
        due
    }

    /// Applies one operation at time `at`. On error the cluster may be partially changed: callers
    /// validate on a copy (the journal writer) or only replay operations that succeeded before.
    pub fn apply(&mut self, op: &Op, at: u64, step: &mut Step<'_>) -> Result<(), SimError> {
        self.now_ms = self.now_ms.max(at);
        self.complete_resyncs(step);
        self.detect_losses(None, step);
        match op {
            Op::Tick => Ok(()),
            Op::Create(spec) => self.create(spec, step),
            Op::Delete { res } => self.delete(res, step),
            Op::Down { node, res } => {
                self.member(node, res)?;
                if self.member(node, res)?.any_open() {
                    return Err(SimError::state(res, -12));
                }
                self.down_member(node, res, step)
            }
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
                if *kib > 0 {
                    // The writer's kernel pushes its device statistics (a `change device` line).
                    self.stats_push = Some((node.clone(), res.clone()));
                    step(self, res);
                    self.stats_push = None;
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
                    // A resync towards a peer that is gone (not noticed yet) stalls.
                    if !self.link_ok(a, b) {
                        continue;
                    }
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
            // Each resync that ends is its own state change (DRBD's resyncs to two peers never end in
            // the same one), followed by the target's `after-resync-target`.
            for (src, dst, v) in done {
                let r = self.resources.get_mut(&rn).expect("exists");
                finish_resync(r, &src, &dst, v);
                step(self, &rn);
                let call = HelperCall {
                    node: dst,
                    res: rn.clone(),
                    peer: Some(src),
                    vol: Some(v),
                    helper: "after-resync-target",
                };
                self.run_helpers(&rn, vec![call], step);
            }
        }
    }

    /// Runs user-mode helpers: one state change whose only output is their `call`/`response` lines.
    fn run_helpers(&mut self, res: &str, calls: Vec<HelperCall>, step: &mut Step<'_>) {
        let calls: Vec<HelperCall> = calls
            .into_iter()
            .filter(|c| self.node_up(&c.node))
            .collect();
        if calls.is_empty() {
            return;
        }
        self.helpers = calls;
        step(self, res);
        self.helpers.clear();
    }

    /// DRBD notices the links that broke `ping-int` ago (all of them involving `node` now, if given:
    /// a heal or a reboot makes the loss visible at once).
    fn detect_losses(&mut self, node: Option<&str>, step: &mut Step<'_>) {
        let now = self.now_ms;
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            let r = &self.resources[&rn];
            let ping = r.opts.ping_int.saturating_mul(1000);
            let mut sides = Vec::new();
            for (a, m) in &r.members {
                for (b, p) in &m.peers {
                    let Some(t) = p.lost_at else { continue };
                    let forced = node.is_some_and(|n| n == a || n == b);
                    if forced || t.saturating_add(ping) <= now {
                        sides.push((a.clone(), b.clone()));
                    }
                }
            }
            if sides.is_empty() {
                continue;
            }
            let r = self.resources.get_mut(&rn).expect("exists");
            for (a, b) in &sides {
                if let Some(p) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                    p.lost_at = None;
                }
            }
            let sides: Vec<(String, String)> =
                sides.into_iter().filter(|(a, _)| self.node_up(a)).collect();
            self.lose_sides(&rn, sides, step);
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
            if spec.connect {
                for (j, p) in spec.nodes.iter().enumerate() {
                    if j != i {
                        self.start_connecting(res, &n.name, &p.name, step);
                    }
                }
            }
        }
        if spec.connect {
            for (i, a) in spec.nodes.iter().enumerate() {
                for b in spec.nodes.iter().skip(i + 1) {
                    self.try_connect(res, &a.name, &b.name, step);
                }
            }
        }
        Ok(())
    }

    /// `drbdsetup connect`: the connection goes `Unconnected`, then `Connecting` (two state changes;
    /// a node that is down just keeps the wish). It connects once the peer is `Connecting` too.
    fn start_connecting(&mut self, res: &str, node: &str, peer: &str, step: &mut Step<'_>) {
        let up = self.node_up(node);
        let Some(p) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .and_then(|m| m.peers.get_mut(peer))
        else {
            return;
        };
        p.want = true;
        p.split_brain = false;
        if !up {
            p.cstate = ConnState::Connecting;
            return;
        }
        for st in [ConnState::Unconnected, ConnState::Connecting] {
            if let Some(p) = self
                .resources
                .get_mut(res)
                .and_then(|r| r.members.get_mut(node))
                .and_then(|m| m.peers.get_mut(peer))
            {
                p.cstate = st;
            }
            step(self, res);
        }
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

    /// `drbdadm down` on one node: demote, then per connection disconnect and delete it (paths first),
    /// then per volume detach and delete the minor, then the resource (the order DRBD reports).
    fn down_member(&mut self, node: &str, res: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        let m = self.member(node, res)?.clone();
        if m.role == Role::Primary {
            self.member_mut(node, res)?.role = Role::Secondary;
            step(self, res);
        }
        for peer in m.peers.keys() {
            self.disconnect(node, res, peer, step)?;
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
            // The crashed node's kernel state is gone (it comes back Secondary, see up_member); what
            // persists is the data on its disks. Its role stays what its peers last knew: until they
            // notice the loss (ping-int) they still see a Primary there.
            {
                let r = self.resources.get_mut(&rn).expect("exists");
                let m = r.members.get_mut(node).expect("member");
                m.crashed_primary = m.role == Role::Primary;
                m.fail_io = false;
                m.auto_promoted = false;
                for v in m.vols.values_mut() {
                    v.open = false;
                    v.transit = None;
                }
            }
            let peers: Vec<String> = self.resources[&rn].members[node]
                .peers
                .keys()
                .cloned()
                .collect();
            let sides: Vec<(String, String)> = peers
                .iter()
                .map(|p| (p.clone(), node.to_string()))
                .collect();
            self.break_links(&rn, sides, step);
            let r = self.resources.get_mut(&rn).expect("exists");
            for p in r.members.get_mut(node).expect("member").peers.values_mut() {
                p.lost_at = None;
                p.cstate = if p.want {
                    ConnState::Connecting
                } else {
                    ConnState::StandAlone
                };
                for path in &mut p.paths {
                    path.established = false;
                }
                for pv in p.vols.values_mut() {
                    pv.repl = ReplState::Off;
                    pv.known_disk = None;
                }
            }
        }
        Ok(())
    }

    /// The links behind these connection sides (`(a, b)`: `a`'s connection to `b`) just broke. DRBD
    /// notices at once with `ping-int 0`, else `ping-int` seconds later ([`Cluster::detect_losses`]).
    fn break_links(&mut self, res: &str, sides: Vec<(String, String)>, step: &mut Step<'_>) {
        let now = self.now_ms;
        let Some(r) = self.resources.get_mut(res) else {
            return;
        };
        let sides: Vec<(String, String)> = sides
            .into_iter()
            .filter(|(a, b)| r.connected(a, b))
            .collect();
        if r.opts.ping_int == 0 {
            self.lose_sides(res, sides, step);
            return;
        }
        for (a, b) in &sides {
            if let Some(p) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                p.lost_at.get_or_insert(now);
            }
        }
    }

    /// These connection sides lose their connection (crash, cut link): they go NetworkFailure →
    /// Unconnected → Connecting, one state change each, with DRBD's helpers (`quorum-lost` on a
    /// Primary that loses quorum, `disconnected`) and the outdating of a Secondary the Primary lost but
    /// still reaches through a third node.
    fn lose_sides(&mut self, res: &str, sides: Vec<(String, String)>, step: &mut Step<'_>) {
        let now = self.now_ms;
        let Some(r) = self.resources.get_mut(res) else {
            return;
        };
        let sides: Vec<(String, String)> = sides
            .into_iter()
            .filter(|(a, b)| {
                r.members
                    .get(a)
                    .and_then(|m| m.peers.get(b))
                    .is_some_and(|p| p.cstate == ConnState::Connected)
            })
            .collect();
        if sides.is_empty() {
            return;
        }
        for (a, b) in &sides {
            abort_resyncs(r, a, b, now);
        }
        let quorate = self.quorate_primaries(res);
        // NetworkFailure: replication stops, the peer's disk is unknown.
        self.set_sides(res, &sides, ConnState::NetworkFailure, true);
        step(self, res);
        self.quorum_lost_helpers(res, &quorate, step);
        let r = self.resources.get_mut(res).expect("exists");
        for (a, b) in &sides {
            if let Some(p) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                for path in &mut p.paths {
                    path.established = false;
                }
            }
        }
        step(self, res);
        let calls = sides
            .iter()
            .map(|(a, b)| HelperCall {
                node: a.clone(),
                res: res.to_string(),
                peer: Some(b.clone()),
                vol: None,
                helper: "disconnected",
            })
            .collect();
        self.run_helpers(res, calls, step);
        if self.outdate_through_relay(res, &sides) {
            step(self, res);
        }
        self.set_sides(res, &sides, ConnState::Unconnected, false);
        step(self, res);
        let r = self.resources.get_mut(res).expect("exists");
        for (a, b) in &sides {
            if let Some(c) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                c.cstate = if c.want {
                    ConnState::Connecting
                } else {
                    ConnState::StandAlone
                };
            }
        }
        step(self, res);
    }

    /// Sets the state of these connection sides; with `reset` their peer devices stop replicating and
    /// forget the peer's disk.
    fn set_sides(&mut self, res: &str, sides: &[(String, String)], st: ConnState, reset: bool) {
        let Some(r) = self.resources.get_mut(res) else {
            return;
        };
        for (a, b) in sides {
            if let Some(c) = r.members.get_mut(a).and_then(|m| m.peers.get_mut(b)) {
                c.cstate = st.clone();
                if reset {
                    for pv in c.vols.values_mut() {
                        pv.repl = ReplState::Off;
                        pv.known_disk = None;
                    }
                }
            }
        }
    }

    /// The Primaries of `res` (up) that have quorum now.
    fn quorate_primaries(&self, res: &str) -> Vec<String> {
        let Some(r) = self.resources.get(res) else {
            return Vec::new();
        };
        r.members
            .iter()
            .filter(|(n, m)| self.node_up(n) && m.role == Role::Primary && r.has_quorum(n))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `quorum-lost` on each of `before` (Primaries that had quorum) that lost it, per volume.
    fn quorum_lost_helpers(&mut self, res: &str, before: &[String], step: &mut Step<'_>) {
        let Some(r) = self.resources.get(res) else {
            return;
        };
        let mut calls = Vec::new();
        for n in before {
            if r.has_quorum(n) {
                continue;
            }
            let Some(m) = r.members.get(n) else { continue };
            for v in m.vols.keys() {
                calls.push(HelperCall {
                    node: n.clone(),
                    res: res.to_string(),
                    peer: None,
                    vol: Some(*v),
                    helper: "quorum-lost",
                });
            }
        }
        self.run_helpers(res, calls, step);
    }

    /// A Primary that lost its connection to a Secondary it still reaches through other nodes outdates
    /// it (DRBD relays the state change): the Secondary's UpToDate disks become Outdated, and the
    /// nodes that reach it only indirectly learn that. Returns whether anything changed.
    fn outdate_through_relay(&mut self, res: &str, sides: &[(String, String)]) -> bool {
        let Some(r) = self.resources.get(res) else {
            return false;
        };
        let mut victims: BTreeSet<String> = BTreeSet::new();
        for (a, b) in sides {
            for (p, s) in [(a, b), (b, a)] {
                let (Some(pm), Some(sm)) = (r.members.get(p), r.members.get(s)) else {
                    continue;
                };
                if self.node_up(p)
                    && self.node_up(s)
                    && pm.role == Role::Primary
                    && sm.role != Role::Primary
                    && r.component(p).contains(s)
                {
                    victims.insert(s.clone());
                }
            }
        }
        let mut changed = false;
        for s in victims {
            let r = self.resources.get_mut(res).expect("exists");
            let mut outdated = Vec::new();
            if let Some(sm) = r.members.get_mut(&s) {
                for (v, vol) in sm.vols.iter_mut() {
                    if vol.attached && vol.holds_data() && vol.disk == DiskState::UpToDate {
                        vol.disk = DiskState::Outdated;
                        outdated.push(*v);
                    }
                }
            }
            if outdated.is_empty() {
                continue;
            }
            changed = true;
            let reach = r.component(&s);
            for (z, zm) in r.members.iter_mut() {
                if *z == s || !reach.contains(z) {
                    continue;
                }
                if let Some(p) = zm.peers.get_mut(&s) {
                    if p.cstate != ConnState::Connected {
                        for v in &outdated {
                            if let Some(pv) = p.vols.get_mut(v) {
                                pv.known_disk = Some(DiskState::Outdated);
                            }
                        }
                    }
                }
            }
        }
        changed
    }

    fn node_up_op(&mut self, node: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        if !self.nodes.contains_key(node) {
            return invalid(format!("unknown node {node}"));
        }
        if self.node_up(node) {
            return invalid(format!("node {node} is up already"));
        }
        // The peers notice the crash now at the latest (the node's new connection attempts).
        self.detect_losses(Some(node), step);
        self.nodes.get_mut(node).expect("exists").up = true;
        let names: Vec<String> = self
            .resources
            .iter()
            .filter(|(_, r)| r.members.contains_key(node))
            .map(|(n, _)| n.clone())
            .collect();
        for rn in names {
            self.up_member(&rn, node, step);
        }
        Ok(())
    }

    /// `drbdadm up` of a configured member after a boot: the kernel objects come back one state change
    /// at a time (resource, minors, peers, paths, attach, connect) from what the configuration and
    /// the metadata on disk say. Data that was UpToDate on a Secondary comes back Consistent (only a
    /// peer can tell whether it is still current); a crashed Primary's stays UpToDate.
    fn up_member(&mut self, res: &str, node: &str, step: &mut Step<'_>) {
        let Some(old) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.remove(node))
        else {
            return;
        };
        self.add_member(res, node, old.node_id, old.address.clone());
        step(self, res);
        for (v, vol) in &old.vols {
            self.new_minor_inner(res, node, vol.minor, *v, vol.backing.clone(), vol.client);
            step(self, res);
        }
        for (p, peer) in &old.peers {
            self.new_peer_inner(res, node, p, peer.node_id);
            step(self, res);
        }
        for (p, peer) in &old.peers {
            for path in &peer.paths {
                self.new_path_inner(res, node, p, path.local.clone(), path.remote.clone());
                step(self, res);
            }
        }
        for (v, vol) in &old.vols {
            if !vol.attached || !vol.holds_data() {
                continue;
            }
            let disk = if vol.disk == DiskState::UpToDate && !old.crashed_primary {
                DiskState::Consistent
            } else {
                vol.disk.clone()
            };
            if let Some(nv) = self
                .resources
                .get_mut(res)
                .and_then(|r| r.members.get_mut(node))
                .and_then(|m| m.vols.get_mut(v))
            {
                nv.disk = disk;
                nv.read = vol.read;
                nv.written = vol.written;
                nv.al_writes = vol.al_writes;
                nv.bm_writes = vol.bm_writes;
            }
            self.attach_inner(res, node, *v, None, None, step);
        }
        for (p, peer) in &old.peers {
            if peer.want {
                self.start_connecting(res, node, p, step);
            }
        }
        for p in old.peers.keys() {
            self.try_connect(res, node, p, step);
        }
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
                let sides = vec![
                    (a.to_string(), b.to_string()),
                    (b.to_string(), a.to_string()),
                ];
                self.break_links(&rn, sides, step);
            }
        }
        Ok(())
    }

    fn heal_link(&mut self, a: &str, b: &str, step: &mut Step<'_>) -> Result<(), SimError> {
        if !self.cut.remove(&pair(a, b)) {
            return invalid(format!("link {a} - {b} is not cut"));
        }
        // A loss not noticed yet is noticed now (the connection is re-established from scratch).
        self.detect_pair(a, b, step);
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            self.try_connect(&rn, a, b, step);
        }
        Ok(())
    }

    /// Pending losses between `a` and `b` become visible now.
    fn detect_pair(&mut self, a: &str, b: &str, step: &mut Step<'_>) {
        let names: Vec<String> = self.resources.keys().cloned().collect();
        for rn in names {
            let r = self.resources.get_mut(&rn).expect("exists");
            let mut sides = Vec::new();
            for (x, y) in [(a, b), (b, a)] {
                if let Some(p) = r.members.get_mut(x).and_then(|m| m.peers.get_mut(y)) {
                    if p.lost_at.take().is_some() {
                        sides.push((x.to_string(), y.to_string()));
                    }
                }
            }
            self.lose_sides(&rn, sides, step);
        }
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
            let p = r
                .members
                .get_mut(x)
                .and_then(|m| m.peers.get_mut(y))
                .expect("peer");
            p.cstate = ConnState::Connected;
            // The peer devices' traffic counters are per connection.
            for pv in p.vols.values_mut() {
                pv.sent = 0;
                pv.received = 0;
            }
        }
        // Connected and the handshake's outcome are one state change (the caller of handshake_pair
        // steps).
        let r = self.resources.get_mut(res).expect("exists");
        let vols: Vec<u32> = r.members[a]
            .vols
            .keys()
            .filter(|v| r.members[b].vols.contains_key(v))
            .copied()
            .collect();
        self.handshake_pair(res, a, b, &vols, step);
    }

    /// The handshake of the connected pair `a`–`b` on `vols`: replication starts (an Outdated or
    /// Consistent replica with the same data as an UpToDate one becomes UpToDate), resyncs start, or
    /// the connection drops for a split brain. The first state change also carries whatever the
    /// caller changed before (a new `Connected`).
    fn handshake_pair(&mut self, res: &str, a: &str, b: &str, vols: &[u32], step: &mut Step<'_>) {
        let Some(r) = self.resources.get(res) else {
            return;
        };
        let decisions: Vec<(u32, Handshake)> =
            vols.iter().map(|v| (*v, decide(r, a, b, *v))).collect();
        if decisions.iter().any(|(_, d)| *d == Handshake::SplitBrain) {
            step(self, res);
            let r = self.resources.get_mut(res).expect("exists");
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
                    pv.known_disk = None;
                }
            }
            step(self, res);
            return;
        }
        let r = self.resources.get_mut(res).expect("exists");
        let mut resyncs = Vec::new();
        for (vol, d) in decisions {
            match d {
                Handshake::Same => {
                    for (x, y) in [(a, b), (b, a)] {
                        if let Some(pv) = r
                            .members
                            .get_mut(x)
                            .and_then(|m| m.peers.get_mut(y))
                            .and_then(|p| p.vols.get_mut(&vol))
                        {
                            pv.repl = ReplState::Established;
                            pv.known_disk = None;
                        }
                    }
                    let disk = |r: &Res, x: &str| {
                        r.members
                            .get(x)
                            .and_then(|m| m.vols.get(&vol))
                            .filter(|v| v.attached)
                            .map(|v| v.disk.clone())
                    };
                    let (da, db) = (disk(r, a), disk(r, b));
                    let up = Some(DiskState::UpToDate);
                    let cons = Some(DiskState::Consistent);
                    // Same data: an Outdated or Consistent replica learns it is current again; two
                    // Consistent ones (both crashed) agree they are.
                    let both_consistent = da == cons && db == cons;
                    for (x, other) in [(a, &db), (b, &da)] {
                        if *other == up || both_consistent {
                            if let Some(v) = r.members.get_mut(x).and_then(|m| m.vols.get_mut(&vol))
                            {
                                if v.attached
                                    && matches!(v.disk, DiskState::Outdated | DiskState::Consistent)
                                {
                                    v.disk = DiskState::UpToDate;
                                }
                            }
                        }
                    }
                }
                Handshake::Resync { src, dst, total } => resyncs.push((src, dst, vol, total)),
                Handshake::SplitBrain => {}
            }
        }
        self.start_resyncs(res, resyncs, step);
    }

    /// Resyncs start: both sides wait for the bitmap (`WFBitMapS`/`WFBitMapT`), a Consistent target
    /// learns it is Outdated, the `before-resync-source`/`before-resync-target` helpers run, then
    /// `SyncSource`/`SyncTarget` with the target Inconsistent. The first state change is always
    /// reported (it carries the caller's changes).
    fn start_resyncs(
        &mut self,
        res: &str,
        list: Vec<(String, String, u32, u64)>,
        step: &mut Step<'_>,
    ) {
        if list.is_empty() {
            step(self, res);
            return;
        }
        let now = self.now_ms;
        let Some(r) = self.resources.get_mut(res) else {
            return;
        };
        let rate = r.opts.sync_rate_kib;
        let set_repl = |r: &mut Res, x: &str, y: &str, vol: u32, st: ReplState| {
            if let Some(pv) = r
                .members
                .get_mut(x)
                .and_then(|m| m.peers.get_mut(y))
                .and_then(|p| p.vols.get_mut(&vol))
            {
                pv.repl = st;
                pv.known_disk = None;
            }
        };
        for (src, dst, vol, _) in &list {
            set_repl(r, src, dst, *vol, ReplState::WFBitMapS);
            set_repl(r, dst, src, *vol, ReplState::WFBitMapT);
        }
        step(self, res);
        let r = self.resources.get_mut(res).expect("exists");
        let mut outdated = false;
        for (_, dst, vol, _) in &list {
            if let Some(v) = r.members.get_mut(dst).and_then(|m| m.vols.get_mut(vol)) {
                if v.disk == DiskState::Consistent {
                    v.disk = DiskState::Outdated;
                    outdated = true;
                }
            }
        }
        if outdated {
            step(self, res);
        }
        let mut calls = Vec::new();
        for (src, dst, vol, _) in &list {
            calls.push(HelperCall {
                node: src.clone(),
                res: res.to_string(),
                peer: Some(dst.clone()),
                vol: Some(*vol),
                helper: "before-resync-source",
            });
            calls.push(HelperCall {
                node: dst.clone(),
                res: res.to_string(),
                peer: Some(src.clone()),
                vol: Some(*vol),
                helper: "before-resync-target",
            });
        }
        self.run_helpers(res, calls, step);
        let r = self.resources.get_mut(res).expect("exists");
        for (src, dst, vol, total) in &list {
            set_repl(r, src, dst, *vol, ReplState::SyncSource);
            set_repl(r, dst, src, *vol, ReplState::SyncTarget);
            if let Some(pv) = r
                .members
                .get_mut(src)
                .and_then(|m| m.peers.get_mut(dst))
                .and_then(|p| p.vols.get_mut(vol))
            {
                pv.resync = Some(Resync {
                    total_kib: *total,
                    start_ms: now,
                    rate_kib: rate,
                });
            }
            if let Some(v) = r.members.get_mut(dst).and_then(|m| m.vols.get_mut(vol)) {
                v.disk = DiskState::Inconsistent;
            }
        }
        step(self, res);
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
        // Detaching, then Diskless: two state changes (`backing_dev:none` in both).
        v.transit = Some(DiskState::Detaching);
        step(self, res);
        if let Some(v) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .and_then(|m| m.vols.get_mut(&vol))
        {
            v.transit = None;
            v.attached = false;
        }
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
        // Attaching: one state change before the disk is there (`backing_dev:none disk:Attaching`).
        if let Some(v) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .and_then(|m| m.vols.get_mut(&vol))
        {
            v.transit = Some(DiskState::Attaching);
        }
        step(self, res);
        let r = self.resources.get_mut(res).expect("exists");
        let size = r.size_kib;
        let others: Vec<String> = r.members.keys().filter(|n| *n != node).cloned().collect();
        {
            let v = r
                .members
                .get_mut(node)
                .and_then(|m| m.vols.get_mut(&vol))
                .expect("vol");
            v.transit = None;
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
        let peers: Vec<String> = r.members[node]
            .peers
            .keys()
            .filter(|p| r.connected(node, p) && r.members[*p].vols.contains_key(&vol))
            .cloned()
            .collect();
        for p in peers {
            self.handshake_pair(res, node, &p, &[vol], step);
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
        // A peer that is gone but not noticed yet (ping-int) does not get the data.
        let reachable: BTreeSet<String> = r
            .members
            .keys()
            .filter(|p| self.link_ok(node, p))
            .cloned()
            .collect();
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
                && r.connected(node, p)
                && reachable.contains(p);
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
        let mut forced = false;
        match self.promote_refusal(node, res)? {
            None => {}
            Some(-2) if force => {
                forced = true;
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
                                r.set_ahead(o, node, v, 0);
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
        m.promoted_once = true;
        step(self, res);
        if forced {
            // The connected peers learn that this data is the truth: full syncs start.
            let r = &self.resources[res];
            let vols: Vec<u32> = r.members[node].vols.keys().copied().collect();
            let peers: Vec<String> = r.members[node]
                .peers
                .keys()
                .filter(|p| r.connected(node, p))
                .cloned()
                .collect();
            for p in peers {
                self.handshake_pair(res, node, &p, &vols, step);
            }
        }
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
                promoted_once: false,
                crashed_primary: false,
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
                transit: None,
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
                lost_at: None,
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
        self.start_connecting(res, node, peer, step);
        self.try_connect(res, node, peer, step);
        Ok(())
    }

    /// `drbdsetup disconnect`: this side goes Disconnecting → StandAlone, a connected peer TearDown →
    /// Unconnected → Connecting, with the `disconnected` helper on both. A Secondary that leaves a
    /// Primary (or is left by one) this way is outdated.
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
        let quorate = self.quorate_primaries(res);
        let me = [(node.to_string(), peer.to_string())];
        let other = [(peer.to_string(), node.to_string())];
        for (x, _) in me.iter().chain(&other) {
            if let Some(p) = self
                .resources
                .get_mut(res)
                .and_then(|r| r.members.get_mut(x))
                .and_then(|m| m.peers.get_mut(if x == node { peer } else { node }))
            {
                p.lost_at = None;
            }
        }
        // A connection that was not established keeps what it knew of the peer's disk.
        self.set_sides(res, &me, ConnState::Disconnecting, was_connected);
        if was_connected {
            self.set_sides(res, &other, ConnState::TearDown, true);
            let r = self.resources.get_mut(res).expect("exists");
            let role = |n: &str| r.members.get(n).map(|m| m.role.clone());
            let (rn, rp) = (role(node), role(peer));
            let secondary = match (rn, rp) {
                (Some(Role::Primary), Some(Role::Secondary)) => Some(peer),
                (Some(Role::Secondary), Some(Role::Primary)) => Some(node),
                _ => None,
            };
            let mut outdated = Vec::new();
            if let Some(sm) = secondary.and_then(|s| r.members.get_mut(s)) {
                for (vn, v) in sm.vols.iter_mut() {
                    if v.attached && v.holds_data() && v.disk == DiskState::UpToDate {
                        v.disk = DiskState::Outdated;
                        outdated.push(*vn);
                    }
                }
            }
            // Nodes that still reach the outdated Secondary through a third node learn it (DRBD
            // relays the state change); the others see DUnknown.
            if let Some(s) = secondary {
                let reach = r.component(s);
                for (z, zm) in r.members.iter_mut() {
                    if z == s || !reach.contains(z) {
                        continue;
                    }
                    if let Some(p) = zm.peers.get_mut(s) {
                        if p.cstate != ConnState::Connected {
                            for v in &outdated {
                                if let Some(pv) = p.vols.get_mut(v) {
                                    pv.known_disk = Some(DiskState::Outdated);
                                }
                            }
                        }
                    }
                }
            }
        }
        step(self, res);
        self.quorum_lost_helpers(res, &quorate, step);
        if was_connected {
            let r = self.resources.get_mut(res).expect("exists");
            for (x, y) in [(node, peer), (peer, node)] {
                if let Some(p) = r.members.get_mut(x).and_then(|m| m.peers.get_mut(y)) {
                    for path in &mut p.paths {
                        path.established = false;
                    }
                }
            }
            step(self, res);
        }
        let mut calls = vec![HelperCall {
            node: node.to_string(),
            res: res.to_string(),
            peer: Some(peer.to_string()),
            vol: None,
            helper: "disconnected",
        }];
        if was_connected {
            calls.push(HelperCall {
                node: peer.to_string(),
                res: res.to_string(),
                peer: Some(node.to_string()),
                vol: None,
                helper: "disconnected",
            });
        }
        self.run_helpers(res, calls, step);
        self.set_sides(res, &me, ConnState::StandAlone, false);
        if let Some(p) = self
            .resources
            .get_mut(res)
            .and_then(|r| r.members.get_mut(node))
            .and_then(|m| m.peers.get_mut(peer))
        {
            p.want = false;
            for path in &mut p.paths {
                path.established = false;
            }
        }
        if was_connected {
            self.set_sides(res, &other, ConnState::Unconnected, false);
        }
        step(self, res);
        if was_connected {
            let want = self.resources[res]
                .members
                .get(peer)
                .and_then(|m| m.peers.get(node))
                .is_some_and(|p| p.want);
            let st = if want {
                ConnState::Connecting
            } else {
                ConnState::StandAlone
            };
            self.set_sides(res, &other, st, false);
            step(self, res);
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
        if p.cstate != ConnState::StandAlone {
            self.disconnect(node, res, peer, step)?;
        }
        // The connection goes with its peer devices: DRBD reports only `destroy connection` (and
        // `destroy path` before it, see del_path).
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
        known_disk: None,
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

/// What the handshake of `a` and `b` on `vol` decides (DRBD compares UUIDs; the simulator its bitmaps).
#[derive(Debug, Clone, PartialEq)]
enum Handshake {
    /// Same data (or a side without a disk): replication starts, no resync.
    Same,
    /// Both sides have data the other lacks.
    SplitBrain,
    Resync {
        src: String,
        dst: String,
        total: u64,
    },
}

fn decide(r: &Res, a: &str, b: &str, vol: u32) -> Handshake {
    let (Some(da), Some(db)) = (
        r.members.get(a).and_then(|m| m.vols.get(&vol)),
        r.members.get(b).and_then(|m| m.vols.get(&vol)),
    ) else {
        return Handshake::Same;
    };
    let both_data = da.attached && db.attached && da.holds_data() && db.holds_data();
    if !both_data {
        return Handshake::Same;
    }
    let (mut ha, mut hb) = (r.ahead(a, b, vol), r.ahead(b, a, vol));
    // Inconsistent data without a bitmap (fresh metadata) meets real data: full sync.
    if ha == 0 && hb == 0 {
        let inc = |d: &Vol| d.disk == DiskState::Inconsistent;
        if inc(da) && !inc(db) {
            hb = r.size_kib;
        } else if inc(db) && !inc(da) {
            ha = r.size_kib;
        }
    }
    if ha > 0 && hb > 0 {
        return Handshake::SplitBrain;
    }
    if ha == 0 && hb == 0 {
        return Handshake::Same;
    }
    let (src, dst, total, sd) = if ha > 0 {
        (a, b, ha, da)
    } else {
        (b, a, hb, db)
    };
    // Inconsistent data is no resync source (fresh metadata on every node waits for
    // `primary --force`).
    if sd.disk == DiskState::Inconsistent {
        return Handshake::Same;
    }
    Handshake::Resync {
        src: src.to_string(),
        dst: dst.to_string(),
        total,
    }
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
    let mut total = 0;
    if let Some(pv) = r
        .members
        .get_mut(src)
        .and_then(|m| m.peers.get_mut(dst))
        .and_then(|p| p.vols.get_mut(&vol))
    {
        pv.repl = ReplState::Established;
        total = pv.resync.take().map_or(0, |rs| rs.total_kib);
        // Resync traffic counts in the statistics: read and sent on the source, received and
        // written on the target.
        pv.sent += total;
    }
    if let Some(v) = r.members.get_mut(src).and_then(|m| m.vols.get_mut(&vol)) {
        v.read += total;
    }
    if let Some(pv) = r
        .members
        .get_mut(dst)
        .and_then(|m| m.peers.get_mut(src))
        .and_then(|p| p.vols.get_mut(&vol))
    {
        pv.repl = ReplState::Established;
        pv.received += total;
    }
    if let Some(v) = r.members.get_mut(dst).and_then(|m| m.vols.get_mut(&vol)) {
        v.written += total;
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
