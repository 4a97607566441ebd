//! `stasis serve`: restore on request. Holds a listening socket; each connection
//! is relayed to port P inside the network namespace of a restored copy of a
//! snapshot (taken from a pool of ready copies, or restored on demand). Copies that
//! served connections and then stayed idle are discarded (or checkpointed back
//! into the store with `--persist`); the pool is refilled in the background.
//! One log line per event; counters in a stats file (`serve --status`).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::snapshot::{
    checkpoint_to_store, new_generation, prepare, restore_prepared, CopyOptions, Identity,
    Prepared, TaggedCheckpoint,
};
use super::{Result, WorkflowError};
use crate::runtime::checkpoint::{CheckpointOptions, RestoreOptions};
use crate::runtime::{netns, Runtime, Status};
use crate::store::{SnapshotId, Store};

/// How long a new connection waits for copies being persisted.
const PERSIST_WAIT: Duration = Duration::from_secs(120);

pub struct ServeOptions {
    pub from: String,
    pub listen: SocketAddr,
    pub port: u16,
    pub pool: usize,
    pub idle: Duration,
    pub max: usize,
    pub persist: Option<String>,
    pub fallback_cold: bool,
    /// Restore copies with lazy pages (stasis runs the lazy-pages daemon).
    pub lazy_pages: bool,
    /// Run inside each pool copy (`stasis exec`) before it joins the pool.
    pub warmup: Option<Vec<String>>,
    pub bundle: Option<PathBuf>,
    pub stats_file: PathBuf,
    pub json_log: bool,
    pub self_exe: PathBuf,
    pub global_args: Vec<String>,
}

struct Copy {
    id: String,
    pid: i32,
    /// The snapshot it was restored from (None: started cold).
    snapshot: Option<SnapshotId>,
    used: bool,
    active: usize,
    last_active: Instant,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    restores: AtomicU64,
    restore_failures: AtomicU64,
    pool_hits: AtomicU64,
    pool_misses: AtomicU64,
    cold_starts: AtomicU64,
    copies_died: AtomicU64,
    discarded: AtomicU64,
    persisted: AtomicU64,
    relay_errors: AtomicU64,
}

struct Shared {
    rt: Runtime,
    store: Store,
    o: ServeOptions,
    /// The snapshot materialised once; restores read it.
    prepared: Mutex<Arc<Prepared>>,
    /// Bundle for cold starts (and restores of snapshots without a filesystem).
    bundle: Option<PathBuf>,
    generation: String,
    copies: Mutex<Vec<Copy>>,
    changed: Condvar,
    counters: Counters,
    ttfb_ms: Mutex<VecDeque<f64>>,
    next_copy: AtomicU64,
    shutdown: AtomicBool,
    in_flight: AtomicU64,
    /// Idle copies being checkpointed back (`--persist`): new connections wait
    /// for them, or they would get a copy of the state before the persist.
    persisting: AtomicU64,
}

impl Shared {
    fn log(&self, event: &str, fields: serde_json::Value) {
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let line = if self.o.json_log {
            let mut v = json!({"time": time, "event": event});
            if let (Some(m), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
                m.extend(f);
            }
            v.to_string()
        } else {
            let mut s = format!("{time} serve: {event}");
            if let serde_json::Value::Object(f) = fields {
                for (k, v) in f {
                    s.push_str(&format!(
                        " {k}={}",
                        v.as_str().map(str::to_string).unwrap_or(v.to_string())
                    ));
                }
            }
            s
        };
        // One write per line, so a reader of the log never sees half a line.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
    }

