//! Export and import of single snapshots as OCI image layout tars. Export streams a
//! snapshot's blobs (checking each digest on the way out) and an index.json into a
//! temp file renamed into place at the end. Import is hostile-input code: it
//! accepts only regular files and directories at known paths, stages and hashes
//! every blob in `tmp/`, verifies every snapshot completely (every page, every
//! file) and only then publishes blobs and index.json (replacing a damaged copy
//! of a blob already in the store). A rejected file leaves the store as it was.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::blob::{is_intact, sync_dir, BlobDir, HashingReader};
use super::catalog::{self, normalize_tag};
use super::error::{io_err, Result, StoreError};
use super::format::limits::{MAX_IMPORT_BLOBS, MAX_JSON};
use super::ids::{BlobDigest, SnapshotId};
use super::layout::{self, Descriptor, Index, Manifest};
use super::util::{create_private_dir, printable, PRIVATE_FILE};
use super::verify::{Checker, Level};
use super::Store;

fn tar_header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

/// What an export writes: a snapshot's index entry, manifest, and the tag it was
/// named by (recorded in the archive's index.json).
struct ExportSource {
    entry: catalog::Entry,
    manifest: Manifest,
    tag: Option<String>,
}

fn export_source(store: &Store, name_or_id: &str) -> Result<ExportSource> {
    let index = store.read_index()?;
    let id = catalog::resolve(&index, name_or_id).map_err(|e| e.in_store(store.root()))?;
    let entry = store.entry(&id)?;
    let tag = normalize_tag(name_or_id)
        .ok()
        .filter(|t| entry.tags.contains(t));
    let manifest = store.manifest(&id)?;
    Ok(ExportSource {
        entry,
        manifest,
        tag,
    })
}

/// Streams the archive to `w` (a pipe, say); `label` names it in errors. A failed
/// export leaves a truncated stream, which import refuses.
pub(crate) fn export_to(
    store: &Store,
    name_or_id: &str,
    w: &mut dyn Write,
    label: &Path,
) -> Result<()> {
    let src = export_source(store, name_or_id)?;
    let w = write_archive(store, &src, w, label)?;
    w.flush().map_err(io_err("write", label))
}

