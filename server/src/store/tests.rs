//! Store-level tests: round trips against a model disk, structural sharing, dedup, corruption,
//! idempotence, resumed initial copies, staged chunks (promotion, crashes, failed syncs),
//! retention and garbage collection (with injected crashes), sparse restore and concurrency.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;

use super::format::hex;
use super::layout::{CHUNKS, INCOMING, INITIAL_FILE, MARKER, PAGES};
use super::objects;
use super::pending;
use crate::*;

const KIB: u64 = 1024;

/// xorshift64*: deterministic test data without another dependency.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Half random, half runs: compressible but not trivially so.
        (0..n).map(|i| if i % 64 < 32 { self.next() as u8 } else { (i / 64) as u8 }).collect()
    }
}

fn new_store(region_size: u64) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(&dir.path().join("store"), &StoreOptions { region_size }).unwrap();
    (dir, store)
}

fn put(store: &Store, data: &[u8]) -> [u8; 32] {
    let hash = *blake3::hash(data).as_bytes();
    let z = zstd::bulk::compress(data, 1).unwrap();
    store.put_chunk(&hash, data.len() as u32, &z).unwrap();
    hash
}

fn read_all(reader: &PointReader) -> Vec<u8> {
    let mut buf = vec![0xAAu8; reader.size() as usize];
    reader.read_at(&mut buf, 0).unwrap();
    buf
}

/// Object files (not temporaries) under `chunks/` or `pages/`.
fn objects(store: &Store, kind: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for shard in fs::read_dir(store.root().join(kind)).unwrap() {
        for f in fs::read_dir(shard.unwrap().path()).unwrap() {
            out.insert(f.unwrap().file_name().into_string().unwrap());
        }
    }
    out
}

/// Files in `incoming/` (staged chunks).
fn incoming(store: &Store) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(store.root().join(INCOMING))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    out.sort();
    out
}

fn staged_count(store: &Store) -> usize {
    store.parts().live().staged.len()
}

fn hexes<'a>(hashes: impl IntoIterator<Item = &'a [u8; 32]>) -> HashSet<String> {
    hashes.into_iter().map(|h| hex(h)).collect()
}

fn point_image(store: &Store, disk: &str, id: u64) -> Vec<u8> {
    read_all(&store.open_point(disk, PointSel::Id(id)).unwrap())
}

/// Commits one generation of random chunk and zero extents, applying it to `model`.
fn random_generation(
    store: &Store,
    rng: &mut Rng,
    disk: &str,
    generation: u64,
    base: Option<u64>,
    model: &mut [u8],
    ops: usize,
) -> PointInfo {
    let kind = if base.is_some() { GenerationKind::Incremental } else { GenerationKind::InitialFull };
    let mut p = store.begin(disk, generation, kind, base).unwrap();
    let blocks = model.len() as u64 / 512;
    for _ in 0..ops {
        let start = rng.below(blocks);
        let len = 1 + rng.below((blocks - start).min(64));
        let (off, n) = (start * 512, (len * 512) as usize);
        if rng.below(4) == 0 {
            p.add_zero(off, n as u64).unwrap();
            model[off as usize..off as usize + n].fill(0);
        } else {
            let data = rng.bytes(n);
            let h = put(store, &data);
            p.add_chunk(off, n as u32, h).unwrap();
            model[off as usize..off as usize + n].copy_from_slice(&data);
        }
    }
    p.commit(1_000 + generation, Consistency::Crash).unwrap()
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Store>();
    send_sync::<PointReader>();
    send::<PendingPoint>();
}

#[test]
fn round_trip_random_generations() {
    let (_d, store) = new_store(64 * KIB);
    let size = 1024 * KIB; // 16 regions
    store.register_disk("vm1", size, 512).unwrap();
    let mut rng = Rng(0x1234_5678);
    let mut model = vec![0u8; size as usize];
    let mut images = Vec::new();
    let mut base = None;
    for generation in 1..=6 {
        let info = random_generation(&store, &mut rng, "vm1", generation, base, &mut model, 40);
        assert_eq!(info.id, generation);
        base = Some(info.id);
        images.push(model.clone());
        let reader = store.open_point("vm1", PointSel::Latest).unwrap();
        assert_eq!(reader.info(), &info);
        assert!(read_all(&reader) == model, "generation {generation} differs");
        // Unaligned reads of every size.
        for _ in 0..50 {
            let off = rng.below(size);
            let len = rng.below((size - off).min(200_000));
            let mut buf = vec![0x55; len as usize];
            reader.read_at(&mut buf, off).unwrap();
            assert!(buf[..] == model[off as usize..(off + len) as usize]);
        }
        // The extent map agrees: zero ranges read as zeroes, ranges are contiguous.
        let ext = reader.extents(0, size).unwrap();
        let mut at = 0;
        for (off, len, kind) in &ext {
            assert_eq!(*off, at);
            at += len;
            if *kind == ExtentKind::Zero {
                assert!(model[*off as usize..(*off + *len) as usize].iter().all(|b| *b == 0));
            }
        }
        assert_eq!(at, size);
        assert!(ext.windows(2).all(|w| w[0].2 != w[1].2), "adjacent extents of one kind are merged");
    }
    // Every point restores on its own, also after reopening the store.
    let store = reopen(store);
    for (i, image) in images.iter().enumerate() {
        assert!(point_image(&store, "vm1", i as u64 + 1) == *image, "point {} differs", i + 1);
    }
    let info = store.disk("vm1").unwrap();
    assert_eq!(info.latest.unwrap().generation, 6);
    assert_eq!(store.points("vm1").unwrap().len(), 6);
}

#[test]
fn later_extents_override_earlier_ones() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 256 * KIB, 512).unwrap();
    let a = put(&store, &[1u8; 8192]);
    let b = put(&store, &[2u8; 4096]);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 8192, a).unwrap();
    p.add_chunk(2048, 4096, b).unwrap(); // data over data
    p.add_zero(1024, 512).unwrap(); // zero over data
    p.add_zero(64 * KIB - 1024, 4096).unwrap(); // zero over nothing, across regions
    p.add_chunk(64 * KIB - 2048, 8192, a).unwrap(); // data over zero, across regions
    p.add_chunk(64 * KIB - 2048, 4096, b).unwrap(); // the same range again: last wins
    p.commit(1, Consistency::App).unwrap();
    let mut want = vec![0u8; 256 * KIB as usize];
    want[..8192].fill(1);
    want[2048..6144].fill(2);
    want[1024..1536].fill(0);
    let m = 64 * KIB as usize;
    want[m - 2048..m + 6144].fill(1);
    want[m - 2048..m + 2048].fill(2);
    assert!(point_image(&store, "d", 1) == want);
}

#[test]
fn a_new_point_writes_only_the_pages_it_touches() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 8 * 64 * KIB, 4096).unwrap();
    let mut rng = Rng(7);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    for region in 0..8 {
        let h = put(&store, &rng.bytes(4096));
        p.add_chunk(region * 64 * KIB, 4096, h).unwrap();
    }
    let first = p.commit(1, Consistency::Crash).unwrap();
    let first_image = point_image(&store, "d", first.id);
    assert_eq!(objects(&store, PAGES).len(), 8);

    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    let h = put(&store, &rng.bytes(8192));
    p.add_chunk(3 * 64 * KIB + 8192, 8192, h).unwrap();
    let second = p.commit(2, Consistency::Crash).unwrap();
    assert_eq!(objects(&store, PAGES).len(), 9, "one new page");
    assert_eq!(objects(&store, CHUNKS).len(), 9);

    // A generation that changes nothing shares every page.
    let p = store.begin("d", 3, GenerationKind::Incremental, Some(second.id)).unwrap();
    let third = p.commit(3, Consistency::Crash).unwrap();
    assert_eq!(objects(&store, PAGES).len(), 9);
    assert!(point_image(&store, "d", third.id) == point_image(&store, "d", second.id));
    assert!(point_image(&store, "d", first.id) == first_image, "the base is unchanged");
}

#[test]
fn chunks_are_shared_across_disks() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("a", 128 * KIB, 512).unwrap();
    store.register_disk("b", 256 * KIB, 512).unwrap();
    let data = Rng(3).bytes(16384);
    let h = put(&store, &data);
    let again = put(&store, &data);
    assert_eq!(h, again);
    for (disk, off) in [("a", 0), ("b", 128 * KIB)] {
        let mut p = store.begin(disk, 1, GenerationKind::InitialFull, None).unwrap();
        assert!(store.has_chunk(&h));
        p.add_chunk(off, 16384, h).unwrap();
        p.commit(5, Consistency::Crash).unwrap();
    }
    assert_eq!(objects(&store, CHUNKS), hexes([&h]));
    assert_eq!(point_image(&store, "a", 1)[..16384], data[..]);
    assert_eq!(point_image(&store, "b", 1)[128 * KIB as usize..][..16384], data[..]);
    let names: Vec<_> = store.disks().unwrap().into_iter().map(|d| d.name).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn a_corrupt_upload_is_rejected_and_nothing_is_stored() {
    let (_d, store) = new_store(64 * KIB);
    let data = vec![9u8; 4096];
    let z = zstd::bulk::compress(&data, 1).unwrap();
    let wrong = *blake3::hash(b"something else").as_bytes();
    let e = store.put_chunk(&wrong, 4096, &z).unwrap_err();
    assert!(matches!(e, StoreError::CorruptChunk { stored: false, .. }), "{e}");
    assert!(e.caller_fault());
    let right = *blake3::hash(&data).as_bytes();
    assert!(matches!(store.put_chunk(&right, 4095, &z), Err(StoreError::CorruptChunk { .. })));
    assert!(!store.has_chunk(&wrong));
    assert!(!store.has_chunk(&right));
    assert!(objects(&store, CHUNKS).is_empty());
}

