//! The cluster model's DRBD semantics: quorum, promotion, resync, suspend-io, and properties that
//! hold over random fault sequences (checked after every single state change).

use drbd_reactor::drbd::types::{ConnState, DiskState, ReplState, Role};
use drbd_reactor::sim::model::{
    Cluster, CreateSpec, InitialDisk, NodeSpec, Op, QuorumOpt, SimError,
};
use drbd_reactor::sim::view::{promotion, res_view};
use proptest::prelude::*;
use std::collections::BTreeMap;

const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn create(diskless: &[&str], opts: &[(&str, &str)]) -> Op {
    let mut nodes: Vec<NodeSpec> = NODES
        .iter()
        .map(|n| NodeSpec {
            name: n.to_string(),
            diskless: false,
            disk: InitialDisk::UpToDate,
            address: None,
        })
        .collect();
    for d in diskless {
        nodes.push(NodeSpec {
            name: d.to_string(),
            diskless: true,
            disk: InitialDisk::UpToDate,
            address: None,
        });
    }
    Op::Create(CreateSpec {
        name: "r0".into(),
        nodes,
        volumes: 1,
        size_kib: 1024,
        minor: None,
        backing_dev: None,
        options: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        connect: true,
    })
}

fn majority() -> Cluster {
    let mut c = Cluster::default();
    c.apply(
        &create(&[], &[("quorum", "majority"), ("on-no-quorum", "io-error")]),
        0,
        &mut |_, _| {},
    )
    .unwrap();
    c
}

fn apply(c: &mut Cluster, op: Op) -> Result<(), SimError> {
    let at = c.now_ms;
    c.apply(&op, at, &mut |_, _| {})
}

fn primary(n: &str) -> Op {
    Op::Primary {
        node: n.into(),
        res: "r0".into(),
        force: false,
    }
}

fn role(c: &Cluster, n: &str) -> Role {
    c.resources["r0"].members[n].role.clone()
}

fn may_promote(c: &Cluster, n: &str) -> bool {
    let r = &c.resources["r0"];
    promotion(&res_view(c, r, n, c.now_ms).unwrap()).may_promote
}

#[test]
fn promote_refusals_use_drbds_codes_and_exit_codes() {
    let mut c = majority();
    apply(&mut c, primary("n1")).unwrap();
    let e = apply(&mut c, primary("n2")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "r0: State change failed: (-1) Multiple primaries not allowed by config"
    );
    assert_eq!(e.exit_code(), 11);

    let e = apply(&mut c, primary("nx")).unwrap_err();
    assert_eq!(e.to_string(), "r0: Failure: (158) Unknown resource");
    assert_eq!(e.exit_code(), 10);

    // Isolate n3: no quorum.
    apply(
        &mut c,
        Op::Cut {
            a: "n3".into(),
            b: "n1".into(),
        },
    )
    .unwrap();
    apply(
        &mut c,
        Op::Cut {
            a: "n3".into(),
            b: "n2".into(),
        },
    )
    .unwrap();
    let e = apply(&mut c, primary("n3")).unwrap_err();
    assert_eq!(e.to_string(), "r0: State change failed: (-25) No quorum");

    // Quorum off, no UpToDate data: (-2), exit 17.
    let mut c = Cluster::default();
    c.apply(
        &Op::Create(CreateSpec {
            name: "r0".into(),
            nodes: vec![NodeSpec {
                name: "n1".into(),
                diskless: false,
                disk: InitialDisk::Inconsistent,
                address: None,
            }],
            volumes: 1,
            size_kib: 1024,
            minor: None,
            backing_dev: None,
            options: BTreeMap::new(),
            connect: true,
        }),
        0,
        &mut |_, _| {},
    )
    .unwrap();
    let e = apply(&mut c, primary("n1")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "r0: State change failed: (-2) Need access to UpToDate data"
    );
    assert_eq!(e.exit_code(), 17);
    // --force overrides it.
    apply(
        &mut c,
        Op::Primary {
            node: "n1".into(),
            res: "r0".into(),
            force: true,
        },
    )
    .unwrap();
    assert_eq!(role(&c, "n1"), Role::Primary);
}

