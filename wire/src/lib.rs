//! The versioned agent↔server replication protocol, sans-IO: bytes in, typed [`Frame`]s out, and
//! back. `docs/wire.md` is the specification; every item here cites the section it implements.
//!
//! - [`Frame`] is one message of the protocol, one variant per frame type (§4), with
//!   [`Frame::encode`] appending its whole frame (§2) to a buffer.
//! - [`Decoder`] turns a byte stream, fed in pieces of any size, into frames. It checks every
//!   length against a named maximum before anything is allocated for it (invariant 4 of
//!   `docs/architecture.md`) and copies a chunk's payload once, from the fed bytes into the
//!   frame's own buffer.
//! - [`WireError`] says what was wrong with the peer's bytes and whose fault it is ([`Fault`]);
//!   every decoding error ends the connection.
//! - [`negotiate`] picks the session's version (§6.1).
//! - [`session`] holds the order of frames in a session (§6) as two state machines, the
//!   server's ([`session::ServerSession`]) and the agent's ([`session::AgentSession`]): frames
//!   and the results of actions in, frames to send, actions and refusals out.
//! - [`zero_hash`] is what a piece that reads as zeroes hashes to (§4.16), [`ZeroHashes`] the
//!   few lengths in use, remembered, [`hash_zeroes`] the zeroes of a piece that holds data too;
//!   [`UNREADABLE_HASH`] what the server answers for a piece it cannot read back.
//! - `HashQuery`/`Hashes` (§4.15, §4.16, §6.8) let a resync compare the source's blocks with a
//!   point's without moving the data: [`MAX_HASHES`] per reply, blocks of [`MIN_HASH_BLOCK`]
//!   to [`MAX_HASH_BLOCK`].
//!
//! ```
//! use wire::{Decoder, Frame};
//!
//! let mut bytes = Vec::new();
//! Frame::Progress { next_offset: 1 << 20 }.encode(&mut bytes);
//! Frame::ProgressAck { next_offset: 1 << 20 }.encode(&mut bytes);
//!
//! let mut dec = Decoder::new();
//! dec.feed(&bytes[..7]); // bytes arrive in pieces of any size
//! assert_eq!(dec.next_frame(), Ok(None));
//! dec.feed(&bytes[7..]);
//! assert_eq!(dec.next_frame(), Ok(Some(Frame::Progress { next_offset: 1 << 20 })));
//! assert_eq!(dec.next_frame(), Ok(Some(Frame::ProgressAck { next_offset: 1 << 20 })));
//! assert_eq!(dec.next_frame(), Ok(None));
//! ```
//!
//! Nothing here reads or writes a socket, keeps time or touches a disk: bytes, TLS, timeouts,
//! the store and the shim belong to the agent and the server, which drive these machines.
#![forbid(unsafe_code)]
#![deny(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod decoder;
mod error;
mod frame;
mod hash;
pub mod session;

pub use decoder::Decoder;
pub use error::{Fault, WireError};
pub use frame::{
    default_class, hash_count, ChunkData, Consistency, ErrorClass, Frame, GenerationKind, Hash, InitialSync,
    PointRef, SourceId, ERR_AUTH, ERR_BAD_REQUEST, ERR_BUSY, ERR_CORRUPT_CHUNK, ERR_DISK_MISMATCH,
    ERR_DIVERGED, ERR_NO_SUCH_DISK, ERR_OTHER_SOURCE, ERR_RESYNC_REQUIRED, ERR_STORAGE, ERR_TOO_LARGE,
    ERR_VERSION,
};
pub use hash::{hash_zeroes, zero_hash, ZeroHashes, UNREADABLE_HASH};

/// The newest protocol version this crate speaks (§7).
pub const VERSION: u16 = 2;
/// The oldest protocol version this crate speaks (§7).
pub const MIN_VERSION: u16 = 2;

