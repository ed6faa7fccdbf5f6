//! UMH plugin ("user mode helper"): rules on DRBD state changes and kernel helper events that run a
//! command or a script, safely.
//!
//! Layers:
//! - [`spec`]: the `spec.umh` section of a ReactorPolicy (YAML / CRD shape);
//! - [`rules`]: checking and compiling the spec, and deciding whether a rule fires on an update (pure);
//! - [`env`]: the environment of a run (pure);
//! - [`sched`]: the run queue, bounded, in order per resource (pure);
//! - [`exec`]: writing scripts and running processes (effects).
//!
//! Scripts are not read by the plugin: the agent resolves them into the instance configuration
//! ([`resolve_scripts`]) so that a changed script is a changed instance, reloaded on its own.

pub mod env;
pub mod exec;
pub mod rules;
pub mod sched;
pub mod spec;

use super::{Delivery, Inbox, InstanceSpec, Plugin, PluginCtx, PluginError, Subscription};
use crate::engine::update::Update;
use crate::ratelimit::LogLimit;
use futures::future::BoxFuture;
use futures::FutureExt;
use rules::{Action, Compiled, UmhError};
use serde::{Deserialize, Serialize};
use spec::{UmhSpec, Where};
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default `--host-exec`: run in the host's mount, UTS and network namespaces (PID 1 is the host's init
/// because the pod runs with hostPID), like the default `--drbdsetup`.
pub const DEFAULT_HOST_EXEC: &str = "nsenter --target 1 --mount --uts --net --";

/// Default `--umh-script-dir` (a tmpfs in the container).
pub const DEFAULT_SCRIPT_DIR: &str = "/run/drbd-reactor/umh";

/// Largest script the agent accepts.
pub const MAX_SCRIPT_BYTES: u64 = 1 << 20;

/// Time between SIGTERM and SIGKILL to a timed-out run's process group.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// What the agent gives every UMH instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UmhOptions {
    /// Private directory (mode 0700) scripts are written to and run from.
    pub script_dir: PathBuf,
    /// Command prefix for `where: host` (empty = run directly).
    pub host_exec: Vec<String>,
    /// Whether `where: host` rules are accepted (`--allow-host-commands`; off in the chart's default,
    /// unprivileged install: a policy with such a rule is then invalid, with the reason).
    pub host_commands: bool,
}

impl Default for UmhOptions {
    fn default() -> Self {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let script_dir = if uid == 0 {
            PathBuf::from(DEFAULT_SCRIPT_DIR)
        } else {
            std::env::temp_dir().join(format!("drbd-reactor-umh-{uid}"))
        };
        UmhOptions {
            script_dir,
            host_exec: shlex::split(DEFAULT_HOST_EXEC).unwrap_or_default(),
            host_commands: true,
        }
    }
}

/// The configuration of a UMH instance: the policy's section plus the scripts it references, resolved
/// by the agent (file mode: from the policy directory; Kubernetes mode: from ConfigMaps).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceConfig {
    pub spec: UmhSpec,
    /// By [`spec::ScriptRef::key`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scripts: BTreeMap<String, ScriptSource>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ScriptSource {
    /// Where it came from (a file path, or `configmap NAME key KEY`).
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Why it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl InstanceConfig {
    pub fn new(spec: UmhSpec) -> InstanceConfig {
        InstanceConfig {
            spec,
            scripts: BTreeMap::new(),
        }
    }
}

/// Checks a `spec.umh` section (pure); the error names the field (`spec.umh.device[0].new.role`).
pub fn validate(spec: &UmhSpec) -> Result<(), UmhError> {
    rules::compile(spec).map(|_| ())
}

/// Every script reference of a spec with its field path (`spec.umh.device[0].script`).
pub fn scripts_of(spec: &UmhSpec) -> Vec<(String, &spec::ScriptRef)> {
    let state = [
        ("resource", &spec.resource),
        ("device", &spec.device),
        ("peerDevice", &spec.peer_device),
        ("connection", &spec.connection),
    ];
    let mut out = Vec::new();
    for (k, list) in state {
        for (i, r) in list.iter().enumerate() {
            if let Some(s) = &r.script {
                out.push((format!("spec.umh.{k}[{i}].script"), s));
            }
        }
    }
    for (i, r) in spec.helper.iter().enumerate() {
        if let Some(s) = &r.script {
            out.push((format!("spec.umh.helper[{i}].script"), s));
        }
    }
    out
}

/// What file mode cannot do: ConfigMap scripts.
pub fn file_mode_check(spec: &UmhSpec) -> Result<(), UmhError> {
    for (path, s) in scripts_of(spec) {
        if s.config_map_ref.is_some() {
            return Err(UmhError {
                path: format!("{path}.configMapRef"),
                message: "ConfigMap scripts need Kubernetes mode; with --policy-dir give \
                          'script: {path: FILE}' relative to the policy directory"
                    .into(),
            });
        }
    }
    Ok(())
}

