//! A byte stream into frames (`docs/wire.md` §2): fed in pieces of any size, checked before
//! anything is allocated, a chunk's payload copied once.

use std::collections::VecDeque;

use crate::error::WireError;
use crate::frame::{max_frame_len, type_name, ChunkData, ChunkHead, Frame, LEN_FIELD, T_CHUNK};
use crate::MAX_FRAME;

/// Bytes of a frame up to and including its type byte.
const TYPE_END: usize = LEN_FIELD + 1;
/// Bytes of a chunk frame up to and including its data tag.
const CHUNK_HEAD_END: usize = TYPE_END + ChunkHead::BYTES;
/// Bytes of a compressed chunk frame before its payload.
const CHUNK_PREFIX: usize = CHUNK_HEAD_END + 4;
/// A buffer larger than this is shrunk back when it empties.
const KEEP_CAPACITY: usize = 256 << 10;

/// Turns the bytes a peer sends into [`Frame`]s (§2).
///
/// [`Decoder::feed`] takes bytes as they arrive; [`Decoder::next_frame`] returns the frames they
/// complete, in order. A frame's length is checked against [`MAX_FRAME`] and against the
/// largest valid frame of its type as soon as its first five bytes are in, so nothing is ever
/// buffered or allocated for a length that has not passed; a compressed chunk's payload goes
/// straight from the fed bytes into the `Vec` the frame carries, never through the buffer.
///
/// The first error is final: the peer broke the protocol and the connection must be closed;
/// `next_frame` returns that error again, and `feed` ignores further bytes.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Fed bytes, except the payloads of detached chunks.
    buf: Vec<u8>,
    /// Start of the first frame `next_frame` has not returned.
    pos: usize,
    /// Start of the first frame `feed` has not routed yet; frames in `pos..scan` are whole in
    /// `buf`, or the prefix of a detached chunk.
    scan: usize,
    /// The frame at `scan` is bad; `next_frame` will say why once it gets there.
    stuck: bool,
    /// Compressed chunks whose payload is (being) gathered outside `buf`, in stream order.
    detached: VecDeque<Detached>,
    error: Option<WireError>,
}

#[derive(Debug)]
struct Detached {
    /// Where the chunk's prefix starts in `buf`.
    at: usize,
    /// The payload, filled up to `want` bytes.
    data: Vec<u8>,
    want: usize,
}

/// What the decoder does with the frame that starts a byte slice.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The frame's first `n` bytes must be buffered before it can be routed.
    Need(usize),
    /// The frame, `n` bytes with its length field, is buffered whole.
    Whole(usize),
    /// A compressed chunk: its first `prefix` bytes are buffered, its `want` payload bytes go
    /// into a vector of their own.
    Detach { prefix: usize, want: usize },
}