#[test]
fn corruption_on_disk_is_detected_on_read() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let data = Rng(11).bytes(8192);
    let h = put(&store, &data);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 8192, h).unwrap();
    p.commit(1, Consistency::Crash).unwrap();

    let path = store.parts().layout.chunk_path(&h);
    let good = fs::read(&path).unwrap();
    let reader = store.open_point("d", PointSel::Latest).unwrap();
    let mut buf = vec![0u8; 512];
    reader.read_at(&mut buf, 64 * KIB).unwrap(); // unwritten: no chunk read

    for at in [good.len() - 1, 60, 20] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        fs::write(&path, &bad).unwrap();
        let reader = store.open_point("d", PointSel::Latest).unwrap();
        let e = reader.read_at(&mut buf, 0).unwrap_err();
        assert!(matches!(e, StoreError::CorruptChunk { hash, stored: true, .. } if hash == h), "{e}");
        assert!(!e.caller_fault());
        assert!(!path.exists(), "the damaged chunk is quarantined");
    }
    let reader = store.open_point("d", PointSel::Latest).unwrap();
    assert!(matches!(reader.read_at(&mut buf, 4096), Err(StoreError::CorruptChunk { stored: true, .. })));
    let out = tempfile::NamedTempFile::new().unwrap();
    assert!(matches!(reader.restore_to(out.path(), &mut |_, _| {}), Err(StoreError::CorruptChunk { .. })));

    // A corrupt page or root is a format error, not silence.
    fs::write(&path, &good).unwrap();
    let page = objects(&store, PAGES).into_iter().next().unwrap();
    let page_path = store.root().join(PAGES).join(&page[..2]).join(&page);
    let mut bytes = fs::read(&page_path).unwrap();
    bytes[20] ^= 1;
    fs::write(&page_path, &bytes).unwrap();
    let reader = store.open_point("d", PointSel::Latest).unwrap();
    assert!(matches!(
        reader.read_at(&mut buf, 0),
        Err(StoreError::Format { source: FormatError::Checksum, .. })
    ));
}

#[test]
fn commit_is_idempotent_and_stale_generations_are_refused() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let h = put(&store, &[5u8; 4096]);
    let mut p = store.begin("d", 5, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 4096, h).unwrap();
    let first = p.commit(100, Consistency::Crash).unwrap();

    // A re-send of generation 5 (after a lost acknowledgement) returns the same point.
    let mut again = store.begin("d", 5, GenerationKind::InitialFull, None).unwrap();
    again.add_chunk(4096, 4096, h).unwrap();
    assert_eq!(again.commit(100, Consistency::Crash).unwrap(), first);
    assert_eq!(store.points("d").unwrap(), vec![first.clone()]);
    assert_eq!(store.point_for_generation("d", 5).unwrap(), Some(first.clone()));
    assert_eq!(store.point_for_generation("d", 6).unwrap(), None);

    let second = store
        .begin("d", 9, GenerationKind::Incremental, Some(1))
        .unwrap()
        .commit(200, Consistency::App)
        .unwrap();
    assert_eq!((second.id, second.base), (2, Some(1)));
    assert!(matches!(
        store.begin("d", 7, GenerationKind::Incremental, Some(1)),
        Err(StoreError::StaleGeneration { generation: 7, latest: 9, .. })
    ));
    assert!(matches!(
        store.begin("d", 10, GenerationKind::Incremental, None),
        Err(StoreError::BaseRequired(GenerationKind::Incremental))
    ));
    assert!(matches!(
        store.begin("d", 9, GenerationKind::Resync, Some(2)),
        Err(StoreError::InvalidBase { base: 2, .. })
    ));
    assert!(matches!(
        store.begin("d", 10, GenerationKind::Resync, Some(7)),
        Err(StoreError::UnknownPoint { id: 7, .. })
    ));
    // Generations found by binary search over many points.
    let mut base = 2;
    for g in 10..30 {
        base = store
            .begin("d", g * 3, GenerationKind::Incremental, Some(base))
            .unwrap()
            .commit(g, Consistency::Crash)
            .unwrap()
            .id;
    }
    for g in 10..30 {
        assert_eq!(store.point_for_generation("d", g * 3).unwrap().unwrap().id, g - 7);
        assert_eq!(store.point_for_generation("d", g * 3 + 1).unwrap(), None);
    }
}

#[test]
fn invalid_requests_fail_loudly() {
    let (d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 4096).unwrap();
    assert_eq!(store.register_disk("d", 128 * KIB, 4096).unwrap().size, 128 * KIB);
    // A smaller size is refused (a larger one is a grown disk: a_grown_disk_keeps_older_points_at_their_size).
    assert!(matches!(store.register_disk("d", 64 * KIB, 4096), Err(StoreError::DiskMismatch { .. })));
    assert!(matches!(store.register_disk("d", 128 * KIB, 512), Err(StoreError::DiskMismatch { .. })));
    assert!(matches!(store.register_disk("../x", 4096, 512), Err(StoreError::InvalidName { .. })));
    assert!(matches!(store.register_disk("e", 1000, 512), Err(StoreError::InvalidGeometry { .. })));
    assert!(matches!(store.register_disk("e", 4096, 1000), Err(StoreError::InvalidGeometry { .. })));
    assert!(matches!(store.disk("nope"), Err(StoreError::UnknownDisk(_))));
    assert!(matches!(store.open_point("d", PointSel::Latest), Err(StoreError::NoPoint(_))));

    let h = put(&store, &[1u8; 4096]);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    assert!(matches!(p.add_chunk(512, 4096, h), Err(StoreError::Unaligned { .. })));
    assert!(matches!(p.add_chunk(128 * KIB, 4096, h), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(p.add_zero(u64::MAX - 4095, 4096), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(p.add_chunk(0, 4096, [0; 32]), Err(StoreError::MissingChunk(_))));
    assert!(matches!(
        p.add_chunk(0, 8192, h),
        Err(StoreError::ChunkLength { stored: 4096, given: 8192, .. })
    ));
    let info = p.commit(1, Consistency::Crash).unwrap();
    let mut q = store.begin("d", 2, GenerationKind::Incremental, Some(info.id)).unwrap();
    assert!(matches!(q.checkpoint(0), Err(StoreError::NotInitial)));
    let reader = store.open_point("d", PointSel::Id(1)).unwrap();
    assert!(matches!(reader.read_at(&mut [0u8; 2], 128 * KIB - 1), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(store.tag("d", 1, "a\tb"), Err(StoreError::InvalidName { .. })));
    assert!(matches!(store.tag("d", 5, "x"), Err(StoreError::UnknownPoint { .. })));

    // A directory that is not a store, and a marker of a future version.
    let other = d.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("file"), b"x").unwrap();
    assert!(matches!(Store::open(&other), Err(StoreError::NotAStore(_))));
    let marker = store.root().join(MARKER);
    let mut m = fs::read(&marker).unwrap();
    m[8] = 2;
    fs::write(&marker, &m).unwrap();
    let root = store.root().to_path_buf();
    drop(store);
    assert!(matches!(Store::open(&root), Err(StoreError::Format { source: FormatError::Version(2), .. })));
}

#[test]
fn an_interrupted_initial_copy_resumes_from_its_checkpoint() {
    let (_d, store) = new_store(64 * KIB);
    let size = 512 * KIB;
    store.register_disk("d", size, 512).unwrap();
    let mut rng = Rng(99);
    let mut model = vec![0u8; size as usize];
    let chunk = 32 * KIB;
    let mut p = store.begin("d", 3, GenerationKind::InitialFull, None).unwrap();
    assert_eq!(p.next_offset(), 0);
    for i in 0..6 {
        let data = rng.bytes(chunk as usize);
        p.add_chunk(i * chunk, chunk as u32, put(&store, &data)).unwrap();
        model[(i * chunk) as usize..][..chunk as usize].copy_from_slice(&data);
    }
    p.checkpoint(6 * chunk).unwrap();
    // Sent after the checkpoint but lost with the connection.
    let lost = put(&store, &rng.bytes(chunk as usize));
    p.add_chunk(6 * chunk, chunk as u32, lost).unwrap();
    drop(p);

    let store = reopen(store); // a restart
    let info = store.disk("d").unwrap();
    assert_eq!(info.initial, Some(InitialProgress { generation: 3, next_offset: 6 * chunk }));
    assert_eq!(info.latest, None);
    // A retention run meanwhile must keep what the checkpoint references.
    store.retain(&Retention::default()).unwrap();
    let mut p = store.resume_initial("d").unwrap().expect("a checkpoint");
    assert_eq!((p.generation(), p.next_offset(), p.kind()), (3, 6 * chunk, GenerationKind::InitialFull));
    for i in 6..16 {
        let data = rng.bytes(chunk as usize);
        p.add_chunk(i * chunk, chunk as u32, put(&store, &data)).unwrap();
        model[(i * chunk) as usize..][..chunk as usize].copy_from_slice(&data);
        if i == 10 {
            p.checkpoint((i + 1) * chunk).unwrap();
        }
    }
    let point = p.commit(77, Consistency::Crash).unwrap();
    assert_eq!(point.generation, 3);
    assert!(point_image(&store, "d", point.id) == model);
    assert_eq!(store.disk("d").unwrap().initial, None);
    assert!(store.resume_initial("d").unwrap().is_none());
}

#[test]
fn a_stale_checkpoint_of_a_committed_copy_is_dropped() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 4096, put(&store, &[3; 4096])).unwrap();
    p.checkpoint(4096).unwrap();
    let saved = fs::read(store.parts().layout.disk_dir("d").join(INITIAL_FILE)).unwrap();
    p.commit(1, Consistency::Crash).unwrap();
    // A crash between the commit and the checkpoint's removal.
    fs::write(store.parts().layout.disk_dir("d").join(INITIAL_FILE), saved).unwrap();
    assert!(store.resume_initial("d").unwrap().is_none());
    assert_eq!(store.disk("d").unwrap().initial, None);
}

