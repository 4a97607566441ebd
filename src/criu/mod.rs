//! Our client for CRIU's RPC interface (`criu swrk`). It owns spawning CRIU, the
//! request/notify/response protocol over a SOCK_SEQPACKET socketpair, timeouts,
//! version and feature checks, and turning failures into errors that quote the
//! `Error` lines of CRIU's log. It imports nothing else of ours.
//!
//! rust-criu provides only the generated protobuf types (`rpc`); its `Criu` client
//! is not used: it leaks a blocking `criu swrk` when a request fails to serialise,
//! drops the restore response, and its notify callback cannot carry state.

mod creds;
mod hints;

pub use creds::{image_capabilities, CAP_NAMES};

use std::fs;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, send, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use protobuf::{EnumOrUnknown, Message};

pub use rpc::Criu_opts as Opts;
pub use rust_criu::rust_criu_protobuf::rpc;

/// The oldest CRIU that works on current kernels (4.1 cannot dump INET sockets on
/// kernels >= 6.16; 3.17 fails to start at all).
pub const MIN_VERSION: (i32, i32) = (4, 2);

/// A line CRIU prints as `Error` on every run in sandboxes without CAP_SYS_RESOURCE;
/// it is harmless and never quoted.
const HARMLESS: &str = "Can't setup RLIMIT_NOFILE";

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run {bin}: {source} (install CRIU >= 4.2, e.g. with scripts/setup, or pass --criu PATH)")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("criu {op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("criu {op}: protocol error: {msg}")]
    Protocol { op: &'static str, msg: String },
    #[error("criu {op} failed{errmsg}{quoted} (full log: {log})")]
    Failed {
        op: &'static str,
        errmsg: String,
        quoted: String,
        log: String,
    },
    #[error("criu {op} died ({how}) without answering{quoted} (full log: {log})")]
    Died {
        op: &'static str,
        how: String,
        quoted: String,
        log: String,
    },
    #[error("criu {op} timed out after {after:?} and was killed (full log: {log})")]
    Timeout {
        op: &'static str,
        after: Duration,
        log: String,
    },
    #[error("CRIU {found} is too old: stasis needs >= {}.{} on this kernel (scripts/setup builds 4.2.1)", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { found: String },
    #[error("this kernel or CRIU lacks {feature}: {why}")]
    MissingFeature {
        feature: &'static str,
        why: &'static str,
    },
    #[error("CRIU image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
}

pub type Result<T, E = CriuError> = std::result::Result<T, E>;

/// A notification from CRIU during dump or restore (`--action-script` hooks).
pub struct Notify {
    pub script: String,
    pub pid: i32,
    /// The pty master for `orphan-pts-master`, passed with SCM_RIGHTS.
    pub fd: Option<OwnedFd>,
}

/// CRIU's version as reported by the VERSION request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: i32,
    pub minor: i32,
    pub sublevel: i32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// Where CRIU writes its log and which descriptors it inherits.
pub struct Call<'a> {
    /// Directory CRIU writes its log (and stats files) into: `work_dir_fd`.
    pub work_dir: &'a Path,
    /// Images directory: `images_dir_fd`.
    pub images_dir: &'a Path,
    pub log_file: &'a str,
    /// Descriptors CRIU must inherit at the same numbers (inherit_fd, status_fd).
    pub keep_fds: &'a [RawFd],
    /// Pid of the CRIU process, reported as soon as it is spawned (so callers can
    /// move it into a cgroup before restore).
    pub on_spawn: Option<&'a mut dyn FnMut(i32) -> Result<(), String>>,
}

#[derive(Debug, Clone)]
pub struct Criu {
    bin: PathBuf,
    timeout: Duration,
}

