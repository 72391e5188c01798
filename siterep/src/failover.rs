//! Failover: `siterep quiesce` / `thaw` on the source (planned failover), and
//! `siterep failover` at the recovery site (materialize a point and serve it as the new primary).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use server::{PointSel, Store};
use tracker::control::{self, Request};
use tracker::{CutInfo, Status};

use crate::recovery::parse_point;
use crate::serve::ServeArgs;

#[derive(Args, Debug)]
pub struct QuiesceArgs {
    /// The source shim's NBD socket (its control socket is PATH.ctl).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// How long to wait for writes in flight, then for the agent's commit.
    #[arg(long, default_value = "5m", value_parser = agent::parse_duration)]
    timeout: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Planned failover on the source: flush, refuse new writes, cut a final generation, and wait
/// until the agent has committed it. Failover then uses exactly that point.
pub fn quiesce(args: QuiesceArgs) -> Result<()> {
    let path = control::control_path(&args.socket, args.control.as_deref());
    let cut: CutInfo =
        control::call_as(&path, &Request::Quiesce { timeout_ms: args.timeout.as_millis() as u64 })?;
    eprintln!(
        "writes refused; final generation {} ({} dirty bytes); waiting for the agent's commit",
        cut.generation, cut.dirty_bytes
    );
    let deadline = Instant::now() + args.timeout;
    loop {
        let st: Status = control::call_as(&path, &Request::Status)?;
        if let Some(p) = st.last_replicated.filter(|p| p.generation >= cut.generation) {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"generation": cut.generation, "point": p.point, "cut_unix_ms": p.cut_unix_ms})
                );
            } else {
                println!(
                    "quiesced: generation {} is recovery point {}; fail over to --point {}",
                    cut.generation, p.point, p.point
                );
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the agent has not committed generation {} within {:?} (writes stay refused; `siterep thaw` resumes them)", cut.generation, args.timeout);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Args, Debug)]
pub struct ThawArgs {
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

pub fn thaw(args: ThawArgs) -> Result<()> {
    let path = control::control_path(&args.socket, args.control.as_deref());
    control::call(&path, &Request::Thaw)?;
    println!("writes accepted again");
    Ok(())
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    #[arg(long)]
    disk: String,
    /// The point to fail over to: its id or `latest`.
    #[arg(long, value_parser = parse_point)]
    point: PointSel,
    /// Make the failover final: tag the point `failover` in the store (retention goes on as
    /// configured for the other points). Without --image, nothing else happens.
    #[arg(long)]
    commit: bool,
    /// Materialize the point into this new file and serve it as the new primary.
    #[arg(long, value_name = "OUT")]
    image: Option<PathBuf>,
    /// How the new primary is served (--socket, --state-dir, --attach, ...).
    #[command(flatten)]
    serve: ServeArgs,
}

/// Materializes the point (sparse, verified, with progress) and serves it as the new primary.
pub fn failover(args: FailoverArgs) -> Result<()> {
    let store =
        Store::open_reader(&args.store).with_context(|| format!("opening store {}", args.store.display()))?;
    let reader = store.open_point(&args.disk, args.point)?;
    let info = reader.info().clone();
    if args.commit {
        store.tag(&args.disk, info.id, "failover")?;
        println!("failover to point {} of {} is final (tagged `failover`)", info.id, args.disk);
    }
    let Some(image) = args.image else {
        if args.commit {
            return Ok(());
        }
        bail!("give --image OUT (and how to serve it: --socket ...), or --commit");
    };
    if image.exists() {
        bail!("{} exists; failover materializes into a new file", image.display());
    }
    let mut serve = args.serve;
    let start = Instant::now();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(reader.size())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = reader.restore_to(&image, &mut |done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    eprintln!(
        "materialized point {} (generation {}, {:?}) of {} into {}: {} bytes of data, {} zero, in {:.1} s",
        info.id,
        info.generation,
        info.consistency,
        args.disk,
        image.display(),
        report.bytes_written,
        report.bytes_zero,
        start.elapsed().as_secs_f64()
    );
    serve.materialized_from = Some(format!("point {} of disk {}", info.id, args.disk));
    crate::serve::run(image, serve)
}
