//! A connection's bytes: the [`Stream`] a session runs on (TCP, TLS over TCP, or a Unix
//! socket in tests) and [`Conn`], which reads and writes `wire` frames on it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use rustls::{ServerConnection, StreamOwned};
use wire::{Decoder, ErrorClass, Frame};

use super::admission::Handshake;

/// How long an authenticated connection may stay silent before the server drops it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// The read buffer of a connection before it is authenticated: the largest `Hello` (1039
/// bytes plus its length) fits, and a peer that has not authenticated costs no more.
const HELLO_BUF: usize = 4 << 10;
/// The read buffer of an authenticated connection.
const SESSION_BUF: usize = 256 << 10;
/// After its last frame (an `Error`), how long the server keeps reading what the agent had
/// already sent, and how much of it: closing a socket with unread data makes the kernel answer
/// with a reset, which can destroy the `Error` before the agent reads it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
const DRAIN_BYTES: usize = 64 << 20;

/// A stream the server can half-close after its last frame.
pub(super) trait Stream: Read + Write {
    /// Tells the agent that no more frames follow (TLS close_notify, then TCP FIN).
    fn close_write(&mut self);
    fn set_read_timeout(&mut self, t: Duration);
    /// Sets the read and the write timeout.
    fn set_timeouts(&mut self, t: Duration);
    /// Whether a read would return without waiting (data, the end, or an error), waiting up
    /// to `ms` milliseconds for it.
    fn readable(&mut self, ms: u8) -> bool;
}

fn fd_readable(fd: std::os::fd::BorrowedFd<'_>, ms: u8) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).map_or(true, |n| n > 0)
}

impl Stream for TcpStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = TcpStream::set_read_timeout(self, Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        let _ = TcpStream::set_read_timeout(self, Some(t));
        let _ = TcpStream::set_write_timeout(self, Some(t));
    }
    fn readable(&mut self, ms: u8) -> bool {
        fd_readable(std::os::fd::AsFd::as_fd(self), ms)
    }
}

#[cfg(test)]
impl Stream for std::os::unix::net::UnixStream {
    fn close_write(&mut self) {
        let _ = self.shutdown(Shutdown::Write);
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = std::os::unix::net::UnixStream::set_read_timeout(self, Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        let _ = std::os::unix::net::UnixStream::set_read_timeout(self, Some(t));
        let _ = std::os::unix::net::UnixStream::set_write_timeout(self, Some(t));
    }
    fn readable(&mut self, ms: u8) -> bool {
        fd_readable(std::os::fd::AsFd::as_fd(self), ms)
    }
}

impl Stream for StreamOwned<ServerConnection, TcpStream> {
    fn close_write(&mut self) {
        self.conn.send_close_notify();
        let _ = self.flush();
        self.sock.close_write();
    }
    fn set_read_timeout(&mut self, t: Duration) {
        let _ = self.sock.set_read_timeout(Some(t));
    }
    fn set_timeouts(&mut self, t: Duration) {
        self.sock.set_timeouts(t);
    }
    fn readable(&mut self, ms: u8) -> bool {
        // Plaintext rustls already holds, or more records on the socket.
        self.conn.process_new_packets().map_or(true, |io| io.plaintext_bytes_to_read() > 0)
            || fd_readable(std::os::fd::AsFd::as_fd(&self.sock), ms)
    }
}

pub(super) enum Recv {
    Frame(Frame),
    End,
    Idle,
}

pub(super) struct Conn<S: Stream> {
    pub(super) stream: S,
    pub(super) dec: Decoder,
    pub(super) buf: Vec<u8>,
    pub(super) out: Vec<u8>,
}

impl<S: Stream> Conn<S> {
    /// A connection whose peer is not authenticated yet: nothing larger than [`HELLO_BUF`] is
    /// allocated for it until [`Conn::authenticated`].
    pub(super) fn unauthenticated(stream: S) -> Self {
        Conn { stream, dec: Decoder::new(), buf: vec![0u8; HELLO_BUF], out: Vec::new() }
    }

