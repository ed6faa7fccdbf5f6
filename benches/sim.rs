//! events2 output rate of one simulated node: `cargo bench --bench sim`.
//!
//! 1000 resources x 3 nodes x 2 volumes. Measures the initial `exists` dump of node n1 with
//! `--full` (what the agent reads), `--poll` refreshes after writes on every resource (statistics
//! move), and a live fault (n2 crashes: 3 state changes per resource). Prints lines/s for each and
//! overall; the simulator's target is >= 200 000 lines/s.

use drbd_reactor::sim::events::{Events2Opts, Printer};
use drbd_reactor::sim::model::{Cluster, CreateSpec, InitialDisk, NodeSpec, Op};
use std::collections::BTreeMap;
use std::time::Instant;

const RESOURCES: usize = 1000;

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    for i in 0..RESOURCES {
        let op = Op::Create(CreateSpec {
            name: format!("pvc-{i:05}"),
            nodes: ["n1", "n2", "n3"]
                .iter()
                .map(|n| NodeSpec {
                    name: n.to_string(),
                    diskless: false,
                    disk: InitialDisk::UpToDate,
                    address: None,
                })
                .collect(),
            volumes: 2,
            size_kib: 10 * 1024 * 1024,
            minor: None,
            backing_dev: None,
            options: [("quorum", "majority")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            connect: true,
        });
        c.apply(&op, 0, &mut |_, _| {}).expect("create");
        c.apply(
            &Op::Primary {
                node: "n1".into(),
                res: format!("pvc-{i:05}"),
                force: false,
            },
            0,
            &mut |_, _| {},
        )
        .expect("primary");
    }
    c
}

fn main() {
    let opts = Events2Opts {
        full: true,
        poll: true,
        ..Default::default()
    };
    let mut c = cluster();
    let mut total_lines = 0usize;
    let mut total_bytes = 0usize;
    let mut total = std::time::Duration::ZERO;
    let mut report = |what: &str, lines: usize, bytes: usize, d: std::time::Duration| {
        let rate = lines as f64 / d.as_secs_f64();
        println!(
            "sim/{what:<22} {lines:>8} lines {:>7.1} MiB in {:>8.2?}  = {:>10.0} lines/s",
            bytes as f64 / 1048576.0,
            d,
            rate
        );
        total_lines += lines;
        total_bytes += bytes;
        total += d;
    };

    // Initial dump, several times.
    for _ in 0..5 {
        let mut p = Printer::new("n1", opts.clone());
        let mut out = String::with_capacity(8 << 20);
        let t = Instant::now();
        let n = p.dump(&c, 0, &mut out);
        report("exists-dump --full", n, out.len(), t.elapsed());
        std::hint::black_box(&out);
    }

    // Poll refreshes after writes on every resource.
    let mut p = Printer::new("n1", opts.clone());
    let mut out = String::new();
    p.dump(&c, 0, &mut out);
    for round in 0..5u64 {
        for i in 0..RESOURCES {
            c.apply(
                &Op::Write {
                    node: "n1".into(),
                    res: format!("pvc-{i:05}"),
                    vol: None,
                    kib: 64,
                },
                round,
                &mut |_, _| {},
            )
            .expect("write");
        }
        let mut out = String::with_capacity(8 << 20);
        let t = Instant::now();
        let n = p.refresh(&c, round, &mut out);
        report("poll-refresh --full", n, out.len(), t.elapsed());
        std::hint::black_box(&out);
    }

    // A live fault: n2 crashes, n1 prints 3 state changes for each resource.
    let mut out = String::with_capacity(8 << 20);
    let t = Instant::now();
    let mut n = 0;
    c.apply(&Op::NodeDown { node: "n2".into() }, 10, &mut |c, res| {
        n += p.on_step(c, res, 10, &mut out);
    })
    .expect("node down");
    report("live node-down --full", n, out.len(), t.elapsed());

    println!(
        "sim/TOTAL {total_lines} lines, {:.1} MiB in {total:.2?} = {:.0} lines/s (target >= 200000)",
        total_bytes as f64 / 1048576.0,
        total_lines as f64 / total.as_secs_f64()
    );
}
