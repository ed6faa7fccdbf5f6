//! Fault injection against the agent binary: drbdsetup killed mid-stream, mid-line and during the initial
//! dump; garbage, a 1 MiB line and invalid UTF-8 on its output; the policy directory flapping; the HTTP
//! port already taken. Each test states what must hold afterwards and checks it.
//!
//! drbdsetup is played by `drbd-sim`: the cluster simulator (ground truth: `events2 --now` on the same
//! node) or its replay mode (scripted output, including broken output).

mod common;

use common::agent::{Agent, SIM};
use common::{free_port, wait_until, Rng};
use drbd_reactor::engine::Engine;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn sim(cluster: &Path, args: &[&str]) -> std::process::Output {
    Command::new(SIM)
        .arg("--cluster")
        .arg(cluster)
        .args(args)
        .output()
        .expect("drbd-sim runs")
}

fn ctl(cluster: &Path, args: &[&str]) {
    let mut a = vec!["ctl"];
    a.extend_from_slice(args);
    let out = sim(cluster, &a);
    assert!(out.status.success(), "ctl {args:?}: {out:?}");
}

fn write(p: &Path, s: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

fn debugger_policy(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    write(
        &dir.join("debug.yaml"),
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: debug\nspec:\n  debugger:\n    output: log\n",
    );
}

/// The pids of the agent's direct children (its drbdsetup).
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// What `/status` shows for a node's resources, computed from the simulator's own dump of that node.
fn truth(cluster: &Path, node: &str) -> serde_json::Value {
    let out = sim(cluster, &["--node", node, "events2", "--now", "--full"]);
    assert!(out.status.success(), "{out:?}");
    let mut engine = Engine::new();
    let mut updates = Vec::new();
    engine.apply_chunk(&out.stdout, &mut updates);
    let summaries: Vec<_> = engine
        .state
        .snapshot()
        .iter()
        .map(|r| drbd_reactor::http::summary(r))
        .collect();
    serde_json::to_value(summaries).unwrap()
}

fn sorted_resources(v: &serde_json::Value) -> serde_json::Value {
    let mut a = v.as_array().cloned().unwrap_or_default();
    a.sort_by_key(|r| r["name"].as_str().unwrap_or_default().to_string());
    serde_json::Value::Array(a)
}

#[test]
fn drbdsetup_killed_at_random_points_converges_to_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("cluster");
    ctl(&c, &["init"]);
    ctl(&c, &["create", "r0", "--nodes", "n1,n2,n3"]);
    ctl(
        &c,
        &[
            "create",
            "r1",
            "--nodes",
            "n1,n2,n3",
            "--volumes",
            "2",
            "--minor",
            "1010",
        ],
    );
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let agent = Agent::spawn(
        &pol,
        &format!("{SIM} --cluster {} --node n1", c.display()),
        &[],
    );
    agent.wait_for("ready", Duration::from_secs(20), |a| {
        a.get("/readyz").0 == 200
    });
    let ops: &[&[&str]] = &[
        &["primary", "n1", "r0"],
        &["secondary", "n1", "r0"],
        &["primary", "n2", "r1"],
        &["secondary", "n2", "r1"],
        &["cut", "n1", "n2"],
        &["heal", "n1", "n2"],
        &["node-down", "n3"],
        &["node-up", "n3"],
        &["detach", "n1", "r1", "--volume", "1"],
        &["attach", "n1", "r1", "--volume", "1"],
        &["write", "n2", "r1", "4096"],
    ];
    let mut rng = Rng::new(0x5eed);
    let mut kills = 0;
    for _ in 0..60 {
        let op = rng.pick(ops);
        let mut a = vec!["ctl"];
        a.extend_from_slice(op);
        let _ = sim(&c, &a); // refusals (e.g. a second Primary) are part of the game
        if rng.chance(15) && kills < 6 {
            for pid in children(agent.child.id()) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                kills += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(60)));
    }
    assert!(
        kills >= 2,
        "the scenario killed drbdsetup only {kills} times"
    );
    let want = sorted_resources(&truth(&c, "n1"));
    let ok = wait_until(Duration::from_secs(60), || {
        sorted_resources(&agent.status()["resources"]) == want
    });
    assert!(
        ok,
        "agent's state does not converge:\nagent: {:#}\ntruth: {want:#}",
        sorted_resources(&agent.status()["resources"])
    );
    assert!(
        agent
            .metric("drbdreactor_drbdsetup_restarts_total")
            .unwrap()
            >= kills as f64
    );
    agent.wait_for("ready after the kills", Duration::from_secs(30), |a| {
        a.get("/readyz").0 == 200
    });
    // The plugin instance survived every restart of drbdsetup.
    assert_eq!(agent.status()["plugins"][0]["restarts"], 0);
}

