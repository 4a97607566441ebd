//! Terminals, side by side with runc: `exec -t` and `run` of a bundle with
//! `process.terminal: true`, without `--console-socket`, started under a real pty
//! that the test holds (the caller's terminal). What the container sees (`tty`,
//! `stty size`), what it reads (keys typed on the caller's terminal), window-size
//! changes on the caller's terminal, the exit code, and the caller's terminal
//! settings (raw while the container runs, put back after) are compared.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::termios::{tcgetattr, LocalFlags, Termios};

use crate::common::{edit_config, unique_id, wait_until, Env, CMD_TIMEOUT};

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A command running on a pty the test holds: its stdin, stdout and stderr are the
/// pty's slave, the controlling terminal of a shell (the session leader, as a
/// login shell is) that runs the command in the foreground and saves `stty -g`
/// before and after it.
struct UnderPty {
    child: Child,
    master: File,
    /// Kept open to read the terminal's settings while the command runs.
    slave: OwnedFd,
    /// `stty -g` before and after the command ran.
    saved: (std::path::PathBuf, std::path::PathBuf),
    out: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    what: String,
}

impl UnderPty {
    fn spawn(env: &Env, args: &[&str], rows: u16, cols: u16) -> Self {
        let ws = winsize(rows, cols);
        let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
        let slave = pty.slave;
        let n = unique_id("stty");
        let saved = (
            env.path(&format!("{n}.before")),
            env.path(&format!("{n}.after")),
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"b=$1 a=$2; shift 2; stty -g >"$b"; "$@"; rc=$?; stty -g >"$a"; exit $rc"#)
            .arg("sh")
            .arg(&saved.0)
            .arg(&saved.1)
            .arg(&env.bin)
            .arg("--root")
            .arg(&env.root)
            .args(args);
        let io = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup pty slave"));
        cmd.stdin(io(&slave)).stdout(io(&slave)).stderr(io(&slave));
        // SAFETY: setsid and ioctl are async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn under a pty");
        let master = File::from(pty.master);
        nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .expect("non-blocking master");
        let out = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (mut m, out, stop) = (master.try_clone().unwrap(), out.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // The test holds the slave open, so the master never reads EOF:
                // poll until told to stop, then take what is left.
                loop {
                    let stopping = stop.load(Ordering::SeqCst);
                    match m.read(&mut buf) {
                        Ok(n) if n > 0 => out.lock().unwrap().extend_from_slice(&buf[..n]),
                        _ if stopping => return,
                        _ => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            child,
            master,
            slave,
            saved,
            out,
            stop,
            reader: Some(reader),
            what: format!("{} {}", env.bin.display(), args.join(" ")),
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    #[track_caller]
    fn wait_for(&self, needle: &str) {
        wait_until(
            &format!(
                "{needle:?} from `{}` (so far: {:?})",
                self.what,
                self.output()
            ),
            CMD_TIMEOUT,
            || self.output().contains(needle),
        );
    }

    /// Types on the caller's terminal.
    fn type_keys(&mut self, keys: &[u8]) {
        self.master.write_all(keys).expect("write to the pty");
    }

    /// Resizes the caller's terminal: the kernel sends SIGWINCH to the command.
    fn resize(&self, rows: u16, cols: u16) {
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    fn termios(&self) -> Termios {
        tcgetattr(self.slave.as_fd()).expect("tcgetattr on the pty")
    }

    /// Whether the command left the terminal's settings as it found them.
    fn settings_restored(&self) -> bool {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("stty -g output");
        read(&self.saved.0) == read(&self.saved.1)
    }

    /// Waits for the command's exit; returns its code, everything it printed and
    /// whether it put the terminal's settings back.
    #[track_caller]
    fn finish(mut self) -> (i32, String, bool) {
        let mut code = None;
        wait_until(&format!("`{}` to exit", self.what), CMD_TIMEOUT, || {
            code = self.child.try_wait().expect("try_wait").map(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.code()
                    .or_else(|| s.signal().map(|n| 128 + n))
                    .unwrap_or(-1)
            });
            code.is_some()
        });
        self.stop.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            r.join().expect("pty reader");
        }
        (code.unwrap_or(-1), self.output(), self.settings_restored())
    }
}

impl Drop for UnderPty {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What `exec -t ID sh -c 'tty; stty size; exit 5'` does under a 32x102 terminal.
fn exec_t(env: &Env, id: &str) -> (i32, String, bool) {
    let p = UnderPty::spawn(
        env,
        &["exec", "-t", id, "sh", "-c", "tty; stty size; exit 5"],
        32,
        102,
    );
    p.finish()
}

#[test]
fn exec_t_gives_the_process_a_terminal_like_runc() {
    requires!(root, busybox, runc);
    let stasis = Env::new();
    let runc = Env::runc();
    let b = stasis.bundle("b", &["sleep", "1000"]);
    let (sid, rid) = (unique_id("tty-s"), unique_id("tty-r"));
    let _gs = stasis.run_detached(&b, &sid);
    let _gr = runc.run_detached(&b, &rid);
    for (env, id, who) in [(&stasis, &sid, "stasis"), (&runc, &rid, "runc")] {
        let (code, out, restored) = exec_t(env, id);
        assert_eq!(code, 5, "{who}: exit code; output {out:?}");
        assert!(
            out.lines()
                .any(|l| l.trim_matches(['\r', '\0']) == "/dev/pts/0"),
            "{who}: `tty` in the container: {out:?}"
        );
        // runc 1.1 sets the pty's size only after the process started, so its
        // `stty size` sometimes fails ("No child processes") or sees 0 0: the
        // size from the first instruction is asserted for stasis only.
        if who == "stasis" {
            assert!(out.contains("32 102"), "{who}: `stty size`: {out:?}");
        }
        assert!(
            restored,
            "{who}: the caller's terminal settings were not put back"
        );
    }
    // Without a terminal on the caller's side the process still gets one.
    let out = stasis
        .run(&["exec", "-t", &sid, "sh", "-c", "tty"])
        .expect_ok();
    assert_eq!(out.stdout.trim(), "/dev/pts/0", "{out:?}");
}

/// `run` of a terminal bundle under a 24x80 terminal: types a line, then resizes
/// the caller's terminal; returns the exit code and output, and whether the
/// caller's terminal was raw while the container ran and put back after.
fn run_interactive(env: &Env, bundle: &std::path::Path, id: &str) -> (i32, String, bool, bool) {
    let _g = env.guard(id);
    let mut p = UnderPty::spawn(
        env,
        &["run", "--bundle", bundle.to_str().unwrap(), id],
        24,
        80,
    );
    p.wait_for("ready");
    let during = p.termios();
    let raw = !during.local_flags.contains(LocalFlags::ICANON)
        && !during.local_flags.contains(LocalFlags::ECHO);
    // Raw mode passes the Enter key's CR through; the container's pty turns it
    // into a newline (ICRNL), as for a person typing.
    p.type_keys(b"hello\r");
    p.wait_for("got:hello");
    p.wait_for("armed");
    p.resize(40, 120);
    let (code, out, restored) = p.finish();
    (code, out, raw, restored)
}

#[test]
fn run_with_terminal_relays_keys_and_window_size_like_runc() {
    requires!(root, busybox, runc);
    let stasis = Env::new();
    let runc = Env::runc();
    let b = stasis.bundle(
        "b",
        &[
            "sh",
            "-c",
            "stty size; echo ready; read x; echo got:$x; \
             trap 'stty size; exit 3' WINCH; echo armed; while :; do sleep 1; done",
        ],
    );
    edit_config(&b, |c| c["process"]["terminal"] = serde_json::json!(true));
    for (env, who) in [(&stasis, "stasis"), (&runc, "runc")] {
        let (code, out, raw, restored) = run_interactive(env, &b, &unique_id("tty-run"));
        assert_eq!(code, 3, "{who}: exit code; output {out:?}");
        // runc 1.1 copies the size only once the process runs, so its first
        // `stty size` may see none ("stty: standard input"); stasis sets it before.
        if who == "stasis" {
            assert!(out.contains("24 80"), "{who}: initial size: {out:?}");
        }
        assert!(out.contains("got:hello"), "{who}: typed line: {out:?}");
        assert!(
            out.contains("40 120"),
            "{who}: size after SIGWINCH: {out:?}"
        );
        assert!(
            raw,
            "{who}: the caller's terminal was not raw while the container ran"
        );
        assert!(
            restored,
            "{who}: the caller's terminal settings were not put back"
        );
    }
}

/// `exec -d -t --console-socket SOCK ID sh -c 'tty'`: what the process writes
/// to the pty master sent to the socket, read until the process has exited.
fn via_console_socket(env: &Env, id: &str, sock: &std::path::Path) -> String {
    use std::os::unix::net::UnixListener;
    let listener = UnixListener::bind(sock).expect("bind console socket");
    listener.set_nonblocking(true).unwrap();
    let s = sock.to_str().unwrap();
    env.ok(&[
        "exec",
        "-d",
        "-t",
        "--console-socket",
        s,
        id,
        "sh",
        "-c",
        "tty",
    ]);
    let mut conn = None;
    wait_until("a connection on the console socket", CMD_TIMEOUT, || {
        conn = listener.accept().ok().map(|(c, _)| c);
        conn.is_some()
    });
    let stream = conn.unwrap();
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(CMD_TIMEOUT)).unwrap();
    let mut name = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::empty(),
    )
    .expect("recvmsg on the console socket");
    let fd = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .expect("a pty master on the console socket");
    // SAFETY: SCM_RIGHTS just installed this descriptor; nothing else owns it.
    let mut master = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Read until EIO: the process held the only other end and has exited.
    let mut text = Vec::new();
    let _ = master.read_to_end(&mut text);
    String::from_utf8_lossy(&text).into_owned()
}

#[test]
fn console_socket_gets_the_master_of_a_detached_exec_like_runc() {
    requires!(root, busybox, runc);
    let stasis = Env::new();
    let runc = Env::runc();
    let b = stasis.bundle("b", &["sleep", "1000"]);
    let (sid, rid) = (unique_id("cs-s"), unique_id("cs-r"));
    let _gs = stasis.run_detached(&b, &sid);
    let _gr = runc.run_detached(&b, &rid);
    for (env, id, who) in [(&stasis, &sid, "stasis"), (&runc, &rid, "runc")] {
        let out = via_console_socket(env, id, &env.path("console.sock"));
        assert!(
            out.contains("/dev/pts/"),
            "{who}: `tty` on the socket's pty: {out:?}"
        );
        // Refused by both: a console socket in the foreground, or for a process
        // without a terminal.
        for args in [
            &[
                "exec",
                "-t",
                "--console-socket",
                "/nonexistent.sock",
                id,
                "true",
            ][..],
            &[
                "exec",
                "-d",
                "--console-socket",
                "/nonexistent.sock",
                id,
                "true",
            ][..],
        ] {
            let out = env.run(args);
            assert_ne!(out.code, Some(0), "{who} {args:?}");
            if who == "stasis" {
                out.fails_with_one_line(&["--console-socket"]);
            }
        }
    }
    // A detached process cannot have stasis's own terminal relay.
    let out = stasis.run(&["exec", "-t", "-d", &sid, "true"]);
    out.fails_with_one_line(&["--console-socket", "detached"]);
}
