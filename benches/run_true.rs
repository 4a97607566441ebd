//! `run` of a busybox `/bin/true` container: stasis against runc (and crun when it is
//! installed), interleaved, foreground, stdio on /dev/null.
//!
//!     cargo build --release && cargo bench --bench run_true
//!
//! Environment:
//! - `BENCH_ITERS`: measured runs per runtime (default 40; 30 or more recommended)
//! - `BENCH_WARMUP`: unmeasured runs per runtime first (default 3)
//! - `STASIS_BIN`: the stasis binary (default `target/release/stasis`)
//! - `RUNC_BIN`, `CRUN_BIN`: override where runc / crun are looked up
//! - `BENCH_CRUN=0`: leave crun out even when it is installed
//! - `BENCH_EXTRA=name=/path,...`: more binaries to interleave (A/B of stasis builds)
//! - `BENCH_STATE_DIR`: where the `--root` directories go (default: under /run when
//!   it is tmpfs, as in production; else next to the bundle, on disk)
//!
//! Wall time is measured around spawn..wait of the runtime command. CPU time is
//! user+sys of everything the runtime and its own waited-for children used (the
//! container init included: every runtime here reaps it), read as the delta of
//! `getrusage(RUSAGE_CHILDREN)` around each run. The bench is a child subreaper and
//! waits for any process a runtime leaves behind, so detached helpers count too. Every container is deleted with
//! `delete --force` at the end, also when a run fails.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{
    build_bundle, env_num, exit_code, find_bin, is_executable, is_root, leftover_containers,
    median, min, ratio, stasis_bin, state_base, temp_dir_in, warn_if_stale,
};

const DEFAULT_ITERS: usize = 40;
const DEFAULT_WARMUP: usize = 3;

struct Runtime {
    name: String,
    bin: PathBuf,
    /// Mount namespace to run in (crun on a hybrid cgroup host, see `probe_crun`).
    mnt_ns: Option<Arc<OwnedFd>>,
    root: PathBuf,
    /// Ids this runtime was asked to create; each is force-deleted at the end.
    ids: Vec<String>,
    wall: Vec<Duration>,
    /// Processes the runtime left running after it exited (reaped by us).
    helpers: usize,
    /// Runs started, warm-up included.
    runs: usize,
    cpu: Vec<Duration>,
}