/// Commits a point whose only data is one fresh chunk; returns the point and the chunk.
fn one_chunk_point(store: &Store, disk: &str, generation: u64, fill: u8, cut: u64) -> (PointInfo, [u8; 32]) {
    let base = store.disk(disk).unwrap().latest.map(|l| l.id);
    let kind = if base.is_some() { GenerationKind::Incremental } else { GenerationKind::InitialFull };
    let mut p = store.begin(disk, generation, kind, base).unwrap();
    let h = put(store, &[fill; 4096]);
    p.add_chunk(0, 4096, h).unwrap();
    (p.commit(cut, Consistency::Crash).unwrap(), h)
}

#[test]
fn retention_keeps_the_latest_and_collects_exactly_the_unreferenced() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let now = store::now_unix_ms();
    let mut chunks = Vec::new();
    for g in 1..=5 {
        // Each point overwrites the same block: older chunks are referenced only by older points.
        let (_, h) = one_chunk_point(&store, "d", g, g as u8, now - (10 - g) * 3_600_000);
        chunks.push(h);
    }
    assert_eq!(objects(&store, CHUNKS).len(), 5);

    // No rule: nothing is pruned, nothing is referenced-free.
    let r = store.retain(&Retention::default()).unwrap();
    assert!(r.points_removed.is_empty());
    assert_eq!((r.chunks_removed, r.pages_removed), (0, 0));

    store.tag("d", 2, "before upgrade").unwrap();
    store.tag("d", 2, "before upgrade").unwrap();
    let reader = store.open_point("d", PointSel::Id(3)).unwrap();
    // Points 1..=5 have cuts 9h..5h old; keep 6.5 hours: points 4 and 5 by age.
    let r = store
        .retain(&Retention {
            keep_last: Some(1),
            max_age: Some(std::time::Duration::from_secs(6 * 3600 + 1800)),
        })
        .unwrap();
    assert_eq!(r.points_removed, vec![("d".to_string(), 1)]);
    assert_eq!(r.chunks_removed, 1);
    assert_eq!(objects(&store, CHUNKS), hexes(&chunks[1..]));

    drop(reader);
    store.untag("d", 2, "before upgrade").unwrap();
    let r = store.retain(&Retention { keep_last: Some(0), max_age: None }).unwrap();
    assert_eq!(r.points_removed, vec![("d".to_string(), 2), ("d".to_string(), 3), ("d".to_string(), 4)]);
    assert_eq!(r.chunks_removed, 3);
    assert_eq!(objects(&store, CHUNKS), hexes([&chunks[4]]));
    let ids: Vec<u64> = store.points("d").unwrap().iter().map(|p| p.id).collect();
    assert_eq!(ids, [5], "the latest point is never pruned");
    assert_eq!(point_image(&store, "d", 5)[..4096], [5u8; 4096]);
    // Pages and roots of pruned points are gone too: one point, one page, one root.
    assert_eq!(objects(&store, PAGES).len(), 1);
    let points_dir = store.parts().layout.points_dir("d");
    assert_eq!(fs::read_dir(points_dir).unwrap().count(), 2);
    // New ids continue after the latest.
    assert_eq!(one_chunk_point(&store, "d", 6, 6, now).0.id, 6);
}

#[test]
fn retention_keeps_what_pending_generations_use() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    one_chunk_point(&store, "d", 1, 1, 1);
    let (second, _) = one_chunk_point(&store, "d", 2, 2, 2);

    // A generation built on point 1 while point 1 is pruned under it.
    let mut p = store.begin("d", 3, GenerationKind::Incremental, Some(1)).unwrap();
    let added = put(&store, &[3; 4096]);
    p.add_chunk(8192, 4096, added).unwrap();
    let uploaded = put(&store, &[4; 4096]); // uploaded, not yet added
    let r = store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
    assert_eq!(r.points_removed, vec![("d".to_string(), 1)]);
    assert!(store.has_chunk(&added) && store.has_chunk(&uploaded));
    p.add_chunk(16384, 4096, uploaded).unwrap();
    let third = p.commit(3, Consistency::Crash).unwrap();
    let image = point_image(&store, "d", third.id);
    assert_eq!(image[..4096], [1u8; 4096], "point 1's data, kept for the pending generation");
    assert_eq!(image[8192..12288], [3u8; 4096]);
    assert_eq!(image[16384..20480], [4u8; 4096]);
    assert_eq!(point_image(&store, "d", second.id)[..4096], [2u8; 4096]);

    // An upload outside any pending generation is not protected: add_chunk says so.
    let orphan = put(&store, &[9; 4096]);
    assert!(store.has_chunk(&orphan), "staged");
    let r = store.retain(&Retention::default()).unwrap();
    assert_eq!(r.staged_removed, 1);
    assert!(!store.has_chunk(&orphan));
    assert!(incoming(&store).is_empty());
    let mut p = store.begin("d", 4, GenerationKind::Incremental, Some(third.id)).unwrap();
    assert!(matches!(p.add_chunk(0, 4096, orphan), Err(StoreError::MissingChunk(_))));
}

#[test]
fn a_large_generation_spills_pages_and_keeps_them_through_retention() {
    let (_d, store) = new_store(4 * KIB);
    let regions = (pending::MAX_DIRTY_REGIONS as u64) * 3;
    let size = regions * 4 * KIB;
    store.register_disk("d", size, 512).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(5);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    for r in 0..regions {
        let data = rng.bytes(1024);
        p.add_chunk(r * 4 * KIB + 512, 1024, put(&store, &data)).unwrap();
        model[(r * 4 * KIB + 512) as usize..][..1024].copy_from_slice(&data);
        if r == regions / 2 {
            store.retain(&Retention::default()).unwrap();
        }
    }
    assert!(!objects(&store, PAGES).is_empty(), "pages written before the commit");
    store.retain(&Retention::default()).unwrap();
    // Revisit a spilled region: it is loaded back from its page.
    p.add_zero(512, 512).unwrap();
    model[512..1024].fill(0);
    let point = p.commit(1, Consistency::Crash).unwrap();
    assert!(point_image(&store, "d", point.id) == model);
    store.retain(&Retention::default()).unwrap();
    assert_eq!(objects(&store, PAGES).len() as u64, regions);
    assert!(point_image(&store, "d", point.id) == model);
}

