//! A real Linux kernel as the NBD client: Debian's 6.12 kernel booted under qemu (TCG, no KVM
//! needed) by the harness in `tests/vm/`, with the host's root shared read-only over 9p so the
//! guest runs the host's own tools.
//!
//! - `tests/vm/prepare` installs qemu/busybox and fetches the kernel (once; cached in
//!   `target/vm/`), `tests/vm/run-guest SCRIPT [QEMU_ARGS…]` boots it and runs SCRIPT in the
//!   guest, exiting with the script's status. [`Guest`] drives it from here.
//! - Scenario "VM disk image": the guest's virtio disk *is* `siterep serve`'s export; ext4, files
//!   and fio with verification on it, then the image must be clean and every block the guest
//!   wrote must be inside the tracker's dirty map.
//! - Scenarios "physical server" (`tests/vm/guest/physical-nbd`, `physical-ublk`): the shim runs
//!   inside the guest on a raw virtio disk (the host's image file) and gives it to the guest
//!   kernel as `/dev/nbd0` (`--attach`) or `/dev/ublkb0` (`--ublk`): fio with verification,
//!   write-zeroes and discard, ext4 and files, fsck, SIGTERM; and the same shim killed with
//!   SIGKILL under a writer of O_DIRECT|O_SYNC blocks, then restarted (NBD: the writer gets an
//!   I/O error but never hangs and the device is reclaimed; ublk: user recovery, the writer sees
//!   no error). On the host: the image is a clean filesystem, every acknowledged block is in it,
//!   and every non-zero block is inside the dirty map the shim reported last.
//! - Scenario "unplanned failover" (`tests/vm/guest/failover-writer`, `failover-check`): a
//!   guest writes fsynced files on its shim-served disk while an agent replicates; agent and
//!   shim are SIGKILLed under it; `siterep failover --point latest`; a second guest boots the
//!   failed-over disk: `e2fsck -f -n` clean, every file durable before the cut intact.
//!
//! A guest that cannot boot fails the test (with the console's tail); it never skips.
//! `VM_TIMEOUT` (seconds, default 600) bounds each guest run.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use siterep_tests::image::{self, MIB};
use siterep_tests::nbdinfo::{self, Extent};
use siterep_tests::recovery;
use siterep_tests::replication::{self, now_ms, points, AgentCmd, AgentProcess};
use siterep_tests::{
    describe, json_u64, poll, run, run_unchecked, scratch_dir, show_output, siterep_bin, tool, wait_timeout,
    Serve, Server,
};

const DIRTY: &str = "qemu:dirty-bitmap:live";
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------------------------
// The harness: tests/vm/prepare and tests/vm/run-guest

fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
}

/// Runs `tests/vm/prepare` once per test process: packages, kernel, initramfs. Returns the
/// kernel directory. The first run downloads ~110 MB; later runs reuse the cache in seconds.
fn prepare() -> &'static Path {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let prepared = KERNEL.get_or_init(|| {
        let mut cmd = Command::new(vm_dir().join("prepare"));
        let out = run_unchecked(&mut cmd, Duration::from_secs(30 * 60));
        if !out.status.success() {
            return Err(format!("tests/vm/prepare failed: the VM tests cannot run\n{}", show_output(&out)));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        if !dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio").is_file() {
            return Err(format!(
                "tests/vm/prepare printed {} but it has no vmlinuz + initramfs.cpio\n{}",
                dir.display(),
                show_output(&out)
            ));
        }
        Ok(dir)
    });
    match prepared {
        Ok(dir) => dir,
        Err(message) => panic!("{message}"),
    }
}

/// How long `run-guest` may take, as it is told (`VM_TIMEOUT`, default 600 s).
fn vm_timeout() -> Duration {
    let secs = std::env::var("VM_TIMEOUT").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    Duration::from_secs(secs)
}

