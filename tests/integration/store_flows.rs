//! The snapshot store through the CLI with real containers and real CRIU:
//! `checkpoint --tag` then `restore --from` (the counter carries on), two snapshots
//! of one running container sharing most pages, a corrupted pack refused at restore
//! with nothing left behind and reported by `snapshot verify --read-data`, export
//! and import into a second store, the catalog verbs (ls, inspect, tag, rm, gc),
//! restores from the snapshot's own filesystem or (with `--ignore-rootfs`) the
//! recorded bundle, concurrent first use of a new store, and clear errors for
//! unknown tags, bad imports, invalid tags, failed dumps and non-store directories.
//!
//! Every test has a private `--root` and `--store` (temp dirs). Commands that start
//! containers get /dev/null as stdout and a stderr pipe that is drained while the
//! command runs and afterwards until the container closes it (`Proc`).
//!
//! The helpers here (`Sx`, `Proc`, `http_get`, ...) are shared with `warm`.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{cgroups_named, requirements_met, unique_id, Container, Env, Out, Req};

/// A token fixed at start and a counter written to `/tmp/c` (tmpfs) ~20 times a
/// second; a restored copy must show the same token and a counter that never goes
/// back.
pub(crate) const COUNTER: &str = "read -r t < /proc/sys/kernel/random/uuid; i=0; \
     while :; do i=$((i+1)); echo \"$t $i\" > /tmp/c.new; mv /tmp/c.new /tmp/c; sleep 0.05; done";

/// How long one wait for a workload may take.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// How long one stasis command may take.
pub(crate) const CMD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Commands with drained pipes

fn set_nonblocking(fd: impl AsFd, on: bool) {
    let fd = fd.as_fd().as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        assert!(fl >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
        let fl = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        assert!(
            libc::fcntl(fd, libc::F_SETFL, fl) >= 0,
            "F_SETFL: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reads what is available now (non-blocking descriptor).
fn drain(r: &mut impl Read, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Keeps reading `r` (blocking) until EOF in a background thread: a container that
/// inherited the pipe can keep writing after the command that started it is gone.
fn drain_forever<R: Read + AsFd + Send + 'static>(mut r: R) {
    set_nonblocking(&r, false);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
        }
    });
}

