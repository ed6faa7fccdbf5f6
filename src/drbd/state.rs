//! The state of every DRBD resource as `events2` describes it: resources → devices and connections,
//! connections → peer devices and paths. Every field of the wire format is kept.
//!
//! Merging a parsed line into an object only overwrites the fields the line carries, so partial change
//! lines (without `--full`) and fields drbdsetup prints only when they change (`blocked`) are kept right.

use super::events2::*;
use super::types::*;
use super::vecmap::VecMap;
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Resource {
    pub name: String,
    pub role: Role,
    pub suspended: Suspended,
    pub force_io_failures: Tri,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_ordering: Option<WriteOrdering>,
    pub may_promote: Tri,
    pub promotion_score: u32,
    pub devices: VecMap<Device>,
    pub connections: VecMap<Connection>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Device {
    pub volume: u32,
    pub minor: Option<u32>,
    /// `None` for `backing_dev:none` (diskless) or when the kernel does not report it.
    pub backing_dev: Option<String>,
    pub disk: DiskState,
    pub client: Tri,
    pub open: Tri,
    pub quorum: Tri,
    /// KiB.
    pub size: u64,
    /// KiB.
    pub read: u64,
    /// KiB.
    pub written: u64,
    pub al_writes: u64,
    pub bm_writes: u64,
    pub upper_pending: u64,
    pub lower_pending: u64,
    pub al_suspended: Tri,
    pub blocked: Blocked,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Connection {
    pub peer_node_id: u32,
    pub conn_name: String,
    pub connection: ConnState,
    /// Role of the peer.
    pub peer_role: Role,
    pub congested: Tri,
    /// Sectors (512 B).
    pub ap_in_flight: u64,
    /// Sectors (512 B).
    pub rs_in_flight: u64,
    pub peer_devices: VecMap<PeerDevice>,
    pub paths: Vec<Path>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, String)>,
}

/// Resync/verify progress; present only while one runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncProgress {
    /// Percent done.
    pub done: f64,
    /// MiB/s over the last few seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbdt1: Option<f64>,
    /// Seconds remaining (NaN when the recent rate is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerDevice {
    pub volume: u32,
    pub replication: ReplState,
    pub peer_disk: DiskState,
    pub peer_client: Tri,
    pub resync_suspended: ResyncSuspended,
    /// KiB.
    pub received: u64,
    /// KiB.
    pub sent: u64,
    /// KiB.
    pub out_of_sync: u64,
    pub pending: u64,
    pub unacked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
    /// Verbose (`-s -s`) resync details, as last printed.
    #[serde(skip_serializing_if = "is_default")]
    pub details: SyncFields,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, String)>,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Path {
    pub local: String,
    pub peer: String,
    pub established: Tri,
}

fn set<T: PartialEq>(dst: &mut T, src: Option<T>) {
    if let Some(v) = src {
        if *dst != v {
            *dst = v;
        }
    }
}

fn set_ref<T: PartialEq + Clone>(dst: &mut T, src: &Option<T>) {
    if let Some(v) = src {
        if dst != v {
            *dst = v.clone();
        }
    }
}

fn set_str(dst: &mut String, src: Option<&str>) {
    if let Some(v) = src {
        if dst != v {
            dst.clear();
            dst.push_str(v);
        }
    }
}

/// Unknown keys kept per object (a newer drbdsetup adds a few; see docs/reliability.md).
pub const MAX_EXTRA_KEYS: usize = 64;

/// Merges unknown keys, keeping at most [`MAX_EXTRA_KEYS`]; returns how many new keys were left out.
fn merge_extra(dst: &mut Vec<(String, String)>, extra: &[(&str, &str)]) -> usize {
    let mut left_out = 0;
    for (k, v) in extra {
        let full = dst.len() >= MAX_EXTRA_KEYS;
        match dst.iter_mut().find(|(dk, _)| dk == k) {
            Some((_, dv)) => {
                if dv != v {
                    *dv = v.to_string()
                }
            }
            None if full => left_out += 1,
            None => dst.push((k.to_string(), v.to_string())),
        }
    }
    left_out
}

