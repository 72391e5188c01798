//! The data path under real clients: qemu-io, qemu-img, nbdcopy, fio and nbdsh write and read
//! through `siterep serve`; every test checks the bytes that reach the image file.

use siterep_tests::image::{self, Rng, KIB, MIB};
use std::path::Path;
use std::time::Duration;

use siterep_tests::nbdinfo;
use siterep_tests::{
    json_u64, nbdsh, run, run_expect_failure, run_unchecked, scratch_dir, show_output, tool, Serve, Server,
};

const SIZE: u64 = 64 * MIB;

/// Runs qemu-io on `uri` with the given `-c` commands; fails if it exits non-zero or reports any
/// failure (qemu-io exits 0 after a failed `aio_read -P` verification, so its output is checked).
fn qemu_io(uri: &str, extra: &[&str], commands: &[String]) -> String {
    let mut cmd = tool("qemu-io");
    cmd.args(["-f", "raw"]).args(extra).arg(uri);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run(&mut cmd);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !text.contains("failed") && !text.contains("rror"),
        "qemu-io reported a failure\n{}\n{}",
        commands.join("\n"),
        show_output(&out)
    );
    text
}

/// A range of a pseudo-random source image, with the rest left sparse.
fn holey_source(path: &Path, seed: u64) -> Vec<u8> {
    let ranges = [
        (0, 3 * MIB + 17),
        (5 * MIB, 4 * KIB),
        (7 * MIB + 512, 9 * MIB),
        (20 * MIB, 1),
        (31 * MIB - 4097, 2 * MIB + 3),
        (40 * MIB, 8 * MIB),
        (SIZE - 100 * KIB - 1, 100 * KIB + 1),
    ];
    image::create_with_data(path, SIZE, &ranges, seed)
}

/// A served image pre-filled with junk, so a client that skips writing zeroes over the source's
/// holes is caught.
fn junk_target(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("served.img");
    image::create_random(&img, SIZE, 0x5eed);
    img
}

