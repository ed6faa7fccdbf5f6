//! `spec.umh` of a ReactorPolicy: the YAML/CRD shape only. What the values mean, and which fields apply to
//! which rule kind, is checked when the spec is compiled ([`super::rules::compile`]), with errors that name
//! the field path.

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Schema of a field whose value may take several shapes (a value or a list, a value or `{equals: …}`).
/// A CRD schema must be structural (one type per node, no `type` inside `oneOf`), and CEL rules cannot
/// see a node without a type, so these fields are declared as "any value"
/// (`x-kubernetes-preserve-unknown-fields`) narrowed by keywords that apply to one JSON type each: an
/// unsatisfiable pair (`minLength: 1` with `maxLength: 0`) refuses every value of that type, `items`
/// types the list form. So the API server refuses what the agent cannot read where the schema can say
/// it (`volume: "x"`, `resourceName: {a: 1}`); what is left (an unknown key in `{equals: …}`) is
/// checked by the agent, which reports it on the policy's own status.
fn any_shape(description: &str, shape: serde_json::Value) -> schemars::Schema {
    let mut v = serde_json::json!({
        "description": description,
        "x-kubernetes-preserve-unknown-fields": true,
    });
    if let (Some(o), serde_json::Value::Object(extra)) = (v.as_object_mut(), shape) {
        o.extend(extra);
    }
    schemars::Schema::try_from(v).expect("an object is a schema")
}

/// Keywords refusing every value of one JSON type (see [`any_shape`]).
fn no_strings() -> serde_json::Value {
    serde_json::json!({"minLength": 1, "maxLength": 0})
}
fn no_objects() -> serde_json::Value {
    serde_json::json!({"minProperties": 1, "maxProperties": 0})
}
fn no_lists() -> serde_json::Value {
    serde_json::json!({"minItems": 1, "maxItems": 0})
}
fn no_numbers() -> serde_json::Value {
    serde_json::json!({"minimum": 1, "maximum": 0})
}
fn no_booleans() -> serde_json::Value {
    serde_json::json!({"not": {"enum": [true, false]}})
}
/// Numbers must be whole, not negative and at most `max`.
fn whole(max: u32) -> serde_json::Value {
    serde_json::json!({"minimum": 0, "maximum": max, "multipleOf": 1})
}

fn merge(parts: &[serde_json::Value]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for p in parts {
        if let serde_json::Value::Object(o) = p {
            out.extend(o.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// What one element of a [`OneOrMany`] may be, as schema keywords on an untyped node.
pub trait ItemShape {
    /// Keywords for the single value (which is also the list form's item, minus lists).
    fn keywords() -> serde_json::Value;
    /// The `items` schema of the list form.
    fn items() -> serde_json::Value;
}

impl ItemShape for String {
    fn keywords() -> serde_json::Value {
        merge(&[no_objects(), no_numbers(), no_booleans()])
    }
    fn items() -> serde_json::Value {
        serde_json::json!({"type": "string"})
    }
}

impl ItemShape for u32 {
    fn keywords() -> serde_json::Value {
        merge(&[no_objects(), no_strings(), no_booleans(), whole(u32::MAX)])
    }
    fn items() -> serde_json::Value {
        serde_json::json!({"type": "integer", "minimum": 0, "maximum": u32::MAX})
    }
}

impl ItemShape for Scalar {
    fn keywords() -> serde_json::Value {
        merge(&[no_objects(), no_lists()])
    }
    fn items() -> serde_json::Value {
        merge(&[
            serde_json::json!({"x-kubernetes-preserve-unknown-fields": true}),
            no_objects(),
            no_lists(),
        ])
    }
}

/// The keywords of a value-or-list of `T`.
fn one_or_many<T: ItemShape>() -> serde_json::Value {
    merge(&[T::keywords(), serde_json::json!({"items": T::items()})])
}

macro_rules! any_shape_schema {
    ($t:ty, $name:literal, $desc:literal, $shape:expr) => {
        impl JsonSchema for $t {
            fn inline_schema() -> bool {
                true
            }
            fn schema_name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                any_shape($desc, $shape)
            }
        }
    };
}

/// `spec.umh`: rules that run a command or script when DRBD state changes or a kernel helper is called.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new(
    "(!has(self.resource) || self.resource.all(x, self.resource.exists_one(y, y.name == x.name))) && (!has(self.device) || self.device.all(x, self.device.exists_one(y, y.name == x.name))) && (!has(self.peerDevice) || self.peerDevice.all(x, self.peerDevice.exists_one(y, y.name == x.name))) && (!has(self.connection) || self.connection.all(x, self.connection.exists_one(y, y.name == x.name))) && (!has(self.helper) || self.helper.all(x, self.helper.exists_one(y, y.name == x.name)))"
).message(Message::Message("rule names must be unique within each list (the agent also checks across lists)".into())))]
pub struct UmhSpec {
    /// Rules on resource updates (fields: role, mayPromote, promotionScore).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub resource: Vec<StateRule>,
    /// Rules on device (local volume) updates (fields: diskState, client, quorum, open, size).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub device: Vec<StateRule>,
    /// Rules on peer-device updates (fields: replicationState, peerDiskState, peerClient, resyncSuspended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub peer_device: Vec<StateRule>,
    /// Rules on connection updates (fields: connName, connectionState, peerRole, congested).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub connection: Vec<StateRule>,
    /// Rules on kernel user-mode-helper events (`call helper` / `response helper` lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub helper: Vec<HelperRule>,
    /// Runs of this policy's rules executing at the same time (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_concurrent: Option<u32>,
    /// Runs waiting for a slot; beyond it new runs are dropped and counted (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_queued: Option<u32>,
    /// Bytes of stdout and of stderr kept per run for the log (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit_bytes: Option<u32>,
}

