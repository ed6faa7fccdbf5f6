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

/// The state of every resource plus what is needed to turn events into updates.
#[derive(Debug, Default)]
pub struct State {
    resources: HashMap<Arc<str>, Arc<Resource>>,
    /// Resources touched since the last [`State::take_dirty`].
    dirty: HashSet<Arc<str>>,
    /// Set while an `exists` dump after a drbdsetup restart is being read.
    resync: Option<HashSet<ObjKey>>,
    initial_dump_complete: bool,
}

impl State {
    pub fn new() -> State {
        State::default()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    pub fn len(&self) -> usize {
        self.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    pub fn initial_dump_complete(&self) -> bool {
        self.initial_dump_complete
    }

    /// Every resource, sorted by name; cheap (shared pointers).
    pub fn snapshot(&self) -> Vec<Arc<Resource>> {
        let mut v: Vec<_> = self.resources.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Names of resources touched since the last call, each with its current state (`None` = gone).
    pub fn take_dirty(&mut self) -> Vec<(Arc<str>, Option<Arc<Resource>>)> {
        let mut out: Vec<_> = self.dirty.drain().map(|n| (n, None)).collect();
        for (n, r) in out.iter_mut() {
            *r = self.resources.get(n).cloned();
        }
        out
    }

    /// Forgets which resources were touched (nobody wants every-event notifications).
    pub fn clear_dirty(&mut self) -> Vec<(Arc<str>, Option<Arc<Resource>>)> {
        self.dirty.clear();
        Vec::new()
    }

    /// A new drbdsetup is about to print its `exists` dump: remember what was known so that objects
    /// missing from the dump can be destroyed when it completes.
    pub fn begin_resync(&mut self) {
        self.initial_dump_complete = false;
        self.resync = Some(HashSet::new());
    }

    fn key(&self, name: &str) -> Arc<str> {
        match self.resources.get_key_value(name) {
            Some((k, _)) => k.clone(),
            None => Arc::from(name),
        }
    }

    fn seen(&mut self, k: impl FnOnce() -> ObjKey) {
        if let Some(seen) = &mut self.resync {
            seen.insert(k());
        }
    }

    fn mark(&mut self, name: &Arc<str>) {
        if !self.dirty.contains(name) {
            self.dirty.insert(name.clone());
        }
    }

    /// Applies one parsed line, appending the change updates it causes.
    pub fn apply(&mut self, line: &Line, out: &mut Vec<Update>) {
        let ev = match &line.body {
            Body::InitialStateDone => return self.finish_dump(out),
            Body::Event(ev) => ev,
        };
        let name = self.key(ev.object.resource_name());
        self.mark(&name);
        match &ev.object {
            Object::Resource(f) => self.apply_resource(ev.verb, name, f, &ev.extra, out),
            Object::Device(f) => self.apply_device(ev.verb, name, f, &ev.extra, out),
            Object::Connection(f) => self.apply_connection(ev.verb, name, f, &ev.extra, out),
            Object::PeerDevice(f) => self.apply_peer_device(ev.verb, name, f, &ev.extra, out),
            Object::Path(f) => self.apply_path(ev.verb, name, f),
            Object::Helper(f) => self.apply_helper(ev.verb, name, f, out),
        }
    }

    fn res_mut(&mut self, name: &Arc<str>) -> (&mut Resource, bool) {
        let mut created = false;
        let arc = self.resources.entry(name.clone()).or_insert_with(|| {
            created = true;
            Arc::new(Resource::new(name))
        });
        (Arc::make_mut(arc), created)
    }

    fn snap(&self, name: &Arc<str>) -> Arc<Resource> {
        self.resources
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(Resource::new(name)))
    }

    fn push(&self, out: &mut Vec<Update>, event: EventType, name: &Arc<str>, change: Change) {
        out.push(Update {
            event,
            resource: name.to_string(),
            change,
            state: self.snap(name),
        });
    }

    fn apply_resource(
        &mut self,
        verb: Verb,
        name: Arc<str>,
        f: &ResourceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        match verb {
            Verb::Destroy => {
                if let Some(r) = self.resources.get(&name).cloned() {
                    self.destroy_children(&name, &r, out);
                    let state = self.resources.remove(&name).unwrap_or(r);
                    let old = ResourceState::from(&*state);
                    out.push(Update {
                        event: Verb::Destroy,
                        resource: name.to_string(),
                        change: Change::Resource {
                            old,
                            new: ResourceState::default(),
                        },
                        state,
                    });
                }
            }
            Verb::Rename => {
                let Some(new_name) = f.new_name else { return };
                if let Some(mut arc) = self.resources.remove(&name) {
                    Arc::make_mut(&mut arc).name = new_name.to_string();
                    let new_key: Arc<str> = Arc::from(new_name);
                    self.resources.insert(new_key.clone(), arc);
                    self.mark(&new_key);
                    out.push(Update {
                        event: Verb::Rename,
                        resource: name.to_string(),
                        change: Change::Rename {
                            new_name: new_name.to_string(),
                        },
                        state: self.snap(&new_key),
                    });
                }
            }
            _ => {
                self.seen(|| ObjKey::Resource(name.clone()));
                let (r, created) = self.res_mut(&name);
                let old = if created {
                    ResourceState::default()
                } else {
                    ResourceState::from(&*r)
                };
                r.merge(f, extra);
                let new = ResourceState::from(&*r);
                if created || old != new {
                    self.push(out, verb, &name, Change::Resource { old, new });
                }
            }
        }
    }

    /// Destroy updates for children still present when their parent goes (DRBD destroys children
    /// first, but a stream cut short or a vanished object after a restart may not).
    fn destroy_children(&mut self, name: &Arc<str>, r: &Resource, out: &mut Vec<Update>) {
        for c in r.connections.values() {
            self.destroy_connection(name, c.peer_node_id, out);
        }
        for vol in r.devices.keys() {
            self.destroy_device(name, *vol, out);
        }
    }

    fn destroy_device(&mut self, name: &Arc<str>, volume: u32, out: &mut Vec<Update>) {
        let Some(arc) = self.resources.get_mut(name) else {
            return;
        };
        let Some(d) = Arc::make_mut(arc).devices.remove(&volume) else {
            return;
        };
        let old = DeviceState::from(&d);
        self.push(
            out,
            Verb::Destroy,
            name,
            Change::Device {
                volume,
                old,
                new: DeviceState::default(),
            },
        );
    }

    fn destroy_connection(&mut self, name: &Arc<str>, peer: u32, out: &mut Vec<Update>) {
        let Some(arc) = self.resources.get_mut(name) else {
            return;
        };
        let r = Arc::make_mut(arc);
        let Some(c) = r.connections.get(&peer) else {
            return;
        };
        let vols: Vec<u32> = c.peer_devices.keys().copied().collect();
        for v in vols {
            self.destroy_peer_device(name, peer, v, out);
        }
        let Some(arc) = self.resources.get_mut(name) else {
            return;
        };
        let Some(c) = Arc::make_mut(arc).connections.remove(&peer) else {
            return;
        };
        let old = ConnectionState::from(&c);
        self.push(
            out,
            Verb::Destroy,
            name,
            Change::Connection {
                peer_node_id: peer,
                old,
                new: ConnectionState::default(),
            },
        );
    }

    fn destroy_peer_device(
        &mut self,
        name: &Arc<str>,
        peer: u32,
        volume: u32,
        out: &mut Vec<Update>,
    ) {
        let Some(arc) = self.resources.get_mut(name) else {
            return;
        };
        let Some(c) = Arc::make_mut(arc).connections.get_mut(&peer) else {
            return;
        };
        let Some(p) = c.peer_devices.remove(&volume) else {
            return;
        };
        let old = PeerDeviceState::from(&p);
        self.push(
            out,
            Verb::Destroy,
            name,
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
        name: Arc<str>,
        f: &DeviceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        if verb == Verb::Destroy {
            return self.destroy_device(&name, f.volume, out);
        }
        self.seen(|| ObjKey::Device(name.clone(), f.volume));
        let (r, _) = self.res_mut(&name);
        let (d, created) = r
            .devices
            .get_or_insert_with(f.volume, || Device::new(f.volume));
        let old = if created {
            DeviceState::default()
        } else {
            DeviceState::from(&*d)
        };
        d.merge(f, extra);
        let new = DeviceState::from(&*d);
        if created || old != new {
            self.push(
                out,
                verb,
                &name,
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
        name: Arc<str>,
        f: &ConnectionFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        let peer = self.resolve_peer(&name, f.peer_node_id, f.conn_name);
        if verb == Verb::Destroy {
            return self.destroy_connection(&name, peer, out);
        }
        self.seen(|| ObjKey::Connection(name.clone(), peer));
        let (r, _) = self.res_mut(&name);
        let (c, created) = r
            .connections
            .get_or_insert_with(peer, || Connection::new(peer));
        let old = if created {
            ConnectionState::default()
        } else {
            ConnectionState::from(&*c)
        };
        c.merge(f, extra);
        let new = ConnectionState::from(&*c);
        if created || old != new {
            self.push(
                out,
                verb,
                &name,
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
    fn resolve_peer(&self, name: &str, id: Option<u32>, conn_name: Option<&str>) -> u32 {
        if let Some(id) = id {
            return id;
        }
        let conn_name = conn_name.unwrap_or_default();
        let Some(r) = self.resources.get(name) else {
            return LEGACY_PEER_ID_BASE;
        };
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
        name: Arc<str>,
        f: &PeerDeviceFields,
        extra: &[(&str, &str)],
        out: &mut Vec<Update>,
    ) {
        let peer = self.resolve_peer(&name, f.peer_node_id, f.conn_name);
        if verb == Verb::Destroy {
            return self.destroy_peer_device(&name, peer, f.volume, out);
        }
        self.seen(|| ObjKey::PeerDevice(name.clone(), peer, f.volume));
        let (r, _) = self.res_mut(&name);
        let c = Self::conn_mut(r, peer, f.conn_name);
        let (p, created) = c
            .peer_devices
            .get_or_insert_with(f.volume, || PeerDevice::new(f.volume));
        let old = if created {
            PeerDeviceState::default()
        } else {
            PeerDeviceState::from(&*p)
        };
        p.merge(f, extra);
        let new = PeerDeviceState::from(&*p);
        if created || old != new {
            self.push(
                out,
                verb,
                &name,
                Change::PeerDevice {
                    peer_node_id: peer,
                    volume: f.volume,
                    old,
                    new,
                },
            );
        }
    }

    fn apply_path(&mut self, verb: Verb, name: Arc<str>, f: &PathFields) {
        let peer = self.resolve_peer(&name, f.peer_node_id, f.conn_name);
        if verb == Verb::Destroy {
            if let Some(arc) = self.resources.get_mut(&name) {
                if let Some(c) = Arc::make_mut(arc).connections.get_mut(&peer) {
                    c.paths
                        .retain(|p| !(p.local == f.local && p.peer == f.peer));
                }
            }
            return;
        }
        self.seen(|| ObjKey::Path(name.clone(), peer, f.local.to_string(), f.peer.to_string()));
        let (r, _) = self.res_mut(&name);
        let c = Self::conn_mut(r, peer, f.conn_name);
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

    fn apply_helper(
        &mut self,
        verb: Verb,
        name: Arc<str>,
        f: &HelperFields,
        out: &mut Vec<Update>,
    ) {
        let change = Change::Helper {
            helper: f.helper.to_string(),
            peer_node_id: f.peer_node_id,
            conn_name: f.conn_name.map(str::to_string),
            volume: f.volume,
            minor: f.minor,
            status: f.status,
        };
        self.push(out, verb, &name, change);
    }

    /// `exists -`: the dump is complete; after a restart, whatever it did not mention is gone.
    fn finish_dump(&mut self, out: &mut Vec<Update>) {
        self.initial_dump_complete = true;
        let Some(seen) = self.resync.take() else {
            return;
        };
        let mut names: Vec<Arc<str>> = self.resources.keys().cloned().collect();
        names.sort();
        for name in names {
            let r = self.resources[&name].clone();
            if !seen.contains(&ObjKey::Resource(name.clone())) {
                self.mark(&name);
                self.apply_resource(
                    Verb::Destroy,
                    name.clone(),
                    &ResourceFields::default(),
                    &[],
                    out,
                );
                continue;
            }
            for c in r.connections.values() {
                let peer = c.peer_node_id;
                if !seen.contains(&ObjKey::Connection(name.clone(), peer)) {
                    self.mark(&name);
                    self.destroy_connection(&name, peer, out);
                    continue;
                }
                for v in c.peer_devices.keys() {
                    if !seen.contains(&ObjKey::PeerDevice(name.clone(), peer, *v)) {
                        self.mark(&name);
                        self.destroy_peer_device(&name, peer, *v, out);
                    }
                }
                for p in &c.paths {
                    if !seen.contains(&ObjKey::Path(
                        name.clone(),
                        peer,
                        p.local.clone(),
                        p.peer.clone(),
                    )) {
                        self.mark(&name);
                        let f = PathFields {
                            name: &name,
                            peer_node_id: Some(peer),
                            local: &p.local,
                            peer: &p.peer,
                            ..Default::default()
                        };
                        self.apply_path(Verb::Destroy, name.clone(), &f);
                    }
                }
            }
            for v in r.devices.keys() {
                if !seen.contains(&ObjKey::Device(name.clone(), *v)) {
                    self.mark(&name);
                    self.destroy_device(&name, *v, out);
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
