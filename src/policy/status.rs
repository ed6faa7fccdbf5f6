//! `status` of a ReactorPolicy: one entry per node, written by that node's agent with server-side apply
//! under its own field manager (`drbd-reactor/<node>`), so N agents never conflict. Everything here is
//! pure: the types, and how an agent turns what it runs into its entry.

use super::node::{Outcome, Problem};
use crate::engine::runtime::{InstanceState, InstanceStatus};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const CONDITION_APPLIED: &str = "Applied";
pub const CONDITION_DEGRADED: &str = "Degraded";

/// `state` of a node entry (what the printer columns select on).
pub const STATE_APPLIED: &str = "Applied";
pub const STATE_DEGRADED: &str = "Degraded";
pub const STATE_NOT_APPLIED: &str = "NotApplied";

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactorPolicyStatus {
    /// The plugin sections of the spec (e.g. `debugger,umh`), for `kubectl get`. Every agent computes the
    /// same value from the spec and writes it under the one shared field manager `drbd-reactor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<String>,
    /// Entries in `nodes` whose state is `Applied` (for `kubectl get`; written like `plugins`, with the
    /// object's resourceVersion as precondition, so a count from an outdated view is never written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_nodes: Option<i64>,
    /// Entries in `nodes` whose state is not `Applied` (`Degraded` or `NotApplied`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_nodes: Option<i64>,
    /// One entry per node the policy applies to, keyed by node name; each written by that node's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["node".into()]))]
    pub nodes: Vec<NodeStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// The policy generation this entry describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Applied` (running as asked), `Degraded` (running, but a plugin failed or a resource is blocked)
    /// or `NotApplied` (invalid, conflicting, or a plugin could not start).
    pub state: String,
    /// The plugin instances of this policy on the node and their state (`umh=running`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// `Applied` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// DRBD resources of the policy's promoter on this node, as the promoter reports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    pub name: String,
    /// `active`, `standby`, `blocked`, `disabled` or `evicted`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub last_action: Option<serde_json::Value>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// The promoter's entries from its `/status` detail (`{"resources":[{name, state, reason, lastAction}]}`);
/// anything else (or no detail) gives none.
pub fn promoter_resources(detail: Option<&serde_json::Value>) -> Vec<ResourceStatus> {
    let Some(list) = detail
        .and_then(|d| d.get("resources"))
        .and_then(|r| r.as_array())
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|r| {
            Some(ResourceStatus {
                name: r.get("name")?.as_str()?.to_string(),
                state: r.get("state")?.as_str()?.to_string(),
                reason: r.get("reason").and_then(|x| x.as_str()).map(String::from),
                last_action: r.get("lastAction").filter(|a| a.is_object()).cloned(),
            })
        })
        .collect()
}

/// The summary fields (`plugins`, `appliedNodes`, `degradedNodes`) as they should be for a policy.
pub fn summary(spec: &super::ReactorPolicySpec, nodes: &[NodeStatus]) -> (String, i64, i64) {
    let applied = nodes.iter().filter(|n| n.state == STATE_APPLIED).count() as i64;
    (plugins_summary(spec), applied, nodes.len() as i64 - applied)
}

/// The plugin sections a spec sets, in a fixed order (`debugger,prometheus,umh`); `none` for none.
pub fn plugins_summary(spec: &super::ReactorPolicySpec) -> String {
    let v: Vec<&str> = [
        ("debugger", spec.debugger.is_some()),
        ("prometheus", spec.prometheus.is_some()),
        ("umh", spec.umh.is_some()),
    ]
    .into_iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| n)
    .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(",")
    }
}

fn condition(
    prev: Option<&NodeStatus>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &str,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let since = prev
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: since,
    }
}

