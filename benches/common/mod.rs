//! Helpers shared by the bench binaries that include this module (`#[path]`):
//! settings from the environment, statistics, the binaries under test (stasis,
//! runc), the bundles of `images/*/build`, host probes, running stasis with its
//! output in a log file, test data, cleanup of containers and mounts, and
//! `main`'s contract (`BENCH_STRICT=1` turns a missed goal into a failing exit
//! code).
//!
//! Every bench compiles its own copy of this module and uses a part of it.
#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

// ---------------------------------------------------------------------------
// Settings and statistics

/// `name` from the environment, parsed; `None` when unset or empty.
pub fn env_opt<T: std::str::FromStr>(name: &str) -> Result<Option<T>, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a valid number")),
        _ => Ok(None),
    }
}

/// `name` from the environment, parsed; `default` when unset or empty.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    Ok(env_opt(name)?.unwrap_or(default))
}

/// Minimum and (lower, for an even count) median.
pub fn min_median(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[0], v[(v.len() - 1) / 2]))
}

/// The median (the mean of the middle two for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The minimum; NaN when empty.
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::min)
}

/// `a / b` when both are finite and `b` is positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite() && b.is_finite()).then(|| a / b)
}

/// Two decimals, for the JSON lines.
pub fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

// ---------------------------------------------------------------------------
// Binaries and bundles

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The first executable among `env` (when set), `PATH` lookups of `name`, `fallbacks`.
pub fn find_bin(env: &str, name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(fallbacks.iter().map(PathBuf::from))
        .find(|p| is_executable(p))
}

/// The release build of stasis (`STASIS_BIN` overrides).
pub fn stasis_bin() -> Result<PathBuf, String> {
    let (bin, hint) = match std::env::var_os("STASIS_BIN") {
        Some(p) => (PathBuf::from(p), "STASIS_BIN points at it"),
        None => (
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest_dir().join("target"))
                .join("release/stasis"),
            "build it first with `cargo build --release`, or set STASIS_BIN",
        ),
    };
    if !is_executable(&bin) {
        return Err(format!(
            "stasis binary {} is missing or not executable: {hint}",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Warns (as `bench`) when a file under src/ is newer than `bin`, the default
/// build; says nothing when `STASIS_BIN` chose the binary.
pub fn warn_if_stale(bench: &str, bin: &Path) {
    fn newest(dir: &Path) -> Option<SystemTime> {
        let mut best = None;
        for e in fs::read_dir(dir).ok()?.flatten() {
            let m = e.metadata().ok()?;
            let t = if m.is_dir() {
                newest(&e.path())
            } else {
                m.modified().ok()
            };
            best = best.max(t);
        }
        best
    }
    if std::env::var_os("STASIS_BIN").is_some() {
        return;
    }
    let src = manifest_dir().join("src");
    let built = fs::metadata(bin).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(src_t)) = (built, newest(&src)) {
        if src_t > built {
            eprintln!(
                "{bench}: warning: {} is older than {}: run `cargo build --release`",
                bin.display(),
                src.display()
            );
        }
    }
}

/// Builds the OCI bundle of `images/IMAGE/build` at `bundle`; `args` is the
/// container's command (or the image's settings).
pub fn build_bundle<S: AsRef<OsStr>>(image: &str, bundle: &Path, args: &[S]) -> Result<(), String> {
    let script = manifest_dir().join(format!("images/{image}/build"));
    let out = Command::new(&script)
        .arg(bundle)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}",
            script.display(),
            bundle.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Host

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn is_tmpfs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

/// Where runtime state roots go: `BENCH_STATE_DIR` when set, else /run when it
/// is tmpfs (where runc, crun and stasis keep it by default), else `fallback`.
/// State on a disk file system makes every fsync real.
pub fn state_base(fallback: &Path) -> PathBuf {
    match std::env::var_os("BENCH_STATE_DIR") {
        Some(d) => PathBuf::from(d),
        None if is_tmpfs(Path::new("/run")) => PathBuf::from("/run"),
        None => fallback.to_path_buf(),
    }
}

/// A fresh directory `PREFIX*` in `base`, removed when dropped.
pub fn temp_dir_in(base: &Path, prefix: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .map_err(|e| format!("cannot create a directory in {}: {e}", base.display()))
}

/// The state letter of `pid` in /proc (`S`, `D`, `t`, ...), `None` once it is gone.
pub fn proc_state(pid: i32) -> Option<u8> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat.get(close + 2).copied()
}

/// The directory of `pid`'s cgroup: in the v1 hierarchy of `controller`, or
/// (with `None`) in the v2 hierarchy.
pub fn cgroup_path(pid: i32, controller: Option<&str>) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        match controller {
            Some(c) if ctrls.split(',').any(|x| x == c) => {
                Some(Path::new("/sys/fs/cgroup").join(c).join(rel))
            }
            None if ctrls.is_empty() => Some(Path::new("/sys/fs/cgroup").join(rel)),
            _ => None,
        }
    })
}

