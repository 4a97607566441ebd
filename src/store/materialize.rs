//! Materialize: writes a snapshot back out as the exact CRIU image directory. Every
//! page is checked against its digest when its frame is decompressed and every file
//! against its sha256 before it is renamed from a hidden partial name to its real
//! one, so CRIU never sees unverified bytes; on any error everything written is
//! removed. Reads the store only; never writes into it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::archive::ArchiveReader;
use super::config::{FileRecord, SnapshotConfig, KIND_FILE, KIND_PAGES};
use super::error::{io_err, Result, StoreError};
use super::format::limits::MAX_READ_FILE;
use super::ids::{BlobDigest, PageDigest, SnapshotId};
use super::layout::{self, Manifest};
use super::pack::{self, PackIndex, PAGE_SIZE};
use super::pagetable;
use super::util::{self, create_private_dir_all, PRIVATE_FILE};
use super::Store;

/// The packs of one snapshot, opened, with their indexes and a digest -> location map.
pub(crate) struct PackSet {
    pub(crate) packs: Vec<(BlobDigest, File)>,
    pub(crate) indexes: Vec<PackIndex>,
    /// (pack, frame, slot) of each page digest.
    pub(crate) map: HashMap<PageDigest, (u32, u32, u32)>,
}

impl PackSet {
    pub(crate) fn open(store: &Store, manifest: &Manifest) -> Result<PackSet> {
        let blobs = store.blobs();
        let mut set = PackSet {
            packs: Vec::new(),
            indexes: Vec::new(),
            map: HashMap::new(),
        };
        for l in manifest
            .layers
            .iter()
            .filter(|l| l.media_type == layout::MT_PACK)
        {
            let d = l.blob().ok_or_else(|| StoreError::Format {
                what: "manifest",
                path: store.paths.root.clone(),
                reason: format!("malformed pack digest {:?}", l.digest),
            })?;
            let path = blobs.path(&d);
            let f = blobs.open(&d)?;
            let len = f.metadata().map_err(io_err("stat", &path))?.len();
            if len != l.size {
                return Err(StoreError::Format {
                    what: "pack",
                    path,
                    reason: format!("{len} bytes, its descriptor says {} (truncated?)", l.size),
                });
            }
            let idx = pack::read_index(&f, len, &path)?;
            let no = set.packs.len() as u32;
            for (digest, frame, slot) in idx.locations() {
                set.map.entry(digest).or_insert((no, frame, slot));
            }
            set.packs.push((d, f));
            set.indexes.push(idx);
        }
        Ok(set)
    }

    /// Decompresses a frame and checks each page against the pack index.
    fn decode(
        &self,
        dec: &mut zstd::bulk::Decompressor<'static>,
        pack_no: u32,
        frame: u32,
    ) -> std::result::Result<DecodedFrame, String> {
        let (_, file) = &self.packs[pack_no as usize];
        let idx = &self.indexes[pack_no as usize];
        let fr = idx.frames[frame as usize];
        let mut src = vec![0u8; fr.clen as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut src, fr.offset)
            .map_err(|e| format!("cannot read the frame at pack offset {}: {e}", fr.offset))?;
        let mut data = Vec::new();
        pack::decode_frame(dec, &src, fr.pages, &mut data)
            .map_err(|e| format!("{e} (frame at pack offset {})", fr.offset))?;
        let first = idx.first_page[frame as usize] as usize;
        let good = (0..fr.pages as usize)
            .map(|s| {
                PageDigest::of(&data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE]) == idx.digests[first + s]
            })
            .collect();
        Ok(DecodedFrame {
            data,
            good,
            offset: fr.offset,
        })
    }
}

struct DecodedFrame {
    data: Vec<u8>,
    good: Vec<bool>,
    offset: u64,
}

type FrameKey = (u32, u32);

/// Digest of a page of zeros (measured: 14% of a real pages file).
pub(crate) fn zero_page_digest() -> PageDigest {
    static ZERO: std::sync::OnceLock<PageDigest> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| PageDigest::of(&[0u8; PAGE_SIZE]))
}

