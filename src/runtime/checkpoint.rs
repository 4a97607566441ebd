//! Checkpoint and restore of containers through our CRIU client: what to tell CRIU
//! about a container (root, external mounts and namespaces, stdio, cgroups), the
//! cgroup freeze around the dump, and turning a restored process tree back into a
//! first-class container under a (possibly new) id. Mirrors runc's
//! `criuApply`/`Restore`, with the cgroup freezer used before the dump (as
//! containerd does) and loopback brought up in a restored network namespace.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use chrono::Utc;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use protobuf::EnumOrUnknown;

use super::state::{self, ContainerState, Op, Status, Worker};
use super::{core, foreground, netns, Result, Runtime, RuntimeError};
use crate::criu::{self, rpc, Call, Criu, CriuError, Notify};

/// Stdio descriptors of the init process at dump time, as runc records them.
pub const DESCRIPTORS_FILE: &str = "descriptors.json";
const DUMP_LOG: &str = "dump.log";
const RESTORE_LOG: &str = "restore.log";
/// Key for an external network namespace given by path (runc uses the same).
const EXT_NETNS_KEY: &str = "extRootNetNS";

impl From<CriuError> for RuntimeError {
    fn from(e: CriuError) -> Self {
        RuntimeError::Criu(e)
    }
}

/// `--manage-cgroups-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupsMode {
    #[default]
    Soft,
    Full,
    Strict,
    Ignore,
}

impl CgroupsMode {
    fn to_rpc(self) -> rpc::Criu_cg_mode {
        match self {
            CgroupsMode::Soft => rpc::Criu_cg_mode::SOFT,
            CgroupsMode::Full => rpc::Criu_cg_mode::FULL,
            CgroupsMode::Strict => rpc::Criu_cg_mode::STRICT,
            CgroupsMode::Ignore => rpc::Criu_cg_mode::IGNORE,
        }
    }
}

/// Options shared by checkpoint and restore.
#[derive(Debug, Clone, Default)]
pub struct CriuFlags {
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub manage_cgroups_mode: CgroupsMode,
    /// Namespaces to leave empty (only "network" is supported, as in runc).
    pub empty_ns: Vec<String>,
    pub auto_dedup: bool,
    pub lazy_pages: bool,
}

impl CriuFlags {
    /// The flags CRIU takes the same way for a dump and a restore.
    fn apply(&self, opts: &mut criu::Opts) {
        opts.shell_job = Some(self.shell_job);
        opts.tcp_established = Some(self.tcp_established);
        opts.ext_unix_sk = Some(self.ext_unix_sk);
        opts.file_locks = Some(self.file_locks);
        opts.auto_dedup = Some(self.auto_dedup);
        opts.lazy_pages = Some(self.lazy_pages);
    }
}

#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    pub id: String,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub parent_path: Option<PathBuf>,
    pub leave_running: bool,
    pub pre_dump: bool,
    pub page_server: Option<String>,
    pub status_fd: Option<RawFd>,
    pub link_remap: bool,
    pub tcp_skip_in_flight: bool,
    pub flags: CriuFlags,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub id: String,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub bundle: PathBuf,
    pub detach: bool,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub no_subreaper: bool,
    pub no_pivot: bool,
    pub lsm_profile: Option<String>,
    pub lsm_mount_context: Option<String>,
    pub flags: CriuFlags,
    /// A directory the restored container owns (its overlay, volumes, bundle):
    /// `delete` unmounts and removes it.
    pub owned_dir: Option<PathBuf>,
    /// Give the restored tree fresh pipes in place of the stdio pipes it had at
    /// dump time (stdin at EOF, output drained by a detached `stasis __drain`),
    /// instead of our own stdio: for a server restoring copies for others.
    pub null_stdio: bool,
    /// Restore into this existing network namespace (CRIU's `--join-ns net:PATH`)
    /// instead of the one recorded in the image.
    pub join_netns: Option<PathBuf>,
    /// With `flags.lazy_pages`: start the `criu lazy-pages` daemon for the image
    /// ourselves (runc leaves that to the caller), in the container's CRIU work
    /// directory; it serves the pages while the restored tasks run and exits
    /// when all are in.
    pub lazy_daemon: bool,
}

/// CRIU's statistics of one dump or restore (`stats-dump` / `stats-restore`).
#[derive(Debug, Clone, Default)]
pub struct CriuStats {
    pub entries: Vec<(&'static str, u64)>,
}

impl CriuStats {
    pub fn get(&self, name: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

fn empty_ns_flags(names: &[String]) -> Result<u32> {
    let mut f = 0u32;
    for n in names {
        match n.as_str() {
            "network" | "net" => f |= libc::CLONE_NEWNET as u32,
            other => {
                return Err(RuntimeError::Invalid(format!(
                    "--empty-ns {other:?}: only \"network\" is supported"
                )))
            }
        }
    }
    Ok(f)
}

fn load_spec(bundle: &Path) -> Result<Spec> {
    let p = bundle.join("config.json");
    let bytes = fs::read(&p).map_err(|source| RuntimeError::Io {
        op: "read",
        path: p.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Bundle {
        path: p,
        reason: format!("config.json is not a valid OCI runtime spec: {e}"),
    })
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn has_userns(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User))
}

fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == LinuxNamespaceType::Network)
                .and_then(|n| n.path().clone())
        })
}

fn has_own_netns(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == LinuxNamespaceType::Network && n.path().is_none())
        })
}

