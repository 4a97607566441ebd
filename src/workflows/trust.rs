//! The restore side of the trust model (src/store/FORMAT.md "Trust model"): a
//! snapshot this host did not make (imported, or of unknown origin) is untrusted
//! input, and its stored config.json decides nothing that reaches the host. Owns
//! the list of such settings, taking them out of a foreign snapshot's config
//! (one warning line each), skipping device nodes of its filesystem, refusing an
//! image whose processes CRIU would give capabilities beyond the default set,
//! and the operator's two ways to decide otherwise: `--bundle` (that config.json
//! is then the one used) or `--trust-snapshot-config` (everything, image too).

use serde_json::Value;

use super::fstree::{self, Kind};
use super::snapshot::Prepared;
use super::{Result, WorkflowError};

/// Capabilities a foreign snapshot's container may keep: the default set of
/// Docker and podman. Anything else in its config is dropped.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
];

/// Mount types that name no host path: kept. Binds and every other type
/// (a block device, an overlay of host directories, ...) are dropped.
const PSEUDO_FS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

const HOOKS: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// Takes every host-affecting setting out of a foreign snapshot's config.json
/// and returns one line per setting taken out. `carried`: destinations of the
/// volumes the snapshot brings along (their source is replaced by the copy's
/// own, so those binds stay).
pub fn restrict_config(cfg: &mut Value, carried: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    restrict_hooks(cfg, &mut out);
    restrict_mounts(cfg, carried, &mut out);
    restrict_caps(cfg, &mut out);
    let Some(linux) = cfg.get_mut("linux").and_then(Value::as_object_mut) else {
        return out;
    };
    if let Some(devs) = linux.remove("devices") {
        for (i, d) in devs.as_array().into_iter().flatten().enumerate() {
            out.push(format!(
                "linux.devices[{i}] = {} ({} {}:{})",
                text(&d["path"]),
                text(&d["type"]),
                d["major"],
                d["minor"]
            ));
        }
    }
    if let Some(rules) = linux
        .get_mut("resources")
        .and_then(|r| r.get_mut("devices"))
        .and_then(Value::as_array_mut)
    {
        for (i, r) in rules.iter().enumerate() {
            if r["allow"] == Value::Bool(true) {
                out.push(format!("linux.resources.devices[{i}] = allow {r}"));
            }
        }
        rules.retain(|r| r["allow"] != Value::Bool(true));
    }
    for (i, ns) in linux
        .get_mut("namespaces")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(path) = ns.as_object_mut().and_then(|n| n.remove("path")) {
            out.push(format!(
                "linux.namespaces[{i}].path = {} (a {} namespace of the host)",
                text(&path),
                text(&ns["type"])
            ));
        }
    }
    if let Some(sysctl) = linux.remove("sysctl") {
        for (k, v) in sysctl.as_object().into_iter().flatten() {
            out.push(format!("linux.sysctl.{k} = {}", text(v)));
        }
    }
    for key in ["cgroupsPath", "rootfsPropagation"] {
        if let Some(v) = linux.remove(key) {
            out.push(format!("linux.{key} = {}", text(&v)));
        }
    }
    out
}

fn restrict_hooks(cfg: &mut Value, out: &mut Vec<String>) {
    let Some(hooks) = cfg.as_object_mut().and_then(|c| c.remove("hooks")) else {
        return;
    };
    for kind in HOOKS {
        for (i, h) in hooks[*kind].as_array().into_iter().flatten().enumerate() {
            let args: Vec<String> = h["args"]
                .as_array()
                .into_iter()
                .flatten()
                .skip(1)
                .map(text)
                .collect();
            out.push(format!(
                "hooks.{kind}[{i}] = {} {}",
                text(&h["path"]),
                args.join(" ")
            ));
        }
    }
}

fn restrict_mounts(cfg: &mut Value, carried: &[&str], out: &mut Vec<String>) {
    let Some(mounts) = cfg.get_mut("mounts").and_then(Value::as_array_mut) else {
        return;
    };
    let mut i = 0;
    mounts.retain(|m| {
        i += 1;
        let dest = m["destination"].as_str().unwrap_or("");
        let ty = m["type"].as_str().unwrap_or("");
        let bind = ty == "bind"
            || m["options"]
                .as_array()
                .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
        let keep = carried.contains(&dest) || (!bind && PSEUDO_FS.contains(&ty));
        if !keep {
            out.push(format!(
                "mounts[{}] = {} {} on {dest}",
                i - 1,
                if bind { "bind" } else { ty },
                text(&m["source"])
            ));
        }
        keep
    });
}

