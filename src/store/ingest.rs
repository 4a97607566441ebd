//! Ingest: turns a finished CRIU image directory into a snapshot. Hashes every
//! page while reading (and every whole file), looks pages up in the packs of the
//! snapshots already in index.json (`dedup`), compresses only new pages (16 per
//! zstd frame, in parallel), writes packs, re-reads each pack to verify it, then publishes in
//! the order packs, page tables, files blob, config, manifest, index.json. A pack
//! is reused only after its whole content matched its digest during this ingest
//! (pages of a damaged pack are stored again), so a new snapshot never references
//! data that no longer matches its digest. It never modifies a published blob; it
//! only replaces one whose content no longer matches its name (`blob::publish`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::archive::{valid_name, ArchiveWriter};
use super::blob::{hash_file, put_bytes, BlobWriter};
use super::catalog::{self, normalize_tag};
use super::config::{self, ConfigJson, FileRecord, Sizes, SnapshotConfig};
use super::dedup::DedupIndex;
use super::error::{fault_point, format_err, io_err, Result, StoreError};
use super::format::limits::MAX_CONFIG;
use super::ids::{BlobDigest, PageDigest};
use super::layout::{self, Descriptor, Manifest};
use super::pack::{self, PackWriter, FRAME_PAGES, PACK_TARGET, PAGE_SIZE};
use super::pagetable::{self, PageTable};
use super::util;
use super::{IngestOptions, IngestReport, SnapshotInput, Store};

/// Pages read, hashed and deduplicated per step (16 MiB).
const BATCH_PAGES: usize = 4096;

/// `pages-<digits>.img` (CRIU's memory) and the files the caller names in
/// `IngestOptions::page_stored`: the files stored page by page.
pub(crate) fn is_pages_file(name: &str, page_stored: &[String]) -> bool {
    let numbered = |prefix: &str, suffix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    numbered("pages-", ".img") || page_stored.iter().any(|p| p == name)
}

struct ImageFile {
    name: String,
    path: PathBuf,
    size: u64,
}

/// The regular files of a flat image directory, sorted by name.
fn scan(dir: &Path) -> Result<Vec<ImageFile>> {
    let bad = |reason: String| StoreError::ImageDir {
        path: dir.to_path_buf(),
        reason,
    };
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("read image directory", dir))? {
        let e = e.map_err(io_err("read image directory", dir))?;
        let name = e
            .file_name()
            .into_string()
            .map_err(|n| bad(format!("file name {n:?} is not UTF-8")))?;
        if !valid_name(&name) {
            return Err(bad(format!("file name {name:?} cannot be stored")));
        }
        let path = e.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        if !meta.is_file() {
            let kind = if meta.is_dir() {
                "a directory"
            } else if meta.file_type().is_symlink() {
                "a symlink"
            } else {
                "not a regular file"
            };
            return Err(bad(format!(
                "{name} is {kind}; an image directory holds regular files only"
            )));
        }
        out.push(ImageFile {
            name,
            path,
            size: meta.len(),
        });
    }
    if out.is_empty() {
        return Err(bad("it is empty".into()));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// State of one ingest while pages stream through it.
struct Packer<'s> {
    store: &'s Store,
    level: i32,
    existing: DedupIndex,
    used_existing: BTreeSet<u32>,
    seen_new: HashSet<PageDigest>,
    /// New pages waiting to fill a frame (bytes and digests).
    frame_buf: Vec<u8>,
    frame_digests: Vec<PageDigest>,
    writer: Option<PackWriter>,
    /// Published packs of this ingest: (digest, size).
    new_packs: Vec<(BlobDigest, u64)>,
    bytes_added: u64,
    pages_total: u64,
    pages_new: u64,
    /// Packs found damaged while deduplicating (their pages were stored again).
    damaged_packs: Vec<BlobDigest>,
}

