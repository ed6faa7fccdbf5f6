//! Promoter plugin: keeps the services of a DRBD resource running on exactly one node, through the
//! host's systemd (see docs/promoter.md).
//!
//! Layers:
//! - [`spec`]: the `spec.promoter` section of a ReactorPolicy and its validation (pure);
//! - [`units`]: the generated systemd files (pure); written by [`crate::systemd::files`];
//! - [`decide`]: the decisions, per resource: (state, input, clock) → actions + explanation (pure);
//! - [`effects`]: the service manager and processes;
//! - [`ocf`]: the `drbd-reactor ocf-wrapper` subcommand that OCF units run;
//! - this module: the plugin task that drives them.

pub mod decide;
pub mod effects;
pub mod ocf;
pub mod spec;
pub mod units;

use super::{Delivery, Inbox, InstanceSpec, Plugin, PluginCtx, PluginError, Subscription};
use crate::systemd::files::{UnitDir, DEFAULT_UNIT_DIR, TEMPLATE_SEARCH};
use crate::systemd::ServiceManager;
use decide::{Action, ActionKind, Input, Now, Outcome, Res, ResConfig, SbPolicy, Timing};
use effects::Effects;
use futures::future::BoxFuture;
use futures::FutureExt;
use spec::{PromotedResource, PromoterSpec, Runner};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use units::{UnitCommands, UnitFile};

/// When to install the template units (`drbd-promote@.service`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Templates {
    /// Those that none of the search directories has.
    #[default]
    Auto,
    Always,
    Never,
}

/// What the agent gives every promoter instance.
#[derive(Clone)]
pub struct PromoterOptions {
    /// The host's service manager (`--systemd-bus`); without it, a policy with systemd-runner resources
    /// is rejected.
    pub manager: Option<Arc<dyn ServiceManager>>,
    /// Where unit files are written (`--unit-dir`, the host's `/run/systemd/system`).
    pub unit_dir: PathBuf,
    /// What the generated units run (`--units-drbdsetup`, `--units-ocf-wrapper`).
    pub units: UnitCommands,
    pub templates: Templates,
    /// Where the host's templates are looked for (as the agent sees them).
    pub template_search: Vec<PathBuf>,
    /// The agent's own drbdsetup (for `drbdsetup show`).
    pub drbdsetup: Vec<String>,
    /// The agent's drbdadm (for `drbdadm adjust`; empty = never).
    pub drbdadm: Vec<String>,
    /// Prefix that runs a program on the host (shell runner).
    pub host_exec: Vec<String>,
    pub timing: Timing,
    /// Shared by all instances of the agent: which instance manages which resource.
    pub registry: Arc<Registry>,
    /// Whether promoter policies are accepted (`--allow-promoter`; off in the chart's default,
    /// unprivileged install, which has no access to the host's systemd).
    pub enabled: bool,
}

impl Default for PromoterOptions {
    fn default() -> Self {
        PromoterOptions {
            manager: None,
            unit_dir: PathBuf::from(DEFAULT_UNIT_DIR),
            units: UnitCommands::default(),
            templates: Templates::Auto,
            template_search: TEMPLATE_SEARCH.iter().map(PathBuf::from).collect(),
            drbdsetup: vec!["drbdsetup".into()],
            drbdadm: Vec::new(),
            host_exec: Vec::new(),
            timing: Timing::default(),
            registry: Arc::new(Registry::default()),
            enabled: true,
        }
    }
}

impl std::fmt::Debug for PromoterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromoterOptions")
            .field("manager", &self.manager.as_ref().map(|_| "…"))
            .field("unit_dir", &self.unit_dir)
            .field("units", &self.units)
            .finish_non_exhaustive()
    }
}

/// Which promoter instance manages which DRBD resource. An instance claims its resources when it is
/// built, which happens before the instance it replaces runs its exit actions: that one then sees the
/// resource handed over and neither stops its services nor removes its files. At agent shutdown
/// ([`Registry::begin_shutdown`]) files stay (the next agent rewrites them), and only
/// `stopServicesOnExit` resources stop.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Debug, Default)]
struct RegistryInner {
    owners: HashMap<String, u64>,
    next: u64,
    shutting_down: bool,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent is stopping: instances that exit now are not being replaced.
    pub fn begin_shutdown(&self) {
        self.lock().shutting_down = true;
    }

    pub fn shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    fn claim(self: &Arc<Self>, resources: Vec<String>) -> Claim {
        let mut g = self.lock();
        g.next += 1;
        let token = g.next;
        for r in &resources {
            g.owners.insert(r.clone(), token);
        }
        Claim {
            registry: self.clone(),
            token,
            resources,
        }
    }

