//! Shared test helpers: a deterministic generator of valid events2 streams, free ports, polling, and
//! the external tools (promtool, prometheus) the tests use.
#![allow(dead_code)]

pub mod agent;
pub mod lab;
pub mod systemd;

/// `n` events2 lines that flip resource `name` between Primary and Secondary (each one a change).
pub fn role_flips(name: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            let role = if i % 2 == 0 { "Primary" } else { "Secondary" };
            format!("change resource name:{name} role:{role} suspended:no force-io-failures:no may_promote:no promotion_score:0\n")
        })
        .collect()
}

/// xorshift64*: deterministic, seedable, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const ROLES: &[&str] = &["Primary", "Secondary"];
const DISKS: &[&str] = &[
    "UpToDate",
    "Outdated",
    "Inconsistent",
    "Diskless",
    "DUnknown",
    "Consistent",
];
const CONNS: &[&str] = &[
    "Connected",
    "Connecting",
    "StandAlone",
    "NetworkFailure",
    "Unconnected",
];
const REPLS: &[&str] = &[
    "Established",
    "Off",
    "SyncSource",
    "SyncTarget",
    "PausedSyncS",
];

/// `--full` lines for a small cluster view, as drbdsetup would print them over time: resources appear and
/// disappear, roles, disks, connections and replication states change, statistics move, helpers run.
pub struct StreamGen {
    rng: Rng,
    resources: usize,
    peers: u32,
    volumes: u32,
    live: Vec<bool>,
    tick: u64,
}

impl StreamGen {
    pub fn new(seed: u64, resources: usize, peers: u32, volumes: u32) -> StreamGen {
        StreamGen {
            rng: Rng::new(seed),
            resources,
            peers,
            volumes,
            live: vec![false; resources],
            tick: 0,
        }
    }

    fn res_line(&mut self, verb: &str, r: usize) -> String {
        let role = *self.rng.pick(ROLES);
        let mp = if self.rng.chance(50) { "yes" } else { "no" };
        format!(
            "{verb} resource name:res{r} role:{role} suspended:no force-io-failures:no write-ordering:flush may_promote:{mp} promotion_score:{}",
            self.rng.below(3) * 10101
        )
    }

    fn dev_line(&mut self, verb: &str, r: usize, v: u32) -> String {
        let disk = *self.rng.pick(DISKS);
        let q = if self.rng.chance(80) { "yes" } else { "no" };
        self.tick += 1;
        format!(
            "{verb} device name:res{r} volume:{v} minor:{} backing_dev:/dev/vg/res{r}_{v} disk:{disk} client:no open:no quorum:{q} size:1048576 read:{} written:{} al-writes:1 bm-writes:0 upper-pending:0 lower-pending:0 al-suspended:no",
            1000 + r as u32 * 10 + v,
            self.tick * 4,
            self.tick * 8
        )
    }

    fn conn_line(&mut self, verb: &str, r: usize, p: u32) -> String {
        let c = *self.rng.pick(CONNS);
        let role = if c == "Connected" {
            *self.rng.pick(ROLES)
        } else {
            "Unknown"
        };
        format!(
            "{verb} connection name:res{r} peer-node-id:{p} conn-name:node{p} connection:{c} role:{role} congested:no ap-in-flight:{} rs-in-flight:0",
            self.rng.below(64)
        )
    }

    fn pd_line(&mut self, verb: &str, r: usize, p: u32, v: u32) -> String {
        let repl = *self.rng.pick(REPLS);
        let disk = *self.rng.pick(DISKS);
        self.tick += 1;
        let done = if repl.contains("Sync") {
            format!(" done:{}.{:02}", self.rng.below(100), self.rng.below(100))
        } else {
            String::new()
        };
        format!(
            "{verb} peer-device name:res{r} peer-node-id:{p} conn-name:node{p} volume:{v} replication:{repl} peer-disk:{disk} peer-client:no resync-suspended:no{done} received:{} sent:{} out-of-sync:{} pending:0 unacked:0",
            self.tick, self.tick * 2, self.rng.below(4096)
        )
    }

    fn path_line(&mut self, verb: &str, r: usize, p: u32) -> String {
        let e = if self.rng.chance(50) { "yes" } else { "no" };
        format!(
            "{verb} path name:res{r} peer-node-id:{p} conn-name:node{p} local:ipv4:10.0.0.1:{} peer:ipv4:10.0.0.{}:{} established:{e}",
            7000 + r, p + 1, 7000 + r
        )
    }

