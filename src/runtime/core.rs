//! The boundary to libcontainer (youki's library, pinned at =0.7.0): the only
//! module that names its types (with its submodule `core/hooks.rs`). It turns our options into libcontainer builders and calls,
//! and turns libcontainer errors into `RuntimeError` strings with their causes.
//! It must not keep state of its own: `mod.rs` owns our state file and transitions.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::seccomp::initialize_seccomp;
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    Spec,
};

use super::tty;
use super::{CreateOptions, ExecOptions, LaunchFailure, ResourceOverrides, Result, RuntimeError};

mod cgroup;
mod hooks;
pub use cgroup::{cgroup_destroy, cgroup_enter, cgroup_remove};
pub use hooks::run_hooks;
use hooks::{run_each, take_hooks, warn, HookKind};

/// Renders an error with its chain of causes, deduplicating repeated messages.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    chain_dyn(e)
}

fn core_err(
    op: &'static str,
    id: &str,
) -> impl FnOnce(libcontainer::error::LibcontainerError) -> RuntimeError {
    let id = id.to_string();
    move |e| RuntimeError::Core {
        op,
        id,
        detail: chain(&e),
    }
}

/// `core_err` for libcontainer's build of a container's or exec's process: a
/// process that could not start for a known reason becomes `Launch` with it.
fn build_err(
    op: &'static str,
    id: &str,
) -> impl FnOnce(libcontainer::error::LibcontainerError) -> RuntimeError {
    let id = id.to_string();
    move |e| {
        let detail = chain(&e);
        match super::launch::launch_failure(&detail) {
            Some(cause) => RuntimeError::Launch { op, id, cause },
            None => RuntimeError::Core { op, id, detail },
        }
    }
}

/// When an exec's process could not be cloned ("failed to launch init process",
/// the errno is lost on the way): whether the container's pids limit leaves no
/// room for libcontainer's intermediate process and the exec'd one.
fn pids_limit_reached(dir: &Path, id: &str) -> Option<LaunchFailure> {
    let stats = cgroup_manager(dir, id).ok()?.stats().ok()?;
    let (current, limit) = (stats.pids.current, stats.pids.limit);
    // `current` may still count the failed intermediate process until it is reaped.
    (limit > 0 && current + 2 > limit).then_some(LaunchFailure::PidsLimit { limit })
}

/// What `check_bundle` learned about a bundle.
pub struct BundleInfo {
    pub path: PathBuf,
    pub rootfs: PathBuf,
    pub annotations: Option<HashMap<String, String>>,
    /// The container gets a new network namespace (not one given by path).
    pub own_netns: bool,
    /// `linux.resources.memory.disableOOMKiller`, which libcontainer drops.
    pub disable_oom_killer: bool,
    /// `linux.cgroupsPath` (None: libcontainer names the cgroup after the id).
    pub cgroups_path: Option<PathBuf>,
    /// `process.terminal`: the container's process gets a pty.
    pub terminal: bool,
}

