//! The served image is watched: an image that shrinks or is replaced under a running shim
//! fails the lost range with EIO for every command (never zeroes, never a hole), is logged, and
//! requires a resync; a WRITE never extends the file; a disk grown across a restart is served
//! at its new size with the grown range dirty; a shrunk one is refused at restart.
//!
//! Oracles are clients we did not write: qemu-io, nbdinfo, nbdsh (libnbd).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use siterep_tests::control;
use siterep_tests::image::{self, KIB, MIB};
use siterep_tests::nbdinfo::{self, Extent};
use siterep_tests::{
    json_str, json_u64, nbdsh, poll, require_tool, run, run_expect_failure, run_unchecked, scratch_dir,
    show_output, siterep, tool, Serve, Server, COMMAND_TIMEOUT, SERVER_TIMEOUT,
};

const SIZE: u64 = 64 * MIB;

/// Clears the first start's resync-required (as the agent's initial copy does), so the reason
/// a test later sees is its own.
fn clear_first_start_resync(server: &Server) {
    control::request_ok(&server.control_socket(), r#"{"cmd":"clear-resync"}"#);
    assert_eq!(control::status(server.socket()).get("resync_required"), Some(&Value::Null));
}

/// Waits (up to 5 s) until `siterep status --json` reports an image change; returns it.
#[track_caller]
fn wait_image_changed(server: &Server) -> Value {
    let mut last = Value::Null;
    let changed = poll(Duration::from_secs(5), || {
        let st = control::status(server.socket());
        if !st["image_changed"].is_null() {
            return Some(st);
        }
        last = st;
        None
    });
    changed.unwrap_or_else(|| panic!("no image change reported within 5 s: {last}\n{}", server.log()))
}

/// Every command on `[offset, offset+len)` sent by libnbd (with `base:allocation` negotiated,
/// after the Python line `setup`): its name and `ok` or the name of the errno it failed with.
fn outcomes(uri: &str, setup: &str, offset: u64, len: u64) -> Vec<(String, String)> {
    let script = format!(
        r#"
{setup}
h.add_meta_context("base:allocation")
h.connect_uri("{uri}")
def attempt(name, f):
    try:
        f()
        print(name, "ok")
    except nbd.Error as e:
        print(name, e.errno)
attempt("read", lambda: h.pread({len}, {offset}))
attempt("write", lambda: h.pwrite(b"\x01" * {len}, {offset}))
attempt("trim", lambda: h.trim({len}, {offset}))
attempt("zero", lambda: h.zero({len}, {offset}))
attempt("zero-no-hole", lambda: h.zero({len}, {offset}, nbd.CMD_FLAG_NO_HOLE))
attempt("cache", lambda: h.cache({len}, {offset}))
attempt("block-status", lambda: h.block_status({len}, {offset}, lambda *a: 0))
h.shutdown()
"#
    );
    let out = run(nbdsh().arg("-c").arg(script));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (name, result) = l.split_once(' ').unwrap_or_else(|| panic!("nbdsh printed {l:?}"));
            (name.to_owned(), result.to_owned())
        })
        .collect()
}

#[track_caller]
fn assert_all(what: &str, got: &[(String, String)], want: &str) {
    assert_eq!(got.len(), 7, "{what}: every command should have run: {got:?}");
    let wrong: Vec<_> = got.iter().filter(|(_, e)| e != want).collect();
    assert!(wrong.is_empty(), "{what}: every command must end {want}; these did not: {wrong:?}");
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat the image").len()
}

