//! Command line of the cluster simulator: drbdsetup commands for one node, `ctl` for the operator,
//! `scenario` for scripted runs. Arguments are never passed through a shell.

use super::events::{self, Events2Opts};
use super::json;
use super::model::{Cluster, CreateSpec, InitialDisk, NodeSpec, Op, SimError, DEFAULT_SIZE_KIB};
use super::scenario;
use super::store::{ClockMode, Store, StoreError};
use super::view::{promotion, res_view};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::Write;

pub const USAGE: &str = "usage:
  drbd-sim --cluster DIR --node NAME <drbdsetup command>   act as drbdsetup on NAME:
      events2 [RES|all] [--full] [--statistics] [--timestamps] [--now] [--poll]
      primary RES [--force]      secondary RES [--force]      role RES
      status [RES] [--json]      show [RES] --json [--show-defaults]
      sh-ll-dev RES | adjust RES | --version   (the drbdadm calls the promoter makes)
  drbd-sim --cluster DIR ctl <command>                     change the cluster (see `ctl --help`)
  drbd-sim --cluster DIR scenario FILE.yaml                run a scenario
  drbd-sim --replay FILE events2 [...]                     print a scripted events2 stream";

/// Runs the simulator with `--cluster DIR` (and `--node NAME` for drbdsetup commands); returns the
/// process exit code. Output goes to the given writers.
pub fn run(
    dir: &str,
    node: Option<&str>,
    args: &[String],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let store = Store::new(dir);
    let Some(cmd) = args.first() else {
        let _ = writeln!(err, "{USAGE}");
        return 20;
    };
    match cmd.as_str() {
        "ctl" => ctl(&store, &args[1..], out, err),
        "scenario" => match args.get(1) {
            Some(f) if args.len() == 2 => scenario::run_file(&store, f, out, err),
            _ => {
                let _ = writeln!(err, "usage: drbd-sim --cluster DIR scenario FILE.yaml");
                1
            }
        },
        _ => {
            let Some(node) = node else {
                let _ = writeln!(err, "drbd-sim: '{cmd}' needs --node NAME (the node this drbdsetup runs on)\n{USAGE}");
                return 20;
            };
            if let Err(e) = super::model::check_name("node", node) {
                let _ = writeln!(err, "drbd-sim: {e}");
                return 20;
            }
            match drbdsetup(&store, node, args, out, err) {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(err, "{e}");
                    e.exit_code()
                }
            }
        }
    }
}

fn node_check(c: &Cluster, node: &str) -> Result<(), StoreError> {
    if c.nodes.get(node).is_some_and(|n| !n.up) {
        return Err(SimError::NodeDown(node.into()).into());
    }
    Ok(())
}

fn one_resource(cmd: &str, args: &[String]) -> Result<(String, Vec<String>), StoreError> {
    let mut res = None;
    let mut flags = Vec::new();
    for a in args {
        if a.starts_with('-') {
            flags.push(a.clone());
        } else if res.is_none() {
            res = Some(a.clone());
        } else {
            return Err(SimError::Invalid(format!("Excess arguments: {a}")).into());
        }
    }
    let res = res.ok_or_else(|| {
        SimError::Invalid(format!(
            "Missing argument 1 to command\nUSAGE: drbdsetup {cmd} {{resource}}"
        ))
    })?;
    Ok((res, flags))
}

fn force_flag(cmd: &str, flags: &[String]) -> Result<bool, StoreError> {
    let mut force = false;
    for f in flags {
        match f.as_str() {
            "--force" | "--force=yes" | "--overwrite-data-of-peer" => force = true,
            "--force=no" => force = false,
            other => {
                return Err(
                    SimError::Invalid(format!("{cmd}: unrecognized option '{other}'")).into(),
                )
            }
        }
    }
    Ok(force)
}

