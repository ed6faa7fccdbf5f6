//! Kubernetes mode against a real kube-apiserver + etcd (built from Go modules by
//! tests/infra/envtest/tools.sh, started on loopback by start.sh): the shipped CRD, RBAC and three agent
//! processes authenticated as the ServiceAccount, each with `drbd-sim --replay` as its drbdsetup.
//!
//! Skips (loudly) when the tools are not built; with `CI` set a missing tool fails. Build them with
//! `bash tests/infra/envtest/tools.sh` (cached in ~/.cache/drbd-reactor-tools).

mod common;

use common::agent::collect;
use common::{free_port, wait_until};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");
const SIM: &str = env!("CARGO_BIN_EXE_drbd-sim");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// "Eventually" on a loaded 2-core machine; the latencies measured are printed.
const EVENTUALLY: Duration = Duration::from_secs(20);

fn envtest_dir() -> PathBuf {
    Path::new(ROOT).join("tests/infra/envtest")
}

/// The envtest bin dir when the tools are built; `None` (after a loud message) otherwise, or a panic in CI.
fn tools_or_skip(test: &str) -> Option<PathBuf> {
    let versions = std::fs::read_to_string(envtest_dir().join("versions.env")).unwrap();
    let k8s = versions
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .unwrap()
        .trim()
        .to_string();
    let root = match std::env::var_os("DRBD_REACTOR_TOOLS") {
        Some(r) => PathBuf::from(r),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
            .join("drbd-reactor-tools"),
    };
    let bin = root.join(k8s).join("bin");
    if ["kube-apiserver", "etcd", "kubectl"]
        .iter()
        .all(|b| bin.join(b).is_file())
    {
        return Some(bin);
    }
    let msg = format!(
        "{test}: kube-apiserver/etcd/kubectl not built in {}: run `bash tests/infra/envtest/tools.sh` (~13 min cold, cached)",
        bin.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED {msg} !!!!!!!!\n");
    None
}

/// A running etcd + kube-apiserver; stopped on drop.
struct Envtest {
    dir: PathBuf,
    bin: PathBuf,
    env: std::collections::BTreeMap<String, String>,
}

impl Envtest {
    fn start(bin: &Path) -> Envtest {
        let out = Command::new("bash")
            .arg(envtest_dir().join("start.sh"))
            .env("ENVTEST_BIN_DIR", bin)
            .env("ENVTEST_START_TIMEOUT", "120")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let env = std::fs::read_to_string(dir.join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Envtest {
            dir,
            bin: bin.to_path_buf(),
            env,
        }
    }

    /// kubectl as the admin (or with another kubeconfig); stdin optional. Returns (ok, stdout, stderr).
    fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> (bool, String, String) {
        let mut c = Command::new(self.bin.join("kubectl"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut i = c.stdin.take().unwrap();
            if let Some(s) = stdin {
                i.write_all(s.as_bytes()).unwrap();
            }
        }
        let out = c.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        self.kubectl_as(&self.dir.join("kubeconfig"), args, stdin)
    }

    fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (ok, out, err) = self.kubectl(args, stdin);
        assert!(ok, "kubectl {args:?} failed: {err}");
        out
    }

    fn apply(&self, yaml: &str) {
        self.ok(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        );
    }

    fn get_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&a, None)).unwrap()
    }

    /// The CRD, namespace, ServiceAccount and RBAC exactly as shipped.
    fn install(&self) {
        for f in [
            "crds/reactorpolicies.reactor.drbd.io.yaml",
            "manifests/namespace.yaml",
            "manifests/rbac.yaml",
        ] {
            self.ok(
                &["apply", "--server-side", "-f", &format!("{ROOT}/{f}")],
                None,
            );
        }
        let out = Command::new(envtest_dir().join("wait-established.sh"))
            .arg(self.bin.join("kubectl"))
            .arg(self.dir.join("kubeconfig"))
            .args(["reactorpolicies.reactor.drbd.io", "60"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the CRD did not become Established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A kubeconfig for the drbd-reactor ServiceAccount, with a token from the TokenRequest API.
    fn sa_kubeconfig(&self, path: &Path) {
        let token = self.ok(
            &[
                "create",
                "token",
                "drbd-reactor",
                "-n",
                "drbd-reactor",
                "--duration=2h",
            ],
            None,
        );
        let ca = std::fs::read(&self.env["ENVTEST_CA_FILE"]).unwrap();
        let ca = base64(&ca);
        let cfg = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {}\ncontexts:\n- name: sa\n  context: {{cluster: envtest, user: sa}}\ncurrent-context: sa\n",
            self.env["APISERVER_URL"],
            token.trim()
        );
        std::fs::write(path, cfg).unwrap();
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(envtest_dir().join("stop.sh"))
            .arg(&self.dir)
            .status();
    }
}

fn base64(b: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

struct Agent {
    node: String,
    child: Child,
    port: u16,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(node: &str, kubeconfig: &Path, work: &Path) -> Agent {
        let port = free_port();
        let stream = Path::new(ROOT)
            .join("tests/data/events2/drbd-utils_events2-all-create-change__full.txt");
        let mut child = Command::new(AGENT)
            .args(["agent", "--node-name", node, "--namespace", "drbd-reactor"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--drbdsetup")
            .arg(format!("{SIM} --replay {}", stream.display()))
            .arg("--umh-script-dir")
            .arg(work.join(format!("umh-{node}")))
            .args([
                "--debounce-ms",
                "100",
                "--status-interval",
                "1",
                "--log-format",
                "json",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = collect(child.stderr.take().unwrap());
        Agent {
            node: node.to_string(),
            child,
            port,
            stderr: lines,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        match reqwest::blocking::get(format!("http://127.0.0.1:{}{path}", self.port)) {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Running plugin instances as `policy/type`, sorted.
    fn plugins(&self) -> Vec<String> {
        let st: Value = serde_json::from_str(&self.get("/status").1).unwrap_or(Value::Null);
        let mut v: Vec<String> = st["plugins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["state"] == "running")
                    .map(|p| {
                        format!(
                            "{}/{}",
                            p["id"]["policy"].as_str().unwrap(),
                            p["id"]["type"].as_str().unwrap()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn metric(&self, series: &str) -> Option<f64> {
        self.get("/metrics")
            .1
            .lines()
            .find(|l| l.rsplit_once(' ').map(|(k, _)| k) == Some(series))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Log lines (JSON) containing all of `needles`.
    fn count_in_log(&self, needles: &[&str]) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until every agent's running set is `want(agent)`; returns the time it took.
fn follow(agents: &[&Agent], what: &str, want: impl Fn(&Agent) -> Vec<&'static str>) -> Duration {
    let t = Instant::now();
    let ok = wait_until(EVENTUALLY, || agents.iter().all(|a| a.plugins() == want(a)));
    if !ok {
        let got: Vec<String> = agents
            .iter()
            .map(|a| {
                format!(
                    "{}: got {:?} want {:?}\n{}",
                    a.node,
                    a.plugins(),
                    want(a),
                    a.log()
                )
            })
            .collect();
        panic!(
            "{what}: not followed within {EVENTUALLY:?}:\n{}",
            got.join("\n")
        );
    }
    let d = t.elapsed();
    eprintln!("latency {what}: {d:?}");
    d
}

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

fn node(name: &str, zone: &str) -> String {
    format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{zone: {zone}}}\n")
}

/// Status entries of a policy: node → (state, observedGeneration).
fn entries(env: &Envtest, pol: &str) -> Vec<(String, String)> {
    let p = env.get_json(&["rpol", pol]);
    let mut v: Vec<(String, String)> = p["status"]["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["node"].as_str().unwrap().to_string(),
                        n["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn umh_policy(name: &str, key: &str, out: &Path) -> String {
    policy(
        name,
        &format!(
            "  umh:\n    resource:\n    - name: found\n      eventType: exists\n      script:\n        configMapRef: {{name: umh-scripts, key: {key}}}\n      env: {{OUT: {}}}\n",
            out.display()
        ),
    )
}

fn script_cm(a: &str, b: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: umh-scripts\n  namespace: drbd-reactor\ndata:\n  a.sh: |\n    #!/bin/sh\n    echo {a} >> \"$OUT\"\n  b.sh: |\n    #!/bin/sh\n    echo {b} >> \"$OUT\"\n"
    )
}

#[test]
fn three_agents_follow_policies_labels_and_configmaps_on_a_real_apiserver() {
    let Some(bin) =
        tools_or_skip("three_agents_follow_policies_labels_and_configmaps_on_a_real_apiserver")
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let env = Envtest::start(&bin);
    env.install();

    // The server checks the schema and the CEL rules, with messages that say what is wrong.
    let (ok, _, err) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&policy(
            "bad",
            "  nodeSelector:\n    matchExpressions: [{key: zone, operator: In}]\n  umh:\n    resource:\n    - name: 'no spaces'\n      command: [x]\n      script: {configMapRef: {name: s, key: k}}\n    - name: local\n      script: {path: x.sh}\n",
        )),
    );
    assert!(!ok);
    for m in [
        "operators In and NotIn need values",
        "spec.umh.resource[0].name",
        "give exactly one of command (argv, no shell) and script",
        "script.path is for policy files",
    ] {
        assert!(err.contains(m), "missing '{m}' in:\n{err}");
    }
    let (ok, _, err) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&policy("bad", "  debugger: {output: printer}\n")),
    );
    assert!(!ok && err.contains("spec.debugger.output"), "{err}");
    let (ok, _, err) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&policy(
            "bad",
            "  umh:\n    device:\n    - {name: a, command: [x1]}\n    - {name: a, command: [x2]}\n",
        )),
    );
    assert!(!ok && err.contains("rule names must be unique"), "{err}");

    env.apply(&format!(
        "{}---\n{}---\n{}",
        node("n1", "a"),
        node("n2", "a"),
        node("n3", "b")
    ));
    let sa = work.path().join("sa.kubeconfig");
    env.sa_kubeconfig(&sa);

    // Least privilege: what the agent needs works, the rest is denied by the server.
    env.apply(&policy(
        "some-policy",
        "  nodeSelector: {matchLabels: {zone: nowhere}}\n  debugger: {}\n",
    ));
    let as_sa = |args: &[&str]| env.kubectl_as(&sa, args, None);
    assert!(as_sa(&["get", "rpol"]).0);
    assert!(as_sa(&["get", "configmaps", "-n", "drbd-reactor"]).0);
    assert!(as_sa(&["get", "node", "n1"]).0);
    for denied in [
        &["get", "secrets", "-n", "drbd-reactor"][..],
        &["get", "configmaps", "-n", "default"],
        &["get", "configmaps", "-n", "kube-system"],
        &["delete", "rpol", "some-policy"],
        &[
            "patch",
            "rpol",
            "some-policy",
            "--type=merge",
            "-p",
            "{\"spec\":{}}",
        ],
        &["label", "node", "n1", "x=y"],
        &["get", "pods", "-A"],
    ] {
        let (ok, _, err) = as_sa(denied);
        assert!(
            !ok && err.contains("forbidden"),
            "{denied:?} should be forbidden: {err}"
        );
    }

    let agents: Vec<Agent> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| Agent::start(n, &sa, work.path()))
        .collect();
    let all: Vec<&Agent> = agents.iter().collect();
    for a in &agents {
        assert!(
            wait_until(EVENTUALLY, || a.get("/readyz").0 == 200),
            "{} not ready: {}\n{}",
            a.node,
            a.get("/readyz").1,
            a.log()
        );
    }
    let mut latencies = Vec::new();

    // A policy for every node; all three write their status entries at the same moment.
    env.apply(&policy("everywhere", "  debugger: {}\n"));
    latencies.push(follow(&all, "new policy", |_| vec!["everywhere/debugger"]));
    assert!(wait_until(EVENTUALLY, || entries(&env, "everywhere").len() == 3));
    assert_eq!(
        entries(&env, "everywhere"),
        [("n1", "Applied"), ("n2", "Applied"), ("n3", "Applied")]
            .map(|(a, b)| (a.to_string(), b.to_string()))
    );

    // nodeSelector on Node labels.
    env.apply(&policy(
        "zone-a",
        "  nodeSelector: {matchLabels: {zone: a}}\n  prometheus: {}\n",
    ));
    let za = |a: &Agent| -> Vec<&'static str> {
        if a.node == "n3" {
            vec!["everywhere/debugger"]
        } else {
            vec!["everywhere/debugger", "zone-a/prometheus"]
        }
    };
    latencies.push(follow(&all, "selector", za));
    assert!(wait_until(EVENTUALLY, || entries(&env, "zone-a").len() == 2));

    // Node labels change: n3 joins zone a, n1 leaves it.
    env.ok(&["label", "node", "n3", "zone=a", "--overwrite"], None);
    env.ok(&["label", "node", "n1", "zone=b", "--overwrite"], None);
    let relabeled = |a: &Agent| -> Vec<&'static str> {
        if a.node == "n1" {
            vec!["everywhere/debugger"]
        } else {
            vec!["everywhere/debugger", "zone-a/prometheus"]
        }
    };
    latencies.push(follow(&all, "node labels", relabeled));
    // n1's entry goes away, n3's appears.
    assert!(
        wait_until(EVENTUALLY, || entries(&env, "zone-a")
            .iter()
            .map(|e| e.0.as_str())
            .collect::<Vec<_>>()
            == ["n2", "n3"]),
        "{:?}",
        entries(&env, "zone-a")
    );

    // The policy's selector changes.
    env.apply(&policy(
        "zone-a",
        "  nodeSelector: {matchLabels: {zone: b}}\n  prometheus: {}\n",
    ));
    latencies.push(follow(&all, "selector change", |a| {
        if a.node == "n1" {
            vec!["everywhere/debugger", "zone-a/prometheus"]
        } else {
            vec!["everywhere/debugger"]
        }
    }));

    // Status: entries per node with generation and conditions, each under its own field manager;
    // printer columns.
    assert!(wait_until(EVENTUALLY, || {
        let p = env.get_json(&["rpol", "zone-a"]);
        p["status"]["nodes"].as_array().is_some_and(|n| {
            n.len() == 1
                && n[0]["node"] == "n1"
                && n[0]["observedGeneration"] == p["metadata"]["generation"]
        })
    }));
    let p = env.get_json(&["rpol", "everywhere", "--show-managed-fields"]);
    let managers: Vec<&str> = p["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    for n in ["drbd-reactor/n1", "drbd-reactor/n2", "drbd-reactor/n3"] {
        assert!(managers.contains(&n), "{managers:?}");
    }
    let cond = &p["status"]["nodes"][0]["conditions"];
    assert_eq!(cond[0]["type"], "Applied");
    assert_eq!(cond[0]["status"], "True");
    assert_eq!(cond[1]["type"], "Degraded");
    assert_eq!(cond[1]["status"], "False");
    let table = env.ok(&["get", "rpol", "everywhere"], None);
    assert!(
        table.contains("PLUGINS") && table.contains("APPLIED") && table.contains("DEGRADED"),
        "{table}"
    );
    assert!(
        wait_until(EVENTUALLY, || {
            let t = env.ok(
                &["get", "rpol", "everywhere", "zone-a", "--no-headers"],
                None,
            );
            let rows: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
            rows.len() == 2
                && rows[0][..4] == ["everywhere", "debugger", "3", "0"]
                && rows[1][..4] == ["zone-a", "prometheus", "1", "0"]
        }),
        "{}",
        env.ok(&["get", "rpol"], None)
    );

    // ConfigMap scripts: two UMH policies on the same ConfigMap, different keys.
    let out_a = work.path().join("a.out");
    let out_b = work.path().join("b.out");
    env.apply(&umh_policy("umh-a", "a.sh", &out_a));
    env.apply(&umh_policy("umh-b", "b.sh", &out_b));
    // Missing ConfigMap: reported on status and as an Event; the other policies keep running.
    assert!(
        wait_until(EVENTUALLY, || {
            let p = env.get_json(&["rpol", "umh-a"]);
            p["status"]["nodes"].as_array().is_some_and(|n| {
                n.len() == 3
                    && n.iter().all(|e| {
                        e["state"] == "NotApplied"
                            && e["conditions"][0]["reason"] == "ConfigMapNotFound"
                            && e["conditions"][0]["message"]
                                .as_str()
                                .unwrap_or("")
                                .contains("ConfigMap drbd-reactor/umh-scripts not found")
                    })
            })
        }),
        "{}",
        env.get_json(&["rpol", "umh-a"])
    );
    assert!(
        wait_until(EVENTUALLY, || {
            let ev = env.get_json(&["events.v1.events.k8s.io", "-n", "default"]);
            ev["items"].as_array().is_some_and(|items| {
                items.iter().any(|e| {
                    e["regarding"]["name"] == "umh-a"
                        && e["reason"] == "ConfigMapNotFound"
                        && e["note"].as_str().unwrap_or("").starts_with("node n2:")
                })
            })
        }),
        "no ConfigMapNotFound Event for umh-a with the node"
    );
    follow(&all, "other policies keep running", |a| {
        if a.node == "n1" {
            vec!["everywhere/debugger", "zone-a/prometheus"]
        } else {
            vec!["everywhere/debugger"]
        }
    });

    env.apply(&script_cm("a1", "b1"));
    let with_umh = |a: &Agent| -> Vec<&'static str> {
        if a.node == "n1" {
            vec![
                "everywhere/debugger",
                "umh-a/umh",
                "umh-b/umh",
                "zone-a/prometheus",
            ]
        } else {
            vec!["everywhere/debugger", "umh-a/umh", "umh-b/umh"]
        }
    };
    latencies.push(follow(&all, "ConfigMap created", with_umh));
    let lines = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    // Each agent's instance ran its script once on the state found ("exists" of the one resource).
    assert!(
        wait_until(EVENTUALLY, || lines(&out_a).len() == 3
            && lines(&out_b).len() == 3),
        "{:?} {:?}",
        lines(&out_a),
        lines(&out_b)
    );
    assert!(lines(&out_a).iter().all(|l| l == "a1"));
    let script = work.path().join("umh-n2/umh-a/found");
    assert_eq!(
        std::fs::read_to_string(&script).unwrap(),
        "#!/bin/sh\necho a1 >> \"$OUT\"\n"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(work.path().join("umh-n2"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    let started = |a: &Agent, inst: &str| {
        a.count_in_log(&[
            "started plugin instance",
            &format!("\"instance\":\"{inst}\""),
        ])
    };
    let before: Vec<(usize, usize, usize)> = agents
        .iter()
        .map(|a| {
            (
                started(a, "umh-a/umh"),
                started(a, "umh-b/umh"),
                started(a, "everywhere/debugger"),
            )
        })
        .collect();
    // Change only key a.sh: only umh-a's instances reload (and run the new script on the replay).
    env.apply(&script_cm("a2", "b1"));
    assert!(
        wait_until(EVENTUALLY, || lines(&out_a)
            .iter()
            .filter(|l| *l == "a2")
            .count()
            == 3),
        "{:?}",
        lines(&out_a)
    );
    assert!(wait_until(EVENTUALLY, || std::fs::read_to_string(&script)
        .unwrap_or_default()
        .contains("a2")));
    std::thread::sleep(Duration::from_millis(500));
    for (a, (sa, sb, sd)) in agents.iter().zip(before) {
        assert_eq!(
            started(a, "umh-a/umh"),
            sa + 1,
            "{}: umh-a reloaded once\n{}",
            a.node,
            a.log()
        );
        assert_eq!(started(a, "umh-b/umh"), sb, "{}: umh-b untouched", a.node);
        assert_eq!(
            started(a, "everywhere/debugger"),
            sd,
            "{}: debugger untouched",
            a.node
        );
    }
    assert_eq!(lines(&out_b), ["b1", "b1", "b1"], "umh-b did not run again");

    // A Node deleted: its agent removes its entries (and keeps running what it runs).
    env.ok(&["delete", "node", "n3"], None);
    assert!(
        wait_until(EVENTUALLY, || ["everywhere", "umh-a", "umh-b"].iter().all(
            |p| entries(&env, p).iter().all(|e| e.0 != "n3") && entries(&env, p).len() == 2
        )),
        "{:?}",
        entries(&env, "everywhere")
    );
    assert!(agents[2]
        .plugins()
        .contains(&"everywhere/debugger".to_string()));

    // A policy deleted: its plugins stop everywhere.
    env.ok(&["delete", "rpol", "umh-b"], None);
    latencies.push(follow(&all[..2], "policy deleted", |a| {
        if a.node == "n1" {
            vec!["everywhere/debugger", "umh-a/umh", "zone-a/prometheus"]
        } else {
            vec!["everywhere/debugger", "umh-a/umh"]
        }
    }));

    // Concurrent status writes never conflicted or failed.
    for a in &agents {
        assert_eq!(
            a.metric("drbdreactor_kubernetes_status_writes_total{result=\"conflict\"}"),
            Some(0.0),
            "{}",
            a.node
        );
        assert_eq!(
            a.metric("drbdreactor_kubernetes_status_writes_total{result=\"error\"}"),
            Some(0.0),
            "{}\n{}",
            a.node,
            a.log()
        );
        assert!(
            a.metric("drbdreactor_kubernetes_status_writes_total{result=\"ok\"}")
                .unwrap()
                >= 3.0
        );
        assert_eq!(a.metric("drbdreactor_kubernetes_api_up"), Some(1.0));
    }
    let max = latencies.iter().max().unwrap();
    eprintln!("measured: policy/label change → every agent's running set follows: max {max:?} over {} changes (target 2 s)", latencies.len());
}

#[test]
fn api_server_unreachable_keeps_the_last_applied_set_and_recovers() {
    let Some(bin) = tools_or_skip("api_server_unreachable_keeps_the_last_applied_set_and_recovers")
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let env = Envtest::start(&bin);
    env.install();
    env.apply(&node("n1", "a"));
    env.apply(&policy("everywhere", "  debugger: {}\n"));
    let sa = work.path().join("sa.kubeconfig");
    env.sa_kubeconfig(&sa);
    let a = Agent::start("n1", &sa, work.path());
    follow(&[&a], "start", |_| vec!["everywhere/debugger"]);
    assert!(wait_until(EVENTUALLY, || a.get("/readyz").0 == 200));
    assert_eq!(a.metric("drbdreactor_kubernetes_api_up"), Some(1.0));

    // Stop kube-apiserver (etcd stays); remember how it was started.
    let pid: i32 = env.env["ENVTEST_APISERVER_PID"].parse().unwrap();
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    // SIGKILL: a crash (a graceful stop would wait for the open watches to end).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(30), || !Path::new(
        &format!("/proc/{pid}/cmdline")
    )
    .exists()
        || std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.is_empty())
            .unwrap_or(true)));

    assert!(
        wait_until(Duration::from_secs(60), || a.get("/readyz").0 == 503),
        "{}",
        a.log()
    );
    let why = a.get("/readyz").1;
    assert!(why.contains("Kubernetes API unreachable"), "{why}");
    assert_eq!(a.metric("drbdreactor_kubernetes_api_up"), Some(0.0));
    assert!(
        a.metric("drbdreactor_kubernetes_watch_errors_total{resource=\"reactorpolicies\"}")
            .unwrap()
            >= 1.0
    );
    // The last applied set keeps running.
    assert_eq!(a.plugins(), ["everywhere/debugger"]);
    let errors_then = a
        .metric("drbdreactor_kubernetes_watch_errors_total{resource=\"reactorpolicies\"}")
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let errors_later = a
        .metric("drbdreactor_kubernetes_watch_errors_total{resource=\"reactorpolicies\"}")
        .unwrap();
    assert!(
        errors_later - errors_then <= 10.0,
        "retries back off: {errors_then} → {errors_later} in 3 s"
    );
    assert_eq!(a.plugins(), ["everywhere/debugger"]);

    // Restart it on the same address: the agent resyncs and is ready again.
    let log = std::fs::File::create(env.dir.join("kube-apiserver.log.2")).unwrap();
    let child = Command::new(&cmdline[0])
        .args(&cmdline[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    std::fs::write(env.dir.join("kube-apiserver.pid"), child.id().to_string()).unwrap();
    let _apiserver = Reaped(child);
    assert!(
        wait_until(Duration::from_secs(120), || a.get("/readyz").0 == 200),
        "{}\n{}",
        a.get("/readyz").1,
        a.log()
    );
    assert_eq!(a.metric("drbdreactor_kubernetes_api_up"), Some(1.0));
    // and follows changes again
    env.apply(&policy("second", "  prometheus: {}\n"));
    follow(&[&a], "after recovery", |_| {
        vec!["everywhere/debugger", "second/prometheus"]
    });
}

/// A process killed and reaped when the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn committed_crd_matches_the_generated_one() {
    let out = Command::new(AGENT).arg("crd").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed =
        std::fs::read_to_string(Path::new(ROOT).join("crds/reactorpolicies.reactor.drbd.io.yaml"))
            .unwrap();
    assert!(
        generated == committed,
        "crds/reactorpolicies.reactor.drbd.io.yaml is stale: regenerate it with\n  cargo run -- crd > crds/reactorpolicies.reactor.drbd.io.yaml"
    );
}

/// The shipped CRD with the narrowing of its multi-shape fields taken out: what a cluster that installed
/// an earlier version holds, and so what policies created then could be.
fn loose_crd() -> String {
    fn loosen(v: &mut serde_yaml::Value) {
        if let serde_yaml::Value::Mapping(m) = v {
            let untyped = m.get("x-kubernetes-preserve-unknown-fields")
                == Some(&serde_yaml::Value::Bool(true))
                && m.get("type").is_none();
            if untyped {
                m.retain(|k, _| {
                    matches!(
                        k.as_str(),
                        Some("description" | "x-kubernetes-preserve-unknown-fields")
                    )
                });
            }
            for (_, c) in m.iter_mut() {
                loosen(c);
            }
        } else if let serde_yaml::Value::Sequence(s) = v {
            s.iter_mut().for_each(loosen);
        }
    }
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("crds/reactorpolicies.reactor.drbd.io.yaml"))
            .unwrap();
    let mut crd: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    loosen(&mut crd);
    serde_yaml::to_string(&crd).unwrap()
}

#[test]
fn a_policy_the_agent_cannot_decode_is_reported_on_its_own_and_the_others_run() {
    let test = "a_policy_the_agent_cannot_decode_is_reported_on_its_own_and_the_others_run";
    let Some(bin) = tools_or_skip(test) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let env = Envtest::start(&bin);
    env.install();
    let volume_x = policy(
        "bad-volume",
        "  umh:\n    device:\n    - {name: d, volume: \"x\", command: [\"true\"]}\n",
    );
    let resource_obj = policy(
        "bad-resource-name",
        "  umh:\n    resource:\n    - {name: r, resourceName: {a: 1}, command: [\"true\"]}\n",
    );
    // The shipped CRD: the server refuses both shapes, naming the field.
    for (yaml, field) in [
        (&volume_x, "spec.umh.device[0].volume"),
        (&resource_obj, "spec.umh.resource[0].resourceName"),
    ] {
        let (ok, _, err) = env.kubectl(&["create", "-f", "-"], Some(yaml));
        assert!(!ok && err.contains(field), "{field}: {err}");
    }
    // The host's own units are refused as promoter start units by the server too.
    let (ok, _, err) = env.kubectl(
        &["create", "-f", "-"],
        Some(&policy(
            "host-units",
            "  promoter:\n    resources:\n    - {name: r0, start: [dbus.service]}\n",
        )),
    );
    assert!(
        !ok && err.contains("the host's own units"),
        "dbus.service as a start unit: {err}"
    );
    // Created under a looser CRD (an earlier version), they are stored; then the CRD is tightened.
    env.apply(&loose_crd());
    assert!(
        wait_until(EVENTUALLY, || env
            .kubectl(&["create", "-f", "-"], Some(&volume_x))
            .0),
        "the loose CRD did not take effect"
    );
    env.ok(&["create", "-f", "-"], Some(&resource_obj));
    env.install();
    env.apply(&policy("everywhere", "  debugger: {}\n"));
    env.apply(&node("n1", "a"));
    let sa = work.path().join("sa.kubeconfig");
    env.sa_kubeconfig(&sa);

    let t0 = Instant::now();
    let agent = Agent::start("n1", &sa, work.path());
    assert!(
        wait_until(EVENTUALLY, || agent.get("/readyz").0 == 200),
        "not ready: {}\n{}",
        agent.get("/readyz").1,
        agent.log()
    );
    follow(&[&agent], "the decodable policy runs", |_| {
        vec!["everywhere/debugger"]
    });
    for (name, field) in [
        ("bad-volume", "spec.umh.device[0].volume"),
        ("bad-resource-name", "spec.umh.resource[0].resourceName"),
    ] {
        assert!(
            wait_until(EVENTUALLY, || {
                let p = env.get_json(&["rpol", name]);
                p["status"]["nodes"].as_array().is_some_and(|n| {
                    n.iter().any(|e| {
                        e["node"] == "n1"
                            && e["state"] == "NotApplied"
                            && e["conditions"][0]["reason"] == "InvalidPolicy"
                            && e["conditions"][0]["message"]
                                .as_str()
                                .unwrap_or("")
                                .contains(field)
                    })
                })
            }),
            "{name}: no InvalidPolicy entry naming {field}: {}\n{}",
            env.get_json(&["rpol", name]),
            agent.log()
        );
        assert!(
            wait_until(EVENTUALLY, || {
                let ev = env.get_json(&["events.v1.events.k8s.io", "-n", "default"]);
                ev["items"].as_array().is_some_and(|items| {
                    items.iter().any(|e| {
                        e["regarding"]["name"] == name
                            && e["reason"] == "InvalidPolicy"
                            && e["note"].as_str().unwrap_or("").contains(field)
                    })
                })
            }),
            "{name}: no InvalidPolicy Event"
        );
    }
    eprintln!(
        "undecodable policies reported and the other applied {:.1} s after the agent started",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(
        entries(&env, "everywhere"),
        [("n1".to_string(), "Applied".to_string())]
    );
    // Reachable and ready all along: one bad object is not an unreachable API.
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(agent.metric("drbdreactor_kubernetes_api_up"), Some(1.0));
    assert_eq!(
        agent.metric("drbdreactor_kubernetes_watch_errors_total{resource=\"reactorpolicies\"}"),
        Some(0.0),
        "{}",
        agent.log()
    );
    // Fixed: the policy decodes and runs, its entry follows.
    env.ok(&["delete", "rpol", "bad-volume"], None);
    env.apply(&policy(
        "bad-volume",
        "  umh:\n    device:\n    - {name: d, volume: 0, command: [\"true\"]}\n",
    ));
    follow(&[&agent], "the fixed policy runs", |_| {
        vec!["bad-volume/umh", "everywhere/debugger"]
    });
}