// ---------------------------------------------------------------------------
// Running commands, cleaning up

/// Runs `c ARGS` with stdin on /dev/null, and returns its wall time and output.
/// `run` and `restore` get /dev/null stdio too (the container inherits it: CRIU
/// cannot dump a host file there, and a pipe would stay open) and `--log LOG`
/// for errors; other commands write stdout and stderr into `log`.
pub fn run_logged(
    mut c: Command,
    args: &[&str],
    what: &str,
    log: &Path,
) -> Result<(Duration, String), String> {
    let _ = fs::remove_file(log);
    c.stdin(Stdio::null());
    if matches!(args.first(), Some(&"run" | &"restore")) {
        c.arg("--log").arg(log);
        c.stdout(Stdio::null()).stderr(Stdio::null());
    } else {
        let f = fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| format!("dup: {e}"))?;
        c.stdout(f).stderr(f2);
    }
    c.args(args);
    let t0 = Instant::now();
    let st = c.status().map_err(|e| format!("{what}: {e}"))?;
    let wall = t0.elapsed();
    let out = fs::read_to_string(log).unwrap_or_default();
    if !st.success() {
        return Err(format!("{what}: {st}:\n{}", last_lines(&out, 15)));
    }
    Ok((wall, out))
}

/// The last `n` lines of `s`.
pub fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The names in a runtime's state root (its containers), hidden ones left out.
pub fn root_entries(root: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(root) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect()
}

/// The containers to force-delete from a runtime's state root `root`: the
/// `ids` used and every other entry in it (hidden ones left out), as far as
/// they still exist.
pub fn leftover_containers(root: &Path, mut ids: Vec<String>) -> Vec<String> {
    for name in root_entries(root) {
        if !ids.contains(&name) {
            ids.push(name);
        }
    }
    ids.retain(|id| root.join(id).exists());
    ids
}

/// Lazily unmounts whatever is still mounted under `dir` (deepest first),
/// warning as `bench` about each.
pub fn unmount_leftovers(bench: &str, dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut left: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    left.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in left {
        eprintln!("{bench}: warning: unmounting leftover {m}");
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

// ---------------------------------------------------------------------------
// Test data

/// xorshift64*: fast, seeded, the same bytes on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `b` with random bytes.
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    /// Fills `b` with text: random `words`, separated by spaces and, about one
    /// time in `line_every`, a newline.
    pub fn fill_words(&mut self, words: &[&str], line_every: u64, b: &mut [u8]) {
        let mut i = 0;
        while i < b.len() {
            let w = words[(self.next() % words.len() as u64) as usize].as_bytes();
            let n = w.len().min(b.len() - i);
            b[i..i + n].copy_from_slice(&w[..n]);
            i += n;
            if i < b.len() {
                b[i] = if self.next().is_multiple_of(line_every) {
                    b'\n'
                } else {
                    b' '
                };
                i += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// main

/// The exit code for a bench's result (whether every goal was met): a missed
/// goal fails only with `BENCH_STRICT=1`; an error is printed as `name`'s.
pub fn exit_code(name: &str, result: Result<bool, String>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if std::env::var("BENCH_STRICT").as_deref() == Ok("1") => ExitCode::FAILURE,
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `bench` when started by `cargo bench --bench NAME`; `cargo test
/// --benches` runs us without `--bench` and gets a one-line note.
pub fn bench_main(name: &str, bench: fn() -> Result<bool, String>) -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: run it with `cargo bench --bench {name}`");
        return ExitCode::SUCCESS;
    }
    exit_code(name, bench())
}