/// A real dump to start from: the LINSTOR resource of the 2019 sample, without its `exists -`.
fn dump() -> (String, String) {
    let base = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/events2/drbdtop_events2-timestamps-statistics-k8s-2019.txt"),
    )
    .unwrap();
    let lines: Vec<&str> = base
        .lines()
        .filter(|l| l.contains("exists") && !l.starts_with('#') && !l.ends_with("exists -"))
        .collect();
    let name = lines[0]
        .split_whitespace()
        .find_map(|t| t.strip_prefix("name:"))
        .unwrap()
        .to_string();
    (lines.join("\n") + "\n", name)
}

#[test]
fn garbage_a_huge_line_and_invalid_utf8_are_counted_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let (dump, name) = dump();
    let script = dir.path().join("stream.txt");
    write(
        &script,
        &format!(
            "{dump}exists -\n\
             this is not events2 at all\n\
             #@long 1048576 change resource name:{name} role:Primary \n\
             #@hex 6368616e6765207265736f75726365206e616d653affff20726f6c653a5072696d6172790a\n\
             change resource name:{name} role:Primary\n"
        ),
    );
    let agent = Agent::start(&pol, &script, &[]);
    agent.wait_for(
        "the valid change after the garbage",
        Duration::from_secs(20),
        |a| a.status()["resources"][0]["role"] == "Primary",
    );
    // garbage, the oversized line and the invalid UTF-8 line: three, each counted once
    assert_eq!(
        agent.metric("drbdreactor_events2_malformed_lines_total"),
        Some(3.0)
    );
    assert_eq!(
        agent.metric("drbdreactor_drbdsetup_restarts_total"),
        Some(0.0)
    );
    assert_eq!(agent.get("/readyz").0, 200);
    let log = agent.stderr.lock().unwrap().join("\n");
    assert!(
        log.contains("this is not events2 at all"),
        "the line is logged"
    );
    // the 1 MiB line is neither kept nor logged whole
    assert!(log.len() < 512 * 1024, "log holds {} bytes", log.len());
    let rss_kib = vm_hwm_kib(agent.child.id());
    assert!(rss_kib < 64 * 1024, "peak RSS {rss_kib} KiB");
}

#[test]
fn drbdsetup_killed_during_the_initial_dump_is_not_ready_until_a_complete_one() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let (dump, name) = dump();
    let script = dir.path().join("stream.txt");
    // half a dump, a resource cut off mid-line, then death
    let half: String = dump.lines().take(2).map(|l| format!("{l}\n")).collect();
    write(
        &script,
        &format!("{half}exists resource name:half role:Secondary\n#@sleep 3000\n#@raw exists resource name:cut\n#@exit 137\n"),
    );
    let agent = Agent::start(&pol, &script, &[]);
    agent.wait_for("the partial dump", Duration::from_secs(20), |a| {
        a.status()["resources"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    });
    let (code, body) = agent.get("/readyz");
    assert_eq!(code, 503, "ready before the dump completed: {body}");
    // the next drbdsetup prints a complete dump without `half`
    write(&script, &format!("{dump}exists -\n"));
    agent.wait_for("ready", Duration::from_secs(30), |a| {
        a.get("/readyz").0 == 200
    });
    let st = agent.status();
    let names: Vec<&str> = st["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![name.as_str()], "what vanished is gone");
    assert!(
        agent
            .metric("drbdreactor_drbdsetup_restarts_total")
            .unwrap()
            >= 1.0
    );
    assert!(
        agent
            .metric("drbdreactor_events2_malformed_lines_total")
            .unwrap()
            >= 1.0
    );
}

/// A temporary directory with a debugger policy and a replay script of one complete dump:
/// (directory, policy directory, script).
fn complete_dump_setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let (dump, _) = dump();
    let script = dir.path().join("stream.txt");
    write(&script, &format!("{dump}exists -\n"));
    (dir, pol, script)
}

