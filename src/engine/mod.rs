//! The engine: applies events2 lines to the state, derives change updates and fans them out to plugin
//! instances; applies policy changes as reloads without losing or duplicating an event.
//!
//! [`Engine`] is the synchronous core (bytes in, updates out) that tests and benchmarks drive directly;
//! [`runtime`] wraps it in a task with channels, plugin instances and reloads.

pub mod apply;
pub mod runtime;
pub mod update;

use crate::drbd::events2::{parse_line, strip_ansi};
use crate::ratelimit::LogLimit;
use apply::State;
use std::time::Duration;
use update::Update;

/// Counts of one chunk of input.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkStats {
    pub lines: u64,
    pub malformed: u64,
    /// Objects and unknown keys left out over the state's caps.
    pub capped: u64,
}

/// Logs malformed lines without flooding: at most `burst` lines per `window`, then one summary.
#[derive(Debug)]
pub struct LogLimiter {
    limit: LogLimit,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            limit: LogLimit::new(burst, window),
        }
    }

    pub fn malformed(&mut self, line: &str, reason: &str) {
        let v = self.limit.hit();
        if v.suppressed_before > 0 {
            tracing::warn!(
                suppressed = v.suppressed_before,
                "more malformed events2 lines were skipped without logging"
            );
        }
        if v.log {
            let shown: String = line.chars().take(512).collect();
            tracing::warn!(reason, line = %shown, "skipping malformed events2 line");
        }
    }
}

pub struct Engine {
    pub state: State,
    limiter: LogLimiter,
    capped: LogLimit,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new()
    }
}

impl Engine {
    pub fn new() -> Engine {
        Engine::with_state(State::new())
    }

    pub fn with_state(state: State) -> Engine {
        Engine {
            state,
            limiter: LogLimiter::new(20, Duration::from_secs(60)),
            capped: LogLimit::new(10, Duration::from_secs(60)),
        }
    }

    /// Counts and logs (rate-limited) what the last lines added beyond the state's caps.
    fn note_capped(&mut self) -> u64 {
        let Some((n, resource, what)) = self.state.take_capped() else {
            return 0;
        };
        let v = self.capped.hit();
        if v.log || v.suppressed_before > 0 {
            tracing::warn!(
                %resource,
                what,
                left_out = n,
                not_logged_before = v.suppressed_before,
                "over the state's limit: left out (counted in drbdreactor_events2_capped_total; at most 10 such lines a minute)"
            );
        }
        n
    }

    /// Applies one line (without its newline); a malformed line is logged (rate-limited) and skipped.
    /// Returns false for a malformed line.
    pub fn apply_line(&mut self, line: &str, out: &mut Vec<Update>) -> bool {
        let clean = strip_ansi(line);
        match parse_line(&clean) {
            Ok(l) => {
                self.state.apply(&l, out);
                true
            }
            Err(e) => {
                self.limiter.malformed(line, &e.reason);
                false
            }
        }
    }

    /// Records a line that was rejected before parsing (invalid UTF-8, too long, cut off).
    pub fn reject(&mut self, sample: &str, reason: &str) {
        self.limiter.malformed(sample, reason);
    }

    /// Applies a chunk of complete lines (each ending in `\n`, the last one may lack it).
    pub fn apply_chunk(&mut self, chunk: &[u8], out: &mut Vec<Update>) -> ChunkStats {
        let mut st = ChunkStats::default();
        let mut start = 0;
        let ends = memchr::memchr_iter(b'\n', chunk).chain(std::iter::once(chunk.len()));
        for end in ends {
            let raw = &chunk[start..end];
            start = end + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.is_empty() {
                continue;
            }
            st.lines += 1;
            match std::str::from_utf8(raw) {
                Ok(line) => {
                    if !self.apply_line(line, out) {
                        st.malformed += 1;
                    }
                }
                Err(e) => {
                    st.malformed += 1;
                    let sample = String::from_utf8_lossy(raw);
                    self.reject(
                        &sample,
                        &format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    );
                }
            }
        }
        st.capped = self.note_capped();
        st
    }
}