#[test]
fn primary_crash_leaves_a_promotable_majority_and_rejoins_with_resync() {
    let mut c = majority();
    apply(&mut c, primary("n1")).unwrap();
    assert!(!may_promote(&c, "n2"));
    apply(&mut c, Op::NodeDown { node: "n1".into() }).unwrap();
    let r = &c.resources["r0"];
    assert!(r.has_quorum("n2") && r.has_quorum("n3"));
    assert_eq!(r.members["n2"].peers["n1"].cstate, ConnState::Connecting);
    assert!(may_promote(&c, "n2") && may_promote(&c, "n3"));
    apply(&mut c, primary("n2")).unwrap();
    apply(
        &mut c,
        Op::Write {
            node: "n2".into(),
            res: "r0".into(),
            vol: None,
            kib: 512,
        },
    )
    .unwrap();
    apply(&mut c, Op::NodeUp { node: "n1".into() }).unwrap();
    let r = &c.resources["r0"];
    assert_eq!(
        role(&c, "n1"),
        Role::Secondary,
        "a rebooted node comes back Secondary"
    );
    assert_eq!(
        r.members["n1"].peers["n2"].vols[&0].repl,
        ReplState::SyncTarget
    );
    assert_eq!(r.members["n1"].vols[&0].disk, DiskState::Inconsistent);
    // 512 KiB at 100 MiB/s: done after 5 ms.
    c.apply(&Op::Tick, 10, &mut |_, _| {}).unwrap();
    let r = &c.resources["r0"];
    assert_eq!(r.members["n1"].vols[&0].disk, DiskState::UpToDate);
    assert_eq!(
        r.members["n1"].peers["n2"].vols[&0].repl,
        ReplState::Established
    );
    assert_eq!(r.ahead("n2", "n1", 0), 0);
}

