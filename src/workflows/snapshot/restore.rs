//! `restore --from`: prepare (resolve, check, materialise) a snapshot once and
//! restore any number of copies of it, each with its identity.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::cache::cached;
use super::private_fs::{check_volume_sources, private_fs};
use super::*;
use crate::runtime::checkpoint::{CriuStats, RestoreOptions};
use crate::runtime::Runtime;
use crate::store::{CacheKind, SnapshotId, Store};
use crate::workflows::fsutil::io;
use crate::workflows::meta::SnapshotMeta;
use crate::workflows::{fstree, host, Result, WorkflowError};

/// A snapshot materialised and checked, ready to be restored any number of times.
pub struct Prepared {
    pub sid: SnapshotId,
    pub image: PathBuf,
    pub manifest: Option<fstree::Manifest>,
    pub meta: SnapshotMeta,
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
    let meta = SnapshotMeta::of_config(&cfg).map_err(|e| WorkflowError::Snapshot {
        snapshot: sid.short(),
        reason: format!("its metadata cannot be read ({e}): the stored config.json is damaged; remove the snapshot and checkpoint again"),
    })?;
    let mut warnings = Vec::new();
    let mismatches = host::compare(meta.host.as_ref(), &rt.criu_version().unwrap_or_default());
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
        crate::workflows::trust::restrict(&mut p)?;
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
    pub(super) fn env(&self, id: &str) -> Vec<String> {
        vec![
            format!("STASIS_GENERATION={}", self.generation),
            format!("STASIS_COPY_INDEX={}", self.index),
            format!("STASIS_SNAPSHOT={}", self.snapshot),
            format!("STASIS_CONTAINER_ID={id}"),
        ]
    }
}

/// A fresh random generation id (16 hex digits) from the kernel's random source
/// (getrandom(2)); never a fixed fallback, which copies would share.
pub fn new_generation() -> Result<String> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|source| WorkflowError::Random { source })?;
    Ok(hex::encode(b))
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
                .bundle
                .clone()
                .filter(|b| b.join("config.json").is_file())
                .ok_or_else(|| WorkflowError::NoBundle {
                    snapshot: p.sid.short(),
                })?,
        };
        crate::workflows::openfiles::check(&p.sid.short(), &p.meta, &opts.bundle)?;
        let cfg_path = opts.bundle.join("config.json");
        let mut cfg: serde_json::Value = fs::read(&cfg_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        check_volume_sources(&p.sid.short(), &mut cfg, Some(&opts.bundle), &[])?;
        Ok(rt.restore_locked(&opts, lock)?.1)
    }
}

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
    crate::workflows::trust::choose(&mut p, r.bundle.is_some(), r.trust_snapshot_config);
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
        fs::metadata(ns).map_err(io("open network namespace", ns))?;
    }
    let generation = new_generation()?;
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