impl Criu {
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            timeout: Duration::from_secs(600),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Asks CRIU for its version.
    pub fn version(&self) -> Result<Version> {
        let mut req = rpc::Criu_req::new();
        req.type_ = Some(EnumOrUnknown::new(rpc::Criu_req_type::VERSION));
        let resp = self.exchange("version", req, &[], None, &mut |_| Ok(()), None)?;
        let v = resp
            .version
            .into_option()
            .ok_or_else(|| CriuError::Protocol {
                op: "version",
                msg: "response has no version".into(),
            })?;
        Ok(Version {
            major: v.major_number.unwrap_or(0),
            minor: v.minor_number.unwrap_or(0),
            sublevel: v.sublevel.unwrap_or(0),
        })
    }

    /// Fails with `TooOld` unless CRIU is at least `MIN_VERSION`.
    pub fn require_version(&self) -> Result<Version> {
        let v = self.version()?;
        if (v.major, v.minor) < MIN_VERSION {
            return Err(CriuError::TooOld {
                found: v.to_string(),
            });
        }
        Ok(v)
    }

    /// The binary's absolute path (a bare name is looked up in PATH).
    pub fn resolved_bin(&self) -> Option<PathBuf> {
        if self.bin.components().count() > 1 {
            return Some(self.bin.clone());
        }
        let path = std::env::var_os("PATH").unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        });
        std::env::split_paths(&path)
            .map(|d| d.join(&self.bin))
            .find(|p| p.is_file())
    }

    /// `require_version`, remembered in `cache` (keyed by the binary's path,
    /// inode, size and mtime) so that each checkpoint and restore does not spawn
    /// CRIU once more just to ask its version.
    pub fn require_version_cached(&self, cache: &Path) -> Result<Version> {
        use std::os::unix::fs::MetadataExt;
        let key = self.resolved_bin().and_then(|p| {
            let m = fs::metadata(&p).ok()?;
            Some(format!(
                "{}\t{}\t{}\t{}",
                p.display(),
                m.ino(),
                m.len(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000
            ))
        });
        if let (Some(key), Ok(text)) = (&key, fs::read_to_string(cache)) {
            if let Some((k, v)) = text.rsplit_once('\t') {
                let parts: Vec<i32> = v.trim().split('.').filter_map(|x| x.parse().ok()).collect();
                if k == key && parts.len() == 3 && (parts[0], parts[1]) >= MIN_VERSION {
                    return Ok(Version {
                        major: parts[0],
                        minor: parts[1],
                        sublevel: parts[2],
                    });
                }
            }
        }
        let v = self.require_version()?;
        if let Some(key) = key {
            let tmp = cache.with_extension(format!("tmp.{}", std::process::id()));
            if fs::write(&tmp, format!("{key}\t{v}")).is_ok() {
                let _ = fs::rename(&tmp, cache);
            }
        }
        Ok(v)
    }

    /// FEATURE_CHECK for memory tracking (soft-dirty, needed by pre-dump) and
    /// lazy pages (userfaultfd). Returns (mem_track, lazy_pages).
    pub fn features(&self) -> Result<(bool, bool)> {
        let mut req = rpc::Criu_req::new();
        req.type_ = Some(EnumOrUnknown::new(rpc::Criu_req_type::FEATURE_CHECK));
        let mut f = rpc::Criu_features::new();
        f.mem_track = Some(true);
        f.lazy_pages = Some(true);
        req.features = Some(f).into();
        let resp = self.exchange("feature check", req, &[], None, &mut |_| Ok(()), None)?;
        let f = resp.features.into_option().unwrap_or_default();
        Ok((f.mem_track.unwrap_or(false), f.lazy_pages.unwrap_or(false)))
    }

    pub fn dump(
        &self,
        opts: Opts,
        call: Call<'_>,
        notify: &mut dyn FnMut(Notify) -> Result<(), String>,
    ) -> Result<rpc::Criu_resp> {
        self.run("dump", rpc::Criu_req_type::DUMP, opts, call, notify)
    }

    /// Pre-dump: copies memory while the tasks keep running (needs memory tracking).
    pub fn pre_dump(
        &self,
        opts: Opts,
        call: Call<'_>,
        notify: &mut dyn FnMut(Notify) -> Result<(), String>,
    ) -> Result<rpc::Criu_resp> {
        self.run("pre-dump", rpc::Criu_req_type::PRE_DUMP, opts, call, notify)
    }

    /// Restores; returns the response (its `restore.pid` is the restored init).
    pub fn restore(
        &self,
        opts: Opts,
        call: Call<'_>,
        notify: &mut dyn FnMut(Notify) -> Result<(), String>,
    ) -> Result<rpc::Criu_resp> {
        self.run("restore", rpc::Criu_req_type::RESTORE, opts, call, notify)
    }

    fn run(
        &self,
        op: &'static str,
        ty: rpc::Criu_req_type,
        mut opts: Opts,
        call: Call<'_>,
        notify: &mut dyn FnMut(Notify) -> Result<(), String>,
    ) -> Result<rpc::Criu_resp> {
        let open_dir = |p: &Path, what: &'static str| {
            fs::File::open(p).map_err(|source| CriuError::Io {
                op: what,
                source: std::io::Error::new(source.kind(), format!("{}: {source}", p.display())),
            })
        };
        let images = open_dir(call.images_dir, "open images directory")?;
        let work = open_dir(call.work_dir, "open work directory")?;
        opts.images_dir_fd = Some(images.as_raw_fd());
        opts.work_dir_fd = Some(work.as_raw_fd());
        opts.log_file = Some(call.log_file.to_string());
        if opts.log_level.is_none() {
            opts.log_level = Some(4);
        }
        let mut req = rpc::Criu_req::new();
        req.type_ = Some(EnumOrUnknown::new(ty));
        req.opts = Some(opts).into();
        let mut keep: Vec<RawFd> = vec![images.as_raw_fd(), work.as_raw_fd()];
        keep.extend_from_slice(call.keep_fds);
        let log = call.work_dir.join(call.log_file);
        let r = self.exchange(op, req, &keep, call.on_spawn, notify, Some(&log));
        drop(images);
        drop(work);
        let resp = r?;
        if resp.success != Some(true) {
            let errmsg = resp
                .cr_errmsg
                .as_deref()
                .map(|m| {
                    m.lines()
                        .filter(|l| !l.contains(HARMLESS) && !l.trim().is_empty())
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            return Err(CriuError::Failed {
                op,
                errmsg,
                quoted: quote_errors(&log),
                log: log.display().to_string(),
            });
        }
        Ok(resp)
    }

    /// Spawns `criu swrk`, sends `req`, answers notifications, returns the final
    /// response of the request's type. CRIU is always reaped before returning.
    fn exchange(
        &self,
        op: &'static str,
        req: rpc::Criu_req,
        keep_fds: &[RawFd],
        on_spawn: Option<&mut dyn FnMut(i32) -> Result<(), String>>,
        notify: &mut dyn FnMut(Notify) -> Result<(), String>,
        log: Option<&Path>,
    ) -> Result<rpc::Criu_resp> {
        let io = |op: &'static str| {
            move |e: nix::Error| CriuError::Io {
                op,
                source: std::io::Error::from(e),
            }
        };
        let bytes = req.write_to_bytes().map_err(|e| CriuError::Protocol {
            op,
            msg: format!("cannot encode request: {e}"),
        })?;
        // Our end is CLOEXEC; CRIU's end is made inheritable only in the child.
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io("create socketpair"))?;
        let mut keep: Vec<RawFd> = keep_fds.to_vec();
        keep.push(theirs.as_raw_fd());
        let mut cmd = Command::new(&self.bin);
        cmd.arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // fcntl(2), which is async-signal-safe; it touches no heap or locks.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        drop(theirs);
        let mut guard = ChildGuard(Some(child));
        let log_s = log
            .map(|l| l.display().to_string())
            .unwrap_or_else(|| "none".into());
        if let Some(cb) = on_spawn {
            let pid = guard.pid();
            cb(pid).map_err(|msg| CriuError::Protocol { op, msg })?;
        }
        send(ours.as_raw_fd(), &bytes, MsgFlags::empty()).map_err(io("send request"))?;
        let deadline = Instant::now() + self.timeout;
        let mut notify_err: Option<String> = None;
        loop {
            let (buf, fd) = match recv_with_fd(&ours, deadline) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    guard.kill();
                    return Err(CriuError::Timeout {
                        op,
                        after: self.timeout,
                        log: log_s,
                    });
                }
                Err(e) => {
                    return Err(CriuError::Io {
                        op: "receive response",
                        source: e,
                    })
                }
            };
            if buf.is_empty() {
                // EOF: CRIU exited or died without a final response.
                let how = guard.wait_status();
                return Err(CriuError::Died {
                    op,
                    how,
                    quoted: log.map(quote_errors).unwrap_or_default(),
                    log: log_s,
                });
            }
            let resp = rpc::Criu_resp::parse_from_bytes(&buf).map_err(|e| CriuError::Protocol {
                op,
                msg: format!("cannot decode response: {e}"),
            })?;
            let rty = resp.type_.map(|t| t.enum_value_or_default());
            if rty == Some(rpc::Criu_req_type::NOTIFY) {
                let n = resp.notify.clone().into_option().unwrap_or_default();
                let script = n.script.unwrap_or_default();
                let ok = if notify_err.is_some() {
                    false
                } else {
                    match notify(Notify {
                        script: script.clone(),
                        pid: n.pid.unwrap_or(0),
                        fd,
                    }) {
                        Ok(()) => true,
                        Err(m) => {
                            notify_err = Some(format!("{script}: {m}"));
                            false
                        }
                    }
                };
                let mut ack = rpc::Criu_req::new();
                ack.type_ = Some(EnumOrUnknown::new(rpc::Criu_req_type::NOTIFY));
                ack.notify_success = Some(ok);
                let ack = ack.write_to_bytes().map_err(|e| CriuError::Protocol {
                    op,
                    msg: format!("cannot encode notify ack: {e}"),
                })?;
                send(ours.as_raw_fd(), &ack, MsgFlags::empty()).map_err(io("send notify ack"))?;
                continue;
            }
            drop(ours);
            guard.wait_status();
            if let Some(m) = notify_err {
                return Err(CriuError::Failed {
                    op,
                    errmsg: format!(": hook at {m}"),
                    quoted: log.map(quote_errors).unwrap_or_default(),
                    log: log_s,
                });
            }
            return Ok(resp);
        }
    }
}

