//! Per-object comparison of two `drbdsetup events2` streams: a simulated run against a capture of real
//! DRBD (or any two streams of the same scripted sequence).
//!
//! Each stream is folded into one trace per object (resource, device, connection, peer-device, path, and
//! the helpers called for an object): the sequence of its *normalised* states. A line updates the
//! object's state (partial `change` lines without `--full` are merged into what is known), the state is
//! normalised (statistics counters, sizes, minor numbers, timestamps, device and address names dropped or
//! masked, see [`Normalize`]), and a transition is recorded only when the normalised state differs from
//! the previous one — so statistics-only lines, `--poll` refreshes and the repeated identical lines
//! drbdsetup prints for every object of a kernel state change leave no trace, and a `--full` stream and
//! a partial one of the same run give the same traces. Objects are compared one by one, so the order
//! between independent objects (which drbdsetup takes from the kernel's message order) does not matter;
//! within one object the order of its states is compared exactly (a longest-common-subsequence
//! alignment shows what each side has that the other lacks).
//!
//! [`compare`] takes the two streams as `&str`, so a live capture from a real cluster can be compared
//! with the simulator the same way as the stored captures.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};

/// Statistics and other values that legitimately differ between two runs of the same sequence.
pub const STATISTICS: &[&str] = &[
    // device
    "size",
    "read",
    "written",
    "al-writes",
    "bm-writes",
    "upper-pending",
    "lower-pending",
    "al-suspended",
    // connection
    "congested",
    "ap-in-flight",
    "rs-in-flight",
    // peer-device
    "done",
    "received",
    "sent",
    "out-of-sync",
    "pending",
    "unacked",
    "rs-total",
    "rs-dt-start-ms",
    "rs-paused-ms",
    "rs-dt0-ms",
    "rs-db0-sectors",
    "rs-dt1-ms",
    "rs-db1-sectors",
    "ov-start-sector",
    "ov-stop-sector",
    "ov-position",
    "ov-left",
    "ov-skipped",
    "rs-failed",
    "rs-same-csum",
    "want",
    "dbdt",
    "dbdt0",
    "dbdt1",
    "eta",
];

/// What is normalised away before two streams are compared.
#[derive(Debug, Clone)]
pub struct Normalize {
    /// Keys dropped from every state (default: [`STATISTICS`] and `minor`).
    pub ignore: BTreeSet<String>,
    /// Identify a path by resource and peer only, and do not compare its addresses (two labs never
    /// have the same addresses; the simulator has one address per node and resource).
    pub paths_by_peer: bool,
    /// Compare `backing_dev` only as `none` or "a device" (device names are configuration).
    pub backing_dev_any: bool,
    /// `exists` counts as `create` (a capture started before or after the objects came up).
    pub exists_as_create: bool,
    /// Compare `call helper`/`response helper` lines (as one trace per object they concern).
    pub helpers: bool,
    /// Drop the keys that only one of the two streams ever prints (fields of a newer drbd-utils, such
    /// as `open`); they are listed in [`Report::keys_only_left`] / [`Report::keys_only_right`].
    pub one_sided_keys: bool,
    /// Only these resources (empty: all).
    pub resources: BTreeSet<String>,
    /// Compare a peer's objects only up to a failed handshake (see [`failed_handshakes`]) that one
    /// side has and the other does not: real DRBD sometimes loses a connection during the handshake
    /// after a reconnect and retries at once; what follows on that peer depends on where the handshake
    /// broke. Listed in [`Report::truncated`].
    pub cut_at_failed_handshake: bool,
}

impl Default for Normalize {
    fn default() -> Self {
        Normalize {
            ignore: STATISTICS
                .iter()
                .chain(&["minor"])
                .map(|s| s.to_string())
                .collect(),
            paths_by_peer: true,
            backing_dev_any: true,
            exists_as_create: true,
            helpers: true,
            one_sided_keys: true,
            resources: BTreeSet::new(),
            cut_at_failed_handshake: true,
        }
    }
}