/// Validates a bundle before anything is created, so that bad input gets one clear
/// line and leaves nothing behind.
pub fn check_bundle(bundle: &Path) -> Result<BundleInfo> {
    let bad = |p: &Path, reason: String| RuntimeError::Bundle {
        path: p.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(bundle).map_err(|e| bad(bundle, format!("cannot access it: {e}")))?;
    if !meta.is_dir() {
        return Err(bad(bundle, "is not a directory".into()));
    }
    let path =
        fs::canonicalize(bundle).map_err(|e| bad(bundle, format!("cannot resolve it: {e}")))?;
    let cfg = path.join("config.json");
    let bytes = fs::read(&cfg).map_err(|e| {
        bad(
            &path,
            format!("cannot read config.json: {e} (create one with `stasis spec`)"),
        )
    })?;
    let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| {
        bad(
            &cfg,
            format!("config.json is not a valid OCI runtime spec: {e}"),
        )
    })?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| bad(&cfg, "config.json has no root.path".into()))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        path.join(root.path())
    };
    let rmeta = fs::metadata(&rootfs)
        .map_err(|e| bad(&path, format!("root filesystem {}: {e}", rootfs.display())))?;
    if !rmeta.is_dir() {
        return Err(bad(
            &path,
            format!("root filesystem {} is not a directory", rootfs.display()),
        ));
    }
    let Some(process) = spec.process() else {
        return Err(bad(&cfg, "config.json has no process".into()));
    };
    check_process(process).map_err(|reason| bad(&cfg, reason))?;
    // libcontainer starts the process from an intermediate process that is in the
    // container's cgroup already: with a limit of 1 the clone always fails, and
    // libcontainer says only "failed to launch init process". (runc, which has no
    // intermediate process, accepts 1.)
    let pids_limit = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.pids().as_ref())
        .map(|p| p.limit());
    if pids_limit == Some(1) {
        return Err(bad(
            &cfg,
            "linux.resources.pids.limit is 1, but starting the container's process \
             needs 2 processes in its cgroup for a moment (libcontainer's intermediate \
             process and the process itself): set it to at least 2"
                .into(),
        ));
    }
    // A bind mount whose source is missing fails inside the container's init, and
    // libcontainer 0.7 reports only "failed to prepare rootfs" (the path is in a
    // debug log of the child). runc names it ("error mounting X to rootfs at Y");
    // check here so that our one error line does too.
    for m in spec.mounts().iter().flatten() {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        let Some(src) = m.source().as_ref().filter(|_| bind) else {
            continue;
        };
        let src = path.join(src);
        if let Err(e) = fs::metadata(&src) {
            return Err(bad(
                &cfg,
                format!(
                    "mount {}: source {}: {e}",
                    m.destination().display(),
                    src.display()
                ),
            ));
        }
    }
    let rootfs = fs::canonicalize(&rootfs).unwrap_or(rootfs);
    let own_netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Network && n.path().is_none()
            })
        });
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    Ok(BundleInfo {
        path,
        rootfs,
        annotations: spec.annotations().clone(),
        own_netns,
        disable_oom_killer: cgroup::wanted(&spec),
        cgroups_path: spec.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
        terminal,
    })
}