/// A spawned command whose stdout (when captured) and stderr pipes are drained while
/// it runs; after it exits, whatever it wrote is collected without waiting for EOF.
pub(crate) struct Proc {
    child: Child,
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
    obuf: Vec<u8>,
    ebuf: Vec<u8>,
    args: Vec<String>,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, capture_stdout: bool) -> Proc {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        cmd.stdout(if capture_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut args = vec![cmd.get_program().to_string_lossy().into_owned()];
        args.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", args[0]));
        let out = child.stdout.take();
        let err = child.stderr.take();
        if let Some(o) = &out {
            set_nonblocking(o, true);
        }
        if let Some(e) = &err {
            set_nonblocking(e, true);
        }
        Proc {
            child,
            out,
            err,
            obuf: Vec::new(),
            ebuf: Vec::new(),
            args,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pump(&mut self) {
        if let Some(o) = self.out.as_mut() {
            drain(o, &mut self.obuf);
        }
        if let Some(e) = self.err.as_mut() {
            drain(e, &mut self.ebuf);
        }
    }

    fn try_finish(&mut self) -> Option<Out> {
        self.pump();
        let st = self.child.try_wait().expect("try_wait")?;
        self.pump();
        if let Some(o) = self.out.take() {
            drain_forever(o);
        }
        if let Some(e) = self.err.take() {
            drain_forever(e);
        }
        use std::os::unix::process::ExitStatusExt;
        Some(Out {
            args: self.args.clone(),
            code: st.code().or_else(|| st.signal().map(|n| 128 + n)),
            stdout: String::from_utf8_lossy(&self.obuf).into_owned(),
            stderr: String::from_utf8_lossy(&self.ebuf).into_owned(),
        })
    }

    #[track_caller]
    pub(crate) fn wait(mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(out) = self.try_finish() {
                return out;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.pump();
                panic!(
                    "`{}` timed out after {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.args.join(" "),
                    String::from_utf8_lossy(&self.obuf),
                    String::from_utf8_lossy(&self.ebuf)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs any command with a timeout, stdout and stderr captured.
#[track_caller]
pub(crate) fn run_cmd(cmd: Command, timeout: Duration) -> Out {
    Proc::spawn(cmd, true).wait(timeout)
}

#[track_caller]
pub(crate) fn assert_fails(out: &Out, needles: &[&str]) {
    assert!(
        matches!(out.code, Some(c) if c != 0),
        "expected failure: {out:#?}"
    );
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "stderr does not name {n:?}: {out:#?}"
        );
    }
}

/// A failure with exactly one non-empty stderr line naming every needle.
#[track_caller]
pub(crate) fn assert_one_line(out: &Out, needles: &[&str]) {
    assert_fails(out, needles);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one stderr line: {out:#?}");
}

// ---------------------------------------------------------------------------
// One test's environment

/// A private `--root` and scratch dir (`Env`), a private `--store` under it, and
/// the CRIU binary, passed to every command.
pub(crate) struct Sx {
    pub(crate) env: Env,
    pub(crate) criu: PathBuf,
    pub(crate) store: PathBuf,
}

impl Sx {
    /// `None` (after printing why, or panicking under STASIS_REQUIRE_ALL=1) when
    /// the host lacks root, busybox, cgroup v1 or CRIU >= 4.2.
    pub(crate) fn setup(test: &str) -> Option<Sx> {
        if !requirements_met(test, &[Req::root, Req::busybox, Req::cgroup_v1]) {
            return None;
        }
        let criu = crate::cr::criu_or_skip(test)?;
        let env = Env::new();
        let store = env.path("store");
        Some(Sx { env, criu, store })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.env.path(name)
    }

    /// `stasis --root R --criu C [--store S] ARGS`.
    pub(crate) fn command(&self, store: Option<&Path>, args: &[&str]) -> Command {
        let mut cmd = self.env.command();
        cmd.arg("--criu").arg(&self.criu);
        if let Some(s) = store {
            cmd.arg("--store").arg(s);
        }
        cmd.args(args);
        cmd
    }

    /// Runs a command on this test's store, stdout and stderr captured.
    pub(crate) fn run(&self, args: &[&str]) -> Out {
        self.run_in(&self.store, args)
    }

    pub(crate) fn run_in(&self, store: &Path, args: &[&str]) -> Out {
        Proc::spawn(self.command(Some(store), args), true).wait(CMD)
    }

    #[track_caller]
    pub(crate) fn ok(&self, args: &[&str]) -> Out {
        self.run(args).expect_ok()
    }

    /// Runs a command that starts a container: stdout is /dev/null.
    pub(crate) fn run_starting(&self, store: &Path, args: &[&str]) -> Out {
        Proc::spawn(self.command(Some(store), args), false).wait(CMD)
    }

    pub(crate) fn bundle(&self, name: &str, cmd: &[&str]) -> PathBuf {
        self.env.bundle(name, cmd)
    }

    pub(crate) fn guard(&self, id: &str) -> Container {
        self.env.guard(id)
    }

    /// `run -d`, asserting success.
    #[track_caller]
    pub(crate) fn run_d(&self, bundle: &Path, id: &str) -> Container {
        let g = self.guard(id);
        self.run_starting(
            &self.store,
            &["run", "-d", "--bundle", bundle.to_str().unwrap(), id],
        )
        .expect_ok();
        g
    }

    /// `restore -d --from FROM [EXTRA] ID` on `store`.
    pub(crate) fn restore_from_in(
        &self,
        store: &Path,
        from: &str,
        id: &str,
        extra: &[&str],
    ) -> Out {
        let mut args = vec!["restore", "-d", "--from", from];
        args.extend_from_slice(extra);
        args.push(id);
        self.run_starting(store, &args)
    }

    /// `restore -d --from FROM ID`, asserting success; the new container's guard.
    #[track_caller]
    pub(crate) fn restore_from(&self, from: &str, id: &str, extra: &[&str]) -> Container {
        let g = self.guard(id);
        self.restore_from_in(&self.store, from, id, extra)
            .expect_ok();
        g
    }

    /// `state` JSON, or None when the container does not exist.
    #[track_caller]
    pub(crate) fn state(&self, id: &str) -> Option<Value> {
        let out = self.run(&["state", id]);
        if out.code == Some(0) {
            return Some(out.json());
        }
        assert!(
            out.stderr.contains("does not exist"),
            "state {id} failed for another reason than a missing container: {out:#?}"
        );
        None
    }

    #[track_caller]
    pub(crate) fn pid(&self, id: &str) -> i32 {
        let st = self
            .state(id)
            .unwrap_or_else(|| panic!("container {id} does not exist"));
        st["pid"].as_i64().unwrap() as i32
    }

    /// The (token, counter) the COUNTER workload last wrote in `id`.
    pub(crate) fn counter(&self, id: &str) -> Option<(String, u64)> {
        let out = self.run(&["exec", id, "cat", "/tmp/c"]);
        if out.code != Some(0) {
            return None;
        }
        let (t, n) = out.stdout.trim().split_once(' ')?;
        Some((t.to_string(), n.parse().ok()?))
    }

    /// Polls the counter of `id` until `pred` holds.
    #[track_caller]
    pub(crate) fn wait_counter(
        &self,
        id: &str,
        what: &str,
        pred: impl Fn(u64) -> bool,
    ) -> (String, u64) {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            if let Some(c) = self.counter(id) {
                if pred(c.1) {
                    return c;
                }
                last = Some(c);
            }
            assert!(
                Instant::now() < deadline,
                "container {id}: counter never {what} within {WAIT:?} (last seen {last:?})"
            );
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// A restored copy carries on from `before`: same token, counter not lower, and
    /// it advances.
    #[track_caller]
    pub(crate) fn assert_carries_on(&self, id: &str, before: &(String, u64)) {
        let after = self.wait_counter(id, "readable", |_| true);
        assert_eq!(
            after.0, before.0,
            "{id}: token changed: the workload restarted instead of being restored"
        );
        assert!(
            after.1 >= before.1,
            "{id}: counter went back: {before:?} -> {after:?}"
        );
        self.wait_counter(id, "advanced after restore", |n| n > after.1);
    }

    /// `snapshot ls --format json` of `store`.
    #[track_caller]
    pub(crate) fn ls_in(&self, store: &Path) -> Vec<Value> {
        let v = self
            .run_in(store, &["snapshot", "ls", "--format", "json"])
            .expect_ok()
            .json();
        v.as_array()
            .unwrap_or_else(|| panic!("snapshot ls json is not an array: {v}"))
            .clone()
    }

    #[track_caller]
    pub(crate) fn ls(&self) -> Vec<Value> {
        self.ls_in(&self.store)
    }

    /// Names in the store's `tmp/`.
    pub(crate) fn store_tmp(&self, store: &Path) -> Vec<String> {
        names_in(&store.join("tmp"))
    }
}

/// File names in a directory (empty when it does not exist).
pub(crate) fn names_in(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// What is left in the test's `--root`: every entry but `.locks`, with each
/// restored copy's private directory listed as `.copies/ID`.
pub(crate) fn left_in_root(sx: &Sx) -> Vec<String> {
    let mut left = Vec::new();
    for n in names_in(&sx.env.root) {
        match n.as_str() {
            ".locks" => {}
            ".copies" => left.extend(
                names_in(&sx.env.root.join(".copies"))
                    .into_iter()
                    .map(|c| format!(".copies/{c}")),
            ),
            _ => left.push(n),
        }
    }
    left
}

/// Mount points under `dir` (e.g. the overlays of restored copies).
pub(crate) fn mounts_under(dir: &Path) -> Vec<String> {
    let d = format!("{}/", dir.display());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&d))
        .map(str::to_string)
        .collect()
}

/// The short id `checkpoint --tag` / `prewarm` print: `snapshot <id> (<tags>)`.
#[track_caller]
pub(crate) fn printed_snapshot_id(out: &Out) -> String {
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("snapshot "))
        .unwrap_or_else(|| panic!("no `snapshot ID` line: {out:#?}"));
    let id = line.split_whitespace().nth(1).unwrap().to_string();
    assert!(
        id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "not a short id: {line}"
    );
    id
}

/// The `snapshot ls` entry carrying `tag` (`NAME:VER`).
#[track_caller]
pub(crate) fn entry_with_tag<'a>(ls: &'a [Value], tag: &str) -> &'a Value {
    ls.iter()
        .find(|e| {
            e["tags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|x| x == tag))
        })
        .unwrap_or_else(|| panic!("no snapshot tagged {tag} in {ls:#?}"))
}

/// Total size of every blob in a store.
fn blob_bytes(store: &Path) -> u64 {
    let dir = store.join("blobs/sha256");
    fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The manifest of the snapshot tagged `tag` (`NAME:VER`), read from the layout.
#[track_caller]
fn manifest_of(store: &Path, tag: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in index.json: {index:#}"));
    let hex = desc["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

/// HTTP/1.0 GET of `/` at `addr`: (status, body).
pub(crate) fn http_get(addr: SocketAddr) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response from {addr}: {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line from {addr}: {head:?}"))?;
    Ok((code, body.to_string()))
}

// ---------------------------------------------------------------------------
// Round trips

#[test]
fn checkpoint_tag_then_restore_from_continues_the_counter() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-count");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 5", |n| n >= 5);

    let out = sx.ok(&["checkpoint", "--tag", "counter", &id]);
    let short = printed_snapshot_id(&out);
    assert!(out.stdout.contains("(counter)"), "{out:#?}");
    // Without --leave-running the container is gone, as with a plain checkpoint.
    assert!(
        sx.state(&id).is_none(),
        "{id} still exists after checkpoint"
    );
    assert!(cgroups_named(&id).is_empty(), "cgroups of {id} left");

    let ls = sx.ls();
    assert_eq!(ls.len(), 1, "{ls:#?}");
    let e = entry_with_tag(&ls, "counter:latest");
    assert_eq!(e["id"], short.as_str());
    assert_eq!(e["container"], id.as_str());
    assert!(e["size"].as_u64().unwrap() > 0, "{e}");
    assert!(e["new_bytes"].as_u64().unwrap() > 0, "{e}");
    assert!(e["created"].as_str().is_some_and(|c| !c.is_empty()), "{e}");

    let id2 = unique_id("sf-count2");
    let g2 = sx.restore_from("counter", &id2, &["--bundle", b.to_str().unwrap()]);
    assert_eq!(sx.state(&id2).unwrap()["status"], "running");
    sx.assert_carries_on(&id2, &before);
    // delete removes the copy's private filesystem and its mounts.
    drop(g2);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert_eq!(mounts_under(&sx.env.root), Vec::<String>::new());
    assert!(cgroups_named(&id2).is_empty(), "cgroups of {id2} left");
    // A unique prefix of the id names the snapshot too.
    let id3 = unique_id("sf-count3");
    let _g3 = sx.restore_from(&short[..8], &id3, &[]);
    sx.assert_carries_on(&id3, &before);
    assert!(sx.store_tmp(&sx.store).is_empty(), "store tmp/ not empty");
}

/// ~2 MB of random text held by the shell, then the counter: the text is stable
/// memory the second snapshot must not store again.
const MEM_COUNTER: &str = "x=$(head -c 2000000 /dev/urandom | base64); \
     read -r t < /proc/sys/kernel/random/uuid; i=0; \
     while :; do i=$((i+1)); echo \"$t $i\" > /tmp/c.new; mv /tmp/c.new /tmp/c; sleep 0.05; done";

#[test]
fn two_snapshots_of_a_running_container_share_most_pages() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", MEM_COUNTER]);
    let id = unique_id("sf-dedup");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let snap = |tag: &str| -> Value {
        sx.ok(&[
            "checkpoint",
            "--leave-running",
            "--tag",
            tag,
            "--print-stats",
            "--stats-format",
            "json",
            &id,
        ])
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no JSON stats from checkpoint --tag {tag}"))
    };
    let s1 = snap("first");
    // The workload moves on between the two snapshots (a few pages change).
    let c1 = sx.wait_counter(&id, "readable after the first checkpoint", |_| true);
    sx.wait_counter(&id, "advanced after the first checkpoint", |n| n > c1.1);
    let s2 = snap("second");
    let c = sx.wait_counter(&id, "readable", |_| true);
    sx.wait_counter(&id, "advanced after two checkpoints", |n| n > c.1);

    let n = |v: &Value, k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("no {k} in --print-stats: {v}"))
    };
    for s in [&s1, &s2] {
        assert_eq!(
            n(s, "pages_new") + n(s, "pages_reused"),
            n(s, "pages_total")
        );
        assert!(n(s, "frozen_time") > 0, "{s}");
    }
    assert!(
        n(&s1, "bytes_added") > 1_000_000,
        "the first snapshot stored under 1 MB of ~2.7 MB of random text: {s1}"
    );
    assert!(
        n(&s2, "pages_reused") * 10 >= n(&s2, "pages_total") * 8,
        "the second snapshot reused under 80% of its pages: {s2}"
    );
    assert!(
        n(&s2, "bytes_added") * 10 < n(&s1, "bytes_added"),
        "the second snapshot added over a tenth of the first: {s1} vs {s2}"
    );

    let ls = sx.ls();
    let (e1, e2) = (
        entry_with_tag(&ls, "first:latest"),
        entry_with_tag(&ls, "second:latest"),
    );
    let nb = |e: &Value| e["new_bytes"].as_u64().unwrap();
    assert_eq!(nb(e1), n(&s1, "bytes_added"), "{e1}");
    assert!(nb(e2) * 10 < nb(e1), "ls new_bytes: {e1} vs {e2}");

    let d = sx
        .ok(&["snapshot", "diff", "--format", "json", "first", "second"])
        .json();
    let p = &d["pages"];
    let pages_b = p["pages_b"].as_u64().unwrap();
    let new_content = p["new_content"].as_u64().unwrap();
    assert!(pages_b > 0, "{d:#}");
    assert!(
        new_content * 5 < pages_b,
        "diff: over a fifth of the second snapshot's pages are new: {p}"
    );
    assert!(
        d["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"].as_str().is_some_and(|n| n.starts_with("pages-"))),
        "diff lists no pages file: {d:#}"
    );
    let text = sx.ok(&["snapshot", "diff", "first", "second"]).stdout;
    assert!(text.contains("pages: "), "{text}");
}

// ---------------------------------------------------------------------------
// Integrity

/// Runs `stasis ARGS` with a private tmpfs on /dev/shm (its own mount namespace)
/// and returns its output and what it left in that /dev/shm: exact even while
/// other tests stage snapshots in the real /dev/shm.
fn with_private_shm(sx: &Sx, args: &[&str]) -> (Out, Vec<String>) {
    let left = sx.path("shm-left");
    let script = format!(
        "mount -t tmpfs stasis-test-shm /dev/shm || exit 99; \"$0\" \"$@\"; rc=$?; \
         ls -A /dev/shm > '{}'; exit $rc",
        left.display()
    );
    let real = sx.command(Some(&sx.store), args);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(real.get_program())
        .args(real.get_args());
    let out = Proc::spawn(cmd, true).wait(CMD);
    assert_ne!(
        out.code,
        Some(99),
        "could not mount a private /dev/shm: {out:#?}"
    );
    let names = fs::read_to_string(&left)
        .unwrap_or_else(|e| panic!("{}: {e} ({out:#?})", left.display()))
        .lines()
        .map(str::to_string)
        .collect();
    (out, names)
}

#[test]
fn corrupted_pack_is_refused_at_restore_and_leaves_nothing() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-corrupt");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let short = printed_snapshot_id(&sx.ok(&["checkpoint", "--tag", "victim", &id]));
    sx.ok(&["snapshot", "verify", "--read-data"]);

    // Flip one byte in the middle of the frames of the snapshot's first pack.
    let m = manifest_of(&sx.store, "victim:latest");
    let pack = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.stasis.pack.v1")
        .unwrap_or_else(|| panic!("no pack layer in {m:#}"));
    let hex = pack["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    let path = sx.store.join("blobs/sha256").join(&hex);
    let mut data = fs::read(&path).unwrap();
    assert_eq!(&data[..8], b"STASPACK");
    let t = data.len() - 64;
    let index_offset = u64::from_le_bytes(data[t..t + 8].try_into().unwrap()) as usize;
    assert!(
        index_offset > 16 && index_offset < t,
        "bad trailer in {hex}"
    );
    let at = (16 + index_offset) / 2;
    data[at] ^= 0xff;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, &data).unwrap();

    let id2 = unique_id("sf-corrupt2");
    let _g2 = sx.guard(&id2);
    let (out, shm_left) = with_private_shm(&sx, &["restore", "-d", "--from", "victim", &id2]);
    // Naming the snapshot, the file, the offset and the blob.
    assert_fails(&out, &[&short, &hex, "file ", "offset"]);
    assert!(
        shm_left.is_empty(),
        "the refused restore left in /dev/shm: {shm_left:?}"
    );
    assert!(
        sx.state(&id2).is_none(),
        "{id2} exists after a refused restore"
    );
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert!(cgroups_named(&id2).is_empty(), "cgroups of {id2} left");
    assert!(
        sx.store_tmp(&sx.store).is_empty(),
        "left in the store's tmp/: {:?}",
        sx.store_tmp(&sx.store)
    );

    let v = sx.run(&["snapshot", "verify", "--read-data"]);
    assert!(
        matches!(v.code, Some(c) if c != 0),
        "verify --read-data passed a corrupted pack: {v:#?}"
    );
    let problems: Vec<&str> = v.stdout.lines().filter(|l| l.contains(&hex)).collect();
    assert!(
        !problems.is_empty() && problems.iter().all(|l| l.contains(&short)),
        "verify does not list the corrupt pack {hex} of {short}: {v:#?}"
    );
    assert!(v.stderr.contains("error"), "{v:#?}");
    // Export refuses to spread corrupt data.
    let tar = sx.path("victim.tar");
    assert_fails(
        &sx.run(&["snapshot", "export", "victim", "-o", tar.to_str().unwrap()]),
        &[&hex],
    );
    // Repaired, the same snapshot restores.
    data[at] ^= 0xff;
    fs::write(&path, &data).unwrap();
    sx.ok(&["snapshot", "verify", "--read-data"]);
    let id3 = unique_id("sf-corrupt3");
    let _g3 = sx.restore_from("victim", &id3, &[]);
    sx.wait_counter(&id3, "readable", |_| true);
}

