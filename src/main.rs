use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use drbd_reactor::agent::{self, AgentOptions};
use drbd_reactor::http::ListenAddr;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The host's drbdsetup, run in the host's mount namespace (its binary, libraries and /etc/drbd.conf) and
/// UTS namespace (the host's node name, which drbdadm matches against `on <host>` sections). PID 1 is
/// the host's init because the pod runs with hostPID. Not the network namespace: DRBD 9's
/// generic-netlink family answers in every network namespace (tests/real_drbd.rs `netns`, on the
/// real kernel module), so `events2` works from the pod's own.
const DEFAULT_DRBDSETUP: &str = "nsenter --target 1 --mount --uts -- drbdsetup";

/// The host's drbdadm, run like drbdsetup (only `drbdadm --version`, for the `drbd_version` metric).
const DEFAULT_DRBDADM: &str = "nsenter --target 1 --mount --uts -- drbdadm";

#[derive(Parser)]
#[command(
    name = "drbd-reactor",
    version,
    about = "Reacts to DRBD state changes: metrics, scripts, HA promotion"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<AgentArgs>),
    /// Print the ReactorPolicy CustomResourceDefinition as YAML (the copy in crds/ must match it:
    /// `cargo run -- crd > crds/reactorpolicies.reactor.drbd.io.yaml`).
    Crd,
    /// Run an OCF resource agent as a systemd service (what the promoter's OCF units run): `$AGENT
    /// start`, then `monitor` every `$monitor_interval` s, `stop` on SIGTERM; `stop` for ExecStopPost.
    OcfWrapper {
        /// `start-and-monitor` or `stop`.
        verb: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SystemdVia {
    /// D-Bus through the bus daemon at --systemd-bus.
    Dbus,
    /// `systemctl` on the host through --host-exec (hosts without a bus daemon, e.g. kind nodes).
    Systemctl,
}

#[derive(Clone, Copy, ValueEnum)]
enum UnitTemplates {
    /// Install the templates none of /etc/systemd/system, /usr/lib/systemd/system, /lib/systemd/system has.
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Run from ReactorPolicy YAML files in this directory (re-read every second and on SIGHUP).
    #[arg(long, env = "POLICY_DIR")]
    policy_dir: Option<PathBuf>,
    /// Command line of drbdsetup (split like a shell splits words, never run through a shell);
    /// drbdsetup's arguments are appended.
    #[arg(long, env = "DRBDSETUP", default_value = DEFAULT_DRBDSETUP)]
    drbdsetup: String,
    /// Command line of drbdadm, run like --drbdsetup; used for `drbdadm --version` (the `drbd_version`
    /// metric).
    #[arg(long, env = "DRBDADM", default_value = DEFAULT_DRBDADM)]
    drbdadm: String,
    /// Command prefix that runs a program on the host, for UMH rules with `where: host` (split like
    /// --drbdsetup; the program and its arguments are appended; empty = run directly). Default: the
    /// host's mount, UTS and network namespaces through nsenter (host scripts expect the host's network).
    #[arg(long, env = "HOST_EXEC", default_value = drbd_reactor::plugins::umh::DEFAULT_HOST_EXEC)]
    host_exec: String,
    /// Accept UMH rules with `where: host` (false: a policy with one is invalid; the chart's unprivileged
    /// default install sets false).
    #[arg(long, env = "ALLOW_HOST_COMMANDS", default_value_t = true, action = clap::ArgAction::Set)]
    allow_host_commands: bool,
    /// Accept promoter policies (false: a policy with a promoter section is invalid; the chart's
    /// unprivileged default install sets false).
    #[arg(long, env = "ALLOW_PROMOTER", default_value_t = true, action = clap::ArgAction::Set)]
    allow_promoter: bool,
    /// Private directory (created with mode 0700) UMH scripts are written to and run from.
    #[arg(long, env = "UMH_SCRIPT_DIR", default_value = drbd_reactor::plugins::umh::DEFAULT_SCRIPT_DIR)]
    umh_script_dir: PathBuf,
    /// This node's name (default: the host name). In Kubernetes mode the name of the Node object (downward
    /// API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Kubernetes mode: the agent's own namespace (downward API `metadata.namespace`); UMH ConfigMap
    /// scripts are read from it only.
    #[arg(long, env = "POD_NAMESPACE", default_value = "drbd-reactor")]
    namespace: String,
    /// Kubernetes mode: quiet time in milliseconds after a change of policies, the Node's labels or
    /// ConfigMaps before the plugin set is recomputed.
    #[arg(long, env = "DEBOUNCE_MS", default_value_t = 200)]
    debounce_ms: u64,
    /// Kubernetes mode: seconds between checks of this node's status entries (written when they changed).
    #[arg(long, env = "STATUS_INTERVAL", default_value_t = 2)]
    status_interval: u64,
    /// Kubernetes mode: seconds between sweeps that remove status entries of deleted Nodes.
    #[arg(long, env = "STALE_ENTRY_SWEEP_INTERVAL", default_value_t = 300)]
    stale_entry_sweep_interval: u64,
    /// This node's labels for policy nodeSelectors in file mode, as `key=value,key=value`.
    #[arg(long, env = "NODE_LABELS", default_value = "")]
    node_labels: String,
    /// Seconds between statistics refreshes (`n` written to `events2 --poll`).
    #[arg(long, env = "STATISTICS_INTERVAL", default_value_t = 60)]
    statistics_interval: u64,
    /// HTTP listen address: `:PORT` for all addresses (IPv6, falling back to IPv4), or `IP:PORT`.
    #[arg(long, env = "LISTEN", default_value = ":9942")]
    listen: String,
    /// Most HTTP connections open at once (also at most half the open-file limit); a new one over the
    /// limit closes the oldest connection without a request in flight.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 512)]
    http_max_connections: usize,
    /// Most HTTP requests in flight at once besides /healthz and /readyz (/metrics, /status, ...);
    /// more are answered 503 with Retry-After.
    #[arg(long, env = "HTTP_MAX_REQUESTS", default_value_t = 4)]
    http_max_requests: usize,
    /// Seconds a client has to send a complete request head; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT", default_value_t = 10)]
    http_header_timeout: u64,
    /// Seconds a response may take to be sent (a client that does not read is disconnected).
    #[arg(long, env = "HTTP_RESPONSE_TIMEOUT", default_value_t = 30)]
    http_response_timeout: u64,
    /// Seconds between scans of the policy directory (SIGHUP scans at once).
    #[arg(long, env = "POLICY_POLL_INTERVAL", default_value_t = 1)]
    policy_poll_interval: u64,
    /// D-Bus address of the bus the host's systemd is on (the host's `/run/dbus` mounted into the pod).
    /// Connected on first use, and again after the bus went away.
    #[arg(long, env = "SYSTEMD_BUS", default_value = drbd_reactor::systemd::DEFAULT_BUS)]
    systemd_bus: String,
    /// How to reach the host's systemd: `dbus` (--systemd-bus), or `systemctl` run through --host-exec,
    /// for hosts without a bus daemon.
    #[arg(long, env = "SYSTEMD_VIA", value_enum, default_value_t = SystemdVia::Dbus)]
    systemd_via: SystemdVia,
    /// Seconds a systemd start/stop job may take before the agent stops waiting for it.
    #[arg(long, env = "SYSTEMD_JOB_TIMEOUT", default_value_t = 300)]
    systemd_job_timeout: u64,
    /// Directory the promoter writes its systemd units and drop-ins to (the host's /run/systemd/system,
    /// mounted into the pod).
    #[arg(long, env = "UNIT_DIR", default_value = drbd_reactor::systemd::files::DEFAULT_UNIT_DIR)]
    unit_dir: PathBuf,
    /// The drbdsetup command line written into the promoter's units (split like a shell splits words);
    /// the units run on the host, so this is the host's drbdsetup.
    #[arg(long, env = "UNITS_DRBDSETUP", default_value = "drbdsetup")]
    units_drbdsetup: String,
    /// The `drbd-reactor ocf-wrapper` command line written into OCF units, as the host sees it
    /// (default: this binary's path and `ocf-wrapper`).
    #[arg(long, env = "UNITS_OCF_WRAPPER")]
    units_ocf_wrapper: Option<String>,
    /// OCF_ROOT for OCF units (agents are OCF_ROOT/resource.d/VENDOR/AGENT on the host).
    #[arg(long, env = "UNITS_OCF_ROOT", default_value = "/usr/lib/ocf")]
    units_ocf_root: String,
    /// Whether the promoter installs the template units (drbd-promote@.service, drbd-services@.target,
    /// drbd-demote-or-escalate@.service, ocf.rs@.service) into --unit-dir.
    #[arg(long, env = "UNITS_TEMPLATES", value_enum, default_value_t = UnitTemplates::Auto)]
    units_templates: UnitTemplates,
    /// Log format on stderr.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().flatten_event(true).init(),
    }
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for kv in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("node label '{kv}' is not key=value"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

async fn agent_main(a: AgentArgs) -> Result<()> {
    let Some(policy_dir) = a.policy_dir.clone() else {
        return k8s_main(a).await;
    };
    if !policy_dir.is_dir() {
        bail!("--policy-dir {}: not a directory", policy_dir.display());
    }
    let drbdsetup = shlex::split(&a.drbdsetup).context("--drbdsetup: unbalanced quotes")?;
    if drbdsetup.is_empty() {
        bail!("--drbdsetup is empty");
    }
    let drbdadm = shlex::split(&a.drbdadm).context("--drbdadm: unbalanced quotes")?;
    let host_exec = shlex::split(&a.host_exec).context("--host-exec: unbalanced quotes")?;
    if a.statistics_interval == 0 {
        bail!("--statistics-interval must be at least 1 second");
    }
    let listen: ListenAddr = a.listen.parse()?;
    let http = http_limits(&a)?;
    let promoter = promoter_options(&a, &drbdsetup, &drbdadm, &host_exec)?;
    let opts = AgentOptions {
        policy_dir,
        drbdsetup,
        node_name: a.node_name.unwrap_or_else(hostname),
        node_labels: parse_labels(&a.node_labels)?,
        statistics_interval: Duration::from_secs(a.statistics_interval),
        listen,
        http,
        policy_poll: Duration::from_secs(a.policy_poll_interval.max(1)),
        drbdadm,
        umh: drbd_reactor::plugins::umh::UmhOptions {
            script_dir: a.umh_script_dir,
            host_exec,
            host_commands: a.allow_host_commands,
        },
        promoter,
    };
    tracing::info!(node = %opts.node_name, drbdsetup = ?opts.drbdsetup, policy_dir = %opts.policy_dir.display(), "starting drbd-reactor agent");
    agent::run(opts).await?;
    Ok(())
}

/// The promoter's options, shared by file mode and Kubernetes mode.
fn promoter_options(
    a: &AgentArgs,
    drbdsetup: &[String],
    drbdadm: &[String],
    host_exec: &[String],
) -> Result<drbd_reactor::plugins::promoter::PromoterOptions> {
    if a.systemd_job_timeout == 0 {
        bail!("--systemd-job-timeout must be at least 1 second");
    }
    let systemd = drbd_reactor::systemd::SystemdOptions {
        via: match a.systemd_via {
            SystemdVia::Dbus => drbd_reactor::systemd::SystemdVia::Dbus {
                address: a.systemd_bus.clone(),
            },
            SystemdVia::Systemctl => drbd_reactor::systemd::SystemdVia::Systemctl {
                host_exec: host_exec.to_vec(),
                systemctl: "systemctl".to_string(),
            },
        },
        job_timeout: Duration::from_secs(a.systemd_job_timeout),
    };
    // Checks the configuration only; nothing is contacted before a promoter needs it.
    let manager = drbd_reactor::systemd::connect(&systemd).context("--systemd-bus")?;
    let units_drbdsetup =
        shlex::split(&a.units_drbdsetup).context("--units-drbdsetup: unbalanced quotes")?;
    if units_drbdsetup.is_empty() {
        bail!("--units-drbdsetup is empty");
    }
    let ocf_wrapper = match &a.units_ocf_wrapper {
        Some(s) => shlex::split(s).context("--units-ocf-wrapper: unbalanced quotes")?,
        None => vec![
            std::env::current_exe()
                .context("cannot find this binary's path for --units-ocf-wrapper")?
                .display()
                .to_string(),
            "ocf-wrapper".to_string(),
        ],
    };
    use drbd_reactor::plugins::promoter::{units::UnitCommands, PromoterOptions, Templates};
    Ok(PromoterOptions {
        // The host's service manager: zbus over --systemd-bus, or the systemctl fallback; connected on
        // first use.
        manager: Some(manager),
        unit_dir: a.unit_dir.clone(),
        units: UnitCommands {
            drbdsetup: units_drbdsetup,
            ocf_wrapper,
            ocf_root: a.units_ocf_root.clone(),
            ..UnitCommands::default()
        },
        templates: match a.units_templates {
            UnitTemplates::Auto => Templates::Auto,
            UnitTemplates::Always => Templates::Always,
            UnitTemplates::Never => Templates::Never,
        },
        drbdsetup: drbdsetup.to_vec(),
        drbdadm: drbdadm.to_vec(),
        host_exec: host_exec.to_vec(),
        enabled: a.allow_promoter,
        ..PromoterOptions::default()
    })
}

/// Kubernetes mode: policies from ReactorPolicy objects (in-cluster configuration or KUBECONFIG).
async fn k8s_main(a: AgentArgs) -> Result<()> {
    let http = http_limits(&a)?;
    let drbdsetup = shlex::split(&a.drbdsetup).context("--drbdsetup: unbalanced quotes")?;
    if drbdsetup.is_empty() {
        bail!("--drbdsetup is empty");
    }
    let drbdadm = shlex::split(&a.drbdadm).context("--drbdadm: unbalanced quotes")?;
    let host_exec = shlex::split(&a.host_exec).context("--host-exec: unbalanced quotes")?;
    if a.statistics_interval == 0 {
        bail!("--statistics-interval must be at least 1 second");
    }
    if !a.node_labels.trim().is_empty() {
        bail!(
            "--node-labels is for --policy-dir mode; in Kubernetes mode the Node's labels are used"
        );
    }
    let promoter = promoter_options(&a, &drbdsetup, &drbdadm, &host_exec)?;
    let node_name = match a.node_name {
        Some(n) if !n.is_empty() => n,
        _ => bail!(
            "Kubernetes mode (no --policy-dir) needs --node-name (or NODE_NAME from the downward \
             API spec.nodeName); for policy files run `drbd-reactor agent --policy-dir DIR`"
        ),
    };
    let opts = drbd_reactor::k8s::K8sOptions {
        drbdsetup,
        drbdadm,
        node_name,
        namespace: a.namespace,
        statistics_interval: Duration::from_secs(a.statistics_interval),
        listen: a.listen.parse()?,
        http,
        umh: drbd_reactor::plugins::umh::UmhOptions {
            script_dir: a.umh_script_dir,
            host_exec,
            host_commands: a.allow_host_commands,
        },
        debounce: Duration::from_millis(a.debounce_ms),
        status_interval: Duration::from_secs(a.status_interval.max(1)),
        stale_sweep_interval: Duration::from_secs(a.stale_entry_sweep_interval.max(1)),
        promoter,
    };
    tracing::info!(node = %opts.node_name, namespace = %opts.namespace, drbdsetup = ?opts.drbdsetup, "starting drbd-reactor agent in Kubernetes mode");
    drbd_reactor::k8s::run(opts).await?;
    Ok(())
}

fn http_limits(a: &AgentArgs) -> Result<drbd_reactor::http::HttpLimits> {
    if a.http_max_connections == 0 || a.http_max_requests == 0 {
        bail!("--http-max-connections and --http-max-requests must be at least 1");
    }
    if a.http_header_timeout == 0 || a.http_response_timeout == 0 {
        bail!("--http-header-timeout and --http-response-timeout must be at least 1 second");
    }
    Ok(drbd_reactor::http::HttpLimits {
        max_connections: a.http_max_connections,
        max_requests: a.http_max_requests,
        header_timeout: Duration::from_secs(a.http_header_timeout),
        response_timeout: Duration::from_secs(a.http_response_timeout),
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", drbd_reactor::policy::crd_yaml());
            Ok(())
        }
        Command::Agent(a) => {
            init_logging(a.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt.block_on(agent_main(*a));
            // Plugins had their stop timeout; blocking work still running (a unit file write, a
            // rendering) does not hold the exit.
            rt.shutdown_timeout(Duration::from_millis(500));
            r
        }
        Command::OcfWrapper { verb } => {
            std::process::exit(drbd_reactor::plugins::promoter::ocf::main(&[verb]))
        }
    }
}
