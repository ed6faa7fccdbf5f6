//! The promoter on real DRBD and the guests' real systemd (issue #14 point 4): an agent in each of the
//! three guests drives its guest's systemd (PID 1, over the guest's own system bus, the production path)
//! for r0, whose start list is a mount of /dev/drbd0 (ext4) and a service writing to it
//! (`sleep infinity` after appending its host name to /mnt/r0/starts, so the data visibly moves with the
//! services). `preferredNodes: [node1, node2, node3]`.
//!
//! - `promoter_drbd_utils_templates`: drbd-utils' own templates (Debian's drbd-utils 9.22:
//!   drbd-promote@, drbd-services@.target, drbd-demote-or-escalate@; it ships ocf.ra@, not ocf.rs@, so
//!   the agent installs its ocf.rs@ template): a) first start on exactly one node, g) agent restart
//!   while the services run (nothing restarts), b) power cut of the active node (failover, measured),
//!   e) the preferred node returns (fail-back), c) the active node's links cut (it loses quorum and
//!   stops, the majority takes over), d) heal (still exactly one, fail-back), h) the policy changed to
//!   `stopServicesOnExit` (handed over, nothing restarts), then removed (services stopped, the resource
//!   stays up and Secondary).
//! - `promoter_own_templates`: the same agent with `--units-templates always`: a) first start, h)
//!   removal, f) a service that fails to start (backoff on every node, no ping-pong).
//!
//! Every step asserts where the services run (exactly one node), that DRBD agrees (that node is the one
//! Primary, with quorum) and what each agent's `/status` says (the promoter instance's state and
//! reason). `PROMOTER_FAILOVER_RUNS=N` repeats power cut and fail-back N times for a distribution of the
//! failover time (default 1).

use crate::common::lab::Lab;
use serde_json::Value;
use std::time::{Duration, Instant, SystemTime};

const NODES: [usize; 3] = [1, 2, 3];
const SVC: &str = "lab-svc.service";
const MOUNT: &str = "mnt-r0.mount";

const MOUNT_UNIT: &str = "[Unit]
Description=Lab data on DRBD r0
[Mount]
What=/dev/drbd0
Where=/mnt/r0
Type=ext4
";

const SVC_UNIT: &str = "[Unit]
Description=Lab service on DRBD r0
[Service]
ExecStart=/bin/sh -c 'echo \"$(hostname) $(date +%%s.%%N)\" >> /mnt/r0/starts; exec sleep infinity'
";

/// Fails every start (a oneshot that exits 1): the target's start fails after DRBD was promoted.
const FAIL_UNIT: &str = "[Unit]
Description=Lab service that cannot start
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/false
";

/// The agent's log filter: the promoter's and the systemd client's debug lines carry the timings.
const RUST_LOG: &str = "info,promoter=debug,systemd=debug";

fn policy(start: &[&str], stop_on_exit: bool) -> String {
    format!(
        "apiVersion: reactor.drbd.io/v1alpha1
kind: ReactorPolicy
metadata: {{name: r0-ha}}
spec:
  promoter:
    resources:
      - name: r0
        start: [{}]
        preferredNodes: [node1, node2, node3]
        stopServicesOnExit: {stop_on_exit}
",
        start.join(", ")
    )
}

fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Starts the agent in guest n with the promoter's debug log filter; the time until `/readyz`.
fn start_agent(lab: &Lab, n: usize, extra: &str) -> Duration {
    lab.start_agent_with(n, &format!("-E RUST_LOG={RUST_LOG}"), extra)
}