#[test]
fn quorum_loss_suspends_or_fails_io_and_the_primary_stays_primary() {
    for policy in ["suspend-io", "io-error"] {
        let mut c = Cluster::default();
        apply(
            &mut c,
            create(&[], &[("quorum", "majority"), ("on-no-quorum", policy)]),
        )
        .unwrap();
        apply(&mut c, primary("n1")).unwrap();
        apply(
            &mut c,
            Op::Cut {
                a: "n1".into(),
                b: "n2".into(),
            },
        )
        .unwrap();
        apply(
            &mut c,
            Op::Cut {
                a: "n1".into(),
                b: "n3".into(),
            },
        )
        .unwrap();
        let r = &c.resources["r0"];
        assert!(!r.has_quorum("n1"));
        assert_eq!(role(&c, "n1"), Role::Primary, "{policy}");
        let v = res_view(&c, r, "n1", 0).unwrap();
        assert_eq!(v.suspended.has("quorum"), policy == "suspend-io");
        let e = apply(
            &mut c,
            Op::Write {
                node: "n1".into(),
                res: "r0".into(),
                vol: None,
                kib: 1,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains(if policy == "suspend-io" {
                "suspended"
            } else {
                "I/O error"
            }),
            "{e}"
        );
        // The majority may promote; the healed link then cannot join two Primaries unless the
        // suspended one is forced to Secondary.
        apply(&mut c, primary("n2")).unwrap();
        apply(
            &mut c,
            Op::Heal {
                a: "n1".into(),
                b: "n2".into(),
            },
        )
        .unwrap();
        assert_ne!(
            c.resources["r0"].members["n1"].peers["n2"].cstate,
            ConnState::Connected
        );
    }
    let mut c = Cluster::default();
    apply(
        &mut c,
        create(
            &[],
            &[
                ("quorum", "majority"),
                ("on-no-quorum", "suspend-io"),
                ("on-suspended-primary-outdated", "force-secondary"),
            ],
        ),
    )
    .unwrap();
    apply(&mut c, primary("n1")).unwrap();
    apply(
        &mut c,
        Op::Cut {
            a: "n1".into(),
            b: "n2".into(),
        },
    )
    .unwrap();
    apply(
        &mut c,
        Op::Cut {
            a: "n1".into(),
            b: "n3".into(),
        },
    )
    .unwrap();
    apply(&mut c, primary("n2")).unwrap();
    apply(
        &mut c,
        Op::Heal {
            a: "n1".into(),
            b: "n2".into(),
        },
    )
    .unwrap();
    assert_eq!(role(&c, "n1"), Role::Secondary);
    assert!(c.resources["r0"].connected("n1", "n2"));
}

#[test]
fn diskless_tiebreaker_breaks_a_two_node_tie() {
    let mut c = Cluster::default();
    let mut spec = match create(&["tb"], &[("quorum", "majority")]) {
        Op::Create(s) => s,
        _ => unreachable!(),
    };
    spec.nodes.retain(|n| n.name != "n3");
    apply(&mut c, Op::Create(spec)).unwrap();
    apply(&mut c, Op::NodeDown { node: "n2".into() }).unwrap();
    assert!(c.resources["r0"].has_quorum("n1"), "n1 + tiebreaker");
    apply(
        &mut c,
        Op::Cut {
            a: "n1".into(),
            b: "tb".into(),
        },
    )
    .unwrap();
    assert!(
        !c.resources["r0"].has_quorum("n1"),
        "half the disks, no tiebreaker"
    );
    assert_eq!(c.resources["r0"].opts.quorum, QuorumOpt::Majority);
}

#[test]
fn secondary_force_sets_force_io_failures_while_open() {
    let mut c = majority();
    apply(
        &mut c,
        Op::Open {
            node: "n1".into(),
            res: "r0".into(),
            vol: None,
            rw: true,
        },
    )
    .unwrap();
    assert_eq!(role(&c, "n1"), Role::Primary, "auto-promote");
    let sec = |force| Op::Secondary {
        node: "n1".into(),
        res: "r0".into(),
        force,
    };
    let e = apply(&mut c, sec(false)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "r0: State change failed: (-12) Device is held open by someone"
    );
    apply(&mut c, sec(true)).unwrap();
    let m = &c.resources["r0"].members["n1"];
    assert!(m.fail_io && m.role == Role::Secondary);
    assert!(!may_promote(&c, "n1"), "no promotion while failing I/O");
    apply(
        &mut c,
        Op::Close {
            node: "n1".into(),
            res: "r0".into(),
            vol: None,
        },
    )
    .unwrap();
    assert!(!c.resources["r0"].members["n1"].fail_io);
}

#[derive(Debug, Clone)]
enum Fault {
    Down(usize),
    Up(usize),
    Cut(usize, usize),
    Heal(usize, usize),
    Primary(usize),
    Secondary(usize),
    Write(usize),
    Detach(usize),
    Attach(usize),
    Time(u64),
}

fn fault() -> impl Strategy<Value = Fault> {
    let n = 0..4usize;
    prop_oneof![
        n.clone().prop_map(Fault::Down),
        n.clone().prop_map(Fault::Up),
        (n.clone(), n.clone()).prop_map(|(a, b)| Fault::Cut(a, b)),
        (n.clone(), n.clone()).prop_map(|(a, b)| Fault::Heal(a, b)),
        n.clone().prop_map(Fault::Primary),
        n.clone().prop_map(Fault::Primary),
        n.clone().prop_map(Fault::Secondary),
        n.clone().prop_map(Fault::Write),
        n.clone().prop_map(Fault::Detach),
        n.clone().prop_map(Fault::Attach),
        (1..50u64).prop_map(Fault::Time),
    ]
}

const ALL: [&str; 4] = ["n1", "n2", "n3", "tb"];

fn op_of(f: &Fault) -> Op {
    let node = |i: usize| ALL[i].to_string();
    let res = "r0".to_string();
    match f {
        Fault::Down(i) => Op::NodeDown { node: node(*i) },
        Fault::Up(i) => Op::NodeUp { node: node(*i) },
        Fault::Cut(a, b) => Op::Cut {
            a: node(*a),
            b: node(*b),
        },
        Fault::Heal(a, b) => Op::Heal {
            a: node(*a),
            b: node(*b),
        },
        Fault::Primary(i) => Op::Primary {
            node: node(*i),
            res,
            force: false,
        },
        Fault::Secondary(i) => Op::Secondary {
            node: node(*i),
            res,
            force: false,
        },
        Fault::Write(i) => Op::Write {
            node: node(*i),
            res,
            vol: None,
            kib: 300,
        },
        Fault::Detach(i) => Op::Detach {
            node: node(*i),
            res,
            vol: None,
        },
        Fault::Attach(i) => Op::Attach {
            node: node(*i),
            res,
            vol: None,
        },
        Fault::Time(_) => Op::Tick,
    }
}

/// Checks DRBD's safety properties on the current state.
fn invariants(c: &Cluster) -> Result<(), String> {
    let r = &c.resources["r0"];
    let up: Vec<&String> = r.members.keys().filter(|n| c.node_up(n)).collect();
    let prims: Vec<&&String> = up
        .iter()
        .filter(|n| r.members[**n].role == Role::Primary)
        .collect();
    // Never two Primaries that can both write (have quorum), never two in one connected partition.
    let writable = prims.iter().filter(|n| r.has_quorum(n)).count();
    if writable > 1 {
        return Err(format!("two Primaries with quorum: {prims:?}"));
    }
    for p in &prims {
        let comp = r.component(p);
        let others = prims
            .iter()
            .filter(|q| **q != *p && comp.contains(***q))
            .count();
        if others > 0 {
            return Err(format!("two Primaries connected: {prims:?}"));
        }
    }
    let voters: Vec<&String> = r
        .members
        .keys()
        .filter(|n| !r.members[*n].is_diskless())
        .collect();
    for n in &up {
        let m = &r.members[*n];
        let connected: Vec<&String> = m
            .peers
            .iter()
            .filter(|(_, p)| p.cstate == ConnState::Connected)
            .map(|(k, _)| k)
            .collect();
        // Connections are symmetric.
        for p in &connected {
            if !r.connected(p, n) {
                return Err(format!("{n} Connected to {p} but not the reverse"));
            }
        }
        let present = voters
            .iter()
            .filter(|v| **v == *n || connected.contains(v))
            .count();
        let tb = r
            .members
            .iter()
            .any(|(k, mm)| mm.is_diskless() && (k == *n || connected.contains(&k)));
        let majority = present * 2 > voters.len() || (present * 2 == voters.len() && tb);
        if r.has_quorum(n) && !majority {
            return Err(format!(
                "{n} has quorum with {present} of {} voters",
                voters.len()
            ));
        }
        let v = res_view(c, r, n, c.now_ms).unwrap();
        let p = promotion(&v);
        if p.may_promote && !r.has_quorum(n) {
            return Err(format!("{n}: may_promote without quorum"));
        }
        // (may_promote is drbdsetup's local guess: with a Primary reachable only through a third node
        // it says yes and the promotion is refused, as with DRBD.)
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_faults_keep_drbds_safety_properties(faults in prop::collection::vec(fault(), 1..40), tiebreaker in any::<bool>()) {
        let mut c = Cluster::default();
        let tb: &[&str] = if tiebreaker { &["tb"] } else { &[] };
        c.apply(&create(tb, &[("quorum", "majority"), ("on-no-quorum", "suspend-io"), ("on-suspended-primary-outdated", "force-secondary")]), 0, &mut |_, _| {}).unwrap();
        let mut now = 0;
        for f in &faults {
            if let Fault::Time(ms) = f {
                now += ms;
            }
            let op = op_of(f);
            if !tiebreaker && matches!(&op, Op::NodeDown { node } | Op::NodeUp { node } if node == "tb") {
                continue;
            }
            // Like the journal writer: an operation that fails changes nothing.
            let mut next = c.clone();
            let mut bad = None;
            let ok = next.apply(&op, now, &mut |c, _| {
                if bad.is_none() {
                    bad = invariants(c).err();
                }
            });
            if ok.is_ok() {
                c = next;
            }
            prop_assert!(bad.is_none(), "after a step of {:?}: {}", f, bad.unwrap_or_default());
            if let Err(e) = invariants(&c) {
                prop_assert!(false, "after {:?}: {}", f, e);
            }
        }
    }
}