/// The interpreter line of a script: `#!/bin/sh` → `["/bin/sh"]`, `#!/usr/bin/env bash -e` →
/// `["/usr/bin/env", "bash -e"]` (like the kernel: everything after the interpreter is one argument).
pub fn shebang(content: &str) -> Result<Vec<String>, String> {
    let Some(rest) = content.strip_prefix("#!") else {
        return Err("does not start with a '#!' interpreter line".into());
    };
    let line = rest.lines().next().unwrap_or_default().trim();
    let (interp, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, a.trim()),
        None => (line, ""),
    };
    if interp.is_empty() {
        return Err("has an empty '#!' line".into());
    }
    let mut v = vec![interp.to_string()];
    if !arg.is_empty() {
        v.push(arg.to_string());
    }
    Ok(v)
}

fn read_script(dir: &Path, rel: &str) -> ScriptSource {
    let file = dir.join(rel);
    let origin = file.display().to_string();
    let fail = |error: String| ScriptSource {
        origin: origin.clone(),
        content: None,
        error: Some(error),
    };
    if let Err(e) = rules::check_relative(rel) {
        return fail(e);
    }
    match std::fs::metadata(&file) {
        Ok(md) if !md.is_file() => return fail(format!("{origin} is not a file")),
        Ok(md) if md.len() > MAX_SCRIPT_BYTES => {
            return fail(format!("{origin} is larger than {MAX_SCRIPT_BYTES} bytes"))
        }
        Ok(_) => {}
        Err(e) => return fail(format!("cannot read {origin}: {e}")),
    }
    match std::fs::read(&file) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(s) => match shebang(&s) {
                Ok(_) => ScriptSource {
                    origin,
                    content: Some(s),
                    error: None,
                },
                Err(e) => fail(format!("{origin} {e}")),
            },
            Err(_) => fail(format!("{origin} is not UTF-8 text")),
        },
        Err(e) => fail(format!("cannot read {origin}: {e}")),
    }
}

/// File mode: puts the content of every script of every UMH instance into its configuration, read from
/// `policy_dir`. Called on every scan of the policy directory, so an edited script changes its instance's
/// configuration and only that instance is reloaded. Problems are recorded for the factory to report.
pub fn resolve_scripts(specs: &mut [InstanceSpec], policy_dir: &Path) {
    for s in specs.iter_mut().filter(|s| s.id.kind == "umh") {
        let Ok(mut cfg) = serde_json::from_value::<InstanceConfig>(s.config.clone()) else {
            continue; // the factory reports it
        };
        let mut scripts = BTreeMap::new();
        for (_, r) in scripts_of(&cfg.spec) {
            let key = r.key();
            let src = match (&r.path, &r.config_map_ref) {
                (Some(p), _) => read_script(policy_dir, p),
                (None, Some(c)) => ScriptSource {
                    origin: format!("configmap {} key {}", c.name, c.key),
                    content: None,
                    error: Some("ConfigMap scripts need Kubernetes mode".into()),
                },
                (None, None) => continue,
            };
            scripts.insert(key, src);
        }
        cfg.scripts = scripts;
        if let Ok(v) = serde_json::to_value(&cfg) {
            s.config = v;
        }
    }
}

/// How one rule is run, prepared when the instance is built.
#[derive(Debug, Clone)]
struct Prepared {
    argv: Vec<String>,
    stdin: Option<Arc<Vec<u8>>>,
}

pub struct Umh {
    policy: String,
    compiled: Compiled,
    prepared: Vec<Prepared>,
}

fn config_err(e: impl std::fmt::Display) -> PluginError {
    PluginError::Config(e.to_string())
}