    /// The peer is authenticated: the session's buffer and its idle timeout from now on.
    pub(super) fn authenticated(&mut self) {
        self.stream.set_timeouts(IDLE_TIMEOUT);
        self.buf = vec![0u8; SESSION_BUF];
    }

    /// Whether the agent has sent more (or closed), waiting up to `ms` milliseconds for it.
    pub(super) fn readable(&mut self, ms: u8) -> bool {
        self.stream.readable(ms)
    }

    /// Answers bytes that do not decode with their `Error` and ends the session (§2).
    fn refuse_bytes(&mut self, e: wire::WireError) -> io::Error {
        let _ = self.send(&e.error_frame());
        self.finish();
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// The next frame, or with `idle` [`Recv::Idle`] when none is buffered and the agent has
    /// sent nothing more yet (reading would wait).
    pub(super) fn next(&mut self, idle: bool) -> io::Result<Recv> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Recv::Frame(f)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("refusing: {e}");
                    return Err(self.refuse_bytes(e));
                }
            }
            if idle && !self.stream.readable(0) {
                return Ok(Recv::Idle);
            }
            let n = self.stream.read(&mut self.buf)?;
            if n == 0 {
                return Ok(Recv::End);
            }
            self.dec.feed(&self.buf[..n]);
        }
    }

    /// The first frame (it should be `Hello`), within the handshake's deadline; `None` if the
    /// peer closes first. Reads at most `buf.len()` bytes at a time, and the decoder refuses a
    /// frame longer than the largest `Hello` as soon as its type is in, so what is buffered
    /// stays bounded.
    pub(super) fn hello(&mut self, gate: &Handshake) -> io::Result<Option<Frame>> {
        let mut first = true;
        loop {
            match self.dec.next_frame() {
                Ok(Some(f)) => return Ok(Some(f)),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!("refusing: {e}");
                    return Err(self.refuse_bytes(e));
                }
            }
            self.stream.set_timeouts(gate.left("Hello")?);
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(gate.expired("Hello"))
                }
                Err(e) => return Err(e),
            };
            if first && tls_record(&self.buf[..n]) {
                // A TLS agent at a plaintext server: it reads this frame as a plaintext answer.
                let message = "this server speaks plaintext (it runs with --insecure), not TLS".to_string();
                let _ = self.send(&Frame::Error {
                    class: ErrorClass::Fatal,
                    code: wire::ERR_BAD_REQUEST,
                    message,
                });
                self.finish();
                let e = "the agent speaks TLS, but this server runs with --insecure (plaintext)";
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            first = false;
            self.dec.feed(&self.buf[..n]);
        }
    }

    pub(super) fn send(&mut self, f: &Frame) -> io::Result<()> {
        self.out.clear();
        f.encode(&mut self.out);
        self.stream.write_all(&self.out)?;
        self.stream.flush()
    }

    /// Sends the session's last frame, an `Error`, and ends the session.
    pub(super) fn error(&mut self, class: ErrorClass, code: u16, message: String) -> io::Result<()> {
        tracing::warn!(code, "refusing: {message}");
        let sent = self.send(&Frame::Error { class, code, message });
        self.finish();
        sent
    }

    /// Half-closes, then reads and drops what the agent had in flight (bounded by
    /// [`DRAIN_TIME`] and [`DRAIN_BYTES`]), so the agent reads our last frame before the close.
    fn finish(&mut self) {
        self.stream.close_write();
        self.stream.set_read_timeout(Duration::from_millis(200));
        let deadline = std::time::Instant::now() + DRAIN_TIME;
        let mut drained = 0;
        while drained < DRAIN_BYTES && std::time::Instant::now() < deadline {
            match self.stream.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => drained += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// Whether `b` starts like a TLS record (handshake, alert, change-cipher-spec or data, version
/// 3.x). A frame never does: its length (below `MAX_FRAME`) starts with a zero byte.
pub(super) fn tls_record(b: &[u8]) -> bool {
    matches!(b, [0x14..=0x17, 0x03, ..])
}
