//! What can be wrong with a peer's bytes (`docs/wire.md` §2, §3, §5).

use crate::frame::{fit_string, ErrorClass, Frame, ERR_BAD_REQUEST, ERR_TOO_LARGE};
use crate::{
    MAX_CHUNK, MAX_COMPRESSED, MAX_FRAME, MAX_HASHES, MAX_HASH_BLOCK, MAX_HAVE, MAX_STRING, MIN_HASH_BLOCK,
};

/// A frame that cannot be accepted. Decoding errors are final: the connection must be closed
/// (after sending [`WireError::error_frame`], if the sender is to learn why). [`Frame::check`]
/// returns the same errors for a frame this side is about to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// A frame length of 0: every frame has at least its type byte (§2).
    #[error("frame length 0")]
    EmptyFrame,
    /// A frame length above [`MAX_FRAME`] (§2), refused before anything is allocated.
    #[error("frame length {len} exceeds MAX_FRAME ({MAX_FRAME})")]
    FrameTooLarge { len: u32 },
    /// A frame longer than the largest valid frame of its type (§4), refused before anything is
    /// allocated.
    #[error("{frame} frame length {len} exceeds its largest valid length {max}")]
    FrameTooLong { frame: &'static str, len: u32, max: u32 },
    /// A type byte no frame has (§4).
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A `Hello` that does not start with [`crate::MAGIC`]: the peer does not speak this
    /// protocol (§4.1).
    #[error("bad magic {0:02x?} in Hello")]
    BadMagic([u8; 8]),
    /// The body ends before its last field (§2).
    #[error("{frame} frame body is truncated")]
    Truncated { frame: &'static str },
    /// Bytes left over after the last field of a body (§2).
    #[error("{frame} frame body has {extra} trailing bytes")]
    TrailingBytes { frame: &'static str, extra: usize },
    /// An enumeration's tag (an option, a kind, a class...) outside its defined values (§1, §4).
    #[error("{field} tag {tag} is out of range")]
    BadTag { field: &'static str, tag: u8 },
    /// A string longer than [`MAX_STRING`] bytes (§1).
    #[error("string of {len} bytes exceeds MAX_STRING ({MAX_STRING})")]
    StringTooLong { len: usize },
    /// A string that is not UTF-8 (§1).
    #[error("string is not UTF-8")]
    InvalidUtf8(#[source] std::str::Utf8Error),
    /// A `Hello` whose version range is empty (§4.1).
    #[error("empty version range {min}..={max}")]
    BadVersionRange { min: u16, max: u16 },
    /// An empty extent, or one whose end does not fit in 64 bits (§4.6, §4.7).
    #[error("bad extent: offset {offset}, length {len}")]
    BadExtent { offset: u64, len: u64 },
    /// A chunk longer than [`MAX_CHUNK`] uncompressed (§4.6).
    #[error("chunk length {len} exceeds MAX_CHUNK ({MAX_CHUNK})")]
    ChunkTooLarge { len: u32 },
    /// A compressed payload longer than [`MAX_COMPRESSED`] (§4.6).
    #[error("compressed payload of {len} bytes exceeds MAX_COMPRESSED ({MAX_COMPRESSED})")]
    PayloadTooLarge { len: u64 },
    /// A `HaveQuery` or `HaveReply` count above [`MAX_HAVE`] (§4.8, §4.9).
    #[error("{frame} count {count} exceeds MAX_HAVE ({MAX_HAVE})")]
    CountTooLarge { frame: &'static str, count: u64 },
    /// A `HaveReply` with bits set past its count (§4.9).
    #[error("HaveReply has bits set past its count")]
    HaveReplyPadding,
    /// A `HashQuery` or `Hashes` block size that is not a power of two from [`MIN_HASH_BLOCK`]
    /// to [`MAX_HASH_BLOCK`], or a `HashQuery` offset that is not a multiple of it (§4.15).
    #[error(
        "hash block {block} at offset {offset}: blocks are powers of two from {MIN_HASH_BLOCK} to \
         {MAX_HASH_BLOCK} and offsets multiples of them"
    )]
    BadHashBlock { block: u32, offset: u64 },
    /// A `HashQuery` covering more than [`MAX_HASHES`] blocks, or a `Hashes` reply with more
    /// hashes (§4.15, §4.16).
    #[error("{frame} count {count} exceeds MAX_HASHES ({MAX_HASHES})")]
    HashCountTooLarge { frame: &'static str, count: u64 },
}

/// Whose fault a [`WireError`] is, and so what the connection's end is reported as (§5).
/// Either way the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// The peer broke the format or a rule of the protocol: bytes that do not parse, a tag out
    /// of range, a wrong magic, an empty extent. A bug or a peer that is not ours.
    Violation,
    /// Well-formed, but a length or count above a named limit: a peer with other limits, or a
    /// hostile one.
    TooLarge,
}

impl WireError {
    /// Whose fault this error is.
    pub fn fault(&self) -> Fault {
        match self {
            WireError::FrameTooLarge { .. }
            | WireError::FrameTooLong { .. }
            | WireError::StringTooLong { .. }
            | WireError::ChunkTooLarge { .. }
            | WireError::PayloadTooLarge { .. }
            | WireError::CountTooLarge { .. }
            | WireError::HashCountTooLarge { .. } => Fault::TooLarge,
            WireError::EmptyFrame
            | WireError::UnknownType(_)
            | WireError::BadMagic(_)
            | WireError::Truncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::BadTag { .. }
            | WireError::InvalidUtf8(_)
            | WireError::BadVersionRange { .. }
            | WireError::BadExtent { .. }
            | WireError::HaveReplyPadding
            | WireError::BadHashBlock { .. } => Fault::Violation,
        }
    }

    /// The error code that reports this error to the peer (§5): [`ERR_TOO_LARGE`] or
    /// [`ERR_BAD_REQUEST`].
    pub fn code(&self) -> u16 {
        match self.fault() {
            Fault::TooLarge => ERR_TOO_LARGE,
            Fault::Violation => ERR_BAD_REQUEST,
        }
    }

    /// The `Error` frame to send the peer before closing (§5, §6.7): fatal, since the same
    /// bytes would fail again.
    pub fn error_frame(&self) -> Frame {
        Frame::Error { class: ErrorClass::Fatal, code: self.code(), message: fit_string(self.to_string()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classified_and_coded() {
        let e = WireError::FrameTooLarge { len: u32::MAX };
        assert_eq!(e.fault(), Fault::TooLarge);
        assert_eq!(e.code(), ERR_TOO_LARGE);
        let e = WireError::UnknownType(200);
        assert_eq!(e.fault(), Fault::Violation);
        assert_eq!(e.code(), ERR_BAD_REQUEST);
        match e.error_frame() {
            Frame::Error { class, code, message } => {
                assert_eq!(class, ErrorClass::Fatal);
                assert_eq!(code, ERR_BAD_REQUEST);
                assert_eq!(message, "unknown frame type 200");
            }
            f => panic!("{f:?}"),
        }
        e.error_frame().check().unwrap();
    }
}
