//! Crash tests on the simulated medium: a workload of generations (new, deduplicated and zero
//! extents), commits, a tag, retention and sweeps runs until an injected crash at its Nth
//! mutating file operation, for every N; the medium then keeps what was durable and some of
//! what was not (contents torn at sector size), the store is reopened, and every listed point
//! must restore equal to what its generation wrote, every point whose commit returned must be
//! listed (unless retention may have pruned it), and the store must go on working: a new
//! generation deduplicated against the old data commits and restores.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::tests::Rng;
use crate::*;

const REGION: u64 = 16 * 1024;
const DISK_SIZE: u64 = 64 * 1024;
const DISK: &str = "d";
const GENERATIONS: u64 = 6;

/// What the workload did: the image each generation's point must restore to (recorded before
/// its commit is attempted), the generations whose commit returned, and those a retention run
/// may have pruned.
#[derive(Default)]
struct Model {
    images: BTreeMap<u64, Vec<u8>>,
    committed: Vec<u64>,
    maybe_pruned: Vec<u64>,
}

/// Chunk data of the run, reused for deduplication (and by the generation after recovery).
fn pool(seed: u64) -> Vec<Vec<u8>> {
    let mut rng = Rng(seed | 1);
    (0..12)
        .map(|i| {
            let len = 512 * (1 + rng.below(16)) as usize;
            (0..len).map(|j| if j % 64 < 32 { rng.next() as u8 } else { i as u8 }).collect()
        })
        .collect()
}

fn put(store: &Store, data: &[u8]) -> Result<[u8; 32], StoreError> {
    let hash = *blake3::hash(data).as_bytes();
    let z = zstd::bulk::compress(data, 1).unwrap();
    store.put_chunk(&hash, data.len() as u32, &z)?;
    Ok(hash)
}