pub(crate) fn materialize(
    store: &Store,
    id: &SnapshotId,
    dest: &Path,
    progress: bool,
) -> Result<()> {
    let (cfg, manifest) = store.snapshot_config(id)?;
    if cfg.snapshot_id != id.full() {
        return Err(StoreError::Corrupt {
            snapshot: id.to_string(),
            file: "config".into(),
            offset: 0,
            blob: manifest.config.digest.clone(),
            what: format!("config names snapshot {}", cfg.snapshot_id),
        });
    }
    let created = prepare_dest(dest)?;
    let res = write_all(store, id, &cfg, &manifest, dest, progress);
    if res.is_err() {
        cleanup(dest, created);
    }
    res
}

/// `dest` must be missing (created here) or an empty directory. Returns whether it
/// was created.
fn prepare_dest(dest: &Path) -> Result<bool> {
    let bad = |reason: &str| StoreError::Destination {
        path: dest.to_path_buf(),
        reason: reason.to_string(),
    };
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            create_private_dir_all(dest).map_err(io_err("create directory", dest))?;
            Ok(true)
        }
        Err(e) => Err(io_err("stat", dest)(e)),
        Ok(m) if !m.is_dir() => Err(bad("exists and is not a directory")),
        Ok(_) => {
            let mut rd = fs::read_dir(dest).map_err(io_err("read directory", dest))?;
            if rd.next().is_some() {
                return Err(bad("is not empty"));
            }
            Ok(false)
        }
    }
}

fn cleanup(dest: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dest);
        return;
    }
    if let Ok(rd) = fs::read_dir(dest) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

fn partial_path(dest: &Path, name: &str) -> PathBuf {
    dest.join(format!(".stasis-partial-{name}"))
}

