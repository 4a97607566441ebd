//! A restored copy's private filesystem: the overlay (or full copy) of the cached
//! base, its own volumes, the bundle pointing at them, and its network namespace.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::cache::ensure_base;
use super::statcache::COPY_SNAPSHOT_FILE;
use super::*;
use crate::runtime::{create_private_dir, create_private_dir_all, tighten_dir, Runtime};
use crate::store::Store;
use crate::workflows::fsutil::io;
use crate::workflows::meta::SnapshotMeta;
use crate::workflows::{fstree, Result, WorkflowError};

/// Gives container `id` a private filesystem: an overlay on the cached base, its
/// own copy of every volume, and a bundle whose config (`bundle`'s config.json,
/// else the snapshot's own) points at them. Returns (bundle dir, owned dir).
pub(super) fn private_fs(
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
        Some(b) => fs::read(b.join("config.json")).map_err(io("read config.json of", b))?,
        None => p.config_json.clone(),
    };
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&config_json).map_err(|source| WorkflowError::Json {
            op: "parse the config.json",
            subject: match bundle {
                Some(b) => format!("of bundle {}", b.display()),
                None => format!("of snapshot {} (for copy {id})", p.sid.short()),
            },
            source,
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
    let owned = owned_dir(rt, store, id, copy.copy_rootfs)?;
    let merged = owned.join("merged");
    let result = (|| -> Result<PathBuf> {
        let root = build_root(&owned, &base, p, id, ident, copy.copy_rootfs)?;
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
        fs::create_dir_all(&bdir).map_err(io("create", &bdir))?;
        let bytes = serde_json::to_vec_pretty(&cfg).map_err(|source| WorkflowError::Json {
            op: "encode the config.json",
            subject: format!("of copy {id} in {}", bdir.display()),
            source,
        })?;
        fs::write(bdir.join("config.json"), bytes).map_err(io("write", &bdir))?;
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

/// The private directory of copy `id` (0700), created afresh: under the store's
/// `cache/copies/` for a full rootfs copy, else under the runtime root.
fn owned_dir(rt: &Runtime, store: &Store, id: &str, copy_rootfs: bool) -> Result<PathBuf> {
    // A copy with a full rootfs copy lives on the store's filesystem, next to the
    // base (`cache/copies/ID`): FICLONE reflinks only within one filesystem, and
    // `--root` is usually a tmpfs (/run/stasis), where the copy would take RAM.
    // The state records the directory, so `delete` removes it either way.
    let copies = if copy_rootfs {
        store.copies_dir()
    } else {
        rt.root().join(".copies")
    };
    // 0700: a copy's tree holds the snapshot's setuid binaries and device nodes.
    create_private_dir_all(&copies).map_err(io("create", &copies))?;
    tighten_dir(&copies).map_err(io("make private (chmod 0700)", &copies))?;
    let owned = copies.join(id);
    // The caller holds the container's lock and no container `id` exists: a
    // directory here was left by a restore killed before it recorded the
    // container (its overlay may still be mounted). Remove it and start afresh.
    if fs::symlink_metadata(&owned).is_ok() {
        crate::runtime::unmount_under(&owned);
        fs::remove_dir_all(&owned).map_err(io(
            "remove the private filesystem a killed restore left at",
            &owned,
        ))?;
    }
    // Not create_dir_all: the directory is ours only if we created it.
    create_private_dir(&owned).map_err(io("create private filesystem", &owned))?;
    Ok(owned)
}

/// The root of copy `id` inside `owned`: an overlay on the base, or
/// (`copy_rootfs`) a full copy of it, holding its identity file.
fn build_root(
    owned: &Path,
    base: &Path,
    p: &Prepared,
    id: &str,
    ident: &Identity,
    copy_rootfs: bool,
) -> Result<PathBuf> {
    let (upper, work, merged) = (
        owned.join("upper"),
        owned.join("work"),
        owned.join("merged"),
    );
    // The root: an overlay on the base, or (--copy-rootfs) a full copy of it.
    let root = if copy_rootfs {
        let root = owned.join("rootfs");
        crate::workflows::copytree::copy_tree(base, &root)?;
        root
    } else {
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).map_err(io("create", d))?;
        }
        merged.clone()
    };
    // The identity file, visible at /.stasis/identity.json.
    let idir = if copy_rootfs {
        root.join(".stasis")
    } else {
        upper.join(".stasis")
    };
    fs::create_dir_all(&idir).map_err(io("create", &idir))?;
    let ijson = json!({
        "generation": ident.generation, "copy_index": ident.index,
        "snapshot": ident.snapshot, "container_id": id,
    });
    fs::write(idir.join("identity.json"), ijson.to_string()).map_err(io("write", &idir))?;
    if !copy_rootfs {
        // For the stat cache of the copy's first checkpoint (`copy_stat_cache`).
        let f = owned.join(COPY_SNAPSHOT_FILE);
        fs::write(&f, p.sid.full()).map_err(io("write", &f))?;
        mount_overlay(base, &upper, &work, &merged)?;
        crate::runtime::fault_point("restore.after-overlay");
    }
    Ok(root)
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
pub(super) fn source_bundle<'a>(
    given: Option<&'a Path>,
    meta: &'a SnapshotMeta,
) -> Option<&'a Path> {
    given.or(meta.bundle.as_deref())
}

/// Refuses a spec whose bind mount (volume) source is gone, naming the source
/// and the destination; relative sources are made absolute against `bundle`.
/// Mounts at a destination in `carried` (volumes the snapshot brings along,
/// whose source is replaced) are left alone.
pub(super) fn check_volume_sources(
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