/// The agent's journal since `since` (guest epoch seconds), as `(epoch, text)` without colours.
fn agent_journal(lab: &Lab, n: usize, since: f64) -> Vec<(f64, String)> {
    let out = lab.sh(
        n,
        &format!(
            "journalctl -u {} -o short-unix --no-pager --since @{since:.6} | sed 's/\\x1b\\[[0-9;]*m//g'",
            Lab::AGENT_UNIT
        ),
    );
    out.lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// Guest clock minus host clock (seconds), and its uncertainty: the best of a few round trips.
fn clock_offset(lab: &Lab, n: usize) -> (f64, f64) {
    let mut best = (0.0, f64::MAX);
    for _ in 0..3 {
        let t0 = host_now();
        let g: f64 = lab.sh(n, "date +%s.%N").trim().parse().unwrap();
        let t1 = host_now();
        if (t1 - t0) / 2.0 < best.1 {
            best = (g - (t0 + t1) / 2.0, (t1 - t0) / 2.0);
        }
    }
    best
}

/// Epoch seconds of an events2 `--timestamps` prefix (`2026-12-07T18:19:22.154756+00:00`, UTC).
fn events2_epoch(ts: &str) -> Option<f64> {
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm) = (num(11..13)?, num(14..16)?);
    let ss: f64 = ts.get(17..ts.find('+')?)?.parse().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// What guest n says about r0: DRBD, systemd and the agent's promoter instance.
#[derive(Debug, Clone)]
struct View {
    node: usize,
    role: String,
    quorum: bool,
    disk: String,
    svc: String,
    mounted: bool,
    /// The promoter instance's explanation of r0 (`Null` without one).
    p: Value,
}

impl View {
    fn state(&self) -> &str {
        self.p["state"].as_str().unwrap_or("-")
    }
    fn reason(&self) -> &str {
        self.p["reason"].as_str().unwrap_or("-")
    }
    fn runs(&self) -> bool {
        self.svc == "active" || self.mounted
    }
    fn line(&self) -> String {
        format!(
            "node{}: {} {} quorum:{} svc:{} mounted:{} | {}: {}",
            self.node,
            self.role,
            self.disk,
            self.quorum,
            self.svc,
            self.mounted,
            self.state(),
            self.reason()
        )
    }
}

fn view(lab: &Lab, n: usize) -> View {
    let out = lab.sh(
        n,
        &format!(
            "r=$(drbdsetup status r0 --json 2>/dev/null) || r='[]'; [ -n \"$r\" ] || r='[]'
             s=$(curl -s --max-time 5 localhost:9942/status) || s='{{}}'; [ -n \"$s\" ] || s='{{}}'
             svc=$(systemctl is-active {SVC}); mountpoint -q /mnt/r0 && m=true || m=false
             jq -nc --argjson r \"$r\" --argjson s \"$s\" --arg svc \"$svc\" --argjson m $m \
               '{{role: ($r[0].role // \"none\"), quorum: ($r[0].devices[0].quorum // false),
                 disk: ($r[0].devices[0][\"disk-state\"] // \"none\"), svc: $svc, mounted: $m,
                 p: ([$s.plugins[]? | select(.id.type == \"promoter\") | .detail.resources[]?
                      | select(.name == \"r0\")] | first // null)}}'"
        ),
    );
    let v: Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("node{n}: {e}: {out}"));
    View {
        node: n,
        role: v["role"].as_str().unwrap_or("?").into(),
        quorum: v["quorum"] == Value::Bool(true),
        disk: v["disk"].as_str().unwrap_or("?").into(),
        svc: v["svc"].as_str().unwrap_or("?").into(),
        mounted: v["mounted"] == Value::Bool(true),
        p: v["p"].clone(),
    }
}

fn views(lab: &Lab, nodes: &[usize]) -> Vec<View> {
    nodes.iter().map(|&n| view(lab, n)).collect()
}

fn show(views: &[View]) -> String {
    views
        .iter()
        .map(|v| v.line())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the services run on exactly one node of `nodes`, one of `candidates`, and nowhere else,
/// DRBD agrees (that node is the one Primary, with quorum, UpToDate; the others Secondary) and every
/// agent says so (that node: "services run here"; the others not active). Never two nodes at once.
/// Returns the node, the views and the time it took.
fn settle(
    lab: &Lab,
    nodes: &[usize],
    candidates: &[usize],
    step: &str,
) -> (usize, Vec<View>, Duration) {
    let t0 = Instant::now();
    let mut twice = Twice::default();
    loop {
        let vs = views(lab, nodes);
        let runs: Vec<usize> = vs.iter().filter(|v| v.runs()).map(|v| v.node).collect();
        let ok = runs.len() == 1
            && candidates.contains(&runs[0])
            && vs.iter().all(|v| {
                if v.node == runs[0] {
                    v.svc == "active"
                        && v.mounted
                        && v.role == "Primary"
                        && v.quorum
                        && v.disk == "UpToDate"
                        && v.state() == "active"
                        && v.reason() == "services run here"
                } else {
                    v.role == "Secondary" && v.state() != "active"
                }
            });
        if ok {
            eprintln!(
                "[{step}] exactly one: node{} ({:.1} s)\n{}",
                runs[0],
                t0.elapsed().as_secs_f64(),
                show(&vs)
            );
            return (runs[0], vs, t0.elapsed());
        }
        let primaries = vs
            .iter()
            .filter(|v| v.role == "Primary" && v.quorum)
            .count();
        twice.check(
            (runs.len() > 1 || primaries > 1).then(|| {
                format!(
                    "services on {runs:?}, {primaries} Primaries with quorum:\n{}",
                    show(&vs)
                )
            }),
            step,
        );
        if t0.elapsed() > Duration::from_secs(90) {
            let logs: String = nodes
                .iter()
                .map(|&n| format!("--- node{n} agent log\n{}\n", lab.agent_log(n)))
                .collect();
            panic!(
                "[{step}] the services did not settle on one of {candidates:?}:\n{}\n{logs}",
                show(&vs)
            );
        }
        std::thread::sleep(Duration::from_millis(700));
    }
}

/// [`settle`] on exactly `active`.
fn exactly_one(lab: &Lab, nodes: &[usize], active: usize, step: &str) -> (Vec<View>, Duration) {
    let (_, vs, t) = settle(lab, nodes, &[active], step);
    (vs, t)
}

/// Asserts a node's explanation: the one in `v`, or one the node's `/status` shows within 30 s (the
/// explanation is published apart from the decision, and a promoter still setting up shows none yet).
fn assert_reason(lab: &Lab, v: &View, state: &str, reason: &str, step: &str) {
    let t0 = Instant::now();
    let mut last = v.line();
    if (v.state(), v.reason()) == (state, reason) {
        return;
    }
    while t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        let v = view(lab, v.node);
        if (v.state(), v.reason()) == (state, reason) {
            return;
        }
        last = v.line();
    }
    panic!(
        "[{step}] node{}: expected {state}: {reason}, still {last}",
        v.node
    );
}

/// A safety property checked on views taken one guest after another (a few hundred ms apart): a
/// transition caught between two guests' views (the old Primary seen before its demotion, the new one
/// after its promotion) looks like a violation once; a real one persists, so it fails on the second
/// view in a row.
#[derive(Default)]
struct Twice(Option<String>);

impl Twice {
    fn check(&mut self, violation: Option<String>, step: &str) {
        match (self.0.take(), violation) {
            (Some(first), Some(again)) => {
                panic!("[{step}] on two views in a row:\n{first}\n--- then\n{again}")
            }
            (_, v) => self.0 = v,
        }
    }
}

const DESCRIPTIONS: &str = "Lab data on DRBD r0\nLab service on DRBD r0\n";

/// The Description systemd has for the mount and the service.
fn descriptions(lab: &Lab, n: usize) -> String {
    lab.sh(
        n,
        &format!("systemctl show -P Description {MOUNT}; systemctl show -P Description {SVC}"),
    )
}

/// `MainPID` and `ActiveEnterTimestampMonotonic` of the service, and the mount's activation time.
fn service_identity(lab: &Lab, n: usize) -> String {
    lab.sh(
        n,
        &format!(
            "systemctl show -p MainPID -p ActiveEnterTimestampMonotonic {SVC}; \
             systemctl show -p ActiveEnterTimestampMonotonic {MOUNT}"
        ),
    )
}

/// How often the agent in guest n acted (`start`/`stop`) since `since`.
fn actions_since(lab: &Lab, n: usize, since: f64, action: &str) -> usize {
    agent_journal(lab, n, since)
        .iter()
        .filter(|(_, l)| {
            l.contains("promoter: acting") && l.contains(&format!("action=\"{action}\""))
        })
        .count()
}

/// `drbdreactor_promoter_actions_total` of r0 for one action and result.
fn action_count(lab: &Lab, n: usize, action: &str, result: &str) -> u64 {
    let m = lab.http(n, "/metrics");
    m.lines()
        .filter(|l| {
            l.starts_with("drbdreactor_promoter_actions_total{")
                && l.contains(&format!("action=\"{action}\""))
                && l.contains(&format!("result=\"{result}\""))
                && l.contains("resource=\"r0\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Fresh r0 on all guests: metadata, up, initial sync from node1, an ext4 file system, the lab units.
fn prepare(lab: &Lab) {
    lab.reset();
    for n in NODES {
        lab.sh(
            n,
            "systemctl stop drbd@r0.target drbd@r0.service 2>/dev/null; \
             umount /mnt/r0 2>/dev/null; systemctl reset-failed; true",
        );
    }
    super::configure(lab, &super::res_r0("", ""));
    for n in NODES {
        lab.sh(n, "drbdadm up r0");
    }
    let uptodate = "[ \"$(drbdadm dstate r0 2>/dev/null | tr '/' '\\n' | sort -u)\" = UpToDate ]";
    let connected = "[ \"$(drbdadm cstate r0 2>/dev/null | tr ' ' '\\n' | sort -u)\" = Connected ]";
    lab.wait(1, "Connected", connected, Duration::from_secs(120));
    lab.sh(1, "drbdadm primary --force r0");
    for n in [2, 3] {
        lab.wait(n, "initial sync", uptodate, Duration::from_secs(300));
    }
    lab.sh(
        1,
        "mkfs.ext4 -q -F /dev/drbd0 && mkdir -p /mnt/r0 && mount /dev/drbd0 /mnt/r0 && \
         : > /mnt/r0/starts && umount /mnt/r0 && drbdadm secondary r0",
    );
    for n in NODES {
        lab.write(
            n,
            &format!("/etc/systemd/system/{MOUNT}"),
            MOUNT_UNIT,
            0o644,
        );
        lab.write(n, &format!("/etc/systemd/system/{SVC}"), SVC_UNIT, 0o644);
        lab.write(n, "/etc/systemd/system/lab-fail.service", FAIL_UNIT, 0o644);
        lab.sh(n, "mkdir -p /mnt/r0; systemctl daemon-reload");
    }
}

/// Everything this module leaves behind, for the cases that come after it.
fn cleanup(lab: &Lab) {
    lab.heal_all();
    for n in NODES {
        if lab.running(n) {
            lab.stop_agent(n);
            lab.sh(
                n,
                "systemctl stop drbd-services@r0.target drbd-promote@r0.service 2>/dev/null; \
                 umount /mnt/r0 2>/dev/null; drbdadm secondary r0 2>/dev/null; \
                 systemctl stop drbd@r0.target drbd@r0.service 2>/dev/null; \
                 rm -f /etc/systemd/system/lab-svc.service /etc/systemd/system/lab-fail.service /etc/systemd/system/mnt-r0.mount; \
                 systemctl daemon-reload; systemctl reset-failed; true",
            );
        }
    }
}

/// One failover after a power cut, in the successor's clock: power cut → DRBD there sees the peer
/// gone → may_promote:yes → the agent starts → the service is active.
#[derive(Debug, Clone, Copy)]
struct Failover {
    successor: usize,
    detect: f64,
    promotable: f64,
    delay: f64,
    start: f64,
    total: f64,
    /// Of `start`: the agent's StartUnit until DRBD was Primary.
    primary: f64,
    /// The clock-offset uncertainty of `detect` and `total`.
    error: f64,
}

/// Cuts the power of `victim` and measures until the services run on one of `survivors`.
fn power_cut_failover(lab: &Lab, victim: usize, survivors: [usize; 2], step: &str) -> Failover {
    let caps: Vec<_> = survivors
        .iter()
        .map(|&n| lab.events2_capture(n, "--timestamps --full"))
        .collect();
    let offsets: Vec<(f64, f64)> = survivors.iter().map(|&n| clock_offset(lab, n)).collect();
    let pid: i32 = std::fs::read_to_string(lab.run.join(format!("node{victim}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t_cut_host = host_now();
    // the SIGKILL that vm.sh kill sends, timed here; vm.sh then does the bookkeeping
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    lab.power_cut(victim);
    let t0 = Instant::now();
    let i = loop {
        if let Some(i) = (0..2).find(|&i| {
            lab.exec(survivors[i], &format!("systemctl is-active -q {SVC}"))
                .is_ok()
        }) {
            break i;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "[{step}] no survivor took over:\n{}",
            show(&views(lab, &survivors))
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let successor = survivors[i];
    let (offset, error) = offsets[i];
    let t_cut = t_cut_host + offset;
    let t_active: f64 = lab
        .sh(
            successor,
            &format!(
                "date -d \"$(systemctl show -P ActiveEnterTimestamp --timestamp=us+utc {SVC})\" +%s.%N"
            ),
        )
        .trim()
        .parse()
        .unwrap();
    let acting: Vec<f64> = agent_journal(lab, successor, t_cut - 1.0)
        .into_iter()
        .filter(|(t, l)| *t >= t_cut && l.contains("promoter: acting") && l.contains("\"start\""))
        .map(|(t, _)| t)
        .collect();
    let texts: Vec<String> = caps.into_iter().map(|c| c.stop()).collect();
    let text = &texts[i];
    let victim_name = format!("conn-name:node{victim} ");
    let mut t_detect = None;
    let mut t_edge = None;
    let mut t_primary = None;
    let mut may = false;
    let t_acting = *acting.last().expect("the agent's start");
    for l in text.lines() {
        let Some((ts, rest)) = l.split_once(' ') else {
            continue;
        };
        let Some(t) = events2_epoch(ts) else { continue };
        if rest.starts_with("change resource ") || rest.starts_with("exists resource ") {
            let yes = rest.contains(" may_promote:yes");
            if yes && !may && t <= t_acting {
                t_edge = Some(t);
            }
            may = yes;
            if t_primary.is_none() && rest.contains(" role:Primary ") && t >= t_acting {
                t_primary = Some(t);
            }
        }
        if t_detect.is_none()
            && t >= t_cut - error
            && rest.starts_with("change connection ")
            && rest.contains(&victim_name)
            && !rest.contains(" connection:Connected ")
        {
            t_detect = Some(t);
        }
    }
    let (Some(t_detect), Some(t_edge), Some(t_primary)) = (t_detect, t_edge, t_primary) else {
        panic!(
            "[{step}] incomplete events2 on node{successor}: {t_detect:?} {t_edge:?} {t_primary:?}\n{text}"
        );
    };
    let f = Failover {
        successor,
        detect: t_detect - t_cut,
        promotable: t_edge - t_detect,
        delay: t_acting - t_edge,
        start: t_active - t_acting,
        total: t_active - t_cut,
        primary: t_primary - t_acting,
        error,
    };
    eprintln!(
        "[{step}] failover node{victim} → node{successor}: {:.2} s = detection {:.2} (±{:.2}) + \
         to promotable {:.2} + promotion delay {:.2} + systemd start {:.2} (of which to Primary {:.2}); \
         starts by the agent: {}",
        f.total, f.detect, f.error, f.promotable, f.delay, f.start, f.primary, acting.len()
    );
    f
}

/// The agent's way from its start to its first decision, from its journal: each phase's distance from
/// the unit's start.
fn first_decision_breakdown(lab: &Lab, n: usize, since: f64) -> String {
    let out = lab.sh(
        n,
        &format!(
            "journalctl -o short-unix --no-pager --since @{since:.6} \
               -u {u} -u drbd-services@r0.target -u drbd-promote@r0.service | sed 's/\\x1b\\[[0-9;]*m//g'",
            u = Lab::AGENT_UNIT
        ),
    );
    let lines: Vec<(f64, &str)> = out
        .lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ')?;
            Some((t.parse().ok()?, rest))
        })
        .collect();
    let Some(t0) = lines
        .iter()
        .find(|(_, l)| l.contains("Started drbd-reactor-agent.service"))
        .map(|x| x.0)
    else {
        return format!("no start of the agent in the journal:\n{out}");
    };
    let marks = [
        "starting drbd-reactor agent",
        "serving /healthz",
        "started plugin instance",
        "connected to systemd",
        "unit files written",
        "drbdadm adjust done",
        "systemd daemon-reload done",
        "set up: deciding from here",
        "split-brain-avoidance detection done",
        "promoter: acting",
        "Starting drbd-promote@r0.service",
        "DRBD promoted, services started",
    ];
    let mut report = String::new();
    for m in marks {
        if let Some((t, l)) = lines.iter().find(|(_, l)| l.contains(m)) {
            let detail = l
                .split_whitespace()
                .filter(|w| w.starts_with("elapsed_ms="))
                .collect::<Vec<_>>()
                .join(" ");
            report.push_str(&format!("  +{:6.2} s  {m} {detail}\n", t - t0));
        }
    }
    report
}

fn failover_runs() -> usize {
    std::env::var("PROMOTER_FAILOVER_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn distribution(name: &str, mut xs: Vec<f64>) -> String {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = xs[xs.len() / 2];
    format!(
        "{name}: min {:.2} median {:.2} max {:.2} (n={})",
        xs[0],
        med,
        xs[xs.len() - 1],
        xs.len()
    )
}

/// drbd-utils' own templates (Debian 9.22), the production path.
#[test]
fn promoter_drbd_utils_templates() {
    let Some(lab) = super::lab("promoter_drbd_utils_templates") else {
        return;
    };
    let _case = lab.case();
    let t_case = Instant::now();
    prepare(lab);
    let pol = policy(&[MOUNT, SVC], false);

    // a) first start on exactly one node: node1, the most preferred.
    let since: Vec<f64> = NODES
        .iter()
        .map(|&n| clock_offset(lab, n).0 + host_now())
        .collect();
    for n in NODES {
        lab.set_policies(n, &[("r0.yaml", &pol)]);
        let t = start_agent(lab, n, "");
        eprintln!("node{n}: agent ready after {:.1} s", t.as_secs_f64());
    }
    let (vs, _) = exactly_one(lab, &NODES, 1, "a) first start");
    for v in &vs[1..] {
        assert_reason(lab, v, "standby", "peer node1 is Primary", "a) first start");
    }
    eprintln!(
        "[a) first start] node1, agent start to first decision ({}):\n{}",
        if std::env::var_os("LAB_AGENT_BIN").is_some() {
            "LAB_AGENT_BIN"
        } else {
            "this test build"
        },
        first_decision_breakdown(lab, 1, since[0] - 1.0)
    );
    // drbd-utils' templates are used as they are; Debian has no ocf.rs@, so the agent installed its own
    for n in NODES {
        let t = lab.sh(
            n,
            "systemctl show -P FragmentPath drbd-promote@r0.service drbd-services@r0.target; \
             ls /run/systemd/system/ | grep -E '^(drbd-|ocf)' | grep -v '\\.d$'; true",
        );
        assert!(
            t.contains("/lib/systemd/system/drbd-promote@.service")
                && t.contains("/lib/systemd/system/drbd-services@.target")
                && t.contains("ocf.rs@.service")
                && !t.contains("\ndrbd-promote@.service"),
            "node{n}: {t}"
        );
    }
    // the start units keep their own descriptions (the drop-ins no longer replace them)
    assert_eq!(descriptions(lab, 1), DESCRIPTIONS);
    // Debian's drbd-promote@ requires drbd@r0.target, whose drbd@.service runs `drbdadm adjust` (and
    // `down` when stopped): started with the promotion
    assert_eq!(
        lab.sh(1, "systemctl is-active drbd@r0.target").trim(),
        "active"
    );

    // g) agent restarted while the services run: nothing restarts.
    let before = service_identity(lab, 1);
    let t_restart = clock_offset(lab, 1).0 + host_now();
    lab.stop_agent(1);
    assert_eq!(
        lab.sh(1, &format!("systemctl is-active {SVC} {MOUNT}")),
        "active\nactive\n",
        "stopServicesOnExit: false: an agent that stops leaves the services"
    );
    start_agent(lab, 1, "");
    exactly_one(lab, &NODES, 1, "g) agent restarted");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        service_identity(lab, 1),
        before,
        "g) the services did not restart"
    );
    assert_eq!(actions_since(lab, 1, t_restart, "start"), 0);
    assert_eq!(actions_since(lab, 1, t_restart, "stop"), 0);
    exactly_one(lab, &NODES, 1, "g) still");

    // b) power cut of the active node → a survivor takes over (node2 by preference: its delay is one
    // second shorter than node3's; on these slow guests the start itself can take longer than that
    // second, and DRBD lets exactly one of them promote); e) node1 returns → fail-back to it.
    let mut failovers = Vec::new();
    for run in 1..=failover_runs() {
        let step = format!("b) power cut #{run}");
        let f = power_cut_failover(lab, 1, [2, 3], &step);
        failovers.push(f);
        let w = f.successor;
        let other = 5 - w;
        let (vs, _) = exactly_one(lab, &[2, 3], w, &step);
        assert_reason(
            lab,
            &vs[other - 2],
            "standby",
            &format!("peer node{w} is Primary"),
            &step,
        );
        let starts = lab.sh(w, "cat /mnt/r0/starts");
        assert!(
            starts.lines().any(|l| l.starts_with("node1 "))
                && starts
                    .lines()
                    .last()
                    .unwrap()
                    .starts_with(&format!("node{w} ")),
            "[{step}] the data moved with the services: {starts}"
        );
        // the promotion delay is the successor's rank (node2: 1 s, node3: 2 s), without a second for
        // the Consistent disk that DRBD reports in the line before the UpToDate of the same change
        // (measured from drbdsetup's time stamp to journald's of the agent's log line: on a loaded
        // machine that adds up to ~0.7 s; the bug added a whole second)
        let rank = (w - 1) as f64;
        assert!(
            (rank - 0.1..rank + 0.9).contains(&f.delay),
            "[{step}] promotion delay {:.2} s on node{w}, expected {rank} s",
            f.delay
        );

        let step = format!("e) node1 back #{run}");
        let t0 = Instant::now();
        lab.restart(1);
        let t_back = clock_offset(lab, w).0 + host_now();
        lab.set_policies(1, &[("r0.yaml", &pol)]);
        start_agent(lab, 1, "");
        let (vs, t) = exactly_one(lab, &NODES, 1, &step);
        eprintln!(
            "[{step}] boot to fail-back {:.1} s ({:.1} s after the agent was ready)",
            t0.elapsed().as_secs_f64(),
            t.as_secs_f64()
        );
        for v in &vs[1..] {
            assert_reason(lab, v, "standby", "peer node1 is Primary", &step);
        }
        let vw = &vs[w - 1];
        assert_eq!(vw.p["lastAction"]["action"], "stop", "{}", vw.line());
        // the old active node stopped for the fail-back and left the start to node1 (no race for it)
        let log = agent_journal(lab, w, t_back);
        assert!(
            log.iter()
                .any(|(_, l)| l.contains("fail-back to the more preferred node node1")),
            "{log:?}"
        );
        assert_eq!(
            actions_since(lab, w, t_back, "start"),
            0,
            "[{step}] node{w} raced node1"
        );
    }
    eprintln!("b) failover over {} power cut(s):", failovers.len());
    for (name, f) in [
        ("total", (|f: &Failover| f.total) as fn(&Failover) -> f64),
        ("detection", |f| f.detect),
        ("to promotable", |f| f.promotable),
        ("promotion delay", |f| f.delay),
        ("systemd start", |f| f.start),
        ("of which to Primary", |f| f.primary),
    ] {
        eprintln!(
            "  {}",
            distribution(name, failovers.iter().map(f).collect())
        );
    }
    eprintln!(
        "  successors: {:?}",
        failovers.iter().map(|f| f.successor).collect::<Vec<_>>()
    );

    // c) node1's links cut: it loses quorum and stops its services; node2 and node3 keep quorum and
    // one of them takes over.
    let t_iso = Instant::now();
    lab.isolate(1);
    lab.wait(
        1,
        "node1 stopped its services after losing quorum",
        &format!(
            "! systemctl is-active -q {SVC} && ! mountpoint -q /mnt/r0 && \
             [ \"$(drbdsetup status r0 --json | jq -r '.[0].role')\" = Secondary ]"
        ),
        Duration::from_secs(60),
    );
    let stopped = t_iso.elapsed();
    let (w, vs, _) = settle(lab, &[2, 3], &[2, 3], "c) node1 isolated");
    assert_reason(
        lab,
        &vs[(5 - w) - 2],
        "standby",
        &format!("peer node{w} is Primary"),
        "c) node1 isolated",
    );
    let v1 = view(lab, 1);
    assert!(
        !v1.quorum && v1.role == "Secondary" && !v1.runs(),
        "{}",
        v1.line()
    );
    assert_reason(lab, &v1, "blocked", "no quorum", "c) node1 isolated");
    assert_eq!(v1.p["lastAction"]["action"], "stop", "{}", v1.line());
    assert_eq!(v1.p["lastAction"]["result"], "ok", "{}", v1.line());
    eprintln!(
        "[c) node1 isolated] node1 stopped after {:.1} s, node{w} active after {:.1} s",
        stopped.as_secs_f64(),
        t_iso.elapsed().as_secs_f64()
    );
    // (2) the resource is still up on node1: stopping the services never stops drbd@r0.target
    assert_eq!(
        lab.sh(
            1,
            "systemctl is-active drbd@r0.target; drbdsetup status r0 | head -1"
        ),
        "active\nr0 role:Secondary\n"
    );

    // d) heal: node1 resyncs, and being preferred gets the services back; never two.
    let t_heal = clock_offset(lab, w).0 + host_now();
    lab.heal_all();
    exactly_one(lab, &NODES, 1, "d) healed");
    assert_eq!(
        actions_since(lab, w, t_heal, "start"),
        0,
        "[d) healed] node{w} raced node1"
    );

    // h) the policy changes to stopServicesOnExit: handed over to the new instance, nothing restarts;
    // then it is removed (on the standbys first): the services stop, DRBD stays up and Secondary.
    let before = service_identity(lab, 1);
    let stop_pol = policy(&[MOUNT, SVC], true);
    for n in NODES {
        lab.set_policies(n, &[("r0.yaml", &stop_pol)]);
    }
    std::thread::sleep(Duration::from_secs(4));
    exactly_one(lab, &NODES, 1, "h) policy changed");
    assert_eq!(
        service_identity(lab, 1),
        before,
        "h) handed over without a restart"
    );
    for n in [2, 3, 1] {
        lab.set_policies(n, &[]);
    }
    removed_everywhere(lab, "h) policy removed");
    assert_eq!(
        lab.sh(1, "systemctl is-active drbd@r0.target").trim(),
        "active",
        "the promoter never stops drbd@r0.target (its drbd@.service would take r0 down)"
    );
    eprintln!(
        "promoter_drbd_utils_templates: {:.0} s",
        t_case.elapsed().as_secs_f64()
    );
    cleanup(lab);
}

/// After the policy left every node: no services anywhere, no Primary, r0 still up and connected
/// (Secondary with quorum everywhere), no promoter instance, its files gone.
fn removed_everywhere(lab: &Lab, step: &str) {
    let t0 = Instant::now();
    loop {
        let vs = views(lab, &NODES);
        let ok = vs
            .iter()
            .all(|v| !v.runs() && v.role == "Secondary" && v.quorum && v.p.is_null());
        if ok {
            eprintln!(
                "[{step}] ({:.1} s)\n{}",
                t0.elapsed().as_secs_f64(),
                show(&vs)
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "[{step}] the services did not stop everywhere:\n{}",
            show(&vs)
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    for n in NODES {
        let left = lab.sh(
            n,
            &format!(
                "drbdadm cstate r0; ls /run/systemd/system/drbd-services@r0.target.d \
                 /run/systemd/system/{SVC}.d 2>&1 | grep reactor; true"
            ),
        );
        assert_eq!(left, "Connected\nConnected\n", "[{step}] node{n}");
    }
}

/// Our own templates (`--units-templates always`): the same start and stop; a start list that cannot
/// start backs off on every node.
#[test]
fn promoter_own_templates() {
    let Some(lab) = super::lab("promoter_own_templates") else {
        return;
    };
    let _case = lab.case();
    let t_case = Instant::now();
    prepare(lab);
    let pol = policy(&[MOUNT, SVC], true);
    for n in NODES {
        lab.set_policies(n, &[("r0.yaml", &pol)]);
        start_agent(lab, n, "--units-templates always");
    }
    // a) first start
    let (vs, _) = exactly_one(lab, &NODES, 1, "a) first start, own templates");
    for v in &vs[1..] {
        assert_reason(
            lab,
            v,
            "standby",
            "peer node1 is Primary",
            "a) own templates",
        );
    }
    for n in NODES {
        let t = lab.sh(
            n,
            "systemctl show -P FragmentPath drbd-promote@r0.service drbd-services@r0.target; \
             systemctl show -P Requires drbd-promote@r0.service; \
             head -1 /run/systemd/system/drbd-promote@.service",
        );
        assert!(
            t.contains("/run/systemd/system/drbd-promote@.service")
                && t.contains("/run/systemd/system/drbd-services@.target")
                && !t.contains("drbd@r0.target")
                && t.contains("# Auto-generated by drbd-reactor"),
            "node{n}: {t}"
        );
    }
    assert_eq!(descriptions(lab, 1), DESCRIPTIONS);
    // h) removed: services stopped, DRBD up and Secondary, as with drbd-utils' templates
    for n in [2, 3, 1] {
        lab.set_policies(n, &[]);
    }
    removed_everywhere(lab, "h) policy removed, own templates");

    // f) a start list with a service that cannot start: every node tries, fails 3 times 20 s apart and
    // backs off for 60 s (doubling with each further failure); no node runs anything meanwhile and the
    // attempts do not ping-pong. The nodes' failures are staggered (each waits for the others' failed
    // attempts), so a node may already be past its first backoff when the last one starts its own.
    let fail = policy(&[MOUNT, SVC, "lab-fail.service"], true);
    let t_f = Instant::now();
    for n in NODES {
        lab.set_policies(n, &[("r0.yaml", &fail)]);
    }
    // (failures, seconds of backoff left) from "start failed N×, backing off S s"
    let backoff = |v: &View| -> Option<(u64, u64)> {
        let r = v.reason().strip_prefix("start failed ")?;
        let (n, rest) = r.split_once("×, backing off ")?;
        let s = rest.strip_suffix(" s")?;
        Some((n.parse().ok()?, s.parse().ok()?))
    };
    let mut twice = Twice::default();
    loop {
        let vs = views(lab, &NODES);
        let primaries = vs.iter().filter(|v| v.role == "Primary").count();
        let runs = vs.iter().filter(|v| v.runs()).count();
        twice.check(
            (primaries > 1 || runs > 1).then(|| {
                format!(
                    "{primaries} Primaries, services on {runs} nodes:\n{}",
                    show(&vs)
                )
            }),
            "f",
        );
        if vs
            .iter()
            .all(|v| v.state() == "blocked" && backoff(v).is_some_and(|b| b.0 >= 3) && !v.runs())
        {
            eprintln!(
                "[f) failing start] every node backs off after {:.1} s:\n{}",
                t_f.elapsed().as_secs_f64(),
                show(&vs)
            );
            break;
        }
        assert!(
            t_f.elapsed() < Duration::from_secs(240),
            "[f] not every node backs off:\n{}",
            show(&vs)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    // Each node's backoff as shown, when it was read, and its counters right after: the guests are
    // read one after another, which takes seconds on a loaded machine, so every check below is against
    // that node's own read time.
    let counted = |lab: &Lab, n: usize| {
        (
            action_count(lab, n, "start", "failed"),
            action_count(lab, n, "start", "not-promoted"),
        )
    };
    // (read at, (shown failures, backoff left), (counted failed, not promoted))
    type Seen = (Instant, (u64, u64), (u64, u64));
    let seen: Vec<Seen> = NODES
        .iter()
        .map(|&n| {
            let t = Instant::now();
            let b = backoff(&view(lab, n)).unwrap_or((0, 0));
            (t, b, counted(lab, n))
        })
        .collect();
    eprintln!(
        "[f] per node (shown failures, backoff left; counted failed, not promoted): {:?}",
        seen.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>()
    );
    for (i, (t, (n, left), c)) in seen.iter().enumerate() {
        if (*left as f64) < t.elapsed().as_secs_f64() + 1.0 {
            continue; // it may have tried again since
        }
        assert_eq!(
            c.0,
            *n,
            "node{}: failed starts counted vs shown: {seen:?}",
            i + 1
        );
    }
    // A node whose backoff lasts beyond the next read of its counters (10 s on) tries nothing.
    std::thread::sleep(Duration::from_secs(10));
    let mut checked = 0;
    for (i, (t, (_, left), c)) in seen.iter().enumerate() {
        let c2 = counted(lab, i + 1);
        if (*left as f64) < t.elapsed().as_secs_f64() + 1.0 {
            continue;
        }
        checked += 1;
        assert!(
            c2 == *c,
            "[f] node{} tried during its backoff ({left} s left {:.1} s ago): {c:?} → {c2:?}\n{}\n--- its agent's log\n{}",
            i + 1,
            t.elapsed().as_secs_f64(),
            show(&views(lab, &NODES)),
            lab.agent_log(i + 1)
        );
    }
    assert!(checked > 0, "[f] no node was in a long backoff: {seen:?}");
    let vs = views(lab, &NODES);
    assert!(
        vs.iter().all(|v| v.role == "Secondary" && !v.runs()),
        "{}",
        show(&vs)
    );
    for n in NODES {
        lab.set_policies(n, &[]);
    }
    eprintln!(
        "promoter_own_templates: {:.0} s",
        t_case.elapsed().as_secs_f64()
    );
    cleanup(lab);
}
