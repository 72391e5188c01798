//! Issue 6, proved with real clients: test failover (an instant export with a discarded
//! overlay), planned failover (quiesce, then fail over to exactly that point), unplanned
//! failover to the latest point after a crash of the protected side, and failback that sends
//! only what differs. Two more pin down what writing those found: the recovery site's
//! read-side commands must not disturb a running server, and failback must not report success
//! when the original's tracking was lost.
//!
//! Oracles are programs we did not write: fio's verify state says which writes were
//! acknowledged and checks them on the new primary, e2fsck judges the failed-over filesystem,
//! qemu-io and nbdinfo see what an export allows, and images are compared block by block here.
//!
//! `SITEREP_TEST_SEED` fixes the random layouts (the seed used is printed).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use siterep_tests::blockdev::{FuseExport, LoopDevice};
use siterep_tests::image::{self, Rng, GIB, KIB, MIB};
use siterep_tests::nbdinfo;
use siterep_tests::recovery::{self, differing_blocks, nbd_edits, Edit, Mount, NbdProcess};
use siterep_tests::replication::{
    self, now_ms, points, restore, AgentCmd, AgentProcess, Certs, RecoveryServer,
};
use siterep_tests::{
    json_str, json_u64, nbdsh, poll, run, run_expect_failure, run_unchecked, scratch_dir, show_output,
    siterep, tool, Serve, Server, COMMAND_TIMEOUT,
};

const DISK: &str = "vol1";
const BLOCK: u64 = 4 * KIB;

fn seed() -> u64 {
    let seed = std::env::var("SITEREP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64
    });
    eprintln!("SITEREP_TEST_SEED={seed}");
    seed
}

/// The recovery site: certificates, and `siterep server` on `DIR/store`.
fn recovery_site(dir: &Path) -> (Certs, RecoveryServer) {
    let certs = Certs::make(&dir.join("certs"));
    let server = RecoveryServer::start(&dir.join("store"), &certs, &[]);
    (certs, server)
}

fn agent(shim: &Server, server: &RecoveryServer, certs: &Certs) -> AgentCmd {
    AgentCmd::new(shim.socket(), server.addr(), DISK, certs).args(["--retry-scale", "0.001"])
}

/// blake3 over the index and contents of every non-zero 4 KiB block of `path` (holes are
/// skipped unread): equal digests mean equal contents, for sparse restores of any size.
fn content_digest(path: &Path) -> blake3::Hash {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    h.update(&f.metadata().expect("stat").len().to_le_bytes());
    let mut buf = vec![0u8; 4 << 20];
    for run in image::seek_layout(path).into_iter().filter(|r| r.data) {
        let mut pos = run.offset / BLOCK * BLOCK;
        let end = run.offset + run.length;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], pos).expect("read");
            for (i, block) in buf[..n].chunks(BLOCK as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    h.update(&(pos / BLOCK + i as u64).to_le_bytes());
                    h.update(block);
                }
            }
            pos += n as u64;
        }
    }
    h.finalize()
}

/// The point with id `id` in `points --json`.
fn point(store: &Path, id: u64) -> Value {
    points(store, DISK)
        .into_iter()
        .find(|p| json_u64(p, "id") == id)
        .unwrap_or_else(|| panic!("point {id} is not in `siterep points --json`"))
}

/// `(tag, unix ms)` pairs of a point's `tags`.
fn tags(p: &Value) -> Vec<(String, u64)> {
    serde_json::from_value(p["tags"].clone())
        .unwrap_or_else(|e| panic!("tags are [name, unix ms] ({e}): {p}"))
}

/// Runs `nbdinfo URI` until it succeeds; the time from `start` to that success.
fn time_to_first_nbdinfo(uri: &str, start: Instant, process: &mut NbdProcess) -> Duration {
    let left = Duration::from_secs(30).saturating_sub(start.elapsed());
    let answered = poll(left, || run_unchecked(tool("nbdinfo").arg(uri), COMMAND_TIMEOUT).status.success());
    assert!(answered.is_some(), "the export never answered nbdinfo:\n{}", process.log());
    start.elapsed()
}

/// `(point, cut_unix_ms)` of the last point the shim's agent reported, if any.
fn last_point(shim: &Server) -> Option<(u64, u64)> {
    match &replication::shim_status(shim.socket())["last_replicated"] {
        Value::Null => None,
        p => Some((json_u64(p, "point"), json_u64(p, "cut_unix_ms"))),
    }
}

