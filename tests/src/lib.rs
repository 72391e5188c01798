//! Integration-test support: starting `siterep serve` and driving real NBD clients.
//!
//! The tests in `tests/tests/` check the NBD server against clients we did not write — qemu-io,
//! qemu-img, nbdinfo, nbdcopy, nbdsh, nbdfuse and fio — so a misreading of the protocol shared
//! between our client and our server cannot hide. This crate holds what they share:
//!
//! - [`Serve`] / [`Server`]: build (if needed) and start `siterep serve` on a scratch image with a
//!   unique socket, wait until it speaks NBD, stop it with SIGTERM and check it exited 0.
//! - [`tool`] / [`run`]: find a client program or fail naming the Debian package that provides
//!   it (a missing tool is a failure, never a skip: CI installs them all), and run a command,
//!   failing with its output when it exits non-zero or hangs.
//! - [`image`], [`nbdinfo`]: scratch images and their SEEK_DATA layout, and what nbdinfo says
//!   about an export.
//! - [`wait_until`] / [`poll`]: the one loop that waits for a condition.
//! - [`parse_json`], [`json_u64`], [`json_str`], [`json_array`]: a command's JSON as a
//!   `serde_json::Value`, and its members, failing the test with the document when one is
//!   absent or of another type.
//! - [`control`]: `siterep cut | release | status` against a running shim, and raw requests to
//!   its control socket.
//! - [`blockdev`]: an export as a block device without the kernel NBD driver (nbdfuse, then a
//!   loop device).
//! - [`replication`]: certificates, `siterep server` and `siterep agent` processes, recovery
//!   points and restores, a throttling and connection-cutting TCP proxy, a fio load.
//! - [`recovery`]: `siterep export` and `failover` processes, quiesce and failback, mounts,
//!   edits through libnbd, block-level image comparison.
//!
//! Environment: `SITEREP_BIN` overrides the binary under test; otherwise the `siterep` binary
//! of this test's Cargo profile is (re)built with `cargo build -p siterep` (once per test
//! binary, so a stale server is never tested). `SITEREP_TEST_TMPDIR` overrides where scratch
//! images and sockets go. The server's own log filter is `SITEREP_LOG` (inherited).

pub mod blockdev;
pub mod control;
pub mod image;
pub mod nbdinfo;
pub mod recovery;
pub mod replication;
mod sys;

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a server gets to accept its first connection, and to exit after SIGTERM.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long any one client command may run before the test fails as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Client tools

