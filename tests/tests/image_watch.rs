//! The served image is watched: an image that shrinks or is replaced under a running shim
//! fails the lost range with EIO for every command (never zeroes, never a hole), is logged, and
//! requires a resync; a WRITE never extends the file; a disk grown across a restart is served
//! at its new size with the grown range dirty; a shrunk one is refused at restart.
//!
//! Oracles are clients we did not write: qemu-io, nbdinfo, nbdsh (libnbd).

use std::path::Path;
use std::time::{Duration, Instant};

use siterep_tests::control;
use siterep_tests::image::{self, MIB};
use siterep_tests::json::Json;
use siterep_tests::{
    nbdsh, require_tool, run, run_expect_failure, run_unchecked, scratch_dir, show_output, siterep, tool,
    Serve, Server, COMMAND_TIMEOUT,
};

const SIZE: u64 = 64 * MIB;

/// Clears the first start's resync-required (as the agent's initial copy does), so the reason
/// a test later sees is its own.
fn clear_first_start_resync(server: &Server) {
    control::request_ok(&server.control_socket(), r#"{"cmd":"clear-resync"}"#);
    assert_eq!(control::status(server.socket()).get("resync_required"), &Json::Null);
}

/// Waits (up to 5 s) until `siterep status --json` reports an image change; returns it.
#[track_caller]
fn wait_image_changed(server: &Server) -> Json {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = control::status(server.socket());
        if st.get("image_changed") != &Json::Null {
            return st;
        }
        if Instant::now() >= deadline {
            panic!("no image change reported within 5 s: {st:?}\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every command on `[offset, offset+len)` sent by libnbd (with `base:allocation` negotiated):
/// its name and `ok` or the name of the errno it failed with.
fn outcomes(uri: &str, offset: u64, len: u64) -> Vec<(String, String)> {
    let script = format!(
        r#"
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
        let change = st.get("image_changed");
        assert_eq!(change.get("kind").as_str(), "shrank", "[{engine}] {st:?}");
        assert_eq!(change.get("served_bytes").as_u64(), SIZE);
        assert_eq!(change.get("now_bytes").as_u64(), cut);
        assert_eq!(change.get("valid_bytes").as_u64(), cut);
        let why = st.get("resync_required").as_str().to_owned();
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
        assert_all(&format!("[{engine}] lost range"), &outcomes(&uri, 48 * MIB, 4096), "EIO");
        assert_all(&format!("[{engine}] straddling"), &outcomes(&uri, cut - 4096, 8192), "EIO");
        assert_eq!(file_len(&img), cut, "[{engine}] a command re-extended the truncated image");

        // What is left is still served as it is.
        run(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xab 0 1M"]).arg(&uri));
        assert_all(&format!("[{engine}] the range kept"), &outcomes(&uri, MIB, 4096), "ok");
        server.stop();
    }
}
