//! A real filesystem on the export: nbdfuse (multi-conn) → loop device → ext4, files written,
//! read back after a remount, `e2fsck` clean both through the server and on the image itself.

use std::path::Path;

use siterep_tests::blockdev::{FuseExport, LoopDevice};
use siterep_tests::image::{self, Rng, KIB, MIB};
use siterep_tests::recovery::Mount;
use siterep_tests::{require_tool, run, scratch_dir, show_output, tool, Serve};

#[test]
fn ext4_on_nbdfuse_loop_device() {
    for t in ["nbdfuse", "fusermount3", "losetup", "mount", "umount", "mkfs.ext4", "e2fsck", "debugfs"] {
        require_tool(t);
    }
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: load the fuse module (package fuse3)");

    let dir = scratch_dir("ext4");
    let img = dir.path().join("disk.img");
    image::create_sparse(&img, 128 * MIB);
    let server = Serve::new(&img).start();

    // Files: a few MiB of random data, odd sizes, and a directory of small files.
    let mut rng = Rng::new(2024);
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("big.bin".into(), rng.bytes((3 * MIB) as usize)),
        ("odd.bin".into(), rng.bytes((MIB + 17) as usize)),
        ("small.bin".into(), rng.bytes((100 * KIB) as usize)),
    ];
    for i in 0..40 {
        let len = 1 + rng.below(20_000) as usize;
        files.push((format!("many/f{i:02}"), rng.bytes(len)));
    }

    let fuse = FuseExport::mount(&dir.path().join("fuse"), &server.uri());
    let size = std::fs::metadata(fuse.file()).expect("stat nbdfuse file").len();
    assert_eq!(size, 128 * MIB, "nbdfuse file size");
    let lo = LoopDevice::attach(&fuse.file());
    run(tool("mkfs.ext4").args(["-q", "-F", lo.path()]));

    let mnt = dir.path().join("mnt");
    let mount = Mount::ext4(lo.path(), &mnt, None);
    std::fs::create_dir(mnt.join("many")).expect("mkdir");
    for (name, data) in &files {
        let f = std::fs::File::create(mnt.join(name)).expect("create file");
        std::io::Write::write_all(&mut &f, data).expect("write file");
        f.sync_all().expect("fsync file");
    }
    mount.unmount();
    run(tool("e2fsck").args(["-f", "-n", lo.path()]));
    lo.detach();
    fuse.unmount();

    // A fresh nbdfuse and loop device, so nothing is read back from a page cache.
    let fuse = FuseExport::mount(&dir.path().join("fuse2"), &server.uri_for("siterep"));
    let lo = LoopDevice::attach(&fuse.file());
    let mount = Mount::ext4(lo.path(), &mnt, None);
    for (name, data) in &files {
        let got = std::fs::read(mnt.join(name)).expect("read file back");
        image::assert_same_bytes(&format!("{name} read back through the filesystem"), &got, data);
    }
    mount.unmount();
    lo.detach();
    fuse.unmount();
    server.stop();

    // The image file itself: a clean filesystem holding the same files.
    run(tool("e2fsck").args(["-f", "-n"]).arg(&img));
    for (name, data) in files.iter().take(3) {
        let out_path = dir.path().join(format!("dump-{name}"));
        let out =
            run(tool("debugfs").arg("-R").arg(format!("dump /{name} {}", out_path.display())).arg(&img));
        assert!(out_path.exists(), "debugfs could not dump /{name}\n{}", show_output(&out));
        image::assert_same_bytes(
            &format!("{name} dumped from the image file"),
            &image::read(&out_path),
            data,
        );
    }
}
