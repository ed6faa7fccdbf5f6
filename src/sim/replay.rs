//! Replay mode: acts as `drbdsetup events2` by printing a script of events2 lines.
//!
//! Script format: one events2 line per line, printed verbatim (so malformed input can be scripted too),
//! plus directives on lines starting with `#@` (other `#` lines are comments):
//! - `#@sleep MS`      pause for MS milliseconds
//! - `#@exit CODE`     exit now with CODE (a crash of drbdsetup)
//! - `#@wait-poll`     block until the reader writes `n` to stdin (`--poll`)
//! - `#@raw TEXT`      print TEXT without a newline (a line cut off mid-way when followed by `#@exit`)
//! - `#@hex HEX`       print raw bytes (e.g. invalid UTF-8), no newline added
//! - `#@repeat N`      the next line is printed N times
//! - `#@long N TEXT`   print one line of N bytes: TEXT repeated, cut to N, then a newline (oversized lines)
//!
//! After the script, a `--poll` reader keeps the process alive until stdin closes; otherwise it exits 0.
//! With `--now` only the lines up to and including `exists -` are printed.

use std::io::{BufRead, Write};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{file}:{line}: {msg}")]
    Script {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Line(String),
    Raw(Vec<u8>),
    Sleep(Duration),
    Exit(i32),
    WaitPoll,
}

/// Parses a replay script into steps.
pub fn parse_script(file: &str, text: &str) -> Result<Vec<Step>, ReplayError> {
    let mut steps = Vec::new();
    let mut repeat = 1usize;
    for (i, l) in text.lines().enumerate() {
        let err = |msg: String| ReplayError::Script {
            file: file.to_string(),
            line: i + 1,
            msg,
        };
        if let Some(d) = l.strip_prefix("#@") {
            let (cmd, arg) = d.split_once(' ').unwrap_or((d, ""));
            match cmd {
                "sleep" => steps.push(Step::Sleep(Duration::from_millis(
                    arg.trim()
                        .parse()
                        .map_err(|_| err(format!("bad sleep '{arg}'")))?,
                ))),
                "exit" => steps.push(Step::Exit(
                    arg.trim()
                        .parse()
                        .map_err(|_| err(format!("bad exit '{arg}'")))?,
                )),
                "wait-poll" => steps.push(Step::WaitPoll),
                "raw" => steps.push(Step::Raw(arg.as_bytes().to_vec())),
                "hex" => {
                    let a = arg.trim();
                    if a.len() % 2 != 0 {
                        return Err(err("odd hex length".into()));
                    }
                    let bytes = (0..a.len())
                        .step_by(2)
                        .map(|j| u8::from_str_radix(&a[j..j + 2], 16))
                        .collect::<Result<Vec<u8>, _>>()
                        .map_err(|_| err(format!("bad hex '{a}'")))?;
                    steps.push(Step::Raw(bytes));
                }
                "long" => {
                    let (n, text) = arg.trim().split_once(' ').unwrap_or((arg.trim(), "x"));
                    let n: usize = n.parse().map_err(|_| err(format!("bad long '{arg}'")))?;
                    if text.is_empty() {
                        return Err(err("long needs a non-empty TEXT".into()));
                    }
                    let mut bytes: Vec<u8> = text.bytes().cycle().take(n).collect();
                    bytes.push(b'\n');
                    steps.push(Step::Raw(bytes));
                }
                "repeat" => {
                    repeat = arg
                        .trim()
                        .parse()
                        .map_err(|_| err(format!("bad repeat '{arg}'")))?
                }
                other => return Err(err(format!("unknown directive '#@{other}'"))),
            }
            continue;
        }
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        for _ in 0..repeat {
            steps.push(Step::Line(l.to_string()));
        }
        repeat = 1;
    }
    Ok(steps)
}

/// Runs the script as `drbdsetup events2 [--now] [--poll]` would, writing to `out`; returns the exit code.
pub fn run(
    steps: &[Step],
    now: bool,
    poll: bool,
    out: &mut impl Write,
) -> Result<i32, ReplayError> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let wait_poll = |input: &mut std::io::StdinLock| -> std::io::Result<bool> {
        let mut buf = String::new();
        loop {
            buf.clear();
            if input.read_line(&mut buf)? == 0 {
                return Ok(false);
            }
            if buf.trim() == "n" {
                return Ok(true);
            }
        }
    };
    for s in steps {
        match s {
            Step::Line(l) => {
                writeln!(out, "{l}")?;
                if now && l.trim_end().ends_with("exists -") {
                    out.flush()?;
                    return Ok(0);
                }
            }
            Step::Raw(b) => out.write_all(b)?,
            Step::Sleep(d) => {
                out.flush()?;
                std::thread::sleep(*d);
            }
            Step::Exit(code) => {
                out.flush()?;
                return Ok(*code);
            }
            Step::WaitPoll => {
                out.flush()?;
                if !wait_poll(&mut input)? {
                    return Ok(0);
                }
            }
        }
    }
    out.flush()?;
    if poll && !now {
        while wait_poll(&mut input)? {}
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives() {
        let s = parse_script(
            "t",
            "# c\nexists -\n#@sleep 5\n#@repeat 2\nx\n#@hex ff0a\n#@raw half\n#@exit 3\n",
        )
        .unwrap();
        assert_eq!(
            s,
            vec![
                Step::Line("exists -".into()),
                Step::Sleep(Duration::from_millis(5)),
                Step::Line("x".into()),
                Step::Line("x".into()),
                Step::Raw(vec![0xff, b'\n']),
                Step::Raw(b"half".to_vec()),
                Step::Exit(3)
            ]
        );
        assert!(parse_script("t", "#@bogus").is_err());
    }

    #[test]
    fn now_stops_after_the_dump() {
        let s = parse_script(
            "t",
            "exists resource name:a\nexists -\nchange resource name:a role:Primary\n",
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(run(&s, true, false, &mut out).unwrap(), 0);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "exists resource name:a\nexists -\n"
        );
    }
}
