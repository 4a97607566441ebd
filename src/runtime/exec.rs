//! What a process started by `exec` runs as: the container's own `process`
//! (config.json) with only what the flags or the `--process` file name laid over
//! it, as runc does, so that an exec is never more privileged than the container's
//! process unless asked (`-u`, `--cap`). Also decides whether and how the
//! container's seccomp filter can be loaded into the exec'd process. Pure data:
//! `core.rs` hands the result to libcontainer.

use std::fs;
use std::io::{Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction, Process, Spec,
};

use super::{ExecOptions, Result, RuntimeError};

/// Refuses an exec that names nothing to run, before anything is looked up.
pub fn check_request(opts: &ExecOptions) -> Result<()> {
    if let Some(p) = &opts.process {
        if !p.is_file() {
            return Err(RuntimeError::Invalid(format!(
                "--process {}: no such file",
                p.display()
            )));
        }
    } else if opts.args.is_empty() {
        return Err(RuntimeError::Invalid(
            "exec needs a command after the container id, or --process FILE".into(),
        ));
    }
    Ok(())
}

/// What libcontainer's tenant builder is given: the process as a file, and the
/// seccomp filter the exec'd process loads before execve.
pub struct Prepared {
    pub file: ProcessFile,
    pub filter: Option<LinuxSeccomp>,
    /// The process asks for a terminal (`-t`, or `terminal` in `--process`).
    pub terminal: bool,
}

/// Reads the container's config.json (the one libcontainer's tenant builder
/// reads too) and prepares the process for `opts`.
pub fn prepare(config: &Path, opts: &ExecOptions) -> Result<Prepared> {
    let fail = |detail: String| RuntimeError::Core {
        op: "exec in",
        id: opts.id.clone(),
        detail,
    };
    let spec = Spec::load(config)
        .map_err(|e| fail(format!("read the container's {}: {e}", config.display())))?;
    let container = spec
        .process()
        .as_ref()
        .ok_or_else(|| fail(format!("{} has no process", config.display())))?;
    let mut process = exec_process(container, opts)?;
    let filter = exec_seccomp(spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()))
        .map_err(|e| fail(e.to_string()))?;
    if filter.is_some() {
        keep_cap_to_load_filter(&mut process);
    }
    let file = ProcessFile::write(&process).map_err(|e| match e {
        RuntimeError::Invalid(detail) => fail(detail),
        e => e,
    })?;
    Ok(Prepared {
        file,
        filter,
        terminal: process.terminal() == Some(true),
    })
}

/// The process as the JSON file the tenant builder reads, in a file with no name
/// (O_TMPFILE) reached through /proc/self/fd: nothing is left behind, and
/// libcontainer reads it in this process before it forks.
pub struct ProcessFile(fs::File);

impl ProcessFile {
    fn write(p: &Process) -> Result<Self> {
        let io = |source| RuntimeError::Io {
            op: "write the exec process for libcontainer to a file in",
            path: std::env::temp_dir(),
            source,
        };
        let json = serde_json::to_vec(p)
            .map_err(|e| RuntimeError::Invalid(format!("encode the process: {e}")))?;
        let mut f = tempfile::tempfile().map_err(io)?;
        f.write_all(&json).map_err(io)?;
        f.rewind().map_err(io)?;
        Ok(Self(f))
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }
}

/// The process to run for `opts`, given the container's `process` from its
/// config.json.
fn exec_process(container: &Process, opts: &ExecOptions) -> Result<Process> {
    match &opts.process {
        Some(path) => Ok(from_file(container, &read_process_file(path)?)),
        None => from_flags(container, opts),
    }
}

fn read_process_file(path: &Path) -> Result<Process> {
    let bad = |reason: String| RuntimeError::ProcessFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let p: Process = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not a valid OCI process object: {e}")))?;
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(bad("has no args: name the command to run".into()));
    }
    if !p.cwd().is_absolute() {
        return Err(bad(format!(
            "cwd {:?} is not an absolute path",
            p.cwd().display()
        )));
    }
    Ok(p)
}

