//! One source per disk, end to end (`docs/wire.md` §6.2, §6.6), and an unchanged disk (§6.9).
//!
//! - `a_second_machine_under_the_same_name_is_refused`: two images, two shims (each its own
//!   state directory, so its own source identity), one server, two agents replicating every
//!   second under the same `--disk`, each image written with other data. The second agent stops
//!   with a fatal error naming both identities; the server logs the refusal; every point is the
//!   first machine's, and the latest restores equal to its image.
//! - `a_clone_with_a_copy_of_the_state_diverges_loudly`: a clone made by copying the image and
//!   the shim's state directory (so the same identity, and generation numbers in step). While
//!   the original's agent is in a session the clone's gets `ERR_BUSY`; once it gets in, its
//!   generation's digest differs from the committed one and it stops with a fatal divergence.
//!   The original's points are untouched, and a re-enrolled reinstall of the source resyncs
//!   and goes on.
//! - `an_idle_disk_makes_no_points`: with nothing written, an agent replicating every second
//!   makes no point, yet the store's "current as of" time and the shim's RPO keep up; the next
//!   write makes one point again.

use std::path::Path;
use std::time::Duration;

use siterep_tests::image::{Rng, MIB};
use siterep_tests::replication::{
    assert_same_files, generations, points, restore, shim_status, AgentCmd, Certs, RecoveryServer,
};
use siterep_tests::{json_str, json_u64, require_tool, run, scratch_dir, tool, wait_until, Serve};

const SIZE: u64 = 16 * MIB;
const DISK: &str = "db";

fn random_image(path: &Path, seed: u64) {
    let mut rng = Rng::new(seed);
    std::fs::write(path, rng.bytes(SIZE as usize)).expect("write the image");
}

/// qemu-io `write -P pattern` of `len` bytes at `off` through the shim.
#[track_caller]
fn write_pattern(uri: &str, pattern: u8, off: u64, len: u64) {
    let out = run(tool("qemu-io").args(["-f", "raw", uri, "-c", &format!("write -P {pattern} {off} {len}")]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("wrote"), "qemu-io did not write: {text}");
}

fn point_ids(store: &Path) -> Vec<u64> {
    points(store, DISK).iter().map(|p| json_u64(p, "id")).collect()
}

#[test]
fn a_second_machine_under_the_same_name_is_refused() {
    require_tool("qemu-io");
    let dir = scratch_dir("sources-two");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let (img_a, img_b) = (d.join("a.img"), d.join("b.img"));
    random_image(&img_a, 1);
    random_image(&img_b, 2);
    let shim_a = Serve::new(&img_a).state_dir(&d.join("state-a")).start();
    let shim_b = Serve::new(&img_b).state_dir(&d.join("state-b")).start();
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);

    let agent_a = AgentCmd::new(shim_a.socket(), server.addr(), DISK, &certs).args(["--interval", "1s"]);
    let mut running_a = agent_a.spawn(&d.join("agent-a.log"));
    wait_until("the first machine's initial copy", Duration::from_secs(60), || {
        store.join("disks").join(DISK).join("points").exists() && !point_ids(&store).is_empty()
    });
    // Different data on each machine, while both agents replicate every second.
    write_pattern(&shim_a.uri(), 0xa1, 0, 4 * MIB);
    write_pattern(&shim_b.uri(), 0xb2, 0, 4 * MIB);
    let source_a = json_str(&shim_status(shim_a.socket()), "source_id").to_owned();
    let source_b = json_str(&shim_status(shim_b.socket()), "source_id").to_owned();
    assert_ne!(source_a, source_b, "two state directories, two identities");

    let mut cmd =
        AgentCmd::new(shim_b.socket(), server.addr(), DISK, &certs).args(["--interval", "1s"]).command();
    let out = siterep_tests::run_unchecked(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second machine's agent must stop: {stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("code 10")
            && last.contains(&source_a)
            && last.contains(&source_b)
            && last.contains("--reenroll"),
        "the error names both identities and what to do: {last}"
    );
    assert!(
        server.log().contains("refused a second source"),
        "the server logs the refusal:\n{}",
        server.log()
    );

    // The first machine goes on; every point is its own.
    wait_until("the first machine's write replicated", Duration::from_secs(60), || {
        let st = shim_status(shim_a.socket());
        json_u64(&st, "backlog_bytes") == 0 && generations(&st).is_empty()
    });
    running_a.assert_running();
    running_a.kill();
    let restored = d.join("restored.img");
    restore(&store, DISK, "latest", &restored);
    assert_same_files("the latest point", &restored, &img_a);
    assert_eq!(server.log().matches("source re-enrolled").count(), 0);
}

