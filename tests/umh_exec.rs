//! UMH with real scripts written by the tests: the plugin runs in-process, fed with updates the real
//! engine derives from events2 lines; what the scripts saw is asserted from the files they wrote.

use drbd_reactor::engine::update::Update;
use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::umh::{exec, resolve_scripts, UmhOptions};
use drbd_reactor::plugins::{
    channel, Builtin, DetailHandle, InstanceSpec, Outbox, PluginCtx, PluginError, PluginFactory,
};
use drbd_reactor::policy::files::PolicyDir;
use drbd_reactor::policy::{desired_instances, parse_documents};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn doc(umh: &str) -> String {
    format!(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: t\nspec:\n  umh:\n{}",
        umh.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    )
}

fn specs(umh: &str, policy_dir: &Path) -> Vec<InstanceSpec> {
    let ps = parse_documents(&doc(umh)).unwrap();
    let mut s = desired_instances(&ps, &BTreeMap::new());
    resolve_scripts(&mut s, policy_dir);
    s
}

fn write_script(dir: &Path, name: &str, body: &str) {
    std::fs::write(dir.join(name), body).unwrap();
}

struct Harness {
    outbox: Outbox,
    task: tokio::task::JoinHandle<Result<(), PluginError>>,
    metrics: AgentMetrics,
    detail: DetailHandle,
    engine: Engine,
}

impl Harness {
    fn start(umh: &str, policy_dir: &Path, opts: UmhOptions) -> Harness {
        let spec = specs(umh, policy_dir).remove(0);
        let plugin = Builtin::default()
            .with_umh(opts)
            .build(&spec)
            .unwrap_or_else(|e| panic!("{e}"));
        let (outbox, inbox) = channel(plugin.subscription());
        let metrics = AgentMetrics::new();
        let detail = DetailHandle::default();
        let ctx = PluginCtx {
            id: spec.id.clone(),
            node_name: "node-a".into(),
            metrics: metrics.clone(),
            detail: detail.clone(),
            events: Default::default(),
        };
        let task = tokio::spawn(plugin.run(inbox, ctx));
        Harness {
            outbox,
            task,
            metrics,
            detail,
            engine: Engine::new(),
        }
    }

    /// Applies events2 lines and delivers the updates they cause.
    fn feed(&mut self, lines: &str) -> Vec<Arc<Update>> {
        let mut out = Vec::new();
        for l in lines.lines().filter(|l| !l.starts_with('#')) {
            self.engine.apply_line(l, &mut out);
        }
        let out: Vec<Arc<Update>> = out.into_iter().map(Arc::new).collect();
        for u in &out {
            self.outbox.send(u);
        }
        out
    }

    fn runs(&self, rule: &str, result: &str) -> u64 {
        self.metrics
            .umh_runs
            .with_label_values(&["t", rule, result])
            .get()
    }

    async fn stop(mut self) {
        self.outbox.close();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("instance stops")
            .unwrap()
            .unwrap();
    }
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

fn opts(scratch: &Path) -> UmhOptions {
    UmhOptions {
        script_dir: scratch.join("scripts"),
        host_exec: vec!["/usr/bin/env".into(), "UMH_VIA_HOST_EXEC=yes".into()],
        host_commands: true,
    }
}

fn sample(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/events2")
            .join(format!("{name}.txt")),
    )
    .unwrap()
}