#[test]
fn export_import_into_a_second_store_then_restore() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-export");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 5", |n| n >= 5);
    let short = printed_snapshot_id(&sx.ok(&["checkpoint", "--tag", "moving:v1", &id]));

    let tar = sx.path("moving.tar");
    let out = sx.ok(&[
        "snapshot",
        "export",
        "moving:v1",
        "-o",
        tar.to_str().unwrap(),
    ]);
    assert!(out.stdout.contains("exported"), "{out:#?}");
    assert!(fs::metadata(&tar).unwrap().len() > 0);

    // The second store is named by STASIS_STORE (no --store flag).
    let store2 = sx.path("store2");
    let mut cmd = sx.command(None, &["snapshot", "import", tar.to_str().unwrap()]);
    cmd.env("STASIS_STORE", &store2);
    let out = run_cmd(cmd, CMD).expect_ok();
    assert!(
        out.stdout.contains(&format!("imported {short}")),
        "import does not name {short}: {out:#?}"
    );
    let ls2 = sx.ls_in(&store2);
    assert_eq!(ls2.len(), 1, "{ls2:#?}");
    let e = entry_with_tag(&ls2, "moving:v1");
    assert_eq!(e["id"], short.as_str());
    assert_eq!(e["container"], id.as_str());
    sx.run_in(&store2, &["snapshot", "verify", "--read-data"])
        .expect_ok();
    // Importing again changes nothing.
    sx.run_in(&store2, &["snapshot", "import", tar.to_str().unwrap()])
        .expect_ok();
    assert_eq!(sx.ls_in(&store2).len(), 1);

    let id2 = unique_id("sf-export2");
    let _g2 = sx.guard(&id2);
    sx.restore_from_in(&store2, "moving:v1", &id2, &[])
        .expect_ok();
    sx.assert_carries_on(&id2, &before);
    assert!(sx.store_tmp(&store2).is_empty(), "store2 tmp/ not empty");
}

