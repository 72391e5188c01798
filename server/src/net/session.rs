//! The session of one connection, driven: the agent's frames go to
//! [`wire::session::ServerSession`], which holds the order of a session (`docs/wire.md` §6) and
//! says what to send, what to do and when to end; this loop reads and writes the frames (with
//! [`Conn`]'s timeouts), performs the actions ([`Actions`], the store's side) and sends the
//! refusal that ends a session.

use std::io;
use std::sync::atomic::Ordering;

use wire::session::{Outcome, Refusal, ServerAction, ServerSession, ServerStep};
use wire::ErrorClass;

use super::access::{Access, Peer};
use super::actions::Actions;
use super::admission::Handshake;
use super::ingest::IDLE_POLL_MS;
use super::metrics::Metrics;
use super::stream::{Conn, Recv, Stream};
use crate::Store;

/// Runs the session of a connection whose TLS handshake (if any) is done: its `Hello` within
/// the handshake's deadline, then its frames until the agent closes or either side ends it.
pub(super) fn run<S: Stream>(
    mut c: Conn<S>,
    access: &Access,
    peer: Peer,
    store: &Store,
    name: &str,
    gate: &mut Handshake,
) -> io::Result<()> {
    let Some(hello) = c.hello(gate)? else {
        return c.error(ErrorClass::Fatal, wire::ERR_BAD_REQUEST, "expected Hello".into());
    };
    let mut session = ServerSession::new(name);
    std::thread::scope(|scope| {
        let mut actions = Actions::new(scope, store, access, peer.fingerprint.clone(), holder(&peer));
        let mut step = session.receive(hello);
        loop {
            step = match step {
                ServerStep::Read => match c.next(actions.waiting())? {
                    Recv::Frame(f) => session.receive(f),
                    Recv::End => return Ok(()),
                    // Nothing more from the agent yet while chunks are verified: until it
                    // sends more, extents go in as their uploads finish, so a refusal is never
                    // held back while the agent waits.
                    Recv::Idle if c.readable(IDLE_POLL_MS) => ServerStep::Read,
                    Recv::Idle => session.idle(),
                },
                ServerStep::Send(f) => {
                    c.send(&f)?;
                    ServerStep::Read
                }
                ServerStep::Act(ServerAction::Accept { version, agent }) => {
                    gate.done();
                    c.authenticated();
                    connected(&peer, &agent, version);
                    session.complete(Outcome::Done)
                }
                ServerStep::Act(action) => session.complete(actions.perform(action)),
                ServerStep::Refuse(r) => return refuse(&mut c, &access.metrics, r),
                ServerStep::Ended(r) => {
                    let (holder, disk) = (actions.holder(), session.disk());
                    match r.class {
                        ErrorClass::Fatal => {
                            tracing::error!(peer = %holder, disk = ?disk, code = r.code, "the agent ended the session: {}", r.message)
                        }
                        ErrorClass::Retryable => {
                            tracing::warn!(peer = %holder, disk = ?disk, code = r.code, "the agent ended the session: {}", r.message)
                        }
                    }
                    return Ok(());
                }
            }
        }
    })
}

/// Logs the agent's connection, as its certificate names it.
fn connected(peer: &Peer, agent: &str, version: u16) {
    let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
    match &peer.fingerprint {
        Some(fp) => tracing::info!(
            peer = %addr,
            cert_cn = ?peer.cn.as_deref().unwrap_or(""),
            cert_san = ?peer.san,
            fingerprint = %fp,
            enrolled_as = ?peer.enrolled.as_deref().unwrap_or("(not enrolled)"),
            claims = ?agent,
            version,
            "agent connected"
        ),
        None => {
            tracing::info!(peer = %addr, claims = ?agent, version, "agent connected without TLS (not authenticated)")
        }
    }
}

/// Who holds a disk's session, as the busy refusal names it: the certificate's identity.
fn holder(peer: &Peer) -> String {
    let addr = peer.addr.map(|a| a.to_string()).unwrap_or_default();
    match (&peer.fingerprint, &peer.enrolled, &peer.cn) {
        (Some(fp), Some(name), _) => {
            format!("enrolled agent {name} at {addr}, certificate {}", &fp[..fp.len().min(16)])
        }
        (Some(fp), None, cn) => format!(
            "certificate {} (CN {:?}) at {addr}",
            &fp[..fp.len().min(16)],
            cn.as_deref().unwrap_or("")
        ),
        (None, _, _) => format!("unauthenticated agent at {addr}"),
    }
}

