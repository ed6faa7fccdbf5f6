//! Promoter reaction latency: from the `events2` line that loses quorum to the `StopUnit` call arriving on
//! the bus. `cargo bench --bench promoter_latency` (root: it boots a throw-away systemd, see
//! tests/infra/systemd/README.md).
//!
//! Setup: a real systemd with a dbus-daemon in private namespaces; the agent binary (release build of this
//! crate) driving it over D-Bus, with a promoter policy of 1 resp. 1000 resources; as its drbdsetup this
//! very binary in relay mode (`--relay FIFO DUMP`), which prints a dump (every resource Primary with
//! quorum) and then copies each line the benchmark writes into FIFO to the agent's pipe at once. On the
//! bus side a monitor connection (`BecomeMonitor`, in this process, on its own thread) timestamps every
//! `StopUnit` call as the bus daemon routes it. One run: write `change device … quorum:no` for one
//! resource, wait for `StopUnit(drbd-services@RES.target)` on the monitor; the latency is monitor time −
//! write time (one monotonic clock: both ends are in this process). Then wait for the agent's
//! `StopUnit(drbd-promote@RES.service)` (it follows once the target is stopped) and 30 ms for systemd
//! to run the demotion, write `quorum:yes`, and wait 10 ms more: each run starts on a settled system.
//!
//! Also measured, for the breakdown: our D-Bus client alone (`DbusManager::stop_unit` call → monitor).
//! Env: BENCH_RUNS (default 1000), BENCH_RESOURCES (default "1,1000"), BENCH_AGENT_LOG (the agent's
//! RUST_LOG, default `warn`; e.g. `warn,systemd=debug,promoter=debug`), BENCH_TRACE (a file path: each
//! run's write time and latency go to `PATH.<resources>`, to line up with the agent's log),
//! BENCH_CLIENT_PAUSE_MS (idle time before each call of the client-alone measurement, default 0).

#[path = "../tests/common/systemd.rs"]
mod sdns;

use drbd_reactor::systemd::{DbusManager, DbusOptions, ServiceManager};
use futures::StreamExt;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// No `-` in the names: systemd would escape it (`\\x2d`) in the target's name.
fn res_name(i: usize) -> String {
    format!("r{i:05}")
}

fn device_line(verb: &str, res: &str, quorum: &str) -> String {
    format!(
        "{verb} device name:{res} volume:0 minor:{} backing_dev:/dev/vg/{res} disk:UpToDate client:no open:no quorum:{quorum} size:10485760 read:0 written:0 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no",
        1000 + res[1..].parse::<u32>().unwrap_or(0)
    )
}

fn dump(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let r = res_name(i);
        let _ = writeln!(s, "exists resource name:{r} role:Primary suspended:no force-io-failures:no write-ordering:flush may_promote:no promotion_score:10102");
        for p in 1..=2 {
            let _ = writeln!(s, "exists connection name:{r} peer-node-id:{p} conn-name:node-{p} connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0");
        }
        let _ = writeln!(s, "{}", device_line("exists", &r, "yes"));
        for p in 1..=2 {
            let _ = writeln!(s, "exists peer-device name:{r} peer-node-id:{p} conn-name:node-{p} volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0");
        }
    }
    s.push_str("exists -\n");
    s
}

/// Relay mode: `--relay FIFO DUMP <drbdsetup args>`. `events2`: print DUMP, then every line written into
/// FIFO, flushed one by one, until stdin (the agent's `--poll` pipe) closes. `show RES`: the resource's
/// options as drbd-sim prints them (quorum majority, the split-brain-avoidance policy the promoter
/// detects). Anything else: `[]`, as drbdsetup prints for an unknown resource.
fn relay(args: &[String]) -> ! {
    let (fifo, dump) = (&args[0], &args[1]);
    let rest = &args[2..];
    if let Some(i) = rest.iter().position(|a| a == "show") {
        let res = rest.get(i + 1).cloned().unwrap_or_default();
        let conn = |p: u32| {
            format!(
                r#"{{"net":{{"fencing":"dont-care","rr-conflict":"disconnect","allow-two-primaries":false,"_name":"node-{p}"}},"_peer_node_id":{p}}}"#
            )
        };
        println!(
            r#"[{{"resource":"{res}","options":{{"on-no-data-accessible":"io-error","auto-promote":false,"quorum":"majority","on-no-quorum":"io-error","on-suspended-primary-outdated":"disconnect"}},"_this_host":{{"node-id":0,"volumes":[{{"volume_nr":0,"device_minor":1000,"meta-disk":"internal"}}]}},"connections":[{},{}]}}]"#,
            conn(1),
            conn(2)
        );
        std::process::exit(0);
    }
    if !rest.iter().any(|a| a == "events2") {
        println!("[]");
        std::process::exit(0);
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&std::fs::read(dump).unwrap_or_default());
    let _ = out.flush();
    // `--poll` writes to stdin; end with the agent.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let Ok(f) = std::fs::File::open(fifo) else {
        std::process::exit(1)
    };
    for line in BufReader::new(f).lines().map_while(Result::ok) {
        if out.write_all(line.as_bytes()).is_err()
            || out.write_all(b"\n").is_err()
            || out.flush().is_err()
        {
            std::process::exit(0);
        }
    }
    // The bench closed the FIFO: stay until the agent stops us.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// What the monitor sends instead of a unit when its connection broke and it monitors again: calls made
