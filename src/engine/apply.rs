//! Applying events2 lines to the state and deriving change updates. Pure: no I/O, no channels.

use super::update::*;
use crate::drbd::events2::*;
use crate::drbd::state::*;
use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use std::sync::Arc;

/// Ids given to peers of old output that prints no `peer-node-id`.
pub const LEGACY_PEER_ID_BASE: u32 = 1 << 16;

/// Identity of one object, used to find what vanished while drbdsetup was away.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ObjKey {
    Resource(Arc<str>),
    Device(Arc<str>, u32),
    Connection(Arc<str>, u32),
    PeerDevice(Arc<str>, u32, u32),
    Path(Arc<str>, u32, String, String),
}

/// One resource in the state: its name (shared with dirty lists and updates), its current state, and
/// whether it was touched since the last [`State::take_dirty`].
#[derive(Debug)]
struct Slot {
    key: Arc<str>,
    res: Arc<Resource>,
    dirty: bool,
}

/// The state of every resource plus what is needed to turn events into updates.
///
/// Resources live in a slab indexed by name, so applying a line costs one hash lookup: the slot found
/// carries the shared name and the touched flag as well.
#[derive(Debug, Default)]
pub struct State {
    index: HashMap<Arc<str>, usize>,
    slots: Vec<Slot>,
    /// Resources touched since the last [`State::take_dirty`], each once, in the order first touched.
    dirty: Vec<Arc<str>>,
    /// Names in `dirty` that have no slot (destroyed, or never existed).
    dirty_gone: HashSet<Arc<str>>,
    /// Set while an `exists` dump after a drbdsetup restart is being read.
    resync: Option<HashSet<ObjKey>>,
    initial_dump_complete: bool,
    caps: Caps,
    /// Objects and keys left out over the caps since the last [`State::take_capped`].
    capped: u64,
    /// The first of them: (resource, what).
    capped_first: Option<(String, &'static str)>,
}

/// How much one resource may hold; what a line adds beyond is left out and counted. Generous for real
/// DRBD (see docs/reliability.md): they bound memory and the cost of a line, not configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Devices (volumes) of a resource, and peer devices of a connection.
    pub volumes: usize,
    /// Connections of a resource (DRBD has at most 31 peers).
    pub connections: usize,
    /// Paths of a connection.
    pub paths: usize,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            volumes: 1024,
            connections: 64,
            paths: 64,
        }
    }
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    /// What was left out over the caps since the last call: (count, first resource, first kind).
    pub fn take_capped(&mut self) -> Option<(u64, String, &'static str)> {
        let n = std::mem::take(&mut self.capped);
        let first = self.capped_first.take();
        first.map(|(r, what)| (n, r, what))
    }

    fn cap(&mut self, n: usize, resource: &str, what: &'static str) {
        if n > 0 {
            self.capped += n as u64;
            self.capped_first
                .get_or_insert_with(|| (resource.to_string(), what));
        }
    }

    /// Whether resource `i` may get one more connection `peer`.
    fn connection_fits(&mut self, i: usize, name: &str, peer: u32) -> bool {
        let conns = &self.slots[i].res.connections;
        if conns.contains_key(&peer) || conns.len() < self.caps.connections {
            return true;
        }
        self.cap(1, name, "connections");
        false
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.index.get(name).map(|&i| &self.slots[i].res)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn initial_dump_complete(&self) -> bool {
        self.initial_dump_complete
    }

    /// Every resource, sorted by name; cheap (shared pointers).
    pub fn snapshot(&self) -> Vec<Arc<Resource>> {
        let mut v: Vec<_> = self.slots.iter().map(|s| s.res.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Names of every resource, sorted.
    pub fn names(&self) -> Vec<Arc<str>> {
        let mut v: Vec<_> = self.slots.iter().map(|s| s.key.clone()).collect();
        v.sort();
        v
    }

    /// Names of resources touched since the last call, each with its current state (`None` = gone).
    pub fn take_dirty(&mut self) -> Vec<(Arc<str>, Option<Arc<Resource>>)> {
        let names = self.take_dirty_names();
        names
            .into_iter()
            .map(|n| {
                let r = self.get(&n).cloned();
                (n, r)
            })
            .collect()
    }

    /// Names of resources touched since the last call (each once), without their states: for
    /// subscribers that fetch the states when they read them.
    pub fn take_dirty_names(&mut self) -> Vec<Arc<str>> {
        for n in &self.dirty {
            if let Some(&i) = self.index.get(n) {
                self.slots[i].dirty = false;
            }
        }
        self.dirty_gone.clear();
        std::mem::take(&mut self.dirty)
    }

    /// Forgets which resources were touched (nobody wants every-event notifications).
    pub fn clear_dirty(&mut self) -> Vec<(Arc<str>, Option<Arc<Resource>>)> {
        self.take_dirty_names();
        Vec::new()
    }

    /// A new drbdsetup is about to print its `exists` dump: remember what was known so that objects
    /// missing from the dump can be destroyed when it completes.
    pub fn begin_resync(&mut self) {
        self.initial_dump_complete = false;
        self.resync = Some(HashSet::new());
    }

    fn mark_slot(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if !s.dirty {
            s.dirty = true;
            self.dirty.push(s.key.clone());
        }
    }

    /// Marks a name touched whether or not the resource exists; returns its slot if it does.
    fn mark_name(&mut self, name: &str) -> Option<usize> {
        match self.index.get(name) {
            Some(&i) => {
                self.mark_slot(i);
                Some(i)
            }
            None => {
                if !self.dirty_gone.contains(name) {
                    let k: Arc<str> = Arc::from(name);
                    self.dirty_gone.insert(k.clone());
                    self.dirty.push(k);
                }
                None
            }
        }
    }

    /// The slot of `name`, created when absent, marked touched; and whether it was created.
    fn slot(&mut self, name: &str) -> (usize, bool) {
        if let Some(&i) = self.index.get(name) {
            self.mark_slot(i);
            return (i, false);
        }
        let key: Arc<str> = match self.dirty_gone.take(name) {
            Some(k) => k, // already listed in `dirty`
            None => {
                let k: Arc<str> = Arc::from(name);
                self.dirty.push(k.clone());
                k
            }
        };
        self.insert_slot(key, Arc::new(Resource::new(name)));
        (self.slots.len() - 1, true)
    }

    /// Adds a slot (touched; the caller has listed the name in `dirty`); replaces a slot of that name.
    fn insert_slot(&mut self, key: Arc<str>, res: Arc<Resource>) {
        if let Some(&i) = self.index.get(&key) {
            self.slots[i].res = res;
            self.slots[i].dirty = true;
            return;
        }
        self.index.insert(key.clone(), self.slots.len());
        self.slots.push(Slot {
            key,
            res,
            dirty: true,
        });
    }

    /// Removes a resource; its name stays listed as touched.
    fn remove_slot(&mut self, name: &str) -> Option<(Arc<str>, Arc<Resource>)> {
        let i = self.index.remove(name)?;
        let s = self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            if let Some(j) = self.index.get_mut(&moved.key) {
                *j = i;
            }
        }
        if !s.dirty {
            self.dirty.push(s.key.clone());
        }
        self.dirty_gone.insert(s.key.clone());
        Some((s.key, s.res))
    }

    fn res_mut(&mut self, i: usize) -> &mut Resource {
        Arc::make_mut(&mut self.slots[i].res)
    }

    fn seen(&mut self, k: impl FnOnce() -> ObjKey) {
        if let Some(seen) = &mut self.resync {
            seen.insert(k());
        }
    }

    /// Applies one parsed line, appending the change updates it causes.
    pub fn apply(&mut self, line: &Line, out: &mut Vec<Update>) {
        let ev = match &line.body {
            Body::InitialStateDone => return self.finish_dump(out),
            Body::Event(ev) => ev,
        };
        let name = ev.object.resource_name();
        match &ev.object {
            Object::Resource(f) => self.apply_resource(ev.verb, name, f, &ev.extra, out),
            Object::Device(f) => self.apply_device(ev.verb, name, f, &ev.extra, out),
            Object::Connection(f) => self.apply_connection(ev.verb, name, f, &ev.extra, out),
            Object::PeerDevice(f) => self.apply_peer_device(ev.verb, name, f, &ev.extra, out),
            Object::Path(f) => self.apply_path(ev.verb, name, f),
            Object::Helper(f) => self.apply_helper(ev.verb, name, f, out),
        }
    }

    /// An update about the resource in slot `i`, carrying its current state.
    fn push(&self, out: &mut Vec<Update>, event: EventType, i: usize, change: Change) {
        let s = &self.slots[i];
        out.push(Update {
            event,
            resource: s.key.to_string(),
            change,
            state: s.res.clone(),
        });
    }

    fn apply_resource(
        &mut self,
        verb: Verb,
        name: &str,
        f: &ResourceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        match verb {
            Verb::Destroy => {
                let Some(i) = self.mark_name(name) else {
                    return;
                };
                self.destroy_children(i, out);
                if let Some((key, state)) = self.remove_slot(name) {
                    let old = ResourceState::from(&*state);
                    out.push(Update {
                        event: Verb::Destroy,
                        resource: key.to_string(),
                        change: Change::Resource {
                            old,
                            new: ResourceState::default(),
                        },
                        state,
                    });
                }
            }
            Verb::Rename => {
                self.mark_name(name);
                let Some(new_name) = f.new_name else { return };
                if let Some((_, mut arc)) = self.remove_slot(name) {
                    Arc::make_mut(&mut arc).name = new_name.to_string();
                    let (i, _) = self.slot(new_name);
                    self.slots[i].res = arc;
                    self.push(
                        out,
                        Verb::Rename,
                        i,
                        Change::Rename {
                            new_name: new_name.to_string(),
                        },
                    );
                    // The update names the old resource.
                    if let Some(u) = out.last_mut() {
                        u.resource = name.to_string();
                    }
                }
            }
            _ => {
                let (i, created) = self.slot(name);
                self.seen(|| ObjKey::Resource(Arc::from(name)));
                let r = self.res_mut(i);
                let old = if created {
                    ResourceState::default()
                } else {
                    ResourceState::from(&*r)
                };
                let left_out = r.merge(f, extra);
                self.cap(left_out, name, "unknown keys");
                let r = &self.slots[i].res;
                let new = ResourceState::from(&**r);
                if created || old != new {
                    self.push(out, verb, i, Change::Resource { old, new });
                }
            }
        }
    }

    /// Destroy updates for children still present when their parent goes (DRBD destroys children
    /// first, but a stream cut short or a vanished object after a restart may not).
    fn destroy_children(&mut self, i: usize, out: &mut Vec<Update>) {
        let r = self.slots[i].res.clone();
        for c in r.connections.values() {
            self.destroy_connection(i, c.peer_node_id, out);
        }
        for vol in r.devices.keys() {
            self.destroy_device(i, *vol, out);
        }
    }

    fn destroy_device(&mut self, i: usize, volume: u32, out: &mut Vec<Update>) {
        if !self.slots[i].res.devices.contains_key(&volume) {
            return;
        }
        let Some(d) = self.res_mut(i).devices.remove(&volume) else {
            return;
        };
        let old = DeviceState::from(&d);
        self.push(
            out,
            Verb::Destroy,
            i,
            Change::Device {
                volume,
                old,
                new: DeviceState::default(),
            },
        );
    }

    fn destroy_connection(&mut self, i: usize, peer: u32, out: &mut Vec<Update>) {
        let Some(c) = self.slots[i].res.connections.get(&peer) else {
            return;
        };
        let vols: Vec<u32> = c.peer_devices.keys().copied().collect();
        for v in vols {
            self.destroy_peer_device(i, peer, v, out);
        }
        let Some(c) = self.res_mut(i).connections.remove(&peer) else {
            return;
        };
        let old = ConnectionState::from(&c);
        self.push(
            out,
            Verb::Destroy,
            i,
            Change::Connection {
                peer_node_id: peer,
                old,
                new: ConnectionState::default(),
            },
        );
    }

    fn destroy_peer_device(&mut self, i: usize, peer: u32, volume: u32, out: &mut Vec<Update>) {
        let present = self.slots[i]
            .res
            .connections
            .get(&peer)
            .is_some_and(|c| c.peer_devices.contains_key(&volume));
        if !present {
            return;
        }
        let Some(p) = self
            .res_mut(i)
            .connections
            .get_mut(&peer)
            .and_then(|c| c.peer_devices.remove(&volume))
        else {
            return;
        };
        let old = PeerDeviceState::from(&p);
        self.push(
            out,
            Verb::Destroy,
            i,
            Change::PeerDevice {
                peer_node_id: peer,
                volume,
                old,
                new: PeerDeviceState::default(),
            },
        );
    }

    fn apply_device(
        &mut self,
        verb: Verb,
        name: &str,
        f: &DeviceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        if verb == Verb::Destroy {
            if let Some(i) = self.mark_name(name) {
                self.destroy_device(i, f.volume, out);
            }
            return;
        }
        let (i, _) = self.slot(name);
        let devs = &self.slots[i].res.devices;
        if !devs.contains_key(&f.volume) && devs.len() >= self.caps.volumes {
            return self.cap(1, name, "volumes");
        }
        self.seen(|| ObjKey::Device(Arc::from(name), f.volume));
        let (d, created) = self
            .res_mut(i)
            .devices
            .get_or_insert_with(f.volume, || Device::new(f.volume));
        let old = if created {
            DeviceState::default()
        } else {
            DeviceState::from(&*d)
        };
        let left_out = d.merge(f, extra);
        let new = DeviceState::from(&*d);
        self.cap(left_out, name, "unknown keys");
        if created || old != new {
            self.push(
                out,
                verb,
                i,
                Change::Device {
                    volume: f.volume,
                    old,
                    new,
                },
            );
        }
    }

    fn apply_connection(
        &mut self,
        verb: Verb,
        name: &str,
        f: &ConnectionFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        if verb == Verb::Destroy {
            if let Some(i) = self.mark_name(name) {
                let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
                self.destroy_connection(i, peer, out);
            }
            return;
        }
        let (i, _) = self.slot(name);
        let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
        if !self.connection_fits(i, name, peer) {
            return;
        }
        self.seen(|| ObjKey::Connection(Arc::from(name), peer));
        let (c, created) = self
            .res_mut(i)
            .connections
            .get_or_insert_with(peer, || Connection::new(peer));
        let old = if created {
            ConnectionState::default()
        } else {
            ConnectionState::from(&*c)
        };
        let left_out = c.merge(f, extra);
        let new = ConnectionState::from(&*c);
        self.cap(left_out, name, "unknown keys");
        if created || old != new {
            self.push(
                out,
                verb,
                i,
                Change::Connection {
                    peer_node_id: peer,
                    old,
                    new,
                },
            );
        }
    }

    /// The peer node id of a line; old output without ids names the peer by `conn-name` only, and such a
    /// peer gets a stable local id above any real DRBD node id (0..=31).
    fn resolve_peer(r: &Resource, id: Option<u32>, conn_name: Option<&str>) -> u32 {
        if let Some(id) = id {
            return id;
        }
        let conn_name = conn_name.unwrap_or_default();
        if let Some(c) = r.connections.values().find(|c| c.conn_name == conn_name) {
            return c.peer_node_id;
        }
        r.connections
            .keys()
            .copied()
            .filter(|k| *k >= LEGACY_PEER_ID_BASE)
            .max()
            .map_or(LEGACY_PEER_ID_BASE, |m| m + 1)
    }

    fn conn_mut<'s>(r: &'s mut Resource, peer: u32, conn_name: Option<&str>) -> &'s mut Connection {
        r.connections
            .get_or_insert_with(peer, || {
                let mut c = Connection::new(peer);
                if let Some(n) = conn_name {
                    c.conn_name = n.to_string();
                }
                c
            })
            .0
    }

    fn apply_peer_device(
        &mut self,
        verb: Verb,
        name: &str,
        f: &PeerDeviceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        if verb == Verb::Destroy {
            if let Some(i) = self.mark_name(name) {
                let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
                self.destroy_peer_device(i, peer, f.volume, out);
            }
            return;
        }
        let (i, _) = self.slot(name);
        let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
        if !self.connection_fits(i, name, peer) {
            return;
        }
        let fits = self.slots[i].res.connections.get(&peer).is_none_or(|c| {
            c.peer_devices.contains_key(&f.volume) || c.peer_devices.len() < self.caps.volumes
        });
        if !fits {
            return self.cap(1, name, "volumes");
        }
        self.seen(|| ObjKey::PeerDevice(Arc::from(name), peer, f.volume));
        let c = Self::conn_mut(self.res_mut(i), peer, f.conn_name);
        let (p, created) = c
            .peer_devices
            .get_or_insert_with(f.volume, || PeerDevice::new(f.volume));
        let old = if created {
            PeerDeviceState::default()
        } else {
            PeerDeviceState::from(&*p)
        };
        let left_out = p.merge(f, extra);
        let new = PeerDeviceState::from(&*p);
        self.cap(left_out, name, "unknown keys");
        if created || old != new {
            self.push(
                out,
                verb,
                i,
                Change::PeerDevice {
                    peer_node_id: peer,
                    volume: f.volume,
                    old,
                    new,
                },
            );
        }
    }

    fn apply_path(&mut self, verb: Verb, name: &str, f: &PathFields) {
        if verb == Verb::Destroy {
            if let Some(i) = self.mark_name(name) {
                let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
                let present = self.slots[i].res.connections.get(&peer).is_some_and(|c| {
                    c.paths
                        .iter()
                        .any(|p| p.local == f.local && p.peer == f.peer)
                });
                if present {
                    if let Some(c) = self.res_mut(i).connections.get_mut(&peer) {
                        c.paths
                            .retain(|p| !(p.local == f.local && p.peer == f.peer));
                    }
                }
            }
            return;
        }
        let (i, _) = self.slot(name);
        let peer = Self::resolve_peer(&self.slots[i].res, f.peer_node_id, f.conn_name);
        if !self.connection_fits(i, name, peer) {
            return;
        }
        let fits = self.slots[i].res.connections.get(&peer).is_none_or(|c| {
            c.paths.len() < self.caps.paths
                || c.paths
                    .iter()
                    .any(|p| p.local == f.local && p.peer == f.peer)
        });
        if !fits {
            return self.cap(1, name, "paths");
        }
        self.seen(|| {
            ObjKey::Path(
                Arc::from(name),
                peer,
                f.local.to_string(),
                f.peer.to_string(),
            )
        });
        let c = Self::conn_mut(self.res_mut(i), peer, f.conn_name);
        // The kernel may not send `exists` for paths: a `change path` for an unknown path creates it.
        let p = match c
            .paths
            .iter()
            .position(|p| p.local == f.local && p.peer == f.peer)
        {
            Some(i) => &mut c.paths[i],
            None => {
                c.paths.push(Path::new(f.local, f.peer));
                c.paths.last_mut().expect("just pushed")
            }
        };
        if let Some(e) = f.established {
            p.established = e;
        }
    }

    fn apply_helper(&mut self, verb: Verb, name: &str, f: &HelperFields, out: &mut Vec<Update>) {
        self.mark_name(name);
        let change = Change::Helper {
            helper: f.helper.to_string(),
            peer_node_id: f.peer_node_id,
            conn_name: f.conn_name.map(str::to_string),
            volume: f.volume,
            minor: f.minor,
            status: f.status,
        };
        let state = self
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Resource::new(name)));
        out.push(Update {
            event: verb,
            resource: name.to_string(),
            change,
            state,
        });
    }

    /// `exists -`: the dump is complete; after a restart, whatever it did not mention is gone.
    fn finish_dump(&mut self, out: &mut Vec<Update>) {
        self.initial_dump_complete = true;
        let Some(seen) = self.resync.take() else {
            return;
        };
        for name in self.names() {
            if !seen.contains(&ObjKey::Resource(name.clone())) {
                self.apply_resource(Verb::Destroy, &name, &ResourceFields::default(), &[], out);
                continue;
            }
            let Some(&i) = self.index.get(&name) else {
                continue;
            };
            let r = self.slots[i].res.clone();
            for c in r.connections.values() {
                let peer = c.peer_node_id;
                if !seen.contains(&ObjKey::Connection(name.clone(), peer)) {
                    self.mark_slot(i);
                    self.destroy_connection(i, peer, out);
                    continue;
                }
                for v in c.peer_devices.keys() {
                    if !seen.contains(&ObjKey::PeerDevice(name.clone(), peer, *v)) {
                        self.mark_slot(i);
                        self.destroy_peer_device(i, peer, *v, out);
                    }
                }
                for p in &c.paths {
                    if !seen.contains(&ObjKey::Path(
                        name.clone(),
                        peer,
                        p.local.clone(),
                        p.peer.clone(),
                    )) {
                        let f = PathFields {
                            name: &name,
                            peer_node_id: Some(peer),
                            local: &p.local,
                            peer: &p.peer,
                            ..Default::default()
                        };
                        self.apply_path(Verb::Destroy, &name, &f);
                    }
                }
            }
            for v in r.devices.keys() {
                if !seen.contains(&ObjKey::Device(name.clone(), *v)) {
                    self.mark_slot(i);
                    self.destroy_device(i, *v, out);
                }
            }
        }
    }

    /// The complete current state as `exists` updates, in DRBD's print order (resource, connections,
    /// devices, then per connection its peer devices): what a newly started plugin receives first.
    pub fn replay(&self) -> Vec<Update> {
        let mut out = Vec::new();
        for r in self.snapshot() {
            let name = &r.name;
            let mk = |change| Update {
                event: Verb::Exists,
                resource: name.clone(),
                change,
                state: r.clone(),
            };
            out.push(mk(Change::Resource {
                old: ResourceState::default(),
                new: ResourceState::from(&*r),
            }));
            for c in r.connections.values() {
                out.push(mk(Change::Connection {
                    peer_node_id: c.peer_node_id,
                    old: ConnectionState::default(),
                    new: ConnectionState::from(c),
                }));
            }
            for d in r.devices.values() {
                out.push(mk(Change::Device {
                    volume: d.volume,
                    old: DeviceState::default(),
                    new: DeviceState::from(d),
                }));
            }
            for c in r.connections.values() {
                for p in c.peer_devices.values() {
                    out.push(mk(Change::PeerDevice {
                        peer_node_id: c.peer_node_id,
                        volume: p.volume,
                        old: PeerDeviceState::default(),
                        new: PeerDeviceState::from(p),
                    }));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drbd::events2::parse_line;
    use crate::drbd::types::{ReplState, Role};

    fn apply(s: &mut State, lines: &str) -> Vec<Update> {
        let mut out = Vec::new();
        for l in lines.lines() {
            s.apply(&parse_line(l).expect("valid line"), &mut out);
        }
        out
    }

    fn dirty(s: &mut State) -> Vec<(String, bool)> {
        let mut v: Vec<_> = s
            .take_dirty()
            .into_iter()
            .map(|(n, r)| (n.to_string(), r.is_some()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn touched_names_are_listed_once_whatever_happened_to_them() {
        let mut s = State::new();
        apply(
            &mut s,
            "exists resource name:a role:Secondary suspended:no may_promote:no promotion_score:0\n\
             exists device name:a volume:0 minor:1 disk:UpToDate client:no quorum:yes\n\
             exists resource name:b role:Secondary suspended:no may_promote:no promotion_score:0\n\
             change device name:a volume:0 minor:1 disk:Outdated client:no quorum:yes",
        );
        assert_eq!(dirty(&mut s), [("a".into(), true), ("b".into(), true)]);
        assert!(dirty(&mut s).is_empty());
        // destroyed, created again, destroyed again; renamed; a helper of an unknown resource
        apply(
            &mut s,
            "destroy device name:a volume:0\n\
             destroy resource name:a\n\
             create resource name:a role:Secondary suspended:no may_promote:no promotion_score:0\n\
             destroy resource name:a\n\
             rename resource name:b new_name:c\n\
             call helper name:x volume:0 helper:before-resync-target",
        );
        assert_eq!(
            dirty(&mut s),
            [
                ("a".into(), false),
                ("b".into(), false),
                ("c".into(), true),
                ("x".into(), false)
            ]
        );
        assert_eq!(s.names(), [Arc::<str>::from("c")]);
        assert_eq!(s.get("c").map(|r| r.name.as_str()), Some("c"));
        // the slab keeps its index right after removals
        apply(
            &mut s,
            "create resource name:d role:Secondary suspended:no may_promote:no promotion_score:0\n\
             create resource name:e role:Secondary suspended:no may_promote:no promotion_score:0\n\
             destroy resource name:c\n\
             change resource name:e role:Primary suspended:no may_promote:no promotion_score:0",
        );
        assert_eq!(s.names(), [Arc::<str>::from("d"), Arc::from("e")]);
        assert_eq!(s.get("e").map(|r| r.role.clone()), Some(Role::Primary));
        assert_eq!(s.snapshot().len(), 2);
    }

    #[test]
    fn a_shared_snapshot_is_copied_not_changed() {
        let mut s = State::new();
        apply(
            &mut s,
            "exists resource name:a role:Secondary suspended:no may_promote:no promotion_score:0\n\
             exists connection name:a peer-node-id:1 conn-name:p connection:Connected role:Secondary congested:no\n\
             exists peer-device name:a peer-node-id:1 conn-name:p volume:0 replication:Established peer-disk:UpToDate\n\
             exists device name:a volume:0 minor:1 disk:UpToDate client:no quorum:yes",
        );
        let before = s.get("a").cloned().expect("a");
        apply(
            &mut s,
            "change peer-device name:a peer-node-id:1 conn-name:p volume:0 replication:SyncSource peer-disk:Inconsistent",
        );
        let after = s.get("a").cloned().expect("a");
        assert_eq!(
            before.connections[&1].peer_devices[&0].replication,
            ReplState::Established
        );
        assert_eq!(
            after.connections[&1].peer_devices[&0].replication,
            ReplState::SyncSource
        );
        // the untouched device is shared between both versions, not copied
        assert!(after.devices.same(&before.devices, &0));
        assert!(!after.connections.same(&before.connections, &1));
    }
}
