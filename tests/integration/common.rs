//! Shared helpers for the integration suite: a private `--root` per test (`Env`),
//! busybox bundles, a guard per container that force-deletes it in `Drop` (youki's
//! `CrTestContext`), commands with a timeout, and `requires!` (runc's `requires`),
//! which prints why a test skips and turns a skip into a failure under
//! `STASIS_REQUIRE_ALL=1` (CI).
//!
//! Every command's stdout and stderr go to files, not pipes: a detached container
//! inherits them and keeps a pipe open long after stasis exits.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any single stasis/runc command may take before the test fails.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);

/// The runtime under test: `STASIS_TEST_RUNTIME` names another binary (e.g. runc)
/// to run the same CLI tests against it; by default the stasis built by cargo.
pub fn runtime_bin() -> PathBuf {
    match std::env::var_os("STASIS_TEST_RUNTIME") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_stasis")),
    }
}

pub fn runc_bin() -> Option<PathBuf> {
    for p in [
        "/usr/sbin/runc",
        "/usr/bin/runc",
        "/usr/local/sbin/runc",
        "/usr/local/bin/runc",
    ] {
        if Path::new(p).is_file() {
            return Some(PathBuf::from(p));
        }
    }
    None
}

pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("images/busybox/build")
}

/// What a test needs from the host.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub enum Req {
    /// Running as uid 0 (real namespaces, cgroups, mounts).
    root,
    /// A static /bin/busybox for `images/busybox/build`.
    busybox,
    /// runc, for side-by-side comparisons.
    runc,
    /// cgroup v1 memory and pids hierarchies at /sys/fs/cgroup/{memory,pids}.
    cgroup_v1,
    /// Debian's redis-server and redis-tools (images/redis/build, the host's
    /// redis-server computes reference digests).
    redis,
    /// Debian's postgresql-15 and its client (images/postgres/build, the host's psql
    /// queries restored copies).
    postgres,
}

fn missing(req: Req) -> Option<String> {
    match req {
        Req::root => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            (euid != 0).then(|| format!("needs root (euid is {euid})"))
        }
        Req::busybox => {
            let bb = Path::new("/bin/busybox");
            if !bb.is_file() {
                return Some("needs busybox-static at /bin/busybox".into());
            }
            None
        }
        Req::runc => runc_bin()
            .is_none()
            .then(|| "needs runc (apt-get install runc)".into()),
        Req::cgroup_v1 => ["memory", "pids"]
            .iter()
            .find(|c| {
                !Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join("cgroup.procs")
                    .exists()
            })
            .map(|c| format!("needs the cgroup v1 {c} hierarchy at /sys/fs/cgroup/{c}")),
        Req::redis => missing_files(
            &["/usr/bin/redis-server", "/usr/bin/redis-cli"],
            "apt-get install redis-server redis-tools",
        ),
        Req::postgres => missing_files(
            &[
                "/usr/lib/postgresql/15/bin/postgres",
                "/usr/lib/postgresql/15/bin/initdb",
                "/usr/lib/postgresql/15/bin/pgbench",
                "/usr/bin/psql",
                "/usr/bin/nsenter",
            ],
            "apt-get install postgresql-15 postgresql-client-15",
        ),
    }
}

/// The first of `files` that does not exist, with how to get it.
fn missing_files(files: &[&str], install: &str) -> Option<String> {
    files
        .iter()
        .find(|f| !Path::new(f).exists())
        .map(|f| format!("needs {f} ({install})"))
}

