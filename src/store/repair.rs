//! Repair: puts good copies back in place of damaged or missing blobs of the
//! snapshots in index.json. A good copy comes from an export archive (any blob,
//! checked against its digest) or, for a pack whose index is intact, from the
//! store itself: frames that still decode to their pages are kept, the pages of
//! the others are found in other packs (a later checkpoint stores the pages of a
//! damaged pack again) and recompressed; the rebuilt pack is published only if
//! its sha256 is the damaged pack's name. Never deletes anything, never touches
//! index.json: a repaired blob is the exact original, so every snapshot that
//! names it is whole again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::blob::{is_intact, BlobWriter};
use super::catalog;
use super::error::{Result, StoreError};
use super::ids::{BlobDigest, PageDigest};
use super::layout::{self, Manifest};
use super::pack::{self, PackIndex, PackWriter, PAGE_SIZE};
use super::Store;

/// What `Store::repair` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RepairReport {
    /// One line per blob put back: kind, digest and where the good copy came from.
    pub repaired: Vec<String>,
    /// One line per damaged or missing blob left as it was: kind, digest, the
    /// snapshots that need it and why no good copy was found.
    pub unrepaired: Vec<String>,
}

/// A blob some snapshot needs that is missing or does not match its digest.
struct Damaged {
    size: u64,
    kind: &'static str,
    /// Short ids of the snapshots that need it.
    users: BTreeSet<String>,
}

fn kind_of(media_type: &str) -> &'static str {
    match media_type {
        layout::MT_PACK => "pack",
        layout::MT_PAGE_TABLE => "page table",
        layout::MT_FILES => "files blob",
        layout::MT_CONFIG => "config",
        _ => "blob",
    }
}

/// Every blob of every snapshot in index.json that is missing or damaged (each
/// blob is hashed whole). A damaged manifest hides its layers until repaired.
fn find_damaged(store: &Store) -> Result<BTreeMap<BlobDigest, Damaged>> {
    let blobs = store.blobs();
    let mut out: BTreeMap<BlobDigest, Damaged> = BTreeMap::new();
    let mut sound: BTreeSet<BlobDigest> = BTreeSet::new();
    let mut note = |d: BlobDigest, size: u64, kind: &'static str, user: &str| -> bool {
        if sound.contains(&d) {
            return true;
        }
        if let Some(x) = out.get_mut(&d) {
            x.users.insert(user.to_string());
            return false;
        }
        if is_intact(&blobs.path(&d), &d, size) {
            sound.insert(d);
            return true;
        }
        out.insert(
            d,
            Damaged {
                size,
                kind,
                users: BTreeSet::from([user.to_string()]),
            },
        );
        false
    };
    for e in catalog::entries(&store.read_index()?) {
        let user = e.id.to_string();
        if !note(e.manifest, e.descriptor.size, "manifest", &user) {
            continue;
        }
        let Ok(bytes) = blobs.read_verified(&e.manifest, Some(e.descriptor.size), "manifest")
        else {
            continue;
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            continue;
        };
        for l in std::iter::once(&m.config).chain(&m.layers) {
            if let Some(d) = l.blob() {
                note(d, l.size, kind_of(&l.media_type), &user);
            }
        }
    }
    Ok(out)
}

/// Copies every wanted blob found in an export archive (`blobs/sha256/<hex>`
/// entries; nothing else of it is used) into the store, each checked against
/// its digest while written. Returns the blobs put back.
fn from_archive(
    store: &Store,
    file: &Path,
    wanted: &BTreeMap<BlobDigest, Damaged>,
) -> Result<Vec<BlobDigest>> {
    let reject = |reason: String| StoreError::RepairSource {
        path: file.to_path_buf(),
        reason,
    };
    let f = File::open(file).map_err(super::error::io_err("open", file))?;
    let mut ar = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let entries = ar
        .entries()
        .map_err(|e| reject(format!("not a tar file: {e}")))?;
    let mut done = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| reject(format!("truncated or malformed tar: {e}")))?;
        let et = entry.header().entry_type();
        if et != tar::EntryType::Regular && et != tar::EntryType::Continuous {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let Some(d) = std::str::from_utf8(&raw)
            .ok()
            .and_then(|p| p.strip_prefix("blobs/sha256/"))
            .and_then(BlobDigest::from_hex)
        else {
            continue;
        };
        let Some(w) = wanted.get(&d) else { continue };
        if entry.size() != w.size || done.contains(&d) {
            continue;
        }
        let mut out = BlobWriter::create(&store.paths.tmp(), "repair")?;
        let tmp = out.tmp_path().to_path_buf();
        io::copy(&mut (&mut entry).take(w.size), &mut out).map_err(|e| {
            reject(format!(
                "blob {d} cannot be read ({e}) while writing {}",
                tmp.display()
            ))
        })?;
        let pending = out.finish()?;
        if pending.digest == d && pending.len == w.size {
            pending.publish(&store.blobs())?;
            done.push(d);
        }
    }
    Ok(done)
}

