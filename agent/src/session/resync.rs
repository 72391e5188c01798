//! Resync: bring the server's latest point level with the source after the tracker lost track
//! of what changed (the shim restarted without its state, its state was corrupt) or fell too far
//! behind, by comparing hashes instead of copying the disk (`docs/wire.md` §6.8).
//!
//! The comparison is a two-level hierarchy:
//!
//! 1. Per map region ([`REGION`], 64 MiB) the agent asks the server for the [`COARSE`]-block
//!    (64 KiB) hashes of the latest point (`HashQuery`, 1024 hashes) and hashes the same blocks
//!    of the live disk, read by [`AgentConfig::readers`](crate::config::AgentConfig::readers) threads that run ahead of the
//!    comparison. Equal blocks are skipped; a block that reads as zeroes on the source is sent
//!    as a `Zero` extent whatever the server holds. The readers read the file or device the
//!    shim serves directly, with O_DIRECT, when the shim names it (control request `image`) and
//!    it is the same file here (`open_image`); otherwise through the shim's NBD socket.
//! 2. For each run of differing blocks the agent asks the [`FINE`]-block (4 KiB) hashes and
//!    compares them with its own; only differing fine blocks go out, zero ones as `Zero`
//!    extents and the rest as chunks (hashed, deduplicated, compressed: [`ship_chunks`]). Where
//!    the server's block reads as zeroes, its fine hashes are known without asking.
//!
//! The generation is an `InitialFull` with the latest point as its base, and `Progress` after
//! regions, so an interrupted resync resumes from the server's checkpoint
//! (`DiskState.initial`). It reads the live disk while tracking goes on, so the point is fuzzy
//! (`Inconsistent`); the next incremental generation, every write since the resync's cut, makes
//! the replica consistent, exactly as after the initial copy.
//!
//! Reads are rate-limited (`--resync-rate`, a token bucket on bytes read from the source) and
//! back off while the application writes heavily: see [`ResyncOptions::backoff_rate`](crate::config::ResyncOptions::backoff_rate).

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use nbd_proto::client::Client;
use tracker::control::{self, Request};
use tracker::{CutInfo, Status};
use wire::session::DiskState;
use wire::{Consistency, Frame, GenerationKind, Hash, InitialSync, PointRef, ZeroHashes};

use super::{now_ms, progress_bar, summary, Session};
use crate::config::Summary;
use crate::error::AgentError;
use crate::ship::{ship_chunks, Stats, MAX_CHUNK};

/// Bytes of the disk one level-1 query covers: a map region of the store.
pub const REGION: u64 = 64 << 20;
/// Level-1 block: the server answers one hash per this many bytes of a region.
pub const COARSE: u64 = 64 << 10;
/// Level-2 block: the unit that is sent when it differs.
pub const FINE: u64 = 4 << 10;
/// Bytes a reader thread reads from the source at once.
const READ: u64 = 4 << 20;
/// Read results waiting for the comparison (how far the readers run ahead: 64 × 4 MiB).
const LOOKAHEAD: usize = 64;
/// Progress (a durable checkpoint on the server) at a region's end, at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Level-1 queries in flight: the server hashes the next region while this one is compared.
const DEPTH: usize = 3;
/// A progress line in the log this often when no bar is drawn.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Backoff: how often the shim's live dirty set is measured.
const BACKOFF_SAMPLE: Duration = Duration::from_secs(1);
/// Backoff: how long reads pause when the application writes heavily.
const BACKOFF_PAUSE: Duration = Duration::from_secs(1);
/// Backoff: after pausing this long in a row, reads run for [`BACKOFF_RUN`] regardless.
const BACKOFF_MAX_PAUSE: Duration = Duration::from_secs(10);
const BACKOFF_RUN: Duration = Duration::from_secs(2);

/// Why a resync is due, or `None`. `forced`: `--resync` was given and not yet done.
pub(crate) fn resync_reason(
    st: &Status,
    latest: &PointRef,
    initial: Option<InitialSync>,
    forced: bool,
) -> Option<String> {
    if forced {
        return Some("requested (--resync)".into());
    }
    if let Some(i) = DiskState::interrupted_resync(initial, latest) {
        return Some(format!(
            "the server holds an interrupted resync (generation {}, {} bytes done)",
            i.generation, i.next_offset
        ));
    }
    if let Some(why) = &st.resync_required {
        return Some(format!("the shim requires it: {why}"));
    }
    if st.next_generation <= latest.generation {
        return Some(format!(
            "the shim's next generation {} is not above the latest point's generation {}: \
             its tracking did not produce that point",
            st.next_generation, latest.generation
        ));
    }
    if st.backlog_bytes > st.size / 2 {
        return Some(format!(
            "the backlog ({} bytes) exceeds half the disk ({} bytes of {})",
            st.backlog_bytes,
            st.size / 2,
            st.size
        ));
    }
    None
}