    fn owns(&self, token: u64, res: &str) -> bool {
        self.lock().owners.get(res) == Some(&token)
    }
}

/// An instance's claim on its resources; released when dropped (if not taken over meanwhile).
#[derive(Debug)]
struct Claim {
    registry: Arc<Registry>,
    token: u64,
    resources: Vec<String>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut g = self.registry.lock();
        for r in &self.resources {
            if g.owners.get(r) == Some(&self.token) {
                g.owners.remove(r);
            }
        }
    }
}

pub struct Promoter {
    resources: Vec<PromotedResource>,
    files: Vec<Vec<UnitFile>>,
    opts: PromoterOptions,
    claim: Claim,
}

fn config_err(e: impl std::fmt::Display) -> PluginError {
    PluginError::Config(e.to_string())
}

impl Promoter {
    pub fn from_spec(spec: &InstanceSpec, opts: &PromoterOptions) -> Result<Promoter, PluginError> {
        let cfg: PromoterSpec = serde_json::from_value(spec.config.clone())
            .map_err(|e| config_err(format!("spec.promoter: {e}")))?;
        spec::validate(&cfg, "spec.promoter").map_err(config_err)?;
        if !opts.enabled {
            return Err(config_err(
                "spec.promoter: this agent does not run the promoter (--allow-promoter=false; the chart's \
                 promoter.enabled is off: no access to the host's systemd, see docs/security.md)",
            ));
        }
        let systemd = cfg.resources.iter().any(|r| r.runner == Runner::Systemd);
        if systemd && opts.manager.is_none() {
            return Err(config_err(
                "spec.promoter: the systemd runner needs the host's service manager, and this agent has \
                 none: start it with --systemd-bus (or use runner: shell)",
            ));
        }
        let files = cfg
            .resources
            .iter()
            .map(|r| units::resource_files(r, &opts.units))
            .collect::<Result<Vec<_>, _>>()
            .map_err(config_err)?;
        let claim = opts
            .registry
            .claim(cfg.resources.iter().map(|r| r.name.clone()).collect());
        Ok(Promoter {
            resources: cfg.resources,
            files,
            opts: opts.clone(),
            claim,
        })
    }
}

/// Unit files not (all) in place: which resources lack theirs (all of them when the templates
/// failed), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesMissing {
    pub resources: std::collections::BTreeSet<String>,
    pub reason: String,
}

/// Writes templates and every resource's files; returns whether systemd must reload, and what failed. A
/// resource whose files fail does not keep the others from theirs.
fn write_files(
    dir: &UnitDir,
    files: &[(String, Vec<UnitFile>)],
    templates: Templates,
    search: &[PathBuf],
    any_systemd: bool,
) -> (bool, Result<(), FilesMissing>) {
    let mut changed = false;
    let mut errors = Vec::new();
    let mut missing = std::collections::BTreeSet::new();
    if any_systemd {
        match match templates {
            Templates::Auto => dir.ensure_templates(&units::templates(), search),
            Templates::Always => dir.ensure_templates(&units::templates(), &[]),
            Templates::Never => Ok(false),
        } {
            Ok(c) => changed |= c,
            Err(e) => {
                errors.push(format!("templates: {e}"));
                missing.extend(files.iter().map(|(r, _)| r.clone()));
            }
        }
    }
    for (res, f) in files {
        match dir.sync_resource(res, f) {
            Ok(c) => changed |= c,
            Err(e) => {
                errors.push(format!("{res}: {e}"));
                missing.insert(res.clone());
            }
        }
    }
    let r = if errors.is_empty() {
        Ok(())
    } else {
        Err(FilesMissing {
            resources: missing,
            reason: errors.join("; "),
        })
    };
    (changed, r)
}

/// First retry of unit files that could not be written; doubled up to [`FILES_RETRY_MAX`].
pub const FILES_RETRY: Duration = Duration::from_secs(1);
pub const FILES_RETRY_MAX: Duration = Duration::from_secs(30);

/// What an instance writes: its resources' files and, if any runs with systemd, the templates.
#[derive(Clone)]
struct FileSet {
    dir: UnitDir,
    batch: Vec<(String, Vec<UnitFile>)>,
    templates: Templates,
    search: Vec<PathBuf>,
    any_systemd: bool,
}

