//! File-level diff of two filesystem manifests (`snapshot diff`).

use serde::Serialize;

use super::{Entry, Kind, Manifest};

/// One entry that differs between two manifests.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct FileDelta {
    /// Mount destination of the tree ("/" for the rootfs).
    pub tree: String,
    /// Path inside the tree.
    pub path: String,
    /// "added", "removed" or "changed".
    pub change: &'static str,
    /// For "changed": what changed ("content", "type", "metadata").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub what: Option<&'static str>,
    pub kind: Kind,
    pub size_a: Option<u64>,
    pub size_b: Option<u64>,
}

/// Entries added, removed or changed from `a` to `b`, tree by tree (trees matched
/// by role and destination), sorted by tree then path. Content is compared by
/// sha256 when both manifests carry it, else by size and mtime. A directory whose
/// only change is its mtime (a child came or went) is not listed.
pub fn diff_manifests(a: &Manifest, b: &Manifest) -> Vec<FileDelta> {
    let mut out = Vec::new();
    let mut keys: Vec<(&str, &str)> = a
        .trees
        .iter()
        .chain(&b.trees)
        .map(|t| (t.role.as_str(), t.dest.as_str()))
        .collect();
    keys.sort();
    keys.dedup();
    let empty = Vec::new();
    for (role, dest) in keys {
        let entries = |m: &'_ Manifest| -> std::collections::BTreeMap<String, Entry> {
            m.trees
                .iter()
                .find(|t| t.role == role && t.dest == dest)
                .map_or(&empty, |t| &t.entries)
                .iter()
                .map(|e| (e.path.clone(), e.clone()))
                .collect()
        };
        let (ea, eb) = (entries(a), entries(b));
        let size = |e: &Entry| (e.kind == Kind::File).then_some(e.size);
        let mut paths: Vec<&String> = ea.keys().chain(eb.keys()).collect();
        paths.sort();
        paths.dedup();
        for p in paths {
            let (x, y) = (ea.get(p), eb.get(p));
            let (change, what) = match (x, y) {
                (None, Some(_)) => ("added", None),
                (Some(_), None) => ("removed", None),
                (Some(x), Some(y)) => match entry_change(x, y) {
                    Some(w) => ("changed", Some(w)),
                    None => continue,
                },
                (None, None) => continue,
            };
            let kind = y.or(x).map(|e| e.kind.clone()).unwrap_or(Kind::File);
            out.push(FileDelta {
                tree: dest.to_string(),
                path: p.clone(),
                change,
                what,
                kind,
                size_a: x.and_then(size),
                size_b: y.and_then(size),
            });
        }
    }
    out
}

fn entry_change(x: &Entry, y: &Entry) -> Option<&'static str> {
    if x.kind != y.kind {
        return Some("type");
    }
    let content = match x.kind {
        Kind::File => {
            x.size != y.size
                || match (&x.sha256, &y.sha256) {
                    (Some(a), Some(b)) => a != b,
                    _ => (x.mtime, x.mtime_nsec) != (y.mtime, y.mtime_nsec),
                }
        }
        Kind::Symlink | Kind::Hardlink => x.target != y.target,
        Kind::Char | Kind::Block => x.rdev != y.rdev,
        Kind::Dir | Kind::Fifo | Kind::Socket => false,
    };
    if content {
        return Some("content");
    }
    let meta = (x.mode, x.uid, x.gid, &x.xattrs) != (y.mode, y.uid, y.gid, &y.xattrs)
        || (x.kind != Kind::Dir && (x.mtime, x.mtime_nsec) != (y.mtime, y.mtime_nsec));
    meta.then_some("metadata")
}
