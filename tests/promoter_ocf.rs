//! `drbd-reactor ocf-wrapper` (what the promoter's OCF units run) with a small OCF test agent: start,
//! READY=1 to the notification socket, periodic monitor, stop on SIGTERM, a failing monitor ends the
//! service with the agent's code, and the ExecStopPost `stop` verb.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");

const TEST_AGENT: &str = r#"#!/bin/sh
# A small OCF agent: logs each call with its parameter; monitor fails once $STATE/fail exists.
echo "$1 ip=$OCF_RESKEY_ip instance=$OCF_RESOURCE_INSTANCE root=$OCF_ROOT" >> "$OCF_RESKEY_state/calls"
case "$1" in
  start) touch "$OCF_RESKEY_state/running"; exit 0 ;;
  stop) rm -f "$OCF_RESKEY_state/running"; exit 0 ;;
  monitor) [ -e "$OCF_RESKEY_state/fail" ] && exit 7; exit 0 ;;
  *) exit 3 ;;
esac
"#;

fn setup(dir: &Path) -> std::path::PathBuf {
    let agent = dir.join("agent");
    std::fs::write(&agent, TEST_AGENT).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    agent
}

fn wrapper(dir: &Path, agent: &Path, verb: &str) -> Command {
    let mut c = Command::new(AGENT);
    c.args(["ocf-wrapper", verb])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("AGENT", agent)
        .env("OCF_RESOURCE_INSTANCE", "vip_r0")
        .env("OCF_RESKEY_ip", "10.0.0.9")
        .env("OCF_RESKEY_state", dir)
        .env("monitor_interval", "5")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn start_notify_monitor_and_stop_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = setup(dir);
    let sock_path = dir.join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = wrapper(dir, &agent, "start-and-monitor")
        .env("NOTIFY_SOCKET", &sock_path)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 from the wrapper");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(dir.join("running").exists(), "started before READY");
    let first = std::fs::read_to_string(dir.join("calls")).unwrap();
    assert_eq!(
        first,
        format!("start ip=10.0.0.9 instance=vip_r0 root=/usr/lib/ocf\n")
    );
    // the first monitor comes after monitor_interval (5 s)
    assert!(common::wait_until(Duration::from_secs(30), || calls(dir)
        .contains(&"monitor".to_string())));
    // SIGTERM: the agent's stop, exit 0
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(!dir.join("running").exists());
    assert_eq!(calls(dir).last().unwrap(), "stop");
}

#[test]
fn a_failing_monitor_ends_the_service_with_the_agents_code() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = setup(dir);
    std::fs::write(dir.join("fail"), "").unwrap();
    let t0 = Instant::now();
    let st = wrapper(dir, &agent, "start-and-monitor").status().unwrap();
    assert_eq!(st.code(), Some(7), "OCF_NOT_RUNNING from monitor");
    assert!(
        t0.elapsed() >= Duration::from_secs(5),
        "monitor_interval is at least 5 s"
    );
    assert_eq!(calls(dir), ["start", "monitor"]);
}

#[test]
fn exec_stop_post_verb() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agent = setup(dir);
    // after a clean exit nothing is left to stop
    let st = wrapper(dir, &agent, "stop")
        .env("EXIT_CODE", "exited")
        .env("EXIT_STATUS", "0")
        .status()
        .unwrap();
    assert!(st.success());
    assert!(calls(dir).is_empty());
    // after a crash the agent's stop runs
    let st = wrapper(dir, &agent, "stop")
        .env("EXIT_CODE", "killed")
        .env("EXIT_STATUS", "KILL")
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(calls(dir), ["stop"]);
    // without AGENT: a usage error
    let st = Command::new(AGENT)
        .args(["ocf-wrapper", "stop"])
        .env_remove("AGENT")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(2));
}
