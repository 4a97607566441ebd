//! The OCI runtime: containers by id under `--root`, their state files and state
//! machine, and every runc verb (create, start, run, state, list, kill, delete, ps,
//! exec, pause, resume, update, events, spec, features).
//!
//! The mechanics of creating processes inside namespaces (pivot_root, mounts,
//! cgroups, seccomp, hooks, capabilities) come from libcontainer, youki's library,
//! and are used only in `core`; nothing outside this module names a libcontainer
//! type, so the core can be replaced later.

pub mod checkpoint;
mod core;
mod exec;
mod foreground;
pub mod info;
mod launch;
pub mod netns;
mod recovery;
pub mod state;
pub(crate) mod stdio;
mod tty;

use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;

pub use launch::LaunchFailure;
pub use state::{validate_id, ContainerState, Op, Status};

use state::ContainerLock;

/// Test hook for the fault-matrix tests: `STASIS_FAULT=NAME:kill|NAME:stop[,...]`
/// SIGKILLs or SIGSTOPs the process at fault point NAME (see `store::fault_point`,
/// which the store keeps for itself because it imports nothing else of ours).
/// Unset, as outside tests: a no-op.
pub fn fault_point(name: &str) {
    use nix::sys::signal::{raise, Signal};
    let spec = std::env::var("STASIS_FAULT").unwrap_or_default();
    for (point, action) in spec.split(',').filter_map(|i| i.split_once(':')) {
        let sig = match action {
            "kill" => Signal::SIGKILL,
            "stop" => Signal::SIGSTOP,
            _ => continue,
        };
        if point == name {
            let _ = raise(sig);
        }
    }
}

/// Creates `dir` and its missing parents as 0700 at mkdir(2) time (whatever the
/// umask): `--root` and the directories of restored copies hold root filesystems
/// (setuid binaries, device nodes) that no other user may reach.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `dir` as 0700; fails when it exists (the directory is ours only if we
/// made it).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Takes group and other permissions off an existing directory (one made 0755
/// by an older stasis); one stat when it is already private. Another user's
/// directory is left alone.
pub fn tighten_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = fs::symlink_metadata(dir)?;
    let ours = m.uid() == nix::unistd::geteuid().as_raw();
    if ours && m.is_dir() && m.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// How long a command waits for another command on the same container.
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: String },
    #[error("container {id:?} does not exist (looked in {root})")]
    NotFound { id: String, root: PathBuf },
    #[error("container {id:?} already exists in {root}: delete it first or pick another id")]
    Exists { id: String, root: PathBuf },
    #[error("cannot {op} container {id:?}: it is {status}{hint}")]
    WrongState {
        id: String,
        op: &'static str,
        status: Status,
        hint: &'static str,
    },
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}; remove the container with `delete --force`")]
    StateCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("container {id:?} is locked by another stasis command (waited {waited:?} on {path})")]
    LockTimeout {
        id: String,
        path: PathBuf,
        waited: Duration,
    },
    #[error("container {id:?}: the CRIU process (pid {criu_pid}) of an interrupted checkpoint still runs after {waited:?}; wait until it exits (or kill it) and retry")]
    CheckpointerBusy {
        id: String,
        criu_pid: i32,
        waited: Duration,
    },
    #[error("unknown signal {0:?}: use a name like TERM, SIGKILL or a number 1-64")]
    BadSignal(String),
    #[error("{op} container {id:?}: {detail}")]
    Core {
        op: &'static str,
        id: String,
        detail: String,
    },
    #[error("{op} container {id:?}: {cause}")]
    Launch {
        op: &'static str,
        id: String,
        cause: LaunchFailure,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("--process {path}: {reason}")]
    ProcessFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Criu(crate::criu::CriuError),
    #[error("--systemd-cgroup is not supported yet: stasis manages cgroupfs paths directly; drop the flag")]
    SystemdUnsupported,
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    /// The exit code of a failed command: 127 when the command to run does not
    /// exist, 126 when it cannot be executed (as podman and Docker exit), else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            RuntimeError::Launch { cause, .. } => cause.exit_code(),
            _ => 1,
        }
    }
}

/// Options for `create` and `run`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
    pub preserve_fds: i32,
    /// `run --keep`: do not delete the container after a foreground run exits.
    pub keep: bool,
}

