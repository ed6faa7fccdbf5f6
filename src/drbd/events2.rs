//! `drbdsetup events2` line parser and printer (GRAMMAR.md §2–§5).
//!
//! [`parse_line`] borrows from the input and never allocates on the common path, never panics, and
//! returns a [`ParseError`] naming the reason for a line it cannot read. Every field is `Option`al so a
//! partial `change` line (without `--full`) is represented faithfully; [`Line`]'s `Display` prints the
//! fields that are present in drbdsetup's own order, so `parse(print(x)) == x` and, for canonical input,
//! `print(parse(line)) == line`.

use super::types::*;
use serde::Serialize;
use std::borrow::Cow;
use std::fmt::{self, Write as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Exists,
    Create,
    Change,
    Destroy,
    Call,
    Response,
    Rename,
}

impl Verb {
    pub fn parse(s: &str) -> Option<Verb> {
        Some(match s {
            "exists" => Verb::Exists,
            "create" => Verb::Create,
            "change" => Verb::Change,
            "destroy" => Verb::Destroy,
            "call" => Verb::Call,
            "response" => Verb::Response,
            "rename" => Verb::Rename,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Exists => "exists",
            Verb::Create => "create",
            Verb::Change => "change",
            Verb::Destroy => "destroy",
            Verb::Call => "call",
            Verb::Response => "response",
            Verb::Rename => "rename",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of events2 output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line<'a> {
    /// The `--timestamps` prefix, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<&'a str>,
    pub body: Body<'a>,
}

// Parsed lines live on the stack for one apply; boxing the large variant would allocate per line.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Body<'a> {
    /// `exists -`: the initial state dump is complete.
    InitialStateDone,
    Event(Event<'a>),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event<'a> {
    pub verb: Verb,
    pub object: Object<'a>,
    /// Keys this version does not know, kept in input order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(&'a str, &'a str)>,
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Object<'a> {
    Resource(ResourceFields<'a>),
    Device(DeviceFields<'a>),
    Connection(ConnectionFields<'a>),
    PeerDevice(PeerDeviceFields<'a>),
    Path(PathFields<'a>),
    Helper(HelperFields<'a>),
}

impl Object<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Resource(_) => "resource",
            Object::Device(_) => "device",
            Object::Connection(_) => "connection",
            Object::PeerDevice(_) => "peer-device",
            Object::Path(_) => "path",
            Object::Helper(_) => "helper",
        }
    }

    pub fn resource_name(&self) -> &str {
        match self {
            Object::Resource(f) => f.name,
            Object::Device(f) => f.name,
            Object::Connection(f) => f.name,
            Object::PeerDevice(f) => f.name,
            Object::Path(f) => f.name,
            Object::Helper(f) => f.name,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResourceFields<'a> {
    pub name: &'a str,
    /// Only on `rename resource`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_name: Option<&'a str>,
    pub role: Option<Role>,
    pub suspended: Option<Suspended>,
    pub force_io_failures: Option<Tri>,
    pub write_ordering: Option<WriteOrdering>,
    pub may_promote: Option<Tri>,
    pub promotion_score: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceFields<'a> {
    pub name: &'a str,
    pub volume: u32,
    pub minor: Option<u32>,
    pub backing_dev: Option<&'a str>,
    pub disk: Option<DiskState>,
    pub client: Option<Tri>,
    pub open: Option<Tri>,
    pub quorum: Option<Tri>,
    pub size: Option<u64>,
    pub read: Option<u64>,
    pub written: Option<u64>,
    pub al_writes: Option<u64>,
    pub bm_writes: Option<u64>,
    pub upper_pending: Option<u64>,
    pub lower_pending: Option<u64>,
    pub al_suspended: Option<Tri>,
    pub blocked: Option<Blocked>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConnectionFields<'a> {
    pub name: &'a str,
    /// Absent in DRBD 9.0 output from before peer node ids were printed (2017); `conn-name` identifies
    /// the peer then.
    pub peer_node_id: Option<u32>,
    pub conn_name: Option<&'a str>,
    pub connection: Option<ConnState>,
    pub role: Option<Role>,
    pub congested: Option<Tri>,
    pub ap_in_flight: Option<u64>,
    pub rs_in_flight: Option<u64>,
}

/// Resync/verify details (`--statistics` at verbosity > 1, and `done`/`dbdt1`/`eta` during a resync).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncFields {
    pub rs_total: Option<u64>,
    pub rs_dt_start_ms: Option<u64>,
    pub rs_paused_ms: Option<u64>,
    pub rs_dt0_ms: Option<u64>,
    pub rs_db0_sectors: Option<u64>,
    pub rs_dt1_ms: Option<u64>,
    pub rs_db1_sectors: Option<u64>,
    pub ov_start_sector: Option<u64>,
    pub ov_stop_sector: Option<u64>,
    pub ov_position: Option<u64>,
    pub ov_left: Option<u64>,
    pub ov_skipped: Option<u64>,
    pub rs_failed: Option<u64>,
    pub rs_same_csum: Option<u64>,
    pub want: Option<f64>,
    pub dbdt: Option<f64>,
    pub dbdt0: Option<f64>,
    pub dbdt1: Option<f64>,
    pub eta: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerDeviceFields<'a> {
    pub name: &'a str,
    pub peer_node_id: Option<u32>,
    pub conn_name: Option<&'a str>,
    pub volume: u32,
    pub replication: Option<ReplState>,
    pub peer_disk: Option<DiskState>,
    pub peer_client: Option<Tri>,
    pub resync_suspended: Option<ResyncSuspended>,
    /// Resync progress in percent, printed while a resync or verify runs.
    pub done: Option<f64>,
    pub received: Option<u64>,
    pub sent: Option<u64>,
    pub out_of_sync: Option<u64>,
    pub pending: Option<u64>,
    pub unacked: Option<u64>,
    pub sync: SyncFields,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PathFields<'a> {
    pub name: &'a str,
    pub peer_node_id: Option<u32>,
    pub conn_name: Option<&'a str>,
    pub local: &'a str,
    pub peer: &'a str,
    pub established: Option<Tri>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HelperFields<'a> {
    pub name: &'a str,
    pub peer_node_id: Option<u32>,
    pub conn_name: Option<&'a str>,
    pub local: Option<&'a str>,
    pub peer: Option<&'a str>,
    pub volume: Option<u32>,
    pub minor: Option<u32>,
    pub helper: &'a str,
    /// Raw wait status on `response` lines (exit code << 8).
    pub status: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParseError {
    pub reason: String,
}

fn err<T>(reason: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        reason: reason.into(),
    })
}

/// Removes ANSI colour sequences (`drbdsetup events2 --color`) from the line, except from the values of
/// identity keys: drbdsetup colours state values only, so an escape byte in a name is part of the name.
/// Borrows when there are none.
pub fn strip_ansi(line: &str) -> Cow<'_, str> {
    if memchr::memchr(0x1b, line.as_bytes()).is_none() {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len());
    let toks = Tokens {
        rest: line.as_bytes(),
        line,
    };
    for (i, t) in toks.enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match t.split_once(':') {
            Some((k, _)) if is_identity(k) => out.push_str(t),
            _ => strip_csi(t, &mut out),
        }
    }
    Cow::Owned(out)
}

fn strip_csi(t: &str, out: &mut String) {
    let mut chars = t.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            // CSI: parameters until a final byte in 0x40..=0x7e
            for d in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
}

/// Keys that name an object (GRAMMAR.md §3): `--diff` never prints them as `old->new` and `--color`
/// never colours them, so their values are taken verbatim.
fn is_identity(key: &str) -> bool {
    matches!(
        key,
        "name"
            | "new_name"
            | "volume"
            | "minor"
            | "peer-node-id"
            | "conn-name"
            | "local"
            | "peer"
            | "helper"
    )
}

/// Whether a line is in `--diff` form: a state value (not a name, not a path that may hold `->`) is
/// printed as `old->new`. A `>` elsewhere (in a resource or peer name) does not make it one.
fn is_diff_form(line: &str) -> bool {
    if memchr::memchr(b'>', line.as_bytes()).is_none() {
        return false;
    }
    let toks = Tokens {
        rest: line.as_bytes(),
        line,
    };
    toks.filter_map(|t| t.split_once(':'))
        .any(|(k, v)| !is_identity(k) && k != "backing_dev" && v.contains("->"))
}

fn looks_like_timestamp(tok: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS.uuuuuu+HH:MM
    let b = tok.as_bytes();
    b.len() >= 19 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

/// `--diff` prints `key:old->new`; the new value is what the object now holds.
fn diff_new(v: &str) -> &str {
    match v.rfind("->") {
        Some(i) => &v[i + 2..],
        None => v,
    }
}

fn num<T: TryFrom<u64>>(key: &str, v: &str) -> Result<T, ParseError> {
    let bad = || ParseError {
        reason: format!("field '{key}': '{v}' is not a number"),
    };
    let n = if v.len() < 20 {
        // up to 19 digits cannot overflow a u64: no checks needed in the loop
        let mut n = 0u64;
        for b in v.bytes() {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return Err(bad());
            }
            n = n * 10 + d as u64;
        }
        if v.is_empty() {
            return Err(bad());
        }
        n
    } else {
        v.parse::<u64>().map_err(|_| bad())?
    };
    T::try_from(n).map_err(|_| bad())
}

fn float(key: &str, v: &str) -> Result<f64, ParseError> {
    v.parse().map_err(|_| ParseError {
        reason: format!("field '{key}': '{v}' is not a number"),
    })
}

fn tri(key: &str, v: &str) -> Result<Tri, ParseError> {
    Tri::parse(v).ok_or_else(|| ParseError {
        reason: format!("field '{key}': '{v}' is not yes/no/unknown"),
    })
}

/// Parses one line of `drbdsetup events2` output (without the trailing newline).
pub fn parse_line(line: &str) -> Result<Line<'_>, ParseError> {
    let mut toks = Tokens {
        rest: line.as_bytes(),
        line,
    };
    let mut first = match toks.next() {
        Some(t) => t,
        None => return err("empty line"),
    };
    let mut timestamp = None;
    if looks_like_timestamp(first) {
        timestamp = Some(first);
        first = match toks.next() {
            Some(t) => t,
            None => return err("timestamp without event"),
        };
    }
    let verb = match Verb::parse(first) {
        Some(v) => v,
        None => return err(format!("unknown verb '{}'", truncate(first))),
    };
    let obj = match toks.next() {
        Some(t) => t,
        None => return err(format!("'{verb}' without an object")),
    };
    if obj == "-" {
        if verb != Verb::Exists {
            return err(format!("'{verb} -' is not a valid line"));
        }
        if let Some(t) = toks.next() {
            return err(format!("unexpected '{}' after 'exists -'", truncate(t)));
        }
        return Ok(Line {
            timestamp,
            body: Body::InitialStateDone,
        });
    }
    let mut extra = Vec::new();
    let diff = is_diff_form(line);
    let object = match obj {
        "resource" => Object::Resource(parse_resource(toks, diff, &mut extra)?),
        "device" => Object::Device(parse_device(toks, diff, &mut extra)?),
        "connection" => Object::Connection(parse_connection(toks, diff, &mut extra)?),
        "peer-device" => Object::PeerDevice(parse_peer_device(toks, diff, &mut extra)?),
        "path" => Object::Path(parse_path(toks, diff, &mut extra)?),
        "helper" => Object::Helper(parse_helper(toks, diff, &mut extra)?),
        other => return err(format!("unknown object '{}'", truncate(other))),
    };
    let verb_ok = match (&object, verb) {
        (Object::Helper(_), Verb::Call | Verb::Response) => true,
        (Object::Helper(_), _) | (_, Verb::Call | Verb::Response) => false,
        (Object::Resource(_), Verb::Rename) => true,
        (_, Verb::Rename) => false,
        _ => true,
    };
    if !verb_ok {
        return err(format!("'{verb}' does not apply to a {}", object.kind()));
    }
    if let Object::Resource(r) = &object {
        if (verb == Verb::Rename) != r.new_name.is_some() {
            return err("'new_name' belongs to 'rename resource' and only there");
        }
    }
    Ok(Line {
        timestamp,
        body: Body::Event(Event {
            verb,
            object,
            extra,
        }),
    })
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Splits a line at runs of spaces and tabs, with SIMD searches (memchr) instead of a per-byte loop: the
/// tokenizer is the hottest part of the agent.
struct Tokens<'a> {
    line: &'a str,
    rest: &'a [u8],
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let start = self.rest.iter().position(|b| *b != b' ' && *b != b'\t')?;
        let rest = &self.rest[start..];
        let len = memchr::memchr2(b' ', b'\t', rest).unwrap_or(rest.len());
        let offset = self.line.len() - self.rest.len() + start;
        self.rest = &rest[len..];
        // Both ends are at ASCII bytes (or the end), so they are char boundaries.
        self.line.get(offset..offset + len)
    }
}

/// Iterates `key:value` tokens, splitting at the first `:`;
/// `--diff` values (`old->new`) are only looked for in lines in diff form, never in identity values.
fn pairs<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
) -> impl Iterator<Item = Result<(&'a str, &'a str), ParseError>> {
    toks.map(move |t| match memchr::memchr(b':', t.as_bytes()) {
        Some(i) if i > 0 => {
            let v = &t[i + 1..];
            let k = &t[..i];
            Ok((
                k,
                if diff && !is_identity(k) {
                    diff_new(v)
                } else {
                    v
                },
            ))
        }
        _ => err(format!("field '{}' has no 'key:value' form", truncate(t))),
    })
}

/// A peer is identified by `peer-node-id`, or by `conn-name` in old output without node ids.
fn peer_identity(id: Option<u32>, conn_name: Option<&str>) -> Result<(), ParseError> {
    if id.is_none() && conn_name.is_none() {
        return err("missing identity field 'peer-node-id'");
    }
    Ok(())
}

fn required<T>(v: Option<T>, key: &str) -> Result<T, ParseError> {
    v.ok_or_else(|| ParseError {
        reason: format!("missing identity field '{key}'"),
    })
}

fn parse_resource<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<ResourceFields<'a>, ParseError> {
    let mut name = None;
    let mut f = ResourceFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        match k {
            "name" => name = Some(v),
            "new_name" => f.new_name = Some(v),
            "role" => f.role = Some(Role::parse(v)),
            "suspended" => f.suspended = Some(Suspended::parse(v)),
            "force-io-failures" => f.force_io_failures = Some(tri(k, v)?),
            "write-ordering" => f.write_ordering = Some(WriteOrdering::parse(v)),
            "may_promote" => f.may_promote = Some(tri(k, v)?),
            "promotion_score" => f.promotion_score = Some(num(k, v)?),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    Ok(f)
}

fn parse_device<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<DeviceFields<'a>, ParseError> {
    let (mut name, mut volume) = (None, None);
    let mut f = DeviceFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        match k {
            "name" => name = Some(v),
            "volume" => volume = Some(num(k, v)?),
            "minor" => f.minor = Some(num(k, v)?),
            "backing_dev" => f.backing_dev = Some(v),
            "disk" => f.disk = Some(DiskState::parse(v)),
            "client" => f.client = Some(tri(k, v)?),
            "open" => f.open = Some(tri(k, v)?),
            "quorum" => f.quorum = Some(tri(k, v)?),
            "size" => f.size = Some(num(k, v)?),
            "read" => f.read = Some(num(k, v)?),
            "written" => f.written = Some(num(k, v)?),
            "al-writes" => f.al_writes = Some(num(k, v)?),
            "bm-writes" => f.bm_writes = Some(num(k, v)?),
            "upper-pending" => f.upper_pending = Some(num(k, v)?),
            "lower-pending" => f.lower_pending = Some(num(k, v)?),
            "al-suspended" => f.al_suspended = Some(tri(k, v)?),
            "blocked" => f.blocked = Some(Blocked::parse(v)),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    f.volume = required(volume, "volume")?;
    Ok(f)
}

fn parse_connection<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<ConnectionFields<'a>, ParseError> {
    let (mut name, mut peer) = (None, None);
    let mut f = ConnectionFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        match k {
            "name" => name = Some(v),
            "peer-node-id" => peer = Some(num(k, v)?),
            "conn-name" => f.conn_name = Some(v),
            "connection" => f.connection = Some(ConnState::parse(v)),
            "role" => f.role = Some(Role::parse(v)),
            "congested" => f.congested = Some(tri(k, v)?),
            "ap-in-flight" => f.ap_in_flight = Some(num(k, v)?),
            "rs-in-flight" => f.rs_in_flight = Some(num(k, v)?),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    f.peer_node_id = peer;
    peer_identity(f.peer_node_id, f.conn_name)?;
    Ok(f)
}

fn parse_peer_device<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<PeerDeviceFields<'a>, ParseError> {
    let (mut name, mut peer, mut volume) = (None, None, None);
    let mut f = PeerDeviceFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        let s = &mut f.sync;
        match k {
            "name" => name = Some(v),
            "peer-node-id" => peer = Some(num(k, v)?),
            "conn-name" => f.conn_name = Some(v),
            "volume" => volume = Some(num(k, v)?),
            "replication" => f.replication = Some(ReplState::parse(v)),
            "peer-disk" => f.peer_disk = Some(DiskState::parse(v)),
            "peer-client" => f.peer_client = Some(tri(k, v)?),
            "resync-suspended" => f.resync_suspended = Some(ResyncSuspended::parse(v)),
            "done" => f.done = Some(float(k, v)?),
            "received" => f.received = Some(num(k, v)?),
            "sent" => f.sent = Some(num(k, v)?),
            "out-of-sync" => f.out_of_sync = Some(num(k, v)?),
            "pending" => f.pending = Some(num(k, v)?),
            "unacked" => f.unacked = Some(num(k, v)?),
            "rs-total" => s.rs_total = Some(num(k, v)?),
            "rs-dt-start-ms" => s.rs_dt_start_ms = Some(num(k, v)?),
            "rs-paused-ms" => s.rs_paused_ms = Some(num(k, v)?),
            "rs-dt0-ms" => s.rs_dt0_ms = Some(num(k, v)?),
            "rs-db0-sectors" => s.rs_db0_sectors = Some(num(k, v)?),
            "rs-dt1-ms" => s.rs_dt1_ms = Some(num(k, v)?),
            "rs-db1-sectors" => s.rs_db1_sectors = Some(num(k, v)?),
            "ov-start-sector" => s.ov_start_sector = Some(num(k, v)?),
            "ov-stop-sector" => s.ov_stop_sector = Some(num(k, v)?),
            "ov-position" => s.ov_position = Some(num(k, v)?),
            "ov-left" => s.ov_left = Some(num(k, v)?),
            "ov-skipped" => s.ov_skipped = Some(num(k, v)?),
            "rs-failed" => s.rs_failed = Some(num(k, v)?),
            "rs-same-csum" => s.rs_same_csum = Some(num(k, v)?),
            "want" => s.want = Some(float(k, v)?),
            "dbdt" => s.dbdt = Some(float(k, v)?),
            "dbdt0" => s.dbdt0 = Some(float(k, v)?),
            "dbdt1" => s.dbdt1 = Some(float(k, v)?),
            "eta" => s.eta = Some(float(k, v)?),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    f.peer_node_id = peer;
    peer_identity(f.peer_node_id, f.conn_name)?;
    f.volume = required(volume, "volume")?;
    Ok(f)
}

fn parse_path<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<PathFields<'a>, ParseError> {
    let (mut name, mut peer_id, mut local, mut peer) = (None, None, None, None);
    let mut f = PathFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        match k {
            "name" => name = Some(v),
            "peer-node-id" => peer_id = Some(num(k, v)?),
            "conn-name" => f.conn_name = Some(v),
            "local" => local = Some(v),
            "peer" => peer = Some(v),
            "established" => f.established = Some(tri(k, v)?),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    f.peer_node_id = peer_id;
    peer_identity(f.peer_node_id, f.conn_name)?;
    f.local = required(local, "local")?;
    f.peer = required(peer, "peer")?;
    Ok(f)
}

fn parse_helper<'a>(
    toks: impl Iterator<Item = &'a str>,
    diff: bool,
    extra: &mut Vec<(&'a str, &'a str)>,
) -> Result<HelperFields<'a>, ParseError> {
    let (mut name, mut helper) = (None, None);
    let mut f = HelperFields::default();
    for p in pairs(toks, diff) {
        let (k, v) = p?;
        match k {
            "name" => name = Some(v),
            "peer-node-id" => f.peer_node_id = Some(num(k, v)?),
            "conn-name" => f.conn_name = Some(v),
            "local" => f.local = Some(v),
            "peer" => f.peer = Some(v),
            "volume" => f.volume = Some(num(k, v)?),
            "minor" => f.minor = Some(num(k, v)?),
            "helper" => helper = Some(v),
            "status" => f.status = Some(num(k, v)?),
            _ => extra.push((k, v)),
        }
    }
    f.name = required(name, "name")?;
    f.helper = required(helper, "helper")?;
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Printing, in drbdsetup's field order.

struct Out<'w, W: fmt::Write> {
    w: &'w mut W,
}

