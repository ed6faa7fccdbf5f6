//! [`ServiceManager`] through the `systemctl` command, for hosts without a bus daemon (kind nodes): zbus
//! cannot use systemd's private socket, `systemctl` can. It runs on the host through the `--host-exec`
//! prefix (nsenter into the host's namespaces), as an argument vector, never through a shell; unit names
//! follow a `--`, so none can be taken for an option.
//!
//! `systemctl start/stop` wait for their job like the D-Bus client does; the job result comes from
//! systemctl's exit status and message (`Job for X failed …`, `A dependency job for X failed …`, …).
//! systemctl reports a skipped job as success, so [`JobResult::Skipped`] never comes out of this backend.

use super::{JobResult, ServiceManager, SystemdError, UnitState};
use futures::future::BoxFuture;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Captured output is cut here (systemctl's messages are a few lines).
const OUTPUT_LIMIT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct SystemctlManager {
    /// The command up to and including `systemctl` (host-exec prefix + `systemctl`).
    argv: Vec<String>,
    /// start/stop: how long to wait for systemctl (and so the job).
    job_timeout: Duration,
    /// Every other command.
    call_timeout: Duration,
}

/// What one systemctl run gave.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl SystemctlManager {
    /// `host_exec` is the prefix that runs a program on the host (may be empty); `systemctl` the program
    /// (normally `systemctl`).
    pub fn new(
        host_exec: &[String],
        systemctl: &str,
        job_timeout: Duration,
        call_timeout: Duration,
    ) -> SystemctlManager {
        let mut argv = host_exec.to_vec();
        argv.push(systemctl.to_string());
        SystemctlManager {
            argv,
            job_timeout,
            call_timeout,
        }
    }

    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    async fn run(
        &self,
        method: &'static str,
        unit: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Ran, SystemdError> {
        let err = |message: String| SystemdError::Call {
            method,
            unit: unit.to_string(),
            message,
        };
        let (prog, pre) = self
            .argv
            .split_first()
            .ok_or_else(|| err("empty systemctl command".to_string()))?;
        let mut cmd = tokio::process::Command::new(prog);
        cmd.args(pre)
            .args(["--no-ask-password", "--no-pager"])
            .args(args)
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a timeout kills nsenter's forked child (systemctl) too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot run {prog}: {e}")))?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let mut out = child.stdout.take();
        let mut errs = child.stderr.take();
        let read = |p: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
            let mut buf = Vec::new();
            if let Some(p) = p {
                let _ = p.take(OUTPUT_LIMIT).read_to_end(&mut buf).await;
            }
            String::from_utf8_lossy(&buf).into_owned()
        };
        let all = async {
            let (o, e, status) = tokio::join!(
                read(out.take().map(|p| Box::new(p) as _)),
                read(errs.take().map(|p| Box::new(p) as _)),
                child.wait()
            );
            (o, e, status)
        };
        match tokio::time::timeout(timeout, all).await {
            Ok((stdout, stderr, Ok(status))) => Ok(Ran {
                code: status.code(),
                stdout,
                stderr,
            }),
            Ok((_, _, Err(e))) => Err(err(format!("waiting for {prog}: {e}"))),
            // The whole group goes; a job systemctl queued keeps running in systemd.
            Err(_) => Err({
                if let Some(pg) = pgid {
                    // SAFETY: kill(2) on our own child's process group.
                    unsafe { libc::kill(-pg, libc::SIGKILL) };
                }
                if matches!(method, "StartUnit" | "StopUnit") {
                    SystemdError::JobTimeout {
                        method,
                        unit: unit.to_string(),
                        secs: timeout.as_secs(),
                    }
                } else {
                    err(format!(
                        "systemctl did not finish within {} s",
                        timeout.as_secs()
                    ))
                }
            }),
        }
    }

    async fn plain(
        &self,
        method: &'static str,
        unit: &str,
        args: &[&str],
    ) -> Result<(), SystemdError> {
        let r = self.run(method, unit, args, self.call_timeout).await?;
        if r.code == Some(0) {
            Ok(())
        } else {
            Err(SystemdError::Call {
                method,
                unit: unit.to_string(),
                message: failure_message(&r),
            })
        }
    }

    async fn job(
        &self,
        method: &'static str,
        verb: &str,
        unit: &str,
    ) -> Result<JobResult, SystemdError> {
        let r = self
            .run(method, unit, &[verb, "--", unit], self.job_timeout)
            .await?;
        match job_result(r.code, &r.stderr) {
            Some(j) => Ok(j),
            None => Err(SystemdError::Call {
                method,
                unit: unit.to_string(),
                message: failure_message(&r),
            }),
        }
    }

    async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let r = self
            .run(
                "LoadUnit",
                unit,
                &[
                    "show",
                    "-p",
                    "ActiveState,SubState,FreezerState",
                    "--",
                    unit,
                ],
                self.call_timeout,
            )
            .await?;
        if r.code != Some(0) {
            return Err(SystemdError::Call {
                method: "LoadUnit",
                unit: unit.to_string(),
                message: failure_message(&r),
            });
        }
        parse_show(&r.stdout).ok_or_else(|| SystemdError::Call {
            method: "LoadUnit",
            unit: unit.to_string(),
            message: format!("unexpected `systemctl show` output: {:?}", r.stdout.trim()),
        })
    }
}