/// in between were not seen, so the run in progress has no measurement.
const MONITOR_RESTARTED: &str = "";

/// Runs a bus monitor on its own thread and runtime; sends (arrival time, unit) for every StopUnit call,
/// and [`MONITOR_RESTARTED`] when it had to reconnect.
fn monitor(bus: String) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut first = true;
            loop {
                let Ok((_c, mut s)) =
                    sdns::bus_monitor(&bus, &["type='method_call',member='StopUnit'"]).await
                else {
                    // The bus is gone (the benchmark's systemd stopped).
                    return;
                };
                if first {
                    let _ = ready_tx.send(());
                    first = false;
                } else if tx.send((Instant::now(), MONITOR_RESTARTED.into())).is_err() {
                    return;
                }
                while let Some(m) = s.next().await {
                    let at = Instant::now();
                    let m = match m {
                        Ok(m) => m,
                        Err(e) => {
                            eprintln!("bus monitor: {e}");
                            break;
                        }
                    };
                    if m.header().member().map(|x| x.as_str()) != Some("StopUnit") {
                        continue;
                    }
                    if let Ok((unit, _mode)) = m.body().deserialize::<(String, String)>() {
                        if tx.send((at, unit)).is_err() {
                            return;
                        }
                    }
                }
                eprintln!("bus monitor: connection lost; monitoring again");
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("monitor ready");
    rx
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "n={} p50={:.3} ms p99={:.3} ms max={:.3} ms",
        v.len(),
        p(0.50).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

fn agent_binary() -> PathBuf {
    // benches run from target/release/deps/promoter_latency-HASH; the agent is target/release/drbd-reactor.
    let me = std::env::current_exe().expect("current exe");
    let dir = me.parent().and_then(Path::parent).expect("target dir");
    let a = dir.join("drbd-reactor");
    assert!(
        a.exists(),
        "{} missing: run `cargo build --release --bin drbd-reactor` first",
        a.display()
    );
    a
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn bench_agent(ns: &sdns::SystemdNs, n: usize, runs: usize) -> Vec<Duration> {
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("events2.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let dump_file = work.path().join("dump");
    std::fs::write(&dump_file, dump(n)).unwrap();
    let policies = work.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let mut yaml = String::from(
        "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: bench\nspec:\n  promoter:\n    resources:\n",
    );
    for i in 0..n {
        let _ = writeln!(
            yaml,
            "    - name: {}\n      start: [svc-{i}.service]\n      adjustResourceOnStart: false",
            res_name(i)
        );
    }
    std::fs::write(policies.join("bench.yaml"), yaml).unwrap();
    let me = std::env::current_exe().unwrap();
    let port = free_port();
    let agent = Command::new(agent_binary())
        .arg("agent")
        .arg("--policy-dir")
        .arg(&policies)
        .arg("--node-name")
        .arg("bench")
        .arg("--drbdsetup")
        .arg(format!(
            "{} --relay {} {}",
            me.display(),
            fifo.display(),
            dump_file.display()
        ))
        .arg("--drbdadm")
        .arg("true")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--systemd-bus")
        .arg(&ns.bus)
        .arg("--unit-dir")
        .arg(&ns.unit_dir)
        .arg("--units-drbdsetup")
        .arg("true")
        .arg("--umh-script-dir")
        .arg(work.path().join("umh"))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _agent = Killed(agent);
    let mut fifo_w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // Ready: every resource shows up in the promoter's status.
    let t = Instant::now();
    loop {
        let st = http_get(port, "/status").unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&st).unwrap_or_default();
        let count = v["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["detail"]["resources"].as_array())
            .map(|r| r.len())
            .sum::<usize>();
        if count == n && v["source"]["initialDumpComplete"] == true {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "agent not ready: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the initial file writing, reload and detection settle.
    std::thread::sleep(Duration::from_secs(2));
    let mon = monitor(ns.bus.clone());
    while mon.try_recv().is_ok() {}
    let mut lat = Vec::with_capacity(runs);
    let mut lost = 0usize;
    // BENCH_TRACE=FILE: per run "index resource write-time(unix s) latency(ns)", to line up with the
    // agent's own timestamps (BENCH_AGENT_LOG=warn,systemd=debug logs each D-Bus call).
    let mut trace = std::env::var_os("BENCH_TRACE").map(|p| {
        std::fs::File::create(format!("{}.{n}", p.to_string_lossy())).expect("BENCH_TRACE file")
    });
    for k in 0..runs {
        let r = res_name(k * 7919 % n);
        let unit = format!("drbd-services@{r}.target");
        let wall0 = std::time::SystemTime::now();
        let t0 = Instant::now();
        fifo_w
            .write_all(format!("{}\n", device_line("change", &r, "no")).as_bytes())
            .unwrap();
        let deadline = t0 + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, u) = mon.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "run {k}: no StopUnit({unit}) within 30 s; the agent's /status:\n{}",
                    http_get(port, "/status").unwrap_or_default()
                )
            });
            if u == unit {
                lat.push(at.saturating_duration_since(t0));
                if let Some(f) = trace.as_mut() {
                    let w = wall0
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    let _ = writeln!(
                        f,
                        "{k} {r} {}.{:09} {}",
                        w.as_secs(),
                        w.subsec_nanos(),
                        at.saturating_duration_since(t0).as_nanos()
                    );
                }
                break;
            }
            if u == MONITOR_RESTARTED {
                eprintln!("run {k}: the bus monitor reconnected meanwhile; no measurement");
                lost += 1;
                break;
            }
        }
        // The agent stops the promote unit (the demotion) once the target's stop job is done; wait for
        // that call, then give systemd time to run the demotion, so that the next run does not
        // compete with this one's aftermath for the two CPUs.
        let promote = format!("drbd-promote@{r}.service");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = mon
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("run {k}: no StopUnit({promote}) within 30 s"))
                .1;
            if u == promote {
                break;
            }
            if u == MONITOR_RESTARTED {
                // The call may have been missed: just let everything settle.
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(30));
        fifo_w
            .write_all(format!("{}\n", device_line("change", &r, "yes")).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    if lost > 0 {
        println!(
            "{lost} of {runs} runs without a measurement: the bus monitor lost its connection"
        );
    }
    lat
}

fn bench_client(ns: &sdns::SystemdNs, runs: usize) -> Vec<Duration> {
    let mon = monitor(ns.bus.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    ns.write_unit(
        "bench-idle.service",
        "[Service]\nExecStart=/bin/sleep infinity\n",
    );
    let m = DbusManager::new(&ns.bus, DbusOptions::default()).unwrap();
    rt.block_on(m.reload()).unwrap();
    let unit = "bench-idle.service".to_string();
    let mut lat = Vec::with_capacity(runs);
    // BENCH_CLIENT_PAUSE_MS: idle time before each call (default 0: back to back), to compare with the
    // agent's runs, which start on a settled, idle system.
    let pause = Duration::from_millis(
        std::env::var("BENCH_CLIENT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    for _ in 0..runs {
        std::thread::sleep(pause);
        let t0 = Instant::now();
        // An inactive unit: the job is done at once; what counts is when the call reached the bus.
        rt.block_on(m.stop_unit(&unit)).unwrap();
        loop {
            let (at, u) = mon.recv_timeout(Duration::from_secs(30)).unwrap();
            if u == unit {
                lat.push(at.saturating_duration_since(t0));
                break;
            }
            if u == MONITOR_RESTARTED {
                eprintln!("the bus monitor reconnected meanwhile; no measurement");
                break;
            }
        }
    }
    lat
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        relay(&args[2..]);
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let sizes: Vec<usize> = std::env::var("BENCH_RESOURCES")
        .unwrap_or_else(|_| "1,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let Some(ns) = sdns::SystemdNs::boot("promoter_latency") else {
        return;
    };
    println!(
        "D-Bus client alone (DbusManager::stop_unit → StopUnit on the bus): {}",
        percentiles(bench_client(&ns, runs))
    );
    drop(ns);
    for n in sizes {
        let Some(ns) = sdns::SystemdNs::boot("promoter_latency") else {
            return;
        };
        let lat = bench_agent(&ns, n, runs);
        println!(
            "events2 quorum-loss line → StopUnit on the bus, {n} resource(s): {}",
            percentiles(lat)
        );
    }
}
