//! The transmission phase ("Transmission" and "Request types" in `doc/proto.md`): requests are
//! parsed, then validated against the export into a typed [`Command`] before any engine sees
//! them; replies are encoded here, simple or structured as negotiated.

use crate::consts::*;
use crate::{Errno, ExportInfo, MAX_EXTENTS, MAX_PAYLOAD};

/// A request header as it came off the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRequest {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A header that does not start with the request magic: the session must end (hard disconnect).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

impl RawRequest {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Result<Self, BadMagic> {
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Payload bytes that follow this header on the wire, whether or not the request is valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// A validated request, ready for an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool, no_hole: bool, fast: bool },
    Cache { offset: u64, len: u32 },
    BlockStatus { offset: u64, len: u32, req_one: bool },
    Disconnect,
}

impl Command {
    /// The byte range this command changes on the disk, if it changes any.
    pub fn modifies(&self) -> Option<(u64, u64)> {
        match *self {
            Command::Write { offset, len, .. }
            | Command::Trim { offset, len, .. }
            | Command::WriteZeroes { offset, len, .. } => Some((offset, u64::from(len))),
            _ => None,
        }
    }
}

/// What the session negotiated that validation depends on.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub has_contexts: bool,
    pub min_block: u32,
}

impl Session {
    pub fn new(export: &ExportInfo, structured: bool, has_contexts: bool) -> Self {
        Self {
            size: export.size,
            read_only: export.read_only,
            structured,
            has_contexts,
            min_block: export.block_sizes.minimum,
        }
    }

    /// Validates a request (spec "Request types" and "Error values").
    ///
    /// The caller still reads `raw.payload_len()` bytes off the socket when this fails, so the
    /// stream stays in step, unless the payload exceeds what it is willing to discard.
    pub fn validate(&self, raw: &RawRequest) -> Result<Command, Errno> {
        let allowed = match raw.kind {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => return Err(Errno::Inval),
        };
        if raw.flags & !allowed != 0 {
            return Err(Errno::Inval);
        }
        let fua = raw.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (raw.offset, raw.length);
        match raw.kind {
            CMD_DISC => return Ok(Command::Disconnect),
            CMD_FLUSH => {
                return if offset == 0 && len == 0 { Ok(Command::Flush) } else { Err(Errno::Inval) };
            }
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if self.read_only => return Err(Errno::Perm),
            CMD_BLOCK_STATUS if !self.has_contexts => return Err(Errno::Inval),
            _ => {}
        }
        if len == 0 {
            return Err(Errno::Inval);
        }
        // "Block size constraints": a payload above the advertised maximum is EINVAL (EOVERFLOW
        // is reserved for DF reads the server would have to fragment, which we never do).
        if (raw.kind == CMD_READ || raw.kind == CMD_WRITE) && len > MAX_PAYLOAD {
            return Err(Errno::Inval);
        }
        let min = u64::from(self.min_block.max(1));
        if offset % min != 0 || u64::from(len) % min != 0 {
            return Err(Errno::Inval);
        }
        let in_range = offset.checked_add(u64::from(len)).is_some_and(|end| end <= self.size);
        if !in_range {
            return Err(match raw.kind {
                CMD_WRITE | CMD_WRITE_ZEROES => Errno::NoSpc,
                _ => Errno::Inval,
            });
        }
        Ok(match raw.kind {
            CMD_READ => Command::Read { offset, len, df: raw.flags & CMD_FLAG_DF != 0 },
            CMD_WRITE => Command::Write { offset, len, fua },
            CMD_TRIM => Command::Trim { offset, len, fua },
            CMD_WRITE_ZEROES => Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole: raw.flags & CMD_FLAG_NO_HOLE != 0,
                fast: raw.flags & CMD_FLAG_FAST_ZERO != 0,
            },
            CMD_CACHE => Command::Cache { offset, len },
            CMD_BLOCK_STATUS => {
                Command::BlockStatus { offset, len, req_one: raw.flags & CMD_FLAG_REQ_ONE != 0 }
            }
            _ => unreachable!("kinds filtered above"),
        })
    }
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends the reply for a successful command without payload.
pub fn ok_reply(out: &mut Vec<u8>, cookie: u64, structured: bool) {
    if structured {
        chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    } else {
        simple_reply(out, cookie, 0);
    }
}

/// Appends an error reply: a structured `NBD_REPLY_TYPE_ERROR` chunk with a message when
/// structured replies are on (mandatory for READ), a simple reply otherwise.
pub fn error_reply(out: &mut Vec<u8>, cookie: u64, structured: bool, errno: Errno) {
    if structured {
        let msg = errno.message().as_bytes();
        let msg_len = u16::try_from(msg.len()).expect("errno messages are short constants");
        chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + u32::from(msg_len));
        out.extend_from_slice(&(errno as u32).to_be_bytes());
        out.extend_from_slice(&msg_len.to_be_bytes());
        out.extend_from_slice(msg);
    } else {
        simple_reply(out, cookie, errno as u32);
    }
}

