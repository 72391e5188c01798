//! Resync end to end: a recovery server holds image A as its latest point; the shim then serves
//! image B, which differs in a few 4 KiB blocks, with a fresh state directory (its tracking was
//! lost: resync required; a new source identity, so the agent re-enrolls the disk with
//! `--reenroll`). `siterep agent` compares hashes and must send only the differing
//! blocks; the restored latest point must equal B byte for byte. The same pair goes through
//! `rsync --inplace --no-whole-file` for comparison (reported, not asserted). The agent reads B
//! itself, as the shim's control socket names it; another test replaces the file at that name
//! and checks the shim then refuses it, so the resync fails loudly and makes no point. A last
//! test kills the agent in the middle of a resync and checks the next run resumes and ends
//! equal.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use siterep_tests::image::{Rng, GIB, KIB, MIB};
use siterep_tests::{
    control, free_tcp_port, json_str, json_u64, poll, run, run_unchecked, scratch_dir, show_output, siterep,
    Serve,
};

const DISK: &str = "disk0";
/// Longest an agent run may take (a 1 GiB initial copy in a debug build is slow).
const AGENT_TIMEOUT: Duration = Duration::from_secs(900);

/// rsync, or a test failure naming its package (never a silent skip).
fn rsync() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("rsync"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("rsync was not found in PATH: install the Debian package rsync"))
}

/// `siterep server --insecure` on a free loopback port, stopped (SIGTERM) on drop.
struct RecoveryServer {
    child: Child,
    addr: String,
    store: PathBuf,
    log: PathBuf,
}

impl RecoveryServer {
    fn start(dir: &Path) -> RecoveryServer {
        let addr = format!("127.0.0.1:{}", free_tcp_port());
        let store = dir.join("store");
        let log = dir.join("server.log");
        let log_file = File::create(&log).expect("create the server log");
        let child = siterep()
            .args(["server", "--insecure", "--listen", &addr, "--store"])
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("dup"))
            .stderr(log_file)
            .spawn()
            .expect("start siterep server");
        let server = RecoveryServer { child, addr, store, log };
        let listening = poll(Duration::from_secs(10), || TcpStream::connect(&server.addr).is_ok());
        assert!(listening.is_some(), "the recovery server did not listen:\n{}", server.log());
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `siterep agent --once` against this server for the shim on `socket`, plus `extra`.
    fn agent(&self, socket: &Path, extra: &[&str]) -> Command {
        let mut cmd = siterep();
        cmd.args(["agent", "--insecure", "--once", "--retry-scale", "0.001", "--zstd-level", "1"])
            .args(["--server", &self.addr, "--disk", DISK, "--socket"])
            .arg(socket)
            .args(extra);
        cmd
    }

    /// Runs an agent to completion and returns its JSON summary and how long it ran.
    #[track_caller]
    fn run_agent(&self, socket: &Path, extra: &[&str]) -> (Value, Duration) {
        let (summary, took, _) = self.run_agent_logged(socket, extra);
        (summary, took)
    }

    /// [`run_agent`](Self::run_agent), plus what the agent logged (stderr).
    #[track_caller]
    fn run_agent_logged(&self, socket: &Path, extra: &[&str]) -> (Value, Duration, String) {
        let start = Instant::now();
        let out = run_unchecked(&mut self.agent(socket, extra), AGENT_TIMEOUT);
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "agent failed\n{}\n--- server log ---\n{}",
            show_output(&out),
            self.log()
        );
        let summary = serde_json::from_slice(out.stdout.trim_ascii())
            .unwrap_or_else(|e| panic!("agent printed no JSON summary ({e}):\n{}", show_output(&out)));
        (summary, took, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Restores the latest point to `out`.
    fn restore_latest(&self, out: &Path) {
        run(siterep()
            .args(["restore", "--disk", DISK, "--point", "latest", "--store"])
            .arg(&self.store)
            .arg("--out")
            .arg(out));
    }
}

impl Drop for RecoveryServer {
    fn drop(&mut self) {
        // SIGTERM, then SIGKILL if it lingers.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        if siterep_tests::wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- recovery server log ---\n{}", self.log());
        }
    }
}

