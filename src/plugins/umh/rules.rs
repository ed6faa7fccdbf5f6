//! Compiled rules and matching: pure functions from a spec and an update to a decision.

use super::spec::*;
use crate::drbd::{ConnState, DiskState, ReplState, ResyncSuspended, Role, Tri, Verb};
use crate::engine::update::{
    Change, ConnectionState, DeviceState, PeerDeviceState, ResourceState, Update,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONCURRENT: usize = 8;
pub const DEFAULT_MAX_QUEUED: usize = 1000;
pub const DEFAULT_OUTPUT_LIMIT: usize = 4096;
const MAX_TIMEOUT_SECONDS: u64 = 86_400;

/// A spec error with the path of the offending field (`spec.umh.device[0].new.role`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct UmhError {
    pub path: String,
    pub message: String,
}

fn err(path: &str, message: impl Into<String>) -> UmhError {
    UmhError {
        path: path.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Globs

/// A shell-style glob: `*` (any run), `?` (one character), `[abc]`, `[a-z]`, `[!a]`, and `\x` for a literal
/// `x`. Without metacharacters it is an exact match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    toks: Vec<Tok>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    Any,
    Star,
    Class {
        negate: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Glob {
    pub fn new(p: &str) -> Result<Glob, String> {
        let mut toks = Vec::new();
        let mut it = p.chars().peekable();
        while let Some(c) = it.next() {
            match c {
                '*' => {
                    if toks.last() != Some(&Tok::Star) {
                        toks.push(Tok::Star)
                    }
                }
                '?' => toks.push(Tok::Any),
                '\\' => match it.next() {
                    Some(n) => toks.push(Tok::Lit(n)),
                    None => return Err(format!("'{p}': trailing '\\'")),
                },
                '[' => {
                    let negate = matches!(it.peek(), Some('!') | Some('^'));
                    if negate {
                        it.next();
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    loop {
                        let Some(c) = it.next() else {
                            return Err(format!("'{p}': unterminated '['"));
                        };
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        let c = if c == '\\' {
                            it.next().ok_or_else(|| format!("'{p}': trailing '\\'"))?
                        } else {
                            c
                        };
                        if it.peek() == Some(&'-') {
                            let mut ahead = it.clone();
                            ahead.next();
                            if let Some(&hi) = ahead.peek() {
                                if hi != ']' {
                                    it.next();
                                    it.next();
                                    if hi < c {
                                        return Err(format!("'{p}': bad range '{c}-{hi}'"));
                                    }
                                    ranges.push((c, hi));
                                    continue;
                                }
                            }
                        }
                        ranges.push((c, c));
                    }
                    toks.push(Tok::Class { negate, ranges });
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Glob { toks })
    }

    pub fn is_literal(&self) -> bool {
        self.toks.iter().all(|t| matches!(t, Tok::Lit(_)))
    }

    /// Matches the whole of `s` (iterative, with one backtracking point per `*`: linear-ish, no recursion).
    pub fn matches(&self, s: &str) -> bool {
        let s: Vec<char> = s.chars().collect();
        let (mut ti, mut si) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            match self.toks.get(ti) {
                Some(Tok::Star) => {
                    star = Some((ti, si));
                    ti += 1;
                    continue;
                }
                Some(t) if one(t, s[si]) => {
                    ti += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
            match star {
                Some((st, ss)) => {
                    ti = st + 1;
                    si = ss + 1;
                    star = Some((st, ss + 1));
                }
                None => return false,
            }
        }
        self.toks[ti.min(self.toks.len())..]
            .iter()
            .all(|t| *t == Tok::Star)
    }
}

fn one(t: &Tok, c: char) -> bool {
    match t {
        Tok::Lit(l) => *l == c,
        Tok::Any => true,
        Tok::Star => false,
        Tok::Class { negate, ranges } => {
            ranges.iter().any(|(lo, hi)| *lo <= c && c <= *hi) != *negate
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Fields

/// The kinds of rules, one per kind of update (plus helper events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Resource,
    Device,
    PeerDevice,
    Connection,
    Helper,
}

impl Kind {
    pub fn key(self) -> &'static str {
        match self {
            Kind::Resource => "resource",
            Kind::Device => "device",
            Kind::PeerDevice => "peerDevice",
            Kind::Connection => "connection",
            Kind::Helper => "helper",
        }
    }

    pub fn fields(self) -> &'static [Field] {
        use Field::*;
        match self {
            Kind::Resource => &[Role, MayPromote, PromotionScore],
            Kind::Device => &[DiskState, Client, Quorum, Open, Size],
            Kind::PeerDevice => &[ReplicationState, PeerDiskState, PeerClient, ResyncSuspended],
            Kind::Connection => &[ConnName, ConnectionState, PeerRole, Congested],
            Kind::Helper => &[],
        }
    }
}

/// A field of an old/new state that rules can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Role,
    MayPromote,
    PromotionScore,
    DiskState,
    Client,
    Quorum,
    Open,
    Size,
    ReplicationState,
    PeerDiskState,
    PeerClient,
    ResyncSuspended,
    ConnName,
    ConnectionState,
    PeerRole,
    Congested,
}

impl Field {
    pub const ALL: &'static [Field] = &[
        Field::Role,
        Field::MayPromote,
        Field::PromotionScore,
        Field::DiskState,
        Field::Client,
        Field::Quorum,
        Field::Open,
        Field::Size,
        Field::ReplicationState,
        Field::PeerDiskState,
        Field::PeerClient,
        Field::ResyncSuspended,
        Field::ConnName,
        Field::ConnectionState,
        Field::PeerRole,
        Field::Congested,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::Role => "role",
            Field::MayPromote => "mayPromote",
            Field::PromotionScore => "promotionScore",
            Field::DiskState => "diskState",
            Field::Client => "client",
            Field::Quorum => "quorum",
            Field::Open => "open",
            Field::Size => "size",
            Field::ReplicationState => "replicationState",
            Field::PeerDiskState => "peerDiskState",
            Field::PeerClient => "peerClient",
            Field::ResyncSuspended => "resyncSuspended",
            Field::ConnName => "connName",
            Field::ConnectionState => "connectionState",
            Field::PeerRole => "peerRole",
            Field::Congested => "congested",
        }
    }

    pub fn from_name(s: &str) -> Option<Field> {
        Field::ALL.iter().copied().find(|f| f.name() == s)
    }
}

fn filter_fields(f: &StateFilter) -> Vec<(Field, &FieldFilter)> {
    let all = [
        (Field::Role, &f.role),
        (Field::MayPromote, &f.may_promote),
        (Field::PromotionScore, &f.promotion_score),
        (Field::DiskState, &f.disk_state),
        (Field::Client, &f.client),
        (Field::Quorum, &f.quorum),
        (Field::Open, &f.open),
        (Field::Size, &f.size),
        (Field::ReplicationState, &f.replication_state),
        (Field::PeerDiskState, &f.peer_disk_state),
        (Field::PeerClient, &f.peer_client),
        (Field::ResyncSuspended, &f.resync_suspended),
        (Field::ConnName, &f.conn_name),
        (Field::ConnectionState, &f.connection_state),
        (Field::PeerRole, &f.peer_role),
        (Field::Congested, &f.congested),
    ];
    all.into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
}

/// One side (old or new) of a state update.
#[derive(Debug, Clone, Copy)]
pub enum Side<'a> {
    Resource(&'a ResourceState),
    Device(&'a DeviceState),
    PeerDevice(&'a PeerDeviceState),
    Connection(&'a ConnectionState),
}

/// The value of a field on one side.
#[derive(Debug, Clone, PartialEq)]
pub enum Actual<'a> {
    Role(&'a Role),
    Disk(&'a DiskState),
    Conn(&'a ConnState),
    Repl(&'a ReplState),
    Tri(Tri),
    Num(u64),
    Flags(&'a ResyncSuspended),
    Text(&'a str),
}

impl Actual<'_> {
    /// As the environment shows it.
    pub fn render(&self) -> String {
        match self {
            Actual::Role(v) => v.to_string(),
            Actual::Disk(v) => v.to_string(),
            Actual::Conn(v) => v.to_string(),
            Actual::Repl(v) => v.to_string(),
            Actual::Tri(Tri::Yes) => "true".into(),
            Actual::Tri(Tri::No) => "false".into(),
            Actual::Tri(Tri::Unknown) => "unknown".into(),
            Actual::Num(n) => n.to_string(),
            Actual::Flags(f) => f.render(),
            Actual::Text(s) => s.to_string(),
        }
    }
}

/// The value of `field` on `side`; `None` if the field does not belong to that kind.
pub fn actual(field: Field, side: Side<'_>) -> Option<Actual<'_>> {
    Some(match (field, side) {
        (Field::Role, Side::Resource(s)) => Actual::Role(&s.role),
        (Field::MayPromote, Side::Resource(s)) => Actual::Tri(s.may_promote),
        (Field::PromotionScore, Side::Resource(s)) => Actual::Num(s.promotion_score as u64),
        (Field::DiskState, Side::Device(s)) => Actual::Disk(&s.disk),
        (Field::Client, Side::Device(s)) => Actual::Tri(s.client),
        (Field::Quorum, Side::Device(s)) => Actual::Tri(s.quorum),
        (Field::Open, Side::Device(s)) => Actual::Tri(s.open),
        (Field::Size, Side::Device(s)) => Actual::Num(s.size),
        (Field::ReplicationState, Side::PeerDevice(s)) => Actual::Repl(&s.replication),
        (Field::PeerDiskState, Side::PeerDevice(s)) => Actual::Disk(&s.peer_disk),
        (Field::PeerClient, Side::PeerDevice(s)) => Actual::Tri(s.peer_client),
        (Field::ResyncSuspended, Side::PeerDevice(s)) => Actual::Flags(&s.resync_suspended),
        (Field::ConnName, Side::Connection(s)) => Actual::Text(&s.conn_name),
        (Field::ConnectionState, Side::Connection(s)) => Actual::Conn(&s.connection),
        (Field::PeerRole, Side::Connection(s)) => Actual::Role(&s.peer_role),
        (Field::Congested, Side::Connection(s)) => Actual::Tri(s.congested),
        _ => return None,
    })
}

/// A filter value, typed for its field.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Role(Role),
    Disk(DiskState),
    Conn(ConnState),
    Repl(ReplState),
    Tri(Tri),
    Num(u64),
    Flags(ResyncSuspended),
    Name(Glob),
}

impl Val {
    fn matches(&self, a: &Actual<'_>) -> bool {
        match (self, a) {
            (Val::Role(v), Actual::Role(a)) => v == *a,
            (Val::Disk(v), Actual::Disk(a)) => v == *a,
            (Val::Conn(v), Actual::Conn(a)) => v == *a,
            (Val::Repl(v), Actual::Repl(a)) => v == *a,
            (Val::Tri(v), Actual::Tri(a)) => v == a,
            (Val::Num(v), Actual::Num(a)) => v == a,
            (Val::Flags(v), Actual::Flags(a)) => v == *a,
            (Val::Name(g), Actual::Text(a)) => g.matches(a),
            _ => false,
        }
    }
}

fn known<E: std::fmt::Display>(known: &[E]) -> String {
    known
        .iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_enum<E: Clone + std::fmt::Display>(
    s: &Scalar,
    what: &str,
    all: &[E],
    path: &str,
) -> Result<E, UmhError> {
    if let Scalar::Str(s) = s {
        if let Some(e) = all.iter().find(|e| e.to_string() == *s) {
            return Ok(e.clone());
        }
    }
    Err(err(
        path,
        format!(
            "{} is not a {what} (one of: {})",
            scalar_text(s),
            known(all)
        ),
    ))
}

fn scalar_text(s: &Scalar) -> String {
    match s {
        Scalar::Bool(b) => b.to_string(),
        Scalar::Int(n) => n.to_string(),
        Scalar::Str(s) => format!("'{s}'"),
    }
}

fn parse_val(field: Field, s: &Scalar, path: &str) -> Result<Val, UmhError> {
    Ok(match field {
        Field::Role | Field::PeerRole => Val::Role(parse_enum(s, "role", Role::KNOWN, path)?),
        Field::DiskState | Field::PeerDiskState => {
            Val::Disk(parse_enum(s, "disk state", DiskState::KNOWN, path)?)
        }
        Field::ConnectionState => {
            Val::Conn(parse_enum(s, "connection state", ConnState::KNOWN, path)?)
        }
        Field::ReplicationState => {
            Val::Repl(parse_enum(s, "replication state", ReplState::KNOWN, path)?)
        }
        Field::MayPromote
        | Field::Client
        | Field::Quorum
        | Field::Open
        | Field::PeerClient
        | Field::Congested => Val::Tri(match s {
            Scalar::Bool(b) => Tri::from_bool(*b),
            Scalar::Str(t) => Tri::parse(t).ok_or_else(|| {
                err(
                    path,
                    format!("'{t}' is not a boolean (true, false, yes, no, unknown)"),
                )
            })?,
            Scalar::Int(n) => {
                return Err(err(
                    path,
                    format!("{n} is not a boolean (true, false, yes, no, unknown)"),
                ))
            }
        }),
        Field::PromotionScore | Field::Size => match s {
            Scalar::Int(n) => Val::Num(*n),
            other => return Err(err(path, format!("{} is not a number", scalar_text(other)))),
        },
        Field::ResyncSuspended => match s {
            Scalar::Str(t) => {
                let ok = t == "no" || t.split(',').all(|p| ResyncSuspended::NAMES.contains(&p));
                if !ok {
                    return Err(err(
                        path,
                        format!(
                            "'{t}' is not 'no' or a comma-separated list of: {}",
                            ResyncSuspended::NAMES.join(", ")
                        ),
                    ));
                }
                Val::Flags(ResyncSuspended::parse(t))
            }
            other => {
                return Err(err(
                    path,
                    format!("{} is not a flag list", scalar_text(other)),
                ))
            }
        },
        Field::ConnName => match s {
            Scalar::Str(t) => Val::Name(Glob::new(t).map_err(|e| err(path, e))?),
            other => return Err(err(path, format!("{} is not a name", scalar_text(other)))),
        },
    })
}

/// A compiled field filter.
#[derive(Debug, Clone, PartialEq)]
struct Test {
    field: Field,
    negate: bool,
    values: Vec<Val>,
}

impl Test {
    fn matches(&self, a: &Actual<'_>) -> bool {
        self.values.iter().any(|v| v.matches(a)) != self.negate
    }
}

fn compile_filter(
    field: Field,
    f: &FieldFilter,
    path: &str,
    parse: &dyn Fn(&Scalar, &str) -> Result<Val, UmhError>,
) -> Result<Vec<Test>, UmhError> {
    let list = |v: &OneOrMany<Scalar>, p: &str| -> Result<Vec<Val>, UmhError> {
        let s = v.as_slice();
        if s.is_empty() {
            return Err(err(p, "empty list"));
        }
        s.iter()
            .enumerate()
            .map(|(i, x)| {
                parse(
                    x,
                    &if matches!(v, OneOrMany::Many(_)) {
                        format!("{p}[{i}]")
                    } else {
                        p.to_string()
                    },
                )
            })
            .collect()
    };
    Ok(match f {
        FieldFilter::Value(v) => vec![Test {
            field,
            negate: false,
            values: list(v, path)?,
        }],
        FieldFilter::Op(op) => {
            let mut out = Vec::new();
            if let Some(v) = &op.equals {
                out.push(Test {
                    field,
                    negate: false,
                    values: list(v, &format!("{path}.equals"))?,
                });
            }
            if let Some(v) = &op.not_equals {
                out.push(Test {
                    field,
                    negate: true,
                    values: list(v, &format!("{path}.notEquals"))?,
                });
            }
            if out.is_empty() {
                return Err(err(path, "needs 'equals' or 'notEquals'"));
            }
            out
        }
    })
}

// ---------------------------------------------------------------------------------------------------------
// Rules

/// What a rule runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// argv, no shell.
    Command(Vec<String>),
    /// A script; `key` finds its resolved content in the instance configuration.
    Script { key: String, path: String },
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub kind: Kind,
    /// Field path of the rule (`spec.umh.device[0]`), for messages.
    pub path: String,
    resource: Vec<Glob>,
    volume: Vec<u32>,
    peer: Vec<u32>,
    helper: Vec<Glob>,
    events: Vec<Verb>,
    old: Vec<Test>,
    new: Vec<Test>,
    /// Fields of which at least one must differ between old and new (never true for `exists`);
    /// `None` = no guard.
    changed: Option<Vec<Field>>,
    exit_code: Vec<Test>,
    pub action: Action,
    pub location: Where,
    pub env: BTreeMap<String, String>,
    pub timeout: Duration,
}

/// Instance-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_queued: usize,
    pub output_limit: usize,
}

/// All rules of a policy in evaluation order: resource, device, peerDevice, connection, helper, each in
/// the order written.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub rules: Vec<Rule>,
    pub limits: Limits,
}

const STATE_VERBS: &[(&str, Verb)] = &[
    ("exists", Verb::Exists),
    ("create", Verb::Create),
    ("change", Verb::Change),
    ("destroy", Verb::Destroy),
];
const HELPER_VERBS: &[(&str, Verb)] = &[("call", Verb::Call), ("response", Verb::Response)];

/// The events2 verb as the environment shows it.
pub fn verb_name(v: Verb) -> &'static str {
    match v {
        Verb::Exists => "exists",
        Verb::Create => "create",
        Verb::Change => "change",
        Verb::Destroy => "destroy",
        Verb::Call => "call",
        Verb::Response => "response",
        Verb::Rename => "rename",
    }
}

fn valid_rule_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_env_name(s: &str) -> bool {
    s.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn globs(v: &Option<OneOrMany<String>>, path: &str) -> Result<Vec<Glob>, UmhError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    if v.as_slice().is_empty() {
        return Err(err(path, "empty list"));
    }
    v.as_slice()
        .iter()
        .map(|p| Glob::new(p).map_err(|e| err(path, e)))
        .collect()
}

fn numbers(v: &Option<OneOrMany<u32>>, path: &str) -> Result<Vec<u32>, UmhError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    if v.as_slice().is_empty() {
        return Err(err(path, "empty list"));
    }
    Ok(v.as_slice().to_vec())
}

fn verbs(
    v: &Option<OneOrMany<String>>,
    allowed: &[(&str, Verb)],
    path: &str,
) -> Result<Vec<Verb>, UmhError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    if v.as_slice().is_empty() {
        return Err(err(path, "empty list"));
    }
    v.as_slice()
        .iter()
        .map(|s| {
            allowed
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(s))
                .map(|(_, v)| *v)
                .ok_or_else(|| {
                    err(
                        path,
                        format!(
                            "'{s}' is not an event type of this rule kind (one of: {})",
                            allowed
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })
        })
        .collect()
}

struct Common<'a> {
    name: &'a str,
    command: &'a Option<Vec<String>>,
    script: &'a Option<ScriptRef>,
    location: Where,
    env: &'a BTreeMap<String, String>,
    timeout_seconds: Option<u64>,
}

fn compile_common(
    c: &Common<'_>,
    path: &str,
) -> Result<(Action, BTreeMap<String, String>, Duration), UmhError> {
    let _ = c.location;
    if !valid_rule_name(c.name) {
        return Err(err(
            &format!("{path}.name"),
            format!(
                "'{}' is not a rule name (1-63 letters, digits, '.', '_', '-', starting with a letter or digit)",
                c.name
            ),
        ));
    }
    let action = match (c.command, c.script) {
        (Some(_), Some(_)) => return Err(err(path, "has both 'command' and 'script'; give one")),
        (None, None) => return Err(err(path, "needs 'command' or 'script'")),
        (Some(argv), None) => {
            let p = format!("{path}.command");
            if argv.is_empty() || argv[0].is_empty() {
                return Err(err(&p, "needs a program (argv[0])"));
            }
            if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
                return Err(err(&format!("{p}[{i}]"), "contains a NUL byte"));
            }
            Action::Command(argv.clone())
        }
        (None, Some(s)) => {
            let p = format!("{path}.script");
            match (&s.path, &s.config_map_ref) {
                (Some(_), Some(_)) => {
                    return Err(err(&p, "has both 'path' and 'configMapRef'; give one"))
                }
                (None, None) => return Err(err(&p, "needs 'path' or 'configMapRef'")),
                (Some(sp), None) => {
                    check_relative(sp).map_err(|m| err(&format!("{p}.path"), m))?;
                    Action::Script {
                        key: s.key(),
                        path: format!("{p}.path"),
                    }
                }
                (None, Some(cm)) => {
                    if cm.name.is_empty() {
                        return Err(err(&format!("{p}.configMapRef.name"), "is empty"));
                    }
                    if cm.key.is_empty() {
                        return Err(err(&format!("{p}.configMapRef.key"), "is empty"));
                    }
                    Action::Script {
                        key: s.key(),
                        path: format!("{p}.configMapRef"),
                    }
                }
            }
        }
    };
    for (k, v) in c.env {
        let p = format!("{path}.env.{k}");
        if !valid_env_name(k) {
            return Err(err(
                &p,
                "is not a variable name (letters, digits, '_', not starting with a digit)",
            ));
        }
        if k.starts_with("DRBD_") {
            return Err(err(&p, "DRBD_* variables are reserved for DRBD's values"));
        }
        if v.contains('\0') {
            return Err(err(&p, "contains a NUL byte"));
        }
    }
    let timeout = match c.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(s) if (1..=MAX_TIMEOUT_SECONDS).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            return Err(err(
                &format!("{path}.timeoutSeconds"),
                format!("{s} is not between 1 and {MAX_TIMEOUT_SECONDS}"),
            ))
        }
    };
    Ok((action, c.env.clone(), timeout))
}

/// A script path must stay inside the policy directory.
pub fn check_relative(p: &str) -> Result<(), String> {
    let path = std::path::Path::new(p);
    if p.is_empty() {
        return Err("is empty".into());
    }
    if p.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if path.is_absolute() {
        return Err(format!(
            "'{p}' is absolute; give a path relative to the policy directory"
        ));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(format!(
            "'{p}' leaves the policy directory ('..' is not allowed)"
        ));
    }
    Ok(())
}

fn compile_state(kind: Kind, i: usize, r: &StateRule) -> Result<Rule, UmhError> {
    let path = format!("spec.umh.{}[{i}]", kind.key());
    let (action, env, timeout) = compile_common(
        &Common {
            name: &r.name,
            command: &r.command,
            script: &r.script,
            location: r.location,
            env: &r.env,
            timeout_seconds: r.timeout_seconds,
        },
        &path,
    )?;
    let allowed = kind.fields();
    let names = || {
        allowed
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut sides = [Vec::new(), Vec::new()];
    for (si, (side, f)) in [("old", &r.old), ("new", &r.new)].into_iter().enumerate() {
        let Some(f) = f else { continue };
        for (field, ff) in filter_fields(f) {
            let p = format!("{path}.{side}.{}", field.name());
            if !allowed.contains(&field) {
                return Err(err(
                    &p,
                    format!("not a field of {} rules ({})", kind.key(), names()),
                ));
            }
            sides[si].extend(compile_filter(field, ff, &p, &|s, p| {
                parse_val(field, s, p)
            })?);
        }
    }
    let [old, new] = sides;
    if r.volume.is_some() && !matches!(kind, Kind::Device | Kind::PeerDevice) {
        return Err(err(
            &format!("{path}.volume"),
            format!("{} rules have no volume", kind.key()),
        ));
    }
    if r.peer_node_id.is_some() && !matches!(kind, Kind::PeerDevice | Kind::Connection) {
        return Err(err(
            &format!("{path}.peerNodeId"),
            format!("{} rules have no peer node id", kind.key()),
        ));
    }
    let changed = match &r.changed {
        None | Some(Changed::Flag(false)) => None,
        Some(Changed::Flag(true)) => {
            let mut fs: BTreeSet<Field> = old.iter().chain(&new).map(|t| t.field).collect();
            if fs.is_empty() {
                fs.extend(allowed.iter().copied());
            }
            Some(fs.into_iter().collect())
        }
        Some(Changed::Fields(list)) => {
            if list.is_empty() {
                return Err(err(&format!("{path}.changed"), "empty list"));
            }
            let mut fs = Vec::new();
            for (j, n) in list.iter().enumerate() {
                match Field::from_name(n).filter(|f| allowed.contains(f)) {
                    Some(f) => fs.push(f),
                    None => {
                        return Err(err(
                            &format!("{path}.changed[{j}]"),
                            format!("'{n}' is not a field of {} rules ({})", kind.key(), names()),
                        ))
                    }
                }
            }
            Some(fs)
        }
    };
    Ok(Rule {
        name: r.name.clone(),
        kind,
        resource: globs(&r.resource_name, &format!("{path}.resourceName"))?,
        volume: numbers(&r.volume, &format!("{path}.volume"))?,
        peer: numbers(&r.peer_node_id, &format!("{path}.peerNodeId"))?,
        helper: Vec::new(),
        events: verbs(&r.event_type, STATE_VERBS, &format!("{path}.eventType"))?,
        old,
        new,
        changed,
        exit_code: Vec::new(),
        action,
        location: r.location,
        env,
        timeout,
        path,
    })
}

/// Helper names of drbd-utils (GRAMMAR.md §3 "helper").
pub const HELPERS: &[&str] = &[
    "before-resync-target",
    "after-resync-target",
    "before-resync-source",
    "pri-on-incon-degr",
    "pri-lost-after-sb",
    "fence-peer",
    "unfence-peer",
    "local-io-error",
    "pri-lost",
    "initial-split-brain",
    "split-brain",
    "out-of-sync",
    "quorum-lost",
    "disconnected",
];

fn compile_helper(i: usize, r: &HelperRule) -> Result<Rule, UmhError> {
    let path = format!("spec.umh.helper[{i}]");
    let (action, env, timeout) = compile_common(
        &Common {
            name: &r.name,
            command: &r.command,
            script: &r.script,
            location: r.location,
            env: &r.env,
            timeout_seconds: r.timeout_seconds,
        },
        &path,
    )?;
    let hp = format!("{path}.helper");
    let helper = globs(&r.helper, &hp)?;
    for (g, name) in helper
        .iter()
        .zip(r.helper.iter().flat_map(|h| h.as_slice()))
    {
        if g.is_literal() && !HELPERS.contains(&name.as_str()) {
            return Err(err(
                &hp,
                format!(
                    "'{name}' is not a DRBD helper (one of: {}; use a glob for others)",
                    HELPERS.join(", ")
                ),
            ));
        }
    }
    let exit_code = match &r.exit_code {
        None => Vec::new(),
        Some(f) => compile_filter(
            Field::Size, // numeric comparison; the field tag is not used for helpers
            f,
            &format!("{path}.exitCode"),
            &|s, p| match s {
                Scalar::Int(n) if *n <= 255 => Ok(Val::Num(*n)),
                other => Err(err(
                    p,
                    format!("{} is not an exit code (0-255)", scalar_text(other)),
                )),
            },
        )?,
    };
    Ok(Rule {
        name: r.name.clone(),
        kind: Kind::Helper,
        resource: globs(&r.resource_name, &format!("{path}.resourceName"))?,
        volume: numbers(&r.volume, &format!("{path}.volume"))?,
        peer: numbers(&r.peer_node_id, &format!("{path}.peerNodeId"))?,
        helper,
        events: verbs(&r.event_type, HELPER_VERBS, &format!("{path}.eventType"))?,
        old: Vec::new(),
        new: Vec::new(),
        changed: None,
        exit_code,
        action,
        location: r.location,
        env,
        timeout,
        path,
    })
}

fn limit(v: Option<u32>, default: usize, max: u32, path: &str) -> Result<usize, UmhError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n as usize),
        Some(n) => Err(err(path, format!("{n} is not between 1 and {max}"))),
    }
}

/// Checks a spec and compiles its rules (pure).
pub fn compile(spec: &UmhSpec) -> Result<Compiled, UmhError> {
    let mut rules = Vec::new();
    for (kind, list) in [
        (Kind::Resource, &spec.resource),
        (Kind::Device, &spec.device),
        (Kind::PeerDevice, &spec.peer_device),
        (Kind::Connection, &spec.connection),
    ] {
        for (i, r) in list.iter().enumerate() {
            rules.push(compile_state(kind, i, r)?);
        }
    }
    for (i, r) in spec.helper.iter().enumerate() {
        rules.push(compile_helper(i, r)?);
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for r in &rules {
        if let Some(first) = seen.insert(&r.name, &r.path) {
            return Err(err(
                &format!("{}.name", r.path),
                format!("rule name '{}' is already used by {first}", r.name),
            ));
        }
    }
    let limits = Limits {
        max_concurrent: limit(
            spec.max_concurrent,
            DEFAULT_MAX_CONCURRENT,
            1024,
            "spec.umh.maxConcurrent",
        )?,
        max_queued: limit(
            spec.max_queued,
            DEFAULT_MAX_QUEUED,
            1_000_000,
            "spec.umh.maxQueued",
        )?,
        output_limit: limit(
            spec.output_limit_bytes,
            DEFAULT_OUTPUT_LIMIT,
            1 << 20,
            "spec.umh.outputLimitBytes",
        )?,
    };
    Ok(Compiled { rules, limits })
}

// ---------------------------------------------------------------------------------------------------------
// Matching

fn sides(c: &Change) -> Option<(Kind, Side<'_>, Side<'_>)> {
    Some(match c {
        Change::Resource { old, new } => (Kind::Resource, Side::Resource(old), Side::Resource(new)),
        Change::Device { old, new, .. } => (Kind::Device, Side::Device(old), Side::Device(new)),
        Change::PeerDevice { old, new, .. } => (
            Kind::PeerDevice,
            Side::PeerDevice(old),
            Side::PeerDevice(new),
        ),
        Change::Connection { old, new, .. } => (
            Kind::Connection,
            Side::Connection(old),
            Side::Connection(new),
        ),
        Change::Helper { .. } | Change::Rename { .. } => return None,
    })
}

fn any_or<T>(list: &[T], f: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(f)
}

fn side_ok(tests: &[Test], side: Side<'_>) -> bool {
    tests
        .iter()
        .all(|t| actual(t.field, side).is_some_and(|a| t.matches(&a)))
}

impl Rule {
    /// Does this rule fire on this update? (pure)
    pub fn matches(&self, u: &Update) -> bool {
        if !any_or(&self.resource, |g| g.matches(&u.resource)) {
            return false;
        }
        if !any_or(&self.events, |v| *v == u.event) {
            return false;
        }
        if let Change::Helper {
            helper,
            peer_node_id,
            volume,
            status,
            ..
        } = &u.change
        {
            return self.kind == Kind::Helper
                && any_or(&self.helper, |g| g.matches(helper))
                && (self.volume.is_empty() || volume.is_some_and(|v| self.volume.contains(&v)))
                && (self.peer.is_empty() || peer_node_id.is_some_and(|p| self.peer.contains(&p)))
                && (self.exit_code.is_empty()
                    || status.is_some_and(|s| {
                        let code = Actual::Num(u64::from(s >> 8));
                        self.exit_code.iter().all(|t| t.matches(&code))
                    }));
        }
        let Some((kind, old, new)) = sides(&u.change) else {
            return false;
        };
        if kind != self.kind {
            return false;
        }
        let (vol, peer) = match &u.change {
            Change::Device { volume, .. } => (Some(*volume), None),
            Change::PeerDevice {
                volume,
                peer_node_id,
                ..
            } => (Some(*volume), Some(*peer_node_id)),
            Change::Connection { peer_node_id, .. } => (None, Some(*peer_node_id)),
            _ => (None, None),
        };
        if !self.volume.is_empty() && !vol.is_some_and(|v| self.volume.contains(&v)) {
            return false;
        }
        if !self.peer.is_empty() && !peer.is_some_and(|p| self.peer.contains(&p)) {
            return false;
        }
        if !side_ok(&self.old, old) || !side_ok(&self.new, new) {
            return false;
        }
        match &self.changed {
            None => true,
            // `exists` reports a state as found (agent start, instance (re)start), not a transition: its
            // `old` is only the defaults.
            Some(fields) => {
                u.event != Verb::Exists && fields.iter().any(|f| actual(*f, old) != actual(*f, new))
            }
        }
    }
}

/// The rules that fire on an update, in evaluation order (pure).
pub fn matching<'r>(rules: &'r [Rule], u: &Update) -> Vec<&'r Rule> {
    rules.iter().filter(|r| r.matches(u)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| Glob::new(p).unwrap().matches(s);
        assert!(m("r0", "r0") && !m("r0", "r01") && !m("r0", "r"));
        assert!(m("*", "") && m("*", "anything"));
        assert!(m("web-*", "web-1") && !m("web-*", "db-1"));
        assert!(m("*-data-*", "pvc-data-17") && !m("*-data-*", "pvc-data"));
        assert!(m("r?", "r1") && !m("r?", "r12"));
        assert!(m("r[0-3]", "r2") && !m("r[0-3]", "r4") && m("r[!0-3]", "r4"));
        assert!(m("a\\*", "a*") && !m("a\\*", "ab"));
        assert!(m("[]]", "]") && m("[a-]", "-"));
        assert!(m("a*b*c", "aXbYbZc") && !m("a*b*c", "aXbY"));
        assert!(Glob::new("r[0-").is_err() && Glob::new("x\\").is_err());
        assert!(Glob::new("r0").unwrap().is_literal() && !Glob::new("r*").unwrap().is_literal());
        // pathological patterns stay fast
        let long = "a".repeat(2000);
        assert!(!m("*a*a*a*a*a*a*a*b", &long));
    }
}