/// Mounts CRIU cannot see the source of, as (key, value) pairs of `ext_mnt`.
/// On dump the key is the mount point and the value the name recorded in the
/// image; on restore the key is that name and the value the host path to bind.
fn external_mounts(
    spec: &Spec,
    bundle: &Path,
    restore: bool,
    rootfs_pid: Option<i32>,
    cgroup_path: &Path,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in spec.mounts().as_deref().unwrap_or_default() {
        if m.typ().as_deref() == Some("cgroup") {
            out.extend(cgroup_v1_mounts(
                m.destination(),
                restore,
                rootfs_pid,
                cgroup_path,
            ));
            continue;
        }
        if !is_bind(m) {
            continue;
        }
        let dest = m.destination().display().to_string();
        if restore {
            let src = m.source().clone().unwrap_or_default();
            let src = if src.is_absolute() {
                src
            } else {
                bundle.join(src)
            };
            out.push((dest, src.display().to_string()));
        } else {
            out.push((dest.clone(), dest));
        }
    }
    // Masked files are /dev/null bind-mounted from the host.
    let masked = spec
        .linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default();
    for p in masked {
        let is_file_mount = match rootfs_pid {
            // On dump, only paths that exist as files in the container were masked.
            Some(pid) => fs::metadata(format!("/proc/{pid}/root{p}")).is_ok_and(|m| !m.is_dir()),
            None => true,
        };
        if !is_file_mount {
            continue;
        }
        if restore {
            out.push((p.clone(), "/dev/null".into()));
        } else {
            out.push((p.clone(), p));
        }
    }
    // In a user namespace device nodes cannot be created: they are bind mounts.
    if has_userns(spec) {
        let mut devs: Vec<String> = ["null", "zero", "full", "random", "urandom", "tty"]
            .iter()
            .map(|d| format!("/dev/{d}"))
            .collect();
        if let Some(ds) = spec.linux().as_ref().and_then(|l| l.devices().as_ref()) {
            devs.extend(ds.iter().map(|d| d.path().display().to_string()));
        }
        devs.dedup();
        for d in devs {
            if let Some(pid) = rootfs_pid {
                if fs::metadata(format!("/proc/{pid}/root{d}")).is_err() {
                    continue;
                }
            }
            out.push((d.clone(), d));
        }
    }
    out
}

/// Mount entries of `/proc/<pid>/mountinfo` as (mount point, fs type, super options).
fn mountinfo(pid: &str) -> Vec<(String, String, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split_whitespace().nth(4)?.to_string();
            let mut post = post.split_whitespace();
            let fstype = post.next()?.to_string();
            let _source = post.next();
            let sopts = post.next().unwrap_or_default().to_string();
            Some((mp, fstype, sopts))
        })
        .collect()
}

/// A `cgroup` mount of the spec (podman's `/sys/fs/cgroup`) is, on cgroup v1, one
/// bind mount per hierarchy (`DEST/<hierarchy dir>`) of a host cgroup directory
/// whose root CRIU cannot see ("doesn't have a proper root mount"): each one is an
/// external mount, as runc's `getCgroupMounts` makes them. On dump the keys are the
/// container's mount points; on restore each maps to the host hierarchy joined with
/// the restored container's cgroup or, for named hierarchies (name=systemd) where
/// the container has no cgroup of its own, the restorer's (libcontainer binds the
/// same on create).
fn cgroup_v1_mounts(
    dest: &Path,
    restore: bool,
    pid: Option<i32>,
    cgroup_path: &Path,
) -> Vec<(String, String)> {
    if !restore {
        let Some(pid) = pid else {
            return Vec::new();
        };
        return mountinfo(&pid.to_string())
            .into_iter()
            .filter(|(mp, fstype, _)| fstype == "cgroup" && Path::new(mp).starts_with(dest))
            .map(|(mp, _, _)| (mp.clone(), mp))
            .collect();
    }
    let own = cgroup_path
        .to_string_lossy()
        .trim_start_matches('/')
        .to_string();
    let self_cgroups = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for (mp, fstype, sopts) in mountinfo("self") {
        // Only the host's hierarchies, not other mounts of the same cgroup
        // filesystems (a concurrent CRIU's cgroup yard under its work dir is
        // visible here and must not be picked).
        if fstype != "cgroup" || Path::new(&mp).parent() != Some(Path::new("/sys/fs/cgroup")) {
            continue;
        }
        let Some(name) = Path::new(&mp).file_name() else {
            continue;
        };
        let named = sopts.split(',').find_map(|o| o.strip_prefix("name="));
        let rel = match named {
            Some(n) => self_cgroups
                .lines()
                .find_map(|l| {
                    let mut p = l.splitn(3, ':');
                    let (_, c, path) = (p.next()?, p.next()?, p.next()?);
                    (c == format!("name={n}")).then(|| path.trim_start_matches('/').to_string())
                })
                .unwrap_or_default(),
            None => own.clone(),
        };
        out.push((
            dest.join(name).display().to_string(),
            Path::new(&mp).join(rel).display().to_string(),
        ));
    }
    out
}

/// The freezer cgroup directory of `pid` (v1 freezer hierarchy, or the v2 unified
/// hierarchy when there is no v1 freezer).
fn freezer_path(pid: i32) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let v1 = Path::new("/sys/fs/cgroup/freezer");
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if v1.is_dir() && ctrls.split(',').any(|c| c == "freezer") {
            return Some(v1.join(path.trim_start_matches('/')));
        }
        if !v1.is_dir() && ctrls.is_empty() {
            return Some(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')));
        }
    }
    None
}