fn write_all(
    store: &Store,
    id: &SnapshotId,
    cfg: &SnapshotConfig,
    manifest: &Manifest,
    dest: &Path,
    progress: bool,
) -> Result<()> {
    let bar = util::progress(progress, cfg.sizes.image_bytes, "restoring");
    let packs = PackSet::open(store, manifest)?;
    super::space::check_space(store, id, cfg, &packs, dest)?;
    for rec in cfg.files.iter().filter(|r| r.kind == KIND_PAGES) {
        write_pages_file(store, id, rec, &packs, dest, &bar)?;
    }
    write_small_files(store, id, cfg, manifest, dest, None, &bar)?;
    for rec in &cfg.files {
        if rec.kind != KIND_PAGES && rec.kind != KIND_FILE {
            return Err(StoreError::Format {
                what: "config",
                path: store.paths.root.clone(),
                reason: format!(
                    "snapshot {id}: file {} has unknown kind {:?}",
                    rec.name, rec.kind
                ),
            });
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn write_pages_file(
    store: &Store,
    id: &SnapshotId,
    rec: &FileRecord,
    packs: &PackSet,
    dest: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let corrupt = |offset: u64, blob: String, what: String| StoreError::Corrupt {
        snapshot: id.to_string(),
        file: rec.name.clone(),
        offset,
        blob,
        what,
    };
    let table_digest = rec
        .page_table
        .as_deref()
        .and_then(BlobDigest::parse)
        .ok_or_else(|| corrupt(0, "-".into(), "the config has no page table for it".into()))?;
    let mut table = pagetable::open(&store.blobs(), &table_digest)?;
    if table.file_size != rec.size {
        return Err(corrupt(
            0,
            table_digest.to_string(),
            format!(
                "page table describes {} bytes, the config {}",
                table.file_size, rec.size
            ),
        ));
    }

    let partial = partial_path(dest, &rec.name);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(&partial)
        .map_err(io_err("create", &partial))?;

    // Three stages overlap: this thread decodes and assembles batch k+2 while a
    // hasher thread hashes batch k+1 and a writer thread writes batch k. Buffers
    // circulate so no batch touches fresh memory.
    let (to_hash, hash_rx) = mpsc::sync_channel::<Batch>(1);
    let (to_write, write_rx) = mpsc::sync_channel::<Batch>(1);
    let (free_tx, free_rx) = mpsc::sync_channel::<Batch>(4);
    let (digest, written) = std::thread::scope(|s| -> Result<([u8; 32], u64)> {
        let partial = &partial;
        let hasher = s.spawn(move || -> ([u8; 32], u64) {
            let mut h = Sha256::new();
            let mut n = 0u64;
            for b in hash_rx {
                h.update(&b.data);
                n += b.data.len() as u64;
                if to_write.send(b).is_err() {
                    break;
                }
            }
            (h.finalize().into(), n)
        });
        let writer = s.spawn(move || -> Result<()> {
            // Zero pages are left as holes: less to copy, and they read as zeros.
            let mut offset = 0u64;
            for b in write_rx {
                let mut i = 0;
                while i < b.zero.len() {
                    let start = i;
                    let z = b.zero[i];
                    while i < b.zero.len() && b.zero[i] == z {
                        i += 1;
                    }
                    let from = start * PAGE_SIZE;
                    let to = (i * PAGE_SIZE).min(b.data.len());
                    if !z {
                        file.write_all_at(&b.data[from..to], offset + from as u64)
                            .map_err(io_err("write", partial))?;
                    }
                }
                offset += b.data.len() as u64;
                let _ = free_tx.try_send(b);
            }
            file.set_len(offset).map_err(io_err("truncate", partial))?;
            Ok(())
        });
        let produced = produce(
            packs, &mut table, rec.size, &to_hash, &free_rx, bar, &corrupt,
        );
        drop(to_hash);
        let hashed = match hasher.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        let wrote = match writer.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        produced?;
        wrote?;
        Ok(hashed)
    })?;
    if written != rec.size || hex::encode(digest) != rec.sha256 {
        return Err(corrupt(
            0,
            table_digest.to_string(),
            format!(
                "file digest mismatch after reassembly ({written} bytes, sha256 {})",
                hex::encode(digest)
            ),
        ));
    }
    fs::rename(&partial, dest.join(&rec.name)).map_err(io_err("rename", &partial))?;
    Ok(())
}

/// A run of verified file bytes on its way to the hasher and writer.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    /// Per page: it is the zero page (written as a hole).
    zero: Vec<bool>,
}

/// Assembles the file batch by batch and sends the bytes to the hasher.
fn produce(
    packs: &PackSet,
    table: &mut pagetable::TableReader<File>,
    size: u64,
    tx: &mpsc::SyncSender<Batch>,
    free: &mpsc::Receiver<Batch>,
    bar: &indicatif::ProgressBar,
    corrupt: &dyn Fn(u64, String, String) -> StoreError,
) -> Result<()> {
    let mut cache: HashMap<FrameKey, Arc<std::result::Result<DecodedFrame, String>>> =
        HashMap::new();
    let zero = zero_page_digest();
    let mut batch = Vec::with_capacity(pagetable::CHUNK);
    let mut base = 0u64;
    while table.next_chunk(&mut batch)? {
        let batch = &batch[..];
        let mut locs = Vec::with_capacity(batch.len());
        let mut need: Vec<FrameKey> = Vec::new();
        let mut next: HashMap<FrameKey, Arc<std::result::Result<DecodedFrame, String>>> =
            HashMap::new();
        for (i, d) in batch.iter().enumerate() {
            if *d == zero {
                locs.push(None);
                continue;
            }
            let Some(&(p, f, s)) = packs.map.get(d) else {
                return Err(corrupt(
                    (base + i as u64) * PAGE_SIZE as u64,
                    "-".into(),
                    format!("page {d} is in none of the snapshot's packs"),
                ));
            };
            locs.push(Some((p, f, s)));
            if let std::collections::hash_map::Entry::Vacant(slot) = next.entry((p, f)) {
                match cache.remove(&(p, f)) {
                    Some(fr) => {
                        slot.insert(fr);
                    }
                    None if !need.contains(&(p, f)) => need.push((p, f)),
                    None => {}
                }
            }
        }
        let decoded = util::par_map(
            &need,
            zstd::bulk::Decompressor::new,
            |dec, &(p, f)| match dec {
                Ok(dec) => packs.decode(dec, p, f),
                Err(e) => Err(format!("zstd: {e}")),
            },
        );
        for (k, fr) in need.into_iter().zip(decoded) {
            next.insert(k, Arc::new(fr));
        }
        cache = next;

        let mut b = free.try_recv().unwrap_or_default();
        b.data.clear();
        b.data.reserve(batch.len() * PAGE_SIZE);
        b.zero.clear();
        let out = &mut b.data;
        for (i, loc) in locs.iter().enumerate() {
            let offset = (base + i as u64) * PAGE_SIZE as u64;
            let len = (size - offset).min(PAGE_SIZE as u64) as usize;
            b.zero.push(loc.is_none());
            let Some((p, f, s)) = *loc else {
                // The zero page: its content is known, nothing to read or check.
                out.resize(out.len() + len, 0);
                continue;
            };
            let blob = || packs.packs[p as usize].0.to_string();
            let fr = match cache.get(&(p, f)).map(|a| a.as_ref()) {
                Some(Ok(fr)) => fr,
                Some(Err(e)) => return Err(corrupt(offset, blob(), e.clone())),
                None => {
                    return Err(corrupt(
                        offset,
                        blob(),
                        "internal: frame not decoded".into(),
                    ))
                }
            };
            if !fr.good[s as usize] {
                return Err(corrupt(
                    offset,
                    blob(),
                    format!("page digest mismatch (frame at pack offset {})", fr.offset),
                ));
            }
            out.extend_from_slice(&fr.data[s as usize * PAGE_SIZE..s as usize * PAGE_SIZE + len]);
        }
        bar.inc(out.len() as u64);
        base += batch.len() as u64;
        if tx.send(b).is_err() {
            // The writer failed; its error is reported by the caller.
            return Ok(());
        }
    }
    Ok(())
}

/// Writes the files of the files blob into `dest` (all of them, or the one named
/// `only`), each streamed and checked against its size and sha256.
fn write_small_files(
    store: &Store,
    id: &SnapshotId,
    cfg: &SnapshotConfig,
    manifest: &Manifest,
    dest: &Path,
    only: Option<&str>,
    bar: &indicatif::ProgressBar,
) -> Result<()> {
    let listed: HashMap<&str, &FileRecord> = cfg
        .files
        .iter()
        .filter(|r| r.kind == KIND_FILE)
        .map(|r| (r.name.as_str(), r))
        .collect();
    let wanted: HashMap<&str, &FileRecord> = listed
        .iter()
        .filter(|(n, _)| only.is_none_or(|o| o == **n))
        .map(|(n, r)| (*n, *r))
        .collect();
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == layout::MT_FILES);
    let Some(layer) = layer else {
        if wanted.is_empty() {
            return Ok(());
        }
        return Err(StoreError::Format {
            what: "manifest",
            path: store.paths.root.clone(),
            reason: format!("snapshot {id} has no files blob"),
        });
    };
    let d = layer.blob().ok_or_else(|| StoreError::Format {
        what: "manifest",
        path: store.paths.root.clone(),
        reason: format!("snapshot {id}: malformed files blob digest"),
    })?;
    let path = store.blobs().path(&d);
    let f = store
        .blobs()
        .open_verified(&d, Some(layer.size), "files blob")?;
    let mut ar = ArchiveReader::new(f, &path)?;
    let mut done = 0usize;
    while let Some((name, size)) = ar.next_entry()? {
        let corrupt = |what: String| StoreError::Corrupt {
            snapshot: id.to_string(),
            file: name.clone(),
            offset: 0,
            blob: d.to_string(),
            what,
        };
        let Some(rec) = wanted.get(name.as_str()) else {
            if !listed.contains_key(name.as_str()) {
                return Err(corrupt(
                    "the files blob holds a file the config does not list".into(),
                ));
            }
            io::copy(&mut ar.content(size), &mut io::sink())
                .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
            continue;
        };
        if size != rec.size {
            return Err(corrupt(format!(
                "{size} bytes in the files blob, {} in the config",
                rec.size
            )));
        }
        let partial = partial_path(dest, &name);
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE)
            .open(&partial)
            .map_err(io_err("create", &partial))?;
        let (n, sha) = copy_hashed(ar.content(size), out, &partial, &corrupt)?;
        if n != size || hex::encode(sha) != rec.sha256 {
            return Err(corrupt("file digest mismatch".into()));
        }
        fs::rename(&partial, dest.join(&name)).map_err(io_err("rename", &partial))?;
        bar.inc(size);
        done += 1;
    }
    if done != wanted.len() {
        let missing: Vec<&str> = wanted
            .keys()
            .filter(|n| !dest.join(n).exists())
            .copied()
            .collect();
        return Err(StoreError::Corrupt {
            snapshot: id.to_string(),
            file: missing.join(", "),
            offset: 0,
            blob: d.to_string(),
            what: "files listed in the config are missing from the files blob".into(),
        });
    }
    Ok(())
}

