//! The HTTP server under hostile clients, against the agent binary with about 1000 resources (2 peers,
//! 2 volumes each, a live event stream) and a prometheus policy with `enums: true`:
//! - 30 clients that send `GET /metrics` and never read: the agent's peak RSS stays under 128 MiB, and
//!   once their responses timed out a normal scrape works again;
//! - slowloris (headers trickled one byte a second) and idle keep-alive: closed after the header timeout;
//! - 20 000 idle connections: `/healthz` answers within 1 s throughout, the agent keeps applying events
//!   and policies, and holds at most its connection limit;
//! - an HTTP/2 prior-knowledge preface (with a zero window) gets no HTTP/2 service.
//!
//! Every client connects to 127.0.0.1 only; every loop is bounded in count and time. The figures are
//! printed (`--nocapture`) and recorded in docs/reliability.md.

mod common;

use common::agent::Agent;
use common::{wait_until, StreamGen};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

fn write(p: &Path, s: &str) {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, s).unwrap();
    std::fs::rename(tmp, p).unwrap();
}

fn policy(dir: &Path, name: &str, spec: &str) {
    write(
        &dir.join(format!("{name}.yaml")),
        &format!(
            "apiVersion: reactor.drbd.io/v1alpha1\nkind: ReactorPolicy\nmetadata:\n  name: {name}\nspec:\n{spec}"
        ),
    );
}

/// A drbdsetup that prints an initial dump of about 1000 resources, then live changes in 600 chunks five
/// a second (two minutes), then stays quiet.
fn stream(dir: &Path) -> String {
    let mut g = StreamGen::new(15, 2000, 2, 2);
    let mut dump = g.initial().join("\n");
    dump.push('\n');
    std::fs::write(dir.join("dump"), dump).unwrap();
    let live = dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    for c in 0..600 {
        let mut chunk = String::new();
        for _ in 0..20 {
            for l in g.step() {
                chunk.push_str(&l);
                chunk.push('\n');
            }
        }
        std::fs::write(live.join(format!("{c:04}")), chunk).unwrap();
    }
    let script = dir.join("drbdsetup.sh");
    std::fs::write(
        &script,
        format!(
            "cat '{d}/dump'\nfor f in '{d}'/live/*; do cat \"$f\"; sleep 0.2; done\nexec sleep 100000\n",
            d = dir.display()
        ),
    )
    .unwrap();
    format!("/bin/sh {}", script.display())
}

/// The agent on the generated stream with a prometheus policy with enums, ready and exporting.
fn agent(dir: &Path, extra: &[&str]) -> Agent {
    let pol = dir.join("policies");
    std::fs::create_dir_all(&pol).unwrap();
    policy(&pol, "metrics", "  prometheus:\n    enums: true\n");
    let a = Agent::spawn(&pol, &stream(dir), extra);
    a.wait_for("ready with ~1000 resources", Duration::from_secs(60), |a| {
        a.get("/readyz").0 == 200
            && a.status()["resources"]
                .as_array()
                .is_some_and(|r| r.len() > 900)
    });
    // The exporter renders in the background: wait until the served rendering has them all too (a
    // scrape of an early, small rendering would fit in the socket buffers and never stall).
    a.wait_for(
        "/metrics with ~1000 resources",
        Duration::from_secs(60),
        |a| {
            a.metric("drbd_resource_resources")
                .is_some_and(|n| n > 900.0)
        },
    );
    a
}

/// (VmHWM, VmRSS) of a process, in bytes.
fn memory(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmHWM:"), kb("VmRSS:"))
}

/// Open descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One request on a new connection with `Connection: close`: (status, body bytes, time taken).
fn request(port: u16, path: &str, timeout: Duration) -> (u16, usize, Duration) {
    let t = Instant::now();
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout) else {
        return (0, 0, t.elapsed());
    };
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return (0, 0, t.elapsed());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let code = std::str::from_utf8(&buf[..buf.len().min(12)])
        .ok()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|c| c.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |p| buf.len() - p - 4);
    (code, body, t.elapsed())
}

fn lines(a: &Agent) -> u64 {
    a.status()["source"]["lines"].as_u64().unwrap_or(0)
}

