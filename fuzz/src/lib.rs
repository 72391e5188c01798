//! What the fuzz targets share: the exports a handshake offers, and the properties every
//! validated request must have.
//!
//! - `handshake` feeds arbitrary bytes to [`nbd_proto::handshake::Handshake`], chunked by
//!   `wants()`, until it ends; the bytes left after a successful negotiation become requests of
//!   the negotiated session.
//! - `request` parses arbitrary 28-byte headers and validates them against arbitrary sessions.
//!
//! Neither may panic; every request that validates must stay within its export
//! ([`check_request`]).
#![forbid(unsafe_code)]

use nbd_proto::consts::*;
use nbd_proto::transmission::{self, Command, RawRequest, Session};
use nbd_proto::{BlockSizes, ExportInfo, MetaContext, MAX_PAYLOAD};

/// The exports the handshake target offers: the first is the default; sizes are odd on purpose.
pub fn exports() -> Vec<ExportInfo> {
    let contexts = vec![
        MetaContext::Allocation,
        MetaContext::DirtyBitmap("live".into()),
        MetaContext::Changes("live".into()),
    ];
    vec![
        ExportInfo {
            name: "disk".into(),
            description: "a disk".into(),
            size: (64 << 20) + 512,
            read_only: false,
            rotational: false,
            block_sizes: BlockSizes { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD },
            contexts: contexts.clone(),
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size: 1 << 30,
            read_only: true,
            rotational: true,
            block_sizes: BlockSizes { minimum: 4096, preferred: 4096, maximum: MAX_PAYLOAD },
            contexts,
        },
        ExportInfo {
            name: "bare".into(),
            description: "no contexts".into(),
            size: 0,
            read_only: false,
            rotational: false,
            block_sizes: BlockSizes { minimum: 512, preferred: 4096, maximum: MAX_PAYLOAD },
            contexts: Vec::new(),
        },
    ]
}

/// Parses one header and, if it has the request magic, validates it against `session` and
/// checks the result; returns the parsed header. Panics (a fuzzer crash) when a property does
/// not hold.
pub fn check_header(session: &Session, hdr: &[u8; REQUEST_LEN]) -> Option<RawRequest> {
    let magic = u32::from_be_bytes(hdr[..4].try_into().unwrap());
    match RawRequest::parse(hdr) {
        Err(bad) => {
            assert_ne!(magic, REQUEST_MAGIC, "a header with the request magic was refused");
            assert_eq!(bad.0, magic, "BadMagic reports another magic than the header's");
            None
        }
        Ok(raw) => {
            assert_eq!(magic, REQUEST_MAGIC, "a header without the request magic was accepted");
            assert_eq!(&raw.encode(), hdr, "a parsed header does not encode back to its bytes");
            check_request(session, &raw);
            Some(raw)
        }
    }
}