/// The Debian package that ships each tool the tests run.
const PACKAGES: &[(&str, &str)] = &[
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdsh", "python3-libnbd"),
    ("nbdfuse", "nbdfuse (libnbd-bin before Debian 13)"),
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("fio", "fio"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("fusermount3", "fuse3"),
    ("losetup", "mount (util-linux)"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("python3", "python3"),
    ("setpriv", "util-linux"),
    ("openssl", "openssl"),
];

/// The full path of the program `name`, or a test failure naming the package to install.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs =
        std::env::split_paths(&path).chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return candidate;
        }
    }
    let package = PACKAGES.iter().find(|(tool, _)| *tool == name).map_or("?", |(_, pkg)| pkg);
    panic!(
        "required tool `{name}` was not found in PATH: install the Debian package {package} \
         (these tests never skip silently; CI installs every client)"
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A `Command` for the tool `name`, failing the test if it is not installed.
pub fn tool(name: &str) -> Command {
    Command::new(require_tool(name))
}

/// A `Command` equivalent to `nbdsh` (python3-libnbd's shell, `python3 -m nbd`), run by a
/// Python that can import the `nbd` module: `nbdsh` itself runs the first `python3` in PATH,
/// which may be a private interpreter (pyenv, venv) without the Debian module.
pub fn nbdsh() -> Command {
    require_tool("nbdsh");
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    let python = PYTHON.get_or_init(|| {
        let candidates = [require_tool("python3"), PathBuf::from("/usr/bin/python3")];
        candidates
            .into_iter()
            .find(|py| {
                Command::new(py)
                    .args(["-c", "import nbd"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or_else(|| {
                panic!("no python3 can `import nbd`: install the Debian package python3-libnbd")
            })
    });
    let mut cmd = Command::new(python);
    cmd.args(["-m", "nbd"]);
    cmd
}

// ---------------------------------------------------------------------------------------------
// Running commands

/// Runs `cmd` to completion (at most [`COMMAND_TIMEOUT`]) and returns its output; fails the test
/// with the command line, exit status, stdout and stderr if it exits non-zero.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd, COMMAND_TIMEOUT);
    if !out.status.success() {
        panic!("command failed: {}\n{}", describe(cmd), show_output(&out));
    }
    out
}

/// Runs `cmd` expecting it to fail (exit non-zero, not by a signal); fails the test with its
/// output if it succeeds.
#[track_caller]
pub fn run_expect_failure(cmd: &mut Command) -> Output {
    let out = run_unchecked(cmd, COMMAND_TIMEOUT);
    if out.status.success() || out.status.code().is_none() {
        panic!("command should have exited non-zero: {}\n{}", describe(cmd), show_output(&out));
    }
    out
}

/// Runs `cmd` with stdin closed, capturing stdout and stderr (to files, so a chatty child never
/// blocks); kills it and fails the test with what it printed if it runs past `timeout`.
#[track_caller]
pub fn run_unchecked(cmd: &mut Command, timeout: Duration) -> Output {
    let (stdout, stderr) = (capture_file(), capture_file());
    cmd.stdin(Stdio::null())
        .stdout(stdout.try_clone().expect("dup"))
        .stderr(stderr.try_clone().expect("dup"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(cmd)));
    let finished = wait_timeout(&mut child, timeout);
    let status = match finished {
        Some(status) => status,
        None => {
            let _ = child.kill();
            child.wait().expect("wait")
        }
    };
    let out = Output { status, stdout: read_capture(stdout), stderr: read_capture(stderr) };
    if finished.is_none() {
        panic!("command hung for {timeout:?} and was killed: {}\n{}", describe(cmd), show_output(&out));
    }
    out
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    poll(timeout, || child.try_wait().expect("try_wait"))
}

fn capture_file() -> File {
    tempfile::tempfile().expect("create a capture file")
}

fn read_capture(mut file: File) -> Vec<u8> {
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0)).expect("seek capture");
    file.read_to_end(&mut buf).expect("read capture");
    buf
}

/// The command line of `cmd`, shell-like, for failure messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(arg));
    }
    s
}

fn shell_quote(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,+@%".contains(&b)) {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Exit status, stdout and stderr of a finished command, for failure messages.
pub fn show_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

// ---------------------------------------------------------------------------------------------
// JSON output

/// Parses `stdout`, what `what` printed, as one JSON document; fails the test with the text if
/// it is not one.
#[track_caller]
pub fn parse_json(what: &str, stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{what} printed unparsable JSON ({e}):\n{text}"))
}

/// Member `key` of the JSON object `doc` as an unsigned integer; fails the test with the
/// document if it is absent or not one.
#[track_caller]
pub fn json_u64(doc: &Value, key: &str) -> u64 {
    doc.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("JSON member {key:?} is not an unsigned integer: {doc}"))
}

/// Member `key` of the JSON object `doc` as a string; fails the test with the document if it
/// is absent or not one.
#[track_caller]
pub fn json_str<'a>(doc: &'a Value, key: &str) -> &'a str {
    doc.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("JSON member {key:?} is not a string: {doc}"))
}

/// Member `key` of the JSON object `doc` as an array; fails the test with the document if it
/// is absent or not one.
#[track_caller]
pub fn json_array<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    doc.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("JSON member {key:?} is not an array: {doc}"))
}

// ---------------------------------------------------------------------------------------------
// Waiting for something to happen

/// What a probe polled by [`poll`] or [`wait_until`] answers: `true`, or `Some(value)`, once
/// the awaited thing has happened.
pub trait Probe {
    /// What the wait returns: `()` for a `bool` probe, the value for an `Option` probe.
    type Found;
    fn found(self) -> Option<Self::Found>;
}

