//! `drbdsetup events2` for one simulated node: the pure printer state machine ([`Printer`]) and the
//! process loop that tails the journal ([`run`]).

use super::model::{Cluster, HelperCall, SimError};
use super::store::{Store, StoreError};
use super::view::{merge_live, node_views, print_changes, res_view, PrintOpts, ResView};
use crate::drbd::events2::{Event, HelperFields, Object, Verb};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Duration;

/// `events2 [RES|all] [--full] [--statistics] [--timestamps] [--now] [--poll]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Events2Opts {
    pub resource: Option<String>,
    pub full: bool,
    pub statistics: bool,
    pub timestamps: bool,
    pub now: bool,
    pub poll: bool,
    /// The drbd-utils version whose drbdsetup is imitated (the cluster's `drbd-utils` setting; `None`:
    /// the current one). Not a drbdsetup option.
    pub drbd_utils: Option<String>,
}

/// Whether drbdsetup of this drbd-utils version prints the device's `open:` field. drbd-utils 9.22
/// (the real captures) does not; the current drbd-utils (9.34, GRAMMAR.md) does. Versions in between
/// were not checked: the simulator draws the line at 9.23.
pub fn prints_open(drbd_utils: Option<&str>) -> bool {
    let Some(v) = drbd_utils else {
        return true;
    };
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (major, minor) >= (9, 23)
}

/// Checks a `drbd-utils` version setting: `MAJOR.MINOR[.PATCH]`, digits only.
pub fn check_utils_version(v: &str) -> Result<(), String> {
    let parts: Vec<&str> = v.split('.').collect();
    if (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit()))
    {
        Ok(())
    } else {
        Err(format!(
            "drbd-utils version '{}': use MAJOR.MINOR[.PATCH], e.g. 9.22",
            v.escape_debug()
        ))
    }
}

impl Events2Opts {
    /// Parses the arguments after `events2` like drbdsetup's getopt does.
    pub fn parse(args: &[String]) -> Result<Events2Opts, String> {
        let mut o = Events2Opts::default();
        let mut positional = Vec::new();
        for a in args {
            match a.as_str() {
                "--full" | "-f" => o.full = true,
                "--statistics" | "-s" => o.statistics = true,
                "--timestamps" | "-T" => o.timestamps = true,
                "--now" | "-n" => o.now = true,
                "--poll" | "-p" => o.poll = true,
                "--color" | "--color=never" | "--color=auto" => {}
                s if s.starts_with('-') => {
                    return Err(format!("events2: unrecognized option '{s}'"))
                }
                s => positional.push(s.to_string()),
            }
        }
        if positional.len() > 1 {
            return Err(format!("Excess arguments: {}", positional[1..].join(" ")));
        }
        o.resource = positional.pop().filter(|r| r != "all");
        Ok(o)
    }

    pub fn print_opts(&self) -> PrintOpts {
        let mut p = PrintOpts::new(self.full, self.statistics);
        p.open_field = prints_open(self.drbd_utils.as_deref());
        p
    }
}

/// Tracks what has been printed for one node and prints the difference to each new state.
#[derive(Debug, Clone)]
pub struct Printer {
    pub node: String,
    pub opts: Events2Opts,
    popts: PrintOpts,
    tracked: BTreeMap<String, ResView>,
    initial_done: bool,
}

impl Printer {
    pub fn new(node: &str, opts: Events2Opts) -> Printer {
        let popts = opts.print_opts();
        Printer {
            node: node.to_string(),
            opts,
            popts,
            tracked: BTreeMap::new(),
            initial_done: false,
        }
    }

    fn prefix(&self) -> String {
        if self.opts.timestamps {
            let mut s = timestamp();
            s.push(' ');
            s
        } else {
            String::new()
        }
    }

    /// The initial dump (`exists` lines and `exists -`).
    pub fn dump(&mut self, c: &Cluster, now: u64, out: &mut String) -> usize {
        let prefix = self.prefix();
        self.tracked.clear();
        let mut n = 0;
        for (name, v) in node_views(c, &self.node, self.opts.resource.as_deref(), now) {
            n += print_changes(out, &prefix, Verb::Exists, None, Some(&v), &self.popts);
            self.tracked.insert(name, v);
        }
        out.push_str(&prefix);
        out.push_str("exists -\n");
        self.initial_done = true;
        n + 1
    }

