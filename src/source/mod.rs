//! The event source: runs `<drbdsetup> events2 --full --poll`, writes `n` to its stdin every statistics
//! interval, and sends complete lines to the engine. Restarts the process with capped exponential backoff
//! when it exits or cannot start.

use crate::engine::runtime::SourceMsg;
use crate::ratelimit::LogLimit;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The drbdsetup command line (program and leading arguments), already split.
    pub drbdsetup: Vec<String>,
    pub statistics_interval: Duration,
    /// Lines longer than this are skipped as malformed.
    pub max_line: usize,
    /// Bytes of one stderr line that are logged; the rest is counted, not kept.
    pub max_stderr_line: usize,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl SourceConfig {
    pub fn new(drbdsetup: Vec<String>, statistics_interval: Duration) -> SourceConfig {
        SourceConfig {
            drbdsetup,
            statistics_interval,
            max_line: 64 * 1024,
            max_stderr_line: 4096,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("empty drbdsetup command")]
    EmptyCommand,
    #[error("cannot start '{cmd}': {source}")]
    Spawn { cmd: String, source: std::io::Error },
}

/// The events2 command: the configured drbdsetup plus `events2 --full --poll`.
pub fn events2_command(drbdsetup: &[String]) -> Result<Command, SourceError> {
    let (prog, args) = drbdsetup.split_first().ok_or(SourceError::EmptyCommand)?;
    let mut cmd = Command::new(prog);
    cmd.args(args).args(["events2", "--full", "--poll"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

/// Runs until `shutdown` becomes true or the engine goes away.
pub async fn run(
    cfg: SourceConfig,
    tx: mpsc::Sender<SourceMsg>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = cfg.backoff_initial;
    let mut restarts = 0u64;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let started = Instant::now();
        let reason = match spawn(&cfg) {
            Err(e) => e.to_string(),
            Ok(child) => {
                if restarts > 0 {
                    tracing::info!(restarts, "drbdsetup events2 restarted");
                }
                if tx.send(SourceMsg::Started).await.is_err() {
                    return;
                }
                match pump(&cfg, child, &tx, &mut shutdown).await {
                    Pump::Shutdown | Pump::EngineGone => return,
                    Pump::Exited(r) => r,
                }
            }
        };
        restarts += 1;
        if tx
            .send(SourceMsg::Stopped {
                reason: reason.clone(),
            })
            .await
            .is_err()
        {
            return;
        }
        // A process that ran for a while gets a fresh backoff.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = cfg.backoff_initial;
        }
        tracing::warn!(%reason, retry_in = ?backoff, "drbdsetup events2 is not running");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

fn spawn(cfg: &SourceConfig) -> Result<Child, SourceError> {
    let mut cmd = events2_command(&cfg.drbdsetup)?;
    cmd.spawn().map_err(|source| SourceError::Spawn {
        cmd: cfg.drbdsetup.join(" "),
        source,
    })
}

enum Pump {
    Exited(String),
    Shutdown,
    EngineGone,
}

async fn pump(
    cfg: &SourceConfig,
    mut child: Child,
    tx: &mpsc::Sender<SourceMsg>,
    shutdown: &mut watch::Receiver<bool>,
) -> Pump {
    let mut stdout = child.stdout.take().expect("piped");
    let stdin = child.stdin.take();
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(log_stderr(stderr, cfg.max_stderr_line));
    }
    let poker = stdin.map(|mut stdin| {
        let every = cfg.statistics_interval;
        tokio::spawn(async move {
            let mut t = tokio::time::interval_at(Instant::now() + every, every);
            loop {
                t.tick().await;
                if stdin.write_all(b"n\n").await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        })
    });
    let mut splitter = LineSplitter::new(cfg.max_line);
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        tokio::select! {
            n = stdout.read(&mut buf) => match n {
                Ok(0) => break None,
                Ok(n) => {
                    for msg in splitter.push(&buf[..n]) {
                        if tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                    if tx.is_closed() {
                        break Some(Pump::EngineGone);
                    }
                }
                Err(e) => break Some(Pump::Exited(format!("reading stdout: {e}"))),
            },
            _ = shutdown.changed() => break Some(Pump::Shutdown),
        }
    };
    if let Some(p) = poker {
        p.abort();
    }
    if let Some(msg) = splitter.finish() {
        let _ = tx.send(msg).await;
    }
    match result {
        Some(Pump::Shutdown) | Some(Pump::EngineGone) => {
            let _ = child.kill().await;
            result.expect("some")
        }
        Some(p) => {
            let _ = child.kill().await;
            p
        }
        None => {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("wait failed: {e}"),
                Err(_) => {
                    let _ = child.kill().await;
                    "closed its output and was killed".to_string()
                }
            };
            Pump::Exited(format!("drbdsetup events2 exited ({status})"))
        }
    }
}

/// Logs drbdsetup's stderr until it closes: never stops reading early (a reader that gave up would make
/// drbdsetup die of SIGPIPE at its next message), keeps at most `max` bytes of a line, replaces invalid
/// UTF-8, and logs at most 50 lines a minute (then a summary).
async fn log_stderr(mut stderr: impl AsyncRead + Unpin, max: usize) {
    let mut lines = LogLines::new(max);
    let mut limit = LogLimit::new(50, Duration::from_secs(60));
    let mut log = |l: String| {
        let v = limit.hit();
        if v.suppressed_before > 0 {
            tracing::warn!(target: "drbdsetup", suppressed = v.suppressed_before, "more drbdsetup stderr lines were not logged");
        }
        if v.log {
            tracing::warn!(target: "drbdsetup", "{l}");
        }
    };
    let mut buf = vec![0u8; 8192];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => lines.push(&buf[..n]).into_iter().for_each(&mut log),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(target: "drbdsetup", error = %e, "reading drbdsetup's stderr failed");
                break;
            }
        }
    }
    if let Some(l) = lines.finish() {
        log(l);
    }
}