/// This node's entry for a policy, or `None` when the policy does not apply to the node (the entry is
/// then removed). `instances` is the engine's view of this policy's instances, `apply_errors` the
/// instances the last reload could not (re)build, `prev` the entry as last written (to keep transition
/// times), `now` an RFC 3339 time.
pub fn node_entry(
    node: &str,
    generation: Option<i64>,
    outcome: &Outcome,
    instances: &[&InstanceStatus],
    apply_errors: &[(String, String)],
    prev: Option<&NodeStatus>,
    now: &str,
) -> Option<NodeStatus> {
    let problem: Option<&Problem> = match outcome {
        Outcome::NotSelected => return None,
        Outcome::Selected { problem, .. } => problem.as_ref(),
    };
    let plugins: Vec<String> = instances
        .iter()
        .map(|i| {
            let s = match i.state {
                InstanceState::Running => "running",
                InstanceState::Failed => "failed",
                InstanceState::Invalid => "invalid",
            };
            format!("{}={s}", i.id.kind)
        })
        .collect();
    let invalid: Vec<String> = instances
        .iter()
        .filter(|i| i.state == InstanceState::Invalid)
        .map(|i| {
            format!(
                "{}: {}",
                i.id.kind,
                i.last_error.as_deref().unwrap_or("invalid")
            )
        })
        .chain(apply_errors.iter().map(|(k, e)| format!("{k}: {e}")))
        .collect();
    let failed: Vec<String> = instances
        .iter()
        .filter(|i| i.state == InstanceState::Failed)
        .map(|i| {
            format!(
                "{} failed ({} restarts): {}",
                i.id.kind,
                i.restarts,
                i.last_error.as_deref().unwrap_or("ended")
            )
        })
        .collect();
    let resources: Vec<ResourceStatus> = instances
        .iter()
        .filter(|i| i.id.kind == "promoter")
        .flat_map(|i| promoter_resources(i.detail.as_ref()))
        .collect();
    let blocked: Vec<String> = resources
        .iter()
        .filter(|r| r.state == "blocked")
        .map(|r| match &r.reason {
            Some(why) => format!("{} blocked: {why}", r.name),
            None => format!("{} blocked", r.name),
        })
        .collect();

    let (applied, a_reason, a_msg) = if let Some(p) = problem {
        (false, p.reason.clone(), p.message.clone())
    } else if !invalid.is_empty() {
        (false, "PluginInvalid".to_string(), invalid.join("; "))
    } else if instances.is_empty() {
        (
            true,
            "NothingToRun".to_string(),
            "the policy sets no plugin section".to_string(),
        )
    } else {
        (
            true,
            "Applied".to_string(),
            format!("running: {}", plugins.join(", ")),
        )
    };
    // the promoter's unit files that could not be written (retried meanwhile)
    let files: Vec<String> = instances
        .iter()
        .filter(|i| i.id.kind == "promoter")
        .filter_map(|i| i.detail.as_ref()?.get("unitFiles")?.get("reason")?.as_str())
        .map(|r| format!("unit files: {r}"))
        .collect();
    let (degraded, d_reason, d_msg) = if !failed.is_empty() {
        (true, "PluginFailed", failed.join("; "))
    } else if !files.is_empty() {
        (true, "UnitFilesFailed", files.join("; "))
    } else if !blocked.is_empty() {
        (true, "ResourceBlocked", blocked.join("; "))
    } else if !applied {
        (true, "NotApplied", a_msg.clone())
    } else {
        (false, "AsExpected", String::new())
    };
    let state = match (applied, degraded) {
        (true, false) => STATE_APPLIED,
        (true, true) => STATE_DEGRADED,
        (false, _) => STATE_NOT_APPLIED,
    };
    Some(NodeStatus {
        node: node.to_string(),
        observed_generation: generation,
        state: state.to_string(),
        plugins,
        conditions: vec![
            condition(prev, CONDITION_APPLIED, applied, &a_reason, a_msg, now),
            condition(prev, CONDITION_DEGRADED, degraded, d_reason, d_msg, now),
        ],
        resources,
    })
}

/// Two entries that differ only in transition times are the same for deciding whether to write.
pub fn same_entry(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |n: &NodeStatus| {
        let mut n = n.clone();
        for c in &mut n.conditions {
            c.last_transition_time.clear();
        }
        n
    };
    strip(a) == strip(b)
}
