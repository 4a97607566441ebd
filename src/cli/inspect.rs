//! `stasis snapshot inspect`: the readable summary of one snapshot (id, tags,
//! origin, container, created, sizes, host, CRIU, timings, filesystem) and the
//! full record as JSON. Reads the config blob through typed views; prints only.

use std::io::Write;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::store::{SnapshotId, SnapshotSummary, Store};
use crate::workflows::fstree;
use crate::workflows::meta::{FsTreeInfo, SnapshotMeta};

/// The parts of the config blob the summary shows (FORMAT.md "config"); every
/// field defaults, so an older or foreign record still prints.
#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct ConfigView {
    files: Vec<FileView>,
    sizes: SizesView,
    metadata: SnapshotMeta,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct FileView {
    kind: String,
}

#[derive(Deserialize, Default, Debug)]
#[serde(default, rename_all = "camelCase")]
struct SizesView {
    image_bytes: u64,
    pages_total: u64,
    pages_new: u64,
    pages_reused: u64,
    bytes_added: u64,
    ingest_ms: u64,
}

/// `--format json`: the stored config blob with what the store knows beside it
/// (id, tags, origin, index entry) and the filesystem summary.
pub fn json(
    entry: &SnapshotSummary,
    mut cfg: serde_json::Value,
    fs: serde_json::Value,
) -> serde_json::Value {
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert("id".into(), serde_json::json!(entry.id.full()));
        obj.insert("tags".into(), serde_json::json!(entry.tags));
        obj.insert("origin".into(), serde_json::json!(entry.origin));
        obj.insert("filesystem".into(), fs);
    }
    cfg
}

/// The index entry of `id` (tags, created, sizes as index.json records them).
pub fn entry(store: &Store, id: &crate::store::SnapshotId) -> Result<SnapshotSummary> {
    store
        .list()?
        .into_iter()
        .find(|e| &e.id == id)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "snapshot {} vanished from store {} while being inspected (removed by another command?); list them with `stasis snapshot ls`",
                id.short(),
                store.root().display()
            )
        })
}

/// The summary: one line per fact, then the filesystem part (`fs_lines`).
pub fn summary(
    out: &mut impl Write,
    entry: &SnapshotSummary,
    cfg: &serde_json::Value,
    human: impl Fn(u64) -> String,
) -> Result<()> {
    // A record that does not fit the view still gets its index facts printed.
    let v: ConfigView = serde_json::from_value(cfg.clone()).unwrap_or_default();
    let tags = if entry.tags.is_empty() {
        "none (untagged)".to_string()
    } else {
        entry.tags.join(", ")
    };
    writeln!(out, "snapshot {}", entry.id.full())?;
    writeln!(out, "tags: {tags}")?;
    writeln!(out, "origin: {}", entry.origin)?;
    writeln!(out, "container: {}", entry.container)?;
    writeln!(out, "created: {}", entry.created)?;
    let s = &v.sizes;
    let img_files = v.files.len();
    let pages_files = v.files.iter().filter(|f| f.kind == "pages").count();
    writeln!(
        out,
        "size: {} in {img_files} CRIU image files ({pages_files} of pages); {} added to the store",
        human(entry.image_bytes),
        human(entry.added_bytes),
    )?;
    writeln!(
        out,
        "pages: {} in total, {} new, {} shared with older snapshots",
        s.pages_total, s.pages_new, s.pages_reused
    )?;
    let h = v.metadata.host.clone().unwrap_or_default();
    let or_unknown = |x: &str| {
        if x.is_empty() {
            "unknown".to_string()
        } else {
            x.to_string()
        }
    };
    writeln!(
        out,
        "host: kernel {}, {}, cgroup {}, {}",
        or_unknown(&h.kernel),
        or_unknown(&h.arch),
        or_unknown(&h.cgroup_version),
        or_unknown(&h.cpu_model)
    )?;
    let c = &v.metadata.criu;
    // The boolean options that were on, by their stored names.
    let options = serde_json::to_value(&c.options)?;
    let on: Vec<&str> = options
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_bool() == Some(true))
        .map(|(k, _)| k.as_str())
        .collect();
    let opts = if on.is_empty() {
        String::new()
    } else {
        format!(" ({})", on.join(", "))
    };
    writeln!(out, "criu: {}{opts}", or_unknown(&c.version))?;
    let t = &v.metadata.timings_ms;
    writeln!(
        out,
        "timings: dump {} ms, filesystem capture {} ms, assemble {} ms, ingest {} ms",
        t.dump, t.fs_capture, t.fs_assemble, s.ingest_ms
    )?;
    if let Some(b) = &v.metadata.bundle {
        writeln!(out, "bundle: {}", b.display())?;
    }
    Ok(())
}