/// Raises this process's open-file limit (inherited by the agent it starts) to at least `want` when it
/// can; returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        let raised = libc::rlimit {
            rlim_cur: want.max(r.rlim_cur),
            rlim_max: want.max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// A connection to 127.0.0.1:`port` from 127.0.0.`src` (the port chosen at connect time).
fn connect_from(src: u8, port: u16) -> Option<TcpStream> {
    use std::os::fd::FromRawFd;
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let addr = |a: [u8; 4], p: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: p.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(a),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let local = addr([127, 0, 0, src], 0);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return None;
        }
        let remote = addr([127, 0, 0, 1], port);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return None;
        }
        Some(stream)
    }
}

#[test]
fn stalled_metrics_readers_do_not_grow_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["--http-response-timeout", "5"]);
    let pid = agent.child.id();
    // A full scrape: how big the text body is.
    let (code, size, took) = request(agent.port, "/metrics", Duration::from_secs(30));
    assert_eq!(code, 200);
    let (hwm0, rss0) = memory(pid);
    eprintln!(
        "figure: /metrics text body {:.1} MiB (first scrape {took:?}); agent VmHWM {} MiB, VmRSS {} MiB before the stalled readers",
        size as f64 / MIB as f64,
        hwm0 / MIB,
        rss0 / MIB
    );

    // 30 clients ask for the text body and never read (small receive buffers: the body stays in the agent).
    let mut stalled = Vec::new();
    for _ in 0..30 {
        let s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
        s.set_nodelay(true).unwrap();
        (&s).write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        stalled.push(s);
    }
    let mut hwm = 0;
    let mut healthz_max = Duration::ZERO;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        let (code, _, took) = request(agent.port, "/healthz", Duration::from_secs(5));
        assert_eq!(code, 200, "/healthz while 30 readers stall");
        healthz_max = healthz_max.max(took);
        hwm = hwm.max(memory(pid).0);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (hwm1, rss1) = memory(pid);
    // The requests beyond the limit were answered 503 at once: a normal scrape gets 503 too while the
    // stalled responses hold the places.
    let (busy, _, _) = request(agent.port, "/metrics", Duration::from_secs(5));
    eprintln!(
        "figure: 30 stalled /metrics readers: agent VmHWM {} MiB, VmRSS {} MiB; /healthz max {healthz_max:?}; a scrape meanwhile: {busy}",
        hwm1 / MIB,
        rss1 / MIB
    );
    assert!(hwm1 < 128 * MIB, "peak RSS {} MiB", hwm1 / MIB);
    assert!(healthz_max < Duration::from_secs(1));
    assert!(busy == 503 || busy == 200, "{busy}");

    // After the response timeout the stalled connections are closed and scrapes work again.
    assert!(
        wait_until(Duration::from_secs(15), || request(
            agent.port,
            "/metrics",
            Duration::from_secs(30)
        )
        .0 == 200),
        "a scrape after the stalled readers were dropped"
    );
    // Every stalled response has passed its 5 s deadline by now (the last was accepted a few seconds
    // after the first; reading one earlier would let it finish its body within its deadline).
    std::thread::sleep(Duration::from_secs(6));
    let mut closed = 0;
    for s in &stalled {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        // Whatever was in flight, then the end of the stream (or a reset).
        let mut n = 0;
        loop {
            match (&*s).read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
            if n > 64 * 1024 * 1024 {
                break;
            }
        }
        if n < size {
            closed += 1;
        }
    }
    eprintln!("figure: stalled readers cut before the end of their body: {closed} of 30");
    assert_eq!(closed, 30);
}

#[test]
fn slowloris_and_idle_connections_are_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["--http-header-timeout", "3"]);
    let req = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n\r\n";
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    let t = Instant::now();
    let mut sent = 0;
    let closed = loop {
        assert!(t.elapsed() < Duration::from_secs(20), "never closed");
        if sent < req.len() && s.write_all(&req[sent..sent + 1]).is_ok() {
            sent += 1;
        }
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(0) => break t.elapsed(),
            Ok(n) => {
                // hyper answers a timed-out head with 408 before closing.
                let r = String::from_utf8_lossy(&b[..n]).to_string();
                assert!(r.starts_with("HTTP/1.1 408"), "{r}");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break t.elapsed(),
        }
    };
    eprintln!(
        "figure: slowloris (1 byte/s, header timeout 3 s) closed after {closed:?}, {sent} of {} bytes sent",
        req.len()
    );
    assert!(sent < req.len());
    assert!(closed >= Duration::from_secs(2) && closed < Duration::from_secs(6));

    // An idle keep-alive connection: one request, then nothing.
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut all = Vec::new();
    let mut b = [0u8; 1024];
    while let Ok(n) = s.read(&mut b) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&b[..n]);
    }
    let idle = t.elapsed();
    eprintln!("figure: idle keep-alive connection closed after {idle:?}");
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    assert!(idle >= Duration::from_secs(2) && idle < Duration::from_secs(6));
}

