//! The io_uring engine: one ring per connection drives the socket and the image.
//!
//! The connection's thread posts a RECV on the socket, parses every complete request that
//! arrived, submits READ/WRITE/FSYNC on the image for each, and answers them in completion order
//! with batched SENDMSGs. A large WRITE payload is received straight into its aligned buffer.
//!
//! A small READ of the live disk that arrives with nothing else in flight or queued (a client
//! at queue depth 1) is submitted linked to the SENDMSG of its reply (`IOSQE_IO_LINK`): the
//! kernel sends the reply as soon as the read completes, one `io_uring_enter` instead of two.
//! If the read fails or comes up short, the kernel cancels the send and the read is finished
//! the ordinary way ([`Linked`]).
//!
//! A connection whose client waits for each reply before it sends the next request (see
//! [`super::poll`]) is served synchronously: its thread polls the socket for the request, runs
//! a small READ or WRITE with `pread(2)`/`pwritev2(2)` and sends the reply with `sendmsg(2)`,
//! all without the ring, which it sleeps on only once the client goes quiet.
//!
//! Ownership rule for every buffer handed to the kernel: it is owned by this `Engine` (the
//! receive buffer, the pending write, the op slab, the send queue and its iovec/msghdr) and is
//! neither moved nor freed until the operation's completion has been reaped. `run` does not
//! return while any operation is in flight, so the engine outlives every submission.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, squeue, types, IoUring};

use super::poll::IdlePoll;
use super::punt::PuntPolicy;
use super::{ConnError, Ending};
use crate::buf::{AlignedBuf, BufPool};
use crate::export::{Conn, ExportKind, SPARSE_READ_MIN};
use crate::server::Shutdown;
use crate::sys;
use nbd_proto::consts::REQUEST_LEN;
use nbd_proto::transmission::{self, Command, RawRequest};
use nbd_proto::Errno;
use tracker::WriteTicket;

const RING_ENTRIES: u32 = 256;
/// Most image operations in flight per connection; more requests wait in the receive buffer.
const MAX_OPS: usize = 128;
/// Most reply bytes queued per connection before we stop reading requests.
const MAX_QUEUED: usize = 64 << 20;
const RBUF_SIZE: usize = 256 << 10;
const MAX_IOVECS: usize = 64;
/// Small writes beyond this many requests in flight are punted to io-wq (`IOSQE_ASYNC`).
const ASYNC_WRITE_DEPTH: usize = 4;
const ASYNC_WRITE_MAX: usize = 64 << 10;
/// Largest READ or WRITE a hot connection runs on its own thread.
const INLINE_MAX: usize = 64 << 10;

const UD_RECV: u64 = u64::MAX;
const UD_SEND: u64 = u64::MAX - 1;
const UD_WAKE: u64 = u64::MAX - 2;
const UD_CANCEL: u64 = u64::MAX - 3;

enum OpKind {
    Read {
        buf: AlignedBuf,
        offset: u64,
        df: bool,
        done: usize,
    },
    /// A READ linked to the SENDMSG of its reply, whose message (with the buffer) is at the
    /// front of the send queue.
    LinkedRead {
        offset: u64,
        len: usize,
        df: bool,
    },
    Write {
        buf: AlignedBuf,
        offset: u64,
        fua: bool,
        done: usize,
        ticket: Option<WriteTicket>,
    },
    Flush,
}

struct Op {
    cookie: u64,
    kind: OpKind,
}

/// A WRITE whose payload is still arriving: kept (`buf`) or discarded because it was rejected.
struct PendingWrite {
    cookie: u64,
    offset: u64,
    fua: bool,
    buf: Option<AlignedBuf>,
    filled: usize,
    discard: u64,
    error: Errno,
}

struct OutMsg {
    head: Vec<u8>,
    data: Option<AlignedBuf>,
}

impl OutMsg {
    fn len(&self) -> usize {
        self.head.len() + self.data.as_ref().map_or(0, |d| d.len())
    }
}