/// Routes the frame at the start of `head` (which may hold less than the frame, or more), or
/// says what is wrong with it from the bytes it has. Allocates nothing.
fn route(head: &[u8]) -> Result<Route, WireError> {
    let Some(len) = head.get(..LEN_FIELD) else { return Ok(Route::Need(TYPE_END)) };
    let len = u32::from_be_bytes(len.try_into().unwrap());
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge { len });
    }
    let Some(&ty) = head.get(LEN_FIELD) else { return Ok(Route::Need(TYPE_END)) };
    let max = max_frame_len(ty).ok_or(WireError::UnknownType(ty))?;
    if len > max {
        return Err(WireError::FrameTooLong { frame: type_name(ty).unwrap(), len, max });
    }
    let total = LEN_FIELD + len as usize;
    // Only a compressed chunk is detached; anything shorter than its prefix is decoded (and
    // refused as truncated) whole.
    if ty != T_CHUNK || total < CHUNK_HEAD_END {
        return Ok(Route::Whole(total));
    }
    if head.len() < CHUNK_HEAD_END {
        return Ok(Route::Need(CHUNK_HEAD_END));
    }
    let chunk = ChunkHead::parse_prefix(&head[TYPE_END..CHUNK_HEAD_END])?;
    if !chunk.is_compressed() || total < CHUNK_PREFIX {
        return Ok(Route::Whole(total));
    }
    if head.len() < CHUNK_PREFIX {
        return Ok(Route::Need(CHUNK_PREFIX));
    }
    let want = u32::from_be_bytes(head[CHUNK_HEAD_END..CHUNK_PREFIX].try_into().unwrap());
    chunk.check_data_len(want, total - CHUNK_PREFIX)?;
    Ok(match want {
        0 => Route::Whole(total),
        want => Route::Detach { prefix: CHUNK_PREFIX, want: want as usize },
    })
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes bytes that arrived from the peer. Only what routing needs is copied into the
    /// buffer: headers and small frames; a compressed chunk's payload goes into its own vector,
    /// allocated once at its checked length.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        if self.error.is_some() {
            return;
        }
        self.compact();
        loop {
            // Bytes after a detached chunk's prefix are its payload until it is complete.
            if let Some(d) = self.detached.back_mut().filter(|d| d.data.len() < d.want) {
                if bytes.is_empty() {
                    return;
                }
                let n = (d.want - d.data.len()).min(bytes.len());
                d.data.extend_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                continue;
            }
            if self.stuck {
                // next_frame will report the error from what is buffered; the rest is moot.
                return;
            }
            let have = self.buf.len() - self.scan;
            let need = match route(&self.buf[self.scan..]) {
                Err(_) => {
                    self.stuck = true;
                    return;
                }
                Ok(Route::Detach { prefix, want }) => {
                    debug_assert_eq!(have, prefix);
                    self.detached.push_back(Detached { at: self.scan, data: Vec::with_capacity(want), want });
                    self.scan += prefix;
                    continue;
                }
                Ok(Route::Whole(n)) if have == n => {
                    self.scan += n;
                    continue;
                }
                Ok(Route::Whole(n) | Route::Need(n)) => n,
            };
            debug_assert!(have <= need, "routed past the frame at {}", self.scan);
            if bytes.is_empty() {
                return;
            }
            // Copy no more than the frame at `scan` needs: what follows may be routed elsewhere.
            let n = (need - have).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }

    /// The next whole frame, `Ok(None)` if more bytes are needed first, or the error that ends
    /// the connection.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let r = self.decode_next();
        if let Err(e) = &r {
            self.error = Some(e.clone());
            // Nothing more will be decoded: let the memory go.
            *self = Decoder { error: self.error.take(), ..Decoder::default() };
        }
        r
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos + self.detached.iter().map(|d| d.data.len()).sum::<usize>()
    }

    fn decode_next(&mut self) -> Result<Option<Frame>, WireError> {
        if self.detached.front().is_some_and(|d| d.at == self.pos) {
            if self.detached[0].data.len() < self.detached[0].want {
                return Ok(None);
            }
            let d = self.detached.pop_front().unwrap();
            let head = ChunkHead::parse_prefix(&self.buf[self.pos + TYPE_END..self.pos + CHUNK_HEAD_END])?;
            self.pos += CHUNK_PREFIX;
            return Ok(Some(Frame::Chunk {
                offset: head.offset,
                len: head.len,
                hash: head.hash,
                data: ChunkData::Compressed(d.data),
            }));
        }
        let head = &self.buf[self.pos..];
        match route(head)? {
            Route::Whole(n) if head.len() >= n => {
                let frame = Frame::decode(head[LEN_FIELD], &head[TYPE_END..n])?;
                self.pos += n;
                Ok(Some(frame))
            }
            Route::Whole(_) | Route::Need(_) => Ok(None),
            Route::Detach { .. } => {
                // feed detaches a chunk as soon as its prefix is buffered.
                debug_assert!(false, "undetached chunk at {}", self.pos);
                Ok(None)
            }
        }
    }

    /// Drops the bytes of returned frames from the buffer once they are at least as many as
    /// the bytes kept, so each byte is moved O(1) times on average.
    fn compact(&mut self) {
        let kept = self.buf.len() - self.pos;
        if self.pos == 0 || self.pos < kept {
            return;
        }
        self.buf.drain(..self.pos);
        self.scan -= self.pos;
        for d in &mut self.detached {
            d.at -= self.pos;
        }
        self.pos = 0;
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::{arb_frame, samples};
    use crate::{Fault, MAX_CHUNK, MAX_COMPRESSED};
    use proptest::prelude::*;

    fn encode_all(frames: &[Frame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        out
    }

    /// Feeds `bytes` cut at `cuts` (positions, any order), draining frames after every piece,
    /// until the first error.
    fn decode_split(bytes: &[u8], cuts: &[usize]) -> (Vec<Frame>, Option<WireError>) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let mut d = Decoder::new();
        let mut frames = Vec::new();
        let mut from = 0;
        for to in cuts {
            d.feed(&bytes[from..to]);
            from = to;
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => return (frames, Some(e)),
                }
            }
        }
        (frames, None)
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, WireError> {
        let mut d = Decoder::new();
        d.feed(bytes);
        d.next_frame()
    }

    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut b = (u32::try_from(body.len()).unwrap() + 1).to_be_bytes().to_vec();
        b.push(ty);
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn every_sample_byte_by_byte() {
        let frames = samples();
        let bytes = encode_all(&frames);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        assert_eq!(decode_split(&bytes, &cuts), (frames.clone(), None));
        assert_eq!(decode_split(&bytes, &[]), (frames, None));
    }

    #[test]
    fn needs_more_until_whole() {
        let mut bytes = Vec::new();
        Frame::Progress { next_offset: 7 }.encode(&mut bytes);
        let mut d = Decoder::new();
        for b in &bytes[..bytes.len() - 1] {
            d.feed(std::slice::from_ref(b));
            assert_eq!(d.next_frame(), Ok(None));
        }
        d.feed(&bytes[bytes.len() - 1..]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Progress { next_offset: 7 })));
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn chunk_payload_is_detached() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i.to_le_bytes()[0]).collect();
        let f = Frame::Chunk { offset: 0, len: 1 << 20, hash: [3; 32], data: ChunkData::Compressed(data) };
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        Frame::Zero { offset: 5, len: 5 }.encode(&mut bytes);
        let mut d = Decoder::new();
        d.feed(&bytes[..1000]);
        assert_eq!(d.next_frame(), Ok(None));
        // Only the prefix is in the buffer; the rest went to the payload.
        assert_eq!(d.buf.len(), CHUNK_PREFIX);
        assert_eq!(d.detached[0].data.capacity(), 100_000);
        d.feed(&bytes[1000..]);
        assert_eq!(d.next_frame(), Ok(Some(f)));
        assert_eq!(d.next_frame(), Ok(Some(Frame::Zero { offset: 5, len: 5 })));
        assert_eq!(d.next_frame(), Ok(None));
    }

    #[test]
    fn buffer_stays_small_over_many_frames() {
        let mut d = Decoder::new();
        let mut bytes = Vec::new();
        Frame::Committed { point: 1, generation: 2 }.encode(&mut bytes);
        // A frame cut in two at every feed, so the buffer is never empty when compacted.
        let mut stream = Vec::new();
        for _ in 0..10_000 {
            stream.extend_from_slice(&bytes);
        }
        let mut n = 0;
        for piece in stream.chunks(bytes.len() * 3 + 5) {
            d.feed(piece);
            while let Some(f) = d.next_frame().unwrap() {
                assert_eq!(f, Frame::Committed { point: 1, generation: 2 });
                n += 1;
            }
            assert!(d.buf.capacity() < 1024, "{}", d.buf.capacity());
        }
        assert_eq!(n, 10_000);
    }

    #[test]
    fn frame_length_zero() {
        assert_eq!(decode_one(&[0, 0, 0, 0]), Err(WireError::EmptyFrame));
    }

    #[test]
    fn frame_length_over_max_before_anything_else() {
        let len = MAX_FRAME + 1;
        // Only the length field is in: refused already.
        assert_eq!(decode_one(&len.to_be_bytes()), Err(WireError::FrameTooLarge { len }));
        let e = decode_one(&u32::MAX.to_be_bytes()).unwrap_err();
        assert_eq!(e.fault(), Fault::TooLarge);
        // MAX_FRAME itself is fine for a chunk: it just needs more bytes.
        let mut b = MAX_FRAME.to_be_bytes().to_vec();
        b.push(T_CHUNK);
        assert_eq!(decode_one(&b), Ok(None));
    }

    #[test]
    fn frame_longer_than_its_type_allows() {
        let mut b = 10_000u32.to_be_bytes().to_vec();
        b.push(1);
        assert_eq!(
            decode_one(&b),
            Err(WireError::FrameTooLong { frame: "Hello", len: 10_000, max: max_frame_len(1).unwrap() })
        );
        let b = frame(10, &[0; 9]);
        assert!(matches!(
            decode_one(&b),
            Err(WireError::FrameTooLong { frame: "Progress", len: 10, max: 9 })
        ));
    }

    #[test]
    fn unknown_type() {
        for ty in [0, 19, 255] {
            // Refused from the first five bytes.
            assert_eq!(decode_one(&frame(ty, &[1, 2, 3])[..5]), Err(WireError::UnknownType(ty)));
        }
    }

    #[test]
    fn trailing_bytes() {
        let mut b = Vec::new();
        Frame::Welcome { version: 1, server: "s".into() }.encode(&mut b);
        b[3] += 2;
        b.extend_from_slice(&[0, 0]);
        assert_eq!(decode_one(&b), Err(WireError::TrailingBytes { frame: "Welcome", extra: 2 }));
        // A Known chunk has nothing after its tag.
        let mut b = Vec::new();
        Frame::Chunk { offset: 0, len: 1, hash: [0; 32], data: ChunkData::Known }.encode(&mut b);
        b[3] += 1;
        b.push(0);
        assert_eq!(decode_one(&b), Err(WireError::TrailingBytes { frame: "Chunk", extra: 1 }));
    }

    #[test]
    fn compressed_length_must_fill_the_frame() {
        let mut b = Vec::new();
        Frame::Chunk { offset: 0, len: 10, hash: [0; 32], data: ChunkData::Compressed(vec![9; 10]) }
            .encode(&mut b);
        let mut longer = b.clone();
        longer[3] += 1;
        longer.push(0);
        assert_eq!(decode_one(&longer), Err(WireError::TrailingBytes { frame: "Chunk", extra: 1 }));
        let mut shorter = b.clone();
        shorter[3] -= 1;
        shorter.pop();
        assert_eq!(decode_one(&shorter), Err(WireError::Truncated { frame: "Chunk" }));
        // Refused from the prefix, before the payload arrives.
        assert_eq!(decode_one(&shorter[..CHUNK_PREFIX]), Err(WireError::Truncated { frame: "Chunk" }));
    }

    #[test]
    fn chunk_length_checked_from_the_prefix() {
        for (len, err) in [
            (0, WireError::BadExtent { offset: 0, len: 0 }),
            (MAX_CHUNK + 1, WireError::ChunkTooLarge { len: MAX_CHUNK + 1 }),
        ] {
            let mut body = Vec::new();
            body.extend_from_slice(&0u64.to_be_bytes());
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(&[0; 32]);
            body.push(0);
            body.extend_from_slice(&(MAX_COMPRESSED).to_be_bytes());
            let mut b = (MAX_FRAME).to_be_bytes().to_vec();
            b.push(T_CHUNK);
            b.extend_from_slice(&body);
            assert_eq!(decode_one(&b), Err(err));
        }
    }

    #[test]
    fn error_is_final() {
        let mut d = Decoder::new();
        let mut b = Vec::new();
        Frame::Progress { next_offset: 1 }.encode(&mut b);
        b.extend_from_slice(&frame(99, &[]));
        Frame::Progress { next_offset: 2 }.encode(&mut b);
        d.feed(&b);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Progress { next_offset: 1 })));
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(99)));
        d.feed(&b);
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(99)));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn stuck_decoder_drops_later_bytes() {
        let mut d = Decoder::new();
        let mut b = Vec::new();
        Frame::Progress { next_offset: 1 }.encode(&mut b);
        d.feed(&b);
        d.feed(&frame(99, &[]));
        d.feed(&vec![0; 1 << 20]);
        assert!(d.buf.len() < 64);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Progress { next_offset: 1 })));
        assert_eq!(d.next_frame(), Err(WireError::UnknownType(99)));
    }

    proptest! {
        /// Arbitrary frames, encoded back to back and fed in arbitrary pieces, come out equal.
        #[test]
        fn frames_round_trip_in_any_split(
            frames in proptest::collection::vec(arb_frame(), 0..12),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let bytes = encode_all(&frames);
            prop_assert_eq!(decode_split(&bytes, &cuts), (frames, None));
        }

        /// Whatever the bytes and however they are cut, the decoder does not panic and comes to
        /// the same frames and the same error as when fed everything at once.
        #[test]
        fn arbitrary_bytes_any_split_agree(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            prop_assert_eq!(decode_split(&bytes, &cuts), decode_split(&bytes, &[]));
        }

        /// Valid frames with bytes flipped: the same agreement, from inputs that get deep.
        #[test]
        fn mutated_frames_any_split_agree(
            frames in proptest::collection::vec(arb_frame(), 1..6),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
            cuts in proptest::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut bytes = encode_all(&frames);
            for (at, x) in flips {
                let n = bytes.len();
                bytes[at % n] ^= x;
            }
            prop_assert_eq!(decode_split(&bytes, &cuts), decode_split(&bytes, &[]));
        }
    }
}
