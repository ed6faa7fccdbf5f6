//! Every sample in tests/data/events2 (copied from drbd-utils' regression tests, the DRBD user guide,
//! drbdtop and drbd-reactor, and captured from a real DRBD kernel module) parses to the objects it shows.
//!
//! - golden: the parsed objects of each sample are compared with tests/data/events2/golden/<sample>.json
//!   (regenerate with `UPDATE_GOLDEN=1 cargo test --test events2_golden` and review the diff);
//! - round trip: printing a parsed line gives back the line, for every sample in drbdsetup's own field
//!   order;
//! - the only lines rejected are the ones the samples mark as invalid;
//! - the captures of a real DRBD 9.2.18 kernel module (drbd-utils 9.22) apply without a single malformed
//!   line, and the state they lead to is the one `drbdsetup status --json` showed at the same moments.

use drbd_reactor::drbd::events2::{parse_line, strip_ansi};
use drbd_reactor::drbd::state::Resource;
use drbd_reactor::drbd::types::Tri;
use drbd_reactor::engine::Engine;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/events2")
}

/// The lines of a sample as drbdsetup printed them: comments dropped, `cat -v` escapes turned back into
/// ESC, the `TIME` placeholder of the timestamp tests replaced by a real timestamp, and the user guide's
/// wrapped lines joined.
fn sample_lines(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        // '...' marks output the user guide elided.
        if l.starts_with('#') || l.trim().is_empty() || l == "..." {
            continue;
        }
        if l.starts_with(' ') {
            let last = out.last_mut().expect("continuation after a line");
            last.push(' ');
            last.push_str(l.trim());
            continue;
        }
        let l = l.replace("^[", "\x1b");
        let l = strip_capture_prefix(&l).to_string();
        let l = match l.strip_prefix("TIME ") {
            Some(rest) => format!("2026-11-25T10:00:00.000000+00:00 {rest}"),
            None => l,
        };
        out.push(l);
    }
    out
}

/// Part A of the real `poll-n-statistics` capture was recorded with the capture script prefixing every
/// line with `[<unix seconds>] `; drbdsetup itself never prints that.
fn strip_capture_prefix(l: &str) -> &str {
    if let Some(rest) = l.strip_prefix('[') {
        if let Some((secs, line)) = rest.split_once("] ") {
            if !secs.is_empty() && secs.bytes().all(|b| b.is_ascii_digit()) {
                return line;
            }
        }
    }
    l
}

