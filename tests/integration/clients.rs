//! Real clients driving stasis as their runtime: podman 4.3 (Debian bookworm) and
//! containerd 1.6 through `ctr`, each in a private root under a temp dir that the
//! test sets up and tears down, so nothing system-wide is touched:
//!
//! - podman: `--root`, `--runroot`, `--tmpdir`, `--cgroup-manager cgroupfs`,
//!   `--events-backend file`, `--runtime <wrapper>`, a private `CONTAINERS_CONF`
//!   (file locks, CNI backend with a private config dir, no network, ulimits this
//!   sandbox can grant) and `CONTAINERS_STORAGE_CONF` (vfs), a private
//!   `--cgroup-parent`; the busybox rootfs is `podman import`ed in a mount namespace
//!   where /var/lib is a tmpfs (podman writes its blob-info cache there whatever
//!   `--root` says).
//! - containerd: a private `containerd --config` (root, state, sockets in the temp
//!   dir) started in its own mount namespace with a tmpfs on /run (the shim puts its
//!   sockets in /run/containerd/s whatever the config says); every `ctr` enters that
//!   namespace; a private namespace (and so cgroup parent) per test; the image is an
//!   OCI archive built by `tests/clients/oci-image`; `--runc-binary <wrapper>`,
//!   `--runc-root` in the temp dir.
//!
//! The runtime is a wrapper script that appends each command line it gets to a log
//! (tab-separated) and execs stasis (for podman with `--root`, which podman does not
//! pass and would not pass to its exit command either), so the tests also pin what
//! each client sends. Without podman or containerd a test prints why it skips
//! (`STASIS_REQUIRE_ALL=1` makes that a failure). Each environment's `Drop` removes
//! containers, kills what is left in its cgroups and mount namespace, removes its
//! cgroups and unmounts anything under its temp dir, also when the test panicked.
//! `STASIS_CLIENTS_DEBUG=1` runs the clients with `--log-level debug` / `--debug`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{build_script, runtime_bin, wait_until, Out};
use crate::cr::criu_or_skip;

/// How long one client command may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// A workload whose shell variable `i` (memory state) is written to /tmp/count in
/// the container's root filesystem 5 times a second (renamed into place, so a
/// reader never sees it half written); SIGTERM ends it at once. A restored copy
/// goes on counting from where the checkpoint left it.
const COUNTER: &str = "trap 'exit 0' TERM; i=0; \
     while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.2; done";

// ---------------------------------------------------------------------------
// Requirements and commands

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(
        [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// True when every tool is installed; otherwise prints why `test` skips, or fails
/// under `STASIS_REQUIRE_ALL=1`.
fn tools_or_skip(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "needs {} (apt-get install -y podman containerd; scripts/setup installs them)",
        missing.join(", ")
    );
    if std::env::var("STASIS_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{test}: {reason} (STASIS_REQUIRE_ALL=1 makes a missing requirement a failure)");
    }
    eprintln!("SKIP {test}: {reason}");
    false
}

const PODMAN_TOOLS: &[&str] = &["podman", "conmon", "unshare", "tar"];
const CONTAINERD_TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "nsenter",
    "unshare",
    "tar",
    "sha256sum",
];

/// `requires!(root, busybox)`, the client's tools, and with `cr` CRIU >= 4.2.
macro_rules! requires_client {
    ($tools:expr, $cr:expr) => {{
        requires!(root, busybox);
        let name = $crate::test_name!();
        if !tools_or_skip(name, $tools) {
            return;
        }
        if $cr && criu_or_skip(name).is_none() {
            return;
        }
    }};
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `cmd` with stdin from /dev/null and stdout/stderr to files in `dir` (never
/// pipes: conmon, shims and containers inherit them and outlive the command),
/// killing it after `timeout`; fails the test on a timeout.
fn run_cmd(cmd: Command, dir: &Path, timeout: Duration) -> Out {
    let (out, timed_out) = try_run_cmd(cmd, dir, timeout);
    assert!(
        !timed_out,
        "timed out after {timeout:?}: `{}`\n--- stderr ---\n{}",
        out.args.join(" "),
        out.stderr
    );
    out
}

/// `run_cmd` that never panics (for teardown): the output and whether it timed out.
fn try_run_cmd(mut cmd: Command, dir: &Path, timeout: Duration) -> (Out, bool) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_p = dir.join(format!("cmd-{n}.out"));
    let err_p = dir.join(format!("cmd-{n}.err"));
    let mut args = vec![cmd.get_program().to_string_lossy().into_owned()];
    args.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let failed = |msg: String| Out {
        args: args.clone(),
        code: None,
        stdout: String::new(),
        stderr: msg,
    };
    let (Ok(o), Ok(e)) = (fs::File::create(&out_p), fs::File::create(&err_p)) else {
        return (
            failed(format!("cannot create output files in {}", dir.display())),
            false,
        );
    };
    cmd.stdin(Stdio::null()).stdout(o).stderr(e);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (failed(format!("spawn {}: {e}", args.join(" "))), false),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Out {
        args: args.clone(),
        code: status.and_then(|s| s.code()),
        stdout: fs::read_to_string(&out_p).unwrap_or_default(),
        stderr: fs::read_to_string(&err_p).unwrap_or_default(),
    };
    let _ = fs::remove_file(&out_p);
    let _ = fs::remove_file(&err_p);
    (out, status.is_none())
}

fn write_exec(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Writes the runtime wrapper: logs "$@" (tab-separated, one line per call) to
/// `log`, then execs stasis with `extra` global flags before the client's.
fn write_wrapper(path: &Path, log: &Path, extra: &str) {
    let bin = runtime_bin();
    write_exec(
        path,
        &format!(
            "#!/bin/sh\n\
             # Written by tests/integration/clients.rs: log the command line, run stasis.\n\
             {{ for a in \"$@\"; do printf '%s\\t' \"$a\"; done; printf '\\n'; }} >> '{}'\n\
             exec '{}' {extra} \"$@\"\n",
            log.display(),
            bin.display()
        ),
    );
}

/// The command lines the wrapper logged, each as its arguments.
fn read_calls(log: &Path) -> Vec<Vec<String>> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            l.split('\t')
                .filter(|a| !a.is_empty())
                .map(String::from)
                .collect()
        })
        .collect()
}

