//! Snapshot-level checkpoint and restore: CRIU dumps into a staging directory
//! (tmpfs when memory allows), the store ingests it after the container runs again
//! (or was stopped), and a restore materialises a verified image into staging
//! before CRIU reads a byte. Also the host record and the compatibility check.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::{fstree, host, Result, WorkflowError};
use crate::runtime::checkpoint::{defers_stop, CheckpointOptions, CriuStats, RestoreOptions};
use crate::runtime::{create_private_dir, create_private_dir_all, tighten_dir, Runtime};
use crate::store::{
    CacheBuild, CacheKind, CacheLookup, IngestOptions, IngestReport, SnapshotId, SnapshotInput,
    Store,
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

/// The trees to capture: the rootfs and every writable bind mount of a directory.
fn fs_sources(
    t: &TaggedCheckpoint,
    bundle: &Path,
    rootfs: &Path,
    config_json: &[u8],
) -> Vec<fstree::Source> {
    let spec: serde_json::Value = serde_json::from_slice(config_json).unwrap_or_default();
    let excl = |dest: &str| -> Vec<PathBuf> {
        t.exclude
            .iter()
            .filter_map(|x| x.strip_prefix(dest).ok().map(Path::to_path_buf))
            .filter(|x| !x.as_os_str().is_empty())
            .collect()
    };
    let mut out = Vec::new();
    if !t.ignore_rootfs {
        out.push(fstree::Source {
            role: "rootfs",
            dest: "/".into(),
            path: rootfs.to_path_buf(),
            exclude: excl("/"),
        });
    }
    if t.ignore_volumes {
        return out;
    }
    for m in spec
        .get("mounts")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
    {
        let opts: Vec<&str> = m
            .get("options")
            .and_then(|o| o.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let is_bind = m.get("type").and_then(|v| v.as_str()) == Some("bind")
            || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        if !is_bind || opts.contains(&"ro") {
            continue;
        }
        let (Some(dest), Some(src)) = (
            m.get("destination").and_then(|v| v.as_str()),
            m.get("source").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let src = if Path::new(src).is_absolute() {
            PathBuf::from(src)
        } else {
            bundle.join(src)
        };
        if !src.is_dir() || t.exclude.iter().any(|x| x == Path::new(dest)) {
            continue;
        }
        out.push(fstree::Source {
            role: "volume",
            dest: dest.to_string(),
            path: src,
            exclude: excl(dest),
        });
    }
    out
}

pub struct CheckpointResult {
    pub report: IngestReport,
    pub stats: CriuStats,
    pub dump_ms: u128,
    pub ingest_ms: u128,
}

/// `checkpoint ID --tag NAME`: dump to staging, then ingest into the store.
///
/// Without --leave-running the snapshot is committed before the container is
/// stopped: CRIU leaves the tasks frozen (`Runtime::checkpoint_with`), the
/// filesystem is captured and the image ingested and committed, and only then
/// are the tasks killed. A failure, or the death of this process, before the
/// commit leaves the container running (thawed by the next command). Where CRIU
/// must stop the tasks itself (`--tcp-established`), an ingest that fails keeps
/// the CRIU image and names it in the error, so nothing is lost either.
pub fn checkpoint_to_store(
    rt: &Runtime,
    store: &Store,
    t: &TaggedCheckpoint,
) -> Result<CheckpointResult> {
    let id = &t.checkpoint.id;
    // A bad tag must not cost the container: check every tag before the dump.
    for tag in &t.tags {
        crate::store::normalize_tag(tag)?;
    }
    // Nor a damaged store (index.json lost or unparseable): the ingest would
    // fail after the dump.
    store.list()?;
    let st = rt.load(id)?;
    let config_json =
        fs::read(st.bundle.join("config.json")).map_err(|source| WorkflowError::Io {
            op: "read config.json of",
            path: st.bundle.clone(),
            source,
        })?;
    // Right after a lazy restore the memory is not all in yet: size the staging
    // area once it is.
    rt.wait_lazy_pages(id)?;
    let need = host::cgroup_memory_usage(st.pid).unwrap_or(1 << 30);
    let mut staging = store.staging(need)?;
    let img = staging.path().join("image");
    let work = staging.path().join("work");
    let mut opts = t.checkpoint.clone();
    opts.image_path = img.clone();
    opts.work_path = Some(work);
    // The filesystem is captured right after the dump, while the container is
    // still frozen, so files and memory agree. The stat cache keeps that window
    // short: files whose key matches the last capture are only statted while
    // frozen and copied later (`fstree::Capture::finish`).
    let sources = fs_sources(t, &st.bundle, &st.rootfs, &config_json);
    let cache_path = store.stat_cache_path(id);
    // The snapshot the stat cache points into supplies the unchanged files after
    // the dump: a pin (the shared store lock), held from this check until the
    // ingest is done, keeps `snapshot rm`, gc and prune from removing it in
    // between. The ingest takes its own shared lock, which the pin never blocks.
    let (cache, pin) = if sources.is_empty() {
        (None, None)
    } else {
        let pin = store.pin()?;
        let found = usable_stat_cache(store, &cache_path).or_else(|| {
            st.owned_dir
                .as_deref()
                .and_then(|owned| copy_stat_cache(store, owned, &st.rootfs))
        });
        match found {
            Some(c) => (Some(c), Some(pin)),
            None => (None, None),
        }
    };
    // Without the rootfs in the snapshot, the files the processes hold open are
    // recorded so a restore onto a changed rootfs is refused: listed and hashed
    // after the dump while the container is still frozen, so the digests are the
    // checkpoint's contents. The list taken now stands in when the tasks are
    // already gone by then (CRIU kills them itself with --tcp-established).
    let open_before = if t.ignore_rootfs {
        super::openfiles::list(&st.rootfs, &container_pids(st.pid))
    } else {
        Vec::new()
    };
    let mut c = Commit {
        rt,
        store,
        t,
        st: &st,
        opts: &opts,
        config_json: &config_json,
        cache: cache.as_ref(),
        prev_dir: staging.path().join("previous"),
        staging: &mut staging,
        tasks_survive: opts.leave_running || defers_stop(&opts),
        capture: None,
        open_files: serde_json::Value::Array(Vec::new()),
        failure: None,
        report: None,
        timings: Timings::default(),
    };
    let t0 = Instant::now();
    let res = rt.checkpoint_with(&opts, &mut |cs, stats| {
        c.timings.dump = t0.elapsed().as_millis();
        c.capture_frozen(cs, &sources, &open_before)?;
        if !opts.leave_running {
            // Committed before the container is stopped (or, with CRIU's own
            // stop, before its mounts go).
            match c.commit(stats) {
                Ok(report) => c.report = Some(report),
                Err(e) => {
                    let msg = e.to_string();
                    c.failure = Some(e);
                    return Err(crate::runtime::RuntimeError::Invalid(msg));
                }
            }
        }
        Ok(())
    });
    let stats = match (res, c.failure.take(), c.report.take()) {
        (Ok(stats), _, Some(report)) => {
            drop(pin);
            return Ok(c.done(report, stats, &cache_path));
        }
        (Ok(stats), _, None) => stats,
        (Err(e), _, Some(report)) => {
            return Err(WorkflowError::Snapshot {
                snapshot: report.id.to_string(),
                reason: format!("committed, but stopping container {id} afterwards failed: {e}; remove it with `stasis delete --force {id}`"),
            })
        }
        (Err(_), Some(f), None) => return Err(f),
        (Err(mut e), None, None) => {
            // The staging directory goes away: keep the CRIU log the error names.
            crate::runtime::checkpoint::keep_failed_log_as(&mut e, "checkpoint", id);
            return Err(e.into());
        }
    };
    // --leave-running: the container runs on (thawed); store the image now.
    c.timings.dump = t0.elapsed().as_millis();
    let report = c.commit(&stats)?;
    drop(pin);
    Ok(c.done(report, stats, &cache_path))
}

#[derive(Default)]
struct Timings {
    dump: u128,
    capture: u128,
    assemble: u128,
    ingest: u128,
}

/// What a tagged checkpoint carries from the dump to the commit.
struct Commit<'a> {
    rt: &'a Runtime,
    store: &'a Store,
    t: &'a TaggedCheckpoint,
    st: &'a crate::runtime::ContainerState,
    opts: &'a CheckpointOptions,
    config_json: &'a [u8],
    cache: Option<&'a (fstree::StatCache, SnapshotId)>,
    prev_dir: PathBuf,
    staging: &'a mut crate::store::Staging,
    /// The container's tasks outlive the dump (--leave-running, or frozen until
    /// the commit): a failure before the commit costs nothing but the attempt.
    tasks_survive: bool,
    capture: Option<fstree::Capture>,
    open_files: serde_json::Value,
    /// The error of a commit that failed inside the dump callback.
    failure: Option<WorkflowError>,
    report: Option<IngestReport>,
    timings: Timings,
}

impl Commit<'_> {
    /// While the container is frozen: record the open files (without the
    /// rootfs) and capture the filesystem (`fstree::capture_frozen`).
    fn capture_frozen(
        &mut self,
        cs: &crate::runtime::ContainerState,
        sources: &[fstree::Source],
        open_before: &[String],
    ) -> crate::runtime::Result<()> {
        if self.t.ignore_rootfs {
            let mut paths = super::openfiles::list(&cs.rootfs, &container_pids(cs.pid));
            if paths.is_empty() {
                paths = open_before.to_vec();
            }
            self.open_files = super::openfiles::digests(&cs.rootfs, &paths);
        }
        if sources.is_empty() {
            return Ok(());
        }
        let c0 = Instant::now();
        let copts = fstree::CaptureOptions {
            cache: self.cache.map(|(c, _)| c),
            mapped: fstree::Mapped::of_pids(&container_pids(cs.pid)),
            ..Default::default()
        };
        let c = fstree::capture_frozen(sources, &self.opts.image_path, &copts).map_err(|e| {
            crate::runtime::RuntimeError::Invalid(format!("capture the filesystem: {e}"))
        })?;
        self.timings.capture = c0.elapsed().as_millis();
        self.capture = Some(c);
        Ok(())
    }

    /// Copies the unchanged files, writes the metadata and ingests the image:
    /// the snapshot is committed when this returns Ok.
    fn commit(&mut self, stats: &CriuStats) -> Result<IngestReport> {
        let id = &self.opts.id;
        let a0 = Instant::now();
        let mut fs_info = serde_json::Value::Null;
        if let Some(c) = self.capture.as_mut() {
            let (cache, prev_dir, store) = (self.cache, &self.prev_dir, self.store);
            // `fresh`: the copy given before did not match a file's digest;
            // materialise one verified from the store instead of using the cache.
            let mut previous = |fresh: bool| -> Result<PathBuf> {
                let (_, sid) = cache.ok_or_else(|| WorkflowError::Io {
                    op: "capture the filesystem",
                    path: prev_dir.clone(),
                    source: std::io::Error::other("no previous snapshot for unchanged files"),
                })?;
                if fresh {
                    let _ = fs::remove_dir_all(prev_dir);
                    return Ok(store.materialize_file(sid, fstree::DATA_FILE, prev_dir)?);
                }
                previous_fs_data(store, sid, prev_dir)
            };
            if let Err(e) = c.finish(&mut previous) {
                return Err(if self.tasks_survive {
                    WorkflowError::Io {
                        op: "copying unchanged files after the dump failed (the container runs on; nothing was stored) for container",
                        path: PathBuf::from(id),
                        source: std::io::Error::other(e.to_string()),
                    }
                } else {
                    // The container is stopped: its image is all that is left of it.
                    WorkflowError::Io {
                        op: "copying unchanged files after the dump failed; the CRIU image is kept at",
                        path: self.staging.keep_image(),
                        source: std::io::Error::other(e.to_string()),
                    }
                });
            }
            self.timings.assemble = a0.elapsed().as_millis();
            fs_info = fs_info_of(c, self.cache);
        }
        let metadata = self.metadata(stats, fs_info);
        // Tests park here to look at the staging directory holding the dump.
        crate::runtime::fault_point("checkpoint.before-ingest");
        let t1 = Instant::now();
        let report = self
            .store
            .ingest(
                SnapshotInput {
                    image_dir: &self.opts.image_path,
                    config_json: self.config_json,
                    container_id: id,
                    metadata,
                    tags: self.t.tags.clone(),
                },
                &IngestOptions {
                    compress_level: self.t.compress_level,
                    progress: self.t.progress,
                    // The captured file contents, page-aligned per file:
                    // deduplicated per page like memory.
                    page_stored: vec![fstree::DATA_FILE.to_string()],
                },
            )
            .map_err(|e| {
                // Running on (--leave-running, or the stop deferred until the
                // commit), the container needs no image: the staging (possibly
                // hundreds of MiB of RAM on /dev/shm) goes.
                if self.tasks_survive {
                    WorkflowError::NotStored {
                        source: Box::new(e),
                        id: id.clone(),
                    }
                } else {
                    WorkflowError::IngestFailed {
                        source: Box::new(e),
                        image: self.staging.keep_image(),
                        bundle: self.st.bundle.clone(),
                        id: id.clone(),
                    }
                }
            })?;
        self.timings.ingest = t1.elapsed().as_millis();
        crate::runtime::fault_point("checkpoint.after-commit");
        Ok(report)
    }

    fn metadata(&self, stats: &CriuStats, fs_info: serde_json::Value) -> serde_json::Value {
        let opts = self.opts;
        let criu_version = self.rt.criu_version().unwrap_or_default();
        let mut host_record = host::record();
        host_record["criu_version"] = json!(criu_version);
        json!({
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
            "bundle": self.st.bundle,
            "rootfs": self.st.rootfs,
            "filesystem": fs_info,
            "open_files": self.open_files,
            // fs_capture: the part of the frozen window spent on the filesystem;
            // fs_assemble: copying unchanged files and hashing.
            "timings_ms": {"dump": self.timings.dump, "fs_capture": self.timings.capture, "fs_assemble": self.timings.assemble},
        })
    }

    /// After the commit: saves the stat cache for the next checkpoint of this
    /// container id (a failed write only costs the next capture its speed).
    fn done(&self, report: IngestReport, stats: CriuStats, cache_path: &Path) -> CheckpointResult {
        if let (true, Some(c)) = (self.t.save_stat_cache, &self.capture) {
            let _ = c.stat_cache(&report.id.full()).save(cache_path);
        }
        CheckpointResult {
            report,
            stats,
            dump_ms: self.timings.dump,
            ingest_ms: self.timings.ingest,
        }
    }
}

/// The `filesystem` metadata of a finished capture.
fn fs_info_of(
    c: &fstree::Capture,
    cache: Option<&(fstree::StatCache, SnapshotId)>,
) -> serde_json::Value {
    let m = &c.manifest;
    json!({
        "files": m.files(),
        "bytes": m.bytes(),
        "trees": m.trees.iter().map(|t| json!({
            "role": t.role, "dest": t.dest, "source": t.source, "entries": t.entries.len(),
            "files": t.entries.iter().filter(|e| e.kind == fstree::Kind::File).count(),
            "bytes": t.entries.iter().map(|e| e.size).sum::<u64>(),
        })).collect::<Vec<_>>(),
        "capture": c.stats,
        "stat_cache": cache.map(|(_, sid)| json!({"base": sid.to_string()})),
    })
}

/// The stat cache of a container if the snapshot its entries point into is still
/// in the store (a removed one could not supply unchanged files after the thaw).
fn usable_stat_cache(store: &Store, path: &Path) -> Option<(fstree::StatCache, SnapshotId)> {
    let c = fstree::StatCache::load(path)?;
    let sid = SnapshotId::parse(&c.snapshot)?;
    store.resolve(&sid.full()).ok().filter(|r| *r == sid)?;
    Some((c, sid))
}

/// Names the snapshot an overlay copy was restored from (full id), in its
/// private directory.
const COPY_SNAPSHOT_FILE: &str = "snapshot";

/// The first checkpoint of a copy restored onto an overlay: every file of its
/// rootfs that was never copied up is still the snapshot's own (the read-only
/// base), so a stat cache built from the snapshot's manifest and a stat taken
/// now spares reading those files while frozen. A file counts only when its stat
/// matches the manifest's size, its ctime is older than the racy margin, and it
/// is absent from the upper layer when checked *after* the stat (copy-up is
/// one-way, and gives the file a new ctime, so a later copy-up or write changes
/// the key the capture compares).
fn copy_stat_cache(
    store: &Store,
    owned: &Path,
    rootfs: &Path,
) -> Option<(fstree::StatCache, SnapshotId)> {
    let upper = owned.join("upper");
    if !upper.is_dir() || rootfs != owned.join("merged") {
        return None;
    }
    let sid = SnapshotId::parse(
        fs::read_to_string(owned.join(COPY_SNAPSHOT_FILE))
            .ok()?
            .trim(),
    )?;
    let base = store.cache_dir(CacheKind::Rootfs, &sid).join("rootfs");
    store.resolve(&sid.full()).ok().filter(|r| *r == sid)?;
    let bytes = store.read_file(&sid, fstree::MANIFEST_FILE).ok()?;
    let m = fstree::parse_manifest(&bytes, Path::new(fstree::MANIFEST_FILE)).ok()?;
    let tree = m.trees.iter().find(|t| t.role == "rootfs")?;
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .saturating_sub(std::time::Duration::from_secs(2));
    let mut files = std::collections::BTreeMap::new();
    for e in &tree.entries {
        let (fstree::Kind::File, Some(offset), Some(sha256)) = (&e.kind, e.offset, &e.sha256)
        else {
            continue;
        };
        let Ok(md) = fs::symlink_metadata(rootfs.join(&e.path)) else {
            continue;
        };
        let key = fstree::StatKey::of(&md);
        // The file the copy sees must be the base's own inode, unmodified (not a
        // file renamed over from elsewhere in the base, nor a copied-up hard link).
        let Ok(bmd) = fs::symlink_metadata(base.join(&e.path)) else {
            continue;
        };
        let bkey = fstree::StatKey::of(&bmd);
        if (
            bkey.ino,
            bkey.size,
            bkey.mtime,
            bkey.mtime_nsec,
            bkey.ctime,
            bkey.ctime_nsec,
        ) != (
            key.ino,
            key.size,
            key.mtime,
            key.mtime_nsec,
            key.ctime,
            key.ctime_nsec,
        ) {
            continue;
        }
        let ctime = std::time::Duration::new(
            u64::try_from(key.ctime).unwrap_or(u64::MAX),
            u32::try_from(key.ctime_nsec).unwrap_or(0),
        );
        if !md.is_file() || key.size != e.size || ctime >= cutoff {
            continue;
        }
        match fs::symlink_metadata(upper.join(&e.path)) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            _ => continue,
        }
        files.insert(
            e.path.clone(),
            fstree::CachedFile {
                key,
                offset,
                sha256: sha256.clone(),
            },
        );
    }
    let cache = fstree::StatCache {
        version: fstree::STAT_CACHE_VERSION,
        snapshot: sid.full(),
        trees: vec![fstree::CacheTree {
            source: rootfs.to_path_buf(),
            files,
        }],
    };
    Some((cache, sid))
}