/// The READ in flight linked to the send of its reply, while its outcome is not known.
#[derive(Clone, Copy)]
struct Linked {
    /// Its op.
    idx: usize,
    /// Its result, once it failed or came up short (a full read ends the link's tracking).
    read: Option<i32>,
    /// Whether the kernel cancelled the linked send (it does when the read failed or was short).
    send_cancelled: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RecvTarget {
    Rbuf,
    Payload,
}

struct Engine<'a> {
    conn: &'a Conn,
    ring: IoUring,
    sock: RawFd,
    wake: RawFd,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    recv: Option<RecvTarget>,
    pending: Option<PendingWrite>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<usize>,
    n_ops: usize,
    outq: VecDeque<OutMsg>,
    queued: usize,
    front_sent: usize,
    sending: bool,
    iovecs: Vec<libc::iovec>,
    msghdr: Box<libc::msghdr>,
    wake_armed: bool,
    cancel_sent: bool,
    stop_recv: bool,
    stop_parse: bool,
    eof: bool,
    ending: Option<Ending>,
    error: Option<ConnError>,
    pool: BufPool,
    scratch: Vec<u8>,
    linked: Option<Linked>,
    poll: IdlePoll,
    punt: PuntPolicy,
}

/// Serves the connection on `sock` until the client disconnects or the server shuts down.
pub fn serve(
    conn: &Conn,
    sock: &impl AsRawFd,
    shutdown: &Shutdown,
    poll: IdlePoll,
) -> Result<Ending, ConnError> {
    // One thread owns the ring: completions run at our own io_uring_enter (no IPIs, no task
    // work interrupting the loop). Older kernels refuse the flags: fall back to a plain ring.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
        .map_err(ConnError::Ring)?;
    // SAFETY: msghdr is a plain C struct for which all-zeroes is a valid (empty) value.
    let msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    let mut e = Engine {
        conn,
        ring,
        sock: sock.as_raw_fd(),
        wake: std::os::fd::AsRawFd::as_raw_fd(&shutdown.fd()),
        rbuf: vec![0u8; RBUF_SIZE].into_boxed_slice(),
        rstart: 0,
        rend: 0,
        recv: None,
        pending: None,
        ops: Vec::with_capacity(MAX_OPS),
        free_ops: Vec::new(),
        n_ops: 0,
        outq: VecDeque::new(),
        queued: 0,
        front_sent: 0,
        sending: false,
        iovecs: Vec::with_capacity(MAX_IOVECS),
        msghdr,
        wake_armed: false,
        cancel_sent: false,
        stop_recv: false,
        stop_parse: false,
        eof: false,
        ending: None,
        error: None,
        pool: BufPool::default(),
        scratch: Vec::with_capacity(256),
        linked: None,
        poll,
        punt: PuntPolicy::new(std::time::Instant::now()),
    };
    e.run(shutdown)
}