/// (disk, point id, image) of a point expected to survive.
type Kept = Vec<(&'static str, u64, Vec<u8>)>;

/// Three points on two disks sharing chunks; returns the images of the points retention keeps
/// with `keep_last: Some(1)` and the chunks they reference.
fn gc_fixture(store: &Store) -> (Kept, HashSet<String>) {
    let mut rng = Rng(21);
    let mut kept = Vec::new();
    for disk in ["a", "b"] {
        store.register_disk(disk, 512 * KIB, 512).unwrap();
        let mut model = vec![0u8; 512 * KIB as usize];
        let mut base = None;
        for g in 1..=3 {
            let info = random_generation(store, &mut rng, disk, g, base, &mut model, 20);
            base = Some(info.id);
        }
        kept.push((disk, 3, model));
    }
    // The chunks the two latest points reference (read back from their pages).
    let mut referenced = HashSet::new();
    for disk in ["a", "b"] {
        let record = objects::disk_record(store.parts(), disk).unwrap();
        let (_, sum) = objects::point_record(store.parts(), disk, 3).unwrap();
        let root = objects::load_root(store.parts(), &record, 3, &sum).unwrap();
        for page in root.values() {
            referenced.extend(hexes(objects::read_page(store.parts(), page).unwrap().chunks()));
        }
    }
    (kept, referenced)
}

fn assert_points_restore(store: &Store, kept: &[(&str, u64, Vec<u8>)]) {
    for (disk, id, image) in kept {
        assert!(point_image(store, disk, *id) == *image, "{disk} point {id} differs");
        let out = tempfile::NamedTempFile::new().unwrap();
        store.open_point(disk, PointSel::Id(*id)).unwrap().restore_to(out.path(), &mut |_, _| {}).unwrap();
        assert!(fs::read(out.path()).unwrap() == *image);
    }
}

#[test]
fn a_crash_while_or_after_pruning_loses_nothing_kept() {
    // After pruning point 1 of disk "a" only; after pruning everything, before the sweep.
    for (at, after, left_on_a) in [("gc.prune", 1, 2), ("gc.after_prune", 0, 1)] {
        let (_d, store) = new_store(64 * KIB);
        let (kept, referenced) = gc_fixture(&store);
        store.inject_fault(at, after);
        assert!(store.retain(&Retention { keep_last: Some(1), max_age: None }).is_err());
        let root = store.root().to_path_buf();
        drop(store);
        let store = Store::open(&root).unwrap();
        assert_eq!(store.points("a").unwrap().len(), left_on_a, "{at}");
        assert_points_restore(&store, &kept);
        store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
        assert_eq!(objects(&store, CHUNKS), referenced);
        assert_points_restore(&store, &kept);
    }
}

#[test]
fn retention_refuses_a_disk_whose_record_is_missing() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let (_, h) = one_chunk_point(&store, "d", 1, 1, 1);
    fs::remove_file(store.parts().layout.disk_dir("d").join("disk.json")).unwrap();
    let e = store.retain(&Retention::default()).unwrap_err();
    assert!(matches!(e, StoreError::Format { source: FormatError::Missing, .. }), "{e}");
    assert!(store.has_chunk(&h), "nothing swept");
    // An interrupted registration (no record, no points) is skipped.
    fs::create_dir_all(store.parts().layout.points_dir("half")).unwrap();
    fs::write(store.parts().layout.disk_dir("d").join("disk.json"), b"{}").unwrap();
    assert!(matches!(store.retain(&Retention::default()), Err(StoreError::Format { .. })));
}

#[test]
fn an_upload_replaces_a_stored_copy_with_a_bad_header() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let data = Rng(1).bytes(4096);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    let h = put(&store, &data);
    p.add_chunk(0, 4096, h).unwrap();
    let first = p.commit(1, Consistency::Crash).unwrap();
    let path = store.parts().layout.chunk_path(&h);
    fs::write(&path, b"garbage").unwrap();
    // The damaged copy does not count as stored: it is quarantined, the upload is staged, and
    // the next commit that references it (a resync: the latest point is damaged) heals it.
    put(&store, &data);
    assert_eq!(incoming(&store).len(), 1);
    let mut p = store.begin("d", 2, GenerationKind::InitialFull, Some(first.id)).unwrap();
    p.add_chunk(4096, 4096, h).unwrap();
    p.commit(2, Consistency::Crash).unwrap();
    assert_eq!(objects::read_chunk(store.parts(), &h).unwrap(), data);
    assert!(point_image(&store, "d", 1)[..4096] == data[..], "the older point reads it too");
}

#[test]
fn a_crash_in_the_middle_of_a_sweep_loses_nothing_kept() {
    for after in [0, 1, 7, 40] {
        let (_d, store) = new_store(64 * KIB);
        let (kept, referenced) = gc_fixture(&store);
        let count = |s: &Store| objects(s, CHUNKS).len() + objects(s, PAGES).len();
        let before = count(&store);
        store.inject_fault("gc.delete", after);
        assert!(store.retain(&Retention { keep_last: Some(1), max_age: None }).is_err());
        let root = store.root().to_path_buf();
        drop(store);
        let store = Store::open(&root).unwrap();
        assert_eq!(before - count(&store), after, "the crash came after {after} deletions");
        assert_points_restore(&store, &kept);
        store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
        assert_eq!(objects(&store, CHUNKS), referenced, "after {after} deletions");
        assert_points_restore(&store, &kept);
    }
}

#[test]
fn a_crash_before_the_point_metadata_leaves_no_point() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let (first, _) = one_chunk_point(&store, "d", 1, 1, 1);
    let pages_before = objects(&store, PAGES);
    store.inject_fault("commit.before_metadata", 0);
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    p.add_chunk(65536, 4096, put(&store, &[2; 4096])).unwrap();
    assert!(p.commit(2, Consistency::Crash).is_err());
    let root = store.root().to_path_buf();
    drop(store);
    let store = Store::open(&root).unwrap();
    assert!(incoming(&store).is_empty());
    assert_eq!(store.disk("d").unwrap().latest.unwrap(), first);
    assert_eq!(store.point_for_generation("d", 2).unwrap(), None);
    let r = store.retain(&Retention::default()).unwrap();
    assert_eq!((r.chunks_removed, r.pages_removed), (1, 1));
    assert_eq!(objects(&store, PAGES), pages_before);
    assert_eq!(fs::read_dir(store.parts().layout.points_dir("d")).unwrap().count(), 2, "orphan root removed");
    // The generation can be sent again and gets the next id.
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    p.add_chunk(65536, 4096, put(&store, &[2; 4096])).unwrap();
    assert_eq!(p.commit(2, Consistency::Crash).unwrap().id, 2);
}

#[test]
fn restore_writes_a_sparse_image() {
    let (d, store) = new_store(1024 * KIB);
    let size = 64 * 1024 * KIB;
    store.register_disk("d", size, 4096).unwrap();
    let mut rng = Rng(8);
    let a = rng.bytes(1 << 20);
    let b = rng.bytes(4096);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 1 << 20, put(&store, &a)).unwrap();
    p.add_chunk(40 << 20, 4096, put(&store, &b)).unwrap();
    p.add_zero(8 << 20, 8 << 20).unwrap();
    p.commit(1, Consistency::Crash).unwrap();

    let out = d.path().join("image.raw");
    fs::write(&out, vec![0xFFu8; 1 << 20]).unwrap(); // an old file is replaced
    let reader = store.open_point("d", PointSel::Latest).unwrap();
    let mut calls = Vec::new();
    let report = reader.restore_to(&out, &mut |done, total| calls.push((done, total))).unwrap();
    assert_eq!((report.bytes_written, report.bytes_zero), ((1 << 20) + 4096, size - (1 << 20) - 4096));
    assert_eq!(calls.first(), Some(&(0, size)));
    assert_eq!(calls.last(), Some(&(size, size)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));

    let meta = fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), size);
    let allocated = meta.blocks() * 512;
    assert!(allocated < 4 << 20, "{allocated} bytes allocated for 1 MiB of data: no holes");
    let image = fs::read(&out).unwrap();
    assert!(image[..1 << 20] == a[..]);
    assert!(image[40 << 20..(40 << 20) + 4096] == b[..]);
    assert!(image[1 << 20..40 << 20].iter().all(|x| *x == 0));
    assert!(image[(40 << 20) + 4096..].iter().all(|x| *x == 0));
    assert_eq!(
        reader.extents(0, size).unwrap(),
        vec![
            (0, 1 << 20, ExtentKind::Data),
            (1 << 20, (40 << 20) - (1 << 20), ExtentKind::Zero),
            (40 << 20, 4096, ExtentKind::Data),
            ((40 << 20) + 4096, size - (40 << 20) - 4096, ExtentKind::Zero),
        ]
    );
}

#[test]
fn concurrent_uploads_of_one_chunk_and_parallel_commits() {
    let (_d, store) = new_store(64 * KIB);
    let data = Arc::new(Rng(4).bytes(1 << 20));
    let hash = *blake3::hash(&data).as_bytes();
    let z = Arc::new(zstd::bulk::compress(&data, 1).unwrap());
    for d in 0..4 {
        store.register_disk(&format!("disk{d}"), 4 << 20, 512).unwrap();
    }
    std::thread::scope(|s| {
        for d in 0..4 {
            let (store, z) = (store.clone(), z.clone());
            s.spawn(move || {
                let disk = format!("disk{d}");
                let mut base = None;
                for g in 1..=3u64 {
                    let kind = if base.is_some() {
                        GenerationKind::Incremental
                    } else {
                        GenerationKind::InitialFull
                    };
                    let mut p = store.begin(&disk, g, kind, base).unwrap();
                    store.put_chunk(&hash, 1 << 20, &z).unwrap();
                    p.add_chunk((g - 1) << 20, 1 << 20, hash).unwrap();
                    base = Some(p.commit(g, Consistency::Crash).unwrap().id);
                    if d == 0 {
                        store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
                    }
                }
            });
        }
    });
    assert_eq!(objects(&store, CHUNKS), hexes([&hash]), "one file, no temporaries");
    for d in 0..4 {
        let image = read_all(&store.open_point(&format!("disk{d}"), PointSel::Latest).unwrap());
        for g in 0..3 {
            assert!(image[g << 20..(g + 1) << 20] == data[..]);
        }
        assert!(image[3 << 20..].iter().all(|x| *x == 0));
    }
}

// ---------------------------------------------------------------------------------------------
// The model: random generations on two disks, random retention, every point checked.

const P_REGION: u64 = 16 * KIB;
const P_SIZE: u64 = 8 * P_REGION;
const P_BLOCKS: u64 = P_SIZE / 512;

