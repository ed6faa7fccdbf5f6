//! The agent binary as a child process, for end-to-end tests: start it in file mode, query its HTTP
//! endpoints, read its metrics, collect its output, stop it.

use super::{free_port, wait_until};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const AGENT: &str = env!("CARGO_BIN_EXE_drbd-reactor");
pub const SIM: &str = env!("CARGO_BIN_EXE_drbd-sim");

pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

pub fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

impl Agent {
    /// The agent in file mode with `drbd-sim --replay SCRIPT` as its drbdsetup.
    pub fn start(policy_dir: &Path, script: &Path, extra: &[&str]) -> Agent {
        Agent::spawn(
            policy_dir,
            &format!("{SIM} --replay {}", script.display()),
            extra,
        )
    }

    /// The agent in file mode with any drbdsetup command line.
    pub fn spawn(policy_dir: &Path, drbdsetup: &str, extra: &[&str]) -> Agent {
        Agent::spawn_on(policy_dir, drbdsetup, free_port(), extra)
    }

    /// The agent in file mode listening on 127.0.0.1:`port`.
    pub fn spawn_on(policy_dir: &Path, drbdsetup: &str, port: u16, extra: &[&str]) -> Agent {
        let mut child = Command::new(AGENT)
            .arg("agent")
            .arg("--policy-dir")
            .arg(policy_dir)
            .arg("--drbdsetup")
            .arg(drbdsetup)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Agent {
            child,
            port,
            stdout,
            stderr,
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match reqwest::blocking::get(format!("http://127.0.0.1:{}{path}", self.port)) {
            Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status").1).unwrap_or(serde_json::Value::Null)
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Agent) -> bool) {
        if !wait_until(timeout, || f(self)) {
            panic!(
                "timed out waiting for {what}; stderr:\n{}",
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics").1;
        body.lines()
            .find(|l| l.split(' ').next() == Some(name))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    pub fn terminate(mut self) -> (std::process::ExitStatus, Duration) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, t.elapsed());
            }
            if t.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                panic!("agent did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
