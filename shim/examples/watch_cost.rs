//! What the image watch costs a READ or WRITE: `Backend::check` (the one atomic load each pays),
//! against an `fstat` (what checking the file's size on every write would add) and a buffered
//! 4 KiB `pwrite` of a cached page (the write itself), each timed on one thread.
//!
//!     cargo run --release -p shim --example watch_cost [DIR]
//!
//! DIR holds the scratch image (default: the temp directory).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use shim::Backend;

const SIZE: u64 = 64 << 20;
const BLOCK: u64 = 4096;

/// Nanoseconds per call of `f(i)` over `n` calls.
fn per_call(n: u64, mut f: impl FnMut(u64)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let dir = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let file = tempfile::NamedTempFile::new_in(&dir).expect("create the scratch image");
    file.as_file().set_len(SIZE).expect("size the scratch image");
    let b = Backend::open(file.path(), false, false).expect("open the scratch image");
    let offset = |i: u64| (i.wrapping_mul(2654435761) % (SIZE / BLOCK)) * BLOCK;
    let buf = vec![0x5au8; BLOCK as usize];
    for i in 0..SIZE / BLOCK {
        b.write_at(&buf, i * BLOCK, false).expect("fill the image");
    }

    let check = per_call(50_000_000, |i| {
        black_box(b.check(black_box(offset(i)), BLOCK)).expect("in range");
    });
    let fstat = per_call(1_000_000, |_| {
        black_box(nix::sys::stat::fstat(b.raw_fd()).expect("fstat"));
    });
    let write = per_call(1_000_000, |i| b.write_at(&buf, offset(i), false).expect("write"));
    println!("Backend::check       {check:8.1} ns");
    println!("fstat                {fstat:8.1} ns");
    println!("4 KiB pwrite, cached {write:8.1} ns");
    println!(
        "per 4 KiB write: the check adds {:.2}%, an fstat would add {:.1}%",
        100.0 * check / write,
        100.0 * fstat / write
    );
}
