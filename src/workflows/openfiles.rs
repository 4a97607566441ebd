//! The files a container's processes hold open (descriptors and mapped files)
//! that live in its root filesystem, recorded at `checkpoint --tag
//! --ignore-rootfs` as path, size and sha256 (the snapshot's `open_files`
//! metadata), and checked before such a snapshot is restored onto a bundle's
//! rootfs: a file that changed since is refused by name before CRIU runs (CRIU
//! itself would fail later with "bad size", or resume on different contents).
//!
//! Reads /proc and the rootfs; writes nothing.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::fsutil::io;
use super::meta::{OpenFile, SnapshotMeta};
use super::{Result, WorkflowError};

/// Paths (relative to `rootfs`) of the regular files that `pids` hold open or
/// have mapped and that are the very files (same device and inode, or same
/// inode for mappings) found at that path under `rootfs`.
pub fn list(rootfs: &Path, pids: &[i32]) -> Vec<String> {
    let mut out = BTreeSet::new();
    let same = |rel: &str, dev: Option<u64>, ino: u64| -> bool {
        fs::metadata(rootfs.join(rel))
            .is_ok_and(|m| m.is_file() && m.ino() == ino && dev.is_none_or(|d| d == m.dev()))
    };
    for pid in pids {
        let fd_dir = PathBuf::from(format!("/proc/{pid}/fd"));
        for e in fs::read_dir(&fd_dir).into_iter().flatten().flatten() {
            let Ok(target) = fs::read_link(e.path()) else {
                continue;
            };
            let Some(rel) = rel_path(&target.to_string_lossy()) else {
                continue;
            };
            // The descriptor itself, not the path: the file may be another one
            // of the same name on another mount (a tmpfs, a volume).
            let Ok(m) = fs::metadata(e.path()) else {
                continue;
            };
            if m.is_file() && same(&rel, Some(m.dev()), m.ino()) {
                out.insert(rel);
            }
        }
        let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for line in maps.lines() {
            // address perms offset dev inode pathname
            let f: Vec<&str> = line.splitn(6, char::is_whitespace).collect();
            let (Some(ino), Some(path)) = (
                f.get(4).and_then(|i| i.parse::<u64>().ok()),
                f.get(5).map(|p| p.trim()),
            ) else {
                continue;
            };
            if ino == 0 {
                continue;
            }
            if let Some(rel) = rel_path(path) {
                if !out.contains(&rel) && same(&rel, None, ino) {
                    out.insert(rel);
                }
            }
        }
    }
    out.into_iter().collect()
}

/// "/a/b" -> "a/b"; None for non-paths ("pipe:[..]", "anon_inode:..") and
/// deleted files.
fn rel_path(p: &str) -> Option<String> {
    if !p.starts_with('/') || p.ends_with(" (deleted)") {
        return None;
    }
    let rel = p.trim_start_matches('/');
    (!rel.is_empty() && !Path::new(rel).components().any(|c| c.as_os_str() == ".."))
        .then(|| rel.to_string())
}