/// The hierarchies (as named in `/proc/PID/cgroup`: `cpu,cpuacct`, `name=systemd`,
/// `` for v2) in which `pid` sits in the container's own cgroup `cgroup_path` (or
/// below it). Only these are dumped: in the others (v1 `name=systemd`, the unified
/// mount of a hybrid host) the container shares the runtime's cgroup, often the
/// hierarchy root, and CRIU would record that whole subtree (every other
/// container's directories) and recreate it under the new container's cgroup on
/// restore, where nothing removes it. Empty (dump all, CRIU's default) when the
/// container has no cgroup of its own.
fn own_hierarchies(pid: i32, cgroup_path: &Path) -> Vec<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    own_hierarchies_in(&text, cgroup_path)
}

fn own_hierarchies_in(proc_cgroup: &str, cgroup_path: &Path) -> Vec<String> {
    let own = cgroup_path.to_string_lossy();
    let own = own.trim_matches('/');
    if own.is_empty() {
        return Vec::new();
    }
    proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let path = Path::new(path.trim_start_matches('/'));
            path.starts_with(own).then(|| ctrls.to_string())
        })
        .collect()
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|source| RuntimeError::Io {
            op: "create directory",
            path: p.to_path_buf(),
            source,
        })
}

/// Refuses a pre-dump or lazy-pages checkpoint the kernel cannot do, up front.
fn check_dump_features(criu: &Criu, o: &CheckpointOptions) -> Result<()> {
    if o.pre_dump || o.flags.lazy_pages {
        let (mem_track, lazy) = criu.features()?;
        if o.pre_dump && !mem_track {
            return Err(CriuError::MissingFeature {
                feature: "memory tracking (soft-dirty pages), needed by --pre-dump",
                why: "the kernel does not track dirty pages (CONFIG_MEM_SOFT_DIRTY); take a full checkpoint instead",
            }
            .into());
        }
        if o.flags.lazy_pages && !lazy {
            return Err(CriuError::MissingFeature {
                feature: "userfaultfd lazy pages, needed by --lazy-pages",
                why: "the kernel has no usable userfaultfd; checkpoint without --lazy-pages",
            }
            .into());
        }
    }
    Ok(())
}

/// CRIU's options for dumping container `st` (`defer_stop`: keep the tasks
/// for the caller to stop, see `defers_stop`), and the descriptors CRIU must
/// inherit.
fn dump_opts(
    o: &CheckpointOptions,
    st: &ContainerState,
    spec: &Spec,
    defer_stop: bool,
) -> Result<(criu::Opts, Vec<RawFd>)> {
    let pid = st.pid;
    let mut opts = criu::Opts::new();
    opts.pid = Some(pid);
    opts.root = Some(st.rootfs.display().to_string());
    opts.leave_running = Some(o.leave_running || o.pre_dump || defer_stop);
    opts.manage_cgroups = Some(true);
    opts.manage_cgroups_mode = Some(EnumOrUnknown::new(o.flags.manage_cgroups_mode.to_rpc()));
    opts.notify_scripts = Some(true);
    o.flags.apply(&mut opts);
    opts.link_remap = Some(o.link_remap);
    opts.tcp_skip_in_flight = Some(o.tcp_skip_in_flight);
    let empty = empty_ns_flags(&o.flags.empty_ns)?;
    if empty != 0 {
        opts.empty_ns = Some(empty);
    }
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    opts.orphan_pts_master = Some(terminal);
    if let Some(parent) = &o.parent_path {
        opts.parent_img = Some(parent.display().to_string());
        opts.track_mem = Some(true);
    }
    if o.pre_dump {
        opts.track_mem = Some(true);
    }
    if let Some(ps) = &o.page_server {
        let (addr, port) = ps.rsplit_once(':').ok_or_else(|| {
            RuntimeError::Invalid(format!("--page-server {ps:?}: expected ADDRESS:PORT"))
        })?;
        let mut info = rpc::Criu_page_server_info::new();
        info.address = Some(addr.to_string());
        info.port = Some(port.parse().map_err(|_| {
            RuntimeError::Invalid(format!("--page-server {ps:?}: port is not a number"))
        })?);
        opts.ps = Some(info).into();
    }
    let mut keep = Vec::new();
    if let Some(fd) = o.status_fd {
        opts.status_fd = Some(fd);
        keep.push(fd);
    }
    for (k, v) in external_mounts(spec, &st.bundle, false, Some(pid), &st.cgroup_path) {
        let mut m = rpc::Ext_mount_map::new();
        m.key = Some(k);
        m.val = Some(v);
        opts.ext_mnt.push(m);
    }
    if let Some(p) = netns_path(spec) {
        use std::os::unix::fs::MetadataExt;
        let ino = fs::metadata(&p)
            .map_err(|source| RuntimeError::Io {
                op: "stat network namespace",
                path: p.clone(),
                source,
            })?
            .ino();
        opts.external.push(format!("net[{ino}]:{EXT_NETNS_KEY}"));
    }
    Ok((opts, keep))
}

/// Whether a checkpoint that stops the container can leave its tasks to CRIU's
/// leave-running and kill them itself after storing the image. Not with
/// `--tcp-established`: at the end of a leave-running dump CRIU takes the
/// sockets out of repair mode and unlocks the network, so killing the tasks
/// afterwards would reset the connections the image holds; CRIU kills them
/// while they are still locked. Not with `--link-remap`: CRIU deletes the
/// link-remap files it made for open unlinked files at the end of a
/// leave-running dump, and the captured filesystem must hold them. Not with lazy
/// pages or a pre-dump either (the dumped tasks serve the pages / keep running).
pub fn defers_stop(o: &CheckpointOptions) -> bool {
    !o.leave_running
        && !o.pre_dump
        && !o.flags.tcp_established
        && !o.flags.lazy_pages
        && !o.link_remap
}

