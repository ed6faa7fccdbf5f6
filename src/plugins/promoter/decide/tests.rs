//! Table-driven tests of the decisions with a fake clock; no I/O.

use super::*;
use crate::drbd::state::{Connection, Device, PeerDevice};
use crate::drbd::Verb;
use crate::engine::update::{DeviceState, PeerDeviceState, ResourceState};

/// A DRBD resource as the tests need it.
#[derive(Clone)]
struct World {
    role: Role,
    may_promote: bool,
    disks: Vec<DiskState>,
    quorum: bool,
    /// (node id, name, role, connected, peer disk)
    peers: Vec<(u32, &'static str, Role, bool, DiskState)>,
}

impl World {
    fn new() -> World {
        World {
            role: Role::Secondary,
            may_promote: true,
            disks: vec![DiskState::UpToDate],
            quorum: true,
            peers: vec![
                (1, "n2", Role::Secondary, true, DiskState::UpToDate),
                (2, "n3", Role::Secondary, true, DiskState::UpToDate),
            ],
        }
    }

    fn resource(&self) -> Arc<Resource> {
        let mut r = Resource::new("r0");
        r.role = self.role.clone();
        r.may_promote = Tri::from_bool(self.may_promote);
        for (v, d) in self.disks.iter().enumerate() {
            let mut dev = Device::new(v as u32);
            dev.disk = d.clone();
            dev.client = Tri::No;
            dev.quorum = Tri::from_bool(self.quorum);
            r.devices.insert(v as u32, dev);
        }
        for (id, name, role, connected, pd) in &self.peers {
            let mut c = Connection::new(*id);
            c.conn_name = name.to_string();
            c.peer_role = role.clone();
            c.connection = if *connected {
                ConnState::Connected
            } else {
                ConnState::Connecting
            };
            let mut p = PeerDevice::new(0);
            p.peer_disk = pd.clone();
            p.peer_client = Tri::No;
            c.peer_devices.insert(0, p);
            r.connections.insert(*id, c);
        }
        Arc::new(r)
    }

    fn rs(&self) -> ResourceState {
        ResourceState {
            role: self.role.clone(),
            may_promote: Tri::from_bool(self.may_promote),
            promotion_score: 0,
        }
    }

    fn ds(&self) -> DeviceState {
        DeviceState {
            disk: self.disks[0].clone(),
            client: Tri::No,
            quorum: Tri::from_bool(self.quorum),
            size: 0,
            open: Tri::No,
        }
    }
}

fn update(event: Verb, change: Change, w: &World) -> Update {
    Update {
        event,
        resource: "r0".into(),
        change,
        state: w.resource(),
    }
}

/// Drives one `Res` with a fake clock.
struct H {
    res: Res,
    t0: Instant,
    now: Duration,
    t: Timing,
    w: World,
    events: Vec<(bool, &'static str, String)>,
}

fn spec() -> PromotedResource {
    PromotedResource {
        name: "r0".into(),
        start: vec!["a.service".into()],
        ..Default::default()
    }
}

impl H {
    fn new(spec: PromotedResource, node: &str) -> H {
        H {
            res: Res::new(ResConfig::new(spec, node)),
            t0: Instant::now(),
            now: Duration::ZERO,
            t: Timing::default(),
            w: World::new(),
            events: Vec::new(),
        }
    }

    fn clock(&self) -> Now {
        Now {
            mono: self.t0 + self.now,
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + self.now,
        }
    }

    fn at(&mut self, secs: f64) -> &mut Self {
        self.now = Duration::from_secs_f64(secs);
        self
    }

    /// Runs an input; returns the non-event actions and records the events.
    fn input(&mut self, i: Input<'_>) -> Vec<Action> {
        let now = self.clock();
        let out = self.res.step(i, now, &self.t);
        let mut acts = Vec::new();
        for a in out {
            match a {
                Action::Event {
                    warning,
                    reason,
                    message,
                } => self.events.push((warning, reason, message)),
                a => acts.push(a),
            }
        }
        acts
    }

    /// Feeds a resource change from `old` to the current world.
    fn res_change(&mut self, old: &World) -> Vec<Action> {
        let u = update(
            Verb::Change,
            Change::Resource {
                old: old.rs(),
                new: self.w.rs(),
            },
            &self.w,
        );
        self.input(Input::Update(&u))
    }

    fn dev_change(&mut self, old: &World) -> Vec<Action> {
        let u = update(
            Verb::Change,
            Change::Device {
                volume: 0,
                old: old.ds(),
                new: self.w.ds(),
            },
            &self.w,
        );
        self.input(Input::Update(&u))
    }

    fn peer_disk_change(&mut self, id: u32, old: DiskState) -> Vec<Action> {
        let new = self.w.peers.iter().find(|p| p.0 == id).unwrap().4.clone();
        let pds = |d: DiskState| PeerDeviceState {
            peer_disk: d,
            peer_client: Tri::No,
            ..Default::default()
        };
        let u = update(
            Verb::Change,
            Change::PeerDevice {
                peer_node_id: id,
                volume: 0,
                old: pds(old),
                new: pds(new),
            },
            &self.w,
        );
        self.input(Input::Update(&u))
    }

    /// The replay a new instance gets: `exists resource` from defaults to the current world.
    fn exists(&mut self) -> Vec<Action> {
        let u = update(
            Verb::Exists,
            Change::Resource {
                old: ResourceState::default(),
                new: self.w.rs(),
            },
            &self.w,
        );
        self.input(Input::Update(&u))
    }

