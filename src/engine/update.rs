//! What the engine tells plugins: change updates (old/new of the fields that matter for decisions).

use crate::drbd::state::{Connection, Device, PeerDevice, Resource};
use crate::drbd::{ConnState, DiskState, ReplState, ResyncSuspended, Role, Tri, Verb};
use serde::Serialize;
use std::sync::Arc;

/// The event type of an update. `Exists` also marks the replayed state a newly started plugin gets.
pub type EventType = Verb;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceState {
    pub role: Role,
    pub may_promote: Tri,
    pub promotion_score: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceState {
    pub disk: DiskState,
    pub client: Tri,
    pub quorum: Tri,
    pub size: u64,
    pub open: Tri,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerDeviceState {
    pub replication: ReplState,
    pub peer_disk: DiskState,
    pub peer_client: Tri,
    pub resync_suspended: ResyncSuspended,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionState {
    pub conn_name: String,
    pub connection: ConnState,
    pub peer_role: Role,
    pub congested: Tri,
}

impl From<&Resource> for ResourceState {
    fn from(r: &Resource) -> Self {
        ResourceState {
            role: r.role.clone(),
            may_promote: r.may_promote,
            promotion_score: r.promotion_score,
        }
    }
}

impl From<&Device> for DeviceState {
    fn from(d: &Device) -> Self {
        DeviceState {
            disk: d.disk.clone(),
            client: d.client,
            quorum: d.quorum,
            size: d.size,
            open: d.open,
        }
    }
}

impl From<&PeerDevice> for PeerDeviceState {
    fn from(p: &PeerDevice) -> Self {
        PeerDeviceState {
            replication: p.replication.clone(),
            peer_disk: p.peer_disk.clone(),
            peer_client: p.peer_client,
            resync_suspended: p.resync_suspended.clone(),
        }
    }
}

impl From<&Connection> for ConnectionState {
    fn from(c: &Connection) -> Self {
        ConnectionState {
            conn_name: c.conn_name.clone(),
            connection: c.connection.clone(),
            peer_role: c.peer_role.clone(),
            congested: c.congested,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "object", rename_all = "kebab-case")]
pub enum Change {
    Resource {
        old: ResourceState,
        new: ResourceState,
    },
    Device {
        volume: u32,
        old: DeviceState,
        new: DeviceState,
    },
    #[serde(rename_all = "camelCase")]
    PeerDevice {
        peer_node_id: u32,
        volume: u32,
        old: PeerDeviceState,
        new: PeerDeviceState,
    },
    #[serde(rename_all = "camelCase")]
    Connection {
        peer_node_id: u32,
        old: ConnectionState,
        new: ConnectionState,
    },
    /// A kernel user-mode helper was called (`call`) or returned (`response`).
    #[serde(rename_all = "camelCase")]
    Helper {
        helper: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer_node_id: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        conn_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        volume: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        minor: Option<u32>,
        /// Raw wait status of the helper (exit code << 8), on `response`.
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<u32>,
    },
    /// The resource was renamed; `Update::resource` is the old name.
    #[serde(rename_all = "camelCase")]
    Rename { new_name: String },
}

/// One change update. `state` is the resource right after the event (before removal on destroy),
/// shared, not copied, between plugins.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Update {
    #[serde(rename = "eventType")]
    pub event: EventType,
    pub resource: String,
    #[serde(flatten)]
    pub change: Change,
    #[serde(skip)]
    pub state: Arc<Resource>,
}

impl PartialEq for Update {
    fn eq(&self, o: &Self) -> bool {
        self.event == o.event && self.resource == o.resource && self.change == o.change
    }
}

impl Update {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
