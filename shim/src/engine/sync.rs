//! The pread/pwrite engine: one request at a time, in order, on the connection's thread.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::poll::IdlePoll;
use super::{ConnError, Ending};
use crate::buf::BufPool;
use crate::export::Conn;
use crate::server::Shutdown;
use nbd_proto::consts::REQUEST_LEN;
use nbd_proto::transmission::{self, Command, RawRequest};
use nbd_proto::Errno;

fn read_err(e: io::Error) -> ConnError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ConnError::Truncated
    } else {
        ConnError::Socket(e)
    }
}

/// Serves `sock` until the client disconnects or the server shuts down.
pub fn serve(conn: &Conn, sock: File, shutdown: &Shutdown, mut idle: IdlePoll) -> Result<Ending, ConnError> {
    let mut rd = BufReader::with_capacity(256 << 10, &sock);
    let mut wr = BufWriter::with_capacity(256 << 10, &sock);
    let mut pool = BufPool::default();
    let mut out = Vec::with_capacity(4096);
    let backend = &conn.export.backend;
    let structured = conn.structured();
    loop {
        if rd.buffer().is_empty() {
            wr.flush().map_err(ConnError::Socket)?;
            // Whatever the spin saw (data, end of file, an error), the read below sees too.
            if idle.spin(sock.as_raw_fd(), &mut [0u8; 1], libc::MSG_PEEK).is_none() {
                let mut fds = [
                    PollFd::new(sock.as_fd(), PollFlags::POLLIN),
                    PollFd::new(shutdown.fd(), PollFlags::POLLIN),
                ];
                loop {
                    match poll(&mut fds, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        r => r.map_err(|e| ConnError::Socket(e.into()))?,
                    };
                    break;
                }
            }
            if shutdown.is_set() {
                return Ok(Ending::Shutdown);
            }
            if rd.fill_buf().map_err(ConnError::Socket)?.is_empty() {
                return Ok(Ending::ClientDone);
            }
            idle.arrived();
        }
        let mut hdr = [0u8; REQUEST_LEN];
        rd.read_exact(&mut hdr).map_err(read_err)?;
        let raw = RawRequest::parse(&hdr)?;
        out.clear();
        match conn.session.validate(&raw) {
            Err(e) => {
                let skip = u64::from(raw.payload_len());
                let n = io::copy(&mut (&mut rd).take(skip), &mut io::sink()).map_err(ConnError::Socket)?;
                if n < skip {
                    return Err(ConnError::Truncated);
                }
                transmission::error_reply(&mut out, raw.cookie, structured, e);
                wr.write_all(&out).map_err(ConnError::Socket)?;
            }
            Ok(Command::Disconnect) => {
                wr.flush().map_err(ConnError::Socket)?;
                return Ok(Ending::ClientDone);
            }
            Ok(Command::Read { offset, len, df }) => {
                let mut buf = pool.get(len as usize);
                let r = backend.read_at(buf.as_mut_slice(), offset);
                match r.and_then(|()| conn.export.after_read(buf.as_mut_slice(), offset)) {
                    Err(e) => transmission::error_reply(&mut out, raw.cookie, structured, Errno::from_io(&e)),
                    Ok(()) => match conn.sparse_read_reply(raw.cookie, offset, buf.as_slice(), df) {
                        Some(reply) => out = reply,
                        None => {
                            transmission::read_data_header(
                                &mut out, raw.cookie, structured, offset, len, true,
                            );
                            wr.write_all(&out).map_err(ConnError::Socket)?;
                            out.clear();
                            wr.write_all(buf.as_slice()).map_err(ConnError::Socket)?;
                        }
                    },
                }
                pool.put(buf);
                wr.write_all(&out).map_err(ConnError::Socket)?;
            }
            Ok(Command::Write { offset, len, fua }) => {
                let mut buf = pool.get(len as usize);
                rd.read_exact(buf.as_mut_slice()).map_err(read_err)?;
                let r = conn.export.begin_write(offset, len.into()).and_then(|ticket| {
                    let r = backend.write_at(buf.as_slice(), offset, fua);
                    conn.export.end_write(ticket, offset, len.into(), false);
                    r.map_err(|e| Errno::from_io(&e))
                });
                match r {
                    Ok(()) => transmission::ok_reply(&mut out, raw.cookie, structured),
                    Err(e) => transmission::error_reply(&mut out, raw.cookie, structured, e),
                }
                pool.put(buf);
                wr.write_all(&out).map_err(ConnError::Socket)?;
            }
            Ok(cmd) => {
                conn.execute_inline(raw.cookie, cmd, &mut out);
                wr.write_all(&out).map_err(ConnError::Socket)?;
            }
        }
    }
}
