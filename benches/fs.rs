//! Filesystem capture and restore cost of snapshots, through the CLI only.
//!
//! Full size (the numbers; run it when the machine is quiet, ~5-10 min):
//!
//!     cargo build --release && cargo bench --bench fs
//!     # = STASIS_BENCH_DATA_MIB=1024 STASIS_BENCH_ROOTFS_MIB=100 STASIS_BENCH_RUNS=5 cargo bench --bench fs
//!
//! Quick smoke run:
//!
//!     STASIS_BENCH_DATA_MIB=64 STASIS_BENCH_ROOTFS_MIB=16 STASIS_BENCH_RUNS=2 cargo bench --bench fs
//!
//! The container: the busybox bundle of `images/busybox/build` with a writable
//! rootfs, ~`ROOTFS_MIB` of extra files under `/opt/extra` (sizes 4 KiB..1 MiB,
//! half text-like, half random) and a `DATA_MIB` data file `/data/file` of random
//! bytes (the worst case for compression). Its process is a shell that holds
//! `/data/file` open (read-only by default, see `STASIS_BENCH_HOLD`) and sleeps.
//!
//! Every run, on a fresh store (`--store`) and a fresh container:
//! 1. baseline: `checkpoint --tag base --leave-running --ignore-rootfs` (memory only);
//! 2. snapshot 1: `checkpoint --tag fs:1 --leave-running` (memory + filesystem);
//! 3. `CHANGE_PCT`% of the data file is rewritten from the host (random
//!    `CHANGE_KIB` regions, aligned to their size, spread over the file, fsynced);
//! 4. snapshot 2: `checkpoint --tag fs:2 --leave-running`;
//! 5. the original container is deleted; `restore --from fs:2 -d` (the first
//!    restore: materialises and verifies the snapshot into the store's cache),
//!    then the first/second read and write of the data file in that copy;
//! 6. `restore --from fs:2 -d` again (cached: the restore alone), deleted;
//! 7. `restore --from fs:2 -d --copies N --name-prefix P` (N = `COPIES`), and
//!    reads/writes through `stasis exec` in one of the copies; all deleted.
//!
//! Measured:
//! - frozen window observed: a thread polls the container init's state and its
//!   cgroup freezer every 0.5 ms; the window runs from the first sample where the
//!   init is frozen/ptrace-stopped (or the freezer is not THAWED) to the first
//!   where it runs again. "added by the capture" = snapshot minus the baseline's
//!   window of the same run; `fs_capture` is stasis's own timer
//!   (`timings_ms.fs_capture` of `snapshot inspect`), CRIU's `frozen_time` comes
//!   from `--print-stats --stats-format json` (it ends before the capture starts);
//! - bytes added to the store: sum of the sizes under `STORE/blobs` before/after
//!   snapshot 2 (and the `bytes_added` stasis reports), relative to the data file;
//! - restore walls: spawn..exit of `restore -d` (the copies are running then);
//! - first read / write, in-process through `/proc/PID/root/data/file` (the
//!   copy's overlay as the container sees it): read = open O_RDONLY, pread 4 KiB,
//!   close; write = open O_RDWR, pwrite 4 KiB, close (no fsync). The first
//!   write to a file of the overlay's lower layer copies the whole file up: that
//!   is what it measures. Before each "first" the file's pages are dropped from
//!   the page cache (syncfs + fadvise DONTNEED through the overlay, best effort;
//!   `STASIS_BENCH_EVICT=0` keeps them);
//! - the same through `stasis exec ID dd ...` in one of the N copies (wall of the
//!   exec, which includes exec's own cost: `exec ID true` is shown too).
//!
//! Environment:
//! - `STASIS_BENCH_DATA_MIB` (default 1024), `STASIS_BENCH_ROOTFS_MIB` (100)
//! - `STASIS_BENCH_RUNS` (5): runs; min and median are shown
//! - `STASIS_BENCH_CHANGE_PCT` (1), `STASIS_BENCH_CHANGE_KIB` (64; 4 for 4 KiB pages)
//! - `STASIS_BENCH_COPIES` (8)
//! - `STASIS_BENCH_HOLD`: `ro` (default), `rw` (like a database: CRIU reopens the
//!   file read-write at restore, so the copy-up is paid by the restore) or `none`
//! - `STASIS_BENCH_EVICT` (1), `STASIS_BENCH_DIR` (default /var/tmp: bundle,
//!   stores and state go there; not tmpfs, overlayfs needs a real filesystem)
//! - `STASIS_BIN` (default target/release/stasis), `BENCH_STRICT=1`: exit non-zero
//!   when a goal is missed
//!
//! Goals: snapshot 2 adds <= 3% of the data file to the store; restoring
//! 8 copies takes <= 3x the time of 1. Everything (containers, overlays, stores,
//! the bundle) is removed at the end, also when a step fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{
    bench_main, build_bundle, cgroup_path, env_num, is_root, min_median, proc_state, root_entries,
    round, run_logged, stasis_bin, unmount_leftovers, Rng,
};

