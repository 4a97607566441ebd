//! Staging directories: where a checkpoint's CRIU image is written before the
//! store ingests it. Owns the `stasis-staging-*` directories on the shared-memory
//! tmpfs (`/dev/shm`) and under the store's `tmp/`, choosing between them by free
//! space, and finding and removing those whose owner died.
//!
//! A live staging directory holds two things for its whole life: the store pin
//! (the shared store lock, so gc, which removes what is in `tmp/` under the
//! exclusive lock, waits for it) and an exclusive flock on its `.owner` file (so
//! any stasis can tell a live directory from one left by a killed process: the
//! kernel drops the flock when its holder dies). A directory is created under a
//! hidden name, locked, and only then renamed to `stasis-staging-*`, so no scan
//! ever sees one of ours unlocked while it lives. A directory kept for the user
//! (`keep_image`: the image of a stopped container whose ingest failed) carries a
//! `kept` file and is never removed automatically.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::error::{io_err, Result};
use super::{Pin, Store};

/// Name prefix of every staging directory.
pub(crate) const PREFIX: &str = "stasis-staging-";
/// Hidden prefix while a staging directory is being set up.
const NEW_PREFIX: &str = ".stasis-staging-new-";
/// The file whose flock marks the directory as live.
const OWNER: &str = ".owner";
/// Marks a directory kept for the user.
const KEPT: &str = "kept";
/// The default shared-memory tmpfs.
pub const DEFAULT_SHM: &str = "/dev/shm";

/// Head room left free on the tmpfs besides the image itself.
const SHM_MARGIN: u64 = 32 << 20;
/// Memory that must stay available besides twice the image (the image in RAM
/// and the page cache of the ingest).
const MEM_MARGIN: u64 = 256 << 20;

/// A private (0700) staging directory, removed on drop unless kept. Holds the
/// store pin and its owner flock until dropped.
#[derive(Debug)]
pub struct Staging {
    path: PathBuf,
    keep: bool,
    _owner: Flock<File>,
    _pin: Pin,
}

/// Where a staging directory goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Shm,
    StoreTmp,
}

/// /dev/shm when its filesystem has room for `need` bytes plus a margin and the
/// host has memory for it, else the store's `tmp/` (on disk).
pub(crate) fn choose(shm_free: Option<u64>, mem_available: u64, need: u64) -> Place {
    match shm_free {
        Some(free)
            if free >= need.saturating_add(need / 8).saturating_add(SHM_MARGIN)
                && mem_available >= need.saturating_mul(2).saturating_add(MEM_MARGIN) =>
        {
            Place::Shm
        }
        _ => Place::StoreTmp,
    }
}

/// Bytes available on the filesystem holding `dir`; None when it is not a
/// directory we can stat.
pub(crate) fn free_bytes(dir: &Path) -> Option<u64> {
    if !dir.is_dir() {
        return None;
    }
    nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
}

fn mem_available() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb.saturating_mul(1024))
        .unwrap_or(0)
}

impl Store {
    /// A staging directory for a CRIU image of about `need` bytes: on the
    /// shared-memory tmpfs when it has room (statvfs) and memory allows, else
    /// under the store's `tmp/`. Removes staging left by dead stasis processes
    /// first. The guard pins the store until dropped.
    pub fn staging(&self, need: u64) -> std::result::Result<Staging, super::StoreError> {
        let pin = self.pin()?;
        self.remove_dead_staging(false);
        let base = match choose(free_bytes(&self.shm), mem_available(), need) {
            Place::Shm => self.shm.clone(),
            Place::StoreTmp => self.paths.tmp(),
        };
        // 0700 at mkdir(2) (tempfile's default is 0777 & ~umask): the dump in it
        // is the process's memory.
        let fresh = tempfile::Builder::new()
            .prefix(NEW_PREFIX)
            .permissions(fs::Permissions::from_mode(super::util::PRIVATE_DIR))
            .tempdir_in(&base)
            .map_err(io_err("create staging directory in", &base))?
            .keep();
        match lock_and_publish(&fresh) {
            Ok((path, owner)) => {
                super::fault_point("staging.created");
                Ok(Staging {
                    path,
                    keep: false,
                    _owner: owner,
                    _pin: pin,
                })
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&fresh);
                Err(e)
            }
        }
    }

    /// Where `staging` puts a directory when the tmpfs has room (`/dev/shm` unless
    /// set otherwise).
    pub fn set_shm_dir(&mut self, dir: &Path) {
        self.shm = dir.to_path_buf();
    }

    /// Staging directories kept for the user, on the tmpfs and in `tmp/`.
    pub fn kept_staging(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for base in [self.shm.clone(), self.paths.tmp()] {
            for e in fs::read_dir(&base).into_iter().flatten().flatten() {
                if is_kept(&e.path()) {
                    out.push(e.path());
                }
            }
        }
        out.sort();
        out
    }

    /// Removes every staging directory (on the tmpfs and in `tmp/`) whose owner
    /// is dead and that was not kept for the user. Returns (directories, bytes).
    pub fn remove_dead_staging(&self, dry_run: bool) -> (u64, u64) {
        let (mut n, mut bytes) = (0, 0);
        for base in [self.shm.clone(), self.paths.tmp()] {
            let Ok(rd) = fs::read_dir(&base) else {
                continue;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !(name.starts_with(PREFIX) || name.starts_with(NEW_PREFIX)) {
                    continue;
                }
                let path = e.path();
                if !e.file_type().is_ok_and(|t| t.is_dir()) || !is_dead(&path) {
                    continue;
                }
                let size = super::cache::tree_size(&path);
                if dry_run || fs::remove_dir_all(&path).is_ok() {
                    n += 1;
                    bytes += size;
                }
            }
        }
        (n, bytes)
    }
}

