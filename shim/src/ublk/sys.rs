//! The unsafe core of the ublk server: everything that lends memory to the kernel.
//!
//! - [`Control`]: `/dev/ublk-control` with a 128-byte-SQE io_uring. A control command lends
//!   the kernel one buffer (device info, parameters) through the command's `addr`; [`Control::call`]
//!   does not give the buffer back before the command's completion has been reaped, and leaks it
//!   if the ring fails so badly that the completion can no longer be awaited.
//! - [`Queue`]: one hardware queue of a ublk device, driven by one thread and its own io_uring.
//!   It owns the queue's I/O buffers (one per tag), the read-only mapping of the kernel's
//!   I/O descriptor array, and a state per tag that says who owns that tag's buffer:
//!
//!   | state      | owner  | how it is entered                                    |
//!   |------------|--------|------------------------------------------------------|
//!   | `Kernel`   | kernel | FETCH_REQ / COMMIT_AND_FETCH_REQ submitted           |
//!   | `Serving`  | us     | that command completed: the tag carries a request    |
//!   | `Image`    | kernel | a READ/WRITE/FSYNC on the image submitted for it     |
//!   | `Retired`  | us     | the command completed with an error (device stopping)|
//!
//!   The kernel copies a WRITE request's data into the buffer before completing the fetch, and
//!   copies a READ request's data out of it while it handles the COMMIT_AND_FETCH; between
//!   those points (`Serving`) it does not touch the buffer, and the I/O descriptor of the tag is
//!   stable. [`Queue::buffer`] hands out a tag's buffer only in `Serving`. Buffers and the
//!   mapping are released only when no command or image operation is in flight; otherwise
//!   (a thread that gives up on a broken ring) they are leaked.
//!
//! Struct layouts and command numbers: `include/uapi/linux/ublk_cmd.h` (Linux 6.12). Commands
//! use the ioctl encoding (`UBLK_U_*`, the driver's `UBLK_F_CMD_IOCTL_ENCODE`); drivers that
//! predate it only know the legacy numbers, which this server does not send.

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Size of `struct ublksrv_ctrl_dev_info`.
pub const DEV_INFO_LEN: usize = 64;
/// Size of `struct ublk_params` (basic, discard, devt, zoned).
pub const PARAMS_LEN: usize = 112;
/// Size of `struct ublksrv_io_desc`.
const IO_DESC_LEN: usize = 24;
/// The per-queue stride of the descriptor mapping: room for UBLK_MAX_QUEUE_DEPTH descriptors.
const MAX_QUEUE_DEPTH: usize = 4096;
const PAGE: usize = 4096;

const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_RW: u32 = 3;
/// `struct ublksrv_ctrl_cmd` is 32 bytes, `struct ublksrv_io_cmd` 16.
pub const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, 32);
pub const CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, 32);
pub const CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, 32);
pub const CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, 32);
pub const CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, 32);
pub const CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, 32);
pub const CMD_GET_PARAMS: u32 = ioc(IOC_READ, 0x09, 32);
pub const CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, 32);
pub const CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, 32);
const IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, 16);
const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, 16);

/// `/dev/ublk-control` and the ring its commands go through.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    next: u64,
}

