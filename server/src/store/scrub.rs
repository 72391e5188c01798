//! Verification of the points of a store (`siterep verify`, and the server's scrub): every
//! root, page and chunk the selected points name is read once, however many points share it,
//! and checked; what fails is quarantined and reported with the points and disk ranges that
//! depend on it.
//!
//! Runs beside everything else. Pages and chunks are read without holding the store's gate
//! (hours of reading must not stall uploads); retention may remove what a point pruned
//! meanwhile named, so an object found missing or damaged is checked again under the gate
//! (shared), and counted only if it still fails and a point that names it still exists.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::chunk;
use super::error::StoreError;
use super::format::DiskRecord;
use super::layout::point_file;
use super::objects;
use super::parts::Parts;
use super::quarantine::{self, Object, ObjectKind};

/// What [`Store::verify`](crate::Store::verify) checks, and how fast.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only this disk (default: every disk).
    pub disk: Option<String>,
    /// Only this point (needs `disk`; default: every point).
    pub point: Option<u64>,
    /// Most bytes per second read from the store (default: unlimited).
    pub rate: Option<u64>,
    /// Reading threads (0: one per CPU, at least 2, at most 8).
    pub threads: usize,
    /// Set to stop early; the report then says `interrupted`.
    pub stop: Option<Arc<AtomicBool>>,
}

/// The outcome of a verification. Serialized as the JSON of `siterep verify --json`
/// (`docs/store.md`, "Verify and scrub").
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct VerifyReport {
    pub format: &'static str,
    pub version: u32,
    /// Every point checked, oldest first per disk.
    pub points: Vec<VerifiedPoint>,
    /// Every damaged object, with what depends on it.
    pub damaged: Vec<Damaged>,
    pub checked: Checked,
    pub elapsed_ms: u64,
    /// Stopped before the end (`VerifyOptions::stop`): objects not read are not reported.
    pub interrupted: bool,
}

/// A checked point: `intact` unless it depends on a damaged object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerifiedPoint {
    pub disk: String,
    pub id: u64,
    /// `None` when the point's metadata is damaged.
    pub generation: Option<u64>,
    pub intact: bool,
}

/// Distinct objects read and bytes read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Checked {
    pub points: u64,
    pub roots: u64,
    pub pages: u64,
    pub chunks: u64,
    pub bytes: u64,
}

/// A damaged object: what, where, why, and who depends on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Damaged {
    pub kind: ObjectKind,
    /// The hash in hex (chunk, page), or `disk/id` (root, point).
    pub object: String,
    /// Where the object was (a quarantined one is under `quarantine/` now).
    pub path: PathBuf,
    pub reason: String,
    /// Quarantined (by this run or earlier).
    pub quarantined: bool,
    pub dependents: Vec<Dependent>,
}

/// A point that depends on a damaged object, and the byte ranges of its disk that do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Dependent {
    pub disk: String,
    pub point: u64,
    /// `(offset, length)` in bytes, sorted, merged where adjacent.
    pub ranges: Vec<(u64, u64)>,
}

/// Limits reading to a rate: each reader sleeps until the bytes read so far are due.
pub(crate) struct Pace {
    rate: Option<u64>,
    start: Instant,
    taken: AtomicU64,
}

impl Pace {
    pub(crate) fn new(rate: Option<u64>) -> Pace {
        Pace { rate: rate.filter(|r| *r > 0), start: Instant::now(), taken: AtomicU64::new(0) }
    }

