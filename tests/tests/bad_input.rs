//! Bad input, byte for byte: a raw NBD client written here sends exactly the malformed,
//! out-of-range and abusive bytes a real client library would refuse to send, and checks the
//! server's exact answer (option reply type, errno, reply form, or a disconnect).
//!
//! Every test also proves the damage stays contained: a well-behaved client connected before the
//! bad exchange is still served afterwards, a new client can connect, `nbdinfo` (libnbd) still
//! works, the server exits 0 on SIGTERM, and the image on disk is exactly what the successful
//! writes made it (a rejected or truncated write leaves no trace).
//!
//! Every test runs against both engines: `<test>::uring` and `<test>::sync`.
//!
//! Option frames, their data and request headers are built with `nbd_proto`'s encoders (the
//! ones the shim's own client uses; `nbdinfo`, `nbdsh` and the witness prove them against the
//! server in every test) and then bent here where a test wants them malformed. The protocol
//! numbers and everything read back from the server are written out below from the spec
//! (NetworkBlockDevice/nbd `doc/proto.md`) instead of being imported, so that a misreading of
//! the server's answers cannot be shared by the client and the server.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use nbd_proto::option;
use nbd_proto::transmission::RawRequest;
use siterep_tests::image::{self, Rng, KIB, MIB};
use siterep_tests::{nbdsh, run, scratch_dir, show_output, tool, Serve, Server};

// ---------------------------------------------------------------------------------------------
// Protocol numbers ("Handshake", "Option types", "Request types", "Error values")

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;
const CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_READ_ONLY: u16 = 1 << 1;
const FLAG_SEND_DF: u16 = 1 << 7;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_DF: u16 = 1 << 2;

const REPLY_FLAG_DONE: u16 = 1 << 0;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The largest READ/WRITE payload the server advertises (`NBD_INFO_BLOCK_SIZE` maximum).
const MAX_PAYLOAD: u32 = 64 << 20;
/// The minimum block size the server advertises for a file opened with `--direct`.
const DIRECT_BLOCK: u32 = 4096;
/// `siterep serve`'s default export name; the empty name selects it too.
const EXPORT: &str = "siterep";

/// How long any single read or write on a test socket may block before the test fails as hung.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server gets to close a connection it should close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest option reply this client accepts (the server's replies are tiny).
const MAX_OPTION_REPLY: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// The image

const SIZE: u64 = 8 * MIB;
/// Data ranges of the scratch image; the rest is hole, so structured READs of 64 KiB and more
/// may come back as OFFSET_DATA and OFFSET_HOLE chunks.
const DATA: &[(u64, u64)] = &[(0, MIB), (3 * MIB, 2 * MIB), (SIZE - 64 * KIB, 64 * KIB)];
/// The block the witness client writes (and only it).
const WITNESS_BLOCK: u64 = 6 * MIB;
/// Where tests put their own (successful or attempted) writes: a hole in the image.
const SCRATCH: u64 = 5 * MIB + 256 * KIB;

// ---------------------------------------------------------------------------------------------
// Running each test on both engines

