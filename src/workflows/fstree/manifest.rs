//! `fs-manifest.json`: the types of a captured filesystem (trees and their
//! entries), reading and parsing them (bounded in size), and the bounds checks a
//! manifest from the store must pass before anything is written from it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MANIFEST_FILE;
use crate::workflows::fsutil::io;
use crate::workflows::{Result, WorkflowError};

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

/// A path from the manifest must stay inside the tree.
pub(super) fn safe_join(root: &Path, rel: &str) -> Result<PathBuf> {
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

/// Every file's bytes must lie inside the data file, and the files of a tree
/// (written at disjoint offsets by capture) cannot add up to more than it holds: a
/// hostile manifest cannot make restore write more than its data file's size.
pub(super) fn check_extents(tree: &Tree, data_len: u64, data: &Path) -> Result<()> {
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
