//! UMH decisions without I/O: rule matching against the shared events2 samples (through the real engine),
//! the `changed` guard and upstream's trap, validation errors, and the environment builder.

use drbd_reactor::drbd::state::{Device, Resource};
use drbd_reactor::drbd::{Tri, Verb};
use drbd_reactor::engine::update::{Change, ResourceState, Update};
use drbd_reactor::engine::Engine;
use drbd_reactor::plugins::umh::env::{build_env, EnvCtx, MINIMAL_PATH};
use drbd_reactor::plugins::umh::rules::{compile, Compiled};
use drbd_reactor::policy::parse_documents;
use std::path::Path;
use std::sync::Arc;

fn sample(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/events2")
            .join(format!("{name}.txt")),
    )
    .unwrap()
}

/// The updates the engine derives from an events2 text (comment lines skipped).
fn updates_of(text: &str) -> Vec<Update> {
    let mut e = Engine::new();
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        e.apply_line(l, &mut out);
    }
    out
}

fn policy(umh: &str) -> Compiled {
    let yaml = format!(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: t\nspec:\n  umh:\n{}",
        umh.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let ps = parse_documents(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    compile(ps[0].spec.umh.as_ref().unwrap()).unwrap()
}

fn policy_error(umh: &str) -> String {
    let yaml = format!(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: t\nspec:\n  umh:\n{}",
        umh.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    parse_documents(&yaml).unwrap_err().to_string()
}

fn what(u: &Update) -> String {
    let ev = format!("{:?}", u.event).to_lowercase();
    match &u.change {
        Change::Resource { .. } => format!("{ev} resource {}", u.resource),
        Change::Device { volume, .. } => format!("{ev} device {}/{volume}", u.resource),
        Change::PeerDevice {
            peer_node_id,
            volume,
            ..
        } => format!("{ev} peer-device {}/{peer_node_id}/{volume}", u.resource),
        Change::Connection { peer_node_id, .. } => {
            format!("{ev} connection {}/{peer_node_id}", u.resource)
        }
        Change::Helper { helper, .. } => format!("{ev} helper {} {helper}", u.resource),
        Change::Rename { new_name } => format!("rename {} {new_name}", u.resource),
    }
}

/// `rule: update` for every rule firing on every update, in order.
fn fired(c: &Compiled, ups: &[Update]) -> Vec<String> {
    let mut out = Vec::new();
    for u in ups {
        for r in &c.rules {
            if r.matches(u) {
                out.push(format!("{}: {}", r.name, what(u)));
            }
        }
    }
    out
}

const CMD: &str = "command: [/bin/true]";

#[test]
fn each_kind_fires_on_its_transitions_only() {
    let c = policy(&format!(
        "resource:
- name: may-promote
  new: {{mayPromote: true}}
  changed: true
  {CMD}
device:
- name: up-to-date
  volume: 0
  new: {{diskState: UpToDate}}
  changed: [diskState]
  {CMD}
peerDevice:
- name: resync-started
  peerNodeId: 1
  new: {{replicationState: [SyncSource, SyncTarget]}}
  changed: true
  {CMD}
connection:
- name: connected
  resourceName: 'some-*'
  eventType: change
  old: {{connectionState: {{notEquals: Connected}}}}
  new: {{connectionState: Connected, peerRole: Secondary}}
  {CMD}
helper:
- name: before-resync
  helper: before-resync-target
  eventType: call
  {CMD}
"
    ));
    let ups = updates_of(&sample("drbd-utils_events2-sync"));
    assert_eq!(
        fired(&c, &ups),
        [
            "may-promote: change resource some-resource",
            "up-to-date: change device some-resource/0",
            "connected: change connection some-resource/1",
            "resync-started: change peer-device some-resource/1/0",
        ]
    );
    let ups = updates_of(&sample("drbd-utils_events2-all-create-helper"));
    assert_eq!(
        fired(&c, &ups),
        ["before-resync: call helper some-resource before-resync-target"]
    );
    // a filter on another resource, volume or peer matches nothing
    let other = policy(&format!(
        "device:
- name: other-volume
  volume: 1
  {CMD}
peerDevice:
- name: other-peer
  peerNodeId: 2
  {CMD}
connection:
- name: other-resource
  resourceName: [r0, 'web-*']
  {CMD}
helper:
- name: other-helper
  helper: 'fence-*'
  {CMD}
"
    ));
    for s in [
        "drbd-utils_events2-sync",
        "drbd-utils_events2-all-create-helper",
        "drbd-utils_events2-all-create-destroy",
    ] {
        assert!(fired(&other, &updates_of(&sample(s))).is_empty(), "{s}");
    }
}

#[test]
fn quorum_loss_destroy_and_helper_response() {
    let c = policy(&format!(
        "device:
- name: quorum-lost
  old: {{quorum: true}}
  new: {{quorum: false}}
  {CMD}
- name: device-gone
  eventType: destroy
  {CMD}
connection:
- name: connection-gone
  eventType: destroy
  {CMD}
peerDevice:
- name: peer-device-gone
  eventType: [destroy]
  {CMD}
resource:
- name: resource-gone
  eventType: destroy
  old: {{role: Secondary}}
  {CMD}
helper:
- name: resync-helper-done
  eventType: response
  exitCode: 0
  {CMD}
- name: resync-helper-failed
  eventType: response
  exitCode: {{notEquals: 0}}
  {CMD}
"
    ));
    assert_eq!(
        fired(
            &c,
            &updates_of(&sample("drbd-utils_events2-may-promote-quorum"))
        ),
        ["quorum-lost: change device some-resource/0"]
    );
    assert_eq!(
        fired(
            &c,
            &updates_of(&sample("drbd-utils_events2-all-create-destroy"))
        ),
        [
            "peer-device-gone: destroy peer-device some-resource/1/0",
            "connection-gone: destroy connection some-resource/1",
            "device-gone: destroy device some-resource/0",
            "resource-gone: destroy resource some-resource",
        ]
    );
    // status:1 is a raw wait status: exit code 0
    assert_eq!(
        fired(
            &c,
            &updates_of(&sample("drbd-utils_events2-all-create-helper"))
        ),
        ["resync-helper-done: response helper some-resource before-resync-target"]
    );
}

#[test]
fn upstreams_trap_and_the_changed_guard() {
    let c = policy(&format!(
        "resource:
- name: trap
  new: {{role: Secondary}}
  {CMD}
- name: guarded
  new: {{role: Secondary}}
  changed: true
  {CMD}
- name: guarded-live
  eventType: change
  new: {{role: Secondary}}
  changed: true
  {CMD}
- name: score-moved
  changed: [promotionScore]
  {CMD}
"
    ));
    let ups = updates_of(&sample("drbd-utils_events2-may-promote-quorum"));
    assert_eq!(
        fired(&c, &ups),
        [
            // create: role Unknown -> Secondary, a transition for `changed`
            "trap: create resource some-resource",
            "guarded: create resource some-resource",
            // may_promote changes while Secondary: only the unguarded rule fires
            "trap: change resource some-resource",
            "score-moved: change resource some-resource",
            "trap: change resource some-resource",
            "score-moved: change resource some-resource",
        ]
    );
}

#[test]
fn every_field_filters() {
    let c = policy(&format!(
        "resource:
- name: r
  new: {{role: Secondary, mayPromote: yes, promotionScore: 10101}}
  {CMD}
device:
- name: d
  old: {{diskState: Diskless, client: false, open: no, quorum: true, size: 0}}
  new: {{diskState: {{equals: [UpToDate, Consistent]}}, size: {{notEquals: 1}}}}
  {CMD}
peerDevice:
- name: p
  new: {{peerDiskState: Inconsistent, peerClient: false, resyncSuspended: 'no'}}
  {CMD}
connection:
- name: c
  new: {{connName: 'some-p*', congested: unknown, connectionState: Connected}}
  {CMD}
"
    ));
    assert_eq!(
        fired(&c, &updates_of(&sample("drbd-utils_events2-sync"))),
        [
            "r: change resource some-resource",
            "d: change device some-resource/0",
            "c: change connection some-resource/1",
            "p: change peer-device some-resource/1/0",
        ]
    );
}

#[test]
fn errors_name_the_field() {
    for (umh, want) in [
        (
            "resource:\n- name: x\n  new: {role: Primay}\n  command: [a]",
            "spec.umh.resource[0].new.role: 'Primay' is not a role (one of: Unknown, Primary, Secondary)",
        ),
        (
            "resource:\n- name: x\n  new: {diskState: UpToDate}\n  command: [a]",
            "spec.umh.resource[0].new.diskState: not a field of resource rules (role, mayPromote, promotionScore)",
        ),
        (
            "device:\n- name: x\n  new: {quorum: maybe}\n  command: [a]",
            "spec.umh.device[0].new.quorum: 'maybe' is not a boolean",
        ),
        (
            "device:\n- name: x\n  new: {size: {equals: [1, big]}}\n  command: [a]",
            "spec.umh.device[0].new.size.equals[1]: 'big' is not a number",
        ),
        (
            "device:\n- name: x\n  command: [a]\n  script: {path: a.sh}",
            "spec.umh.device[0]: has both 'command' and 'script'",
        ),
        (
            "device:\n- name: x",
            "spec.umh.device[0]: needs 'command' or 'script'",
        ),
        (
            "connection:\n- name: x\n  volume: 0\n  command: [a]",
            "spec.umh.connection[0].volume: connection rules have no volume",
        ),
        (
            "peerDevice:\n- name: x\n  changed: [role]\n  command: [a]",
            "spec.umh.peerDevice[0].changed[0]: 'role' is not a field of peerDevice rules",
        ),
        (
            "helper:\n- name: x\n  helper: befor-resync-target\n  command: [a]",
            "spec.umh.helper[0].helper: 'befor-resync-target' is not a DRBD helper",
        ),
        (
            "helper:\n- name: x\n  eventType: change\n  command: [a]",
            "spec.umh.helper[0].eventType: 'change' is not an event type of this rule kind (one of: call, response)",
        ),
        (
            "device:\n- name: x\n  command: [a]\nresource:\n- name: x\n  command: [a]",
            "spec.umh.device[0].name: rule name 'x' is already used by spec.umh.resource[0]",
        ),
        (
            "device:\n- name: 'a b'\n  command: [a]",
            "spec.umh.device[0].name: 'a b' is not a rule name",
        ),
        (
            "device:\n- name: x\n  command: [a]\n  env: {DRBD_RES_NAME: evil}",
            "spec.umh.device[0].env.DRBD_RES_NAME: DRBD_* variables are reserved",
        ),
        (
            "device:\n- name: x\n  script: {path: ../../etc/x.sh}",
            "spec.umh.device[0].script.path: '../../etc/x.sh' leaves the policy directory",
        ),
        (
            "device:\n- name: x\n  script: {path: /etc/x.sh}",
            "spec.umh.device[0].script.path: '/etc/x.sh' is absolute",
        ),
        (
            "device:\n- name: x\n  command: [a]\n  timeoutSeconds: 0",
            "spec.umh.device[0].timeoutSeconds: 0 is not between 1 and 86400",
        ),
        (
            "device:\n- name: x\n  command: [a]\n  where: moon",
            "spec.umh.device[0].where: unknown variant `moon`",
        ),
        (
            "device:\n- name: x\n  command: [a]\n  resourceName: 'r[0-'",
            "spec.umh.device[0].resourceName: 'r[0-': unterminated '['",
        ),
        ("maxConcurrent: 0", "spec.umh.maxConcurrent: 0 is not between 1 and 1024"),
        (
            "device:\n- name: x\n  command: [a]\n  old: {quorum: {equals: true, nope: 1}}",
            "spec.umh.device[0].old.quorum",
        ),
    ] {
        let e = policy_error(umh);
        assert!(e.starts_with(want), "{umh}\n got: {e}\nwant: {want}");
    }
}

fn resource_update(name: &str) -> Update {
    let mut r = Resource::new(name);
    let mut d = Device::new(0);
    d.minor = Some(1000);
    d.backing_dev = Some("/dev/vg/lv".into());
    r.devices.insert(0, d);
    let mut d1 = Device::new(1);
    d1.minor = Some(1001);
    r.devices.insert(1, d1);
    Update {
        event: Verb::Change,
        resource: name.to_string(),
        change: Change::Resource {
            old: ResourceState {
                role: drbd_reactor::drbd::Role::Secondary,
                may_promote: Tri::Yes,
                promotion_score: 10101,
            },
            new: ResourceState {
                role: drbd_reactor::drbd::Role::Primary,
                may_promote: Tri::No,
                promotion_score: 0,
            },
        },
        state: Arc::new(r),
    }
}

#[test]
fn environment_of_a_resource_rule_is_complete_and_verbatim() {
    let nasty = "a b'c\"$(touch /tmp/pwned);`id`;d";
    let c = policy(&format!(
        "resource:\n- name: r\n  {CMD}\n  env:\n    GREETING: {}\n    PATH: /opt/bin\n",
        serde_json::to_string(nasty).unwrap()
    ));
    let u = resource_update(nasty);
    let env = build_env(
        EnvCtx {
            node_name: "node 1",
            policy: "t",
        },
        &c.rules[0],
        &u,
    );
    let got: Vec<(String, String)> = env.into_iter().collect();
    let want: Vec<(String, String)> = [
        ("DRBD_BACKING_DEV_0", "/dev/vg/lv"),
        ("DRBD_BACKING_DEV_1", "none"),
        ("DRBD_EVENT_TYPE", "change"),
        ("DRBD_MINOR_0", "1000"),
        ("DRBD_MINOR_1", "1001"),
        ("DRBD_NEW_MAY_PROMOTE", "false"),
        ("DRBD_NEW_PROMOTION_SCORE", "0"),
        ("DRBD_NEW_ROLE", "Primary"),
        ("DRBD_NODE_NAME", "node 1"),
        ("DRBD_OLD_MAY_PROMOTE", "true"),
        ("DRBD_OLD_PROMOTION_SCORE", "10101"),
        ("DRBD_OLD_ROLE", "Secondary"),
        ("DRBD_POLICY_NAME", "t"),
        ("DRBD_RES_NAME", nasty),
        ("DRBD_RULE_NAME", "r"),
        ("GREETING", nasty),
        ("HOME", "/"),
        ("PATH", "/opt/bin"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(got, want);
    // without a PATH of its own a rule gets the minimal one
    let c = policy(&format!("resource:\n- name: r\n  {CMD}\n"));
    let env = build_env(
        EnvCtx {
            node_name: "n",
            policy: "t",
        },
        &c.rules[0],
        &u,
    );
    assert_eq!(env["PATH"], MINIMAL_PATH);
}

#[test]
fn environment_of_every_kind_from_samples() {
    let c = policy(&format!(
        "device:\n- name: d\n  {CMD}\npeerDevice:\n- name: p\n  {CMD}\nconnection:\n- name: c\n  {CMD}\nhelper:\n- name: h\n  {CMD}\n"
    ));
    let ctx = EnvCtx {
        node_name: "n1",
        policy: "t",
    };
    let mut ups = updates_of(&sample("drbd-utils_events2-sync"));
    ups.extend(updates_of(&sample("drbd-utils_events2-all-create-helper")));
    let env_of = |pred: &dyn Fn(&Update) -> bool| {
        let u = ups.iter().rev().find(|u| pred(u)).unwrap();
        let r = c.rules.iter().find(|r| r.matches(u)).unwrap();
        build_env(ctx, r, u)
    };
    let check = |env: &std::collections::BTreeMap<String, String>, want: &[(&str, &str)]| {
        for (k, v) in want {
            assert_eq!(env.get(*k).map(String::as_str), Some(*v), "{k} in {env:?}");
        }
    };
    let dev = env_of(&|u| matches!(u.change, Change::Device { .. }) && u.event == Verb::Change);
    check(
        &dev,
        &[
            ("DRBD_RES_NAME", "some-resource"),
            ("DRBD_VOLUME", "0"),
            ("DRBD_MINOR", "1000"),
            ("DRBD_MINOR_0", "1000"),
            ("DRBD_BACKING_DEV", "/dev/sda"),
            ("DRBD_BACKING_DEV_0", "/dev/sda"),
            ("DRBD_OLD_DISK_STATE", "Diskless"),
            ("DRBD_NEW_DISK_STATE", "UpToDate"),
            ("DRBD_OLD_CLIENT", "false"),
            ("DRBD_NEW_CLIENT", "false"),
            ("DRBD_OLD_QUORUM", "true"),
            ("DRBD_NEW_QUORUM", "true"),
            ("DRBD_OLD_OPEN", "false"),
            ("DRBD_NEW_OPEN", "false"),
            ("DRBD_OLD_SIZE", "0"),
            ("DRBD_NEW_SIZE", "0"),
            ("DRBD_EVENT_TYPE", "change"),
            ("DRBD_NODE_NAME", "n1"),
        ],
    );
    let pd = env_of(&|u| matches!(u.change, Change::PeerDevice { .. }) && u.event == Verb::Change);
    check(
        &pd,
        &[
            ("DRBD_VOLUME", "0"),
            ("DRBD_MINOR", "1000"),
            ("DRBD_BACKING_DEV", "/dev/sda"),
            ("DRBD_PEER_NODE_ID", "1"),
            ("DRBD_CONN_NAME", "some-peer"),
            ("DRBD_OLD_PEER_REPLICATION_STATE", "Off"),
            ("DRBD_NEW_PEER_REPLICATION_STATE", "SyncSource"),
            ("DRBD_OLD_PEER_DISK_STATE", "DUnknown"),
            ("DRBD_NEW_PEER_DISK_STATE", "Inconsistent"),
            ("DRBD_OLD_PEER_CLIENT", "false"),
            ("DRBD_NEW_PEER_CLIENT", "false"),
            ("DRBD_OLD_PEER_RESYNC_SUSPENDED", "no"),
            ("DRBD_NEW_PEER_RESYNC_SUSPENDED", "no"),
        ],
    );
    let conn =
        env_of(&|u| matches!(u.change, Change::Connection { .. }) && u.event == Verb::Change);
    check(
        &conn,
        &[
            ("DRBD_PEER_NODE_ID", "1"),
            ("DRBD_CSTATE", "Connected"),
            ("DRBD_CONN_NAME", "some-peer"),
            ("DRBD_OLD_CONN_NAME", "some-peer"),
            ("DRBD_NEW_CONN_NAME", "some-peer"),
            ("DRBD_OLD_CONN_STATE", "StandAlone"),
            ("DRBD_NEW_CONN_STATE", "Connected"),
            ("DRBD_OLD_PEER_ROLE", "Unknown"),
            ("DRBD_NEW_PEER_ROLE", "Secondary"),
            ("DRBD_OLD_CONGESTED", "unknown"),
            ("DRBD_NEW_CONGESTED", "unknown"),
        ],
    );
    let call = env_of(&|u| u.event == Verb::Call);
    check(
        &call,
        &[
            ("DRBD_HELPER", "before-resync-target"),
            ("DRBD_EVENT_TYPE", "call"),
            ("DRBD_PEER_NODE_ID", "1"),
            ("DRBD_CONN_NAME", "some-peer"),
            ("DRBD_VOLUME", "0"),
            ("DRBD_MINOR", "1000"),
            ("DRBD_HELPER_STATUS", ""),
            ("DRBD_HELPER_EXIT_CODE", ""),
        ],
    );
    let resp = env_of(&|u| u.event == Verb::Response);
    check(
        &resp,
        &[
            ("DRBD_EVENT_TYPE", "response"),
            ("DRBD_HELPER_STATUS", "1"),
            ("DRBD_HELPER_EXIT_CODE", "0"),
        ],
    );
}

#[test]
fn the_replay_of_a_started_instance_is_no_transition() {
    // what a (re)started instance gets first: the state as `exists` updates with default `old`
    let mut e = Engine::new();
    let mut sink = Vec::new();
    for l in sample("drbd-utils_events2-sync")
        .lines()
        .filter(|l| !l.starts_with('#'))
    {
        e.apply_line(l, &mut sink);
    }
    let replay = e.state.replay();
    assert!(replay.iter().all(|u| u.event == Verb::Exists));
    let c = policy(&format!(
        "resource:
- name: guarded
  new: {{mayPromote: true}}
  changed: true
  {CMD}
- name: as-found
  eventType: exists
  new: {{mayPromote: true}}
  {CMD}
peerDevice:
- name: guarded-pd
  changed: [replicationState]
  {CMD}
"
    ));
    assert_eq!(
        fired(&c, &replay),
        ["as-found: exists resource some-resource"]
    );
}

#[test]
fn the_crd_schema_has_the_umh_section() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_string(&drbd_reactor::policy::ReactorPolicy::crd()).unwrap();
    for f in [
        "peerDevice",
        "configMapRef",
        "notEquals",
        "timeoutSeconds",
        "maxConcurrent",
    ] {
        assert!(crd.contains(f), "{f}");
    }
}
