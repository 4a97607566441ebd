//! Warm starts of real services: cold start vs restore from the store vs
//! runc restoring from a plain directory, and time to first byte through `serve`.
//! CLI only; stasis and runc side by side on the same bundles and the same CRIU.
//!
//! Full size (the numbers; ~20-30 min, run it when the machine is quiet):
//!
//!     cargo build --release && cargo bench --bench warm
//!     # = STASIS_BENCH_RUNS=5 STASIS_BENCH_REDIS_MIB=1024 STASIS_BENCH_PG_SCALE=70 \
//!     #   STASIS_BENCH_SLOWAPP_SECS=3 STASIS_BENCH_SERVE_CONNS=5 cargo bench --bench warm
//!
//! Quick smoke run:
//!
//!     STASIS_BENCH_RUNS=2 STASIS_BENCH_REDIS_MIB=32 STASIS_BENCH_PG_SCALE=2 \
//!       STASIS_BENCH_SLOWAPP_SECS=1 STASIS_BENCH_SERVE_CONNS=2 cargo bench --bench warm
//!
//! Services (bundles from `images/*/build`, each in its own user and network
//! namespace): Redis with `--dataset-mib REDIS_MIB`, PostgreSQL with `--scale
//! PG_SCALE`, slowapp with `--init-seconds SLOWAPP_SECS`.
//!
//! Ready = the service answers on its port inside the container's network
//! namespace, polled every 5 ms by a thread of the bench that entered that netns
//! (setns): Redis `PING` -> `+PONG` (not `-LOADING`), PostgreSQL startup as user
//! postgres (trust) then `select 1` -> ReadyForQuery, slowapp `GET /` -> 200. A copy
//! restored by runc has loopback down (runc asks CRIU for an empty netns; stasis
//! brings it up): the probe thread brings `lo` up when it finds it down, inside
//! the measured time, for both runtimes.
//!
//! Per service, in this order:
//! 1. cold start to ready, `stasis run -d` and `runc run -d` alternately, RUNS
//!    each; every cold container is stopped with SIGTERM (a clean shutdown: a
//!    killed PostgreSQL replays WAL at its next start) and deleted;
//! 2. `stasis prewarm --ready log:...|http://... --tag NAME:bench` (its own
//!    `cold_start_to_ready_ms` is shown too);
//! 3. `runc run -d` once more, ready, `runc checkpoint --image-path DIR
//!    --work-path W` (the container stops);
//! 4. first restore after prewarm: `stasis restore --from NAME:bench -d` on a copy
//!    of the store without its cache (so it materialises and verifies the image
//!    and the filesystem), RUNS times, each on its own fresh copy;
//! 5. later restores (cache warm; one unmeasured restore first, and one unmeasured
//!    lazy restore) alternating with `stasis restore --from NAME:bench --lazy-pages
//!    -d` (the lazy rows, below) and `runc restore -d --image-path DIR -b BUNDLE`,
//!    RUNS each; every restored copy is deleted (killed) once ready (a lazy copy
//!    once its lazy-pages daemon exited);
//! 6. `stasis serve --from NAME:bench --pool 0 --idle 1s`: SERVE_CONNS connections,
//!    each once the previous copy was reaped (an empty pool: every connection
//!    waits for a restore); then `--pool 2`: SERVE_CONNS times, once the pool is
//!    full (2 ready copies, none used), one connection (a pool hit) and right after
//!    it a second one (served by the copy just used); with the lazy rows, also
//!    `--pool 0 --lazy-pages` between the two, like `--pool 0`. Time to first byte: from
//!    connect, then the request (Redis `PING`, PostgreSQL's startup message, `GET /`), to the
//!    first byte of the answer, from a client on the host. serve's own p50 from
//!    its stats file is shown too. serve is stopped with SIGTERM.
//!
//! Lazy rows (`--lazy-pages`: stasis starts CRIU's lazy-pages daemon, the copy runs
//! while its memory is faulted in through userfaultfd): "restore --from
//! --lazy-pages to ready (cached)", measured like the cached restore row and
//! interleaved with it; "... to all memory in", the time until the copy's
//! lazy-pages daemon exited (found by its command line: `lazy-pages` and the
//! work dir `--root/ID/criu`; /proc polled every 5 ms once the copy is ready; a
//! daemon already gone by then counts as the ready time); and serve's TTFB with an
//! empty pool and `--lazy-pages`. The bundles have a user namespace, where the
//! kernel allows userfaultfd only with `vm.unprivileged_userfaultfd = 1`: when it
//! is not 1 the lazy rows are skipped (`warm: skipping lazy rows: ...`), unless
//! `STASIS_BENCH_LAZY_SYSCTL=1`.
//!
//! Environment:
//! - `STASIS_BENCH_RUNS` (5), `STASIS_BENCH_SERVE_CONNS` (5)
//! - `STASIS_BENCH_REDIS_MIB` (1024), `STASIS_BENCH_PG_SCALE` (70),
//!   `STASIS_BENCH_SLOWAPP_SECS` (3)
//! - `STASIS_BENCH_SKIP`: comma-separated of `redis`, `postgres`, `slowapp`,
//!   `runc`, `serve`, `first` (the first-restore runs), `lazy` (the lazy rows)
//! - `STASIS_BENCH_LAZY_SYSCTL=1`: when /proc/sys/vm/unprivileged_userfaultfd is
//!   not 1, set it to 1 for the run and put the old value back at the end (also
//!   when a step fails, on a panic, and on SIGINT/SIGTERM/SIGHUP); both are printed
//! - `STASIS_BENCH_DIR` (default /var/tmp): bundles, stores, images, state
//! - `STASIS_BIN` (default target/release/stasis), `RUNC_BIN` (default: PATH)
//! - `BENCH_STRICT=1`: exit non-zero when a goal is missed
//!
//! Goals: Redis restore-from-store-to-ready <= 15% of its cold start
//! (later restores); serve with a warm pool: time to first byte <= 10 ms median.
//! The lazy restore's ratio to cold is reported next to Redis's goal (and in the
//! JSON line's `goals_met`) but does not count for `BENCH_STRICT`.
//! Every container (stasis and runc), serve process, store and directory is
//! removed at the end, also when a step fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{
    bench_main, build_bundle, env_num, find_bin, is_root, min_median, root_entries, round,
    run_logged, stasis_bin, unmount_leftovers,
};