fn drbdsetup(
    store: &Store,
    node: &str,
    args: &[String],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, StoreError> {
    let cmd = args[0].as_str();
    let rest = &args[1..];
    match cmd {
        "events2" => {
            let opts = Events2Opts::parse(rest).map_err(SimError::Invalid)?;
            events::run(store, node, opts, out)
        }
        "primary" | "secondary" => {
            let (res, flags) = one_resource(cmd, rest)?;
            let force = force_flag(cmd, &flags)?;
            let op = if cmd == "primary" {
                Op::Primary {
                    node: node.into(),
                    res,
                    force,
                }
            } else {
                Op::Secondary {
                    node: node.into(),
                    res,
                    force,
                }
            };
            store.commit(&[op])?;
            Ok(0)
        }
        "role" => {
            let (res, _) = one_resource(cmd, rest)?;
            let l = store.load()?;
            node_check(&l.cluster, node)?;
            let m = l
                .cluster
                .member(node, &res)
                .map_err(|_| SimError::Invalid(format!("{res}: Unknown resource")))?;
            let _ = writeln!(out, "{}", m.role);
            Ok(0)
        }
        "status" => {
            let mut res = None;
            let mut json_out = false;
            for a in rest {
                match a.as_str() {
                    "--json" | "-j" => json_out = true,
                    "--verbose" | "-v" | "--statistics" | "-s" | "--color=never" => {}
                    s if s.starts_with('-') => {
                        return Err(
                            SimError::Invalid(format!("status: unrecognized option '{s}'")).into(),
                        )
                    }
                    s => res = Some(s.to_string()),
                }
            }
            let res = res.filter(|r| r != "all");
            let l = store.load()?;
            node_check(&l.cluster, node)?;
            let now = store.now(&store.clock()?, &l.cluster);
            let (text, missing) = if json_out {
                json::status(&l.cluster, node, res.as_deref(), now)
            } else {
                text_status(&l.cluster, node, res.as_deref(), now)
            };
            let _ = out.write_all(text.as_bytes());
            if let Some(m) = missing {
                let _ = writeln!(err, "{m}");
                return Ok(10);
            }
            Ok(0)
        }
        "show" => {
            let mut res = None;
            let mut json_out = false;
            let mut defaults = false;
            for a in rest {
                match a.as_str() {
                    "--json" | "-j" => json_out = true,
                    "--show-defaults" | "-D" => defaults = true,
                    s if s.starts_with('-') => {
                        return Err(
                            SimError::Invalid(format!("show: unrecognized option '{s}'")).into(),
                        )
                    }
                    s => res = Some(s.to_string()),
                }
            }
            if !json_out {
                return Err(
                    SimError::Invalid("show: the simulator prints only --json".into()).into(),
                );
            }
            let l = store.load()?;
            node_check(&l.cluster, node)?;
            let res = res.filter(|r| r != "all");
            let _ =
                out.write_all(json::show(&l.cluster, node, res.as_deref(), defaults).as_bytes());
            Ok(0)
        }
        // drbdadm calls the promoter makes.
        "sh-ll-dev" => {
            let (res, _) = one_resource(cmd, rest)?;
            let l = store.load()?;
            node_check(&l.cluster, node)?;
            let m = l.cluster.member(node, &res).map_err(|_| {
                SimError::Invalid(format!(
                    "'{res}' not defined in your config (for this host)."
                ))
            })?;
            for v in m.vols.values() {
                let _ = writeln!(out, "{}", v.backing.as_deref().unwrap_or("none"));
            }
            Ok(0)
        }
        "adjust" => {
            let (res, _) = one_resource(cmd, rest)?;
            let l = store.load()?;
            node_check(&l.cluster, node)?;
            l.cluster.member(node, &res).map_err(|_| {
                SimError::Invalid(format!(
                    "'{res}' not defined in your config (for this host)."
                ))
            })?;
            Ok(0)
        }
        "--version" | "version" => {
            let utils = store.clock()?.drbd_utils;
            let _ = writeln!(out, "{}", version_text(utils.as_deref()));
            Ok(0)
        }
        "help" | "--help" | "-h" => {
            let _ = writeln!(out, "{USAGE}");
            Ok(0)
        }
        other => Err(SimError::Invalid(format!(
            "drbd-sim: drbdsetup command '{other}' is not simulated\n{USAGE}"
        ))
        .into()),
    }
}

/// `drbdadm --version` (kernel 9.2.12 and drbd-utils 9.34.0, or the cluster's drbd-utils version).
fn version_text(utils: Option<&str>) -> String {
    let (code, version) = match utils {
        None => ("0x092200".to_string(), "9.34.0".to_string()),
        Some(v) => {
            let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
            let (a, b, c) = (
                it.next().unwrap_or(0),
                it.next().unwrap_or(0),
                it.next().unwrap_or(0),
            );
            (
                format!("0x{:02x}{:02x}{:02x}", a.min(255), b.min(255), c.min(255)),
                format!("{a}.{b}.{c}"),
            )
        }
    };
    format!("DRBDADM_BUILDTAG=drbd-sim\nDRBDADM_API_VERSION=2\nDRBD_KERNEL_VERSION_CODE=0x09020c\nDRBD_KERNEL_VERSION=9.2.12\nDRBDADM_VERSION_CODE={code}\nDRBDADM_VERSION={version}")
}

fn text_status(c: &Cluster, node: &str, res: Option<&str>, now: u64) -> (String, Option<String>) {
    let mut out = String::new();
    let mut found = false;
    for r in c.resources.values() {
        if res.is_some_and(|x| x != r.name) {
            continue;
        }
        let Some(v) = res_view(c, r, node, now) else {
            continue;
        };
        found = true;
        out.push_str(&format!("{} role:{}", v.name, v.role));
        if v.suspended.any() {
            out.push_str(&format!(" suspended:{}", v.suspended));
        }
        out.push('\n');
        let single = v.devices.len() == 1;
        for (vol, d) in &v.devices {
            if single && *vol == 0 {
                out.push_str(&format!("  disk:{}", d.disk));
            } else {
                out.push_str(&format!("  volume:{vol} disk:{}", d.disk));
            }
            if !d.quorum {
                out.push_str(" quorum:no");
            }
            out.push_str(&format!(" open:{}\n", if d.open { "yes" } else { "no" }));
        }
        for c in v.conns.values() {
            out.push_str(&format!("  {}", c.conn_name));
            if c.cstate == crate::drbd::types::ConnState::Connected {
                out.push_str(&format!(" role:{}\n", c.role));
                for (vol, pd) in &c.pds {
                    let prefix = if single && *vol == 0 {
                        "   ".to_string()
                    } else {
                        format!("    volume:{vol}")
                    };
                    out.push_str(&prefix);
                    if pd.repl != crate::drbd::types::ReplState::Established {
                        out.push_str(&format!(" replication:{}", pd.repl));
                    }
                    out.push_str(&format!(" peer-disk:{}", pd.peer_disk));
                    if let Some(sy) = &pd.stats.sync {
                        out.push_str(&format!(
                            " done:{:.2}",
                            100.0 * (sy.rs_total - sy.to_go) as f64 / sy.rs_total.max(1) as f64
                        ));
                    }
                    out.push('\n');
                }
            } else {
                out.push_str(&format!(" connection:{}\n", c.cstate));
            }
        }
        out.push('\n');
    }
    if !found && res.is_none() {
        out.push_str("# No currently configured DRBD found.\n");
    }
    let err = match res {
        Some(r) if !found => Some(format!("{r}: No such resource")),
        _ => None,
    };
    (out, err)
}

// ---------------------------------------------------------------------------------------------
// ctl

#[derive(Parser, Debug)]
#[command(
    name = "drbd-sim ctl",
    about = "Change the simulated cluster",
    no_binary_name = true
)]
struct Ctl {
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
enum CtlCmd {
    /// Create the cluster directory; --manual-clock makes time move only with `advance`.
    Init {
        #[arg(long)]
        manual_clock: bool,
        /// Start over: drop the journal.
        #[arg(long)]
        reset: bool,
        /// Print events2 as this drbd-utils version's drbdsetup does (e.g. 9.22: no `open:` field).
        #[arg(long)]
        drbd_utils: Option<String>,
    },
    /// Create a resource on some nodes (configured, attached and connected like `drbdadm up`).
    Create {
        resource: String,
        /// Comma separated node names; node ids follow this order.
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<String>,
        /// Intentionally diskless nodes (clients, quorum tiebreakers).
        #[arg(long, value_delimiter = ',')]
        diskless: Vec<String>,
        /// Nodes whose disks start Inconsistent (they get a full sync).
        #[arg(long, value_delimiter = ',')]
        inconsistent: Vec<String>,
        #[arg(long, default_value_t = 1)]
        volumes: u32,
        #[arg(long, default_value_t = DEFAULT_SIZE_KIB)]
        size_kib: u64,
        /// Minor of volume 0 (volume v gets minor + v).
        #[arg(long)]
        minor: Option<u32>,
        #[arg(long)]
        backing_dev: Option<String>,
        /// NODE=IP:PORT
        #[arg(long)]
        address: Vec<String>,
        /// KEY=VALUE (quorum, on-no-quorum, on-no-data-accessible, on-suspended-primary-outdated,
        /// auto-promote, allow-two-primaries, fencing, rr-conflict, sync-rate-kib)
        #[arg(long = "option", short = 'o')]
        options: Vec<String>,
        /// Leave the connections StandAlone.
        #[arg(long)]
        no_connect: bool,
    },
    /// Take a resource down on all nodes and forget it.
    Delete { resource: String },
    /// `drbdadm down RES` on one node: it leaves gracefully (its peers see TearDown).
    Down { node: String, resource: String },
    /// Crash a node: its connections drop, its role is lost.
    NodeDown { node: String },
    /// Boot a crashed node: its resources come up and connect.
    NodeUp { node: String },
    /// Cut the network link between two nodes.
    Cut { a: String, b: String },
    /// Heal a cut link.
    Heal { a: String, b: String },
    Detach {
        node: String,
        resource: String,
        #[arg(long)]
        volume: Option<u32>,
    },
    Attach {
        node: String,
        resource: String,
        #[arg(long)]
        volume: Option<u32>,
    },
    /// Write KIB on a node (it must be Primary); disconnected peers get out-of-sync blocks.
    Write {
        node: String,
        resource: String,
        kib: u64,
        #[arg(long)]
        volume: Option<u32>,
    },
    /// Open a device (read-only unless --rw; --rw auto-promotes if allowed).
    Open {
        node: String,
        resource: String,
        #[arg(long)]
        volume: Option<u32>,
        #[arg(long)]
        rw: bool,
    },
    Close {
        node: String,
        resource: String,
        #[arg(long)]
        volume: Option<u32>,
    },
    Primary {
        node: String,
        resource: String,
        #[arg(long)]
        force: bool,
    },
    Secondary {
        node: String,
        resource: String,
        #[arg(long)]
        force: bool,
    },
    /// Change resource options (KEY=VALUE ...).
    SetOptions {
        resource: String,
        #[arg(required = true)]
        options: Vec<String>,
    },
    /// Move a manual clock forward by MS milliseconds (resyncs progress).
    Advance { ms: u64 },
    /// Let time pass on a real clock: completes due resyncs now.
    Tick,
    /// Print the cluster state (JSON).
    State,
    /// Kernel-level configuration on one node, as drbdsetup issues it.
    Drbd {
        node: String,
        #[command(subcommand)]
        cmd: DrbdCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DrbdCmd {
    NewResource {
        resource: String,
        #[arg(long)]
        node_id: Option<u32>,
    },
    NewMinor {
        resource: String,
        minor: u32,
        volume: u32,
    },
    NewPeer {
        resource: String,
        peer: String,
        #[arg(long)]
        peer_node_id: Option<u32>,
    },
    NewPath {
        resource: String,
        peer: String,
        local: String,
        remote: String,
    },
    Attach {
        resource: String,
        volume: u32,
        backing_dev: String,
        /// UpToDate, Inconsistent or Outdated.
        #[arg(long, default_value = "UpToDate")]
        disk_state: String,
    },
    Connect {
        resource: String,
        peer: String,
    },
    Disconnect {
        resource: String,
        peer: String,
    },
    DelPath {
        resource: String,
        peer: String,
    },
    DelPeer {
        resource: String,
        peer: String,
    },
    DelMinor {
        resource: String,
        volume: u32,
    },
    DelResource {
        resource: String,
    },
}

pub fn parse_kv(s: &str) -> Result<(String, String), SimError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(SimError::Invalid(format!("'{s}' is not KEY=VALUE"))),
    }
}

/// Builds the create operation from its parts (shared by `ctl create` and scenarios).
#[allow(clippy::too_many_arguments)]
pub fn create_op(
    resource: &str,
    nodes: &[String],
    diskless: &[String],
    inconsistent: &[String],
    volumes: u32,
    size_kib: u64,
    minor: Option<u32>,
    backing_dev: Option<String>,
    addresses: &[String],
    options: BTreeMap<String, String>,
    connect: bool,
) -> Result<Op, SimError> {
    let mut addr = BTreeMap::new();
    for a in addresses {
        let (n, v) = parse_kv(a)?;
        addr.insert(n, v);
    }
    for n in diskless.iter().chain(inconsistent).chain(addr.keys()) {
        if !nodes.contains(n) {
            return Err(SimError::Invalid(format!("{n} is not one of --nodes")));
        }
    }
    Ok(Op::Create(CreateSpec {
        name: resource.to_string(),
        nodes: nodes
            .iter()
            .map(|n| NodeSpec {
                name: n.clone(),
                diskless: diskless.contains(n),
                disk: if inconsistent.contains(n) {
                    InitialDisk::Inconsistent
                } else {
                    InitialDisk::UpToDate
                },
                address: addr.get(n).cloned(),
            })
            .collect(),
        volumes,
        size_kib,
        minor,
        backing_dev,
        options,
        connect,
    }))
}

fn ctl(store: &Store, args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let parsed = match Ctl::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let text = e.render().to_string();
            if code == 0 {
                let _ = write!(out, "{text}");
            } else {
                let _ = write!(err, "{text}");
            }
            return code;
        }
    };
    match ctl_cmd(store, parsed.cmd, out) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(err, "drbd-sim ctl: {e}");
            1
        }
    }
}

