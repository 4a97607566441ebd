//! The on-disk layout of a store: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/`) plus our private `tmp/`, `cache/`, `lock` and `index.lock`.
//! Owns the OCI JSON types (index, descriptor, manifest), media types and
//! annotation keys, creating and recognising a store, and rewriting `index.json`
//! atomically. It knows nothing about what the blobs contain.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::blob::{create_temp, sync_dir};
use super::error::{io_err, Result, StoreError};
use super::ids::{BlobDigest, SnapshotId};
use super::util::{create_private_dir, create_private_dir_all, tighten_dir};

pub(crate) const OCI_LAYOUT: &str = "oci-layout";
pub(crate) const INDEX_JSON: &str = "index.json";
pub(crate) const BLOBS: &str = "blobs/sha256";
pub(crate) const TMP: &str = "tmp";
pub(crate) const CACHE: &str = "cache";
pub(crate) const LOCK: &str = "lock";
pub(crate) const INDEX_LOCK: &str = "index.lock";
pub(crate) const OCI_LAYOUT_CONTENT: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
/// Major version of the store layout, kept as an index.json annotation.
pub(crate) const STORE_VERSION: &str = "1";

pub(crate) const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const ARTIFACT_TYPE: &str = "application/vnd.stasis.checkpoint.v1+json";
pub(crate) const MT_CONFIG: &str = "application/vnd.stasis.checkpoint.config.v1+json";
pub(crate) const MT_PAGE_TABLE: &str = "application/vnd.stasis.pagetable.v1";
pub(crate) const MT_FILES: &str = "application/vnd.stasis.files.v1";
pub(crate) const MT_PACK: &str = "application/vnd.stasis.pack.v1";

pub(crate) const A_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub(crate) const A_OCI_CREATED: &str = "org.opencontainers.image.created";
pub(crate) const A_ID: &str = "io.stasis.snapshot.id";
pub(crate) const A_CREATED: &str = "io.stasis.created";
pub(crate) const A_CONTAINER: &str = "io.stasis.container";
pub(crate) const A_IMAGE_BYTES: &str = "io.stasis.image-bytes";
pub(crate) const A_ADDED_BYTES: &str = "io.stasis.added-bytes";
pub(crate) const A_FILE: &str = "io.stasis.file";
/// Manifest only: the tags given when the snapshot was ingested, comma-separated.
pub(crate) const A_TAGS: &str = "io.stasis.tags";
pub(crate) const A_STORE_VERSION: &str = "io.stasis.store.version";
/// Where a snapshot came from, as this store recorded it on its own root
/// descriptor in index.json: `local` (ingested from a checkpoint made here) or
/// `imported`. Never taken from an archive or a manifest (FORMAT.md, trust model).
pub(crate) const A_ORIGIN: &str = "io.stasis.origin";
pub(crate) const ORIGIN_LOCAL: &str = "local";
pub(crate) const ORIGIN_IMPORTED: &str = "imported";

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

impl Descriptor {
    pub(crate) fn new(media_type: &str, digest: &BlobDigest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            artifact_type: None,
            annotations: BTreeMap::new(),
        }
    }

    pub(crate) fn blob(&self) -> Option<BlobDigest> {
        BlobDigest::parse(&self.digest)
    }

    pub(crate) fn snapshot_id(&self) -> Option<SnapshotId> {
        self.annotations
            .get(A_ID)
            .and_then(|s| SnapshotId::parse(s))
    }

    pub(crate) fn tag(&self) -> Option<&str> {
        self.annotations.get(A_REF_NAME).map(String::as_str)
    }

    pub(crate) fn annotation(&self, key: &str) -> &str {
        self.annotations.get(key).map(String::as_str).unwrap_or("")
    }
}

/// `index.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    pub(crate) schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) media_type: Option<String>,
    #[serde(default)]
    pub(crate) manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