/// A token bucket on bytes read from the source: up to one second's worth in a burst; a read
/// larger than what is left runs into debt and the reader sleeps it off.
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        Self { rate, state: Mutex::new((rate, Instant::now())) }
    }

    /// Takes `n` bytes' worth, sleeping as long as the rate requires.
    fn take(&self, n: u64) {
        let wait = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            st.0 = (st.0 + now.duration_since(st.1).as_secs_f64() * self.rate).min(self.rate);
            st.1 = now;
            st.0 -= n as f64;
            if st.0 < 0.0 {
                -st.0 / self.rate
            } else {
                0.0
            }
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

/// Pacing shared by the readers: the rate limit and the backoff's pause.
struct Pace {
    bucket: Option<Bucket>,
    start: Instant,
    /// Reads wait until this many milliseconds after `start`.
    paused_until_ms: AtomicU64,
    stop: AtomicBool,
}

impl Pace {
    /// Waits for the backoff and the rate limit before reading `n` bytes. False: stop.
    fn before_read(&self, n: u64) -> bool {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            let now = self.start.elapsed().as_millis() as u64;
            let until = self.paused_until_ms.load(Ordering::Relaxed);
            if now >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis((until - now).min(100)));
        }
        if let Some(b) = &self.bucket {
            b.take(n);
        }
        true
    }
}

/// The backoff rule of [`ResyncOptions::backoff_rate`](crate::config::ResyncOptions::backoff_rate), fed one sample of the shim's
/// `live_dirty_bytes` at a time.
struct Backoff {
    rate: u64,
    last: Option<(Instant, u64)>,
    /// When the current run of pauses began.
    pausing_since: Option<Instant>,
    /// Reads run regardless until then (after pausing for `BACKOFF_MAX_PAUSE`).
    run_until: Option<Instant>,
}

impl Backoff {
    fn new(rate: u64) -> Self {
        Self { rate, last: None, pausing_since: None, run_until: None }
    }

    /// Takes a sample; `Some(bytes per second)` when reads should pause for [`BACKOFF_PAUSE`].
    fn sample(&mut self, now: Instant, dirty: u64) -> Option<u64> {
        let last = self.last.replace((now, dirty));
        let (t, before) = last?;
        let per_sec =
            (dirty.saturating_sub(before) as f64 / now.duration_since(t).as_secs_f64().max(1e-3)) as u64;
        if per_sec <= self.rate {
            self.pausing_since = None;
            return None;
        }
        if self.run_until.is_some_and(|u| now < u) {
            return None;
        }
        let since = *self.pausing_since.get_or_insert(now);
        if now.duration_since(since) >= BACKOFF_MAX_PAUSE {
            self.pausing_since = None;
            self.run_until = Some(now + BACKOFF_RUN);
            return None;
        }
        Some(per_sec)
    }
}

/// Watches the shim's live dirty set and pauses reads while it grows fast.
fn backoff_monitor(control: &Path, rate: u64, pace: &Pace) {
    let mut backoff = Backoff::new(rate);
    let mut paused = false;
    while !pace.stop.load(Ordering::Relaxed) {
        if let Ok(st) = control::call_as::<Status>(control, &Request::Status) {
            let pause = backoff.sample(Instant::now(), st.live_dirty_bytes);
            if let Some(per_sec) = pause {
                let until = pace.start.elapsed() + BACKOFF_PAUSE;
                pace.paused_until_ms.store(until.as_millis() as u64, Ordering::Relaxed);
                if !paused {
                    tracing::info!(
                        dirty_per_sec = per_sec,
                        "the application writes heavily: resync reads pause"
                    );
                }
            } else if paused {
                tracing::info!("resync reads go on");
            }
            paused = pause.is_some();
        }
        let until = Instant::now() + BACKOFF_SAMPLE;
        while Instant::now() < until && !pace.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The source's coarse blocks of one read: hash, and whether it reads as zeroes.
struct Piece {
    offset: u64,
    blocks: Vec<(Hash, bool)>,
}

/// Sorted hole extents of the source (`base:allocation`): blocks inside one are zeroes
/// without reading.
struct Holes(Vec<(u64, u64)>);

impl Holes {
    fn covers(&self, s: u64, e: u64) -> bool {
        let k = self.0.partition_point(|h| h.0 + h.1 <= s);
        self.0.get(k).is_some_and(|h| h.0 <= s && h.0 + h.1 >= e)
    }
}

/// What the comparison of one region found, in disk bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Diff {
    /// Extents to send as data, sorted, each within one fine-aligned run.
    data: Vec<(u64, u64)>,
    /// Extents that read as zeroes on the source and not on the server.
    zero: Vec<(u64, u64)>,
    matched: u64,
}

/// Appends `[o, o + l)` to sorted extents, merging with the last one if adjacent.
fn push_extent(v: &mut Vec<(u64, u64)>, o: u64, l: u64) {
    match v.last_mut() {
        Some(last) if last.0 + last.1 == o => last.1 += l,
        _ => v.push((o, l)),
    }
}

/// Splits extents at [`MAX_CHUNK`]-aligned boundaries (as `plan_chunks` does, without merging
/// across gaps: equal blocks between differing ones are not sent).
fn split_chunks(extents: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(o, l) in extents {
        let mut pos = o;
        while pos < o + l {
            let e = ((pos / MAX_CHUNK + 1) * MAX_CHUNK).min(o + l);
            out.push((pos, e - pos));
            pos = e;
        }
    }
    out
}

/// Level 1 of a region: which coarse blocks differ. Returns the runs of differing blocks that
/// need a level-2 comparison (as `(first block index, count)`) and fills `diff` with the
/// matched bytes and the blocks that are zeroes on the source.
fn compare_coarse(
    start: u64,
    end: u64,
    coarse: u64,
    server: &[Hash],
    source: &[(Hash, bool)],
    max_run: usize,
    diff: &mut Diff,
) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (srv, (src, src_zero))) in server.iter().zip(source).enumerate() {
        let s = start + i as u64 * coarse;
        let len = (s + coarse).min(end) - s;
        if srv == src {
            diff.matched += len;
        } else if *src_zero {
            push_extent(&mut diff.zero, s, len);
        } else {
            match runs.last_mut() {
                Some(r) if r.0 + r.1 == i && r.1 < max_run => r.1 += 1,
                _ => runs.push((i, 1)),
            }
        }
    }
    runs
}

