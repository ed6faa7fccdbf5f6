//! `drbd-reactor ocf-wrapper`: runs an OCF resource agent as a systemd service (what upstream's
//! `ocf-rs-wrapper` does), without a shell.
//!
//! - `start-and-monitor` (ExecStart, `Type=notify`): `$AGENT start`; a failure exits with its code. Then
//!   `READY=1` to systemd and `$AGENT monitor` every `monitor_interval` seconds (default 30, at least 5);
//!   a failing monitor exits with its code (systemd restarts or fails the unit). On SIGTERM (or SIGINT):
//!   `$AGENT stop`, exit with its code.
//! - `stop` (ExecStopPost): `$AGENT stop`, skipped when the service already stopped cleanly
//!   (`EXIT_CODE=exited`, `EXIT_STATUS=0`).
//!
//! The agent gets the unit's environment (`OCF_ROOT`, `OCF_RESOURCE_INSTANCE`, `OCF_RESKEY_*`).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Exit code for "not installed / wrong usage" (OCF_ERR_INSTALLED is 5, OCF_ERR_ARGS 2).
const EXIT_USAGE: i32 = 2;
const EXIT_NOT_INSTALLED: i32 = 5;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

#[derive(Debug, thiserror::Error)]
pub enum OcfError {
    #[error("usage: drbd-reactor ocf-wrapper start-and-monitor|stop (with AGENT set to the agent's path)")]
    Usage,
    #[error("{0}")]
    Agent(String),
}

/// The monitor interval from `monitor_interval` (seconds): default 30, at least 5.
pub fn monitor_interval(v: Option<&str>) -> Duration {
    let secs = v.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(30);
    Duration::from_secs(secs.max(5))
}

/// Whether ExecStopPost must run the agent's stop: not after a clean exit.
pub fn stop_needed(exit_code: Option<&str>, exit_status: Option<&str>) -> bool {
    !(exit_code == Some("exited") && exit_status == Some("0"))
}

fn agent_cmd(agent: &str, verb: &str) -> i32 {
    match Command::new(agent).arg(verb).status() {
        Ok(s) => s.code().unwrap_or(1),
        Err(e) => {
            eprintln!("ocf-wrapper: cannot run {agent} {verb}: {e}");
            EXIT_NOT_INSTALLED
        }
    }
}

/// Sends `state` to systemd's notification socket (`NOTIFY_SOCKET`, a path or `@abstract`).
pub fn sd_notify(state: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let p = path.to_string_lossy();
    if let Some(name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &*p)?;
    }
    Ok(())
}

/// Runs the wrapper; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let verb = args.first().map(String::as_str);
    let Some(agent) = std::env::var("AGENT").ok().filter(|a| !a.is_empty()) else {
        eprintln!("ocf-wrapper: {}", OcfError::Usage);
        return EXIT_USAGE;
    };
    if std::env::var_os("OCF_ROOT").is_none() {
        std::env::set_var("OCF_ROOT", "/usr/lib/ocf");
    }
    match verb {
        Some("start-and-monitor") => start_and_monitor(&agent),
        Some("stop") => {
            let code = std::env::var("EXIT_CODE").ok();
            let status = std::env::var("EXIT_STATUS").ok();
            if stop_needed(code.as_deref(), status.as_deref()) {
                agent_cmd(&agent, "stop")
            } else {
                0
            }
        }
        _ => {
            eprintln!("ocf-wrapper: {}", OcfError::Usage);
            EXIT_USAGE
        }
    }
}

fn start_and_monitor(agent: &str) -> i32 {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let code = agent_cmd(agent, "start");
    if code != 0 {
        eprintln!("ocf-wrapper: {agent} start exited {code}");
        return code;
    }
    if let Err(e) = sd_notify("READY=1") {
        eprintln!("ocf-wrapper: cannot notify systemd: {e}");
    }
    let interval = monitor_interval(std::env::var("monitor_interval").ok().as_deref());
    loop {
        let next = Instant::now() + interval;
        while Instant::now() < next {
            if STOP.load(Ordering::SeqCst) {
                let _ = sd_notify("STOPPING=1");
                return agent_cmd(agent, "stop");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let code = agent_cmd(agent, "monitor");
        if code != 0 {
            eprintln!("ocf-wrapper: {agent} monitor exited {code}");
            return code;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_and_stop_rules() {
        assert_eq!(monitor_interval(None), Duration::from_secs(30));
        assert_eq!(monitor_interval(Some("2")), Duration::from_secs(5));
        assert_eq!(monitor_interval(Some("60")), Duration::from_secs(60));
        assert_eq!(monitor_interval(Some("x")), Duration::from_secs(30));
        assert!(!stop_needed(Some("exited"), Some("0")));
        assert!(stop_needed(Some("exited"), Some("1")));
        assert!(stop_needed(Some("killed"), Some("TERM")));
        assert!(stop_needed(None, None));
    }
}