    pub(crate) fn take(&self, n: u64) {
        let total = self.taken.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(total as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

/// `(point slot, offset, length)`: a range of a checked point's disk.
type Range = (usize, u64, u64);

/// A point being checked.
struct Slot {
    disk: usize,
    id: u64,
}

/// The outcome of checking one object.
enum Check<T> {
    Ok(T),
    /// Failed its checks (reason); quarantined unless `quarantined` is false (an I/O error).
    Damaged {
        reason: String,
        quarantined: bool,
    },
    /// Gone with every point that named it (retention ran meanwhile).
    Collected,
}

pub(crate) fn verify(parts: &Parts, opts: &VerifyOptions) -> Result<VerifyReport, StoreError> {
    let started = Instant::now();
    let stop = opts.stop.clone().unwrap_or_default();
    let pace = Pace::new(opts.rate);
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8),
        n => n,
    };
    let q = quarantine::list(parts)?;
    let names = match &opts.disk {
        Some(d) => vec![d.clone()],
        None => objects::disk_names(parts)?,
    };
    let mut disks: Vec<DiskRecord> = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut points: Vec<VerifiedPoint> = Vec::new();
    let mut checked = Checked::default();
    // Damaged objects, and for each the points (slot indices) and ranges depending on it.
    let mut damaged: Vec<(Damaged, Vec<Range>)> = Vec::new();
    // Every page: the points and regions using it.
    let mut pages: BTreeMap<[u8; 32], Vec<(usize, u32)>> = BTreeMap::new();
    {
        // Roots are small; read under the gate, a point's root is there while its metadata is.
        let _gate = parts.locks.shared();
        for name in names {
            let record = objects::disk_record(parts, &name)?;
            let mut ids = objects::point_ids(parts, &name)?;
            if let Some(p) = opts.point {
                if !ids.contains(&p) {
                    return Err(StoreError::UnknownPoint { disk: name, id: p });
                }
                ids = vec![p];
            }
            for id in ids {
                let slot = slots.len();
                slots.push(Slot { disk: disks.len(), id });
                points.push(VerifiedPoint { disk: name.clone(), id, generation: None, intact: true });
                checked.points += 1;
                let whole = vec![(slot, 0, record.size)];
                let meta = parts.layout.points_dir(&name).join(point_file(id, "json"));
                let sum = match objects::point_record(parts, &name, id) {
                    Ok((info, sum)) => {
                        points[slot].generation = Some(info.generation);
                        sum
                    }
                    Err(e) if e.is_damage() => {
                        let d = damage(ObjectKind::Point, format!("{name}/{id}"), meta, e.to_string(), false);
                        damaged.push((d, whole));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                checked.roots += 1;
                let o = Object::Root(name.clone(), id);
                let path = o.home(&parts.layout);
                let root = if q.contains(&o) {
                    Err(quarantine::reason(parts, &o))
                } else {
                    match objects::load_root(parts, &record, id, &sum) {
                        Ok(root) => Ok(root),
                        Err(e) if e.is_damage() => Err(e.to_string()),
                        Err(e) => return Err(e),
                    }
                };
                match root {
                    Ok(root) => {
                        pace.take(parts.m().len(&path).ok().flatten().unwrap_or(0));
                        for (region, page) in root {
                            pages.entry(page).or_default().push((slot, region));
                        }
                    }
                    Err(reason) => {
                        damaged.push((damage(ObjectKind::Root, o.name(), path, reason, true), whole))
                    }
                }
            }
            disks.push(record);
        }
    }
    let exists = |slot: usize| {
        let s = &slots[slot];
        parts.m().exists(&parts.layout.points_dir(&disks[s.disk].name).join(point_file(s.id, "json")))
    };

    // Pages: each read once; the chunks each names.
    let page_list: Vec<[u8; 32]> = pages.keys().copied().collect();
    let page_checks = parallel(&page_list, threads, &stop, |addr| {
        let o = Object::Page(*addr);
        let users = || pages[addr].iter().map(|(slot, _)| *slot);
        check(parts, &o, &q, users, &exists, |p| {
            let (map, len) = objects::page_at(parts, p, addr)?;
            pace.take(len);
            let mut chunks: Vec<[u8; 32]> = map.chunks().copied().collect();
            chunks.sort_unstable();
            chunks.dedup();
            Ok(chunks)
        })
    });
    // Every chunk: the pages (indices into `page_list`) naming it.
    let mut chunks: BTreeMap<[u8; 32], Vec<u32>> = BTreeMap::new();
    for (i, (addr, c)) in page_list.iter().zip(page_checks).enumerate() {
        match c.transpose()? {
            Some(Check::Ok(named)) => {
                checked.pages += 1;
                for h in named {
                    chunks.entry(h).or_default().push(i as u32);
                }
            }
            Some(Check::Damaged { reason, quarantined }) => {
                checked.pages += 1;
                let o = Object::Page(*addr);
                let rs = parts.layout.region_size;
                let ranges = pages[addr]
                    .iter()
                    .map(|&(slot, region)| {
                        let start = u64::from(region) * rs;
                        let size = disks[slots[slot].disk].size;
                        (slot, start, (start + rs).min(size) - start)
                    })
                    .collect();
                damaged.push((
                    damage(ObjectKind::Page, o.name(), o.home(&parts.layout), reason, quarantined),
                    ranges,
                ));
            }
            Some(Check::Collected) | None => {}
        }
    }

    // Chunks: each read and verified once.
    let chunk_list: Vec<[u8; 32]> = chunks.keys().copied().collect();
    let chunk_checks = parallel(&chunk_list, threads, &stop, |hash| {
        let o = Object::Chunk(*hash);
        let users =
            || chunks[hash].iter().flat_map(|&p| pages[&page_list[p as usize]].iter().map(|(slot, _)| *slot));
        check(parts, &o, &q, users, &exists, |p| {
            let len = chunk::verify(parts.m(), p, hash)?;
            pace.take(len);
            Ok(())
        })
    });
    let mut maps = HashMap::new();
    for (hash, c) in chunk_list.iter().zip(chunk_checks) {
        let (reason, quarantined) = match c.transpose()? {
            Some(Check::Ok(())) => {
                checked.chunks += 1;
                continue;
            }
            Some(Check::Damaged { reason, quarantined }) => (reason, quarantined),
            Some(Check::Collected) | None => continue,
        };
        checked.chunks += 1;
        let mut ranges = Vec::new();
        for &p in &chunks[hash] {
            let addr = page_list[p as usize];
            if let std::collections::hash_map::Entry::Vacant(e) = maps.entry(addr) {
                e.insert(objects::page_at(parts, &parts.layout.page_path(&addr), &addr)?.0);
            }
            for (start, d) in maps[&addr].iter().filter(|(_, d)| d.chunk == *hash) {
                for &(slot, region) in &pages[&addr] {
                    let at = u64::from(region) * parts.layout.region_size + u64::from(start);
                    ranges.push((slot, at, u64::from(d.len)));
                }
            }
        }
        let o = Object::Chunk(*hash);
        damaged
            .push((damage(ObjectKind::Chunk, o.name(), o.home(&parts.layout), reason, quarantined), ranges));
    }

    checked.bytes = pace.bytes();
    let damaged = damaged
        .into_iter()
        .map(|(mut d, ranges)| {
            d.dependents = dependents(ranges, &slots, &disks);
            for dep in &d.dependents {
                if let Some(p) = points.iter_mut().find(|p| p.disk == dep.disk && p.id == dep.point) {
                    p.intact = false;
                }
            }
            d
        })
        .collect();
    Ok(VerifyReport {
        format: "siterep.verify",
        version: 1,
        points,
        damaged,
        checked,
        elapsed_ms: started.elapsed().as_millis() as u64,
        interrupted: stop.load(Ordering::Relaxed),
    })
}

fn damage(kind: ObjectKind, object: String, path: PathBuf, reason: String, quarantined: bool) -> Damaged {
    Damaged { kind, object, path, reason, quarantined, dependents: Vec::new() }
}

/// Checks object `o` with `read` (given its home). A quarantined object is damaged without
/// being read. One that fails is read again under the gate, and quarantined if it still fails
/// while a point that names it (`users`) still exists.
fn check<T, I: Iterator<Item = usize>>(
    parts: &Parts,
    o: &Object,
    q: &quarantine::Quarantined,
    users: impl Fn() -> I,
    exists: &impl Fn(usize) -> bool,
    read: impl Fn(&Path) -> Result<T, StoreError>,
) -> Result<Check<T>, StoreError> {
    if q.contains(o) {
        return Ok(Check::Damaged { reason: quarantine::reason(parts, o), quarantined: true });
    }
    let home = o.home(&parts.layout);
    if let Ok(v) = read(&home) {
        return Ok(Check::Ok(v));
    }
    let _gate = parts.locks.shared();
    if !users().any(exists) {
        return Ok(Check::Collected);
    }
    match read(&home) {
        Ok(v) => Ok(Check::Ok(v)),
        Err(e) if e.is_damage() => {
            quarantine::quarantine(parts, o, &e.to_string(), |p| read(p).is_ok());
            Ok(Check::Damaged { reason: e.to_string(), quarantined: true })
        }
        // An I/O error reading it: reported, not quarantined (it may pass).
        Err(e @ StoreError::Io { .. }) => Ok(Check::Damaged { reason: e.to_string(), quarantined: false }),
        Err(e) => Err(e),
    }
}

/// Groups `(slot, offset, len)` by point and merges each point's ranges.
fn dependents(mut ranges: Vec<Range>, slots: &[Slot], disks: &[DiskRecord]) -> Vec<Dependent> {
    ranges.sort_unstable();
    let mut out: Vec<(usize, Dependent)> = Vec::new();
    for (slot, at, len) in ranges {
        if out.last().map(|(s, _)| *s) != Some(slot) {
            let s = &slots[slot];
            out.push((slot, Dependent { disk: disks[s.disk].name.clone(), point: s.id, ranges: Vec::new() }));
        }
        let r = &mut out.last_mut().expect("pushed above").1.ranges;
        match r.last_mut() {
            Some((o, l)) if *o + *l >= at => *l = (*l).max(at + len - *o),
            _ => r.push((at, len)),
        }
    }
    out.into_iter().map(|(_, d)| d).collect()
}

/// `f` over `items` on `threads` threads, results in order; `None` for items not reached
/// before `stop` was set.
fn parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    stop: &AtomicBool,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    let next = AtomicU64::new(0);
    let out: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(items.len()).max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= items.len() || stop.load(Ordering::Relaxed) {
                    return;
                }
                let r = f(&items[i]);
                out.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(r);
            });
        }
    });
    out.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl VerifyReport {
    /// The report for people: what was checked, then each damaged object and its dependents.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.checked;
        let _ = writeln!(
            s,
            "checked {} points: {} roots, {} map pages, {} chunks, {} bytes read in {:.1} s{}",
            c.points,
            c.roots,
            c.pages,
            c.chunks,
            c.bytes,
            self.elapsed_ms as f64 / 1000.0,
            if self.interrupted { " (interrupted)" } else { "" }
        );
        for d in &self.damaged {
            let kind = format!("{:?}", d.kind).to_lowercase();
            let q = if d.quarantined { ", quarantined" } else { "" };
            let _ = writeln!(s, "DAMAGED {kind} {} ({}{q}): {}", d.object, d.path.display(), d.reason);
            for dep in &d.dependents {
                let ranges: Vec<String> = dep.ranges.iter().map(|(o, l)| format!("{o}+{l}")).collect();
                let _ = writeln!(s, "  disk {} point {}: bytes {}", dep.disk, dep.point, ranges.join(", "));
            }
        }
        let bad: Vec<String> =
            self.points.iter().filter(|p| !p.intact).map(|p| format!("{}/{}", p.disk, p.id)).collect();
        if self.damaged.is_empty() {
            let _ = writeln!(s, "no damage found");
        } else {
            let _ = writeln!(
                s,
                "{} damaged objects; {} of {} points cannot be restored whole: {}",
                self.damaged.len(),
                bad.len(),
                self.points.len(),
                bad.join(" ")
            );
        }
        s
    }
}
