//! The two machines speaking to each other over encoded frames, the server's actions done by a
//! store in memory: whole sessions as the agent runs them, and what carries over between them.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::{
    ChunkData, Consistency, Decoder, GenerationKind, Hash, InitialSync, PointRef, ERR_DIVERGED,
    ERR_NO_SUCH_DISK, MIN_VERSION, VERSION,
};

const DISK: &str = "d0";

/// What the server keeps of `DISK` across sessions.
#[derive(Default)]
struct Store {
    latest: Option<PointRef>,
    /// Points: generation → (point, digest).
    points: HashMap<u64, (u64, Option<Hash>)>,
    chunks: HashSet<Hash>,
    checkpoint: Option<InitialSync>,
    current: Option<(u64, u64)>,
}

/// One connection: the agent's machine, the server's, and the store behind the server.
struct Conn<'a> {
    agent: AgentSession,
    server: ServerSession,
    store: &'a mut Store,
    /// The generation the server's driver receives (and its kind).
    pending: Option<(u64, GenerationKind)>,
    to_server: Decoder,
    to_agent: Decoder,
    closed: bool,
}

impl<'a> Conn<'a> {
    fn open(store: &'a mut Store) -> Self {
        let mut c = Conn {
            agent: AgentSession::new(),
            server: ServerSession::new("srv"),
            store,
            pending: None,
            to_server: Decoder::new(),
            to_agent: Decoder::new(),
            closed: false,
        };
        c.send(Frame::Hello { min_version: MIN_VERSION, max_version: VERSION, agent: "a".into() }).unwrap();
        assert!(matches!(c.recv(), Ok(Reply::Welcome { .. })));
        c
    }

    fn register(&mut self) -> DiskState {
        let register = Frame::RegisterDisk {
            disk: DISK.into(),
            size: 1 << 30,
            block_size: 4096,
            source: [1; 16],
            reenroll: false,
        };
        self.send(register).unwrap();
        match self.recv() {
            Ok(Reply::DiskState(st)) => st,
            other => panic!("{other:?}"),
        }
    }

    /// The agent begins `generation` of the test disk.
    fn begin(
        &mut self,
        generation: u64,
        kind: GenerationKind,
        base_point: Option<u64>,
    ) -> Result<(), SessionError> {
        self.send(Frame::BeginGeneration { disk: DISK.into(), generation, kind, base_point })
    }

    /// The agent sends `f` (its machine allowing); the server's driver runs on it.
    fn send(&mut self, f: Frame) -> Result<(), SessionError> {
        self.agent.send(&f)?;
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        self.to_server.feed(&bytes);
        while let Some(f) = self.to_server.next_frame().unwrap() {
            assert!(!self.closed, "the server closed; {} is not read", f.name());
            let step = self.server.receive(f);
            self.drive(step);
        }
        Ok(())
    }

