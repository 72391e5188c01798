//! Issue 5, proved end to end: `siterep serve` tracks, `siterep agent` ships generations over
//! mutual TLS, `siterep server` makes them durable recovery points, `siterep restore` brings any
//! point back byte for byte.
//!
//! - `restores_match_the_source`: the initial copy and an incremental of random qemu-io writes,
//!   trims and zeroes restore to exactly the source, and the earlier point to the earlier copy.
//! - `crash_consistency_under_load`: fio writes while an agent replicates every second; once the
//!   shim reports nothing left to replicate, the latest point is the image. Points cut while
//!   ext4 was being written are crash-consistent: a boot-time `e2fsck -p` accepts them, they are
//!   clean afterwards, and every file fsynced before the cut is there, intact.
//! - `faults_never_lose_data`: SIGKILL of the agent during the initial copy and during
//!   continuous replication, SIGKILL of the server (during an initial copy and continuous
//!   replication), connections cut by a proxy: replication resumes by itself each time, the
//!   final restores equal the sources, and every committed point still restores (hash-verified).
//! - `server_rejects_bad_input`: a raw client (rustls + `wire`) sends corrupt chunks, truncated
//!   and oversize frames, an unknown version, out-of-place frames, a wrong base, another disk's
//!   identity (`siterep certs init` enrollment) and certificates the server must not trust;
//!   each is refused with a clear error (an `Error` frame, or a TLS alert) and nothing is
//!   stored. The agent itself exits at once on authentication and authorization failures.
//!   Every case is checked and the wrong ones are reported together.
//! - `agent_cli_errors`: bad command lines end with one error line and a non-zero exit.
//!
//! Oracles are the source images themselves (compared byte for byte), programs we did not
//! write (qemu-io, fio, mkfs.ext4, e2fsck, debugfs, openssl), and the store's documented layout
//! (`docs/store.md`), read here only to time faults, never to judge correctness.
//!
//! `SITEREP_TEST_SEED` fixes the random layouts, writes and fault moments (the seed is printed).

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::tls::{client_config, TlsFiles};
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, StreamOwned};
use serde_json::Value;
use siterep_tests::blockdev::{FuseExport, LoopDevice};
use siterep_tests::image::{self, Rng, KIB, MIB};
use siterep_tests::replication::{
    self, allocated_bytes, assert_same_files, committed_points_in_log, e2fsck, generations, now_ms, points,
    restore, shim_status, wait_replicated, AgentCmd, AgentProcess, Certs, FioLoad, Proxy, RecoveryServer,
};
use siterep_tests::{
    json_array, json_str, json_u64, parse_json, require_tool, run, run_unchecked, scratch_dir, siterep, tool,
    wait_until, Serve, Server,
};
use wire::{ChunkData, Consistency, ErrorClass, Frame, GenerationKind};

/// The tracking granularity (`siterep serve` default).
const BLOCK: u64 = 4 * KIB;
/// Dirty runs closer than this ship as one chunk (`agent::ship::MIN_CHUNK`).
const MIN_CHUNK: u64 = 16 * KIB;

fn seed() -> u64 {
    let seed = std::env::var("SITEREP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64
    });
    eprintln!("SITEREP_TEST_SEED={seed}");
    seed
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Data ranges covering about three quarters of `size`: runs of 64 KiB–8 MiB separated by holes
/// of 64 KiB–4 MiB, all 64 KiB-aligned.
fn holey_layout(rng: &mut Rng, size: u64) -> Vec<(u64, u64)> {
    let unit = 64 * KIB;
    let mut out = Vec::new();
    let mut pos = rng.below(4) * unit;
    while pos < size {
        let len = ((1 + rng.below(128)) * unit).min(size - pos);
        out.push((pos, len));
        pos += len + (1 + rng.below(64)) * unit;
    }
    out
}

/// A sparse image of `size` bytes with pseudo-random data in `data` and holes elsewhere,
/// written in pieces (never held in memory whole).
fn random_image(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let file = image::create_sparse(path, size);
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; (4 * MIB) as usize];
    for &(offset, len) in data {
        let mut pos = offset;
        while pos < offset + len {
            let n = (4 * MIB).min(offset + len - pos) as usize;
            rng.fill(&mut buf[..n]);
            file.write_all_at(&buf[..n], pos).expect("write the image");
            pos += n as u64;
        }
    }
    file.sync_all().expect("fsync the image");
}

/// Sorted, merged union of `(offset, len)` ranges.
fn union(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = ranges.iter().map(|&(o, l)| (o, o + l)).collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Whether the store has any recovery point of `disk` (`disks/<disk>/points/<id>.json`, per
/// `docs/store.md`). Read from the directory so that no second process opens the store while
/// the server runs (one process per store, `docs/store.md` "Media assumptions").
fn has_point(store: &Path, disk: &str) -> bool {
    std::fs::read_dir(store.join("disks").join(disk).join("points"))
        .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json"))))
}

/// The durable offset of an interrupted initial copy (`disks/<disk>/initial.bin`: magic,
/// version u32, generation u64, has_base u8, base u64, next_offset u64, all little-endian).
fn checkpoint_offset(store: &Path, disk: &str) -> Option<u64> {
    let b = std::fs::read(store.join("disks").join(disk).join("initial.bin")).ok()?;
    (b.len() >= 37 && b.starts_with(b"SRINITC\0"))
        .then(|| u64::from_le_bytes(b[29..37].try_into().expect("8")))
}

/// The cut time of the last point the agent reported to the shim, if any.
fn last_replicated_cut(socket: &Path) -> Option<u64> {
    match &shim_status(socket)["last_replicated"] {
        Value::Null => None,
        p => Some(json_u64(p, "cut_unix_ms")),
    }
}

/// Whether the shim holds an unreleased generation (the agent is shipping or committing it).
fn generation_in_flight(socket: &Path) -> bool {
    !generations(&shim_status(socket)).is_empty()
}

/// Waits until the agent of the shim at `socket` has committed a point cut after `since_ms`.
#[track_caller]
fn wait_new_point(socket: &Path, since_ms: u64, timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_until(
        &format!("a point cut after {since_ms} is replicated from {}", socket.display()),
        timeout,
        || last_replicated_cut(socket).is_some_and(|c| c > since_ms),
    );
    start.elapsed()
}

/// qemu-io on `uri` with these `-c` commands; fails if it exits non-zero or reports a failure.
#[track_caller]
fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("failed") && !text.contains("rror"), "qemu-io reported a failure:\n{text}");
}

// =============================================================================================
// 1. Restores match the source

#[test]
fn restores_match_the_source() {
    const SIZE: u64 = 256 * MIB;
    const DISK: &str = "d1";
    require_tool("qemu-io");
    let mut rng = Rng::new(seed());
    let dir = scratch_dir("repl-restore");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));

    // A random image with holes, and one allocated range of zeroes.
    let img = d.join("disk.img");
    let layout = holey_layout(&mut rng, SIZE);
    random_image(&img, SIZE, &layout, rng.next_u64());
    image::write_at(&img, 200 * MIB, &vec![0u8; MIB as usize]);
    let data_bytes = allocated_bytes(&img);
    assert!(data_bytes < SIZE * 9 / 10 && data_bytes > SIZE / 2, "layout: {} of data", mib(data_bytes));

    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let agent = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs);

    // The initial copy: everything allocated is read, holes are skipped.
    let first = agent.once();
    assert_eq!(json_str(&first, "kind"), "initial", "{first:?}");
    assert_eq!(json_str(&first, "consistency"), "inconsistent", "a fuzzy full copy: {first:?}");
    let p1 = json_u64(&first, "point");
    assert_eq!(
        json_u64(&first, "bytes_read"),
        data_bytes,
        "the initial copy reads exactly the allocated ranges: {first:?}"
    );
    let r1 = d.join("restore-1.img");
    let report = restore(&store, DISK, &p1.to_string(), &r1);
    assert_same_files("the initial point", &r1, &img);
    eprintln!(
        "initial copy: {} allocated of {}, read {}, sent {}, {} ms; restore wrote {} (allocated {})",
        mib(data_bytes),
        mib(SIZE),
        mib(json_u64(&first, "bytes_read")),
        mib(json_u64(&first, "bytes_sent")),
        json_u64(&first, "duration_ms"),
        mib(json_u64(&report, "bytes_written")),
        mib(allocated_bytes(&r1)),
    );
    assert!(allocated_bytes(&r1) <= data_bytes, "the restore is sparse where the source has holes");
    let copy0 = d.join("copy-0.img");
    std::fs::copy(&img, &copy0).expect("copy the source after the first point");

    // Random writes (constant patterns and random data), trims and zeroes, aligned and not.
    let mut cmds = Vec::new();
    let mut changed = Vec::new();
    for i in 0..40u64 {
        let len = 512 * (1 + rng.below(4096));
        let off = 512 * rng.below((SIZE - len) / 512);
        if i % 2 == 0 {
            cmds.push(format!("write -P {} {off} {len}", 1 + rng.below(255)));
        } else {
            let pattern = d.join(format!("pattern-{i}.bin"));
            std::fs::write(&pattern, rng.bytes(len as usize)).expect("write a pattern file");
            cmds.push(format!("write -s {} {off} {len}", pattern.display()));
        }
        changed.push((off, len));
    }
    for (verb, off, len) in [
        ("discard", 16 * MIB, MIB),            // whole blocks: a zero extent
        ("discard", 33 * MIB + 512, 99 * KIB), // partial blocks at both ends
        ("write -z", 48 * MIB, 256 * KIB),
        ("write -z", 70 * MIB + 1536, 3 * KIB), // inside one block
        ("write -z -u", 90 * MIB, 512 * KIB),
    ] {
        cmds.push(format!("{verb} {off} {len}"));
        changed.push((off, len));
    }
    qemu_io(&shim.uri(), &cmds);
    let changed = union(&changed);
    let changed_bytes: u64 = changed.iter().map(|r| r.1).sum();
    let changed_blocks: u64 = union(
        &changed
            .iter()
            .map(|&(o, l)| (o / BLOCK * BLOCK, (o + l).div_ceil(BLOCK) * BLOCK - o / BLOCK * BLOCK))
            .collect::<Vec<_>>(),
    )
    .iter()
    .map(|r| r.1)
    .sum();

    let second = agent.once();
    assert_eq!(json_str(&second, "kind"), "incremental", "{second:?}");
    assert_eq!(json_str(&second, "consistency"), "crash", "{second:?}");
    let p2 = json_u64(&second, "point");
    assert!(p2 > p1, "point ids rise: {p1} then {p2}");
    assert!(json_u64(&second, "generation") > json_u64(&first, "generation"));
    let (read, zero) = (json_u64(&second, "bytes_read"), json_u64(&second, "bytes_zero"));
    let sent = json_u64(&second, "bytes_sent");
    // Never less than what changed; at most the changed blocks plus the clean gaps merged into
    // chunks (each under MIN_CHUNK, at most one per run).
    assert!(
        read + zero >= changed_bytes,
        "under-reported: read {read} + zero {zero} < changed {changed_bytes}"
    );
    assert!(
        read + zero <= changed_blocks + changed.len() as u64 * MIN_CHUNK,
        "read {read} + zero {zero} > changed blocks {changed_blocks} + {} gaps of < {MIN_CHUNK}",
        changed.len()
    );
    let r2 = d.join("restore-latest.img");
    let report = restore(&store, DISK, "latest", &r2);
    assert_eq!(json_u64(&report, "point"), p2);
    assert_same_files("the latest point", &r2, &img);
    eprintln!(
        "incremental: {} changed in {} runs ({} in 4 KiB blocks); read {}, zero extents {}, sent {} \
         ({:.1}% of changed; dedup {}, compression ratio {:.2}), {} ms",
        mib(changed_bytes),
        changed.len(),
        mib(changed_blocks),
        mib(read),
        mib(zero),
        mib(sent),
        100.0 * sent as f64 / changed_bytes as f64,
        mib(json_u64(&second, "bytes_deduplicated")),
        second["compression_ratio"].as_f64().unwrap_or(f64::NAN),
        json_u64(&second, "duration_ms"),
    );

    // The first point still restores to the first copy.
    let r3 = d.join("restore-first-again.img");
    restore(&store, DISK, &p1.to_string(), &r3);
    assert_same_files("the first point after the second", &r3, &copy0);

    let listed: Vec<(u64, String, String)> = points(&store, DISK)
        .iter()
        .map(|p| (json_u64(p, "id"), json_str(p, "kind").to_owned(), json_str(p, "consistency").to_owned()))
        .collect();
    assert_eq!(
        listed,
        vec![(p1, "initial_full".into(), "inconsistent".into()), (p2, "incremental".into(), "crash".into())],
        "siterep points"
    );
    shim.stop();
    server.stop();
}

