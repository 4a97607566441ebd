//! Warm starts of real databases: Redis 7 and PostgreSQL 15 bundles from
//! `images/redis/build` and `images/postgres/build` with small datasets, real CRIU.
//!
//! - `prewarm` with every probe kind that applies to them (tcp, exec, log for
//!   Redis; tcp, exec, log, file for PostgreSQL; http does not apply), then
//!   `restore --from`: the data is what it was at the checkpoint (Redis DBSIZE and
//!   `DEBUG DIGEST`, compared with the live original and with a reference computed
//!   by a throwaway redis-server on the host; PostgreSQL row counts and sums, known
//!   in advance), writes after the restore work and are read back, and a second copy
//!   from the same snapshot does not see the first one's writes.
//! - A probe that never passes fails cleanly against a real database.
//! - `serve` in front of Redis: 20 concurrent clients against `--pool 2` all get
//!   their own answers (a tiny RESP client over TcpStream), idle copies are reaped,
//!   `--persist` keeps a counter across idle cycles, and SIGTERM leaves no
//!   container, mount, cgroup or network namespace behind.
//!
//! The images are built once per test process (`OnceLock`) under cargo's target
//! tmp dir and copied into each test's scratch dir, because a prewarm runs on the
//! bundle's own rootfs (PostgreSQL writes its data directory). Every test has a
//! private `--root` and `--store`; guards delete containers and stop servers even
//! when a test fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{cgroups_named, unique_id, Container};
use crate::store_flows::{
    assert_fails, entry_with_tag, left_in_root, mounts_under, names_in, run_cmd, Sx, CMD,
};
use crate::warm::{listed, Serve};

/// `requires!(REQS)` plus `Sx::setup` with the test's name; returns from the test
/// when it skips.
macro_rules! db_setup {
    ($($req:ident),+) => {{
        requires!($($req),+);
        let name = $crate::test_name!();
        match Sx::setup(name) {
            Some(s) => s,
            None => return,
        }
    }};
}

// ---------------------------------------------------------------------------
// Images, built once per test process

/// Keys of the Redis dataset: `--dataset-mib 2` with 512-byte values
/// (2 MiB / (512 + 20) bytes per key).
const REDIS_RDB_KEYS: i64 = 2 * 1_048_576 / (512 + 20);
/// Keys the prewarm's warm-up adds in memory only (never saved to dump.rdb): a
/// copy that was started cold instead of restored would not have them.
const REDIS_POPULATE: [&str; 5] = ["debug", "populate", "1000", "mem", "64"];
const REDIS_WARMUP_KEYS: i64 = 1000;
/// `/warmup.sh`: Redis accepts connections while it loads dump.rdb (and answers
/// `-LOADING`), so the warm-up waits for PONG, then adds the keys and checks the
/// answer (redis-cli can exit 0 on an error reply).
fn redis_warmup_sh() -> String {
    format!(
        "\
i=0
until [ \"$(redis-cli ping 2>&1)\" = PONG ]; do
  i=$((i + 1)); [ $i -lt 600 ] || {{ echo 'redis never answered PONG' >&2; exit 1; }}
  sleep 0.05
done
out=$(redis-cli {} 2>&1)
[ \"$out\" = OK ] || {{ echo \"DEBUG POPULATE: $out\" >&2; exit 1; }}
",
        REDIS_POPULATE.join(" ")
    )
}
const REDIS_WARMUP: &str = "sh /warmup.sh";

/// The warm-up of the PostgreSQL prewarms (`psql -f /warmup.sql` inside): changes
/// balances and creates a table, so the data at the checkpoint differs from what
/// the image was built with.
const PG_WARMUP_SQL: &str = "\
update pgbench_accounts set abalance = aid % 97 where aid <= 5000;
create table t (k int primary key, v text not null);
insert into t select g, 'v' || g from generate_series(1, 1000) g;
checkpoint;
";
/// `/warmup.sh`: PostgreSQL accepts TCP connections and creates its socket file
/// while it is still starting up ("the database system is starting up"), so after
/// a `tcp:` or `file:` probe the warm-up first waits until it accepts queries.
const PG_WARMUP_SH: &str = "\
i=0
until pg_isready -q -h /run/postgresql; do
  i=$((i + 1)); [ $i -lt 600 ] || { echo 'postgres never accepted queries' >&2; exit 1; }
  sleep 0.1
done
exec psql -X -v ON_ERROR_STOP=1 -q -f /warmup.sql
";
const PG_WARMUP: &str = "sh /warmup.sh";

/// What the PostgreSQL data holds after the warm-up: pgbench scale 1 (100,000
/// accounts), balances `aid % 97` for the first 5000, table t with k = 1..1000.
fn pg_expected() -> PgData {
    PgData {
        accounts: 100_000,
        balance_sum: (1..=5000i64).map(|a| a % 97).sum(),
        t_rows: 1000,
        t_sum: (1..=1000i64).sum(),
    }
}

struct RedisImage {
    bundle: PathBuf,
    /// DBSIZE and DEBUG DIGEST of dump.rdb plus the warm-up, computed by a
    /// throwaway redis-server on the host (not through stasis).
    dbsize: i64,
    digest: String,
}

/// Where this process builds its images; removed at exit (and stale ones of dead
/// test processes when the first image is built).
fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("db-images-{}", std::process::id()))
}