// ---------------------------------------------------------------------------
// The catalog

#[test]
fn snapshot_ls_inspect_tag_rm_gc() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-cat");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let a = printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "a", &id]));
    sx.wait_counter(&id, "reached 10", |n| n >= 10);
    let b_id = printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "b", &id]));
    assert_ne!(a, b_id);

    // ls: oldest first.
    let ls = sx.ls();
    assert_eq!(ls.len(), 2, "{ls:#?}");
    assert_eq!(ls[0]["id"], a.as_str());
    assert_eq!(ls[1]["id"], b_id.as_str());
    let table = sx.ok(&["snapshot", "ls"]).stdout;
    for s in [&a, &b_id, &"a:latest".to_string(), &id] {
        assert!(table.contains(s.as_str()), "ls table lacks {s}:\n{table}");
    }

    // inspect: the whole record, by tag or by id.
    let cfg = sx
        .ok(&["snapshot", "inspect", "--format", "json", "a"])
        .json();
    assert!(
        cfg["snapshotId"].as_str().unwrap().starts_with(&a),
        "{cfg:#}"
    );
    assert_eq!(cfg["container"], id.as_str());
    assert_eq!(cfg["sizes"]["imageBytes"], ls[0]["size"]);
    let files = cfg["files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["name"] == "inventory.img"),
        "no inventory.img in {files:?}"
    );
    assert!(files
        .iter()
        .any(|f| f["kind"] == "pages" && f["pageTable"].is_string()));
    let meta = &cfg["metadata"];
    assert!(
        meta["criu"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with('4')),
        "{meta:#}"
    );
    assert_eq!(
        fs::canonicalize(meta["bundle"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&b).unwrap()
    );
    for k in ["kernel", "arch", "page_size", "cgroup_version"] {
        assert!(!meta["host"][k].is_null(), "no host.{k} in {meta:#}");
    }
    assert!(
        cfg["configJson"]["data"]
            .as_str()
            .is_some_and(|d| d.contains("/proc/sys/kernel/random/uuid")),
        "config.json not recorded"
    );
    let by_id = sx
        .ok(&["snapshot", "inspect", "--format", "json", &b_id])
        .json();
    assert!(by_id["snapshotId"].as_str().unwrap().starts_with(&b_id));
    let text = sx.ok(&["snapshot", "inspect", "a"]).stdout;
    assert!(text.starts_with("snapshot "), "{text}");
    // The summary (store_cli::inspect_summarises_and_shows_the_tags); the
    // per-file record is in --format json.
    assert!(text.contains("a:latest"), "{text}");

    // tag: a second name for a; moving a tag.
    sx.ok(&["snapshot", "tag", "a", "keep:v1"]);
    let ls = sx.ls();
    let tags: Vec<&Value> = ls[0]["tags"].as_array().unwrap().iter().collect();
    assert!(tags.contains(&&Value::from("keep:v1")), "{ls:#?}");
    assert!(tags.contains(&&Value::from("a:latest")), "{ls:#?}");
    sx.ok(&["snapshot", "tag", &b_id, "moving"]);
    sx.ok(&["snapshot", "tag", "a", "moving"]);
    assert_eq!(entry_with_tag(&sx.ls(), "moving:latest")["id"], a.as_str());
    assert_one_line(
        &sx.run(&["snapshot", "tag", "a", "Bad Tag!"]),
        &["Bad Tag!"],
    );

    // rm b's last tag: b goes; gc frees its blobs.
    let out = sx.ok(&["snapshot", "rm", "b"]);
    assert!(out.stdout.contains("removed b:latest"), "{out:#?}");
    assert!(
        out.stdout.contains(&b_id),
        "rm does not name {b_id}: {out:#?}"
    );
    assert_eq!(sx.ls().len(), 1);
    let bytes0 = blob_bytes(&sx.store);
    let dry = sx.ok(&["snapshot", "gc", "--dry-run"]).stdout;
    assert!(dry.starts_with("would remove "), "{dry}");
    assert!(!dry.starts_with("would remove 0 blob"), "{dry}");
    assert_eq!(blob_bytes(&sx.store), bytes0, "gc --dry-run removed blobs");
    let gc = sx.ok(&["snapshot", "gc"]).stdout;
    assert!(
        gc.starts_with("removed ") && !gc.starts_with("removed 0 blob"),
        "{gc}"
    );
    let bytes1 = blob_bytes(&sx.store);
    assert!(bytes1 < bytes0, "gc freed nothing: {bytes0} -> {bytes1}");
    let v = sx.ok(&["snapshot", "verify", "--read-data"]);
    assert!(v.stdout.contains("no errors found"), "{v:#?}");
    // a still restores after gc.
    let id2 = unique_id("sf-cat2");
    let g2 = sx.restore_from("keep:v1", &id2, &[]);
    sx.wait_counter(&id2, "readable", |_| true);
    // A second gc has nothing to do.
    let gc = sx.ok(&["snapshot", "gc"]).stdout;
    assert!(gc.starts_with("removed 0 blob"), "{gc}");

    drop(g2);
    // rm one of a's tags: a stays; rm by id: every tag goes.
    sx.ok(&["snapshot", "rm", "a"]);
    assert_eq!(entry_with_tag(&sx.ls(), "keep:v1")["id"], a.as_str());
    let out = sx.ok(&["snapshot", "rm", &a]);
    assert!(out.stdout.contains("keep:v1"), "{out:#?}");
    assert!(sx.ls().is_empty());
    sx.ok(&["snapshot", "gc"]);
    assert_eq!(
        names_in(&sx.store.join("blobs/sha256")),
        Vec::<String>::new(),
        "blobs left after every snapshot was removed and gc ran"
    );
    assert!(sx.store_tmp(&sx.store).is_empty());
    sx.ok(&["snapshot", "verify", "--read-data"]);
    // Nor is a restore's cached root filesystem kept for a snapshot that is gone.
    let bases = names_in(&sx.store.join("cache/fs"));
    assert!(
        bases.is_empty(),
        "gc kept the cached rootfs of removed snapshots: cache/fs/{bases:?}"
    );

    for args in [
        &["snapshot", "inspect", "a"][..],
        &["snapshot", "rm", "a"],
        &["snapshot", "tag", "a", "x"],
    ] {
        assert_one_line(&sx.run(args), &["\"a\"", "no snapshot"]);
    }
}