const MS: f64 = 1000.0;

// ---------------------------------------------------------------------------
// Settings

struct Settings {
    runs: usize,
    conns: usize,
    redis_mib: u64,
    pg_scale: u64,
    slowapp_secs: u64,
    skip: Vec<String>,
    dir: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let s = Settings {
            runs: env_num("STASIS_BENCH_RUNS", 5)?,
            conns: env_num("STASIS_BENCH_SERVE_CONNS", 5)?,
            redis_mib: env_num("STASIS_BENCH_REDIS_MIB", 1024)?,
            pg_scale: env_num("STASIS_BENCH_PG_SCALE", 70)?,
            slowapp_secs: env_num("STASIS_BENCH_SLOWAPP_SECS", 3)?,
            skip: std::env::var("STASIS_BENCH_SKIP")
                .unwrap_or_default()
                .split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect(),
            dir: std::env::var_os("STASIS_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp")),
        };
        if s.runs == 0 || s.conns == 0 {
            return Err("STASIS_BENCH_RUNS and STASIS_BENCH_SERVE_CONNS must be >= 1".into());
        }
        for k in &s.skip {
            if ![
                "redis", "postgres", "slowapp", "runc", "serve", "first", "lazy",
            ]
            .contains(&k.as_str())
            {
                return Err(format!(
                    "STASIS_BENCH_SKIP: unknown {k:?} (redis, postgres, slowapp, runc, serve, first, lazy)"
                ));
            }
        }
        Ok(s)
    }

    fn skips(&self, what: &str) -> bool {
        self.skip.iter().any(|k| k == what)
    }
}

// ---------------------------------------------------------------------------
// vm.unprivileged_userfaultfd for the lazy rows

const UFFD_KNOB: &str = "/proc/sys/vm/unprivileged_userfaultfd";

/// The knob's value before the bench set it to 1 (an ASCII digit), 0 when there
/// is nothing to put back. Read by the Drop guard, the panic hook (the release
/// profile aborts on panic: no unwinding, no Drop) and the signal handler.
static UFFD_OLD: AtomicU8 = AtomicU8::new(0);

/// Writes the old value back once; async-signal-safe (open/write/close only).
/// Returns the value written.
fn uffd_put_back() -> Option<u8> {
    let old = UFFD_OLD.swap(0, Ordering::SeqCst);
    if old == 0 {
        return None;
    }
    let buf = [old, b'\n'];
    // SAFETY: a NUL-terminated path and a buffer of ours.
    unsafe {
        let fd = libc::open(
            c"/proc/sys/vm/unprivileged_userfaultfd".as_ptr(),
            libc::O_WRONLY,
        );
        if fd >= 0 {
            libc::write(fd, buf.as_ptr().cast(), buf.len());
            libc::close(fd);
        }
    }
    Some(old)
}