/// The filesystem part of `snapshot inspect` (JSON field `filesystem`).
#[derive(serde::Serialize)]
pub struct FsSummary {
    files: u64,
    bytes: u64,
    trees: Vec<FsTreeInfo>,
    /// Unknown (null) when another snapshot's page table cannot be read.
    data_pages: Option<u64>,
    new_pages: Option<u64>,
    new_bytes: Option<u64>,
    capture: Option<fstree::CaptureStats>,
    frozen_ms: u64,
    assemble_ms: u64,
}

/// The filesystem part of a snapshot: files and bytes captured, pages of
/// `fsdata-0.bin` and how many of them (and bytes, uncompressed) no older snapshot
/// had, and what the capture read while frozen. None when it carries no filesystem.
pub fn fs_summary(
    store: &Store,
    id: &SnapshotId,
    cfg: &serde_json::Value,
) -> Result<Option<FsSummary>> {
    let Some(m) = fstree::snapshot_manifest(store, id)? else {
        return Ok(None);
    };
    // New pages are counted against every older snapshot's page tables: one
    // unreadable blob of another snapshot leaves this count unknown, not the
    // whole inspect failed.
    let (data_pages, new_pages, new_bytes) = match store.new_pages(id, fstree::DATA_FILE) {
        Ok((pages, new)) => (Some(pages), Some(new), Some(new * 4096)),
        Err(e) => {
            eprintln!(
                "stasis: warning: cannot count the new pages of {id}'s filesystem data: {}",
                crate::store::printable(&e.to_string())
            );
            (None, None, None)
        }
    };
    let meta = SnapshotMeta::of_config(cfg)
        .with_context(|| format!("snapshot {id}: its metadata cannot be read"))?;
    Ok(Some(FsSummary {
        files: m.files(),
        bytes: m.bytes(),
        trees: m.trees.iter().map(FsTreeInfo::of).collect(),
        data_pages,
        new_pages,
        new_bytes,
        capture: meta.filesystem.and_then(|f| f.capture),
        frozen_ms: meta.timings_ms.fs_capture,
        assemble_ms: meta.timings_ms.fs_assemble,
    }))
}

pub fn print_fs_summary(out: &mut impl Write, fs: Option<&FsSummary>) -> Result<()> {
    let Some(fs) = fs else {
        writeln!(
            out,
            "filesystem: none (captured without --tag, or with --ignore-rootfs --ignore-volumes)"
        )?;
        return Ok(());
    };
    let new = match (fs.new_pages, fs.new_bytes, fs.data_pages) {
        (Some(pages), Some(bytes), Some(of)) => {
            format!("{} new to the store ({pages} of {of} pages)", human(bytes))
        }
        _ => "new to the store unknown".to_string(),
    };
    writeln!(
        out,
        "filesystem: {} files, {}; {new}",
        fs.files,
        human(fs.bytes),
    )?;
    for t in &fs.trees {
        writeln!(
            out,
            "    {} {}: {} files, {} ({})",
            t.role,
            t.dest,
            t.files,
            human(t.bytes),
            t.source.display(),
        )?;
    }
    if let Some(c) = &fs.capture {
        writeln!(
            out,
            "    capture: {} ms frozen, read {} files ({}) while frozen, {} unchanged files ({}) copied after ({} from the previous snapshot)",
            fs.frozen_ms,
            c.files_read_frozen,
            human(c.bytes_read_frozen),
            c.files_unchanged,
            human(c.bytes_unchanged),
            c.files_from_previous,
        )?;
    }
    Ok(())
}

/// A byte count as people read it: `512 B`, `1.50 MiB` (powers of 1024).
fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_a_record_with_no_metadata_still_prints_the_index_facts() {
        let e = SnapshotSummary {
            id: crate::store::SnapshotId::parse(&"ab".repeat(32)).unwrap(),
            origin: crate::store::Origin::Local,
            tags: vec!["redis:v1".into(), "redis:latest".into()],
            created: "2026-12-08T00:00:00Z".into(),
            container: "c1".into(),
            image_bytes: 2048,
            added_bytes: 1024,
        };
        let mut out = Vec::new();
        summary(&mut out, &e, &serde_json::json!({}), |n| format!("{n} B")).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("tags: redis:v1, redis:latest"), "{s}");
        assert!(s.contains("container: c1"), "{s}");
        assert!(s.contains("criu: unknown"), "{s}");
        assert!(s.lines().count() < 15, "{s}");
    }
}