/// A qemu option value: commas are doubled.
fn qemu_escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// One guest run: a host script run in the guest by `tests/vm/run-guest` (builder).
#[derive(Debug)]
struct Guest {
    script: PathBuf,
    results: PathBuf,
    qemu_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Guest {
    /// `script` runs in the guest (a host path; the guest sees the host's root read-only).
    /// `results` is shared read-write with the guest at `$VM_RESULTS` (= /run/results); the
    /// console log goes there too (`console.log`).
    fn new(script: &Path, results: &Path) -> Guest {
        Guest {
            script: script.to_owned(),
            results: results.to_owned(),
            qemu_args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A virtio disk in the guest (/dev/vda, /dev/vdb, … in order) that is the NBD export at
    /// `uri` (`nbd+unix:///NAME?socket=PATH`); `cache=none`, so the guest's flushes reach the
    /// server. Discards stay in qemu (its default `discard=ignore`): mkfs.ext4 would otherwise
    /// trim the whole disk, marking all of it dirty and making coverage checks vacuous.
    fn nbd_disk(mut self, uri: &str) -> Guest {
        self.qemu_args.push("-drive".into());
        self.qemu_args.push(format!("file={},format=raw,if=virtio,cache=none", qemu_escape(uri)));
        self
    }

    /// A virtio disk in the guest (/dev/vda, /dev/vdb, … in order) backed by the raw image file
    /// `image` on the host, `cache=none`. qemu's default `discard=ignore` keeps the file's
    /// allocation as it is.
    fn raw_disk(mut self, image: &Path) -> Guest {
        self.qemu_args.push("-drive".into());
        self.qemu_args.push(format!(
            "file={},format=raw,if=virtio,cache=none",
            qemu_escape(&image.display().to_string())
        ));
        self
    }

    /// Exports `GUEST_<name>=value` to the guest script.
    fn env(mut self, name: &str, value: impl ToString) -> Guest {
        self.env.push((format!("GUEST_{name}"), value.to_string()));
        self
    }

    /// Boots the guest; the script runs while the caller does other things (e.g. kills the
    /// server under it). [`RunningGuest::wait`] collects the outcome.
    fn spawn(self) -> RunningGuest {
        let kernel = prepare();
        std::fs::create_dir_all(&self.results).expect("create the results directory");
        let stderr_path = self.results.join("run-guest.stderr");
        let stderr = File::create(&stderr_path).expect("create run-guest's stderr file");
        let mut cmd = Command::new(vm_dir().join("run-guest"));
        cmd.arg(&self.script)
            .args(&self.qemu_args)
            .env("VM_RESULTS", &self.results)
            .env("VM_KERNEL_DIR", kernel)
            .env("VM_TIMEOUT", vm_timeout().as_secs().to_string())
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("dup"))
            .stderr(stderr);
        for (name, value) in &self.env {
            cmd.env(name, value);
        }
        let command_line = describe(&cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        RunningGuest {
            child,
            command_line,
            script: self.script,
            results: self.results,
            stderr: stderr_path,
            started: Instant::now(),
        }
    }

    /// Boots the guest and waits for its script; fails the test unless the script exits 0.
    #[track_caller]
    fn run(self) -> GuestRun {
        let outcome = self.spawn().wait();
        outcome.assert_success();
        outcome
    }
}

#[derive(Debug)]
struct RunningGuest {
    child: Child,
    command_line: String,
    script: PathBuf,
    results: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl RunningGuest {
    /// Whether `run-guest` has exited already (the guest finished, or failed to run).
    fn has_exited(&mut self) -> bool {
        self.child.try_wait().expect("try_wait run-guest").is_some()
    }

    /// Waits for `run-guest` (which enforces `VM_TIMEOUT` itself and kills qemu); fails the test
    /// if the guest never ran the script: did not boot, init failed, qemu died or hung.
    #[track_caller]
    fn wait(mut self) -> GuestRun {
        // run-guest's own timeout comes first; this one only catches a broken harness.
        let limit = vm_timeout() + Duration::from_secs(60);
        let status = wait_timeout(&mut self.child, limit);
        if status.is_none() {
            // SIGTERM lets run-guest kill its qemu; SIGKILL would orphan it.
            let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
            if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // The results directory is usually a scratch dir removed with the test: keep the whole
        // console log in target/vm/logs/ (the failure message only shows its tail).
        let console_path = self.results.join("console.log");
        let kept = prepare().parent().map(|vm| vm.join("logs")).and_then(|logs| {
            std::fs::create_dir_all(&logs).ok()?;
            let name = self.script.file_name()?.to_string_lossy().into_owned();
            let dest = logs.join(format!("{name}.console.log"));
            std::fs::copy(&console_path, &dest).ok().map(|_| dest)
        });
        let run = GuestRun {
            command_line: self.command_line,
            status: status.and_then(|s| s.code()),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
            console: std::fs::read_to_string(&console_path).unwrap_or_default(),
            console_kept: kept,
            timing: read_timing(&self.results.join(".vm/timing")),
            elapsed: self.started.elapsed(),
        };
        let Some(code) = run.status else {
            panic!("tests/vm/run-guest did not finish within {limit:?} (killed)\n{}", run.context());
        };
        // The marker is the proof that the guest booted and ran the script; without it, the
        // status is run-guest's own (124 timeout, 125 no boot / init failure / qemu died).
        if run.result_marker().is_none() {
            panic!(
                "the VM did not run the guest script (run-guest exited {code}): it did not boot, \
                 its init failed, qemu died or it timed out\n{}",
                run.context()
            );
        }
        run
    }
}

/// What a guest run left behind.
#[derive(Debug)]
struct GuestRun {
    command_line: String,
    /// run-guest's exit status: the guest script's.
    status: Option<i32>,
    /// run-guest's messages (boot time, failures with the console's tail).
    stderr: String,
    console: String,
    /// A copy of the whole console log that outlives the scratch directory.
    console_kept: Option<PathBuf>,
    /// `boot_s`, `script_s`, `total_s` as run-guest measured them.
    timing: BTreeMap<String, f64>,
    elapsed: Duration,
}

impl GuestRun {
    /// The status in the guest's last `VM-RESULT: N` line.
    fn result_marker(&self) -> Option<i32> {
        self.console
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("VM-RESULT: "))
            .and_then(|s| s.trim().parse().ok())
    }

    #[track_caller]
    fn assert_success(&self) {
        if self.status != Some(0) {
            panic!("the guest script failed (exit {:?})\n{}", self.status, self.context());
        }
    }

    fn timing(&self, key: &str) -> f64 {
        self.timing.get(key).copied().unwrap_or(f64::NAN)
    }

    /// The command, run-guest's messages and the console's last 60 lines.
    fn context(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        let kept = self.console_kept.as_ref().map_or("not kept".to_owned(), |p| p.display().to_string());
        format!(
            "command: {}\n--- run-guest ---\n{}\n--- console (last 60 lines; all of it: {kept}) ---\n{}",
            self.command_line,
            self.stderr.trim_end(),
            tail
        )
    }
}

fn read_timing(path: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Checks on the image after the guest is gone

/// The 4 KiB blocks of `path` that are not all zeros (holes are skipped via SEEK_DATA).
fn nonzero_blocks(path: &Path) -> Vec<u64> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut blocks = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    for run in image::seek_layout(path).into_iter().filter(|r| r.data) {
        let start = run.offset / BLOCK * BLOCK;
        let end = run.offset + run.length;
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(MIB) as usize;
            let buf = &mut buf[..len];
            file.read_exact_at(buf, pos).unwrap_or_else(|e| panic!("read {} at {pos}: {e}", path.display()));
            for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    blocks.push(pos / BLOCK + i as u64);
                }
            }
            pos += len as u64;
        }
    }
    blocks.dedup();
    blocks
}

/// The blocks in `blocks` (sorted block numbers) not inside a dirty extent (`kind & 1`).
fn not_covered(blocks: &[u64], map: &[Extent]) -> Vec<u64> {
    let dirty: Vec<&Extent> = map.iter().filter(|e| e.kind & 1 == 1).collect();
    blocks
        .iter()
        .copied()
        .filter(|&b| {
            let (start, end) = (b * BLOCK, (b + 1) * BLOCK);
            // Extents are sorted and merged: the candidate is the last one starting at or
            // before `start`.
            let i = dirty.partition_point(|e| e.offset <= start);
            i == 0 || dirty[i - 1].end() < end
        })
        .collect()
}

/// Block numbers as ranges, for messages: `[(first, last)]`.
fn ranges(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == b => *last = b,
            _ => out.push((b, b)),
        }
    }
    out
}

