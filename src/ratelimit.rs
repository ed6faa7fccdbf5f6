//! Rate limiting of repeated log lines: at most `burst` lines per `window`, then one summary line with
//! the number suppressed. Whatever is limited here is also counted by a metric, so nothing is lost but
//! log volume.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogLimit {
    window: Duration,
    burst: u32,
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do with one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Log this occurrence.
    pub log: bool,
    /// Occurrences suppressed in the window that just ended (log a summary when > 0).
    pub suppressed_before: u64,
}

impl LogLimit {
    pub fn new(burst: u32, window: Duration) -> LogLimit {
        LogLimit {
            window,
            burst,
            start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Records one occurrence at `now`.
    pub fn hit_at(&mut self, now: Instant) -> Verdict {
        let mut suppressed_before = 0;
        if self
            .start
            .is_none_or(|s| now.duration_since(s) > self.window)
        {
            suppressed_before = self.suppressed;
            self.start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        let log = self.logged < self.burst;
        if log {
            self.logged += 1;
        } else {
            self.suppressed += 1;
        }
        Verdict {
            log,
            suppressed_before,
        }
    }

    pub fn hit(&mut self) -> Verdict {
        self.hit_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_summary_per_window() {
        let mut l = LogLimit::new(2, Duration::from_secs(10));
        let t = Instant::now();
        let logged: Vec<bool> = (0..5).map(|_| l.hit_at(t).log).collect();
        assert_eq!(logged, vec![true, true, false, false, false]);
        let v = l.hit_at(t + Duration::from_secs(11));
        assert_eq!(
            v,
            Verdict {
                log: true,
                suppressed_before: 3
            }
        );
    }
}