/// The verified `fsdata-0.bin` of snapshot `sid`: the copy under `cache/img/` when
/// a restore already materialised it, else only that file materialised into `dir`.
fn previous_fs_data(store: &Store, sid: &SnapshotId, dir: &Path) -> Result<PathBuf> {
    if let Some(img) = store.cache_ready(CacheKind::Image, sid) {
        let cached = img.join(fstree::DATA_FILE);
        if cached.is_file() {
            return Ok(cached);
        }
    }
    Ok(store.materialize_file(sid, fstree::DATA_FILE, dir)?)
}

/// Every process of the container: the cgroup of its init (v2, or v1's `pids`,
/// `memory` or `freezer` hierarchy) and its descendants' cgroups. Empty when
/// unreadable; then no file counts as mapped.
fn container_pids(pid: i32) -> Vec<i32> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return Vec::new();
    };
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut p = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (p.next(), p.next(), p.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            // The root cgroup would be every process of the host.
            continue;
        }
        if ctrls.is_empty() {
            dirs.push(Path::new("/sys/fs/cgroup").join(rel));
        } else if let Some(c) = ["pids", "memory", "freezer"]
            .iter()
            .find(|c| ctrls.split(',').any(|x| x == **c))
        {
            dirs.push(Path::new("/sys/fs/cgroup").join(c).join(rel));
        }
    }
    let mut pids = vec![pid];
    for d in dirs {
        let mut stack = vec![d];
        while let Some(d) = stack.pop() {
            if let Ok(t) = fs::read_to_string(d.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        if pids.len() > 1 {
            break;
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
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

/// A snapshot materialised and checked, ready to be restored any number of times.
pub struct Prepared {
    pub sid: SnapshotId,
    pub image: PathBuf,
    pub manifest: Option<fstree::Manifest>,
    pub meta: serde_json::Value,
    /// The config.json a restore uses: the stored one, or for a foreign snapshot
    /// a copy without its host-affecting settings (`trust`).
    pub config_json: Vec<u8>,
    /// The config.json exactly as stored.
    pub stored_config_json: Vec<u8>,
    /// Where the snapshot came from, as the store recorded it.
    pub origin: crate::store::Origin,
    /// Whether what the snapshot records about this host (its bundle path) may
    /// be used: made here, or `--trust-snapshot-config`.
    pub trusted: bool,
    /// The warning lines naming what was skipped from a foreign config.json.
    pub ignored: Vec<String>,
    /// Why a foreign snapshot must not be restored at all unless the operator
    /// trusts it (`--trust-snapshot-config`): its image gives its processes
    /// capabilities beyond the default set.
    pub refused: Option<String>,
    pub warnings: Vec<String>,
    pub materialize_ms: u128,
}

/// Resolves, checks compatibility and materialises the verified image.
pub fn prepare(
    rt: &Runtime,
    store: &Store,
    from: &str,
    force: bool,
    progress: bool,
) -> Result<Prepared> {
    let sid = store.resolve(from)?;
    let cfg = store.config(&sid)?;
    let meta = cfg.get("metadata").cloned().unwrap_or_default();
    let mut warnings = Vec::new();
    let mismatches = host::compare(meta.get("host"), &rt.criu_version().unwrap_or_default());
    if !mismatches.is_empty() {
        if force {
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
    // The verified image is kept under the store's cache (`cache/img/`): the
    // first restore of a snapshot materialises and verifies it, later restores
    // (more copies, serve's pool) read it directly. CRIU never writes to it.
    let t0 = Instant::now();
    let img = cached(store, CacheKind::Image, &sid, |b| {
        store.materialize(&sid, b.path(), progress)?;
        Ok(())
    })?;
    let materialize_ms = t0.elapsed().as_millis();
    let manifest = fstree::read_manifest(&img)?;
    let config_json = store.config_json(&sid)?;
    let origin = store.origin(&sid)?;
    let mut p = Prepared {
        sid,
        image: img,
        manifest,
        meta,
        config_json: config_json.clone(),
        stored_config_json: config_json,
        origin,
        trusted: origin.is_local(),
        ignored: Vec::new(),
        refused: None,
        warnings,
        materialize_ms,
    };
    if !origin.is_local() {
        super::trust::restrict(&mut p)?;
    }
    Ok(p)
}

/// Who a restored copy is: exposed to it as /.stasis/identity.json, as env vars of
/// exec'd processes (STASIS_GENERATION, STASIS_COPY_INDEX, STASIS_SNAPSHOT,
/// STASIS_CONTAINER_ID) and to its poststart hooks.
#[derive(Clone, Debug)]
pub struct Identity {
    pub generation: String,
    pub index: usize,
    pub snapshot: String,
}

impl Identity {
    fn env(&self, id: &str) -> Vec<String> {
        vec![
            format!("STASIS_GENERATION={}", self.generation),
            format!("STASIS_COPY_INDEX={}", self.index),
            format!("STASIS_SNAPSHOT={}", self.snapshot),
            format!("STASIS_CONTAINER_ID={id}"),
        ]
    }
}

/// A fresh random generation id (16 hex digits).
pub fn new_generation() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    hex::encode(b)
}

/// The complete cache entry of `kind` for `sid`, built by `build` (into
/// `CacheBuild::path`) when missing or damaged; the store marks it complete.
/// Later callers, in this or another process, reuse it.
fn cached(
    store: &Store,
    kind: CacheKind,
    sid: &SnapshotId,
    build: impl FnOnce(&CacheBuild) -> Result<()>,
) -> Result<PathBuf> {
    match store.cache_lookup(kind, sid)? {
        CacheLookup::Ready(p) => Ok(p),
        CacheLookup::Build(b) => {
            build(&b)?;
            Ok(b.commit()?)
        }
    }
}

/// Builds the restore caches of a snapshot ahead of time: the verified CRIU image
/// (`cache/img/`) and, when the snapshot carries its filesystem, the read-only
/// base of its rootfs (`cache/fs/`). A later `restore --from` (or serve's pool)
/// then goes straight to CRIU. Returns the milliseconds it took.
pub fn warm_cache(rt: &Runtime, store: &Store, from: &str) -> Result<u128> {
    let t0 = Instant::now();
    let p = prepare(rt, store, from, false, false)?;
    if p.manifest.is_some() {
        ensure_base(store, &p)?;
    }
    Ok(t0.elapsed().as_millis())
}

/// The read-only, verified base of a snapshot's root filesystem under the store's
/// cache (`cache/fs/`), materialised once and shared by every copy.
fn ensure_base(store: &Store, p: &Prepared) -> Result<PathBuf> {
    let Some(manifest) = &p.manifest else {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: "it carries no filesystem".into(),
        });
    };
    let Some(root_index) = manifest.trees.iter().position(|t| t.role == "rootfs") else {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: "its filesystem has no rootfs tree (fs-manifest.json)".into(),
        });
    };
    cached(store, CacheKind::Rootfs, &p.sid, |b| {
        let tmp = b.path();
        fstree::materialize(manifest, root_index, &p.image.join(fstree::DATA_FILE), tmp).map_err(
            |e| match e {
                // A full disk is told as such, with the space free once the
                // partial base is gone (`cached` would remove it only after this,
                // and measured with it the free space is about 0).
                WorkflowError::Io { source, .. }
                    if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
                {
                    let _ = fs::remove_dir_all(tmp);
                    WorkflowError::NoSpace {
                        snapshot: p.sid.short(),
                        path: b.target(),
                        needed: manifest.trees[root_index]
                            .entries
                            .iter()
                            .map(|e| e.size)
                            .sum(),
                        free: free_bytes(b.target().parent().unwrap_or(tmp)),
                        source,
                    }
                }
                e => e,
            },
        )
    })
}

/// Bytes available to us on the filesystem of `p` (0 when unknown).
fn free_bytes(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .unwrap_or(0)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError {
    let path = path.to_path_buf();
    move |source| WorkflowError::Io { op, path, source }
}

/// Gives container `id` a private filesystem: an overlay on the cached base, its
/// own copy of every volume, and a bundle whose config (`bundle`'s config.json,
/// else the snapshot's own) points at them. Returns (bundle dir, owned dir).
fn private_fs(
    rt: &Runtime,
    store: &Store,
    p: &Prepared,
    id: &str,
    bundle: Option<&Path>,
    ident: &Identity,
    copy: &CopyOptions,
) -> Result<(PathBuf, PathBuf)> {
    let manifest = p.manifest.as_ref().ok_or_else(|| WorkflowError::Snapshot {
        snapshot: p.sid.short(),
        reason: "it carries no filesystem".into(),
    })?;
    let config_json = match bundle {
        Some(b) => fs::read(b.join("config.json")).map_err(io_err("read config.json of", b))?,
        None => p.config_json.clone(),
    };
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&config_json).map_err(|e| WorkflowError::Io {
            op: "parse the config.json for",
            path: bundle.map_or_else(|| PathBuf::from(id), Path::to_path_buf),
            source: std::io::Error::other(e),
        })?;
    // The bind mounts the snapshot does not carry keep their host sources, which
    // must still be there: checked before anything is built.
    let carried: Vec<&str> = manifest
        .trees
        .iter()
        .filter(|t| t.role == "volume")
        .map(|t| t.dest.as_str())
        .collect();
    // The recorded bundle is a host path: only a trusted snapshot's counts.
    let sources = if p.trusted {
        source_bundle(bundle, &p.meta)
    } else {
        bundle
    };
    check_volume_sources(&p.sid.short(), &mut cfg, sources, &carried)?;
    let base = ensure_base(store, p)?;
    // A copy with a full rootfs copy lives on the store's filesystem, next to the
    // base (`cache/copies/ID`): FICLONE reflinks only within one filesystem, and
    // `--root` is usually a tmpfs (/run/stasis), where the copy would take RAM.
    // The state records the directory, so `delete` removes it either way.
    let copies = if copy.copy_rootfs {
        store.copies_dir()
    } else {
        rt.root().join(".copies")
    };
    // 0700: a copy's tree holds the snapshot's setuid binaries and device nodes.
    create_private_dir_all(&copies).map_err(io_err("create", &copies))?;
    tighten_dir(&copies).map_err(io_err("make private (chmod 0700)", &copies))?;
    let owned = copies.join(id);
    // The caller holds the container's lock and no container `id` exists: a
    // directory here was left by a restore killed before it recorded the
    // container (its overlay may still be mounted). Remove it and start afresh.
    if fs::symlink_metadata(&owned).is_ok() {
        crate::runtime::unmount_under(&owned);
        fs::remove_dir_all(&owned).map_err(io_err(
            "remove the private filesystem a killed restore left at",
            &owned,
        ))?;
    }
    // Not create_dir_all: the directory is ours only if we created it.
    create_private_dir(&owned).map_err(io_err("create private filesystem", &owned))?;
    let (upper, work, merged) = (
        owned.join("upper"),
        owned.join("work"),
        owned.join("merged"),
    );
    let result = (|| -> Result<PathBuf> {
        // The root: an overlay on the base, or (--copy-rootfs) a full copy of it.
        let root = if copy.copy_rootfs {
            let root = owned.join("rootfs");
            super::copytree::copy_tree(&base, &root)?;
            root
        } else {
            for d in [&upper, &work, &merged] {
                fs::create_dir_all(d).map_err(io_err("create", d))?;
            }
            merged.clone()
        };
        // The identity file, visible at /.stasis/identity.json.
        let idir = if copy.copy_rootfs {
            root.join(".stasis")
        } else {
            upper.join(".stasis")
        };
        fs::create_dir_all(&idir).map_err(io_err("create", &idir))?;
        let ijson = json!({
            "generation": ident.generation, "copy_index": ident.index,
            "snapshot": ident.snapshot, "container_id": id,
        });
        fs::write(idir.join("identity.json"), ijson.to_string()).map_err(io_err("write", &idir))?;
        if !copy.copy_rootfs {
            // For the stat cache of the copy's first checkpoint (`copy_stat_cache`).
            let f = owned.join(COPY_SNAPSHOT_FILE);
            fs::write(&f, p.sid.full()).map_err(io_err("write", &f))?;
            mount_overlay(&base, &upper, &work, &merged)?;
            crate::runtime::fault_point("restore.after-overlay");
        }
        cfg["root"]["path"] = json!(root);
        if let Some(ns) = &copy.netns {
            set_netns_path(&mut cfg, ns);
        }
        // Volumes: each copy gets its own, materialised from the snapshot.
        let data = p.image.join(fstree::DATA_FILE);
        for (i, t) in manifest.trees.iter().enumerate() {
            if t.role != "volume" {
                continue;
            }
            let vdir = owned.join("volumes").join(i.to_string());
            fstree::materialize(manifest, i, &data, &vdir)?;
            if let Some(mounts) = cfg.get_mut("mounts").and_then(|m| m.as_array_mut()) {
                for m in mounts.iter_mut() {
                    if m.get("destination").and_then(|d| d.as_str()) == Some(t.dest.as_str()) {
                        m["source"] = json!(vdir);
                    }
                }
            }
        }
        if let Some(env) = cfg
            .get_mut("process")
            .and_then(|p| p.get_mut("env"))
            .and_then(|e| e.as_array_mut())
        {
            env.retain(|v| !v.as_str().is_some_and(|s| s.starts_with("STASIS_")));
            env.extend(ident.env(id).into_iter().map(serde_json::Value::from));
        }
        let bdir = owned.join("bundle");
        fs::create_dir_all(&bdir).map_err(io_err("create", &bdir))?;
        let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| WorkflowError::Io {
            op: "encode config.json in",
            path: bdir.clone(),
            source: std::io::Error::other(e),
        })?;
        fs::write(bdir.join("config.json"), bytes).map_err(io_err("write", &bdir))?;
        Ok(bdir)
    })();
    match result {
        Ok(b) => Ok((b, owned)),
        Err(e) => {
            let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir_all(&owned);
            Err(e)
        }
    }
}

