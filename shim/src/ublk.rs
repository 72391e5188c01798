//! The shim as a ublk server (Linux ≥ 6.0, `ublk_drv`): the image appears as `/dev/ublkbN`,
//! served through io_uring passthrough commands, with the same backend and the same dirty
//! tracking as the NBD path (every WRITE, DISCARD and WRITE_ZEROES goes through
//! [`Export::begin_write`] / [`Export::end_write`] before it is completed).
//!
//! Control (`/dev/ublk-control`, 128-byte SQEs): ADD_DEV → SET_PARAMS (basic + discard) →
//! queue threads post FETCH_REQ for every tag → START_DEV. Each hardware queue is one thread
//! with its own ring ([`sys::Queue`]): a completed fetch hands it a request (its descriptor is
//! in the mmap'd descriptor array, its data in the tag's buffer), the thread runs it against the
//! image (READ/WRITE/FSYNC on the same ring; DISCARD and WRITE_ZEROES synchronously through
//! [`crate::backend::Backend`]) and answers with COMMIT_AND_FETCH_REQ.
//!
//! **User recovery.** Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! when the shim dies, the driver requeues what was in flight and holds new I/O instead of
//! failing it. A new shim on the same image (found by the identity it stored in the device's
//! `ublksrv_flags`, or named with `--recover ID`) takes the device back with
//! START_USER_RECOVERY → fetches → END_USER_RECOVERY; the I/O held meanwhile then completes
//! without an error.
//!
//! **Stop** (SIGTERM): flush the device, STOP_DEV (the driver drains in-flight requests through
//! the still-running queues, then aborts the fetches), join the queues, DEL_DEV.
//!
//! The unsafe core (rings, buffers lent to the kernel, the descriptor mapping) is [`sys`].

#[allow(unsafe_code)]
mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracker::WriteTicket;

use crate::export::Export;
use crate::server::Shutdown;
use sys::{Control, Event, IoDesc, Queue};

/// Default requests in flight per queue.
pub const DEFAULT_DEPTH: u16 = 64;
/// Largest request, and the size of each tag's buffer: a queue locks depth × this much memory.
pub const MAX_IO_BYTES: u32 = 256 << 10;
/// Most queues we create (the driver also caps them at the number of CPUs).
pub const MAX_QUEUES: u16 = 64;
/// How long control commands that wait for the queues (START_DEV, END_USER_RECOVERY, DEL_DEV)
/// may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a recovery waits for the dead shim's device to be quiesced by the driver.
const RECOVERY_WAIT: Duration = Duration::from_secs(10);

// include/uapi/linux/ublk_cmd.h
const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
const UBLK_S_DEV_DEAD: u16 = 0;
const UBLK_S_DEV_LIVE: u16 = 1;
const UBLK_S_DEV_QUIESCED: u16 = 2;
const UBLK_IO_OP_READ: u8 = 0;
const UBLK_IO_OP_WRITE: u8 = 1;
const UBLK_IO_OP_FLUSH: u8 = 2;
const UBLK_IO_OP_DISCARD: u8 = 3;
const UBLK_IO_OP_WRITE_ZEROES: u8 = 5;
const UBLK_IO_F_FUA: u32 = 1 << (13 - 8);
const UBLK_IO_F_NOUNMAP: u32 = 1 << (15 - 8);
const UBLK_ATTR_READ_ONLY: u32 = 1 << 0;
const UBLK_ATTR_VOLATILE_CACHE: u32 = 1 << 2;
const UBLK_ATTR_FUA: u32 = 1 << 3;
const UBLK_PARAM_TYPE_BASIC: u32 = 1 << 0;
const UBLK_PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// Largest DISCARD / WRITE_ZEROES the device accepts, in sectors (1 GiB).
const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Marks `ublksrv_flags` as written by siterep; the low 48 bits hash the image path.
const IDENTITY_MAGIC: u64 = 0x5352 << 48;

/// Why the ublk device could not be set up or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UblkError {
    #[error("the ublk driver is not available (modprobe ublk_drv; Linux 6.0 or later)")]
    NoDriver(#[source] io::Error),
    #[error("ublk {op} for device {dev_id}")]
    Command {
        op: &'static str,
        dev_id: u32,
        #[source]
        source: io::Error,
    },
    #[error("ublk device {dev_id} does not serve this image ({why})")]
    NotOurs { dev_id: u32, why: String },
    #[error("/dev/ublkb{dev_id} already serves this image (process {pid})")]
    Busy { dev_id: u32, pid: i32 },
    #[error("the image size {size} is not a multiple of the block size {block}")]
    Size { size: u64, block: u32 },
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("queue {queue} of ublk device {dev_id}")]
    Queue {
        dev_id: u32,
        queue: u16,
        #[source]
        source: io::Error,
    },
}

