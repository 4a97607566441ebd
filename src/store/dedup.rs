//! Deduplication against the store: which pack already holds each page, for the
//! snapshots in index.json. A pack is offered for reuse only after this ingest
//! hashed it whole and it matched its digest; a page whose first pack is damaged
//! falls back to a second pack holding it, else it is stored again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;

use super::blob::{hash_file, BlobDir};
use super::catalog;
use super::error::Result;
use super::ids::{BlobDigest, PageDigest};
use super::layout::{self, Manifest};
use super::pack;
use super::util;
use super::Store;

/// Page digest -> pack of the snapshots already in the store.
pub(crate) struct DedupIndex {
    pub(crate) packs: Vec<(BlobDigest, u64)>,
    pub(crate) map: HashMap<PageDigest, u32>,
    /// A second pack for pages held by more than one (few: concurrent ingests, or
    /// pages stored again because their first pack was damaged).
    pub(crate) alt: HashMap<PageDigest, u32>,
    /// Per pack: not checked yet (None), or whether its whole content matched its
    /// digest when this ingest first wanted one of its pages.
    pub(crate) intact: Vec<Option<bool>>,
}

impl DedupIndex {
    /// Reads the index of every pack referenced by a snapshot in index.json. Packs
    /// that are missing or damaged are skipped: their pages are simply stored again.
    pub(crate) fn load(store: &Store) -> Result<DedupIndex> {
        let index = store.read_index()?;
        let blobs = store.blobs();
        let mut packs: BTreeMap<BlobDigest, u64> = BTreeMap::new();
        for e in catalog::entries(&index) {
            let Ok(bytes) = blobs.read_verified(&e.manifest, None, "manifest") else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
                continue;
            };
            for l in m.layers.iter().filter(|l| l.media_type == layout::MT_PACK) {
                if let Some(d) = l.blob() {
                    packs.insert(d, l.size);
                }
            }
        }
        let mut out = DedupIndex {
            packs: Vec::new(),
            map: HashMap::new(),
            alt: HashMap::new(),
            intact: Vec::new(),
        };
        for (d, size) in packs {
            let path = blobs.path(&d);
            let Ok(f) = File::open(&path) else { continue };
            if f.metadata().map(|m| m.len()).ok() != Some(size) {
                continue;
            }
            let Ok(idx) = pack::read_index(&f, size, &path) else {
                continue;
            };
            let no = out.packs.len() as u32;
            out.packs.push((d, size));
            out.intact.push(None);
            out.map.reserve(idx.digests.len());
            for digest in idx.digests {
                match out.map.entry(digest) {
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(no);
                    }
                    std::collections::hash_map::Entry::Occupied(_) => {
                        out.alt.entry(digest).or_insert(no);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The pack holding page `d`, if that pack may be reused (checked intact):
    /// its first pack, else its second.
    pub(crate) fn reusable(&self, d: &PageDigest) -> Option<u32> {
        [self.map.get(d), self.alt.get(d)]
            .into_iter()
            .flatten()
            .copied()
            .find(|&p| self.intact.get(p as usize) == Some(&Some(true)))
    }

    /// The pack to check next for page `d`: its first pack if not checked yet,
    /// its second if the first turned out damaged and the second is unchecked.
    fn unchecked(&self, d: &PageDigest) -> Option<u32> {
        let state = |p: u32| self.intact.get(p as usize).copied().flatten();
        let p = *self.map.get(d)?;
        match state(p) {
            None => Some(p),
            Some(true) => None,
            Some(false) => self.alt.get(d).copied().filter(|&a| state(a).is_none()),
        }
    }

    /// Hashes, in parallel, every pack not checked yet that holds one of
    /// `digests`, and records whether it matches its digest. Returns the packs
    /// found damaged. A pack is read whole once per ingest: a snapshot that
    /// references it then relies on every byte of it.
    pub(crate) fn check_packs_for(
        &mut self,
        digests: &[PageDigest],
        blobs: &BlobDir,
    ) -> Vec<BlobDigest> {
        // First packs, then the second packs of pages whose first was damaged.
        let mut damaged = self.check_round(digests, blobs);
        if !damaged.is_empty() {
            damaged.extend(self.check_round(digests, blobs));
        }
        damaged
    }

    /// One round of `check_packs_for`: hashes the packs `unchecked` names.
    fn check_round(&mut self, digests: &[PageDigest], blobs: &BlobDir) -> Vec<BlobDigest> {
        let todo: Vec<u32> = digests
            .iter()
            .filter_map(|d| self.unchecked(d))
            .collect::<BTreeSet<u32>>()
            .into_iter()
            .collect();
        if todo.is_empty() {
            return Vec::new();
        }
        let packs = &self.packs;
        let results = util::par_map(
            &todo,
            || (),
            |_, &p| {
                let (d, size) = packs[p as usize];
                // Unreadable counts as damaged: its pages are simply stored again.
                hash_file(&blobs.path(&d)).is_ok_and(|(got, n)| got == d && n == size)
            },
        );
        let mut damaged = Vec::new();
        for (&p, ok) in todo.iter().zip(results) {
            self.intact[p as usize] = Some(ok);
            if !ok {
                damaged.push(self.packs[p as usize].0);
            }
        }
        damaged
    }
}