/// Mounts the overlay of a copy; a kernel or filesystem that cannot do it
/// (no overlayfs, an upper or lower directory on a filesystem overlayfs refuses)
/// is told apart from other failures, with the `--copy-rootfs` way out.
fn mount_overlay(base: &Path, upper: &Path, work: &Path, merged: &Path) -> Result<()> {
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        base.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| {
        use nix::errno::Errno;
        if matches!(e, Errno::EINVAL | Errno::ENODEV | Errno::EOPNOTSUPP) {
            WorkflowError::OverlayUnsupported {
                path: merged.to_path_buf(),
                lower: base.to_path_buf(),
                source: e.into(),
            }
        } else {
            WorkflowError::Io {
                op: "mount overlay at",
                path: merged.to_path_buf(),
                source: e.into(),
            }
        }
    })
}

/// The directory a copy's relative bind sources are relative to: the bundle
/// given to the restore (whose config.json the copy runs with), else the one
/// recorded at the checkpoint.
fn source_bundle<'a>(given: Option<&'a Path>, meta: &'a serde_json::Value) -> Option<&'a Path> {
    given.or_else(|| meta.get("bundle").and_then(|b| b.as_str()).map(Path::new))
}

/// Refuses a spec whose bind mount (volume) source is gone, naming the source
/// and the destination; relative sources are made absolute against `bundle`.
/// Mounts at a destination in `carried` (volumes the snapshot brings along,
/// whose source is replaced) are left alone.
fn check_volume_sources(
    snapshot: &str,
    cfg: &mut serde_json::Value,
    bundle: Option<&Path>,
    carried: &[&str],
) -> Result<()> {
    let Some(mounts) = cfg.get_mut("mounts").and_then(|m| m.as_array_mut()) else {
        return Ok(());
    };
    for m in mounts.iter_mut() {
        let bind = m.get("type").and_then(|t| t.as_str()) == Some("bind")
            || m.get("options")
                .and_then(|o| o.as_array())
                .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
        let (true, Some(src), Some(dest)) = (
            bind,
            m.get("source").and_then(|v| v.as_str()).map(PathBuf::from),
            m.get("destination")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        ) else {
            continue;
        };
        if carried.contains(&dest.as_str()) {
            continue;
        }
        let src = match bundle {
            Some(b) if src.is_relative() => {
                let abs = b.join(&src);
                m["source"] = json!(abs);
                abs
            }
            _ => src,
        };
        if fs::symlink_metadata(&src).is_err() {
            return Err(WorkflowError::VolumeMissing {
                snapshot: snapshot.to_string(),
                path: src,
                dest,
            });
        }
    }
    Ok(())
}