/// Waits until the shim's agent has reported point `n` or later; returns that point's id.
fn wait_for_points(shim: &Server, agent: &mut AgentProcess, n: u64, timeout: Duration) -> u64 {
    let point = poll(timeout, || {
        agent.assert_running();
        last_point(shim).map(|p| p.0).filter(|&p| p >= n)
    });
    point.unwrap_or_else(|| panic!("no point {n} after {timeout:?}:\n{}", agent.log()))
}

// ---------------------------------------------------------------------------------------------
// 1. Test failover

/// A writable export (test failover) takes writes, block and filesystem alike, and reads them
/// back; when it stops, the point restores exactly as before. A read-only export refuses
/// writes. Both are ready fast on a 4 GiB disk.
#[test]
fn test_failover_leaves_the_point_unchanged() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let dir = scratch_dir("test-failover");
    let d = dir.path();
    let img = d.join("src.img");
    let size = 4 * GIB;
    image::create_sparse(&img, size);
    run(tool("mkfs.ext4").args(["-q", "-F", "-E", "nodiscard"]).arg(&img));
    // Data beyond what ext4 has used, for the block-level checks below.
    let data_at = 3 * GIB;
    image::write_at(&img, data_at, &rng.bytes(MIB as usize));

    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let (certs, server) = recovery_site(d);
    let store = server.store().to_owned();
    let agent = agent(&shim, &server, &certs);
    let first = agent.once();
    assert_eq!(json_str(&first, "kind"), "initial", "{first:?}");
    nbd_edits(
        &shim.uri(),
        &[
            Edit::Write { offset: data_at + 256 * KIB, len: 256 * KIB, seed: rng.next_u64() >> 1 },
            Edit::Write { offset: 2 * GIB + 12345, len: 5000, seed: rng.next_u64() >> 1 },
        ],
    );
    let second = agent.once();
    assert_eq!(json_str(&second, "kind"), "incremental", "{second:?}");
    let id = json_u64(&second, "point");
    let before = d.join("before.img");
    restore(&store, DISK, &id.to_string(), &before);
    let hash_before = content_digest(&before);
    let points_before = points(&store, DISK);

    // Read-only: nbdinfo says so, and a write fails (qemu-io refuses to open it for writing;
    // a client that sends the write anyway gets an error from the server).
    let start = Instant::now();
    let mut ro = recovery::spawn_export(&store, DISK, &id.to_string(), &d.join("ro.sock"), false);
    let ready_ro = time_to_first_nbdinfo(&ro.uri(), start, &mut ro);
    let info = nbdinfo::export_info(&ro.uri());
    assert_eq!(info.get("is_read_only"), Some(&Value::Bool(true)), "{info:?}");
    assert_eq!(json_u64(&info, "export-size"), size, "{info:?}");
    let out =
        run_expect_failure(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 4k"]).arg(ro.uri()));
    eprintln!("qemu-io write on the read-only export: {}", String::from_utf8_lossy(&out.stderr).trim());
    let out = run(nbdsh().arg("-u").arg(ro.uri()).arg("-c").arg(
        "h.set_strict_mode(0)\n\
         try:\n    h.pwrite(b'x' * 4096, 0)\n    print('ACCEPTED')\n\
         except nbd.Error as e:\n    print('REFUSED', e.errno)\n",
    ));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("REFUSED"), "the read-only export accepted a write sent anyway: {said}");
    ro.stop();

    // Writable: block writes through qemu-io (whole and partial blocks) read back.
    let start = Instant::now();
    let mut rw = recovery::spawn_export(&store, DISK, &id.to_string(), &d.join("rw.sock"), true);
    let ready_rw = time_to_first_nbdinfo(&rw.uri(), start, &mut rw);
    eprintln!(
        "export of a {} GiB point ready (first nbdinfo) after {:.0} ms read-only, {:.0} ms writable",
        size / GIB,
        ready_ro.as_secs_f64() * 1000.0,
        ready_rw.as_secs_f64() * 1000.0
    );
    for (what, t) in [("read-only", ready_ro), ("writable", ready_rw)] {
        assert!(t < Duration::from_secs(10), "the {what} export took {t:?} to answer nbdinfo");
    }
    let info = nbdinfo::export_info(&rw.uri());
    assert_eq!(info.get("is_read_only"), Some(&Value::Bool(false)), "{info:?}");
    let partial = data_at + 300 * KIB + 100; // inside the incremental's data, not block-aligned
    let cmds = [
        format!("write -P 0xa5 {data_at} 64k"),
        format!("write -P 0x3c {partial} 3000"),
        format!("write -P 0x77 {} 1M", 3 * GIB + 512 * MIB),
        format!("read -P 0xa5 {data_at} 64k"),
        format!("read -P 0x3c {partial} 3000"),
        format!("read -P 0x77 {} 1M", 3 * GIB + 512 * MIB),
        "flush".to_owned(),
    ];
    let mut qemu_io = tool("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for c in &cmds {
        qemu_io.arg("-c").arg(c);
    }
    let out = run(qemu_io.arg(rw.uri()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "qemu-io read back other data:\n{text}");
    // Around the partial write, the rest of each block is the point's.
    let expected = {
        let f = File::open(&before).expect("open the restore");
        let mut buf = vec![0u8; 3 * BLOCK as usize];
        let base = partial / BLOCK * BLOCK - BLOCK;
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, base).expect("read the restore");
        let at = (partial - base) as usize;
        buf[at..at + 3000].fill(0x3c);
        (base, buf)
    };
    let got = d.join("window.bin");
    run(nbdsh().arg("-u").arg(rw.uri()).arg("-c").arg(format!(
        "open({:?}, 'wb').write(h.pread({}, {}))",
        got.display().to_string(),
        expected.1.len(),
        expected.0
    )));
    image::assert_same_bytes("the blocks around a partial write", &image::read(&got), &expected.1);

    // A filesystem on the overlay: nbdfuse → loop → ext4, files written, remounted, read back.
    let fuse = FuseExport::mount(&d.join("fuse"), &rw.uri());
    let dev = LoopDevice::attach(&fuse.file());
    let mnt = d.join("mnt");
    let mut files = Vec::new();
    {
        let m = Mount::ext4(dev.path(), &mnt, None);
        for i in 0..16u64 {
            let len = 64 * KIB + rng.below(192 * KIB);
            let data = rng.bytes(len as usize);
            let path = m.path().join(format!("test-{i:02}.bin"));
            let mut f = File::create(&path).expect("create a file on the overlay");
            f.write_all(&data).expect("write a file on the overlay");
            f.sync_all().expect("fsync a file on the overlay");
            files.push((path.file_name().expect("name").to_owned(), data));
        }
        m.unmount();
    }
    {
        let m = Mount::ext4(dev.path(), &mnt, None);
        for (name, data) in &files {
            let got = std::fs::read(m.path().join(name)).expect("read a file back from the overlay");
            assert!(&got == data, "{name:?} reads back differently from the overlay");
        }
        m.unmount();
    }
    let out = run_unchecked(tool("e2fsck").args(["-f", "-n"]).arg(dev.path()), COMMAND_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "e2fsck -f -n of the overlay's filesystem\n{}", show_output(&out));
    dev.detach();
    fuse.unmount();
    rw.stop();

    // The point never changed.
    let after = d.join("after.img");
    restore(&store, DISK, &id.to_string(), &after);
    assert_eq!(content_digest(&after), hash_before, "the point changed under the writable export");
    let points_after = points(&store, DISK);
    assert_eq!(points_after, points_before, "the export changed the store's points");

    // The test passed: tag the point, with the time.
    let t0 = now_ms();
    recovery::tag_point(&store, DISK, id, "tested");
    let t1 = now_ms();
    let p = point(&store, id);
    let tagged: Vec<_> = tags(&p).into_iter().filter(|(t, _)| t == "tested").collect();
    assert_eq!(tagged.len(), 1, "point {id} should carry the tag `tested` once: {p:?}");
    assert!(
        (t0..=t1).contains(&tagged[0].1),
        "the tag's time {} is not when it was tagged ({t0}..={t1})",
        tagged[0].1
    );
    drop(shim);
}