/// Extracts the files listed in the guest's `sums` (sha256sum format, paths relative to the
/// filesystem root) from the ext4 image with debugfs, and checks their checksums on the host.
fn verify_files_on_host(image: &Path, sums: &Path, dir: &Path) -> usize {
    let text = std::fs::read_to_string(sums).unwrap_or_else(|e| panic!("read {}: {e}", sums.display()));
    let mut count = 0;
    for line in text.lines() {
        let (_, name) = line.split_once("  ").unwrap_or_else(|| panic!("bad sha256sum line {line:?}"));
        let dest = dir.join(name);
        std::fs::create_dir_all(dest.parent().unwrap()).expect("create extract dir");
        let request = format!("dump /{name} {}", dest.display());
        run(tool("debugfs").arg("-R").arg(&request).arg(image));
        assert!(dest.is_file(), "debugfs -R '{request}' {} produced nothing", image.display());
        count += 1;
    }
    let out = run_unchecked(tool("sha256sum").arg("-c").arg(sums).current_dir(dir), Duration::from_secs(120));
    assert!(
        out.status.success(),
        "files the guest wrote read back differently from the image on the host\n{}",
        show_output(&out)
    );
    count
}

/// A dirty map the guest saved with `nbdinfo --map=qemu:dirty-bitmap:live --json` (checked to
/// tile `0..size`), merged.
fn saved_dirty_map(path: &Path, size: u64) -> Vec<Extent> {
    let text = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let extents = nbdinfo::parse_extents(&path.display().to_string(), &text);
    let mut pos = 0;
    for e in &extents {
        assert_eq!(e.offset, pos, "{}: extents do not tile the export: {extents:?}", path.display());
        pos = e.end();
    }
    assert_eq!(pos, size, "{}: extents do not cover the export: {extents:?}", path.display());
    nbdinfo::merge(&extents)
}