// ---------------------------------------------------------------------------
// Bad input

#[test]
fn unknown_tag_is_a_clear_error() {
    let sx = setup!();
    let id = unique_id("sf-unknown");
    let _g = sx.guard(&id);
    // Empty store.
    let out = sx.restore_from_in(&sx.store, "no-such-tag", &id, &[]);
    assert_one_line(&out, &["\"no-such-tag\"", "no snapshot"]);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");

    // A store with another snapshot: the error lists what there is.
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id0 = unique_id("sf-unknown0");
    let _g0 = sx.run_d(&b, &id0);
    sx.wait_counter(&id0, "reached 2", |n| n >= 2);
    sx.ok(&["checkpoint", "--tag", "real:v1", &id0]);
    for name in ["no-such-tag", "real:v2", "deadbeef"] {
        let out = sx.restore_from_in(&sx.store, name, &id, &[]);
        assert_one_line(&out, &[&format!("\"{name}\""), "real:v1"]);
    }
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert!(cgroups_named(&id).is_empty());
    let tar = sx.path("x.tar");
    assert_one_line(
        &sx.run(&["snapshot", "export", "nope", "-o", tar.to_str().unwrap()]),
        &["\"nope\""],
    );
    assert!(!tar.exists(), "a failed export created {}", tar.display());
}

#[test]
fn import_of_a_missing_or_bad_file_names_it_once() {
    let sx = setup!();
    let missing = sx.path("missing.tar");
    let out = sx.run(&["snapshot", "import", missing.to_str().unwrap()]);
    assert_one_line(&out, &[missing.to_str().unwrap()]);
    assert_eq!(
        out.stderr.matches("No such file or directory").count(),
        1,
        "the cause is printed more than once: {out:#?}"
    );
    let junk = sx.path("junk.tar");
    fs::write(&junk, b"this is not a tar file at all").unwrap();
    let out = sx.run(&["snapshot", "import", junk.to_str().unwrap()]);
    assert_one_line(&out, &[junk.to_str().unwrap()]);
    assert!(sx.ls().is_empty());
    assert!(
        sx.store_tmp(&sx.store).is_empty(),
        "import left files in tmp/"
    );
    sx.ok(&["snapshot", "verify", "--read-data"]);
}

#[test]
fn a_non_store_directory_is_refused_and_left_alone() {
    let sx = setup!();
    let dir = sx.path("not-a-store");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("notes.txt"), "mine\n").unwrap();
    let d = dir.to_str().unwrap();
    let needles = [d, "not a stasis store"];

    assert_one_line(&sx.run_in(&dir, &["snapshot", "ls"]), &needles);
    assert_one_line(&sx.run_in(&dir, &["snapshot", "gc"]), &needles);
    let mut cmd = sx.command(None, &["snapshot", "verify"]);
    cmd.env("STASIS_STORE", &dir);
    assert_one_line(&run_cmd(cmd, CMD), &needles);
    let id = unique_id("sf-nostore");
    let _g = sx.guard(&id);
    assert_one_line(&sx.restore_from_in(&dir, "x", &id, &[]), &needles);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");

    // checkpoint --tag into it is refused before the dump: the container runs on.
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id1 = unique_id("sf-nostore1");
    let _g1 = sx.run_d(&b, &id1);
    sx.wait_counter(&id1, "reached 2", |n| n >= 2);
    assert_one_line(
        &sx.run_in(&dir, &["checkpoint", "--tag", "t", &id1]),
        &needles,
    );
    assert_eq!(sx.state(&id1).unwrap()["status"], "running");
    let c = sx.wait_counter(&id1, "readable", |_| true);
    sx.wait_counter(&id1, "advanced after a refused checkpoint", |n| n > c.1);

    assert_eq!(
        names_in(&dir),
        vec!["notes.txt".to_string()],
        "store dir changed"
    );
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine\n");
}

#[test]
fn concurrent_first_use_of_a_new_store() {
    let sx = setup!();
    // Several stasis processes opening a store directory that does not exist yet
    // (e.g. two `prewarm`s started together) all get a valid store. `import`
    // creates its store before reading the archive (here a missing one, so each
    // fails on the file, never on the store); read commands create none.
    let missing = sx.path("no-such-archive.tar");
    let missing = missing.to_str().unwrap();
    for round in 0..5 {
        let store = sx.path(&format!("fresh-{round}"));
        let procs: Vec<Proc> = (0..4)
            .map(|_| {
                let args = ["snapshot", "import", missing];
                Proc::spawn(sx.command(Some(&store), &args), true)
            })
            .collect();
        for p in procs {
            assert_one_line(&p.wait(CMD), &[missing]);
        }
        sx.run_in(&store, &["snapshot", "verify"]).expect_ok();
        assert!(store.join("oci-layout").is_file());
    }
}

