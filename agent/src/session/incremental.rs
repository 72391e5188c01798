//! The incremental path: wait for the interval, cut a generation (around the freeze hooks when
//! an app-consistent point is due), ship what it changed on the latest point, commit, release;
//! or, when nothing was written, record on the server that the latest point is still current
//! (`docs/wire.md` §6.3, §6.6, §6.9).

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbd_proto::client::Client;
use tracker::control::Request;
use tracker::{CutInfo, ReplicatedPoint};
use wire::{Consistency, Frame, GenerationKind, PointRef};

use super::{now_ms, summary, Session};
use crate::config::Summary;
use crate::error::AgentError;
use crate::ship::{plan_chunks, ship_chunks, GenerationDigest, Stats};

/// Sleeps until an interval has passed since the last cut, the backlog exceeds the threshold, or
/// an app-consistent point is due.
pub(crate) fn wait_for_cycle(s: &Session<'_>) -> Result<(), AgentError> {
    let cfg = s.cfg;
    if cfg.once {
        return Ok(());
    }
    let start = s.memory.last_cut.unwrap_or_else(Instant::now);
    loop {
        if start.elapsed() >= cfg.interval {
            return Ok(());
        }
        if let Some(app) = &cfg.app {
            if s.memory.last_app.elapsed() >= app.every {
                return Ok(());
            }
        }
        let st = s.status()?;
        if st.live_dirty_bytes >= cfg.backlog_threshold {
            tracing::info!(backlog = st.live_dirty_bytes, "backlog over the threshold: cutting early");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200).min(cfg.interval));
    }
}

/// When nothing was written since the `latest` point and no app-consistent point is due, records
/// on the server that the latest point still equals the disk, instead of cutting an empty
/// generation (`docs/wire.md` §6.9). `None`: something changed, cut.
pub(crate) fn unchanged(s: &mut Session<'_>, latest: &PointRef) -> Result<Option<Summary>, AgentError> {
    if s.cfg.app.as_ref().is_some_and(|a| s.memory.last_app.elapsed() >= a.every) {
        return Ok(None);
    }
    // Taken before the status: a write acknowledged before this time was marked in the live
    // set before it (invariant 1), so an empty set and no generation prove the latest point
    // equals the disk as of it.
    let as_of = now_ms();
    let st = s.status()?;
    if st.live_dirty_bytes != 0 || !st.generations.is_empty() || st.quiesced {
        return Ok(None);
    }
    let start = Instant::now();
    s.memory.last_cut = Some(start);
    s.link.current(latest.point, as_of)?;
    s.cfg.metrics.last_cut_unix_ms.store(as_of, Ordering::Relaxed);
    let p = ReplicatedPoint {
        point: latest.point,
        generation: latest.generation,
        cut_unix_ms: as_of,
        committed_unix_ms: now_ms(),
    };
    s.control::<serde_json::Value>(&Request::Replicated { point: p })?;
    tracing::debug!(point = latest.point, as_of, "nothing written: the latest point is current");
    let mut summary = summary(
        "unchanged",
        latest.generation,
        latest.point,
        Consistency::Crash,
        &Stats::default(),
        start,
        &s.cfg.metrics,
    );
    summary.consistency = "unchanged";
    Ok(Some(summary))
}

/// Cuts a generation, around the freeze hooks when an app-consistent point is due.
pub(crate) fn cut(s: &mut Session<'_>) -> Result<CutInfo, AgentError> {
    s.memory.last_cut = Some(Instant::now());
    let due = s.cfg.app.as_ref().filter(|a| s.memory.last_app.elapsed() >= a.every).cloned();
    let Some(app) = due else { return s.control(&Request::Cut) };
    s.memory.last_app = Instant::now();
    let frozen = match &app.pre_hook {
        Some(cmd) => run_hook("pre-hook", cmd, app.hook_timeout),
        None => Ok(()),
    };
    let cut = s.control::<CutInfo>(&Request::Cut);
    // The post-hook always runs: a frozen filesystem is never left behind.
    let thawed = match &app.post_hook {
        Some(cmd) => run_hook("post-hook", cmd, app.hook_timeout).or_else(|e| {
            tracing::warn!("{e}; running the post-hook again");
            run_hook("post-hook", cmd, app.hook_timeout)
        }),
        None => Ok(()),
    };
    let cut = cut?;
    match (frozen, thawed) {
        (Ok(()), Ok(())) => s.memory.consistency.push((cut.generation, Consistency::App)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("{e}: generation {} is a crash-consistent point", cut.generation)
        }
    }
    Ok(cut)
}