impl Probe for bool {
    type Found = ();
    fn found(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Probe for Option<T> {
    type Found = T;
    fn found(self) -> Option<T> {
        self
    }
}

/// The pause between two probes is a tenth of the time waited so far, within these bounds: an
/// event is seen at most 10 % (or 1 ms) late, and a long wait does not keep a core busy.
const POLL_MIN_PAUSE: Duration = Duration::from_millis(1);
const POLL_MAX_PAUSE: Duration = Duration::from_millis(100);

/// Calls `probe` until it answers found and returns what it found; `None` if `timeout` passes
/// first (the probe is called once more at the deadline). The one polling loop of the tests:
/// every wait for a condition goes through here or [`wait_until`].
pub fn poll<P: Probe>(timeout: Duration, mut probe: impl FnMut() -> P) -> Option<P::Found> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if let Some(found) = probe().found() {
            return Some(found);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let pause = ((now - start) / 10).clamp(POLL_MIN_PAUSE, POLL_MAX_PAUSE);
        std::thread::sleep(pause.min(deadline - now));
    }
}

/// [`poll`] that fails the test naming `what` when `timeout` passes first. A probe may panic
/// itself with more context (a process that exited, the last status seen).
#[track_caller]
pub fn wait_until<P: Probe>(what: &str, timeout: Duration, probe: impl FnMut() -> P) -> P::Found {
    match poll(timeout, probe) {
        Some(found) => found,
        None => panic!("timed out after {timeout:?} waiting until {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch space

/// A per-test scratch directory on a disk filesystem (removed on drop).
///
/// The root is `$SITEREP_TEST_TMPDIR` if set, else the system temp dir unless that is a tmpfs
/// (no O_DIRECT before Linux 6.6), else `/var/tmp`. Keep it short: Unix socket paths live there.
pub fn scratch_dir(test: &str) -> tempfile::TempDir {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SITEREP_TEST_TMPDIR") {
            return PathBuf::from(dir);
        }
        let tmp = std::env::temp_dir();
        if sys::is_tmpfs(&tmp).unwrap_or(false) {
            PathBuf::from("/var/tmp")
        } else {
            tmp
        }
    });
    tempfile::Builder::new()
        .prefix(&format!("siterep-{test}-"))
        .tempdir_in(root)
        .unwrap_or_else(|e| panic!("create a scratch dir in {}: {e}", root.display()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local_addr").port()
}

// ---------------------------------------------------------------------------------------------
// The server under test

/// The `siterep` binary under test: `$SITEREP_BIN`, or this Cargo profile's build, rebuilt
/// first (once per test process) so the tests never run a stale server.
pub fn siterep_bin() -> &'static Path {
    // The outcome is kept, failure included: one build attempt per test binary, and every test
    // that needs the server fails with the same message.
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(locate_or_build) {
        Ok(bin) => bin,
        Err(message) => panic!("{message}"),
    }
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("SITEREP_BIN") {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(format!("SITEREP_BIN={} is not an executable file", bin.display()))
        };
    }
    // The test executable lives in <target>/<profile>/deps/; the binary in <target>/<profile>/.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let profile_dir =
        exe.parent().and_then(Path::parent).ok_or("test binary is not under <target>/<profile>/deps")?;
    let profile = profile_dir.file_name().and_then(OsStr::to_str).ok_or("no profile directory name")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(workspace).args(["build", "--quiet", "-p", "siterep"]);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        build.arg("--target-dir").arg(target_dir);
    }
    let out = build.output().map_err(|e| format!("cannot run {}: {e}", describe(&build)))?;
    if !out.status.success() {
        return Err(format!("building siterep failed: {}\n{}", describe(&build), show_output(&out)));
    }
    let bin = profile_dir.join("siterep");
    if !is_executable(&bin) {
        return Err(format!("{} succeeded but {} is missing", describe(&build), bin.display()));
    }
    Ok(bin)
}

/// A `Command` running the `siterep` binary under test (e.g. `siterep cut --socket …`).
pub fn siterep() -> Command {
    Command::new(siterep_bin())
}

/// Options for one `siterep serve` run (builder); [`Serve::start`] starts it. To restart a
/// server on the same image and state (after [`Server::stop`] or [`Server::kill`]), keep a clone
/// of the builder with an explicit [`Serve::socket`] and start it again.
#[derive(Debug, Clone)]
pub struct Serve {
    image: PathBuf,
    export: Option<String>,
    read_only: bool,
    direct: bool,
    no_track: bool,
    granularity: Option<u64>,
    engine: Option<String>,
    listen: bool,
    socket: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    preserve_limit: Option<u64>,
    extra: Vec<std::ffi::OsString>,
}

impl Serve {
    pub fn new(image: &Path) -> Serve {
        Serve {
            image: image.to_owned(),
            export: None,
            read_only: false,
            direct: false,
            no_track: false,
            granularity: None,
            engine: None,
            listen: false,
            socket: None,
            state_dir: None,
            preserve_limit: None,
            extra: Vec::new(),
        }
    }

