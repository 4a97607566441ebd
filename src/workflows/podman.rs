//! `snapshot export --format podman`: a snapshot as a podman checkpoint archive
//! that `podman container restore --import FILE` accepts (podman 4.3's layout):
//!
//! - `config.dump`: a libpod container config describing an image-based container
//!   (`rootfsImageID` / `rootfsImageName`: an image the importing podman has in its
//!   local storage; podman pulls it only when missing);
//! - `spec.dump`: the container's OCI config.json as checkpointed;
//! - `checkpoint/`: the CRIU image files from the verified, materialised image;
//! - `rootfs-diff.tar`: the snapshot's whole captured root filesystem, which podman
//!   unpacks over the image's tree before the restore (a file only the image has
//!   stays; no `deleted.files`);
//! - `network.status`: `{}` (no podman network state to restore).
//!
//! The archive is a zstd-compressed tar (podman detects the compression), written
//! to a temp file next to the output and renamed into place.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::fsutil::io;
use super::snapshot::prepare;
use super::{fstree, Result, WorkflowError};
use crate::runtime::Runtime;
use crate::store::Store;

/// Files of a materialised image that are stasis's own, not CRIU's.
const NOT_CRIU: [&str; 3] = ["config.json", fstree::MANIFEST_FILE, fstree::DATA_FILE];

/// What the importing podman needs to know that the snapshot cannot tell.
#[derive(Clone, Debug, Default)]
pub struct PodmanExport {
    /// Full id of the base image in the importing podman's storage
    /// (`podman image inspect --format '{{.Id}}' NAME`).
    pub image_id: String,
    /// Its name (defaults to the id).
    pub image_name: Option<String>,
    /// Container name recorded in the archive (defaults to the snapshot's
    /// container id); `podman container restore --import F --name X` overrides it.
    pub name: Option<String>,
    /// podman's `--cgroup-parent` for the restored container.
    pub cgroup_parent: Option<String>,
    /// The OCI runtime as the importing podman names it (its `--runtime` value
    /// or containers.conf runtime name); podman refuses an archive recorded with
    /// another one.
    pub runtime: String,
}

fn bad(snapshot: &str, reason: impl Into<String>) -> WorkflowError {
    WorkflowError::Snapshot {
        snapshot: snapshot.to_string(),
        reason: reason.into(),
    }
}

/// A podman container name from `s` ([a-zA-Z0-9][a-zA-Z0-9_.-]*).
fn podman_name(s: &str) -> String {
    let mut n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        n.insert(0, 's');
    }
    n
}

/// Writes snapshot `from` of `store` as a podman checkpoint archive at `out`.
pub fn export(rt: &Runtime, store: &Store, from: &str, out: &Path, o: &PodmanExport) -> Result<()> {
    let image_id = o.image_id.trim_start_matches("sha256:").to_string();
    if image_id.len() != 64 || !image_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(
            from,
            format!(
                "--podman-image-id {:?} is not a full image id (64 hex digits: `podman image inspect --format '{{{{.Id}}}}' IMAGE`)",
                o.image_id
            ),
        ));
    }
    // The snapshot (and its cached image, read below) stays until the archive
    // is written: `snapshot rm` and gc wait for the pin.
    let _pin = store.pin()?;
    // The compatibility check is the importing host's business (CRIU's own at
    // restore); the image is still verified while it is materialised.
    let p = prepare(rt, store, from, true, false)?;
    let short = p.sid.short();
    let mut spec: serde_json::Value = serde_json::from_slice(&p.config_json)
        .map_err(|e| bad(&short, format!("its config.json is not JSON: {e}")))?;
    let args = spec
        .pointer("/process/args")
        .cloned()
        .unwrap_or(serde_json::Value::Array(Vec::new()));
    // podman sets the root path and cgroups path of the container it creates.
    if let Some(root) = spec.get_mut("root").and_then(|r| r.as_object_mut()) {
        root.insert("path".into(), "/".into());
    }
    if let Some(linux) = spec.get_mut("linux").and_then(|l| l.as_object_mut()) {
        linux.remove("cgroupsPath");
    }
    let recorded = store.config(&p.sid)?;
    let container = recorded
        .get("container")
        .and_then(|c| c.as_str())
        .unwrap_or("stasis");
    let name = podman_name(o.name.as_deref().unwrap_or(container));
    let image_name = o.image_name.clone().unwrap_or_else(|| image_id.clone());
    let id = p.sid.full();
    let id = id.rsplit(':').next().unwrap_or(&id).to_string();
    let mut config = serde_json::json!({
        "spec": spec,
        "id": id,
        "name": name,
        "rootfsImageID": image_id,
        "rootfsImageName": image_name,
        "RawImageName": image_name,
        "command": args,
        "createdTime": chrono::Utc::now().to_rfc3339(),
        "stopSignal": 15,
        "passwd": false,
        "createNetNS": false,
        "logDriver": "k8s-file",
        "runtime": o.runtime,
    });
    if let (Some(cp), Some(obj)) = (&o.cgroup_parent, config.as_object_mut()) {
        obj.insert("cgroupParent".into(), cp.as_str().into());
    }

    let parent = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = tempfile::Builder::new()
        .prefix(".stasis-podman-export-")
        .tempdir_in(&parent)
        .map_err(io("create a temp directory in", &parent))?;

    // The captured rootfs, rebuilt from the verified data and tarred.
    let diff = work.path().join("rootfs-diff.tar");
    if let Some(m) = &p.manifest {
        let idx = m
            .trees
            .iter()
            .position(|t| t.role == "rootfs")
            .ok_or_else(|| bad(&short, "its filesystem has no rootfs tree"))?;
        let rootfs = work.path().join("rootfs");
        fstree::materialize(m, idx, &p.image.join(fstree::DATA_FILE), &rootfs)?;
        // tar cannot carry Unix sockets (PostgreSQL's and Redis's live in their
        // rootfs); podman's own export leaves them out too, and a service
        // recreates its socket when it binds.
        remove_sockets(&rootfs)?;
        let f = File::create(&diff).map_err(io("create", &diff))?;
        let mut b = tar::Builder::new(BufWriter::new(f));
        b.follow_symlinks(false);
        b.append_dir_all(".", &rootfs)
            .map_err(io("tar the root filesystem", &rootfs))?;
        b.into_inner()
            .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .map_err(io("write", &diff))?;
    }

    let file_name = out
        .file_name()
        .ok_or_else(|| bad(&short, format!("output {} has no file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(
        ".{file_name}.stasis-partial-{}",
        std::process::id()
    ));
    let res = write_archive(&tmp, &p.image, &config, &spec_of(&config), &diff);
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("rename into place", out)(e)
    })?;
    Ok(())
}

