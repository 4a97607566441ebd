//! Capturing live trees into `fsdata-0.bin` and `fs-manifest.json`: the frozen
//! step (stat everything, read what the stat cache cannot vouch for), `finish`
//! after the thaw (copy unchanged files live or from the previous snapshot, hash,
//! write the manifest), and the one-step `capture`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::statcache::RACY_MARGIN;
use super::{
    CacheTree, CachedFile, Entry, Kind, Manifest, Mapped, StatCache, StatKey, Tree, ALIGN,
    DATA_FILE, MANIFEST_FILE, STAT_CACHE_VERSION,
};
use crate::workflows::fsutil::{io, read_xattrs};
use crate::workflows::{Result, WorkflowError};

/// What to capture.
pub struct Source {
    pub role: &'static str,
    pub dest: String,
    pub path: PathBuf,
    /// Paths inside this tree (relative, no leading '/') not to capture.
    pub exclude: Vec<PathBuf>,
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

/// What a capture read, and from where. Stored as the snapshot metadata's
/// `filesystem.capture` (`workflows::meta`); every field defaults when read.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(default)]
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
    let started = std::time::SystemTime::now();
    let racy_after = started
        .checked_sub(o.racy_margin)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| (d.as_secs() as i64, d.subsec_nanos() as i64))
        .unwrap_or((0, 0));
    let data_path = out.join(DATA_FILE);
    let data = File::create(&data_path).map_err(io("create", &data_path))?;
    let mut w = Walk {
        o,
        racy_after,
        data,
        off: 0,
        buf: vec![0u8; 1 << 20],
        cap: Capture {
            manifest: Manifest {
                version: 1,
                trees: Vec::new(),
            },
            stats: CaptureStats::default(),
            pending: Vec::new(),
            cacheable: Vec::new(),
            data_path: data_path.clone(),
            out: out.to_path_buf(),
        },
    };
    for src in sources {
        w.tree(src)?;
    }
    // Unchanged files stay holes until `finish` fills them.
    w.data.set_len(w.off).map_err(io("truncate", &data_path))?;
    Ok(w.cap)
}

/// One `capture_frozen` walk: the data file, the next free offset in it, and the
/// capture being built.
struct Walk<'a> {
    o: &'a CaptureOptions<'a>,
    /// Files whose ctime is at or after this stay out of the next stat cache.
    racy_after: (i64, i64),
    data: File,
    off: u64,
    buf: Vec<u8>,
    cap: Capture,
}

/// The tree being walked: its source, entries so far, the files that may enter
/// the next stat cache, and the first path of every hard-linked inode.
struct TreeWalk<'s> {
    src: &'s Source,
    index: usize,
    entries: Vec<Entry>,
    cacheable: Vec<(String, StatKey, usize)>,
    links: HashMap<(u64, u64), String>,
}

impl Walk<'_> {
    /// Captures one tree, depth first in name order.
    fn tree(&mut self, src: &Source) -> Result<()> {
        let mut t = TreeWalk {
            src,
            index: self.cap.manifest.trees.len(),
            entries: Vec::new(),
            cacheable: Vec::new(),
            links: HashMap::new(),
        };
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let full = src.path.join(&rel);
            let meta = fs::symlink_metadata(&full).map_err(io("stat", &full))?;
            let ft = meta.file_type();
            let mut e = Entry {
                path: rel.to_string_lossy().into_owned(),
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
                self.file(&mut t, &rel, &full, &meta, &mut e)?;
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
            t.entries.push(e);
        }
        self.cap.manifest.trees.push(Tree {
            role: src.role.to_string(),
            dest: src.dest.clone(),
            source: src.path.clone(),
            entries: t.entries,
        });
        self.cap.cacheable.push(t.cacheable);
        Ok(())
    }

    /// A regular file: a hard link to one seen before, an unchanged file (per
    /// the stat cache) left for `finish`, or its bytes read now.
    fn file(
        &mut self,
        t: &mut TreeWalk,
        rel: &Path,
        full: &Path,
        meta: &fs::Metadata,
        e: &mut Entry,
    ) -> Result<()> {
        if meta.nlink() > 1 {
            if let Some(first) = t.links.get(&(meta.dev(), meta.ino())) {
                e.kind = Kind::Hardlink;
                e.target = Some(first.clone());
                return Ok(());
            }
            t.links.insert((meta.dev(), meta.ino()), e.path.clone());
        }
        e.kind = Kind::File;
        e.offset = Some(self.off);
        let key = StatKey::of(meta);
        let inner = Path::new(&t.src.dest).join(rel);
        let mapped = self.o.mapped.contains(meta, full, &inner);
        let stats = &mut self.cap.stats;
        stats.files_mapped += mapped as u64;
        let hit = self
            .o
            .cache
            .and_then(|c| c.lookup(&t.src.path, &e.path))
            .filter(|c| !mapped && c.key == key);
        let n = if let Some(c) = hit {
            self.cap.pending.push(Pending {
                full: full.to_path_buf(),
                key,
                offset: self.off,
                prev_offset: c.offset,
                sha256: c.sha256.clone(),
                at: (t.index, t.entries.len()),
            });
            stats.files_unchanged += 1;
            stats.bytes_unchanged += key.size;
            key.size
        } else {
            let n = self.read_into_data(full)?;
            self.cap.stats.files_read_frozen += 1;
            self.cap.stats.bytes_read_frozen += n;
            n
        };
        // Cacheable: not mapped, stable while read, and old enough that a
        // later change cannot keep the same ctime.
        if !mapped && n == key.size && (key.ctime, key.ctime_nsec) < self.racy_after {
            t.cacheable.push((e.path.clone(), key, t.entries.len()));
        }
        e.size = n;
        self.off += n.div_ceil(ALIGN) * ALIGN;
        self.cap.stats.files += 1;
        self.cap.stats.bytes += n;
        Ok(())
    }

    /// Reads the file at `full` into the data file at the current offset;
    /// returns how many bytes it had.
    fn read_into_data(&mut self, full: &Path) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let mut f = File::open(full).map_err(io("open", full))?;
        let mut n = 0u64;
        loop {
            let r = f.read(&mut self.buf).map_err(io("read", full))?;
            if r == 0 {
                return Ok(n);
            }
            self.data
                .write_all_at(&self.buf[..r], self.off + n)
                .map_err(io("write", &self.cap.data_path))?;
            n += r as u64;
        }
    }
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