/// Invariant 1 on the host: every non-zero 4 KiB block of `image` (which started as a hole and
/// was written only through the shim) lies inside a dirty extent of `map`, and the map is not
/// the whole disk (which would make the check vacuous). Returns (non-zero bytes, dirty bytes).
#[track_caller]
fn assert_dirty_map_covers(image: &Path, map: &[Extent], size: u64, context: &str) -> (u64, u64) {
    let written = nonzero_blocks(image);
    let missed = not_covered(&written, map);
    if !missed.is_empty() {
        let missed_ranges = ranges(&missed);
        panic!(
            "{} of {} non-zero 4 KiB blocks are outside the dirty map (block ranges, first 20: {:?})\n\
             dirty map: {map:?}\n{context}",
            missed.len(),
            written.len(),
            &missed_ranges[..missed_ranges.len().min(20)],
        );
    }
    let dirty_bytes: u64 = map.iter().filter(|e| e.kind & 1 == 1).map(|e| e.length).sum();
    assert!(
        dirty_bytes < size,
        "the whole disk is dirty: legal over-reporting, but then the coverage check proves nothing\n{context}"
    );
    (written.len() as u64 * BLOCK, dirty_bytes)
}

/// Indices of the blocks `siterep-kill FRONTEND NNNNNNNN\n` (the kill scenario's writer) that are
/// in `image`, at any 4 KiB-aligned offset.
fn kill_blocks_in_image(image: &Path, frontend: &str) -> std::collections::BTreeSet<u64> {
    let prefix = format!("siterep-kill {frontend} ");
    let file = File::open(image).unwrap_or_else(|e| panic!("open {}: {e}", image.display()));
    let mut found = std::collections::BTreeSet::new();
    let mut buf = vec![0u8; MIB as usize];
    for run in image::seek_layout(image).into_iter().filter(|r| r.data) {
        let mut pos = run.offset / BLOCK * BLOCK;
        let end = run.offset + run.length;
        while pos < end {
            let len = (end - pos).min(MIB) as usize;
            let buf = &mut buf[..len];
            file.read_exact_at(buf, pos).unwrap_or_else(|e| panic!("read {} at {pos}: {e}", image.display()));
            for block in buf.chunks(BLOCK as usize) {
                if let Some(rest) = block.strip_prefix(prefix.as_bytes()) {
                    let digits = rest.get(..8).and_then(|d| std::str::from_utf8(d).ok());
                    if let Some(index) = digits.and_then(|d| d.parse().ok()) {
                        found.insert(index);
                    }
                }
            }
            pos += len as u64;
        }
    }
    found
}

/// One "physical server" guest run: `tests/vm/guest/physical-FRONTEND` with GUEST_SCENARIO
/// `scenario` on a fresh sparse image of `size` bytes attached as the guest's /dev/vda.
fn physical_guest(dir: &Path, frontend: &str, scenario: &str, size: u64) -> (PathBuf, PathBuf, GuestRun) {
    prepare();
    let image = dir.join("disk.img");
    image::create_sparse(&image, size);
    let results = dir.join("results");
    // The guest sees the host's root, except the directories it replaces with its own.
    let bin = siterep_bin();
    assert!(
        !["/tmp", "/var/tmp", "/run", "/dev", "/proc", "/sys"].iter().any(|d| bin.starts_with(d)),
        "the guest cannot see {} (SITEREP_BIN under a directory the guest replaces)",
        bin.display()
    );
    let guest = Guest::new(&vm_dir().join(format!("guest/physical-{frontend}")), &results)
        .raw_disk(&image)
        .env("SITEREP", bin.display())
        .env("SCENARIO", scenario)
        .env("DISK", "/dev/vda")
        .run();
    (image, results, guest)
}

/// The guest's own record of a run, for failure messages.
fn guest_records(results: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(results.join(name)).unwrap_or_default();
    format!(
        "--- guest steps ---\n{}\n--- serve.log (guest) ---\n{}",
        read("steps").trim_end(),
        read("serve.log").trim_end()
    )
}

/// Workload through a kernel front-end of the shim inside the guest, then the host checks.
fn physical_workload(frontend: &str) {
    const SIZE: u64 = 512 * MIB;
    const DATA_MIB: u64 = 64;
    let started = Instant::now();
    let dir = scratch_dir(&format!("vm-{frontend}"));
    let (image, results, guest) = physical_guest(dir.path(), frontend, "workload", SIZE);

    run(tool("e2fsck").args(["-f", "-n"]).arg(&image));
    let files = verify_files_on_host(&image, &results.join("sums"), &dir.path().join("extracted"));
    assert_eq!(files as u64, DATA_MIB / 8, "the guest should have written {DATA_MIB} MiB in 8 MiB files");
    let map = saved_dirty_map(&results.join("dirty.json"), SIZE);
    let (written, dirty) = assert_dirty_map_covers(&image, &map, SIZE, &guest_records(&results));
    let (written, dirty) = (written / MIB, dirty / MIB);
    // mkfs and the files may overwrite what fio wrote first: only the files' size is a bound.
    assert!(
        written >= DATA_MIB,
        "only {written} MiB non-zero in the image: the {DATA_MIB} MiB of files did not land"
    );
    eprintln!(
        "vm physical {frontend}: guest boot {:.1} s, script {:.1} s; {written} MiB non-zero, {dirty} MiB dirty; \
         whole test {:.1} s",
        guest.timing("boot_s"),
        guest.timing("script_s"),
        started.elapsed().as_secs_f64()
    );
}

