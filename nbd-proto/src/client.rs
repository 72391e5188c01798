//! A small blocking NBD client (fixed newstyle, structured replies, metadata contexts), for the
//! agent to read generation exports of a local shim. One request in flight per client; open
//! several clients for parallelism (exports advertise CAN_MULTI_CONN).

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::consts::*;
use crate::option::{self, TooLong};
use crate::transmission::RawRequest;
use crate::{MAX_EXTENTS, MAX_PAYLOAD, MAX_STRING_LEN};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("NBD connection failed")]
    Io(#[from] io::Error),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error("the server refused option {option}: reply {reply:#x} {message}")]
    Refused { option: u32, reply: u32, message: String },
    #[error("the server failed the request: errno {0}")]
    Errno(u32),
    #[error("the export has no metadata context {0}")]
    NoContext(String),
    #[error("cannot encode the option")]
    Encode(#[from] TooLong),
}

fn proto(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// A connected client in the transmission phase.
pub struct Client {
    rd: BufReader<UnixStream>,
    wr: BufWriter<UnixStream>,
    size: u64,
    flags: u16,
    contexts: HashMap<String, u32>,
    cookie: u64,
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The length field of a READ or WRITE of `len` bytes, which must be at most [`MAX_PAYLOAD`].
fn payload_len(len: usize, what: &str) -> Result<u32, ClientError> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or_else(|| proto(format!("{what} of {len} bytes is larger than the maximum payload")))
}

/// The part of a buffer for `len` bytes at `offset` that a reply chunk for `n` bytes at `at`
/// covers, or None if the chunk reaches outside it.
fn within(offset: u64, len: usize, at: u64, n: u32) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(at.checked_sub(offset)?).ok()?;
    let end = start.checked_add(usize::try_from(n).ok()?)?;
    (end <= len).then_some(start..end)
}

impl Client {
    /// Connects to `export` on the Unix socket `path`, negotiating structured replies and the
    /// metadata `contexts` (all must exist).
    pub fn connect_unix(path: &Path, export: &str, contexts: &[&str]) -> Result<Self, ClientError> {
        let sock = UnixStream::connect(path)?;
        let mut c = Self {
            rd: BufReader::with_capacity(1 << 20, sock.try_clone()?),
            wr: BufWriter::with_capacity(64 << 10, sock),
            size: 0,
            flags: 0,
            contexts: HashMap::new(),
            cookie: 0,
        };
        c.handshake(export, contexts)?;
        Ok(c)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        self.wr.write_all(&option::frame(option, data)?)?;
        self.wr.flush()?;
        Ok(())
    }

    /// Reads one option reply: (type, data).
    fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        if read_u64(&mut self.rd)? != REPLY_MAGIC_OPT {
            return Err(proto("bad option reply magic"));
        }
        if read_u32(&mut self.rd)? != option {
            return Err(proto("option reply for another option"));
        }
        let kind = read_u32(&mut self.rd)?;
        let len = read_u32(&mut self.rd)?;
        if len as usize > 64 << 10 {
            return Err(proto("option reply too long"));
        }
        let mut data = vec![0u8; len as usize];
        self.rd.read_exact(&mut data)?;
        if kind & (1 << 31) != 0 {
            return Err(ClientError::Refused {
                option,
                reply: kind,
                message: String::from_utf8_lossy(&data).into(),
            });
        }
        Ok((kind, data))
    }

    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<(), ClientError> {
        if read_u64(&mut self.rd)? != NBDMAGIC || read_u64(&mut self.rd)? != IHAVEOPT {
            return Err(proto("not a fixed-newstyle NBD server"));
        }
        let hflags = read_u16(&mut self.rd)?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("server lacks fixed newstyle"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.wr.write_all(&cflags.to_be_bytes())?;
        self.option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.reply(OPT_STRUCTURED_REPLY)?;
        if kind != REP_ACK {
            return Err(proto("structured replies not acknowledged"));
        }
        if export.len() > MAX_STRING_LEN {
            return Err(proto("export name too long"));
        }
        if !contexts.is_empty() {
            self.option(OPT_SET_META_CONTEXT, &option::meta_context_data(export, contexts)?)?;
            loop {
                let (kind, data) = self.reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                        self.contexts.insert(String::from_utf8_lossy(&data[4..]).into_owned(), id);
                    }
                    _ => return Err(proto("unexpected reply to SET_META_CONTEXT")),
                }
            }
            for q in contexts {
                if !self.contexts.contains_key(*q) {
                    return Err(ClientError::NoContext(q.to_string()));
                }
            }
        }
        self.option(OPT_GO, &option::info_data(export, &[])?)?;
        loop {
            let (kind, data) = self.reply(OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT && data.len() == 12 {
                        self.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                        self.flags = u16::from_be_bytes([data[10], data[11]]);
                    }
                }
                _ => return Err(proto("unexpected reply to GO")),
            }
        }
        Ok(())
    }

    fn send(&mut self, kind: u16, flags: u16, offset: u64, length: u32) -> Result<u64, ClientError> {
        self.cookie += 1;
        let r = RawRequest { flags, kind, cookie: self.cookie, offset, length };
        self.wr.write_all(&r.encode())?;
        self.wr.flush()?;
        Ok(self.cookie)
    }

    /// Reads one structured chunk header: (flags, type, length).
    fn chunk_header(&mut self, cookie: u64) -> Result<(u16, u16, u32), ClientError> {
        let magic = read_u32(&mut self.rd)?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(proto(format!("expected a structured reply, got magic {magic:#x}")));
        }
        let flags = read_u16(&mut self.rd)?;
        let kind = read_u16(&mut self.rd)?;
        if read_u64(&mut self.rd)? != cookie {
            return Err(proto("reply for an unexpected cookie"));
        }
        let len = read_u32(&mut self.rd)?;
        if len > MAX_PAYLOAD + 64 {
            return Err(proto("reply chunk too long"));
        }
        Ok((flags, kind, len))
    }

    fn error_chunk(&mut self, len: u32) -> Result<ClientError, ClientError> {
        if len < 6 {
            return Err(proto("short error chunk"));
        }
        let errno = read_u32(&mut self.rd)?;
        io::copy(&mut (&mut self.rd).take(u64::from(len) - 4), &mut io::sink())?;
        Ok(ClientError::Errno(errno))
    }

    /// Reads `buf.len()` bytes at `offset` (at most [`MAX_PAYLOAD`]).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let length = payload_len(buf.len(), "read")?;
        let cookie = self.send(CMD_READ, 0, offset, length)?;
        let mut failure = None;
        loop {
            let (flags, kind, len) = self.chunk_header(cookie)?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = read_u64(&mut self.rd)?;
                    let n = len.checked_sub(8).ok_or_else(|| proto("short data chunk"))?;
                    let range = within(offset, buf.len(), at, n)
                        .ok_or_else(|| proto("data chunk outside the request"))?;
                    self.rd.read_exact(&mut buf[range])?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if len != 12 {
                        return Err(proto("bad hole chunk"));
                    }
                    let at = read_u64(&mut self.rd)?;
                    let n = read_u32(&mut self.rd)?;
                    let range = within(offset, buf.len(), at, n)
                        .ok_or_else(|| proto("hole chunk outside the request"))?;
                    buf[range].fill(0);
                }
                REPLY_TYPE_NONE if len == 0 => {}
                k if k & (1 << 15) != 0 => failure = Some(self.error_chunk(len)?),
                _ => return Err(proto("unexpected chunk in a read reply")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// The extents of `context` over `[offset, offset+len)`: (length, flags), covering at least
    /// a prefix of the range (ask again for the rest).
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context: &str,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        let id = *self.contexts.get(context).ok_or_else(|| ClientError::NoContext(context.into()))?;
        let cookie = self.send(CMD_BLOCK_STATUS, 0, offset, len)?;
        let mut out = Vec::new();
        let mut failure = None;
        loop {
            let (flags, kind, clen) = self.chunk_header(cookie)?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    let n = usize::try_from(clen.saturating_sub(4) / 8).unwrap_or(usize::MAX);
                    if clen < 12 || (clen - 4) % 8 != 0 || n > MAX_EXTENTS * 16 {
                        return Err(proto("bad block status chunk"));
                    }
                    let cid = read_u32(&mut self.rd)?;
                    let mut ext = Vec::with_capacity(n);
                    for _ in 0..n {
                        ext.push((read_u32(&mut self.rd)?, read_u32(&mut self.rd)?));
                    }
                    if cid == id {
                        out = ext;
                    }
                }
                REPLY_TYPE_NONE if clen == 0 => {}
                k if k & (1 << 15) != 0 => failure = Some(self.error_chunk(clen)?),
                _ => return Err(proto("unexpected chunk in a block status reply")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(f) = failure {
            return Err(f);
        }
        if out.is_empty() || out.iter().any(|(l, _)| *l == 0) {
            return Err(proto("block status without extents"));
        }
        Ok(out)
    }

    /// Every extent of `context` over the whole export, as (offset, length, flags).
    pub fn map(&mut self, context: &str) -> Result<Vec<(u64, u64, u32)>, ClientError> {
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let len = u32::try_from(self.size - pos).unwrap_or(u32::MAX).min(1 << 31);
            for (l, f) in self.block_status(pos, len, context)? {
                let l = u64::from(l).min(self.size - pos);
                if l == 0 {
                    break;
                }
                match out.last_mut() {
                    Some(last) if last.2 == f && last.0 + last.1 == pos => last.1 += l,
                    _ => out.push((pos, l, f)),
                }
                pos += l;
            }
        }
        Ok(out)
    }

    /// Reads the reply to a command without payload: Ok, or the server's errno.
    fn simple_ack(&mut self, cookie: u64) -> Result<(), ClientError> {
        let mut failure = None;
        loop {
            let (flags, kind, len) = self.chunk_header(cookie)?;
            match kind {
                REPLY_TYPE_NONE if len == 0 => {}
                k if k & (1 << 15) != 0 => failure = Some(self.error_chunk(len)?),
                _ => return Err(proto("unexpected chunk in a reply")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Writes `data` at `offset` (at most [`MAX_PAYLOAD`]).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let length = payload_len(data.len(), "write")?;
        self.cookie += 1;
        let r = RawRequest { flags: 0, kind: CMD_WRITE, cookie: self.cookie, offset, length };
        self.wr.write_all(&r.encode())?;
        self.wr.write_all(data)?;
        self.wr.flush()?;
        self.simple_ack(self.cookie)
    }

    /// Makes `[offset, offset+len)` read as zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        let cookie = self.send(CMD_WRITE_ZEROES, 0, offset, len)?;
        self.simple_ack(cookie)
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let cookie = self.send(CMD_FLUSH, 0, 0, 0)?;
        self.simple_ack(cookie)
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(CMD_DISC, 0, 0, 0)?;
        Ok(())
    }
}
