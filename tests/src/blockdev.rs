//! An export as a block device without the kernel NBD driver: `nbdfuse` shows it as a file,
//! `losetup` turns the file into `/dev/loopN`, and real tools (mkfs, mount, fsck) run on that.
//! Every type undoes itself on drop, so a failing test leaves no mount or loop device behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::{poll, run, run_unchecked, tool, wait_timeout};

/// `nbdfuse -P PIDFILE DIR URI`: the export as the file `DIR/nbd`. Dropping unmounts it.
#[derive(Debug)]
pub struct FuseExport {
    dir: PathBuf,
    child: Option<Child>,
}

impl FuseExport {
    /// Mounts `uri` on the new directory `dir` and waits until nbdfuse is serving.
    #[track_caller]
    pub fn mount(dir: &Path, uri: &str) -> FuseExport {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: load the fuse module (package fuse3)"
        );
        crate::require_tool("fusermount3");
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("create fuse mountpoint {}: {e}", dir.display()));
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
        let ready = poll(Duration::from_secs(10), || {
            if let Some(status) = export.child.as_mut().expect("running").try_wait().expect("try_wait") {
                export.child = None;
                panic!("nbdfuse exited with {status} before it was ready:\n{}", export.log());
            }
            pidfile.exists()
        });
        assert!(ready.is_some(), "nbdfuse not ready after 10 s:\n{}", export.log());
        export
    }

    /// The file that is the export.
    pub fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// `fusermount3 -u`, then nbdfuse must exit 0.
    #[track_caller]
    pub fn unmount(mut self) {
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
#[derive(Debug)]
pub struct LoopDevice(Option<String>);

impl LoopDevice {
    #[track_caller]
    pub fn attach(file: &Path) -> LoopDevice {
        let out = run(tool("losetup").args(["-f", "--show"]).arg(file));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDevice(Some(dev))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &str {
        self.0.as_deref().expect("attached")
    }

    #[track_caller]
    pub fn detach(mut self) {
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