/// Kills and reaps CRIU if we return early.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn pid(&self) -> i32 {
        self.0.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn wait_status(&mut self) -> String {
        match self.0.take().map(|mut c| c.wait()) {
            Some(Ok(st)) => match (
                st.code(),
                std::os::unix::process::ExitStatusExt::signal(&st),
            ) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "unknown status".into(),
            },
            Some(Err(e)) => format!("wait failed: {e}"),
            None => "already reaped".into(),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Receives one packet (and an SCM_RIGHTS descriptor, if any) before `deadline`.
/// `Ok(None)` on timeout; an empty buffer on EOF.
fn recv_with_fd(
    sock: &OwnedFd,
    deadline: Instant,
) -> std::io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => continue,
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let n = msg.bytes;
    let mut fd = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, f) in fds.into_iter().enumerate() {
                    // SAFETY: the kernel just installed these descriptors for us;
                    // we own them and wrap each exactly once.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if i == 0 && fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
    }
    buf.truncate(n);
    Ok(Some((buf, fd)))
}

/// The `Error` lines of a CRIU log (without the harmless rlimit line), formatted
/// for an error message: `:\n  line\n  line`, or empty when there are none.
pub fn quote_errors(log: &Path) -> String {
    let text = match fs::read_to_string(log) {
        Ok(t) => t,
        Err(_) => return String::new(),
    };
    let lines = error_lines(&text);
    if lines.is_empty() {
        return String::new();
    }
    let mut s = String::from(":");
    for l in lines.iter().rev().take(12).rev() {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s.push_str(&hints::for_lines(&lines));
    s
}

pub fn error_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains("Error") && !l.contains(HARMLESS))
        .map(str::trim)
        .collect()
}

