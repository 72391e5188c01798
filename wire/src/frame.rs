//! The frames and their codec: conventions `docs/wire.md` §1, framing §2, frames §4, error codes
//! §5.

use crate::error::WireError;
use crate::{
    MAGIC, MAX_CHUNK, MAX_COMPRESSED, MAX_FRAME, MAX_HASHES, MAX_HASHES_COUNT, MAX_HASH_BLOCK, MAX_HAVE,
    MAX_HAVE_COUNT, MAX_STRING, MAX_STRING_LEN, MIN_HASH_BLOCK,
};

/// A blake3 hash of a chunk's uncompressed bytes (§1).
pub type Hash = [u8; 32];

/// The identity of a protected disk's source: 16 random bytes drawn once, when protection
/// starts, and kept in the shim's state (§4.3, §6.2).
pub type SourceId = [u8; 16];

// Frame type numbers (§4).
pub(crate) const T_HELLO: u8 = 1;
pub(crate) const T_WELCOME: u8 = 2;
pub(crate) const T_REGISTER_DISK: u8 = 3;
pub(crate) const T_DISK_STATE: u8 = 4;
pub(crate) const T_BEGIN_GENERATION: u8 = 5;
pub(crate) const T_CHUNK: u8 = 6;
pub(crate) const T_ZERO: u8 = 7;
pub(crate) const T_HAVE_QUERY: u8 = 8;
pub(crate) const T_HAVE_REPLY: u8 = 9;
pub(crate) const T_PROGRESS: u8 = 10;
pub(crate) const T_COMMIT: u8 = 11;
pub(crate) const T_COMMITTED: u8 = 12;
pub(crate) const T_PROGRESS_ACK: u8 = 13;
pub(crate) const T_ERROR: u8 = 14;
pub(crate) const T_HASH_QUERY: u8 = 15;
pub(crate) const T_HASHES: u8 = 16;
pub(crate) const T_CURRENT: u8 = 17;
pub(crate) const T_CURRENT_ACK: u8 = 18;

/// Bytes of the length field that starts every frame (§2).
pub(crate) const LEN_FIELD: usize = 4;
/// A chunk's fields before its data tag, after the type byte: offset, len, hash (§4.6).
pub(crate) const CHUNK_HEAD: usize = 8 + 4 + 32;
/// A chunk's type byte and fixed fields up to and including the compressed length (§4.6).
pub(crate) const CHUNK_FIXED: u32 = 1 + (8 + 4 + 32) + 1 + 4;
const _: () = assert!(CHUNK_FIXED as usize == 1 + CHUNK_HEAD + 1 + 4);
/// Chunk data tags (§4.6).
const DATA_COMPRESSED: u8 = 0;
const DATA_KNOWN: u8 = 1;

/// Version mismatch: the ranges in `Hello` do not overlap (§6.1).
pub const ERR_VERSION: u16 = 1;
/// The peer is not allowed (its TLS identity, or the disk is not its own).
pub const ERR_AUTH: u16 = 2;
/// A frame that cannot be decoded ([`crate::Fault::Violation`]) or is out of place in the session.
pub const ERR_BAD_REQUEST: u16 = 3;
/// A frame over a named limit ([`crate::Fault::TooLarge`]).
pub const ERR_TOO_LARGE: u16 = 4;
/// A frame names a disk that was not registered in this session.
pub const ERR_NO_SUCH_DISK: u16 = 5;
/// The disk no longer matches the server's copy: size or block size changed, or the base point
/// is not the latest one. Needs a resync or an operator.
pub const ERR_DISK_MISMATCH: u16 = 6;
/// A chunk whose decompressed bytes are not `len` long or do not hash to its blake3 hash.
pub const ERR_CORRUPT_CHUNK: u16 = 7;
/// The server could not store or sync data.
pub const ERR_STORAGE: u16 = 8;
/// The server is overloaded or the disk is in use by another session.
pub const ERR_BUSY: u16 = 9;
/// The disk is bound to another source: a clone, or a second machine under the same name
/// (§6.2).
pub const ERR_OTHER_SOURCE: u16 = 10;
/// A generation the server committed from other content: two sources diverged under one
/// identity (§6.6).
pub const ERR_DIVERGED: u16 = 11;
/// The disk's latest point cannot be built on incrementally (a damaged object, or a source
/// re-enrolled): resync, then go on (§6.2, §6.8).
pub const ERR_RESYNC_REQUIRED: u16 = 12;

/// The class an `Error` frame with this code is sent with (§5); unknown codes are fatal.
/// A receiver goes by the class on the wire, not by this table.
pub fn default_class(code: u16) -> ErrorClass {
    match code {
        ERR_CORRUPT_CHUNK | ERR_STORAGE | ERR_BUSY | ERR_RESYNC_REQUIRED => ErrorClass::Retryable,
        _ => ErrorClass::Fatal,
    }
}

/// The latest durable recovery point of a disk (§4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointRef {
    pub point: u64,
    pub generation: u64,
    pub cut_unix_ms: u64,
}

/// A resumable initial copy (or resync) in progress (§4.4, §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitialSync {
    pub generation: u64,
    /// Everything below this offset is durable on the server.
    pub next_offset: u64,
}

/// What a generation carries (§4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationKind {
    /// The extents changed since the base point.
    Incremental = 0,
    /// The first full copy of the disk.
    InitialFull = 1,
    /// A full pass after tracking was lost.
    Resync = 2,
}

/// How consistent a recovery point is (§4.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// As after a power cut: the cut froze the disk at one instant.
    Crash = 0,
    /// Applications were frozen (quiesced) at the cut.
    App = 1,
    /// Not a consistent image (a resync pass over a disk that kept changing).
    Inconsistent = 2,
}

/// Whether an `Error` ends the work or only this attempt (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Reconnect (with backoff) and try again.
    Retryable = 0,
    /// Trying again will not help; an operator must act.
    Fatal = 1,
}

impl ErrorClass {
    /// Whether the failed work may be tried again on a new connection.
    pub fn is_retryable(self) -> bool {
        self == ErrorClass::Retryable
    }
}

/// The bytes of a chunk (§4.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkData {
    /// zstd of the chunk's `len` raw bytes, at most [`MAX_COMPRESSED`] long.
    Compressed(Vec<u8>),
    /// No bytes: the server already has a chunk with this hash (it said so in a `HaveReply`).
    Known,
}