fn read_stats(path: &Path) -> CriuStats {
    CriuStats {
        entries: criu::read_stats(path).unwrap_or_default(),
    }
}

impl Runtime {
    /// Waits until the lazy-pages daemon of a container restored with lazy pages
    /// has copied all its memory in (at most a minute); no-op for others.
    pub fn wait_lazy_pages(&self, id: &str) -> Result<()> {
        wait_lazy_pages(&self.dir(id))
    }

    fn criu(&self) -> Criu {
        Criu::new(&self.criu)
    }

    /// `checkpoint`: dumps a running (or paused) container into `image_path`.
    /// Without `leave_running` the container is stopped and removed only after the
    /// dump succeeded; a failed checkpoint leaves it running and untouched.
    pub fn checkpoint(&self, o: &CheckpointOptions) -> Result<CriuStats> {
        self.checkpoint_inner(o, &mut |_, _| Ok(()), false)
    }

    /// `checkpoint`, calling `after_dump` with the container's state and CRIU's
    /// statistics once CRIU succeeded, while the container is still frozen
    /// (before it is thawed with `leave_running`, or stopped and removed without
    /// it): its filesystem is then consistent with the dumped memory. An error
    /// from `after_dump` fails the checkpoint and the container runs on.
    ///
    /// Without `leave_running` the container is stopped only after `after_dump`
    /// succeeded (it stores the image): CRIU dumps with its own leave-running
    /// and the tasks stay frozen until then, so a checkpointer that dies before
    /// leaves a frozen container that the next command thaws (`Runtime::load`),
    /// never a lost one. With `--tcp-established` or lazy pages CRIU still stops
    /// the tasks itself (see `defers_stop`).
    pub fn checkpoint_with(
        &self,
        o: &CheckpointOptions,
        after_dump: &mut dyn FnMut(&ContainerState, &CriuStats) -> Result<()>,
    ) -> Result<CriuStats> {
        self.checkpoint_inner(o, after_dump, true)
    }

    fn checkpoint_inner(
        &self,
        o: &CheckpointOptions,
        after_dump: &mut dyn FnMut(&ContainerState, &CriuStats) -> Result<()>,
        defer_stop: bool,
    ) -> Result<CriuStats> {
        let lock = self.lock(&o.id)?;
        let (mut st, _) = self.load_locked(&o.id, &lock)?;
        let status = self.check(&st, Op::Checkpoint)?;
        let defer_stop = defer_stop && defers_stop(o);
        wait_lazy_pages(&self.dir(&o.id))?;
        let spec = load_spec(&st.bundle)?;
        let criu = self.criu();
        // A dot name: no id starts with '.', so no container's lock file is this cache.
        criu.require_version_cached(&self.root.join(".locks").join(".criu-version"))?;
        check_dump_features(&criu, o)?;
        mkdir_private(&o.image_path)?;
        let work = o.work_path.clone().unwrap_or_else(|| o.image_path.clone());
        mkdir_private(&work)?;

        let pid = st.pid;
        let descriptors: Vec<String> = (0..3)
            .map(|n| {
                fs::read_link(format!("/proc/{pid}/fd/{n}"))
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "/dev/null".into())
            })
            .collect();
        let dpath = o.image_path.join(DESCRIPTORS_FILE);
        let djson = serde_json::to_vec(&descriptors).unwrap_or_default();
        state::write_atomic(&dpath, &djson)?;
        // The container's config travels with its image (podman and restore use it).
        let _ = fs::copy(
            st.bundle.join("config.json"),
            o.image_path.join("config.json"),
        );

        let (mut opts, keep) = dump_opts(o, &st, &spec, defer_stop)?;

