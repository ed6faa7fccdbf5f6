//! Typed values of `drbdsetup events2` fields (GRAMMAR.md §4).
//!
//! Every enum keeps a value it does not know in `Other(..)` instead of rejecting the line, so a newer
//! kernel or drbd-utils that adds a state never makes the agent drop events.

use serde::{Serialize, Serializer};
use std::fmt;

macro_rules! drbd_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($variant,)+
            /// A value this version does not know, kept verbatim.
            Other(Box<str>),
        }

        impl $name {
            /// All known values in DRBD's enum order.
            pub const KNOWN: &'static [$name] = &[$($name::$variant),+];

            pub fn parse(s: &str) -> Self {
                match s {
                    $($text => $name::$variant,)+
                    other => $name::Other(other.into()),
                }
            }

            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)+
                    $name::Other(s) => s,
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Ok($name::parse(&s))
            }
        }
    };
}

drbd_enum!(
    /// Role of a resource (local) or of a peer (`role:` on a connection).
    Role { Unknown => "Unknown", Primary => "Primary", Secondary => "Secondary" } default Unknown
);

drbd_enum!(
    /// Disk state of a local device (`disk:`) or of a peer (`peer-disk:`).
    DiskState {
        Diskless => "Diskless",
        Attaching => "Attaching",
        Detaching => "Detaching",
        Failed => "Failed",
        Negotiating => "Negotiating",
        Inconsistent => "Inconsistent",
        Outdated => "Outdated",
        DUnknown => "DUnknown",
        Consistent => "Consistent",
        UpToDate => "UpToDate",
    } default DUnknown
);

drbd_enum!(
    /// Connection state (`connection:`).
    ConnState {
        StandAlone => "StandAlone",
        Disconnecting => "Disconnecting",
        Unconnected => "Unconnected",
        Timeout => "Timeout",
        BrokenPipe => "BrokenPipe",
        NetworkFailure => "NetworkFailure",
        ProtocolError => "ProtocolError",
        TearDown => "TearDown",
        Connecting => "Connecting",
        Connected => "Connected",
    } default StandAlone
);

drbd_enum!(
    /// Replication state of a peer device (`replication:`).
    ReplState {
        Off => "Off",
        Established => "Established",
        StartingSyncS => "StartingSyncS",
        StartingSyncT => "StartingSyncT",
        WFBitMapS => "WFBitMapS",
        WFBitMapT => "WFBitMapT",
        WFSyncUUID => "WFSyncUUID",
        SyncSource => "SyncSource",
        SyncTarget => "SyncTarget",
        VerifyS => "VerifyS",
        VerifyT => "VerifyT",
        PausedSyncS => "PausedSyncS",
        PausedSyncT => "PausedSyncT",
        Ahead => "Ahead",
        Behind => "Behind",
    } default Off
);

drbd_enum!(
    /// Write ordering method of a resource (`write-ordering:`).
    WriteOrdering { None => "none", Drain => "drain", Flush => "flush", Barrier => "barrier" } default None
);

drbd_enum!(
    /// Device I/O blocking (`blocked:`).
    Blocked { No => "no", Upper => "upper", Lower => "lower", UpperLower => "upper,lower" } default No
);

impl DiskState {
    /// Disk states that mean the local backing disk is attached and holds (possibly stale) data.
    pub fn is_present(&self) -> bool {
        matches!(
            self,
            DiskState::Inconsistent | DiskState::Consistent | DiskState::UpToDate
        )
    }
}

impl ReplState {
    /// A resync or online verify is running (drbdsetup then prints `done:`).
    pub fn is_syncing(&self) -> bool {
        matches!(
            self,
            ReplState::SyncSource
                | ReplState::SyncTarget
                | ReplState::PausedSyncS
                | ReplState::PausedSyncT
                | ReplState::VerifyS
                | ReplState::VerifyT
        )
    }
}

/// A `yes`/`no` field; `unknown` (printed by older kernels for `client`, `open`, `peer-client`) stays unknown
/// instead of being read as true.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum Tri {
    No,
    Yes,
    #[default]
    Unknown,
}

impl Tri {
    pub fn parse(s: &str) -> Option<Tri> {
        match s {
            "yes" | "true" => Some(Tri::Yes),
            "no" | "false" => Some(Tri::No),
            "unknown" => Some(Tri::Unknown),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Tri::Yes => "yes",
            Tri::No => "no",
            Tri::Unknown => "unknown",
        }
    }