/// Points the spec's network namespace at `ns` (adding the entry if the spec
/// had none).
fn set_netns_path(cfg: &mut serde_json::Value, ns: &Path) {
    let linux = &mut cfg["linux"];
    if !linux["namespaces"].is_array() {
        linux["namespaces"] = json!([]);
    }
    if let Some(list) = linux["namespaces"].as_array_mut() {
        list.retain(|n| n.get("type").and_then(|t| t.as_str()) != Some("network"));
        list.push(json!({"type": "network", "path": ns}));
    }
}

/// Restores one copy from a prepared snapshot onto its own filesystem (an
/// overlay, or a full copy with `copy.copy_rootfs`) in a new network namespace
/// (or `copy.netns`). Returns CRIU's stats.
pub fn restore_prepared(
    rt: &Runtime,
    store: &Store,
    p: &Prepared,
    opts: &RestoreOptions,
    bundle: Option<&Path>,
    ident: &Identity,
    copy: &CopyOptions,
) -> Result<CriuStats> {
    if let Some(reason) = &p.refused {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: reason.clone(),
        });
    }
    let mut opts = opts.clone();
    opts.image_path = p.image.clone();
    opts.detach = true;
    // Held from here until the container is recorded: no other command restores
    // into this id meanwhile, so what `private_fs` finds under its name was left
    // by a restore that died.
    let lock = rt.lock_container(&opts.id)?;
    // A taken id fails before anything is built for it (and before the private
    // directory of an existing copy with that id could be touched).
    match rt.load(&opts.id) {
        Err(crate::runtime::RuntimeError::NotFound { .. }) => {}
        Ok(_) => {
            return Err(crate::runtime::RuntimeError::Exists {
                id: opts.id.clone(),
                root: rt.root().to_path_buf(),
            }
            .into())
        }
        Err(e) => return Err(e.into()),
    }
    if p.manifest.is_some() {
        let (bdir, owned) = private_fs(rt, store, p, &opts.id, bundle, ident, copy)?;
        opts.bundle = bdir;
        opts.join_netns = copy.netns.clone();
        opts.owned_dir = Some(owned.clone());
        match rt.restore_locked(&opts, lock) {
            Ok((_, stats)) => Ok(stats),
            Err(e) => {
                crate::runtime::unmount_under(&owned);
                let _ = fs::remove_dir_all(&owned);
                Err(e.into())
            }
        }
    } else {
        opts.bundle = match bundle {
            Some(b) => b.to_path_buf(),
            // A foreign snapshot's recorded bundle is a path it names on this
            // host, with a config.json it does not carry: not used.
            None if !p.trusted => {
                return Err(WorkflowError::Snapshot {
                    snapshot: p.sid.short(),
                    reason: format!("it is foreign (origin: {}) and carries no filesystem: pass --bundle DIR with the container's config.json and rootfs (or --trust-snapshot-config to use the bundle path it records)", p.origin),
                })
            }
            None => p
                .meta
                .get("bundle")
                .and_then(|b| b.as_str())
                .map(PathBuf::from)
                .filter(|b| b.join("config.json").is_file())
                .ok_or_else(|| WorkflowError::NoBundle {
                    snapshot: p.sid.short(),
                })?,
        };
        super::openfiles::check(&p.sid.short(), &p.meta, &opts.bundle)?;
        let cfg_path = opts.bundle.join("config.json");
        let mut cfg: serde_json::Value = fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        check_volume_sources(&p.sid.short(), &mut cfg, Some(&opts.bundle), &[])?;
        Ok(rt.restore_locked(&opts, lock)?.1)
    }
}

