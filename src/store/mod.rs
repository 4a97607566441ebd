//! The snapshot store: content-addressed, compressed, verified CRIU checkpoints in
//! an OCI image layout (FORMAT.md next to this file is the on-disk format).
//! Memory pages are deduplicated per 4 KiB page into zstd-compressed packs, the
//! other CRIU files travel together in one blob, each snapshot is an OCI manifest
//! and tags live in `index.json`.
//!
//! This module imports nothing else of stasis (only std and crates), so it could
//! become its own crate. It never runs CRIU and never touches containers: callers
//! hand it a finished image directory and get one back.
//!
//! Locking (flock(2), see `lock`): shared for ingest, materialize, export, import,
//! verify, tag, config reads and `pin`; exclusive for gc, prune and tag removal; `index.json`
//! read-modify-writes additionally take `index.lock` exclusively for a moment.

mod archive;
mod blob;
mod cache;
mod catalog;
mod config;
mod dedup;
mod diff;
mod error;
mod format;
mod gc;
mod ids;
mod ingest;
mod layout;
mod lock;
mod materialize;
mod pack;
mod pagetable;
mod rebuild;
mod repair;
mod space;
mod staging;
mod transfer;
mod util;
mod verify;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cache::{CacheBuild, CacheGcReport, CacheKind, CacheLookup};
pub use diff::{DiffReport, FileChange, FileDiff, PageDiff};
pub use error::StoreError;
pub use gc::GcReport;
pub use ids::{BlobDigest, PageDigest, SnapshotId};
pub use rebuild::RebuildReport;
pub use repair::RepairReport;
pub use staging::Staging;
pub use util::{fault_point, printable};
pub use verify::{Finding, Level};

use blob::BlobDir;
use error::Result;
use layout::{Index, Paths};
use lock::{Flock, Locks};

/// How long lock waits last before failing, unless `$STASIS_LOCK_TIMEOUT`
/// (seconds) or `Store::set_lock_timeout` says otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

/// `$STASIS_LOCK_TIMEOUT` (whole seconds), else `DEFAULT_LOCK_TIMEOUT`.
fn lock_timeout_from_env() -> Duration {
    std::env::var("STASIS_LOCK_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_LOCK_TIMEOUT, Duration::from_secs)
}

/// Default zstd level for new pages (measured: level 3 compresses pages 3.02x at ~0.46 GB/s).
pub const DEFAULT_COMPRESS_LEVEL: i32 = 3;

/// A snapshot store rooted at a directory. Cheap to clone; usable from many threads
/// (each operation takes its own locks).
#[derive(Clone, Debug)]
pub struct Store {
    paths: Paths,
    locks: Locks,
    /// The shared-memory tmpfs where `staging` prefers to put directories.
    shm: PathBuf,
}

#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// zstd level for new pages and the files blob (1..=22).
    pub compress_level: i32,
    /// Show a progress bar on stderr when it is a terminal.
    pub progress: bool,
    /// Names of image files to store page by page (deduplicated per 4 KiB
    /// page, like CRIU's `pages-N.img`, which always are) instead of in the
    /// files blob: large, page-aligned data of the caller's own.
    pub page_stored: Vec<String>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            compress_level: DEFAULT_COMPRESS_LEVEL,
            progress: false,
            page_stored: Vec::new(),
        }
    }
}

/// One file of a snapshot, as its config records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    pub name: String,
    pub size: u64,
    /// Stored page by page (a page table and packs), not in the files blob.
    pub page_stored: bool,
}

/// The store's shared lock, held until dropped (see `Store::pin`).
#[derive(Debug)]
pub struct Pin {
    _lock: Flock,
}

