//! `checkpoint` and `restore` with runc's flags.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};

use crate::runtime::checkpoint::{
    CgroupsMode, CheckpointOptions, CriuFlags, CriuStats, RestoreOptions,
};
use crate::runtime::Runtime;
use crate::store::Store;
use crate::workflows::snapshot::{
    checkpoint_to_store, copy_ids, restore_from_store, CopyOptions, RestoreFrom, TaggedCheckpoint,
};
use crate::workflows::WorkflowError;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgMode {
    Soft,
    Full,
    Strict,
    Ignore,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsFormat {
    Text,
    Json,
}

// Flags shared by checkpoint and restore. (A `///` comment here would become
// the help text of both commands: clap reads a flattened struct's doc as `about`.)
#[derive(Args, Debug)]
pub struct SharedFlags {
    /// Directory for CRIU's logs and stats (default: the image path on checkpoint,
    /// the container's state directory on restore)
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Allow open TCP connections
    #[arg(long)]
    pub tcp_established: bool,
    /// Allow external unix sockets
    #[arg(long)]
    pub ext_unix_sk: bool,
    /// Allow shell jobs
    #[arg(long)]
    pub shell_job: bool,
    /// Handle file locks
    #[arg(long)]
    pub file_locks: bool,
    /// Cgroups mode: soft (default), full, strict or ignore
    #[arg(long, value_enum)]
    pub manage_cgroups_mode: Option<CgMode>,
    /// Create a namespace but do not restore its properties (only "network")
    #[arg(long)]
    pub empty_ns: Vec<String>,
    /// Enable auto deduplication of memory images
    #[arg(long)]
    pub auto_dedup: bool,
    /// Use userfaultfd to lazily restore memory pages
    ///
    /// On restore, a `criu lazy-pages` daemon goes on copying pages in after
    /// `restore` returns. Its record is ROOT/ID/lazy-pages.pid holding
    /// "PID STARTTIME" (STARTTIME: field 22 of /proc/PID/stat, so a reused pid
    /// is not taken for it), so `kill -0 $(cat FILE)` does not work: test the
    /// daemon with `kill -0 $(cut -d' ' -f1 FILE)`. A later checkpoint waits for
    /// it to finish, then removes the file
    #[arg(long)]
    pub lazy_pages: bool,
    /// Print CRIU's statistics after the operation
    #[arg(long)]
    pub print_stats: bool,
    /// Format of --print-stats
    #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
    pub stats_format: StatsFormat,
}

impl From<&SharedFlags> for CriuFlags {
    fn from(s: &SharedFlags) -> Self {
        CriuFlags {
            tcp_established: s.tcp_established,
            ext_unix_sk: s.ext_unix_sk,
            shell_job: s.shell_job,
            file_locks: s.file_locks,
            manage_cgroups_mode: match s.manage_cgroups_mode {
                None | Some(CgMode::Soft) => CgroupsMode::Soft,
                Some(CgMode::Full) => CgroupsMode::Full,
                Some(CgMode::Strict) => CgroupsMode::Strict,
                Some(CgMode::Ignore) => CgroupsMode::Ignore,
            },
            empty_ns: s.empty_ns.clone(),
            auto_dedup: s.auto_dedup,
            lazy_pages: s.lazy_pages,
        }
    }
}

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// Directory to write the CRIU image into
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Directory of a previous (pre-)dump, relative to the image path
    #[arg(long)]
    pub parent_path: Option<PathBuf>,
    /// Leave the container running after the checkpoint
    #[arg(long)]
    pub leave_running: bool,
    /// Dump memory only, leaving the container running (needs soft-dirty tracking)
    #[arg(long)]
    pub pre_dump: bool,
    /// ADDRESS:PORT of a CRIU page server
    #[arg(long)]
    pub page_server: Option<String>,
    /// Store the checkpoint in the snapshot store under this tag NAME[:VER]
    /// (repeatable) instead of leaving a plain image directory
    #[arg(long)]
    pub tag: Vec<String>,
    /// With --tag: do not capture the root filesystem
    #[arg(long)]
    pub ignore_rootfs: bool,
    /// With --tag: do not capture writable bind-mounted volumes
    #[arg(long)]
    pub ignore_volumes: bool,
    /// With --tag: container path not to capture (repeatable)
    #[arg(long)]
    pub exclude: Vec<PathBuf>,
    /// zstd level for new pages stored with --tag
    #[arg(long, default_value_t = 3)]
    pub compress_level: i32,
    /// Descriptor CRIU writes \0 to when the dump is done
    #[arg(long)]
    pub status_fd: Option<i32>,
    /// Allow CRIU to link-remap unlinked files
    #[arg(long)]
    pub link_remap: bool,
    /// Skip in-flight TCP connections
    #[arg(long)]
    pub tcp_skip_in_flight: bool,
    /// With --tag: output format (json: the snapshot id, sizes, timings and
    /// CRIU's statistics as one record)
    #[arg(long, value_enum, default_value_t = StatsFormat::Text, requires = "tag")]
    pub format: StatsFormat,
    #[command(flatten)]
    pub shared: SharedFlags,
    /// Container id
    pub id: String,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// CRIU image directory to restore from
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Bundle directory of the restored container (default: `.`, or with --from
    /// the bundle recorded in the snapshot)
    #[arg(long, short = 'b')]
    pub bundle: Option<PathBuf>,
    /// Restore from the snapshot store: a tag NAME[:VER] or a snapshot id
    #[arg(long, conflicts_with = "image_path")]
    pub from: Option<String>,
    /// With --from, for a snapshot not made on this host (imported): use its
    /// stored config.json whole, including hooks that run on the host, host bind
    /// mounts, devices, capabilities, sysctls and namespace paths. Without it (or
    /// --bundle) those settings are skipped, one warning line each
    #[arg(long)]
    pub trust_snapshot_config: bool,
    /// With --from and -d: restore N copies, each with its own id, cgroup,
    /// writable filesystem layer, volumes and network namespace (more than one
    /// copy needs -d: only one can run in the foreground)
    #[arg(long, default_value_t = 1)]
    pub copies: usize,
    /// With --copies: ids are PREFIX-0 .. PREFIX-(N-1) (default: the given id)
    #[arg(long)]
    pub name_prefix: Option<String>,
    /// With --from: give each copy a private full copy of the snapshot's rootfs
    /// (reflinked where the filesystem can) instead of an overlay, for hosts or
    /// filesystems where overlayfs cannot be used
    #[arg(long, requires = "from")]
    pub copy_rootfs: bool,
    /// With --from: restore into this existing network namespace (e.g.
    /// /run/netns/NAME) instead of a new one; copies share it, so they cannot
    /// listen on the same port
    #[arg(long, value_name = "PATH", requires = "from")]
    pub netns: Option<PathBuf>,
    /// Restore even when the host differs from the snapshot's record
    #[arg(long)]
    pub force: bool,
    /// Detach from the restored container
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// File to write the restored init pid to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// AF_UNIX socket that receives the pty master of a terminal container
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Do not act as a subreaper (accepted for runc compatibility)
    #[arg(long)]
    pub no_subreaper: bool,
    /// Do not use pivot_root (accepted for runc compatibility)
    #[arg(long)]
    pub no_pivot: bool,
    /// LSM profile for the restored process (e.g. apparmor:NAME)
    #[arg(long)]
    pub lsm_profile: Option<String>,
    /// LSM mount context for the restored mounts
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    #[command(flatten)]
    pub shared: SharedFlags,
    /// Container id (optional with --name-prefix)
    #[arg(required_unless_present = "name_prefix")]
    pub id: Option<String>,
}

fn print_stats(stats: &CriuStats, format: StatsFormat) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        StatsFormat::Json => {
            let map: serde_json::Map<String, serde_json::Value> = stats
                .entries
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
                .collect();
            writeln!(out, "{}", serde_json::Value::Object(map))?;
        }
        StatsFormat::Text => {
            for (k, v) in &stats.entries {
                let unit = if k.ends_with("_time") { " us" } else { "" };
                writeln!(out, "{k}: {v}{unit}")?;
            }
        }
    }
    Ok(())
}

