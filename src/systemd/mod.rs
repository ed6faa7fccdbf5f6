//! Effector: the host's service manager. The promoter talks to it only through [`ServiceManager`], so its
//! decisions and effects can be tested against a real systemd (D-Bus, `zbus`) and, where a host has no bus
//! daemon, through `systemctl` on the host-exec path. Unit files are written by `UnitDir`]-style writers
//! under the host's `/run/systemd/system` (configurable for tests).

pub mod files;

use futures::future::BoxFuture;

/// What a finished systemd job reported (`JobRemoved` result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Done,
    Canceled,
    Timeout,
    Failed,
    Dependency,
    Skipped,
    Other(String),
}

impl JobResult {
    pub fn parse(s: &str) -> JobResult {
        match s {
            "done" => JobResult::Done,
            "canceled" => JobResult::Canceled,
            "timeout" => JobResult::Timeout,
            "failed" => JobResult::Failed,
            "dependency" => JobResult::Dependency,
            "skipped" => JobResult::Skipped,
            o => JobResult::Other(o.to_string()),
        }
    }
    pub fn is_done(&self) -> bool {
        matches!(self, JobResult::Done)
    }
}

/// A unit's state as systemd reports it (`ActiveState`, `SubState`, `FreezerState`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    pub freezer_state: String,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }
    pub fn is_frozen(&self) -> bool {
        self.freezer_state == "frozen"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the service manager at {address}: {message}")]
    Connect { address: String, message: String },
    #[error("{method}({unit}): {message}")]
    Call {
        method: &'static str,
        unit: String,
        message: String,
    },
    #[error("{method}({unit}): no JobRemoved signal within {secs} s")]
    JobTimeout {
        method: &'static str,
        unit: String,
        secs: u64,
    },
    #[error("writing unit files in {dir}: {message}")]
    Files { dir: String, message: String },
}

/// The service-manager operations the promoter needs. Start/stop wait for their job to finish (subscribe
/// before the call, match `JobRemoved` by job path) and return its result.
pub trait ServiceManager: Send + Sync + 'static {
    /// `daemon-reload` (Manager.Reload), once per batch of unit-file changes.
    fn reload(&self) -> BoxFuture<'_, Result<(), SystemdError>>;
    fn start_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>>;
    fn stop_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>>;
    /// Errors are the caller's to ignore (upstream ignores them too).
    fn reset_failed_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>>;
    fn unit_state<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitState, SystemdError>>;
    fn freeze_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>>;
    fn thaw_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>>;
}

pub mod dbus;
pub mod systemctl;

pub use dbus::{DbusManager, DbusOptions, DEFAULT_BUS};
pub use systemctl::SystemctlManager;

/// How the agent reaches the host's systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemdVia {
    /// D-Bus through a bus daemon at this address (default: the host's system bus mounted into the pod).
    Dbus { address: String },
    /// `systemctl` run through this host-exec prefix (hosts without a bus daemon, e.g. kind nodes).
    Systemctl {
        host_exec: Vec<String>,
        systemctl: String,
    },
}

/// The agent's systemd settings (`--systemd-bus`, `--systemd-via`, `--systemd-job-timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdOptions {
    pub via: SystemdVia,
    /// How long start/stop wait for their job.
    pub job_timeout: std::time::Duration,
}

impl Default for SystemdOptions {
    fn default() -> Self {
        SystemdOptions {
            via: SystemdVia::Dbus {
                address: DEFAULT_BUS.to_string(),
            },
            job_timeout: DbusOptions::default().job_timeout,
        }
    }
}

/// The service manager `opts` describe. Nothing is contacted here (the D-Bus client connects on its first
/// call and again after the bus went away), so an agent without promoter policies starts on a host
/// without a bus; only a malformed configuration is an error.
pub fn connect(opts: &SystemdOptions) -> Result<std::sync::Arc<dyn ServiceManager>, SystemdError> {
    let call_timeout = DbusOptions::default().call_timeout;
    Ok(match &opts.via {
        SystemdVia::Dbus { address } => std::sync::Arc::new(DbusManager::new(
            address,
            DbusOptions {
                job_timeout: opts.job_timeout,
                call_timeout,
            },
        )?),
        SystemdVia::Systemctl {
            host_exec,
            systemctl,
        } => {
            if systemctl.is_empty() {
                return Err(SystemdError::Connect {
                    address: "systemctl".into(),
                    message: "the systemctl command is empty".into(),
                });
            }
            std::sync::Arc::new(SystemctlManager::new(
                host_exec,
                systemctl,
                opts.job_timeout,
                call_timeout,
            ))
        }
    })
}