impl Runtime {
    fn new(name: &str, bin: PathBuf, state_dir: &Path, index: usize) -> Self {
        Self {
            name: name.to_string(),
            bin,
            mnt_ns: None,
            root: state_dir.join(format!("root-{index}")),
            ids: Vec::new(),
            wall: Vec::new(),
            cpu: Vec::new(),
            helpers: 0,
            runs: 0,
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        // Every runtime is started the same way (fork, then exec), so a `pre_exec`
        // for one of them does not make it pay for a different spawn path.
        let ns = self.mnt_ns.clone();
        // SAFETY: the closure makes one raw syscall (async-signal-safe) and
        // allocates nothing.
        unsafe {
            c.pre_exec(move || {
                if let Some(fd) = &ns {
                    if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        c
    }

    /// One foreground `run`; returns (wall, cpu) or a description of the failure.
    fn run_once(&mut self, bundle: &Path, id: String) -> Result<(Duration, Duration), String> {
        self.ids.push(id.clone());
        self.runs += 1;
        let mut cmd = self.command();
        cmd.arg("run")
            .arg("-b")
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let cpu0 = children_cpu();
        let t0 = Instant::now();
        let status = cmd
            .status()
            .map_err(|e| format!("{}: cannot spawn {}: {e}", self.name, self.bin.display()))?;
        let wall = t0.elapsed();
        // Detached helpers the runtime left behind were re-parented to us (we are
        // a child subreaper): wait for them too, so their CPU counts.
        self.helpers += reap_orphans(Duration::from_secs(5));
        let cpu = children_cpu().saturating_sub(cpu0);
        if status.success() {
            return Ok((wall, cpu));
        }
        // Run it again with stderr captured, so the failure explains itself.
        let retry = format!("{id}-diag");
        self.ids.push(retry.clone());
        let out = self
            .command()
            .arg("run")
            .arg("-b")
            .arg(bundle)
            .arg(&retry)
            .stdin(Stdio::null())
            .output();
        let detail = match out {
            Ok(o) => format!(
                "a second run exited with {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("a second run could not start: {e}"),
        };
        Err(format!(
            "{} run {id} exited with {status}; {detail}",
            self.name
        ))
    }

    /// `delete --force` of every id used, then of anything else left in the root.
    fn cleanup(&mut self) {
        // A foreground run deletes its container; only leftovers need the call.
        for id in leftover_containers(&self.root, std::mem::take(&mut self.ids)) {
            let r = self
                .command()
                .args(["delete", "--force", &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output();
            match r {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "run_true: warning: {} delete --force {id}: {}",
                    self.name,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("run_true: warning: {} delete --force {id}: {e}", self.name),
            }
        }
    }
}

/// Force-deletes every container of every runtime when dropped, so an early
/// return or a panic (with unwinding) still cleans up.
struct Cleanup(Vec<Runtime>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for rt in &mut self.0 {
            rt.cleanup();
        }
    }
}

/// Reaps descendants re-parented to this process (a child subreaper) until none
/// is left or `limit` passes; returns how many were reaped.
fn reap_orphans(limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    let mut n = 0;
    loop {
        // SAFETY: waitpid with a null status pointer reaps any child of ours.
        let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if pid > 0 {
            n += 1;
            continue;
        }
        if pid < 0 || Instant::now() >= deadline {
            // ECHILD: nothing left. A timeout leaves a helper running; its CPU
            // then lands on a later run, so say so.
            if pid == 0 {
                eprintln!("run_true: warning: a runtime left a process running for over {limit:?}");
            }
            return n;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// user+sys of the waited-for children of this process, so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes into the zeroed struct we pass it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid `who` and a valid pointer to a rusage struct.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `BENCH_EXTRA=name=/path/bin,...`: more runc-compatible binaries to measure
/// alongside (e.g. a stasis built with other settings, for an A/B comparison).
fn extra_bins() -> Result<Vec<(String, PathBuf)>, String> {
    let Ok(v) = std::env::var("BENCH_EXTRA") else {
        return Ok(Vec::new());
    };
    v.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (name, path) = item
                .split_once('=')
                .ok_or_else(|| format!("BENCH_EXTRA item {item:?}: expected NAME=PATH"))?;
            let path = PathBuf::from(path.trim());
            if !is_executable(&path) {
                return Err(format!(
                    "BENCH_EXTRA {name}: {} is not executable",
                    path.display()
                ));
            }
            Ok((name.trim().to_string(), path))
        })
        .collect()
}

/// Milliseconds.
struct Summary {
    min_wall: f64,
    med_wall: f64,
    min_cpu: f64,
    med_cpu: f64,
}

fn summary(rt: &Runtime) -> Summary {
    let ms = |v: &[Duration]| -> Vec<f64> { v.iter().map(|d| d.as_secs_f64() * 1e3).collect() };
    let (wall, cpu) = (ms(&rt.wall), ms(&rt.cpu));
    Summary {
        min_wall: min(&wall),
        med_wall: median(&wall),
        min_cpu: min(&cpu),
        med_cpu: median(&cpu),
    }
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

/// `a` as a multiple of `b`.
fn times(a: f64, b: f64) -> String {
    ratio(a, b).map_or_else(|| "n/a".into(), |x| format!("{x:.2}x"))
}

fn report(runtimes: &[Runtime], iters: usize) {
    let sums: Vec<Summary> = runtimes.iter().map(summary).collect();
    let runc = runtimes
        .iter()
        .position(|r| r.name == "runc")
        .map(|i| &sums[i]);
    println!();
    println!("run of busybox /bin/true, {iters} interleaved runs per runtime:");
    for (rt, s) in runtimes.iter().zip(&sums) {
        println!(
            "  {:<7} wall min {:>9}  median {:>9}   cpu min {:>9}  median {:>9}",
            rt.name,
            ms(s.min_wall),
            ms(s.med_wall),
            ms(s.min_cpu),
            ms(s.med_cpu)
        );
    }
    if let Some(r) = runc {
        for (rt, s) in runtimes.iter().zip(&sums) {
            if rt.name != "runc" {
                println!(
                    "  {}/runc: median wall {}, median cpu {}",
                    rt.name,
                    times(s.med_wall, r.med_wall),
                    times(s.med_cpu, r.med_cpu)
                );
            }
        }
    }
    println!();
    println!(
        "| runtime | wall min | wall median | CPU min | CPU median | wall vs runc | CPU vs runc |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (rt, s) in runtimes.iter().zip(&sums) {
        let (rw, rc) = match runc {
            Some(r) => (times(s.med_wall, r.med_wall), times(s.med_cpu, r.med_cpu)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            rt.name,
            ms(s.min_wall),
            ms(s.med_wall),
            ms(s.min_cpu),
            ms(s.med_cpu),
            rw,
            rc
        );
    }
    for rt in runtimes.iter().filter(|r| r.helpers > 0) {
        println!();
        println!(
            "{}: left {} detached helper process(es) behind in {} runs; the bench waited for them and counts their CPU.",
            rt.name, rt.helpers, rt.runs
        );
    }
    if runtimes.iter().any(|r| r.name == "crun*") {
        println!();
        println!("crun*: crun with the cgroup2 `unified` mount hidden (it refuses hybrid cgroup hosts); it still uses the v1 cgroups.");
    }
    println!();
    println!("(`cargo bench --bench run_true`: `run -b BUNDLE ID` in the foreground, stdio on /dev/null, {iters} runs each, interleaved; CPU = user+sys of the runtime and its children.)");
}

fn bench() -> Result<(), String> {
    let iters = env_num("BENCH_ITERS", DEFAULT_ITERS)?;
    let warmup = env_num("BENCH_WARMUP", DEFAULT_WARMUP)?;
    if iters == 0 {
        return Err("BENCH_ITERS must be at least 1".into());
    }
    if iters < 30 {
        eprintln!(
            "run_true: warning: BENCH_ITERS={iters}: medians of fewer than 30 runs are noisy"
        );
    }

    let Some(runc) = find_bin("RUNC_BIN", "runc", &["/usr/sbin/runc", "/usr/bin/runc"]) else {
        println!("run_true: skipped: runc is not installed (looked in PATH and /usr/sbin); install it or set RUNC_BIN");
        return Ok(());
    };
    if !is_root() {
        println!("run_true: skipped: containers need root here (run the bench as root)");
        return Ok(());
    }
    let stasis = stasis_bin()?;
    warn_if_stale("run_true", &stasis);
    // Detached helpers of a runtime become our children, so their CPU is counted.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        ));
    }
    let extra = extra_bins()?;
    let crun = if std::env::var("BENCH_CRUN").as_deref() == Ok("0") {
        None
    } else {
        find_bin("CRUN_BIN", "crun", &["/usr/sbin/crun", "/usr/bin/crun"])
    };

    let tmp = tempfile::Builder::new()
        .prefix("stasis-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let bundle = tmp.path().join("bundle");
    build_bundle("busybox", &bundle, &["/bin/true"])?;
    let state = temp_dir_in(&state_base(tmp.path()), "stasis-bench-state-")?;
    println!("run_true: state roots in {}", state.path().display());

    // Dropped before `tmp` (declared later), so containers go before their roots.
    let mut guard = Cleanup(vec![
        Runtime::new("stasis", stasis, state.path(), 0),
        Runtime::new("runc", runc, state.path(), 1),
    ]);
    for (name, bin) in extra {
        let i = guard.0.len();
        guard.0.push(Runtime::new(&name, bin, state.path(), i));
    }
    if let Some(c) = crun {
        let i = guard.0.len();
        guard.0.push(Runtime::new("crun", c, state.path(), i));
        if let Err(e) = probe_crun(guard.0.last_mut().unwrap(), &bundle) {
            println!("run_true: crun left out: {e}");
            guard.0.last_mut().unwrap().cleanup();
            guard.0.pop();
        }
    }
    for rt in &guard.0 {
        println!("run_true: {:<7} {}", rt.name, rt.bin.display());
    }
    let n = guard.0.len();
    let tag = std::process::id();
    for i in 0..warmup + iters {
        // Rotate who goes first, so no runtime always follows the same one.
        for k in 0..n {
            let rt = &mut guard.0[(i + k) % n];
            let id = format!("bench-{tag}-{}-{i}", (i + k) % n);
            let (wall, cpu) = rt.run_once(&bundle, id)?;
            if i >= warmup {
                rt.wall.push(wall);
                rt.cpu.push(cpu);
            }
        }
    }
    report(&guard.0, iters);
    drop(guard);
    state
        .close()
        .map_err(|e| format!("cannot remove the state directory: {e}"))?;
    tmp.close()
        .map_err(|e| format!("cannot remove the temporary directory: {e}"))?;
    Ok(())
}

/// crun is only a reference. It refuses cgroup v1+v2 hybrid hosts whose v2
/// hierarchy holds a controller ("cgroups in hybrid mode not supported"), whatever
/// its cgroup manager. There it runs in a private mount namespace without the
/// `/sys/fs/cgroup/unified` mount, so it sees (and uses) the v1 hierarchies like
/// runc and stasis do here, and is reported as `crun*`.
fn probe_crun(rt: &mut Runtime, bundle: &Path) -> Result<(), String> {
    let id = format!("bench-{}-crun-probe", std::process::id());
    let err = match rt.run_once(bundle, id.clone()) {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    if !err.contains("hybrid") {
        return Err(err);
    }
    let ns = mount_ns_without_cgroup2().map_err(|e| {
        format!("{err}; and no mount namespace without the cgroup2 mount could be made: {e}")
    })?;
    rt.mnt_ns = Some(Arc::new(ns));
    rt.name = "crun*".into();
    rt.run_once(bundle, format!("{id}-v1"))
        .map_err(|e| format!("{err}; and with cgroup v1 only: {e}"))?;
    println!(
        "run_true: crun* = crun with the cgroup2 `unified` mount hidden in a private mount \
         namespace (this host has hybrid cgroups, which crun refuses); it still creates \
         and removes its cgroups in the v1 hierarchies"
    );
    Ok(())
}

/// A new mount namespace, private, with `/sys/fs/cgroup/unified` unmounted, as an
/// fd for `setns`. The calling process (single-threaded) returns to its own
/// mount namespace and working directory.
fn mount_ns_without_cgroup2() -> std::io::Result<OwnedFd> {
    use std::ffi::CString;
    let check = |rc: libc::c_int, what: &str| {
        if rc == 0 {
            Ok(())
        } else {
            let e = std::io::Error::last_os_error();
            Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    };
    let cwd = std::env::current_dir()?;
    let own: OwnedFd = std::fs::File::open("/proc/self/ns/mnt")?.into();
    // SAFETY: plain syscalls on valid C strings and fds; the bench has one thread.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "unshare(CLONE_NEWNS)")?;
        let root = CString::new("/").unwrap();
        let unified = CString::new("/sys/fs/cgroup/unified").unwrap();
        let made = check(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "make / private",
        )
        .and_then(|_| {
            check(
                libc::umount2(unified.as_ptr(), libc::MNT_DETACH),
                "umount /sys/fs/cgroup/unified",
            )
        })
        .and_then(|_| Ok(OwnedFd::from(std::fs::File::open("/proc/self/ns/mnt")?)));
        let back = check(
            libc::setns(own.as_raw_fd(), libc::CLONE_NEWNS),
            "setns back",
        );
        std::env::set_current_dir(&cwd)?;
        back?;
        made
    }
}

fn main() -> ExitCode {
    exit_code("run_true", bench().map(|()| true))
}