/// How to run the ublk device.
#[derive(Clone, Debug)]
pub struct UblkConfig {
    /// Hardware queues; `None`: one per CPU.
    pub queues: Option<u16>,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Take over this device (user recovery) instead of creating one. Without it, a device of
    /// this image left by a shim that died is recovered automatically.
    pub recover: Option<u32>,
}

impl Default for UblkConfig {
    fn default() -> Self {
        Self { queues: None, depth: DEFAULT_DEPTH, recover: None }
    }
}

/// `struct ublksrv_ctrl_dev_info`, the fields we use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DevInfo {
    nr_hw_queues: u16,
    queue_depth: u16,
    state: u16,
    max_io_buf_bytes: u32,
    dev_id: u32,
    ublksrv_pid: i32,
    flags: u64,
    ublksrv_flags: u64,
}

impl DevInfo {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; sys::DEV_INFO_LEN];
        b[0..2].copy_from_slice(&self.nr_hw_queues.to_ne_bytes());
        b[2..4].copy_from_slice(&self.queue_depth.to_ne_bytes());
        b[4..6].copy_from_slice(&self.state.to_ne_bytes());
        b[8..12].copy_from_slice(&self.max_io_buf_bytes.to_ne_bytes());
        b[12..16].copy_from_slice(&self.dev_id.to_ne_bytes());
        b[16..20].copy_from_slice(&self.ublksrv_pid.to_ne_bytes());
        b[24..32].copy_from_slice(&self.flags.to_ne_bytes());
        b[32..40].copy_from_slice(&self.ublksrv_flags.to_ne_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Self {
            nr_hw_queues: u16_at(0),
            queue_depth: u16_at(2),
            state: u16_at(4),
            max_io_buf_bytes: u32_at(8),
            dev_id: u32_at(12),
            ublksrv_pid: u32_at(16) as i32,
            flags: u64_at(24),
            ublksrv_flags: u64_at(32),
        }
    }
}

/// `struct ublk_params` with the basic and (unless read-only) discard parameters.
fn encode_params(size: u64, block_shift: u8, read_only: bool) -> Vec<u8> {
    let mut b = vec![0u8; sys::PARAMS_LEN];
    let types =
        if read_only { UBLK_PARAM_TYPE_BASIC } else { UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD };
    b[0..4].copy_from_slice(&(sys::PARAMS_LEN as u32).to_ne_bytes());
    b[4..8].copy_from_slice(&types.to_ne_bytes());
    // basic, at 8
    let mut attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
    if read_only {
        attrs |= UBLK_ATTR_READ_ONLY;
    }
    b[8..12].copy_from_slice(&attrs.to_ne_bytes());
    b[12] = block_shift; // logical_bs_shift
    b[13] = block_shift.max(12); // physical_bs_shift
    b[14] = 12; // io_opt_shift
    b[15] = block_shift; // io_min_shift
    b[16..20].copy_from_slice(&(MAX_IO_BYTES >> 9).to_ne_bytes()); // max_sectors
    b[24..32].copy_from_slice(&(size >> 9).to_ne_bytes()); // dev_sectors
                                                           // discard, at 40
    if !read_only {
        b[44..48].copy_from_slice(&(1u32 << block_shift.max(12)).to_ne_bytes()); // granularity
        b[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_ne_bytes());
        b[52..56].copy_from_slice(&MAX_DISCARD_SECTORS.to_ne_bytes()); // write zeroes
        b[56..58].copy_from_slice(&1u16.to_ne_bytes()); // max_discard_segments
    }
    b
}

/// `dev_sectors` of encoded parameters.
fn params_dev_sectors(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b[24..32].try_into().expect("8 bytes"))
}

/// The identity a device of `export`'s image carries in `ublksrv_flags`: a magic number and an
/// FNV-1a hash of the path of the open image.
fn identity(export: &Export) -> u64 {
    let fd = export.backend.raw_fd();
    let name = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| export.info.name.clone());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("siterep:{name}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    IDENTITY_MAGIC | (h & 0x0000_ffff_ffff_ffff)
}