/// Appends the header that precedes `len` bytes of READ data at `offset`: a simple reply, or an
/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk (`done` marks it the last chunk).
pub fn read_data_header(out: &mut Vec<u8>, cookie: u64, structured: bool, offset: u64, len: u32, done: bool) {
    if structured {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_DATA, 8 + len);
        out.extend_from_slice(&offset.to_be_bytes());
    } else {
        simple_reply(out, cookie, 0);
    }
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn read_hole(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, done: bool) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for context `id` with `(length, flags)`
/// descriptors (at least one, at most [`MAX_EXTENTS`]).
pub fn block_status(out: &mut Vec<u8>, cookie: u64, id: u32, extents: &[(u32, u32)], done: bool) {
    assert!(extents.len() <= MAX_EXTENTS, "{} descriptors in one chunk", extents.len());
    let n = u32::try_from(extents.len()).expect("at most MAX_EXTENTS descriptors");
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
    out.extend_from_slice(&id.to_be_bytes());
    for (len, status) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockSizes, MetaContext};
    use proptest::prelude::*;

    fn session(read_only: bool, structured: bool, min: u32) -> Session {
        let e = ExportInfo {
            name: "d".into(),
            description: String::new(),
            size: 1 << 20,
            read_only,
            rotational: false,
            block_sizes: BlockSizes { minimum: min, preferred: 4096, maximum: MAX_PAYLOAD },
            contexts: vec![MetaContext::Allocation],
        };
        Session::new(&e, structured, structured)
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RawRequest {
        RawRequest { flags, kind, cookie: 7, offset, length }
    }

    #[test]
    fn header_round_trips_and_bad_magic_is_rejected() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 1234, 512);
        assert_eq!(RawRequest::parse(&r.encode()), Ok(r));
        let mut b = r.encode();
        b[0] = 0;
        assert!(RawRequest::parse(&b).is_err());
    }

    #[test]
    fn errno_per_spec() {
        let s = session(false, false, 1);
        let size = 1 << 20;
        assert_eq!(s.validate(&req(CMD_WRITE, 0, size - 1, 2)), Err(Errno::NoSpc));
        assert_eq!(s.validate(&req(CMD_WRITE_ZEROES, 0, size, 1)), Err(Errno::NoSpc));
        assert_eq!(s.validate(&req(CMD_READ, 0, size - 1, 2)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_TRIM, 0, u64::MAX, 2)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_READ, 0, 0, 0)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(42, 0, 0, 1)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_READ, 1 << 9, 0, 1)), Err(Errno::Inval), "unknown flag");
        assert_eq!(s.validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1)), Err(Errno::Inval), "DF without structured");
        assert_eq!(s.validate(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_FLUSH, 0, 1, 0)), Err(Errno::Inval));
        assert_eq!(s.validate(&req(CMD_BLOCK_STATUS, 0, 0, 1)), Err(Errno::Inval), "no contexts");
        assert_eq!(s.validate(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)), Ok(Command::Flush));
        assert_eq!(s.validate(&req(CMD_CACHE, CMD_FLAG_FUA, 0, 1)), Ok(Command::Cache { offset: 0, len: 1 }));
        let ro = session(true, true, 1);
        assert_eq!(ro.validate(&req(CMD_WRITE, 0, 0, 1)), Err(Errno::Perm));
        assert_eq!(ro.validate(&req(CMD_TRIM, 0, 0, 1)), Err(Errno::Perm));
        assert_eq!(ro.validate(&req(CMD_WRITE_ZEROES, 0, 0, 1)), Err(Errno::Perm));
        assert_eq!(
            ro.validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1)),
            Ok(Command::Read { offset: 0, len: 1, df: true })
        );
        assert_eq!(
            ro.validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 9)),
            Ok(Command::BlockStatus { offset: 0, len: 9, req_one: true })
        );
        let aligned = session(false, false, 512);
        assert_eq!(aligned.validate(&req(CMD_READ, 0, 1, 512)), Err(Errno::Inval));
        assert_eq!(aligned.validate(&req(CMD_READ, 0, 512, 100)), Err(Errno::Inval));
        assert!(aligned.validate(&req(CMD_READ, 0, 512, 1024)).is_ok());
    }

    #[test]
    fn write_zero_flags() {
        let s = session(false, true, 1);
        let f = CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA;
        assert_eq!(
            s.validate(&req(CMD_WRITE_ZEROES, f, 0, 4096)),
            Ok(Command::WriteZeroes { offset: 0, len: 4096, fua: true, no_hole: true, fast: true })
        );
    }

    #[test]
    fn replies_encode() {
        let mut b = Vec::new();
        error_reply(&mut b, 9, true, Errno::Inval);
        assert_eq!(&b[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize, b.len() - 20);
        assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 22);
        b.clear();
        error_reply(&mut b, 9, false, Errno::NoSpc);
        assert_eq!(b.len(), SIMPLE_REPLY_LEN);
        assert_eq!(u32::from_be_bytes(b[4..8].try_into().unwrap()), 28);
        b.clear();
        block_status(&mut b, 1, 2, &[(4096, 1), (512, 0)], true);
        assert_eq!(b.len(), 20 + 4 + 16);
    }

    proptest! {
        #[test]
        fn validated_commands_stay_in_bounds(kind in 0u16..10, flags in any::<u16>(), offset in any::<u64>(),
                                             length in any::<u32>(), ro in any::<bool>(), st in any::<bool>()) {
            let s = session(ro, st, 1);
            let r = req(kind, flags, offset, length);
            prop_assert_eq!(RawRequest::parse(&r.encode()), Ok(r));
            if let Ok(c) = s.validate(&r) {
                if let Some((o, l)) = c.modifies() {
                    prop_assert!(!ro);
                    prop_assert!(o + l <= s.size);
                }
                if let Command::Read { len, .. } | Command::Write { len, .. } = c {
                    prop_assert!(len <= MAX_PAYLOAD && len > 0);
                }
            }
        }
    }
}