#[test]
fn a_flapping_policy_directory_keeps_the_instances_in_force() {
    let (dir, pol, script) = complete_dump_setup();
    let agent = Agent::start(&pol, &script, &["--policy-poll-interval", "1"]);
    agent.wait_for("ready", Duration::from_secs(20), |a| {
        a.get("/readyz").0 == 200
    });
    let gone = dir.path().join("policies.gone");
    for i in 0..6 {
        if i % 2 == 0 {
            // the directory disappears for a while (an unmounted ConfigMap volume, a careless rm -r)
            std::fs::rename(&pol, &gone).unwrap();
            std::thread::sleep(Duration::from_millis(1300));
            std::fs::rename(&gone, &pol).unwrap();
        } else {
            // the file is replaced by garbage for a while
            let good = std::fs::read_to_string(pol.join("debug.yaml")).unwrap();
            write(&pol.join("debug.yaml"), "spec: [this is: not a policy");
            std::thread::sleep(Duration::from_millis(1300));
            write(&pol.join("debug.yaml"), &good);
        }
    }
    agent.wait_for("the invalid file noticed", Duration::from_secs(10), |a| {
        a.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("rejected policy file"))
    });
    let st = agent.status();
    let plugins = st["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 1, "{st:#}");
    assert_eq!(plugins[0]["state"], "running");
    assert_eq!(
        plugins[0]["restarts"], 0,
        "the instance was never restarted"
    );
    let log = agent.stderr.lock().unwrap().join("\n");
    assert!(
        log.contains("keeping the policies in force"),
        "the missing directory is reported"
    );
    assert_eq!(agent.get("/readyz").0, 200);
}

#[test]
fn a_taken_http_port_is_reported_and_retried_not_silently_dropped() {
    let (_dir, pol, script) = complete_dump_setup();
    let port = free_port();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::spawn_on(
        &pol,
        &format!("{SIM} --replay {}", script.display()),
        port,
        &[],
    );
    agent.wait_for("the bind error", Duration::from_secs(20), |a| {
        a.stderr.lock().unwrap().iter().any(|l| {
            l.contains(&format!("cannot listen on {listen}")) && l.contains("NOT available")
        })
    });
    // nothing answers on the port the agent was asked to serve: probes fail, the pod is not ready
    assert_ne!(agent.get("/readyz").0, 200);
    drop(squatter);
    agent.wait_for(
        "serving once the port is free",
        Duration::from_secs(40),
        |a| a.get("/readyz").0 == 200,
    );
    assert!(agent.metric("drbdreactor_events2_lines_total").unwrap() > 0.0);
}

/// A tmpfs of `kib` KiB mounted on a fresh directory, unmounted on drop (root only).
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(kib: u32) -> Option<TinyFs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0755"),
                "tinyfs",
            ])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: cannot mount a tmpfs here");
            return None;
        }
        Some(TinyFs { dir })
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_when_writing_unit_files_is_a_clear_error_and_keeps_the_old_files() {
    use drbd_reactor::plugins::promoter::units::UnitFile;
    use drbd_reactor::systemd::files::UnitDir;
    let Some(fs) = TinyFs::mount(64) else {
        return;
    };
    let dir = UnitDir::new(fs.dir.path());
    let unit = |content: String| UnitFile {
        path: "drbd-services@r0.target.d/reactor.conf".into(),
        content,
    };
    let old = "# generated by drbd-reactor\n[Unit]\nDescription=first version\n".to_string();
    assert!(dir.write(&unit(old.clone())).unwrap());
    // fill the rest of the file system
    let filler = fs.dir.path().join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    use std::io::Write;
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    // a new version that does not fit
    let new = format!(
        "# generated by drbd-reactor\n[Unit]\nDescription={}\n",
        "x".repeat(16 * 1024)
    );
    let err = dir.write(&unit(new)).unwrap_err().to_string();
    assert!(
        err.contains("No space left on device") && err.contains("reactor.conf"),
        "the error names the cause and the file: {err}"
    );
    // the old file is intact and no temporary file is left behind
    let path = fs.dir.path().join("drbd-services@r0.target.d/reactor.conf");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), old);
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "reactor.conf")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    // once there is room again, the same write succeeds
    std::fs::remove_file(&filler).unwrap();
    let new = format!(
        "# generated by drbd-reactor\n[Unit]\nDescription={}\n",
        "x".repeat(16 * 1024)
    );
    assert!(dir.write(&unit(new.clone())).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), new);
}

