//! Recovery (issue 6): the recovery-site commands that serve NBD for as long as they run
//! (`siterep export`, `siterep failover --image`), planned failover and failback on the command
//! line, a mounted filesystem that undoes itself, edits through `nbdsh`, and block-level
//! comparisons of images.
//!
//! - [`NbdProcess`]: a `siterep export|failover …` serving on a Unix socket; SIGTERM must end
//!   it with exit 0, SIGKILL is a crash.
//! - [`export`], [`failover`]: those two commands, started and ready.
//! - [`quiesce`], [`failback`], [`tag_point`]: the command-line steps and their JSON.
//! - [`Mount`]: an ext4 mount that is unmounted on drop (lazily when the device is dead).
//! - [`nbd_edits`]: random 4 KiB writes and trims sent with libnbd (`nbdsh`).
//! - [`differing_blocks`]: which blocks of two equal-sized images differ.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::replication::{Certs, RecoveryServer};
use crate::{
    describe, image, nbdsh, poll, run, run_unchecked, siterep, sys, tool, Serve, Server, SERVER_TIMEOUT,
};

// ---------------------------------------------------------------------------------------------
// The two sites of a failover test

/// A protected disk with a filesystem and a recovery site for it, in `dir`: `src.img` of
/// `size` bytes with ext4 made on the host (nodiscard: no whole-disk trim to make all of it
/// dirty), served by a shim with persistent tracking (`state/`), and a recovery server with
/// mutual TLS (`certs/`, store in `store/`). Returns the shim, the certificates and the server.
pub fn ext4_protected_site(dir: &Path, size: u64) -> (Server, Certs, RecoveryServer) {
    let img = dir.join("src.img");
    image::create_sparse(&img, size);
    run(tool("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard"]).arg(&img));
    let shim = Serve::new(&img).state_dir(&dir.join("state")).start();
    let certs = Certs::make(&dir.join("certs"));
    let server = RecoveryServer::start(&dir.join("store"), &certs, &[]);
    (shim, certs, server)
}

// ---------------------------------------------------------------------------------------------
// Long-running recovery-site commands

/// A running `siterep` command that serves NBD on a Unix socket until SIGTERM: `export` or
/// `failover --image`. Dropping it sends SIGTERM and (unless the test is already failing)
/// asserts exit 0.
#[derive(Debug)]
pub struct NbdProcess {
    child: Option<Child>,
    command_line: String,
    socket: PathBuf,
    log: PathBuf,
}

impl NbdProcess {
    /// Starts `siterep ARGS` (which must include `--socket SOCKET`) with its output in `log`,
    /// without waiting for it.
    #[track_caller]
    pub fn spawn(args: &[OsString], socket: &Path, log: &Path) -> NbdProcess {
        let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut cmd = siterep();
        cmd.args(args).stdin(Stdio::null()).stdout(file.try_clone().expect("dup")).stderr(file);
        let command_line = describe(&cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        NbdProcess { child: Some(child), command_line, socket: socket.to_owned(), log: log.to_owned() }
    }

    /// Waits up to `timeout` until the socket greets with `NBDMAGIC`; fails the test (with the
    /// log) if the process exits first or the time runs out. Returns how long it waited.
    #[track_caller]
    pub fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let serving = poll(timeout, || {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                self.child = None;
                panic!("exited with {status} before serving\n{}", self.context());
            }
            self.greets()
        });
        match serving {
            Some(()) => start.elapsed(),
            None => panic!("not serving NBD after {timeout:?}\n{}", self.context()),
        }
    }

    fn greets(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).is_ok() && &buf == b"NBDMAGIC"
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `nbd+unix:///?socket=…`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    fn context(&self) -> String {
        format!("command: {}\n--- log ---\n{}", self.command_line, self.log().trim_end())
    }

    /// SIGTERM; it must exit 0 within [`SERVER_TIMEOUT`].
    #[track_caller]
    pub fn stop(mut self) {
        match self.terminate() {
            Some(s) if s.success() => {}
            other => {
                panic!("after SIGTERM: {other:?} (None: killed after {SERVER_TIMEOUT:?})\n{}", self.context())
            }
        }
    }

    /// SIGKILL (a crash) and reap; fails the test unless it was still running.
    #[track_caller]
    pub fn kill(mut self) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("had already exited with {status} before SIGKILL\n{}", self.context());
        }
        sys::kill(child.id(), libc::SIGKILL).expect("SIGKILL");
        let status = child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "exit after SIGKILL: {status}\n{}", self.context());
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        crate::terminate_child(self.child.take()?)
    }
}

impl Drop for NbdProcess {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let status = self.terminate();
        if std::thread::panicking() {
            eprintln!("{}", self.context());
            return;
        }
        match status {
            Some(s) if s.success() => {}
            other => {
                panic!("after SIGTERM: {other:?} (None: killed after {SERVER_TIMEOUT:?})\n{}", self.context())
            }
        }
    }
}

