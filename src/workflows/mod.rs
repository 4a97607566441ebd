//! Workflows that combine the runtime, CRIU and the snapshot store: checkpoint
//! into the store, restore from it (with the host compatibility check).

pub mod copytree;
pub mod fstree;
mod fsutil;
pub mod host;
pub mod meta;
pub mod openfiles;
pub mod podman;
pub mod prewarm;
pub mod serve;
pub mod snapshot;
pub mod trust;

use std::path::PathBuf;

use crate::runtime::RuntimeError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(Box<StoreError>),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The container was stopped by the dump (its record stays, stopped): its
    /// image is all that is left.
    #[error("storing the checkpoint failed: {source}; the container was stopped and its CRIU image is kept at {image}: restore it with `stasis delete {id} && stasis restore --image-path {image} --bundle {bundle} {id}`, then remove {}", image.parent().unwrap_or(image).display())]
    IngestFailed {
        source: Box<StoreError>,
        image: PathBuf,
        bundle: PathBuf,
        id: String,
    },
    /// The dump did not stop the container (--leave-running, or a stop
    /// deferred until the commit): it runs on, its staging is removed.
    #[error("storing the checkpoint failed: {source}; container {id} was not stopped and runs on (nothing was stored): fix the cause and checkpoint again")]
    NotStored { source: Box<StoreError>, id: String },
    #[error("snapshot {snapshot} cannot be restored on this host:\n  {}\n(--force restores anyway)", reasons.join("\n  "))]
    Incompatible {
        snapshot: String,
        reasons: Vec<String>,
    },
    /// Parsing or encoding JSON that is not a plain read or write.
    #[error("{op} {subject}: {source}")]
    Json {
        op: &'static str,
        subject: String,
        source: serde_json::Error,
    },
    /// The filesystem capture while the container was frozen failed; the
    /// runtime thaws the container.
    #[error("checkpoint of container {id}: capturing its filesystem while it was frozen failed: {source}; nothing was stored: fix the cause (or checkpoint with --ignore-rootfs / --ignore-volumes)")]
    CaptureFailed {
        id: String,
        source: Box<WorkflowError>,
    },
    /// Copying the unchanged files after the dump failed while the container runs on.
    #[error("checkpoint of container {id}: copying unchanged files after the dump failed: {source}; the container runs on and nothing was stored: fix the cause and checkpoint again")]
    AssembleFailed {
        id: String,
        source: Box<WorkflowError>,
    },
    /// Copying the unchanged files failed after the dump stopped the container.
    #[error("checkpoint of container {id}: copying unchanged files after the dump failed: {source}; the container was stopped and its CRIU image is kept at {}: restore it with `stasis restore --image-path`", image.display())]
    AssembleFailedImageKept {
        id: String,
        image: PathBuf,
        source: Box<WorkflowError>,
    },
    /// A capture asked for the previous snapshot's data without a stat cache
    /// pointing at one (a bug).
    #[error("capture the filesystem into {}: unchanged files were to come from a previous snapshot, but none is known; this is a bug: checkpoint again and report it", dir.display())]
    NoPreviousSnapshot { dir: PathBuf },
    /// The kernel's random source could not be read.
    #[error("read random bytes for the copies' generation id (getrandom): {source}; the kernel's random source is unavailable (e.g. blocked by a seccomp filter): run stasis where getrandom(2) or /dev/urandom works")]
    Random { source: getrandom::Error },
    /// A socket operation on an address (not a path).
    #[error("{op} {addr}: {source}")]
    Net {
        op: &'static str,
        addr: String,
        source: std::io::Error,
    },
    /// A signal mask change the server needs was refused.
    #[error("{op}: {source}")]
    Signals {
        op: &'static str,
        source: nix::errno::Errno,
    },
    /// `prewarm`: starting the container from its bundle failed.
    #[error("prewarm: starting {} as {id} failed: {output}; check the bundle with `stasis run`", bundle.display())]
    PrewarmStart {
        id: String,
        bundle: PathBuf,
        output: String,
    },
    /// `prewarm --warmup`: the warm-up command exited unsuccessfully.
    #[error("prewarm of {id}: warm-up command {command:?} failed with {status}; the container was removed: fix the command or drop --warmup")]
    WarmupFailed {
        id: String,
        command: String,
        status: std::process::ExitStatus,
    },
    #[error("prewarm of {id} stopped by {signal}: the container it started was removed")]
    Interrupted { id: String, signal: String },
    #[error("snapshot {snapshot}: {reason}")]
    Snapshot { snapshot: String, reason: String },
    #[error("--copies {copies} is out of range: restore 1 to {max} copies at a time (run several restores with --name-prefix for more)")]
    CopiesOutOfRange { copies: usize, max: usize },
    #[error("readiness probe {probe} never passed: {last_error}; the container was removed; its last output:\n  {}", if output.is_empty() { "(none)".to_string() } else { output.join("\n  ") })]
    ProbeFailed {
        probe: String,
        last_error: String,
        output: Vec<String>,
    },
    #[error("snapshot {snapshot}: its original bundle is gone; pass --bundle DIR with the container's config.json and rootfs")]
    NoBundle { snapshot: String },
    #[error("snapshot {snapshot}: file {file} of {} changed since the checkpoint ({detail}); restore the rootfs or checkpoint again", rootfs.display())]
    OpenFileChanged {
        snapshot: String,
        /// Path inside the container.
        file: String,
        rootfs: PathBuf,
        detail: String,
    },
    #[error("snapshot {snapshot}: the source {} of the volume mounted at {dest} is gone; recreate it, restore with --bundle DIR whose config.json mounts another source there, or checkpoint without --ignore-volumes so the snapshot carries the volume", path.display())]
    VolumeMissing {
        snapshot: String,
        path: PathBuf,
        dest: String,
    },
    #[error("materialise the root filesystem of snapshot {snapshot} into {}: {source} ({needed} bytes of file data, {free} bytes free there); the partial copy was removed: free space on that filesystem or use a store (--store) with more room", path.display())]
    NoSpace {
        snapshot: String,
        path: PathBuf,
        needed: u64,
        free: u64,
        source: std::io::Error,
    },
    #[error("mount overlay at {path} (lower layer {lower}): {source}: this kernel or filesystem cannot give the copy an overlay; restore with --copy-rootfs (a private full copy of the snapshot's rootfs) instead")]
    OverlayUnsupported {
        path: PathBuf,
        lower: PathBuf,
        source: std::io::Error,
    },
    #[error("{} of {total} copies of snapshot {snapshot} failed to restore and were cleaned up:\n  {}\n{}", failed.len(), failed.iter().map(|(id, e)| format!("{id}: {e}")).collect::<Vec<_>>().join("\n  "), if restored.is_empty() { "no copy was restored".to_string() } else { format!("restored and left running: {} (remove them with `stasis delete --force ID`)", restored.join(", ")) })]
    CopiesFailed {
        snapshot: String,
        total: usize,
        /// Ids of the copies that were restored and keep running.
        restored: Vec<String>,
        /// (id, why) of every copy that failed.
        failed: Vec<(String, String)>,
    },
}

impl From<StoreError> for WorkflowError {
    fn from(e: StoreError) -> Self {
        WorkflowError::Store(Box::new(e))
    }
}

pub type Result<T, E = WorkflowError> = std::result::Result<T, E>;