/// The staging directory an error message says an image or log was kept in.
fn kept_staging(stderr: &str) -> Option<PathBuf> {
    let at = stderr.find("stasis-staging-")?;
    let start = stderr[..at]
        .rfind(|c: char| c.is_whitespace())
        .map_or(0, |i| i + 1);
    let end = at
        + stderr[at..]
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(stderr.len() - at);
    Some(PathBuf::from(&stderr[start..end]))
}

#[test]
fn invalid_tag_is_refused_before_the_dump() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-badtag");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    let out = sx.run(&["checkpoint", "--tag", "Bad Tag!", &id]);
    // Clean up a staging directory the failure may have kept.
    if let Some(st) = kept_staging(&out.stderr) {
        let _ = fs::remove_dir_all(&st);
    }
    assert_one_line(&out, &["Bad Tag!"]);
    assert!(
        sx.state(&id).is_some(),
        "a checkpoint with an invalid tag stopped and removed {id}: {out:#?}"
    );
    let c = sx.wait_counter(&id, "readable", |_| true);
    sx.wait_counter(&id, "advanced after a refused checkpoint", |n| n > c.1);
    assert!(sx.ls().is_empty());
}

#[test]
fn failed_tagged_checkpoint_keeps_the_log_it_names() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-faildump");
    let _g = sx.guard(&id);
    // A host file as the container's stderr cannot be dumped by CRIU 4.2 (it cannot look up the mount of fd 2).
    let errf = sx.path("container.err");
    let mut cmd = sx.command(
        Some(&sx.store),
        &["run", "-d", "--bundle", b.to_str().unwrap(), &id],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&errf).unwrap());
    assert!(cmd.status().unwrap().success());
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    let out = sx.run(&["checkpoint", "--tag", "never", &id]);
    assert_fails(&out, &["criu dump failed", "full log: "]);
    let at = out.stderr.rfind("full log: ").unwrap();
    let log = PathBuf::from(
        out.stderr[at + "full log: ".len()..]
            .lines()
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(')'),
    );
    let exists = log.is_file();
    if let Some(st) = kept_staging(&log.display().to_string()) {
        let _ = fs::remove_dir_all(&st);
    }
    assert!(
        exists,
        "the error names {} but it was removed with the staging directory: {out:#?}",
        log.display()
    );
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
    assert!(sx.ls().is_empty());
}

// ---------------------------------------------------------------------------
// The recorded bundle