pub(crate) fn export(store: &Store, name_or_id: &str, out: &Path) -> Result<()> {
    let src = export_source(store, name_or_id)?;
    let file_name = out
        .file_name()
        .ok_or_else(|| StoreError::Destination {
            path: out.to_path_buf(),
            reason: "has no file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = parent.join(format!(
        ".{file_name}.stasis-partial-{}",
        std::process::id()
    ));
    // The archive holds process memory: root's alone, like the store.
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    let res = (|| -> Result<()> {
        let w = write_archive(store, &src, BufWriter::with_capacity(1 << 20, f), &tmp)?;
        let f = w
            .into_inner()
            .map_err(|e| io_err("write", &tmp)(e.into_error()))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, out).map_err(io_err("rename into place", out))?;
        sync_dir(&parent)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Writes the OCI layout tar of `src` to `w` and returns `w`; `tmp` names the
/// destination in errors.
fn write_archive<W: Write>(store: &Store, src: &ExportSource, w: W, tmp: &Path) -> Result<W> {
    let (entry, manifest, tag) = (&src.entry, &src.manifest, &src.tag);
    let mut b = tar::Builder::new(w);
    let tar_err = io_err("write", tmp);
    let mut h = tar_header(
        layout::OCI_LAYOUT_CONTENT.len() as u64,
        0o644,
        tar::EntryType::Regular,
    );
    b.append_data(
        &mut h,
        layout::OCI_LAYOUT,
        layout::OCI_LAYOUT_CONTENT.as_bytes(),
    )
    .map_err(tar_err)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar_header(0, 0o755, tar::EntryType::Directory);
        b.append_data(&mut h, dir, io::empty())
            .map_err(io_err("write", tmp))?;
    }
    // Data first, the manifest after what it refers to, index.json last.
    let mut descs: Vec<&Descriptor> = manifest.layers.iter().collect();
    descs.push(&manifest.config);
    let mdesc = entry.descriptor.clone();
    descs.push(&mdesc);
    let blobs = store.blobs();
    for d in descs {
        let digest = d.blob().ok_or_else(|| StoreError::Format {
            what: "manifest",
            path: store.paths.root.clone(),
            reason: format!("malformed digest {:?}", d.digest),
        })?;
        let path = blobs.path(&digest);
        let f = blobs.open(&digest)?;
        let len = f.metadata().map_err(io_err("stat", &path))?.len();
        if len != d.size {
            return Err(StoreError::Format {
                what: "blob",
                path,
                reason: format!("{len} bytes, its descriptor says {}", d.size),
            });
        }
        let mut r = HashingReader::new(BufReader::with_capacity(1 << 20, f));
        let mut h = tar_header(len, 0o444, tar::EntryType::Regular);
        b.append_data(&mut h, format!("blobs/sha256/{}", digest.to_hex()), &mut r)
            .map_err(io_err("write", tmp))?;
        if r.count != len || BlobDigest::from_hasher(r.hasher) != digest {
            return Err(StoreError::Format {
                what: "blob",
                path,
                reason: "content does not match its digest; run `stasis snapshot verify`".into(),
            });
        }
    }
    let mut root = entry.descriptor.clone();
    // The origin is this store's record; the importing store sets its own.
    root.annotations.remove(layout::A_ORIGIN);
    if let Some(t) = &tag {
        root.annotations
            .insert(layout::A_REF_NAME.into(), t.clone());
    }
    let mut idx = Index::empty();
    idx.manifests.push(root);
    let bytes = serde_json::to_vec_pretty(&idx).map_err(|source| StoreError::Json {
        op: "serialize index for",
        path: tmp.to_path_buf(),
        source,
    })?;
    let mut h = tar_header(bytes.len() as u64, 0o644, tar::EntryType::Regular);
    b.append_data(&mut h, layout::INDEX_JSON, &bytes[..])
        .map_err(io_err("write", tmp))?;
    b.into_inner().map_err(io_err("write", tmp))
}

/// Where an accepted tar entry goes.
enum EntryKind {
    Dir,
    Layout,
    Index,
    Blob(BlobDigest),
}

/// Accepts only the paths an OCI layout has; refuses absolute paths and `..`.
fn classify(path: &str) -> std::result::Result<EntryKind, String> {
    if path.starts_with('/') {
        return Err(format!("entry {path:?} has an absolute path"));
    }
    let p = path.trim_end_matches('/');
    let p = p.strip_prefix("./").unwrap_or(p);
    if p.split('/').any(|c| c == "..") {
        return Err(format!("entry {path:?} climbs out of the archive (..)"));
    }
    match p {
        "" | "." | "blobs" | "blobs/sha256" => Ok(EntryKind::Dir),
        "oci-layout" => Ok(EntryKind::Layout),
        "index.json" => Ok(EntryKind::Index),
        _ => p
            .strip_prefix("blobs/sha256/")
            .and_then(BlobDigest::from_hex)
            .map(EntryKind::Blob)
            .ok_or_else(|| format!("unexpected entry {path:?} (an OCI layout holds oci-layout, index.json and blobs/sha256/<digest>)")),
    }
}

/// Removes the staging directory however import ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

static STAGING: AtomicU64 = AtomicU64::new(0);

/// A tar error as text: the tar crate quotes header fields it cannot parse, which
/// in a file that is not a tar (a zstd file, say) are raw binary bytes.
fn tar_error(e: &io::Error) -> String {
    printable(&e.to_string())
}

pub(crate) fn import(store: &Store, file: &Path) -> Result<Vec<SnapshotId>> {
    let f = File::open(file).map_err(io_err("open", file))?;
    import_from(store, f, file)
}

/// Imports the archive read from `r` (a file, or a pipe: it is read once, in
/// order); `file` names it in errors.
pub(crate) fn import_from(store: &Store, r: impl Read, file: &Path) -> Result<Vec<SnapshotId>> {
    let reject = |reason: String| StoreError::ImportRejected {
        path: file.to_path_buf(),
        reason,
    };
    let dir = store.paths.tmp().join(format!(
        "import-{}-{}",
        std::process::id(),
        STAGING.fetch_add(1, Ordering::Relaxed)
    ));
    create_private_dir(&dir).map_err(io_err("create directory", &dir))?;
    let staging = Staging(dir);
    let staged = BlobDir::new(staging.0.clone());

    // 1. Unpack blobs into staging, hashing each.
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, r));
    let mut layout_json: Option<Vec<u8>> = None;
    let mut index_json: Option<Vec<u8>> = None;
    let mut sizes: HashMap<BlobDigest, u64> = HashMap::new();
    // Raw entries: GNU long names, pax headers and sparse files are not part of
    // the export format; in raw mode they arrive as entries of their own type and
    // are refused below instead of being buffered whole by the tar crate.
    let entries = ar
        .entries()
        .map_err(|e| reject(format!("not a tar file: {}", tar_error(&e))))?
        .raw(true);
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            reject(format!(
                "not a tar file, or a truncated or malformed one: {}",
                tar_error(&e)
            ))
        })?;
        let raw = entry.path_bytes().into_owned();
        let path =
            String::from_utf8(raw).map_err(|_| reject("an entry name is not UTF-8".into()))?;
        let kind = classify(&path).map_err(&reject)?;
        let et = entry.header().entry_type();
        let is_dir = et == tar::EntryType::Directory;
        let is_file = et == tar::EntryType::Regular || et == tar::EntryType::Continuous;
        let type_name = match et {
            tar::EntryType::Symlink => "a symlink",
            tar::EntryType::Link => "a hard link",
            tar::EntryType::Char | tar::EntryType::Block => "a device",
            tar::EntryType::Fifo => "a fifo",
            tar::EntryType::Directory => "a directory",
            _ if is_file => "a regular file",
            _ => "of an unsupported type",
        };
        match (&kind, is_dir, is_file) {
            (EntryKind::Dir, true, _) => continue,
            (EntryKind::Dir, _, _) | (_, _, false) => {
                return Err(reject(format!(
                    "entry {path:?} is {type_name}; only regular files and directories are accepted"
                )))
            }
            _ => {}
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| reject(format!("entry {path:?}: bad size: {}", tar_error(&e))))?;
        match kind {
            EntryKind::Layout | EntryKind::Index => {
                if size > MAX_JSON {
                    return Err(reject(format!("{path} is {size} bytes, too large")));
                }
                let mut b = Vec::with_capacity(size as usize);
                (&mut entry).take(size).read_to_end(&mut b).map_err(|e| {
                    reject(format!(
                        "truncated or malformed tar at {path}: {}",
                        tar_error(&e)
                    ))
                })?;
                if b.len() as u64 != size {
                    return Err(reject(format!("truncated: {path} is cut short")));
                }
                let slot = if matches!(kind, EntryKind::Layout) {
                    &mut layout_json
                } else {
                    &mut index_json
                };
                if slot.replace(b).is_some() {
                    return Err(reject(format!("{path} appears twice")));
                }
            }
            EntryKind::Blob(d) => {
                if sizes.contains_key(&d) {
                    return Err(reject(format!("blob {d} appears twice")));
                }
                if sizes.len() >= MAX_IMPORT_BLOBS {
                    return Err(reject(format!(
                        "more than {MAX_IMPORT_BLOBS} blobs; no snapshot has that many"
                    )));
                }
                let target = staged.path(&d);
                let out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(PRIVATE_FILE)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                let mut w = BufWriter::with_capacity(1 << 20, out);
                let mut r = HashingReader::new((&mut entry).take(size));
                io::copy(&mut r, &mut w).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::InvalidData
                    | io::ErrorKind::InvalidInput => reject(format!(
                        "truncated or malformed tar in blob {d}: {}",
                        tar_error(&e)
                    )),
                    _ => io_err("write", &target)(e),
                })?;
                if r.count != size {
                    return Err(reject(format!(
                        "truncated: blob {d} has {} of {size} bytes",
                        r.count
                    )));
                }
                let got = BlobDigest::from_hasher(r.hasher);
                if got != d {
                    return Err(reject(format!(
                        "digest mismatch: blob {d} holds content with digest {got}"
                    )));
                }
                let out = w
                    .into_inner()
                    .map_err(|e| io_err("write", &target)(e.into_error()))?;
                out.sync_all().map_err(io_err("fsync", &target))?;
                sizes.insert(d, size);
            }
            EntryKind::Dir => {}
        }
    }

    // 2. The layout files.
    let layout_ok = layout_json
        .as_deref()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| {
            v.get("imageLayoutVersion")
                .and_then(|s| s.as_str())
                .map(|s| s == "1.0.0")
        })
        == Some(true);
    if !layout_ok {
        return Err(reject(
            "oci-layout is missing or does not declare imageLayoutVersion 1.0.0".into(),
        ));
    }
    let index_bytes =
        index_json.ok_or_else(|| reject("index.json is missing (truncated archive?)".into()))?;
    let index: Index = serde_json::from_slice(&index_bytes).map_err(|e| {
        reject(format!(
            "index.json is not a valid OCI index: {}",
            printable(&e.to_string())
        ))
    })?;
    if index.manifests.is_empty() {
        return Err(reject("index.json lists no snapshot".into()));
    }

    // 3. Verify every snapshot completely, in staging.
    let mut checker = Checker::new(&staged, true);
    let mut checked = std::collections::HashSet::new();
    let mut roots: Vec<(Descriptor, Option<String>)> = Vec::new();
    for d in &index.manifests {
        let label = format!(
            "snapshot {}",
            d.snapshot_id()
                .map(|i| i.to_string())
                .unwrap_or_else(|| d.digest.clone())
        );
        if d.media_type != layout::MT_MANIFEST || d.snapshot_id().is_none() {
            return Err(reject(format!(
                "index.json entry {} is not a stasis snapshot",
                d.digest
            )));
        }
        let md = d
            .blob()
            .ok_or_else(|| reject(format!("malformed digest {:?}", d.digest)))?;
        match sizes.get(&md) {
            None => {
                return Err(reject(format!(
                    "index.json refers to manifest {md}, which is not in the archive"
                )))
            }
            Some(&n) if n != d.size => {
                return Err(reject(format!(
                    "blob {md} is {n} bytes but its descriptor says {}",
                    d.size
                )))
            }
            _ => {}
        }
        let tag = match d.tag() {
            Some(t) => Some(normalize_tag(t).map_err(|e| reject(e.to_string()))?),
            None => None,
        };
        // Each manifest is verified once, however many descriptors (tags) name
        // it: a hostile index.json repeating one cannot multiply the work.
        if checked.insert((md, d.snapshot_id())) {
            checker.check_manifest(d, &label);
        }
        roots.push((d.clone(), tag));
    }
    if checker.has_errors() {
        let errors: Vec<String> = checker
            .findings
            .iter()
            .filter(|f| f.level == Level::Error)
            .map(|f| f.what.clone())
            .collect();
        let more = errors.len().saturating_sub(5);
        let mut reason = errors.into_iter().take(5).collect::<Vec<_>>().join("; ");
        if more > 0 {
            reason.push_str(&format!("; and {more} more"));
        }
        return Err(reject(reason));
    }

    // 4. Publish blobs (data before the manifests that name them), then index.json.
    let blobs = store.blobs();
    let mut order: Vec<BlobDigest> = Vec::new();
    let mut manifests = Vec::new();
    for (d, _) in &roots {
        let md = d.blob().ok_or_else(|| reject("malformed digest".into()))?;
        let m: Manifest =
            serde_json::from_slice(&staged.read_verified(&md, Some(d.size), "manifest")?)
                .map_err(|e| reject(format!("manifest {md}: {}", printable(&e.to_string()))))?;
        for rank in [layout::MT_PACK, layout::MT_PAGE_TABLE, layout::MT_FILES] {
            order.extend(
                m.layers
                    .iter()
                    .filter(|l| l.media_type == rank)
                    .filter_map(|l| l.blob()),
            );
        }
        order.extend(m.config.blob());
        manifests.push((md, m));
    }
    order.extend(manifests.iter().map(|(md, _)| *md));
    let mut published = std::collections::HashSet::new();
    for d in order {
        if !published.insert(d) {
            continue;
        }
        let src = staged.path(&d);
        let dst = blobs.path(&d);
        // A blob already in the store is kept only if it matches its digest: a
        // damaged copy is replaced by the archive's good one.
        if is_intact(&dst, &d, sizes.get(&d).copied().unwrap_or(0)) {
            continue;
        }
        fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .map_err(io_err("chmod", &src))?;
        fs::rename(&src, &dst).map_err(io_err("rename into place", &dst))?;
    }
    sync_dir(&blobs.dir)?;
    // Tests kill import here: every blob published, index.json not yet updated.
    super::util::fault_point("import.before-index");

    let ids = store.update_index(|idx| {
        let existing = catalog::entries(idx);
        let mut ids = Vec::new();
        for ((d, tag), (md, m)) in roots.iter().zip(&manifests) {
            let Some(id) = d.snapshot_id() else { continue };
            let root = match existing.iter().find(|e| e.id == id) {
                Some(e) => e.descriptor.clone(),
                None => {
                    // Annotations from the verified manifest, not from the archive's index.
                    let mut r = Descriptor::new(layout::MT_MANIFEST, md, d.size);
                    r.artifact_type = Some(layout::ARTIFACT_TYPE.into());
                    // Whatever the archive says: it came from elsewhere.
                    r.annotations
                        .insert(layout::A_ORIGIN.into(), layout::ORIGIN_IMPORTED.into());
                    for k in [
                        layout::A_ID,
                        layout::A_CREATED,
                        layout::A_CONTAINER,
                        layout::A_IMAGE_BYTES,
                        layout::A_ADDED_BYTES,
                    ] {
                        if let Some(v) = m.annotations.get(k) {
                            r.annotations.insert(k.to_string(), v.clone());
                        }
                    }
                    r
                }
            };
            match tag {
                Some(t) => catalog::set_tag(idx, &root, t),
                None => catalog::add_root(idx, &root),
            }
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    })?;
    drop(staging);
    Ok(ids)
}