#[derive(Debug, Clone)]
enum Ext {
    /// Blocks `start..start + len` from the pool chunk `seed` (same seed and length: same chunk).
    Data {
        start: u64,
        len: u64,
        seed: u8,
    },
    Zero {
        start: u64,
        len: u64,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Generation { disk: usize, exts: Vec<Ext> },
    Retain { keep_last: usize },
    Tag { disk: usize, nth: usize },
}

fn ext() -> impl Strategy<Value = Ext> {
    (0..P_BLOCKS, 1..48u64, 0..4u8, 0..5u8).prop_map(|(start, len, seed, kind)| {
        let len = len.min(P_BLOCKS - start);
        if kind == 0 {
            Ext::Zero { start, len }
        } else {
            Ext::Data { start, len, seed }
        }
    })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..2usize, prop::collection::vec(ext(), 0..8)).prop_map(|(disk, exts)| Step::Generation { disk, exts }),
        2 => (0..3usize).prop_map(|keep_last| Step::Retain { keep_last }),
        1 => (0..2usize, 0..8usize).prop_map(|(disk, nth)| Step::Tag { disk, nth }),
    ]
}

/// A model point: per block, the chunk (its data) and block index within it, or zeroes.
type ModelPoint = Vec<Option<([u8; 32], u64)>>;

struct ModelDisk {
    points: BTreeMap<u64, (ModelPoint, bool)>,
    generation: u64,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..14)) {
        let (_d, store) = new_store(P_REGION);
        let names = ["a", "b"];
        let mut chunks: BTreeMap<[u8; 32], Vec<u8>> = BTreeMap::new();
        let mut disks: Vec<ModelDisk> = names
            .iter()
            .map(|n| {
                store.register_disk(n, P_SIZE, 512).unwrap();
                ModelDisk { points: BTreeMap::new(), generation: 0 }
            })
            .collect();
        for step in steps {
            match step {
                Step::Generation { disk, exts } => {
                    let m = &mut disks[disk];
                    m.generation += 1 + (exts.len() as u64 % 3);
                    let base = m.points.keys().next_back().copied();
                    let kind = if base.is_some() { GenerationKind::Incremental } else { GenerationKind::InitialFull };
                    let mut p = store.begin(names[disk], m.generation, kind, base).unwrap();
                    let mut image: ModelPoint = base.map_or_else(|| vec![None; P_BLOCKS as usize], |b| m.points[&b].0.clone());
                    for e in exts {
                        match e {
                            Ext::Data { start, len, seed } => {
                                let data = Rng(u64::from(seed) * 1000 + len + 1).bytes((len * 512) as usize);
                                let h = put(&store, &data);
                                chunks.insert(h, data);
                                p.add_chunk(start * 512, (len * 512) as u32, h).unwrap();
                                for i in 0..len {
                                    image[(start + i) as usize] = Some((h, i));
                                }
                            }
                            Ext::Zero { start, len } => {
                                p.add_zero(start * 512, len * 512).unwrap();
                                for i in 0..len {
                                    image[(start + i) as usize] = None;
                                }
                            }
                        }
                    }
                    let info = p.commit(m.generation, Consistency::Crash).unwrap();
                    prop_assert_eq!(Some(info.id), Some(base.map_or(1, |b| b + 1)));
                    m.points.insert(info.id, (image, false));
                }
                Step::Retain { keep_last } => {
                    store.retain(&Retention { keep_last: Some(keep_last), max_age: None }).unwrap();
                    for m in &mut disks {
                        let ids: Vec<u64> = m.points.keys().copied().collect();
                        let cut = ids.len().saturating_sub(keep_last.max(1));
                        for id in &ids[..cut] {
                            if !m.points[id].1 {
                                m.points.remove(id);
                            }
                        }
                    }
                }
                Step::Tag { disk, nth } => {
                    let m = &mut disks[disk];
                    if let Some((&id, point)) = m.points.iter_mut().nth(nth) {
                        store.tag(names[disk], id, "keep").unwrap();
                        point.1 = true;
                    }
                }
            }
            // Every point the model has, and no other, restores to its image.
            for (disk, m) in disks.iter().enumerate() {
                let ids: Vec<u64> = store.points(names[disk]).unwrap().iter().map(|p| p.id).collect();
                prop_assert_eq!(&ids, &m.points.keys().copied().collect::<Vec<_>>());
                for (&id, (image, _)) in &m.points {
                    let got = point_image(&store, names[disk], id);
                    for (b, owner) in image.iter().enumerate() {
                        let want: &[u8] = match owner {
                            None => &[0u8; 512],
                            Some((h, i)) => &chunks[h][*i as usize * 512..][..512],
                        };
                        prop_assert!(got[b * 512..][..512] == *want, "disk {} point {} block {}", disk, id, b);
                    }
                }
            }
        }
        // After a sweep exactly the chunks some remaining point shows a block of are left.
        store.retain(&Retention::default()).unwrap();
        let referenced: HashSet<[u8; 32]> = disks
            .iter()
            .flat_map(|m| m.points.values().flat_map(|(image, _)| image.iter().flatten().map(|(h, _)| *h)))
            .collect();
        prop_assert_eq!(objects(&store, CHUNKS), hexes(&referenced));
    }
}

#[test]
fn store_directory_layout() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    one_chunk_point(&store, "d", 1, 1, 1);
    let root = store.root();
    let mut top: Vec<String> =
        fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    top.sort();
    assert_eq!(top, ["chunks", "disks", "incoming", "pages", "readers.lock", "siterep-store", "writer.lock"]);
    assert!(incoming(&store).is_empty(), "the commit promoted its chunk");
    assert_eq!(fs::read_dir(root.join("chunks")).unwrap().count(), 256);
    let d: &Path = &root.join("disks/d");
    assert!(d.join("disk.json").is_file());
    assert!(d.join("points/00000000000000000001.json").is_file());
    assert!(d.join("points/00000000000000000001.root").is_file());
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("points/00000000000000000001.json")).unwrap()).unwrap();
    assert_eq!(json["format"], "siterep.point");
    assert_eq!(json["version"], 1);
    assert_eq!(json["consistency"], "crash");
}

// ---------------------------------------------------------------------------------------------
// Staged chunks: received without a sync, made durable by the commit that needs them.

#[test]
fn staged_chunks_are_visible_and_the_commit_makes_them_durable() {
    let (_d, store) = new_store(64 * KIB);
    let size = 1024 * KIB;
    store.register_disk("d", size, 4096).unwrap();
    let mut rng = Rng(31);
    let mut model = vec![0u8; size as usize];
    let mut hashes = Vec::new();
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    let mut first = Vec::new();
    for i in 0..20u64 {
        let data = rng.bytes(4096);
        let h = put(&store, &data);
        assert!(store.has_chunk(&h), "a staged chunk is visible at once");
        p.add_chunk(i * 8192, 4096, h).unwrap();
        model[(i * 8192) as usize..][..4096].copy_from_slice(&data);
        hashes.push(h);
        if i == 0 {
            first = data;
        }
    }
    // Staged: one file each in incoming/, nothing in chunks/ yet.
    assert!(objects(&store, CHUNKS).is_empty());
    assert_eq!(incoming(&store).len(), 20);
    assert_eq!(staged_count(&store), 20);
    // Uploading a staged chunk again writes nothing.
    put(&store, &first);
    assert_eq!(incoming(&store).len(), 20);
    // A chunk staged and then overwritten within the generation is promoted all the same.
    let info = p.commit(1, Consistency::Crash).unwrap();
    assert_eq!(objects(&store, CHUNKS), hexes(&hashes));
    assert!(incoming(&store).is_empty());
    assert_eq!(staged_count(&store), 0);
    assert!(point_image(&store, "d", info.id) == model);
    // Durable: a restart keeps them.
    let root = store.root().to_path_buf();
    drop(store);
    let store = Store::open(&root).unwrap();
    assert!(hashes.iter().all(|h| store.has_chunk(h)));
    assert!(point_image(&store, "d", info.id) == model);
}

#[test]
fn a_crash_before_the_commit_discards_staged_chunks() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let (first, committed) = one_chunk_point(&store, "d", 1, 1, 1);
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    let staged = put(&store, &[2; 4096]);
    p.add_chunk(4096, 4096, staged).unwrap();
    assert!(store.has_chunk(&staged));
    assert_eq!(incoming(&store).len(), 1);
    // The process dies: the pending point and the store go without a commit.
    let root = store.root().to_path_buf();
    drop(p);
    drop(store);
    assert_eq!(fs::read_dir(root.join(INCOMING)).unwrap().count(), 1, "left behind");
    let store = Store::open(&root).unwrap();
    assert!(incoming(&store).is_empty(), "never synced, so never trusted");
    assert!(!store.has_chunk(&staged));
    assert!(store.has_chunk(&committed));
    assert_eq!(objects(&store, CHUNKS), hexes([&committed]));
    assert_eq!(store.disk("d").unwrap().latest.unwrap(), first);
}

