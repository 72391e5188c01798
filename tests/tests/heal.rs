//! Bit rot in the store is found and healed end to end: a flipped byte in a chunk, or in a map
//! page, of the latest point. `siterep verify` names the damage (exit 1); the next agent cycle
//! is told by the server to resync, sends the affected data again, and the new point restores
//! equal to the source while `siterep verify` finds it clean. Replication is never stuck on the
//! damage.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use siterep_tests::image::{Rng, MIB};
use siterep_tests::replication::{assert_same_files, points, restore, AgentCmd, Certs, RecoveryServer};
use siterep_tests::{
    json_str, json_u64, require_tool, run, run_unchecked, scratch_dir, show_output, siterep, tool, Serve,
};

const SIZE: u64 = 16 * MIB;
const DISK: &str = "data";

/// Every file under `dir` (one level of shards), with its modification time and size.
fn objects(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime, u64)> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir).expect("read objects") {
        let shard = shard.expect("entry").path();
        if !shard.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&shard).expect("read shard") {
            let p = f.expect("entry").path();
            let m = std::fs::metadata(&p).expect("stat");
            out.push((p, m.modified().expect("mtime"), m.len()));
        }
    }
    out
}

fn flip_byte(path: &Path, at: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).expect("open for damage");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, at).expect("write");
    f.sync_all().expect("sync");
}

/// `siterep verify` with `args`: its exit code and stdout.
fn verify(store: &Path, args: &[&str]) -> (i32, String) {
    let mut cmd = siterep();
    cmd.arg("verify").arg("--store").arg(store).args(args);
    let out = run_unchecked(&mut cmd, Duration::from_secs(120));
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), show_output(&out)),
    )
}

fn latest_point(store: &Path) -> u64 {
    json_u64(points(store, DISK).last().expect("a point"), "id")
}

/// Fields drop in order: the processes stop before their directory is removed.
struct Site {
    shim: siterep_tests::Server,
    _server: RecoveryServer,
    agent: AgentCmd,
    d: PathBuf,
    img: PathBuf,
    store: PathBuf,
    _dir: tempfile::TempDir,
}

/// A 16 MiB disk (one map region) replicated: its initial copy, then an incremental.
fn site(name: &str, seed: u64) -> Site {
    require_tool("qemu-io");
    let dir = scratch_dir(name);
    let d = dir.path().to_owned();
    let certs = Certs::make(&d.join("certs"));
    let img = d.join("disk.img");
    std::fs::write(&img, Rng::new(seed).bytes(SIZE as usize)).expect("write the image");
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let agent = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs);
    assert_eq!(agent.once()["kind"], "initial");
    run(tool("qemu-io").args(["-f", "raw", &shim.uri(), "-c", "write -P 7 4M 64k"]));
    assert_eq!(agent.once()["kind"], "incremental");
    Site { shim, _server: server, agent, d, img, store, _dir: dir }
}

impl Site {
    /// The next cycle heals: the server requires a resync, the agent sends the damaged data
    /// again, and the new point restores equal to the source and verifies clean.
    fn heals(&self) {
        let summary = self.agent.once();
        assert_eq!(json_str(&summary, "kind"), "resync", "the server asks for a resync: {summary:?}");
        let healed = latest_point(&self.store);
        let restored = self.d.join("restored.img");
        restore(&self.store, DISK, "latest", &restored);
        assert_same_files("the healed point", &restored, &self.img);
        let (code, report) = verify(&self.store, &["--disk", DISK, "--point", &healed.to_string()]);
        assert_eq!(code, 0, "the healed point verifies clean:\n{report}");
        // And replication goes on as before.
        run(tool("qemu-io").args(["-f", "raw", &self.shim.uri(), "-c", "write -P 9 8M 64k"]));
        assert_eq!(self.agent.once()["kind"], "incremental");
        restore(&self.store, DISK, "latest", &restored);
        assert_same_files("the next point", &restored, &self.img);
    }
}

#[test]
fn a_rotten_chunk_is_named_then_healed() {
    let site = site("heal-chunk", 11);
    // The largest chunk file: a megabyte of the initial copy, named by every point.
    let (chunk, _, len) =
        objects(&site.store.join("chunks")).into_iter().max_by_key(|o| o.2).expect("a chunk");
    flip_byte(&chunk, len / 2);
    let name = chunk.file_name().unwrap().to_str().unwrap().to_owned();
    let (code, report) = verify(&site.store, &["--json"]);
    assert_eq!(code, 1, "verify finds the damage:\n{report}");
    assert!(report.contains(&name), "verify names the chunk {name}:\n{report}");
    site.heals();
}

#[test]
fn a_rotten_page_of_the_latest_point_is_healed() {
    let site = site("heal-page", 12);
    // One region: the newest page is the latest point's only page.
    let (page, _, len) = objects(&site.store.join("pages")).into_iter().max_by_key(|o| o.1).expect("a page");
    flip_byte(&page, len / 2);
    let (code, report) = verify(&site.store, &[]);
    assert_eq!(code, 1, "verify finds the damage:\n{report}");
    site.heals();
}