/// What to put into the store.
#[derive(Clone, Debug)]
pub struct SnapshotInput<'a> {
    /// A finished CRIU image directory (flat, regular files only).
    pub image_dir: &'a Path,
    /// The container's config.json, stored byte for byte.
    pub config_json: &'a [u8],
    pub container_id: &'a str,
    /// Free-form record kept in the config blob: CRIU options and version, dump
    /// stats, host (kernel, arch, page size, CPU, cgroup version), timings.
    pub metadata: serde_json::Value,
    /// Tags (`NAME` or `NAME:VER`) to point at the snapshot; moved if they exist.
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestReport {
    pub id: SnapshotId,
    /// Sum of the sizes of the image's files.
    pub image_bytes: u64,
    pub pages_total: u64,
    /// Pages this snapshot stored (not yet in the store; duplicates counted once).
    pub pages_new: u64,
    pub pages_reused: u64,
    /// Bytes of packs, page tables and files blob added (excluding the snapshot's
    /// own config and manifest, a few KiB).
    pub bytes_added: u64,
    pub duration: Duration,
    /// True when a snapshot with this id was already in the store: nothing new was
    /// written, the tags were pointed at the existing snapshot.
    pub existed: bool,
    /// Packs of earlier snapshots whose content no longer matched their digest:
    /// this snapshot stored their pages again instead of reusing them (the
    /// snapshots that reference them need `stasis snapshot verify --repair`).
    pub damaged_packs: Vec<BlobDigest>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotSummary {
    pub id: SnapshotId,
    pub origin: Origin,
    pub tags: Vec<String>,
    /// RFC 3339 UTC.
    pub created: String,
    pub container: String,
    pub image_bytes: u64,
    pub added_bytes: u64,
}

/// Where a snapshot came from, recorded by this store on its index.json entry
/// (`io.stasis.origin`) when it ingested or imported it. Ordered from least to
/// most trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// No record: ingested or imported by a stasis older than the trust model.
    /// Treated as foreign.
    Unknown,
    /// Imported from an archive (`snapshot import`): foreign.
    Imported,
    /// Made by a checkpoint on this host.
    Local,
}

impl Origin {
    /// Made here; its stored config.json is the operator's own.
    pub fn is_local(self) -> bool {
        self == Origin::Local
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Unknown => "unknown",
            Origin::Imported => "imported",
            Origin::Local => "local",
        })
    }
}

/// Checks a tag `NAME[:VER]` and returns its normal form (`NAME` means
/// `NAME:latest`), without touching any store.
pub fn normalize_tag(tag: &str) -> std::result::Result<String, StoreError> {
    catalog::normalize_tag(tag)
}

impl Store {
    /// Opens the store at `root`, creating the layout if the directory is missing or
    /// empty. A non-empty directory that is not a store is refused.
    pub fn open(root: &Path) -> std::result::Result<Store, StoreError> {
        layout::open_or_create(root)?;
        Ok(Store {
            paths: Paths {
                root: root.to_path_buf(),
            },
            locks: Locks {
                store: root.join(layout::LOCK),
                index: root.join(layout::INDEX_LOCK),
                timeout: lock_timeout_from_env(),
            },
            shm: PathBuf::from(staging::DEFAULT_SHM),
        })
    }

    /// Opens the store at `root` for commands that only read or change what is
    /// there: a missing or empty directory is `NoStore` (naming it), never a new
    /// empty store, so a mistyped `--store` is said as such.
    pub fn open_existing(root: &Path) -> std::result::Result<Store, StoreError> {
        if layout::is_missing_or_empty(root)? {
            return Err(StoreError::NoStore {
                path: root.to_path_buf(),
            });
        }
        Store::open(root)
    }