/// Validates `raw` against `session` and checks what came out:
///
/// - every accepted command mirrors the header and stays within the export: nonzero, aligned to
///   the minimum block size, `offset + len <= size` without overflow, READ/WRITE at most
///   `MAX_PAYLOAD`; nothing that modifies the disk passes on a read-only export; FLUSH has no
///   range; BLOCK_STATUS needs contexts; DF needs structured replies;
/// - the payload the driver must consume is exactly a WRITE's length, accepted or not;
/// - the reply encoders frame every outcome correctly.
pub fn check_request(s: &Session, raw: &RawRequest) {
    let expected_payload = if raw.kind == CMD_WRITE { raw.length } else { 0 };
    assert_eq!(raw.payload_len(), expected_payload, "payload length of {raw:?}");
    let result = s.validate(raw);
    let min = u64::from(s.min_block.max(1));
    let in_export = |offset: u64, len: u32| {
        len > 0
            && offset.is_multiple_of(min)
            && u64::from(len).is_multiple_of(min)
            && offset.checked_add(u64::from(len)).is_some_and(|end| end <= s.size)
    };
    match result {
        Ok(cmd) => {
            let (offset, len) = (raw.offset, raw.length);
            match cmd {
                Command::Read { offset: o, len: l, df } => {
                    assert_eq!((raw.kind, o, l), (CMD_READ, offset, len));
                    assert!(l <= MAX_PAYLOAD, "READ of {l} bytes accepted");
                    assert!(!df || s.structured, "DF accepted without structured replies");
                    assert_eq!(df, raw.flags & CMD_FLAG_DF != 0);
                }
                Command::Write { offset: o, len: l, fua } => {
                    assert_eq!((raw.kind, o, l), (CMD_WRITE, offset, len));
                    assert!(l <= MAX_PAYLOAD, "WRITE of {l} bytes accepted");
                    assert_eq!(fua, raw.flags & CMD_FLAG_FUA != 0);
                }
                Command::Trim { offset: o, len: l, fua } => {
                    assert_eq!((raw.kind, o, l), (CMD_TRIM, offset, len));
                    assert_eq!(fua, raw.flags & CMD_FLAG_FUA != 0);
                }
                Command::WriteZeroes { offset: o, len: l, fua, no_hole, fast } => {
                    assert_eq!((raw.kind, o, l), (CMD_WRITE_ZEROES, offset, len));
                    assert_eq!(fua, raw.flags & CMD_FLAG_FUA != 0);
                    assert_eq!(no_hole, raw.flags & CMD_FLAG_NO_HOLE != 0);
                    assert_eq!(fast, raw.flags & CMD_FLAG_FAST_ZERO != 0);
                }
                Command::Cache { offset: o, len: l } => {
                    assert_eq!((raw.kind, o, l), (CMD_CACHE, offset, len))
                }
                Command::BlockStatus { offset: o, len: l, req_one } => {
                    assert_eq!((raw.kind, o, l), (CMD_BLOCK_STATUS, offset, len));
                    assert!(s.has_contexts, "BLOCK_STATUS accepted without a meta context");
                    assert_eq!(req_one, raw.flags & CMD_FLAG_REQ_ONE != 0);
                }
                Command::Flush => {
                    assert_eq!(raw.kind, CMD_FLUSH);
                    assert_eq!((offset, len), (0, 0), "FLUSH with a range accepted");
                }
                Command::Disconnect => assert_eq!(raw.kind, CMD_DISC),
            }
            if !matches!(cmd, Command::Flush | Command::Disconnect) {
                assert!(in_export(offset, len), "{cmd:?} accepted outside the export {s:?}");
            }
            if let Some((o, l)) = cmd.modifies() {
                assert!(!s.read_only, "{cmd:?} accepted on a read-only export");
                assert!(o.checked_add(l).is_some_and(|end| end <= s.size), "{cmd:?} modifies beyond {s:?}");
            }
            let mut out = Vec::new();
            transmission::ok_reply(&mut out, raw.cookie, s.structured);
            let want = if s.structured { CHUNK_HEADER_LEN } else { SIMPLE_REPLY_LEN };
            assert_eq!(out.len(), want);
            assert_eq!(&out[8..16], &raw.cookie.to_be_bytes(), "cookie in the reply");
        }
        Err(errno) => {
            assert_ne!(errno as u32, 0);
            let mut out = Vec::new();
            transmission::error_reply(&mut out, raw.cookie, s.structured, errno);
            if s.structured {
                assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
                assert_eq!(u16::from_be_bytes([out[6], out[7]]), REPLY_TYPE_ERROR);
                assert_eq!(&out[8..16], &raw.cookie.to_be_bytes());
                let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
                assert_eq!(len, out.len() - CHUNK_HEADER_LEN, "error chunk length");
                assert_eq!(u32::from_be_bytes(out[20..24].try_into().unwrap()), errno as u32);
                let msg = u16::from_be_bytes([out[24], out[25]]) as usize;
                assert_eq!(msg + 6, len, "error message length");
            } else {
                assert_eq!(out.len(), SIMPLE_REPLY_LEN);
                assert_eq!(u32::from_be_bytes(out[4..8].try_into().unwrap()), errno as u32);
                assert_eq!(&out[8..16], &raw.cookie.to_be_bytes());
            }
        }
    }
}
