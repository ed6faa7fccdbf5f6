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

/// OCF parameters with `%` (and other characters systemd treats specially) reach the agent verbatim
/// through the `Environment=` lines the promoter writes, on a real systemd: it decodes C escapes first
/// and expands specifiers after, so `%i` in a parameter would otherwise become the instance name.
#[test]
fn ocf_parameters_with_percent_reach_the_agent_verbatim_on_real_systemd() {
    use drbd_reactor::plugins::promoter::units::{env_assignment, exec_line};
    let Some(sd) = common::systemd::SystemdNs::boot("ocf_parameters_with_percent") else {
        return;
    };
    let values = ["50%", "%i%n", "%%", "a b\"c\\d$HOME 100%"];
    let mut unit = String::from("[Service]\nType=oneshot\n");
    for (i, v) in values.iter().enumerate() {
        unit.push_str(&env_assignment(&format!("OCF_RESKEY_p{i}"), v));
        unit.push('\n');
    }
    let script = "env > /run/pct-env";
    let argv: Vec<String> = ["/bin/sh", "-c", script].map(String::from).to_vec();
    unit.push_str(&format!("ExecStart={}\n", exec_line(&argv)));
    sd.write_unit("pct@inst.service", &unit);
    let o = sd.systemctl(&["daemon-reload"]);
    assert!(o.status.success(), "{o:?}");
    let o = sd.systemctl(&["start", "pct@inst.service"]);
    assert!(o.status.success(), "{o:?}\n{}", sd.log_tail());
    let env = std::fs::read_to_string(sd.run_path("pct-env")).unwrap();
    for (i, v) in values.iter().enumerate() {
        let want = format!("OCF_RESKEY_p{i}={v}");
        assert!(
            env.lines().any(|l| l == want),
            "{want} not in the environment:\n{env}\nunit:\n{unit}"
        );
    }
}