fn ctl_cmd(store: &Store, cmd: CtlCmd, out: &mut dyn Write) -> Result<(), StoreError> {
    let op = match cmd {
        CtlCmd::Init {
            manual_clock,
            reset,
            drbd_utils,
        } => {
            let mode = if manual_clock {
                ClockMode::Manual
            } else {
                ClockMode::Real
            };
            store.init(mode, reset)?;
            if drbd_utils.is_some() {
                store.set_drbd_utils(drbd_utils.as_deref())?;
            }
            return Ok(());
        }
        CtlCmd::Create {
            resource,
            nodes,
            diskless,
            inconsistent,
            volumes,
            size_kib,
            minor,
            backing_dev,
            address,
            options,
            no_connect,
        } => {
            let mut opts = BTreeMap::new();
            for o in &options {
                let (k, v) = parse_kv(o)?;
                opts.insert(k, v);
            }
            create_op(
                &resource,
                &nodes,
                &diskless,
                &inconsistent,
                volumes,
                size_kib,
                minor,
                backing_dev,
                &address,
                opts,
                !no_connect,
            )?
        }
        CtlCmd::Delete { resource } => Op::Delete { res: resource },
        CtlCmd::Down { node, resource } => Op::Down {
            node,
            res: resource,
        },
        CtlCmd::NodeDown { node } => Op::NodeDown { node },
        CtlCmd::NodeUp { node } => Op::NodeUp { node },
        CtlCmd::Cut { a, b } => Op::Cut { a, b },
        CtlCmd::Heal { a, b } => Op::Heal { a, b },
        CtlCmd::Detach {
            node,
            resource,
            volume,
        } => Op::Detach {
            node,
            res: resource,
            vol: volume,
        },
        CtlCmd::Attach {
            node,
            resource,
            volume,
        } => Op::Attach {
            node,
            res: resource,
            vol: volume,
        },
        CtlCmd::Write {
            node,
            resource,
            kib,
            volume,
        } => Op::Write {
            node,
            res: resource,
            vol: volume,
            kib,
        },
        CtlCmd::Open {
            node,
            resource,
            volume,
            rw,
        } => Op::Open {
            node,
            res: resource,
            vol: volume,
            rw,
        },
        CtlCmd::Close {
            node,
            resource,
            volume,
        } => Op::Close {
            node,
            res: resource,
            vol: volume,
        },
        CtlCmd::Primary {
            node,
            resource,
            force,
        } => Op::Primary {
            node,
            res: resource,
            force,
        },
        CtlCmd::Secondary {
            node,
            resource,
            force,
        } => Op::Secondary {
            node,
            res: resource,
            force,
        },
        CtlCmd::SetOptions { resource, options } => {
            let mut map = BTreeMap::new();
            for o in &options {
                let (k, v) = parse_kv(o)?;
                map.insert(k, v);
            }
            Op::SetOptions {
                res: resource,
                options: map,
            }
        }
        CtlCmd::Advance { ms } => {
            if store.clock()?.mode != ClockMode::Manual {
                return Err(SimError::Invalid(
                    "advance needs a manual clock (ctl init --manual-clock)".into(),
                )
                .into());
            }
            store.commit_at(&[Op::Tick], ms)?;
            return Ok(());
        }
        CtlCmd::Tick => Op::Tick,
        CtlCmd::State => {
            let l = store.load()?;
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&l.cluster).expect("serializable")
            );
            return Ok(());
        }
        CtlCmd::Drbd { node, cmd } => match cmd {
            DrbdCmd::NewResource { resource, node_id } => Op::NewResource {
                node,
                res: resource,
                node_id,
            },
            DrbdCmd::NewMinor {
                resource,
                minor,
                volume,
            } => Op::NewMinor {
                node,
                res: resource,
                minor,
                vol: volume,
            },
            DrbdCmd::NewPeer {
                resource,
                peer,
                peer_node_id,
            } => Op::NewPeer {
                node,
                res: resource,
                peer,
                peer_node_id,
            },
            DrbdCmd::NewPath {
                resource,
                peer,
                local,
                remote,
            } => Op::NewPath {
                node,
                res: resource,
                peer,
                local,
                remote,
            },
            DrbdCmd::Attach {
                resource,
                volume,
                backing_dev,
                disk_state,
            } => Op::AttachDisk {
                node,
                res: resource,
                vol: volume,
                backing: backing_dev,
                disk: InitialDisk::parse(&disk_state).ok_or_else(|| {
                    SimError::Invalid(format!(
                        "--disk-state '{disk_state}': use UpToDate, Inconsistent or Outdated"
                    ))
                })?,
            },
            DrbdCmd::Connect { resource, peer } => Op::Connect {
                node,
                res: resource,
                peer,
            },
            DrbdCmd::Disconnect { resource, peer } => Op::Disconnect {
                node,
                res: resource,
                peer,
            },
            DrbdCmd::DelPath { resource, peer } => Op::DelPath {
                node,
                res: resource,
                peer,
            },
            DrbdCmd::DelPeer { resource, peer } => Op::DelPeer {
                node,
                res: resource,
                peer,
            },
            DrbdCmd::DelMinor { resource, volume } => Op::DelMinor {
                node,
                res: resource,
                vol: volume,
            },
            DrbdCmd::DelResource { resource } => Op::DelResource {
                node,
                res: resource,
            },
        },
    };
    store.commit(&[op])?;
    Ok(())
}

/// Facts about one resource on one node, for expectations (scenario, tests).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    pub role: String,
    pub quorum: bool,
    pub may_promote: bool,
    pub promotion_score: u32,
    pub disks: Vec<String>,
    pub suspended: bool,
    pub force_io_failures: bool,
}

pub fn node_facts(c: &Cluster, node: &str, res: &str, now: u64) -> Option<NodeFacts> {
    let r = c.resources.get(res)?;
    let v = res_view(c, r, node, now)?;
    let p = promotion(&v);
    Some(NodeFacts {
        role: v.role.to_string(),
        quorum: r.has_quorum(node),
        may_promote: p.may_promote,
        promotion_score: p.score,
        disks: v.devices.values().map(|d| d.disk.to_string()).collect(),
        suspended: v.suspended.any(),
        force_io_failures: v.fail_io,
    })
}