/// Flags that take a value among the global flags clients put before the verb.
const GLOBAL_WITH_VALUE: &[&str] = &["--root", "--log", "--log-format", "--criu"];

/// The verb of a runtime command line (the first argument that is not a global
/// flag or its value).
fn verb(call: &[String]) -> Option<&str> {
    let mut i = 0;
    while i < call.len() {
        let a = call[i].as_str();
        if !a.starts_with('-') {
            return Some(a);
        }
        i += if GLOBAL_WITH_VALUE.contains(&a) { 2 } else { 1 };
    }
    None
}

/// The logged calls of one verb.
fn calls_of(calls: &[Vec<String>], v: &str) -> Vec<Vec<String>> {
    calls
        .iter()
        .filter(|c| verb(c) == Some(v))
        .cloned()
        .collect()
}

/// Asserts that some call of verb `v` contains every one of `args` (and returns
/// the first such call).
#[track_caller]
fn assert_called(calls: &[Vec<String>], v: &str, args: &[&str]) -> Vec<String> {
    calls_of(calls, v)
        .into_iter()
        .find(|c| args.iter().all(|a| c.iter().any(|x| x == a)))
        .unwrap_or_else(|| {
            panic!(
                "no `{v}` call with {args:?}; the runtime got:\n{}",
                calls
                    .iter()
                    .map(|c| c.join(" "))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

fn count_of(call: &[String], arg: &str) -> usize {
    call.iter().filter(|a| *a == arg).count()
}

/// The value after flag `flag` in `call`.
fn flag_value<'a>(call: &'a [String], flag: &str) -> Option<&'a str> {
    call.iter()
        .position(|a| a == flag)
        .and_then(|i| call.get(i + 1))
        .map(String::as_str)
}

/// podman tests run one at a time: a restore in one was seen SIGKILLed (CRIU:
/// "killed by signal 9") while other podman tests ran beside it under heavy load.
fn podman_serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Teardown helpers shared by both clients

/// Cgroup directories named `rel` (e.g. "/stasis-podman-1-2") in every hierarchy.
fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    let Ok(rd) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.procs").exists() {
        // cgroup v2 mounted at /sys/fs/cgroup.
        out.push(root.join(rel));
    }
    for e in rd.flatten() {
        let p = e.path().join(rel);
        if p.is_dir() {
            out.push(p);
        }
    }
    out.retain(|p| p.is_dir());
    out
}

/// Every pid in the cgroup subtree `dir`.
fn pids_under(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
            pids.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(rd) = fs::read_dir(&d) {
            stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
    }
    pids
}

/// Kills every process left in cgroup `rel` (thawing it first: a frozen process
/// cannot die), then removes the cgroup directories bottom-up.
fn remove_cgroup_tree(rel: &str) {
    for dir in cgroup_dirs(rel) {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            let state = d.join("freezer.state");
            if state.exists() {
                let _ = fs::write(&state, "THAWED");
            }
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = cgroup_dirs(rel)
            .iter()
            .flat_map(|d| pids_under(d))
            .collect();
        if pids.is_empty() || Instant::now() >= deadline {
            if !pids.is_empty() {
                eprintln!("cleanup: processes left in cgroup {rel}: {pids:?}");
            }
            break;
        }
        for p in pids {
            // SAFETY: kill(2) on a pid read from our own test's cgroup.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for dir in cgroup_dirs(rel) {
        let mut all = Vec::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            all.push(d);
        }
        // Deepest first.
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in all {
            if let Err(e) = fs::remove_dir(&d) {
                eprintln!("cleanup: rmdir {}: {e}", d.display());
            }
        }
    }
}

/// Unmounts (lazily, deepest first) every mount of this mount namespace under `dir`.
fn unmount_under(dir: &Path) {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p.clone()).unwrap();
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!("cleanup: umount {p}: {}", std::io::Error::last_os_error());
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Force-deletes every container left in a stasis state root.
fn delete_all_in(state_root: &Path) {
    let Ok(rd) = fs::read_dir(state_root) else {
        return;
    };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if id.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        let out = Command::new(runtime_bin())
            .arg("--root")
            .arg(state_root)
            .args(["delete", "--force", &id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                eprintln!(
                    "cleanup: stasis delete --force {id}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
    }
}

/// A busybox root filesystem (from `images/busybox/build`) in `dir/bundle/rootfs`.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    let out = Command::new(build_script())
        .arg(&bundle)
        .output()
        .expect("run images/busybox/build");
    assert!(
        out.status.success(),
        "images/busybox/build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

/// RLIMIT_NPROC for podman's containers: 4096, or less when the hard limit is
/// lower. (Asking for the current hard limit fails here too: conmon runs the
/// runtime with lower limits than the test has, for runc as for stasis.)
fn nproc_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NPROC, &mut r) };
    r.rlim_max.min(4096)
}