/// A shell script standing in for drbdsetup (`events2 --full --poll` are its ignored arguments).
fn shell_drbdsetup(dir: &Path, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("drbdsetup.sh");
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Issue #15: one invalid UTF-8 byte on drbdsetup's stderr stopped the reading, so drbdsetup died of
/// SIGPIPE at its next message (a restart, a change lost); a long line without a newline was logged whole.
#[test]
fn drbdsetup_stderr_with_invalid_utf8_and_a_huge_line_is_logged_bounded_and_read_on() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let (dump, name) = dump();
    std::fs::write(dir.path().join("dump.txt"), format!("{dump}exists -\n")).unwrap();
    let script = shell_drbdsetup(
        dir.path(),
        &format!(
            "cat {dump}\n\
             printf 'bad \\377 byte\\n' >&2\n\
             sleep 0.5\n\
             head -c 8000000 /dev/zero | tr '\\0' x >&2\n\
             printf '\\nafter the long line\\n' >&2\n\
             sleep 0.5\n\
             echo 'change resource name:{name} role:Primary'\n\
             exec sleep 600\n",
            dump = dir.path().join("dump.txt").display()
        ),
    );
    let agent = Agent::spawn(&pol, &script.display().to_string(), &[]);
    agent.wait_for(
        "the change after the stderr noise",
        Duration::from_secs(30),
        |a| a.status()["resources"][0]["role"] == "Primary",
    );
    assert_eq!(
        agent.metric("drbdreactor_drbdsetup_restarts_total"),
        Some(0.0),
        "drbdsetup was not restarted"
    );
    agent.wait_for(
        "the stderr line after the long one",
        Duration::from_secs(10),
        |a| {
            a.stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("after the long line"))
        },
    );
    let log = agent.stderr.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains("bad \u{fffd} byte")),
        "the invalid byte is replaced, the line logged"
    );
    let longest = log.iter().map(|l| l.len()).max().unwrap();
    assert!(longest < 16 * 1024, "a log line of {longest} bytes");
    assert!(
        log.iter().any(|l| l.contains("more bytes not shown")),
        "the cut is said"
    );
    assert!(vm_hwm_kib(agent.child.id()) < 64 * 1024);
}

/// Issue #15: 20 000 volumes on one resource took 1.1 GB; unknown keys were kept without a bound.
#[test]
fn volumes_and_unknown_keys_over_the_caps_are_counted_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let mut s = String::from(
        "exists resource name:big role:Secondary suspended:no force-io-failures:no may_promote:no promotion_score:0\n",
    );
    for v in 0..3000 {
        s.push_str(&format!(
            "exists device name:big volume:{v} minor:{} backing_dev:none disk:Diskless client:no open:no quorum:yes\n",
            1000 + v
        ));
    }
    s.push_str("exists -\n");
    let keys: String = (0..1000).map(|k| format!(" x-{k}:1")).collect();
    s.push_str(&format!("change resource name:big role:Primary{keys}\n"));
    let script = dir.path().join("stream.txt");
    write(&script, &s);
    let agent = Agent::start(&pol, &script, &[]);
    agent.wait_for("the change", Duration::from_secs(30), |a| {
        a.status()["resources"][0]["role"] == "Primary"
    });
    // 3000 - 1024 volumes and 1000 - 64 keys left out
    assert_eq!(
        agent.metric("drbdreactor_events2_capped_total"),
        Some((3000 - 1024 + 1000 - 64) as f64)
    );
    let st = agent.status();
    assert_eq!(
        st["resources"][0]["devices"].as_array().map(Vec::len),
        Some(1024)
    );
    let logged = agent
        .stderr
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("over the state's limit"))
        .count();
    assert!((1..=10).contains(&logged), "{logged} lines logged");
    assert_eq!(
        agent.metric("drbdreactor_events2_malformed_lines_total"),
        Some(0.0)
    );
}