    fn write_stats(&self) {
        let c = &self.counters;
        let (p50, p90, p99, n) = {
            let q = self
                .ttfb_ms
                .lock()
                .map(|q| q.iter().copied().collect::<Vec<f64>>())
                .unwrap_or_default();
            let mut v = q;
            v.sort_by(|a, b| a.total_cmp(b));
            let pct = |p: f64| -> f64 {
                if v.is_empty() {
                    0.0
                } else {
                    v[((v.len() - 1) as f64 * p).round() as usize]
                }
            };
            (pct(0.5), pct(0.9), pct(0.99), v.len())
        };
        let (copies, ready) = self
            .copies
            .lock()
            .map(|c| (c.len(), c.iter().filter(|x| !x.used).count()))
            .unwrap_or((0, 0));
        let v = json!({
            "from": self.o.from,
            "listen": self.o.listen.to_string(),
            "port": self.o.port,
            "pid": std::process::id(),
            "updated": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "copies": copies,
            "ready_copies": ready,
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "connections": c.connections.load(Ordering::Relaxed),
            "restores": c.restores.load(Ordering::Relaxed),
            "restore_failures": c.restore_failures.load(Ordering::Relaxed),
            "pool_hits": c.pool_hits.load(Ordering::Relaxed),
            "pool_misses": c.pool_misses.load(Ordering::Relaxed),
            "cold_starts": c.cold_starts.load(Ordering::Relaxed),
            "copies_died": c.copies_died.load(Ordering::Relaxed),
            "discarded": c.discarded.load(Ordering::Relaxed),
            "persisted": c.persisted.load(Ordering::Relaxed),
            "relay_errors": c.relay_errors.load(Ordering::Relaxed),
            "ttfb_ms": {"samples": n, "p50": p50, "p90": p90, "p99": p99},
        });
        let _ = crate::runtime::state::write_atomic(&self.o.stats_file, v.to_string().as_bytes());
    }

    fn new_id(&self) -> (String, usize) {
        let n = self.next_copy.fetch_add(1, Ordering::Relaxed);
        (
            format!("serve-{}-{}-{n}", self.o.port, std::process::id()),
            n as usize,
        )
    }

    /// Restores one copy; on failure with --fallback-cold, starts the bundle cold.
    fn spawn_copy(&self) -> std::result::Result<Copy, String> {
        let (id, index) = self.new_id();
        let t0 = Instant::now();
        let p = self
            .prepared
            .lock()
            .map(|g| g.clone())
            .map_err(|_| "snapshot lock poisoned".to_string())?;
        let ident = Identity {
            generation: self.generation.clone(),
            index,
            snapshot: p.sid.short(),
        };
        let bundle = if p.manifest.is_some() {
            None
        } else {
            self.bundle.as_deref()
        };
        let r = restore_prepared(
            &self.rt,
            &self.store,
            &p,
            &RestoreOptions {
                id: id.clone(),
                detach: true,
                null_stdio: true,
                lazy_daemon: true,
                flags: crate::runtime::checkpoint::CriuFlags {
                    lazy_pages: self.o.lazy_pages,
                    ..Default::default()
                },
                ..Default::default()
            },
            bundle,
            &ident,
            &CopyOptions::default(),
        );
        match r {
            Ok(_) => {
                self.counters.restores.fetch_add(1, Ordering::Relaxed);
                let pid = self
                    .rt
                    .load(&id)
                    .map(|s| s.pid)
                    .map_err(|e| e.to_string())?;
                self.log(
                    "restored",
                    json!({"copy": id, "pid": pid, "ms": t0.elapsed().as_millis() as u64}),
                );
                Ok(Copy {
                    id,
                    pid,
                    snapshot: Some(p.sid),
                    used: false,
                    active: 0,
                    last_active: Instant::now(),
                })
            }
            Err(e) => {
                self.counters
                    .restore_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.log(
                    "restore-failed",
                    json!({"copy": id, "error": e.to_string()}),
                );
                if !self.o.fallback_cold {
                    return Err(e.to_string());
                }
                self.cold_start(&id)
            }
        }
    }

