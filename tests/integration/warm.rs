//! Warm starts through the CLI with a busybox httpd bundle and real CRIU:
//! `prewarm` with each probe kind (log, file, tcp, http, exec), then `restore
//! --from` and the service answers inside the restored network namespace; a probe
//! that never passes fails with its last error and the container's last output and
//! leaves nothing; `serve` relays sequential, concurrent and broken client
//! connections to restored copies, reports counters (`serve --status`), discards
//! idle copies, replaces a copy that was killed, stops cleanly on SIGTERM (no copy,
//! cgroup, overlay or private directory left), keeps its stats file valid JSON under
//! concurrent connections, and with `--persist` checkpoints the idle copy back into
//! the store (also when its own output goes to a file), whose state later copies
//! serve.
//!
//! Every test has a private `--root` and `--store`; `Serve` kills its server and
//! deletes every container of the test's root when dropped, even on panic.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{cgroups_named, unique_id, wait_until, Out};
use crate::store_flows::{
    assert_fails, entry_with_tag, http_get, left_in_root, mounts_under, names_in,
    printed_snapshot_id, run_cmd, Sx, CMD, WAIT,
};

/// The service: a line on stdout, httpd on port 8080 serving a page from the tmpfs
/// /tmp, then after a second `/tmp/ready` and another line.
const SERVICE: &str =
    "echo service-starting; mkdir -p /tmp/www; echo hello-from-httpd > /tmp/www/index.html; \
     httpd -f -p 8080 -h /tmp/www & sleep 1; touch /tmp/ready; echo service-ready; wait";
const BODY: &str = "hello-from-httpd\n";

/// `prewarm --bundle B --ready PROBE --tag TAG --id ID EXTRA...`.
fn prewarm(sx: &Sx, bundle: &Path, probe: &str, tag: &str, id: &str, extra: &[&str]) -> Out {
    let mut args = vec![
        "prewarm",
        "--bundle",
        bundle.to_str().unwrap(),
        "--ready",
        probe,
        "--tag",
        tag,
        "--id",
        id,
    ];
    args.extend_from_slice(extra);
    sx.run(&args)
}

/// A `NAME: VALUE` line of `--print-stats` as a number.
#[track_caller]
fn stat(out: &Out, name: &str) -> u64 {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in --print-stats output: {out:#?}"))
}

/// GET / on port 8080 inside the network namespace of `pid`, with the host's
/// busybox wget; None when it fails.
fn wget_in(pid: i32) -> Option<String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net")).args([
        "/bin/busybox",
        "wget",
        "-qO-",
        "http://127.0.0.1:8080/",
    ]);
    let out = run_cmd(cmd, Duration::from_secs(10));
    (out.code == Some(0)).then_some(out.stdout)
}

