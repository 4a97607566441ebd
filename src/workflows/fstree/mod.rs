//! A container's filesystem state as two files that travel inside a snapshot's
//! image directory, so the store deduplicates them like memory:
//! - `fsdata-0.bin`: the contents of every regular file, each starting on a 4 KiB
//!   boundary, so unchanged files (and unchanged blocks of changed files) are the
//!   same pages from one snapshot to the next wherever they move in the stream;
//! - `fs-manifest.json`: the trees (rootfs, writable volumes) with every entry's
//!   type, mode, owner, mtime, xattrs, symlink target, hard-link target, device
//!   number and data offset.
//!
//! `capture` writes them from live directories; `materialize` rebuilds the trees
//! (sparse where the data is zero pages). CRIU ignores both files.
//!
//! Submodules: `manifest` (the types, parsing, bounds checks), `capture`,
//! `materialize`, `statcache`, `diff`; metadata and xattr helpers shared with
//! copytree live in `workflows::fsutil`.

mod capture;
mod diff;
#[cfg(test)]
mod fuzz;
mod manifest;
mod materialize;
mod statcache;
#[cfg(test)]
mod tests;

pub use capture::{capture, capture_frozen, Capture, CaptureOptions, CaptureStats, Source};
pub use diff::{diff_manifests, FileDelta};
pub use manifest::{parse_manifest, read_manifest, snapshot_manifest, Entry, Kind, Manifest, Tree};
pub use materialize::materialize;
pub use statcache::{CacheTree, CachedFile, Mapped, StatCache, StatKey, STAT_CACHE_VERSION};

pub const DATA_FILE: &str = "fsdata-0.bin";
pub const MANIFEST_FILE: &str = "fs-manifest.json";
const ALIGN: u64 = 4096;
