//! A container's filesystem state as two files that travel inside a snapshot's
//! image directory, so the store deduplicates them like memory:
//! - `fsdata-0.bin`: the contents of every regular file, each starting on a 4 KiB
//!   boundary, so unchanged files (and unchanged blocks of changed files) are the
//!   same pages from one snapshot to the next wherever they move in the stream;
//! - `fs-manifest.json`: the trees (rootfs, writable volumes) with every entry's
//!   type, mode, owner, mtime, xattrs, symlink target, hard-link target, device
//!   number and data offset.
//!
//! `capture` writes them from live directories; `materialize` rebuilds the trees
//! (sparse where the data is zero pages). CRIU ignores both files.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::{Result, WorkflowError};

mod diff;
#[cfg(test)]
mod fuzz;
mod statcache;

pub use diff::{diff_manifests, FileDelta};
use statcache::RACY_MARGIN;
pub use statcache::{CacheTree, CachedFile, Mapped, StatCache, StatKey, STAT_CACHE_VERSION};

pub const DATA_FILE: &str = "fsdata-0.bin";
pub const MANIFEST_FILE: &str = "fs-manifest.json";
const ALIGN: u64 = 4096;
/// Largest fs-manifest.json read into memory (the store refuses larger reads too).
const MAX_MANIFEST: u64 = 256 << 20;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    Socket,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Entry {
    /// Path relative to the tree root ("" is the root itself).
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Offset of the contents in `fsdata-0.bin` (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Symlink target, or the path of the first link of a hard-linked file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// Extended attributes, values base64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, String)>,
    /// sha256 (hex) of the contents (files; absent in manifests written before
    /// the stat cache).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Tree {
    /// "rootfs" or "volume".
    pub role: String,
    /// Mount destination inside the container ("/" for the rootfs).
    pub dest: String,
    /// Where it was captured from on the host.
    pub source: PathBuf,
    pub entries: Vec<Entry>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Manifest {
    pub version: u32,
    pub trees: Vec<Tree>,
}

impl Manifest {
    pub fn files(&self) -> u64 {
        self.trees
            .iter()
            .flat_map(|t| &t.entries)
            .filter(|e| e.kind == Kind::File)
            .count() as u64
    }
    pub fn bytes(&self) -> u64 {
        self.trees
            .iter()
            .flat_map(|t| &t.entries)
            .map(|e| e.size)
            .sum()
    }
}

/// What to capture.
pub struct Source {
    pub role: &'static str,
    pub dest: String,
    pub path: PathBuf,
    /// Paths inside this tree (relative, no leading '/') not to capture.
    pub exclude: Vec<PathBuf>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError {
    let path = path.to_path_buf();
    move |source| WorkflowError::Io { op, path, source }
}

fn xattrs(path: &Path) -> Vec<(String, String)> {
    read_xattrs(path)
        .into_iter()
        .map(|(name, val)| {
            (
                name.to_string_lossy().into_owned(),
                base64::engine::general_purpose::STANDARD.encode(val),
            )
        })
        .collect()
}

/// The extended attributes of `path` itself (not following a symlink), as raw
/// names and values; attributes that vanish while being read are left out.
pub(super) fn read_xattrs(path: &Path) -> Vec<(std::ffi::CString, Vec<u8>)> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: llistxattr writes at most names.len() bytes into names.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut val = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        // SAFETY: lgetxattr writes at most val.len() bytes into val.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m >= 0 {
            out.push((cname, val[..m as usize].to_vec()));
        }
    }
    out
}

/// Sets one extended attribute on `path` itself (not following a symlink).
pub(super) fn set_xattr(
    path: &std::ffi::CStr,
    name: &std::ffi::CStr,
    val: &[u8],
) -> std::io::Result<()> {
    // SAFETY: valid path, name and value buffers for the duration of the call.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What a capture read, and from where.
#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureStats {
    pub files: u64,
    pub bytes: u64,
    /// Read while the container was frozen: new or changed files, files the stat
    /// cache could not vouch for.
    pub files_read_frozen: u64,
    pub bytes_read_frozen: u64,
    /// Unchanged per the stat cache: only statted while frozen, copied after.
    pub files_unchanged: u64,
    pub bytes_unchanged: u64,
    /// Of those, copied from the previous snapshot because the live file changed
    /// after the thaw (the rest came from the live file, re-checked).
    pub files_from_previous: u64,
    pub bytes_from_previous: u64,
    /// Files mapped shared-writable by the container (always read while frozen).
    pub files_mapped: u64,
}

struct Pending {
    full: PathBuf,
    key: StatKey,
    offset: u64,
    prev_offset: u64,
    sha256: String,
    /// (tree, entry) in the manifest.
    at: (usize, usize),
}

/// A capture in two steps: `capture_frozen` while the container is frozen, then
/// `finish` after it runs again (or is gone).
pub struct Capture {
    pub manifest: Manifest,
    pub stats: CaptureStats,
    pending: Vec<Pending>,
    /// Per tree: files that may enter the next stat cache (offset in this capture).
    cacheable: Vec<Vec<(String, StatKey, usize)>>,
    data_path: PathBuf,
    out: PathBuf,
}