fn failure_message(r: &Ran) -> String {
    let text = r.stderr.trim();
    let text = if text.is_empty() {
        r.stdout.trim()
    } else {
        text
    };
    let code = match r.code {
        Some(c) => format!("systemctl exited with {c}"),
        None => "systemctl was killed by a signal".to_string(),
    };
    if text.is_empty() {
        code
    } else {
        format!("{code}: {text}")
    }
}

/// The job result systemctl's exit status and message stand for (its `check_wait_response()`), or `None`
/// when it failed before any job existed (no such unit, bus trouble, …): that is a call error.
pub fn job_result(code: Option<i32>, stderr: &str) -> Option<JobResult> {
    if code == Some(0) {
        return Some(JobResult::Done);
    }
    let lines = stderr.lines().map(str::trim);
    for l in lines {
        if l.starts_with("A dependency job for ") && l.contains(" failed") {
            return Some(JobResult::Dependency);
        }
        if l.starts_with("Job for ") {
            if l.contains(" canceled") {
                return Some(JobResult::Canceled);
            }
            if l.contains(" timed out") {
                return Some(JobResult::Timeout);
            }
            if l.contains(" failed") {
                return Some(JobResult::Failed);
            }
        }
        if l.starts_with("Assertion failed on job for ") {
            return Some(JobResult::Other("assert".into()));
        }
        if l.starts_with("Queued job for ") && l.contains("garbage collected") {
            return Some(JobResult::Other("collected".into()));
        }
        if l.starts_with("Operation on or unit type of ") {
            return Some(JobResult::Other("unsupported".into()));
        }
        if l.starts_with("Job failed.") {
            return Some(JobResult::Failed);
        }
    }
    None
}

/// Parses `systemctl show -p ActiveState,SubState,FreezerState` output (`Key=value` lines, any order).
/// A systemd too old for `FreezerState` leaves it empty.
pub fn parse_show(out: &str) -> Option<UnitState> {
    let mut st = UnitState::default();
    let (mut active, mut sub) = (false, false);
    for l in out.lines() {
        let Some((k, v)) = l.trim_end().split_once('=') else {
            continue;
        };
        match k.trim() {
            "ActiveState" => {
                st.active_state = v.to_string();
                active = true;
            }
            "SubState" => {
                st.sub_state = v.to_string();
                sub = true;
            }
            "FreezerState" => st.freezer_state = v.to_string(),
            _ => {}
        }
    }
    (active && sub).then_some(st)
}