pub fn checkpoint(rt: &Runtime, store: &std::path::Path, a: &CheckpointArgs) -> Result<i32> {
    let opts = CheckpointOptions {
        id: a.id.clone(),
        image_path: a.image_path.clone(),
        work_path: a.shared.work_path.clone(),
        parent_path: a.parent_path.clone(),
        leave_running: a.leave_running,
        pre_dump: a.pre_dump,
        page_server: a.page_server.clone(),
        status_fd: a.status_fd,
        link_remap: a.link_remap,
        tcp_skip_in_flight: a.tcp_skip_in_flight,
        flags: (&a.shared).into(),
    };
    if a.tag.is_empty() {
        let stats = rt.checkpoint(&opts)?;
        if a.shared.print_stats {
            print_stats(&stats, a.shared.stats_format)?;
        }
        return Ok(0);
    }
    let store = Store::open(store)?;
    let r = checkpoint_to_store(
        rt,
        &store,
        &TaggedCheckpoint {
            checkpoint: opts,
            tags: a.tag.clone(),
            compress_level: a.compress_level,
            progress: super::snapshot::progress_wanted(),
            ignore_rootfs: a.ignore_rootfs,
            ignore_volumes: a.ignore_volumes,
            exclude: a.exclude.clone(),
            save_stat_cache: true,
        },
    )?;
    let rep = &r.report;
    let mut out = std::io::stdout().lock();
    if a.format == StatsFormat::Json {
        super::report::print(&mut out, &super::report::Checkpoint::new(&r, &a.tag))?;
    } else {
        writeln!(out, "snapshot {} ({})", rep.id.short(), a.tag.join(", "))?;
    }
    warn_damaged_packs(rep);
    if a.shared.print_stats && a.format == StatsFormat::Text {
        let mut stats = r.stats.clone();
        stats.entries.extend([
            ("dump_ms", r.dump_ms as u64),
            ("ingest_ms", r.ingest_ms as u64),
            ("image_bytes", rep.image_bytes),
            ("pages_total", rep.pages_total),
            ("pages_new", rep.pages_new),
            ("pages_reused", rep.pages_reused),
            ("bytes_added", rep.bytes_added),
        ]);
        drop(out);
        print_stats(&stats, a.shared.stats_format)?;
    }
    Ok(0)
}

