//! Checkpoint and restore latency of busybox containers: stasis against runc,
//! interleaved in one run, on the same CRIU.
//!
//!     cargo build --release && cargo bench --bench cr
//!
//! Two cases:
//! - `idle`: `sleep 3600` as the container's only process;
//! - `mem`: busybox awk holding 256 MiB of touched anonymous memory (a 256 MiB
//!   string of spaces) while its child sleeps. Anonymous memory, not a file in a
//!   /dev/shm tmpfs: CRIU dumps an in-container tmpfs as a gzipped tar (`tar
//!   --gzip` of the whole mount), so 256 MiB there measures gzip, not the
//!   runtimes or CRIU's page dumping.
//!
//! Every iteration, for each runtime in turn (the order alternates): `run -d` a
//! fresh container and wait until it is ready; `checkpoint --image-path IMG
//! --work-path WORK` (fresh directories; the work directory gets CRIU's
//! `dump.log` and `stats-dump` for both runtimes: runc's default work directory
//! lives in its state dir and goes away with the container); `restore -d` from
//! IMG under a fresh id with its own work directory; check it runs; `delete
//! --force`. Measured:
//! - checkpoint wall: spawn..exit of the `checkpoint` command;
//! - CRIU's `freezing_time` and `frozen_time` from `stats-dump` (microseconds).
//!   CRIU freezes through the freezer cgroup it is given, seizes every task with
//!   ptrace, then *thaws the cgroup* (the tasks stay ptrace-stopped until the dump
//!   ends): freezing_time runs from CRIU's freeze to the end of seizing,
//!   frozen_time from there to the end of the dump. stasis freezes the cgroup
//!   itself before it starts CRIU, so CRIU finds it frozen and its freezing_time
//!   collapses, but neither counts the time stasis holds the container frozen
//!   before CRIU gets to it. So, what a thread of the bench polling every 0.5 ms
//!   saw:
//! - stopped (observed): the container's init frozen (`D`) or ptrace-stopped
//!   (`t`) until it was dead or gone: what the workload feels, for both runtimes;
//! - cgroup frozen (observed): its v1 `freezer.state` FREEZING/FROZEN until
//!   THAWED (CRIU thaws once it has seized the tasks) or gone;
//! - restore wall: spawn..exit of `restore -d` (the container is running then);
//! - outside CRIU: a wall time minus the span of CRIU's own log (`dump.log`,
//!   `restore.log`): what the runtime spends around CRIU (its own work, CRIU
//!   version checks, CRIU's exec before it opens its log);
//! - CRIU's `restore_time` from `stats-restore` and `pages_written` of the dump,
//!   for context.
//!
//! Environment:
//! - `BENCH_ITERS`: iterations per runtime and case (default 10 for idle, 5 for mem)
//! - `BENCH_WARMUP`: unmeasured iterations first (default 1)
//! - `BENCH_CASES`: `idle,mem` (default both)
//! - `BENCH_MEM_MIB`: memory the `mem` container holds (default 256)
//! - `STASIS_BIN`: the stasis binary (default `target/release/stasis`; required)
//! - `RUNC_BIN`: runc (default: PATH, /usr/sbin/runc, /usr/bin/runc)
//! - `BENCH_STASIS_CHECKPOINT_ARGS`, `BENCH_STASIS_RESTORE_ARGS`: extra flags for
//!   stasis's checkpoint / restore (whitespace-separated), for A/B experiments
//! - `BENCH_STATE_DIR`: where the `--root` directories go (default: /run when it is
//!   tmpfs, else the temp dir)
//! - `BENCH_IMAGE_DIR`: where image and work directories go (default: the temp
//!   dir); each is removed as soon as its iteration is done
//! - `BENCH_RUN_TMPFS=1`: run in a private mount namespace with a fresh tmpfs on
//!   /run, as on production hosts, when the host's /run is not tmpfs: CRIU keeps
//!   its kernel probe cache (`/run/criu.kdat`) only on tmpfs, and without it
//!   every CRIU run probes the kernel first (tens of ms). State roots go there too.
//! - `BENCH_STRICT=1`: exit non-zero when a goal is missed
//!
//! Goals (from the issue): frozen time <= 0.1x runc's, checkpoint wall <= 0.5x
//! runc's, restore wall <= 0.9x runc's (ratios of medians). Every container is
//! force-deleted and every directory removed at the end, also when a step fails;
//! a failed iteration's logs are copied to `$TMPDIR/stasis-bench-cr-failed-ID`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{
    build_bundle, cgroup_path, env_num, env_opt, exit_code, find_bin, is_root, is_tmpfs,
    leftover_containers, median, min, proc_state, ratio, stasis_bin, state_base, temp_dir_in,
    warn_if_stale,
};

