"""benchlib: what the bench scripts in scripts/ share.

Each script imports it from its own directory, so it runs from the repository root and from
anywhere else:

    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import benchlib as b

What is here: the `Abort` error and `main` (signals, cleanup, the report printed and written);
child processes (`spawn` in their own process group, killed with this script; `stop`,
`stop_all`, `wait_rusage`, `run_cmd`, `tail` of their logs); readiness (`wait_ready`,
`nbd_greets`, `tcp_up`, `free_port`); tools (`have`, `fio_has_nbd`, `nbdkit_has_file`,
`ensure_packages`, `cargo_build`, `siterep_binary`, `siterep_version`, `first_line`); /proc
readers (`proc_cpu`, `proc_status`); the page cache (`evict`); the scratch directory
(`scratch_dir`, `dir_fs`), the order of the contenders in a round (`rotated`, `round_order`)
and the statistics of the tables (`med`, `spread`, `percentile`).
"""

import ctypes
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
MB = 1e6

# The script's name, for messages (each script sets it).
PROG = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "bench"


class Abort(Exception):
    """The run cannot go on; the message is printed as one line, `detail` (lines) below it."""

    def __init__(self, message, detail=None):
        super().__init__(message)
        self.detail = detail


def log(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- child processes

_children = []  # every Popen we started and have not reaped yet


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: the child gets SIGKILL if this script dies without cleaning up.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def spawn(argv, log_path, cwd=None, stdout_path=None, env=None):
    """Starts argv in a process group of its own, killed with this script; its command line and
    stderr (and stdout, unless `stdout_path`) go to `log_path`."""
    # No inherited systemd socket-activation variables: servers listen where we say.
    env = {k: v for k, v in (env or os.environ).items()
           if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    with open(log_path, "ab") as f:
        f.write(("$ " + " ".join(argv) + "\n").encode())
    logf = open(log_path, "ab")
    out = open(stdout_path, "wb") if stdout_path else logf
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=logf, cwd=cwd,
                             env=env, start_new_session=True, preexec_fn=_die_with_parent)
    except FileNotFoundError:
        raise Abort(f"cannot run {argv[0]}: not found")
    finally:
        logf.close()
        if stdout_path:
            out.close()
    _children.append(p)
    return p


def forget(p):
    """A child that has been reaped by other means is no longer ours to stop."""
    if p in _children:
        _children.remove(p)


def stop(p, grace=10.0):
    """Ends a child we started (its whole process group), SIGTERM first, then SIGKILL."""
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    else:
        # the leader is gone; end whatever it left in its group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    forget(p)


def stop_all():
    for p in list(_children):
        stop(p, grace=2.0)


def wait_rusage(p, timeout, what, logf):
    """Waits for child p (wait4) and returns (status, user+sys CPU seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            forget(p)
            return p.returncode, ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            stop(p)
            raise Abort(f"{what} did not finish within {timeout} s", tail(logf))
        time.sleep(0.005)


def tail(path, n=10):
    """The last `n` lines of a log file ([] if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []


def run_cmd(argv, logf, timeout=900, what=None):
    """Runs argv to completion, its command line and stderr to `logf`; returns (stdout, wall
    seconds). Aborts when it fails or runs past `timeout`."""
    with open(logf, "ab") as f:
        f.write(("$ " + " ".join(argv) + "\n").encode())
        f.flush()
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=f,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Abort(f"{what or argv[0]} did not finish within {timeout} s", tail(logf))
        wall = time.monotonic() - t0
    if r.returncode != 0:
        raise Abort(f"{what or ' '.join(argv[:2])} failed with status {r.returncode}", tail(logf))
    return r.stdout.decode("utf-8", "replace"), wall


# ---------------------------------------------------------------- readiness

def wait_ready(p, ready, what, logf, timeout=15.0, interval=0.02):
    """Polls `ready()` until it is true; aborts (with the log's tail) when child `p` exits
    first or `timeout` passes. `p` may be None (nothing to watch)."""
    deadline = time.monotonic() + timeout
    while True:
        if p is not None and p.poll() is not None:
            raise Abort(f"{what} exited with status {p.returncode}", tail(logf) if logf else None)
        if ready():
            return
        if time.monotonic() > deadline:
            raise Abort(f"{what} not ready within {timeout:.0f} s", tail(logf) if logf else None)
        time.sleep(interval)


NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
NBD_OPT_ABORT = 2


def nbd_greets(sock_path):
    """True when the socket accepts a connection and answers with the NBD newstyle greeting.
    Leaves politely: client flags, then NBD_OPT_ABORT."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(sock_path)
        greeting = b""
        while len(greeting) < 18:
            b = s.recv(18 - len(greeting))
            if not b:
                return False
            greeting += b
        if greeting[:8] != NBD_MAGIC:
            return False
        flags = struct.unpack(">H", greeting[16:18])[0]
        s.sendall(struct.pack(">I", flags & 0x3) + struct.pack(">QII", IHAVEOPT, NBD_OPT_ABORT, 0))
        try:
            s.recv(64)
        except OSError:
            pass
        return True
    except OSError:
        return False
    finally:
        s.close()


def serves_nbd(sock_path):
    return os.path.exists(sock_path) and nbd_greets(sock_path)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_up(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- tools

def have(cmd):
    return shutil.which(cmd) is not None


def fio_has_nbd():
    if not have("fio"):
        return False
    r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True)
    return r.returncode == 0 and "uri" in r.stdout


def nbdkit_has_file():
    if not have("nbdkit"):
        return False
    r = subprocess.run(["nbdkit", "file", "--dump-plugin"], capture_output=True)
    return r.returncode == 0


def ensure_packages(ok, packages, need):
    """Unless `ok()`, installs the Debian `packages` (as root) and checks `ok()` again; `need`
    says what is missing."""
    if ok():
        return
    if os.geteuid() != 0 or not have("apt-get"):
        raise Abort(f"missing tools (need {need}); run as root on Debian or install: "
                    + " ".join(packages))
    log(f"installing {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y"] + packages):
        if subprocess.run(argv, env=env).returncode != 0:
            raise Abort(f"'{' '.join(argv)}' failed")
    if not ok():
        raise Abort(f"still missing after installing {' '.join(packages)}: {need}")


def cargo_build(what, artifact, hint):
    """cargo build --release WHAT; returns the path of ARTIFACT under target/release."""
    if not have("cargo"):
        raise Abort(f"cargo not found; {hint}")
    argv = ["cargo", "build", "--release"] + what
    log(" ".join(argv))
    if subprocess.run(argv, cwd=REPO).returncode != 0:
        raise Abort(f"'{' '.join(argv)}' failed")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    path = os.path.join(target, "release", artifact)
    if not os.access(path, os.X_OK):
        raise Abort(f"{path} is missing after the build")
    return path


def executable(path, what):
    """The absolute path of the executable `path` (or a name in PATH); aborts naming `what`."""
    found = shutil.which(path) or path
    if not os.access(found, os.X_OK) or os.path.isdir(found):
        raise Abort(f"{what} {path} is not an executable")
    return os.path.abspath(found)


def siterep_binary(tmp=None):
    """The siterep under test: $SITEREP_BIN, else `cargo build --release -p siterep`, copied
    into `tmp` when given (others may rebuild the workspace while we run)."""
    override = os.environ.get("SITEREP_BIN")
    if override:
        return executable(override, "SITEREP_BIN=")
    path = cargo_build(["-p", "siterep"], "siterep", "install Rust or set SITEREP_BIN")
    if tmp is None:
        return path
    copy = os.path.join(tmp, "siterep")
    shutil.copy2(path, copy)
    return copy


def first_line(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except Exception:
        return "?"


def siterep_version(siterep):
    """Which siterep a report measured: the binary and the repository's revision."""
    try:
        rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        rev = ""
    if os.environ.get("SITEREP_BIN"):
        return f"{siterep} (given by SITEREP_BIN; the repository is at {rev or '?'})"
    return f"{siterep} (built from working tree {rev})" if rev else siterep


# ---------------------------------------------------------------- /proc and the page cache

def proc_cpu(pid):
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the command: state is field 3, utime 14 and stime 15 (1-based, proc(5))
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid, field):
    """A kB field of /proc/PID/status (VmRSS, VmHWM, …) in MiB; NaN when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def evict(path, drop=True):
    """Makes a file's dirty pages clean; with `drop`, then drops its pages from the cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- scratch space and statistics

def scratch_dir():
    """A fresh temporary directory in $BENCH_DIR (default /var/tmp); (path, base)."""
    base = os.environ.get("BENCH_DIR", "/var/tmp")
    return tempfile.mkdtemp(prefix=f"{PROG}.", dir=base), base


def dir_fs(base):
    """`base (fstype)` for the report's header."""
    try:
        r = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", base], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            return f"{base} ({r.stdout.split()[0]})"
    except OSError:
        pass
    return base


def med(xs):
    return statistics.median(xs)


def spread(xs):
    """(max - min) / median, as a percentage: the noise gauge of the tables."""
    m = med(xs)
    return f"{(max(xs) - min(xs)) / m * 100:.0f}%" if len(xs) > 1 and m else "–"


def percentile(xs, q):
    """Nearest-rank percentile."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def rotated(items, k):
    """`items` rotated left by k (mod its length): each round starts with another contender."""
    k %= len(items)
    return items[k:] + items[:k]


def round_order(contenders, rnd, twin_suffix=None):
    """The contenders' order in round `rnd` (from 0): rotated by `rnd`, so each round starts
    with another one. With `twin_suffix`, in odd rounds a contender then followed by its twin
    (its name + the suffix) swaps places with it, so the twin does not always run right after
    the contender."""
    order = rotated(list(contenders), rnd)
    if twin_suffix and rnd % 2:
        i = 0
        while i + 1 < len(order):
            if order[i + 1] == order[i] + twin_suffix:
                order[i], order[i + 1] = order[i + 1], order[i]
                i += 2
            else:
                i += 1
    return order


# ---------------------------------------------------------------- main

def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args, run):
    """Runs `run(args)` (which returns the report's text and may set args.tmp), prints the
    report and writes it to args.out; on Abort prints the message, on a signal cleans up.
    Every child is stopped and args.tmp removed whatever happens. Exits with the status."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with INT ignored
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    status = 0
    args.tmp = None
    try:
        text = run(args)
        print(text)
        if getattr(args, "out", None):
            with open(args.out, "w") as f:
                f.write(text + "\n")
            log(f"wrote {args.out}")
    except Abort as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        detail = e.detail.splitlines() if isinstance(e.detail, str) else e.detail
        for line in detail or []:
            print(f"  | {line}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted, cleaning up", file=sys.stderr)
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all()
        if args.tmp:
            shutil.rmtree(args.tmp, ignore_errors=True)
    sys.exit(status)