    /// `$STASIS_STORE`, or `/var/lib/stasis`.
    pub fn default_root() -> PathBuf {
        match std::env::var_os("STASIS_STORE") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from("/var/lib/stasis"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.paths.root
    }

    /// How long to wait for a lock held by another process before failing.
    pub fn set_lock_timeout(&mut self, timeout: Duration) {
        self.locks.timeout = timeout;
    }

    /// Keeps every snapshot (and blob) in the store until the guard is dropped:
    /// holds the shared store lock, so `remove`, `gc` and `prune` (exclusive)
    /// wait, while reads and ingests go on. Operations of this process under a
    /// pin do not deadlock on it: each takes its own shared lock, which a held
    /// shared lock never blocks.
    pub fn pin(&self) -> std::result::Result<Pin, StoreError> {
        Ok(Pin {
            _lock: self.locks.shared()?,
        })
    }

    /// Hashes, deduplicates, compresses and publishes a CRIU image directory.
    /// Publishing order: packs, page tables, files blob, config, manifest, and
    /// index.json last, so a crash leaves at most unreferenced blobs.
    pub fn ingest(
        &self,
        input: SnapshotInput,
        opts: &IngestOptions,
    ) -> std::result::Result<IngestReport, StoreError> {
        let _lock = self.locks.shared()?;
        ingest::ingest(self, input, opts)
    }

    /// A tag (`NAME` = `NAME:latest`, `NAME:VER`) or an id (full, or a unique
    /// prefix of at least 4 hex characters). Tags win over id prefixes.
    pub fn resolve(&self, name_or_id: &str) -> std::result::Result<SnapshotId, StoreError> {
        catalog::resolve(&self.read_index()?, name_or_id).map_err(|e| e.in_store(self.root()))
    }

    /// Every snapshot, oldest first, from index.json alone.
    pub fn list(&self) -> std::result::Result<Vec<SnapshotSummary>, StoreError> {
        Ok(catalog::entries(&self.read_index()?)
            .into_iter()
            .map(|e| SnapshotSummary {
                id: e.id,
                tags: e.tags,
                created: e.created,
                container: e.container,
                image_bytes: e.image_bytes,
                added_bytes: e.added_bytes,
                origin: e.origin,
            })
            .collect())
    }

    /// Where the snapshot came from, as this store recorded it (never as an
    /// archive claims).
    pub fn origin(&self, id: &SnapshotId) -> std::result::Result<Origin, StoreError> {
        Ok(self.entry(id)?.origin)
    }

    /// The snapshot's config blob (files, config.json, metadata, sizes), verified.
    pub fn config(&self, id: &SnapshotId) -> std::result::Result<serde_json::Value, StoreError> {
        let _lock = self.locks.shared()?;
        let (_, bytes) = self.config_bytes(id)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
            op: "parse config of",
            path: self.paths.root.clone(),
            source,
        })
    }

    /// The files of a snapshot (every file of its image directory), from its
    /// verified config blob.
    pub fn files(&self, id: &SnapshotId) -> std::result::Result<Vec<SnapshotFile>, StoreError> {
        let _lock = self.locks.shared()?;
        let (cfg, _) = self.snapshot_config(id)?;
        Ok(cfg
            .files
            .into_iter()
            .map(|f| SnapshotFile {
                page_stored: f.kind == config::KIND_PAGES,
                name: f.name,
                size: f.size,
            })
            .collect())
    }

    /// The container's config.json bytes exactly as ingested, checked against their
    /// recorded sha256.
    pub fn config_json(&self, id: &SnapshotId) -> std::result::Result<Vec<u8>, StoreError> {
        let _lock = self.locks.shared()?;
        let (cfg, _) = self.snapshot_config(id)?;
        cfg.config_json
            .bytes()
            .map_err(|reason| StoreError::Corrupt {
                snapshot: id.to_string(),
                file: "config.json".into(),
                offset: 0,
                blob: "config".into(),
                what: reason,
            })
    }

    /// Writes the snapshot's exact CRIU image files into `dest` (missing or empty).
    /// Every page and every file is checked against its digest before the file
    /// appears under its name; on any error everything written is removed.
    pub fn materialize(
        &self,
        id: &SnapshotId,
        dest: &Path,
        progress: bool,
    ) -> std::result::Result<(), StoreError> {
        let _lock = self.locks.shared()?;
        materialize::materialize(self, id, dest, progress)
    }

    /// The bytes of one small file of a snapshot (one kept in the files blob, e.g.
    /// `fs-manifest.json`), checked against its sha256; reads no pack.
    pub fn read_file(
        &self,
        id: &SnapshotId,
        name: &str,
    ) -> std::result::Result<Vec<u8>, StoreError> {
        let _lock = self.locks.shared()?;
        materialize::read_small_file(self, id, name)
    }

    /// Writes one file of a snapshot (a pages file too) as `dest/name`, verified
    /// page by page and whole like `materialize`; `dest` is created if missing.
    pub fn materialize_file(
        &self,
        id: &SnapshotId,
        name: &str,
        dest: &Path,
    ) -> std::result::Result<PathBuf, StoreError> {
        let _lock = self.locks.shared()?;
        materialize::materialize_one(self, id, name, dest)
    }

    /// Pages of file `name` of snapshot `id` and how many of them appear in no
    /// page table of the snapshots created before it (what it added, uncompressed).
    pub fn new_pages(
        &self,
        id: &SnapshotId,
        name: &str,
    ) -> std::result::Result<(u64, u64), StoreError> {
        let _lock = self.locks.shared()?;
        diff::new_pages(self, id, name)
    }

    /// Points `new_tag` at a snapshot (moving it if it exists elsewhere).
    pub fn tag(&self, name_or_id: &str, new_tag: &str) -> std::result::Result<(), StoreError> {
        let tag = catalog::normalize_tag(new_tag)?;
        let _lock = self.locks.shared()?;
        let root = self.root().to_path_buf();
        self.update_index(|index| {
            let id = catalog::resolve(index, name_or_id).map_err(|e| e.in_store(&root))?;
            let entry = catalog::entries(index)
                .into_iter()
                .find(|e| e.id == id)
                .ok_or_else(|| StoreError::Invalid(format!("snapshot {id} vanished")))?;
            catalog::set_tag(index, &entry.descriptor, &tag);
            Ok(())
        })
    }

    /// Removes a tag; if it was the snapshot's last reference the snapshot goes too.
    /// Given an id, removes the snapshot with all its tags. Returns the removed tags,
    /// followed by the short id of each snapshot that no longer has any root. Blobs
    /// are freed only by `gc`.
    pub fn remove(&self, tag_or_id: &str) -> std::result::Result<Vec<String>, StoreError> {
        let _lock = self.locks.exclusive()?;
        let root = self.root().to_path_buf();
        self.update_index(|index| {
            if !tag_or_id.starts_with("sha256:") {
                if let Ok(tag) = catalog::normalize_tag(tag_or_id) {
                    if let Some((id, left)) = catalog::drop_tag(index, &tag) {
                        let mut out = vec![tag];
                        if !left {
                            out.push(id.to_string());
                        }
                        return Ok(out);
                    }
                }
            }
            let id = catalog::resolve(index, tag_or_id).map_err(|e| e.in_store(&root))?;
            let mut out = catalog::drop_snapshot(index, &id);
            out.push(id.to_string());
            Ok(out)
        })
    }

    /// Checks the whole store and returns every problem found (empty = healthy).
    /// With `read_data`, also reads every pack, decompresses every frame and checks
    /// every page and every file digest.
    pub fn verify(&self, read_data: bool) -> std::result::Result<Vec<Finding>, StoreError> {
        let _lock = self.locks.shared()?;
        let mut findings = verify::verify_store(self, read_data)?;
        // Caches are checked against the snapshots in index.json: with index.json
        // lost or unparseable (reported above) there is nothing to check them by.
        if self.read_index().is_ok() {
            findings.extend(cache::verify_caches(self, read_data)?);
        }
        Ok(findings)
    }

    /// Puts good copies back in place of the damaged or missing blobs of the
    /// snapshots in index.json: from `archive` (an export holding them) and, for
    /// packs, rebuilt from their intact frames plus the same pages in other packs.
    /// Reports what was repaired and what was not (and why).
    pub fn repair(&self, archive: Option<&Path>) -> std::result::Result<RepairReport, StoreError> {
        let _lock = self.locks.shared()?;
        repair::repair(self, archive)
    }

    /// Rebuilds a missing or unparseable index.json from the snapshot manifests
    /// in blobs/ (tags as recorded at ingest; the damaged file is kept as
    /// `index.json.damaged`). Refuses when index.json reads fine.
    pub fn rebuild_index(&self) -> std::result::Result<RebuildReport, StoreError> {
        let _lock = self.locks.exclusive()?;
        rebuild::rebuild_index(self)
    }

    /// Removes blobs not reachable from index.json, everything in tmp/ but
    /// staging kept for the user, and staging directories whose owner died.
    pub fn gc(&self, dry_run: bool) -> std::result::Result<GcReport, StoreError> {
        let _lock = self.locks.exclusive()?;
        let (dirs, bytes) = self.remove_dead_staging(dry_run);
        let mut r = gc::gc_locked(self, dry_run)?;
        r.tmp_removed += dirs;
        r.bytes_freed += bytes;
        Ok(r)
    }

    /// Retention per series (`gc::series_of`: the repository name of each tag, or
    /// the container id of an untagged snapshot): keeps the newest `keep_last`
    /// of each series and those created within `keep_within`; a snapshot kept by
    /// any of its series, or tagged `NAME:latest`, stays. Removes the rest (with
    /// their tags) from index.json and runs gc. Returns the removed (or, with `dry_run`,
    /// removable) snapshots.
    pub fn prune(
        &self,
        keep_last: Option<usize>,
        keep_within: Option<Duration>,
        dry_run: bool,
    ) -> std::result::Result<Vec<SnapshotId>, StoreError> {
        let _lock = self.locks.exclusive()?;
        gc::prune_locked(self, keep_last, keep_within, dry_run)
    }

    /// Per file: added, removed or changed, with page-level counts for pages files.
    pub fn diff(
        &self,
        a: &SnapshotId,
        b: &SnapshotId,
    ) -> std::result::Result<DiffReport, StoreError> {
        let _lock = self.locks.shared()?;
        diff::diff(self, a, b)
    }

    /// Writes an OCI layout tar holding just this snapshot (its blobs and an
    /// index.json with the given tag, or an untagged root when given an id).
    pub fn export(&self, name_or_id: &str, out: &Path) -> std::result::Result<(), StoreError> {
        let _lock = self.locks.shared()?;
        transfer::export(self, name_or_id, out)
    }

    /// `export` streamed to `w` (stdout, a pipe); `label` names `w` in errors.
    pub fn export_to(
        &self,
        name_or_id: &str,
        w: &mut dyn std::io::Write,
        label: &Path,
    ) -> std::result::Result<(), StoreError> {
        let _lock = self.locks.shared()?;
        transfer::export_to(self, name_or_id, w, label)
    }

    /// `import` of an archive read once, in order, from `r` (stdin, a pipe);
    /// `label` names it in errors.
    pub fn import_from(
        &self,
        r: &mut dyn std::io::Read,
        label: &Path,
    ) -> std::result::Result<Vec<SnapshotId>, StoreError> {
        let _lock = self.locks.shared()?;
        transfer::import_from(self, r, label)
    }

    /// Imports an OCI layout tar written by `export`. Everything is checked before
    /// anything is published; a rejected file leaves the store unchanged.
    pub fn import(&self, file: &Path) -> std::result::Result<Vec<SnapshotId>, StoreError> {
        let _lock = self.locks.shared()?;
        transfer::import(self, file)
    }

    // ---- internal helpers shared by the submodules ----

    pub(crate) fn blobs(&self) -> BlobDir {
        BlobDir::new(self.paths.blobs())
    }

    pub(crate) fn read_index(&self) -> Result<Index> {
        layout::read_index(&self.paths)
    }

    /// Read-modify-write of index.json under the short index lock.
    pub(crate) fn update_index<T>(&self, f: impl FnOnce(&mut Index) -> Result<T>) -> Result<T> {
        let _lock: Flock = self.locks.index()?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        layout::write_index(&self.paths, &index)?;
        Ok(out)
    }

    pub(crate) fn entry(&self, id: &SnapshotId) -> Result<catalog::Entry> {
        catalog::entries(&self.read_index()?)
            .into_iter()
            .find(|e| e.id == *id)
            .ok_or_else(|| StoreError::UnknownSnapshot {
                name: id.full(),
                hint: String::new(),
                store: Some(self.root().to_path_buf()),
            })
    }

    /// The verified manifest of a snapshot.
    pub(crate) fn manifest(&self, id: &SnapshotId) -> Result<layout::Manifest> {
        let e = self.entry(id)?;
        let bytes = self
            .blobs()
            .read_verified(&e.manifest, Some(e.descriptor.size), "manifest")?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Json {
            op: "parse manifest",
            path: self.blobs().path(&e.manifest),
            source,
        })
    }

    fn config_bytes(&self, id: &SnapshotId) -> Result<(layout::Manifest, Vec<u8>)> {
        let m = self.manifest(id)?;
        let d = m.config.blob().ok_or_else(|| StoreError::Format {
            what: "manifest",
            path: self.paths.root.clone(),
            reason: format!("snapshot {id} has a malformed config digest"),
        })?;
        let bytes = self
            .blobs()
            .read_verified(&d, Some(m.config.size), "config")?;
        Ok((m, bytes))
    }

    /// The parsed, verified config blob and the manifest.
    pub(crate) fn snapshot_config(
        &self,
        id: &SnapshotId,
    ) -> Result<(config::SnapshotConfig, layout::Manifest)> {
        let (m, bytes) = self.config_bytes(id)?;
        let cfg = config::SnapshotConfig::parse(&bytes).map_err(|reason| StoreError::Format {
            what: "config",
            path: self.paths.root.clone(),
            reason: format!("snapshot {id}: {reason}"),
        })?;
        Ok((cfg, m))
    }
}