/// One message of the protocol (§4), one variant per frame type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Type 1, agent → server: the first frame of a session (§4.1).
    Hello { min_version: u16, max_version: u16, agent: String },
    /// Type 2, server → agent: the session's version (§4.2).
    Welcome { version: u16, server: String },
    /// Type 3, agent → server: a disk this session replicates, from which source (§4.3).
    RegisterDisk { disk: String, size: u64, block_size: u32, source: SourceId, reenroll: bool },
    /// Type 4, server → agent: what the server holds of a registered disk (§4.4).
    DiskState {
        disk: String,
        latest: Option<PointRef>,
        initial: Option<InitialSync>,
        /// Why the next generation must be a resync, when it must.
        resync: Option<String>,
    },
    /// Type 5, agent → server: a generation follows (§4.5).
    BeginGeneration { disk: String, generation: u64, kind: GenerationKind, base_point: Option<u64> },
    /// Type 6, agent → server: `len` bytes of the disk at `offset` (§4.6).
    Chunk { offset: u64, len: u32, hash: Hash, data: ChunkData },
    /// Type 7, agent → server: an extent that reads as zeroes (§4.7).
    Zero { offset: u64, len: u64 },
    /// Type 8, agent → server: which of these chunks does the server have? (§4.8)
    HaveQuery { hashes: Vec<Hash> },
    /// Type 9, server → agent: one answer per queried hash, in order (§4.9).
    HaveReply { have: Vec<bool> },
    /// Type 10, agent → server: everything below `next_offset` has been sent (§4.10).
    Progress { next_offset: u64 },
    /// Type 11, agent → server: the generation is complete; make it a point (§4.11).
    Commit { generation: u64, cut_unix_ms: u64, consistency: Consistency, digest: Option<Hash> },
    /// Type 12, server → agent: the point is durable (§4.12).
    Committed { point: u64, generation: u64 },
    /// Type 13, server → agent: the progress is durable (§4.13).
    ProgressAck { next_offset: u64 },
    /// Type 14, either way: the session ends (§4.14, §5).
    Error { class: ErrorClass, code: u16, message: String },
    /// Type 15, agent → server: the blake3 of every `block`-sized piece of `point`'s data in
    /// `[offset, offset + len)`, the last piece cut at `offset + len` (§4.15).
    HashQuery { disk: String, point: u64, offset: u64, len: u64, block: u32 },
    /// Type 16, server → agent: the answer to a `HashQuery`, one hash per piece in order
    /// (§4.16).
    Hashes { offset: u64, block: u32, hashes: Vec<Hash> },
    /// Type 17, agent → server: nothing was written since `point`'s cut; the point still
    /// equals the disk as of `as_of_unix_ms` (§4.17).
    Current { point: u64, as_of_unix_ms: u64 },
    /// Type 18, server → agent: the `Current` is recorded (§4.18).
    CurrentAck { point: u64, as_of_unix_ms: u64 },
}

/// The name of a frame type, or `None` for a type byte no frame has.
pub(crate) fn type_name(ty: u8) -> Option<&'static str> {
    Some(match ty {
        T_HELLO => "Hello",
        T_WELCOME => "Welcome",
        T_REGISTER_DISK => "RegisterDisk",
        T_DISK_STATE => "DiskState",
        T_BEGIN_GENERATION => "BeginGeneration",
        T_CHUNK => "Chunk",
        T_ZERO => "Zero",
        T_HAVE_QUERY => "HaveQuery",
        T_HAVE_REPLY => "HaveReply",
        T_PROGRESS => "Progress",
        T_COMMIT => "Commit",
        T_COMMITTED => "Committed",
        T_PROGRESS_ACK => "ProgressAck",
        T_ERROR => "Error",
        T_HASH_QUERY => "HashQuery",
        T_HASHES => "Hashes",
        T_CURRENT => "Current",
        T_CURRENT_ACK => "CurrentAck",
        _ => return None,
    })
}

/// The largest valid length field (type byte plus body) of a frame type (§3), or `None` for a
/// type byte no frame has. A decoder refuses longer frames before buffering them.
pub(crate) const fn max_frame_len(ty: u8) -> Option<u32> {
    const S: u32 = 2 + MAX_STRING_LEN as u32;
    Some(match ty {
        T_HELLO => 1 + 8 + 2 + 2 + S,
        T_WELCOME => 1 + 2 + S,
        T_REGISTER_DISK => 1 + S + 8 + 4 + 16 + 1,
        T_DISK_STATE => 1 + S + (1 + 24) + (1 + 16) + (1 + S),
        T_BEGIN_GENERATION => 1 + S + 8 + 1 + (1 + 8),
        T_CHUNK => MAX_FRAME,
        T_ZERO => 1 + 8 + 8,
        T_HAVE_QUERY => 1 + 4 + 32 * MAX_HAVE_COUNT,
        T_HAVE_REPLY => 1 + 4 + MAX_HAVE_COUNT.div_ceil(8),
        T_PROGRESS | T_PROGRESS_ACK => 1 + 8,
        T_COMMIT => 1 + 8 + 8 + 1 + (1 + 32),
        T_CURRENT | T_CURRENT_ACK => 1 + 8 + 8,
        T_COMMITTED => 1 + 8 + 8,
        T_ERROR => 1 + 1 + 2 + S,
        T_HASH_QUERY => 1 + S + 8 + 8 + 8 + 4,
        T_HASHES => 1 + 8 + 4 + 4 + 32 * MAX_HASHES_COUNT,
        _ => return None,
    })
}

/// Checks an extent (§4.6, §4.7): not empty, its end fits in 64 bits.
fn check_extent(offset: u64, len: u64) -> Result<(), WireError> {
    if len == 0 || offset.checked_add(len).is_none() {
        return Err(WireError::BadExtent { offset, len });
    }
    Ok(())
}

/// Checks a chunk's length (§4.6).
fn check_chunk(offset: u64, len: u32) -> Result<(), WireError> {
    if len > MAX_CHUNK {
        return Err(WireError::ChunkTooLarge { len });
    }
    check_extent(offset, u64::from(len))
}

fn check_string(s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STRING {
        return Err(WireError::StringTooLong { len: s.len() });
    }
    Ok(())
}

fn check_count(frame: &'static str, count: usize) -> Result<(), WireError> {
    if count > MAX_HAVE {
        return Err(WireError::CountTooLarge { frame, count: count as u64 });
    }
    Ok(())
}

/// How many pieces a `HashQuery` of `len` bytes in blocks of `block` bytes has: its `Hashes`
/// reply's count (§4.15). `block` must not be 0.
pub fn hash_count(len: u64, block: u32) -> u64 {
    len.div_ceil(u64::from(block))
}

/// Checks a hash block size and the offset it is aligned to (§4.15, §4.16).
fn check_hash_block(block: u32, offset: u64) -> Result<(), WireError> {
    if !block.is_power_of_two()
        || !(MIN_HASH_BLOCK..=MAX_HASH_BLOCK).contains(&block)
        || !offset.is_multiple_of(u64::from(block))
    {
        return Err(WireError::BadHashBlock { block, offset });
    }
    Ok(())
}

fn check_hash_count(frame: &'static str, count: u64) -> Result<(), WireError> {
    if count > MAX_HASHES as u64 {
        return Err(WireError::HashCountTooLarge { frame, count });
    }
    Ok(())
}

/// Checks a `HashQuery`'s range (§4.15): a non-empty extent, aligned to a valid block, of at
/// most [`MAX_HASHES`] blocks.
fn check_hash_query(offset: u64, len: u64, block: u32) -> Result<(), WireError> {
    check_extent(offset, len)?;
    check_hash_block(block, offset)?;
    check_hash_count("HashQuery", hash_count(len, block))
}