#[test]
fn a_chunk_only_staged_before_a_crash_is_missing_after_it() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let (first, _) = one_chunk_point(&store, "d", 1, 1, 1);
    let data = Rng(41).bytes(4096);
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    let h = put(&store, &data);
    p.add_chunk(4096, 4096, h).unwrap();
    let root = store.root().to_path_buf();
    drop(p);
    drop(store);

    // After the restart the agent sends the generation again; it believes the server has the
    // chunk (it answered has_chunk before the crash) and sends only its hash.
    let store = Store::open(&root).unwrap();
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    assert!(!store.has_chunk(&h));
    assert!(matches!(p.add_chunk(4096, 4096, h), Err(StoreError::MissingChunk(m)) if m == h));
    // It uploads it again (its retry), and the commit succeeds.
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(first.id)).unwrap();
    put(&store, &data);
    p.add_chunk(4096, 4096, h).unwrap();
    let second = p.commit(2, Consistency::Crash).unwrap();
    assert_eq!(point_image(&store, "d", second.id)[4096..8192], data[..]);
}

#[test]
fn a_chunk_staged_by_one_session_is_promoted_once_by_the_first_commit_that_needs_it() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("a", 128 * KIB, 512).unwrap();
    store.register_disk("b", 128 * KIB, 512).unwrap();
    let data = Rng(43).bytes(8192);
    let mut pa = store.begin("a", 1, GenerationKind::InitialFull, None).unwrap();
    let mut pb = store.begin("b", 1, GenerationKind::InitialFull, None).unwrap();
    let h = put(&store, &data);
    pa.add_chunk(0, 8192, h).unwrap();
    // Session b asks, learns the chunk is there, and sends only its hash.
    assert!(store.has_chunk(&h));
    pb.add_chunk(8192, 8192, h).unwrap();
    let b = pb.commit(1, Consistency::Crash).unwrap();
    assert_eq!(objects(&store, CHUNKS), hexes([&h]));
    assert!(incoming(&store).is_empty());
    let a = pa.commit(1, Consistency::Crash).unwrap();
    assert_eq!(objects(&store, CHUNKS), hexes([&h]));
    let store = reopen(store);
    assert_eq!(point_image(&store, "a", a.id)[..8192], data[..]);
    assert_eq!(point_image(&store, "b", b.id)[8192..16384], data[..]);
}

#[test]
fn a_checkpoint_makes_its_staged_chunks_durable() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    let h = put(&store, &[6; 4096]);
    p.add_chunk(0, 4096, h).unwrap();
    p.checkpoint(4096).unwrap();
    assert_eq!(objects(&store, CHUNKS), hexes([&h]));
    assert!(incoming(&store).is_empty());
    let root = store.root().to_path_buf();
    drop(p);
    drop(store);
    let store = Store::open(&root).unwrap();
    let p = store.resume_initial("d").unwrap().unwrap();
    let point = p.commit(1, Consistency::Crash).unwrap();
    assert_eq!(point_image(&store, "d", point.id)[..4096], [6u8; 4096]);
}

#[test]
fn a_failed_sync_discards_staged_chunks_and_commits_that_need_them_fail_loudly() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("a", 128 * KIB, 512).unwrap();
    store.register_disk("b", 128 * KIB, 512).unwrap();
    let data = Rng(47).bytes(4096);
    let mut pa = store.begin("a", 1, GenerationKind::InitialFull, None).unwrap();
    let mut pb = store.begin("b", 1, GenerationKind::InitialFull, None).unwrap();
    let h = put(&store, &data);
    pa.add_chunk(0, 4096, h).unwrap();
    pb.add_chunk(0, 4096, h).unwrap();
    store.inject_fault("promote.syncfs", 0);
    assert!(matches!(pa.commit(1, Consistency::Crash), Err(StoreError::Io { .. })));
    store.clear_faults();
    // The write-back error may have been this chunk's: it is not trusted any more.
    assert!(!store.has_chunk(&h));
    assert!(incoming(&store).is_empty());
    assert!(objects(&store, CHUNKS).is_empty());
    assert!(matches!(pb.commit(1, Consistency::Crash), Err(StoreError::MissingChunk(m)) if m == h));
    assert_eq!(store.disk("b").unwrap().latest, None);
    // The agents send the generations again, with the chunk.
    for disk in ["a", "b"] {
        let mut p = store.begin(disk, 1, GenerationKind::InitialFull, None).unwrap();
        put(&store, &data);
        p.add_chunk(0, 4096, h).unwrap();
        let point = p.commit(1, Consistency::Crash).unwrap();
        assert_eq!(point_image(&store, disk, point.id)[..4096], data[..]);
    }
}

#[test]
fn a_failed_name_sync_is_finished_by_the_next_commit_that_needs_the_chunk() {
    let (_d, store) = new_store(64 * KIB);
    for disk in ["a", "b", "c"] {
        store.register_disk(disk, 128 * KIB, 512).unwrap();
    }
    let data = Rng(53).bytes(4096);
    let mut pa = store.begin("a", 1, GenerationKind::InitialFull, None).unwrap();
    let mut pb = store.begin("b", 1, GenerationKind::InitialFull, None).unwrap();
    let h = put(&store, &data);
    pa.add_chunk(0, 4096, h).unwrap();
    pb.add_chunk(0, 4096, h).unwrap();
    // Renamed into chunks/, but the directory sync fails: the chunk stays staged.
    store.inject_fault("promote.names", 0);
    assert!(pa.commit(1, Consistency::Crash).is_err());
    store.clear_faults();
    assert_eq!(objects(&store, CHUNKS), hexes([&h]));
    assert_eq!(staged_count(&store), 1);
    // A failed syncfs now discards what is still in incoming/, not the chunk already moved.
    let mut pc = store.begin("c", 1, GenerationKind::InitialFull, None).unwrap();
    let other = put(&store, &[7; 4096]);
    pc.add_chunk(0, 4096, other).unwrap();
    store.inject_fault("promote.syncfs", 0);
    assert!(pc.commit(1, Consistency::Crash).is_err());
    store.clear_faults();
    assert!(!store.has_chunk(&other));
    assert!(store.has_chunk(&h));
    assert_eq!(staged_count(&store), 1);
    // b's commit finds the chunk gone from incoming/ but in chunks/, and syncs its name.
    let b = pb.commit(1, Consistency::Crash).unwrap();
    assert_eq!(staged_count(&store), 0);
    let store = reopen(store);
    assert_eq!(point_image(&store, "b", b.id)[..4096], data[..]);
}

#[test]
fn retention_keeps_staged_chunks_of_pending_generations_and_removes_stale_files() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    // Uploaded before the generation began (so not protected as a recent upload), then
    // referenced and overwritten: its commit still promotes it, so retention keeps it.
    let early = put(&store, &[1; 4096]);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 4096, early).unwrap();
    let late = put(&store, &[2; 4096]);
    p.add_chunk(0, 4096, late).unwrap();
    fs::write(store.root().join(INCOMING).join("left-by-a-failed-upload"), b"x").unwrap();
    let r = store.retain(&Retention::default()).unwrap();
    assert_eq!(r.staged_removed, 0);
    assert_eq!(incoming(&store).len(), 2, "the stale file is removed, the staged ones kept");
    assert!(store.has_chunk(&early) && store.has_chunk(&late));
    let point = p.commit(1, Consistency::Crash).unwrap();
    assert_eq!(point_image(&store, "d", point.id)[..4096], [2u8; 4096]);
    store.retain(&Retention::default()).unwrap();
    assert_eq!(objects(&store, CHUNKS), hexes([&late]));
}