        // Freeze through the cgroup freezer at CRIU's `pre-dump` notification,
        // right before it collects the tree: CRIU then finds the cgroup frozen and
        // skips its freezer poll (100 ms steps), and its own start-up (kernel
        // probing) stays outside the frozen window. A container the user paused
        // is frozen already and stays so.
        let freeze_wanted = status == Status::Running;
        let froze = std::cell::Cell::new(false);
        let cdir = self.dir(&o.id);
        // Record the checkpointer (and, once spawned, its CRIU) before anything is
        // frozen: if this process dies, the next command thaws the container.
        st.checkpointer = Some(Worker::this_process(freeze_wanted));
        st.save(&cdir)?;
        let mut on_spawn = |criu_pid: i32| -> Result<(), String> {
            let mut rec = st.clone();
            if let Some(c) = rec.checkpointer.as_mut() {
                c.criu_pid = criu_pid;
                c.criu_start_time = state::process_start_time(criu_pid).unwrap_or(0);
            }
            rec.save(&cdir)
                .map_err(|e| format!("record the checkpointing CRIU: {e}"))
        };
        let mut on_notify = |n: Notify| -> Result<(), String> {
            if n.script == "pre-dump" {
                if freeze_wanted && !froze.get() {
                    core::set_frozen(&cdir, &o.id, true).map_err(|e| e.to_string())?;
                    froze.set(true);
                }
                super::fault_point("checkpoint.frozen");
            }
            Ok(())
        };
        if let Some(fp) = freezer_path(pid) {
            opts.freeze_cgroup = Some(fp.display().to_string());
        }
        opts.cgroup_dump_controller = own_hierarchies(pid, &st.cgroup_path);
        let call = Call {
            work_dir: &work,
            images_dir: &o.image_path,
            log_file: DUMP_LOG,
            keep_fds: &keep,
            on_spawn: Some(&mut on_spawn),
        };
        let res = if o.pre_dump {
            criu.pre_dump(opts, call, &mut on_notify)
        } else {
            criu.dump(opts, call, &mut on_notify)
        };
        let froze = froze.get();
        // CRIU writes pre-dump statistics to `stats-dump` too.
        let stats = read_stats(&work.join("stats-dump"));
        let res = res.map_err(RuntimeError::from).and_then(|_| {
            super::fault_point("checkpoint.after-dump");
            if o.pre_dump {
                Ok(())
            } else {
                after_dump(&st, &stats)
            }
        });
        if res.is_ok() && !o.leave_running && !o.pre_dump {
            // Stored (or CRIU killed the tasks): stop and remove it as runc does.
            self.remove_checkpointed(&st, defer_stop)?;
            return Ok(stats);
        }
        if froze {
            // Thaw: on success with --leave-running the container goes on; on
            // failure it must keep running (CRIU re-froze the cgroup it found
            // frozen when it rolled back).
            let thaw = core::set_frozen(&cdir, &o.id, false);
            if res.is_ok() {
                thaw?;
            }
        }
        st.checkpointer = None;
        let cleared = st.save(&cdir);
        res?;
        cleared?;
        Ok(stats)
    }

    /// Stops and removes a container after its checkpoint: its tasks were killed
    /// by CRIU, or (`frozen_tasks`) they are still there, frozen, and are killed
    /// now, before the thaw, so none runs another instruction.
    fn remove_checkpointed(&self, st: &ContainerState, frozen_tasks: bool) -> Result<()> {
        let dir = self.dir(&st.id);
        if frozen_tasks {
            for pid in core::pids(&dir, &st.id)? {
                // A task that is already gone needs no signal.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        // Killed tasks in a frozen cgroup die once thawed.
        let _ = core::set_frozen(&dir, &st.id, false);
        core::delete(&dir, &st.id, true)?;
        super::unmount_under(&dir);
        let _ = fs::remove_dir_all(&dir);
        if let Some(owned) = &st.owned_dir {
            super::unmount_under(owned);
            let _ = fs::remove_dir_all(owned);
        }
        Ok(())
    }

    /// `restore`: brings a container back from a CRIU image directory under `id`
    /// with `bundle`'s config and rootfs. Returns the exit code when not detached.
    pub fn restore(&self, o: &RestoreOptions) -> Result<(i32, CriuStats)> {
        self.restore_locked(o, self.lock(&o.id)?)
    }

    /// `restore` for a caller that already holds the container's lock (from
    /// `lock_container`); the lock is released once the container is recorded.
    pub fn restore_locked(
        &self,
        o: &RestoreOptions,
        lock: state::ContainerLock,
    ) -> Result<(i32, CriuStats)> {
        let (pid, stats) = {
            let _lock = lock;
            let dir = self.dir(&o.id);
            if dir.exists() {
                return Err(RuntimeError::Exists {
                    id: o.id.clone(),
                    root: self.root.clone(),
                });
            }
            let bundle = core::check_bundle(&o.bundle)?;
            if !o.image_path.join("inventory.img").is_file() {
                return Err(RuntimeError::Invalid(format!(
                    "{} is not a CRIU image directory (no inventory.img): create one with `stasis checkpoint --image-path`",
                    o.image_path.display()
                )));
            }
            let criu = self.criu();
            // A dot name: no id starts with '.', so no container's lock file is this cache.
            criu.require_version_cached(&self.root.join(".locks").join(".criu-version"))?;
            if o.flags.lazy_pages && !criu.features()?.1 {
                return Err(CriuError::MissingFeature {
                    feature: "userfaultfd lazy pages, needed by --lazy-pages",
                    why: "the kernel has no usable userfaultfd; restore without --lazy-pages",
                }
                .into());
            }
            let spec = load_spec(&bundle.path)?;
            if o.flags.lazy_pages {
                check_uffd_in_userns(&spec)?;
            }
            fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
                op: "create container directory",
                path: dir.clone(),
                source,
            })?;
            let mut cgroup_path = PathBuf::new();
            let r = self.restore_into(o, &dir, &bundle, &spec, &criu, &mut cgroup_path);
            match r {
                Ok(x) => x,
                Err(mut e) => {
                    if o.work_path.is_none() {
                        keep_failed_log(&mut e, &o.id);
                    }
                    if !cgroup_path.as_os_str().is_empty() {
                        core::cgroup_remove(&cgroup_path, &o.id);
                    }
                    let _ = fs::remove_dir_all(&dir);
                    return Err(e);
                }
            }
        };
        if o.detach {
            return Ok((0, stats));
        }
        let code = foreground::wait_forwarding_signals(pid).map_err(|source| RuntimeError::Io {
            op: "wait for restored container",
            path: PathBuf::from(format!("/proc/{pid}")),
            source,
        })?;
        if let Err(e) = self.delete(&o.id, true) {
            eprintln!("stasis: warning: {e}");
        }
        Ok((code, stats))
    }

    fn restore_into(
        &self,
        o: &RestoreOptions,
        dir: &Path,
        bundle: &core::BundleInfo,
        spec: &Spec,
        criu: &Criu,
        cgroup_out: &mut PathBuf,
    ) -> Result<(i32, CriuStats)> {
        let id = o.id.as_str();
        let cgroup_path = core::register(dir, id, spec, &bundle.path, None)?;
        *cgroup_out = cgroup_path.clone();
        // Recorded before anything is mounted or restored: if this process dies
        // from here on, `list` shows the container as restoring and `delete
        // --force` removes what the restore left (processes, mounts, cgroups).
        let mut st = ContainerState {
            id: id.to_string(),
            status: Status::Restoring,
            pid: 0,
            pid_start_time: 0,
            bundle: bundle.path.clone(),
            rootfs: bundle.rootfs.clone(),
            created: Utc::now(),
            owner: super::owner_name(),
            annotations: bundle.annotations.clone(),
            cgroup_path: cgroup_path.clone(),
            owned_dir: o.owned_dir.clone(),
            checkpointer: None,
            restorer: Some(Worker::this_process(false)),
        };
        st.save(dir)?;
        let work = match &o.work_path {
            Some(w) => w.clone(),
            None => dir.join("criu"),
        };
        mkdir_private(&work)?;

        // Mount points of bind mounts must exist in the rootfs before CRIU mounts.
        for m in spec.mounts().as_deref().unwrap_or_default() {
            if !is_bind(m) {
                continue;
            }
            let target = bundle
                .rootfs
                .join(m.destination().strip_prefix("/").unwrap_or(m.destination()));
            if target.exists() {
                continue;
            }
            let src = m.source().clone().unwrap_or_default();
            let src = if src.is_absolute() {
                src
            } else {
                bundle.path.join(src)
            };
            let res = if src.is_dir() {
                fs::create_dir_all(&target)
            } else {
                if let Some(p) = target.parent() {
                    let _ = fs::create_dir_all(p);
                }
                fs::File::create(&target).map(|_| ())
            };
            res.map_err(|source| RuntimeError::Io {
                op: "create mount point",
                path: target.clone(),
                source,
            })?;
        }

        // CRIU wants the root to be a mount point: bind the rootfs onto a private dir.
        let criu_root = dir.join("criu-root");
        fs::create_dir_all(&criu_root).map_err(|source| RuntimeError::Io {
            op: "create directory",
            path: criu_root.clone(),
            source,
        })?;
        mount(
            Some(&bundle.rootfs),
            &criu_root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| RuntimeError::Io {
            op: "bind-mount rootfs for CRIU",
            path: criu_root.clone(),
            source: e.into(),
        })?;
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = umount2(&self.0, MntFlags::MNT_DETACH);
                let _ = fs::remove_dir(&self.0);
            }
        }
        let _unmount = Unmount(criu_root.clone());

        let mut opts = criu::Opts::new();
        opts.root = Some(criu_root.display().to_string());
        opts.rst_sibling = Some(true);
        opts.notify_scripts = Some(true);
        opts.manage_cgroups = Some(true);
        opts.manage_cgroups_mode = Some(EnumOrUnknown::new(o.flags.manage_cgroups_mode.to_rpc()));
        let cg = cgroup_path.display().to_string();
        let mut root = rpc::Cgroup_root::new();
        root.path = Some(if cg.starts_with('/') {
            cg
        } else {
            format!("/{cg}")
        });
        opts.cg_root.push(root);
        o.flags.apply(&mut opts);
        opts.lsm_profile = o.lsm_profile.clone();
        opts.lsm_mount_context = o.lsm_mount_context.clone();
        if let Some(p) = &o.join_netns {
            let mut j = rpc::Join_namespace::new();
            j.ns = Some("net".into());
            j.ns_file = Some(p.display().to_string());
            opts.join_ns.push(j);
        }
        let empty = empty_ns_flags(&o.flags.empty_ns)?;
        if empty != 0 {
            opts.empty_ns = Some(empty);
        }
        opts.orphan_pts_master = Some(o.console_socket.is_some());
        for (k, v) in external_mounts(spec, &bundle.path, true, None, &cgroup_path) {
            let mut m = rpc::Ext_mount_map::new();
            m.key = Some(k);
            m.val = Some(v);
            opts.ext_mnt.push(m);
        }

        // Descriptors CRIU must hand to the restored tree: our stdio pipes in place
        // of the ones recorded at dump, and an external network namespace.
        let mut held: Vec<OwnedFd> = Vec::new();
        // descriptors.json comes from the snapshot: read a bounded prefix (a real
        // one is three short strings); anything larger does not parse and is ignored.
        let descriptors: Vec<String> = fs::File::open(o.image_path.join(DESCRIPTORS_FILE))
            .and_then(|f| {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 20), &mut b)?;
                Ok(b)
            })
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for (i, d) in descriptors.iter().enumerate().take(3) {
            if !d.starts_with("pipe:") {
                continue;
            }
            // Our own /dev/null (or, for a server, no stdio at all) cannot be
            // handed over: the host's /dev/null is outside the container's mounts
            // and the next dump would fail. A pipe can: at EOF for stdin,
            // drained by a detached `stasis __drain` for output.
            let fd: OwnedFd = if o.null_stdio || super::stdio::is_dev_null(i as RawFd) {
                let r = if i == 0 {
                    super::stdio::eof_pipe()
                } else {
                    super::stdio::drained_pipe()
                };
                r.map_err(|source| RuntimeError::Io {
                    op: "create stdio pipe for",
                    path: PathBuf::from(&o.id),
                    source,
                })?
            } else {
                let fd = nix::fcntl::fcntl(i as RawFd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                    .map_err(|e| RuntimeError::Io {
                        op: "duplicate stdio descriptor",
                        path: PathBuf::from(format!("/proc/self/fd/{i}")),
                        source: e.into(),
                    })?;
                // SAFETY: fcntl just returned this new descriptor; we own it.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
            };
            let mut inh = rpc::Inherit_fd::new();
            inh.key = Some(d.clone());
            inh.fd = Some(fd.as_raw_fd());
            opts.inherit_fd.push(inh);
            held.push(fd);
        }
        if let Some(p) = netns_path(spec) {
            let f = fs::File::open(&p).map_err(|source| RuntimeError::Io {
                op: "open network namespace",
                path: p.clone(),
                source,
            })?;
            let fd: OwnedFd = f.into();
            let mut inh = rpc::Inherit_fd::new();
            inh.key = Some(EXT_NETNS_KEY.to_string());
            inh.fd = Some(fd.as_raw_fd());
            opts.inherit_fd.push(inh);
            held.push(fd);
        }
        let keep: Vec<RawFd> = held.iter().map(|f| f.as_raw_fd()).collect();

        let own_netns = has_own_netns(spec);
        let mut hook_err: Option<RuntimeError> = None;
        let mut restored_pid = 0;
        let console = o.console_socket.clone();
        let bundle_path = bundle.path.clone();
        let mut ns_pid = 0;
        let mut notify = |n: Notify| -> Result<(), String> {
            match n.script.as_str() {
                "setup-namespaces" => {
                    ns_pid = n.pid;
                    for kind in ["prestart", "createRuntime"] {
                        if let Err(e) = core::run_hooks(kind, spec, id, &bundle_path, n.pid) {
                            let m = e.to_string();
                            hook_err = Some(e);
                            return Err(m);
                        }
                    }
                }
                // Not at setup-namespaces: CRIU restores the links (lo with the
                // flags it had at dump) only after that script, and CRIU's
                // post-setup-namespaces notify carries no pid.
                "post-setup-namespaces" if own_netns && ns_pid > 0 => {
                    netns::loopback_up(ns_pid).map_err(|e| {
                        format!("bring loopback up in the restored network namespace: {e}")
                    })?;
                }
                "post-restore" => {
                    restored_pid = n.pid;
                    super::fault_point("restore.during-criu");
                }
                "orphan-pts-master" => {
                    if let (Some(sock), Some(fd)) = (&console, n.fd) {
                        send_console(sock, fd)
                            .map_err(|e| format!("send pty master to {}: {e}", sock.display()))?;
                    }
                }
                _ => {}
            }
            Ok(())
        };
        let mut enter_cgroup = |pid: i32| -> Result<(), String> {
            core::cgroup_enter(&cgroup_path, id, spec, pid).map_err(|e| e.to_string())
        };
        let lazy = if o.flags.lazy_pages && o.lazy_daemon {
            Some(criu.spawn_lazy_pages(&o.image_path, &work)?)
        } else {
            None
        };
        super::fault_point("restore.before-criu");
        let resp = criu.restore(
            opts,
            Call {
                work_dir: &work,
                images_dir: &o.image_path,
                log_file: RESTORE_LOG,
                keep_fds: &keep,
                on_spawn: Some(&mut enter_cgroup),
            },
            &mut notify,
        );
        drop(held);
        if let Some(d) = lazy {
            if resp.is_ok() && hook_err.is_none() {
                // A checkpoint of this container waits for the daemon first: the
                // pid and its start time (a reused pid is not taken for it).
                let pid = d.pid() as i32;
                let rec = format!("{pid} {}", state::process_start_time(pid).unwrap_or(0));
                let path = dir.join(LAZY_PID);
                match fs::write(&path, rec) {
                    Ok(()) => d.detach(),
                    Err(source) => {
                        d.abort();
                        return Err(RuntimeError::Io {
                            op: "record the lazy-pages daemon in",
                            path,
                            source,
                        });
                    }
                }
            } else {
                d.abort();
            }
        }
        if let Some(e) = hook_err {
            return Err(e);
        }
        let resp = resp?;
        let pid = resp
            .restore
            .as_ref()
            .and_then(|r| r.pid)
            .filter(|p| *p > 0)
            .unwrap_or(restored_pid);
        if pid <= 0 {
            return Err(RuntimeError::Invalid(
                "criu restore succeeded but reported no pid".into(),
            ));
        }
        super::fault_point("restore.after-criu");
        core::register(dir, id, spec, &bundle.path, Some(pid))?;
        st.status = Status::Running;
        st.pid = pid;
        st.pid_start_time = state::process_start_time(pid).unwrap_or(0);
        st.created = Utc::now();
        st.restorer = None;
        st.save(dir)?;
        if let Some(pf) = &o.pid_file {
            state::write_atomic(pf, pid.to_string().as_bytes())?;
        }
        // A failing poststart hook is a warning (runtime spec), not a failed restore.
        if let Err(e) = core::run_hooks("poststart", spec, id, &bundle.path, pid) {
            eprintln!("stasis: warning: {e}");
        }
        Ok((pid, read_stats(&work.join("stats-restore"))))
    }
}

