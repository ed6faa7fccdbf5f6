//! `/metrics` for 1000 resources × 2 peers × 2 volumes: generation time and size, and event processing
//! throughput with and without concurrent scraping.
//!
//! `cargo bench --bench metrics` (add `-- --quick` for a short run). Sizes are printed before the runs.
//!
//! - `scrape_1000x2x2/text/*`: a rendering from scratch (every resource rendered) — the worst case;
//! - `scrape_1000x2x2/metrics_endpoint_enums_changed_N`: what one `/metrics` request costs (DRBD families
//!   with enums, then the agent's own) after N resources changed since the previous scrape; N = 0 is a
//!   repeated scrape of an unchanged state, N = 1000 every resource changed (worst case);
//! - `scrape_1000x2x2/metrics_endpoint_enums_*_changed_1000_prerendered`: every resource changed, and the
//!   exporter's background rendering (`ExporterHub::prerender`, a second after a change) ran before the
//!   scrape, as it does unless a scrape races a statistics round; its own CPU time is printed too;
//! - `gzip_*`: compressing the 1000-resource body, separately (Prometheus asks for gzip).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::prometheus::{self as exporter, render, ExporterHub, View};
use drbd_reactor::plugins::InstanceId;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const RESOURCES: usize = 1000;
const PEERS: u32 = 2;
const VOLUMES: u32 = 2;

/// The `exists` dump of the benchmark cluster.
fn dump() -> String {
    let mut s = String::new();
    for r in 0..RESOURCES {
        let n = format!("pvc-{r:05}-0a2826c9-7108-11e9-8f74");
        let _ = writeln!(s, "exists resource name:{n} role:Secondary suspended:no force-io-failures:no write-ordering:flush may_promote:yes promotion_score:10102");
        for p in 1..=PEERS {
            let _ = writeln!(s, "exists connection name:{n} peer-node-id:{p} conn-name:node-{p} connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0");
        }
        for v in 0..VOLUMES {
            let minor = 1000 + r as u32 * VOLUMES + v;
            let _ = writeln!(s, "exists device name:{n} volume:{v} minor:{minor} backing_dev:/dev/vg/{n}_{v} disk:UpToDate client:no open:no quorum:yes size:1048576 read:2104 written:0 al-writes:0 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no blocked:no");
        }
        for p in 1..=PEERS {
            for v in 0..VOLUMES {
                let _ = writeln!(s, "exists peer-device name:{n} peer-node-id:{p} conn-name:node-{p} volume:{v} replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:0 out-of-sync:0 pending:0 unacked:0");
            }
            let _ = writeln!(s, "exists path name:{n} peer-node-id:{p} conn-name:node-{p} local:ipv4:10.0.0.1:{} peer:ipv4:10.0.0.{}:{} established:yes", 7000 + r, 1 + p, 7000 + r);
        }
    }
    s.push_str("exists -\n");
    s
}

