//! The agent on real DRBD: three QEMU guests with the DRBD 9.2 kernel module, real systemd and
//! drbd-utils (tests/common/lab.rs, tests/infra/vm/). The guests boot once for this binary; each case
//! takes the lab's lock and starts from a clean DRBD state.
//!
//! - `state_truth`: after every step of a scripted sequence (up, initial sync, promote, demote, link cut,
//!   write while cut, resync, power cut, quorum loss and regain, reboot and resync, peer down, local
//!   down) every agent's kept state and `/metrics` agree with `drbdsetup status --json` of its guest;
//!   no line of real output is malformed.
//! - `events2_poll_semantics`: what real drbdsetup does with `n` on stdin and at EOF.
//! - `netns`: whether drbdsetup sees DRBD from another network namespace.
//! - `umh_on_real_events`: UMH rules on a real quorum loss and a real kernel helper call.

use serde::Deserialize;

mod common;
#[path = "real_drbd/promoter.rs"]
mod promoter;

use common::lab::Lab;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn lab(test: &str) -> Option<&'static Lab> {
    Lab::shared(3, test)
}

/// r0 on all three guests, quorum majority. DRBD's default timeouts (ping-int 10 s), so the failure
/// detection seen here is what users get.
pub fn res_r0(extra_options: &str, handlers: &str) -> String {
    format!(
        "resource r0 {{
  options {{ auto-promote no; quorum majority; on-no-quorum io-error; {extra_options} }}
  net {{ protocol C; }}
  handlers {{ {handlers} }}
  volume 0 {{ device /dev/drbd0; disk /dev/vdb; meta-disk internal; }}
  on node1 {{ node-id 0; }}
  on node2 {{ node-id 1; }}
  on node3 {{ node-id 2; }}
  connection {{ host node1 address 10.0.12.1:7789; host node2 address 10.0.12.2:7789; }}
  connection {{ host node1 address 10.0.13.1:7789; host node3 address 10.0.13.3:7789; }}
  connection {{ host node2 address 10.0.23.2:7789; host node3 address 10.0.23.3:7789; }}
}}
"
    )
}

/// Writes r0.res on every guest and creates fresh metadata.
fn configure(lab: &Lab, res: &str) {
    for n in 1..=3 {
        lab.write(n, "/etc/drbd.d/r0.res", res, 0o644);
        lab.sh(
            n,
            "yes 2>/dev/null | drbdadm create-md --force r0 >/dev/null 2>&1; drbdadm dump r0 >/dev/null",
        );
    }
}

const METRICS_POLICY: &str = "apiVersion: reactor.drbd.io/v1alpha1
kind: ReactorPolicy
metadata: {name: metrics}
spec:
  prometheus: {enums: true}
";

/// What a view says about a resource, as comparable facts: role; per volume disk, quorum, client; per
/// peer its name, connection state and role; per peer device replication, peer disk and out-of-sync (KiB).
type Facts = BTreeMap<String, String>;

fn tri(v: &Value) -> String {
    match v {
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".into(),
        other => other.to_string(),
    }
}

/// Facts from `drbdsetup status r0 --json` (an empty list when the resource does not exist).
fn facts_drbdsetup(status: &Value) -> Facts {
    let mut f = Facts::new();
    let Some(r) = status.as_array().and_then(|a| a.first()) else {
        return f;
    };
    f.insert("role".into(), s(&r["role"]));
    for d in r["devices"].as_array().into_iter().flatten() {
        let v = &d["volume"];
        f.insert(format!("vol{v} disk"), s(&d["disk-state"]));
        f.insert(format!("vol{v} quorum"), tri(&d["quorum"]));
        f.insert(format!("vol{v} client"), tri(&d["client"]));
    }
    for c in r["connections"].as_array().into_iter().flatten() {
        let p = &c["peer-node-id"];
        f.insert(format!("peer{p} name"), s(&c["name"]));
        f.insert(format!("peer{p} connection"), s(&c["connection-state"]));
        f.insert(format!("peer{p} role"), s(&c["peer-role"]));
        for pd in c["peer_devices"].as_array().into_iter().flatten() {
            let v = &pd["volume"];
            f.insert(
                format!("peer{p}/vol{v} replication"),
                s(&pd["replication-state"]),
            );
            f.insert(
                format!("peer{p}/vol{v} peer-disk"),
                s(&pd["peer-disk-state"]),
            );
            f.insert(format!("peer{p}/vol{v} out-of-sync"), s(&pd["out-of-sync"]));
        }
    }
    f
}

