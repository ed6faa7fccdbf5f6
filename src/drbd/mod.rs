//! DRBD data model: the `drbdsetup events2` wire format and the state it describes. Pure: no I/O.

pub mod events2;
pub mod state;
pub mod types;
pub mod vecmap;

pub use events2::{parse_line, Body, Event, Line, Object, ParseError, Verb};
pub use types::*;
