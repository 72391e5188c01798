//! [`SimMedium`]: an in-memory tree that simulates a crash, for tests.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::Medium;

/// Sector size at which a crash tears a file whose contents were not durable.
pub const SECTOR: usize = 512;

/// A crash-simulating medium: an in-memory tree under one root that keeps, per file, its
/// durable and its current contents and, per directory, its durable and its current names.
/// [`SimMedium::crash`] keeps only what is durable (a file whose contents were not made
/// durable becomes a sector-by-sector mix of its durable and current contents). With
/// [`SimMedium::fail_at`], the Nth mutating operation from then on fails, and so does every
/// operation after it, until the crash (the process died there).
pub struct SimMedium {
    state: Mutex<Sim>,
}

struct Sim {
    root: PathBuf,
    files: Vec<SimFile>,
    dirs: HashMap<PathBuf, SimDir>,
    /// Name changes not yet durable, in the order they were made.
    changes: Vec<Change>,
    next_change: u64,
    /// Mutating operations since `fail_at` was set.
    ops: u64,
    fail_at: Option<u64>,
    dead: bool,
}

#[derive(Default, Clone)]
struct SimFile {
    durable: Vec<u8>,
    current: Vec<u8>,
}

#[derive(Default, Clone)]
struct SimDir {
    durable: BTreeMap<String, Node>,
    current: BTreeMap<String, Node>,
}

/// A name change not yet durable: in `dir`, `name` now names `node` (`None`: removed). The
/// changes of one operation (`op`: both halves of a rename) survive a crash together.
struct Change {
    op: u64,
    dir: PathBuf,
    name: String,
    node: Option<Node>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    /// An index into `Sim::files` (names of one file share it, like hard links).
    File(usize),
    Dir,
}

fn injected() -> io::Error {
    io::Error::other("simulated crash")
}

fn not_found() -> io::Error {
    io::Error::from(ErrorKind::NotFound)
}

impl Sim {
    /// Counts a mutating operation; fails at the crash point and after it.
    fn op(&mut self) -> io::Result<()> {
        if self.dead {
            return Err(injected());
        }
        self.ops += 1;
        if self.fail_at == Some(self.ops) {
            self.dead = true;
            return Err(injected());
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead {
            Err(injected())
        } else {
            Ok(())
        }
    }

    fn split<'a>(&self, path: &'a Path) -> io::Result<(&'a Path, String)> {
        let parent = path.parent().ok_or_else(not_found)?;
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(not_found)?;
        Ok((parent, name.to_string()))
    }

    fn node(&self, path: &Path) -> Option<Node> {
        if path == self.root {
            return Some(Node::Dir);
        }
        let (parent, name) = self.split(path).ok()?;
        self.dirs.get(parent)?.current.get(&name).copied()
    }

    fn file(&self, path: &Path) -> io::Result<usize> {
        match self.node(path) {
            Some(Node::File(i)) => Ok(i),
            Some(Node::Dir) => Err(io::Error::other("is a directory")),
            None => Err(not_found()),
        }
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut SimDir> {
        self.dirs.get_mut(dir).ok_or_else(not_found)
    }

    /// Sets (or with `None` removes) a current name, recording the change for a crash.
    fn set_name(&mut self, op: u64, dir: &Path, name: &str, node: Option<Node>) -> io::Result<()> {
        let d = self.dir_mut(dir)?;
        match node {
            Some(n) => d.current.insert(name.to_string(), n),
            None => d.current.remove(name),
        };
        self.changes.push(Change { op, dir: dir.to_path_buf(), name: name.to_string(), node });
        Ok(())
    }

    fn next_op(&mut self) -> u64 {
        self.next_change += 1;
        self.next_change
    }
}

/// splitmix64: the crash's choices, reproducible from a seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl SimMedium {
    /// An empty medium whose root directory is `root` (it exists and is durable).
    pub fn new(root: &Path) -> SimMedium {
        let mut dirs = HashMap::new();
        dirs.insert(root.to_path_buf(), SimDir::default());
        SimMedium {
            state: Mutex::new(Sim {
                root: root.to_path_buf(),
                files: Vec::new(),
                dirs,
                changes: Vec::new(),
                next_change: 0,
                ops: 0,
                fail_at: None,
                dead: false,
            }),
        }
    }

    fn sim(&self) -> MutexGuard<'_, Sim> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the `n`th mutating operation from now fail, and every operation after it
    /// (`None`: none fails). Restarts the count.
    pub fn fail_at(&self, n: Option<u64>) {
        let mut s = self.sim();
        s.ops = 0;
        s.fail_at = n;
    }