/// The identity of one object in an events2 stream.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    /// `resource`, `device`, `connection`, `peer-device`, `path` or `helper`.
    pub kind: String,
    pub resource: String,
    /// `peer-node-id` (or `conn-name` when a line has no node id).
    pub peer: Option<String>,
    pub volume: Option<String>,
    /// A path's `local`/`peer` addresses (unless [`Normalize::paths_by_peer`]).
    pub addr: Option<String>,
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.resource)?;
        if let Some(p) = &self.peer {
            write!(f, " peer:{p}")?;
        }
        if let Some(v) = &self.volume {
            write!(f, " volume:{v}")?;
        }
        if let Some(a) = &self.addr {
            write!(f, " {a}")?;
        }
        Ok(())
    }
}

/// One step of an object's trace: the verb and the normalised state after it (for helpers: the
/// helper's name and, on `response`, its status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub verb: String,
    pub state: BTreeMap<String, String>,
    /// 1-based line number in its stream.
    pub line: usize,
}

impl Transition {
    fn same(&self, o: &Transition) -> bool {
        self.verb == o.verb && self.state == o.state
    }

    /// `verb k:v ...` with only the keys that differ from `prev` (all keys if there is none).
    pub fn render(&self, prev: Option<&Transition>) -> String {
        let mut s = self.verb.clone();
        for (k, v) in &self.state {
            if prev.is_some_and(|p| p.state.get(k) == Some(v)) && self.verb != "call" {
                continue;
            }
            let _ = write!(s, " {k}:{v}");
        }
        if let Some(p) = prev {
            for k in p.state.keys() {
                if !self.state.contains_key(k) && self.verb != "destroy" {
                    let _ = write!(s, " {k}:(gone)");
                }
            }
        }
        s
    }
}

/// All traces of one stream.
#[derive(Debug, Clone, Default)]
pub struct Traces {
    pub objects: BTreeMap<ObjKey, Vec<Transition>>,
    /// Lines that are not events2 (line number, text).
    pub malformed: Vec<(usize, String)>,
    /// `exists -` lines (one per dump: `--now --poll` prints one per `n`).
    pub dumps: usize,
    /// Every key printed, as `object.key`.
    pub keys: BTreeSet<String>,
}

/// A line split into its parts; `None` for comments and blank lines.
struct Parsed<'a> {
    verb: &'a str,
    object: &'a str,
    fields: Vec<(&'a str, &'a str)>,
}

fn looks_like_timestamp(t: &str) -> bool {
    let b = t.as_bytes();
    // 2026-12-07T16:20:37.831778+00:00, or a capture script's `[1796660012]`.
    (b.len() >= 19 && b[0].is_ascii_digit() && b.get(4) == Some(&b'-') && b.get(10) == Some(&b'T'))
        || (b.len() > 2
            && b[0] == b'['
            && b[b.len() - 1] == b']'
            && b[1..b.len() - 1].iter().all(u8::is_ascii_digit))
}

fn split_line(line: &str) -> Result<Option<Parsed<'_>>, String> {
    let t = line.trim_end_matches(['\r', '\n']);
    if t.trim().is_empty() || t.starts_with('#') {
        return Ok(None);
    }
    let mut toks = t.split([' ', '\t']).filter(|s| !s.is_empty()).peekable();
    if toks.peek().is_some_and(|f| looks_like_timestamp(f)) {
        toks.next();
    }
    let verb = toks.next().ok_or("no verb")?;
    if !matches!(
        verb,
        "exists" | "create" | "change" | "destroy" | "call" | "response" | "rename"
    ) {
        return Err(format!("unknown verb '{verb}'"));
    }
    let object = toks.next().ok_or("no object")?;
    if !matches!(
        object,
        "-" | "resource" | "device" | "connection" | "peer-device" | "path" | "helper"
    ) {
        return Err(format!("unknown object '{object}'"));
    }
    let mut fields = Vec::new();
    for tok in toks {
        match tok.split_once(':') {
            Some((k, v)) if !k.is_empty() => fields.push((k, v)),
            _ => return Err(format!("'{tok}' is not key:value")),
        }
    }
    if object == "-" && (verb != "exists" || !fields.is_empty()) {
        return Err("only 'exists -' may have no object".into());
    }
    Ok(Some(Parsed {
        verb,
        object,
        fields,
    }))
}

fn get<'a>(fields: &[(&'a str, &'a str)], k: &str) -> Option<&'a str> {
    fields.iter().find(|(x, _)| *x == k).map(|(_, v)| *v)
}