// ---------------------------------------------------------------------------------------------
// 2. Planned failover

/// fio's write phase with a verify state, and its verify phase: the same job either way.
fn fio_job(uri: &str, state_dir: &Path, verify: bool) -> std::process::Command {
    let mut cmd = tool("fio");
    cmd.arg("--name=planned")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(["--rw=randwrite", "--bs=4k", "--size=192M", "--iodepth=16", "--randrepeat=1"])
        .args(["--runtime=6s", "--rate=,12m", "--verify=crc32c", "--group_reporting"])
        .arg(format!("--aux-path={}", state_dir.display()));
    if verify {
        cmd.args(["--verify_only", "--verify_state_load=1"]);
    } else {
        cmd.args(["--verify_state_save=1", "--do_verify=0"]);
    }
    cmd
}

/// A write phase under continuous replication, quiesce, failover to the point quiesce named:
/// fio verifies every acknowledged write on the new primary, which equals the source.
#[test]
fn planned_failover_loses_nothing() {
    let dir = scratch_dir("planned");
    let d = dir.path();
    let img = d.join("src.img");
    let size = 512 * MIB;
    image::create_sparse(&img, size);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let (certs, server) = recovery_site(d);
    let store = server.store().to_owned();
    let mut agent_proc = agent(&shim, &server, &certs).args(["--interval", "1s"]).spawn(&d.join("agent.log"));
    // Progress is read from the shim, never from the store while the server writes it (see
    // `recovery_site_commands_leave_replication_alone`).
    let before_fio = wait_for_points(&shim, &mut agent_proc, 1, Duration::from_secs(60));

    let fio_state = d.join("fio-state");
    std::fs::create_dir(&fio_state).expect("create the fio state directory");
    let out = run(&mut fio_job(&shim.uri(), &fio_state, false));
    let fio_end = now_ms();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("err= 0"), "fio's write phase reported errors:\n{text}");
    let written = replication::fio_written_bytes(&text).expect("fio's WRITE io= figure");
    let states: Vec<_> = std::fs::read_dir(&fio_state).expect("read the fio state dir").collect();
    assert!(!states.is_empty(), "fio saved no verify state in {}", fio_state.display());
    let during = last_point(&shim).map_or(0, |p| p.0);
    eprintln!("fio wrote {written} bytes; {during} points committed so far");
    assert!(during > before_fio, "the agent should have committed a point while fio wrote (last: {during})");

    let q = recovery::quiesce(shim.socket());
    let id = json_u64(&q, "point");
    let cut = json_u64(&q, "cut_unix_ms");
    eprintln!("quiesce: {q:?}");
    assert!(cut >= fio_end, "the quiesced point was cut at {cut}, before fio ended at {fio_end}");
    assert_eq!(json_u64(&point(&store, id), "cut_unix_ms"), cut, "the store's point {id} vs quiesce's");
    let out =
        run_expect_failure(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 4k"]).arg(shim.uri()));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains("Operation not permitted"),
        "a write after quiesce should fail with EPERM:\n{said}"
    );
    agent_proc.kill();

    let new_primary = recovery::failover(
        &store,
        DISK,
        &id.to_string(),
        &d.join("failover.img"),
        &d.join("s2.sock"),
        &d.join("state2"),
        Duration::from_secs(120),
    );
    recovery::commit_failover(&store, DISK, id);
    assert!(
        tags(&point(&store, id)).iter().any(|(t, _)| t == "failover"),
        "--commit should tag point {id} `failover`: {:?}",
        point(&store, id)
    );

    let out = run(&mut fio_job(&new_primary.uri(), &fio_state, true));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("err= 0"), "fio's verify on the new primary reported errors:\n{text}");
    let read_line = text.lines().find(|l| l.trim_start().starts_with("READ:"));
    eprintln!("fio verify on the new primary: {}", read_line.unwrap_or("<no READ line>").trim());
    assert!(read_line.is_some_and(|l| !l.contains("io=0B")), "fio verified nothing:\n{text}");
    // Not vacuous: the same verify fails on the point cut before fio wrote.
    let old = recovery::export(&store, DISK, &before_fio.to_string(), &d.join("old.sock"), false);
    let out = run_unchecked(&mut fio_job(&old.uri(), &fio_state, true), COMMAND_TIMEOUT);
    assert!(
        !out.status.success(),
        "fio verify passed on the point before its writes:\n{}",
        show_output(&out)
    );
    old.stop();
    // The source refused every write since the cut: the new primary is the source exactly.
    replication::assert_same_files("the new primary", &d.join("failover.img"), &img);
    new_primary.stop();

    // An aborted planned failover: thaw accepts writes again.
    run(siterep().arg("thaw").arg("--socket").arg(shim.socket()));
    run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 4k"]).arg(shim.uri()));
    drop(shim);
}

