//! The initial copy: the whole disk (its allocated ranges; holes read as zeroes on the replica)
//! as an `InitialFull` generation on no base, in slices made durable with `Progress` as it goes,
//! so an interrupted copy resumes from the server's checkpoint (`docs/wire.md` §6.5).

use std::sync::atomic::Ordering;
use std::time::Instant;

use nbd_proto::client::Client;
use tracker::control::Request;
use tracker::CutInfo;
use wire::{Consistency, Frame, GenerationKind, InitialSync};

use super::{now_ms, progress_bar, summary, Session};
use crate::config::Summary;
use crate::error::AgentError;
use crate::ship::{plan_chunks, ship_chunks, Stats, MAX_CHUNK};

/// Initial copy: progress is made durable on the server at least this often.
const PROGRESS_EVERY: u64 = 256 << 20;

/// Copies the whole disk (its allocated ranges) while tracking goes on; resumes `resume` when
/// the server holds a checkpoint of an interrupted copy.
pub(crate) fn initial_copy(s: &mut Session<'_>, resume: Option<InitialSync>) -> Result<Summary, AgentError> {
    let cfg = s.cfg;
    let start_time = Instant::now();
    let (generation, cut_ms, from) = match resume {
        Some(i) => {
            tracing::info!(
                generation = i.generation,
                next_offset = i.next_offset,
                "resuming the initial copy"
            );
            (i.generation, now_ms(), i.next_offset)
        }
        None => {
            // Everything written from here on is tracked in the live set and reaches the
            // replica with the first incremental generation; the cut's own set is covered by
            // the full copy.
            let cut: CutInfo = s.control(&Request::Cut)?;
            s.control::<serde_json::Value>(&Request::Release { generation: cut.generation })?;
            (cut.generation, cut.cut_unix_ms, 0)
        }
    };
    s.link.send(&Frame::BeginGeneration {
        disk: cfg.disk.clone(),
        generation,
        kind: GenerationKind::InitialFull,
        base_point: None,
    })?;
    let mut client = Client::connect_unix(&cfg.socket, &cfg.export, &["base:allocation"])?;
    let size = client.size();
    let alloc = client.map("base:allocation")?;
    let _ = client.disconnect();
    // Holes read as zeroes on the replica: only allocated ranges are copied.
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|(_, _, f)| f & 1 == 0)
        .filter_map(|&(o, l, _)| {
            let s = o.max(from);
            (s < o + l).then(|| (s, o + l - s))
        })
        .collect();
    let total: u64 = data.iter().map(|d| d.1).sum();
    let bar = progress_bar(cfg.progress, total, "initial copy", "");
    let mut stats = Stats::default();
    // Ship in slices so progress is made durable as the copy advances.
    let mut slice_start = from;
    while slice_start < size {
        let slice_end = (slice_start + PROGRESS_EVERY).min(size);
        let part: Vec<(u64, u64)> = data
            .iter()
            .filter_map(|&(o, l)| {
                let s = o.max(slice_start);
                let e = (o + l).min(slice_end);
                (s < e).then(|| (s, e - s))
            })
            .collect();
        // Whole MAX_CHUNK pieces, without merging across gaps: holes stay holes.
        let chunks: Vec<(u64, u64)> = part.iter().flat_map(|&(o, l)| plan_chunks(&[(o, l)], size)).collect();
        debug_assert!(chunks.iter().all(|c| c.1 <= MAX_CHUNK));
        ship_chunks(
            &mut s.link,
            &cfg.socket,
            &cfg.export,
            &chunks,
            cfg.readers,
            cfg.zstd_level,
            &s.memory.known,
            &mut stats,
            None,
            &mut |n| bar.inc(n),
        )?;
        s.link.progress(slice_end)?;
        cfg.metrics.progress_total.fetch_add(1, Ordering::Relaxed);
        slice_start = slice_end;
    }
    bar.finish_and_clear();
    let point = s.link.commit(generation, cut_ms, Consistency::Inconsistent, None)?;
    // The replica now holds the whole disk (fuzzy); the live set covers what changed since.
    s.control::<serde_json::Value>(&Request::ClearResync)?;
    s.report(point, generation, cut_ms)?;
    let summary =
        summary("initial", generation, point, Consistency::Inconsistent, &stats, start_time, &cfg.metrics);
    tracing::info!(point, read = summary.bytes_read, sent = summary.bytes_sent, "initial copy committed");
    Ok(summary)
}
