//! `siterep cut | release N | status`: clients of a running shim's control socket.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tracker::control::{self, Request};
use tracker::{CutInfo, Status};

#[derive(Args, Debug)]
pub struct ControlArgs {
    /// The shim's NBD socket (its control socket is PATH.ctl).
    #[arg(long, value_name = "PATH", required_unless_present = "control")]
    socket: Option<PathBuf>,
    /// The control socket, if the shim was started with `--control`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

impl ControlArgs {
    fn path(&self) -> PathBuf {
        match &self.socket {
            Some(s) => control::control_path(s, self.control.as_deref()),
            None => self.control.clone().expect("clap requires one of them"),
        }
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

pub fn cut(args: &ControlArgs) -> Result<()> {
    let v = control::call(&args.path(), &Request::Cut)?;
    if args.json {
        println!("{v}");
    } else {
        let c: CutInfo = serde_json::from_value(v)?;
        println!(
            "generation {}: {} dirty bytes ({} as zero extents), export gen-{}",
            c.generation, c.dirty_bytes, c.zero_bytes, c.generation
        );
    }
    Ok(())
}

pub fn release(args: &ControlArgs, generation: u64) -> Result<()> {
    let v = control::call(&args.path(), &Request::Release { generation })?;
    if args.json {
        println!("{v}");
    } else {
        println!("released generation {generation}");
    }
    Ok(())
}

pub fn status(args: &ControlArgs) -> Result<()> {
    let v = control::call(&args.path(), &Request::Status)?;
    if args.json {
        println!("{v}");
        return Ok(());
    }
    let s: Status = serde_json::from_value(v)?;
    println!("disk:              {} bytes, tracked at {} B granularity", s.size, s.granularity);
    println!(
        "live dirty:        {} bytes ({}; {} as zero extents)",
        s.live_dirty_bytes,
        mib(s.live_dirty_bytes),
        s.live_zero_bytes
    );
    println!("preserve store:    {} of {} used", mib(s.preserve_used_bytes), mib(s.preserve_limit_bytes));
    println!(
        "persistent:        {}",
        if s.persistent {
            format!("yes (crash over-report at most {})", mib(s.over_report_bound_bytes))
        } else {
            "no".into()
        }
    );
    println!("resync required:   {}", s.resync_required.as_deref().unwrap_or("no"));
    match &s.image_changed {
        Some(c) => println!("IMAGE CHANGED:     {c}"),
        None => println!("image changed:     no"),
    }
    println!("next generation:   {}", s.next_generation);
    println!("backlog:           {} bytes ({})", s.backlog_bytes, mib(s.backlog_bytes));
    match (&s.last_replicated, s.rpo_ms) {
        (Some(p), Some(rpo)) => println!(
            "last point:        {} (generation {}), RPO {:.1} s",
            p.point,
            p.generation,
            rpo as f64 / 1000.0
        ),
        _ => println!("last point:        none reported since the shim started"),
    }
    if s.generations.is_empty() {
        println!("generations:       none unreleased");
    } else {
        println!("generations:");
        for g in &s.generations {
            println!(
                "  gen-{:<6} cut {} ms  dirty {:>14} bytes  zero {:>14}  preserved {:>12}  {}",
                g.id,
                g.cut_unix_ms,
                g.dirty_bytes,
                g.zero_bytes,
                g.preserved_bytes,
                g.inconsistent
                    .as_deref()
                    .map(|r| format!("INCONSISTENT: {r}"))
                    .unwrap_or_else(|| "point-in-time".into())
            );
        }
    }
    Ok(())
}
