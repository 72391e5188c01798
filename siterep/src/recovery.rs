//! Recovery-site commands on a store: `siterep points`, `siterep restore`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use server::{PointSel, Store};

/// A point: its id, or `latest`.
pub fn parse_point(s: &str) -> Result<PointSel, String> {
    if s == "latest" {
        return Ok(PointSel::Latest);
    }
    s.parse().map(PointSel::Id).map_err(|_| format!("invalid point {s:?}: a number or \"latest\""))
}

#[derive(Args, Debug)]
pub struct PointsArgs {
    #[command(subcommand)]
    action: Option<PointsAction>,
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR", global = true)]
    store: Option<PathBuf>,
    /// The disk.
    #[arg(long, global = true)]
    disk: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PointsAction {
    /// List the disk's recovery points (the default).
    List,
    /// Tag a point (e.g. `tested` after a test failover passed); tagged points are kept.
    Tag {
        #[arg(long)]
        point: u64,
        tag: String,
    },
}

fn open_store(store: &Option<PathBuf>) -> Result<Store> {
    let dir = store.as_ref().context("--store DIR is required")?;
    Store::open_reader(dir).with_context(|| format!("opening store {}", dir.display()))
}

pub fn points(args: PointsArgs) -> Result<()> {
    let store = open_store(&args.store)?;
    let disk = args.disk.as_deref().context("--disk NAME is required")?;
    match args.action.unwrap_or(PointsAction::List) {
        PointsAction::List => {
            let points = store.points(disk)?;
            // When nothing was written since the latest point, the disk still equalled it at
            // this later time (docs/wire.md §6.9).
            let current = store.current_unix_ms(disk)?;
            if args.json {
                let mut list = serde_json::to_value(&points)?;
                if let (Some(last), Some(at)) = (list.as_array_mut().and_then(|l| l.last_mut()), current) {
                    last["current_unix_ms"] = at.into();
                }
                println!("{list}");
                return Ok(());
            }
            println!(
                "{:>6} {:>10} {:>14} {:>13} {:>14}  tags",
                "point", "generation", "cut (unix ms)", "consistency", "changed bytes"
            );
            for p in &points {
                let tags: Vec<String> = p.tags.iter().map(|(t, at)| format!("{t}@{at}")).collect();
                println!(
                    "{:>6} {:>10} {:>14} {:>13} {:>14}  {}",
                    p.id,
                    p.generation,
                    p.cut_unix_ms,
                    format!("{:?}", p.consistency).to_lowercase(),
                    p.changed_bytes,
                    tags.join(",")
                );
            }
            if let (Some(last), Some(at)) = (points.last(), current) {
                if at > last.cut_unix_ms {
                    println!(
                        "point {} still equals the disk as of {at} (unix ms): nothing was written since",
                        last.id
                    );
                }
            }
        }
        PointsAction::Tag { point, tag } => {
            store.tag(disk, point, &tag)?;
            println!("point {point} of {disk} tagged {tag}");
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The recovery site's store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    #[arg(long)]
    disk: String,
    /// The point to restore: its id or `latest`.
    #[arg(long, value_parser = parse_point)]
    point: PointSel,
    /// The image to write (sparse; replaced if it exists).
    #[arg(long, visible_alias = "out", value_name = "FILE")]
    output: PathBuf,
}

pub fn restore(args: RestoreArgs) -> Result<()> {
    let store =
        Store::open_reader(&args.store).with_context(|| format!("opening store {}", args.store.display()))?;
    let reader = store.open_point(&args.disk, args.point)?;
    let info = reader.info().clone();
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        indicatif::ProgressBar::new(reader.size())
    } else {
        indicatif::ProgressBar::hidden()
    };
    let report = reader
        .restore_to(&args.output, &mut |done, _total| bar.set_position(done))
        .with_context(|| format!("restoring to {}", args.output.display()))?;
    bar.finish_and_clear();
    println!(
        "{}",
        serde_json::json!({
            "disk": args.disk, "point": info.id, "generation": info.generation,
            "consistency": info.consistency, "output": args.output,
            "bytes_written": report.bytes_written, "bytes_zero": report.bytes_zero,
        })
    );
    Ok(())
}