/// The keys that make up an object's identity (not part of its state).
fn identity_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "resource" => &["name"],
        "device" => &["name", "volume"],
        "connection" => &["name", "peer-node-id"],
        "peer-device" => &["name", "peer-node-id", "volume"],
        "path" => &["name", "peer-node-id", "local", "peer"],
        _ => &["name", "peer-node-id", "volume"],
    }
}

fn key_of(object: &str, fields: &[(&str, &str)], n: &Normalize) -> Option<ObjKey> {
    let resource = get(fields, "name")?.to_string();
    let peer = get(fields, "peer-node-id")
        .or_else(|| get(fields, "conn-name"))
        .map(str::to_string);
    let volume = get(fields, "volume").map(str::to_string);
    let mut key = ObjKey {
        kind: object.to_string(),
        resource,
        peer: None,
        volume: None,
        addr: None,
    };
    match object {
        "resource" => {}
        "device" => key.volume = Some(volume?),
        "connection" => key.peer = Some(peer?),
        "peer-device" => {
            key.peer = Some(peer?);
            key.volume = Some(volume?);
        }
        "path" => {
            key.peer = Some(peer?);
            if !n.paths_by_peer {
                key.addr = Some(format!(
                    "{}-{}",
                    get(fields, "local").unwrap_or("?"),
                    get(fields, "peer").unwrap_or("?")
                ));
            }
        }
        // Helpers: one trace per object they concern.
        _ => {
            key.peer = peer;
            key.volume = volume;
        }
    }
    Some(key)
}

fn normalise_value(k: &str, v: &str, n: &Normalize) -> String {
    if n.backing_dev_any && k == "backing_dev" && v != "none" {
        return "<dev>".into();
    }
    v.to_string()
}

/// Folds one stream into traces. Never panics: lines it cannot read are listed in `malformed`.
pub fn traces(stream: &str, n: &Normalize) -> Traces {
    traces_without(stream, n, &BTreeSet::new())
}

fn traces_without(stream: &str, n: &Normalize, drop: &BTreeSet<String>) -> Traces {
    let mut t = Traces::default();
    // The raw (merged, unnormalised) state of each live object.
    let mut raw: BTreeMap<ObjKey, BTreeMap<String, String>> = BTreeMap::new();
    for (i, line) in stream.lines().enumerate() {
        let lineno = i + 1;
        let p = match split_line(line) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(e) => {
                t.malformed.push((lineno, format!("{e}: {line}")));
                continue;
            }
        };
        if p.object == "-" {
            t.dumps += 1;
            continue;
        }
        let Some(key) = key_of(p.object, &p.fields, n) else {
            t.malformed
                .push((lineno, format!("missing identity fields: {line}")));
            continue;
        };
        if !n.resources.is_empty() && !n.resources.contains(&key.resource) {
            continue;
        }
        for (k, _) in &p.fields {
            t.keys.insert(format!("{}.{k}", p.object));
        }
        let ids = identity_keys(p.object);
        let keep = |k: &str| {
            !ids.contains(&k)
                && !n.ignore.contains(k)
                && !drop.contains(&format!("{}.{k}", p.object))
        };
        if p.object == "helper" {
            if !n.helpers {
                continue;
            }
            let state: BTreeMap<String, String> = p
                .fields
                .iter()
                .filter(|(k, _)| keep(k) && *k != "conn-name")
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            t.objects.entry(key).or_default().push(Transition {
                verb: p.verb.to_string(),
                state,
                line: lineno,
            });
            continue;
        }
        let verb = match p.verb {
            "exists" if n.exists_as_create => "create",
            v => v,
        };
        let trace = t.objects.entry(key.clone()).or_default();
        if verb == "destroy" {
            raw.remove(&key);
            trace.push(Transition {
                verb: "destroy".into(),
                state: BTreeMap::new(),
                line: lineno,
            });
            continue;
        }
        let known = raw.contains_key(&key);
        let st = raw.entry(key).or_default();
        for (k, v) in &p.fields {
            if keep(k) {
                st.insert(k.to_string(), normalise_value(k, v, n));
            }
        }
        let state = st.clone();
        // A second `exists`/`create` of a known object (a re-dump, a duplicate) is a change.
        let verb = if known { "change" } else { verb };
        let last = trace.last().filter(|l| l.verb != "destroy");
        if known && last.is_some_and(|l| l.state == state) {
            continue;
        }
        trace.push(Transition {
            verb: verb.to_string(),
            state,
            line: lineno,
        });
    }
    t
}