#[track_caller]
fn wait_wget(pid: i32, want: &str) {
    let mut last = None;
    let deadline = Instant::now() + WAIT;
    loop {
        last = wget_in(pid).or(last);
        if last.as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET in the netns of {pid}: wanted {want:?}, last got {last:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Prewarms the service with `probe`, checks the stats and that nothing is left
/// running, restores the snapshot and checks the service answers.
/// `after_marker`: the probe passes only after the service's 1 s sleep.
fn prewarm_then_restore(sx: &Sx, probe: &str, after_marker: bool) {
    let b = sx.bundle("svc", &["sh", "-c", SERVICE]);
    let wid = unique_id("warm");
    let _gw = sx.guard(&wid);
    let t0 = Instant::now();
    let out = prewarm(sx, &b, probe, "svc:v1", &wid, &["--print-stats"]).expect_ok();
    let took = t0.elapsed();
    let short = printed_snapshot_id(&out);
    let ready = stat(&out, "cold_start_to_ready_ms");
    assert!(
        u128::from(ready) <= took.as_millis(),
        "cold_start_to_ready_ms {ready} exceeds the whole prewarm ({took:?})"
    );
    if after_marker {
        assert!(
            ready >= 900,
            "{probe} passed after {ready} ms, before the service's 1 s sleep ended"
        );
    }
    for k in [
        "checkpoint_ms",
        "dump_ms",
        "ingest_ms",
        "image_bytes",
        "bytes_added",
    ] {
        stat(&out, k);
    }
    assert!(stat(&out, "image_bytes") > 0);
    // The warming container was checkpointed, stopped and removed.
    assert_eq!(left_in_root(sx), Vec::<String>::new(), "left in --root");
    assert!(cgroups_named(&wid).is_empty(), "cgroups of {wid} left");
    let ls = sx.ls();
    let e = entry_with_tag(&ls, "svc:v1");
    assert_eq!(e["id"], short.as_str());
    assert_eq!(e["container"], wid.as_str());

    let rid = unique_id("warm-r");
    let _gr = sx.restore_from("svc:v1", &rid, &[]);
    let pid = sx.pid(&rid);
    wait_wget(pid, BODY);
    if after_marker {
        sx.ok(&["exec", &rid, "test", "-f", "/tmp/ready"]);
    }
    // The service keeps its state: a page written now is served.
    sx.ok(&[
        "exec",
        &rid,
        "sh",
        "-c",
        "echo written-after-restore > /tmp/www/index.html",
    ]);
    wait_wget(pid, "written-after-restore\n");
}

#[test]
fn prewarm_log_probe_then_restore_answers() {
    let sx = setup!();
    prewarm_then_restore(&sx, "log:^service-re.dy$", true);
}

#[test]
fn prewarm_file_probe_then_restore_answers() {
    let sx = setup!();
    prewarm_then_restore(&sx, "file:/tmp/ready", true);
}

#[test]
fn prewarm_tcp_probe_then_restore_answers() {
    let sx = setup!();
    prewarm_then_restore(&sx, "tcp:127.0.0.1:8080", false);
}

#[test]
fn prewarm_http_probe_then_restore_answers() {
    let sx = setup!();
    prewarm_then_restore(&sx, "http://127.0.0.1:8080/", false);
}

#[test]
fn prewarm_exec_probe_then_restore_answers() {
    let sx = setup!();
    prewarm_then_restore(&sx, "exec:test -f /tmp/ready", true);
}

#[test]
fn probe_that_never_passes_fails_cleanly() {
    let sx = setup!();
    let b = sx.bundle("svc", &["sh", "-c", SERVICE]);
    let cases = [
        ("file:/tmp/never", "does not exist yet"),
        ("tcp:127.0.0.1:9999", "Connection refused"),
    ];
    // Two prewarms at once on a new store race to create it: create it first.
    sx.ok(&["snapshot", "ls"]);
    let ids: Vec<String> = cases.iter().map(|_| unique_id("warm-never")).collect();
    let _guards: Vec<_> = ids.iter().map(|i| sx.guard(i)).collect();
    std::thread::scope(|s| {
        for ((probe, why), id) in cases.iter().zip(&ids) {
            let (sx, b) = (&sx, &b);
            s.spawn(move || {
                let t0 = Instant::now();
                let out = prewarm(sx, b, probe, "never", id, &["--ready-timeout", "2s"]);
                let took = t0.elapsed();
                assert_fails(&out, &[probe, "never passed", why, "service-starting"]);
                assert!(
                    took >= Duration::from_secs(2) && took < Duration::from_secs(15),
                    "{probe}: failed after {took:?} with --ready-timeout 2s"
                );
                assert!(sx.state(id).is_none(), "{id} left after a failed prewarm");
                assert!(cgroups_named(id).is_empty(), "cgroups of {id} left");
            });
        }
    });
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert!(sx.ls().is_empty(), "a failed prewarm stored a snapshot");
}

// ---------------------------------------------------------------------------
// serve

/// A port nothing listens on now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prewarms the service as `svc:v1`. The file probe opens no connection to the
/// service (a tcp or http probe's connection can still be open in the service when
/// the checkpoint runs, and CRIU refuses it).
fn prewarmed(sx: &Sx) -> String {
    let b = sx.bundle("svc", &["sh", "-c", SERVICE]);
    let wid = unique_id("warm-srv");
    let _g = sx.guard(&wid);
    prewarm(sx, &b, "file:/tmp/ready", "svc:v1", &wid, &[]).expect_ok();
    "svc:v1".to_string()
}

/// Where a server's output goes.
enum ServeLog {
    /// Pipes drained by threads (copies inherit them, so they can be checkpointed).
    Pipes(Arc<Mutex<String>>),
    /// A host file (as `stasis serve ... > serve.log 2>&1` does).
    File(PathBuf),
}

/// A running `stasis serve`; dropping it SIGKILLs the server and force-deletes
/// every container of the test's root.
pub(crate) struct Serve {
    child: Option<Child>,
    log: ServeLog,
    pub(crate) listen: SocketAddr,
    bin: PathBuf,
    root: PathBuf,
    store: PathBuf,
    args: Vec<String>,
}

impl Serve {
    /// `serve` relaying to this file's service (httpd on port 8080).
    fn start(sx: &Sx, from: &str, extra: &[&str], log_file: Option<&Path>) -> Serve {
        Serve::start_on(sx, from, 8080, extra, log_file)
    }

    /// `serve --from FROM --port PORT EXTRA...` on a free local port; its output
    /// goes to `log_file`, or to pipes read into memory.
    pub(crate) fn start_on(
        sx: &Sx,
        from: &str,
        port: u16,
        extra: &[&str],
        log_file: Option<&Path>,
    ) -> Serve {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let l = listen.to_string();
        let port = port.to_string();
        let mut args = vec!["serve", "--from", from, "--listen", &l, "--port", &port];
        args.extend_from_slice(extra);
        let mut cmd = sx.command(Some(&sx.store), &args);
        cmd.stdin(Stdio::null());
        let log = match log_file {
            Some(f) => {
                let file = fs::File::create(f).unwrap();
                cmd.stdout(file.try_clone().unwrap()).stderr(file);
                ServeLog::File(f.to_path_buf())
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                ServeLog::Pipes(Arc::new(Mutex::new(String::new())))
            }
        };
        let mut child = cmd.spawn().expect("spawn stasis serve");
        if let ServeLog::Pipes(buf) = &log {
            let readers: Vec<Box<dyn Read + Send>> = vec![
                Box::new(child.stdout.take().unwrap()),
                Box::new(child.stderr.take().unwrap()),
            ];
            for mut r in readers {
                let buf = buf.clone();
                std::thread::spawn(move || {
                    let mut chunk = [0u8; 4096];
                    while let Ok(n) = r.read(&mut chunk) {
                        if n == 0 {
                            break;
                        }
                        buf.lock()
                            .unwrap()
                            .push_str(&String::from_utf8_lossy(&chunk[..n]));
                    }
                });
            }
        }
        let mut all = vec!["stasis".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Serve {
            child: Some(child),
            log,
            listen,
            bin: sx.env.bin.clone(),
            root: sx.env.root.clone(),
            store: sx.store.clone(),
            args: all,
        }
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub(crate) fn log(&self) -> String {
        match &self.log {
            ServeLog::Pipes(b) => b.lock().unwrap().clone(),
            ServeLog::File(f) => fs::read_to_string(f).unwrap_or_default(),
        }
    }

    /// Log lines (JSON with --log-format json) of `event`.
    pub(crate) fn events(&self, event: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    #[track_caller]
    fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "`{}` exited with {st}; its log:\n{}",
                self.args.join(" "),
                self.log()
            );
        }
    }

    /// Waits until `pred` holds for the log.
    #[track_caller]
    pub(crate) fn wait_log(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Serve) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(self) {
            self.assert_alive();
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; serve log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `serve --status --listen ADDR` (same --root).
    fn try_status(&self) -> Result<Value, Out> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--store")
            .arg(&self.store)
            .args(["serve", "--status", "--listen", &self.listen.to_string()]);
        let out = run_cmd(cmd, CMD);
        match serde_json::from_str(&out.stdout) {
            Ok(v) if out.code == Some(0) => Ok(v),
            _ => Err(out),
        }
    }

    /// `serve --status`, retried a few times: the stats file can be caught
    /// half-written (`serve_status_stays_valid_under_concurrent_connections`
    /// checks that separately).
    #[track_caller]
    fn status(&self) -> Value {
        let mut last = None;
        for _ in 0..20 {
            match self.try_status() {
                Ok(v) => return v,
                Err(out) => last = Some(out),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve --status failed 20 times in a row: {last:#?}");
    }

    /// The default stats file `serve --status` reads.
    fn stats_file(&self) -> PathBuf {
        self.root.join(format!(
            ".serve-{}-{}.json",
            self.listen.ip(),
            self.listen.port()
        ))
    }

    /// SIGTERM, then the exit code (None: still running after `timeout`).
    pub(crate) fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                return Some(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn get(&self) -> Result<(u16, String), String> {
        http_get(self.listen)
    }

    #[track_caller]
    fn get_ok(&self, want: &str) {
        match self.get() {
            Ok((200, body)) if body == want => {}
            other => panic!(
                "GET through serve: wanted 200 {want:?}, got {other:?}; serve log:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM first: a server killed in the middle of a restore leaves a
        // half-restored copy (mounts, processes) that `list` does not show.
        let running = matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)));
        if running && self.terminate(Duration::from_secs(30)).is_none() {
            eprintln!("serve ignored SIGTERM for 30s; killing it");
        }
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let list = Command::new(&self.bin)
            .arg("--root")
            .arg(&self.root)
            .args(["list", "-q"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        if let Ok(o) = list {
            for id in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new(&self.bin)
                    .arg("--root")
                    .arg(&self.root)
                    .args(["delete", "--force", id])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Ids of the containers in `list`.
pub(crate) fn listed(sx: &Sx) -> BTreeSet<String> {
    let v = sx.ok(&["list", "--format", "json"]).json();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn serve_copies(sx: &Sx) -> BTreeSet<String> {
    listed(sx)
        .into_iter()
        .filter(|i| i.starts_with("serve-"))
        .collect()
}

/// The copies that took connections, from `connection` events.
fn used_copies(srv: &Serve) -> BTreeSet<String> {
    srv.events("connection")
        .iter()
        .filter_map(|e| e["copy"].as_str().map(str::to_string))
        .collect()
}

/// Sets SO_LINGER 0, so closing the socket sends a reset.
fn linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a pointer to a live linger struct of
    // the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Stops the server with SIGTERM: exit 0, a `stopped` event, no copy left.
#[track_caller]
fn stop_cleanly(sx: &Sx, srv: &mut Serve) {
    let code = srv.terminate(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(0),
        "serve did not exit 0 on SIGTERM; log:\n{}",
        srv.log()
    );
    let log = srv.log();
    assert!(log.contains("stopped"), "no `stopped` line in:\n{log}");
    assert_eq!(
        serve_copies(sx),
        BTreeSet::new(),
        "copies left after SIGTERM; log:\n{log}"
    );
    let prefix = format!("serve-8080-{}-", srv.pid());
    assert!(
        cgroups_named(&prefix).is_empty(),
        "cgroups of copies left: {:?}",
        cgroups_named(&prefix)
    );
    let copies = names_in(&sx.env.root.join(".copies"));
    assert!(
        copies.is_empty(),
        "private filesystems of copies left: {copies:?}"
    );
    assert_eq!(mounts_under(&sx.env.root), Vec::<String>::new());
}

#[test]
fn serve_relays_sequential_concurrent_and_broken_connections() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let mut srv = Serve::start(
        &sx,
        &tag,
        &["--pool", "1", "--idle", "2s", "--log-format", "json"],
        None,
    );
    srv.wait_log("a ready copy", Duration::from_secs(30), |s| {
        !s.events("restored").is_empty()
    });
    let mut st = Value::Null;
    wait_until("status to show the ready copy", WAIT, || {
        st = srv.status();
        st["ready_copies"] == 1
    });
    assert_eq!(st["connections"], 0, "{st:#}");
    assert_eq!(st["restores"], 1, "{st:#}");

    for _ in 0..3 {
        srv.get_ok(BODY);
    }
    let results: Vec<Result<(u16, String), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8).map(|_| s.spawn(|| srv.get())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(
            r.as_ref().map(|(c, b)| (*c, b.as_str())),
            Ok((200, BODY)),
            "a concurrent GET failed: {results:?}; log:\n{}",
            srv.log()
        );
    }

    // Clients that go away midway: half a request, a reset right after the
    // request, and one that says nothing.
    {
        let mut s = TcpStream::connect(srv.listen).unwrap();
        s.write_all(b"GET / HT").unwrap();
    }
    {
        let mut s = TcpStream::connect(srv.listen).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        linger_zero(&s);
    }
    drop(TcpStream::connect(srv.listen).unwrap());
    srv.get_ok(BODY);
    srv.assert_alive();

    // Counters: 3 + 8 + 3 + 1 connections.
    wait_until("serve counters to settle", WAIT, || {
        st = srv.status();
        st["connections"].as_u64() >= Some(15) && st["in_flight"] == 0
    });
    assert!(st["restores"].as_u64() >= Some(1), "{st:#}");
    assert!(st["pool_hits"].as_u64() >= Some(1), "{st:#}");
    assert!(
        st["ttfb_ms"]["p50"].as_f64().is_some_and(|p| p > 0.0),
        "{st:#}"
    );
    assert!(st["ttfb_ms"]["samples"].as_u64() >= Some(12), "{st:#}");
    assert_eq!(st["pid"], srv.pid(), "{st:#}");

    // After --idle without connections, the used copies are discarded.
    let used = used_copies(&srv);
    assert!(!used.is_empty());
    srv.wait_log(
        "idle copies to be discarded",
        Duration::from_secs(20),
        |s| {
            let gone: BTreeSet<String> = s
                .events("discarded")
                .iter()
                .filter_map(|e| e["copy"].as_str().map(str::to_string))
                .collect();
            used.is_subset(&gone)
        },
    );
    let left = listed(&sx);
    assert!(
        used.is_disjoint(&left),
        "discarded copies still listed: {used:?} in {left:?}"
    );
    assert!(srv.status()["discarded"].as_u64() >= Some(used.len() as u64));
    // And the next request is served by another copy.
    srv.get_ok(BODY);
    stop_cleanly(&sx, &mut srv);
}

#[test]
fn serve_replaces_a_killed_copy_and_stops_on_sigterm() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let mut srv = Serve::start(
        &sx,
        &tag,
        &["--pool", "1", "--idle", "60s", "--log-format", "json"],
        None,
    );
    srv.wait_log("a ready copy", Duration::from_secs(30), |s| {
        !s.events("restored").is_empty()
    });
    srv.get_ok(BODY);
    // The log is read from a pipe by another thread: wait for the line.
    srv.wait_log("the connection event", WAIT, |s| !used_copies(s).is_empty());
    let used = used_copies(&srv);
    assert_eq!(used.len(), 1, "{used:?}");
    let victim = used.into_iter().next().unwrap();
    let pid = sx.pid(&victim);
    // SAFETY: kill(2) with a pid of a container process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until("the killed copy to die", WAIT, || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
    // The very next request is served (by another copy).
    srv.get_ok(BODY);
    srv.wait_log("the dead copy to be removed", WAIT, |s| {
        s.events("copy-removed")
            .iter()
            .any(|e| e["copy"] == victim.as_str())
    });
    assert!(
        !listed(&sx).contains(&victim),
        "the killed copy {victim} is still listed"
    );
    let st = srv.status();
    assert!(st["copies_died"].as_u64() >= Some(1), "{st:#}");
    assert!(st["restores"].as_u64() >= Some(2), "{st:#}");
    srv.get_ok(BODY);
    assert!(!serve_copies(&sx).is_empty());
    stop_cleanly(&sx, &mut srv);
}

#[test]
fn serve_status_stays_valid_under_concurrent_connections() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let mut srv = Serve::start(&sx, &tag, &["--pool", "1", "--idle", "60s"], None);
    srv.wait_log("a ready copy", Duration::from_secs(30), |s| {
        s.log().contains("serve: restored ")
    });
    srv.get_ok(BODY);
    let file = srv.stats_file();
    assert!(file.is_file(), "no stats file {}", file.display());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (reads, bad) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let (mut reads, mut bad) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text =
                    fs::read_to_string(&file).unwrap_or_else(|e| format!("<read failed: {e}>"));
                reads += 1;
                if serde_json::from_str::<Value>(&text).is_err() && bad.len() < 3 {
                    bad.push(text);
                }
            }
            (reads, bad)
        });
        for _ in 0..10 {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| srv.get())).collect();
            for h in hs {
                let r = h.join().unwrap();
                assert!(
                    matches!(&r, Ok((200, b)) if b == BODY),
                    "GET through serve: {r:?}"
                );
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap()
    });
    assert!(reads > 0);
    assert!(
        bad.is_empty(),
        "the stats file was read as invalid JSON ({} shown) while connections \
         ended: {bad:#?}",
        bad.len()
    );
    srv.try_status().expect("serve --status");
    stop_cleanly(&sx, &mut srv);
}

/// One GET through `srv`: the body of a 200 answer.
fn body_of_get(srv: &Serve) -> Result<String, String> {
    match srv.get()? {
        (200, b) => Ok(b),
        other => Err(format!("{other:?}")),
    }
}

#[test]
fn serve_persist_checkpoints_the_idle_copy_into_the_store() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let mut srv = Serve::start(
        &sx,
        &tag,
        &["--pool", "1", "--idle", "2s", "--persist", "kept:v1"],
        None,
    );
    srv.wait_log("a ready copy", Duration::from_secs(30), |s| {
        s.log().contains("serve: restored ")
    });
    srv.get_ok(BODY);
    // The log is read from a pipe by another thread: wait for the line.
    srv.wait_log("the connection line", WAIT, |s| {
        s.log().contains("serve: connection ")
    });
    let copy = {
        let log = srv.log();
        let line = log
            .lines()
            .find(|l| l.contains("serve: connection "))
            .unwrap_or_else(|| panic!("no connection line in:\n{log}"))
            .to_string();
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("copy="))
            .unwrap()
            .to_string()
    };
    // State the copy keeps: a new page in its tmpfs.
    sx.ok(&[
        "exec",
        &copy,
        "sh",
        "-c",
        "echo state-v2 > /tmp/www/index.html",
    ]);
    srv.get_ok("state-v2\n");
    srv.wait_log(
        "the idle copy to be persisted",
        Duration::from_secs(30),
        |s| {
            s.log().lines().any(|l| {
                (l.contains("serve: persisted ") || l.contains("serve: persist-failed "))
                    && l.contains(&copy)
            })
        },
    );
    let log = srv.log();
    assert!(
        log.lines()
            .any(|l| l.contains("serve: persisted ") && l.contains("tag=kept:v1")),
        "the idle copy was not persisted:\n{log}"
    );
    let ls = sx.ls();
    let e = entry_with_tag(&ls, "kept:v1");
    assert_eq!(e["container"], copy.as_str(), "{e}");
    wait_until("status to count the persist", WAIT, || {
        srv.status()["persisted"].as_u64() >= Some(1)
    });
    wait_until("the persisted copy to be removed", WAIT, || {
        !listed(&sx).contains(&copy)
    });

    // The persisted snapshot holds the copy's state.
    let rid = unique_id("warm-persisted");
    let g = sx.restore_from("kept:v1", &rid, &[]);
    wait_wget(sx.pid(&rid), "state-v2\n");
    drop(g);

    // Later connections are served from the persisted state.
    let after = body_of_get(&srv);
    stop_cleanly(&sx, &mut srv);
    assert_eq!(
        after.as_deref(),
        Ok("state-v2\n"),
        "after --persist, serve answered from a copy of the old snapshot \
         (a ready copy restored before the persist); log:\n{}",
        srv.log()
    );
}

#[test]
fn serve_persist_works_with_its_log_in_a_file() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let logf = sx.path("serve.log");
    let mut srv = Serve::start(
        &sx,
        &tag,
        &["--pool", "1", "--idle", "1s", "--persist", "kept"],
        Some(&logf),
    );
    srv.wait_log("a ready copy", Duration::from_secs(30), |s| {
        s.log().contains("serve: restored ")
    });
    srv.get_ok(BODY);
    srv.wait_log(
        "the idle copy to be retired",
        Duration::from_secs(30),
        |s| {
            let l = s.log();
            l.contains("serve: persisted ") || l.contains("serve: persist-failed ")
        },
    );
    let log = srv.log();
    stop_cleanly(&sx, &mut srv);
    assert!(
        log.contains("serve: persisted "),
        "--persist failed while serve's output goes to a file (the copies inherit \
         that file as their stdout/stderr, which CRIU cannot dump):\n{log}"
    );
    assert_eq!(
        entry_with_tag(&sx.ls(), "kept:latest")["tags"][0],
        "kept:latest"
    );
}