/// Parses CRIU's `stats-dump` / `stats-restore` image (protobuf `stats_entry`
/// behind a 4-byte magic pair and a 4-byte length) into (name, value) pairs.
pub fn read_stats(path: &Path) -> Option<Vec<(&'static str, u64)>> {
    // A stats image is a few hundred bytes; read a bounded prefix of whatever is there.
    let mut b = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(fs::File::open(path).ok()?, 1 << 20),
        &mut b,
    )
    .ok()?;
    // Image: u32 magic (img), u32 magic (stats), then u32 size + protobuf entry.
    if b.len() < 12 {
        return None;
    }
    let size = u32::from_le_bytes(b[8..12].try_into().ok()?) as usize;
    let body = b.get(12..12 + size)?;
    parse_stats_entry(body)
}

/// Minimal protobuf reader for `stats_entry { dump_stats dump = 1; restore_stats restore = 2; }`.
fn parse_stats_entry(b: &[u8]) -> Option<Vec<(&'static str, u64)>> {
    let (field, body) = first_len_field(b)?;
    let names: &[&'static str] = if field == 1 {
        &[
            "",
            "freezing_time",
            "frozen_time",
            "memdump_time",
            "memwrite_time",
            "pages_scanned",
            "pages_skipped_parent",
            "pages_written",
            "irmap_resolve",
            "pages_lazy",
            "page_pipes",
            "page_pipe_bufs",
            "shpages_scanned",
            "shpages_skipped_parent",
            "shpages_written",
        ]
    } else {
        &[
            "",
            "pages_compared",
            "pages_skipped_cow",
            "forking_time",
            "restore_time",
            "pages_restored",
        ]
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let (key, n) = varint(&body[i..])?;
        i += n;
        let (num, wt) = ((key >> 3) as usize, key & 7);
        if wt != 0 {
            return Some(out);
        }
        let (v, n) = varint(&body[i..])?;
        i += n;
        if let Some(name) = names.get(num).filter(|n| !n.is_empty()) {
            out.push((*name, v));
        }
    }
    Some(out)
}

