//! `spec.promoter` of a ReactorPolicy: the YAML/CRD shape, its defaults (upstream's), and the checks that
//! the CRD expresses as CEL rules repeated here for file mode ([`validate`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Maximum resources per policy (bounds the cost of the CEL rules).
pub const MAX_RESOURCES: usize = 1000;
/// Maximum `start`/`stop` entries per resource.
pub const MAX_ENTRIES: usize = 32;
/// Maximum length of one `start`/`stop` entry.
pub const MAX_ENTRY_LEN: usize = 512;

/// `spec.promoter`: keep a chain of services running on exactly one node per DRBD resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PromoterSpec {
    /// The DRBD resources this policy promotes, each with the services that run where it is Primary.
    /// A resource name appears at most once (the list is a map keyed by `name`).
    #[schemars(length(max = 1000))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub resources: Vec<PromotedResource>,
}

/// How `start` entries are run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Runner {
    /// `start` lists systemd units (or OCF agents); the promoter starts `drbd-services@RES.target`,
    /// whose promote unit makes DRBD Primary first.
    #[default]
    Systemd,
    /// `start` lists shell command lines, run in order with `sh -c` on the host; `stop` (default: `start`
    /// reversed) undoes them. The commands must promote and demote DRBD themselves. No freeze.
    Shell,
}

/// A systemd dependency directive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Dependency {
    Wants,
    #[default]
    Requires,
    Requisite,
    BindsTo,
}

impl Dependency {
    pub fn directive(self) -> &'static str {
        match self {
            Dependency::Wants => "Wants",
            Dependency::Requires => "Requires",
            Dependency::Requisite => "Requisite",
            Dependency::BindsTo => "BindsTo",
        }
    }
}

/// systemd `FailureAction=` of `drbd-demote-or-escalate@RES.service`: what happens when DRBD cannot be
/// demoted (not even with `--force`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    #[default]
    None,
    Reboot,
    RebootForce,
    RebootImmediate,
    Poweroff,
    PoweroffForce,
    PoweroffImmediate,
    Exit,
    ExitForce,
}