    fn detected(&mut self, p: SbPolicy) -> Vec<Action> {
        self.input(Input::Detected(Ok((p, vec![]))))
    }

    fn tick(&mut self) -> Vec<Action> {
        self.input(Input::Tick)
    }

    fn done(&mut self, k: ActionKind, o: Outcome) -> Vec<Action> {
        self.input(Input::Done(k, o))
    }

    fn status(&self) -> (&'static str, String) {
        let s = self.res.status(self.t0 + self.now);
        (s.state, s.reason)
    }

    fn wake_secs(&self) -> Option<f64> {
        self.res
            .next_wake(&self.t)
            .map(|w| (w - self.t0).as_secs_f64())
    }

    /// The resource appears promotable, the policy is detected as Quorum.
    fn boot(&mut self) {
        assert_eq!(self.exists(), vec![Action::Detect]);
        assert_eq!(self.detected(SbPolicy::Quorum), vec![]);
    }

    /// Boot and start successfully at the first deadline; the node becomes Primary.
    fn run_here(&mut self) {
        self.boot();
        let w = self.wake_secs().expect("a start is scheduled");
        self.at(w);
        assert_eq!(self.tick(), vec![Action::Start]);
        let old = self.w.clone();
        self.w.role = Role::Primary;
        self.w.may_promote = false;
        assert_eq!(self.res_change(&old), vec![]);
        assert_eq!(self.done(ActionKind::Start, Outcome::Ok), vec![]);
        assert_eq!(self.status().0, "active");
    }