/// A round of statistics updates (`--poll` refresh): one device and one peer-device line per resource.
fn poll_round(round: u64) -> String {
    let mut s = String::new();
    for r in 0..RESOURCES {
        let n = format!("pvc-{r:05}-0a2826c9-7108-11e9-8f74");
        let minor = 1000 + r as u32 * VOLUMES;
        let _ = writeln!(s, "change device name:{n} volume:0 minor:{minor} backing_dev:/dev/vg/{n}_0 disk:UpToDate client:no open:yes quorum:yes size:1048576 read:{} written:{} al-writes:{round} bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no", 2104 + round, round * 4);
        let _ = writeln!(s, "change peer-device name:{n} peer-node-id:1 conn-name:node-1 volume:0 replication:Established peer-disk:UpToDate peer-client:no resync-suspended:no received:0 sent:{} out-of-sync:0 pending:0 unacked:0", round * 4);
    }
    s
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs one benchmark of the group; false when a command-line filter left it out (then it did not run
/// and there is nothing to check after it).
fn bench_ran(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut f: impl FnMut(&mut criterion::Bencher<'_>),
) -> bool {
    let mut ran = false;
    g.bench_function(name, |b| {
        ran = true;
        f(b)
    });
    ran
}

/// A thread scraping `/metrics` back to back until stopped.
struct Scraper {
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Scraper {
    fn start(hub: &Arc<ExporterHub>, agent: &AgentMetrics) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let (hub, agent, s, n) = (hub.clone(), agent.clone(), stop.clone(), scrapes.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::hint::black_box(exporter::render_metrics(&hub, &agent.registry));
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
        Scraper {
            stop,
            scrapes,
            thread,
        }
    }

    /// Stops the thread; the number of scrapes it made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.scrapes.load(Ordering::Relaxed)
    }
}

fn id(p: &str) -> InstanceId {
    InstanceId {
        policy: p.to_string(),
        kind: "prometheus".to_string(),
    }
}

fn bench(c: &mut Criterion) {
    let mut engine = Engine::new();
    let mut out = Vec::new();
    engine.apply_chunk(dump().as_bytes(), &mut out);
    let resources = engine.state.snapshot();
    assert_eq!(resources.len(), RESOURCES);

    let hub = Arc::new(ExporterHub::default());
    let reg = hub.register(id("bench"), true);
    reg.apply(
        resources
            .iter()
            .map(|r| (Arc::from(r.name.as_str()), Some(r.clone())))
            .collect(),
    );
    let agent = AgentMetrics::new();

    for enums in [false, true] {
        let view = View {
            resources: resources.clone(),
            enums,
            ..Default::default()
        };
        let text = render::to_text(&view);
        let gz = exporter::gzip(text.as_bytes()).expect("gzip");
        eprintln!(
            "exposition enums={enums}: {} bytes, {} samples, {} bytes gzipped",
            text.len(),
            text.lines().filter(|l| !l.starts_with('#')).count(),
            gz.len()
        );
    }

    let mut g = c.benchmark_group("scrape_1000x2x2");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for enums in [false, true] {
        let view = View {
            resources: resources.clone(),
            enums,
            ..Default::default()
        };
        g.bench_with_input(BenchmarkId::new("text", enums), &view, |b, v| {
            b.iter(|| render::to_text(v).len())
        });
        g.bench_with_input(
            BenchmarkId::new("collector_then_text_encoder", enums),
            &view,
            |b, v| {
                b.iter(|| {
                    prometheus::TextEncoder::new()
                        .encode_to_string(&render::to_families(v))
                        .map(|s| s.len())
                })
            },
        );
    }
    // What one /metrics request does: snapshot from the hub, DRBD families, agent families, after
    // `n` resources got a new state (as the engine hands a changed resource to the exporter). A hub of
    // its own per `enums` setting. First in CPU time of this thread (robust on a shared machine), then
    // in wall time with criterion.
    for enums in [false, true] {
        let hub = Arc::new(ExporterHub::default());
        let reg = hub.register(id("scrape"), enums);
        reg.apply(
            resources
                .iter()
                .map(|r| (Arc::from(r.name.as_str()), Some(r.clone())))
                .collect(),
        );
        let mut round = 0u64;
        let mut bump = |n: usize| {
            round += 1;
            let touched: Vec<_> = resources
                .iter()
                .take(n)
                .map(|r| {
                    let mut c = (**r).clone();
                    if let Some(d) = c.devices.get_mut(&0) {
                        d.read += round;
                    }
                    (Arc::from(c.name.as_str()), Some(Arc::new(c)))
                })
                .collect();
            reg.apply(touched);
        };
        bump(0);
        exporter::render_metrics(&hub, &agent.registry);
        for n in [0usize, 1, 100, RESOURCES] {
            let (mut scrape, mut gz, mut bytes, mut gz_bytes) =
                (Duration::ZERO, Duration::ZERO, 0, 0);
            const RUNS: u32 = 10;
            for _ in 0..RUNS {
                bump(n);
                let c = thread_cpu();
                let body = exporter::render_metrics(&hub, &agent.registry);
                let c2 = thread_cpu();
                let z = exporter::gzip(body.as_bytes()).expect("gzip");
                gz += thread_cpu() - c2;
                scrape += c2 - c;
                bytes = body.len();
                gz_bytes = z.len();
            }
            eprintln!(
                "scrape enums={enums}, {n:>4} resources changed: {:>8.2?} CPU per scrape ({bytes} bytes), gzip {:>8.2?} CPU more ({gz_bytes} bytes)",
                scrape / RUNS,
                gz / RUNS
            );
        }
        // The same, with the exporter instance's background rendering (`ExporterHub::prerender`, a
        // second after a change) done before the scrape: what a scrape costs when it does not race a
        // statistics round, and what the background rendering costs.
        {
            let n = RESOURCES;
            let (mut pre, mut scrape, mut gz) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            const RUNS: u32 = 10;
            for _ in 0..RUNS {
                bump(n);
                let c = thread_cpu();
                assert_eq!(hub.prerender(), n, "prerendered");
                let c1 = thread_cpu();
                let body = exporter::render_metrics(&hub, &agent.registry);
                let c2 = thread_cpu();
                let _ = exporter::gzip(body.as_bytes()).expect("gzip");
                gz += thread_cpu() - c2;
                scrape += c2 - c1;
                pre += c1 - c;
                assert_eq!(hub.last_rendered(), 0);
            }
            eprintln!(
                "scrape enums={enums}, {n:>4} resources changed and prerendered: {:>8.2?} CPU per scrape, gzip {:>8.2?} CPU more; the background rendering took {:>8.2?} CPU",
                scrape / RUNS,
                gz / RUNS,
                pre / RUNS
            );
        }
        for n in [0usize, 1, 100, RESOURCES] {
            let name = format!(
                "metrics_endpoint_enums_{}_changed_{n}",
                if enums { "on" } else { "off" }
            );
            let ran = bench_ran(&mut g, &name, |b| {
                b.iter_batched(
                    || bump(n),
                    |_| exporter::render_metrics(&hub, &agent.registry).len(),
                    BatchSize::PerIteration,
                )
            });
            if ran {
                assert_eq!(hub.last_rendered(), n, "{name}: resources rendered anew");
            }
        }
        let name = format!(
            "metrics_endpoint_enums_{}_changed_{RESOURCES}_prerendered",
            if enums { "on" } else { "off" }
        );
        let ran = bench_ran(&mut g, &name, |b| {
            b.iter_batched(
                || {
                    bump(RESOURCES);
                    hub.prerender()
                },
                |_| exporter::render_metrics(&hub, &agent.registry).len(),
                BatchSize::PerIteration,
            )
        });
        if ran {
            assert_eq!(hub.last_rendered(), 0, "{name}: nothing left to render");
        }
    }
    g.finish();

    // gzip of the body, separately; the level `exporter::gzip` uses and the default one for comparison.
    let mut g = c.benchmark_group("gzip_1000x2x2");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    for enums in [false, true] {
        let body = render::to_text(&View {
            resources: resources.clone(),
            enums,
            ..Default::default()
        });
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("exporter_level", enums), &body, |b, t| {
            b.iter(|| exporter::gzip(t.as_bytes()).map(|v| v.len()))
        });
        g.bench_with_input(BenchmarkId::new("default_level", enums), &body, |b, t| {
            b.iter(|| {
                use std::io::Write;
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(t.as_bytes())
                    .and_then(|_| e.finish())
                    .map(|v| v.len())
            })
        });
    }
    g.finish();

    // Event processing: engine apply + the exporter instance's update, as in the agent (the engine hands
    // the touched resources to the instance). With and without a thread scraping back to back.
    let rounds: Vec<String> = (1..=8).map(poll_round).collect();
    let lines_per_round = (RESOURCES * 2) as u64;
    // CPU and wall time of the event thread per round, without and with a thread scraping back to back:
    // the scraper holds the exporter's lock only to clone the state's Arcs, so the event thread's CPU
    // time per round should not grow (its wall time may, on a machine with fewer free cores than
    // threads).
    for scraping in [false, true] {
        let scraper = scraping.then(|| Scraper::start(&hub, &agent));
        const ROUNDS: u32 = 40;
        let (t, c0) = (std::time::Instant::now(), thread_cpu());
        for i in 0..ROUNDS as usize {
            out.clear();
            engine.apply_chunk(rounds[i % rounds.len()].as_bytes(), &mut out);
            reg.apply(engine.state.take_dirty());
        }
        let (wall, cpu) = (t.elapsed() / ROUNDS, (thread_cpu() - c0) / ROUNDS);
        let scrapes = scraper.map_or(0, Scraper::stop);
        eprintln!(
            "events, {} lines per round, scraping={scraping}: {cpu:.2?} CPU, {wall:.2?} wall per round ({:.0} lines per CPU second; {scrapes} scrapes meanwhile)",
            lines_per_round,
            lines_per_round as f64 / cpu.as_secs_f64(),
        );
    }

    let mut g = c.benchmark_group("events_1000x2x2");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(lines_per_round));
    for scraping in [false, true] {
        let scraper = scraping.then(|| Scraper::start(&hub, &agent));
        let mut i = 0usize;
        let name = if scraping {
            "with_concurrent_scraping"
        } else {
            "without_scraping"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % rounds.len();
                out.clear();
                engine.apply_chunk(rounds[i].as_bytes(), &mut out);
                reg.apply(engine.state.take_dirty())
            })
        });
        if let Some(sc) = scraper {
            eprintln!("concurrent scrapes during the run: {}", sc.stop());
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
