//! Snapshot-level checkpoint and restore: CRIU dumps into a staging directory
//! (tmpfs when memory allows), the store ingests it after the container runs again
//! (or was stopped), and a restore materialises a verified image into staging
//! before CRIU reads a byte. Also the host record and the compatibility check.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::{host, Result, WorkflowError};
use crate::runtime::checkpoint::{CheckpointOptions, CriuStats, RestoreOptions};
use crate::runtime::Runtime;
use crate::store::{IngestOptions, IngestReport, SnapshotId, SnapshotInput, Store};

/// A staging directory removed on drop unless `keep` is called.
pub struct Staging {
    path: PathBuf,
    keep: bool,
}

impl Staging {
    /// Creates a private staging directory: on /dev/shm when it is a tmpfs with
    /// room for `need` bytes plus a margin, else under the store's `tmp/`.
    pub fn new(store_root: &Path, need: u64) -> Result<Self> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() && host::mem_available() > need.saturating_mul(2) + (256 << 20) {
            shm.to_path_buf()
        } else {
            store_root.join("tmp")
        };
        fs::create_dir_all(&base).map_err(|source| WorkflowError::Io {
            op: "create staging base",
            path: base.clone(),
            source,
        })?;
        let dir = tempfile::Builder::new()
            .prefix("stasis-staging-")
            .tempdir_in(&base)
            .map_err(|source| WorkflowError::Io {
                op: "create staging directory",
                path: base.clone(),
                source,
            })?;
        Ok(Self {
            path: dir.keep(),
            keep: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keep(&mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

pub struct TaggedCheckpoint {
    pub checkpoint: CheckpointOptions,
    pub tags: Vec<String>,
    pub compress_level: i32,
    pub progress: bool,
}

pub struct CheckpointResult {
    pub report: IngestReport,
    pub stats: CriuStats,
    pub dump_ms: u128,
    pub ingest_ms: u128,
}

/// `checkpoint ID --tag NAME`: dump to staging, then ingest into the store.
/// When the ingest fails after the container was stopped, the CRIU image is kept
/// and its path given in the error, so nothing is lost.
pub fn checkpoint_to_store(
    rt: &Runtime,
    store: &Store,
    t: &TaggedCheckpoint,
) -> Result<CheckpointResult> {
    let id = &t.checkpoint.id;
    let st = rt.load(id)?;
    let config_json =
        fs::read(st.bundle.join("config.json")).map_err(|source| WorkflowError::Io {
            op: "read config.json of",
            path: st.bundle.clone(),
            source,
        })?;
    let need = host::cgroup_memory_usage(st.pid).unwrap_or(1 << 30);
    let mut staging = Staging::new(store.root(), need)?;
    let img = staging.path().join("image");
    let work = staging.path().join("work");
    let mut opts = t.checkpoint.clone();
    opts.image_path = img.clone();
    opts.work_path = Some(work);
    let t0 = Instant::now();
    let stats = rt.checkpoint(&opts)?;
    let dump_ms = t0.elapsed().as_millis();
    let criu_version = rt.criu_version().unwrap_or_default();
    let mut host_record = host::record();
    host_record["criu_version"] = json!(criu_version);
    let metadata = json!({
        "criu": {
            "version": criu_version,
            "options": {
                "leave_running": opts.leave_running,
                "tcp_established": opts.flags.tcp_established,
                "ext_unix_sk": opts.flags.ext_unix_sk,
                "shell_job": opts.flags.shell_job,
                "file_locks": opts.flags.file_locks,
                "manage_cgroups_mode": format!("{:?}", opts.flags.manage_cgroups_mode).to_lowercase(),
                "empty_ns": opts.flags.empty_ns,
                "link_remap": opts.link_remap,
            },
            "dump_stats": stats.entries.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
        "host": host_record,
        "bundle": st.bundle,
        "rootfs": st.rootfs,
        "timings_ms": {"dump": dump_ms},
    });
    let t1 = Instant::now();
    let report = store
        .ingest(
            SnapshotInput {
                image_dir: &img,
                config_json: &config_json,
                container_id: id,
                metadata,
                tags: t.tags.clone(),
            },
            &IngestOptions {
                compress_level: t.compress_level,
                progress: t.progress,
            },
        )
        .map_err(|e| {
            let kept = staging.keep();
            WorkflowError::IngestFailed {
                source: Box::new(e),
                image: kept.join("image"),
            }
        })?;
    Ok(CheckpointResult {
        report,
        stats,
        dump_ms,
        ingest_ms: t1.elapsed().as_millis(),
    })
}

pub struct RestoreFrom {
    pub from: String,
    pub restore: RestoreOptions,
    /// Bundle given on the command line; else the one recorded in the snapshot.
    pub bundle: Option<PathBuf>,
    pub force: bool,
    pub progress: bool,
}

pub struct RestoreFromResult {
    pub id: SnapshotId,
    pub exit_code: i32,
    pub stats: CriuStats,
    pub materialize_ms: u128,
    pub restore_ms: u128,
    pub warnings: Vec<String>,
}

/// `restore --from NAME NEWID`: check compatibility, materialise the verified
/// image into staging, restore through the plain restore path, drop staging.
pub fn restore_from_store(
    rt: &Runtime,
    store: &Store,
    r: &RestoreFrom,
) -> Result<RestoreFromResult> {
    let sid = store.resolve(&r.from)?;
    let cfg = store.config(&sid)?;
    let meta = cfg.get("metadata").cloned().unwrap_or_default();
    let mut warnings = Vec::new();
    let mismatches = host::compare(meta.get("host"), &rt.criu_version().unwrap_or_default());
    if !mismatches.is_empty() {
        if r.force {
            for m in &mismatches {
                warnings.push(format!("ignoring (--force): {m}"));
            }
        } else {
            return Err(WorkflowError::Incompatible {
                snapshot: sid.short(),
                reasons: mismatches,
            });
        }
    }
    let bundle = match &r.bundle {
        Some(b) => b.clone(),
        None => meta
            .get("bundle")
            .and_then(|b| b.as_str())
            .map(PathBuf::from)
            .filter(|b| b.join("config.json").is_file())
            .ok_or_else(|| WorkflowError::NoBundle {
                snapshot: sid.short(),
            })?,
    };
    let need = cfg
        .get("sizes")
        .and_then(|s| s.get("image_bytes"))
        .and_then(|v| v.as_u64())
        .unwrap_or(1 << 30);
    let staging = Staging::new(store.root(), need)?;
    let img = staging.path().join("image");
    let t0 = Instant::now();
    store.materialize(&sid, &img, r.progress)?;
    let materialize_ms = t0.elapsed().as_millis();
    let mut opts = r.restore.clone();
    opts.image_path = img;
    opts.bundle = bundle;
    let detach = opts.detach;
    opts.detach = true;
    let t1 = Instant::now();
    let (_, stats) = rt.restore(&opts)?;
    let restore_ms = t1.elapsed().as_millis();
    drop(staging);
    let exit_code = if detach { 0 } else { rt.wait(&opts.id)? };
    Ok(RestoreFromResult {
        id: sid,
        exit_code,
        stats,
        materialize_ms,
        restore_ms,
        warnings,
    })
}
