//! The promoter's effects: the service manager (systemd over D-Bus, or its fallback), processes (shell
//! runner, `drbdsetup show`, `drbdadm adjust`), each turned into an [`Outcome`] for the decisions.

use super::decide::{detect_policy, ActionKind, Outcome, SbPolicy};
use super::spec::{parse_entry, PromotedResource, Runner};
use super::units::{promote_unit, target_unit, unit_of};
use crate::plugins::umh::exec;
use crate::systemd::ServiceManager;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Time limit of one shell-runner entry.
pub const SHELL_TIMEOUT: Duration = Duration::from_secs(120);
/// Time limit of `drbdsetup show` and `drbdadm adjust`.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone)]
pub struct Effects {
    pub manager: Option<Arc<dyn ServiceManager>>,
    /// Prefix that runs a program on the host (shell runner).
    pub host_exec: Vec<String>,
    /// The agent's drbdsetup (for `show`).
    pub drbdsetup: Vec<String>,
    /// The agent's drbdadm (for `adjust`); empty = not run.
    pub drbdadm: Vec<String>,
    pub node: String,
    /// The host has the unified cgroup hierarchy (freeze works).
    pub cgroup2: bool,
}

fn path_env() -> String {
    std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string())
}

async fn run(
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    timeout: Duration,
) -> exec::RunResult {
    exec::run(exec::RunRequest {
        argv,
        env,
        stdin: None,
        timeout,
        kill_grace: Duration::from_secs(2),
        output_limit: 1 << 20,
    })
    .await
}

fn describe(r: &exec::RunResult) -> String {
    let err = r.stderr.text();
    let what = match &r.outcome {
        exec::Outcome::Exited(c) => format!("exit code {c}"),
        exec::Outcome::Signaled(s) => format!("killed by signal {s}"),
        exec::Outcome::TimedOut => "timed out".into(),
        exec::Outcome::SpawnError(e) => format!("could not start: {e}"),
    };
    if err.is_empty() {
        what
    } else {
        format!("{what}: {}", err.lines().last().unwrap_or_default())
    }
}

impl Effects {
    fn manager(&self) -> Result<&Arc<dyn ServiceManager>, String> {
        self.manager
            .as_ref()
            .ok_or_else(|| "no service manager configured".to_string())
    }

    /// Runs one action of the decisions.
    pub async fn act(&self, spec: &PromotedResource, kind: ActionKind) -> Outcome {
        match (spec.runner, kind) {
            (Runner::Shell, ActionKind::Start) => self.shell(spec, &spec.start, true).await,
            (Runner::Shell, ActionKind::Stop) => {
                self.shell(spec, &spec.stop_entries(), false).await
            }
            (Runner::Shell, _) => Outcome::Failed("the shell runner cannot freeze".into()),
            (Runner::Systemd, ActionKind::Start) => self.start_target(&spec.name).await,
            (Runner::Systemd, ActionKind::Stop) => self.stop_target(spec).await,
            (Runner::Systemd, ActionKind::Freeze) => self.freeze(spec, true).await,
            (Runner::Systemd, ActionKind::Thaw) => self.freeze(spec, false).await,
        }
    }