/// `serve --warmup CMD` runs CMD inside each pool copy before the copy takes a
/// connection; a copy whose warm-up fails is removed instead of offered.
#[test]
fn serve_warms_up_pool_copies_and_drops_those_whose_warmup_fails() {
    let sx = setup!();
    let tag = prewarmed(&sx);
    let mut srv = Serve::start(
        &sx,
        &tag,
        &[
            "--pool",
            "1",
            "--idle",
            "60s",
            "--warmup",
            "touch /tmp/warmed",
            "--log-format",
            "json",
        ],
        None,
    );
    srv.wait_log("a warmed-up copy", Duration::from_secs(30), |s| {
        !s.events("warmed-up").is_empty()
    });
    let copy = srv.events("warmed-up")[0]["copy"]
        .as_str()
        .unwrap()
        .to_string();
    sx.ok(&["exec", &copy, "ls", "/tmp/warmed"]);
    srv.get_ok(BODY);
    // The log comes through a pipe another thread reads: wait for the line.
    srv.wait_log("the connection line", Duration::from_secs(10), |s| {
        !used_copies(s).is_empty()
    });
    assert_eq!(
        used_copies(&srv),
        BTreeSet::from([copy.clone()]),
        "the connection went to the warmed-up copy; log:\n{}",
        srv.log()
    );
    stop_cleanly(&sx, &mut srv);

    let mut srv = Serve::start(
        &sx,
        &tag,
        &["--pool", "1", "--warmup", "false", "--log-format", "json"],
        None,
    );
    srv.wait_log("a failed warm-up", Duration::from_secs(30), |s| {
        s.events("refill-failed").iter().any(|e| {
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("warm-up \"false\" failed") && m.contains("removed"))
        })
    });
    let failed: Vec<String> = srv
        .events("refill-failed")
        .iter()
        .filter_map(|e| e["error"].as_str())
        .filter_map(|m| m.strip_prefix("copy ")?.split(':').next())
        .map(str::to_string)
        .collect();
    assert!(!failed.is_empty(), "log:\n{}", srv.log());
    let listed = listed(&sx);
    assert!(
        !listed.contains(&failed[0]),
        "{} is still listed after its warm-up failed",
        failed[0]
    );
    stop_cleanly(&sx, &mut srv);
}