impl Umh {
    /// Checks the configuration, writes container scripts to `<script_dir>/<policy>/<rule>` and prepares
    /// each rule's command line.
    pub fn from_spec(spec: &InstanceSpec, opts: &UmhOptions) -> Result<Umh, PluginError> {
        let cfg: InstanceConfig = serde_json::from_value(spec.config.clone())
            .map_err(|e| config_err(format!("spec.umh: {e}")))?;
        let compiled = rules::compile(&cfg.spec).map_err(config_err)?;
        if !opts.host_commands {
            if let Some(r) = compiled.rules.iter().find(|r| r.location == Where::Host) {
                return Err(config_err(format!(
                    "{}: rule '{}' runs where: host, and this agent does not run host commands \
                     (--allow-host-commands=false; the chart's umh.hostCommands is off, see docs/security.md)",
                    r.path, r.name
                )));
            }
        }
        let policy = spec.id.policy.clone();
        let dir = opts.script_dir.join(&policy);
        let mut prepared = Vec::new();
        let mut written = Vec::new();
        for r in &compiled.rules {
            let host = r.location == Where::Host;
            let mut argv = if host {
                opts.host_exec.clone()
            } else {
                Vec::new()
            };
            let mut stdin = None;
            match &r.action {
                Action::Command(cmd) => argv.extend(cmd.iter().cloned()),
                Action::Script { key, path } => {
                    let content = match cfg.scripts.get(key) {
                        Some(ScriptSource {
                            content: Some(c), ..
                        }) => c,
                        Some(ScriptSource { error: Some(e), .. }) => {
                            return Err(config_err(format!("{path}: {e}")))
                        }
                        _ => {
                            return Err(config_err(format!(
                                "{path}: the script was not resolved (the agent reads scripts \
                                 from the policy directory, or ConfigMaps in Kubernetes mode)"
                            )))
                        }
                    };
                    if host {
                        // The host cannot see the container's files: the script goes in on stdin and
                        // its interpreter reads it from /dev/stdin; nothing is written on the host.
                        argv.extend(
                            shebang(content).map_err(|e| config_err(format!("{path}: {e}")))?,
                        );
                        argv.push("/dev/stdin".into());
                        stdin = Some(Arc::new(content.as_bytes().to_vec()));
                    } else {
                        if written.is_empty() {
                            exec::private_dir(&opts.script_dir).map_err(config_err)?;
                            exec::private_dir(&dir).map_err(config_err)?;
                        }
                        let file = exec::write_script(&dir, &r.name, content.as_bytes())
                            .map_err(config_err)?;
                        written.push(r.name.clone());
                        argv.push(file.display().to_string());
                    }
                }
            }
            if argv.is_empty() {
                return Err(config_err(format!("{}: nothing to run", r.path)));
            }
            prepared.push(Prepared { argv, stdin });
        }
        if dir.is_dir() {
            exec::remove_others(&dir, &written);
        }
        Ok(Umh {
            policy,
            compiled,
            prepared,
        })
    }
}

/// One matched rule waiting to run.
struct Job {
    rule: usize,
    resource: String,
    event: &'static str,
    env: BTreeMap<String, String>,
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Detail {
    rules: usize,
    running: usize,
    queued: usize,
    started: u64,
    failed: u64,
    timed_out: u64,
    dropped: u64,
}

impl Umh {
    /// The runs an update causes (pure): matching rules in order, each with its environment.
    fn plan(&self, node_name: &str, u: &Update) -> Vec<Job> {
        let ctx = env::EnvCtx {
            node_name,
            policy: &self.policy,
        };
        self.compiled
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches(u))
            .map(|(i, r)| Job {
                rule: i,
                resource: u.resource.clone(),
                event: rules::verb_name(u.event),
                env: env::build_env(ctx, r, u),
            })
            .collect()
    }

    fn request(&self, job: &Job) -> exec::RunRequest {
        let r = &self.compiled.rules[job.rule];
        let p = &self.prepared[job.rule];
        exec::RunRequest {
            argv: p.argv.clone(),
            env: job.env.clone(),
            stdin: p.stdin.clone(),
            timeout: r.timeout,
            kill_grace: KILL_GRACE,
            output_limit: self.compiled.limits.output_limit,
        }
    }
}

fn report(ctx: &PluginCtx, rule: &rules::Rule, job: &Job, res: &exec::RunResult) {
    let out = res.stdout.text();
    let err = res.stderr.text();
    let ms = res.duration.as_millis() as u64;
    let (inst, name, resource, event) = (&ctx.id, &rule.name, &job.resource, job.event);
    match &res.outcome {
        exec::Outcome::Exited(0) => {
            tracing::info!(target: "umh", instance = %inst, rule = %name, resource = %resource, event, exit_code = 0, duration_ms = ms, stdout = %out, stderr = %err, "rule ran")
        }
        exec::Outcome::Exited(c) => {
            tracing::warn!(target: "umh", instance = %inst, rule = %name, resource = %resource, event, exit_code = c, duration_ms = ms, stdout = %out, stderr = %err, "rule's command failed")
        }
        exec::Outcome::Signaled(s) => {
            tracing::warn!(target: "umh", instance = %inst, rule = %name, resource = %resource, event, signal = s, duration_ms = ms, stdout = %out, stderr = %err, "rule's command was killed by a signal")
        }
        exec::Outcome::TimedOut => {
            tracing::error!(target: "umh", instance = %inst, rule = %name, resource = %resource, event, timeout_s = rule.timeout.as_secs(), stdout = %out, stderr = %err, "rule's command timed out; its process group was killed")
        }
        exec::Outcome::SpawnError(e) => {
            tracing::error!(target: "umh", instance = %inst, rule = %name, resource = %resource, event, error = %e, "rule's command could not be started")
        }
    }
}