    /// `--state-dir DIR`: persistent tracking state (created if missing).
    pub fn state_dir(mut self, dir: &Path) -> Serve {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// `--preserve-limit BYTES`.
    pub fn preserve_limit(mut self, bytes: u64) -> Serve {
        self.preserve_limit = Some(bytes);
        self
    }

    /// Any further argument, appended after the others (e.g. `--control PATH`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Serve {
        self.extra.push(arg.as_ref().to_owned());
        self
    }

    /// Serve on this socket path instead of a fresh one beside the image.
    pub fn socket(mut self, path: &Path) -> Serve {
        self.socket = Some(path.to_owned());
        self
    }

    pub fn export(mut self, name: &str) -> Serve {
        self.export = Some(name.to_owned());
        self
    }

    pub fn read_only(mut self) -> Serve {
        self.read_only = true;
        self
    }

    pub fn direct(mut self) -> Serve {
        self.direct = true;
        self
    }

    pub fn no_track(mut self) -> Serve {
        self.no_track = true;
        self
    }

    pub fn granularity(mut self, bytes: u64) -> Serve {
        self.granularity = Some(bytes);
        self
    }

    /// `--engine uring|sync`.
    pub fn engine(mut self, engine: &str) -> Serve {
        self.engine = Some(engine.to_owned());
        self
    }

    /// Also listen on TCP `127.0.0.1:<free port>`.
    pub fn listen_tcp(mut self) -> Serve {
        self.listen = true;
        self
    }