/// Every capability a restore of the CRIU image in `image` would give any of its
/// tasks (CRIU restores credentials from the image, not from config.json).
pub fn image_capabilities(image: &Path) -> Result<Vec<String>> {
    Ok(criu::image_capabilities(image)?)
}

/// Copies the CRIU log an error names to a new file in `$TMPDIR` and points the
/// error there, for logs in directories that are about to be removed. The file is
/// created by us (O_EXCL, mode 0600, a random name: `stasis-<what>-XXXXXX.log`), so
/// another local user cannot aim the copy at a file of their choosing with a
/// symlink planted at a predictable name, nor read the log.
pub fn keep_failed_log_as(e: &mut RuntimeError, what: &str, id: &str) {
    let RuntimeError::Criu(
        CriuError::Failed { log, .. }
        | CriuError::Died { log, .. }
        | CriuError::Timeout { log, .. },
    ) = e
    else {
        return;
    };
    let kept = (|| -> std::io::Result<PathBuf> {
        let mut src = fs::File::open(&*log)?;
        let mut dst = tempfile::Builder::new()
            .prefix(&format!("stasis-{what}-"))
            .suffix(".log")
            .tempfile()?;
        std::io::copy(&mut src, &mut dst)?;
        let (_, path) = dst.keep().map_err(|e| e.error)?;
        Ok(path)
    })();
    match kept {
        Ok(dst) => *log = dst.display().to_string(),
        Err(err) => tracing::warn!("container {id}: could not keep CRIU's log {log}: {err}"),
    }
}

