//! `siterep failback`: reverse replication after a failover. Copies to the original disk only
//! what differs — the blocks written on the failover side since promotion (its tracker knows
//! them) and the blocks the original wrote after the failover point (the original's tracker
//! still knows them) — through the original's own shim, so the copy is tracked and replication
//! resumes in the original direction with an ordinary incremental generation, no full copy.
//! Candidate blocks are read on both sides and only those that differ are written (4 KiB
//! compare granularity), so the bytes sent equal the bytes that differ.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use nbd_proto::client::Client;
use tracker::control::{self, Request};
use tracker::{CutInfo, Status};

#[derive(Args, Debug)]
pub struct FailbackArgs {
    /// The failover side's shim (the current primary), NBD socket.
    #[arg(long, value_name = "PATH")]
    from: PathBuf,
    /// The original disk's shim (restarted with its state directory), NBD socket.
    #[arg(long, value_name = "PATH")]
    to: PathBuf,
    /// Export names on the two shims.
    #[arg(long, default_value = "siterep")]
    export: String,
    /// Compare every block of the two disks, not only the blocks their trackers name (chosen
    /// automatically when either tracker reports resync-required). Needed when the failover
    /// used a point older than the original's newest committed one: the original's tracker
    /// no longer names the blocks of the generations after that point.
    #[arg(long)]
    compare_all: bool,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

/// Dirty extents (bit 0) of `context` on export `export` of the shim at `socket`.
fn dirty(socket: &std::path::Path, export: &str, context: &str) -> Result<Vec<(u64, u64)>> {
    let mut c = Client::connect_unix(socket, export, &[context])
        .with_context(|| format!("reading {context} from {}", socket.display()))?;
    let map = c.map(context)?;
    let _ = c.disconnect();
    Ok(map.into_iter().filter(|e| e.2 & 1 != 0).map(|(o, l, _)| (o, l)).collect())
}

/// Every block either shim's tracker holds as changed: live set and unreleased generations.
fn tracked(socket: &std::path::Path, export: &str) -> Result<Vec<(u64, u64)>> {
    let st: Status = control::call_as(&control::control_path(socket, None), &Request::Status)?;
    let mut out = dirty(socket, export, "qemu:dirty-bitmap:live")?;
    for g in &st.generations {
        let name = format!("gen-{}", g.id);
        out.extend(dirty(socket, &name, &format!("qemu:dirty-bitmap:{name}"))?);
    }
    Ok(out)
}

fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (o, l) in v {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => last.1 = last.1.max(o + l - last.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Compares in pieces of this size, and within a differing piece block by block.
const PIECE: u64 = 1 << 20;
const BLOCK: usize = 4096;

pub fn failback(args: FailbackArgs) -> Result<()> {
    let start = Instant::now();
    // The failover side stops taking writes: what it holds now is final.
    let from_ctl = control::control_path(&args.from, None);
    let cut: CutInfo = control::call_as(&from_ctl, &Request::Quiesce { timeout_ms: 60_000 })
        .context("quiescing the failover side")?;
    eprintln!("failover side quiesced (final generation {})", cut.generation);
    let mut src = Client::connect_unix(&args.from, &args.export, &[])?;
    let mut dst = Client::connect_unix(&args.to, &args.export, &[])?;
    if src.size() != dst.size() {
        bail!("the disks differ in size: {} vs {} bytes", src.size(), dst.size());
    }
    let size = src.size();
    // A tracker that lost its state cannot name what changed: compare everything instead.
    let mut compare_all = args.compare_all.then(|| "--compare-all".to_string());
    if compare_all.is_none() {
        for (side, socket) in [("failover side", &args.from), ("original", &args.to)] {
            let st: Status = control::call_as(&control::control_path(socket, None), &Request::Status)
                .with_context(|| format!("status of the {side}"))?;
            if let Some(why) = st.resync_required {
                eprintln!("the {side}'s tracking was lost ({why}): comparing every block instead");
                compare_all = Some(format!("the {side}'s tracking was lost: {why}"));
                break;
            }
        }
    }
    let ranges = if compare_all.is_some() {
        vec![(0, size)]
    } else {
        let mut all = tracked(&args.from, &args.export).context("the failover side's changes")?;
        all.extend(
            tracked(&args.to, &args.export).context("the original's changes since the failover point")?,
        );
        merge(all)
    };
    let candidates: u64 = ranges.iter().map(|r| r.1).sum();
    let (mut sent, mut zeroed, mut matched) = (0u64, 0u64, 0u64);
    let mut a = vec![0u8; PIECE as usize];
    let mut b = vec![0u8; PIECE as usize];
    for (o, l) in ranges {
        let mut pos = o;
        while pos < o + l {
            let n = (o + l - pos).min(PIECE) as usize;
            src.read(pos, &mut a[..n])?;
            dst.read(pos, &mut b[..n])?;
            // Runs of differing blocks are written; equal blocks are left alone.
            let mut i = 0;
            while i < n {
                let block = |i: usize| i..(i + BLOCK).min(n);
                if a[block(i)] == b[block(i)] {
                    matched += block(i).len() as u64;
                    i = block(i).end;
                    continue;
                }
                let run_start = i;
                while i < n && a[block(i)] != b[block(i)] {
                    i = block(i).end;
                }
                let run = &a[run_start..i];
                let at = pos + run_start as u64;
                if run.iter().all(|&x| x == 0) {
                    dst.write_zeroes(at, run.len() as u32)?;
                    zeroed += run.len() as u64;
                } else {
                    dst.write(at, run)?;
                    sent += run.len() as u64;
                }
            }
            pos += n as u64;
        }
    }
    dst.flush()?;
    let _ = src.disconnect();
    let _ = dst.disconnect();
    let report = serde_json::json!({
        "candidate_bytes": candidates, "bytes_sent": sent, "bytes_zeroed": zeroed, "bytes_matched": matched,
        "compared_all": compare_all, "duration_ms": start.elapsed().as_millis() as u64,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "failback copied {sent} bytes (+{zeroed} zeroed) of {candidates} candidate bytes in {:.1} s; the original now equals the failover disk",
            start.elapsed().as_secs_f64()
        );
        println!("next: move the application back to the original, keep its agent running (it ships these changes incrementally)");
    }
    Ok(())
}