extern "C" fn remove_images_dir() {
    let _ = fs::remove_dir_all(images_dir());
}

fn prepare_images_dir() -> PathBuf {
    static ONCE: OnceLock<PathBuf> = OnceLock::new();
    ONCE.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for name in names_in(base) {
            if let Some(pid) = name.strip_prefix("db-images-") {
                if !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(base.join(&name));
                }
            }
        }
        let dir = images_dir();
        fs::create_dir_all(&dir).expect("create the images dir");
        // SAFETY: registers a plain extern "C" function without captured state.
        unsafe { libc::atexit(remove_images_dir) };
        dir
    })
    .clone()
}

/// Runs an image recipe: `images/NAME/build DIR ARGS`.
fn build_image(name: &str, args: &[&str]) -> Result<PathBuf, String> {
    let dir = prepare_images_dir().join(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("images/{name}/build"));
    let mut cmd = Command::new(&script);
    cmd.arg(&dir).args(args);
    let out = run_cmd(cmd, Duration::from_secs(600));
    if out.code != Some(0) {
        return Err(format!("{} failed: {out:#?}", script.display()));
    }
    Ok(dir)
}

fn redis_image() -> &'static RedisImage {
    static IMG: OnceLock<Result<RedisImage, String>> = OnceLock::new();
    let r = IMG.get_or_init(|| {
        let bundle = build_image("redis", &["--dataset-mib", "2"])?;
        fs::write(bundle.join("rootfs/warmup.sh"), redis_warmup_sh())
            .map_err(|e| format!("write warmup.sh: {e}"))?;
        let (dbsize, digest) = redis_reference(&bundle)?;
        Ok(RedisImage {
            bundle,
            dbsize,
            digest,
        })
    });
    r.as_ref().unwrap_or_else(|e| panic!("redis image: {e}"))
}

fn postgres_image() -> &'static Path {
    static IMG: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let r = IMG.get_or_init(|| {
        let b = build_image("postgres", &["--scale", "1"])?;
        fs::write(b.join("rootfs/warmup.sql"), PG_WARMUP_SQL)
            .map_err(|e| format!("write warmup.sql: {e}"))?;
        fs::write(b.join("rootfs/warmup.sh"), PG_WARMUP_SH)
            .map_err(|e| format!("write warmup.sh: {e}"))?;
        Ok(b)
    });
    r.as_ref()
        .map(PathBuf::as_path)
        .unwrap_or_else(|e| panic!("postgres image: {e}"))
}

