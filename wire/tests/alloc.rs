//! Invariant 4 of `docs/architecture.md` for the decoder (`docs/wire.md` §2, §3): whatever bytes it is fed,
//! and however they are cut, no single allocation exceeds `MAX_FRAME`, and a declared length
//! that is refused costs nothing.
//!
//! A counting global allocator records the largest allocation each thread makes while armed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use wire::{Decoder, Frame, MAX_CHUNK, MAX_COMPRESSED, MAX_FRAME};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while the thread is exiting.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are ours; `note` only reads a size and writes a thread-local `Cell` (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`; the caller
        // upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Feeds `pieces` in order, draining frames after each, until the first error; returns the
/// largest allocation made meanwhile.
fn largest_allocation(pieces: &[Vec<u8>]) -> usize {
    LARGEST.with(|l| l.set(0));
    let mut d = Decoder::new();
    'feed: for p in pieces {
        d.feed(p);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => drop(f),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    drop(d);
    LARGEST.with(|l| l.get())
}

/// A frame header: any length (often huge, sometimes right at a limit), any type byte.
fn header() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        any::<u32>(),
        0u32..64,
        Just(MAX_FRAME),
        Just(MAX_FRAME + 1),
        (MAX_FRAME - 64)..=MAX_FRAME,
        40_000u32..40_000_000
    ];
    (len, 0u8..=16).prop_map(|(len, ty)| {
        let mut b = len.to_be_bytes().to_vec();
        b.push(ty);
        b
    })
}

/// A chunk frame's prefix with any declared lengths: its frame length consistent with its
/// payload length or not.
fn chunk_prefix() -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![any::<u32>(), Just(MAX_CHUNK), Just(0u32), Just(MAX_CHUNK + 1)];
    let data_len = prop_oneof![any::<u32>(), Just(MAX_COMPRESSED), (0..=MAX_COMPRESSED)];
    let frame_len = prop_oneof![Just(None), Just(Some(MAX_FRAME)), (0..=MAX_FRAME).prop_map(Some)];
    (len, 0u8..=2, data_len, frame_len).prop_map(|(len, tag, data_len, frame_len)| {
        let mut b = frame_len.unwrap_or(data_len.saturating_add(50)).to_be_bytes().to_vec();
        b.push(6);
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[0; 32]);
        b.push(tag);
        b.extend_from_slice(&data_len.to_be_bytes());
        b
    })
}

/// A stream of arbitrary pieces, headers and chunk prefixes, cut anywhere.
fn stream() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let piece = prop_oneof![proptest::collection::vec(any::<u8>(), 0..200), header(), chunk_prefix()];
    (proptest::collection::vec(piece, 1..10), proptest::collection::vec(any::<usize>(), 0..10)).prop_map(
        |(pieces, cuts)| {
            let bytes = pieces.concat();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let mut from = 0;
            cuts.into_iter()
                .map(|to| {
                    let p = bytes[from..to].to_vec();
                    from = to;
                    p
                })
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_any_split_never_allocate_beyond_max_frame(pieces in stream()) {
        let largest = largest_allocation(&pieces);
        prop_assert!(largest <= MAX_FRAME as usize, "allocated {largest} bytes");
    }
}

#[test]
fn refused_lengths_cost_nothing() {
    for len in [MAX_FRAME + 1, u32::MAX, 1 << 30] {
        let mut b = len.to_be_bytes().to_vec();
        b.push(6);
        assert!(largest_allocation(&[b]) < 4096, "declared {len}");
    }
    // A Hello claiming 5 MiB is refused from its type: no frame of that type is so long.
    let mut b = MAX_FRAME.to_be_bytes().to_vec();
    b.push(1);
    b.extend_from_slice(&[0; 100]);
    assert!(largest_allocation(&[b]) < 4096);
}

#[test]
fn a_chunk_payload_is_allocated_once_at_its_checked_length() {
    let f = Frame::Chunk {
        offset: 0,
        len: MAX_CHUNK,
        hash: [1; 32],
        data: wire::ChunkData::Compressed(vec![7; MAX_COMPRESSED as usize]),
    };
    let mut bytes = Vec::new();
    f.encode(&mut bytes);
    let pieces: Vec<Vec<u8>> = bytes.chunks(64 << 10).map(<[u8]>::to_vec).collect();
    drop(bytes);
    let largest = largest_allocation(&pieces);
    assert_eq!(largest, MAX_COMPRESSED as usize);
}