/// Facts from the agent's `/status/resources/r0` (the kept state; `Null` when absent).
fn facts_agent(r: &Value) -> Facts {
    let mut f = Facts::new();
    if r.is_null() {
        return f;
    }
    f.insert("role".into(), s(&r["role"]));
    for (_, d) in r["devices"].as_object().into_iter().flatten() {
        let v = &d["volume"];
        f.insert(format!("vol{v} disk"), s(&d["disk"]));
        f.insert(format!("vol{v} quorum"), s(&d["quorum"]));
        f.insert(format!("vol{v} client"), s(&d["client"]));
    }
    for (_, c) in r["connections"].as_object().into_iter().flatten() {
        let p = &c["peer-node-id"];
        f.insert(format!("peer{p} name"), s(&c["conn-name"]));
        f.insert(format!("peer{p} connection"), s(&c["connection"]));
        f.insert(format!("peer{p} role"), s(&c["peer-role"]));
        for (_, pd) in c["peer-devices"].as_object().into_iter().flatten() {
            let v = &pd["volume"];
            f.insert(format!("peer{p}/vol{v} replication"), s(&pd["replication"]));
            f.insert(format!("peer{p}/vol{v} peer-disk"), s(&pd["peer-disk"]));
            f.insert(format!("peer{p}/vol{v} out-of-sync"), s(&pd["out-of-sync"]));
        }
    }
    f
}

/// One sample of the text exposition: family → [(labels, value)].
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

fn parse_exposition(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (head, value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (head, ""),
        };
        let mut map = BTreeMap::new();
        // label values here never contain `",`
        for kv in labels.split("\",").filter(|x| !x.is_empty()) {
            let (k, v) = kv.split_once("=\"").expect("label");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.entry(name.to_string())
            .or_default()
            .push((map, value.parse().expect("sample value")));
    }
    out
}

/// Facts from `/metrics` (the exporter with `enums: true`); the exporter has no peer-role family, so
/// that fact is taken from the expectation.
fn facts_metrics(m: &Samples, expected: &Facts) -> Facts {
    let mut f = Facts::new();
    let of = |fam: &str| {
        m.get(fam)
            .into_iter()
            .flatten()
            .filter(|(l, _)| l.get("name").map(String::as_str) == Some("r0"))
    };
    for (l, v) in of("drbd_resource_role") {
        if *v == 1.0 {
            f.insert("role".into(), l["drbd_resource_role"].clone());
        }
    }
    for (l, v) in of("drbd_device_state") {
        if *v == 1.0 {
            f.insert(
                format!("vol{} disk", l["volume"]),
                l["drbd_device_state"].clone(),
            );
        }
    }
    for (l, v) in of("drbd_device_quorum") {
        f.insert(
            format!("vol{} quorum", l["volume"]),
            if *v == 1.0 { "yes" } else { "no" }.into(),
        );
    }
    for (l, v) in of("drbd_device_client") {
        f.insert(
            format!("vol{} client", l["volume"]),
            if *v == 1.0 { "yes" } else { "no" }.into(),
        );
    }
    for (l, v) in of("drbd_connection_state") {
        if *v == 1.0 {
            let p = &l["peer_node_id"];
            f.insert(format!("peer{p} name"), l["conn_name"].clone());
            f.insert(
                format!("peer{p} connection"),
                l["drbd_connection_state"].clone(),
            );
            let role = format!("peer{p} role");
            if let Some(r) = expected.get(&role) {
                f.insert(role, r.clone());
            }
        }
    }
    for (l, v) in of("drbd_peerdevice_replication_state") {
        if *v == 1.0 {
            f.insert(
                format!("peer{}/vol{} replication", l["peer_node_id"], l["volume"]),
                l["drbd_peerdevice_replication_state"].clone(),
            );
        }
    }
    for (l, v) in of("drbd_peerdevice_peer_disk_state") {
        if *v == 1.0 {
            f.insert(
                format!("peer{}/vol{} peer-disk", l["peer_node_id"], l["volume"]),
                l["drbd_peerdevice_peer_disk_state"].clone(),
            );
        }
    }
    for (l, v) in of("drbd_peerdevice_outofsync_bytes") {
        f.insert(
            format!("peer{}/vol{} out-of-sync", l["peer_node_id"], l["volume"]),
            format!("{}", (*v as u64) / 1024),
        );
    }
    f
}

