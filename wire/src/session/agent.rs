//! The agent's side of a session (`docs/wire.md` §6).

use std::collections::VecDeque;

use super::Refusal;
use crate::{hash_count, Frame, GenerationKind, Hash, InitialSync, PointRef};

/// The agent's side of one connection's session: every frame the agent sends goes through
/// [`AgentSession::send`] first, which refuses one out of place and notes the answer it calls
/// for; every frame from the server goes through [`AgentSession::receive`], which checks it is
/// the answer due next (the server answers in the order asked, §6) and returns it typed.
///
/// It also keeps what the session knows of the disk's latest point (from `DiskState`, then
/// every `Committed`), and [`DiskState`] decides from the server's word what a session starts
/// with.
#[derive(Debug, Default)]
pub struct AgentSession {
    phase: Phase,
    /// The disk registered in this session (§6.2).
    disk: Option<String>,
    /// The generation begun last, until its `Commit`.
    open: Option<(u64, GenerationKind)>,
    /// The answers due, in the order they will come.
    due: VecDeque<Due>,
    /// The disk's latest point as far as this session knows.
    latest: Option<PointRef>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet: `Hello` comes first.
    #[default]
    New,
    /// `Hello` sent with this version range; nothing more until `Welcome`.
    Hello { min: u16, max: u16 },
    /// After `Welcome`.
    Open { version: u16 },
    /// An `Error` was sent or received, or the server broke the session's order.
    Over,
}

/// An answer the server owes, and what it must say.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Due {
    Welcome,
    DiskState { disk: String },
    HaveReply { count: usize },
    Hashes { offset: u64, block: u32, count: u64 },
    ProgressAck { next_offset: u64 },
    Committed { generation: u64, cut_unix_ms: u64 },
    CurrentAck { point: u64, as_of_unix_ms: u64 },
}

impl std::fmt::Display for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Due::Welcome => write!(f, "Welcome"),
            Due::DiskState { disk } => write!(f, "DiskState of {disk}"),
            Due::HaveReply { count } => write!(f, "HaveReply of {count}"),
            Due::Hashes { offset, block, count } => write!(f, "Hashes for {offset}+{count}×{block}"),
            Due::ProgressAck { next_offset } => write!(f, "ProgressAck of {next_offset}"),
            Due::Committed { generation, .. } => write!(f, "Committed of generation {generation}"),
            Due::CurrentAck { point, as_of_unix_ms } => {
                write!(f, "CurrentAck of point {point} as of {as_of_unix_ms}")
            }
        }
    }
}

/// A frame described as [`Due`] describes what was due, so the two compare in a message.
fn describe(f: &Frame) -> String {
    match f {
        Frame::DiskState { disk, .. } => format!("DiskState of {disk}"),
        Frame::HaveReply { have } => format!("HaveReply of {}", have.len()),
        Frame::Hashes { offset, block, hashes } => format!("Hashes for {offset}+{}×{block}", hashes.len()),
        Frame::ProgressAck { next_offset } => format!("ProgressAck of {next_offset}"),
        Frame::Committed { generation, .. } => format!("Committed of generation {generation}"),
        Frame::CurrentAck { point, as_of_unix_ms } => {
            format!("CurrentAck of point {point} as of {as_of_unix_ms}")
        }
        f => f.name().to_string(),
    }
}

/// A server's answer, checked against what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `Hello` was accepted at `version` (§6.1).
    Welcome { version: u16, server: String },
    /// What the server holds of the disk registered (§4.4).
    DiskState(DiskState),
    /// One answer per hash of the `HaveQuery` (§4.9).
    HaveReply { have: Vec<bool> },
    /// One hash per piece of the `HashQuery` (§4.16).
    Hashes { offset: u64, block: u32, hashes: Vec<Hash> },
    /// The `Progress` is durable (§6.5).
    ProgressAck { next_offset: u64 },
    /// The generation is the durable point `point` (§6.6).
    Committed { point: u64, generation: u64 },
    /// The `Current` is recorded (§6.9).
    CurrentAck { point: u64, as_of_unix_ms: u64 },
}

impl Reply {
    /// The name of the frame it came in.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Welcome { .. } => "Welcome",
            Reply::DiskState(_) => "DiskState",
            Reply::HaveReply { .. } => "HaveReply",
            Reply::Hashes { .. } => "Hashes",
            Reply::ProgressAck { .. } => "ProgressAck",
            Reply::Committed { .. } => "Committed",
            Reply::CurrentAck { .. } => "CurrentAck",
        }
    }
}

