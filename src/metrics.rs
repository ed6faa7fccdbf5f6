//! The agent's own metrics (health of the event source, reloads, plugins), in one registry that the
//! HTTP server exposes next to the DRBD families.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub lines: IntCounter,
    pub malformed: IntCounter,
    pub capped: IntCounter,
    pub source_restarts: IntCounter,
    pub source_up: IntGauge,
    pub initial_dump_complete: IntGauge,
    pub reloads: IntCounterVec,
    pub plugin_instances: IntGaugeVec,
    pub plugin_errors: IntCounterVec,
    pub plugin_restarts: IntCounterVec,
    pub policies: IntGaugeVec,
    pub batch_seconds: Histogram,
    pub umh_runs: IntCounterVec,
    pub umh_duration: HistogramVec,
    pub promoter_actions: IntCounterVec,
    pub promoter_state: IntGaugeVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let r = Registry::new();
        let counter = |n: &str, h: &str| reg(&r, IntCounter::new(n, h).expect("valid metric"));
        let counter_vec = |n: &str, h: &str, l: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(n, h), l).expect("valid metric"),
            )
        };
        let gauge = |n: &str, h: &str| reg(&r, IntGauge::new(n, h).expect("valid metric"));
        let gauge_vec = |n: &str, h: &str, l: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(n, h), l).expect("valid metric"),
            )
        };
        AgentMetrics {
            lines: counter("drbdreactor_events2_lines_total", "events2 lines read from drbdsetup"),
            malformed: counter(
                "drbdreactor_events2_malformed_lines_total",
                "events2 lines that could not be parsed and were skipped",
            ),
            capped: counter(
                "drbdreactor_events2_capped_total",
                "Volumes, connections, paths and unknown keys left out because an object reached its limit",
            ),
            source_restarts: counter(
                "drbdreactor_drbdsetup_restarts_total",
                "Times the drbdsetup events2 process was (re)started after it exited or failed to start",
            ),
            source_up: gauge("drbdreactor_drbdsetup_up", "Whether the drbdsetup events2 process is running"),
            initial_dump_complete: gauge(
                "drbdreactor_initial_dump_complete",
                "Whether the initial events2 state dump of the current drbdsetup process is complete",
            ),
            reloads: counter_vec(
                "drbdreactor_reloads_total",
                "Policy reloads applied (result=ok) or rejected (result=error)",
                &["result"],
            ),
            plugin_instances: gauge_vec(
                "drbdreactor_plugin_instances",
                "Plugin instances by plugin type and state",
                &["type", "state"],
            ),
            plugin_errors: counter_vec(
                "drbdreactor_plugin_errors_total",
                "Plugin instances that ended with an error or a panic",
                &["type"],
            ),
            plugin_restarts: counter_vec(
                "drbdreactor_plugin_restarts_total",
                "Plugin instances restarted after a failure",
                &["type"],
            ),
            policies: gauge_vec(
                "drbdreactor_policies",
                "ReactorPolicies known to this agent, by whether they apply to this node and are valid",
                &["state"],
            ),
            batch_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "drbdreactor_engine_batch_duration_seconds",
                        "Time to apply one batch of events2 lines and fan the updates out",
                    )
                    .buckets(vec![0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0]),
                )
                .expect("valid metric"),
            ),
            umh_runs: counter_vec(
                "drbdreactor_umh_runs_total",
                "UMH script runs by policy, rule and result (exit code, 'signal-N', 'timeout', 'spawn-error', or 'dropped' when the run queue was full or the instance stopped)",
                &["policy", "rule", "result"],
            ),
            umh_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("drbdreactor_umh_run_duration_seconds", "Duration of UMH script runs")
                        .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0]),
                    &["policy", "rule"],
                )
                .expect("valid metric"),
            ),
            promoter_actions: counter_vec(
                "drbdreactor_promoter_actions_total",
                "Promoter actions by DRBD resource, action and result",
                &["resource", "action", "result"],
            ),
            promoter_state: gauge_vec(
                "drbdreactor_promoter_resource_state",
                "1 for the state a promoted DRBD resource is in on this node (active, standby, blocked, disabled, evicted), 0 for the others",
                &["resource", "state"],
            ),
            registry: r,
        }
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}
