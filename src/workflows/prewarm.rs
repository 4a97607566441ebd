//! `stasis prewarm`: run a bundle, wait until a readiness probe passes, optionally
//! warm it up, checkpoint it into the store, stop it (or keep it running). A
//! probe that never passes fails with its last error and the container's last
//! output lines, and leaves nothing behind.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::fsutil::io;
use super::snapshot::{checkpoint_to_store, warm_cache, CheckpointResult, TaggedCheckpoint};
use super::{Result, WorkflowError};
use crate::runtime::checkpoint::CheckpointOptions;
use crate::runtime::{netns, Runtime};
use crate::store::Store;

/// A readiness probe.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Connect succeeds (inside the container's network namespace when it has one).
    Tcp(String),
    /// The command exits 0 inside the container and, with `output`, a line of
    /// its stdout matches (a service may answer 0 before it is ready: redis-cli prints
    /// "LOADING ..." and exits 0 while Redis loads its dataset).
    Exec {
        args: Vec<String>,
        output: Option<regex::Regex>,
    },
    /// GET returns a 2xx status.
    Http(String),
    /// A line of the container's stdout/stderr matches.
    Log(regex::Regex),
    /// The path exists inside the container's root.
    File(PathBuf),
}

/// Splits a command line (`exec:` probe, `--warmup`) into words as a POSIX
/// shell would, honouring quotes and backslashes: `sh -c 'a b'` is three words.
pub fn split_command(s: &str) -> std::result::Result<Vec<String>, String> {
    shell_words::split(s)
        .map_err(|e| format!("cannot split {s:?} into words ({e}): close the quote"))
}

impl Probe {
    /// Parses `tcp:HOST:PORT`, `exec:CMD ARGS...`, `http:URL`, `log:REGEX`, `file:PATH`.
    pub fn parse(s: &str) -> std::result::Result<Probe, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("probe {s:?}: expected KIND:ARG (tcp, exec, http, log, file)")
        })?;
        match kind {
            "tcp" => {
                if rest
                    .rsplit_once(':')
                    .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                {
                    return Err(format!("probe {s:?}: expected tcp:HOST:PORT"));
                }
                Ok(Probe::Tcp(rest.to_string()))
            }
            "exec" => {
                let args = split_command(rest).map_err(|e| format!("probe {s:?}: {e}"))?;
                if args.is_empty() {
                    return Err(format!("probe {s:?}: exec needs a command"));
                }
                Ok(Probe::Exec { args, output: None })
            }
            "http" => {
                let url = format!("http:{rest}");
                parse_http_url(&url)?;
                Ok(Probe::Http(url))
            }
            "log" => regex::Regex::new(rest)
                .map(Probe::Log)
                .map_err(|e| format!("probe {s:?}: bad regex: {e}")),
            "file" => Ok(Probe::File(PathBuf::from(rest))),
            other => Err(format!(
                "probe {s:?}: unknown kind {other:?} (use tcp, exec, http, log or file)"
            )),
        }
    }
}

impl Probe {
    /// The `exec:` probe passes only when a line of the command's stdout matches `re`
    /// (`--ready-output`); other kinds refuse it.
    pub fn require_output(self, re: regex::Regex) -> std::result::Result<Probe, String> {
        match self {
            Probe::Exec { args, .. } => Ok(Probe::Exec {
                args,
                output: Some(re),
            }),
            other => Err(format!(
                "--ready-output applies to exec: probes only, not {}; to wait for a line \
                 of the service's own output use --ready log:REGEX",
                describe(&other)
            )),
        }
    }
}

/// (host:port, path) of an `http://host:port/path` URL.
fn parse_http_url(url: &str) -> std::result::Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((hostport, path.to_string()))
}

pub struct PrewarmOptions {
    pub bundle: PathBuf,
    pub id: String,
    pub ready: Probe,
    pub ready_timeout: Duration,
    pub warmup: Option<Vec<String>>,
    pub tags: Vec<String>,
    pub keep_running: bool,
    pub compress_level: i32,
    pub progress: bool,
    /// The stasis binary and global flags, to run/exec containers as subprocesses
    /// whose stdio we control.
    pub self_exe: PathBuf,
    pub global_args: Vec<String>,
}

pub struct PrewarmResult {
    pub cold_to_ready: Duration,
    pub warmup: Duration,
    pub checkpoint: CheckpointResult,
    pub checkpoint_time: Duration,
    /// Building the restore caches (verified image, rootfs base) after the
    /// checkpoint, so the first restore is as fast as any later one.
    pub cache_ms: u128,
    /// Why building those caches failed (e.g. a full disk): the snapshot is
    /// kept, and the first restore builds them.
    pub cache_error: Option<String>,
}