fn restrict_caps(cfg: &mut Value, out: &mut Vec<String>) {
    let Some(caps) = cfg
        .get_mut("process")
        .and_then(|p| p.get_mut("capabilities"))
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let mut dropped: Vec<(String, Vec<String>)> = Vec::new();
    for (set, list) in caps.iter_mut() {
        let Some(list) = list.as_array_mut() else {
            continue;
        };
        list.retain(|c| {
            let name = c.as_str().unwrap_or("");
            if DEFAULT_CAPS.contains(&name) {
                return true;
            }
            match dropped.iter_mut().find(|(n, _)| n == name) {
                Some((_, sets)) => sets.push(set.clone()),
                None => dropped.push((name.to_string(), vec![set.clone()])),
            }
            false
        });
    }
    for (cap, sets) in dropped {
        out.push(format!(
            "process.capabilities {cap} (not in the default set; in {})",
            sets.join(", ")
        ));
    }
}

/// A JSON value as text: strings without quotes.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

/// Takes the device nodes out of a foreign snapshot's filesystem (a block device
/// of the host would be reachable from the container); one line each.
pub fn skip_device_nodes(manifest: &mut fstree::Manifest) -> Vec<String> {
    let mut out = Vec::new();
    for t in &mut manifest.trees {
        t.entries.retain(|e| {
            let dev = matches!(e.kind, Kind::Char | Kind::Block);
            if dev {
                let kind = if e.kind == Kind::Char {
                    "char"
                } else {
                    "block"
                };
                out.push(format!(
                    "device node {} ({kind} {}:{}) in its {} tree",
                    if e.path.is_empty() { "/" } else { &e.path },
                    libc::major(e.rdev as libc::dev_t),
                    libc::minor(e.rdev as libc::dev_t),
                    t.role
                ));
            }
            !dev
        });
    }
    out
}

fn prefix(p: &Prepared) -> String {
    format!(
        "snapshot {} is foreign (origin: {}): skipped",
        p.sid.short(),
        p.origin
    )
}

/// Called by `prepare` for a snapshot not made here: the restore uses a copy of
/// its config.json without the host-affecting settings, and its filesystem
/// without device nodes; each is one warning line.
pub(crate) fn restrict(p: &mut Prepared) -> Result<()> {
    let pre = prefix(p);
    if let Some(m) = p.manifest.as_mut() {
        for line in skip_device_nodes(m) {
            p.warnings.push(format!("{pre} {line}"));
        }
    }
    let carried: Vec<&str> = p
        .manifest
        .iter()
        .flat_map(|m| &m.trees)
        .filter(|t| t.role == "volume")
        .map(|t| t.dest.as_str())
        .collect();
    let mut cfg: Value =
        serde_json::from_slice(&p.stored_config_json).map_err(|e| WorkflowError::Snapshot {
            snapshot: p.sid.short(),
            reason: format!("its stored config.json is not JSON: {e}"),
        })?;
    let extra: Vec<String> = crate::runtime::checkpoint::image_capabilities(&p.image)?
        .into_iter()
        .filter(|c| !DEFAULT_CAPS.contains(&c.as_str()))
        .collect();
    if !extra.is_empty() {
        p.refused = Some(format!(
            "it is foreign (origin: {}) and its image gives its processes {} (CRIU restores a process's capabilities from the image, whatever config.json says); refused: restore it only if you trust its producer, with --trust-snapshot-config",
            p.origin,
            extra.join(", ")
        ));
    }
    let lines = restrict_config(&mut cfg, &carried);
    p.config_json = serde_json::to_vec(&cfg).map_err(|e| WorkflowError::Snapshot {
        snapshot: p.sid.short(),
        reason: format!("cannot encode its restricted config.json: {e}"),
    })?;
    if !lines.is_empty() {
        p.ignored = lines.iter().map(|l| format!("{pre} {l}")).collect();
        p.ignored.push(format!(
            "snapshot {}: pass --bundle DIR (its config.json is then used) or --trust-snapshot-config to apply the skipped settings",
            p.sid.short()
        ));
        p.warnings.extend(p.ignored.iter().cloned());
    }
    Ok(())
}

