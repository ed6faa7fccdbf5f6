//! The shipping artefacts, checked with real tools: the Helm chart (`charts/drbd-reactor`), the plain
//! manifests rendered from it (`manifests/`), its alert rules and Grafana dashboard, and the Dockerfile.
//!
//! Tools, and where they come from:
//! - `helm`, `kubectl`, `kube-apiserver`, `etcd`: built from Go modules by `tests/infra/envtest/tools.sh`
//!   (cached in `~/.cache/drbd-reactor-tools`; `ENVTEST_BIN_DIR` overrides); `helm` also from `HELM` or PATH;
//! - `kubernetes-validate` (PyPI) for the Kubernetes schemas, the `dockerfile` module (PyPI: BuildKit's own
//!   Dockerfile parser) for the Dockerfile;
//! - `promtool` (Debian package `prometheus`) for the alert rules and every dashboard query.
//!
//! A missing tool skips the test with a loud message, unless `CI` is set: then the test fails.
//! Regenerate the chart's CRD with `UPDATE_GOLDEN=1 cargo test --test chart`, and manifests/ with
//! `scripts/render-manifests.sh`.

mod common;

use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::prometheus::render::{self, DrbdVersion, View};
use drbd_reactor::policy::ReactorPolicy;
use kube::CustomResourceExt;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const RELEASE: &str = "drbd-reactor";
const NAMESPACE: &str = "drbd-reactor";
const CRD_FILE: &str = "reactorpolicies.reactor.drbd.io.yaml";
/// The manifest files scripts/render-manifests.sh writes.
const MANIFESTS: &[&str] = &[
    "namespace.yaml",
    "crds.yaml",
    "rbac.yaml",
    "daemonset.yaml",
    "service.yaml",
    "policies.yaml",
    "networkpolicy.yaml",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/drbd-reactor")
}

fn values_all() -> PathBuf {
    root().join("tests/infra/chart/values-all.yaml")
}

// ---- tools ---------------------------------------------------------------------------------------------

/// Skips (returns `None`) with a loud message, or fails when `CI` is set.
fn missing<T>(test: &str, what: &str, hint: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {what} is missing and CI is set: {hint}");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {what} is missing ({hint}) !!!!!!!!\n");
    None
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Where tests/infra/envtest/tools.sh keeps its binaries.
fn envtest_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ENVTEST_BIN_DIR") {
        return d.into();
    }
    let versions = std::fs::read_to_string(root().join("tests/infra/envtest/versions.env"))
        .expect("tests/infra/envtest/versions.env");
    let k8s = versions
        .lines()
        .find_map(|l| l.strip_prefix("K8S_VERSION="))
        .expect("K8S_VERSION in versions.env")
        .trim()
        .to_string();
    let cache = std::env::var_os("DRBD_REACTOR_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|c| Path::new(&c).join("drbd-reactor-tools"))
        })
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/drbd-reactor-tools"))
        })
        .unwrap_or_else(|| PathBuf::from("/root/.cache/drbd-reactor-tools"));
    cache.join(k8s).join("bin")
}

const ENVTEST_HINT: &str =
    "build it with tests/infra/envtest/tools.sh (cached after the first run)";

fn helm(test: &str) -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HELM") {
        return Some(h.into());
    }
    let cached = envtest_bin_dir().join("helm");
    if cached.is_file() {
        return Some(cached);
    }
    on_path("helm").or_else(|| missing(test, "helm", ENVTEST_HINT))
}

fn promtool(test: &str) -> Option<PathBuf> {
    on_path("promtool").or_else(|| {
        missing(
            test,
            "promtool",
            "apt-get install -y --no-install-recommends prometheus",
        )
    })
}

fn python_module(test: &str, module: &str, package: &str) -> Option<()> {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Some(())
    } else {
        missing(
            test,
            &format!("python3 module {module}"),
            &format!("pip install {package} (as .ci/run does)"),
        )
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        clip(&String::from_utf8_lossy(&out.stdout)),
        clip(&String::from_utf8_lossy(&out.stderr))
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// At most the first 6000 characters (a rejected CRD's error list alone can be 300 kB).
fn clip(s: &str) -> String {
    match s.char_indices().nth(6000) {
        Some((i, _)) => format!("{}\n... ({} more bytes)", &s[..i], s.len() - i),
        None => s.to_string(),
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("chart-test.")
        .tempdir()
        .expect("temp dir")
}

// ---- rendering -----------------------------------------------------------------------------------------

/// `helm template drbd-reactor charts/drbd-reactor -n drbd-reactor ARGS...`.
fn render(helm: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new(helm)
            .args(["template", RELEASE])
            .arg(chart())
            .args(["--namespace", NAMESPACE])
            .args(args),
    )
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| {
            use serde::Deserialize;
            Value::deserialize(d).expect("rendered YAML parses")
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        };
    }
    cur
}

fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    s(v, path).as_str().unwrap_or("")
}