/// The most copies one `restore --from` brings up.
pub const MAX_COPIES: usize = 1000;
/// How many copies are restored at once.
const RESTORE_WORKERS: usize = 4;

/// Runs `one(index, id)` for every id on a small pool of worker threads (fewer
/// when threads cannot be spawned, e.g. in a pids-limited cgroup: then the
/// calling thread does the work). Results are in the order of `ids`.
fn restore_copies<T: Send>(
    ids: &[String],
    one: impl Fn(usize, &str) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(id) = ids.get(i) else { break };
            done.push((i, one(i, id)));
        }
        done
    };
    let mut all: Vec<(usize, Result<T>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (1..RESTORE_WORKERS.min(ids.len()))
            .filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
            .collect();
        let mut all = work();
        for w in workers {
            // A worker that panicked leaves its copies unreported: they are
            // reported below as failed.
            if let Ok(done) = w.join() {
                all.extend(done);
            }
        }
        all
    });
    all.sort_by_key(|(i, _)| *i);
    let mut out = Vec::with_capacity(ids.len());
    let mut it = all.into_iter().peekable();
    for (i, id) in ids.iter().enumerate() {
        match it.next_if(|(j, _)| *j == i) {
            Some((_, r)) => out.push(r),
            None => out.push(Err(WorkflowError::Snapshot {
                snapshot: id.clone(),
                reason: "the thread restoring this copy panicked".into(),
            })),
        }
    }
    out
}