impl ServiceManager for SystemctlManager {
    fn reload(&self) -> BoxFuture<'_, Result<(), SystemdError>> {
        Box::pin(self.plain("Reload", "", &["daemon-reload"]))
    }

    fn start_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        Box::pin(self.job("StartUnit", "start", unit))
    }

    fn stop_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<JobResult, SystemdError>> {
        Box::pin(self.job("StopUnit", "stop", unit))
    }

    fn reset_failed_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(async move {
            self.plain("ResetFailedUnit", unit, &["reset-failed", "--", unit])
                .await
        })
    }

    fn unit_state<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitState, SystemdError>> {
        Box::pin(self.state(unit))
    }

    fn freeze_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(async move {
            self.plain("FreezeUnit", unit, &["freeze", "--", unit])
                .await
        })
    }

    fn thaw_unit<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<(), SystemdError>> {
        Box::pin(async move { self.plain("ThawUnit", unit, &["thaw", "--", unit]).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemctl_messages_map_to_job_results() {
        assert_eq!(job_result(Some(0), ""), Some(JobResult::Done));
        assert_eq!(
            job_result(Some(1), "Job for x.service failed because the control process exited with error code.\nSee \"systemctl status x.service\" and \"journalctl -xeu x.service\" for details.\n"),
            Some(JobResult::Failed)
        );
        assert_eq!(
            job_result(
                Some(1),
                "A dependency job for y.target failed. See 'journalctl -xe' for details.\n"
            ),
            Some(JobResult::Dependency)
        );
        assert_eq!(
            job_result(Some(1), "Job for x.service canceled.\n"),
            Some(JobResult::Canceled)
        );
        assert_eq!(
            job_result(Some(1), "Job for x.service timed out.\n"),
            Some(JobResult::Timeout)
        );
        // No job at all: a call error.
        assert_eq!(
            job_result(
                Some(5),
                "Failed to start x.service: Unit x.service not found.\n"
            ),
            None
        );
        assert_eq!(job_result(None, ""), None);
    }

    #[test]
    fn show_output_parses_in_any_order_and_rejects_garbage() {
        let st = parse_show("SubState=running\nFreezerState=frozen\nActiveState=active\n").unwrap();
        assert_eq!(
            st,
            UnitState {
                active_state: "active".into(),
                sub_state: "running".into(),
                freezer_state: "frozen".into()
            }
        );
        assert!(st.is_active() && st.is_frozen());
        let old = parse_show("ActiveState=inactive\nSubState=dead\n").unwrap();
        assert_eq!(old.freezer_state, "");
        assert!(parse_show("").is_none());
        assert!(parse_show("Failed to connect to bus").is_none());
    }

    #[tokio::test]
    async fn commands_are_argv_with_the_unit_after_a_double_dash() {
        // `echo` stands in for systemctl: its output is the argument vector it got.
        let m = SystemctlManager::new(
            &["env".to_string()],
            "echo",
            Duration::from_secs(10),
            Duration::from_secs(10),
        );
        let r = m
            .run(
                "StartUnit",
                "a b;$(x).service",
                &["start", "--", "a b;$(x).service"],
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(r.code, Some(0));
        assert_eq!(
            r.stdout.trim_end(),
            "--no-ask-password --no-pager start -- a b;$(x).service"
        );
    }

    #[tokio::test]
    async fn a_hanging_systemctl_is_a_job_timeout_and_a_missing_one_a_call_error() {
        let m = SystemctlManager::new(
            &[
                "sh".to_string(),
                "-c".to_string(),
                "exec sleep 30".to_string(),
            ],
            "sh",
            Duration::from_millis(300),
            Duration::from_millis(300),
        );
        match m.start_unit("x.service").await {
            Err(SystemdError::JobTimeout { method, .. }) => assert_eq!(method, "StartUnit"),
            other => panic!("expected a job timeout, got {other:?}"),
        }
        let m = SystemctlManager::new(
            &[],
            "/nonexistent/systemctl",
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        assert!(matches!(
            m.unit_state("x.service").await,
            Err(SystemdError::Call {
                method: "LoadUnit",
                ..
            })
        ));
    }
}