fn kind_names(objs: &[Value]) -> BTreeSet<(String, String)> {
    objs.iter()
        .map(|o| {
            (
                str_at(o, "kind").to_string(),
                str_at(o, "metadata.name").to_string(),
            )
        })
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    objs.iter()
        .find(|o| str_at(o, "kind") == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

// ---- lint, schema, render ------------------------------------------------------------------------------

#[test]
fn chart_lints_and_its_values_schema_rejects_bad_values() {
    let Some(helm) = helm("chart_lints_and_its_values_schema_rejects_bad_values") else {
        return;
    };
    run_ok(Command::new(&helm).args(["lint", "--strict"]).arg(chart()));
    run_ok(
        Command::new(&helm)
            .args(["lint", "--strict", "-f"])
            .arg(values_all())
            .arg(chart()),
    );
    for (set_arg, expect) in [
        ("bogus=1", "additional properties 'bogus' not allowed"),
        ("agent.logFormat=xml", "/agent/logFormat"),
        ("agent.port=70000", "/agent/port"),
        ("systemd.unitDir=relative", "/systemd/unitDir"),
        (
            "prometheusRule.disabledAlerts[0]=NoSuchAlert",
            "/prometheusRule/disabledAlerts/0",
        ),
        ("image.digest=latest", "/image/digest"),
        ("promoter.enabled=yes", "/promoter/enabled"),
        ("umh.hostCommands=1", "/umh/hostCommands"),
        (
            "promoter.bogus=true",
            "additional properties 'bogus' not allowed",
        ),
        (
            "rbac.eventsNamespace=Not_A_Namespace",
            "/rbac/eventsNamespace",
        ),
        ("networkPolicy.enabled=maybe", "/networkPolicy/enabled"),
        (
            "networkPolicy.from[0].nodeSelector.a=b",
            "/networkPolicy/from/0",
        ),
    ] {
        let out = run(Command::new(&helm)
            .args(["template", RELEASE])
            .arg(chart())
            .args(["--set", set_arg]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expect),
            "--set {set_arg} should be rejected by values.schema.json with '{expect}'; got {}: {err}",
            out.status
        );
    }
}

/// The default (exporter-only) container: not privileged, a read-only root, every capability dropped
/// but the three `nsenter --target 1 --mount --uts -- drbdsetup` needs.
fn assert_default_confinement(c: &Value) {
    let sc = s(c, "securityContext");
    assert_eq!(sc["privileged"], Value::Bool(false), "{sc:?}");
    assert_eq!(sc["readOnlyRootFilesystem"], Value::Bool(true));
    assert_eq!(
        s(sc, "capabilities.drop").as_sequence().unwrap(),
        &[Value::from("ALL")]
    );
    let add: BTreeSet<&str> = s(sc, "capabilities.add")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(add, ["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE"].into());
    assert_eq!(str_at(sc, "seccompProfile.type"), "RuntimeDefault");
}

#[test]
fn default_render_is_the_agreed_set_of_objects() {
    let Some(helm) = helm("default_render_is_the_agreed_set_of_objects") else {
        return;
    };
    let objs = docs(&render(&helm, &[]));
    assert_eq!(
        kind_names(&objs),
        set(&[
            ("ServiceAccount", "drbd-reactor"),
            ("ClusterRole", "drbd-reactor"),
            ("ClusterRoleBinding", "drbd-reactor"),
            ("Role", "drbd-reactor"),
            ("RoleBinding", "drbd-reactor"),
            ("Role", "drbd-reactor-events"),
            ("RoleBinding", "drbd-reactor-events"),
            ("Service", "drbd-reactor-metrics"),
            ("DaemonSet", "drbd-reactor"),
            ("ReactorPolicy", "metrics"),
        ])
    );
    for o in &objs {
        let kind = str_at(o, "kind");
        let ns = str_at(o, "metadata.namespace");
        let cluster_scoped = matches!(kind, "ClusterRole" | "ClusterRoleBinding" | "ReactorPolicy");
        assert_eq!(ns.is_empty(), cluster_scoped, "{kind}: namespace '{ns}'");
        // Events of cluster-scoped objects (the policies) go to `default`: the agent may write there.
        let events = str_at(o, "metadata.name") == "drbd-reactor-events";
        if !cluster_scoped {
            assert_eq!(ns, if events { "default" } else { NAMESPACE }, "{kind}");
        }
    }

    // RBAC: exactly the rules agreed in issue #7, nothing else.
    let rules = |o: &Value| -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for r in s(o, "rules").as_sequence().expect("rules") {
            for g in r["apiGroups"].as_sequence().expect("apiGroups") {
                for res in r["resources"].as_sequence().expect("resources") {
                    for v in r["verbs"].as_sequence().expect("verbs") {
                        out.insert((
                            g.as_str().unwrap().to_string(),
                            res.as_str().unwrap().to_string(),
                            v.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
        out
    };
    let t = |g: &str, r: &str, v: &str| (g.to_string(), r.to_string(), v.to_string());
    let cluster: BTreeSet<_> = [
        t("reactor.drbd.io", "reactorpolicies", "get"),
        t("reactor.drbd.io", "reactorpolicies", "list"),
        t("reactor.drbd.io", "reactorpolicies", "watch"),
        t("reactor.drbd.io", "reactorpolicies/status", "patch"),
        t("", "nodes", "get"),
        t("", "nodes", "list"),
        t("", "nodes", "watch"),
    ]
    .into();
    assert_eq!(rules(find(&objs, "ClusterRole")), cluster);
    let named = |kind: &str, name: &str| -> &Value {
        objs.iter()
            .find(|o| str_at(o, "kind") == kind && str_at(o, "metadata.name") == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    // Events only in the namespace they go to.
    let events: BTreeSet<_> = [
        t("events.k8s.io", "events", "create"),
        t("events.k8s.io", "events", "patch"),
    ]
    .into();
    assert_eq!(rules(named("Role", "drbd-reactor-events")), events);
    assert_eq!(
        str_at(named("RoleBinding", "drbd-reactor-events"), "roleRef.name"),
        "drbd-reactor-events"
    );
    let ns_rules: BTreeSet<_> = [
        t("", "configmaps", "get"),
        t("", "configmaps", "list"),
        t("", "configmaps", "watch"),
    ]
    .into();
    assert_eq!(rules(named("Role", "drbd-reactor")), ns_rules);
    for b in [
        named("ClusterRoleBinding", "drbd-reactor"),
        named("RoleBinding", "drbd-reactor"),
        named("RoleBinding", "drbd-reactor-events"),
    ] {
        assert_eq!(str_at(b, "subjects.0.kind"), "ServiceAccount");
        assert_eq!(str_at(b, "subjects.0.name"), "drbd-reactor");
        assert_eq!(str_at(b, "subjects.0.namespace"), NAMESPACE);
    }

    // The DaemonSet.
    let ds = find(&objs, "DaemonSet");
    let pod = s(ds, "spec.template.spec");
    assert_eq!(pod["hostPID"], Value::Bool(true), "nsenter needs hostPID");
    assert_eq!(pod["hostNetwork"], Value::Bool(false));
    assert_eq!(str_at(pod, "serviceAccountName"), "drbd-reactor");
    assert_eq!(str_at(pod, "priorityClassName"), "system-node-critical");
    assert_eq!(str_at(ds, "spec.updateStrategy.type"), "RollingUpdate");
    assert_eq!(
        s(ds, "spec.updateStrategy.rollingUpdate.maxUnavailable").as_u64(),
        Some(1)
    );
    let tolerated: BTreeSet<&str> = s(pod, "tolerations")
        .as_sequence()
        .expect("tolerations")
        .iter()
        .map(|t| str_at(t, "key"))
        .collect();
    for key in [
        "drbd.linbit.com/lost-quorum",
        "drbd.linbit.com/force-io-error",
        "node-role.kubernetes.io/control-plane",
    ] {
        assert!(tolerated.contains(key), "toleration {key} missing");
    }
    let c = s(pod, "containers.0");
    assert_eq!(str_at(c, "image"), "drbd-reactor:0.1.0");
    // Exporter only: not privileged, every capability dropped but what nsenter and drbdsetup need.
    assert_default_confinement(c);
    assert_eq!(str_at(c, "args.0"), "agent");
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--listen=:9942"), "{args:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--policy-dir")),
        "Kubernetes mode: no --policy-dir"
    );
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--systemd-bus") || a.starts_with("--unit-dir")),
        "defaults need no promoter flags: {args:?}"
    );
    // ... and the agent refuses what the unprivileged pod cannot do
    for a in ["--allow-promoter=false", "--allow-host-commands=false"] {
        assert!(args.contains(&a), "{a} missing: {args:?}");
    }
    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                str_at(e, "name"),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(env.get("NODE_NAME"), Some(&"spec.nodeName"));
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));
    assert_eq!(str_at(c, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(str_at(c, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(str_at(c, "ports.0.name"), "metrics");
    assert_eq!(s(c, "ports.0.containerPort").as_u64(), Some(9942));
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (str_at(m, "name"), str_at(m, "mountPath")))
        .collect();
    let host: BTreeMap<&str, (&str, &str)> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| {
            (
                str_at(v, "name"),
                (str_at(v, "hostPath.path"), str_at(v, "hostPath.type")),
            )
        })
        .collect();
    assert!(
        host.is_empty(),
        "exporter only: no host directory or socket is mounted: {host:?}"
    );
    for (name, (path, _)) in &host {
        assert_eq!(
            mounts.get(name),
            Some(path),
            "host path {path} mounted at the same place"
        );
    }
    assert_eq!(mounts.get("run"), Some(&"/run/drbd-reactor"));

    // The Service selects exactly the DaemonSet's pods, on the metrics port.
    let svc = find(&objs, "Service");
    let pod_labels = s(ds, "spec.template.metadata.labels").as_mapping().unwrap();
    for (k, v) in s(svc, "spec.selector").as_mapping().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "service selector {k:?}");
    }
    assert_eq!(str_at(svc, "spec.ports.0.targetPort"), "metrics");

    // The default policy enables the exporter with enums (the alerts and the dashboard use them).
    let pol = find(&objs, "ReactorPolicy");
    assert_eq!(str_at(pol, "apiVersion"), "reactor.drbd.io/v1alpha1");
    assert_eq!(s(pol, "spec.prometheus.enums"), &Value::Bool(true));
    // ... and the agent itself accepts it (file-mode parser = the same types and validation).
    let yaml = serde_yaml::to_string(pol).unwrap();
    let parsed =
        drbd_reactor::policy::parse_documents(&yaml).expect("the agent accepts the policy");
    assert_eq!(parsed.len(), 1);
}

#[test]
fn optional_objects_and_value_switches_render_as_documented() {
    let Some(helm) = helm("optional_objects_and_value_switches_render_as_documented") else {
        return;
    };
    let all = docs(&render(&helm, &["-f", values_all().to_str().unwrap()]));
    let kinds = kind_names(&all);
    for k in [
        ("Namespace", NAMESPACE),
        ("ServiceMonitor", "drbd-reactor"),
        ("PrometheusRule", "drbd-reactor"),
        ("ConfigMap", "drbd-reactor-dashboard"),
    ] {
        assert!(
            kinds.contains(&(k.0.to_string(), k.1.to_string())),
            "{k:?} missing in {kinds:?}"
        );
    }
    let ns = find(&all, "Namespace");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged")
    );
    let sm = find(&all, "ServiceMonitor");
    assert_eq!(str_at(sm, "spec.endpoints.0.port"), "metrics");
    assert_eq!(
        str_at(sm, "spec.endpoints.0.relabelings.0.targetLabel"),
        "node"
    );
    let cm = find(&all, "ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1"),
        "the Grafana sidecar's label"
    );
    let file = std::fs::read_to_string(chart().join("dashboards/drbd-reactor.json")).unwrap();
    assert_eq!(
        cm["data"]["drbd-reactor.json"].as_str().map(str::trim_end),
        Some(file.trim_end()),
        "the ConfigMap carries the dashboard file unchanged"
    );

    // A rule can be switched off; extra labels reach every alert.
    let rules = docs(&render(
        &helm,
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "prometheusRule.disabledAlerts={DrbdUmhFailures}",
            "--set",
            "prometheusRule.alertLabels.team=storage",
        ],
    ));
    let pr = find(&rules, "PrometheusRule");
    let alerts = s(pr, "spec.groups.0.rules").as_sequence().unwrap();
    assert!(alerts
        .iter()
        .all(|a| str_at(a, "alert") != "DrbdUmhFailures"));
    assert_eq!(alerts.len(), 10);
    assert!(alerts.iter().all(|a| str_at(a, "labels.team") == "storage"));

    // kind-style nodes: systemd's private socket instead of the D-Bus daemon.
    let kind = docs(&render(
        &helm,
        &[
            "--set",
            "promoter.enabled=true",
            "--set",
            "systemd.mountDbusSocket=false",
            "--set",
            "systemd.mountRunSystemd=true",
            "--set",
            "systemd.bus=unix:path=/run/systemd/private",
            "--set",
            "hostNetwork=true",
        ],
    ));
    let pod = s(find(&kind, "DaemonSet"), "spec.template.spec");
    let vols: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(vols, ["/run/systemd"]);
    let args = serde_yaml::to_string(&pod["containers"][0]["args"]).unwrap();
    assert!(
        args.contains("--systemd-bus=unix:path=/run/systemd/private"),
        "{args}"
    );
    assert_eq!(str_at(pod, "dnsPolicy"), "ClusterFirstWithHostNet");

    // The promoter (or host UMH commands) turns privilege on, with the host's systemd mounted.
    for set_arg in ["promoter.enabled=true", "umh.hostCommands=true"] {
        let objs = docs(&render(&helm, &["--set", set_arg]));
        let pod = s(find(&objs, "DaemonSet"), "spec.template.spec");
        let c = s(pod, "containers.0");
        assert_eq!(
            s(c, "securityContext.privileged"),
            &Value::Bool(true),
            "{set_arg}"
        );
        assert!(c["securityContext"]["capabilities"].is_null(), "{set_arg}");
        let args = serde_yaml::to_string(&c["args"]).unwrap();
        let refused = if set_arg.starts_with("promoter") {
            "--allow-host-commands=false"
        } else {
            "--allow-promoter=false"
        };
        assert!(args.contains(refused), "{set_arg}: {args}");
        assert_eq!(args.matches("--allow-").count(), 1, "{set_arg}: {args}");
        let host: BTreeSet<(&str, &str)> = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|v| !v["hostPath"].is_null())
            .map(|v| (str_at(v, "hostPath.path"), str_at(v, "hostPath.type")))
            .collect();
        let want: BTreeSet<(&str, &str)> = if set_arg.starts_with("promoter") {
            [
                ("/run/systemd/system", "Directory"),
                ("/run/dbus/system_bus_socket", "Socket"),
            ]
            .into()
        } else {
            BTreeSet::new()
        };
        assert_eq!(host, want, "{set_arg}");
        let mounts: BTreeSet<&str> = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| str_at(m, "mountPath"))
            .collect();
        for (path, _) in &want {
            assert!(mounts.contains(path), "{set_arg}: {path} mounted");
        }
    }

    // The optional NetworkPolicy: only the metrics port of the agents' pods, only from `from`.
    let np_objs = docs(&render(&helm, &["--set", "networkPolicy.enabled=true"]));
    let np = find(&np_objs, "NetworkPolicy");
    assert_eq!(str_at(np, "metadata.namespace"), NAMESPACE);
    let pod_labels = s(find(&np_objs, "DaemonSet"), "spec.template.metadata.labels")
        .as_mapping()
        .unwrap();
    for (k, v) in s(np, "spec.podSelector.matchLabels").as_mapping().unwrap() {
        assert_eq!(pod_labels.get(k), Some(v), "podSelector {k:?}");
    }
    assert_eq!(
        s(np, "spec.policyTypes").as_sequence().unwrap(),
        &[Value::from("Ingress")]
    );
    assert_eq!(str_at(np, "spec.ingress.0.ports.0.port"), "metrics");
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"]
            .as_str(),
        Some("monitoring")
    );
    assert!(
        docs(&render(&helm, &[]))
            .iter()
            .all(|o| str_at(o, "kind") != "NetworkPolicy"),
        "off by default"
    );

    // No default policy, no ReactorPolicy object.
    let none = docs(&render(&helm, &["--set", "defaultPolicy.enabled=false"]));
    assert!(none.iter().all(|o| str_at(o, "kind") != "ReactorPolicy"));
}