/// DBSIZE and DEBUG DIGEST of the image's dump.rdb plus the warm-up, from a
/// throwaway redis-server on the host listening on a unix socket only.
fn redis_reference(bundle: &Path) -> Result<(i64, String), String> {
    let tmp = tempfile::Builder::new()
        .prefix("stasis-redis-ref-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    fs::copy(
        bundle.join("rootfs/data/dump.rdb"),
        tmp.path().join("dump.rdb"),
    )
    .map_err(|e| format!("copy dump.rdb: {e}"))?;
    let sock = tmp.path().join("s");
    let sock_s = sock.display().to_string();
    let mut server = Command::new("redis-server")
        .args(["--port", "0", "--unixsocket", &sock_s, "--dir"])
        .arg(tmp.path())
        .args([
            "--dbfilename",
            "dump.rdb",
            "--save",
            "",
            "--appendonly",
            "no",
            "--enable-debug-command",
            "yes",
            "--daemonize",
            "no",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn redis-server: {e}"))?;
    let cli = |args: &[&str]| -> Result<String, String> {
        let mut c = Command::new("redis-cli");
        c.args(["-s", &sock_s]).args(args);
        let out = run_cmd(c, Duration::from_secs(30));
        if out.code == Some(0) {
            Ok(out.stdout.trim().to_string())
        } else {
            Err(format!("redis-cli {args:?}: {out:#?}"))
        }
    };
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while cli(&["ping"]).ok().as_deref() != Some("PONG") {
            if Instant::now() > deadline {
                return Err("the reference redis-server did not answer PING".to_string());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let ok = cli(&REDIS_POPULATE)?;
        if ok != "OK" {
            return Err(format!("{REDIS_POPULATE:?}: {ok}"));
        }
        let n: i64 = cli(&["dbsize"])?
            .parse()
            .map_err(|e| format!("dbsize: {e}"))?;
        Ok((n, cli(&["debug", "digest"])?))
    })();
    let _ = cli(&["shutdown", "nosave"]);
    let _ = server.kill();
    let _ = server.wait();
    result
}

/// A private copy of a built image in the test's scratch dir.
fn copy_bundle(sx: &Sx, image: &Path, name: &str) -> PathBuf {
    let dst = sx.path(name);
    let mut cmd = Command::new("cp");
    cmd.args(["-a", "--reflink=auto"]).arg(image).arg(&dst);
    run_cmd(cmd, Duration::from_secs(120)).expect_ok();
    dst
}

// ---------------------------------------------------------------------------
// Talking to the databases

/// A TCP connection to 127.0.0.1:`port` inside the network namespace of `pid`,
/// opened from a thread that entered that namespace (the socket stays in it).
fn connect_in(pid: i32, port: u16) -> Result<TcpStream, String> {
    std::thread::spawn(move || -> Result<TcpStream, String> {
        let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
            .map_err(|e| format!("open the netns of {pid}: {e}"))?;
        // SAFETY: setns on a descriptor we own; it changes only this thread, which
        // ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns into the netns of {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr} in the netns of {pid}: {e}"))
    })
    .join()
    .map_err(|_| "the connecting thread panicked".to_string())?
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<String>),
    Array(Vec<Reply>),
}

/// A minimal Redis client: commands as RESP arrays, replies parsed.
struct Resp {
    w: TcpStream,
    r: BufReader<TcpStream>,
    what: String,
}

impl Resp {
    fn new(s: TcpStream, what: String) -> Result<Resp, String> {
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let r = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Resp {
            w: s,
            r: BufReader::new(r),
            what,
        })
    }

    /// Redis inside the network namespace of `pid`.
    fn in_netns(pid: i32) -> Result<Resp, String> {
        Resp::new(
            connect_in(pid, 6379)?,
            format!("redis in the netns of {pid}"),
        )
    }

    /// Redis through `serve` listening on `addr`.
    fn at(addr: SocketAddr) -> Result<Resp, String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        Resp::new(s, format!("redis through serve at {addr}"))
    }

    fn cmd(&mut self, args: &[&str]) -> Result<Reply, String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w
            .write_all(req.as_bytes())
            .map_err(|e| format!("{}: send {args:?}: {e}", self.what))?;
        self.read_reply()
            .map_err(|e| format!("{}: reply to {args:?}: {e}", self.what))
    }

    fn read_line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        line.strip_suffix("\r\n")
            .map(str::to_string)
            .ok_or_else(|| format!("bad RESP line {line:?}"))
    }

    fn read_reply(&mut self) -> Result<Reply, String> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let num = || {
            rest.parse::<i64>()
                .map_err(|e| format!("bad RESP number {line:?}: {e}"))
        };
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(num()?),
            "$" => {
                let n = num()?;
                if n < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut buf).map_err(|e| e.to_string())?;
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(String::from_utf8_lossy(&buf).into_owned()))
                }
            }
            "*" => {
                let n = num()?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read_reply()?);
                }
                Reply::Array(items)
            }
            _ => return Err(format!("bad RESP reply {line:?}")),
        })
    }

    /// A command whose reply is an integer.
    fn int(&mut self, args: &[&str]) -> Result<i64, String> {
        match self.cmd(args)? {
            Reply::Int(n) => Ok(n),
            other => Err(format!("{args:?}: expected an integer, got {other:?}")),
        }
    }

    /// A command whose reply is a string (simple or bulk).
    fn text(&mut self, args: &[&str]) -> Result<String, String> {
        match self.cmd(args)? {
            Reply::Simple(s) | Reply::Bulk(Some(s)) => Ok(s),
            other => Err(format!("{args:?}: expected a string, got {other:?}")),
        }
    }

    /// (DBSIZE, DEBUG DIGEST).
    fn fingerprint(&mut self) -> Result<(i64, String), String> {
        Ok((self.int(&["DBSIZE"])?, self.text(&["DEBUG", "DIGEST"])?))
    }
}