    fn cold_start(&self, id: &str) -> std::result::Result<Copy, String> {
        let t0 = Instant::now();
        let bundle = self
            .bundle
            .clone()
            .ok_or_else(|| "cold start needs a bundle: pass --bundle".to_string())?;
        let st = Command::new(&self.o.self_exe)
            .args(&self.o.global_args)
            .args(["run", "-d", "-b"])
            .arg(&bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cold start: {e}"))?;
        if !st.success() {
            return Err(format!("cold start of {} failed ({st})", bundle.display()));
        }
        let pid = self.rt.load(id).map(|s| s.pid).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let target = SocketAddr::from(([127, 0, 0, 1], self.o.port));
            if netns::connect_in(pid, target, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.rt.delete(id, true);
                return Err("cold start: port never opened".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.counters.cold_starts.fetch_add(1, Ordering::Relaxed);
        self.log(
            "cold-started",
            json!({"copy": id, "pid": pid, "ms": t0.elapsed().as_millis() as u64}),
        );
        Ok(Copy {
            id: id.to_string(),
            pid,
            snapshot: None,
            used: false,
            active: 0,
            last_active: Instant::now(),
        })
    }

    /// Picks the copy for a new connection: the live used copy with the fewest
    /// connections, else a ready pool copy, else a new restore.
    fn acquire(&self) -> std::result::Result<(String, i32), String> {
        {
            let mut copies = self.copies.lock().map_err(|_| "poisoned".to_string())?;
            // With --persist, a copy that is being checkpointed back holds the
            // latest state: wait until later copies can restore from it.
            let deadline = Instant::now() + PERSIST_WAIT;
            while self.persisting.load(Ordering::SeqCst) > 0
                && Instant::now() < deadline
                && !self.shutdown.load(Ordering::Relaxed)
            {
                copies = self
                    .changed
                    .wait_timeout(copies, Duration::from_millis(100))
                    .map_err(|_| "poisoned".to_string())?
                    .0;
            }
            // Copies of the current snapshot (after a --persist, older ones hold
            // stale state), or started cold.
            let current = self.prepared.lock().map(|p| p.sid).ok();
            let current_ok = |c: &Copy| c.snapshot.is_none() || c.snapshot == current;
            let used = copies
                .iter()
                .enumerate()
                .filter(|(_, c)| c.used && current_ok(c))
                .min_by_key(|(_, c)| c.active)
                .map(|(i, _)| i);
            let pick = used.or_else(|| {
                let i = copies.iter().position(|c| !c.used && current_ok(c))?;
                self.counters.pool_hits.fetch_add(1, Ordering::Relaxed);
                Some(i)
            });
            if let Some(c) = pick.and_then(|i| copies.get_mut(i)) {
                c.used = true;
                c.active += 1;
                c.last_active = Instant::now();
                let r = (c.id.clone(), c.pid);
                self.changed.notify_all();
                return Ok(r);
            }
        }
        self.counters.pool_misses.fetch_add(1, Ordering::Relaxed);
        let mut c = self.spawn_copy()?;
        c.used = true;
        c.active = 1;
        let r = (c.id.clone(), c.pid);
        if let Ok(mut copies) = self.copies.lock() {
            copies.push(c);
        }
        self.changed.notify_all();
        Ok(r)
    }

    fn release(&self, id: &str) {
        if let Ok(mut copies) = self.copies.lock() {
            if let Some(c) = copies.iter_mut().find(|c| c.id == id) {
                c.active = c.active.saturating_sub(1);
                c.last_active = Instant::now();
            }
        }
        self.changed.notify_all();
    }

    fn forget(&self, id: &str, why: &str) {
        if let Ok(mut copies) = self.copies.lock() {
            copies.retain(|c| c.id != id);
        }
        let _ = self.rt.delete(id, true);
        self.log("copy-removed", json!({"copy": id, "reason": why}));
        self.changed.notify_all();
    }

    fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let accepted = Instant::now();
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let target = SocketAddr::from(([127, 0, 0, 1], self.o.port));
        let mut attempt = 0;
        let backend = loop {
            attempt += 1;
            let (id, pid) = match self.acquire() {
                Ok(x) => x,
                Err(e) => {
                    self.log(
                        "connection-dropped",
                        json!({"peer": peer.to_string(), "error": e}),
                    );
                    self.in_flight.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            };
            match netns::connect_in(pid, target, Duration::from_secs(5)) {
                Ok(s) => break Some((id, s)),
                Err(e) => {
                    let alive = self
                        .rt
                        .load(&id)
                        .map(|s| s.live_status() != Status::Stopped)
                        .unwrap_or(false);
                    self.counters
                        .copies_died
                        .fetch_add(u64::from(!alive), Ordering::Relaxed);
                    self.forget(&id, &format!("connect to port {} failed: {e}", self.o.port));
                    if attempt >= 3 {
                        break None;
                    }
                }
            }
        };
        let Some((id, backend)) = backend else {
            self.log(
                "connection-dropped",
                json!({"peer": peer.to_string(), "error": "no copy could take it"}),
            );
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.write_stats();
            return;
        };
        self.log("connection", json!({"peer": peer.to_string(), "copy": id}));
        if let Err(e) = self.relay(client, backend, accepted) {
            self.counters.relay_errors.fetch_add(1, Ordering::Relaxed);
            self.log("relay-error", json!({"copy": id, "error": e.to_string()}));
        }
        self.release(&id);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.write_stats();
    }

    fn relay(
        &self,
        client: TcpStream,
        backend: TcpStream,
        accepted: Instant,
    ) -> std::io::Result<()> {
        // A relay passes on whatever it reads at once: Nagle's algorithm would
        // hold a second small write (PostgreSQL answers a login in several) until
        // the peer's delayed ACK.
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);
        let mut c_read = client.try_clone()?;
        let mut b_write = backend.try_clone()?;
        let up = std::thread::spawn(move || {
            let r = std::io::copy(&mut c_read, &mut b_write);
            let _ = b_write.shutdown(Shutdown::Write);
            r
        });
        let mut b_read = backend;
        let mut c_write = client;
        let mut buf = vec![0u8; 64 * 1024];
        let mut first = true;
        loop {
            let n = match b_read.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(e),
            };
            if first {
                first = false;
                if let Ok(mut q) = self.ttfb_ms.lock() {
                    if q.len() == 10_000 {
                        q.pop_front();
                    }
                    q.push_back(accepted.elapsed().as_secs_f64() * 1000.0);
                }
            }
            if c_write.write_all(&buf[..n]).is_err() {
                // The client went away midway: stop relaying.
                let _ = b_read.shutdown(Shutdown::Both);
                break;
            }
        }
        let _ = c_write.shutdown(Shutdown::Write);
        let _ = up.join();
        Ok(())
    }

    /// Keeps `pool` ready copies, reaps idle used copies, notices dead ones.
    /// `--warmup`: runs the command inside a new pool copy (at most 60 s); a copy
    /// whose warm-up fails is removed, not offered.
    fn warm_up(&self, c: Copy) -> std::result::Result<Copy, String> {
        let Some(cmd) = &self.o.warmup else {
            return Ok(c);
        };
        let t0 = Instant::now();
        let res = (|| {
            let mut child = Command::new(&self.o.self_exe)
                .args(&self.o.global_args)
                .arg("exec")
                .arg(&c.id)
                .args(cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("run warm-up: {e}"))?;
            loop {
                match child.try_wait() {
                    Ok(Some(st)) if st.success() => return Ok(()),
                    Ok(Some(st)) => {
                        return Err(format!("warm-up {:?} failed ({st})", cmd.join(" ")))
                    }
                    Ok(None) if self.shutdown.load(Ordering::Relaxed) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err("serve is stopping".to_string());
                    }
                    Ok(None) if t0.elapsed() > Duration::from_secs(60) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "warm-up {:?} still running after 60 s",
                            cmd.join(" ")
                        ));
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Err(e) => return Err(format!("wait for warm-up: {e}")),
                }
            }
        })();
        match res {
            Ok(()) => {
                self.log(
                    "warmed-up",
                    json!({"copy": c.id, "ms": t0.elapsed().as_millis() as u64}),
                );
                Ok(c)
            }
            Err(e) => {
                let _ = self.rt.delete(&c.id, true);
                Err(format!("copy {}: {e}; it was removed", c.id))
            }
        }
    }

    fn maintain(&self) {
        while !self.shutdown.load(Ordering::Relaxed) {
            let mut idle_ids = Vec::new();
            let mut dead = Vec::new();
            let mut stale = Vec::new();
            let current = self.prepared.lock().map(|p| p.sid).ok();
            // Ready copies restored from a snapshot that a --persist superseded
            // while they were being restored hold old state: replace them.
            let is_stale = |x: &Copy| !x.used && x.snapshot.is_some() && x.snapshot != current;
            let (ready, total) = match self.copies.lock() {
                Ok(c) => {
                    for x in c.iter() {
                        if !crate::runtime::state::process_alive(x.pid, 0) {
                            dead.push(x.id.clone());
                        } else if is_stale(x) {
                            stale.push(x.id.clone());
                        } else if x.used && x.active == 0 && x.last_active.elapsed() >= self.o.idle
                        {
                            idle_ids.push(x.id.clone());
                        }
                    }
                    (
                        c.iter().filter(|x| !x.used && !is_stale(x)).count(),
                        c.len(),
                    )
                }
                Err(_) => return,
            };
            for id in dead {
                self.counters.copies_died.fetch_add(1, Ordering::Relaxed);
                self.forget(&id, "its process died");
            }
            for id in stale {
                self.forget(&id, "restored from a superseded snapshot");
            }
            for id in idle_ids {
                // Still idle? A connection may have taken it since the scan. The
                // copy leaves the list and (with --persist) counts as persisting
                // under one lock, so no connection sees neither.
                let still_idle = match self.copies.lock() {
                    Ok(mut c) => {
                        let idle = c.iter().any(|x| {
                            x.id == id && x.active == 0 && x.last_active.elapsed() >= self.o.idle
                        });
                        if idle {
                            c.retain(|x| x.id != id);
                            if self.o.persist.is_some() {
                                self.persisting.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        idle
                    }
                    Err(_) => false,
                };
                if still_idle {
                    self.retire(&id);
                }
            }
            if ready < self.o.pool && total < self.o.max && !self.shutdown.load(Ordering::Relaxed) {
                match self.spawn_copy().and_then(|c| self.warm_up(c)) {
                    Ok(c) => {
                        if let Ok(mut copies) = self.copies.lock() {
                            copies.push(c);
                        }
                        self.write_stats();
                        continue;
                    }
                    Err(e) => self.log("refill-failed", json!({"error": e})),
                }
            }
            self.write_stats();
            if let Ok(g) = self.copies.lock() {
                let _ = self.changed.wait_timeout(g, Duration::from_millis(200));
            }
        }
    }

    /// An idle copy leaves: checkpointed into the store (`--persist TAG`, and later
    /// copies restore from it) or discarded.
    fn retire(&self, id: &str) {
        if let Some(tag) = &self.o.persist {
            let r = checkpoint_to_store(
                &self.rt,
                &self.store,
                &TaggedCheckpoint {
                    checkpoint: CheckpointOptions {
                        id: id.to_string(),
                        ..Default::default()
                    },
                    tags: vec![tag.clone()],
                    compress_level: 3,
                    progress: false,
                    ignore_rootfs: false,
                    ignore_volumes: false,
                    exclude: Vec::new(),
                    // One id per copy: never checkpointed again.
                    save_stat_cache: false,
                },
            );
            match r {
                Ok(res) => {
                    // Later copies restore from the new snapshot before anyone is
                    // told it exists (and before waiting connections go on).
                    let reload = self.switch_image(tag);
                    self.counters.persisted.fetch_add(1, Ordering::Relaxed);
                    self.log(
                        "persisted",
                        json!({"copy": id, "tag": tag, "snapshot": res.report.id.short()}),
                    );
                    if let Err(e) = reload {
                        self.log("persist-reload-failed", json!({"error": e}));
                    }
                }
                Err(e) => self.log(
                    "persist-failed",
                    json!({"copy": id, "error": e.to_string()}),
                ),
            }
            let _ = self.rt.delete(id, true);
            {
                // Under the lock, so a connection cannot miss the wake-up.
                let _g = self.copies.lock();
                self.persisting.fetch_sub(1, Ordering::SeqCst);
            }
            self.changed.notify_all();
        } else {
            let _ = self.rt.delete(id, true);
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            self.log("discarded", json!({"copy": id, "reason": "idle"}));
        }
    }

    /// Materialises `name` and makes later restores use it.
    fn switch_image(&self, name: &str) -> std::result::Result<(), String> {
        let p = prepare(&self.rt, &self.store, name, false, false).map_err(|e| e.to_string())?;
        let sid = p.sid;
        if let Ok(mut g) = self.prepared.lock() {
            *g = Arc::new(p);
        }
        // Ready copies of the previous snapshot would serve stale state: drop them;
        // the pool refills from the new one.
        let stale: Vec<String> = match self.copies.lock() {
            Ok(mut c) => {
                let ids = c
                    .iter()
                    .filter(|x| !x.used && x.snapshot.is_some_and(|s| s != sid))
                    .map(|x| x.id.clone())
                    .collect::<Vec<_>>();
                c.retain(|x| !ids.contains(&x.id));
                ids
            }
            Err(_) => Vec::new(),
        };
        for id in stale {
            let _ = self.rt.delete(&id, true);
            self.log(
                "copy-removed",
                json!({"copy": id, "reason": "restored from a superseded snapshot"}),
            );
        }
        self.changed.notify_all();
        Ok(())
    }
}

/// Runs the server until SIGTERM/SIGINT; then finishes in-flight connections and
/// removes every copy.
pub fn serve(rt: Runtime, store: Store, o: ServeOptions) -> Result<()> {
    // Block the stop signals in every thread; one thread waits for them.
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.add(nix::sys::signal::Signal::SIGINT);
    stop.thread_block()
        .map_err(|source| WorkflowError::Signals {
            op: "serve: block SIGTERM and SIGINT so one thread can wait for them",
            source,
        })?;
    if let Some(t) = &o.persist {
        crate::store::normalize_tag(t)?;
    }
    let p = prepare(&rt, &store, &o.from, false, false)?;
    for w in &p.warnings {
        eprintln!("stasis: warning: {}", crate::store::printable(w));
    }
    let sid = p.sid;
    let bundle = o.bundle.clone().or_else(|| {
        p.meta
            .bundle
            .clone()
            .filter(|b| b.join("config.json").is_file())
    });
    if p.manifest.is_none() && bundle.is_none() {
        return Err(WorkflowError::NoBundle {
            snapshot: sid.short(),
        });
    }
    let listener = TcpListener::bind(o.listen).map_err(|source| WorkflowError::Net {
        op: "listen on",
        addr: o.listen.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| WorkflowError::Net {
            op: "make non-blocking the listener on",
            addr: o.listen.to_string(),
            source,
        })?;
    let shared = Arc::new(Shared {
        rt,
        store,
        prepared: Mutex::new(Arc::new(p)),
        bundle,
        generation: new_generation()?,
        copies: Mutex::new(Vec::new()),
        changed: Condvar::new(),
        counters: Counters::default(),
        ttfb_ms: Mutex::new(VecDeque::new()),
        next_copy: AtomicU64::new(0),
        shutdown: AtomicBool::new(false),
        in_flight: AtomicU64::new(0),
        persisting: AtomicU64::new(0),
        o,
    });
    shared.log(
        "listening",
        json!({"listen": shared.o.listen.to_string(), "snapshot": sid.short(), "port": shared.o.port, "pool": shared.o.pool}),
    );
    shared.write_stats();
    {
        let s = shared.clone();
        std::thread::spawn(move || {
            if let Ok(sig) = stop.wait() {
                s.log("stopping", json!({"signal": format!("{sig:?}")}));
            }
            s.shutdown.store(true, Ordering::Relaxed);
            s.changed.notify_all();
        });
    }
    let maint = {
        let s = shared.clone();
        std::thread::spawn(move || s.maintain())
    };
    let mut handlers = Vec::new();
    while !shared.shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, peer)) => {
                let _ = client.set_nonblocking(false);
                let s = shared.clone();
                handlers.push(std::thread::spawn(move || s.handle(client, peer)));
                handlers.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Sleep in poll(2) until a client connects (not in fixed steps:
                // that would add up to a step to every connection's time to
                // first byte); wake every 100 ms to see a SIGTERM.
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(100u16));
            }
            Err(e) => shared.log("accept-error", json!({"error": e.to_string()})),
        }
    }
    drop(listener);
    for h in handlers {
        let _ = h.join();
    }
    let _ = maint.join();
    let ids: Vec<String> = shared
        .copies
        .lock()
        .map(|c| c.iter().map(|x| x.id.clone()).collect())
        .unwrap_or_default();
    for id in ids {
        let _ = shared.rt.delete(&id, true);
        shared.log("copy-removed", json!({"copy": id, "reason": "shutdown"}));
    }
    if let Ok(mut c) = shared.copies.lock() {
        c.clear();
    }
    shared.write_stats();
    shared.log("stopped", json!({}));
    Ok(())
}

/// Default stats file for a listen address: a dot name in `--root`, where no
/// container id can name it (ids never start with '.').
pub fn default_stats_file(root: &Path, listen: &SocketAddr) -> PathBuf {
    root.join(format!(".serve-{}-{}.json", listen.ip(), listen.port()))
}