fn env_file(p: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

const ENV_SCRIPT: &str =
    "#!/bin/sh\nenv > \"$OUT/$DRBD_RULE_NAME.$DRBD_EVENT_TYPE.tmp\"\nmv \"$OUT/$DRBD_RULE_NAME.$DRBD_EVENT_TYPE.tmp\" \"$OUT/$DRBD_RULE_NAME.$DRBD_EVENT_TYPE.env\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_reaches_the_script_for_every_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(pol.join("scripts")).unwrap();
    std::fs::create_dir(&out).unwrap();
    write_script(&pol.join("scripts"), "env.sh", ENV_SCRIPT);
    let common = format!(
        "  script: {{path: scripts/env.sh}}\n  env: {{OUT: {}}}\n",
        out.display()
    );
    let umh = format!(
        "resource:\n- name: res\n  eventType: change\n{common}device:\n- name: dev\n  eventType: change\n{common}peerDevice:\n- name: pd\n  eventType: change\n{common}connection:\n- name: conn\n  eventType: change\n{common}helper:\n- name: helper\n  where: host\n{common}"
    );
    let mut h = Harness::start(&umh, &pol, opts(tmp.path()));
    h.feed(&sample("drbd-utils_events2-sync"));
    h.feed(
        "call helper name:some-resource peer-node-id:1 conn-name:some-peer volume:0 helper:before-resync-target\n\
         response helper name:some-resource peer-node-id:1 conn-name:some-peer volume:0 helper:before-resync-target status:768",
    );
    let want = [
        "res.change",
        "dev.change",
        "pd.change",
        "conn.change",
        "helper.call",
        "helper.response",
    ];
    wait_for("every rule's env file", Duration::from_secs(20), || {
        want.iter().all(|w| out.join(format!("{w}.env")).exists())
    })
    .await;
    let e = env_file(&out.join("res.change.env"));
    for (k, v) in [
        ("DRBD_RES_NAME", "some-resource"),
        ("DRBD_OLD_MAY_PROMOTE", "false"),
        ("DRBD_NEW_MAY_PROMOTE", "true"),
        ("DRBD_OLD_ROLE", "Secondary"),
        ("DRBD_NEW_ROLE", "Secondary"),
        ("DRBD_NEW_PROMOTION_SCORE", "10101"),
        ("DRBD_NODE_NAME", "node-a"),
        ("DRBD_EVENT_TYPE", "change"),
        ("DRBD_POLICY_NAME", "t"),
        ("DRBD_RULE_NAME", "res"),
        ("HOME", "/"),
        ("PATH", drbd_reactor::plugins::umh::env::MINIMAL_PATH),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k}: {e:?}");
    }
    // nothing of the agent's own environment (cargo sets CARGO_* for tests)
    assert!(
        !e.keys().any(|k| k.starts_with("CARGO") || k == "RUST_LOG"),
        "{e:?}"
    );
    let e = env_file(&out.join("dev.change.env"));
    for (k, v) in [
        ("DRBD_VOLUME", "0"),
        ("DRBD_MINOR", "1000"),
        ("DRBD_MINOR_0", "1000"),
        ("DRBD_BACKING_DEV", "/dev/sda"),
        ("DRBD_OLD_DISK_STATE", "Diskless"),
        ("DRBD_NEW_DISK_STATE", "UpToDate"),
        ("DRBD_OLD_OPEN", "false"),
        ("DRBD_NEW_OPEN", "false"),
        ("DRBD_OLD_QUORUM", "true"),
        ("DRBD_NEW_CLIENT", "false"),
        ("DRBD_NEW_SIZE", "0"),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k}: {e:?}");
    }
    let e = env_file(&out.join("pd.change.env"));
    for (k, v) in [
        ("DRBD_VOLUME", "0"),
        ("DRBD_PEER_NODE_ID", "1"),
        ("DRBD_CONN_NAME", "some-peer"),
        ("DRBD_OLD_PEER_REPLICATION_STATE", "Off"),
        ("DRBD_NEW_PEER_REPLICATION_STATE", "SyncSource"),
        ("DRBD_NEW_PEER_DISK_STATE", "Inconsistent"),
        ("DRBD_NEW_PEER_CLIENT", "false"),
        ("DRBD_NEW_PEER_RESYNC_SUSPENDED", "no"),
        ("DRBD_BACKING_DEV", "/dev/sda"),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k}: {e:?}");
    }
    let e = env_file(&out.join("conn.change.env"));
    for (k, v) in [
        ("DRBD_PEER_NODE_ID", "1"),
        ("DRBD_CSTATE", "Connected"),
        ("DRBD_OLD_CONN_STATE", "StandAlone"),
        ("DRBD_NEW_CONN_STATE", "Connected"),
        ("DRBD_OLD_CONN_NAME", "some-peer"),
        ("DRBD_NEW_PEER_ROLE", "Secondary"),
        ("DRBD_OLD_CONGESTED", "unknown"),
        ("DRBD_NEW_CONGESTED", "unknown"),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k}: {e:?}");
    }
    // helper rules ran `where: host`: through the host-exec prefix, the script fed on stdin
    let e = env_file(&out.join("helper.response.env"));
    for (k, v) in [
        ("DRBD_HELPER", "before-resync-target"),
        ("DRBD_HELPER_STATUS", "768"),
        ("DRBD_HELPER_EXIT_CODE", "3"),
        ("DRBD_PEER_NODE_ID", "1"),
        ("DRBD_CONN_NAME", "some-peer"),
        ("DRBD_VOLUME", "0"),
        ("DRBD_MINOR", "1000"),
        ("UMH_VIA_HOST_EXEC", "yes"),
    ] {
        assert_eq!(e.get(k).map(String::as_str), Some(v), "{k}: {e:?}");
    }
    let e = env_file(&out.join("helper.call.env"));
    assert_eq!(e["DRBD_HELPER_STATUS"], "");
    assert_eq!(e["DRBD_EVENT_TYPE"], "call");
    // every rule fired exactly once (eventType: change excluded the create lines)
    for r in ["res", "dev", "pd", "conn"] {
        assert_eq!(h.runs(r, "0"), 1, "{r}");
    }
    assert_eq!(h.runs("helper", "0"), 2);
    let hist = h
        .metrics
        .umh_duration
        .with_label_values(&["t", "dev"])
        .get_sample_count();
    assert_eq!(hist, 1);
    h.stop().await;
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // a zombie waiting for init to reap it is dead
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_script_and_its_children() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // directly through the executor: a script whose child ignores nothing and outlives the shell
    let script = tmp.path().join("hang.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nsleep 300 &\necho $! > {0}/child.pid\necho started\nsleep 300\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let t = Instant::now();
    let res = exec::run(exec::RunRequest {
        argv: vec![script.display().to_string()],
        env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
        stdin: None,
        timeout: Duration::from_secs(1),
        kill_grace: Duration::from_secs(2),
        output_limit: 100,
    })
    .await;
    assert_eq!(res.outcome, exec::Outcome::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert_eq!(res.stdout.text(), "started");
    let child: i32 = std::fs::read_to_string(out.join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let leader = res.pid.unwrap() as i32;
    wait_for("the group to die", Duration::from_secs(3), || {
        gone(child) && gone(leader)
    })
    .await;

    // through the plugin: counted as a timeout, and the next run of the rule still happens
    let pol = tmp.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(
        pol.join("hang.sh"),
        format!(
            "#!/bin/sh\nsleep 300 &\necho $! >> {0}/children\nsleep 300\n",
            out.display()
        ),
    )
    .unwrap();
    let mut h = Harness::start(
        "resource:\n- name: hang\n  script: {path: hang.sh}\n  timeoutSeconds: 1\n",
        &pol,
        opts(tmp.path()),
    );
    h.feed("create resource name:r0 role:Secondary\nchange resource name:r0 role:Primary");
    wait_for("two timeouts", Duration::from_secs(15), || {
        h.runs("hang", "timeout") == 2
    })
    .await;
    for pid in lines(&out.join("children")) {
        let pid: i32 = pid.parse().unwrap();
        wait_for("child gone", Duration::from_secs(3), || gone(pid)).await;
    }
    assert_eq!(h.detail.get().unwrap()["timedOut"], 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_triggers_stay_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir(&out).unwrap();
    // each run: under a lock, count itself in, record the maximum; work; count itself out
    std::fs::write(
        pol.join("count.sh"),
        "#!/bin/sh\nset -e\ncd \"$OUT\"\n\
         flock lock sh -c 'n=$(($(cat cur 2>/dev/null || echo 0) + 1)); echo $n > cur; m=$(cat max 2>/dev/null || echo 0); [ $n -gt $m ] && echo $n > max || true'\n\
         sleep 0.15\n\
         flock lock sh -c 'echo $(($(cat cur) - 1)) > cur; echo \"$DRBD_RES_NAME\" >> done'\n",
    )
    .unwrap();
    let mut h = Harness::start(
        &format!(
            "maxConcurrent: 4\nresource:\n- name: count\n  eventType: create\n  script: {{path: count.sh}}\n  env: {{OUT: {}}}\n",
            out.display()
        ),
        &pol,
        opts(tmp.path()),
    );
    let text: String = (0..100)
        .map(|i| format!("create resource name:r{i} role:Secondary\n"))
        .collect();
    let t = Instant::now();
    h.feed(&text);
    wait_for("a hundred runs", Duration::from_secs(60), || {
        h.runs("count", "0") == 100
    })
    .await;
    let max: u32 = std::fs::read_to_string(out.join("max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(max <= 4, "max concurrency {max}");
    assert!(max >= 2, "runs did not overlap at all (max {max})");
    // 100 runs of >= 150 ms, 4 at a time: at least ~3.75 s
    assert!(
        t.elapsed() >= Duration::from_millis(3700),
        "{:?}",
        t.elapsed()
    );
    let mut seen = lines(&out.join("done"));
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 100, "{:?}", lines(&out.join("done")));
    assert_eq!(h.runs("count", "0"), 100);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_for_one_resource_never_overlap_or_reorder() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(
        pol.join("seq.sh"),
        "#!/bin/sh\necho \"start $DRBD_RES_NAME $DRBD_NEW_PROMOTION_SCORE\" >> \"$OUT/log.$DRBD_RES_NAME\"\n\
         sleep 0.0$(( (DRBD_NEW_PROMOTION_SCORE * 7) % 10 ))\n\
         echo \"end $DRBD_RES_NAME $DRBD_NEW_PROMOTION_SCORE\" >> \"$OUT/log.$DRBD_RES_NAME\"\n",
    )
    .unwrap();
    let mut h = Harness::start(
        &format!(
            "maxConcurrent: 8\nresource:\n- name: seq\n  changed: [promotionScore]\n  eventType: change\n  script: {{path: seq.sh}}\n  env: {{OUT: {}}}\n",
            out.display()
        ),
        &pol,
        opts(tmp.path()),
    );
    let mut text = String::from(
        "create resource name:a role:Secondary\ncreate resource name:b role:Secondary\n",
    );
    for i in 1..=20 {
        text.push_str(&format!("change resource name:a promotion_score:{i}\n"));
        text.push_str(&format!("change resource name:b promotion_score:{i}\n"));
    }
    h.feed(&text);
    wait_for("40 runs", Duration::from_secs(30), || {
        h.runs("seq", "0") == 40
    })
    .await;
    for r in ["a", "b"] {
        let want: Vec<String> = (1..=20)
            .flat_map(|i| [format!("start {r} {i}"), format!("end {r} {i}")])
            .collect();
        assert_eq!(lines(&out.join(format!("log.{r}"))), want);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_hanging_scripts_do_not_stop_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir(&out).unwrap();
    let mut h = Harness::start(
        &format!(
            "maxConcurrent: 2\nresource:\n\
             - name: fails\n  command: [/bin/sh, -c, 'echo oops >&2; exit 3']\n\
             - name: hangs\n  command: [/bin/sleep, '300']\n  timeoutSeconds: 1\n\
             - name: missing\n  command: [/nonexistent/program]\n\
             - name: works\n  command: [/bin/sh, -c, 'echo \"$DRBD_RES_NAME\" >> \"$OUT/works\"']\n  env: {{OUT: {}}}\n",
            out.display()
        ),
        &pol,
        opts(tmp.path()),
    );
    h.feed("create resource name:r0 role:Secondary\ncreate resource name:r1 role:Secondary\ncreate resource name:r2 role:Secondary");
    wait_for("all runs", Duration::from_secs(20), || {
        h.runs("works", "0") == 3 && h.runs("hangs", "timeout") == 3
    })
    .await;
    assert_eq!(h.runs("fails", "3"), 3);
    assert_eq!(h.runs("missing", "spawn-error"), 3);
    assert_eq!(h.runs("works", "0"), 3);
    let mut w = lines(&out.join("works"));
    w.sort();
    assert_eq!(w, ["r0", "r1", "r2"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_resource_name_reaches_the_script_verbatim_and_runs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (pol, out) = (tmp.path().join("policies"), tmp.path().join("out"));
    std::fs::create_dir_all(&pol).unwrap();
    std::fs::create_dir(&out).unwrap();
    let pwned = tmp.path().join("pwned");
    // events2 values cannot hold spaces; everything else a shell would act on is here
    let name = format!(
        "x'y\"$(touch${{IFS}}{0});`touch${{IFS}}{0}`;z|&>{0}",
        pwned.display()
    );
    std::fs::write(
        pol.join("name.sh"),
        "#!/bin/sh\nprintf '%s' \"$DRBD_RES_NAME\" > \"$OUT/$DRBD_RULE_NAME\"\nprintf '%s' \"$EXTRA\" > \"$OUT/$DRBD_RULE_NAME.extra\"\n",
    )
    .unwrap();
    let extra = "a b; $(touch /tmp/x) `id` 'q' \"dq\"";
    let env = format!(
        "  env: {{OUT: {}, EXTRA: {}}}\n",
        out.display(),
        serde_json::to_string(extra).unwrap()
    );
    let mut h = Harness::start(
        &format!(
            "resource:\n\
             - name: script\n  script: {{path: name.sh}}\n{env}\
             - name: host\n  where: host\n  script: {{path: name.sh}}\n{env}\
             - name: command\n  command: [/bin/sh, -c, 'printf %s \"$DRBD_RES_NAME\" > \"$OUT/$DRBD_RULE_NAME\"']\n{env}"
        ),
        &pol,
        opts(tmp.path()),
    );
    let ups = h.feed(&format!("create resource name:{name} role:Secondary"));
    assert_eq!(ups.len(), 1, "the engine accepts the name");
    assert_eq!(ups[0].resource, name);
    wait_for("three runs", Duration::from_secs(20), || {
        ["script", "host", "command"]
            .iter()
            .all(|r| h.runs(r, "0") == 1)
    })
    .await;
    for r in ["script", "host", "command"] {
        assert_eq!(std::fs::read_to_string(out.join(r)).unwrap(), name, "{r}");
    }
    for r in ["script", "host"] {
        assert_eq!(
            std::fs::read_to_string(out.join(format!("{r}.extra"))).unwrap(),
            extra
        );
    }
    assert!(!pwned.exists(), "the name was executed");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_private_and_replaced_when_they_change() {
    let tmp = tempfile::tempdir().unwrap();
    let pol = tmp.path().join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    let o = opts(tmp.path());
    let umh = "resource:\n- name: a\n  script: {path: a.sh}\n- name: b\n  script: {path: a.sh}\n";
    std::fs::write(pol.join("a.sh"), "#!/bin/sh\necho one\n").unwrap();
    let s1 = specs(umh, &pol);
    let f = Builtin::default().with_umh(o.clone());
    f.build(&s1[0]).unwrap();
    let dir = o.script_dir.join("t");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&o.script_dir), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("a")), 0o700);
    assert_eq!(
        std::fs::read_to_string(dir.join("a")).unwrap(),
        "#!/bin/sh\necho one\n"
    );
    // same content: same configuration (the instance is kept)
    assert_eq!(specs(umh, &pol), s1);
    // new content: a new configuration, and the file is replaced
    std::fs::write(pol.join("a.sh"), "#!/bin/sh\necho two\n").unwrap();
    let s2 = specs(umh, &pol);
    assert_ne!(s2, s1);
    f.build(&s2[0]).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("b")).unwrap(),
        "#!/bin/sh\necho two\n"
    );
    // a rule that goes takes its file along; no temporary files are left
    let s3 = specs("resource:\n- name: b\n  script: {path: a.sh}\n", &pol);
    f.build(&s3[0]).unwrap();
    let names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(names, vec![dir.join("b")]);
    // missing script, no interpreter line: the instance is not built, the message names the field
    std::fs::write(pol.join("a.sh"), "echo no shebang\n").unwrap();
    let e = f.build(&specs(umh, &pol)[0]).err().unwrap().to_string();
    assert!(
        e.contains("spec.umh.resource[0].script.path:") && e.contains("'#!'"),
        "{e}"
    );
    std::fs::remove_file(pol.join("a.sh")).unwrap();
    let e = f.build(&specs(umh, &pol)[0]).err().unwrap().to_string();
    assert!(
        e.contains("spec.umh.resource[0].script.path: cannot read"),
        "{e}"
    );
    // a script directory owned by someone else is refused
    if unsafe { libc::geteuid() } == 0 {
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        std::fs::write(pol.join("a.sh"), "#!/bin/sh\n").unwrap();
        let f = Builtin::default().with_umh(UmhOptions {
            script_dir: foreign,
            host_exec: vec![],
            host_commands: true,
        });
        let e = f.build(&specs(umh, &pol)[0]).err().unwrap().to_string();
        assert!(e.contains("is owned by uid 65534"), "{e}");
    }
}

#[test]
fn host_commands_are_refused_when_the_agent_runs_without_them() {
    let tmp = tempfile::tempdir().unwrap();
    let umh = "resource:\n- name: on-host\n  command: [\"true\"]\n  where: host\n- name: here\n  command: [\"true\"]\n";
    let mut o = opts(tmp.path());
    o.host_commands = false;
    let f = Builtin::default().with_umh(o.clone());
    let e = f
        .build(&specs(umh, tmp.path())[0])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rule 'on-host' runs where: host") && e.contains("--allow-host-commands=false"),
        "{e}"
    );
    // container rules only: accepted
    let only_here = "resource:\n- name: here\n  command: [\"true\"]\n";
    assert!(f.build(&specs(only_here, tmp.path())[0]).is_ok());
    o.host_commands = true;
    assert!(Builtin::default()
        .with_umh(o)
        .build(&specs(umh, tmp.path())[0])
        .is_ok());
}

#[test]
fn config_map_scripts_are_rejected_in_file_mode() {
    let yaml = doc("device:\n- name: x\n  script: {configMapRef: {name: scripts, key: x.sh}}\n");
    // the policy itself is valid (Kubernetes mode can run it) ...
    assert!(parse_documents(&yaml).is_ok());
    // ... but a policy file asking for it is rejected, naming the field
    let mut d = PolicyDir::new();
    let problems = d.update(BTreeMap::from([(PathBuf::from("/p/a.yaml"), yaml.clone())]));
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].error.starts_with(
            "spec.umh.device[0].script.configMapRef: ConfigMap scripts need Kubernetes mode"
        ),
        "{}",
        problems[0].error
    );
    assert!(d.policies().0.is_empty());
    // and an unresolved reference never starts an instance
    let ps = parse_documents(&yaml).unwrap();
    let mut s = desired_instances(&ps, &BTreeMap::new());
    resolve_scripts(&mut s, Path::new("/nonexistent"));
    let e = Builtin::default().build(&s[0]).err().unwrap().to_string();
    assert!(
        e.contains(
            "spec.umh.device[0].script.configMapRef: ConfigMap scripts need Kubernetes mode"
        ),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_policy_loads_and_its_script_runs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    let text = std::fs::read_to_string(dir.join("umh.yaml")).unwrap();
    let ps = parse_documents(&text).unwrap();
    let mut s = desired_instances(&ps, &BTreeMap::new());
    resolve_scripts(&mut s, &dir);
    let s = s.into_iter().find(|s| s.id.kind == "umh").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(tmp.path());
    Builtin::default().with_umh(o.clone()).build(&s).unwrap();
    // the materialised copy runs with the environment a quorum loss gives it
    let res = exec::run(exec::RunRequest {
        argv: vec![o
            .script_dir
            .join("umh-quorum/quorum-lost")
            .display()
            .to_string()],
        env: BTreeMap::from(
            [
                ("PATH", "/usr/bin:/bin"),
                ("DRBD_NODE_NAME", "node-a"),
                ("DRBD_NEW_QUORUM", "false"),
                ("DRBD_RES_NAME", "r0"),
                ("DRBD_VOLUME", "0"),
                ("DRBD_MINOR", "1000"),
                ("DRBD_NEW_DISK_STATE", "UpToDate"),
                ("QUORUM_LOG_TAG", "umh-test"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        ),
        stdin: None,
        timeout: Duration::from_secs(10),
        kill_grace: Duration::from_secs(1),
        output_limit: 4096,
    })
    .await;
    assert_eq!(
        res.outcome,
        exec::Outcome::Exited(0),
        "{:?}",
        res.stderr.text()
    );
    assert_eq!(
        res.stdout.text(),
        "node-a: quorum lost on r0 volume 0 (minor 1000, disk UpToDate)"
    );
}
