//! Stand-ins for `drbdsetup` where no DRBD kernel module can run (build machines, CI, kind).
//!
//! - [`replay`]: prints a recorded or scripted events2 stream, with directives for pauses, exits and
//!   polls, for tests that need an exact stream.

pub mod replay;
