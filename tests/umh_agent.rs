//! UMH through the real agent binary, with `drbd-sim --replay` standing in for drbdsetup: rules of every
//! kind fire on their transitions only, a hostile resource name runs nothing, an edited script reloads
//! only its instance, and runs are counted in `/metrics`.

mod common;

use common::agent::collect;
use common::{free_port, wait_until};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");
const SIM: &str = env!("CARGO_BIN_EXE_drbd-sim");

struct Agent {
    child: Child,
    port: u16,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn start(policy_dir: &Path, script: &Path, private: &Path) -> Agent {
        let port = free_port();
        let mut child = Command::new(AGENT)
            .arg("agent")
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--drbdsetup")
            .arg(format!("{SIM} --replay {}", script.display()))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--node-name")
            .arg("node-a")
            .arg("--umh-script-dir")
            .arg(private)
            .arg("--host-exec")
            .arg("/usr/bin/env UMH_VIA_HOST_EXEC=yes")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = collect(child.stderr.take().unwrap());
        Agent {
            child,
            port,
            stderr: lines,
        }
    }

    fn get(&self, path: &str) -> String {
        reqwest::blocking::get(format!("http://127.0.0.1:{}{path}", self.port))
            .and_then(|r| r.text())
            .unwrap_or_default()
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Agent) -> bool) {
        if !wait_until(timeout, || f(self)) {
            panic!(
                "timed out waiting for {what}; stderr:\n{}",
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }

    /// `drbdreactor_umh_runs_total` of a rule and result.
    fn runs(&self, rule: &str, result: &str) -> u64 {
        self.get("/metrics")
            .lines()
            .find(|l| {
                l.starts_with("drbdreactor_umh_runs_total{")
                    && l.contains(&format!("rule=\"{rule}\""))
                    && l.contains(&format!("result=\"{result}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }

    fn stderr_count(&self, pat: &[&str]) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pat.iter().all(|p| l.contains(p)))
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(p: &Path, s: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

const LOG_SCRIPT: &str = "#!/bin/sh\n\
printf '%s %s %s|%s|%s\\n' \"$DRBD_RULE_NAME\" \"$DRBD_EVENT_TYPE\" \"$DRBD_RES_NAME\" \"$DRBD_NODE_NAME\" \"${UMH_VIA_HOST_EXEC:-}\" >> \"$OUT/log\"\n";

fn policy(out: &Path) -> String {
    let run = [
        "      script: {path: scripts/log.sh}".to_string(),
        format!("      env: {{OUT: {}}}", out.display()),
    ];
    let mut l: Vec<String> = [
        "apiVersion: reactor.drbd.io/v1alpha1",
        "kind: ReactorPolicy",
        "metadata:",
        "  name: t",
        "spec:",
        "  debugger: {}",
        "  umh:",
        "    resource:",
        "    - name: promoted",
        "      new: {role: Primary}",
        "      changed: true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rule = |head: &[&str]| {
        l.extend(head.iter().map(|s| s.to_string()));
        l.extend(run.iter().cloned());
    };
    rule(&[]);
    rule(&[
        "    device:",
        "    - name: quorum-lost",
        "      old: {quorum: true}",
        "      new: {quorum: false}",
    ]);
    rule(&[
        "    peerDevice:",
        "    - name: resync",
        "      eventType: change",
        "      new: {replicationState: SyncTarget}",
        "      changed: [replicationState]",
    ]);
    rule(&[
        "    connection:",
        "    - name: lost-peer",
        "      old: {connectionState: Connected}",
        "      new: {connectionState: {notEquals: Connected}}",
        "      where: host",
    ]);
    rule(&[
        "    helper:",
        "    - name: fence",
        "      helper: fence-peer",
        "      eventType: response",
        "      exitCode: {notEquals: 0}",
    ]);
    l.join("\n") + "\n"
}

#[test]
fn rules_fire_through_the_agent_and_an_edited_script_reloads_only_its_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(pol.join("scripts")).unwrap();
    std::fs::create_dir(&out).unwrap();
    write(&pol.join("scripts/log.sh"), LOG_SCRIPT);
    write(&pol.join("t.yaml"), &policy(&out));
    let hostile = format!(
        "h'q\"$(touch${{IFS}}{0});`touch${{IFS}}{0}`;x",
        tmp.path().join("pwned").display()
    );
    let stream = format!(
        "exists resource name:r0 role:Secondary suspended:no force-io-failures:no may_promote:no promotion_score:0\n\
exists connection name:r0 peer-node-id:1 conn-name:peer connection:Connected role:Secondary\n\
exists device name:r0 volume:0 minor:1000 backing_dev:/dev/sda disk:UpToDate client:no open:no quorum:yes\n\
exists peer-device name:r0 peer-node-id:1 conn-name:peer volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no\n\
exists -\n\
#@sleep 2500\n\
change resource name:r0 role:Primary may_promote:no promotion_score:0\n\
change resource name:r0 role:Primary may_promote:yes promotion_score:10101\n\
change device name:r0 volume:0 minor:1000 backing_dev:/dev/sda disk:UpToDate client:no open:yes quorum:yes\n\
change connection name:r0 peer-node-id:1 conn-name:peer connection:NetworkFailure role:Unknown\n\
change connection name:r0 peer-node-id:1 conn-name:peer connection:Connecting role:Unknown\n\
change device name:r0 volume:0 minor:1000 backing_dev:/dev/sda disk:UpToDate client:no open:yes quorum:no\n\
change peer-device name:r0 peer-node-id:1 conn-name:peer volume:0 replication:SyncTarget peer-disk:UpToDate peer-client:no resync-suspended:no done:1.00\n\
change peer-device name:r0 peer-node-id:1 conn-name:peer volume:0 replication:SyncTarget peer-disk:UpToDate peer-client:no resync-suspended:no done:50.00\n\
call helper name:r0 peer-node-id:1 conn-name:peer helper:fence-peer\n\
response helper name:r0 peer-node-id:1 conn-name:peer helper:fence-peer status:1792\n\
response helper name:r0 peer-node-id:1 conn-name:peer helper:fence-peer status:0\n\
create resource name:{hostile} role:Secondary\n\
change resource name:{hostile} role:Primary\n\
#@sleep 2500\n\
change device name:r0 volume:0 minor:1000 backing_dev:/dev/sda disk:UpToDate client:no open:yes quorum:yes\n\
change device name:r0 volume:0 minor:1000 backing_dev:/dev/sda disk:UpToDate client:no open:yes quorum:no\n"
    );
    let script = tmp.path().join("stream.txt");
    write(&script, &stream);
    let agent = Agent::start(&pol, &script, &tmp.path().join("private"));
    let log = || -> Vec<String> {
        std::fs::read_to_string(out.join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    agent.wait_for("the first runs", Duration::from_secs(20), |a| {
        a.runs("promoted", "0") == 2 && a.runs("fence", "0") == 1 && a.runs("quorum-lost", "0") == 1
    });
    let mut got = log();
    got.sort();
    let mut want = vec![
        "promoted change r0|node-a|".to_string(),
        "quorum-lost change r0|node-a|".to_string(),
        "resync change r0|node-a|".to_string(),
        "lost-peer change r0|node-a|yes".to_string(),
        "fence response r0|node-a|".to_string(),
        format!("promoted change {hostile}|node-a|"),
    ];
    want.sort();
    assert_eq!(got, want);
    assert!(!tmp.path().join("pwned").exists());

    // an edited script: the umh instance is replaced, the debugger of the same policy is not
    let started = |a: &Agent, inst: &str| a.stderr_count(&["started plugin instance", inst]);
    assert_eq!(started(&agent, "t/umh"), 1);
    assert_eq!(started(&agent, "t/debugger"), 1);
    write(
        &pol.join("scripts/log.sh"),
        &LOG_SCRIPT.replace("%s %s %s|", "v2 %s %s %s|"),
    );
    agent.wait_for("the reload", Duration::from_secs(10), |a| {
        started(a, "t/umh") == 2
    });
    assert_eq!(started(&agent, "t/debugger"), 1);
    agent.wait_for(
        "the quorum loss after the reload",
        Duration::from_secs(20),
        |a| {
            a.runs("quorum-lost", "0") >= 1
                && log()
                    .iter()
                    .any(|l| l.starts_with("v2 quorum-lost change r0"))
        },
    );
    // the replay the new instance got is no transition: the guarded rule did not fire again
    assert!(
        !log().iter().any(|l| l.starts_with("v2 promoted")),
        "{:?}",
        log()
    );
    assert_eq!(agent.runs("promoted", "0"), 2);
    // the private copy is the new one
    let copy = std::fs::read_to_string(tmp.path().join("private/t/quorum-lost")).unwrap();
    assert!(copy.contains("v2 "));
    assert!(!tmp.path().join("pwned").exists());
}

/// Issue #15: every dropped run (queue full) was one ERROR line; now they are counted and logged with a
/// rate limit.
#[test]
fn dropped_runs_are_counted_and_logged_with_a_rate_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let pol = tmp.path().join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    write(
        &pol.join("t.yaml"),
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: t\nspec:\n  umh:\n    maxConcurrent: 1\n    maxQueued: 1\n    resource:\n    - name: every\n      command: [sleep, \"30\"]\n",
    );
    let stream = format!(
        "exists resource name:r0 role:Secondary suspended:no force-io-failures:no may_promote:no promotion_score:0\nexists -\n#@sleep 2000\n{}",
        common::role_flips("r0", 300)
    );
    let script = tmp.path().join("stream.txt");
    write(&script, &stream);
    let private = tmp.path().join("private");
    let agent = Agent::start(&pol, &script, &private);
    agent.wait_for("the drops counted", Duration::from_secs(30), |a| {
        a.runs("every", "dropped") >= 290
    });
    let logged = agent.stderr_count(&["run queue full"]);
    assert!(
        (1..=11).contains(&logged),
        "{logged} log lines for {} dropped runs",
        agent.runs("every", "dropped")
    );
}
