//! Which policies apply to this node and what runs for them: the client-free part of Kubernetes mode,
//! in the stages `dereference → validate → build` (the agent then does `apply` and `update_status`).
//! Tested with constructed objects, no API server.
//!
//! - dereference: a UMH `script.configMapRef` is looked up (the agent's own namespace only) and its
//!   content put into the instance configuration, so a changed script is a changed instance and only
//!   that instance is reloaded;
//! - validate: the checks of file mode ([`super::validate`]) plus the scripts' (present, UTF-8, `#!`);
//! - build: the instances of every valid policy selecting this node. A policy that is invalid now keeps
//!   its last valid version running (as in file mode) and is reported; one that conflicts with another
//!   is reported and does not run.

use super::{desired_instances, policy_name, validate, ReactorPolicy};
use crate::plugins::umh::{self, InstanceConfig, ScriptSource};
use crate::plugins::{InstanceId, InstanceSpec};
use std::collections::BTreeMap;

/// Why a selected policy does not run as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `InvalidPolicy`, `ConfigMapNotFound`, `InvalidScript` or `Conflict`.
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The nodeSelector does not select this node.
    NotSelected,
    /// Selected: `instances` run for it (its last valid version's when there is a problem).
    Selected {
        instances: Vec<InstanceId>,
        problem: Option<Problem>,
    },
}

/// The result of the client-free stages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Everything to run on this node, in a stable order.
    pub instances: Vec<InstanceSpec>,
    /// Per policy name.
    pub outcomes: BTreeMap<String, Outcome>,
}

/// The instances of each policy's last valid version (by policy uid and name), kept between plans.
pub type LastGood = BTreeMap<String, (String, Vec<InstanceSpec>)>;

/// Largest script accepted from a ConfigMap (same as from a file).
const MAX_SCRIPT_BYTES: usize = umh::MAX_SCRIPT_BYTES as usize;

