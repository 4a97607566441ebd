//! Diff of two snapshots: which files were added, removed or changed, and for
//! pages files how many pages changed in place, were added or removed, and how many
//! of the second snapshot's pages appear nowhere in the first (what a checkpoint
//! of b after a actually had to store). Reads configs and page tables only.

use std::collections::{BTreeMap, HashSet};

use super::config::{FileRecord, SnapshotConfig, KIND_PAGES};
use super::error::Result;
use super::ids::{BlobDigest, PageDigest, SnapshotId};
use super::pagetable;
use super::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileChange {
    Added,
    Removed,
    Changed,
    Unchanged,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PageDiff {
    pub pages_a: u64,
    pub pages_b: u64,
    /// Positions present in both whose page differs.
    pub changed: u64,
    /// Positions only in b (the file grew).
    pub added: u64,
    /// Positions only in a (the file shrank).
    pub removed: u64,
    /// Pages of b whose content is nowhere in a (shifted pages are not counted).
    pub new_content: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FileDiff {
    pub name: String,
    pub change: FileChange,
    pub size_a: Option<u64>,
    pub size_b: Option<u64>,
    /// For pages-N.img files present in both.
    pub pages: Option<PageDiff>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DiffReport {
    pub a: SnapshotId,
    pub b: SnapshotId,
    pub files: Vec<FileDiff>,
    pub image_bytes_a: u64,
    pub image_bytes_b: u64,
    /// Totals over all pages files.
    pub pages: PageDiff,
}

/// The streamed page table of a pages file (None: the record names no table, read
/// as an empty file).
fn page_table(
    store: &Store,
    rec: &FileRecord,
) -> Result<Option<pagetable::TableReader<std::fs::File>>> {
    let Some(d) = rec.page_table.as_deref().and_then(BlobDigest::parse) else {
        return Ok(None);
    };
    pagetable::open(&store.blobs(), &d).map(Some)
}

/// Compares two page tables position by position, streaming both (memory: two
/// chunks, whatever the tables claim).
fn compare(
    ta: Option<pagetable::TableReader<std::fs::File>>,
    tb: Option<pagetable::TableReader<std::fs::File>>,
    all_a: &HashSet<PageDigest>,
) -> Result<PageDiff> {
    let mut p = PageDiff::default();
    let (mut ta, mut tb) = (ta, tb);
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    let (mut ia, mut ib) = (0usize, 0usize);
    loop {
        if ia == ca.len() {
            ia = 0;
            if !next(&mut ta, &mut ca)? {
                ta = None;
            }
        }
        if ib == cb.len() {
            ib = 0;
            if !next(&mut tb, &mut cb)? {
                tb = None;
            }
        }
        match (ca.get(ia), cb.get(ib)) {
            (None, None) => break,
            (Some(_), None) => {
                p.pages_a += 1;
                p.removed += 1;
                ia += 1;
            }
            (None, Some(b)) => {
                p.pages_b += 1;
                p.added += 1;
                p.new_content += u64::from(!all_a.contains(b));
                ib += 1;
            }
            (Some(a), Some(b)) => {
                p.pages_a += 1;
                p.pages_b += 1;
                p.changed += u64::from(a != b);
                p.new_content += u64::from(!all_a.contains(b));
                ia += 1;
                ib += 1;
            }
        }
    }
    Ok(p)
}

/// The next chunk of a table into `out` (emptied at its end).
fn next(
    t: &mut Option<pagetable::TableReader<std::fs::File>>,
    out: &mut Vec<PageDigest>,
) -> Result<bool> {
    match t {
        Some(r) => r.next_chunk(out),
        None => {
            out.clear();
            Ok(false)
        }
    }
}

pub(crate) fn diff(store: &Store, a: &SnapshotId, b: &SnapshotId) -> Result<DiffReport> {
    let (ca, _) = store.snapshot_config(a)?;
    let (cb, _) = store.snapshot_config(b)?;
    let fa: BTreeMap<&str, &FileRecord> = ca.files.iter().map(|r| (r.name.as_str(), r)).collect();
    let fb: BTreeMap<&str, &FileRecord> = cb.files.iter().map(|r| (r.name.as_str(), r)).collect();
    let all_a: HashSet<PageDigest> = all_pages(store, &ca)?;
    let mut report = DiffReport {
        a: *a,
        b: *b,
        files: Vec::new(),
        image_bytes_a: ca.sizes.image_bytes,
        image_bytes_b: cb.sizes.image_bytes,
        pages: PageDiff::default(),
    };
    let names: std::collections::BTreeSet<&str> = fa.keys().chain(fb.keys()).copied().collect();
    for name in names {
        let (ra, rb) = (fa.get(name).copied(), fb.get(name).copied());
        let change = match (ra, rb) {
            (None, Some(_)) => FileChange::Added,
            (Some(_), None) => FileChange::Removed,
            (Some(x), Some(y)) if x.sha256 == y.sha256 && x.size == y.size => FileChange::Unchanged,
            _ => FileChange::Changed,
        };
        let mut pages = None;
        if ra.is_none_or(|r| r.kind == KIND_PAGES) && rb.is_none_or(|r| r.kind == KIND_PAGES) {
            let ta = match ra {
                Some(r) => page_table(store, r)?,
                None => None,
            };
            let tb = match rb {
                Some(r) => page_table(store, r)?,
                None => None,
            };
            let p = compare(ta, tb, &all_a)?;
            report.pages.pages_a += p.pages_a;
            report.pages.pages_b += p.pages_b;
            report.pages.changed += p.changed;
            report.pages.added += p.added;
            report.pages.removed += p.removed;
            report.pages.new_content += p.new_content;
            pages = Some(p);
        }
        report.files.push(FileDiff {
            name: name.to_string(),
            change,
            size_a: ra.map(|r| r.size),
            size_b: rb.map(|r| r.size),
            pages,
        });
    }
    Ok(report)
}

fn all_pages(store: &Store, c: &SnapshotConfig) -> Result<HashSet<PageDigest>> {
    let mut set = HashSet::new();
    // Distinct digests only: each one not the zero page is backed by a page in a
    // pack, so the set is bounded by the store's real bytes, not by the tables' claims.
    for r in c.files.iter().filter(|r| r.kind == KIND_PAGES) {
        if let Some(t) = page_table(store, r)? {
            t.for_each(|_, d| {
                set.insert(*d);
                Ok(())
            })?;
        }
    }
    Ok(set)
}

/// (pages, new pages) of file `name` of snapshot `id`: new pages appear in no
/// page table of any snapshot created before it (by `created`, then id), so this is
/// what the file added to the store, uncompressed. A file kept in the files blob
/// counts as (0, 0).
pub(crate) fn new_pages(store: &Store, id: &SnapshotId, name: &str) -> Result<(u64, u64)> {
    let (cfg, _) = store.snapshot_config(id)?;
    let Some(rec) = cfg
        .files
        .iter()
        .find(|r| r.name == name && r.kind == KIND_PAGES)
    else {
        return Ok((0, 0));
    };
    let this = store.entry(id)?;
    let mut older: HashSet<PageDigest> = HashSet::new();
    for e in super::catalog::entries(&store.read_index()?) {
        if e.id == *id || (e.created.as_str(), e.id) >= (this.created.as_str(), this.id) {
            continue;
        }
        let (c, _) = store.snapshot_config(&e.id)?;
        older.extend(all_pages(store, &c)?);
    }
    let zero = super::materialize::zero_page_digest();
    let mut fresh: HashSet<PageDigest> = HashSet::new();
    let mut count = 0u64;
    if let Some(t) = page_table(store, rec)? {
        t.for_each(|_, d| {
            count += 1;
            if *d != zero && !older.contains(d) {
                fresh.insert(*d);
            }
            Ok(())
        })?;
    }
    Ok((count, fresh.len() as u64))
}
