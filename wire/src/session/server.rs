//! The server's side of a session (`docs/wire.md` §6).

use super::Refusal;
use crate::{
    hash_count, negotiate, ChunkData, Consistency, ErrorClass, Frame, GenerationKind, Hash, InitialSync,
    PointRef, SourceId, ERR_BAD_REQUEST, ERR_VERSION, MIN_VERSION, VERSION,
};

/// The server's side of one connection's session: fed each frame the agent sends and the result
/// of each action it asks for, it says what to send, what to do, and when the session ends.
///
/// The driver (the code that owns the socket and the store) runs this loop:
///
/// - a frame arrives: [`ServerSession::receive`]; nothing more has arrived for now (the driver
///   asks only while extents it stored are still being verified): [`ServerSession::idle`];
/// - [`ServerStep::Act`]: perform the action, then report its result with
///   [`ServerSession::complete`], which returns the next step (another action, when the frame
///   waited for [`ServerAction::Settle`]);
/// - [`ServerStep::Send`]: send the frame; [`ServerStep::Read`]: nothing to send;
/// - [`ServerStep::Refuse`]: send the refusal's `Error` and close; [`ServerStep::Ended`]: the
///   agent ended the session with an `Error`, close. Either way the session is over (§5, §6.7).
///
/// Every refusal ends the session, so an action whose result is a refusal changes nothing the
/// machine keeps.
///
/// The driver may store an extent in the background ([`ServerAction::StoreChunk`] is done once
/// the chunk is queued, e.g. to be verified on another thread): before it handles any frame but
/// an extent, the machine asks for [`ServerAction::Settle`], so every request is answered, and
/// a refused extent refused, only once every extent before it is in the generation (§6).
#[derive(Debug)]
pub struct ServerSession {
    /// The server's name and build, for `Welcome`.
    name: String,
    phase: Phase,
    /// The action the driver is performing, with what its answer needs.
    acting: Option<Acting>,
    /// The disk registered in this session: the last `RegisterDisk` (§6.2).
    disk: Option<String>,
    /// Extents were stored since the last [`ServerAction::Settle`].
    unsettled: bool,
    /// The frame that waits for [`ServerAction::Settle`].
    held: Option<Frame>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the agent's `Hello` (§6.1).
    Hello,
    /// After `Welcome`.
    Open { version: u16, generation: Generation },
    /// An `Error` was sent or received: nothing more (§6.7).
    Over,
}

/// The generation the session receives (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Generation {
    None,
    /// Begun and not yet committed: its extents become a point at its commit.
    Receiving {
        generation: u64,
        kind: GenerationKind,
    },
    /// Begun again after it became a point (§6.6): its extents are dropped, its checkpoints
    /// acknowledged and its commit answered with that point once its digest matches.
    HasPoint {
        generation: u64,
    },
}

/// The action the driver is performing, and what its result needs to become an answer.
#[derive(Debug)]
enum Acting {
    Accept { version: u16 },
    Register { disk: String },
    RecordCurrent { point: u64, as_of_unix_ms: u64 },
    Open { generation: u64, kind: GenerationKind },
    AnswerHave { count: usize },
    AnswerHashes { offset: u64, block: u32, count: u64 },
    Store,
    Settle,
    SettleReady,
    Checkpoint { next_offset: u64 },
    Commit { generation: u64 },
}

/// What the driver does next.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum ServerStep {
    /// Nothing to send: read the next frame.
    Read,
    /// Send this frame, then read the next.
    Send(Frame),
    /// Perform this action, then report its result with [`ServerSession::complete`].
    Act(ServerAction),
    /// Send this refusal's `Error` and close: the session is over (§5).
    Refuse(Refusal),
    /// The agent ended the session with this `Error` (§6.7): close without answering.
    Ended(Refusal),
}