/// Where each page of the store's other packs is: (pack, its index).
struct PageSources {
    packs: Vec<(BlobDigest, PackIndex)>,
    map: HashMap<PageDigest, (u32, u32, u32)>,
}

impl PageSources {
    /// The indexes of every pack of the snapshots in index.json, except `skip`
    /// (the damaged ones). A pack whose index cannot be read is left out.
    fn load(store: &Store, skip: &BTreeSet<BlobDigest>) -> Result<PageSources> {
        let blobs = store.blobs();
        let mut packs: BTreeMap<BlobDigest, u64> = BTreeMap::new();
        for e in catalog::entries(&store.read_index()?) {
            let Ok(bytes) = blobs.read_verified(&e.manifest, Some(e.descriptor.size), "manifest")
            else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
                continue;
            };
            for l in m.layers.iter().filter(|l| l.media_type == layout::MT_PACK) {
                if let Some(d) = l.blob().filter(|d| !skip.contains(d)) {
                    packs.insert(d, l.size);
                }
            }
        }
        let mut out = PageSources {
            packs: Vec::new(),
            map: HashMap::new(),
        };
        for (d, size) in packs {
            let path = blobs.path(&d);
            let Ok(f) = File::open(&path) else { continue };
            let Ok(idx) = pack::read_index(&f, size, &path) else {
                continue;
            };
            let no = out.packs.len() as u32;
            for (digest, frame, slot) in idx.locations() {
                out.map.entry(digest).or_insert((no, frame, slot));
            }
            out.packs.push((d, idx));
        }
        Ok(out)
    }

    /// The 4096 bytes of page `d`, read from another pack and checked.
    fn page(&self, store: &Store, d: &PageDigest) -> Option<Vec<u8>> {
        let &(p, fi, slot) = self.map.get(d)?;
        let (pd, idx) = self.packs.get(p as usize)?;
        let fr = idx.frames.get(fi as usize)?;
        let f = File::open(store.blobs().path(pd)).ok()?;
        let mut src = vec![0u8; fr.clen as usize];
        f.read_exact_at(&mut src, fr.offset).ok()?;
        let mut dec = zstd::bulk::Decompressor::new().ok()?;
        let mut out = Vec::new();
        pack::decode_frame(&mut dec, &src, fr.pages, &mut out).ok()?;
        let page = out.get(slot as usize * PAGE_SIZE..(slot as usize + 1) * PAGE_SIZE)?;
        (PageDigest::of(page) == *d).then(|| page.to_vec())
    }
}

/// zstd levels tried when recompressing a frame: the default first.
fn levels() -> impl Iterator<Item = i32> {
    std::iter::once(super::DEFAULT_COMPRESS_LEVEL)
        .chain((1..=22).filter(|l| *l != super::DEFAULT_COMPRESS_LEVEL))
}