// ---------------------------------------------------------------------------
// podman

/// A private podman: its storage, run root, tmp dir, configs, stasis state root
/// and cgroup parent, with the busybox image imported as `localhost/busybox:stasis`.
struct Podman {
    dir: tempfile::TempDir,
    wrapper: PathBuf,
    log: PathBuf,
    state: PathBuf,
    cgroup_parent: String,
}

const PODMAN_IMAGE: &str = "localhost/busybox:stasis";

impl Podman {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("stasis-podman-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        for sub in ["root", "runroot", "tmp", "net", "out"] {
            fs::create_dir_all(d.join(sub)).unwrap();
        }
        let pm = Podman {
            wrapper: d.join("stasis"),
            log: d.join("runtime-calls.log"),
            state: d.join("stasis-state"),
            cgroup_parent: format!("/{}", unique("stasis-podman")),
            dir,
        };
        write_wrapper(
            &pm.wrapper,
            &pm.log,
            &format!("--root '{}'", pm.state.display()),
        );
        let nproc = nproc_limit();
        // This sandbox cannot raise RLIMIT_NOFILE/NPROC to podman's defaults
        // (1048576, for runc as for stasis): ask for limits it can grant.
        fs::write(
            d.join("containers.conf"),
            format!(
                "[containers]\n\
                 default_ulimits = [\"nofile=1024:1024\", \"nproc={nproc}:{nproc}\"]\n\
                 netns = \"none\"\n\
                 log_driver = \"k8s-file\"\n\
                 [engine]\n\
                 lock_type = \"file\"\n\
                 tmp_dir = \"{tmp}\"\n\
                 events_logger = \"file\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 network_config_dir = \"{net}\"\n",
                tmp = d.join("tmp").display(),
                net = d.join("net").display(),
            ),
        )
        .unwrap();
        fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                d.join("root").display(),
                d.join("runroot").display()
            ),
        )
        .unwrap();
        fs::write(
            d.join("registries.conf"),
            "unqualified-search-registries = []\n",
        )
        .unwrap();

        // The image: a tar of the busybox rootfs, imported where /var/lib is a
        // tmpfs (podman import writes /var/lib/containers/cache otherwise).
        let rootfs = busybox_rootfs(&d);
        let tar = d.join("busybox.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs stasis-test /var/lib && exec \"$@\"")
            .arg("sh")
            .arg("podman");
        pm.env_and_globals(&mut cmd);
        cmd.arg("import").arg(&tar).arg(PODMAN_IMAGE);
        run_cmd(cmd, &d.join("out"), CLIENT_TIMEOUT).expect_ok();
        pm
    }

    fn env_and_globals(&self, cmd: &mut Command) {
        let d = self.dir.path();
        cmd.env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .arg("--tmpdir")
            .arg(d.join("tmp"))
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"])
            .arg("--runtime")
            .arg(&self.wrapper);
        if std::env::var("STASIS_CLIENTS_DEBUG").as_deref() == Ok("1") {
            cmd.args(["--log-level", "debug"]);
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("podman");
        self.env_and_globals(&mut cmd);
        cmd.args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Out {
        run_cmd(
            self.command(args),
            &self.dir.path().join("out"),
            CLIENT_TIMEOUT,
        )
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> Out {
        self.run(args).expect_ok()
    }

    /// `podman run -d` of the counter under our cgroup parent.
    #[track_caller]
    fn run_counter(&self, name: &str) -> String {
        let out = self.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--cgroup-parent",
            &self.cgroup_parent,
            PODMAN_IMAGE,
            "sh",
            "-c",
            COUNTER,
        ]);
        out.stdout.trim().to_string()
    }

    #[track_caller]
    fn inspect(&self, name: &str) -> Value {
        let v = self.ok(&["container", "inspect", name]).json();
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .unwrap_or_else(|| panic!("podman container inspect {name}: {v}"))
    }

    #[track_caller]
    fn status(&self, name: &str) -> String {
        self.inspect(name)["State"]["Status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The counter's current value, read with `podman exec`.
    #[track_caller]
    fn count(&self, name: &str) -> u64 {
        let out = self.ok(&["exec", name, "cat", "/tmp/count"]);
        out.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("/tmp/count of {name} is {:?}", out.stdout))
    }

    /// Waits until the counter of `name` exceeds `than`; returns the value seen.
    #[track_caller]
    fn count_above(&self, name: &str, than: u64) -> u64 {
        let mut last = 0;
        wait_until(
            &format!("{name}'s counter to pass {than}"),
            Duration::from_secs(15),
            || {
                last = self.count(name);
                last > than
            },
        );
        last
    }

    fn calls(&self) -> Vec<Vec<String>> {
        read_calls(&self.log)
    }

    /// Container ids (directories) in the stasis state root.
    fn state_entries(&self) -> Vec<String> {
        fs::read_dir(&self.state)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let (out, _) = try_run_cmd(
            self.command(&["rm", "--all", "--force", "--time", "0"]),
            &self.dir.path().join("out"),
            CLIENT_TIMEOUT,
        );
        if out.code != Some(0) {
            eprintln!("cleanup: podman rm -af: {}", out.stderr.trim());
        }
        // conmon and anything the removal missed live under our cgroup parent.
        remove_cgroup_tree(&self.cgroup_parent);
        delete_all_in(&self.state);
        unmount_under(self.dir.path());
    }
}

/// The container's init pid as podman records it.
fn pid_of(pm: &Podman, name: &str) -> i64 {
    pm.inspect(name)["State"]["Pid"].as_i64().unwrap_or(0)
}

#[test]
fn podman_run_exec_stop_rm() {
    requires_client!(PODMAN_TOOLS, false);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    let id = pm.run_counter("c1");
    assert_eq!(pm.status("c1"), "running");
    let first = pm.count_above("c1", 0);

    // exec: output, exit code, a terminal.
    assert_eq!(
        pm.ok(&["exec", "c1", "echo", "hello"]).stdout.trim(),
        "hello"
    );
    pm.run(&["exec", "c1", "sh", "-c", "exit 3"]).code_is(3);
    let tty = pm.ok(&["exec", "-t", "c1", "tty"]);
    assert!(tty.stdout.trim().starts_with("/dev/pts/"), "{}", tty.stdout);
    pm.count_above("c1", first);

    // stop: SIGTERM ends the workload, no SIGKILL needed.
    pm.ok(&["stop", "--time", "20", "c1"]);
    assert_eq!(pm.status("c1"), "exited");
    pm.ok(&["rm", "c1"]);
    assert!(
        pm.state_entries().is_empty(),
        "left in stasis state: {:?}",
        pm.state_entries()
    );
    let cg = format!("{}/libpod-{id}", pm.cgroup_parent);
    assert!(
        cgroup_dirs(&cg).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&cg)
    );

    let calls = pm.calls();
    let create = assert_called(&calls, "create", &["--bundle", "--pid-file", &id]);
    assert!(
        flag_value(&create, "--bundle").is_some_and(|b| b.ends_with("/userdata")),
        "{create:?}"
    );
    assert_called(&calls, "start", &[&id]);
    let exec = assert_called(
        &calls,
        "exec",
        &["--pid-file", "--process", "--detach", &id],
    );
    assert!(!exec.contains(&"--tty".to_string()), "{exec:?}");
    assert_called(&calls, "exec", &["--tty", "--console-socket", &id]);
    assert_called(&calls, "kill", &[&id, "15"]);
    assert!(
        calls_of(&calls, "kill")
            .iter()
            .all(|c| !c.contains(&"9".to_string())),
        "stop needed SIGKILL: {calls:?}"
    );
    assert_called(&calls, "delete", &["--force", &id]);
}

