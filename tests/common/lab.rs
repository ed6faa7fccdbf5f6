//! The real-DRBD lab for tests: 1–3 QEMU guests (TCG) booting Debian's kernel with a DRBD 9 module built
//! from source, real systemd as PID 1 and real drbd-utils (`tests/infra/vm/`, see its README).
//!
//! `Lab::shared(nodes, test)` boots the guests once per test binary; cases take `lab.case()` (a lock,
//! so cases of one binary run one after another) and start from a clean DRBD state. Guests are torn
//! down when the test process exits, by an exit hook and by a watchdog process that notices the test
//! process is gone (a killed test leaves nothing behind). Without qemu or root the lab skips with the
//! reason; under `CI` that is a failure.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vm_dir() -> PathBuf {
    repo().join("tests/infra/vm")
}

/// The agent binary the guests run: the test build's, with debug info stripped (the guests read it
/// through 9p; 60 MB instead of 290).
/// The agent binary pushed into the guests: this build's, or `LAB_AGENT_BIN` (e.g. a release build for
/// figures: `cargo build --release` and `LAB_AGENT_BIN=target/release/drbd-reactor`).
pub fn agent_binary() -> PathBuf {
    std::env::var_os("LAB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_drbd-reactor")))
}

#[derive(Debug)]
pub struct ExecError {
    pub node: usize,
    pub rc: i32,
    pub output: String,
}

impl std::fmt::Display for ExecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node{} exit {}: {}", self.node, self.rc, self.output)
    }
}

pub struct Lab {
    pub nodes: usize,
    pub run: PathBuf,
    pub img: PathBuf,
    /// Seconds each guest took to answer after its qemu started (the last boot).
    pub boot_seconds: Mutex<Vec<f64>>,
    case: Mutex<()>,
    node_locks: Vec<Mutex<()>>,
    /// Outlives the test process on purpose (it tears down after it); kept, never waited for.
    _watchdog: std::process::Child,
}

static LAB: OnceLock<Option<Lab>> = OnceLock::new();
static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn teardown_at_exit() {
    if let Some(run) = RUN_DIR.get() {
        teardown(run);
    }
}

fn teardown(run: &Path) {
    let _ = Command::new(vm_dir().join("vm.sh"))
        .arg("down")
        .env("LAB_RUN", run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(run);
}

fn skip(test: &str, why: &str) -> Option<Lab> {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run the real-DRBD lab and CI is set: {why}");
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: {why} !!!!!!!!\n");
    None
}

/// Why this machine cannot run the lab, if it cannot.
fn cannot_run() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (the image build unpacks a root file system)".into());
    }
    for tool in [
        "qemu-system-x86_64",
        "qemu-img",
        "python3",
        "mmdebstrap",
        "spatch",
    ] {
        let found = Command::new("sh")
            .args(["-c", "command -v \"$1\"", "sh", tool])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} not found (apt-get install qemu-system-x86 qemu-utils mmdebstrap coccinelle; .ci/run does)"
            ));
        }
    }
    None
}

