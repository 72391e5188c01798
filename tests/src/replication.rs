//! Replication end to end: certificates, the recovery server (`siterep server`), agents
//! (`siterep agent`), recovery points and restores, a fio load, a TCP proxy that can throttle
//! and cut connections, and waiting until a shim's changes are all replicated.
//!
//! - [`Certs`]: a private CA with server and agent certificates (`scripts/make-certs`).
//! - [`RecoveryServer`]: `siterep server` on a store and a free loopback port; SIGKILL it and
//!   start it again on the same store and port.
//! - [`AgentCmd`] / [`AgentProcess`]: `siterep agent` once (its JSON summary) or running.
//! - [`points`], [`restore`], [`assert_same_files`]: the recovery site's view, and comparing
//!   images without holding them in memory.
//! - [`Proxy`]: a TCP forwarder between agents and server that can limit the agents' upload
//!   rate and drop every connection on demand.
//! - [`FioLoad`]: a rate-limited random-write load through fio's nbd engine until stopped.
//! - [`wait_replicated`]: until the shim reports no backlog, no unreleased generation, and a
//!   replicated point cut after a given moment.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::{control, describe, free_tcp_port, json_u64, parse_json, poll, require_tool, run, show_output};
use crate::{run_unchecked, siterep, siterep_bin, sys, tool, wait_timeout, COMMAND_TIMEOUT, SERVER_TIMEOUT};

/// Milliseconds since the Unix epoch, the clock the shim stamps its cuts with.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// The workspace root (where `scripts/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// `scripts/make-certs DIR`: `ca.pem`, `server.pem`/`.key` (localhost, 127.0.0.1) and
/// `agent.pem`/`.key`, all chained to the directory's own CA.
#[derive(Debug, Clone)]
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes a new CA and its certificates in `dir` (created if missing).
    #[track_caller]
    pub fn make(dir: &Path) -> Certs {
        require_tool("openssl");
        run(Command::new(workspace_root().join("scripts/make-certs")).arg(dir));
        let certs = Certs { dir: dir.to_owned() };
        for f in [certs.ca(), certs.server_cert(), certs.server_key(), certs.agent_cert(), certs.agent_key()]
        {
            assert!(f.is_file(), "scripts/make-certs did not create {}", f.display());
        }
        certs
    }

    /// `siterep certs init DIR --agent NAME=DISKS...`: a CA, the server certificate, one agent
    /// certificate per `agents` entry (`agent-NAME.pem`/`.key`, see [`Certs::agent`]) and
    /// `enrollment.json` for `siterep server --enrollment`.
    #[track_caller]
    pub fn init(dir: &Path, agents: &[&str]) -> Certs {
        let mut cmd = siterep();
        cmd.args(["certs", "init"]).arg(dir);
        for a in agents {
            cmd.arg("--agent").arg(a);
        }
        run(&mut cmd);
        let certs = Certs { dir: dir.to_owned() };
        for f in [certs.ca(), certs.server_cert(), certs.server_key(), certs.enrollment()] {
            assert!(f.is_file(), "siterep certs init did not create {}", f.display());
        }
        certs
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The certificate and key of agent `name` made by [`Certs::init`].
    pub fn agent(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("agent-{name}.pem")), self.dir.join(format!("agent-{name}.key")))
    }
    /// The enrollment file made by [`Certs::init`].
    pub fn enrollment(&self) -> PathBuf {
        self.dir.join("enrollment.json")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn agent_cert(&self) -> PathBuf {
        self.dir.join("agent.pem")
    }
    pub fn agent_key(&self) -> PathBuf {
        self.dir.join("agent.key")
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

fn exited_by_signal(status: ExitStatus, signal: libc::c_int) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal)
}

fn append_log(path: &Path, banner: &str) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    writeln!(f, "===== {banner} =====").expect("write log banner");
    f
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The recovery server

