//! Stat caches: which files a capture may skip reading because they are unchanged
//! since the snapshot the cache points into, and their garbage collection.

use std::fs;
use std::path::{Path, PathBuf};

use crate::store::{CacheKind, SnapshotId, Store};
use crate::workflows::fsutil::io;
use crate::workflows::{fstree, Result};

/// The stat cache of a container if the snapshot its entries point into is still
/// in the store (a removed one could not supply unchanged files after the thaw).
pub(super) fn usable_stat_cache(
    store: &Store,
    path: &Path,
) -> Option<(fstree::StatCache, SnapshotId)> {
    let c = fstree::StatCache::load(path)?;
    let sid = SnapshotId::parse(&c.snapshot)?;
    store.resolve(&sid.full()).ok().filter(|r| *r == sid)?;
    Some((c, sid))
}

/// Names the snapshot an overlay copy was restored from (full id), in its
/// private directory.
pub(super) const COPY_SNAPSHOT_FILE: &str = "snapshot";

/// The first checkpoint of a copy restored onto an overlay: every file of its
/// rootfs that was never copied up is still the snapshot's own (the read-only
/// base), so a stat cache built from the snapshot's manifest and a stat taken
/// now spares reading those files while frozen. A file counts only when its stat
/// matches the manifest's size, its ctime is older than the racy margin, and it
/// is absent from the upper layer when checked *after* the stat (copy-up is
/// one-way, and gives the file a new ctime, so a later copy-up or write changes
/// the key the capture compares).
pub(super) fn copy_stat_cache(
    store: &Store,
    owned: &Path,
    rootfs: &Path,
) -> Option<(fstree::StatCache, SnapshotId)> {
    let upper = owned.join("upper");
    if !upper.is_dir() || rootfs != owned.join("merged") {
        return None;
    }
    let sid = SnapshotId::parse(
        fs::read_to_string(owned.join(COPY_SNAPSHOT_FILE))
            .ok()?
            .trim(),
    )?;
    let base = store.cache_dir(CacheKind::Rootfs, &sid).join("rootfs");
    store.resolve(&sid.full()).ok().filter(|r| *r == sid)?;
    let bytes = store.read_file(&sid, fstree::MANIFEST_FILE).ok()?;
    let m = fstree::parse_manifest(&bytes, Path::new(fstree::MANIFEST_FILE)).ok()?;
    let tree = m.trees.iter().find(|t| t.role == "rootfs")?;
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .saturating_sub(std::time::Duration::from_secs(2));
    let mut files = std::collections::BTreeMap::new();
    for e in &tree.entries {
        let (fstree::Kind::File, Some(offset), Some(sha256)) = (&e.kind, e.offset, &e.sha256)
        else {
            continue;
        };
        let Ok(md) = fs::symlink_metadata(rootfs.join(&e.path)) else {
            continue;
        };
        let key = fstree::StatKey::of(&md);
        // The file the copy sees must be the base's own inode, unmodified (not a
        // file renamed over from elsewhere in the base, nor a copied-up hard link).
        let Ok(bmd) = fs::symlink_metadata(base.join(&e.path)) else {
            continue;
        };
        let bkey = fstree::StatKey::of(&bmd);
        if (
            bkey.ino,
            bkey.size,
            bkey.mtime,
            bkey.mtime_nsec,
            bkey.ctime,
            bkey.ctime_nsec,
        ) != (
            key.ino,
            key.size,
            key.mtime,
            key.mtime_nsec,
            key.ctime,
            key.ctime_nsec,
        ) {
            continue;
        }
        let ctime = std::time::Duration::new(
            u64::try_from(key.ctime).unwrap_or(u64::MAX),
            u32::try_from(key.ctime_nsec).unwrap_or(0),
        );
        if !md.is_file() || key.size != e.size || ctime >= cutoff {
            continue;
        }
        match fs::symlink_metadata(upper.join(&e.path)) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            _ => continue,
        }
        files.insert(
            e.path.clone(),
            fstree::CachedFile {
                key,
                offset,
                sha256: sha256.clone(),
            },
        );
    }
    let cache = fstree::StatCache {
        version: fstree::STAT_CACHE_VERSION,
        snapshot: sid.full(),
        trees: vec![fstree::CacheTree {
            source: rootfs.to_path_buf(),
            files,
        }],
    };
    Some((cache, sid))
}

/// The verified `fsdata-0.bin` of snapshot `sid`: the copy under `cache/img/` when
/// a restore already materialised it, else only that file materialised into `dir`.
pub(super) fn previous_fs_data(store: &Store, sid: &SnapshotId, dir: &Path) -> Result<PathBuf> {
    if let Some(img) = store.cache_ready(CacheKind::Image, sid) {
        let cached = img.join(fstree::DATA_FILE);
        if cached.is_file() {
            return Ok(cached);
        }
    }
    Ok(store.materialize_file(sid, fstree::DATA_FILE, dir)?)
}

/// Every process of the container: the cgroup of its init (v2, or v1's `pids`,
/// `memory` or `freezer` hierarchy) and its descendants' cgroups. Empty when
/// unreadable; then no file counts as mapped.
pub(super) fn container_pids(pid: i32) -> Vec<i32> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut p = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (p.next(), p.next(), p.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            // The root cgroup would be every process of the host.
            continue;
        }
        if ctrls.is_empty() {
            dirs.push(Path::new("/sys/fs/cgroup").join(rel));
        } else if let Some(c) = ["pids", "memory", "freezer"]
            .iter()
            .find(|c| ctrls.split(',').any(|x| x == **c))
        {
            dirs.push(Path::new("/sys/fs/cgroup").join(c).join(rel));
        }
    }
    let mut pids = vec![pid];
    for d in dirs {
        let mut stack = vec![d];
        while let Some(d) = stack.pop() {
            if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        if pids.len() > 1 {
            break;
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes the stat caches that can serve no capture any more: unreadable (or of
/// another version), or pointing into a snapshot no longer in the store. They are
/// named by container id, and ids that are never checkpointed again (a prewarm's
/// default name, a removed container's) would otherwise keep theirs forever.
/// Returns the bytes freed.
pub(super) fn gc_stat_caches(store: &Store, dry_run: bool) -> Result<u64> {
    let files = store.stat_cache_files();
    if files.is_empty() {
        return Ok(0);
    }
    let live: Vec<SnapshotId> = store.list()?.into_iter().map(|s| s.id).collect();
    let mut bytes = 0;
    for path in files {
        let sid = fstree::StatCache::load(&path).and_then(|c| SnapshotId::parse(&c.snapshot));
        // A snapshot ingested after the listing above is looked up again.
        let keep = sid.is_some_and(|sid| {
            live.contains(&sid) || store.resolve(&sid.full()).is_ok_and(|r| r == sid)
        });
        if keep {
            continue;
        }
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if !dry_run {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("remove stale stat cache", &path)(e)),
            }
        }
        bytes += size;
    }
    Ok(bytes)
}
