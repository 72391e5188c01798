//! Process lifecycle: SIGTERM under load and with idle clients, stale sockets.

use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use siterep_tests::image::{self, MIB};
use siterep_tests::{
    nbdinfo, nbdsh, run_unchecked, scratch_dir, show_output, siterep_bin, tool, wait_timeout, Serve,
};

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
    // Let the load build up; fio must still be running (it has 60 s of work).
    std::thread::sleep(Duration::from_millis(2000));
    let early = fio.try_wait().expect("try_wait");
    let fio_log = || std::fs::read_to_string(dir.path().join("fio.log")).unwrap_or_default();
    assert!(early.is_none(), "fio stopped before SIGTERM ({early:?}):\n{}", fio_log());

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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(idle.try_wait().expect("try_wait").is_none(), "nbdsh exited before connecting");
        assert!(Instant::now() < deadline, "nbdsh did not connect within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }

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
    assert_eq!(info.get("export-size").as_u64(), 16 * MIB);
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
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fio.try_wait().expect("try_wait").is_none(), "fio stopped early");
    // fio forks a process per job: kill the whole process group it leads.
    let status = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", fio.id())])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL -- -{} failed", fio.id());
    fio.wait().expect("reap fio");

    for _ in 0..3 {
        let info = nbdinfo::export_info(&server.uri());
        assert_eq!(info.get("export-size").as_u64(), 64 * MIB);
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
