//! I/O buffers aligned for O_DIRECT, and a per-connection pool that reuses them.

/// Alignment of every data buffer: enough for O_DIRECT on any device we serve.
pub const ALIGN: usize = 4096;

/// A heap buffer whose data starts at a 4 KiB boundary. Its heap storage never moves while the
/// buffer lives, so its address may be handed to the kernel for the duration of an operation.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).next_power_of_two().max(ALIGN);
        let storage = vec![0u8; cap + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        Self { storage, start, len }
    }

    /// Bytes this buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.storage.len() - ALIGN
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Changes the length within the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity());
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Free buffers of one connection, by power-of-two capacity class.
#[derive(Default)]
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
}

/// Buffers kept per class; more are freed.
const KEEP_PER_CLASS: usize = 64;
/// Buffers larger than this are not kept.
const KEEP_MAX: usize = 4 << 20;

impl BufPool {
    fn class(cap: usize) -> usize {
        cap.trailing_zeros() as usize
    }

    /// A buffer of `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> AlignedBuf {
        let cap = len.max(1).next_power_of_two().max(ALIGN);
        let c = Self::class(cap);
        if let Some(mut b) = self.classes.get_mut(c).and_then(Vec::pop) {
            b.set_len(len);
            return b;
        }
        AlignedBuf::zeroed(len)
    }

    /// Returns a buffer for reuse.
    pub fn put(&mut self, buf: AlignedBuf) {
        let cap = buf.capacity();
        if cap > KEEP_MAX {
            return;
        }
        let c = Self::class(cap);
        if self.classes.len() <= c {
            self.classes.resize_with(c + 1, Vec::new);
        }
        if self.classes[c].len() < KEEP_PER_CLASS {
            self.classes[c].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_reused() {
        let mut p = BufPool::default();
        let b = p.get(5000);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        let ptr = b.as_slice().as_ptr();
        p.put(b);
        let b = p.get(8000);
        assert_eq!(b.as_slice().as_ptr(), ptr);
    }
}
