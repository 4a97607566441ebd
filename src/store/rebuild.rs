//! Rebuilding a lost or unparseable index.json from the snapshot manifests found
//! in `blobs/`: every blob that hashes to its name and parses as a stasis
//! checkpoint manifest becomes a snapshot again, with the tags its manifest
//! recorded at ingest (`io.stasis.tags`; a tag goes to the newest snapshot that
//! recorded it). Tags set or removed later with `snapshot tag`/`rm` are not in
//! any manifest and are not restored. No manifest records a snapshot's origin
//! (`io.stasis.origin` lives in index.json only), so every rebuilt snapshot has
//! origin `unknown` and is treated as foreign. A damaged index.json is kept
//! beside the new one. Runs under the exclusive store lock.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use super::catalog::{self, normalize_tag};
use super::error::{io_err, Result, StoreError};
use super::ids::{BlobDigest, SnapshotId};
use super::layout::{self, Descriptor, Index, Manifest};
use super::Store;

/// Manifests are a few KiB; larger blobs are not read.
const MAX_MANIFEST: u64 = 4 << 20;

/// What `Store::rebuild_index` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    /// Every snapshot now in index.json, oldest first, with its restored tags.
    pub snapshots: Vec<(SnapshotId, Vec<String>)>,
    /// Where the unparseable index.json was moved, if there was one.
    pub kept_damaged: Option<PathBuf>,
}

struct Found {
    digest: BlobDigest,
    size: u64,
    manifest: Manifest,
    /// Every blob it names exists with the size it says.
    complete: bool,
}

impl Found {
    fn created(&self) -> &str {
        self.manifest
            .annotations
            .get(layout::A_CREATED)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// Every intact blob of `blobs/` that is a stasis snapshot manifest, by id.
fn scan(store: &Store) -> Result<BTreeMap<SnapshotId, Vec<Found>>> {
    let blobs = store.blobs();
    let mut out: BTreeMap<SnapshotId, Vec<Found>> = BTreeMap::new();
    let rd = fs::read_dir(&blobs.dir).map_err(io_err("read directory", &blobs.dir))?;
    for e in rd.flatten() {
        let Some(d) = BlobDigest::from_hex(&e.file_name().to_string_lossy()) else {
            continue;
        };
        if !e.metadata().is_ok_and(|m| m.len() <= MAX_MANIFEST) {
            continue;
        }
        let Ok(bytes) = blobs.read_verified(&d, None, "manifest") else {
            continue;
        };
        if bytes.first() != Some(&b'{') {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        if m.media_type != layout::MT_MANIFEST
            || m.artifact_type.as_deref() != Some(layout::ARTIFACT_TYPE)
        {
            continue;
        }
        let Some(id) = m
            .annotations
            .get(layout::A_ID)
            .and_then(|s| SnapshotId::parse(s))
        else {
            continue;
        };
        let complete = std::iter::once(&m.config).chain(&m.layers).all(|l| {
            l.blob()
                .and_then(|b| fs::metadata(blobs.path(&b)).ok())
                .is_some_and(|md| md.len() == l.size)
        });
        out.entry(id).or_default().push(Found {
            digest: d,
            size: bytes.len() as u64,
            manifest: m,
            complete,
        });
    }
    Ok(out)
}

/// The index descriptor of a found manifest (annotations as ingest writes them).
fn root_of(f: &Found) -> Descriptor {
    let mut r = Descriptor::new(layout::MT_MANIFEST, &f.digest, f.size);
    r.artifact_type = Some(layout::ARTIFACT_TYPE.into());
    for k in [
        layout::A_ID,
        layout::A_CREATED,
        layout::A_CONTAINER,
        layout::A_IMAGE_BYTES,
        layout::A_ADDED_BYTES,
    ] {
        if let Some(v) = f.manifest.annotations.get(k) {
            r.annotations.insert(k.to_string(), v.clone());
        }
    }
    r
}

/// Rebuilds index.json; refuses when the current one reads fine.
pub(crate) fn rebuild_index(store: &Store) -> Result<RebuildReport> {
    let paths = &store.paths;
    if let Ok(index) = layout::read_index(paths) {
        return Err(StoreError::Invalid(format!(
            "index.json of store {} is intact ({} entries): nothing to rebuild",
            paths.root.display(),
            index.manifests.len()
        )));
    }
    let found = scan(store)?;
    let mut index = Index::empty();
    // Per snapshot the manifest to keep: complete first, then the newest.
    let mut roots: Vec<(String, Descriptor)> = Vec::new();
    // tag -> (created, root): the newest snapshot that recorded it.
    let mut tags: BTreeMap<String, (String, Descriptor)> = BTreeMap::new();
    for list in found.values() {
        let Some(best) = list
            .iter()
            .max_by(|a, b| (a.complete, a.created()).cmp(&(b.complete, b.created())))
        else {
            continue;
        };
        let root = root_of(best);
        for f in list {
            let recorded = f.manifest.annotations.get(layout::A_TAGS);
            for t in recorded.into_iter().flat_map(|s| s.split(',')) {
                let Ok(t) = normalize_tag(t) else { continue };
                let newer = tags.get(&t).is_none_or(|(c, _)| c.as_str() < f.created());
                if newer {
                    tags.insert(t, (f.created().to_string(), root.clone()));
                }
            }
        }
        roots.push((best.created().to_string(), root));
    }
    roots.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, r) in &roots {
        catalog::add_root(&mut index, r);
    }
    for (t, (_, r)) in &tags {
        catalog::set_tag(&mut index, r, t);
    }
    let _lock = store.locks.index()?;
    let mut kept_damaged = None;
    let current = paths.index();
    if current.exists() {
        let keep = paths.root.join(format!("{}.damaged", layout::INDEX_JSON));
        fs::rename(&current, &keep).map_err(io_err("keep the damaged index as", &keep))?;
        kept_damaged = Some(keep);
    }
    layout::write_index(paths, &index)?;
    let snapshots = catalog::entries(&index)
        .into_iter()
        .map(|e| (e.id, e.tags))
        .collect();
    Ok(RebuildReport {
        snapshots,
        kept_damaged,
    })
}
