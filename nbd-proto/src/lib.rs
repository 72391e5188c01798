//! The NBD protocol, sans-IO: bytes in, typed values and bytes out, and a small client.
//!
//! [`handshake`] is the server's side of the fixed-newstyle negotiation as a state machine;
//! [`transmission`] parses and validates requests into [`transmission::Command`]s and encodes
//! replies; [`option`] encodes a client's option requests. Nothing in them reads or writes a
//! socket or a disk. [`client`] is a small blocking client built on them, for the agent.
#![forbid(unsafe_code)]
// Lengths here come off the wire: a cast that truncates or drops a sign would turn a bad length
// into a plausible one. Conversions are checked (`try_from`) or provably lossless (`from`).
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

pub mod client;
pub mod consts;
pub mod handshake;
pub mod option;
pub mod transmission;

/// The largest READ or WRITE payload we accept and advertise as the maximum block size in
/// `NBD_INFO_BLOCK_SIZE`: 64 MiB, as nbdkit accepts. The spec asks every server to take 32 MiB;
/// clients that negotiate no block sizes may send more, and libnbd sends up to 64 MiB.
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The largest option payload we read into memory; longer options are discarded unread.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// The longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Most metadata contexts one export offers.
pub const MAX_CONTEXTS: usize = 64;
/// Most block-status descriptors in one reply chunk (spec: SHOULD NOT exceed 2^20).
pub const MAX_EXTENTS: usize = 1 << 16;

/// An NBD error number as sent on the wire ("Error values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Errno {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl Errno {
    /// Maps an OS error from the engine to the NBD error the spec asks for.
    pub fn from_io(err: &std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => Errno::Perm,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Errno::NoSpc,
            Some(libc::EINVAL) => Errno::Inval,
            Some(libc::ENOMEM) => Errno::NoMem,
            Some(libc::EOPNOTSUPP) => Errno::NotSup,
            Some(libc::EOVERFLOW) => Errno::Overflow,
            Some(libc::ESHUTDOWN) => Errno::Shutdown,
            _ => Errno::Io,
        }
    }

    /// A short human-readable explanation, sent with structured error chunks.
    pub fn message(self) -> &'static str {
        match self {
            Errno::Perm => "operation not permitted",
            Errno::Io => "input/output error",
            Errno::NoMem => "out of memory",
            Errno::Inval => "invalid argument",
            Errno::NoSpc => "no space left on device (request beyond the end)",
            Errno::Overflow => "request too large",
            Errno::NotSup => "operation not supported",
            Errno::Shutdown => "server is shutting down",
        }
    }
}

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// A metadata context an export offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: holes and zeroes of the image.
    Allocation,
    /// `qemu:dirty-bitmap:NAME`: a dirty set in qemu's format (bit 0: dirty).
    DirtyBitmap(String),
    /// `siterep:changes:NAME`: the same set, bit 1 marking dirty blocks known to be zero.
    Changes(String),
}

impl MetaContext {
    pub fn name(&self) -> String {
        match self {
            MetaContext::Allocation => "base:allocation".to_string(),
            MetaContext::DirtyBitmap(n) => format!("qemu:dirty-bitmap:{n}"),
            MetaContext::Changes(n) => format!("siterep:changes:{n}"),
        }
    }
}

/// What the handshake needs to know of an export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    pub rotational: bool,
    pub block_sizes: BlockSizes,
    pub contexts: Vec<MetaContext>,
}

impl ExportInfo {
    /// The transmission flags of this export, given whether structured replies are on.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use consts::*;
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if self.rotational {
            f |= FLAG_ROTATIONAL;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        f
    }
}
