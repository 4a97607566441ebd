//! Waiting for a foreground container process (`run` without `-d`, `exec` without
//! `--detach`): every signal stasis receives is forwarded to the process, children
//! are reaped, and the process's exit code (128+N when killed by signal N) returned,
//! as runc's `handleProcessExit` / youki's `handle_foreground` do. A process with a
//! terminal of stasis's own gets it relayed meanwhile (`tty.rs`), its window size
//! following the caller's on SIGWINCH.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::tty::Relay;

/// Signals caught by `EarlySignals` before the wait loop blocks them: bit N-1 for
/// signal N.
static EARLY: AtomicU64 = AtomicU64::new(0);

extern "C" fn record(sig: libc::c_int) {
    if (1..=64).contains(&sig) {
        // Lock-free atomics are async-signal-safe.
        EARLY.fetch_or(1 << (sig - 1), Ordering::SeqCst);
    }
}

/// Signals that would be forwarded but are not caught early: the ones the wait loop
/// ignores, SIGPIPE (ignored by Rust's runtime) and the synchronous faults.
const NOT_CAUGHT: &[Signal] = &[
    Signal::SIGKILL,
    Signal::SIGSTOP,
    Signal::SIGCHLD,
    Signal::SIGWINCH,
    Signal::SIGURG,
    Signal::SIGPIPE,
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGTRAP,
    Signal::SIGSYS,
];

/// Catches the signals a foreground `run`/`exec` forwards from before the process
/// exists until the wait loop blocks them (runc installs its signal handler before
/// it creates the process). Without it, a SIGTERM that arrives while stasis still
/// saves the state file kills stasis, and the container is left running, never
/// deleted. Handlers, unlike a blocked mask, do not survive the container's execve,
/// so the container's process starts with default dispositions and nothing blocked.
pub struct EarlySignals(());

impl EarlySignals {
    pub fn catch() -> Self {
        let action = SigAction::new(
            SigHandler::Handler(record),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in Signal::iterator().filter(|s| !NOT_CAUGHT.contains(s)) {
            // SAFETY: `record` only does an atomic or, which is async-signal-safe.
            let _ = unsafe { sigaction(sig, &action) };
        }
        Self(())
    }

    /// Blocks every signal, forwards those caught so far to `pid`, then waits for
    /// it forwarding the rest; returns its exit code.
    pub fn wait(self, pid: i32) -> std::io::Result<i32> {
        self.wait_relaying(pid, None)
    }

    /// `wait`, relaying the pty whose master is `console` between the caller's
    /// stdio and the process meanwhile; the caller's terminal is put back before
    /// this returns, whatever happened.
    pub fn wait_relaying(self, pid: i32, console: Option<OwnedFd>) -> std::io::Result<i32> {
        let pid = Pid::from_raw(pid);
        // Blocked before the relay thread starts, so that it inherits the mask and
        // every signal reaches the wait loop below.
        SigSet::all().thread_block().map_err(std::io::Error::from)?;
        let relay = match console.map(Relay::start).transpose() {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "stasis: warning: cannot relay the container's terminal ({e}); \
                     waiting for the process without it"
                );
                None
            }
        };
        let early = EARLY.swap(0, Ordering::SeqCst);
        for n in 1..=64 {
            if early & (1 << (n - 1)) != 0 {
                if let Ok(sig) = Signal::try_from(n) {
                    let _ = kill(pid, sig);
                }
            }
        }
        let code = wait_blocked(pid, relay.as_ref());
        if let Some(r) = relay {
            if let Err(e) = r.finish() {
                eprintln!("stasis: warning: relaying the container's terminal: {e}");
            }
        }
        code
    }
}

pub fn wait_forwarding_signals(pid: i32) -> std::io::Result<i32> {
    EarlySignals(()).wait(pid)
}

fn wait_blocked(pid: Pid, relay: Option<&Relay>) -> std::io::Result<i32> {
    let all = SigSet::all();
    if let Some(code) = reap(pid)? {
        return Ok(code);
    }
    loop {
        let sig = all.wait().map_err(std::io::Error::from)?;
        match sig {
            Signal::SIGCHLD => {
                if let Some(code) = reap(pid)? {
                    return Ok(code);
                }
            }
            Signal::SIGWINCH => {
                if let Some(r) = relay {
                    r.resize();
                }
            }
            Signal::SIGURG => {}
            other => {
                // Forwarding fails only when the process is already gone; the
                // SIGCHLD that follows ends the wait.
                let _ = kill(pid, other);
            }
        }
    }
}

/// Reaps exited children; returns the exit code once `pid` has exited.
fn reap(pid: Pid) -> std::io::Result<Option<i32>> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(Some(code)),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return Ok(Some(128 + sig as i32)),
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(_) => continue,
            Err(nix::errno::Errno::ECHILD) => {
                // Not our child (should not happen: libcontainer clones the init as
                // our sibling-child); fall back to polling /proc.
                return poll_foreign(pid).map(Some);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn poll_foreign(pid: Pid) -> std::io::Result<i32> {
    while super::state::process_start_time(pid.as_raw()).is_some() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(0)
}