extern "C" fn uffd_on_signal(sig: libc::c_int) {
    if uffd_put_back().is_some() {
        let m = b"warm: signal: put vm.unprivileged_userfaultfd back\n";
        // SAFETY: write(2) of a static buffer.
        unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
    }
    // SAFETY: restore the default action and re-raise: the usual exit status.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Puts the knob back when dropped (the end of the run, and every error path).
struct UffdGuard;

impl Drop for UffdGuard {
    fn drop(&mut self) {
        if let Some(old) = uffd_put_back() {
            let now = fs::read_to_string(UFFD_KNOB).unwrap_or_default();
            println!(
                "warm: put vm.unprivileged_userfaultfd back to {} (now {})",
                old as char,
                now.trim()
            );
        }
    }
}

/// Whether the lazy rows run: Ok(guard) (a guard when the bench set the knob),
/// or Err(why they are skipped).
fn lazy_setup(s: &Settings) -> Result<Option<UffdGuard>, String> {
    if s.skips("lazy") {
        return Err("STASIS_BENCH_SKIP=lazy".into());
    }
    let v = fs::read_to_string(UFFD_KNOB)
        .map_err(|e| format!("{UFFD_KNOB}: {e} (needed for --lazy-pages in a user namespace)"))?;
    let v = v.trim().to_string();
    if v == "1" {
        return Ok(None);
    }
    if std::env::var("STASIS_BENCH_LAZY_SYSCTL").as_deref() != Ok("1") {
        return Err(format!(
            "vm.unprivileged_userfaultfd is {v}, and --lazy-pages in these bundles' user namespace needs 1 (STASIS_BENCH_LAZY_SYSCTL=1 sets it for the run)"
        ));
    }
    let old = match v.as_bytes() {
        [d] if d.is_ascii_digit() => *d,
        _ => {
            return Err(format!(
                "vm.unprivileged_userfaultfd has an odd value {v:?}"
            ))
        }
    };
    UFFD_OLD.store(old, Ordering::SeqCst);
    let guard = UffdGuard;
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if uffd_put_back().is_some() {
            eprintln!("warm: panic: put vm.unprivileged_userfaultfd back");
        }
        prev_hook(info);
    }));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only calls async-signal-safe functions.
        unsafe {
            libc::signal(
                sig,
                uffd_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    fs::write(UFFD_KNOB, "1").map_err(|e| format!("set {UFFD_KNOB} to 1: {e}"))?;
    println!(
        "warm: STASIS_BENCH_LAZY_SYSCTL=1: set vm.unprivileged_userfaultfd=1 for this run (was {v}); it is put back at the end"
    );
    Ok(Some(guard))
}

// ---------------------------------------------------------------------------
// Services and readiness probes

#[derive(Clone, Copy, PartialEq)]
enum Svc {
    Redis,
    Postgres,
    Slowapp,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Redis => "redis",
            Svc::Postgres => "postgres",
            Svc::Slowapp => "slowapp",
        }
    }

    /// `serve --warmup` for this service's pool copies: PostgreSQL's first
    /// session after a restore does one-time work a `psql -l` takes off the
    /// first client.
    fn serve_warmup(self) -> Option<&'static str> {
        match self {
            Svc::Postgres => Some("/usr/lib/postgresql/15/bin/psql -h 127.0.0.1 -U postgres -l"),
            _ => None,
        }
    }

    fn port(self) -> u16 {
        match self {
            Svc::Redis => 6379,
            Svc::Postgres => 5432,
            Svc::Slowapp => 8080,
        }
    }

    fn build_args(self, s: &Settings) -> Vec<String> {
        match self {
            Svc::Redis => vec!["--dataset-mib".into(), s.redis_mib.to_string()],
            Svc::Postgres => vec!["--scale".into(), s.pg_scale.to_string()],
            Svc::Slowapp => vec!["--init-seconds".into(), s.slowapp_secs.to_string()],
        }
    }

    fn size(self, s: &Settings) -> String {
        match self {
            Svc::Redis => format!("{} MiB dataset", s.redis_mib),
            Svc::Postgres => format!("pgbench scale {}", s.pg_scale),
            Svc::Slowapp => format!("{} s init", s.slowapp_secs),
        }
    }

    /// prewarm's readiness probe.
    fn prewarm_probe(self) -> &'static str {
        match self {
            Svc::Redis => "log:Ready to accept connections",
            Svc::Postgres => "log:database system is ready to accept connections",
            Svc::Slowapp => "http://127.0.0.1:8080/",
        }
    }

    /// The request whose answer's first byte is the time to first byte.
    fn request(self) -> Vec<u8> {
        match self {
            Svc::Redis => b"PING\r\n".to_vec(),
            Svc::Postgres => pg_startup(),
            Svc::Slowapp => b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n".to_vec(),
        }
    }

    /// One readiness check on a connected socket.
    fn ready(self, s: &mut TcpStream) -> Result<(), String> {
        s.write_all(&self.request()).map_err(|e| e.to_string())?;
        match self {
            Svc::Redis => {
                let mut b = [0u8; 64];
                let n = s.read(&mut b).map_err(|e| e.to_string())?;
                let a = String::from_utf8_lossy(&b[..n]);
                if a.starts_with("+PONG") {
                    Ok(())
                } else {
                    Err(a.trim().to_string())
                }
            }
            Svc::Postgres => {
                pg_until_ready(s)?;
                let mut q = vec![b'Q'];
                let sql = b"select 1\0";
                q.extend_from_slice(&((4 + sql.len()) as u32).to_be_bytes());
                q.extend_from_slice(sql);
                s.write_all(&q).map_err(|e| e.to_string())?;
                pg_until_ready(s)?;
                let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
                Ok(())
            }
            Svc::Slowapp => {
                let mut b = [0u8; 64];
                let mut n = 0;
                while n < 12 {
                    let k = s.read(&mut b[n..]).map_err(|e| e.to_string())?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                let a = String::from_utf8_lossy(&b[..n]);
                if a.starts_with("HTTP/1.") && a.get(9..12) == Some("200") {
                    Ok(())
                } else {
                    Err(a.lines().next().unwrap_or("").to_string())
                }
            }
        }
    }
}

fn pg_startup() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes());
    for kv in ["user", "postgres", "database", "postgres"] {
        body.extend_from_slice(kv.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&body);
    m
}

/// Reads backend messages until ReadyForQuery; an ErrorResponse fails.
fn pg_until_ready(s: &mut TcpStream) -> Result<(), String> {
    loop {
        let mut h = [0u8; 5];
        s.read_exact(&mut h).map_err(|e| e.to_string())?;
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body).map_err(|e| e.to_string())?;
        match h[0] {
            b'Z' => return Ok(()),
            b'E' => {
                let text: String = body
                    .split(|&b| b == 0)
                    .filter(|f| f.first() == Some(&b'M'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                    .collect();
                return Err(format!("postgres: {text}"));
            }
            b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                return Err("postgres asks for a password".into())
            }
            _ => {}
        }
    }
}

/// Brings loopback up in the current thread's network namespace when it is down.
fn lo_up() {
    // SAFETY: an ioctl on a socket of our own with a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0
            && ifr.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short == 0
        {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(fd);
    }
}

