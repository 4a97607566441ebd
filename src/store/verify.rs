//! Verify: checks a store (or an import's staging directory) and collects every
//! problem with a level and a hint instead of stopping at the first (rustic's
//! `CheckResults`). Blobs that fail their digest are read a second time before they
//! are declared corrupt. Reads only; fixing is left to `rm`, `gc` and re-import.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::archive::ArchiveReader;
use super::blob::{hash_file, BlobDir};
use super::config::{SnapshotConfig, KIND_FILE, KIND_PAGES};
use super::format::limits::json_limit;
use super::ids::{BlobDigest, PageDigest};
use super::layout::{self, Descriptor, Manifest};
use super::pack::{self, PackIndex, PAGE_SIZE};
use super::pagetable;
use super::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
}

/// One problem found by `verify`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub level: Level,
    /// What is wrong, naming the snapshot, blob and file.
    pub what: String,
    /// What to do about it.
    pub hint: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(f, "{level}: {} (hint: {})", self.what, self.hint)
    }
}

/// Temp files older than this are reported (and always removed by gc).
pub(crate) const TMP_MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct PackResult {
    index: Option<Arc<PackIndex>>,
    problems: Vec<(Level, String)>,
}

/// Accumulates findings over a blob directory.
pub(crate) struct Checker<'a> {
    blobs: &'a BlobDir,
    read_data: bool,
    pub(crate) findings: Vec<Finding>,
    packs: HashMap<BlobDigest, PackResult>,
    /// Every blob a checked manifest refers to (and the manifests themselves).
    pub(crate) referenced: HashSet<BlobDigest>,
}

fn damaged_hint(short: &str) -> String {
    format!("the snapshot cannot be restored as it is; `stasis snapshot verify --repair` puts good copies back (add `--from EXPORT.tar` to take them from an export), or `stasis snapshot rm {short}` removes it (check the disk)")
}

impl<'a> Checker<'a> {
    pub(crate) fn new(blobs: &'a BlobDir, read_data: bool) -> Self {
        Checker {
            blobs,
            read_data,
            findings: Vec::new(),
            packs: HashMap::new(),
            referenced: HashSet::new(),
        }
    }

    fn push(&mut self, level: Level, what: String, hint: String) {
        self.findings.push(Finding { level, what, hint });
    }

