//! Attaching the kernel's NBD driver (`/dev/nbdN`) to this server, for physical servers.
//!
//! The device is configured through the driver's generic-netlink family `nbd`
//! (`include/uapi/linux/nbd-netlink.h`), not the legacy ioctls: a netlink-configured device
//! needs no thread parked in `NBD_DO_IT`, it stays configured when the shim dies, and the next
//! shim takes it back with `NBD_CMD_RECONFIGURE` even while a filesystem on it is mounted (the
//! ioctl interface cannot: a held device refuses a second `NBD_DO_IT`).
//!
//! The kernel's connections are socket pairs: the kernel end goes to the driver in the netlink
//! message, the other end is served like any client connection that is already in the
//! transmission phase (simple replies, no structured replies or block status).
//!
//! Lifecycle, as `drivers/block/nbd.c` (Linux 6.12) implements it:
//!
//! - **attach** = `NBD_CMD_CONNECT` with the size, block size, transmission flags, a request
//!   timeout ([`REQUEST_TIMEOUT_S`]) and a backend identifier naming the image
//!   (`siterep:<path>`, shown in `/sys/block/nbdN/backend`).
//! - **crash** (SIGKILL): the kernel's ends see EOF and are marked dead. Requests issued after
//!   that fail at once with EIO (no dead-connection grace period); a request that was in flight
//!   fails once its timeout expires. Nothing hangs. The device stays configured.
//! - **reclaim**: a new shim on the same image finds the device configured with our backend
//!   identifier and its recorded process gone, and replaces the dead connections with
//!   `NBD_CMD_RECONFIGURE` (the driver only ever replaces *dead* connections, so a live shim
//!   can never be robbed of its device).
//! - **detach** (SIGTERM): flush the device, then `NBD_CMD_DISCONNECT`; the driver sends
//!   `NBD_CMD_DISC` on every connection and releases the device (its size drops to 0).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::export::{Conn, Export};
use crate::server::Server;
use nbd_proto::transmission::Session;

/// Seconds the kernel waits for a reply before it gives up on a connection (the request is
/// requeued on another live connection, else fails with EIO).
pub const REQUEST_TIMEOUT_S: u64 = 30;

/// How long a reclaim waits for the driver to notice that the dead shim's connections are gone.
const RECLAIM_WAIT: Duration = Duration::from_secs(5);

/// Why a kernel device could not be attached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    #[error("{0} is not an NBD device path (/dev/nbdN)")]
    NotNbd(PathBuf),
    #[error("the kernel NBD driver is not loaded (modprobe nbd)")]
    NoDriver,
    #[error("{device} is in use by process {pid}")]
    InUse { device: PathBuf, pid: u32 },
    #[error("{device} is configured for another backend ({backend:?}), not {ours:?}: detach it first")]
    NotOurs { device: PathBuf, backend: String, ours: String },
    #[error(
        "{device} is configured for this image but none of its connections is dead: \
         another shim is serving it"
    )]
    NothingToReclaim { device: PathBuf },
    #[error("the image size {0} is not a multiple of 512 bytes")]
    Size(u64),
    #[error("netlink {op} for {device}")]
    Netlink {
        op: &'static str,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting up the connections of {device}")]
    Io {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A `/dev/nbdN` connected to this server.
#[derive(Debug)]
pub struct KernelDevice {
    path: PathBuf,
    index: u32,
    family: u16,
    connections: usize,
}

/// Transmission flags the kernel honours for our export.
fn kernel_flags(export: &Export) -> u16 {
    use nbd_proto::consts::*;
    // The kernel does not negotiate structured replies, DF or block status.
    export.info.transmission_flags(false) & !(FLAG_SEND_DF | FLAG_SEND_FAST_ZERO)
}

/// The backend identifier of `export`'s image: `siterep:` and the path of the open file.
fn backend_identifier(export: &Export) -> String {
    let fd = export.backend.raw_fd();
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(p) => format!("siterep:{}", p.display()),
        Err(_) => format!("siterep:{}", export.info.name),
    }
}

/// `N` of `/dev/nbdN` (symlinks resolved).
fn device_index(path: &Path) -> Option<u32> {
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    real.file_name()?.to_str()?.strip_prefix("nbd")?.parse().ok()
}

fn sysfs(index: u32, attr: &str) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/{attr}")).ok().map(|s| s.trim().to_string())
}