/// Ids of the ublk devices that exist (`/sys/class/ublk-char/ublkcN`).
fn device_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/class/ublk-char") else { return Vec::new() };
    let mut ids: Vec<u32> =
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok()).collect();
    ids.sort_unstable();
    ids
}

fn alive(pid: i32) -> bool {
    pid > 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// The control device with typed commands.
struct Ctl(Control);

impl Ctl {
    fn call(
        &mut self,
        op: u32,
        dev_id: u32,
        data0: u64,
        buf: Vec<u8>,
        what: &'static str,
    ) -> Result<Vec<u8>, UblkError> {
        let (r, buf) = self.0.call(op, dev_id, data0, buf, CONTROL_TIMEOUT);
        r.map(|_| buf).map_err(|source| UblkError::Command { op: what, dev_id, source })
    }

    fn info(&mut self, dev_id: u32) -> Result<DevInfo, UblkError> {
        let b = self.call(sys::CMD_GET_DEV_INFO, dev_id, 0, vec![0; sys::DEV_INFO_LEN], "GET_DEV_INFO")?;
        Ok(DevInfo::decode(&b))
    }

    fn params(&mut self, dev_id: u32) -> Result<Vec<u8>, UblkError> {
        let mut b = vec![0u8; sys::PARAMS_LEN];
        b[0..4].copy_from_slice(&(sys::PARAMS_LEN as u32).to_ne_bytes());
        self.call(sys::CMD_GET_PARAMS, dev_id, 0, b, "GET_PARAMS")
    }

    fn delete(&mut self, dev_id: u32) -> Result<(), UblkError> {
        self.call(sys::CMD_DEL_DEV, dev_id, 0, Vec::new(), "DEL_DEV").map(drop)
    }
}

/// A running ublk device served by this process.
pub struct UblkDevice {
    ctl: Ctl,
    dev_id: u32,
    cdev: Option<Arc<File>>,
    queues: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice")
            .field("dev_id", &self.dev_id)
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// What a queue thread reports once its fetches are posted.
type Ready = Result<(), (u16, io::Error)>;

impl UblkDevice {
    /// Creates `/dev/ublkbN` for `export` (or recovers the device a dead shim of the same image
    /// left behind) and starts serving it. A queue that fails later triggers `shutdown`.
    pub fn start(
        export: Arc<Export>,
        config: &UblkConfig,
        shutdown: Arc<Shutdown>,
    ) -> Result<Self, UblkError> {
        let control = Control::open().map_err(UblkError::NoDriver)?;
        let mut ctl = Ctl(control);
        let ident = identity(&export);
        let block_shift = export.info.block_sizes.minimum.max(512).trailing_zeros() as u8;
        let size = export.info.size;
        if block_shift > 12 || !size.is_multiple_of(1 << block_shift) {
            return Err(UblkError::Size { size, block: 1 << block_shift });
        }
        let target = match config.recover {
            Some(id) => Some(id),
            None => Self::find_orphan(&mut ctl, ident)?,
        };
        match target {
            Some(id) => Self::recover(ctl, id, ident, export, shutdown),
            None => Self::create(ctl, ident, block_shift, config, export, shutdown),
        }
    }

    /// A device of this image whose shim is gone and that can be recovered; stale devices of
    /// this image that never started are deleted on the way.
    fn find_orphan(ctl: &mut Ctl, ident: u64) -> Result<Option<u32>, UblkError> {
        for id in device_ids() {
            let Ok(info) = ctl.info(id) else { continue };
            if info.ublksrv_flags != ident {
                continue;
            }
            if info.state == UBLK_S_DEV_LIVE && alive(info.ublksrv_pid) {
                return Err(UblkError::Busy { dev_id: id, pid: info.ublksrv_pid });
            }
            if info.state == UBLK_S_DEV_DEAD {
                tracing::warn!(
                    dev_id = id,
                    "deleting a ublk device of this image that a dead shim never started"
                );
                let _ = ctl.call(sys::CMD_STOP_DEV, id, 0, Vec::new(), "STOP_DEV");
                let _ = ctl.delete(id);
                continue;
            }
            if info.flags & UBLK_F_USER_RECOVERY != 0 {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    fn create(
        mut ctl: Ctl,
        ident: u64,
        block_shift: u8,
        config: &UblkConfig,
        export: Arc<Export>,
        shutdown: Arc<Shutdown>,
    ) -> Result<Self, UblkError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let queues = config.queues.unwrap_or(cpus.min(usize::from(MAX_QUEUES)) as u16).clamp(1, MAX_QUEUES);
        let want = DevInfo {
            nr_hw_queues: queues,
            queue_depth: config.depth.clamp(1, 4096),
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: u32::MAX,
            ublksrv_pid: -1,
            flags: UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE | UBLK_F_CMD_IOCTL_ENCODE,
            ublksrv_flags: ident,
            ..DevInfo::default()
        };
        let got = ctl.call(sys::CMD_ADD_DEV, u32::MAX, 0, want.encode(), "ADD_DEV")?;
        let info = DevInfo::decode(&got);
        let dev_id = info.dev_id;
        if info.flags & UBLK_F_USER_RECOVERY == 0 {
            tracing::warn!(
                dev_id,
                "the ublk driver refused user recovery: a crash of the shim will fail I/O"
            );
        }
        let mut dev =
            Self { ctl, dev_id, cdev: None, queues: Vec::new(), stopping: Arc::new(AtomicBool::new(false)) };
        let started = (|| {
            let params = encode_params(export.info.size, block_shift, export.info.read_only);
            dev.ctl.call(sys::CMD_SET_PARAMS, dev_id, 0, params, "SET_PARAMS")?;
            dev.spawn_queues(&info, &export, &shutdown)?;
            let pid = u64::from(std::process::id());
            dev.ctl.call(sys::CMD_START_DEV, dev_id, pid, Vec::new(), "START_DEV").map(drop)
        })();
        if let Err(e) = started {
            dev.teardown();
            return Err(e);
        }
        tracing::info!(
            device = %dev.block_device().display(),
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            max_io = info.max_io_buf_bytes,
            "started the ublk device"
        );
        Ok(dev)
    }

    fn recover(
        mut ctl: Ctl,
        dev_id: u32,
        ident: u64,
        export: Arc<Export>,
        shutdown: Arc<Shutdown>,
    ) -> Result<Self, UblkError> {
        let info = ctl.info(dev_id)?;
        if info.ublksrv_flags != ident {
            return Err(UblkError::NotOurs { dev_id, why: "it was created for another image".into() });
        }
        if info.flags & UBLK_F_USER_RECOVERY == 0 {
            return Err(UblkError::NotOurs { dev_id, why: "it was created without user recovery".into() });
        }
        if info.state == UBLK_S_DEV_LIVE && alive(info.ublksrv_pid) {
            return Err(UblkError::Busy { dev_id, pid: info.ublksrv_pid });
        }
        let sectors = params_dev_sectors(&ctl.params(dev_id)?);
        if sectors != export.info.size >> 9 {
            return Err(UblkError::NotOurs {
                dev_id,
                why: format!("it has {} bytes, the image {}", sectors << 9, export.info.size),
            });
        }
        tracing::warn!(
            dev_id,
            old_pid = info.ublksrv_pid,
            "recovering the ublk device a dead shim left behind"
        );
        // The driver quiesces the device once the old process is gone and its rings are torn
        // down; until then START_USER_RECOVERY is refused with EBUSY.
        let deadline = Instant::now() + RECOVERY_WAIT;
        loop {
            let (r, _) = ctl.0.call(sys::CMD_START_USER_RECOVERY, dev_id, 0, Vec::new(), CONTROL_TIMEOUT);
            match r {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(source) => return Err(UblkError::Command { op: "START_USER_RECOVERY", dev_id, source }),
            }
        }
        let mut dev =
            Self { ctl, dev_id, cdev: None, queues: Vec::new(), stopping: Arc::new(AtomicBool::new(false)) };
        let recovered = (|| {
            dev.spawn_queues(&info, &export, &shutdown)?;
            let pid = u64::from(std::process::id());
            dev.ctl.call(sys::CMD_END_USER_RECOVERY, dev_id, pid, Vec::new(), "END_USER_RECOVERY").map(drop)
        })();
        if let Err(e) = recovered {
            // Leave the device in recovery for the next attempt: stop our queues only.
            dev.stopping.store(true, Ordering::SeqCst);
            dev.cdev = None;
            return Err(e);
        }
        let state = dev.ctl.info(dev_id).map(|i| i.state).unwrap_or(UBLK_S_DEV_QUIESCED);
        tracing::info!(device = %dev.block_device().display(), queues = info.nr_hw_queues, live = state == UBLK_S_DEV_LIVE, "recovered the ublk device");
        Ok(dev)
    }

    /// Opens `/dev/ublkcN` and starts one thread per queue; returns once every queue has
    /// posted its fetches.
    fn spawn_queues(
        &mut self,
        info: &DevInfo,
        export: &Arc<Export>,
        shutdown: &Arc<Shutdown>,
    ) -> Result<(), UblkError> {
        let dev_id = self.dev_id;
        let path = PathBuf::from(format!("/dev/ublkc{dev_id}"));
        // devtmpfs creates the node with the device; udev may still be adjusting it.
        let deadline = Instant::now() + Duration::from_secs(5);
        let cdev = loop {
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => break Arc::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => return Err(UblkError::Open { path, source }),
            }
        };
        self.cdev = Some(cdev.clone());
        let (tx, rx) = mpsc::channel::<Ready>();
        let max_io = info.max_io_buf_bytes as usize;
        for q in 0..info.nr_hw_queues {
            let (cdev, export, shutdown, stopping, tx) =
                (cdev.clone(), export.clone(), shutdown.clone(), self.stopping.clone(), tx.clone());
            let depth = info.queue_depth;
            let t = std::thread::Builder::new()
                .name(format!("ublk-q{q}"))
                .spawn(move || {
                    let queue = match Queue::new(&cdev, q, depth, max_io) {
                        Ok(queue) => queue,
                        Err(e) => {
                            let _ = tx.send(Err((q, e)));
                            return;
                        }
                    };
                    let r = serve_queue(queue, &export, &tx);
                    drop(cdev);
                    match r {
                        Ok(()) if stopping.load(Ordering::SeqCst) => {
                            tracing::debug!(queue = q, "ublk queue stopped")
                        }
                        Ok(()) => {
                            tracing::error!(
                                queue = q,
                                dev_id,
                                "the driver ended ublk queue {q}; shutting down"
                            );
                            shutdown.trigger();
                        }
                        Err(e) => {
                            let _ = tx.send(Err((q, io::Error::new(e.kind(), e.to_string()))));
                            tracing::error!(queue = q, dev_id, "ublk queue {q} failed: {e}; shutting down");
                            shutdown.trigger();
                        }
                    }
                })
                .map_err(|source| UblkError::Queue { dev_id, queue: q, source })?;
            self.queues.push(t);
        }
        drop(tx);
        for _ in 0..info.nr_hw_queues {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err((queue, source))) => return Err(UblkError::Queue { dev_id, queue, source }),
                Err(_) => {
                    return Err(UblkError::Queue {
                        dev_id,
                        queue: 0,
                        source: io::Error::other("a queue thread died"),
                    })
                }
            }
        }
        Ok(())
    }

    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// `/dev/ublkbN`.
    pub fn block_device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Stops the queues and deletes the device (after a failed start).
    fn teardown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.ctl.call(sys::CMD_STOP_DEV, self.dev_id, 0, Vec::new(), "STOP_DEV");
        for t in self.queues.drain(..) {
            let _ = t.join();
        }
        self.cdev = None;
        if let Err(e) = self.ctl.delete(self.dev_id) {
            tracing::warn!("deleting ublk device {}: {e}", self.dev_id);
        }
    }

    /// Flushes the device, stops it (the driver drains in-flight requests through the queues),
    /// and deletes it.
    pub fn stop(mut self) -> Result<(), UblkError> {
        let path = self.block_device();
        match File::open(&path) {
            Ok(f) => {
                if let Err(e) = f.sync_all() {
                    tracing::warn!("flushing {} before stopping it: {e}", path.display());
                }
            }
            Err(e) => tracing::warn!("opening {} to flush it: {e}", path.display()),
        }
        self.stopping.store(true, Ordering::SeqCst);
        self.ctl.call(sys::CMD_STOP_DEV, self.dev_id, 0, Vec::new(), "STOP_DEV")?;
        for t in self.queues.drain(..) {
            let _ = t.join();
        }
        // DEL_DEV waits until the character device is released.
        self.cdev = None;
        self.ctl.delete(self.dev_id)?;
        tracing::info!(device = %path.display(), "stopped and deleted the ublk device");
        Ok(())
    }
}