#[test]
fn many_sessions_stage_and_commit_shared_chunks_at_once() {
    let (_d, store) = new_store(64 * KIB);
    let mut rng = Rng(59);
    let shared: Vec<Vec<u8>> = (0..16).map(|_| rng.bytes(4096)).collect();
    let sessions = 6;
    for d in 0..sessions {
        store.register_disk(&format!("d{d}"), 256 * KIB, 4096).unwrap();
    }
    let images: Vec<(String, u64, Vec<u8>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|d| {
                let (store, shared) = (store.clone(), &shared);
                s.spawn(move || {
                    let disk = format!("d{d}");
                    let mut rng = Rng(100 + d as u64);
                    let mut model = vec![0u8; 256 * KIB as usize];
                    let mut base = None;
                    for g in 1..=4u64 {
                        let kind = if base.is_some() {
                            GenerationKind::Incremental
                        } else {
                            GenerationKind::InitialFull
                        };
                        let mut p = store.begin(&disk, g, kind, base).unwrap();
                        for i in 0..16u64 {
                            let block = rng.below(64);
                            let data = if i % 2 == 0 {
                                shared[rng.below(16) as usize].clone()
                            } else {
                                rng.bytes(4096)
                            };
                            let h = *blake3::hash(&data).as_bytes();
                            if !store.has_chunk(&h) || i % 3 == 0 {
                                put(&store, &data);
                            }
                            p.add_chunk(block * 4096, 4096, h).unwrap();
                            model[(block * 4096) as usize..][..4096].copy_from_slice(&data);
                        }
                        base = Some(p.commit(g, Consistency::Crash).unwrap().id);
                        if d == 0 && g == 2 {
                            store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
                        }
                    }
                    (disk, base.unwrap(), model)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(staged_count(&store), 0);
    assert!(incoming(&store).is_empty());
    let store = reopen(store);
    for (disk, id, model) in &images {
        assert!(point_image(&store, disk, *id) == *model, "{disk}");
    }
}

/// A restart: the store is closed (its writer lock released) and opened again.
fn reopen(store: Store) -> Store {
    let root = store.root().to_path_buf();
    drop(store);
    Store::open(&root).unwrap()
}

#[test]
fn one_writer_at_a_time_and_readers_beside_it() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    one_chunk_point(&store, "d", 1, 1, 1);
    one_chunk_point(&store, "d", 2, 2, 2);
    let root = store.root().to_path_buf();
    assert!(matches!(Store::open(&root), Err(StoreError::Locked(_))), "a second writer");
    // A staged chunk of the writer's survives a reader opening the store.
    let data = vec![7u8; 4096];
    let staged = put(&store, &data);
    let reader = Store::open_reader(&root).unwrap();
    assert!(store.has_chunk(&staged));
    assert_eq!(staged_count(&store), 1);
    assert_eq!(reader.points("d").unwrap().len(), 2);
    assert_eq!(point_image(&reader, "d", 1), point_image(&store, "d", 1));
    reader.tag("d", 1, "tested").unwrap();
    assert!(matches!(reader.register_disk("e", 128 * KIB, 512), Err(StoreError::ReadOnly(_))));
    assert!(matches!(
        reader.begin("d", 3, GenerationKind::Incremental, Some(2)),
        Err(StoreError::ReadOnly(_))
    ));
    assert!(matches!(reader.retain(&Retention::default()), Err(StoreError::ReadOnly(_))));
    // Retention waits for the reader to go.
    reader.untag("d", 1, "tested").unwrap();
    let policy = Retention { keep_last: Some(1), max_age: None };
    let r = store.retain(&policy).unwrap();
    assert!(r.deferred && r.points_removed.is_empty());
    drop(reader);
    let r = store.retain(&policy).unwrap();
    assert!(!r.deferred);
    assert_eq!(r.points_removed, [("d".to_string(), 1)]);
    // No store, no reader.
    assert!(matches!(Store::open_reader(&root.join("disks")), Err(StoreError::NotAStore(_))));
}

// ---------------------------------------------------------------------------------------------
// Damage: verification, quarantine, healing, resync on a damaged base, retention.

/// Flips one bit of the file at `path`, at `at` bytes from its end.
fn flip(path: &Path, from_end: usize) {
    let mut bytes = fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n - from_end] ^= 1;
    fs::write(path, bytes).unwrap();
}

fn page_file(store: &Store, page: &[u8; 32]) -> std::path::PathBuf {
    store.parts().layout.page_path(page)
}

/// The page of `region` in point `id` of `disk`.
fn page_of(store: &Store, disk: &str, id: u64, region: u32) -> [u8; 32] {
    let record = objects::disk_record(store.parts(), disk).unwrap();
    let (_, sum) = objects::point_record(store.parts(), disk, id).unwrap();
    objects::load_root(store.parts(), &record, id, &sum).unwrap()[&region]
}

/// Two points on a 256 KiB disk (64 KiB regions, 4 KiB blocks): point 1 has chunk `a` (16 KiB)
/// at 0 and `b` (8 KiB) at 64 KiB; point 2 adds `c` (4 KiB) at 128 KiB. Returns the chunks
/// and both images.
fn damage_fixture(store: &Store) -> ([[u8; 32]; 3], Vec<u8>, Vec<u8>) {
    store.register_disk("d", 256 * KIB, 4096).unwrap();
    let mut rng = Rng(77);
    let (a, b, c) = (rng.bytes(16384), rng.bytes(8192), rng.bytes(4096));
    let mut image = vec![0u8; 256 * KIB as usize];
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    let ha = put(store, &a);
    p.add_chunk(0, 16384, ha).unwrap();
    let hb = put(store, &b);
    p.add_chunk(64 * KIB, 8192, hb).unwrap();
    p.commit(1, Consistency::Crash).unwrap();
    image[..16384].copy_from_slice(&a);
    image[65536..65536 + 8192].copy_from_slice(&b);
    let first = image.clone();
    let mut p = store.begin("d", 2, GenerationKind::Incremental, Some(1)).unwrap();
    let hc = put(store, &c);
    p.add_chunk(128 * KIB, 4096, hc).unwrap();
    p.commit(2, Consistency::Crash).unwrap();
    image[131072..131072 + 4096].copy_from_slice(&c);
    ([ha, hb, hc], first, image)
}

#[test]
fn verify_names_a_damaged_chunk_with_its_points_and_ranges_and_an_upload_heals_it() {
    let (_d, store) = new_store(64 * KIB);
    let ([a, b, c], first, _) = damage_fixture(&store);
    let clean = store.verify(&VerifyOptions::default()).unwrap();
    assert!(clean.damaged.is_empty(), "{clean:?}");
    // Each object once, however many points name it.
    assert_eq!((clean.checked.points, clean.checked.roots, clean.checked.chunks), (2, 2, 3));
    assert!(store.needs_resync("d").unwrap().is_none());

    flip(&store.parts().layout.chunk_path(&a), 3);
    let r = store.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(r.damaged.len(), 1, "{r:?}");
    let d = &r.damaged[0];
    assert_eq!((d.kind, d.object.as_str(), d.quarantined), (ObjectKind::Chunk, hex(&a).as_str(), true));
    let deps: Vec<(u64, Vec<(u64, u64)>)> =
        d.dependents.iter().map(|d| (d.point, d.ranges.clone())).collect();
    assert_eq!(deps, [(1, vec![(0, 16384)]), (2, vec![(0, 16384)])]);
    assert!(r.points.iter().all(|p| !p.intact));
    // Quarantined: dedup never references it again, also after a restart.
    let store = reopen(store);
    assert!(!store.has_chunk(&a));
    assert!(store.has_chunk(&b) && store.has_chunk(&c));
    let reason = store.needs_resync("d").unwrap().expect("the latest point depends on it");
    assert!(reason.contains(&hex(&a)), "{reason}");
    assert!(matches!(
        store.begin("d", 3, GenerationKind::Incremental, Some(2)),
        Err(StoreError::DamagedBase { point: 2, .. })
    ));
    let mut p = store.begin("d", 3, GenerationKind::InitialFull, Some(2)).unwrap();
    assert!(matches!(p.add_chunk(192 * KIB, 16384, a), Err(StoreError::MissingChunk(h)) if h == a));
    // Verify reports it again, without reading it, as quarantined.
    let again = store.verify(&VerifyOptions::default()).unwrap();
    assert_eq!(again.damaged.len(), 1);
    assert!(again.damaged[0].reason.starts_with("quarantined"), "{}", again.damaged[0].reason);

    // The same data uploaded again heals every point that names it.
    put(&store, &first[..16384]);
    p.add_chunk(0, 16384, a).unwrap();
    p.commit(3, Consistency::Crash).unwrap();
    assert!(store.has_chunk(&a));
    assert!(point_image(&store, "d", 1) == first, "the old point restores again");
    assert!(store.needs_resync("d").unwrap().is_none());
    assert!(store.verify(&VerifyOptions::default()).unwrap().damaged.is_empty());
    assert!(!store.root().join("quarantine/chunks").join(hex(&a)).exists(), "the record is cleared");
}

#[test]
fn a_read_that_finds_damage_quarantines_it_and_dedup_then_stores_a_new_copy() {
    let (_d, store) = new_store(64 * KIB);
    let ([a, ..], first, _) = damage_fixture(&store);
    flip(&store.parts().layout.chunk_path(&a), 1);
    let reader = store.open_point("d", PointSel::Id(1)).unwrap();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(reader.read_at(&mut buf, 0), Err(StoreError::CorruptChunk { .. })));
    assert!(!store.has_chunk(&a), "a restore's read quarantined it");
    // An upload of the same hash is stored, not deduplicated onto the damaged copy.
    put(&store, &first[..16384]);
    assert_eq!(incoming(&store).len(), 1);
}

#[test]
fn block_hashes_answer_damaged_for_every_piece_of_a_damaged_chunk() {
    let (_d, store) = new_store(64 * KIB);
    let ([a, ..], _, image) = damage_fixture(&store);
    let zero = |n: u64| *blake3::hash(&vec![0u8; n as usize]).as_bytes();
    let want: Vec<[u8; 32]> = image.chunks(4096).map(|b| *blake3::hash(b).as_bytes()).collect();
    let reader = store.open_point("d", PointSel::Latest).unwrap();
    assert_eq!(reader.block_hashes(0, 256 * KIB, 4096, zero).unwrap(), want);
    // One bit of the compressed bytes (a literal: it still decompresses, and only one block's
    // bytes change): every block of the chunk is sent again.
    flip(&store.parts().layout.chunk_path(&a), 2000);
    let reader = store.open_point("d", PointSel::Latest).unwrap(); // no cached copy
    let got = reader.block_hashes(0, 256 * KIB, 4096, zero).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if i < 4 {
            assert_eq!(*g, wire::UNREADABLE_HASH, "piece {i} names the damaged chunk");
        } else {
            assert_eq!(g, w, "piece {i}");
        }
    }
    // A query covering part of the chunk only answers the same (the chunk is quarantined now).
    assert_eq!(reader.block_hashes(8192, 4096, 4096, zero).unwrap(), [wire::UNREADABLE_HASH]);
}

