//! Arbitrary 28-byte request headers against arbitrary sessions: parsing and validation must
//! never panic, and whatever validates must stay within the export (`siterep_fuzz::check_request`).
//!
//! Input: 8 bytes of export size, a flags byte (read-only, structured, contexts, and "stamp the
//! request magic on every header" so validation is reached without guessing the magic), a
//! minimum-block-size selector, then headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_proto::consts::{REQUEST_LEN, REQUEST_MAGIC};
use nbd_proto::transmission::Session;
use siterep_fuzz::check_header;

/// Minimum block sizes to try: the ones exports use, plus degenerate ones.
const MIN_BLOCKS: [u32; 8] = [0, 1, 512, 4096, 65536, 3, 1 << 26, u32::MAX];

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let size = u64::from_be_bytes(data[..8].try_into().unwrap());
    let bits = data[8];
    let session = Session {
        size,
        read_only: bits & 1 != 0,
        structured: bits & 2 != 0,
        has_contexts: bits & 4 != 0,
        min_block: MIN_BLOCKS[usize::from(data[9]) % MIN_BLOCKS.len()],
    };
    let stamp = bits & 0x80 != 0;
    for chunk in data[10..].chunks_exact(REQUEST_LEN) {
        let mut hdr: [u8; REQUEST_LEN] = chunk.try_into().unwrap();
        if stamp {
            hdr[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let _ = check_header(&session, &hdr);
    }
});
