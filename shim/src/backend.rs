//! The image behind an export: a regular file or a block device, and its synchronous
//! operations (the engines run READ, WRITE and FLUSH themselves; the rest runs here), and the
//! [`Watch`] that fails requests touching a range the image lost under the shim.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

use tracker::ImageChangeKind;

use crate::buf::AlignedBuf;
use crate::sys;
use crate::watch::Watch;
use nbd_proto::Errno;

/// Why an image could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("cannot open {path}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is neither a regular file nor a block device")]
    NotAnImage { path: PathBuf },
    #[error("cannot read the size of {path}")]
    Size { path: PathBuf, source: io::Error },
}

/// What the image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    File,
    BlockDevice,
    /// Not a file: served through a [`VirtualImage`] (e.g. a recovery point).
    Virtual,
}

/// An image that is not a file or device, such as a recovery point served from a store. The
/// server serves these with the pread/pwrite engine.
pub trait VirtualImage: Send + Sync + std::fmt::Debug {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Refused with EROFS/EPERM by read-only images.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the range read as zeroes.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// (length, is_hole) runs over the range, at most `max`.
    fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>>;
}

/// An open image.
#[derive(Debug)]
pub struct Backend {
    file: Option<File>,
    virt: Option<std::sync::Arc<dyn VirtualImage>>,
    size: u64,
    kind: ImageKind,
    direct: bool,
    /// Smallest request granularity the image can honour (1 for buffered files).
    min_block: u32,
    watch: Watch,
}

/// Chunk size of the zero-writing fallback.
const ZERO_CHUNK: usize = 1 << 20;