/// Checks the fields of a `process` that libcontainer 0.7 takes on trust and then
/// panics on (empty `args`: "index out of bounds", with a backtrace) or fails
/// with nothing to go on (a relative `cwd`: "failed to unix syscall"; a soft
/// rlimit above its hard one: "intermediate process error EINVAL"; an
/// `oomScoreAdj` out of range: "io error"). runc checks the first two
/// (`validateProcessSpec`) and fails on the others in the kernel; the reason names
/// the field.
fn check_process(p: &oci_spec::runtime::Process) -> std::result::Result<(), String> {
    for r in p.rlimits().iter().flatten() {
        if r.soft() > r.hard() {
            return Err(format!(
                "process.rlimits {:?}: the soft limit {} is above the hard limit {}",
                r.typ(),
                r.soft(),
                r.hard()
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj().filter(|a| !(-1000..=1000).contains(a)) {
        return Err(format!(
            "process.oomScoreAdj {adj} is outside the kernel's range -1000..1000"
        ));
    }
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err("process.args is empty: it must name the program to run".into());
    }
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        return Err(format!(
            "process.cwd {:?} is not an absolute path: give the working directory \
             inside the container from its root, e.g. \"/\"",
            cwd.display().to_string()
        ));
    }
    Ok(())
}

pub struct Created {
    pub pid: i32,
    pub cgroup_path: PathBuf,
    /// The pty master of a foreground container with a terminal and no
    /// `--console-socket`: the caller relays it (`tty.rs`).
    pub console: Option<OwnedFd>,
}

pub fn create(
    root: &Path,
    opts: &CreateOptions,
    bundle_info: &BundleInfo,
    detach: bool,
) -> Result<Created> {
    let _pipe = SigpipeToEpipe::install();
    let id = opts.id.as_str();
    let bundle = bundle_info.path.as_path();
    let cgroup = libcontainer::utils::get_cgroup_path(&bundle_info.cgroups_path, id);
    let cgroup_existed = cgroup::exists(&cgroup);
    let console =
        tty::ConsolePlan::new(bundle_info.terminal, detach, opts.console_socket.as_ref())?;
    let container = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map_err(core_err("create", id))?
        .with_pid_file(opts.pid_file.as_ref())
        .map_err(core_err("create", id))?
        .with_console_socket(console.socket.as_ref())
        .with_preserved_fds(opts.preserve_fds)
        .validate_id()
        .map_err(core_err("create", id))?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(console.libcontainer_detach)
        .with_no_pivot(opts.no_pivot)
        .build()
        .map_err(|e| {
            // libcontainer's cleanup gives up on a cgroup that is still busy and
            // then removes the container directory, the only record of the cgroup
            // path: remove the cgroup here, where the spec still names it (if this
            // create made it).
            if !cgroup_existed {
                cgroup_remove(&cgroup, id);
            }
            build_err("create", id)(e)
        })?;
    let console = console.own.as_ref().map(tty::receive_console).transpose()?;
    if let (Some(master), Some(ws)) = (&console, tty::caller_winsize()) {
        // Before `start`, so that the process sees the caller's size from its
        // first instruction (the relay keeps it following later changes).
        let _ = tty::set_winsize(master.as_raw_fd(), &ws);
    }
    let pid = container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| RuntimeError::Core {
            op: "create",
            id: id.to_string(),
            detail: "no init process was recorded".into(),
        })?;
    let cgroup_path = container.spec().map(|c| c.cgroup_path).unwrap_or_default();
    // Before `start` runs the user's process.
    if bundle_info.disable_oom_killer {
        cgroup::disable(&cgroup_path, id)?;
    }
    Ok(Created {
        pid,
        cgroup_path,
        console,
    })
}

/// Removes whatever a failed create left: processes, cgroup, the container directory.
pub fn cleanup_failed(root: &Path, id: &str) {
    let dir = root.join(id);
    // A restore killed midway leaves the rootfs bind-mounted under the container
    // directory: unmount before removing anything, or the rootfs would go too.
    super::unmount_under(&dir);
    let _ = delete_retrying_cgroup(&dir, true);
    let _ = fs::remove_dir_all(&dir);
}

/// How long `delete` keeps retrying the removal of a cgroup that is still busy.
const CGROUP_REMOVE_PATIENCE: Duration = Duration::from_secs(10);

/// `Container::delete`, retried while removing the cgroup fails. libcgroups gives
/// up on a busy v1 cgroup after ~100 ms, but a killed init keeps its cgroup busy
/// until its parent reaps it; after `create` that parent is the host's init (or a
/// subreaper), which on a busy host takes longer. The container was then left
/// half-deleted ("could not delete" on /sys/fs/cgroup/...) with its cgroups. runc
/// retries longer too (`cgroups.RemovePath`). Only cgroup errors are retried: the
/// poststop hooks run after the cgroup is gone and must not run twice.
fn delete_retrying_cgroup(
    dir: &Path,
    force: bool,
) -> Option<std::result::Result<(), libcontainer::error::LibcontainerError>> {
    let _pipe = SigpipeToEpipe::install();
    let deadline = Instant::now() + CGROUP_REMOVE_PATIENCE;
    loop {
        let mut c = Container::load(dir.to_path_buf()).ok()?;
        match c.delete(force) {
            Err(libcontainer::error::LibcontainerError::CgroupManager(_))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return Some(r),
        }
    }
}

fn load(dir: &Path, id: &str) -> Result<Container> {
    Container::load(dir.to_path_buf()).map_err(core_err("load", id))
}

/// `Container::start`, with the poststart hooks run by us afterwards: each one
/// runs even when an earlier one failed, and a failure is a warning on stderr, not
/// a failed start (runtime spec: "If any poststart hook fails, the runtime MUST log
/// a warning, but the remaining hooks and lifecycle continue as if the hook had
/// succeeded"). libcontainer 0.7 stops at the first failing hook and fails `start`
/// with the process already running. (runc 1.1 fails `start` and destroys the
/// container instead, against the spec.)
pub fn start(dir: &Path, id: &str) -> Result<()> {
    let _pipe = SigpipeToEpipe::install();
    let mut c = load(dir, id)?;
    let taken = take_hooks(dir, id, HookKind::Poststart)?;
    let r = c.start().map_err(core_err("start", id));
    // The record keeps every hook it had (whatever `start` did), as `create` wrote it.
    let restored = taken.as_ref().map_or(Ok(()), |t| t.restore());
    r?;
    if let Err(e) = restored {
        // Started all the same; the record only lacks hooks that never run again.
        warn(
            id,
            &format!("poststart hooks stay out of libcontainer's record: {e}"),
        );
    }
    if let Some(t) = &taken {
        // libcontainer runs poststart hooks in the container directory.
        for w in run_each(HookKind::Poststart, &t.hooks, &c.state, Some(dir)) {
            warn(id, &w);
        }
    }
    Ok(())
}

/// While alive, SIGPIPE runs a no-op handler, so a write to a closed pipe returns
/// EPIPE instead of killing stasis. libcontainer writes the container state to each
/// hook's stdin and relies on EPIPE when a hook exits without reading it; with
/// SIGPIPE at SIG_DFL (main.rs, for `stasis list | head`) such a hook killed stasis
/// in the middle of create/start/delete (exit 141, nothing on stderr, the container
/// and its cgroups left behind). A handler, not SIG_IGN: handlers are reset at
/// execve, so containers and hooks still start with the default disposition (Go's
/// runtime, hence runc, behaves the same way).
struct SigpipeToEpipe(Option<nix::sys::signal::SigAction>);

impl SigpipeToEpipe {
    fn install() -> Self {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
        extern "C" fn ignore(_: libc::c_int) {}
        let action = SigAction::new(
            SigHandler::Handler(ignore),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler does nothing, which is async-signal-safe.
        Self(unsafe { sigaction(nix::sys::signal::Signal::SIGPIPE, &action) }.ok())
    }
}

impl Drop for SigpipeToEpipe {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the disposition `install` replaced.
            let _ = unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGPIPE, old) };
        }
    }
}