    fn has_event(&self, reason: &str) -> bool {
        self.events.iter().any(|e| e.1 == reason)
    }
}

#[test]
fn delay_formula_table() {
    use DiskState::*;
    // (disks, preferred, node, policy, peer connected, freeze, factor) → seconds
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        Vec<DiskState>,
        Vec<&str>,
        &str,
        SbPolicy,
        bool,
        bool,
        u32,
        u64,
        &str,
    )> = vec![
        (
            vec![UpToDate],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            0,
            "",
        ),
        (
            vec![Consistent],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            1,
            "local disk Consistent",
        ),
        (
            vec![Outdated],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            2,
            "local disk Outdated",
        ),
        (
            vec![UpToDate, Inconsistent],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            3,
            "local disk Inconsistent",
        ),
        (
            vec![Diskless],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            6,
            "local disk Diskless",
        ),
        (
            vec![DUnknown],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            6,
            "local disk DUnknown",
        ),
        (
            vec![UpToDate],
            vec!["n1", "n2"],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            1,
            0,
            "",
        ),
        (
            vec![UpToDate],
            vec!["n1", "n2"],
            "n2",
            SbPolicy::Quorum,
            true,
            false,
            1,
            1,
            "2nd preferred node",
        ),
        (
            vec![UpToDate],
            vec!["n1", "n2"],
            "n3",
            SbPolicy::Quorum,
            true,
            false,
            1,
            2,
            "not a preferred node",
        ),
        (
            vec![UpToDate],
            vec![],
            "n1",
            SbPolicy::Fencing,
            false,
            false,
            1,
            5,
            "fencing: a peer is not connected",
        ),
        (
            vec![UpToDate],
            vec![],
            "n1",
            SbPolicy::Fencing,
            true,
            false,
            1,
            0,
            "",
        ),
        (
            vec![UpToDate],
            vec![],
            "n1",
            SbPolicy::Quorum,
            false,
            false,
            1,
            0,
            "",
        ),
        (
            vec![UpToDate],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            true,
            1,
            2,
            "freeze policy",
        ),
        (
            vec![Inconsistent],
            vec!["a", "n1"],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            3,
            12,
            "local disk Inconsistent, 2nd preferred node",
        ),
        (
            vec![Inconsistent],
            vec![],
            "n1",
            SbPolicy::Quorum,
            true,
            false,
            0,
            0,
            "local disk Inconsistent",
        ),
    ];
    for (i, (disks, pref, node, policy, connected, freeze, factor, want, why)) in
        cases.into_iter().enumerate()
    {
        let spec = PromotedResource {
            preferred_nodes: pref.iter().map(|s| s.to_string()).collect(),
            on_quorum_loss: if freeze {
                OnQuorumLoss::Freeze
            } else {
                OnQuorumLoss::Shutdown
            },
            sleep_before_promote_factor: factor,
            ..spec()
        };
        let mut w = World::new();
        w.disks = disks;
        if !connected {
            w.peers[0].3 = false;
        }
        let (d, got_why) = promote_delay(&ResConfig::new(spec, node), policy, &w.resource());
        assert_eq!(d, Duration::from_secs(want), "case {i}");
        assert_eq!(got_why, why, "case {i}");
    }
}

#[test]
fn first_start_waits_for_the_delay_and_explains_it() {
    let mut h = H::new(
        PromotedResource {
            preferred_nodes: vec!["n2".into(), "n1".into()],
            ..spec()
        },
        "n1",
    );
    h.w.disks = vec![DiskState::Inconsistent];
    assert_eq!(h.exists(), vec![Action::Detect]);
    assert_eq!(
        h.status(),
        (
            "standby",
            "detecting the split-brain-avoidance policy".into()
        )
    );
    assert_eq!(h.wake_secs(), None);
    h.at(0.5);
    assert_eq!(h.detected(SbPolicy::Quorum), vec![]);
    // the delay counts from the may_promote edge (t=0): 3 s disk + 1 s rank
    assert_eq!(h.wake_secs(), Some(4.0));
    h.at(1.0);
    assert_eq!(
        h.status(),
        (
            "standby",
            "waiting 3 s: local disk Inconsistent, 2nd preferred node".into()
        )
    );
    assert_eq!(h.tick(), vec![], "not due yet");
    h.at(4.0);
    assert_eq!(h.tick(), vec![Action::Start]);
    assert_eq!(h.status(), ("standby", "starting the services".into()));
    assert_eq!(h.done(ActionKind::Start, Outcome::Ok), vec![]);
    assert_eq!(h.status(), ("active", "services run here".into()));
    assert!(h.has_event("Promoted"));
    let st = h.res.status(h.t0 + h.now);
    let la = st.last_action.unwrap();
    assert_eq!((la.action, la.result.as_str()), (ActionKind::Start, "ok"));
    assert_eq!(la.at, "2023-11-14T22:13:24Z");
}

#[test]
fn losing_the_race_cancels_the_start() {
    let mut h = H::new(spec(), "n3");
    h.w.disks = vec![DiskState::Outdated];
    h.boot();
    assert_eq!(h.wake_secs(), Some(2.0));
    // n2 wins meanwhile: may_promote goes away, the peer is Primary
    h.at(1.0);
    let old = h.w.clone();
    h.w.may_promote = false;
    h.w.peers[0].2 = Role::Primary;
    assert_eq!(h.res_change(&old), vec![]);
    assert_eq!(h.wake_secs(), None);
    h.at(2.0);
    assert_eq!(h.tick(), vec![]);
    assert_eq!(h.status(), ("standby", "peer n2 is Primary".into()));
}

#[test]
fn not_promoted_is_cleaned_up_and_retried_without_backoff() {
    let mut h = H::new(spec(), "n1");
    h.boot();
    assert_eq!(h.tick(), vec![Action::Start]);
    // DRBD refused (a Primary two hops away): stop what started, retry later, no failure counted
    assert_eq!(
        h.done(
            ActionKind::Start,
            Outcome::NotPromoted("condition failed".into())
        ),
        vec![Action::Stop]
    );
    assert_eq!(h.done(ActionKind::Stop, Outcome::Ok), vec![]);
    assert_eq!(h.res.failures, 0);
    assert_eq!(h.wake_secs(), Some(20.0), "upstream's 20 s retry");
    assert_eq!(
        h.status(),
        (
            "standby",
            "last start did not promote DRBD: condition failed".into()
        )
    );
    for round in 1..=5 {
        let at = h.wake_secs().unwrap();
        h.at(at);
        assert_eq!(h.tick(), vec![Action::Start], "round {round}");
        h.done(
            ActionKind::Start,
            Outcome::NotPromoted("condition failed".into()),
        );
        h.done(ActionKind::Stop, Outcome::Ok);
        assert_eq!(h.wake_secs(), Some(at + 20.0), "round {round}: no backoff");
    }
}

#[test]
fn failing_starts_back_off_exponentially() {
    let mut h = H::new(spec(), "n1");
    h.boot();
    let mut starts = vec![];
    let mut t = 0.0;
    for _ in 0..6 {
        h.at(t);
        assert_eq!(h.tick(), vec![Action::Start], "at {t}");
        starts.push(t);
        assert_eq!(
            h.done(
                ActionKind::Start,
                Outcome::Failed("a.service failed".into())
            ),
            vec![Action::Stop]
        );
        h.done(ActionKind::Stop, Outcome::Ok);
        t = h.wake_secs().unwrap();
    }
    // 20 s apart twice, then 60, 120, 240 s of backoff
    assert_eq!(starts, vec![0.0, 20.0, 40.0, 100.0, 220.0, 460.0]);
    h.at(470.0);
    assert_eq!(
        h.status(),
        ("blocked", "start failed 6×, backing off 470 s".into())
    );
    assert!(h
        .events
        .iter()
        .any(|e| e.0 && e.2 == "start failed 3×: a.service failed; backing off 60 s"));
    // the cap
    h.at(940.0);
    h.tick();
    h.done(ActionKind::Start, Outcome::Failed("x".into()));
    h.done(ActionKind::Stop, Outcome::Ok);
    assert_eq!(h.wake_secs(), Some(940.0 + 600.0));
}

#[test]
fn services_dying_soon_after_start_count_as_failures_and_stable_ones_reset() {
    let mut h = H::new(spec(), "n1");
    h.run_here();
    // dies 5 s later: DRBD demoted under the services
    h.at(5.0);
    let old = h.w.clone();
    h.w.role = Role::Secondary;
    h.w.may_promote = true;
    assert_eq!(h.res_change(&old), vec![Action::Stop]);
    assert_eq!(h.res.failures, 1);
    assert!(h.has_event("ServicesStopped"));
    h.done(ActionKind::Stop, Outcome::Ok);
    // the edge to promotable is still honoured after the minimum interval
    assert_eq!(h.wake_secs(), Some(20.0));
    h.at(20.0);
    assert_eq!(h.tick(), vec![Action::Start]);
    h.done(ActionKind::Start, Outcome::Ok);
    // running longer than stable_after clears the count
    h.at(100.0);
    h.tick();
    assert_eq!(h.res.failures, 0);
}

#[test]
fn quorum_loss_stops_or_freezes_and_regain_thaws() {
    // shutdown policy
    let mut h = H::new(spec(), "n1");
    h.run_here();
    let old = h.w.clone();
    h.w.quorum = false;
    assert_eq!(h.dev_change(&old), vec![Action::Stop]);
    assert!(h
        .events
        .iter()
        .any(|e| e.1 == "QuorumLost" && e.2 == "stopping services: lost quorum"));
    assert_eq!(h.status(), ("active", "stopping the services".into()));
    h.done(ActionKind::Stop, Outcome::Ok);
    assert_eq!(h.status(), ("blocked", "no quorum".into()));

    // a Secondary without services does nothing
    let mut h = H::new(spec(), "n1");
    h.boot();
    let old = h.w.clone();
    h.w.quorum = false;
    h.w.may_promote = false;
    assert_eq!(h.dev_change(&old), vec![]);
    assert_eq!(h.wake_secs(), None, "the scheduled start was cancelled");

    // freeze policy
    let mut h = H::new(
        PromotedResource {
            on_quorum_loss: OnQuorumLoss::Freeze,
            ..spec()
        },
        "n1",
    );
    h.run_here();
    let old = h.w.clone();
    h.w.quorum = false;
    assert_eq!(h.dev_change(&old), vec![Action::Freeze]);
    h.done(ActionKind::Freeze, Outcome::Ok);
    assert_eq!(
        h.status(),
        ("active", "services frozen here: no quorum".into())
    );
    let old = h.w.clone();
    h.w.quorum = true;
    assert_eq!(h.dev_change(&old), vec![Action::Thaw]);
    h.done(ActionKind::Thaw, Outcome::Ok);
    assert_eq!(h.status(), ("active", "services run here".into()));

    // frozen, then forced to Secondary by the newer partition: stop
    let old = h.w.clone();
    h.w.quorum = false;
    h.dev_change(&old);
    h.done(ActionKind::Freeze, Outcome::Ok);
    let old = h.w.clone();
    h.w.role = Role::Secondary;
    h.w.peers[0].2 = Role::Primary;
    assert_eq!(h.res_change(&old), vec![Action::Stop]);
    h.done(ActionKind::Stop, Outcome::Ok);
    assert!(!h.res.frozen);
    assert_eq!(h.status().0, "blocked"); // still no quorum here
}

#[test]
fn fencing_policy_ignores_quorum_changes() {
    let mut h = H::new(spec(), "n1");
    h.exists();
    h.detected(SbPolicy::Fencing);
    h.tick();
    h.done(ActionKind::Start, Outcome::Ok);
    let old = h.w.clone();
    h.w.quorum = false;
    assert_eq!(h.dev_change(&old), vec![]);
}

#[test]
fn disk_detach_fails_over_only_with_an_uptodate_peer() {
    for (policy, peers_uptodate, want_stop) in [
        (OnDiskDetach::Ignore, true, false),
        (OnDiskDetach::FailOver, true, true),
        (OnDiskDetach::FailOver, false, false),
    ] {
        let mut h = H::new(
            PromotedResource {
                on_disk_detach: policy,
                ..spec()
            },
            "n1",
        );
        h.run_here();
        if !peers_uptodate {
            h.w.peers.iter_mut().for_each(|p| p.4 = DiskState::Outdated);
        }
        let old = h.w.clone();
        h.w.disks = vec![DiskState::Diskless];
        let acts = h.dev_change(&old);
        assert_eq!(
            acts.contains(&Action::Stop),
            want_stop,
            "{policy:?} {peers_uptodate}"
        );
        assert!(h.has_event("DiskDetached"));
    }
}

#[test]
fn fail_back_to_a_more_preferred_node() {
    let pref = |p: PreferredNodesPolicy| PromotedResource {
        preferred_nodes: vec!["n2".into(), "n1".into()],
        preferred_nodes_policy: p,
        ..spec()
    };
    // always: n2 (rank 0) comes back UpToDate while n1 (rank 1) runs the services
    let mut h = H::new(pref(PreferredNodesPolicy::Always), "n1");
    h.run_here();
    h.w.peers[0].4 = DiskState::UpToDate;
    assert_eq!(
        h.peer_disk_change(1, DiskState::Inconsistent),
        vec![Action::Stop]
    );
    assert!(h
        .events
        .iter()
        .any(|e| e.2.contains("fail-back to the more preferred node n2")));
    // a less preferred peer does not trigger it
    let mut h = H::new(pref(PreferredNodesPolicy::Always), "n1");
    h.run_here();
    assert_eq!(h.peer_disk_change(2, DiskState::Inconsistent), vec![]);
    // startOnly never fails back
    let mut h = H::new(pref(PreferredNodesPolicy::StartOnly), "n1");
    h.run_here();
    assert_eq!(h.peer_disk_change(1, DiskState::Inconsistent), vec![]);
    // nor towards an evicted node
    let mut h = H::new(
        PromotedResource {
            evict: vec!["n2".into()],
            ..pref(PreferredNodesPolicy::Always)
        },
        "n1",
    );
    h.run_here();
    assert_eq!(h.peer_disk_change(1, DiskState::Inconsistent), vec![]);
}

#[test]
fn evict_stops_and_keeps_services_off() {
    let mut h = H::new(
        PromotedResource {
            evict: vec!["n1".into()],
            ..spec()
        },
        "n1",
    );
    // after a restart of the instance the services are found running
    h.exists();
    h.w.role = Role::Primary;
    assert_eq!(
        h.input(Input::Observed {
            active: true,
            frozen: false
        }),
        vec![Action::Stop]
    );
    assert!(h.has_event("Evicted"));
    assert_eq!(
        h.status(),
        (
            "evicted",
            "this node is in the evict list: stopping the services".into()
        )
    );
    h.done(ActionKind::Stop, Outcome::Ok);
    // promotable again: nothing is scheduled, ever
    let old = h.w.clone();
    h.w.role = Role::Secondary;
    h.w.may_promote = false;
    h.res_change(&old);
    let old = h.w.clone();
    h.w.may_promote = true;
    assert_eq!(h.res_change(&old), vec![]);
    h.detected(SbPolicy::Quorum);
    assert_eq!(h.wake_secs(), None);
    h.at(1000.0);
    assert_eq!(h.tick(), vec![]);
    assert_eq!(
        h.status(),
        ("evicted", "this node is in the evict list".into())
    );
}

#[test]
fn disabled_does_nothing_at_all() {
    let mut h = H::new(
        PromotedResource {
            disabled: true,
            ..spec()
        },
        "n1",
    );
    h.boot();
    assert_eq!(h.wake_secs(), None);
    assert_eq!(h.tick(), vec![]);
    assert_eq!(h.status(), ("disabled", "disabled in the policy".into()));
    h.input(Input::Observed {
        active: true,
        frozen: false,
    });
    let old = h.w.clone();
    h.w.quorum = false;
    assert_eq!(h.dev_change(&old), vec![], "hands off, even on quorum loss");
    assert_eq!(
        h.status(),
        (
            "disabled",
            "disabled in the policy; the services still run here".into()
        )
    );
}

#[test]
fn quorum_loss_while_starting_stops_at_once_and_the_start_result_is_moot() {
    let mut h = H::new(spec(), "n1");
    h.boot();
    assert_eq!(h.tick(), vec![Action::Start]);
    let old = h.w.clone();
    h.w.role = Role::Primary;
    h.w.may_promote = false;
    h.res_change(&old);
    let old = h.w.clone();
    h.w.quorum = false;
    assert_eq!(h.dev_change(&old), vec![Action::Stop]);
    assert_eq!(h.done(ActionKind::Start, Outcome::Ok), vec![]);
    assert!(!h.res.active());
    assert_eq!(h.done(ActionKind::Stop, Outcome::Ok), vec![]);
    assert_eq!(h.res.failures, 0);
}

#[test]
fn detection_failure_blocks_and_retries() {
    let mut h = H::new(spec(), "n1");
    assert_eq!(h.exists(), vec![Action::Detect]);
    let e = "quorum is 'off', but also fencing is 'dont-care'".to_string();
    assert_eq!(h.input(Input::Detected(Err(e.clone()))), vec![]);
    assert!(h
        .events
        .iter()
        .any(|x| x.0 && x.1 == "Ignored" && x.2.contains(&e)));
    assert_eq!(h.status(), ("blocked", format!("IGNORED: {e}")));
    assert_eq!(h.wake_secs(), Some(30.0));
    // further updates do not re-run it before the retry time
    h.at(10.0);
    let old = h.w.clone();
    assert_eq!(h.res_change(&old), vec![]);
    h.at(30.0);
    assert_eq!(h.tick(), vec![Action::Detect]);
    // the same error again is not announced again
    let n = h.events.len();
    h.input(Input::Detected(Err(e)));
    assert_eq!(h.events.len(), n);
    h.at(60.0);
    h.tick();
    h.detected(SbPolicy::Quorum);
    // promotable since t=0: the start is due at once
    assert_eq!(h.wake_secs(), Some(0.0));
    assert_eq!(h.tick(), vec![Action::Start]);
}

#[test]
fn two_resources_wait_independently() {
    // One resource waiting 6 s (diskless) does not delay another that may start at once.
    let mut a = H::new(spec(), "n1");
    a.w.disks = vec![DiskState::Diskless];
    a.boot();
    let mut b = H::new(
        PromotedResource {
            name: "r1".into(),
            ..spec()
        },
        "n1",
    );
    b.boot();
    assert_eq!(a.wake_secs(), Some(6.0));
    assert_eq!(b.wake_secs(), Some(0.0));
    assert_eq!(b.tick(), vec![Action::Start]);
    assert_eq!(a.tick(), vec![]);
}

#[test]
fn detection_parses_drbdsetup_show() {
    let show = |quorum: &str, fencing: &str, extra: &str| {
        format!(
            r#"[{{"resource":"r0","options":{{"quorum":"{quorum}","on-no-quorum":"io-error","on-no-data-accessible":"io-error",
              "on-suspended-primary-outdated":"force-secondary","auto-promote":false{extra}}},
              "connections":[{{"net":{{"fencing":"{fencing}","rr-conflict":"disconnect"}},"_peer_node_id":1}}]}}]"#
        )
    };
    let r = spec();
    assert_eq!(
        detect_policy(&show("majority", "dont-care", ""), &r, true),
        Ok((SbPolicy::Quorum, vec![]))
    );
    assert_eq!(
        detect_policy(&show("off", "dont-care", ""), &r, true),
        Err("quorum is 'off', but also fencing is 'dont-care'".into())
    );
    assert_eq!(
        detect_policy(&show("off", "resource-and-stonith", ""), &r, true),
        Ok((SbPolicy::Fencing, vec![]))
    );
    let (p, w) = detect_policy(&show("2", "dont-care", ""), &r, true).unwrap();
    assert_eq!(p, SbPolicy::Quorum);
    assert_eq!(
        w,
        vec!["DRBD option 'quorum' should be 'majority', but is '2'".to_string()]
    );
    let freeze = PromotedResource {
        on_quorum_loss: OnQuorumLoss::Freeze,
        ..spec()
    };
    let (_, w) = detect_policy(&show("majority", "dont-care", ""), &freeze, false).unwrap();
    assert_eq!(
        w,
        vec![
            "DRBD option 'on-no-quorum' should be 'suspend-io', but is 'io-error'".to_string(),
            "DRBD option 'on-no-data-accessible' should be 'suspend-io', but is 'io-error'".into(),
            "DRBD option 'rr-conflict' should be 'retry-connect', but is 'disconnect'".into(),
            "onQuorumLoss freeze needs the unified cgroup hierarchy (cgroup v2)".into(),
        ]
    );
    // auto-promote as drbdsetup prints it (a JSON boolean) or as a string
    let w = detect_policy(
        &show("majority", "dont-care", "")
            .replace("\"auto-promote\":false", "\"auto-promote\":true"),
        &r,
        true,
    )
    .unwrap()
    .1;
    assert_eq!(
        w,
        vec!["DRBD option 'auto-promote' should be 'no', but is 'yes'".to_string()]
    );
    // a single replica (no connections): not an error (upstream ignored the resource), a warning
    let single = r#"[{"resource":"r0","options":{"quorum":"majority","on-no-quorum":"io-error","on-no-data-accessible":"io-error","on-suspended-primary-outdated":"force-secondary","auto-promote":false}}]"#;
    assert_eq!(
        detect_policy(single, &r, true).unwrap().1,
        vec!["the resource has no peers: there is no node to fail over to".to_string()]
    );
    assert!(detect_policy("[ ]", &r, true).is_err());
    assert!(detect_policy("garbage", &r, true).is_err());
}