/// One step of the alignment of two traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// In both (indices into left and right).
    Same(usize, usize),
    /// Only in the left trace.
    Left(usize),
    /// Only in the right trace.
    Right(usize),
}

/// The traces of one object on both sides and their alignment.
#[derive(Debug, Clone)]
pub struct ObjectDiff {
    pub key: ObjKey,
    pub left: Vec<Transition>,
    pub right: Vec<Transition>,
    pub edits: Vec<Edit>,
}

impl ObjectDiff {
    pub fn is_same(&self) -> bool {
        self.edits.iter().all(|e| matches!(e, Edit::Same(..)))
    }

    /// The transitions only one side has, rendered (`- ...` left, `+ ...` right).
    pub fn differences(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in &self.edits {
            match *e {
                Edit::Left(i) => out.push(format!(
                    "- {}",
                    self.left[i].render(i.checked_sub(1).map(|j| &self.left[j]))
                )),
                Edit::Right(j) => out.push(format!(
                    "+ {}",
                    self.right[j].render(j.checked_sub(1).map(|k| &self.right[k]))
                )),
                Edit::Same(..) => {}
            }
        }
        out
    }

    /// Both traces side by side (` ` common, `-` left only, `+` right only), with line numbers.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for e in &self.edits {
            let (mark, t, prev, side) = match *e {
                Edit::Same(i, _) => (
                    ' ',
                    &self.left[i],
                    i.checked_sub(1).map(|j| &self.left[j]),
                    "L",
                ),
                Edit::Left(i) => (
                    '-',
                    &self.left[i],
                    i.checked_sub(1).map(|j| &self.left[j]),
                    "L",
                ),
                Edit::Right(j) => (
                    '+',
                    &self.right[j],
                    j.checked_sub(1).map(|k| &self.right[k]),
                    "R",
                ),
            };
            let _ = writeln!(s, "  {mark} {} ({side}{})", t.render(prev), t.line);
        }
        s
    }
}