/// Options of `capture_frozen`.
pub struct CaptureOptions<'a> {
    /// The container's stat cache from its last capture, whose snapshot the
    /// caller checked is still in the store.
    pub cache: Option<&'a StatCache>,
    pub mapped: Mapped,
    /// Files whose ctime is less than this before the capture stay out of the
    /// next stat cache (`RACY_MARGIN`; tests shorten it).
    pub racy_margin: std::time::Duration,
}

impl Default for CaptureOptions<'_> {
    fn default() -> Self {
        CaptureOptions {
            cache: None,
            mapped: Mapped::default(),
            racy_margin: RACY_MARGIN,
        }
    }
}

/// Walks `sources` while the container is frozen: stats every entry, reads into
/// `out/fsdata-0.bin` (at its final, page-aligned offset) every regular file that
/// is new, changed, mapped shared-writable or unknown to the stat cache, and only
/// records the others, whose bytes `Capture::finish` copies after the thaw.
pub fn capture_frozen(sources: &[Source], out: &Path, o: &CaptureOptions) -> Result<Capture> {
    use std::os::unix::fs::FileExt;
    let started = std::time::SystemTime::now();
    let racy_after = started
        .checked_sub(o.racy_margin)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| (d.as_secs() as i64, d.subsec_nanos() as i64))
        .unwrap_or((0, 0));
    let data_path = out.join(DATA_FILE);
    let data = File::create(&data_path).map_err(io("create", &data_path))?;
    let mut off = 0u64;
    let mut cap = Capture {
        manifest: Manifest {
            version: 1,
            trees: Vec::new(),
        },
        stats: CaptureStats::default(),
        pending: Vec::new(),
        cacheable: Vec::new(),
        data_path: data_path.clone(),
        out: out.to_path_buf(),
    };
    let mut buf = vec![0u8; 1 << 20];
    for src in sources {
        let ti = cap.manifest.trees.len();
        let mut entries = Vec::new();
        let mut cacheable = Vec::new();
        let mut links: HashMap<(u64, u64), String> = HashMap::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let full = src.path.join(&rel);
            let meta = fs::symlink_metadata(&full).map_err(io("stat", &full))?;
            let ft = meta.file_type();
            let path = rel.to_string_lossy().into_owned();
            let mut e = Entry {
                path: path.clone(),
                kind: Kind::Dir,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: meta.mtime(),
                mtime_nsec: meta.mtime_nsec(),
                size: 0,
                offset: None,
                target: None,
                rdev: 0,
                xattrs: xattrs(&full),
                sha256: None,
            };
            if ft.is_dir() {
                let mut children: Vec<PathBuf> = fs::read_dir(&full)
                    .map_err(io("read directory", &full))?
                    .filter_map(|d| d.ok())
                    .map(|d| rel.join(d.file_name()))
                    .filter(|p| !src.exclude.iter().any(|x| p.starts_with(x)))
                    .collect();
                children.sort();
                children.reverse();
                stack.extend(children);
            } else if ft.is_symlink() {
                e.kind = Kind::Symlink;
                e.target = Some(
                    fs::read_link(&full)
                        .map_err(io("read link", &full))?
                        .to_string_lossy()
                        .into_owned(),
                );
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        e.kind = Kind::Hardlink;
                        e.target = Some(first.clone());
                        entries.push(e);
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), path.clone());
                }
                e.kind = Kind::File;
                e.offset = Some(off);
                let key = StatKey::of(&meta);
                let inner = Path::new(&src.dest).join(&rel);
                let mapped = o.mapped.contains(&meta, &full, &inner);
                cap.stats.files_mapped += mapped as u64;
                let hit = o
                    .cache
                    .and_then(|c| c.lookup(&src.path, &path))
                    .filter(|c| !mapped && c.key == key);
                let n = if let Some(c) = hit {
                    cap.pending.push(Pending {
                        full: full.clone(),
                        key,
                        offset: off,
                        prev_offset: c.offset,
                        sha256: c.sha256.clone(),
                        at: (ti, entries.len()),
                    });
                    cap.stats.files_unchanged += 1;
                    cap.stats.bytes_unchanged += key.size;
                    key.size
                } else {
                    let mut f = File::open(&full).map_err(io("open", &full))?;
                    let mut n = 0u64;
                    loop {
                        let r = f.read(&mut buf).map_err(io("read", &full))?;
                        if r == 0 {
                            break;
                        }
                        data.write_all_at(&buf[..r], off + n)
                            .map_err(io("write", &data_path))?;
                        n += r as u64;
                    }
                    cap.stats.files_read_frozen += 1;
                    cap.stats.bytes_read_frozen += n;
                    n
                };
                // Cacheable: not mapped, stable while read, and old enough that a
                // later change cannot keep the same ctime.
                if !mapped && n == key.size && (key.ctime, key.ctime_nsec) < racy_after {
                    cacheable.push((path.clone(), key, entries.len()));
                }
                e.size = n;
                off += n.div_ceil(ALIGN) * ALIGN;
                cap.stats.files += 1;
                cap.stats.bytes += n;
            } else {
                e.kind = if ft.is_char_device() {
                    Kind::Char
                } else if ft.is_block_device() {
                    Kind::Block
                } else if ft.is_fifo() {
                    Kind::Fifo
                } else {
                    Kind::Socket
                };
                e.rdev = meta.rdev();
            }
            entries.push(e);
        }
        cap.manifest.trees.push(Tree {
            role: src.role.to_string(),
            dest: src.dest.clone(),
            source: src.path.clone(),
            entries,
        });
        cap.cacheable.push(cacheable);
    }
    // Unchanged files stay holes until `finish` fills them.
    data.set_len(off).map_err(io("truncate", &data_path))?;
    Ok(cap)
}