/// What the server is asked to do; each names the [`Outcome`] that reports it done. Any action
/// may instead end in [`Outcome::Refused`].
#[derive(Debug, PartialEq, Eq)]
pub enum ServerAction {
    /// The agent's `Hello` agrees on `version` (§6.1): the connection is past its handshake.
    /// [`Outcome::Done`]; `Welcome` follows.
    Accept { version: u16, agent: String },
    /// Register the disk in this session (§6.2): check that the agent may write it, create it
    /// or check its size and block size, bind it to `source` or check that it is bound to it,
    /// and hold it against other sessions. [`Outcome::Registered`] with what the server holds
    /// of it; `DiskState` follows.
    Register { disk: String, size: u64, block_size: u32, source: SourceId, reenroll: bool },
    /// Record that `point` still equals the disk as of `as_of_unix_ms` (§6.9).
    /// [`Outcome::Done`]; `CurrentAck` follows.
    RecordCurrent { disk: String, point: u64, as_of_unix_ms: u64 },
    /// Open a generation (§6.3): resume its checkpoint when the server holds one of it (§6.5),
    /// else begin it on `base_point`. [`Outcome::Opened`], or [`Outcome::HasPoint`] when the
    /// generation is a point already (§6.6).
    OpenGeneration { disk: String, generation: u64, kind: GenerationKind, base_point: Option<u64> },
    /// Which of these chunks the server has (§6.4). [`Outcome::Have`], one answer per hash.
    AnswerHave { hashes: Vec<Hash> },
    /// The hash of each `block`-sized piece of the point in `[offset, offset + len)` (§4.15).
    /// [`Outcome::Hashes`], [`hash_count`] of them.
    AnswerHashes { disk: String, point: u64, offset: u64, len: u64, block: u32 },
    /// Add a chunk to the open generation (verified first when it carries data, §4.6).
    /// [`Outcome::Done`] once it is taken: the driver may verify it and add it in the
    /// background, and report its failure at the next [`ServerAction::Settle`].
    StoreChunk { offset: u64, len: u32, hash: Hash, data: ChunkData },
    /// Add a zero extent to the open generation (§4.7), after every extent before it.
    /// [`Outcome::Done`], as [`ServerAction::StoreChunk`].
    StoreZero { offset: u64, len: u64 },
    /// Put every extent stored so far into the open generation, in the order they came,
    /// waiting for those still being verified. Asked before any frame but an extent is handled
    /// (the frame waits for it). [`Outcome::Done`], or the refusal of the first extent that
    /// failed.
    Settle,
    /// Nothing more has come from the agent for now ([`ServerSession::idle`]): put into the
    /// open generation the extents whose verification is done, in order, without waiting for
    /// the others, so that a refused extent's `Error` does not wait for the agent's next frame.
    /// [`Outcome::Done`], or the refusal of the first extent that failed.
    SettleReady,
    /// Make what the open generation received durable and record `next_offset` (§6.5).
    /// [`Outcome::Done`]; `ProgressAck` follows.
    Checkpoint { next_offset: u64 },
    /// Make the open generation a durable point (§6.6). [`Outcome::Committed`]; `Committed`
    /// follows.
    Commit { generation: u64, cut_unix_ms: u64, consistency: Consistency, digest: Option<Hash> },
    /// The open generation is a point already (§6.6): check that `digest` is that point's (else
    /// refuse it as divergence). [`Outcome::Committed`] with that point; `Committed` follows.
    ConfirmCommit { generation: u64, digest: Option<Hash> },
}

/// The result of a [`ServerAction`].
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done, nothing to report.
    Done,
    /// [`ServerAction::Register`]: what the server holds of the disk (§4.4).
    Registered { latest: Option<PointRef>, initial: Option<InitialSync>, resync: Option<String> },
    /// [`ServerAction::OpenGeneration`]: the generation is being received.
    Opened,
    /// [`ServerAction::OpenGeneration`]: the generation is a point already.
    HasPoint,
    /// [`ServerAction::AnswerHave`]: one answer per hash, in order.
    Have(Vec<bool>),
    /// [`ServerAction::AnswerHashes`]: one hash per piece, in order.
    Hashes(Vec<Hash>),
    /// [`ServerAction::Commit`], [`ServerAction::ConfirmCommit`]: the generation's point.
    Committed { point: u64 },
    /// The action failed: the session ends with this refusal.
    Refused(Refusal),
}

/// A refusal of a frame that breaks the session's order: `ERR_BAD_REQUEST`, fatal (§5, §6).
fn out_of_place(message: impl Into<String>) -> Refusal {
    Refusal::with_class(ErrorClass::Fatal, ERR_BAD_REQUEST, message)
}