/// Unaligned pattern writes and reads (plain, FUA, vectored, pipelined aio, ones qemu splits at
/// its 32 MiB request limit) through qemu-io, then the image file checked byte for byte.
#[test]
fn qemu_io_unaligned_patterns_reach_the_image() {
    let dir = scratch_dir("qemu-io");
    let img = dir.path().join("disk.img");
    let mut model = image::create_random(&img, SIZE, 1);
    let server = Serve::new(&img).start();

    // (command, offset, length, pattern): each written then read back with -P at once.
    let writes: &[(&str, u64, u64, u8)] = &[
        ("write", 513, 512, 0xab),
        ("write", 0, 1, 0x01),
        ("write", 1, 1, 0x02),
        ("write", 4095, 2, 0x03),
        ("write", 3 * 4096 - 1, 8193, 0x04),
        ("write -f", MIB + 7, 65539, 0x05),
        ("write", SIZE - 1, 1, 0x06),
        ("write", SIZE - 513, 512, 0x07),
        ("write", 600, 50, 0x09),
        ("write", 2 * MIB - 511, 1023, 0x0a),
        ("write -f", 3 * MIB + 1, 4 * MIB + 3, 0x0b),
        // Larger than qemu's largest request (32 MiB, whatever the server advertises): qemu
        // splits it.
        ("write", 9 * MIB + 123, 40 * MIB, 0x0c),
        ("write", 60 * MIB + 511, 513, 0x0d),
    ];
    let mut cmds = Vec::new();
    for &(op, off, len, pat) in writes {
        cmds.push(format!("{op} -P {pat:#04x} {off} {len}"));
        cmds.push(format!("read -P {pat:#04x} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(pat);
    }
    // Vectored write of 512 + 1000 + 7 bytes.
    cmds.push(format!("writev -P 0x0e {} 512 1000 7", 50 * MIB + 3));
    cmds.push(format!("read -P 0x0e {} 1519", 50 * MIB + 3));
    model[(50 * MIB + 3) as usize..(50 * MIB + 3 + 1519) as usize].fill(0x0e);
    cmds.push("flush".to_owned());
    qemu_io(&server.uri(), &[], &cmds);

    // 32 pipelined writes in flight at once, unaligned and adjacent, then pipelined reads.
    let mut cmds = Vec::new();
    let base = 52 * MIB + 333;
    for i in 0..32u64 {
        let (off, len, pat) = (base + i * 5000, 5000, 0x20 + i as u8);
        cmds.push(format!("aio_write -P {pat:#04x} {off} {len}"));
        model[off as usize..(off + len) as usize].fill(pat);
    }
    cmds.push("aio_flush".to_owned());
    for i in 0..32u64 {
        cmds.push(format!("aio_read -P {:#04x} {} 5000", 0x20 + i as u8, base + i * 5000));
    }
    cmds.push("aio_flush".to_owned());
    qemu_io(&server.uri(), &[], &cmds);

    server.stop();
    image::assert_same_bytes("image after qemu-io writes", &image::read(&img), &model);
}

/// `qemu-img convert -n` of a holey random image into the export (data writes plus zeroing of
/// the holes), then `qemu-img compare` through the export and against the file.
fn convert_and_compare(engine: Option<&str>) {
    let dir = scratch_dir("convert");
    let src = dir.path().join("src.img");
    let contents = holey_source(&src, 42);
    let img = junk_target(dir.path());
    let mut serve = Serve::new(&img);
    if let Some(engine) = engine {
        serve = serve.engine(engine);
    }
    let server = serve.start();

    run(tool("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(server.uri()));
    run(tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(server.uri()));
    server.stop();
    image::assert_same_bytes("served image after qemu-img convert", &image::read(&img), &contents);
}

#[test]
fn qemu_img_convert_and_compare() {
    convert_and_compare(None);
}

#[test]
fn qemu_img_convert_and_compare_sync_engine() {
    convert_and_compare(Some("sync"));
}

/// nbdcopy file → export and export → file, byte-compared, with 1 and with 4 connections.
fn nbdcopy_both_ways(connections: u32) {
    let dir = scratch_dir("nbdcopy");
    let src = dir.path().join("src.img");
    let contents = holey_source(&src, u64::from(connections));
    let img = junk_target(dir.path());
    let server = Serve::new(&img).start();
    let conns = format!("--connections={connections}");

    run(tool("nbdcopy").args([&conns, "--flush"]).arg(&src).arg(server.uri()));
    image::assert_same_bytes("served image after nbdcopy file → nbd", &image::read(&img), &contents);

    // Back out again, with the largest request size nbdcopy sends (32 MiB).
    let out = dir.path().join("out.img");
    run(tool("nbdcopy").args([&conns, "--request-size=33554432"]).arg(server.uri()).arg(&out));
    image::assert_same_bytes("nbdcopy nbd → file", &image::read(&out), &contents);

    // And with nbdcopy's default sizes, ignoring block status (every byte read).
    let out2 = dir.path().join("out2.img");
    run(tool("nbdcopy").args([&conns, "--no-extents"]).arg(server.uri()).arg(&out2));
    image::assert_same_bytes("nbdcopy --no-extents nbd → file", &image::read(&out2), &contents);
    server.stop();
}

#[test]
fn nbdcopy_one_connection() {
    nbdcopy_both_ways(1);
}

#[test]
fn nbdcopy_four_connections() {
    nbdcopy_both_ways(4);
}

/// fio's nbd engine writes with crc32c headers, then reads everything back and verifies.
fn fio_verify(server: &Server, name: &str, job: &[&str]) {
    let mut cmd = tool("fio");
    // fio drops verify-state files in its working directory: keep them in the scratch dir.
    cmd.current_dir(server.image().parent().expect("image dir"))
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.uri()))
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"])
        .arg("--group_reporting")
        .args(job);
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("err= 0"), "fio reported errors\n{}", show_output(&out));
    assert!(!text.contains("verify: bad"), "fio verification failed\n{}", show_output(&out));
}

fn fio_server(test: &str, engine: Option<&str>) -> (tempfile::TempDir, Server) {
    let dir = scratch_dir(test);
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, SIZE);
    let mut serve = Serve::new(&img);
    if let Some(engine) = engine {
        serve = serve.engine(engine);
    }
    (dir, serve.start())
}

#[test]
fn fio_verify_iodepth_1() {
    let (_dir, server) = fio_server("fio-qd1", None);
    fio_verify(&server, "qd1", &["--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=1"]);
    server.stop();
}

#[test]
fn fio_verify_iodepth_32_mixed_sizes() {
    let (_dir, server) = fio_server("fio-qd32", Some("uring"));
    fio_verify(&server, "qd32", &["--rw=randwrite", "--bsrange=512-256k", "--size=64M", "--iodepth=32"]);
    fio_verify(&server, "qd32-seq", &["--rw=write", "--bs=1m", "--size=64M", "--iodepth=32"]);
    server.stop();
}