/// The blake3 of every `fine`-sized piece of `data`.
fn fine_hashes(data: &[u8], fine: u64) -> Vec<Hash> {
    data.chunks(fine as usize).map(|p| *blake3::hash(p).as_bytes()).collect()
}

/// Level 2 of the run `[offset, end)`: compares the source's fine hashes with the server's
/// and fills `diff`.
fn compare_fine(
    offset: u64,
    end: u64,
    fine: u64,
    source: &[Hash],
    server: &[Hash],
    zeroes: &ZeroHashes,
    diff: &mut Diff,
) {
    for (j, (src, srv)) in source.iter().zip(server).enumerate() {
        let s = offset + j as u64 * fine;
        let len = (s + fine).min(end) - s;
        if src == srv {
            diff.matched += len;
        } else if *src == zeroes.get(len) {
            push_extent(&mut diff.zero, s, len);
        } else {
            push_extent(&mut diff.data, s, len);
        }
    }
}

/// Byte counts of a resync, for progress and the summary.
#[derive(Default)]
struct Counts {
    matched: u64,
    transferred: u64,
}

/// Shows processed = transferred + matched bytes: a bar on a terminal, else a log line every
/// [`LOG_INTERVAL`].
struct Progress {
    bar: indicatif::ProgressBar,
    total: u64,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(show_bar: bool, total: u64) -> Self {
        let bar = progress_bar(show_bar, total, "resync", " {msg}");
        Self { bar, total, start: Instant::now(), last_log: Instant::now() }
    }

    fn update(&mut self, c: &Counts, force_log: bool) {
        let processed = c.matched + c.transferred;
        self.bar.set_position(processed);
        self.bar.set_message(format!(
            "matched {} MiB, transferred {} KiB",
            c.matched >> 20,
            c.transferred >> 10
        ));
        if self.bar.is_hidden() && (force_log || self.last_log.elapsed() >= LOG_INTERVAL) {
            self.last_log = Instant::now();
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                processed,
                total = self.total,
                matched = c.matched,
                transferred = c.transferred,
                mib_per_sec = format!("{:.1}", processed as f64 / secs / (1 << 20) as f64),
                "resync progress"
            );
        }
    }
}

