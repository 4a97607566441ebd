//! The store's `cache/`: data derived from snapshots, always safe to rebuild.
//! Owns its directories and their lifecycle:
//!
//! - `cache/img/<full id>/image`: a snapshot's verified CRIU image, and
//!   `cache/fs/<full id>/rootfs`: the read-only base of its root filesystem. Each
//!   is built into `.tmp-<name>-<pid>` under an exclusive flock on the entry's
//!   `.lock`, renamed into place, and then marked complete by `.complete-<name>`
//!   (written last, atomically), which records every file's size and ctime. An
//!   entry whose marker is missing, or whose files no longer match it, is rebuilt
//!   by the next lookup; verify and gc remove temp entries whose builder died
//!   (nobody holds `.lock`).
//! - `cache/fscache/<container>.json`: stat caches (their content is the
//!   caller's); `cache/copies/<id>/`: private directories of `--copy-rootfs` copies.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{io_err, Result, StoreError};
use super::ids::SnapshotId;
use super::verify::{Finding, Level};
use super::Store;

/// A kind of materialised snapshot kept in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKind {
    /// The verified CRIU image (`cache/img/<id>/image`).
    Image,
    /// The read-only base of the root filesystem (`cache/fs/<id>/rootfs`).
    Rootfs,
}

impl CacheKind {
    const ALL: [CacheKind; 2] = [CacheKind::Image, CacheKind::Rootfs];

    fn dir(self) -> &'static str {
        match self {
            CacheKind::Image => "img",
            CacheKind::Rootfs => "fs",
        }
    }

    fn entry(self) -> &'static str {
        match self {
            CacheKind::Image => "image",
            CacheKind::Rootfs => "rootfs",
        }
    }
}

const MARKER_VERSION: u32 = 1;
const LOCK: &str = ".lock";
const TEMP_PREFIXES: [&str; 2] = [".tmp-", ".old-"];

