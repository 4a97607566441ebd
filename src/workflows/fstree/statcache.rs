//! The stat cache of a container's filesystem captures: which files are unchanged
//! since the last capture (by device, inode, size, mtime and ctime) and where their
//! content already is, so a capture need not read them while the container is
//! frozen; and which files a process maps shared-writable (the stat cannot vouch
//! for those).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::workflows::fsutil::io;
use crate::workflows::{Result, WorkflowError};

/// A file's identity and change stamp. Two stats with equal keys are taken to mean
/// equal content (git's index and restic's parent-snapshot check make the same
/// assumption): the kernel sets ctime to the current time on every write, truncate,
/// rename-over, chmod or utimes, and userspace cannot set it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl StatKey {
    pub fn of(m: &fs::Metadata) -> StatKey {
        StatKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

pub const STAT_CACHE_VERSION: u32 = 1;

/// How much older than the capture a file's ctime must be for the file to enter
/// the stat cache. The kernel stamps ctime from a coarse clock (a jiffy, up to
/// 10 ms behind); a file changed again within the same tick after it was statted
/// would keep its key ("racy git"). With a one-second margin, any later change
/// gets a ctime strictly greater than the recorded one.
pub(super) const RACY_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// The stat cache of one container: for each captured tree, the key of every
/// regular file at its last capture and where its content is in `snapshot`'s
/// `fsdata-0.bin`. Written after that snapshot was stored, read before the next
/// checkpoint of the container. Losing it costs speed only (every file is read).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct StatCache {
    pub version: u32,
    /// Full id of the snapshot whose `fsdata-0.bin` holds every recorded content.
    pub snapshot: String,
    pub trees: Vec<CacheTree>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct CacheTree {
    /// Host path the tree was captured from.
    pub source: PathBuf,
    pub files: std::collections::BTreeMap<String, CachedFile>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CachedFile {
    pub key: StatKey,
    /// Offset of the content in the snapshot's `fsdata-0.bin`.
    pub offset: u64,
    /// sha256 (hex) of the content.
    pub sha256: String,
}

impl StatCache {
    /// The cache at `path`, or None when it is missing, unreadable or of another
    /// version: then every file is read, which is always correct.
    pub fn load(path: &Path) -> Option<StatCache> {
        let bytes = fs::read(path).ok()?;
        let c: StatCache = serde_json::from_slice(&bytes).ok()?;
        (c.version == STAT_CACHE_VERSION).then_some(c)
    }

    /// Writes the cache atomically (temp file, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let json = serde_json::to_vec(self).map_err(|e| WorkflowError::Io {
            op: "encode",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        let tmp = dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        fs::write(&tmp, json).map_err(io("write", &tmp))?;
        fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
        Ok(())
    }

    pub(super) fn lookup(&self, source: &Path, rel: &str) -> Option<&CachedFile> {
        self.trees
            .iter()
            .find(|t| t.source == source)
            .and_then(|t| t.files.get(rel))
    }
}

/// Files some process maps shared and writable. Writes through such a mapping to
/// a page that is already dirty and writable do not update ctime, so the stat key
/// cannot vouch for these files: they are read while frozen and never cached.
#[derive(Debug, Default, Clone)]
pub struct Mapped {
    pub(super) ids: std::collections::HashSet<(u64, u64)>,
    pub(super) paths: std::collections::HashSet<PathBuf>,
}

impl Mapped {
    /// From `/proc/PID/maps` of `pids` (lines with `w` and `s` in their perms).
    /// A process that vanished is skipped.
    pub fn of_pids(pids: &[i32]) -> Mapped {
        let mut m = Mapped::default();
        for pid in pids {
            if let Ok(text) = fs::read_to_string(format!("/proc/{pid}/maps")) {
                m.add_maps(&text);
            }
        }
        m
    }

    pub(super) fn add_maps(&mut self, text: &str) {
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(_), Some(perms), Some(_), Some(dev), Some(ino)) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                continue;
            };
            let p = perms.as_bytes();
            if p.len() < 4 || p[1] != b'w' || p[3] != b's' {
                continue;
            }
            let ino: u64 = ino.parse().unwrap_or(0);
            if let Some((maj, min)) = dev.split_once(':') {
                if let (Ok(maj), Ok(min)) =
                    (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16))
                {
                    self.ids.insert((libc::makedev(maj, min), ino));
                }
            }
            let path: Vec<&str> = f.collect();
            if !path.is_empty() {
                self.paths.insert(PathBuf::from(path.join(" ")));
            }
        }
    }

    /// `host` is the file's path on the host, `inner` its path in the container.
    /// Over-matching costs a read, never correctness.
    pub(super) fn contains(&self, meta: &fs::Metadata, host: &Path, inner: &Path) -> bool {
        self.ids.contains(&(meta.dev(), meta.ino()))
            || self.paths.contains(host)
            || self.paths.contains(inner)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.paths.is_empty()
    }
}