impl Packer<'_> {
    /// Dedups one batch of pages and queues the new ones.
    fn add_pages(&mut self, data: &[u8], digests: &[PageDigest]) -> Result<()> {
        let damaged = self.existing.check_packs_for(digests, &self.store.blobs());
        self.damaged_packs.extend(damaged);
        for (i, d) in digests.iter().enumerate() {
            self.pages_total += 1;
            if let Some(p) = self.existing.reusable(d) {
                self.used_existing.insert(p);
            } else if self.seen_new.insert(*d) {
                self.pages_new += 1;
                self.frame_buf
                    .extend_from_slice(&data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
                self.frame_digests.push(*d);
            }
        }
        let full = self.frame_digests.len() / FRAME_PAGES;
        if full > 0 {
            self.emit_frames(full * FRAME_PAGES)?;
        }
        Ok(())
    }

    /// Compresses the first `pages` queued pages as frames (in parallel) and
    /// appends them to packs.
    fn emit_frames(&mut self, pages: usize) -> Result<()> {
        let chunks: Vec<&[u8]> = self.frame_buf[..pages * PAGE_SIZE]
            .chunks(FRAME_PAGES * PAGE_SIZE)
            .collect();
        let level = self.level;
        // Each frame is decompressed again right away and compared with its pages:
        // together with the re-read digest check in `close_pack` this proves that
        // what lands on disk decodes to exactly the pages hashed.
        let compressed = util::par_map(
            &chunks,
            || {
                let c = zstd::bulk::Compressor::new(level)?;
                let d = zstd::bulk::Decompressor::new()?;
                Ok::<_, io::Error>((c, d, Vec::with_capacity(FRAME_PAGES * PAGE_SIZE)))
            },
            |state, data| -> std::result::Result<Vec<u8>, String> {
                let (c, d, back) = state.as_mut().map_err(|e| e.to_string())?;
                let frame = c.compress(data).map_err(|e| e.to_string())?;
                let pages = (data.len() / PAGE_SIZE) as u32;
                pack::decode_frame(d, &frame, pages, back)?;
                if back[..] != data[..] {
                    return Err("frame does not decompress to its pages".into());
                }
                Ok(frame)
            },
        );
        let digests = std::mem::take(&mut self.frame_digests);
        for (i, c) in compressed.into_iter().enumerate() {
            let c = c.map_err(|e| StoreError::Invalid(format!("zstd compression failed: {e}")))?;
            let ds = &digests[i * FRAME_PAGES..((i + 1) * FRAME_PAGES).min(pages)];
            let need = c.len() as u64 + 16 + ds.len() as u64 * 32;
            if let Some(w) = &self.writer {
                if !w.is_empty() && w.projected_len() + need > PACK_TARGET {
                    self.close_pack()?;
                }
            }
            if self.writer.is_none() {
                self.writer = Some(PackWriter::create(&self.store.paths.tmp())?);
            }
            if let Some(w) = self.writer.as_mut() {
                w.add_frame(&c, ds)?;
            }
        }
        self.frame_digests = digests[pages..].to_vec();
        self.frame_buf.drain(..pages * PAGE_SIZE);
        Ok(())
    }

    /// Finishes the current pack, re-reads it from disk (its digest must be the one
    /// computed while writing, its index the one written; every frame was checked
    /// against its pages when compressed) and publishes it.
    fn close_pack(&mut self) -> Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let (pending, index) = w.finish()?;
        let tmp = pending
            .tmp_path()
            .ok_or_else(|| StoreError::Invalid("pack has no temp file".into()))?
            .to_path_buf();
        let (digest, len) = hash_file(&tmp)?;
        let bad = |reason: String| {
            format_err(
                "pack",
                &tmp,
                format!("verification after writing failed: {reason}"),
            )
        };
        if digest != pending.digest || len != pending.len {
            return Err(bad(format!(
                "re-read as {digest} ({len} bytes), written as {} ({} bytes)",
                pending.digest, pending.len
            )));
        }
        let f = File::open(&tmp).map_err(io_err("open", &tmp))?;
        if pack::read_index(&f, len, &tmp)? != index {
            return Err(bad("index differs from the one written".into()));
        }
        drop(f);
        fault_point("pack")?;
        let d = pending.digest;
        if pending.publish(&self.store.blobs())? {
            self.bytes_added += len;
        }
        self.new_packs.push((d, len));
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let left = self.frame_digests.len();
        if left > 0 {
            self.emit_frames(left)?;
        }
        self.close_pack()
    }
}

