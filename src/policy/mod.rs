//! ReactorPolicy: the one configuration type, read from YAML files (file mode) or watched as a cluster-
//! scoped custom resource (Kubernetes mode). Everything here is pure: parsing, validation, node selection
//! and turning policies into the desired set of plugin instances.

pub mod files;

use crate::plugins::debugger::DebuggerSpec;
use crate::plugins::prometheus::PrometheusSpec;
use crate::plugins::promoter::spec::PromoterSpec;
use crate::plugins::umh::spec::UmhSpec;
use crate::plugins::{InstanceId, InstanceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const API_GROUP: &str = "reactor.drbd.io";
pub const API_VERSION: &str = "reactor.drbd.io/v1alpha1";
pub const KIND: &str = "ReactorPolicy";

/// What a ReactorPolicy asks the agents on matching nodes to run.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "reactor.drbd.io",
    version = "v1alpha1",
    kind = "ReactorPolicy",
    shortname = "rpol",
    status = "ReactorPolicyStatus"
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReactorPolicySpec {
    /// Nodes this policy applies to, by their labels; absent means every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// Print every change update as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debugger: Option<DebuggerSpec>,
    /// Export DRBD metrics on the agent's `/metrics`. Policies that enable it on the same node share one
    /// exporter; `enums` is on if any of them asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
    /// Run commands or scripts on DRBD state changes and kernel helper events (see docs/umh.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umh: Option<UmhSpec>,
    /// Keep services running on exactly one node per DRBD resource, through the host's systemd (see
    /// docs/promoter.md). A DRBD resource is promoted by at most one policy per node: when two policies
    /// that apply to a node list it, the one whose name sorts first manages it there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoter: Option<PromoterSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactorPolicyStatus {}

/// A policy document as written in a file: `apiVersion`, `kind`, `metadata.name`, `spec`.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: ReactorPolicySpec,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("YAML: {0}")]
    Yaml(String),
}

fn invalid(path: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_string(),
        message: message.into(),
    }
}

/// Parses every YAML document in `text` into policies, with errors that name the field.
pub fn parse_documents(text: &str) -> Result<Vec<ReactorPolicy>, PolicyError> {
    let mut out = Vec::new();
    for de in serde_yaml::Deserializer::from_str(text) {
        let value =
            serde_yaml::Value::deserialize(de).map_err(|e| PolicyError::Yaml(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        let doc: Document = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            invalid(
                if path == "." { "(document)" } else { &path },
                e.into_inner().to_string(),
            )
        })?;
        if doc.api_version != API_VERSION {
            return Err(invalid(
                "apiVersion",
                format!("'{}' is not '{API_VERSION}'", doc.api_version),
            ));
        }
        if doc.kind != KIND {
            return Err(invalid("kind", format!("'{}' is not '{KIND}'", doc.kind)));
        }
        let p = ReactorPolicy::new(&doc.metadata.name, doc.spec);
        validate(&p)?;
        out.push(p);
    }
    Ok(out)
}

/// Checks what the schema cannot.
pub fn validate(p: &ReactorPolicy) -> Result<(), PolicyError> {
    let name = p.metadata.name.as_deref().unwrap_or_default();
    if !is_dns_subdomain(name) {
        return Err(invalid(
            "metadata.name",
            format!("'{name}' is not a DNS subdomain (lower case, digits, '-', '.')"),
        ));
    }
    if let Some(sel) = &p.spec.node_selector {
        for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
            let path = format!("spec.nodeSelector.matchExpressions[{i}]");
            let n = r.values.as_ref().map_or(0, Vec::len);
            match r.operator.as_str() {
                "In" | "NotIn" if n == 0 => {
                    return Err(invalid(
                        &path,
                        format!("operator {} needs values", r.operator),
                    ))
                }
                "Exists" | "DoesNotExist" if n > 0 => {
                    return Err(invalid(
                        &path,
                        format!("operator {} takes no values", r.operator),
                    ))
                }
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => return Err(invalid(&path, format!("unknown operator '{other}'"))),
            }
        }
    }
    if let Some(u) = &p.spec.umh {
        crate::plugins::umh::validate(u).map_err(|e| invalid(&e.path, e.message))?;
    }
    if let Some(pr) = &p.spec.promoter {
        crate::plugins::promoter::spec::validate(pr, "spec.promoter")
            .map_err(|e| invalid(&e.path, e.message))?;
    }
    Ok(())
}