/// Runs a resync against `latest` (resuming `initial` when it is a resync this shim can
/// continue), commits it as an inconsistent point, clears the shim's resync-required and
/// returns the summary.
pub(crate) fn resync(
    session: &mut Session<'_>,
    latest: PointRef,
    initial: Option<InitialSync>,
    why: &str,
) -> Result<Summary, AgentError> {
    let cfg = session.cfg;
    let start_time = Instant::now();
    let (out0, in0) = (session.link.bytes_out, session.link.bytes_in);
    let status = session.status()?;
    let size = status.size;
    // Blocks at least as large as the tracking granularity, so every extent is aligned.
    let fine = FINE.max(status.granularity);
    let coarse = COARSE.max(fine);
    let resumable = DiskState::resumable_resync(initial, &latest, status.next_generation);
    if let (Some(i), None) = (DiskState::interrupted_resync(initial, &latest), resumable) {
        tracing::warn!(
            generation = i.generation,
            next_offset = i.next_offset,
            "the shim no longer tracks since the interrupted resync's cut: starting it over"
        );
    }
    let (generation, cut_ms, from) = match resumable {
        Some(i) => {
            tracing::info!(generation = i.generation, next_offset = i.next_offset, %why, "resuming the resync");
            (i.generation, now_ms(), i.next_offset.min(size))
        }
        None => {
            let cut = start_cut(session, &latest)?;
            tracing::info!(generation = cut.generation, base = latest.point, %why, "resync");
            (cut.generation, cut.cut_unix_ms, 0)
        }
    };
    // Every generation up to this one is covered by the comparison of the live disk, so
    // they go now; until the resync commits, the shim says a resync is required, or a
    // resync interrupted before the server kept a checkpoint would leave their writes on
    // no point at all (the next run would see no reason to resync and ship only newer
    // generations).
    session.control::<serde_json::Value>(&Request::RequireResync {
        why: format!("a resync (generation {generation}) has not committed yet"),
    })?;
    for g in session.status()?.generations.iter().filter(|g| g.id <= generation) {
        session.control::<serde_json::Value>(&Request::Release { generation: g.id })?;
    }
    session.memory.consistency.retain(|(g, _)| *g > generation);
    session.link.send(&Frame::BeginGeneration {
        disk: cfg.disk.clone(),
        generation,
        kind: GenerationKind::InitialFull,
        base_point: Some(latest.point),
    })?;
    let from = from - from % coarse;
    let mut stats = Stats::default();
    let mut counts = Counts::default();
    let mut progress = Progress::new(cfg.progress, size - from);
    let pace = Pace {
        bucket: cfg.resync.rate.map(Bucket::new),
        start: Instant::now(),
        paused_until_ms: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let holes = {
        let mut client = Client::connect_unix(&cfg.socket, &cfg.export, &["base:allocation"])?;
        let map = client.map("base:allocation")?;
        let _ = client.disconnect();
        Holes(map.into_iter().filter(|e| e.2 & 1 != 0).map(|e| (e.0, e.1)).collect())
    };
    let zeroes = ZeroHashes::of(&[coarse, fine]);
    let bytes_read = AtomicU64::new(0);
    // Readers take pieces in order from a shared counter and send them back tagged; the
    // comparison puts them back in order.
    let next_piece = AtomicU64::new(0);
    let pieces: Vec<(u64, u64)> = read_pieces(from, size);
    let image = open_image(&cfg.control, size);
    std::thread::scope(|scope| -> Result<(), AgentError> {
        let (piece_tx, piece_rx) = bounded::<Result<Piece, AgentError>>(LOOKAHEAD);
        let readers = cfg.readers.max(1).min(pieces.len().max(1));
        for _ in 0..readers {
            let (tx, pieces, next, pace, holes, zeroes, read) =
                (piece_tx.clone(), &pieces, &next_piece, &pace, &holes, &zeroes, &bytes_read);
            let image = image.as_ref();
            scope.spawn(move || {
                let client = match Client::connect_unix(&cfg.socket, &cfg.export, &[]) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let source = Source { client, image };
                read_source(source, pieces, next, coarse, pace, holes, zeroes, read, &tx);
            });
        }
        drop(piece_tx);
        if cfg.resync.backoff_rate > 0 {
            let pace = &pace;
            scope.spawn(move || backoff_monitor(&cfg.control, cfg.resync.backoff_rate, pace));
        }
        let r = compare_regions(
            session,
            latest.point,
            from,
            size,
            (coarse, fine),
            &zeroes,
            &pace,
            &piece_rx,
            &mut stats,
            &mut counts,
            &mut progress,
        );
        pace.stop.store(true, Ordering::Relaxed);
        // Unblock readers waiting to hand over a piece.
        while piece_rx.try_recv().is_ok() {}
        drop(piece_rx);
        r
    })?;
    stats.bytes_read += bytes_read.load(Ordering::Relaxed);
    progress.update(&counts, true);
    progress.bar.finish_and_clear();
    let point = session.link.commit(generation, cut_ms, Consistency::Inconsistent, None)?;
    // The replica now holds the whole disk (fuzzy); the live set covers what changed since.
    session.control::<serde_json::Value>(&Request::ClearResync)?;
    session.report(point, generation, cut_ms)?;
    let mut s =
        summary("resync", generation, point, Consistency::Inconsistent, &stats, start_time, &cfg.metrics);
    s.bytes_matched = counts.matched;
    s.bytes_transferred = counts.transferred;
    s.wire_bytes_sent = Some(session.link.bytes_out - out0);
    s.wire_bytes_received = Some(session.link.bytes_in - in0);
    tracing::info!(
        point,
        generation,
        matched = s.bytes_matched,
        transferred = s.bytes_transferred,
        read = s.bytes_read,
        sent = s.bytes_sent,
        wire_out = s.wire_bytes_sent,
        wire_in = s.wire_bytes_received,
        "resync committed"
    );
    Ok(s)
}

/// Cuts the generation the resync becomes, above the server's latest point: a shim that
/// started over numbers its generations from 1 again, and the server only accepts rising
/// ones. The generations cut and released on the way carry nothing the resync does not
/// cover (it reads the live disk after this cut).
fn start_cut(session: &Session<'_>, latest: &PointRef) -> Result<CutInfo, AgentError> {
    let mut cut: CutInfo = session.control(&Request::Cut)?;
    let first = cut.generation;
    while cut.generation <= latest.generation {
        session.control::<serde_json::Value>(&Request::Release { generation: cut.generation })?;
        cut = session.control(&Request::Cut)?;
    }
    if cut.generation != first {
        tracing::info!(
            from = first,
            to = cut.generation,
            "advanced the shim's generation ids past the server's latest point"
        );
    }
    Ok(cut)
}

/// The comparison: level-1 queries kept [`DEPTH`] regions ahead so the server hashes the
/// next region while this one is compared, level-2 queries behind them, replies taken in
/// order. Zero extents go out at once; data extents are shipped at each checkpoint (the
/// pipeline drained, so no reply is outstanding), then `Progress`.
#[allow(clippy::too_many_arguments)]
fn compare_regions(
    session: &mut Session<'_>,
    base: u64,
    from: u64,
    size: u64,
    (coarse, fine): (u64, u64),
    zeroes: &ZeroHashes,
    pace: &Pace,
    pieces: &Receiver<Result<Piece, AgentError>>,
    stats: &mut Stats,
    counts: &mut Counts,
    progress: &mut Progress,
) -> Result<(), AgentError> {
    let cfg = session.cfg;
    let mut source = SourceHashes { rx: pieces, reorder: Default::default() };
    let mut l2_client: Option<Client> = None;
    let max_run = (wire::MAX_HASHES as u64 * fine / coarse) as usize;
    // Replies expected, in order; regions being compared, in order, with their level-2
    // replies still expected.
    let mut expect: VecDeque<Expect> = VecDeque::new();
    let mut regions: VecDeque<(u64, usize)> = VecDeque::new();
    let mut next_query = from;
    let mut compared = from;
    let mut pending_data: Vec<(u64, u64)> = Vec::new();
    let mut last_progress = (Instant::now(), from);
    let mut draining = false;
    loop {
        while !draining && next_query < size && regions.len() < DEPTH {
            let end = ((next_query / REGION + 1) * REGION).min(size);
            session.link.queue(&Frame::HashQuery {
                disk: cfg.disk.clone(),
                point: base,
                offset: next_query,
                len: end - next_query,
                block: coarse as u32,
            })?;
            expect.push_back(Expect::Coarse { start: next_query, end });
            regions.push_back((end, 1));
            next_query = end;
        }
        let Some(want) = expect.pop_front() else {
            // Drained: everything below `compared` is compared and its zero extents
            // queued; ship its data, then make it durable (unless the commit does).
            debug_assert_eq!(compared, next_query);
            // The data is read once more, under the same pacing.
            if !pace.before_read(pending_data.iter().map(|c| c.1).sum()) {
                return Err(AgentError::Protocol("resync stopped".into()));
            }
            ship(session, &pending_data, stats)?;
            counts.transferred += pending_data.iter().map(|c| c.1).sum::<u64>();
            pending_data.clear();
            progress.update(counts, false);
            if compared >= size {
                return Ok(());
            }
            session.link.progress(compared)?;
            cfg.metrics.progress_total.fetch_add(1, Ordering::Relaxed);
            last_progress = (Instant::now(), compared);
            draining = false;
            continue;
        };
        let mut diff = Diff::default();
        match want {
            Expect::Coarse { start, end } => {
                session.link.flush()?;
                // The source's side first: the readers are usually ahead.
                let src = source.take(start, end, coarse)?;
                // In the order asked: the session machine checked that they answer this query.
                let server = session.link.hashes()?;
                let runs = compare_coarse(start, end, coarse, &server, &src, max_run, &mut diff);
                let server_zero = |i: usize| {
                    let s = start + i as u64 * coarse;
                    server[i] == zeroes.get((s + coarse).min(end) - s)
                };
                let mut buf = Vec::new();
                for (i, n) in runs {
                    let s = start + i as u64 * coarse;
                    let e = (s + n as u64 * coarse).min(end);
                    buf.resize((e - s) as usize, 0);
                    if !pace.before_read(e - s) {
                        return Err(AgentError::Protocol("resync stopped".into()));
                    }
                    let client = match &mut l2_client {
                        Some(c) => c,
                        None => l2_client.insert(Client::connect_unix(&cfg.socket, &cfg.export, &[])?),
                    };
                    client.read(s, &mut buf)?;
                    stats.bytes_read += e - s;
                    let src_fine = fine_hashes(&buf, fine);
                    if (i..i + n).all(server_zero) {
                        // The server's blocks read as zeroes: so do all their pieces.
                        let n = src_fine.len() as u64;
                        let srv: Vec<Hash> = (0..n)
                            .map(|j| zeroes.get((s + (j + 1) * fine).min(e) - (s + j * fine)))
                            .collect();
                        compare_fine(s, e, fine, &src_fine, &srv, zeroes, &mut diff);
                    } else {
                        session.link.queue(&Frame::HashQuery {
                            disk: cfg.disk.clone(),
                            point: base,
                            offset: s,
                            len: e - s,
                            block: fine as u32,
                        })?;
                        expect.push_back(Expect::Fine { start: s, end: e, source: src_fine });
                        regions.iter_mut().find(|r| r.0 == end).expect("queried region").1 += 1;
                    }
                }
                let region = regions.iter_mut().find(|r| r.0 == end).expect("queried region");
                region.1 -= 1;
            }
            Expect::Fine { start, end, source: src } => {
                // The session machine checked that they answer this query.
                let server = session.link.hashes()?;
                compare_fine(start, end, fine, &src, &server, zeroes, &mut diff);
                let region = regions.iter_mut().find(|r| r.0 >= end).expect("queried region");
                region.1 -= 1;
            }
        }
        for &(o, l) in &diff.zero {
            session.link.queue(&Frame::Zero { offset: o, len: l })?;
            stats.bytes_zero += l;
        }
        counts.matched += diff.matched;
        counts.transferred += diff.zero.iter().map(|z| z.1).sum::<u64>();
        pending_data.extend(diff.data);
        while regions.front().is_some_and(|r| r.1 == 0) {
            compared = regions.pop_front().expect("checked").0;
        }
        progress.update(counts, false);
        if compared > last_progress.1 && last_progress.0.elapsed() >= PROGRESS_INTERVAL {
            // Checkpoint: stop asking, let the replies drain, then ship and `Progress`.
            draining = true;
        }
        if next_query >= size {
            draining = true;
        }
    }
}

/// Sends data extents (read again from the live disk, hashed, deduplicated, compressed).
fn ship(session: &mut Session<'_>, data: &[(u64, u64)], stats: &mut Stats) -> Result<(), AgentError> {
    let cfg = session.cfg;
    let chunks = split_chunks(data);
    if chunks.is_empty() {
        return Ok(());
    }
    let before = stats.bytes_read;
    ship_chunks(
        &mut session.link,
        &cfg.socket,
        &cfg.export,
        &chunks,
        cfg.readers,
        cfg.zstd_level,
        &session.memory.known,
        stats,
        None,
        &mut |_| {},
    )?;
    debug_assert_eq!(stats.bytes_read - before, chunks.iter().map(|c| c.1).sum::<u64>());
    Ok(())
}

/// A reply the comparison waits for.
enum Expect {
    /// Level 1 of the region `[start, end)`.
    Coarse { start: u64, end: u64 },
    /// Level 2 of the run `[start, end)`, with the source's fine hashes.
    Fine { start: u64, end: u64, source: Vec<Hash> },
}

/// The readers' results, put back in order.
struct SourceHashes<'a> {
    rx: &'a Receiver<Result<Piece, AgentError>>,
    reorder: std::collections::BTreeMap<u64, Vec<(Hash, bool)>>,
}