impl Index {
    pub(crate) fn empty() -> Index {
        let mut annotations = BTreeMap::new();
        annotations.insert(A_STORE_VERSION.to_string(), STORE_VERSION.to_string());
        Index {
            schema_version: 2,
            media_type: Some(MT_INDEX.to_string()),
            manifests: Vec::new(),
            annotations,
        }
    }
}

/// A snapshot's OCI image manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub(crate) schema_version: u32,
    pub(crate) media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) artifact_type: Option<String>,
    pub(crate) config: Descriptor,
    #[serde(default)]
    pub(crate) layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// Paths inside a store root.
#[derive(Clone, Debug)]
pub(crate) struct Paths {
    pub(crate) root: PathBuf,
}

impl Paths {
    pub(crate) fn blobs(&self) -> PathBuf {
        self.root.join(BLOBS)
    }
    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join(TMP)
    }
    pub(crate) fn cache(&self) -> PathBuf {
        self.root.join(CACHE)
    }
    pub(crate) fn index(&self) -> PathBuf {
        self.root.join(INDEX_JSON)
    }
}

/// Creates the layout in a missing or empty directory, or checks that an existing
/// non-empty one is a store (and adds private directories it lacks).
/// True when `root` does not exist or is an empty directory (no store there yet).
pub(crate) fn is_missing_or_empty(root: &Path) -> Result<bool> {
    match fs::read_dir(root) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        // Not a directory, unreadable: `open_or_create` says what is wrong.
        Err(_) => Ok(false),
    }
}

pub(crate) fn open_or_create(root: &Path) -> Result<()> {
    let entries: Vec<String> = match fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Parents as the system makes them, the store itself private.
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io_err("create parent directory", parent))?;
            }
            match create_private_dir(root) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_err("create store directory", root)(e))
                }
                _ => {}
            }
            Vec::new()
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            return Err(StoreError::NotAStore {
                path: root.to_path_buf(),
                reason: "it is not a directory".into(),
            })
        }
        Err(e) => return Err(io_err("read directory", root)(e)),
    };
    let p = Paths {
        root: root.to_path_buf(),
    };
    // Empty, or left half-created by a crash or by a concurrent `open`: (finish)
    // create it.
    let ours = |n: &String| {
        [
            OCI_LAYOUT, INDEX_JSON, "blobs", TMP, CACHE, LOCK, INDEX_LOCK,
        ]
        .contains(&n.as_str())
    };
    // Blobs without index.json are damage (a lost index), not a half-created
    // store: an empty index would make gc delete every snapshot.
    if entries.iter().all(ours)
        && !(root.join(OCI_LAYOUT).exists() && p.index().exists())
        && !has_blobs(&p)
    {
        tighten(&p)?;
        for d in [p.blobs(), p.tmp(), p.cache()] {
            create_private_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
        // Two processes may create the same store at once: only one writes.
        let _lock = index_lock(root)?;
        if !root.join(OCI_LAYOUT).exists() {
            write_atomic(&p, &root.join(OCI_LAYOUT), OCI_LAYOUT_CONTENT.as_bytes())?;
        }
        if !p.index().exists() {
            write_index(&p, &Index::empty())?;
        }
        return Ok(());
    }
    let layout = root.join(OCI_LAYOUT);
    let content = match fs::read(&layout) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut shown: Vec<_> = entries.into_iter().take(5).collect();
            shown.sort();
            return Err(StoreError::NotAStore {
                path: root.to_path_buf(),
                reason: format!(
                    "the directory is not empty and has no oci-layout file (it holds {})",
                    shown.join(", ")
                ),
            });
        }
        Err(e) => return Err(io_err("read", &layout)(e)),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&content).map_err(|e| StoreError::NotAStore {
            path: root.to_path_buf(),
            reason: format!("oci-layout is not JSON: {e}"),
        })?;
    if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(StoreError::NotAStore {
            path: root.to_path_buf(),
            reason: "oci-layout does not declare imageLayoutVersion 1.0.0".into(),
        });
    }
    for d in [p.blobs(), p.tmp(), p.cache()] {
        if !d.is_dir() {
            create_private_dir_all(&d).map_err(io_err("create directory", &d))?;
        }
    }
    tighten(&p)?;
    match fs::metadata(p.index()) {
        Ok(_) => {
            // An unparseable index.json is damage that verify reports and
            // `verify --rebuild-index` fixes: the store must still open.
            let Ok(index) = read_index(&p) else {
                return Ok(());
            };
            if let Some(v) = index.annotations.get(A_STORE_VERSION) {
                if v != STORE_VERSION {
                    return Err(StoreError::NotAStore {
                        path: root.to_path_buf(),
                        reason: format!("store layout version {v} is not supported (this stasis reads {STORE_VERSION})"),
                    });
                }
            }
        }
        // A crash during creation: finish it. With blobs present index.json was
        // lost: left missing, so every reader reports it (`read_index`).
        Err(e) if e.kind() == io::ErrorKind::NotFound && !has_blobs(&p) => {
            let _lock = index_lock(root)?;
            if !p.index().exists() {
                write_index(&p, &Index::empty())?;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("stat", &p.index())(e)),
    }
    Ok(())
}