    /// A kernel state change of resource `res` (one netlink group).
    pub fn on_step(&mut self, c: &Cluster, res: &str, now: u64, out: &mut String) -> usize {
        if self.opts.resource.as_deref().is_some_and(|f| f != res) {
            return 0;
        }
        let helpers = self.print_helpers(c, res, out);
        let new = c
            .resources
            .get(res)
            .and_then(|r| res_view(c, r, &self.node, now));
        let prefix = self.prefix();
        let n = match (self.tracked.get(res), new) {
            (Some(old), Some(new)) => {
                let mut merged = merge_live(old, &new);
                // After a write the kernel pushes the writer's device statistics.
                if c.stats_push
                    .as_ref()
                    .is_some_and(|(n, r)| *n == self.node && r == res)
                {
                    for (v, d) in merged.devices.iter_mut() {
                        if let Some(nd) = new.devices.get(v) {
                            d.stats = nd.stats.clone();
                        }
                    }
                }
                if *old == merged {
                    return helpers;
                }
                let n = print_changes(
                    out,
                    &prefix,
                    Verb::Create,
                    Some(old),
                    Some(&merged),
                    &self.popts,
                );
                self.tracked.insert(res.to_string(), merged);
                n
            }
            (None, Some(new)) => {
                let n = print_changes(out, &prefix, Verb::Create, None, Some(&new), &self.popts);
                self.tracked.insert(res.to_string(), new);
                n
            }
            (Some(old), None) => {
                let n = print_changes(out, &prefix, Verb::Create, Some(old), None, &self.popts);
                self.tracked.remove(res);
                n
            }
            (None, None) => 0,
        };
        helpers + n
    }

    /// The `call helper`/`response helper` lines of the helpers this node runs in this step (the
    /// simulator has no handlers: every helper returns 0).
    fn print_helpers(&self, c: &Cluster, res: &str, out: &mut String) -> usize {
        let mine: Vec<&HelperCall> = c
            .helpers
            .iter()
            .filter(|h| h.node == self.node && h.res == res)
            .collect();
        if mine.is_empty() {
            return 0;
        }
        let Some(m) = c.resources.get(res).and_then(|r| r.members.get(&self.node)) else {
            return 0;
        };
        let prefix = self.prefix();
        let mut n = 0;
        for h in mine {
            let peer = h
                .peer
                .as_deref()
                .and_then(|p| m.peers.get(p).map(|x| (p, x)));
            let minor = h.vol.and_then(|v| m.vols.get(&v)).map(|v| v.minor);
            for (verb, status) in [(Verb::Call, None), (Verb::Response, Some(0))] {
                let e = Event {
                    verb,
                    object: Object::Helper(HelperFields {
                        name: res,
                        peer_node_id: peer.map(|(_, x)| x.node_id),
                        conn_name: peer.map(|(p, _)| p),
                        local: None,
                        peer: None,
                        volume: h.vol,
                        minor,
                        helper: h.helper,
                        status,
                    }),
                    extra: Vec::new(),
                };
                out.push_str(&prefix);
                out.push_str(&e.to_line());
                out.push('\n');
                n += 1;
            }
        }
        n
    }

    /// `n` on stdin with `--poll`: fetch everything again and print what changed (statistics too).
    pub fn refresh(&mut self, c: &Cluster, now: u64, out: &mut String) -> usize {
        if self.opts.now {
            return self.dump(c, now, out);
        }
        let prefix = self.prefix();
        let mut n = 0;
        for (name, v) in node_views(c, &self.node, self.opts.resource.as_deref(), now) {
            if let Some(old) = self.tracked.get(&name) {
                if *old != v {
                    n +=
                        print_changes(out, &prefix, Verb::Create, Some(old), Some(&v), &self.popts);
                }
            }
            // Objects unknown to drbdsetup are ignored by an update (E2 `apply_event`).
            if self.tracked.contains_key(&name) {
                self.tracked.insert(name, v);
            }
        }
        n
    }
}

/// Local time as drbdsetup prints it: `YYYY-MM-DDTHH:MM:SS.uuuuuu+HH:MM`.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as libc::time_t;
    // SAFETY: localtime_r writes into the zeroed `tm` we own; `secs` is a valid time_t.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return format!("1970-01-01T00:00:00.{:06}+00:00", now.subsec_micros());
        }
        tm
    };
    let off = tm.tm_gmtoff;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}{}{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_micros(),
        if off < 0 { '-' } else { '+' },
        off.abs() / 3600,
        (off.abs() / 60) % 60
    )
}