/// `siterep export --store STORE --disk DISK --point POINT --socket SOCKET [--writable]`,
/// started but not waited for (the caller measures readiness). Its log is `SOCKET.log`.
#[track_caller]
pub fn spawn_export(store: &Path, disk: &str, point: &str, socket: &Path, writable: bool) -> NbdProcess {
    let mut args: Vec<OsString> = vec![
        "export".into(),
        "--store".into(),
        store.into(),
        "--disk".into(),
        disk.into(),
        "--point".into(),
        point.into(),
        "--socket".into(),
        socket.into(),
    ];
    if writable {
        args.push("--writable".into());
    }
    NbdProcess::spawn(&args, socket, &socket.with_extension("log"))
}

/// [`spawn_export`], then wait until it serves.
#[track_caller]
pub fn export(store: &Path, disk: &str, point: &str, socket: &Path, writable: bool) -> NbdProcess {
    let mut p = spawn_export(store, disk, point, socket, writable);
    p.wait_ready(SERVER_TIMEOUT);
    p
}

/// `siterep failover --store STORE --disk DISK --point POINT --image IMAGE --socket SOCKET
/// --state-dir STATE`: materializes the point and serves it as the new primary. Waits (up to
/// `timeout`, materialization included) until it serves. Its log is `SOCKET.log`.
#[track_caller]
pub fn failover(
    store: &Path,
    disk: &str,
    point: &str,
    image: &Path,
    socket: &Path,
    state_dir: &Path,
    timeout: Duration,
) -> NbdProcess {
    std::fs::create_dir_all(state_dir).unwrap_or_else(|e| panic!("create {}: {e}", state_dir.display()));
    let args: Vec<OsString> = vec![
        "failover".into(),
        "--store".into(),
        store.into(),
        "--disk".into(),
        disk.into(),
        "--point".into(),
        point.into(),
        "--image".into(),
        image.into(),
        "--socket".into(),
        socket.into(),
        "--state-dir".into(),
        state_dir.into(),
    ];
    let mut p = NbdProcess::spawn(&args, socket, &socket.with_extension("log"));
    p.wait_ready(timeout);
    p
}

/// The unplanned failover of [`ext4_protected_site`]'s disk: `siterep failover --point latest`
/// into `dir/failover.img`, served on `dir/s2.sock` with tracking in `dir/state2`. Asserts
/// that it materialized `point`, the latest point the caller saw. Returns the image and the
/// new primary serving it.
#[track_caller]
pub fn failover_to_latest(store: &Path, disk: &str, dir: &Path, point: u64) -> (PathBuf, NbdProcess) {
    let image = dir.join("failover.img");
    let p = failover(
        store,
        disk,
        "latest",
        &image,
        &dir.join("s2.sock"),
        &dir.join("state2"),
        Duration::from_secs(120),
    );
    assert!(
        p.log().contains(&format!("materialized point {point} ")),
        "`siterep failover --point latest` did not materialize point {point}:\n{}",
        p.log()
    );
    (image, p)
}

// ---------------------------------------------------------------------------------------------
// Command-line steps

/// The JSON document on the last non-empty line of `stdout` (some commands print a human line
/// first).
#[track_caller]
fn parse_last_line(what: &str, stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{what} printed unparsable JSON ({e}):\n{text}"))
}

/// `siterep quiesce --socket SOCKET --timeout 60s --json`: `{"generation","point","cut_unix_ms"}`.
#[track_caller]
pub fn quiesce(socket: &Path) -> Value {
    let out = run(siterep().args(["quiesce", "--timeout", "60s", "--json", "--socket"]).arg(socket));
    parse_last_line("siterep quiesce --json", &out.stdout)
}

/// `siterep failback --from FROM --to TO --json [--compare-all]`: its report
/// (`candidate_bytes`, `bytes_sent`, `bytes_zeroed`, `bytes_matched`, `duration_ms`).
#[track_caller]
pub fn failback(from: &Path, to: &Path, compare_all: bool) -> Value {
    let mut cmd = siterep();
    cmd.args(["failback", "--json", "--from"]).arg(from).arg("--to").arg(to);
    if compare_all {
        cmd.arg("--compare-all");
    }
    let out = run(&mut cmd);
    parse_last_line("siterep failback --json", &out.stdout)
}

/// `siterep points --store STORE --disk DISK tag --point ID TAG`.
#[track_caller]
pub fn tag_point(store: &Path, disk: &str, point: u64, tag: &str) {
    run(siterep().args(["points", "--store"]).arg(store).args([
        "--disk",
        disk,
        "tag",
        "--point",
        &point.to_string(),
        tag,
    ]));
}

/// `siterep failover --store STORE --disk DISK --point ID --commit`.
#[track_caller]
pub fn commit_failover(store: &Path, disk: &str, point: u64) {
    run(siterep().args(["failover", "--store"]).arg(store).args([
        "--disk",
        disk,
        "--point",
        &point.to_string(),
        "--commit",
    ]));
}

