//! Garbage collection and retention. `gc` marks every blob reachable from
//! index.json and sweeps the rest plus everything in `tmp/` (it holds the exclusive
//! lock, so no other stasis process can be writing there); `prune` drops untagged
//! snapshots outside a retention policy and then collects. This is the only code
//! that deletes published blobs.

use std::collections::HashSet;
use std::fs;
use std::time::Duration;

use super::blob::{sync_dir, BlobDir};
use super::catalog;
use super::error::{io_err, Result, StoreError};
use super::ids::{BlobDigest, SnapshotId};
use super::Store;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Unreferenced blobs removed (or, with dry_run, that would be).
    pub blobs_removed: u64,
    /// Bytes freed by removing blobs and temp files.
    pub bytes_freed: u64,
    /// Entries removed from tmp/.
    pub tmp_removed: u64,
    pub dry_run: bool,
}

/// Digests a JSON manifest or index refers to (`config`, `layers[]`, `manifests[]`).
fn children(v: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = v.pointer("/config/digest").and_then(|d| d.as_str()) {
        out.push(d.to_string());
    }
    for key in ["layers", "manifests", "blobs"] {
        if let Some(a) = v.get(key).and_then(|a| a.as_array()) {
            out.extend(
                a.iter()
                    .filter_map(|l| l.get("digest")?.as_str().map(String::from)),
            );
        }
    }
    out
}

/// Best-effort marking below a manifest of another tool (for verify).
pub(crate) fn mark_foreign(blobs: &BlobDir, d: &BlobDigest, set: &mut HashSet<BlobDigest>) {
    let Ok(bytes) = fs::read(blobs.path(d)) else {
        return;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    for c in children(&v) {
        if let Some(cd) = BlobDigest::parse(&c) {
            if set.insert(cd) {
                mark_foreign(blobs, &cd, set);
            }
        }
    }
}

/// Every blob reachable from index.json. Refuses when a root cannot be read: its
/// blobs would otherwise be swept.
fn mark(store: &Store) -> Result<HashSet<BlobDigest>> {
    let index = store.read_index()?;
    let blobs = store.blobs();
    let mut set = HashSet::new();
    let damaged = |reason: String| StoreError::Damaged {
        path: store.paths.root.clone(),
        reason,
    };
    let mut stack: Vec<(BlobDigest, String)> = Vec::new();
    for d in &index.manifests {
        let name = d
            .snapshot_id()
            .map(|i| format!("snapshot {i}"))
            .unwrap_or_else(|| format!("index entry {}", d.digest));
        let bd = d
            .blob()
            .ok_or_else(|| damaged(format!("{name} has a malformed digest {:?}", d.digest)))?;
        if set.insert(bd) {
            stack.push((bd, name));
        }
    }
    while let Some((d, name)) = stack.pop() {
        let path = blobs.path(&d);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                return Err(damaged(format!(
                    "manifest {d} of {name} cannot be read ({e}); gc would lose track of its blobs, remove it with `stasis snapshot rm` first"
                )))
            }
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return Err(damaged(format!(
                "manifest {d} of {name} is not valid JSON; gc would lose track of its blobs, remove it with `stasis snapshot rm` first"
            )));
        };
        for c in children(&v) {
            let cd = BlobDigest::parse(&c)
                .ok_or_else(|| damaged(format!("{name} refers to a malformed digest {c:?}")))?;
            // Only manifests and indexes are descended into; configs and layers
            // are leaves (their own JSON never names blobs).
            if set.insert(cd) && is_manifest_like(&v, &c) {
                stack.push((cd, name.clone()));
            }
        }
    }
    Ok(set)
}

/// Whether `digest` is listed under `manifests` (a nested index or manifest).
fn is_manifest_like(v: &serde_json::Value, digest: &str) -> bool {
    v.get("manifests")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|m| m.get("digest").and_then(|d| d.as_str()) == Some(digest))
        })
}