// ---------------------------------------------------------------------------------------------
// 3. Unplanned failover

/// One file the workload wrote: `f{index}`, `len` bytes from `Rng::new(seed)`, durable
/// (file and directory fsynced) at `done_ms`.
#[derive(Debug, Clone, Copy)]
struct Written {
    index: u64,
    len: usize,
    seed: u64,
    done_ms: u64,
}

fn file_contents(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Writes files into `dir` until `stop` or the first error: each written, fsynced, its
/// directory fsynced, then recorded.
fn file_workload(dir: PathBuf, seed: u64, stop: Arc<AtomicBool>) -> (Vec<Written>, Option<String>) {
    let mut rng = Rng::new(seed);
    let mut done = Vec::new();
    for index in 0.. {
        if stop.load(Ordering::SeqCst) {
            return (done, None);
        }
        let len = (4 * KIB + rng.below(252 * KIB)) as usize;
        let fseed = rng.next_u64();
        let path = dir.join(format!("f{index:05}"));
        let result = (|| -> std::io::Result<()> {
            let mut f = File::create(&path)?;
            f.write_all(&file_contents(fseed, len))?;
            f.sync_all()?;
            File::open(&dir)?.sync_all()
        })();
        if let Err(e) = result {
            return (done, Some(format!("{}: {e}", path.display())));
        }
        done.push(Written { index, len, seed: fseed, done_ms: now_ms() });
        // A steady stream of files, not a flood: the pace of the workload.
        std::thread::sleep(Duration::from_millis(20));
    }
    unreachable!()
}

/// ext4 on the protected disk (nbdfuse → loop → the shim) takes a stream of fsynced files
/// while a continuous agent replicates; the shim and the agent are SIGKILLed; failover to the
/// latest point: the filesystem checks clean and every file durable before the point's cut is
/// intact.
#[test]
fn unplanned_failover_to_latest() {
    let seed = seed();
    let dir = scratch_dir("unplanned");
    let d = dir.path();
    let (shim, certs, server) = recovery::ext4_protected_site(d, GIB);
    let store = server.store().to_owned();
    let mut agent_proc = agent(&shim, &server, &certs).args(["--interval", "1s"]).spawn(&d.join("agent.log"));
    wait_for_points(&shim, &mut agent_proc, 1, Duration::from_secs(60));

    let fuse = FuseExport::mount(&d.join("fuse"), &shim.uri());
    let dev = LoopDevice::attach(&fuse.file());
    let mount = Mount::ext4(dev.path(), &d.join("mnt"), None);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop) = (mount.path().to_owned(), stop.clone());
        std::thread::spawn(move || file_workload(dir, seed, stop))
    };
    // Let several generations go by under the workload: at least 8 s and 6 points.
    let start = Instant::now();
    let went_by = poll(Duration::from_secs(120), || {
        assert!(!writer.is_finished(), "the file workload stopped early");
        agent_proc.assert_running();
        start.elapsed() >= Duration::from_secs(8) && last_point(&shim).map_or(0, |p| p.0) >= 6
    });
    assert!(went_by.is_some(), "fewer than 6 points after 120 s:\n{}", agent_proc.log());
    // The protected site dies: agent and shim at once, the workload still writing.
    agent_proc.kill();
    shim.kill();
    let killed_ms = now_ms();
    // The workload runs into the dead disk (EIO) by itself; it is told to stop after 5 s.
    if poll(Duration::from_secs(5), || writer.is_finished()).is_none() {
        stop.store(true, Ordering::SeqCst);
        let ended = poll(Duration::from_secs(115), || writer.is_finished());
        assert!(ended.is_some(), "the file workload hangs after the shim died");
    }
    let (files, error) = writer.join().expect("the workload thread");
    eprintln!("workload: {} files durable before the kill; it ended with {error:?}", files.len());
    if let Some(e) = mount.unmount_dead() {
        eprintln!("unmounting the dead filesystem: {e}");
    }
    drop(dev);
    drop(fuse);

    let all = points(&store, DISK);
    let latest = all.last().expect("points").clone();
    let cut = json_u64(&latest, "cut_unix_ms");
    eprintln!(
        "{} points; latest {} cut {} ms before the kill",
        all.len(),
        json_u64(&latest, "id"),
        killed_ms - cut
    );
    let (failed_over, new_primary) = recovery::failover_to_latest(&store, DISK, d, json_u64(&latest, "id"));

    let copy = d.join("fsck.img");
    recovery::sparse_copy(&failed_over, &copy);
    let (code, out) = replication::e2fsck(&["-f", "-y"], &copy);
    assert!(code <= 1, "e2fsck -f -y of the failed-over disk exited {code}:\n{out}");
    eprintln!("e2fsck -f -y: exit {code}");
    let (code, out) = replication::e2fsck(&["-f", "-n"], &copy);
    assert_eq!(code, 0, "e2fsck -f -n after the repair run is not clean:\n{out}");

    let before_cut: Vec<&Written> = files.iter().filter(|w| w.done_ms < cut).collect();
    eprintln!(
        "{} of {} files were durable before the point's cut: checking those",
        before_cut.len(),
        files.len()
    );
    assert!(before_cut.len() >= 20, "too few files before the cut to prove anything: {}", before_cut.len());
    let dev = LoopDevice::attach(&copy);
    let m = Mount::ext4(dev.path(), &d.join("check"), Some("ro"));
    let mut bad = Vec::new();
    for w in &before_cut {
        let path = m.path().join(format!("f{:05}", w.index));
        match std::fs::read(&path) {
            Ok(got) if got == file_contents(w.seed, w.len) => {}
            Ok(got) => {
                bad.push(format!("f{:05}: {} bytes, expected {} (other contents)", w.index, got.len(), w.len))
            }
            Err(e) => bad.push(format!("f{:05}: {e}", w.index)),
        }
    }
    m.unmount();
    dev.detach();
    assert!(
        bad.is_empty(),
        "files durable before the cut are damaged on the failed-over disk:\n{}",
        bad.join("\n")
    );
    new_primary.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. Failback