/// The shim killed with SIGKILL under a writer inside the guest, restarted; then the host
/// checks that every acknowledged block is in the image.
fn physical_kill(frontend: &str) {
    const SIZE: u64 = 256 * MIB;
    let started = Instant::now();
    let dir = scratch_dir(&format!("vm-{frontend}-kill"));
    let (image, results, guest) = physical_guest(dir.path(), frontend, "kill", SIZE);
    let records = guest_records(&results);

    run(tool("e2fsck").args(["-f", "-n"]).arg(&image));
    let acked: Vec<u64> = std::fs::read_to_string(results.join("acked"))
        .expect("the guest's acked list")
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("bad line {l:?} in acked")))
        .collect();
    assert!(acked.len() >= 20, "only {} blocks acknowledged\n{records}", acked.len());
    let found = kill_blocks_in_image(&image, frontend);
    let missing: Vec<u64> = acked.iter().copied().filter(|i| !found.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged blocks are not in the image: {:?}\n{records}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
    // The tracker kept its state in --state-dir across the crash: its final map still covers
    // everything both shims wrote.
    let map = saved_dirty_map(&results.join("dirty.json"), SIZE);
    let (written, dirty) = assert_dirty_map_covers(&image, &map, SIZE, &records);
    let (written, dirty) = (written >> 10, dirty >> 10);
    let kill = std::fs::read_to_string(results.join("kill.txt")).unwrap_or_default();
    eprintln!(
        "vm physical {frontend} kill: {} blocks acknowledged, all in the image ({}); {written} KiB non-zero, \
         {dirty} KiB dirty; guest boot {:.1} s, script {:.1} s; whole test {:.1} s",
        acked.len(),
        kill.trim().replace('\n', "; "),
        guest.timing("boot_s"),
        guest.timing("script_s"),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Unplanned failover: the host's view of the guest's durable files

/// One file the failover writer guest recorded as durable (written, fsynced, directory
/// fsynced): its `sha256sum` line and when the host first saw that line.
#[derive(Debug, Clone)]
struct Completed {
    /// `HASH  data/fNNNNN`, as `sha256sum -c` reads it.
    line: String,
    /// Host clock (the shim's: [`now_ms`]), taken right after the read that showed the line.
    seen_ms: u64,
}

/// Polls the guest's `complete` file (the results share is uncached: the guest's appends are
/// on the host when its write returns) and timestamps each new line on the host.
struct CompletionWatch {
    seen: Arc<Mutex<Vec<Completed>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CompletionWatch {
    fn start(path: &Path) -> CompletionWatch {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (path, seen, stop) = (path.to_owned(), seen.clone(), stop.clone());
            std::thread::spawn(move || loop {
                // Once told to stop, one last read picks up what came in meanwhile.
                let last = stop.load(Ordering::SeqCst);
                Self::poll(&path, &seen);
                if last {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            })
        };
        CompletionWatch { seen, stop, thread: Some(thread) }
    }

    fn poll(path: &Path, seen: &Mutex<Vec<Completed>>) {
        let Ok(text) = std::fs::read_to_string(path) else { return };
        let seen_ms = now_ms();
        // Only whole lines: the guest may be in the middle of appending one.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        let mut seen = seen.lock().expect("completion list");
        for line in whole.lines().skip(seen.len()) {
            seen.push(Completed { line: line.to_owned(), seen_ms });
        }
    }

    fn snapshot(&self) -> Vec<Completed> {
        self.seen.lock().expect("completion list").clone()
    }

    /// Stops polling (after one last read) and returns every line seen.
    fn finish(mut self) -> Vec<Completed> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the completion watcher");
        }
        self.snapshot()
    }
}

impl Drop for CompletionWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// If the test fails while a spawned guest still runs, SIGTERM its `run-guest` (which kills its
/// qemu) instead of leaving it to run until `VM_TIMEOUT`. Disarm it before waiting for the guest
/// (which reaps `run-guest`: its pid must not be signalled after that).
struct AbortGuestOnPanic(Option<u32>);

impl AbortGuestOnPanic {
    fn new(guest: &RunningGuest) -> AbortGuestOnPanic {
        AbortGuestOnPanic(Some(guest.child.id()))
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AbortGuestOnPanic {
    fn drop(&mut self) {
        if let Some(pid) = self.0.filter(|_| std::thread::panicking()) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
}

/// `(point, cut_unix_ms)` of the last point the shim's agent reported, if any.
fn last_point(shim: &Server) -> Option<(u64, u64)> {
    match &replication::shim_status(shim.socket())["last_replicated"] {
        Value::Null => None,
        p => Some((json_u64(p, "point"), json_u64(p, "cut_unix_ms"))),
    }
}

/// Waits until the shim's agent has reported a point; fails the test after `timeout`.
fn wait_for_first_point(shim: &Server, agent: &mut AgentProcess, timeout: Duration) {
    let reported = poll(timeout, || {
        agent.assert_running();
        last_point(shim).is_some()
    });
    assert!(reported.is_some(), "no recovery point after {timeout:?}:\n{}", agent.log());
}

/// A file the guest left in its results directory, trimmed ("" if missing).
fn result_file(results: &Path, name: &str) -> String {
    std::fs::read_to_string(results.join(name)).unwrap_or_default().trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// A VM's disk served by the shim: the guest kernel's virtio-blk, through qemu's NBD client,
/// writes an ext4 filesystem, files and fio's verified I/O; afterwards the image is a clean
/// filesystem holding the same files, and the tracker over-reports: every block that is not
/// zero (the image started as a hole) lies inside its dirty map.
#[test]
fn vm_disk_image_served_by_the_shim() {
    const SIZE: u64 = 512 * MIB;
    const DATA_MIB: u64 = 64;
    const FIO_MIB: u64 = 64;
    let started = Instant::now();
    prepare();
    let prepared_in = started.elapsed();

    let dir = scratch_dir("vm");
    let image = dir.path().join("disk.img");
    image::create_sparse(&image, SIZE);
    let server = Serve::new(&image).start();

    let results = dir.path().join("results");
    let guest = Guest::new(&vm_dir().join("guest/disk-image"), &results)
        .nbd_disk(&server.uri())
        .env("DISK", "/dev/vda")
        .env("DISK_SIZE", SIZE)
        .env("DATA_MIB", DATA_MIB)
        .env("FIO_MIB", FIO_MIB)
        .run();

    // The filesystem as the server stored it, read without any NBD in between.
    run(tool("e2fsck").args(["-f", "-n"]).arg(&image));
    let files = verify_files_on_host(&image, &results.join("sums"), &dir.path().join("extracted"));
    assert_eq!(files as u64, DATA_MIB / 8, "the guest should have written {DATA_MIB} MiB in 8 MiB files");

    // Invariant 1, over-report never under-report: everything the guest wrote is dirty.
    let map = nbdinfo::merge(&nbdinfo::map(&server.uri(), Some(DIRTY), SIZE));
    let context = format!("--- server log ---\n{}", server.log());
    let (written, dirty) = assert_dirty_map_covers(&image, &map, SIZE, &context);
    let (written_mib, dirty_mib) = (written / MIB, dirty / MIB);
    assert!(
        written_mib >= DATA_MIB + FIO_MIB,
        "only {written_mib} MiB non-zero in the image: the guest's {} MiB of data did not land in it",
        DATA_MIB + FIO_MIB
    );

    let stop_took = server.stop();
    eprintln!(
        "vm_disk_image_served_by_the_shim: prepare {:.1} s; guest boot {:.1} s, script {:.1} s, \
         run-guest total {:.1} s ({:.1} s wall); {} MiB non-zero in the image, {} MiB dirty; \
         server stopped in {:?}; whole test {:.1} s",
        prepared_in.as_secs_f64(),
        guest.timing("boot_s"),
        guest.timing("script_s"),
        guest.timing("total_s"),
        guest.elapsed.as_secs_f64(),
        written_mib,
        dirty_mib,
        stop_took,
        started.elapsed().as_secs_f64()
    );
}

/// A physical server: the shim attaches the guest kernel's NBD driver to itself
/// (`--attach /dev/nbd0 --connections 2`, netlink) on a raw disk. fio with verification on
/// `/dev/nbd0`, write-zeroes and discard, ext4 with files read back cold, fsck; SIGTERM exits 0
/// and disconnects the device. On the host the image is clean, holds the files, and the dirty
/// map covers every block written.
#[test]
fn vm_physical_server_over_nbd() {
    physical_workload("nbd");
}

/// SIGKILL of an attached shim during O_DIRECT|O_SYNC writes on its filesystem: the writer gets
/// an I/O error within the request timeout and never hangs, `sync` returns, a restarted shim
/// reclaims the still-configured `/dev/nbd0` while the filesystem is mounted, and every
/// acknowledged block is in the image.
#[test]
fn vm_physical_nbd_shim_killed_then_reclaimed() {
    physical_kill("nbd");
}

/// The same workload through `siterep serve --ublk` (`/dev/ublkb0`, two queues).
#[test]
fn vm_physical_server_over_ublk() {
    physical_workload("ublk");
}

/// SIGKILL of the ublk shim during O_DIRECT|O_SYNC writes: with user recovery the kernel holds
/// the I/O, the restarted shim takes the device back, the writer never sees an error, and every
/// acknowledged block is in the image.
#[test]
fn vm_physical_ublk_shim_killed_then_recovered() {
    physical_kill("ublk");
}

/// Unplanned failover of a VM (issue 6): a guest whose disk is served by the shim writes a
/// stream of fsynced files on ext4 while an agent replicates continuously (`--interval 1s`);
/// the protected site dies (agent and shim SIGKILLed under the writer, the filesystem never
/// unmounted); `siterep failover --point latest` materializes the last committed point and
/// serves it; a second guest mounts that disk (journal recovery), `e2fsck -f -n` is clean, and
/// every file durable before the point's cut reads back with its checksum.
///
/// "Before the cut" is decided on the host clock only, which is the clock the shim stamps cuts
/// with (`cut_unix_ms` is read under the tracker's write lock at the moment the live dirty map
/// is frozen: a write acknowledged before that instant is in the generation). The guest
/// appends a file's `sha256sum` line to the results share only after the file's and the
/// directory's fsync returned, i.e. after the shim acknowledged the data and the flush
/// (`cache=none`); the host polls that share and stamps each line when it first sees it. So
/// `seen_ms < cut_unix_ms` implies the file was durable before the cut, whatever the guest's
/// clock says; polling delay only makes the set smaller (conservative), never wrong. Files
/// recorded later may be missing or partial on the failed-over disk, but must not make fsck fail.
#[test]
fn vm_unplanned_failover_to_latest() {
    const SIZE: u64 = 512 * MIB;
    const DISK: &str = "vm1";
    /// How long the guest writes (from its first durable file) before the disaster, at least.
    const WRITE_FOR: Duration = Duration::from_secs(25);
    /// Files durable before the latest cut needed to prove anything.
    const MIN_BEFORE_CUT: usize = 20;
    let started = Instant::now();
    prepare();
    let dir = scratch_dir("vm-failover");
    let d = dir.path();

    // The protected site: ext4 made on the host (nodiscard: no whole-disk trim), the shim with
    // persistent tracking, and an agent replicating every second to the recovery site.
    let (shim, certs, server) = recovery::ext4_protected_site(d, SIZE);
    let store = server.store().to_owned();
    let mut agent = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs)
        .args(["--retry-scale", "0.001", "--interval", "1s"])
        .spawn(&d.join("agent.log"));
    wait_for_first_point(&shim, &mut agent, Duration::from_secs(60));

    // Guest 1 writes files on that disk while it replicates.
    let writer_results = d.join("writer");
    let mut writer = Guest::new(&vm_dir().join("guest/failover-writer"), &writer_results)
        .nbd_disk(&shim.uri())
        .env("DISK", "/dev/vda")
        .env("DISK_SIZE", SIZE)
        .spawn();
    let mut abort_writer = AbortGuestOnPanic::new(&writer);
    let watch = CompletionWatch::start(&writer_results.join("complete"));
    let (mut durable, mut before_cut) = (0, 0);
    // Some(true): enough written; Some(false): the writer guest ended first.
    let outcome = poll(vm_timeout(), || {
        agent.assert_running();
        if writer.has_exited() {
            return Some(false);
        }
        let seen = watch.snapshot();
        let cut = last_point(&shim).map_or(0, |p| p.1);
        before_cut = seen.iter().filter(|c| c.seen_ms < cut).count();
        durable = seen.len();
        let writing_for = seen.first().map_or(0, |c| now_ms().saturating_sub(c.seen_ms));
        (writing_for >= WRITE_FOR.as_millis() as u64 && before_cut >= MIN_BEFORE_CUT).then_some(true)
    });
    if outcome == Some(false) {
        abort_writer.disarm();
        let run = writer.wait();
        panic!("the writer guest ended before the disaster (exit {:?})\n{}", run.status, run.context());
    }
    assert!(
        outcome.is_some(),
        "after {:?}: {durable} files durable, {before_cut} of them before the latest cut (need \
         {MIN_BEFORE_CUT})\n--- guest steps ---\n{}\n--- agent ---\n{}",
        vm_timeout(),
        result_file(&writer_results, "steps"),
        agent.log()
    );

    // The loop above usually ends just after the agent reported a commit (that is when the
    // count before the cut grows): let the disaster fall at a moment unrelated to the agent's
    // cycle (mid-cut, mid-transfer or idle), up to 1.5 s later.
    let delay_ms = now_ms() % 1500;
    std::thread::sleep(Duration::from_millis(delay_ms));

    // The disaster: the protected site dies, agent and shim at once, the guest still writing.
    let writing_for = watch.snapshot().first().map_or(0, |c| now_ms().saturating_sub(c.seen_ms));
    agent.kill();
    shim.kill();
    let killed = Instant::now();
    let killed_ms = now_ms();
    // The writer runs into the dead disk: its next fsync fails (qemu's NBD client fails the
    // requests once the server is gone). Only then may it stop, without unmounting.
    let failed = poll(Duration::from_secs(120), || {
        result_file(&writer_results, "errors").lines().any(|l| l.ends_with(" failed")) || writer.has_exited()
    });
    assert!(
        failed.is_some() && result_file(&writer_results, "errors").lines().any(|l| l.ends_with(" failed")),
        "the writer guest saw no I/O error within {:?} after the shim was killed (exited: {})\n\
         --- guest steps ---\n{}",
        killed.elapsed(),
        writer.has_exited(),
        result_file(&writer_results, "steps")
    );
    let first_error_after = killed.elapsed();
    std::fs::write(writer_results.join("stop"), b"").expect("tell the writer guest to stop");
    abort_writer.disarm();
    let writer = writer.wait();
    writer.assert_success();
    let completed = watch.finish();
    let writer_summary = result_file(&writer_results, "writer.txt");

    // Failover to the latest committed point.
    let all = points(&store, DISK);
    let latest = all.last().expect("points").clone();
    let (point, cut) = (json_u64(&latest, "id"), json_u64(&latest, "cut_unix_ms"));
    assert!(cut <= killed_ms, "the latest point {point} was cut at {cut}, after the kill at {killed_ms}");
    let failover_started = Instant::now();
    let (failed_over, new_primary) = recovery::failover_to_latest(&store, DISK, d, point);
    let failover_took = failover_started.elapsed();

    // What must be intact: every file the host saw durable before the latest point was last
    // known to equal the disk: its cut, or later when nothing was written since (the server's
    // "current as of", docs/wire.md §6.9, which the shim also reports as its last replicated
    // cut and the loop above counted by).
    let current = match latest.get("current_unix_ms") {
        Some(Value::Number(_)) => json_u64(&latest, "current_unix_ms").max(cut),
        Some(_) => cut,
        None => panic!("no current_unix_ms in the point {latest}"),
    };
    assert!(current <= killed_ms, "point {point} was current at {current}, after the kill at {killed_ms}");
    let before_cut: Vec<&Completed> = completed.iter().filter(|c| c.seen_ms < current).collect();
    assert!(
        before_cut.len() >= MIN_BEFORE_CUT,
        "only {} files durable before the cut of point {point}: too few to prove anything",
        before_cut.len()
    );
    let after_kill = completed.iter().filter(|c| c.seen_ms > killed_ms).count();
    let check_results = d.join("check");
    std::fs::create_dir_all(&check_results).expect("create the checker's results directory");
    let expected: String = before_cut.iter().map(|c| format!("{}\n", c.line)).collect();
    std::fs::write(check_results.join("expected"), expected).expect("write the expected checksums");

    // Guest 2 boots with the failed-over disk.
    let checker = Guest::new(&vm_dir().join("guest/failover-check"), &check_results)
        .nbd_disk(&new_primary.uri())
        .env("DISK", "/dev/vda")
        .env("DISK_SIZE", SIZE)
        .run();
    let fsck_status = result_file(&check_results, "fsck.status");
    assert_eq!(
        fsck_status,
        "0",
        "e2fsck -f -n of the failed-over disk (after journal recovery) is not clean\n{}\n{}",
        result_file(&check_results, "fsck.log"),
        checker.context()
    );
    let check_log = std::fs::read_to_string(check_results.join("check.log")).unwrap_or_default();
    let bad: Vec<&str> = check_log.lines().filter(|l| !l.ends_with(": OK")).collect();
    let intact = check_log.lines().filter(|l| l.ends_with(": OK")).count();
    assert!(
        result_file(&check_results, "check.status") == "0" && bad.is_empty() && intact == before_cut.len(),
        "{} of {} files durable before the cut of point {point} are not intact on the failed-over disk \
         ({intact} OK):\n{}\n{}",
        before_cut.len() - intact,
        before_cut.len(),
        bad[..bad.len().min(40)].join("\n"),
        checker.context()
    );
    let present = result_file(&check_results, "present").lines().count();
    let fsck_before = result_file(&check_results, "fsck-before.status");

    // The new primary's image, read on the host without NBD, agrees.
    new_primary.stop();
    let (code, out) = replication::e2fsck(&["-f", "-n"], &failed_over);
    assert_eq!(code, 0, "e2fsck -f -n of the failed-over image on the host:\n{out}");
    drop(server);

    eprintln!(
        "vm_unplanned_failover_to_latest: {} files durable in {:.1} s of writing ({writer_summary}), \
         {} seen after the kill; agent + shim SIGKILLed at a random {delay_ms} ms after the goal, the writer's \
         first I/O error {} ms later; {} points, latest {point} cut {} ms before \
         the kill; {} files durable before the cut all intact, {present} files present after \
         recovery; e2fsck -f -n exit {fsck_before} before journal recovery, 0 after, 0 on the \
         host; failover (materialize + serve) {} ms; writer guest boot {:.1} s, \
         script {:.1} s; checker guest boot {:.1} s, script {:.1} s; whole test {:.1} s",
        completed.len(),
        writing_for as f64 / 1000.0,
        after_kill,
        first_error_after.as_millis(),
        all.len(),
        killed_ms - cut,
        before_cut.len(),
        failover_took.as_millis(),
        writer.timing("boot_s"),
        writer.timing("script_s"),
        checker.timing("boot_s"),
        checker.timing("script_s"),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn coverage_helpers() {
    let map = [Extent::new(0, 8192, 1), Extent::new(8192, 8192, 0), Extent::new(16384, 4096, 1)];
    assert_eq!(not_covered(&[0, 1, 2, 3, 4], &map), vec![2, 3]);
    assert_eq!(ranges(&[2, 3, 7, 9, 10]), vec![(2, 3), (7, 7), (9, 10)]);
}
