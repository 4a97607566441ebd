//! `checkpoint --tag`: the dump, the filesystem capture and the commit into the store.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::statcache::{container_pids, copy_stat_cache, previous_fs_data, usable_stat_cache};
use super::*;
use crate::runtime::checkpoint::{defers_stop, CheckpointOptions, CriuStats};
use crate::runtime::{ContainerState, Runtime};
use crate::store::{IngestOptions, IngestReport, Pin, SnapshotId, SnapshotInput, Store};
use crate::workflows::fsutil::io;
use crate::workflows::meta::{
    CriuOptionsRecord, CriuRecord, FsInfo, HostRecord, OpenFile, SnapshotMeta,
    Timings as MetaTimings,
};
use crate::workflows::{fstree, host, Result, WorkflowError};

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
        fs::read(st.bundle.join("config.json")).map_err(io("read config.json of", &st.bundle))?;
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
    let (cache, pin) = pinned_stat_cache(store, &st, &sources, &cache_path)?;
    // Without the rootfs in the snapshot, the files the processes hold open are
    // recorded so a restore onto a changed rootfs is refused: listed and hashed
    // after the dump while the container is still frozen, so the digests are the
    // checkpoint's contents. The list taken now stands in when the tasks are
    // already gone by then (CRIU kills them itself with --tcp-established).
    let open_before = if t.ignore_rootfs {
        crate::workflows::openfiles::list(&st.rootfs, &container_pids(st.pid))
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
        open_files: Vec::new(),
        failure: None,
        report: None,
        timings: Timings::default(),
    };
    let t0 = Instant::now();
    let res = rt.checkpoint_with(&opts, &mut |cs, stats| {
        c.timings.dump = t0.elapsed().as_millis();
        // A workflow error is kept for the caller (the runtime only needs to
        // know the callback failed, to thaw the container).
        if let Err(e) = c.capture_frozen(cs, &sources, &open_before) {
            let msg = e.to_string();
            c.failure = Some(e);
            return Err(crate::runtime::RuntimeError::Invalid(msg));
        }
        if !opts.leave_running {
            // With CRIU's own stop (--tcp-established, --link-remap, ...) the
            // image is all that is left of the container from here: kept until
            // the commit, so a stasis killed meanwhile leaves it where verify
            // finds it and gc does not remove it.
            if !c.tasks_survive {
                if let Err(e) = c.staging.mark_kept() {
                    let msg = format!(
                        "mark the staging directory {} kept: {e}",
                        c.staging.path().display()
                    );
                    return Err(crate::runtime::RuntimeError::Invalid(msg));
                }
                crate::runtime::fault_point("checkpoint.criu-stopped");
            }
            // Committed before the container is stopped (or, with CRIU's own
            // stop, before its mounts go).
            match c.commit(stats) {
                Ok(report) => {
                    if !c.tasks_survive {
                        c.staging.unmark_kept();
                    }
                    c.report = Some(report)
                }
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

/// A usable stat cache and the pin on the snapshot it points into.
type PinnedCache = (Option<(fstree::StatCache, SnapshotId)>, Option<Pin>);

/// The stat cache the capture may use, with the pin that keeps the snapshot it
/// points into in the store until the ingest is done (none without sources or
/// without a usable cache).
fn pinned_stat_cache(
    store: &Store,
    st: &ContainerState,
    sources: &[fstree::Source],
    cache_path: &Path,
) -> Result<PinnedCache> {
    Ok(if sources.is_empty() {
        (None, None)
    } else {
        let pin = store.pin()?;
        let found = usable_stat_cache(store, cache_path).or_else(|| {
            st.owned_dir
                .as_deref()
                .and_then(|owned| copy_stat_cache(store, owned, &st.rootfs))
        });
        match found {
            Some(c) => (Some(c), Some(pin)),
            None => (None, None),
        }
    })
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
    open_files: Vec<OpenFile>,
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
    ) -> Result<()> {
        if self.t.ignore_rootfs {
            let mut paths = crate::workflows::openfiles::list(&cs.rootfs, &container_pids(cs.pid));
            if paths.is_empty() {
                paths = open_before.to_vec();
            }
            self.open_files = crate::workflows::openfiles::digests(&cs.rootfs, &paths);
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
            WorkflowError::CaptureFailed {
                id: self.opts.id.clone(),
                source: Box::new(e),
            }
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
        let mut fs_info = None;
        if let Some(c) = self.capture.as_mut() {
            let (cache, prev_dir, store) = (self.cache, &self.prev_dir, self.store);
            // `fresh`: the copy given before did not match a file's digest;
            // materialise one verified from the store instead of using the cache.
            let mut previous = |fresh: bool| -> Result<PathBuf> {
                let (_, sid) = cache.ok_or_else(|| WorkflowError::NoPreviousSnapshot {
                    dir: prev_dir.clone(),
                })?;
                if fresh {
                    let _ = fs::remove_dir_all(prev_dir);
                    return Ok(store.materialize_file(sid, fstree::DATA_FILE, prev_dir)?);
                }
                previous_fs_data(store, sid, prev_dir)
            };
            if let Err(e) = c.finish(&mut previous) {
                return Err(if self.tasks_survive {
                    WorkflowError::AssembleFailed {
                        id: id.clone(),
                        source: Box::new(e),
                    }
                } else {
                    // The container is stopped: its image is all that is left of it.
                    WorkflowError::AssembleFailedImageKept {
                        id: id.clone(),
                        image: self.staging.keep_image(),
                        source: Box::new(e),
                    }
                });
            }
            self.timings.assemble = a0.elapsed().as_millis();
            let base = self.cache.map(|(_, sid)| sid.to_string());
            fs_info = Some(FsInfo::of_capture(c, base));
        }
        let metadata = self.metadata(stats, fs_info)?;
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

    fn metadata(&self, stats: &CriuStats, filesystem: Option<FsInfo>) -> Result<serde_json::Value> {
        let opts = self.opts;
        let criu_version = self.rt.criu_version().unwrap_or_default();
        let f = &opts.flags;
        let meta = SnapshotMeta {
            criu: CriuRecord {
                version: criu_version.clone(),
                options: CriuOptionsRecord {
                    leave_running: opts.leave_running,
                    tcp_established: f.tcp_established,
                    ext_unix_sk: f.ext_unix_sk,
                    shell_job: f.shell_job,
                    file_locks: f.file_locks,
                    manage_cgroups_mode: format!("{:?}", f.manage_cgroups_mode).to_lowercase(),
                    empty_ns: f.empty_ns.clone(),
                    link_remap: opts.link_remap,
                },
                dump_stats: stats
                    .entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
            },
            host: Some(HostRecord {
                criu_version,
                ..host::record()
            }),
            bundle: Some(self.st.bundle.clone()),
            rootfs: Some(self.st.rootfs.clone()),
            filesystem,
            open_files: self.open_files.clone(),
            timings_ms: MetaTimings {
                dump: self.timings.dump as u64,
                fs_capture: self.timings.capture as u64,
                fs_assemble: self.timings.assemble as u64,
            },
        };
        serde_json::to_value(&meta).map_err(|source| WorkflowError::Json {
            op: "encode the snapshot metadata",
            subject: format!("of container {}", opts.id),
            source,
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