/// Longest common subsequence alignment of two traces.
fn align(a: &[Transition], b: &[Transition]) -> Vec<Edit> {
    let (n, m) = (a.len(), b.len());
    let mut l = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            l[i][j] = if a[i].same(&b[j]) {
                l[i + 1][j + 1] + 1
            } else {
                l[i + 1][j].max(l[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n.max(m));
    while i < n && j < m {
        if a[i].same(&b[j]) {
            out.push(Edit::Same(i, j));
            i += 1;
            j += 1;
        } else if l[i + 1][j] >= l[i][j + 1] {
            out.push(Edit::Left(i));
            i += 1;
        } else {
            out.push(Edit::Right(j));
            j += 1;
        }
    }
    out.extend((i..n).map(Edit::Left));
    out.extend((j..m).map(Edit::Right));
    out
}

/// The result of comparing two streams.
#[derive(Debug, Clone)]
pub struct Report {
    pub left_name: String,
    pub right_name: String,
    /// Every object of either stream, in key order.
    pub objects: Vec<ObjectDiff>,
    /// `object.key` printed only by the left / right stream (dropped from the comparison when
    /// [`Normalize::one_sided_keys`]).
    pub keys_only_left: BTreeSet<String>,
    pub keys_only_right: BTreeSet<String>,
    pub malformed_left: Vec<(usize, String)>,
    pub malformed_right: Vec<(usize, String)>,
    pub dumps: (usize, usize),
    /// Peers compared only up to a failed handshake ([`Normalize::cut_at_failed_handshake`]).
    pub truncated: Vec<String>,
}

impl Report {
    /// No object differs, no line is malformed and both streams print the same keys.
    pub fn is_same(&self) -> bool {
        self.objects.iter().all(ObjectDiff::is_same)
            && self.keys_only_left.is_empty()
            && self.keys_only_right.is_empty()
            && self.malformed_left.is_empty()
            && self.malformed_right.is_empty()
    }

    pub fn differing(&self) -> impl Iterator<Item = &ObjectDiff> {
        self.objects.iter().filter(|o| !o.is_same())
    }

    /// The object with this key (as [`ObjKey`]'s `Display` prints it, e.g. `peer-device r0 peer:1 volume:0`).
    pub fn object(&self, key: &str) -> Option<&ObjectDiff> {
        self.objects.iter().find(|o| o.key.to_string() == key)
    }

    /// One line per differing object: `key: - left-only; + right-only`.
    pub fn summary(&self) -> Vec<String> {
        self.differing()
            .map(|o| format!("{}: {}", o.key, o.differences().join("; ")))
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "events2 comparison: - {} / + {} ({} objects, {} differ)",
            self.left_name,
            self.right_name,
            self.objects.len(),
            self.differing().count()
        )?;
        for (name, m) in [
            (&self.left_name, &self.malformed_left),
            (&self.right_name, &self.malformed_right),
        ] {
            for (n, l) in m {
                writeln!(f, "malformed line {n} of {name}: {l}")?;
            }
        }
        if !self.keys_only_left.is_empty() {
            writeln!(
                f,
                "keys only in {}: {:?}",
                self.left_name, self.keys_only_left
            )?;
        }
        if !self.keys_only_right.is_empty() {
            writeln!(
                f,
                "keys only in {}: {:?}",
                self.right_name, self.keys_only_right
            )?;
        }
        for t in &self.truncated {
            writeln!(f, "compared up to a failed handshake: {t}")?;
        }
        for o in &self.objects {
            let mark = if o.is_same() { "same" } else { "DIFFERS" };
            writeln!(f, "{} [{mark}]", o.key)?;
            if !o.is_same() {
                f.write_str(&o.render())?;
            }
        }
        Ok(())
    }
}

/// Compares two events2 streams object by object (see the module documentation).
pub fn compare(left: &str, right: &str, n: &Normalize) -> Report {
    compare_named("left", left, "right", right, n)
}

/// [`compare`] with names for the two sides in the report.
pub fn compare_named(
    left_name: &str,
    left: &str,
    right_name: &str,
    right: &str,
    n: &Normalize,
) -> Report {
    let (mut a, mut b) = (traces(left, n), traces(right, n));
    let only_a: BTreeSet<String> = a.keys.difference(&b.keys).cloned().collect();
    let only_b: BTreeSet<String> = b.keys.difference(&a.keys).cloned().collect();
    if n.one_sided_keys && !(only_a.is_empty() && only_b.is_empty()) {
        let drop: BTreeSet<String> = only_a.union(&only_b).cloned().collect();
        a = traces_without(left, n, &drop);
        b = traces_without(right, n, &drop);
    }
    let mut truncated = Vec::new();
    if n.cut_at_failed_handshake {
        truncated = cut_failed_handshakes(&mut a, &mut b, left_name, right_name);
    }
    let keys: BTreeSet<&ObjKey> = a.objects.keys().chain(b.objects.keys()).collect();
    let empty = Vec::new();
    let objects = keys
        .into_iter()
        .map(|k| {
            let l = a.objects.get(k).unwrap_or(&empty);
            let r = b.objects.get(k).unwrap_or(&empty);
            ObjectDiff {
                key: k.clone(),
                edits: align(l, r),
                left: l.clone(),
                right: r.clone(),
            }
        })
        .collect();
    // Identity keys and ignored keys are not state: they cannot make a difference.
    let relevant = |k: &String| {
        let (obj, key) = k.split_once('.').unwrap_or(("", k));
        !identity_keys(obj).contains(&key) && !n.ignore.contains(key) && key != "conn-name"
    };
    Report {
        left_name: left_name.to_string(),
        right_name: right_name.to_string(),
        objects,
        keys_only_left: only_a.into_iter().filter(relevant).collect(),
        keys_only_right: only_b.into_iter().filter(relevant).collect(),
        malformed_left: a.malformed,
        malformed_right: b.malformed,
        dumps: (a.dumps, b.dumps),
        truncated,
    }
}

/// A connection's handshakes that failed: the index in its trace of a `connection:Connected` after
/// which the connection broke again before any of its peer devices reached `replication:Established`
/// (a link cut, a peer's power cut or `down` all come after replication was established), or of a
/// `connection:Connecting` that failed with a network error (`BrokenPipe`, `Timeout`, …; not an
/// administrative `Disconnecting`) before it was ever connected.
pub fn failed_handshakes(t: &Traces, conn: &ObjKey) -> Vec<usize> {
    let Some(trace) = t.objects.get(conn) else {
        return Vec::new();
    };
    fn state<'t>(tr: &'t Transition, k: &str) -> Option<&'t str> {
        tr.state.get(k).map(String::as_str)
    }
    (0..trace.len().saturating_sub(1))
        .filter(|&i| {
            let (c, next) = (&trace[i], &trace[i + 1]);
            let failed_connect = state(c, "connection") == Some("Connecting")
                && next.verb == "change"
                && matches!(
                    state(next, "connection"),
                    Some(
                        "BrokenPipe" | "NetworkFailure" | "ProtocolError" | "Timeout" | "TearDown"
                    )
                );
            failed_connect
                || state(c, "connection") == Some("Connected")
                    && next.verb == "change"
                    && state(next, "connection") != Some("Connected")
                    && !t.objects.iter().any(|(k, pd)| {
                        k.kind == "peer-device"
                            && k.resource == conn.resource
                            && k.peer == conn.peer
                            && pd.iter().any(|x| {
                                x.line > c.line
                                    && x.line < next.line
                                    && state(x, "replication") == Some("Established")
                            })
                    })
        })
        .collect()
}

