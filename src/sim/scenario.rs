//! Scenario files: a YAML list of steps (cluster operations, waits, expectations) run against a
//! cluster directory. See docs/simulator.md for the format.

use super::cli::{create_op, node_facts};
use super::events::{Events2Opts, Printer};
use super::model::{Op, SimError, DEFAULT_SIZE_KIB};
use super::store::{ClockMode, Loaded, Store, StoreError};
use crate::drbd::types::{ConnState, Role};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// `real` (default) or `manual`; a manual clock starts the cluster over.
    #[serde(default)]
    pub clock: Option<String>,
    /// Start from an empty cluster (drop the journal) before running.
    #[serde(default)]
    pub reset: bool,
    /// Print events2 as this drbd-utils version's drbdsetup does (e.g. `"9.22"`, the version of the
    /// real captures: no `open:` field).
    #[serde(default, rename = "drbd-utils")]
    pub drbd_utils: Option<serde_yaml::Value>,
    /// Each step is a one-key map (`- node-down: n1`).
    #[serde(deserialize_with = "steps")]
    pub steps: Vec<Step>,
}

fn steps<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Step>, D::Error> {
    use serde::de::Error;
    let raw: Vec<serde_yaml::Value> = Vec::deserialize(d)?;
    raw.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let tagged = match v {
                serde_yaml::Value::Mapping(m) if m.len() == 1 => {
                    let (k, v) = m.into_iter().next().expect("one entry");
                    let k = k
                        .as_str()
                        .ok_or_else(|| {
                            D::Error::custom(format!("step {}: the key must be a step name", i + 1))
                        })?
                        .to_string();
                    serde_yaml::Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
                        tag: serde_yaml::value::Tag::new(k),
                        value: v,
                    }))
                }
                other @ serde_yaml::Value::Tagged(_) => other,
                _ => {
                    return Err(D::Error::custom(format!(
                        "step {}: write each step as a one-key map, e.g. `- node-down: n1`",
                        i + 1
                    )))
                }
            };
            serde_yaml::from_value(tagged)
                .map_err(|e| D::Error::custom(format!("step {}: {e}", i + 1)))
        })
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CreateArgs {
    pub resource: String,
    pub nodes: Vec<String>,
    #[serde(default)]
    pub diskless: Vec<String>,
    #[serde(default)]
    pub inconsistent: Vec<String>,
    #[serde(default = "one")]
    pub volumes: u32,
    #[serde(default = "default_size")]
    pub size_kib: u64,
    #[serde(default)]
    pub options: BTreeMap<String, serde_yaml::Value>,
    #[serde(default = "yes")]
    pub connect: bool,
    /// Minor of volume 0 (volume v gets minor + v).
    #[serde(default)]
    pub minor: Option<u32>,
    /// Backing device on every node with a disk.
    #[serde(default)]
    pub backing_dev: Option<String>,
    /// `node: ip:port` for this resource.
    #[serde(default)]
    pub addresses: BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_size() -> u64 {
    DEFAULT_SIZE_KIB
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NodeRes {
    pub node: String,
    pub resource: String,
    #[serde(default)]
    pub volume: Option<u32>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub rw: bool,
    #[serde(default)]
    pub kib: u64,
    /// The step must fail with this drbdsetup exit code (e.g. 11, 17).
    #[serde(default)]
    pub expect_exit: Option<i32>,
}

/// `disconnect`/`connect`: `drbdadm disconnect|connect RES:PEER` on one node.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConnArgs {
    pub node: String,
    pub resource: String,
    pub peer: String,
}

/// `events2-start`: an `drbdsetup events2` capture on one node, running alongside the scenario (like
/// a background `drbdsetup events2 ... > file` started at this point).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CaptureArgs {
    pub name: String,
    pub node: String,
    /// events2 arguments, e.g. `--full --poll`.
    #[serde(default)]
    pub args: String,
    /// Write the capture to this file (relative to the current directory) when it stops.
    #[serde(default)]
    pub file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SetOptionsArgs {
    pub resource: String,
    pub options: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerState {
    pub peer: String,
    pub state: String,
}

/// What must hold; omitted fields are not checked.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct Expect {
    pub resource: String,
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub quorum: Option<bool>,
    #[serde(default)]
    pub may_promote: Option<bool>,
    #[serde(default)]
    pub promotion_score: Option<u32>,
    /// Disk state of every volume.
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub suspended: Option<bool>,
    #[serde(default)]
    pub force_io_failures: Option<bool>,
    /// Which node is Primary (`none` for no Primary); checked cluster-wide among nodes that are up.
    #[serde(default)]
    pub primary: Option<String>,
    #[serde(default)]
    pub connection: Option<PeerState>,
    #[serde(default)]
    pub replication: Option<PeerState>,
    #[serde(default)]
    pub peer_disk: Option<PeerState>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct WaitFor {
    #[serde(default)]
    pub timeout: Option<String>,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Create(CreateArgs),
    Delete(String),
    /// `drbdadm down` on one node.
    Down(NodeRes),
    Disconnect(ConnArgs),
    Connect(ConnArgs),
    NodeDown(String),
    NodeUp(String),
    Cut(Vec<String>),
    Heal(Vec<String>),
    Detach(NodeRes),
    Attach(NodeRes),
    Write(NodeRes),
    Open(NodeRes),
    Close(NodeRes),
    Primary(NodeRes),
    Secondary(NodeRes),
    SetOptions(SetOptionsArgs),
    /// Sleep (`500ms`, `2s`).
    Wait(String),
    /// Move a manual clock.
    Advance(String),
    Expect(Expect),
    WaitFor(WaitFor),
    /// Print a message.
    Say(String),
    /// Start an events2 capture.
    Events2Start(CaptureArgs),
    /// `n` on the capture's stdin (with `--poll`).
    Events2Poll(String),
    /// Stop a capture (stdin EOF: drbdsetup exits 0) and write its file.
    Events2Stop(String),
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "ms"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration '{s}' (use e.g. 500ms, 2s, 1m)"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1000.0,
        "m" | "min" => n * 60_000.0,
        _ => return Err(format!("bad duration unit in '{s}' (ms, s, m)")),
    };
    if !(0.0..=86_400_000.0).contains(&ms) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_millis(ms as u64))
}

