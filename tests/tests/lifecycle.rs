//! Process lifecycle: SIGTERM under load and with idle clients, stale sockets.

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::Duration;

use siterep_tests::image::{self, MIB};
use siterep_tests::{
    control, json_u64, nbdinfo, nbdsh, poll, run_unchecked, scratch_dir, show_output, siterep_bin, tool,
    wait_timeout, wait_until, Serve, Server,
};

/// How much the shim must have seen written before a test disturbs the load.
const LOAD_SEEN: u64 = 4 * MIB;

/// Waits until the shim serving `server` has seen at least [`LOAD_SEEN`] written (its live
/// dirty set, from the control socket) while `fio` is still running; fails the test with
/// `fio_log()` if fio exits first or the writes do not come within 30 s.
#[track_caller]
fn wait_for_writes(server: &Server, fio: &mut Child, fio_log: &dyn Fn() -> String) {
    let control = server.control_socket();
    let mut dirty = 0;
    let seen = poll(Duration::from_secs(30), || {
        if let Some(status) = fio.try_wait().expect("try_wait") {
            panic!("fio exited ({status}) before the shim saw {LOAD_SEEN} bytes written:\n{}", fio_log());
        }
        dirty = json_u64(&control::request_ok(&control, r#"{"cmd":"status"}"#), "live_dirty_bytes");
        dirty >= LOAD_SEEN
    });
    assert!(
        seen.is_some(),
        "the shim saw only {dirty} bytes written by fio within 30 s (wanted {LOAD_SEEN}):\n{}",
        fio_log()
    );
}

/// SIGTERM while fio drives four connections at queue depth 16: the server finishes what is in
/// flight and exits 0 promptly.
#[test]
fn sigterm_during_fio_exits_zero_promptly() {
    let dir = scratch_dir("sigterm-fio");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 64 * MIB);
    let server = Serve::new(&img).start();

    let log = std::fs::File::create(dir.path().join("fio.log")).expect("fio log");
    let mut fio = tool("fio")
        .current_dir(dir.path())
        .args(["--name=load", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--size=16M"])
        .args(["--offset_increment=16M", "--numjobs=4", "--iodepth=16", "--time_based", "--runtime=60"])
        .arg(format!("--uri={}", server.uri()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("start fio");
    let fio_log = || std::fs::read_to_string(dir.path().join("fio.log")).unwrap_or_default();
    // The signal comes while I/O is in flight: the shim has seen writes land, and fio (60 s of
    // work) is still running.
    wait_for_writes(&server, &mut fio, &fio_log);

    let took = server.stop(); // asserts exit status 0 within 10 s
    assert!(took < Duration::from_secs(10), "server took {took:?} to exit");

    // fio loses its server; it must notice and exit rather than hang.
    let status = wait_timeout(&mut fio, Duration::from_secs(30));
    if status.is_none() {
        let _ = fio.kill();
        let _ = fio.wait();
        panic!("fio still running 30 s after the server exited:\n{}", fio_log());
    }
}

/// SIGTERM with a connected but idle client (blocked in a read on the socket): exit 0 promptly.
#[test]
fn sigterm_with_idle_client_exits_promptly() {
    let dir = scratch_dir("sigterm-idle");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 16 * MIB);
    let server = Serve::new(&img).start();

    let marker = dir.path().join("connected");
    let script = format!(
        "h.pread(512, 0)\nopen({:?}, 'w').close()\nimport time\ntime.sleep(60)\n",
        marker.display().to_string()
    );
    let mut idle = nbdsh()
        .arg("-u")
        .arg(server.uri())
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nbdsh");
    wait_until("nbdsh has connected and read", Duration::from_secs(10), || {
        assert!(idle.try_wait().expect("try_wait").is_none(), "nbdsh exited before connecting");
        marker.exists()
    });

    let took = server.stop();
    assert!(took < Duration::from_secs(10), "server took {took:?} to exit with an idle client");
    let _ = idle.kill();
    let _ = idle.wait();
}

/// A socket file left by a dead process is replaced, not an error.
#[test]
fn stale_socket_file_is_replaced() {
    let dir = scratch_dir("stale");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 16 * MIB);
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists(), "the stale socket file should remain after the listener closed");

    let server = Serve::new(&img).socket(&sock).start();
    let info = nbdinfo::export_info(&server.uri());
    assert_eq!(info["export-size"], 16 * MIB);
    server.stop();

    // And again after a clean exit (whatever it left behind).
    let server = Serve::new(&img).socket(&sock).start();
    nbdinfo::export_info(&server.uri());
    server.stop();
}

/// A client killed mid-I/O (fio, four connections, SIGKILL) does not disturb the server: it
/// keeps serving and still exits 0 on SIGTERM.
#[test]
fn client_killed_mid_io_leaves_server_healthy() {
    let dir = scratch_dir("killed-client");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 64 * MIB);
    let server = Serve::new(&img).start();

    let mut fio = tool("fio")
        .current_dir(dir.path())
        .process_group(0)
        .args(["--name=load", "--ioengine=nbd", "--rw=randrw", "--bsrange=4k-1m", "--size=16M"])
        .args(["--offset_increment=16M", "--numjobs=4", "--iodepth=32", "--time_based", "--runtime=60"])
        .arg(format!("--uri={}", server.uri()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    // Killed while I/O is in flight: the shim has seen writes land and fio is still running.
    wait_for_writes(&server, &mut fio, &String::new);
    // fio forks a process per job: kill the whole process group it leads.
    let status = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", fio.id())])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL -- -{} failed", fio.id());
    fio.wait().expect("reap fio");

    for _ in 0..3 {
        let info = nbdinfo::export_info(&server.uri());
        assert_eq!(info["export-size"], 64 * MIB);
    }
    let took = server.stop();
    assert!(took < Duration::from_secs(10));
}

/// Bad command lines and images fail at once with a non-zero exit and a message on stderr.
#[test]
fn bad_arguments_fail_loudly() {
    let dir = scratch_dir("badargs");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 16 * MIB);
    let sock = dir.path().join("s.sock");
    let missing = dir.path().join("missing.img");
    let cases: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
        ("granularity not a power of two", vec![img.clone().into(), "--granularity".into(), "1000".into()]),
        ("granularity too small", vec![img.clone().into(), "--granularity".into(), "256".into()]),
        ("granularity too large", vec![img.clone().into(), "--granularity".into(), "2097152".into()]),
        ("granularity zero", vec![img.clone().into(), "--granularity".into(), "0".into()]),
        ("unknown engine", vec![img.clone().into(), "--engine".into(), "magic".into()]),
        ("poll budget too long", vec![img.clone().into(), "--poll-us".into(), "10001".into()]),
        ("poll budget negative", vec![img.clone().into(), "--poll-us".into(), "-1".into()]),
        ("missing image", vec![missing.into()]),
        ("image is a directory", vec![dir.path().into()]),
        ("bad listen address", vec![img.clone().into(), "--listen".into(), "not-an-address".into()]),
    ];
    for (what, args) in cases {
        let mut cmd = std::process::Command::new(siterep_bin());
        cmd.arg("serve").args(&args).arg("--socket").arg(&sock);
        let out = run_unchecked(&mut cmd, Duration::from_secs(10));
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{what}: expected a non-zero exit\n{}",
            show_output(&out)
        );
        assert!(!out.stderr.is_empty(), "{what}: no message on stderr\n{}", show_output(&out));
    }
}