/// Whether `blobs/sha256/` holds at least one entry.
pub(crate) fn has_blobs(p: &Paths) -> bool {
    fs::read_dir(p.blobs()).is_ok_and(|mut rd| rd.next().is_some())
}

/// The hint every reader gives for a missing or unparseable index.json.
pub(crate) const REBUILD_HINT: &str =
    "`stasis snapshot verify --rebuild-index` rebuilds it from the snapshot manifests in blobs/";

/// Makes the store's top-level directories private (0700) when an older stasis
/// left them 0755: a few stats on every open, a chmod only the first time. What
/// lies below needs no walk: nobody else can reach it through a 0700 directory.
fn tighten(p: &Paths) -> Result<()> {
    let blobs = p.root.join("blobs");
    for d in [&p.root, &blobs, &p.blobs(), &p.tmp(), &p.cache()] {
        match tighten_dir(d) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("make private (chmod 0700)", d)(e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn index_lock(root: &Path) -> Result<super::lock::Flock> {
    super::lock::Flock::acquire(
        &root.join(INDEX_LOCK),
        super::lock::Mode::Exclusive,
        super::DEFAULT_LOCK_TIMEOUT,
        "it is creating the store",
    )
}

/// Reads index.json. Missing while blobs exist, or unparseable, it is damage:
/// the error says how to rebuild it (gc, prune and every other reader refuse).
pub(crate) fn read_index(p: &Paths) -> Result<Index> {
    let path = p.index();
    let damaged = |reason: String| StoreError::IndexDamaged {
        path: p.root.clone(),
        reason,
    };
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound && has_blobs(p) => {
            return Err(damaged(
                "index.json is missing but blobs/ holds blobs".into(),
            ))
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| damaged(format!("index.json cannot be parsed ({e})")))?;
    if index.schema_version != 2 {
        return Err(StoreError::Format {
            what: "index",
            path,
            reason: format!("schemaVersion {} (expected 2)", index.schema_version),
        });
    }
    Ok(index)
}

/// Rewrites `index.json`: temp file in `tmp/`, fsync, rename, fsync the root. The
/// caller holds the index lock.
pub(crate) fn write_index(p: &Paths, index: &Index) -> Result<()> {
    let path = p.index();
    let mut bytes = serde_json::to_vec_pretty(index).map_err(|source| StoreError::Json {
        op: "serialize",
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(p, &path, &bytes)
}

fn write_atomic(p: &Paths, path: &Path, bytes: &[u8]) -> Result<()> {
    let (mut f, tmp) = create_temp(&p.tmp(), "index")?;
    let res = (|| {
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        super::error::fault_point("index-rename")?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_dir(&p.root)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}