/// One value or a list of values (a list means "any of").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: ItemShape> JsonSchema for OneOrMany<T> {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "OneOrMany".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        any_shape(
            "One value, or a list of values (any of them).",
            one_or_many::<T>(),
        )
    }
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(u64),
    Str(String),
}

/// A field filter: a plain value or list (= `equals`), or `{equals: ...}` / `{notEquals: ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldFilter {
    Value(OneOrMany<Scalar>),
    Op(OpFilter),
}

any_shape_schema!(
    Scalar,
    "Scalar",
    "A state name, a boolean (or yes/no/unknown) or a number.",
    Scalar::keywords()
);
any_shape_schema!(
    FieldFilter,
    "FieldFilter",
    "A value or a list of values (= equals), or {equals: …} / {notEquals: …}.",
    // the keys of the operator form, and numbers, are the agent's to check (the CRD would grow by
    // hundreds of kB, one copy per filter field)
    serde_json::json!({"maxProperties": 2, "items": Scalar::items()})
);
any_shape_schema!(
    Changed,
    "Changed",
    "true: fire only when a filtered field changed; a list of field names: when one of them changed.",
    merge(&[
        no_objects(),
        no_strings(),
        no_numbers(),
        serde_json::json!({"items": {"type": "string"}}),
    ])
);

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.path) != has(self.configMapRef)").message(Message::Message(
    "give exactly one of configMapRef (Kubernetes mode) and path (file mode)".into()
)))]
#[x_kube(validation = Rule::new("!has(self.path)").message(Message::Message(
    "script.path is for policy files (drbd-reactor agent --policy-dir); in Kubernetes use configMapRef: {name, key}, a ConfigMap in the agent's namespace".into()
)))]
pub struct ScriptRef {
    /// File mode: a path relative to the policy directory (no `..`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Kubernetes mode: a key of a ConfigMap in the agent's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigMapRef {
    /// Name of the ConfigMap, in the agent's own namespace.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message(Message::Message(
        "must be a ConfigMap name (lower case letters, digits, '-', '.')".into()
    )))]
    pub name: String,
    /// Key in the ConfigMap's `data`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')").message(Message::Message(
        "must be a ConfigMap key (letters, digits, '-', '_', '.')".into()
    )))]
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.command) != has(self.script)").message(Message::Message(
    "give exactly one of command (argv, no shell) and script".into()
)))]
pub struct StateRule {
    /// Unique within the policy; letters, digits, '.', '_', '-'. Logged and used as the metrics label.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
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
    #[schemars(length(max = 64))]
    pub env: BTreeMap<String, String>,
    /// Seconds before the run's process group is killed (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub timeout_seconds: Option<u64>,
}

/// A rule on kernel user-mode-helper events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = Rule::new("has(self.command) != has(self.script)").message(Message::Message(
    "give exactly one of command (argv, no shell) and script".into()
)))]
pub struct HelperRule {
    /// Unique within the policy; letters, digits, '.', '_', '-'.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
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
    #[schemars(length(max = 64))]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub timeout_seconds: Option<u64>,
}