macro_rules! on_both_engines {
    ($($(#[$attr:meta])* $name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                $(#[$attr])*
                fn uring() {
                    super::$name("uring");
                }
                #[test]
                $(#[$attr])*
                fn sync() {
                    super::$name("sync");
                }
            }
        )*
    };
}

on_both_engines!(
    option_with_bad_magic_closes,
    unknown_client_flags_close,
    unknown_option_is_unsupported_and_haggling_continues,
    malformed_options_are_invalid,
    huge_option_is_discarded_as_too_big,
    starttls_is_unsupported,
    unknown_export_name,
    request_with_bad_magic_closes,
    requests_beyond_the_end,
    offset_plus_length_wrapping,
    zero_length_requests,
    oversize_read_and_write,
    unaligned_requests_with_direct,
    unknown_command_type,
    unknown_and_misplaced_flags,
    read_only_export_refuses_changes,
    block_status_needs_a_context,
    flush_with_a_range,
    truncated_requests_then_disconnect,
    pipelined_reads_match_by_cookie,
    disc_closes_after_answering,
    nbdsh_without_strict_mode,
    stalled_readers_do_not_block_others,
    shutdown_with_stalled_readers,
);

// ---------------------------------------------------------------------------------------------
// A raw NBD client

/// A request header's fields.
#[derive(Clone, Copy, Debug)]
struct Req {
    kind: u16,
    flags: u16,
    offset: u64,
    len: u32,
}

fn req(kind: u16, offset: u64, len: u32) -> Req {
    Req { kind, flags: 0, offset, len }
}

impl Req {
    fn flags(self, flags: u16) -> Req {
        Req { flags, ..self }
    }

    fn encode(&self, cookie: u64) -> [u8; 28] {
        RawRequest { flags: self.flags, kind: self.kind, cookie, offset: self.offset, length: self.len }
            .encode()
    }

    /// The header with `magic` in place of the request magic.
    fn encode_with_magic(&self, magic: u32, cookie: u64) -> [u8; 28] {
        let mut b = self.encode(cookie);
        b[..4].copy_from_slice(&magic.to_be_bytes());
        b
    }
}

/// One option reply.
#[derive(Debug)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

/// One complete transmission reply: a simple reply, or every chunk up to `NBD_REPLY_FLAG_DONE`.
struct Reply {
    cookie: u64,
    /// 0 on success, otherwise the NBD errno.
    error: u32,
    /// Structured replies: `(flags, type)` of each chunk in arrival order; empty for a simple reply.
    chunks: Vec<(u16, u16)>,
    /// READ data (holes read as zeroes).
    data: Vec<u8>,
    /// READ bytes covered by OFFSET_DATA and OFFSET_HOLE chunks.
    covered: u64,
    /// The message of an error chunk.
    message: String,
    /// BLOCK_STATUS chunks: context id and `(length, flags)` descriptors.
    status: Vec<(u32, Vec<(u32, u32)>)>,
}

impl Reply {
    fn describe(&self) -> String {
        format!(
            "reply to cookie {:#x}: error {}, chunks {:?}, message {:?}, {} data bytes",
            self.cookie,
            self.error,
            self.chunks,
            self.message,
            self.data.len()
        )
    }
}

/// A request sent and not yet answered.
#[derive(Clone, Copy, Debug)]
struct Outstanding {
    req: Req,
}

/// A raw client on the server's Unix socket.
struct Client {
    sock: UnixStream,
    /// Who this is, for failure messages.
    name: String,
    structured: bool,
    size: u64,
    flags: u16,
    next_cookie: u64,
    outstanding: HashMap<u64, Outstanding>,
    partial: HashMap<u64, Reply>,
}

impl Client {
    /// Connects and reads the fixed-newstyle greeting.
    #[track_caller]
    fn greet(server: &Server, name: &str) -> Client {
        let sock = UnixStream::connect(server.socket())
            .unwrap_or_else(|e| panic!("{name}: connect {}: {e}", server.socket().display()));
        sock.set_read_timeout(Some(IO_TIMEOUT)).expect("set_read_timeout");
        sock.set_write_timeout(Some(IO_TIMEOUT)).expect("set_write_timeout");
        let mut c = Client {
            sock,
            name: name.to_owned(),
            structured: false,
            size: 0,
            flags: 0,
            next_cookie: 0x5eed_0000_0000_0001,
            outstanding: HashMap::new(),
            partial: HashMap::new(),
        };
        let g: [u8; 18] = c.read_array("greeting");
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC, "{name}: greeting {g:02x?}");
        assert_eq!(
            u64::from_be_bytes(g[8..16].try_into().unwrap()),
            IHAVEOPT,
            "{name}: not newstyle: {g:02x?}"
        );
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert!(flags & FLAG_FIXED_NEWSTYLE != 0, "{name}: server is not fixed newstyle: flags {flags:#x}");
        c
    }

    /// Greets and sends the usual client flags (fixed newstyle, no zeroes).
    #[track_caller]
    fn haggle(server: &Server, name: &str) -> Client {
        let mut c = Client::greet(server, name);
        c.send(&CLIENT_FLAGS.to_be_bytes());
        c
    }

    /// A client in the transmission phase on the default export, with or without structured
    /// replies.
    #[track_caller]
    fn connect(server: &Server, name: &str, structured: bool) -> Client {
        let mut c = Client::haggle(server, name);
        if structured {
            c.structured_reply();
        }
        c.go("", &[]);
        c
    }

    #[track_caller]
    fn send(&mut self, bytes: &[u8]) {
        if let Err(e) = self.sock.write_all(bytes) {
            panic!("{}: sending {} bytes failed: {e}", self.name, bytes.len());
        }
    }

    #[track_caller]
    fn read_into(&mut self, buf: &mut [u8], what: &str) {
        if let Err(e) = self.sock.read_exact(buf) {
            panic!("{}: reading {what} ({} bytes) failed: {e}", self.name, buf.len());
        }
    }

    #[track_caller]
    fn read_array<const N: usize>(&mut self, what: &str) -> [u8; N] {
        let mut b = [0u8; N];
        self.read_into(&mut b, what);
        b
    }

    /// Asserts the server closes the connection without sending anything more.
    #[track_caller]
    fn expect_closed(&mut self, why: &str) {
        self.sock.set_read_timeout(Some(CLOSE_TIMEOUT)).expect("set_read_timeout");
        let mut buf = [0u8; 256];
        match self.sock.read(&mut buf) {
            Ok(0) => {}
            // A Unix socket closed with our bytes still unread reports a reset: closed all the same.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "{}: after {why} the server should close the connection, but it sent {n} bytes: {:02x?}",
                self.name,
                &buf[..n]
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
                "{}: after {why} the server should close the connection, but it is still open after {:?}",
                self.name, CLOSE_TIMEOUT
            ),
            Err(e) => panic!("{}: after {why}: unexpected socket error {e}", self.name),
        }
    }

    // --- Option haggling -------------------------------------------------------------------

    #[track_caller]
    fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&option_frame(option, data));
    }

    #[track_caller]
    fn opt_reply(&mut self) -> OptReply {
        let h: [u8; 20] = self.read_array("option reply header");
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
        assert_eq!(magic, REPLY_MAGIC_OPT, "{}: option reply magic: header {h:02x?}", self.name);
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert!(len <= MAX_OPTION_REPLY, "{}: option reply of {len} bytes: header {h:02x?}", self.name);
        let mut data = vec![0u8; len];
        self.read_into(&mut data, "option reply data");
        OptReply { option, kind, data }
    }

    /// Reads replies to `option` until its final one (an ACK or an error) and returns them all.
    #[track_caller]
    fn opt_replies(&mut self, option: u32) -> Vec<OptReply> {
        let mut all = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option, "{}: reply to the wrong option: {r:?}", self.name);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Sends `option` with `data` and asserts its only reply is the error `expected`.
    #[track_caller]
    fn expect_opt_error(&mut self, what: &str, option: u32, data: &[u8], expected: u32) {
        self.option(option, data);
        let replies = self.opt_replies(option);
        assert_eq!(
            replies.len(),
            1,
            "{}: {what}: expected only error {expected:#x}, got {replies:?}",
            self.name
        );
        assert_eq!(
            replies[0].kind,
            expected,
            "{}: {what}: expected option reply {expected:#x}, got {:?} ({:?})",
            self.name,
            replies[0],
            String::from_utf8_lossy(&replies[0].data)
        );
    }

    #[track_caller]
    fn structured_reply(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        let r = self.opt_replies(OPT_STRUCTURED_REPLY);
        assert!(r.len() == 1 && r[0].kind == REP_ACK, "{}: NBD_OPT_STRUCTURED_REPLY: {r:?}", self.name);
        self.structured = true;
    }

    /// `NBD_OPT_GO` for `name`; asserts it succeeds and records the size and flags.
    #[track_caller]
    fn go(&mut self, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.option(OPT_GO, &info_request(name, infos));
        let replies = self.opt_replies(OPT_GO);
        assert_eq!(
            replies.last().map(|r| r.kind),
            Some(REP_ACK),
            "{}: NBD_OPT_GO {name:?} failed: {replies:?}",
            self.name
        );
        let export = replies
            .iter()
            .find(|r| r.kind == REP_INFO && r.data.len() >= 2 && r.data[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap_or_else(|| panic!("{}: NBD_OPT_GO without NBD_INFO_EXPORT: {replies:?}", self.name));
        assert_eq!(export.data.len(), 12, "{}: NBD_INFO_EXPORT length: {export:?}", self.name);
        self.size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        self.flags = u16::from_be_bytes([export.data[10], export.data[11]]);
        assert_eq!(self.size, SIZE, "{}: export size", self.name);
        assert!(self.flags & FLAG_HAS_FLAGS != 0, "{}: transmission flags {:#x}", self.name, self.flags);
        assert_eq!(
            self.flags & FLAG_SEND_DF != 0,
            self.structured,
            "{}: NBD_FLAG_SEND_DF must be set exactly when structured replies were negotiated (flags {:#x})",
            self.name,
            self.flags
        );
        replies
    }

    // --- Transmission -----------------------------------------------------------------------

    fn cookie(&mut self) -> u64 {
        self.next_cookie = self.next_cookie.wrapping_add(0x0001_0000_0001_0001);
        self.next_cookie
    }

    /// Sends a request (and `payload` after it) with a fresh cookie; returns the cookie.
    #[track_caller]
    fn request(&mut self, r: Req, payload: &[u8]) -> u64 {
        let cookie = self.cookie();
        self.request_with_cookie(r, cookie, payload);
        cookie
    }

    #[track_caller]
    fn request_with_cookie(&mut self, r: Req, cookie: u64, payload: &[u8]) {
        assert!(self.outstanding.insert(cookie, Outstanding { req: r }).is_none(), "cookie reused");
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&r.encode(cookie));
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads the next complete reply, whichever request it answers.
    #[track_caller]
    fn reply(&mut self) -> Reply {
        loop {
            let magic = u32::from_be_bytes(self.read_array("reply magic"));
            match magic {
                SIMPLE_REPLY_MAGIC => return self.simple_reply(),
                STRUCTURED_REPLY_MAGIC => {
                    if let Some(done) = self.chunk() {
                        return done;
                    }
                }
                other => panic!("{}: reply with bad magic {other:#010x}", self.name),
            }
        }
    }

    #[track_caller]
    fn simple_reply(&mut self) -> Reply {
        let name = self.name.clone();
        let h: [u8; 12] = self.read_array("simple reply");
        let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let Some(o) = self.outstanding.remove(&cookie) else {
            panic!("{name}: simple reply for cookie {cookie:#x}, which is not outstanding (error {error})");
        };
        if self.structured && o.req.kind == CMD_READ {
            panic!("{name}: simple reply to a READ after structured replies were negotiated: {o:?}, error {error}");
        }
        let mut data = Vec::new();
        if error == 0 && o.req.kind == CMD_READ {
            data = vec![0u8; o.req.len as usize];
            self.read_into(&mut data, "simple READ data");
        }
        let covered = data.len() as u64;
        Reply { cookie, error, chunks: Vec::new(), data, covered, message: String::new(), status: Vec::new() }
    }

    /// Reads one structured chunk (after its magic); returns the reply it completes, if any.
    #[track_caller]
    fn chunk(&mut self) -> Option<Reply> {
        let name = self.name.clone();
        assert!(self.structured, "{name}: structured reply chunk without structured replies negotiated");
        let h: [u8; 16] = self.read_array("chunk header");
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let kind = u16::from_be_bytes([h[2], h[3]]);
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let Some(&o) = self.outstanding.get(&cookie) else {
            panic!("{name}: chunk type {kind} for cookie {cookie:#x}, which is not outstanding");
        };
        assert!(
            u64::from(len) <= u64::from(MAX_PAYLOAD) + 64,
            "{name}: chunk type {kind} of {len} bytes for {o:?}"
        );
        let mut payload = vec![0u8; len as usize];
        self.read_into(&mut payload, "chunk payload");
        let r = self.partial.entry(cookie).or_insert_with(|| Reply {
            cookie,
            error: 0,
            chunks: Vec::new(),
            data: if o.req.kind == CMD_READ { vec![0u8; o.req.len as usize] } else { Vec::new() },
            covered: 0,
            message: String::new(),
            status: Vec::new(),
        });
        r.chunks.push((flags, kind));
        let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap());
        let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
        match kind {
            REPLY_TYPE_NONE => {
                assert_eq!(len, 0, "{name}: NBD_REPLY_TYPE_NONE with a payload");
                assert!(flags & REPLY_FLAG_DONE != 0, "{name}: NBD_REPLY_TYPE_NONE without DONE");
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(o.req.kind, CMD_READ, "{name}: read data chunk for {o:?}");
                assert!(len >= 8, "{name}: short chunk type {kind}");
                let offset = be64(&payload);
                let (n, data) = if kind == REPLY_TYPE_OFFSET_DATA {
                    ((len - 8) as u64, Some(&payload[8..]))
                } else {
                    assert_eq!(len, 12, "{name}: NBD_REPLY_TYPE_OFFSET_HOLE payload length");
                    (u64::from(be32(&payload[8..])), None)
                };
                let start = offset.checked_sub(o.req.offset).filter(|s| s + n <= u64::from(o.req.len));
                let Some(start) = start else {
                    panic!("{name}: chunk type {kind} at {offset}+{n} outside the request {o:?}");
                };
                assert!(n > 0, "{name}: empty chunk type {kind} at {offset}");
                if let Some(d) = data {
                    r.data[start as usize..(start + n) as usize].copy_from_slice(d);
                }
                r.covered += n;
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                assert!(len >= 6, "{name}: short error chunk: {payload:02x?}");
                let errno = be32(&payload);
                let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                let extra = if kind == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
                assert_eq!(
                    payload.len(),
                    6 + msg_len + extra,
                    "{name}: error chunk length does not match its message length: {payload:02x?}"
                );
                assert_ne!(errno, 0, "{name}: error chunk with errno 0");
                assert_eq!(r.error, 0, "{name}: a second error chunk for cookie {cookie:#x}");
                r.error = errno;
                r.message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
            }
            REPLY_TYPE_BLOCK_STATUS => {
                assert_eq!(o.req.kind, CMD_BLOCK_STATUS, "{name}: block status chunk for {o:?}");
                assert!(len >= 12 && (len - 4) % 8 == 0, "{name}: block status chunk of {len} bytes");
                let id = be32(&payload);
                let extents = payload[4..].chunks_exact(8).map(|d| (be32(d), be32(&d[4..]))).collect();
                r.status.push((id, extents));
            }
            other => panic!("{name}: unknown chunk type {other} for {o:?}"),
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return None;
        }
        let r = self.partial.remove(&cookie).expect("entry exists");
        self.outstanding.remove(&cookie);
        if o.req.kind == CMD_READ && r.error == 0 {
            assert_eq!(
                r.covered,
                u64::from(o.req.len),
                "{name}: READ chunks cover {} of {} bytes: {:?}",
                r.covered,
                o.req.len,
                r.chunks
            );
        }
        Some(r)
    }

    /// Sends one request and reads its reply.
    #[track_caller]
    fn call(&mut self, r: Req, payload: &[u8]) -> Reply {
        let cookie = self.request(r, payload);
        let reply = self.reply();
        assert_eq!(reply.cookie, cookie, "{}: reply to {r:?} came with another cookie", self.name);
        reply
    }

    /// Sends one request and asserts it fails with `errno`, in the negotiated form: a simple
    /// reply, or a single `NBD_REPLY_TYPE_ERROR` chunk flagged DONE.
    #[track_caller]
    fn expect_errno(&mut self, what: &str, r: Req, payload: &[u8], errno: u32) {
        let reply = self.call(r, payload);
        let name = &self.name;
        assert_eq!(
            reply.error,
            errno,
            "{name}: {what} ({r:?}) should fail with errno {errno}: {}",
            reply.describe()
        );
        if self.structured {
            assert_eq!(
                reply.chunks,
                vec![(REPLY_FLAG_DONE, REPLY_TYPE_ERROR)],
                "{name}: {what}: the error should be one NBD_REPLY_TYPE_ERROR chunk: {}",
                reply.describe()
            );
        } else {
            assert!(reply.chunks.is_empty() && reply.data.is_empty(), "{name}: {what}: {}", reply.describe());
        }
    }

    /// Sends one request and asserts it succeeds.
    #[track_caller]
    fn expect_ok(&mut self, what: &str, r: Req, payload: &[u8]) -> Reply {
        let reply = self.call(r, payload);
        assert_eq!(reply.error, 0, "{}: {what} ({r:?}) should succeed: {}", self.name, reply.describe());
        reply
    }

    /// Reads `len` bytes at `offset` and compares them with the model of the image.
    #[track_caller]
    fn verify(&mut self, model: &[u8], offset: u64, len: u32) {
        let reply = self.expect_ok("READ", req(CMD_READ, offset, len), &[]);
        let what = format!("{}: READ {len} bytes at {offset}", self.name);
        image::assert_same_bytes(&what, &reply.data, &model[offset as usize..offset as usize + len as usize]);
    }

    /// A soft disconnect: NBD_CMD_DISC, then the server closes.
    #[track_caller]
    fn disconnect(mut self) {
        self.request(req(CMD_DISC, 0, 0), &[]);
        self.expect_closed("NBD_CMD_DISC");
    }
}