/// `s` cut to at most [`MAX_STRING`] bytes, at a character boundary.
pub(crate) fn fit_string(mut s: String) -> String {
    if s.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl Frame {
    /// An `Error` frame with the code's [`default_class`]; a message longer than [`MAX_STRING`]
    /// is cut (§4.14).
    pub fn error(code: u16, message: impl Into<String>) -> Frame {
        Frame::Error { class: default_class(code), code, message: fit_string(message.into()) }
    }

    /// This frame's type number (§4).
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello { .. } => T_HELLO,
            Frame::Welcome { .. } => T_WELCOME,
            Frame::RegisterDisk { .. } => T_REGISTER_DISK,
            Frame::DiskState { .. } => T_DISK_STATE,
            Frame::BeginGeneration { .. } => T_BEGIN_GENERATION,
            Frame::Chunk { .. } => T_CHUNK,
            Frame::Zero { .. } => T_ZERO,
            Frame::HaveQuery { .. } => T_HAVE_QUERY,
            Frame::HaveReply { .. } => T_HAVE_REPLY,
            Frame::Progress { .. } => T_PROGRESS,
            Frame::Commit { .. } => T_COMMIT,
            Frame::Committed { .. } => T_COMMITTED,
            Frame::ProgressAck { .. } => T_PROGRESS_ACK,
            Frame::Error { .. } => T_ERROR,
            Frame::HashQuery { .. } => T_HASH_QUERY,
            Frame::Hashes { .. } => T_HASHES,
            Frame::Current { .. } => T_CURRENT,
            Frame::CurrentAck { .. } => T_CURRENT_ACK,
        }
    }

    /// This frame's type name, as in `docs/wire.md`.
    pub fn name(&self) -> &'static str {
        type_name(self.frame_type()).expect("every frame has a name")
    }

    /// Checks the frame against every limit and rule a decoder enforces (§1, §3, §4), so that
    /// values from outside (a configured disk name, a message) can be refused before
    /// [`Frame::encode`] would panic on them.
    pub fn check(&self) -> Result<(), WireError> {
        match self {
            Frame::Hello { min_version, max_version, agent } => {
                if min_version > max_version {
                    return Err(WireError::BadVersionRange { min: *min_version, max: *max_version });
                }
                check_string(agent)
            }
            Frame::Welcome { server: s, .. }
            | Frame::RegisterDisk { disk: s, .. }
            | Frame::BeginGeneration { disk: s, .. }
            | Frame::Error { message: s, .. } => check_string(s),
            Frame::DiskState { disk, resync, .. } => {
                check_string(disk)?;
                resync.as_deref().map_or(Ok(()), check_string)
            }
            Frame::Chunk { offset, len, data, .. } => {
                check_chunk(*offset, *len)?;
                match data {
                    ChunkData::Compressed(d) if d.len() as u64 > u64::from(MAX_COMPRESSED) => {
                        Err(WireError::PayloadTooLarge { len: d.len() as u64 })
                    }
                    _ => Ok(()),
                }
            }
            Frame::Zero { offset, len } => check_extent(*offset, *len),
            Frame::HaveQuery { hashes } => check_count("HaveQuery", hashes.len()),
            Frame::HaveReply { have } => check_count("HaveReply", have.len()),
            Frame::HashQuery { disk, offset, len, block, .. } => {
                check_string(disk)?;
                check_hash_query(*offset, *len, *block)
            }
            Frame::Hashes { offset, block, hashes } => {
                check_hash_block(*block, *offset)?;
                check_hash_count("Hashes", hashes.len() as u64)
            }
            Frame::Progress { .. }
            | Frame::Commit { .. }
            | Frame::Committed { .. }
            | Frame::ProgressAck { .. }
            | Frame::Current { .. }
            | Frame::CurrentAck { .. } => Ok(()),
        }
    }

    /// Bytes [`Frame::encode`] appends: the length field, the type byte and the body (§2).
    pub fn encoded_len(&self) -> usize {
        let s = |s: &String| 2 + s.len();
        let opt = |present: bool, n: usize| 1 + if present { n } else { 0 };
        let body = match self {
            Frame::Hello { agent, .. } => 8 + 2 + 2 + s(agent),
            Frame::Welcome { server, .. } => 2 + s(server),
            Frame::RegisterDisk { disk, .. } => s(disk) + 8 + 4 + 16 + 1,
            Frame::DiskState { disk, latest, initial, resync } => {
                s(disk)
                    + opt(latest.is_some(), 24)
                    + opt(initial.is_some(), 16)
                    + opt(resync.is_some(), resync.as_ref().map_or(0, s))
            }
            Frame::BeginGeneration { disk, base_point, .. } => s(disk) + 8 + 1 + opt(base_point.is_some(), 8),
            Frame::Chunk { data, .. } => {
                CHUNK_HEAD
                    + 1
                    + match data {
                        ChunkData::Compressed(d) => 4 + d.len(),
                        ChunkData::Known => 0,
                    }
            }
            Frame::Zero { .. } => 16,
            Frame::HaveQuery { hashes } => 4 + 32 * hashes.len(),
            Frame::HaveReply { have } => 4 + have.len().div_ceil(8),
            Frame::Progress { .. } | Frame::ProgressAck { .. } => 8,
            Frame::Commit { digest, .. } => 8 + 8 + 1 + opt(digest.is_some(), 32),
            Frame::Current { .. } | Frame::CurrentAck { .. } => 16,
            Frame::Committed { .. } => 16,
            Frame::Error { message, .. } => 1 + 2 + s(message),
            Frame::HashQuery { disk, .. } => s(disk) + 8 + 8 + 8 + 4,
            Frame::Hashes { hashes, .. } => 8 + 4 + 4 + 32 * hashes.len(),
        };
        LEN_FIELD + 1 + body
    }

    /// Appends this frame, whole, to `out` (§2, §4).
    ///
    /// # Panics
    ///
    /// If the frame breaks a limit or rule of the format ([`Frame::check`] says which): sending
    /// it would only make the peer close the connection. Check values from outside first.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Err(e) = self.check() {
            panic!("{} frame cannot be encoded: {e}", self.name());
        }
        let start = out.len();
        out.reserve(self.encoded_len());
        out.extend_from_slice(&[0; LEN_FIELD]);
        out.push(self.frame_type());
        match self {
            Frame::Hello { min_version, max_version, agent } => {
                out.extend_from_slice(&MAGIC);
                put_u16(out, *min_version);
                put_u16(out, *max_version);
                put_str(out, agent);
            }
            Frame::Welcome { version, server } => {
                put_u16(out, *version);
                put_str(out, server);
            }
            Frame::RegisterDisk { disk, size, block_size, source, reenroll } => {
                put_str(out, disk);
                put_u64(out, *size);
                put_u32(out, *block_size);
                out.extend_from_slice(source);
                out.push(u8::from(*reenroll));
            }
            Frame::DiskState { disk, latest, initial, resync } => {
                put_str(out, disk);
                put_opt(out, latest.as_ref(), |out, p| {
                    put_u64(out, p.point);
                    put_u64(out, p.generation);
                    put_u64(out, p.cut_unix_ms);
                });
                put_opt(out, initial.as_ref(), |out, i| {
                    put_u64(out, i.generation);
                    put_u64(out, i.next_offset);
                });
                put_opt(out, resync.as_ref(), |out, r| put_str(out, r));
            }
            Frame::BeginGeneration { disk, generation, kind, base_point } => {
                put_str(out, disk);
                put_u64(out, *generation);
                out.push(*kind as u8);
                put_opt(out, base_point.as_ref(), |out, p| put_u64(out, *p));
            }
            Frame::Chunk { offset, len, hash, data } => {
                put_u64(out, *offset);
                put_u32(out, *len);
                out.extend_from_slice(hash);
                match data {
                    ChunkData::Compressed(d) => {
                        out.push(DATA_COMPRESSED);
                        put_u32(out, field(d.len(), "Chunk payload"));
                        out.extend_from_slice(d);
                    }
                    ChunkData::Known => out.push(DATA_KNOWN),
                }
            }
            Frame::Zero { offset, len } => {
                put_u64(out, *offset);
                put_u64(out, *len);
            }
            Frame::HaveQuery { hashes } => {
                put_u32(out, field(hashes.len(), "HaveQuery count"));
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Frame::HaveReply { have } => {
                put_u32(out, field(have.len(), "HaveReply count"));
                for bits in have.chunks(8) {
                    out.push(bits.iter().enumerate().fold(0, |b, (i, &set)| b | (u8::from(set) << i)));
                }
            }
            Frame::Progress { next_offset } | Frame::ProgressAck { next_offset } => {
                put_u64(out, *next_offset)
            }
            Frame::Commit { generation, cut_unix_ms, consistency, digest } => {
                put_u64(out, *generation);
                put_u64(out, *cut_unix_ms);
                out.push(*consistency as u8);
                put_opt(out, digest.as_ref(), |out, d| out.extend_from_slice(d));
            }
            Frame::Current { point, as_of_unix_ms } | Frame::CurrentAck { point, as_of_unix_ms } => {
                put_u64(out, *point);
                put_u64(out, *as_of_unix_ms);
            }
            Frame::Committed { point, generation } => {
                put_u64(out, *point);
                put_u64(out, *generation);
            }
            Frame::Error { class, code, message } => {
                out.push(*class as u8);
                put_u16(out, *code);
                put_str(out, message);
            }
            Frame::HashQuery { disk, point, offset, len, block } => {
                put_str(out, disk);
                put_u64(out, *point);
                put_u64(out, *offset);
                put_u64(out, *len);
                put_u32(out, *block);
            }
            Frame::Hashes { offset, block, hashes } => {
                put_u64(out, *offset);
                put_u32(out, *block);
                put_u32(out, field(hashes.len(), "Hashes count"));
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
        }
        let len = u32::try_from(out.len() - start - LEN_FIELD).expect("checked frame fits MAX_FRAME");
        debug_assert!(len <= MAX_FRAME && out.len() - start == self.encoded_len());
        out[start..start + LEN_FIELD].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes a frame from its type byte and body, i.e. a whole frame without its length field
    /// (§2, §4). The caller has checked the length against [`max_frame_len`].
    pub(crate) fn decode(ty: u8, body: &[u8]) -> Result<Frame, WireError> {
        let frame = type_name(ty).ok_or(WireError::UnknownType(ty))?;
        let mut r = Reader { b: body, frame };
        let f = match ty {
            T_HELLO => {
                let magic: [u8; 8] = r.array()?;
                if magic != MAGIC {
                    return Err(WireError::BadMagic(magic));
                }
                let (min_version, max_version) = (r.u16()?, r.u16()?);
                if min_version > max_version {
                    return Err(WireError::BadVersionRange { min: min_version, max: max_version });
                }
                Frame::Hello { min_version, max_version, agent: r.string()? }
            }
            T_WELCOME => Frame::Welcome { version: r.u16()?, server: r.string()? },
            T_REGISTER_DISK => Frame::RegisterDisk {
                disk: r.string()?,
                size: r.u64()?,
                block_size: r.u32()?,
                source: r.array()?,
                reenroll: match r.u8()? {
                    0 => false,
                    1 => true,
                    tag => return Err(WireError::BadTag { field: "reenroll", tag }),
                },
            },
            T_DISK_STATE => Frame::DiskState {
                disk: r.string()?,
                latest: r.option(|r| {
                    Ok(PointRef { point: r.u64()?, generation: r.u64()?, cut_unix_ms: r.u64()? })
                })?,
                initial: r.option(|r| Ok(InitialSync { generation: r.u64()?, next_offset: r.u64()? }))?,
                resync: r.option(Reader::string)?,
            },
            T_BEGIN_GENERATION => Frame::BeginGeneration {
                disk: r.string()?,
                generation: r.u64()?,
                kind: match r.u8()? {
                    0 => GenerationKind::Incremental,
                    1 => GenerationKind::InitialFull,
                    2 => GenerationKind::Resync,
                    tag => return Err(WireError::BadTag { field: "GenerationKind", tag }),
                },
                base_point: r.option(Reader::u64)?,
            },
            T_CHUNK => {
                let head = ChunkHead::parse(&mut r)?;
                let data = match head.tag {
                    DATA_KNOWN => ChunkData::Known,
                    _ => {
                        let n = r.u32()?;
                        head.check_data_len(n, r.b.len())?;
                        ChunkData::Compressed(r.take(n as usize)?.to_vec())
                    }
                };
                Frame::Chunk { offset: head.offset, len: head.len, hash: head.hash, data }
            }
            T_ZERO => {
                let (offset, len) = (r.u64()?, r.u64()?);
                check_extent(offset, len)?;
                Frame::Zero { offset, len }
            }
            T_HAVE_QUERY => {
                let count = r.u32()?;
                check_count(frame, count as usize)?;
                // The count is checked, and the bytes are there, before the vector is allocated.
                let bytes = r.take(32 * count as usize)?;
                Frame::HaveQuery { hashes: bytes.chunks_exact(32).map(|h| h.try_into().unwrap()).collect() }
            }
            T_HAVE_REPLY => {
                let count = r.u32()? as usize;
                check_count(frame, count)?;
                let bytes = r.take(count.div_ceil(8))?;
                // Bits past the count, in the last byte, must be zero.
                let used = count % 8;
                if used != 0 && bytes[count / 8] >> used != 0 {
                    return Err(WireError::HaveReplyPadding);
                }
                Frame::HaveReply { have: (0..count).map(|i| bytes[i / 8] & (1 << (i % 8)) != 0).collect() }
            }
            T_PROGRESS => Frame::Progress { next_offset: r.u64()? },
            T_COMMIT => Frame::Commit {
                generation: r.u64()?,
                cut_unix_ms: r.u64()?,
                consistency: match r.u8()? {
                    0 => Consistency::Crash,
                    1 => Consistency::App,
                    2 => Consistency::Inconsistent,
                    tag => return Err(WireError::BadTag { field: "Consistency", tag }),
                },
                digest: r.option(Reader::array)?,
            },
            T_CURRENT => Frame::Current { point: r.u64()?, as_of_unix_ms: r.u64()? },
            T_CURRENT_ACK => Frame::CurrentAck { point: r.u64()?, as_of_unix_ms: r.u64()? },
            T_COMMITTED => Frame::Committed { point: r.u64()?, generation: r.u64()? },
            T_PROGRESS_ACK => Frame::ProgressAck { next_offset: r.u64()? },
            T_ERROR => Frame::Error {
                class: match r.u8()? {
                    0 => ErrorClass::Retryable,
                    1 => ErrorClass::Fatal,
                    tag => return Err(WireError::BadTag { field: "ErrorClass", tag }),
                },
                code: r.u16()?,
                message: r.string()?,
            },
            T_HASH_QUERY => {
                let (disk, point, offset, len, block) = (r.string()?, r.u64()?, r.u64()?, r.u64()?, r.u32()?);
                check_hash_query(offset, len, block)?;
                Frame::HashQuery { disk, point, offset, len, block }
            }
            T_HASHES => {
                let (offset, block) = (r.u64()?, r.u32()?);
                check_hash_block(block, offset)?;
                let count = r.u32()?;
                check_hash_count(frame, u64::from(count))?;
                // The count is checked, and the bytes are there, before the vector is allocated.
                let bytes = r.take(32 * count as usize)?;
                Frame::Hashes {
                    offset,
                    block,
                    hashes: bytes.chunks_exact(32).map(|h| h.try_into().unwrap()).collect(),
                }
            }
            _ => unreachable!("type_name knows every type"),
        };
        r.finish()?;
        Ok(f)
    }
}

/// A chunk's fixed fields and data tag (§4.6), parsed and checked; the decoder uses it to see a
/// chunk's payload length before the payload arrives.
pub(crate) struct ChunkHead {
    pub offset: u64,
    pub len: u32,
    pub hash: Hash,
    tag: u8,
}

impl ChunkHead {
    /// Bytes of the body (after the type byte) this needs: the fixed fields and the tag.
    pub const BYTES: usize = CHUNK_HEAD + 1;

    fn parse(r: &mut Reader<'_>) -> Result<ChunkHead, WireError> {
        let (offset, len, hash) = (r.u64()?, r.u32()?, r.array()?);
        check_chunk(offset, len)?;
        let tag = r.u8()?;
        if tag != DATA_COMPRESSED && tag != DATA_KNOWN {
            return Err(WireError::BadTag { field: "ChunkData", tag });
        }
        Ok(ChunkHead { offset, len, hash, tag })
    }

    /// Parses the start of a chunk's body, at least [`ChunkHead::BYTES`] long.
    pub fn parse_prefix(body: &[u8]) -> Result<ChunkHead, WireError> {
        ChunkHead::parse(&mut Reader { b: body, frame: "Chunk" })
    }

    pub fn is_compressed(&self) -> bool {
        self.tag == DATA_COMPRESSED
    }

    /// Checks a compressed length field against the bytes left in the body after it: the
    /// payload is the body's last field, so it must fill the rest exactly.
    pub fn check_data_len(&self, n: u32, rest: usize) -> Result<(), WireError> {
        if n > MAX_COMPRESSED {
            return Err(WireError::PayloadTooLarge { len: u64::from(n) });
        }
        match (n as usize).cmp(&rest) {
            std::cmp::Ordering::Greater => Err(WireError::Truncated { frame: "Chunk" }),
            std::cmp::Ordering::Less => {
                Err(WireError::TrailingBytes { frame: "Chunk", extra: rest - n as usize })
            }
            std::cmp::Ordering::Equal => Ok(()),
        }
    }
}

/// A length or count that [`Frame::check`] has bounded, as the type of the field that carries
/// it.
///
/// # Panics
///
/// If it does not fit: `check` let through a value its field cannot carry, a bug here.
fn field<T: TryFrom<usize>>(n: usize, what: &str) -> T {
    T::try_from(n).unwrap_or_else(|_| panic!("{what} {n} passed Frame::check but does not fit its field"))
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// §1: `u16` length, then UTF-8; the caller has checked the length.
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u16(out, field(s.len(), "string length"));
    out.extend_from_slice(s.as_bytes());
}

/// §1: `u8` 0 (absent) or 1 (present) then the value.
fn put_opt<T>(out: &mut Vec<u8>, v: Option<&T>, put: impl FnOnce(&mut Vec<u8>, &T)) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put(out, v);
        }
    }
}