fn yaml_str(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        serde_yaml::Value::Number(n) => n.to_string(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn opts_map(m: &BTreeMap<String, serde_yaml::Value>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), yaml_str(v))).collect()
}

fn pair(v: &[String], what: &str) -> Result<(String, String), String> {
    match v {
        [a, b] => Ok((a.clone(), b.clone())),
        _ => Err(format!("{what} needs two node names, e.g. [n1, n2]")),
    }
}

/// Checks an expectation against the current state; returns the mismatches.
pub fn check(store: &Store, e: &Expect) -> Result<Vec<String>, StoreError> {
    let l = store.load()?;
    let now = store.now(&store.clock()?, &l.cluster);
    let c = &l.cluster;
    let mut bad = Vec::new();
    let Some(r) = c.resources.get(&e.resource) else {
        bad.push(format!("resource {} does not exist", e.resource));
        return Ok(bad);
    };
    if let Some(want) = &e.primary {
        let prim: Vec<&String> = r
            .members
            .iter()
            .filter(|(n, m)| c.node_up(n) && m.role == Role::Primary)
            .map(|(n, _)| n)
            .collect();
        let got = if prim.is_empty() {
            "none".to_string()
        } else {
            prim.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        if &got != want {
            bad.push(format!("{}: Primary is {got}, expected {want}", e.resource));
        }
    }
    let Some(node) = &e.node else {
        return Ok(bad);
    };
    let Some(f) = node_facts(c, node, &e.resource, now) else {
        bad.push(format!(
            "{node}/{}: not configured there or node down",
            e.resource
        ));
        return Ok(bad);
    };
    let who = format!("{node}/{}", e.resource);
    if let Some(x) = &e.role {
        if &f.role != x {
            bad.push(format!("{who}: role is {}, expected {x}", f.role));
        }
    }
    if let Some(x) = e.quorum {
        if f.quorum != x {
            bad.push(format!("{who}: quorum is {}, expected {x}", f.quorum));
        }
    }
    if let Some(x) = e.may_promote {
        if f.may_promote != x {
            bad.push(format!(
                "{who}: may_promote is {}, expected {x}",
                f.may_promote
            ));
        }
    }
    if let Some(x) = e.promotion_score {
        if f.promotion_score != x {
            bad.push(format!(
                "{who}: promotion_score is {}, expected {x}",
                f.promotion_score
            ));
        }
    }
    if let Some(x) = &e.disk {
        if f.disks.iter().any(|d| d != x) {
            bad.push(format!(
                "{who}: disk is {}, expected {x}",
                f.disks.join(",")
            ));
        }
    }
    if let Some(x) = e.suspended {
        if f.suspended != x {
            bad.push(format!("{who}: suspended is {}, expected {x}", f.suspended));
        }
    }
    if let Some(x) = e.force_io_failures {
        if f.force_io_failures != x {
            bad.push(format!(
                "{who}: force-io-failures is {}, expected {x}",
                f.force_io_failures
            ));
        }
    }
    let m = &r.members[node];
    if let Some(ps) = &e.connection {
        let got = m
            .peers
            .get(&ps.peer)
            .map(|p| p.cstate.to_string())
            .unwrap_or_else(|| "none".into());
        if got != ps.state {
            bad.push(format!(
                "{who}: connection to {} is {got}, expected {}",
                ps.peer, ps.state
            ));
        }
    }
    if let Some(ps) = &e.replication {
        let got: Vec<String> = m
            .peers
            .get(&ps.peer)
            .map(|p| p.vols.values().map(|v| v.repl.to_string()).collect())
            .unwrap_or_default();
        if got.is_empty() || got.iter().any(|g| g != &ps.state) {
            bad.push(format!(
                "{who}: replication to {} is {}, expected {}",
                ps.peer,
                got.join(","),
                ps.state
            ));
        }
    }
    if let Some(ps) = &e.peer_disk {
        let connected = m
            .peers
            .get(&ps.peer)
            .is_some_and(|p| p.cstate == ConnState::Connected);
        let got: Vec<String> = match (connected, r.members.get(&ps.peer)) {
            (true, Some(pm)) => pm
                .vols
                .values()
                .map(|v| v.shown_disk().to_string())
                .collect(),
            _ => vec!["DUnknown".into()],
        };
        if got.iter().any(|g| g != &ps.state) {
            bad.push(format!(
                "{who}: peer-disk of {} is {}, expected {}",
                ps.peer,
                got.join(","),
                ps.state
            ));
        }
    }
    Ok(bad)
}

fn op_for(step: &Step) -> Result<Option<(Op, Option<i32>)>, String> {
    let nr = |n: &NodeRes| (n.node.clone(), n.resource.clone(), n.volume);
    Ok(Some(match step {
        Step::Create(a) => (
            create_op(
                &a.resource,
                &a.nodes,
                &a.diskless,
                &a.inconsistent,
                a.volumes,
                a.size_kib,
                a.minor,
                a.backing_dev.clone(),
                &a.addresses
                    .iter()
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect::<Vec<_>>(),
                opts_map(&a.options),
                a.connect,
            )
            .map_err(|e| e.to_string())?,
            None,
        ),
        Step::Delete(r) => (Op::Delete { res: r.clone() }, None),
        Step::Disconnect(c) => (
            Op::Disconnect {
                node: c.node.clone(),
                res: c.resource.clone(),
                peer: c.peer.clone(),
            },
            None,
        ),
        Step::Connect(c) => (
            Op::Connect {
                node: c.node.clone(),
                res: c.resource.clone(),
                peer: c.peer.clone(),
            },
            None,
        ),
        Step::Down(n) => (
            Op::Down {
                node: n.node.clone(),
                res: n.resource.clone(),
            },
            n.expect_exit,
        ),
        Step::NodeDown(n) => (Op::NodeDown { node: n.clone() }, None),
        Step::NodeUp(n) => (Op::NodeUp { node: n.clone() }, None),
        Step::Cut(v) => {
            let (a, b) = pair(v, "cut")?;
            (Op::Cut { a, b }, None)
        }
        Step::Heal(v) => {
            let (a, b) = pair(v, "heal")?;
            (Op::Heal { a, b }, None)
        }
        Step::Detach(n) => {
            let (node, res, vol) = nr(n);
            (Op::Detach { node, res, vol }, n.expect_exit)
        }
        Step::Attach(n) => {
            let (node, res, vol) = nr(n);
            (Op::Attach { node, res, vol }, n.expect_exit)
        }
        Step::Write(n) => {
            let (node, res, vol) = nr(n);
            (
                Op::Write {
                    node,
                    res,
                    vol,
                    kib: n.kib,
                },
                n.expect_exit,
            )
        }
        Step::Open(n) => {
            let (node, res, vol) = nr(n);
            (
                Op::Open {
                    node,
                    res,
                    vol,
                    rw: n.rw,
                },
                n.expect_exit,
            )
        }
        Step::Close(n) => {
            let (node, res, vol) = nr(n);
            (Op::Close { node, res, vol }, n.expect_exit)
        }
        Step::Primary(n) => (
            Op::Primary {
                node: n.node.clone(),
                res: n.resource.clone(),
                force: n.force,
            },
            n.expect_exit,
        ),
        Step::Secondary(n) => (
            Op::Secondary {
                node: n.node.clone(),
                res: n.resource.clone(),
                force: n.force,
            },
            n.expect_exit,
        ),
        Step::SetOptions(s) => (
            Op::SetOptions {
                res: s.resource.clone(),
                options: opts_map(&s.options),
            },
            None,
        ),
        _ => return Ok(None),
    }))
}

fn describe(step: &Step) -> String {
    let s = format!("{step:?}");
    if s.chars().count() > 110 {
        format!("{}...", s.chars().take(107).collect::<String>())
    } else {
        s
    }
}

/// Runs a scenario file; returns the exit code (0 ok, 1 a step or expectation failed).
pub fn run_file(store: &Store, path: &str, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let _ = writeln!(err, "scenario {path}: {e}");
            return 1;
        }
    };
    let sc: Scenario = match serde_yaml::from_str(&text) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "scenario {path}: {e}");
            return 1;
        }
    };
    match run(store, &sc, out) {
        Ok(()) => 0,
        Err(msg) => {
            let _ = writeln!(err, "scenario {path}: {msg}");
            1
        }
    }
}