/// What a tag is doing with the image.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Read { offset: u64, len: usize, done: usize },
    Write { offset: u64, len: usize, done: usize, fua: bool, ticket: Option<WriteTicket> },
    Flush,
}

fn neg_errno(e: &io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// Runs one queue until the driver retires all its tags (device stopped) or the ring fails.
fn serve_queue(mut q: Queue, export: &Export, ready: &mpsc::Sender<Ready>) -> io::Result<()> {
    q.fetch_all()?;
    q.submit()?;
    let _ = ready.send(Ok(()));
    let mut events = Vec::with_capacity(usize::from(q.depth()));
    let mut pending: Vec<Option<Pending>> = vec![None; usize::from(q.depth())];
    loop {
        events.clear();
        q.wait(&mut events)?;
        for ev in events.drain(..) {
            match ev {
                Event::Request { tag, desc } => start_request(&mut q, export, &mut pending, tag, desc)?,
                Event::Image { tag, res } => image_done(&mut q, export, &mut pending, tag, res)?,
                Event::Retired { tag, res } => {
                    if res != -libc::ENODEV {
                        tracing::warn!(tag, "ublk fetch ended with {}", io::Error::from_raw_os_error(-res));
                    }
                }
            }
        }
        if q.all_retired() && q.idle() {
            return Ok(());
        }
    }
}

/// Validates a request and starts it: READ/WRITE/FLUSH on the ring, the rest synchronously.
fn start_request(
    q: &mut Queue,
    export: &Export,
    pending: &mut [Option<Pending>],
    tag: u16,
    desc: IoDesc,
) -> io::Result<()> {
    let backend = &export.backend;
    let fd = backend.raw_fd();
    let offset = desc.start_sector.saturating_mul(512);
    let len = desc.nr_sectors as usize * 512;
    let fua = desc.flags & UBLK_IO_F_FUA != 0;
    // Invariant 4: the driver's numbers are checked before they reach the image.
    let in_range = offset.checked_add(len as u64).is_some_and(|end| end <= export.info.size);
    let writes = matches!(desc.op, UBLK_IO_OP_WRITE | UBLK_IO_OP_DISCARD | UBLK_IO_OP_WRITE_ZEROES);
    if desc.op != UBLK_IO_OP_FLUSH && (!in_range || (len > q.max_io() && desc.op <= UBLK_IO_OP_WRITE)) {
        return q.commit(tag, -libc::EINVAL);
    }
    if writes && export.info.read_only {
        return q.commit(tag, -libc::EROFS);
    }
    match desc.op {
        UBLK_IO_OP_READ | UBLK_IO_OP_WRITE if len == 0 => q.commit(tag, 0),
        UBLK_IO_OP_READ => {
            if let Err(e) = backend.check(offset, len as u64) {
                return q.commit(tag, -(e as i32));
            }
            pending[usize::from(tag)] = Some(Pending::Read { offset, len, done: 0 });
            q.read(tag, fd, offset, len, 0)
        }
        UBLK_IO_OP_WRITE => {
            // Invariant 1: the extent is dirty before the write can complete (a quiesced disk
            // refuses it).
            let ticket = match export.begin_write(offset, len as u64) {
                Ok(t) => t,
                Err(e) => return q.commit(tag, -(e as i32)),
            };
            pending[usize::from(tag)] = Some(Pending::Write { offset, len, done: 0, fua, ticket });
            q.write(tag, fd, offset, len, 0, fua)
        }
        UBLK_IO_OP_FLUSH => {
            pending[usize::from(tag)] = Some(Pending::Flush);
            q.fsync(tag, fd)
        }
        UBLK_IO_OP_DISCARD => {
            let ticket = match export.begin_write(offset, len as u64) {
                Ok(t) => t,
                Err(e) => return q.commit(tag, -(e as i32)),
            };
            let r = backend.trim(offset, len as u64, fua);
            export.end_write(ticket, offset, len as u64, matches!(r, Ok(true)));
            q.commit(tag, r.map_or_else(|e| neg_errno(&e), |_| 0))
        }
        UBLK_IO_OP_WRITE_ZEROES => {
            let no_hole = desc.flags & UBLK_IO_F_NOUNMAP != 0;
            let ticket = match export.begin_write(offset, len as u64) {
                Ok(t) => t,
                Err(e) => return q.commit(tag, -(e as i32)),
            };
            let r = backend.write_zeroes(offset, len as u64, no_hole, false, fua);
            export.end_write(ticket, offset, len as u64, r.is_ok());
            q.commit(tag, r.map_or_else(|e| -(e as i32), |_| 0))
        }
        _ => q.commit(tag, -libc::EOPNOTSUPP),
    }
}

/// An image operation of `tag` completed with `res`: continue a short transfer, or finish the
/// request and commit it.
fn image_done(
    q: &mut Queue,
    export: &Export,
    pending: &mut [Option<Pending>],
    tag: u16,
    res: i32,
) -> io::Result<()> {
    let fd = export.backend.raw_fd();
    let slot = &mut pending[usize::from(tag)];
    let Some(p) = slot.as_mut() else {
        tracing::error!(tag, "image completion for a tag with nothing pending");
        return Ok(());
    };
    match p {
        Pending::Read { offset, len, done } => {
            let (offset, len) = (*offset, *len);
            if res > 0 {
                *done += res as usize;
                if *done < len {
                    let skip = *done;
                    return q.read(tag, fd, offset, len, skip);
                }
            }
            *slot = None;
            let result = match res {
                r if r < 0 => r,
                0 => {
                    // The image ended early: it shrank under us; look at it now.
                    export.backend.recheck();
                    -libc::EIO
                }
                _ => match export.after_read(q.buffer(tag, len), offset) {
                    Ok(()) => len as i32,
                    Err(e) => neg_errno(&e),
                },
            };
            q.commit(tag, result)
        }
        Pending::Write { offset, len, done, fua, ticket } => {
            let (offset, len, fua, ticket) = (*offset, *len, *fua, *ticket);
            if res > 0 {
                *done += res as usize;
                if *done < len {
                    let skip = *done;
                    return q.write(tag, fd, offset, len, skip, fua);
                }
            }
            *slot = None;
            // Marked (over-reported) even when the write failed: it may have partly landed.
            export.end_write(ticket, offset, len as u64, false);
            q.commit(
                tag,
                if res > 0 {
                    len as i32
                } else if res == 0 {
                    -libc::EIO
                } else {
                    res
                },
            )
        }
        Pending::Flush => {
            *slot = None;
            q.commit(tag, res.min(0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_info_round_trips() {
        let info = DevInfo {
            nr_hw_queues: 2,
            queue_depth: 64,
            state: UBLK_S_DEV_QUIESCED,
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: 7,
            ublksrv_pid: -1,
            flags: UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE,
            ublksrv_flags: IDENTITY_MAGIC | 42,
        };
        let b = info.encode();
        assert_eq!(b.len(), 64);
        assert_eq!(DevInfo::decode(&b), info);
    }

    #[test]
    fn params_layout_matches_the_uapi() {
        let p = encode_params(1 << 30, 9, false);
        assert_eq!(p.len(), 112);
        assert_eq!(u32::from_ne_bytes(p[0..4].try_into().unwrap()), 112);
        assert_eq!(
            u32::from_ne_bytes(p[4..8].try_into().unwrap()),
            UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!((p[12], p[13]), (9, 12));
        assert_eq!(u32::from_ne_bytes(p[16..20].try_into().unwrap()), MAX_IO_BYTES >> 9);
        assert_eq!(params_dev_sectors(&p), (1 << 30) >> 9);
        assert_eq!(u32::from_ne_bytes(p[44..48].try_into().unwrap()), 4096);
        assert_eq!(u16::from_ne_bytes(p[56..58].try_into().unwrap()), 1);
        let ro = encode_params(1 << 30, 12, true);
        assert_eq!(u32::from_ne_bytes(ro[4..8].try_into().unwrap()), UBLK_PARAM_TYPE_BASIC);
        assert!(u32::from_ne_bytes(ro[8..12].try_into().unwrap()) & UBLK_ATTR_READ_ONLY != 0);
        assert!(ro[40..60].iter().all(|&b| b == 0));
    }

    #[test]
    fn command_numbers_use_the_ioctl_encoding() {
        // Values of UBLK_U_CMD_* / UBLK_U_IO_* as the kernel headers compute them.
        assert_eq!(sys::CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(sys::CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(sys::CMD_END_USER_RECOVERY, 0xc020_7511);
    }
}
