//! Work-around for libcontainer 0.7.0 re-opening `/dev/null` stdio read-only
//! (`reopen_dev_null` uses `File::open`; runc fixed the same bug in PR #309): when
//! our stdout or stderr is `/dev/null`, the container instead gets a pipe whose
//! read end a small detached `stasis __drain` process empties. Writes then
//! succeed, and CRIU can dump and remap the pipe like any other.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Command, Stdio};

/// Our stdio as it was, put back on drop.
pub struct StdioSwap {
    saved: Vec<(RawFd, OwnedFd)>,
    /// Read end drained by a thread started on drop, i.e. after libcontainer has
    /// cloned the container's processes: a thread running during those clones
    /// could hold a libc lock the children then wait for forever.
    drain: Option<std::io::PipeReader>,
}

impl Drop for StdioSwap {
    fn drop(&mut self) {
        for (fd, orig) in self.saved.drain(..) {
            let _ = nix::unistd::dup2(orig.as_raw_fd(), fd);
        }
        if let Some(mut r) = self.drain.take() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            });
        }
    }
}

/// The write end of a pipe that a detached `stasis __drain` empties.
pub fn drained_pipe() -> std::io::Result<OwnedFd> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let (r, w) = std::io::pipe()?;
    // Its own process group: terminal signals aimed at us do not reach it. It
    // exits when the last writer (the container) closes the pipe.
    Command::new(exe)
        .arg("__drain")
        .stdin(r)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(OwnedFd::from(w))
}

/// The read end of a pipe whose writer is already closed: reads see EOF, like
/// /dev/null, but CRIU can dump it.
pub fn eof_pipe() -> std::io::Result<OwnedFd> {
    let (r, w) = std::io::pipe()?;
    drop(w);
    Ok(OwnedFd::from(r))
}

pub fn is_dev_null(fd: RawFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|p| p == Path::new("/dev/null"))
}

/// Replaces stdout/stderr that are `/dev/null` with a drained pipe, until the
/// returned guard is dropped. `None` when neither is `/dev/null`. A foreground
/// caller (which outlives the container) drains in a thread of its own; a
/// detached one leaves a `stasis __drain` process behind.
pub fn devnull_outputs_to_pipe(foreground: bool) -> std::io::Result<Option<StdioSwap>> {
    let fds: Vec<RawFd> = [1, 2].into_iter().filter(|fd| is_dev_null(*fd)).collect();
    if fds.is_empty() {
        return Ok(None);
    }
    let (w, drain) = if foreground {
        // The container does not run before `start`, which comes after this
        // guard is dropped; the pipe buffer holds anything written until then.
        let (r, w) = std::io::pipe()?;
        (OwnedFd::from(w), Some(r))
    } else {
        (drained_pipe()?, None)
    };
    let mut swap = StdioSwap {
        saved: Vec::new(),
        drain,
    };
    for fd in fds {
        let orig = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
            .map_err(std::io::Error::from)?;
        // SAFETY: fcntl just returned this descriptor; we own it.
        let orig = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(orig) };
        nix::unistd::dup2(w.as_raw_fd(), fd).map_err(std::io::Error::from)?;
        swap.saved.push((fd, orig));
    }
    Ok(Some(swap))
}