/// `--process FILE`: the file is the process, as in runc; what it leaves out of
/// the security settings comes from the container's process (runc's
/// newInitConfig does the same for capabilities, rlimits, apparmor and the
/// SELinux label). noNewPrivileges left out also stays the container's: runc
/// reads an absent field as `false`, which would make such an exec more
/// privileged than the container's process.
fn from_file(container: &Process, file: &Process) -> Process {
    let mut p = file.clone();
    if p.capabilities().is_none() {
        p.set_capabilities(container.capabilities().clone());
    }
    if p.rlimits().as_ref().is_none_or(|r| r.is_empty()) {
        p.set_rlimits(container.rlimits().clone());
    }
    if p.no_new_privileges().is_none() {
        p.set_no_new_privileges(container.no_new_privileges());
    }
    if p.apparmor_profile().as_ref().is_none_or(|s| s.is_empty()) {
        p.set_apparmor_profile(container.apparmor_profile().clone());
    }
    if p.selinux_label().as_ref().is_none_or(|s| s.is_empty()) {
        p.set_selinux_label(container.selinux_label().clone());
    }
    p
}

/// `exec ID CMD...`: runc's getProcess: the container's process with args, and
/// whatever -u/-g/--cap/--cwd/-e/--no-new-privs/-t say.
fn from_flags(container: &Process, opts: &ExecOptions) -> Result<Process> {
    let mut p = container.clone();
    p.set_args(Some(opts.args.clone()));
    p.set_command_line(None);
    p.set_terminal(Some(opts.tty));
    if let Some(cwd) = &opts.cwd {
        if !cwd.is_absolute() {
            return Err(RuntimeError::Invalid(format!(
                "--cwd {}: must be an absolute path",
                cwd.display()
            )));
        }
        p.set_cwd(cwd.clone());
    }
    p.set_env(Some(merge_env(
        container.env().as_deref().unwrap_or_default(),
        &opts.env,
    )?));
    if opts.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    let user = p.user_mut();
    if let Some((uid, gid)) = opts.user {
        user.set_uid(uid);
        if let Some(gid) = gid {
            user.set_gid(gid);
        }
    }
    if !opts.additional_gids.is_empty() {
        let mut gids = user.additional_gids().clone().unwrap_or_default();
        gids.extend(&opts.additional_gids);
        user.set_additional_gids(Some(gids));
    }
    if !opts.caps.is_empty() {
        let added = parse_caps(&opts.caps)?;
        p.set_capabilities(Some(add_caps(p.capabilities().as_ref(), &added)));
    }
    Ok(p)
}

/// The container's environment with `-e KEY=VALUE` entries replacing the same
/// keys and the rest appended, in order (runc: the last value of a key wins).
fn merge_env(base: &[String], extra: &[String]) -> Result<Vec<String>> {
    let key = |kv: &str| kv.split_once('=').map_or(kv, |(k, _)| k).to_string();
    let mut env = base.to_vec();
    for kv in extra {
        if !kv.contains('=') || kv.starts_with('=') {
            return Err(RuntimeError::Invalid(format!(
                "--env {kv:?}: expected KEY=VALUE"
            )));
        }
        let k = key(kv);
        env.retain(|e| key(e) != k);
        env.push(kv.clone());
    }
    Ok(env)
}

fn parse_caps(names: &[String]) -> Result<Vec<Capability>> {
    names
        .iter()
        .map(|n| {
            if !n.to_ascii_uppercase().starts_with("CAP_") {
                return Err(RuntimeError::Invalid(format!(
                    "--cap {n:?}: expected a capability name like CAP_NET_ADMIN"
                )));
            }
            serde_json::from_value(serde_json::Value::String(n.clone())).map_err(|_| {
                RuntimeError::Invalid(format!(
                    "--cap {n:?}: unknown capability (see capabilities(7))"
                ))
            })
        })
        .collect()
}

/// runc's `--cap`: added to the bounding, effective and permitted sets, and to
/// the ambient set only when the process has an inheritable set (ambient
/// capabilities need inheritable ones; inheritable is never widened, see
/// GHSA-f3fp-gc8g-vw66).
fn add_caps(current: Option<&LinuxCapabilities>, added: &[Capability]) -> LinuxCapabilities {
    let union = |set: &Option<Capabilities>| -> Option<Capabilities> {
        let mut s = set.clone().unwrap_or_default();
        s.extend(added.iter().copied());
        Some(s)
    };
    let none = empty_caps();
    let cur = current.unwrap_or(&none);
    let mut caps = empty_caps();
    caps.set_bounding(union(cur.bounding()))
        .set_effective(union(cur.effective()))
        .set_permitted(union(cur.permitted()))
        .set_inheritable(cur.inheritable().clone());
    if cur.inheritable().is_some() {
        caps.set_ambient(union(cur.ambient()));
    } else {
        caps.set_ambient(cur.ambient().clone());
    }
    caps
}

