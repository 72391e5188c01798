//! The few system calls std does not wrap: signals, `SEEK_DATA`/`SEEK_HOLE`, statfs.
//!
//! This is the crate's only `unsafe`; each block is a plain libc call on values we own.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Sends `signal` to the process `pid`.
pub fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is a child we
    // spawned and have not yet reaped, so it cannot name a recycled process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`: `None` when the kernel answers `ENXIO`
/// (no data at or after `offset`).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek(2) only moves the file position of a descriptor that `file` owns and keeps
    // open for the duration of the call; no memory is passed.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(err)
    }
}

/// The next offset at or after `offset` that holds data, per `SEEK_DATA`.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// The next hole at or after `offset`, per `SEEK_HOLE` (end of file counts as a hole).
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

/// Whether `path` lives on a tmpfs (memory-backed: O_DIRECT only since Linux 6.6).
pub fn is_tmpfs(path: &Path) -> io::Result<bool> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut stat = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stat` points to
    // writable memory of the size statfs(2) fills; it is only read after a successful return.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it initialised the whole struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_type == libc::TMPFS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_tmpfs_agrees_with_proc_mounts() {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let (dir, fstype) = (fields[1], fields[2]);
            if matches!(dir, "/" | "/tmp" | "/var/tmp" | "/dev/shm") {
                assert_eq!(is_tmpfs(Path::new(dir)).unwrap(), fstype == "tmpfs", "{dir} is {fstype}");
            }
        }
    }
}
