//! Engine throughput and memory on a generated stream of 1000 resources × 2 peers: an `exists` dump,
//! then statistics-heavy `--full` change lines with connection flaps.
//!
//! `cargo bench --bench engine` prints:
//! - parse only, and parse+apply (the engine core), in lines/s on one core;
//! - end to end: chunks through the engine task with one change subscriber and one every-event
//!   subscriber, all on a single-threaded runtime (one core; the generator runs on another thread);
//! - RSS after the dump and at several points of a long stream (must stay flat), and the peak.
//!
//! Env: BENCH_LINES (default 4 000 000) sets the end-to-end stream length, BENCH_CORE_LINES (500 000) the
//! core one; BENCH_PART=core|e2e runs one part only; BENCH_HOLD=0 makes the every-event subscriber drop
//! the states it receives instead of keeping the latest per resource.

use drbd_reactor::drbd::events2::parse_line;
use drbd_reactor::engine::runtime::{self, Health, RuntimeConfig, SourceMsg};
use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::{
    Delivery, Inbox, InstanceId, InstanceSpec, Plugin, PluginCtx, PluginError, PluginFactory,
    Subscription,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RESOURCES: usize = 1000;
const PEERS: u32 = 2;
const CHUNK: usize = 64 * 1024;

fn name(r: usize) -> String {
    format!("pvc-{r:08x}-7108-11e9-8f74-0026b954ca4c")
}

struct Gen {
    i: u64,
}

impl Gen {
    fn dump(&self) -> String {
        let mut s = String::new();
        for r in 0..RESOURCES {
            let n = name(r);
            let _ = writeln!(s, "exists resource name:{n} role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102");
            for p in 1..=PEERS {
                let _ = writeln!(s, "exists connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0");
            }
            let _ = writeln!(s, "exists device name:{n} volume:0 minor:{} backing_dev:/dev/vg/{n} disk:UpToDate client:no open:no quorum:yes size:10485760 read:0 written:0 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no", 1000 + r);
            for p in 1..=PEERS {
                let _ = writeln!(s, "exists peer-device name:{n} peer-node-id:{p} conn-name:node-{p} volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0");
                let _ = writeln!(s, "exists path name:{n} peer-node-id:{p} conn-name:node-{p} local:ipv4:10.0.0.1:{} peer:ipv4:10.0.0.{}:{} established:yes", 7000 + r, p + 1, 7000 + r);
            }
        }
        s.push_str("exists -\n");
        s
    }

    /// Appends lines until `s` holds about one chunk.
    fn fill(&mut self, s: &mut String) -> u64 {
        let mut lines = 0;
        while s.len() < CHUNK - 400 {
            self.i += 1;
            let i = self.i;
            let r = (i % RESOURCES as u64) as usize;
            let n = name(r);
            let p = 1 + (i / RESOURCES as u64 % PEERS as u64) as u32;
            if i.is_multiple_of(5000) {
                // a connection flap: lost, then back
                let _ = writeln!(s, "change resource name:{n} role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10101");
                let _ = writeln!(s, "change connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:NetworkFailure role:Unknown congested:no ap-in-flight:0 rs-in-flight:0");
                let _ = writeln!(s, "change peer-device name:{n} peer-node-id:{p} conn-name:node-{p} volume:0 replication:Off peer-disk:DUnknown peer-client:no resync-suspended:no received:{i} sent:{i} out-of-sync:0 pending:0 unacked:0");
                let _ = writeln!(s, "change connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:Connecting role:Unknown congested:no ap-in-flight:0 rs-in-flight:0");
                let _ = writeln!(s, "change connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0");
                let _ = writeln!(s, "change resource name:{n} role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102");
                let _ = writeln!(s, "change peer-device name:{n} peer-node-id:{p} conn-name:node-{p} volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:{i} sent:{i} out-of-sync:0 pending:0 unacked:0");
                lines += 7;
                continue;
            }
            match i % 10 {
                0..=5 => {
                    let _ = writeln!(s, "change peer-device name:{n} peer-node-id:{p} conn-name:node-{p} volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:{} sent:{} out-of-sync:{} pending:{} unacked:0", i * 4, i * 8, i % 7 * 4, i % 3);
                }
                6 | 7 => {
                    let _ = writeln!(s, "change device name:{n} volume:0 minor:{} backing_dev:/dev/vg/{n} disk:UpToDate client:no open:yes quorum:yes size:10485760 read:{} written:{} al-writes:{} bm-writes:0 upper-pending:{} lower-pending:{} al-suspended:no", 1000 + r, i * 4, i * 8, i / 100, i % 5, i % 3);
                }
                8 => {
                    let _ = writeln!(s, "change connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:Connected role:Secondary congested:no ap-in-flight:{} rs-in-flight:0", i % 64);
                }
                _ => {
                    let _ = writeln!(s, "change resource name:{n} role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102");
                }
            }
            lines += 1;
        }
        lines
    }
}

fn rss_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time of the calling thread: what "on one core" means, whatever else the machine is doing.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn total_lines() -> u64 {
    std::env::var("BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4_000_000)
}

fn bench_core() {
    let mut g = Gen { i: 0 };
    let dump = g.dump();
    // parse only
    let mut chunks = Vec::new();
    let mut n = 0u64;
    let core_lines: u64 = std::env::var("BENCH_CORE_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    while n < core_lines {
        let mut s = String::with_capacity(CHUNK);
        n += g.fill(&mut s);
        chunks.push(s);
    }
    let t = Instant::now();
    let c0 = thread_cpu();
    let mut parsed = 0u64;
    for c in &chunks {
        for l in c.lines() {
            if parse_line(l).is_ok() {
                parsed += 1;
            }
        }
    }
    let (dt, cpu) = (t.elapsed(), thread_cpu() - c0);
    println!(
        "parse only:          {:>10.0} lines/s per CPU second ({parsed} lines, {cpu:.2?} CPU, {dt:.2?} wall)",
        parsed as f64 / cpu.as_secs_f64()
    );

    let mut e = Engine::new();
    let mut out = Vec::new();
    let t = Instant::now();
    let st = e.apply_chunk(dump.as_bytes(), &mut out);
    println!(
        "exists dump:         {} lines, {} updates, {:.2?}",
        st.lines,
        out.len(),
        t.elapsed()
    );
    let t = Instant::now();
    let c = thread_cpu();
    let mut lines = 0;
    let mut updates = 0;
    for c in &chunks {
        out.clear();
        lines += e.apply_chunk(c.as_bytes(), &mut out).lines;
        updates += out.len();
    }
    let (dt, cpu) = (t.elapsed(), thread_cpu() - c);
    println!(
        "parse+apply:         {:>10.0} lines/s per CPU second ({lines} lines, {updates} change updates, {cpu:.2?} CPU, {dt:.2?} wall)",
        lines as f64 / cpu.as_secs_f64()
    );
}

struct Counter {
    sub: Subscription,
    seen: Arc<AtomicU64>,
}

impl Plugin for Counter {
    fn subscription(&self) -> Subscription {
        self.sub
    }
    fn run(
        self: Box<Self>,
        mut inbox: Inbox,
        _ctx: PluginCtx,
    ) -> BoxFuture<'static, Result<(), PluginError>> {
        async move {
            let hold = std::env::var("BENCH_HOLD")
                .map(|v| v != "0")
                .unwrap_or(true);
            let mut latest = HashMap::new();
            while let Some(d) = inbox.recv().await {
                match d {
                    Delivery::Change(_) => {
                        self.seen.fetch_add(1, Ordering::Relaxed);
                    }
                    Delivery::Resources(rs) => {
                        for (k, v) in rs {
                            match v {
                                Some(v) if hold => latest.insert(k, v),
                                Some(_) => None,
                                None => latest.remove(&k),
                            };
                        }
                        self.seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(())
        }
        .boxed()
    }
}

struct Factory(Arc<AtomicU64>);

impl PluginFactory for Factory {
    fn build(&self, spec: &InstanceSpec) -> Result<Box<dyn Plugin>, PluginError> {
        let events = spec.id.policy == "events";
        Ok(Box::new(Counter {
            sub: Subscription {
                changes: !events,
                events,
            },
            seen: self.0.clone(),
        }))
    }
}

fn bench_end_to_end() {
    let total = total_lines();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let metrics = AgentMetrics::new();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let seen = Arc::new(AtomicU64::new(0));
        let (engine, task) = runtime::spawn(
            RuntimeConfig::default(),
            Arc::new(Factory(seen.clone())),
            metrics.clone(),
            Arc::new(Health::default()),
            rx,
        );
        let spec = |p: &str| InstanceSpec {
            id: InstanceId { policy: p.into(), kind: "counter".into() },
            config: serde_json::Value::Null,
        };
        engine.apply(vec![spec("changes"), spec("events")]).await.unwrap();
        let rss0 = rss_kib("VmRSS");
        // the generator runs on its own thread
        let producer = std::thread::spawn(move || {
            let mut g = Gen { i: 0 };
            tx.blocking_send(SourceMsg::Started).unwrap();
            tx.blocking_send(SourceMsg::Chunk(g.dump().into_bytes())).unwrap();
            let mut sent = 0u64;
            while sent < total {
                let mut s = String::with_capacity(CHUNK);
                sent += g.fill(&mut s);
                if tx.blocking_send(SourceMsg::Chunk(s.into_bytes())).is_err() {
                    break;
                }
            }
            sent
        });
        let dump_lines = (RESOURCES * (1 + 1 + 3 * PEERS as usize)) as u64 + 1;
        let t = Instant::now();
        let c = thread_cpu();
        let mut checkpoints = vec![];
        let mut next = total / 4;
        let mut producer = Some(producer);
        let mut sent = None;
        loop {
            let done = metrics.lines.get();
            if done >= dump_lines && checkpoints.is_empty() {
                checkpoints.push(("after the dump".to_string(), rss_kib("VmRSS")));
            }
            if done >= next + dump_lines {
                checkpoints.push((format!("after {} lines", next), rss_kib("VmRSS")));
                next += total / 4;
            }
            if producer.as_ref().is_some_and(|p| p.is_finished()) {
                sent = Some(producer.take().unwrap().join().unwrap());
            }
            if sent.is_some_and(|n| done >= n + dump_lines) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (dt, cpu) = (t.elapsed(), thread_cpu() - c);
        let lines = metrics.lines.get();
        let sent = sent.unwrap_or_default();
        println!(
            "end to end (1 core): {:>10.0} lines/s per CPU second of the agent thread ({lines} lines incl. dump, {sent} generated, {cpu:.2?} CPU, {dt:.2?} wall, {} deliveries)",
            lines as f64 / cpu.as_secs_f64(),
            seen.load(Ordering::Relaxed)
        );
        println!("                     {:>10.0} lines/s wall-clock", lines as f64 / dt.as_secs_f64());
        println!("RSS before the stream: {} KiB", rss0);
        for (what, kib) in checkpoints {
            println!("RSS {what}: {kib} KiB");
        }
        println!("peak RSS (VmHWM, whole bench process): {} KiB", rss_kib("VmHWM"));
        engine.shutdown().await.unwrap();
        task.await.unwrap();
    });
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs it briefly with no argument.
    if !std::env::args().any(|a| a == "--bench") {
        std::env::set_var("BENCH_LINES", "20000");
    }
    let part = std::env::var("BENCH_PART").unwrap_or_default();
    if part != "core" {
        bench_end_to_end();
    }
    if part != "e2e" {
        bench_core();
    }
}