/// Rebuilds damaged pack `d` (intact index) frame by frame: good frames as they
/// are, bad ones recompressed from pages found in other packs. Publishes it only
/// when the result hashes to `d`. Err says why it could not.
fn rebuild_pack(
    store: &Store,
    d: &BlobDigest,
    size: u64,
    sources: &PageSources,
) -> std::result::Result<(), String> {
    let path = store.blobs().path(d);
    let f = File::open(&path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len != size {
        return Err(format!("it is {len} bytes, not {size}"));
    }
    let idx = pack::read_index(&f, len, &path).map_err(|e| format!("its index is damaged: {e}"))?;
    let mut w = PackWriter::create(&store.paths.tmp()).map_err(|e| e.to_string())?;
    let mut dec = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
    let (mut src, mut out) = (Vec::new(), Vec::new());
    for (fi, fr) in idx.frames.iter().enumerate() {
        let first = idx.first_page[fi] as usize;
        let digests = &idx.digests[first..first + fr.pages as usize];
        src.resize(fr.clen as usize, 0);
        let good = f.read_exact_at(&mut src, fr.offset).is_ok()
            && pack::decode_frame(&mut dec, &src, fr.pages, &mut out).is_ok()
            && out
                .chunks(PAGE_SIZE)
                .zip(digests)
                .all(|(p, d)| PageDigest::of(p) == *d);
        if !good {
            let mut pages = Vec::with_capacity(digests.len() * PAGE_SIZE);
            for (slot, pd) in digests.iter().enumerate() {
                let page = sources.page(store, pd).ok_or_else(|| {
                    format!("page {slot} of frame {fi} is in no other pack of the store")
                })?;
                pages.extend_from_slice(&page);
            }
            src = levels()
                .filter_map(|l| zstd::bulk::Compressor::new(l).ok()?.compress(&pages).ok())
                .find(|c| c.len() == fr.clen as usize)
                .ok_or_else(|| {
                    format!(
                        "recompressing frame {fi} does not reproduce its {} bytes",
                        fr.clen
                    )
                })?;
        }
        w.add_frame(&src, digests).map_err(|e| e.to_string())?;
    }
    let (pending, _) = w.finish().map_err(|e| e.to_string())?;
    if pending.digest != *d || pending.len != size {
        return Err(format!(
            "the rebuilt pack hashes to {}, not {d}",
            pending.digest
        ));
    }
    pending
        .publish(&store.blobs())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Repairs what it can (see the module comment); the caller holds the shared
/// store lock.
pub(crate) fn repair(store: &Store, archive: Option<&Path>) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut why: BTreeMap<BlobDigest, String> = BTreeMap::new();
    // A repaired manifest reveals its layers: look again until nothing changes.
    loop {
        let damaged = find_damaged(store)?;
        let Some(file) = archive else { break };
        let wanted: BTreeMap<BlobDigest, Damaged> = damaged
            .into_iter()
            .filter(|(d, _)| !why.contains_key(d))
            .collect();
        if wanted.is_empty() {
            break;
        }
        let done = from_archive(store, file, &wanted)?;
        for (d, w) in &wanted {
            if done.contains(d) {
                report
                    .repaired
                    .push(format!("{} {d}: copied from {}", w.kind, file.display()));
            } else {
                why.insert(*d, format!("not in {}", file.display()));
            }
        }
        if done.is_empty() {
            break;
        }
    }
    let damaged = find_damaged(store)?;
    let bad_packs: BTreeSet<BlobDigest> = damaged
        .iter()
        .filter(|(_, w)| w.kind == "pack")
        .map(|(d, _)| *d)
        .collect();
    if !bad_packs.is_empty() {
        let sources = PageSources::load(store, &bad_packs)?;
        for d in &bad_packs {
            let size = damaged.get(d).map(|w| w.size).unwrap_or(0);
            match rebuild_pack(store, d, size, &sources) {
                Ok(()) => report.repaired.push(format!(
                    "pack {d}: rebuilt from its intact frames and other packs"
                )),
                Err(e) => {
                    let w = why.entry(*d).or_default();
                    if !w.is_empty() {
                        w.push_str("; ");
                    }
                    w.push_str(&format!("cannot rebuild it: {e}"));
                }
            }
        }
    }
    for (d, w) in find_damaged(store)? {
        let users: Vec<String> = w.users.into_iter().collect();
        let reason = why
            .remove(&d)
            .unwrap_or_else(|| "no good copy at hand".into());
        report.unrepaired.push(format!(
            "{} {d} of snapshot(s) {} is damaged or missing ({reason})",
            w.kind,
            users.join(", ")
        ));
    }
    Ok(report)
}