    pub(crate) fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.level == Level::Error)
    }

    /// Reads a whole blob, checking size and digest; re-reads once on a mismatch.
    fn blob_bytes(
        &mut self,
        d: &BlobDigest,
        size: Option<u64>,
        what: &str,
        label: &str,
        hint: &str,
    ) -> Option<Vec<u8>> {
        let path = self.blobs.path(d);
        // JSON blobs only: refuse a size no real one has before reading it.
        if let Ok(m) = fs::metadata(&path) {
            let max = json_limit(what);
            if m.len() > max {
                self.push(
                    Level::Error,
                    format!(
                        "{label}: {what} {d} is {} bytes, more than the {max}-byte limit",
                        m.len()
                    ),
                    hint.to_string(),
                );
                return None;
            }
        }
        let b = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.push(
                    Level::Error,
                    format!("{label}: {what} {d} is missing"),
                    hint.to_string(),
                );
                return None;
            }
            Err(e) => {
                self.push(
                    Level::Error,
                    format!("{label}: cannot read {what} {d}: {e}"),
                    hint.to_string(),
                );
                return None;
            }
        };
        if let Some(s) = size {
            if b.len() as u64 != s {
                self.push(
                    Level::Error,
                    format!(
                        "{label}: {what} {d} is {} bytes, its descriptor says {s}",
                        b.len()
                    ),
                    hint.to_string(),
                );
                return None;
            }
        }
        let got = BlobDigest::of(&b);
        if got == *d {
            return Some(b);
        }
        match fs::read(&path) {
            Ok(b2) if BlobDigest::of(&b2) == *d => {
                self.push(
                    Level::Warning,
                    format!("{label}: {what} {d} read back wrong once and right the second time"),
                    "the disk or memory may be failing; run verify again".into(),
                );
                Some(b2)
            }
            _ => {
                self.push(
                    Level::Error,
                    format!("{label}: {what} {d} is corrupt (its content digest is {got})"),
                    hint.to_string(),
                );
                None
            }
        }
    }

    /// Checks a blob of any size by streaming it (size, then digest; re-hashed once
    /// on a mismatch) and returns it opened at its start.
    fn blob_file(
        &mut self,
        d: &BlobDigest,
        size: u64,
        what: &str,
        label: &str,
        hint: &str,
    ) -> Option<File> {
        let path = self.blobs.path(d);
        let problem = match File::open(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => format!("{what} {d} is missing"),
            Err(e) => format!("cannot read {what} {d}: {e}"),
            Ok(f) => {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let hashed = hash_file(&path).map(|(g, _)| g);
                match hashed {
                    _ if len != size => {
                        format!("{what} {d} is {len} bytes, its descriptor says {size}")
                    }
                    Ok(g) if g == *d => return Some(f),
                    Err(e) => format!("cannot read {what} {d}: {e}"),
                    Ok(g) => {
                        if hash_file(&path).map(|(g, _)| g).ok() == Some(*d) {
                            self.push(
                                Level::Warning,
                                format!("{label}: {what} {d} read back wrong once and right the second time"),
                                "the disk or memory may be failing; run verify again".into(),
                            );
                            return Some(f);
                        }
                        format!("{what} {d} is corrupt (its content digest is {g})")
                    }
                }
            }
        };
        self.push(
            Level::Error,
            format!("{label}: {problem}"),
            hint.to_string(),
        );
        None
    }

    fn check_pack(&mut self, d: &BlobDigest, size: u64) -> &PackResult {
        let read_data = self.read_data;
        let blobs = self.blobs;
        self.packs.entry(*d).or_insert_with(|| {
            let mut r = PackResult::default();
            let path = blobs.path(d);
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    r.problems
                        .push((Level::Error, format!("pack {d} is missing")));
                    return r;
                }
                Err(e) => {
                    r.problems
                        .push((Level::Error, format!("cannot open pack {d}: {e}")));
                    return r;
                }
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len != size {
                let how = if len < size { "truncated: " } else { "" };
                r.problems.push((
                    Level::Error,
                    format!("pack {d} is {how}{len} bytes, its descriptor says {size}"),
                ));
            }
            match pack::read_index(&f, len, &path) {
                Ok(idx) => r.index = Some(Arc::new(idx)),
                Err(e) => r
                    .problems
                    .push((Level::Error, format!("pack {d} has a bad index: {e}"))),
            }
            if read_data && len == size {
                match hash_file(&path) {
                    Ok((got, _)) if got != *d => {
                        let again = hash_file(&path).map(|(g, _)| g).ok();
                        if again == Some(*d) {
                            r.problems.push((
                                Level::Warning,
                                format!("pack {d} read back wrong once and right the second time"),
                            ));
                        } else {
                            r.problems.push((
                                Level::Error,
                                format!("pack {d} is corrupt (its content digest is {got})"),
                            ));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => r
                        .problems
                        .push((Level::Error, format!("cannot read pack {d}: {e}"))),
                }
                if let Some(idx) = &r.index {
                    for fault in pack::check_frames(&f, idx) {
                        r.problems.push((
                            Level::Error,
                            format!(
                                "pack {d}: frame {} at offset {}: {}",
                                fault.frame, fault.offset, fault.what
                            ),
                        ));
                    }
                }
            }
            r
        })
    }

    /// Checks one snapshot manifest and everything it points at. `label` names it
    /// in findings ("snapshot 1a2b3c4d5e6f (redis:latest)").
    pub(crate) fn check_manifest(&mut self, desc: &Descriptor, label: &str) {
        let short = desc
            .snapshot_id()
            .map(|i| i.to_string())
            .unwrap_or_else(|| desc.digest.clone());
        let hint = damaged_hint(&short);
        let Some(md) = desc.blob() else {
            self.push(
                Level::Error,
                format!("{label}: malformed manifest digest {:?}", desc.digest),
                hint,
            );
            return;
        };
        self.referenced.insert(md);
        let Some(bytes) = self.blob_bytes(&md, Some(desc.size), "manifest", label, &hint) else {
            return;
        };
        let m: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                self.push(
                    Level::Error,
                    format!("{label}: manifest {md} is not a valid manifest: {e}"),
                    hint,
                );
                return;
            }
        };
        if m.media_type != layout::MT_MANIFEST
            || m.artifact_type.as_deref() != Some(layout::ARTIFACT_TYPE)
            || m.config.media_type != layout::MT_CONFIG
        {
            self.push(
                Level::Error,
                format!("{label}: manifest {md} is not a stasis checkpoint manifest"),
                hint.clone(),
            );
        }
        let mut layer_digests = Vec::new();
        for l in std::iter::once(&m.config).chain(m.layers.iter()) {
            match l.blob() {
                Some(d) => {
                    self.referenced.insert(d);
                    layer_digests.push(d);
                }
                None => self.push(
                    Level::Error,
                    format!(
                        "{label}: manifest {md} has a malformed digest {:?}",
                        l.digest
                    ),
                    hint.clone(),
                ),
            }
        }

        // Config.
        let cfg = m
            .config
            .blob()
            .and_then(|d| self.blob_bytes(&d, Some(m.config.size), "config", label, &hint));
        let cfg = cfg.and_then(|b| match SnapshotConfig::parse(&b) {
            Ok(c) => Some(c),
            Err(e) => {
                self.push(
                    Level::Error,
                    format!("{label}: config {} cannot be parsed: {e}", m.config.digest),
                    hint.clone(),
                );
                None
            }
        });
        if let Some(c) = &cfg {
            match c.computed_id() {
                Ok(id) => {
                    let claimed = [
                        desc.snapshot_id(),
                        m.annotations
                            .get(layout::A_ID)
                            .and_then(|s| super::SnapshotId::parse(s)),
                        super::SnapshotId::parse(&c.snapshot_id),
                    ];
                    if claimed.iter().any(|x| *x != Some(id)) {
                        self.push(Level::Error, format!("{label}: the snapshot id recomputed from its files ({id}) differs from the one recorded"), hint.clone());
                    }
                }
                Err(e) => self.push(Level::Error, format!("{label}: config: {e}"), hint.clone()),
            }
            if let Err(e) = c.config_json.bytes() {
                self.push(Level::Error, format!("{label}: {e}"), hint.clone());
            }
        }

        // Layers.
        // Page tables: (digest, file size) of each whose digest and header are good;
        // their digests are streamed below, never held.
        let mut tables: Vec<(BlobDigest, u64)> = Vec::new();
        let mut pack_indexes: Vec<Option<Arc<PackIndex>>> = Vec::new();
        let mut files_blob: Option<(BlobDigest, File)> = None;
        for l in &m.layers {
            let Some(d) = l.blob() else { continue };
            match l.media_type.as_str() {
                layout::MT_PAGE_TABLE => {
                    if let Err(e) = super::config::check_file_name(l.annotation(layout::A_FILE)) {
                        self.push(
                            Level::Error,
                            format!("{label}: page table {d}: {e}"),
                            hint.clone(),
                        );
                    }
                    if let Some(f) = self.blob_file(&d, l.size, "page table", label, &hint) {
                        match pagetable::TableReader::new(f, &self.blobs.path(&d)) {
                            Ok(t) => tables.push((d, t.file_size)),
                            Err(e) => {
                                self.push(Level::Error, format!("{label}: {e}"), hint.clone())
                            }
                        }
                    }
                }
                layout::MT_FILES => {
                    if let Some(f) = self.blob_file(&d, l.size, "files blob", label, &hint) {
                        files_blob = Some((d, f));
                    }
                }
                layout::MT_PACK => {
                    let r = self.check_pack(&d, l.size);
                    let problems = r.problems.clone();
                    pack_indexes.push(r.index.clone());
                    for (level, what) in problems {
                        self.push(level, format!("{label}: {what}"), hint.clone());
                    }
                }
                other => self.push(
                    Level::Warning,
                    format!("{label}: layer {d} has unknown media type {other:?}"),
                    "a newer stasis may have written it".into(),
                ),
            }
        }
        let Some(cfg) = cfg else { return };

        // Files against the config.
        let all_pages: Option<HashSet<PageDigest>> = if pack_indexes.iter().all(|i| i.is_some()) {
            Some(
                pack_indexes
                    .iter()
                    .flatten()
                    .flat_map(|i| i.digests.iter().copied())
                    .collect(),
            )
        } else {
            None
        };
        for rec in cfg.files.iter().filter(|r| r.kind == KIND_PAGES) {
            let Some(&(td, file_size)) = tables
                .iter()
                .find(|(d, _)| Some(d.to_string()) == rec.page_table)
            else {
                if !layer_digests
                    .iter()
                    .any(|d| Some(d.to_string()) == rec.page_table)
                {
                    self.push(
                        Level::Error,
                        format!(
                            "{label}: file {} has no page table in the manifest",
                            rec.name
                        ),
                        hint.clone(),
                    );
                }
                continue;
            };
            if file_size != rec.size {
                self.push(
                    Level::Error,
                    format!(
                        "{label}: page table {td} of {} describes {file_size} bytes, the config says {}",
                        rec.name, rec.size
                    ),
                    hint.clone(),
                );
                continue;
            }
            if let Err(e) = self.scan_table(&td, all_pages.as_ref(), &rec.name, label, &hint) {
                self.push(Level::Error, format!("{label}: {e}"), hint.clone());
            }
        }
        let small: BTreeMap<&str, &super::config::FileRecord> = cfg
            .files
            .iter()
            .filter(|r| r.kind == KIND_FILE)
            .map(|r| (r.name.as_str(), r))
            .collect();
        match files_blob {
            Some((d, f)) if self.read_data => self.check_files_blob(&d, f, &small, label, &hint),
            None if !small.is_empty()
                && !m.layers.iter().any(|l| l.media_type == layout::MT_FILES) =>
            {
                self.push(
                    Level::Error,
                    format!("{label}: the manifest has no files blob"),
                    hint.clone(),
                )
            }
            _ => {}
        }
    }

    /// Streams page table `td` (its digest already checked) to its end, checking
    /// that every page is in `pages` (the snapshot's packs) when those could all be
    /// read.
    fn scan_table(
        &mut self,
        td: &BlobDigest,
        pages: Option<&HashSet<PageDigest>>,
        name: &str,
        label: &str,
        hint: &str,
    ) -> super::error::Result<()> {
        let path = self.blobs.path(td);
        let f = File::open(&path).map_err(super::error::io_err("open", &path))?;
        let reader = pagetable::TableReader::new(f, &path)?;
        let first = match pages {
            // Stops at the first missing page: a hostile table claiming a huge file
            // of pages no pack holds is rejected after one chunk, not after all.
            Some(p) => {
                // Runs of one page (zero pages, or a hostile table repeating one
                // page) are looked up once.
                let mut last = None;
                reader.find(|d| {
                    if last == Some(*d) {
                        return false;
                    }
                    last = Some(*d);
                    !p.contains(d)
                })?
            }
            None => reader.find(|_| false)?,
        };
        if let Some((first, _)) = first {
            self.push(
                Level::Error,
                format!("{label}: pages of {name} are in none of the snapshot's packs (the first at offset {})", first * PAGE_SIZE as u64),
                hint.to_string(),
            );
        }
        Ok(())
    }

    fn check_files_blob(
        &mut self,
        d: &BlobDigest,
        bytes: File,
        wanted: &BTreeMap<&str, &super::config::FileRecord>,
        label: &str,
        hint: &str,
    ) {
        let path = self.blobs.path(d);
        let mut seen = HashSet::new();
        let mut problems = Vec::new();
        match ArchiveReader::new(bytes, &path) {
            Err(e) => problems.push(e.to_string()),
            Ok(mut ar) => loop {
                match ar.next_entry() {
                    Ok(None) => break,
                    Err(e) => {
                        problems.push(e.to_string());
                        break;
                    }
                    Ok(Some((name, size))) => {
                        if !wanted.contains_key(name.as_str()) {
                            // Not a file of the snapshot: stop here rather than walk
                            // however many entries a hostile blob holds.
                            problems.push(format!(
                                "files blob {d} holds {name:?}, which the config does not list"
                            ));
                            break;
                        }
                        let mut h = super::blob::HashingReader::new(ar.content(size));
                        if let Err(e) = io::copy(&mut h, &mut io::sink()) {
                            problems
                                .push(format!("files blob {d}: {name} does not decompress: {e}"));
                            break;
                        }
                        let ok = wanted.get(name.as_str()).is_some_and(|r| {
                            r.size == h.count
                                && r.sha256 == hex::encode(sha2::Digest::finalize(h.hasher))
                        });
                        if !ok {
                            problems
                                .push(format!("files blob {d}: {name} does not match the config"));
                        }
                        seen.insert(name);
                    }
                }
            },
        }
        for n in wanted.keys() {
            if !seen.contains(*n) {
                problems.push(format!("files blob {d} lacks {n}"));
            }
        }
        for p in problems {
            self.push(Level::Error, format!("{label}: {p}"), hint.to_string());
        }
    }
}