#[test]
fn status_reasons_table() {
    let mut h = H::new(spec(), "n1");
    h.boot();
    h.tick();
    h.done(ActionKind::Start, Outcome::NotPromoted("x".into()));
    h.done(ActionKind::Stop, Outcome::Ok);
    type Case = (Box<dyn Fn(&mut World)>, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (Box::new(|w| w.quorum = false), "blocked", "no quorum"),
        (
            Box::new(|w| {
                w.may_promote = false;
                w.peers[1].2 = Role::Primary
            }),
            "standby",
            "peer n3 is Primary",
        ),
        (
            Box::new(|w| {
                w.may_promote = false;
                w.disks = vec![DiskState::Outdated];
                w.peers.iter_mut().for_each(|p| p.4 = DiskState::Outdated);
            }),
            "blocked",
            "no UpToDate data reachable (local disk Outdated)",
        ),
        (
            Box::new(|w| {
                w.may_promote = false;
                w.disks = vec![];
            }),
            "blocked",
            "no DRBD volume here",
        ),
    ];
    for (f, state, reason) in cases {
        let mut w = World::new();
        f(&mut w);
        h.res.drbd = Some(w.resource());
        assert_eq!(h.status(), (state, reason.to_string()));
    }
    let s = serde_json::to_value(h.res.status(h.t0)).unwrap();
    assert_eq!(s["name"], "r0");
    assert_eq!(s["lastAction"]["action"], "stop");
    assert_eq!(s["lastAction"]["result"], "ok");
    assert_eq!(s["splitBrainAvoidance"], "Quorum");
}