/// Packs an ingest found damaged (and did not reuse): the new snapshot is sound,
/// the older ones that use them are not.
pub(crate) fn warn_damaged_packs(rep: &crate::store::IngestReport) {
    for d in &rep.damaged_packs {
        eprintln!(
            "stasis: warning: pack {d} in the store is damaged; this snapshot stored its pages again, \
             but older snapshots that use it cannot be restored: run `stasis snapshot verify --repair`"
        );
    }
}

pub fn restore(rt: &Runtime, store: &std::path::Path, a: &RestoreArgs) -> Result<i32> {
    let mut opts = RestoreOptions {
        id: a
            .id
            .clone()
            .or_else(|| a.name_prefix.clone())
            .unwrap_or_default(),
        image_path: a.image_path.clone(),
        work_path: a.shared.work_path.clone(),
        bundle: a.bundle.clone().unwrap_or_else(|| PathBuf::from(".")),
        detach: a.detach,
        pid_file: a.pid_file.clone(),
        console_socket: a.console_socket.clone(),
        no_subreaper: a.no_subreaper,
        no_pivot: a.no_pivot,
        lsm_profile: a.lsm_profile.clone(),
        lsm_mount_context: a.lsm_mount_context.clone(),
        flags: (&a.shared).into(),
        owned_dir: None,
        null_stdio: false,
        join_netns: None,
        lazy_daemon: false,
    };
    if let Some(from) = &a.from {
        // Bad ids are refused before the store is opened (and maybe created).
        copy_ids(&opts.id, a.copies, a.name_prefix.as_deref())?;
        if a.copies > 1 && !a.detach {
            anyhow::bail!(
                "restore --copies {} needs -d (--detach): only one container can run in the \
                 foreground of this terminal, so the copies would detach silently; add -d \
                 (stop them later with `stasis kill ID` and `stasis delete ID`)",
                a.copies
            );
        }
        let store = match Store::open_existing(store) {
            Err(e @ crate::store::StoreError::NoStore { .. }) => {
                return Err(anyhow::Error::new(e).context(format!("no snapshot {from:?}")))
            }
            r => r?,
        };
        opts.image_path = PathBuf::new();
        // The image is the store's: with --lazy-pages stasis runs the daemon.
        opts.lazy_daemon = true;
        let r = restore_from_store(
            rt,
            &store,
            &RestoreFrom {
                from: from.clone(),
                restore: opts,
                bundle: a.bundle.clone(),
                force: a.force,
                progress: super::snapshot::progress_wanted(),
                copies: a.copies,
                name_prefix: a.name_prefix.clone(),
                copy: CopyOptions {
                    copy_rootfs: a.copy_rootfs,
                    netns: a.netns.clone(),
                },
                trust_snapshot_config: a.trust_snapshot_config,
            },
        );
        // Some copies failed: the ones that came up are listed on stdout (as on
        // success) and keep running; the error reports every copy.
        if let Err(WorkflowError::CopiesFailed { restored, .. }) = &r {
            let mut out = std::io::stdout().lock();
            for id in restored {
                writeln!(out, "{id}")?;
            }
        }
        let r = r?;
        if r.restored.len() > 1 || a.name_prefix.is_some() {
            let mut out = std::io::stdout().lock();
            for id in &r.restored {
                writeln!(out, "{id}")?;
            }
        }
        for w in &r.warnings {
            eprintln!("stasis: warning: {}", crate::store::printable(w));
        }
        if a.shared.print_stats && a.detach {
            let mut stats = r.stats.clone();
            stats
                .entries
                .push(("materialize_ms", r.materialize_ms as u64));
            stats.entries.push(("restore_ms", r.restore_ms as u64));
            print_stats(&stats, a.shared.stats_format)?;
        }
        return Ok(r.exit_code);
    }
    let (code, stats) = rt.restore(&opts)?;
    if a.shared.print_stats && a.detach {
        print_stats(&stats, a.shared.stats_format)?;
    }
    Ok(code)
}
