//! Every sample in tests/data/events2 (copied from drbd-utils' regression tests, the DRBD user guide,
//! drbdtop and drbd-reactor) parses to the objects it shows.
//!
//! - golden: the parsed objects of each sample are compared with tests/data/events2/golden/<sample>.json
//!   (regenerate with `UPDATE_GOLDEN=1 cargo test --test events2_golden` and review the diff);
//! - round trip: printing a parsed line gives back the line, for every sample in drbdsetup's own field
//!   order;
//! - the only lines rejected are the ones the samples mark as invalid.

use drbd_reactor::drbd::events2::{parse_line, strip_ansi};
use std::path::{Path, PathBuf};

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