impl FileSet {
    /// Writes the files (on a blocking thread), then reloads systemd if anything changed. `Err` is the
    /// reason the files are not in place (for `/status` and the retry).
    async fn sync(
        &self,
        ctx: &PluginCtx,
        manager: Option<&Arc<dyn ServiceManager>>,
    ) -> Result<(), FilesMissing> {
        let t0 = Instant::now();
        let me = self.clone();
        let (changed, written) = tokio::task::spawn_blocking(move || {
            write_files(&me.dir, &me.batch, me.templates, &me.search, me.any_systemd)
        })
        .await
        .unwrap_or_else(|e| {
            let resources = self.batch.iter().map(|(r, _)| r.clone()).collect();
            (
                false,
                Err(FilesMissing {
                    resources,
                    reason: e.to_string(),
                }),
            )
        });
        tracing::debug!(target: "promoter", instance = %ctx.id, elapsed_ms = t0.elapsed().as_millis() as u64,
            changed, result = ?written, "unit files written");
        if changed {
            if let Some(m) = manager {
                let t0 = Instant::now();
                if let Err(e) = m.reload().await {
                    ctx.event(
                        true,
                        "ReloadFailed",
                        format!("systemd daemon-reload failed: {e}"),
                    );
                }
                tracing::debug!(target: "promoter", instance = %ctx.id,
                    elapsed_ms = t0.elapsed().as_millis() as u64, "systemd daemon-reload done");
            }
        }
        written
    }
}

/// What comes back from an effect task.
enum Back {
    Done(ActionKind, Outcome),
    Detected(Result<(SbPolicy, Vec<String>), String>),
}

struct Driver {
    res: Vec<Res>,
    specs: Vec<Arc<PromotedResource>>,
    index: HashMap<String, usize>,
    wakes: Vec<Option<Instant>>,
    states: Vec<&'static str>,
    /// Something changed since the detail was last published.
    dirty: bool,
    eff: Arc<Effects>,
    tx: mpsc::UnboundedSender<(usize, Back)>,
    ctx: PluginCtx,
    timing: Timing,
    /// Which unit files are not (all) written, and why, while they are retried. A resource without
    /// its files is not started (its target would come up without its units).
    files_error: Option<FilesMissing>,
}

impl Driver {
    fn step(&mut self, i: usize, input: Input<'_>) {
        let now = Now::real();
        let actions = self.res[i].step(input, now, &self.timing);
        self.dirty = true;
        for a in actions {
            self.dispatch(i, a);
        }
        self.wakes[i] = self.res[i].next_wake(&self.timing);
        let state = self.res[i].status(now.mono).state;
        if state != self.states[i] {
            let name = self.res[i].name().to_string();
            let g = &self.ctx.metrics.promoter_state;
            if !self.states[i].is_empty() {
                g.with_label_values(&[&name, self.states[i]]).set(0);
            }
            g.with_label_values(&[&name, state]).set(1);
            self.states[i] = state;
        }
    }

    fn dispatch(&self, i: usize, a: Action) {
        let spec = self.specs[i].clone();
        let eff = self.eff.clone();
        let tx = self.tx.clone();
        match a {
            Action::Event {
                warning,
                reason,
                message,
            } => self
                .ctx
                .event(warning, reason, format!("{}: {message}", spec.name)),
            Action::Detect => {
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let r = eff.detect(&spec).await;
                    tracing::debug!(target: "promoter", resource = %spec.name,
                        elapsed_ms = t0.elapsed().as_millis() as u64, ok = r.is_ok(), "split-brain-avoidance detection done");
                    let _ = tx.send((i, Back::Detected(r)));
                });
            }
            Action::Start
                if self
                    .files_error
                    .as_ref()
                    .is_some_and(|f| f.resources.contains(&spec.name)) =>
            {
                let why = format!(
                    "its unit files are not written yet: {}",
                    self.files_error
                        .as_ref()
                        .map(|f| f.reason.as_str())
                        .unwrap_or_default()
                );
                let _ = tx.send((i, Back::Done(ActionKind::Start, Outcome::Failed(why))));
            }
            Action::Start | Action::Stop | Action::Freeze | Action::Thaw => {
                let kind = match a {
                    Action::Start => ActionKind::Start,
                    Action::Stop => ActionKind::Stop,
                    Action::Freeze => ActionKind::Freeze,
                    _ => ActionKind::Thaw,
                };
                tracing::info!(target: "promoter", instance = %self.ctx.id, resource = %spec.name, action = kind.as_str(), "acting");
                let metrics = self.ctx.metrics.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    let o = eff.act(&spec, kind).await;
                    tracing::debug!(target: "promoter", resource = %spec.name, action = kind.as_str(),
                        elapsed_ms = t0.elapsed().as_millis() as u64, outcome = o.label(), "action done");
                    metrics
                        .promoter_actions
                        .with_label_values(&[&spec.name, kind.as_str(), o.label()])
                        .inc();
                    let _ = tx.send((i, Back::Done(kind, o)));
                });
            }
        }
    }

    fn publish(&mut self) {
        self.dirty = false;
        let now = Instant::now();
        let list: Vec<_> = self.res.iter().map(|r| r.status(now)).collect();
        let mut detail = serde_json::json!({ "resources": list });
        if let Some(e) = &self.files_error {
            detail["unitFiles"] = serde_json::json!({
                "state": crate::policy::status::STATE_DEGRADED,
                "reason": e.reason,
                "resources": e.resources,
            });
        }
        self.ctx.detail.set(detail);
    }
}

