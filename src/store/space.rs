//! Free-space check before materialize writes a snapshot: stored page tables may
//! claim up to 1 TiB of a page a pack really holds (import accepts that, every
//! page is there), so what a materialisation will write is counted against the
//! destination's free space first. Owns only that count; reads tables and packs'
//! indexes through their modules.

use std::io;
use std::path::Path;

use super::config::{SnapshotConfig, KIND_PAGES};
use super::error::{io_err, Result, StoreError};
use super::ids::{BlobDigest, SnapshotId};
use super::materialize::{zero_page_digest, PackSet};
use super::pack::PAGE_SIZE;
use super::pagetable;
use super::Store;

/// Refuses to start when `dest`'s filesystem cannot hold what materialize will
/// write: the small files plus every page that is not the zero page (those stay
/// holes). A page table may claim up to 1 TiB of one page a pack really holds;
/// this keeps such a claim from filling the disk. Streams each table only until
/// the answer is known: its first page no pack holds, or the page past the space.
pub(crate) fn check_space(
    store: &Store,
    id: &SnapshotId,
    cfg: &SnapshotConfig,
    packs: &PackSet,
    dest: &Path,
) -> Result<()> {
    let st = nix::sys::statvfs::statvfs(dest)
        .map_err(|e| io_err("statvfs", dest)(io::Error::from(e)))?;
    let free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
    let need: u64 = cfg
        .files
        .iter()
        .filter(|r| r.kind != KIND_PAGES)
        .fold(0, |n, r| n.saturating_add(r.size));
    let mut budget = free.saturating_sub(need) / PAGE_SIZE as u64;
    let no_room = |need: String| {
        StoreError::Destination {
        path: dest.to_path_buf(),
        reason: format!("the snapshot's image needs {need} bytes (its files, zero pages left out) and only {free} are free there; free some space or check where the snapshot came from"),
    }
    };
    if need > free {
        return Err(no_room(need.to_string()));
    }
    let zero = zero_page_digest();
    for rec in cfg.files.iter().filter(|r| r.kind == KIND_PAGES) {
        // A missing or malformed table is reported by write_pages_file.
        let Some(d) = rec.page_table.as_deref().and_then(BlobDigest::parse) else {
            continue;
        };
        let mut last = None;
        let stop = pagetable::open(&store.blobs(), &d)?.find(|p| {
            if *p == zero {
                return false;
            }
            if last != Some(*p) {
                last = Some(*p);
                if !packs.map.contains_key(p) {
                    return true;
                }
            }
            if budget == 0 {
                return true;
            }
            budget -= 1;
            false
        })?;
        match stop {
            Some((i, p)) if !packs.map.contains_key(&p) => {
                return Err(StoreError::Corrupt {
                    snapshot: id.to_string(),
                    file: rec.name.clone(),
                    offset: i * PAGE_SIZE as u64,
                    blob: d.to_string(),
                    what: format!("page {p} is in none of the snapshot's packs"),
                })
            }
            Some(_) => return Err(no_room("more than that".into())),
            None => {}
        }
    }
    Ok(())
}
