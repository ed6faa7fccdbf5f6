//! The promoter's decisions, as pure functions: (per-resource state, input, clock) → actions, plus an
//! explanation of where the resource stands. No I/O, no sleeping: a delay is a deadline the caller wakes
//! up for ([`Res::next_wake`]), one per resource, so one resource waiting never blocks another.
//!
//! Semantics follow upstream drbd-reactor (reference §4.4.7) with these changes:
//! - delays are per-resource deadlines instead of sleeps of the whole plugin;
//! - a start attempted too soon after the previous one is postponed, not dropped;
//! - repeated start failures back off exponentially (no ping-pong between nodes);
//! - services that die within [`Timing::stable_after`] of their start count as a failed start;
//! - `disabled` and `evict` (maintenance) and the explanation of every state.

use super::spec::{OnDiskDetach, OnQuorumLoss, PreferredNodesPolicy, PromotedResource, Runner};
use crate::drbd::state::Resource;
use crate::drbd::{ConnState, DiskState, Role, Tri};
use crate::engine::update::{Change, Update};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Timings of the decisions (upstream's fixed values and this project's backoff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Minimum time between two starts of one resource (upstream: 20 s).
    pub min_start_interval: Duration,
    /// How often a promotable resource whose services are not running is retried (upstream: 20 s).
    pub retry_interval: Duration,
    /// Consecutive failed starts before backing off.
    pub backoff_after: u32,
    /// First backoff; doubles with every further failure up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Services that stop within this time of their start count as a failed start; running this long
    /// clears the failure count.
    pub stable_after: Duration,
    /// Retry of a failed split-brain-avoidance detection.
    pub detect_retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_start_interval: Duration::from_secs(20),
            retry_interval: Duration::from_secs(20),
            backoff_after: 3,
            backoff_base: Duration::from_secs(60),
            backoff_max: Duration::from_secs(600),
            stable_after: Duration::from_secs(60),
            detect_retry: Duration::from_secs(30),
        }
    }
}

/// The clock of one decision: monotonic for deadlines, wall time for what is shown.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

