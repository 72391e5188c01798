//! Which points cannot be restored whole because they depend on a damaged object: their root,
//! or a map page or chunk they name that is quarantined (`docs/store.md`, "Damage").

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::error::StoreError;
use super::format::{hex, DiskRecord, Root};
use super::objects;
use super::parts::Parts;
use super::quarantine::{self, Object, Quarantined};

/// Per map page: the first quarantined chunk it names, if any.
type PageDamage = HashMap<[u8; 32], Option<[u8; 32]>>;

/// The quarantine as last seen by [`Damage::root`], and for each page read since, the first
/// quarantined chunk it names: points share pages, so checking a new point reads only the
/// pages no checked point had.
#[derive(Default)]
pub(crate) struct Damage(Mutex<(Quarantined, PageDamage)>);

impl Damage {
    /// Why point `id` cannot be restored whole because it depends on a damaged object (its
    /// root, or a page or chunk it names that is quarantined), or `None`. Reads the root, and
    /// while some page or chunk is quarantined, the pages of the point not read since the
    /// quarantine last changed.
    pub(crate) fn point(
        &self,
        parts: &Parts,
        disk: &DiskRecord,
        id: u64,
    ) -> Result<Option<String>, StoreError> {
        let q = quarantine::list(parts)?;
        let root_object = Object::Root(disk.name.clone(), id);
        if q.contains(&root_object) {
            return Ok(Some(format!("its root is {}", quarantine::reason(parts, &root_object))));
        }
        let (_, sum) = objects::point_record(parts, &disk.name, id)?;
        match objects::load_root(parts, disk, id, &sum) {
            Ok(root) => self.root(parts, &root, q),
            Err(e) if e.is_damage() => Ok(Some(format!("its root is damaged: {e}"))),
            Err(e) => Err(e),
        }
    }

    /// Why a point with `root` cannot be restored whole: a page it names is quarantined or
    /// damaged, or a chunk one of them names is quarantined (`q`: the quarantine now).
    pub(crate) fn root(
        &self,
        parts: &Parts,
        root: &Root,
        q: Quarantined,
    ) -> Result<Option<String>, StoreError> {
        if !q.has_objects() {
            return Ok(None);
        }
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.0 != q {
            *cache = (q, HashMap::new());
        }
        let region_size = parts.layout.region_size;
        for (region, page) in root {
            let at = u64::from(*region) * region_size;
            if cache.0.pages.contains(page) {
                return Ok(Some(format!("the map page of bytes {at}.. ({}) is quarantined", hex(page))));
            }
            let bad = match cache.1.get(page) {
                Some(bad) => *bad,
                None => {
                    let map = match objects::read_page(parts, page) {
                        Ok(map) => map,
                        Err(e) if e.is_damage() => {
                            return Ok(Some(format!("the map page of bytes {at}.. is damaged: {e}")))
                        }
                        Err(e) => return Err(e),
                    };
                    let bad = map.chunks().find(|c| cache.0.chunks.contains(*c)).copied();
                    cache.1.insert(*page, bad);
                    bad
                }
            };
            if let Some(c) = bad {
                return Ok(Some(format!("chunk {} (in bytes {at}..) is quarantined", hex(&c))));
            }
        }
        Ok(None)
    }
}