/// Issue #15: SIGTERM with a long backlog in a plugin instance took 50 s to over 120 s (the timed-out
/// instance was not aborted and held the runtime's exit). The documented bound is 8 s.
#[test]
fn sigterm_with_a_large_backlog_exits_within_the_stop_timeout() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    write(
        &pol.join("debug.yaml"),
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: debug\nspec:\n  debugger:\n    output: stdout\n",
    );
    let (dump, name) = dump();
    let s = format!("{dump}exists -\n{}", common::role_flips(&name, 20_000));
    let script = dir.path().join("stream.txt");
    write(&script, &s);
    let port = free_port();
    let mut child = Command::new(common::agent::AGENT)
        .arg("agent")
        .arg("--policy-dir")
        .arg(&pol)
        .arg("--drbdsetup")
        .arg(format!("{SIM} --replay {}", script.display()))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // a slow reader of the debugger's output (a busy log pipeline): 4 KiB every 50 ms
    let mut out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while out.read(&mut buf).is_ok_and(|n| n > 0) {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let metric = |name: &str| -> f64 {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/metrics"))
            .and_then(|r| r.text())
            .unwrap_or_default()
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(60), || metric(
            "drbdreactor_events2_lines_total"
        ) >= 20_000.0),
        "the stream was not read"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t.elapsed();
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    eprintln!("figure: SIGTERM to exit with a backlog of ~20 000 updates: {took:?}");
    assert!(status.is_some(), "still running {took:?} after SIGTERM");
    assert!(
        took < Duration::from_millis(8500),
        "exit took {took:?}: 8 s in all is documented (0.5 s more for this test's polling)"
    );
}

/// Issue #15: file-mode policy parsing read any file whole on the agent's loop (1 GB: 1 GB of memory and
/// the loop stalled). It is bounded (1 MiB, nesting limited), the policies in force stay, events apply.
#[test]
fn a_huge_policy_file_is_rejected_without_reading_it_and_the_agent_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let pol = dir.path().join("policies");
    debugger_policy(&pol);
    let (dump, name) = dump();
    let script = dir.path().join("stream.txt");
    let mut s = format!("{dump}exists -\n#@sleep 3000\n");
    for _ in 0..20 {
        s.push_str(&format!(
            "change resource name:{name} role:Primary\n#@sleep 200\nchange resource name:{name} role:Secondary\n#@sleep 200\n"
        ));
    }
    write(&script, &s);
    let agent = Agent::start(&pol, &script, &["--policy-poll-interval", "1"]);
    agent.wait_for("ready", Duration::from_secs(20), |a| {
        a.get("/readyz").0 == 200
    });
    let lines_before = agent.metric("drbdreactor_events2_lines_total").unwrap();
    // 1 GiB (sparse) and a deeply nested one
    std::fs::File::create(pol.join("huge.yaml"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    std::fs::write(
        pol.join("deep.yaml"),
        format!("{}{}", "[".repeat(200_000), "]".repeat(200_000)),
    )
    .unwrap();
    agent.wait_for("both files reported", Duration::from_secs(20), |a| {
        let st = a.status().to_string();
        st.contains("too large: 1073741824 bytes") && st.contains("nested deeper than 128 levels")
    });
    let st = agent.status();
    let plugins = st["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 1, "{st:#}");
    assert_eq!(plugins[0]["state"], "running");
    assert_eq!(plugins[0]["restarts"], 0);
    agent.wait_for("events still applied", Duration::from_secs(20), |a| {
        a.metric("drbdreactor_events2_lines_total").unwrap() >= lines_before + 4.0
    });
    assert_eq!(agent.get("/readyz").0, 200);
    let hwm = vm_hwm_kib(agent.child.id());
    assert!(hwm < 64 * 1024, "peak RSS {hwm} KiB");
}