enum Input {
    Poll,
    Quit,
}

fn spawn_stdin_reader() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut b = [0u8; 1];
        loop {
            match stdin.read(&mut b) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Input::Quit);
                    return;
                }
                Ok(_) => match b[0] {
                    b'n' => {
                        if tx.send(Input::Poll).is_err() {
                            return;
                        }
                    }
                    b'\n' => {}
                    _ => {
                        let _ = tx.send(Input::Quit);
                        return;
                    }
                },
            }
        }
    });
    rx
}

/// Runs `events2` for `node` until stdin says stop (`--poll`), the node goes down (exit 20) or the
/// reader goes away. Returns drbdsetup's exit code.
pub fn run(
    store: &Store,
    node: &str,
    opts: Events2Opts,
    out: &mut dyn Write,
) -> Result<i32, StoreError> {
    let mut l = store.load()?;
    let cfg = store.clock()?;
    if l.cluster.nodes.get(node).is_some_and(|n| !n.up) {
        return Err(SimError::NodeDown(node.into()).into());
    }
    let mut opts = opts;
    opts.drbd_utils = cfg.drbd_utils.clone();
    let mut p = Printer::new(node, opts.clone());
    let mut buf = String::with_capacity(1 << 16);
    let now = store.now(&cfg, &l.cluster);
    p.dump(&l.cluster, now, &mut buf);
    if write_out(out, &mut buf)? {
        return Ok(0);
    }
    let input = opts.poll.then(spawn_stdin_reader);
    if opts.now && !opts.poll {
        return Ok(0);
    }
    let tick = Duration::from_millis(20);
    // What the dump covered, not the journal's length now: an entry another process appended since the
    // load (while the dump was printed) must still be followed.
    let mut last_len = l.offset;
    loop {
        // Wait for input or the next journal check.
        if let Some(rx) = &input {
            match rx.recv_timeout(tick) {
                Ok(Input::Poll) => {
                    let _ = store.tick_if_due(&l);
                    follow(store, &mut l, &mut p, &mut buf)?;
                    if !l.cluster.node_up(node) && l.cluster.nodes.contains_key(node) {
                        write_out(out, &mut buf)?;
                        return Ok(20);
                    }
                    let now = store.now(&cfg, &l.cluster);
                    p.refresh(&l.cluster, now, &mut buf);
                    if write_out(out, &mut buf)? {
                        return Ok(0);
                    }
                    continue;
                }
                Ok(Input::Quit) | Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        } else {
            std::thread::sleep(tick);
        }
        if opts.now {
            continue;
        }
        let len = store.journal_len();
        if len != last_len {
            last_len = len;
            follow(store, &mut l, &mut p, &mut buf)?;
            let down = !l.cluster.node_up(node) && l.cluster.nodes.contains_key(node);
            if write_out(out, &mut buf)? {
                return Ok(0);
            }
            if down {
                eprintln!(
                    "drbdsetup events2: {node} is down: lost the 'drbd' generic netlink family"
                );
                return Ok(20);
            }
        }
        let _ = store.tick_if_due(&l);
    }
}

/// Applies new journal entries, printing after every state change.
pub fn follow(
    store: &Store,
    l: &mut super::store::Loaded,
    p: &mut Printer,
    buf: &mut String,
) -> Result<(), StoreError> {
    let (entries, off) = store.read_from(l.offset)?;
    for e in entries {
        let at = e.at;
        let node = p.node.clone();
        let mut gone = false;
        let _ = l.cluster.apply(&e.op, at, &mut |c, res| {
            if gone {
                return;
            }
            if !c.node_up(&node) && c.nodes.contains_key(&node) {
                gone = true;
                return;
            }
            p.on_step(c, res, at.max(c.now_ms), buf);
        });
        l.seq = e.seq;
        if gone {
            l.offset = off;
            return Ok(());
        }
    }
    l.offset = off;
    Ok(())
}

/// Writes and clears `buf`; returns true if the reader went away.
fn write_out(out: &mut dyn Write, buf: &mut String) -> Result<bool, StoreError> {
    if buf.is_empty() {
        return Ok(false);
    }
    let r = out.write_all(buf.as_bytes()).and_then(|_| out.flush());
    buf.clear();
    match r {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(e) => Err(StoreError::Io {
            path: "stdout".into(),
            source: e,
        }),
    }
}