// =============================================================================================
// 2. Crash consistency under load

/// A file written once and fsynced (with its directory); `deleted_ms`: when its unlink began.
struct Written {
    path: String,
    seed: u64,
    len: usize,
    done_ms: u64,
    deleted_ms: Option<u64>,
}

fn file_bytes(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// An ext4 mount that is unmounted (lazily) on drop.
struct Mounted(Option<PathBuf>);

impl Mounted {
    #[track_caller]
    fn mount(dev: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).expect("create the mountpoint");
        run(tool("mount").args(["-t", "ext4", dev]).arg(dir));
        Mounted(Some(dir.to_owned()))
    }

    #[track_caller]
    fn unmount(mut self) {
        let dir = self.0.take().expect("mounted");
        run(tool("umount").arg(&dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = run_unchecked(tool("umount").arg("-l").arg(&dir), Duration::from_secs(30));
        }
    }
}

#[test]
fn crash_consistency_under_load() {
    for t in ["fio", "nbdfuse", "fusermount3", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "debugfs"]
    {
        require_tool(t);
    }
    let mut rng = Rng::new(seed());
    let dir = scratch_dir("repl-crash");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);

    // --- fio for 25 s at 10 MB/s under an agent cutting every second --------------------------
    const SIZE: u64 = 256 * MIB;
    let img = d.join("load.img");
    random_image(&img, SIZE, &[(0, SIZE / 2)], rng.next_u64());
    let shim = Serve::new(&img).state_dir(&d.join("load-state")).start();
    let mut agent = AgentCmd::new(shim.socket(), server.addr(), "load", &certs)
        .args(["--interval", "1s", "--retry-scale", "0.001"])
        .spawn(&d.join("agent-load.log"));
    let fio = FioLoad::start(&shim.uri(), SIZE, "4k-64k", "10m", Duration::from_secs(25), &d.join("fio.log"));
    let fio_end = Instant::now() + Duration::from_secs(25);
    let mut rpo = Vec::new();
    // Samples the RPO every 250 ms while fio runs (a measurement over time, not a wait).
    while Instant::now() < fio_end {
        std::thread::sleep(Duration::from_millis(250));
        let st = shim_status(shim.socket());
        match &st["rpo_ms"] {
            Value::Null => {}
            ms => rpo.push(ms.as_u64().unwrap_or_else(|| panic!("rpo_ms is not a count of ms: {st}"))),
        }
    }
    let fio_out = fio.wait();
    let stopped = now_ms();
    let caught_up = Instant::now();
    let st = wait_replicated(shim.socket(), stopped, Duration::from_secs(120));
    let catch_up = caught_up.elapsed();
    agent.assert_running();
    agent.kill();
    rpo.sort_unstable();
    eprintln!(
        "fio wrote {} ({}); {} points; RPO while writing (every 250 ms after the first point, {} samples): \
         p50 {} ms, p99 {} ms, max {} ms; replicated {:?} after fio stopped (final RPO {} ms)",
        replication::fio_written_bytes(&fio_out).map_or("?".into(), mib),
        fio_out.lines().find(|l| l.trim_start().starts_with("WRITE:")).unwrap_or("").trim(),
        points(&store, "load").len(),
        rpo.len(),
        percentile(&rpo, 0.5),
        percentile(&rpo, 0.99),
        rpo.last().copied().unwrap_or(0),
        catch_up,
        json_u64(&st, "rpo_ms"),
    );
    // Figures only: timing is the benchmark's business (scripts/bench-replication), and these
    // machines are shared. What must hold is that replication kept committing under the load.
    let during = points(&store, "load").iter().filter(|p| json_u64(p, "cut_unix_ms") < stopped).count();
    assert!(during >= 3, "the initial point and at least two incrementals while fio ran: {during}");
    shim.stop();
    let restored = d.join("load-latest.img");
    restore(&store, "load", "latest", &restored);
    assert_same_files("the latest point after fio stopped", &restored, &img);
    std::fs::remove_file(&restored).expect("remove");

    // --- ext4 written while the agent cuts every 500 ms -------------------------------------
    let fs_img = d.join("fs.img");
    image::create_sparse(&fs_img, 128 * MIB);
    let shim = Serve::new(&fs_img).state_dir(&d.join("fs-state")).start();
    let mut agent = AgentCmd::new(shim.socket(), server.addr(), "fs", &certs)
        .args(["--interval", "500ms", "--retry-scale", "0.001"])
        .spawn(&d.join("agent-fs.log"));
    let fuse = FuseExport::mount(&d.join("fuse"), &shim.uri());
    let lo = LoopDevice::attach(&fuse.file());
    run(tool("mkfs.ext4").args(["-q", "-F", "-b", "4096", lo.path()]));
    let mnt = d.join("mnt");
    let mount = Mounted::mount(lo.path(), &mnt);
    let mounted_ms = now_ms();
    let mut files: Vec<Written> = Vec::new();
    let writing = Instant::now();
    let mut n = 0usize;
    while writing.elapsed() < Duration::from_secs(10) {
        let sub = format!("d{}", n % 4);
        let subdir = mnt.join(&sub);
        if !subdir.exists() {
            std::fs::create_dir(&subdir).expect("mkdir");
            File::open(&mnt).and_then(|f| f.sync_all()).expect("fsync the root directory");
        }
        let len = if n.is_multiple_of(10) { 1 + rng.below(MIB) } else { 1 + rng.below(128 * KIB) } as usize;
        let seed = rng.next_u64();
        let path = format!("{sub}/f{n:04}");
        let mut f = File::create(mnt.join(&path)).expect("create a file");
        f.write_all(&file_bytes(seed, len)).expect("write a file");
        f.sync_all().expect("fsync a file");
        File::open(&subdir).and_then(|f| f.sync_all()).expect("fsync its directory");
        files.push(Written { path, seed, len, done_ms: now_ms(), deleted_ms: None });
        // Delete now and then, and whenever the files pass 40 MiB (of a 128 MiB filesystem).
        loop {
            let live: usize = files.iter().filter(|f| f.deleted_ms.is_none()).map(|f| f.len).sum();
            if n % 5 != 4 && live < (40 * MIB) as usize {
                break;
            }
            let victim = rng.below(files.len() as u64) as usize;
            if files[victim].deleted_ms.is_none() {
                files[victim].deleted_ms = Some(now_ms());
                std::fs::remove_file(mnt.join(&files[victim].path)).expect("delete a file");
                if live < (40 * MIB) as usize {
                    break;
                }
            }
        }
        n += 1;
    }
    let unmounting_ms = now_ms();
    mount.unmount();
    lo.detach();
    fuse.unmount();
    let wait_from = now_ms();
    wait_replicated(shim.socket(), wait_from, Duration::from_secs(120));
    agent.assert_running();
    agent.kill();
    shim.stop();

    let all = points(&store, "fs");
    let during: Vec<&Value> = all
        .iter()
        .filter(|p| json_str(p, "consistency") == "crash")
        .filter(|p| {
            let cut = json_u64(p, "cut_unix_ms");
            cut > mounted_ms && cut < unmounting_ms && files.first().is_some_and(|f| f.done_ms < cut)
        })
        .collect();
    eprintln!(
        "ext4: {} files written ({} deleted) in 10 s; {} points, {} cut while writing",
        files.len(),
        files.iter().filter(|f| f.deleted_ms.is_some()).count(),
        all.len(),
        during.len()
    );
    assert!(during.len() >= 3, "at least 3 crash-consistent points cut while ext4 was written: {all:?}");
    let picks = [during[0], during[during.len() / 2], during[during.len() - 1]];
    // Crash-consistent means: what a machine finds after power loss at the cut. Its boot-time
    // check replays the journal and processes orphans (`e2fsck -p`, like the kernel at mount);
    // anything else preen mode refuses is corruption (exit 4). A read-only `e2fsck -n` cannot
    // replay the journal, so on a mid-transaction image it reports what the journal would fix:
    // shown, not judged. After the replay the filesystem must be fully clean (`-f -n` exit 0)
    // and every file fsynced before the cut (and not being deleted at it) must read back intact.
    for p in picks {
        let id = json_u64(p, "id");
        let cut = json_u64(p, "cut_unix_ms");
        let copy = d.join(format!("fs-point-{id}.img"));
        restore(&store, "fs", &id.to_string(), &copy);
        let (ro_code, _) = e2fsck(&["-f", "-n"], &copy);
        let (code, out) = e2fsck(&["-f", "-p"], &copy);
        assert!(
            code <= 1,
            "point {id}: e2fsck -f -p exit {code} (a crash left damage preen mode won't fix):\n{out}"
        );
        let (clean, out2) = e2fsck(&["-f", "-n"], &copy);
        assert_eq!(clean, 0, "point {id}: not clean after the journal replay:\n{out}\n{out2}");
        let dump = d.join(format!("fs-point-{id}"));
        std::fs::create_dir(&dump).expect("mkdir");
        let mut checked = 0;
        for sub in ["d0", "d1", "d2", "d3"] {
            // A directory created after the cut is simply absent from the point.
            let _ = run_unchecked(
                tool("debugfs").arg("-R").arg(format!("rdump /{sub} {}", dump.display())).arg(&copy),
                Duration::from_secs(60),
            );
        }
        for f in files.iter().filter(|f| f.done_ms < cut && f.deleted_ms.is_none_or(|t| t > cut)) {
            let got = std::fs::read(dump.join(&f.path)).unwrap_or_else(|e| {
                panic!("point {id} (cut {cut}): {} fsynced at {} is missing: {e}", f.path, f.done_ms)
            });
            image::assert_same_bytes(&format!("point {id}: {}", f.path), &got, &file_bytes(f.seed, f.len));
            checked += 1;
        }
        eprintln!(
            "point {id}: e2fsck -f -n before replay exit {ro_code}; -f -p exit {code}; clean after; \
             {checked} files fsynced before the cut read back intact"
        );
        std::fs::remove_file(&copy).expect("remove");
        std::fs::remove_dir_all(&dump).expect("remove");
    }
    let latest = d.join("fs-latest.img");
    restore(&store, "fs", "latest", &latest);
    assert_same_files("the latest point of the unmounted filesystem", &latest, &fs_img);
    let (code, out) = e2fsck(&["-f", "-n"], &latest);
    assert_eq!(code, 0, "the latest point (after umount) is a clean filesystem:\n{out}");
    server.stop();
}

