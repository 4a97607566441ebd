//! Snapshot-level checkpoint and restore: CRIU dumps into a staging directory
//! (tmpfs when memory allows), the store ingests it after the container runs again
//! (or was stopped), and a restore materialises a verified image into staging
//! before CRIU reads a byte. Also the host record and the compatibility check.
//! One file per concern: `checkpoint` (dump, capture, commit), `statcache`
//! (unchanged-file caches), `restore` (prepare, copies, identity), `private_fs`
//! (a copy's overlay, volumes, netns), `cache` (restore caches, warm-up, gc).

mod cache;
mod checkpoint;
mod private_fs;
mod restore;
mod statcache;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::runtime::checkpoint::{CheckpointOptions, CriuStats, RestoreOptions};
use crate::store::{IngestReport, SnapshotId};

pub use cache::{gc_fs_cache, warm_cache};
pub use checkpoint::checkpoint_to_store;
pub use restore::{
    copy_ids, new_generation, prepare, restore_from_store, restore_prepared, Identity, Prepared,
};

pub struct TaggedCheckpoint {
    pub checkpoint: CheckpointOptions,
    pub tags: Vec<String>,
    pub compress_level: i32,
    pub progress: bool,
    /// Do not capture the root filesystem / the writable bind-mounted volumes.
    pub ignore_rootfs: bool,
    pub ignore_volumes: bool,
    /// Container paths not to capture.
    pub exclude: Vec<PathBuf>,
    /// Save the stat cache (`cache/fscache/ID.json`) for the next checkpoint of
    /// this container id. False for ids never checkpointed again (serve's copies:
    /// one id per copy), whose caches would only pile up.
    pub save_stat_cache: bool,
}

pub struct CheckpointResult {
    pub report: IngestReport,
    pub stats: CriuStats,
    pub dump_ms: u128,
    pub ingest_ms: u128,
}

pub struct RestoreFrom {
    pub from: String,
    pub restore: RestoreOptions,
    /// Bundle given on the command line; else the one recorded in the snapshot
    /// (or, when the snapshot carries its filesystem, its own config.json).
    pub bundle: Option<PathBuf>,
    pub force: bool,
    pub progress: bool,
    /// Number of copies; ids are `{restore.id}` for one copy, else
    /// `{name_prefix}-{i}` (or `{restore.id}-{i}`).
    pub copies: usize,
    pub name_prefix: Option<String>,
    /// How each copy's filesystem and network are set up.
    pub copy: CopyOptions,
    /// Use a foreign snapshot's stored config.json whole, hooks, host mounts and
    /// all (`--trust-snapshot-config`).
    pub trust_snapshot_config: bool,
}

/// How a restored copy gets its root filesystem and network namespace.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// A private full copy of the cached base (reflinked where the filesystem
    /// can) instead of an overlay on it, for hosts where overlayfs cannot be used.
    pub copy_rootfs: bool,
    /// An existing network namespace (a path such as /run/netns/NAME) to restore
    /// the copy into instead of a new one; several copies share it.
    pub netns: Option<PathBuf>,
}

pub struct RestoreFromResult {
    pub id: SnapshotId,
    pub exit_code: i32,
    pub stats: CriuStats,
    pub materialize_ms: u128,
    pub restore_ms: u128,
    pub warnings: Vec<String>,
    /// Ids of the restored copies.
    pub restored: Vec<String>,
    pub generation: String,
}

/// The most copies one `restore --from` brings up.
pub const MAX_COPIES: usize = 1000;
