//! The environment of a run (pure). DRBD values reach a script only as environment variables, never as
//! text spliced into a shell command.

use super::rules::{actual, verb_name, Field, Rule, Side};
use crate::engine::update::{Change, Update};
use std::collections::BTreeMap;

/// The PATH every run gets unless its rule's `env` sets another.
pub const MINIMAL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Facts about the instance that go into every environment.
#[derive(Debug, Clone, Copy)]
pub struct EnvCtx<'a> {
    pub node_name: &'a str,
    pub policy: &'a str,
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The complete environment of a run of `rule` for update `u`: `PATH` and `HOME`, then the rule's `env`
/// (which may replace them), then the DRBD variables (which nothing replaces: `DRBD_*` names are
/// rejected in `env`). Nothing is inherited from the agent.
pub fn build_env(ctx: EnvCtx<'_>, rule: &Rule, u: &Update) -> BTreeMap<String, String> {
    let mut e: BTreeMap<String, String> = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        e.insert(k.to_string(), v);
    };
    set("PATH", MINIMAL_PATH.to_string());
    set("HOME", "/".to_string());
    for (k, v) in &rule.env {
        set(k, v.clone());
    }
    set("DRBD_RES_NAME", u.resource.clone());
    set("DRBD_NODE_NAME", ctx.node_name.to_string());
    set("DRBD_EVENT_TYPE", verb_name(u.event).to_string());
    set("DRBD_POLICY_NAME", ctx.policy.to_string());
    set("DRBD_RULE_NAME", rule.name.clone());
    // Every volume of the resource, as the kernel's helpers get them.
    for d in u.state.devices.values() {
        set(&format!("DRBD_MINOR_{}", d.volume), opt(d.minor));
        set(
            &format!("DRBD_BACKING_DEV_{}", d.volume),
            d.backing_dev.clone().unwrap_or_else(|| "none".into()),
        );
    }
    let volume_vars = |set: &mut dyn FnMut(&str, String), vol: Option<u32>| {
        let dev = vol.and_then(|v| u.state.devices.get(&v));
        set("DRBD_VOLUME", opt(vol));
        set("DRBD_MINOR", opt(dev.and_then(|d| d.minor)));
        set(
            "DRBD_BACKING_DEV",
            match dev {
                Some(d) => d.backing_dev.clone().unwrap_or_else(|| "none".into()),
                None => String::new(),
            },
        );
    };
    let old_new = |set: &mut dyn FnMut(&str, String),
                   old: Side<'_>,
                   new: Side<'_>,
                   vars: &[(Field, &str)]| {
        for (f, name) in vars {
            for (side, prefix) in [(old, "OLD"), (new, "NEW")] {
                if let Some(a) = actual(*f, side) {
                    set(&format!("DRBD_{prefix}_{name}"), a.render());
                }
            }
        }
    };
    match &u.change {
        Change::Resource { old, new } => {
            old_new(
                &mut set,
                Side::Resource(old),
                Side::Resource(new),
                &[
                    (Field::Role, "ROLE"),
                    (Field::MayPromote, "MAY_PROMOTE"),
                    (Field::PromotionScore, "PROMOTION_SCORE"),
                ],
            );
        }
        Change::Device { volume, old, new } => {
            volume_vars(&mut set, Some(*volume));
            old_new(
                &mut set,
                Side::Device(old),
                Side::Device(new),
                &[
                    (Field::DiskState, "DISK_STATE"),
                    (Field::Client, "CLIENT"),
                    (Field::Quorum, "QUORUM"),
                    (Field::Open, "OPEN"),
                    (Field::Size, "SIZE"),
                ],
            );
        }
        Change::PeerDevice {
            peer_node_id,
            volume,
            old,
            new,
        } => {
            volume_vars(&mut set, Some(*volume));
            set("DRBD_PEER_NODE_ID", peer_node_id.to_string());
            set(
                "DRBD_CONN_NAME",
                u.state
                    .connections
                    .get(peer_node_id)
                    .map(|c| c.conn_name.clone())
                    .unwrap_or_default(),
            );
            old_new(
                &mut set,
                Side::PeerDevice(old),
                Side::PeerDevice(new),
                &[
                    (Field::ReplicationState, "PEER_REPLICATION_STATE"),
                    (Field::PeerDiskState, "PEER_DISK_STATE"),
                    (Field::PeerClient, "PEER_CLIENT"),
                    (Field::ResyncSuspended, "PEER_RESYNC_SUSPENDED"),
                ],
            );
        }
        Change::Connection {
            peer_node_id,
            old,
            new,
        } => {
            set("DRBD_PEER_NODE_ID", peer_node_id.to_string());
            set("DRBD_CSTATE", new.connection.to_string());
            set("DRBD_CONN_NAME", new.conn_name.clone());
            old_new(
                &mut set,
                Side::Connection(old),
                Side::Connection(new),
                &[
                    (Field::ConnName, "CONN_NAME"),
                    (Field::ConnectionState, "CONN_STATE"),
                    (Field::PeerRole, "PEER_ROLE"),
                    (Field::Congested, "CONGESTED"),
                ],
            );
        }
        Change::Helper {
            helper,
            peer_node_id,
            conn_name,
            volume,
            minor,
            status,
        } => {
            volume_vars(&mut set, *volume);
            if minor.is_some() {
                set("DRBD_MINOR", opt(*minor));
            }
            set("DRBD_HELPER", helper.clone());
            set("DRBD_PEER_NODE_ID", opt(*peer_node_id));
            set("DRBD_CONN_NAME", conn_name.clone().unwrap_or_default());
            set("DRBD_HELPER_STATUS", opt(*status));
            set("DRBD_HELPER_EXIT_CODE", opt(status.map(|s| s >> 8)));
        }
        Change::Rename { new_name } => {
            set("DRBD_NEW_RES_NAME", new_name.clone());
        }
    }
    e
}