/// Reads fields off a body; running out is [`WireError::Truncated`].
struct Reader<'a> {
    b: &'a [u8],
    frame: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated { frame: self.frame });
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N)?.try_into().unwrap())
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_be_bytes)
    }

    /// §1: the length is checked against [`MAX_STRING`] before anything is read or allocated.
    fn string(&mut self) -> Result<String, WireError> {
        let len = usize::from(self.u16()?);
        if len > MAX_STRING {
            return Err(WireError::StringTooLong { len });
        }
        let s = std::str::from_utf8(self.take(len)?).map_err(WireError::InvalidUtf8)?;
        Ok(s.to_owned())
    }

    fn option<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            tag => Err(WireError::BadTag { field: "Option", tag }),
        }
    }

    fn finish(self) -> Result<(), WireError> {
        match self.b.len() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes { frame: self.frame, extra }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Fault;
    use proptest::prelude::*;

    /// One of every frame type, some twice to cover both sides of an option or tag.
    pub(crate) fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello { min_version: 1, max_version: 3, agent: "agent-1 (siterep 0.1)".into() },
            Frame::Welcome { version: 1, server: "dr-site".into() },
            Frame::RegisterDisk {
                disk: "vm1/disk0".into(),
                size: 10 << 30,
                block_size: 4096,
                source: [9; 16],
                reenroll: false,
            },
            Frame::RegisterDisk {
                disk: "d".into(),
                size: 1 << 20,
                block_size: 512,
                source: [0; 16],
                reenroll: true,
            },
            Frame::DiskState { disk: "d".into(), latest: None, initial: None, resync: None },
            Frame::DiskState {
                disk: "dïsk".into(),
                latest: Some(PointRef { point: 7, generation: 42, cut_unix_ms: 1_700_000_000_000 }),
                initial: Some(InitialSync { generation: 43, next_offset: 1 << 33 }),
                resync: Some("a chunk of the latest point is damaged".into()),
            },
            Frame::BeginGeneration {
                disk: "d".into(),
                generation: 43,
                kind: GenerationKind::Incremental,
                base_point: Some(7),
            },
            Frame::BeginGeneration {
                disk: "d".into(),
                generation: 1,
                kind: GenerationKind::InitialFull,
                base_point: None,
            },
            Frame::BeginGeneration {
                disk: "d".into(),
                generation: 9,
                kind: GenerationKind::Resync,
                base_point: Some(3),
            },
            Frame::Chunk {
                offset: 4096,
                len: 65536,
                hash: [0xab; 32],
                data: ChunkData::Compressed(vec![1, 2, 3]),
            },
            Frame::Chunk { offset: 0, len: MAX_CHUNK, hash: [7; 32], data: ChunkData::Known },
            Frame::Chunk { offset: 0, len: 1, hash: [0; 32], data: ChunkData::Compressed(Vec::new()) },
            Frame::Zero { offset: 1 << 20, len: 1 << 30 },
            Frame::HaveQuery { hashes: vec![[1; 32], [2; 32], [3; 32]] },
            Frame::HaveQuery { hashes: Vec::new() },
            Frame::HaveReply { have: vec![true, false, true, true, false, false, false, false, true] },
            Frame::HaveReply { have: Vec::new() },
            Frame::Progress { next_offset: 123 << 20 },
            Frame::Commit {
                generation: 43,
                cut_unix_ms: 1_700_000_000_500,
                consistency: Consistency::Crash,
                digest: Some([4; 32]),
            },
            Frame::Commit { generation: 44, cut_unix_ms: 1, consistency: Consistency::App, digest: None },
            Frame::Commit {
                generation: 45,
                cut_unix_ms: 2,
                consistency: Consistency::Inconsistent,
                digest: None,
            },
            Frame::Committed { point: 8, generation: 43 },
            Frame::ProgressAck { next_offset: 123 << 20 },
            Frame::Error { class: ErrorClass::Retryable, code: ERR_BUSY, message: "busy".into() },
            Frame::Error { class: ErrorClass::Fatal, code: ERR_VERSION, message: String::new() },
            Frame::HashQuery { disk: "d".into(), point: 7, offset: 64 << 20, len: 64 << 20, block: 64 << 10 },
            Frame::HashQuery { disk: "d".into(), point: 1, offset: 0, len: 1, block: MIN_HASH_BLOCK },
            Frame::Hashes { offset: 64 << 20, block: 4096, hashes: vec![[5; 32], [6; 32]] },
            Frame::Hashes { offset: 0, block: MAX_HASH_BLOCK, hashes: Vec::new() },
            Frame::Current { point: 8, as_of_unix_ms: 1_700_000_000_900 },
            Frame::CurrentAck { point: 8, as_of_unix_ms: 1_700_000_000_900 },
        ]
    }

    fn arb_string() -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..40).prop_map(String::from_iter)
    }

    fn arb_hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>()
    }

    /// Every variant, with every field's range (strings and lists kept short).
    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        let point = (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(point, generation, cut_unix_ms)| PointRef { point, generation, cut_unix_ms });
        let initial = (any::<u64>(), any::<u64>())
            .prop_map(|(generation, next_offset)| InitialSync { generation, next_offset });
        let kind = prop_oneof![
            Just(GenerationKind::Incremental),
            Just(GenerationKind::InitialFull),
            Just(GenerationKind::Resync)
        ];
        let consistency =
            prop_oneof![Just(Consistency::Crash), Just(Consistency::App), Just(Consistency::Inconsistent)];
        let class = prop_oneof![Just(ErrorClass::Retryable), Just(ErrorClass::Fatal)];
        let data = prop_oneof![
            Just(ChunkData::Known),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(ChunkData::Compressed)
        ];
        let chunk = (1..=MAX_CHUNK).prop_flat_map(|len| (0..=u64::MAX - u64::from(len), Just(len)));
        let extent = (1..=u64::MAX).prop_flat_map(|len| (0..=u64::MAX - len, Just(len)));
        let shift = MIN_HASH_BLOCK.trailing_zeros()..=MAX_HASH_BLOCK.trailing_zeros();
        // An aligned range of 1..=MAX_HASHES blocks, the last one possibly short.
        let query = (shift.clone(), 1..=MAX_HASHES as u64)
            .prop_flat_map(|(shift, n)| {
                let block = 1u64 << shift;
                ((n - 1) * block + 1..=n * block).prop_map(move |len| (shift, len))
            })
            .prop_flat_map(|(shift, len)| {
                (0..=(u64::MAX - len) >> shift).prop_map(move |i| (i << shift, len, 1u32 << shift))
            });
        let hashes = (shift, any::<u64>(), proptest::collection::vec(arb_hash(), 0..40))
            .prop_map(|(shift, i, hashes)| (i >> shift << shift, 1u32 << shift, hashes));
        prop_oneof![
            (any::<u16>(), any::<u16>(), arb_string()).prop_map(|(a, b, agent)| Frame::Hello {
                min_version: a.min(b),
                max_version: a.max(b),
                agent
            }),
            (any::<u16>(), arb_string()).prop_map(|(version, server)| Frame::Welcome { version, server }),
            (arb_string(), any::<u64>(), any::<u32>(), any::<[u8; 16]>(), any::<bool>()).prop_map(
                |(disk, size, block_size, source, reenroll)| Frame::RegisterDisk {
                    disk,
                    size,
                    block_size,
                    source,
                    reenroll
                }
            ),
            (
                arb_string(),
                proptest::option::of(point),
                proptest::option::of(initial),
                proptest::option::of(arb_string())
            )
                .prop_map(|(disk, latest, initial, resync)| Frame::DiskState {
                    disk,
                    latest,
                    initial,
                    resync
                }),
            (arb_string(), any::<u64>(), kind, proptest::option::of(any::<u64>())).prop_map(
                |(disk, generation, kind, base_point)| Frame::BeginGeneration {
                    disk,
                    generation,
                    kind,
                    base_point
                }
            ),
            (chunk, arb_hash(), data).prop_map(|((offset, len), hash, data)| Frame::Chunk {
                offset,
                len,
                hash,
                data
            }),
            extent.prop_map(|(offset, len)| Frame::Zero { offset, len }),
            proptest::collection::vec(arb_hash(), 0..40).prop_map(|hashes| Frame::HaveQuery { hashes }),
            proptest::collection::vec(any::<bool>(), 0..80).prop_map(|have| Frame::HaveReply { have }),
            any::<u64>().prop_map(|next_offset| Frame::Progress { next_offset }),
            (any::<u64>(), any::<u64>(), consistency, proptest::option::of(arb_hash())).prop_map(
                |(generation, cut_unix_ms, consistency, digest)| Frame::Commit {
                    generation,
                    cut_unix_ms,
                    consistency,
                    digest
                }
            ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(point, as_of_unix_ms)| Frame::Current { point, as_of_unix_ms }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(point, as_of_unix_ms)| Frame::CurrentAck { point, as_of_unix_ms }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(point, generation)| Frame::Committed { point, generation }),
            any::<u64>().prop_map(|next_offset| Frame::ProgressAck { next_offset }),
            (class, any::<u16>(), arb_string()).prop_map(|(class, code, message)| Frame::Error {
                class,
                code,
                message
            }),
            (arb_string(), any::<u64>(), query).prop_map(|(disk, point, (offset, len, block))| {
                Frame::HashQuery { disk, point, offset, len, block }
            }),
            hashes.prop_map(|(offset, block, hashes)| Frame::Hashes { offset, block, hashes }),
        ]
    }

    fn encode(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        f.encode(&mut out);
        out
    }

    /// Decodes a whole frame, as the decoder does after routing it.
    fn decode(b: &[u8]) -> Result<Frame, WireError> {
        let len = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
        assert_eq!(len, b.len() - 4, "test frame's length field");
        Frame::decode(b[4], &b[5..])
    }

    /// A frame of type `ty` with `body` as is.
    fn raw(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut b = (u32::try_from(body.len()).unwrap() + 1).to_be_bytes().to_vec();
        b.push(ty);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn every_type_round_trips() {
        let samples = samples();
        let mut types: Vec<u8> = samples.iter().map(Frame::frame_type).collect();
        types.dedup();
        assert_eq!(types, (1..=18).collect::<Vec<u8>>(), "samples cover every type in order");
        for f in samples {
            let b = encode(&f);
            assert_eq!(b.len(), f.encoded_len(), "{f:?}");
            assert_eq!(b[4], f.frame_type());
            assert!(b.len() - 4 <= max_frame_len(f.frame_type()).unwrap() as usize);
            assert_eq!(decode(&b), Ok(f));
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        // §4.1: magic, versions, string; all big-endian.
        let b = encode(&Frame::Hello { min_version: 1, max_version: 2, agent: "ab".into() });
        assert_eq!(b, [&[0, 0, 0, 17, 1][..], b"SITEREP\x01", &[0, 1, 0, 2, 0, 2], b"ab"].concat());
        // §4.9: bit i of byte i/8, least significant first.
        let b = encode(&Frame::HaveReply {
            have: vec![true, false, false, true, false, false, false, false, false, true],
        });
        assert_eq!(b, [0, 0, 0, 7, 9, 0, 0, 0, 10, 0b0000_1001, 0b0000_0010]);
        // §4.6: a known chunk ends at its tag.
        let b = encode(&Frame::Chunk { offset: 1, len: 2, hash: [9; 32], data: ChunkData::Known });
        assert_eq!(b.len(), 4 + 1 + 8 + 4 + 32 + 1);
        assert_eq!(b[b.len() - 1], DATA_KNOWN);
        let b = encode(&Frame::Error { class: ErrorClass::Fatal, code: ERR_AUTH, message: "x".into() });
        assert_eq!(b, [0, 0, 0, 7, 14, 1, 0, 2, 0, 1, b'x']);
    }

    #[test]
    fn max_lengths_are_reached() {
        let s = "x".repeat(MAX_STRING);
        let big = [
            Frame::Hello { min_version: 0, max_version: 0, agent: s.clone() },
            Frame::Welcome { version: 0, server: s.clone() },
            Frame::RegisterDisk { disk: s.clone(), size: 0, block_size: 0, source: [0; 16], reenroll: false },
            Frame::DiskState {
                disk: s.clone(),
                latest: Some(PointRef { point: 0, generation: 0, cut_unix_ms: 0 }),
                initial: Some(InitialSync { generation: 0, next_offset: 0 }),
                resync: Some(s.clone()),
            },
            Frame::BeginGeneration {
                disk: s.clone(),
                generation: 0,
                kind: GenerationKind::Resync,
                base_point: Some(0),
            },
            Frame::Chunk {
                offset: 0,
                len: MAX_CHUNK,
                hash: [0; 32],
                data: ChunkData::Compressed(vec![0; MAX_COMPRESSED as usize]),
            },
            Frame::Zero { offset: 0, len: 1 },
            Frame::HaveQuery { hashes: vec![[0; 32]; MAX_HAVE] },
            Frame::HaveReply { have: vec![true; MAX_HAVE] },
            Frame::Progress { next_offset: 0 },
            Frame::Commit {
                generation: 0,
                cut_unix_ms: 0,
                consistency: Consistency::App,
                digest: Some([0; 32]),
            },
            Frame::Committed { point: 0, generation: 0 },
            Frame::Current { point: 0, as_of_unix_ms: 0 },
            Frame::CurrentAck { point: 0, as_of_unix_ms: 0 },
            Frame::ProgressAck { next_offset: 0 },
            Frame::Error { class: ErrorClass::Fatal, code: 0, message: s.clone() },
            Frame::HashQuery { disk: s, point: 0, offset: 0, len: 1, block: MIN_HASH_BLOCK },
            Frame::Hashes { offset: 0, block: MIN_HASH_BLOCK, hashes: vec![[0; 32]; MAX_HASHES] },
        ];
        for f in big {
            let b = encode(&f);
            assert_eq!(b.len() - 4, max_frame_len(f.frame_type()).unwrap() as usize, "{}", f.name());
            assert_eq!(decode(&b), Ok(f));
        }
        assert_eq!(max_frame_len(0), None);
        assert_eq!(max_frame_len(19), None);
    }

    #[test]
    fn oversize_string() {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&[0, 1, 0, 1]);
        body.extend_from_slice(&(MAX_STRING_LEN + 1).to_be_bytes());
        body.extend_from_slice(&vec![b'a'; MAX_STRING + 1]);
        let e = decode(&raw(T_HELLO, &body)).unwrap_err();
        assert_eq!(e, WireError::StringTooLong { len: MAX_STRING + 1 });
        assert_eq!(e.fault(), Fault::TooLarge);
        // Refused from the length alone, before the bytes would be read.
        let b = raw(T_WELCOME, &[0, 1, 0xff, 0xff]);
        assert_eq!(decode(&b), Err(WireError::StringTooLong { len: 0xffff }));
        let f = Frame::RegisterDisk {
            disk: "é".repeat(513),
            size: 1,
            block_size: 512,
            source: [0; 16],
            reenroll: false,
        };
        assert_eq!(f.check(), Err(WireError::StringTooLong { len: 1026 }));
    }

    #[test]
    fn invalid_utf8() {
        let b = raw(T_WELCOME, &[0, 1, 0, 2, 0xc3, 0x28]);
        assert!(matches!(decode(&b), Err(WireError::InvalidUtf8(_))));
    }

    #[test]
    fn bad_magic() {
        let mut b = encode(&Frame::Hello { min_version: 1, max_version: 1, agent: String::new() });
        b[5 + 7] = 2;
        let e = decode(&b).unwrap_err();
        assert_eq!(e, WireError::BadMagic(*b"SITEREP\x02"));
        assert_eq!(e.fault(), Fault::Violation);
    }

    #[test]
    fn empty_version_range() {
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&[0, 2, 0, 1, 0, 0]);
        assert_eq!(decode(&raw(T_HELLO, &body)), Err(WireError::BadVersionRange { min: 2, max: 1 }));
    }

    #[test]
    fn have_counts_over_max() {
        let n = MAX_HAVE_COUNT + 1;
        let e = decode(&raw(T_HAVE_QUERY, &n.to_be_bytes())).unwrap_err();
        assert_eq!(e, WireError::CountTooLarge { frame: "HaveQuery", count: u64::from(n) });
        assert_eq!(e.fault(), Fault::TooLarge);
        let e = decode(&raw(T_HAVE_QUERY, &u32::MAX.to_be_bytes())).unwrap_err();
        assert!(matches!(e, WireError::CountTooLarge { .. }));
        let e = decode(&raw(T_HAVE_REPLY, &n.to_be_bytes())).unwrap_err();
        assert_eq!(e, WireError::CountTooLarge { frame: "HaveReply", count: u64::from(n) });
        let f = Frame::HaveQuery { hashes: vec![[0; 32]; MAX_HAVE + 1] };
        assert!(matches!(f.check(), Err(WireError::CountTooLarge { .. })));
        // A count the bytes do not back is truncated, and nothing was allocated for it.
        assert_eq!(
            decode(&raw(T_HAVE_QUERY, &[0, 0, 0, 2, 1])),
            Err(WireError::Truncated { frame: "HaveQuery" })
        );
    }

    #[test]
    fn have_reply_padding_bits() {
        assert_eq!(decode(&raw(T_HAVE_REPLY, &[0, 0, 0, 3, 0b1000])), Err(WireError::HaveReplyPadding));
        assert_eq!(
            decode(&raw(T_HAVE_REPLY, &[0, 0, 0, 3, 0b101])),
            Ok(Frame::HaveReply { have: vec![true, false, true] })
        );
    }

    #[test]
    fn chunk_lengths() {
        let chunk = |len: u32| {
            let mut body = 0u64.to_be_bytes().to_vec();
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&[0; 32]);
            body.push(DATA_KNOWN);
            raw(T_CHUNK, &body)
        };
        assert_eq!(decode(&chunk(0)), Err(WireError::BadExtent { offset: 0, len: 0 }));
        let e = decode(&chunk(MAX_CHUNK + 1)).unwrap_err();
        assert_eq!(e, WireError::ChunkTooLarge { len: MAX_CHUNK + 1 });
        assert_eq!(e.fault(), Fault::TooLarge);
        assert!(decode(&chunk(1)).is_ok());
        assert!(decode(&chunk(MAX_CHUNK)).is_ok());
        let f = Frame::Chunk { offset: 0, len: 0, hash: [0; 32], data: ChunkData::Known };
        assert_eq!(f.check(), Err(WireError::BadExtent { offset: 0, len: 0 }));
        let f = Frame::Chunk { offset: u64::MAX, len: 1, hash: [0; 32], data: ChunkData::Known };
        assert_eq!(f.check(), Err(WireError::BadExtent { offset: u64::MAX, len: 1 }));
        let f = Frame::Chunk {
            offset: 0,
            len: 1,
            hash: [0; 32],
            data: ChunkData::Compressed(vec![0; MAX_COMPRESSED as usize + 1]),
        };
        assert_eq!(f.check(), Err(WireError::PayloadTooLarge { len: u64::from(MAX_COMPRESSED) + 1 }));
    }

    #[test]
    fn zero_extents() {
        let zero = |offset: u64, len: u64| raw(T_ZERO, &[offset.to_be_bytes(), len.to_be_bytes()].concat());
        assert_eq!(decode(&zero(5, 0)), Err(WireError::BadExtent { offset: 5, len: 0 }));
        assert_eq!(decode(&zero(u64::MAX, 1)), Err(WireError::BadExtent { offset: u64::MAX, len: 1 }));
        assert_eq!(decode(&zero(u64::MAX - 1, 1)), Ok(Frame::Zero { offset: u64::MAX - 1, len: 1 }));
    }

    #[test]
    fn tags_out_of_range() {
        let begin = |kind: u8, opt: u8| {
            let mut body = vec![0, 1, b'd'];
            body.extend_from_slice(&1u64.to_be_bytes());
            body.extend_from_slice(&[kind, opt]);
            if opt == 1 {
                body.extend_from_slice(&1u64.to_be_bytes());
            }
            raw(T_BEGIN_GENERATION, &body)
        };
        assert!(decode(&begin(2, 1)).is_ok());
        assert_eq!(decode(&begin(3, 0)), Err(WireError::BadTag { field: "GenerationKind", tag: 3 }));
        assert_eq!(decode(&begin(0, 2)), Err(WireError::BadTag { field: "Option", tag: 2 }));
        let mut body = [0u8; 16].to_vec();
        body.push(3);
        assert_eq!(decode(&raw(T_COMMIT, &body)), Err(WireError::BadTag { field: "Consistency", tag: 3 }));
        assert_eq!(
            decode(&raw(T_ERROR, &[2, 0, 1, 0, 0])),
            Err(WireError::BadTag { field: "ErrorClass", tag: 2 })
        );
        let mut body = [0u8; 8].to_vec();
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&[0; 32]);
        body.push(2);
        assert_eq!(decode(&raw(T_CHUNK, &body)), Err(WireError::BadTag { field: "ChunkData", tag: 2 }));
        assert_eq!(
            decode(&raw(T_DISK_STATE, &[0, 0, 2])),
            Err(WireError::BadTag { field: "Option", tag: 2 })
        );
        assert_eq!(
            decode(&raw(T_DISK_STATE, &[0, 0, 0, 7])),
            Err(WireError::BadTag { field: "Option", tag: 7 })
        );
        // `latest` present, but its fields run short.
        let body = [&[0, 0, 1][..], &[0; 16]].concat();
        assert_eq!(decode(&raw(T_DISK_STATE, &body)), Err(WireError::Truncated { frame: "DiskState" }));
    }

    #[test]
    fn hash_query_limits() {
        let q = |offset: u64, len: u64, block: u32| {
            let mut body = vec![0, 1, b'd'];
            body.extend_from_slice(&3u64.to_be_bytes());
            body.extend_from_slice(&offset.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&block.to_be_bytes());
            decode(&raw(T_HASH_QUERY, &body))
        };
        let max = MAX_HASHES as u64;
        // MAX_HASHES blocks, the last one short, is the most a query covers.
        assert!(q(0, max * 4096, 4096).is_ok());
        assert!(q(4096, max * 4096 - 1, 4096).is_ok());
        let e = q(0, max * 4096 + 1, 4096).unwrap_err();
        assert_eq!(e, WireError::HashCountTooLarge { frame: "HashQuery", count: max + 1 });
        assert_eq!(e.fault(), Fault::TooLarge);
        let e = q(0, u64::MAX, MAX_HASH_BLOCK).unwrap_err();
        assert!(matches!(e, WireError::HashCountTooLarge { .. }), "{e:?}");
        // Blocks: powers of two in range, offsets aligned to them.
        for (offset, block) in
            [(0, 4095), (0, 2048), (0, 6 << 10), (0, MAX_HASH_BLOCK * 2), (512, 4096), (0, 0)]
        {
            let e = q(offset, 4096, block).unwrap_err();
            assert_eq!(e, WireError::BadHashBlock { block, offset });
            assert_eq!(e.fault(), Fault::Violation);
        }
        assert!(q(MAX_HASH_BLOCK as u64 * 3, 1, MAX_HASH_BLOCK).is_ok());
        // The range is an extent: not empty, no overflow.
        assert_eq!(q(0, 0, 4096), Err(WireError::BadExtent { offset: 0, len: 0 }));
        assert_eq!(
            q(u64::MAX - 4095, 4096, 4096),
            Err(WireError::BadExtent { offset: u64::MAX - 4095, len: 4096 })
        );
        let f = Frame::HashQuery { disk: "d".into(), point: 1, offset: 0, len: 1 << 40, block: 4096 };
        assert!(matches!(f.check(), Err(WireError::HashCountTooLarge { .. })));
        assert_eq!(hash_count(1, 4096), 1);
        assert_eq!(hash_count(4097, 4096), 2);
        assert_eq!(hash_count(64 << 20, 64 << 10), 1024);
    }

    #[test]
    fn hashes_limits() {
        let h = |offset: u64, block: u32, count: u32, present: usize| {
            let mut body = offset.to_be_bytes().to_vec();
            body.extend_from_slice(&block.to_be_bytes());
            body.extend_from_slice(&count.to_be_bytes());
            body.extend_from_slice(&vec![7; 32 * present]);
            decode(&raw(T_HASHES, &body))
        };
        assert_eq!(
            h(8192, 4096, 2, 2),
            Ok(Frame::Hashes { offset: 8192, block: 4096, hashes: vec![[7; 32]; 2] })
        );
        // The count is refused before anything is allocated for it, bytes present or not.
        let n = MAX_HASHES_COUNT + 1;
        assert_eq!(
            h(0, 4096, n, 0),
            Err(WireError::HashCountTooLarge { frame: "Hashes", count: u64::from(n) })
        );
        assert!(matches!(h(0, 4096, u32::MAX, 0), Err(WireError::HashCountTooLarge { .. })));
        assert_eq!(h(0, 4096, 3, 2), Err(WireError::Truncated { frame: "Hashes" }));
        assert_eq!(h(0, 4096, 1, 2), Err(WireError::TrailingBytes { frame: "Hashes", extra: 32 }));
        assert_eq!(h(100, 4096, 0, 0), Err(WireError::BadHashBlock { block: 4096, offset: 100 }));
        assert_eq!(h(0, 1000, 0, 0), Err(WireError::BadHashBlock { block: 1000, offset: 0 }));
        let f = Frame::Hashes { offset: 0, block: 4096, hashes: vec![[0; 32]; MAX_HASHES + 1] };
        assert!(matches!(f.check(), Err(WireError::HashCountTooLarge { .. })));
    }

    #[test]
    fn truncated_bodies() {
        for f in samples() {
            let b = encode(&f);
            // Every strict prefix of a body, relabelled as a whole frame, is refused.
            for cut in 5..b.len() {
                let mut short = b[..cut].to_vec();
                short[..4].copy_from_slice(&(u32::try_from(cut - 4).unwrap()).to_be_bytes());
                assert!(decode(&short).is_err(), "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "RegisterDisk frame cannot be encoded: string of 1025 bytes")]
    fn encode_refuses_a_frame_over_a_limit() {
        let f = Frame::RegisterDisk {
            disk: "x".repeat(MAX_STRING + 1),
            size: 1,
            block_size: 512,
            source: [0; 16],
            reenroll: false,
        };
        f.encode(&mut Vec::new());
    }

    #[test]
    fn error_codes_and_classes() {
        for code in [ERR_CORRUPT_CHUNK, ERR_STORAGE, ERR_BUSY] {
            assert!(default_class(code).is_retryable());
        }
        for code in [
            ERR_VERSION,
            ERR_AUTH,
            ERR_BAD_REQUEST,
            ERR_TOO_LARGE,
            ERR_NO_SUCH_DISK,
            ERR_DISK_MISMATCH,
            0,
            999,
        ] {
            assert!(!default_class(code).is_retryable());
        }
        let f = Frame::error(ERR_STORAGE, "é".repeat(600));
        f.check().unwrap();
        match f {
            Frame::Error { class, code, message } => {
                assert_eq!((class, code), (ErrorClass::Retryable, ERR_STORAGE));
                assert_eq!(message.len(), 1024);
            }
            f => panic!("{f:?}"),
        }
    }

    proptest! {
        #[test]
        fn arbitrary_frames_round_trip(f in arb_frame()) {
            prop_assert_eq!(f.check(), Ok(()));
            let b = encode(&f);
            prop_assert_eq!(b.len(), f.encoded_len());
            prop_assert!(b.len() - 4 <= max_frame_len(f.frame_type()).unwrap() as usize);
            prop_assert_eq!(decode(&b), Ok(f));
        }

        #[test]
        fn arbitrary_bodies_never_panic(ty in 0u8..=18, body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(f) = Frame::decode(ty, &body) {
                // What decodes is canonical: it encodes back to the same bytes.
                prop_assert_eq!(&encode(&f)[5..], &body[..]);
            }
        }
    }
}