#[test]
fn podman_checkpoint_leave_running_with_flags() {
    requires_client!(PODMAN_TOOLS, true);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    let id = pm.run_counter("c1");
    let before = pm.count_above("c1", 2);
    let out = pm.ok(&[
        "container",
        "checkpoint",
        "--leave-running",
        "--tcp-established",
        "--file-locks",
        "--print-stats",
        "c1",
    ]);
    let stats: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("--print-stats is not JSON ({e}): {}", out.stdout));
    let criu = &stats["container_statistics"][0]["criu_statistics"];
    assert!(
        criu["frozen_time"].as_u64().is_some(),
        "no CRIU statistics: {stats}"
    );
    assert!(criu["pages_written"].as_u64().unwrap_or(0) > 0, "{stats}");
    assert_eq!(pm.status("c1"), "running");
    pm.count_above("c1", before);

    let calls = pm.calls();
    assert_called(&calls, "checkpoint", &["--help"]);
    let cp = assert_called(
        &calls,
        "checkpoint",
        &[
            "--image-path",
            "--work-path",
            "--leave-running",
            "--tcp-established",
            "--file-locks",
            &id,
        ],
    );
    // podman 4.3 sends --leave-running twice; runc (Go flags) takes that.
    assert_eq!(count_of(&cp, "--leave-running"), 2, "{cp:?}");
    let image = flag_value(&cp, "--image-path").unwrap();
    let work = flag_value(&cp, "--work-path").unwrap();
    assert!(image.ends_with("/userdata/checkpoint"), "{cp:?}");
    assert!(work.ends_with("/userdata"), "{cp:?}");
}

#[test]
fn podman_checkpoint_then_restore() {
    requires_client!(PODMAN_TOOLS, true);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    let id = pm.run_counter("c1");
    // High enough that a container started afresh (counting from 1) would show less.
    let before = pm.count_above("c1", 10);
    pm.ok(&[
        "container",
        "checkpoint",
        "--tcp-established",
        "--file-locks",
        "c1",
    ]);
    assert_eq!(pm.status("c1"), "exited");
    assert!(
        pm.state_entries().is_empty(),
        "checkpoint left {:?} in the stasis state",
        pm.state_entries()
    );

    let out = pm.ok(&[
        "container",
        "restore",
        "--tcp-established",
        "--file-locks",
        "--print-stats",
        "c1",
    ]);
    let stats: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("--print-stats is not JSON ({e}): {}", out.stdout));
    assert!(
        stats["container_statistics"][0]["criu_statistics"]["restore_time"]
            .as_u64()
            .is_some(),
        "no CRIU restore statistics: {stats}"
    );
    assert_eq!(pm.status("c1"), "running");
    assert!(pid_of(&pm, "c1") > 0);
    let after = pm.count("c1");
    assert!(
        after >= before,
        "restored counter is {after}, it was {before} before the checkpoint: not restored from memory"
    );
    pm.count_above("c1", after);
    assert_eq!(pm.ok(&["exec", "c1", "echo", "ok"]).stdout.trim(), "ok");

    let calls = pm.calls();
    let rs = assert_called(
        &calls,
        "restore",
        &[
            "--bundle",
            "--pid-file",
            "--detach",
            "--image-path",
            "--work-path",
            "--tcp-established",
            "--file-locks",
            &id,
        ],
    );
    assert!(
        flag_value(&rs, "--image-path").is_some_and(|p| p.ends_with("/userdata/checkpoint")),
        "{rs:?}"
    );

    pm.ok(&["stop", "--time", "20", "c1"]);
    pm.ok(&["rm", "c1"]);
    assert!(
        pm.state_entries().is_empty(),
        "left in stasis state: {:?}",
        pm.state_entries()
    );
}

