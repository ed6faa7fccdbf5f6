//! The effect layer: writing scripts to the private directory and running processes with a timeout that
//! kills the whole process group.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Creates `dir` (and parents) if needed and makes sure it is a real directory owned by us with mode
/// 0700: nobody else may replace the scripts we run.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let md = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !md.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not by this agent (uid {me})",
            dir.display(),
            md.uid()
        ));
    }
    if md.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot chmod 0700 {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// Writes `content` to `dir/name` with mode 0700 unless it is there already: a temporary file in the same
/// directory, then an atomic rename, so a run never sees a half-written script.
pub fn write_script(dir: &Path, name: &str, content: &[u8]) -> Result<PathBuf, String> {
    let target = dir.join(name);
    if let Ok(md) = std::fs::symlink_metadata(&target) {
        if md.is_file()
            && md.mode() & 0o777 == 0o700
            && std::fs::read(&target).is_ok_and(|c| c == content)
        {
            return Ok(target);
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o700))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", target.display()));
    }
    Ok(target)
}

/// Removes files of `dir` not named in `keep` (scripts of rules that no longer exist).
pub fn remove_others(dir: &Path, keep: &[String]) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !keep.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// One process to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Written to stdin, then closed; `None` = stdin is /dev/null.
    pub stdin: Option<std::sync::Arc<Vec<u8>>>,
    pub timeout: Duration,
    /// After the timeout, time between SIGTERM and SIGKILL to the process group.
    pub kill_grace: Duration,
    pub output_limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    SpawnError(String),
}

impl Outcome {
    /// The `result` label of `drbdreactor_umh_runs_total`.
    pub fn label(&self) -> String {
        match self {
            Outcome::Exited(c) => c.to_string(),
            Outcome::Signaled(s) => format!("signal-{s}"),
            Outcome::TimedOut => "timeout".into(),
            Outcome::SpawnError(_) => "spawn-error".into(),
        }
    }
}

/// Captured output: the first `limit` bytes and how many there were in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub head: Vec<u8>,
    pub total: u64,
}

impl Captured {
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).trim_end().to_string();
        let more = self.total.saturating_sub(self.head.len() as u64);
        if more > 0 {
            s.push_str(&format!(" …[{more} more bytes]"));
        }
        s
    }
}

#[derive(Debug, Clone)]
pub struct RunResult {
    pub outcome: Outcome,
    pub pid: Option<u32>,
    pub duration: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Kills the process group when dropped while armed (the run was abandoned: agent shutdown).
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self, sig: i32) {
        if self.pgid > 1 {
            // SAFETY: kill has no memory-safety preconditions; a negative pid addresses the group.
            unsafe { libc::kill(-self.pgid, sig) };
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill(libc::SIGKILL);
        }
    }
}

async fn capture<R: AsyncRead + Unpin>(mut r: R, limit: usize) -> Captured {
    let mut c = Captured::default();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return c,
            Ok(n) => {
                let room = limit.saturating_sub(c.head.len());
                c.head.extend_from_slice(&buf[..n.min(room)]);
                c.total += n as u64;
            }
        }
    }
}

fn spawn(req: &RunRequest) -> std::io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(&req.env)
        .current_dir("/")
        .process_group(0)
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd.spawn()
}

/// Runs one process to completion or timeout. Never panics; every failure is an [`Outcome`].
pub async fn run(req: RunRequest) -> RunResult {
    let start = Instant::now();
    let done = |outcome, pid, stdout, stderr| RunResult {
        outcome,
        pid,
        duration: start.elapsed(),
        stdout,
        stderr,
    };
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return done(
            Outcome::SpawnError("empty command".into()),
            None,
            Captured::default(),
            Captured::default(),
        );
    }
    // A script written a moment ago may still be open for writing in a child forked concurrently by
    // another task (ETXTBSY until that child execs): retry briefly.
    let mut attempt = 0;
    let mut child = loop {
        match spawn(&req) {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
            }
            Err(e) => {
                return done(
                    Outcome::SpawnError(format!("{}: {e}", req.argv[0])),
                    None,
                    Captured::default(),
                    Captured::default(),
                )
            }
        }
    };
    let pid = child.id();
    let mut guard = GroupGuard {
        pgid: pid.map_or(0, |p| p as i32),
        armed: true,
    };
    if let (Some(mut w), Some(input)) = (child.stdin.take(), req.stdin.clone()) {
        tokio::spawn(async move {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        });
    }
    let limit = req.output_limit;
    let out = child.stdout.take().map(|r| tokio::spawn(capture(r, limit)));
    let err = child.stderr.take().map(|r| tokio::spawn(capture(r, limit)));

    let outcome = match tokio::time::timeout(req.timeout, child.wait()).await {
        Ok(Ok(st)) => status_outcome(st),
        Ok(Err(e)) => Outcome::SpawnError(format!("wait: {e}")),
        Err(_) => {
            guard.kill(libc::SIGTERM);
            if tokio::time::timeout(req.kill_grace, child.wait())
                .await
                .is_err()
            {
                guard.kill(libc::SIGKILL);
                let _ = child.wait().await;
            }
            Outcome::TimedOut
        }
    };
    // The leader is gone. Whatever it left behind in its process group holds our pipes open: give it a
    // moment to finish writing, then kill the group so nothing of this run outlives it.
    let drain = Duration::from_millis(500);
    let collect = |h: Option<tokio::task::JoinHandle<Captured>>| async move {
        match h {
            Some(mut h) => match tokio::time::timeout(drain, &mut h).await {
                Ok(r) => (r.unwrap_or_default(), None),
                Err(_) => (Captured::default(), Some(h)),
            },
            None => (Captured::default(), None),
        }
    };
    let ((mut stdout, pend_out), (mut stderr, pend_err)) = tokio::join!(collect(out), collect(err));
    guard.kill(libc::SIGKILL);
    guard.armed = false;
    // After the kill the pipes close unless a process escaped the group (setsid); don't wait for it.
    for (slot, pending) in [(&mut stdout, pend_out), (&mut stderr, pend_err)] {
        if let Some(mut h) = pending {
            match tokio::time::timeout(Duration::from_millis(200), &mut h).await {
                Ok(r) => *slot = r.unwrap_or_default(),
                Err(_) => h.abort(),
            }
        }
    }
    done(outcome, pid, stdout, stderr)
}

fn status_outcome(st: std::process::ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => Outcome::Exited(c),
        (None, Some(s)) => Outcome::Signaled(s),
        (None, None) => Outcome::SpawnError(format!("unexpected status {st}")),
    }
}
