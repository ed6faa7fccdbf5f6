//! Scenario files: a YAML list of steps (cluster operations, waits, expectations) run against a
//! cluster directory. See docs/simulator.md for the format.

use super::cli::{create_op, node_facts};
use super::model::{Op, SimError, DEFAULT_SIZE_KIB};
use super::store::{ClockMode, Store, StoreError};
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
                None,
                None,
                &[],
                opts_map(&a.options),
                a.connect,
            )
            .map_err(|e| e.to_string())?,
            None,
        ),
        Step::Delete(r) => (Op::Delete { res: r.clone() }, None),
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
    let mode = match sc.clock.as_deref() {
        None | Some("real") => ClockMode::Real,
        Some("manual") => ClockMode::Manual,
        Some(o) => return Err(format!("clock '{o}': use real or manual")),
    };
    store
        .init(mode, sc.reset || mode == ClockMode::Manual)
        .map_err(|e| e.to_string())?;
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
            continue;
        }
        match step {
            Step::Wait(d) => std::thread::sleep(parse_duration(d).map_err(fail)?),
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
            _ => return Err(fail(SimError::Invalid("unhandled step".into()).to_string())),
        }
    }
    let _ = writeln!(out, "scenario passed ({} steps)", sc.steps.len());
    Ok(())
}

fn tick(store: &Store) {
    if let Ok(l) = store.load() {
        let _ = store.tick_if_due(&l);
    }
}