#[test]
fn podman_checkpoint_export_and_import_a_copy() {
    requires_client!(PODMAN_TOOLS, true);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    pm.run_counter("c1");
    let before = pm.count_above("c1", 10);
    let archive = pm.dir.path().join("c1.tar.zst");
    let archive_s = archive.display().to_string();
    pm.ok(&[
        "container",
        "checkpoint",
        "--leave-running",
        "--tcp-established",
        "--file-locks",
        "--export",
        &archive_s,
        "c1",
    ]);
    assert!(
        fs::metadata(&archive).is_ok_and(|m| m.len() > 0),
        "no archive at {archive_s}"
    );
    assert_eq!(pm.status("c1"), "running");

    // podman refuses --tcp-established together with --name (a copy cannot take
    // over established connections).
    pm.ok(&[
        "container",
        "restore",
        "--import",
        &archive_s,
        "--name",
        "c1copy",
        "--file-locks",
    ]);
    assert_eq!(pm.status("c1copy"), "running");
    assert_eq!(pm.status("c1"), "running");
    let copy_id = pm.inspect("c1copy")["Id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!copy_id.is_empty());
    assert_ne!(pid_of(&pm, "c1"), pid_of(&pm, "c1copy"));
    let copy = pm.count("c1copy");
    assert!(
        copy >= before,
        "the copy's counter is {copy}, the original was at {before} before the checkpoint"
    );
    // Both go on counting, each on its own.
    pm.count_above("c1copy", copy);
    pm.count_above("c1", before);

    let calls = pm.calls();
    assert_called(
        &calls,
        "restore",
        &["--bundle", "--detach", "--image-path", &copy_id],
    );

    pm.ok(&["stop", "--time", "20", "c1", "c1copy"]);
    pm.ok(&["rm", "c1", "c1copy"]);
    assert!(
        pm.state_entries().is_empty(),
        "left in stasis state: {:?}",
        pm.state_entries()
    );
}

#[test]
fn podman_exec_runs_under_the_container_seccomp_filter() {
    requires_client!(PODMAN_TOOLS, false);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    pm.run_counter("c1");
    let init = pm.ok(&["exec", "c1", "grep", "^Seccomp:", "/proc/1/status"]);
    assert_eq!(
        init.stdout.split_whitespace().nth(1),
        Some("2"),
        "init: {}",
        init.stdout
    );
    let exec = pm.ok(&["exec", "c1", "grep", "^Seccomp:", "/proc/self/status"]);
    assert_eq!(
        exec.stdout.split_whitespace().nth(1),
        Some("2"),
        "the exec'd process runs without the container's seccomp filter: {}",
        exec.stdout
    );
}

// ---------------------------------------------------------------------------
// containerd

/// A private containerd in its own mount namespace (tmpfs on /run), with its own
/// config, root, state and sockets under a temp dir, a private namespace (cgroup
/// parent `/<ns>`), and the busybox image imported as `IMAGE`.
struct Containerd {
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    /// `/proc/PID/ns/mnt` of the daemon's mount namespace, as readlink shows it.
    mntns: String,
    ns: String,
    wrapper: PathBuf,
    log: PathBuf,
    runc_root: PathBuf,
}

const CTR_IMAGE: &str = "docker.io/library/busybox:stasis";

impl Containerd {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("stasis-containerd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        fs::create_dir_all(d.join("out")).unwrap();
        let mut c = Containerd {
            wrapper: d.join("stasis"),
            log: d.join("runtime-calls.log"),
            runc_root: d.join("stasis-state"),
            ns: unique("stasis-it"),
            mntns: String::new(),
            daemon: None,
            dir,
        };
        write_wrapper(&c.wrapper, &c.log, "");
        fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\n\
                 root = \"{root}\"\n\
                 state = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\", \
                 \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
                 \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
                 [grpc]\n  address = \"{sock}\"\n\
                 [ttrpc]\n  address = \"{ttrpc}\"\n\
                 [debug]\n  level = \"debug\"\n\
                 [metrics]\n  address = \"\"\n",
                root = d.join("root").display(),
                state = d.join("state").display(),
                sock = d.join("containerd.sock").display(),
                ttrpc = d.join("containerd-ttrpc.sock").display(),
            ),
        )
        .unwrap();
        let log = fs::File::create(d.join("containerd.log")).unwrap();
        // containerd's checkpoint leaves its image copy (ctrd-checkpoint*) in the
        // temp directory: the test's own, so it goes with the test.
        let tmp = d.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.env("TMPDIR", &tmp)
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=755 stasis-test /run && exec containerd --config \"$0\"")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // unshare and sh exec: the child's pid is containerd's.
        c.daemon = Some(cmd.spawn().expect("start containerd"));
        let pid = c.daemon.as_ref().unwrap().id();
        let sock = d.join("containerd.sock");
        wait_until("containerd to listen", Duration::from_secs(30), || {
            if let Some(Ok(Some(st))) = c.daemon.as_mut().map(|ch| ch.try_wait()) {
                panic!(
                    "containerd exited ({st}): {}",
                    fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
                );
            }
            sock.exists()
                && fs::read_link(format!("/proc/{pid}/ns/mnt"))
                    .map(|l| l != fs::read_link("/proc/self/ns/mnt").unwrap_or_default())
                    .unwrap_or(false)
        });
        c.mntns = fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .unwrap()
            .display()
            .to_string();
        wait_until("ctr version to answer", Duration::from_secs(30), || {
            c.ctr(&["version"]).code == Some(0)
        });

        let rootfs = busybox_rootfs(&d);
        let tar = d.join("busybox-oci.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oci-image");
        let mut cmd = Command::new(script);
        cmd.arg(&rootfs).arg(&tar).arg(CTR_IMAGE);
        run_cmd(cmd, &d.join("out"), CLIENT_TIMEOUT).expect_ok();
        c.ok(&["image", "import", tar.to_str().unwrap()]);
        c
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn ctr(&self, args: &[&str]) -> Out {
        run_cmd(
            self.command(args),
            &self.dir.path().join("out"),
            CLIENT_TIMEOUT,
        )
    }

    /// `ctr` for teardown: never panics.
    fn ctr_quiet(&self, args: &[&str]) -> Out {
        try_run_cmd(
            self.command(args),
            &self.dir.path().join("out"),
            CLIENT_TIMEOUT,
        )
        .0
    }

    /// `ctr --address A --namespace NS args...` in the daemon's mount namespace.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.env("TMPDIR", self.dir.path().join("tmp"))
            .arg(format!("--mount=/proc/{}/ns/mnt", self.pid()))
            .arg("ctr")
            .arg("--address")
            .arg(self.dir.path().join("containerd.sock"))
            .arg("--namespace")
            .arg(&self.ns);
        if std::env::var("STASIS_CLIENTS_DEBUG").as_deref() == Ok("1") {
            cmd.arg("--debug");
        }
        cmd.args(args);
        cmd
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> Out {
        self.ctr(args).expect_ok()
    }

    /// `ctr run -d` of the counter with stasis as the runc binary.
    #[track_caller]
    fn run_counter(&self, id: &str) {
        self.ok(&[
            "run",
            "-d",
            "--runc-binary",
            self.wrapper.to_str().unwrap(),
            "--runc-root",
            self.runc_root.to_str().unwrap(),
            CTR_IMAGE,
            id,
            "sh",
            "-c",
            COUNTER,
        ]);
    }

    /// The task's status as `ctr task ls` shows it.
    #[track_caller]
    fn task_status(&self, id: &str) -> String {
        let out = self.ok(&["task", "ls"]);
        out.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }

    #[track_caller]
    fn count(&self, id: &str) -> u64 {
        // The counter file is replaced atomically, so a read that prints no
        // number lost its output on the way back through ctr's stdio FIFO (seen
        // once in a loaded run: `ctr task exec` exited 0 with empty stdout): read
        // again, for a bounded time.
        let mut value = None;
        let mut last = String::new();
        wait_until(
            &format!("a number in /tmp/count of {id}"),
            Duration::from_secs(15),
            || {
                let exec_id = unique("x");
                let out = self.ok(&[
                    "task",
                    "exec",
                    "--exec-id",
                    &exec_id,
                    id,
                    "cat",
                    "/tmp/count",
                ]);
                value = out.stdout.trim().parse().ok();
                last = out.stdout;
                value.is_some()
            },
        );
        value.unwrap_or_else(|| panic!("/tmp/count of {id} is {last:?}"))
    }

    #[track_caller]
    fn count_above(&self, id: &str, than: u64) -> u64 {
        let mut last = 0;
        wait_until(
            &format!("{id}'s counter to pass {than}"),
            Duration::from_secs(15),
            || {
                last = self.count(id);
                last > than
            },
        );
        last
    }

    /// Kills the task with SIGKILL, waits for it to stop, deletes task and container.
    #[track_caller]
    fn remove(&self, id: &str) {
        if self.task_status(id) == "RUNNING" || self.task_status(id) == "PAUSED" {
            self.ok(&["task", "kill", "--signal", "SIGKILL", id]);
            wait_until(
                &format!("task {id} to stop"),
                Duration::from_secs(15),
                || self.task_status(id) == "STOPPED",
            );
        }
        if !self.task_status(id).is_empty() {
            self.ok(&["task", "delete", id]);
        }
        self.ok(&["container", "delete", id]);
    }

    fn calls(&self) -> Vec<Vec<String>> {
        read_calls(&self.log)
    }

    /// The stasis state root the shim uses for our namespace (`--runc-root/<ns>`).
    fn state_entries(&self) -> Vec<String> {
        fs::read_dir(self.runc_root.join(&self.ns))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let tasks = self.ctr_quiet(&["task", "ls", "--quiet"]);
            for id in tasks.stdout.split_whitespace() {
                self.ctr_quiet(&["task", "kill", "--signal", "SIGKILL", id]);
            }
            for id in tasks.stdout.split_whitespace() {
                self.ctr_quiet(&["task", "delete", "--force", id]);
            }
            let containers = self.ctr_quiet(&["container", "ls", "--quiet"]);
            for id in containers.stdout.split_whitespace() {
                self.ctr_quiet(&["container", "delete", id]);
            }
        }
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: SIGTERM to the containerd this test started.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(d.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        // Shims (and anything else) left in the daemon's private mount namespace:
        // the namespace, and its mounts, go away with its last process.
        if !self.mntns.is_empty() {
            let mut left = Vec::new();
            if let Ok(rd) = fs::read_dir("/proc") {
                for e in rd.flatten() {
                    let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                        continue;
                    };
                    let ns = fs::read_link(format!("/proc/{pid}/ns/mnt"))
                        .map(|l| l.display().to_string())
                        .unwrap_or_default();
                    if ns == self.mntns {
                        left.push(pid);
                    }
                }
            }
            for pid in left {
                // SAFETY: kill(2) on a process in the mount namespace this test made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        remove_cgroup_tree(&format!("/{}", self.ns));
        let state = self.runc_root.join(&self.ns);
        delete_all_in(&state);
        unmount_under(self.dir.path());
    }
}