/// Dereference: fills in the scripts of a UMH instance from ConfigMaps (`lookup(name)` gives a
/// ConfigMap's `data` in the agent's namespace, `None` when there is none). Returns the first problem.
pub fn dereference(
    spec: &mut InstanceSpec,
    namespace: &str,
    lookup: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
) -> Result<(), Problem> {
    if spec.id.kind != "umh" {
        return Ok(());
    }
    let Ok(mut cfg) = serde_json::from_value::<InstanceConfig>(spec.config.clone()) else {
        return Ok(()); // validate reports it
    };
    let mut scripts = BTreeMap::new();
    let mut first: Option<Problem> = None;
    for (path, r) in umh::scripts_of(&cfg.spec) {
        let Some(c) = &r.config_map_ref else {
            first.get_or_insert(Problem {
                reason: "InvalidPolicy".into(),
                message: format!(
                    "{path}.path: script paths are for policy files; use configMapRef in Kubernetes"
                ),
            });
            continue;
        };
        let origin = format!("configmap {namespace}/{} key {}", c.name, c.key);
        let (content, error) = match lookup(&c.name) {
            None => {
                let m = format!(
                    "{path}.configMapRef: ConfigMap {namespace}/{} not found",
                    c.name
                );
                first.get_or_insert(Problem {
                    reason: "ConfigMapNotFound".into(),
                    message: m.clone(),
                });
                (None, Some(m))
            }
            Some(data) => match data.get(&c.key) {
                None => {
                    let m = format!(
                        "{path}.configMapRef: ConfigMap {namespace}/{} has no key '{}'",
                        c.name, c.key
                    );
                    first.get_or_insert(Problem {
                        reason: "ConfigMapNotFound".into(),
                        message: m.clone(),
                    });
                    (None, Some(m))
                }
                Some(text) => {
                    let bad = if text.len() > MAX_SCRIPT_BYTES {
                        Some(format!("is larger than {MAX_SCRIPT_BYTES} bytes"))
                    } else {
                        umh::shebang(text).err()
                    };
                    match bad {
                        Some(e) => {
                            let m = format!("{path}.configMapRef: {origin} {e}");
                            first.get_or_insert(Problem {
                                reason: "InvalidScript".into(),
                                message: m.clone(),
                            });
                            (None, Some(m))
                        }
                        None => (Some(text.clone()), None),
                    }
                }
            },
        };
        scripts.insert(
            r.key(),
            ScriptSource {
                origin,
                content,
                error,
            },
        );
    }
    cfg.scripts = scripts;
    if let Ok(v) = serde_json::to_value(&cfg) {
        spec.config = v;
    }
    match first {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

/// Promoter conflicts between policies selecting this node: policy name → message, for each policy that
/// loses a DRBD resource to another one (the policy whose name sorts first wins, as in file mode). The
/// losing policy runs without that resource and is reported (`Conflict`), so no resource is promoted twice.
pub fn conflicts(selected: &[&ReactorPolicy]) -> BTreeMap<String, String> {
    let owned: Vec<ReactorPolicy> = selected.iter().map(|p| (*p).clone()).collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // `selected` already matches this node: no label filter left to apply.
    let everything = BTreeMap::new();
    for c in super::promoter_conflicts(&owned, &everything) {
        for l in &c.losers {
            out.entry(l.clone()).or_default().push(match &c.unit {
                None => format!(
                    "promoter resource {} is promoted by policy {} on this node; not run by this policy",
                    c.resource, c.winner
                ),
                Some(u) => format!(
                    "promoter resource {}: its start unit {} is already started for resource {} of policy {} on this node; not run by this policy",
                    c.resource, u.unit, u.kept_by, c.winner
                ),
            });
        }
    }
    out.into_iter().map(|(k, v)| (k, v.join("; "))).collect()
}

fn uid(p: &ReactorPolicy) -> String {
    p.metadata.uid.clone().unwrap_or_default()
}

/// dereference → validate → build for every policy, against this node's labels.
pub fn plan(
    policies: &[ReactorPolicy],
    node_labels: &BTreeMap<String, String>,
    namespace: &str,
    lookup: &dyn Fn(&str) -> Option<BTreeMap<String, String>>,
    last_good: &LastGood,
) -> (Plan, LastGood) {
    let mut sorted: Vec<&ReactorPolicy> = policies.iter().collect();
    sorted.sort_by(|a, b| policy_name(a).cmp(policy_name(b)));
    let mut out = Plan::default();
    let mut good = LastGood::new();
    let selected: Vec<&ReactorPolicy> = sorted
        .iter()
        .copied()
        .filter(|p| super::selects(p.spec.node_selector.as_ref(), node_labels))
        .collect();
    let conflicting = conflicts(&selected);
    let selected_owned: Vec<ReactorPolicy> = selected.iter().map(|p| (*p).clone()).collect();
    for p in sorted {
        let name = policy_name(p).to_string();
        if !super::selects(p.spec.node_selector.as_ref(), node_labels) {
            out.outcomes.insert(name, Outcome::NotSelected);
            continue;
        }
        let previous = last_good
            .get(&name)
            .filter(|(u, _)| *u == uid(p))
            .map(|(_, v)| v.clone());
        let mut problem = None;
        // Built with every selected policy in view, so a promoter resource another policy wins is left out.
        let mut instances: Vec<_> = desired_instances(&selected_owned, node_labels)
            .into_iter()
            .filter(|s| s.id.policy == name)
            .collect();
        for s in &mut instances {
            if let Err(e) = dereference(s, namespace, lookup) {
                problem.get_or_insert(e);
            }
        }
        if let Err(e) = validate(p) {
            problem = Some(Problem {
                reason: "InvalidPolicy".into(),
                message: e.to_string(),
            });
        }
        if let Some(m) = conflicting.get(&name) {
            problem = Some(Problem {
                reason: "Conflict".into(),
                message: m.clone(),
            });
        }
        // A conflict is reported, and the policy runs without the resources it lost.
        let runnable = problem.as_ref().is_none_or(|pr| pr.reason == "Conflict");
        let run = if runnable {
            good.insert(name.clone(), (uid(p), instances.clone()));
            instances
        } else {
            let pr = problem.clone().expect("not runnable means a problem");
            match previous {
                Some(prev) => {
                    problem = Some(Problem {
                        reason: pr.reason.clone(),
                        message: format!("{}; the last valid version keeps running", pr.message),
                    });
                    good.insert(name.clone(), (uid(p), prev.clone()));
                    prev
                }
                None => Vec::new(),
            }
        };
        out.outcomes.insert(
            name,
            Outcome::Selected {
                instances: run.iter().map(|s| s.id.clone()).collect(),
                problem,
            },
        );
        out.instances.extend(run);
    }
    (out, good)
}

/// A policy the API server holds but the agent cannot read as a [`ReactorPolicy`] (stored before the
/// CRD was tightened, or a shape the schema cannot refuse). It is reported on its own status and as an
/// Event; the other policies run.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable {
    pub name: String,
    pub uid: String,
    pub generation: Option<i64>,
    /// Its `spec.nodeSelector`, when that part reads (`Err` when it does not: then it is reported on
    /// every node, which cannot tell).
    pub node_selector: Result<Option<super::LabelSelector>, ()>,
    /// Its status, when that part reads (to keep the other nodes' entries and transition times).
    pub status: Option<super::status::ReactorPolicyStatus>,
    /// What does not read, with the field path (`spec.umh.device[0].volume: …`).
    pub message: String,
}

/// Decodes one policy object as the API server sent it (JSON), on its own: one that does not read
/// does not keep the others from being read.
pub fn decode(v: serde_json::Value) -> Result<ReactorPolicy, Box<Undecodable>> {
    let meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta = v
        .get("metadata")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    let selector = match v.get("spec").and_then(|s| s.get("nodeSelector")) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(sel) => serde_json::from_value(sel.clone())
            .map(Some)
            .map_err(|_| ()),
    };
    let status = v
        .get("status")
        .cloned()
        .and_then(|s| serde_json::from_value(s).ok());
    serde_path_to_error::deserialize::<_, ReactorPolicy>(v).map_err(|e| {
        let path = e.path().to_string();
        Box::new(Undecodable {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone().unwrap_or_default(),
            generation: meta.generation,
            node_selector: selector,
            status,
            message: format!(
                "the agent cannot read this policy: {}: {}",
                if path == "." { "(object)" } else { &path },
                e.into_inner()
            ),
        })
    })
}