#[test]
fn a_clone_with_a_copy_of_the_state_diverges_loudly() {
    require_tool("qemu-io");
    let dir = scratch_dir("sources-clone");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let img = d.join("a.img");
    random_image(&img, 3);
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let first = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).once();
    assert_eq!(json_str(&first, "kind"), "initial", "{first:?}");
    shim.stop();

    // The clone: the image and the state directory, copied while the shim was stopped.
    let clone_img = d.join("clone.img");
    std::fs::copy(&img, &clone_img).expect("copy the image");
    run(std::process::Command::new("cp").arg("-a").arg(d.join("state")).arg(d.join("state-clone")));
    // On the cloned machine the image has the path the state names; here it has another one.
    let clone_path = std::fs::canonicalize(&clone_img).expect("canonical path");
    std::fs::write(d.join("state-clone/image"), format!("{}\n", clone_path.display()))
        .expect("rename the image");
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let clone = Serve::new(&clone_img).state_dir(&d.join("state-clone")).start();
    assert_eq!(
        json_str(&shim_status(shim.socket()), "source_id"),
        json_str(&shim_status(clone.socket()), "source_id"),
        "the clone carries the identity"
    );
    write_pattern(&shim.uri(), 0x11, MIB, 2 * MIB);
    write_pattern(&clone.uri(), 0x22, MIB, 2 * MIB);

    // While the original's agent is in a session, the clone's is busy.
    let original = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).args(["--interval", "1s"]);
    let mut running = original.spawn(&d.join("agent.log"));
    wait_until("the original's write replicated", Duration::from_secs(60), || point_ids(&store).len() >= 2);
    let mut cmd = AgentCmd::new(clone.socket(), server.addr(), DISK, &certs)
        .args(["--once", "--retry-scale", "0.0001", "--max-retries", "1"])
        .command();
    let out = siterep_tests::run_unchecked(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("code 9") && stderr.contains("another session"), "busy: {stderr}");
    running.assert_running();
    running.kill();

    // With the original gone, the clone gets in: its generation has another digest.
    let before = point_ids(&store);
    let mut cmd = AgentCmd::new(clone.socket(), server.addr(), DISK, &certs).args(["--once"]).command();
    let out = siterep_tests::run_unchecked(&mut cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the clone's agent must stop: {stderr}");
    assert!(stderr.contains("another machine replicates under this identity"), "divergence: {stderr}");
    assert!(server.log().contains("the agent ended the session"), "the server logs it:\n{}", server.log());
    assert_eq!(point_ids(&store), before, "no point was made from the clone");
    let restored = d.join("restored.img");
    restore(&store, DISK, "latest", &restored);
    assert_same_files("the latest point is the original's", &restored, &img);
    clone.stop();

    // A reinstalled source (new state, new identity) is refused, then re-enrolled: it resyncs.
    shim.stop();
    let shim = Serve::new(&img).state_dir(&d.join("state-new")).start();
    write_pattern(&shim.uri(), 0x33, 5 * MIB, MIB);
    let mut cmd = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).args(["--once"]).command();
    let out = siterep_tests::run_unchecked(&mut cmd, Duration::from_secs(60));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("code 10"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).args(["--reenroll"]).once();
    assert_eq!(json_str(&summary, "kind"), "resync", "{summary:?}");
    let next = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).once();
    assert_ne!(json_str(&next, "kind"), "resync", "{next:?}");
    shim.stop();
    restore(&store, DISK, "latest", &restored);
    assert_same_files("after the re-enrollment", &restored, &img);
}

#[test]
fn an_idle_disk_makes_no_points() {
    require_tool("qemu-io");
    let dir = scratch_dir("sources-idle");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let img = d.join("a.img");
    random_image(&img, 4);
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let agent = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs);
    agent.once();
    let once = agent.once();
    assert_eq!(json_str(&once, "kind"), "unchanged", "nothing was written: {once:?}");
    assert_eq!(point_ids(&store), vec![1]);

    let mut running = agent.clone().args(["--interval", "1s"]).spawn(&d.join("agent.log"));
    let started = siterep_tests::replication::now_ms();
    // Several intervals pass with nothing written: no point, but the disk is current.
    wait_until("the latest point recorded as current", Duration::from_secs(30), || {
        let listed = points(&store, DISK);
        json_u64(listed.last().expect("a point"), "current_unix_ms") > started + 2_000
    });
    assert_eq!(point_ids(&store), vec![1], "an idle disk makes no point");
    let rpo = json_u64(&shim_status(shim.socket()), "rpo_ms");
    assert!(rpo < 5_000, "the shim's RPO stays current while idle: {rpo} ms");
    write_pattern(&shim.uri(), 0x44, 0, MIB);
    wait_until("a point for the write", Duration::from_secs(30), || point_ids(&store).len() == 2);
    running.assert_running();
    running.kill();
}

#[test]
fn a_grown_disk_replicates_at_its_new_size() {
    let dir = scratch_dir("sources-grow");
    let d = dir.path();
    let certs = Certs::make(&d.join("certs"));
    let img = d.join("a.img");
    random_image(&img, 5);
    let before = d.join("before.img");
    std::fs::copy(&img, &before).expect("keep the first content");
    let store = d.join("store");
    let server = RecoveryServer::start(&store, &certs, &[]);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).once();
    shim.stop();

    // Grown by 8 MiB while the shim was stopped, with data in the new range.
    let f = std::fs::OpenOptions::new().write(true).open(&img).expect("open the image");
    f.set_len(SIZE + 8 * MIB).expect("grow the image");
    std::os::unix::fs::FileExt::write_all_at(&f, &Rng::new(6).bytes(MIB as usize), SIZE + MIB)
        .expect("write");
    drop(f);
    let shim = Serve::new(&img).state_dir(&d.join("state")).start();
    let next = AgentCmd::new(shim.socket(), server.addr(), DISK, &certs).once();
    assert_eq!(json_str(&next, "kind"), "incremental", "the grown range ships as changes: {next:?}");
    shim.stop();
    let restored = d.join("restored.img");
    restore(&store, DISK, "latest", &restored);
    assert_same_files("the point after the grow", &restored, &img);
    restore(&store, DISK, "1", &restored);
    assert_same_files("the point before the grow keeps its size", &restored, &before);
}