impl FailureAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureAction::None => "none",
            FailureAction::Reboot => "reboot",
            FailureAction::RebootForce => "reboot-force",
            FailureAction::RebootImmediate => "reboot-immediate",
            FailureAction::Poweroff => "poweroff",
            FailureAction::PoweroffForce => "poweroff-force",
            FailureAction::PoweroffImmediate => "poweroff-immediate",
            FailureAction::Exit => "exit",
            FailureAction::ExitForce => "exit-force",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PreferredNodesPolicy {
    /// Prefer the earlier nodes when starting, and fail back to a more preferred node when it returns.
    #[default]
    Always,
    /// Prefer the earlier nodes when starting only; never move running services back.
    StartOnly,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnQuorumLoss {
    /// Stop the services (the target) when the local DRBD device loses quorum.
    #[default]
    Shutdown,
    /// Freeze the services' cgroups (systemd runner), thaw them when quorum returns. Needs DRBD
    /// `on-no-quorum suspend-io`.
    Freeze,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnDiskDetach {
    /// Keep running diskless (I/O goes over the network to a peer).
    #[default]
    Ignore,
    /// Stop the services on a Primary that lost its local disk, if a peer has UpToDate data.
    FailOver,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn five() -> u64 {
    5
}
fn is_false(b: &bool) -> bool {
    !*b
}

/// One DRBD resource and the services that run where it is Primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "size(self.start) > 0", "message": "start must list at least one unit or command"},
    // Kept cheap for the API server's CEL cost budget (regular expressions over 1000 resources exceed
    // it): the shape here, the full character check in the agent (`validate`), reported on the status.
    {"rule": "!has(self.runner) || self.runner != 'systemd' || self.start.all(s, s.startsWith('ocf:') || (!s.contains(' ') && (s.endsWith('.service') || s.endsWith('.socket') || s.endsWith('.device') || s.endsWith('.mount') || s.endsWith('.automount') || s.endsWith('.swap') || s.endsWith('.target') || s.endsWith('.path') || s.endsWith('.timer') || s.endsWith('.slice') || s.endsWith('.scope'))))",
     "message": "systemd runner: each start entry is a unit name without spaces ending in a unit type such as .service or .mount, or 'ocf:VENDOR:AGENT INSTANCE [k=v ...]'"},
    // The host's own units (a part of REFUSED_UNITS and refused_start_unit; the agent checks them all).
    {"rule": "!has(self.runner) || self.runner != 'systemd' || self.start.all(s, !(s in ['-.mount', 'init.scope', 'dbus.service', 'dbus.socket', 'kubelet.service']) && !s.endsWith('.slice') && !s.endsWith('.scope') && !s.endsWith('.device') && !s.startsWith('systemd-'))",
     "message": "systemd runner: the host's own units (-.mount, slices, scopes, devices, systemd-*, dbus, kubelet, ...) may not be start units"},
    {"rule": "!has(self.runner) || self.runner != 'shell' || !has(self.onQuorumLoss) || self.onQuorumLoss != 'freeze'",
     "message": "onQuorumLoss freeze needs the systemd runner"},
    {"rule": "(has(self.runner) && self.runner == 'shell') || !has(self.stop) || size(self.stop) == 0",
     "message": "stop is only used by the shell runner (the systemd runner stops the target)"}
]))]
pub struct PromotedResource {
    /// The DRBD resource name.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
    )]
    pub name: String,
    /// What runs where the resource is Primary, in order: systemd units, or `ocf:VENDOR:AGENT INSTANCE
    /// [k=v ...]` OCF resource agents (run through `drbd-reactor ocf-wrapper`); with the shell runner,
    /// command lines.
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub start: Vec<String>,
    /// Shell runner only: command lines that undo `start` (default: `start` reversed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 512)))]
    pub stop: Vec<String>,
    /// `systemd` (default) or `shell`.
    #[serde(default)]
    pub runner: Runner,
    /// Dependency of each start unit on the one before it (default `Requires`).
    #[serde(default)]
    pub dependencies_as: Dependency,
    /// Dependency of `drbd-services@RES.target` on each start unit (default `Requires`).
    #[serde(default)]
    pub target_as: Dependency,
    /// What systemd does when DRBD cannot be demoted: `none` (default), `reboot`, `reboot-force`,
    /// `reboot-immediate`, `poweroff`, `poweroff-force`, `poweroff-immediate`, `exit`, `exit-force`.
    #[serde(default)]
    pub on_drbd_demote_failure: FailureAction,
    /// Demote with `drbdsetup secondary`, falling back to `secondary --force` (default true).
    #[serde(default = "yes")]
    pub secondary_force: bool,
    /// Stop the services when this policy stops managing the resource here (the resource or policy is
    /// removed, or the agent stops). Default false: services keep running while the agent is away.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop_services_on_exit: bool,
    /// Node names in order of preference: earlier nodes wait less before promoting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub preferred_nodes: Vec<String>,
    /// `always` (default: also fail back to a more preferred node when it returns) or `startOnly`.
    #[serde(default)]
    pub preferred_nodes_policy: PreferredNodesPolicy,
    /// `shutdown` (default: stop the services) or `freeze` when the local device loses quorum.
    #[serde(default)]
    pub on_quorum_loss: OnQuorumLoss,
    /// `ignore` (default) or `failOver` when the Primary loses its local disk.
    #[serde(default)]
    pub on_disk_detach: OnDiskDetach,
    /// Multiplies the promotion delay (default 1; 0 promotes at once).
    #[serde(default = "one")]
    #[schemars(range(max = 100))]
    pub sleep_before_promote_factor: u32,
    /// Fencing policy (quorum off): extra seconds before promoting while a peer is not connected
    /// (default 5).
    #[serde(default = "five")]
    #[schemars(range(max = 3600))]
    pub fencing_promote_delay: u64,
    /// Run `drbdadm adjust RES` when the promoter starts managing the resource (default true).
    #[serde(default = "yes")]
    pub adjust_resource_on_start: bool,
    /// Maintenance: do nothing for this resource (no start, no stop, no freeze) until set back to
    /// false. Services running here keep running.
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Maintenance: node names that must not run the services. A listed node running them stops them
    /// (another node takes over) and does not start them until the name is removed again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub evict: Vec<String>,
}