/// Resends what the base's hashes say differs from `image` (data as chunks, zero blocks as
/// zero extents), as the agent's resync does, and commits.
fn resync(store: &Store, generation: u64, base: u64, image: &[u8]) -> PointInfo {
    let zero = |n: u64| *blake3::hash(&vec![0u8; n as usize]).as_bytes();
    let mut p = store.begin("d", generation, GenerationKind::InitialFull, Some(base)).unwrap();
    let reader = store.open_point("d", PointSel::Id(base)).unwrap();
    let hashes = reader.block_hashes(0, image.len() as u64, 4096, zero).unwrap();
    for (i, (block, h)) in image.chunks(4096).zip(hashes).enumerate() {
        let at = i as u64 * 4096;
        if *blake3::hash(block).as_bytes() == h {
            continue;
        }
        if block.iter().all(|b| *b == 0) {
            p.add_zero(at, 4096).unwrap();
        } else {
            let h = put(store, block);
            p.add_chunk(at, 4096, h).unwrap();
        }
    }
    p.commit(generation, Consistency::Crash).unwrap()
}

#[test]
fn a_resync_on_a_base_with_a_damaged_page_or_root_makes_a_whole_point() {
    for damaged in ["page", "root"] {
        let (_d, store) = new_store(64 * KIB);
        let (_, _, image) = damage_fixture(&store);
        let path = match damaged {
            "page" => page_file(&store, &page_of(&store, "d", 2, 1)),
            _ => store.parts().layout.points_dir("d").join("00000000000000000002.root"),
        };
        flip(&path, 40);
        let r = store.verify(&VerifyOptions::default()).unwrap();
        assert_eq!(r.damaged.len(), 1, "{damaged}: {r:?}");
        // Points share pages: point 1 depends on the page of region 1 too.
        let deps: Vec<(u64, Vec<(u64, u64)>)> =
            r.damaged[0].dependents.iter().map(|d| (d.point, d.ranges.clone())).collect();
        let want = match damaged {
            "page" => vec![(1, vec![(64 * KIB, 64 * KIB)]), (2, vec![(64 * KIB, 64 * KIB)])],
            _ => vec![(2, vec![(0, 256 * KIB)])],
        };
        assert_eq!(deps, want, "{damaged}");
        assert!(store.needs_resync("d").unwrap().is_some(), "{damaged}");
        // An incremental cannot build on it; the agent's resync can.
        let e = store.begin("d", 3, GenerationKind::Incremental, Some(2)).unwrap_err();
        assert!(matches!(e, StoreError::DamagedBase { point: 2, .. }), "{damaged}: {e}");
        assert!(!e.caller_fault());
        let info = resync(&store, 3, 2, &image);
        assert!(point_image(&store, "d", info.id) == image, "{damaged}: the new point is whole");
        assert!(store.needs_resync("d").unwrap().is_none(), "{damaged}");
    }
}

#[test]
fn an_incremental_that_finds_a_damaged_page_fails_and_the_disk_then_needs_a_resync() {
    let (_d, store) = new_store(64 * KIB);
    let (_, _, image) = damage_fixture(&store);
    flip(&page_file(&store, &page_of(&store, "d", 2, 0)), 40);
    // Not known yet: the incremental begins, and fails where it loads the page.
    let mut p = store.begin("d", 3, GenerationKind::Incremental, Some(2)).unwrap();
    let h = put(&store, &[9u8; 4096]);
    assert!(matches!(p.add_chunk(4096, 4096, h), Err(StoreError::DamagedBase { point: 2, .. })));
    drop(p);
    assert!(store.needs_resync("d").unwrap().is_some());
    assert!(matches!(
        store.begin("d", 3, GenerationKind::Incremental, Some(2)),
        Err(StoreError::DamagedBase { .. })
    ));
    let info = resync(&store, 3, 2, &image);
    assert!(point_image(&store, "d", info.id) == image);
}

#[test]
fn retention_keeps_the_newest_intact_point_while_newer_ones_are_damaged() {
    let (_d, store) = new_store(64 * KIB);
    store.register_disk("d", 128 * KIB, 512).unwrap();
    let mut chunks = Vec::new();
    for g in 1..=4 {
        chunks.push(one_chunk_point(&store, "d", g, g as u8, g).1);
    }
    for h in &chunks[2..] {
        flip(&store.parts().layout.chunk_path(h), 1);
    }
    let r = store.verify(&VerifyOptions::default()).unwrap();
    let intact: Vec<u64> = r.points.iter().filter(|p| p.intact).map(|p| p.id).collect();
    assert_eq!(intact, [1, 2]);
    let r = store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
    assert_eq!(r.points_removed, [("d".to_string(), 1), ("d".to_string(), 3)]);
    assert!(point_image(&store, "d", 2)[..4096].iter().all(|b| *b == 2), "point 2 restores");
    // The quarantine of what no point names any more is swept with it.
    assert!(!store.root().join("quarantine/chunks").join(hex(&chunks[2])).exists());
    assert!(store.root().join("quarantine/chunks").join(hex(&chunks[3])).exists());
}

/// What verifying chunks costs `block_hashes` (a resync's hash queries): run with
/// `cargo test --release -p server -- --ignored block_hashes_cost --nocapture`.
#[test]
#[ignore]
fn block_hashes_cost() {
    let (_d, store) = new_store(DEFAULT_REGION_SIZE);
    let size = 256 << 20;
    store.register_disk("d", size, 4096).unwrap();
    let mut rng = Rng(5);
    let mut p = store.begin("d", 1, GenerationKind::InitialFull, None).unwrap();
    let mut raw = Vec::new();
    for at in (0..size).step_by(1 << 20) {
        let data = rng.bytes(1 << 20);
        p.add_chunk(at, 1 << 20, put(&store, &data)).unwrap();
        raw.push(data);
    }
    p.commit(1, Consistency::Crash).unwrap();
    let zero = |_| [0u8; 32];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let reader = store.open_point("d", PointSel::Latest).unwrap();
        let t = std::time::Instant::now();
        for at in (0..size).step_by(4 << 20) {
            reader.block_hashes(at, 4 << 20, 64 << 10, zero).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let t = std::time::Instant::now();
    for data in &raw {
        std::hint::black_box(blake3::hash(data));
    }
    let verify = t.elapsed().as_secs_f64();
    println!(
        "block_hashes of 256 MiB in 64 KiB pieces: {:.0} ms; of which verifying the chunks (one blake3 pass): {:.0} ms ({:.0}%)",
        best * 1e3,
        verify * 1e3,
        verify / best * 100.0
    );
}

/// A disk that grew: registering it larger is accepted, the next points have the new size and
/// read the grown range, older points keep their size; registering it smaller is refused.
#[test]
fn a_grown_disk_keeps_older_points_at_their_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(&dir.path().join("s"), &StoreOptions { region_size: 64 * KIB }).unwrap();
    store.register_disk("g", 256 * KIB, 4096).unwrap();
    let a = vec![1u8; 4096];
    let ha = *blake3::hash(&a).as_bytes();
    store.put_chunk(&ha, 4096, &zstd::bulk::compress(&a, 1).unwrap()).unwrap();
    let mut p = store.begin("g", 1, GenerationKind::InitialFull, None).unwrap();
    p.add_chunk(0, 4096, ha).unwrap();
    p.commit(1, Consistency::Crash).unwrap();

    assert_eq!(store.register_disk("g", 512 * KIB, 4096).unwrap().size, 512 * KIB);
    let b = vec![2u8; 4096];
    let hb = *blake3::hash(&b).as_bytes();
    let mut p = store.begin("g", 2, GenerationKind::Incremental, Some(1)).unwrap();
    store.put_chunk(&hb, 4096, &zstd::bulk::compress(&b, 1).unwrap()).unwrap();
    p.add_chunk(400 * KIB, 4096, hb).unwrap();
    p.commit(2, Consistency::Crash).unwrap();

    let old = store.open_point("g", PointSel::Id(1)).unwrap();
    assert_eq!(old.size(), 256 * KIB, "an older point keeps its size");
    let new = store.open_point("g", PointSel::Id(2)).unwrap();
    assert_eq!(new.size(), 512 * KIB);
    let mut buf = vec![0u8; 4096];
    new.read_at(&mut buf, 400 * KIB).unwrap();
    assert_eq!(buf, b);
    new.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, a, "the grown point keeps what its base had");
    let out = dir.path().join("old.img");
    old.restore_to(&out, &mut |_, _| {}).unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), 256 * KIB, "an older point restores at its size");
    assert!(matches!(store.register_disk("g", 128 * KIB, 4096), Err(StoreError::DiskMismatch { .. })));
    // The grown size survives a reopen.
    let root = store.root().to_path_buf();
    drop((old, new, store));
    let store = Store::open(&root).unwrap();
    assert_eq!(store.disk("g").unwrap().size, 512 * KIB);
}