#[test]
fn fio_verify_four_connections() {
    let (_dir, server) = fio_server("fio-jobs4", None);
    // Four jobs, each its own NBD connection, on disjoint 16 MiB quarters.
    fio_verify(
        &server,
        "jobs4",
        &["--rw=randwrite", "--bs=4k", "--size=16M", "--offset_increment=16M", "--numjobs=4", "--iodepth=8"],
    );
    server.stop();
}

#[test]
fn fio_verify_sync_engine() {
    let (_dir, server) = fio_server("fio-sync", Some("sync"));
    fio_verify(&server, "sync-qd16", &["--rw=randwrite", "--bsrange=512-128k", "--size=64M", "--iodepth=16"]);
    fio_verify(
        &server,
        "sync-jobs4",
        &["--rw=randwrite", "--bs=4k", "--size=16M", "--offset_increment=16M", "--numjobs=4", "--iodepth=4"],
    );
    server.stop();
}

/// `--read-only`: qemu-io cannot write, reads work; commands sent anyway (nbdsh with strict
/// mode off) get EPERM; the image is untouched.
#[test]
fn read_only_rejects_writes_serves_reads() {
    let dir = scratch_dir("ro");
    let img = dir.path().join("disk.img");
    let original = image::create_random(&img, 16 * MIB, 9);
    let server = Serve::new(&img).read_only().start();

    let out =
        run_expect_failure(tool("qemu-io").args(["-f", "raw", &server.uri(), "-c", "write -P 0xff 0 4096"]));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !text.contains("wrote"),
        "qemu-io claims a write succeeded on a read-only export\n{}",
        show_output(&out)
    );

    // Reads succeed and return the image's bytes: compare the first MiB via nbdcopy.
    let out_img = dir.path().join("out.img");
    run(tool("nbdcopy").arg(server.uri()).arg(&out_img));
    image::assert_same_bytes("read-only export read back", &image::read(&out_img), &original);
    qemu_io(&server.uri(), &["-r"], &["read 513 4096".to_owned(), "read 0 16M".to_owned()]);

    // Bypass the client-side checks: the server itself must refuse with EPERM and stay usable.
    let script = r#"
h.set_strict_mode(0)
ops = [
    ("write", lambda: h.pwrite(b"\xee" * 4096, 8192)),
    ("write-fua", lambda: h.pwrite(b"\xee" * 512, 0, nbd.CMD_FLAG_FUA)),
    ("trim", lambda: h.trim(65536, 0)),
    ("zero", lambda: h.zero(65536, 65536)),
]
for name, op in ops:
    try:
        op()
        print(name, "OK")
    except nbd.Error as e:
        print(name, "errno", e.errnum)
h.pread(4096, 0)
print("read OK")
"#;
    let out = run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(script));
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["write", "write-fua", "trim", "zero"] {
        assert!(
            text.lines().any(|l| l == format!("{name} errno 1")),
            "{name} on a read-only export should fail with EPERM (1)\n{}",
            show_output(&out)
        );
    }
    assert!(text.contains("read OK"), "connection unusable after refused writes\n{}", show_output(&out));
    server.stop();
    image::assert_same_bytes("read-only image", &image::read(&img), &original);
}

/// Random-sized reads through nbdsh at random offsets match the file (libnbd's own checks on
/// structured-reply chunks apply), including reads that end exactly at the end of the export.
#[test]
fn nbdsh_random_reads_match_file() {
    let dir = scratch_dir("reads");
    let img = dir.path().join("disk.img");
    let size = 8 * MIB + 4095; // not a multiple of any block size
                               // Holes too: a server may answer reads of them with hole chunks.
    let contents =
        image::create_with_data(&img, size, &[(0, MIB), (2 * MIB + 100, MIB), (5 * MIB, 2 * MIB)], 5);
    let server = Serve::new(&img).start();

    let mut rng = Rng::new(77);
    let mut reads = vec![(size - 1, 1), (0, size), (size - 4096, 4096)];
    for _ in 0..200 {
        let len = 1 + rng.below(300 * KIB);
        reads.push((rng.below(size - len + 1), len));
    }
    let list: Vec<String> = reads.iter().map(|(o, l)| format!("({o},{l})")).collect();
    let dump = dir.path().join("reads.bin");
    let script = format!(
        "with open({:?}, 'wb') as f:\n    for off, n in [{}]:\n        f.write(h.pread(n, off))\n",
        dump.display().to_string(),
        list.join(",")
    );
    run(nbdsh().arg("-u").arg(server.uri()).arg("-c").arg(&script));
    let got = image::read(&dump);
    let total: u64 = reads.iter().map(|&(_, len)| len).sum();
    assert_eq!(got.len() as u64, total, "nbdsh returned a different number of bytes than requested");
    let mut pos = 0;
    for &(off, len) in &reads {
        let (off, len) = (off as usize, len as usize);
        image::assert_same_bytes(
            &format!("NBD read of {len} bytes at {off}"),
            &got[pos..pos + len],
            &contents[off..off + len],
        );
        pos += len;
    }
    server.stop();
}