/// A DRBD resource that several policies applying to one node want to promote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PromoterConflict {
    pub resource: String,
    /// The policy that manages the resource (its name sorts first).
    pub winner: String,
    /// The policies that do not manage it on this node.
    pub losers: Vec<String>,
}

impl std::fmt::Display for PromoterConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DRBD resource '{}' is promoted by policies {} and {}; '{}' manages it, the others are not run for it",
            self.resource,
            self.winner,
            self.losers.join(", "),
            self.winner
        )
    }
}

/// The DRBD resources that more than one of the policies applying to a node (by its labels) promote.
/// The policy whose name sorts first wins; the others are not run for that resource on the node.
pub fn promoter_conflicts(
    policies: &[ReactorPolicy],
    node_labels: &BTreeMap<String, String>,
) -> Vec<PromoterConflict> {
    let mut claims: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in policies
        .iter()
        .filter(|p| selects(p.spec.node_selector.as_ref(), node_labels))
    {
        for r in p.spec.promoter.iter().flat_map(|s| &s.resources) {
            claims
                .entry(r.name.as_str())
                .or_default()
                .push(policy_name(p));
        }
    }
    claims
        .into_iter()
        .filter(|(_, ps)| ps.len() > 1)
        .map(|(res, mut ps)| {
            ps.sort_unstable();
            ps.dedup();
            PromoterConflict {
                resource: res.to_string(),
                winner: ps[0].to_string(),
                losers: ps[1..].iter().map(|s| s.to_string()).collect(),
            }
        })
        .collect()
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Does a label selector select a node with these labels? An absent selector selects every node.
pub fn selects(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return true };
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|r| {
        let vals = r.values.as_deref().unwrap_or_default();
        let have = labels.get(&r.key);
        match r.operator.as_str() {
            "In" => have.is_some_and(|h| vals.contains(h)),
            "NotIn" => have.is_none_or(|h| !vals.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

pub fn policy_name(p: &ReactorPolicy) -> &str {
    p.metadata.name.as_deref().unwrap_or_default()
}

fn spec_of<T: Serialize>(policy: &str, kind: &str, section: &T) -> InstanceSpec {
    InstanceSpec {
        id: InstanceId {
            policy: policy.to_string(),
            kind: kind.to_string(),
        },
        config: serde_json::to_value(section).expect("plugin sections serialise"),
    }
}

/// The plugin instances the given policies ask for on a node with these labels, in a stable order.
pub fn desired_instances(
    policies: &[ReactorPolicy],
    node_labels: &BTreeMap<String, String>,
) -> Vec<InstanceSpec> {
    let mut sorted: Vec<&ReactorPolicy> = policies
        .iter()
        .filter(|p| selects(p.spec.node_selector.as_ref(), node_labels))
        .collect();
    sorted.sort_by(|a, b| policy_name(a).cmp(policy_name(b)));
    let conflicts = promoter_conflicts(policies, node_labels);
    let mut out = Vec::new();
    for p in sorted {
        let name = policy_name(p);
        if let Some(d) = &p.spec.debugger {
            out.push(spec_of(name, "debugger", d));
        }
        if let Some(p) = &p.spec.prometheus {
            out.push(spec_of(name, "prometheus", p));
        }
        if let Some(u) = &p.spec.umh {
            out.push(spec_of(
                name,
                "umh",
                &crate::plugins::umh::InstanceConfig::new(u.clone()),
            ));
        }
        if let Some(pr) = &p.spec.promoter {
            let mut pr = pr.clone();
            pr.resources.retain(|r| {
                !conflicts
                    .iter()
                    .any(|c| c.resource == r.name && c.losers.iter().any(|l| l == name))
            });
            if !pr.resources.is_empty() {
                out.push(spec_of(name, "promoter", &pr));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: debug\nspec:\n  debugger:\n    output: stdout\n";

    #[test]
    fn parses_and_builds_instances() {
        let ps = parse_documents(GOOD).unwrap();
        assert_eq!(ps.len(), 1);
        let inst = desired_instances(&ps, &BTreeMap::new());
        assert_eq!(inst.len(), 1);
        assert_eq!(inst[0].id.to_string(), "debug/debugger");
        assert_eq!(inst[0].config, serde_json::json!({"output": "stdout"}));
    }

    #[test]
    fn prometheus_section() {
        let yaml = GOOD.replace("spec:\n", "spec:\n  prometheus: {}\n");
        let inst = desired_instances(&parse_documents(&yaml).unwrap(), &BTreeMap::new());
        assert_eq!(inst.len(), 2);
        assert_eq!(inst[1].id.to_string(), "debug/prometheus");
        assert_eq!(inst[1].config, serde_json::json!({"enums": false}));
        let yaml = GOOD.replace("spec:\n", "spec:\n  prometheus:\n    enums: true\n");
        let inst = desired_instances(&parse_documents(&yaml).unwrap(), &BTreeMap::new());
        assert_eq!(inst[1].config, serde_json::json!({"enums": true}));
        let yaml = GOOD.replace("spec:\n", "spec:\n  prometheus:\n    address: ':9942'\n");
        let e = parse_documents(&yaml).unwrap_err().to_string();
        assert!(
            e.starts_with("spec.prometheus.address: unknown field `address`"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let bad = GOOD.replace("output: stdout", "output: printer");
        let e = parse_documents(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("spec.debugger.output: unknown variant `printer`"),
            "{e}"
        );
        let bad = GOOD.replace("debugger:", "debuger:");
        let e = parse_documents(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("spec.debuger: unknown field `debuger`"),
            "{e}"
        );
        let bad = GOOD.replace("name: debug", "name: Debug_1");
        assert!(parse_documents(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("metadata.name: 'Debug_1'"));
        let bad = GOOD.replace("v1alpha1", "v1");
        assert!(parse_documents(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("apiVersion:"));
        let e = parse_documents("apiVersion: [").unwrap_err();
        assert!(matches!(e, PolicyError::Yaml(_)));
    }

    fn promoter_policy(name: &str, resources: &[&str], selector: &str) -> String {
        let mut y = format!(
            "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n{selector}  promoter:\n    resources:\n"
        );
        for r in resources {
            y.push_str(&format!(
                "      - name: {r}\n        start: [{r}-app.service]\n"
            ));
        }
        y
    }

    #[test]
    fn promoter_section_and_conflicts() {
        let a = promoter_policy("a", &["r0", "r1"], "");
        let b = promoter_policy("b", &["r1", "r2"], "");
        let c = promoter_policy(
            "c",
            &["r1"],
            "  nodeSelector:\n    matchLabels: {zone: x}\n",
        );
        let mut ps = parse_documents(&a).unwrap();
        ps.extend(parse_documents(&b).unwrap());
        ps.extend(parse_documents(&c).unwrap());
        let labels = BTreeMap::new();
        let conflicts = promoter_conflicts(&ps, &labels);
        assert_eq!(
            conflicts,
            vec![PromoterConflict {
                resource: "r1".into(),
                winner: "a".into(),
                losers: vec!["b".into()]
            }]
        );
        assert!(conflicts[0].to_string().contains("'a' manages it"));
        let inst = desired_instances(&ps, &labels);
        let names = |i: &InstanceSpec| -> Vec<String> {
            i.config["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(inst.len(), 2);
        assert_eq!(inst[0].id.to_string(), "a/promoter");
        assert_eq!(names(&inst[0]), ["r0", "r1"]);
        assert_eq!(names(&inst[1]), ["r2"], "b loses r1 on this node");
        // in zone x, c applies too and also loses r1
        let zone: BTreeMap<String, String> = [("zone".to_string(), "x".to_string())].into();
        assert_eq!(promoter_conflicts(&ps, &zone)[0].losers, vec!["b", "c"]);
        let inst = desired_instances(&ps, &zone);
        assert_eq!(inst.len(), 2, "c has nothing left to run: no instance");
        // defaults in the canonical config are stable (instance identity)
        assert_eq!(
            inst[1].config["resources"][0],
            serde_json::json!({"name": "r2", "start": ["r2-app.service"], "runner": "systemd",
                "dependenciesAs": "Requires", "targetAs": "Requires", "onDrbdDemoteFailure": "none",
                "secondaryForce": true, "adjustResourceOnStart": true,
                "preferredNodesPolicy": "always", "onQuorumLoss": "shutdown", "onDiskDetach": "ignore",
                "sleepBeforePromoteFactor": 1, "fencingPromoteDelay": 5})
        );
        // validation errors name the field
        let bad = promoter_policy("a", &["r0", "r0"], "");
        assert!(parse_documents(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("spec.promoter.resources[1].name: resource 'r0' is listed twice"));
        let bad = a.replace("[r0-app.service]", "[]");
        assert!(parse_documents(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("spec.promoter.resources[0].start:"));
    }

    #[test]
    fn promoter_cel_rules_are_in_the_crd() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(ReactorPolicy::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["promoter"]["properties"]["resources"];
        assert_eq!(schema["x-kubernetes-list-type"], "map");
        assert_eq!(
            schema["x-kubernetes-list-map-keys"],
            serde_json::json!(["name"])
        );
        assert_eq!(schema["maxItems"], 1000);
        let item = &schema["items"];
        let rules: Vec<&str> = item["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0], "size(self.start) > 0");
        assert!(
            rules[1].contains(r"s.matches('^[A-Za-z0-9:_.\\\\@-]+[.](service|socket|device|mount"),
            "{}",
            rules[1]
        );
        assert_eq!(item["properties"]["name"]["maxLength"], 128);
        assert_eq!(item["properties"]["start"]["maxItems"], 64);
        assert_eq!(item["properties"]["start"]["items"]["maxLength"], 4096);
        assert_eq!(item["properties"]["secondaryForce"]["default"], true);
        assert_eq!(item["properties"]["fencingPromoteDelay"]["default"], 5);
        assert_eq!(
            item["properties"]["sleepBeforePromoteFactor"]["maximum"].as_f64(),
            Some(100.0)
        );
    }

    #[test]
    fn node_selectors() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let sel = |y: &str| -> LabelSelector { serde_yaml::from_str(y).unwrap() };
        assert!(selects(None, &labels));
        assert!(selects(Some(&sel("matchLabels: {zone: a}")), &labels));
        assert!(!selects(Some(&sel("matchLabels: {zone: b}")), &labels));
        assert!(selects(
            Some(&sel(
                "matchExpressions: [{key: zone, operator: In, values: [a, b]}]"
            )),
            &labels
        ));
        assert!(!selects(
            Some(&sel(
                "matchExpressions: [{key: zone, operator: NotIn, values: [a]}]"
            )),
            &labels
        ));
        assert!(selects(
            Some(&sel(
                "matchExpressions: [{key: gpu, operator: DoesNotExist}]"
            )),
            &labels
        ));
        assert!(!selects(
            Some(&sel("matchExpressions: [{key: gpu, operator: Exists}]")),
            &labels
        ));
        let yaml = GOOD.replace(
            "spec:\n",
            "spec:\n  nodeSelector:\n    matchLabels: {zone: b}\n",
        );
        let ps = parse_documents(&yaml).unwrap();
        assert!(desired_instances(&ps, &labels).is_empty());
        let yaml = GOOD.replace(
            "spec:\n",
            "spec:\n  nodeSelector:\n    matchExpressions: [{key: a, operator: In}]\n",
        );
        assert!(parse_documents(&yaml)
            .unwrap_err()
            .to_string()
            .contains("needs values"));
    }
}