/// No sets at all (oci-spec's `Default` fills in a default set of capabilities).
fn empty_caps() -> LinuxCapabilities {
    let mut c = LinuxCapabilities::default();
    c.set_bounding(None)
        .set_effective(None)
        .set_permitted(None)
        .set_inheritable(None)
        .set_ambient(None);
    c
}

/// The container's seccomp filter as the exec'd process must get it, or why it
/// cannot. A filter that hands syscalls to a listener (SCMP_ACT_NOTIFY) is
/// refused rather than run without it: the notify fd would have to reach the
/// container's seccomp agent, which stasis's exec path does not do yet.
fn exec_seccomp(linux_seccomp: Option<&LinuxSeccomp>) -> Result<Option<LinuxSeccomp>> {
    let Some(s) = linux_seccomp else {
        return Ok(None);
    };
    let notify = s.default_action() == LinuxSeccompAction::ScmpActNotify
        || s.syscalls()
            .iter()
            .flatten()
            .any(|r| r.action() == LinuxSeccompAction::ScmpActNotify);
    if notify || s.listener_path().is_some() {
        return Err(RuntimeError::Invalid(
            "the container's seccomp filter sends syscalls to a listener \
             (SCMP_ACT_NOTIFY / listenerPath); exec cannot hand the listener the \
             notify fd yet, and will not run the process without the filter: \
             run the command through the container's own process instead"
                .into(),
        ));
    }
    Ok(Some(s.clone()))
}

