//! `siterep`: continuous block-level replication and disaster recovery for Linux.
//!
//! One binary, one subcommand per role. This file only parses the command line and wires the
//! crates together; the work lives in the library crates (`shim`, `nbd-proto`, `tracker`,
//! `agent`, `wire`, `server`).
#![forbid(unsafe_code)]

mod certs;
mod export;
mod failback;
mod failover;
mod metrics;
mod recovery;
mod replicate;
mod serve;
mod size;
mod status;
mod verify;

use std::io::IsTerminal;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "siterep", version, about = "Continuous block-level replication and disaster recovery")]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. "info" or "shim=debug".
    #[arg(long, global = true, default_value = "info", env = "SITEREP_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a disk image or block device over NBD, tracking every change (the tracking shim).
    Serve(serve::ServeCmd),
    /// Freeze the current dirty set as a new generation (served as export `gen-N`).
    Cut(status::ControlArgs),
    /// Drop generation N and free its preserved pre-images.
    Release {
        /// The generation to release.
        generation: u64,
        #[command(flatten)]
        control: status::ControlArgs,
    },
    /// Show generations, dirty bytes, preserve usage, the over-report bound and resync state.
    Status(status::ControlArgs),
    /// Replicate a protected disk's generations to a recovery server (the mobility service).
    Agent(replicate::AgentArgs),
    /// Receive replicated disks and keep their recovery points (process server + master target).
    Server(replicate::ServerArgs),
    /// List or tag a disk's recovery points in a store.
    Points(recovery::PointsArgs),
    /// Restore a recovery point to an image file (sparse, hash-verified).
    Restore(recovery::RestoreArgs),
    /// Check every object the store's points name; report (and quarantine) what is damaged.
    /// Exit status: 0 intact, 1 damage found, 2 the store cannot be opened or read.
    Verify(verify::VerifyArgs),
    /// Certificates for mutual TLS between agents and the server.
    Certs(certs::CertsArgs),
    /// Planned failover, on the source: flush, refuse writes, cut, wait for the commit.
    Quiesce(failover::QuiesceArgs),
    /// Accept writes again after quiesce.
    Thaw(failover::ThawArgs),
    /// Fail over to a recovery point: materialize it and serve it as the new primary.
    Failover(failover::FailoverArgs),
    /// Serve a recovery point over NBD at once (read-only, or --writable with a discarded overlay).
    Export(export::ExportArgs),
    /// After a failover: copy back to the original disk only what differs.
    Failback(failback::FailbackArgs),
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| {
        eprintln!("siterep: invalid --log filter {:?}", cli.log);
        std::process::exit(2);
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Serve(s) => serve::run(s.image, s.args),
        Command::Cut(c) => status::cut(&c),
        Command::Release { generation, control } => status::release(&control, generation),
        Command::Status(c) => status::status(&c),
        Command::Agent(a) => replicate::agent(a),
        Command::Server(a) => replicate::server(a),
        Command::Points(a) => recovery::points(a),
        Command::Restore(a) => recovery::restore(a),
        Command::Verify(a) => std::process::exit(verify::verify(a)),
        Command::Certs(a) => certs::certs(a),
        Command::Quiesce(a) => failover::quiesce(a),
        Command::Thaw(a) => failover::thaw(a),
        Command::Failover(a) => failover::failover(a),
        Command::Export(a) => export::export(a),
        Command::Failback(a) => failback::failback(a),
    };
    if let Err(e) = result {
        eprintln!("siterep: {}", agent::run::chain(e.as_ref()));
        std::process::exit(1);
    }
}