const DEFAULT_WARMUP: usize = 1;
const DEFAULT_MEM_MIB: u64 = 256;

// ---------------------------------------------------------------------------
// Cases

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Idle,
    Mem,
}

impl Case {
    fn key(self) -> &'static str {
        match self {
            Case::Idle => "idle",
            Case::Mem => "mem",
        }
    }

    fn default_iters(self) -> usize {
        match self {
            Case::Idle => 10,
            Case::Mem => 5,
        }
    }

    fn title(self, mib: u64) -> String {
        match self {
            Case::Idle => "idle busybox (`sleep 3600`)".into(),
            Case::Mem => format!("busybox holding {mib} MiB of touched anonymous memory"),
        }
    }

    fn short(self, mib: u64) -> String {
        match self {
            Case::Idle => "idle".into(),
            Case::Mem => format!("{mib} MiB"),
        }
    }

    /// The container's command.
    fn args(self, mib: u64) -> Vec<String> {
        match self {
            Case::Idle => vec!["sleep".into(), "3600".into()],
            // awk (the container's init) keeps a MIB-sized string of spaces; its
            // child marks readiness and sleeps.
            Case::Mem => {
                let bytes = mib * 1024 * 1024;
                vec![
                    "awk".into(),
                    format!(
                        "BEGIN {{ s = sprintf(\"%{bytes}s\", \"\"); \
                         if (length(s) != {bytes}) exit 1; \
                         system(\"touch /tmp/ready; exec sleep 3600\") }}"
                    ),
                ]
            }
        }
    }

    /// How long a fresh container may take to become ready.
    fn ready_timeout(self) -> Duration {
        match self {
            Case::Idle => Duration::from_secs(20),
            Case::Mem => Duration::from_secs(180),
        }
    }
}

// ---------------------------------------------------------------------------
// Runtimes and cleanup

struct Runtime {
    name: &'static str,
    bin: PathBuf,
    root: PathBuf,
    checkpoint_args: Vec<String>,
    restore_args: Vec<String>,
    /// Ids this runtime was asked to create; each is force-deleted at the end.
    ids: Vec<String>,
}

impl Runtime {
    fn command(&self, log: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).arg("--log").arg(log);
        c
    }

    fn delete(&self, id: &str) -> Result<(), String> {
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{} delete --force {id}: {e}", self.name))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} delete --force {id}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// `delete --force` of every id used that still exists, and of anything else
    /// left in the root.
    fn cleanup(&mut self) {
        for id in leftover_containers(&self.root, std::mem::take(&mut self.ids)) {
            if let Err(e) = self.delete(&id) {
                eprintln!("cr: warning: {e}");
            }
        }
    }
}

/// Force-deletes every container of every runtime when dropped, so an early
/// return or a panic (with unwinding) still cleans up. Declared after the
/// temporary directories, so it is dropped (and containers go) before them.
struct Cleanup(Vec<Runtime>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for rt in &mut self.0 {
            rt.cleanup();
        }
    }
}

/// Removes one iteration's directory (images can be hundreds of MiB) when dropped.
struct IterDir(PathBuf);

impl Drop for IterDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// CRIU statistics

/// What the report uses of CRIU's `stats-dump` (times in microseconds).
#[derive(Default, Debug, Clone, Copy)]
struct DumpStats {
    freezing_us: u64,
    frozen_us: u64,
    memdump_us: u64,
    memwrite_us: u64,
    pages_written: u64,
}

/// What the report uses of CRIU's `stats-restore` (microseconds).
#[derive(Default, Debug, Clone, Copy)]
struct RestoreStats {
    forking_us: u64,
    restore_us: u64,
}