/// The operator's choice for a restore: with `--bundle` its config.json is
/// authoritative (nothing of the snapshot's is used, so nothing is skipped);
/// with `--trust-snapshot-config` the stored config.json is used whole.
pub(crate) fn choose(p: &mut Prepared, bundle_given: bool, trust_config: bool) {
    if p.origin.is_local() || !(bundle_given || trust_config) {
        return;
    }
    let ignored = std::mem::take(&mut p.ignored);
    p.warnings.retain(|w| !ignored.contains(w));
    if trust_config {
        p.refused = None;
    }
    if trust_config && !bundle_given {
        p.config_json = p.stored_config_json.clone();
        p.trusted = true;
        p.warnings.push(format!(
            "snapshot {} is foreign (origin: {}): its stored config.json is used whole (--trust-snapshot-config): its hooks run on this host",
            p.sid.short(),
            p.origin
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn foreign_config_keeps_nothing_that_reaches_the_host() {
        let mut cfg = json!({
            "process": {"capabilities": {
                "bounding": ["CAP_KILL", "CAP_SYS_ADMIN"],
                "effective": ["CAP_KILL", "CAP_SYS_ADMIN", "CAP_SYS_MODULE"]}},
            "hooks": {"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "id > /tmp/PWNED"]}],
                      "poststart": [{"path": "/x"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/host", "type": "bind", "source": "/", "options": ["rbind"]},
                {"destination": "/data", "type": "bind", "source": "/srv/data"},
                {"destination": "/disk", "type": "ext4", "source": "/dev/sda1"},
                {"destination": "/etc/x", "type": "none", "source": "/etc", "options": ["bind"]}],
            "linux": {
                "devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}],
                "resources": {"devices": [{"allow": false, "access": "rwm"},
                                          {"allow": true, "access": "rwm"}]},
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}],
                "sysctl": {"kernel.core_pattern": "|/tmp/x"},
                "cgroupsPath": "/system.slice",
                "rootfsPropagation": "rshared"}
        });
        let lines = restrict_config(&mut cfg, &["/data"]);
        assert!(cfg.get("hooks").is_none());
        let dests: Vec<&str> = cfg["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests, ["/proc", "/data"]);
        assert_eq!(
            cfg["process"]["capabilities"]["effective"],
            json!(["CAP_KILL"])
        );
        assert_eq!(
            cfg["process"]["capabilities"]["bounding"],
            json!(["CAP_KILL"])
        );
        let linux = &cfg["linux"];
        assert!(linux.get("devices").is_none() && linux.get("sysctl").is_none());
        assert!(linux.get("cgroupsPath").is_none() && linux.get("rootfsPropagation").is_none());
        assert_eq!(
            linux["resources"]["devices"],
            json!([{"allow": false, "access": "rwm"}])
        );
        assert_eq!(linux["namespaces"][1], json!({"type": "network"}));
        let want = [
            "hooks.createRuntime[0] = /bin/sh -c id > /tmp/PWNED",
            "hooks.poststart[0] = /x",
            "mounts[1] = bind / on /host",
            "mounts[3] = ext4 /dev/sda1 on /disk",
            "mounts[4] = bind /etc on /etc/x",
            "process.capabilities CAP_SYS_ADMIN",
            "process.capabilities CAP_SYS_MODULE",
            "linux.devices[0] = /dev/sda (b 8:0)",
            "linux.resources.devices[1] = allow",
            "linux.namespaces[1].path = /proc/1/ns/net",
            "linux.sysctl.kernel.core_pattern = |/tmp/x",
            "linux.cgroupsPath = /system.slice",
            "linux.rootfsPropagation = rshared",
        ];
        for w in want {
            assert!(
                lines.iter().any(|l| l.trim_end().starts_with(w)),
                "no line {w:?} in {lines:#?}"
            );
        }
        assert_eq!(lines.len(), want.len(), "{lines:#?}");
    }

    #[test]
    fn device_nodes_of_a_foreign_tree_are_skipped() {
        let entry = |path: &str, kind: Kind, rdev: u64| -> fstree::Entry {
            serde_json::from_value(json!({
                "path": path, "kind": kind, "mode": 0o666, "uid": 0, "gid": 0,
                "mtime": 0, "mtime_nsec": 0, "rdev": rdev,
            }))
            .unwrap()
        };
        let mut m: fstree::Manifest = serde_json::from_value(json!({
            "version": 1,
            "trees": [{"role": "rootfs", "dest": "/", "source": "/x", "entries": []}],
        }))
        .unwrap();
        m.trees[0].entries = vec![
            entry("", Kind::Dir, 0),
            entry("sda", Kind::Block, libc::makedev(8, 0)),
            entry("mem", Kind::Char, libc::makedev(1, 1)),
            entry("fifo", Kind::Fifo, 0),
        ];
        let lines = skip_device_nodes(&mut m);
        let left: Vec<&str> = m.trees[0].entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(left, ["", "fifo"]);
        assert_eq!(
            lines,
            [
                "device node sda (block 8:0) in its rootfs tree",
                "device node mem (char 1:1) in its rootfs tree"
            ]
        );
    }

    #[test]
    fn a_plain_config_loses_nothing() {
        let mut cfg = json!({
            "process": {"capabilities": {"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE"]}},
            "mounts": [{"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}],
                      "resources": {"devices": [{"allow": false, "access": "rwm"}]}}
        });
        let before = cfg.clone();
        assert_eq!(restrict_config(&mut cfg, &[]), Vec::<String>::new());
        assert_eq!(cfg, before);
    }
}