/// An exec: probe that counts its runs in /tmp/probe-n and exits 0 every time,
/// printing NOT-YET on the first two and OK from the third on (as redis-cli exits 0
/// with "LOADING" while Redis loads).
const COUNTING_PROBE: &str = "n=$(cat /tmp/probe-n 2>/dev/null || echo 0); n=$((n+1)); \
     echo $n > /tmp/probe-n; if [ $n -ge 3 ]; then echo OK; else echo NOT-YET; fi\n";

/// `--ready-output`: an exec: probe passes only when its stdout matches, so the
/// snapshot is of a service that said OK, not of the first run that exited 0.
#[test]
fn prewarm_exec_probe_with_ready_output_waits_for_the_output() {
    let sx = setup!();
    let b = sx.bundle("svc", &["sh", "-c", "echo started; exec sleep 1000"]);
    fs::write(b.join("rootfs/probe.sh"), COUNTING_PROBE).unwrap();
    fs::write(b.join("rootfs/never.sh"), "echo NOT-YET\n").unwrap();
    let wid = unique_id("warm-out");
    let _gw = sx.guard(&wid);
    let extra = ["--ready-output", "^OK$", "--keep-running"];
    let out = prewarm(&sx, &b, "exec:sh /probe.sh", "out:v1", &wid, &extra).expect_ok();
    printed_snapshot_id(&out);
    // Runs 1 and 2 printed NOT-YET (exit 0) and were not taken as ready.
    let n = sx.ok(&["exec", &wid, "cat", "/tmp/probe-n"]);
    assert_eq!(n.stdout.trim(), "3", "{n:#?}");
    let rid = unique_id("warm-out-r");
    let _gr = sx.restore_from("out:v1", &rid, &[]);
    let n = sx.ok(&["exec", &rid, "cat", "/tmp/probe-n"]);
    assert_eq!(n.stdout.trim(), "3", "the snapshot predates the OK: {n:#?}");

    // A probe that never prints the output fails, quoting what it printed.
    let fid = unique_id("warm-out-f");
    let _gf = sx.guard(&fid);
    let extra = ["--ready-output", "^OK$", "--ready-timeout", "2s"];
    let out = prewarm(&sx, &b, "exec:sh /never.sh", "never:v1", &fid, &extra);
    assert_fails(&out, &["NOT-YET", "^OK$"]);
    assert!(
        sx.state(&fid).is_none(),
        "{fid} left after a failed prewarm"
    );
    assert!(entry_with_tag_absent(&sx, "never:v1"));

    // Other probe kinds refuse it, before anything starts.
    let out = prewarm(
        &sx,
        &b,
        "tcp:127.0.0.1:1",
        "x",
        &fid,
        &["--ready-output", "x"],
    );
    assert_fails(&out, &["exec: probes only", "log:REGEX"]);
}

fn entry_with_tag_absent(sx: &Sx, tag: &str) -> bool {
    sx.ls().iter().all(|e| {
        e["tags"]
            .as_array()
            .is_none_or(|t| !t.iter().any(|x| x == tag))
    })
}