#[test]
fn rendered_objects_validate_against_the_kubernetes_schemas() {
    let test = "rendered_objects_validate_against_the_kubernetes_schemas";
    let Some(helm) = helm(test) else { return };
    if python_module(test, "kubernetes_validate", "kubernetes-validate").is_none() {
        return;
    }
    let dir = tempdir();
    let default = dir.path().join("default.yaml");
    let all = dir.path().join("all.yaml");
    std::fs::write(&default, render(&helm, &["--include-crds"])).unwrap();
    std::fs::write(
        &all,
        render(
            &helm,
            &["--include-crds", "-f", values_all().to_str().unwrap()],
        ),
    )
    .unwrap();
    // The chart's kubeVersion floor, the envtest apiserver's version, the newest schema set.
    for version in ["1.30.0", "1.34.0", "1.37.0"] {
        let out = run(Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .arg(&default)
            .arg(&all));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{text}"
        );
        // Only the custom resources have no built-in schema (they are checked by the apiserver test and
        // promtool); every built-in object was validated.
        let skipped: BTreeSet<&str> = text
            .lines()
            .filter(|l| l.contains("Couldn't find schema for kind"))
            .filter_map(|l| l.split("for kind ").nth(1)?.split(' ').next())
            .collect();
        assert_eq!(
            skipped,
            ["PrometheusRule", "ReactorPolicy", "ServiceMonitor"].into(),
            "{text}"
        );
        assert!(!text.contains("ERROR"), "{text}");
    }
}

