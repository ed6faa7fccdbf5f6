//! The exporter's exposition for the shared events2 samples: golden files, and `promtool check metrics`.
//!
//! Golden files live in `tests/data/events2/prometheus/`; regenerate them with
//! `UPDATE_GOLDEN=1 cargo test --test prometheus_exposition` and review the diff.
//!
//! The promtool tests need `promtool` (Debian package `prometheus`). Without it they are skipped with a
//! loud message, unless `CI` is set: then they fail.

mod common;

use common::tool_or_skip;
use drbd_reactor::engine::Engine;
use drbd_reactor::plugins::prometheus::render::{self, DrbdVersion, View, FAMILIES};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/events2")
}

/// The shared samples the golden files cover.
const SAMPLES: &[&str] = &[
    "drbd-reactor_parser-unit-test-lines",
    "drbd-utils_events2-all-create-change",
    "drbd-utils_events2-all-create-change__color",
    "drbd-utils_events2-all-create-change__diff",
    "drbd-utils_events2-all-create-change__full",
    "drbd-utils_events2-all-create-change__statistics",
    "drbd-utils_events2-all-create-change__timestamps",
    "drbd-utils_events2-all-create-destroy",
    "drbd-utils_events2-all-create-helper",
    "drbd-utils_events2-all-create-helper__timestamps",
    "drbd-utils_events2-change-before-exists",
    "drbd-utils_events2-create-before-exists",
    "drbd-utils_events2-destroy-before-exists",
    "drbd-utils_events2-device-create-destroy",
    "drbd-utils_events2-exists-before-create",
    "drbd-utils_events2-first-out-of-order",
    "drbd-utils_events2-may-promote-peer-data",
    "drbd-utils_events2-may-promote-peer-role",
    "drbd-utils_events2-may-promote-quorum",
    "drbd-utils_events2-no-resources",
    "drbd-utils_events2-out-of-order",
    "drbd-utils_events2-promotion-score-devices",
    "drbd-utils_events2-promotion-score-inconsistent",
    "drbd-utils_events2-resource-create-destroy",
    "drbd-utils_events2-resource-exists",
    "drbd-utils_events2-sync",
    "drbd-utils_events2-sync__statistics",
    "drbdtop_events2-timestamps-statistics-2017",
    "drbdtop_events2-timestamps-statistics-k8s-2019",
    "ug9_events2-now-oneshot",
    "ug9_events2-realtime-connection-loss",
    "ug9_events2-statistics-now",
];

/// Samples that also get a golden file with `enums` off.
const NO_ENUM_SAMPLES: &[&str] = &[
    "drbd-utils_events2-sync",
    "drbdtop_events2-timestamps-statistics-k8s-2019",
    "ug9_events2-statistics-now",
];

const VERSION: DrbdVersion = DrbdVersion {
    kmod: (9, 2, 12),
    utils: (9, 30, 0),
};

/// Feeds a sample stream into the engine and returns the exporter's view of the resulting state.
fn view_of(stream: &[u8], enums: bool) -> View {
    let mut engine = Engine::new();
    let mut out = Vec::new();
    engine.apply_chunk(stream, &mut out);
    View {
        resources: engine.state.snapshot(),
        enums,
        version: VERSION,
    }
}

fn exposition(file: &Path, enums: bool) -> String {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    render::to_text(&view_of(&bytes, enums))
}

fn check_golden(name: &str, golden: &str, actual: &str) -> Result<(), String> {
    let path = data_dir().join("prometheus").join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
        std::fs::write(&path, actual).expect("write golden");
        return Ok(());
    }
    match std::fs::read_to_string(&path) {
        Ok(expected) if expected == actual => Ok(()),
        Ok(expected) => {
            let first = expected
                .lines()
                .zip(actual.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(expected.lines().count().min(actual.lines().count()));
            Err(format!(
                "{name}: exposition differs from {} at line {}:\n  expected: {:?}\n  actual:   {:?}",
                path.display(),
                first + 1,
                expected.lines().nth(first),
                actual.lines().nth(first)
            ))
        }
        Err(e) => Err(format!(
            "{name}: {}: {e} (UPDATE_GOLDEN=1 writes it)",
            path.display()
        )),
    }
}