/// Writes `size` bytes of pseudo-random data to `path` in the `data` ranges (holes elsewhere).
fn write_image(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(size).expect("set_len");
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 4 << 20];
    for &(offset, len) in data {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            file.write_all_at(&buf[..n], at).expect("write the image");
            at += n as u64;
        }
    }
    file.sync_all().expect("fsync the image");
}

/// Copies `from` to `to`, then writes each of `blocks` (offset, bytes) into the copy.
fn derive(from: &Path, to: &Path, blocks: &[(u64, Vec<u8>)]) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    let file = OpenOptions::new().write(true).open(to).expect("open the copy");
    for (offset, data) in blocks {
        file.write_all_at(data, *offset).expect("write a block");
    }
    file.sync_all().expect("fsync the copy");
}

/// `k` distinct random 4 KiB-aligned offsets below `size`, sorted.
fn random_blocks(rng: &mut Rng, size: u64, k: usize) -> Vec<u64> {
    let mut set = std::collections::BTreeSet::new();
    while set.len() < k {
        set.insert(rng.below(size / (4 * KIB)) * 4 * KIB);
    }
    set.into_iter().collect()
}

/// Asserts two files are byte-identical, naming the first differing offset.
#[track_caller]
fn assert_same_file(actual: &Path, expected: &Path) {
    let (mut a, mut b) = (File::open(actual).expect("open"), File::open(expected).expect("open"));
    assert_eq!(
        a.metadata().unwrap().len(),
        b.metadata().unwrap().len(),
        "{} has the wrong size",
        actual.display()
    );
    let (mut x, mut y) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut at = 0u64;
    loop {
        let n = a.read(&mut x).expect("read");
        if n == 0 {
            break;
        }
        b.read_exact(&mut y[..n]).expect("read");
        if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
            panic!("{} differs from {} at offset {}", actual.display(), expected.display(), at + i as u64);
        }
        at += n as u64;
    }
}

/// Makes the server hold `a` as its latest point: serve it (no state directory), run the
/// agent's initial copy.
fn replicate(server: &RecoveryServer, a: &Path) {
    let shim = Serve::new(a).start();
    let (initial, took) = server.run_agent(shim.socket(), &[]);
    assert_eq!(json_str(&initial, "kind"), "initial", "{initial:?}");
    eprintln!("initial copy of A: {} bytes read in {took:.1?}", json_u64(&initial, "bytes_read"));
    shim.stop();
}

/// Starts the shim on `b` with a fresh state directory: its tracking knows nothing of what
/// differs from the server's point, and says so.
fn serve_lost_tracking(b: &Path, state: &Path) -> siterep_tests::Server {
    let shim = Serve::new(b).state_dir(state).start();
    let st = control::status(shim.socket());
    assert!(
        st.get("resync_required").is_some_and(Value::is_string),
        "a fresh state requires a resync: {st:?}"
    );
    shim
}

