//! The promoter through three real agent binaries on a simulated 3-node DRBD cluster (`drbd-sim`), with
//! the shell runner (which needs no systemd): the services start on exactly one node, the status explains
//! the others, a crash of the Primary moves them, a node that loses quorum stops them, `evict` moves them
//! away and keeps them away.

mod common;

use common::agent::collect;
use common::{free_port, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");
const SIM: &str = env!("CARGO_BIN_EXE_drbd-sim");
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const LONG: Duration = Duration::from_secs(90);

struct Agent {
    node: &'static str,
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

impl Agent {
    fn start(node: &'static str, cluster: &Path, policies: &Path) -> Agent {
        let port = free_port();
        let sim = format!("{SIM} --cluster {} --node {node}", cluster.display());
        let mut child = Command::new(AGENT)
            .arg("agent")
            .args(["--policy-dir", &policies.display().to_string()])
            .args(["--drbdsetup", &sim])
            .args(["--drbdadm", &sim])
            .args(["--host-exec", ""])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-name", node])
            .args(["--statistics-interval", "3600"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = collect(child.stderr.take().unwrap());
        Agent {
            node,
            child,
            port,
            stderr: lines,
        }
    }

    fn status(&self) -> serde_json::Value {
        reqwest::blocking::get(format!("http://127.0.0.1:{}/status", self.port))
            .and_then(|r| r.text())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// (state, reason) of r0 in the promoter instance's detail.
    fn r0(&self) -> Option<(String, String)> {
        let s = self.status();
        let inst = s["plugins"]
            .as_array()?
            .iter()
            .find(|i| i["id"]["type"] == "promoter")?
            .clone();
        let r = &inst["detail"]["resources"][0];
        Some((
            r["state"].as_str()?.to_string(),
            r["reason"].as_str()?.to_string(),
        ))
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }
}

struct Cluster {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    policies: PathBuf,
    markers: PathBuf,
    agents: Vec<Agent>,
}

impl Cluster {
    fn ctl(&self, args: &[&str]) {
        let st = Command::new(SIM)
            .arg("--cluster")
            .arg(&self.dir)
            .arg("ctl")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ctl {args:?}");
    }

    /// Nodes whose marker says the services run there.
    fn running(&self) -> Vec<String> {
        NODES
            .iter()
            .filter(|n| self.markers.join(n).exists())
            .map(|n| n.to_string())
            .collect()
    }

    fn wait(&self, what: &str, mut f: impl FnMut(&Cluster) -> bool) {
        if !wait_until(LONG, || f(self)) {
            let mut logs = String::new();
            for a in &self.agents {
                logs.push_str(&format!(
                    "\n===== {} status {:?}\n{}",
                    a.node,
                    a.r0(),
                    a.log()
                ));
            }
            panic!(
                "timed out waiting for {what}; running {:?}{logs}",
                self.running()
            );
        }
    }

    fn agent(&self, node: &str) -> &Agent {
        self.agents.iter().find(|a| a.node == node).unwrap()
    }
}

fn policy(cluster: &Path, markers: &Path, extra: &str) -> String {
    let m = markers.display();
    let c = cluster.display();
    // The entries are admin-written shell; the resource and node names come from the environment.
    format!(
        r#"apiVersion: reactor.drbd.io/v1alpha1
kind: ReactorPolicy
metadata:
  name: ha
spec:
  promoter:
    resources:
      - name: r0
        runner: shell
        preferredNodes: [n1, n2, n3]
        preferredNodesPolicy: startOnly
        start:
          - '"{SIM}" --cluster "{c}" --node "$DRBD_NODE_NAME" primary "$DRBD_RES_NAME"'
          - 'touch "{m}/$DRBD_NODE_NAME"'
        stop:
          - 'rm -f "{m}/$DRBD_NODE_NAME"'
          - '"{SIM}" --cluster "{c}" --node "$DRBD_NODE_NAME" secondary "$DRBD_RES_NAME"'
{extra}"#
    )
}

fn cluster() -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let policies = tmp.path().join("policies");
    let markers = tmp.path().join("markers");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::create_dir_all(&markers).unwrap();
    let mut c = Cluster {
        _tmp: tmp,
        dir,
        policies,
        markers,
        agents: Vec::new(),
    };
    c.ctl(&["init"]);
    c.ctl(&[
        "create",
        "r0",
        "--nodes",
        "n1,n2,n3",
        "-o",
        "quorum=majority",
        "-o",
        "on-no-quorum=io-error",
        "-o",
        "on-no-data-accessible=io-error",
        "-o",
        "auto-promote=no",
        "-o",
        "on-suspended-primary-outdated=force-secondary",
    ]);
    std::fs::write(c.policies.join("ha.yaml"), policy(&c.dir, &c.markers, "")).unwrap();
    for n in NODES {
        let a = Agent::start(n, &c.dir, &c.policies);
        c.agents.push(a);
    }
    c
}

#[test]
fn shell_runner_failover_quorum_loss_and_evict() {
    let c = cluster();
    // first start: exactly one node, the most preferred
    c.wait("services on n1", |c| c.running() == ["n1"]);
    c.wait("n2 and n3 explain", |c| {
        ["n2", "n3"]
            .iter()
            .all(|n| c.agent(n).r0() == Some(("standby".into(), "peer n1 is Primary".into())))
    });
    c.wait("n1 active", |c| {
        c.agent("n1").r0() == Some(("active".into(), "services run here".into()))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running(), ["n1"], "still exactly one");

    // the Primary crashes: n2 (next preferred) takes over; n1's agent sees its node gone
    c.ctl(&["node-down", "n1"]);
    std::fs::remove_file(c.markers.join("n1")).unwrap(); // a crash loses the service
    c.wait("services on n2", |c| c.running() == ["n2"]);
    c.wait("n3 explains", |c| {
        c.agent("n3").r0() == Some(("standby".into(), "peer n2 is Primary".into()))
    });
    c.ctl(&["node-up", "n1"]);
    c.wait("n1 back, standing by", |c| {
        c.agent("n1").r0() == Some(("standby".into(), "peer n2 is Primary".into()))
    });
    assert_eq!(c.running(), ["n2"], "startOnly: no fail-back");

    // n2 is cut off from both peers: it loses quorum and stops; the majority side takes over
    c.ctl(&["cut", "n2", "n1"]);
    c.ctl(&["cut", "n2", "n3"]);
    c.wait("services moved off n2", |c| {
        let r = c.running();
        r.len() == 1 && r[0] != "n2"
    });
    c.wait("n2 explains", |c| {
        c.agent("n2").r0() == Some(("blocked".into(), "no quorum".into()))
    });
    c.ctl(&["heal", "n2", "n1"]);
    c.ctl(&["heal", "n2", "n3"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.running().len(), 1, "healed: still exactly one");

    // evict the node that runs them: it stops, another takes over, and it stays off
    let victim = c.running()[0].clone();
    std::fs::write(
        c.policies.join("ha.yaml"),
        policy(&c.dir, &c.markers, &format!("        evict: [{victim}]\n")),
    )
    .unwrap();
    c.wait("services moved off the evicted node", |c| {
        let r = c.running();
        r.len() == 1 && r[0] != victim
    });
    c.wait("the evicted node explains", |c| {
        c.agent(&victim).r0().is_some_and(|s| s.0 == "evicted")
    });
}
