//! The small unsafe core outside io_uring: block-device ioctls and adopting inherited file
//! descriptors (systemd socket activation). Each call states the invariant it relies on.

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Size in bytes of the block device open at `fd`.
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    unsafe { blkgetsize64(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut size) }?;
    Ok(size)
}

/// Logical sector size of the block device open at `fd`.
pub fn block_device_sector(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    unsafe { blksszget(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut sector) }?;
    Ok(sector as u32)
}

/// Discards `[offset, offset+len)` of the block device at `fd` (BLKDISCARD).
pub fn block_discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64s through the pointer, which points at a live local.
    unsafe { blkdiscard(std::os::fd::AsRawFd::as_raw_fd(&fd), &range) }?;
    Ok(())
}

/// Zeroes `[offset, offset+len)` of the block device at `fd` (BLKZEROOUT).
pub fn block_zeroout(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64s through the pointer, which points at a live local.
    unsafe { blkzeroout(std::os::fd::AsRawFd::as_raw_fd(&fd), &range) }?;
    Ok(())
}

/// First file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Takes the sockets systemd passed by socket activation (`LISTEN_PID`/`LISTEN_FDS`), if any,
/// and clears those variables so children do not inherit them.
pub fn take_listen_fds() -> io::Result<Vec<OwnedFd>> {
    let pid_ok =
        std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok());
    let Some(count) = count.filter(|_| pid_ok) else { return Ok(Vec::new()) };
    if !(0..=64).contains(&count) {
        return Err(io::Error::other(format!("LISTEN_FDS={count} is out of range")));
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut fds = Vec::with_capacity(count as usize);
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // Check the descriptor is open before adopting it.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        // systemd passes descriptors 3..3+LISTEN_FDS open and owned by this process (LISTEN_PID
        // matched our pid); fcntl above proved it is open, and nothing else adopts these numbers.
        // SAFETY: the descriptor is open and this OwnedFd is its only owner.
        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(fds)
}

/// Marks this process as an I/O flusher (PR_SET_IO_FLUSHER) so memory reclaim does not
/// recurse into the filesystem it backs.
pub fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes scalar arguments only.
    let r = unsafe {
        libc::prctl(
            PR_SET_IO_FLUSHER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A raw syscall's return value the way io_uring reports results: `n`, or `-errno` when it
/// failed.
pub fn result(n: isize) -> isize {
    if n < 0 {
        -(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize)
    } else {
        n
    }
}