// ---- manifests/ and the CRD ----------------------------------------------------------------------------

#[test]
fn manifests_are_the_rendered_chart() {
    let Some(helm) = helm("manifests_are_the_rendered_chart") else {
        return;
    };
    let dir = tempdir();
    run_ok(
        Command::new(root().join("scripts/render-manifests.sh"))
            .arg(dir.path())
            .env("HELM", &helm),
    );
    let mut drift = Vec::new();
    for f in MANIFESTS {
        let fresh = std::fs::read_to_string(dir.path().join(f))
            .unwrap_or_else(|e| panic!("render-manifests.sh wrote no {f}: {e}"));
        match std::fs::read_to_string(root().join("manifests").join(f)) {
            Ok(committed) if committed == fresh => {}
            Ok(_) => drift.push(format!("manifests/{f} differs")),
            Err(e) => drift.push(format!("manifests/{f}: {e}")),
        }
    }
    assert!(
        drift.is_empty(),
        "manifests/ drifted from the chart ({}); run scripts/render-manifests.sh and commit",
        drift.join(", ")
    );
    // Every object of manifests/ is in the namespace it creates (or cluster-scoped).
    let mut n = 0;
    for f in MANIFESTS {
        let text = std::fs::read_to_string(root().join("manifests").join(f)).unwrap();
        for o in docs(&text) {
            n += 1;
            let ns = str_at(&o, "metadata.namespace");
            // the Events Role: where the Events of cluster-scoped policies go
            let events = str_at(&o, "metadata.name") == "drbd-reactor-events";
            assert!(
                ns.is_empty() || ns == NAMESPACE || (events && ns == "default"),
                "{f}: namespace {ns}"
            );
        }
    }
    assert!(n >= 10, "only {n} objects in manifests/");
}

#[test]
fn chart_crd_is_the_rust_types_crd() {
    let path = chart().join("crds").join(CRD_FILE);
    let crd = ReactorPolicy::crd();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        let text = format!(
            "# ReactorPolicy CRD, generated from drbd_reactor::policy::ReactorPolicy\n\
             # (UPDATE_GOLDEN=1 cargo test --test chart); do not edit.\n{}",
            serde_yaml::to_string(&crd).unwrap()
        );
        std::fs::write(&path, text).unwrap();
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    let committed: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        committed,
        serde_yaml::to_value(&crd).unwrap(),
        "{} differs from ReactorPolicy::crd(); regenerate with UPDATE_GOLDEN=1 cargo test --test chart",
        path.display()
    );
    // The repository's crds/ (written by `drbd-reactor crd`) and the chart's copy are the same file.
    let top = root().join("crds").join(CRD_FILE);
    if top.exists() {
        let top_value: Value =
            serde_yaml::from_str(&std::fs::read_to_string(&top).unwrap()).unwrap();
        assert_eq!(
            top_value,
            committed,
            "crds/{CRD_FILE} and charts/drbd-reactor/crds/{CRD_FILE} differ: copy crds/ into the chart"
        );
    }
}

// ---- a real kube-apiserver -----------------------------------------------------------------------------

/// etcd + kube-apiserver from tests/infra/envtest, stopped on drop.
struct Envtest {
    dir: PathBuf,
    kubeconfig: PathBuf,
    bin: PathBuf,
}