/// Output lines of the container, kept for `log:` probes and error messages.
#[derive(Clone, Default)]
struct OutputTail(Arc<Mutex<VecDeque<String>>>);

impl OutputTail {
    const KEEP: usize = 200;
    fn push(&self, line: String) {
        if let Ok(mut q) = self.0.lock() {
            if q.len() == Self::KEEP {
                q.pop_front();
            }
            q.push_back(line);
        }
    }
    fn any(&self, re: &regex::Regex) -> bool {
        self.0
            .lock()
            .map(|q| q.iter().any(|l| re.is_match(l)))
            .unwrap_or(false)
    }
    fn last(&self, n: usize) -> Vec<String> {
        self.0
            .lock()
            .map(|q| q.iter().rev().take(n).rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// Deletes the container on drop unless disarmed.
struct Cleanup<'a> {
    rt: &'a Runtime,
    id: String,
    armed: bool,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.rt.delete(&self.id, true);
        }
    }
}

/// The stop signal (SIGINT or SIGTERM) a prewarm received, 0 while none.
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_stop(sig: libc::c_int) {
    STOP.store(sig, Ordering::SeqCst);
}

/// SIGINT and SIGTERM recorded (not fatal, not ignored, even when the parent
/// ignored them) while a prewarm runs, so it can stop at the next step and
/// remove what it started; the previous dispositions come back on drop. Children
/// (`stasis run`, CRIU) get the default dispositions back at exec.
struct StopSignals {
    old: Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>,
}

impl StopSignals {
    fn install() -> Self {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        STOP.store(0, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(record_stop),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores into an atomic, which is
            // async-signal-safe; the old action is restored on drop.
            if let Ok(prev) = unsafe { sigaction(sig, &action) } {
                old.push((sig, prev));
            }
        }
        StopSignals { old }
    }

    /// Err(Interrupted) once a stop signal arrived.
    fn check(&self, id: &str) -> Result<()> {
        match STOP.load(Ordering::SeqCst) {
            0 => Ok(()),
            sig => Err(WorkflowError::Interrupted {
                id: id.to_string(),
                signal: nix::sys::signal::Signal::try_from(sig)
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|_| format!("signal {sig}")),
            }),
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the action that was in place before `install`.
            let _ = unsafe { nix::sys::signal::sigaction(*sig, prev) };
        }
    }
}

fn stasis_cmd(o: &PrewarmOptions) -> Command {
    let mut c = Command::new(&o.self_exe);
    c.args(&o.global_args);
    c
}