/// The pid the driver recorded for a configured device (absent when it is unconfigured).
fn device_pid(index: u32) -> Option<u32> {
    sysfs(index, "pid")?.parse().ok()
}

/// Whether `pid` names a live (not zombie) task.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The device's size in bytes as the block layer sees it (0 when detached).
pub fn device_size(path: &Path) -> Option<u64> {
    let index = device_index(path)?;
    sysfs(index, "size")?.parse::<u64>().ok().map(|sectors| sectors * 512)
}

impl KernelDevice {
    /// Connects `path` (e.g. `/dev/nbd0`) to `export` through `connections` socket pairs,
    /// served by `server`'s engine. A device this image's shim left configured when it died is
    /// reclaimed; one owned by a live process or configured for something else is refused.
    pub fn attach(
        path: &Path,
        export: Arc<Export>,
        connections: usize,
        server: &Server,
    ) -> Result<Self, KernelError> {
        let index = device_index(path).ok_or_else(|| KernelError::NotNbd(path.to_path_buf()))?;
        let device = path.to_path_buf();
        let netlink = |op: &'static str| {
            let device = device.clone();
            move |source: io::Error| KernelError::Netlink { op, device, source }
        };
        let mut nl = genl::Socket::open().map_err(netlink("socket"))?;
        let family = nl.family(NBD_FAMILY).map_err(netlink("family lookup"))?.ok_or(KernelError::NoDriver)?;
        let size = export.info.size;
        let block = if size.is_multiple_of(4096) { 4096u64 } else { 512 };
        if !size.is_multiple_of(block) {
            return Err(KernelError::Size(size));
        }
        let block = block.max(export.info.block_sizes.minimum.into());
        let ours = backend_identifier(&export);
        let connections = connections.max(1);
        let session = Session::new(&export.info, false, false);
        let serve = |sock: UnixStream| -> Result<(), KernelError> {
            let conn = Conn { export: export.clone(), session, contexts: Vec::new() };
            server
                .spawn_transmission(OwnedFd::from(sock), conn, format!("kernel {}", path.display()))
                .map_err(|source| KernelError::Io { device: device.clone(), source })
        };
        let pairs = |n: usize| -> Result<Vec<(UnixStream, UnixStream)>, KernelError> {
            (0..n)
                .map(|_| UnixStream::pair())
                .collect::<io::Result<_>>()
                .map_err(|source| KernelError::Io { device: device.clone(), source })
        };

        if let Some(pid) = device_pid(index) {
            if alive(pid) {
                return Err(KernelError::InUse { device, pid });
            }
            let backend = sysfs(index, "backend").unwrap_or_default();
            if backend != ours {
                return Err(KernelError::NotOurs { device, backend, ours });
            }
            tracing::warn!(
                "{} was left configured by process {pid}, which is gone: reclaiming it",
                path.display()
            );
            let adopted = Self::reclaim(&mut nl, family, index, &ours, size, block, connections, &serve)
                .map_err(netlink("reconfigure"))?;
            if adopted == 0 {
                return Err(KernelError::NothingToReclaim { device });
            }
            tracing::info!(device = %path.display(), connections = adopted, "reclaimed the kernel NBD device");
            return Ok(Self { path: device, index, family, connections: adopted });
        }

