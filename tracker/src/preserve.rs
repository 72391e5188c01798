//! The preserve store: pre-images of blocks overwritten while a generation that needs them is
//! unreleased, in fixed-size slots of one file, bounded by a limit.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Slots {
    /// Slots ever used: `[0, next)`.
    next: u64,
    free: Vec<u64>,
    /// Generations referring to each used slot.
    refs: HashMap<u64, u32>,
}

/// Pre-images in `slot_size`-byte slots.
#[derive(Debug)]
pub struct PreserveStore {
    file: File,
    slot_size: u64,
    limit_slots: u64,
    slots: Mutex<Slots>,
}

impl PreserveStore {
    /// A store in `file` holding at most `limit_bytes` of pre-images of `slot_size` bytes each.
    pub fn new(file: File, slot_size: u64, limit_bytes: u64) -> Self {
        Self { file, slot_size, limit_slots: limit_bytes / slot_size, slots: Mutex::new(Slots::default()) }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the allocation from the slots recovered generations refer to.
    pub fn adopt(&self, used: impl IntoIterator<Item = u64>) {
        let mut s = self.slots();
        *s = Slots::default();
        for slot in used {
            *s.refs.entry(slot).or_insert(0) += 1;
            s.next = s.next.max(slot + 1);
        }
        let mut free: Vec<u64> = (0..s.next).filter(|x| !s.refs.contains_key(x)).collect();
        free.reverse();
        s.free = free;
    }

    /// Stores `data` (at most one slot) for `refs` generations; `None` when the store is full.
    pub fn save(&self, data: &[u8], refs: u32) -> io::Result<Option<u64>> {
        debug_assert!(data.len() as u64 <= self.slot_size);
        let slot = {
            let mut s = self.slots();
            let slot = match s.free.pop() {
                Some(x) => x,
                None if s.next < self.limit_slots => {
                    s.next += 1;
                    s.next - 1
                }
                None => return Ok(None),
            };
            s.refs.insert(slot, refs);
            slot
        };
        if let Err(e) = self.file.write_all_at(data, slot * self.slot_size) {
            self.release(slot);
            return Err(e);
        }
        Ok(Some(slot))
    }

    /// Reads a slot's first `buf.len()` bytes.
    pub fn read(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, slot * self.slot_size)
    }

    /// Drops one generation's reference to `slot`.
    pub fn release(&self, slot: u64) {
        let mut s = self.slots();
        if let Some(r) = s.refs.get_mut(&slot) {
            *r -= 1;
            if *r == 0 {
                s.refs.remove(&slot);
                s.free.push(slot);
            }
        }
        if s.refs.is_empty() {
            // Nothing preserved: start the file over so it does not stay large.
            s.next = 0;
            s.free.clear();
            let _ = self.file.set_len(0);
        }
    }

    /// Makes every saved pre-image durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Bytes of pre-images held.
    pub fn used_bytes(&self) -> u64 {
        self.slots().refs.len() as u64 * self.slot_size
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_slots * self.slot_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_frees_and_refcounts() {
        let s = PreserveStore::new(tempfile::tempfile().unwrap(), 512, 1024);
        let a = s.save(&[1; 512], 2).unwrap().unwrap();
        let b = s.save(&[2; 512], 1).unwrap().unwrap();
        assert_eq!(s.save(&[3; 512], 1).unwrap(), None, "limit of two slots");
        let mut buf = [0u8; 512];
        s.read(a, &mut buf).unwrap();
        assert_eq!(buf, [1; 512]);
        s.release(a);
        assert_eq!(s.used_bytes(), 1024, "still referenced once");
        s.release(a);
        assert_eq!(s.used_bytes(), 512);
        assert_eq!(s.save(&[4; 512], 1).unwrap(), Some(a));
        s.read(b, &mut buf).unwrap();
        assert_eq!(buf, [2; 512]);
    }
}
