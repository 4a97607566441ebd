//! The snapshot metadata (the `metadata` object of a snapshot's stored config,
//! documented in src/store/FORMAT.md): one set of serde types that the checkpoint
//! writes and every reader (restore, serve, the open-files check, `snapshot
//! inspect`) parses. Every field has a default, so snapshots written by older
//! versions (fields missing) or newer ones (fields unknown) still parse.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::fstree;

/// The `metadata` object of a snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct SnapshotMeta {
    pub criu: CriuRecord,
    /// The host the snapshot was taken on; absent in very old snapshots.
    pub host: Option<HostRecord>,
    /// The bundle and root filesystem of the checkpointed container (host paths).
    pub bundle: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    /// The captured filesystem; null without one.
    pub filesystem: Option<FsInfo>,
    /// With --ignore-rootfs: the files the processes held open, so a restore
    /// onto a changed rootfs is refused.
    pub open_files: Vec<OpenFile>,
    pub timings_ms: Timings,
}

impl SnapshotMeta {
    /// The `metadata` of a stored config.json (default when absent); a value
    /// of the wrong shape is an error naming the field serde found wrong.
    pub fn of_config(cfg: &serde_json::Value) -> serde_json::Result<Self> {
        match cfg.get("metadata") {
            Some(m) if !m.is_null() => serde_json::from_value(m.clone()),
            _ => Ok(Self::default()),
        }
    }
}

/// How CRIU dumped the snapshot.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct CriuRecord {
    pub version: String,
    pub options: CriuOptionsRecord,
    /// CRIU's dump statistics by name (e.g. `frozen_time`, `pages_written`).
    pub dump_stats: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct CriuOptionsRecord {
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    /// Lower-case mode name ("soft", "full", "strict", "ignore").
    pub manage_cgroups_mode: String,
    pub empty_ns: Vec<String>,
    pub link_remap: bool,
}

/// The host a snapshot was taken on (`host::record`); empty strings and zero
/// mean unknown and are not compared.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct HostRecord {
    pub kernel: String,
    pub arch: String,
    pub page_size: u64,
    pub cpu_model: String,
    pub cpu_flags: Vec<String>,
    pub cgroup_version: String,
    pub criu_version: String,
}

/// The `filesystem` object: what the capture holds and how it went.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct FsInfo {
    pub files: u64,
    pub bytes: u64,
    pub trees: Vec<FsTreeInfo>,
    pub capture: Option<fstree::CaptureStats>,
    /// The snapshot whose stat cache spared reading unchanged files.
    pub stat_cache: Option<StatCacheRef>,
}

impl FsInfo {
    /// The record of a finished capture.
    pub fn of_capture(c: &fstree::Capture, stat_cache_base: Option<String>) -> Self {
        Self {
            files: c.manifest.files(),
            bytes: c.manifest.bytes(),
            trees: c.manifest.trees.iter().map(FsTreeInfo::of).collect(),
            capture: Some(c.stats.clone()),
            stat_cache: stat_cache_base.map(|base| StatCacheRef { base }),
        }
    }
}

/// One captured tree (the rootfs or a volume).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct FsTreeInfo {
    pub role: String,
    pub dest: String,
    pub source: PathBuf,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
}

impl FsTreeInfo {
    pub fn of(t: &fstree::Tree) -> Self {
        Self {
            role: t.role.clone(),
            dest: t.dest.clone(),
            source: t.source.clone(),
            entries: t.entries.len() as u64,
            files: t
                .entries
                .iter()
                .filter(|e| e.kind == fstree::Kind::File)
                .count() as u64,
            bytes: t.entries.iter().map(|e| e.size).sum(),
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct StatCacheRef {
    pub base: String,
}

/// A file the processes held open, relative to the rootfs.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct OpenFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `timings_ms`: fs_capture is the part of the frozen window spent on the
/// filesystem; fs_assemble is copying unchanged files and hashing.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(default)]
pub struct Timings {
    pub dump: u64,
    pub fs_capture: u64,
    pub fs_assemble: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn old_and_new_metadata_parse() {
        // An old snapshot: no host, no filesystem, fewer CRIU options.
        let old = json!({"metadata": {"criu": {"version": "3.19", "options": {"leave_running": true}},
            "bundle": "/b", "timings_ms": {"dump": 7}}});
        let m = SnapshotMeta::of_config(&old).unwrap();
        assert_eq!(m.criu.version, "3.19");
        assert!(m.criu.options.leave_running);
        assert_eq!(m.bundle, Some(PathBuf::from("/b")));
        assert_eq!((m.host, m.filesystem, m.timings_ms.dump), (None, None, 7));
        // A newer one: unknown fields are ignored.
        let new = json!({"metadata": {"future": 1, "host": {"arch": "x86_64", "extra": true},
            "open_files": [{"path": "a", "size": 1, "sha256": "00", "mode": 1}]}});
        let m = SnapshotMeta::of_config(&new).unwrap();
        assert_eq!(m.host.unwrap().arch, "x86_64");
        assert_eq!(m.open_files[0].path, "a");
        assert_eq!(
            SnapshotMeta::of_config(&json!({})).unwrap(),
            SnapshotMeta::default()
        );
    }

    #[test]
    fn stored_field_names_are_kept() {
        let m = SnapshotMeta {
            filesystem: Some(FsInfo {
                stat_cache: Some(StatCacheRef { base: "x".into() }),
                capture: Some(fstree::CaptureStats::default()),
                ..FsInfo::default()
            }),
            host: Some(HostRecord::default()),
            open_files: vec![OpenFile::default()],
            ..SnapshotMeta::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        for k in [
            "criu",
            "host",
            "bundle",
            "rootfs",
            "filesystem",
            "open_files",
            "timings_ms",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(v["criu"]["options"]["manage_cgroups_mode"].is_string());
        assert!(v["criu"]["dump_stats"].is_object());
        assert!(v["host"]["cpu_flags"].is_array());
        assert!(v["filesystem"]["capture"]["files_read_frozen"].is_u64());
        assert_eq!(v["filesystem"]["stat_cache"]["base"], "x");
        assert!(v["open_files"][0]["sha256"].is_string());
        assert!(v["timings_ms"]["fs_capture"].is_u64());
        assert!(v["timings_ms"]["fs_assemble"].is_u64());
    }
}
