//! Issue 4, proved with real clients: crash-safe changed-block tracking, point-in-time
//! generations served as `gen-N` exports, the preserve limit, zero extents from a real `mkfs`,
//! persistence across clean restarts, corrupt-state detection, the owner-only control socket and
//! the memory bounds.
//!
//! Oracles are programs we did not write: fio's completion log says which writes were
//! acknowledged, nbdinfo reads the dirty bitmaps, nbdcopy and qemu-img read the generations,
//! mkfs.ext4 discards through nbdfuse and a loop device. The on-disk state is read with a parser
//! written here from `docs/tracker-state.md`, never imported from the tracker.
//!
//! `SITEREP_TEST_SEED` fixes the random layouts and kill moments (the seed used is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use siterep_tests::blockdev::{FuseExport, LoopDevice};
use siterep_tests::control;
use siterep_tests::image::{self, Rng, GIB, KIB, MIB};
use siterep_tests::nbdinfo::{self, expected_map, Extent};
use siterep_tests::{
    json_array, json_str, json_u64, nbdsh, poll, require_tool, run, run_expect_failure, run_unchecked,
    scratch_dir, show_output, siterep, siterep_bin, tool, wait_timeout, Serve, Server,
};

/// The default tracking granularity.
const BLOCK: u64 = 4 * KIB;
/// The default activity-log region (`docs/tracker-state.md`).
const REGION: u64 = 4 * MIB;
/// Leaf of the dirty bitmap: 4096 bytes = 32768 blocks (`docs/tracker-state.md`, `state.bin`).
const LEAF_BLOCKS: u64 = 32768;

fn seed() -> u64 {
    let seed = std::env::var("SITEREP_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64
    });
    eprintln!("SITEREP_TEST_SEED={seed}");
    seed
}

/// `generations[]` of a status document, by id.
fn generations(status: &Value) -> BTreeMap<u64, Value> {
    json_array(status, "generations").iter().map(|g| (json_u64(g, "id"), g.clone())).collect()
}

/// A reason member (`resync_required`, `inconsistent`): `None` when null; fails the test when
/// it is absent or neither null nor a string.
#[track_caller]
fn reason(j: &Value, key: &str) -> Option<String> {
    match j.get(key) {
        Some(Value::Null) => None,
        Some(Value::String(why)) => Some(why.clone()),
        other => panic!("{key} is neither null nor a reason: {other:?} in {j}"),
    }
}

/// Export names `nbdinfo --list` shows.
fn listed_exports(server: &Server) -> Vec<String> {
    let doc = nbdinfo::list(&server.uri());
    json_array(&doc, "exports").iter().map(|e| json_str(e, "export-name").to_owned()).collect()
}

/// `nbdinfo --map=CONTEXT` of `export`, merged.
fn map_of(server: &Server, export: &str, context: &str, size: u64) -> Vec<Extent> {
    nbdinfo::merge(&nbdinfo::map(&server.uri_for(export), Some(context), size))
}

/// Total length of the extents whose flags are exactly `kind`.
fn bytes_of(map: &[Extent], kind: u64) -> u64 {
    map.iter().filter(|e| e.kind == kind).map(|e| e.length).sum()
}

/// One bool per `BLOCK` of `size`: set where an extent with bit 0 (dirty) covers it.
fn dirty_blocks(map: &[Extent], size: u64) -> Vec<bool> {
    let mut blocks = vec![false; size.div_ceil(BLOCK) as usize];
    for e in map.iter().filter(|e| e.kind & 1 != 0) {
        assert!(e.offset % BLOCK == 0, "dirty extent {e:?} is not aligned to the granularity");
        for b in e.offset / BLOCK..e.end().div_ceil(BLOCK) {
            blocks[b as usize] = true;
        }
    }
    blocks
}

fn block_set(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    ranges
        .iter()
        .filter(|r| r.1 > 0)
        .flat_map(|&(off, len)| off / BLOCK..(off + len).div_ceil(BLOCK))
        .collect()
}

/// Blocks as merged `[start, end)` byte ranges, for messages.
fn block_runs(blocks: impl IntoIterator<Item = u64>) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match runs.last_mut() {
            Some(last) if last.1 == b => last.1 = b + 1,
            _ => runs.push((b, b + 1)),
        }
    }
    let mut s = String::new();
    for (i, (a, b)) in runs.iter().enumerate() {
        if i == 12 {
            let _ = write!(s, " … ({} runs)", runs.len());
            break;
        }
        let _ = write!(s, "{}[{}, {})", if i > 0 { " " } else { "" }, a * BLOCK, b * BLOCK);
    }
    s
}

/// Starts `cmd` with stdout and stderr going to `log`.
fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits for `child` (at most `timeout`, else it is killed and the test fails).
#[track_caller]
fn finish(child: &mut Child, what: &str, log: &Path, timeout: Duration) -> std::process::ExitStatus {
    match wait_timeout(child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {timeout:?} (killed):\n{}", read_log(log));
        }
    }
}

/// `qemu-io -f raw URI -c "write -P PATTERN OFF LEN" …`, one process for all writes.
fn qemu_io_write(uri: &str, writes: &[(u64, u64, u8)]) {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw"]);
    for &(off, len, pattern) in writes {
        cmd.arg("-c").arg(format!("write -P 0x{pattern:02x} {off} {len}"));
    }
    cmd.arg(uri);
    run(&mut cmd);
}

// ---------------------------------------------------------------------------------------------
// state.bin as docs/tracker-state.md describes it

/// The parts of `state.bin` the tests look at.
#[derive(Debug)]
struct StateFile {
    clean: bool,
    next_gen: u64,
    resync: Option<String>,
    maps: Vec<StateMap>,
}

#[derive(Debug)]
struct StateMap {
    gen: u64,
    inconsistent: Option<String>,
    dirty_leaves: u32,
    zero_leaves: u32,
    preserved: u64,
}

struct Reader<'a>(&'a [u8], usize);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.0.get(self.1..self.1.checked_add(n)?)?;
        self.1 += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    /// A set of leaves, skipped; returns how many. A full leaf is its index with bit 31 set,
    /// any other leaf its index and a 4096-byte bitmap.
    fn leaves(&mut self) -> Option<u32> {
        let n = self.u32()?;
        for _ in 0..n {
            if self.u32()? & (1 << 31) == 0 {
                self.take(4096)?;
            }
        }
        Some(n)
    }
    fn reason(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => {
                let len = self.u16()? as usize;
                Some(Some(String::from_utf8_lossy(self.take(len)?).into_owned()))
            }
            _ => None,
        }
    }
}