impl Default for PromotedResource {
    fn default() -> Self {
        PromotedResource {
            name: String::new(),
            start: Vec::new(),
            stop: Vec::new(),
            runner: Runner::Systemd,
            dependencies_as: Dependency::Requires,
            target_as: Dependency::Requires,
            on_drbd_demote_failure: FailureAction::None,
            secondary_force: true,
            stop_services_on_exit: false,
            preferred_nodes: Vec::new(),
            preferred_nodes_policy: PreferredNodesPolicy::Always,
            on_quorum_loss: OnQuorumLoss::Shutdown,
            on_disk_detach: OnDiskDetach::Ignore,
            sleep_before_promote_factor: 1,
            fencing_promote_delay: 5,
            adjust_resource_on_start: true,
            disabled: false,
            evict: Vec::new(),
        }
    }
}

impl PromotedResource {
    /// The shell runner's stop entries: `stop`, or `start` reversed.
    pub fn stop_entries(&self) -> Vec<String> {
        if self.stop.is_empty() {
            self.start.iter().rev().cloned().collect()
        } else {
            self.stop.clone()
        }
    }
}

/// A spec error with the path of the offending field (`spec.promoter.resources[0].start[1]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

fn err(path: String, message: impl Into<String>) -> SpecError {
    SpecError {
        path,
        message: message.into(),
    }
}

/// A DRBD resource name we accept (it ends up in unit names and file names, escaped).
pub fn valid_resource_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && matches!(b, b'.' | b'+' | b'-'))
        })
}

const UNIT_TYPES: &[&str] = &[
    "service",
    "socket",
    "device",
    "mount",
    "automount",
    "swap",
    "target",
    "path",
    "timer",
    "slice",
    "scope",
];

/// A unit name as the CEL rule accepts it: `[A-Za-z0-9:_.\\@-]+` and a known unit type suffix.
pub fn valid_unit_name(s: &str) -> bool {
    let Some((stem, ty)) = s.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && UNIT_TYPES.contains(&ty)
        && s.len() <= 255
        && stem.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'\\' | b'@' | b'-')
        })
}

/// Units that the host needs to run at all, or that are not the promoter's to start and stop: a
/// promoter that stops them (on every demotion) takes the node, its bus or its kubelet down with it.
/// Listed by name; see [`refused_start_unit`] for the patterns.
pub const REFUSED_UNITS: &[&str] = &[
    "-.mount",
    "-.slice",
    "init.scope",
    "dbus.service",
    "dbus.socket",
    "dbus-broker.service",
    "kubelet.service",
    "containerd.service",
    "docker.service",
    "docker.socket",
    "crio.service",
    "ssh.service",
    "sshd.service",
    "drbd-reactor.service",
    "drbd.service",
    "default.target",
    "multi-user.target",
    "graphical.target",
    "rescue.target",
    "emergency.target",
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "timers.target",
    "paths.target",
    "local-fs.target",
    "remote-fs.target",
    "network.target",
    "network-online.target",
    "shutdown.target",
    "reboot.target",
    "poweroff.target",
    "halt.target",
    "kexec.target",
    "getty.target",
];