/// Sixteen qemu-io clients at once, each on its own connection and region.
#[test]
fn sixteen_concurrent_clients() {
    let dir = scratch_dir("concurrent");
    let img = dir.path().join("disk.img");
    let mut model = image::create_random(&img, SIZE, 13);
    let server = Serve::new(&img).start();

    let uri = server.uri();
    let threads: Vec<_> = (0..16u64)
        .map(|i| {
            let uri = uri.clone();
            let (off, len, pat) = (i * 4 * MIB + 511, 3 * MIB + 3, 0x80 + i as u8);
            let handle = std::thread::spawn(move || {
                let cmds = [
                    format!("write -P {pat:#04x} {off} {len}"),
                    "flush".to_owned(),
                    format!("read -P {pat:#04x} {off} {len}"),
                ];
                qemu_io(&uri, &[], &cmds);
            });
            (handle, off, len, pat)
        })
        .collect();
    for (handle, off, len, pat) in threads {
        handle.join().expect("a qemu-io client failed (see its panic above)");
        model[off as usize..(off + len) as usize].fill(pat);
    }
    server.stop();
    image::assert_same_bytes("image after concurrent clients", &image::read(&img), &model);
}

/// A loop block device as the image: its size comes from the device, writes reach the
/// backing file, `--direct` advertises the device's logical block size.
#[test]
fn serves_a_block_device() {
    let dir = scratch_dir("blockdev");
    let backing = dir.path().join("backing.img");
    let mut model = image::create_random(&backing, 32 * MIB, 17);
    let out = run(tool("losetup").args(["-f", "--show"]).arg(&backing));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    /// Detaches the loop device unless the test already did (a detached number may be reused
    /// at once by a parallel test, so it must never be detached twice).
    struct Detach(Option<String>);
    impl Drop for Detach {
        fn drop(&mut self) {
            if let Some(dev) = self.0.take() {
                let _ = run_unchecked(tool("losetup").arg("-d").arg(&dev), Duration::from_secs(30));
            }
        }
    }
    let mut attached = Detach(Some(dev.clone()));

    // The socket (and the server log) go in the scratch dir, not beside the device in /dev.
    let sock = dir.path().join("dev.sock");
    for direct in [false, true] {
        let mut serve = Serve::new(Path::new(&dev)).socket(&sock);
        if direct {
            serve = serve.direct();
        }
        let server = serve.start();
        let info = nbdinfo::export_info(&server.uri());
        assert_eq!(json_u64(&info, "export-size"), 32 * MIB, "block device size (direct={direct})");
        if direct {
            assert_eq!(json_u64(&info, "block_size_minimum"), 512, "loop device logical block size");
        }
        let (off, pat) = if direct { (8 * MIB, 0x44) } else { (MIB + 1, 0x33) };
        qemu_io(&server.uri(), &[], &[format!("write -P {pat:#04x} {off} 70000"), "flush".to_owned()]);
        model[off as usize..off as usize + 70000].fill(pat);
        // Dirty tracking works on devices too.
        let dirty = nbdinfo::map(&server.uri(), Some("qemu:dirty-bitmap:live"), 32 * MIB);
        let expected = nbdinfo::expected_map(32 * MIB, 4096, &[(off, 70000)], 1, 0);
        assert_eq!(nbdinfo::merge(&dirty), expected, "dirty map on a block device");
        server.stop();
    }
    attached.0 = None;
    run(tool("losetup").arg("-d").arg(&dev));
    image::assert_same_bytes("loop backing file", &image::read(&backing), &model);
}