impl Envtest {
    fn start(test: &str) -> Option<Envtest> {
        let bin = envtest_bin_dir();
        for b in ["etcd", "kube-apiserver", "kubectl", "helm"] {
            if !bin.join(b).is_file() {
                return missing(test, &format!("{}", bin.join(b).display()), ENVTEST_HINT);
            }
        }
        let out = run_ok(
            Command::new(root().join("tests/infra/envtest/start.sh"))
                .env("ENVTEST_BIN_DIR", &bin)
                .env("ENVTEST_START_TIMEOUT", "180"),
        );
        let dir = PathBuf::from(out.trim());
        Some(Envtest {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            bin,
        })
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new(self.bin.join("kubectl"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    fn helm(&self) -> Command {
        let mut c = Command::new(self.bin.join("helm"));
        c.arg("--kubeconfig").arg(&self.kubeconfig);
        c
    }

    /// `kubectl auth can-i` as the agent's ServiceAccount.
    fn agent_can(&self, args: &[&str]) -> bool {
        let out = run(self
            .kubectl()
            .args(["auth", "can-i"])
            .args(args)
            .arg(format!(
                "--as=system:serviceaccount:{NAMESPACE}:drbd-reactor"
            )));
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            answer == "yes" || answer == "no",
            "kubectl auth can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer == "yes"
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new(root().join("tests/infra/envtest/stop.sh"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
    }
}

#[test]
fn chart_and_manifests_apply_to_a_real_kube_apiserver() {
    let test = "chart_and_manifests_apply_to_a_real_kube_apiserver";
    let Some(env) = Envtest::start(test) else {
        return;
    };
    let m = root().join("manifests");
    // CRD and namespace for real (the rest of manifests/ needs them), then everything else as a
    // server-side dry run: admission, defaulting and the CRD's schema all check the objects.
    let crd = run(env
        .kubectl()
        .args(["apply", "--server-side", "-f"])
        .arg(m.join("crds.yaml")));
    // The CRD generated from the Rust types must be structural, or the apiserver refuses it. If it
    // does, the rest of this test runs against a stand-in CRD (same names, schema-less) and the test
    // fails at the end with the apiserver's reasons.
    let crd_error = (!crd.status.success()).then(|| {
        let err = String::from_utf8_lossy(&crd.stderr).to_string();
        let reasons: Vec<&str> = err.lines().filter(|l| l.starts_with("* ")).collect();
        eprintln!(
            "!!!! the apiserver rejects manifests/crds.yaml ({} reasons); continuing with a stand-in CRD",
            reasons.len()
        );
        let stand_in = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: reactorpolicies.reactor.drbd.io}\nspec:\n  group: reactor.drbd.io\n  names: {kind: ReactorPolicy, plural: reactorpolicies, singular: reactorpolicy, shortNames: [rpol]}\n  scope: Cluster\n  versions:\n    - name: v1alpha1\n      served: true\n      storage: true\n      subresources: {status: {}}\n      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";
        let mut c = env.kubectl();
        c.args(["apply", "--server-side", "-f", "-"]).stdin(Stdio::piped());
        let mut child = c.stdout(Stdio::null()).spawn().expect("kubectl");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stand_in.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "stand-in CRD");
        format!(
            "the kube-apiserver rejects the ReactorPolicy CRD generated from the Rust types \
             (ReactorPolicy::crd(), charts/drbd-reactor/crds/, manifests/crds.yaml) with {} reasons, e.g.:\n{}",
            reasons.len(),
            if reasons.is_empty() {
                err.clone()
            } else {
                reasons.iter().take(8).copied().collect::<Vec<_>>().join("\n")
            }
        )
    });
    crd_established_and_namespace(&env);
    let mut dry = env.kubectl();
    dry.args(["apply", "--server-side", "--dry-run=server"]);
    for f in [
        "rbac.yaml",
        "daemonset.yaml",
        "service.yaml",
        "policies.yaml",
    ] {
        dry.arg("-f").arg(m.join(f));
    }
    let out = run_ok(&mut dry);
    assert!(
        out.contains("daemonset.apps/drbd-reactor serverside-applied (server dry run)"),
        "{out}"
    );
    assert!(
        out.contains("reactorpolicy.reactor.drbd.io/metrics serverside-applied (server dry run)"),
        "{out}"
    );

    // The CRD's schema rejects a malformed policy.
    let dir = tempdir();
    if crd_error.is_none() {
        check_bad_policy_rejected(&env, &dir);
    }

    // The all-options render, minus the prometheus-operator kinds (no such CRDs here), dry-run as well.
    all_options_dry_run(&env, &dir);
    helm_install_and_rbac(&env, crd_error.is_some());
    if let Some(e) = crd_error {
        panic!("{e}");
    }
}

/// YAML files under the checked directories that are not Kubernetes objects, and what reads them instead.
const NOT_KUBERNETES: &[(&str, &str)] = &[
    (
        "e2e/kind/cluster.yaml",
        "kind's own cluster config (kind.x-k8s.io), read by `kind create cluster`",
    ),
    (
        "e2e/kind/values.yaml",
        "Helm values: the chart rendered with them is checked below",
    ),
    (
        "examples/scenarios/",
        "drbd-sim scenarios (tests/sim_cli.rs runs them)",
    ),
];

/// Every `.yaml`/`.yml` file under `dir` (relative to the repository), sorted.
fn yaml_files(dir: &str) -> Vec<String> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join(dir), &mut out);
    let mut rel: Vec<String> = out
        .iter()
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    rel.sort();
    rel
}

/// The ```yaml blocks of the tracked Markdown files that are ReactorPolicies: (label "file:line", block).
fn doc_policy_blocks() -> Vec<(String, String)> {
    let files = run_ok(
        Command::new("git")
            .arg("-C")
            .arg(root())
            .args(["ls-files", "*.md"]),
    );
    let mut out = Vec::new();
    for f in files.lines() {
        let text = std::fs::read_to_string(root().join(f)).unwrap();
        let mut block: Option<(usize, String)> = None;
        for (i, line) in text.lines().enumerate() {
            match &mut block {
                None if line.trim_start().starts_with("```yaml")
                    || line.trim_start().starts_with("```yml") =>
                {
                    block = Some((i + 1, String::new()))
                }
                Some((start, b)) if line.trim_start().starts_with("```") => {
                    if b.lines().any(|l| l.trim() == "kind: ReactorPolicy") {
                        out.push((format!("{f}:{start}"), std::mem::take(b)));
                    }
                    block = None;
                }
                Some((_, b)) => {
                    b.push_str(line);
                    b.push('\n');
                }
                None => {}
            }
        }
    }
    out
}

/// `yaml` with every UMH `script: {path: P}` replaced by `script: {configMapRef: {name, key}}`, and how
/// many there were.
fn kubernetes_twin(yaml: &str) -> (String, usize) {
    fn walk(v: &mut Value, n: &mut usize) {
        match v {
            Value::Mapping(m) => {
                for (k, val) in m.iter_mut() {
                    if k.as_str() == Some("script") && val.get("path").is_some() {
                        let key = val["path"]
                            .as_str()
                            .unwrap_or("script")
                            .rsplit('/')
                            .next()
                            .unwrap()
                            .to_string();
                        *val = serde_yaml::from_str(&format!(
                            "{{configMapRef: {{name: policy-scripts, key: {key}}}}}"
                        ))
                        .unwrap();
                        *n += 1;
                    } else {
                        walk(val, n);
                    }
                }
            }
            Value::Sequence(s) => s.iter_mut().for_each(|x| walk(x, n)),
            _ => {}
        }
    }
    let mut n = 0;
    let out: Vec<String> = docs(yaml)
        .into_iter()
        .map(|mut d| {
            walk(&mut d, &mut n);
            // JSON, not YAML: serde_yaml writes the string "yes" unquoted, which kubectl reads as a bool.
            serde_json::to_string(&d).unwrap()
        })
        .collect();
    if n == 0 {
        return (yaml.to_string(), 0);
    }
    (out.join("\n---\n"), n)
}

/// Point 4 of issue 17: every YAML the project ships for Kubernetes is checked by a real kube-apiserver
/// with the shipped CRD installed: a server-side dry run (`--dry-run=server --validate=strict`), so
/// admission, defaulting, the CRD's OpenAPI schema and its CEL rules all see each object. That covers
/// `examples/`, `e2e/kind/`, `manifests/`, the chart rendered with every values file the project ships
/// (defaults, e2e/kind/values.yaml, tests/infra/chart/values-all.yaml) and the ReactorPolicies in the
/// Markdown files' ```yaml blocks.
#[test]
fn every_shipped_yaml_passes_a_server_side_dry_run() {
    let test = "every_shipped_yaml_passes_a_server_side_dry_run";
    let Some(env) = Envtest::start(test) else {
        return;
    };
    run_ok(
        env.kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(root().join("crds").join(CRD_FILE)),
    );
    crd_established_and_namespace(&env);
    let dir = tempdir();
    let dry_run = |label: &str, yaml: &str| -> Result<usize, String> {
        let objs = docs(yaml);
        if objs.is_empty() {
            return Err(format!("{label}: no object"));
        }
        for o in &objs {
            if o.get("apiVersion").is_none() || o.get("kind").is_none() {
                return Err(format!("{label}: a document without apiVersion/kind"));
            }
        }
        let f = dir.path().join("object.yaml");
        std::fs::write(&f, yaml).unwrap();
        let out = run(env
            .kubectl()
            .args([
                "apply",
                "--server-side",
                "--dry-run=server",
                "--validate=strict",
                "-f",
            ])
            .arg(&f));
        if out.status.success() {
            Ok(objs.len())
        } else {
            Err(format!(
                "{label}: {}",
                clip(&String::from_utf8_lossy(&out.stderr))
            ))
        }
    };

    // The check can fail: the map form of promoter.resources that e2e/kind/promoter-policy.yaml had.
    let old = "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata: {name: old-form}\nspec:\n  promoter:\n    resources:\n      e2e:\n        start: [x.service]\n";
    let err = dry_run("the old map form", old)
        .expect_err("the map form of promoter.resources was accepted");
    assert!(err.contains("spec.promoter.resources"), "{err}");

    // Policy files for `drbd-reactor agent --policy-dir` (examples/policies/, some docs) may name UMH
    // scripts by `script.path`, which a CEL rule of the CRD refuses in Kubernetes (there it is
    // `configMapRef`). Such a file is checked twice: as it is, the apiserver must refuse it for that
    // reason alone; as its Kubernetes twin (each `script: {path}` made a `configMapRef`), it must pass.
    let mut checked: Vec<(String, usize)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut check = |label: String, yaml: &str| {
        let (twin, n_paths) = kubernetes_twin(yaml);
        if n_paths > 0 {
            match dry_run(&label, yaml) {
                Ok(_) => failed.push(format!("{label}: script.path accepted in Kubernetes")),
                Err(e) => {
                    let reasons: Vec<&str> =
                        e.lines().filter(|l| l.contains("Invalid value")).collect();
                    if reasons.len() != n_paths
                        || !reasons
                            .iter()
                            .all(|r| r.contains("script.path is for policy files"))
                    {
                        failed.push(format!(
                            "{label}: refused for other reasons than its {n_paths} script.path: {e}"
                        ));
                    }
                }
            }
        }
        match dry_run(&label, &twin) {
            Ok(n) => checked.push((
                if n_paths > 0 {
                    format!("{label} (policy-dir file: its Kubernetes twin, {n_paths} script.path -> configMapRef)")
                } else {
                    label
                },
                n,
            )),
            Err(e) => failed.push(e),
        }
    };
    for d in ["examples", "e2e/kind", "manifests"] {
        for f in yaml_files(d) {
            if NOT_KUBERNETES.iter().any(|(p, _)| f.starts_with(p)) {
                continue;
            }
            let yaml = std::fs::read_to_string(root().join(&f)).unwrap();
            check(f, &yaml);
        }
    }
    let helm = env.bin.join("helm");
    for (label, args) in [
        ("charts/ (defaults, with crds/)", vec!["--include-crds"]),
        (
            "charts/ -f e2e/kind/values.yaml",
            vec!["-f", "e2e/kind/values.yaml"],
        ),
        (
            "charts/ -f tests/infra/chart/values-all.yaml (without the prometheus-operator kinds: no such CRDs here)",
            vec!["-f", "tests/infra/chart/values-all.yaml"],
        ),
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if a.ends_with(".yaml") {
                    root().join(a).display().to_string()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let rest: Vec<String> = docs(&render(&helm, &args))
            .iter()
            .filter(|o| !str_at(o, "apiVersion").starts_with("monitoring.coreos.com/"))
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        check(label.to_string(), &rest.join("\n---\n"));
    }
    let blocks = doc_policy_blocks();
    for (label, yaml) in &blocks {
        check(label.clone(), yaml);
    }
    for (label, n) in &checked {
        eprintln!("dry-run ok: {label} ({n} objects)");
    }
    for (p, why) in NOT_KUBERNETES {
        eprintln!("not Kubernetes objects: {p}: {why}");
    }
    assert!(
        failed.is_empty(),
        "rejected by the apiserver:\n{}",
        failed.join("\n")
    );
    // What must be among the checked: the files issue 17 names and the documented policies.
    for must in [
        "e2e/kind/promoter-policy.yaml",
        "e2e/kind/umh-policy.yaml",
        "examples/policies/umh.yaml",
        "manifests/daemonset.yaml",
        "README.md:",
        "docs/promoter.md:",
        "docs/umh.md:",
        "docs/metrics.md:",
    ] {
        assert!(
            checked.iter().any(|(l, _)| l.starts_with(must)),
            "{must} was not checked: {checked:?}"
        );
    }
}

fn check_bad_policy_rejected(env: &Envtest, dir: &tempfile::TempDir) {
    let bad = "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata: {name: bad}\nspec:\n  prometheus: {enums: maybe}\n";
    std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
    let out = run(env
        .kubectl()
        .args(["apply", "--server-side", "--dry-run=server", "-f"])
        .arg(dir.path().join("bad.yaml")));
    assert!(
        !out.status.success(),
        "a policy with enums: maybe was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.prometheus.enums"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn all_options_dry_run(env: &Envtest, dir: &tempfile::TempDir) {
    let helm = env.bin.join("helm");
    let all = docs(&render(&helm, &["-f", values_all().to_str().unwrap()]));
    let rest: Vec<String> = all
        .iter()
        .filter(|o| !str_at(o, "apiVersion").starts_with("monitoring.coreos.com/"))
        .map(|o| serde_yaml::to_string(o).unwrap())
        .collect();
    std::fs::write(dir.path().join("all.yaml"), rest.join("---\n")).unwrap();
    run_ok(
        env.kubectl()
            .args(["apply", "--server-side", "--dry-run=server", "-f"])
            .arg(dir.path().join("all.yaml")),
    );
}

fn helm_install_and_rbac(env: &Envtest, stand_in_crd: bool) {
    // `helm install` with the defaults, for real (the CRD is already there, so Helm skips crds/).
    let mut install = env.helm();
    install
        .args(["install", RELEASE])
        .arg(chart())
        .args(["--namespace", NAMESPACE]);
    if stand_in_crd {
        install.arg("--skip-crds");
    }
    let out = run_ok(&mut install);
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(
        out.contains("kubectl get reactorpolicies"),
        "NOTES.txt shown: {out}"
    );
    let got = run_ok(env.kubectl().args([
        "get",
        "-n",
        NAMESPACE,
        "daemonset/drbd-reactor",
        "service/drbd-reactor-metrics",
        "serviceaccount/drbd-reactor",
        "reactorpolicy/metrics",
        "-o",
        "name",
    ]));
    assert_eq!(got.lines().count(), 4, "{got}");

    // The agent's ServiceAccount may do exactly what it needs.
    for (args, allowed) in [
        (&["list", "reactorpolicies.reactor.drbd.io"][..], true),
        (&["watch", "reactorpolicies.reactor.drbd.io"], true),
        (
            &[
                "patch",
                "reactorpolicies.reactor.drbd.io",
                "--subresource=status",
            ],
            true,
        ),
        (&["update", "reactorpolicies.reactor.drbd.io"], false),
        (&["delete", "reactorpolicies.reactor.drbd.io"], false),
        (&["watch", "nodes"], true),
        (&["patch", "nodes"], false),
        (&["create", "events.events.k8s.io", "-n", "default"], true),
        (&["patch", "events.events.k8s.io", "-n", "default"], true),
        (&["create", "events", "-n", "default"], false),
        (&["list", "configmaps", "-n", NAMESPACE], true),
        (&["watch", "configmaps", "-n", NAMESPACE], true),
        (&["list", "configmaps", "-n", "default"], false),
        (&["create", "configmaps", "-n", NAMESPACE], false),
        (&["get", "secrets", "-n", NAMESPACE], false),
        (&["list", "pods", "-n", NAMESPACE], false),
        (&["create", "pods/eviction", "-n", NAMESPACE], false),
    ] {
        assert_eq!(env.agent_can(args), allowed, "can-i {args:?}");
    }

    run_ok(
        env.helm()
            .args(["uninstall", RELEASE, "--namespace", NAMESPACE]),
    );
    let out = run(env
        .kubectl()
        .args(["get", "-n", NAMESPACE, "daemonset/drbd-reactor"]));
    assert!(
        !out.status.success(),
        "the DaemonSet outlived helm uninstall"
    );
}

// ---- alerts, dashboard and the metrics the exporter emits ---------------------------------------------

fn rendered_rules(helm: &Path) -> Value {
    let objs = docs(&render(helm, &["--set", "prometheusRule.enabled=true"]));
    s(find(&objs, "PrometheusRule"), "spec").clone()
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let test = "alert_rules_pass_promtool_check_and_unit_tests";
    let Some(helm) = helm(test) else { return };
    let Some(promtool) = promtool(test) else {
        return;
    };
    let dir = tempdir();
    let spec = rendered_rules(&helm);
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_yaml::to_string(&spec).unwrap(),
    )
    .unwrap();
    let out = run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.path().join("rules.yaml")),
    );
    assert!(out.contains("SUCCESS: 11 rules found"), "{out}");
    // Behaviour: promtool's rule unit tests (tests/infra/chart/alerts.test.yaml) feed series with the
    // exporter's names and labels and expect exactly the listed alerts.
    std::fs::copy(
        root().join("tests/infra/chart/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(dir.path().join("alerts.test.yaml")),
    );
}

/// Labels Prometheus adds to every series of a target (ServiceMonitor's default target labels plus the
/// chart's `node` relabeling).
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "node",
    "namespace",
    "pod",
    "service",
    "endpoint",
    "container",
];

/// Series Prometheus itself writes for every scrape target.
const SYNTHETIC: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
];

