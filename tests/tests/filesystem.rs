//! A real filesystem on the export: nbdfuse (multi-conn) → loop device → ext4, files written,
//! read back after a remount, `e2fsck` clean both through the server and on the image itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use siterep_tests::image::{self, Rng, KIB, MIB};
use siterep_tests::{require_tool, run, run_unchecked, scratch_dir, show_output, tool, wait_timeout, Serve};

/// `nbdfuse DIR URI`: the export as the file `DIR/nbd`. Dropping unmounts it.
struct FuseExport {
    dir: PathBuf,
    child: Option<Child>,
}

impl FuseExport {
    fn mount(dir: &Path, uri: &str) -> FuseExport {
        std::fs::create_dir(dir).expect("create fuse mountpoint");
        let pidfile = dir.with_extension("pid");
        let log = std::fs::File::create(dir.with_extension("log")).expect("nbdfuse log");
        let child = tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start nbdfuse");
        let mut export = FuseExport { dir: dir.to_owned(), child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pidfile.exists() {
            if let Some(status) = export.child.as_mut().unwrap().try_wait().expect("try_wait") {
                export.child = None;
                panic!("nbdfuse exited with {status} before it was ready:\n{}", export.log());
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready after 10 s:\n{}", export.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        export
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// `fusermount3 -u`, then nbdfuse must exit 0.
    fn unmount(mut self) {
        run(tool("fusermount3").arg("-u").arg(&self.dir));
        let mut child = self.child.take().expect("nbdfuse running");
        let status = wait_timeout(&mut child, Duration::from_secs(10));
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "nbdfuse exit after unmount: {status:?}\n{}",
            self.log()
        );
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = run_unchecked(tool("fusermount3").arg("-u").arg(&self.dir), Duration::from_secs(30));
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A loop device over a file (`losetup -f --show`); dropping detaches it.
struct LoopDevice(Option<String>);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = run(tool("losetup").args(["-f", "--show"]).arg(file));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice(Some(dev))
    }

    fn path(&self) -> &str {
        self.0.as_deref().expect("attached")
    }

    fn detach(mut self) {
        let dev = self.0.take().expect("attached");
        run(tool("losetup").arg("-d").arg(&dev));
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Some(dev) = self.0.take() {
            let _ = run_unchecked(tool("losetup").arg("-d").arg(&dev), Duration::from_secs(30));
        }
    }
}

/// A mounted filesystem; dropping unmounts it.
struct MountedFs(Option<PathBuf>);

impl MountedFs {
    fn mount(dev: &str, dir: &Path) -> MountedFs {
        std::fs::create_dir_all(dir).expect("create mountpoint");
        run(tool("mount").args(["-t", "ext4", dev]).arg(dir));
        MountedFs(Some(dir.to_owned()))
    }

    fn unmount(mut self) {
        let dir = self.0.take().expect("mounted");
        run(tool("umount").arg(&dir));
    }
}

impl Drop for MountedFs {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = run_unchecked(tool("umount").arg("-l").arg(&dir), Duration::from_secs(30));
        }
    }
}

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
    let mount = MountedFs::mount(lo.path(), &mnt);
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
    let mount = MountedFs::mount(lo.path(), &mnt);
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
