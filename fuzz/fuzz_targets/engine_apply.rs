//! The parser and the engine together. The first byte picks the mode:
//! - even: the rest is raw input to `apply_chunk` (random lines, invalid UTF-8, `\r`, empty lines);
//! - odd: the rest picks valid lines from the real samples in random orders and repetitions, so the engine
//!   sees destroys before creates, changes of unknown objects, renames, helper calls and restarts of the dump.
//!
//! Checked after each chunk: no panic; every malformed line is counted; every resource in the state
//! serialises; an instance started now gets a replay with one update per resource at least.
#![no_main]
use drbd_reactor::engine::Engine;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const SAMPLES: &[&str] = &[
    include_str!("../../tests/data/events2/drbd-utils_events2-all-create-change.txt"),
    include_str!("../../tests/data/events2/drbd-utils_events2-all-create-destroy.txt"),
    include_str!("../../tests/data/events2/drbd-utils_events2-all-create-helper__timestamps.txt"),
    include_str!("../../tests/data/events2/drbd-utils_events2-out-of-order.txt"),
    include_str!("../../tests/data/events2/drbd-utils_events2-sync__statistics.txt"),
    include_str!("../../tests/data/events2/drbd-utils_events2-promotion-score-devices.txt"),
    include_str!("../../tests/data/events2/drbd-reactor_parser-unit-test-lines.txt"),
    include_str!("../../tests/data/events2/drbdtop_events2-timestamps-statistics-2017.txt"),
];

fn lines() -> &'static [&'static str] {
    static LINES: OnceLock<Vec<&'static str>> = OnceLock::new();
    LINES.get_or_init(|| {
        SAMPLES
            .iter()
            .flat_map(|s| s.lines())
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut engine = Engine::new();
    let mut out = Vec::new();
    let stats = if mode % 2 == 0 {
        engine.apply_chunk(rest, &mut out)
    } else {
        let pool = lines();
        let mut chunk = String::new();
        for pair in rest.chunks(2) {
            let i = pair.iter().fold(0usize, |a, &b| a * 256 + b as usize);
            chunk.push_str(pool[i % pool.len()]);
            chunk.push('\n');
        }
        engine.apply_chunk(chunk.as_bytes(), &mut out)
    };
    assert!(stats.malformed <= stats.lines);
    for u in &out {
        serde_json::to_string(&*u.state).expect("a resource state serialises");
    }
    let snapshot = engine.state.snapshot();
    let replay = engine.state.replay();
    assert!(replay.len() >= snapshot.len(), "replay misses resources");
});