#[test]
fn a_truncated_image_fails_the_lost_range_loudly() {
    for t in ["qemu-io", "nbdinfo", "nbdsh"] {
        require_tool(t);
    }
    for engine in ["uring", "sync"] {
        let dir = scratch_dir("watch-trunc");
        let img = dir.path().join("disk.img");
        image::create_sparse(&img, SIZE);
        run(tool("qemu-io").args(["-f", "raw", "-c", &format!("write -P 0xab 0 {SIZE}")]).arg(&img));
        let server = Serve::new(&img).engine(engine).state_dir(&dir.path().join("state")).start();
        clear_first_start_resync(&server);
        let uri = server.uri();

        let cut = 32 * MIB;
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(cut).unwrap();
        // (a) A read of the lost range fails, at once (it ends early), never zeroes.
        let out =
            run_expect_failure(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xab 40M 64k"]).arg(&uri));
        let text = show_output(&out);
        assert!(text.contains("Input/output error"), "[{engine}] qemu-io read of the lost range: {text}");

        // (d) Reported: status (resync required, the change with both sizes) and the log.
        let st = wait_image_changed(&server);
        let change = &st["image_changed"];
        assert_eq!(json_str(change, "kind"), "shrank", "[{engine}] {st:?}");
        assert_eq!(json_u64(change, "served_bytes"), SIZE);
        assert_eq!(json_u64(change, "now_bytes"), cut);
        assert_eq!(json_u64(change, "valid_bytes"), cut);
        let why = json_str(&st, "resync_required").to_owned();
        assert!(
            why.contains("shrank") && why.contains(&SIZE.to_string()) && why.contains(&cut.to_string()),
            "[{engine}] resync reason: {why:?}"
        );
        let human = run(siterep().arg("status").arg("--socket").arg(server.socket()));
        let human = String::from_utf8_lossy(&human.stdout);
        assert!(human.contains("IMAGE CHANGED") && human.contains("shrank"), "[{engine}] status:\n{human}");
        let log = server.log();
        let line = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("shrank"))
            .unwrap_or_else(|| panic!("[{engine}] no error line about the shrink in the log:\n{log}"));
        for needle in [img.to_str().unwrap(), &SIZE.to_string(), &cut.to_string()] {
            assert!(line.contains(needle), "[{engine}] the log line should name {needle}: {line}");
        }

        // (b) Block status never calls the lost range a hole: nbdinfo --map fails.
        let out = run_unchecked(tool("nbdinfo").args(["--map", "--json"]).arg(&uri), COMMAND_TIMEOUT);
        assert!(
            !out.status.success(),
            "[{engine}] nbdinfo --map over a lost range must fail, not report it: {}",
            show_output(&out)
        );

        // (c) A write into the lost range fails and does not extend the file.
        let out =
            run_expect_failure(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 60M 4k"]).arg(&uri));
        assert!(show_output(&out).contains("Input/output error"), "[{engine}] {}", show_output(&out));
        assert_eq!(file_len(&img), cut, "[{engine}] a write re-extended the truncated image");

        // Every command on the lost range, and on a range straddling its start, fails with EIO.
        assert_all(&format!("[{engine}] lost range"), &outcomes(&uri, "", 48 * MIB, 4096), "EIO");
        assert_all(&format!("[{engine}] straddling"), &outcomes(&uri, "", cut - 4096, 8192), "EIO");
        assert_eq!(file_len(&img), cut, "[{engine}] a command re-extended the truncated image");

        // What is left is still served as it is.
        run(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xab 0 1M"]).arg(&uri));
        assert_all(&format!("[{engine}] the range kept"), &outcomes(&uri, "", MIB, 4096), "ok");
        server.stop();
    }
}

#[test]
fn a_replaced_image_is_detected_and_the_new_file_left_alone() {
    for t in ["qemu-io", "nbdsh"] {
        require_tool(t);
    }
    let dir = scratch_dir("watch-repl");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let server = Serve::new(&img).state_dir(&dir.path().join("state")).start();
    clear_first_start_resync(&server);
    run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 1M"]).arg(server.uri()));

    // Another file renamed over the image's path: the shim's open file is no longer the image.
    let other = dir.path().join("other.img");
    let theirs = vec![0x5au8; MIB as usize];
    std::fs::write(&other, &theirs).unwrap();
    std::fs::rename(&other, &img).unwrap();

    let st = wait_image_changed(&server);
    let change = &st["image_changed"];
    assert_eq!(json_str(change, "kind"), "replaced", "{st:?}");
    assert_eq!(json_u64(change, "served_bytes"), SIZE);
    assert_eq!(json_u64(change, "now_bytes"), MIB);
    assert_eq!(json_u64(change, "valid_bytes"), 0);
    let why = json_str(&st, "resync_required");
    assert!(why.contains("replaced") && why.contains(img.to_str().unwrap()), "resync reason: {why:?}");
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR") && l.contains("replaced") && l.contains(&SIZE.to_string())),
        "no error line about the replacement in the log:\n{log}"
    );
    // Nothing is served from the file no longer at the path, nor written to it.
    assert_all("[replaced]", &outcomes(&server.uri(), "", 0, 4096), "EIO");
    let out =
        run_expect_failure(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0x11 0 4k"]).arg(server.uri()));
    assert!(show_output(&out).contains("Input/output error"), "{}", show_output(&out));
    assert_eq!(std::fs::read(&img).unwrap(), theirs, "the file now at the path was changed");
    server.stop();
}

#[test]
fn a_write_past_the_end_never_extends_the_image() {
    require_tool("nbdsh");
    for engine in ["uring", "sync"] {
        let dir = scratch_dir("watch-end");
        let img = dir.path().join("disk.img");
        image::create_sparse(&img, SIZE);
        let server = Serve::new(&img).engine(engine).start();
        // libnbd checks bounds itself unless told not to: these requests reach the server.
        let strict_off = "h.set_strict_mode(0)";
        for (offset, len) in [(SIZE, 4096), (SIZE - 4096, 8192), (SIZE + MIB, 4096)] {
            let got = outcomes(&server.uri(), strict_off, offset, len);
            assert_eq!(got.len(), 7, "[{engine}] {got:?}");
            let done: Vec<_> = got.iter().filter(|(_, e)| e == "ok").collect();
            assert!(done.is_empty(), "[{engine}] past the end at {offset}+{len}, these succeeded: {done:?}");
            assert_eq!(
                file_len(&img),
                SIZE,
                "[{engine}] a request past the end at {offset}+{len} extended the image"
            );
        }
        server.stop();
    }
}

#[test]
fn a_grown_image_is_served_whole_with_its_new_range_dirty() {
    for t in ["qemu-io", "nbdinfo"] {
        require_tool(t);
    }
    let dir = scratch_dir("watch-grow");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let state = dir.path().join("state");
    let serve = Serve::new(&img).socket(&dir.path().join("nbd.sock")).state_dir(&state);
    let server = serve.clone().start();
    clear_first_start_resync(&server);
    run(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 1M 4k"]).arg(server.uri()));
    server.stop();

    let grown = SIZE + 32 * MIB;
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(grown).unwrap();
    let dirty = "qemu:dirty-bitmap:live";
    let expected = vec![
        Extent::new(0, MIB, 0),
        Extent::new(MIB, 4 * KIB, 1),
        Extent::new(MIB + 4 * KIB, SIZE - MIB - 4 * KIB, 0),
        Extent::new(SIZE, grown - SIZE, 1),
    ];
    let server = serve.clone().start();
    assert_eq!(json_u64(&nbdinfo::export_info(&server.uri()), "export-size"), grown);
    let st = control::status(server.socket());
    assert_eq!(json_u64(&st, "size"), grown, "{st:?}");
    assert_eq!(
        st.get("resync_required"),
        Some(&Value::Null),
        "a grown disk keeps its tracking state: {st:?}"
    );
    assert_eq!(nbdinfo::merge(&nbdinfo::map(&server.uri(), Some(dirty), grown)), expected);
    let log = server.log();
    assert!(log.contains("grew") && log.contains(&grown.to_string()), "the growth should be logged:\n{log}");
    // The new range is served like the rest.
    run(tool("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 90M 4k", "-c", "read -P 0x22 90M 4k"])
        .arg(server.uri()));
    server.stop();

    // The new size is the state's own now: a restart adopts nothing and keeps the dirty range.
    let server = serve.start();
    assert_eq!(nbdinfo::merge(&nbdinfo::map(&server.uri(), Some(dirty), grown)), expected);
    assert!(!server.log().contains("grew"), "the growth was adopted twice:\n{}", server.log());
    server.stop();
}

#[test]
fn a_shrunk_image_is_refused_at_restart() {
    let dir = scratch_dir("watch-shrink");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let state = dir.path().join("state");
    let socket = dir.path().join("nbd.sock");
    let server = Serve::new(&img).socket(&socket).state_dir(&state).start();
    clear_first_start_resync(&server);
    server.stop();
    let before = std::fs::read(state.join("state.bin")).unwrap();

    let cut = 32 * MIB;
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(cut).unwrap();
    let out = run_unchecked(
        siterep().arg("serve").arg(&img).arg("--socket").arg(&socket).arg("--state-dir").arg(&state),
        SERVER_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "a shrunk image must be refused: {}", show_output(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    for needle in ["shrank", &SIZE.to_string(), &cut.to_string(), "restore", "--state-dir", "resync"] {
        assert!(stderr.contains(needle), "the refusal should mention {needle:?}: {}", show_output(&out));
    }
    assert_eq!(std::fs::read(state.join("state.bin")).unwrap(), before, "a refused start changed the state");
    assert!(!socket.exists(), "a refused start left its socket behind");
}
