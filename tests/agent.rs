//! The agent binary end to end in file mode, with `drbd-sim --replay` standing in for drbdsetup.

mod common;

use common::agent::{collect, Agent, AGENT};
use common::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn write(p: &Path, s: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

fn policy(name: &str, output: &str) -> String {
    format!("apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n  debugger:\n    output: {output}\n")
}

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/events2")
        .join(format!("{name}.txt"))
}

fn plugin_ids(st: &serde_json::Value) -> Vec<String> {
    st["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    format!(
                        "{}/{}={}",
                        p["id"]["policy"].as_str().unwrap(),
                        p["id"]["type"].as_str().unwrap(),
                        p["state"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn without_policy_dir_it_explains_itself() {
    let out = Command::new(AGENT).arg("agent").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--policy-dir"), "{err}");
}

#[test]
fn serves_health_status_and_applies_policy_changes_live() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    let script = dir.path().join("stream.txt");
    let mut s =
        std::fs::read_to_string(sample("drbd-utils_events2-all-create-change__full")).unwrap();
    s.push_str("this line is garbage\n");
    write(&script, &s);
    let agent = Agent::start(&pol, &script, &[]);
    agent.wait_for("/healthz", Duration::from_secs(10), |a| {
        a.get("/healthz").0 == 200
    });
    agent.wait_for("/readyz", Duration::from_secs(10), |a| {
        a.get("/readyz").0 == 200
    });
    assert_eq!(agent.get("/metrics/extra").0, 404);
    assert_eq!(agent.get("/").0, 404);
    let st = agent.status();
    assert_eq!(st["resources"][0]["name"], "some-resource");
    assert_eq!(st["resources"][0]["role"], "Primary");
    assert_eq!(st["source"]["malformedLines"], 1);
    assert!(plugin_ids(&st).is_empty());
    // the complete kept state of one resource, and 404 for one that does not exist
    let (code, body) = agent.get("/status/resources/some-resource");
    assert_eq!(code, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["role"], "Primary");
    let conn = r["connections"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap();
    assert_eq!(conn["conn-name"], "some-peer");
    assert!(conn["peer-devices"]["0"]["replication"].is_string(), "{r}");
    assert_eq!(agent.get("/status/resources/nope").0, 404);

    // a policy appears: within 2 s its instance runs and gets the whole state first
    let t = Instant::now();
    write(&pol.join("debug.yaml"), &policy("debug", "stdout"));
    agent.wait_for("the debugger instance", Duration::from_secs(2), |a| {
        plugin_ids(&a.status()) == ["debug/debugger=running"]
    });
    assert!(t.elapsed() < Duration::from_secs(2));
    agent.wait_for("replayed state on stdout", Duration::from_secs(2), |a| {
        a.stdout.lock().unwrap().len() >= 4
    });
    let out = agent.stdout.lock().unwrap().clone();
    let first: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    assert_eq!(
        (first["eventType"].as_str(), first["object"].as_str()),
        (Some("exists"), Some("resource"))
    );
    assert!(
        out.iter().any(|l| l.contains("\"object\":\"peer-device\"")),
        "replay includes peer devices"
    );

    // an invalid change is rejected with the file and field named; the running instance stays
    write(&pol.join("debug.yaml"), &policy("debug", "printer"));
    agent.wait_for("the problem in /status", Duration::from_secs(3), |a| {
        a.status()["policies"]["problems"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let st = agent.status();
    let problem = &st["policies"]["problems"][0];
    assert!(problem["file"].as_str().unwrap().ends_with("debug.yaml"));
    assert!(
        problem["error"]
            .as_str()
            .unwrap()
            .starts_with("spec.debugger.output"),
        "{problem}"
    );
    assert_eq!(plugin_ids(&st), ["debug/debugger=running"]);
    assert!(agent
        .stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("rejected policy file") && l.contains("debug.yaml")));

    // removal stops it
    std::fs::remove_file(pol.join("debug.yaml")).unwrap();
    agent.wait_for("no plugins", Duration::from_secs(2), |a| {
        plugin_ids(&a.status()).is_empty()
    });

    let (status, took) = agent.terminate();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10));
}

#[test]
fn drbdsetup_restart_replaces_state_and_destroys_what_vanished() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    write(&pol.join("debug.yaml"), &policy("debug", "stdout"));
    let script = dir.path().join("stream.txt");
    // A real initial dump (a LINSTOR resource with one peer), ending with `exists -`.
    let base =
        std::fs::read_to_string(sample("drbdtop_events2-timestamps-statistics-k8s-2019")).unwrap();
    let dump: Vec<&str> = base
        .lines()
        .filter(|l| !l.starts_with('#') && !l.ends_with("exists -"))
        .collect();
    let extra = "exists resource name:doomed role:Secondary suspended:no force-io-failures:no may_promote:no promotion_score:0\n\
                 exists device name:doomed volume:0 minor:9 backing_dev:none disk:UpToDate client:no open:no quorum:yes\n";
    // first run: both resources, then drbdsetup dies mid-line
    write(
        &script,
        &format!(
            "{}\n{extra}exists -\n#@sleep 1500\n#@raw change resource name:some-res\n#@exit 1\n",
            dump.join("\n")
        ),
    );
    let agent = Agent::start(&pol, &script, &[]);
    agent.wait_for("both resources", Duration::from_secs(10), |a| {
        a.status()["resources"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    });
    // the next drbdsetup no longer sees `doomed`
    write(&script, &base);
    agent.wait_for("a restart", Duration::from_secs(10), |a| {
        a.metric("drbdreactor_drbdsetup_restarts_total")
            .unwrap_or(0.0)
            >= 1.0
    });
    agent.wait_for("doomed destroyed", Duration::from_secs(10), |a| {
        a.status()["resources"]
            .as_array()
            .is_some_and(|r| r.len() == 1)
    });
    agent.wait_for("ready again", Duration::from_secs(5), |a| {
        a.get("/readyz").0 == 200
    });
    let out = agent.stdout.lock().unwrap().clone();
    let destroyed: Vec<&String> = out
        .iter()
        .filter(|l| l.contains("\"eventType\":\"destroy\""))
        .collect();
    assert_eq!(destroyed.len(), 2, "{destroyed:#?}");
    assert!(destroyed[0].contains("\"object\":\"device\"") && destroyed[0].contains("doomed"));
    assert!(destroyed[1].contains("\"object\":\"resource\"") && destroyed[1].contains("doomed"));
    // the plugin was not torn down: one instance, never restarted
    let st = agent.status();
    assert_eq!(st["plugins"][0]["restarts"], 0);
    assert!(
        agent
            .metric("drbdreactor_events2_malformed_lines_total")
            .unwrap()
            >= 1.0,
        "the cut-off line is counted"
    );
    let stderr = agent.stderr.lock().unwrap().join("\n");
    assert!(stderr.contains("cut off"), "{stderr}");
    let (status, _) = agent.terminate();
    assert!(status.success());
}

#[test]
fn a_missing_drbdsetup_means_not_ready_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    let port = free_port();
    let mut child = Command::new(AGENT)
        .args(["agent", "--drbdsetup", "/nonexistent/drbdsetup", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--policy-dir")
        .arg(&pol)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect(child.stderr.take().unwrap());
    let a = Agent {
        child,
        port,
        stdout: Arc::default(),
        stderr,
    };
    a.wait_for("healthz", Duration::from_secs(10), |a| {
        a.get("/healthz").0 == 200
    });
    a.wait_for("two attempts", Duration::from_secs(10), |a| {
        a.metric("drbdreactor_drbdsetup_restarts_total")
            .unwrap_or(0.0)
            >= 2.0
    });
    let (code, body) = a.get("/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("drbdsetup events2 is not running"), "{body}");
    assert!(a
        .stderr
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("/nonexistent/drbdsetup")));
}

#[test]
fn sighup_rereads_the_policy_directory_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    let script = dir.path().join("stream.txt");
    write(
        &script,
        &std::fs::read_to_string(sample("drbdtop_events2-timestamps-statistics-k8s-2019")).unwrap(),
    );
    let agent = Agent::start(&pol, &script, &["--policy-poll-interval", "3600"]);
    agent.wait_for("ready", Duration::from_secs(10), |a| {
        a.get("/readyz").0 == 200
    });
    write(&pol.join("debug.yaml"), &policy("debug", "log"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        plugin_ids(&agent.status()).is_empty(),
        "not re-read before SIGHUP"
    );
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    agent.wait_for("the instance after SIGHUP", Duration::from_secs(2), |a| {
        plugin_ids(&a.status()) == ["debug/debugger=running"]
    });
}
