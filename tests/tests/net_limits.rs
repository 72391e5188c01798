//! The recovery server before authentication, and what the agent and the recovery commands say
//! when something is wrong.
//!
//! - `idle_connections_are_bounded`: 1,000 TCP connections that never start TLS cost the server
//!   at most `--max-handshakes` threads and a bounded RSS, are closed by the handshake deadline,
//!   and a real agent still connects and commits a point while they are open.
//! - `the_agent_stops_on_sigterm`: "agent stopping on SIGTERM", exit 0.
//! - `read_commands_name_a_missing_store`: `points`, `restore`, `export`, `failover` on a
//!   directory that does not exist say "no store at DIR", with the OS error at most once.

use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use siterep_tests::image::{self, MIB};
use siterep_tests::replication::{AgentCmd, Certs, RecoveryServer};
use siterep_tests::{
    json_str, json_u64, poll, run, run_unchecked, scratch_dir, siterep, Serve, COMMAND_TIMEOUT,
};

/// `Threads` and `VmRSS` (KiB) of process `pid`.
fn threads_and_rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("Threads:"), field("VmRSS:"))
}

const MAX_HANDSHAKES: u64 = 64;
const IDLE: usize = 1000;

#[test]
fn idle_connections_are_bounded() {
    let dir = scratch_dir("net-idle");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let server = RecoveryServer::start(
        &d.join("store"),
        &certs,
        &["--max-handshakes", &MAX_HANDSHAKES.to_string(), "--handshake-timeout", "3s"],
    );
    let (threads0, rss0) = threads_and_rss(server.pid());
    let t0 = Instant::now();

    // Connections that never send a byte; the test keeps its ends open throughout. The
    // server's threads and RSS are sampled as they arrive (the first ones reach their
    // deadline before the last ones are open).
    let mut idle = Vec::with_capacity(IDLE);
    let (mut threads_max, mut rss_max) = (threads0, rss0);
    let mut sample = || {
        let (t, r) = threads_and_rss(server.pid());
        threads_max = threads_max.max(t);
        rss_max = rss_max.max(r);
    };
    for i in 0..IDLE {
        match TcpStream::connect_timeout(&server.addr(), Duration::from_secs(5)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("idle connection {i}: {e}"),
        }
        if i % 20 == 0 {
            sample();
        }
    }
    eprintln!("{IDLE} connections opened in {:?}", t0.elapsed());
    // Samples for a second while the connections sit idle (a measurement over time, not a wait).
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        sample();
    }
    eprintln!(
        "{IDLE} idle connections: threads {threads0} -> at most {threads_max}, RSS {rss0} KiB -> at \
         most {rss_max} KiB (+{} KiB)",
        rss_max - rss0
    );
    // One thread per connection in its handshake, at most MAX_HANDSHAKES of them.
    assert!(
        threads_max <= threads0 + MAX_HANDSHAKES,
        "{threads_max} server threads with {IDLE} idle connections (before: {threads0}, \
         --max-handshakes {MAX_HANDSHAKES})"
    );
    // 64 handshakes cost well under 16 MiB (a few pages of stack and rustls state each).
    assert!(
        rss_max <= rss0 + 16 * 1024,
        "server RSS {rss_max} KiB with {IDLE} idle connections (before: {rss0} KiB)"
    );

    // A real agent gets through while they are open: the slots free up at the deadline at the
    // latest, and a refused attempt is retried (0.6 s, 1.2 s, ... with --retry-scale 0.01).
    let img = d.join("disk.img");
    image::create_sparse(&img, 16 * MIB);
    image::write_at(&img, MIB, &vec![0x5a; MIB as usize]);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let start = Instant::now();
    let summary = AgentCmd::new(shim.socket(), server.addr(), "d1", &certs)
        .args(["--retry-scale", "0.01", "--max-retries", "8"])
        .once();
    let took = start.elapsed();
    eprintln!("the agent committed point {} after {took:?}", json_u64(&summary, "point"));
    assert_eq!(json_str(&summary, "kind"), "initial", "{summary:?}");
    assert!(took < Duration::from_secs(30), "the agent took {took:?} to commit a point");

    let (threads2, _) = threads_and_rss(server.pid());
    assert!(threads2 <= threads0 + MAX_HANDSHAKES, "{threads2} server threads after the agent");
    let log = server.log();
    assert!(log.contains("--max-handshakes"), "no warning about refused connections:\n{log}");
    assert!(log.contains("handshake failed"), "no failed handshake logged:\n{log}");
    // The certificate's identity is logged, the Hello name only as what the agent claims.
    let connected = log.lines().find(|l| l.contains("agent connected")).expect("an 'agent connected' line");
    assert!(
        connected.contains("cert_cn=") && connected.contains("fingerprint=") && connected.contains("claims="),
        "{connected}"
    );
    drop(idle);
    let t1 = Instant::now();
    server.stop();
    eprintln!("the server stopped in {:?}", t1.elapsed());
}

#[test]
fn the_agent_stops_on_sigterm() {
    let dir = scratch_dir("net-sigterm");
    let d = dir.path();
    let port = siterep_tests::free_tcp_port();
    let log = d.join("agent.log");
    let file = std::fs::File::create(&log).unwrap();
    // Nothing listens on the port: the agent waits to retry.
    let mut child = siterep()
        .args(["agent", "--log", "info", "--insecure", "--disk", "d1", "--socket"])
        .arg(d.join("shim.sock"))
        .args(["--server", &format!("127.0.0.1:{port}")])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("start the agent");
    let failed =
        poll(Duration::from_secs(20), || std::fs::read_to_string(&log).unwrap().contains("retrying in"));
    assert!(failed.is_some(), "the agent never failed:\n{}", std::fs::read_to_string(&log).unwrap());
    run(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let status = siterep_tests::wait_timeout(&mut child, Duration::from_secs(10));
    let text = std::fs::read_to_string(&log).unwrap();
    if status.is_none() {
        let _ = child.kill();
    }
    assert!(status.is_some_and(|s| s.success()), "agent after SIGTERM: {status:?}\n{text}");
    assert!(text.contains("agent stopping on SIGTERM"), "{text}");
}

#[test]
fn read_commands_name_a_missing_store() {
    let dir = scratch_dir("net-nostore");
    let d = dir.path();
    let store = d.join("missing");
    let s = store.to_str().unwrap();
    let out = d.join("out.img");
    let o = out.to_str().unwrap();
    let sock = d.join("x.sock");
    let k = sock.to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["points", "--store", s, "--disk", "d1"],
        &["restore", "--store", s, "--disk", "d1", "--point", "latest", "--out", o],
        &["export", "--store", s, "--disk", "d1", "--point", "latest", "--socket", k],
        &["failover", "--store", s, "--disk", "d1", "--point", "latest", "--image", o, "--socket", k],
    ];
    for args in commands {
        let ran = run_unchecked(siterep().args(args), COMMAND_TIMEOUT);
        let err = String::from_utf8_lossy(&ran.stderr);
        assert!(!ran.status.success(), "{args:?} succeeded");
        assert!(err.contains(&format!("no store at {s}")), "{args:?}: {err}");
        assert!(!err.contains("not empty"), "{args:?}: {err}");
        assert!(err.matches("os error").count() <= 1, "{args:?} repeats an OS error: {err}");
    }
    assert!(!Path::new(o).exists());
}
