//! [`DiskMedium`]: the store's files on the real file system.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::Medium;

/// The real file system.
pub struct DiskMedium {
    /// The store's directory, opened before anything is written: `syncfs` on it reports every
    /// write-back error of the file system since then, each once (Linux 5.8 and later).
    sync_handle: File,
}

impl DiskMedium {
    /// Uses the file system holding `root` (an existing directory).
    pub fn open(root: &Path) -> io::Result<DiskMedium> {
        Ok(DiskMedium { sync_handle: File::open(root)? })
    }
}

impl Medium for DiskMedium {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn create(&self, path: &Path, parts: &[&[u8]], sync: bool) -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
        for p in parts {
            f.write_all(p)?;
        }
        if sync {
            f.sync_all()?;
        }
        Ok(())
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let mut buf = Vec::with_capacity(len.min(limit) as usize);
        f.take(limit).read_to_end(&mut buf)?;
        Ok(Some((len, buf)))
    }

    fn len(&self, path: &Path) -> io::Result<Option<u64>> {
        match fs::symlink_metadata(path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn syncfs(&self) -> io::Result<()> {
        nix::unistd::syncfs(self.sync_handle.as_raw_fd()).map_err(io::Error::from)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}