/// `count` distinct random block numbers in `[0, blocks)`.
fn random_blocks(rng: &mut Rng, blocks: u64, count: usize) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    while set.len() < count {
        set.insert(rng.below(blocks));
    }
    set
}

fn writes(rng: &mut Rng, blocks: impl IntoIterator<Item = u64>) -> Vec<Edit> {
    blocks
        .into_iter()
        .map(|b| Edit::Write { offset: b * BLOCK, len: BLOCK, seed: rng.next_u64() >> 1 })
        .collect()
}

/// Writes of random data to `count` distinct random blocks.
fn random_writes(rng: &mut Rng, blocks: u64, count: usize) -> Vec<Edit> {
    let set = random_blocks(rng, blocks, count);
    writes(rng, set)
}

fn summary_kind(s: &Value) -> String {
    json_str(s, "kind").to_owned()
}

/// Unplanned failover, writes on both sides, failback: the original ends equal to the failover
/// disk after receiving about what differs, and its agent goes on incrementally. Then, with the
/// original's tracking lost, `--compare-all` still makes them equal.
#[test]
fn failback_sends_only_what_differs() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let dir = scratch_dir("failback");
    let d = dir.path();
    let img = d.join("src.img");
    let size = 256 * MIB;
    let blocks = size / BLOCK;
    image::create_with_data(&img, size, &[(0, 64 * MIB), (128 * MIB, 32 * MIB)], rng.next_u64());
    let socket = d.join("src.sock");
    let state = d.join("state");
    let original = || Serve::new(&img).state_dir(&state).socket(&socket);
    let mut shim = original().start();
    let (certs, server) = recovery_site(d);
    let store = server.store().to_owned();
    let agent = AgentCmd::new(&socket, server.addr(), DISK, &certs).args(["--retry-scale", "0.001"]);
    assert_eq!(summary_kind(&agent.once()), "initial");
    let e = random_writes(&mut rng, blocks, 50);
    nbd_edits(&shim.uri(), &e);
    assert_eq!(summary_kind(&agent.once()), "incremental");

    // Unplanned failover to the latest point.
    let failed_over = d.join("failover.img");
    let s2 = d.join("s2.sock");
    let new_primary = recovery::failover(
        &store,
        DISK,
        "latest",
        &failed_over,
        &s2,
        &d.join("state2"),
        Duration::from_secs(120),
    );
    // The new primary's writes: random blocks, some trims and write-zeroes over data.
    let fo_blocks = random_blocks(&mut rng, blocks, 300);
    let mut e = writes(&mut rng, fo_blocks.iter().copied());
    for _ in 0..8 {
        e.push(Edit::Trim { offset: rng.below(64 * MIB / (64 * KIB)) * 64 * KIB, len: 64 * KIB });
    }
    for _ in 0..4 {
        e.push(Edit::Zero { offset: (128 * MIB / BLOCK + rng.below(8192)) * BLOCK, len: 16 * KIB });
    }
    nbd_edits(&recovery_uri(&s2), &e);
    // The original's last writes, never replicated: some on blocks the new primary also wrote.
    let mut orig_blocks = random_blocks(&mut rng, blocks, 80);
    orig_blocks.extend(fo_blocks.iter().copied().step_by(15));
    let mut e = writes(&mut rng, orig_blocks.iter().copied());
    e.push(Edit::Trim { offset: 8 * MIB, len: 32 * KIB });
    nbd_edits(&shim.uri(), &e);
    // The original site comes back: its shim restarts on its state.
    shim.stop();
    shim = original().start();
    let st = replication::shim_status(&socket);
    assert_eq!(
        st.get("resync_required"),
        Some(&Value::Null),
        "the original's tracking should be intact: {st:?}"
    );

    let differing = differing_blocks(&img, &failed_over, BLOCK);
    let differ_bytes = differing.len() as u64 * BLOCK;
    assert!(differ_bytes > 0, "the two sides should differ before failback");
    let report = recovery::failback(&s2, &socket, false);
    let moved = json_u64(&report, "bytes_sent") + json_u64(&report, "bytes_zeroed");
    let ratio = moved as f64 / differ_bytes as f64;
    eprintln!(
        "failback: {} bytes differ ({} blocks); sent {} + zeroed {} = {moved} (ratio {ratio:.3}); candidates {}; {} ms",
        differ_bytes,
        differing.len(),
        json_u64(&report, "bytes_sent"),
        json_u64(&report, "bytes_zeroed"),
        json_u64(&report, "candidate_bytes"),
        json_u64(&report, "duration_ms")
    );
    let left = differing_blocks(&img, &failed_over, BLOCK);
    assert!(
        left.is_empty(),
        "after failback {} blocks still differ, the first {:?}",
        left.len(),
        &left[..left.len().min(8)]
    );
    assert!(
        ratio <= 1.1,
        "failback moved {moved} bytes for {differ_bytes} differing bytes (ratio {ratio:.3} > 1.1)"
    );

    // Replication resumes in the original direction with an ordinary incremental.
    let s = agent.once();
    eprintln!("the original's agent after failback: {s:?}");
    assert_eq!(summary_kind(&s), "incremental", "replication should resume without a full copy: {s:?}");
    let restored = d.join("restored.img");
    restore(&store, DISK, "latest", &restored);
    replication::assert_same_files("the latest point after failback", &restored, &failed_over);

    // Tracking lost on the original: --compare-all finds the differences by hash.
    run(siterep().arg("thaw").arg("--socket").arg(&s2));
    let e = random_writes(&mut rng, blocks, 100);
    nbd_edits(&recovery_uri(&s2), &e);
    let e = random_writes(&mut rng, blocks, 30);
    nbd_edits(&shim.uri(), &e);
    shim.stop();
    std::fs::remove_dir_all(&state).expect("delete the original's state directory");
    shim = original().start();
    let st = replication::shim_status(&socket);
    assert_ne!(
        st.get("resync_required"),
        Some(&Value::Null),
        "a fresh state directory should require a resync: {st:?}"
    );
    let differing = differing_blocks(&img, &failed_over, BLOCK);
    let pieces: BTreeSet<u64> = differing.iter().map(|b| b * BLOCK / MIB).collect();
    let report = recovery::failback(&s2, &socket, true);
    let moved = json_u64(&report, "bytes_sent") + json_u64(&report, "bytes_zeroed");
    eprintln!(
        "failback --compare-all: {} blocks differ in {} MiB pieces; sent {} + zeroed {}, matched {}; {} ms",
        differing.len(),
        pieces.len(),
        json_u64(&report, "bytes_sent"),
        json_u64(&report, "bytes_zeroed"),
        json_u64(&report, "bytes_matched"),
        json_u64(&report, "duration_ms")
    );
    let left = differing_blocks(&img, &failed_over, BLOCK);
    assert!(left.is_empty(), "after failback --compare-all {} blocks still differ", left.len());
    assert_eq!(
        moved + json_u64(&report, "bytes_matched"),
        size,
        "--compare-all covers the disk once: {report:?}"
    );
    assert!(
        moved <= pieces.len() as u64 * MIB,
        "--compare-all sent more than the pieces that differ: {report:?}"
    );
    new_primary.stop();
    drop(shim);
}