impl SourceHashes<'_> {
    /// The source's coarse hashes of `[start, end)` (which the readers' pieces tile).
    fn take(&mut self, start: u64, end: u64, coarse: u64) -> Result<Vec<(Hash, bool)>, AgentError> {
        let mut out = Vec::with_capacity((end - start).div_ceil(coarse) as usize);
        let mut at = start;
        while at < end {
            if let Some(blocks) = self.reorder.remove(&at) {
                at += blocks.len() as u64 * coarse;
                out.extend(blocks);
                continue;
            }
            match self.rx.recv() {
                Ok(Ok(p)) => {
                    self.reorder.insert(p.offset, p.blocks);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(AgentError::Protocol("the source readers stopped".into())),
            }
        }
        Ok(out)
    }
}

/// The source reads of `[from, size)`: [`READ`]-aligned pieces (so none straddles a region).
fn read_pieces(from: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = from;
    while at < size {
        let e = ((at / READ + 1) * READ).min(size);
        out.push((at, e - at));
        at = e;
    }
    out
}

/// Alignment of the readers' buffers, offsets and lengths for O_DIRECT.
const DIRECT_ALIGN: usize = 4096;

/// The file or device the shim serves, opened here for reading with O_DIRECT (or without, where
/// the file system refuses it), if the shim names it and `dev`/`ino` show it is the same file.
/// Reading it directly skips two copies and the socket; it is coherent with the shim's writes
/// (a direct read writes back the page cache's dirty pages of its range first). `None`, and the
/// readers go through the NBD socket, when anything does not fit (an older shim, another mount
/// namespace, no permission).
fn open_image(control_path: &Path, size: u64) -> Option<File> {
    let tried = (|| -> Result<File, String> {
        let info: control::ImageInfo =
            control::call_as(control_path, &Request::Image).map_err(|e| e.to_string())?;
        if info.size != size {
            return Err(format!("the shim says {} bytes, its status {size}", info.size));
        }
        let open = |flags| std::fs::OpenOptions::new().read(true).custom_flags(flags).open(&info.path);
        let file = open(libc::O_DIRECT)
            .or_else(|e| if e.raw_os_error() == Some(libc::EINVAL) { open(0) } else { Err(e) })
            .map_err(|e| format!("open {}: {e}", info.path.display()))?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if (meta.dev(), meta.ino()) != (info.dev, info.ino) {
            return Err(format!("{} here is not the file the shim serves", info.path.display()));
        }
        Ok(file)
    })();
    match tried {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::info!("reading the disk through the shim's socket: {e}");
            None
        }
    }
}