/// gc with the exclusive store lock already held.
pub(crate) fn gc_locked(store: &Store, dry_run: bool) -> Result<GcReport> {
    let marked = mark(store)?;
    let blobs = store.blobs();
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    let rd = fs::read_dir(&blobs.dir).map_err(io_err("read directory", &blobs.dir))?;
    for e in rd {
        let e = e.map_err(io_err("read directory", &blobs.dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(d) = BlobDigest::from_hex(&name) else {
            continue; // not ours; verify warns about it
        };
        if marked.contains(&d) {
            continue;
        }
        let path = e.path();
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        if !dry_run {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
            // Tests kill gc here: one unreferenced blob gone, the rest not yet.
            super::util::fault_point("gc.removing");
        }
        report.blobs_removed += 1;
        report.bytes_freed += len;
    }
    if report.blobs_removed > 0 && !dry_run {
        sync_dir(&blobs.dir)?;
    }
    // Every writer to tmp/ holds the store lock at least shared, so under our
    // exclusive lock nothing in tmp/ is live.
    let tmp = store.paths.tmp();
    if let Ok(rd) = fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let path = e.path();
            // The image of a stopped container whose ingest failed, kept for
            // the user (and a live staging directory, though its pin keeps gc
            // from running at all).
            if super::staging::is_kept(&path) || super::staging::is_live(&path) {
                continue;
            }
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let len = if meta.is_dir() {
                dir_size(&path)
            } else {
                meta.len()
            };
            if !dry_run {
                let r = if meta.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                r.map_err(io_err("remove", &path))?;
            }
            report.tmp_removed += 1;
            report.bytes_freed += len;
        }
    }
    Ok(report)
}

fn dir_size(p: &std::path::Path) -> u64 {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The series a snapshot belongs to for `prune` (as restic groups by host and
/// paths): the repository name of each of its tags (`redis:v1` and `redis:v5`
/// are one series `redis`), or, untagged, its container id. A snapshot with tags
/// of several names is in each of those series.
pub(crate) fn series_of(e: &catalog::Entry) -> Vec<String> {
    if e.tags.is_empty() {
        return vec![format!("container {}", e.container)];
    }
    let mut names: Vec<String> = e
        .tags
        .iter()
        .map(|t| format!("tag {}", t.split_once(':').map_or(t.as_str(), |(n, _)| n)))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether `created` (RFC 3339) is within `w` of `now`; an unparsable or future
/// time counts as recent (never removed on a guess).
fn is_recent(created: &str, w: Duration, now: chrono::DateTime<chrono::Utc>) -> bool {
    match chrono::DateTime::parse_from_rfc3339(created) {
        Ok(t) => now
            .signed_duration_since(t)
            .to_std()
            .map(|age| age <= w)
            .unwrap_or(true),
        Err(_) => true,
    }
}

/// prune with the exclusive store lock already held. Per series (`series_of`),
/// keeps the `keep_last` newest and those created within `keep_within`; a
/// snapshot kept by any of its series is kept, and one tagged `NAME:latest` (what
/// `--from NAME` restores) is always kept. The rest are removed with their tags.
pub(crate) fn prune_locked(
    store: &Store,
    keep_last: Option<usize>,
    keep_within: Option<Duration>,
    dry_run: bool,
) -> Result<Vec<SnapshotId>> {
    if keep_last.is_none() && keep_within.is_none() {
        return Err(StoreError::Invalid(
            "prune needs a policy: keep_last and/or keep_within".into(),
        ));
    }
    let now = chrono::Utc::now();
    let mut entries = catalog::entries(&store.read_index()?);
    // Newest first (ties: a stable order by id).
    entries.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut doomed = Vec::new();
    for e in &entries {
        let mut keep = e.tags.iter().any(|t| t.ends_with(":latest"))
            || keep_within.is_some_and(|w| is_recent(&e.created, w, now));
        for s in series_of(e) {
            let rank = seen.entry(s).or_insert(0);
            keep |= keep_last.is_some_and(|n| *rank < n);
            *rank += 1;
        }
        if !keep {
            doomed.push(e.id);
        }
    }
    if dry_run || doomed.is_empty() {
        if !dry_run {
            gc_locked(store, false)?;
        }
        return Ok(doomed);
    }
    store.update_index(|index| {
        for id in &doomed {
            catalog::drop_snapshot(index, id);
        }
        Ok(())
    })?;
    // Tests kill prune here: the snapshots are out of index.json, their blobs
    // not yet removed (garbage that the next gc frees).
    super::util::fault_point("prune.before-gc");
    gc_locked(store, false)?;
    Ok(doomed)
}