/// Parses `DIR/state.bin`; `None` if it is absent or not in the documented layout.
fn read_state(dir: &Path) -> Option<StateFile> {
    let bytes = std::fs::read(dir.join("state.bin")).ok()?;
    let mut r = Reader(&bytes, 0);
    if r.take(8)? != b"SRTRKST\0" || r.u32()? != 2 {
        return None;
    }
    let flags = r.u32()?;
    let (_size, _granularity, next_gen) = (r.u64()?, r.u64()?, r.u64()?);
    let resync = r.reason()?;
    let n_maps = r.u32()?;
    let mut maps = Vec::new();
    for _ in 0..n_maps {
        let gen = r.u64()?;
        let _cut = r.u64()?;
        let inconsistent = r.reason()?;
        let dirty_leaves = r.leaves()?;
        let zero_leaves = r.leaves()?;
        let preserved = r.u64()?;
        r.take(usize::try_from(preserved).ok()?.checked_mul(16)?)?;
        maps.push(StateMap { gen, inconsistent, dirty_leaves, zero_leaves, preserved });
    }
    r.take(32)?;
    (r.1 == bytes.len()).then_some(StateFile { clean: flags & 1 != 0, next_gen, resync, maps })
}

/// Waits (up to 15 s) until a checkpoint has written a `state.bin` satisfying `pred`.
#[track_caller]
fn wait_state(dir: &Path, what: &str, pred: impl Fn(&StateFile) -> bool) -> StateFile {
    let mut last = None;
    let found = poll(Duration::from_secs(15), || {
        let state = read_state(dir);
        if state.as_ref().is_some_and(&pred) {
            return state;
        }
        last = state;
        None
    });
    found.unwrap_or_else(|| match last {
        Some(s) => panic!("state.bin never showed {what} within 15 s; last: {s:?}"),
        None => panic!("state.bin never showed {what} within 15 s; it is missing or unparsable"),
    })
}

/// The state holds an empty live set and no generation: nothing left over for the next crash.
fn quiescent(s: &StateFile) -> bool {
    s.resync.is_none()
        && s.maps.len() == 1
        && s.maps[0].gen == 0
        && s.maps[0].dirty_leaves == 0
        && s.maps[0].zero_leaves == 0
}

/// Clears the first start's resync-required, as the agent does after its initial full copy,
/// and waits until a checkpoint has made that durable. There is no `siterep` subcommand for it:
/// the control socket's `clear-resync` request is what the agent sends.
fn clear_first_start_resync(server: &Server, state_dir: &Path) {
    let st = control::status(server.socket());
    let why = reason(&st, "resync_required").expect("a first start must require a resync");
    assert!(why.contains("first start"), "first start's resync reason: {why:?}");
    control::request_ok(&server.control_socket(), r#"{"cmd":"clear-resync"}"#);
    assert_eq!(control::status(server.socket()).get("resync_required"), Some(&Value::Null));
    wait_state(state_dir, "resync-required cleared", |s| s.resync.is_none());
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9

const KILL_ITERATIONS: usize = 20;
const KILL_SIZE: u64 = 256 * MIB;

/// The writes fio saw completed successfully, from its completion-latency log
/// (`--write_lat_log=PREFIX --log_offset=1 --log_avg_msec=0` writes `PREFIX_clat.1.log`, one line
/// `time, clat, ddir, bs, offset, prio` per completed I/O; fio logs only I/O that completed
/// without error). Returns the 4 KiB blocks written.
fn acknowledged_writes(log: &Path) -> (BTreeSet<u64>, usize) {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("fio's completion log {} is missing: {e}", log.display()));
    let mut blocks = BTreeSet::new();
    let mut lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<u64> = line
            .split(',')
            .map(|f| {
                f.trim().parse().unwrap_or_else(|_| panic!("fio log line {line:?} in {}", log.display()))
            })
            .collect();
        assert!(fields.len() >= 5, "fio log line {line:?} has no offset (needs --log_offset=1)");
        let (ddir, bs, offset) = (fields[2], fields[3], fields[4]);
        assert_eq!(ddir, 1, "fio logged a non-write completion: {line:?}");
        assert!(bs == BLOCK && offset % BLOCK == 0, "fio wrote an unaligned block: {line:?}");
        blocks.insert(offset / BLOCK);
        lines += 1;
    }
    (blocks, lines)
}

/// `issued rwts: total=R,W,T,S` from fio's report: writes fio submitted.
fn fio_issued_writes(report: &str) -> Option<u64> {
    let rest = &report[report.find("issued rwts: total=")? + "issued rwts: total=".len()..];
    rest.split(',').nth(1)?.trim().parse().ok()
}

