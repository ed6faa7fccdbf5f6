//! Stand-ins for `drbdsetup` where no DRBD kernel module can run (build machines, CI, kind).
//!
//! - [`replay`]: prints a recorded or scripted events2 stream, with directives for pauses, exits and
//!   polls, for tests that need an exact stream.
//! - the cluster simulator (`drbd-sim --cluster DIR ...`, docs/simulator.md): a multi-node DRBD cluster
//!   model ([`model`], pure), what one node's drbdsetup sees and prints ([`view`], [`events`],
//!   [`json`]), the shared journal ([`store`]), and the command line ([`cli`], [`scenario`]).

pub mod cli;
pub mod events;
pub mod json;
pub mod model;
pub mod replay;
pub mod scenario;
pub mod store;
pub mod view;