pub fn prewarm(rt: &Runtime, store: &Store, o: &PrewarmOptions) -> Result<PrewarmResult> {
    for tag in &o.tags {
        crate::store::normalize_tag(tag)?;
    }
    let stop = StopSignals::install();
    let t0 = Instant::now();
    // Run through a subprocess so the container's stdout/stderr are our pipe (CRIU
    // cannot dump a container writing to a host file; a pipe is remapped on restore).
    let (reader, writer) = std::io::pipe().map_err(io("create output pipe for", &o.bundle))?;
    let writer2 = writer
        .try_clone()
        .map_err(io("create output pipe for", &o.bundle))?;
    let out = stasis_cmd(o)
        .args(["run", "-d", "-b"])
        .arg(&o.bundle)
        .arg(&o.id)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .status();
    let tail = OutputTail::default();
    {
        let tail = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                match line {
                    Ok(l) => tail.push(l),
                    Err(_) => break,
                }
            }
        });
    }
    let status = out.map_err(io("run", &o.self_exe))?;
    if !status.success() {
        std::thread::sleep(Duration::from_millis(50));
        return Err(WorkflowError::PrewarmStart {
            id: o.id.clone(),
            bundle: o.bundle.clone(),
            output: tail.last(5).join(" | "),
        });
    }
    let mut cleanup = Cleanup {
        rt,
        id: o.id.clone(),
        armed: true,
    };
    crate::runtime::fault_point("prewarm.started");
    stop.check(&o.id)?;
    let pid = rt.load(&o.id)?.pid;
    let deadline = t0 + o.ready_timeout;
    let mut last_err;
    loop {
        stop.check(&o.id)?;
        match check_probe(o, pid, &tail) {
            Ok(()) => break,
            Err(e) => last_err = e,
        }
        if rt.load(&o.id)?.live_status() == crate::runtime::Status::Stopped {
            std::thread::sleep(Duration::from_millis(50));
            return Err(WorkflowError::ProbeFailed {
                probe: describe(&o.ready),
                last_error: format!("the container exited before it was ready ({last_err})"),
                output: tail.last(10),
            });
        }
        if Instant::now() >= deadline {
            return Err(WorkflowError::ProbeFailed {
                probe: describe(&o.ready),
                last_error: format!("not ready after {:?}: {last_err}", o.ready_timeout),
                output: tail.last(10),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cold_to_ready = t0.elapsed();
    let t1 = Instant::now();
    if let Some(cmd) = &o.warmup {
        let st = run_warmup(o, cmd, &stop)?;
        if !st.success() {
            return Err(WorkflowError::WarmupFailed {
                id: o.id.clone(),
                command: cmd.join(" "),
                status: st,
            });
        }
    }
    let warmup = t1.elapsed();
    // Not only tcp/http probes connect: `exec:redis-cli ping`, `exec:pg_isready -h
    // 127.0.0.1` and warm-up commands do too, and the server may not have closed
    // its end yet.
    settle_connections(pid);
    stop.check(&o.id)?;
    let t2 = Instant::now();
    let checkpoint = checkpoint_to_store(
        rt,
        store,
        &TaggedCheckpoint {
            checkpoint: CheckpointOptions {
                id: o.id.clone(),
                leave_running: o.keep_running,
                ..Default::default()
            },
            tags: o.tags.clone(),
            compress_level: o.compress_level,
            progress: o.progress,
            ignore_rootfs: false,
            ignore_volumes: false,
            exclude: Vec::new(),
            save_stat_cache: true,
        },
    )?;
    let checkpoint_time = t2.elapsed();
    // Stopped during the checkpoint: the snapshot is stored, the container
    // (with --keep-running) goes.
    stop.check(&o.id)?;
    if o.keep_running {
        cleanup.armed = false;
    }
    // The snapshot is in the store: a cache that cannot be built now (a full
    // disk) only costs the first restore its speed, so it is a warning.
    let (cache_ms, cache_error) = match warm_cache(
        rt,
        store,
        &format!("sha256:{}", checkpoint.report.id.full()),
    ) {
        Ok(ms) => (ms, None),
        Err(e) => {
            tracing::warn!("prewarm: the restore caches were not built: {e}");
            (0, Some(e.to_string()))
        }
    };
    Ok(PrewarmResult {
        cold_to_ready,
        warmup,
        checkpoint,
        checkpoint_time,
        cache_ms,
        cache_error,
    })
}

/// Runs the warm-up command in the container; a stop signal kills it.
fn run_warmup(
    o: &PrewarmOptions,
    cmd: &[String],
    stop: &StopSignals,
) -> Result<std::process::ExitStatus> {
    let mut child = stasis_cmd(o)
        .arg("exec")
        .arg(&o.id)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(io("run warm-up in", &o.self_exe))?;
    loop {
        if let Some(st) = child
            .try_wait()
            .map_err(io("wait for the warm-up run by", &o.self_exe))?
        {
            return Ok(st);
        }
        if let Err(e) = stop.check(&o.id) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (at most 2 s) until the probe's connections are gone from the
/// container's network namespace: CRIU refuses to dump a connected TCP socket
/// without --tcp-established, and a server may hold our closed probe connection
/// for a moment (busybox httpd forks a handler per connection).
fn settle_connections(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let busy = || {
        ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .map(|t| {
                    t.lines().skip(1).any(|l| {
                        // st column: 0A LISTEN, 06 TIME_WAIT (no process holds it), 07 CLOSE
                        let st = l.split_whitespace().nth(3).unwrap_or("0A");
                        !matches!(st, "0A" | "06" | "07")
                    })
                })
                .unwrap_or(false)
        })
    };
    while busy() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn describe(p: &Probe) -> String {
    match p {
        Probe::Tcp(a) => format!("tcp:{a}"),
        Probe::Exec { args, output: None } => format!("exec:{}", args.join(" ")),
        Probe::Exec {
            args,
            output: Some(re),
        } => format!(
            "exec:{} (output matching {:?})",
            args.join(" "),
            re.as_str()
        ),
        Probe::Http(u) => u.clone(),
        Probe::Log(r) => format!("log:{}", r.as_str()),
        Probe::File(p) => format!("file:{}", p.display()),
    }
}

fn resolve(addr: &str) -> std::result::Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {addr}: no address"))
}

/// One attempt of the probe; Err carries the reason it did not pass.
fn check_probe(o: &PrewarmOptions, pid: i32, tail: &OutputTail) -> std::result::Result<(), String> {
    let timeout = Duration::from_millis(500);
    match &o.ready {
        Probe::Tcp(a) => {
            let addr = resolve(a)?;
            netns::connect_in(pid, addr, timeout)
                .map(|_| ())
                .map_err(|e| format!("connect {addr}: {e}"))
        }
        Probe::Exec { args, output } => {
            let out = stasis_cmd(o)
                .arg("exec")
                .arg(&o.id)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("run stasis exec: {e}"))?;
            if out.status.success() {
                let stdout = String::from_utf8_lossy(&out.stdout);
                match output {
                    Some(re) if !stdout.lines().any(|l| re.is_match(l)) => {
                        let mut seen: String = stdout.trim().chars().take(200).collect();
                        seen = crate::store::printable(&seen);
                        Err(format!(
                            "{} printed {seen:?}, not output matching {:?}",
                            args.join(" "),
                            re.as_str()
                        ))
                    }
                    _ => Ok(()),
                }
            } else {
                let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
                if msg.is_empty() {
                    msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
                }
                let sep = if msg.is_empty() { "" } else { ": " };
                Err(format!(
                    "{} exited with {}{sep}{msg}",
                    args.join(" "),
                    out.status
                ))
            }
        }
        Probe::Http(url) => {
            let (hostport, path) = parse_http_url(url)?;
            let addr = resolve(&hostport)?;
            let mut s = netns::connect_in(pid, addr, timeout)
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            write!(
                s,
                "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
            )
            .map_err(|e| format!("send request to {url}: {e}"))?;
            let line =
                read_status_line(&mut s).map_err(|e| format!("read response from {url}: {e}"))?;
            let code = line.split_whitespace().nth(1).unwrap_or("");
            if code.starts_with('2') {
                Ok(())
            } else {
                Err(format!("GET {url}: status {code:?}"))
            }
        }
        Probe::Log(re) => {
            if tail.any(re) {
                Ok(())
            } else {
                Err(format!("no output line matched {:?} yet", re.as_str()))
            }
        }
        Probe::File(p) => {
            let inside =
                Path::new(&format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap_or(p));
            if inside.exists() {
                Ok(())
            } else {
                Err(format!("{} does not exist yet", p.display()))
            }
        }
    }
}

/// The status line of an HTTP response (`HTTP/1.0 200 OK`): read until its end
/// of line (a server may send it in several pieces), end of stream or 1 KiB.
fn read_status_line(r: &mut impl Read) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    Ok(String::from_utf8_lossy(&head[..end]).trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse() {
        assert!(matches!(
            Probe::parse("tcp:127.0.0.1:6379"),
            Ok(Probe::Tcp(_))
        ));
        assert!(
            matches!(Probe::parse("exec:redis-cli ping"), Ok(Probe::Exec { args, output: None }) if args.len() == 2)
        );
        assert!(matches!(
            Probe::parse("http://127.0.0.1:8080/"),
            Ok(Probe::Http(_))
        ));
        assert!(matches!(
            Probe::parse("log:Ready to accept"),
            Ok(Probe::Log(_))
        ));
        assert!(matches!(
            Probe::parse("file:/tmp/ready"),
            Ok(Probe::File(_))
        ));
        assert!(Probe::parse("tcp:nohost").is_err());
        assert!(Probe::parse("smoke:x").is_err());
        assert!(Probe::parse("log:(").is_err());
        assert_eq!(
            parse_http_url("http://h:81/x").unwrap(),
            ("h:81".to_string(), "/x".to_string())
        );
    }

    #[test]
    fn ready_output_is_for_exec_probes_only() {
        let re = regex::Regex::new("PONG").unwrap();
        let p = Probe::parse("exec:redis-cli ping").unwrap();
        assert!(matches!(
            p.require_output(re.clone()),
            Ok(Probe::Exec {
                output: Some(_),
                ..
            })
        ));
        let e = Probe::parse("tcp:127.0.0.1:6379")
            .unwrap()
            .require_output(re)
            .unwrap_err();
        assert!(
            e.contains("exec: probes only") && e.contains("log:REGEX"),
            "{e}"
        );
    }

    #[test]
    fn exec_probes_and_warmups_split_like_a_shell() {
        match Probe::parse("exec:sh -c 'echo a b'") {
            Ok(Probe::Exec { args, .. }) => assert_eq!(args, ["sh", "-c", "echo a b"]),
            _ => panic!("not an exec probe"),
        }
        assert_eq!(
            split_command(r#"redis-cli -a "p w" ping"#).unwrap(),
            ["redis-cli", "-a", "p w", "ping"]
        );
        let e = split_command("sh -c 'unterminated").unwrap_err();
        assert!(e.contains("close the quote"), "{e}");
        assert!(Probe::parse("exec:sh -c 'x").is_err());
    }

    /// A reader that hands out `chunk` bytes per read, like a server sending
    /// its status line in pieces.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.chunk.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_http_status_line_is_read_whole() {
        let resp = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        for chunk in [1, 3, 64] {
            let mut r = Trickle { data: resp, chunk };
            assert_eq!(read_status_line(&mut r).unwrap(), "HTTP/1.0 200 OK");
        }
        let mut r = Trickle {
            data: b"HTTP/1.0 503",
            chunk: 2,
        };
        assert_eq!(read_status_line(&mut r).unwrap(), "HTTP/1.0 503");
    }
}