/// A running `siterep server --store STORE --listen 127.0.0.1:PORT` with mutual TLS. Dropping
/// it sends SIGTERM and (unless the test is already failing) asserts it exits 0.
#[derive(Debug)]
pub struct RecoveryServer {
    child: Option<Child>,
    args: Vec<OsString>,
    addr: SocketAddr,
    store: PathBuf,
    log: PathBuf,
    starts: usize,
}

impl RecoveryServer {
    /// Starts a server on `store` (created if missing) with `certs`' server certificate,
    /// trusting `certs`' CA, plus `extra` arguments (e.g. `--retain-count 3`). Its log is
    /// `LOG_DIR/server.log` where LOG_DIR is the store's parent.
    #[track_caller]
    pub fn start(store: &Path, certs: &Certs, extra: &[&str]) -> RecoveryServer {
        let log = store.parent().expect("store has a parent").join("server.log");
        let mut last = String::new();
        // A port that was free a moment ago may be taken by the time the server binds it.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let mut args: Vec<OsString> = vec![
                "server".into(),
                "--log".into(),
                "info".into(),
                "--store".into(),
                store.into(),
                "--listen".into(),
                addr.to_string().into(),
                "--tls-cert".into(),
                certs.server_cert().into(),
                "--tls-key".into(),
                certs.server_key().into(),
                "--tls-ca".into(),
                certs.ca().into(),
            ];
            args.extend(extra.iter().map(OsString::from));
            let mut server = RecoveryServer {
                child: None,
                args,
                addr,
                store: store.to_owned(),
                log: log.clone(),
                starts: 0,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) if e.contains("cannot listen") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("siterep server could not bind a free port:\n{last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "server already running");
        self.starts += 1;
        let log = append_log(&self.log, &format!("server start {}", self.starts));
        let mut cmd = Command::new(siterep_bin());
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone().expect("dup")).stderr(log);
        let line = describe(&cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
        let outcome = poll(SERVER_TIMEOUT, || {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Some(Err(status));
            }
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok().then_some(Ok(()))
        });
        match outcome {
            Some(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            Some(Err(status)) => {
                Err(format!("siterep server exited with {status} before listening: {line}\n{}", self.log()))
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!("siterep server not listening after {SERVER_TIMEOUT:?}: {line}\n{}", self.log()))
            }
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    /// Everything every run of this server logged.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// SIGKILL (a crash: no shutdown code runs) and reap; fails the test unless it was running
    /// and died of that signal.
    #[track_caller]
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("siterep server had already exited with {status} before SIGKILL\n{}", self.log());
        }
        sys::kill(child.id(), libc::SIGKILL).expect("SIGKILL the server");
        let status = child.wait().expect("wait for the killed server");
        assert!(exited_by_signal(status, libc::SIGKILL), "server exit after SIGKILL: {status}");
    }

    /// Starts the server again with the same store, port and arguments (after [`Self::kill`]).
    #[track_caller]
    pub fn restart(&mut self) {
        if let Err(e) = self.spawn() {
            panic!("{e}");
        }
    }

    /// SIGTERM; the server must exit 0 within [`SERVER_TIMEOUT`].
    #[track_caller]
    pub fn stop(mut self) {
        match self.terminate() {
            Some(s) if s.success() => {}
            other => panic!(
                "siterep server after SIGTERM: {other:?} (None: killed after the timeout)\n{}",
                self.log()
            ),
        }
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        crate::terminate_child(self.child.take()?)
    }
}

