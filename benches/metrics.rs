//! `/metrics` for 1000 resources × 2 peers × 2 volumes: generation time and size, how far the served
//! rendering lags the events, and event processing throughput with and without concurrent scraping.
//!
//! `cargo bench --bench metrics` (add `-- --quick` for a short run). Sizes are printed before the runs.
//!
//! - `scrape_1000x2x2/text/*`: a rendering from scratch (every resource rendered), for reference;
//! - `scrape_1000x2x2/{plain,gzip}_enums_{off,on}_changed_{0,1000}_inline`: one `/metrics` request
//!   (`exporter::scrape`: DRBD families, then the agent's own) that renders the N resources changed
//!   since the previous one itself (and compresses them, for gzip): what a scrape costs when nothing
//!   renders in the background;
//! - `..._changed_1000_rendered_ahead`: every resource changed and the exporter instance's background
//!   rendering (`ExporterHub::prerender`) ran before the scrape; its own CPU time is printed too;
//! - `..._changed_1000_raced`: every resource changed and the background rendering has not run yet:
//!   the scrape serves the rendering before the change;
//! - the lag of the served rendering behind a statistics round, through the real plugin task;
//! - `gzip_*`: compressing the whole body at once, for comparison;
//! - `events_*`: the engine and the exporter's state updates, with and without a thread scraping
//!   (gzip, rendering itself) back to back.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use drbd_reactor::drbd::state::Resource;
use drbd_reactor::engine::Engine;
use drbd_reactor::metrics::AgentMetrics;
use drbd_reactor::plugins::prometheus::{self as exporter, render, ExporterHub, View};
use drbd_reactor::plugins::{channel, DetailHandle, EventSink, InstanceId, Plugin, PluginCtx};
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