/// The (name, value) pairs of the CRIU stats image at `path`, read by stasis's
/// own reader; `kind` is `dump` or `restore`, and `required` a field CRIU
/// always writes for that kind (so a wrong or truncated image is an error).
fn criu_stats(path: &Path, kind: &str, required: &str) -> Result<Vec<(&'static str, u64)>, String> {
    let stats = stasis::criu::read_stats(path)
        .ok_or_else(|| format!("{}: missing, or not a CRIU stats image", path.display()))?;
    if !stats.iter().any(|(k, _)| *k == required) {
        return Err(format!(
            "{}: no {kind} statistics (`{required}`) in it",
            path.display()
        ));
    }
    Ok(stats)
}

/// The value of `name` among `stats`; 0 when CRIU left it out.
fn stat(stats: &[(&str, u64)], name: &str) -> u64 {
    stats
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(0, |(_, v)| *v)
}

fn read_dump_stats(path: &Path) -> Result<DumpStats, String> {
    let s = criu_stats(path, "dump", "frozen_time")?;
    Ok(DumpStats {
        freezing_us: stat(&s, "freezing_time"),
        frozen_us: stat(&s, "frozen_time"),
        memdump_us: stat(&s, "memdump_time"),
        memwrite_us: stat(&s, "memwrite_time"),
        pages_written: stat(&s, "pages_written"),
    })
}

fn read_restore_stats(path: &Path) -> Result<RestoreStats, String> {
    let s = criu_stats(path, "restore", "restore_time")?;
    Ok(RestoreStats {
        forking_us: stat(&s, "forking_time"),
        restore_us: stat(&s, "restore_time"),
    })
}

// ---------------------------------------------------------------------------
// Watching the container during the checkpoint

/// The v1 freezer cgroup directory of `pid`, if the host has a v1 freezer.
fn freezer_dir(pid: i32) -> Option<PathBuf> {
    if !Path::new("/sys/fs/cgroup/freezer").is_dir() {
        return None;
    }
    cgroup_path(pid, Some("freezer"))
}

/// What a thread polling every 0.5 ms saw during a checkpoint.
#[derive(Default, Clone, Copy)]
struct Watched {
    /// The container's init not running its own code: from the first sample
    /// where it was frozen (`D`) or ptrace-stopped (`t`, `T`) to the first where
    /// it was dead or gone.
    stopped: Option<Duration>,
    /// `freezer.state` FREEZING or FROZEN until THAWED or the cgroup was gone.
    frozen: Option<Duration>,
}

/// Polls the container's init and its freezer cgroup on a thread while the
/// checkpoint command runs.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Watched>,
}

impl Watch {
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let freezer = freezer_dir(pid).map(|d| d.join("freezer.state"));
        let thread = std::thread::spawn(move || {
            let mut out = Watched::default();
            let (mut stopped_at, mut frozen_at) = (None::<Instant>, None::<Instant>);
            let (mut stop_done, mut frozen_done) = (false, freezer.is_none());
            loop {
                let st = proc_state(pid);
                let fz = freezer
                    .as_ref()
                    .map(|p| fs::read_to_string(p).is_ok_and(|s| s.trim() != "THAWED"));
                let now = Instant::now();
                if !stop_done {
                    // Once stopped, the workload never runs again: CRIU's parasite
                    // code runs in it (`S`/`R` then), and the dump ends killing it.
                    let halted = matches!(st, Some(b'D' | b't' | b'T'));
                    let dead = matches!(st, None | Some(b'Z' | b'X'));
                    match stopped_at {
                        None if halted => stopped_at = Some(now),
                        Some(t) if dead => {
                            out.stopped = Some(now - t);
                            stop_done = true;
                        }
                        _ => {}
                    }
                }
                if !frozen_done {
                    match (frozen_at, fz) {
                        (None, Some(true)) => frozen_at = Some(now),
                        (Some(t), Some(false)) => {
                            out.frozen = Some(now - t);
                            frozen_done = true;
                        }
                        _ => {}
                    }
                }
                if (stop_done && frozen_done) || flag.load(Ordering::Relaxed) {
                    return out;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        Self { stop, thread }
    }

    fn finish(self) -> Watched {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// One iteration

#[derive(Default, Clone)]
struct Sample {
    checkpoint_wall: Duration,
    dump: DumpStats,
    watched: Watched,
    /// Span of CRIU's dump.log / restore.log (first to last timestamp).
    dump_log: Option<Duration>,
    restore_wall: Duration,
    restore: RestoreStats,
    restore_log: Option<Duration>,
}

/// The last timestamp of a CRIU log (`(SS.uuuuuu) ...` lines, seconds since
/// CRIU set its log up): how long CRIU itself worked.
fn criu_log_span(log: &Path) -> Option<Duration> {
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('(')?;
            rest[..rest.find(')')?].trim().parse::<f64>().ok()
        })
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))))
        .map(Duration::from_secs_f64)
}