// ---------------------------------------------------------------------------------------------
// Filesystems

/// An ext4 filesystem mounted on `dir`; dropping unmounts it (lazily if a plain unmount fails,
/// e.g. because the device under it died).
#[derive(Debug)]
pub struct Mount(Option<PathBuf>);

impl Mount {
    /// `mount -t ext4 [-o OPTIONS] DEV DIR` (`dir` created if missing).
    #[track_caller]
    pub fn ext4(dev: &str, dir: &Path, options: Option<&str>) -> Mount {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut cmd = tool("mount");
        cmd.args(["-t", "ext4"]);
        if let Some(o) = options {
            cmd.args(["-o", o]);
        }
        run(cmd.arg(dev).arg(dir));
        Mount(Some(dir.to_owned()))
    }

    pub fn path(&self) -> &Path {
        self.0.as_deref().expect("mounted")
    }

    /// `umount DIR`; fails the test if it fails.
    #[track_caller]
    pub fn unmount(mut self) {
        let dir = self.0.take().expect("mounted");
        run(tool("umount").arg(&dir));
    }

    /// Unmounts however it can (`umount`, else `umount -l`): for a filesystem whose device died.
    /// Returns what `umount` said when it failed.
    pub fn unmount_dead(mut self) -> Option<String> {
        let dir = self.0.take().expect("mounted");
        let out = run_unchecked(tool("umount").arg(&dir), Duration::from_secs(60));
        if out.status.success() {
            return None;
        }
        let _ = run_unchecked(tool("umount").arg("-l").arg(&dir), Duration::from_secs(60));
        Some(crate::show_output(&out))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let out = run_unchecked(tool("umount").arg(&dir), Duration::from_secs(60));
            if !out.status.success() {
                let _ = run_unchecked(tool("umount").arg("-l").arg(&dir), Duration::from_secs(60));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Edits through libnbd

/// One change sent to an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    /// `len` bytes of pseudo-random data (from `seed`) at `offset`.
    Write { offset: u64, len: u64, seed: u64 },
    /// NBD_CMD_TRIM of `[offset, offset + len)`.
    Trim { offset: u64, len: u64 },
    /// NBD_CMD_WRITE_ZEROES of `[offset, offset + len)`.
    Zero { offset: u64, len: u64 },
}

/// Sends `edits` in order over one libnbd connection to `uri`, then flushes. The data of a
/// write is Python's `random.Random(seed).randbytes(len)`.
#[track_caller]
pub fn nbd_edits(uri: &str, edits: &[Edit]) {
    let mut ops = String::from("[");
    for e in edits {
        match *e {
            Edit::Write { offset, len, seed } => ops.push_str(&format!("('w',{offset},{len},{seed}),")),
            Edit::Trim { offset, len } => ops.push_str(&format!("('t',{offset},{len},0),")),
            Edit::Zero { offset, len } => ops.push_str(&format!("('z',{offset},{len},0),")),
        }
    }
    ops.push(']');
    let script = format!(
        "import random\n\
         for (op, off, n, seed) in {ops}:\n    \
             if op == 'w':\n        h.pwrite(random.Random(seed).randbytes(n), off)\n    \
             elif op == 't':\n        h.trim(n, off)\n    \
             else:\n        h.zero(n, off)\n\
         h.flush()\n"
    );
    let dir = tempfile::tempdir().expect("a directory for the nbdsh script");
    let path = dir.path().join("edits.py");
    std::fs::write(&path, script).expect("write the nbdsh script");
    let exec = format!("exec(open({:?}).read())", path.display().to_string());
    run(nbdsh().arg("-u").arg(uri).arg("-c").arg(exec));
}

// ---------------------------------------------------------------------------------------------
// Comparing images

/// Indexes of the `block`-byte blocks in which the equal-sized files `a` and `b` differ.
#[track_caller]
pub fn differing_blocks(a: &Path, b: &Path, block: u64) -> Vec<u64> {
    let open = |p: &Path| File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (la, lb) = (fa.metadata().expect("stat").len(), fb.metadata().expect("stat").len());
    assert_eq!(la, lb, "{} and {} differ in size", a.display(), b.display());
    let piece = (4 << 20) / block * block;
    let (mut ba, mut bb) = (vec![0u8; piece as usize], vec![0u8; piece as usize]);
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < la {
        let n = piece.min(la - pos) as usize;
        fa.read_exact(&mut ba[..n]).expect("read");
        fb.read_exact(&mut bb[..n]).expect("read");
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n].chunks(block as usize).zip(bb[..n].chunks(block as usize)).enumerate()
            {
                if x != y {
                    out.push(pos / block + i as u64);
                }
            }
        }
        pos += n as u64;
    }
    out
}

/// `cp --sparse=always FROM TO` (a scratch copy for fsck, which would change the original).
#[track_caller]
pub fn sparse_copy(from: &Path, to: &Path) {
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}