/// `.complete-<name>`: a finished entry, and the files a lookup checks (an
/// image: all; a rootfs: its top level, so a restore does not read a listing of
/// thousands of files). `.files-<name>` lists every file, for verify.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    version: u32,
    snapshot: String,
    files: Vec<MarkedFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MarkedFile {
    /// Relative to the entry (`image/`, `rootfs/`).
    path: String,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl MarkedFile {
    fn of(path: String, md: &fs::Metadata) -> MarkedFile {
        MarkedFile {
            path,
            size: if md.is_dir() { 0 } else { md.len() },
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

/// The result of `Store::cache_lookup`.
#[derive(Debug)]
pub enum CacheLookup {
    /// A complete entry: its path.
    Ready(PathBuf),
    /// Missing or damaged: build it into `path()`, then `commit`.
    Build(CacheBuild),
}

/// An entry being built; holds the entry's lock. Dropped without `commit`, it
/// removes what was built.
#[derive(Debug)]
pub struct CacheBuild {
    kind: CacheKind,
    sid: SnapshotId,
    dir: PathBuf,
    tmp: PathBuf,
    done: bool,
    _lock: Flock<File>,
}

impl CacheBuild {
    /// Where to build (a directory that does not exist yet).
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The entry's final path (for messages).
    pub fn target(&self) -> PathBuf {
        self.dir.join(self.kind.entry())
    }

    /// Renames the built tree into place and writes the complete marker last.
    pub fn commit(mut self) -> std::result::Result<PathBuf, StoreError> {
        let target = self.target();
        super::fault_point("cache.before-commit");
        fs::rename(&self.tmp, &target).map_err(io_err("publish cached", &target))?;
        self.done = true;
        let all = list_tree(&target)?;
        let quick: Vec<MarkedFile> = match self.kind {
            CacheKind::Image => all.clone(),
            CacheKind::Rootfs => all
                .iter()
                .filter(|f| !f.path.contains('/'))
                .cloned()
                .collect(),
        };
        // The listing first, the marker last: a marker always has its listing.
        write_json(&self.dir, &listing_path(&self.dir, self.kind), &all)?;
        let marker = Marker {
            version: MARKER_VERSION,
            snapshot: self.sid.full(),
            files: quick,
        };
        write_json(&self.dir, &marker_path(&self.dir, self.kind), &marker)?;
        Ok(target)
    }
}

impl Drop for CacheBuild {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn marker_path(dir: &Path, kind: CacheKind) -> PathBuf {
    dir.join(format!(".complete-{}", kind.entry()))
}

fn listing_path(dir: &Path, kind: CacheKind) -> PathBuf {
    dir.join(format!(".files-{}", kind.entry()))
}

/// Writes `value` as JSON to `path` atomically (a `.tmp-` file in `dir`, which
/// gc and verify remove if we die, then rename).
fn write_json<T: Serialize>(dir: &Path, path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Json {
        op: "serialize",
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let part = dir.join(format!(".tmp{name}-{}", std::process::id()));
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(super::util::PRIVATE_FILE)
        .open(&part)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(io_err("write", &part))?;
    fs::rename(&part, path).map_err(io_err("mark complete", path))
}

/// Whether every file in `files` still has its recorded size and ctime.
fn check_files(target: &Path, files: &[MarkedFile]) -> Option<String> {
    for f in files {
        let p = target.join(&f.path);
        match fs::symlink_metadata(&p) {
            Ok(md) if MarkedFile::of(f.path.clone(), &md) == *f => {}
            Ok(_) => return Some(format!("{} was changed after it was built", p.display())),
            Err(_) => return Some(format!("{} is missing", p.display())),
        }
    }
    None
}

/// Every entry under `root` (sorted, depth first), with size and ctime.
fn list_tree(root: &Path) -> Result<Vec<MarkedFile>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let rd = fs::read_dir(&dir).map_err(io_err("read directory", &dir))?;
        for e in rd {
            let e = e.map_err(io_err("read directory", &dir))?;
            let r = rel.join(e.file_name());
            let md = fs::symlink_metadata(e.path()).map_err(io_err("stat", &e.path()))?;
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push(MarkedFile::of(r.to_string_lossy().into_owned(), &md));
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Why an entry is not usable as it is, or None when its marker and files agree.
/// `deep`: every file is checked (else, for a rootfs, only its top level).
fn check_entry(dir: &Path, kind: CacheKind, sid: &SnapshotId, deep: bool) -> Option<String> {
    let target = dir.join(kind.entry());
    let marker = match fs::read(marker_path(dir, kind)) {
        Ok(b) => b,
        Err(_) if !target.exists() => return Some("not built".into()),
        Err(_) => return Some("incomplete (no complete marker)".into()),
    };
    let Ok(m) = serde_json::from_slice::<Marker>(&marker) else {
        return Some("its complete marker is unreadable".into());
    };
    if m.version != MARKER_VERSION || m.snapshot != sid.full() {
        return Some("its complete marker belongs to another snapshot or version".into());
    }
    if !target.is_dir() {
        return Some(format!("{} is missing", kind.entry()));
    }
    if let Some(p) = check_files(&target, &m.files) {
        return Some(p);
    }
    if !deep {
        return None;
    }
    let all: Vec<MarkedFile> = match fs::read(listing_path(dir, kind))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(all) => all,
        None => return Some("its file listing is missing or unreadable".into()),
    };
    check_files(&target, &all)
}

fn open_lock(dir: &Path) -> Result<(File, PathBuf)> {
    let path = dir.join(LOCK);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(super::util::PRIVATE_FILE)
        .open(&path)
        .map_err(io_err("open lock", &path))?;
    Ok((f, path))
}

/// The entry's lock, waiting while another process builds the entry.
fn lock_entry(dir: &Path) -> Result<Flock<File>> {
    let (f, path) = open_lock(dir)?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| io_err("flock", &path)(e.into()))
}

/// The entry's lock if nobody holds it (None: being built right now).
fn try_lock_entry(dir: &Path) -> Option<Flock<File>> {
    let (f, _) = open_lock(dir).ok()?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

/// Removes the temp entries of dead builders; the caller holds the entry lock.
/// Returns the paths removed.
fn remove_temps(dir: &Path, dry_run: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if TEMP_PREFIXES.iter().any(|p| name.starts_with(p)) {
            let p = e.path();
            if dry_run || remove_any(&p).is_ok() {
                out.push(p);
            }
        }
    }
    out
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(p)?.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

/// Removes an entry's tree and marker (not the directory and its lock).
fn clear_entry(dir: &Path, kind: CacheKind) -> Result<()> {
    let _ = fs::remove_file(marker_path(dir, kind));
    let _ = fs::remove_file(listing_path(dir, kind));
    let target = dir.join(kind.entry());
    if target.exists() {
        let old = dir.join(format!(".old-{}-{}", kind.entry(), std::process::id()));
        fs::rename(&target, &old).map_err(io_err("move aside damaged cache", &target))?;
        fs::remove_dir_all(&old).map_err(io_err("remove damaged cache", &old))?;
    }
    Ok(())
}

/// Whether a mounted overlay uses something under `dir` as its lower layer.
fn in_use(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.contains(&format!("lowerdir={}/", dir.display()))
}

/// Bytes of the files under `p`.
pub(crate) fn tree_size(p: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// What `Store::gc_caches` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheGcReport {
    /// Whole entries of snapshots no longer in the store.
    pub entries_removed: u64,
    /// Temp entries of dead builders and incomplete entries.
    pub partial_removed: u64,
    pub bytes_freed: u64,
}

impl Store {
    /// `cache/<kind>/<full id>`: the directory of a snapshot's cache entry.
    pub fn cache_dir(&self, kind: CacheKind, sid: &SnapshotId) -> PathBuf {
        self.paths.cache().join(kind.dir()).join(sid.full())
    }

    /// The complete cache entry of `kind` for snapshot `sid`, if there is one.
    pub fn cache_ready(&self, kind: CacheKind, sid: &SnapshotId) -> Option<PathBuf> {
        let dir = self.cache_dir(kind, sid);
        check_entry(&dir, kind, sid, false)
            .is_none()
            .then(|| dir.join(kind.entry()))
    }

    /// The complete cache entry of `kind` for snapshot `sid`, or a builder for it
    /// (waiting while another process builds it). An entry that is incomplete or
    /// whose files changed since it was built is removed and built again.
    pub fn cache_lookup(
        &self,
        kind: CacheKind,
        sid: &SnapshotId,
    ) -> std::result::Result<CacheLookup, StoreError> {
        let dir = self.cache_dir(kind, sid);
        if check_entry(&dir, kind, sid, false).is_none() {
            return Ok(CacheLookup::Ready(dir.join(kind.entry())));
        }
        super::util::create_private_dir_all(&dir)
            .map_err(io_err("create cache directory", &dir))?;
        let lock = lock_entry(&dir)?;
        if check_entry(&dir, kind, sid, false).is_none() {
            return Ok(CacheLookup::Ready(dir.join(kind.entry())));
        }
        // Under the lock no other builder lives: whatever is partial is dead.
        remove_temps(&dir, false);
        if kind == CacheKind::Rootfs && dir.join(kind.entry()).exists() && in_use(&dir) {
            return Err(StoreError::CacheInUse {
                path: dir.join(kind.entry()),
                reason: check_entry(&dir, kind, sid, false).unwrap_or_default(),
            });
        }
        clear_entry(&dir, kind)?;
        Ok(CacheLookup::Build(CacheBuild {
            kind,
            sid: *sid,
            tmp: dir.join(format!(".tmp-{}-{}", kind.entry(), std::process::id())),
            dir,
            done: false,
            _lock: lock,
        }))
    }

    /// `cache/fscache/<container>.json`: where the stat cache of a container id
    /// lives (ids that are not plain names are hashed).
    pub fn stat_cache_path(&self, container: &str) -> PathBuf {
        let safe = !container.is_empty()
            && !container.starts_with('.')
            && container
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        let name = if safe {
            container.to_string()
        } else {
            hex::encode(Sha256::digest(container.as_bytes()))
        };
        self.paths
            .cache()
            .join("fscache")
            .join(format!("{name}.json"))
    }

    /// Every finished stat cache file (`cache/fscache/*.json`).
    pub fn stat_cache_files(&self) -> Vec<PathBuf> {
        let dir = self.paths.cache().join("fscache");
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect()
    }

    /// `cache/copies`: where `--copy-rootfs` copies keep their private directory.
    pub fn copies_dir(&self) -> PathBuf {
        self.paths.cache().join("copies")
    }

    /// Removes the cache entries of snapshots no longer in the store (unless an
    /// overlay still uses them as its lower layer), the temp entries of dead
    /// builders and incomplete entries. Entries being built are left alone.
    pub fn gc_caches(&self, dry_run: bool) -> std::result::Result<CacheGcReport, StoreError> {
        let live: Vec<String> = self.list()?.iter().map(|s| s.id.full()).collect();
        let mut r = CacheGcReport::default();
        for kind in CacheKind::ALL {
            let base = self.paths.cache().join(kind.dir());
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                let dir = e.path();
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(_lock) = try_lock_entry(&dir) else {
                    continue; // being built right now
                };
                let name = e.file_name().to_string_lossy().into_owned();
                let sid = SnapshotId::parse(&name).filter(|s| s.full() == name);
                // A snapshot ingested after the listing is looked up again.
                let alive = sid.is_some_and(|s| {
                    live.contains(&name) || self.resolve(&s.full()).is_ok_and(|r| r == s)
                });
                if !alive {
                    if in_use(&dir) {
                        continue;
                    }
                    r.bytes_freed += tree_size(&dir);
                    if !dry_run {
                        fs::remove_dir_all(&dir).map_err(io_err("remove cache entry", &dir))?;
                    }
                    r.entries_removed += 1;
                    continue;
                }
                for p in remove_temps(&dir, dry_run) {
                    r.partial_removed += 1;
                    r.bytes_freed += tree_size(&p);
                }
                let incomplete =
                    !marker_path(&dir, kind).exists() && dir.join(kind.entry()).exists();
                if incomplete && !in_use(&dir) {
                    r.partial_removed += 1;
                    r.bytes_freed += tree_size(&dir.join(kind.entry()));
                    if !dry_run {
                        clear_entry(&dir, kind)?;
                    }
                }
            }
        }
        Ok(r)
    }
}

/// verify's part for the cache: every entry of a snapshot in the store is
/// complete and unchanged (with `read_data`, the image files' sha256 match the
/// snapshot's). Temp entries of dead builders, incomplete and damaged entries are
/// removed (the next restore rebuilds them) and reported as warnings.
pub(crate) fn verify_caches(store: &Store, read_data: bool) -> Result<Vec<Finding>> {
    let mut out = staging_findings(store);
    let live: Vec<String> = store.list()?.iter().map(|s| s.id.full()).collect();
    for kind in CacheKind::ALL {
        let base = store.paths.cache().join(kind.dir());
        for e in fs::read_dir(&base).into_iter().flatten().flatten() {
            let dir = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(_lock) = try_lock_entry(&dir) else {
                continue; // being built right now
            };
            for p in remove_temps(&dir, false) {
                out.push(warning(
                    format!(
                        "removed {}, left by a stasis killed while building it",
                        p.display()
                    ),
                    "nothing to do",
                ));
            }
            let Some(sid) = SnapshotId::parse(&name).filter(|_| live.contains(&name)) else {
                out.push(warning(
                    format!(
                        "cache/{}/{name} belongs to no snapshot in the store",
                        kind.dir()
                    ),
                    "`stasis snapshot gc` removes it",
                ));
                continue;
            };
            let mut problem = check_entry(&dir, kind, &sid, true);
            if problem.is_none() && read_data && kind == CacheKind::Image {
                // A snapshot whose config cannot be read is reported by the
                // store's own checks; its cache is left as it is.
                problem = check_image_data(store, &sid, &dir.join(kind.entry()))
                    .ok()
                    .flatten();
            }
            let Some(problem) = problem else { continue };
            if problem == "not built" {
                continue;
            }
            if kind == CacheKind::Rootfs && in_use(&dir) {
                out.push(Finding {
                    level: Level::Error,
                    what: format!("cached {} of snapshot {} is damaged: {problem}; running copies use it", kind.entry(), sid.short()),
                    hint: "delete the copies restored from this snapshot, then run `stasis snapshot verify` again (it removes the entry and the next restore rebuilds it)".into(),
                });
                continue;
            }
            if let Err(e) = clear_entry(&dir, kind) {
                out.push(Finding {
                    level: Level::Error,
                    what: format!(
                        "cached {} of snapshot {} is damaged ({problem}) and could not be removed: {e}",
                        kind.entry(),
                        sid.short()
                    ),
                    hint: format!("remove {} by hand", dir.display()),
                });
                continue;
            }
            out.push(Finding {
                level: Level::Warning,
                what: format!(
                    "cached {} of snapshot {} was damaged ({problem}): removed",
                    kind.entry(),
                    sid.short()
                ),
                hint: "nothing to do: the next restore rebuilds it from the store".into(),
            });
        }
    }
    Ok(out)
}

/// Kept staging directories: the images of stopped containers whose ingest
/// failed, which nothing removes automatically.
fn staging_findings(store: &Store) -> Vec<Finding> {
    store
        .kept_staging()
        .into_iter()
        .map(|d| {
            warning(
                format!("the CRIU image of a stopped container whose checkpoint could not be stored is kept at {}", d.join("image").display()),
                &format!("restore it with `stasis restore --image-path {} --bundle BUNDLE ID` (the failed checkpoint's error names both), then remove {}", d.join("image").display(), d.display()),
            )
        })
        .collect()
}

fn warning(what: String, hint: &str) -> Finding {
    Finding {
        level: Level::Warning,
        what,
        hint: hint.into(),
    }
}

/// The cached image's files against the snapshot's list: same names, sizes and
/// sha256. Returns what differs first.
fn check_image_data(store: &Store, sid: &SnapshotId, image: &Path) -> Result<Option<String>> {
    let (cfg, _) = store.snapshot_config(sid)?;
    let want: BTreeMap<&str, (&str, u64)> = cfg
        .files
        .iter()
        .map(|f| (f.name.as_str(), (f.sha256.as_str(), f.size)))
        .collect();
    let mut seen = 0;
    for e in fs::read_dir(image)
        .map_err(io_err("read directory", image))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((sha, size)) = want.get(name.as_str()) else {
            return Ok(Some(format!("{name} is not a file of the snapshot")));
        };
        seen += 1;
        let p = e.path();
        let mut f = File::open(&p).map_err(io_err("open", &p))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let k = f.read(&mut buf).map_err(io_err("read", &p))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            h.update(&buf[..k]);
        }
        if n != *size || hex::encode(h.finalize()) != *sha {
            return Ok(Some(format!(
                "{} does not match the snapshot's sha256",
                p.display()
            )));
        }
    }
    if seen != want.len() {
        return Ok(Some(format!(
            "{} of the snapshot's {} files are missing",
            want.len() - seen,
            want.len()
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