#[test]
fn golden_expositions_of_the_shared_samples() {
    let mut errors = Vec::new();
    for name in SAMPLES {
        let file = data_dir().join(format!("{name}.txt"));
        let text = exposition(&file, true);
        if let Err(e) = check_golden(name, &format!("{name}.prom"), &text) {
            errors.push(e);
        }
    }
    for name in NO_ENUM_SAMPLES {
        let file = data_dir().join(format!("{name}.txt"));
        let text = exposition(&file, false);
        if let Err(e) = check_golden(name, &format!("{name}.noenums.prom"), &text) {
            errors.push(e);
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn collector_and_text_path_agree_on_every_sample() {
    for name in SAMPLES {
        let bytes = std::fs::read(data_dir().join(format!("{name}.txt"))).expect("sample");
        for enums in [false, true] {
            let view = view_of(&bytes, enums);
            let text = render::to_text(&view);
            let via_crate = prometheus::TextEncoder::new()
                .encode_to_string(&render::to_families(&view))
                .expect("encodes");
            assert_eq!(text, via_crate, "{name} enums={enums}");
        }
    }
}

/// Families and samples in the exposition: name → sample lines.
fn samples(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series and value");
            (series.to_string(), value.to_string())
        })
        .collect()
}

fn value(text: &str, series: &str) -> Option<String> {
    samples(text)
        .into_iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| v)
}

