//! Waiting for a foreground container process (`run` without `-d`, `exec` without
//! `--detach`): every signal stasis receives is forwarded to the process, children
//! are reaped, and the process's exit code (128+N when killed by signal N) returned,
//! as runc's `handleProcessExit` / youki's `handle_foreground` do.

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub fn wait_forwarding_signals(pid: i32) -> std::io::Result<i32> {
    let pid = Pid::from_raw(pid);
    let all = SigSet::all();
    all.thread_block().map_err(std::io::Error::from)?;
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
            Signal::SIGWINCH | Signal::SIGURG => {}
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