/// Ships the shim's generation `id` on the `latest` point: its zeroed extents as `Zero`, its
/// data as chunks, then commits it with its digest, releases it on the shim and reports the
/// point.
pub(crate) fn ship_generation(
    s: &mut Session<'_>,
    id: u64,
    latest: &PointRef,
) -> Result<Summary, AgentError> {
    let cfg = s.cfg;
    let start = Instant::now();
    let status = s.status()?;
    let gen = status
        .generations
        .iter()
        .find(|g| g.id == id)
        .cloned()
        .ok_or_else(|| AgentError::Protocol(format!("generation {id} vanished from the shim")))?;
    let consistency = if gen.inconsistent.is_some() {
        Consistency::Inconsistent
    } else {
        s.memory.consistency.iter().find(|(g, _)| *g == id).map(|(_, c)| *c).unwrap_or(Consistency::Crash)
    };
    let export = format!("gen-{id}");
    let context = format!("siterep:changes:{export}");
    let mut client = Client::connect_unix(&cfg.socket, &export, &[&context])?;
    let map = client.map(&context)?;
    let _ = client.disconnect();
    let mut stats = Stats::default();
    let mut digest = GenerationDigest::default();
    s.link.send(&Frame::BeginGeneration {
        disk: cfg.disk.clone(),
        generation: id,
        kind: GenerationKind::Incremental,
        base_point: Some(latest.point),
    })?;
    let mut data = Vec::new();
    for &(off, len, flags) in &map {
        match flags & 3 {
            0 => {}
            3 => {
                stats.bytes_zero += len;
                digest.zero(off, len);
                s.link.queue(&Frame::Zero { offset: off, len })?;
            }
            _ => data.push((off, len)),
        }
    }
    let chunks = plan_chunks(&data, status.size);
    ship_chunks(
        &mut s.link,
        &cfg.socket,
        &export,
        &chunks,
        cfg.readers,
        cfg.zstd_level,
        &s.memory.known,
        &mut stats,
        Some(&mut digest),
        &mut |_| {},
    )?;
    let shipped = start.elapsed();
    let point = s.link.commit(id, gen.cut_unix_ms, consistency, Some(digest.finish()))?;
    let committed = start.elapsed();
    s.control::<serde_json::Value>(&Request::Release { generation: id })?;
    s.memory.consistency.retain(|(g, _)| *g != id);
    s.report(point, id, gen.cut_unix_ms)?;
    let summary = summary("incremental", id, point, consistency, &stats, start, &cfg.metrics);
    tracing::info!(
        generation = id,
        point,
        read = summary.bytes_read,
        sent = summary.bytes_sent,
        dedup = summary.bytes_deduplicated,
        zero = summary.bytes_zero,
        ship_ms = shipped.as_millis() as u64,
        commit_ms = (committed - shipped).as_millis() as u64,
        release_ms = (start.elapsed() - committed).as_millis() as u64,
        "committed"
    );
    Ok(summary)
}

/// Runs a hook with `sh -c`, killing it after `timeout`.
fn run_hook(what: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{what} {cmd:?} could not start: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("{what} {cmd:?} failed ({st})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} {cmd:?} timed out after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{what} {cmd:?}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_report_failure_and_timeout() {
        assert!(run_hook("pre-hook", "true", Duration::from_secs(5)).is_ok());
        assert!(run_hook("pre-hook", "exit 3", Duration::from_secs(5)).unwrap_err().contains("failed"));
        assert!(run_hook("pre-hook", "sleep 5", Duration::from_millis(100))
            .unwrap_err()
            .contains("timed out"));
    }
}