/// What the server holds of a registered disk (`DiskState`, §4.4), and what the session does
/// with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// The latest durable point; `None` before the first: the session copies the disk whole.
    pub latest: Option<PointRef>,
    /// A copy in progress the server holds a checkpoint of (§6.5).
    pub initial: Option<InitialSync>,
    /// Why the next generation must be a resync, when the server requires one (§6.2, §6.8).
    pub resync: Option<String>,
}

impl DiskState {
    /// The initial copy to resume, when there is no point yet and the server holds a
    /// checkpoint of one (§6.5): its generation and the offset below which it is durable.
    pub fn initial_copy(&self) -> Option<InitialSync> {
        self.initial.filter(|_| self.latest.is_none())
    }

    /// A resync the server holds a checkpoint of (§6.8 step 4): a copy in progress above the
    /// `latest` point. One below it was abandoned before that point and is not resumed.
    pub fn interrupted_resync(initial: Option<InitialSync>, latest: &PointRef) -> Option<InitialSync> {
        initial.filter(|i| i.generation > latest.generation)
    }

    /// The interrupted resync the agent may continue (§6.8 step 4): only if the shim that cut
    /// its generation still tracks every write since, i.e. its `next_generation` is above it (a
    /// shim that started over numbers from 1 again). Otherwise the resync starts over.
    pub fn resumable_resync(
        initial: Option<InitialSync>,
        latest: &PointRef,
        next_generation: u64,
    ) -> Option<InitialSync> {
        Self::interrupted_resync(initial, latest).filter(|i| next_generation > i.generation)
    }

    /// One source per identity (§6.6): a shim whose tracking is intact numbers its generations
    /// on from the ones it committed, so a latest point whose generation is not below the
    /// shim's `next_generation` was made by another machine under this identity. `Err` is the
    /// refusal the agent sends before it stops (`ERR_DIVERGED`, fatal), with `message`.
    ///
    /// When tracking was lost (the shim or the server requires a resync) generation ids prove
    /// nothing, and the resync brings the point level with the disk instead.
    pub fn check_lineage(
        latest: &PointRef,
        next_generation: u64,
        tracking_intact: bool,
        message: impl FnOnce() -> String,
    ) -> Result<(), Refusal> {
        if tracking_intact && next_generation <= latest.generation {
            return Err(Refusal::new(crate::ERR_DIVERGED, message()));
        }
        Ok(())
    }
}

/// What went wrong in a session, seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The server ended the session with an `Error` (§5).
    #[error("the server refused (code {}): {}", .0.code, .0.message)]
    Refused(Refusal),
    /// The server's `Welcome` names a version outside the agent's `Hello` (§6.1).
    #[error("the server chose version {version}, outside {min}..={max}")]
    Version { version: u16, min: u16, max: u16 },
    /// The server sent a frame other than the answer due.
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: String, got: String },
    /// The agent was about to send a frame out of place (a bug on this side); it was not sent.
    #[error("{frame} out of place: {why}")]
    OutOfOrder { frame: &'static str, why: String },
}

impl SessionError {
    /// Whether a new session may succeed (§5): not after a fatal refusal or a version the two
    /// sides do not share. A server that broke the order is met again in a new session.
    pub fn is_retryable(&self) -> bool {
        match self {
            SessionError::Refused(r) => r.is_retryable(),
            SessionError::Version { .. } => false,
            SessionError::Unexpected { .. } | SessionError::OutOfOrder { .. } => true,
        }
    }
}

impl AgentSession {
    /// A session before its `Hello`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version agreed on, once `Welcome` arrived.
    pub fn version(&self) -> Option<u16> {
        match self.phase {
            Phase::Open { version } => Some(version),
            _ => None,
        }
    }

    /// The disk's latest point as this session knows it: `DiskState`'s, then the newest
    /// generation committed since.
    pub fn latest(&self) -> Option<PointRef> {
        self.latest
    }

    /// Whether the session has ended.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// Answers due, not yet received.
    pub fn answers_due(&self) -> usize {
        self.due.len()
    }