fn recovery_uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

// ---------------------------------------------------------------------------------------------
// Found while writing the above

/// The recovery site's read-side commands (`points`, `restore`) run while an agent ships
/// generations: replication must go on undisturbed and the latest point must equal the source.
/// (Each of them opens the store; opening it must not touch what the running server holds.)
#[test]
fn recovery_site_commands_leave_replication_alone() {
    let dir = scratch_dir("concurrent");
    let d = dir.path();
    let img = d.join("src.img");
    let size = 256 * MIB;
    image::create_sparse(&img, size);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let (certs, server) = recovery_site(d);
    let store = server.store().to_owned();
    let mut agent_proc = agent(&shim, &server, &certs).args(["--interval", "1s"]).spawn(&d.join("agent.log"));
    wait_for_points(&shim, &mut agent_proc, 1, Duration::from_secs(60));
    let load = replication::FioLoad::start(
        &shim.uri(),
        size,
        "4k-64k",
        "8m",
        Duration::from_secs(10),
        &d.join("fio.log"),
    );
    let start = Instant::now();
    let mut opens = 0;
    // Other commands open the store five times a second while the load replicates (a paced
    // load, not a wait).
    while start.elapsed() < Duration::from_secs(10) {
        let _ = points(&store, DISK);
        opens += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    load.wait();
    let done = now_ms();
    eprintln!("{opens} `siterep points` while replicating");
    let refused = server.log().lines().filter(|l| l.contains("refusing")).count();
    let mut last = Value::Null;
    let caught_up = poll(Duration::from_secs(90), || {
        agent_proc.assert_running();
        last = replication::shim_status(shim.socket());
        replication::replicated_since(&last, done)
    });
    assert!(
        caught_up.is_some(),
        "replication stopped while the store was opened by other commands ({refused} refusals so far); \
         shim status {last}\n--- server log (tail) ---\n{}",
        tail(&server.log(), 15)
    );
    let restored = d.join("restored.img");
    restore(&store, DISK, "latest", &restored);
    replication::assert_same_files("the latest point", &restored, &img);
    agent_proc.kill();
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Failback when the original's tracking was lost (its state directory is new) cannot know
/// what the original wrote after the point: without `--compare-all` it must refuse (or
/// compare anyway), never report success and leave the two disks different.
#[test]
fn failback_without_tracking_is_not_silent() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let dir = scratch_dir("failback-lost");
    let d = dir.path();
    let img = d.join("src.img");
    let size = 64 * MIB;
    let blocks = size / BLOCK;
    image::create_with_data(&img, size, &[(0, 16 * MIB)], rng.next_u64());
    let socket = d.join("src.sock");
    let state = d.join("state");
    let original = || Serve::new(&img).state_dir(&state).socket(&socket);
    let mut shim = original().start();
    let (certs, server) = recovery_site(d);
    let store = server.store().to_owned();
    let agent = AgentCmd::new(&socket, server.addr(), DISK, &certs).args(["--retry-scale", "0.001"]);
    assert_eq!(summary_kind(&agent.once()), "initial");
    let failed_over = d.join("failover.img");
    let s2 = d.join("s2.sock");
    let new_primary = recovery::failover(
        &store,
        DISK,
        "latest",
        &failed_over,
        &s2,
        &d.join("state2"),
        Duration::from_secs(120),
    );
    nbd_edits(&recovery_uri(&s2), &random_writes(&mut rng, blocks, 20));
    // The original's last writes, never replicated; then it loses its tracking state.
    nbd_edits(&shim.uri(), &random_writes(&mut rng, blocks, 20));
    shim.stop();
    std::fs::remove_dir_all(&state).expect("delete the original's state directory");
    shim = original().start();
    let out = run_unchecked(
        siterep().args(["failback", "--json", "--from"]).arg(&s2).arg("--to").arg(&socket),
        COMMAND_TIMEOUT,
    );
    let left = differing_blocks(&img, &failed_over, BLOCK);
    eprintln!(
        "failback without --compare-all, tracking lost: {}; {} blocks differ after",
        out.status,
        left.len()
    );
    assert!(
        !out.status.success() || left.is_empty(),
        "failback reported success but {} blocks still differ (the original's writes after the point, \
         which its lost tracking cannot name):\n{}",
        left.len(),
        show_output(&out)
    );
    new_primary.stop();
    drop(shim);
}