/// Whether every blob of an existing snapshot (manifest, config, page tables,
/// files blob, packs) still matches its digest, so that pointing a tag at it is
/// safe. Packs this ingest already hashed or wrote are not read again.
fn existing_is_sound(store: &Store, e: &catalog::Entry, packer: &Packer) -> bool {
    let blobs = store.blobs();
    let Ok(bytes) = blobs.read_verified(&e.manifest, Some(e.descriptor.size), "manifest") else {
        return false;
    };
    let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
        return false;
    };
    std::iter::once(&m.config).chain(&m.layers).all(|l| {
        let Some(d) = l.blob() else { return false };
        let checked = packer.new_packs.iter().any(|(n, _)| *n == d)
            || packer
                .existing
                .packs
                .iter()
                .zip(&packer.existing.intact)
                .any(|((p, _), ok)| *p == d && *ok == Some(true));
        checked || super::blob::is_intact(&blobs.path(&d), &d, l.size)
    })
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
    Ok(n)
}

/// Streams one pages file through the packer; returns its page table and sha256.
fn ingest_pages_file(
    packer: &mut Packer,
    f: &ImageFile,
    buf: &mut [u8],
    bar: &indicatif::ProgressBar,
) -> Result<(PageTable, [u8; 32])> {
    let mut file = File::open(&f.path).map_err(io_err("open", &f.path))?;
    let mut hasher = Sha256::new();
    let mut table = PageTable {
        file_size: 0,
        digests: Vec::with_capacity(pagetable::pages_for(f.size) as usize),
    };
    loop {
        let n = read_full(&mut file, buf, &f.path)?;
        if n == 0 {
            break;
        }
        table.file_size += n as u64;
        let npages = n.div_ceil(PAGE_SIZE);
        buf[n..npages * PAGE_SIZE].fill(0);
        let pages = &buf[..npages * PAGE_SIZE];
        // The whole-file hash runs beside the per-page hashes: on two cores both
        // take about as long.
        let data = &pages[..n];
        let hasher_ref = &mut hasher;
        let digests = std::thread::scope(|s| {
            let h = s.spawn(move || {
                hasher_ref.update(data);
            });
            let chunks: Vec<&[u8]> = pages.chunks(256 * PAGE_SIZE).collect();
            let workers = util::threads().saturating_sub(1).max(1);
            let parts = util::par_map_n(
                workers,
                &chunks,
                || (),
                |_, c| c.chunks(PAGE_SIZE).map(PageDigest::of).collect::<Vec<_>>(),
            );
            let joined = h.join();
            (joined, parts)
        });
        if let (Err(p), _) = digests {
            std::panic::resume_unwind(p);
        }
        let digests: Vec<PageDigest> = digests.1.into_iter().flatten().collect();
        packer.add_pages(pages, &digests)?;
        table.digests.extend_from_slice(&digests);
        bar.inc(n as u64);
    }
    if table.file_size != f.size {
        return Err(StoreError::ImageDir {
            path: f.path.clone(),
            reason: format!(
                "changed while being read ({} bytes, then {})",
                f.size, table.file_size
            ),
        });
    }
    Ok((table, hasher.finalize().into()))
}