impl<W: fmt::Write> Out<'_, W> {
    fn kv(&mut self, k: &str, v: impl fmt::Display) -> fmt::Result {
        write!(self.w, " {k}:{v}")
    }
    fn opt(&mut self, k: &str, v: Option<impl fmt::Display>) -> fmt::Result {
        match v {
            Some(v) => self.kv(k, v),
            None => Ok(()),
        }
    }
    fn f2(&mut self, k: &str, v: Option<f64>) -> fmt::Result {
        match v {
            Some(v) => self.kv(k, Fixed(v, 2)),
            None => Ok(()),
        }
    }
}

/// `%.Nf` as C prints it, including `nan`.
struct Fixed(f64, usize);

impl fmt::Display for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_nan() {
            f.write_str("nan")
        } else if self.0.is_infinite() {
            f.write_str(if self.0 > 0.0 { "inf" } else { "-inf" })
        } else {
            write!(f, "{:.*}", self.1, self.0)
        }
    }
}

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ts) = self.timestamp {
            write!(f, "{ts} ")?;
        }
        match &self.body {
            Body::InitialStateDone => f.write_str("exists -"),
            Body::Event(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.object.kind())?;
        let mut o = Out { w: f };
        match &self.object {
            Object::Resource(r) => {
                o.kv("name", r.name)?;
                o.opt("new_name", r.new_name)?;
                o.opt("role", r.role.as_ref())?;
                o.opt("suspended", r.suspended.as_ref())?;
                o.opt("force-io-failures", r.force_io_failures)?;
                o.opt("write-ordering", r.write_ordering.as_ref())?;
                o.opt("may_promote", r.may_promote)?;
                o.opt("promotion_score", r.promotion_score)?;
            }
            Object::Device(d) => {
                o.kv("name", d.name)?;
                o.kv("volume", d.volume)?;
                o.opt("minor", d.minor)?;
                o.opt("backing_dev", d.backing_dev)?;
                o.opt("disk", d.disk.as_ref())?;
                o.opt("client", d.client)?;
                o.opt("open", d.open)?;
                o.opt("quorum", d.quorum)?;
                o.opt("size", d.size)?;
                o.opt("read", d.read)?;
                o.opt("written", d.written)?;
                o.opt("al-writes", d.al_writes)?;
                o.opt("bm-writes", d.bm_writes)?;
                o.opt("upper-pending", d.upper_pending)?;
                o.opt("lower-pending", d.lower_pending)?;
                o.opt("al-suspended", d.al_suspended)?;
                o.opt("blocked", d.blocked.as_ref())?;
            }
            Object::Connection(c) => {
                o.kv("name", c.name)?;
                o.opt("peer-node-id", c.peer_node_id)?;
                o.opt("conn-name", c.conn_name)?;
                o.opt("connection", c.connection.as_ref())?;
                o.opt("role", c.role.as_ref())?;
                o.opt("congested", c.congested)?;
                o.opt("ap-in-flight", c.ap_in_flight)?;
                o.opt("rs-in-flight", c.rs_in_flight)?;
            }
            Object::PeerDevice(p) => {
                o.kv("name", p.name)?;
                o.opt("peer-node-id", p.peer_node_id)?;
                o.opt("conn-name", p.conn_name)?;
                o.kv("volume", p.volume)?;
                o.opt("replication", p.replication.as_ref())?;
                o.opt("peer-disk", p.peer_disk.as_ref())?;
                o.opt("peer-client", p.peer_client)?;
                o.opt("resync-suspended", p.resync_suspended.as_ref())?;
                o.f2("done", p.done)?;
                o.opt("received", p.received)?;
                o.opt("sent", p.sent)?;
                o.opt("out-of-sync", p.out_of_sync)?;
                o.opt("pending", p.pending)?;
                o.opt("unacked", p.unacked)?;
                let s = &p.sync;
                o.opt("rs-total", s.rs_total)?;
                o.opt("rs-dt-start-ms", s.rs_dt_start_ms)?;
                o.opt("rs-paused-ms", s.rs_paused_ms)?;
                o.opt("rs-dt0-ms", s.rs_dt0_ms)?;
                o.opt("rs-db0-sectors", s.rs_db0_sectors)?;
                o.opt("rs-dt1-ms", s.rs_dt1_ms)?;
                o.opt("rs-db1-sectors", s.rs_db1_sectors)?;
                o.opt("ov-start-sector", s.ov_start_sector)?;
                o.opt("ov-stop-sector", s.ov_stop_sector)?;
                o.opt("ov-position", s.ov_position)?;
                o.opt("ov-left", s.ov_left)?;
                o.opt("ov-skipped", s.ov_skipped)?;
                o.opt("rs-failed", s.rs_failed)?;
                o.opt("rs-same-csum", s.rs_same_csum)?;
                o.f2("want", s.want)?;
                o.f2("dbdt", s.dbdt)?;
                o.f2("dbdt0", s.dbdt0)?;
                o.f2("dbdt1", s.dbdt1)?;
                if let Some(eta) = s.eta {
                    o.kv("eta", Fixed(eta, 0))?;
                }
            }
            Object::Path(p) => {
                o.kv("name", p.name)?;
                o.opt("peer-node-id", p.peer_node_id)?;
                o.opt("conn-name", p.conn_name)?;
                o.kv("local", p.local)?;
                o.kv("peer", p.peer)?;
                o.opt("established", p.established)?;
            }
            Object::Helper(h) => {
                o.kv("name", h.name)?;
                o.opt("peer-node-id", h.peer_node_id)?;
                o.opt("conn-name", h.conn_name)?;
                o.opt("local", h.local)?;
                o.opt("peer", h.peer)?;
                o.opt("volume", h.volume)?;
                o.opt("minor", h.minor)?;
                o.kv("helper", h.helper)?;
                o.opt("status", h.status)?;
            }
        }
        for (k, v) in &self.extra {
            o.kv(k, v)?;
        }
        Ok(())
    }
}