/// The notification a statistics round gives the exporter: each of `resources` with its first device's
/// read counter advanced by `round`.
fn changed(resources: &[Arc<Resource>], round: u64) -> Vec<(Arc<str>, Option<Arc<Resource>>)> {
    resources
        .iter()
        .map(|r| {
            let mut c = (**r).clone();
            if let Some(d) = c.devices.get_mut(&0) {
                d.read += round;
            }
            (Arc::from(c.name.as_str()), Some(Arc::new(c)))
        })
        .collect()
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
                std::hint::black_box(exporter::scrape(&hub, &agent.registry, true));
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
        eprintln!(
            "exposition enums={enums}: {} bytes, {} samples",
            text.len(),
            text.lines().filter(|l| !l.starts_with('#')).count(),
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
    // What one /metrics request does (`exporter::scrape`: DRBD families, then the agent's own, plain or
    // gzip as Prometheus asks), after `n` resources got a new state (as the engine hands a changed
    // resource to the exporter). Two ways:
    // - `ahead`: the hub has an instance that renders in the background, as in the agent: a scrape
    //   serves the last complete rendering; `rendered_ahead` after the background rendering of the
    //   change ran, `raced` while it has not yet;
    // - `inline`: no instance renders ahead (what a scrape costs when it renders itself: the first one,
    //   or after the background rendering fell `MAX_LAG` behind).
    // A hub of its own per case. First in CPU time of this thread (robust on a shared machine), then in
    // wall time with criterion.
    for enums in [false, true] {
        for gzip in [false, true] {
            let on = if enums { "on" } else { "off" };
            let enc = if gzip { "gzip" } else { "plain" };
            let mut round = 0u64;
            let mut bumped = |n: usize| {
                round += 1;
                changed(&resources[..n], round)
            };
            let all = bumped(RESOURCES);
            let hub_with = |ahead: bool| {
                let hub = Arc::new(ExporterHub::default());
                let mut reg = hub.register(id("scrape"), enums);
                if ahead {
                    reg.render_ahead();
                }
                reg.apply(all.clone());
                let body = exporter::scrape(&hub, &agent.registry, gzip);
                assert_eq!(body.gzip, gzip);
                (hub, reg, body.len())
            };
            let (inline, inline_reg, bytes) = hub_with(false);
            let (ahead, ahead_reg, _) = hub_with(true);
            const RUNS: u32 = 10;
            let mut line = format!("scrape {enc:5} enums={on:3} ({bytes:>8} bytes) rendering itself, CPU per scrape after n changed:");
            for n in [0usize, 1, 100, RESOURCES] {
                let mut cpu = Duration::ZERO;
                for _ in 0..RUNS {
                    inline_reg.apply(bumped(n));
                    let c = thread_cpu();
                    std::hint::black_box(exporter::scrape(&inline, &agent.registry, gzip));
                    cpu += thread_cpu() - c;
                    assert_eq!(inline.last_rendered(), n);
                }
                let _ = write!(line, " n={n}: {:.2?}", cpu / RUNS);
            }
            eprintln!("{line}");
            let (mut pre, mut served) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..RUNS {
                ahead_reg.apply(bumped(RESOURCES));
                let c = thread_cpu();
                assert_eq!(ahead.prerender(), RESOURCES);
                let c1 = thread_cpu();
                std::hint::black_box(exporter::scrape(&ahead, &agent.registry, gzip));
                served += thread_cpu() - c1;
                pre += c1 - c;
            }
            eprintln!(
                "scrape {enc:5} enums={on:3}, all {RESOURCES} changed, rendered ahead: {:.2?} CPU per scrape; the background rendering{} took {:.2?} CPU",
                served / RUNS,
                if gzip { " and compression" } else { "" },
                pre / RUNS
            );

            // One criterion benchmark of a `/metrics` request on `hub` after `setup`.
            let mut bench_scrape = |name: &str, hub: &ExporterHub, setup: &mut dyn FnMut()| {
                bench_ran(&mut g, name, |b| {
                    b.iter_batched(
                        &mut *setup,
                        |_| exporter::scrape(hub, &agent.registry, gzip).len(),
                        BatchSize::PerIteration,
                    )
                })
            };
            for n in [0usize, RESOURCES] {
                let name = format!("{enc}_enums_{on}_changed_{n}_inline");
                if bench_scrape(&name, &inline, &mut || {
                    inline_reg.apply(bumped(n));
                }) {
                    assert_eq!(inline.last_rendered(), n, "{name}: resources rendered anew");
                }
            }
            let name = format!("{enc}_enums_{on}_changed_{RESOURCES}_rendered_ahead");
            if bench_scrape(&name, &ahead, &mut || {
                ahead_reg.apply(bumped(RESOURCES));
                ahead.prerender();
            }) {
                assert_eq!(ahead.last_rendered(), RESOURCES, "{name}: rendered ahead");
            }
            // The round before was rendered; this one is not yet: the scrape serves the last rendering.
            let name = format!("{enc}_enums_{on}_changed_{RESOURCES}_raced");
            if bench_scrape(&name, &ahead, &mut || {
                ahead.prerender();
                ahead_reg.apply(bumped(RESOURCES));
            }) {
                assert_eq!(
                    ahead.prerender(),
                    RESOURCES,
                    "{name}: the scrape left the round to the background"
                );
            }
        }
    }
    g.finish();

    // How far the served rendering lags the events: a statistics round that changes every resource is
    // handed to a running exporter instance (the plugin task, as in the agent) in one delivery, and a
    // scraper asking for gzip polls until the published rendering has it. The lag is the quiet time plus
    // the background rendering and compression; meanwhile scrapes serve the rendering before it.
    {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        for enums in [false, true] {
            let hub = Arc::new(ExporterHub::default());
            let plugin = exporter::Prometheus::from_config(
                &serde_json::json!({ "enums": enums }),
                hub.clone(),
            )
            .expect("config");
            let (mut outbox, inbox) = channel(plugin.subscription());
            let ctx = PluginCtx {
                id: id("lag"),
                node_name: "n1".into(),
                metrics: agent.clone(),
                detail: DetailHandle::default(),
                events: EventSink::default(),
            };
            let task = rt.spawn(Box::new(plugin).run(inbox, ctx));
            let mut lags = Vec::new();
            for round in 0..21u64 {
                let touched = changed(&resources, round);
                let read = |r: &Resource| r.devices.get(&0).map(|d| d.read);
                let want = read(&touched[0].1.clone().expect("state"));
                let applied = || {
                    hub.view().is_some_and(|v| {
                        v.resources.len() == RESOURCES && read(&v.resources[0]) == want
                    })
                };
                let t = std::time::Instant::now();
                outbox.post(&touched);
                // A scraper asking for gzip, as Prometheus does (the first one compresses everything).
                while !(applied() && hub.up_to_date()) {
                    std::hint::black_box(exporter::scrape(&hub, &agent.registry, true));
                    std::thread::sleep(Duration::from_micros(500));
                }
                if round > 0 {
                    lags.push(t.elapsed());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            lags.sort();
            eprintln!(
                "lag of the served rendering behind a round changing all {RESOURCES} resources, enums={enums}: median {:.1?}, max {:.1?} over {} rounds",
                lags[lags.len() / 2],
                lags[lags.len() - 1],
                lags.len()
            );
            outbox.close();
            let _ = rt.block_on(task);
        }
    }

    // gzip of the whole body at once at the fast level (what a scrape did before the body was kept
    // compressed in groups) and at the default level, for comparison.
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
        for (name, level) in [
            ("whole_body_fast_level", flate2::Compression::fast()),
            ("whole_body_default_level", flate2::Compression::default()),
        ] {
            g.bench_with_input(BenchmarkId::new(name, enums), &body, |b, t| {
                b.iter(|| {
                    use std::io::Write;
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), level);
                    e.write_all(t.as_bytes())
                        .and_then(|_| e.finish())
                        .map(|v| v.len())
                })
            });
        }
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