// =============================================================================================
// 3. Faults never lose data

/// Size of the disks whose initial copies are interrupted.
const BIG: u64 = 512 * MIB;

/// A disk whose initial copy the faults aim at: a random image under a light fio load (so the
/// copy is fuzzy and the incrementals after it must make the replica exact). Once replicated,
/// only its image's blake3 is kept (the images are large; the restores are compared with it).
struct Subject {
    name: String,
    img: PathBuf,
    shim: Option<Server>,
    load: Option<FioLoad>,
    log: PathBuf,
    hash: Option<blake3::Hash>,
}

impl Subject {
    fn new(d: &Path, name: &str, rng: &mut Rng) -> Subject {
        let img = d.join(format!("{name}.img"));
        random_image(&img, BIG, &[(0, BIG)], rng.next_u64());
        let shim = Serve::new(&img).state_dir(&d.join(format!("{name}-state"))).start();
        let fio_log = d.join(format!("fio-{name}.log"));
        let load = FioLoad::start(&shim.uri(), BIG, "4k-128k", "2m", Duration::from_secs(900), &fio_log);
        let log = d.join(format!("agent-{name}.log"));
        Subject { name: name.to_owned(), img, shim: Some(shim), load: Some(load), log, hash: None }
    }

    fn agent(&self, server: SocketAddr, certs: &Certs) -> AgentCmd {
        AgentCmd::new(self.shim.as_ref().expect("serving").socket(), server, &self.name, certs).args([
            "--retry-scale",
            "0.001",
            "--interval",
            "2s",
        ])
    }

    /// Lets `agent` complete the copy (at full speed through `proxy`), stops the load, waits
    /// until every write is replicated, and stops the agent (which must still be running: no
    /// fatal error).
    #[track_caller]
    fn finish(&mut self, store: &Path, proxy: &Proxy, rate: u64, mut agent: AgentProcess) {
        proxy.set_rate(None);
        wait_until(&format!("{}'s initial copy completes", self.name), Duration::from_secs(300), || {
            has_point(store, &self.name)
        });
        proxy.set_rate(Some(rate));
        let out = self.load.take().expect("load running").stop();
        let stopped = now_ms();
        let shim = self.shim.take().expect("serving");
        wait_replicated(shim.socket(), stopped, Duration::from_secs(300));
        agent.assert_running();
        agent.kill();
        shim.stop();
        self.hash = Some(file_hash(&self.img));
        std::fs::remove_file(&self.img).expect("remove the image");
        eprintln!(
            "{}: copy complete, fio wrote {} during it and after, all replicated",
            self.name,
            replication::fio_written_bytes(&out).map_or("?".into(), mib)
        );
    }
}

/// The blake3 of a file's contents.
fn file_hash(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; (4 * MIB) as usize];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return hasher.finalize();
        }
        hasher.update(&buf[..n]);
    }
}

/// Offsets at which the agents logging to `log` resumed an initial copy.
fn resumed_at(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("resuming the initial copy"))
        .map(|l| {
            l.split("next_offset=").nth(1).and_then(|v| v.split_whitespace().next()).unwrap_or("?").to_owned()
        })
        .collect()
}