fn first_len_field(b: &[u8]) -> Option<(u64, &[u8])> {
    let (key, n) = varint(b)?;
    if key & 7 != 2 {
        return None;
    }
    let (len, m) = varint(&b[n..])?;
    let start = n + m;
    // The length comes from the file: an overflowing one is a malformed image.
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    Some((key >> 3, b.get(start..end)?))
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A `criu lazy-pages` daemon serving the memory pages of one image directory
/// to a restore run with `lazy_pages` and the same work directory (they meet at
/// `WORK/lazy-pages.socket`). The restored tasks fault their pages in through
/// userfaultfd while the daemon also copies the rest in the background; it exits
/// on its own once every page is in place (or the tasks are gone).
pub struct LazyPages {
    child: Child,
    log: PathBuf,
}

impl Criu {
    /// Starts the daemon in its own session (so it outlives a `restore -d`) and
    /// waits until it listens.
    pub fn spawn_lazy_pages(&self, images: &Path, work: &Path) -> Result<LazyPages> {
        let log = work.join("lazy-pages.log");
        let sock = work.join("lazy-pages.socket");
        // A socket left by an earlier daemon would look like this one listening.
        match fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CriuError::Io {
                    op: "lazy-pages: remove a stale socket",
                    source,
                })
            }
        }
        let mut cmd = Command::new(&self.bin);
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(images)
            .arg("-W")
            .arg(work)
            .arg("-o")
            .arg("lazy-pages.log")
            .arg("-v2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // setsid(2), which is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        loop {
            if sock.exists() {
                return Ok(LazyPages { child, log });
            }
            match child.try_wait() {
                Ok(Some(st)) => {
                    return Err(CriuError::Died {
                        op: "lazy-pages",
                        how: st.to_string(),
                        quoted: quote_errors(&log),
                        log: log.display().to_string(),
                    })
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(CriuError::Io {
                        op: "lazy-pages: wait",
                        source,
                    })
                }
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CriuError::Timeout {
                    op: "lazy-pages (waiting for its socket)",
                    after: limit,
                    log: log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl LazyPages {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The restore failed: stop the daemon.
    pub fn abort(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The restore succeeded: leave the daemon to finish, reaped by a thread
    /// of this process while it lives (by init after that).
    pub fn detach(self) {
        let mut child = self.child;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

        /// CRIU's stats image comes from the image directory (a snapshot's): any
        /// bytes parse to some entries or to None, never a panic (a varint length
        /// near 2^64 used to overflow the slice bound).
        #[test]
        fn stats_parser_is_total(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse_stats_entry(&body);
            let mut huge = vec![0x0a];
            huge.extend_from_slice(&[0xff; 9]);
            huge.push(0x01);
            huge.extend_from_slice(&body);
            proptest::prop_assert!(parse_stats_entry(&huge).is_none());
        }
    }

    #[test]
    fn error_lines_skip_harmless_rlimit() {
        let log = "(00.000010) Version: 4.2.1\n\
                   (00.000100) Error (criu/rlimit.c:10): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
                   (00.002000) Error (criu/sk-inet.c:100): sockets: Can't get 1:16 opt: Operation not supported\n";
        assert_eq!(
            error_lines(log),
            vec!["(00.002000) Error (criu/sk-inet.c:100): sockets: Can't get 1:16 opt: Operation not supported"]
        );
    }

    #[test]
    fn missing_binary_is_a_clear_error() {
        let e = Criu::new("/nonexistent/criu")
            .version()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot run /nonexistent/criu:"), "{e}");
        assert!(e.contains("CRIU >= 4.2"), "{e}");
    }

    #[test]
    fn stats_entry_decodes() {
        // dump = 1 { freezing_time = 1: 150, frozen_time = 2: 3000, pages_written = 7: 42 }
        let inner = [0x08, 0x96, 0x01, 0x10, 0xb8, 0x17, 0x38, 0x2a];
        let mut b = vec![0x0a, inner.len() as u8];
        b.extend_from_slice(&inner);
        let s = parse_stats_entry(&b).unwrap();
        assert_eq!(
            s,
            vec![
                ("freezing_time", 150),
                ("frozen_time", 3000),
                ("pages_written", 42)
            ]
        );
    }

    /// A whole `stats-restore` image (magic pair, size, entry), as benches/cr.rs
    /// reads it for `forking_time` and `restore_time`.
    #[test]
    fn stats_restore_image_reads() {
        // restore = 2 { pages_compared = 1: 0, pages_skipped_cow = 2: 0,
        //               forking_time = 3: 1200, restore_time = 4: 45000 }
        let inner = [
            0x08, 0x00, 0x10, 0x00, 0x18, 0xb0, 0x09, 0x20, 0xc8, 0xdf, 0x02,
        ];
        let mut entry = vec![0x12, inner.len() as u8];
        entry.extend_from_slice(&inner);
        let mut image = vec![0u8; 8];
        image.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        image.extend_from_slice(&entry);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats-restore");
        fs::write(&path, &image).unwrap();
        assert_eq!(
            read_stats(&path).unwrap(),
            vec![
                ("pages_compared", 0),
                ("pages_skipped_cow", 0),
                ("forking_time", 1200),
                ("restore_time", 45000)
            ]
        );
        // Cut short: no stats rather than wrong ones.
        fs::write(&path, &image[..image.len() - 1]).unwrap();
        assert_eq!(read_stats(&path), None);
    }
}