fn spec_of(config: &serde_json::Value) -> serde_json::Value {
    config.get("spec").cloned().unwrap_or_default()
}

fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

fn write_archive(
    tmp: &Path,
    image: &Path,
    config: &serde_json::Value,
    spec: &serde_json::Value,
    diff: &Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io("create", tmp))?;
    let z = zstd::stream::write::Encoder::new(BufWriter::new(f), 3).map_err(io("compress", tmp))?;
    let mut b = tar::Builder::new(z);
    let w = io("write", tmp);
    let add = |b: &mut tar::Builder<_>, name: &str, data: &[u8]| {
        let mut h = header(data.len() as u64, 0o600, tar::EntryType::Regular);
        b.append_data(&mut h, name, data)
    };
    let cfg = serde_json::to_vec(config).unwrap_or_default();
    let spc = serde_json::to_vec(spec).unwrap_or_default();
    (|| -> std::io::Result<()> {
        add(&mut b, "config.dump", &cfg)?;
        add(&mut b, "spec.dump", &spc)?;
        add(&mut b, "network.status", b"{}")?;
        let mut h = header(0, 0o700, tar::EntryType::Directory);
        b.append_data(&mut h, "checkpoint/", std::io::empty())?;
        let mut names: Vec<String> = fs::read_dir(image)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !NOT_CRIU.contains(&n.as_str()))
            .collect();
        names.sort();
        for n in names {
            let path = image.join(&n);
            let mut f = File::open(&path)?;
            let mut h = header(f.metadata()?.len(), 0o600, tar::EntryType::Regular);
            b.append_data(&mut h, format!("checkpoint/{n}"), &mut f)?;
        }
        if diff.is_file() {
            let mut f = File::open(diff)?;
            let mut h = header(f.metadata()?.len(), 0o644, tar::EntryType::Regular);
            b.append_data(&mut h, "rootfs-diff.tar", &mut f)?;
        }
        let z = b.into_inner()?;
        let f = z.finish()?.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()
    })()
    .map_err(w)
}

/// Removes every Unix socket under `dir` (symlinks are not followed).
fn remove_sockets(dir: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    for e in fs::read_dir(dir).map_err(io("read directory", dir))? {
        let e = e.map_err(io("read directory", dir))?;
        let path = e.path();
        let ft = e.file_type().map_err(io("stat", &path))?;
        if ft.is_socket() {
            fs::remove_file(&path).map_err(io("remove socket", &path))?;
        } else if ft.is_dir() {
            remove_sockets(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::podman_name;

    #[test]
    fn names_podman_accepts() {
        assert_eq!(podman_name("web-1"), "web-1");
        assert_eq!(podman_name("a/b c"), "a-b-c");
        assert_eq!(podman_name("_x"), "s_x");
    }
}