    /// Mutating operations since the last `fail_at`.
    pub fn ops(&self) -> u64 {
        self.sim().ops
    }

    /// Simulates power loss and a restart: every directory keeps its durable names plus, as
    /// `seed` chooses, none of the name changes not yet durable (a third of the crashes), a
    /// prefix of them in the order they were made (a journal), or any subset of them (each
    /// operation whole: a rename is never half done). A directory whose own name did not
    /// survive is gone with its contents. Every file whose current contents were not durable
    /// keeps, sector by sector, either its durable or its current contents, and either length.
    /// Operations work again.
    pub fn crash(&self, seed: u64) {
        let mut rng = SplitMix(seed);
        let mut s = self.sim();
        for f in &mut s.files {
            if f.current == f.durable {
                continue;
            }
            let len = if rng.next().is_multiple_of(2) { f.durable.len() } else { f.current.len() };
            let mut torn = vec![0u8; len];
            for (i, sector) in torn.chunks_mut(SECTOR).enumerate() {
                let from = if rng.next().is_multiple_of(2) { &f.durable } else { &f.current };
                let start = i * SECTOR;
                let end = (start + sector.len()).min(from.len());
                if start < end {
                    sector[..end - start].copy_from_slice(&from[start..end]);
                }
            }
            f.durable = torn.clone();
            f.current = torn;
        }
        let ops: Vec<u64> = {
            let mut ops: Vec<u64> = s.changes.iter().map(|c| c.op).collect();
            ops.dedup();
            ops
        };
        let survivors: std::collections::HashSet<u64> = match rng.next() % 3 {
            0 => Default::default(),
            1 => {
                let keep = (rng.next() % (ops.len() as u64 + 1)) as usize;
                ops[..keep].iter().copied().collect()
            }
            _ => ops.into_iter().filter(|_| rng.next().is_multiple_of(2)).collect(),
        };
        let changes = std::mem::take(&mut s.changes);
        for c in changes.iter().filter(|c| survivors.contains(&c.op)) {
            if let Some(d) = s.dirs.get_mut(&c.dir) {
                match c.node {
                    Some(n) => d.durable.insert(c.name.clone(), n),
                    None => d.durable.remove(&c.name),
                };
            }
        }
        let root = s.root.clone();
        let mut dirs = HashMap::new();
        let mut todo = vec![root];
        while let Some(path) = todo.pop() {
            let Some(d) = s.dirs.get(&path) else { continue };
            for (name, node) in &d.durable {
                if *node == Node::Dir {
                    todo.push(path.join(name));
                }
            }
            dirs.insert(path, SimDir { durable: d.durable.clone(), current: d.durable.clone() });
        }
        s.dirs = dirs;
        s.dead = false;
        s.fail_at = None;
        s.ops = 0;
    }
}

