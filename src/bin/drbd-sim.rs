//! `drbd-sim`: a drbdsetup stand-in for machines without DRBD.
//!
//! `drbd-sim --replay FILE events2 [--full] [--poll] [--now] ...` prints a replay script (see
//! `drbd_reactor::sim::replay`).

use drbd_reactor::sim::replay;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match real_main(&args) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("drbd-sim: {e}");
            ExitCode::from(20)
        }
    }
}

fn real_main(args: &[String]) -> Result<i32, String> {
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
