//! The exporter's exposition for the shared events2 samples: golden files, and `promtool check metrics`.
//!
//! Golden files live in `tests/data/events2/prometheus/`; regenerate them with
//! `UPDATE_GOLDEN=1 cargo test --test prometheus_exposition` and review the diff.
//!
//! Upstream compatibility on real DRBD output: after every line of every real DRBD 9.2.18 capture, the
//! families marked upstream's equal what upstream drbd-reactor exports for the same lines (a model of
//! upstream, [`upstream`], written from its documented behaviour), and for the 3-node capture they equal
//! `prometheus/upstream/real-drbd-9.2.18_3node-full.prom`, written by hand from upstream's rules
//! (`UPDATE_GOLDEN` never writes it).
//!
//! The promtool tests need `promtool` (Debian package `prometheus`). Without it they are skipped with a
//! loud message, unless `CI` is set: then they fail.

mod common;

use common::tool_or_skip;
use drbd_reactor::engine::Engine;
use drbd_reactor::plugins::prometheus::render::{
    self, DrbdVersion, PeerByteCounters, View, FAMILIES,
};
use std::collections::{BTreeMap, BTreeSet};
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
    "real-drbd-9.2.18_2node-full",
    "real-drbd-9.2.18_2node-ts-stats",
    "real-drbd-9.2.18_3node-full",
    "real-drbd-9.2.18_3node-now-full-final",
    "real-drbd-9.2.18_3node-systemd-promote",
    "real-drbd-9.2.18_poll-n-statistics",
    "real-drbd-9.2.18_poll-semantics",
    "real-drbd-9.2.18_state-truth-node1-full",
    "real-drbd-9.2.18_teardown-full",
];

/// Samples that also get a golden file with `enums` off.
const NO_ENUM_SAMPLES: &[&str] = &[
    "drbd-utils_events2-sync",
    "drbdtop_events2-timestamps-statistics-k8s-2019",
    "ug9_events2-statistics-now",
    "real-drbd-9.2.18_3node-full",
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
        ..Default::default()
    }
}

