//! The `drbd-sim` binary: several processes sharing one cluster directory, drbdsetup's exit codes and
//! messages, JSON output, scenarios.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::{drbd_sim as sim, drbd_sim_ok as ok};

const BIN: &str = env!("CARGO_BIN_EXE_drbd-sim");

fn three_nodes(dir: &std::path::Path) {
    ok(
        dir,
        &[
            "ctl",
            "create",
            "r0",
            "--nodes",
            "n1,n2,n3",
            "-o",
            "quorum=majority",
            "-o",
            "on-no-quorum=io-error",
        ],
    );
}

/// Reads lines from a child's stdout until `pred` matches one (or times out).
fn wait_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if pred(&l) {
                    return l;
                }
            }
            Err(_) => panic!("line not seen; got {seen:#?}"),
        }
    }
}

#[test]
fn events2_process_follows_other_processes_and_polls_statistics() {
    let dir = tempfile::tempdir().unwrap();
    three_nodes(dir.path());
    let mut child = Command::new(BIN)
        .args(["--cluster"])
        .arg(dir.path())
        .args(["--node", "n2", "events2", "--full", "--poll"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let l = wait_line(&rx, &mut seen, |l| l.starts_with("exists resource name:r0"));
    assert!(l.contains("may_promote:yes promotion_score:10103"), "{l}");
    wait_line(&rx, &mut seen, |l| l == "exists -");

    // Another process promotes n1: the derived resource line comes before the connection line.
    ok(dir.path(), &["--node", "n1", "primary", "r0"]);
    let res = wait_line(&rx, &mut seen, |l| l.starts_with("change "));
    assert!(
        res.starts_with("change resource name:r0 role:Secondary") && res.contains("may_promote:no"),
        "{res}"
    );
    let conn = wait_line(&rx, &mut seen, |l| l.starts_with("change "));
    assert!(conn.starts_with("change connection name:r0 peer-node-id:0 conn-name:n1 connection:Connected role:Primary"), "{conn}");

    // Statistics move only on `n`.
    ok(dir.path(), &["ctl", "write", "n1", "r0", "2048"]);
    child.stdin.as_mut().unwrap().write_all(b"n\n").unwrap();
    let dev = wait_line(&rx, &mut seen, |l| l.starts_with("change device"));
    assert!(dev.contains(" written:2048 "), "{dev}");
    let pd = wait_line(&rx, &mut seen, |l| l.starts_with("change peer-device"));
    assert!(
        pd.contains("conn-name:n1") && pd.contains(" received:2048 "),
        "{pd}"
    );

    // n1 crashes: NetworkFailure, Unconnected, Connecting, each its own group.
    ok(dir.path(), &["ctl", "node-down", "n1"]);
    for st in ["NetworkFailure", "Unconnected", "Connecting"] {
        wait_line(&rx, &mut seen, |l| {
            l.starts_with("change connection name:r0 peer-node-id:0")
                && l.contains(&format!("connection:{st} "))
        });
    }
    // Our own node crashing ends the process with exit 20, like drbdsetup losing the kernel.
    ok(dir.path(), &["ctl", "node-down", "n2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "events2 did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(20));
    let (code, _, err) = sim(dir.path(), &["--node", "n2", "events2", "--now"]);
    assert_eq!(
        (code, err.trim()),
        (20, "Could not connect to 'drbd' generic netlink family")
    );
}

#[test]
fn drbdsetup_exit_codes_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    three_nodes(dir.path());
    ok(dir.path(), &["--node", "n1", "primary", "r0"]);
    let (code, _, err) = sim(dir.path(), &["--node", "n2", "primary", "r0"]);
    assert_eq!(
        (code, err.trim()),
        (
            11,
            "r0: State change failed: (-1) Multiple primaries not allowed by config"
        )
    );
    let (code, _, err) = sim(dir.path(), &["--node", "n2", "primary", "nope"]);
    assert_eq!(
        (code, err.trim()),
        (10, "nope: Failure: (158) Unknown resource")
    );
    let (code, out, err) = sim(dir.path(), &["--node", "n2", "status", "nope", "--json"]);
    assert_eq!((code, err.trim()), (10, "nope: No such resource"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
    let out = ok(dir.path(), &["--node", "n2", "events2", "nope", "--now"]);
    assert_eq!(out, "exists -\n");

    ok(dir.path(), &["ctl", "open", "n1", "r0"]);
    let (code, _, err) = sim(dir.path(), &["--node", "n1", "secondary", "r0"]);
    assert_eq!(
        (code, err.trim()),
        (
            11,
            "r0: State change failed: (-12) Device is held open by someone"
        )
    );
    ok(
        dir.path(),
        &["--node", "n1", "secondary", "r0", "--force=yes"],
    );
    let st: serde_json::Value =
        serde_json::from_str(&ok(dir.path(), &["--node", "n1", "status", "r0", "--json"])).unwrap();
    assert_eq!(st[0]["role"], "Secondary");
    assert_eq!(st[0]["force-io-failures"], true);

    // Isolated: no quorum (exit 11); quorum off and no data: exit 17.
    ok(dir.path(), &["ctl", "cut", "n3", "n1"]);
    ok(dir.path(), &["ctl", "cut", "n3", "n2"]);
    let (code, _, err) = sim(dir.path(), &["--node", "n3", "primary", "r0"]);
    assert_eq!(
        (code, err.trim()),
        (11, "r0: State change failed: (-25) No quorum")
    );
    ok(
        dir.path(),
        &[
            "ctl",
            "create",
            "r1",
            "--nodes",
            "n1",
            "--inconsistent",
            "n1",
        ],
    );
    let (code, _, err) = sim(dir.path(), &["--node", "n1", "primary", "r1"]);
    assert_eq!(
        (code, err.trim()),
        (
            17,
            "r1: State change failed: (-2) Need access to UpToDate data"
        )
    );
}

#[test]
fn status_and_show_json_have_the_fields_the_promoter_reads() {
    let dir = tempfile::tempdir().unwrap();
    ok(
        dir.path(),
        &[
            "ctl",
            "create",
            "r0",
            "--nodes",
            "n1,n2,tb",
            "--diskless",
            "tb",
            "-o",
            "quorum=majority",
            "-o",
            "on-no-quorum=io-error",
            "-o",
            "auto-promote=no",
            "-o",
            "on-suspended-primary-outdated=force-secondary",
            "-o",
            "rr-conflict=retry-connect",
        ],
    );
    ok(dir.path(), &["--node", "n2", "primary", "r0"]);
    let st: serde_json::Value =
        serde_json::from_str(&ok(dir.path(), &["--node", "n1", "status", "r0", "--json"])).unwrap();
    let r = &st[0];
    assert_eq!(
        (r["name"].as_str(), r["node-id"].as_u64()),
        (Some("r0"), Some(0))
    );
    assert_eq!(r["devices"][0]["disk-state"], "UpToDate");
    assert_eq!(r["devices"][0]["quorum"], true);
    let peer = r["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "n2")
        .unwrap();
    assert_eq!(peer["peer-role"], "Primary");
    assert_eq!(peer["connection-state"], "Connected");
    assert_eq!(peer["peer_devices"][0]["peer-disk-state"], "UpToDate");
    let tb = r["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tb")
        .unwrap();
    assert_eq!(tb["peer_devices"][0]["peer-client"], true);

    let show: serde_json::Value = serde_json::from_str(&ok(
        dir.path(),
        &["--node", "n1", "show", "r0", "--json", "--show-defaults"],
    ))
    .unwrap();
    let o = &show[0]["options"];
    assert_eq!(o["quorum"], "majority");
    assert_eq!(o["on-no-quorum"], "io-error");
    assert_eq!(o["on-no-data-accessible"], "io-error");
    assert_eq!(o["on-suspended-primary-outdated"], "force-secondary");
    assert_eq!(o["auto-promote"], false);
    let conns = show[0]["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2);
    for c in conns {
        assert_eq!(c["net"]["fencing"], "dont-care");
        assert_eq!(c["net"]["rr-conflict"], "retry-connect");
    }
    // Without --show-defaults only what differs from the defaults.
    let show: serde_json::Value =
        serde_json::from_str(&ok(dir.path(), &["--node", "n1", "show", "r0", "--json"])).unwrap();
    assert!(show[0]["options"].get("max-io-depth").is_none());
    assert_eq!(show[0]["options"]["quorum"], "majority");
    let out = ok(dir.path(), &["--node", "n1", "show", "nope", "--json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        serde_json::json!([])
    );
    assert_eq!(
        ok(dir.path(), &["--node", "tb", "sh-ll-dev", "r0"]),
        "none\n"
    );
}

#[test]
fn scenarios_pass_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/scenarios/split-brain-avoided.yaml"
    );
    let (code, out, err) = sim(dir.path(), &["scenario", example]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("scenario passed"), "{out}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "reset: true\nsteps:\n  - create: {resource: r0, nodes: [n1, n2]}\n  - expect: {resource: r0, node: n2, role: Primary}\n",
    )
    .unwrap();
    let (code, _, err) = sim(dir.path(), &["scenario", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("step 2") && err.contains("n2/r0: role is Secondary, expected Primary"),
        "{err}"
    );

    std::fs::write(&bad, "steps:\n  - explode: n1\n").unwrap();
    let (code, _, err) = sim(dir.path(), &["scenario", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("step 1") && err.contains("explode"), "{err}");
}

#[test]
fn bad_input_gives_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["ctl", "create", "bad name", "--nodes", "n1"][..],
        &["ctl", "create", "r0", "--nodes", "n1", "-o", "quorum=lots"],
        &["ctl", "create", "r0", "--nodes", "n1", "--diskless", "n9"],
        &["ctl", "node-down", "ghost"],
        &["ctl", "write", "n1", "r0", "10"],
    ] {
        let (code, _, err) = sim(dir.path(), args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.starts_with("drbd-sim ctl:") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let (code, _, err) = sim(dir.path(), &["--node", "n1", "frobnicate"]);
    assert_eq!(code, 20);
    assert!(err.contains("not simulated"), "{err}");
    let (code, _, err) = sim(dir.path(), &["events2"]);
    assert_eq!(code, 20);
    assert!(err.contains("--node"), "{err}");
}

#[test]
fn replay_mode_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("s.txt");
    std::fs::write(
        &f,
        "exists resource name:a\nexists -\nchange resource name:a role:Primary\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--replay", f.to_str().unwrap(), "events2", "--now"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "exists resource name:a\nexists -\n"
    );
}
