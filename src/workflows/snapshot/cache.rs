//! The restore caches of a snapshot (`cache/img/`, `cache/fs/`): building, warming
//! and garbage collection.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::statcache::gc_stat_caches;
use super::*;
use crate::runtime::Runtime;
use crate::store::{CacheBuild, CacheKind, CacheLookup, SnapshotId, Store};
use crate::workflows::{fstree, Result, WorkflowError};

/// The complete cache entry of `kind` for `sid`, built by `build` (into
/// `CacheBuild::path`) when missing or damaged; the store marks it complete.
/// Later callers, in this or another process, reuse it.
pub(super) fn cached(
    store: &Store,
    kind: CacheKind,
    sid: &SnapshotId,
    build: impl FnOnce(&CacheBuild) -> Result<()>,
) -> Result<PathBuf> {
    match store.cache_lookup(kind, sid)? {
        CacheLookup::Ready(p) => Ok(p),
        CacheLookup::Build(b) => {
            build(&b)?;
            Ok(b.commit()?)
        }
    }
}

/// Builds the restore caches of a snapshot ahead of time: the verified CRIU image
/// (`cache/img/`) and, when the snapshot carries its filesystem, the read-only
/// base of its rootfs (`cache/fs/`). A later `restore --from` (or serve's pool)
/// then goes straight to CRIU. Returns the milliseconds it took.
pub fn warm_cache(rt: &Runtime, store: &Store, from: &str) -> Result<u128> {
    let t0 = Instant::now();
    let p = prepare(rt, store, from, false, false)?;
    if p.manifest.is_some() {
        ensure_base(store, &p)?;
    }
    Ok(t0.elapsed().as_millis())
}

/// The read-only, verified base of a snapshot's root filesystem under the store's
/// cache (`cache/fs/`), materialised once and shared by every copy.
pub(super) fn ensure_base(store: &Store, p: &Prepared) -> Result<PathBuf> {
    let Some(manifest) = &p.manifest else {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: "it carries no filesystem".into(),
        });
    };
    let Some(root_index) = manifest.trees.iter().position(|t| t.role == "rootfs") else {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: "its filesystem has no rootfs tree (fs-manifest.json)".into(),
        });
    };
    cached(store, CacheKind::Rootfs, &p.sid, |b| {
        let tmp = b.path();
        fstree::materialize(manifest, root_index, &p.image.join(fstree::DATA_FILE), tmp).map_err(
            |e| match e {
                // A full disk is told as such, with the space free once the
                // partial base is gone (`cached` would remove it only after this,
                // and measured with it the free space is about 0).
                WorkflowError::Io { source, .. }
                    if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
                {
                    let _ = fs::remove_dir_all(tmp);
                    WorkflowError::NoSpace {
                        snapshot: p.sid.short(),
                        path: b.target(),
                        needed: manifest.trees[root_index]
                            .entries
                            .iter()
                            .map(|e| e.size)
                            .sum(),
                        free: free_bytes(b.target().parent().unwrap_or(tmp)),
                        source,
                    }
                }
                e => e,
            },
        )
    })
}

/// Bytes available to us on the filesystem of `p` (0 when unknown).
fn free_bytes(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

/// Removes cached root filesystems (`cache/fs/`) and images (`cache/img/`) of
/// snapshots that are no longer in the store (unless an overlay still uses
/// them), partial entries left by killed restores, and the stat caches
/// (`cache/fscache/`) whose snapshot is gone. Returns (entries, bytes); the stat
/// cache files count in the bytes only.
pub fn gc_fs_cache(store: &Store, dry_run: bool) -> Result<(u64, u64)> {
    let r = store.gc_caches(dry_run)?;
    let bytes = r.bytes_freed + gc_stat_caches(store, dry_run)?;
    Ok((r.entries_removed + r.partial_removed, bytes))
}