/// A failed restore removes the container's directory and with it CRIU's log in
/// the default work directory (`<root>/<id>/criu`), which the error names.
fn keep_failed_log(e: &mut RuntimeError, id: &str) {
    keep_failed_log_as(e, "restore", id);
}

/// Sends the pty master to a console socket (SCM_RIGHTS), as runc does.
fn send_console(sock: &Path, fd: OwnedFd) -> std::io::Result<()> {
    use nix::sys::socket::{
        connect, sendmsg, socket, ControlMessage, SockFlag, SockType, UnixAddr,
    };
    let s = socket(
        nix::sys::socket::AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    let addr = UnixAddr::new(sock).map_err(std::io::Error::from)?;
    connect(s.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let name = b"/dev/ptmx";
    let iov = [std::io::IoSlice::new(name)];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// Pid of the `criu lazy-pages` daemon of a restored container (in its state
/// directory) while it may still be copying pages in.
const LAZY_PID: &str = "lazy-pages.pid";

/// userfaultfd in a user namespace: the restored tasks open it themselves, and
/// the kernel allows that outside the initial user namespace only with
/// `vm.unprivileged_userfaultfd = 1`.
fn check_uffd_in_userns(spec: &Spec) -> Result<()> {
    let in_userns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)
        });
    if !in_userns {
        return Ok(());
    }
    let knob = Path::new("/proc/sys/vm/unprivileged_userfaultfd");
    match fs::read_to_string(knob) {
        Ok(v) if v.trim() == "1" => Ok(()),
        _ => Err(RuntimeError::Invalid(
            "--lazy-pages: this container has a user namespace, where the kernel allows userfaultfd only with vm.unprivileged_userfaultfd=1 (it is 0 or missing); run `sysctl -w vm.unprivileged_userfaultfd=1` or restore without --lazy-pages".into(),
        )),
    }
}