/// The last lines of a file, indented, for error messages.
fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
            let start = lines.len().saturating_sub(n);
            let mut s = String::new();
            for l in &lines[start..] {
                s.push_str("\n    ");
                s.push_str(l);
            }
            if s.is_empty() {
                format!(" ({} is empty)", path.display())
            } else {
                format!("\n  {}:{s}", path.display())
            }
        }
        Err(e) => format!(" ({}: {e})", path.display()),
    }
}

/// CRIU's `Error` lines of a log, for error messages.
fn criu_errors(log: &Path) -> String {
    let Ok(t) = fs::read_to_string(log) else {
        return String::new();
    };
    let mut s = String::new();
    for l in t.lines().filter(|l| l.contains("Error")).take(8) {
        s.push_str("\n    ");
        s.push_str(l.trim());
    }
    if s.is_empty() {
        s
    } else {
        format!("\n  {}:{s}", log.display())
    }
}

/// Runs a runtime command with stdin on /dev/null and stdout+stderr into `out`
/// (a file: no pipe a container could keep open). Returns the wall time.
fn timed(mut cmd: Command, out: &Path, what: &str) -> Result<Duration, String> {
    let f = fs::File::create(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let f2 = f
        .try_clone()
        .map_err(|e| format!("dup {}: {e}", out.display()))?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    let t0 = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{what}: cannot spawn: {e}"))?;
    let wall = t0.elapsed();
    if status.success() {
        Ok(wall)
    } else {
        Err(format!("{what} exited with {status}{}", tail(out, 12)))
    }
}

/// Runs `VERB HEAD.. --image-path IMG --work-path WORK EXTRA.. ID` of `rt`
/// (EXTRA: its extra flags for VERB, `checkpoint` or `restore`) through
/// `timed`, with `--log D/VERB.log` and the output in `D/VERB.out`; returns the
/// wall time. A failure quotes the errors of CRIU's log in WORK.
fn cr_step(
    rt: &Runtime,
    d: &Path,
    verb: &str,
    head: &[&OsStr],
    img: &Path,
    work: &Path,
    id: &str,
) -> Result<Duration, String> {
    let (extra, criu_log) = match verb {
        "checkpoint" => (&rt.checkpoint_args, "dump.log"),
        _ => (&rt.restore_args, "restore.log"),
    };
    let mut cmd = rt.command(&d.join(format!("{verb}.log")));
    cmd.arg(verb)
        .args(head)
        .arg("--image-path")
        .arg(img)
        .arg("--work-path")
        .arg(work)
        .args(extra)
        .arg(id);
    let what = format!("{} {verb} {id}", rt.name);
    timed(cmd, &d.join(format!("{verb}.out")), &what)
        .map_err(|e| e + &criu_errors(&work.join(criu_log)))
}

fn read_pid(path: &Path) -> Result<i32, String> {
    fs::read_to_string(path)
        .map_err(|e| format!("read {}: {e}", path.display()))?
        .trim()
        .parse()
        .map_err(|_| format!("{}: not a pid", path.display()))
}

/// Waits until the container's init is the workload and the workload is ready.
fn wait_ready(case: Case, pid: i32, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = match case {
            // Before exec the init is still the runtime's (`runc init`, stasis's).
            Case::Idle => fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "sleep")
                .unwrap_or(false),
            Case::Mem => Path::new(&format!("/proc/{pid}/root/tmp/ready")).exists(),
        };
        if ready {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!("container init {pid} exited before it was ready"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "container init {pid} not ready after {}s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status_of(rt: &Runtime, id: &str) -> String {
    Command::new(&rt.bin)
        .arg("--root")
        .arg(&rt.root)
        .args(["state", id])
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

struct Ctx<'a> {
    case: Case,
    bundle: &'a Path,
    images: &'a Path,
    tag: u32,
    mib: u64,
}

/// Copies the files of `src` (recursively, except those over 16 MiB: memory
/// pages) to `dst`.
fn copy_small(src: &Path, dst: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let m = e.metadata()?;
        if m.is_dir() {
            copy_small(&from, &to)?;
        } else if m.is_file() && m.len() <= 16 << 20 {
            fs::copy(&from, &to)?;
        }
    }
    Ok(())
}

fn iterate(ctx: &Ctx, rt: &mut Runtime, i: usize) -> Result<Sample, String> {
    let id = format!("cr-{}-{}-{}-{i}", ctx.tag, ctx.case.key(), rt.name);
    let dir = IterDir(ctx.images.join(&id));
    iterate_in(ctx, rt, &id, &dir.0).map_err(|e| {
        // The iteration's directory goes with `dir`: keep its logs for a post-mortem.
        let keep = std::env::temp_dir().join(format!("stasis-bench-cr-failed-{id}"));
        match copy_small(&dir.0, &keep) {
            Ok(()) => format!(
                "{e}\n  (logs and small image files kept in {})",
                keep.display()
            ),
            Err(ce) => format!(
                "{e}\n  (could not keep the logs in {}: {ce})",
                keep.display()
            ),
        }
    })
}

fn iterate_in(ctx: &Ctx, rt: &mut Runtime, id: &str, d: &Path) -> Result<Sample, String> {
    let name = rt.name;
    let id = id.to_string();
    let rid = format!("{id}-r");
    rt.ids.push(id.clone());
    rt.ids.push(rid.clone());
    let img = d.join("img");
    let wdump = d.join("work-dump");
    let wrestore = d.join("work-restore");
    for p in [d, &wdump, &wrestore] {
        fs::create_dir_all(p).map_err(|e| format!("create {}: {e}", p.display()))?;
    }

    // run -d: the container inherits the runtime's stdio, so /dev/null (CRIU
    // cannot dump a host file as a descriptor); errors go to --log.
    let log = d.join("run.log");
    let mut cmd = rt.command(&log);
    cmd.arg("run")
        .arg("-d")
        .arg("-b")
        .arg(ctx.bundle)
        .arg("--pid-file")
        .arg(d.join("pid"))
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let st = cmd
        .status()
        .map_err(|e| format!("{name} run -d: cannot spawn: {e}"))?;
    if !st.success() {
        return Err(format!(
            "{name} run -d {id} exited with {st}{}",
            tail(&log, 12)
        ));
    }
    let pid = read_pid(&d.join("pid"))?;
    wait_ready(ctx.case, pid, ctx.case.ready_timeout()).map_err(|e| format!("{name} {id}: {e}"))?;

    // checkpoint
    let watch = Watch::start(pid);
    let ckpt = cr_step(rt, d, "checkpoint", &[], &img, &wdump, &id);
    let watched = watch.finish();
    let checkpoint_wall = ckpt?;
    let dump = read_dump_stats(&wdump.join("stats-dump")).map_err(|e| format!("{name}: {e}"))?;
    if ctx.case == Case::Mem && dump.pages_written * 4096 < ctx.mib * 1024 * 1024 {
        return Err(format!(
            "{name} checkpoint {id}: CRIU wrote only {} pages; the workload should hold {} MiB",
            dump.pages_written, ctx.mib
        ));
    }

    // restore
    let head = ["-d".as_ref(), "-b".as_ref(), ctx.bundle.as_os_str()];
    let restore_wall = cr_step(rt, d, "restore", &head, &img, &wrestore, &rid)?;
    let restore =
        read_restore_stats(&wrestore.join("stats-restore")).map_err(|e| format!("{name}: {e}"))?;
    let status = status_of(rt, &rid);
    if status != "running" {
        return Err(format!(
            "{name} restore {rid} returned, but the container is {status}"
        ));
    }
    rt.delete(&rid)?;
    Ok(Sample {
        checkpoint_wall,
        dump,
        watched,
        dump_log: criu_log_span(&wdump.join("dump.log")),
        restore_wall,
        restore,
        restore_log: criu_log_span(&wrestore.join("restore.log")),
    })
}

// ---------------------------------------------------------------------------
// Report

struct Metric {
    name: &'static str,
    unit: &'static str,
    /// Goal as the highest stasis/runc ratio of medians.
    goal: Option<f64>,
    get: fn(&Sample) -> Option<f64>,
}

const MS: f64 = 1e3;

/// A duration in milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * MS
}