/// Where a reader reads the live disk: the image itself when [`open_image`] opened it (until a
/// read of it fails), else the shim's NBD socket.
struct Source<'a> {
    client: Client,
    image: Option<&'a File>,
}

impl Source<'_> {
    /// Reads `len` bytes at `offset` into `buf[..len]`; `buf` is [`DIRECT_ALIGN`]-aligned and
    /// at least `len` rounded up to it.
    fn read(&mut self, offset: u64, len: usize, buf: &mut [u8]) -> Result<(), AgentError> {
        if let Some(f) = self.image {
            let want = len.next_multiple_of(DIRECT_ALIGN);
            let mut got = 0;
            let r = loop {
                match f.read_at(&mut buf[got..want], offset + got as u64) {
                    Ok(0) => break Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
                if got >= len {
                    break Ok(());
                }
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(
                        offset,
                        len,
                        "reading the image directly failed ({e}): reading through the shim"
                    );
                    self.image = None;
                }
            }
        }
        Ok(self.client.read(offset, &mut buf[..len])?)
    }
}

/// A reader thread: takes the next piece, reads it (unless it is all hole), hashes its coarse
/// blocks and hands them over, until the pieces run out or the resync stops.
#[allow(clippy::too_many_arguments)]
fn read_source(
    mut source: Source<'_>,
    pieces: &[(u64, u64)],
    next: &AtomicU64,
    coarse: u64,
    pace: &Pace,
    holes: &Holes,
    zeroes: &ZeroHashes,
    read: &AtomicU64,
    tx: &crossbeam_channel::Sender<Result<Piece, AgentError>>,
) {
    let mut buf = vec![0u8; READ as usize + DIRECT_ALIGN];
    let aligned = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut buf[aligned..aligned + READ as usize];
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
        let Some(&(offset, len)) = pieces.get(i) else { break };
        let end = offset + len;
        let blocks: Vec<(u64, u64)> = (0..len.div_ceil(coarse))
            .map(|j| {
                let s = offset + j * coarse;
                (s, (s + coarse).min(end))
            })
            .collect();
        let all_hole = holes.covers(offset, end);
        if !all_hole {
            if !pace.before_read(len) {
                break;
            }
            if let Err(e) = source.read(offset, len as usize, buf) {
                let _ = tx.send(Err(e));
                return;
            }
            read.fetch_add(len, Ordering::Relaxed);
        }
        let data = &buf[..len as usize];
        let hashed = blocks
            .iter()
            .map(|&(s, e)| {
                if all_hole || holes.covers(s, e) {
                    return (zeroes.get(e - s), true);
                }
                let h = *blake3::hash(&data[(s - offset) as usize..(e - offset) as usize]).as_bytes();
                (h, h == zeroes.get(e - s))
            })
            .collect();
        if tx.send(Ok(Piece { offset, blocks: hashed })).is_err() {
            break;
        }
    }
    let _ = source.client.disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(size: u64) -> Status {
        serde_json::from_value(serde_json::json!({
            "size": size, "granularity": 4096, "live_dirty_bytes": 0, "live_zero_bytes": 0,
            "generations": [], "next_generation": 5, "preserve_used_bytes": 0,
            "preserve_limit_bytes": 0, "over_report_bound_bytes": 0, "persistent": true,
            "resync_required": null, "memory_bytes": 0, "backlog_bytes": 0,
            "last_replicated": null, "rpo_ms": null, "quiesced": false
        }))
        .unwrap()
    }

    #[test]
    fn reasons_to_resync() {
        let latest = PointRef { point: 3, generation: 4, cut_unix_ms: 0 };
        let st = status(1 << 30);
        assert_eq!(resync_reason(&st, &latest, None, false), None);
        assert!(resync_reason(&st, &latest, None, true).unwrap().contains("--resync"));
        // An interrupted resync on the server; a stale checkpoint (not above latest) is not one.
        let i = InitialSync { generation: 5, next_offset: 1 << 20 };
        assert!(resync_reason(&st, &latest, Some(i), false).unwrap().contains("interrupted"));
        let stale = InitialSync { generation: 2, next_offset: 0 };
        assert_eq!(resync_reason(&st, &latest, Some(stale), false), None);
        let st2 = Status { resync_required: Some("first start".into()), ..st.clone() };
        assert!(resync_reason(&st2, &latest, None, false).unwrap().contains("first start"));
        let st2 = Status { next_generation: 4, ..st.clone() };
        assert!(resync_reason(&st2, &latest, None, false).unwrap().contains("next generation 4"));
        // The backlog: over half the disk, not at half.
        let st2 = Status { backlog_bytes: 1 << 29, ..st.clone() };
        assert_eq!(resync_reason(&st2, &latest, None, false), None);
        let st2 = Status { backlog_bytes: (1 << 29) + 4096, ..st };
        assert!(resync_reason(&st2, &latest, None, false).unwrap().contains("backlog"));
        assert!(resync_reason(&st2, &latest, None, false)
            .unwrap()
            .contains("(536870912 bytes of 1073741824)"));
    }

    #[test]
    fn coarse_comparison_skips_equal_blocks_and_zeroes_source_zero_ones() {
        let h = |b: u8| [b; 32];
        let server = [h(1), h(2), h(3), h(4), h(5), h(6)];
        let source =
            [(h(1), false), (h(9), false), (h(8), false), (h(0), true), (h(5), false), (h(7), false)];
        let mut diff = Diff::default();
        // The last block is short (the region ends at 5 × 64 KiB + 4 KiB).
        let end = 5 * COARSE + 4096;
        let runs = compare_coarse(0, end, COARSE, &server, &source, 4, &mut diff);
        assert_eq!(runs, vec![(1, 2), (5, 1)]);
        assert_eq!(diff.zero, vec![(3 * COARSE, COARSE)]);
        assert_eq!(diff.matched, 2 * COARSE);
        // Runs are cut at max_run blocks.
        let mut diff = Diff::default();
        let server = [h(1); 5];
        let source = [(h(2), false); 5];
        assert_eq!(
            compare_coarse(0, 5 * COARSE, COARSE, &server, &source, 2, &mut diff),
            vec![(0, 2), (2, 2), (4, 1)]
        );
    }

    #[test]
    fn fine_comparison_sends_only_differing_blocks() {
        let zeroes = ZeroHashes::of(&[COARSE, FINE]);
        let mut data = vec![7u8; 5 * FINE as usize + 512];
        data[FINE as usize..2 * FINE as usize].fill(0);
        let hash = |d: &[u8]| *blake3::hash(d).as_bytes();
        let pieces: Vec<&[u8]> = data.chunks(FINE as usize).collect();
        let server = [
            hash(pieces[0]),      // equal
            [1; 32],              // differs, zero on the source
            [1; 32],              // differs
            [1; 32],              // differs, adjacent: merged
            hash(pieces[4]),      // equal
            wire::zero_hash(512), // the short last block differs
        ];
        let mut diff = Diff::default();
        let end = (1 << 20) + data.len() as u64;
        compare_fine(1 << 20, end, FINE, &fine_hashes(&data, FINE), &server, &zeroes, &mut diff);
        assert_eq!(diff.zero, vec![((1 << 20) + FINE, FINE)]);
        assert_eq!(diff.data, vec![((1 << 20) + 2 * FINE, 2 * FINE), ((1 << 20) + 5 * FINE, 512)]);
        assert_eq!(diff.matched, 2 * FINE);
        assert_eq!(zeroes.get(FINE), *blake3::hash(&[0; 4096]).as_bytes());
        assert_eq!(zeroes.get(100), *blake3::hash(&[0; 100]).as_bytes());
    }

    #[test]
    fn chunks_split_at_max_chunk_boundaries_without_merging_gaps() {
        assert_eq!(split_chunks(&[(0, 4096), (8192, 4096)]), vec![(0, 4096), (8192, 4096)]);
        assert_eq!(
            split_chunks(&[(MAX_CHUNK - 4096, 8192)]),
            vec![(MAX_CHUNK - 4096, 4096), (MAX_CHUNK, 4096)]
        );
        assert_eq!(read_pieces(READ - 4096, READ + 100), vec![(READ - 4096, 4096), (READ, 100)]);
        assert!(read_pieces(5, 5).is_empty());
    }

    #[test]
    fn holes_cover_whole_blocks_only() {
        let holes = Holes(vec![(0, 8192), (65536, 65536)]);
        assert!(holes.covers(0, 4096));
        assert!(holes.covers(4096, 8192));
        assert!(!holes.covers(4096, 12288));
        assert!(holes.covers(65536, 131072));
        assert!(!holes.covers(8192, 12288));
        assert!(!holes.covers(131072, 135168));
    }

    #[test]
    fn backoff_pauses_while_the_dirty_set_grows_fast_but_never_for_good() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Backoff::new(32 << 20);
        assert_eq!(b.sample(at(0), 0), None, "the first sample has nothing to compare with");
        assert_eq!(b.sample(at(1), 16 << 20), None, "16 MiB/s is under the threshold");
        assert_eq!(b.sample(at(2), 80 << 20), Some(64 << 20));
        // Shrinking (not during a resync, but a cut elsewhere) is not growth.
        assert_eq!(b.sample(at(3), 0), None);
        // Pausing for 10 s in a row, then 2 s of reads regardless, then pausing again.
        let mut dirty = 0;
        let mut paused = Vec::new();
        for s in 4..20 {
            dirty += 100 << 20;
            paused.push(b.sample(at(s), dirty).is_some());
        }
        assert_eq!(paused[..10], [true; 10]);
        assert_eq!(paused[10..], [false, false, true, true, true, true]);
    }

    #[test]
    fn bucket_limits_the_rate() {
        let b = Bucket::new(8 << 20);
        let start = Instant::now();
        // The first second's worth is a burst; the next 4 MiB take about half a second.
        b.take(8 << 20);
        b.take(2 << 20);
        b.take(2 << 20);
        let t = start.elapsed();
        assert!(t >= Duration::from_millis(450) && t < Duration::from_secs(3), "{t:?}");
    }
}
