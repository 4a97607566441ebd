//! The records `--format json` prints for scripts: one serde struct per command
//! (`snapshot ls`, `verify`, `gc`, `prune`, `checkpoint --tag`), so the shape is
//! fixed in one place and no output is built from string keys.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::store::{Finding, GcReport, Level, RepairReport, SnapshotId, SnapshotSummary};
use crate::workflows::snapshot::CheckpointResult;

/// Writes `v` as one line of JSON.
pub fn print(out: &mut impl Write, v: &impl Serialize) -> Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    writeln!(out)?;
    Ok(())
}

/// `sha256:<64 hex>`: the full id, as OCI digests are written.
fn digest(id: &SnapshotId) -> String {
    format!("sha256:{}", id.full())
}

/// One `snapshot ls --format json` row.
#[derive(Serialize)]
pub struct LsRow<'a> {
    /// The 12-hex short id, as the table shows it.
    pub id: String,
    /// The full id (`sha256:...`): unambiguous in scripts.
    pub digest: String,
    pub tags: &'a [String],
    pub created: &'a str,
    pub container: &'a str,
    /// Bytes of the snapshot's image files.
    pub size: u64,
    /// Bytes it added to the store when it was taken.
    pub new_bytes: u64,
    /// Where it came from: made here (`local`) or imported (foreign).
    pub origin: String,
}

impl<'a> From<&'a SnapshotSummary> for LsRow<'a> {
    fn from(s: &'a SnapshotSummary) -> Self {
        LsRow {
            id: s.id.short(),
            digest: digest(&s.id),
            tags: &s.tags,
            created: &s.created,
            container: &s.container,
            size: s.image_bytes,
            new_bytes: s.added_bytes,
            origin: s.origin.to_string(),
        }
    }
}

/// `snapshot verify --format json`.
#[derive(Serialize)]
pub struct Verify<'a> {
    pub store: &'a std::path::Path,
    pub errors: usize,
    pub warnings: usize,
    pub findings: &'a [Finding],
    /// With --repair: what was put back and what could not be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<&'a RepairReport>,
}

impl<'a> Verify<'a> {
    pub fn new(
        store: &'a std::path::Path,
        findings: &'a [Finding],
        repair: Option<&'a RepairReport>,
    ) -> Self {
        let count = |l: Level| findings.iter().filter(|f| f.level == l).count();
        Verify {
            store,
            errors: count(Level::Error),
            warnings: count(Level::Warning),
            findings,
            repair,
        }
    }
}

/// `snapshot gc --format json`.
#[derive(Serialize)]
pub struct Gc {
    pub dry_run: bool,
    pub blobs_removed: u64,
    pub tmp_removed: u64,
    /// Restore caches (root filesystems, verified images) removed.
    pub caches_removed: u64,
    /// Everything freed: blobs, temp files and caches.
    pub bytes_freed: u64,
}

impl Gc {
    pub fn new(r: &GcReport, caches_removed: u64, cache_bytes: u64) -> Self {
        Gc {
            dry_run: r.dry_run,
            blobs_removed: r.blobs_removed,
            tmp_removed: r.tmp_removed,
            caches_removed,
            bytes_freed: r.bytes_freed + cache_bytes,
        }
    }
}

/// `snapshot prune --format json`.
#[derive(Serialize)]
pub struct Prune {
    pub dry_run: bool,
    /// Full ids (`sha256:...`) of the snapshots forgotten (or that would be).
    pub forgotten: Vec<String>,
}

impl Prune {
    pub fn new(dry_run: bool, ids: &[SnapshotId]) -> Self {
        Prune {
            dry_run,
            forgotten: ids.iter().map(digest).collect(),
        }
    }
}

/// `checkpoint --tag ... --format json`.
#[derive(Serialize)]
pub struct Checkpoint<'a> {
    pub id: String,
    pub short_id: String,
    pub tags: &'a [String],
    /// The same snapshot was already stored: only the tags moved.
    pub existed: bool,
    pub image_bytes: u64,
    pub pages_total: u64,
    pub pages_new: u64,
    pub pages_reused: u64,
    /// Bytes added to the store.
    pub bytes_added: u64,
    pub dump_ms: u128,
    pub ingest_ms: u128,
    /// CRIU's own statistics (`*_time` in microseconds).
    pub criu: BTreeMap<&'static str, u64>,
    /// Damaged packs whose pages this snapshot stored again (see `verify --repair`).
    pub damaged_packs: Vec<String>,
}

impl<'a> Checkpoint<'a> {
    pub fn new(r: &'a CheckpointResult, tags: &'a [String]) -> Self {
        let rep = &r.report;
        Checkpoint {
            id: digest(&rep.id),
            short_id: rep.id.short(),
            tags,
            existed: rep.existed,
            image_bytes: rep.image_bytes,
            pages_total: rep.pages_total,
            pages_new: rep.pages_new,
            pages_reused: rep.pages_reused,
            bytes_added: rep.bytes_added,
            dump_ms: r.dump_ms,
            ingest_ms: r.ingest_ms,
            criu: r.stats.entries.iter().copied().collect(),
            damaged_packs: rep.damaged_packs.iter().map(|d| d.to_string()).collect(),
        }
    }
}