pub fn kill(dir: &Path, id: &str, sig: i32, all: bool) -> Result<()> {
    let signal = Signal::try_from(sig).map_err(|_| RuntimeError::BadSignal(sig.to_string()))?;
    // libcontainer records the container as stopped after any signal; that record
    // is not ours: our state file and the live process decide the status.
    load(dir, id)?
        .kill(signal, all)
        .map_err(core_err("kill", id))
}

/// `Container::delete`, with the poststop hooks run by us once the container is
/// gone: each one runs even when an earlier one failed, and a failure is a warning
/// (runtime spec: "If any poststop hook fails, the runtime MUST log a warning, but
/// the remaining hooks and lifecycle continue"). libcontainer 0.7 stops at the
/// first failing hook before it removes the container directory, which made the
/// container undeletable: every `delete --force` ran the hook and failed again.
pub fn delete(dir: &Path, id: &str, force: bool) -> Result<()> {
    let taken = take_hooks(dir, id, HookKind::Poststop)?;
    let state = Container::load(dir.to_path_buf()).ok().map(|c| c.state);
    match delete_retrying_cgroup(dir, force) {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            // Not deleted: a later delete must still run the hooks.
            if let Some(t) = &taken {
                if dir.exists() {
                    let _ = t.restore();
                }
            }
            return Err(core_err("delete", id)(e));
        }
        // No libcontainer state: nothing was started, only the directory remains.
        None => return Ok(()),
    }
    if let (Some(t), Some(mut st)) = (taken, state) {
        st.status = libcontainer::container::ContainerStatus::Stopped;
        for w in run_each(HookKind::Poststop, &t.hooks, &st, None) {
            warn(id, &w);
        }
    }
    Ok(())
}