pub(crate) fn ingest(
    store: &Store,
    input: SnapshotInput,
    opts: &IngestOptions,
) -> Result<super::IngestReport> {
    let start = Instant::now();
    let tags = input
        .tags
        .iter()
        .map(|t| normalize_tag(t))
        .collect::<Result<Vec<_>>>()?;
    if !(1..=22).contains(&opts.compress_level) {
        return Err(StoreError::Invalid(format!(
            "compress level {} is out of range (1 to 22)",
            opts.compress_level
        )));
    }
    let files = scan(input.image_dir)?;
    let image_bytes: u64 = files.iter().map(|f| f.size).sum();
    let bar = util::progress(opts.progress, image_bytes, "storing");
    let tmp = store.paths.tmp();
    let blobs = store.blobs();

    let mut packer = Packer {
        store,
        level: opts.compress_level,
        existing: DedupIndex::load(store)?,
        used_existing: BTreeSet::new(),
        seen_new: HashSet::new(),
        frame_buf: Vec::with_capacity((BATCH_PAGES + FRAME_PAGES) * PAGE_SIZE),
        frame_digests: Vec::new(),
        writer: None,
        new_packs: Vec::new(),
        bytes_added: 0,
        pages_total: 0,
        pages_new: 0,
        damaged_packs: Vec::new(),
    };

    // 1. Pages -> packs (published as each fills up).
    let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
    let mut tables = Vec::new();
    let mut records: Vec<FileRecord> = Vec::new();
    for f in files
        .iter()
        .filter(|f| is_pages_file(&f.name, &opts.page_stored))
    {
        let (table, sha) = ingest_pages_file(&mut packer, f, &mut buf, &bar)?;
        tables.push((f.name.clone(), table));
        records.push(FileRecord {
            name: f.name.clone(),
            size: f.size,
            sha256: hex::encode(sha),
            kind: config::KIND_PAGES.into(),
            page_table: None,
        });
    }
    drop(buf);
    packer.finish()?;
    fault_point("packs")?;
    // The fault-matrix tests kill a checkpoint here: packs written, nothing committed.
    super::util::fault_point("checkpoint.ingest");

    // 2. Page tables.
    let mut layers = Vec::new();
    for (name, table) in &tables {
        let bytes = pagetable::encode(table, opts.compress_level)
            .map_err(|e| StoreError::Invalid(format!("zstd compression failed: {e}")))?;
        let (d, n, added) = put_bytes(&tmp, &blobs, "pagetable", &bytes)?;
        if added {
            packer.bytes_added += n;
        }
        if let Some(r) = records.iter_mut().find(|r| &r.name == name) {
            r.page_table = Some(d.to_string());
        }
        let mut desc = Descriptor::new(layout::MT_PAGE_TABLE, &d, n);
        desc.annotations.insert(layout::A_FILE.into(), name.clone());
        layers.push(desc);
    }
    fault_point("page-tables")?;

    // 3. Every other file, together in one blob.
    let small: Vec<&ImageFile> = files
        .iter()
        .filter(|f| !is_pages_file(&f.name, &opts.page_stored))
        .collect();
    let w = BlobWriter::create(&tmp, "files")?;
    let w_path = w.tmp_path().to_path_buf();
    let mut archive = ArchiveWriter::new(w, opts.compress_level, small.len() as u32)
        .map_err(io_err("write", &w_path))?;
    for f in &small {
        let bytes = fs::read(&f.path).map_err(io_err("read", &f.path))?;
        if bytes.len() as u64 != f.size {
            return Err(StoreError::ImageDir {
                path: f.path.clone(),
                reason: "changed while being read".into(),
            });
        }
        archive
            .add(&f.name, &bytes)
            .map_err(io_err("write", &w_path))?;
        records.push(FileRecord {
            name: f.name.clone(),
            size: f.size,
            sha256: hex::encode(Sha256::digest(&bytes)),
            kind: config::KIND_FILE.into(),
            page_table: None,
        });
        bar.inc(f.size);
    }
    let mut w = archive.finish().map_err(io_err("write", &w_path))?;
    w.flush().map_err(io_err("write", &w_path))?;
    let pending = w.finish()?;
    let (files_digest, files_len) = (pending.digest, pending.len);
    if pending.publish(&blobs)? {
        packer.bytes_added += files_len;
    }
    layers.push(Descriptor::new(layout::MT_FILES, &files_digest, files_len));
    fault_point("files")?;
    bar.finish_and_clear();

    // The packs this snapshot's pages live in.
    let mut packs: BTreeMap<BlobDigest, u64> = packer
        .used_existing
        .iter()
        .filter_map(|&p| packer.existing.packs.get(p as usize).copied())
        .collect();
    packs.extend(packer.new_packs.iter().copied());
    for (d, n) in &packs {
        layers.push(Descriptor::new(layout::MT_PACK, d, *n));
    }

    records.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let config_json = ConfigJson::new(input.config_json);
    let id_files: Vec<(String, u64, [u8; 32])> = records
        .iter()
        .map(|r| {
            let mut d = [0u8; 32];
            hex::decode_to_slice(&r.sha256, &mut d).map(|_| (r.name.clone(), r.size, d))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| StoreError::Invalid(format!("internal: bad digest: {e}")))?;
    let id = config::snapshot_id(
        &id_files,
        (
            input.config_json.len() as u64,
            Sha256::digest(input.config_json).into(),
        ),
    );

    let report = |existed: bool, bytes_added: u64, pages_new: u64| IngestReport {
        id,
        image_bytes,
        pages_total: packer.pages_total,
        pages_new,
        pages_reused: packer.pages_total - pages_new,
        bytes_added,
        duration: start.elapsed(),
        existed,
        damaged_packs: packer.damaged_packs.clone(),
    };

    // The same content is already a snapshot: point the tags at it, unless one
    // of its blobs is damaged; then it gets a new manifest (below) naming this
    // ingest's sound copies, and every descriptor of it moves there.
    let existing = catalog::entries(&store.read_index()?)
        .into_iter()
        .find(|e| e.id == id);
    let damaged_root = existing
        .as_ref()
        .filter(|e| !existing_is_sound(store, e, &packer))
        .map(|e| e.descriptor.digest.clone());
    if let Some(e) = existing.filter(|_| damaged_root.is_none()) {
        store.update_index(|index| {
            for t in &tags {
                catalog::set_tag(index, &e.descriptor, t);
            }
            Ok(())
        })?;
        return Ok(report(true, packer.bytes_added, packer.pages_new));
    }

    // 4. Config.
    let created = util::now_rfc3339();
    let cfg = SnapshotConfig {
        format_version: config::CONFIG_VERSION.into(),
        snapshot_id: id.full(),
        created: created.clone(),
        container: input.container_id.to_string(),
        files: records,
        config_json,
        sizes: Sizes {
            image_bytes,
            pages_total: packer.pages_total,
            pages_new: packer.pages_new,
            pages_reused: packer.pages_total - packer.pages_new,
            bytes_added: packer.bytes_added,
            ingest_ms: start.elapsed().as_millis() as u64,
        },
        metadata: input.metadata,
    };
    let cfg_bytes = serde_json::to_vec_pretty(&cfg).map_err(|source| StoreError::Json {
        op: "serialize config for",
        path: store.paths.root.clone(),
        source,
    })?;
    if cfg_bytes.len() as u64 > MAX_CONFIG {
        return Err(StoreError::Invalid(format!(
            "the snapshot's config would be {} bytes, more than the {MAX_CONFIG}-byte limit readers accept (too many image files, or too much metadata)",
            cfg_bytes.len()
        )));
    }
    let (cfg_digest, cfg_len, _) = put_bytes(&tmp, &blobs, "config", &cfg_bytes)?;
    fault_point("config")?;

    // 5. Manifest.
    let mut annotations = BTreeMap::new();
    annotations.insert(layout::A_ID.to_string(), id.full());
    annotations.insert(layout::A_CREATED.to_string(), created.clone());
    annotations.insert(layout::A_OCI_CREATED.to_string(), created);
    annotations.insert(
        layout::A_CONTAINER.to_string(),
        input.container_id.to_string(),
    );
    annotations.insert(layout::A_IMAGE_BYTES.to_string(), image_bytes.to_string());
    annotations.insert(
        layout::A_ADDED_BYTES.to_string(),
        packer.bytes_added.to_string(),
    );
    // The tags given at ingest, for `verify --rebuild-index` after a lost
    // index.json (the manifest only: index.json is where tags live).
    let mut m_annotations = annotations.clone();
    if !tags.is_empty() {
        m_annotations.insert(layout::A_TAGS.to_string(), tags.join(","));
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: layout::MT_MANIFEST.into(),
        artifact_type: Some(layout::ARTIFACT_TYPE.into()),
        config: Descriptor::new(layout::MT_CONFIG, &cfg_digest, cfg_len),
        layers,
        annotations: m_annotations,
    };
    let m_bytes = serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Json {
        op: "serialize manifest for",
        path: store.paths.root.clone(),
        source,
    })?;
    let (m_digest, m_len, _) = put_bytes(&tmp, &blobs, "manifest", &m_bytes)?;
    fault_point("manifest")?;

    // 6. index.json, last.
    annotations.remove(layout::A_OCI_CREATED);
    let mut root = Descriptor::new(layout::MT_MANIFEST, &m_digest, m_len);
    root.artifact_type = Some(layout::ARTIFACT_TYPE.into());
    root.annotations = annotations;
    // Made here: the store's own mark, not part of the (exportable) manifest.
    root.annotations
        .insert(layout::A_ORIGIN.into(), layout::ORIGIN_LOCAL.into());
    store.update_index(|index| {
        // A concurrent ingest of identical content may have won the race; keep its
        // root and point our tags at it. A damaged root of the same id is replaced.
        let root = match catalog::entries(index).into_iter().find(|e| e.id == id) {
            Some(e) if Some(&e.descriptor.digest) == damaged_root.as_ref() => {
                catalog::replace_root(index, &id, &root);
                root
            }
            Some(e) => e.descriptor,
            None => root,
        };
        if tags.is_empty() {
            catalog::add_root(index, &root);
        }
        for t in &tags {
            catalog::set_tag(index, &root, t);
        }
        Ok(())
    })?;
    Ok(report(false, packer.bytes_added, packer.pages_new))
}