impl ServerSession {
    /// A session that waits for the agent's `Hello`; `name` (the server's name and build) goes
    /// into `Welcome`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            phase: Phase::Hello,
            acting: None,
            disk: None,
            unsettled: false,
            held: None,
        }
    }

    /// The version agreed on, once `Hello` was accepted.
    pub fn version(&self) -> Option<u16> {
        match self.phase {
            Phase::Open { version, .. } => Some(version),
            _ => None,
        }
    }

    /// The disk registered in this session (after its end too, for the driver's logs).
    pub fn disk(&self) -> Option<&str> {
        self.disk.as_deref()
    }

    /// Whether the session has ended (a refusal was sent, or the agent's `Error` received).
    pub fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }

    /// Ends the session with `r`.
    fn refuse(&mut self, r: Refusal) -> ServerStep {
        self.phase = Phase::Over;
        ServerStep::Refuse(r)
    }

    fn act(&mut self, acting: Acting, action: ServerAction) -> ServerStep {
        self.acting = Some(acting);
        ServerStep::Act(action)
    }

    /// A frame from the agent.
    ///
    /// # Panics
    ///
    /// While an action is being performed (its result not yet given to
    /// [`ServerSession::complete`]), or after the session is over: the driver must not read on.
    pub fn receive(&mut self, frame: Frame) -> ServerStep {
        if let Some(a) = &self.acting {
            panic!("ServerSession::receive: the result of {a:?} was not reported");
        }
        let generation = match &mut self.phase {
            Phase::Over => panic!("ServerSession::receive: the session is over"),
            Phase::Hello => return self.hello(frame),
            Phase::Open { generation, .. } => generation,
        };
        let disk = &self.disk;
        // Every extent before this frame goes in before it is handled.
        if self.unsettled && !matches!(frame, Frame::Chunk { .. } | Frame::Zero { .. }) {
            self.unsettled = false;
            self.held = Some(frame);
            return self.act(Acting::Settle, ServerAction::Settle);
        }
        // A frame that names a disk names the one registered here.
        if let Frame::BeginGeneration { disk: d, .. } | Frame::HashQuery { disk: d, .. } = &frame {
            if disk.as_deref() != Some(d.as_str()) {
                return self.refuse(out_of_place(format!("disk {d} was not registered")));
            }
        }
        match frame {
            Frame::RegisterDisk { disk: d, size, block_size, source, reenroll } => self.act(
                Acting::Register { disk: d.clone() },
                ServerAction::Register { disk: d, size, block_size, source, reenroll },
            ),
            Frame::Current { point, as_of_unix_ms } => match disk {
                None => self.refuse(out_of_place("Current before RegisterDisk")),
                Some(d) => {
                    let disk = d.clone();
                    self.act(
                        Acting::RecordCurrent { point, as_of_unix_ms },
                        ServerAction::RecordCurrent { disk, point, as_of_unix_ms },
                    )
                }
            },
            Frame::BeginGeneration { disk, generation, kind, base_point } => self.act(
                Acting::Open { generation, kind },
                ServerAction::OpenGeneration { disk, generation, kind, base_point },
            ),
            Frame::HaveQuery { hashes } => {
                self.act(Acting::AnswerHave { count: hashes.len() }, ServerAction::AnswerHave { hashes })
            }
            Frame::HashQuery { disk, point, offset, len, block } => self.act(
                Acting::AnswerHashes { offset, block, count: hash_count(len, block) },
                ServerAction::AnswerHashes { disk, point, offset, len, block },
            ),
            Frame::Chunk { offset, len, hash, data } => match *generation {
                Generation::Receiving { .. } => {
                    self.act(Acting::Store, ServerAction::StoreChunk { offset, len, hash, data })
                }
                Generation::HasPoint { .. } => ServerStep::Read,
                Generation::None => self.refuse(out_of_place("Chunk outside a generation")),
            },
            Frame::Zero { offset, len } => match *generation {
                Generation::Receiving { .. } => {
                    self.act(Acting::Store, ServerAction::StoreZero { offset, len })
                }
                Generation::HasPoint { .. } => ServerStep::Read,
                Generation::None => self.refuse(out_of_place("Zero outside a generation")),
            },
            Frame::Progress { next_offset } => match *generation {
                Generation::Receiving { kind: GenerationKind::InitialFull, .. } => {
                    self.act(Acting::Checkpoint { next_offset }, ServerAction::Checkpoint { next_offset })
                }
                Generation::Receiving { kind, .. } => self.refuse(out_of_place(format!(
                    "Progress in a {kind:?} generation: only an InitialFull one has checkpoints"
                ))),
                Generation::HasPoint { .. } => ServerStep::Send(Frame::ProgressAck { next_offset }),
                Generation::None => self.refuse(out_of_place("Progress outside a generation")),
            },
            Frame::Commit { generation: g, cut_unix_ms, consistency, digest } => {
                // The generation closes here: it commits, or the session ends.
                let open = std::mem::replace(generation, Generation::None);
                match open {
                    Generation::Receiving { generation, .. } | Generation::HasPoint { generation }
                        if g != generation =>
                    {
                        self.refuse(out_of_place(format!(
                            "Commit of generation {g}, but generation {generation} is open"
                        )))
                    }
                    Generation::Receiving { generation, .. } => self.act(
                        Acting::Commit { generation },
                        ServerAction::Commit { generation, cut_unix_ms, consistency, digest },
                    ),
                    Generation::HasPoint { generation } => self.act(
                        Acting::Commit { generation },
                        ServerAction::ConfirmCommit { generation, digest },
                    ),
                    Generation::None => self.refuse(out_of_place("Commit outside a generation")),
                }
            }
            Frame::Error { class, code, message } => {
                self.phase = Phase::Over;
                ServerStep::Ended(Refusal { class, code, message })
            }
            other @ (Frame::Hello { .. }
            | Frame::Welcome { .. }
            | Frame::DiskState { .. }
            | Frame::HaveReply { .. }
            | Frame::Committed { .. }
            | Frame::ProgressAck { .. }
            | Frame::Hashes { .. }
            | Frame::CurrentAck { .. }) => {
                self.refuse(out_of_place(format!("unexpected {} frame", other.name())))
            }
        }
    }

    /// Nothing more has come from the agent for now: while extents stored in the open
    /// generation may still be in the background, [`ServerAction::SettleReady`]; else
    /// [`ServerStep::Read`].
    ///
    /// # Panics
    ///
    /// As [`ServerSession::receive`].
    pub fn idle(&mut self) -> ServerStep {
        if let Some(a) = &self.acting {
            panic!("ServerSession::idle: the result of {a:?} was not reported");
        }
        match self.phase {
            Phase::Over => panic!("ServerSession::idle: the session is over"),
            Phase::Open { generation: Generation::Receiving { .. }, .. } if self.unsettled => {
                self.act(Acting::SettleReady, ServerAction::SettleReady)
            }
            _ => ServerStep::Read,
        }
    }

    /// The first frame: `Hello`, and the version both sides speak (§6.1).
    fn hello(&mut self, frame: Frame) -> ServerStep {
        let Frame::Hello { min_version, max_version, agent } = frame else {
            return self.refuse(out_of_place(format!("expected Hello, got {}", frame.name())));
        };
        match negotiate(min_version, max_version, MIN_VERSION, VERSION) {
            None => self.refuse(Refusal::new(
                ERR_VERSION,
                format!("agent speaks versions {min_version}..={max_version}, this server {MIN_VERSION}..={VERSION}"),
            )),
            Some(version) => {
                self.phase = Phase::Open { version, generation: Generation::None };
                self.act(Acting::Accept { version }, ServerAction::Accept { version, agent })
            }
        }
    }

    /// The result of the action the last step asked for.
    ///
    /// # Panics
    ///
    /// When no action is being performed, or `outcome` is not one of the results that action
    /// has (see [`ServerAction`]): the driver mixed up its actions.
    pub fn complete(&mut self, outcome: Outcome) -> ServerStep {
        let Some(acting) = self.acting.take() else {
            panic!("ServerSession::complete({outcome:?}) without an action");
        };
        if let Outcome::Refused(r) = outcome {
            self.held = None;
            return self.refuse(r);
        }
        let Phase::Open { generation, .. } = &mut self.phase else {
            unreachable!("an action is asked for only in an open session")
        };
        match (acting, outcome) {
            (Acting::Accept { version }, Outcome::Done) => {
                ServerStep::Send(Frame::Welcome { version, server: self.name.clone() })
            }
            (Acting::Register { disk: d }, Outcome::Registered { latest, initial, resync }) => {
                // A later registration replaces the earlier one, and abandons its generation.
                self.disk = Some(d.clone());
                *generation = Generation::None;
                ServerStep::Send(Frame::DiskState { disk: d, latest, initial, resync })
            }
            (Acting::RecordCurrent { point, as_of_unix_ms }, Outcome::Done) => {
                ServerStep::Send(Frame::CurrentAck { point, as_of_unix_ms })
            }
            // Beginning a generation abandons the one open (§6.5).
            (Acting::Open { generation: g, kind }, Outcome::Opened) => {
                *generation = Generation::Receiving { generation: g, kind };
                ServerStep::Read
            }
            (Acting::Open { generation: g, .. }, Outcome::HasPoint) => {
                *generation = Generation::HasPoint { generation: g };
                ServerStep::Read
            }
            (Acting::AnswerHave { count }, Outcome::Have(have)) if have.len() == count => {
                ServerStep::Send(Frame::HaveReply { have })
            }
            (Acting::AnswerHashes { offset, block, count }, Outcome::Hashes(hashes))
                if hashes.len() as u64 == count =>
            {
                ServerStep::Send(Frame::Hashes { offset, block, hashes })
            }
            (Acting::Store, Outcome::Done) => {
                self.unsettled = true;
                ServerStep::Read
            }
            (Acting::Settle, Outcome::Done) => {
                let frame = self.held.take().expect("a frame waits for Settle");
                self.receive(frame)
            }
            (Acting::SettleReady, Outcome::Done) => ServerStep::Read,
            (Acting::Checkpoint { next_offset }, Outcome::Done) => {
                ServerStep::Send(Frame::ProgressAck { next_offset })
            }
            (Acting::Commit { generation }, Outcome::Committed { point }) => {
                ServerStep::Send(Frame::Committed { point, generation })
            }
            (acting, outcome) => panic!("ServerSession::complete: {outcome:?} is no result of {acting:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ERR_CORRUPT_CHUNK, ERR_DIVERGED, ERR_STORAGE};

    const DISK: &str = "d0";

    fn hello() -> Frame {
        Frame::Hello { min_version: MIN_VERSION, max_version: VERSION, agent: "test agent".into() }
    }

    fn register(disk: &str) -> Frame {
        Frame::RegisterDisk {
            disk: disk.into(),
            size: 1 << 30,
            block_size: 4096,
            source: [7; 16],
            reenroll: false,
        }
    }

    fn begin(generation: u64, kind: GenerationKind) -> Frame {
        Frame::BeginGeneration { disk: DISK.into(), generation, kind, base_point: Some(1) }
    }

    fn commit(generation: u64) -> Frame {
        Frame::Commit { generation, cut_unix_ms: 5, consistency: Consistency::Crash, digest: Some([3; 32]) }
    }

    fn chunk() -> Frame {
        Frame::Chunk { offset: 0, len: 4096, hash: [1; 32], data: ChunkData::Compressed(vec![0; 10]) }
    }

    /// A session past `Welcome`.
    fn welcomed() -> ServerSession {
        let mut s = ServerSession::new("srv");
        assert!(matches!(s.receive(hello()), ServerStep::Act(ServerAction::Accept { .. })));
        assert_eq!(
            s.complete(Outcome::Done),
            ServerStep::Send(Frame::Welcome { version: VERSION, server: "srv".into() })
        );
        s
    }

    /// A session with `DISK` registered.
    fn registered() -> ServerSession {
        let mut s = welcomed();
        assert!(matches!(s.receive(register(DISK)), ServerStep::Act(ServerAction::Register { .. })));
        let state = Outcome::Registered { latest: None, initial: None, resync: None };
        assert!(matches!(s.complete(state), ServerStep::Send(Frame::DiskState { .. })));
        s
    }

    /// A session with generation `g` of `kind` open (`Opened`) or a point already.
    fn open(g: u64, kind: GenerationKind, outcome: Outcome) -> ServerSession {
        let mut s = registered();
        assert!(matches!(s.receive(begin(g, kind)), ServerStep::Act(ServerAction::OpenGeneration { .. })));
        assert_eq!(s.complete(outcome), ServerStep::Read);
        s
    }

    /// Expects a fatal `ERR_BAD_REQUEST` refusal whose message contains `why`, and the end.
    fn refused(s: &mut ServerSession, step: ServerStep, why: &str) {
        match step {
            ServerStep::Refuse(r) => {
                assert_eq!((r.class, r.code), (ErrorClass::Fatal, ERR_BAD_REQUEST), "{r}");
                assert!(r.message.contains(why), "{r} does not say {why:?}");
            }
            other => panic!("expected a refusal ({why}), got {other:?}"),
        }
        assert!(s.is_over());
    }

    #[test]
    fn hello_agrees_on_a_version_and_welcome_follows_the_accept() {
        let mut s = ServerSession::new("srv");
        assert_eq!(s.version(), None);
        assert_eq!(
            s.receive(hello()),
            ServerStep::Act(ServerAction::Accept { version: VERSION, agent: "test agent".into() })
        );
        assert_eq!(s.version(), Some(VERSION));
        assert_eq!(
            s.complete(Outcome::Done),
            ServerStep::Send(Frame::Welcome { version: VERSION, server: "srv".into() })
        );
        assert!(!s.is_over());
    }

    #[test]
    fn hello_without_a_common_version_is_refused() {
        let mut s = ServerSession::new("srv");
        let step = s.receive(Frame::Hello { min_version: 99, max_version: 100, agent: String::new() });
        match step {
            ServerStep::Refuse(r) => {
                assert_eq!((r.class, r.code), (ErrorClass::Fatal, ERR_VERSION));
                assert!(
                    r.message.contains("99..=100")
                        && r.message.contains(&format!("{MIN_VERSION}..={VERSION}")),
                    "{r}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(s.is_over());
    }

    #[test]
    fn anything_but_hello_first_is_refused() {
        for first in [
            register(DISK),
            hello_reply(),
            Frame::Progress { next_offset: 0 },
            Frame::error(ERR_STORAGE, "x"),
        ] {
            let mut s = ServerSession::new("srv");
            let name = first.name();
            let step = s.receive(first);
            refused(&mut s, step, &format!("expected Hello, got {name}"));
        }
    }

    fn hello_reply() -> Frame {
        Frame::Welcome { version: VERSION, server: String::new() }
    }

    #[test]
    fn register_answers_disk_state_and_a_later_one_replaces_it() {
        let mut s = welcomed();
        assert_eq!(
            s.receive(register(DISK)),
            ServerStep::Act(ServerAction::Register {
                disk: DISK.into(),
                size: 1 << 30,
                block_size: 4096,
                source: [7; 16],
                reenroll: false
            })
        );
        let latest = Some(PointRef { point: 4, generation: 9, cut_unix_ms: 1 });
        let resync = Some("re-enrolled".to_string());
        assert_eq!(
            s.complete(Outcome::Registered { latest, initial: None, resync: resync.clone() }),
            ServerStep::Send(Frame::DiskState { disk: DISK.into(), latest, initial: None, resync })
        );
        assert_eq!(s.disk(), Some(DISK));
        // A generation is open; registering again (here another disk) abandons it.
        assert!(matches!(s.receive(begin(10, GenerationKind::Incremental)), ServerStep::Act(_)));
        assert_eq!(s.complete(Outcome::Opened), ServerStep::Read);
        assert!(matches!(s.receive(register("d1")), ServerStep::Act(ServerAction::Register { .. })));
        assert!(matches!(
            s.complete(Outcome::Registered { latest: None, initial: None, resync: None }),
            ServerStep::Send(Frame::DiskState { .. })
        ));
        assert_eq!(s.disk(), Some("d1"));
        let step = s.receive(chunk());
        refused(&mut s, step, "Chunk outside a generation");
    }

    #[test]
    fn frames_that_name_a_disk_need_it_registered() {
        let query =
            |disk: &str| Frame::HashQuery { disk: disk.into(), point: 1, offset: 0, len: 4096, block: 4096 };
        let mut s = welcomed();
        let step = s.receive(query(DISK));
        refused(&mut s, step, "disk d0 was not registered");
        let mut s = welcomed();
        let step = s.receive(begin(1, GenerationKind::InitialFull));
        refused(&mut s, step, "disk d0 was not registered");
        let mut s = welcomed();
        let step = s.receive(Frame::Current { point: 1, as_of_unix_ms: 2 });
        refused(&mut s, step, "Current before RegisterDisk");
        // Registered, but another disk.
        let mut s = registered();
        let step = s.receive(query("d1"));
        refused(&mut s, step, "disk d1 was not registered");
        let mut s = registered();
        let step = s.receive(Frame::BeginGeneration {
            disk: "d1".into(),
            generation: 1,
            kind: GenerationKind::InitialFull,
            base_point: None,
        });
        refused(&mut s, step, "disk d1 was not registered");
    }

    #[test]
    fn have_queries_are_answered_before_a_disk_is_registered() {
        let mut s = welcomed();
        assert_eq!(
            s.receive(Frame::HaveQuery { hashes: vec![[1; 32], [2; 32]] }),
            ServerStep::Act(ServerAction::AnswerHave { hashes: vec![[1; 32], [2; 32]] })
        );
        assert_eq!(
            s.complete(Outcome::Have(vec![true, false])),
            ServerStep::Send(Frame::HaveReply { have: vec![true, false] })
        );
    }

    #[test]
    fn hash_queries_are_answered_with_their_count() {
        let mut s = registered();
        let q =
            Frame::HashQuery { disk: DISK.into(), point: 1, offset: 8192, len: 3 * 4096 + 1, block: 4096 };
        assert_eq!(
            s.receive(q),
            ServerStep::Act(ServerAction::AnswerHashes {
                disk: DISK.into(),
                point: 1,
                offset: 8192,
                len: 3 * 4096 + 1,
                block: 4096
            })
        );
        assert_eq!(
            s.complete(Outcome::Hashes(vec![[0; 32]; 4])),
            ServerStep::Send(Frame::Hashes { offset: 8192, block: 4096, hashes: vec![[0; 32]; 4] })
        );
        // Inside a generation too.
        let mut s = open(2, GenerationKind::InitialFull, Outcome::Opened);
        let q = Frame::HashQuery { disk: DISK.into(), point: 1, offset: 0, len: 4096, block: 4096 };
        assert!(matches!(s.receive(q), ServerStep::Act(ServerAction::AnswerHashes { .. })));
    }

    #[test]
    #[should_panic(expected = "is no result of AnswerHashes")]
    fn a_hashes_outcome_of_another_count_is_a_driver_bug() {
        let mut s = registered();
        let q = Frame::HashQuery { disk: DISK.into(), point: 1, offset: 0, len: 8192, block: 4096 };
        let _ = s.receive(q);
        let _ = s.complete(Outcome::Hashes(vec![[0; 32]; 1]));
    }

    #[test]
    #[should_panic(expected = "was not reported")]
    fn a_frame_before_the_action_is_reported_is_a_driver_bug() {
        let mut s = registered();
        let _ = s.receive(Frame::HaveQuery { hashes: vec![] });
        let _ = s.receive(Frame::HaveQuery { hashes: vec![] });
    }

    #[test]
    fn a_generation_stores_its_extents_and_commits() {
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        let ServerStep::Act(ServerAction::StoreChunk { offset: 0, len: 4096, hash, data }) =
            s.receive(chunk())
        else {
            panic!()
        };
        assert_eq!((hash, data), ([1; 32], ChunkData::Compressed(vec![0; 10])));
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        assert_eq!(
            s.receive(Frame::Zero { offset: 4096, len: 8192 }),
            ServerStep::Act(ServerAction::StoreZero { offset: 4096, len: 8192 })
        );
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        // The checkpoint waits for the extents before it.
        assert_eq!(
            s.receive(Frame::Progress { next_offset: 1 << 20 }),
            ServerStep::Act(ServerAction::Settle)
        );
        assert_eq!(
            s.complete(Outcome::Done),
            ServerStep::Act(ServerAction::Checkpoint { next_offset: 1 << 20 })
        );
        assert_eq!(s.complete(Outcome::Done), ServerStep::Send(Frame::ProgressAck { next_offset: 1 << 20 }));
        assert_eq!(
            s.receive(commit(3)),
            ServerStep::Act(ServerAction::Commit {
                generation: 3,
                cut_unix_ms: 5,
                consistency: Consistency::Crash,
                digest: Some([3; 32])
            })
        );
        assert_eq!(
            s.complete(Outcome::Committed { point: 8 }),
            ServerStep::Send(Frame::Committed { point: 8, generation: 3 })
        );
        // Committed: the generation is closed.
        let step = s.receive(Frame::Zero { offset: 0, len: 1 });
        refused(&mut s, step, "Zero outside a generation");
    }

    #[test]
    fn extents_go_in_before_any_other_frame_is_handled() {
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        // Extents in a row need nothing more.
        assert!(matches!(s.receive(chunk()), ServerStep::Act(ServerAction::StoreChunk { .. })));
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        assert!(matches!(s.receive(Frame::Zero { offset: 0, len: 1 }), ServerStep::Act(_)));
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        // Any other frame waits for them, then is handled as it would be.
        let have = Frame::HaveQuery { hashes: vec![[1; 32]] };
        assert_eq!(s.receive(have), ServerStep::Act(ServerAction::Settle));
        assert_eq!(
            s.complete(Outcome::Done),
            ServerStep::Act(ServerAction::AnswerHave { hashes: vec![[1; 32]] })
        );
        assert_eq!(
            s.complete(Outcome::Have(vec![true])),
            ServerStep::Send(Frame::HaveReply { have: vec![true] })
        );
        // Settled: the next one is handled at once.
        let q = Frame::HashQuery { disk: DISK.into(), point: 1, offset: 0, len: 4096, block: 4096 };
        assert!(matches!(s.receive(q), ServerStep::Act(ServerAction::AnswerHashes { .. })));
        assert!(matches!(s.complete(Outcome::Hashes(vec![[0; 32]])), ServerStep::Send(_)));
        // The commit of a generation, a registration, the agent's error, and a frame out of
        // place all wait for the extents before them.
        for (frame, then) in [
            (commit(3), "Commit"),
            (register(DISK), "Register"),
            (Frame::error(ERR_STORAGE, "x"), "Ended"),
            (hello_reply(), "Refuse"),
            (Frame::Progress { next_offset: 0 }, "Checkpoint"),
        ] {
            let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
            let _ = s.receive(chunk());
            assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
            assert_eq!(s.receive(frame), ServerStep::Act(ServerAction::Settle), "{then}");
            let step = s.complete(Outcome::Done);
            let got = match &step {
                ServerStep::Act(ServerAction::Commit { .. }) => "Commit",
                ServerStep::Act(ServerAction::Register { .. }) => "Register",
                ServerStep::Act(ServerAction::Checkpoint { .. }) => "Checkpoint",
                ServerStep::Ended(_) => "Ended",
                ServerStep::Refuse(_) => "Refuse",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, then);
        }
    }

    #[test]
    fn an_extent_refused_when_settling_ends_the_session_before_the_frame_that_waited() {
        let mut s = open(3, GenerationKind::Incremental, Outcome::Opened);
        let _ = s.receive(chunk());
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        assert_eq!(s.receive(commit(3)), ServerStep::Act(ServerAction::Settle));
        let bad = Refusal::new(ERR_CORRUPT_CHUNK, "bad chunk at 0");
        assert_eq!(s.complete(Outcome::Refused(bad.clone())), ServerStep::Refuse(bad));
        assert!(s.is_over());
    }

    #[test]
    fn idle_settles_what_is_ready_while_extents_wait() {
        // Nothing stored: nothing to do.
        let mut s = registered();
        assert_eq!(s.idle(), ServerStep::Read);
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        assert_eq!(s.idle(), ServerStep::Read);
        let _ = s.receive(chunk());
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        assert_eq!(s.idle(), ServerStep::Act(ServerAction::SettleReady));
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        // Some may still be verified: the next frame but an extent still waits for them all.
        assert_eq!(s.idle(), ServerStep::Act(ServerAction::SettleReady));
        assert_eq!(s.complete(Outcome::Done), ServerStep::Read);
        assert_eq!(s.receive(commit(3)), ServerStep::Act(ServerAction::Settle));
        assert!(matches!(s.complete(Outcome::Done), ServerStep::Act(ServerAction::Commit { .. })));
        assert!(matches!(s.complete(Outcome::Committed { point: 4 }), ServerStep::Send(_)));
        assert_eq!(s.idle(), ServerStep::Read);
        // A refusal found while idle ends the session.
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        let _ = s.receive(chunk());
        let _ = s.complete(Outcome::Done);
        assert_eq!(s.idle(), ServerStep::Act(ServerAction::SettleReady));
        let bad = Refusal::new(ERR_CORRUPT_CHUNK, "bad chunk");
        assert_eq!(s.complete(Outcome::Refused(bad.clone())), ServerStep::Refuse(bad));
        assert!(s.is_over());
        // A generation that is a point already stores nothing.
        let mut s = open(3, GenerationKind::InitialFull, Outcome::HasPoint);
        assert_eq!(s.receive(chunk()), ServerStep::Read);
        assert_eq!(s.idle(), ServerStep::Read);
    }

    #[test]
    fn extents_checkpoints_and_commits_outside_a_generation_are_refused() {
        for (frame, why) in [
            (chunk(), "Chunk outside a generation"),
            (Frame::Zero { offset: 0, len: 1 }, "Zero outside a generation"),
            (Frame::Progress { next_offset: 0 }, "Progress outside a generation"),
            (commit(1), "Commit outside a generation"),
        ] {
            let mut s = registered();
            let step = s.receive(frame);
            refused(&mut s, step, why);
        }
    }

    #[test]
    fn a_commit_names_the_generation_open() {
        let mut s = open(3, GenerationKind::Incremental, Outcome::Opened);
        let step = s.receive(commit(4));
        refused(&mut s, step, "Commit of generation 4, but generation 3 is open");
        let mut s = open(3, GenerationKind::Incremental, Outcome::HasPoint);
        let step = s.receive(commit(2));
        refused(&mut s, step, "Commit of generation 2, but generation 3 is open");
    }

    #[test]
    fn only_an_initial_full_generation_has_checkpoints() {
        for kind in [GenerationKind::Incremental, GenerationKind::Resync] {
            let mut s = open(3, kind, Outcome::Opened);
            let step = s.receive(Frame::Progress { next_offset: 0 });
            refused(&mut s, step, "only an InitialFull one has checkpoints");
        }
    }

    #[test]
    fn a_generation_sent_again_is_dropped_and_its_commit_confirmed() {
        let mut s = open(3, GenerationKind::Incremental, Outcome::HasPoint);
        assert_eq!(s.receive(chunk()), ServerStep::Read);
        assert_eq!(s.receive(Frame::Zero { offset: 0, len: 1 }), ServerStep::Read);
        assert_eq!(
            s.receive(Frame::Progress { next_offset: 9 }),
            ServerStep::Send(Frame::ProgressAck { next_offset: 9 })
        );
        assert_eq!(
            s.receive(commit(3)),
            ServerStep::Act(ServerAction::ConfirmCommit { generation: 3, digest: Some([3; 32]) })
        );
        assert_eq!(
            s.complete(Outcome::Committed { point: 2 }),
            ServerStep::Send(Frame::Committed { point: 2, generation: 3 })
        );
        // Another digest: the driver refuses it as divergence, and the session is over.
        let mut s = open(3, GenerationKind::Incremental, Outcome::HasPoint);
        let _ = s.receive(commit(3));
        let r = Refusal::new(ERR_DIVERGED, "two machines");
        assert_eq!(s.complete(Outcome::Refused(r.clone())), ServerStep::Refuse(r));
        assert!(s.is_over());
    }

    #[test]
    fn beginning_another_generation_abandons_the_open_one() {
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        assert!(matches!(s.receive(begin(4, GenerationKind::InitialFull)), ServerStep::Act(_)));
        assert_eq!(s.complete(Outcome::HasPoint), ServerStep::Read);
        assert_eq!(s.receive(chunk()), ServerStep::Read, "generation 4 has a point: dropped");
        let step = s.receive(commit(3));
        refused(&mut s, step, "Commit of generation 3, but generation 4 is open");
    }

    #[test]
    fn current_is_recorded_and_acknowledged() {
        let mut s = registered();
        assert_eq!(
            s.receive(Frame::Current { point: 4, as_of_unix_ms: 77 }),
            ServerStep::Act(ServerAction::RecordCurrent { disk: DISK.into(), point: 4, as_of_unix_ms: 77 })
        );
        assert_eq!(
            s.complete(Outcome::Done),
            ServerStep::Send(Frame::CurrentAck { point: 4, as_of_unix_ms: 77 })
        );
    }

    #[test]
    fn frames_only_the_server_sends_are_refused() {
        for frame in [
            hello(),
            hello_reply(),
            Frame::DiskState { disk: DISK.into(), latest: None, initial: None, resync: None },
            Frame::HaveReply { have: vec![true] },
            Frame::Committed { point: 1, generation: 1 },
            Frame::ProgressAck { next_offset: 0 },
            Frame::Hashes { offset: 0, block: 4096, hashes: vec![] },
            Frame::CurrentAck { point: 1, as_of_unix_ms: 1 },
        ] {
            let mut s = registered();
            let why = format!("unexpected {} frame", frame.name());
            let step = s.receive(frame);
            refused(&mut s, step, &why);
        }
    }

    #[test]
    fn the_agents_error_ends_the_session() {
        let mut s = open(3, GenerationKind::Incremental, Outcome::Opened);
        assert_eq!(
            s.receive(Frame::error(ERR_DIVERGED, "a clone")),
            ServerStep::Ended(Refusal::new(ERR_DIVERGED, "a clone"))
        );
        assert!(s.is_over());
        assert_eq!(s.disk(), Some(DISK), "the disk it had, for the driver's logs");
    }

    #[test]
    fn any_action_may_be_refused_and_that_ends_the_session() {
        let retryable = Refusal::new(ERR_CORRUPT_CHUNK, "bad chunk");
        let mut s = open(3, GenerationKind::InitialFull, Outcome::Opened);
        let _ = s.receive(chunk());
        assert_eq!(s.complete(Outcome::Refused(retryable.clone())), ServerStep::Refuse(retryable));
        assert!(s.is_over());
        let mut s = welcomed();
        let _ = s.receive(register(DISK));
        let busy = Refusal::new(crate::ERR_BUSY, "in another session");
        assert_eq!(s.complete(Outcome::Refused(busy.clone())), ServerStep::Refuse(busy));
        assert_eq!(s.disk(), None);
    }

    #[test]
    #[should_panic(expected = "the session is over")]
    fn reading_on_after_the_end_is_a_driver_bug() {
        let mut s = registered();
        let _ = s.receive(Frame::error(ERR_STORAGE, "x"));
        let _ = s.receive(chunk());
    }
}