/// The first bytes of every `Hello` body (§4.1): not this protocol if they differ.
pub const MAGIC: [u8; 8] = *b"SITEREP\x01";

/// Largest value of a frame's length field, i.e. type byte plus body (§2, §3): room for a
/// compressed [`MAX_CHUNK`] (zstd's worst case adds well under 1 MiB) plus its header.
pub const MAX_FRAME: u32 = (5 << 20) + 4096;
/// Largest uncompressed length of one chunk (§3, §4.6).
pub const MAX_CHUNK: u32 = 4 << 20;
/// Largest compressed payload of one chunk: what is left of [`MAX_FRAME`] after the chunk's
/// fixed fields (§4.6).
pub const MAX_COMPRESSED: u32 = MAX_FRAME - frame::CHUNK_FIXED;
/// Most hashes in one `HaveQuery`, and answers in one `HaveReply` (§3, §4.8).
pub const MAX_HAVE: usize = MAX_HAVE_COUNT as usize;
/// [`MAX_HAVE`] as the type of the `u32` count that carries it (§4.8).
pub(crate) const MAX_HAVE_COUNT: u32 = 1024;
/// Longest string, in bytes of UTF-8 (§1, §3).
pub const MAX_STRING: usize = MAX_STRING_LEN as usize;
/// [`MAX_STRING`] as the type of the `u16` length that carries it (§1).
pub(crate) const MAX_STRING_LEN: u16 = 1024;
/// Most hashes in one `Hashes` reply, and so most blocks one `HashQuery` covers (§3, §4.15).
pub const MAX_HASHES: usize = MAX_HASHES_COUNT as usize;
/// [`MAX_HASHES`] as the type of the `u32` count that carries it (§4.16).
pub(crate) const MAX_HASHES_COUNT: u32 = 4096;
/// Smallest block a `HashQuery` may ask hashes of (§3, §4.15).
pub const MIN_HASH_BLOCK: u32 = 4 << 10;
/// Largest block a `HashQuery` may ask hashes of (§3, §4.15).
pub const MAX_HASH_BLOCK: u32 = 64 << 20;

// The limits fit together, checked at compile time.
const _: () = assert!(MIN_VERSION <= VERSION);
// A chunk zstd cannot shrink still fits in a frame (zstd's bound is n + n/256 + 64 KiB at most).
const _: () = assert!(MAX_CHUNK + MAX_CHUNK / 256 + (64 << 10) <= MAX_COMPRESSED);
// A full Hashes reply fits in a frame; the hash blocks are powers of two.
const _: () = assert!(1 + 8 + 4 + 4 + 32 * MAX_HASHES_COUNT as u64 <= MAX_FRAME as u64);
const _: () = assert!(MIN_HASH_BLOCK.is_power_of_two() && MAX_HASH_BLOCK.is_power_of_two());
const _: () = assert!(MIN_HASH_BLOCK <= MAX_HASH_BLOCK);

/// The version a session speaks (§6.1): the highest one both sides support, or `None` if their
/// ranges do not overlap (or a range is empty).
pub fn negotiate(client_min: u16, client_max: u16, server_min: u16, server_max: u16) -> Option<u16> {
    let lo = client_min.max(server_min);
    let hi = client_max.min(server_max);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiate_picks_highest_common() {
        assert_eq!(negotiate(1, 1, 1, 1), Some(1));
        assert_eq!(negotiate(1, 3, 2, 5), Some(3));
        assert_eq!(negotiate(2, 5, 1, 3), Some(3));
        assert_eq!(negotiate(1, 9, 4, 4), Some(4));
        assert_eq!(negotiate(1, 2, 3, 4), None);
        assert_eq!(negotiate(3, 4, 1, 2), None);
        // An empty range overlaps nothing.
        assert_eq!(negotiate(3, 2, 1, 5), None);
        assert_eq!(negotiate(MIN_VERSION, VERSION, MIN_VERSION, VERSION), Some(VERSION));
    }
}