/// Splits a byte stream into log lines of at most `max` bytes (plus a note of what was cut), with
/// invalid UTF-8 replaced: memory stays bounded whatever the stream holds.
#[derive(Debug)]
pub struct LogLines {
    max: usize,
    partial: Vec<u8>,
    /// Bytes of the current line beyond `max`, not kept.
    cut: usize,
}

impl LogLines {
    pub fn new(max: usize) -> LogLines {
        LogLines {
            max,
            partial: Vec::new(),
            cut: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let (piece, newline) = match memchr(data) {
                Some(i) => (&data[..i], Some(i)),
                None => (data, None),
            };
            let room = self.max - self.partial.len();
            let kept = piece.len().min(room);
            self.partial.extend_from_slice(&piece[..kept]);
            self.cut += piece.len() - kept;
            match newline {
                Some(i) => {
                    out.push(self.take());
                    data = &data[i + 1..];
                }
                None => return out,
            }
        }
    }

    fn take(&mut self) -> String {
        let raw = self.partial.strip_suffix(b"\r").unwrap_or(&self.partial);
        let mut l = String::from_utf8_lossy(raw).into_owned();
        if self.cut > 0 {
            l.push_str(&format!(" [{} more bytes not shown]", self.cut));
        }
        self.partial.clear();
        self.cut = 0;
        l
    }

    /// End of stream: the last line without a newline, if any.
    pub fn finish(&mut self) -> Option<String> {
        (!self.partial.is_empty() || self.cut > 0).then(|| self.take())
    }
}

/// Splits a byte stream into chunks of complete lines, skipping lines longer than `max` without
/// buffering them.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    partial: Vec<u8>,
    /// Inside an over-long line: discard until its newline.
    skipping: Option<usize>,
}