#[track_caller]
fn redis_in(pid: i32) -> Resp {
    Resp::in_netns(pid).unwrap_or_else(|e| panic!("{e}"))
}

/// Writes after a restore work and are read back.
#[track_caller]
fn redis_writes_work(r: &mut Resp, dbsize_before: i64, tag: &str) {
    let val = format!("written-after-restore-{tag}");
    assert_eq!(r.text(&["SET", "after:restore", &val]).as_deref(), Ok("OK"));
    assert_eq!(r.int(&["INCR", "after:counter"]), Ok(1));
    assert_eq!(r.int(&["INCR", "after:counter"]), Ok(2));
    assert_eq!(r.text(&["GET", "after:restore"]), Ok(val));
    assert_eq!(r.text(&["GET", "after:counter"]).as_deref(), Ok("2"));
    assert_eq!(r.int(&["DBSIZE"]), Ok(dbsize_before + 2));
    // The dataset loaded at the cold start and the warm-up's keys are there.
    assert!(
        matches!(r.text(&["GET", "key:0"]), Ok(v) if v.starts_with("value:0")),
        "key:0 of the RDB dataset is missing"
    );
    assert!(
        matches!(r.text(&["GET", "mem:999"]), Ok(v) if v.starts_with("value:999")),
        "mem:999 of the warm-up is missing"
    );
}

/// Row counts and sums of the PostgreSQL data.
#[derive(Debug, PartialEq, Eq)]
struct PgData {
    accounts: i64,
    balance_sum: i64,
    t_rows: i64,
    t_sum: i64,
}