#[test]
fn resync_sends_only_the_blocks_that_differ() {
    let rsync = rsync();
    let dir = scratch_dir("resync");
    let size = GIB;
    let k = 100;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    write_image(&a, size, &[(0, size)], 1);
    let mut rng = Rng::new(2);
    let changes: Vec<(u64, Vec<u8>)> =
        random_blocks(&mut rng, size, k).into_iter().map(|o| (o, rng.bytes(4 * KIB as usize))).collect();
    derive(&a, &b, &changes);

    let server = RecoveryServer::start(dir.path());
    replicate(&server, &a);
    let shim = serve_lost_tracking(&b, &dir.path().join("state"));

    // Automatic: the shim requires a resync and the server has a point to compare with. The
    // agent reads B itself (the shim names it on the control socket), not through the socket.
    // A fresh state directory is a new source identity: the agent re-enrolls the disk
    // (docs/wire.md §6.2), which requires the resync anyway.
    let (s, took, log) = server.run_agent_logged(shim.socket(), &["--reenroll"]);
    assert_eq!(json_str(&s, "kind"), "resync", "{s:?}");
    assert!(!log.contains(THROUGH_SOCKET), "the agent did not read the image directly:\n{log}");
    let (matched, transferred) = (json_u64(&s, "bytes_matched"), json_u64(&s, "bytes_transferred"));
    let (wire_out, wire_in) = (json_u64(&s, "wire_bytes_sent"), json_u64(&s, "wire_bytes_received"));
    assert_eq!(matched + transferred, size, "every byte is matched or transferred: {s:?}");
    let differing = k as u64 * 4 * KIB;
    assert!(transferred >= differing, "every differing block is sent: {s:?}");
    assert!(transferred <= differing * 11 / 10 + 64 * KIB, "only differing blocks are sent: {s:?}");
    assert!(json_u64(&s, "bytes_sent") <= differing * 11 / 10 + 64 * KIB, "{s:?}");
    let st = control::status(shim.socket());
    assert_eq!(st.get("resync_required"), Some(&Value::Null), "the resync cleared it: {st:?}");

    let restored = dir.path().join("restored.img");
    server.restore_latest(&restored);
    assert_same_file(&restored, &b);
    std::fs::remove_file(&restored).expect("remove the restored image");

    // Replication goes on from the resync's point: with nothing written since, the next cycle
    // records that point as current (docs/wire.md §6.9) and makes none.
    let (next, _) = server.run_agent(shim.socket(), &[]);
    assert_eq!(json_str(&next, "kind"), "unchanged", "{next:?}");
    assert_eq!(json_u64(&next, "point"), json_u64(&s, "point"), "{next:?} after {s:?}");
    shim.stop();

    // rsync's delta transfer on the same pair (A's copy updated in place to B).
    let a_copy = dir.path().join("a-rsync.img");
    std::fs::copy(&a, &a_copy).expect("copy A for rsync");
    let start = Instant::now();
    let out = run(Command::new(rsync).args(["--inplace", "--no-whole-file", "--stats"]).arg(&b).arg(&a_copy));
    let rsync_took = start.elapsed();
    let stats = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .map(|v| v.replace(',', "").parse().unwrap_or(0))
            .unwrap_or_else(|| panic!("rsync --stats has no {name:?}:\n{stats}"))
    };
    let (rsync_sent, rsync_received) = (field("Total bytes sent:"), field("Total bytes received:"));
    let literal = field("Literal data:");
    assert_same_file(&a_copy, &b);

    eprintln!(
        "\nresync of a {} MiB disk with {k} differing 4 KiB blocks ({} KiB):\n\
         \x20 siterep resync: transferred {} KiB of disk ({} B compressed chunk data), matched {} MiB; \
         wire {} B out + {} B in = {} KiB; read {} MiB; {:.2} s (agent run {:.2?})\n\
         \x20 rsync --inplace --no-whole-file: literal data {} KiB; traffic {} B sent + {} B received = {} KiB; {:.2?}",
        size >> 20,
        differing >> 10,
        transferred >> 10,
        json_u64(&s, "bytes_sent"),
        matched >> 20,
        wire_out,
        wire_in,
        (wire_out + wire_in) >> 10,
        json_u64(&s, "bytes_read") >> 20,
        json_u64(&s, "duration_ms") as f64 / 1000.0,
        took,
        literal >> 10,
        rsync_sent,
        rsync_received,
        (rsync_sent + rsync_received) >> 10,
        rsync_took,
    );
}

/// What the agent logs when its resync readers cannot read the image directly.
const THROUGH_SOCKET: &str = "reading the disk through the shim's socket";