/// Adds the undecodable policies to a plan: each that may select this node is reported
/// (`InvalidPolicy`, with what does not read); one whose last valid version ran keeps it running, as
/// an invalid policy does.
pub fn add_undecodable(
    plan: &mut Plan,
    good: &mut LastGood,
    last_good: &LastGood,
    bad: &[Undecodable],
    node_labels: &BTreeMap<String, String>,
) {
    for u in bad {
        let selected = match &u.node_selector {
            Ok(sel) => super::selects(sel.as_ref(), node_labels),
            Err(()) => true,
        };
        if !selected {
            plan.outcomes.insert(u.name.clone(), Outcome::NotSelected);
            continue;
        }
        let previous = last_good
            .get(&u.name)
            .filter(|(uid, _)| *uid == u.uid)
            .map(|(_, v)| v.clone());
        let mut message = u.message.clone();
        let run = match previous {
            Some(prev) => {
                message.push_str("; the last valid version keeps running");
                good.insert(u.name.clone(), (u.uid.clone(), prev.clone()));
                prev
            }
            None => Vec::new(),
        };
        plan.outcomes.insert(
            u.name.clone(),
            Outcome::Selected {
                instances: run.iter().map(|s| s.id.clone()).collect(),
                problem: Some(Problem {
                    reason: "InvalidPolicy".into(),
                    message,
                }),
            },
        );
        plan.instances.extend(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::runtime::{InstanceState, InstanceStatus};
    use crate::policy::status::{node_entry, same_entry, STATE_APPLIED, STATE_NOT_APPLIED};
    use crate::policy::ReactorPolicySpec;

    fn pol(name: &str, uid: &str, yaml_spec: &str) -> ReactorPolicy {
        let spec: ReactorPolicySpec = serde_yaml::from_str(yaml_spec).unwrap();
        let mut p = ReactorPolicy::new(name, spec);
        p.metadata.uid = Some(uid.into());
        p.metadata.generation = Some(1);
        p
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const UMH: &str = "umh:\n  resource:\n  - name: r\n    script:\n      configMapRef: {name: scripts, key: on-primary}\n";

    fn cms(script: Option<&str>) -> impl Fn(&str) -> Option<BTreeMap<String, String>> {
        let s = script.map(String::from);
        move |name: &str| {
            (name == "scripts")
                .then(|| s.clone())
                .flatten()
                .map(|s| [("on-primary".to_string(), s)].into())
        }
    }

    #[test]
    fn an_undecodable_policy_is_reported_on_its_own() {
        let obj = |name: &str, spec: serde_json::Value| {
            serde_json::json!({"apiVersion": "reactor.drbd.io/v1alpha1", "kind": "ReactorPolicy",
                "metadata": {"name": name, "uid": format!("u-{name}"), "generation": 2}, "spec": spec})
        };
        let good = decode(obj("good", serde_json::json!({"debugger": {}}))).unwrap();
        let bad = *decode(obj(
            "bad",
            serde_json::json!({"nodeSelector": {"matchLabels": {"zone": "a"}},
                "umh": {"device": [{"name": "d", "volume": "x", "command": ["true"]}]}}),
        ))
        .unwrap_err();
        assert_eq!(bad.name, "bad");
        assert_eq!(bad.generation, Some(2));
        assert!(
            bad.message.contains("spec.umh.device[0].volume"),
            "{}",
            bad.message
        );
        let (mut p, mut g) = plan(
            &[good],
            &labels(&[("zone", "a")]),
            "ns",
            &cms(None),
            &LastGood::new(),
        );
        add_undecodable(
            &mut p,
            &mut g,
            &LastGood::new(),
            std::slice::from_ref(&bad),
            &labels(&[("zone", "a")]),
        );
        assert_eq!(p.instances.len(), 1, "the good policy runs");
        match &p.outcomes["bad"] {
            Outcome::Selected {
                instances,
                problem: Some(pr),
            } => {
                assert!(instances.is_empty());
                assert_eq!(pr.reason, "InvalidPolicy");
                assert!(pr.message.contains("cannot read"));
            }
            o => panic!("{o:?}"),
        }
        // not selected by its (readable) nodeSelector: no entry
        let mut p2 = Plan::default();
        add_undecodable(
            &mut p2,
            &mut g,
            &LastGood::new(),
            std::slice::from_ref(&bad),
            &labels(&[("zone", "b")]),
        );
        assert_eq!(p2.outcomes["bad"], Outcome::NotSelected);
        // it ran before under the same uid: the last valid version keeps running
        let before: LastGood = [(
            "bad".to_string(),
            ("u-bad".to_string(), p.instances.clone()),
        )]
        .into();
        let mut p3 = Plan::default();
        let mut g3 = LastGood::new();
        add_undecodable(&mut p3, &mut g3, &before, &[bad], &labels(&[("zone", "a")]));
        assert_eq!(p3.instances.len(), 1);
        assert!(g3.contains_key("bad"));
    }

    #[test]
    fn a_start_unit_of_another_policys_resource_is_a_conflict_on_status() {
        let ps = vec![
            pol("a", "u1", "promoter:\n  resources:\n  - {name: r0, start: [shared.mount]}\n"),
            pol("b", "u2", "promoter:\n  resources:\n  - {name: r1, start: [shared.mount]}\n  - {name: r2, start: [b.service]}\n"),
        ];
        let (p, _) = plan(&ps, &labels(&[]), "ns", &cms(None), &LastGood::new());
        match &p.outcomes["b"] {
            Outcome::Selected {
                instances,
                problem: Some(pr),
            } => {
                assert_eq!(pr.reason, "Conflict");
                assert!(
                    pr.message.contains("promoter resource r1: its start unit shared.mount is already started for resource r0 of policy a"),
                    "{}",
                    pr.message
                );
                assert_eq!(instances.len(), 1, "b still runs r2");
            }
            o => panic!("{o:?}"),
        }
        let b = p.instances.iter().find(|i| i.id.policy == "b").unwrap();
        assert_eq!(b.config["resources"].as_array().unwrap().len(), 1);
        assert_eq!(b.config["resources"][0]["name"], "r2");
    }

    #[test]
    fn selection_by_node_labels() {
        let ps = vec![
            pol("all", "u1", "debugger: {}"),
            pol(
                "zone-a",
                "u2",
                "nodeSelector: {matchLabels: {zone: a}}\nprometheus: {}",
            ),
        ];
        let (p, _) = plan(
            &ps,
            &labels(&[("zone", "b")]),
            "ns",
            &cms(None),
            &LastGood::new(),
        );
        let ids: Vec<String> = p.instances.iter().map(|s| s.id.to_string()).collect();
        assert_eq!(ids, ["all/debugger"]);
        assert_eq!(p.outcomes["zone-a"], Outcome::NotSelected);
        let (p, _) = plan(
            &ps,
            &labels(&[("zone", "a")]),
            "ns",
            &cms(None),
            &LastGood::new(),
        );
        let ids: Vec<String> = p.instances.iter().map(|s| s.id.to_string()).collect();
        assert_eq!(ids, ["all/debugger", "zone-a/prometheus"]);
    }

    #[test]
    fn config_map_scripts_resolve_and_change_only_their_instance() {
        let ps = vec![pol("u", "u1", UMH), pol("d", "u2", "debugger: {}")];
        let (p1, good) = plan(
            &ps,
            &labels(&[]),
            "ns",
            &cms(Some("#!/bin/sh\necho 1\n")),
            &LastGood::new(),
        );
        assert!(matches!(
            &p1.outcomes["u"],
            Outcome::Selected { problem: None, .. }
        ));
        let umh = p1.instances.iter().find(|s| s.id.kind == "umh").unwrap();
        assert_eq!(
            umh.config["scripts"]["configMap:scripts/on-primary"]["content"],
            "#!/bin/sh\necho 1\n"
        );
        let (p2, _) = plan(
            &ps,
            &labels(&[]),
            "ns",
            &cms(Some("#!/bin/sh\necho 2\n")),
            &good,
        );
        let changed: Vec<String> = p1
            .instances
            .iter()
            .zip(&p2.instances)
            .filter(|(a, b)| a != b)
            .map(|(a, _)| a.id.to_string())
            .collect();
        assert_eq!(changed, ["u/umh"]);
    }

    #[test]
    fn missing_config_map_keeps_the_last_valid_version_and_is_reported() {
        let ps = vec![pol("u", "u1", UMH), pol("d", "u2", "debugger: {}")];
        // never valid: nothing runs for it, the other policy runs
        let (p, _) = plan(&ps, &labels(&[]), "ns", &cms(None), &LastGood::new());
        let Outcome::Selected { instances, problem } = &p.outcomes["u"] else {
            panic!()
        };
        assert!(instances.is_empty());
        let pr = problem.as_ref().unwrap();
        assert_eq!(pr.reason, "ConfigMapNotFound");
        assert!(
            pr.message.contains("ConfigMap ns/scripts not found"),
            "{}",
            pr.message
        );
        assert_eq!(p.instances.len(), 1);
        // valid once, then the ConfigMap goes away: the last valid version stays
        let (ok, good) = plan(
            &ps,
            &labels(&[]),
            "ns",
            &cms(Some("#!/bin/sh\n")),
            &LastGood::new(),
        );
        let (p, good2) = plan(&ps, &labels(&[]), "ns", &cms(None), &good);
        assert_eq!(p.instances, ok.instances);
        let Outcome::Selected {
            problem: Some(pr), ..
        } = &p.outcomes["u"]
        else {
            panic!()
        };
        assert!(pr.message.ends_with("the last valid version keeps running"));
        // a policy re-created under the same name (new uid) does not inherit it
        let ps2 = vec![pol("u", "other-uid", UMH)];
        let (p, _) = plan(&ps2, &labels(&[]), "ns", &cms(None), &good2);
        assert!(p.instances.is_empty());
        // a key without '#!' is an invalid script
        let (p, _) = plan(
            &ps,
            &labels(&[]),
            "ns",
            &cms(Some("echo hi")),
            &LastGood::new(),
        );
        let Outcome::Selected {
            problem: Some(pr), ..
        } = &p.outcomes["u"]
        else {
            panic!()
        };
        assert_eq!(pr.reason, "InvalidScript");
    }

    #[test]
    fn file_paths_are_rejected_in_kubernetes_mode() {
        let ps = vec![pol(
            "u",
            "u1",
            "umh:\n  resource:\n  - name: r\n    script: {path: x.sh}\n",
        )];
        let (p, _) = plan(&ps, &labels(&[]), "ns", &cms(None), &LastGood::new());
        let Outcome::Selected {
            problem: Some(pr), ..
        } = &p.outcomes["u"]
        else {
            panic!()
        };
        assert!(pr.message.contains("configMapRef"), "{}", pr.message);
        assert!(p.instances.is_empty());
    }

    fn inst(
        policy: &str,
        kind: &str,
        state: InstanceState,
        detail: Option<serde_json::Value>,
    ) -> InstanceStatus {
        InstanceStatus {
            id: InstanceId {
                policy: policy.into(),
                kind: kind.into(),
            },
            state,
            last_error: Some("boom".into()),
            restarts: 2,
            queued: 0,
            restart_in_seconds: None,
            detail,
        }
    }

    #[test]
    fn status_entries() {
        let ok = Outcome::Selected {
            instances: vec![],
            problem: None,
        };
        assert_eq!(
            node_entry("n1", Some(1), &Outcome::NotSelected, &[], &[], None, "t0"),
            None
        );
        let running = inst("p", "umh", InstanceState::Running, None);
        let e = node_entry("n1", Some(3), &ok, &[&running], &[], None, "t0").unwrap();
        assert_eq!(e.state, STATE_APPLIED);
        assert_eq!(e.observed_generation, Some(3));
        assert_eq!(e.plugins, ["umh=running"]);
        assert_eq!(e.conditions[0].type_, "Applied");
        assert_eq!(e.conditions[0].status, "True");
        assert_eq!(e.conditions[1].status, "False");
        // a failed instance degrades; transition time moves only for the condition that changed
        let failed = inst("p", "umh", InstanceState::Failed, None);
        let e2 = node_entry("n1", Some(3), &ok, &[&failed], &[], Some(&e), "t1").unwrap();
        assert_eq!(e2.state, "Degraded");
        assert_eq!(e2.conditions[0].last_transition_time, "t0");
        assert_eq!(e2.conditions[1].last_transition_time, "t1");
        assert_eq!(e2.conditions[1].reason, "PluginFailed");
        assert!(e2.conditions[1].message.contains("boom"));
        assert!(!same_entry(&e, &e2));
        let e3 = node_entry("n1", Some(3), &ok, &[&running], &[], None, "t9").unwrap();
        assert!(same_entry(&e, &e3));
        // a problem: not applied, with the reason and message
        let bad = Outcome::Selected {
            instances: vec![],
            problem: Some(Problem {
                reason: "ConfigMapNotFound".into(),
                message: "spec.umh…".into(),
            }),
        };
        let e = node_entry("n1", Some(4), &bad, &[], &[], None, "t0").unwrap();
        assert_eq!(e.state, STATE_NOT_APPLIED);
        assert_eq!(e.conditions[0].reason, "ConfigMapNotFound");
        assert_eq!(e.conditions[1].status, "True");
        // promoter resources come from its detail; blocked ones degrade
        let prom = inst(
            "p",
            "promoter",
            InstanceState::Running,
            Some(serde_json::json!({"resources": [
                {"name": "r0", "state": "active", "lastAction": {"action": "start"}},
                {"name": "r1", "state": "blocked", "reason": "quorum lost"},
                {"bogus": true}
            ]})),
        );
        let e = node_entry("n1", Some(1), &ok, &[&prom], &[], None, "t0").unwrap();
        assert_eq!(e.resources.len(), 2);
        assert_eq!(
            e.resources[0].last_action,
            Some(serde_json::json!({"action": "start"}))
        );
        assert_eq!(e.state, "Degraded");
        assert_eq!(e.conditions[1].reason, "ResourceBlocked");
        assert!(e.conditions[1].message.contains("r1 blocked: quorum lost"));
        // unit files that could not be written degrade, with the reason
        let prom = inst(
            "p",
            "promoter",
            InstanceState::Running,
            Some(
                serde_json::json!({"resources": [{"name": "r0", "state": "standby"}],
                "unitFiles": {"state": "Degraded", "reason": "r0: writing unit files in /run/systemd/system: x: Not a directory"}}),
            ),
        );
        let e = node_entry("n1", Some(1), &ok, &[&prom], &[], None, "t0").unwrap();
        assert_eq!(e.state, "Degraded");
        assert_eq!(e.conditions[1].reason, "UnitFilesFailed");
        assert!(e.conditions[1]
            .message
            .contains("unit files: r0: writing unit files"));
        // no promoter detail: no resources, no error
        let prom = inst("p", "promoter", InstanceState::Running, None);
        let e = node_entry("n1", Some(1), &ok, &[&prom], &[], None, "t0").unwrap();
        assert!(e.resources.is_empty());
        // a reload error for the instance: not applied
        let e = node_entry(
            "n1",
            Some(1),
            &ok,
            &[&running],
            &[("umh".into(), "invalid configuration: x".into())],
            None,
            "t0",
        )
        .unwrap();
        assert_eq!(e.conditions[0].reason, "PluginInvalid");
    }
}