    /// Starts the server and waits until its socket(s) greet with the NBD magic.
    #[track_caller]
    pub fn start(self) -> Server {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // The socket and log go beside the image, or beside the socket when one is given
        // (a block device's directory is /dev).
        let socket = self.socket.clone().unwrap_or_else(|| {
            self.image.parent().expect("image has a parent directory").join(format!("nbd-{seq}.sock"))
        });
        let log = socket.parent().expect("socket has a parent directory").join(format!("serve-{seq}.log"));
        let tcp = self.listen.then(|| SocketAddr::from(([127, 0, 0, 1], free_tcp_port())));

        let mut cmd = Command::new(siterep_bin());
        cmd.arg("serve").arg(&self.image).arg("--socket").arg(&socket);
        if let Some(addr) = tcp {
            cmd.arg("--listen").arg(addr.to_string());
        }
        if let Some(name) = &self.export {
            cmd.arg("--export").arg(name);
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        if self.direct {
            cmd.arg("--direct");
        }
        if self.no_track {
            cmd.arg("--no-track");
        }
        if let Some(g) = self.granularity {
            cmd.arg("--granularity").arg(g.to_string());
        }
        if let Some(engine) = &self.engine {
            cmd.arg("--engine").arg(engine);
        }
        if let Some(dir) = &self.state_dir {
            if !dir.exists() {
                std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            }
            cmd.arg("--state-dir").arg(dir);
        }
        if let Some(bytes) = self.preserve_limit {
            cmd.arg("--preserve-limit").arg(bytes.to_string());
        }
        cmd.args(&self.extra);
        let log_file = File::create(&log).expect("create server log");
        cmd.stdin(Stdio::null()).stdout(log_file.try_clone().expect("dup")).stderr(log_file);
        let command_line = describe(&cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        let mut server = Server { child: Some(child), command_line, socket, log, tcp, image: self.image };
        server.wait_ready();
        server
    }
}

/// Stops a server process: SIGTERM (unless it already exited), up to [`SERVER_TIMEOUT`] to
/// exit, then SIGKILL. The exit status, or `None` if it had to be killed.
pub fn terminate_child(mut child: Child) -> Option<ExitStatus> {
    if let Some(status) = child.try_wait().expect("try_wait") {
        return Some(status);
    }
    let _ = sys::kill(child.id(), libc::SIGTERM);
    let status = wait_timeout(&mut child, SERVER_TIMEOUT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// A running `siterep serve`. Dropping it sends SIGTERM and — unless the test is already
/// failing — asserts the server exits 0 within [`SERVER_TIMEOUT`].
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    command_line: String,
    socket: PathBuf,
    log: PathBuf,
    tcp: Option<SocketAddr>,
    image: PathBuf,
}

impl Server {
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// `nbd+unix:///?socket=…` (the empty export name).
    pub fn uri(&self) -> String {
        self.uri_for("")
    }

    /// `nbd+unix:///NAME?socket=…`.
    pub fn uri_for(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `nbd://127.0.0.1:PORT/NAME` (server started with [`Serve::listen_tcp`]).
    pub fn tcp_uri_for(&self, export: &str) -> String {
        let addr = self.tcp.expect("server was started with listen_tcp()");
        format!("nbd://{addr}/{export}")
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.expect("server was started with listen_tcp()")
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    /// The default control socket beside the NBD socket: `PATH.ctl` (unless the server was
    /// started with `--control`).
    pub fn control_socket(&self) -> PathBuf {
        control::control_path(&self.socket)
    }

    /// Kills the server with SIGKILL (a crash: nothing is flushed or written at exit) and reaps
    /// it; fails the test unless it died of that signal. The socket files stay behind, as after
    /// a real crash.
    #[track_caller]
    pub fn kill(mut self) {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("server running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("server had already exited with {status} before SIGKILL\n{}", self.context());
        }
        sys::kill(child.id(), libc::SIGKILL).expect("send SIGKILL to the server");
        let status = child.wait().expect("wait for the killed server");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "server exit after SIGKILL: {status}\n{}",
            self.context()
        );
    }

    /// Sends SIGTERM and waits up to [`SERVER_TIMEOUT`]; fails the test (with the server's log) if
    /// it does not exit 0 in time. Returns how long it took to exit.
    #[track_caller]
    pub fn stop(mut self) -> Duration {
        let (status, took) = self.terminate();
        match status {
            Some(s) if s.success() => took,
            Some(s) => panic!("server exited with {s} after SIGTERM\n{}", self.context()),
            None => panic!(
                "server did not exit within {SERVER_TIMEOUT:?} of SIGTERM (killed)\n{}",
                self.context()
            ),
        }
    }

    /// SIGTERM, wait, SIGKILL on timeout. `None` status: it had to be killed.
    fn terminate(&mut self) -> (Option<ExitStatus>, Duration) {
        let Some(child) = self.child.take() else {
            return (None, Duration::ZERO);
        };
        let start = Instant::now();
        let status = terminate_child(child);
        (status, start.elapsed())
    }

    fn context(&self) -> String {
        format!("server: {}\n--- server log ---\n{}", self.command_line, self.log().trim_end())
    }

    fn wait_ready(&mut self) {
        let mut last_error = String::new();
        let ready = poll(SERVER_TIMEOUT, || {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                self.child = None;
                panic!("server exited with {status} before accepting connections\n{}", self.context());
            }
            self.greets().map_err(|e| last_error = e).is_ok()
        });
        if ready.is_none() {
            let (status, _) = self.terminate();
            panic!(
                "server did not accept an NBD connection within {SERVER_TIMEOUT:?} ({last_error}); \
                 after SIGTERM: {status:?}\n{}",
                self.context()
            );
        }
    }

    /// Connects to every endpoint and reads the 8-byte `NBDMAGIC` greeting.
    fn greets(&self) -> Result<(), String> {
        fn magic(mut stream: impl Read) -> Result<(), String> {
            let mut buf = [0u8; 8];
            stream.read_exact(&mut buf).map_err(|e| format!("reading the greeting: {e}"))?;
            if &buf == b"NBDMAGIC" {
                Ok(())
            } else {
                Err(format!("greeting is {buf:02x?}, not NBDMAGIC"))
            }
        }
        let unix = UnixStream::connect(&self.socket)
            .map_err(|e| format!("connect {}: {e}", self.socket.display()))?;
        unix.set_read_timeout(Some(Duration::from_secs(2))).expect("set_read_timeout");
        magic(unix)?;
        if let Some(addr) = self.tcp {
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            tcp.set_read_timeout(Some(Duration::from_secs(2))).expect("set_read_timeout");
            magic(tcp)?;
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        let (status, _) = self.terminate();
        if std::thread::panicking() {
            eprintln!("{}", self.context());
            return;
        }
        match status {
            Some(s) if s.success() => {}
            Some(s) => panic!("server exited with {s} after SIGTERM\n{}", self.context()),
            None => panic!(
                "server did not exit within {SERVER_TIMEOUT:?} of SIGTERM (killed)\n{}",
                self.context()
            ),
        }
    }
}