        let pairs = pairs(connections)?;
        let mut msg = genl::Attrs::default();
        msg.put_u32(NBD_ATTR_INDEX, index);
        msg.put_u64(NBD_ATTR_SIZE_BYTES, size);
        msg.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block);
        msg.put_u64(NBD_ATTR_TIMEOUT, REQUEST_TIMEOUT_S);
        msg.put_u64(NBD_ATTR_SERVER_FLAGS, kernel_flags(&export).into());
        // Neither destroy nor disconnect on close: the device outlives a crashed shim.
        msg.put_u64(NBD_ATTR_CLIENT_FLAGS, 0);
        msg.put_str(NBD_ATTR_BACKEND_IDENTIFIER, &ours);
        put_sockets(&mut msg, pairs.iter().map(|(_, kernels)| kernels));
        let replies = nl.call(family, NBD_CMD_CONNECT, &msg).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                KernelError::Netlink {
                    op: "connect (the device is open or configured by someone else)",
                    device: device.clone(),
                    source,
                }
            } else {
                KernelError::Netlink { op: "connect", device: device.clone(), source }
            }
        })?;
        let got = replies
            .iter()
            .flat_map(|r| genl::attrs(r))
            .find(|(ty, _)| *ty == NBD_ATTR_INDEX)
            .and_then(|(_, v)| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)));
        if got.is_some_and(|g| g != index) {
            tracing::warn!("the driver connected nbd{} instead of nbd{index}", got.unwrap_or_default());
        }
        // The driver holds its own references to its ends now.
        for (ours_end, kernels) in pairs {
            drop(kernels);
            serve(ours_end)?;
        }
        tracing::info!(device = %path.display(), connections, block_size = block, backend = %ours, "attached the kernel NBD device");
        Ok(Self { path: device, index, family, connections })
    }

    /// Replaces the dead connections of a configured device, one socket per RECONFIGURE so we
    /// know which ones the driver took (it releases a socket it has no dead slot for, which
    /// the other end sees as a hang-up). Returns how many it adopted.
    #[allow(clippy::too_many_arguments)]
    fn reclaim(
        nl: &mut genl::Socket,
        family: u16,
        index: u32,
        ours: &str,
        size: u64,
        block: u64,
        connections: usize,
        serve: &dyn Fn(UnixStream) -> Result<(), KernelError>,
    ) -> io::Result<usize> {
        let deadline = Instant::now() + RECLAIM_WAIT;
        let mut adopted = 0;
        while adopted < connections {
            let (ours_end, kernels) = UnixStream::pair()?;
            let mut msg = genl::Attrs::default();
            msg.put_u32(NBD_ATTR_INDEX, index);
            msg.put_str(NBD_ATTR_BACKEND_IDENTIFIER, ours);
            msg.put_u64(NBD_ATTR_SIZE_BYTES, size);
            msg.put_u64(NBD_ATTR_BLOCK_SIZE_BYTES, block);
            msg.put_u64(NBD_ATTR_TIMEOUT, REQUEST_TIMEOUT_S);
            put_sockets(&mut msg, std::iter::once(&kernels));
            nl.call(family, NBD_CMD_RECONFIGURE, &msg)?;
            drop(kernels);
            // POLLHUP is reported whatever the requested events: the peer is gone.
            let mut fds = [PollFd::new(ours_end.as_fd(), PollFlags::empty())];
            let _ = poll(&mut fds, PollTimeout::ZERO);
            let refused = fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP));
            if !refused {
                adopted += 1;
                serve(ours_end).map_err(|e| io::Error::other(e.to_string()))?;
                continue;
            }
            // No dead slot: either all are replaced, or the driver has not yet seen the old
            // shim's connections close.
            if adopted > 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(adopted)
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the device's cache through to the image, then disconnects it: the driver sends
    /// `NBD_CMD_DISC` on every connection and lets the device go.
    pub fn detach(self) -> io::Result<()> {
        match OpenOptions::new().read(true).open(&self.path) {
            Ok(dev) => {
                if let Err(e) = dev.sync_all() {
                    tracing::warn!("flushing {} before detaching: {e}", self.path.display());
                }
            }
            Err(e) => tracing::warn!("opening {} to flush it: {e}", self.path.display()),
        }
        let mut nl = genl::Socket::open()?;
        let mut msg = genl::Attrs::default();
        msg.put_u32(NBD_ATTR_INDEX, self.index);
        nl.call(self.family, NBD_CMD_DISCONNECT, &msg)?;
        tracing::info!(
            device = %self.path.display(),
            connections = self.connections,
            size = ?device_size(&self.path),
            "disconnected the kernel NBD device"
        );
        Ok(())
    }
}