/// Why a unit may not be a promoter start unit, or `None` when it may: the names of
/// [`REFUSED_UNITS`], every slice and scope (cgroup containers of other units and sessions), device
/// units (systemd's, not startable), systemd's own units (`systemd-*`), user sessions (`user@*`,
/// `user-*`, `session-*`), and the promoter's own generated units.
pub fn refused_start_unit(unit: &str) -> Option<&'static str> {
    let ty = unit.rsplit_once('.').map(|(_, t)| t).unwrap_or_default();
    if REFUSED_UNITS.contains(&unit) {
        Some("the host needs it running, and the promoter stops its start units on every demotion")
    } else if matches!(ty, "slice" | "scope") {
        Some("slices and scopes hold other units' and sessions' processes")
    } else if ty == "device" {
        Some("device units are the kernel's, not started")
    } else if unit.starts_with("systemd-") {
        Some("systemd's own units are not the promoter's to start and stop")
    } else if [
        "user@",
        "user-",
        "user-runtime-dir@",
        "session-",
        "getty@",
        "serial-getty@",
    ]
    .iter()
    .any(|p| unit.starts_with(p))
    {
        Some("login sessions and terminals are not the promoter's to start and stop")
    } else if [
        "drbd-services@",
        "drbd-promote@",
        "drbd-demote-or-escalate@",
        "ocf.rs@",
    ]
    .iter()
    .any(|p| unit.starts_with(p))
    {
        Some("the promoter generates this unit itself")
    } else {
        None
    }
}

/// A start entry of the systemd runner: an OCF agent or a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Unit(String),
    Ocf(OcfAgent),
}

/// `ocf:VENDOR:AGENT INSTANCE [k=v ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcfAgent {
    pub vendor: String,
    pub agent: String,
    pub instance: String,
    /// `OCF_RESKEY_<k>` values, in order; a bare `k` gives an empty value.
    pub params: Vec<(String, String)>,
}

fn simple_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Parses an OCF entry. Arguments are split like a shell splits words (quotes, backslashes, several
/// lines), never run by one.
pub fn parse_ocf(s: &str) -> Result<OcfAgent, String> {
    let rest = s
        .strip_prefix("ocf:")
        .ok_or_else(|| "not an OCF entry".to_string())?;
    let (head, args) = rest
        .split_once(|c: char| c.is_whitespace())
        .ok_or_else(|| "expected 'ocf:VENDOR:AGENT INSTANCE [k=v ...]'".to_string())?;
    let (vendor, agent) = head
        .split_once(':')
        .ok_or_else(|| "expected 'ocf:VENDOR:AGENT'".to_string())?;
    if !simple_word(vendor) || !simple_word(agent) {
        return Err(format!(
            "vendor '{vendor}' and agent '{agent}' may only contain letters, digits, '_', '-', '.'"
        ));
    }
    let words = shlex::split(args).ok_or_else(|| "unbalanced quotes".to_string())?;
    let mut it = words.into_iter();
    let instance = it
        .next()
        .ok_or_else(|| "missing the instance id after the agent".to_string())?;
    if !simple_word(&instance) {
        return Err(format!(
            "instance id '{instance}' may only contain letters, digits, '_', '-', '.'"
        ));
    }
    let mut params = Vec::new();
    for w in it {
        let (k, v) = w.split_once('=').unwrap_or((w.as_str(), ""));
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "parameter name '{k}' may only contain letters, digits, '_'"
            ));
        }
        params.push((k.to_string(), v.to_string()));
    }
    Ok(OcfAgent {
        vendor: vendor.to_string(),
        agent: agent.to_string(),
        instance,
        params,
    })
}

/// Classifies a start entry of the systemd runner.
pub fn parse_entry(s: &str) -> Result<Entry, String> {
    if s.starts_with("ocf:") {
        return parse_ocf(s).map(Entry::Ocf);
    }
    if valid_unit_name(s) {
        Ok(Entry::Unit(s.to_string()))
    } else {
        Err(format!(
            "'{s}' is not a unit name (letters, digits, ':', '_', '.', '\\', '@', '-', ending in a unit \
             type such as .service or .mount) nor 'ocf:VENDOR:AGENT INSTANCE [k=v ...]'"
        ))
    }
}