impl Control {
    pub fn open() -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/ublk-control")?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Self { file, ring, next: 1 })
    }

    /// Runs control command `op` for device `dev_id` and returns its result (negative errno
    /// as an error). `buf` is lent to the kernel (`addr`/`len`) and given back with the result;
    /// `data0` is the inline `data[0]`. A command still running after `timeout` is cancelled
    /// (the driver's waits are interruptible) and reported as `TimedOut`.
    pub fn call(
        &mut self,
        op: u32,
        dev_id: u32,
        data0: u64,
        mut buf: Vec<u8>,
        timeout: Duration,
    ) -> (io::Result<i32>, Vec<u8>) {
        let ud = self.next;
        self.next += 2;
        let mut cmd = [0u8; 80];
        cmd[0..4].copy_from_slice(&dev_id.to_ne_bytes());
        cmd[4..6].copy_from_slice(&u16::MAX.to_ne_bytes()); // queue_id: not a queue command
        cmd[6..8].copy_from_slice(&(buf.len() as u16).to_ne_bytes());
        let addr = if buf.is_empty() { 0 } else { buf.as_mut_ptr() as u64 };
        cmd[8..16].copy_from_slice(&addr.to_ne_bytes());
        cmd[16..24].copy_from_slice(&data0.to_ne_bytes());
        let sqe =
            opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(cmd).build().user_data(ud);
        // The command lends the kernel `buf` (addr/len above; the 80-byte command itself is
        // copied into the SQE). `buf` is a heap allocation owned by this call: it is returned
        // only after the command's completion (user data `ud`) has been reaped below, and
        // leaked if the ring breaks before that.
        // SAFETY: the kernel never sees freed memory through this SQE.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // The ring holds one command at a time: a full queue means a bug, nothing in flight.
            return (Err(io::Error::other("ublk control ring is full")), buf);
        }
        let deadline = Instant::now() + timeout;
        let mut cancelled: Option<Instant> = None;
        loop {
            let wait = match cancelled {
                Some(_) => Duration::from_secs(1),
                None => deadline.saturating_duration_since(Instant::now()),
            };
            let ts = types::Timespec::new().sec(wait.as_secs()).nsec(wait.subsec_nanos());
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    // The completion can no longer be awaited: the kernel may still write `buf`.
                    std::mem::forget(buf);
                    return (Err(e), Vec::new());
                }
            }
            let mut result = None;
            for cqe in self.ring.completion() {
                if cqe.user_data() == ud {
                    result = Some(cqe.result());
                }
            }
            let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "ublk control command timed out");
            if let Some(res) = result {
                let r = if cancelled.is_some() && (res == -libc::EINTR || res == -libc::ECANCELED) {
                    Err(timed_out())
                } else if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res)
                };
                return (r, buf);
            }
            match cancelled {
                None if Instant::now() >= deadline => {
                    cancelled = Some(Instant::now());
                    let cancel = opcode::AsyncCancel::new(ud).build().user_data(ud + 1);
                    // SAFETY: a cancel request references no memory.
                    let _ = unsafe { self.ring.submission().push(&cancel.into()) };
                }
                // Some driver waits cannot be interrupted (STOP_DEV draining requests). A
                // command that was lent no memory can be abandoned; one that was must be waited
                // for, or its buffer would be freed under the kernel.
                Some(at) if buf.is_empty() && at.elapsed() >= Duration::from_secs(5) => {
                    return (Err(timed_out()), buf);
                }
                _ => {}
            }
        }
    }
}

/// One request as the kernel describes it (`struct ublksrv_io_desc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoDesc {
    pub op: u8,
    pub flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
}

