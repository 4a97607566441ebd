//! The record of the host a snapshot was taken on (CRIU version, kernel, arch,
//! page size, CPU model and flags, cgroup version) and the check, before a
//! restore, that this host can run it.

use std::fs;
use std::path::Path;

use super::meta::HostRecord;

fn uname() -> (String, String) {
    match nix::sys::utsname::uname() {
        Ok(u) => (
            u.release().to_string_lossy().into_owned(),
            u.machine().to_string_lossy().into_owned(),
        ),
        Err(_) => (String::new(), String::new()),
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map(|v| v as u64)
        .unwrap_or(4096)
}

/// (model name, flags) of the first CPU in /proc/cpuinfo.
fn cpu() -> (String, Vec<String>) {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut model = String::new();
    let mut flags = Vec::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "model name" if model.is_empty() => model = v.trim().to_string(),
                "flags" if flags.is_empty() => {
                    flags = v.split_whitespace().map(str::to_string).collect();
                }
                _ => {}
            }
        }
        if !model.is_empty() && !flags.is_empty() {
            break;
        }
    }
    (model, flags)
}

/// "v1" when a v1 hierarchy (e.g. memory) is mounted, "v2" on a unified host.
pub fn cgroup_version() -> &'static str {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else {
        "v1"
    }
}

pub fn record() -> HostRecord {
    let (kernel, arch) = uname();
    let (cpu_model, cpu_flags) = cpu();
    HostRecord {
        kernel,
        arch,
        page_size: page_size(),
        cpu_model,
        cpu_flags,
        cgroup_version: cgroup_version().to_string(),
        criu_version: String::new(),
    }
}

fn version_tuple(v: &str) -> Vec<u64> {
    v.split('.').filter_map(|p| p.parse().ok()).collect()
}

/// Every way this host differs from `snap` that would make a restore fail, each
/// as one sentence saying what differs and what to do.
pub fn compare(snap: Option<&HostRecord>, criu_version: &str) -> Vec<String> {
    let Some(snap) = snap else {
        return Vec::new();
    };
    let here = record();
    let mut out = Vec::new();
    if !snap.arch.is_empty() && snap.arch != here.arch {
        out.push(format!(
            "architecture differs: snapshot {} vs host {}; restore it on a {} host",
            snap.arch, here.arch, snap.arch
        ));
    }
    let sp = snap.page_size;
    if sp != 0 && sp != page_size() {
        out.push(format!(
            "page size differs: snapshot {sp} vs host {}; CRIU images are page-size specific",
            page_size()
        ));
    }
    if !snap.cgroup_version.is_empty() && snap.cgroup_version != here.cgroup_version {
        out.push(format!(
            "cgroup version differs: snapshot {} vs host {}; restore with --manage-cgroups-mode ignore",
            snap.cgroup_version, here.cgroup_version
        ));
    }
    let missing: Vec<&str> = snap
        .cpu_flags
        .iter()
        .map(String::as_str)
        .filter(|f| !here.cpu_flags.iter().any(|h| h == f))
        .collect();
    if !missing.is_empty() && !here.cpu_flags.is_empty() {
        out.push(format!(
            "this CPU lacks features the snapshot's CPU had ({}); the restored process may crash on them",
            missing.join(" ")
        ));
    }
    out.extend(compare_criu(snap, criu_version));
    out
}

fn compare_criu(snap: &HostRecord, criu_version: &str) -> Option<String> {
    let dumped = snap.criu_version.as_str();
    if criu_version.is_empty() || dumped.is_empty() {
        return None;
    }
    (version_tuple(criu_version) < version_tuple(dumped)).then(|| {
        format!("CRIU {criu_version} here is older than CRIU {dumped} that dumped the snapshot; install CRIU >= {dumped}")
    })
}

/// Memory charged to the cgroup of `pid` (v1 memory controller or v2), if readable.
pub fn cgroup_memory_usage(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut p = line.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        let rel = path.trim_start_matches('/');
        if ctrls.split(',').any(|c| c == "memory") {
            let f = Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.usage_in_bytes");
            return fs::read_to_string(f).ok()?.trim().parse().ok();
        }
        if ctrls.is_empty() && cgroup_version() == "v2" {
            let f = Path::new("/sys/fs/cgroup").join(rel).join("memory.current");
            return fs::read_to_string(f).ok()?.trim().parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_is_compatible() {
        let r = HostRecord {
            criu_version: "4.2.1".into(),
            ..record()
        };
        assert!(compare(Some(&r), "4.2.1").is_empty());
    }

    #[test]
    fn differences_are_named() {
        let r = HostRecord {
            arch: "riscv64".into(),
            page_size: 65536,
            cpu_flags: vec!["fpu".into(), "definitely_not_a_flag".into()],
            criu_version: "9.0.0".into(),
            ..record()
        };
        let m = compare(Some(&r), "4.2.1");
        assert!(
            m.iter().any(|s| s.starts_with("architecture differs")),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.starts_with("page size differs")),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.contains("definitely_not_a_flag")),
            "{m:?}"
        );
        assert!(
            m.iter().any(|s| s.contains("older than CRIU 9.0.0")),
            "{m:?}"
        );
    }
}