impl LineSplitter {
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            max,
            partial: Vec::new(),
            skipping: None,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) -> Vec<SourceMsg> {
        let mut out = Vec::new();
        if let Some(skipped) = self.skipping {
            match memchr(data) {
                Some(i) => {
                    out.push(self.too_long(skipped + i));
                    self.skipping = None;
                    data = &data[i + 1..];
                }
                None => {
                    self.skipping = Some(skipped + data.len());
                    return out;
                }
            }
        }
        match data.iter().rposition(|b| *b == b'\n') {
            Some(last) => {
                let (complete, rest) = data.split_at(last + 1);
                let mut chunk = std::mem::take(&mut self.partial);
                chunk.extend_from_slice(complete);
                // Over-long lines inside the chunk.
                if chunk.len() > self.max {
                    let mut kept = Vec::with_capacity(chunk.len());
                    for l in chunk.split_inclusive(|b| *b == b'\n') {
                        if l.len() > self.max {
                            out.push(self.too_long(l.len()));
                        } else {
                            kept.extend_from_slice(l);
                        }
                    }
                    chunk = kept;
                }
                if !chunk.is_empty() {
                    out.push(SourceMsg::Chunk(chunk));
                }
                self.keep_partial(rest, &mut out);
            }
            None => self.keep_partial(data, &mut out),
        }
        out
    }

    fn keep_partial(&mut self, rest: &[u8], _out: &mut [SourceMsg]) {
        if self.partial.len() + rest.len() > self.max {
            self.skipping = Some(self.partial.len() + rest.len());
            self.partial.clear();
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    fn too_long(&self, len: usize) -> SourceMsg {
        SourceMsg::Rejected {
            sample: format!("<{len} bytes>"),
            reason: format!("line longer than {} bytes", self.max),
        }
    }

    /// End of stream: a partial line was cut off.
    pub fn finish(&mut self) -> Option<SourceMsg> {
        if let Some(len) = self.skipping.take() {
            return Some(self.too_long(len));
        }
        if self.partial.is_empty() {
            return None;
        }
        let sample = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        Some(SourceMsg::Rejected {
            sample,
            reason: "line cut off: drbdsetup exited mid-line".into(),
        })
    }
}

fn memchr(data: &[u8]) -> Option<usize> {
    data.iter().position(|b| *b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(msgs: &[SourceMsg]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                SourceMsg::Chunk(c) => String::from_utf8_lossy(c).into_owned(),
                SourceMsg::Rejected { reason, .. } => format!("REJECT {reason}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn joins_partial_lines() {
        let mut s = LineSplitter::new(100);
        assert!(s.push(b"exists res").is_empty());
        assert_eq!(
            chunks(&s.push(b"ource name:a\nexists -\npart")),
            vec!["exists resource name:a\nexists -\n"]
        );
        assert_eq!(chunks(&s.push(b"ial\n")), vec!["partial\n"]);
        assert!(s.finish().is_none());
    }

    #[test]
    fn skips_over_long_lines_without_buffering_them() {
        let mut s = LineSplitter::new(10);
        let mut out = s.push(b"ok\n0123456789abcdef");
        out.extend(s.push(&[b'x'; 1000]));
        assert!(s.partial.len() <= 10);
        out.extend(s.push(b"tail\nfine\n"));
        assert_eq!(
            chunks(&out),
            vec!["ok\n", "REJECT line longer than 10 bytes", "fine\n"]
        );
        // an over-long line that arrives complete inside one read
        let out = s.push(b"a\n0123456789abc\nb\n");
        assert_eq!(
            chunks(&out),
            vec!["REJECT line longer than 10 bytes", "a\nb\n"]
        );
    }

    #[test]
    fn stderr_lines_are_bounded_and_lossy() {
        let mut l = LogLines::new(16);
        assert_eq!(l.push(b"bad \xff byte\r\nnext"), vec!["bad \u{fffd} byte"]);
        // 300 MB without a newline: at most 16 bytes are kept
        let mb = vec![b'x'; 1 << 20];
        for _ in 0..300 {
            assert!(l.push(&mb).is_empty());
            assert!(l.partial.len() <= 16);
        }
        let out = l.push(b"\nlast");
        assert_eq!(
            out,
            vec![format!(
                "nextxxxxxxxxxxxx [{} more bytes not shown]",
                300 * (1 << 20) - 12
            )]
        );
        assert_eq!(l.finish().as_deref(), Some("last"));
        assert_eq!(l.finish(), None);
    }

    #[test]
    fn reports_a_line_cut_off_at_exit() {
        let mut s = LineSplitter::new(100);
        s.push(b"exists -\nchange reso");
        match s.finish() {
            Some(SourceMsg::Rejected { sample, reason }) => {
                assert_eq!(sample, "change reso");
                assert!(reason.contains("cut off"));
            }
            other => panic!("{other:?}"),
        }
    }
}
