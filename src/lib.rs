//! drbd-reactor for Kubernetes: reacts to DRBD state changes read from `drbdsetup events2`.
//!
//! Data path: [`drbd`] (events2 parsing, state model) → [`engine`] (apply, diff, fan-out, reload) →
//! [`plugins`] → effectors ([`http`], process execution, systemd).

pub mod agent;
pub mod drbd;
pub mod engine;
pub mod http;
pub mod k8s;
pub mod metrics;
pub mod plugins;
pub mod policy;
pub mod ratelimit;
pub mod sim;
pub mod source;
pub mod systemd;