/// The control socket names the image the shim serves. Once another file takes that name, the
/// shim fails every request with EIO and requires a resync (`docs/nbd.md`, the image is
/// watched): the agent's resync fails loudly and no point is made, neither of the file now at
/// the path nor of zeroes; the latest point stays the one before.
#[test]
fn a_replaced_image_file_fails_the_resync_loudly() {
    let dir = scratch_dir("resync-replaced");
    let size = 64 * MIB;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    write_image(&a, size, &[(0, size)], 5);
    let mut rng = Rng::new(6);
    let changes: Vec<(u64, Vec<u8>)> =
        random_blocks(&mut rng, size, 20).into_iter().map(|o| (o, rng.bytes(4 * KIB as usize))).collect();
    derive(&a, &b, &changes);
    let server = RecoveryServer::start(dir.path());
    replicate(&server, &a);
    let shim = serve_lost_tracking(&b, &dir.path().join("state"));

    let image = control::request_ok(&control::control_path(shim.socket()), r#"{"cmd":"image"}"#);
    let canonical = std::fs::canonicalize(&b).expect("canonicalize B");
    assert_eq!(json_str(&image, "path"), canonical.to_str().expect("UTF-8 path"), "{image:?}");
    assert_eq!(json_u64(&image, "size"), size, "{image:?}");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&b).expect("stat B");
        assert_eq!((json_u64(&image, "dev"), json_u64(&image, "ino")), (meta.dev(), meta.ino()));
    }

    // B's name now belongs to a copy of A; the shim still holds B's inode.
    let b_kept = dir.path().join("b-kept.img");
    std::fs::hard_link(&b, &b_kept).expect("keep B under another name");
    let impostor = dir.path().join("impostor.img");
    std::fs::copy(&a, &impostor).expect("copy A");
    std::fs::rename(&impostor, &b).expect("replace B's name");
    let mut last = Value::Null;
    let noticed = poll(Duration::from_secs(10), || {
        let st = control::status(shim.socket());
        let changed = st["image_changed"].is_object();
        if changed {
            assert_eq!(st["image_changed"]["kind"], "replaced", "{st}");
        }
        last = st;
        changed
    });
    assert!(noticed.is_some(), "the shim did not notice the replaced image: {last}");

    let points_before =
        std::fs::read_dir(server.store.join("disks").join(DISK).join("points")).expect("points").count();
    let out = run_unchecked(&mut server.agent(shim.socket(), &["--reenroll"]), AGENT_TIMEOUT);
    assert!(!out.status.success(), "the resync must fail loudly:\n{}", show_output(&out));
    let points_after =
        std::fs::read_dir(server.store.join("disks").join(DISK).join("points")).expect("points").count();
    assert_eq!(points_after, points_before, "no point is made from a replaced image");
    let st = control::status(shim.socket());
    assert!(st.get("resync_required").is_some_and(Value::is_string), "{st:?}");
    let restored = dir.path().join("restored.img");
    server.restore_latest(&restored);
    assert_same_file(&restored, &a);
    shim.stop();
}

#[test]
fn an_interrupted_resync_resumes_and_ends_equal() {
    let dir = scratch_dir("resync-kill");
    let size = 512 * MIB;
    // Data with holes between (the allocation map is used), then B: random blocks rewritten,
    // some zeroed, some written into A's holes; the first and the last block included.
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let data = [(0, 100 * MIB), (128 * MIB, 200 * MIB), (400 * MIB, 112 * MIB)];
    write_image(&a, size, &data, 3);
    let mut rng = Rng::new(4);
    let mut offsets = random_blocks(&mut rng, size, 60);
    offsets.extend([0, size - 4 * KIB]);
    let changes: Vec<(u64, Vec<u8>)> = offsets
        .into_iter()
        .enumerate()
        .map(|(i, o)| (o, if i % 5 == 0 { vec![0; 4096] } else { rng.bytes(4096) }))
        .collect();
    derive(&a, &b, &changes);

    let server = RecoveryServer::start(dir.path());
    replicate(&server, &a);
    let shim = serve_lost_tracking(&b, &dir.path().join("state"));

    // A slow resync (rate-limited), killed once the server has a checkpoint of it.
    let checkpoint = server.store.join("disks").join(DISK).join("initial.bin");
    let mut agent = server
        .agent(shim.socket(), &["--resync", "--resync-rate", "40M", "--reenroll"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let checkpointed = poll(Duration::from_secs(120), || {
        if let Some(st) = agent.try_wait().expect("try_wait") {
            panic!("the agent ended ({st}) before the resync checkpointed\n{}", server.log());
        }
        checkpoint.exists()
    });
    assert!(checkpointed.is_some(), "no resync checkpoint within 2 minutes\n{}", server.log());
    agent.kill().expect("kill the agent");
    agent.wait().expect("reap the agent");

    // The next run finds the interrupted resync on the server and continues it.
    let (s, _) = server.run_agent(shim.socket(), &[]);
    assert_eq!(json_str(&s, "kind"), "resync", "{s:?}");
    let processed = json_u64(&s, "bytes_matched") + json_u64(&s, "bytes_transferred");
    assert!(processed < size, "resumed, not started over: {s:?}");
    eprintln!("resumed resync processed {} of {} MiB: {s:?}", processed >> 20, size >> 20);
    let st = control::status(shim.socket());
    assert_eq!(st.get("resync_required"), Some(&Value::Null), "{st:?}");
    shim.stop();

    let restored = dir.path().join("restored.img");
    server.restore_latest(&restored);
    assert_same_file(&restored, &b);
}