impl Engine<'_> {
    fn run(&mut self, shutdown: &Shutdown) -> Result<Ending, ConnError> {
        self.arm_wake();
        if shutdown.is_set() {
            self.begin_shutdown();
        }
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            self.post_send();
            if self.idle() {
                if shutdown.is_set() {
                    // A hot connection may not sleep on the ring, where the shutdown shows.
                    self.begin_shutdown();
                    continue;
                }
                if self.recv.is_some() {
                    self.poll.went_idle();
                } else if let Some(res) = self.poll.spin(self.sock, &mut self.rbuf[self.rend..], 0) {
                    self.recv = Some(RecvTarget::Rbuf);
                    self.on_recv(res as i32);
                    self.parse();
                    continue;
                }
            }
            self.post_recv();
            if self.finished() {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    // The ring itself failed; nothing more can complete, so nothing is in flight
                    // that we could wait for.
                    return Err(ConnError::Ring(e));
                }
            }
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for &(ud, res) in &cqes {
                self.complete(ud, res);
            }
            self.parse();
        }
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        Ok(self.ending.take().unwrap_or(Ending::ClientDone))
    }

    /// True when the session is over and nothing is in flight.
    fn finished(&mut self) -> bool {
        // Once receiving has stopped, `parse` has consumed every whole request; a write whose
        // payload never arrived is dropped unacknowledged.
        let over = self.error.is_some() || (self.stop_recv && self.outq.is_empty() && self.n_ops == 0);
        if !over {
            return false;
        }
        if self.recv.is_some() || self.wake_armed {
            if !self.cancel_sent {
                self.cancel_sent = true;
                if self.recv.is_some() {
                    self.push(opcode::AsyncCancel::new(UD_RECV).build().user_data(UD_CANCEL));
                }
                if self.wake_armed {
                    self.push(opcode::PollRemove::new(UD_WAKE).build().user_data(UD_CANCEL));
                }
            }
            return false;
        }
        !self.sending && self.n_ops == 0
    }

    fn push(&mut self, sqe: squeue::Entry) {
        self.push_all(&[sqe]);
    }

    /// Queues `sqes` together, in order, in one submission (a linked chain must not be split).
    fn push_all(&mut self, sqes: &[squeue::Entry]) {
        loop {
            // Every buffer an SQE built by this engine points to is owned by the engine and
            // stays put until its completion is reaped (see the module documentation).
            // SAFETY: so the entries stay valid for as long as the kernel uses them.
            if unsafe { self.ring.submission().push_multiple(sqes) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    self.fail(ConnError::Ring(e));
                }
            }
        }
    }

    fn fail(&mut self, err: ConnError) {
        if self.error.is_none() {
            self.error = Some(err);
        }
        self.stop_recv = true;
        self.stop_parse = true;
    }

    fn arm_wake(&mut self) {
        self.wake_armed = true;
        let sqe = opcode::PollAdd::new(types::Fd(self.wake), libc::POLLIN as u32).build().user_data(UD_WAKE);
        self.push(sqe);
    }

    fn begin_shutdown(&mut self) {
        self.stop_recv = true;
        if self.ending.is_none() {
            self.ending = Some(Ending::Shutdown);
        }
    }

    /// Nothing in flight (but a receive), queued or half received: the next thing to happen
    /// is a request.
    fn idle(&self) -> bool {
        !self.stop_recv
            && self.error.is_none()
            && self.n_ops == 0
            && !self.sending
            && self.outq.is_empty()
            && self.pending.is_none()
            && self.rstart == self.rend
    }

    fn throttled(&self) -> bool {
        self.n_ops >= MAX_OPS || self.queued >= MAX_QUEUED
    }

    fn post_recv(&mut self) {
        if self.recv.is_some() || self.stop_recv || self.throttled() {
            return;
        }
        let (ptr, len, target) = match &mut self.pending {
            Some(p) if self.rstart == self.rend && p.buf.is_some() => {
                let buf = p.buf.as_mut().expect("checked");
                let rest = &mut buf.as_mut_slice()[p.filled..];
                (rest.as_mut_ptr(), rest.len(), RecvTarget::Payload)
            }
            _ => {
                if self.rstart > 0 && (self.rstart == self.rend || self.rstart > RBUF_SIZE / 2) {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                }
                if self.rend == RBUF_SIZE {
                    return; // full of requests waiting for the throttle to lift
                }
                let rest = &mut self.rbuf[self.rend..];
                (rest.as_mut_ptr(), rest.len(), RecvTarget::Rbuf)
            }
        };
        self.recv = Some(target);
        let sqe = opcode::Recv::new(types::Fd(self.sock), ptr, len as u32).build().user_data(UD_RECV);
        self.push(sqe);
    }

    fn post_send(&mut self) {
        if self.sending || self.outq.is_empty() {
            return;
        }
        if self.poll.hot() && self.n_ops == 0 {
            // The reply of a synchronously served request goes now; what the socket does not
            // take at once goes through the ring.
            self.fill_msghdr();
            let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
            // The msghdr points to the iovecs, which point into the send queue's messages; all
            // are owned by the engine and unchanged for the duration of the call.
            // SAFETY: so every pointer the kernel follows is valid while it does.
            let n = unsafe { libc::sendmsg(self.sock, &*self.msghdr, flags) };
            self.on_send(sys::result(n) as i32);
            if self.sending || self.outq.is_empty() {
                return;
            }
        }
        let sqe = self.send_sqe();
        self.push(sqe);
    }

    /// The SENDMSG of the send queue's front messages (as many as fit `MAX_IOVECS`), marking a
    /// send in flight.
    fn send_sqe(&mut self) -> squeue::Entry {
        self.fill_msghdr();
        self.sending = true;
        opcode::SendMsg::new(types::Fd(self.sock), &*self.msghdr as *const libc::msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(UD_SEND)
    }

    /// Points the msghdr at the send queue's front messages (as many as fit `MAX_IOVECS`).
    fn fill_msghdr(&mut self) {
        self.iovecs.clear();
        let mut skip = self.front_sent;
        for m in self.outq.iter() {
            let data = m.data.as_ref().map(|d| d.as_slice()).unwrap_or(&[]);
            for part in [&m.head[..], data] {
                if part.len() <= skip {
                    skip -= part.len();
                    continue;
                }
                let part = &part[skip..];
                skip = 0;
                self.iovecs
                    .push(libc::iovec { iov_base: part.as_ptr() as *mut libc::c_void, iov_len: part.len() });
            }
            if self.iovecs.len() + 2 > MAX_IOVECS {
                break;
            }
        }
        self.msghdr.msg_iov = self.iovecs.as_mut_ptr();
        self.msghdr.msg_iovlen = self.iovecs.len();
    }

    fn queue(&mut self, head: Vec<u8>, data: Option<AlignedBuf>) {
        let m = OutMsg { head, data };
        self.queued += m.len();
        self.outq.push_back(m);
    }

    fn queue_scratch(&mut self) {
        let head = std::mem::replace(&mut self.scratch, Vec::with_capacity(256));
        self.queue(head, None);
    }

    fn complete(&mut self, ud: u64, res: i32) {
        match ud {
            UD_RECV => self.on_recv(res),
            UD_SEND => self.on_send(res),
            UD_WAKE => {
                self.wake_armed = false;
                if res != -libc::ECANCELED {
                    self.begin_shutdown();
                }
            }
            UD_CANCEL => {}
            idx => self.on_op(idx as usize, res),
        }
    }

    fn on_recv(&mut self, res: i32) {
        let target = self.recv.take().expect("a recv was in flight");
        if res == -libc::ECANCELED {
            return;
        }
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return;
            }
            self.fail(ConnError::Socket(io::Error::from_raw_os_error(-res)));
            return;
        }
        if res == 0 {
            self.eof = true;
            self.stop_recv = true;
            return;
        }
        let n = res as usize;
        match target {
            RecvTarget::Rbuf => {
                self.rend += n;
                self.poll.arrived();
            }
            RecvTarget::Payload => {
                let p = self.pending.as_mut().expect("payload recv without a pending write");
                p.filled += n;
                if p.buf.as_ref().is_some_and(|b| p.filled == b.len()) {
                    let p = self.pending.take().expect("checked");
                    self.submit_write(p);
                }
            }
        }
    }

    fn on_send(&mut self, res: i32) {
        self.sending = false;
        if res == -libc::ECANCELED {
            if let Some(l) = &mut self.linked {
                l.send_cancelled = true;
                if l.read.is_some() {
                    self.unlink();
                }
                return;
            }
        }
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                return;
            }
            self.fail(ConnError::Socket(io::Error::from_raw_os_error(-res)));
            self.outq.clear();
            self.queued = 0;
            return;
        }
        let mut sent = res as usize + self.front_sent;
        while let Some(front) = self.outq.front() {
            let l = front.len();
            if sent < l {
                break;
            }
            sent -= l;
            self.queued -= l;
            let m = self.outq.pop_front().expect("front exists");
            if let Some(d) = m.data {
                self.pool.put(d);
            }
        }
        self.front_sent = sent;
        if self.error.is_some() {
            self.outq.clear();
            self.queued = 0;
        }
    }

    fn alloc_op(&mut self, op: Op) -> u64 {
        self.n_ops += 1;
        if let Some(i) = self.free_ops.pop() {
            self.ops[i] = Some(op);
            i as u64
        } else {
            self.ops.push(Some(op));
            (self.ops.len() - 1) as u64
        }
    }

    fn submit_op(&mut self, idx: u64) {
        let fd = types::Fd(self.conn.export.backend.raw_fd());
        let punt = self.n_ops > ASYNC_WRITE_DEPTH && self.punt.punt();
        let sqe = match &mut self.ops[idx as usize].as_mut().expect("live op").kind {
            OpKind::Read { buf, offset, done, .. } => {
                let rest = &mut buf.as_mut_slice()[*done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .build()
            }
            OpKind::Write { buf, offset, fua, done, .. } => {
                let rest = &buf.as_slice()[*done..];
                let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                let sqe = opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(*offset + *done as u64)
                    .rw_flags(flags)
                    .build();
                // With other requests in flight, a small buffered write may go to an io-wq
                // worker instead of being tried inline in this thread, so a deep queue of them
                // uses the other cores while this thread keeps receiving (`super::punt` says
                // when that pays).
                if punt && rest.len() <= ASYNC_WRITE_MAX {
                    sqe.flags(squeue::Flags::ASYNC)
                } else {
                    sqe
                }
            }
            OpKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            OpKind::LinkedRead { .. } => unreachable!("a linked read is submitted with its send"),
        };
        self.push(sqe.user_data(idx));
    }

    /// Whether the next READ or WRITE, of `len` bytes, runs on this thread: the connection is
    /// hot, and the request is small and the only one there is (nothing in flight, queued to
    /// send or received after it).
    fn inlinable(&self, len: usize) -> bool {
        self.poll.hot() && len <= INLINE_MAX && self.idle()
    }

    fn start_op(&mut self, idx: u64, inline: bool) {
        if !inline {
            self.submit_op(idx);
            return;
        }
        let fd = self.conn.export.backend.raw_fd();
        let res = loop {
            let n = match &mut self.ops[idx as usize].as_mut().expect("live op").kind {
                OpKind::Read { buf, offset, done, .. } => {
                    let rest = &mut buf.as_mut_slice()[*done..];
                    let at = (*offset + *done as u64) as libc::off_t;
                    // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
                    unsafe { libc::pread(fd, rest.as_mut_ptr().cast(), rest.len(), at) }
                }
                OpKind::Write { buf, offset, fua, done, .. } => {
                    let rest = &buf.as_slice()[*done..];
                    let iov =
                        libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
                    let at = (*offset + *done as u64) as libc::off_t;
                    let flags = if *fua { libc::RWF_DSYNC } else { 0 };
                    // SAFETY: the iovec describes `rest`, valid for reads for the whole call.
                    unsafe { libc::pwritev2(fd, &iov, 1, at, flags) }
                }
                OpKind::Flush | OpKind::LinkedRead { .. } => unreachable!("only reads and writes run inline"),
            };
            let res = sys::result(n) as i32;
            if res != -libc::EINTR {
                break res;
            }
        };
        self.on_op(idx as usize, res);
    }

    fn submit_write(&mut self, p: PendingWrite) {
        let Some(buf) = p.buf else {
            transmission::error_reply(&mut self.scratch, p.cookie, self.conn.structured(), p.error);
            self.queue_scratch();
            return;
        };
        // Invariant 1: the extent is dirty before the write can be acknowledged.
        let ticket = match self.conn.export.begin_write(p.offset, buf.len() as u64) {
            Ok(t) => t,
            Err(e) => {
                self.pool.put(buf);
                transmission::error_reply(&mut self.scratch, p.cookie, self.conn.structured(), e);
                self.queue_scratch();
                return;
            }
        };
        let inline = self.inlinable(buf.len());
        let kind = OpKind::Write { buf, offset: p.offset, fua: p.fua, done: 0, ticket };
        let idx = self.alloc_op(Op { cookie: p.cookie, kind });
        self.start_op(idx, inline);
    }

    fn on_op(&mut self, idx: usize, res: i32) {
        let linked_len = match self.ops[idx].as_ref().map(|o| &o.kind) {
            Some(OpKind::LinkedRead { len, .. }) => Some(*len),
            _ => None,
        };
        if let Some(len) = linked_len {
            let l = self.linked.as_mut().expect("a linked read is tracked");
            debug_assert_eq!(l.idx, idx);
            if res >= 0 && res as usize == len {
                // The kernel sends the reply now; the send queue owns the buffer.
                self.linked = None;
                self.ops[idx] = None;
                self.free_ops.push(idx);
                self.n_ops -= 1;
            } else {
                l.read = Some(res);
                if l.send_cancelled {
                    self.unlink();
                }
            }
            return;
        }
        let structured = self.conn.structured();
        let op = self.ops[idx].as_mut().expect("completion for a live op");
        // A short transfer continues where it stopped.
        let short = match &mut op.kind {
            OpKind::Read { buf, done, .. } | OpKind::Write { buf, done, .. } if res > 0 => {
                *done += res as usize;
                *done < buf.len()
            }
            _ => false,
        };
        if short {
            self.submit_op(idx as u64);
            return;
        }
        let op = self.ops[idx].take().expect("live op");
        self.free_ops.push(idx);
        self.n_ops -= 1;
        let errno = match res {
            r if r < 0 => Some(Errno::from_io(&io::Error::from_raw_os_error(-r))),
            // A read that hits the end of a file that shrank under us: look at it now.
            0 if matches!(op.kind, OpKind::Read { .. }) => {
                self.conn.export.backend.recheck();
                Some(Errno::Io)
            }
            _ => None,
        };
        let mut op = op;
        let errno = match (&mut op.kind, errno) {
            (OpKind::Write { offset, ticket, buf, .. }, e) => {
                self.punt.write_done(std::time::Instant::now());
                self.conn.export.end_write(*ticket, *offset, buf.len() as u64, false);
                e
            }
            (OpKind::Read { buf, offset, .. }, None) => {
                self.conn.export.after_read(buf.as_mut_slice(), *offset).err().map(|e| Errno::from_io(&e))
            }
            (_, e) => e,
        };
        let mut head = std::mem::replace(&mut self.scratch, Vec::with_capacity(256));
        match (op.kind, errno) {
            (OpKind::Read { buf, .. } | OpKind::Write { buf, .. }, Some(e)) => {
                self.pool.put(buf);
                transmission::error_reply(&mut head, op.cookie, structured, e);
                self.queue(head, None);
            }
            (OpKind::Flush, Some(e)) => {
                transmission::error_reply(&mut head, op.cookie, structured, e);
                self.queue(head, None);
            }
            (OpKind::Read { buf, offset, df, .. }, None) => {
                match self.conn.sparse_read_reply(op.cookie, offset, buf.as_slice(), df) {
                    Some(reply) => {
                        self.pool.put(buf);
                        self.queue(reply, None);
                    }
                    None => {
                        transmission::read_data_header(
                            &mut head,
                            op.cookie,
                            structured,
                            offset,
                            buf.len() as u32,
                            true,
                        );
                        self.queue(head, Some(buf));
                    }
                }
            }
            (OpKind::Write { buf, .. }, None) => {
                self.pool.put(buf);
                transmission::ok_reply(&mut head, op.cookie, structured);
                self.queue(head, None);
            }
            (OpKind::Flush, None) => {
                transmission::ok_reply(&mut head, op.cookie, structured);
                self.queue(head, None);
            }
            (OpKind::LinkedRead { .. }, _) => unreachable!("linked reads end above"),
        }
    }

    /// Whether a READ of `len` bytes may go linked to its reply's send: nothing else in flight
    /// or queued to send (so its reply is next in order and holds up no other), a reply that
    /// is the data as read (the live disk, too short for holes to be looked for).
    fn can_link_read(&self, len: u32) -> bool {
        self.n_ops == 0
            && !self.sending
            && self.outq.is_empty()
            && len < SPARSE_READ_MIN
            && matches!(self.conn.export.kind, ExportKind::Live { .. })
    }

    /// Submits a READ into `buf` linked to the SENDMSG of its reply (see the module docs).
    fn submit_linked_read(&mut self, cookie: u64, offset: u64, df: bool, mut buf: AlignedBuf) {
        let (ptr, len) = (buf.as_mut_slice().as_mut_ptr(), buf.len());
        let idx = self.alloc_op(Op { cookie, kind: OpKind::LinkedRead { offset, len, df } });
        let mut head = std::mem::replace(&mut self.scratch, Vec::with_capacity(256));
        transmission::read_data_header(&mut head, cookie, self.conn.structured(), offset, len as u32, true);
        // The buffer moves into the send queue (empty until now, so the reply is the whole
        // send); its heap storage, which the read fills, stays put.
        self.queue(head, Some(buf));
        let fd = types::Fd(self.conn.export.backend.raw_fd());
        let read = opcode::Read::new(fd, ptr, len as u32)
            .offset(offset)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(idx);
        let send = self.send_sqe();
        self.push_all(&[read, send]);
        self.linked = Some(Linked { idx: idx as usize, read: None, send_cancelled: false });
    }

    /// The linked read failed or came up short and its send was cancelled: the buffer returns
    /// from the send queue and the read finishes as an ordinary one.
    fn unlink(&mut self) {
        let l = self.linked.take().expect("a linked read");
        let res = l.read.expect("the read's result");
        debug_assert_eq!(self.front_sent, 0);
        let m = self.outq.pop_front().expect("the linked reply is queued");
        self.queued -= m.len();
        let buf = m.data.expect("the linked reply carries the buffer");
        let op = self.ops[l.idx].as_mut().expect("the linked read's op");
        let OpKind::LinkedRead { offset, df, .. } = op.kind else { unreachable!("not a linked read") };
        op.kind = OpKind::Read { buf, offset, df, done: 0 };
        self.on_op(l.idx, res);
    }

    /// Consumes received bytes: payload of a pending write, then whole requests.
    fn parse(&mut self) {
        loop {
            if let Some(p) = &mut self.pending {
                let avail = self.rend - self.rstart;
                if let Some(buf) = &mut p.buf {
                    let n = avail.min(buf.len() - p.filled);
                    buf.as_mut_slice()[p.filled..p.filled + n]
                        .copy_from_slice(&self.rbuf[self.rstart..self.rstart + n]);
                    p.filled += n;
                    self.rstart += n;
                    if p.filled < buf.len() {
                        break;
                    }
                } else {
                    let n = (avail as u64).min(p.discard);
                    p.discard -= n;
                    self.rstart += n as usize;
                    if p.discard > 0 {
                        break;
                    }
                }
                let p = self.pending.take().expect("checked");
                self.submit_write(p);
                continue;
            }
            if self.stop_parse || self.throttled() || self.rend - self.rstart < REQUEST_LEN {
                break;
            }
            let hdr: &[u8; REQUEST_LEN] =
                self.rbuf[self.rstart..self.rstart + REQUEST_LEN].try_into().expect("len");
            let raw = match RawRequest::parse(hdr) {
                Ok(r) => r,
                Err(e) => {
                    self.fail(e.into());
                    break;
                }
            };
            self.rstart += REQUEST_LEN;
            self.request(raw);
        }
        if self.rstart == self.rend && self.recv != Some(RecvTarget::Rbuf) {
            self.rstart = 0;
            self.rend = 0;
        }
        if self.eof
            && self.error.is_none()
            && (self.pending.is_some() || self.rend > self.rstart)
            && !self.stop_parse
        {
            self.pending = None;
            self.fail(ConnError::Truncated);
        }
    }

    fn request(&mut self, raw: RawRequest) {
        let structured = self.conn.structured();
        let valid = self.conn.session.validate(&raw).and_then(|cmd| match cmd {
            Command::Read { offset, len, .. } => {
                self.conn.export.backend.check(offset, len.into()).map(|()| cmd)
            }
            _ => Ok(cmd),
        });
        match valid {
            Err(error) => {
                let discard = u64::from(raw.payload_len());
                if discard > 0 {
                    self.pending = Some(PendingWrite {
                        cookie: raw.cookie,
                        offset: 0,
                        fua: false,
                        buf: None,
                        filled: 0,
                        discard,
                        error,
                    });
                } else {
                    transmission::error_reply(&mut self.scratch, raw.cookie, structured, error);
                    self.queue_scratch();
                }
            }
            Ok(Command::Write { offset, len, fua }) => {
                let buf = self.pool.get(len as usize);
                self.pending = Some(PendingWrite {
                    cookie: raw.cookie,
                    offset,
                    fua,
                    buf: Some(buf),
                    filled: 0,
                    discard: 0,
                    error: Errno::Io,
                });
            }
            Ok(Command::Read { offset, len, df })
                if self.can_link_read(len) && !self.inlinable(len as usize) =>
            {
                let buf = self.pool.get(len as usize);
                self.submit_linked_read(raw.cookie, offset, df, buf);
            }
            Ok(Command::Read { offset, len, df }) => {
                let inline = self.inlinable(len as usize);
                let buf = self.pool.get(len as usize);
                let idx =
                    self.alloc_op(Op { cookie: raw.cookie, kind: OpKind::Read { buf, offset, df, done: 0 } });
                self.start_op(idx, inline);
            }
            Ok(Command::Flush) => {
                let idx = self.alloc_op(Op { cookie: raw.cookie, kind: OpKind::Flush });
                self.submit_op(idx);
            }
            Ok(Command::Disconnect) => {
                self.stop_parse = true;
                self.stop_recv = true;
                self.ending.get_or_insert(Ending::ClientDone);
            }
            Ok(cmd) => {
                self.conn.execute_inline(raw.cookie, cmd, &mut self.scratch);
                self.queue_scratch();
            }
        }
    }
}