/// CRIU's microseconds in milliseconds.
fn us_ms(us: u64) -> f64 {
    us as f64 / MS
}

const fn metric(
    name: &'static str,
    unit: &'static str,
    goal: Option<f64>,
    get: fn(&Sample) -> Option<f64>,
) -> Metric {
    Metric {
        name,
        unit,
        goal,
        get,
    }
}

const METRICS: &[Metric] = &[
    metric("checkpoint wall", "ms", Some(0.5), |s| {
        Some(ms(s.checkpoint_wall))
    }),
    metric("checkpoint outside CRIU", "ms", None, |s| {
        s.dump_log.map(|l| ms(s.checkpoint_wall.saturating_sub(l)))
    }),
    metric("CRIU freezing_time", "ms", None, |s| {
        Some(us_ms(s.dump.freezing_us))
    }),
    metric("CRIU frozen_time", "ms", Some(0.1), |s| {
        Some(us_ms(s.dump.frozen_us))
    }),
    metric("stopped (observed)", "ms", None, |s| {
        s.watched.stopped.map(ms)
    }),
    metric("cgroup frozen (observed)", "ms", None, |s| {
        s.watched.frozen.map(ms)
    }),
    metric("CRIU memdump+memwrite", "ms", None, |s| {
        Some(us_ms(s.dump.memdump_us + s.dump.memwrite_us))
    }),
    metric("restore wall", "ms", Some(0.9), |s| {
        Some(ms(s.restore_wall))
    }),
    metric("restore outside CRIU", "ms", None, |s| {
        s.restore_log.map(|l| ms(s.restore_wall.saturating_sub(l)))
    }),
    metric("CRIU restore_time", "ms", None, |s| {
        Some(us_ms(s.restore.restore_us))
    }),
    metric("CRIU forking_time", "ms", None, |s| {
        Some(us_ms(s.restore.forking_us))
    }),
    metric("pages written", "", None, |s| {
        Some(s.dump.pages_written as f64)
    }),
];