/// Checks `reqs` for `test`. Missing ones print `SKIP <test>: <reason>` and return
/// false; with `STASIS_REQUIRE_ALL=1` they fail the test instead.
pub fn requirements_met(test: &str, reqs: &[Req]) -> bool {
    let reasons: Vec<String> = reqs.iter().filter_map(|r| missing(*r)).collect();
    if reasons.is_empty() {
        return true;
    }
    let reason = reasons.join("; ");
    if std::env::var("STASIS_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test}: {reason} (STASIS_REQUIRE_ALL=1 makes a missing requirement a failure)");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

/// The name of the test function it is used in (`module::test`), for skip
/// messages and per-test directories.
#[macro_export]
macro_rules! test_name {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = name_of(here);
        let name = name.strip_suffix("::here").unwrap_or(name);
        name.split_once("::").map_or(name, |(_, rest)| rest)
    }};
}

/// The store harness (`store_flows::Sx`) for the calling test, named after it;
/// returns from the test when the host lacks what it needs (printing why).
macro_rules! setup {
    () => {{
        let name = $crate::test_name!();
        match $crate::store_flows::Sx::setup(name) {
            Some(s) => s,
            None => return,
        }
    }};
}

/// `requires!(root, busybox, runc)`: returns from the test (printing why) when
/// a requirement is missing.
#[macro_export]
macro_rules! requires {
    ($($req:ident),+ $(,)?) => {{
        let name = $crate::test_name!();
        if !$crate::common::requirements_met(name, &[$($crate::common::Req::$req),+]) {
            return;
        }
    }};
}

/// A container id unique across parallel tests and test runs, so cgroups (named
/// after the id) of different tests never collide.
pub fn unique_id(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The result of one command.
#[derive(Debug)]
pub struct Out {
    pub args: Vec<String>,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn describe(&self) -> String {
        format!(
            "`{}` exited with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    /// Asserts exit code 0 (panics with the command, stdout and stderr otherwise).
    #[track_caller]
    pub fn expect_ok(self) -> Self {
        assert_eq!(self.code, Some(0), "{}", self.describe());
        self
    }

    #[track_caller]
    pub fn code_is(self, code: i32) -> Self {
        assert_eq!(self.code, Some(code), "{}", self.describe());
        self
    }

    /// Asserts a non-zero exit and exactly one non-empty line on stderr that
    /// contains every string in `needles`; returns that line.
    #[track_caller]
    pub fn fails_with_one_line(&self, needles: &[&str]) -> String {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected failure: {}",
            self.describe()
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one stderr line: {}",
            self.describe()
        );
        for n in needles {
            assert!(
                lines[0].contains(n),
                "stderr line does not name {n:?}: {}",
                self.describe()
            );
        }
        lines[0].to_string()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.describe()))
    }
}

/// Kills (and reaps) a spawned child in `Drop`, so a failed test leaves no process.
pub struct Spawned {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub args: Vec<String>,
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for the child with a timeout and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = Out {
            args: self.args.clone(),
            code: status.and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code().or_else(|| s.signal().map(|n| 128 + n))
            }),
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "timed out after {timeout:?}: {}",
            out.describe()
        );
        out
    }

    pub fn stdout_so_far(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private state root and scratch directory for one test.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub bin: PathBuf,
    n: AtomicUsize,
}

impl Env {
    pub fn new() -> Self {
        Self::with_bin(runtime_bin())
    }

    /// An environment driving runc instead of stasis (its own `--root`).
    pub fn runc() -> Self {
        Self::with_bin(runc_bin().expect("runc"))
    }