/// The filter is loaded just before execve, after libcontainer has dropped to the
/// process's user and capabilities. Without no_new_privs, loading a filter needs
/// CAP_SYS_ADMIN (seccomp(2)), which most processes do not keep. So the process
/// keeps CAP_SYS_ADMIN in its effective and permitted sets (never in bounding,
/// inheritable or ambient) until then: execve recomputes the permitted set from
/// the inheritable, bounding and ambient sets and the file's capabilities only
/// (capabilities(7), "Transformation of capabilities during execve"), so the
/// command starts with exactly the capabilities it would have had without this.
/// runc gets the same effect by loading the filter before dropping capabilities.
fn keep_cap_to_load_filter(p: &mut Process) {
    if p.no_new_privileges() == Some(true) {
        return;
    }
    let Some(caps) = p.capabilities().clone() else {
        // No capability sets: libcontainer leaves the capabilities as they are.
        return;
    };
    let mut caps = caps;
    let with = |set: &Option<Capabilities>| {
        set.clone().map(|mut s| {
            s.insert(Capability::SysAdmin);
            s
        })
    };
    let (eff, perm) = (with(caps.effective()), with(caps.permitted()));
    caps.set_effective(eff).set_permitted(perm);
    p.set_capabilities(Some(caps));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Process {
        serde_json::from_value(serde_json::json!({
            "terminal": true,
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000]},
            "args": ["sleep", "100"],
            "env": ["PATH=/bin", "A=1"],
            "cwd": "/home",
            "capabilities": {
                "bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                "permitted": ["CAP_KILL"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 256, "hard": 512}],
            "noNewPrivileges": true,
            "apparmorProfile": "prof",
            "selinuxLabel": "label"
        }))
        .unwrap()
    }

    fn opts(args: &[&str]) -> ExecOptions {
        ExecOptions {
            id: "c".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn flags_start_from_the_containers_process() {
        let c = container();
        let p = exec_process(&c, &opts(&["id"])).unwrap();
        assert_eq!(p.args().as_deref(), Some(&["id".to_string()][..]));
        assert_eq!(p.user(), c.user());
        assert_eq!(p.rlimits(), c.rlimits());
        assert_eq!(p.capabilities(), c.capabilities());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.apparmor_profile().as_deref(), Some("prof"));
        assert_eq!(p.selinux_label().as_deref(), Some("label"));
        assert_eq!(p.cwd(), &PathBuf::from("/home"));
        assert_eq!(p.terminal(), Some(false));
        assert_eq!(p.env(), c.env());
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let c = container();
        let mut o = opts(&["id"]);
        o.user = Some((0, None));
        o.additional_gids = vec![3000];
        o.env = vec!["A=2".into(), "B=3".into()];
        o.cwd = Some("/tmp".into());
        o.tty = true;
        o.caps = vec!["CAP_NET_ADMIN".into()];
        let p = exec_process(&c, &o).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (0, 1000));
        assert_eq!(
            p.user().additional_gids().as_deref(),
            Some(&[2000, 3000][..])
        );
        assert_eq!(
            p.env().as_deref().unwrap(),
            &["PATH=/bin".to_string(), "A=2".into(), "B=3".into()][..]
        );
        assert_eq!(p.cwd(), &PathBuf::from("/tmp"));
        assert_eq!(p.terminal(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        for set in [caps.bounding(), caps.effective(), caps.permitted()] {
            let set = set.as_ref().unwrap();
            assert!(set.contains(&Capability::NetAdmin) && set.contains(&Capability::Kill));
        }
        assert_eq!(caps.inheritable(), &None);
        assert_eq!(caps.ambient(), &None);
        assert_eq!(p.rlimits(), c.rlimits());

        o.user = Some((5, Some(6)));
        let p = exec_process(&c, &o).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (5, 6));
    }

    #[test]
    fn bad_flags_are_refused() {
        let c = container();
        for (field, val) in [("cap", "NET_ADMIN"), ("cap", "CAP_NOPE"), ("env", "NOEQ")] {
            let mut o = opts(&["id"]);
            match field {
                "cap" => o.caps = vec![val.into()],
                _ => o.env = vec![val.into()],
            }
            let e = exec_process(&c, &o).unwrap_err().to_string();
            assert!(e.contains(val), "{e}");
        }
        let mut o = opts(&["id"]);
        o.cwd = Some("rel".into());
        assert!(exec_process(&c, &o).is_err());
    }

    #[test]
    fn process_file_fills_security_settings_from_the_container() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        fs::write(
            &path,
            r#"{"user": {"uid": 7}, "args": ["id"], "cwd": "/", "env": ["X=1"]}"#,
        )
        .unwrap();
        let c = container();
        let mut o = opts(&[]);
        o.process = Some(path.clone());
        let p = exec_process(&c, &o).unwrap();
        assert_eq!((p.user().uid(), p.user().gid()), (7, 0));
        assert_eq!(p.env().as_deref(), Some(&["X=1".to_string()][..]));
        assert_eq!(p.capabilities(), c.capabilities());
        assert_eq!(p.rlimits(), c.rlimits());
        assert_eq!(p.no_new_privileges(), Some(true));
        assert_eq!(p.apparmor_profile().as_deref(), Some("prof"));

        fs::write(
            &path,
            r#"{"user": {}, "args": ["id"], "cwd": "/", "noNewPrivileges": false,
                "capabilities": {"effective": ["CAP_CHOWN"]}}"#,
        )
        .unwrap();
        let p = exec_process(&c, &o).unwrap();
        assert_eq!(p.no_new_privileges(), Some(false));
        assert_ne!(p.capabilities(), c.capabilities());

        for bad in [
            r#"{"args": [], "cwd": "/"}"#,
            r#"{"args": ["id"], "cwd": "x"}"#,
            "{",
        ] {
            fs::write(&path, bad).unwrap();
            let e = exec_process(&c, &o).unwrap_err().to_string();
            assert!(e.contains("p.json"), "{e}");
        }
    }

    #[test]
    fn filter_loading_cap_only_without_nnp_and_never_inherited() {
        let mut p = container();
        keep_cap_to_load_filter(&mut p);
        assert_eq!(p.capabilities(), container().capabilities());

        p.set_no_new_privileges(None);
        keep_cap_to_load_filter(&mut p);
        let caps = p.capabilities().as_ref().unwrap();
        for set in [caps.effective(), caps.permitted()] {
            assert!(set.as_ref().unwrap().contains(&Capability::SysAdmin));
        }
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
        assert_eq!(caps.inheritable(), &None);
        assert_eq!(caps.ambient(), &None);
    }

    #[test]
    fn notify_filters_are_refused() {
        let s: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]
        }))
        .unwrap();
        assert!(exec_seccomp(Some(&s)).is_err());
        let s: LinuxSeccomp = serde_json::from_value(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]
        }))
        .unwrap();
        assert_eq!(exec_seccomp(Some(&s)).unwrap(), Some(s));
        assert_eq!(exec_seccomp(None).unwrap(), None);
    }
}
