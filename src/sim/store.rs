//! The cluster directory: an append-only journal of operations shared by all simulator processes.
//!
//! Layout of `DIR`:
//! - `journal.jsonl`: one [`Entry`] per line (`{"seq":..,"at":..,"op":{..}}`), only ever appended;
//! - `lock`: writers hold `flock(LOCK_EX)` on it while they fold, validate and append;
//! - `snapshot.json`: a cached fold (cluster state + journal offset), replaced atomically (rename);
//! - `clock.json`: the epoch and clock mode (`real` or `manual`).
//!
//! Writers: lock → load snapshot → replay the rest of the journal → apply the new operation to the
//! folded state (this validates it; a failing operation is not appended) → append one line with a single
//! `write` → maybe refresh the snapshot → unlock. Readers never lock: the journal only grows, lines are
//! complete once their `\n` is there, and the snapshot is replaced by rename.

use super::model::{Cluster, Op, SimError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const SNAPSHOT_EVERY: u64 = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Cluster time in ms.
    pub at: u64,
    pub op: Op,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    /// Cluster time follows the wall clock.
    #[default]
    Real,
    /// Cluster time moves only with `ctl advance`.
    Manual,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClockCfg {
    pub epoch_ms: u64,
    pub mode: ClockMode,
    /// The drbd-utils version the simulated drbdsetup imitates (`None`: the current one); see
    /// [`super::events::prints_open`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drbd_utils: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    offset: u64,
    seq: u64,
    cluster: Cluster,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: corrupt entry at byte {offset}: {reason}")]
    Corrupt {
        path: String,
        offset: u64,
        reason: String,
    },
    #[error(transparent)]
    Sim(#[from] SimError),
}

impl StoreError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StoreError::Sim(e) => e.exit_code(),
            _ => 20,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A handle on a cluster directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// The folded state plus where the fold stopped in the journal.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub cluster: Cluster,
    pub offset: u64,
    pub seq: u64,
}

struct Lock(File);

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: flock on a descriptor we own; unlocking cannot violate memory safety.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.jsonl")
    }

    fn create_dir(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))
    }

    fn lock(&self) -> Result<Lock, StoreError> {
        self.create_dir()?;
        let p = self.dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(io_err(&p))?;
        loop {
            // SAFETY: flock on a valid descriptor owned by `f`.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err(&p)(e));
            }
        }
    }

    /// The clock configuration; a directory without one uses a real clock started at its creation.
    pub fn clock(&self) -> Result<ClockCfg, StoreError> {
        let p = self.dir.join("clock.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: p.display().to_string(),
                offset: 0,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ClockCfg {
                epoch_ms: wall_ms(),
                mode: ClockMode::Real,
                drbd_utils: None,
            }),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Creates the directory and its clock (once; an existing clock is kept unless `reset`).
    pub fn init(&self, mode: ClockMode, reset: bool) -> Result<(), StoreError> {
        let _l = self.lock()?;
        let p = self.dir.join("clock.json");
        if p.exists() && !reset {
            return Ok(());
        }
        if reset {
            for f in ["journal.jsonl", "snapshot.json"] {
                let fp = self.dir.join(f);
                match std::fs::remove_file(&fp) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&fp)(e)),
                }
            }
        }
        let cfg = ClockCfg {
            epoch_ms: wall_ms(),
            mode,
            drbd_utils: None,
        };
        write_atomic(&p, &serde_json::to_vec(&cfg).expect("serializable"))
    }

    /// Sets the drbd-utils version the cluster's drbdsetup imitates (`None`: the current one).
    pub fn set_drbd_utils(&self, version: Option<&str>) -> Result<(), StoreError> {
        if let Some(v) = version {
            super::events::check_utils_version(v).map_err(SimError::Invalid)?;
        }
        let _l = self.lock()?;
        let mut cfg = self.ensure_clock()?;
        cfg.drbd_utils = version.map(str::to_string);
        write_atomic(
            &self.dir.join("clock.json"),
            &serde_json::to_vec(&cfg).expect("serializable"),
        )
    }

    fn ensure_clock(&self) -> Result<ClockCfg, StoreError> {
        let p = self.dir.join("clock.json");
        if !p.exists() {
            let cfg = ClockCfg {
                epoch_ms: wall_ms(),
                mode: ClockMode::Real,
                drbd_utils: None,
            };
            write_atomic(&p, &serde_json::to_vec(&cfg).expect("serializable"))?;
            return Ok(cfg);
        }
        self.clock()
    }

    /// Cluster time now, given the folded state (manual clocks stand still between operations).
    pub fn now(&self, cfg: &ClockCfg, cluster: &Cluster) -> u64 {
        match cfg.mode {
            ClockMode::Real => wall_ms().saturating_sub(cfg.epoch_ms).max(cluster.now_ms),
            ClockMode::Manual => cluster.now_ms,
        }
    }

    /// Folds snapshot + journal into the current state (no lock needed).
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut l = self.load_snapshot()?;
        let (entries, off) = self.read_from(l.offset)?;
        for e in entries {
            // Entries were validated before they were appended; replay ignores (impossible) errors so a
            // reader never diverges from the writers' fold.
            let _ = l.cluster.apply(&e.op, e.at, &mut |_, _| {});
            l.seq = e.seq;
        }
        l.offset = off;
        Ok(l)
    }

    fn load_snapshot(&self) -> Result<Loaded, StoreError> {
        let p = self.dir.join("snapshot.json");
        match std::fs::read(&p) {
            Ok(b) => {
                let s: Snapshot = serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                    path: p.display().to_string(),
                    offset: 0,
                    reason: e.to_string(),
                })?;
                Ok(Loaded {
                    cluster: s.cluster,
                    offset: s.offset,
                    seq: s.seq,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Loaded {
                cluster: Cluster::default(),
                offset: 0,
                seq: 0,
            }),
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Complete journal entries from byte `offset`; returns them and the offset after the last one.
    pub fn read_from(&self, offset: u64) -> Result<(Vec<Entry>, u64), StoreError> {
        let p = self.journal_path();
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
            Err(e) => return Err(io_err(&p)(e)),
        };
        f.seek(SeekFrom::Start(offset)).map_err(io_err(&p))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(io_err(&p))?;
        let mut entries = Vec::new();
        let mut pos = 0usize;
        while let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') {
            let line = &buf[pos..pos + nl];
            if !line.is_empty() {
                let e: Entry = serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
                    path: p.display().to_string(),
                    offset: offset + pos as u64,
                    reason: e.to_string(),
                })?;
                entries.push(e);
            }
            pos += nl + 1;
        }
        Ok((entries, offset + pos as u64))
    }

    /// Size of the journal (to detect growth cheaply).
    pub fn journal_len(&self) -> u64 {
        std::fs::metadata(self.journal_path())
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Validates and appends operations, in order, under the lock. Stops at the first failing
    /// operation (the ones before it stay committed) and returns its error.
    pub fn commit(&self, ops: &[Op]) -> Result<Loaded, StoreError> {
        self.commit_at(ops, 0)
    }

    /// Like [`Store::commit`]; `advance_ms` moves a manual clock forward first.
    pub fn commit_at(&self, ops: &[Op], advance_ms: u64) -> Result<Loaded, StoreError> {
        let _lock = self.lock()?;
        let cfg = self.ensure_clock()?;
        let mut l = self.load()?;
        let p = self.journal_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io_err(&p))?;
        let mut at = self.now(&cfg, &l.cluster);
        if cfg.mode == ClockMode::Manual {
            at = at.saturating_add(advance_ms);
        }
        for op in ops {
            let mut next = l.cluster.clone();
            next.apply(op, at, &mut |_, _| {})?;
            let e = Entry {
                seq: l.seq + 1,
                at,
                op: op.clone(),
            };
            let mut line = serde_json::to_vec(&e).expect("serializable");
            line.push(b'\n');
            f.write_all(&line).map_err(io_err(&p))?;
            l.cluster = next;
            l.seq += 1;
            l.offset += line.len() as u64;
        }
        f.flush().map_err(io_err(&p))?;
        if l.seq / SNAPSHOT_EVERY != (l.seq - ops.len() as u64) / SNAPSHOT_EVERY {
            self.write_snapshot(&l)?;
        }
        Ok(l)
    }

    fn write_snapshot(&self, l: &Loaded) -> Result<(), StoreError> {
        let s = Snapshot {
            offset: l.offset,
            seq: l.seq,
            cluster: l.cluster.clone(),
        };
        write_atomic(
            &self.dir.join("snapshot.json"),
            &serde_json::to_vec(&s).expect("serializable"),
        )
    }

    /// Appends a `tick` if a resync is due (so every reader sees it complete at the same point).
    pub fn tick_if_due(&self, l: &Loaded) -> Result<bool, StoreError> {
        let cfg = self.clock()?;
        let now = self.now(&cfg, &l.cluster);
        match l.cluster.next_due_ms() {
            Some(due) if due <= now => {
                let _lock = self.lock()?;
                // Re-check under the lock: another process may have ticked already.
                let fresh = self.load()?;
                let now = self.now(&cfg, &fresh.cluster);
                if fresh.cluster.next_due_ms().is_some_and(|d| d <= now) {
                    drop(_lock);
                    self.commit(&[Op::Tick])?;
                    return Ok(true);
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }
}

fn write_atomic(p: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, p).map_err(io_err(p))
}