impl Drop for RecoveryServer {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let status = self.terminate();
        if std::thread::panicking() {
            eprintln!("--- siterep server log ---\n{}", self.log());
            return;
        }
        match status {
            Some(s) if s.success() => {}
            other => panic!(
                "siterep server after SIGTERM: {other:?} (None: killed after the timeout)\n{}",
                self.log()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

/// The command line of one `siterep agent` (builder).
#[derive(Debug, Clone)]
pub struct AgentCmd {
    socket: PathBuf,
    server: String,
    disk: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    extra: Vec<OsString>,
}

impl AgentCmd {
    /// An agent for the shim serving on `socket` (control socket `socket.ctl`), replicating to
    /// `server` as disk `disk`, with `certs`' agent certificate.
    pub fn new(socket: &Path, server: SocketAddr, disk: &str, certs: &Certs) -> AgentCmd {
        AgentCmd {
            socket: socket.to_owned(),
            server: server.to_string(),
            disk: disk.to_owned(),
            cert: certs.agent_cert(),
            key: certs.agent_key(),
            ca: certs.ca(),
            extra: Vec::new(),
        }
    }

    /// Connect to this address instead (e.g. a [`Proxy`]).
    pub fn server(mut self, addr: SocketAddr) -> AgentCmd {
        self.server = addr.to_string();
        self
    }

    /// Other TLS files than the ones of [`AgentCmd::new`].
    pub fn tls(mut self, cert: &Path, key: &Path, ca: &Path) -> AgentCmd {
        self.cert = cert.to_owned();
        self.key = key.to_owned();
        self.ca = ca.to_owned();
        self
    }

    /// Further arguments (e.g. `--interval 1s`).
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> AgentCmd {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// The whole command (logging at `info`, which the tests read).
    pub fn command(&self) -> Command {
        let mut cmd = siterep();
        cmd.args(["agent", "--log", "info", "--socket"])
            .arg(&self.socket)
            .arg("--server")
            .arg(&self.server)
            .arg("--disk")
            .arg(&self.disk)
            .arg("--tls-cert")
            .arg(&self.cert)
            .arg("--tls-key")
            .arg(&self.key)
            .arg("--tls-ca")
            .arg(&self.ca)
            .args(&self.extra);
        cmd
    }

    /// `--once`: one cycle; fails the test unless it exits 0 with its JSON summary on stdout.
    #[track_caller]
    pub fn once(&self) -> Value {
        let mut cmd = self.command();
        cmd.arg("--once");
        let out = run(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| {
            panic!("agent --once printed no JSON summary ({e}): {}\n{}", describe(&cmd), show_output(&out))
        })
    }

    /// Starts the agent in the background, its output appended to `log`.
    #[track_caller]
    pub fn spawn(&self, log: &Path) -> AgentProcess {
        let mut cmd = self.command();
        let file = append_log(log, &format!("agent {}", describe(&cmd)));
        cmd.stdin(Stdio::null()).stdout(file.try_clone().expect("dup")).stderr(file);
        let command_line = describe(&cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        AgentProcess { child: Some(child), log: log.to_owned(), command_line }
    }
}

/// A running `siterep agent`; dropping it kills it.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    log: PathBuf,
    command_line: String,
}

impl AgentProcess {
    /// Everything logged to this agent's log file (by every agent that shares it).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Fails the test (with the log) if the agent has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("agent started");
        if let Some(status) = child.try_wait().expect("try_wait") {
            self.child = None;
            panic!("agent exited with {status}: {}\n{}", self.command_line, self.log());
        }
    }

    /// SIGKILL and reap; fails the test unless the agent was still running.
    #[track_caller]
    pub fn kill(mut self) {
        self.assert_running();
        let mut child = self.child.take().expect("agent running");
        sys::kill(child.id(), libc::SIGKILL).expect("SIGKILL the agent");
        let status = child.wait().expect("wait for the agent");
        assert!(exited_by_signal(status, libc::SIGKILL), "agent exit after SIGKILL: {status}");
    }

    /// Waits for the agent to exit on its own, up to `timeout`; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let status = wait_timeout(self.child.as_mut().expect("agent started"), timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!("--- agent log {} ---\n{}", self.log.display(), read_log(&self.log));
            }
        }
    }
}

