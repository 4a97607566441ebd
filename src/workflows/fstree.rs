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

pub const DATA_FILE: &str = "fsdata-0.bin";
pub const MANIFEST_FILE: &str = "fs-manifest.json";
const ALIGN: u64 = 4096;

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
    let c = match std::ffi::CString::new(path.as_os_str().as_bytes()) {
        Ok(c) => c,
        Err(_) => return Vec::new(),
    };
    let mut buf = vec![0u8; 4096];
    // SAFETY: llistxattr writes at most buf.len() bytes into buf.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for name in buf[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut val = vec![0u8; 65536];
        // SAFETY: lgetxattr writes at most val.len() bytes into val.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m < 0 {
            continue;
        }
        out.push((
            String::from_utf8_lossy(name).into_owned(),
            base64::engine::general_purpose::STANDARD.encode(&val[..m as usize]),
        ));
    }
    out
}

/// Walks `sources` and writes `fsdata-0.bin` and `fs-manifest.json` into `out`.
pub fn capture(sources: &[Source], out: &Path) -> Result<Manifest> {
    let data_path = out.join(DATA_FILE);
    let mut data = File::create(&data_path).map_err(io("create", &data_path))?;
    let mut off = 0u64;
    let mut manifest = Manifest {
        version: 1,
        trees: Vec::new(),
    };
    let mut buf = vec![0u8; 1 << 20];
    for src in sources {
        let mut entries = Vec::new();
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
                let mut f = File::open(&full).map_err(io("open", &full))?;
                let mut n = 0u64;
                loop {
                    let r = f.read(&mut buf).map_err(io("read", &full))?;
                    if r == 0 {
                        break;
                    }
                    data.write_all(&buf[..r]).map_err(io("write", &data_path))?;
                    n += r as u64;
                }
                e.size = n;
                off += n;
                let pad = (ALIGN - off % ALIGN) % ALIGN;
                if pad > 0 {
                    data.write_all(&vec![0u8; pad as usize])
                        .map_err(io("write", &data_path))?;
                    off += pad;
                }
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
        manifest.trees.push(Tree {
            role: src.role.to_string(),
            dest: src.dest.clone(),
            source: src.path.clone(),
            entries,
        });
    }
    data.sync_all().map_err(io("fsync", &data_path))?;
    let mpath = out.join(MANIFEST_FILE);
    let json = serde_json::to_vec(&manifest).map_err(|e| WorkflowError::Io {
        op: "encode",
        path: mpath.clone(),
        source: std::io::Error::other(e),
    })?;
    fs::write(&mpath, json).map_err(io("write", &mpath))?;
    Ok(manifest)
}

pub fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST_FILE);
    if !p.exists() {
        return Ok(None);
    }
    let bytes = fs::read(&p).map_err(io("read", &p))?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| WorkflowError::Io {
        op: "parse",
        path: p.clone(),
        source: std::io::Error::other(e),
    })?;
    if m.version != 1 {
        return Err(WorkflowError::Io {
            op: "read",
            path: p,
            source: std::io::Error::other(format!(
                "unknown filesystem manifest version {}",
                m.version
            )),
        });
    }
    Ok(Some(m))
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
        // SAFETY: valid path, name and value buffers for the duration of the call.
        unsafe {
            libc::lsetxattr(c.as_ptr(), ck.as_ptr(), val.as_ptr().cast(), val.len(), 0);
        }
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

/// Rebuilds tree number `index` of `manifest` under `dest` from `data` (the
/// verified `fsdata-0.bin`). Directories' metadata is applied last (deepest first)
/// so mtimes and read-only modes stick.
pub fn materialize(manifest: &Manifest, index: usize, data: &Path, dest: &Path) -> Result<()> {
    let tree = manifest.trees.get(index).ok_or_else(|| WorkflowError::Io {
        op: "materialize",
        path: dest.to_path_buf(),
        source: std::io::Error::other(format!("no tree {index} in the manifest")),
    })?;
    let mut src = File::open(data).map_err(io("open", data))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut dirs = Vec::new();
    fs::create_dir_all(dest).map_err(io("create", dest))?;
    for e in &tree.entries {
        let p = safe_join(dest, &e.path)?;
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
                let t = safe_join(dest, e.target.as_deref().unwrap_or(""))?;
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

    #[test]
    fn manifest_paths_cannot_escape() {
        assert!(safe_join(Path::new("/x"), "../etc").is_err());
        assert!(safe_join(Path::new("/x"), "/etc").is_err());
        assert!(safe_join(Path::new("/x"), "a/b").is_ok());
    }
}