/// Every metric family the agent emits, with its label names where known.
fn emitted_families() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let mut fams: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
    let mut add_text = |text: &str| {
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (name, labels) = match line.find('{') {
                Some(i) => (&line[..i], &line[i + 1..line.rfind('}').unwrap()]),
                None => (line.split(' ').next().unwrap(), ""),
            };
            let set = fams
                .entry(name.to_string())
                .or_insert_with(|| Some(BTreeSet::new()));
            if let Some(set) = set {
                for kv in split_labels(labels) {
                    set.insert(kv);
                }
            }
        }
    };
    // DRBD families: the exporter's rendering of every shared events2 sample, with enums.
    let data = root().join("tests/data/events2");
    let mut samples = 0;
    for e in std::fs::read_dir(&data).expect("tests/data/events2") {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("txt") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let mut engine = Engine::new();
        let mut out = Vec::new();
        engine.apply_chunk(&bytes, &mut out);
        let view = View {
            resources: engine.state.snapshot(),
            enums: true,
            version: DrbdVersion {
                kmod: (9, 2, 12),
                utils: (9, 30, 0),
            },
            // Both spellings of the peer byte counters, so a query may use either.
            peer_byte_counters: render::PeerByteCounters::Both,
        };
        add_text(&render::to_text(&view));
        samples += 1;
    }
    assert!(
        samples >= 20,
        "only {samples} samples in {}",
        data.display()
    );
    // The agent's own families, each vector with one series so that it is exposed.
    let m = AgentMetrics::new();
    m.lines.inc();
    m.reloads.with_label_values(&["ok"]).inc();
    m.plugin_instances
        .with_label_values(&["umh", "running"])
        .set(1);
    m.plugin_errors.with_label_values(&["umh"]).inc();
    m.plugin_restarts.with_label_values(&["umh"]).inc();
    m.policies.with_label_values(&["applied"]).set(1);
    m.batch_seconds.observe(0.001);
    m.umh_runs.with_label_values(&["p", "r", "0"]).inc();
    m.umh_duration.with_label_values(&["p", "r"]).observe(0.1);
    m.promoter_actions
        .with_label_values(&["r", "start", "ok"])
        .inc();
    let mut buf = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &m.registry.gather(),
        &mut buf,
    )
    .unwrap();
    add_text(&String::from_utf8(buf).unwrap());
    // Families docs/metrics.md lists that only exist while a plugin is active (labels not checked when
    // they were not seen above).
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    for line in doc.lines() {
        if let Some(rest) = line.strip_prefix("| `") {
            let name = rest.split('`').next().unwrap();
            if name.starts_with("drbd") {
                fams.entry(name.to_string()).or_insert(None);
            }
        }
    }
    fams
}