/// One option request carrying `data` as given.
fn option_frame(option: u32, data: &[u8]) -> Vec<u8> {
    option::frame(option, data).expect("option data fits its length field")
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name, number of info requests, the requests.
fn info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    option::info_data(name, infos).expect("info request fits its fields")
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name, number of queries, the queries.
fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    option::meta_context_data(name, queries).expect("meta context request fits its fields")
}

fn mode(structured: bool) -> &'static str {
    if structured {
        "structured"
    } else {
        "simple"
    }
}

// ---------------------------------------------------------------------------------------------
// The fixture: a server, a model of its image, and a well-behaved witness client

struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    /// What the image must contain.
    model: Vec<u8>,
    server: Server,
    /// Connected (structured replies, transmission phase) before any bad input is sent.
    witness: Client,
    read_only: bool,
    /// How many times the witness has written its block.
    rounds: u64,
}

/// How the server is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    ReadOnly,
    /// `--direct`: the minimum block size becomes 4096.
    Direct,
}

impl Fixture {
    #[track_caller]
    fn start(test: &str, engine: &str) -> Fixture {
        Fixture::start_with(test, engine, Variant::Plain)
    }

    #[track_caller]
    fn start_with(test: &str, engine: &str, variant: Variant) -> Fixture {
        let dir = scratch_dir(&format!("{test}-{engine}"));
        let image = dir.path().join("disk.img");
        let model = image::create_with_data(&image, SIZE, DATA, 0xbad1);
        let mut serve = Serve::new(&image).engine(engine);
        match variant {
            Variant::Plain => {}
            Variant::ReadOnly => serve = serve.read_only(),
            Variant::Direct => serve = serve.direct(),
        }
        let server = serve.start();
        let mut witness = Client::connect(&server, "witness", true);
        witness.verify(&model, 0, 4096);
        Fixture {
            _dir: dir,
            image,
            model,
            server,
            witness,
            read_only: variant == Variant::ReadOnly,
            rounds: 0,
        }
    }