fn samples() -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .map(|p| {
            (
                p.file_stem().unwrap().to_string_lossy().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    assert!(v.len() >= 30, "samples missing: {}", v.len());
    v
}

/// Lines that drbd-reactor's parser tests feed in to be rejected.
fn expected_reject(sample: &str, line: &str) -> Option<&'static str> {
    if sample != "drbd-reactor_parser-unit-test-lines" {
        return None;
    }
    match line {
        "xxx resource name:foo" => Some("unknown verb 'xxx'"),
        "call helper" | "response helper" => Some("missing identity field 'name'"),
        "exists xxx name:foo" => Some("unknown object 'xxx'"),
        _ => None,
    }
}

#[test]
fn every_sample_parses_to_its_golden_objects() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let golden_dir = data_dir().join("golden");
    std::fs::create_dir_all(&golden_dir).unwrap();
    let mut failures = Vec::new();
    for (name, text) in samples() {
        let mut parsed = Vec::new();
        for line in sample_lines(&text) {
            let clean = strip_ansi(&line);
            match (parse_line(&clean), expected_reject(&name, &line)) {
                (Ok(l), None) => parsed.push(serde_json::to_value(&l).unwrap()),
                (Err(e), Some(reason)) => {
                    assert_eq!(e.reason, reason, "{name}: {line}");
                    parsed.push(serde_json::json!({ "rejected": e.reason }));
                }
                (Ok(_), Some(_)) => {
                    failures.push(format!("{name}: accepted an invalid line: {line}"))
                }
                (Err(e), None) => failures.push(format!("{name}: {e}: {line}")),
            }
        }
        let got = serde_json::to_string_pretty(&parsed).unwrap() + "\n";
        let path = golden_dir.join(format!("{name}.json"));
        if update {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(_) => failures.push(format!(
                "{name}: differs from {} (UPDATE_GOLDEN=1 to regenerate)",
                path.display()
            )),
            Err(e) => failures.push(format!("{name}: {}: {e}", path.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn printing_a_parsed_line_gives_back_the_line() {
    let mut checked = 0;
    for (name, text) in samples() {
        // --diff and --color print values that are not field values; drbd-reactor's synthetic lines and the
        // user guide's old format do not follow drbdsetup's field order.
        if name.contains("__diff")
            || name.contains("__color")
            || name.starts_with("drbd-reactor_")
            || name.starts_with("ug9_events2-statistics")
        {
            continue;
        }
        for line in sample_lines(&text) {
            let parsed = parse_line(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"));
            assert_eq!(parsed.to_string(), line, "{name}");
            checked += 1;
        }
    }
    assert!(checked > 150, "only {checked} lines checked");
}

#[test]
fn diff_and_color_variants_parse_to_the_same_objects_as_plain() {
    // The `--color` output is the plain output with escapes around some values.
    let read = |n: &str| std::fs::read_to_string(data_dir().join(format!("{n}.txt"))).unwrap();
    let plain = sample_lines(&read("drbd-utils_events2-all-create-change"));
    let color = sample_lines(&read("drbd-utils_events2-all-create-change__color"));
    assert_eq!(plain.len(), color.len());
    for (p, c) in plain.iter().zip(&color) {
        assert_eq!(parse_line(p).unwrap(), parse_line(&strip_ansi(c)).unwrap());
    }
    // `--diff` shows old->new: the new values equal the plain output's values for each field printed.
    let diff = sample_lines(&read("drbd-utils_events2-all-create-change__diff"));
    assert_eq!(plain.len(), diff.len());
    let role = |l: &str| {
        l.split(' ')
            .find(|t| t.starts_with("role:"))
            .map(|t| t.rsplit("->").next().unwrap().to_string())
    };
    for (p, d) in plain.iter().zip(&diff) {
        let (pl, dl) = (parse_line(p).unwrap(), parse_line(d).unwrap());
        assert_eq!(
            format!("{:?}", pl.body).split(' ').next(),
            format!("{:?}", dl.body).split(' ').next()
        );
        if let (Some(a), Some(b)) = (role(p), role(d)) {
            assert_eq!(a.trim_start_matches("role:"), b.trim_start_matches("role:"));
        }
    }
}

// ---- real DRBD 9.2.18 captures (drbd-utils 9.22) ----

/// The captures of a real DRBD 9.2.18 kernel module (drbd-utils 9.22.0, QEMU guests): the sample files
/// `real-drbd-9.2.18_<name>.txt`, by name; `drbdsetup status` output of the same runs is in
/// `real-drbd-9.2.18-status/`.
fn real_captures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter_map(|n| {
            n.strip_prefix("real-drbd-9.2.18_")?
                .strip_suffix(".txt")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 9, "real captures missing: {names:?}");
    names
}

fn real_text(name: &str) -> String {
    let path = data_dir().join(format!("real-drbd-9.2.18_{name}.txt"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn real_lines(name: &str) -> Vec<String> {
    sample_lines(&real_text(name))
}

/// The state after each line of a capture (resources sorted by name).
fn states_after_each_line(name: &str, lines: &[String]) -> Vec<Vec<Arc<Resource>>> {
    let mut engine = Engine::new();
    let mut out = Vec::new();
    lines
        .iter()
        .map(|l| {
            assert!(engine.apply_line(l, &mut out), "{name}: malformed: {l}");
            engine.state.snapshot()
        })
        .collect()
}

fn final_state(name: &str) -> Vec<Arc<Resource>> {
    states_after_each_line(name, &real_lines(name))
        .pop()
        .unwrap_or_default()
}

/// `drbdsetup status --json` output, without the `# source:` line.
fn status_json(file: &str) -> Value {
    let path = data_dir()
        .join("real-drbd-9.2.18-status")
        .join(format!("{file}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sorted_by(mut v: Vec<Value>, key: &str) -> Value {
    v.sort_by_key(|x| x[key].as_u64());
    Value::Array(v)
}

/// What `drbdsetup status --json` shows of each resource, in a shape both sides can be brought into;
/// without `stats` only the states (no I/O statistics, which events2 reports only when something else
/// changes or on a poll).
fn project_status(status: &Value, stats: bool) -> Value {
    let empty = Vec::new();
    let arr = |v: &Value, k: &str| v[k].as_array().unwrap_or(&empty).clone();
    let res: Vec<Value> = status
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| {
            let devices = arr(r, "devices")
                .iter()
                .map(|d| {
                    let mut o = json!({
                        "volume": d["volume"], "minor": d["minor"], "disk-state": d["disk-state"],
                        "client": d["client"], "quorum": d["quorum"], "size": d["size"],
                    });
                    if stats {
                        for k in ["read", "written", "al-writes", "bm-writes", "upper-pending", "lower-pending"] {
                            o[k] = d[k].clone();
                        }
                    }
                    o
                })
                .collect();
            let connections = arr(r, "connections")
                .iter()
                .map(|c| {
                    let pds = arr(c, "peer_devices")
                        .iter()
                        .map(|p| {
                            let mut o = json!({
                                "volume": p["volume"], "replication-state": p["replication-state"],
                                "peer-disk-state": p["peer-disk-state"], "peer-client": p["peer-client"],
                                "resync-suspended": p["resync-suspended"],
                            });
                            if stats {
                                for k in ["received", "sent", "out-of-sync", "pending", "unacked"] {
                                    o[k] = p[k].clone();
                                }
                            }
                            o
                        })
                        .collect();
                    let mut o = json!({
                        "peer-node-id": c["peer-node-id"], "name": c["name"],
                        "connection-state": c["connection-state"], "peer-role": c["peer-role"],
                        "peer_devices": sorted_by(pds, "volume"),
                    });
                    if stats {
                        for k in ["congested", "ap-in-flight", "rs-in-flight"] {
                            o[k] = c[k].clone();
                        }
                    }
                    o
                })
                .collect();
            let mut o = json!({
                "name": r["name"], "role": r["role"], "force-io-failures": r["force-io-failures"],
                "devices": sorted_by(devices, "volume"),
                "connections": sorted_by(connections, "peer-node-id"),
            });
            for k in ["suspended", "suspended-user", "suspended-no-data", "suspended-fencing", "suspended-quorum"] {
                o[k] = r[k].clone();
            }
            if stats {
                o["write-ordering"] = r["write-ordering"].clone();
            }
            o
        })
        .collect();
    Value::Array(res)
}

/// The same projection of the agent's state.
fn project_state(state: &[Arc<Resource>], stats: bool) -> Value {
    let yes = |t: Tri| match t {
        Tri::Yes => json!(true),
        Tri::No => json!(false),
        Tri::Unknown => Value::Null,
    };
    let res: Vec<Value> = state
        .iter()
        .map(|r| {
            let devices = r
                .devices
                .values()
                .map(|d| {
                    let mut o = json!({
                        "volume": d.volume, "minor": d.minor, "disk-state": d.disk.as_str(),
                        "client": yes(d.client), "quorum": yes(d.quorum), "size": d.size,
                    });
                    if stats {
                        o["read"] = json!(d.read);
                        o["written"] = json!(d.written);
                        o["al-writes"] = json!(d.al_writes);
                        o["bm-writes"] = json!(d.bm_writes);
                        o["upper-pending"] = json!(d.upper_pending);
                        o["lower-pending"] = json!(d.lower_pending);
                    }
                    o
                })
                .collect();
            let connections = r
                .connections
                .values()
                .map(|c| {
                    let pds = c
                        .peer_devices
                        .values()
                        .map(|p| {
                            let mut o = json!({
                                "volume": p.volume, "replication-state": p.replication.as_str(),
                                "peer-disk-state": p.peer_disk.as_str(), "peer-client": yes(p.peer_client),
                                "resync-suspended": p.resync_suspended.render(),
                            });
                            if stats {
                                o["received"] = json!(p.received);
                                o["sent"] = json!(p.sent);
                                o["out-of-sync"] = json!(p.out_of_sync);
                                o["pending"] = json!(p.pending);
                                o["unacked"] = json!(p.unacked);
                            }
                            o
                        })
                        .collect();
                    let mut o = json!({
                        "peer-node-id": c.peer_node_id, "name": c.conn_name,
                        "connection-state": c.connection.as_str(), "peer-role": c.peer_role.as_str(),
                        "peer_devices": sorted_by(pds, "volume"),
                    });
                    if stats {
                        o["congested"] = yes(c.congested);
                        o["ap-in-flight"] = json!(c.ap_in_flight);
                        o["rs-in-flight"] = json!(c.rs_in_flight);
                    }
                    o
                })
                .collect();
            let mut o = json!({
                "name": r.name, "role": r.role.as_str(), "force-io-failures": yes(r.force_io_failures),
                "devices": sorted_by(devices, "volume"),
                "connections": sorted_by(connections, "peer-node-id"),
                "suspended": r.suspended.any(),
                "suspended-user": r.suspended.has("user"),
                "suspended-no-data": r.suspended.has("no-data"),
                "suspended-fencing": r.suspended.has("fencing"),
                "suspended-quorum": r.suspended.has("quorum"),
            });
            if stats {
                o["write-ordering"] = json!(r.write_ordering.as_ref().map(|w| w.as_str()));
            }
            o
        })
        .collect();
    Value::Array(res)
}

#[test]
fn every_real_capture_applies_without_a_malformed_line() {
    for name in &real_captures() {
        let text = real_text(name);
        assert!(
            text.starts_with("# source: "),
            "{name}: the first line names where the capture comes from"
        );
        let lines = real_lines(name);
        // Every line of the capture, as drbdsetup printed it (the prefix of one capture script aside).
        let printed = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        assert_eq!(lines.len(), printed, "{name}");
        let mut engine = Engine::new();
        let stream = lines.join("\n") + "\n";
        let st = engine.apply_chunk(stream.as_bytes(), &mut Vec::new());
        assert_eq!(
            (st.lines, st.malformed),
            (printed as u64, 0),
            "{name}: lines, malformed"
        );
        assert!(
            engine.state.initial_dump_complete(),
            "{name}: every capture contains `exists -`"
        );
    }
}

#[test]
fn real_final_state_is_what_drbdsetup_status_shows() {
    // `events2 --now --full` and `status --json` at the end of the 3-node scenario: every field, I/O
    // statistics included.
    let want = project_status(&status_json("status-json-3node-final"), true);
    let got = project_state(&final_state("3node-now-full-final"), true);
    assert_eq!(got, want);
    // The initial dump of a `--poll` run a moment later shows the same.
    let lines = real_lines("poll-n-statistics");
    let dump = lines
        .iter()
        .position(|l| l.ends_with("exists -"))
        .expect("exists -");
    let states = states_after_each_line("poll-n-statistics", &lines);
    assert_eq!(project_state(&states[dump], true), want);
    // `status --verbose` adds the fields `--json` leaves out.
    let r = &final_state("3node-now-full-final")[0];
    let d = &r.devices[&0];
    assert_eq!(d.backing_dev.as_deref(), Some("/dev/vdb"));
    assert_eq!((d.al_suspended, d.blocked.as_str()), (Tri::No, "no"));
    // drbd-utils 9.22 prints no `open:` field, neither in events2 nor in `status`.
    assert_eq!(d.open, Tri::Unknown);
}

#[test]
fn real_captures_pass_through_the_states_drbdsetup_status_showed() {
    // Each `status --json` snapshot, taken during the scenario of a capture, is one of the states the
    // capture's lines lead through (states only: events2 reports I/O statistics only along with other
    // changes).
    for (capture, snapshot) in [
        ("2node-full", "status-json-2node-synced"),
        ("2node-full", "status-json-2node-peer-dead"),
        ("2node-ts-stats", "status-json-2node-synced"),
        ("2node-ts-stats", "status-json-2node-peer-dead"),
        ("3node-full", "status-json-3node-synced"),
        ("3node-full", "status-json-3node-link12-cut"),
        ("3node-full", "status-json-3node-no-quorum"),
    ] {
        let want = project_status(&status_json(snapshot), false);
        let states = states_after_each_line(capture, &real_lines(capture));
        assert!(
            states.iter().any(|s| project_state(s, false) == want),
            "{capture} never reaches the state of {snapshot}: {want:#}"
        );
    }
}

#[test]
fn partial_change_lines_give_the_states_of_full_ones() {
    // `2node-ts-stats` (`--statistics`: change lines carry only what changed) and `2node-full` (`--full`)
    // were captured side by side from the same run: merging the partial lines walks through the same
    // states, in the same order. (The two print I/O statistics at different moments: with `--full` a
    // device line comes along with every change of its resource's state.)
    let states =
        |name: &str| -> Vec<Vec<Arc<Resource>>> { states_after_each_line(name, &real_lines(name)) };
    let full = states("2node-full");
    let partial = states("2node-ts-stats");
    let full_states: Vec<Value> = full.iter().map(|s| project_state(s, false)).collect();
    let mut at = 0;
    let mut distinct = 0;
    for (i, s) in partial.iter().enumerate() {
        let s = project_state(s, false);
        match full_states[at..].iter().position(|f| *f == s) {
            Some(p) => {
                distinct += usize::from(p > 0);
                at += p;
            }
            None => panic!(
                "2node-ts-stats line {}: state not in 2node-full after line {}: {s:#}",
                i + 1,
                at + 1
            ),
        }
    }
    assert!(distinct > 20, "only {distinct} states compared");
    // At the end both agree on every field, statistics included, but for one device statistics line
    // the full capture got after the other had ended.
    let end = partial.last().expect("lines");
    let before_last = &full[full.len() - 2];
    assert_eq!(project_state(end, true), project_state(before_last, true));
    assert_eq!(
        real_lines("2node-full")
            .last()
            .map(|l| l.starts_with("change device ")),
        Some(true)
    );
}

#[test]
fn real_3node_capture_ends_where_the_final_dump_starts() {
    // The states match; the I/O statistics moved on (reads between the capture and the dump).
    let end = final_state("3node-full");
    let dump = final_state("3node-now-full-final");
    assert_eq!(project_state(&end, false), project_state(&dump, false));
    let (a, b) = (&end[0], &dump[0]);
    assert_eq!((a.devices[&0].read, b.devices[&0].read), (135088, 139184));
    assert_eq!((a.devices[&0].bm_writes, b.devices[&0].bm_writes), (13, 14));
    assert_eq!((a.may_promote, a.promotion_score), (Tri::No, 10103));
    assert_eq!(a.write_ordering, b.write_ordering);
    for c in a.connections.values() {
        let p = &c.peer_devices[&0];
        assert!(p.sync.is_none(), "no resync runs at the end");
        assert_eq!(c.paths.len(), 1);
        assert_eq!(c.paths[0].established, Tri::Yes);
        assert_eq!(c.paths, b.connections[&c.peer_node_id].paths);
    }
}

#[test]
fn real_teardown_leaves_no_resource() {
    let lines = real_lines("teardown-full");
    let states = states_after_each_line("teardown-full", &lines);
    assert!(states.last().expect("lines").is_empty());
    // Just before `destroy resource`: connections gone, the device diskless, then destroyed.
    let before = &states[states.len() - 3][0];
    assert!(before.connections.is_empty());
    assert_eq!(before.devices[&0].disk.as_str(), "Diskless");
    assert!(states[states.len() - 2][0].devices.is_empty());
    // The lab's state-truth run ends with node1 taken down as well.
    assert!(final_state("state-truth-node1-full").is_empty());
}

#[test]
fn a_second_now_dump_changes_nothing() {
    // `events2 --now --poll` prints the whole state again on `n`, `exists -` included.
    let lines = real_lines("poll-semantics");
    let states = states_after_each_line("poll-semantics", &lines);
    let dumps: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.as_str() == "exists -")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(dumps.len(), 3, "part A once, part B twice");
    assert_eq!(states[dumps[1]], states[dumps[2]]);
    assert_eq!(states[dumps[0]], states[dumps[2]]);
}
