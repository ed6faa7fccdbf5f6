//! `drbdsetup status --json` and `drbdsetup show --json [--show-defaults]`, laid out as drbdsetup
//! prints them (drbd-utils `user/v9/drbdsetup.c`: `resource_status_json()`, `show_resource_list_json()`).
//! Names are restricted by [`super::model::check_name`], so they never need JSON escaping; paths and
//! addresses are escaped anyway.

use super::model::{Cluster, Res};
use super::view::{res_view, ResView};
use crate::drbd::types::{ConnState, ReplState};
use std::fmt::Write as _;

fn b(v: bool) -> &'static str {
    if v {
        "true"
    } else {
        "false"
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `ipv4:1.2.3.4:7789` → (address, port).
fn split_addr(a: &str) -> (String, u16) {
    let bare = a.strip_prefix("ipv4:").unwrap_or(a);
    match bare.rsplit_once(':') {
        Some((ip, port)) => (ip.to_string(), port.parse().unwrap_or(0)),
        None => (bare.to_string(), 0),
    }
}

fn status_one(out: &mut String, r: &Res, v: &ResView) {
    let _ = write!(
        out,
        "{{\n  \"name\": \"{}\",\n  \"node-id\": {},\n  \"role\": \"{}\",\n  \"suspended\": {},\n  \"suspended-user\": false,\n  \"suspended-no-data\": false,\n  \"suspended-fencing\": false,\n  \"suspended-quorum\": {},\n  \"force-io-failures\": {},\n  \"write-ordering\": \"{}\",\n  \"devices\": [\n",
        v.name,
        v.node_id,
        v.role,
        b(v.suspended.any()),
        b(v.suspended.has("quorum")),
        b(v.fail_io),
        v.write_ordering
    );
    let mut first = true;
    for (vol, d) in &v.devices {
        if !first {
            out.push_str(",\n");
        }
        first = false;
        let s = &d.stats;
        let _ = write!(
            out,
            "    {{\n      \"volume\": {vol},\n      \"minor\": {},\n      \"disk-state\": \"{}\",\n      \"client\": {},\n      \"open\": {},\n      \"quorum\": {},\n      \"size\": {},\n      \"read\": {},\n      \"written\": {},\n      \"al-writes\": {},\n      \"bm-writes\": {},\n      \"upper-pending\": {},\n      \"lower-pending\": {}\n    }}",
            d.minor,
            d.disk,
            b(d.client),
            b(d.open),
            b(d.quorum),
            s.size,
            s.read,
            s.written,
            s.al_writes,
            s.bm_writes,
            s.upper_pending,
            s.lower_pending
        );
    }
    out.push_str(" ],\n  \"connections\": [\n");
    let mut first = true;
    for (id, c) in &v.conns {
        if !first {
            out.push_str(",\n");
        }
        first = false;
        let _ = write!(
            out,
            "    {{\n      \"peer-node-id\": {id},\n      \"name\": \"{}\",\n      \"connection-state\": \"{}\", \n      \"congested\": {},\n      \"peer-role\": \"{}\",\n      \"tls\": false,\n      \"ap-in-flight\": {},\n      \"rs-in-flight\": {},\n      \"paths\": [\n",
            c.conn_name,
            c.cstate,
            b(c.stats.congested),
            c.role,
            c.stats.ap_in_flight,
            c.stats.rs_in_flight
        );
        for (i, p) in c.paths.iter().enumerate() {
            if i > 0 {
                out.push_str(",\n");
            }
            let (la, lp) = split_addr(&p.local);
            let (ra, rp) = split_addr(&p.peer);
            let _ = write!(
                out,
                "        {{\n          \"this_host\": {{\n            \"address\": {},\n            \"port\": {lp},\n            \"family\": \"ipv4\"\n          }},\n          \"remote_host\": {{\n            \"address\": {},\n            \"port\": {rp},\n            \"family\": \"ipv4\"\n          }},\n          \"established\": {}\n        }}",
                q(&la),
                q(&ra),
                b(p.established)
            );
        }
        out.push_str(" ],\n      \"peer_devices\": [\n");
        for (i, (vol, pd)) in c.pds.iter().enumerate() {
            if i > 0 {
                out.push_str(",\n");
            }
            let st = &pd.stats;
            let in_sync = if r.size_kib == 0 {
                0.0
            } else {
                100.0 * (1.0 - st.out_of_sync as f64 / r.size_kib as f64)
            };
            let _ = write!(
                out,
                "        {{\n          \"volume\": {vol},\n          \"replication-state\": \"{}\",\n          \"peer-disk-state\": \"{}\",\n          \"peer-client\": {},\n          \"resync-suspended\": \"{}\",\n          \"received\": {},\n          \"sent\": {},\n          \"out-of-sync\": {},\n          \"pending\": {},\n          \"unacked\": {},\n          \"has-sync-details\": {},\n          \"has-online-verify-details\": false,\n          \"percent-in-sync\": {:.2}",
                pd.repl,
                pd.peer_disk,
                b(pd.peer_client),
                pd.resync_suspended,
                st.received,
                st.sent,
                st.out_of_sync,
                st.pending,
                st.unacked,
                b(st.sync.is_some()),
                in_sync
            );
            if let Some(sy) = &st.sync {
                let done = 100.0 * (sy.rs_total - sy.to_go) as f64 / sy.rs_total.max(1) as f64;
                let db1 = sy.rs_db1_sectors as f64 / sy.rs_dt1_ms.max(1) as f64 * 1000.0 / 2048.0;
                let eta = if sy.rs_db1_sectors > 0 {
                    sy.rs_dt1_ms as f64 * 1e-3 * sy.to_go as f64 / sy.rs_db1_sectors as f64
                } else {
                    987654321.0
                };
                let _ = write!(
                    out,
                    ",\n          \"rs-total\": {},\n          \"rs-dt-start-ms\": {},\n          \"rs-paused-ms\": 0,\n          \"rs-dt0-ms\": {},\n          \"rs-db0-sectors\": {},\n          \"rs-dt1-ms\": {},\n          \"rs-db1-sectors\": {},\n          \"rs-failed\": 0,\n          \"rs-same-csum\": 0,\n          \"want\": 0.00,\n          \"db0/dt0 [MiB/s]\": {db1:.2},\n          \"db1/dt1 [MiB/s]\": {db1:.2},\n          \"estimated-seconds-to-finish\": {eta:.0},\n          \"db/dt [MiB/s]\": {db1:.2},\n          \"percent-resync-done\": {done:.2}",
                    sy.rs_total,
                    sy.rs_dt_start_ms,
                    sy.rs_dt1_ms,
                    sy.rs_db1_sectors,
                    sy.rs_dt1_ms,
                    sy.rs_db1_sectors
                );
            } else if pd.repl.is_syncing() && pd.repl != ReplState::VerifyS {
                let _ = write!(out, ",\n          \"percent-resync-done\": {in_sync:.2}");
            }
            out.push_str("\n        }");
        }
        out.push_str(" ]\n    }");
    }
    out.push_str(" ]\n}");
}

/// `drbdsetup status [RES] --json`; `Err` carries drbdsetup's `RES: No such resource` (exit 10).
pub fn status(c: &Cluster, node: &str, res: Option<&str>, now: u64) -> (String, Option<String>) {
    let mut out = String::from("[\n");
    let mut found = false;
    for r in c.resources.values() {
        if res.is_some_and(|x| x != r.name) {
            continue;
        }
        let Some(v) = res_view(c, r, node, now) else {
            continue;
        };
        if found {
            out.push_str(",\n");
        }
        found = true;
        status_one(&mut out, r, &v);
        out.push('\n');
    }
    out.push_str("]\n\n");
    let err = match res {
        Some(r) if !found => Some(format!("{r}: No such resource")),
        _ => None,
    };
    (out, err)
}

struct Opt {
    name: &'static str,
    value: String,
    default: &'static str,
    boolean: bool,
}

fn print_opts(
    out: &mut String,
    indent: usize,
    section: &str,
    opts: &[Opt],
    defaults: bool,
    comma_after: bool,
) {
    let shown: Vec<&Opt> = opts
        .iter()
        .filter(|o| defaults || o.value != o.default)
        .collect();
    if shown.is_empty() {
        return;
    }
    let pad = " ".repeat(indent);
    let _ = writeln!(out, "{pad}\"{section}\": {{");
    for (i, o) in shown.iter().enumerate() {
        let v = if o.boolean {
            b(o.value == "yes").to_string()
        } else {
            q(&o.value)
        };
        let comma = if i + 1 < shown.len() { "," } else { "" };
        let _ = writeln!(out, "{pad}    \"{}\": {v}{comma}", o.name);
    }
    let _ = writeln!(out, "{pad}}}{}", if comma_after { "," } else { "" });
}

fn yn(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn opt(name: &'static str, value: impl Into<String>, default: &'static str) -> Opt {
    Opt {
        name,
        value: value.into(),
        default,
        boolean: false,
    }
}

fn bopt(name: &'static str, value: bool, default: &'static str) -> Opt {
    Opt {
        name,
        value: yn(value),
        default,
        boolean: true,
    }
}

/// `drbdsetup show [RES] --json [--show-defaults]` (an unknown resource gives `[ ]`, exit 0, as drbdsetup).
pub fn show(c: &Cluster, node: &str, res: Option<&str>, defaults: bool) -> String {
    let mut out = String::from("[\n");
    let list: Vec<&Res> = c
        .resources
        .values()
        .filter(|r| res.is_none_or(|x| x == r.name))
        .filter(|r| c.node_up(node) && r.members.contains_key(node))
        .collect();
    for (ri, r) in list.iter().enumerate() {
        let m = &r.members[node];
        let o = &r.opts;
        let _ = writeln!(out, "    {{\n        \"resource\": \"{}\",", r.name);
        let res_opts = [
            opt("cpu-mask", "", ""),
            opt(
                "on-no-data-accessible",
                o.on_no_data_accessible.clone(),
                "io-error",
            ),
            bopt("auto-promote", o.auto_promote, "yes"),
            opt("peer-ack-window", "4096s", "4096s"),
            opt("peer-ack-delay", "100", "100"),
            opt("twopc-timeout", "300", "300"),
            opt("twopc-retry-timeout", "1", "1"),
            opt("auto-promote-timeout", "20", "20"),
            opt("max-io-depth", "8000", "8000"),
            opt("quorum", o.quorum.as_string(), "off"),
            opt("on-no-quorum", o.on_no_quorum.clone(), "suspend-io"),
            opt("quorum-minimum-redundancy", "off", "off"),
            opt(
                "on-suspended-primary-outdated",
                o.on_suspended_primary_outdated.clone(),
                "disconnect",
            ),
        ];
        print_opts(&mut out, 8, "options", &res_opts, defaults, true);
        let _ = writeln!(
            out,
            "        \"_this_host\": {{\n            \"node-id\": {},\n            \"volumes\": [",
            m.node_id
        );
        let nvols = m.vols.len();
        for (i, (vn, v)) in m.vols.iter().enumerate() {
            let _ = write!(
                out,
                "                {{\n                    \"volume_nr\": {vn},\n                    \"device_minor\": {}",
                v.minor
            );
            match &v.backing {
                Some(bdev) if v.attached => {
                    let _ = write!(
                        out,
                        ",\n                    \"backing-disk\": {},\n                    \"meta-disk\": \"internal\"",
                        q(bdev)
                    );
                }
                None => out.push_str(",\n                    \"disk\": \"none\""),
                _ => {}
            }
            out.push('\n');
            let _ = writeln!(
                out,
                "                }}{}",
                if i + 1 < nvols { "," } else { "" }
            );
        }
        out.push_str("            ]\n        }");
        if m.peers.is_empty() {
            out.push('\n');
        } else {
            out.push_str(",\n        \"connections\": [\n");
            let np = m.peers.len();
            for (i, (pname, p)) in m.peers.iter().enumerate() {
                out.push_str("            {\n                \"paths\": [\n");
                for (j, path) in p.paths.iter().enumerate() {
                    let (la, lp) = split_addr(&path.local);
                    let (ra, rp) = split_addr(&path.remote);
                    let _ = write!(
                        out,
                        "                    {{\n                        \"this_host\": {{\n                            \"address\": {},\n                            \"port\": {lp},\n                            \"family\": \"ipv4\"\n                        }},\n                        \"remote_host\": {{\n                            \"address\": {},\n                            \"port\": {rp},\n                            \"family\": \"ipv4\"\n                        }}\n                    }}{}\n",
                        q(&la),
                        q(&ra),
                        if j + 1 < p.paths.len() { "," } else { "" }
                    );
                }
                out.push_str("                ],\n");
                if p.cstate == ConnState::StandAlone {
                    out.push_str("                \"_is_standalone\": true,\n");
                }
                let net = [
                    opt("transport", "", ""),
                    opt("protocol", "C", "C"),
                    opt("timeout", "60", "60"),
                    opt("max-epoch-size", "2048", "2048"),
                    opt("connect-int", "10", "10"),
                    opt("ping-int", "10", "10"),
                    opt("sndbuf-size", "0", "0"),
                    opt("rcvbuf-size", "0", "0"),
                    opt("ko-count", "7", "7"),
                    bopt("allow-two-primaries", o.allow_two_primaries, "no"),
                    opt("cram-hmac-alg", "", ""),
                    opt("shared-secret", "", ""),
                    opt("after-sb-0pri", "disconnect", "disconnect"),
                    opt("after-sb-1pri", "disconnect", "disconnect"),
                    opt("after-sb-2pri", "disconnect", "disconnect"),
                    bopt("always-asbp", false, "no"),
                    opt("rr-conflict", o.rr_conflict.clone(), "disconnect"),
                    opt("ping-timeout", "5", "5"),
                    opt("data-integrity-alg", "", ""),
                    bopt("tcp-cork", true, "yes"),
                    opt("on-congestion", "block", "block"),
                    opt("congestion-fill", "0s", "0s"),
                    opt("congestion-extents", "1250", "1250"),
                    opt("csums-alg", "", ""),
                    bopt("csums-after-crash-only", false, "no"),
                    opt("verify-alg", "", ""),
                    bopt("use-rle", true, "yes"),
                    opt("socket-check-timeout", "0", "0"),
                    opt("fencing", o.fencing.clone(), "dont-care"),
                    opt("max-buffers", "2048", "2048"),
                    bopt("allow-remote-read", true, "yes"),
                    bopt("tls", false, "no"),
                    opt("_name", pname.clone(), ""),
                ];
                print_opts(&mut out, 16, "net", &net, defaults, true);
                let _ = writeln!(
                    out,
                    "                \"_peer_node_id\": {}\n            }}{}",
                    p.node_id,
                    if i + 1 < np { "," } else { "" }
                );
            }
            out.push_str("        ]\n");
        }
        let _ = writeln!(out, "    }}{}", if ri + 1 < list.len() { "," } else { "" });
    }
    out.push_str("]\n");
    out
}