#[test]
fn twenty_thousand_idle_connections_leave_healthz_events_and_policies_working() {
    const N: usize = 20_000;
    let nofile = raise_nofile(N as u64 + 2048);
    let want = N.min(nofile.saturating_sub(512) as usize);
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    let pid = agent.child.id();
    let port = agent.port;
    let lines0 = lines(&agent);

    // A prober: /healthz every 100 ms on a new connection, recording the slowest answer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut n, mut failed, mut max) = (0, 0, Duration::ZERO);
            let t = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && t.elapsed() < Duration::from_secs(120)
            {
                let (code, _, took) = request(port, "/healthz", Duration::from_secs(5));
                n += 1;
                if code != 200 {
                    failed += 1;
                }
                max = max.max(took);
                std::thread::sleep(Duration::from_millis(100));
            }
            (n, failed, max)
        })
    };

    let t = Instant::now();
    let mut conns = Vec::with_capacity(want);
    let mut errors = 0;
    while conns.len() < want && t.elapsed() < Duration::from_secs(60) && errors < 1000 {
        // From 127.0.0.2..=127.0.0.41 in turn: one source address's ephemeral ports would make the
        // kernel's port search slow (and the range small) at this count.
        match connect_from(2 + (conns.len() % 40) as u8, port) {
            Some(s) => conns.push(s),
            None => errors += 1,
        }
    }
    let opened = t.elapsed();
    let agent_fds = fds(pid);
    // While they are held: a new policy is applied and events keep being applied.
    let pol = dir.path().join("policies");
    policy(&pol, "debug", "  debugger:\n    output: log\n");
    let applied = wait_until(Duration::from_secs(20), || {
        agent.status()["policies"]["applied"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p == "debug"))
    });
    let lines1 = lines(&agent);
    std::thread::sleep(Duration::from_secs(2));
    let agent_fds_later = fds(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (probes, failed, max) = prober.join().unwrap();
    let (hwm, _) = memory(pid);
    let held = conns.len();
    drop(conns);
    eprintln!(
        "figure: {held} idle connections opened in {opened:?} ({errors} connect errors); agent fds {agent_fds} then {agent_fds_later}; \
         /healthz: {probes} probes, {failed} failed, slowest {max:?}; lines {lines0} -> {lines1}; new policy applied: {applied}; VmHWM {} MiB",
        hwm / MIB
    );
    assert!(held >= want * 9 / 10, "only {held} connections opened");
    assert_eq!(failed, 0);
    assert!(max < Duration::from_secs(1), "slowest /healthz {max:?}");
    assert!(lines1 > lines0, "events kept being applied");
    assert!(applied, "the new policy was applied");
    assert!(
        agent_fds_later < 512 + 100,
        "agent holds {agent_fds_later} fds"
    );
    assert_eq!(request(port, "/healthz", Duration::from_secs(2)).0, 200);
}

#[test]
fn http2_prior_knowledge_gets_no_http2_service() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The client preface, then SETTINGS with INITIAL_WINDOW_SIZE 0 and MAX_CONCURRENT_STREAMS 100.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 12, 4, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 4, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
    s.write_all(&hello).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let head = String::from_utf8_lossy(&got[..got.len().min(40)]).to_string();
    eprintln!("figure: HTTP/2 preface answered with {:?}", head);
    // No SETTINGS frame (type 4 at offset 3): either closed or an HTTP/1.1 error.
    assert!(got.is_empty() || head.starts_with("HTTP/1.1 "), "{head:?}");
    assert!(got.len() < 4 || got[3] != 4 || head.starts_with("HTTP/1.1 "));
    assert_eq!(
        request(agent.port, "/healthz", Duration::from_secs(2)).0,
        200
    );
}
