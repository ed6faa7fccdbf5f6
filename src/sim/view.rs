//! What `drbdsetup` on one node sees of a resource ([`ResView`]), and the events2 printer that turns
//! two views into `exists`/`create`/`change`/`destroy` lines exactly as drbdsetup's
//! `print_changes()` does (drbd-utils `user/v9/drbdsetup_events2.c`): same field groups, same
//! "changed or --full" rules, the derived `may_promote`/`promotion_score` computed by the same
//! formula (GRAMMAR.md §6) and printed on the resource line, which comes first. Pure: no I/O.

use super::model::{Cluster, Res};
use crate::drbd::events2::{
    ConnectionFields, DeviceFields, Event, Object, PathFields, PeerDeviceFields, ResourceFields,
    SyncFields, Verb,
};
use crate::drbd::types::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
pub struct DevStats {
    pub size: u64,
    pub read: u64,
    pub written: u64,
    pub al_writes: u64,
    pub bm_writes: u64,
    pub upper_pending: u64,
    pub lower_pending: u64,
    pub al_suspended: bool,
    pub blocked: Blocked,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DevView {
    pub minor: u32,
    pub backing: Option<String>,
    pub disk: DiskState,
    pub client: bool,
    pub open: bool,
    pub quorum: bool,
    pub stats: DevStats,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncStats {
    /// Sectors.
    pub rs_total: u64,
    pub rs_dt_start_ms: u64,
    pub rs_db1_sectors: u64,
    pub rs_dt1_ms: u64,
    /// Sectors still to go.
    pub to_go: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PdStats {
    pub received: u64,
    pub sent: u64,
    /// KiB.
    pub out_of_sync: u64,
    pub pending: u64,
    pub unacked: u64,
    pub sync: Option<SyncStats>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PdView {
    pub repl: ReplState,
    pub peer_disk: DiskState,
    pub peer_client: bool,
    pub resync_suspended: ResyncSuspended,
    /// The peer's UUID_FLAG_STABLE (its data is not being changed by a resync from elsewhere).
    pub stable: bool,
    pub stats: PdStats,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PathView {
    pub local: String,
    pub peer: String,
    pub established: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnStats {
    pub congested: bool,
    pub ap_in_flight: u64,
    pub rs_in_flight: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnView {
    pub conn_name: String,
    pub cstate: ConnState,
    pub role: Role,
    pub split_brain: bool,
    pub stats: ConnStats,
    pub pds: BTreeMap<u32, PdView>,
    pub paths: Vec<PathView>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResView {
    pub name: String,
    pub node_id: u32,
    pub role: Role,
    pub suspended: Suspended,
    pub fail_io: bool,
    pub write_ordering: WriteOrdering,
    pub devices: BTreeMap<u32, DevView>,
    /// By peer node id.
    pub conns: BTreeMap<u32, ConnView>,
}

/// The view of resource `r` from `node` at time `now` (`None` if not configured there).
pub fn res_view(c: &Cluster, r: &Res, node: &str, now: u64) -> Option<ResView> {
    if !c.node_up(node) {
        return None;
    }
    let m = r.members.get(node)?;
    let quorum = r.has_quorum(node);
    let susp_quorum = m.role == Role::Primary && !quorum && r.opts.on_no_quorum == "suspend-io";
    let suspended = Suspended::default().with("quorum", susp_quorum);
    let devices = m
        .vols
        .iter()
        .map(|(v, vol)| {
            (
                *v,
                DevView {
                    minor: vol.minor,
                    // `none` while attaching or detaching too (as DRBD reports it).
                    backing: if vol.attached && vol.transit.is_none() {
                        vol.backing.clone()
                    } else {
                        None
                    },
                    disk: vol.shown_disk(),
                    client: vol.client(),
                    open: vol.open,
                    quorum,
                    stats: DevStats {
                        size: r.size_kib,
                        read: vol.read,
                        written: vol.written,
                        al_writes: vol.al_writes,
                        bm_writes: vol.bm_writes,
                        upper_pending: 0,
                        lower_pending: 0,
                        al_suspended: false,
                        blocked: if susp_quorum {
                            Blocked::Upper
                        } else {
                            Blocked::No
                        },
                    },
                },
            )
        })
        .collect();
    let mut conns = BTreeMap::new();
    for (pname, p) in &m.peers {
        let connected = p.cstate == ConnState::Connected;
        let pm = r.members.get(pname);
        let mut pds = BTreeMap::new();
        for (v, pv) in &p.vols {
            let live = connected && pv.repl != ReplState::Off;
            let pvol = pm.and_then(|pm| pm.vols.get(v));
            let (peer_disk, peer_client) = match (live, pvol) {
                (true, Some(pvol)) => (pvol.shown_disk(), pvol.client()),
                // Not replicating: what this node last learned (a relayed outdate), else unknown.
                _ => (pv.known_disk.clone().unwrap_or(DiskState::DUnknown), false),
            };
            let resync = if pv.repl.is_syncing() {
                r.resync_between(node, pname, *v)
            } else {
                None
            };
            let (out_of_sync, sync) = match resync {
                Some((_, rs)) => {
                    let to_go = rs.remaining_kib(now);
                    let done = rs.done_kib(now);
                    let dt = now.saturating_sub(rs.start_ms);
                    (
                        to_go,
                        Some(SyncStats {
                            rs_total: rs.total_kib * 2,
                            rs_dt_start_ms: dt,
                            rs_db1_sectors: done * 2,
                            rs_dt1_ms: dt,
                            to_go: to_go * 2,
                        }),
                    )
                }
                _ => {
                    let mine = r.ahead(node, pname, *v);
                    let theirs = if connected {
                        r.ahead(pname, node, *v)
                    } else {
                        0
                    };
                    (mine.saturating_add(theirs).min(r.size_kib), None)
                }
            };
            pds.insert(
                *v,
                PdView {
                    repl: pv.repl.clone(),
                    peer_disk,
                    peer_client,
                    resync_suspended: ResyncSuspended::default(),
                    stable: live,
                    stats: PdStats {
                        received: pv.received,
                        sent: pv.sent,
                        out_of_sync,
                        pending: 0,
                        unacked: 0,
                        sync,
                    },
                },
            );
        }
        conns.insert(
            p.node_id,
            ConnView {
                conn_name: pname.clone(),
                cstate: p.cstate.clone(),
                role: match (connected, pm) {
                    (true, Some(pm)) => pm.role.clone(),
                    _ => Role::Unknown,
                },
                split_brain: p.split_brain,
                stats: ConnStats {
                    congested: false,
                    ap_in_flight: 0,
                    rs_in_flight: 0,
                },
                pds,
                paths: p
                    .paths
                    .iter()
                    .map(|x| PathView {
                        local: x.local.clone(),
                        peer: x.remote.clone(),
                        established: x.established,
                    })
                    .collect(),
            },
        );
    }
    Some(ResView {
        name: r.name.clone(),
        node_id: m.node_id,
        role: m.role.clone(),
        suspended,
        fail_io: m.fail_io,
        write_ordering: if m.promoted_once {
            WriteOrdering::Flush
        } else {
            WriteOrdering::None
        },
        devices,
        conns,
    })
}

/// All views of `node`, by resource name.
pub fn node_views(
    c: &Cluster,
    node: &str,
    filter: Option<&str>,
    now: u64,
) -> BTreeMap<String, ResView> {
    c.resources
        .values()
        .filter(|r| filter.is_none_or(|f| f == r.name))
        .filter_map(|r| res_view(c, r, node, now).map(|v| (r.name.clone(), v)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Promotion info (GRAMMAR.md §6, drbdsetup `compute_promotion_info()`).

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Promotion {
    pub may_promote: bool,
    pub score: u32,
}

pub fn promotion(r: &ResView) -> Promotion {
    let none = Promotion::default();
    if r.devices.is_empty() || r.fail_io {
        return none;
    }
    let mut up_to_date_devices = 0u32;
    let mut all_have_disk = true;
    let mut min_replicas: Option<u32> = None;
    let mut all_stable = true;
    for (v, d) in &r.devices {
        if !d.quorum {
            return none;
        }
        let mut replicas = u32::from(d.disk == DiskState::UpToDate);
        let mut stable = d.disk == DiskState::UpToDate;
        for c in r.conns.values() {
            if let Some(pd) = c.pds.get(v) {
                if pd.peer_disk == DiskState::UpToDate {
                    replicas += 1;
                    stable |= pd.stable;
                }
            }
        }
        match d.disk {
            DiskState::UpToDate => up_to_date_devices += 1,
            DiskState::Consistent | DiskState::Inconsistent => {}
            _ => all_have_disk = false,
        }
        min_replicas = Some(min_replicas.map_or(replicas, |m| m.min(replicas)));
        all_stable &= stable;
    }
    let min_replicas = min_replicas.unwrap_or(0);
    if min_replicas == 0 {
        return none;
    }
    let have_primary = r.role == Role::Primary || r.conns.values().any(|c| c.role == Role::Primary);
    Promotion {
        may_promote: !have_primary && all_stable,
        score: u32::from(all_have_disk) * 10000
            + up_to_date_devices.min(99) * 100
            + min_replicas.min(99),
    }
}

// ---------------------------------------------------------------------------------------------
// Printing

/// events2 output options (`--full`, `--statistics`, `--timestamps`).
#[derive(Debug, Clone, Copy)]
pub struct PrintOpts {
    pub full: bool,
    pub statistics: bool,
    /// drbdsetup's `opt_verbose`: +1 for `--statistics`, +1 for `--full`.
    pub verbose: u8,
    /// Print the device's `open:` field (drbd-utils 9.22, which the real captures come from, does
    /// not have it; newer drbd-utils print it).
    pub open_field: bool,
}

impl Default for PrintOpts {
    fn default() -> Self {
        PrintOpts::new(false, false)
    }
}

impl PrintOpts {
    pub fn new(full: bool, statistics: bool) -> PrintOpts {
        PrintOpts {
            full,
            statistics: statistics || full,
            verbose: u8::from(full) + u8::from(statistics),
            open_field: true,
        }
    }
}

fn tri(b: bool) -> Tri {
    Tri::from_bool(b)
}

/// Appends the lines for the change `old` → `new` of one resource to `out` (each line prefixed with
/// `prefix`, ending in `\n`); returns the number of lines. `action_new` is `exists` during the initial
/// dump and `create` afterwards. `new == None` means the resource was destroyed.
pub fn print_changes(
    out: &mut String,
    prefix: &str,
    action_new: Verb,
    old: Option<&ResView>,
    new: Option<&ResView>,
    o: &PrintOpts,
) -> usize {
    let mut n = 0;
    let mut emit = |out: &mut String, e: Event<'_>| {
        out.push_str(prefix);
        let _ = writeln!(out, "{e}");
        n += 1;
    };
    let verb_for = |known: bool| if known { Verb::Change } else { action_new };
    let Some(new) = new else {
        if let Some(old) = old {
            emit(
                out,
                Event {
                    verb: Verb::Destroy,
                    object: Object::Resource(ResourceFields {
                        name: &old.name,
                        ..Default::default()
                    }),
                    extra: Vec::new(),
                },
            );
        }
        return n;
    };
    let name = new.name.as_str();

    // resource
    let p_new = promotion(new);
    let (role_ch, info_ch, fail_ch, stats_ch, prom_ch) = match old {
        None => (true, true, true, o.statistics, true),
        Some(old) => (
            old.role != new.role,
            old.suspended != new.suspended,
            old.fail_io != new.fail_io,
            o.statistics && old.write_ordering != new.write_ordering,
            promotion(old) != p_new,
        ),
    };
    if role_ch || info_ch || fail_ch || stats_ch || prom_ch {
        let full = o.full;
        let f = ResourceFields {
            name,
            new_name: None,
            role: (role_ch || full).then(|| new.role.clone()),
            suspended: (info_ch || full).then(|| new.suspended.clone()),
            force_io_failures: (fail_ch || full).then(|| tri(new.fail_io)),
            write_ordering: ((stats_ch || full)
                && (old.is_none()
                    || full
                    || old.is_some_and(|x| x.write_ordering != new.write_ordering)))
            .then(|| new.write_ordering.clone()),
            may_promote: (prom_ch || full).then(|| tri(p_new.may_promote)),
            promotion_score: (prom_ch || full).then_some(p_new.score),
        };
        emit(
            out,
            Event {
                verb: verb_for(old.is_some()),
                object: Object::Resource(f),
                extra: Vec::new(),
            },
        );
    }

    // The initial dump lists connections newest first (DRBD's list order; the simulator assumes they
    // were created in peer-node-id order); live changes come in creation order.
    let conns: Vec<(&u32, &ConnView)> = if action_new == Verb::Exists {
        new.conns.iter().rev().collect()
    } else {
        new.conns.iter().collect()
    };

    // connections
    for (id, c) in conns.iter().copied() {
        let oc = old.and_then(|x| x.conns.get(id));
        let cs_ch = oc.is_none_or(|x| x.cstate != c.cstate);
        let role_ch = oc.is_none_or(|x| x.role != c.role);
        let st_ch = o.statistics && oc.is_none_or(|x| x.stats != c.stats);
        if !(cs_ch || role_ch || st_ch) {
            continue;
        }
        let mut f = ConnectionFields {
            name,
            peer_node_id: Some(*id),
            conn_name: Some(&c.conn_name),
            connection: (cs_ch || o.full).then(|| c.cstate.clone()),
            role: (role_ch || o.full).then(|| c.role.clone()),
            ..Default::default()
        };
        if st_ch || o.full {
            if oc.is_none_or(|x| x.stats.congested != c.stats.congested) || o.full {
                f.congested = Some(tri(c.stats.congested));
            }
            f.ap_in_flight = Some(c.stats.ap_in_flight);
            f.rs_in_flight = Some(c.stats.rs_in_flight);
        }
        let mut extra = Vec::new();
        if c.cstate == ConnState::StandAlone && c.split_brain {
            extra.push(("sync-state", "SplitBrain"));
        }
        emit(
            out,
            Event {
                verb: verb_for(oc.is_some()),
                object: Object::Connection(f),
                extra,
            },
        );
    }

    // devices
    for (v, d) in &new.devices {
        let od = old.and_then(|x| x.devices.get(v));
        let info_ch = od.is_none_or(|x| {
            x.disk != d.disk
                || x.quorum != d.quorum
                || x.backing != d.backing
                || (o.open_field && x.open != d.open)
        });
        let st_ch = o.statistics && od.is_none_or(|x| x.stats != d.stats);
        if !(info_ch || st_ch) {
            continue;
        }
        let mut f = DeviceFields {
            name,
            volume: *v,
            minor: Some(d.minor),
            ..Default::default()
        };
        if info_ch || o.full {
            f.backing_dev = Some(d.backing.as_deref().unwrap_or("none"));
            f.disk = Some(d.disk.clone());
            f.client = Some(tri(d.client));
            if o.open_field {
                f.open = Some(tri(d.open));
            }
            f.quorum = Some(tri(d.quorum));
        }
        if st_ch || o.full {
            let s = &d.stats;
            if o.statistics {
                if o.verbose > 0 {
                    f.size = Some(s.size);
                }
                f.read = Some(s.read);
                f.written = Some(s.written);
                if o.verbose > 0 {
                    f.al_writes = Some(s.al_writes);
                    f.bm_writes = Some(s.bm_writes);
                    f.upper_pending = Some(s.upper_pending);
                    f.lower_pending = Some(s.lower_pending);
                    if od.is_none_or(|x| x.stats.al_suspended != s.al_suspended) || o.full {
                        f.al_suspended = Some(tri(s.al_suspended));
                    }
                }
            }
            if od.is_none_or(|x| x.stats.blocked != s.blocked)
                && (o.verbose > 0 || s.blocked != Blocked::No)
            {
                f.blocked = Some(s.blocked.clone());
            }
        }
        emit(
            out,
            Event {
                verb: verb_for(od.is_some()),
                object: Object::Device(f),
                extra: Vec::new(),
            },
        );
    }

    // per connection: peer devices, paths, then vanished paths and peer devices
    for (id, c) in conns.iter().copied() {
        let oc = old.and_then(|x| x.conns.get(id));
        for (v, pd) in &c.pds {
            let op = oc.and_then(|x| x.pds.get(v));
            let repl_ch = op.is_none_or(|x| x.repl != pd.repl);
            let disk_ch = op.is_none_or(|x| x.peer_disk != pd.peer_disk);
            let client_ch = op.is_some_and(|x| x.peer_client != pd.peer_client);
            let rs_ch = op.is_none_or(|x| x.resync_suspended != pd.resync_suspended);
            let st_ch = op.is_none_or(|x| x.stats != pd.stats);
            if !(repl_ch || disk_ch || rs_ch || st_ch || client_ch) {
                continue;
            }
            let mut f = PeerDeviceFields {
                name,
                peer_node_id: Some(*id),
                conn_name: Some(&c.conn_name),
                volume: *v,
                ..Default::default()
            };
            if repl_ch || o.full {
                f.replication = Some(pd.repl.clone());
            }
            if disk_ch || o.full || client_ch {
                f.peer_disk = Some(pd.peer_disk.clone());
                f.peer_client = Some(tri(pd.peer_client));
            }
            if rs_ch || o.full {
                f.resync_suspended = Some(pd.resync_suspended.clone());
            }
            if st_ch || o.full {
                peer_device_statistics(&mut f, &pd.stats, o);
            }
            // A change line whose groups are all empty is still printed (drbdsetup does that too).
            emit(
                out,
                Event {
                    verb: verb_for(op.is_some()),
                    object: Object::PeerDevice(f),
                    extra: Vec::new(),
                },
            );
        }
        for p in &c.paths {
            let opath = oc.and_then(|x| {
                x.paths
                    .iter()
                    .find(|q| q.local == p.local && q.peer == p.peer)
            });
            if opath.is_some_and(|x| x.established == p.established) {
                continue;
            }
            emit(
                out,
                Event {
                    verb: verb_for(opath.is_some()),
                    object: Object::Path(PathFields {
                        name,
                        peer_node_id: Some(*id),
                        conn_name: Some(&c.conn_name),
                        local: &p.local,
                        peer: &p.peer,
                        established: Some(tri(p.established)),
                    }),
                    extra: Vec::new(),
                },
            );
        }
        if let Some(oc) = oc {
            for p in &oc.paths {
                if !c
                    .paths
                    .iter()
                    .any(|q| q.local == p.local && q.peer == p.peer)
                {
                    emit(
                        out,
                        Event {
                            verb: Verb::Destroy,
                            object: Object::Path(PathFields {
                                name,
                                peer_node_id: Some(*id),
                                conn_name: Some(&oc.conn_name),
                                local: &p.local,
                                peer: &p.peer,
                                established: None,
                            }),
                            extra: Vec::new(),
                        },
                    );
                }
            }
            for v in oc.pds.keys() {
                if !c.pds.contains_key(v) {
                    emit(
                        out,
                        Event {
                            verb: Verb::Destroy,
                            object: Object::PeerDevice(PeerDeviceFields {
                                name,
                                peer_node_id: Some(*id),
                                conn_name: Some(&oc.conn_name),
                                volume: *v,
                                ..Default::default()
                            }),
                            extra: Vec::new(),
                        },
                    );
                }
            }
        }
    }
    if let Some(old) = old {
        for (id, oc) in &old.conns {
            if !new.conns.contains_key(id) {
                emit(
                    out,
                    Event {
                        verb: Verb::Destroy,
                        object: Object::Connection(ConnectionFields {
                            name,
                            peer_node_id: Some(*id),
                            conn_name: Some(&oc.conn_name),
                            ..Default::default()
                        }),
                        extra: Vec::new(),
                    },
                );
            }
        }
        for v in old.devices.keys() {
            if !new.devices.contains_key(v) {
                emit(
                    out,
                    Event {
                        verb: Verb::Destroy,
                        object: Object::Device(DeviceFields {
                            name,
                            volume: *v,
                            ..Default::default()
                        }),
                        extra: Vec::new(),
                    },
                );
            }
        }
    }
    n
}

/// drbdsetup `print_peer_device_statistics()` for an events2 line.
fn peer_device_statistics(f: &mut PeerDeviceFields<'_>, s: &PdStats, o: &PrintOpts) {
    if let Some(sy) = &s.sync {
        if sy.rs_total > 0 {
            f.done = Some(100.0 * (sy.rs_total - sy.to_go) as f64 / sy.rs_total as f64);
        }
    }
    if !o.statistics {
        return;
    }
    f.received = Some(s.received);
    f.sent = Some(s.sent);
    if o.verbose > 0 || s.out_of_sync > 0 {
        f.out_of_sync = Some(s.out_of_sync);
    }
    if o.verbose == 0 {
        return;
    }
    f.pending = Some(s.pending);
    f.unacked = Some(s.unacked);
    let Some(sy) = &s.sync else {
        return;
    };
    let mut sf = SyncFields::default();
    if o.verbose > 1 {
        sf.rs_total = Some(sy.rs_total);
        sf.rs_dt_start_ms = Some(sy.rs_dt_start_ms);
        sf.rs_paused_ms = Some(0);
        sf.rs_dt0_ms = Some(sy.rs_dt1_ms);
        sf.rs_db0_sectors = Some(sy.rs_db1_sectors);
        sf.rs_dt1_ms = Some(sy.rs_dt1_ms);
        sf.rs_db1_sectors = Some(sy.rs_db1_sectors);
        sf.rs_failed = Some(0);
        sf.rs_same_csum = Some(0);
        let db = (sy.rs_total - sy.to_go) as f64;
        sf.dbdt = Some(db / (sy.rs_dt_start_ms.max(1) as f64) * 1000.0 / 2048.0);
        sf.dbdt0 = Some(sy.rs_db1_sectors as f64 / (sy.rs_dt1_ms.max(1) as f64) * 1000.0 / 2048.0);
    }
    let db = sy.rs_db1_sectors as f64;
    let dt = sy.rs_dt1_ms.max(1) as f64;
    sf.dbdt1 = Some(db / dt * 1000.0 / 2048.0);
    sf.eta = Some(if db > 0.0 {
        dt * 1e-3 * sy.to_go as f64 / db
    } else {
        f64::NAN
    });
    f.sync = sf;
}

/// The tracked ("printed") view after a live kernel notification: objects whose state did not change
/// were not reported by the kernel, so they keep their old statistics (DRBD does not push
/// statistics-only changes; `--poll` fetches them).
pub fn merge_live(old: &ResView, new: &ResView) -> ResView {
    let mut m = new.clone();
    if old.role == new.role && old.suspended == new.suspended && old.fail_io == new.fail_io {
        m.write_ordering = old.write_ordering.clone();
    }
    for (v, d) in m.devices.iter_mut() {
        if let Some(od) = old.devices.get(v) {
            if od.disk == d.disk
                && od.quorum == d.quorum
                && od.open == d.open
                && od.client == d.client
                && od.backing == d.backing
            {
                d.stats = od.stats.clone();
            }
        }
    }
    for (id, c) in m.conns.iter_mut() {
        let Some(oc) = old.conns.get(id) else {
            continue;
        };
        if oc.cstate == c.cstate && oc.role == c.role {
            c.stats = oc.stats.clone();
        }
        for (v, pd) in c.pds.iter_mut() {
            if let Some(op) = oc.pds.get(v) {
                if op.repl == pd.repl
                    && op.peer_disk == pd.peer_disk
                    && op.peer_client == pd.peer_client
                    && op.resync_suspended == pd.resync_suspended
                {
                    pd.stats = op.stats.clone();
                }
            }
        }
    }
    m
}