#[test]
fn upstream_units_and_semantics() {
    let text = exposition(
        &data_dir().join("drbdtop_events2-timestamps-statistics-k8s-2019.txt"),
        true,
    );
    let r = "pvc-0a2826c9-7108-11e9-8f74-0026b954ca4c";
    // KiB × 1024.
    assert_eq!(
        value(
            &text,
            &format!("drbd_device_size_bytes{{name=\"{r}\",volume=\"0\",minor=\"1016\"}}")
        )
        .as_deref(),
        Some("528330752")
    );
    assert_eq!(
        value(
            &text,
            &format!("drbd_device_read_bytes_total{{name=\"{r}\",volume=\"0\",minor=\"1016\"}}")
        )
        .as_deref(),
        Some("2154496")
    );
    assert_eq!(
        value(
            &text,
            &format!(
                "drbd_device_state{{name=\"{r}\",volume=\"0\",minor=\"1016\",drbd_device_state=\"UpToDate\"}}"
            )
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &text,
            &format!("drbd_resource_write_ordering{{name=\"{r}\",drbd_resource_write_ordering=\"flush\"}}")
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(value(&text, "drbdreactor_up").as_deref(), Some("1"));
    assert_eq!(
        value(&text, "drbd_version{kmod=\"9.2.12\",utils=\"9.30.0\"}").as_deref(),
        Some("1")
    );
    assert_eq!(
        value(&text, "drbd_resource_resources").as_deref(),
        Some("1")
    );
    // This old stream has no force-io-failures field: unknown, so no sample (not a made-up 0).
    assert!(!text.contains("drbd_resource_forceiofailures{"));

    // Resync progress and sectors × 512.
    let text = exposition(&data_dir().join("drbd-utils_events2-sync.txt"), true);
    let pd = "name=\"some-resource\",conn_name=\"some-peer\",peer_node_id=\"1\",volume=\"0\"";
    assert_eq!(
        value(&text, &format!("drbd_peerdevice_resync_done_ratio{{{pd}}}")).as_deref(),
        Some("0.375")
    );
    assert_eq!(
        value(
            &text,
            &format!("drbd_peerdevice_replication_state{{{pd},drbd_peerdevice_replication_state=\"SyncSource\"}}")
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &text,
            "drbd_path_established{name=\"some-resource\",conn_name=\"some-peer\",peer_node_id=\"1\",local=\"ipv4:1.2.3.4:7789\",peer=\"ipv4:5.6.7.8:7790\"}"
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &text,
            "drbd_resource_forceiofailures{name=\"some-resource\"}"
        )
        .as_deref(),
        Some("0")
    );
}

#[test]
fn force_io_failures_is_exported() {
    let stream = b"exists resource name:r role:Secondary suspended:no force-io-failures:yes may_promote:no promotion_score:0\nexists -\n";
    let text = render::to_text(&view_of(stream, false));
    assert_eq!(
        value(&text, "drbd_resource_forceiofailures{name=\"r\"}").as_deref(),
        Some("1")
    );
    let text = render::to_text(&view_of(
        b"exists resource name:r role:Secondary suspended:no force-io-failures:yes may_promote:no promotion_score:0\nchange resource name:r role:Secondary suspended:no force-io-failures:no may_promote:no promotion_score:0\n",
        false,
    ));
    assert_eq!(
        value(&text, "drbd_resource_forceiofailures{name=\"r\"}").as_deref(),
        Some("0")
    );
}

#[test]
fn enum_families_only_with_enums_and_unknown_values_kept() {
    let stream = b"exists resource name:r role:Leader suspended:no force-io-failures:no may_promote:no promotion_score:0\nexists -\n";
    let off = render::to_text(&view_of(stream, false));
    for f in FAMILIES.iter().filter(|f| f.enums_only) {
        assert!(!off.contains(&format!("# TYPE {} ", f.name)), "{}", f.name);
    }
    let on = render::to_text(&view_of(stream, true));
    assert_eq!(
        value(
            &on,
            "drbd_resource_role{name=\"r\",drbd_resource_role=\"Leader\"}"
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        value(
            &on,
            "drbd_resource_role{name=\"r\",drbd_resource_role=\"Primary\"}"
        )
        .as_deref(),
        Some("0")
    );
}

#[test]
fn label_values_are_escaped() {
    // A connection name cannot carry a quote in practice, but the output must stay parseable anyway.
    let stream = b"exists connection name:r peer-node-id:1 conn-name:a\"b\\c connection:Connected role:Secondary congested:no ap-in-flight:0 rs-in-flight:0\n";
    let text = render::to_text(&view_of(stream, false));
    assert!(
        text.contains(
            "drbd_connection_congested{name=\"r\",conn_name=\"a\\\"b\\\\c\",peer_node_id=\"1\"} 0"
        ),
        "{text}"
    );
}

// ---- promtool ----

/// Lint findings promtool reports on purpose: upstream drbd-reactor types these two families as counters
/// without the `_total` suffix, and dashboards depend on their names.
const ACCEPTED_LINT: &[&str] = &[
    "drbd_peerdevice_sent_bytes counter metrics should have \"_total\" suffix",
    "drbd_peerdevice_received_bytes counter metrics should have \"_total\" suffix",
];

/// Runs `promtool check metrics`; Ok when the text parses and every lint finding is an accepted one.
pub fn promtool_check(promtool: &Path, text: &str) -> Result<(), String> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run promtool: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .map_err(|e| format!("writing to promtool: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => Ok(()),
        // 3 = lint findings only.
        Some(3) => {
            let unexpected: Vec<&str> = report
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !ACCEPTED_LINT.contains(l))
                .collect();
            if unexpected.is_empty() {
                Ok(())
            } else {
                Err(format!("promtool lint findings: {unexpected:?}"))
            }
        }
        other => Err(format!("promtool exit {other:?}: {report}")),
    }
}

/// The exposition without the two upstream families that promtool's lint flags: promtool must pass it
/// with exit code 0.
fn without_accepted_lint(text: &str) -> String {
    text.lines()
        .filter(|l| {
            let name = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
                .unwrap_or(l);
            !(name.starts_with("drbd_peerdevice_sent_bytes")
                || name.starts_with("drbd_peerdevice_received_bytes"))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn promtool_strict(promtool: &Path, text: &str) -> Result<(), String> {
    let out = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("piped").write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .map_err(|e| format!("promtool: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[test]
fn promtool_checks_every_sample_stream() {
    let Some(promtool) = tool_or_skip("promtool", "promtool_checks_every_sample_stream") else {
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .expect("tests/data/events2")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= SAMPLES.len(), "samples missing");
    let mut errors = Vec::new();
    let mut checked = 0;
    for f in &files {
        for enums in [false, true] {
            let text = exposition(f, enums);
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            if let Err(e) = promtool_check(&promtool, &text) {
                errors.push(format!("{name} enums={enums}: {e}"));
            }
            if let Err(e) = promtool_strict(&promtool, &without_accepted_lint(&text)) {
                errors.push(format!("{name} enums={enums} (strict): {e}"));
            }
            checked += 1;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    eprintln!("promtool check metrics passed on {checked} expositions");
}

#[test]
fn promtool_flags_only_the_documented_upstream_names() {
    let Some(promtool) = tool_or_skip(
        "promtool",
        "promtool_flags_only_the_documented_upstream_names",
    ) else {
        return;
    };
    // The check itself must catch real problems: a bad line fails.
    assert!(promtool_check(&promtool, "# TYPE x gauge\nx{a=\"1\" 1\n").is_err());
    assert!(promtool_check(
        &promtool,
        "# HELP x_total h\n# TYPE x_total gauge\nx_total 1\n"
    )
    .is_err());
    let text = exposition(&data_dir().join("drbd-utils_events2-sync.txt"), true);
    promtool_check(&promtool, &text).expect("only accepted lint");
}
