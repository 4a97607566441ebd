//! Rebuilding a captured tree from a verified `fsdata-0.bin` and its manifest,
//! sparse where the data is zero pages, never through a symlink.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use base64::Engine;
use nix::sys::stat::SFlag;

use super::manifest::{check_extents, safe_join};
use super::{Entry, Kind, Manifest, ALIGN};
use crate::workflows::fsutil::{apply_meta, io, make_node, Meta};
use crate::workflows::{Result, WorkflowError};

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
            Kind::File => write_file(&mut src, data, e, &p, &mut buf)?,
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
                    Kind::Char => SFlag::S_IFCHR,
                    Kind::Block => SFlag::S_IFBLK,
                    Kind::Fifo => SFlag::S_IFIFO,
                    _ => SFlag::S_IFSOCK,
                };
                make_node(&p, kind, e.mode, e.rdev)?;
            }
        }
        apply_meta(&p, &meta(e))?;
    }
    for (p, e) in dirs.iter().rev() {
        apply_meta(p, &meta(e))?;
    }
    Ok(())
}

/// Writes entry `e`'s bytes from `src` (the data file at `data`) into a new
/// file `p`, leaving zero pages as holes.
fn write_file(src: &mut File, data: &Path, e: &Entry, p: &Path, buf: &mut [u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(io("create", p))?;
    src.seek(SeekFrom::Start(e.offset.unwrap_or(0)))
        .map_err(io("seek", data))?;
    let page = ALIGN as usize;
    let mut left = e.size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).map_err(io("read", data))?;
        for chunk in buf[..n].chunks(page) {
            if chunk.len() == page && chunk.iter().all(|b| *b == 0) {
                f.seek(SeekFrom::Current(page as i64))
                    .map_err(io("seek", p))?;
            } else {
                f.write_all(chunk).map_err(io("write", p))?;
            }
        }
        left -= n as u64;
    }
    f.set_len(e.size).map_err(io("truncate", p))
}

/// The metadata a manifest entry records (its mtime doubles as the atime); an
/// xattr value that is not base64 is left out.
fn meta(e: &Entry) -> Meta {
    let xattrs = e
        .xattrs
        .iter()
        .filter_map(|(k, v)| {
            let val = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
            Some((k.into(), val))
        })
        .collect();
    Meta {
        uid: e.uid,
        gid: e.gid,
        mode: e.mode,
        symlink: e.kind == Kind::Symlink,
        atime: (e.mtime, e.mtime_nsec),
        mtime: (e.mtime, e.mtime_nsec),
        xattrs,
    }
}