#[test]
fn rfc3339_dates() {
    let t = |s: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(t(0), "1970-01-01T00:00:00Z");
    assert_eq!(t(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(t(1_700_000_000), "2023-11-14T22:13:20Z");
    assert_eq!(t(4_102_444_799), "2099-12-31T23:59:59Z");
}

/// Seconds of a `--timestamps` prefix within its minute (`2026-12-07T18:19:22.154756+00:00` → 22.154756);
/// the test sequences below stay within one minute.
fn ts_secs(line: &str) -> f64 {
    line[17..26].parse().unwrap()
}

/// Real DRBD 9.2.18 (3 QEMU guests, drbd-utils 9.22): node2's `events2 --timestamps --full` when the
/// Primary node1 lost power; node1, node2, node3 in `preferredNodes`. The initial dump, then the lines of
/// the loss. DRBD prints `may_promote:yes` (22.154756) one line before the `disk:UpToDate` of the same
/// state change, so at the edge the local disk still reads Consistent.
const NODE2_PRIMARY_LOST: &str = "\
2026-12-07T18:19:14.067114+00:00 exists resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:10103
2026-12-07T18:19:14.067114+00:00 exists connection name:r0 peer-node-id:2 conn-name:node3 connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0
2026-12-07T18:19:14.067114+00:00 exists connection name:r0 peer-node-id:0 conn-name:node1 connection:Connected role:Primary congested:no ap-in-flight:0 rs-in-flight:0
2026-12-07T18:19:14.067114+00:00 exists device name:r0 volume:0 minor:0 backing_dev:/dev/vdb disk:UpToDate client:no quorum:yes size:65496 read:0 written:139616 al-writes:2 bm-writes:8 upper-pending:0 lower-pending:0 al-suspended:no blocked:no
2026-12-07T18:19:14.067114+00:00 exists peer-device name:r0 peer-node-id:2 conn-name:node3 volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:14.067114+00:00 exists peer-device name:r0 peer-node-id:0 conn-name:node1 volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:65838 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:14.084540+00:00 exists -
2026-12-07T18:19:22.119390+00:00 change resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:10001
2026-12-07T18:19:22.119390+00:00 change connection name:r0 peer-node-id:0 conn-name:node1 connection:NetworkFailure role:Unknown congested:no ap-in-flight:0 rs-in-flight:0
2026-12-07T18:19:22.119390+00:00 change device name:r0 volume:0 minor:0 backing_dev:/dev/vdb disk:Consistent client:no quorum:yes size:65496 read:0 written:139616 al-writes:2 bm-writes:8 upper-pending:0 lower-pending:0 al-suspended:no
2026-12-07T18:19:22.119390+00:00 change peer-device name:r0 peer-node-id:0 conn-name:node1 volume:0 replication:Off peer-disk:DUnknown peer-client:no resync-suspended:no received:65838 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:22.145736+00:00 change resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10001
2026-12-07T18:19:22.145736+00:00 change peer-device name:r0 peer-node-id:2 conn-name:node3 volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:22.146513+00:00 change resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:0
2026-12-07T18:19:22.146513+00:00 change peer-device name:r0 peer-node-id:2 conn-name:node3 volume:0 replication:Established peer-disk:Consistent peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:22.146761+00:00 change path name:r0 peer-node-id:0 conn-name:node1 local:ipv4:10.0.12.2:7789 peer:ipv4:10.0.12.1:7789 established:no
2026-12-07T18:19:22.147187+00:00 call helper name:r0 peer-node-id:0 conn-name:node1 helper:disconnected
2026-12-07T18:19:22.154756+00:00 change resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10101
2026-12-07T18:19:22.154756+00:00 change device name:r0 volume:0 minor:0 backing_dev:/dev/vdb disk:UpToDate client:no quorum:yes size:65496 read:0 written:139616 al-writes:2 bm-writes:8 upper-pending:0 lower-pending:2 al-suspended:no
2026-12-07T18:19:22.166176+00:00 change peer-device name:r0 peer-node-id:2 conn-name:node3 volume:0 replication:Established peer-disk:Consistent peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:22.166976+00:00 change resource name:r0 role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102
2026-12-07T18:19:22.166976+00:00 change peer-device name:r0 peer-node-id:2 conn-name:node3 volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
2026-12-07T18:19:22.319942+00:00 response helper name:r0 peer-node-id:0 conn-name:node1 helper:disconnected status:0
2026-12-07T18:19:22.322190+00:00 change connection name:r0 peer-node-id:0 conn-name:node1 connection:Unconnected role:Unknown congested:no ap-in-flight:0 rs-in-flight:0
2026-12-07T18:19:22.325815+00:00 change connection name:r0 peer-node-id:0 conn-name:node1 connection:Connecting role:Unknown congested:no ap-in-flight:0 rs-in-flight:0
";

/// The real sequence through the engine into node2's decisions, each line at its own timestamp: the
/// start is due one second (node2's rank) after the last may_promote edge, not two (rank + the Consistent
/// disk the edge line was printed with).
#[test]
fn real_primary_loss_the_delay_follows_the_disk_that_becomes_uptodate() {
    let spec = PromotedResource {
        preferred_nodes: vec!["node1".into(), "node2".into(), "node3".into()],
        ..spec()
    };
    let mut h = H::new(spec, "node2");
    let mut engine = crate::engine::Engine::new();
    let mut edge = None;
    for line in NODE2_PRIMARY_LOST.lines() {
        let mut ups = Vec::new();
        assert!(engine.apply_line(line, &mut ups), "{line}");
        h.at(ts_secs(line));
        for u in &ups {
            let acts = h.input(Input::Update(u));
            if acts.contains(&Action::Detect) {
                assert_eq!(h.detected(SbPolicy::Quorum), vec![]);
            }
            if let Change::Resource { old, new } = &u.change {
                if old.may_promote != Tri::Yes && new.may_promote == Tri::Yes {
                    edge = Some(ts_secs(line));
                }
            }
        }
    }
    let edge = edge.unwrap();
    assert_eq!(edge, 22.154756);
    let due = h.wake_secs().unwrap();
    assert!(
        (due - (edge + 1.0)).abs() < 1e-6,
        "due at {due}, the edge was at {edge}"
    );
    assert_eq!(
        h.status().1,
        format!(
            "waiting {} s: 2nd preferred node",
            ceil_secs(Duration::from_secs_f64(due - 22.325815))
        )
    );
    h.at(due);
    assert_eq!(h.tick(), vec![Action::Start]);
}

/// While a start waits, the delay follows the local disk both ways, counted from the same edge.
#[test]
fn the_delay_follows_the_disk_while_the_start_waits() {
    let mut h = H::new(
        PromotedResource {
            preferred_nodes: vec!["n1".into(), "n2".into()],
            ..spec()
        },
        "n2",
    );
    h.w.disks = vec![DiskState::Consistent];
    h.boot();
    assert_eq!(h.wake_secs(), Some(2.0), "1 s Consistent + 1 s rank");
    h.at(0.4);
    let old = h.w.clone();
    h.w.disks = vec![DiskState::UpToDate];
    assert_eq!(h.dev_change(&old), vec![]);
    assert_eq!(h.wake_secs(), Some(1.0));
    assert_eq!(
        h.status(),
        ("standby", "waiting 1 s: 2nd preferred node".into())
    );
    h.at(0.6);
    let old = h.w.clone();
    h.w.disks = vec![DiskState::Outdated];
    assert_eq!(h.dev_change(&old), vec![]);
    assert_eq!(h.wake_secs(), Some(3.0));
    // a disk that gets better after the shortened deadline passed: due at once
    h.at(2.5);
    let old = h.w.clone();
    h.w.disks = vec![DiskState::UpToDate];
    assert_eq!(h.dev_change(&old), vec![]);
    assert_eq!(h.wake_secs(), Some(1.0));
    assert_eq!(h.tick(), vec![Action::Start]);
    // the minimum interval between starts still holds while following
    h.done(ActionKind::Start, Outcome::NotPromoted("lost".into()));
    h.done(ActionKind::Stop, Outcome::Ok);
    h.at(3.0);
    let old = h.w.clone();
    h.w.may_promote = false;
    h.res_change(&old);
    let old = h.w.clone();
    h.w.may_promote = true;
    h.w.disks = vec![DiskState::Consistent];
    h.res_change(&old);
    assert_eq!(h.wake_secs(), Some(22.5), "20 s after the start at 2.5");
    let old = h.w.clone();
    h.w.disks = vec![DiskState::UpToDate];
    h.dev_change(&old);
    assert_eq!(h.wake_secs(), Some(22.5));
}

/// A node that stops for a fail-back does not race the preferred node for the start it gave up: DRBD
/// makes it promotable again at once, and its one second of extra delay is less than a start takes on
/// a slow host (seen on real DRBD in QEMU guests: the preferred node needed 1.4 s to `drbdsetup primary`).
#[test]
fn after_a_fail_back_the_stopping_node_leaves_the_start_to_the_preferred_one() {
    let mut h = H::new(
        PromotedResource {
            preferred_nodes: vec!["n2".into(), "n1".into()],
            ..spec()
        },
        "n1",
    );
    h.run_here();
    h.at(100.0);
    h.w.peers[0].4 = DiskState::UpToDate;
    assert_eq!(
        h.peer_disk_change(1, DiskState::Inconsistent),
        vec![Action::Stop]
    );
    h.at(101.0);
    let old = h.w.clone();
    h.w.role = Role::Secondary;
    h.w.may_promote = true;
    assert_eq!(h.res_change(&old), vec![]);
    assert_eq!(h.done(ActionKind::Stop, Outcome::Ok), vec![]);
    assert_eq!(h.res.failures, 0, "a fail-back is no failure");
    // without the hold this would be due at 102 (1 s rank)
    assert_eq!(h.wake_secs(), Some(120.0));
    h.at(102.0);
    assert_eq!(h.tick(), vec![]);
    assert_eq!(
        h.status(),
        (
            "standby",
            "waiting 18 s: fail-back to n2: leaving the start to it".into()
        )
    );
    // n2 takes over: nothing left to do here
    h.at(103.0);
    let old = h.w.clone();
    h.w.may_promote = false;
    h.w.peers[0].2 = Role::Primary;
    assert_eq!(h.res_change(&old), vec![]);
    assert_eq!(h.wake_secs(), None);
    assert_eq!(h.status(), ("standby", "peer n2 is Primary".into()));

    // n2 never takes over: after the hold this node starts again
    let mut h = H::new(
        PromotedResource {
            preferred_nodes: vec!["n2".into(), "n1".into()],
            ..spec()
        },
        "n1",
    );
    h.run_here();
    h.at(100.0);
    h.w.peers[0].4 = DiskState::UpToDate;
    h.peer_disk_change(1, DiskState::Inconsistent);
    let old = h.w.clone();
    h.w.role = Role::Secondary;
    h.w.may_promote = true;
    h.res_change(&old);
    h.done(ActionKind::Stop, Outcome::Ok);
    h.at(120.0);
    assert_eq!(h.tick(), vec![Action::Start]);
}

/// A backoff while another node is Primary is no deadline of the decision (nothing to start then), but
/// its countdown is shown: the plugin keeps refreshing `/status` on `shows_countdown` (the text froze
/// for up to 20 s on the real-DRBD lab while the other nodes took their turns).
#[test]
fn a_backoff_while_a_peer_is_primary_has_no_wake_but_a_countdown() {
    let mut h = H::new(spec(), "n1");
    h.boot();
    let mut t = 0.0;
    for _ in 0..3 {
        h.at(t);
        assert_eq!(h.tick(), vec![Action::Start], "at {t}");
        h.done(
            ActionKind::Start,
            Outcome::Failed("a.service failed".into()),
        );
        h.done(ActionKind::Stop, Outcome::Ok);
        t = h.wake_secs().unwrap();
    }
    assert_eq!(t, 40.0 + 60.0);
    // n2 takes its turn: not promotable here, n2 Primary
    h.at(41.0);
    let old = h.w.clone();
    h.w.may_promote = false;
    h.w.peers[0].2 = Role::Primary;
    h.res_change(&old);
    assert_eq!(h.wake_secs(), None, "nothing to decide while n2 is Primary");
    let now = h.clock().mono;
    assert!(h.res.shows_countdown(now));
    assert!(!h.res.shows_countdown(h.t0 + Duration::from_secs(100)));
}