impl Resource {
    pub fn new(name: &str) -> Resource {
        Resource {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Returns how many unknown keys were left out (over the cap).
    pub fn merge(&mut self, f: &ResourceFields, extra: &[(&str, &str)]) -> usize {
        set_ref(&mut self.role, &f.role);
        set_ref(&mut self.suspended, &f.suspended);
        set(&mut self.force_io_failures, f.force_io_failures);
        if f.write_ordering.is_some() && self.write_ordering != f.write_ordering {
            self.write_ordering = f.write_ordering.clone();
        }
        set(&mut self.may_promote, f.may_promote);
        set(&mut self.promotion_score, f.promotion_score);
        merge_extra(&mut self.extra, extra)
    }

    /// Local role is Primary, or any peer is.
    pub fn primary_anywhere(&self) -> bool {
        self.role == Role::Primary
            || self
                .connections
                .values()
                .any(|c| c.peer_role == Role::Primary)
    }
}

impl Device {
    pub fn new(volume: u32) -> Device {
        Device {
            volume,
            ..Default::default()
        }
    }

    /// Returns how many unknown keys were left out (over the cap).
    pub fn merge(&mut self, f: &DeviceFields, extra: &[(&str, &str)]) -> usize {
        set(&mut self.minor, f.minor.map(Some));
        if let Some(b) = f.backing_dev {
            let b = (b != "none").then_some(b);
            if self.backing_dev.as_deref() != b {
                self.backing_dev = b.map(str::to_string);
            }
        }
        set_ref(&mut self.disk, &f.disk);
        set(&mut self.client, f.client);
        set(&mut self.open, f.open);
        set(&mut self.quorum, f.quorum);
        set(&mut self.size, f.size);
        set(&mut self.read, f.read);
        set(&mut self.written, f.written);
        set(&mut self.al_writes, f.al_writes);
        set(&mut self.bm_writes, f.bm_writes);
        set(&mut self.upper_pending, f.upper_pending);
        set(&mut self.lower_pending, f.lower_pending);
        set(&mut self.al_suspended, f.al_suspended);
        set_ref(&mut self.blocked, &f.blocked);
        merge_extra(&mut self.extra, extra)
    }

    /// Diskless without being an intentional diskless client.
    pub fn unintentional_diskless(&self) -> bool {
        self.disk == DiskState::Diskless && self.client != Tri::Yes
    }
}

impl Connection {
    pub fn new(peer_node_id: u32) -> Connection {
        Connection {
            peer_node_id,
            ..Default::default()
        }
    }

    /// Returns how many unknown keys were left out (over the cap).
    pub fn merge(&mut self, f: &ConnectionFields, extra: &[(&str, &str)]) -> usize {
        set_str(&mut self.conn_name, f.conn_name);
        set_ref(&mut self.connection, &f.connection);
        set_ref(&mut self.peer_role, &f.role);
        set(&mut self.congested, f.congested);
        set(&mut self.ap_in_flight, f.ap_in_flight);
        set(&mut self.rs_in_flight, f.rs_in_flight);
        merge_extra(&mut self.extra, extra)
    }

    pub fn path_mut(&mut self, local: &str, peer: &str) -> Option<&mut Path> {
        self.paths
            .iter_mut()
            .find(|p| p.local == local && p.peer == peer)
    }
}

impl PeerDevice {
    pub fn new(volume: u32) -> PeerDevice {
        PeerDevice {
            volume,
            ..Default::default()
        }
    }

    /// Returns how many unknown keys were left out (over the cap).
    pub fn merge(&mut self, f: &PeerDeviceFields, extra: &[(&str, &str)]) -> usize {
        set_ref(&mut self.replication, &f.replication);
        set_ref(&mut self.peer_disk, &f.peer_disk);
        set(&mut self.peer_client, f.peer_client);
        set_ref(&mut self.resync_suspended, &f.resync_suspended);
        set(&mut self.received, f.received);
        set(&mut self.sent, f.sent);
        set(&mut self.out_of_sync, f.out_of_sync);
        set(&mut self.pending, f.pending);
        set(&mut self.unacked, f.unacked);
        match f.done {
            Some(done) => {
                let p = self.sync.get_or_insert_with(SyncProgress::default);
                p.done = done;
                p.dbdt1 = f.sync.dbdt1;
                p.eta = f.sync.eta;
            }
            // drbdsetup prints `done:` whenever a resync or verify runs; a line that carries the
            // replication state without it means none runs any more.
            None if f.replication.is_some() => {
                self.sync = None;
                self.details = SyncFields::default();
            }
            None => {}
        }
        if f.sync != SyncFields::default() && self.details != f.sync && f.done.is_some() {
            self.details = f.sync.clone();
        }
        merge_extra(&mut self.extra, extra)
    }
}

impl Path {
    pub fn new(local: &str, peer: &str) -> Path {
        Path {
            local: local.to_string(),
            peer: peer.to_string(),
            established: Tri::Unknown,
        }
    }
}