fn values(samples: &[Sample], m: &Metric) -> Vec<f64> {
    samples.iter().filter_map(|s| (m.get)(s)).collect()
}

fn fmt(v: f64, unit: &str) -> String {
    if v.is_nan() {
        "n/a".into()
    } else if unit.is_empty() {
        format!("{v:.0}")
    } else if v < 10.0 {
        format!("{v:.2} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// One metric of one case, formatted: stasis min and median, runc min and
/// median, and stasis/runc of the medians; and that ratio (for the goal).
fn cells(r: &CaseResult, m: &Metric) -> ([String; 5], Option<f64>) {
    let (s, c) = (values(&r.stasis, m), values(&r.runc, m));
    let rt = ratio(median(&s), median(&c));
    let cells = [
        fmt(min(&s), m.unit),
        fmt(median(&s), m.unit),
        fmt(min(&c), m.unit),
        fmt(median(&c), m.unit),
        rt.map_or_else(|| "n/a".into(), |x| format!("{x:.2}x")),
    ];
    (cells, rt)
}

struct CaseResult {
    case: Case,
    iters: usize,
    stasis: Vec<Sample>,
    runc: Vec<Sample>,
}

/// Prints one case; returns the goals it missed.
fn report(r: &CaseResult, mib: u64) -> Vec<String> {
    let mut missed = Vec::new();
    println!();
    println!(
        "checkpoint/restore, {}: {} interleaved iterations per runtime",
        r.case.title(mib),
        r.iters
    );
    println!(
        "  {:<26} {:>10} {:>10}   {:>10} {:>10}   {:>11}  goal",
        "", "stasis min", "median", "runc min", "median", "stasis/runc"
    );
    for m in METRICS {
        let ([s_min, s_med, c_min, c_med, vs], rt) = cells(r, m);
        let goal = match (m.goal, rt) {
            (Some(g), Some(x)) if x <= g => format!("<= {g}x: met"),
            (Some(g), Some(_)) => {
                missed.push(format!("{}: {} (goal <= {g}x)", r.case.short(mib), m.name));
                format!("<= {g}x: MISSED")
            }
            (Some(g), None) => format!("<= {g}x: n/a"),
            (None, _) => String::new(),
        };
        println!(
            "  {:<26} {s_min:>10} {s_med:>10}   {c_min:>10} {c_med:>10}   {vs:>11}  {goal}",
            m.name
        );
    }
    missed
}

fn markdown(results: &[CaseResult], mib: u64) {
    println!();
    println!("| case | metric | stasis min | stasis median | runc min | runc median | stasis/runc (medians) | goal |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for r in results {
        for m in METRICS {
            let (row, rt) = cells(r, m);
            let goal = match (m.goal, rt) {
                (Some(g), Some(x)) => {
                    format!("<= {g}x {}", if x <= g { "met" } else { "**missed**" })
                }
                (Some(g), None) => format!("<= {g}x"),
                (None, _) => String::new(),
            };
            println!(
                "| {} | {} | {} | {goal} |",
                r.case.short(mib),
                m.name,
                row.join(" | ")
            );
        }
    }
    println!();
    let iters: Vec<String> = results
        .iter()
        .map(|r| format!("{} {}", r.case.short(mib), r.iters))
        .collect();
    println!(
        "(`cargo bench --bench cr`: `run -d`, then `checkpoint --image-path --work-path` and \
         `restore -d` under a new id, stasis and runc alternately, iterations: {}; wall = spawn..exit \
         of the command; CRIU times from `stats-dump`/`stats-restore`; observed = polled every 0.5 ms: \
         stopped = the container's init frozen or ptrace-stopped until dead, cgroup frozen = \
         freezer.state FREEZING/FROZEN; n/a = never seen, i.e. shorter than a poll.)",
        iters.join(", ")
    );
}

// ---------------------------------------------------------------------------
// Setup

fn env_args(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn criu_version() -> Option<String> {
    let out = Command::new("criu").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
}

/// Moves the bench (still single-threaded) into a private mount namespace with a
/// fresh tmpfs on /run; the runtimes and CRIU it starts inherit it.
fn private_run_tmpfs() -> Result<(), String> {
    use std::ffi::CString;
    let err = |what: &str| {
        format!(
            "BENCH_RUN_TMPFS: {what}: {}",
            std::io::Error::last_os_error()
        )
    };
    let (root, run, tmpfs, opts) = (
        CString::new("/").unwrap(),
        CString::new("/run").unwrap(),
        CString::new("tmpfs").unwrap(),
        CString::new("mode=755,size=64m").unwrap(),
    );
    // SAFETY: plain syscalls on valid C strings; no other thread exists yet.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(err("unshare(CLONE_NEWNS)"));
        }
        let none = std::ptr::null();
        if libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(err("make / private"));
        }
        if libc::mount(
            tmpfs.as_ptr(),
            run.as_ptr(),
            tmpfs.as_ptr(),
            0,
            opts.as_ptr().cast(),
        ) != 0
        {
            return Err(err("mount tmpfs on /run"));
        }
    }
    Ok(())
}

fn bench() -> Result<bool, String> {
    if !is_root() {
        println!("cr: skipped: checkpoint/restore needs root (run the bench as root)");
        return Ok(true);
    }
    if std::env::var("BENCH_RUN_TMPFS").as_deref() == Ok("1") {
        private_run_tmpfs()?;
        println!("cr: running in a private mount namespace with a tmpfs on /run");
    } else if !is_tmpfs(Path::new("/run")) {
        println!(
            "cr: note: /run is not tmpfs, so CRIU cannot keep its kernel probe cache \
             (/run/criu.kdat) and probes the kernel on every run; BENCH_RUN_TMPFS=1 runs \
             with a private tmpfs on /run, as on production hosts"
        );
    }
    let Some(runc) = find_bin("RUNC_BIN", "runc", &["/usr/sbin/runc", "/usr/bin/runc"]) else {
        println!("cr: skipped: runc is not installed (looked in PATH and /usr/sbin); install it or set RUNC_BIN");
        return Ok(true);
    };
    let Some(criu) = criu_version() else {
        println!("cr: skipped: no `criu` on PATH (scripts/setup builds CRIU 4.2.1)");
        return Ok(true);
    };
    let stasis = stasis_bin()?;
    warn_if_stale("cr", &stasis);
    let iters = env_opt::<usize>("BENCH_ITERS")?;
    if iters == Some(0) {
        return Err("BENCH_ITERS must be at least 1".into());
    }
    let warmup = env_num("BENCH_WARMUP", DEFAULT_WARMUP)?;
    let mib = env_num("BENCH_MEM_MIB", DEFAULT_MEM_MIB)?;
    let cases: Vec<Case> = match std::env::var("BENCH_CASES") {
        Ok(v) => v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "idle" => Ok(Case::Idle),
                "mem" => Ok(Case::Mem),
                other => Err(format!("BENCH_CASES: unknown case {other:?} (idle, mem)")),
            })
            .collect::<Result<_, _>>()?,
        Err(_) => vec![Case::Idle, Case::Mem],
    };

    let tmp = temp_dir_in(&std::env::temp_dir(), "stasis-bench-cr-")?;
    let state = temp_dir_in(&state_base(tmp.path()), "stasis-bench-cr-state-")?;
    let images_base = std::env::var_os("BENCH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let images = temp_dir_in(&images_base, "stasis-bench-cr-images-")?;

    println!("cr: stasis {}", stasis.display());
    println!("cr: runc   {}", runc.display());
    println!("cr: criu   {criu}");
    println!("cr: state roots in {}", state.path().display());
    println!("cr: images in {}", images.path().display());

    // Declared after the directories: dropped first, so containers go before them.
    let mut guard = Cleanup(vec![
        Runtime {
            name: "stasis",
            bin: stasis,
            root: state.path().join("stasis"),
            checkpoint_args: env_args("BENCH_STASIS_CHECKPOINT_ARGS"),
            restore_args: env_args("BENCH_STASIS_RESTORE_ARGS"),
            ids: Vec::new(),
        },
        Runtime {
            name: "runc",
            bin: runc,
            root: state.path().join("runc"),
            checkpoint_args: Vec::new(),
            restore_args: Vec::new(),
            ids: Vec::new(),
        },
    ]);
    for rt in &guard.0 {
        if !rt.checkpoint_args.is_empty() || !rt.restore_args.is_empty() {
            println!(
                "cr: {} extra flags: checkpoint {:?}, restore {:?}",
                rt.name, rt.checkpoint_args, rt.restore_args
            );
        }
    }

    let mut results = Vec::new();
    for &case in &cases {
        let n = iters.unwrap_or(case.default_iters());
        let bundle = tmp.path().join(format!("bundle-{}", case.key()));
        build_bundle("busybox", &bundle, &case.args(mib))?;
        let ctx = Ctx {
            case,
            bundle: &bundle,
            images: images.path(),
            tag: std::process::id(),
            mib,
        };
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for i in 0..warmup + n {
            for k in 0..2 {
                // Alternate who goes first.
                let which = (i + k) % 2;
                let rt = &mut guard.0[which];
                let t0 = Instant::now();
                let s = iterate(&ctx, rt, i)?;
                let label = if i < warmup { "warmup" } else { "iter" };
                eprintln!(
                    "cr: {} {label} {i} {:<6} checkpoint {:>8.1} ms (CRIU frozen {:>7.1} ms, stopped {}) restore {:>8.1} ms  [{:.1} s]",
                    case.key(),
                    rt.name,
                    ms(s.checkpoint_wall),
                    us_ms(s.dump.frozen_us),
                    s.watched
                        .stopped
                        .map(|w| format!("{:.1} ms", ms(w)))
                        .unwrap_or_else(|| "n/a".into()),
                    ms(s.restore_wall),
                    t0.elapsed().as_secs_f64()
                );
                if i >= warmup {
                    samples[which].push(s);
                }
            }
        }
        let [stasis_s, runc_s] = samples;
        results.push(CaseResult {
            case,
            iters: n,
            stasis: stasis_s,
            runc: runc_s,
        });
    }

    let mut missed = Vec::new();
    for r in &results {
        missed.extend(report(r, mib));
    }
    markdown(&results, mib);
    if !missed.is_empty() {
        println!();
        println!("cr: goals missed: {}", missed.join("; "));
    }

    drop(guard);
    for d in [images, state, tmp] {
        let p = d.path().to_path_buf();
        d.close()
            .map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
    }
    Ok(missed.is_empty())
}

fn main() -> ExitCode {
    exit_code("cr", bench())
}