/// `psql -c SQL` against 127.0.0.1:5432 in the network namespace of `pid` (the
/// host's psql, through nsenter); unaligned, tuples only.
fn psql(pid: i32, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net"))
        .args([
            "psql",
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "10");
    let out = run_cmd(cmd, CMD);
    if out.code == Some(0) {
        Ok(out.stdout.trim().to_string())
    } else {
        Err(format!("psql {sql:?} in the netns of {pid}: {out:#?}"))
    }
}

#[track_caller]
fn psql_ok(pid: i32, sql: &str) -> String {
    psql(pid, sql).unwrap_or_else(|e| panic!("{e}"))
}

#[track_caller]
fn pg_data(pid: i32) -> PgData {
    let row = psql_ok(
        pid,
        "select (select count(*) from pgbench_accounts), \
                (select sum(abalance) from pgbench_accounts), \
                (select count(*) from t), (select sum(k) from t)",
    );
    let n: Vec<i64> = row
        .split('|')
        .map(|x| {
            x.parse()
                .unwrap_or_else(|e| panic!("not a number in {row:?}: {e}"))
        })
        .collect();
    assert_eq!(n.len(), 4, "{row:?}");
    PgData {
        accounts: n[0],
        balance_sum: n[1],
        t_rows: n[2],
        t_sum: n[3],
    }
}

/// INSERT and UPDATE after a restore work and are read back.
#[track_caller]
fn pg_writes_work(pid: i32, tag: &str) {
    let base = pg_expected();
    psql_ok(
        pid,
        &format!(
            "insert into t values (1001, 'after-restore-{tag}'); \
             update pgbench_accounts set abalance = abalance + 1000 where aid = 1; \
             update t set v = 'updated' where k = 1"
        ),
    );
    assert_eq!(
        psql_ok(pid, "select v from t where k = 1001"),
        format!("after-restore-{tag}")
    );
    assert_eq!(psql_ok(pid, "select v from t where k = 1"), "updated");
    assert_eq!(
        pg_data(pid),
        PgData {
            balance_sum: base.balance_sum + 1000,
            t_rows: base.t_rows + 1,
            t_sum: base.t_sum + 1001,
            ..base
        }
    );
}

// ---------------------------------------------------------------------------
// prewarm and restore

/// `prewarm --bundle B --ready PROBE --tag TAG --id ID --warmup W EXTRA...`,
/// asserting success.
#[track_caller]
fn prewarm(sx: &Sx, bundle: &Path, probe: &str, tag: &str, id: &str, warmup: &str, extra: &[&str]) {
    let mut args = vec![
        "prewarm",
        "--bundle",
        bundle.to_str().unwrap(),
        "--ready",
        probe,
        "--ready-timeout",
        "60s",
        "--warmup",
        warmup,
        "--tag",
        tag,
        "--id",
        id,
    ];
    args.extend_from_slice(extra);
    sx.ok(&args);
}

/// Restores `tag` as a new container; its guard and pid.
#[track_caller]
fn restore(sx: &Sx, tag: &str, what: &str) -> (Container, i32) {
    let id = unique_id(what);
    let g = sx.restore_from(tag, &id, &[]);
    let pid = sx.pid(&id);
    (g, pid)
}

/// The warming container is gone after a prewarm without --keep-running.
#[track_caller]
fn assert_warming_container_gone(sx: &Sx, id: &str) {
    assert!(sx.state(id).is_none(), "{id} still exists after prewarm");
    assert!(cgroups_named(id).is_empty(), "cgroups of {id} left");
}

#[test]
fn redis_prewarm_tcp_then_restore_keeps_dbsize_digest_and_takes_writes() {
    let sx = db_setup!(redis);
    let img = redis_image();
    assert_eq!(img.dbsize, REDIS_RDB_KEYS + REDIS_WARMUP_KEYS);
    let b = copy_bundle(&sx, &img.bundle, "redis");
    let wid = unique_id("db-redis-warm");
    let _gw = sx.guard(&wid);
    prewarm(
        &sx,
        &b,
        "tcp:127.0.0.1:6379",
        "redis:v1",
        &wid,
        REDIS_WARMUP,
        &["--keep-running"],
    );
    // Before: the original, still running and unchanged since the checkpoint.
    let before = redis_in(sx.pid(&wid))
        .fingerprint()
        .expect("fingerprint before");
    assert_eq!(
        before,
        (img.dbsize, img.digest.clone()),
        "the warmed Redis differs from the reference computed on the host"
    );

    let (_g1, pid1) = restore(&sx, "redis:v1", "db-redis-r");
    let mut r1 = redis_in(pid1);
    assert_eq!(r1.text(&["PING"]).as_deref(), Ok("PONG"));
    assert_eq!(
        r1.fingerprint().expect("fingerprint after"),
        before,
        "DBSIZE/DEBUG DIGEST after restore differ from before the checkpoint"
    );
    redis_writes_work(&mut r1, before.0, "r1");

    // A second copy of the same snapshot: the checkpoint's data, not r1's writes;
    // the original is untouched by both.
    let (_g2, pid2) = restore(&sx, "redis:v1", "db-redis-r");
    assert_eq!(redis_in(pid2).fingerprint().expect("copy 2"), before);
    assert_eq!(
        redis_in(sx.pid(&wid)).fingerprint().expect("original"),
        before
    );
}

#[test]
fn redis_prewarm_exec_and_log_probes_then_restore_keep_data() {
    let sx = db_setup!(redis);
    let img = redis_image();
    let b = copy_bundle(&sx, &img.bundle, "redis");
    for (probe, tag) in [
        ("exec:redis-cli ping", "redis-exec:v1"),
        ("log:Ready to accept connections", "redis-log:v1"),
    ] {
        let wid = unique_id("db-redis-warm");
        let _gw = sx.guard(&wid);
        prewarm(&sx, &b, probe, tag, &wid, REDIS_WARMUP, &[]);
        assert_warming_container_gone(&sx, &wid);
        let (_g, pid) = restore(&sx, tag, "db-redis-r");
        let mut r = redis_in(pid);
        assert_eq!(
            r.fingerprint().unwrap_or_else(|e| panic!("{probe}: {e}")),
            (img.dbsize, img.digest.clone()),
            "{probe}: DBSIZE/DEBUG DIGEST after restore differ from the data at the checkpoint"
        );
        redis_writes_work(&mut r, img.dbsize, tag);
    }
}

#[test]
fn redis_probe_that_never_passes_times_out_cleanly() {
    let sx = db_setup!(redis);
    let b = copy_bundle(&sx, &redis_image().bundle, "redis");
    let id = unique_id("db-redis-never");
    let _g = sx.guard(&id);
    let t0 = Instant::now();
    let out = sx.run(&[
        "prewarm",
        "--bundle",
        b.to_str().unwrap(),
        "--ready",
        "tcp:127.0.0.1:6380",
        "--ready-timeout",
        "2s",
        "--tag",
        "never",
        "--id",
        &id,
    ]);
    let took = t0.elapsed();
    // The last error and Redis's own last output lines.
    assert_fails(
        &out,
        &[
            "tcp:127.0.0.1:6380",
            "never passed",
            "Connection refused",
            "Ready to accept connections",
        ],
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "failed after {took:?} with --ready-timeout 2s"
    );
    assert_warming_container_gone(&sx, &id);
    assert_eq!(left_in_root(&sx), Vec::<String>::new(), "left in --root");
    assert!(sx.ls().is_empty(), "a failed prewarm stored a snapshot");
}

#[test]
fn postgres_prewarm_log_then_restore_keeps_rows_and_sums_and_takes_writes() {
    let sx = db_setup!(postgres);
    let b = copy_bundle(&sx, postgres_image(), "pg");
    let wid = unique_id("db-pg-warm");
    let _gw = sx.guard(&wid);
    prewarm(
        &sx,
        &b,
        "log:database system is ready to accept connections",
        "pg:v1",
        &wid,
        PG_WARMUP,
        &[],
    );
    assert_warming_container_gone(&sx, &wid);

    let (_g1, pid1) = restore(&sx, "pg:v1", "db-pg-r");
    assert_eq!(
        pg_data(pid1),
        pg_expected(),
        "rows/sums after restore differ from the data at the checkpoint"
    );
    pg_writes_work(pid1, "r1");
    // Committed writes survive a CHECKPOINT of the restored server.
    psql_ok(pid1, "checkpoint");
    assert_eq!(
        psql_ok(pid1, "select v from t where k = 1001"),
        "after-restore-r1"
    );

    // A second copy: the checkpoint's data, not the first copy's writes (its data
    // directory travelled with the snapshot and is private to the copy).
    let (_g2, pid2) = restore(&sx, "pg:v1", "db-pg-r");
    assert_eq!(pg_data(pid2), pg_expected(), "second copy");
    pg_writes_work(pid2, "r2");
    assert_eq!(
        psql_ok(pid1, "select v from t where k = 1001"),
        "after-restore-r1",
        "the second copy's write reached the first copy"
    );
}

#[test]
fn postgres_prewarm_tcp_exec_and_file_probes_then_restore_keep_data() {
    let sx = db_setup!(postgres);
    for (n, (probe, tag)) in [
        ("tcp:127.0.0.1:5432", "pg-tcp:v1"),
        ("exec:pg_isready -h 127.0.0.1 -p 5432", "pg-exec:v1"),
        ("file:/run/postgresql/.s.PGSQL.5432", "pg-file:v1"),
    ]
    .into_iter()
    .enumerate()
    {
        // PostgreSQL writes its data directory: every prewarm gets a fresh bundle.
        let b = copy_bundle(&sx, postgres_image(), &format!("pg{n}"));
        let wid = unique_id("db-pg-warm");
        let _gw = sx.guard(&wid);
        prewarm(&sx, &b, probe, tag, &wid, PG_WARMUP, &[]);
        assert_warming_container_gone(&sx, &wid);
        let (_g, pid) = restore(&sx, tag, "db-pg-r");
        assert_eq!(pg_data(pid), pg_expected(), "{probe}");
        pg_writes_work(pid, tag);
    }
}

// ---------------------------------------------------------------------------
// serve in front of Redis

/// Prewarms the Redis image as `redis:v1` (exec probe: no probe connection left
/// in the server at the checkpoint).
fn prewarmed_redis(sx: &Sx) -> String {
    let b = copy_bundle(sx, &redis_image().bundle, "redis");
    let wid = unique_id("db-redis-warm");
    let _g = sx.guard(&wid);
    prewarm(
        sx,
        &b,
        "exec:redis-cli ping",
        "redis:v1",
        &wid,
        REDIS_WARMUP,
        &[],
    );
    "redis:v1".to_string()
}

/// `serve` relaying to Redis (port 6379), JSON log.
fn serve_redis(sx: &Sx, from: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--log-format", "json"];
    args.extend_from_slice(extra);
    Serve::start_on(sx, from, 6379, &args, None)
}

impl Serve {
    /// The `copy` field of every `event` line.
    fn copies_in(&self, event: &str) -> BTreeSet<String> {
        self.events(event)
            .iter()
            .filter_map(|e| e["copy"].as_str().map(str::to_string))
            .collect()
    }

    /// A new client through the server.
    #[track_caller]
    fn client(&self) -> Resp {
        Resp::at(self.listen).unwrap_or_else(|e| panic!("{e}; serve log:\n{}", self.log()))
    }
}

/// The network namespace (`net:[INODE]`) of every copy a server restored, read
/// while the copy runs (from `restored` events).
#[derive(Default)]
struct NetnsSeen(BTreeSet<String>);

impl NetnsSeen {
    fn note(&mut self, srv: &Serve) {
        for e in srv.events("restored") {
            if let Some(pid) = e["pid"].as_i64() {
                if let Ok(l) = fs::read_link(format!("/proc/{pid}/ns/net")) {
                    self.0.insert(l.display().to_string());
                }
            }
        }
    }
}

/// Network namespaces among `seen` still held by a process or a mount.
fn netns_left(seen: &NetnsSeen) -> Vec<String> {
    let mut left = BTreeSet::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(l) = fs::read_link(e.path().join("ns/net")) {
                let l = l.display().to_string();
                if seen.0.contains(&l) {
                    left.insert(format!("{l} (process {})", e.file_name().to_string_lossy()));
                }
            }
        }
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        for ns in &seen.0 {
            if line.contains(ns.as_str()) {
                left.insert(format!("{ns} (mount: {line})"));
            }
        }
    }
    left.into_iter().collect()
}