/// The ids of `restore --from`'s copies: `id` alone, or `PREFIX-0 .. PREFIX-(N-1)`
/// (`PREFIX` is `name_prefix`, else `id`) with several copies or a prefix. Each is
/// validated here, so a bad one is refused before anything is materialised or
/// created.
pub fn copy_ids(id: &str, copies: usize, name_prefix: Option<&str>) -> Result<Vec<String>> {
    if copies == 0 || copies > MAX_COPIES {
        return Err(WorkflowError::CopiesOutOfRange {
            copies,
            max: MAX_COPIES,
        });
    }
    let n = copies;
    let ids: Vec<String> = if n == 1 && name_prefix.is_none() {
        vec![id.to_string()]
    } else {
        let prefix = name_prefix.unwrap_or(id);
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    };
    for id in &ids {
        crate::runtime::validate_id(id)?;
    }
    Ok(ids)
}

/// `restore --from NAME NEWID [--copies N]`: prepare once, restore each copy (in
/// parallel), drop staging, wait when not detached (one copy only).
pub fn restore_from_store(
    rt: &Runtime,
    store: &Store,
    r: &RestoreFrom,
) -> Result<RestoreFromResult> {
    let ids = copy_ids(&r.restore.id, r.copies, r.name_prefix.as_deref())?;
    let n = ids.len();
    // The snapshot stays in the store until the copies run: `snapshot rm`, gc
    // and prune wait for the pin instead of removing the image under CRIU.
    let pin = store.pin()?;
    let mut p = prepare(rt, store, &r.from, r.force, r.progress)?;
    crate::runtime::fault_point("restore.after-prepare");
    super::trust::choose(&mut p, r.bundle.is_some(), r.trust_snapshot_config);
    if let Some(reason) = &p.refused {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: reason.clone(),
        });
    }
    if p.manifest.is_none() {
        for (set, flag) in [
            (r.copy.copy_rootfs, "--copy-rootfs"),
            (r.copy.netns.is_some(), "--netns"),
        ] {
            if set {
                return Err(WorkflowError::Snapshot {
                    snapshot: p.sid.short(),
                    reason: format!("{flag} needs a snapshot that carries its filesystem (this one was taken with --ignore-rootfs); restore it onto the bundle's rootfs, with the network namespace set in the bundle's config.json"),
                });
            }
        }
    }
    if let Some(ns) = &r.copy.netns {
        fs::metadata(ns).map_err(io_err("open network namespace", ns))?;
    }
    let generation = new_generation();
    if n > 1 && r.restore.flags.lazy_pages && r.restore.work_path.is_some() {
        return Err(WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: "--lazy-pages with --work-path and several copies would give every copy's lazy-pages daemon the same socket; leave out --work-path (each copy then works in its own state directory)".into(),
        });
    }
    let t1 = Instant::now();
    let results = restore_copies(&ids, |i, id| {
        let mut o = r.restore.clone();
        o.id = id.to_string();
        let ident = Identity {
            generation: generation.clone(),
            index: i,
            snapshot: p.sid.short(),
        };
        restore_prepared(rt, store, &p, &o, r.bundle.as_deref(), &ident, &r.copy)
    });
    drop(pin);
    let restore_ms = t1.elapsed().as_millis();
    let mut stats = CriuStats::default();
    let mut restored = Vec::new();
    let mut failed = Vec::new();
    for (id, res) in ids.iter().zip(results) {
        match res {
            Ok(s) => {
                stats = s;
                restored.push(id.clone());
            }
            Err(e) => failed.push((id.clone(), e)),
        }
    }
    // Each failed copy cleaned up after itself (restore_prepared); the copies
    // that came up keep running and the error names both sides.
    if !failed.is_empty() {
        if n == 1 {
            if let Some((_, e)) = failed.pop() {
                return Err(e);
            }
        }
        return Err(WorkflowError::CopiesFailed {
            snapshot: p.sid.short(),
            total: n,
            restored,
            failed: failed
                .into_iter()
                .map(|(id, e)| (id, e.to_string()))
                .collect(),
        });
    }
    let exit_code = if r.restore.detach || restored.len() != 1 {
        0
    } else {
        rt.wait(&restored[0])?
    };
    Ok(RestoreFromResult {
        id: p.sid,
        exit_code,
        stats,
        materialize_ms: p.materialize_ms,
        restore_ms,
        warnings: p.warnings.clone(),
        restored,
        generation,
    })
}

