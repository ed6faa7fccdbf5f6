//! End to end with the real tools: the agent binary (fed by `drbd-sim --replay`) serves `/metrics`, a real
//! Prometheus server on loopback scrapes it, and its HTTP query API must show what the scripted events
//! did (role change, connection loss, quorum loss, resync progress). Also checks the HTTP details of
//! `/metrics` (Content-Type, gzip), `promtool check metrics` on the agent's whole output, how two
//! policies combine, and that the DRBD families go away with the last policy that enables the exporter.
//!
//! Needs `prometheus` and `promtool` (Debian package `prometheus`). Without them the test is skipped with
//! a loud message, unless `CI` is set: then it fails.

mod common;

use common::{free_port, tool_or_skip};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when the guard goes away, also when the test panics.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child, log }
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- last lines of {} ---\n{}", self.name, self.log_tail());
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

/// Values of an instant query, or None when the query failed.
fn query(prom: u16, q: &str) -> Option<Vec<(serde_json::Value, String)>> {
    let url = format!(
        "http://127.0.0.1:{prom}/api/v1/query?query={}",
        urlencode(q)
    );
    let body = client().get(url).send().ok()?.text().ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if v["status"] != "success" {
        return None;
    }
    Some(
        v["data"]["result"]
            .as_array()?
            .iter()
            .map(|r| {
                (
                    r["metric"].clone(),
                    r["value"][1].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// The single value of a query.
fn query_one(prom: u16, q: &str) -> Option<String> {
    match query(prom, q)?.as_slice() {
        [(_, v)] => Some(v.clone()),
        _ => None,
    }
}

const SCRIPT: &str = r#"# A three-node resource seen from the local node: node-b (id 1) and node-c (id 2) are its peers.
exists resource name:web role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102
exists connection name:web peer-node-id:1 conn-name:node-b connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0
exists connection name:web peer-node-id:2 conn-name:node-c connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0
exists device name:web volume:0 minor:1000 backing_dev:/dev/vg/web disk:UpToDate client:no open:no quorum:yes size:1048576 read:100 written:200 al-writes:1 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no
exists peer-device name:web peer-node-id:1 conn-name:node-b volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
exists peer-device name:web peer-node-id:2 conn-name:node-c volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0
exists path name:web peer-node-id:1 conn-name:node-b local:ipv4:10.0.0.1:7000 peer:ipv4:10.0.0.2:7000 established:yes
exists path name:web peer-node-id:2 conn-name:node-c local:ipv4:10.0.0.1:7000 peer:ipv4:10.0.0.3:7000 established:yes
exists -
#@sleep 4000
# Role change: promoted here.
change resource name:web role:Primary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:10102
change device name:web volume:0 minor:1000 backing_dev:/dev/vg/web disk:UpToDate client:no open:yes quorum:yes size:1048576 read:100 written:4296 al-writes:3 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no
#@sleep 2000
# Connection loss: node-c goes away.
change connection name:web peer-node-id:2 conn-name:node-c connection:Connecting role:Unknown congested:no ap-in-flight:0 rs-in-flight:0
change peer-device name:web peer-node-id:2 conn-name:node-c volume:0 replication:Off peer-disk:DUnknown peer-client:no resync-suspended:no received:0 sent:4096 out-of-sync:0 pending:0 unacked:0
change path name:web peer-node-id:2 conn-name:node-c local:ipv4:10.0.0.1:7000 peer:ipv4:10.0.0.3:7000 established:no
#@sleep 2000
# Quorum loss: node-b goes away too; I/O is suspended.
change resource name:web role:Primary suspended:quorum force-io-failures:no write-ordering:flush may_promote:no promotion_score:10102
change connection name:web peer-node-id:1 conn-name:node-b connection:Connecting role:Unknown congested:no ap-in-flight:0 rs-in-flight:0
change device name:web volume:0 minor:1000 backing_dev:/dev/vg/web disk:UpToDate client:no open:yes quorum:no size:1048576 read:100 written:4296 al-writes:3 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no
change peer-device name:web peer-node-id:1 conn-name:node-b volume:0 replication:Off peer-disk:DUnknown peer-client:no resync-suspended:no received:0 sent:4096 out-of-sync:0 pending:0 unacked:0
change path name:web peer-node-id:1 conn-name:node-b local:ipv4:10.0.0.1:7000 peer:ipv4:10.0.0.2:7000 established:no
#@sleep 2000
# node-b is back: quorum regained, I/O resumes, and node-b is resynced from here.
change connection name:web peer-node-id:1 conn-name:node-b connection:Connected role:Secondary congested:no ap-in-flight:8 rs-in-flight:2048
change path name:web peer-node-id:1 conn-name:node-b local:ipv4:10.0.0.1:7000 peer:ipv4:10.0.0.2:7000 established:yes
change device name:web volume:0 minor:1000 backing_dev:/dev/vg/web disk:UpToDate client:no open:yes quorum:yes size:1048576 read:100 written:4296 al-writes:3 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no
change resource name:web role:Primary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:10102
change peer-device name:web peer-node-id:1 conn-name:node-b volume:0 replication:SyncSource peer-disk:Inconsistent peer-client:no resync-suspended:no done:10.00 received:0 sent:8192 out-of-sync:524288 pending:2 unacked:0 dbdt1:12.50 eta:60
#@sleep 2000
change peer-device name:web peer-node-id:1 conn-name:node-b volume:0 replication:SyncSource peer-disk:Inconsistent peer-client:no resync-suspended:no done:75.00 received:0 sent:401408 out-of-sync:131072 pending:1 unacked:0 dbdt1:10.00 eta:12
"#;

const FAKE_DRBDADM: &str = "#!/bin/sh\n# drbdadm --version of drbd-utils 9.30.0 with kernel module 9.2.12\n[ \"$1\" = --version ] || exit 1\nprintf 'DRBDADM_BUILDTAG=GIT-hash:\\\\ 0000\\nDRBDADM_API_VERSION=2\\nDRBD_KERNEL_VERSION_CODE=0x09020c\\nDRBD_KERNEL_VERSION=9.2.12\\nDRBDADM_VERSION_CODE=0x091e00\\nDRBDADM_VERSION=9.30.0\\n'\n";

fn policy(name: &str, section: &str) -> String {
    format!(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n  prometheus: {section}\n"
    )
}

/// Content-Type, Content-Encoding, Vary and the raw body of a `/metrics` response.
type MetricsResponse = (String, Option<String>, Option<String>, Vec<u8>);

fn get_metrics(agent: u16, gzip: bool) -> Option<MetricsResponse> {
    let mut req = client().get(format!("http://127.0.0.1:{agent}/metrics"));
    if gzip {
        req = req.header("accept-encoding", "gzip");
    }
    let resp = req.send().ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let ct = header("content-type")?;
    let ce = header("content-encoding");
    let vary = header("vary");
    let body = resp.bytes().ok()?.to_vec();
    Some((ct, ce, vary, body))
}

fn metrics_text(agent: u16) -> Option<String> {
    get_metrics(agent, false).map(|(_, _, _, b)| String::from_utf8_lossy(&b).into_owned())
}

fn promtool_ok(promtool: &Path, text: &str) {
    let mut c = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    c.stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("write");
    let out = c.wait_with_output().expect("promtool");
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    let accepted = [
        "drbd_peerdevice_sent_bytes counter metrics should have \"_total\" suffix",
        "drbd_peerdevice_received_bytes counter metrics should have \"_total\" suffix",
    ];
    let unexpected: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !accepted.contains(l))
        .collect();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && unexpected.is_empty(),
        "promtool check metrics on the agent's /metrics: exit {:?}: {report}",
        out.status.code()
    );
}

#[test]
fn prometheus_scrapes_the_agent() {
    const TEST: &str = "prometheus_scrapes_the_agent";
    let Some(prometheus) = tool_or_skip("prometheus", TEST) else {
        return;
    };
    let Some(promtool) = tool_or_skip("promtool", TEST) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let policies = d.join("policies");
    std::fs::create_dir(&policies).expect("mkdir");
    let script = d.join("scenario.replay");
    std::fs::write(&script, SCRIPT).expect("script");
    let drbdadm = d.join("drbdadm");
    std::fs::write(&drbdadm, FAKE_DRBDADM).expect("drbdadm");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&drbdadm, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    // Two policies enable the exporter; one asks for the enum families.
    std::fs::write(policies.join("metrics.yaml"), policy("metrics", "{}")).expect("policy");
    std::fs::write(
        policies.join("metrics-enums.yaml"),
        policy("metrics-enums", "{enums: true}"),
    )
    .expect("policy");

    let agent_port = free_port();
    let prom_port = free_port();
    let config = d.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 250ms\n  scrape_timeout: 250ms\nscrape_configs:\n  - job_name: drbd-reactor\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .expect("config");
    let prom = Proc::spawn(
        "prometheus",
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", d.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .current_dir(d),
        d.join("prometheus.log"),
    );
    wait_for("Prometheus ready", Duration::from_secs(60), || {
        client()
            .get(format!("http://127.0.0.1:{prom_port}/-/ready"))
            .send()
            .ok()
            .filter(|r| r.status().is_success())
            .map(|_| String::new())
    });

    // Prometheus hands new targets to its scrapers only every few seconds: start the agent once the
    // target is known, so that the first phase of the script is scraped too.
    wait_for(
        "the scrape target in Prometheus",
        Duration::from_secs(60),
        || {
            let body = client()
                .get(format!("http://127.0.0.1:{prom_port}/api/v1/targets"))
                .send()
                .ok()?
                .text()
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["data"]["activeTargets"].as_array()?.len() == 1).then(String::new)
        },
    );

    let sim = env!("CARGO_BIN_EXE_drbd-sim");
    let agent = Proc::spawn(
        "agent",
        Command::new(env!("CARGO_BIN_EXE_drbd-reactor"))
            .arg("agent")
            .arg("--policy-dir")
            .arg(&policies)
            .arg("--drbdsetup")
            .arg(format!("{sim} --replay {}", script.display()))
            .arg("--drbdadm")
            .arg(drbdadm.display().to_string())
            .arg("--statistics-interval")
            .arg("1")
            .arg("--listen")
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--node-name")
            .arg("node-a")
            .env("RUST_LOG", "info"),
        d.join("agent.log"),
    );

    // The exporter is up once the policies are read.
    wait_for("DRBD families on /metrics", Duration::from_secs(30), || {
        metrics_text(agent_port).filter(|t| t.contains("drbd_resource_role{name=\"web\""))
    });

    // HTTP: content type, gzip when asked (and only then).
    let (ct, ce, vary, body) = get_metrics(agent_port, false).expect("/metrics");
    assert_eq!(ct, "text/plain; version=0.0.4");
    assert_eq!(ce, None);
    assert_eq!(vary.as_deref(), Some("accept-encoding"));
    let plain = String::from_utf8(body).expect("utf-8");
    let (ct, ce, _, body) = get_metrics(agent_port, true).expect("/metrics gzip");
    assert_eq!(ct, "text/plain; version=0.0.4");
    assert_eq!(ce.as_deref(), Some("gzip"));
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut unzipped)
        .expect("valid gzip");
    assert!(unzipped.contains("drbdreactor_up 1"), "{unzipped}");
    assert!(body.len() < unzipped.len());
    // The agent's own families are there too, and promtool accepts the whole output.
    for family in [
        "drbdreactor_events2_lines_total",
        "drbdreactor_events2_malformed_lines_total",
        "drbdreactor_drbdsetup_restarts_total",
        "drbdreactor_initial_dump_complete",
        "drbdreactor_reloads_total",
        "drbdreactor_plugin_instances",
        "drbdreactor_plugin_errors_total",
        "drbdreactor_plugin_restarts_total",
        "drbdreactor_drbdsetup_up",
        "drbdreactor_policies",
        "drbdreactor_engine_batch_duration_seconds",
    ] {
        assert!(
            plain.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    assert!(plain.contains("drbdreactor_plugin_instances{state=\"running\",type=\"prometheus\"} 2"));
    promtool_ok(&promtool, &plain);
    // The gzip body is assembled from groups compressed ahead of time: promtool reads it too, and its
    // DRBD families are the plain body's (the agent's own counters may have moved between the two).
    promtool_ok(&promtool, &unzipped);
    let drbd = |t: &str| -> String {
        t.lines()
            .filter(|l| {
                l.starts_with("drbd_")
                    || l.starts_with("# HELP drbd_")
                    || l.starts_with("# TYPE drbd_")
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_eq!(drbd(&unzipped), drbd(&plain));

    // Wait for the end of the scripted sequence as Prometheus sees it.
    let pd_b = r#"name="web",conn_name="node-b",peer_node_id="1",volume="0""#;
    wait_for(
        "the resync progress in Prometheus",
        Duration::from_secs(60),
        || {
            query_one(
                prom_port,
                &format!("drbd_peerdevice_resync_done_ratio{{{pd_b}}}"),
            )
            .filter(|v| v == "0.75")
        },
    );
    let one = |q: &str| -> String {
        query_one(prom_port, q)
            .unwrap_or_else(|| panic!("query {q}: {:?}", query(prom_port, q).unwrap_or_default()))
    };
    let role = |r: &str| format!(r#"drbd_resource_role{{name="web",drbd_resource_role="{r}"}}"#);
    let conn = |peer: &str, id: u32, s: &str| {
        format!(
            r#"drbd_connection_state{{name="web",conn_name="{peer}",peer_node_id="{id}",drbd_connection_state="{s}"}}"#
        )
    };
    let dev = r#"name="web",volume="0",minor="1000""#;

    // Role change: Primary now, Secondary before.
    assert_eq!(one(&role("Primary")), "1");
    assert_eq!(one(&role("Secondary")), "0");
    assert_eq!(
        one(&format!("max_over_time({}[5m])", role("Secondary"))),
        "1"
    );
    assert_eq!(one(r#"drbd_resource_maypromote{name="web"}"#), "0");
    assert_eq!(one(r#"drbd_resource_forceiofailures{name="web"}"#), "0");
    // Quorum loss: seen, then regained; I/O was suspended meanwhile.
    assert_eq!(one(&format!("drbd_device_quorum{{{dev}}}")), "1");
    assert_eq!(
        one(&format!("min_over_time(drbd_device_quorum{{{dev}}}[5m])")),
        "0"
    );
    assert_eq!(
        one(r#"max_over_time(drbd_resource_suspended{name="web"}[5m])"#),
        "1"
    );
    assert_eq!(one(r#"drbd_resource_suspended{name="web"}"#), "0");
    // Connection loss: node-c stays away, node-b was away and is back.
    assert_eq!(one(&conn("node-c", 2, "Connecting")), "1");
    assert_eq!(one(&conn("node-c", 2, "Connected")), "0");
    assert_eq!(one(&conn("node-b", 1, "Connected")), "1");
    assert_eq!(
        one(&format!(
            "min_over_time({}[5m])",
            conn("node-b", 1, "Connected")
        )),
        "0"
    );
    assert_eq!(
        one(
            r#"drbd_path_established{name="web",conn_name="node-c",peer_node_id="2",local="ipv4:10.0.0.1:7000",peer="ipv4:10.0.0.3:7000"}"#
        ),
        "0"
    );
    assert_eq!(
        one(
            r#"drbd_peerdevice_peer_disk_state{name="web",conn_name="node-c",peer_node_id="2",volume="0",drbd_peerdevice_peer_disk_state="DUnknown"}"#
        ),
        "1"
    );
    // Resync progress towards node-b.
    assert_eq!(
        one(&format!(
            r#"drbd_peerdevice_replication_state{{{pd_b},drbd_peerdevice_replication_state="SyncSource"}}"#
        )),
        "1"
    );
    assert_eq!(
        one(&format!("drbd_peerdevice_resync_eta_seconds{{{pd_b}}}")),
        "12"
    );
    assert_eq!(
        one(&format!("drbd_peerdevice_outofsync_bytes{{{pd_b}}}")),
        (131072u64 * 1024).to_string()
    );
    assert_eq!(
        one(&format!("drbd_peerdevice_sent_bytes{{{pd_b}}}")),
        (401408u64 * 1024).to_string()
    );
    assert_eq!(
        one(&format!("drbd_peerdevice_pending_requests{{{pd_b}}}")),
        "1"
    );
    assert_eq!(
        one(r#"drbd_connection_rsinflight_bytes{name="web",conn_name="node-b",peer_node_id="1"}"#),
        (2048u64 * 512).to_string()
    );
    assert_eq!(
        one(&format!("drbd_device_written_bytes_total{{{dev}}}")),
        (4296u64 * 1024).to_string()
    );
    // Upstream's identity families.
    assert_eq!(one("drbdreactor_up"), "1");
    assert_eq!(one(r#"drbd_version{kmod="9.2.12",utils="9.30.0"}"#), "1");
    assert_eq!(one("drbd_resource_resources"), "1");
    assert_eq!(one("drbdreactor_initial_dump_complete"), "1");
    assert_eq!(one(r#"up{job="drbd-reactor"}"#), "1");

    // Without the policy that asks for enums, the enum families go; the others stay.
    std::fs::remove_file(policies.join("metrics-enums.yaml")).expect("rm");
    let t = wait_for("enum families gone", Duration::from_secs(30), || {
        metrics_text(agent_port).filter(|t| !t.contains("# TYPE drbd_resource_role "))
    });
    assert!(t.contains("drbd_resource_suspended{name=\"web\"} 0"), "{t}");
    // Without any exporter policy, only the agent's own families remain.
    std::fs::remove_file(policies.join("metrics.yaml")).expect("rm");
    let t = wait_for("DRBD families gone", Duration::from_secs(30), || {
        metrics_text(agent_port).filter(|t| !t.contains("drbdreactor_up"))
    });
    assert!(!t.contains("drbd_"), "{t}");
    assert!(t.contains("drbdreactor_events2_lines_total"), "{t}");
    promtool_ok(&promtool, &t);

    drop(agent);
    drop(prom);
}