fn diff(a: &Facts, b: &Facts) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: drbdsetup {:?} agent {:?}", a.get(k), b.get(k)))
        .collect()
}

/// Asserts that guest n's agent agrees with its kernel, polling up to 20 s (the agent follows the
/// kernel by a few milliseconds; out-of-sync counters reach it with the next statistics poll).
fn assert_agrees(lab: &Lab, n: usize, step: &str) -> Facts {
    let t0 = Instant::now();
    loop {
        let out = lab.sh(
            n,
            "out=$(drbdsetup status r0 --json 2>/dev/null) && echo \"$out\" || echo '[]'; echo '@@@'; \
             curl -s -o /tmp/res.json -w '%{http_code}' localhost:9942/status/resources/r0; echo; cat /tmp/res.json; echo '@@@'; \
             curl -s localhost:9942/metrics",
        );
        let parts: Vec<&str> = out.split("@@@\n").collect();
        assert_eq!(parts.len(), 3, "node{n}: {out}");
        let kernel = facts_drbdsetup(&serde_json::from_str(parts[0]).expect("drbdsetup json"));
        let (code, body) = parts[1].split_once('\n').expect("http code");
        let agent_state = if code.trim() == "404" {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("node{n} state: {e}: {body}"))
        };
        let agent = facts_agent(&agent_state);
        let metrics = facts_metrics(&parse_exposition(parts[2]), &kernel);
        let d1 = diff(&kernel, &agent);
        let d2 = diff(&kernel, &metrics);
        if d1.is_empty() && d2.is_empty() {
            eprintln!(
                "[{step}] node{n} agrees ({} facts, {:.1} s)",
                kernel.len(),
                t0.elapsed().as_secs_f64()
            );
            return kernel;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            panic!(
                "[{step}] node{n}: the agent disagrees with drbdsetup status --json\nkept state: {d1:#?}\n/metrics: {d2:#?}\nagent log:\n{}",
                lab.agent_log(n)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn all_agree(lab: &Lab, nodes: &[usize], step: &str) -> Vec<Facts> {
    nodes.iter().map(|&n| assert_agrees(lab, n, step)).collect()
}

fn malformed(lab: &Lab, n: usize) -> (u64, u64) {
    let st = lab.http_json(n, "/status");
    (
        st["source"]["lines"].as_u64().unwrap_or(0),
        st["source"]["malformedLines"].as_u64().unwrap_or(u64::MAX),
    )
}

const CONNECTED_ALL: &str =
    "[ \"$(drbdadm cstate r0 2>/dev/null | tr ' ' '\\n' | sort -u)\" = Connected ]";
const UPTODATE_ALL: &str =
    "[ \"$(drbdadm dstate r0 2>/dev/null | tr '/' '\\n' | sort -u)\" = UpToDate ]";

fn quorum_is(v: bool) -> String {
    format!("[ \"$(drbdsetup status r0 --json | jq -r '.[0].devices[0].quorum')\" = {v} ]")
}

/// Saves a capture with a `# source:` line under target/real-drbd/ (the golden inputs in
/// tests/data/events2/ were taken from there).
fn save_capture(name: &str, what: &str, text: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/real-drbd");
    std::fs::create_dir_all(&dir).expect("target/real-drbd");
    let body = format!(
        "# source: real DRBD 9.2.18 kernel module in QEMU guests (Debian's kernel, TCG), drbd-utils from Debian, captured by tests/real_drbd.rs: {what}\n{text}"
    );
    std::fs::write(dir.join(format!("{name}.txt")), body).expect("write capture");
}

/// The same sequence on the simulator (tests/data/sim/real-drbd-9.2.18_state-truth.yaml, written after
/// this test's steps) gives node1 the same states, object by object, as this live run of real DRBD
/// (tests/common/faithful.rs leaves out timing, statistics, sizes and minors; docs/simulator.md lists
/// what else legitimately differs).
fn sim_agrees(real: &str) {
    use common::faithful::{compare_named, Normalize};
    use drbd_reactor::sim::scenario::{run_captured, Scenario};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/sim/real-drbd-9.2.18_state-truth.yaml"
    );
    let sc: Scenario = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = drbd_reactor::sim::store::Store::new(dir.path());
    let mut log = Vec::new();
    let (r, caps) = run_captured(&store, &sc, &mut log);
    r.unwrap_or_else(|e| panic!("{path}: {e}\n{}", String::from_utf8_lossy(&log)));
    let sim = &caps
        .get("ev2-state-truth")
        .expect("the scenario captures node1")
        .text;
    let report = compare_named(
        "drbd-sim",
        sim,
        "real DRBD (this run)",
        real,
        &Normalize::default(),
    );
    eprintln!(
        "simulator vs this run of real DRBD: {} objects compared",
        report.objects.len()
    );
    for t in &report.truncated {
        eprintln!("  {t}");
    }
    assert!(
        report.is_same(),
        "the simulator differs from this run of real DRBD:\n{report}"
    );
}

#[test]
fn state_truth() {
    let Some(lab) = lab("state_truth") else {
        return;
    };
    let _case = lab.case();
    lab.reset();
    configure(lab, &res_r0("", ""));
    for n in 1..=3 {
        lab.set_policies(n, &[("metrics.yaml", METRICS_POLICY)]);
        let t = lab.start_agent(n, "--statistics-interval 1");
        eprintln!("node{n}: agent ready after {:.1} s", t.as_secs_f64());
    }
    let cap = lab.events2_capture(1, "--full --poll");
    all_agree(lab, &[1, 2, 3], "before up (no resource)");

    for n in 1..=3 {
        lab.sh(n, "drbdadm up r0");
    }
    for n in 1..=3 {
        lab.wait(
            n,
            "all connections Connected",
            CONNECTED_ALL,
            Duration::from_secs(120),
        );
    }
    let f = all_agree(lab, &[1, 2, 3], "up");
    assert_eq!(f[0]["vol0 disk"], "Inconsistent");

    lab.sh(1, "drbdadm primary --force r0");
    for n in [2, 3] {
        lab.wait(
            n,
            "initial sync done",
            UPTODATE_ALL,
            Duration::from_secs(300),
        );
    }
    let f = all_agree(lab, &[1, 2, 3], "initial sync");
    assert_eq!(f[0]["role"], "Primary");

    lab.sh(1, "drbdadm secondary r0");
    all_agree(lab, &[1, 2, 3], "demote");
    lab.sh(2, "drbdadm primary r0");
    let f = all_agree(lab, &[1, 2, 3], "promote node2");
    assert_eq!(f[0]["peer1 role"], "Primary");
    lab.sh(2, "drbdadm secondary r0");
    lab.sh(1, "drbdadm primary r0");
    all_agree(lab, &[1, 2, 3], "promote node1");

    lab.cut(1, 2);
    lab.wait(
        1,
        "node2 lost",
        "[ \"$(drbdadm cstate r0:node2)\" != Connected ]",
        Duration::from_secs(60),
    );
    lab.sh(
        1,
        "dd if=/dev/urandom of=/dev/drbd0 bs=1M count=4 oflag=direct 2>&1 | tail -1",
    );
    let f = all_agree(lab, &[1, 2, 3], "link 1-2 cut, 4 MiB written");
    assert_ne!(
        f[0]["peer1/vol0 out-of-sync"], "0",
        "writes while cut leave out-of-sync blocks"
    );

    lab.heal(1, 2);
    lab.wait(
        2,
        "resync after the link is back",
        UPTODATE_ALL,
        Duration::from_secs(120),
    );
    lab.wait(
        1,
        "node1 sees node2 UpToDate",
        UPTODATE_ALL,
        Duration::from_secs(60),
    );
    all_agree(lab, &[1, 2, 3], "resync");

    lab.power_cut(2);
    lab.wait(
        1,
        "node2 gone",
        "[ \"$(drbdadm cstate r0:node2)\" != Connected ]",
        Duration::from_secs(60),
    );
    lab.wait(
        3,
        "node2 gone",
        "[ \"$(drbdadm cstate r0:node2)\" != Connected ]",
        Duration::from_secs(60),
    );
    all_agree(lab, &[1, 3], "power cut of node2");

    lab.cut(1, 3);
    lab.wait(1, "quorum lost", &quorum_is(false), Duration::from_secs(60));
    lab.wait(3, "quorum lost", &quorum_is(false), Duration::from_secs(60));
    let f = all_agree(lab, &[1, 3], "quorum lost");
    assert_eq!(f[0]["vol0 quorum"], "no");

    lab.heal(1, 3);
    lab.wait(1, "quorum back", &quorum_is(true), Duration::from_secs(60));
    all_agree(lab, &[1, 3], "quorum back");

    lab.restart(2);
    lab.set_policies(2, &[("metrics.yaml", METRICS_POLICY)]);
    lab.start_agent(2, "--statistics-interval 1");
    lab.sh(2, "drbdadm up r0");
    lab.wait(2, "node2 resynced", UPTODATE_ALL, Duration::from_secs(180));
    lab.wait(
        1,
        "node1 sees everyone UpToDate",
        UPTODATE_ALL,
        Duration::from_secs(60),
    );
    all_agree(lab, &[1, 2, 3], "node2 back and resynced");

    lab.sh(3, "drbdadm down r0");
    all_agree(lab, &[1, 2, 3], "node3 down");
    lab.sh(1, "drbdadm secondary r0; drbdadm down r0");
    let f = all_agree(lab, &[1, 2], "node1 down (resource destroyed)");
    assert!(f[0].is_empty(), "node1 has no resource any more");

    for n in 1..=3 {
        let (lines, bad) = malformed(lab, n);
        eprintln!("node{n}: {lines} events2 lines, {bad} malformed");
        assert!(lines > 0);
        assert_eq!(bad, 0, "node{n}: malformed lines in real drbdsetup output");
    }
    let text = cap.stop();
    // saved first, so that a run the simulator disagrees with can be looked at
    save_capture(
        "state-truth-node1-full",
        "events2 --full --poll on node1 during state_truth: up, initial sync, demote/promote, link 1-2 cut with 4 MiB written, resync, node2 power cut, link 1-3 cut (quorum lost), healed, node2 reboot and resync, node3 down, node1 down",
        &text,
    );
    sim_agrees(&text);
    for n in 1..=3 {
        lab.stop_agent(n);
    }
}

#[test]
fn events2_poll_semantics() {
    let Some(lab) = lab("events2_poll_semantics") else {
        return;
    };
    let _case = lab.case();
    lab.reset();
    configure(lab, &res_r0("", ""));
    for n in 1..=3 {
        lab.sh(n, "drbdadm up r0");
    }
    lab.wait(1, "Connected", CONNECTED_ALL, Duration::from_secs(120));

    // --poll without --now: `n` prints changed statistics only, no second dump.
    let c = lab.events2_capture(1, "--full --poll");
    lab.wait(
        1,
        "initial dump",
        "grep -q '^exists -' /root/cap/*.txt",
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = c.text();
    c.poll();
    std::thread::sleep(Duration::from_secs(1));
    let after = c.text();
    let new = &after[before.len()..];
    assert_eq!(before.matches("exists -").count(), 1);
    assert!(!new.contains("exists"), "n re-dumped the state: {new}");
    // drbdsetup exits when its stdin reaches EOF, with exit code 0.
    assert_eq!(
        c.close_stdin(),
        Some(0),
        "drbdsetup events2 --poll exits at EOF on stdin"
    );

    // --now --poll: every `n` prints a complete dump ending in `exists -`.
    let c = lab.events2_capture(1, "--now --full --poll");
    std::thread::sleep(Duration::from_secs(1));
    c.poll();
    std::thread::sleep(Duration::from_secs(1));
    let text = c.stop();
    assert_eq!(text.matches("exists -").count(), 2, "{text}");
    for n in 1..=3 {
        lab.sh(n, "drbdadm down r0");
    }
}

/// Piraeus runs its reactor in the satellite pod's network namespace. Does drbdsetup see DRBD from a
/// network namespace other than the initial one? The answer decides the default `--drbdsetup`.
#[test]
fn netns() {
    let Some(lab) = lab("netns") else { return };
    let _case = lab.case();
    lab.reset();
    configure(lab, &res_r0("", ""));
    lab.sh(1, "drbdadm up r0");
    let host = lab.sh(1, "drbdsetup events2 --now r0");
    assert!(host.contains("exists resource name:r0"), "{host}");
    // A dump and the live stream, from a network namespace of its own.
    let other = lab.sh(
        1,
        "ip netns add lab-ns
         ip netns exec lab-ns drbdsetup events2 --now r0 > /tmp/ns-now.txt 2>&1; echo \"now rc=$?\"
         (sleep 30 | ip netns exec lab-ns drbdsetup events2 r0 > /tmp/ns-live.txt 2>&1 &)
         sleep 1; drbdadm down r0; sleep 1
         ip netns del lab-ns
         echo '--- now'; cat /tmp/ns-now.txt; echo '--- live'; cat /tmp/ns-live.txt",
    );
    eprintln!("drbdsetup events2 in another network namespace:\n{other}");
    let (now, live) = other.split_once("--- live").expect("both parts");
    // What DRBD 9.2 does: its generic-netlink family is available in every network namespace, so a
    // drbdsetup in the pod's own namespace sees every resource and its changes (the default
    // --drbdsetup enters the host's mount and UTS namespaces only; docs/real-drbd.md).
    assert!(
        now.contains("now rc=0") && now.contains("exists resource name:r0"),
        "{other}"
    );
    assert!(live.contains("destroy resource name:r0"), "{other}");

    // The default install's capabilities (manifests/daemonset.yaml: all dropped, then a few added)
    // are enough for the default --drbdsetup from a pod's own mount, UTS and network namespaces, and
    // each of them is needed.
    let caps = default_pod_capabilities();
    assert!(
        !caps.is_empty(),
        "manifests/daemonset.yaml adds no capability"
    );
    let run_with = |caps: &[String]| {
        let set: String = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        lab.exec(
            1,
            &format!(
                "unshare --mount --uts --net -- setpriv --bounding-set {set} --inh-caps {set} -- \
                   nsenter --target 1 --mount --uts -- drbdsetup events2 --now r0 2>&1"
            ),
        )
    };
    lab.sh(1, "drbdadm up r0");
    let out = run_with(&caps).unwrap_or_else(|e| panic!("with {caps:?}: {e}"));
    assert!(
        out.contains("exists resource name:r0"),
        "with {caps:?}: {out}"
    );
    eprintln!(
        "the default pod's capabilities {caps:?} read DRBD's events2 from namespaces of their own"
    );
    for c in &caps {
        let fewer: Vec<String> = caps.iter().filter(|x| *x != c).cloned().collect();
        let r = run_with(&fewer);
        assert!(
            r.as_ref().map_or(true, |o| !o.contains("exists resource")),
            "without {c} it still works, so the default pod need not have it: {r:?}"
        );
    }
    lab.sh(1, "drbdadm down r0");
}

/// The capabilities the default install (exporter only) adds to its container.
fn default_pod_capabilities() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/daemonset.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        if v["kind"] == "DaemonSet" {
            let add = &v["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["capabilities"]["add"];
            return add
                .as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|c| c.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    panic!("{path}: no DaemonSet");
}

const UMH_POLICY: &str = "apiVersion: reactor.drbd.io/v1alpha1
kind: ReactorPolicy
metadata: {name: umh-real}
spec:
  umh:
    device:
      - name: quorum-lost
        eventType: change
        old: {quorum: true}
        new: {quorum: false}
        command: [sh, -c, 'echo \"$DRBD_RES_NAME $DRBD_VOLUME quorum-lost\" >> /run/umh.log']
    helper:
      - name: resync-target
        helper: before-resync-target
        eventType: call
        command: [sh, -c, 'echo \"$DRBD_RES_NAME $DRBD_HELPER $DRBD_PEER_NODE_ID\" >> /run/umh.log']
";

#[test]
fn umh_on_real_events() {
    let Some(lab) = lab("umh_on_real_events") else {
        return;
    };
    let _case = lab.case();
    lab.reset();
    // the kernel calls before-resync-target on a SyncTarget; drbdadm runs this handler
    configure(
        lab,
        &res_r0(
            "",
            "before-resync-target \"/bin/sh -c 'echo called >> /run/handler.log'\";",
        ),
    );
    lab.sh(3, "rm -f /run/umh.log /run/handler.log");
    lab.set_policies(3, &[("umh.yaml", UMH_POLICY)]);
    lab.start_agent(3, "");
    for n in 1..=3 {
        lab.sh(n, "drbdadm up r0");
    }
    lab.wait(3, "Connected", CONNECTED_ALL, Duration::from_secs(120));
    lab.sh(1, "drbdadm primary --force r0");
    lab.wait(3, "synced", UPTODATE_ALL, Duration::from_secs(300));
    lab.wait(
        3,
        "the rule ran",
        "grep -q before-resync-target /run/umh.log 2>/dev/null",
        Duration::from_secs(20),
    );
    // quorum loss on node3: both of its links cut
    lab.isolate(3);
    lab.wait(3, "quorum lost", &quorum_is(false), Duration::from_secs(60));
    lab.wait(
        3,
        "the quorum rule ran",
        "grep -q quorum-lost /run/umh.log 2>/dev/null",
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    let log = lab.sh(
        3,
        "cat /run/umh.log; echo ---; cat /run/handler.log 2>/dev/null; true",
    );
    eprintln!("UMH log on node3:\n{log}");
    let (umh, handler) = log.split_once("---").unwrap();
    assert_eq!(umh.matches("r0 before-resync-target").count(), 1, "{log}");
    assert_eq!(umh.matches("r0 0 quorum-lost").count(), 1, "{log}");
    assert!(
        handler.contains("called"),
        "the kernel really called the handler: {log}"
    );
    lab.heal_all();
    lab.stop_agent(3);
    for n in 1..=3 {
        lab.sh(n, "drbdadm secondary r0 2>/dev/null; drbdadm down r0");
    }
}