impl Capture {
    /// After the thaw: copies every unchanged file into `fsdata-0.bin`, hashes what
    /// was read while frozen, and writes `fs-manifest.json`.
    ///
    /// An unchanged file is copied from the live file when its key, checked
    /// before and after the copy on the open descriptor, still equals the key
    /// seen while frozen (so its bytes are the checkpoint-time bytes). Otherwise
    /// (the container wrote to it after the thaw) its checkpoint-time bytes come
    /// from the previous snapshot's `fsdata-0.bin`, which `previous(false)`
    /// provides (called only when needed; a cached copy will do). Every range
    /// copied from it is hashed and must match the file's recorded sha256: on a
    /// mismatch `previous(true)` is asked once for a copy materialised verified
    /// from the store, and if that does not match either, `finish` fails rather
    /// than capture bytes that are not the file's.
    pub fn finish(&mut self, previous: &mut dyn FnMut(bool) -> Result<PathBuf>) -> Result<()> {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::FileExt;
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.data_path)
            .map_err(io("open", &self.data_path))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut prev: Option<File> = None;
        for p in &self.pending {
            if !copy_live(p, &data, &self.data_path, &mut buf)? {
                let mut fresh = false;
                loop {
                    if prev.is_none() {
                        let path = previous(fresh)?;
                        prev = Some(File::open(&path).map_err(io("open", &path))?);
                    }
                    let src = prev.as_ref().ok_or_else(|| WorkflowError::Io {
                        op: "open previous snapshot data for",
                        path: p.full.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::NotFound),
                    })?;
                    let got = copy_range(src, p.prev_offset, &data, p.offset, p.key.size, &mut buf)
                        .map_err(io("copy from the previous snapshot", &p.full))?;
                    if got == p.sha256 {
                        break;
                    }
                    if fresh {
                        return Err(WorkflowError::Io {
                            op: "copy from the previous snapshot",
                            path: p.full.clone(),
                            source: std::io::Error::other(format!(
                                "its bytes there have sha256 {got}, not the recorded {}: the previous snapshot's data is damaged (run `stasis snapshot verify --read-data`)",
                                p.sha256
                            )),
                        });
                    }
                    fresh = true;
                    prev = None;
                }
                self.stats.files_from_previous += 1;
                self.stats.bytes_from_previous += p.key.size;
            }
            self.manifest.trees[p.at.0].entries[p.at.1].sha256 = Some(p.sha256.clone());
        }
        // Files read while frozen: hash them now, from the copy.
        for t in &mut self.manifest.trees {
            for e in &mut t.entries {
                if e.kind != Kind::File || e.sha256.is_some() {
                    continue;
                }
                let mut h = Sha256::new();
                let (mut at, end) = (e.offset.unwrap_or(0), e.offset.unwrap_or(0) + e.size);
                while at < end {
                    let n = ((end - at) as usize).min(buf.len());
                    data.read_exact_at(&mut buf[..n], at)
                        .map_err(io("read", &self.data_path))?;
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                e.sha256 = Some(hex::encode(h.finalize()));
            }
        }
        data.sync_all().map_err(io("fsync", &self.data_path))?;
        let mpath = self.out.join(MANIFEST_FILE);
        let json = serde_json::to_vec(&self.manifest).map_err(|e| WorkflowError::Io {
            op: "encode",
            path: mpath.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::write(&mpath, json).map_err(io("write", &mpath))?;
        Ok(())
    }

    /// The stat cache for the next capture, once this one is stored as `snapshot`.
    /// Call after `finish`.
    pub fn stat_cache(&self, snapshot: &str) -> StatCache {
        StatCache {
            version: STAT_CACHE_VERSION,
            snapshot: snapshot.to_string(),
            trees: self
                .manifest
                .trees
                .iter()
                .zip(&self.cacheable)
                .map(|(t, files)| CacheTree {
                    source: t.source.clone(),
                    files: files
                        .iter()
                        .filter_map(|(path, key, i)| {
                            let e = &t.entries[*i];
                            Some((
                                path.clone(),
                                CachedFile {
                                    key: *key,
                                    offset: e.offset?,
                                    sha256: e.sha256.clone()?,
                                },
                            ))
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Copies an unchanged file from the live tree if it still has the key seen while
/// frozen, before and after the copy. Ok(false): use the previous snapshot.
fn copy_live(p: &Pending, data: &File, data_path: &Path, buf: &mut [u8]) -> Result<bool> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    // O_NOFOLLOW | O_NONBLOCK: a symlink or FIFO swapped in after the thaw is
    // refused or not waited on; the key check refuses any other inode.
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&p.full)
    else {
        return Ok(false);
    };
    let same = |f: &File| f.metadata().is_ok_and(|m| StatKey::of(&m) == p.key);
    if !same(&f) {
        return Ok(false);
    }
    let mut at = 0u64;
    while at < p.key.size {
        let n = ((p.key.size - at) as usize).min(buf.len());
        match f.read_at(&mut buf[..n], at) {
            Ok(0) | Err(_) => return Ok(false),
            Ok(r) => {
                data.write_all_at(&buf[..r], p.offset + at)
                    .map_err(io("write", data_path))?;
                at += r as u64;
            }
        }
    }
    Ok(same(&f))
}

/// Copies `len` bytes; returns the hex sha256 of what was copied.
fn copy_range(
    src: &File,
    from: u64,
    dst: &File,
    to: u64,
    len: u64,
    buf: &mut [u8],
) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let mut h = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], from + done)?;
        h.update(&buf[..n]);
        dst.write_all_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Walks `sources` and writes `fsdata-0.bin` and `fs-manifest.json` into `out`,
/// reading every file (no stat cache).
pub fn capture(sources: &[Source], out: &Path) -> Result<Manifest> {
    let mut c = capture_frozen(sources, out, &CaptureOptions::default())?;
    c.finish(&mut |_| {
        Err(WorkflowError::Io {
            op: "capture",
            path: out.to_path_buf(),
            source: std::io::Error::other("no previous snapshot to copy unchanged files from"),
        })
    })?;
    Ok(c.manifest)
}

pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let len = fs::metadata(&p).map_err(io("stat", &p))?.len();
    if len > MAX_MANIFEST {
        return Err(WorkflowError::Io {
            op: "read",
            path: p,
            source: std::io::Error::other(format!(
                "{len} bytes, more than the {MAX_MANIFEST}-byte limit for a filesystem manifest"
            )),
        });
    }
    let bytes = fs::read(&p).map_err(io("read", &p))?;
    parse_manifest(&bytes, &p).map(Some)
}

/// Parses `fs-manifest.json` bytes; `label` names where they came from.
pub fn parse_manifest(bytes: &[u8], label: &Path) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| WorkflowError::Io {
        op: "parse",
        path: label.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    if m.version != 1 {
        return Err(WorkflowError::Io {
            op: "read",
            path: label.to_path_buf(),
            source: std::io::Error::other(format!(
                "unknown filesystem manifest version {}",
                m.version
            )),
        });
    }
    Ok(m)
}

/// The filesystem manifest of a stored snapshot, read from its files blob (no
/// page is materialised); None when the snapshot carries no filesystem.
pub fn snapshot_manifest(
    store: &crate::store::Store,
    id: &crate::store::SnapshotId,
) -> Result<Option<Manifest>> {
    let has = store.files(id)?.iter().any(|f| f.name == MANIFEST_FILE);
    if !has {
        return Ok(None);
    }
    let bytes = store.read_file(id, MANIFEST_FILE)?;
    parse_manifest(&bytes, &Path::new(&id.short()).join(MANIFEST_FILE)).map(Some)
}

fn cpath(p: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| WorkflowError::Io {
        op: "encode path",
        path: p.to_path_buf(),
        source: std::io::Error::other("path contains a NUL byte"),
    })
}

fn set_meta(p: &Path, e: &Entry) -> Result<()> {
    let c = cpath(p)?;
    // SAFETY: lchown/utimensat take a valid NUL-terminated path we own.
    unsafe {
        libc::lchown(c.as_ptr(), e.uid, e.gid);
    }
    if e.kind != Kind::Symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(e.mode)).map_err(io("chmod", p))?;
    }
    for (k, v) in &e.xattrs {
        let Ok(val) = base64::engine::general_purpose::STANDARD.decode(v) else {
            continue;
        };
        let Ok(ck) = std::ffi::CString::new(k.as_bytes()) else {
            continue;
        };
        // Best effort, as tar does: a filesystem that refuses an attribute
        // (e.g. trusted.* without CAP_SYS_ADMIN in its user namespace) loses it.
        let _ = set_xattr(&c, &ck, &val);
    }
    let ts = [
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_nsec as libc::c_long,
        },
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_nsec as libc::c_long,
        },
    ];
    // SAFETY: ts is a valid two-element array; the path is NUL-terminated.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}