#[test]
fn containerd_run_exec_kill_delete() {
    requires_client!(CONTAINERD_TOOLS, false);
    let c = Containerd::new();
    c.run_counter("k1");
    assert_eq!(c.task_status("k1"), "RUNNING");
    let first = c.count_above("k1", 0);

    // exec: output and exit code; ps.
    let out = c.ok(&["task", "exec", "--exec-id", "e1", "k1", "echo", "hello"]);
    assert_eq!(out.stdout.trim(), "hello");
    c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "k1",
        "sh",
        "-c",
        "exit 5",
    ])
    .code_is(5);
    let ps = c.ok(&["task", "ps", "k1"]);
    assert!(ps.stdout.lines().count() >= 2, "ctr task ps: {}", ps.stdout);
    c.count_above("k1", first);

    // kill (SIGTERM by default) ends the workload.
    c.ok(&["task", "kill", "k1"]);
    wait_until("k1 to stop after SIGTERM", Duration::from_secs(15), || {
        c.task_status("k1") == "STOPPED"
    });
    c.ok(&["task", "delete", "k1"]);
    c.ok(&["container", "delete", "k1"]);
    assert!(
        c.state_entries().is_empty(),
        "left in stasis state: {:?}",
        c.state_entries()
    );
    let cg = format!("/{}/k1", c.ns);
    assert!(
        cgroup_dirs(&cg).is_empty(),
        "cgroups left: {:?}",
        cgroup_dirs(&cg)
    );

    let calls = c.calls();
    let root = c.runc_root.join(&c.ns).display().to_string();
    let create = assert_called(
        &calls,
        "create",
        &[
            "--root",
            &root,
            "--log",
            "--log-format",
            "json",
            "--bundle",
            "--pid-file",
            "k1",
        ],
    );
    assert!(
        flag_value(&create, "--log").is_some_and(|l| l.ends_with("/log.json")),
        "{create:?}"
    );
    assert!(
        flag_value(&create, "--pid-file").is_some_and(|l| l.ends_with("/init.pid")),
        "{create:?}"
    );
    assert_called(&calls, "start", &["k1"]);
    assert_called(
        &calls,
        "exec",
        &["--process", "--detach", "--pid-file", "k1"],
    );
    assert_called(&calls, "ps", &["--format", "json", "k1"]);
    assert_called(&calls, "kill", &["k1", "15"]);
    assert_called(&calls, "delete", &["k1"]);
}