pub fn run(store: &Store, sc: &Scenario, out: &mut dyn Write) -> Result<(), String> {
    let (r, captures) = run_captured(store, sc, out);
    for c in captures.values() {
        c.write_file()?;
    }
    r
}

/// One `events2-start` capture: a drbdsetup events2 process of the node, fed from the journal after
/// every scenario step (deterministically: it sees every state change, whatever the clock).
pub struct Capture {
    pub node: String,
    pub opts: Events2Opts,
    printer: Printer,
    loaded: Loaded,
    /// What the process printed so far.
    pub text: String,
    file: Option<String>,
    /// The process ended (stopped, `--now` without `--poll`, or its node went down: exit 20).
    pub ended: bool,
    pub exit_code: Option<i32>,
    /// The node was up since the capture started (a capture started on a node that is down begins
    /// when it boots, like a capture started right after the boot).
    was_up: bool,
}

impl Capture {
    fn start(store: &Store, a: &CaptureArgs, utils: Option<&str>) -> Result<Capture, String> {
        let args: Vec<String> = a.args.split_whitespace().map(str::to_string).collect();
        let mut opts = Events2Opts::parse(&args)?;
        opts.drbd_utils = utils.map(str::to_string);
        super::model::check_name("node", &a.node).map_err(|e| e.to_string())?;
        let l = store.load().map_err(|e| e.to_string())?;
        let was_up = l.cluster.node_up(&a.node);
        let now = store.now(&store.clock().map_err(|e| e.to_string())?, &l.cluster);
        let mut printer = Printer::new(&a.node, opts.clone());
        let mut text = String::new();
        printer.dump(&l.cluster, now, &mut text);
        let ended = opts.now && !opts.poll;
        Ok(Capture {
            node: a.node.clone(),
            opts,
            printer,
            loaded: l,
            text,
            file: a.file.clone(),
            ended,
            exit_code: ended.then_some(0),
            was_up,
        })
    }