/// `NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD } ... }`.
fn put_sockets<'a>(msg: &mut genl::Attrs, socks: impl Iterator<Item = &'a UnixStream>) {
    let list = msg.begin_nested(NBD_ATTR_SOCKETS);
    for s in socks {
        let item = msg.begin_nested(NBD_SOCK_ITEM);
        msg.put_u32(NBD_SOCK_FD, s.as_raw_fd() as u32);
        msg.end_nested(item);
    }
    msg.end_nested(list);
}

// include/uapi/linux/nbd-netlink.h
const NBD_FAMILY: &str = "nbd";
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// A minimal generic-netlink client (`NETLINK_GENERIC`): requests with attributes, acks and
/// replies. Message layout from include/uapi/linux/netlink.h and genetlink.h; all integers
/// are in host byte order.
mod genl {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{
        bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
        SockProtocol, SockType,
    };

    const NLMSG_HDRLEN: usize = 16;
    const GENL_HDRLEN: usize = 4;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLA_F_NESTED: u16 = 1 << 15;
    const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
    const GENL_ID_CTRL: u16 = 0x10;
    const CTRL_CMD_GETFAMILY: u8 = 3;
    const CTRL_ATTR_FAMILY_ID: u16 = 1;
    const CTRL_ATTR_FAMILY_NAME: u16 = 2;
    /// Version of the nbd family (NBD_GENL_VERSION) and of the controller.
    const VERSION: u8 = 1;
    /// Largest reply we accept; ours are a few dozen bytes.
    const RECV_MAX: usize = 16 << 10;

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// Attributes of one request, encoded as they are added.
    #[derive(Default)]
    pub struct Attrs(Vec<u8>);

    impl Attrs {
        fn put(&mut self, ty: u16, payload: &[u8]) {
            let len = 4 + payload.len();
            self.0.extend_from_slice(&(len as u16).to_ne_bytes());
            self.0.extend_from_slice(&ty.to_ne_bytes());
            self.0.extend_from_slice(payload);
            self.0.resize(align4(self.0.len()), 0);
        }

        pub fn put_u32(&mut self, ty: u16, v: u32) {
            self.put(ty, &v.to_ne_bytes());
        }

        pub fn put_u64(&mut self, ty: u16, v: u64) {
            self.put(ty, &v.to_ne_bytes());
        }

        /// A NUL-terminated string.
        pub fn put_str(&mut self, ty: u16, s: &str) {
            let mut b = s.as_bytes().to_vec();
            b.push(0);
            self.put(ty, &b);
        }

        /// Opens a nested attribute; attributes put until `end_nested` go inside it.
        pub fn begin_nested(&mut self, ty: u16) -> usize {
            let at = self.0.len();
            self.0.extend_from_slice(&[0, 0]);
            self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
            at
        }