fn exposition(file: &Path, enums: bool) -> String {
    exposition_with(file, enums, PeerByteCounters::Upstream)
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

/// A sample file as a stream of lines (without the capture prefix of [`strip_capture_prefix`]).
fn stream_of(file: &Path) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    if !bytes.starts_with(b"[") && !bytes.windows(2).any(|w| w == b"\n[") {
        return bytes;
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut out = String::with_capacity(text.len());
    for l in text.split_inclusive('\n') {
        out.push_str(strip_capture_prefix(l));
    }
    out.into_bytes()
}

fn exposition_with(file: &Path, enums: bool, names: PeerByteCounters) -> String {
    let bytes = stream_of(file);
    let mut view = view_of(&bytes, enums);
    view.peer_byte_counters = names;
    render::to_text(&view)
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
    // `peerByteCounters: total` and `both`, on a sample with peer devices.
    let name = "drbd-utils_events2-sync";
    let file = data_dir().join(format!("{name}.txt"));
    for (names, suffix) in [
        (PeerByteCounters::Total, "total"),
        (PeerByteCounters::Both, "both"),
    ] {
        let text = exposition_with(&file, false, names);
        if let Err(e) = check_golden(name, &format!("{name}.noenums.{suffix}.prom"), &text) {
            errors.push(e);
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn peer_byte_counter_names() {
    let file = data_dir().join("drbd-utils_events2-sync.txt");
    let pd = "{name=\"some-resource\",conn_name=\"some-peer\",peer_node_id=\"1\",volume=\"0\"}";
    let upstream = exposition(&file, true);
    let total = exposition_with(&file, true, PeerByteCounters::Total);
    let both = exposition_with(&file, true, PeerByteCounters::Both);
    for dir in ["sent", "received"] {
        let up = format!("drbd_peerdevice_{dir}_bytes{pd}");
        let tot = format!("drbd_peerdevice_{dir}_bytes_total{pd}");
        assert!(value(&upstream, &up).is_some() && value(&upstream, &tot).is_none());
        assert!(value(&total, &up).is_none() && value(&total, &tot).is_some());
        assert_eq!(value(&both, &up), value(&both, &tot));
        assert_eq!(value(&both, &up), value(&upstream, &up));
        assert!(total.contains(&format!(
            "# TYPE drbd_peerdevice_{dir}_bytes_total counter\n"
        )));
    }
    // Nothing else differs: the same samples, renamed.
    let renamed = total
        .replace(
            "drbd_peerdevice_sent_bytes_total",
            "drbd_peerdevice_sent_bytes",
        )
        .replace(
            "drbd_peerdevice_received_bytes_total",
            "drbd_peerdevice_received_bytes",
        );
    let plain = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(plain(&renamed), plain(&upstream));
}

#[test]
fn collector_and_text_path_agree_on_every_sample() {
    for name in SAMPLES {
        let bytes = stream_of(&data_dir().join(format!("{name}.txt")));
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

/// The lint findings promtool reports on the default (`peerByteCounters: upstream`) output: upstream
/// drbd-reactor types these two families as counters without the `_total` suffix, and dashboards depend
/// on their names. `peerByteCounters: total` has none.
const UPSTREAM_LINT: &[&str] = &[
    "drbd_peerdevice_sent_bytes counter metrics should have \"_total\" suffix",
    "drbd_peerdevice_received_bytes counter metrics should have \"_total\" suffix",
];

/// Runs `promtool check metrics`: its exit code and its findings (one per line).
fn promtool(promtool: &Path, text: &str) -> Result<(Option<i32>, Vec<String>), String> {
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
    let findings = report
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    Ok((out.status.code(), findings))
}

/// Ok when promtool reports exactly `expected` (in any order): exit 0 for none, 3 (lint only) otherwise.
fn promtool_expect(promtool_path: &Path, text: &str, expected: &[&str]) -> Result<(), String> {
    let (code, findings) = promtool(promtool_path, text)?;
    let mut got: Vec<&str> = findings.iter().map(String::as_str).collect();
    got.sort_unstable();
    let mut want = expected.to_vec();
    want.sort_unstable();
    let want_code = if expected.is_empty() { 0 } else { 3 };
    if code == Some(want_code) && got == want {
        Ok(())
    } else {
        Err(format!(
            "promtool exit {code:?} (expected {want_code}), findings {got:?}, expected {want:?}"
        ))
    }
}

/// The findings the default output must get: the two upstream names, where the text has them.
fn expected_upstream_lint(text: &str) -> Vec<&'static str> {
    UPSTREAM_LINT
        .iter()
        .copied()
        .filter(|f| {
            let family = f.split(' ').next().unwrap_or_default();
            text.contains(&format!("# TYPE {family} counter\n"))
        })
        .collect()
}

#[test]
fn promtool_checks_every_sample_stream() {
    let Some(promtool_path) = tool_or_skip("promtool", "promtool_checks_every_sample_stream")
    else {
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
    let mut with_peer_devices = 0;
    for f in &files {
        for enums in [false, true] {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            // Default names: exactly the two documented findings (when the sample has peer devices).
            let text = exposition(f, enums);
            let expected = expected_upstream_lint(&text);
            if expected.len() == UPSTREAM_LINT.len() {
                with_peer_devices += 1;
            }
            if let Err(e) = promtool_expect(&promtool_path, &text, &expected) {
                errors.push(format!("{name} enums={enums}: {e}"));
            }
            // `total`: no finding at all.
            let text = exposition_with(f, enums, PeerByteCounters::Total);
            if let Err(e) = promtool_expect(&promtool_path, &text, &[]) {
                errors.push(format!("{name} enums={enums} peerByteCounters=total: {e}"));
            }
            checked += 2;
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    assert!(
        with_peer_devices >= 10,
        "too few samples with peer devices ({with_peer_devices}): the upstream findings were hardly checked"
    );
    eprintln!("promtool check metrics passed on {checked} expositions");
}

#[test]
fn promtool_flags_only_the_documented_upstream_names() {
    let Some(promtool_path) = tool_or_skip(
        "promtool",
        "promtool_flags_only_the_documented_upstream_names",
    ) else {
        return;
    };
    // The check itself must catch real problems: a bad line fails, a misnamed counter is a finding.
    assert!(promtool_expect(&promtool_path, "# TYPE x gauge\nx{a=\"1\" 1\n", &[]).is_err());
    assert!(promtool_expect(
        &promtool_path,
        "# HELP x_total h\n# TYPE x_total gauge\nx_total 1\n",
        &[]
    )
    .is_err());
    let file = data_dir().join("drbd-utils_events2-sync.txt");
    promtool_expect(&promtool_path, &exposition(&file, true), UPSTREAM_LINT)
        .expect("exactly the two upstream findings");
    promtool_expect(
        &promtool_path,
        &exposition_with(&file, true, PeerByteCounters::Total),
        &[],
    )
    .expect("no finding with peerByteCounters: total");
    // `both` carries the upstream names, so their two findings too.
    promtool_expect(
        &promtool_path,
        &exposition_with(&file, true, PeerByteCounters::Both),
        UPSTREAM_LINT,
    )
    .expect("exactly the two upstream findings with both");
}

// ---- upstream compatibility on real DRBD output ----

/// The captures of a real DRBD 9.2.18 kernel module with drbd-utils 9.22.0 (`real-drbd-9.2.18_*.txt`),
/// by file stem.
fn real_captures() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir())
        .expect("tests/data/events2")
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().to_string();
            n.strip_suffix(".txt")
                .filter(|n| n.starts_with("real-drbd-"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 9, "real captures missing: {names:?}");
    names
}

/// The versions of the real captures' hosts.
const REAL_VERSION: DrbdVersion = DrbdVersion {
    kmod: (9, 2, 18),
    utils: (9, 22, 0),
};

/// The lines of a capture as drbdsetup printed them: the capture's comments dropped, and the
/// `[<unix seconds>] ` prefix one capture script put before each line removed.
fn capture_lines(name: &str) -> Vec<String> {
    let path = data_dir().join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| strip_capture_prefix(l).to_string())
        .collect()
}

/// A Prometheus text exposition, reduced to what dashboards and alert rules see: each family's type, and
/// each sample's family, label set and value.
#[derive(Debug, Default, PartialEq)]
struct Expo {
    types: BTreeMap<String, String>,
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Expo {
    fn parse(text: &str) -> Expo {
        let mut e = Expo::default();
        for l in text.lines() {
            if let Some(t) = l.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("# TYPE name kind");
                e.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if l.starts_with('#') || l.trim().is_empty() {
                continue;
            }
            let (series, value) = l.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {l}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}').expect("}"))),
                None => (series, BTreeMap::new()),
            };
            let dup = e.samples.insert((name.to_string(), labels), value);
            assert!(dup.is_none(), "duplicate series: {l}");
        }
        e
    }

    /// Only the families in `names`.
    fn only(&self, names: &BTreeSet<&str>) -> Expo {
        Expo {
            types: self
                .types
                .iter()
                .filter(|(n, _)| names.contains(n.as_str()))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            samples: self
                .samples
                .iter()
                .filter(|((n, _), _)| names.contains(n.as_str()))
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    /// Types of the families that have samples (an exporter may or may not write the header of a family
    /// without samples).
    fn used_types(&self) -> BTreeMap<String, String> {
        let used: BTreeSet<&str> = self.samples.keys().map(|(n, _)| n.as_str()).collect();
        self.types
            .iter()
            .filter(|(n, _)| used.contains(n.as_str()))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    /// The differences, one line each (empty when equal).
    fn diff(&self, other: &Expo, this: &str, that: &str) -> Vec<String> {
        let mut d = Vec::new();
        let (a, b) = (self.used_types(), other.used_types());
        for (n, t) in &a {
            if b.get(n).is_some_and(|u| u != t) {
                d.push(format!("{n}: type {t} in {this}, {} in {that}", b[n]));
            }
        }
        let show = |(n, l): &(String, BTreeMap<String, String>)| format!("{n}{l:?}");
        for (k, v) in &self.samples {
            match other.samples.get(k) {
                None => d.push(format!("only in {this}: {} {v}", show(k))),
                Some(w) if w != v => d.push(format!("{}: {v} in {this}, {w} in {that}", show(k))),
                Some(_) => {}
            }
        }
        for (k, v) in &other.samples {
            if !self.samples.contains_key(k) {
                d.push(format!("only in {that}: {} {v}", show(k)));
            }
        }
        d
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").expect("label=\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => match chars.next().expect("escape").1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(name.to_string(), value);
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    out
}

/// The families our exporter marks as upstream drbd-reactor's (same name, type, labels and unit).
fn upstream_families() -> BTreeSet<&'static str> {
    FAMILIES
        .iter()
        .filter(|f| f.upstream)
        .map(|f| f.name)
        .collect()
}

/// Our exposition after `lines`, with `enums`, reduced to the upstream families.
fn ours(lines: &[String], enums: bool) -> Expo {
    let stream = lines.join("\n") + "\n";
    let mut view = view_of(stream.as_bytes(), enums);
    view.version = REAL_VERSION;
    Expo::parse(&render::to_text(&view)).only(&upstream_families())
}

/// A model of what upstream drbd-reactor (1.11) exports for a stream of events2 lines: its events2
/// parser, its core state and its prometheus plugin, written from upstream's documented behaviour, and
/// independent of this crate's parser, state and exporter.
mod upstream {
    use super::Expo;
    use std::collections::BTreeMap;

    const ROLES: &[&str] = &["Unknown", "Primary", "Secondary"];
    const DISK_STATES: &[&str] = &[
        "Diskless",
        "Attaching",
        "Detaching",
        "Failed",
        "Negotiating",
        "Inconsistent",
        "Outdated",
        "DUnknown",
        "Consistent",
        "UpToDate",
    ];
    const CONN_STATES: &[&str] = &[
        "StandAlone",
        "Disconnecting",
        "Unconnected",
        "Timeout",
        "BrokenPipe",
        "NetworkFailure",
        "ProtocolError",
        "TearDown",
        "Connecting",
        "Connected",
    ];
    const REPL_STATES: &[&str] = &[
        "Off",
        "Established",
        "StartingSyncS",
        "StartingSyncT",
        "WFBitMapS",
        "WFBitMapT",
        "WFSyncUUID",
        "SyncSource",
        "SyncTarget",
        "VerifyS",
        "VerifyT",
        "PausedSyncS",
        "PausedSyncT",
        "Ahead",
        "Behind",
    ];

    #[derive(Debug, Clone)]
    struct Resource {
        role: &'static str,
        suspended: bool,
        may_promote: bool,
        promotion_score: i64,
        // `force-io-failures` is parsed but never copied into the core's resource: always false.
        force_io_failures: bool,
        devices: BTreeMap<u64, Device>,
        connections: BTreeMap<u64, Connection>,
    }

    #[derive(Debug, Clone, Default)]
    struct Device {
        minor: u64,
        disk: &'static str,
        client: bool,
        quorum: bool,
        open: bool,
        size: u64,
        read: u64,
        written: u64,
        al_writes: u64,
        bm_writes: u64,
        upper_pending: u64,
        lower_pending: u64,
        al_suspended: bool,
    }

    #[derive(Debug, Clone)]
    struct Connection {
        conn_name: String,
        connection: &'static str,
        congested: bool,
        ap_in_flight: u64,
        rs_in_flight: u64,
        peer_devices: BTreeMap<u64, PeerDevice>,
    }

    #[derive(Debug, Clone, Default)]
    struct PeerDevice {
        conn_name: String,
        received: u64,
        sent: u64,
        out_of_sync: u64,
    }

    /// A resource created by any line that names it: the parser's defaults (role `Unknown`).
    impl Default for Resource {
        fn default() -> Resource {
            Resource {
                role: "Unknown",
                suspended: false,
                may_promote: false,
                promotion_score: 0,
                force_io_failures: false,
                devices: BTreeMap::new(),
                connections: BTreeMap::new(),
            }
        }
    }

    /// Also the placeholder a peer-device line creates for an unknown connection (`StandAlone`).
    impl Default for Connection {
        fn default() -> Connection {
            Connection {
                conn_name: String::new(),
                connection: "StandAlone",
                congested: false,
                ap_in_flight: 0,
                rs_in_flight: 0,
                peer_devices: BTreeMap::new(),
            }
        }
    }

    /// The key/value pairs of one line, read the way upstream does.
    struct Fields<'a>(BTreeMap<&'a str, &'a str>);

    impl<'a> Fields<'a> {
        fn str(&self, k: &str) -> &'a str {
            self.0.get(k).copied().unwrap_or("")
        }
        /// `str_to_bool`: only `no` and `false` are false; an absent field is false.
        fn bool(&self, k: &str) -> bool {
            self.0.get(k).is_some_and(|v| *v != "no" && *v != "false")
        }
        /// A number; absent is 0, unreadable drops the line.
        fn num(&self, k: &str) -> Result<u64, String> {
            self.0
                .get(k)
                .map_or(Ok(0), |v| v.parse().map_err(|_| format!("{k}:{v}")))
        }
        /// An enum value; absent is the default, an unknown name drops the line.
        fn one_of(
            &self,
            k: &str,
            names: &[&'static str],
            default: &'static str,
        ) -> Result<&'static str, String> {
            match self.0.get(k) {
                None => Ok(default),
                Some(v) => names
                    .iter()
                    .copied()
                    .find(|n| n == v)
                    .ok_or(format!("{k}:{v}")),
            }
        }
    }

    /// Upstream's core state, which is what its exporter renders.
    #[derive(Debug, Default)]
    pub struct Upstream {
        resources: BTreeMap<String, Resource>,
    }

    impl Upstream {
        /// Applies one line as upstream reads `drbdsetup events2 --full --poll` (no `--timestamps`:
        /// a capture's timestamp is dropped first). Err for a line upstream drops.
        pub fn line(&mut self, line: &str) -> Result<(), String> {
            let mut line = line.trim();
            if line.starts_with(|c: char| c.is_ascii_digit()) {
                line = line.split_once(' ').map_or("", |(_, l)| l);
            }
            if line == "exists -" {
                return Ok(());
            }
            let mut tokens = line.split_whitespace();
            let verb = tokens.next().unwrap_or_default();
            if !["exists", "create", "change", "destroy"].contains(&verb) {
                return Err(format!("verb {verb}"));
            }
            let object = tokens.next().unwrap_or_default();
            let f = Fields(tokens.filter_map(|t| t.split_once(':')).collect());
            let destroy = verb == "destroy";
            let name = f.str("name").to_string();
            match object {
                "resource" => {
                    let role = f.one_of("role", ROLES, "Unknown")?;
                    let promotion_score =
                        i64::try_from(f.num("promotion_score")?).map_err(|e| e.to_string())?;
                    if destroy {
                        self.resources.remove(&name);
                        return Ok(());
                    }
                    let r = self.resources.entry(name).or_default();
                    r.role = role;
                    r.suspended = f.bool("suspended");
                    r.may_promote = f.bool("may_promote");
                    r.promotion_score = promotion_score;
                }
                "device" => {
                    let d = Device {
                        minor: f.num("minor")?,
                        disk: f.one_of("disk", DISK_STATES, "DUnknown")?,
                        client: f.bool("client"),
                        quorum: f.bool("quorum"),
                        open: f.bool("open"),
                        size: f.num("size")?,
                        read: f.num("read")?,
                        written: f.num("written")?,
                        al_writes: f.num("al-writes")?,
                        bm_writes: f.num("bm-writes")?,
                        upper_pending: f.num("upper-pending")?,
                        lower_pending: f.num("lower-pending")?,
                        al_suspended: f.bool("al-suspended"),
                    };
                    let volume = f.num("volume")?;
                    let r = self.resources.entry(name).or_default();
                    if destroy {
                        r.devices.remove(&volume);
                    } else {
                        r.devices.insert(volume, d);
                    }
                }
                "connection" => {
                    let mut c = Connection {
                        conn_name: f.str("conn-name").to_string(),
                        connection: f.one_of("connection", CONN_STATES, "StandAlone")?,
                        congested: f.bool("congested"),
                        ap_in_flight: f.num("ap-in-flight")?,
                        rs_in_flight: f.num("rs-in-flight")?,
                        peer_devices: BTreeMap::new(),
                    };
                    f.one_of("role", ROLES, "Unknown")?;
                    let peer = f.num("peer-node-id")?;
                    let r = self.resources.entry(name).or_default();
                    match r.connections.remove(&peer) {
                        _ if destroy => {}
                        Some(old) => {
                            c.peer_devices = old.peer_devices;
                            r.connections.insert(peer, c);
                        }
                        None => {
                            r.connections.insert(peer, c);
                        }
                    }
                }
                "peer-device" => {
                    f.one_of("replication", REPL_STATES, "Off")?;
                    f.one_of("peer-disk", DISK_STATES, "DUnknown")?;
                    let p = PeerDevice {
                        conn_name: f.str("conn-name").to_string(),
                        received: f.num("received")?,
                        sent: f.num("sent")?,
                        out_of_sync: f.num("out-of-sync")?,
                    };
                    f.num("pending")?;
                    f.num("unacked")?;
                    let (peer, volume) = (f.num("peer-node-id")?, f.num("volume")?);
                    let r = self.resources.entry(name).or_default();
                    let c = r.connections.entry(peer).or_default();
                    if destroy {
                        c.peer_devices.remove(&volume);
                    } else {
                        c.peer_devices.insert(volume, p);
                    }
                }
                // Paths are kept, but no exported family is about them.
                "path" => {
                    f.num("peer-node-id")?;
                    self.resources.entry(name).or_default();
                }
                other => return Err(format!("object {other}")),
            }
            Ok(())
        }

        /// What the prometheus plugin exports for the current state.
        pub fn exposition(&self, enums: bool, kmod: &str, utils: &str) -> Expo {
            let mut e = Expo::default();
            let mut add = |family: &str, kind: &str, labels: &[(&str, &str)], value: f64| {
                e.types.insert(family.to_string(), kind.to_string());
                let labels = labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                e.samples.insert((family.to_string(), labels), value);
            };
            let b = |v: bool| if v { 1.0 } else { 0.0 };
            add("drbdreactor_up", "gauge", &[], 1.0);
            add(
                "drbd_version",
                "gauge",
                &[("kmod", kmod), ("utils", utils)],
                1.0,
            );
            add(
                "drbd_resource_resources",
                "gauge",
                &[],
                self.resources.len() as f64,
            );
            for (name, r) in &self.resources {
                let res = [("name", name.as_str())];
                if enums {
                    for s in ROLES {
                        add(
                            "drbd_resource_role",
                            "gauge",
                            &[res[0], ("drbd_resource_role", s)],
                            b(*s == r.role),
                        );
                    }
                }
                add("drbd_resource_suspended", "gauge", &res, b(r.suspended));
                add("drbd_resource_maypromote", "gauge", &res, b(r.may_promote));
                add(
                    "drbd_resource_promotionscore",
                    "gauge",
                    &res,
                    r.promotion_score as f64,
                );
                add(
                    "drbd_resource_forceiofailures",
                    "gauge",
                    &res,
                    b(r.force_io_failures),
                );
                for (peer, c) in &r.connections {
                    let peer = peer.to_string();
                    let conn = [
                        ("name", name.as_str()),
                        ("conn_name", c.conn_name.as_str()),
                        ("peer_node_id", peer.as_str()),
                    ];
                    if enums {
                        for s in CONN_STATES {
                            let mut l = conn.to_vec();
                            l.push(("drbd_connection_state", s));
                            add("drbd_connection_state", "gauge", &l, b(*s == c.connection));
                        }
                    }
                    add("drbd_connection_congested", "gauge", &conn, b(c.congested));
                    add(
                        "drbd_connection_apinflight_bytes",
                        "gauge",
                        &conn,
                        c.ap_in_flight as f64 * 512.0,
                    );
                    add(
                        "drbd_connection_rsinflight_bytes",
                        "gauge",
                        &conn,
                        c.rs_in_flight as f64 * 512.0,
                    );
                    for (volume, p) in &c.peer_devices {
                        let volume = volume.to_string();
                        let pd = [
                            ("name", name.as_str()),
                            ("conn_name", p.conn_name.as_str()),
                            ("peer_node_id", peer.as_str()),
                            ("volume", volume.as_str()),
                        ];
                        add(
                            "drbd_peerdevice_outofsync_bytes",
                            "gauge",
                            &pd,
                            p.out_of_sync as f64 * 1024.0,
                        );
                        add(
                            "drbd_peerdevice_sent_bytes",
                            "counter",
                            &pd,
                            p.sent as f64 * 1024.0,
                        );
                        add(
                            "drbd_peerdevice_received_bytes",
                            "counter",
                            &pd,
                            p.received as f64 * 1024.0,
                        );
                    }
                }
                for (volume, d) in &r.devices {
                    let (volume, minor) = (volume.to_string(), d.minor.to_string());
                    let dev = [
                        ("name", name.as_str()),
                        ("volume", volume.as_str()),
                        ("minor", minor.as_str()),
                    ];
                    if enums {
                        for s in DISK_STATES {
                            let mut l = dev.to_vec();
                            l.push(("drbd_device_state", s));
                            add("drbd_device_state", "gauge", &l, b(*s == d.disk));
                        }
                    }
                    add("drbd_device_client", "gauge", &dev, b(d.client));
                    add(
                        "drbd_device_unintentionaldiskless",
                        "gauge",
                        &dev,
                        b(!d.client && d.disk == "Diskless"),
                    );
                    add("drbd_device_quorum", "gauge", &dev, b(d.quorum));
                    add("drbd_device_open", "gauge", &dev, b(d.open));
                    add(
                        "drbd_device_size_bytes",
                        "gauge",
                        &dev,
                        d.size as f64 * 1024.0,
                    );
                    add(
                        "drbd_device_read_bytes_total",
                        "counter",
                        &dev,
                        d.read as f64 * 1024.0,
                    );
                    add(
                        "drbd_device_written_bytes_total",
                        "counter",
                        &dev,
                        d.written as f64 * 1024.0,
                    );
                    add(
                        "drbd_device_alwrites_total",
                        "counter",
                        &dev,
                        d.al_writes as f64,
                    );
                    add(
                        "drbd_device_bmwrites_total",
                        "counter",
                        &dev,
                        d.bm_writes as f64,
                    );
                    add(
                        "drbd_device_upperpending",
                        "gauge",
                        &dev,
                        d.upper_pending as f64,
                    );
                    add(
                        "drbd_device_lowerpending",
                        "gauge",
                        &dev,
                        d.lower_pending as f64,
                    );
                    add("drbd_device_alsuspended", "gauge", &dev, b(d.al_suspended));
                }
            }
            e
        }
    }
}

/// Upstream's exposition after `lines` (and the lines it drops).
fn theirs(lines: &[String], enums: bool) -> (Expo, Vec<String>) {
    let mut up = upstream::Upstream::default();
    let dropped = lines
        .iter()
        .filter(|l| up.line(l).is_err())
        .cloned()
        .collect();
    (up.exposition(enums, "9.2.18", "9.22.0"), dropped)
}

#[test]
fn upstream_golden_of_the_real_3node_capture() {
    // The hand-written golden is what upstream exports: the model agrees with it, and so does the
    // exporter, with `enums` (and without, minus the three enum families).
    let name = "real-drbd-9.2.18_3node-full";
    let path = data_dir()
        .join("prometheus/upstream")
        .join(format!("{name}.prom"));
    let golden = Expo::parse(&std::fs::read_to_string(&path).expect("upstream golden"));
    let lines = capture_lines(name);
    let (model, _) = theirs(&lines, true);
    let d = golden.diff(&model, "the golden file", "the upstream model");
    assert!(d.is_empty(), "{}", d.join("\n"));
    assert_eq!(
        golden.types, model.types,
        "every family upstream has, with its type"
    );
    let d = golden.diff(&ours(&lines, true), "upstream", "ours");
    assert!(d.is_empty(), "{}", d.join("\n"));
    let enum_families = [
        "drbd_resource_role",
        "drbd_connection_state",
        "drbd_device_state",
    ];
    let mut no_enums = golden;
    no_enums
        .samples
        .retain(|(n, _), _| !enum_families.contains(&n.as_str()));
    no_enums
        .types
        .retain(|n, _| !enum_families.contains(&n.as_str()));
    let d = no_enums.diff(&ours(&lines, false), "upstream", "ours");
    assert!(d.is_empty(), "{}", d.join("\n"));
    // The families called upstream's are exactly upstream's.
    let names: BTreeSet<&str> = model.types.keys().map(String::as_str).collect();
    assert_eq!(upstream_families(), names);
}

#[test]
fn real_captures_export_what_upstream_exports_after_every_line() {
    let mut compared = 0;
    for name in &real_captures() {
        // Upstream runs `events2 --full`; without `--full` a change line carries only what changed and
        // upstream, replacing each object with the last line, would reset the rest to defaults.
        if name.ends_with("ts-stats") {
            continue;
        }
        let lines = capture_lines(name);
        for enums in [true, false] {
            let mut dropped_all = Vec::new();
            for n in 1..=lines.len() {
                let (want, dropped) = theirs(&lines[..n], enums);
                dropped_all = dropped;
                let d = want.diff(&ours(&lines[..n], enums), "upstream", "ours");
                assert!(
                    d.is_empty(),
                    "{name} (enums {enums}) after line {n} ({}):\n{}",
                    lines[n - 1],
                    d.join("\n")
                );
                compared += 1;
            }
            // The only lines upstream drops are the kernel helper calls, which no family shows.
            assert!(
                dropped_all.iter().all(|l| l.contains(" helper ")),
                "{name}: upstream drops {dropped_all:?}"
            );
        }
    }
    assert!(compared > 500, "only {compared} expositions compared");
}

#[test]
fn real_resync_progress_and_open() {
    // The new resync families on a real resync: `done:23.45 … eta:10` while node3 syncs, no ETA while
    // DRBD prints `eta:nan`, and nothing once the resync ended.
    let lines = capture_lines("real-drbd-9.2.18_3node-full");
    let at = |needle: &str| {
        1 + lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}"))
    };
    let text = |n: usize| {
        let stream = lines[..n].join("\n") + "\n";
        render::to_text(&view_of(stream.as_bytes(), false))
    };
    let node3 = "{name=\"r0\",conn_name=\"node3\",peer_node_id=\"2\",volume=\"0\"}";
    let t = text(at("done:23.45"));
    assert_eq!(
        value(&t, &format!("drbd_peerdevice_resync_done_ratio{node3}")).as_deref(),
        Some("0.2345")
    );
    assert_eq!(
        value(&t, &format!("drbd_peerdevice_resync_eta_seconds{node3}")).as_deref(),
        Some("10")
    );
    let t = text(at("conn-name:node3 volume:0 replication:SyncSource peer-disk:Inconsistent peer-client:no resync-suspended:no done:0.00"));
    assert_eq!(
        value(&t, &format!("drbd_peerdevice_resync_done_ratio{node3}")).as_deref(),
        Some("0")
    );
    assert_eq!(
        value(&t, &format!("drbd_peerdevice_resync_eta_seconds{node3}")),
        None
    );
    let t = text(lines.len());
    assert!(!t.contains("drbd_peerdevice_resync_done_ratio{"), "{t}");
    // No `open:` field in drbd-utils 9.22's device lines: 0, as upstream exports it.
    assert!(lines
        .iter()
        .filter(|l| l.contains(" device "))
        .all(|l| !l.contains(" open:")));
    assert_eq!(
        value(&t, "drbd_device_open{name=\"r0\",volume=\"0\",minor=\"0\"}").as_deref(),
        Some("0")
    );
}

#[test]
fn device_open_is_1_only_for_open_yes() {
    let dev = |open: &str| {
        format!("exists device name:r volume:0 minor:3 backing_dev:none disk:UpToDate client:no{open} quorum:yes\nexists -\n")
    };
    let series = "drbd_device_open{name=\"r\",volume=\"0\",minor=\"3\"}";
    for (field, want) in [
        (" open:yes", "1"),
        (" open:no", "0"),
        // Older kernels: drbdsetup knows the field but the kernel does not say.
        (" open:unknown", "0"),
        // drbd-utils 9.22 and older print no `open:` at all; upstream's parser then reads false.
        ("", "0"),
    ] {
        let text = render::to_text(&view_of(dev(field).as_bytes(), false));
        assert_eq!(value(&text, series).as_deref(), Some(want), "{field:?}");
    }
    // A later line without the field keeps what an earlier one said (a partial change line).
    let stream = dev(" open:yes")
        + "change device name:r volume:0 minor:3 disk:UpToDate quorum:yes size:1\n";
    let text = render::to_text(&view_of(stream.as_bytes(), false));
    assert_eq!(value(&text, series).as_deref(), Some("1"));
}
