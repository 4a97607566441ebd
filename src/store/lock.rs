//! `flock(2)` locks on the store's `lock` and `index.lock` files, with a timeout and
//! a message that says which lock is waited for and why. flock, not lock files: the
//! kernel drops the lock when its holder dies, so a crash never leaves a stale lock
//! (restic's and borg's most common complaint). Locks are per open file, so two
//! threads of one process exclude each other just like two processes do.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::{io_err, Result, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (and by the kernel if the process dies).
#[derive(Debug)]
pub(crate) struct Flock {
    file: File,
}

impl Flock {
    /// Waits up to `timeout` for the lock. `holder` says, for the timeout message,
    /// what kind of process holds the conflicting lock.
    pub(crate) fn acquire(
        path: &Path,
        mode: Mode,
        timeout: Duration,
        holder: &'static str,
    ) -> Result<Flock> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(super::util::PRIVATE_FILE)
            .open(path)
        {
            Ok(f) => f,
            // A read-only store (another user's) can still be locked shared.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && mode == Mode::Shared => {
                File::open(path).map_err(io_err("open lock file", path))?
            }
            Err(e) => return Err(io_err("open lock file", path)(e)),
        };
        let op = match mode {
            Mode::Shared => libc::LOCK_SH,
            Mode::Exclusive => libc::LOCK_EX,
        };
        let start = Instant::now();
        let mut sleep = Duration::from_millis(5);
        loop {
            // SAFETY: flock on a valid file descriptor owned by `file`; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Flock { file });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => {}
                Some(libc::EINTR) => continue,
                _ => return Err(io_err("flock", path)(err)),
            }
            if start.elapsed() >= timeout {
                return Err(StoreError::LockTimeout {
                    path: path.to_path_buf(),
                    mode: match mode {
                        Mode::Shared => "shared",
                        Mode::Exclusive => "exclusive",
                    },
                    waited: start.elapsed(),
                    holder,
                });
            }
            std::thread::sleep(sleep.min(timeout.saturating_sub(start.elapsed())));
            sleep = (sleep * 2).min(Duration::from_millis(100));
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: flock on the valid descriptor we own; closing would release it too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Paths and timeouts of the two store locks.
#[derive(Clone, Debug)]
pub(crate) struct Locks {
    pub(crate) store: PathBuf,
    pub(crate) index: PathBuf,
    pub(crate) timeout: Duration,
}

impl Locks {
    /// Shared store lock: ingest, materialize, export, import, verify, tag.
    pub(crate) fn shared(&self) -> Result<Flock> {
        Flock::acquire(
            &self.store,
            Mode::Shared,
            self.timeout,
            "gc, prune or snapshot rm is running",
        )
    }

    /// Exclusive store lock: gc, prune, tag removal.
    pub(crate) fn exclusive(&self) -> Result<Flock> {
        Flock::acquire(
            &self.store,
            Mode::Exclusive,
            self.timeout,
            "a checkpoint, restore, export, import or verify is using the store",
        )
    }

    /// The short exclusive lock around an `index.json` read-modify-write.
    pub(crate) fn index(&self) -> Result<Flock> {
        Flock::acquire(
            &self.index,
            Mode::Exclusive,
            self.timeout,
            "it is updating index.json",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_names_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = Locks {
            store: dir.path().join("lock"),
            index: dir.path().join("index.lock"),
            timeout: Duration::from_millis(50),
        };
        let a = locks.shared().expect("shared");
        let b = locks.shared().expect("second shared");
        let e = locks.exclusive().expect_err("exclusive must wait");
        let msg = e.to_string();
        assert!(
            msg.starts_with("timed out after 0s waiting for the exclusive lock on "),
            "{msg}"
        );
        assert!(msg.ends_with("/lock: another stasis process holds it (a checkpoint, restore, export, import or verify is using the store)"), "{msg}");
        drop((a, b));
        let x = locks.exclusive().expect("exclusive after release");
        assert!(locks.shared().is_err());
        drop(x);
        assert!(locks.shared().is_ok());
    }
}