/// One generation on `base` of `ops` extents (pool chunks and zeroes) applied to `image`.
fn generation(
    store: &Store,
    rng: &mut Rng,
    pool: &[Vec<u8>],
    generation: u64,
    base: Option<u64>,
    image: &mut [u8],
    model: &mut Model,
) -> Result<PointInfo, StoreError> {
    let kind = if base.is_some() { GenerationKind::Incremental } else { GenerationKind::InitialFull };
    let mut p = store.begin(DISK, generation, kind, base)?;
    for _ in 0..4 {
        if rng.below(4) == 0 {
            let off = 512 * rng.below(DISK_SIZE / 512 - 8);
            let len = 512 * (1 + rng.below(8));
            p.add_zero(off, len)?;
            image[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = &pool[rng.below(pool.len() as u64) as usize];
            let off = 512 * rng.below((DISK_SIZE - data.len() as u64) / 512 + 1);
            let hash = put(store, data)?;
            p.add_chunk(off, data.len() as u32, hash)?;
            image[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
    }
    model.images.insert(generation, image.to_vec());
    let point = p.commit(1_000 + generation, Consistency::Crash)?;
    model.committed.push(generation);
    Ok(point)
}

/// The workload: stops at the first error (the injected crash).
fn workload(root: &Path, medium: &Arc<SimMedium>, seed: u64, model: &mut Model) -> Result<(), StoreError> {
    let store = Store::open_with_medium(root, &StoreOptions { region_size: REGION }, medium.clone())?;
    store.register_disk(DISK, DISK_SIZE, 512)?;
    let pool = pool(seed);
    let mut rng = Rng(seed);
    let mut image = vec![0u8; DISK_SIZE as usize];
    let mut base = None;
    for g in 1..=GENERATIONS {
        // A chunk uploaded and never committed: staged, promoted by no one.
        if g == 2 {
            put(&store, &pool[11][..512])?;
        }
        let point = generation(&store, &mut rng, &pool, g * 10, base, &mut image, model)?;
        // A tagged point outlives retention; tagging rewrites its metadata.
        if g == 2 {
            store.tag(DISK, point.id, "keep")?;
        }
        base = Some(point.id);
        if g % 3 == 0 {
            let kept = model.committed.len().saturating_sub(2);
            model.maybe_pruned.extend_from_slice(&model.committed[..kept]);
            store.retain(&Retention { keep_last: Some(2), max_age: None })?;
        }
    }
    Ok(())
}

/// After a crash: every listed point restores to its generation's image, no committed point
/// is missing, and a new generation on the latest point commits and restores.
fn check(root: &Path, medium: &Arc<SimMedium>, seed: u64, model: &Model, at: u64) {
    let store = Store::open_with_medium(root, &StoreOptions { region_size: REGION }, medium.clone())
        .unwrap_or_else(|e| panic!("crash at op {at}: reopen: {e}"));
    let points = match store.points(DISK) {
        Ok(p) => p,
        Err(StoreError::UnknownDisk(_)) => Vec::new(),
        Err(e) => panic!("crash at op {at}: points: {e}"),
    };
    for p in &points {
        let want = model.images.get(&p.generation).unwrap_or_else(|| {
            panic!("crash at op {at}: point {} of generation {} never made", p.id, p.generation)
        });
        let reader = store
            .open_point(DISK, PointSel::Id(p.id))
            .unwrap_or_else(|e| panic!("crash at op {at}: open point {}: {e}", p.id));
        let mut got = vec![0xAAu8; reader.size() as usize];
        reader.read_at(&mut got, 0).unwrap_or_else(|e| panic!("crash at op {at}: read point {}: {e}", p.id));
        assert!(
            &got == want,
            "crash at op {at}: point {} (generation {}) restores other bytes",
            p.id,
            p.generation
        );
        assert_eq!(store.needs_resync(DISK).unwrap(), None, "crash at op {at}");
    }
    for g in &model.committed {
        assert!(
            model.maybe_pruned.contains(g) || points.iter().any(|p| p.generation == *g),
            "crash at op {at}: the committed point of generation {g} is gone"
        );
    }
    // The store goes on: the agent sends the next generation again (its chunks included).
    store.register_disk(DISK, DISK_SIZE, 512).unwrap();
    let latest = points.last();
    let mut image =
        latest.map_or_else(|| vec![0u8; DISK_SIZE as usize], |p| model.images[&p.generation].clone());
    let mut next = Model::default();
    let mut rng = Rng(seed ^ 0x5555);
    let point = generation(&store, &mut rng, &pool(seed), 1_000, latest.map(|p| p.id), &mut image, &mut next)
        .unwrap_or_else(|e| panic!("crash at op {at}: the next generation: {e}"));
    store.retain(&Retention { keep_last: Some(1), max_age: None }).unwrap();
    let reader = store.open_point(DISK, PointSel::Id(point.id)).unwrap();
    let mut got = vec![0xAAu8; reader.size() as usize];
    reader.read_at(&mut got, 0).unwrap_or_else(|e| panic!("crash at op {at}: read the next point: {e}"));
    assert!(got == image, "crash at op {at}: the next point restores other bytes");
}

/// Runs the workload once to count its mutating operations, then once per crash point.
/// Returns how many crash points were tried.
fn crash_everywhere(seed: u64, skip_setup: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let medium = Arc::new(SimMedium::new(dir.path()));
    workload(dir.path(), &medium, seed, &mut Model::default()).unwrap();
    let total = medium.ops();
    // Creating the store's layout (512 shard directories) comes first; crashing in it is
    // covered by the first seed only.
    let first = if skip_setup {
        let dir = tempfile::tempdir().unwrap();
        let medium = Arc::new(SimMedium::new(dir.path()));
        drop(
            Store::open_with_medium(dir.path(), &StoreOptions { region_size: REGION }, medium.clone())
                .unwrap(),
        );
        medium.ops() + 1
    } else {
        1
    };
    for at in first..=total {
        // Each crash point with several crashes: what survives of the unsynced state varies.
        for variant in 0..CRASHES_PER_POINT {
            let dir = tempfile::tempdir().unwrap();
            let medium = Arc::new(SimMedium::new(dir.path()));
            medium.fail_at(Some(at));
            let mut model = Model::default();
            assert!(
                workload(dir.path(), &medium, seed, &mut model).is_err(),
                "op {at} of {total} did not fail"
            );
            medium.crash(seed.wrapping_mul(31).wrapping_add(at).wrapping_mul(7).wrapping_add(variant));
            check(dir.path(), &medium, seed, &model, at);
        }
    }
    (total + 1 - first) * CRASHES_PER_POINT
}

/// Crashes simulated at each crash point.
const CRASHES_PER_POINT: u64 = 3;

#[test]
fn every_point_listed_after_a_crash_at_any_step_restores() {
    let start = Instant::now();
    let mut tried = 0;
    for (i, seed) in [0x1234_5678_9abc_def1u64, 42, 7_777_777, 0xdead_beef].into_iter().enumerate() {
        tried += crash_everywhere(seed, i > 0);
    }
    eprintln!("{tried} crashes in {:?}", start.elapsed());
}