/// The checks of the CRD's CEL rules and more (OCF syntax, unit names unique across resources), with
/// the field path. `base` is the path of the section (`spec.promoter`).
pub fn validate(spec: &PromoterSpec, base: &str) -> Result<(), SpecError> {
    if spec.resources.len() > MAX_RESOURCES {
        return Err(err(
            format!("{base}.resources"),
            format!("at most {MAX_RESOURCES} resources"),
        ));
    }
    let mut names = BTreeSet::new();
    let mut units: std::collections::BTreeMap<String, String> = Default::default();
    for (i, r) in spec.resources.iter().enumerate() {
        let p = format!("{base}.resources[{i}]");
        if !valid_resource_name(&r.name) {
            return Err(err(
                format!("{p}.name"),
                format!(
                    "'{}' is not a DRBD resource name (letters, digits, '_', and '.', '+', '-' after the first)",
                    r.name
                ),
            ));
        }
        if !names.insert(r.name.as_str()) {
            return Err(err(
                format!("{p}.name"),
                format!("resource '{}' is listed twice", r.name),
            ));
        }
        if r.start.is_empty() {
            return Err(err(
                format!("{p}.start"),
                "start must list at least one unit or command",
            ));
        }
        if r.start.len() > MAX_ENTRIES || r.stop.len() > MAX_ENTRIES {
            return Err(err(p, format!("at most {MAX_ENTRIES} start/stop entries")));
        }
        for (j, s) in r.start.iter().chain(&r.stop).enumerate() {
            if s.trim().is_empty() || s.len() > MAX_ENTRY_LEN {
                return Err(err(
                    format!("{p}.start[{j}]"),
                    format!("entries are 1 to {MAX_ENTRY_LEN} characters, not blank"),
                ));
            }
        }
        match r.runner {
            Runner::Systemd => {
                if !r.stop.is_empty() {
                    return Err(err(
                        format!("{p}.stop"),
                        "stop is only used by the shell runner (the systemd runner stops the target)",
                    ));
                }
                for (j, s) in r.start.iter().enumerate() {
                    let unit = match parse_entry(s) {
                        Ok(Entry::Unit(u)) => {
                            if let Some(why) = refused_start_unit(&u) {
                                return Err(err(
                                    format!("{p}.start[{j}]"),
                                    format!("{u} may not be a promoter start unit: {why}"),
                                ));
                            }
                            u
                        }
                        Ok(e) => super::units::unit_of(&e, &r.name),
                        Err(m) => return Err(err(format!("{p}.start[{j}]"), m)),
                    };
                    if let Some(other) = units.insert(unit.clone(), r.name.clone()) {
                        return Err(err(
                            format!("{p}.start[{j}]"),
                            if other == r.name {
                                format!("unit {unit} is listed twice")
                            } else {
                                format!("unit {unit} is already started for resource '{other}'")
                            },
                        ));
                    }
                }
            }
            Runner::Shell => {
                if r.on_quorum_loss == OnQuorumLoss::Freeze {
                    return Err(err(
                        format!("{p}.onQuorumLoss"),
                        "freeze needs the systemd runner",
                    ));
                }
            }
        }
        for (field, list) in [("preferredNodes", &r.preferred_nodes), ("evict", &r.evict)] {
            if list.len() > 64 {
                return Err(err(format!("{p}.{field}"), "at most 64 node names"));
            }
            if let Some(j) = list.iter().position(|n| n.is_empty() || n.len() > 253) {
                return Err(err(
                    format!("{p}.{field}[{j}]"),
                    "node names are 1 to 253 characters",
                ));
            }
        }
        if r.sleep_before_promote_factor > 100 {
            return Err(err(format!("{p}.sleepBeforePromoteFactor"), "at most 100"));
        }
        if r.fencing_promote_delay > 3600 {
            return Err(err(
                format!("{p}.fencingPromoteDelay"),
                "at most 3600 seconds",
            ));
        }
    }
    Ok(())
}