        pub fn end_nested(&mut self, at: usize) {
            let len = (self.0.len() - at) as u16;
            self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// The attributes in `buf` as (type, payload), stopping at the first malformed one.
    pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let hdr = buf.get(pos..pos + 4)?;
            let len = u16::from_ne_bytes([hdr[0], hdr[1]]) as usize;
            let ty = u16::from_ne_bytes([hdr[2], hdr[3]]) & NLA_TYPE_MASK;
            let payload = buf.get(pos + 4..pos + len.max(4))?;
            pos += align4(len.max(4));
            Some((ty, payload))
        })
    }

    pub struct Socket {
        fd: OwnedFd,
        seq: u32,
    }

    impl Socket {
        pub fn open() -> io::Result<Self> {
            let fd = socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkGeneric,
            )?;
            bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
            // The kernel answers at once; never wait forever on a lost reply.
            setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(30, 0))?;
            Ok(Self { fd, seq: 0 })
        }

        /// The id of the generic-netlink family `name`, `None` if no such family is registered.
        pub fn family(&mut self, name: &str) -> io::Result<Option<u16>> {
            let mut msg = Attrs::default();
            msg.put_str(CTRL_ATTR_FAMILY_NAME, name);
            let replies = match self.call(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &msg) {
                Ok(r) => r,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            };
            let id = replies.iter().flat_map(|r| attrs(r)).find_map(|(ty, v)| {
                (ty == CTRL_ATTR_FAMILY_ID && v.len() >= 2).then(|| u16::from_ne_bytes([v[0], v[1]]))
            });
            Ok(id)
        }

        /// Sends command `cmd` of `family` with `msg`, waits for the kernel's ack, and returns
        /// the attribute payloads of the replies that came before it.
        pub fn call(&mut self, family: u16, cmd: u8, msg: &Attrs) -> io::Result<Vec<Vec<u8>>> {
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            let len = NLMSG_HDRLEN + GENL_HDRLEN + msg.0.len();
            let mut buf = Vec::with_capacity(len);
            buf.extend_from_slice(&(len as u32).to_ne_bytes());
            buf.extend_from_slice(&family.to_ne_bytes());
            buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&[cmd, VERSION, 0, 0]);
            buf.extend_from_slice(&msg.0);
            sendto(self.fd.as_raw_fd(), &buf, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;

            let mut replies = Vec::new();
            let mut rbuf = vec![0u8; RECV_MAX];
            loop {
                let n = recv(self.fd.as_raw_fd(), &mut rbuf, MsgFlags::empty())?;
                let mut pos = 0;
                while pos + NLMSG_HDRLEN <= n {
                    let h = &rbuf[pos..n];
                    let mlen = u32::from_ne_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
                    let mtype = u16::from_ne_bytes([h[4], h[5]]);
                    let mseq = u32::from_ne_bytes(h[8..12].try_into().expect("4 bytes"));
                    if mlen < NLMSG_HDRLEN || mlen > h.len() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink message"));
                    }
                    let body = &h[NLMSG_HDRLEN..mlen];
                    pos += align4(mlen);
                    if mseq != seq {
                        continue;
                    }
                    match mtype {
                        NLMSG_ERROR => {
                            let err = body
                                .get(..4)
                                .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                                .ok_or_else(|| {
                                    io::Error::new(io::ErrorKind::InvalidData, "short netlink error message")
                                })?;
                            return if err == 0 {
                                Ok(replies)
                            } else {
                                Err(io::Error::from_raw_os_error(-err))
                            };
                        }
                        NLMSG_DONE => return Ok(replies),
                        _ => replies.push(body.get(GENL_HDRLEN..).unwrap_or_default().to_vec()),
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn attributes_round_trip_with_nesting() {
            let mut a = Attrs::default();
            a.put_u32(1, 7);
            let n = a.begin_nested(7);
            let i = a.begin_nested(1);
            a.put_u32(1, 42);
            a.end_nested(i);
            a.end_nested(n);
            a.put_str(10, "siterep:/x");
            let top: Vec<(u16, Vec<u8>)> = attrs(&a.0).map(|(t, v)| (t, v.to_vec())).collect();
            assert_eq!(top.len(), 3);
            assert_eq!(top[0], (1, 7u32.to_ne_bytes().to_vec()));
            assert_eq!(top[1].0, 7);
            let item: Vec<_> = attrs(&top[1].1).collect();
            assert_eq!(item.len(), 1);
            let fd: Vec<_> = attrs(item[0].1).collect();
            assert_eq!(fd, vec![(1, &42u32.to_ne_bytes()[..])]);
            assert_eq!(top[2], (10, b"siterep:/x\0".to_vec()));
        }

        #[test]
        fn malformed_attributes_stop_the_iterator() {
            assert_eq!(attrs(&[8, 0, 1, 0, 1]).count(), 0);
            assert_eq!(attrs(&[]).count(), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_index_parses_nbd_paths() {
        assert_eq!(device_index(Path::new("/nonexistent/nbd3")), Some(3));
        assert_eq!(device_index(Path::new("/nonexistent/sda")), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