/// Removes cached root filesystems (`cache/fs/`) and images (`cache/img/`) of
/// snapshots that are no longer in the store (unless an overlay still uses
/// them), partial entries left by killed restores, and the stat caches
/// (`cache/fscache/`) whose snapshot is gone. Returns (entries, bytes); the stat
/// cache files count in the bytes only.
pub fn gc_fs_cache(store: &Store, dry_run: bool) -> Result<(u64, u64)> {
    let r = store.gc_caches(dry_run)?;
    let bytes = r.bytes_freed + gc_stat_caches(store, dry_run)?;
    Ok((r.entries_removed + r.partial_removed, bytes))
}

/// Removes the stat caches that can serve no capture any more: unreadable (or of
/// another version), or pointing into a snapshot no longer in the store. They are
/// named by container id, and ids that are never checkpointed again (a prewarm's
/// default name, a removed container's) would otherwise keep theirs forever.
/// Returns the bytes freed.
fn gc_stat_caches(store: &Store, dry_run: bool) -> Result<u64> {
    let files = store.stat_cache_files();
    if files.is_empty() {
        return Ok(0);
    }
    let live: Vec<SnapshotId> = store.list()?.into_iter().map(|s| s.id).collect();
    let mut bytes = 0;
    for path in files {
        let sid = fstree::StatCache::load(&path).and_then(|c| SnapshotId::parse(&c.snapshot));
        // A snapshot ingested after the listing above is looked up again.
        let keep = sid.is_some_and(|sid| {
            live.contains(&sid) || store.resolve(&sid.full()).is_ok_and(|r| r == sid)
        });
        if keep {
            continue;
        }
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if !dry_run {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("remove stale stat cache", &path)(e)),
            }
        }
        bytes += size;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_image(dir: &Path, seed: u8) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("inventory.img"), [seed; 64]).unwrap();
        fs::write(dir.join("core-1.img"), [seed ^ 0x55; 300]).unwrap();
        dir.to_path_buf()
    }

    fn ingest(store: &Store, image: &Path) -> SnapshotId {
        store
            .ingest(
                SnapshotInput {
                    image_dir: image,
                    config_json: b"{}",
                    container_id: "c1",
                    metadata: json!({}),
                    tags: Vec::new(),
                },
                &IngestOptions::default(),
            )
            .unwrap()
            .id
    }

    fn stat_cache_of(sid: &str) -> fstree::StatCache {
        fstree::StatCache {
            version: fstree::STAT_CACHE_VERSION,
            snapshot: sid.to_string(),
            trees: Vec::new(),
        }
    }

    #[test]
    fn relative_bind_sources_resolve_against_the_given_bundle() {
        let t = tempfile::tempdir().unwrap();
        let (orig, given) = (t.path().join("orig"), t.path().join("given"));
        fs::create_dir_all(given.join("shared")).unwrap();
        fs::create_dir_all(&orig).unwrap();
        let meta = json!({"bundle": orig});
        let spec = json!({"mounts": [
            {"destination": "/data", "type": "bind", "source": "carried-vol", "options": ["rbind"]},
            {"destination": "/shared", "type": "bind", "source": "shared", "options": ["rbind"]},
            {"destination": "/proc", "type": "proc", "source": "proc"},
        ]});
        assert_eq!(source_bundle(Some(&given), &meta), Some(given.as_path()));
        assert_eq!(source_bundle(None, &meta), Some(orig.as_path()));
        // With --bundle: its own relative source, found; the carried volume's
        // source (replaced by the copy's own) is not looked for.
        let mut cfg = spec.clone();
        check_volume_sources(
            "s1",
            &mut cfg,
            source_bundle(Some(&given), &meta),
            &["/data"],
        )
        .unwrap();
        assert_eq!(cfg["mounts"][1]["source"], json!(given.join("shared")));
        assert_eq!(cfg["mounts"][0]["source"], json!("carried-vol"));
        // Without it: relative to the original bundle, where it is missing.
        let mut cfg = spec.clone();
        let e = check_volume_sources("s1", &mut cfg, source_bundle(None, &meta), &["/data"])
            .unwrap_err();
        match e {
            WorkflowError::VolumeMissing { path, dest, .. } => {
                assert_eq!((path, dest.as_str()), (orig.join("shared"), "/shared"));
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn gc_removes_stat_caches_whose_snapshot_is_gone() {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("store")).unwrap();
        let live = ingest(&store, &small_image(&t.path().join("a"), 1));
        let gone = ingest(&store, &small_image(&t.path().join("b"), 2));
        store.remove(&format!("sha256:{}", gone.full())).unwrap();
        let (keep, stale, bad) = (
            store.stat_cache_path("kept"),
            store.stat_cache_path("serve-7000-1-3"),
            store.stat_cache_path("garbage"),
        );
        stat_cache_of(&live.full()).save(&keep).unwrap();
        stat_cache_of(&gone.full()).save(&stale).unwrap();
        fs::write(&bad, b"not json").unwrap();
        let dir = keep.parent().unwrap().to_path_buf();
        let names = || {
            let mut v: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let (_, dry) = gc_fs_cache(&store, true).unwrap();
        assert!(dry > 0);
        assert_eq!(
            names(),
            ["garbage.json", "kept.json", "serve-7000-1-3.json"]
        );
        let (_, freed) = gc_fs_cache(&store, false).unwrap();
        assert_eq!(freed, dry);
        assert_eq!(names(), ["kept.json"]);
        assert!(usable_stat_cache(&store, &keep).is_some());
    }
}
