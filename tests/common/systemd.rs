//! A throw-away real systemd for tests: `tests/infra/systemd/start.sh` (recipe A of
//! test-infrastructure.md: PID 1 of private pid+mount+uts+cgroup namespaces, overlay root, private /tmp and
//! /dev, read-only /proc/sys and /sys, its own cgroup2 subtree, a dbus-daemon inside) behind a guard whose
//! Drop runs `stop.sh` — also when the test fails or panics. A watchdog started with it tears it down if
//! the test process dies without unwinding.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn infra(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/infra/systemd")
        .join(script)
}

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Host directories bind-mounted read-write at the same path inside (a shared cluster journal).
    pub bind: Vec<PathBuf>,
    /// Host directories bind-mounted read-only at the same path inside.
    pub bind_ro: Vec<PathBuf>,
    /// Host name inside.
    pub name: Option<String>,
}

/// One booted systemd; torn down on drop.
#[derive(Debug)]
pub struct SystemdNs {
    /// The per-boot run directory (`mktemp -d`); removed on drop.
    pub run_dir: PathBuf,
    /// Host PID of the namespace's systemd (PID 1 inside).
    pub pid: u32,
    /// The host directory that is `/run` inside.
    pub sdrun: PathBuf,
    /// `/run/systemd/system` inside, as a host path: unit files and drop-ins go here.
    pub unit_dir: PathBuf,
    /// D-Bus address of the bus daemon inside (`unix:path=$SDRUN/dbus/system_bus_socket`).
    pub bus: String,
    /// Its cgroup2 subtree (host path).
    pub cgroup: PathBuf,
    /// Output of the boot script (systemd's console is no terminal, so its messages go to the journal).
    pub log: PathBuf,
    /// The journal inside (`/run/log/journal`, volatile), readable with `journalctl -D`.
    pub journal: PathBuf,
}

fn skip(test: &str, why: &str) -> Option<SystemdNs> {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot boot a test systemd and CI is set: {why}");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
    None
}

impl SystemdNs {
    /// Boots one, or returns `None` after a loud message when this machine cannot (not root, no systemd,
    /// no dbus-daemon, no cgroup2). In CI (`CI` set) that is a failure instead.
    pub fn boot(test: &str) -> Option<SystemdNs> {
        SystemdNs::boot_with(test, &BootOptions::default())
    }

