//! The run queue (pure): at most `max_running` runs at a time, runs of the same key (resource) one after
//! the other in arrival order, keys served first come first served.

use std::collections::{HashMap, HashSet, VecDeque};

#[derive(Debug)]
pub struct Scheduler<J> {
    queues: HashMap<String, VecDeque<J>>,
    /// Keys with queued runs and none running, in the order they became ready.
    ready: VecDeque<String>,
    busy: HashSet<String>,
    queued: usize,
    max_running: usize,
    max_queued: usize,
}

impl<J> Scheduler<J> {
    pub fn new(max_running: usize, max_queued: usize) -> Scheduler<J> {
        Scheduler {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            busy: HashSet::new(),
            queued: 0,
            max_running: max_running.max(1),
            max_queued,
        }
    }

    /// Queues a run; gives it back when the queue is full.
    pub fn push(&mut self, key: &str, job: J) -> Result<(), J> {
        if self.queued >= self.max_queued {
            return Err(job);
        }
        let q = self.queues.entry(key.to_string()).or_default();
        let was_empty = q.is_empty();
        q.push_back(job);
        self.queued += 1;
        if was_empty && !self.busy.contains(key) {
            self.ready.push_back(key.to_string());
        }
        Ok(())
    }

    /// The next run to start now, if a slot is free and one is ready; its key counts as running until
    /// [`Scheduler::done`].
    pub fn next_run(&mut self) -> Option<(String, J)> {
        if self.busy.len() >= self.max_running {
            return None;
        }
        let key = self.ready.pop_front()?;
        let q = self.queues.get_mut(&key)?;
        let job = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(&key);
        }
        self.queued -= 1;
        self.busy.insert(key.clone());
        Some((key, job))
    }

    /// The run of `key` ended.
    pub fn done(&mut self, key: &str) {
        if self.busy.remove(key) && self.queues.contains_key(key) {
            self.ready.push_back(key.to_string());
        }
    }

    /// Removes every queued (not started) run.
    pub fn drain(&mut self) -> Vec<J> {
        self.ready.clear();
        self.queued = 0;
        self.queues.drain().flat_map(|(_, q)| q).collect()
    }

    pub fn running(&self) -> usize {
        self.busy.len()
    }

    pub fn queued(&self) -> usize {
        self.queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered_per_key() {
        let mut s = Scheduler::new(2, 100);
        for (k, j) in [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("a", 5)] {
            s.push(k, j).unwrap();
        }
        assert_eq!(s.next_run(), Some(("a".into(), 1)));
        assert_eq!(s.next_run(), Some(("b".into(), 3)));
        assert_eq!(s.next_run(), None, "two running");
        s.done("a");
        // c became ready before a's second run
        assert_eq!(s.next_run(), Some(("c".into(), 4)));
        assert_eq!(s.next_run(), None);
        s.done("b");
        assert_eq!(s.next_run(), Some(("a".into(), 2)));
        s.done("c");
        assert_eq!(s.next_run(), None, "a is running: its next run waits");
        s.done("a");
        assert_eq!(s.next_run(), Some(("a".into(), 5)));
        s.done("a");
        assert_eq!((s.running(), s.queued()), (0, 0));
        assert_eq!(s.next_run(), None);
    }

    #[test]
    fn full_queue_gives_the_job_back_and_drain_empties() {
        let mut s = Scheduler::new(1, 2);
        s.push("a", 1).unwrap();
        s.push("b", 2).unwrap();
        assert_eq!(s.push("c", 3), Err(3));
        assert_eq!(s.next_run().unwrap().1, 1);
        s.push("c", 3).unwrap();
        let mut d = s.drain();
        d.sort();
        assert_eq!(d, vec![2, 3]);
        s.done("a");
        assert_eq!(s.next_run(), None);
    }
}
