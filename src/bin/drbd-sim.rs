//! `drbd-sim`: a drbdsetup stand-in for machines without DRBD.
//!
//! - `drbd-sim --replay FILE events2 [--full] [--poll] [--now] ...` prints a replay script (see
//!   `drbd_reactor::sim::replay`).
//! - `drbd-sim --cluster DIR --node NAME <drbdsetup arguments>` acts as drbdsetup on one node of a
//!   simulated cluster; `drbd-sim --cluster DIR ctl ...` and `... scenario FILE.yaml` drive the
//!   cluster (docs/simulator.md).

use drbd_reactor::sim::{cli, replay};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = if args.iter().any(|a| a == "--replay") {
        match replay_main(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("drbd-sim: {e}");
                20
            }
        }
    } else {
        cluster_main(&args)
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn cluster_main(args: &[String]) -> i32 {
    let mut dir = std::env::var("DRBD_SIM_CLUSTER").ok();
    let mut node = std::env::var("DRBD_SIM_NODE").ok();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // Global options come before the command; everything after it belongs to the command.
        if !rest.is_empty() {
            rest.push(a.clone());
            continue;
        }
        match a.as_str() {
            "--cluster" => match it.next() {
                Some(d) => dir = Some(d.clone()),
                None => return usage("--cluster needs a directory"),
            },
            "--node" => match it.next() {
                Some(n) => node = Some(n.clone()),
                None => return usage("--node needs a name"),
            },
            "-h" | "--help" => {
                println!("{}", cli::USAGE);
                return 0;
            }
            _ => rest.push(a.clone()),
        }
    }
    let Some(dir) = dir else {
        return usage("missing --cluster DIR (or DRBD_SIM_CLUSTER)");
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut err = std::io::stderr();
    let code = cli::run(&dir, node.as_deref(), &rest, &mut out, &mut err);
    use std::io::Write;
    let _ = out.flush();
    code
}

fn usage(msg: &str) -> i32 {
    eprintln!("drbd-sim: {msg}\n{}", cli::USAGE);
    20
}

fn replay_main(args: &[String]) -> Result<i32, String> {
    let mut replay_file = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--replay" => replay_file = Some(it.next().ok_or("--replay needs a file")?.clone()),
            _ => rest.push(a.clone()),
        }
    }
    let Some(file) = replay_file else {
        return Err("usage: drbd-sim --replay FILE events2 [--now] [--poll] [--full] [--statistics] [--timestamps]".into());
    };
    match rest.first().map(String::as_str) {
        Some("events2") => {}
        Some(other) => {
            return Err(format!(
                "'{other}' is not supported in replay mode (only events2)"
            ))
        }
        None => return Err("missing drbdsetup command".into()),
    }
    let now = rest.iter().any(|a| a == "--now");
    let poll = rest.iter().any(|a| a == "--poll");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
    let steps = replay::parse_script(&file, &text).map_err(|e| e.to_string())?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match replay::run(&steps, now, poll, &mut out) {
        Ok(code) => Ok(code),
        // The reader went away: like drbdsetup, just stop.
        Err(replay::ReplayError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}
