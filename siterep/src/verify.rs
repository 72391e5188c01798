//! `siterep verify`: checks every root, map page and chunk the selected points of a store name,
//! and reports what is damaged with the points and disk ranges that depend on it.

use std::path::PathBuf;

use clap::Args;
use server::{Store, VerifyOptions};

use crate::size::parse_size;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The recovery site's store directory (opened as a reader: a running server goes on).
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// Only this point of --disk.
    #[arg(long, requires = "disk")]
    point: Option<u64>,
    /// Most bytes per second to read from the store (default: unlimited).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_size)]
    rate: Option<u64>,
    /// Print the report as JSON (its shape: docs/store.md, "Verify and scrub").
    #[arg(long)]
    json: bool,
}

/// Runs the verification; the exit code: 0 nothing damaged, 1 damage found, 2 the store could
/// not be opened or read.
pub fn verify(args: VerifyArgs) -> i32 {
    if args.rate == Some(0) {
        eprintln!("siterep verify: --rate must be above 0");
        return 2;
    }
    let store = match Store::open_reader(&args.store) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("siterep verify: opening store {}: {e}", args.store.display());
            return 2;
        }
    };
    let options =
        VerifyOptions { disk: args.disk, point: args.point, rate: args.rate, ..VerifyOptions::default() };
    let report = match store.verify(&options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("siterep verify: {e}");
            return 2;
        }
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("a report serializes"));
    } else {
        print!("{}", report.human());
    }
    i32::from(!report.damaged.is_empty())
}