/// The recovery points the agent log at `log` says it committed (lines `... committed ...
/// point=N ...`), in order.
pub fn committed_points_in_log(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("committed"))
        .filter_map(|l| {
            l.split_whitespace().find_map(|w| w.strip_prefix("point=")).and_then(|v| v.parse().ok())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The recovery site: points and restores

/// `siterep points --store STORE --disk DISK --json`: the disk's points, oldest first.
#[track_caller]
pub fn points(store: &Path, disk: &str) -> Vec<Value> {
    let out = run(siterep().args(["points", "--json", "--store"]).arg(store).args(["--disk", disk]));
    match parse_json("siterep points --json", &out.stdout) {
        Value::Array(points) => points,
        other => panic!("siterep points --json printed no list: {other}"),
    }
}

/// Like [`points`], but an empty list when the store does not know the disk (yet).
#[track_caller]
pub fn points_if_any(store: &Path, disk: &str) -> Vec<Value> {
    if !store.join("disks").join(disk).join("disk.json").exists() {
        return Vec::new();
    }
    points(store, disk)
}

/// `siterep restore --store STORE --disk DISK --point POINT --output OUT`; its JSON report.
#[track_caller]
pub fn restore(store: &Path, disk: &str, point: &str, output: &Path) -> Value {
    let out = run(siterep()
        .args(["restore", "--store"])
        .arg(store)
        .args(["--disk", disk, "--point", point, "--output"])
        .arg(output));
    parse_json("siterep restore", &out.stdout)
}

/// Asserts two files hold the same bytes, reading them in pieces; names the first and last
/// differing offsets and how many 4 KiB blocks differ.
#[track_caller]
pub fn assert_same_files(what: &str, actual: &Path, expected: &Path) {
    if let Some(diff) = compare_files(actual, expected) {
        panic!("{what}: {} differs from {}: {diff}", actual.display(), expected.display());
    }
}

/// `None` if the two files are identical, else a description of the difference.
pub fn compare_files(a: &Path, b: &Path) -> Option<String> {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (la, lb) = (fa.metadata().expect("stat").len(), fb.metadata().expect("stat").len());
    if la != lb {
        return Some(format!("lengths {la} and {lb}"));
    }
    const PIECE: usize = 4 << 20;
    let (mut ba, mut bb) = (vec![0u8; PIECE], vec![0u8; PIECE]);
    let mut pos = 0u64;
    let (mut first, mut last, mut blocks) = (None, 0u64, 0u64);
    while pos < la {
        let n = PIECE.min((la - pos) as usize);
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
                if x != y {
                    let off = pos + i as u64 * 4096;
                    let at = x.iter().zip(y).position(|(p, q)| p != q).expect("differs") as u64;
                    first.get_or_insert(off + at);
                    last = off;
                    blocks += 1;
                }
            }
        }
        pos += n as u64;
    }
    first.map(|f| {
        format!("{blocks} 4 KiB blocks differ, the first at byte {f}, the last in the block at {last}")
    })
}

/// Bytes of `path` that hold data per `SEEK_DATA`/`SEEK_HOLE`.
pub fn allocated_bytes(path: &Path) -> u64 {
    crate::image::seek_layout(path).iter().filter(|r| r.data).map(|r| r.length).sum()
}

// ---------------------------------------------------------------------------------------------
// The shim's side

