//! The map of one region: sorted, non-overlapping data extents, each naming a range of a chunk.
//! Whatever no extent covers reads as zeroes (written zeroes and never-written blocks alike).

use std::collections::BTreeMap;

/// Where a data extent's bytes are: `len` bytes of `chunk` from `chunk_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataRef {
    pub(crate) len: u32,
    pub(crate) chunk: [u8; 32],
    pub(crate) chunk_offset: u32,
}

impl DataRef {
    /// The part of this extent (which starts at `start`) from `at` on.
    fn tail(self, start: u32, at: u32) -> DataRef {
        let cut = at - start;
        DataRef { len: self.len - cut, chunk: self.chunk, chunk_offset: self.chunk_offset + cut }
    }
}

/// Extents of one region, keyed by their offset within it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RegionMap {
    ext: BTreeMap<u32, DataRef>,
}

impl RegionMap {
    pub(crate) fn len(&self) -> usize {
        self.ext.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ext.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &DataRef)> + '_ {
        self.ext.iter().map(|(k, v)| (*k, v))
    }

    /// Appends an extent known to start at or after the end of the last one (decoding).
    pub(crate) fn push_sorted(&mut self, start: u32, d: DataRef) {
        self.ext.insert(start, d);
    }

    /// Makes `[start, end)` read as zeroes.
    pub(crate) fn punch(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        if let Some((&s, &d)) = self.ext.range(..start).next_back() {
            let e = s + d.len;
            if e > start {
                self.ext.insert(s, DataRef { len: start - s, ..d });
                if e > end {
                    self.ext.insert(end, d.tail(s, end));
                }
            }
        }
        let inside: Vec<u32> = self.ext.range(start..end).map(|(k, _)| *k).collect();
        for s in inside {
            let d = self.ext.remove(&s).expect("key just listed");
            if s + d.len > end {
                self.ext.insert(end, d.tail(s, end));
            }
        }
    }

    /// Maps `[start, start + d.len)` to `d`, replacing whatever was there.
    pub(crate) fn put(&mut self, start: u32, d: DataRef) {
        self.punch(start, start + d.len);
        self.ext.insert(start, d);
    }

    /// The extents overlapping `[start, end)`, clipped to it, in order.
    pub(crate) fn overlapping(&self, start: u32, end: u32) -> Vec<(u32, DataRef)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        if let Some((&s, &d)) = self.ext.range(..start).next_back() {
            if s + d.len > start {
                out.push((start, d.tail(s, start)));
            }
        }
        out.extend(self.ext.range(start..end).map(|(&s, &d)| (s, d)));
        if let Some((s, d)) = out.last_mut() {
            if *s + d.len > end {
                d.len = end - *s;
            }
        }
        out
    }

    /// Every chunk this map names.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = &[u8; 32]> + '_ {
        self.ext.values().map(|d| &d.chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SIZE: usize = 256;

    /// The model: per byte, (chunk id, byte index within the chunk) or None for zero.
    type Model = Vec<Option<(u8, u32)>>;

    fn render(m: &RegionMap) -> Model {
        let mut out = vec![None; SIZE];
        let mut end = 0;
        for (s, d) in m.iter() {
            assert!(s >= end, "overlap or disorder at {s}");
            assert!(d.len > 0);
            end = s + d.len;
            for i in 0..d.len {
                out[(s + i) as usize] = Some((d.chunk[0], d.chunk_offset + i));
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put { start: u32, len: u32, chunk: u8, chunk_offset: u32 },
        Punch { start: u32, len: u32 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..SIZE as u32, 1..64u32, 0..4u8, 0..32u32).prop_map(|(start, len, chunk, chunk_offset)| {
                Op::Put { start, len: len.min(SIZE as u32 - start), chunk, chunk_offset }
            }),
            (0..SIZE as u32, 0..64u32)
                .prop_map(|(start, len)| Op::Punch { start, len: len.min(SIZE as u32 - start) }),
        ]
    }

    proptest! {
        #[test]
        fn region_map_matches_model(ops in prop::collection::vec(op(), 0..40), q in (0..SIZE as u32, 0..SIZE as u32)) {
            let mut m = RegionMap::default();
            let mut model: Model = vec![None; SIZE];
            for op in ops {
                match op {
                    Op::Put { start, len, chunk, chunk_offset } => {
                        m.put(start, DataRef { len, chunk: [chunk; 32], chunk_offset });
                        for i in 0..len {
                            model[(start + i) as usize] = Some((chunk, chunk_offset + i));
                        }
                    }
                    Op::Punch { start, len } => {
                        m.punch(start, start + len);
                        for i in 0..len {
                            model[(start + i) as usize] = None;
                        }
                    }
                }
                prop_assert_eq!(&render(&m), &model);
            }
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            let mut seen: Model = vec![None; SIZE];
            let mut end = a;
            for (s, d) in m.overlapping(a, b) {
                prop_assert!(s >= end && s + d.len <= b && d.len > 0);
                end = s + d.len;
                for i in 0..d.len {
                    seen[(s + i) as usize] = Some((d.chunk[0], d.chunk_offset + i));
                }
            }
            for i in 0..SIZE {
                let want = if (a as usize..b as usize).contains(&i) { model[i] } else { None };
                prop_assert_eq!(seen[i], want);
            }
        }
    }
}
