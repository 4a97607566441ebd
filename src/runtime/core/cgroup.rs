//! Cgroups that stasis handles itself (part of the libcontainer boundary, `core`):
//! the cgroup of a restored container (which libcontainer did not create), the
//! removal of a failed container's cgroup, and
//! `linux.resources.memory.disableOOMKiller`: libcontainer 0.7 applies every
//! cgroup with `disable_oom_killer: false`, so the spec's setting was dropped. cgroup v1 has the switch
//! (`memory.oom_control`); cgroup v2 has no equivalent (`memory.oom.group` decides
//! what is killed, not whether), so there the setting is reported and ignored, as
//! runc ignores it on v2.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, CgroupConfig, CgroupManager, CgroupSetup,
    ControllerOpt,
};
use libcgroups::v1::{util::get_subsystem_mount_point, ControllerType};
use oci_spec::runtime::Spec;

use super::{chain_dyn, warn, CGROUP_REMOVE_PATIENCE};
use crate::runtime::{Result, RuntimeError};

const OOM_CONTROL: &str = "memory.oom_control";

/// Whether the spec asks for the OOM killer to be disabled.
pub fn wanted(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.disable_oom_killer())
        .unwrap_or(false)
}

/// The v1 memory cgroup directory of a container whose cgroup path (as given to
/// the cgroup manager) is `cgroup_path`; None on a cgroup v2 host.
fn memory_dir(cgroup_path: &Path) -> Option<PathBuf> {
    if matches!(get_cgroup_setup(), Ok(CgroupSetup::Unified) | Err(_)) {
        return None;
    }
    let mount = get_subsystem_mount_point(&ControllerType::Memory).ok()?;
    // As libcgroups joins it: relative to the hierarchy's root.
    Some(mount.join(cgroup_path.strip_prefix("/").unwrap_or(cgroup_path)))
}

/// Whether the cgroup exists already (in the memory hierarchy on cgroup v1): one
/// that existed before a create is not the create's to remove when it fails
/// (another `--root` may run a container of the same id in it).
pub fn exists(cgroup_path: &Path) -> bool {
    match memory_dir(cgroup_path) {
        Some(dir) => dir.exists(),
        None => Path::new("/sys/fs/cgroup")
            .join(cgroup_path.strip_prefix("/").unwrap_or(cgroup_path))
            .exists(),
    }
}

/// Disables the OOM killer of container `id`'s memory cgroup (cgroup v1); on
/// cgroup v2 warns that the setting has no effect.
pub fn disable(cgroup_path: &Path, id: &str) -> Result<()> {
    let Some(dir) = memory_dir(cgroup_path) else {
        warn(
            id,
            "linux.resources.memory.disableOOMKiller is ignored: cgroup v2 has no way to \
             disable the OOM killer of a cgroup",
        );
        return Ok(());
    };
    let path = dir.join(OOM_CONTROL);
    fs::write(&path, "1").map_err(|source| RuntimeError::Io {
        op: "disable the OOM killer (linux.resources.memory.disableOOMKiller) in",
        path,
        source,
    })
}

/// Whether the OOM killer of the container's memory cgroup is disabled now
/// (`oom_kill_disable 1`), so that applying new memory limits keeps it so.
pub fn disabled_now(cgroup_path: &Path) -> bool {
    memory_dir(cgroup_path)
        .and_then(|d| fs::read_to_string(d.join(OOM_CONTROL)).ok())
        .is_some_and(|t| t.lines().any(|l| l.trim() == "oom_kill_disable 1"))
}

/// Creates the container's cgroup with the spec's resources and moves `pid` into it.
pub fn cgroup_enter(cgroup_path: &Path, id: &str, spec: &Spec, pid: i32) -> Result<()> {
    let err = |op: &'static str| {
        let id = id.to_string();
        move |e: &dyn std::error::Error| RuntimeError::Core {
            op,
            id,
            detail: chain_dyn(e),
        }
    };
    let m = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.to_path_buf(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| err("create cgroup of")(&e))?;
    m.add_task(nix::unistd::Pid::from_raw(pid))
        .map_err(|e| err("enter cgroup of")(&e))?;
    if let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        m.apply(&ControllerOpt {
            resources: r,
            // libcgroups writes it (v1) along with the memory limits.
            disable_oom_killer: wanted(spec),
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| err("apply resources to cgroup of")(&e))?;
    }
    Ok(())
}

/// Removes a cgroup, killing what is in it, until it is gone: from a failed
/// create or restore. A failure is a warning naming what is left (see
/// `cgroup_destroy`).
pub fn cgroup_remove(cgroup_path: &Path, id: &str) {
    if let Err(e) = cgroup_destroy(cgroup_path, id) {
        warn(
            id,
            &format!("{e}; remove it with rmdir once its processes are gone"),
        );
    }
}

/// Kills every process in a cgroup and removes it. libcgroups makes one SIGKILL
/// pass and retries rmdir for ~100 ms, then gives up at the first hierarchy that
/// is still busy, leaving it and every hierarchy after it. Killed processes leave
/// only once they have exited, which on a busy host takes longer (and a process
/// may still be put into the cgroup after the pass), and killed tasks of a frozen
/// cgroup die only once thawed; so each round kills again, thaws, and waits for
/// the cgroup to empty, for up to `CGROUP_REMOVE_PATIENCE` (as runc's
/// `RemovePath` retries).
pub fn cgroup_destroy(cgroup_path: &Path, id: &str) -> Result<()> {
    let m = create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.to_path_buf(),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| RuntimeError::Core {
        op: "open cgroup of",
        id: id.to_string(),
        detail: chain_dyn(&e),
    })?;
    let deadline = Instant::now() + CGROUP_REMOVE_PATIENCE;
    let mut first = true;
    loop {
        for p in m.get_all_pids().unwrap_or_default() {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = m.freeze(libcgroups::common::FreezerState::Thawed);
        match m.remove() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(RuntimeError::Core {
                    op: "remove the cgroup (still busy after 10 s) of",
                    id: id.to_string(),
                    detail: format!("{}: {}", cgroup_path.display(), chain_dyn(&e)),
                })
            }
            Err(_) => {
                if std::mem::take(&mut first) {
                    crate::runtime::fault_point("cgroup-remove.busy");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