/// Waits (at most a minute) for the lazy-pages daemon of a restored container
/// to have copied every page in: CRIU cannot dump memory that is still missing.
fn wait_lazy_pages(dir: &Path) -> Result<()> {
    let Ok(rec) = fs::read_to_string(dir.join(LAZY_PID)) else {
        return Ok(());
    };
    let mut it = rec.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        it.next().map(str::parse::<i32>),
        it.next().map(str::parse::<u64>),
    ) else {
        return Err(RuntimeError::Invalid(format!(
            "{} is damaged ({rec:?}); if no `criu lazy-pages` process of this container runs any more, remove that file and checkpoint again",
            dir.join(LAZY_PID).display()
        )));
    };
    let is_daemon = || {
        state::process_start_time(pid) == Some(start)
            && fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| c.contains("lazy-pages"))
                .unwrap_or(false)
    };
    let t0 = std::time::Instant::now();
    while is_daemon() {
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            return Err(RuntimeError::Invalid(format!(
                "the lazy-pages daemon (pid {pid}) of this restored container is still copying its memory in after 60 s; checkpoint it later"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = fs::remove_file(dir.join(LAZY_PID));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_containers_own_hierarchies_are_dumped() {
        let text = "9:name=systemd:/\n8:pids:/:youki:c1\n2:cpu,cpuacct:/:youki:c1/sub\n\
                    1:memory:/other\n0::/\n";
        assert_eq!(
            own_hierarchies_in(text, Path::new(":youki:c1")),
            vec!["pids".to_string(), "cpu,cpuacct".to_string()]
        );
        // v2: the unified hierarchy is named "".
        assert_eq!(
            own_hierarchies_in("0::/youki/c1\n", Path::new("/youki/c1")),
            vec![String::new()]
        );
        // No cgroup of its own: dump everything (CRIU's default).
        assert!(own_hierarchies_in(text, Path::new("")).is_empty());
        // A sibling whose name merely starts the same is not ours.
        assert!(own_hierarchies_in("8:pids:/:youki:c10\n", Path::new(":youki:c1")).is_empty());
    }

    #[test]
    fn a_failed_log_is_kept_in_a_new_private_file_never_a_planted_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        fs::write(&log, "(00.1) Error (criu/cr-dump.c:1): boom\n").unwrap();
        // What a local user could plant at the name this used to write to.
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep me").unwrap();
        let planted = std::env::temp_dir().join("stasis-checkpoint-planted-id.log");
        let _ = fs::remove_file(&planted);
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let mut e = RuntimeError::Criu(CriuError::Failed {
            op: "dump",
            errmsg: String::new(),
            quoted: String::new(),
            log: log.display().to_string(),
        });
        keep_failed_log_as(&mut e, "checkpoint", "planted-id");
        let RuntimeError::Criu(CriuError::Failed { log: kept, .. }) = &e else {
            panic!("{e}");
        };
        let kept = PathBuf::from(kept);
        assert_ne!(kept, planted);
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(
            fs::read_to_string(&kept).unwrap(),
            fs::read_to_string(&log).unwrap()
        );
        let mode = fs::metadata(&kept).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = fs::remove_file(&kept);
        let _ = fs::remove_file(&planted);
    }
}