/// Sends the refusal that ends the session: nothing of the generation being received becomes
/// a point; the agent reconnects and, if the refusal is retryable, sends it again.
fn refuse<S: Stream>(c: &mut Conn<S>, metrics: &Metrics, r: Refusal) -> io::Result<()> {
    metrics.rejected_total.fetch_add(1, Ordering::Relaxed);
    match r.class {
        ErrorClass::Fatal => tracing::error!(code = r.code, "refused the session: {}", r.message),
        ErrorClass::Retryable => tracing::warn!(code = r.code, "refused the generation: {}", r.message),
    }
    c.error(r.class, r.code, r.message)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use wire::{ChunkData, Decoder, Frame, Hash, InitialSync, PointRef};

    use super::*;
    use crate::net::access::{Enrollment, Sessions};
    use crate::net::ingest::INLINE_BELOW;
    use crate::store::hashes::tests::{bytes, expected, put, store_with_point, DISK, SIZE};
    use crate::{Consistency, PointSel};

    /// A client's end of a session run on a thread.
    struct Client {
        stream: UnixStream,
        dec: Decoder,
        thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    }

    impl Client {
        fn start(store: &Arc<Store>) -> Client {
            Client::start_with(
                store,
                &Arc::new(Access {
                    tls: None,
                    enrollment: Enrollment::default(),
                    metrics: Arc::default(),
                    sessions: Sessions::default(),
                }),
            )
        }

        /// A session of a server whose other sessions share `access`.
        fn start_with(store: &Arc<Store>, access: &Arc<Access>) -> Client {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let (store, access) = (store.clone(), access.clone());
            let thread = std::thread::spawn(move || {
                let conn =
                    Conn { stream: theirs, dec: Decoder::new(), buf: vec![0; 64 << 10], out: Vec::new() };
                run(conn, &access, Peer::default(), &store, "test", &mut Handshake::unlimited())
            });
            let mut c = Client { stream: ours, dec: Decoder::new(), thread: Some(thread) };
            c.send(&Frame::Hello {
                min_version: wire::VERSION,
                max_version: wire::VERSION,
                agent: "test".into(),
            });
            assert!(matches!(c.recv(), Some(Frame::Welcome { version: wire::VERSION, .. })));
            c
        }

        fn send(&mut self, f: &Frame) {
            let mut out = Vec::new();
            f.encode(&mut out);
            self.stream.write_all(&out).unwrap();
        }

        fn recv(&mut self) -> Option<Frame> {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return Some(f);
                }
                let n = self.stream.read(&mut buf).unwrap();
                if n == 0 {
                    return None;
                }
                self.dec.feed(&buf[..n]);
            }
        }

        fn register(&mut self) -> Frame {
            self.register_as([1; 16], false)
        }

        fn register_as(&mut self, source: wire::SourceId, reenroll: bool) -> Frame {
            self.send(&Frame::RegisterDisk {
                disk: DISK.into(),
                size: SIZE,
                block_size: 512,
                source,
                reenroll,
            });
            self.recv().unwrap()
        }

        fn commit(&mut self, generation: u64, digest: Option<Hash>) -> Option<Frame> {
            self.send(&Frame::Commit {
                generation,
                cut_unix_ms: 10 + generation,
                consistency: wire::Consistency::Crash,
                digest,
            });
            self.recv()
        }

        /// Expects an `Error` with `code`, then the end of the session.
        fn expect_error(mut self, code: u16) {
            match self.recv() {
                Some(Frame::Error { code: c, .. }) => assert_eq!(c, code),
                other => panic!("expected an error {code}, got {other:?}"),
            }
            assert_eq!(self.recv(), None);
            self.thread.take().unwrap().join().unwrap().unwrap();
        }
    }

    fn query(point: u64, offset: u64, len: u64, block: u32) -> Frame {
        Frame::HashQuery { disk: DISK.into(), point, offset, len, block }
    }

    fn begin(generation: u64, kind: wire::GenerationKind, base_point: u64) -> Frame {
        Frame::BeginGeneration { disk: DISK.into(), generation, kind, base_point: Some(base_point) }
    }

    /// A `Chunk` of `data` at `offset`, compressed, its hash the true one.
    fn chunk(offset: u64, data: &[u8]) -> Frame {
        Frame::Chunk {
            offset,
            len: data.len() as u32,
            hash: *blake3::hash(data).as_bytes(),
            data: ChunkData::Compressed(zstd::bulk::compress(data, 1).unwrap()),
        }
    }

    #[test]
    fn a_session_answers_hash_queries_in_order_and_refuses_bad_ones() {
        let (_dir, store, image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        // Before RegisterDisk the disk is unknown to the session.
        c.send(&query(1, 0, 4096, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);

        let mut c = Client::start(&store);
        assert!(matches!(c.register(), Frame::DiskState { latest: Some(PointRef { point: 1, .. }), .. }));
        // Pipelined: the answers come in the order asked.
        let asks = [(0, SIZE, 64 << 10), (64 << 10, 64 << 10, 4096), (1 << 20, SIZE - (1 << 20), 4096)];
        for &(o, l, b) in &asks {
            c.send(&query(1, o, l, b));
        }
        for &(o, l, b) in &asks {
            assert_eq!(
                c.recv(),
                Some(Frame::Hashes { offset: o, block: b, hashes: expected(&image, o, l, b) })
            );
        }
        // A point the disk does not have.
        c.send(&query(9, 0, 4096, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);
        // A range past the disk's end.
        let mut c = Client::start(&store);
        c.register();
        c.send(&query(1, 1 << 20, 8192, 4096));
        c.expect_error(wire::ERR_BAD_REQUEST);
    }

    /// A resync as the agent runs it: an InitialFull generation on the latest point, hash
    /// queries between the chunks, a checkpoint, a reconnect that resumes, and the commit.
    #[test]
    fn a_resync_generation_on_a_base_resumes_and_commits() {
        let (_dir, store, mut image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(5, wire::GenerationKind::InitialFull, 1));
        c.send(&query(1, 0, 64 << 10, 4096));
        assert!(matches!(c.recv(), Some(Frame::Hashes { .. })));
        let data = bytes(99, 4096);
        c.send(&chunk(4096, &data));
        image[4096..8192].copy_from_slice(&data);
        c.send(&Frame::Progress { next_offset: 512 << 10 });
        assert_eq!(c.recv(), Some(Frame::ProgressAck { next_offset: 512 << 10 }));
        drop(c); // the connection breaks
        let mut c = Client::start(&store);
        match c.register() {
            Frame::DiskState { latest, initial, .. } => {
                assert_eq!(latest.map(|l| l.point), Some(1));
                assert_eq!(initial, Some(InitialSync { generation: 5, next_offset: 512 << 10 }));
            }
            f => panic!("{f:?}"),
        }
        c.send(&begin(5, wire::GenerationKind::InitialFull, 1));
        // Above the checkpoint the base still answers.
        c.send(&query(1, 512 << 10, SIZE - (512 << 10), 64 << 10));
        assert_eq!(
            c.recv(),
            Some(Frame::Hashes {
                offset: 512 << 10,
                block: 64 << 10,
                hashes: expected(&image, 512 << 10, SIZE - (512 << 10), 64 << 10)
            })
        );
        c.send(&Frame::Zero { offset: SIZE - 1024, len: 1024 });
        image[SIZE as usize - 1024..].fill(0);
        c.send(&Frame::Commit {
            generation: 5,
            cut_unix_ms: 7,
            consistency: wire::Consistency::Inconsistent,
            digest: None,
        });
        assert_eq!(c.recv(), Some(Frame::Committed { point: 2, generation: 5 }));
        let reader = store.open_point(DISK, PointSel::Latest).unwrap();
        assert_eq!(reader.info().consistency, Consistency::Inconsistent);
        let mut got = vec![0u8; SIZE as usize];
        reader.read_at(&mut got, 0).unwrap();
        assert!(got == image, "the resynced point reads as the base with the changes applied");
    }

    /// Large chunks are verified on several threads, small ones by the connection, but extents
    /// reach the point in the order sent: overlapping chunks of both kinds, Known chunks and
    /// zeroes, pipelined with no pause, end as the last one over each byte wrote them; a
    /// corrupt chunk verified by a worker, with nothing sent after it, is still refused.
    #[test]
    fn parallel_verification_applies_extents_in_the_order_sent() {
        let (_dir, store, mut image) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        let known = bytes(7, 8192);
        let known_hash = put(&store, &known);
        let big = u64::from(INLINE_BELOW) + (32 << 10);
        for i in 0..26u64 {
            // Each extent overlaps the ones before it (32 KiB apart, most of them longer).
            let off = (i * 32) << 10;
            if i % 7 == 3 {
                c.send(&Frame::Zero { offset: off, len: 48 << 10 });
                image[off as usize..off as usize + (48 << 10)].fill(0);
            } else if i % 11 == 5 {
                c.send(&Frame::Chunk { offset: off, len: 8192, hash: known_hash, data: ChunkData::Known });
                image[off as usize..off as usize + 8192].copy_from_slice(&known);
            } else {
                let len = if i % 5 == 2 { 40 << 10 } else { big };
                let data = bytes(1000 + i, len as usize);
                c.send(&chunk(off, &data));
                image[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
        c.send(&Frame::Commit {
            generation: 2,
            cut_unix_ms: 9,
            consistency: wire::Consistency::Crash,
            digest: None,
        });
        assert_eq!(c.recv(), Some(Frame::Committed { point: 2, generation: 2 }));
        let mut got = vec![0u8; SIZE as usize];
        store.open_point(DISK, PointSel::Latest).unwrap().read_at(&mut got, 0).unwrap();
        assert!(got == image, "the point reads as the extents applied in the order sent");

        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(3, wire::GenerationKind::Incremental, 2));
        for i in 0..5u64 {
            let mut frame = chunk(i * big, &bytes(5000 + i, big as usize));
            if let (3, Frame::Chunk { hash, .. }) = (i, &mut frame) {
                hash[0] ^= 1;
            }
            c.send(&frame);
        }
        c.expect_error(wire::ERR_CORRUPT_CHUNK);
        assert_eq!(store.open_point(DISK, PointSel::Latest).unwrap().info().id, 2);
    }

    /// One source per disk: the first source binds the disk; another is refused as fatal
    /// whatever it sends; a re-enrollment rebinds it and makes the next generation a resync.
    #[test]
    fn a_second_source_is_refused_and_a_re_enrollment_requires_a_resync() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut a = Client::start(&store);
        assert!(matches!(a.register_as([1; 16], false), Frame::DiskState { resync: None, .. }));
        drop(a);
        let mut b = Client::start(&store);
        match b.register_as([2; 16], false) {
            Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_OTHER_SOURCE, message } => {
                assert!(
                    message.contains(&"02".repeat(16)) && message.contains(&"01".repeat(16)),
                    "{message}"
                );
                assert!(message.contains("--reenroll"), "{message}");
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(store.source(DISK).unwrap(), Some("01".repeat(16)));
        let mut b = Client::start(&store);
        match b.register_as([2; 16], true) {
            Frame::DiskState { resync: Some(why), .. } => assert!(why.contains("re-enrolled"), "{why}"),
            f => panic!("{f:?}"),
        }
        // An incremental on the latest point is refused until a resync made a point.
        b.send(&begin(2, wire::GenerationKind::Incremental, 1));
        b.expect_error(wire::ERR_RESYNC_REQUIRED);
        let mut b = Client::start(&store);
        assert!(matches!(b.register_as([2; 16], false), Frame::DiskState { resync: Some(_), .. }));
        b.send(&begin(3, wire::GenerationKind::InitialFull, 1));
        assert_eq!(b.commit(3, None), Some(Frame::Committed { point: 2, generation: 3 }));
        assert!(matches!(b.register_as([2; 16], false), Frame::DiskState { resync: None, .. }));
        // The old source is now the other one.
        let mut a = Client::start(&store);
        assert!(matches!(a.register_as([1; 16], false), Frame::Error { code: wire::ERR_OTHER_SOURCE, .. }));
    }

    /// A disk allows one session at a time: a second gets a retryable ERR_BUSY, and gets in
    /// once the first ended.
    #[test]
    fn a_disk_in_a_session_is_busy_for_another() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let access = Arc::new(Access {
            tls: None,
            enrollment: Enrollment::default(),
            metrics: Arc::default(),
            sessions: Sessions::default(),
        });
        let mut a = Client::start_with(&store, &access);
        assert!(matches!(a.register(), Frame::DiskState { .. }));
        let mut b = Client::start_with(&store, &access);
        match b.register() {
            Frame::Error { class: ErrorClass::Retryable, code: wire::ERR_BUSY, message } => {
                assert!(message.contains("another session"), "{message}")
            }
            f => panic!("{f:?}"),
        }
        drop(a);
        let mut b = Client::start_with(&store, &access);
        assert!(matches!(b.register(), Frame::DiskState { .. }));
    }

    /// A generation sent again with its point's digest is the harmless duplicate; with another
    /// digest, or older than the latest point without one of its own, it is divergence: fatal,
    /// and never answered with the other content's point.
    #[test]
    fn a_generation_sent_again_with_other_content_is_divergence() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        c.send(&chunk(0, &[7; 512]));
        assert_eq!(c.commit(2, Some([0xaa; 32])), Some(Frame::Committed { point: 2, generation: 2 }));
        // The same content again: the same point.
        c.send(&begin(2, wire::GenerationKind::Incremental, 2));
        assert_eq!(c.commit(2, Some([0xaa; 32])), Some(Frame::Committed { point: 2, generation: 2 }));
        // Other content under the same generation: refused, fatal.
        c.send(&begin(2, wire::GenerationKind::Incremental, 2));
        match c.commit(2, Some([0xbb; 32])) {
            Some(Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_DIVERGED, message }) => {
                assert!(message.contains("two machines"), "{message}")
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(c.recv(), None);
        // A generation below the latest point's without a point of its own, on that point.
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(5, wire::GenerationKind::Incremental, 2));
        assert_eq!(c.commit(5, Some([0xcc; 32])), Some(Frame::Committed { point: 3, generation: 5 }));
        c.send(&begin(4, wire::GenerationKind::Incremental, 3));
        c.expect_error(wire::ERR_DIVERGED);
        assert_eq!(store.points(DISK).unwrap().len(), 3);
    }

    /// The order of a session is the session machine's: a `Commit` of another generation than
    /// the open one, and `Progress` in an incremental, end the session, and nothing of the
    /// generation becomes a point.
    #[test]
    fn frames_out_of_order_end_the_session_and_store_nothing() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        c.send(&chunk(0, &bytes(3, 8192)));
        match c.commit(3, None) {
            Some(Frame::Error { class: ErrorClass::Fatal, code: wire::ERR_BAD_REQUEST, message }) => {
                assert!(message.contains("generation 2 is open"), "{message}")
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(c.recv(), None);
        let mut c = Client::start(&store);
        c.register();
        c.send(&begin(2, wire::GenerationKind::Incremental, 1));
        c.send(&Frame::Progress { next_offset: 0 });
        c.expect_error(wire::ERR_BAD_REQUEST);
        assert_eq!(store.points(DISK).unwrap().len(), 1);
    }

    /// `Current` records that the latest point still equals the disk; for another point it is
    /// refused.
    #[test]
    fn current_records_an_unchanged_disk() {
        let (_dir, store, _) = store_with_point();
        let store = Arc::new(store);
        let mut c = Client::start(&store);
        c.register();
        c.send(&Frame::Current { point: 1, as_of_unix_ms: 5_000 });
        assert_eq!(c.recv(), Some(Frame::CurrentAck { point: 1, as_of_unix_ms: 5_000 }));
        assert_eq!(store.current_unix_ms(DISK).unwrap(), Some(5_000));
        assert_eq!(store.points(DISK).unwrap().len(), 1, "no point is made");
        c.send(&Frame::Current { point: 7, as_of_unix_ms: 6_000 });
        c.expect_error(wire::ERR_BAD_REQUEST);
    }
}