#[test]
fn containerd_task_checkpoint_leave_running_and_exit() {
    requires_client!(CONTAINERD_TOOLS, true);
    let c = Containerd::new();
    c.run_counter("k1");
    let before = c.count_above("k1", 2);
    // Without --exit: an image in the content store, the task goes on.
    let out = c.ok(&["task", "checkpoint", "k1"]);
    let image = out.stdout.trim().to_string();
    assert!(
        image.starts_with("containerd.io/checkpoint/k1:"),
        "{}",
        out.stdout
    );
    let images = c.ok(&["image", "ls", "--quiet"]);
    assert!(
        images.stdout.lines().any(|l| l == image),
        "{}",
        images.stdout
    );
    assert_eq!(c.task_status("k1"), "RUNNING");
    c.count_above("k1", before);

    let calls = c.calls();
    // The shim pauses the container, dumps it leaving it running, resumes it.
    assert_called(&calls, "pause", &["k1"]);
    let cp = assert_called(
        &calls,
        "checkpoint",
        &["--image-path", "--work-path", "--leave-running", "k1"],
    );
    assert!(
        flag_value(&cp, "--work-path").is_some_and(|w| w.ends_with("/k1/work/criu-work")),
        "{cp:?}"
    );
    assert_called(&calls, "resume", &["k1"]);

    // --exit: the dump stops the task (the shim's resume after it fails, as with runc).
    c.run_counter("k2");
    c.count_above("k2", 2);
    c.ok(&["task", "checkpoint", "--exit", "k2"]);
    wait_until(
        "k2 to stop after checkpoint --exit",
        Duration::from_secs(15),
        || c.task_status("k2") == "STOPPED",
    );
    let calls = c.calls();
    let cp = assert_called(&calls, "checkpoint", &["--image-path", "--work-path", "k2"]);
    assert!(!cp.contains(&"--leave-running".to_string()), "{cp:?}");

    c.remove("k1");
    c.remove("k2");
    assert!(
        c.state_entries().is_empty(),
        "left in stasis state: {:?}",
        c.state_entries()
    );
}