pub fn pause(dir: &Path, id: &str) -> Result<()> {
    load(dir, id)?.pause().map_err(core_err("pause", id))
}

pub fn resume(dir: &Path, id: &str) -> Result<()> {
    load(dir, id)?.resume().map_err(core_err("resume", id))
}

fn cgroup_manager(dir: &Path, id: &str) -> Result<AnyCgroupManager> {
    let c = load(dir, id)?;
    let cfg = c.spec().map_err(core_err("read config of", id))?;
    create_cgroup_manager(CgroupConfig {
        cgroup_path: cfg.cgroup_path,
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| RuntimeError::Core {
        op: "open cgroup of",
        id: id.to_string(),
        detail: chain(&e),
    })
}

pub fn pids(dir: &Path, id: &str) -> Result<Vec<i32>> {
    let m = cgroup_manager(dir, id)?;
    let mut pids: Vec<i32> = m
        .get_all_pids()
        .map_err(|e| RuntimeError::Core {
            op: "list processes of",
            id: id.to_string(),
            detail: chain(&e),
        })?
        .into_iter()
        .map(|p| p.as_raw())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// `exec`: the process is the container's own (config.json's `process`) with the
/// flags or the `--process` file laid over it (`exec.rs`), handed to libcontainer's
/// tenant builder as a process file, so user, groups, rlimits, capabilities,
/// no_new_privs and labels are the container's unless overridden. The container's
/// seccomp filter is loaded by `ExecUnderSeccomp` (libcontainer 0.7's tenant
/// builder drops linux.seccomp; youki's HEAD of 2026-08 still does).
///
/// Returns the process's pid and, for a foreground process with a terminal and no
/// `--console-socket`, the pty master to relay.
pub fn exec(root: &Path, opts: &ExecOptions) -> Result<(i32, Option<OwnedFd>)> {
    let id = opts.id.as_str();
    super::exec::check_request(opts)?;
    let config = load(&root.join(id), id)?.bundle().join("config.json");
    let prepared = super::exec::prepare(&config, opts)?;
    let console =
        tty::ConsolePlan::new(prepared.terminal, opts.detach, opts.console_socket.as_ref())?;
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_executor(ExecUnderSeccomp {
            filter: prepared.filter,
            winsize: console.own.as_ref().and_then(|_| tty::caller_winsize()),
        })
        .with_root_path(root)
        .map_err(core_err("exec in", id))?
        .with_console_socket(console.socket.as_ref())
        .with_pid_file(opts.pid_file.as_ref())
        .map_err(core_err("exec in", id))?
        .with_preserved_fds(opts.preserve_fds)
        .validate_id()
        .map_err(core_err("exec in", id))?
        .as_tenant()
        .with_detach(console.libcontainer_detach)
        .with_process(Some(prepared.file.path()))
        .build()
        .map_err(|e| match build_err("exec in", id)(e) {
            RuntimeError::Core { op, id, detail }
                if detail.contains("failed to launch init process") =>
            {
                match pids_limit_reached(&root.join(&id), &id) {
                    Some(cause) => RuntimeError::Launch { op, id, cause },
                    None => RuntimeError::Core { op, id, detail },
                }
            }
            e => e,
        })?;
    let console = match console.own.as_ref().map(tty::receive_console).transpose() {
        Ok(c) => c,
        Err(e) => {
            // Nobody could ever talk to it: do not leave it running.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(e);
        }
    };
    Ok((pid.as_raw(), console))
}

/// libcontainer's default executor (execvp of process.args), preceded by loading
/// the container's seccomp filter. It runs in the exec'd process as the last step
/// before execve: after namespaces, cgroup, user, capabilities and no_new_privs are
/// set, where runc loads the filter too when no_new_privs is set (without it, see
/// `exec::keep_cap_to_load_filter`).
///
/// With a terminal of stasis's own it first gives the pty (its stdin by then) the
/// caller's window size: the process starts running before stasis has received
/// the master, and must not see a 0x0 terminal.
#[derive(Clone)]
struct ExecUnderSeccomp {
    filter: Option<oci_spec::runtime::LinuxSeccomp>,
    winsize: Option<libc::winsize>,
}

impl Executor for ExecUnderSeccomp {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        if let Some(ws) = &self.winsize {
            // Best effort: a wrong size is fixed by the next SIGWINCH.
            let _ = tty::set_winsize(0, ws);
        }
        if let Some(filter) = &self.filter {
            // Notify filters were refused before (exec::exec_seccomp), so there is
            // no listener fd to hand on.
            initialize_seccomp(filter).map_err(|e| {
                ExecutorError::Other(format!(
                    "load the container's seccomp filter: {}",
                    chain(&e)
                ))
            })?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }

    fn setup_envs(
        &self,
        envs: HashMap<String, String>,
    ) -> std::result::Result<(), ExecutorSetEnvsError> {
        DefaultExecutor {}.setup_envs(envs)
    }
}

/// Builds the resources to apply from runc's `--resources` JSON (may be empty)
/// and the individual flags, which win.
pub fn merge_resources(json: &[u8], o: &ResourceOverrides) -> Result<LinuxResources> {
    let mut r: LinuxResources = if json.iter().all(|b| b.is_ascii_whitespace()) {
        LinuxResources::default()
    } else {
        serde_json::from_slice(json).map_err(|e| {
            RuntimeError::Invalid(format!(
                "--resources: not a valid OCI LinuxResources JSON: {e}"
            ))
        })?
    };
    let inv = |e: oci_spec::OciSpecError| RuntimeError::Invalid(format!("update: {e}"));
    if o.memory.is_some() || o.memory_swap.is_some() || o.memory_reservation.is_some() {
        let cur = (*r.memory()).unwrap_or_default();
        let mut b = LinuxMemoryBuilder::default();
        if let Some(v) = o.memory.or(cur.limit()) {
            b = b.limit(v);
        }
        if let Some(v) = o.memory_swap.or(cur.swap()) {
            b = b.swap(v);
        }
        if let Some(v) = o.memory_reservation.or(cur.reservation()) {
            b = b.reservation(v);
        }
        r.set_memory(Some(b.build().map_err(inv)?));
    }
    if let Some(v) = o.pids_limit {
        r.set_pids(Some(
            LinuxPidsBuilder::default().limit(v).build().map_err(inv)?,
        ));
    }
    if o.cpu_shares.is_some()
        || o.cpu_quota.is_some()
        || o.cpu_period.is_some()
        || o.cpuset_cpus.is_some()
        || o.cpuset_mems.is_some()
    {
        let cur = r.cpu().clone().unwrap_or_default();
        let mut b = LinuxCpuBuilder::default();
        if let Some(v) = o.cpu_shares.or(cur.shares()) {
            b = b.shares(v);
        }
        if let Some(v) = o.cpu_quota.or(cur.quota()) {
            b = b.quota(v);
        }
        if let Some(v) = o.cpu_period.or(cur.period()) {
            b = b.period(v);
        }
        if let Some(v) = o.cpuset_cpus.clone().or(cur.cpus().clone()) {
            b = b.cpus(v);
        }
        if let Some(v) = o.cpuset_mems.clone().or(cur.mems().clone()) {
            b = b.mems(v);
        }
        r.set_cpu(Some(b.build().map_err(inv)?));
    }
    if let Some(w) = o.blkio_weight {
        r.set_block_io(Some(
            LinuxBlockIoBuilder::default()
                .weight(w)
                .build()
                .map_err(inv)?,
        ));
    }
    Ok(r)
}

pub fn update(dir: &Path, id: &str, json: &[u8], o: &ResourceOverrides) -> Result<()> {
    let resources = merge_resources(json, o)?;
    let m = cgroup_manager(dir, id)?;
    let cgroup_path = load(dir, id)?
        .spec()
        .map(|c| c.cgroup_path)
        .unwrap_or_default();
    m.apply(&ControllerOpt {
        resources: &resources,
        // libcgroups rewrites memory.oom_control with any memory limit: keep it.
        disable_oom_killer: cgroup::disabled_now(&cgroup_path),
        oom_score_adj: None,
        freezer_state: None,
    })
    .map_err(|e| RuntimeError::Core {
        op: "update",
        id: id.to_string(),
        detail: chain(&e),
    })
}

/// Cgroup statistics in the shape of runc's `events` data.
pub fn stats(dir: &Path, id: &str) -> Result<serde_json::Value> {
    let m = cgroup_manager(dir, id)?;
    let s = m.stats().map_err(|e| RuntimeError::Core {
        op: "read stats of",
        id: id.to_string(),
        detail: chain(&e),
    })?;
    let mem = |d: &libcgroups::stats::MemoryData| serde_json::json!({"limit": d.limit, "usage": d.usage, "max": d.max_usage, "failcnt": d.fail_count});
    Ok(serde_json::json!({
        "cpu": {
            "usage": {
                "total": s.cpu.usage.usage_total,
                "percpu": s.cpu.usage.per_core_usage_total,
                "kernel": s.cpu.usage.usage_kernel,
                "user": s.cpu.usage.usage_user,
            },
            "throttling": {
                "periods": s.cpu.throttling.periods,
                "throttledPeriods": s.cpu.throttling.throttled_periods,
                "throttledTime": s.cpu.throttling.throttled_time,
            },
        },
        "memory": {
            "cache": s.memory.cache,
            "usage": mem(&s.memory.memory),
            "swap": mem(&s.memory.memswap),
            "kernel": mem(&s.memory.kernel),
            "kernelTCP": mem(&s.memory.kernel_tcp),
            "raw": s.memory.stats,
        },
        "pids": {"current": s.pids.current, "limit": s.pids.limit},
        "blkio": {},
        "hugetlb": {},
    }))
}

/// Registers a container that did not come from `create` (a CRIU restore) with
/// libcontainer, so that kill, pause, exec and delete work on it: writes its
/// config (hooks, cgroup path) and a state record in `dir`. Returns the cgroup path.
pub fn register(
    dir: &Path,
    id: &str,
    spec: &Spec,
    bundle: &Path,
    pid: Option<i32>,
) -> Result<PathBuf> {
    use libcontainer::config::YoukiConfig;
    use libcontainer::container::{ContainerStatus, State};
    let cfg = YoukiConfig::from_spec(spec, id).map_err(|e| RuntimeError::Core {
        op: "register",
        id: id.to_string(),
        detail: chain(&e),
    })?;
    cfg.save(dir).map_err(|e| RuntimeError::Core {
        op: "register",
        id: id.to_string(),
        detail: chain(&e),
    })?;
    let status = if pid.is_some() {
        ContainerStatus::Running
    } else {
        ContainerStatus::Creating
    };
    let mut st = State::new(id, status, pid, bundle.to_path_buf());
    st.annotations = spec.annotations().clone();
    st.created = Some(chrono::Utc::now());
    st.creator = Some(nix::unistd::geteuid().as_raw());
    st.save(dir).map_err(|e| RuntimeError::Core {
        op: "register",
        id: id.to_string(),
        detail: chain(&e),
    })?;
    Ok(cfg.cgroup_path)
}

fn chain_dyn(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Freezes (`true`) or thaws the container's cgroup directly, without changing any
/// recorded status (used around a checkpoint).
pub fn set_frozen(dir: &Path, id: &str, frozen: bool) -> Result<()> {
    use libcgroups::common::FreezerState;
    let m = cgroup_manager(dir, id)?;
    let st = if frozen {
        FreezerState::Frozen
    } else {
        FreezerState::Thawed
    };
    m.freeze(st).map_err(|e| RuntimeError::Core {
        op: if frozen { "freeze" } else { "thaw" },
        id: id.to_string(),
        detail: chain_dyn(&e),
    })
}