#[test]
fn faults_never_lose_data() {
    /// The disk replicated continuously (small: every one of its many points is restored).
    const SMALL: u64 = 32 * MIB;
    /// Initial copies go through a proxy at this rate, so that new data takes 11 s to copy
    /// whatever the machine's speed. (What was uploaded before a fault is deduplicated after
    /// it, so a copy can still finish between two faults: the next faults then go to a fresh
    /// disk.)
    const COPY_RATE: u64 = 48_000_000;
    const ITERATIONS: usize = 10;
    /// Fresh disks a phase may need because copies finished between faults.
    const MAX_SUBJECTS: usize = 4;
    require_tool("fio");
    let mut rng = Rng::new(seed());
    let dir = scratch_dir("repl-faults");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let store = d.join("store");
    let mut server = RecoveryServer::start(&store, &certs, &[]);
    let slow = Proxy::start(server.addr(), Some(COPY_RATE));
    let cutter = Proxy::start(server.addr(), None);
    let mut done: Vec<Subject> = Vec::new();

    // The small disk replicates continuously under load from the start.
    let small_img = d.join("small.img");
    let layout = holey_layout(&mut rng, SMALL);
    random_image(&small_img, SMALL, &layout, rng.next_u64());
    let small = Serve::new(&small_img).state_dir(&d.join("small-state")).start();
    let small_log = d.join("agent-small.log");
    let small_cmd = AgentCmd::new(small.socket(), server.addr(), "small", &certs).args([
        "--retry-scale",
        "0.001",
        "--interval",
        "2s",
    ]);
    let mut small_agent = small_cmd.spawn(&small_log);
    let small_load = FioLoad::start(
        &small.uri(),
        SMALL,
        "4k-64k",
        "2m",
        Duration::from_secs(900),
        &d.join("fio-small.log"),
    );

    // --- A: SIGKILL the agent at random moments of initial copies ------------------------------
    let started = Instant::now();
    let mut current = Subject::new(d, "a1", &mut rng);
    let (mut hits, mut runs, mut subjects) = (0, 0, 1);
    while hits < ITERATIONS {
        runs += 1;
        assert!(runs <= 4 * ITERATIONS, "only {hits} of {runs} agent kills landed in an initial copy");
        let before = checkpoint_offset(&store, &current.name);
        let agent = current.agent(slow.addr(), &certs).spawn(&current.log);
        if runs % 3 == 0 && before.is_none() {
            // Just after the first checkpoint: the next run must resume there, not at 0.
            wait_until("a checkpoint (or the end of the copy)", Duration::from_secs(120), || {
                checkpoint_offset(&store, &current.name).is_some() || has_point(&store, &current.name)
            });
            std::thread::sleep(Duration::from_millis(rng.below(100))); // a random kill moment
        } else {
            std::thread::sleep(Duration::from_millis(100 + rng.below(1100))); // a random kill moment
        }
        agent.kill();
        if !has_point(&store, &current.name) {
            hits += 1;
            continue;
        }
        // This run finished the copy before its kill: the next kills go to a fresh disk.
        let agent = current.agent(slow.addr(), &certs).spawn(&current.log);
        current.finish(&store, &slow, COPY_RATE, agent);
        done.push(current);
        subjects += 1;
        assert!(subjects <= MAX_SUBJECTS, "initial copies keep finishing between kills");
        current = Subject::new(d, &format!("a{subjects}"), &mut rng);
    }
    let agent = current.agent(slow.addr(), &certs).spawn(&current.log);
    current.finish(&store, &slow, COPY_RATE, agent);
    done.push(current);
    let resumed: Vec<String> = done.iter().flat_map(|s| resumed_at(&s.log)).collect();
    assert!(
        resumed.iter().any(|o| o != "0" && o != "?"),
        "some run resumed an initial copy past offset 0: {resumed:?}"
    );
    eprintln!(
        "A: {hits} agent kills in initial copies ({runs} runs on {subjects} disks); runs resumed at offsets \
         {resumed:?}; {:?}",
        started.elapsed()
    );

    // --- B: SIGKILL the agent during continuous replication of the small disk ----------------
    wait_new_point(small.socket(), 0, Duration::from_secs(120));
    let mut mid_generation = 0;
    let mut resume_times = Vec::new();
    for i in 0..ITERATIONS {
        if i % 2 == 0 {
            wait_until("a generation is in flight", Duration::from_secs(30), || {
                generation_in_flight(small.socket())
            });
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(1500))); // a random fault moment
        }
        mid_generation += usize::from(generation_in_flight(small.socket()));
        let killed = now_ms();
        small_agent.kill();
        small_agent = small_cmd.spawn(&small_log);
        resume_times.push(wait_new_point(small.socket(), killed, Duration::from_secs(60)));
    }
    eprintln!(
        "B: {ITERATIONS} agent kills in continuous replication ({mid_generation} with a generation in flight); \
         a new point after each restart within {:?}",
        resume_times.iter().max().expect("some")
    );

    // --- C: SIGKILL the server during initial copies and the small disk's replication --------
    let started = Instant::now();
    let mut subjects = 1;
    let mut current = Subject::new(d, "c1", &mut rng);
    let mut agent = current.agent(slow.addr(), &certs).spawn(&current.log);
    let (mut kills, mut in_initial, mut small_in_flight) = (0, 0, 0);
    let mut resume_times = Vec::new();
    // Sessions of the current subject's agent the server logged before its latest start.
    let mut sessions_before = 0;
    while kills < ITERATIONS || in_initial < ITERATIONS {
        assert!(
            kills < 4 * ITERATIONS,
            "only {in_initial} of {kills} server kills landed in an initial copy"
        );
        // "agent connected ... claims="NAME@HOST"": the name the agent gives in its Hello.
        let pattern = format!("claims=\"{}@", current.name);
        let sessions = |log: String| {
            log.lines().filter(|l| l.contains("agent connected") && l.contains(&pattern)).count()
        };
        wait_until(&format!("{}'s agent reconnects", current.name), Duration::from_secs(60), || {
            sessions(server.log()) > sessions_before
        });
        if kills % 3 == 2 && checkpoint_offset(&store, &current.name).is_none() {
            wait_until("a checkpoint (or the end of the copy)", Duration::from_secs(120), || {
                checkpoint_offset(&store, &current.name).is_some() || has_point(&store, &current.name)
            });
            std::thread::sleep(Duration::from_millis(rng.below(100))); // a random kill moment
        } else {
            std::thread::sleep(Duration::from_millis(100 + rng.below(1100))); // a random kill moment
        }
        small_in_flight += usize::from(generation_in_flight(small.socket()));
        let killed = now_ms();
        server.kill();
        kills += 1;
        let landed = !has_point(&store, &current.name);
        sessions_before = sessions(server.log());
        server.restart();
        // Both agents retry by themselves; the small disk's replication resumes.
        resume_times.push(wait_new_point(small.socket(), killed, Duration::from_secs(60)));
        agent.assert_running();
        small_agent.assert_running();
        if landed {
            in_initial += 1;
            continue;
        }
        current.finish(&store, &slow, COPY_RATE, agent);
        done.push(current);
        subjects += 1;
        assert!(subjects <= MAX_SUBJECTS, "initial copies keep finishing between server kills");
        current = Subject::new(d, &format!("c{subjects}"), &mut rng);
        agent = current.agent(slow.addr(), &certs).spawn(&current.log);
        sessions_before = 0;
    }
    current.finish(&store, &slow, COPY_RATE, agent);
    done.push(current);
    eprintln!(
        "C: {kills} server kills: {in_initial} in initial copies ({subjects} disks), all {kills} during the \
         small disk's replication ({small_in_flight} with a generation in flight); it resumed by itself each \
         time within {:?}; {:?}",
        resume_times.iter().max().expect("some"),
        started.elapsed()
    );

    // --- D: cut every connection through a proxy during continuous replication ---------------
    small_agent.kill();
    let small_cmd = small_cmd.server(cutter.addr());
    let mut small_agent = small_cmd.spawn(&small_log);
    let since = now_ms();
    wait_new_point(small.socket(), since, Duration::from_secs(60));
    let mut cut_mid = 0;
    let mut resume_times = Vec::new();
    for i in 0..ITERATIONS {
        if i % 2 == 0 {
            wait_until("a generation is in flight", Duration::from_secs(30), || {
                generation_in_flight(small.socket())
            });
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(1500))); // a random fault moment
        }
        cut_mid += usize::from(generation_in_flight(small.socket()));
        let cut = now_ms();
        let n = cutter.cut_all();
        assert!(n >= 1, "cut {i}: the agent had no connection open through the proxy");
        resume_times.push(wait_new_point(small.socket(), cut, Duration::from_secs(60)));
        small_agent.assert_running();
    }
    eprintln!(
        "D: {ITERATIONS} proxy cuts ({cut_mid} with a generation in flight), {} connections in all; \
         a new point after each within {:?}",
        cutter.connections(),
        resume_times.iter().max().expect("some")
    );

    // --- Everything replicated, restored and verified ----------------------------------------
    let small_written = small_load.stop();
    let stopped = now_ms();
    wait_replicated(small.socket(), stopped, Duration::from_secs(300));
    small_agent.assert_running();
    small_agent.kill();
    eprintln!("small: fio wrote {}", replication::fio_written_bytes(&small_written).map_or("?".into(), mib));
    let restores = Instant::now();
    let mut restored_points = 0;
    let mut disks: Vec<(String, Option<blake3::Hash>, PathBuf)> =
        done.iter().map(|s| (s.name.clone(), s.hash, s.log.clone())).collect();
    disks.push(("small".into(), None, small_log.clone()));
    for (disk, hash, log) in &disks {
        let out = d.join(format!("{disk}-restored.img"));
        restore(&store, disk, "latest", &out);
        match hash {
            Some(h) => assert_eq!(
                file_hash(&out),
                *h,
                "{disk}: the latest point after all faults differs from the source"
            ),
            None => {
                // On a mismatch the agent's own account of which generations it shipped, committed
                // and released is the first thing to read.
                if let Some(diff) = replication::compare_files(&out, &small_img) {
                    let agent_log = std::fs::read_to_string(log).unwrap_or_default();
                    let tail: Vec<&str> = agent_log.lines().rev().take(150).collect();
                    eprintln!("--- {disk} agent log (last 150 lines) ---");
                    for line in tail.iter().rev() {
                        eprintln!("{line}");
                    }
                    panic!(
                        "{disk}: the latest point after all faults: {} differs from {}: {diff}",
                        out.display(),
                        small_img.display()
                    );
                }
            }
        }
        let listed: BTreeSet<u64> = points(&store, disk).iter().map(|p| json_u64(p, "id")).collect();
        let committed: BTreeSet<u64> =
            committed_points_in_log(&std::fs::read_to_string(log).expect("agent log")).into_iter().collect();
        let lost: Vec<&u64> = committed.difference(&listed).collect();
        assert!(lost.is_empty(), "{disk}: points the agents saw committed are gone: {lost:?}");
        // Every point restores: `siterep restore` checks every chunk's blake3 as it writes.
        let ids: Vec<u64> = listed.iter().copied().collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for worker in 0..2 {
                let (ids, next, store) = (&ids, &next, &store);
                let out = d.join(format!("{disk}-point-{worker}.img"));
                scope.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(id) = ids.get(i) else { break };
                    restore(store, disk, &id.to_string(), &out);
                });
            }
        });
        for worker in 0..2 {
            let _ = std::fs::remove_file(d.join(format!("{disk}-point-{worker}.img")));
        }
        restored_points += listed.len();
        eprintln!(
            "{disk}: latest equals the source; {} points listed ({} seen committed by its agents), all restore",
            listed.len(),
            committed.len()
        );
        std::fs::remove_file(&out).expect("remove");
    }
    eprintln!("restored {restored_points} points in {:?}", restores.elapsed());
    small.stop();
    drop((slow, cutter));
    server.stop();
}

// =============================================================================================
// 4. The server rejects bad input

/// A client speaking raw frames over mutual TLS.
struct Raw {
    s: StreamOwned<ClientConnection, TcpStream>,
    dec: wire::Decoder,
}

/// What the server did next.
#[derive(Debug)]
enum Got {
    Frame(Frame),
    /// End of stream or a connection error (a TLS alert, a reset): the text says which.
    Closed(String),
}

impl Raw {
    /// Opens generation 1 of `disk` as an initial copy on an all-zero disk.
    fn begin_initial(&mut self, disk: &str) {
        self.send(&Frame::BeginGeneration {
            disk: disk.to_string(),
            generation: 1,
            kind: GenerationKind::InitialFull,
            base_point: None,
        });
    }