/// The objects of either side that `keep` selects, each once, in key order.
fn keys_of_both(a: &Traces, b: &Traces, keep: impl Fn(&ObjKey) -> bool) -> BTreeSet<ObjKey> {
    a.objects
        .keys()
        .chain(b.objects.keys())
        .filter(|k| keep(k))
        .cloned()
        .collect()
}

/// Truncates, on both sides, the objects of a peer at the first failed handshake only one side has
/// (on the other side: at the transition the alignment pairs with it); returns what was cut.
fn cut_failed_handshakes(
    a: &mut Traces,
    b: &mut Traces,
    a_name: &str,
    b_name: &str,
) -> Vec<String> {
    let conns = keys_of_both(a, b, |k| k.kind == "connection");
    let mut notes = Vec::new();
    for conn in conns {
        let (fa, fb) = (failed_handshakes(a, &conn), failed_handshakes(b, &conn));
        let empty = Vec::new();
        let ta = a.objects.get(&conn).unwrap_or(&empty).clone();
        let tb = b.objects.get(&conn).unwrap_or(&empty).clone();
        let edits = align(&ta, &tb);
        // the first failed handshake of one side with no paired failed handshake on the other
        let cut = edits.iter().find_map(|e| match *e {
            Edit::Same(i, j) if fb.contains(&j) && !fa.contains(&i) => {
                Some((ta[i].line, tb[j].line, b_name))
            }
            Edit::Same(i, j) if fa.contains(&i) && !fb.contains(&j) => {
                Some((ta[i].line, tb[j].line, a_name))
            }
            _ => None,
        });
        let Some((la, lb, side)) = cut else { continue };
        let same_peer = |k: &ObjKey| k.resource == conn.resource && k.peer == conn.peer;
        for (t, line) in [(&mut *a, la), (&mut *b, lb)] {
            for (k, tr) in t.objects.iter_mut() {
                if same_peer(k) {
                    tr.retain(|x| x.line <= line);
                }
            }
        }
        // The order between objects differs between the streams, so a line cut leaves one side of an
        // object a step or two longer: where one side is a prefix of the other, only the prefix counts.
        for k in keys_of_both(a, b, same_peer) {
            let la = a.objects.get(&k).map_or(0, Vec::len);
            let lb = b.objects.get(&k).map_or(0, Vec::len);
            let m = la.min(lb);
            let prefix = match (a.objects.get(&k), b.objects.get(&k)) {
                (Some(x), Some(y)) => x[..m].iter().zip(&y[..m]).all(|(p, q)| p.same(q)),
                // an object one side does not have at all stays a difference
                _ => false,
            };
            if prefix {
                for t in [&mut *a, &mut *b] {
                    if let Some(tr) = t.objects.get_mut(&k) {
                        tr.truncate(m);
                    }
                }
            }
        }
        notes.push(format!(
            "{conn}: {side} lost the connection during a handshake (its line {}); the objects of this \
             peer are compared up to there",
            if side == a_name { la } else { lb }
        ));
    }
    notes
}