    /// Upstream's start: reset-failed, start the target (its promote unit promotes DRBD), and check
    /// it is active. A target that did not come up is `NotPromoted` when the promote unit is not active
    /// either (DRBD refused, another node won), `Failed` otherwise.
    async fn start_target(&self, res: &str) -> Outcome {
        let m = match self.manager() {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(e),
        };
        let target = target_unit(res);
        let promote = promote_unit(res);
        let _ = m.reset_failed_unit(&target).await;
        let _ = m.reset_failed_unit(&promote).await;
        let job = match m.start_unit(&target).await {
            Ok(j) => j,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let state = m.unit_state(&target).await;
        if job.is_done() && state.as_ref().is_ok_and(|s| s.is_active()) {
            return Outcome::Ok;
        }
        let promoted = m.unit_state(&promote).await.is_ok_and(|s| s.is_active());
        let st = match &state {
            Ok(s) => format!("{}/{}", s.active_state, s.sub_state),
            Err(e) => e.to_string(),
        };
        if promoted {
            Outcome::Failed(format!("{target} did not start (job {job:?}, {st})"))
        } else {
            Outcome::NotPromoted(format!("{promote} did not promote DRBD (job {job:?})"))
        }
    }

    /// Stops the target (and so the services and the promote unit, which demotes DRBD). A promote unit
    /// left `failed` means the demotion failed and systemd escalates (`onDrbdDemoteFailure`).
    async fn stop_target(&self, spec: &PromotedResource) -> Outcome {
        let m = match self.manager() {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(e),
        };
        let target = target_unit(&spec.name);
        let r = m.stop_unit(&target).await;
        let promote = promote_unit(&spec.name);
        // The target's stop job finishes as soon as the target is inactive, while the stop of the promote
        // unit (the demotion, ordered after the services' stops) may still be queued. Wait for it too:
        // systemd hands us the queued job, so this is the same demotion, not a second one. Only then is
        // DRBD Secondary here, and only then may the caller remove unit files or report the stop done.
        if let Err(e) = m.stop_unit(&promote).await {
            tracing::warn!(unit = %promote, error = %e, "waiting for the demotion");
        }
        if m.unit_state(&promote)
            .await
            .is_ok_and(|s| s.active_state == "failed")
        {
            return Outcome::Failed(format!(
                "demoting DRBD failed ({promote} failed); escalation: onDrbdDemoteFailure {}",
                spec.on_drbd_demote_failure.as_str()
            ));
        }
        match r {
            Ok(j) if j.is_done() => Outcome::Ok,
            Ok(j) => Outcome::Failed(format!("stop job of {target}: {j:?}")),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// The units freeze and thaw act on: the start units except mounts (upstream's choice: a frozen
    /// mount unit cannot be stopped).
    pub fn freezable_units(spec: &PromotedResource) -> Vec<String> {
        spec.start
            .iter()
            .filter_map(|s| parse_entry(s.trim()).ok())
            .map(|e| unit_of(&e, &spec.name))
            .filter(|u| !u.ends_with(".mount"))
            .collect()
    }

    async fn freeze(&self, spec: &PromotedResource, freeze: bool) -> Outcome {
        let m = match self.manager() {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(e),
        };
        let mut errors = Vec::new();
        for u in Self::freezable_units(spec) {
            let r = if freeze {
                m.freeze_unit(&u).await
            } else {
                m.thaw_unit(&u).await
            };
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Failed(errors.join("; "))
        }
    }

    /// The shell runner: each entry with `sh -c` on the host, the resource in `DRBD_RES_NAME`. Starting
    /// stops at the first failure; stopping runs every entry.
    async fn shell(&self, spec: &PromotedResource, entries: &[String], start: bool) -> Outcome {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), path_env());
        env.insert("DRBD_RES_NAME".to_string(), spec.name.clone());
        env.insert("DRBD_NODE_NAME".to_string(), self.node.clone());
        let mut errors = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            let mut argv = self.host_exec.clone();
            argv.extend(["sh".to_string(), "-c".to_string(), e.clone()]);
            let r = run(argv, env.clone(), SHELL_TIMEOUT).await;
            if r.outcome != exec::Outcome::Exited(0) {
                let msg = format!(
                    "{} entry {i} ({e:?}): {}",
                    if start { "start" } else { "stop" },
                    describe(&r)
                );
                if start {
                    // Another node promoted first (DRBD refuses a second Primary): a lost race, not a
                    // failure of this node, so no backoff that would cost it its place in the order.
                    if lost_race(&msg) {
                        return Outcome::NotPromoted(msg);
                    }
                    return Outcome::Failed(msg);
                }
                errors.push(msg);
            }
        }
        if errors.is_empty() {
            Outcome::Ok
        } else {
            Outcome::Failed(errors.join("; "))
        }
    }

    /// `drbdsetup show RES --json --show-defaults`, then the detection.
    pub async fn detect(&self, spec: &PromotedResource) -> Result<(SbPolicy, Vec<String>), String> {
        if self.drbdsetup.is_empty() {
            return Err("no drbdsetup configured".into());
        }
        let mut argv = self.drbdsetup.clone();
        argv.extend(["show", &spec.name, "--json", "--show-defaults"].map(String::from));
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), path_env());
        let r = run(argv, env, TOOL_TIMEOUT).await;
        if r.outcome != exec::Outcome::Exited(0) {
            return Err(format!("drbdsetup show: {}", describe(&r)));
        }
        detect_policy(&String::from_utf8_lossy(&r.stdout.head), spec, self.cgroup2)
    }

    /// `drbdadm adjust RES` (upstream's `adjust-resource-on-start`).
    pub async fn adjust(&self, res: &str) -> Result<(), String> {
        if self.drbdadm.is_empty() {
            return Ok(());
        }
        let mut argv = self.drbdadm.clone();
        argv.extend(["adjust".to_string(), res.to_string()]);
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), path_env());
        let r = run(argv, env, TOOL_TIMEOUT).await;
        if r.outcome == exec::Outcome::Exited(0) {
            Ok(())
        } else {
            Err(format!("drbdadm adjust {res}: {}", describe(&r)))
        }
    }

    /// Whether the services run here (the target is active) and are frozen, as systemd says.
    pub async fn observe(&self, spec: &PromotedResource) -> Option<(bool, bool)> {
        if spec.runner != Runner::Systemd {
            return None;
        }
        let m = self.manager.as_ref()?;
        let t = m.unit_state(&target_unit(&spec.name)).await.ok()?;
        if !t.is_active() {
            // an inactive target's units do not run, so they are not frozen
            return Some((false, false));
        }
        let mut frozen = false;
        for u in Self::freezable_units(spec) {
            if m.unit_state(&u).await.is_ok_and(|s| s.is_frozen()) {
                frozen = true;
            }
        }
        Some((t.is_active(), frozen))
    }
}

/// Whether a failed start says that DRBD refused this node because another one is Primary
/// (`State change failed: (-1) Multiple primaries not allowed by config`, drbdsetup's text for it).
fn lost_race(message: &str) -> bool {
    message.contains("Multiple primaries not allowed")
}

#[cfg(test)]
mod lost_race_tests {
    use super::lost_race;

    #[test]
    fn a_refused_second_primary_is_a_lost_race() {
        assert!(lost_race("start entry 0 (\"drbdadm primary r0\"): exit code 11: r0: State change failed: (-1) Multiple primaries not allowed by config"));
        assert!(!lost_race(
            "start entry 1 (\"mount /dev/drbd0 /mnt\"): exit code 32: mount failed"
        ));
    }
}