    /// The lines creating resource `r` with all its children.
    fn create(&mut self, verb: &str, r: usize) -> Vec<String> {
        let mut out = vec![self.res_line(verb, r)];
        for p in 1..=self.peers {
            out.push(self.conn_line(verb, r, p));
        }
        for v in 0..self.volumes {
            out.push(self.dev_line(verb, r, v));
        }
        for p in 1..=self.peers {
            for v in 0..self.volumes {
                out.push(self.pd_line(verb, r, p, v));
            }
            out.push(self.path_line(verb, r, p));
        }
        out
    }

    fn destroy(&mut self, r: usize) -> Vec<String> {
        let mut out = Vec::new();
        for p in 1..=self.peers {
            out.push(format!("destroy path name:res{r} peer-node-id:{p} conn-name:node{p} local:ipv4:10.0.0.1:{} peer:ipv4:10.0.0.{}:{}", 7000 + r, p + 1, 7000 + r));
            for v in 0..self.volumes {
                out.push(format!(
                    "destroy peer-device name:res{r} peer-node-id:{p} conn-name:node{p} volume:{v}"
                ));
            }
            out.push(format!(
                "destroy connection name:res{r} peer-node-id:{p} conn-name:node{p}"
            ));
        }
        for v in 0..self.volumes {
            out.push(format!("destroy device name:res{r} volume:{v}"));
        }
        out.push(format!("destroy resource name:res{r}"));
        out
    }

    /// The initial dump: `exists` for about half the resources, then `exists -`.
    pub fn initial(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for r in 0..self.resources {
            if self.rng.chance(50) {
                self.live[r] = true;
                out.extend(self.create("exists", r));
            }
        }
        out.push("exists -".to_string());
        out
    }

    /// One step of live changes (one or more lines).
    pub fn step(&mut self) -> Vec<String> {
        let r = self.rng.below(self.resources as u64) as usize;
        if !self.live[r] {
            self.live[r] = true;
            return self.create("create", r);
        }
        let p = 1 + self.rng.below(self.peers as u64) as u32;
        let v = self.rng.below(self.volumes as u64) as u32;
        match self.rng.below(20) {
            0 => {
                self.live[r] = false;
                self.destroy(r)
            }
            1..=3 => vec![self.res_line("change", r)],
            4..=6 => vec![self.dev_line("change", r, v)],
            7..=9 => vec![self.conn_line("change", r, p)],
            10..=14 => vec![self.pd_line("change", r, p, v)],
            15 => vec![self.path_line("change", r, p)],
            16 => vec![format!("call helper name:res{r} peer-node-id:{p} conn-name:node{p} volume:{v} helper:before-resync-target")],
            17 => vec![format!("response helper name:res{r} peer-node-id:{p} conn-name:node{p} volume:{v} helper:before-resync-target status:0")],
            _ => {
                // statistics only: the same states, counters moved
                self.tick += 1;
                vec![format!(
                    "change connection name:res{r} peer-node-id:{p} conn-name:node{p} ap-in-flight:{} rs-in-flight:0",
                    self.tick % 97
                )]
            }
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `f` every 50 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = std::time::Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The tool, or `None` (after a loud message) when it is missing outside CI. In CI a missing tool fails.
pub fn tool_or_skip(name: &str, test: &str) -> Option<std::path::PathBuf> {
    match find_tool(name) {
        Some(p) => Some(p),
        None if std::env::var_os("CI").is_some() => panic!(
            "{test}: `{name}` not found on PATH and CI is set: install it (apt-get install -y --no-install-recommends prometheus)"
        ),
        None => {
            eprintln!(
                "\n!!!!!!!! SKIPPED {test}: `{name}` not found on PATH (apt-get install -y --no-install-recommends prometheus) !!!!!!!!\n"
            );
            None
        }
    }
}
pub mod faithful;

/// Runs `drbd-sim --cluster DIR ARGS…` with stdin closed: exit code, stdout, stderr.
pub fn drbd_sim(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_drbd-sim"))
        .arg("--cluster")
        .arg(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run drbd-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `drbd_sim` that must exit 0; its stdout.
pub fn drbd_sim_ok(dir: &std::path::Path, args: &[&str]) -> String {
    let (code, out, err) = drbd_sim(dir, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}