fn label_for(short: &str, tags: &[String]) -> String {
    if tags.is_empty() {
        format!("snapshot {short}")
    } else {
        format!("snapshot {short} ({})", tags.join(", "))
    }
}

pub(crate) fn verify_store(store: &Store, read_data: bool) -> super::error::Result<Vec<Finding>> {
    let blobs = store.blobs();
    let mut c = Checker::new(&blobs, read_data);
    let root = &store.paths.root;
    match fs::read(root.join(layout::OCI_LAYOUT)) {
        Ok(b)
            if serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v.get("imageLayoutVersion").cloned())
                == Some("1.0.0".into()) => {}
        _ => c.push(
            Level::Error,
            "oci-layout is missing or malformed".into(),
            format!("write {} into it", layout::OCI_LAYOUT_CONTENT),
        ),
    }
    let index = match store.read_index() {
        Ok(i) => i,
        Err(e) => {
            c.push(
                Level::Error,
                match e {
                    super::StoreError::IndexDamaged { reason, .. } => reason,
                    e => format!("index.json cannot be read: {e}"),
                },
                format!(
                    "no snapshot can be found without it and gc refuses to run; {}",
                    layout::REBUILD_HINT
                ),
            );
            return Ok(c.findings);
        }
    };
    // Each distinct manifest once, labelled with all its tags.
    let mut groups: BTreeMap<String, (Descriptor, Vec<String>)> = BTreeMap::new();
    for d in &index.manifests {
        let g = groups
            .entry(d.digest.clone())
            .or_insert_with(|| (d.clone(), Vec::new()));
        if let Some(t) = d.tag() {
            g.1.push(t.to_string());
        }
    }
    for (desc, tags) in groups.values() {
        match desc.snapshot_id() {
            Some(id) => c.check_manifest(desc, &label_for(&id.to_string(), tags)),
            None => {
                c.push(
                    Level::Warning,
                    format!(
                        "index.json entry {} is not a stasis snapshot and is not checked",
                        desc.digest
                    ),
                    "it was added by another tool; gc keeps what it references".into(),
                );
                if let Some(d) = desc.blob() {
                    c.referenced.insert(d);
                    super::gc::mark_foreign(&blobs, &d, &mut c.referenced);
                }
            }
        }
    }

    // Store-wide leftovers.
    let mut unref = (0u64, 0u64);
    if let Ok(rd) = fs::read_dir(&blobs.dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match BlobDigest::from_hex(&name) {
                Some(d) if !c.referenced.contains(&d) => {
                    unref.0 += 1;
                    unref.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
                Some(_) => {}
                None => c.push(
                    Level::Warning,
                    format!("blobs/sha256/{name} is not named by a sha256"),
                    "it was not written by stasis; move it out of the store".into(),
                ),
            }
        }
    }
    if unref.0 > 0 {
        c.push(Level::Warning, format!("{} unreferenced blob(s), {} bytes", unref.0, unref.1), "left by an interrupted checkpoint or by removed snapshots; `stasis snapshot gc` frees them".into());
    }
    if let Ok(rd) = fs::read_dir(store.paths.tmp()) {
        let old = rd
            .flatten()
            // A kept staging directory is reported on its own (cache.rs).
            .filter(|e| !super::staging::is_kept(&e.path()))
            .filter(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > TMP_MAX_AGE)
            })
            .count();
        if old > 0 {
            c.push(
                Level::Warning,
                format!("{old} temp file(s) older than an hour in tmp/"),
                "left by an interrupted stasis process; `stasis snapshot gc` removes them".into(),
            );
        }
    }
    Ok(c.findings)
}