    fn with_bin(bin: PathBuf) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("stasis-it-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("root");
        fs::create_dir_all(dir.path().join("out")).unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        Self {
            root,
            dir,
            bin,
            n: AtomicUsize::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `bin --root R` with `$TMPDIR` in this environment, so what the runtime
    /// leaves in the temp directory (the CRIU log a failed checkpoint keeps for
    /// the user) goes with the test's directory.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("TMPDIR", self.dir.path().join("tmp"))
            .arg("--root")
            .arg(&self.root);
        cmd
    }

    /// Starts `bin --root R args...` with stdout/stderr to files and stdin null
    /// (or a pipe fed `stdin`).
    pub fn spawn(&self, args: &[&str], stdin: Option<&[u8]>) -> Spawned {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let stdout = self.dir.path().join(format!("out/{n}.out"));
        let stderr = self.dir.path().join(format!("out/{n}.err"));
        let mut cmd = self.command();
        cmd.args(args);
        cmd.stdout(fs::File::create(&stdout).unwrap());
        cmd.stderr(fs::File::create(&stderr).unwrap());
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut all = vec![self.bin.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        if let Some(data) = stdin {
            let mut w = child.stdin.take().unwrap();
            w.write_all(data).expect("write stdin");
        }
        Spawned {
            child,
            stdout,
            stderr,
            args: all,
        }
    }

    /// Runs a command to completion.
    pub fn run(&self, args: &[&str]) -> Out {
        self.spawn(args, None).wait(CMD_TIMEOUT)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Out {
        self.spawn(args, Some(stdin)).wait(CMD_TIMEOUT)
    }

    /// Runs a command and asserts it succeeded.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Out {
        self.run(args).expect_ok()
    }

    /// Builds a busybox bundle in the scratch directory running `cmd`.
    pub fn bundle(&self, name: &str, cmd: &[&str]) -> PathBuf {
        let dir = self.path(name);
        let out = Command::new(build_script())
            .arg(&dir)
            .args(cmd)
            .output()
            .expect("run images/busybox/build");
        assert!(
            out.status.success(),
            "images/busybox/build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    /// A guard that force-deletes container `id` of this root when dropped.
    pub fn guard(&self, id: &str) -> Container {
        Container {
            bin: self.bin.clone(),
            root: self.root.clone(),
            id: id.to_string(),
        }
    }

    /// `create --bundle B ID`, asserting success.
    #[track_caller]
    pub fn create(&self, bundle: &Path, id: &str) -> Container {
        let g = self.guard(id);
        self.ok(&["create", "--bundle", bundle.to_str().unwrap(), id]);
        g
    }

    /// `run -d --bundle B ID`, asserting success.
    #[track_caller]
    pub fn run_detached(&self, bundle: &Path, id: &str) -> Container {
        let g = self.guard(id);
        self.ok(&["run", "-d", "--bundle", bundle.to_str().unwrap(), id]);
        g
    }

    #[track_caller]
    pub fn state(&self, id: &str) -> Value {
        self.ok(&["state", id]).json()
    }

    #[track_caller]
    pub fn status(&self, id: &str) -> String {
        self.state(id)["status"].as_str().unwrap().to_string()
    }

    #[track_caller]
    pub fn pid(&self, id: &str) -> i32 {
        self.state(id)["pid"].as_i64().unwrap() as i32
    }

    /// Polls `state` until the status is `want`.
    #[track_caller]
    pub fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.status(id);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} is {got}, waited 10s for {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ps --format json`, sorted.
    #[track_caller]
    pub fn pids(&self, id: &str) -> Vec<i64> {
        let v = self.ok(&["ps", "--format", "json", id]).json();
        let mut pids: Vec<i64> = v
            .as_array()
            .unwrap_or_else(|| panic!("ps json is not an array: {v}"))
            .iter()
            .map(|p| p.as_i64().unwrap_or_else(|| panic!("non-int pid in {v}")))
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Names in `--root` other than the hidden `.locks` directory.
    pub fn root_entries(&self) -> Vec<String> {
        match fs::read_dir(&self.root) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".locks")
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Asserts a failed command left nothing for `id`: no directory under `--root`
    /// (but `.locks`), no cgroup named after the id, no mount under `bundle`.
    #[track_caller]
    pub fn assert_nothing_left(&self, id: &str, bundle: Option<&Path>) {
        assert_eq!(self.root_entries(), Vec::<String>::new(), "left in --root");
        let left = cgroups_named(id);
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
        if let Some(b) = bundle {
            let b = b.display().to_string();
            let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
            let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&b)).collect();
            assert!(left.is_empty(), "mounts left behind: {left:?}");
        }
    }
}

/// Cgroup directories (top two levels of the memory and pids hierarchies) whose
/// name contains `id`. libcontainer 0.7 names them `:youki:<id>` when the spec has
/// no cgroupsPath; runc uses `<id>`.
pub fn cgroups_named(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for ctl in ["memory", "pids"] {
        let base = Path::new("/sys/fs/cgroup").join(ctl);
        let Ok(rd) = fs::read_dir(&base) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if e.file_name().to_string_lossy().contains(id) {
                found.push(p.clone());
            }
            if let Ok(rd2) = fs::read_dir(&p) {
                for e2 in rd2.flatten() {
                    if e2.path().is_dir() && e2.file_name().to_string_lossy().contains(id) {
                        found.push(e2.path());
                    }
                }
            }
        }
    }
    found
}

/// The host directory of `pid`'s cgroup for a v1 `controller`, from /proc/PID/cgroup.
#[track_caller]
pub fn cgroup_dir(pid: i32, controller: &str) -> PathBuf {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/cgroup: {e}"));
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctls, path) = (parts.next(), parts.next(), parts.next());
        if let (Some(ctls), Some(path)) = (ctls, path) {
            if ctls.split(',').any(|c| c == controller) {
                return Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(path.trim_start_matches('/'));
            }
        }
    }
    panic!("pid {pid} has no {controller} cgroup in:\n{text}");
}

#[track_caller]
pub fn read_trim(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

/// Edits a bundle's config.json in place.
pub fn edit_config(bundle: &Path, f: impl FnOnce(&mut Value)) {
    let p = bundle.join("config.json");
    let mut v: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Adds a read-write bind mount of host directory `src` at `dest`.
pub fn add_bind(bundle: &Path, src: &Path, dest: &str) {
    let src = src.display().to_string();
    edit_config(bundle, |c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": dest, "type": "bind", "source": src, "options": ["rbind", "rw"]
        }));
    });
}

/// Polls `cond` every 20 ms for up to `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Force-deletes its container when dropped, even when the test panicked. A failed
/// delete fails the test (unless it is already failing): cleanup is behaviour too.
pub struct Container {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        // The Env's directory (the parent of --root, which a runtime creates only
        // with its first container) gone means the Env was dropped first:
        // `delete --force` would find nothing and exit 0, leaving the container's
        // processes and cgroups behind. The guard must go before its Env.
        if self.root.parent().is_some_and(|env_dir| !env_dir.exists()) {
            let err = format!(
                "cleanup: --root {} of container {} was removed before the container \
                 (drop its guard before its Env)",
                self.root.display(),
                self.id
            );
            if std::thread::panicking() {
                eprintln!("{err}");
            } else {
                panic!("{err}");
            }
            return;
        }
        let out = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["delete", "--force", &self.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let err = match out {
            Ok(o) if o.status.success() => return,
            Ok(o) => format!(
                "cleanup: {} delete --force {} exited with {:?}: {}",
                self.bin.display(),
                self.id,
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => format!("cleanup: {}: {e}", self.bin.display()),
        };
        if std::thread::panicking() {
            eprintln!("{err}");
        } else {
            panic!("{err}");
        }
    }
}

/// Waits until process `pid` is stopped (state `T` in /proc/PID/stat): how a test
/// knows stasis reached a `STASIS_FAULT=NAME:stop` fault point. Fails if the process
/// exits first.
#[track_caller]
pub fn wait_stopped_at_fault(pid: u32, timeout: Duration) {
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    wait_until(
        &format!("pid {pid} to stop at its fault point"),
        timeout,
        || {
            let s = std::fs::read_to_string(&stat)
                .unwrap_or_else(|e| panic!("pid {pid} is gone before its fault point: {e}"));
            // The state follows the command name's closing parenthesis.
            let state = s
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            assert!(
                !state.starts_with('Z'),
                "pid {pid} exited before its fault point"
            );
            state.starts_with('T')
        },
    );
}