impl Plugin for Umh {
    fn subscription(&self) -> Subscription {
        Subscription::CHANGES
    }

    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            let me = Arc::new(*self);
            let limits = me.compiled.limits;
            let mut sched: sched::Scheduler<Job> =
                sched::Scheduler::new(limits.max_concurrent, limits.max_queued);
            let mut running: tokio::task::JoinSet<(bool, bool)> = tokio::task::JoinSet::new();
            let mut keys: std::collections::HashMap<tokio::task::Id, String> =
                std::collections::HashMap::new();
            let mut drop_log = LogLimit::new(10, Duration::from_secs(60));
            let mut detail = Detail {
                rules: me.compiled.rules.len(),
                ..Default::default()
            };
            for r in &me.compiled.rules {
                for res in ["0", "timeout", "dropped"] {
                    ctx.metrics
                        .umh_runs
                        .with_label_values(&[&me.policy, &r.name, res]);
                }
            }
            let count = |rule: &str, result: &str| {
                ctx.metrics
                    .umh_runs
                    .with_label_values(&[&me.policy, rule, result])
                    .inc();
            };
            let mut open = true;
            loop {
                while let Some((key, job)) = sched.next_run() {
                    detail.started += 1;
                    let me = me.clone();
                    let ctx = ctx.clone();
                    let handle = running.spawn(async move {
                        let rule = &me.compiled.rules[job.rule];
                        let res = AssertUnwindSafe(exec::run(me.request(&job)))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| exec::RunResult {
                                outcome: exec::Outcome::SpawnError("panicked".into()),
                                pid: None,
                                duration: Duration::ZERO,
                                stdout: Default::default(),
                                stderr: Default::default(),
                            });
                        report(&ctx, rule, &job, &res);
                        ctx.metrics
                            .umh_runs
                            .with_label_values(&[&me.policy, &rule.name, &res.outcome.label()])
                            .inc();
                        if !matches!(res.outcome, exec::Outcome::SpawnError(_)) {
                            ctx.metrics
                                .umh_duration
                                .with_label_values(&[&me.policy, &rule.name])
                                .observe(res.duration.as_secs_f64());
                        }
                        let failed = res.outcome != exec::Outcome::Exited(0);
                        let timed_out = res.outcome == exec::Outcome::TimedOut;
                        (failed, timed_out)
                    });
                    keys.insert(handle.id(), key);
                }
                detail.running = sched.running();
                detail.queued = sched.queued();
                ctx.detail.set(serde_json::to_value(&detail).unwrap_or_default());
                tokio::select! {
                    d = inbox.recv(), if open => match d {
                        Some(Delivery::Change(u)) => {
                            for job in me.plan(&ctx.node_name, &u) {
                                let rule = &me.compiled.rules[job.rule];
                                tracing::debug!(target: "umh", instance = %ctx.id, rule = %rule.name, resource = %u.resource, "rule matched");
                                let key = job.resource.clone();
                                if let Err(job) = sched.push(&key, job) {
                                    let rule = &me.compiled.rules[job.rule];
                                    detail.dropped += 1;
                                    count(&rule.name, "dropped");
                                    let v = drop_log.hit();
                                    if v.log || v.suppressed_before > 0 {
                                        tracing::warn!(target: "umh", instance = %ctx.id, rule = %rule.name, resource = %job.resource, max_queued = limits.max_queued, dropped_total = detail.dropped, not_logged = v.suppressed_before, "run queue full: run dropped (counted in drbdreactor_umh_runs_total{{result=\"dropped\"}}; at most 10 such lines a minute)");
                                    }
                                }
                            }
                        }
                        Some(Delivery::Resources(_)) => {}
                        None => {
                            // Stopped (reload or shutdown): runs already started finish (each within its
                            // timeout); queued ones are dropped.
                            open = false;
                            let dropped = sched.drain();
                            if !dropped.is_empty() {
                                tracing::warn!(target: "umh", instance = %ctx.id, dropped = dropped.len(), "instance stopping: queued runs dropped");
                            }
                            for job in dropped {
                                detail.dropped += 1;
                                count(&me.compiled.rules[job.rule].name, "dropped");
                            }
                        }
                    },
                    Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                        let id = match &done {
                            Ok((id, _)) => *id,
                            Err(e) => e.id(),
                        };
                        if let Some(key) = keys.remove(&id) {
                            sched.done(&key);
                        }
                        match done {
                            Ok((_, (failed, timed_out))) => {
                                detail.failed += u64::from(failed);
                                detail.timed_out += u64::from(timed_out);
                            }
                            // Not expected: the task catches panics.
                            Err(e) => tracing::error!(target: "umh", instance = %ctx.id, error = %e, "run task failed"),
                        }
                    }
                    else => break,
                }
            }
            Ok(())
        }
        .boxed()
    }
}