/// Polls the service inside `pid`'s network namespace every 5 ms until it is
/// ready; returns the time since `t0`.
fn wait_ready(svc: Svc, pid: i32, t0: Instant, timeout: Duration) -> Result<Duration, String> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("open the netns of {pid}: {e}"))?;
    let h = std::thread::spawn(move || -> Result<Duration, String> {
        // SAFETY: setns on this thread only, with a namespace descriptor we own.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns into the netns of {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], svc.port()));
        let mut last;
        loop {
            lo_up();
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = s.set_nodelay(true);
                    match svc.ready(&mut s) {
                        Ok(()) => return Ok(t0.elapsed()),
                        Err(e) => last = e,
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(format!(
                    "{} (pid {pid}) died before it was ready",
                    svc.name()
                ));
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "{} (pid {pid}) not ready after {:?}: {last}",
                    svc.name(),
                    timeout
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    h.join().map_err(|_| "probe thread panicked".to_string())?
}

// ---------------------------------------------------------------------------
// Runtimes

struct Rt {
    name: &'static str,
    bin: PathBuf,
    root: PathBuf,
    store: Option<PathBuf>,
    logs: PathBuf,
}

impl Rt {
    fn cmd(&self, store: Option<&Path>) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        if let Some(s) = store.or(self.store.as_deref()) {
            c.arg("--store").arg(s);
        }
        c
    }

    /// Runs `NAME ARGS` through `run_logged` (log: `NAME-last.log`); returns the
    /// wall time and the output.
    fn run_in(&self, store: Option<&Path>, args: &[&str]) -> Result<(Duration, String), String> {
        let what = format!("{} {}", self.name, args.join(" "));
        let log = self.logs.join(format!("{}-last.log", self.name));
        run_logged(self.cmd(store), args, &what, &log)
    }

    fn run(&self, args: &[&str]) -> Result<(Duration, String), String> {
        self.run_in(None, args)
    }

    fn state(&self, id: &str) -> Option<serde_json::Value> {
        let out = self
            .cmd(None)
            .args(["state", id])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn pid(&self, id: &str) -> Result<i32, String> {
        self.state(id)
            .and_then(|v| v["pid"].as_i64())
            .filter(|p| *p > 0)
            .map(|p| p as i32)
            .ok_or_else(|| format!("{} state {id}: no pid", self.name))
    }

    fn delete(&self, id: &str) {
        let _ = self
            .cmd(None)
            .args(["delete", "--force", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM, wait until the init is gone (up to 60 s), then delete.
    fn stop(&self, id: &str) {
        let pid = self.pid(id).ok();
        let _ = self
            .cmd(None)
            .args(["kill", id, "TERM"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(p) = pid {
            let alive = fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if !alive || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.delete(id);
    }

    fn delete_all(&self) {
        for name in root_entries(&self.root) {
            if self.root.join(&name).is_dir() {
                self.delete(&name);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// serve

struct Serve {
    child: Child,
    stats: PathBuf,
}

impl Serve {
    fn start(
        st: &Rt,
        tag: &str,
        svc: Svc,
        listen: SocketAddr,
        (pool, lazy, warmup): (usize, bool, Option<&str>),
        log: &Path,
    ) -> Result<Self, String> {
        let stats = st.logs.join(format!(
            "serve-{}-{pool}{}{}.json",
            svc.name(),
            if lazy { "-lazy" } else { "" },
            if warmup.is_some() { "-warmup" } else { "" }
        ));
        let f = fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let f2 = f.try_clone().map_err(|e| e.to_string())?;
        let child = st
            .cmd(None)
            .args(["serve", "--from", tag, "--listen"])
            .arg(listen.to_string())
            .args(["--port", &svc.port().to_string()])
            .args(["--pool", &pool.to_string(), "--max", "4", "--idle", "1s"])
            .args(lazy.then_some("--lazy-pages"))
            .args(warmup.map(|w| ["--warmup", w]).into_iter().flatten())
            .arg("--stats-file")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| format!("spawn serve: {e}"))?;
        Ok(Serve { child, stats })
    }

    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&fs::read_to_string(&self.stats).ok()?).ok()
    }

    /// Waits until `ok(status)`; fails when serve exited or after 10 min.
    fn wait(&mut self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("serve exited ({st}) while waiting for {what}"));
            }
            if self.status().is_some_and(|v| ok(&v)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "serve: no {what} after 10 min: {:?}",
                    self.status()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for it to finish (it removes its copies).
    fn stop(mut self) -> Result<(), String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("serve did not exit within 120 s of SIGTERM".into());
                }
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connect, send the request, time to the first byte of the answer.
fn ttfb(svc: Svc, addr: SocketAddr) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
    s.write_all(&svc.request())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut b = [0u8; 256];
    let n = s
        .read(&mut b)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let t = t0.elapsed();
    if n == 0 {
        return Err(format!("{addr}: connection closed without an answer"));
    }
    let ok = match svc {
        Svc::Redis => b[0] == b'+',
        Svc::Postgres => b[0] == b'R',
        Svc::Slowapp => b[..n].starts_with(b"HTTP/1."),
    };
    if !ok {
        return Err(format!(
            "{addr}: unexpected answer {:?}",
            String::from_utf8_lossy(&b[..n])
        ));
    }
    if svc == Svc::Postgres {
        let _ = s.write_all(&[b'X', 0, 0, 0, 4]);
    }
    Ok(t)
}

fn free_port() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// Results

#[derive(Default)]
struct SvcResult {
    /// (metric key, values in ms)
    rows: Vec<(&'static str, Vec<f64>)>,
    prewarm_cold_ms: Option<f64>,
    serve_p50: Vec<(&'static str, f64)>,
}

impl SvcResult {
    fn push(&mut self, key: &'static str, v: Duration) {
        let v = v.as_secs_f64() * MS;
        match self.rows.iter_mut().find(|(k, _)| *k == key) {
            Some((_, vs)) => vs.push(v),
            None => self.rows.push((key, vec![v])),
        }
    }

    fn get(&self, key: &str) -> Option<(f64, f64)> {
        self.rows
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| min_median(v.clone()))
    }
}

const ROWS: &[(&str, &str)] = &[
    ("cold_stasis", "cold start to ready, stasis run -d"),
    ("cold_runc", "cold start to ready, runc run -d"),
    (
        "restore_first",
        "restore --from to ready, first on a machine (no cache: materialise + verify)",
    ),
    (
        "restore_later",
        "restore --from to ready, after prewarm (cached)",
    ),
    (
        "restore_lazy",
        "restore --from --lazy-pages to ready (cached)",
    ),
    (
        "restore_lazy_all_in",
        "restore --from --lazy-pages to all memory in (lazy-pages daemon exited)",
    ),
    ("runc_restore", "runc restore (plain dir) to ready"),
    ("serve_empty", "serve TTFB, empty pool (--pool 0)"),
    ("serve_empty_lazy", "serve TTFB, empty pool, --lazy-pages"),
    ("serve_pool", "serve TTFB, warm pool (--pool 2), pool hit"),
    (
        "serve_pool_warmup",
        "serve TTFB, warm pool (--pool 2) with --warmup, pool hit",
    ),
    ("serve_reuse", "serve TTFB, copy just used"),
    (
        "serve_reuse_warmup",
        "serve TTFB, copy just used (with --warmup)",
    ),
];

fn fmt_ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.2} s", v / MS)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

// ---------------------------------------------------------------------------
// One service

struct Ctx<'a> {
    s: &'a Settings,
    st: &'a Rt,
    runc: Option<&'a Rt>,
    dir: &'a Path,
    /// Measure the lazy rows (vm.unprivileged_userfaultfd is 1).
    lazy: bool,
}

fn timeout_for(svc: Svc) -> Duration {
    match svc {
        Svc::Slowapp => Duration::from_secs(300),
        _ => Duration::from_secs(600),
    }
}

/// `run -d` to ready, then stop cleanly.
fn cold(rt: &Rt, svc: Svc, bundle: &Path, id: &str) -> Result<Duration, String> {
    let t0 = Instant::now();
    let r = rt.run(&["run", "-d", "-b", bundle.to_str().unwrap(), id]);
    let ready = r.and_then(|_| {
        let pid = rt.pid(id)?;
        wait_ready(svc, pid, t0, timeout_for(svc))
    });
    rt.stop(id);
    ready
}

/// Copies a store without its cache (and temp files): a fresh restore materialises.
fn copy_store(from: &Path, to: &Path) -> Result<(), String> {
    fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
        fs::create_dir_all(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            let t = e.file_type()?;
            let dst = to.join(e.file_name());
            if t.is_dir() {
                copy(&e.path(), &dst)?;
            } else if t.is_file() {
                fs::copy(e.path(), &dst)?;
            }
        }
        Ok(())
    }
    fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for e in fs::read_dir(from).map_err(|e| e.to_string())?.flatten() {
        let name = e.file_name();
        if name == "cache" || name == "tmp" {
            continue;
        }
        let dst = to.join(&name);
        let r = if e.path().is_dir() {
            copy(&e.path(), &dst)
        } else {
            fs::copy(e.path(), &dst).map(|_| ())
        };
        r.map_err(|e2| format!("copy {} to {}: {e2}", e.path().display(), dst.display()))?;
    }
    Ok(())
}

/// Pids of the `criu lazy-pages` daemons of container `id`: a command line with
/// the argument `lazy-pages` and the work dir `--root/ID/criu` (`-W`).
fn lazy_daemons(id: &str) -> Vec<i32> {
    let work_suffix = format!("/{id}/criu");
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_lazy_daemon(*pid, &work_suffix))
        .collect()
}

/// A live `criu lazy-pages` for the work dir ending in `work_suffix` (a zombie has
/// an empty command line: gone).
fn is_lazy_daemon(pid: i32, work_suffix: &str) -> bool {
    let Ok(c) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
    args.contains(&b"lazy-pages".as_slice())
        && args.iter().any(|a| {
            a.ends_with(work_suffix.as_bytes()) || a.ends_with(format!("{work_suffix}/").as_bytes())
        })
}

/// After a lazy copy is ready: polls /proc every 5 ms until its lazy-pages daemon
/// exited; returns the time since `t0` and whether the daemon was still running
/// at ready. A daemon gone by then counts as `ready` (it must have run: its log
/// is in the work dir).
fn wait_lazy_all_in(
    st: &Rt,
    id: &str,
    t0: Instant,
    ready: Duration,
) -> Result<(Duration, bool), String> {
    let pids = lazy_daemons(id);
    if pids.is_empty() {
        let log = st.root.join(id).join("criu/lazy-pages.log");
        if !log.exists() {
            return Err(format!(
                "restore --lazy-pages {id}: no lazy-pages daemon with its work dir running and no {}",
                log.display()
            ));
        }
        return Ok((ready, false));
    }
    let work_suffix = format!("/{id}/criu");
    let deadline = Instant::now() + Duration::from_secs(600);
    while pids.iter().any(|p| is_lazy_daemon(*p, &work_suffix)) {
        if Instant::now() > deadline {
            return Err(format!(
                "the lazy-pages daemon of {id} (pid {pids:?}) still runs 10 min after ready"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((t0.elapsed(), true))
}

/// `restore --from TAG --lazy-pages -d` to ready, then until its lazy-pages daemon
/// exited; the copy is deleted. Returns (ready, all in, daemon still ran at ready).
fn lazy_restore(
    c: &Ctx,
    svc: Svc,
    tag: &str,
    id: &str,
) -> Result<(Duration, Duration, bool), String> {
    let t0 = Instant::now();
    let r =
        c.st.run(&["restore", "--from", tag, "--lazy-pages", "-d", id])
            .and_then(|_| wait_ready(svc, c.st.pid(id)?, t0, timeout_for(svc)))
            .and_then(|ready| {
                let (all_in, ran) = wait_lazy_all_in(c.st, id, t0, ready)?;
                Ok((ready, all_in, ran))
            });
    c.st.delete(id);
    r
}

fn bench_svc(c: &Ctx, svc: Svc) -> Result<SvcResult, String> {
    let s = c.s;
    let name = svc.name();
    let mut res = SvcResult::default();
    let bundle = c.dir.join(format!("bundle-{name}"));
    let t = Instant::now();
    build_bundle(name, &bundle, &svc.build_args(s))?;
    eprintln!(
        "warm: {name}: bundle ({}) built in {:.1} s",
        svc.size(s),
        t.elapsed().as_secs_f64()
    );

    // 1. Cold starts, alternating.
    for i in 0..s.runs {
        let d = cold(c.st, svc, &bundle, &format!("{name}-cold-{i}"))?;
        res.push("cold_stasis", d);
        let mut line = format!(
            "warm: {name}: cold {i}: stasis {:.0} ms",
            d.as_secs_f64() * MS
        );
        if let Some(runc) = c.runc {
            let d = cold(runc, svc, &bundle, &format!("{name}-rcold-{i}"))?;
            res.push("cold_runc", d);
            line += &format!(", runc {:.0} ms", d.as_secs_f64() * MS);
        }
        eprintln!("{line}");
    }

    // 2. prewarm into the store.
    let tag = format!("{name}:bench");
    let (wall, out) = c.st.run(&[
        "prewarm",
        "-b",
        bundle.to_str().unwrap(),
        "--ready",
        svc.prewarm_probe(),
        "--ready-timeout",
        "600s",
        "--tag",
        &tag,
        "--id",
        &format!("{name}-prewarm"),
        "--print-stats",
    ])?;
    res.prewarm_cold_ms = out
        .lines()
        .find_map(|l| l.strip_prefix("cold_start_to_ready_ms: "))
        .and_then(|v| v.trim().parse().ok());
    eprintln!(
        "warm: {name}: prewarm {:.1} s (its cold start to ready: {} ms)",
        wall.as_secs_f64(),
        res.prewarm_cold_ms.map_or("?".into(), |v| v.to_string())
    );

    // 3. runc's checkpoint into a plain directory.
    let runc_img = c.dir.join(format!("runc-img-{name}"));
    if let Some(runc) = c.runc {
        let id = format!("{name}-rckpt");
        let t0 = Instant::now();
        runc.run(&["run", "-d", "-b", bundle.to_str().unwrap(), &id])?;
        wait_ready(svc, runc.pid(&id)?, t0, timeout_for(svc))?;
        let work = c.dir.join(format!("runc-work-{name}"));
        let (w, _) = runc.run(&[
            "checkpoint",
            "--image-path",
            runc_img.to_str().unwrap(),
            "--work-path",
            work.to_str().unwrap(),
            &id,
        ])?;
        runc.delete(&id);
        // runc leaves the image directory mode 0600: the restored service, no longer
        // root by then, cannot open timens-0.img ("Permission denied").
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&runc_img, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("chmod {}: {e}", runc_img.display()))?;
        eprintln!(
            "warm: {name}: runc checkpoint {:.0} ms",
            w.as_secs_f64() * MS
        );
    }

    // 4. First restores: each from a fresh copy of the store without its cache.
    if !s.skips("first") {
        let store = c.st.store.as_deref().unwrap();
        for i in 0..s.runs {
            let copy = c.dir.join(format!("store-copy-{name}-{i}"));
            copy_store(store, &copy)?;
            let id = format!("{name}-first-{i}");
            let t0 = Instant::now();
            let r =
                c.st.run_in(Some(&copy), &["restore", "--from", &tag, "-d", &id])
                    .and_then(|_| wait_ready(svc, c.st.pid(&id)?, t0, timeout_for(svc)));
            c.st.delete(&id);
            let _ = fs::remove_dir_all(&copy);
            let d = r?;
            eprintln!(
                "warm: {name}: first restore {i}: {:.0} ms",
                d.as_secs_f64() * MS
            );
            res.push("restore_first", d);
        }
    }

    // 5. Later restores (cache warm) alternating with runc's.
    {
        let id = format!("{name}-prime");
        let t0 = Instant::now();
        let r =
            c.st.run(&["restore", "--from", &tag, "-d", &id])
                .and_then(|_| wait_ready(svc, c.st.pid(&id)?, t0, timeout_for(svc)));
        c.st.delete(&id);
        eprintln!(
            "warm: {name}: unmeasured restore (fills the cache) {:.0} ms",
            r?.as_secs_f64() * MS
        );
        if c.lazy {
            let (ready, all_in, _) = lazy_restore(c, svc, &tag, &format!("{name}-lprime"))?;
            eprintln!(
                "warm: {name}: unmeasured lazy restore {:.0} ms (all memory in {:.0} ms)",
                ready.as_secs_f64() * MS,
                all_in.as_secs_f64() * MS
            );
        }
    }
    for i in 0..s.runs {
        let id = format!("{name}-later-{i}");
        let t0 = Instant::now();
        let r =
            c.st.run(&["restore", "--from", &tag, "-d", &id])
                .and_then(|_| wait_ready(svc, c.st.pid(&id)?, t0, timeout_for(svc)));
        c.st.delete(&id);
        let d = r?;
        res.push("restore_later", d);
        let mut line = format!(
            "warm: {name}: restore {i}: stasis from store {:.0} ms",
            d.as_secs_f64() * MS
        );
        if c.lazy {
            let (ready, all_in, ran) = lazy_restore(c, svc, &tag, &format!("{name}-lazy-{i}"))?;
            res.push("restore_lazy", ready);
            res.push("restore_lazy_all_in", all_in);
            line += &format!(
                ", lazy {:.0} ms (all memory in {:.0} ms{})",
                ready.as_secs_f64() * MS,
                all_in.as_secs_f64() * MS,
                if ran {
                    ""
                } else {
                    ": daemon already gone at ready"
                }
            );
        }
        if let Some(runc) = c.runc {
            let id = format!("{name}-rrest-{i}");
            let work = c.dir.join(format!("runc-rwork-{name}-{i}"));
            let t0 = Instant::now();
            let r = runc
                .run(&[
                    "restore",
                    "-d",
                    "--image-path",
                    runc_img.to_str().unwrap(),
                    "--work-path",
                    work.to_str().unwrap(),
                    "-b",
                    bundle.to_str().unwrap(),
                    &id,
                ])
                .and_then(|_| wait_ready(svc, runc.pid(&id)?, t0, timeout_for(svc)));
            runc.delete(&id);
            let _ = fs::remove_dir_all(&work);
            let d = r?;
            res.push("runc_restore", d);
            line += &format!(", runc from dir {:.0} ms", d.as_secs_f64() * MS);
        }
        eprintln!("{line}");
    }
    let _ = fs::remove_dir_all(&runc_img);

    // 6. serve.
    if !s.skips("serve") {
        serve_runs(c, svc, &tag, &mut res)?;
    }
    let _ = fs::remove_dir_all(&bundle);
    Ok(res)
}

fn serve_runs(c: &Ctx, svc: Svc, tag: &str, res: &mut SvcResult) -> Result<(), String> {
    let name = svc.name();
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(u64::MAX);
    let mut runs = vec![(0usize, false, None)];
    if c.lazy {
        runs.push((0, true, None));
    }
    runs.push((2, false, None));
    if let Some(w) = svc.serve_warmup() {
        runs.push((2, false, Some(w)));
    }
    for (pool, lazy, warmup) in runs {
        let (key, flags) = match (pool, lazy, warmup) {
            (0, false, _) => ("serve_empty", "--pool 0".to_string()),
            (0, true, _) => ("serve_empty_lazy", "--pool 0 --lazy-pages".to_string()),
            (_, _, Some(_)) => ("serve_pool_warmup", format!("--pool {pool} --warmup")),
            _ => ("serve_pool", format!("--pool {pool}")),
        };
        let (hit_key, reuse_key) = if warmup.is_some() {
            ("serve_pool_warmup", "serve_reuse_warmup")
        } else {
            ("serve_pool", "serve_reuse")
        };
        let addr = free_port()?;
        let log = c.dir.join(format!(
            "serve-{name}-{pool}{}{}.log",
            if lazy { "-lazy" } else { "" },
            if warmup.is_some() { "-warmup" } else { "" }
        ));
        let mut sv = Serve::start(c.st, tag, svc, addr, (pool, lazy, warmup), &log)?;
        let r = (|| -> Result<(), String> {
            for i in 0..c.s.conns {
                // The stats file is rewritten every ~200 ms: wait on counters that
                // show the previous connections were seen and their copy reaped.
                let i = i as u64;
                if pool == 0 {
                    sv.wait("no copy", |v| {
                        n(v, "connections") >= i && n(v, "discarded") >= i && n(v, "copies") == 0
                    })?;
                    let d = ttfb(svc, addr)?;
                    res.push(key, d);
                    eprintln!(
                        "warm: {name}: serve {flags}: connection {i}: {:.1} ms",
                        d.as_secs_f64() * MS
                    );
                } else {
                    sv.wait("a full pool", |v| {
                        n(v, "connections") >= 2 * i
                            && n(v, "discarded") >= i
                            && n(v, "copies") == 2
                            && n(v, "ready_copies") == 2
                            && n(v, "in_flight") == 0
                    })?;
                    let d = ttfb(svc, addr)?;
                    let d2 = ttfb(svc, addr)?;
                    res.push(hit_key, d);
                    res.push(reuse_key, d2);
                    eprintln!(
                        "warm: {name}: serve {flags}: connection {i}: pool hit {:.1} ms, then {:.1} ms",
                        d.as_secs_f64() * MS,
                        d2.as_secs_f64() * MS
                    );
                }
            }
            Ok(())
        })();
        let total = (c.s.conns * if pool == 0 { 1 } else { 2 }) as u64;
        if r.is_ok() {
            let _ = sv.wait("the counters of every connection", |v| {
                n(v, "connections") >= total
            });
        }
        if let Some(v) = sv.status() {
            eprintln!(
                "warm: {name}: serve {flags}: connections {}, restores {}, pool hits {}, misses {}, discarded {}",
                v["connections"], v["restores"], v["pool_hits"], v["pool_misses"], v["discarded"]
            );
        }
        if let Some(p50) = sv.status().and_then(|v| v["ttfb_ms"]["p50"].as_f64()) {
            res.serve_p50.push((key, p50));
        }
        let stopped = sv.stop();
        r.map_err(|e| {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "{e}\nserve's log:\n{}",
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        })?;
        stopped?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Setup, cleanup, report

struct Cleanup<'a> {
    rts: Vec<&'a Rt>,
    dir: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for rt in &self.rts {
            rt.delete_all();
        }
        unmount_leftovers("warm", &self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn bench() -> Result<bool, String> {
    if !is_root() {
        println!("warm: skipped: needs root");
        return Ok(true);
    }
    if Command::new("criu").arg("--version").output().is_err() {
        println!("warm: skipped: no `criu` on PATH (scripts/setup builds it)");
        return Ok(true);
    }
    let s = Settings::from_env()?;
    // Dropped last (declared before the cleanup guard): the knob goes back after
    // every container is gone, on every return path.
    let (lazy, _uffd, lazy_skip) = match lazy_setup(&s) {
        Ok(g) => (true, g, None),
        Err(why) => {
            println!("warm: skipping lazy rows: {why}");
            (false, None, Some(why))
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("stasis-bench-warm-")
        .tempdir_in(&s.dir)
        .map_err(|e| format!("temp dir in {}: {e}", s.dir.display()))?
        .keep();
    let st = Rt {
        name: "stasis",
        bin: stasis_bin()?,
        root: dir.join("state-stasis"),
        store: Some(dir.join("store")),
        logs: dir.clone(),
    };
    let runc = if s.skips("runc") {
        None
    } else {
        match find_bin("RUNC_BIN", "runc", &["/usr/sbin/runc", "/usr/bin/runc"]) {
            Some(bin) => Some(Rt {
                name: "runc",
                bin,
                root: dir.join("state-runc"),
                store: None,
                logs: dir.clone(),
            }),
            None => {
                println!("warm: runc not found (PATH, /usr/sbin; RUNC_BIN): stasis only");
                None
            }
        }
    };
    let mut rts = vec![&st];
    rts.extend(runc.as_ref());
    let _cleanup = Cleanup {
        rts,
        dir: dir.clone(),
    };
    println!(
        "warm: {} run(s), {} serve connection(s); redis {} MiB, postgres scale {}, slowapp {} s; runc {}; in {}",
        s.runs,
        s.conns,
        s.redis_mib,
        s.pg_scale,
        s.slowapp_secs,
        runc.as_ref().map_or("skipped".into(), |r| r.bin.display().to_string()),
        dir.display()
    );
    let c = Ctx {
        s: &s,
        st: &st,
        runc: runc.as_ref(),
        dir: &dir,
        lazy,
    };
    let mut results = Vec::new();
    for svc in [Svc::Redis, Svc::Postgres, Svc::Slowapp] {
        if s.skips(svc.name()) {
            continue;
        }
        let t = Instant::now();
        let r = bench_svc(&c, svc);
        st.delete_all();
        if let Some(r) = &runc {
            r.delete_all();
        }
        let r = r.map_err(|e| format!("{}: {e}", svc.name()))?;
        eprintln!(
            "warm: {} done in {:.1} s",
            svc.name(),
            t.elapsed().as_secs_f64()
        );
        results.push((svc, r));
    }
    Ok(report(&s, &results, lazy_skip.as_deref()))
}

fn report(s: &Settings, results: &[(Svc, SvcResult)], lazy_skip: Option<&str>) -> bool {
    let mut ok = true;
    let mut json = serde_json::Map::new();
    println!();
    println!(
        "| service | measurement | min | median | median / cold (stasis) | median / runc restore |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    for (svc, r) in results {
        let cold = r.get("cold_stasis").map(|x| x.1);
        let runc = r.get("runc_restore").map(|x| x.1);
        let mut m = serde_json::Map::new();
        for (key, label) in ROWS {
            let Some((lo, med)) = r.get(key) else {
                continue;
            };
            let rel = |base: Option<f64>| {
                base.filter(|b| *b > 0.0)
                    .map_or(String::new(), |b| format!("{:.1}%", med / b * 100.0))
            };
            println!(
                "| {} ({}) | {label} | {} | {} | {} | {} |",
                svc.name(),
                svc.size(s),
                fmt_ms(lo),
                fmt_ms(med),
                if key.starts_with("cold") {
                    String::new()
                } else {
                    rel(cold)
                },
                if key.starts_with("restore") {
                    rel(runc)
                } else {
                    String::new()
                },
            );
            let n = r
                .rows
                .iter()
                .find(|(k, _)| k == key)
                .map_or(0, |x| x.1.len());
            m.insert(
                (*key).into(),
                serde_json::json!({"min_ms": round(lo), "median_ms": round(med), "n": n}),
            );
        }
        if let Some(p) = r.prewarm_cold_ms {
            m.insert("prewarm_cold_to_ready_ms".into(), p.into());
        }
        for (k, p50) in &r.serve_p50 {
            m.insert(format!("{k}_serve_p50_ms"), round(*p50).into());
        }
        json.insert(svc.name().into(), m.into());
    }
    println!();
    let mut goals = serde_json::Map::new();
    for (svc, r) in results {
        if let Some(p) = &r.prewarm_cold_ms {
            println!(
                "warm: {}: prewarm's own cold start to ready: {p} ms; serve's own p50 TTFB: {}",
                svc.name(),
                r.serve_p50
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.1} ms"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if *svc == Svc::Redis {
            if let (Some(l), Some(cold)) = (r.get("restore_later"), r.get("cold_stasis")) {
                let pct = l.1 / cold.1 * 100.0;
                let met = pct <= 15.0;
                ok &= met;
                println!(
                    "warm: goal: redis restore-from-store-to-ready <= 15% of cold: {pct:.1}% {}",
                    if met { "met" } else { "MISSED" }
                );
                goals.insert("redis_restore_le_15pct".into(), met.into());
            }
            // Reported, not counted for BENCH_STRICT.
            if let (Some(l), Some(cold)) = (r.get("restore_lazy"), r.get("cold_stasis")) {
                let pct = l.1 / cold.1 * 100.0;
                let met = pct <= 15.0;
                println!(
                    "warm: goal: redis lazy restore-from-store-to-ready <= 15% of cold: {pct:.1}% {}",
                    if met { "met" } else { "MISSED" }
                );
                goals.insert("redis_lazy_restore_le_15pct".into(), met.into());
            }
        }
        if let Some((_, med)) = r.get("serve_pool") {
            let met = med <= 10.0;
            ok &= met;
            println!(
                "warm: goal: {} serve warm-pool TTFB median <= 10 ms: {med:.1} ms {}",
                svc.name(),
                if met { "met" } else { "MISSED" }
            );
            goals.insert(
                format!("{}_serve_pool_ttfb_le_10ms", svc.name()),
                met.into(),
            );
        }
        if let Some((_, med)) = r.get("serve_pool_warmup") {
            let met = med <= 10.0;
            println!(
                "warm: goal: {} serve warm-pool TTFB median <= 10 ms, with --warmup: {med:.1} ms {}",
                svc.name(),
                if met { "met" } else { "MISSED" }
            );
            goals.insert(
                format!("{}_serve_pool_warmup_ttfb_le_10ms", svc.name()),
                met.into(),
            );
        }
    }
    let line = serde_json::json!({
        "bench": "warm",
        "runs": s.runs,
        "serve_conns": s.conns,
        "redis_mib": s.redis_mib,
        "pg_scale": s.pg_scale,
        "slowapp_secs": s.slowapp_secs,
        "lazy_rows": lazy_skip.map_or(serde_json::Value::Bool(true), |why| {
            serde_json::json!({"skipped": why})
        }),
        "services": json,
        "goals_met": goals,
    });
    println!("{line}");
    ok
}

fn main() -> ExitCode {
    bench_main("warm", bench)
}