/// A path from the manifest must stay inside the tree.
fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(WorkflowError::Io {
            op: "materialize",
            path: root.join(rel),
            source: std::io::Error::other("manifest path escapes the tree"),
        });
    }
    Ok(root.join(p))
}

/// A manifest path in one canonical spelling (`a/./b//c` -> `a/b/c`).
fn rel_key(rel: &str) -> String {
    Path::new(rel)
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn bad_entry(dest: &Path, rel: &str, why: &str) -> WorkflowError {
    WorkflowError::Io {
        op: "materialize",
        path: dest.join(rel),
        source: std::io::Error::other(format!(
            "{why}; the snapshot's fs-manifest.json is damaged or crafted, refusing it"
        )),
    }
}

/// Every file's bytes must lie inside the data file, and the files of a tree
/// (written at disjoint offsets by capture) cannot add up to more than it holds: a
/// hostile manifest cannot make restore write more than its data file's size.
fn check_extents(tree: &Tree, data_len: u64, data: &Path) -> Result<()> {
    let mut total = 0u64;
    for e in tree.entries.iter().filter(|e| e.kind == Kind::File) {
        let end = e.offset.unwrap_or(0).checked_add(e.size);
        total = total.saturating_add(e.size);
        if end.is_none_or(|end| end > data_len) || total > data_len {
            return Err(WorkflowError::Io {
                op: "materialize",
                path: data.to_path_buf(),
                source: std::io::Error::other(format!(
                    "filesystem manifest entry {:?} claims {} bytes at offset {}, beyond the {data_len}-byte data file",
                    e.path,
                    e.size,
                    e.offset.unwrap_or(0)
                )),
            });
        }
    }
    Ok(())
}

/// Rebuilds tree number `index` of `manifest` under `dest` from `data` (the
/// verified `fsdata-0.bin`). Directories' metadata is applied last (deepest first)
/// so mtimes and read-only modes stick.
///
/// Nothing is created through a symlink: every entry's parent must be a
/// directory this manifest created earlier, and a hard link must point at a
/// regular file it created earlier, so a manifest cannot reach outside `dest`
/// (e.g. a symlink `a -> /etc` followed by an entry `a/x`).
pub fn materialize(manifest: &Manifest, index: usize, data: &Path, dest: &Path) -> Result<()> {
    let tree = manifest.trees.get(index).ok_or_else(|| WorkflowError::Io {
        op: "materialize",
        path: dest.to_path_buf(),
        source: std::io::Error::other(format!("no tree {index} in the manifest")),
    })?;
    let mut src = File::open(data).map_err(io("open", data))?;
    let data_len = src.metadata().map_err(io("stat", data))?.len();
    check_extents(tree, data_len, data)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut dirs = Vec::new();
    let mut made_dirs: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut made_files: std::collections::HashSet<String> = std::collections::HashSet::new();
    made_dirs.insert(String::new());
    fs::create_dir_all(dest).map_err(io("create", dest))?;
    for e in &tree.entries {
        let p = safe_join(dest, &e.path)?;
        let key = rel_key(&e.path);
        if !key.is_empty() {
            let parent = key.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            if !made_dirs.contains(parent) {
                return Err(bad_entry(
                    dest,
                    &e.path,
                    "its parent is not a directory created from the manifest",
                ));
            }
        }
        match e.kind {
            Kind::Dir => {
                made_dirs.insert(key.clone());
            }
            Kind::File => {
                made_files.insert(key.clone());
            }
            _ => {}
        }
        match e.kind {
            Kind::Dir => {
                if !e.path.is_empty() {
                    fs::create_dir(&p).map_err(io("create directory", &p))?;
                }
                dirs.push((p, e));
                continue;
            }
            Kind::File => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .map_err(io("create", &p))?;
                src.seek(SeekFrom::Start(e.offset.unwrap_or(0)))
                    .map_err(io("seek", data))?;
                let mut left = e.size;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    src.read_exact(&mut buf[..n]).map_err(io("read", data))?;
                    // Keep zero pages as holes.
                    let mut i = 0;
                    while i < n {
                        let j = (i + ALIGN as usize).min(n);
                        if buf[i..j].iter().all(|b| *b == 0) && j - i == ALIGN as usize {
                            f.seek(SeekFrom::Current((j - i) as i64))
                                .map_err(io("seek", &p))?;
                        } else {
                            f.write_all(&buf[i..j]).map_err(io("write", &p))?;
                        }
                        i = j;
                    }
                    left -= n as u64;
                }
                f.set_len(e.size).map_err(io("truncate", &p))?;
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(e.target.as_deref().unwrap_or(""), &p)
                    .map_err(io("create symlink", &p))?;
            }
            Kind::Hardlink => {
                let target = e.target.as_deref().unwrap_or("");
                if !made_files.contains(&rel_key(target)) {
                    return Err(bad_entry(
                        dest,
                        &e.path,
                        "its hard-link target is not a regular file created from the manifest",
                    ));
                }
                let t = safe_join(dest, target)?;
                fs::hard_link(&t, &p).map_err(io("create hard link", &p))?;
                continue;
            }
            Kind::Char | Kind::Block | Kind::Fifo | Kind::Socket => {
                let kind = match e.kind {
                    Kind::Char => nix::sys::stat::SFlag::S_IFCHR,
                    Kind::Block => nix::sys::stat::SFlag::S_IFBLK,
                    Kind::Fifo => nix::sys::stat::SFlag::S_IFIFO,
                    _ => nix::sys::stat::SFlag::S_IFSOCK,
                };
                nix::sys::stat::mknod(
                    &p,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(e.mode),
                    e.rdev as nix::libc::dev_t,
                )
                .map_err(|er| WorkflowError::Io {
                    op: "mknod",
                    path: p.clone(),
                    source: er.into(),
                })?;
            }
        }
        set_meta(&p, e)?;
    }
    for (p, e) in dirs.iter().rev() {
        set_meta(p, e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_types_modes_links_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("a/empty")).unwrap();
        fs::write(src.join("a/small"), b"hello").unwrap();
        let mut big = vec![7u8; 3 * 4096 + 5];
        big[4096..8192].fill(0);
        fs::write(src.join("big"), &big).unwrap();
        fs::hard_link(src.join("a/small"), src.join("a/link")).unwrap();
        std::os::unix::fs::symlink("a/small", src.join("sym")).unwrap();
        fs::set_permissions(src.join("a/small"), fs::Permissions::from_mode(0o640)).unwrap();
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let out = t.path().join("out");
        fs::create_dir(&out).unwrap();
        let m = capture(
            &[Source {
                role: "rootfs",
                dest: "/".into(),
                path: src.clone(),
                exclude: vec![],
            }],
            &out,
        )
        .unwrap();
        assert_eq!(fs::metadata(out.join(DATA_FILE)).unwrap().len() % ALIGN, 0);
        let m2 = read_manifest(&out).unwrap().unwrap();
        assert_eq!(m.trees[0].entries.len(), m2.trees[0].entries.len());
        let dst = t.path().join("dst");
        materialize(&m2, 0, &out.join(DATA_FILE), &dst).unwrap();
        assert_eq!(fs::read(dst.join("a/small")).unwrap(), b"hello");
        assert_eq!(fs::read(dst.join("big")).unwrap(), big);
        assert!(dst.join("a/empty").is_dir());
        assert_eq!(
            fs::read_link(dst.join("sym")).unwrap(),
            Path::new("a/small")
        );
        let (a, b) = (
            fs::metadata(dst.join("a/small")).unwrap(),
            fs::metadata(dst.join("a/link")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.mode() & 0o7777, 0o640);
        assert!(fs::symlink_metadata(dst.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
    }

    fn rootfs(src: &Path) -> Vec<Source> {
        vec![Source {
            role: "rootfs",
            dest: "/".into(),
            path: src.to_path_buf(),
            exclude: vec![],
        }]
    }

    fn quick() -> CaptureOptions<'static> {
        CaptureOptions {
            racy_margin: std::time::Duration::ZERO,
            ..Default::default()
        }
    }

    /// Captures `src` into a fresh `out` with `cache`; `previous` is the data file
    /// unchanged files fall back to.
    fn cap(src: &Path, out: &Path, cache: Option<&StatCache>, previous: Option<&Path>) -> Capture {
        fs::create_dir_all(out).unwrap();
        let o = CaptureOptions { cache, ..quick() };
        let mut c = capture_frozen(&rootfs(src), out, &o).unwrap();
        c.finish(&mut |_| Ok(previous.expect("no fallback expected").to_path_buf()))
            .unwrap();
        c
    }

    fn content(c: &Capture, out: &Path, path: &str) -> Vec<u8> {
        let e = c.manifest.trees[0]
            .entries
            .iter()
            .find(|e| e.path == path)
            .unwrap();
        let data = fs::read(out.join(DATA_FILE)).unwrap();
        let at = e.offset.unwrap() as usize;
        data[at..at + e.size as usize].to_vec()
    }

    /// Past the kernel's coarse ctime clock tick, so a rewrite gets a new ctime.
    fn tick() {
        std::thread::sleep(std::time::Duration::from_millis(30));
    }

    #[test]
    fn stat_cache_reads_only_changed_and_added_files() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("same"), vec![1u8; 10000]).unwrap();
        fs::write(src.join("d/changed"), b"old").unwrap();
        fs::write(src.join("gone"), b"bye").unwrap();
        let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
        let c1 = cap(&src, &o1, None, None);
        assert_eq!(c1.stats.files_read_frozen, 3);
        assert_eq!(c1.stats.files_unchanged, 0);
        let cache = c1.stat_cache("snap1");
        assert_eq!(cache.trees[0].files.len(), 3);
        tick();
        fs::write(src.join("d/changed"), b"newer").unwrap();
        fs::remove_file(src.join("gone")).unwrap();
        fs::write(src.join("added"), b"hi").unwrap();
        let c2 = cap(&src, &o2, Some(&cache), None);
        assert_eq!(c2.stats.files_unchanged, 1);
        assert_eq!(c2.stats.bytes_unchanged, 10000);
        assert_eq!(c2.stats.files_read_frozen, 2);
        assert_eq!(c2.stats.bytes_read_frozen, 5 + 2);
        assert_eq!(c2.stats.files_from_previous, 0);
        assert_eq!(content(&c2, &o2, "same"), vec![1u8; 10000]);
        assert_eq!(content(&c2, &o2, "d/changed"), b"newer");
        assert!(!c2.manifest.trees[0]
            .entries
            .iter()
            .any(|e| e.path == "gone"));
        // The unchanged file keeps its digest; the manifest on disk agrees.
        let m = read_manifest(&o2).unwrap().unwrap();
        let digest = |m: &Manifest, p: &str| {
            m.trees[0]
                .entries
                .iter()
                .find(|e| e.path == p)
                .unwrap()
                .sha256
                .clone()
        };
        assert_eq!(digest(&m, "same"), digest(&c1.manifest, "same"));
        assert!(digest(&m, "same").is_some());
        // And the next cache has the moved offsets of this capture.
        let next = c2.stat_cache("snap2");
        assert_eq!(next.snapshot, "snap2");
        assert_eq!(
            next.trees[0].files["same"].offset,
            c2.manifest.trees[0]
                .entries
                .iter()
                .find(|e| e.path == "same")
                .unwrap()
                .offset
                .unwrap()
        );
        let dst = t.path().join("dst");
        materialize(&m, 0, &o2.join(DATA_FILE), &dst).unwrap();
        assert_eq!(fs::read(dst.join("same")).unwrap(), vec![1u8; 10000]);
        assert_eq!(fs::read(dst.join("added")).unwrap(), b"hi");
    }

    #[test]
    fn same_size_and_mtime_but_new_ctime_is_read_again() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), b"aaaa").unwrap();
        let mtime = fs::metadata(src.join("f")).unwrap().modified().unwrap();
        let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
        let c1 = cap(&src, &o1, None, None);
        let cache = c1.stat_cache("s");
        tick();
        fs::write(src.join("f"), b"bbbb").unwrap();
        let f = File::options().write(true).open(src.join("f")).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);
        let m = fs::metadata(src.join("f")).unwrap();
        let old = cache.trees[0].files["f"].key;
        assert_eq!(
            (m.size(), m.mtime(), m.mtime_nsec()),
            (old.size, old.mtime, old.mtime_nsec)
        );
        assert_ne!((m.ctime(), m.ctime_nsec()), (old.ctime, old.ctime_nsec));
        let c2 = cap(&src, &o2, Some(&cache), None);
        assert_eq!(c2.stats.files_unchanged, 0);
        assert_eq!(c2.stats.files_read_frozen, 1);
        assert_eq!(content(&c2, &o2, "f"), b"bbbb");
    }

    #[test]
    fn a_file_changed_after_the_thaw_comes_from_the_previous_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("db"), vec![3u8; 9000]).unwrap();
        fs::write(src.join("other"), b"x").unwrap();
        let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
        let c1 = cap(&src, &o1, None, None);
        let cache = c1.stat_cache("s");
        fs::create_dir_all(&o2).unwrap();
        let mut c2 = capture_frozen(
            &rootfs(&src),
            &o2,
            &CaptureOptions {
                cache: Some(&cache),
                ..quick()
            },
        )
        .unwrap();
        assert_eq!(c2.stats.files_unchanged, 2);
        // Thawed: the container rewrites the file before the copy.
        tick();
        fs::write(src.join("db"), vec![4u8; 9000]).unwrap();
        let prev = o1.join(DATA_FILE);
        let mut asked = 0;
        c2.finish(&mut |_| {
            asked += 1;
            Ok(prev.clone())
        })
        .unwrap();
        assert_eq!(asked, 1);
        assert_eq!(c2.stats.files_from_previous, 1);
        assert_eq!(c2.stats.bytes_from_previous, 9000);
        assert_eq!(content(&c2, &o2, "db"), vec![3u8; 9000]);
        assert_eq!(content(&c2, &o2, "other"), b"x");
    }

    #[test]
    fn damaged_previous_data_is_replaced_by_a_verified_copy_or_refused() {
        let t = tempfile::tempdir().unwrap();
        // A first capture (its data file is the previous snapshot's, `good`), a
        // damaged copy of that data (`bad`, a cached image gone bad), and a second
        // capture whose one file changes after the thaw, so it must come from
        // the previous data.
        let setup = |name: &str| {
            let src = t.path().join(name);
            fs::create_dir_all(&src).unwrap();
            fs::write(src.join("db"), vec![3u8; 9000]).unwrap();
            let o1 = t.path().join(format!("{name}-o1"));
            let c1 = cap(&src, &o1, None, None);
            let cache = c1.stat_cache("s");
            let good = o1.join(DATA_FILE);
            let bad = t.path().join(format!("{name}-bad.bin"));
            let mut bytes = fs::read(&good).unwrap();
            bytes[100] ^= 0x55;
            fs::write(&bad, &bytes).unwrap();
            let o2 = t.path().join(format!("{name}-o2"));
            fs::create_dir_all(&o2).unwrap();
            let c2 = capture_frozen(
                &rootfs(&src),
                &o2,
                &CaptureOptions {
                    cache: Some(&cache),
                    ..quick()
                },
            )
            .unwrap();
            assert_eq!(c2.stats.files_unchanged, 1);
            tick();
            fs::write(src.join("db"), vec![4u8; 9000]).unwrap();
            (c2, o2, good, bad)
        };
        // Cached copy damaged, store copy good: the good bytes are captured.
        let (mut c2, o2, good, bad) = setup("a");
        let mut asked = Vec::new();
        c2.finish(&mut |fresh| {
            asked.push(fresh);
            Ok(if fresh { good.clone() } else { bad.clone() })
        })
        .unwrap();
        assert_eq!(asked, vec![false, true]);
        assert_eq!(content(&c2, &o2, "db"), vec![3u8; 9000]);
        // Both damaged: refused, not captured wrong.
        let (mut c3, _, _, bad) = setup("b");
        let e = c3.finish(&mut |_| Ok(bad.clone())).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
    }

    #[test]
    fn recent_and_mapped_files_stay_out_of_the_cache() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("fresh"), b"1").unwrap();
        fs::write(src.join("mapped"), b"2").unwrap();
        let out = t.path().join("o");
        fs::create_dir_all(&out).unwrap();
        let meta = fs::metadata(src.join("mapped")).unwrap();
        let mut mapped = Mapped::default();
        let (maj, min) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        mapped.add_maps(&format!(
            "7f0000000000-7f0000001000 rw-s 00000000 {maj:x}:{min:x} {} /x/mapped\n\
             7f0000001000-7f0000002000 rw-p 00000000 00:00 0 \n",
            meta.ino()
        ));
        // The default margin: a file written just now is racy.
        let mut c = capture_frozen(
            &rootfs(&src),
            &out,
            &CaptureOptions {
                mapped,
                ..Default::default()
            },
        )
        .unwrap();
        c.finish(&mut |_| unreachable!()).unwrap();
        assert_eq!(c.stats.files_mapped, 1);
        assert!(c.stat_cache("s").trees[0].files.is_empty());
        let mut mapped = Mapped::default();
        mapped.add_maps("7f0000000000-7f0000001000 rw-s 00000000 00:05 9 /x/y z\n");
        assert!(mapped.paths.contains(Path::new("/x/y z")));
        mapped.add_maps("7f0000000000-7f0000001000 r--s 00000000 00:05 10 /ro\n");
        assert!(!mapped.paths.contains(Path::new("/ro")));
    }

    #[test]
    fn stat_cache_survives_a_save_and_refuses_other_versions() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), b"abc").unwrap();
        let c = cap(&src, &t.path().join("o"), None, None);
        let p = t.path().join("cache/c.json");
        c.stat_cache("s").save(&p).unwrap();
        let back = StatCache::load(&p).unwrap();
        assert_eq!(
            back.trees[0].files["f"],
            c.stat_cache("s").trees[0].files["f"]
        );
        fs::write(&p, br#"{"version":9,"snapshot":"s","trees":[]}"#).unwrap();
        assert!(StatCache::load(&p).is_none());
        fs::write(&p, b"garbage").unwrap();
        assert!(StatCache::load(&p).is_none());
    }

    #[test]
    fn diff_lists_added_changed_and_removed_files_per_tree() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::write(src.join("same"), b"s").unwrap();
        fs::write(src.join("d/f"), b"old").unwrap();
        fs::write(src.join("gone"), b"g").unwrap();
        let c1 = cap(&src, &t.path().join("o1"), None, None);
        tick();
        fs::write(src.join("d/f"), b"new!").unwrap();
        fs::remove_file(src.join("gone")).unwrap();
        fs::write(src.join("d/added"), b"aa").unwrap();
        let c2 = cap(&src, &t.path().join("o2"), None, None);
        let d = diff_manifests(&c1.manifest, &c2.manifest);
        let got: Vec<(&str, &str, Option<u64>, Option<u64>)> = d
            .iter()
            .map(|x| (x.path.as_str(), x.change, x.size_a, x.size_b))
            .collect();
        assert_eq!(
            got,
            vec![
                ("d/added", "added", None, Some(2)),
                ("d/f", "changed", Some(3), Some(4)),
                ("gone", "removed", Some(1), None),
            ]
        );
        assert!(d.iter().all(|x| x.tree == "/"));
        assert_eq!(d[1].what, Some("content"));
        assert!(diff_manifests(&c2.manifest, &c2.manifest).is_empty());
    }

    #[test]
    fn manifest_paths_cannot_escape() {
        assert!(safe_join(Path::new("/x"), "../etc").is_err());
        assert!(safe_join(Path::new("/x"), "/etc").is_err());
        assert!(safe_join(Path::new("/x"), "a/b").is_ok());
    }

    #[test]
    fn materialize_never_goes_through_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host").unwrap();
        let data = t.path().join("data");
        fs::write(&data, vec![0u8; 4096]).unwrap();
        let entry = |path: &str, kind: Kind, target: Option<String>| Entry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            offset: None,
            target,
            rdev: 0,
            xattrs: Vec::new(),
            sha256: None,
        };
        let root = entry("", Kind::Dir, None);
        let sym = entry("a", Kind::Symlink, Some(outside.display().to_string()));
        let cases = [
            // a file, a directory and a device through the symlink
            vec![root.clone(), sym.clone(), entry("a/x", Kind::File, None)],
            vec![root.clone(), sym.clone(), entry("a/d", Kind::Dir, None)],
            // a hard link to a host file through the symlink
            vec![
                root.clone(),
                sym.clone(),
                entry("l", Kind::Hardlink, Some("a/secret".into())),
            ],
            // a child listed before its parent directory
            vec![root.clone(), entry("b/x", Kind::File, None)],
        ];
        for (i, entries) in cases.into_iter().enumerate() {
            let m = Manifest {
                version: 1,
                trees: vec![Tree {
                    role: "rootfs".into(),
                    dest: "/".into(),
                    source: PathBuf::from("/"),
                    entries,
                }],
            };
            let dest = t.path().join(format!("dest{i}"));
            let err = materialize(&m, 0, &data, &dest).unwrap_err().to_string();
            assert!(err.contains("refusing it"), "case {i}: {err}");
        }
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            1,
            "nothing written outside"
        );
    }
}