/// What a queue's ring reported.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    /// The tag carries a request; its buffer is ours until [`Queue::commit`].
    Request { tag: u16, desc: IoDesc },
    /// The tag's fetch ended with `res` (UBLK_IO_RES_ABORT = -ENODEV when the device stops):
    /// the kernel will not use it again.
    Retired { tag: u16, res: i32 },
    /// The image operation submitted for the tag completed with `res`.
    Image { tag: u16, res: i32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TagState {
    Kernel,
    Serving,
    Image,
    Retired,
}

const UD_IMAGE: u64 = 1 << 16;

/// The read-only mapping of one queue's I/O descriptors.
struct DescMap {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

/// Per-tag I/O buffers of one queue: `depth` buffers of `max_io` bytes, page-aligned.
struct Buffers {
    ptr: NonNull<u8>,
    layout: Layout,
    max_io: usize,
}

/// One hardware queue: its ring, buffers, descriptor mapping and tag states.
pub struct Queue {
    ring: IoUring,
    cdev: RawFd,
    q_id: u16,
    descs: DescMap,
    bufs: Buffers,
    state: Vec<TagState>,
    /// SQEs pushed whose completion has not been reaped.
    inflight: usize,
}

// SAFETY: the raw pointers in `Queue` (the descriptor mapping and the buffers) are owned by it
// alone; moving it to the thread that drives it moves that ownership along.
unsafe impl Send for Queue {}

impl Queue {
    /// Maps queue `q_id` of the device open at `cdev` (`/dev/ublkcN`) and allocates its
    /// buffers. `cdev` must stay open as long as the queue lives.
    pub fn new(cdev: &File, q_id: u16, depth: u16, max_io: usize) -> io::Result<Self> {
        let depth_n = usize::from(depth);
        if depth_n == 0 || depth_n > MAX_QUEUE_DEPTH || max_io == 0 || !max_io.is_multiple_of(PAGE) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad ublk queue geometry"));
        }
        let entries = (2 * u32::from(depth)).next_power_of_two().max(8);
        let ring = IoUring::builder().setup_cqsize(2 * entries).build(entries)?;
        let len = (depth_n * IO_DESC_LEN).div_ceil(PAGE) * PAGE;
        let stride = (MAX_QUEUE_DEPTH * IO_DESC_LEN).div_ceil(PAGE) * PAGE;
        let offset = i64::try_from(usize::from(q_id) * stride).map_err(io::Error::other)?;
        // A fresh shared read-only mapping of the driver's descriptor array for this queue (the
        // driver refuses writable mappings); it is unmapped only in `Drop`, after the last use
        // through `self.descs`.
        // SAFETY: nothing else maps this address range, and it outlives every use.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(len).expect("non-zero"),
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_SHARED | nix::sys::mman::MapFlags::MAP_POPULATE,
                cdev.as_fd(),
                offset,
            )
        }?;
        let descs = DescMap { ptr, len };
        let size = depth_n.checked_mul(max_io).ok_or_else(|| io::Error::other("ublk buffers overflow"))?;
        let layout = Layout::from_size_align(size, PAGE).map_err(io::Error::other)?;
        // SAFETY: `layout` has a non-zero size (depth and max_io are non-zero).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            // SAFETY: the mapping was created above and nothing uses it yet.
            let _ = unsafe { nix::sys::mman::munmap(descs.ptr, descs.len) };
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        Ok(Self {
            ring,
            cdev: cdev.as_raw_fd(),
            q_id,
            descs,
            bufs: Buffers { ptr, layout, max_io },
            state: vec![TagState::Retired; depth_n],
            inflight: 0,
        })
    }

    pub fn depth(&self) -> u16 {
        self.state.len() as u16
    }

    /// Size of each tag's buffer: the largest READ or WRITE the queue can take.
    pub fn max_io(&self) -> usize {
        self.bufs.max_io
    }

    fn buf_addr(&self, tag: u16) -> u64 {
        self.bufs.ptr.as_ptr() as u64 + (usize::from(tag) * self.bufs.max_io) as u64
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        loop {
            // Every SQE built by this queue points at memory the queue owns (a tag's buffer,
            // which the state machine has given to the kernel) or at none at all.
            // SAFETY: the buffers outlive every completion (see the module documentation).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                self.inflight += 1;
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn io_cmd(&mut self, op: u32, tag: u16, result: i32) -> io::Result<()> {
        let mut cmd = [0u8; 16];
        cmd[0..2].copy_from_slice(&self.q_id.to_ne_bytes());
        cmd[2..4].copy_from_slice(&tag.to_ne_bytes());
        cmd[4..8].copy_from_slice(&result.to_ne_bytes());
        cmd[8..16].copy_from_slice(&self.buf_addr(tag).to_ne_bytes());
        let sqe =
            opcode::UringCmd16::new(types::Fd(self.cdev), op).cmd(cmd).build().user_data(u64::from(tag));
        self.state[usize::from(tag)] = TagState::Kernel;
        self.push(sqe)
    }

    /// Posts FETCH_REQ for every tag: the queue starts taking requests.
    pub fn fetch_all(&mut self) -> io::Result<()> {
        for tag in 0..self.depth() {
            self.io_cmd(IO_FETCH_REQ, tag, 0)?;
        }
        Ok(())
    }

    /// Completes the request of `tag` with `result` (bytes done, or a negative errno) and asks
    /// for the next one.
    pub fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
        assert_eq!(
            self.state[usize::from(tag)],
            TagState::Serving,
            "commit of tag {tag} that is not serving"
        );
        self.io_cmd(IO_COMMIT_AND_FETCH_REQ, tag, result)
    }

    /// The buffer of a tag that carries a request, `len` bytes.
    pub fn buffer(&mut self, tag: u16, len: usize) -> &mut [u8] {
        assert_eq!(
            self.state[usize::from(tag)],
            TagState::Serving,
            "buffer of tag {tag} that is not serving"
        );
        assert!(len <= self.bufs.max_io);
        // While the tag is `Serving` neither the kernel nor another tag touches its buffer; the
        // returned borrow of `self` prevents submitting anything for the tag while it lives.
        // SAFETY: the range is inside the allocation (tag < depth, len <= max_io) and unaliased.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.bufs.ptr.as_ptr().add(usize::from(tag) * self.bufs.max_io),
                len,
            )
        }
    }

    /// Reads `[offset+skip, offset+len)` of the image at `fd` into the tag's buffer at `skip`.
    pub fn read(&mut self, tag: u16, fd: RawFd, offset: u64, len: usize, skip: usize) -> io::Result<()> {
        self.image_op(tag, len, skip, |addr, n| {
            opcode::Read::new(types::Fd(fd), addr, n).offset(offset + skip as u64).build()
        })
    }

    /// Writes the tag's buffer `[skip, len)` to the image at `fd`, at `offset+skip`; with `dsync`,
    /// durably (RWF_DSYNC).
    pub fn write(
        &mut self,
        tag: u16,
        fd: RawFd,
        offset: u64,
        len: usize,
        skip: usize,
        dsync: bool,
    ) -> io::Result<()> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        self.image_op(tag, len, skip, |addr, n| {
            opcode::Write::new(types::Fd(fd), addr, n).offset(offset + skip as u64).rw_flags(flags).build()
        })
    }

    /// fdatasync of the image at `fd` on behalf of `tag`.
    pub fn fsync(&mut self, tag: u16, fd: RawFd) -> io::Result<()> {
        assert_eq!(self.state[usize::from(tag)], TagState::Serving);
        self.state[usize::from(tag)] = TagState::Image;
        let sqe = opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build();
        self.push(sqe.user_data(UD_IMAGE | u64::from(tag)))
    }

    fn image_op(
        &mut self,
        tag: u16,
        len: usize,
        skip: usize,
        build: impl FnOnce(*mut u8, u32) -> squeue::Entry,
    ) -> io::Result<()> {
        assert_eq!(self.state[usize::from(tag)], TagState::Serving);
        assert!(skip < len && len <= self.bufs.max_io);
        self.state[usize::from(tag)] = TagState::Image;
        let addr = (self.buf_addr(tag) + skip as u64) as *mut u8;
        let sqe = build(addr, (len - skip) as u32);
        self.push(sqe.user_data(UD_IMAGE | u64::from(tag)))
    }

    /// Hands what is queued to the kernel without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued, waits for at least one completion, and appends what completed.
    pub fn wait(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in cqes {
            self.inflight -= 1;
            let tag = (ud & 0xffff) as u16;
            let Some(state) = self.state.get_mut(usize::from(tag)) else { continue };
            if ud & UD_IMAGE != 0 {
                *state = TagState::Serving;
                out.push(Event::Image { tag, res });
            } else if res == 0 {
                *state = TagState::Serving;
                let desc = self.desc(tag);
                out.push(Event::Request { tag, desc });
            } else {
                *state = TagState::Retired;
                out.push(Event::Retired { tag, res });
            }
        }
        Ok(())
    }

    /// The descriptor of `tag`, read when its fetch completed.
    fn desc(&self, tag: u16) -> IoDesc {
        let off = usize::from(tag) * IO_DESC_LEN;
        assert!(off + IO_DESC_LEN <= self.descs.len);
        let mut raw = [0u8; IO_DESC_LEN];
        // The driver writes the descriptor of a tag before completing the command that hands
        // the tag to us and does not write it again until we commit; the reads are volatile
        // because the memory is shared with the kernel.
        // SAFETY: `off` is inside the mapping (checked above) and no write races this read.
        unsafe {
            let src = (self.descs.ptr.as_ptr() as *const u8).add(off);
            for (i, b) in raw.iter_mut().enumerate() {
                *b = std::ptr::read_volatile(src.add(i));
            }
        }
        let op_flags = u32::from_ne_bytes(raw[0..4].try_into().expect("4 bytes"));
        IoDesc {
            op: (op_flags & 0xff) as u8,
            flags: op_flags >> 8,
            nr_sectors: u32::from_ne_bytes(raw[4..8].try_into().expect("4 bytes")),
            start_sector: u64::from_ne_bytes(raw[8..16].try_into().expect("8 bytes")),
        }
    }

    /// Whether nothing is in flight: every tag is retired or ours.
    pub fn idle(&self) -> bool {
        self.inflight == 0
    }

    /// Whether every tag has been retired by the kernel.
    pub fn all_retired(&self) -> bool {
        self.state.iter().all(|s| *s == TagState::Retired)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.inflight > 0 {
            // The kernel may still write the buffers or read through the mapping's pages; the
            // process is going down anyway (a queue only gives up on a broken ring).
            tracing::warn!(
                queue = self.q_id,
                inflight = self.inflight,
                "leaking ublk queue buffers still lent to the kernel"
            );
            return;
        }
        // SAFETY: nothing is in flight, so the kernel no longer uses the buffers; they were
        // allocated in `new` with this layout and are freed once.
        unsafe { alloc::dealloc(self.bufs.ptr.as_ptr(), self.bufs.layout) };
        // SAFETY: the mapping was created in `new`; `desc` is the only reader and needs `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.descs.ptr, self.descs.len) };
    }
}