/// Options for `exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub id: String,
    pub process: Option<PathBuf>,
    pub args: Vec<String>,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub tty: bool,
    pub console_socket: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<String>,
    pub user: Option<(u32, Option<u32>)>,
    pub additional_gids: Vec<u32>,
    pub caps: Vec<String>,
    pub no_new_privs: bool,
    pub preserve_fds: i32,
}

/// runc's `state` JSON.
#[derive(Serialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<HashMap<String, String>>,
    pub owner: String,
}

/// The runtime rooted at `--root`.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    criu: PathBuf,
}

impl Runtime {
    pub fn new(root: impl Into<PathBuf>, systemd_cgroup: bool) -> Result<Self> {
        if systemd_cgroup {
            return Err(RuntimeError::SystemdUnsupported);
        }
        let root = root.into();
        // Parents as the system makes them, the root itself private (and made
        // private if an older stasis left it 0755).
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|source| RuntimeError::Io {
                op: "create parent of state root",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        match create_private_dir(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::Io {
                    op: "create state root",
                    path: root.clone(),
                    source: e,
                })
            }
            _ => {}
        }
        tighten_dir(&root).map_err(|source| RuntimeError::Io {
            op: "make private (chmod 0700) state root",
            path: root.clone(),
            source,
        })?;
        Ok(Self {
            root,
            criu: PathBuf::from("criu"),
        })
    }

    /// Uses `bin` as the CRIU binary (`--criu`).
    pub fn with_criu(mut self, bin: impl Into<PathBuf>) -> Self {
        self.criu = bin.into();
        self
    }

    /// Version of the configured CRIU binary, e.g. "4.2.1".
    pub fn criu_version(&self) -> Result<String> {
        Ok(crate::criu::Criu::new(&self.criu).version()?.to_string())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn lock(&self, id: &str) -> Result<ContainerLock> {
        validate_id(id)?;
        ContainerLock::acquire(&self.root, id, LOCK_TIMEOUT)
    }

    /// The lock of container `id`, for a restore that builds the container's
    /// private filesystem before `restore_locked`: while it is held no other
    /// command creates, restores or removes that id.
    pub fn lock_container(&self, id: &str) -> Result<ContainerLock> {
        self.lock(id)
    }

    /// Loads the state of an existing container as it is on disk.
    fn load_raw(&self, id: &str) -> Result<ContainerState> {
        validate_id(id)?;
        let dir = self.dir(id);
        if !ContainerState::path(&dir).exists() {
            return Err(RuntimeError::NotFound {
                id: id.to_string(),
                root: self.root.clone(),
            });
        }
        ContainerState::load(&dir)
    }

    /// Checks `op` against the state machine; returns the current live status.
    fn check(&self, st: &ContainerState, op: Op) -> Result<Status> {
        let status = st.live_status();
        if state::transition(status, op).is_none() {
            let hint = match (op, status) {
                (_, Status::Restoring) => {
                    ": its restore did not finish; remove what it left with `delete --force`"
                }
                (Op::Delete, _) => ": stop it first or use --force",
                (Op::Start, Status::Running | Status::Paused) => ": it was already started",
                (Op::Start, Status::Stopped) => ": delete it and create it again",
                (Op::Exec, Status::Paused) => ": resume it first",
                (_, Status::Stopped) => ": it has exited",
                _ => "",
            };
            return Err(RuntimeError::WrongState {
                id: st.id.clone(),
                op: op.as_str(),
                status,
                hint,
            });
        }
        Ok(status)
    }

    /// `create`: sets up the container and leaves it waiting for `start`.
    pub fn create(&self, opts: &CreateOptions) -> Result<ContainerState> {
        let _lock = self.lock(&opts.id)?;
        self.create_locked(opts, true).map(|(st, _)| st)
    }

    /// Creates the container; returns its state and, for a foreground container
    /// with a terminal and no `--console-socket`, the pty master to relay.
    fn create_locked(
        &self,
        opts: &CreateOptions,
        detach: bool,
    ) -> Result<(ContainerState, Option<OwnedFd>)> {
        let dir = self.dir(&opts.id);
        if dir.exists() {
            return Err(RuntimeError::Exists {
                id: opts.id.clone(),
                root: self.root.clone(),
            });
        }
        let bundle = core::check_bundle(&opts.bundle)?;
        // libcontainer 0.7 hands /dev/null stdio to the container read-only.
        let _stdio =
            stdio::devnull_outputs_to_pipe(!detach).map_err(|source| RuntimeError::Io {
                op: "replace /dev/null stdio with a pipe for",
                path: opts.bundle.clone(),
                source,
            })?;
        let created = match core::create(&self.root, opts, &bundle, detach) {
            Ok(c) => c,
            Err(e) => {
                core::cleanup_failed(&self.root, &opts.id);
                return Err(e);
            }
        };
        // Like runc, a new network namespace gets its loopback up.
        if bundle.own_netns {
            if let Err(source) = netns::loopback_up(created.pid) {
                core::cleanup_failed(&self.root, &opts.id);
                return Err(RuntimeError::Io {
                    op: "bring loopback up in the network namespace of",
                    path: PathBuf::from(format!("/proc/{}/ns/net", created.pid)),
                    source,
                });
            }
        }
        let st = ContainerState {
            id: opts.id.clone(),
            status: Status::Created,
            pid: created.pid,
            pid_start_time: state::process_start_time(created.pid).unwrap_or(0),
            bundle: bundle.path,
            rootfs: bundle.rootfs,
            created: Utc::now(),
            owner: owner_name(),
            annotations: bundle.annotations,
            cgroup_path: created.cgroup_path,
            owned_dir: None,
            checkpointer: None,
            restorer: None,
        };
        if let Err(e) = st.save(&dir) {
            core::cleanup_failed(&self.root, &opts.id);
            return Err(e);
        }
        Ok((st, created.console))
    }

    /// `start`: runs the user process of a created container.
    pub fn start(&self, id: &str) -> Result<()> {
        let lock = self.lock(id)?;
        let (mut st, _) = self.load_locked(id, &lock)?;
        self.check(&st, Op::Start)?;
        core::start(&self.dir(id), id)?;
        st.status = Status::Running;
        st.save(&self.dir(id))
    }

    /// `run`: create + start. Detached it returns at once; otherwise it waits for the
    /// container, forwarding signals, deletes it and returns its exit code.
    pub fn run(&self, opts: &CreateOptions, detach: bool) -> Result<i32> {
        let early = (!detach).then(foreground::EarlySignals::catch);
        let (pid, console) = {
            let _lock = self.lock(&opts.id)?;
            let (mut st, console) = self.create_locked(opts, detach)?;
            if let Err(e) = core::start(&self.dir(&opts.id), &opts.id) {
                core::cleanup_failed(&self.root, &opts.id);
                return Err(e);
            }
            st.status = Status::Running;
            st.save(&self.dir(&opts.id))?;
            (st.pid, console)
        };
        let Some(early) = early else {
            return Ok(0);
        };
        let code = early
            .wait_relaying(pid, console)
            .map_err(|source| RuntimeError::Io {
                op: "wait for container process",
                path: PathBuf::from(format!("/proc/{pid}")),
                source,
            })?;
        if opts.keep {
            return Ok(code);
        }
        // A cleanup failure must not hide the workload's exit code (runc logs it too).
        if let Err(e) = self.delete(&opts.id, true) {
            eprintln!("stasis: warning: {e}");
        }
        Ok(code)
    }

    /// Waits for a container whose init is our child (run or restore in this
    /// process), forwarding signals; then deletes it and returns its exit code.
    pub fn wait(&self, id: &str) -> Result<i32> {
        let pid = self.load(id)?.pid;
        let code = foreground::wait_forwarding_signals(pid).map_err(|source| RuntimeError::Io {
            op: "wait for container process",
            path: PathBuf::from(format!("/proc/{pid}")),
            source,
        })?;
        if let Err(e) = self.delete(id, true) {
            eprintln!("stasis: warning: {e}");
        }
        Ok(code)
    }

    pub fn oci_state(&self, st: &ContainerState) -> OciState {
        let status = st.live_status();
        OciState {
            oci_version: info::OCI_VERSION.to_string(),
            id: st.id.clone(),
            pid: if status == Status::Stopped { 0 } else { st.pid },
            status: status.as_str().to_string(),
            bundle: st.bundle.clone(),
            rootfs: st.rootfs.clone(),
            created: st
                .created
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            annotations: st.annotations.clone(),
            owner: st.owner.clone(),
        }
    }

    pub fn state(&self, id: &str) -> Result<OciState> {
        let st = self.load(id)?;
        Ok(self.oci_state(&st))
    }

    /// Every container under `--root`, sorted by id. Unreadable entries are skipped.
    pub fn list(&self) -> Result<Vec<OciState>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(|source| RuntimeError::Io {
            op: "list state root",
            path: self.root.clone(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_id(&name).is_err() || name.starts_with('.') {
                continue;
            }
            if let Ok(st) = self.load(&name) {
                out.push(self.oci_state(&st));
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        self.sweep_orphan_copies();
        Ok(out)
    }

    /// Removes the private filesystems (`--root/.copies/ID`, overlay mounted or
    /// not) of restores killed before they recorded the container: no state
    /// under that id and nobody holding its lock (a running restore holds it
    /// while it builds the filesystem). Without this, such a mount was shown by no
    /// command. Best effort: what cannot be removed now is tried again next time.
    fn sweep_orphan_copies(&self) {
        let copies = self.root.join(".copies");
        for e in fs::read_dir(&copies).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if validate_id(&id).is_err() || self.dir(&id).exists() {
                continue;
            }
            let Ok(lock) = ContainerLock::acquire(&self.root, &id, Duration::ZERO) else {
                continue;
            };
            if !self.dir(&id).exists() {
                let copy = e.path();
                unmount_under(&copy);
                let _ = fs::remove_dir_all(&copy);
            }
            lock.remove_file();
        }
    }

    pub fn kill(&self, id: &str, signal: &str, all: bool) -> Result<()> {
        let sig = parse_signal(signal)?;
        let lock = self.lock(id)?;
        let (st, _) = self.load_locked(id, &lock)?;
        let status = st.live_status();
        if status == Status::Stopped && all {
            // runc allows `kill --all` on a stopped container to reap leftovers.
            return core::kill(&self.dir(id), id, sig, true);
        }
        self.check(&st, Op::Kill)?;
        core::kill(&self.dir(id), id, sig, all)
    }

    /// `delete`: removes a stopped (or created) container, or any with `force`.
    /// A missing container with `force` is not an error (podman relies on it).
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let lock = self.lock(id)?;
        let dir = self.dir(id);
        let st = match self.load_locked(id, &lock) {
            Ok((st, _)) => Some(st),
            Err(RuntimeError::NotFound { .. }) if force => {
                // Maybe a half-created (or half-restored) container without our
                // state: clean its directory and its private filesystem.
                if dir.exists() {
                    core::cleanup_failed(&self.root, id);
                }
                let copy = self.root.join(".copies").join(id);
                if copy.exists() {
                    unmount_under(&copy);
                    let _ = fs::remove_dir_all(&copy);
                }
                lock.remove_file();
                return Ok(());
            }
            Err(RuntimeError::StateCorrupt { .. }) if force => None,
            // A failed recovery must not keep `delete --force` from removing it.
            Err(RuntimeError::CheckpointerBusy { .. } | RuntimeError::Core { .. }) if force => {
                Some(self.load_raw(id)?)
            }
            Err(e) => return Err(e),
        };
        if let Some(st) = &st {
            self.check(st, if force { Op::ForceDelete } else { Op::Delete })?;
        }
        match &st {
            // Whatever CRIU restored runs in the container's cgroup (CRIU itself
            // was moved there), unknown to libcontainer: kill it all.
            Some(st) if st.status == Status::Restoring => {
                core::cgroup_destroy(&st.cgroup_path, id)?;
            }
            _ => core::delete(&dir, id, force)?,
        }
        unmount_under(&dir);
        if let Some(owned) = st.as_ref().and_then(|s| s.owned_dir.as_ref()) {
            unmount_under(owned);
            if owned.exists() {
                fs::remove_dir_all(owned).map_err(|source| RuntimeError::Io {
                    op: "remove the container's private filesystem",
                    path: owned.clone(),
                    source,
                })?;
            }
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|source| RuntimeError::Io {
                op: "remove container directory",
                path: dir.clone(),
                source,
            })?;
        }
        lock.remove_file();
        Ok(())
    }

    pub fn pause(&self, id: &str) -> Result<()> {
        let lock = self.lock(id)?;
        let (mut st, _) = self.load_locked(id, &lock)?;
        self.check(&st, Op::Pause)?;
        core::pause(&self.dir(id), id)?;
        st.status = Status::Paused;
        st.save(&self.dir(id))
    }

    /// `resume`: thaws a paused container, or one a killed checkpoint left frozen.
    pub fn resume(&self, id: &str) -> Result<()> {
        let lock = self.lock(id)?;
        let (mut st, recovered) = self.load_locked(id, &lock)?;
        if recovered && st.live_status() == Status::Running {
            return Ok(());
        }
        self.check(&st, Op::Resume)?;
        core::resume(&self.dir(id), id)?;
        st.status = Status::Running;
        st.save(&self.dir(id))
    }

    /// Pids of every process in the container's cgroup.
    pub fn pids(&self, id: &str) -> Result<Vec<i32>> {
        let st = self.load(id)?;
        if st.live_status() == Status::Stopped {
            return Err(RuntimeError::WrongState {
                id: id.to_string(),
                op: "ps",
                status: Status::Stopped,
                hint: ": it has exited",
            });
        }
        core::pids(&self.dir(id), id)
    }

    /// `exec`: starts a new process in a running container. Returns its exit code
    /// when not detached.
    pub fn exec(&self, opts: &ExecOptions) -> Result<i32> {
        let early = (!opts.detach).then(foreground::EarlySignals::catch);
        let (pid, console) = {
            let lock = self.lock(&opts.id)?;
            let (st, _) = self.load_locked(&opts.id, &lock)?;
            self.check(&st, Op::Exec)?;
            core::exec(&self.root, opts)?
        };
        let Some(early) = early else {
            return Ok(0);
        };
        early
            .wait_relaying(pid, console)
            .map_err(|source| RuntimeError::Io {
                op: "wait for exec'd process",
                path: PathBuf::from(format!("/proc/{pid}")),
                source,
            })
    }

    /// `update`: applies new cgroup resources to a live container.
    pub fn update(
        &self,
        id: &str,
        resources_json: &[u8],
        overrides: &ResourceOverrides,
    ) -> Result<()> {
        let lock = self.lock(id)?;
        let (st, _) = self.load_locked(id, &lock)?;
        self.check(&st, Op::Update)?;
        core::update(&self.dir(id), id, resources_json, overrides)
    }

    /// `events`: one stats record (`stats_only`) or a record every `interval` until
    /// the container stops. Each record is handed to `emit` as a JSON line.
    pub fn events(
        &self,
        id: &str,
        interval: Duration,
        stats_only: bool,
        mut emit: impl FnMut(&serde_json::Value),
    ) -> Result<()> {
        loop {
            let st = self.load(id)?;
            let status = st.live_status();
            if status == Status::Stopped {
                if stats_only {
                    return Err(RuntimeError::WrongState {
                        id: id.to_string(),
                        op: "get stats of",
                        status,
                        hint: ": it has exited",
                    });
                }
                return Ok(());
            }
            let data = core::stats(&self.dir(id), id)?;
            emit(&serde_json::json!({"type": "stats", "id": id, "data": data}));
            if stats_only {
                return Ok(());
            }
            std::thread::sleep(interval);
        }
    }
}