fn cgroup2() -> bool {
    std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

impl Plugin for Promoter {
    fn subscription(&self) -> Subscription {
        Subscription::CHANGES
    }

    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            let me = *self;
            let opts = me.opts.clone();
            let eff = Arc::new(Effects {
                manager: opts.manager.clone(),
                host_exec: opts.host_exec.clone(),
                drbdsetup: opts.drbdsetup.clone(),
                drbdadm: opts.drbdadm.clone(),
                node: ctx.node_name.clone(),
                cgroup2: cgroup2(),
            });
            let any_systemd = me.resources.iter().any(|r| r.runner == Runner::Systemd);
            let dir = UnitDir::new(&opts.unit_dir);

            // 1. Unit files, then one reload (on a slow host it takes seconds: 3-9 s on the QEMU guests
            // of the real-DRBD lab, most of an agent's time to its first decision). Files that cannot
            // be written are retried with a backoff, and shown as Degraded meanwhile.
            let t_setup = Instant::now();
            let files = FileSet {
                dir: dir.clone(),
                batch: me
                    .resources
                    .iter()
                    .map(|r| r.name.clone())
                    .zip(me.files.iter().cloned())
                    .collect(),
                templates: opts.templates,
                search: opts.template_search.clone(),
                any_systemd,
            };
            let mut files_error = files.sync(&ctx, opts.manager.as_ref()).await.err();
            let mut files_backoff = FILES_RETRY;
            let mut files_retry = None;
            if let Some(e) = &files_error {
                ctx.event(true, "UnitFiles", format!("writing unit files failed (retrying in {} s): {}", files_backoff.as_secs(), e.reason));
                files_retry = Some(Instant::now() + files_backoff);
            }

            // 2. The decision state, and what systemd says runs already.
            let (tx, mut rx) = mpsc::unbounded_channel();
            let n = me.resources.len();
            let mut run = Driver {
                res: me
                    .resources
                    .iter()
                    .map(|r| Res::new(ResConfig::new(r.clone(), &ctx.node_name)))
                    .collect(),
                specs: me.resources.iter().cloned().map(Arc::new).collect(),
                index: me
                    .resources
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.name.clone(), i))
                    .collect(),
                wakes: vec![None; n],
                states: vec![""; n],
                dirty: true,
                eff: eff.clone(),
                tx,
                ctx: ctx.clone(),
                timing: opts.timing.clone(),
                files_error: files_error.clone(),
            };
            let observed = futures::future::join_all(me.resources.iter().map(|r| eff.observe(r))).await;
            for (i, o) in observed.into_iter().enumerate() {
                let (active, frozen) = o.unwrap_or((false, false));
                run.step(i, Input::Observed { active, frozen });
            }

            // 3. drbdadm adjust, all resources at once, last: it may bring a resource up, and only once
            // the promoter can act on it. A returning preferred node whose disk became UpToDate before its
            // promoter was ready would make the Primary fail back to a node that cannot take over yet
            // (seen on real DRBD: with adjust side by side with a 9 s daemon-reload, the resync ended
            // first and a less preferred node won the race the fail-back opened).
            let adjusts = me
                .resources
                .iter()
                .filter(|r| r.adjust_resource_on_start && !r.disabled)
                .map(|r| {
                    let eff = eff.clone();
                    let name = r.name.clone();
                    async move {
                        let t0 = Instant::now();
                        let r = eff.adjust(&name).await;
                        tracing::debug!(target: "promoter", resource = %name,
                            elapsed_ms = t0.elapsed().as_millis() as u64, ok = r.is_ok(), "drbdadm adjust done");
                        (name.clone(), r)
                    }
                });
            for (name, r) in futures::future::join_all(adjusts).await {
                if let Err(e) = r {
                    ctx.event(true, "AdjustFailed", format!("{name}: {e}"));
                }
            }
            tracing::debug!(target: "promoter", instance = %ctx.id,
                elapsed_ms = t_setup.elapsed().as_millis() as u64, "set up: deciding from here");
            run.publish();

            // 4. Events (queued meanwhile), effect results and deadlines.
            let mut publish = tokio::time::interval(Duration::from_millis(500));
            publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let wake = run.wakes.iter().flatten().min().copied();
                tokio::select! {
                    d = inbox.recv() => match d {
                        Some(Delivery::Change(u)) => {
                            if let Some(&i) = run.index.get(u.resource.as_str()) {
                                run.step(i, Input::Update(&u));
                            }
                        }
                        Some(Delivery::Resources(_)) => {}
                        None => break,
                    },
                    Some((i, back)) = rx.recv() => match back {
                        Back::Done(k, o) => run.step(i, Input::Done(k, o)),
                        Back::Detected(r) => run.step(i, Input::Detected(r)),
                    },
                    _ = async { tokio::time::sleep_until(wake.expect("checked").into()).await }, if wake.is_some() => {
                        let now = Instant::now();
                        for i in 0..n {
                            if run.wakes[i].is_some_and(|w| w <= now) {
                                run.step(i, Input::Tick);
                            }
                        }
                    }
                    _ = async { tokio::time::sleep_until(files_retry.expect("checked").into()).await }, if files_retry.is_some() => {
                        match files.sync(&ctx, opts.manager.as_ref()).await {
                            Ok(()) => {
                                ctx.event(false, "UnitFiles", "unit files written");
                                files_error = None;
                                files_retry = None;
                                files_backoff = FILES_RETRY;
                            }
                            Err(e) => {
                                files_backoff = (files_backoff * 2).min(FILES_RETRY_MAX);
                                if files_error.as_ref() != Some(&e) {
                                    ctx.event(true, "UnitFiles", format!("writing unit files failed (retrying in {} s): {}", files_backoff.as_secs(), e.reason));
                                }
                                files_error = Some(e);
                                files_retry = Some(Instant::now() + files_backoff);
                            }
                        }
                        run.files_error = files_error.clone();
                        run.publish();
                    }
                    // Countdowns in the reasons ("waiting 3 s", "backing off 40 s") refresh while a
                    // deadline is pending or a backoff runs (also while another node is Primary: the
                    // backoff's end is then no deadline of the decision, and its text froze).
                    _ = publish.tick(), if run.dirty || wake.is_some() || run.res.iter().any(|r| r.shows_countdown(Instant::now())) => run.publish(),
                }
            }

            // 5. Exit: resources handed over to a successor are left alone.
            let shutting_down = opts.registry.shutting_down();
            let mut reload = false;
            for (i, spec) in me.resources.iter().enumerate() {
                let g = &ctx.metrics.promoter_state;
                for s in decide::STATES {
                    let _ = g.remove_label_values(&[spec.name.as_str(), s]);
                }
                if !opts.registry.owns(me.claim.token, &spec.name) {
                    continue;
                }
                let mut active = run.res[i].active();
                if spec.stop_services_on_exit && !spec.disabled {
                    ctx.event(false, "Exit", format!("{}: stopping services (stopServicesOnExit)", spec.name));
                    let o = eff.act(spec, ActionKind::Stop).await;
                    ctx.metrics
                        .promoter_actions
                        .with_label_values(&[&spec.name, "stop", o.label()])
                        .inc();
                    match o {
                        Outcome::Ok => active = false,
                        o => ctx.event(true, "StopFailed", format!("{}: {o:?}", spec.name)),
                    }
                }
                if shutting_down {
                    continue;
                }
                if active {
                    ctx.event(true, "FilesKept", format!(
                        "{}: no longer promoted by this policy, but its services still run here: its unit files stay so that stopping them still demotes DRBD", spec.name));
                    continue;
                }
                let d = dir.clone();
                let name = spec.name.clone();
                match tokio::task::spawn_blocking(move || d.remove_resource(&name)).await {
                    Ok(Ok(changed)) => reload |= changed,
                    Ok(Err(e)) => ctx.event(true, "UnitFiles", format!("{}: {e}", spec.name)),
                    Err(e) => ctx.event(true, "UnitFiles", format!("{}: {e}", spec.name)),
                }
            }
            if reload {
                if let Some(m) = &opts.manager {
                    if let Err(e) = m.reload().await {
                        ctx.event(true, "ReloadFailed", format!("systemd daemon-reload failed: {e}"));
                    }
                }
            }
            drop(me.claim);
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests;