#[test]
fn restore_from_needs_no_bundle_when_the_snapshot_carries_its_filesystem() {
    let sx = setup!();
    let b = sx.bundle("orig", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-fs");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let short = printed_snapshot_id(&sx.ok(&["checkpoint", "--tag", "withfs", &id]));
    let cfg = sx
        .ok(&["snapshot", "inspect", "--format", "json", "withfs"])
        .json();
    let fsm = &cfg["metadata"]["filesystem"];
    assert!(
        fsm["trees"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["role"] == "rootfs" && t["entries"].as_u64() > Some(100))),
        "the rootfs was not captured: {fsm:#}"
    );
    let names: Vec<&str> = cfg["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(
        names.contains(&"fsdata-0.bin") && names.contains(&"fs-manifest.json"),
        "{names:?}"
    );

    // The original bundle is gone; the snapshot has its config.json and rootfs.
    fs::remove_dir_all(&b).unwrap();
    let id2 = unique_id("sf-fs2");
    let g2 = sx.restore_from("withfs", &id2, &[]);
    let st = sx.state(&id2).unwrap();
    assert_eq!(
        Path::new(st["bundle"].as_str().unwrap()),
        sx.env.root.join(".copies").join(&id2).join("bundle"),
        "{st}"
    );
    sx.assert_carries_on(&id2, &before);
    let ident: Value = serde_json::from_str(
        &sx.ok(&["exec", &id2, "cat", "/.stasis/identity.json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(ident["container_id"], id2.as_str(), "{ident}");
    assert_eq!(ident["snapshot"], short.as_str(), "{ident}");
    drop(g2);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert_eq!(mounts_under(&sx.env.root), Vec::<String>::new());
}

#[test]
fn restore_from_without_filesystem_uses_the_recorded_bundle_or_asks_for_one() {
    let sx = setup!();
    let b = sx.bundle("orig", &["sh", "-c", COUNTER]);
    let id = unique_id("sf-bundle");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let short = printed_snapshot_id(&sx.ok(&["checkpoint", "--ignore-rootfs", "--tag", "rb", &id]));

    // No --bundle: the one recorded at checkpoint.
    let id2 = unique_id("sf-bundle2");
    let g2 = sx.restore_from("rb", &id2, &[]);
    let st = sx.state(&id2).unwrap();
    assert_eq!(
        fs::canonicalize(st["bundle"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&b).unwrap(),
        "{st}"
    );
    sx.assert_carries_on(&id2, &before);
    drop(g2);

    // The bundle is gone: the error says to pass --bundle.
    fs::remove_dir_all(&b).unwrap();
    let id3 = unique_id("sf-bundle3");
    let _g3 = sx.guard(&id3);
    let out = sx.restore_from_in(&sx.store, "rb", &id3, &[]);
    assert_one_line(&out, &[&short, "--bundle"]);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert!(cgroups_named(&id3).is_empty());
    assert!(sx.store_tmp(&sx.store).is_empty());

    // Another bundle with the same rootfs and config.
    let b2 = sx.bundle("other", &["sh", "-c", COUNTER]);
    sx.restore_from_in(&sx.store, "rb", &id3, &["--bundle", b2.to_str().unwrap()])
        .expect_ok();
    let st = sx.state(&id3).unwrap();
    assert_eq!(
        fs::canonicalize(st["bundle"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&b2).unwrap(),
        "{st}"
    );
    sx.assert_carries_on(&id3, &before);
}

// ---------------------------------------------------------------------------
// A full disk

/// Unmounts the small tmpfs even when the test fails.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_store_on_a_full_disk_fails_cleanly_and_stays_valid() {
    let sx = setup!();
    // A 4 MiB tmpfs as the store: the first snapshot (a few MiB of random data in
    // the container's memory, ~1 MiB of busybox rootfs) cannot fit.
    let store = sx.path("small-store");
    fs::create_dir_all(&store).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(st.success(), "mount a small tmpfs at {}", store.display());
    let _m = TmpfsMount(store.clone());
    let b = sx.bundle(
        "b",
        &[
            "sh",
            "-c",
            "head -c 8388608 /dev/urandom > /dev/shm/blob; i=0; while true; do i=$((i+1)); echo \"c $i\" > /tmp/c; sleep 0.1; done",
        ],
    );
    let id = unique_id("sf-full");
    let _g = sx.run_d(&b, &id);
    // The counter starts once the blob is written.
    sx.wait_counter(&id, "counting after the blob", |n| n >= 1);
    let out = sx.run_in(
        &store,
        &["checkpoint", "--leave-running", "--tag", "full", &id],
    );
    if let Some(st) = kept_staging(&out.stderr) {
        let _ = fs::remove_dir_all(&st);
    }
    assert_fails(&out, &["No space left on device"]);
    // The container went on running, the store holds no snapshot and verifies clean.
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
    let ls = sx
        .run_in(&store, &["snapshot", "ls", "--format", "json"])
        .expect_ok();
    assert_eq!(ls.stdout.trim(), "[]", "{ls:#?}");
    sx.run_in(&store, &["snapshot", "verify"]).expect_ok();
    // After gc the temp files of the failed ingest are gone.
    sx.run_in(&store, &["snapshot", "gc"]).expect_ok();
    let tmp: Vec<String> = names_in(&store.join("tmp"));
    assert!(tmp.is_empty(), "left in the store's tmp/: {tmp:?}");
}

// ---------------------------------------------------------------------------
// Filesystem state and copies

/// `stasis exec ID sh -c CMD` on this test's root, stdout trimmed.
fn sh_in(sx: &Sx, id: &str, cmd: &str) -> String {
    sx.ok(&["exec", id, "sh", "-c", cmd])
        .stdout
        .trim()
        .to_string()
}

#[test]
fn copies_get_the_checkpoint_time_filesystem_and_do_not_see_each_other() {
    let sx = setup!();
    // The process appends to a file in its rootfs and keeps the line count in
    // memory; it checks on every step that the file still has exactly that many
    // lines (a restore onto a file that grew would break it).
    let b = sx.bundle(
        "b",
        &[
            "sh",
            "-c",
            "mkdir -p /data; n=0; : > /data/log; \
             while true; do n=$((n+1)); echo line$n >> /data/log; \
             c=$(wc -l < /data/log); [ $c -eq $n ] || { echo MISMATCH > /data/bad; }; \
             echo $n > /data/n; sleep 0.05; done",
        ],
    );
    crate::common::edit_config(&b, |c| c["root"]["readonly"] = serde_json::json!(false));
    let id = unique_id("sf-fs");
    let _g = sx.run_d(&b, &id);
    crate::common::wait_until("10 lines", Duration::from_secs(10), || {
        fs::read_to_string(b.join("rootfs/data/n"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n >= 10)
    });
    sx.ok(&["checkpoint", "--leave-running", "--tag", "fs", &id]);
    // The original keeps growing its file after the checkpoint.
    std::thread::sleep(Duration::from_millis(500));
    // `echo $n > /data/n` truncates before it writes: read until a number shows.
    let mut grown = 0u64;
    crate::common::wait_until("a number in /data/n", Duration::from_secs(5), || {
        match crate::common::read_trim(&b.join("rootfs/data/n")).parse() {
            Ok(n) => {
                grown = n;
                true
            }
            Err(_) => false,
        }
    });

    let prefix = unique_id("sf-copy");
    let out = sx
        .run_starting(
            &sx.store,
            &[
                "restore",
                "-d",
                "--from",
                "fs",
                "--copies",
                "3",
                "--name-prefix",
                &prefix,
            ],
        )
        .expect_ok();
    let ids: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    let _guards: Vec<_> = ids.iter().map(|i| sx.guard(i)).collect();
    let _ = out;
    let mut generations = Vec::new();
    for (i, c) in ids.iter().enumerate() {
        // Restored from checkpoint-time content: the copy's file is consistent with
        // its memory (no MISMATCH) and started below what the original has now.
        assert_eq!(
            sh_in(&sx, c, "cat /data/bad 2>/dev/null || echo ok"),
            "ok",
            "copy {c}"
        );
        // The counter and the file are read with the copy paused, from the
        // host side of its overlay, so the loop cannot step between the reads.
        let data = sx.env.root.join(".copies").join(c).join("merged/data");
        let (mut n, mut lines) = (0u64, 0u64);
        crate::common::wait_until(
            "a paused copy with a number in /data/n",
            Duration::from_secs(10),
            || {
                sx.ok(&["pause", c]);
                let read = crate::common::read_trim(&data.join("n")).parse::<u64>();
                lines =
                    fs::read_to_string(data.join("log")).map_or(0, |l| l.lines().count() as u64);
                sx.ok(&["resume", c]);
                // Paused between the truncation and the write of `echo $n > /data/n`:
                // let it step on and look again.
                read.map(|v| n = v).is_ok()
            },
        );
        assert!(
            lines >= n && lines <= n + 1,
            "copy {c}: {lines} lines, n={n}"
        );
        // Each copy writes the same path; none sees another's write.
        sh_in(&sx, c, &format!("echo {c} > /data/who"));
        let ident: Value =
            serde_json::from_str(&sh_in(&sx, c, "cat /.stasis/identity.json")).unwrap();
        assert_eq!(ident["copy_index"], i as u64);
        assert_eq!(ident["container_id"], c.as_str());
        generations.push(ident["generation"].as_str().unwrap().to_string());
        let env = sh_in(&sx, c, "echo $STASIS_COPY_INDEX/$STASIS_GENERATION");
        assert_eq!(env, format!("{i}/{}", generations[i]));
    }
    for c in &ids {
        assert_eq!(sh_in(&sx, c, "cat /data/who"), c.as_str());
    }
    // One restore command, one generation; the original's rootfs is untouched.
    assert!(generations.iter().all(|g| g == &generations[0]));
    assert!(!b.join("rootfs/data/who").exists());
    let now: u64 = crate::common::read_trim(&b.join("rootfs/data/n"))
        .parse()
        .unwrap();
    assert!(now >= grown);
    // delete removes each copy's overlay, volumes and bundle.
    for c in &ids {
        sx.ok(&["delete", "--force", c]);
    }
    assert!(
        mounts_under(&sx.env.root).is_empty(),
        "{:?}",
        mounts_under(&sx.env.root)
    );
    assert!(names_in(&sx.env.root.join(".copies")).is_empty());
}

/// A writable bundle whose process sleeps, with a small `/data/f` ("v1") and a
/// ~240 KB `/data/big` (returned) in its rootfs.
fn data_bundle(sx: &Sx) -> (PathBuf, String) {
    let b = sx.bundle("b", &["sh", "-c", "while :; do sleep 1; done"]);
    crate::common::edit_config(&b, |c| c["root"]["readonly"] = serde_json::json!(false));
    fs::create_dir_all(b.join("rootfs/data")).unwrap();
    fs::write(b.join("rootfs/data/f"), "v1\n").unwrap();
    let big: String = (0..20_000).map(|i| format!("line {i:08}\n")).collect();
    fs::write(b.join("rootfs/data/big"), &big).unwrap();
    (b, big)
}

#[test]
fn second_capture_reads_only_the_changed_file_and_diff_lists_it() {
    let sx = setup!();
    let (b, big) = data_bundle(&sx);
    let id = unique_id("sf-stat");
    let _g = sx.run_d(&b, &id);
    // Files changed within the last second stay out of the stat cache (their
    // ctime could repeat): let every file of the fresh bundle age past that.
    std::thread::sleep(Duration::from_millis(1500));
    sx.ok(&["checkpoint", "--leave-running", "--tag", "st:1", &id]);
    sh_in(&sx, &id, "echo v2 > /data/f");
    sx.ok(&["checkpoint", "--leave-running", "--tag", "st:2", &id]);

    let inspect = |tag: &str| {
        sx.ok(&["snapshot", "inspect", "--format", "json", tag])
            .json()
    };
    let (i1, i2) = (inspect("st:1"), inspect("st:2"));
    let cap = |v: &Value, k: &str| {
        v["metadata"]["filesystem"]["capture"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no capture.{k}: {:#}", v["metadata"]["filesystem"]))
    };
    // The first capture read every file; the second only the changed one.
    assert_eq!(cap(&i1, "files_unchanged"), 0);
    assert_eq!(cap(&i1, "files_read_frozen"), cap(&i1, "files"));
    assert_eq!(cap(&i2, "files_read_frozen"), 1, "{:#}", i2["metadata"]);
    assert_eq!(cap(&i2, "bytes_read_frozen"), 3);
    assert_eq!(cap(&i2, "files_unchanged"), cap(&i2, "files") - 1);
    assert!(cap(&i2, "bytes_unchanged") >= big.len() as u64);
    assert!(i2["metadata"]["timings_ms"]["fs_capture"].is_u64());
    // inspect's filesystem summary.
    let fs2 = &i2["filesystem"];
    assert_eq!(fs2["files"], i2["metadata"]["filesystem"]["files"]);
    assert!(fs2["new_bytes"].as_u64().unwrap() < 64 * 1024, "{fs2:#}");
    assert!(
        inspect("st:1")["filesystem"]["new_bytes"].as_u64().unwrap() >= big.len() as u64,
        "{:#}",
        i1["filesystem"]
    );
    let text = sx.ok(&["snapshot", "inspect", "st:2"]).stdout;
    assert!(text.contains("filesystem: "), "{text}");

    // diff lists exactly the changed file.
    let d = sx
        .ok(&["snapshot", "diff", "--format", "json", "st:1", "st:2"])
        .json();
    let changes = d["filesystem"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{changes:#?}");
    assert_eq!(changes[0]["path"], "data/f");
    assert_eq!(changes[0]["tree"], "/");
    assert_eq!(changes[0]["change"], "changed");
    assert_eq!(changes[0]["size_a"], 3);
    let text = sx.ok(&["snapshot", "diff", "st:1", "st:2"]).stdout;
    assert!(text.contains("M /data/f"), "{text}");
    assert!(text.contains("1 changed"), "{text}");

    // Each snapshot restores its own content; the unchanged big file is intact.
    for (tag, want) in [("st:2", "v2"), ("st:1", "v1")] {
        let rid = unique_id("sf-stat-r");
        let _r = sx.restore_from(tag, &rid, &[]);
        assert_eq!(sh_in(&sx, &rid, "cat /data/f"), want, "{tag}");
        assert_eq!(
            sh_in(&sx, &rid, "wc -c < /data/big"),
            big.len().to_string(),
            "{tag}"
        );
        assert_eq!(
            sh_in(&sx, &rid, "tail -n 1 /data/big"),
            "line 00019999",
            "{tag}"
        );
    }
}

/// A restored copy checkpointed again without --leave-running: its private
/// rootfs goes away with it, so the unchanged files must be copied before that
/// (from the live files, not from the previous snapshot), and the snapshot
/// restores with the copy's latest content.
#[test]
fn a_restored_copy_checkpointed_without_leave_running_copies_unchanged_files_live() {
    let sx = setup!();
    let (b, _big) = data_bundle(&sx);
    let id = unique_id("sf-live");
    let g = sx.run_d(&b, &id);
    sx.ok(&["checkpoint", "--tag", "live:1", &id]);
    drop(g);
    let rid = unique_id("sf-live-r");
    let _r = sx.restore_from("live:1", &rid, &[]);
    // The copy's base was just materialised: let its files age past the stat
    // cache's one-second rule, then give the copy a stat cache.
    std::thread::sleep(Duration::from_millis(1500));
    sx.ok(&["checkpoint", "--leave-running", "--tag", "live:2", &rid]);
    sh_in(&sx, &rid, "echo v3 > /data/f");
    sx.ok(&["checkpoint", "--tag", "live:3", &rid]);
    let i3 = sx
        .ok(&["snapshot", "inspect", "--format", "json", "live:3"])
        .json();
    let cap = &i3["metadata"]["filesystem"]["capture"];
    assert_eq!(cap["files_read_frozen"], 1, "{cap:#}");
    assert!(cap["files_unchanged"].as_u64().unwrap() > 1, "{cap:#}");
    assert_eq!(cap["files_from_previous"], 0, "{cap:#}");
    let rid2 = unique_id("sf-live-r2");
    let _r2 = sx.restore_from("live:3", &rid2, &[]);
    assert_eq!(sh_in(&sx, &rid2, "cat /data/f"), "v3");
    assert_eq!(sh_in(&sx, &rid2, "tail -n 1 /data/big"), "line 00019999");
}

/// The first checkpoint of a copy restored onto an overlay reads only what the
/// copy changed while frozen: the files it never copied up are the snapshot's
/// own (its base), so their content comes from the live files after the thaw.
#[test]
fn a_restored_copy_first_checkpoint_reads_only_what_it_changed() {
    let sx = setup!();
    let (b, big) = data_bundle(&sx);
    let id = unique_id("sf-copy1st");
    let g = sx.run_d(&b, &id);
    let short1 = printed_snapshot_id(&sx.ok(&["checkpoint", "--tag", "first:1", &id]));
    drop(g);
    let rid = unique_id("sf-copy1st-r");
    let _r = sx.restore_from("first:1", &rid, &[]);
    // The base was materialised just now: let its files age past the margin.
    std::thread::sleep(Duration::from_millis(2500));
    sh_in(&sx, &rid, "echo v2 > /data/f");
    sx.ok(&["checkpoint", "--leave-running", "--tag", "first:2", &rid]);
    let i2 = sx
        .ok(&["snapshot", "inspect", "--format", "json", "first:2"])
        .json();
    let cap = &i2["metadata"]["filesystem"]["capture"];
    let n = |k: &str| cap[k].as_u64().unwrap_or_else(|| panic!("no {k}: {cap:#}"));
    // Read while frozen: /data/f and the copy's /.stasis/identity.json (both in
    // the upper layer), not the base's busybox or /data/big.
    assert!(n("files_read_frozen") <= 3, "{cap:#}");
    assert!(n("bytes_read_frozen") < 4096, "{cap:#}");
    assert!(n("bytes_unchanged") >= big.len() as u64, "{cap:#}");
    assert_eq!(n("files_from_previous"), 0, "{cap:#}");
    assert_eq!(
        i2["metadata"]["filesystem"]["stat_cache"]["base"],
        short1.as_str(),
        "{:#}",
        i2["metadata"]["filesystem"]
    );
    let rid2 = unique_id("sf-copy1st-r2");
    let _r2 = sx.restore_from("first:2", &rid2, &[]);
    assert_eq!(sh_in(&sx, &rid2, "cat /data/f"), "v2");
    assert_eq!(sh_in(&sx, &rid2, "tail -n 1 /data/big"), "line 00019999");
    assert_eq!(
        sh_in(&sx, &rid2, "wc -c < /data/big"),
        big.len().to_string()
    );
}