/// runc's individual `update` flags; each, when set, overrides the resources file.
#[derive(Debug, Clone, Default)]
pub struct ResourceOverrides {
    pub memory: Option<i64>,
    pub memory_swap: Option<i64>,
    pub memory_reservation: Option<i64>,
    pub pids_limit: Option<i64>,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub blkio_weight: Option<u16>,
}

/// Unmounts every mount at or below `dir` (deepest first): the overlay and
/// volumes of a container restored onto a private filesystem live there.
pub fn unmount_under(dir: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Parses a signal by name (`TERM`, `SIGTERM`, case-insensitive) or number.
pub fn parse_signal(s: &str) -> Result<i32> {
    let bad = || RuntimeError::BadSignal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    if let Some(rt) = name.strip_prefix("SIGRTMIN") {
        let off: i32 = if rt.is_empty() {
            0
        } else {
            rt.trim_start_matches('+').parse().map_err(|_| bad())?
        };
        let n = libc::SIGRTMIN() + off;
        return if n <= libc::SIGRTMAX() {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    name.parse::<nix::sys::signal::Signal>()
        .map(|s| s as i32)
        .map_err(|_| bad())
}

pub(crate) fn owner_name() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("sigkill").unwrap(), 9);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), 10);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("65").is_err());
        assert_eq!(
            parse_signal("FOO").unwrap_err().to_string(),
            "unknown signal \"FOO\": use a name like TERM, SIGKILL or a number 1-64"
        );
    }

    #[test]
    fn wrong_state_message() {
        let e = RuntimeError::WrongState {
            id: "c1".into(),
            op: "start",
            status: Status::Running,
            hint: ": it was already started",
        };
        assert_eq!(
            e.to_string(),
            "cannot start container \"c1\": it is running: it was already started"
        );
    }
}