    /// Prints what the journal's new entries change (after every state change, as events2 does).
    fn pump(&mut self, store: &Store) -> Result<(), String> {
        if self.ended {
            return Ok(());
        }
        let (entries, off) = store
            .read_from(self.loaded.offset)
            .map_err(|e| e.to_string())?;
        let Capture {
            node,
            opts,
            printer,
            loaded,
            text,
            was_up,
            ..
        } = self;
        // `--now --poll` prints only on `n`; it still follows the journal to know the state.
        let mut sink = String::new();
        let out = if opts.now { &mut sink } else { text };
        let mut gone = false;
        for e in entries {
            let at = e.at;
            let _ = loaded.cluster.apply(&e.op, at, &mut |c, res| {
                if gone {
                    return;
                }
                if c.node_up(node) {
                    *was_up = true;
                } else if *was_up && c.nodes.contains_key(node.as_str()) {
                    gone = true;
                    return;
                }
                printer.on_step(c, res, at.max(c.now_ms), out);
            });
            loaded.seq = e.seq;
            if gone {
                break;
            }
        }
        loaded.offset = off;
        if gone {
            // The node crashed: drbdsetup loses the kernel and exits 20.
            self.ended = true;
            self.exit_code = Some(20);
        }
        Ok(())
    }

    /// `n` on stdin: with `--poll`, fetch everything again (a full dump with `--now`).
    fn poll(&mut self, store: &Store) -> Result<(), String> {
        if !self.opts.poll {
            return Err("events2-poll: the capture was not started with --poll".into());
        }
        let _ = store.tick_if_due(&self.loaded);
        self.pump(store)?;
        if self.ended {
            return Ok(());
        }
        let now = store.now(
            &store.clock().map_err(|e| e.to_string())?,
            &self.loaded.cluster,
        );
        self.printer
            .refresh(&self.loaded.cluster, now, &mut self.text);
        Ok(())
    }

