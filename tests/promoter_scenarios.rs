//! Issue #6 scenarios: three simulated DRBD nodes sharing one `drbd-sim` cluster, each with its own real
//! systemd (tests/common/systemd.rs: private namespaces, a bus inside) and its own agent process driving it
//! over D-Bus. The generated units run inside those systemds and call the simulator as their drbdsetup,
//! so DRBD arbitrates promotion races exactly as on real nodes. Each scenario asserts which node runs the
//! services and that `/status` explains it.

mod common;

use common::agent::collect;
use common::systemd::{BootOptions, SystemdNs};
use common::{free_port, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");
const SIM: &str = env!("CARGO_BIN_EXE_drbd-sim");
const LONG: Duration = Duration::from_secs(120);

/// A long-running service: what "the services" are in these scenarios.
const SVC: &str = "[Unit]\nDescription=test service\n[Service]\nExecStart=/bin/sleep infinity\n";

struct Agent {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    name: String,
    ns: Option<SystemdNs>,
    agent: Option<Agent>,
}

struct Cluster {
    test: String,
    /// The simulated cluster's journal: bind-mounted into every node's systemd at the same path.
    dir: tempfile::TempDir,
    /// One policy directory all agents read.
    policies: tempfile::TempDir,
    /// OCF_ROOT for the OCF scenario, and other files units run (bound read-only into each systemd).
    share: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Extra agent flags.
    extra: Vec<String>,
}

impl Cluster {
    /// Boots one systemd per node; `None` (skipped) when this machine cannot.
    fn new(test: &str, names: &[&str]) -> Option<Cluster> {
        let dir = tempfile::tempdir().unwrap();
        let share = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for n in names {
            let ns = SystemdNs::boot_with(
                &format!("{test}/{n}"),
                &BootOptions {
                    bind: vec![dir.path().to_path_buf()],
                    bind_ro: vec![share.path().to_path_buf()],
                    name: Some(n.to_string()),
                },
            )?;
            nodes.push(Node {
                name: n.to_string(),
                ns: Some(ns),
                agent: None,
            });
        }
        let c = Cluster {
            test: test.to_string(),
            dir,
            policies: tempfile::tempdir().unwrap(),
            share,
            nodes,
            extra: Vec::new(),
        };
        c.ctl(&["init"]);
        Some(c)
    }

    fn sim_cmd(&self, node: &str) -> String {
        format!(
            "{SIM} --cluster {} --node {node}",
            self.dir.path().display()
        )
    }

    /// `drbd-sim ctl ARGS`; panics when it fails.
    fn ctl(&self, args: &[&str]) -> Output {
        let o = Command::new(SIM)
            .arg("--cluster")
            .arg(self.dir.path())
            .arg("ctl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// A 3-way resource with the options the promoter recommends (quorum majority, auto-promote off).
    fn create(&self, res: &str, opts: &[&str]) {
        let nodes = self
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec!["create", res, "--nodes", &nodes];
        for o in ["quorum=majority", "auto-promote=no"]
            .iter()
            .chain(opts.iter())
        {
            args.push("-o");
            args.push(o);
        }
        self.ctl(&args);
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn ns(&self, name: &str) -> &SystemdNs {
        self.node(name).ns.as_ref().expect("node's systemd is up")
    }

    /// Writes a unit into every node's systemd.
    fn unit_everywhere(&self, name: &str, content: &str) {
        for n in &self.nodes {
            if let Some(ns) = &n.ns {
                ns.write_unit(name, content);
            }
        }
    }

    fn write_policy(&self, file: &str, yaml: &str) {
        let tmp = self.policies.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, self.policies.path().join(file)).unwrap();
    }

    fn remove_policy(&self, file: &str) {
        std::fs::remove_file(self.policies.path().join(file)).unwrap();
    }

    fn start_agent(&mut self, name: &str) {
        let i = self.nodes.iter().position(|n| n.name == name).unwrap();
        let ns = self.nodes[i].ns.as_ref().expect("node's systemd is up");
        let port = free_port();
        let sim = self.sim_cmd(name);
        let host_exec = ns.host_exec().join(" ");
        let mut child = Command::new(AGENT)
            .arg("agent")
            .arg("--policy-dir")
            .arg(self.policies.path())
            .arg("--node-name")
            .arg(name)
            .arg("--drbdsetup")
            .arg(&sim)
            .arg("--drbdadm")
            .arg("true")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--systemd-bus")
            .arg(&ns.bus)
            .arg("--unit-dir")
            .arg(&ns.unit_dir)
            .arg("--units-drbdsetup")
            .arg(&sim)
            .arg("--units-ocf-root")
            .arg(self.share.path().join("ocf"))
            .arg("--host-exec")
            .arg(&host_exec)
            .arg("--umh-script-dir")
            .arg(ns.run_dir.join("umh"))
            .args(&self.extra)
            .env("RUST_LOG", "info,drbd_reactor::plugins::promoter=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = collect(child.stderr.take().unwrap());
        self.nodes[i].agent = Some(Agent {
            child,
            port,
            stderr,
        });
    }

    fn start_agents(&mut self) {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for n in names {
            self.start_agent(&n);
        }
    }

    /// A node crash: its agent and its systemd (with every service) die, DRBD sees the node go down.
    fn crash(&mut self, name: &str) {
        let i = self.nodes.iter().position(|n| n.name == name).unwrap();
        self.nodes[i].agent = None;
        self.nodes[i].ns = None;
        self.ctl(&["node-down", name]);
    }

    /// The node boots again: a fresh systemd (units written again by `units`), DRBD up, the agent.
    fn reboot(&mut self, name: &str, units: &[(&str, &str)]) {
        let i = self.nodes.iter().position(|n| n.name == name).unwrap();
        let ns = SystemdNs::boot_with(
            &format!("{}/{name}", self.test),
            &BootOptions {
                bind: vec![self.dir.path().to_path_buf()],
                bind_ro: vec![self.share.path().to_path_buf()],
                name: Some(name.to_string()),
            },
        )
        .expect("rebooting a node's systemd");
        for (u, c) in units {
            ns.write_unit(u, c);
        }
        self.nodes[i].ns = Some(ns);
        self.ctl(&["node-up", name]);
        self.start_agent(name);
    }

    /// Names of the nodes where `unit` is active, by asking each systemd.
    fn running(&self, unit: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| {
                n.ns.as_ref()
                    .is_some_and(|ns| ns.show(unit, "ActiveState") == "active")
            })
            .map(|n| n.name.clone())
            .collect()
    }

    /// The DRBD role of `res` on `node`, from the simulator.
    fn role(&self, node: &str, res: &str) -> String {
        let o = Command::new(SIM)
            .args(["--cluster"])
            .arg(self.dir.path())
            .args(["--node", node, "status", res, "--json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v[0]["role"].as_str().unwrap_or("?").to_string()
    }

    fn primaries(&self, res: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.ns.is_some() && self.role(&n.name, res) == "Primary")
            .map(|n| n.name.clone())
            .collect()
    }

    fn status(&self, node: &str) -> Value {
        let Some(a) = &self.node(node).agent else {
            return Value::Null;
        };
        reqwest::blocking::get(format!("http://127.0.0.1:{}/status", a.port))
            .ok()
            .and_then(|r| r.text().ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    /// The promoter's explanation of `res` on `node` (`/status` → plugins[].detail.resources[]).
    fn explain(&self, node: &str, res: &str) -> Value {
        let st = self.status(node);
        for p in st["plugins"].as_array().into_iter().flatten() {
            for r in p["detail"]["resources"].as_array().into_iter().flatten() {
                if r["name"] == res {
                    return r.clone();
                }
            }
        }
        Value::Null
    }

    fn diagnostics(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!("==== {} ====\n", n.name));
            if let Some(a) = &n.agent {
                let l = a.stderr.lock().unwrap();
                s.push_str(&l[l.len().saturating_sub(40)..].join("\n"));
                s.push('\n');
            }
            s.push_str(&format!("status: {}\n", self.status(&n.name)));
            if let Some(ns) = &n.ns {
                s.push_str(&format!("systemd log:\n{}\n", ns.log_tail()));
            }
        }
        s
    }

    /// Waits until `f` holds; panics with every node's logs and status otherwise.
    fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Cluster) -> bool) {
        if !wait_until(timeout, || f(self)) {
            panic!(
                "{}: timed out waiting for {what}\n{}",
                self.test,
                self.diagnostics()
            );
        }
    }

    /// `f` holds for all of `d` (checked every 250 ms).
    fn holds(&self, what: &str, d: Duration, mut f: impl FnMut(&Cluster) -> bool) {
        let t = Instant::now();
        while t.elapsed() < d {
            if !f(self) {
                panic!(
                    "{}: {what} stopped holding\n{}",
                    self.test,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn file(&self, node: &str, rel: &str) -> PathBuf {
        self.ns(node).run_path(rel)
    }
}

fn policy(name: &str, resources_yaml: &str) -> String {
    format!(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n  promoter:\n    resources:\n{}",
        resources_yaml
            .lines()
            .map(|l| format!("      {l}\n"))
            .collect::<String>()
    )
}

fn exactly_one(v: &[String]) -> Option<String> {
    (v.len() == 1).then(|| v[0].clone())
}

/// Three nodes, resource r0 with one long-running service, agents started; returns the node that runs it
/// once exactly one does (and is DRBD Primary).
fn three_nodes_running(
    test: &str,
    extra_yaml: &str,
    res_opts: &[&str],
) -> Option<(Cluster, String)> {
    let mut c = Cluster::new(test, &["n1", "n2", "n3"])?;
    c.create("r0", res_opts);
    c.unit_everywhere("svc.service", SVC);
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            &format!(
                "- name: r0\n  start: [svc.service]\n  adjustResourceOnStart: false\n{extra_yaml}"
            ),
        ),
    );
    c.start_agents();
    c.wait("the services on exactly one node", LONG, |c| {
        exactly_one(&c.running("svc.service")).is_some()
    });
    let active = exactly_one(&c.running("svc.service")).unwrap();
    assert_eq!(
        c.primaries("r0"),
        vec![active.clone()],
        "services run where DRBD is Primary"
    );
    Some((c, active))
}

/// The status of every node agrees with where the services run: `active` there, `standby` elsewhere with
/// the Primary named.
fn assert_explained(c: &Cluster, active: &str) {
    c.wait("/status to explain the placement", LONG, |c| {
        c.nodes.iter().filter(|n| n.agent.is_some()).all(|n| {
            let e = c.explain(&n.name, "r0");
            if n.name == active {
                e["state"] == "active"
            } else {
                e["state"] == "standby" && e["reason"].as_str().is_some_and(|r| r.contains(active))
            }
        })
    });
}

#[test]
fn first_start_runs_on_exactly_one_of_three_nodes() {
    let Some((c, active)) = three_nodes_running("first_start", "", &[]) else {
        return;
    };
    assert_explained(&c, &active);
    // And it stays that way: no second start, no flapping.
    c.holds(
        "exactly one node running the services",
        Duration::from_secs(5),
        |c| c.running("svc.service") == vec![active.clone()],
    );
    // The generated units are the upstream model: the target and the promote unit are active too.
    let ns = c.ns(&active);
    assert_eq!(ns.show("drbd-services@r0.target", "ActiveState"), "active");
    assert_eq!(ns.show("drbd-promote@r0.service", "ActiveState"), "active");
}

#[test]
fn primary_crash_moves_the_services() {
    let Some((mut c, first)) = three_nodes_running("primary_crash", "", &[]) else {
        return;
    };
    c.crash(&first);
    c.wait("another node taking over", LONG, |c| {
        exactly_one(&c.running("svc.service")).is_some_and(|n| n != first)
    });
    let second = exactly_one(&c.running("svc.service")).unwrap();
    assert_eq!(c.primaries("r0"), vec![second.clone()]);
    assert_explained(&c, &second);
}

#[test]
fn quorum_loss_stops_the_minority_and_the_majority_takes_over_and_healing_keeps_one() {
    let Some((c, first)) = three_nodes_running("quorum_loss", "", &["on-no-quorum=io-error"])
    else {
        return;
    };
    let others: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .filter(|n| *n != first)
        .collect();
    for o in &others {
        c.ctl(&["cut", &first, o]);
    }
    c.wait(
        "the services off the minority node and on one majority node",
        LONG,
        |c| exactly_one(&c.running("svc.service")).is_some_and(|n| n != first),
    );
    let second = exactly_one(&c.running("svc.service")).unwrap();
    c.wait("the minority node explaining itself", LONG, |c| {
        let e = c.explain(&first, "r0");
        e["state"] != "active" && e["reason"].as_str().is_some_and(|r| r.contains("quorum"))
    });
    assert_eq!(
        c.role(&first, "r0"),
        "Secondary",
        "stopping the services demoted DRBD"
    );
    for o in &others {
        c.ctl(&["heal", &first, o]);
    }
    c.holds(
        "exactly one node after healing",
        Duration::from_secs(10),
        |c| c.running("svc.service") == vec![second.clone()],
    );
    assert_explained(&c, &second);
}

fn failback(test: &str, policy_kind: &str) -> Option<(Cluster, String)> {
    let mut c = Cluster::new(test, &["n1", "n2", "n3"])?;
    c.create("r0", &[]);
    c.unit_everywhere("svc.service", SVC);
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            &format!(
                "- name: r0\n  start: [svc.service]\n  adjustResourceOnStart: false\n  preferredNodes: [n1, n2, n3]\n  preferredNodesPolicy: {policy_kind}\n"
            ),
        ),
    );
    c.start_agents();
    c.wait("the services on the most preferred node", LONG, |c| {
        c.running("svc.service") == ["n1"]
    });
    c.crash("n1");
    c.wait("a less preferred node taking over", LONG, |c| {
        exactly_one(&c.running("svc.service")).is_some()
    });
    let second = exactly_one(&c.running("svc.service")).unwrap();
    c.reboot("n1", &[("svc.service", SVC)]);
    // n1 is back with UpToDate data.
    c.wait("n1 UpToDate again", LONG, |c| {
        let o = Command::new(SIM)
            .arg("--cluster")
            .arg(c.dir.path())
            .args(["--node", "n1", "status", "r0", "--json"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        v[0]["devices"][0]["disk-state"] == "UpToDate"
    });
    Some((c, second))
}

#[test]
fn preferred_node_returns_and_the_services_fail_back() {
    let Some((c, _second)) = failback("failback_always", "always") else {
        return;
    };
    c.wait("the services back on n1", LONG, |c| {
        c.running("svc.service") == ["n1"]
    });
    assert_eq!(c.primaries("r0"), ["n1"]);
    assert_explained(&c, "n1");
}

#[test]
fn preferred_node_returns_but_start_only_keeps_the_services_where_they_are() {
    let Some((c, second)) = failback("failback_start_only", "startOnly") else {
        return;
    };
    // n1's agent sees the Primary and stands by; nothing moves.
    c.wait("n1 standing by", LONG, |c| {
        c.explain("n1", "r0")["state"] == "standby"
    });
    c.holds("the services staying put", Duration::from_secs(15), |c| {
        c.running("svc.service") == vec![second.clone()]
    });
    assert_explained(&c, &second);
}

/// A demotion that fails even after retrying runs the escalation unit, whose `FailureAction=` is the
/// harmless `exit` here: the node's systemd exits (the stand-in for a reboot), which the test sees.
#[test]
fn demote_failure_runs_the_escalation_action() {
    let yaml = "  onDrbdDemoteFailure: exit\n  secondaryForce: false\n";
    let Some((mut c, first)) = three_nodes_running("demote_failure", yaml, &[]) else {
        return;
    };
    let pid = c.ns(&first).pid;
    // Someone holds the device open: `drbdsetup secondary` fails (-12) and there is no --force.
    c.ctl(&["open", &first, "r0"]);
    // Evicting the node makes it stop its services, which demotes.
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            &format!(
                "- name: r0\n  start: [svc.service]\n  adjustResourceOnStart: false\n  evict: [{first}]\n{yaml}"
            ),
        ),
    );
    c.wait(
        "the escalation's FailureAction=exit ending that systemd",
        LONG,
        |_| !Path::new(&format!("/proc/{pid}")).exists(),
    );
    let log = c.ns(&first).journal();
    assert!(
        log.lines()
            .any(|l| l.contains("drbd-demote-or-escalate@r0.service")
                && l.contains("Failed with result")),
        "the escalation unit ran and failed; journal:\n{log}"
    );
    assert_eq!(c.role(&first, "r0"), "Primary", "DRBD could not be demoted");
    // What a reboot would then do: the node goes down, another one takes over.
    c.crash(&first);
    c.wait("another node taking over after the reboot", LONG, |c| {
        exactly_one(&c.running("svc.service")).is_some_and(|n| n != first)
    });
}

/// `onQuorumLoss: freeze`: all links cut (nobody has quorum, nobody can take over) freezes the services
/// in place; quorum back thaws them, still on the same node.
#[test]
fn quorum_loss_freezes_and_quorum_back_thaws() {
    let opts = [
        "on-no-quorum=suspend-io",
        "on-no-data-accessible=suspend-io",
        "on-suspended-primary-outdated=force-secondary",
        "rr-conflict=retry-connect",
    ];
    let Some((c, first)) = three_nodes_running("freeze_thaw", "  onQuorumLoss: freeze\n", &opts)
    else {
        return;
    };
    let pairs = [("n1", "n2"), ("n1", "n3"), ("n2", "n3")];
    for (a, b) in pairs {
        c.ctl(&["cut", a, b]);
    }
    c.wait("the services frozen", LONG, |c| {
        c.ns(&first).show("svc.service", "FreezerState") == "frozen"
    });
    assert_eq!(
        c.running("svc.service"),
        vec![first.clone()],
        "frozen, not stopped"
    );
    c.wait("the status saying so", LONG, |c| {
        let e = c.explain(&first, "r0");
        e["frozen"] == true && e["reason"].as_str().is_some_and(|r| r.contains("quorum"))
    });
    for (a, b) in pairs {
        c.ctl(&["heal", a, b]);
    }
    c.wait("the services thawed", LONG, |c| {
        c.ns(&first).show("svc.service", "FreezerState") == "running"
    });
    c.holds("still on the same node", Duration::from_secs(5), |c| {
        c.running("svc.service") == vec![first.clone()]
    });
    assert_explained(&c, &first);
}

/// A start unit that always fails: the nodes try, then back off; the services never run and do not
/// ping-pong between nodes at full speed, and the status says why.
#[test]
fn always_failing_start_backs_off_instead_of_ping_ponging() {
    let Some(mut c) = Cluster::new("backoff", &["n1", "n2", "n3"]) else {
        return;
    };
    c.create("r0", &[]);
    c.unit_everywhere(
        "bad.service",
        "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sh -c 'echo x >> /run/bad-starts; exit 1'\n",
    );
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            "- name: r0\n  start: [bad.service]\n  adjustResourceOnStart: false\n",
        ),
    );
    c.start_agents();
    let starts = |c: &Cluster, n: &str| {
        std::fs::read_to_string(c.file(n, "bad-starts"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    c.wait("a node backing off", Duration::from_secs(240), |c| {
        c.nodes.iter().any(|n| {
            c.explain(&n.name, "r0")["reason"]
                .as_str()
                .is_some_and(|r| r.contains("backing off"))
        })
    });
    let backing: Vec<String> = c
        .nodes
        .iter()
        .filter(|n| {
            c.explain(&n.name, "r0")["reason"]
                .as_str()
                .is_some_and(|r| r.contains("backing off"))
        })
        .map(|n| n.name.clone())
        .collect();
    let before: Vec<usize> = backing.iter().map(|n| starts(&c, n)).collect();
    for (n, k) in backing.iter().zip(&before) {
        assert!(*k >= 3, "{n} backs off after {k} failed starts");
    }
    // The base backoff is 60 s: for 30 s no node in backoff starts again.
    c.holds("no start during backoff", Duration::from_secs(30), |c| {
        backing.iter().zip(&before).all(|(n, k)| starts(c, n) == *k)
    });
    assert!(c.running("bad.service").is_empty());
    assert!(
        c.primaries("r0").is_empty(),
        "every failed start demoted again"
    );
}

#[test]
fn shell_runner_runs_the_commands_on_exactly_one_node() {
    let Some(mut c) = Cluster::new("shell_runner", &["n1", "n2", "n3"]) else {
        return;
    };
    c.create("r0", &[]);
    let sim = format!("{SIM} --cluster {}", c.dir.path().display());
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            &format!(
                "- name: r0\n  runner: shell\n  adjustResourceOnStart: false\n  start:\n  - {sim} --node \"$DRBD_NODE_NAME\" primary \"$DRBD_RES_NAME\"\n  - touch /run/shell-active\n  stop:\n  - rm -f /run/shell-active\n  - {sim} --node \"$DRBD_NODE_NAME\" secondary \"$DRBD_RES_NAME\"\n"
            ),
        ),
    );
    c.start_agents();
    let active = |c: &Cluster| -> Vec<String> {
        c.nodes
            .iter()
            .filter(|n| c.file(&n.name, "shell-active").exists())
            .map(|n| n.name.clone())
            .collect()
    };
    c.wait("the commands' result on exactly one node", LONG, |c| {
        exactly_one(&active(c)).is_some()
    });
    let first = exactly_one(&active(&c)).unwrap();
    assert_eq!(c.primaries("r0"), vec![first.clone()]);
    c.holds("exactly one", Duration::from_secs(5), |c| {
        active(c) == vec![first.clone()]
    });
    c.wait("/status saying active", LONG, |c| {
        c.explain(&first, "r0")["state"] == "active"
    });
}

#[test]
fn ocf_agent_runs_through_the_wrapper() {
    let Some(mut c) = Cluster::new("ocf", &["n1", "n2", "n3"]) else {
        return;
    };
    let agent_dir = c.share.path().join("ocf/resource.d/test");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent = agent_dir.join("dummy");
    std::fs::write(
        &agent,
        "#!/bin/sh\nstate=\"${OCF_RESKEY_state:?}\"\ncase \"$1\" in\n  start) echo \"$OCF_RESOURCE_INSTANCE\" > \"$state\" ;;\n  stop) rm -f \"$state\" ;;\n  monitor) [ -e \"$state\" ] || exit 7 ;;\n  meta-data) echo '<resource-agent name=\"dummy\"/>' ;;\n  *) exit 3 ;;\nesac\nexit 0\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.create("r0", &[]);
    c.write_policy(
        "p.yaml",
        &policy(
            "ha",
            "- name: r0\n  adjustResourceOnStart: false\n  start:\n  - ocf:test:dummy d1 state=/run/ocf-d1\n",
        ),
    );
    c.start_agents();
    let with_state = |c: &Cluster| -> Vec<String> {
        c.nodes
            .iter()
            .filter(|n| c.file(&n.name, "ocf-d1").exists())
            .map(|n| n.name.clone())
            .collect()
    };
    c.wait("the OCF agent started on exactly one node", LONG, |c| {
        exactly_one(&with_state(c)).is_some()
    });
    let first = exactly_one(&with_state(&c)).unwrap();
    assert_eq!(c.primaries("r0"), vec![first.clone()]);
    let inst = std::fs::read_to_string(c.file(&first, "ocf-d1")).unwrap();
    assert!(inst.contains("d1"), "OCF_RESOURCE_INSTANCE: {inst}");
    assert_explained(&c, &first);
}

#[test]
fn policy_removed_with_stop_services_on_exit_stops_and_removes_files() {
    let Some((c, first)) =
        three_nodes_running("policy_removed", "  stopServicesOnExit: true\n", &[])
    else {
        return;
    };
    let dropin = |c: &Cluster, n: &str| c.ns(n).unit_dir.join("svc.service.d/reactor.conf");
    for n in ["n1", "n2", "n3"] {
        assert!(dropin(&c, n).exists(), "{n} has the generated drop-in");
    }
    c.remove_policy("p.yaml");
    c.wait("the services stopped", LONG, |c| {
        c.running("svc.service").is_empty()
    });
    c.wait("DRBD demoted", LONG, |c| c.primaries("r0").is_empty());
    c.wait("the generated files removed on every node", LONG, |c| {
        ["n1", "n2", "n3"].iter().all(|n| {
            !dropin(c, n).exists()
                && !c
                    .ns(n)
                    .unit_dir
                    .join("drbd-services@r0.target.d/reactor.conf")
                    .exists()
        })
    });
    let _ = first;
}

/// Issue #15: N promoter policies starting together on an empty unit directory (what every reboot is:
/// `/run` is a tmpfs) each get all of their files and their services start; so after an agent restart
/// and after a reboot. A unit file that cannot be written is retried and shown as Degraded until it is.
#[test]
fn many_policies_starting_together_all_get_their_unit_files() {
    const N: usize = 6;
    let Some(mut c) = Cluster::new("many_policies", &["n1"]) else {
        return;
    };
    let svc = |i: usize| format!("svc-{i}.service");
    let mut units = Vec::new();
    for i in 0..N {
        // one node: no peers to form a majority with
        c.create(&format!("r{i}"), &["quorum=off"]);
        units.push((svc(i), SVC.to_string()));
    }
    let units_ref: Vec<(&str, &str)> = units
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    for (u, content) in &units_ref {
        c.unit_everywhere(u, content);
    }
    for i in 0..N {
        c.write_policy(
            &format!("p{i}.yaml"),
            &policy(
                &format!("p{i}"),
                &format!(
                    "- name: r{i}\n  start: [{}]\n  adjustResourceOnStart: false\n",
                    svc(i)
                ),
            ),
        );
    }
    // r0's drop-in directory cannot be made: a file is in the way
    let blocker = c.ns("n1").unit_dir.join("svc-0.service.d");
    std::fs::write(&blocker, "in the way\n").unwrap();
    c.start_agents();
    let unit_files_reason = |c: &Cluster| -> Option<String> {
        let st = c.status("n1");
        st["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|p| {
                (p["id"]["policy"] == "p0")
                    .then(|| {
                        p["detail"]["unitFiles"]["reason"]
                            .as_str()
                            .map(String::from)
                    })
                    .flatten()
            })
    };
    c.wait("p0 shows its unit files as Degraded", LONG, |c| {
        unit_files_reason(c).is_some_and(|r| r.contains("svc-0.service.d"))
    });
    let st = c.status("n1");
    let p0 = st["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"]["policy"] == "p0")
        .unwrap();
    assert_eq!(p0["detail"]["unitFiles"]["state"], "Degraded", "{p0}");
    c.wait("the other resources' services running", LONG, |c| {
        (1..N).all(|i| c.running(&svc(i)) == vec!["n1".to_string()])
    });
    std::fs::remove_file(&blocker).unwrap();

    let all_present = |c: &Cluster, what: &str, running: bool| {
        if running {
            c.wait(what, LONG, |c| {
                (0..N).all(|i| c.running(&svc(i)) == vec!["n1".to_string()])
            });
        }
        // systemd loaded every resource's units with our drop-ins
        c.wait(what, LONG, |c| {
            let ns = c.ns("n1");
            (0..N).all(|i| {
                ns.show(&format!("drbd-services@r{i}.target"), "LoadState") == "loaded"
                    && ns.show(&svc(i), "DropInPaths").contains("reactor.conf")
            })
        });
        let dir = c.ns("n1").unit_dir.clone();
        for i in 0..N {
            let manifest = dir.join(format!("drbd-services@r{i}.target.d/reactor.conf"));
            let m = std::fs::read_to_string(&manifest)
                .unwrap_or_else(|e| panic!("{what}: {}: {e}", manifest.display()));
            let listed = m
                .lines()
                .find_map(|l| l.strip_prefix("# drbd-reactor-files: "))
                .unwrap_or_else(|| panic!("{what}: no file list in {m}"));
            for f in listed.split_whitespace() {
                let c = std::fs::read_to_string(dir.join(f))
                    .unwrap_or_else(|e| panic!("{what}: r{i}'s {f}: {e}"));
                assert!(c.contains(&format!("r{i}")), "{what}: {f} names r{i}: {c}");
            }
            assert!(
                listed.contains(&format!("svc-{i}.service.d/reactor.conf")),
                "{listed}"
            );
        }
        let leftovers: Vec<_> = walk(&dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{what}: temporary files left: {leftovers:?}"
        );
    };
    all_present(
        &c,
        "every resource's services and files (first start)",
        true,
    );
    c.wait("the retry cleared Degraded", LONG, |c| {
        unit_files_reason(c).is_none()
    });
    c.wait("/status: every resource active", LONG, |c| {
        (0..N).all(|n| c.explain("n1", &format!("r{n}"))["state"] == "active")
    });

    // the agent restarts: files unchanged, services still running
    c.nodes[0].agent = None;
    c.start_agent("n1");
    all_present(
        &c,
        "every resource's services and files (agent restarted)",
        true,
    );

    // the node reboots: an empty /run, every policy starting again at once
    c.nodes[0].agent = None;
    c.nodes[0].ns = None;
    c.ctl(&["node-down", "n1"]);
    c.reboot("n1", &units_ref);
    // Alone, the node's DRBD comes back Consistent, not UpToDate (no peer confirms its data), so
    // nothing is promoted here: the files and systemd's view of them are what this step checks.
    all_present(&c, "every resource's files (node rebooted)", false);
    c.holds(
        "no unit-file problem after the reboot",
        Duration::from_secs(3),
        |c| unit_files_reason(c).is_none(),
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}