impl Event<'_> {
    /// The line as drbdsetup prints it, without timestamp.
    pub fn to_line(&self) -> String {
        let mut s = String::with_capacity(160);
        let _ = write!(s, "{self}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(line: &str) -> Event<'_> {
        match parse_line(line).unwrap().body {
            Body::Event(e) => e,
            Body::InitialStateDone => panic!("not an event"),
        }
    }

    #[test]
    fn values_split_at_first_colon() {
        let e = ev("change path name:r0 peer-node-id:1 conn-name:b local:ipv6:[fe80::1%eth0]:7789 peer:ipv4:1.2.3.4:7789 established:yes");
        let Object::Path(p) = e.object else { panic!() };
        assert_eq!(p.local, "ipv6:[fe80::1%eth0]:7789");
        assert_eq!(p.peer, "ipv4:1.2.3.4:7789");
        assert_eq!(p.established, Some(Tri::Yes));
    }

    #[test]
    fn timestamps_and_initial_done() {
        let l = parse_line("2019-05-07T13:50:23.974032-07:00 exists -").unwrap();
        assert_eq!(l.timestamp, Some("2019-05-07T13:50:23.974032-07:00"));
        assert_eq!(l.body, Body::InitialStateDone);
        assert!(parse_line("change -").is_err());
    }

    #[test]
    fn rejects_with_reasons() {
        for (line, reason) in [
            ("", "empty line"),
            ("xxx resource name:foo", "unknown verb 'xxx'"),
            ("exists xxx name:foo", "unknown object 'xxx'"),
            ("call helper", "missing identity field 'name'"),
            ("exists device name:r0", "missing identity field 'volume'"),
            (
                "exists device name:r0 volume:x",
                "field 'volume': 'x' is not a number",
            ),
            (
                "exists device name:r0 volume:0 quorum:maybe",
                "field 'quorum': 'maybe' is not yes/no/unknown",
            ),
            (
                "exists resource name:r0 garbage",
                "field 'garbage' has no 'key:value' form",
            ),
            (
                "change helper name:r0 helper:x",
                "'change' does not apply to a helper",
            ),
            (
                "call device name:r0 volume:0",
                "'call' does not apply to a device",
            ),
            (
                "rename device name:r0 volume:0",
                "'rename' does not apply to a device",
            ),
            (
                "rename resource name:r0",
                "'new_name' belongs to 'rename resource' and only there",
            ),
        ] {
            assert_eq!(parse_line(line).unwrap_err().reason, reason, "{line}");
        }
    }

    #[test]
    fn unknown_keys_and_values_are_kept() {
        let e = ev("exists resource xxx:bla name:foo role:Leader write-ordering:foo");
        assert_eq!(e.extra, vec![("xxx", "bla")]);
        let Object::Resource(r) = &e.object else {
            panic!()
        };
        assert_eq!(r.role, Some(Role::Other("Leader".into())));
        assert_eq!(r.write_ordering.as_ref().unwrap().as_str(), "foo");
    }

    #[test]
    fn diff_and_color_forms_yield_new_values() {
        let e = ev("change resource name:r role:Secondary->Primary may_promote:yes->no promotion_score:10102->10102");
        let Object::Resource(r) = e.object else {
            panic!()
        };
        assert_eq!(
            (r.role, r.may_promote, r.promotion_score),
            (Some(Role::Primary), Some(Tri::No), Some(10102))
        );
        let line =
            strip_ansi("change device name:r volume:0 disk:\x1b[1;32mUpToDate\x1b[0m client:no");
        let Object::Device(d) = ev(&line).object else {
            panic!()
        };
        assert_eq!(d.disk, Some(DiskState::UpToDate));
    }

    #[test]
    fn a_greater_than_sign_in_a_name_is_part_of_the_name() {
        let e = ev("exists resource name:a->b role:Secondary may_promote:no");
        let Object::Resource(r) = e.object else {
            panic!()
        };
        assert_eq!((r.name, r.role), ("a->b", Some(Role::Secondary)));
        // names stay verbatim in a line that really is in --diff form
        let e = ev("change peer-device name:x->y peer-node-id:1 conn-name:p->q volume:0 replication:Off->Established");
        let Object::PeerDevice(p) = e.object else {
            panic!()
        };
        assert_eq!(p.name, "x->y");
        assert_eq!(p.conn_name, Some("p->q"));
        assert_eq!(p.replication, Some(ReplState::Established));
        // a path with '->' is a path unless the line is in diff form
        let e = ev("exists device name:a>b volume:0 minor:1 backing_dev:/dev/x->y disk:UpToDate");
        let Object::Device(d) = e.object else {
            panic!()
        };
        assert_eq!((d.name, d.backing_dev), ("a>b", Some("/dev/x->y")));
        let e = ev("change device name:r volume:0 minor:1 backing_dev:none->/dev/sda disk:Diskless->UpToDate");
        let Object::Device(d) = e.object else {
            panic!()
        };
        assert_eq!(d.backing_dev, Some("/dev/sda"));
    }

    #[test]
    fn ansi_stripping_never_changes_names() {
        let line = "exists connection name:r\x1b[31mx peer-node-id:1 conn-name:p\x1b[0m connection:\x1b[1;32mConnected\x1b[0m role:Secondary";
        let clean = strip_ansi(line);
        let Object::Connection(c) = ev(&clean).object else {
            panic!()
        };
        assert_eq!(c.name, "r\x1b[31mx");
        assert_eq!(c.conn_name, Some("p\x1b[0m"));
        assert_eq!(c.connection, Some(ConnState::Connected));
    }

    #[test]
    fn print_round_trips() {
        for line in [
            "change peer-device name:r peer-node-id:1 conn-name:p volume:0 replication:SyncSource peer-disk:Inconsistent peer-client:no done:37.50 received:5 sent:10 out-of-sync:2500 pending:30 unacked:40 dbdt1:0.24 eta:10",
            "change peer-device name:r peer-node-id:1 conn-name:p volume:0 replication:SyncTarget done:1.00 dbdt1:0.00 eta:nan",
            "rename resource name:a new_name:b",
            "response helper name:r peer-node-id:1 conn-name:p volume:0 helper:before-resync-target status:768",
        ] {
            assert_eq!(ev(line).to_line(), line);
        }
    }

    #[test]
    fn never_panics_on_odd_input() {
        for line in [
            ":",
            "exists",
            "exists resource :x",
            "exists resource name:",
            "🙂 resource",
            "exists path name:a peer-node-id:1",
        ] {
            let _ = parse_line(line);
        }
    }
}