/// The shim's `status` (raw control request: faster than a process per poll).
#[track_caller]
pub fn shim_status(socket: &Path) -> Value {
    control::request_ok(&control::control_path(socket), r#"{"cmd":"status"}"#)
}

/// Waits until the shim serving on `socket` has nothing left to replicate: no backlog, no
/// unreleased generation, and its last replicated point was cut at or after `since_ms` (so
/// it holds every write acknowledged before then). Returns that status; fails the test after
/// `timeout` with the last status seen.
#[track_caller]
pub fn wait_replicated(socket: &Path, since_ms: u64, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let found = poll(timeout, || {
        let st = shim_status(socket);
        if replicated_since(&st, since_ms) {
            return Some(st);
        }
        last = st;
        None
    });
    found.unwrap_or_else(|| {
        panic!(
            "the shim at {} was not fully replicated (cut at or after {since_ms}) within {timeout:?}: {last}",
            socket.display()
        )
    })
}

/// Whether the shim status `st` shows no backlog, no unreleased generation and a last
/// replicated point cut at or after `since_ms`.
pub fn replicated_since(st: &Value, since_ms: u64) -> bool {
    let cut = match &st["last_replicated"] {
        Value::Null => None,
        p => Some(json_u64(p, "cut_unix_ms")),
    };
    json_u64(st, "backlog_bytes") == 0 && generations(st).is_empty() && cut.is_some_and(|c| c >= since_ms)
}

/// The `generations` list of a shim status.
#[track_caller]
pub fn generations(st: &Value) -> &Vec<Value> {
    st["generations"].as_array().unwrap_or_else(|| panic!("no generations list in the status {st}"))
}

// ---------------------------------------------------------------------------------------------
// Load

/// `fio --ioengine=nbd` random writes of pseudo-random data against `uri`, rate-limited, until
/// [`FioLoad::stop`] (or `runtime`).
#[derive(Debug)]
pub struct FioLoad {
    child: Option<Child>,
    log: PathBuf,
}

impl FioLoad {
    /// Starts fio on `uri` (a disk of `size` bytes) writing `bs` blocks at `rate` (e.g. "15m")
    /// for at most `runtime`; fio's output goes to `log`.
    #[track_caller]
    pub fn start(uri: &str, size: u64, bsrange: &str, rate: &str, runtime: Duration, log: &Path) -> FioLoad {
        let file = append_log(log, "fio");
        let fio = require_tool("fio");
        // Under `timeout`: a fio whose test died without stopping it (and whose NBD server
        // vanished) would otherwise spin, appending errors to its log, until the disk is full.
        let mut cmd = Command::new("timeout");
        cmd.arg("--kill-after=10s")
            .arg(format!("{}s", runtime.as_secs() + 120))
            .arg(fio)
            .current_dir(log.parent().expect("log dir"))
            .arg("--name=load")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={uri}"))
            .args(["--rw=randwrite", "--iodepth=8", "--randrepeat=0", "--refill_buffers", "--norandommap"])
            .arg(format!("--bsrange={bsrange}"))
            .arg(format!("--size={size}"))
            .arg(format!("--rate={rate}"))
            .args(["--time_based", "--group_reporting"])
            .arg(format!("--runtime={}ms", runtime.as_millis()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(&cmd)));
        FioLoad { child: Some(child), log: log.to_owned() }
    }

    /// Waits for fio to finish its runtime (or stops it with SIGINT if `early`); fails the test
    /// unless it exits 0 (or, stopped early, by itself) without I/O errors. Returns its output.
    #[track_caller]
    fn finish(&mut self, early: bool) -> String {
        let mut child = self.child.take().expect("fio running");
        if early {
            let _ = sys::kill(child.id(), libc::SIGINT);
        }
        let status = wait_timeout(&mut child, COMMAND_TIMEOUT);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let out = read_log(&self.log);
        // Stopped early, fio reports "terminating on signal 2" and exits non-zero.
        let ok = status.is_some_and(|s| s.success() || (early && s.code().is_some()));
        assert!(ok, "fio exit: {status:?}\n{out}");
        assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
        out
    }

    /// SIGINT; fails the test unless fio then exits by itself without I/O errors. Returns its
    /// output.
    #[track_caller]
    pub fn stop(mut self) -> String {
        self.finish(true)
    }

    /// Waits for the end of its runtime; fails the test unless fio exits 0 without errors.
    #[track_caller]
    pub fn wait(mut self) -> String {
        self.finish(false)
    }
}

impl Drop for FioLoad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Bytes fio says it wrote (`WRITE: bw=..., io=123MiB (129MB)`), from its group report.
pub fn fio_written_bytes(output: &str) -> Option<u64> {
    let line = output.lines().find(|l| l.trim_start().starts_with("WRITE:"))?;
    let io = line.split("io=").nth(1)?;
    let inner = io.split('(').nth(1)?.split(')').next()?; // e.g. "129MB"
    let digits: String = inner.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let value: f64 = digits.parse().ok()?;
    let unit = &inner[digits.len()..];
    let scale = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((value * scale) as u64)
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy

/// Forwards TCP connections from its own loopback port to `upstream`. It can throttle the
/// client-to-server direction (shared by all connections) and cut every open connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct ProxyShared {
    upstream: SocketAddr,
    stop: AtomicBool,
    /// Client-to-server bytes per second; 0 = unlimited.
    rate: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
    /// Both ends of every connection still open (by connection number).
    open: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    connections: AtomicU64,
    upstream_bytes: AtomicU64,
}

impl Proxy {
    /// Starts forwarding to `upstream`; `rate` limits what clients send (bytes per second).
    pub fn start(upstream: SocketAddr, rate: Option<u64>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let shared = Arc::new(ProxyShared {
            upstream,
            stop: AtomicBool::new(false),
            rate: AtomicU64::new(rate.unwrap_or(0)),
            bucket: Mutex::new((0.0, Instant::now())),
            open: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            upstream_bytes: AtomicU64::new(0),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).expect("blocking client");
                        s.connect(client);
                    }
                    // Non-blocking accept, so the loop sees `stop` within 5 ms.
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy { addr, shared, accept: Some(accept) }
    }

    /// Where agents connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the client-to-server limit (`None`: unlimited).
    pub fn set_rate(&self, rate: Option<u64>) {
        self.shared.rate.store(rate.unwrap_or(0), Ordering::SeqCst);
    }

    /// Cuts every open connection (both directions, both ends); returns how many.
    pub fn cut_all(&self) -> usize {
        let open = std::mem::take(&mut *self.shared.open.lock().expect("proxy lock"));
        for (_, a, b) in &open {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        open.len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from clients to the server so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream_bytes.load(Ordering::SeqCst)
    }
}

impl ProxyShared {
    fn connect(self: &Arc<Self>, client: TcpStream) {
        let Ok(server) = TcpStream::connect_timeout(&self.upstream, Duration::from_secs(5)) else {
            // The server is down: the client sees its connection closed, as with no proxy.
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = self.connections.fetch_add(1, Ordering::SeqCst);
        let ends = (client.try_clone(), server.try_clone());
        let (Ok(c2), Ok(s2)) = ends else { return };
        if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
            self.open.lock().expect("proxy lock").push((id, c3, s3));
        }
        let up = self.clone();
        std::thread::spawn(move || up.pump(client, server, true, id));
        let down = self.clone();
        std::thread::spawn(move || down.pump(s2, c2, false, id));
    }

    /// Copies `from` → `to` until either fails, then shuts both down.
    fn pump(&self, mut from: TcpStream, mut to: TcpStream, upstream: bool, id: u64) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if upstream {
                self.throttle(n);
                self.upstream_bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
        self.open.lock().expect("proxy lock").retain(|(i, _, _)| *i != id);
    }

    /// Sleeps until `n` more bytes fit the rate (a token bucket holding at most 100 ms).
    fn throttle(&self, n: usize) {
        let rate = self.rate.load(Ordering::SeqCst);
        if rate == 0 {
            return;
        }
        let wait = {
            let mut b = self.bucket.lock().expect("bucket lock");
            let now = Instant::now();
            let refill = now.duration_since(b.1).as_secs_f64() * rate as f64;
            b.0 = (b.0 + refill).min(rate as f64 / 10.0) - n as f64;
            b.1 = now;
            if b.0 < 0.0 {
                Duration::from_secs_f64(-b.0 / rate as f64)
            } else {
                Duration::ZERO
            }
        };
        std::thread::sleep(wait);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut_all();
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Filesystem checks

/// `e2fsck` with `args` on `image`: its exit code and output (never fails the test itself).
pub fn e2fsck(args: &[&str], image: &Path) -> (i32, String) {
    let out = run_unchecked(tool("e2fsck").args(args).arg(image), COMMAND_TIMEOUT);
    let code = out.status.code().unwrap_or(-1);
    (code, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}