    pub fn is_yes(self) -> bool {
        self == Tri::Yes
    }

    pub fn from_bool(b: bool) -> Tri {
        if b {
            Tri::Yes
        } else {
            Tri::No
        }
    }
}

impl fmt::Display for Tri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Tri {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A comma-separated flag list such as `suspended:user,quorum` or `resync-suspended:peer,dependency`;
/// `no` when empty. Unknown flag names are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FlagList {
    bits: u8,
    other: Option<Box<str>>,
}

impl FlagList {
    fn parse_with(s: &str, names: &[&str]) -> FlagList {
        let mut out = FlagList::default();
        if s == "no" {
            return out;
        }
        let mut other: Vec<&str> = Vec::new();
        for part in s.split(',') {
            match names.iter().position(|n| *n == part) {
                Some(i) => out.bits |= 1 << i,
                None => other.push(part),
            }
        }
        if !other.is_empty() {
            out.other = Some(other.join(",").into());
        }
        out
    }

    fn render(&self, names: &[&str]) -> String {
        if self.is_empty() {
            return "no".to_string();
        }
        let mut parts: Vec<&str> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| self.bits & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect();
        if let Some(o) = &self.other {
            parts.push(o);
        }
        parts.join(",")
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0 && self.other.is_none()
    }

    fn has(&self, i: usize) -> bool {
        self.bits & (1 << i) != 0
    }

    fn set(&mut self, i: usize, on: bool) {
        if on {
            self.bits |= 1 << i;
        } else {
            self.bits &= !(1 << i);
        }
    }
}

macro_rules! flag_type {
    ($(#[$meta:meta])* $name:ident [$($flag:ident => $text:literal),+]) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
        pub struct $name(FlagList);

        impl $name {
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn parse(s: &str) -> Self {
                $name(FlagList::parse_with(s, Self::NAMES))
            }

            pub fn render(&self) -> String {
                self.0.render(Self::NAMES)
            }

            /// True when any flag is set (anything other than `no`).
            pub fn any(&self) -> bool {
                !self.0.is_empty()
            }

            pub fn has(&self, name: &str) -> bool {
                Self::NAMES.iter().position(|n| *n == name).is_some_and(|i| self.0.has(i))
            }

            pub fn with(mut self, name: &str, on: bool) -> Self {
                if let Some(i) = Self::NAMES.iter().position(|n| *n == name) {
                    self.0.set(i, on);
                }
                self
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.render())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.render())
            }
        }
    };
}

flag_type!(
    /// Why I/O on a resource is suspended (`suspended:`): `user`, `no-data`, `fencing`, `quorum`.
    Suspended [User => "user", NoData => "no-data", Fencing => "fencing", Quorum => "quorum"]
);

flag_type!(
    /// Why a resync is suspended (`resync-suspended:`): `user`, `peer`, `dependency`, `max-parallel`.
    ResyncSuspended [User => "user", Peer => "peer", Dependency => "dependency", MaxParallel => "max-parallel"]
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_enum_values_are_kept() {
        assert_eq!(Role::parse("Primary"), Role::Primary);
        let r = Role::parse("Leader");
        assert_eq!(r, Role::Other("Leader".into()));
        assert_eq!(r.to_string(), "Leader");
        assert_eq!(DiskState::parse("?").as_str(), "?");
    }

    #[test]
    fn tri_keeps_unknown() {
        assert_eq!(Tri::parse("unknown"), Some(Tri::Unknown));
        assert_eq!(Tri::parse("yes"), Some(Tri::Yes));
        assert_eq!(Tri::parse("maybe"), None);
        assert!(!Tri::Unknown.is_yes());
    }

    #[test]
    fn flag_lists_round_trip() {
        for s in [
            "no",
            "user",
            "user,quorum",
            "no-data,fencing",
            "quorum,frobnicate",
        ] {
            assert_eq!(Suspended::parse(s).render(), s);
        }
        let s = Suspended::parse("user,quorum");
        assert!(s.has("quorum") && s.has("user") && !s.has("fencing") && s.any());
        assert!(!Suspended::parse("no").any());
        assert_eq!(
            ResyncSuspended::parse("peer,max-parallel").render(),
            "peer,max-parallel"
        );
    }
}