    /// Connects and completes the TLS handshake (from the client's side).
    fn connect(addr: SocketAddr, cert: &Path, key: &Path, ca: &Path) -> Result<Raw, String> {
        let cfg = client_config(&TlsFiles { cert, key, ca }).expect("client TLS configuration");
        let tcp = TcpStream::connect(addr).expect("connect to the server");
        tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let conn =
            ClientConnection::new(cfg, ServerName::try_from("localhost").expect("name")).expect("client");
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
        }
        Ok(Raw { s, dec: wire::Decoder::new() })
    }

    /// Connects with `certs`' agent certificate and negotiates version 1.
    #[track_caller]
    fn session(addr: SocketAddr, certs: &Certs) -> Raw {
        Raw::session_as(addr, &certs.agent_cert(), &certs.agent_key(), &certs.ca())
    }

    /// Connects with this certificate and negotiates version 1.
    #[track_caller]
    fn session_as(addr: SocketAddr, cert: &Path, key: &Path, ca: &Path) -> Raw {
        let mut c = Raw::connect(addr, cert, key, ca)
            .unwrap_or_else(|e| panic!("TLS handshake with the server: {e}"));
        c.send(&Frame::Hello {
            min_version: wire::VERSION,
            max_version: wire::VERSION,
            agent: "raw-test-client".into(),
        });
        match c.recv() {
            Got::Frame(Frame::Welcome { version: wire::VERSION, .. }) => c,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        // The server may already have refused and closed: what it said is read next.
        let _ = self.s.write_all(bytes).and_then(|()| self.s.flush());
    }

    fn send(&mut self, f: &Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        self.send_bytes(&b);
    }

    fn recv(&mut self) -> Got {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("the server sent a malformed frame: {e}"),
            }
            match self.s.read(&mut buf) {
                Ok(0) => return Got::Closed("end of stream".into()),
                Ok(n) => self.dec.feed(&buf[..n]),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    panic!("the server neither answered nor closed the connection within 20 s")
                }
                Err(e) => return Got::Closed(e.to_string()),
            }
        }
    }

    /// What the server sends within `wait`, if anything (a refusal; accepted frames of some
    /// types have no answer).
    fn recv_within(&mut self, wait: Duration) -> Option<Got> {
        self.s.sock.set_read_timeout(Some(wait)).expect("timeout");
        let mut buf = vec![0u8; 64 << 10];
        let got = loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => break Some(Got::Frame(f)),
                Ok(None) => {}
                Err(e) => panic!("the server sent a malformed frame: {e}"),
            }
            match self.s.read(&mut buf) {
                Ok(0) => break Some(Got::Closed("end of stream".into())),
                Ok(n) => self.dec.feed(&buf[..n]),
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    break None
                }
                Err(e) => break Some(Got::Closed(e.to_string())),
            }
        };
        self.s.sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        got
    }

    /// Registers `disk` and returns whether the server holds a point of it.
    #[track_caller]
    fn register(&mut self, disk: &str, size: u64) -> Option<wire::PointRef> {
        self.send(&register_frame(disk, size));
        match self.recv() {
            Got::Frame(Frame::DiskState { latest, .. }) => latest,
            other => panic!("expected DiskState for {disk}, got {other:?}"),
        }
    }

    /// TLS close_notify and a TCP half-close: the server reads the end of the stream.
    fn half_close(&mut self) {
        self.s.conn.send_close_notify();
        let _ = self.s.flush();
        let _ = self.s.sock.shutdown(Shutdown::Write);
    }
}