    fn write_file(&self) -> Result<(), String> {
        match &self.file {
            Some(f) => {
                std::fs::write(f, &self.text).map_err(|e| format!("events2 capture {f}: {e}"))
            }
            _ => Ok(()),
        }
    }
}

/// Runs a scenario and returns its result with the events2 captures it started (by name), stopped
/// or not; a failing step leaves the captures as they were at that point.
pub fn run_captured(
    store: &Store,
    sc: &Scenario,
    out: &mut dyn Write,
) -> (Result<(), String>, BTreeMap<String, Capture>) {
    let mut captures = BTreeMap::new();
    let r = run_steps(store, sc, out, &mut captures);
    (r, captures)
}

fn run_steps(
    store: &Store,
    sc: &Scenario,
    out: &mut dyn Write,
    captures: &mut BTreeMap<String, Capture>,
) -> Result<(), String> {
    let mode = match sc.clock.as_deref() {
        None | Some("real") => ClockMode::Real,
        Some("manual") => ClockMode::Manual,
        Some(o) => return Err(format!("clock '{o}': use real or manual")),
    };
    store
        .init(mode, sc.reset || mode == ClockMode::Manual)
        .map_err(|e| e.to_string())?;
    if let Some(v) = &sc.drbd_utils {
        // `9.22` unquoted is a YAML number.
        store
            .set_drbd_utils(Some(&yaml_str(v)))
            .map_err(|e| format!("drbd-utils: {e}"))?;
    }
    let utils = store.clock().map_err(|e| e.to_string())?.drbd_utils;
    for (i, step) in sc.steps.iter().enumerate() {
        let n = i + 1;
        let _ = writeln!(out, "[{n:>3}] {}", describe(step));
        let fail = |msg: String| format!("step {n} ({}): {msg}", describe(step));
        if let Some((op, expect_exit)) = op_for(step).map_err(fail)? {
            let r = store.commit(&[op]);
            match (r, expect_exit) {
                (Ok(_), None) => {}
                (Ok(_), Some(code)) => {
                    return Err(fail(format!(
                        "succeeded, expected failure with exit {code}"
                    )))
                }
                (Err(e), Some(code)) if e.exit_code() == code => {
                    let _ = writeln!(out, "      failed as expected: {e}");
                }
                (Err(e), _) => {
                    return Err(fail(format!("{e} (exit {})", e.exit_code())));
                }
            }
            pump(store, captures).map_err(fail)?;
            continue;
        }
        match step {
            Step::Wait(d) => {
                std::thread::sleep(parse_duration(d).map_err(fail)?);
                tick(store);
            }
            Step::Advance(d) => {
                let ms = parse_duration(d).map_err(fail)?.as_millis() as u64;
                if store.clock().map_err(|e| fail(e.to_string()))?.mode != ClockMode::Manual {
                    return Err(fail("advance needs `clock: manual`".into()));
                }
                store
                    .commit_at(&[Op::Tick], ms)
                    .map_err(|e| fail(e.to_string()))?;
            }
            Step::Say(s) => {
                let _ = writeln!(out, "      {s}");
            }
            Step::Expect(e) => {
                tick(store);
                let bad = check(store, e).map_err(|x| fail(x.to_string()))?;
                if !bad.is_empty() {
                    return Err(fail(format!("expectation failed: {}", bad.join("; "))));
                }
            }
            Step::WaitFor(w) => {
                let timeout = match &w.timeout {
                    Some(t) => parse_duration(t).map_err(fail)?,
                    None => Duration::from_secs(30),
                };
                let start = Instant::now();
                loop {
                    tick(store);
                    pump(store, captures).map_err(fail)?;
                    let bad = check(store, &w.expect).map_err(|x| fail(x.to_string()))?;
                    if bad.is_empty() {
                        break;
                    }
                    if start.elapsed() >= timeout {
                        return Err(fail(format!(
                            "still not true after {timeout:?}: {}",
                            bad.join("; ")
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Step::Events2Start(a) => {
                if captures.get(&a.name).is_some_and(|c| !c.ended) {
                    return Err(fail(format!("capture {} runs already", a.name)));
                }
                let c = Capture::start(store, a, utils.as_deref()).map_err(fail)?;
                captures.insert(a.name.clone(), c);
            }
            Step::Events2Poll(name) => {
                let c = captures
                    .get_mut(name)
                    .ok_or_else(|| fail(format!("no capture named {name}")))?;
                c.poll(store).map_err(fail)?;
            }
            Step::Events2Stop(name) => {
                let c = captures
                    .get_mut(name)
                    .ok_or_else(|| fail(format!("no capture named {name}")))?;
                c.pump(store).map_err(fail)?;
                if !c.ended {
                    c.ended = true;
                    c.exit_code = Some(0);
                }
            }
            _ => return Err(fail(SimError::Invalid("unhandled step".into()).to_string())),
        }
        pump(store, captures).map_err(fail)?;
    }
    let _ = writeln!(out, "scenario passed ({} steps)", sc.steps.len());
    Ok(())
}

fn pump(store: &Store, captures: &mut BTreeMap<String, Capture>) -> Result<(), String> {
    for c in captures.values_mut() {
        c.pump(store)?;
    }
    Ok(())
}

fn tick(store: &Store) {
    if let Ok(l) = store.load() {
        let _ = store.tick_if_due(&l);
    }
}