impl Backend {
    /// Opens `path` for reading (and writing unless `read_only`), with O_DIRECT if `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Self, OpenError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|source| OpenError::Open { path: path.into(), source })?;
        let meta = file.metadata().map_err(|source| OpenError::Open { path: path.into(), source })?;
        let ft = meta.file_type();
        let (kind, size, min_block) = if ft.is_block_device() {
            let size = sys::block_device_size(file.as_fd())
                .map_err(|source| OpenError::Size { path: path.into(), source })?;
            let sector = sys::block_device_sector(file.as_fd())
                .map_err(|source| OpenError::Size { path: path.into(), source })?;
            (ImageKind::BlockDevice, size, sector.max(512))
        } else if ft.is_file() {
            // O_DIRECT on a file: 4 KiB covers every filesystem block size we expect.
            (ImageKind::File, meta.len(), if direct { 4096 } else { 1 })
        } else {
            return Err(OpenError::NotAnImage { path: path.into() });
        };
        // The path as given (not resolved): if it comes to name another file, that is a change.
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let watch = Watch::new(Some(path), size);
        Ok(Self { file: Some(file), virt: None, size, kind, direct, min_block, watch })
    }

    /// Serves a virtual image (byte-granular, never O_DIRECT).
    pub fn virtual_image(image: std::sync::Arc<dyn VirtualImage>) -> Self {
        let size = image.size();
        Self {
            file: None,
            size,
            virt: Some(image),
            kind: ImageKind::Virtual,
            direct: false,
            min_block: 1,
            watch: Watch::new(None, size),
        }
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("only file-backed images reach file operations")
    }

    /// The descriptor the io_uring engine submits to; `None` for virtual images.
    pub fn fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    pub fn min_block(&self) -> u32 {
        self.min_block
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The image's descriptor. Panics for virtual images, which the server never hands to
    /// the io_uring engine or the kernel front-ends.
    pub fn raw_fd(&self) -> RawFd {
        self.file().as_raw_fd()
    }

    /// What the shim knows of changes to the image under it.
    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    /// EIO if `[offset, offset+len)` reaches into a range the image lost (one atomic load;
    /// see [`Watch`]). Every READ and every modifying command passes it first.
    #[inline]
    pub fn check(&self, offset: u64, len: u64) -> Result<(), Errno> {
        self.watch.check(offset, len)
    }

    /// The image's size now: its length (fstat) or the block device's size; `None` for a
    /// virtual image.
    fn current_size(&self) -> io::Result<Option<u64>> {
        match self.kind {
            ImageKind::File => Ok(Some(self.file().metadata()?.len())),
            ImageKind::BlockDevice => sys::block_device_size(self.file().as_fd()).map(Some),
            ImageKind::Virtual => Ok(None),
        }
    }

    /// [`Backend::check`], then the image's size now: EIO, and the loss recorded, if the range
    /// reaches past it. For the commands that are not on the hot path (TRIM, WRITE_ZEROES,
    /// CACHE, BLOCK_STATUS).
    pub fn check_size(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len).map_err(errno_io)?;
        match self.current_size()? {
            Some(now) if now < offset + len => {
                self.watch.lose(ImageChangeKind::Shrank, Some(now), now);
                Err(errno_io(Errno::Io))
            }
            _ => Ok(()),
        }
    }

    /// Looks at the image again: whether it shrank, and whether its path still names the
    /// file or device open (same device and inode; for a block device, the same device
    /// number). A change found is recorded in the [`Watch`].
    pub fn recheck(&self) {
        let Some(path) = self.watch.path() else { return };
        if let Ok(Some(now)) = self.current_size() {
            if now < self.watch.valid_end() {
                self.watch.lose(ImageChangeKind::Shrank, Some(now), now);
            }
        }
        let Ok(open) = nix::sys::stat::fstat(self.raw_fd()) else { return };
        match nix::sys::stat::stat(path) {
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {
                self.watch.lose(ImageChangeKind::Removed, None, 0)
            }
            Err(e) => self.watch.stat_failed(&e.into()),
            Ok(st) => {
                let is_block = st.st_mode & libc::S_IFMT == libc::S_IFBLK;
                let same = match self.kind {
                    ImageKind::BlockDevice => is_block && st.st_rdev == open.st_rdev,
                    _ => (st.st_dev, st.st_ino) == (open.st_dev, open.st_ino),
                };
                if !same {
                    let now = (!is_block).then_some(st.st_size as u64);
                    self.watch.lose(ImageChangeKind::Replaced, now, 0);
                }
            }
        }
    }

    /// Rechecks the image every `period` on a thread of its own, while the backend lives and
    /// some of it is still served.
    pub fn spawn_watcher(self: &Arc<Self>, period: Duration) -> io::Result<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new().name("image-watch".into()).spawn(move || loop {
            std::thread::sleep(period);
            match weak.upgrade() {
                Some(b) if b.watch.valid_end() > 0 => b.recheck(),
                _ => return,
            }
        })?;
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`. A read that finds the end of the file
    /// early is an error (EIO) and makes the image be looked at again at once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(v) = &self.virt {
            return v.read_at(buf, offset);
        }
        self.check(offset, buf.len() as u64).map_err(errno_io)?;
        self.file().read_exact_at(buf, offset).inspect_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                self.recheck();
            }
        })
    }

    /// Writes all of `buf` at `offset`; with `fua`, durably before returning.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if let Some(v) = &self.virt {
            v.write_at(buf, offset)?;
            return if fua { v.flush() } else { Ok(()) };
        }
        self.file().write_all_at(buf, offset)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes every completed write durable (fdatasync covers all connections' writes).
    pub fn flush(&self) -> io::Result<()> {
        if let Some(v) = &self.virt {
            return v.flush();
        }
        self.file().sync_data()
    }

    /// Deallocates a range (advisory: a device or filesystem that cannot is not an error).
    /// Returns whether the range now reads as zeroes (a punched hole in a file; a discarded
    /// block device range is undefined).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<bool> {
        if let Some(v) = &self.virt {
            v.zero(offset, len)?;
            return Ok(true);
        }
        self.check_size(offset, len)?;
        let r = match self.kind {
            ImageKind::File => fallocate(
                self.file().as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(io::Error::from),
            ImageKind::BlockDevice => sys::block_discard(self.file().as_fd(), offset, len),
            ImageKind::Virtual => unreachable!("virtual images return above"),
        };
        let zeroed = match r {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
            Err(e) => return Err(e),
            Ok(()) => self.kind == ImageKind::File,
        };
        if fua {
            self.flush()?;
        }
        Ok(zeroed)
    }

    /// Zeroes a range. Without `no_hole` it may deallocate. With `fast` it fails with
    /// `ENOTSUP` rather than write zeroes one by one.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<(), Errno> {
        if let Some(v) = &self.virt {
            return v.zero(offset, len).map_err(|e| Errno::from_io(&e));
        }
        let io_err = |e: io::Error| Errno::from_io(&e);
        self.check_size(offset, len).map_err(io_err)?;
        let fd = self.file().as_raw_fd();
        let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let done = match self.kind {
            ImageKind::Virtual => unreachable!("virtual images return above"),
            ImageKind::File => {
                let modes: &[FallocateFlags] = if no_hole { &[zero] } else { &[punch, zero] };
                let mut ok = false;
                for m in modes {
                    match fallocate(fd, *m, offset as i64, len as i64) {
                        Ok(()) => {
                            ok = true;
                            break;
                        }
                        Err(nix::errno::Errno::EOPNOTSUPP) => {}
                        Err(e) => return Err(io_err(e.into())),
                    }
                }
                ok
            }
            ImageKind::BlockDevice if fast => {
                // On a block device, PUNCH_HOLE zeroes by unmapping and never falls back to
                // writing; that is the only fast zero we can promise.
                if no_hole {
                    return Err(Errno::NotSup);
                }
                match fallocate(fd, punch, offset as i64, len as i64) {
                    Ok(()) => true,
                    Err(nix::errno::Errno::EOPNOTSUPP) => return Err(Errno::NotSup),
                    Err(e) => return Err(io_err(e.into())),
                }
            }
            ImageKind::BlockDevice => {
                sys::block_zeroout(self.file().as_fd(), offset, len).map_err(io_err)?;
                true
            }
        };
        if !done {
            if fast {
                return Err(Errno::NotSup);
            }
            self.write_zero_bytes(offset, len).map_err(io_err)?;
        }
        if fua {
            self.flush().map_err(io_err)?;
        }
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeros = AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize));
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file().write_all_at(&zeros.as_slice()[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Asks the kernel to read a range ahead into its cache.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.virt.is_some() {
            return Ok(());
        }
        self.check_size(offset, len)?;
        posix_fadvise(
            self.file().as_raw_fd(),
            offset as i64,
            len as i64,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )?;
        Ok(())
    }

    /// The allocation of `[offset, offset+len)` as (length, is_hole) runs, at most `max` runs.
    /// Holes read as zeroes. A block device reports one data run. A range the image does not
    /// reach (any more) is an error, never a hole: SEEK_DATA past the end of a file answers as
    /// it does for a hole at the end, so the size is checked after looking.
    pub fn allocation(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, bool)>> {
        if let Some(v) = &self.virt {
            return v.allocation(offset, len, max);
        }
        let end = offset + len;
        if self.kind == ImageKind::BlockDevice {
            self.check_size(offset, len)?;
            return Ok(vec![(len, false)]);
        }
        self.check(offset, len).map_err(errno_io)?;
        let fd = self.file().as_raw_fd();
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => end,
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => {
                    // No SEEK_DATA support on this filesystem: everything is data.
                    runs.push((end - pos, false));
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let stop = data.min(end);
                runs.push((stop - pos, true));
                pos = stop;
                continue;
            }
            let hole = match lseek(fd, pos as i64, Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(e) => return Err(e.into()),
            };
            let stop = hole.clamp(pos + 1, end);
            runs.push((stop - pos, false));
            pos = stop;
        }
        self.check_size(offset, len)?;
        Ok(runs)
    }
}

/// `e` as an `io::Error` with the same errno.
fn errno_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl tracker::ImageRead for Backend {
    /// Reads for pre-images; with O_DIRECT, through an aligned bounce buffer.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct {
            return Backend::read_at(self, buf, offset);
        }
        let align = u64::from(self.min_block.max(512));
        let start = offset / align * align;
        let end = (offset + buf.len() as u64).div_ceil(align) * align;
        let mut bounce = AlignedBuf::zeroed((end - start) as usize);
        let len = bounce.len().min((self.size - start) as usize);
        Backend::read_at(self, &mut bounce.as_mut_slice()[..len], start)?;
        let lo = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[lo..lo + buf.len()]);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Backend::flush(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        (d, p)
    }

    #[test]
    fn allocation_sees_holes_and_data() {
        let (_d, p) = image(8 << 20);
        let b = Backend::open(&p, false, false).unwrap();
        b.write_at(&vec![7u8; 1 << 20], 2 << 20, false).unwrap();
        let runs = b.allocation(0, 8 << 20, 100).unwrap();
        assert_eq!(runs, vec![(2 << 20, true), (1 << 20, false), (5 << 20, true)]);
        let runs = b.allocation((2 << 20) + 100, 1000, 100).unwrap();
        assert_eq!(runs, vec![(1000, false)]);
    }

    #[test]
    fn zeroes_and_trim_read_back_as_zero() {
        let (_d, p) = image(4 << 20);
        let b = Backend::open(&p, false, false).unwrap();
        b.write_at(&vec![1u8; 4 << 20], 0, false).unwrap();
        b.write_zeroes(100, 5000, true, false, false).unwrap();
        b.write_zeroes(1 << 20, 1 << 20, false, true, true).unwrap();
        b.trim(3 << 20, 4096, false).unwrap();
        let mut got = vec![0u8; 4 << 20];
        b.read_at(&mut got, 0).unwrap();
        assert!(got[100..5100].iter().all(|&x| x == 0));
        assert_eq!(got[99], 1);
        assert_eq!(got[5100], 1);
        assert!(got[1 << 20..2 << 20].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_shrunk_image_fails_the_lost_range_never_a_hole() {
        let (_d, p) = image(8 << 20);
        let b = Backend::open(&p, false, false).unwrap();
        b.write_at(&vec![7u8; 8 << 20], 0, false).unwrap();
        File::options().write(true).open(&p).unwrap().set_len(4 << 20).unwrap();
        // Found by the range being looked at, before any recheck.
        assert!(b.allocation(0, 8 << 20, 100).is_err(), "a lost range must not be called a hole");
        let c = b.watch().change().expect("the shrink is recorded");
        assert_eq!(
            (c.kind, c.served_bytes, c.now_bytes, c.valid_bytes),
            (ImageChangeKind::Shrank, 8 << 20, Some(4 << 20), 4 << 20)
        );
        assert_eq!(b.check((4 << 20) - 1, 2), Err(Errno::Io));
        assert!(b.read_at(&mut [0u8; 4096], 6 << 20).is_err());
        assert!(b.trim(5 << 20, 4096, false).is_err());
        assert_eq!(b.write_zeroes(5 << 20, 4096, false, false, false), Err(Errno::Io));
        assert!(b.cache(5 << 20, 4096).is_err());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20, "nothing extended the file");
        // What is left is still served.
        let mut got = vec![0u8; 4096];
        b.read_at(&mut got, 0).unwrap();
        assert_eq!(got, vec![7u8; 4096]);
        assert_eq!(b.allocation(0, 4 << 20, 100).unwrap(), vec![(4 << 20, false)]);
    }

    #[test]
    fn a_short_read_makes_the_image_be_looked_at() {
        let (_d, p) = image(1 << 20);
        let b = Backend::open(&p, false, false).unwrap();
        File::options().write(true).open(&p).unwrap().set_len(4096).unwrap();
        assert!(b.read_at(&mut [0u8; 4096], 8192).is_err());
        assert_eq!(b.watch().valid_end(), 4096);
    }

    #[test]
    fn a_replaced_or_removed_image_fails_everything() {
        let (d, p) = image(1 << 20);
        let b = Backend::open(&p, false, false).unwrap();
        b.recheck();
        assert!(b.watch().change().is_none(), "an unchanged image is not a change");
        let other = d.path().join("other");
        File::create(&other).unwrap().set_len(2 << 20).unwrap();
        std::fs::rename(&other, &p).unwrap();
        b.recheck();
        let c = b.watch().change().expect("the replacement is recorded");
        assert_eq!((c.kind, c.now_bytes, c.valid_bytes), (ImageChangeKind::Replaced, Some(2 << 20), 0));
        assert_eq!(b.check(0, 1), Err(Errno::Io));

        let (_d, p) = image(1 << 20);
        let b = Backend::open(&p, true, false).unwrap();
        std::fs::remove_file(&p).unwrap();
        b.recheck();
        assert_eq!(b.watch().change().map(|c| c.kind), Some(ImageChangeKind::Removed));
    }

    #[test]
    fn rejects_directories() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(Backend::open(d.path(), true, false), Err(OpenError::NotAnImage { .. })));
    }
}