/// SIGTERM: exit 0, a `stopped` event, and no copy, cgroup, private filesystem,
/// mount or network namespace left.
#[track_caller]
fn stop_cleanly(sx: &Sx, srv: &mut Serve, seen: &NetnsSeen) {
    assert!(!seen.0.is_empty(), "no copy's network namespace was seen");
    let code = srv.terminate(Duration::from_secs(60));
    let log = srv.log();
    assert_eq!(
        code,
        Some(0),
        "serve did not exit 0 on SIGTERM; log:\n{log}"
    );
    assert!(
        !srv.events("stopped").is_empty(),
        "no `stopped` event in:\n{log}"
    );
    let copies: BTreeSet<String> = listed(sx)
        .into_iter()
        .filter(|i| i.starts_with("serve-"))
        .collect();
    assert_eq!(
        copies,
        BTreeSet::new(),
        "copies left after SIGTERM; log:\n{log}"
    );
    let prefix = format!("serve-6379-{}-", srv.pid());
    assert!(
        cgroups_named(&prefix).is_empty(),
        "cgroups of copies left: {:?}",
        cgroups_named(&prefix)
    );
    let private = names_in(&sx.env.root.join(".copies"));
    assert!(
        private.is_empty(),
        "private filesystems of copies left: {private:?}"
    );
    assert_eq!(
        mounts_under(&sx.env.root),
        Vec::<String>::new(),
        "mounts left"
    );
    assert_eq!(mounts_under(&sx.store), Vec::<String>::new(), "mounts left");
    // Namespaces go away with their last process; give the kernel a moment.
    let mut left = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        left = netns_left(seen);
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        left,
        Vec::<String>::new(),
        "network namespaces of copies left"
    );
}