    /// Records a successful write in the model.
    fn wrote(&mut self, offset: u64, data: &[u8]) {
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    /// Proves other clients are still served: the witness reads (and, unless read-only, writes
    /// and reads back), a new client connects and reads, and nbdinfo reads the size.
    #[track_caller]
    fn check_others(&mut self) {
        self.rounds += 1;
        for (offset, len) in [(0, 64 * KIB as u32), (MIB - 4096, 8192), (SIZE - 8192, 8192)] {
            self.witness.verify(&self.model, offset, len);
        }
        if !self.read_only {
            let block = Rng::new(self.rounds).bytes(4096);
            self.witness.expect_ok(
                "witness WRITE",
                req(CMD_WRITE, WITNESS_BLOCK, 4096).flags(CMD_FLAG_FUA),
                &block,
            );
            self.wrote(WITNESS_BLOCK, &block);
            self.witness.verify(&self.model, WITNESS_BLOCK, 4096);
        }
        let mut fresh = Client::connect(&self.server, "fresh client", false);
        fresh.verify(&self.model, 3 * MIB, 4096);
        fresh.verify(&self.model, WITNESS_BLOCK, 4096);
        fresh.disconnect();
        let out = run(tool("nbdinfo").arg("--size").arg(self.server.uri()));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            SIZE.to_string(),
            "nbdinfo --size after the bad input\n{}",
            show_output(&out)
        );
    }

    /// Checks the others once more, stops the server (it must exit 0 on SIGTERM with the witness
    /// still connected) and compares the image with the model.
    #[track_caller]
    fn finish(mut self) {
        self.check_others();
        let Fixture { server, image, model, witness, .. } = self;
        server.stop();
        drop(witness);
        image::assert_same_bytes("image after the test", &image::read(&image), &model);
    }
}

// ---------------------------------------------------------------------------------------------
// Option haggling

fn option_with_bad_magic_closes(engine: &str) {
    let mut f = Fixture::start("optmagic", engine);
    let mut c = Client::haggle(&f.server, "bad option magic");
    let mut b = option_frame(OPT_GO, &[]);
    b[..8].copy_from_slice(b"IHAVEOPU");
    c.send(&b);
    c.expect_closed("an option header without IHAVEOPT");
    f.check_others();

    // After a good option, too.
    let mut c = Client::haggle(&f.server, "bad option magic after a good option");
    c.structured_reply();
    c.send(&[0u8; 16]);
    c.expect_closed("an all-zero option header");
    f.finish();
}

fn unknown_client_flags_close(engine: &str) {
    let mut f = Fixture::start("cflags", engine);
    for flags in [CLIENT_FLAGS | 1 << 2, CLIENT_FLAGS | 1 << 31, 0xffff_ffff] {
        let mut c = Client::greet(&f.server, &format!("client flags {flags:#x}"));
        c.send(&flags.to_be_bytes());
        c.expect_closed("unknown client flags");
        f.check_others();
    }
    f.finish();
}

fn unknown_option_is_unsupported_and_haggling_continues(engine: &str) {
    let mut f = Fixture::start("unkopt", engine);
    let mut c = Client::haggle(&f.server, "unknown options");
    c.expect_opt_error("unknown option 99 with data", 99, b"some option data", REP_ERR_UNSUP);
    c.expect_opt_error("unknown option 99 without data", 99, &[], REP_ERR_UNSUP);
    c.expect_opt_error("option 0x7fffffff", 0x7fff_ffff, &[0u8; 100], REP_ERR_UNSUP);
    c.structured_reply();
    c.go("", &[]);
    c.verify(&f.model, 0, 4096);
    f.check_others();
    c.disconnect();
    f.finish();
}