impl Now {
    pub fn real() -> Now {
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// Upstream's split-brain-avoidance policy of a resource, detected from `drbdsetup show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SbPolicy {
    Quorum,
    Fencing,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Detection {
    Unknown,
    Known(SbPolicy),
    Failed { error: String, at: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ActionKind {
    Start,
    Stop,
    Freeze,
    Thaw,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Start => "start",
            ActionKind::Stop => "stop",
            ActionKind::Freeze => "freeze",
            ActionKind::Thaw => "thaw",
        }
    }
}

/// What the effects layer is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the services (systemd: the target; shell: the start entries).
    Start,
    /// Stop the services (systemd: the target, which demotes DRBD; shell: the stop entries).
    Stop,
    Freeze,
    Thaw,
    /// Run the split-brain-avoidance detection (`drbdsetup show`); answer with [`Input::Detected`].
    Detect,
    /// Publish a notable event (log, and a Kubernetes Event in Kubernetes mode).
    Event {
        warning: bool,
        reason: &'static str,
        message: String,
    },
}

/// How an action ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Start only: DRBD did not become Primary here (another node won, or DRBD refused); not a failure
    /// of the services.
    NotPromoted(String),
    Failed(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotPromoted(_) => "not-promoted",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub enum Input<'a> {
    Update(&'a Update),
    /// A deadline passed (or a periodic check).
    Tick,
    Done(ActionKind, Outcome),
    /// The services' state as the service manager reports it (at start-up).
    Observed {
        active: bool,
        frozen: bool,
    },
    /// Result of [`Action::Detect`]: the policy and the configuration warnings, or why it failed.
    Detected(Result<(SbPolicy, Vec<String>), String>),
}

/// The configuration of one resource as the decisions need it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResConfig {
    pub spec: PromotedResource,
    /// This node's position in `preferredNodes` (its length when absent).
    pub my_rank: usize,
    /// This node is in `evict`.
    pub evicted: bool,
}

impl ResConfig {
    pub fn new(spec: PromotedResource, node: &str) -> ResConfig {
        let my_rank = spec
            .preferred_nodes
            .iter()
            .position(|n| n == node)
            .unwrap_or(spec.preferred_nodes.len());
        let evicted = spec.evict.iter().any(|n| n == node);
        ResConfig {
            spec,
            my_rank,
            evicted,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastAction {
    pub action: ActionKind,
    pub result: String,
    /// RFC 3339, UTC.
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The explanation shown in `/status`, metrics and the policy status.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    /// `active` (services run here), `standby` (could take over), `blocked` (cannot take over here),
    /// `disabled`, `evicted`.
    pub state: &'static str,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_action: Option<LastAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_brain_avoidance: Option<SbPolicy>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub start_failures: u32,
    pub frozen: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

pub const STATES: &[&str] = &["active", "standby", "blocked", "disabled", "evicted"];

/// The decision state of one resource.
#[derive(Debug, Clone)]
pub struct Res {
    pub cfg: ResConfig,
    drbd: Option<Arc<Resource>>,
    detection: Detection,
    detect_in_flight: bool,
    warnings: Vec<String>,
    /// A may_promote edge seen before the policy was known.
    edge_at: Option<Instant>,
    /// A scheduled start and why it waits.
    promote_at: Option<(Instant, String)>,
    /// The may_promote edge the scheduled start's delay counts from: while the start waits, the delay
    /// follows the state (a disk that becomes UpToDate shortens it).
    promote_edge: Option<Instant>,
    /// After stopping for a fail-back: no start here before this time, so that the more preferred node
    /// takes over (its start may take longer than the second its rank gains it), and why.
    hold: Option<(Instant, String)>,
    last_start: Option<Instant>,
    failures: u32,
    backoff_until: Option<Instant>,
    starting: bool,
    stopping: bool,
    /// Freeze or thaw in flight.
    freezing: bool,
    /// The services run here (as far as the promoter knows).
    active: bool,
    active_since: Option<Instant>,
    frozen: bool,
    last_action: Option<LastAction>,
    /// Why the last start did not promote, shown while standing by.
    note: Option<String>,
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, x) if x != 11 => "st",
        (2, x) if x != 12 => "nd",
        (3, x) if x != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Upstream's disk term of the promotion delay (seconds) for the worst local volume.
fn disk_penalty(d: &DiskState) -> u64 {
    match d {
        DiskState::UpToDate => 0,
        DiskState::Consistent => 1,
        DiskState::Outdated => 2,
        DiskState::Inconsistent => 3,
        _ => 6,
    }
}

/// Upstream's promotion delay: worst local disk + preferred-node rank + fencing delay (a peer not
/// connected) + 2 s for a Secondary under the freeze policy, times `sleepBeforePromoteFactor`. Returns
/// the delay and its terms in words.
pub fn promote_delay(cfg: &ResConfig, policy: SbPolicy, r: &Resource) -> (Duration, String) {
    let s = &cfg.spec;
    let mut secs = 0u64;
    let mut why = Vec::new();
    if let Some(worst) = r.devices.values().max_by_key(|d| disk_penalty(&d.disk)) {
        let p = disk_penalty(&worst.disk);
        if p > 0 {
            secs += p;
            why.push(format!("local disk {}", worst.disk));
        }
    }
    if !s.preferred_nodes.is_empty() && cfg.my_rank > 0 {
        secs += cfg.my_rank as u64;
        why.push(if cfg.my_rank >= s.preferred_nodes.len() {
            "not a preferred node".to_string()
        } else {
            format!("{} preferred node", ordinal(cfg.my_rank + 1))
        });
    }
    if policy == SbPolicy::Fencing
        && r.connections
            .values()
            .any(|c| c.connection != ConnState::Connected)
    {
        secs += s.fencing_promote_delay;
        why.push("fencing: a peer is not connected".to_string());
    }
    if policy == SbPolicy::Quorum
        && s.on_quorum_loss == OnQuorumLoss::Freeze
        && r.role != Role::Primary
    {
        secs += 2;
        why.push("freeze policy".to_string());
    }
    let secs = secs * u64::from(s.sleep_before_promote_factor);
    (Duration::from_secs(secs), why.join(", "))
}

fn no_quorum(r: &Resource) -> bool {
    r.devices.values().any(|d| d.quorum == Tri::No)
}

fn primary_peer(r: &Resource) -> Option<&str> {
    r.connections
        .values()
        .find(|c| c.peer_role == Role::Primary)
        .map(|c| c.conn_name.as_str())
}

/// Why DRBD does not let this node promote, in words.
fn not_promotable_reason(r: &Resource) -> String {
    if r.devices.is_empty() {
        return "no DRBD volume here".into();
    }
    if r.force_io_failures == Tri::Yes {
        return "DRBD is failing I/O (force-io-failures)".into();
    }
    let local_uptodate = r.devices.values().all(|d| d.disk == DiskState::UpToDate);
    let peer_uptodate = r.connections.values().any(|c| {
        c.peer_devices
            .values()
            .any(|p| p.peer_disk == DiskState::UpToDate)
    });
    if !local_uptodate && !peer_uptodate {
        let worst = r
            .devices
            .values()
            .map(|d| d.disk.as_str())
            .find(|d| *d != "UpToDate")
            .unwrap_or("?");
        return format!("no UpToDate data reachable (local disk {worst})");
    }
    "DRBD reports may_promote no".into()
}

/// RFC 3339 (UTC, seconds) of a wall-clock time.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn event(warning: bool, reason: &'static str, message: impl Into<String>) -> Action {
    Action::Event {
        warning,
        reason,
        message: message.into(),
    }
}

impl Res {
    pub fn new(cfg: ResConfig) -> Res {
        Res {
            cfg,
            drbd: None,
            detection: Detection::Unknown,
            detect_in_flight: false,
            warnings: Vec::new(),
            edge_at: None,
            promote_at: None,
            promote_edge: None,
            hold: None,
            last_start: None,
            failures: 0,
            backoff_until: None,
            starting: false,
            stopping: false,
            freezing: false,
            active: false,
            active_since: None,
            frozen: false,
            last_action: None,
            note: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.spec.name
    }

    pub fn active(&self) -> bool {
        self.active
    }

    fn hands_off(&self) -> bool {
        self.cfg.spec.disabled
    }

    fn policy(&self) -> Option<SbPolicy> {
        match self.detection {
            Detection::Known(p) => Some(p),
            _ => None,
        }
    }

    fn role_primary(&self) -> bool {
        self.drbd.as_ref().is_some_and(|r| r.role == Role::Primary)
    }

    fn may_promote(&self) -> bool {
        self.drbd
            .as_ref()
            .is_some_and(|r| r.may_promote == Tri::Yes)
    }

    /// One decision step.
    pub fn step(&mut self, input: Input<'_>, now: Now, t: &Timing) -> Vec<Action> {
        let mut out = Vec::new();
        if self.active
            && self
                .active_since
                .is_some_and(|s| now.mono >= s + t.stable_after)
        {
            self.failures = 0;
            self.backoff_until = None;
        }
        match input {
            Input::Update(u) => self.on_update(u, now, t, &mut out),
            Input::Tick => self.on_tick(now, t, &mut out),
            Input::Done(kind, outcome) => self.on_done(kind, outcome, now, t, &mut out),
            Input::Observed { active, frozen } => {
                if active && !self.active {
                    self.active = true;
                    // Running before we looked: not a fresh start that could still fail.
                    self.active_since = now.mono.checked_sub(t.stable_after);
                }
                self.frozen = frozen;
            }
            Input::Detected(r) => self.on_detected(r, now, t, &mut out),
        }
        self.enforce(&mut out);
        out
    }

    fn on_update(&mut self, u: &Update, now: Now, t: &Timing, out: &mut Vec<Action>) {
        let destroyed =
            u.event == crate::drbd::Verb::Destroy && matches!(u.change, Change::Resource { .. });
        self.drbd = if destroyed {
            None
        } else {
            Some(u.state.clone())
        };
        if destroyed {
            self.promote_at = None;
            return;
        }
        let detect = match self.detection {
            Detection::Unknown => true,
            Detection::Known(_) => false,
            // not on every update while it keeps failing
            Detection::Failed { at, .. } => now.mono >= at + t.detect_retry,
        };
        if detect && !self.detect_in_flight {
            self.detect_in_flight = true;
            out.push(Action::Detect);
        }
        // The shell runner has no unit to ask: a Primary here means its services run here.
        if self.cfg.spec.runner == Runner::Shell
            && self.role_primary()
            && !self.active
            && !self.stopping
        {
            self.active = true;
            self.active_since = Some(now.mono);
        }
        let policy = self.policy();
        match &u.change {
            Change::Resource { old, new } => {
                let (was, is) = (old.may_promote == Tri::Yes, new.may_promote == Tri::Yes);
                if !was && is {
                    self.on_promotable(now, t);
                } else if was && !is {
                    self.promote_at = None;
                    self.promote_edge = None;
                    self.edge_at = None;
                }
                if old.role == Role::Primary && new.role != Role::Primary {
                    self.on_demoted(now, t, out);
                }
            }
            Change::Device { old, new, .. } => {
                if policy != Some(SbPolicy::Fencing) {
                    if old.quorum == Tri::Yes && new.quorum == Tri::No {
                        self.on_quorum_lost(out);
                    } else if old.quorum != Tri::Yes && new.quorum == Tri::Yes {
                        self.on_quorum_regained(out);
                    }
                }
                if old.disk != DiskState::Diskless
                    && new.disk == DiskState::Diskless
                    && old.client != Tri::Yes
                    && new.client != Tri::Yes
                    && self.role_primary()
                {
                    self.on_disk_lost(out);
                }
            }
            Change::PeerDevice {
                peer_node_id,
                old,
                new,
                ..
            } if old.peer_disk != DiskState::UpToDate && new.peer_disk == DiskState::UpToDate => {
                self.maybe_fail_back(*peer_node_id, now, t, out);
            }
            _ => {}
        }
        self.follow_delay(t);
    }

    /// A start waiting for its promotion delay: the delay follows the state, counted from the same
    /// may_promote edge. Real DRBD prints a state change's resource line before its device lines, so when
    /// a Primary vanishes the survivors get `may_promote:yes` while their disk still shows Consistent,
    /// and the `disk:UpToDate` of the same change one line later; without this the Consistent second
    /// would stay in the delay.
    fn follow_delay(&mut self, t: &Timing) {
        if self.promote_at.is_none() {
            return;
        }
        let (Some(edge), Some(policy), Some(r)) =
            (self.promote_edge, self.policy(), self.drbd.clone())
        else {
            return;
        };
        let (delay, why) = promote_delay(&self.cfg, policy, &r);
        self.schedule(edge + delay, why, t);
    }

    /// may_promote went from no to yes: schedule a start after the promotion delay.
    fn on_promotable(&mut self, now: Now, t: &Timing) {
        self.note = None;
        if self.hands_off() || self.cfg.evicted {
            return;
        }
        let Some(policy) = self.policy() else {
            self.edge_at = Some(now.mono);
            return;
        };
        let Some(r) = self.drbd.clone() else { return };
        let (delay, why) = promote_delay(&self.cfg, policy, &r);
        self.promote_edge = Some(now.mono);
        self.schedule(now.mono + delay, why, t);
    }

    /// Sets the start deadline, no earlier than the minimum start interval and the backoff allow.
    fn schedule(&mut self, at: Instant, why: String, t: &Timing) {
        let mut at = at;
        let mut why = why;
        if let Some(ls) = self.last_start {
            if ls + t.min_start_interval > at {
                at = ls + t.min_start_interval;
                why = if why.is_empty() {
                    "minimum interval between starts".into()
                } else {
                    format!("{why}; minimum interval between starts")
                };
            }
        }
        if let Some(b) = self.backoff_until.filter(|b| *b > at) {
            at = b;
            why = format!("start failed {}×, backing off", self.failures);
        }
        if let Some((h, hwhy)) = self.hold.as_ref().filter(|h| h.0 > at) {
            at = *h;
            why = hwhy.clone();
        }
        self.promote_at = Some((at, why));
    }

    fn on_tick(&mut self, now: Now, t: &Timing, out: &mut Vec<Action>) {
        if let Detection::Failed { at, .. } = self.detection {
            if !self.detect_in_flight && now.mono >= at + t.detect_retry && self.drbd.is_some() {
                self.detect_in_flight = true;
                out.push(Action::Detect);
            }
        }
        if let Some((at, _)) = &self.promote_at {
            if now.mono >= *at {
                self.promote_at = None;
                self.try_start(now, t, out);
            }
            return;
        }
        if self.retry_at(t).is_some_and(|at| now.mono >= at) {
            self.try_start(now, t, out);
        }
    }

    /// When a promotable resource whose services do not run here is retried (upstream's 20 s ticker).
    fn retry_at(&self, t: &Timing) -> Option<Instant> {
        if !self.may_promote()
            || self.active
            || self.starting
            || self.stopping
            || self.hands_off()
            || self.cfg.evicted
            || self.policy().is_none()
            || self.promote_at.is_some()
        {
            return None;
        }
        let ls = self.last_start?;
        let at = ls + t.retry_interval.max(t.min_start_interval);
        let at = self.backoff_until.map_or(at, |b| b.max(at));
        Some(self.hold.as_ref().map_or(at, |h| h.0.max(at)))
    }

    fn try_start(&mut self, now: Now, t: &Timing, out: &mut Vec<Action>) {
        if self.hands_off()
            || self.cfg.evicted
            || self.policy().is_none()
            || !self.may_promote()
            || self.active
            || self.starting
            || self.stopping
        {
            return;
        }
        let due = [
            self.last_start.map(|l| l + t.min_start_interval),
            self.backoff_until,
            self.hold.as_ref().map(|h| h.0),
        ]
        .into_iter()
        .flatten()
        .max();
        if let Some(d) = due.filter(|d| *d > now.mono) {
            self.schedule(d, String::new(), t);
            return;
        }
        self.starting = true;
        self.last_start = Some(now.mono);
        self.promote_edge = None;
        self.hold = None;
        self.note = None;
        out.push(Action::Start);
    }

    fn stop(&mut self, out: &mut Vec<Action>, warning: bool, reason: &'static str, why: String) {
        self.promote_at = None;
        self.promote_edge = None;
        if self.stopping {
            return;
        }
        self.stopping = true;
        out.push(Action::Stop);
        out.push(event(warning, reason, format!("stopping services: {why}")));
    }

    fn on_demoted(&mut self, now: Now, t: &Timing, out: &mut Vec<Action>) {
        if self.stopping || self.starting {
            return;
        }
        if self.active {
            let quick = self
                .active_since
                .is_some_and(|s| now.mono < s + t.stable_after);
            if quick {
                self.count_failure(
                    now,
                    t,
                    "services stopped soon after their start".into(),
                    out,
                );
            }
            // DRBD was demoted under running services (the services failed, or a frozen Primary was
            // forced to Secondary): make sure nothing of them is left.
            self.stop(
                out,
                true,
                "ServicesStopped",
                "DRBD was demoted while the services ran here".into(),
            );
        }
    }

    fn on_quorum_lost(&mut self, out: &mut Vec<Action>) {
        self.promote_at = None;
        if self.hands_off() {
            return;
        }
        let running = self.active || self.starting || self.role_primary();
        if !running {
            return;
        }
        if self.cfg.spec.on_quorum_loss == OnQuorumLoss::Freeze
            && self.cfg.spec.runner == Runner::Systemd
        {
            if !self.frozen && !self.freezing && !self.stopping {
                self.freezing = true;
                out.push(Action::Freeze);
                out.push(event(
                    true,
                    "Freezing",
                    "lost quorum: freezing the services",
                ));
            }
        } else {
            self.stop(out, true, "QuorumLost", "lost quorum".into());
        }
    }

    fn on_quorum_regained(&mut self, out: &mut Vec<Action>) {
        if !self.frozen || self.freezing || self.hands_off() {
            return;
        }
        if self.role_primary() {
            self.freezing = true;
            out.push(Action::Thaw);
            out.push(event(
                false,
                "Thawing",
                "quorum is back: thawing the services",
            ));
        } else {
            self.stop(
                out,
                true,
                "QuorumRegained",
                "quorum is back but this node is no longer Primary".into(),
            );
        }
    }

    fn on_disk_lost(&mut self, out: &mut Vec<Action>) {
        if self.hands_off() {
            return;
        }
        let Some(r) = self.drbd.clone() else { return };
        match self.cfg.spec.on_disk_detach {
            OnDiskDetach::Ignore => out.push(event(
                true,
                "DiskDetached",
                "the local disk was detached; the services keep running diskless (onDiskDetach: ignore)",
            )),
            OnDiskDetach::FailOver => {
                let peer = r.connections.values().find(|c| {
                    c.peer_devices
                        .values()
                        .any(|p| p.peer_client != Tri::Yes && p.peer_disk == DiskState::UpToDate)
                });
                match peer {
                    Some(c) => self.stop(
                        out,
                        true,
                        "DiskDetached",
                        format!(
                            "the local disk was detached; failing over to {} (UpToDate)",
                            c.conn_name
                        ),
                    ),
                    None => out.push(event(
                        true,
                        "DiskDetached",
                        "the local disk was detached and no peer has UpToDate data: the services stay",
                    )),
                }
            }
        }
    }

    fn maybe_fail_back(&mut self, peer_node_id: u32, now: Now, t: &Timing, out: &mut Vec<Action>) {
        let s = &self.cfg.spec;
        if s.preferred_nodes.is_empty()
            || s.preferred_nodes_policy != PreferredNodesPolicy::Always
            || self.hands_off()
            || !self.role_primary()
            || !self.active
        {
            return;
        }
        let Some(r) = self.drbd.clone() else { return };
        let Some(peer) = r
            .connections
            .get(&peer_node_id)
            .map(|c| c.conn_name.clone())
        else {
            return;
        };
        if s.evict.contains(&peer) {
            return;
        }
        let Some(peer_rank) = s.preferred_nodes.iter().position(|n| *n == peer) else {
            return;
        };
        if peer_rank < self.cfg.my_rank {
            self.stop(
                out,
                false,
                "FailBack",
                format!("fail-back to the more preferred node {peer}"),
            );
            // Our own demotion makes us promotable again at once, and our one second of extra delay can
            // be less than the preferred node needs to reach `drbdsetup primary` (1.4 s on the QEMU
            // guests of the real-DRBD lab): we could win the race we just gave up, and then no fail-back
            // follows. Leave the start to the preferred node for the minimum start interval; if it does
            // not take over by then, we are a candidate again.
            self.hold = Some((
                now.mono + t.min_start_interval,
                format!("fail-back to {peer}: leaving the start to it"),
            ));
        }
    }

    fn count_failure(&mut self, now: Now, t: &Timing, msg: String, out: &mut Vec<Action>) {
        self.failures += 1;
        let n = self.failures;
        if n >= t.backoff_after {
            let exp = (n - t.backoff_after).min(16);
            let b = t
                .backoff_base
                .saturating_mul(1u32 << exp)
                .min(t.backoff_max);
            self.backoff_until = Some(now.mono + b);
            out.push(event(
                true,
                "StartFailed",
                format!("start failed {n}×: {msg}; backing off {} s", b.as_secs()),
            ));
        } else {
            out.push(event(
                true,
                "StartFailed",
                format!("start failed ({n}×): {msg}"),
            ));
        }
    }

    fn on_done(
        &mut self,
        kind: ActionKind,
        outcome: Outcome,
        now: Now,
        t: &Timing,
        out: &mut Vec<Action>,
    ) {
        let message = match &outcome {
            Outcome::Ok => None,
            Outcome::NotPromoted(m) | Outcome::Failed(m) => Some(m.clone()),
        };
        self.last_action = Some(LastAction {
            action: kind,
            result: outcome.label().to_string(),
            at: rfc3339(now.wall),
            message,
        });
        match kind {
            ActionKind::Start => {
                self.starting = false;
                if self.stopping {
                    return; // stopped meanwhile; the stop decides
                }
                match outcome {
                    Outcome::Ok => {
                        self.active = true;
                        self.active_since = Some(now.mono);
                        out.push(event(
                            false,
                            "Promoted",
                            "DRBD promoted, services started on this node",
                        ));
                    }
                    Outcome::NotPromoted(m) => {
                        self.note = Some(format!("last start did not promote DRBD: {m}"));
                        // Whatever the target started must not stay half up.
                        self.stop(
                            out,
                            false,
                            "NotPromoted",
                            format!("DRBD was not promoted here: {m}"),
                        );
                    }
                    Outcome::Failed(m) => {
                        self.count_failure(now, t, m.clone(), out);
                        self.stop(out, true, "StartFailed", format!("the start failed: {m}"));
                    }
                }
            }
            ActionKind::Stop => {
                self.stopping = false;
                self.active = false;
                self.active_since = None;
                self.frozen = false;
                if let Outcome::Failed(m) = outcome {
                    out.push(event(
                        true,
                        "StopFailed",
                        format!("stopping the services failed: {m}"),
                    ));
                }
                // Still promotable (e.g. a failed start that did not promote): the retry tick handles it.
            }
            ActionKind::Freeze => {
                self.freezing = false;
                match outcome {
                    Outcome::Ok => self.frozen = true,
                    _ => out.push(event(true, "FreezeFailed", "freezing the services failed")),
                }
                // Quorum came back while freezing.
                if self.frozen && !self.no_quorum() {
                    self.on_quorum_regained(out);
                }
            }
            ActionKind::Thaw => {
                self.freezing = false;
                match outcome {
                    Outcome::Ok => self.frozen = false,
                    _ => out.push(event(true, "ThawFailed", "thawing the services failed")),
                }
            }
        }
    }

    fn no_quorum(&self) -> bool {
        self.drbd.as_ref().is_some_and(|r| no_quorum(r))
    }

    fn on_detected(
        &mut self,
        r: Result<(SbPolicy, Vec<String>), String>,
        now: Now,
        t: &Timing,
        out: &mut Vec<Action>,
    ) {
        self.detect_in_flight = false;
        match r {
            Ok((policy, warnings)) => {
                let first = self.policy().is_none();
                self.detection = Detection::Known(policy);
                if first {
                    for w in &warnings {
                        out.push(event(true, "DrbdConfiguration", w.clone()));
                    }
                }
                self.warnings = warnings;
                if self.may_promote()
                    && self.promote_at.is_none()
                    && !self.active
                    && !self.starting
                    && !self.hands_off()
                    && !self.cfg.evicted
                {
                    let edge = self.edge_at.take().unwrap_or(now.mono);
                    if let Some(res) = self.drbd.clone() {
                        let (delay, why) = promote_delay(&self.cfg, policy, &res);
                        self.promote_edge = Some(edge);
                        self.schedule(edge + delay, why, t);
                    }
                }
            }
            Err(e) => {
                let repeated =
                    matches!(&self.detection, Detection::Failed { error, .. } if *error == e);
                if !repeated {
                    out.push(event(
                        true,
                        "Ignored",
                        format!("IGNORING the resource: {e}"),
                    ));
                }
                self.detection = Detection::Failed {
                    error: e,
                    at: now.mono,
                };
            }
        }
    }

    /// Maintenance: an evicted node runs no services.
    fn enforce(&mut self, out: &mut Vec<Action>) {
        if self.cfg.evicted && !self.hands_off() && (self.active || self.starting) {
            self.stop(
                out,
                false,
                "Evicted",
                "this node is in the evict list".into(),
            );
        }
    }

    /// Whether the reason shows a countdown that runs without a deadline of the decision's own (a
    /// backoff or a fail-back hold while another node is Primary): `/status` must keep refreshing it.
    pub fn shows_countdown(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|b| b > now) || self.hold.as_ref().is_some_and(|h| h.0 > now)
    }

    /// The next time this resource needs a [`Input::Tick`].
    pub fn next_wake(&self, t: &Timing) -> Option<Instant> {
        let detect = match self.detection {
            Detection::Failed { at, .. } if !self.detect_in_flight => Some(at + t.detect_retry),
            _ => None,
        };
        [
            self.promote_at.as_ref().map(|p| p.0),
            self.retry_at(t),
            detect,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Where the resource stands, and why.
    pub fn status(&self, now: Instant) -> Status {
        let (state, reason) = self.state_reason(now);
        Status {
            name: self.name().to_string(),
            state,
            reason,
            last_action: self.last_action.clone(),
            split_brain_avoidance: self.policy(),
            warnings: self.warnings.clone(),
            start_failures: self.failures,
            frozen: self.frozen,
        }
    }

    fn state_reason(&self, now: Instant) -> (&'static str, String) {
        let primary_here = self.role_primary();
        if self.hands_off() {
            return (
                "disabled",
                if self.active || primary_here {
                    "disabled in the policy; the services still run here".into()
                } else {
                    "disabled in the policy".into()
                },
            );
        }
        if self.cfg.evicted {
            return (
                "evicted",
                if self.stopping {
                    "this node is in the evict list: stopping the services".into()
                } else {
                    "this node is in the evict list".into()
                },
            );
        }
        if self.active {
            let r = if self.stopping {
                "stopping the services".to_string()
            } else if self.frozen {
                "services frozen here: no quorum".to_string()
            } else if self.freezing {
                "freezing or thawing the services".to_string()
            } else {
                "services run here".to_string()
            };
            return ("active", r);
        }
        let Some(r) = &self.drbd else {
            return (
                "blocked",
                "the DRBD resource does not exist on this node".into(),
            );
        };
        if let Detection::Failed { error, .. } = &self.detection {
            return ("blocked", format!("IGNORED: {error}"));
        }
        if self.starting {
            return ("standby", "starting the services".into());
        }
        if self.stopping {
            return ("standby", "stopping the services".into());
        }
        if no_quorum(r) {
            return ("blocked", "no quorum".into());
        }
        if let Some(p) = primary_peer(r) {
            return ("standby", format!("peer {p} is Primary"));
        }
        if primary_here {
            return (
                "blocked",
                "DRBD is Primary here but the promoter did not start the services".into(),
            );
        }
        if let Some(b) = self.backoff_until.filter(|b| *b > now) {
            return (
                "blocked",
                format!(
                    "start failed {}×, backing off {} s",
                    self.failures,
                    ceil_secs(b - now)
                ),
            );
        }
        if let Some((at, why)) = &self.promote_at {
            let secs = ceil_secs(at.saturating_duration_since(now));
            return (
                "standby",
                if why.is_empty() {
                    format!("starting in {secs} s")
                } else {
                    format!("waiting {secs} s: {why}")
                },
            );
        }
        if r.may_promote != Tri::Yes {
            return ("blocked", not_promotable_reason(r));
        }
        if self.policy().is_none() {
            return (
                "standby",
                "detecting the split-brain-avoidance policy".into(),
            );
        }
        if let Some(n) = &self.note {
            return ("standby", n.clone());
        }
        ("standby", "promotable".into())
    }
}

/// Upstream's split-brain-avoidance detection from `drbdsetup show --show-defaults --json RES`: the policy
/// (quorum off → Fencing, else Quorum) and the DRBD options that do not match the recommended ones.
/// `cgroup2`: the host has a unified cgroup hierarchy (needed to freeze).
pub fn detect_policy(
    show_json: &str,
    res: &PromotedResource,
    cgroup2: bool,
) -> Result<(SbPolicy, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_str(show_json).map_err(|e| format!("drbdsetup show: {e}"))?;
    let r = v
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| "drbdsetup show does not know the resource".to_string())?;
    let opt = |k: &str| -> String {
        match &r["options"][k] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "yes" } else { "no" }.to_string(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => String::new(),
        }
    };
    let conns: Vec<&serde_json::Value> = r["connections"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let net = |c: &serde_json::Value, k: &str| c["net"][k].as_str().unwrap_or("").to_string();
    let quorum = opt("quorum");
    let mut warn = Vec::new();
    let policy = if quorum == "off" {
        if conns.iter().any(|c| net(c, "fencing") == "dont-care") {
            return Err("quorum is 'off', but also fencing is 'dont-care'".into());
        }
        SbPolicy::Fencing
    } else {
        SbPolicy::Quorum
    };
    let mut want = |key: &str, value: String, expected: &str| {
        if value != expected {
            warn.push(format!(
                "DRBD option '{key}' should be '{expected}', but is '{value}'"
            ));
        }
    };
    want("auto-promote", opt("auto-promote"), "no");
    want(
        "on-suspended-primary-outdated",
        opt("on-suspended-primary-outdated"),
        "force-secondary",
    );
    if policy == SbPolicy::Quorum {
        want("quorum", quorum, "majority");
        let io = match res.on_quorum_loss {
            OnQuorumLoss::Shutdown => "io-error",
            OnQuorumLoss::Freeze => "suspend-io",
        };
        want("on-no-quorum", opt("on-no-quorum"), io);
        want("on-no-data-accessible", opt("on-no-data-accessible"), io);
        if res.on_quorum_loss == OnQuorumLoss::Freeze {
            for c in &conns {
                want("rr-conflict", net(c, "rr-conflict"), "retry-connect");
            }
            if !cgroup2 {
                warn.push(
                    "onQuorumLoss freeze needs the unified cgroup hierarchy (cgroup v2)".into(),
                );
            }
        }
    }
    if conns.is_empty() {
        warn.push("the resource has no peers: there is no node to fail over to".into());
    }
    warn.dedup();
    Ok((policy, warn))
}

#[cfg(test)]
mod tests;