    /// Checks a frame the agent is about to send against the session's order, and notes the
    /// answer it calls for. `Err`: the frame must not be sent (it is a bug on this side).
    pub fn send(&mut self, frame: &Frame) -> Result<(), SessionError> {
        let out_of_place =
            |why: &str| Err(SessionError::OutOfOrder { frame: frame.name(), why: why.to_string() });
        if let Frame::Error { .. } = frame {
            // Either side may end the session at any point (§6.7).
            self.phase = Phase::Over;
            return Ok(());
        }
        match self.phase {
            Phase::Over => return out_of_place("the session is over"),
            Phase::New => {
                let Frame::Hello { min_version, max_version, .. } = frame else {
                    return out_of_place("Hello comes first");
                };
                self.phase = Phase::Hello { min: *min_version, max: *max_version };
                self.due.push_back(Due::Welcome);
                return Ok(());
            }
            Phase::Hello { .. } => return out_of_place("nothing follows Hello before Welcome"),
            Phase::Open { .. } => {}
        }
        match frame {
            Frame::RegisterDisk { disk, .. } => {
                // A later registration replaces the earlier one, and abandons its generation.
                self.disk = Some(disk.clone());
                self.open = None;
                self.due.push_back(Due::DiskState { disk: disk.clone() });
            }
            Frame::BeginGeneration { disk, generation, kind, base_point } => {
                if self.disk.as_deref() != Some(disk.as_str()) {
                    return out_of_place("its disk is not the one registered");
                }
                if *kind == GenerationKind::Incremental && *base_point != self.latest.map(|l| l.point) {
                    return out_of_place("an Incremental applies on the latest point (§6.3)");
                }
                // Beginning a generation abandons the one open (§6.5).
                self.open = Some((*generation, *kind));
            }
            Frame::Chunk { .. } | Frame::Zero { .. } => {
                if self.open.is_none() {
                    return out_of_place("no generation is open");
                }
            }
            Frame::HaveQuery { hashes } => self.due.push_back(Due::HaveReply { count: hashes.len() }),
            Frame::HashQuery { disk, offset, len, block, .. } => {
                if self.disk.as_deref() != Some(disk.as_str()) {
                    return out_of_place("its disk is not the one registered");
                }
                self.due.push_back(Due::Hashes {
                    offset: *offset,
                    block: *block,
                    count: hash_count(*len, *block),
                });
            }
            Frame::Progress { next_offset } => {
                match self.open {
                    Some((_, GenerationKind::InitialFull)) => {}
                    Some(_) => return out_of_place("only an InitialFull generation has checkpoints (§6.5)"),
                    None => return out_of_place("no generation is open"),
                }
                self.due.push_back(Due::ProgressAck { next_offset: *next_offset });
            }
            Frame::Commit { generation, cut_unix_ms, digest, .. } => {
                match self.open {
                    Some((g, _)) if g != *generation => {
                        return out_of_place("it names another generation than the one open")
                    }
                    Some((_, GenerationKind::Incremental)) if digest.is_none() => {
                        return out_of_place("an Incremental's commit carries its digest (§6.6)")
                    }
                    Some(_) => {}
                    None => return out_of_place("no generation is open"),
                }
                self.open = None;
                self.due.push_back(Due::Committed { generation: *generation, cut_unix_ms: *cut_unix_ms });
            }
            Frame::Current { point, as_of_unix_ms } => {
                if self.disk.is_none() {
                    return out_of_place("no disk is registered");
                }
                if self.open.is_some() {
                    return out_of_place(
                        "a generation is open: Current is only sent between generations (§6.9)",
                    );
                }
                if self.latest.map(|l| l.point) != Some(*point) {
                    return out_of_place("it names another point than the latest");
                }
                self.due.push_back(Due::CurrentAck { point: *point, as_of_unix_ms: *as_of_unix_ms });
            }
            Frame::Hello { .. } => return out_of_place("Hello was sent already"),
            Frame::Welcome { .. }
            | Frame::DiskState { .. }
            | Frame::HaveReply { .. }
            | Frame::Committed { .. }
            | Frame::ProgressAck { .. }
            | Frame::Hashes { .. }
            | Frame::CurrentAck { .. } => return out_of_place("only the server sends it"),
            Frame::Error { .. } => unreachable!("handled above"),
        }
        Ok(())
    }