fn malformed_options_are_invalid(engine: &str) {
    let mut f = Fixture::start("badopt", engine);
    let mut c = Client::haggle(&f.server, "malformed options");

    // NBD_OPT_GO whose name length runs past the end of the option.
    let mut d = 100u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"abc");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.expect_opt_error("GO with a name longer than the option", OPT_GO, &d, REP_ERR_INVALID);
    // A name length of 2^32-1.
    let mut d = u32::MAX.to_be_bytes().to_vec();
    d.extend_from_slice(&[0, 0]);
    c.expect_opt_error("GO with a name length of 2^32-1", OPT_GO, &d, REP_ERR_INVALID);
    // The info-request count says 2, one is there.
    let mut d = info_request("", &[INFO_BLOCK_SIZE]);
    d[5] = 2;
    c.expect_opt_error("GO with a short info-request list", OPT_GO, &d, REP_ERR_INVALID);
    // Trailing garbage after the info requests.
    let mut d = info_request("", &[]);
    d.push(0);
    c.expect_opt_error("GO with a trailing byte", OPT_GO, &d, REP_ERR_INVALID);
    c.expect_opt_error("INFO without the request count", OPT_INFO, &0u32.to_be_bytes(), REP_ERR_INVALID);
    c.expect_opt_error("LIST with data", OPT_LIST, b"x", REP_ERR_INVALID);
    c.expect_opt_error("STRUCTURED_REPLY with data", OPT_STRUCTURED_REPLY, &[0], REP_ERR_INVALID);
    let mut d = meta_request("", &["base:allocation"]);
    d.truncate(d.len() - 3);
    c.expect_opt_error("LIST_META_CONTEXT with a cut query", OPT_LIST_META_CONTEXT, &d, REP_ERR_INVALID);

    // The refused STRUCTURED_REPLY negotiated nothing: GO works and transmission is simple.
    let replies = c.go("", &[]);
    assert!(replies.iter().all(|r| r.kind == REP_INFO || r.kind == REP_ACK), "{replies:?}");
    assert!(!c.structured);
    let reply = c.expect_ok("READ after the malformed options", req(CMD_READ, 0, 4096), &[]);
    assert!(
        reply.chunks.is_empty(),
        "a refused STRUCTURED_REPLY must leave replies simple: {}",
        reply.describe()
    );
    image::assert_same_bytes("READ", &reply.data, &f.model[..4096]);
    f.check_others();
    c.disconnect();
    f.finish();
}

fn huge_option_is_discarded_as_too_big(engine: &str) {
    let mut f = Fixture::start("bigopt", engine);
    let mut c = Client::haggle(&f.server, "huge options");
    let junk = Rng::new(7).bytes(MIB as usize);
    c.expect_opt_error("GO with 1 MiB of data", OPT_GO, &junk, REP_ERR_TOO_BIG);
    c.expect_opt_error("unknown option with 1 MiB of data", 99, &junk, REP_ERR_TOO_BIG);
    c.expect_opt_error(
        "LIST with 64 KiB + 1 of data",
        OPT_LIST,
        &junk[..64 * KIB as usize + 1],
        REP_ERR_TOO_BIG,
    );
    f.check_others();
    c.structured_reply();
    c.go("", &[]);
    c.verify(&f.model, 3 * MIB, 64 * KIB as u32);
    c.disconnect();
    f.finish();
}

fn starttls_is_unsupported(engine: &str) {
    let mut f = Fixture::start("starttls", engine);
    let mut c = Client::haggle(&f.server, "STARTTLS");
    c.expect_opt_error("STARTTLS without TLS configured", OPT_STARTTLS, &[], REP_ERR_UNSUP);
    // The session goes on in plain text.
    c.structured_reply();
    c.go("", &[]);
    c.verify(&f.model, 0, 4096);
    f.check_others();
    c.disconnect();
    f.finish();
}

fn unknown_export_name(engine: &str) {
    let mut f = Fixture::start("unkexport", engine);
    // NBD_OPT_GO and NBD_OPT_INFO for an export we do not have: an error, haggling goes on.
    let mut c = Client::haggle(&f.server, "GO to an unknown export");
    c.expect_opt_error("GO \"nope\"", OPT_GO, &info_request("nope", &[]), REP_ERR_UNKNOWN);
    c.expect_opt_error("INFO \"nope\"", OPT_INFO, &info_request("nope", &[INFO_BLOCK_SIZE]), REP_ERR_UNKNOWN);
    c.expect_opt_error("GO \"siterep \"", OPT_GO, &info_request("siterep ", &[]), REP_ERR_UNKNOWN);
    c.structured_reply();
    c.go("", &[]);
    c.verify(&f.model, 0, 4096);
    c.disconnect();
    let mut c = Client::haggle(&f.server, "GO by name after an unknown export");
    c.expect_opt_error("GO \"nope\"", OPT_GO, &info_request("nope", &[]), REP_ERR_UNKNOWN);
    c.go(EXPORT, &[]);
    c.verify(&f.model, 0, 4096);
    c.disconnect();
    f.check_others();

    // NBD_OPT_EXPORT_NAME has no error reply: an unknown name ends the session.
    let mut c = Client::haggle(&f.server, "EXPORT_NAME unknown");
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed("NBD_OPT_EXPORT_NAME for an unknown export");
    let mut c = Client::haggle(&f.server, "EXPORT_NAME of 1 MiB");
    c.option(OPT_EXPORT_NAME, &vec![b'x'; MIB as usize]);
    c.expect_closed("NBD_OPT_EXPORT_NAME with a 1 MiB name");
    f.check_others();

    // The known name works, with and without the 124 zero bytes.
    for (flags, zeroes) in [(CLIENT_FLAGS, 0), (FLAG_C_FIXED_NEWSTYLE, 124)] {
        let mut c = Client::greet(&f.server, &format!("EXPORT_NAME with client flags {flags}"));
        c.send(&flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, EXPORT.as_bytes());
        let h: [u8; 10] = c.read_array("EXPORT_NAME reply");
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), SIZE);
        let mut z = vec![0xffu8; zeroes];
        c.read_into(&mut z, "EXPORT_NAME zero padding");
        assert!(z.iter().all(|&b| b == 0), "EXPORT_NAME padding is not zeroes: {z:02x?}");
        c.size = SIZE;
        c.verify(&f.model, 0, 4096);
        c.disconnect();
    }
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// Transmission

fn request_with_bad_magic_closes(engine: &str) {
    let mut f = Fixture::start("reqmagic", engine);
    for structured in [false, true] {
        let mut c =
            Client::connect(&f.server, &format!("bad request magic ({})", mode(structured)), structured);
        c.verify(&f.model, 0, 4096);
        c.send(&req(CMD_READ, 0, 4096).encode_with_magic(REQUEST_MAGIC + 1, 1));
        c.expect_closed("a request with a bad magic");
        f.check_others();
    }
    let mut c = Client::connect(&f.server, "simple reply magic as a request", false);
    c.send(&req(CMD_READ, 0, 4096).encode_with_magic(SIMPLE_REPLY_MAGIC, 1));
    c.expect_closed("a request with the simple reply magic");
    f.finish();
}

