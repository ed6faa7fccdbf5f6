//! Wires the agent together: event source → engine → plugin instances, policies, HTTP, signals.

use crate::engine::runtime::{self, EngineHandle, Health, RuntimeConfig, SourceMsg};
use crate::http::{self, HttpState, ListenAddr, PolicyStatus};
use crate::metrics::AgentMetrics;
use crate::plugins::prometheus::ExporterHub;
use crate::plugins::{Builtin, InstanceSpec, PluginFactory};
use crate::policy::files::{read_dir, PolicyDir};
use crate::policy::{desired_instances, policy_name};
use crate::source::{self, SourceConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub policy_dir: PathBuf,
    pub drbdsetup: Vec<String>,
    pub node_name: String,
    pub node_labels: BTreeMap<String, String>,
    pub statistics_interval: Duration,
    pub listen: ListenAddr,
    /// Bounds of the HTTP server.
    pub http: crate::http::HttpLimits,
    pub policy_poll: Duration,
    /// Command line of the host's drbdadm (for `drbd_version`); empty = not queried.
    pub drbdadm: Vec<String>,
    /// UMH scripts' private directory and the `--host-exec` prefix for `where: host`.
    pub umh: crate::plugins::umh::UmhOptions,
    /// Service manager, unit directory and unit commands of promoter instances.
    pub promoter: crate::plugins::promoter::PromoterOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    #[error("the engine stopped unexpectedly")]
    EngineGone,
    #[error("reading the policy directory failed: {0}")]
    PolicyReader(String),
}

/// Runs the agent in file mode until SIGTERM/SIGINT.
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let exporter = Arc::new(ExporterHub::new(opts.drbdadm.clone()));
    let factory = Builtin::new(exporter.clone())
        .with_umh(opts.umh.clone())
        .with_promoter(opts.promoter.clone());
    run_with_exporter(opts, Arc::new(factory), exporter).await
}

/// Runs the agent with another plugin factory; `/metrics` then has no DRBD families.
pub async fn run_with(
    opts: AgentOptions,
    factory: Arc<dyn PluginFactory>,
) -> Result<(), AgentError> {
    let exporter = Arc::new(ExporterHub::new(opts.drbdadm.clone()));
    run_with_exporter(opts, factory, exporter).await
}

/// Runs the agent; `/metrics` renders the DRBD families from `exporter`, the hub the factory's exporter
/// instances publish to.
pub async fn run_with_exporter(
    opts: AgentOptions,
    factory: Arc<dyn PluginFactory>,
    exporter: Arc<ExporterHub>,
) -> Result<(), AgentError> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;

    let metrics = AgentMetrics::new();
    // Series that exist from the start, so that rate() and absent() work before the first event.
    for result in ["ok", "error"] {
        metrics.reloads.with_label_values(&[result]);
    }
    for kind in ["debugger", "prometheus", "umh"] {
        metrics.plugin_errors.with_label_values(&[kind]);
        metrics.plugin_restarts.with_label_values(&[kind]);
    }
    let health = Arc::new(Health::default());
    let (src_tx, src_rx) = mpsc::channel::<SourceMsg>(64);
    let cfg = RuntimeConfig {
        node_name: opts.node_name.clone(),
        ..Default::default()
    };
    let (engine, engine_task) =
        runtime::spawn(cfg, factory, metrics.clone(), health.clone(), src_rx);

    let (stop_tx, stop_rx) = watch::channel(false);
    let src_cfg = SourceConfig::new(opts.drbdsetup.clone(), opts.statistics_interval);
    let source_task = tokio::spawn(source::run(src_cfg, src_tx, stop_rx.clone()));

    let policies = Arc::new(Mutex::new(PolicyStatus {
        source: opts.policy_dir.display().to_string(),
        ..Default::default()
    }));
    let http_state = HttpState {
        node_name: opts.node_name.clone(),
        health: health.clone(),
        engine: engine.clone(),
        metrics: metrics.clone(),
        policies: policies.clone(),
        exporter,
        limits: opts.http.clone(),
    };
    let http_task = tokio::spawn(serve_http(
        opts.listen.clone(),
        http_state,
        health.clone(),
        stop_rx.clone(),
    ));

    let mut dir = PolicyDir::new();
    let mut applied: Option<Vec<InstanceSpec>> = None;
    let mut tick = tokio::time::interval(opts.policy_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sighup.recv() => tracing::info!("SIGHUP: re-reading {}", opts.policy_dir.display()),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if let Err(AgentError::EngineGone) = sync_policies(
            &opts,
            &mut dir,
            &mut applied,
            &engine,
            &policies,
            &health,
            &metrics,
        )
        .await
        {
            break;
        }
    }
    tracing::info!("shutting down: stopping plugins");
    // Promoter instances now exit without a successor: only stopServicesOnExit resources stop, unit
    // files stay for the next agent.
    opts.promoter.registry.begin_shutdown();
    let r = engine.shutdown().await;
    let _ = stop_tx.send(true);
    let _ = engine_task.await;
    let _ = source_task.await;
    let _ = http_task.await;
    tracing::info!("stopped");
    r.map_err(|_| AgentError::EngineGone)
}