impl Medium for SimMedium {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.sim();
        s.alive()?;
        if s.dirs.contains_key(dir) {
            return Ok(());
        }
        let rel = dir.strip_prefix(&s.root).map_err(|_| not_found())?.to_path_buf();
        s.op()?;
        let op = s.next_op();
        let mut path = s.root.clone();
        for part in rel.iter() {
            let name = part.to_str().ok_or_else(not_found)?.to_string();
            let parent = path.clone();
            path.push(&name);
            match s.dir_mut(&parent)?.current.get(&name) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(io::Error::from(ErrorKind::AlreadyExists)),
                None => {
                    s.set_name(op, &parent, &name, Some(Node::Dir))?;
                    s.dirs.insert(path.clone(), SimDir::default());
                }
            }
        }
        Ok(())
    }

    fn create(&self, path: &Path, parts: &[&[u8]], sync: bool) -> io::Result<()> {
        let mut s = self.sim();
        s.op()?;
        let (parent, name) = s.split(path)?;
        if s.dir_mut(parent)?.current.contains_key(&name) {
            return Err(io::Error::from(ErrorKind::AlreadyExists));
        }
        let i = s.files.len();
        s.files.push(SimFile { durable: Vec::new(), current: parts.concat() });
        let op = s.next_op();
        s.set_name(op, parent, &name, Some(Node::File(i)))?;
        if sync {
            s.op()?;
            let f = &mut s.files[i];
            f.durable = f.current.clone();
        }
        Ok(())
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Option<(u64, Vec<u8>)>> {
        let s = self.sim();
        s.alive()?;
        match s.file(path) {
            Ok(i) => {
                let data = &s.files[i].current;
                let n = data.len().min(usize::try_from(limit).unwrap_or(usize::MAX));
                Ok(Some((data.len() as u64, data[..n].to_vec())))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn len(&self, path: &Path) -> io::Result<Option<u64>> {
        let s = self.sim();
        s.alive()?;
        Ok(match s.node(path) {
            Some(Node::File(i)) => Some(s.files[i].current.len() as u64),
            Some(Node::Dir) => Some(0),
            None => None,
        })
    }

    fn exists(&self, path: &Path) -> bool {
        self.sim().node(path).is_some()
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.sim().node(path) == Some(Node::Dir)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.sim();
        s.op()?;
        let i = s.file(from)?;
        let (to_parent, to_name) = s.split(to)?;
        if s.dir_mut(to_parent)?.current.get(&to_name) == Some(&Node::Dir) {
            return Err(io::Error::other("is a directory"));
        }
        let (from_parent, from_name) = s.split(from)?;
        let op = s.next_op();
        s.set_name(op, from_parent, &from_name, None)?;
        s.set_name(op, to_parent, &to_name, Some(Node::File(i)))?;
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.sim();
        s.op()?;
        s.file(path)?;
        let (parent, name) = s.split(path)?;
        let op = s.next_op();
        s.set_name(op, parent, &name, None)?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.sim();
        s.op()?;
        let d = s.dir_mut(dir)?;
        d.durable = d.current.clone();
        s.changes.retain(|c| c.dir != dir);
        Ok(())
    }

    fn syncfs(&self) -> io::Result<()> {
        let mut s = self.sim();
        s.op()?;
        for f in &mut s.files {
            f.durable = f.current.clone();
        }
        for d in s.dirs.values_mut() {
            d.durable = d.current.clone();
        }
        s.changes.clear();
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.sim();
        s.alive()?;
        Ok(s.dirs.get(dir).ok_or_else(not_found)?.current.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_what_was_made_durable_and_whole_operations_of_the_rest() {
        let root = Path::new("/sim");
        let mut outcomes = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let m = SimMedium::new(root);
            let d = root.join("d");
            m.create_dir_all(&d).unwrap();
            m.sync_dir(root).unwrap();
            m.create(&d.join("synced"), &[b"one"], true).unwrap();
            m.create(&d.join("unsynced"), &[&[7u8; 4 * SECTOR]], false).unwrap();
            m.sync_dir(&d).unwrap();
            m.create(&d.join("unnamed"), &[b"x"], true).unwrap();
            m.rename(&d.join("synced"), &d.join("moved")).unwrap();
            m.create_dir_all(&root.join("e")).unwrap();
            m.create(&root.join("e").join("f"), &[b"f"], true).unwrap();
            m.sync_dir(&root.join("e")).unwrap();
            m.crash(seed);
            let names = m.list(&d).unwrap();
            // The rename is whole: exactly one of its names, with the synced contents.
            let one: Vec<&String> = names.iter().filter(|n| *n == "synced" || *n == "moved").collect();
            assert_eq!(one.len(), 1, "{names:?}");
            assert_eq!(m.read(&d.join(one[0]), 100).unwrap().unwrap().1, b"one");
            assert!(names.contains(&"unsynced".to_string()));
            // Torn: each sector is either all sevens or all zeroes (or cut off).
            let (_, torn) = m.read(&d.join("unsynced"), u64::MAX).unwrap().unwrap();
            assert!(torn.chunks(SECTOR).all(|s| s.iter().all(|&b| b == 7) || s.iter().all(|&b| b == 0)));
            // A directory survives with the contents it synced, or not at all.
            if m.exists(&root.join("e")) {
                assert_eq!(m.list(&root.join("e")).unwrap(), ["f"]);
            }
            outcomes.insert((names, m.exists(&root.join("e"))));
        }
        // Every unsynced change is sometimes lost and sometimes kept.
        assert!(
            outcomes.contains(&(vec!["synced".to_string(), "unsynced".to_string()], false)),
            "{outcomes:?}"
        );
        assert!(outcomes.iter().any(|(names, _)| names.contains(&"moved".to_string())));
        assert!(outcomes.iter().any(|(names, _)| names.contains(&"unnamed".to_string())));
        assert!(outcomes.iter().any(|(_, e)| *e));
    }

    #[test]
    fn the_crash_point_fails_that_operation_and_every_later_one() {
        let root = Path::new("/sim");
        let m = SimMedium::new(root);
        m.fail_at(Some(2));
        m.create(&root.join("a"), &[b"a"], false).unwrap();
        assert!(m.create(&root.join("b"), &[b"b"], false).is_err());
        assert!(m.list(root).is_err());
        m.crash(0);
        assert!(m.list(root).unwrap().is_empty());
    }
}