/// Streams an entry of the files blob into `out`, hashing it: (bytes, sha256).
/// Memory stays one buffer whatever the entry's size.
fn copy_hashed(
    mut src: impl Read,
    out: File,
    path: &Path,
    corrupt: &dyn Fn(String) -> StoreError,
) -> Result<(u64, [u8; 32])> {
    let mut w = io::BufWriter::with_capacity(1 << 20, out);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(format!("cannot decompress: {e}"))),
        };
        h.update(&buf[..k]);
        w.write_all(&buf[..k]).map_err(io_err("write", path))?;
        n += k as u64;
    }
    w.flush().map_err(io_err("write", path))?;
    Ok((n, h.finalize().into()))
}

/// The record of file `name` of a snapshot, or an error naming both.
fn file_record<'c>(id: &SnapshotId, cfg: &'c SnapshotConfig, name: &str) -> Result<&'c FileRecord> {
    cfg.files
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| StoreError::Invalid(format!("snapshot {id} has no file {name:?}")))
}

/// The bytes of one small file (kind `file`, kept in the files blob) of a
/// snapshot, checked against its size and sha256, without touching any pack.
pub(crate) fn read_small_file(store: &Store, id: &SnapshotId, name: &str) -> Result<Vec<u8>> {
    let (cfg, manifest) = store.snapshot_config(id)?;
    let rec = file_record(id, &cfg, name)?;
    if rec.kind != KIND_FILE {
        return Err(StoreError::Invalid(format!(
            "file {name:?} of snapshot {id} is stored page by page, not in the files blob"
        )));
    }
    let layer = manifest
        .layers
        .iter()
        .find(|l| l.media_type == layout::MT_FILES)
        .ok_or_else(|| StoreError::Format {
            what: "manifest",
            path: store.paths.root.clone(),
            reason: format!("snapshot {id} has no files blob"),
        })?;
    let d = layer.blob().ok_or_else(|| StoreError::Format {
        what: "manifest",
        path: store.paths.root.clone(),
        reason: format!("snapshot {id}: malformed files blob digest"),
    })?;
    let corrupt = |what: String| StoreError::Corrupt {
        snapshot: id.to_string(),
        file: name.to_string(),
        offset: 0,
        blob: d.to_string(),
        what,
    };
    if rec.size > MAX_READ_FILE {
        return Err(corrupt(format!(
            "its config records {} bytes, more than the {MAX_READ_FILE}-byte limit for a file read into memory",
            rec.size
        )));
    }
    let path = store.blobs().path(&d);
    let f = store
        .blobs()
        .open_verified(&d, Some(layer.size), "files blob")?;
    let mut ar = ArchiveReader::new(f, &path)?;
    while let Some((n, size)) = ar.next_entry()? {
        if n != name {
            if !cfg.files.iter().any(|r| r.name == n && r.kind == KIND_FILE) {
                return Err(corrupt(format!(
                    "the files blob holds {n:?}, which the config does not list"
                )));
            }
            io::copy(&mut ar.content(size), &mut io::sink())
                .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
            continue;
        }
        if size != rec.size {
            return Err(corrupt(format!(
                "{size} bytes in the files blob, {} in the config",
                rec.size
            )));
        }
        let mut content = Vec::with_capacity(size as usize);
        ar.content(size)
            .read_to_end(&mut content)
            .map_err(|e| corrupt(format!("cannot decompress: {e}")))?;
        if content.len() as u64 != rec.size || hex::encode(Sha256::digest(&content)) != rec.sha256 {
            return Err(corrupt("file digest mismatch".into()));
        }
        return Ok(content);
    }
    Err(corrupt("the files blob does not hold it".into()))
}

/// Writes one file of a snapshot (pages or small) into the directory `dest`
/// (created if missing) as `dest/name`, verified like `materialize` does. Returns
/// its path.
pub(crate) fn materialize_one(
    store: &Store,
    id: &SnapshotId,
    name: &str,
    dest: &Path,
) -> Result<PathBuf> {
    let (cfg, manifest) = store.snapshot_config(id)?;
    let rec = file_record(id, &cfg, name)?;
    create_private_dir_all(dest).map_err(io_err("create directory", dest))?;
    let out = dest.join(name);
    if rec.kind == KIND_PAGES {
        let packs = PackSet::open(store, &manifest)?;
        let bar = indicatif::ProgressBar::hidden();
        write_pages_file(store, id, rec, &packs, dest, &bar)?;
    } else {
        let bar = indicatif::ProgressBar::hidden();
        write_small_files(store, id, &cfg, &manifest, dest, Some(name), &bar)?;
    }
    Ok(out)
}