#[test]
fn serve_redis_twenty_clients_pool_two_then_idle_reap_and_sigterm() {
    let sx = db_setup!(redis);
    let tag = prewarmed_redis(&sx);
    let mut srv = serve_redis(&sx, &tag, &["--pool", "2", "--idle", "2s"]);
    srv.wait_log("two ready copies", Duration::from_secs(60), |s| {
        s.events("restored").len() >= 2
    });
    let mut seen = NetnsSeen::default();
    seen.note(&srv);

    let nonce = unique_id("v");
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|i| {
                let (srv, nonce) = (&srv, &nonce);
                s.spawn(move || -> Result<(), String> {
                    let mut r = Resp::at(srv.listen)?;
                    let (k, v) = (format!("client:{i}"), format!("value-{i}-{nonce}"));
                    let pong = r.text(&["PING"])?;
                    if pong != "PONG" {
                        return Err(format!("client {i}: PING answered {pong:?}"));
                    }
                    let ok = r.text(&["SET", &k, &v])?;
                    if ok != "OK" {
                        return Err(format!("client {i}: SET answered {ok:?}"));
                    }
                    let got = r.text(&["GET", &k])?;
                    if got != v {
                        return Err(format!("client {i}: GET {k} = {got:?}, wanted {v:?}"));
                    }
                    // The copy is a restored Redis with the warmed dataset.
                    let d = r.text(&["GET", "mem:0"])?;
                    if !d.starts_with("value:0") {
                        return Err(format!("client {i}: GET mem:0 = {d:?}"));
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 20 clients failed: {failed:#?}; serve log:\n{}",
        failed.len(),
        srv.log()
    );
    seen.note(&srv);
    let used = srv.copies_in("connection");
    assert!(!used.is_empty(), "no `connection` events:\n{}", srv.log());
    assert!(
        srv.events("connection").len() >= 20,
        "fewer than 20 connections logged:\n{}",
        srv.log()
    );
    assert!(
        srv.events("connection-dropped").is_empty(),
        "connections dropped:\n{}",
        srv.log()
    );

    // After --idle without connections, the used copies are discarded ...
    srv.wait_log(
        "idle copies to be discarded",
        Duration::from_secs(30),
        |s| used.is_subset(&s.copies_in("discarded")),
    );
    let left = listed(&sx);
    assert!(
        used.is_disjoint(&left),
        "discarded copies still listed: {used:?} in {left:?}"
    );
    for id in &used {
        assert!(
            cgroups_named(id).is_empty(),
            "cgroups of discarded {id} left"
        );
        assert!(
            !sx.env.root.join(".copies").join(id).exists(),
            "private filesystem of discarded {id} left"
        );
    }
    // ... and the next client gets a fresh copy from the snapshot (none of the
    // discarded copies' keys).
    let mut r = srv.client();
    assert_eq!(r.text(&["PING"]).as_deref(), Ok("PONG"));
    assert_eq!(r.cmd(&["GET", "client:0"]), Ok(Reply::Bulk(None)));
    assert_eq!(
        r.int(&["DBSIZE"]),
        Ok(REDIS_RDB_KEYS + REDIS_WARMUP_KEYS),
        "a copy after the reap holds keys of discarded copies"
    );
    drop(r);
    seen.note(&srv);
    stop_cleanly(&sx, &mut srv, &seen);
}

#[test]
fn serve_redis_persist_keeps_a_counter_across_idle_cycles() {
    let sx = db_setup!(redis);
    let tag = prewarmed_redis(&sx);
    let mut srv = serve_redis(
        &sx,
        &tag,
        &["--pool", "1", "--idle", "1s", "--persist", "redis:live"],
    );
    srv.wait_log("a ready copy", Duration::from_secs(60), |s| {
        !s.events("restored").is_empty()
    });
    let mut seen = NetnsSeen::default();
    const CYCLES: i64 = 3;
    for cycle in 1..=CYCLES {
        {
            let mut r = srv.client();
            assert_eq!(
                r.int(&["INCR", "visits"]),
                Ok(cycle),
                "cycle {cycle}: the counter did not carry over; serve log:\n{}",
                srv.log()
            );
            let mark = format!("cycle-{cycle}");
            assert_eq!(r.text(&["SET", "last", &mark]).as_deref(), Ok("OK"));
            assert_eq!(r.text(&["GET", "last"]), Ok(mark));
            assert_eq!(
                r.int(&["DBSIZE"]),
                Ok(REDIS_RDB_KEYS + REDIS_WARMUP_KEYS + 2),
                "cycle {cycle}"
            );
        }
        seen.note(&srv);
        // The copy goes idle and is checkpointed back into the store.
        srv.wait_log(
            &format!("persist number {cycle}"),
            Duration::from_secs(60),
            |s| s.events("persisted").len() >= cycle as usize,
        );
        assert!(
            srv.events("persist-failed").is_empty(),
            "a persist failed:\n{}",
            srv.log()
        );
        let e = srv.events("persisted");
        assert_eq!(e[cycle as usize - 1]["tag"], "redis:live", "{e:?}");
    }
    // The persisted snapshot, restored directly, holds the last state.
    let (g, pid) = restore(&sx, "redis:live", "db-redis-live");
    let mut r = redis_in(pid);
    assert_eq!(r.text(&["GET", "visits"]).as_deref(), Ok("3"));
    assert_eq!(r.text(&["GET", "last"]).as_deref(), Ok("cycle-3"));
    drop(r);
    drop(g);
    // And so does the next copy serve hands out. A client arriving at any moment
    // around an idle copy's persist (before it, while the copy is being
    // checkpointed, right after) sees the latest counter.
    let mut want = CYCLES;
    for k in 0..5u64 {
        want += 1;
        {
            let mut r = srv.client();
            assert_eq!(
                r.int(&["INCR", "visits"]),
                Ok(want),
                "a client {} ms after the idle period saw another counter; serve log:\n{}",
                k * 150,
                srv.log()
            );
        }
        std::thread::sleep(Duration::from_millis(1000 + k * 150));
    }
    seen.note(&srv);
    assert!(
        entry_with_tag(&sx.ls(), "redis:live")["container"]
            .as_str()
            .is_some_and(|c| c.starts_with("serve-")),
        "redis:live was not checkpointed from a serve copy"
    );
    stop_cleanly(&sx, &mut srv, &seen);
}