/// Label names of `a="x",b="y"` (values may contain commas and escaped quotes).
fn split_labels(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let name = name.trim().trim_start_matches(',').trim().to_string();
        if name.is_empty() {
            break;
        }
        out.push(name);
        if chars.next() != Some('"') {
            break;
        }
        let mut esc = false;
        for c in chars.by_ref() {
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                break;
            }
        }
    }
    out
}

/// The metric names a PromQL expression selects, each with the label names its matchers use.
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    const AGGR: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let b: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_whitespace() {
            i += 1;
        }
        i
    };
    let skip_group = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < b.len() {
            if b[i] == open {
                depth += 1;
            } else if b[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        i
    };
    let skip_string = |mut i: usize| {
        let q = b[i];
        i += 1;
        while i < b.len() && b[i] != q {
            if b[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        i + 1
    };
    let matchers = |mut i: usize| -> (usize, Vec<String>) {
        let mut names = Vec::new();
        i += 1; // '{'
        loop {
            i = skip_ws(i);
            if i >= b.len() || b[i] == '}' {
                return (i + 1, names);
            }
            if b[i] == ',' {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            names.push(b[start..i].iter().collect());
            while i < b.len() && !matches!(b[i], '"' | '\'' | '`') {
                i += 1;
            }
            if i < b.len() {
                i = skip_string(i);
            }
        }
    };
    while i < b.len() {
        let c = b[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(i);
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '{' {
            i = matchers(i).0;
        } else if c.is_ascii_digit() || c == '.' {
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '.' || b[i] == '_') {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_' || b[i] == ':') {
                i += 1;
            }
            let ident: String = b[start..i].iter().collect();
            let j = skip_ws(i);
            if LABEL_LISTS.contains(&ident.as_str()) {
                if j < b.len() && b[j] == '(' {
                    i = skip_group(j, '(', ')');
                }
            } else if KEYWORDS.contains(&ident.as_str()) || AGGR.contains(&ident.as_str()) {
            } else if j < b.len() && b[j] == '(' {
                // a function
            } else if j < b.len() && b[j] == '{' {
                let (next, labels) = matchers(j);
                out.push((ident, labels));
                i = next;
            } else {
                out.push((ident, Vec::new()));
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_selector_scanner_finds_names_and_matchers() {
    assert_eq!(
        selectors(
            r#"sum by (node, name) (rate(foo_total{a="x,}y", b=~"$v"}[5m] offset 1h)) > 0 and on (name) bar unless count(baz:rec) by (le) > bool 2e3"#
        ),
        vec![
            (
                "foo_total".to_string(),
                vec!["a".to_string(), "b".to_string()]
            ),
            ("bar".to_string(), vec![]),
            ("baz:rec".to_string(), vec![]),
        ]
    );
    assert_eq!(
        selectors("histogram_quantile(0.99, sum by (le) (rate(x_bucket[$__rate_interval])))"),
        vec![("x_bucket".to_string(), vec![])]
    );
    assert_eq!(split_labels(r#"a="1",b="x\",y",c="""#), ["a", "b", "c"]);
}

/// Grafana's variables replaced by values PromQL accepts, so promtool can parse dashboard queries.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
}

/// Every PromQL expression of the dashboard: panel targets and query variables (`label_values(sel, l)`
/// queries contribute their selector).
fn dashboard_queries(dash: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(p: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(ts) = p["targets"].as_array() {
            for t in ts {
                let e = t["expr"].as_str().unwrap_or("");
                assert!(
                    !e.is_empty(),
                    "panel '{}' has a target without expr",
                    p["title"]
                );
                out.push(e.to_string());
            }
        }
        if let Some(ps) = p["panels"].as_array() {
            for c in ps {
                walk(c, out);
            }
        }
    }
    for p in dash["panels"].as_array().expect("panels") {
        walk(p, &mut out);
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap();
            assert_eq!(
                v["definition"].as_str(),
                Some(q),
                "variable {}: definition and query differ",
                v["name"]
            );
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.rsplit_once(','))
                .map(|(sel, _)| sel.to_string())
                .unwrap_or_else(|| q.to_string());
            out.push(inner);
        }
    }
    out
}

#[test]
fn dashboard_and_alerts_query_only_metrics_the_exporter_emits() {
    let test = "dashboard_and_alerts_query_only_metrics_the_exporter_emits";
    let Some(helm) = helm(test) else { return };
    let Some(promtool) = promtool(test) else {
        return;
    };

    // The dashboard: valid JSON, unique panel ids, on the datasource variable, filtered by node.
    let text = std::fs::read_to_string(chart().join("dashboards/drbd-reactor.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON parses");
    let panels = dash["panels"].as_array().unwrap();
    let ids: Vec<u64> = panels
        .iter()
        .map(|p| p["id"].as_u64().expect("panel id"))
        .collect();
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        ids.len(),
        "duplicate panel ids"
    );
    for p in panels {
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "panel '{}' is wider than the grid",
            p["title"]
        );
        if p["targets"].is_array() {
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel '{}'",
                p["title"]
            );
        }
    }
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vars, ["datasource", "job", "node", "resource"].into());
    let dash_queries = dashboard_queries(&dash);
    assert!(
        dash_queries.len() >= 50,
        "{} dashboard queries",
        dash_queries.len()
    );

    let rules = rendered_rules(&helm);
    let alert_queries: Vec<String> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| str_at(r, "expr").to_string())
        .collect();
    assert_eq!(alert_queries.len(), 11);

    // promtool parses every dashboard query (as recording rules).
    let group: Vec<serde_json::Value> = dash_queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({"record": format!("dashboard:query{i}"), "expr": grafana_to_promql(q)}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": group}]});
    let dir = tempdir();
    std::fs::write(
        dir.path().join("dashboard-rules.yaml"),
        serde_yaml::to_string(&file).unwrap(),
    )
    .unwrap();
    run_ok(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.path().join("dashboard-rules.yaml")),
    );

    // Every metric name is one the agent emits, and every matcher names a label of that family.
    let fams = emitted_families();
    for must in [
        "drbd_device_quorum",
        "drbd_connection_state",
        "drbdreactor_up",
        "drbdreactor_umh_runs_total",
        "drbdreactor_promoter_actions_total",
        "drbdreactor_engine_batch_duration_seconds_bucket",
    ] {
        assert!(
            fams.contains_key(must),
            "{must} not among the emitted families"
        );
    }
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (origin, q) in alert_queries
        .iter()
        .map(|q| ("alert", q))
        .chain(dash_queries.iter().map(|q| ("dashboard", q)))
    {
        let sel = selectors(&grafana_to_promql(q));
        if sel.is_empty() {
            problems.push(format!("{origin} query selects no metric: {q}"));
        }
        for (name, labels) in sel {
            used.insert(name.clone());
            let known = if SYNTHETIC.contains(&name.as_str()) {
                Some(&None)
            } else {
                fams.get(&name)
            };
            match known {
                None => problems.push(format!(
                    "{origin}: {name} is not emitted by the agent ({q})"
                )),
                Some(Some(family_labels)) => {
                    for l in labels {
                        if !family_labels.contains(&l) && !TARGET_LABELS.contains(&l.as_str()) {
                            problems.push(format!("{origin}: {name} has no label {l} ({q})"));
                        }
                    }
                }
                Some(None) => {
                    for l in labels {
                        if !TARGET_LABELS.contains(&l.as_str()) && l != "action" && l != "result" {
                            problems.push(format!("{origin}: {name}: label {l} not known ({q})"));
                        }
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboard covers the upstream panels' families and the new ones.
    for f in [
        "drbd_resource_resources",
        "drbd_peerdevice_outofsync_bytes",
        "drbd_connection_state",
        "drbd_device_unintentionaldiskless",
        "drbd_device_quorum",
        "drbd_device_written_bytes_total",
        "drbd_device_read_bytes_total",
        "scrape_duration_seconds",
        "drbd_peerdevice_resync_done_ratio",
        "drbd_peerdevice_replication_state",
        "drbd_path_established",
        "drbdreactor_umh_runs_total",
        "drbdreactor_promoter_actions_total",
        "drbdreactor_plugin_instances",
        "drbdreactor_drbdsetup_up",
    ] {
        assert!(used.contains(f), "no query uses {f}");
    }
}

// ---- Dockerfile ----------------------------------------------------------------------------------------

#[test]
fn dockerfile_parses_and_its_runtime_stage_has_what_the_binary_needs() {
    let test = "dockerfile_parses_and_its_runtime_stage_has_what_the_binary_needs";
    if python_module(test, "dockerfile", "dockerfile").is_none() {
        return;
    }
    // No Docker engine on the build machines: static checks only (see the script's header).
    let out = run_ok(
        Command::new("python3")
            .arg(root().join("tests/infra/chart/check_dockerfile.py"))
            .arg(root())
            .arg(env!("CARGO_BIN_EXE_drbd-reactor"))
            .env(
                "CHECK_TIMEOUT",
                Duration::from_secs(60).as_secs().to_string(),
            ),
    );
    assert!(out.contains("0 failed"), "{out}");
}

/// Waits until the ReactorPolicy CRD just applied is established, then creates the agent's namespace
/// from manifests/.
fn crd_established_and_namespace(env: &Envtest) {
    run_ok(
        Command::new(root().join("tests/infra/envtest/wait-established.sh"))
            .arg(env.bin.join("kubectl"))
            .arg(&env.kubeconfig)
            .args(["reactorpolicies.reactor.drbd.io", "120"]),
    );
    run_ok(
        env.kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(root().join("manifests/namespace.yaml")),
    );
}
