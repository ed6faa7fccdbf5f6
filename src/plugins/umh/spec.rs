//! `spec.umh` of a ReactorPolicy: the YAML/CRD shape only. What the values mean, and which fields apply to
//! which rule kind, is checked when the spec is compiled ([`super::rules::compile`]), with errors that name
//! the field path.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `spec.umh`: rules that run a command or script when DRBD state changes or a kernel helper is called.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UmhSpec {
    /// Rules on resource updates (fields: role, mayPromote, promotionScore).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resource: Vec<StateRule>,
    /// Rules on device (local volume) updates (fields: diskState, client, quorum, open, size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device: Vec<StateRule>,
    /// Rules on peer-device updates (fields: replicationState, peerDiskState, peerClient, resyncSuspended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_device: Vec<StateRule>,
    /// Rules on connection updates (fields: connName, connectionState, peerRole, congested).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connection: Vec<StateRule>,
    /// Rules on kernel user-mode-helper events (`call helper` / `response helper` lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub helper: Vec<HelperRule>,
    /// Runs of this policy's rules executing at the same time (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Runs waiting for a slot; beyond it new runs are dropped and counted (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    /// Bytes of stdout and of stderr kept per run for the log (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit_bytes: Option<u32>,
}

/// One value or a list of values (a list means "any of").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(t) => std::slice::from_ref(t),
            OneOrMany::Many(v) => v,
        }
    }
}

/// A filter value as written: a state name, a boolean (`true`/`false`, or `yes`/`no`/`unknown`) or a number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(u64),
    Str(String),
}

/// A field filter: a plain value or list (= `equals`), or `{equals: ...}` / `{notEquals: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum FieldFilter {
    Value(OneOrMany<Scalar>),
    Op(OpFilter),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpFilter {
    /// Matches when the field equals the value (or any of the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<OneOrMany<Scalar>>,
    /// Matches when the field equals none of the values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_equals: Option<OneOrMany<Scalar>>,
}

/// Filters on the state before (`old`) or after (`new`) an update. Which fields a rule may use depends on
/// its kind; an absent field means "any".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateFilter {
    // resource
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_promote: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_score: Option<FieldFilter>,
    // device
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_state: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quorum: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<FieldFilter>,
    // peer device
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_state: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_disk_state: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_client: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_suspended: Option<FieldFilter>,
    // connection
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conn_name: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_role: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congested: Option<FieldFilter>,
}

/// The transition guard: `true` = at least one filtered field (or, without old/new filters, any field of
/// the kind) differs between old and new; a list = at least one of the named fields differs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Changed {
    Flag(bool),
    Fields(Vec<String>),
}

/// Where the command or script runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Where {
    /// In the agent's container.
    #[default]
    Container,
    /// On the host, through the agent's `--host-exec` prefix (nsenter into the host's namespaces).
    Host,
}

/// A script to run: exactly one of `path` (file mode) or `configMapRef` (Kubernetes mode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptRef {
    /// File mode: a path relative to the policy directory (no `..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Kubernetes mode: a key of a ConfigMap in the agent's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapRef {
    pub name: String,
    pub key: String,
}

impl ScriptRef {
    /// The key under which the agent puts the resolved content into the instance configuration.
    pub fn key(&self) -> String {
        match (&self.path, &self.config_map_ref) {
            (Some(p), _) => format!("path:{p}"),
            (None, Some(c)) => format!("configMap:{}/{}", c.name, c.key),
            (None, None) => String::new(),
        }
    }
}

/// A rule on resource, device, peer-device or connection updates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateRule {
    /// Unique within the policy; letters, digits, '.', '_', '-'. Logged and used as the metrics label.
    pub name: String,
    /// DRBD resource name: exact, or a glob (`*`, `?`, `[a-z]`, `[!x]`); a list means any of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<OneOrMany<String>>,
    /// Volume number (device and peerDevice rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<OneOrMany<u32>>,
    /// Peer node id (peerDevice and connection rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node_id: Option<OneOrMany<u32>>,
    /// `exists`, `create`, `change`, `destroy` (or a list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<OneOrMany<String>>,
    /// Filters on the state before the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<StateFilter>,
    /// Filters on the state after the update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<StateFilter>,
    /// Fire only on a transition: see [`Changed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<Changed>,
    /// Program and arguments, run without a shell. Exactly one of `command` and `script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A script (with a `#!` line) to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<ScriptRef>,
    /// `container` (default) or `host`.
    #[serde(default, rename = "where")]
    pub location: Where,
    /// Extra environment variables (names must not start with `DRBD_`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Seconds before the run's process group is killed (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// A rule on kernel user-mode-helper events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HelperRule {
    /// Unique within the policy; letters, digits, '.', '_', '-'.
    pub name: String,
    /// Helper name (e.g. `before-resync-target`, `fence-peer`), exact or a glob; a list means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helper: Option<OneOrMany<String>>,
    /// DRBD resource name: exact or a glob.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<OneOrMany<String>>,
    /// Volume number; a helper event without a volume does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<OneOrMany<u32>>,
    /// Peer node id; a helper event without one does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_node_id: Option<OneOrMany<u32>>,
    /// `call` (the kernel invoked the helper) or `response` (it returned), or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<OneOrMany<String>>,
    /// The helper's exit code (`response` only; `status` >> 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<FieldFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<ScriptRef>,
    #[serde(default, rename = "where")]
    pub location: Where,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}