/// Mode 0700, `.owner` created and flocked, then renamed to its public name.
fn lock_and_publish(fresh: &Path) -> Result<(PathBuf, Flock<File>)> {
    fs::set_permissions(fresh, fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", fresh))?;
    let owner_path = fresh.join(OWNER);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&owner_path)
        .map_err(io_err("create", &owner_path))?;
    let owner = Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| io_err("flock", &owner_path)(e.into()))?;
    let name = fresh
        .file_name()
        .map(|n| n.to_string_lossy().replacen(NEW_PREFIX, PREFIX, 1))
        .unwrap_or_else(|| format!("{PREFIX}{}", std::process::id()));
    let path = fresh.with_file_name(name);
    fs::rename(fresh, &path).map_err(io_err("rename staging directory to", &path))?;
    Ok((path, owner))
}

/// A staging directory is dead when it was not kept and nobody holds the flock
/// on its `.owner` (or it has none: left by a stasis killed while creating it,
/// or by a version without owner files).
fn is_dead(dir: &Path) -> bool {
    if dir.join(KEPT).exists() {
        return false;
    }
    // A hidden directory is locked within microseconds of its creation: one
    // seen unlocked is dead only once it is clearly older than that.
    let hidden = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(NEW_PREFIX));
    if hidden && !older_than(dir, NEW_GRACE) {
        return false;
    }
    let Ok(f) = File::open(dir.join(OWNER)) else {
        return true;
    };
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok()
}

/// How long a hidden staging directory may exist unlocked while it is set up.
const NEW_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

fn older_than(p: &Path, age: std::time::Duration) -> bool {
    fs::symlink_metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .is_some_and(|a| a > age)
}

/// Whether `path` is a staging directory kept for the user (gc leaves it).
pub(crate) fn is_kept(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with(PREFIX))
        && path.join(KEPT).exists()
}

/// Whether `path` is a staging directory whose owner lives (gc leaves it).
pub(crate) fn is_live(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (name.starts_with(PREFIX) || name.starts_with(NEW_PREFIX)) && !is_dead(path)
}

impl Staging {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the directory kept while it holds the only copy of a container that
    /// CRIU already stopped: a stasis killed before the commit leaves it for the
    /// user (verify lists it with the command that restores it; no checkpoint or
    /// gc removes it). `unmark_kept` once the snapshot is committed.
    pub fn mark_kept(&self) -> std::io::Result<()> {
        fs::write(self.path.join(KEPT), b"")
    }

    /// The snapshot is committed: the directory goes on drop again.
    pub fn unmark_kept(&self) {
        let _ = fs::remove_file(self.path.join(KEPT));
    }