fn sha256_of(p: &Path) -> std::io::Result<(u64, String)> {
    let mut f = fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// The `open_files` record: `[{"path", "size", "sha256"}]` of `paths` under
/// `rootfs` (files gone by now are left out).
pub fn digests(rootfs: &Path, paths: &[String]) -> Vec<OpenFile> {
    paths
        .iter()
        .filter_map(|rel| {
            let (size, sha256) = sha256_of(&rootfs.join(rel)).ok()?;
            Some(OpenFile {
                path: rel.clone(),
                size,
                sha256,
            })
        })
        .collect()
}

/// The root filesystem a bundle's config.json names.
fn bundle_rootfs(bundle: &Path) -> Result<PathBuf> {
    let p = bundle.join("config.json");
    let bytes = fs::read(&p).map_err(io("read", &p))?;
    let cfg: Value = serde_json::from_slice(&bytes).map_err(|source| WorkflowError::Json {
        op: "parse",
        subject: p.display().to_string(),
        source,
    })?;
    let root = cfg["root"]["path"].as_str().unwrap_or("rootfs");
    Ok(if Path::new(root).is_absolute() {
        PathBuf::from(root)
    } else {
        bundle.join(root)
    })
}

/// Refuses a restore onto `bundle`'s rootfs when a file recorded in the
/// snapshot's `open_files` metadata is gone or differs in size or content.
pub fn check(snapshot: &str, meta: &SnapshotMeta, bundle: &Path) -> Result<()> {
    let files = &meta.open_files;
    if files.is_empty() {
        return Ok(());
    }
    let rootfs = bundle_rootfs(bundle)?;
    for f in files {
        let (rel, size, digest) = (f.path.as_str(), f.size, f.sha256.as_str());
        let Some(rel) = rel_path(&format!("/{rel}")) else {
            continue;
        };
        let changed = |detail: String| WorkflowError::OpenFileChanged {
            snapshot: snapshot.to_string(),
            file: format!("/{rel}"),
            rootfs: rootfs.clone(),
            detail,
        };
        let (now_size, now_digest) = match sha256_of(&rootfs.join(&rel)) {
            Ok(x) => x,
            Err(e) => return Err(changed(format!("it cannot be read now: {e}"))),
        };
        if now_size != size {
            return Err(changed(format!("size {size} -> {now_size}")));
        }
        if now_digest != digest {
            return Err(changed(format!(
                "same size, sha256 {} -> {}",
                short_digest(digest),
                short_digest(&now_digest)
            )));
        }
    }
    Ok(())
}

/// The first 12 characters of a digest for a message; a recorded digest is
/// metadata that may hold anything, so no byte index may split a character.
fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_short_or_non_ascii_recorded_digest_does_not_panic() {
        assert_eq!(short_digest("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_digest("abc"), "abc");
        // 11 ASCII bytes then a 2-byte character: byte 12 is inside it.
        assert_eq!(short_digest("0123456789aé"), "0123456789aé");
        let t = tempfile::tempdir().unwrap();
        let rootfs = t.path().join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        fs::write(rootfs.join("f"), b"hello\n").unwrap();
        fs::write(
            t.path().join("config.json"),
            br#"{"root": {"path": "rootfs"}}"#,
        )
        .unwrap();
        let meta: SnapshotMeta = serde_json::from_value(
            json!({"open_files": [{"path": "f", "size": 6, "sha256": "0123456789aébc"}]}),
        )
        .unwrap();
        let e = check("s1", &meta, t.path()).unwrap_err().to_string();
        assert!(e.contains("(same size, sha256 0123456789aébc -> "), "{e}");
    }

    #[test]
    fn a_changed_or_missing_file_is_named() {
        let t = tempfile::tempdir().unwrap();
        let rootfs = t.path().join("rootfs");
        fs::create_dir_all(rootfs.join("data")).unwrap();
        fs::write(rootfs.join("data/f"), b"hello\n").unwrap();
        fs::write(
            t.path().join("config.json"),
            br#"{"root": {"path": "rootfs"}}"#,
        )
        .unwrap();
        let meta = SnapshotMeta {
            open_files: digests(&rootfs, &["data/f".to_string()]),
            ..SnapshotMeta::default()
        };
        check("s1", &meta, t.path()).unwrap();
        fs::write(rootfs.join("data/f"), b"hello, world\n").unwrap();
        let e = check("s1", &meta, t.path()).unwrap_err().to_string();
        assert!(e.starts_with("snapshot s1: file /data/f of "), "{e}");
        assert!(
            e.ends_with("changed since the checkpoint (size 6 -> 13); restore the rootfs or checkpoint again"),
            "{e}"
        );
        fs::write(rootfs.join("data/f"), b"HELLO\n").unwrap();
        let e = check("s1", &meta, t.path()).unwrap_err().to_string();
        assert!(e.contains("(same size, sha256 "), "{e}");
        fs::remove_file(rootfs.join("data/f")).unwrap();
        let e = check("s1", &meta, t.path()).unwrap_err().to_string();
        assert!(e.contains("it cannot be read now"), "{e}");
    }

    #[test]
    fn only_plain_paths_count() {
        assert_eq!(rel_path("/a/b"), Some("a/b".into()));
        assert_eq!(rel_path("pipe:[123]"), None);
        assert_eq!(rel_path("/a (deleted)"), None);
        assert_eq!(rel_path("/../etc"), None);
    }
}
