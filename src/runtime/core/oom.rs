//! `linux.resources.memory.disableOOMKiller` (part of the libcontainer boundary,
//! `core`): libcontainer 0.7 applies every cgroup with `disable_oom_killer:
//! false`, so the spec's setting was dropped. cgroup v1 has the switch
//! (`memory.oom_control`); cgroup v2 has no equivalent (`memory.oom.group` decides
//! what is killed, not whether), so there the setting is reported and ignored, as
//! runc ignores it on v2.

use std::fs;
use std::path::{Path, PathBuf};

use libcgroups::common::{get_cgroup_setup, CgroupSetup};
use libcgroups::v1::{util::get_subsystem_mount_point, ControllerType};
use oci_spec::runtime::Spec;

use super::warn;
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