impl Lab {
    /// The test binary's lab with `nodes` guests, booted on first use.
    pub fn shared(nodes: usize, test: &str) -> Option<&'static Lab> {
        LAB.get_or_init(|| {
            if let Some(why) = cannot_run() {
                return skip(test, &why);
            }
            Some(Lab::start(nodes))
        })
        .as_ref()
        .inspect(|lab| assert!(lab.nodes >= nodes, "the lab was booted with fewer guests"))
    }

    /// Builds (or takes from the cache) the image and boots `nodes` guests.
    pub fn start(nodes: usize) -> Lab {
        assert!((1..=3).contains(&nodes));
        let t0 = Instant::now();
        let out = Command::new(vm_dir().join("build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/infra/vm/build.sh");
        assert!(out.status.success(), "tests/infra/vm/build.sh failed");
        let img = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        eprintln!(
            "lab: image {} ({:.1} s)",
            img.display(),
            t0.elapsed().as_secs_f64()
        );
        // Short path: QEMU's unix sockets live in it (108-byte limit).
        let run = PathBuf::from(
            String::from_utf8(
                Command::new("mktemp")
                    .args(["-d", "/tmp/drl.XXXXXX"])
                    .output()
                    .expect("mktemp")
                    .stdout,
            )
            .expect("utf-8")
            .trim(),
        );
        RUN_DIR.set(run.clone()).expect("one lab per process");
        unsafe { libc::atexit(teardown_at_exit) };
        // The watchdog: once this process is gone, kill the guests and remove the run dir.
        let watchdog = Command::new("setsid")
            .args([
                "sh",
                "-c",
                "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; LAB_RUN=\"$2\" \"$3\" down; rm -rf \"$2\"",
                "lab-watchdog",
            ])
            .arg(std::process::id().to_string())
            .arg(&run)
            .arg(vm_dir().join("vm.sh"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the lab watchdog");
        let lab = Lab {
            _watchdog: watchdog,
            nodes,
            run,
            img,
            boot_seconds: Mutex::new(vec![0.0; nodes]),
            case: Mutex::new(()),
            node_locks: (0..nodes).map(|_| Mutex::new(())).collect(),
        };
        let t1 = Instant::now();
        for n in 1..=nodes {
            lab.boot(n);
        }
        for n in 1..=nodes {
            lab.wait_agent(n, t1);
        }
        eprintln!(
            "lab: {nodes} guests ready after {:.1} s",
            t1.elapsed().as_secs_f64()
        );
        let bin = lab.run.join("share/drbd-reactor");
        let st = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(agent_binary())
            .arg(&bin)
            .status()
            .expect("objcopy");
        assert!(st.success(), "objcopy --strip-debug of the agent binary");
        for n in 1..=nodes {
            lab.sh(
                n,
                "install -m755 /mnt/host/drbd-reactor /usr/local/bin/drbd-reactor && modprobe drbd && modprobe drbd_transport_tcp",
            );
        }
        lab
    }

    fn vm(&self) -> Command {
        let mut c = Command::new(vm_dir().join("vm.sh"));
        c.env("LAB_RUN", &self.run).env("LAB_IMG", &self.img);
        c
    }

    fn boot(&self, n: usize) {
        let st = self
            .vm()
            .args(["start", &n.to_string()])
            .status()
            .expect("vm.sh start");
        assert!(st.success(), "vm.sh start {n}");
    }

    fn wait_agent(&self, n: usize, since: Instant) {
        let out = self
            .vm()
            .args(["wait", &n.to_string(), "300"])
            .output()
            .expect("vm.sh wait");
        assert!(
            out.status.success(),
            "node{n} did not come up: {}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.console(n)
        );
        self.boot_seconds.lock().unwrap()[n - 1] = since.elapsed().as_secs_f64();
    }

    /// The last lines of guest n's console (kernel and systemd messages).
    pub fn console(&self, n: usize) -> String {
        let s =
            std::fs::read_to_string(self.run.join(format!("node{n}.console"))).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Serializes the cases of one test binary on the shared guests.
    pub fn case(&self) -> MutexGuard<'_, ()> {
        self.case.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a bash script in guest n (as root); its output, or the exit code and output.
    pub fn exec(&self, n: usize, script: &str) -> Result<String, ExecError> {
        self.exec_timeout(n, script, Duration::from_secs(300))
    }

    pub fn exec_timeout(&self, n: usize, script: &str, t: Duration) -> Result<String, ExecError> {
        let _g = self.node_locks[n - 1]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let out = self
            .vm()
            .env("LAB_EXEC_TIMEOUT", t.as_secs().max(1).to_string())
            .args(["exec", &n.to_string(), script])
            .output()
            .expect("vm.sh exec");
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(output)
        } else {
            Err(ExecError {
                node: n,
                rc: out.status.code().unwrap_or(-1),
                output,
            })
        }
    }

    /// `exec` that must succeed.
    pub fn sh(&self, n: usize, script: &str) -> String {
        self.exec(n, script)
            .unwrap_or_else(|e| panic!("{e}\nscript: {script}"))
    }

    /// Polls a shell condition in guest n (every 0.2 s, inside the guest) until it holds; the time it took.
    pub fn wait(&self, n: usize, what: &str, cond: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        let script = format!(
            "for _ in $(seq {}); do if {cond}; then exit 0; fi; sleep 0.2; done; exit 1",
            timeout.as_secs() * 5
        );
        match self.exec_timeout(n, &script, timeout + Duration::from_secs(30)) {
            Ok(_) => {
                eprintln!(
                    "lab: node{n}: {what} after {:.1} s",
                    t0.elapsed().as_secs_f64()
                );
                t0.elapsed()
            }
            Err(e) => panic!(
                "node{n}: timed out after {timeout:?} waiting for {what} ({cond}): {e}\n{}",
                self.exec(
                    n,
                    "drbdsetup status --verbose 2>&1; journalctl -n 30 --no-pager 2>&1"
                )
                .unwrap_or_else(|e| e.output)
            ),
        }
    }

    /// Copies a host file into guest n (through the read-only 9p share).
    pub fn push(&self, n: usize, local: &Path, guest: &str, mode: u32) {
        let st = self
            .vm()
            .args(["push", &n.to_string()])
            .arg(local)
            .arg(guest)
            .arg(format!("{mode:o}"))
            .status()
            .expect("vm.sh push");
        assert!(st.success(), "push {} to node{n}:{guest}", local.display());
    }

    /// Writes `content` to `guest` in guest n.
    pub fn write(&self, n: usize, guest: &str, content: &str, mode: u32) {
        let mut f = tempfile::NamedTempFile::new_in(self.run.join("share")).expect("temp file");
        f.write_all(content.as_bytes()).expect("write");
        self.push(n, f.path(), guest, mode);
    }

    /// The QMP NIC of guest `a` that carries the link to guest `b`.
    fn nic(a: usize, b: usize) -> &'static str {
        match (a, b) {
            (1, 2) | (2, 1) | (3, 1) => "nic0",
            (1, 3) | (2, 3) | (3, 2) => "nic1",
            _ => panic!("no link {a}-{b}"),
        }
    }

    fn set_link(&self, a: usize, b: usize, up: bool) {
        for (x, y) in [(a, b), (b, a)] {
            if !self.running(x) {
                continue;
            }
            let st = self
                .vm()
                .args([
                    "link",
                    &x.to_string(),
                    Self::nic(x, y),
                    if up { "on" } else { "off" },
                ])
                .stdout(Stdio::null())
                .status()
                .expect("vm.sh link");
            assert!(st.success(), "set_link node{x} {}", Self::nic(x, y));
        }
    }

    /// Pulls the virtual cable between guests a and b (both ends).
    pub fn cut(&self, a: usize, b: usize) {
        self.set_link(a, b, false)
    }

    pub fn heal(&self, a: usize, b: usize) {
        self.set_link(a, b, true)
    }

    /// Every link of guest n.
    pub fn isolate(&self, n: usize) {
        for m in 1..=3 {
            if m != n {
                self.cut(n, m);
            }
        }
    }

    pub fn heal_all(&self) {
        for (a, b) in [(1, 2), (1, 3), (2, 3)] {
            self.heal(a, b);
        }
    }

    pub fn running(&self, n: usize) -> bool {
        n <= self.nodes
            && std::fs::read_to_string(self.run.join(format!("node{n}.pid")))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
                .is_some_and(|p| unsafe { libc::kill(p, 0) } == 0)
    }

    /// Power cut: SIGKILL to guest n's qemu.
    pub fn power_cut(&self, n: usize) {
        let st = self
            .vm()
            .args(["kill", &n.to_string()])
            .status()
            .expect("vm.sh kill");
        assert!(st.success());
    }

    /// Boots guest n again (after a power cut) and waits for its agent; DRBD is not started. The
    /// agent binary is installed again (the root overlay keeps it, but a new build may differ).
    pub fn restart(&self, n: usize) {
        if self.running(n) {
            self.power_cut(n);
        }
        let t0 = Instant::now();
        self.boot(n);
        // A guest booting after a power cut on a loaded machine has been seen to hang once: give it
        // a second boot before failing.
        let up = self
            .vm()
            .args(["wait", &n.to_string(), "240"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !up {
            eprintln!(
                "lab: node{n} did not answer after a restart; booting it again\n{}",
                self.console(n)
            );
            self.power_cut(n);
            let t1 = Instant::now();
            self.boot(n);
            self.wait_agent(n, t1);
        } else {
            self.boot_seconds.lock().unwrap()[n - 1] = t0.elapsed().as_secs_f64();
        }
        self.sh(
            n,
            "install -m755 /mnt/host/drbd-reactor /usr/local/bin/drbd-reactor && modprobe drbd && modprobe drbd_transport_tcp",
        );
    }

    /// Starts `drbdsetup events2 ARGS all` in guest n in the background, with stdin held open (drbdsetup
    /// exits at EOF on stdin).
    pub fn events2_capture(&self, n: usize, args: &str) -> Capture<'_> {
        let name = format!(
            "cap{}",
            CAPTURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.sh(
            n,
            &format!(
                "mkdir -p /root/cap; rm -f /run/{name}.in; mkfifo /run/{name}.in
                 setsid sleep 1000000 > /run/{name}.in < /dev/null 2>&1 & echo $! > /run/{name}.holder
                 setsid bash -c 'drbdsetup events2 \"$@\" all < /run/{name}.in > /root/cap/{name}.txt 2>&1 & echo $! > /run/{name}.pid; wait $!; echo $? > /run/{name}.rc' _ {args} > /dev/null 2>&1 &
                 for _ in $(seq 50); do [ -s /run/{name}.pid ] && break; sleep 0.05; done"
            ),
        );
        Capture {
            lab: self,
            node: n,
            name,
        }
    }

    /// Brings every guest back to a clean state: all guests running, links up, no agent unit, no
    /// resource, empty DRBD metadata for `res` (created with `create-md`).
    pub fn reset(&self) {
        for n in 1..=self.nodes {
            if !self.running(n) {
                self.restart(n);
            }
        }
        self.heal_all();
        for n in 1..=self.nodes {
            self.sh(
                n,
                "systemctl stop 'drbd-reactor-*' 'drbd-services@*' 'drbd-promote@*' 2>/dev/null; \
                 systemctl reset-failed 2>/dev/null; \
                 rm -rf /etc/drbd-reactor.d /run/systemd/system/drbd-* /run/systemd/system/*.d/reactor*.conf; \
                 systemctl daemon-reload; \
                 drbdsetup down all 2>/dev/null; drbdadm down all 2>/dev/null; \
                 rm -f /etc/drbd.d/*.res; true",
            );
        }
    }
}

/// The agent in a guest: file mode, the guest's own drbdsetup and system bus, run as a transient unit of
/// the guest's systemd (`drbd-reactor-agent.service`), its log in the guest's journal.
impl Lab {
    pub const AGENT_UNIT: &'static str = "drbd-reactor-agent.service";

    /// Writes the policies (file name, YAML) into guest n's /etc/drbd-reactor.d, replacing what was there.
    pub fn set_policies(&self, n: usize, policies: &[(&str, &str)]) {
        self.sh(
            n,
            "rm -rf /etc/drbd-reactor.d.new && mkdir -p /etc/drbd-reactor.d.new",
        );
        for (name, yaml) in policies {
            self.write(n, &format!("/etc/drbd-reactor.d.new/{name}"), yaml, 0o644);
        }
        self.sh(
            n,
            "rm -rf /etc/drbd-reactor.d && mv /etc/drbd-reactor.d.new /etc/drbd-reactor.d",
        );
    }

    /// Starts the agent in guest n with extra arguments (after the policy dir and drbdsetup); returns
    /// once `/readyz` answers 200, with the time that took.
    pub fn start_agent(&self, n: usize, extra: &str) -> Duration {
        self.start_agent_with(n, "", extra)
    }

    /// `start_agent` with extra `systemd-run` options for the agent's unit (e.g. `-E RUST_LOG=…`).
    pub fn start_agent_with(&self, n: usize, unit_options: &str, extra: &str) -> Duration {
        let t0 = Instant::now();
        self.sh(
            n,
            &format!(
                "mkdir -p /etc/drbd-reactor.d; systemctl reset-failed {u} 2>/dev/null; \
                 systemd-run --unit={u} {unit_options} -p KillMode=mixed -p TimeoutStopSec=20 \
                 /usr/local/bin/drbd-reactor agent --policy-dir /etc/drbd-reactor.d \
                 --drbdsetup drbdsetup --drbdadm drbdadm --host-exec '' --listen 127.0.0.1:9942 {extra}",
                u = Self::AGENT_UNIT
            ),
        );
        self.wait(
            n,
            "the agent's /readyz",
            "curl -sf localhost:9942/readyz >/dev/null",
            Duration::from_secs(60),
        );
        t0.elapsed()
    }

    /// SIGTERM to the agent (systemctl stop), waits until it exited.
    pub fn stop_agent(&self, n: usize) {
        self.sh(
            n,
            &format!("systemctl stop {} 2>/dev/null; true", Self::AGENT_UNIT),
        );
    }

    /// The agent's log (its unit's journal).
    pub fn agent_log(&self, n: usize) -> String {
        self.exec(
            n,
            &format!(
                "journalctl -u {} --no-pager -o cat 2>&1 | tail -n 200",
                Self::AGENT_UNIT
            ),
        )
        .unwrap_or_else(|e| e.output)
    }

    /// GET of an agent endpoint in guest n; the body.
    pub fn http(&self, n: usize, path: &str) -> String {
        self.sh(
            n,
            &format!("curl -sS --max-time 20 'http://127.0.0.1:9942{path}'"),
        )
    }

    pub fn http_json(&self, n: usize, path: &str) -> serde_json::Value {
        let body = self.http(n, path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("node{n} {path}: {e}: {body}"))
    }
}

static CAPTURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A running `drbdsetup events2` in a guest.
pub struct Capture<'a> {
    lab: &'a Lab,
    node: usize,
    name: String,
}

impl Capture<'_> {
    /// Writes `n` to drbdsetup's stdin (a statistics poll with `--poll`).
    pub fn poll(&self) {
        self.lab
            .sh(self.node, &format!("echo n > /run/{}.in", self.name));
    }

    /// What was printed so far.
    pub fn text(&self) -> String {
        self.lab
            .sh(self.node, &format!("cat /root/cap/{}.txt", self.name))
    }

    /// Whether drbdsetup still runs.
    pub fn alive(&self) -> bool {
        self.lab
            .exec(self.node, &format!("kill -0 $(cat /run/{}.pid)", self.name))
            .is_ok()
    }

    /// Closes drbdsetup's stdin (ends the holder); drbdsetup's exit code if it exited within 5 s.
    pub fn close_stdin(&self) -> Option<i32> {
        let out = self.lab.sh(
            self.node,
            &format!(
                "kill $(cat /run/{n}.holder); \
                 for _ in $(seq 50); do [ -s /run/{n}.rc ] && break; sleep 0.1; done; cat /run/{n}.rc 2>/dev/null; true",
                n = self.name
            ),
        );
        out.trim().parse().ok()
    }

    /// Stops drbdsetup and returns everything it printed.
    pub fn stop(self) -> String {
        self.lab.sh(
            self.node,
            &format!(
                "kill $(cat /run/{n}.pid) $(cat /run/{n}.holder) 2>/dev/null; sleep 0.3; cat /root/cap/{n}.txt",
                n = self.name
            ),
        )
    }
}
