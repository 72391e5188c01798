//! What tracking adds to one write: the time of `Tracker::begin_write` + `end_write`, the work
//! the shim does for a WRITE on its connection's thread before the reply, that `--no-track`
//! skips. `scripts/bench-nbd` runs this and turns it into a bound on the throughput that
//! tracking can cost.
//!
//! Usage: track_cost [SIZE_MIB] [OPS]   (defaults: 1024 MiB disk, 2,000,000 writes per case)
//!
//! Prints one line per case: `case <name> threads <n> len <bytes> ns_per_write <ns>`.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use tracker::{DirMedia, ImageRead, Options, Tracker};

/// The disk as the tracker reads it for pre-images; never read here (no generation is cut).
struct Zeroes;

impl ImageRead for Zeroes {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

fn open(size: u64, state: Option<&std::path::Path>) -> Arc<Tracker> {
    let preserve = tempfile::tempfile().expect("a temporary preserve file");
    let media = state.map(|d| Box::new(DirMedia::open(d).expect("the state directory")) as _);
    let (t, _) =
        Tracker::open(size, &Options::default(), Arc::new(Zeroes), media, preserve).expect("a tracker");
    t
}

/// Runs `ops` writes of `len` bytes on each of `threads` threads at once, random (4 KiB aligned)
/// or sequential, and returns the mean nanoseconds one thread spent per write.
fn run(t: &Arc<Tracker>, size: u64, threads: usize, len: u64, random: bool, ops: u64) -> f64 {
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                // Fibonacci hashing of the write's number: scattered, the same every run.
                let mut hash = (i as u64 + 1) << 40;
                let slots = size / len;
                let mut seq = i as u64 * (slots / threads as u64);
                let start = Instant::now();
                for _ in 0..ops {
                    let offset = if random {
                        hash = hash.wrapping_add(0x9e37_79b9_7f4a_7c15);
                        ((hash >> 20) % (size / 4096)) * 4096 % (size - len + 1)
                    } else {
                        seq = (seq + 1) % slots;
                        seq * len
                    };
                    let ticket = t.begin_write(offset, len).expect("not quiesced");
                    t.end_write(ticket, offset, len, false);
                }
                start.elapsed().as_nanos() as f64 / ops as f64
            })
        })
        .collect();
    let per: Vec<f64> = handles.into_iter().map(|h| h.join().expect("a writer")).collect();
    per.iter().sum::<f64>() / per.len() as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: track_cost [SIZE_MIB] [OPS]";
    let size_mib: u64 = args.next().map(|s| s.parse().expect(usage)).unwrap_or(1024);
    let ops: u64 = args.next().map(|s| s.parse().expect(usage)).unwrap_or(2_000_000);
    let size = size_mib << 20;
    let cases: [(&str, bool, usize, u64, bool); 5] = [
        ("memory-4k-random", false, 1, 4096, true),
        ("memory-4k-random-2conn", false, 2, 4096, true),
        ("memory-1m-sequential", false, 1, 1 << 20, false),
        ("state-dir-4k-random", true, 1, 4096, true),
        ("state-dir-1m-sequential", true, 1, 1 << 20, false),
    ];
    for (name, persist, threads, len, random) in cases {
        // A fresh tracker (and state directory) per case, as each benchmark run starts a fresh
        // shim: the first write to each block and, with a state directory, to each
        // activity-log region (which syncs the log) are part of the mean.
        let state = tempfile::tempdir().expect("a temporary state directory");
        let t = open(size, persist.then_some(state.path()));
        let ns = run(&t, size, threads, len, random, ops);
        println!("case {name} threads {threads} len {len} ns_per_write {ns:.1}");
    }
}