#[test]
fn containerd_container_checkpoint_and_live_restore() {
    requires_client!(CONTAINERD_TOOLS, true);
    let c = Containerd::new();
    c.run_counter("k1");
    let before = c.count_above("k1", 10);
    // One checkpoint per container: containerd 1.6 stores the task's spec blob
    // under its digest, and a second checkpoint of the same spec comes back with
    // "already exists" and an image without the task (not the runtime's doing).
    c.ok(&[
        "container",
        "checkpoint",
        "--task",
        "--rw",
        "--image",
        "k1",
        "localhost/k1-checkpoint:1",
    ]);
    assert_eq!(c.task_status("k1"), "RUNNING");
    c.remove("k1");
    assert!(
        c.state_entries().is_empty(),
        "left in stasis state: {:?}",
        c.state_entries()
    );

    c.ok(&[
        "container",
        "restore",
        "--live",
        "--rw",
        "k1",
        "localhost/k1-checkpoint:1",
    ]);
    assert_eq!(c.task_status("k1"), "RUNNING");
    let after = c.count("k1");
    assert!(
        after >= before,
        "restored counter is {after}, it was {before} before the checkpoint: not restored from memory"
    );
    c.count_above("k1", after);

    let calls = c.calls();
    let cp = assert_called(
        &calls,
        "checkpoint",
        &[
            "--image-path",
            "--work-path",
            "--file-locks",
            "--leave-running",
            "k1",
        ],
    );
    assert!(cp.iter().any(|a| a == "--log-format"), "{cp:?}");
    // containerd's shim sends -no-subreaper with a single dash.
    let rs = assert_called(
        &calls,
        "restore",
        &[
            "--image-path",
            "--work-path",
            "--detach",
            "--pid-file",
            "-no-subreaper",
            "--bundle",
            "k1",
        ],
    );
    assert!(
        flag_value(&rs, "--pid-file").is_some_and(|p| p.ends_with("/k1/init.pid")),
        "{rs:?}"
    );

    // The restored task is an ordinary one: SIGTERM, delete.
    c.ok(&["task", "kill", "k1"]);
    wait_until(
        "restored k1 to stop after SIGTERM",
        Duration::from_secs(15),
        || c.task_status("k1") == "STOPPED",
    );
    c.remove("k1");
    assert!(
        c.state_entries().is_empty(),
        "left in stasis state: {:?}",
        c.state_entries()
    );
}

/// `snapshot export --format podman`: a counter run by stasis directly and
/// checkpointed into the store is restored by podman (`--import`, stasis as its
/// runtime) from the exported archive, and counts on from its checkpointed value.
#[test]
fn podman_restores_a_stasis_snapshot_exported_with_format_podman() {
    requires_client!(PODMAN_TOOLS, true);
    let _one_at_a_time = podman_serial();
    let pm = Podman::new();
    let image_id = pm
        .ok(&["image", "inspect", "--format", "{{.Id}}", PODMAN_IMAGE])
        .stdout
        .trim()
        .to_string();
    assert_eq!(image_id.len(), 64, "image id {image_id:?}");

    // The counter, run and checkpointed into a store by stasis itself.
    let Some(sx) = crate::store_flows::Sx::setup(
        "clients::podman_restores_a_stasis_snapshot_exported_with_format_podman",
    ) else {
        return;
    };
    let bundle = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique("pmexp");
    let _guard = sx.run_d(&bundle, &id);
    let mut before = 0;
    wait_until("the counter to pass 10", Duration::from_secs(15), || {
        let out = sx.run(&["exec", &id, "cat", "/tmp/count"]);
        before = out.stdout.trim().parse().unwrap_or(0);
        before > 10
    });
    sx.ok(&["checkpoint", "--tag", "pmexp", &id]);

    let archive = pm.dir.path().join("pmexp.tar.zst");
    let archive_s = archive.display().to_string();
    sx.ok(&[
        "snapshot",
        "export",
        "pmexp",
        "-o",
        &archive_s,
        "--format",
        "podman",
        "--podman-image-id",
        &image_id,
        "--podman-image",
        PODMAN_IMAGE,
        "--podman-cgroup-parent",
        &pm.cgroup_parent,
        "--podman-runtime",
        &pm.wrapper.display().to_string(),
    ]);
    assert!(
        fs::metadata(&archive).is_ok_and(|m| m.len() > 0),
        "no archive at {archive_s}"
    );

    pm.ok(&[
        "container",
        "restore",
        "--import",
        &archive_s,
        "--name",
        "fromstasis",
    ]);
    assert_eq!(pm.status("fromstasis"), "running");
    let after = pm.count("fromstasis");
    assert!(
        after >= before,
        "restored counter is {after}, it was {before} at the checkpoint: not restored from memory"
    );
    pm.count_above("fromstasis", after);
    let copy_id = pm.inspect("fromstasis")["Id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_called(
        &pm.calls(),
        "restore",
        &["--bundle", "--detach", "--image-path", &copy_id],
    );

    pm.ok(&["stop", "--time", "20", "fromstasis"]);
    pm.ok(&["rm", "fromstasis"]);
    assert!(
        pm.state_entries().is_empty(),
        "left in stasis state: {:?}",
        pm.state_entries()
    );
}