#[test]
fn kill9_never_loses_acknowledged_writes() {
    require_tool("fio");
    require_tool("nbdinfo");
    let dir = scratch_dir("kill9");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, KILL_SIZE);
    let state = dir.path().join("state");
    let serve = Serve::new(&img).socket(&dir.path().join("nbd.sock")).state_dir(&state);
    let mut server = serve.clone().start();
    // A first start cannot know what changed before it and must require a resync. Clearing it
    // (what the agent does after its full copy) lets every iteration check that a crash
    // recovery does NOT require one.
    clear_first_start_resync(&server, &state);
    wait_state(&state, "an empty live set", quiescent);

    let mut rng = Rng::new(seed());
    let mut ratios = Vec::new();
    for iter in 0..KILL_ITERATIONS {
        let before = control::status(server.socket());
        assert_eq!(
            json_u64(&before, "live_dirty_bytes"),
            0,
            "iteration {iter} starts with an empty live set"
        );
        assert!(generations(&before).is_empty(), "iteration {iter} starts without generations: {before:?}");

        let iodepth = 16 + rng.below(17);
        let delay = Duration::from_millis(100 + rng.below(1401));
        let prefix = dir.path().join(format!("it{iter}"));
        let fio_log = dir.path().join(format!("it{iter}.fio"));
        let mut fio = spawn_logged(
            tool("fio")
                .args(["--name=kill9", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--randrepeat=0"])
                .arg(format!("--size={KILL_SIZE}"))
                .arg(format!("--iodepth={iodepth}"))
                .args(["--time_based", "--runtime=120"])
                .arg(format!("--write_lat_log={}", prefix.display()))
                .args(["--log_offset=1", "--log_avg_msec=0"])
                .arg(format!("--uri={}", server.uri())),
            &fio_log,
        );
        // The random delay counts from fio's first write the shim has seen, not from fio's start.
        let ctl = server.control_socket();
        let writing = poll(Duration::from_secs(30), || {
            let st = control::request_ok(&ctl, r#"{"cmd":"status"}"#);
            json_u64(&st, "live_dirty_bytes") > 0 || fio.try_wait().expect("try_wait").is_some()
        });
        assert!(writing.is_some(), "fio did not start writing within 30 s:\n{}", read_log(&fio_log));
        std::thread::sleep(delay);
        if let Some(status) = fio.try_wait().expect("try_wait") {
            panic!("fio exited ({status}) before the shim was killed:\n{}", read_log(&fio_log));
        }
        server.kill();
        let status = finish(&mut fio, "fio after its server was killed", &fio_log, Duration::from_secs(60));
        let report = read_log(&fio_log);
        assert!(!status.success(), "fio must fail when its server dies:\n{report}");

        let clat = PathBuf::from(format!("{}_clat.1.log", prefix.display()));
        let (acked, completions) = acknowledged_writes(&clat);
        assert!(!acked.is_empty(), "iteration {iter}: fio logged no completed write:\n{report}");
        // The log is the oracle: it must account for every write fio submitted but those in
        // flight when the connection died (at most the queue depth).
        let issued = fio_issued_writes(&report)
            .unwrap_or_else(|| panic!("no `issued rwts` line in fio's report:\n{report}"));
        assert!(
            issued >= completions as u64 && issued - completions as u64 <= iodepth,
            "fio issued {issued} writes but logged {completions} completions at iodepth {iodepth}:\n{report}"
        );

        server = serve.clone().start();
        let st = control::status(server.socket());
        assert_eq!(
            st.get("resync_required"),
            Some(&Value::Null),
            "iteration {iter}: recovery after kill -9 must not need a resync\n{}",
            server.log()
        );
        assert!(generations(&st).is_empty(), "iteration {iter}: no generation existed at the crash: {st:?}");
        let map = map_of(&server, "", "qemu:dirty-bitmap:live", KILL_SIZE);
        let dirty = dirty_blocks(&map, KILL_SIZE);
        let lost: Vec<u64> = acked.iter().copied().filter(|&b| !dirty[b as usize]).collect();
        assert!(
            lost.is_empty(),
            "iteration {iter}: {} acknowledged 4 KiB blocks are missing from the recovered dirty set: \
             {}\nrecovered map: {map:?}\n{}",
            lost.len(),
            block_runs(lost.iter().copied()),
            server.log()
        );
        let recovered = bytes_of(&map, 1);
        assert_eq!(recovered, json_u64(&st, "live_dirty_bytes"), "status and the live bitmap disagree");
        let acked_bytes = acked.len() as u64 * BLOCK;
        let bound = json_u64(&st, "over_report_bound_bytes");
        assert!(bound > 0, "a persistent tracker reports its over-report bound: {st:?}");
        assert!(
            recovered <= acked_bytes + bound,
            "iteration {iter}: recovered {recovered} bytes > acknowledged {acked_bytes} + bound {bound}"
        );
        // Over-report comes only from whole activity-log regions that writes made hot: a region
        // dirty after recovery without any acknowledged write in it can only hold a write that
        // was in flight at the kill, of which there were at most `iodepth`.
        let acked_regions: BTreeSet<u64> = acked.iter().map(|b| b * BLOCK / REGION).collect();
        let stray: BTreeSet<u64> = (0..dirty.len() as u64)
            .filter(|&b| dirty[b as usize])
            .map(|b| b * BLOCK / REGION)
            .filter(|r| !acked_regions.contains(r))
            .collect();
        assert!(
            stray.len() as u64 <= iodepth,
            "iteration {iter}: {} regions are dirty without any write acknowledged in them (iodepth {iodepth}): \
             {stray:?}",
            stray.len()
        );
        let ratio = recovered as f64 / acked_bytes as f64;
        eprintln!(
            "kill -9 #{iter:2}: iodepth {iodepth:2}, killed {:4} ms into the writes: {:6} writes acknowledged \
             ({:7.2} MiB unique), {issued} issued; recovered {:7.2} MiB dirty; over-report ratio {ratio:6.2}",
            delay.as_millis(),
            completions,
            acked_bytes as f64 / MIB as f64,
            recovered as f64 / MIB as f64,
        );
        ratios.push(ratio);

        // Clear the live set so that the next iteration's recovered set is its own.
        let cut = control::cut(server.socket());
        let n = json_u64(&cut, "generation");
        assert_eq!(json_u64(&cut, "dirty_bytes"), recovered, "the cut takes the whole recovered set");
        control::release(server.socket(), n);
        wait_state(&state, "an empty live set and no generation", quiescent);
    }
    let worst = ratios.iter().copied().fold(0.0, f64::max);
    let median = {
        let mut r = ratios.clone();
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    eprintln!(
        "kill -9: {} iterations, no acknowledged write lost; over-report ratio median {median:.2}, worst {worst:.2}",
        ratios.len()
    );
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 2. point-in-time generations

const PIT_SIZE: u64 = 64 * MIB;
const SLOT: u64 = 4 * MIB;

/// What happens to a range after the cut.
#[derive(Debug, Clone, Copy)]
enum Change {
    Write(u8),
    Trim,
    Zero,
}

/// The disk after `changes` (a trimmed file range reads as zeroes: the shim punches a hole).
fn apply(disk: &mut [u8], changes: &[(u64, u64, Change)]) {
    for &(off, len, change) in changes {
        let byte = match change {
            Change::Write(p) => p,
            Change::Trim | Change::Zero => 0,
        };
        disk[off as usize..(off + len) as usize].fill(byte);
    }
}

/// A range of 1 byte..3 MiB at a random (mostly unaligned) place inside `slot`.
fn range_in_slot(rng: &mut Rng, slot: u64, min_len: u64) -> (u64, u64) {
    let len = min_len + rng.below(3 * MIB - min_len);
    (slot * SLOT + rng.below(SLOT - len), len)
}

/// Compares a copy of generation N with the disk at the cut, block by block: a block dirty in N
/// must read as at the cut; a clean block nobody touched since the cut too; a clean block that
/// was changed since the cut may read old or new (byte by byte), or, if `settled` (copied after
/// the writers finished), must read new.
fn check_generation_copy(
    what: &str,
    out: &[u8],
    at_cut: &[u8],
    after: &[u8],
    dirty: &[bool],
    touched: &BTreeMap<u64, &'static str>,
    settled: bool,
) -> Result<(), String> {
    assert_eq!(out.len(), at_cut.len(), "{what}: copy has the wrong size");
    let mut wrong_dirty = Vec::new();
    let mut wrong_clean = Vec::new();
    let mut first: Option<String> = None;
    for b in 0..dirty.len() as u64 {
        let r = (b * BLOCK) as usize..((b + 1) * BLOCK).min(out.len() as u64) as usize;
        let ok = if dirty[b as usize] || !touched.contains_key(&b) {
            out[r.clone()] == at_cut[r.clone()]
        } else if settled {
            out[r.clone()] == after[r.clone()]
        } else {
            out[r.clone()]
                .iter()
                .zip(&at_cut[r.clone()])
                .zip(&after[r.clone()])
                .all(|((o, c), a)| o == c || o == a)
        };
        if !ok {
            if first.is_none() {
                let i = r.start
                    + out[r.clone()].iter().zip(&at_cut[r.clone()]).position(|(o, c)| o != c).unwrap_or(0);
                first = Some(format!(
                    "first at offset {i}: read {:02x?}, at the cut {:02x?}, now {:02x?}",
                    &out[i..(i + 8).min(out.len())],
                    &at_cut[i..(i + 8).min(out.len())],
                    &after[i..(i + 8).min(out.len())]
                ));
            }
            if dirty[b as usize] {
                wrong_dirty.push(b);
            } else {
                wrong_clean.push(b);
            }
        }
    }
    if wrong_dirty.is_empty() && wrong_clean.is_empty() {
        return Ok(());
    }
    let mut by_change: BTreeMap<&str, usize> = BTreeMap::new();
    for b in wrong_dirty.iter().chain(&wrong_clean) {
        *by_change.entry(touched.get(b).copied().unwrap_or("nothing")).or_default() += 1;
    }
    Err(format!(
        "{what}: the generation does not read as the disk at its cut.\n  blocks dirty in the generation \
         that differ ({}): {}\n  clean blocks that differ ({}): {}\n  changed after the cut by (blocks): \
         {by_change:?}\n  {}",
        wrong_dirty.len(),
        block_runs(wrong_dirty.iter().copied()),
        wrong_clean.len(),
        block_runs(wrong_clean.iter().copied()),
        first.unwrap_or_default()
    ))
}

/// An nbdsh (libnbd) script that applies `changes` over and over, in a fresh random order each
/// pass, until `stop` exists (at least one pass); it creates `ready` once connected and prints the
/// number of passes.
fn rewriter_script(changes: &[(u64, u64, Change)], seed: u64, ready: &Path, stop: &Path) -> String {
    let mut ops = String::new();
    for &(off, len, change) in changes {
        let (kind, pattern) = match change {
            Change::Write(p) => ("w", p),
            Change::Trim => ("t", 0),
            Change::Zero => ("z", 0),
        };
        let _ = write!(ops, "('{kind}', {off}, {len}, {pattern}), ");
    }
    format!(
        "import os, random\n\
         ops = [{ops}]\n\
         rnd = random.Random({seed})\n\
         open({ready:?}, 'w').close()\n\
         passes = 0\n\
         while True:\n\
         \x20   rnd.shuffle(ops)\n\
         \x20   for (kind, off, n, pattern) in ops:\n\
         \x20       if kind == 'w':\n\
         \x20           h.pwrite(bytes([pattern]) * n, off)\n\
         \x20       elif kind == 't':\n\
         \x20           h.trim(n, off)\n\
         \x20       else:\n\
         \x20           h.zero(n, off)\n\
         \x20   passes += 1\n\
         \x20   if os.path.exists({stop:?}):\n\
         \x20       break\n\
         print(passes)\n",
        ready = ready.display().to_string(),
        stop = stop.display().to_string(),
    )
}

#[test]
fn generation_reads_point_in_time_while_writes_go_on() {
    for t in ["qemu-io", "qemu-img", "nbdcopy", "nbdinfo", "fio"] {
        require_tool(t);
    }
    let dir = scratch_dir("pit");
    let img = dir.path().join("disk.img");
    // The original content: random data in some places, holes elsewhere.
    let data: Vec<(u64, u64)> = (0..PIT_SIZE / SLOT).map(|s| (s * SLOT + 512 * KIB, 2 * MIB + 3)).collect();
    let mut disk = image::create_with_data(&img, PIT_SIZE, &data, 7);
    let state = dir.path().join("state");
    let server = Serve::new(&img).state_dir(&state).start();
    let base_seed = seed();
    // Changed since the last cut (so dirty in the next generation).
    let mut since_cut: Vec<(u64, u64)> = Vec::new();

    for iter in 0..5u64 {
        let mut rng = Rng::new(base_seed ^ (iter + 1).wrapping_mul(0x9e37_79b9));
        let mut slots: Vec<u64> = (0..PIT_SIZE / SLOT).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let (pa, pb, pf) = (0xa0 + iter as u8, 0xb0 + iter as u8, 0xc0 + iter as u8);
        // Pattern A in five slots: one range aligned to 64 KiB, the others at odd places; the
        // one that is trimmed later is at least 64 KiB long so whole blocks can be punched.
        let mut a: Vec<(u64, u64)> = Vec::new();
        a.push((slots[0] * SLOT + rng.below(32) * 64 * KIB, (1 + rng.below(32)) * 64 * KIB));
        for (i, &slot) in slots[1..5].iter().enumerate() {
            a.push(range_in_slot(&mut rng, slot, if i == 2 { 64 * KIB } else { 1 }));
        }
        qemu_io_write(&server.uri(), &a.iter().map(|&(o, l)| (o, l, pa)).collect::<Vec<_>>());
        apply(&mut disk, &a.iter().map(|&(o, l)| (o, l, Change::Write(pa))).collect::<Vec<_>>());
        since_cut.extend(&a);

        let cut = control::cut(server.socket());
        let n = json_u64(&cut, "generation");
        let gen = format!("gen-{n}");
        let at_cut = disk.clone();
        let expected_dirty = expected_map(PIT_SIZE, BLOCK, &since_cut, 1, 0);
        since_cut.clear();
        assert!(listed_exports(&server).contains(&gen), "{gen} is not listed after the cut");

        // After the cut: pattern B over three of A's ranges and two new ones, a TRIM of whole
        // blocks inside the fourth, WRITE_ZEROES over the fifth (unaligned), and fio writing
        // pattern C over a sixth slot — all while nbdcopy and qemu-img copy gen-N.
        let (trim_off, trim_end) = (a[3].0.div_ceil(BLOCK) * BLOCK, (a[3].0 + a[3].1) / BLOCK * BLOCK);
        let mut changes: Vec<(u64, u64, Change)> =
            a[..3].iter().map(|&(o, l)| (o, l, Change::Write(pb))).collect();
        for &slot in &slots[5..7] {
            let (o, l) = range_in_slot(&mut rng, slot, 1);
            changes.push((o, l, Change::Write(pb)));
        }
        changes.push((trim_off, trim_end - trim_off, Change::Trim));
        changes.push((a[4].0, a[4].1, Change::Zero));
        let fio_range = (slots[7] * SLOT + MIB, 2 * MIB);

        let ready = dir.path().join(format!("ready-{iter}"));
        let stop = dir.path().join(format!("stop-{iter}"));
        let rewriter_log = dir.path().join(format!("rewriter-{iter}.log"));
        let mut rewriter = spawn_logged(
            nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(rewriter_script(&changes, iter, &ready, &stop)),
            &rewriter_log,
        );
        let started = poll(Duration::from_secs(20), || {
            ready.exists() || rewriter.try_wait().expect("try_wait").is_some()
        });
        assert!(
            started.is_some() && ready.exists(),
            "the nbdsh rewriter did not connect:\n{}",
            read_log(&rewriter_log)
        );
        let fio_log = dir.path().join(format!("fio-{iter}.log"));
        let mut fio = spawn_logged(
            tool("fio")
                .args([
                    "--name=pit",
                    "--ioengine=nbd",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=16",
                    "--loops=3",
                ])
                .arg(format!("--offset={}", fio_range.0))
                .arg(format!("--size={}", fio_range.1))
                .arg(format!("--buffer_pattern=0x{pf:02x}"))
                .arg(format!("--uri={}", server.uri())),
            &fio_log,
        );
        let out_copy = dir.path().join(format!("nbdcopy-{iter}.img"));
        let out_convert = dir.path().join(format!("qemu-img-{iter}.img"));
        let copy_log = dir.path().join(format!("nbdcopy-{iter}.log"));
        let convert_log = dir.path().join(format!("qemu-img-{iter}.log"));
        let copy_start = Instant::now();
        let mut copy = spawn_logged(
            tool("nbdcopy").arg("--request-size=65536").arg(server.uri_for(&gen)).arg(&out_copy),
            &copy_log,
        );
        let mut convert = spawn_logged(
            tool("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(server.uri_for(&gen))
                .arg(&out_convert),
            &convert_log,
        );
        let copied = finish(&mut copy, "nbdcopy", &copy_log, Duration::from_secs(120));
        let converted = finish(&mut convert, "qemu-img convert", &convert_log, Duration::from_secs(120));
        let copy_took = copy_start.elapsed();
        std::fs::write(&stop, b"").expect("create the stop file");
        let rewritten = finish(&mut rewriter, "the nbdsh rewriter", &rewriter_log, Duration::from_secs(60));
        let fio_done = finish(&mut fio, "fio", &fio_log, Duration::from_secs(60));
        assert!(copied.success(), "nbdcopy of {gen} failed:\n{}", read_log(&copy_log));
        assert!(converted.success(), "qemu-img convert of {gen} failed:\n{}", read_log(&convert_log));
        assert!(rewritten.success(), "the nbdsh rewriter failed:\n{}", read_log(&rewriter_log));
        assert!(fio_done.success(), "fio failed:\n{}", read_log(&fio_log));
        eprintln!(
            "point-in-time #{iter}: {gen} copied in {copy_took:?} while the rewriter made {} passes",
            read_log(&rewriter_log).trim()
        );

        changes.push((fio_range.0, fio_range.1, Change::Write(pf)));
        let mut after = at_cut.clone();
        apply(&mut after, &changes);
        // The live disk really is `after` (the rewriter and fio did what the model says).
        let live_copy = dir.path().join(format!("live-{iter}.img"));
        run(tool("nbdcopy").arg(server.uri()).arg(&live_copy));
        image::assert_same_bytes(
            &format!("live disk after iteration {iter}"),
            &image::read(&live_copy),
            &after,
        );

        // gen-N's dirty set is exactly what changed between the previous cut and this one.
        let gen_map = map_of(&server, &gen, &format!("qemu:dirty-bitmap:{gen}"), PIT_SIZE);
        assert_eq!(gen_map, expected_dirty, "{gen}: dirty map");
        let dirty = dirty_blocks(&gen_map, PIT_SIZE);
        let mut touched: BTreeMap<u64, &'static str> = BTreeMap::new();
        for (i, &(o, l, change)) in changes.iter().enumerate() {
            let how = match change {
                Change::Write(_) if i + 1 == changes.len() => "fio WRITE",
                Change::Write(_) => "WRITE",
                Change::Trim => "TRIM",
                Change::Zero => "WRITE_ZEROES",
            };
            touched.extend(block_set(&[(o, l)]).into_iter().map(|b| (b, how)));
        }

        let mut failures = Vec::new();
        let settled_copy = dir.path().join(format!("settled-{iter}.img"));
        run(tool("nbdcopy").arg(server.uri_for(&gen)).arg(&settled_copy));
        for (what, path, settled) in [
            (format!("{gen} copied by nbdcopy during the writes"), &out_copy, false),
            (format!("{gen} copied by qemu-img convert during the writes"), &out_convert, false),
            (format!("{gen} copied by nbdcopy after the writes"), &settled_copy, true),
        ] {
            if let Err(e) =
                check_generation_copy(&what, &image::read(path), &at_cut, &after, &dirty, &touched, settled)
            {
                failures.push(e);
            }
        }
        assert!(
            failures.is_empty(),
            "point-in-time #{iter} (A = 0x{pa:02x}, B = 0x{pb:02x}, fio = 0x{pf:02x}; changes after the cut: \
             {changes:?}):\n{}\n{gen} base:allocation: {:?}",
            failures.join("\n"),
            map_of(&server, &gen, "base:allocation", PIT_SIZE)
        );

        let st = control::status(server.socket());
        let g = generations(&st)
            .remove(&n)
            .unwrap_or_else(|| panic!("status does not list generation {n}: {st:?}"));
        assert!(
            json_u64(&g, "preserved_bytes") > 0,
            "{gen} preserved nothing though its blocks were overwritten: {g:?}"
        );
        assert_eq!(g.get("inconsistent"), Some(&Value::Null), "{gen} must stay point-in-time: {g:?}");
        assert!(json_u64(&st, "preserve_used_bytes") >= json_u64(&g, "preserved_bytes"), "{st:?}");

        control::release(server.socket(), n);
        let st = control::status(server.socket());
        assert!(generations(&st).is_empty(), "{gen} still listed after release: {st:?}");
        assert_eq!(json_u64(&st, "preserve_used_bytes"), 0, "release must free the preserve store: {st:?}");
        assert!(!listed_exports(&server).contains(&gen), "{gen} is still exported after release");
        let gone = run_expect_failure(tool("nbdinfo").arg(server.uri_for(&gen)));
        assert!(!gone.stderr.is_empty(), "nbdinfo of a released generation must say why it failed");

        since_cut.extend(changes.iter().map(|&(o, l, _)| (o, l)));
        disk = after;
    }
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. preserve limit

#[test]
fn preserve_limit_marks_generation_inconsistent() {
    require_tool("qemu-io");
    let dir = scratch_dir("plimit");
    let img = dir.path().join("disk.img");
    let size = 16 * MIB;
    image::create_sparse(&img, size);
    let state = dir.path().join("state");
    let serve = Serve::new(&img).state_dir(&state).preserve_limit(64 * KIB);
    let server = serve.clone().socket(&dir.path().join("nbd.sock")).start();
    let (off, len) = (MIB, MIB);
    qemu_io_write(&server.uri(), &[(off, len, 0xa1)]);
    let n = json_u64(&control::cut(server.socket()), "generation");
    let gen = format!("gen-{n}");

    // Overwriting the whole MiB needs 1 MiB of pre-images; only 64 KiB fit. The writes must
    // still succeed (never blocked, never failed) and land.
    qemu_io_write(&server.uri(), &[(off, len, 0xb2)]);
    run(tool("qemu-io").args(["-f", "raw", "-c"]).arg(format!("read -P 0xb2 {off} {len}")).arg(server.uri()));
    qemu_io_write(&server.uri(), &[(8 * MIB, 4 * KIB, 0xc3)]);

    let st = control::status(server.socket());
    assert_eq!(json_u64(&st, "preserve_limit_bytes"), 64 * KIB, "{st:?}");
    assert!(json_u64(&st, "preserve_used_bytes") <= 64 * KIB, "preserve store over its limit: {st:?}");
    let g = generations(&st).remove(&n).expect("generation listed");
    let why =
        reason(&g, "inconsistent").unwrap_or_else(|| panic!("{gen} must be marked inconsistent: {g:?}"));
    assert!(why.contains("preserve store"), "inconsistent reason should name the preserve store: {why:?}");
    assert_eq!(json_u64(&g, "dirty_bytes"), len, "{gen}'s dirty set must stay complete: {g:?}");
    let expected = expected_map(size, BLOCK, &[(off, len)], 1, 0);
    assert_eq!(map_of(&server, &gen, &format!("qemu:dirty-bitmap:{gen}"), size), expected, "{gen} dirty map");
    let live = expected_map(size, BLOCK, &[(off, len), (8 * MIB, 4 * KIB)], 1, 0);
    assert_eq!(map_of(&server, "", "qemu:dirty-bitmap:live", size), live, "live dirty map");

    // The mark survives a clean restart: the agent must still be told.
    server.stop();
    let server = serve.socket(&dir.path().join("nbd.sock")).start();
    let st = control::status(server.socket());
    let g = generations(&st).remove(&n).expect("generation listed after restart");
    let again =
        reason(&g, "inconsistent").unwrap_or_else(|| panic!("{gen} consistent again after restart: {g:?}"));
    assert!(again.contains("preserve store"), "{again:?}");
    assert_eq!(
        map_of(&server, &gen, &format!("qemu:dirty-bitmap:{gen}"), size),
        expected,
        "{gen} after restart"
    );

    control::release(server.socket(), n);
    assert_eq!(json_u64(&control::status(server.socket()), "preserve_used_bytes"), 0);
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. zero extents from a real mkfs

#[test]
fn mkfs_discard_records_zero_extents() {
    for t in ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "nbdinfo"] {
        require_tool(t);
    }
    let dir = scratch_dir("mkfs");
    let img = dir.path().join("disk.img");
    let size = GIB;
    image::create_sparse(&img, size);
    let server = Serve::new(&img).start();

    let fuse = FuseExport::mount(&dir.path().join("fuse"), &server.uri());
    let lo = LoopDevice::attach(&fuse.file());
    run(tool("mkfs.ext4").args(["-q", "-F", "-E", "discard"]).arg(lo.path()));
    run(tool("e2fsck").args(["-f", "-n"]).arg(lo.path()));
    lo.detach();
    fuse.unmount();

    let st = control::status(server.socket());
    let (dirty, zero) = (json_u64(&st, "live_dirty_bytes"), json_u64(&st, "live_zero_bytes"));
    let data = dirty - zero;
    eprintln!(
        "mkfs.ext4 -E discard on 1 GiB: {:.1} MiB dirty, {:.1} MiB of it zero extents, {:.1} MiB data",
        dirty as f64 / MIB as f64,
        zero as f64 / MIB as f64,
        data as f64 / MIB as f64
    );
    assert!(zero >= size / 10 * 9, "the discard must leave ≥ 90% of the disk as zero extents: {st:?}");
    assert!(data <= 64 * MIB, "mkfs must not become a data copy: {data} bytes of data extents: {st:?}");
    assert!(data > 0, "mkfs wrote metadata, which must be tracked as data: {st:?}");

    // The same through the siterep:changes context: flag 3 (dirty, zero) and flag 1 (data).
    let changes = map_of(&server, "", "siterep:changes:live", size);
    assert!(changes.iter().all(|e| matches!(e.kind, 0 | 1 | 3)), "unexpected flags: {changes:?}");
    assert_eq!(bytes_of(&changes, 3), zero, "flag-3 extents vs status live_zero_bytes");
    assert_eq!(bytes_of(&changes, 1), data, "flag-1 extents vs status data bytes");
    let bitmap = map_of(&server, "", "qemu:dirty-bitmap:live", size);
    assert_eq!(bytes_of(&bitmap, 1), dirty, "qemu:dirty-bitmap:live counts zero extents as dirty");

    // A cut carries the zero extents into the generation.
    let cut = control::cut(server.socket());
    let n = json_u64(&cut, "generation");
    assert_eq!((json_u64(&cut, "dirty_bytes"), json_u64(&cut, "zero_bytes")), (dirty, zero), "{cut:?}");
    let gen = format!("gen-{n}");
    assert_eq!(map_of(&server, &gen, &format!("siterep:changes:{gen}"), size), changes, "{gen} changes");
    control::release(server.socket(), n);
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. clean restart

#[test]
fn state_survives_clean_restart() {
    for t in ["qemu-io", "nbdcopy", "nbdinfo", "nbdsh"] {
        require_tool(t);
    }
    let dir = scratch_dir("restart");
    let img = dir.path().join("disk.img");
    let size = 32 * MIB;
    image::create_with_data(&img, size, &[(0, 4 * MIB), (20 * MIB + 5, 3 * MIB)], 11);
    let state = dir.path().join("state");
    let serve = Serve::new(&img).socket(&dir.path().join("nbd.sock")).state_dir(&state);
    let server = serve.clone().start();
    clear_first_start_resync(&server, &state);

    // Generation N: A at odd places; then writes after the cut over half of it (pre-images
    // preserved), elsewhere, and a WRITE_ZEROES (a zero extent in the live set).
    let a = [(100_000, 300_000), (3 * MIB + 17, 2 * MIB), (21 * MIB, 64 * KIB)];
    qemu_io_write(&server.uri(), &a.map(|(o, l)| (o, l, 0xa5)));
    let n = json_u64(&control::cut(server.socket()), "generation");
    let gen = format!("gen-{n}");
    qemu_io_write(
        &server.uri(),
        &[(100_000, 100_000, 0xb6), (21 * MIB, 64 * KIB, 0xb6), (10 * MIB, 1000, 0xb6)],
    );
    run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(format!("h.zero({}, {})", 2 * MIB, 12 * MIB)));

    let gen_ctx = format!("qemu:dirty-bitmap:{gen}");
    let gen_changes_ctx = format!("siterep:changes:{gen}");
    let snapshot = |server: &Server, tag: &str| {
        let copy = dir.path().join(format!("{gen}-{tag}.img"));
        run(tool("nbdcopy").arg(server.uri_for(&gen)).arg(&copy));
        (
            image::read(&copy),
            map_of(server, &gen, &gen_ctx, size),
            map_of(server, &gen, &gen_changes_ctx, size),
            map_of(server, "", "qemu:dirty-bitmap:live", size),
            map_of(server, "", "siterep:changes:live", size),
        )
    };
    let before = snapshot(&server, "before");
    assert_eq!(before.1, expected_map(size, BLOCK, &a, 1, 0), "{gen} dirty map before the restart");
    assert!(bytes_of(&before.4, 3) > 0, "the WRITE_ZEROES must be a zero extent: {:?}", before.4);
    let status_before = control::status(server.socket());
    let g_before = generations(&status_before).remove(&n).expect("generation listed");
    assert!(json_u64(&g_before, "preserved_bytes") > 0, "{g_before:?}");

    server.stop(); // SIGTERM; asserts exit 0
    let on_disk = read_state(&state).expect("state.bin in the documented format after a clean shutdown");
    assert!(on_disk.clean, "a clean shutdown marks state.bin clean: {on_disk:?}");
    assert_eq!(on_disk.next_gen, n + 1, "state.bin's next generation id: {on_disk:?}");
    assert!(
        on_disk.maps.iter().any(|m| m.gen == n && m.inconsistent.is_none() && m.preserved > 0),
        "{on_disk:?}"
    );

    let server = serve.clone().start();
    assert!(listed_exports(&server).contains(&gen), "{gen} is not exported after the restart");
    let after = snapshot(&server, "after");
    image::assert_same_bytes(&format!("{gen} read before and after the restart"), &after.0, &before.0);
    assert_eq!(after.1, before.1, "{gen} dirty bitmap changed across the restart");
    assert_eq!(after.2, before.2, "{gen} siterep:changes changed across the restart");
    assert_eq!(after.3, before.3, "live dirty bitmap changed across the restart");
    assert_eq!(after.4, before.4, "live siterep:changes changed across the restart");
    let st = control::status(server.socket());
    assert_eq!(st.get("resync_required"), Some(&Value::Null), "a clean restart needs no resync: {st:?}");
    let g = generations(&st).remove(&n).expect("generation listed after restart");
    assert_eq!(g, g_before, "generation {n}'s status changed across the restart");
    assert_eq!(json_u64(&st, "live_dirty_bytes"), json_u64(&status_before, "live_dirty_bytes"));
    assert_eq!(json_u64(&st, "live_zero_bytes"), json_u64(&status_before, "live_zero_bytes"));

    // Pre-images still work after the restart: overwrite every block of N (some already
    // preserved, some not yet) and N still reads as before.
    qemu_io_write(&server.uri(), &a.map(|(o, l)| (o, l, 0xc7)));
    let again = snapshot(&server, "overwritten");
    image::assert_same_bytes(&format!("{gen} after overwriting it post-restart"), &again.0, &before.0);
    assert_eq!(reason(&generations(&control::status(server.socket()))[&n], "inconsistent"), None);

    // Ids are never reused: across a release, a clean restart, and a crash.
    let m = json_u64(&control::cut(server.socket()), "generation");
    assert!(m > n, "cut after restart gave {m}, not > {n}");
    control::release(server.socket(), m);
    control::release(server.socket(), n);
    server.stop();
    let server = serve.clone().start();
    let st = control::status(server.socket());
    assert!(generations(&st).is_empty(), "released generations came back after a clean restart: {st:?}");
    let k = json_u64(&control::cut(server.socket()), "generation");
    assert!(k > m, "cut after releasing {m} and restarting gave {k}");
    server.kill();
    let server = serve.start();
    let k2 = json_u64(&control::cut(server.socket()), "generation");
    assert!(k2 > k, "cut after a kill -9 gave {k2}, not > {k}");
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 6. corrupt state

#[test]
fn corrupt_state_requires_resync() {
    for t in ["qemu-io", "nbdinfo", "nbdsh"] {
        require_tool(t);
    }
    let dir = scratch_dir("corrupt");
    let img = dir.path().join("disk.img");
    let size = 64 * MIB;
    image::create_sparse(&img, size);
    let state = dir.path().join("state");
    let serve = Serve::new(&img).socket(&dir.path().join("nbd.sock")).state_dir(&state);

    // A flipped byte in state.bin.
    let server = serve.clone().start();
    clear_first_start_resync(&server, &state);
    qemu_io_write(&server.uri(), &[(MIB, 8 * KIB, 0x11)]);
    server.stop();
    let path = state.join("state.bin");
    let mut bytes = std::fs::read(&path).expect("read state.bin");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write state.bin");

    let server = serve.clone().start();
    let st = control::status(server.socket());
    let why = reason(&st, "resync_required")
        .unwrap_or_else(|| panic!("a corrupt state.bin must require a resync: {st:?}"));
    assert!(why.contains("checksum"), "the resync reason should name the checksum: {why:?}");
    // It keeps serving and tracking.
    qemu_io_write(&server.uri(), &[(5 * MIB + 3, 10_000, 0x22)]);
    let map = map_of(&server, "", "qemu:dirty-bitmap:live", size);
    let dirty = dirty_blocks(&map, size);
    let written = block_set(&[(5 * MIB + 3, 10_000)]);
    assert!(
        written.iter().all(|&b| dirty[b as usize]),
        "writes after a corrupt state must be tracked: {map:?}"
    );
    let st = control::status(server.socket());
    assert_eq!(bytes_of(&map, 1), json_u64(&st, "live_dirty_bytes"), "status and the live bitmap disagree");
    // The requirement is kept until cleared, across a clean restart.
    server.stop();
    let server = serve.clone().start();
    let st = control::status(server.socket());
    let kept =
        reason(&st, "resync_required").unwrap_or_else(|| panic!("resync-required was forgotten: {st:?}"));
    assert!(kept.contains("checksum"), "{kept:?}");
    let dirty = dirty_blocks(&map_of(&server, "", "qemu:dirty-bitmap:live", size), size);
    assert!(written.iter().all(|&b| dirty[b as usize]), "the live set was lost across a clean restart");
    server.stop();

    // A truncated activity log after kill -9: either everything acknowledged is recovered, or a
    // resync is required — never silently fewer blocks. Variants: the log gone, the second slot
    // gone, the second slot torn; with 3 and 4 newly hot regions so that the newest record lands
    // in either slot.
    let mut silent = Vec::new();
    for (cut_to, regions) in [(0u64, 3u64), (4096, 3), (4096, 4), (6144, 3), (6144, 4)] {
        let sub = dir.path().join(format!("al-{cut_to}-{regions}"));
        std::fs::create_dir(&sub).expect("mkdir");
        let img = sub.join("disk.img");
        image::create_sparse(&img, size);
        let state = sub.join("state");
        let serve = Serve::new(&img).socket(&sub.join("nbd.sock")).state_dir(&state);
        let server = serve.clone().start();
        clear_first_start_resync(&server, &state);
        wait_state(&state, "an empty live set", quiescent);
        // One acknowledged 4 KiB write in each of `regions` distinct 4 MiB regions, in order.
        let writes: Vec<(u64, u64)> =
            (0..regions).map(|r| ((2 + 3 * r) * REGION + 12 * KIB, BLOCK)).collect();
        let script: String =
            writes.iter().map(|&(o, l)| format!("h.pwrite(b'\\x33' * {l}, {o})\n")).collect();
        run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(script));
        server.kill();
        let al = state.join("al.bin");
        let len = std::fs::metadata(&al).expect("al.bin exists after writes").len();
        assert!(len > cut_to, "al.bin is only {len} bytes: truncating it to {cut_to} would change nothing");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&al)
            .expect("open al.bin")
            .set_len(cut_to)
            .expect("truncate");

        let server = serve.start();
        let st = control::status(server.socket());
        let dirty = dirty_blocks(&map_of(&server, "", "qemu:dirty-bitmap:live", size), size);
        let lost: Vec<u64> = block_set(&writes).into_iter().filter(|&b| !dirty[b as usize]).collect();
        match reason(&st, "resync_required") {
            Some(why) => eprintln!("al.bin cut to {cut_to} bytes after {regions} regions: resync required ({why})"),
            None if lost.is_empty() => {
                eprintln!("al.bin cut to {cut_to} bytes after {regions} regions: every acknowledged block recovered")
            }
            None => silent.push(format!(
                "al.bin truncated to {cut_to} bytes after kill -9 ({regions} regions made hot, writes at {writes:?}): \
                 no resync required, yet acknowledged blocks are missing from the recovered set: {}; \
                 live_dirty_bytes {}\n{}",
                block_runs(lost.iter().copied()),
                json_u64(&st, "live_dirty_bytes"),
                server.log().trim_end()
            )),
        }
        server.stop();
    }
    assert!(
        silent.is_empty(),
        "silently fewer blocks after a truncated activity log:\n{}",
        silent.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. control socket and command-line errors

/// A command that failed with one clear error line: non-zero exit (not a signal), nothing on
/// stdout, exactly one line on stderr that is an error (`error: …` from the argument parser or
/// `siterep: …`), no panic, and `needles` mentioned.
#[track_caller]
fn assert_one_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = show_output(out);
    assert!(out.status.code().is_some_and(|c| c != 0), "expected a non-zero exit: {context}");
    assert!(out.stdout.is_empty(), "an error must not print to stdout: {context}");
    assert!(!stderr.contains("panicked"), "a panic is not an error message: {context}");
    let errors: Vec<&str> =
        stderr.lines().filter(|l| l.starts_with("error:") || l.starts_with("siterep:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line expected: {context}");
    for needle in needles {
        assert!(
            stderr.to_lowercase().contains(&needle.to_lowercase()),
            "stderr should mention {needle:?}: {context}"
        );
    }
}

#[test]
fn control_socket_is_owner_only() {
    require_tool("setpriv");
    let dir = scratch_dir("ctl");
    // Only the control socket's own mode may keep others out: open the directory to everyone.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod scratch dir");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 16 * MIB);
    let server = Serve::new(&img).start();
    let ctl = server.control_socket();

    let meta = std::fs::symlink_metadata(&ctl).unwrap_or_else(|e| panic!("{}: {e}", ctl.display()));
    assert!(meta.file_type().is_socket(), "{} is not a socket", ctl.display());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "control socket mode (want srw-------)");

    // Root (the owner) may use it.
    let st = control::status(server.socket());
    assert_eq!(json_u64(&st, "size"), 16 * MIB);

    // Bad command lines: one clear error line, non-zero exit.
    let sock = server.socket().to_owned();
    assert_one_error(
        &run_unchecked(
            siterep().args(["release", "notanumber"]).arg("--socket").arg(&sock),
            Duration::from_secs(30),
        ),
        &["notanumber"],
    );
    assert_one_error(&run_unchecked(siterep().arg("status"), Duration::from_secs(30)), &["--socket"]);
    let bad_sock = dir.path().join("g.sock");
    assert_one_error(
        &run_unchecked(
            siterep().arg("serve").arg(&img).arg("--socket").arg(&bad_sock).args(["--granularity", "1000"]),
            Duration::from_secs(30),
        ),
        &["granularity", "1000"],
    );
    assert_one_error(
        &run_unchecked(siterep().args(["release", "99"]).arg("--socket").arg(&sock), Duration::from_secs(30)),
        &["99"],
    );
    assert_one_error(
        &run_unchecked(
            siterep().arg("status").arg("--socket").arg(dir.path().join("absent.sock")),
            Duration::from_secs(30),
        ),
        &["absent.sock.ctl"],
    );

    // Another user may not. The binary is copied where that user can run it.
    let bin = dir.path().join("siterep");
    std::fs::copy(siterep_bin(), &bin).expect("copy the siterep binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod binary");
    let as_nobody = |args: &[&str]| {
        let mut cmd = tool("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin).args(args);
        cmd.arg("--socket").arg(server.socket());
        run_unchecked(&mut cmd, Duration::from_secs(30))
    };
    let denied = as_nobody(&["status"]);
    assert_one_error(&denied, &["permission denied", &ctl.display().to_string()]);

    // Even if the socket's mode is widened by mistake, the shim checks the peer's uid.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).expect("chmod control socket");
    // The refusal races with the client's request (the shim answers and closes before reading
    // it), so try often enough that a lost refusal message shows.
    let mut lost = Vec::new();
    for cmd in ["cut", "status"].iter().cycle().take(100) {
        let refused = as_nobody(&[cmd]);
        assert!(refused.status.code().is_some_and(|c| c != 0), "{}", show_output(&refused));
        if !String::from_utf8_lossy(&refused.stderr).to_lowercase().contains("permission denied") {
            lost.push(String::from_utf8_lossy(&refused.stderr).trim().to_owned());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of 100 refused control connections did not tell the user `permission denied`; they said: {:?}",
        lost.len(),
        lost.iter().collect::<BTreeSet<_>>()
    );
    assert_one_error(&as_nobody(&["status"]), &["permission denied"]);
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o600)).expect("chmod control socket");
    let st = control::status(server.socket());
    assert!(generations(&st).is_empty(), "a refused user's cut must not happen: {st:?}");
    assert_eq!(json_u64(&st, "next_generation"), 1, "{st:?}");

    server.stop();
}

// ---------------------------------------------------------------------------------------------
// 8. memory

#[test]
fn cut_is_fast_and_memory_bounded() {
    require_tool("nbdsh");
    let dir = scratch_dir("mem");
    let img = dir.path().join("disk.img");
    let size = 1024 * GIB;
    image::create_sparse(&img, size);
    let server = Serve::new(&img).state_dir(&dir.path().join("state")).start();

    let mut rng = Rng::new(seed());
    let blocks: BTreeSet<u64> = std::iter::from_fn(|| Some(rng.below(size / BLOCK))).take(1000).collect();
    let script: String =
        blocks.iter().map(|b| format!("h.pwrite(b'\\x5a' * 4096, {})\n", b * BLOCK)).collect();
    run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(script));
    let leaves: BTreeSet<u64> = blocks.iter().map(|b| b / LEAF_BLOCKS).collect();
    // Issue 4: ≤ 1 MiB for an idle 1 TiB disk; each touched leaf holds 4 KiB of dirty bits and
    // at most 4 KiB of zero bits.
    let bound = MIB + leaves.len() as u64 * 8 * KIB;

    let check = |when: &str| {
        let st = control::status(server.socket());
        assert_eq!(
            json_u64(&st, "live_dirty_bytes")
                + generations(&st).values().map(|g| json_u64(g, "dirty_bytes")).sum::<u64>(),
            blocks.len() as u64 * BLOCK,
            "{st:?}"
        );
        let memory = json_u64(&st, "memory_bytes");
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("read /proc/PID/status");
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/PID/status:\n{status}"));
        eprintln!(
            "1 TiB, {} blocks in {} leaves, {when}: memory_bytes {memory} (bound {bound}), VmRSS {rss_kib} KiB",
            blocks.len(),
            leaves.len()
        );
        assert!(
            memory <= bound,
            "{when}: memory_bytes {memory} > {bound} (1 MiB + {} leaves × 8 KiB)",
            leaves.len()
        );
        assert!(rss_kib * KIB <= 64 * MIB, "{when}: shim VmRSS {rss_kib} KiB > 64 MiB");
    };
    check("after the writes");
    let n = json_u64(&control::cut(server.socket()), "generation");
    check("after a cut");
    control::release(server.socket(), n);
    server.stop();
}