async fn sync_policies(
    opts: &AgentOptions,
    dir: &mut PolicyDir,
    applied: &mut Option<Vec<InstanceSpec>>,
    engine: &EngineHandle,
    status: &Arc<Mutex<PolicyStatus>>,
    health: &Health,
    metrics: &AgentMetrics,
) -> Result<(), AgentError> {
    // Reading and parsing (bounded: 1 MiB a file, YAML nesting limited by the parser) happen on a
    // blocking thread, so that a slow file system or a large file never holds up the async workers.
    let path = opts.policy_dir.clone();
    let mut taken = std::mem::take(dir);
    let (taken, read) = tokio::task::spawn_blocking(move || {
        let read = read_dir(&path).map(|files| taken.update(files));
        (taken, read)
    })
    .await
    .map_err(|e| {
        // `dir` starts afresh: the next scan reads every file again.
        tracing::error!(error = %e, "reading the policy directory failed");
        AgentError::PolicyReader(e.to_string())
    })?;
    *dir = taken;
    let new_problems = match read {
        Ok(p) => p,
        Err(e) => {
            // The directory is gone or unreadable: keep what runs.
            tracing::warn!(dir = %opts.policy_dir.display(), error = %e, "cannot read the policy directory; keeping the policies in force");
            return Ok(());
        }
    };
    for p in new_problems {
        tracing::error!(file = %p.file, error = %p.error, "rejected policy file; the policies in force stay");
    }
    let (policies, problems) = dir.policies();
    let mut desired = desired_instances(&policies, &opts.node_labels);
    let conflicts = crate::policy::promoter_conflicts(&policies, &opts.node_labels);
    for c in &conflicts {
        tracing::warn!(resource = %c.resource, winner = %c.winner, losers = ?c.losers, "{c}");
    }
    // Scripts are read on every scan: an edited script reloads its UMH instance only.
    crate::plugins::umh::resolve_scripts(&mut desired, &opts.policy_dir);
    let matching = desired
        .iter()
        .map(|s| s.id.policy.clone())
        .collect::<std::collections::BTreeSet<_>>();
    metrics
        .policies
        .with_label_values(&["applied"])
        .set(matching.len() as i64);
    metrics
        .policies
        .with_label_values(&["other-nodes"])
        .set((policies.len() - matching.len().min(policies.len())) as i64);
    metrics
        .policies
        .with_label_values(&["invalid"])
        .set(problems.len() as i64);
    {
        let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
        st.applied = policies
            .iter()
            .filter(|p| matching.contains(policy_name(p)))
            .map(|p| policy_name(p).to_string())
            .collect();
        st.problems = problems;
        st.problems
            .extend(conflicts.iter().map(|c| crate::policy::files::FileProblem {
                file: format!("policy {}", c.losers.join(", ")),
                error: c.to_string(),
            }));
    }
    if applied.as_ref() != Some(&desired) {
        let report = engine
            .apply(desired.clone())
            .await
            .map_err(|_| AgentError::EngineGone)?;
        for (id, e) in &report.errors {
            tracing::error!(instance = %id, error = %e, "plugin instance not started");
        }
        *applied = Some(desired);
        health.policies_loaded.store(true, Ordering::Relaxed);
    }
    Ok(())
}

pub(crate) async fn serve_http(
    addr: ListenAddr,
    st: HttpState,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_secs(1);
    let listener = loop {
        match http::bind(&addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?delay, "HTTP endpoints (health, status, metrics) are NOT available");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    match listener.local_addr() {
        Ok(a) => tracing::info!(address = %a, "serving /healthz, /readyz, /status, /metrics"),
        Err(_) => tracing::info!("serving HTTP"),
    }
    health.http_bound.store(true, Ordering::Relaxed);
    let limits = st.limits.clone();
    // Unconstrained: under a flood of connections the accept loop drains the kernel's (small) accept
    // queue instead of yielding to the connection tasks it spawns, which the other workers run.
    tokio::task::unconstrained(http::server::serve(listener, st, limits, stop)).await;
}
