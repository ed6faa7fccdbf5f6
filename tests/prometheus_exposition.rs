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
use drbd_reactor::plugins::prometheus::render::{
    self, DrbdVersion, PeerByteCounters, View, FAMILIES,
};
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
        ..Default::default()
    }
}

fn exposition(file: &Path, enums: bool) -> String {
    exposition_with(file, enums, PeerByteCounters::Upstream)
}

fn exposition_with(file: &Path, enums: bool, names: PeerByteCounters) -> String {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
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
