//! Disk images for the tests: sparse files, deterministic pseudo-random contents, and the
//! data/hole layout the filesystem reports for them.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::sys;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// A small deterministic generator (xorshift64*), so a failing run can be reproduced exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        buf
    }
}

/// Creates (or truncates) `path` as a sparse file of `size` bytes: all hole.
pub fn create_sparse(path: &Path, size: u64) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.set_len(size).unwrap_or_else(|e| panic!("set_len {}: {e}", path.display()));
    file
}

/// Writes `data` at `offset` of the existing file `path` and syncs it.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file =
        OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all_at(data, offset).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    file.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
}

/// A sparse image of `size` bytes with pseudo-random data in each of `data_ranges`
/// (`(offset, length)`), hole everywhere else. Returns the full expected contents.
pub fn create_with_data(path: &Path, size: u64, data_ranges: &[(u64, u64)], seed: u64) -> Vec<u8> {
    let file = create_sparse(path, size);
    let mut contents = vec![0u8; usize::try_from(size).expect("image fits in memory")];
    let mut rng = Rng::new(seed);
    for &(offset, len) in data_ranges {
        let range = offset as usize..(offset + len) as usize;
        rng.fill(&mut contents[range.clone()]);
        file.write_all_at(&contents[range], offset)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    file.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    contents
}

/// A fully allocated image of `size` bytes of pseudo-random data. Returns its contents.
pub fn create_random(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    create_with_data(path, size, &[(0, size)], seed)
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Asserts two images are byte-identical, naming the first differing offset (never dumping
/// megabytes into the failure message).
#[track_caller]
pub fn assert_same_bytes(what: &str, actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(first) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let last = actual.iter().zip(expected).rposition(|(a, b)| a != b).unwrap_or(first);
        let show = |b: &[u8]| b[first..(first + 16).min(b.len())].to_vec();
        panic!(
            "{what}: bytes differ from offset {first} to {last} (inclusive); at {first}: actual {:02x?}, \
             expected {:02x?}",
            show(actual),
            show(expected)
        );
    }
}

/// One run of the file's layout as `SEEK_DATA`/`SEEK_HOLE` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub length: u64,
    pub data: bool,
}

/// The data/hole layout of `path` from `SEEK_DATA`/`SEEK_HOLE`, covering the whole file.
pub fn seek_layout(path: &Path) -> Vec<Run> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = file.metadata().expect("metadata").len();
    let mut runs = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = sys::seek_data(&file, pos).expect("SEEK_DATA").unwrap_or(size).min(size);
        if data > pos {
            runs.push(Run { offset: pos, length: data - pos, data: false });
        }
        if data >= size {
            break;
        }
        let hole = sys::seek_hole(&file, data).expect("SEEK_HOLE").unwrap_or(size).min(size);
        runs.push(Run { offset: data, length: hole - data, data: true });
        pos = hole;
    }
    runs
}
