//! `StoreError`, the one error type of the store. Every variant names the path,
//! blob or snapshot it is about; messages are lowercase with no final period.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on `path` failed; `op` says which ("open", "read", "rename", ...).
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("no stasis store at {}: check --store (or $STASIS_STORE); a store is created by `stasis checkpoint --tag` or `stasis snapshot import`", path.display())]
    NoStore { path: PathBuf },

    #[error("{} is not a stasis store: {reason}", path.display())]
    NotAStore { path: PathBuf, reason: String },

    #[error("timed out after {}s waiting for the {mode} lock on {}: another stasis process holds it ({holder})", waited.as_secs(), path.display())]
    LockTimeout {
        path: PathBuf,
        mode: &'static str,
        waited: Duration,
        holder: &'static str,
    },

    #[error("no snapshot {name:?} in {}{hint}", store_name(store.as_deref()))]
    UnknownSnapshot {
        name: String,
        hint: String,
        /// The store's root, filled in by `Store` (the catalog alone knows none).
        store: Option<PathBuf>,
    },

    #[error("snapshot id prefix {prefix:?} is ambiguous, it matches: {}", candidates.join(", "))]
    AmbiguousId {
        prefix: String,
        candidates: Vec<String>,
    },

    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: String },

    /// Data read back from the store does not match its digest. Raised by
    /// materialize before a byte of the file is exposed under its real name.
    #[error("{what} in snapshot {snapshot}, file {file} at offset {offset} (blob {blob}); `stasis snapshot verify --repair` puts a good copy back if the store or an export (`--from`) has one")]
    Corrupt {
        snapshot: String,
        file: String,
        offset: u64,
        blob: String,
        what: String,
    },

    #[error("blob {digest} is missing from the store ({})", path.display())]
    MissingBlob { digest: String, path: PathBuf },

    /// A blob or store file does not have the structure FORMAT.md describes.
    #[error("bad {what} {}: {reason}", path.display())]
    Format {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    #[error("{} is a {what} of format version {major}.{minor}; this stasis reads major version {supported} only", path.display())]
    UnsupportedVersion {
        what: &'static str,
        path: PathBuf,
        major: u16,
        minor: u16,
        supported: u16,
    },

    #[error("image directory {}: {reason}", path.display())]
    ImageDir { path: PathBuf, reason: String },

    #[error("destination {}: {reason}", path.display())]
    Destination { path: PathBuf, reason: String },

    #[error("import of {} rejected: {reason}", path.display())]
    ImportRejected { path: PathBuf, reason: String },

    #[error("{op} {}: {source}", path.display())]
    Json {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The store is inconsistent in a way that makes the operation unsafe.
    #[error("store {} is damaged: {reason} (run `stasis snapshot verify`)", path.display())]
    Damaged { path: PathBuf, reason: String },

    /// `verify --repair --from` was given something that is not a readable tar.
    #[error("cannot repair from {}: {reason} (give an archive written by `stasis snapshot export`)", path.display())]
    RepairSource { path: PathBuf, reason: String },

    /// index.json is missing (while blobs exist) or unparseable: no snapshot can
    /// be found, and gc or prune would take every blob for garbage.
    #[error("store {} is damaged: {reason}; `stasis snapshot verify --rebuild-index` rebuilds index.json from the snapshot manifests in blobs/", path.display())]
    IndexDamaged { path: PathBuf, reason: String },

    /// A cached root filesystem must be rebuilt but overlays of running copies
    /// use it as their lower layer.
    #[error("cached root filesystem {} is damaged ({reason}) and running copies use it as their base: delete the copies restored from this snapshot, then retry", path.display())]
    CacheInUse { path: PathBuf, reason: String },

    #[error("{0}")]
    Invalid(String),

    /// A failure injected by a test at a named publish step.
    #[cfg(test)]
    #[error("injected fault at {0}")]
    Injected(&'static str),
}

/// `map_err` helper: `.map_err(io_err("open", &path))`.
pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

pub(crate) fn format_err(what: &'static str, path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Format {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

#[cfg(test)]
thread_local! {
    /// The publish step at which the current thread's next store operation fails.
    pub(crate) static FAULT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// A point where tests can make a publish sequence stop as if the process died
/// there. A no-op outside `cfg(test)`.
#[inline]
pub(crate) fn fault_point(_name: &'static str) -> Result<()> {
    #[cfg(test)]
    {
        if FAULT.with(|f| f.get()) == Some(_name) {
            return Err(StoreError::Injected(_name));
        }
    }
    Ok(())
}

/// "store /path" once the store is known, else "the store".
fn store_name(p: Option<&std::path::Path>) -> String {
    match p {
        Some(p) => format!("store {}", p.display()),
        None => "the store".to_string(),
    }
}

impl StoreError {
    /// Names `root` in an unknown-snapshot error (a mistyped `--store` shows here).
    pub(crate) fn in_store(self, root: &std::path::Path) -> StoreError {
        match self {
            StoreError::UnknownSnapshot { name, hint, .. } => StoreError::UnknownSnapshot {
                name,
                hint,
                store: Some(root.to_path_buf()),
            },
            e => e,
        }
    }
}