/// A resource with these start entries and defaults otherwise (for tests).
#[cfg(test)]
pub(crate) fn test_resource(name: &str, start: &[&str]) -> PromotedResource {
    PromotedResource {
        name: name.into(),
        start: start.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_resource as res;

    #[test]
    fn defaults_are_upstreams() {
        let r: PromotedResource = serde_yaml::from_str("name: r0\nstart: [a.service]\n").unwrap();
        assert_eq!(r, res("r0", &["a.service"]));
        assert!(r.secondary_force && r.adjust_resource_on_start && !r.stop_services_on_exit);
        assert_eq!(r.sleep_before_promote_factor, 1);
        assert_eq!(r.fencing_promote_delay, 5);
        assert_eq!(r.dependencies_as, Dependency::Requires);
        assert_eq!(r.on_drbd_demote_failure, FailureAction::None);
        let y = "name: r0\nstart: [a.service]\nrunner: shell\ndependenciesAs: BindsTo\ntargetAs: Wants\n\
                 onDrbdDemoteFailure: reboot-immediate\npreferredNodesPolicy: startOnly\n\
                 onQuorumLoss: freeze\nonDiskDetach: failOver\nsecondaryForce: false\n";
        let r: PromotedResource = serde_yaml::from_str(y).unwrap();
        assert_eq!(r.runner, Runner::Shell);
        assert_eq!(r.dependencies_as, Dependency::BindsTo);
        assert_eq!(r.target_as, Dependency::Wants);
        assert_eq!(r.on_drbd_demote_failure, FailureAction::RebootImmediate);
        assert_eq!(r.preferred_nodes_policy, PreferredNodesPolicy::StartOnly);
        assert_eq!(r.on_quorum_loss, OnQuorumLoss::Freeze);
        assert_eq!(r.on_disk_detach, OnDiskDetach::FailOver);
        assert!(!r.secondary_force);
        // canonical form round-trips (the instance identity)
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<PromotedResource>(v).unwrap(), r);
        assert!(
            serde_yaml::from_str::<PromotedResource>("name: r0\nstart: []\nbogus: 1\n").is_err()
        );
    }

    #[test]
    fn ocf_entries() {
        let a = parse_ocf("ocf:heartbeat:Filesystem fs_r0 device=/dev/drbd1000 directory='/srv/my data' fstype=ext4 run_fsck")
            .unwrap();
        assert_eq!(a.vendor, "heartbeat");
        assert_eq!(a.agent, "Filesystem");
        assert_eq!(a.instance, "fs_r0");
        assert_eq!(
            a.params,
            vec![
                ("device".into(), "/dev/drbd1000".into()),
                ("directory".into(), "/srv/my data".into()),
                ("fstype".into(), "ext4".into()),
                ("run_fsck".into(), "".into()),
            ]
        );
        let multi = parse_ocf("ocf:linbit:nfsserver nfs\n  nfs_shared_infodir=/srv/nfs\n").unwrap();
        assert_eq!(multi.params.len(), 1);
        for bad in [
            "ocf:heartbeat:IPaddr2",
            "ocf:heartbeat IPaddr2 ip",
            "ocf:he/at:IPaddr2 ip",
            "ocf:a:b inst 'unbalanced",
            "ocf:a:b ../x",
            "ocf:a:b i bad-key=1",
        ] {
            assert!(parse_ocf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unit_names() {
        for ok in [
            "a.service",
            "srv-data.mount",
            "foo@bar.service",
            "x\\x2dy.mount",
            "a:b.target",
        ] {
            assert!(valid_unit_name(ok), "{ok}");
        }
        for bad in [
            "a",
            "a.exe",
            "/etc/a.service",
            "a b.service",
            ".service",
            "a;b.service",
        ] {
            assert!(!valid_unit_name(bad), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let base = "spec.promoter";
        let ok = PromoterSpec {
            resources: vec![
                res("r0", &["a.mount", "ocf:heartbeat:IPaddr2 ip ip=10.0.0.1"]),
                res("r1", &["b.service"]),
            ],
        };
        validate(&ok, base).unwrap();
        let cases: Vec<(PromoterSpec, &str)> = vec![
            (
                PromoterSpec { resources: vec![res("r0", &[])] },
                "spec.promoter.resources[0].start: start must list",
            ),
            (
                PromoterSpec { resources: vec![res("r0", &["a.service"]), res("r0", &["b.service"])] },
                "spec.promoter.resources[1].name: resource 'r0' is listed twice",
            ),
            (
                PromoterSpec { resources: vec![res("r/0", &["a.service"])] },
                "spec.promoter.resources[0].name:",
            ),
            (
                PromoterSpec { resources: vec![res("r0", &["a.service", "/bin/true"])] },
                "spec.promoter.resources[0].start[1]: '/bin/true' is not a unit name",
            ),
            (
                PromoterSpec { resources: vec![res("r0", &["a.service"]), res("r1", &["a.service"])] },
                "spec.promoter.resources[1].start[0]: unit a.service is already started for resource 'r0'",
            ),
            (
                PromoterSpec { resources: vec![res("r0", &["ocf:a:b"])] },
                "spec.promoter.resources[0].start[0]: expected",
            ),
            (
                PromoterSpec {
                    resources: vec![PromotedResource {
                        runner: Runner::Shell,
                        on_quorum_loss: OnQuorumLoss::Freeze,
                        ..res("r0", &["mount /dev/drbd0 /mnt"])
                    }],
                },
                "spec.promoter.resources[0].onQuorumLoss: freeze needs the systemd runner",
            ),
            (
                PromoterSpec {
                    resources: vec![PromotedResource { stop: vec!["x".into()], ..res("r0", &["a.service"]) }],
                },
                "spec.promoter.resources[0].stop: stop is only used by the shell runner",
            ),
            (
                PromoterSpec {
                    resources: vec![PromotedResource { evict: vec!["".into()], ..res("r0", &["a.service"]) }],
                },
                "spec.promoter.resources[0].evict[0]:",
            ),
        ];
        for u in [
            "-.mount",
            "system.slice",
            "init.scope",
            "session-3.scope",
            "dbus.service",
            "kubelet.service",
            "systemd-journald.service",
            "systemd-udevd-control.socket",
            "multi-user.target",
            "dev-sda.device",
            "user@0.service",
            "drbd-services@r1.target",
        ] {
            let spec = PromoterSpec {
                resources: vec![res("r0", &["a.service", u])],
            };
            let e = validate(&spec, base).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "spec.promoter.resources[0].start[1]: {u} may not be a promoter start unit: "
                )),
                "{e}"
            );
        }
        for u in [
            "srv-data.mount",
            "nfs-server.service",
            "my.target",
            "app@r0.service",
        ] {
            assert_eq!(refused_start_unit(u), None, "{u}");
        }
        for (spec, want) in cases {
            let e = validate(&spec, base).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}\n  wanted {want}");
        }
        // the shell runner takes command lines
        let shell = PromoterSpec {
            resources: vec![PromotedResource {
                runner: Runner::Shell,
                ..res("r0", &["drbdadm primary r0 && mount /dev/drbd0 /mnt"])
            }],
        };
        validate(&shell, base).unwrap();
        assert_eq!(
            shell.resources[0].stop_entries(),
            vec!["drbdadm primary r0 && mount /dev/drbd0 /mnt".to_string()]
        );
    }
}