fn requests_beyond_the_end(engine: &str) {
    let mut f = Fixture::start("pastend", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("past the end ({})", mode(structured)), structured);
        c.expect_errno("READ across the end", req(CMD_READ, SIZE - 512, 1024), &[], EINVAL);
        c.expect_errno("READ at the end", req(CMD_READ, SIZE, 1), &[], EINVAL);
        c.expect_errno("READ far beyond the end", req(CMD_READ, 1 << 40, 4096), &[], EINVAL);
        // The rejected WRITE's payload is consumed: the next request on this connection works.
        let payload = vec![0xeeu8; 1024];
        c.expect_errno("WRITE across the end", req(CMD_WRITE, SIZE - 512, 1024), &payload, ENOSPC);
        c.verify(&f.model, SIZE - 4096, 4096);
        c.expect_errno("WRITE at the end", req(CMD_WRITE, SIZE, 4096), &vec![0xee; 4096], ENOSPC);
        c.expect_errno("WRITE_ZEROES across the end", req(CMD_WRITE_ZEROES, SIZE - 512, 1024), &[], ENOSPC);
        c.expect_errno("TRIM across the end", req(CMD_TRIM, SIZE - 512, 1024), &[], EINVAL);
        c.expect_errno("CACHE across the end", req(CMD_CACHE, SIZE - 512, 1024), &[], EINVAL);
        // Exactly up to the end is fine.
        c.verify(&f.model, SIZE - 64 * KIB, 64 * KIB as u32);
        c.verify(&f.model, SIZE - 1, 1);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn offset_plus_length_wrapping(engine: &str) {
    let mut f = Fixture::start("wrap", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("u64 wrap ({})", mode(structured)), structured);
        for offset in [u64::MAX - 511, u64::MAX, u64::MAX - SIZE + 4096] {
            let what = |op: &str| format!("{op} at offset {offset:#x} + 1024 (wraps past 2^64)");
            c.expect_errno(&what("READ"), req(CMD_READ, offset, 1024), &[], EINVAL);
            c.expect_errno(&what("WRITE"), req(CMD_WRITE, offset, 1024), &[0xee; 1024], ENOSPC);
            c.expect_errno(&what("WRITE_ZEROES"), req(CMD_WRITE_ZEROES, offset, 1024), &[], ENOSPC);
            c.expect_errno(&what("TRIM"), req(CMD_TRIM, offset, 1024), &[], EINVAL);
            c.expect_errno(&what("CACHE"), req(CMD_CACHE, offset, 1024), &[], EINVAL);
            c.verify(&f.model, 0, 4096);
        }
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn zero_length_requests(engine: &str) {
    let mut f = Fixture::start("zerolen", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("zero length ({})", mode(structured)), structured);
        for (name, kind) in
            [("READ", CMD_READ), ("WRITE", CMD_WRITE), ("TRIM", CMD_TRIM), ("WRITE_ZEROES", CMD_WRITE_ZEROES)]
        {
            c.expect_errno(&format!("zero-length {name}"), req(kind, SCRATCH, 0), &[], EINVAL);
            c.verify(&f.model, 0, 4096);
        }
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn oversize_read_and_write(engine: &str) {
    let mut f = Fixture::start("oversize", engine);
    let payload = vec![0xeeu8; MAX_PAYLOAD as usize + 1];
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("oversize ({})", mode(structured)), structured);
        // Spec "Block size constraints": above the advertised maximum is EINVAL.
        c.expect_errno("READ of 64 MiB + 1", req(CMD_READ, 0, MAX_PAYLOAD + 1), &[], EINVAL);
        c.expect_errno("READ of 4 GiB - 1", req(CMD_READ, 0, u32::MAX), &[], EINVAL);
        c.verify(&f.model, 0, 4096);
        // The whole oversize payload is read off and discarded; the next request is in step.
        c.expect_errno("WRITE of 64 MiB + 1", req(CMD_WRITE, 0, MAX_PAYLOAD + 1), &payload, EINVAL);
        c.verify(&f.model, 0, 64 * KIB as u32);
        // The maximum itself is fine (a READ of the whole 8 MiB export, within the maximum).
        c.verify(&f.model, 0, SIZE as u32);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn unaligned_requests_with_direct(engine: &str) {
    let mut f = Fixture::start_with("direct", engine, Variant::Direct);
    for structured in [false, true] {
        let name = format!("unaligned with --direct ({})", mode(structured));
        let mut c = Client::haggle(&f.server, &name);
        if structured {
            c.structured_reply();
        }
        let replies = c.go("", &[INFO_BLOCK_SIZE]);
        let sizes = replies
            .iter()
            .find(|r| {
                r.kind == REP_INFO && r.data.len() == 14 && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes()
            })
            .unwrap_or_else(|| panic!("{name}: no NBD_INFO_BLOCK_SIZE: {replies:?}"));
        let minimum = u32::from_be_bytes(sizes.data[2..6].try_into().unwrap());
        assert_eq!(minimum, DIRECT_BLOCK, "{name}: minimum block size with --direct: {sizes:?}");
        let b = DIRECT_BLOCK;
        let o = u64::from(b);
        c.expect_errno("READ at offset 1", req(CMD_READ, 1, b), &[], EINVAL);
        c.expect_errno("READ of 1 byte", req(CMD_READ, 0, 1), &[], EINVAL);
        c.expect_errno("READ at 512", req(CMD_READ, 512, b), &[], EINVAL);
        c.expect_errno("WRITE at 512", req(CMD_WRITE, SCRATCH + 512, b), &vec![0xee; b as usize], EINVAL);
        c.expect_errno("WRITE of 4096 + 512", req(CMD_WRITE, SCRATCH, b + 512), &vec![0xee; 4608], EINVAL);
        c.expect_errno("TRIM of 100 bytes", req(CMD_TRIM, SCRATCH, 100), &[], EINVAL);
        c.expect_errno("WRITE_ZEROES at 1", req(CMD_WRITE_ZEROES, SCRATCH + 1, b), &[], EINVAL);
        // Aligned requests work.
        c.verify(&f.model, o, b);
        let data = Rng::new(u64::from(structured)).bytes(b as usize);
        c.expect_ok("aligned WRITE", req(CMD_WRITE, SCRATCH, b), &data);
        f.wrote(SCRATCH, &data);
        c.verify(&f.model, SCRATCH, b);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn unknown_command_type(engine: &str) {
    let mut f = Fixture::start("unkcmd", engine);
    for structured in [false, true] {
        let mut c =
            Client::connect(&f.server, &format!("unknown command ({})", mode(structured)), structured);
        for kind in [8, 42, 0x7fff, 0xffff] {
            c.expect_errno(&format!("command type {kind}"), req(kind, 0, 4096), &[], EINVAL);
            c.expect_errno(&format!("command type {kind}, length 0"), req(kind, 0, 0), &[], EINVAL);
            c.verify(&f.model, 0, 4096);
        }
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn unknown_and_misplaced_flags(engine: &str) {
    let mut f = Fixture::start("flags", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("unknown flags ({})", mode(structured)), structured);
        for flag in [1u16 << 5, 1 << 9, 1 << 15] {
            let what = |op: &str| format!("{op} with flag {flag:#x}");
            c.expect_errno(&what("READ"), req(CMD_READ, 0, 4096).flags(flag), &[], EINVAL);
            c.expect_errno(&what("WRITE"), req(CMD_WRITE, SCRATCH, 4096).flags(flag), &[0xee; 4096], EINVAL);
            c.expect_errno(&what("TRIM"), req(CMD_TRIM, SCRATCH, 4096).flags(flag), &[], EINVAL);
            c.expect_errno(&what("FLUSH"), req(CMD_FLUSH, 0, 0).flags(flag), &[], EINVAL);
            c.verify(&f.model, SCRATCH, 4096);
        }
        // NBD_CMD_FLAG_DF is only valid on READ with structured replies.
        if structured {
            // Across a data/hole boundary, DF still gets one OFFSET_DATA chunk.
            let r = c.expect_ok(
                "READ with DF",
                req(CMD_READ, MIB - 64 * KIB, 128 * KIB as u32).flags(CMD_FLAG_DF),
                &[],
            );
            assert_eq!(
                r.chunks,
                vec![(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)],
                "READ with NBD_CMD_FLAG_DF must not be fragmented: {}",
                r.describe()
            );
            let range = (MIB - 64 * KIB) as usize..(MIB + 64 * KIB) as usize;
            image::assert_same_bytes("READ with DF", &r.data, &f.model[range]);
        } else {
            let df = req(CMD_READ, 0, 4096).flags(CMD_FLAG_DF);
            c.expect_errno("READ with DF without structured replies", df, &[], EINVAL);
        }
        c.expect_errno(
            "WRITE with DF",
            req(CMD_WRITE, SCRATCH, 4096).flags(CMD_FLAG_DF),
            &[0xee; 4096],
            EINVAL,
        );
        c.verify(&f.model, SCRATCH, 4096);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn read_only_export_refuses_changes(engine: &str) {
    let mut f = Fixture::start_with("readonly", engine, Variant::ReadOnly);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("read-only ({})", mode(structured)), structured);
        assert!(c.flags & FLAG_READ_ONLY != 0, "NBD_FLAG_READ_ONLY missing: {:#x}", c.flags);
        c.expect_errno("WRITE", req(CMD_WRITE, 0, 4096), &[0xee; 4096], EPERM);
        c.expect_errno("WRITE with FUA", req(CMD_WRITE, 0, 4096).flags(CMD_FLAG_FUA), &[0xee; 4096], EPERM);
        c.expect_errno("TRIM", req(CMD_TRIM, 0, 4096), &[], EPERM);
        c.expect_errno("WRITE_ZEROES", req(CMD_WRITE_ZEROES, 0, 4096), &[], EPERM);
        c.verify(&f.model, 0, 4096);
        c.expect_ok("FLUSH", req(CMD_FLUSH, 0, 0), &[]);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn block_status_needs_a_context(engine: &str) {
    let mut f = Fixture::start("bsnoctx", engine);
    for structured in [false, true] {
        let mut c = Client::connect(
            &f.server,
            &format!("block status, no context ({})", mode(structured)),
            structured,
        );
        c.expect_errno("BLOCK_STATUS without a meta context", req(CMD_BLOCK_STATUS, 0, 4096), &[], EINVAL);
        c.verify(&f.model, 0, 4096);
        c.disconnect();
    }
    // With base:allocation selected, the same request is answered.
    let mut c = Client::haggle(&f.server, "block status with base:allocation");
    c.structured_reply();
    c.option(OPT_SET_META_CONTEXT, &meta_request("", &["base:allocation"]));
    let replies = c.opt_replies(OPT_SET_META_CONTEXT);
    assert_eq!(replies.len(), 2, "SET_META_CONTEXT base:allocation: {replies:?}");
    assert_eq!(replies[0].kind, REP_META_CONTEXT);
    assert_eq!(&replies[0].data[4..], b"base:allocation");
    let id = u32::from_be_bytes(replies[0].data[..4].try_into().unwrap());
    c.go("", &[]);
    let r = c.expect_ok("BLOCK_STATUS", req(CMD_BLOCK_STATUS, 0, 4096), &[]);
    assert_eq!(r.status.len(), 1, "{}", r.describe());
    assert_eq!(r.status[0].0, id, "context id");
    assert_eq!(r.chunks.last(), Some(&(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS)));
    f.check_others();
    c.disconnect();
    f.finish();
}

fn flush_with_a_range(engine: &str) {
    let mut f = Fixture::start("flushrange", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("flush ({})", mode(structured)), structured);
        c.expect_errno("FLUSH with length 512", req(CMD_FLUSH, 0, 512), &[], EINVAL);
        c.expect_errno("FLUSH with offset 4096", req(CMD_FLUSH, 4096, 0), &[], EINVAL);
        c.expect_ok("FLUSH", req(CMD_FLUSH, 0, 0), &[]);
        c.expect_ok("FLUSH with FUA", req(CMD_FLUSH, 0, 0).flags(CMD_FLAG_FUA), &[]);
        c.verify(&f.model, 0, 4096);
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn truncated_requests_then_disconnect(engine: &str) {
    let mut f = Fixture::start("truncated", engine);
    for structured in [false, true] {
        // A WRITE of 64 KiB whose payload stops after 1000 bytes, then end of stream: the write
        // is neither acknowledged nor applied (the image is compared with the model at the end).
        let mut c =
            Client::connect(&f.server, &format!("truncated WRITE ({})", mode(structured)), structured);
        c.verify(&f.model, SCRATCH, 4096);
        let mut b = req(CMD_WRITE, SCRATCH, 64 * KIB as u32).encode(77).to_vec();
        b.extend_from_slice(&[0xab; 1000]);
        c.send(&b);
        c.sock.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
        c.expect_closed("a truncated WRITE payload and end of stream");
        f.check_others();

        // Most of a header, then end of stream.
        let mut c =
            Client::connect(&f.server, &format!("truncated header ({})", mode(structured)), structured);
        c.send(&req(CMD_READ, 0, 4096).encode(78)[..20]);
        c.sock.shutdown(Shutdown::Write).expect("shutdown(SHUT_WR)");
        c.expect_closed("a truncated request header and end of stream");

        // A WRITE cut short by closing the socket outright: nothing to observe on it, but the
        // server must shrug it off.
        let mut c =
            Client::connect(&f.server, &format!("abandoned WRITE ({})", mode(structured)), structured);
        let mut b = req(CMD_WRITE, SCRATCH, MAX_PAYLOAD).encode(79).to_vec();
        b.extend_from_slice(&vec![0xcd; 256 * KIB as usize]);
        c.send(&b);
        drop(c);
        f.check_others();
    }
    f.finish();
}

fn pipelined_reads_match_by_cookie(engine: &str) {
    let mut f = Fixture::start("pipeline", engine);
    for structured in [false, true] {
        let mut c = Client::connect(&f.server, &format!("pipelined ({})", mode(structured)), structured);
        let mut rng = Rng::new(64 + u64::from(structured));
        let mut expected: HashMap<u64, Req> = HashMap::new();
        let mut batch = Vec::new();
        for i in 0..64u64 {
            let cookie = 0xc0de_0000_0000_0000 | (i << 40) | rng.below(1 << 32);
            let r = if i % 9 == 8 {
                req(CMD_READ, SIZE - 512, 4096) // fails: EINVAL
            } else {
                let len = 512 * (1 + rng.below(256)) as u32; // up to 128 KiB
                req(CMD_READ, rng.below(SIZE - u64::from(len) + 1), len)
            };
            c.outstanding.insert(cookie, Outstanding { req: r });
            batch.extend_from_slice(&r.encode(cookie));
            expected.insert(cookie, r);
        }
        c.send(&batch); // all 64 before reading any reply
        let order: Vec<u64> =
            batch.chunks(28).map(|h| u64::from_be_bytes(h[8..16].try_into().unwrap())).collect();
        let mut seen = 0;
        let mut in_order = true;
        while !expected.is_empty() {
            let reply = c.reply();
            let Some(r) = expected.remove(&reply.cookie) else {
                panic!("pipelined: reply for unknown or already answered cookie {:#x}", reply.cookie);
            };
            in_order &= order[seen] == reply.cookie;
            seen += 1;
            if r.offset + u64::from(r.len) > SIZE {
                assert_eq!(reply.error, EINVAL, "pipelined {r:?}: {}", reply.describe());
            } else {
                assert_eq!(reply.error, 0, "pipelined {r:?}: {}", reply.describe());
                let range = r.offset as usize..r.offset as usize + r.len as usize;
                image::assert_same_bytes(&format!("pipelined {r:?}"), &reply.data, &f.model[range]);
            }
        }
        assert_eq!(seen, 64);
        eprintln!("pipelined ({}, {engine}): replies in request order: {in_order}", mode(structured));
        f.check_others();
        c.disconnect();
    }
    f.finish();
}

fn disc_closes_after_answering(engine: &str) {
    let mut f = Fixture::start("disc", engine);
    for structured in [false, true] {
        // Requests sent before NBD_CMD_DISC are answered, then the server closes.
        let mut c =
            Client::connect(&f.server, &format!("DISC after reads ({})", mode(structured)), structured);
        let first = c.request(req(CMD_READ, 0, 64 * KIB as u32), &[]);
        let second = c.request(req(CMD_READ, 3 * MIB, 4096), &[]);
        c.request(req(CMD_DISC, 0, 0), &[]);
        let mut answered = vec![c.reply().cookie, c.reply().cookie];
        answered.sort();
        let mut want = vec![first, second];
        want.sort();
        assert_eq!(answered, want, "requests before NBD_CMD_DISC must be answered");
        c.expect_closed("NBD_CMD_DISC");

        let c = Client::connect(&f.server, &format!("DISC alone ({})", mode(structured)), structured);
        c.disconnect();
        f.check_others();
    }
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// A real client with its checks turned off

fn nbdsh_without_strict_mode(engine: &str) {
    let f = Fixture::start_with("nbdsh", engine, Variant::Direct);
    let script = format!(
        r#"
h.set_strict_mode(0)
size = {SIZE}
def errno_of(op):
    try:
        op()
        return "OK"
    except nbd.Error as e:
        return str(e.errnum)
print("unaligned-read", errno_of(lambda: h.pread(4096, 1)))
print("short-read", errno_of(lambda: h.pread(100, 0)))
print("past-end-read", errno_of(lambda: h.pread(8192, size - 4096)))
print("past-end-write", errno_of(lambda: h.pwrite(b"\xee" * 8192, size - 4096)))
print("unaligned-write", errno_of(lambda: h.pwrite(b"\xee" * 4096, {SCRATCH} + 512)))
print("past-end-trim", errno_of(lambda: h.trim(8192, size - 4096)))
print("zero-read", errno_of(lambda: h.pread(0, 0)))
print("read", len(h.pread(4096, 4096)))
"#
    );
    let out = run(nbdsh().arg("-u").arg(f.server.uri()).arg("-c").arg(&script));
    let text = String::from_utf8_lossy(&out.stdout);
    for (what, errno) in [
        ("unaligned-read", EINVAL),
        ("short-read", EINVAL),
        ("past-end-read", EINVAL),
        ("past-end-write", ENOSPC),
        ("unaligned-write", EINVAL),
        ("past-end-trim", EINVAL),
        ("zero-read", EINVAL),
    ] {
        assert!(
            text.lines().any(|l| l == format!("{what} {errno}")),
            "nbdsh: {what} should fail with errno {errno}\n{}",
            show_output(&out)
        );
    }
    assert!(
        text.lines().any(|l| l == "read 4096"),
        "nbdsh: aligned read after the errors\n{}",
        show_output(&out)
    );
    f.finish();
}

// ---------------------------------------------------------------------------------------------
// Clients that stop reading

/// Two clients that send requests and never read the replies: one in the transmission phase
/// (sixteen READs of the whole export pipelined), one still haggling (NBD_OPT_LIST until the server stops
/// reading because its replies cannot be sent). Returns them once the server is stuck on both.
fn stalled_readers(f: &Fixture) -> (Client, Client) {
    let mut reader = Client::connect(&f.server, "stalled reader", true);
    let mut batch = Vec::new();
    for i in 0..16u64 {
        batch.extend_from_slice(&req(CMD_READ, 0, MAX_PAYLOAD.min(SIZE as u32)).encode(i));
    }
    reader.send(&batch);

    let mut haggler = Client::haggle(&f.server, "stalled haggler");
    haggler.sock.set_write_timeout(Some(Duration::from_secs(2))).expect("set_write_timeout");
    let list = option_frame(OPT_LIST, &[]);
    let mut sent = 0;
    loop {
        match haggler.sock.write_all(&list) {
            Ok(()) => sent += 1,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("stalled haggler: sending NBD_OPT_LIST #{sent}: {e}"),
        }
        assert!(sent < 1_000_000, "the server keeps reading options although nobody reads its replies");
    }
    (reader, haggler)
}

/// Clients that never read their replies tie up only their own connections: everyone else is
/// served meanwhile, and once they go away the server shuts down cleanly.
fn stalled_readers_do_not_block_others(engine: &str) {
    let mut f = Fixture::start("stalled", engine);
    let (reader, haggler) = stalled_readers(&f);
    f.check_others();
    drop(reader);
    drop(haggler);
    f.finish();
}

/// SIGTERM while clients sit on unread replies: the server must still exit 0 within
/// `SERVER_TIMEOUT` (spec: it SHOULD let in-flight requests finish, but a peer that never reads
/// cannot hold the server forever).
fn shutdown_with_stalled_readers(engine: &str) {
    let mut f = Fixture::start("stalledstop", engine);
    let (reader, haggler) = stalled_readers(&f);
    f.check_others();
    let Fixture { server, .. } = f;
    server.stop();
    drop((reader, haggler));
}