    pub fn boot_with(test: &str, o: &BootOptions) -> Option<SystemdNs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return skip(test, "needs root (namespaces, mounts, cgroups)");
        }
        if !Path::new("/lib/systemd/systemd").exists() {
            return skip(test, "no /lib/systemd/systemd (apt-get install -y systemd)");
        }
        let join = |v: &[PathBuf]| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        // The test's binaries (drbd-sim in units, the ocf-wrapper) must run inside too, wherever the
        // checkout is: under /tmp they would be hidden by the private /tmp, so bind their directory.
        let mut ro = o.bind_ro.clone();
        if let Some(bin_dir) = Path::new(env!("CARGO_BIN_EXE_drbd-sim")).parent() {
            ro.push(bin_dir.to_path_buf());
        }
        let mut cmd = Command::new(infra("start.sh"));
        cmd.env("SD_BIND", join(&o.bind))
            .env("SD_BIND_RO", join(&ro))
            .env("SD_OWNER", std::process::id().to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = &o.name {
            cmd.env("SD_NAME", n);
        }
        let out = cmd.output().expect("run tests/infra/systemd/start.sh");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !out.status.success() {
            if stderr.contains("not found") || stderr.contains("no cgroup2") {
                return skip(test, stderr.trim());
            }
            panic!("{test}: start.sh failed: {stderr}");
        }
        let run_dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let env = std::fs::read_to_string(run_dir.join("env")).expect("start.sh's env file");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in {}/env", run_dir.display()))
                .to_string()
        };
        Some(SystemdNs {
            pid: get("SD_PID").parse().expect("SD_PID"),
            sdrun: PathBuf::from(get("SDRUN")),
            unit_dir: PathBuf::from(get("SD_UNIT_DIR")),
            bus: get("SD_BUS"),
            cgroup: PathBuf::from(get("SD_CGROUP")),
            log: PathBuf::from(get("SD_LOG")),
            journal: PathBuf::from(get("SD_JOURNAL")),
            run_dir,
        })
    }

    /// The host-exec prefix that runs a program inside (its mount and pid namespaces), as the agent's
    /// `--host-exec` would on a real host.
    pub fn host_exec(&self) -> Vec<String> {
        ["nsenter", "-t", &self.pid.to_string(), "-m", "-p", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// `systemctl ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let he = self.host_exec();
        Command::new(&he[0])
            .args(&he[1..])
            .arg("systemctl")
            .args(["--no-pager", "--no-ask-password"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter systemctl")
    }

    /// One property of a unit, read with `systemctl show` (independent of the client under test).
    pub fn show(&self, unit: &str, prop: &str) -> String {
        let o = self.systemctl(&["show", "-p", prop, "--value", "--", unit]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Writes a unit file (or a drop-in: `name` = `x.service.d/10-y.conf`) into `/run/systemd/system`.
    pub fn write_unit(&self, name: &str, content: &str) {
        let p = self.unit_dir.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, content).unwrap();
    }

    /// The host path of `/run/<rel>` inside.
    pub fn run_path(&self, rel: &str) -> PathBuf {
        self.sdrun.join(rel)
    }

    /// The host path of a unit's cgroup (`system.slice/<unit>`).
    pub fn unit_cgroup(&self, unit: &str) -> PathBuf {
        self.cgroup.join("system.slice").join(unit)
    }

    /// Stops the bus daemon inside (the socket goes too, so connecting fails).
    pub fn stop_bus(&self) {
        let o = self.systemctl(&["stop", "dbus.socket", "dbus.service"]);
        assert!(o.status.success(), "stopping dbus: {o:?}");
    }

    /// Starts the bus daemon again; systemd re-registers on it by itself.
    pub fn start_bus(&self) {
        let o = self.systemctl(&["start", "dbus.service"]);
        assert!(o.status.success(), "starting dbus: {o:?}");
    }

    /// The whole journal inside: systemd's messages and the units' output (also after that systemd
    /// exited, until drop).
    pub fn journal(&self) -> String {
        let o = Command::new("journalctl")
            .arg("-D")
            .arg(&self.journal)
            .args(["--no-pager", "-o", "short-monotonic"])
            .stdin(Stdio::null())
            .output();
        match o {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("(journalctl: {e})"),
        }
    }

    /// The last lines of the journal (for failure messages).
    pub fn log_tail(&self) -> String {
        let s = self.journal();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for SystemdNs {
    fn drop(&mut self) {
        let r = Command::new(infra("stop.sh"))
            .arg(&self.run_dir)
            .stdin(Stdio::null())
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "stop.sh {} failed: {}",
                self.run_dir.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run stop.sh: {e}"),
        }
    }
}

/// A monitor connection on a bus (`org.freedesktop.DBus.Monitoring.BecomeMonitor`, allowed for root): it
/// sees a copy of every message matching `rules` as the bus daemon routes it, so a test can observe the
/// calls a client makes on the bus itself (e.g. `type='method_call',member='StopUnit'`). A monitor must
/// never send anything afterwards; keep the returned stream and connection only for reading.
pub async fn bus_monitor(
    address: &str,
    rules: &[&str],
) -> zbus::Result<(zbus::Connection, zbus::MessageStream)> {
    let conn = zbus::connection::Builder::address(address)
        .max_queued(std::num::NonZeroUsize::new(65536).unwrap())
        .build()
        .await?;
    let stream = zbus::MessageStream::from(&conn);
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus.Monitoring"),
        "BecomeMonitor",
        &(rules.to_vec(), 0u32),
    )
    .await?;
    Ok((conn, stream))
}