    /// Keeps the directory for the CRIU image an error names (and CRIU's logs),
    /// without `previous/` (the previous snapshot's file data materialised for the
    /// capture). It is marked kept: no checkpoint or gc removes it; the user does
    /// once the image is restored. Returns the image's path (`image/`).
    pub fn keep_image(&mut self) -> PathBuf {
        let _ = fs::remove_dir_all(self.path.join("previous"));
        let _ = fs::write(self.path.join(KEPT), b"");
        self.keep = true;
        self.path.join("image")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_goes_to_shm_only_when_it_fits() {
        let mib = 1u64 << 20;
        // 64 MiB tmpfs (Docker's default), 200 MiB image, plenty of memory.
        assert_eq!(choose(Some(64 * mib), 16 << 30, 200 * mib), Place::StoreTmp);
        assert_eq!(choose(Some(8 << 30), 16 << 30, 200 * mib), Place::Shm);
        // Room on the tmpfs but not in memory.
        assert_eq!(choose(Some(8 << 30), 300 * mib, 200 * mib), Place::StoreTmp);
        // No tmpfs at all.
        assert_eq!(choose(None, 16 << 30, mib), Place::StoreTmp);
    }

    fn store_with_shm(t: &Path) -> Store {
        let mut s = Store::open(&t.join("store")).unwrap();
        fs::create_dir_all(t.join("shm")).unwrap();
        s.set_shm_dir(&t.join("shm"));
        s
    }

    #[test]
    fn staging_is_private_pinned_and_removed_on_drop() {
        let t = tempfile::tempdir().unwrap();
        let mut store = store_with_shm(t.path());
        store.set_lock_timeout(std::time::Duration::from_millis(50));
        let s = store.staging(0).unwrap();
        let p = s.path().to_path_buf();
        assert!(p.file_name().unwrap().to_string_lossy().starts_with(PREFIX));
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // The pin: gc (exclusive) cannot run while the staging lives.
        assert!(store.gc(true).is_err());
        // A live directory is not removed by another checkpoint's cleanup.
        assert_eq!(store.remove_dead_staging(false).0, 0);
        assert!(p.is_dir());
        drop(s);
        assert!(!p.exists());
        assert!(store.gc(true).is_ok());
    }

    #[test]
    fn a_kept_staging_directory_keeps_the_image_but_not_the_previous_data() {
        let t = tempfile::tempdir().unwrap();
        let store = store_with_shm(t.path());
        let mut s = store.staging(0).unwrap();
        let dir = s.path().to_path_buf();
        for d in ["image", "work", "previous"] {
            fs::create_dir_all(dir.join(d)).unwrap();
            fs::write(dir.join(d).join("f"), d).unwrap();
        }
        assert_eq!(s.keep_image(), dir.join("image"));
        drop(s);
        assert!(dir.join("image/f").is_file() && dir.join("work/f").is_file());
        assert!(!dir.join("previous").exists());
        fs::remove_dir_all(&dir).unwrap();
        // Not kept: everything goes.
        let s = store.staging(0).unwrap();
        let dir = s.path().to_path_buf();
        fs::create_dir_all(dir.join("previous")).unwrap();
        drop(s);
        assert!(!dir.exists());
    }

    #[test]
    fn dead_staging_is_removed_and_kept_staging_stays() {
        let t = tempfile::tempdir().unwrap();
        let store = store_with_shm(t.path());
        // Left by a killed stasis: an owner file nobody locks, and one without.
        let dead = t.path().join("shm").join(format!("{PREFIX}dead"));
        fs::create_dir_all(dead.join("image")).unwrap();
        fs::write(dead.join(OWNER), b"").unwrap();
        fs::write(dead.join("image/pages-1.img"), [0u8; 4096]).unwrap();
        let dead_tmp = store.paths.tmp().join(format!("{PREFIX}old"));
        fs::create_dir_all(&dead_tmp).unwrap();
        assert_eq!(store.remove_dead_staging(true).0, 2);
        assert!(dead.exists() && dead_tmp.exists());
        // The next checkpoint's staging removes them; a kept one stays.
        let mut on_disk = store.clone();
        on_disk.set_shm_dir(&t.path().join("no-shm"));
        let mut kept = on_disk.staging(0).unwrap();
        assert!(kept.path().starts_with(store.paths.tmp()));
        assert!(!dead_tmp.exists());
        let kept_image = kept.keep_image();
        fs::create_dir_all(&kept_image).unwrap();
        let kept_dir = kept.path().to_path_buf();
        drop(kept);
        let live = store.staging(0).unwrap();
        assert!(!dead.exists());
        assert_eq!(store.remove_dead_staging(false).0, 0);
        assert!(kept_dir.join("image").is_dir() && live.path().is_dir());
        drop(live);
        // gc leaves the kept image too.
        store.gc(false).unwrap();
        assert!(kept_dir.join("image").is_dir());
    }
}