    /// The server's driver: performs actions, sends frames, closes.
    fn drive(&mut self, mut step: ServerStep) {
        loop {
            match step {
                ServerStep::Read => return,
                ServerStep::Send(f) => return self.answer(&f),
                ServerStep::Act(a) => {
                    let outcome = self.perform(a);
                    step = self.server.complete(outcome);
                }
                ServerStep::Refuse(r) => {
                    self.closed = true;
                    return self.answer(&r.to_frame());
                }
                ServerStep::Ended(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn answer(&mut self, f: &Frame) {
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        self.to_agent.feed(&bytes);
    }

    /// The store's side of each action.
    fn perform(&mut self, a: ServerAction) -> Outcome {
        let st = &mut *self.store;
        match a {
            ServerAction::Accept { .. }
            | ServerAction::StoreZero { .. }
            | ServerAction::Settle
            | ServerAction::SettleReady => Outcome::Done,
            ServerAction::Register { disk, .. } if disk != DISK => {
                Outcome::Refused(Refusal::new(ERR_NO_SUCH_DISK, format!("no disk {disk}")))
            }
            ServerAction::Register { .. } => {
                Outcome::Registered { latest: st.latest, initial: st.checkpoint, resync: None }
            }
            ServerAction::RecordCurrent { point, as_of_unix_ms, .. } => {
                st.current = Some((point, as_of_unix_ms));
                Outcome::Done
            }
            ServerAction::OpenGeneration { generation, kind, .. } => {
                if st.points.contains_key(&generation) {
                    self.pending = None;
                    return Outcome::HasPoint;
                }
                self.pending = Some((generation, kind));
                Outcome::Opened
            }
            ServerAction::AnswerHave { hashes } => {
                Outcome::Have(hashes.iter().map(|h| st.chunks.contains(h)).collect())
            }
            ServerAction::AnswerHashes { len, block, .. } => {
                Outcome::Hashes(vec![[0; 32]; usize::try_from(crate::hash_count(len, block)).unwrap()])
            }
            ServerAction::StoreChunk { hash, data, .. } => {
                assert!(self.pending.is_some(), "a chunk is stored only in a generation received");
                if data == ChunkData::Known && !st.chunks.contains(&hash) {
                    return Outcome::Refused(Refusal::new(
                        crate::ERR_BAD_REQUEST,
                        "a Known chunk the server lacks",
                    ));
                }
                st.chunks.insert(hash);
                Outcome::Done
            }
            ServerAction::Checkpoint { next_offset } => {
                let (generation, _) = self.pending.expect("a checkpoint of a generation received");
                st.checkpoint = Some(InitialSync { generation, next_offset });
                Outcome::Done
            }
            ServerAction::Commit { generation, cut_unix_ms, digest, .. } => {
                assert_eq!(self.pending.take().map(|p| p.0), Some(generation));
                let point = st.points.len() as u64 + 1;
                st.points.insert(generation, (point, digest));
                if st.latest.is_none_or(|l| generation > l.generation) {
                    st.latest = Some(PointRef { point, generation, cut_unix_ms });
                }
                st.checkpoint = None;
                Outcome::Committed { point }
            }
            ServerAction::ConfirmCommit { generation, digest } => {
                let (point, kept) = st.points[&generation];
                if kept != digest {
                    return Outcome::Refused(Refusal::new(ERR_DIVERGED, "two machines under one identity"));
                }
                Outcome::Committed { point }
            }
        }
    }

    /// The next frame the server sent, through the agent's machine.
    fn recv(&mut self) -> Result<Reply, SessionError> {
        let f = self.to_agent.next_frame().unwrap().expect("the server answered");
        self.agent.receive(f)
    }

    fn commit(
        &mut self,
        generation: u64,
        consistency: Consistency,
        digest: Option<Hash>,
    ) -> Result<u64, SessionError> {
        self.send(Frame::Commit { generation, cut_unix_ms: generation * 10, consistency, digest })?;
        match self.recv()? {
            Reply::Committed { point, .. } => Ok(point),
            other => panic!("{other:?}"),
        }
    }

    fn chunk(&mut self, offset: u64, byte: u8) {
        let hash = [byte; 32];
        self.send(Frame::HaveQuery { hashes: vec![hash] }).unwrap();
        let Ok(Reply::HaveReply { have }) = self.recv() else { panic!() };
        let data = if have[0] { ChunkData::Known } else { ChunkData::Compressed(vec![byte]) };
        self.send(Frame::Chunk { offset, len: 4096, hash, data }).unwrap();
    }
}

#[test]
fn an_initial_copy_resumes_then_generations_follow_and_a_quiet_interval_is_current() {
    let mut store = Store::default();
    let mut c = Conn::open(&mut store);
    let st = c.register();
    assert_eq!((st.latest, st.initial_copy()), (None, None));
    c.begin(1, GenerationKind::InitialFull, None).unwrap();
    c.chunk(0, 1);
    c.send(Frame::Progress { next_offset: 1 << 20 }).unwrap();
    assert_eq!(c.recv(), Ok(Reply::ProgressAck { next_offset: 1 << 20 }));
    drop(c); // the connection breaks

    let mut c = Conn::open(&mut store);
    let st = c.register();
    let resume = st.initial_copy().expect("the checkpoint");
    assert_eq!(resume, InitialSync { generation: 1, next_offset: 1 << 20 });
    c.begin(resume.generation, GenerationKind::InitialFull, None).unwrap();
    c.chunk(1 << 20, 1); // the server has it: sent as Known
    c.send(Frame::Zero { offset: 2 << 20, len: 4096 }).unwrap();
    assert_eq!(c.commit(1, Consistency::Inconsistent, None), Ok(1));
    let latest = c.agent.latest().expect("committed");
    assert_eq!((latest.point, latest.generation), (1, 1));

    // Incrementals on the latest point, each with its digest.
    for g in 2..=3 {
        let base = c.agent.latest().map(|l| l.point);
        c.begin(g, GenerationKind::Incremental, base).unwrap();
        c.chunk(4096 * g, u8::try_from(g).unwrap());
        assert_eq!(c.commit(g, Consistency::Crash, Some([u8::try_from(g).unwrap(); 32])), Ok(g));
    }
    // Nothing written: Current of the latest point.
    c.send(Frame::Current { point: 3, as_of_unix_ms: 99 }).unwrap();
    assert_eq!(c.recv(), Ok(Reply::CurrentAck { point: 3, as_of_unix_ms: 99 }));
    assert_eq!(store.current, Some((3, 99)));
}

#[test]
fn a_generation_sent_again_is_its_point_and_with_other_content_divergence() {
    let mut store = Store::default();
    let mut c = Conn::open(&mut store);
    c.register();
    c.begin(1, GenerationKind::InitialFull, None).unwrap();
    c.commit(1, Consistency::Inconsistent, None).unwrap();
    c.begin(2, GenerationKind::Incremental, Some(1)).unwrap();
    assert_eq!(c.commit(2, Consistency::Crash, Some([2; 32])), Ok(2));
    drop(c);

    // The commit's answer was lost: the agent sends generation 2 again, on the point before it.
    let mut c = Conn::open(&mut store);
    let st = c.register();
    assert_eq!(st.latest.map(|l| l.generation), Some(2));
    c.begin(2, GenerationKind::Incremental, Some(2)).unwrap();
    c.chunk(0, 9); // dropped: the generation is a point
    assert_eq!(c.commit(2, Consistency::Crash, Some([2; 32])), Ok(2), "the same point");
    assert_eq!(c.store.points.len(), 2);
    // Other content under the same generation: divergence, fatal, and the session is over.
    c.begin(2, GenerationKind::Incremental, Some(2)).unwrap();
    match c.commit(2, Consistency::Crash, Some([7; 32])) {
        Err(e @ SessionError::Refused(_)) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains(&format!("code {ERR_DIVERGED}")), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(c.agent.is_over() && c.server.is_over() && c.closed);
}

#[test]
fn a_resync_pipelines_hash_queries_and_resumes_from_its_checkpoint() {
    let mut store =
        Store { latest: Some(PointRef { point: 1, generation: 4, cut_unix_ms: 0 }), ..Store::default() };
    store.points.insert(4, (1, None));
    let mut c = Conn::open(&mut store);
    let st = c.register();
    let latest = st.latest.unwrap();
    c.begin(7, GenerationKind::InitialFull, Some(1)).unwrap();
    for region in 0..3u64 {
        let q = Frame::HashQuery {
            disk: DISK.into(),
            point: 1,
            offset: region << 26,
            len: 1 << 26,
            block: 64 << 10,
        };
        c.send(q).unwrap();
    }
    for region in 0..3u64 {
        match c.recv() {
            Ok(Reply::Hashes { offset, block, hashes }) => {
                assert_eq!((offset, block, hashes.len()), (region << 26, 64 << 10, 1024));
            }
            other => panic!("{other:?}"),
        }
    }
    c.send(Frame::Progress { next_offset: 3 << 26 }).unwrap();
    assert_eq!(c.recv(), Ok(Reply::ProgressAck { next_offset: 3 << 26 }));
    drop(c);

    let mut c = Conn::open(&mut store);
    let st = c.register();
    // The shim that cut generation 7 went on to 8: the resync resumes; one that started over not.
    assert_eq!(DiskState::interrupted_resync(st.initial, &latest).map(|i| i.next_offset), Some(3 << 26));
    assert!(DiskState::resumable_resync(st.initial, &latest, 8).is_some());
    assert!(DiskState::resumable_resync(st.initial, &latest, 2).is_none());
    c.begin(7, GenerationKind::InitialFull, Some(1)).unwrap();
    assert_eq!(c.commit(7, Consistency::Inconsistent, None), Ok(2));
    assert_eq!(c.agent.latest().map(|l| (l.point, l.generation)), Some((2, 7)));
}

#[test]
fn a_refusal_reaches_the_agent_and_ends_both_sides() {
    let mut store = Store::default();
    let mut c = Conn::open(&mut store);
    c.register();
    // A Known chunk the server lacks, inside a generation: the store refuses it.
    c.begin(1, GenerationKind::InitialFull, None).unwrap();
    c.send(Frame::Chunk { offset: 0, len: 4096, hash: [5; 32], data: ChunkData::Known }).unwrap();
    assert!(c.server.is_over() && c.closed);
    match c.recv() {
        Err(SessionError::Refused(r)) => assert!(r.message.contains("Known chunk"), "{r}"),
        other => panic!("{other:?}"),
    }
    assert!(c.agent.is_over());
}