    /// A frame from the server: the answer due next, or its `Error`. Anything else ends the
    /// session.
    pub fn receive(&mut self, frame: Frame) -> Result<Reply, SessionError> {
        if let Frame::Error { class, code, message } = frame {
            self.phase = Phase::Over;
            return Err(SessionError::Refused(Refusal { class, code, message }));
        }
        let due = match (self.phase, self.due.pop_front()) {
            (Phase::Over, _) => None,
            (_, due) => due,
        };
        match (due, frame) {
            (Some(Due::Welcome), Frame::Welcome { version, server }) => {
                let Phase::Hello { min, max } = self.phase else {
                    unreachable!("Welcome is due after Hello")
                };
                if !(min..=max).contains(&version) {
                    self.phase = Phase::Over;
                    return Err(SessionError::Version { version, min, max });
                }
                self.phase = Phase::Open { version };
                Ok(Reply::Welcome { version, server })
            }
            (Some(Due::DiskState { disk }), Frame::DiskState { disk: d, latest, initial, resync })
                if d == disk =>
            {
                self.latest = latest;
                Ok(Reply::DiskState(DiskState { latest, initial, resync }))
            }
            (Some(Due::HaveReply { count }), Frame::HaveReply { have }) if have.len() == count => {
                Ok(Reply::HaveReply { have })
            }
            (Some(Due::Hashes { offset, block, count }), Frame::Hashes { offset: o, block: b, hashes })
                if (o, b, hashes.len() as u64) == (offset, block, count) =>
            {
                Ok(Reply::Hashes { offset, block, hashes })
            }
            (Some(Due::ProgressAck { next_offset }), Frame::ProgressAck { next_offset: n })
                if n == next_offset =>
            {
                Ok(Reply::ProgressAck { next_offset })
            }
            (Some(Due::Committed { generation, cut_unix_ms }), Frame::Committed { point, generation: g })
                if g == generation =>
            {
                if self.latest.is_none_or(|l| generation > l.generation) {
                    self.latest = Some(PointRef { point, generation, cut_unix_ms });
                }
                Ok(Reply::Committed { point, generation })
            }
            (
                Some(Due::CurrentAck { point, as_of_unix_ms }),
                Frame::CurrentAck { point: p, as_of_unix_ms: t },
            ) if (p, t) == (point, as_of_unix_ms) => Ok(Reply::CurrentAck { point, as_of_unix_ms }),
            (due, frame) => {
                self.phase = Phase::Over;
                let expected = due.map_or_else(|| "no answer".to_string(), |d| d.to_string());
                Err(SessionError::Unexpected { expected, got: describe(&frame) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ChunkData, Consistency, ErrorClass, ERR_BUSY, ERR_DIVERGED, ERR_OTHER_SOURCE, ERR_RESYNC_REQUIRED,
        MIN_VERSION, VERSION,
    };

    const DISK: &str = "d0";
    const LATEST: PointRef = PointRef { point: 4, generation: 9, cut_unix_ms: 100 };

    fn hello() -> Frame {
        Frame::Hello { min_version: MIN_VERSION, max_version: VERSION, agent: "a".into() }
    }

    fn welcome() -> Frame {
        Frame::Welcome { version: VERSION, server: "s".into() }
    }

    fn register() -> Frame {
        Frame::RegisterDisk {
            disk: DISK.into(),
            size: 1 << 30,
            block_size: 4096,
            source: [1; 16],
            reenroll: false,
        }
    }

    fn disk_state(latest: Option<PointRef>) -> Frame {
        Frame::DiskState { disk: DISK.into(), latest, initial: None, resync: None }
    }

    fn begin(generation: u64, kind: GenerationKind, base_point: Option<u64>) -> Frame {
        Frame::BeginGeneration { disk: DISK.into(), generation, kind, base_point }
    }

    fn commit(generation: u64, digest: Option<Hash>) -> Frame {
        Frame::Commit { generation, cut_unix_ms: 200, consistency: Consistency::Crash, digest }
    }

    fn zero() -> Frame {
        Frame::Zero { offset: 0, len: 4096 }
    }

    /// A session with `DISK` registered and `latest` its latest point.
    fn registered(latest: Option<PointRef>) -> AgentSession {
        let mut s = AgentSession::new();
        s.send(&hello()).unwrap();
        assert_eq!(s.receive(welcome()), Ok(Reply::Welcome { version: VERSION, server: "s".into() }));
        s.send(&register()).unwrap();
        let state = s.receive(disk_state(latest)).unwrap();
        assert_eq!(state, Reply::DiskState(DiskState { latest, initial: None, resync: None }));
        s
    }

    fn out_of_order(s: &mut AgentSession, f: &Frame, why: &str) {
        match s.send(f) {
            Err(e @ SessionError::OutOfOrder { .. }) => {
                assert!(e.to_string().contains(why), "{e} does not say {why:?}");
                assert!(e.is_retryable());
            }
            other => panic!("{} was let through ({other:?}), not refused for {why:?}", f.name()),
        }
    }

    #[test]
    fn hello_first_then_nothing_until_welcome() {
        let mut s = AgentSession::new();
        out_of_order(&mut s, &register(), "Hello comes first");
        s.send(&hello()).unwrap();
        out_of_order(&mut s, &register(), "nothing follows Hello before Welcome");
        assert_eq!(s.version(), None);
        s.receive(welcome()).unwrap();
        assert_eq!(s.version(), Some(VERSION));
        out_of_order(&mut s, &hello(), "Hello was sent already");
    }

    #[test]
    fn a_welcome_outside_the_hello_range_is_a_version_error() {
        let mut s = AgentSession::new();
        s.send(&Frame::Hello { min_version: 2, max_version: 3, agent: String::new() }).unwrap();
        let e = s.receive(Frame::Welcome { version: 4, server: String::new() }).unwrap_err();
        assert_eq!(e, SessionError::Version { version: 4, min: 2, max: 3 });
        assert!(!e.is_retryable());
        assert!(s.is_over());
    }

    #[test]
    fn the_server_answers_in_the_order_asked() {
        let mut s = registered(Some(LATEST));
        s.send(&begin(10, GenerationKind::InitialFull, Some(4))).unwrap();
        // Pipelined: two hash queries, a have query, a checkpoint.
        let q = |offset, len, block| Frame::HashQuery { disk: DISK.into(), point: 4, offset, len, block };
        s.send(&q(0, 64 << 20, 64 << 10)).unwrap();
        s.send(&q(64 << 20, 8192 + 1, 4096)).unwrap();
        s.send(&Frame::HaveQuery { hashes: vec![[1; 32]; 3] }).unwrap();
        s.send(&Frame::Chunk { offset: 0, len: 1, hash: [1; 32], data: ChunkData::Known }).unwrap();
        s.send(&Frame::Progress { next_offset: 1 << 20 }).unwrap();
        assert_eq!(s.answers_due(), 4);
        let hashes = |offset, block, n| Frame::Hashes { offset, block, hashes: vec![[0; 32]; n] };
        assert!(matches!(s.receive(hashes(0, 64 << 10, 1024)), Ok(Reply::Hashes { offset: 0, .. })));
        assert!(matches!(s.receive(hashes(64 << 20, 4096, 3)), Ok(Reply::Hashes { block: 4096, .. })));
        assert_eq!(
            s.receive(Frame::HaveReply { have: vec![true, false, true] }),
            Ok(Reply::HaveReply { have: vec![true, false, true] })
        );
        assert_eq!(
            s.receive(Frame::ProgressAck { next_offset: 1 << 20 }),
            Ok(Reply::ProgressAck { next_offset: 1 << 20 })
        );
        assert_eq!(s.answers_due(), 0);
    }

    #[test]
    fn an_answer_other_than_the_one_due_ends_the_session() {
        let cases: Vec<(Frame, Frame, &str)> = vec![
            (
                Frame::HaveQuery { hashes: vec![[1; 32]; 2] },
                Frame::HaveReply { have: vec![true] },
                "expected HaveReply of 2, got HaveReply of 1",
            ),
            (
                Frame::HashQuery { disk: DISK.into(), point: 4, offset: 0, len: 8192, block: 4096 },
                Frame::Hashes { offset: 4096, block: 4096, hashes: vec![[0; 32]; 2] },
                "expected Hashes for 0+2×4096, got Hashes for 4096+2×4096",
            ),
            (
                Frame::HashQuery { disk: DISK.into(), point: 4, offset: 0, len: 8192, block: 4096 },
                Frame::HaveReply { have: vec![] },
                "expected Hashes for 0+2×4096, got HaveReply of 0",
            ),
            (
                Frame::Current { point: 4, as_of_unix_ms: 7 },
                Frame::CurrentAck { point: 4, as_of_unix_ms: 8 },
                "expected CurrentAck of point 4 as of 7, got CurrentAck of point 4 as of 8",
            ),
        ];
        for (ask, answer, why) in cases {
            let mut s = registered(Some(LATEST));
            s.send(&ask).unwrap();
            let e = s.receive(answer).unwrap_err();
            assert_eq!(e.to_string(), why);
            assert!(e.is_retryable());
            assert!(s.is_over());
        }
        // Nothing asked: nothing is due.
        let mut s = registered(Some(LATEST));
        let e = s.receive(Frame::ProgressAck { next_offset: 0 }).unwrap_err();
        assert_eq!(e.to_string(), "expected no answer, got ProgressAck of 0");
        // A DiskState of another disk.
        let mut s = AgentSession::new();
        s.send(&hello()).unwrap();
        s.receive(welcome()).unwrap();
        s.send(&register()).unwrap();
        let other = Frame::DiskState { disk: "d1".into(), latest: None, initial: None, resync: None };
        assert_eq!(
            s.receive(other).unwrap_err().to_string(),
            "expected DiskState of d0, got DiskState of d1"
        );
        // A Committed of another generation.
        let mut s = registered(None);
        s.send(&begin(1, GenerationKind::InitialFull, None)).unwrap();
        s.send(&commit(1, None)).unwrap();
        let e = s.receive(Frame::Committed { point: 1, generation: 2 }).unwrap_err();
        assert_eq!(e.to_string(), "expected Committed of generation 1, got Committed of generation 2");
    }

    #[test]
    fn the_servers_error_is_a_refusal_of_its_class() {
        for (code, retryable) in [(ERR_BUSY, true), (ERR_RESYNC_REQUIRED, true), (ERR_OTHER_SOURCE, false)] {
            let mut s = registered(Some(LATEST));
            let e = s.receive(Frame::error(code, "no")).unwrap_err();
            assert_eq!(e, SessionError::Refused(Refusal::new(code, "no")));
            assert_eq!(e.is_retryable(), retryable, "{e}");
            assert!(s.is_over());
            out_of_order(&mut s, &zero(), "the session is over");
        }
        // The class on the wire counts, not the code's default (§5).
        let mut s = registered(Some(LATEST));
        let e = s
            .receive(Frame::Error { class: ErrorClass::Retryable, code: 3, message: String::new() })
            .unwrap_err();
        assert!(e.is_retryable());
    }

    #[test]
    fn extents_checkpoints_and_commits_need_their_generation() {
        let mut s = registered(Some(LATEST));
        out_of_order(&mut s, &zero(), "no generation is open");
        out_of_order(&mut s, &Frame::Progress { next_offset: 0 }, "no generation is open");
        out_of_order(&mut s, &commit(10, Some([0; 32])), "no generation is open");
        s.send(&begin(10, GenerationKind::Incremental, Some(4))).unwrap();
        s.send(&zero()).unwrap();
        out_of_order(
            &mut s,
            &Frame::Progress { next_offset: 0 },
            "only an InitialFull generation has checkpoints",
        );
        out_of_order(&mut s, &commit(11, Some([0; 32])), "another generation than the one open");
        out_of_order(&mut s, &commit(10, None), "an Incremental's commit carries its digest");
        s.send(&commit(10, Some([0; 32]))).unwrap();
        out_of_order(&mut s, &zero(), "no generation is open");
    }

    #[test]
    fn generations_and_queries_name_the_registered_disk() {
        let mut s = AgentSession::new();
        s.send(&hello()).unwrap();
        s.receive(welcome()).unwrap();
        out_of_order(&mut s, &begin(1, GenerationKind::InitialFull, None), "not the one registered");
        out_of_order(&mut s, &Frame::Current { point: 1, as_of_unix_ms: 1 }, "no disk is registered");
        let mut s = registered(Some(LATEST));
        let other = Frame::HashQuery { disk: "d1".into(), point: 4, offset: 0, len: 1, block: 4096 };
        out_of_order(&mut s, &other, "not the one registered");
        out_of_order(&mut s, &begin(10, GenerationKind::Incremental, Some(3)), "applies on the latest point");
        out_of_order(&mut s, &welcome(), "only the server sends it");
    }

    #[test]
    fn current_only_between_generations_and_of_the_latest_point() {
        let mut s = registered(Some(LATEST));
        out_of_order(&mut s, &Frame::Current { point: 3, as_of_unix_ms: 1 }, "another point than the latest");
        s.send(&begin(10, GenerationKind::Incremental, Some(4))).unwrap();
        out_of_order(&mut s, &Frame::Current { point: 4, as_of_unix_ms: 1 }, "a generation is open");
        s.send(&commit(10, Some([0; 32]))).unwrap();
        s.receive(Frame::Committed { point: 5, generation: 10 }).unwrap();
        s.send(&Frame::Current { point: 5, as_of_unix_ms: 1 }).unwrap();
        assert_eq!(
            s.receive(Frame::CurrentAck { point: 5, as_of_unix_ms: 1 }),
            Ok(Reply::CurrentAck { point: 5, as_of_unix_ms: 1 })
        );
    }

    #[test]
    fn the_latest_point_moves_with_newer_commits_only() {
        let mut s = registered(Some(LATEST));
        // A generation committed before (sent again): the same point, no newer.
        s.send(&begin(8, GenerationKind::Incremental, Some(4))).unwrap();
        s.send(&commit(8, Some([0; 32]))).unwrap();
        s.receive(Frame::Committed { point: 3, generation: 8 }).unwrap();
        assert_eq!(s.latest(), Some(LATEST));
        s.send(&begin(12, GenerationKind::InitialFull, Some(4))).unwrap();
        s.send(&commit(12, None)).unwrap();
        s.receive(Frame::Committed { point: 6, generation: 12 }).unwrap();
        assert_eq!(s.latest(), Some(PointRef { point: 6, generation: 12, cut_unix_ms: 200 }));
        // The next incremental applies on it.
        out_of_order(&mut s, &begin(13, GenerationKind::Incremental, Some(4)), "applies on the latest point");
        s.send(&begin(13, GenerationKind::Incremental, Some(6))).unwrap();
    }

    #[test]
    fn an_error_may_be_sent_at_any_point_and_ends_the_session() {
        let mut s = registered(Some(LATEST));
        s.send(&begin(10, GenerationKind::Incremental, Some(4))).unwrap();
        s.send(&Frame::error(ERR_DIVERGED, "a clone")).unwrap();
        assert!(s.is_over());
        out_of_order(&mut s, &zero(), "the session is over");
        let mut s = AgentSession::new();
        s.send(&Frame::error(ERR_DIVERGED, "before Hello")).unwrap();
        assert!(s.is_over());
    }

    #[test]
    fn an_initial_copy_resumes_only_without_a_point() {
        let i = InitialSync { generation: 3, next_offset: 1 << 20 };
        let st = DiskState { latest: None, initial: Some(i), resync: None };
        assert_eq!(st.initial_copy(), Some(i));
        let st = DiskState { latest: Some(LATEST), initial: Some(i), resync: None };
        assert_eq!(st.initial_copy(), None);
    }

    #[test]
    fn a_resync_resumes_only_above_the_latest_point_and_from_the_shim_that_cut_it() {
        let above = InitialSync { generation: 12, next_offset: 1 << 20 };
        let below = InitialSync { generation: 9, next_offset: 0 };
        assert_eq!(DiskState::interrupted_resync(Some(above), &LATEST), Some(above));
        assert_eq!(DiskState::interrupted_resync(Some(below), &LATEST), None);
        assert_eq!(DiskState::interrupted_resync(None, &LATEST), None);
        // The shim went on from the resync's cut: resume. A shim that started over: start over.
        assert_eq!(DiskState::resumable_resync(Some(above), &LATEST, 13), Some(above));
        assert_eq!(DiskState::resumable_resync(Some(above), &LATEST, 12), None);
        assert_eq!(DiskState::resumable_resync(Some(above), &LATEST, 1), None);
        assert_eq!(DiskState::resumable_resync(Some(below), &LATEST, 13), None);
    }

    #[test]
    fn a_latest_point_the_shim_never_cut_is_divergence() {
        let msg = || "another machine".to_string();
        assert_eq!(DiskState::check_lineage(&LATEST, 10, true, msg), Ok(()));
        let e = DiskState::check_lineage(&LATEST, 9, true, msg).unwrap_err();
        assert_eq!(e, Refusal::new(ERR_DIVERGED, "another machine"));
        assert!(!e.is_retryable());
        assert!(DiskState::check_lineage(&LATEST, 1, true, msg).is_err());
        // Tracking lost: the ids prove nothing; a resync follows instead.
        assert_eq!(DiskState::check_lineage(&LATEST, 1, false, msg), Ok(()));
    }
}