/// What [`run_for`] saw.
struct Ran {
    /// `None`: still running at the limit (then killed).
    status: Option<std::process::ExitStatus>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `cmd` for at most `limit`, killing it then.
fn run_for(mut cmd: Command, limit: Duration) -> Ran {
    let (out, err) =
        (tempfile::NamedTempFile::new().expect("temp"), tempfile::NamedTempFile::new().expect("temp"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.reopen().expect("reopen"))
        .stderr(err.reopen().expect("reopen"));
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let status = siterep_tests::wait_timeout(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let took = started.elapsed();
    let read = |f: &tempfile::NamedTempFile| std::fs::read_to_string(f.path()).expect("read output");
    Ran { status, stdout: read(&out), stderr: read(&err), took }
}

/// The `RegisterDisk` of the raw client: `disk` of `size` bytes at the tracking block size,
/// from one made-up source identity.
fn register_frame(disk: &str, size: u64) -> Frame {
    Frame::RegisterDisk {
        disk: disk.into(),
        size,
        block_size: BLOCK as u32,
        source: [7; 16],
        reenroll: false,
    }
}

/// A frame from its type and body, length field and all (§2 of `docs/wire.md`).
fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut b = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    b.push(ty);
    b.extend_from_slice(body);
    b
}

/// Expects an `Error` frame with `code` and `class`, then the end of the connection, and
/// returns the message; otherwise records why in `fails` (the test reports every case at the
/// end, so one run shows all of them).
fn refusal(fails: &mut Vec<String>, c: &mut Raw, code: u16, class: ErrorClass, what: &str) -> Option<String> {
    let first = c.recv();
    refusal_of(fails, first, c, code, class, what)
}

/// As [`refusal`], with the server's first answer already read.
fn refusal_of(
    fails: &mut Vec<String>,
    first: Got,
    c: &mut Raw,
    code: u16,
    class: ErrorClass,
    what: &str,
) -> Option<String> {
    let message = match first {
        Got::Frame(Frame::Error { class: got_class, code: got_code, message }) => {
            if (got_code, got_class) != (code, class) || message.trim().is_empty() {
                fails.push(format!(
                    "{what}: expected Error {{ code: {code}, class: {class:?} }} with a message, got code \
                     {got_code}, {got_class:?}: {message:?}"
                ));
                return None;
            }
            message
        }
        other => {
            fails.push(format!("{what}: expected Error {{ code: {code}, class: {class:?} }}, got {other:?}"));
            return None;
        }
    };
    match c.recv() {
        Got::Closed(_) => {}
        Got::Frame(f) => {
            fails.push(format!("{what}: the server sent {f:?} after its Error instead of closing"));
            return None;
        }
    }
    eprintln!("{what}: refused with code {code} ({class:?}): {message}");
    Some(message)
}

/// Every file under `store`, relative to it.
fn store_files(store: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
            let e = e.expect("dir entry");
            let p = e.path();
            if e.file_type().expect("file type").is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).expect("under the store").to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(store, store, &mut out);
    out
}

/// Records in `fails` any file the store holds that it did not hold before, other than a
/// disk's registration (`disks/<name>/disk.json`, and `source.json`, the source identity it is
/// bound to) and unsynced staging (`incoming/`,
/// discarded on open and by every sweep).
fn nothing_stored(fails: &mut Vec<String>, store: &Path, before: &BTreeSet<PathBuf>, what: &str) {
    let new = stored_since(store, before);
    if !new.is_empty() {
        fails.push(format!("{what}: the store gained {new:?}"));
    }
}

/// Files the store gained since `before`, other than registrations and staging (as above).
fn stored_since(store: &Path, before: &BTreeSet<PathBuf>) -> Vec<PathBuf> {
    store_files(store)
        .difference(before)
        .filter(|p| !p.ends_with("disk.json") && !p.ends_with("source.json") && !p.starts_with("incoming"))
        .cloned()
        .collect()
}

fn chunk_path(store: &Path, hash: &[u8; 32]) -> PathBuf {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    store.join("chunks").join(&hex[..2]).join(hex)
}

#[test]
fn server_rejects_bad_input() {
    let mut rng = Rng::new(seed());
    let dir = scratch_dir("repl-bad");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let other = Certs::make(&d.join("other-ca"));
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let addr = server.addr();
    const SIZE: u64 = MIB;
    // Refusals that came out wrong (reported together at the end).
    let mut fails: Vec<String> = Vec::new();

    // --- A chunk whose blake3 does not match its data ----------------------------------------
    let data = rng.bytes(64 * KIB as usize);
    let real = *blake3::hash(&data).as_bytes();
    let mut claimed = real;
    claimed[0] ^= 1;
    let compressed = zstd::bulk::compress(&data, 3).expect("zstd");
    let corrupt: Vec<(&str, Frame)> = vec![
        (
            "a chunk whose hash does not match its data",
            Frame::Chunk {
                offset: 0,
                len: data.len() as u32,
                hash: claimed,
                data: ChunkData::Compressed(compressed.clone()),
            },
        ),
        (
            "a chunk that inflates to fewer bytes than its length",
            Frame::Chunk {
                offset: 0,
                len: 2 * data.len() as u32,
                hash: real,
                data: ChunkData::Compressed(compressed.clone()),
            },
        ),
        (
            "a chunk whose payload is not zstd",
            Frame::Chunk {
                offset: 0,
                len: data.len() as u32,
                hash: real,
                data: ChunkData::Compressed(data[..4096].to_vec()),
            },
        ),
    ];
    for (i, (what, chunk)) in corrupt.into_iter().enumerate() {
        let before = store_files(&store);
        let disk = format!("bad-chunk-{i}");
        let mut c = Raw::session(addr, &certs);
        assert!(c.register(&disk, SIZE).is_none());
        c.begin_initial(&disk);
        c.send(&chunk);
        refusal(&mut fails, &mut c, wire::ERR_CORRUPT_CHUNK, ErrorClass::Retryable, what);
        assert!(!has_point(&store, &disk), "{what}: a point was made");
        assert!(
            !chunk_path(&store, &claimed).exists() && !chunk_path(&store, &real).exists(),
            "{what}: chunk stored"
        );
        nothing_stored(&mut fails, &store, &before, what);
    }

    // A good chunk, then a bad one: the generation is rejected whole.
    {
        let what = "a good chunk followed by a corrupt one";
        let before = store_files(&store);
        let good = rng.bytes(32 * KIB as usize);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-chunk-mixed", SIZE);
        c.begin_initial("bad-chunk-mixed");
        c.send(&Frame::Chunk {
            offset: 0,
            len: good.len() as u32,
            hash: *blake3::hash(&good).as_bytes(),
            data: ChunkData::Compressed(zstd::bulk::compress(&good, 3).expect("zstd")),
        });
        c.send(&Frame::Chunk {
            offset: 64 * KIB,
            len: data.len() as u32,
            hash: claimed,
            data: ChunkData::Compressed(compressed.clone()),
        });
        refusal(&mut fails, &mut c, wire::ERR_CORRUPT_CHUNK, ErrorClass::Retryable, what);
        assert!(!has_point(&store, "bad-chunk-mixed"), "{what}: a point was made");
        let good_chunk = chunk_path(&store, blake3::hash(&good).as_bytes());
        eprintln!(
            "{what}: the good chunk is {}",
            if good_chunk.exists() { "stored (unreferenced until a sweep)" } else { "not stored" }
        );
        assert!(!chunk_path(&store, &claimed).exists(), "{what}: the corrupt chunk was stored");
        let new: Vec<PathBuf> =
            stored_since(&store, &before).into_iter().filter(|p| store.join(p) != good_chunk).collect();
        if !new.is_empty() {
            fails.push(format!("{what}: the store gained {new:?}"));
        }
    }

    // A `Known` chunk the server does not have.
    {
        let what = "a Known chunk the server never had";
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-known", SIZE);
        c.begin_initial("bad-known");
        c.send(&Frame::Chunk { offset: 0, len: 4096, hash: [0x5a; 32], data: ChunkData::Known });
        match c.recv() {
            Got::Frame(Frame::Error { code, message, .. }) => {
                assert_eq!(code, wire::ERR_BAD_REQUEST, "{what}: {message}");
                eprintln!("{what}: refused with code {code}: {message}");
            }
            other => panic!("{what}: expected an Error, got {other:?}"),
        }
        assert!(!has_point(&store, "bad-known"), "{what}: a point was made");
        nothing_stored(&mut fails, &store, &before, what);
    }

    // --- Truncated frames, then the client goes away ------------------------------------------
    {
        let what = "half a Chunk frame, then end of stream";
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-truncated", SIZE);
        c.begin_initial("bad-truncated");
        let mut bytes = Vec::new();
        Frame::Chunk {
            offset: 0,
            len: data.len() as u32,
            hash: real,
            data: ChunkData::Compressed(compressed.clone()),
        }
        .encode(&mut bytes);
        c.send_bytes(&bytes[..bytes.len() / 2]);
        c.half_close();
        match c.recv() {
            Got::Closed(_) => {}
            Got::Frame(Frame::Error { code, message, .. }) => {
                eprintln!("{what}: the server answered {code}: {message}")
            }
            Got::Frame(f) => panic!("{what}: unexpected {f:?}"),
        }
        assert!(!chunk_path(&store, &real).exists(), "{what}: the chunk was stored");
        assert!(!has_point(&store, "bad-truncated"), "{what}: a point was made");
        nothing_stored(&mut fails, &store, &before, what);
    }
    {
        let what = "a TCP reset in the middle of a frame";
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-reset", SIZE);
        c.begin_initial("bad-reset");
        let mut bytes = Vec::new();
        Frame::Chunk {
            offset: 0,
            len: data.len() as u32,
            hash: real,
            data: ChunkData::Compressed(compressed.clone()),
        }
        .encode(&mut bytes);
        c.send_bytes(&bytes[..1000]);
        drop(c);
        // The server's side ends; a new session shows it still serves, and nothing is stored.
        let mut c = Raw::session(addr, &certs);
        assert!(c.register("bad-reset", SIZE).is_none());
        drop(c);
        assert!(!chunk_path(&store, &real).exists(), "{what}: the chunk was stored");
        nothing_stored(&mut fails, &store, &before, what);
    }
    // Frames whose length field and body disagree: refused as malformed.
    let mut commit_body = Vec::new();
    commit_body.extend_from_slice(&1u64.to_be_bytes());
    commit_body.extend_from_slice(&now_ms().to_be_bytes());
    commit_body.push(0);
    let mut zero_body = Vec::new();
    zero_body.extend_from_slice(&0u64.to_be_bytes());
    zero_body.extend_from_slice(&4096u64.to_be_bytes());
    // docs/wire.md §2: a length above the largest valid frame of its type is over a limit
    // (ERR_TOO_LARGE, refused before the body is read); other malformed bytes ERR_BAD_REQUEST.
    let malformed: Vec<(&str, Vec<u8>, u16)> = vec![
        ("a Commit frame whose body ends early", raw_frame(11, &commit_body[..9]), wire::ERR_BAD_REQUEST),
        (
            "a Zero frame with trailing bytes",
            raw_frame(7, &[&zero_body[..], &[0u8; 8]].concat()),
            wire::ERR_TOO_LARGE,
        ),
        ("a frame of unknown type 99", raw_frame(99, &[0u8; 8]), wire::ERR_BAD_REQUEST),
        ("a frame of length 0", vec![0, 0, 0, 0], wire::ERR_BAD_REQUEST),
    ];
    for (what, bytes, code) in malformed {
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-malformed", SIZE);
        c.begin_initial("bad-malformed");
        c.send_bytes(&bytes);
        refusal(&mut fails, &mut c, code, ErrorClass::Fatal, what);
        assert!(!has_point(&store, "bad-malformed"), "{what}: a point was made");
        nothing_stored(&mut fails, &store, &before, what);
    }

    // --- Oversize lengths: refused before anything is allocated -------------------------------
    let mut huge_chunk = Vec::new();
    huge_chunk.extend_from_slice(&0u64.to_be_bytes());
    huge_chunk.extend_from_slice(&(wire::MAX_CHUNK + 1).to_be_bytes());
    huge_chunk.extend_from_slice(&real);
    huge_chunk.push(0);
    huge_chunk.extend_from_slice(&16u32.to_be_bytes());
    huge_chunk.extend_from_slice(&[0u8; 16]);
    let mut huge_query = (wire::MAX_HAVE as u32 + 1).to_be_bytes().to_vec();
    huge_query.extend_from_slice(&[0u8; 64]);
    let mut long_name = 2000u16.to_be_bytes().to_vec();
    long_name.extend_from_slice(&[b'a'; 100]);
    let oversize: Vec<(&str, Vec<u8>)> = vec![
        ("a frame length above MAX_FRAME", {
            let mut b = (wire::MAX_FRAME + 1).to_be_bytes().to_vec();
            b.push(6);
            b
        }),
        ("a frame length of 4 GiB", {
            let mut b = u32::MAX.to_be_bytes().to_vec();
            b.push(6);
            b
        }),
        ("a Progress frame longer than any Progress", {
            let mut b = 100_000u32.to_be_bytes().to_vec();
            b.push(10);
            b
        }),
        ("a Chunk of MAX_CHUNK + 1 bytes", raw_frame(6, &huge_chunk)),
        ("a HaveQuery of MAX_HAVE + 1 hashes", raw_frame(8, &huge_query)),
        ("a disk name longer than MAX_STRING", raw_frame(3, &long_name)),
    ];
    for (what, bytes) in oversize {
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-oversize", SIZE);
        c.begin_initial("bad-oversize");
        c.send_bytes(&bytes);
        refusal(&mut fails, &mut c, wire::ERR_TOO_LARGE, ErrorClass::Fatal, what);
        nothing_stored(&mut fails, &store, &before, what);
    }

    // --- Versions and the first frame -----------------------------------------------------------
    {
        let mut c = Raw::connect(addr, &certs.agent_cert(), &certs.agent_key(), &certs.ca()).expect("TLS");
        c.send(&Frame::Hello { min_version: 99, max_version: 99, agent: "from the future".into() });
        if let Some(msg) =
            refusal(&mut fails, &mut c, wire::ERR_VERSION, ErrorClass::Fatal, "Hello for version 99 only")
        {
            assert!(
                msg.contains("99") && msg.contains(&wire::VERSION.to_string()),
                "the message names both ranges: {msg}"
            );
        }
    }
    {
        let what = "a Hello with another protocol's magic";
        let mut body = b"NOTSITE\x01".to_vec();
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let mut c = Raw::connect(addr, &certs.agent_cert(), &certs.agent_key(), &certs.ca()).expect("TLS");
        c.send_bytes(&raw_frame(1, &body));
        refusal(&mut fails, &mut c, wire::ERR_BAD_REQUEST, ErrorClass::Fatal, what);
    }
    {
        let what = "RegisterDisk before Hello";
        let mut c = Raw::connect(addr, &certs.agent_cert(), &certs.agent_key(), &certs.ca()).expect("TLS");
        c.send(&register_frame("bad-early", SIZE));
        refusal(&mut fails, &mut c, wire::ERR_BAD_REQUEST, ErrorClass::Fatal, what);
        assert!(!store.join("disks/bad-early").exists(), "{what}: the disk was registered");
    }

    // --- Frames out of place -------------------------------------------------------------------
    {
        let what = "a Chunk outside a generation";
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("bad-order", SIZE);
        c.send(&Frame::Chunk {
            offset: 0,
            len: data.len() as u32,
            hash: real,
            data: ChunkData::Compressed(compressed.clone()),
        });
        refusal(&mut fails, &mut c, wire::ERR_BAD_REQUEST, ErrorClass::Fatal, what);
        assert!(!chunk_path(&store, &real).exists(), "{what}: the chunk was stored");
        nothing_stored(&mut fails, &store, &before, what);
    }
    {
        let what = "a generation of a disk this session did not register";
        let mut c = Raw::session(addr, &certs);
        c.begin_initial("bad-unregistered");
        refusal(&mut fails, &mut c, wire::ERR_BAD_REQUEST, ErrorClass::Fatal, what);
        assert!(!store.join("disks/bad-unregistered").exists(), "{what}: the disk exists");
    }

    // --- A good generation: the raw client is right, and the server still serves --------------
    let good = rng.bytes(64 * KIB as usize);
    let good_hash = *blake3::hash(&good).as_bytes();
    let good_point = {
        let mut c = Raw::session(addr, &certs);
        assert!(c.register("good", SIZE).is_none());
        c.begin_initial("good");
        c.send(&Frame::HaveQuery { hashes: vec![good_hash] });
        match c.recv() {
            Got::Frame(Frame::HaveReply { have }) => assert_eq!(have, vec![false]),
            other => panic!("expected HaveReply, got {other:?}"),
        }
        c.send(&Frame::Chunk {
            offset: 0,
            len: good.len() as u32,
            hash: good_hash,
            data: ChunkData::Compressed(zstd::bulk::compress(&good, 3).expect("zstd")),
        });
        c.send(&Frame::Zero { offset: 64 * KIB, len: SIZE - 64 * KIB });
        c.send(&Frame::Commit {
            generation: 1,
            cut_unix_ms: now_ms(),
            consistency: Consistency::Inconsistent,
            digest: None,
        });
        let point = match c.recv() {
            Got::Frame(Frame::Committed { point, generation: 1 }) => point,
            other => panic!("expected Committed, got {other:?}"),
        };
        // Sending it again is harmless: the same point.
        c.begin_initial("good");
        c.send(&Frame::Commit {
            generation: 1,
            cut_unix_ms: now_ms(),
            consistency: Consistency::Inconsistent,
            digest: None,
        });
        match c.recv() {
            Got::Frame(Frame::Committed { point: again, generation: 1 }) => assert_eq!(again, point),
            other => panic!("expected Committed again, got {other:?}"),
        }
        point
    };
    assert!(chunk_path(&store, &good_hash).exists(), "the good chunk is stored");

    // Against a disk that has points: a wrong base, a changed size, an extent past the end.
    let second_point = {
        // An incremental that changes nothing (a zero extent over zeroes): a second point.
        let mut c = Raw::session(addr, &certs);
        c.register("good", SIZE);
        c.send(&Frame::BeginGeneration {
            disk: "good".into(),
            generation: 2,
            kind: GenerationKind::Incremental,
            base_point: Some(good_point),
        });
        c.send(&Frame::Zero { offset: SIZE / 2, len: 4096 });
        c.send(&Frame::Commit {
            generation: 2,
            cut_unix_ms: now_ms(),
            consistency: Consistency::Crash,
            digest: None,
        });
        match c.recv() {
            Got::Frame(Frame::Committed { point, generation: 2 }) => point,
            other => panic!("expected Committed, got {other:?}"),
        }
    };
    for (what, base, generation) in [
        ("an incremental on a point that is not the latest", good_point, 3),
        ("an incremental on a point that does not exist", second_point + 100, 4),
    ] {
        // docs/wire.md §6.3: an incremental applies on the latest point, "any other base is
        // ERR_DISK_MISMATCH" — else the new latest point would silently lack the changes of
        // the points in between.
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        c.register("good", SIZE);
        c.send(&Frame::BeginGeneration {
            disk: "good".into(),
            generation,
            kind: GenerationKind::Incremental,
            base_point: Some(base),
        });
        // Refused at BeginGeneration; if not, the rest shows what the server does with it.
        let first = c.recv_within(Duration::from_secs(2)).unwrap_or_else(|| {
            c.send(&Frame::Zero { offset: 0, len: 4096 });
            c.send(&Frame::Commit {
                generation,
                cut_unix_ms: now_ms(),
                consistency: Consistency::Crash,
                digest: None,
            });
            c.recv()
        });
        refusal_of(&mut fails, first, &mut c, wire::ERR_DISK_MISMATCH, ErrorClass::Fatal, what);
        nothing_stored(&mut fails, &store, &before, what);
    }
    {
        // A smaller size: the disk shrank (a larger one is a disk that grew, and accepted).
        let what = "a registration with a smaller size";
        let mut c = Raw::session(addr, &certs);
        c.send(&register_frame("good", SIZE / 2));
        refusal(&mut fails, &mut c, wire::ERR_DISK_MISMATCH, ErrorClass::Fatal, what);
    }
    for (what, frame) in [
        ("a Zero extent past the end of the disk", Frame::Zero { offset: SIZE - 4096, len: 8192 }),
        ("a Chunk past the end of the disk", {
            let past = rng.bytes(4096);
            Frame::Chunk {
                offset: SIZE,
                len: 4096,
                hash: *blake3::hash(&past).as_bytes(),
                data: ChunkData::Compressed(zstd::bulk::compress(&past, 3).expect("zstd")),
            }
        }),
    ] {
        let before = store_files(&store);
        let mut c = Raw::session(addr, &certs);
        let latest = c.register("good", SIZE).expect("good has points");
        c.send(&Frame::BeginGeneration {
            disk: "good".into(),
            generation: 5,
            kind: GenerationKind::Incremental,
            base_point: Some(latest.point),
        });
        c.send(&frame);
        refusal(&mut fails, &mut c, wire::ERR_BAD_REQUEST, ErrorClass::Fatal, what);
        nothing_stored(&mut fails, &store, &before, what);
    }
    let listed: Vec<u64> = points(&store, "good").iter().map(|p| json_u64(p, "id")).collect();
    if listed != vec![good_point, second_point] {
        fails.push(format!(
            "only the good generations ({good_point}, {second_point}) may be points: {listed:?}"
        ));
    }
    let out = d.join("good.img");
    let mut expected = good.clone();
    expected.resize(SIZE as usize, 0);
    for id in [good_point, second_point] {
        restore(&store, "good", &id.to_string(), &out);
        image::assert_same_bytes(&format!("good point {id}"), &image::read(&out), &expected);
    }

    // --- Certificates the server must not trust -------------------------------------------------
    for (what, cert, key) in [
        ("a client certificate from another CA", other.agent_cert(), other.agent_key()),
        ("the server's own certificate presented by a client", certs.server_cert(), certs.server_key()),
    ] {
        let before = store_files(&store);
        match Raw::connect(addr, &cert, &key, &certs.ca()) {
            Err(e) => eprintln!("{what}: TLS handshake failed: {e}"),
            Ok(mut c) => {
                // TLS 1.3: the client finishes first; the server's verdict arrives as an alert.
                c.send(&Frame::Hello {
                    min_version: wire::VERSION,
                    max_version: wire::VERSION,
                    agent: "untrusted".into(),
                });
                match c.recv() {
                    Got::Closed(e) => eprintln!("{what}: refused: {e}"),
                    Got::Frame(f) => panic!("{what}: the server answered {f:?}"),
                }
            }
        }
        nothing_stored(&mut fails, &store, &before, what);
    }
    {
        let what = "a server certificate from another CA (the agent's view)";
        match Raw::connect(addr, &certs.agent_cert(), &certs.agent_key(), &other.ca()) {
            Err(e) => eprintln!("{what}: TLS handshake failed: {e}"),
            Ok(_) => panic!("{what}: the handshake succeeded"),
        }
    }

    // The agent itself: an authentication failure is fatal and quick, with a clear message. The
    // default retry delays (a minute first) would leave a retrying agent asleep.
    let img = d.join("disk.img");
    random_image(&img, 16 * MIB, &[(0, 4 * MIB)], rng.next_u64());
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    // `siterep certs init` makes the CA for the enrollment cases below; its name differs from
    // scripts/make-certs' ("siterep CA" and "siterep test CA"), while two make-certs CAs share
    // one: the server sees an unknown issuer in one case and a bad signature in the other.
    let site = d.join("enrolled-site");
    std::fs::create_dir(&site).expect("mkdir");
    let enrolled = Certs::init(&d.join("enrolled"), &["alpha-agent=alpha", "beta-agent=beta", "stray=gamma"]);
    let (alpha_cert, alpha_key) = enrolled.agent("alpha-agent");
    for (what, cert, key, ca) in [
        (
            "an agent certificate from another CA of the same name",
            other.agent_cert(),
            other.agent_key(),
            certs.ca(),
        ),
        ("an agent certificate from a CA of another name", alpha_cert.clone(), alpha_key.clone(), certs.ca()),
        ("an agent that does not trust the server's CA", certs.agent_cert(), certs.agent_key(), other.ca()),
    ] {
        let before = store_files(&store);
        let mut cmd = AgentCmd::new(shim.socket(), addr, "untrusted", &certs).tls(&cert, &key, &ca).command();
        cmd.arg("--once");
        let Ran { status, stderr, took, .. } = run_for(cmd, Duration::from_secs(15));
        let last = stderr.lines().last().unwrap_or("").to_owned();
        let clear = last.starts_with("siterep: ") && (last.contains("certificate") || last.contains("alert"));
        if status.and_then(|s| s.code()) != Some(1) || !clear {
            fails.push(format!(
                "{what}: the agent should exit 1 at once naming the certificate problem; after {took:?}: \
                 {status:?}, stderr:\n{stderr}"
            ));
        } else {
            eprintln!("{what}: exit 1 after {took:?}: {last}");
        }
        assert!(!store.join("disks/untrusted").exists(), "{what}: the disk was registered");
        nothing_stored(&mut fails, &store, &before, what);
    }

    // --- An agent presenting another disk's identity -------------------------------------------
    // `siterep certs init` enrolled alpha-agent for disk alpha and beta-agent for beta; `stray`
    // has a certificate from the same CA but is left out of the server's enrollment file.
    let doc = parse_json(
        "the enrollment file",
        &std::fs::read(enrolled.enrollment()).expect("read the enrollment"),
    );
    let kept: Vec<Value> = json_array(&doc, "agents")
        .iter()
        .filter(|a| json_str(a, "name") != "stray")
        .map(|a| {
            let disks: Vec<&str> =
                json_array(a, "disks").iter().map(|d| d.as_str().expect("a disk name")).collect();
            serde_json::json!({
                "name": json_str(a, "name"),
                "fingerprint": json_str(a, "fingerprint"),
                "disks": disks,
            })
        })
        .collect();
    assert_eq!(kept.len(), 2, "{doc:?}");
    let enrollment = site.join("enrollment.json");
    let kept = serde_json::json!({ "version": 1, "agents": kept });
    std::fs::write(&enrollment, kept.to_string()).expect("write");
    let store2 = site.join("store");
    let server2 = RecoveryServer::start(
        &store2,
        &enrolled,
        &["--enrollment", enrollment.to_str().expect("UTF-8 path")],
    );
    let (stray_cert, stray_key) = enrolled.agent("stray");
    {
        let what = "alpha-agent registering disk beta";
        let before = store_files(&store2);
        let mut c = Raw::session_as(server2.addr(), &alpha_cert, &alpha_key, &enrolled.ca());
        c.send(&register_frame("beta", SIZE));
        refusal(&mut fails, &mut c, wire::ERR_AUTH, ErrorClass::Fatal, what);
        assert!(!store2.join("disks/beta").exists(), "{what}: disk beta was registered");
        nothing_stored(&mut fails, &store2, &before, what);
    }
    {
        let what = "alpha-agent registering beta after its own alpha";
        let before = store_files(&store2);
        let mut c = Raw::session_as(server2.addr(), &alpha_cert, &alpha_key, &enrolled.ca());
        assert!(c.register("alpha", 16 * MIB).is_none());
        c.send(&register_frame("beta", SIZE));
        refusal(&mut fails, &mut c, wire::ERR_AUTH, ErrorClass::Fatal, what);
        assert!(!store2.join("disks/beta").exists(), "{what}: disk beta was registered");
        nothing_stored(&mut fails, &store2, &before, what);
    }
    {
        let what = "alpha-agent sending a generation of beta";
        let before = store_files(&store2);
        let mut c = Raw::session_as(server2.addr(), &alpha_cert, &alpha_key, &enrolled.ca());
        c.register("alpha", 16 * MIB);
        c.begin_initial("beta");
        let first = c.recv_within(Duration::from_secs(2)).unwrap_or_else(|| {
            c.send(&Frame::Zero { offset: 0, len: SIZE });
            c.send(&Frame::Commit {
                generation: 1,
                cut_unix_ms: now_ms(),
                consistency: Consistency::Inconsistent,
                digest: None,
            });
            c.recv()
        });
        let code = match first {
            Got::Frame(Frame::Error { code, message, .. }) => {
                eprintln!("{what}: refused with code {code}: {message}");
                code
            }
            other => panic!("{what}: expected an Error, got {other:?}"),
        };
        assert!(code == wire::ERR_AUTH || code == wire::ERR_BAD_REQUEST, "{what}: code {code}");
        assert!(!store2.join("disks/beta").exists(), "{what}: disk beta was registered");
        nothing_stored(&mut fails, &store2, &before, what);
    }
    {
        let what = "an agent certificate from the right CA that is not enrolled";
        let before = store_files(&store2);
        let mut c = Raw::session_as(server2.addr(), &stray_cert, &stray_key, &enrolled.ca());
        c.send(&register_frame("gamma", SIZE));
        refusal(&mut fails, &mut c, wire::ERR_AUTH, ErrorClass::Fatal, what);
        assert!(!store2.join("disks/gamma").exists(), "{what}: disk gamma was registered");
        nothing_stored(&mut fails, &store2, &before, what);
    }
    {
        // The agent itself: refused authorization is fatal, at once, with the reason.
        let what = "siterep agent with alpha-agent's certificate for disk beta";
        let before = store_files(&store2);
        let mut cmd = AgentCmd::new(shim.socket(), server2.addr(), "beta", &enrolled)
            .tls(&alpha_cert, &alpha_key, &enrolled.ca())
            .command();
        cmd.arg("--once");
        let Ran { status, stderr, took, .. } = run_for(cmd, Duration::from_secs(15));
        let last = stderr.lines().last().unwrap_or("").to_owned();
        if status.and_then(|s| s.code()) != Some(1)
            || !(last.starts_with("siterep: ") && last.contains("not enrolled for disk beta"))
        {
            fails.push(format!("{what}: after {took:?}: {status:?}, stderr:\n{stderr}"));
        } else {
            eprintln!("{what}: exit 1 after {took:?}: {last}");
        }
        assert!(!store2.join("disks/beta").exists(), "{what}: disk beta was registered");
        nothing_stored(&mut fails, &store2, &before, what);
    }
    // The raw client above registered alpha with a made-up source identity, which bound the
    // disk to it: the real shim is another source, so this agent re-enrolls (docs/wire.md §6.2).
    let summary = AgentCmd::new(shim.socket(), server2.addr(), "alpha", &enrolled)
        .tls(&alpha_cert, &alpha_key, &enrolled.ca())
        .args(["--reenroll"])
        .once();
    assert_eq!(json_str(&summary, "kind"), "initial", "alpha-agent replicates its own disk");
    server2.stop();

    // The server survived all of it: a real agent replicates.
    let summary = AgentCmd::new(shim.socket(), addr, "after", &certs).once();
    assert_eq!(json_str(&summary, "kind"), "initial");
    let out = d.join("after.img");
    restore(&store, "after", "latest", &out);
    assert_same_files("a real agent after the bad input", &out, &img);
    shim.stop();
    server.stop();
    assert!(fails.is_empty(), "{} refusals were not as they should be:\n{}", fails.len(), fails.join("\n"));
}

// =============================================================================================
// 5. Agent command-line errors

#[test]
fn agent_cli_errors() {
    let dir = scratch_dir("repl-cli");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let empty = d.join("empty.pem");
    std::fs::write(&empty, "").expect("write");
    let (cert, key, ca) = (certs.agent_cert(), certs.agent_key(), certs.ca());
    let p = |p: &Path| p.display().to_string();
    let base = |server: bool, cert: &str, key: &str, ca: &str| {
        let mut v: Vec<String> =
            vec!["agent".into(), "--socket".into(), p(&d.join("nbd.sock")), "--disk".into(), "d1".into()];
        if server {
            v.extend(["--server".into(), "127.0.0.1:9".into()]);
        }
        v.extend([
            "--tls-cert".into(),
            cert.into(),
            "--tls-key".into(),
            key.into(),
            "--tls-ca".into(),
            ca.into(),
        ]);
        v
    };
    let good = || base(true, &p(&cert), &p(&key), &p(&ca));
    let with = |extra: &[&str]| {
        let mut v = good();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // (what, arguments, text the error must name)
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        ("missing --server", base(false, &p(&cert), &p(&key), &p(&ca)), "--server"),
        ("--interval with an unknown unit", with(&["--interval", "5 parsecs"]), "--interval"),
        ("--interval that is not a number", with(&["--interval", "soon"]), "--interval"),
        ("a negative --interval", with(&["--interval=-1s"]), "--interval"),
        // Zero would make the agent cut without pause: on an idle 16 MiB disk it committed 815
        // empty points in 5 s.
        ("a zero --interval", with(&["--interval", "0"]), "--interval"),
        ("--retry-scale 0", with(&["--retry-scale", "0"]), "--retry-scale"),
        ("a negative --retry-scale", with(&["--retry-scale=-1"]), "--retry-scale"),
        ("--retry-scale NaN", with(&["--retry-scale", "NaN"]), "--retry-scale"),
        ("--retry-scale that is not a number", with(&["--retry-scale", "fast"]), "--retry-scale"),
        ("--retry-scale above 100", with(&["--retry-scale", "1e9"]), "--retry-scale"),
        (
            "a --tls-cert that does not exist",
            base(true, "/nonexistent/agent.pem", &p(&key), &p(&ca)),
            "/nonexistent/agent.pem",
        ),
        ("a --tls-key that is a directory", base(true, &p(&cert), &p(d), &p(&ca)), &p(d)),
        ("a --tls-ca without certificates", base(true, &p(&cert), &p(&key), &p(&empty)), &p(&empty)),
        ("a --tls-key without a key", base(true, &p(&cert), &p(&empty), &p(&ca)), &p(&empty)),
        ("--zstd-level 0", with(&["--zstd-level", "0"]), "--zstd-level"),
        ("--readers 0", with(&["--readers", "0"]), "--readers"),
        (
            "--pre-hook without --app-consistent-every",
            with(&["--pre-hook", "true"]),
            "--app-consistent-every",
        ),
    ]
    .into_iter()
    .map(|(w, a, n)| (w, a, n.to_owned()))
    .collect();
    // Cases that came out wrong (reported together at the end).
    let mut fails = Vec::new();
    for (what, args, names) in cases {
        let mut cmd: Command = siterep();
        cmd.args(&args);
        let ran = run_for(cmd, Duration::from_secs(10));
        let lines: Vec<&str> = ran.stderr.lines().collect();
        let first = lines.first().copied().unwrap_or("");
        // One error line, the first; anything after it is clap's usage hint, never a second
        // error or a log line.
        let errors = lines
            .iter()
            .filter(|l| {
                l.starts_with("error")
                    || l.starts_with("siterep:")
                    || l.contains(" WARN ")
                    || l.contains(" ERROR ")
            })
            .count();
        // The error (up to clap's usage hint) names what is wrong.
        let error_text: String = lines
            .iter()
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
            .copied()
            .collect::<Vec<_>>()
            .join("\n");
        let code = ran.status.and_then(|s| s.code());
        let ok = matches!(code, Some(1 | 2))
            && ran.stdout.is_empty()
            && !ran.stderr.contains("panicked")
            && (first.starts_with("error: ") || first.starts_with("siterep: "))
            && errors == 1
            && error_text.contains(&names)
            && ran.took < Duration::from_secs(5);
        if ok {
            eprintln!("{what}: exit {} — {first}", code.expect("code"));
        } else {
            fails.push(format!(
                "{what}: expected one error line naming {names:?} and exit 1 or 2 at once; after {:?}: {:?} \
                 (None: still running, killed)\n--- stdout ---\n{}--- stderr ---\n{}",
                ran.took, ran.status, ran.stdout, ran.stderr
            ));
        }
    }
    assert!(
        fails.is_empty(),
        "{} bad command lines were not refused as they should be:\n{}",
        fails.len(),
        fails.join("\n")
    );

    // `--once` with nothing to talk to: retries its schedule (scaled down), then gives up with
    // a non-zero exit, not forever. The server port has no listener; the shim socket no file.
    for (what, extra) in [
        ("--once, default retries", vec!["--once", "--retry-scale", "0.001"]),
        ("--max-retries 2", vec!["--max-retries", "2", "--retry-scale", "0.001"]),
    ] {
        let mut cmd: Command = siterep();
        cmd.args(with(&extra));
        let ran = run_for(cmd, Duration::from_secs(30));
        let code = ran.status.and_then(|s| s.code());
        let last = ran.stderr.lines().last().unwrap_or("");
        eprintln!("{what}: exit {code:?} after {:?} — {last}", ran.took);
        assert_eq!(code, Some(1), "{what}: expected exit 1\n{}", ran.stderr);
        assert!(last.contains("gave up after"), "{what}: the last line should say it gave up: {last}");
        assert!(ran.stdout.is_empty(), "{what}: no summary without a commit");
    }
}