const MIB: u64 = 1024 * 1024;
const MS: f64 = 1000.0;

// ---------------------------------------------------------------------------
// Settings

struct Settings {
    data_mib: u64,
    rootfs_mib: u64,
    runs: usize,
    change_pct: f64,
    change_kib: u64,
    copies: usize,
    hold: String,
    evict: bool,
    dir: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let s = Settings {
            data_mib: env_num("STASIS_BENCH_DATA_MIB", 1024)?,
            rootfs_mib: env_num("STASIS_BENCH_ROOTFS_MIB", 100)?,
            runs: env_num("STASIS_BENCH_RUNS", 5)?,
            change_pct: env_num("STASIS_BENCH_CHANGE_PCT", 1.0)?,
            change_kib: env_num("STASIS_BENCH_CHANGE_KIB", 64)?,
            copies: env_num("STASIS_BENCH_COPIES", 8)?,
            hold: std::env::var("STASIS_BENCH_HOLD").unwrap_or_else(|_| "ro".into()),
            evict: std::env::var("STASIS_BENCH_EVICT").as_deref() != Ok("0"),
            dir: std::env::var_os("STASIS_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp")),
        };
        if s.runs == 0 || s.copies == 0 || s.data_mib == 0 {
            return Err("STASIS_BENCH_RUNS, _COPIES and _DATA_MIB must be at least 1".into());
        }
        if s.change_kib == 0
            || !s.change_kib.is_multiple_of(4)
            || s.change_kib * 1024 > s.data_mib * MIB
        {
            return Err(
                "STASIS_BENCH_CHANGE_KIB must be a multiple of 4 below the data size".into(),
            );
        }
        if !["ro", "rw", "none"].contains(&s.hold.as_str()) {
            return Err(format!("STASIS_BENCH_HOLD={:?}: ro, rw or none", s.hold));
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------
// Data

const WORDS: &[&str] = &[
    "the", "of", "and", "config", "lib", "usr", "share", "error", "value", "return", "static",
    "int", "char", "void", "include", "define", "struct", "data", "index", "table",
];

/// ~`mib` MiB of files under `root/opt/extra`, sizes 4 KiB..1 MiB, half text.
fn make_extra(root: &Path, mib: u64) -> Result<(u64, u64), String> {
    let mut rng = Rng(0x5eed_0001);
    let (mut total, mut files) = (0u64, 0u64);
    let mut buf = vec![0u8; MIB as usize];
    while total < mib * MIB {
        let dir = root.join(format!("opt/extra/d{:03}", files / 64));
        if files.is_multiple_of(64) {
            fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        }
        let size = (4096u64 << (rng.next() % 9)).min(mib * MIB - total).max(1) as usize;
        let b = &mut buf[..size];
        if files % 2 == 0 {
            rng.fill_words(WORDS, 10, b);
        } else {
            rng.fill(b);
        }
        let p = dir.join(format!("f{files:05}"));
        fs::write(&p, &*b).map_err(|e| format!("write {}: {e}", p.display()))?;
        total += size as u64;
        files += 1;
    }
    Ok((files, total))
}

fn make_data(path: &Path, mib: u64) -> Result<(), String> {
    fs::create_dir_all(path.parent().unwrap()).map_err(|e| format!("mkdir: {e}"))?;
    let mut f = fs::File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut rng = Rng(0x5eed_0002);
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        rng.fill(&mut buf);
        f.write_all(&buf)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

/// Rewrites `pct`% of the file in random, distinct, size-aligned regions of
/// `region` bytes; returns the bytes written.
fn mutate(path: &Path, pct: f64, region: u64, seed: u64) -> Result<u64, String> {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let size = f.metadata().map_err(|e| format!("stat: {e}"))?.len();
    let slots = size / region;
    let want = (((size as f64) * pct / 100.0 / region as f64).ceil() as u64).clamp(1, slots);
    // `seed | 1` would give runs i and i+1 the same stream (and the same bytes
    // written over the shared bundle's data file): keep every seed distinct.
    let mut rng = Rng((seed << 1) | 1);
    let mut picked = BTreeSet::new();
    while (picked.len() as u64) < want {
        picked.insert(rng.next() % slots);
    }
    let mut buf = vec![0u8; region as usize];
    for slot in &picked {
        rng.fill(&mut buf);
        f.write_all_at(&buf, slot * region)
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    Ok(want * region)
}

fn tree_bytes(p: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------
// Running stasis

struct Stasis {
    bin: PathBuf,
    root: PathBuf,
    logs: PathBuf,
}

impl Stasis {
    fn cmd(&self, store: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root).arg("--store").arg(store);
        c
    }

    /// Runs `stasis ARGS` through `run_logged` (log: `last.log`); returns the
    /// wall time and the output.
    fn run(&self, store: &Path, args: &[&str]) -> Result<(Duration, String), String> {
        let what = format!("stasis {}", args.join(" "));
        run_logged(self.cmd(store), args, &what, &self.logs.join("last.log"))
    }

    fn pid(&self, store: &Path, id: &str) -> Result<i32, String> {
        let (_, out) = self.run(store, &["state", id])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).map_err(|e| format!("state {id}: {e}: {out}"))?;
        v["pid"]
            .as_i64()
            .filter(|p| *p > 0)
            .map(|p| p as i32)
            .ok_or_else(|| format!("state {id}: no pid: {out}"))
    }

    fn delete(&self, store: &Path, id: &str) {
        if let Err(e) = self.run(store, &["delete", "--force", id]) {
            eprintln!("fs: warning: {e}");
        }
    }

    /// Force-deletes every container in the root.
    fn delete_all(&self, store: &Path) {
        for name in root_entries(&self.root) {
            if self.root.join(&name).is_dir() {
                self.delete(store, &name);
            }
        }
    }
}

/// The last JSON object line of an output (`--print-stats --stats-format json`).
fn json_line(out: &str) -> serde_json::Value {
    out.lines()
        .rev()
        .find_map(|l| {
            l.trim()
                .starts_with('{')
                .then(|| serde_json::from_str(l.trim()).ok())
                .flatten()
        })
        .unwrap_or(serde_json::Value::Null)
}

// ---------------------------------------------------------------------------
// Watching the frozen window

/// v1 `freezer.state`, or v2 `cgroup.events` of the init's cgroup.
fn freezer_probe(pid: i32) -> Option<(PathBuf, bool)> {
    if Path::new("/sys/fs/cgroup/freezer").is_dir() {
        return cgroup_path(pid, Some("freezer")).map(|d| (d.join("freezer.state"), true));
    }
    cgroup_path(pid, None).map(|d| (d.join("cgroup.events"), false))
}

struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Option<Duration>>,
}

impl Watch {
    /// Polls until stopped; the window is first..last sample where the init was
    /// halted (cgroup frozen, or frozen/ptrace-stopped): CRIU's parasite runs in
    /// between (`S`/`R` samples), which is still frozen time for the workload.
    fn start(pid: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let probe = freezer_probe(pid);
        let thread = std::thread::spawn(move || {
            let mut span: Option<(Instant, Instant)> = None;
            while !flag.load(Ordering::Relaxed) {
                let frozen = probe.as_ref().is_some_and(|(p, v1)| {
                    fs::read_to_string(p).is_ok_and(|s| {
                        if *v1 {
                            s.trim() != "THAWED"
                        } else {
                            s.lines().any(|l| l.trim() == "frozen 1")
                        }
                    })
                });
                if frozen || matches!(proc_state(pid), Some(b'D' | b't' | b'T')) {
                    let now = Instant::now();
                    span = Some((span.map_or(now, |s| s.0), now));
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            span.map(|(a, b)| b - a)
        });
        Watch { stop, thread }
    }

    /// The window; call once the checkpoint command exited (the container was
    /// thawed before it did).
    fn finish(self) -> Option<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

// ---------------------------------------------------------------------------
// File access in a restored copy

const BLOCK: usize = 4096;

/// Drops the file's pages from the page cache (best effort, through the overlay).
fn evict(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = fs::File::open(path) {
        // SAFETY: plain syscalls on an open descriptor.
        unsafe {
            libc::syncfs(f.as_raw_fd());
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn timed_read(path: &Path, off: u64) -> Result<Duration, String> {
    let mut buf = vec![0u8; BLOCK];
    let t0 = Instant::now();
    let f = fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    f.read_exact_at(&mut buf, off)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    drop(f);
    Ok(t0.elapsed())
}

fn timed_write(path: &Path, off: u64) -> Result<Duration, String> {
    let buf = vec![0x5au8; BLOCK];
    let t0 = Instant::now();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {} read-write: {e}", path.display()))?;
    f.write_all_at(&buf, off)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    drop(f);
    Ok(t0.elapsed())
}

// ---------------------------------------------------------------------------
// Samples

/// One run's values, by metric name (ms, bytes or ratios).
type Sample = Vec<(&'static str, f64)>;

struct Metric {
    key: &'static str,
    label: &'static str,
    unit: Unit,
}

#[derive(Clone, Copy)]
enum Unit {
    Ms,
    Bytes,
    Pct,
    X,
}

const METRICS: &[Metric] = &[
    m(
        "frozen_base_ms",
        "frozen window, --ignore-rootfs (baseline)",
        Unit::Ms,
    ),
    m("frozen_s1_ms", "frozen window, snapshot 1", Unit::Ms),
    m(
        "frozen_s2_ms",
        "frozen window, snapshot 2 (1% changed)",
        Unit::Ms,
    ),
    m("added_s1_ms", "  added by capture, snapshot 1", Unit::Ms),
    m("added_s2_ms", "  added by capture, snapshot 2", Unit::Ms),
    m(
        "fs_capture_s1_ms",
        "fs_capture (stasis timer), snapshot 1",
        Unit::Ms,
    ),
    m(
        "fs_capture_s2_ms",
        "fs_capture (stasis timer), snapshot 2",
        Unit::Ms,
    ),
    m(
        "criu_frozen_base_ms",
        "CRIU frozen_time, baseline",
        Unit::Ms,
    ),
    m(
        "criu_frozen_s2_ms",
        "CRIU frozen_time, snapshot 2",
        Unit::Ms,
    ),
    m("ckpt_base_ms", "checkpoint wall, baseline", Unit::Ms),
    m("ckpt_s1_ms", "checkpoint wall, snapshot 1", Unit::Ms),
    m("ckpt_s2_ms", "checkpoint wall, snapshot 2", Unit::Ms),
    m("store_s1_bytes", "store after snapshot 1", Unit::Bytes),
    m(
        "added_s2_bytes",
        "store bytes added by snapshot 2",
        Unit::Bytes,
    ),
    m("added_s2_pct", "  / data file", Unit::Pct),
    m(
        "reported_s2_bytes",
        "bytes_added reported, snapshot 2",
        Unit::Bytes,
    ),
    m("restore_first_ms", "restore, first (materialise)", Unit::Ms),
    m("restore_1_ms", "restore 1 copy (cached)", Unit::Ms),
    m("restore_n_ms", "restore N copies (cached)", Unit::Ms),
    m("restore_n_over_1", "  N copies / 1 copy", Unit::X),
    m("read1_ms", "first read 4 KiB (/proc/PID/root)", Unit::Ms),
    m("read2_ms", "second read 4 KiB", Unit::Ms),
    m("write1_ms", "first write 4 KiB (copy-up)", Unit::Ms),
    m("write2_ms", "second write 4 KiB", Unit::Ms),
    m("exec_true_ms", "exec ID true", Unit::Ms),
    m("exec_read1_ms", "exec dd read 4 KiB, first", Unit::Ms),
    m("exec_read2_ms", "exec dd read 4 KiB, second", Unit::Ms),
    m("exec_write1_ms", "exec dd write 4 KiB, first", Unit::Ms),
    m("exec_write2_ms", "exec dd write 4 KiB, second", Unit::Ms),
];

const fn m(key: &'static str, label: &'static str, unit: Unit) -> Metric {
    Metric { key, label, unit }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * MS
}

fn fmt(v: f64, u: Unit) -> String {
    match u {
        Unit::Ms if v >= 10_000.0 => format!("{:.2} s", v / MS),
        Unit::Ms => format!("{v:.1} ms"),
        Unit::Bytes => format!("{:.2} MiB", v / MIB as f64),
        Unit::Pct => format!("{v:.2}%"),
        Unit::X => format!("{v:.2}x"),
    }
}

// ---------------------------------------------------------------------------
// One run

struct Ctx<'a> {
    s: &'a Settings,
    st: &'a Stasis,
    bundle: &'a Path,
    stores: &'a Path,
}

fn ckpt(
    c: &Ctx,
    store: &Path,
    id: &str,
    pid: i32,
    tag: &str,
    extra: &[&str],
) -> Result<(Duration, Option<Duration>, serde_json::Value), String> {
    let mut args = vec![
        "checkpoint",
        "--tag",
        tag,
        "--leave-running",
        "--print-stats",
        "--stats-format",
        "json",
    ];
    args.extend_from_slice(extra);
    args.push(id);
    let w = Watch::start(pid);
    let r = c.st.run(store, &args);
    let window = w.finish();
    let (wall, out) = r?;
    Ok((wall, window, json_line(&out)))
}

fn fs_capture_ms(c: &Ctx, store: &Path, tag: &str) -> Result<f64, String> {
    let (_, out) =
        c.st.run(store, &["snapshot", "inspect", "-f", "json", tag])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("inspect {tag}: {e}"))?;
    v["metadata"]["timings_ms"]["fs_capture"]
        .as_f64()
        .ok_or_else(|| format!("inspect {tag}: no metadata.timings_ms.fs_capture"))
}

fn wait_running(c: &Ctx, store: &Path, id: &str) -> Result<i32, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = c.st.pid(store, id)?;
        let ok = fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|s| s.trim() == "sh")
            && (c.s.hold == "none" || Path::new(&format!("/proc/{pid}/fd/3")).exists());
        if ok {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(format!("{id} (pid {pid}) not ready after 30 s"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn one_run(c: &Ctx, i: usize) -> Result<Sample, String> {
    let s = c.s;
    let mut out: Sample = Vec::new();
    let store = c.stores.join(format!("store-{i}"));
    let _guard = RunGuard {
        st: c.st,
        store: store.clone(),
    };
    let data_bytes = (s.data_mib * MIB) as f64;
    let id = format!("fsb-{i}");
    c.st.run(
        &store,
        &["run", "-d", "-b", c.bundle.to_str().unwrap(), &id],
    )?;
    let pid = wait_running(c, &store, &id)?;

    let (w0, f0, j0) = ckpt(c, &store, &id, pid, "base:v1", &["--ignore-rootfs"])?;
    let (w1, f1, j1) = ckpt(c, &store, &id, pid, "fs:1", &[])?;
    let s1_bytes = tree_bytes(&store.join("blobs"));
    let changed = mutate(
        &c.bundle.join("rootfs/data/file"),
        s.change_pct,
        s.change_kib * 1024,
        0x9e37_79b9 + i as u64,
    )?;
    let (w2, f2, j2) = ckpt(c, &store, &id, pid, "fs:2", &[])?;
    let s2_bytes = tree_bytes(&store.join("blobs"));
    let cap1 = fs_capture_ms(c, &store, "fs:1")?;
    let cap2 = fs_capture_ms(c, &store, "fs:2")?;
    let us = |j: &serde_json::Value, k: &str| j[k].as_f64().map(|v| v / MS);
    let win = |f: Option<Duration>| f.map(ms);
    let mut push = |k: &'static str, v: Option<f64>| {
        if let Some(v) = v {
            out.push((k, v));
        }
    };
    push("frozen_base_ms", win(f0));
    push("frozen_s1_ms", win(f1));
    push("frozen_s2_ms", win(f2));
    push("added_s1_ms", win(f1).zip(win(f0)).map(|(a, b)| a - b));
    push("added_s2_ms", win(f2).zip(win(f0)).map(|(a, b)| a - b));
    push("fs_capture_s1_ms", Some(cap1));
    push("fs_capture_s2_ms", Some(cap2));
    push("criu_frozen_base_ms", us(&j0, "frozen_time"));
    push("criu_frozen_s1_ms", us(&j1, "frozen_time"));
    push("criu_frozen_s2_ms", us(&j2, "frozen_time"));
    push("ckpt_base_ms", Some(ms(w0)));
    push("ckpt_s1_ms", Some(ms(w1)));
    push("ckpt_s2_ms", Some(ms(w2)));
    push("store_s1_bytes", Some(s1_bytes as f64));
    let added = s2_bytes.saturating_sub(s1_bytes) as f64;
    push("added_s2_bytes", Some(added));
    push("added_s2_pct", Some(added / data_bytes * 100.0));
    push("reported_s2_bytes", j2["bytes_added"].as_f64());
    eprintln!(
        "fs: run {i}: checkpoint base {:.0} ms, s1 {:.0} ms (capture {cap1:.0} ms), s2 {:.0} ms (capture {cap2:.0} ms); \
         frozen {} / {} / {}; changed {:.1} MiB, store +{:.2} MiB",
        ms(w0),
        ms(w1),
        ms(w2),
        fmt_opt(win(f0)),
        fmt_opt(win(f1)),
        fmt_opt(win(f2)),
        changed as f64 / MIB as f64,
        added / MIB as f64
    );
    c.st.delete(&store, &id);

    // The first restore materialises the snapshot; then first/second read and write.
    let r = format!("fsr-{i}");
    let (t_first, _) = c.st.run(&store, &["restore", "--from", "fs:2", "-d", &r])?;
    push("restore_first_ms", Some(ms(t_first)));
    let rpid = wait_running(c, &store, &r)?;
    let file = PathBuf::from(format!("/proc/{rpid}/root/data/file"));
    let blocks = s.data_mib * MIB / BLOCK as u64;
    let (roff, woff) = (blocks / 3 * BLOCK as u64, blocks / 3 * 2 * BLOCK as u64);
    if s.evict {
        evict(&file);
    }
    push("read1_ms", Some(ms(timed_read(&file, roff)?)));
    push("read2_ms", Some(ms(timed_read(&file, roff)?)));
    if s.evict {
        evict(&file);
    }
    let w1 = timed_write(&file, woff)?;
    push("write1_ms", Some(ms(w1)));
    push(
        "write2_ms",
        Some(ms(timed_write(&file, woff + BLOCK as u64)?)),
    );
    c.st.delete(&store, &r);

    let r1 = format!("fsq-{i}");
    let (t1, _) =
        c.st.run(&store, &["restore", "--from", "fs:2", "-d", &r1])?;
    push("restore_1_ms", Some(ms(t1)));
    wait_running(c, &store, &r1)?;
    c.st.delete(&store, &r1);

    let prefix = format!("fsp{i}");
    let n = s.copies.to_string();
    let (tn, _) = c.st.run(
        &store,
        &[
            "restore",
            "--from",
            "fs:2",
            "-d",
            "--copies",
            &n,
            "--name-prefix",
            &prefix,
        ],
    )?;
    push("restore_n_ms", Some(ms(tn)));
    push("restore_n_over_1", Some(ms(tn) / ms(t1)));
    let target = format!("{prefix}-{}", s.copies.min(2) - 1);
    let tpid = wait_running(c, &store, &target)?;
    for k in 0..s.copies {
        wait_running(c, &store, &format!("{prefix}-{k}"))?;
    }
    let tfile = PathBuf::from(format!("/proc/{tpid}/root/data/file"));
    let exec = |args: &[&str]| -> Result<f64, String> {
        let mut a = vec!["exec", target.as_str()];
        a.extend_from_slice(args);
        Ok(ms(c.st.run(&store, &a)?.0))
    };
    let mut base = f64::MAX;
    for _ in 0..3 {
        base = base.min(exec(&["true"])?);
    }
    push("exec_true_ms", Some(base));
    let (skip, seek) = (
        format!("skip={}", blocks / 3),
        format!("seek={}", blocks / 3 * 2),
    );
    let rd = [
        "dd",
        "if=/data/file",
        "of=/dev/null",
        "bs=4096",
        "count=1",
        skip.as_str(),
    ];
    let wr = [
        "dd",
        "if=/dev/zero",
        "of=/data/file",
        "bs=4096",
        "count=1",
        "conv=notrunc",
        seek.as_str(),
    ];
    if s.evict {
        evict(&tfile);
    }
    push("exec_read1_ms", Some(exec(&rd)?));
    push("exec_read2_ms", Some(exec(&rd)?));
    if s.evict {
        evict(&tfile);
    }
    push("exec_write1_ms", Some(exec(&wr)?));
    push("exec_write2_ms", Some(exec(&wr)?));
    let size = fs::metadata(&tfile).map(|m| m.len()).unwrap_or(0);
    if size != s.data_mib * MIB {
        return Err(format!(
            "after the writes, {} is {size} bytes",
            tfile.display()
        ));
    }
    eprintln!(
        "fs: run {i}: restore first {:.0} ms, 1 copy {:.0} ms, {} copies {:.0} ms; first write {:.1} ms, second {:.2} ms",
        ms(t_first),
        ms(t1),
        s.copies,
        ms(tn),
        ms(w1),
        out.iter().find(|(k, _)| *k == "write2_ms").map_or(0.0, |x| x.1)
    );
    for k in 0..s.copies {
        c.st.delete(&store, &format!("{prefix}-{k}"));
    }
    Ok(out)
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms"))
        .unwrap_or_else(|| "n/a".into())
}

/// Deletes the run's containers (their overlays sit on the store's cache), then
/// removes its store.
struct RunGuard<'a> {
    st: &'a Stasis,
    store: PathBuf,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        self.st.delete_all(&self.store);
        let _ = fs::remove_dir_all(&self.store);
    }
}

/// Deletes every container of the bench's root and lazily unmounts anything
/// left under the bench directory, then removes it.
struct Cleanup<'a> {
    st: &'a Stasis,
    dir: PathBuf,
    store: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.st.delete_all(&self.store);
        unmount_leftovers("fs", &self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// Setup and report

/// The busybox bundle: `sh` idling, holding /data/file open (`hold`: ro, rw or
/// none), on a writable rootfs.
fn build_fs_bundle(bundle: &Path, hold: &str) -> Result<(), String> {
    let open = match hold {
        "ro" => "exec 3</data/file; ",
        "rw" => "exec 3<>/data/file; ",
        _ => "",
    };
    let body = format!("{open}while :; do sleep 1; done");
    build_bundle("busybox", bundle, &["sh", "-c", &body])?;
    // A writable rootfs: the restored copies write to the data file.
    let cfg = bundle.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&fs::read(&cfg).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", cfg.display()))?;
    v["root"]["readonly"] = serde_json::Value::Bool(false);
    fs::write(&cfg, serde_json::to_vec_pretty(&v).unwrap()).map_err(|e| e.to_string())
}

fn bench() -> Result<bool, String> {
    if !is_root() {
        println!("fs: skipped: needs root");
        return Ok(true);
    }
    if Command::new("criu").arg("--version").output().is_err() {
        println!("fs: skipped: no `criu` on PATH (scripts/setup builds it)");
        return Ok(true);
    }
    let s = Settings::from_env()?;
    let bin = stasis_bin()?;
    let dir = tempfile::Builder::new()
        .prefix("stasis-bench-fs-")
        .tempdir_in(&s.dir)
        .map_err(|e| format!("temp dir in {}: {e}", s.dir.display()))?
        .keep();
    let st = Stasis {
        bin,
        root: dir.join("state"),
        logs: dir.clone(),
    };
    let stores = dir.join("stores");
    fs::create_dir_all(&stores).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup {
        st: &st,
        dir: dir.clone(),
        store: stores.join("none"),
    };
    let bundle = dir.join("bundle");
    println!(
        "fs: data file {} MiB, extra rootfs {} MiB, {} run(s), {}% changed in {} KiB regions, {} copies, hold {}, evict {}, in {}",
        s.data_mib,
        s.rootfs_mib,
        s.runs,
        s.change_pct,
        s.change_kib,
        s.copies,
        s.hold,
        s.evict,
        dir.display()
    );
    let t0 = Instant::now();
    build_fs_bundle(&bundle, &s.hold)?;
    let (files, bytes) = make_extra(&bundle.join("rootfs"), s.rootfs_mib)?;
    make_data(&bundle.join("rootfs/data/file"), s.data_mib)?;
    println!(
        "fs: bundle built in {:.1} s: {files} extra files ({:.1} MiB) + {} MiB data file; rootfs {:.1} MiB",
        t0.elapsed().as_secs_f64(),
        bytes as f64 / MIB as f64,
        s.data_mib,
        tree_bytes(&bundle.join("rootfs")) as f64 / MIB as f64
    );
    let c = Ctx {
        s: &s,
        st: &st,
        bundle: &bundle,
        stores: &stores,
    };
    let mut samples = Vec::new();
    for i in 0..s.runs {
        let t = Instant::now();
        let r = one_run(&c, i)?;
        eprintln!("fs: run {i} took {:.1} s", t.elapsed().as_secs_f64());
        samples.push(r);
    }
    Ok(report(&s, &samples))
}

fn report(s: &Settings, samples: &[Sample]) -> bool {
    let values = |k: &str| -> Vec<f64> {
        samples
            .iter()
            .filter_map(|r| r.iter().find(|(x, _)| *x == k).map(|x| x.1))
            .collect()
    };
    println!();
    println!(
        "fs: {} MiB data file, {}% changed ({} KiB regions), {} copies, {} run(s)",
        s.data_mib, s.change_pct, s.change_kib, s.copies, s.runs
    );
    println!("| metric | min | median |");
    println!("|---|---:|---:|");
    let mut json = serde_json::Map::new();
    for mt in METRICS {
        let label = mt
            .label
            .replace("N copies", &format!("{} copies", s.copies));
        match min_median(values(mt.key)) {
            Some((lo, med)) => {
                println!("| {label} | {} | {} |", fmt(lo, mt.unit), fmt(med, mt.unit));
                json.insert(
                    mt.key.into(),
                    serde_json::json!({"min": round(lo), "median": round(med)}),
                );
            }
            None => println!("| {label} | n/a | n/a |"),
        }
    }
    let med = |k: &str| min_median(values(k)).map(|x| x.1);
    let mut ok = true;
    let mut goals = serde_json::Map::new();
    println!();
    if let Some(p) = med("added_s2_pct") {
        let met = p <= 3.0;
        ok &= met;
        println!(
            "fs: goal: snapshot 2 adds <= 3% of the data file: {p:.2}% {}",
            if met { "met" } else { "MISSED" }
        );
        goals.insert("added_s2_le_3pct".into(), met.into());
    }
    if let Some(x) = med("restore_n_over_1") {
        let met = x <= 3.0;
        ok &= met;
        println!(
            "fs: goal: {} copies <= 3x the time of 1: {x:.2}x {}",
            s.copies,
            if met { "met" } else { "MISSED" }
        );
        goals.insert("restore_n_le_3x".into(), met.into());
    }
    let line = serde_json::json!({
        "bench": "fs",
        "data_mib": s.data_mib,
        "rootfs_mib": s.rootfs_mib,
        "change_pct": s.change_pct,
        "change_kib": s.change_kib,
        "copies": s.copies,
        "hold": s.hold,
        "runs": samples.len(),
        "metrics": json,
        "goals_met": goals,
    });
    println!("{line}");
    ok
}

fn main() -> ExitCode {
    bench_main("fs", bench)
}
