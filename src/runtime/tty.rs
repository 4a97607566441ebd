//! The terminal of a foreground container process that asked for one
//! (`process.terminal: true` in `run`, `exec -t`) when the caller gave no
//! `--console-socket`: stasis listens on a private console socket, libcontainer's
//! init sends it the pty master it opened in the container, and stasis then relays
//! the caller's stdin to the master and the master to the caller's stdout, puts the
//! caller's terminal in raw mode while it does (only when stdin is a terminal), and
//! copies the caller's window size to the pty at start and on every SIGWINCH, as
//! runc does (`runc run`/`runc exec -t` without `--console-socket`). The caller's
//! terminal settings are put back when the relay ends, also on error and on panic.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

use super::{Result, RuntimeError};

/// How long libcontainer may take to send the master once it has connected (it
/// sends it before the container's process reports ready, so normally at once).
const RECEIVE_PATIENCE: Duration = Duration::from_secs(30);

/// Once the process has exited, the relay still copies what the pty holds; it stops
/// at end of file (every holder of the pty's other side has closed it) or when
/// nothing more arrives for this long (a background process of an exec still holds
/// it open).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// A console socket of stasis's own, in a private temporary directory removed on
/// drop: its path is handed to libcontainer as `--console-socket` would be.
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl ConsoleSocket {
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("stasis-tty-").tempdir()?;
        let listener = UnixListener::bind(dir.path().join("console.sock"))?;
        Ok(Self { dir, listener })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("console.sock")
    }

    /// The pty master libcontainer sent. Called after libcontainer's build
    /// returned: it connected before it forked, and the container's process sent
    /// the master before it reported ready, so neither step waits on anything that
    /// could not happen.
    pub fn receive_master(&self) -> io::Result<OwnedFd> {
        self.listener.set_nonblocking(true)?;
        let (stream, _) = self.listener.accept().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the container's process never connected to the console socket: {e}"),
            )
        })?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(RECEIVE_PATIENCE))?;
        receive_fd(&stream)
    }
}

/// A console socket of our own when a foreground process with a terminal has no
/// `--console-socket` (runc then allocates and relays the pty itself).
pub fn own_console(
    terminal: bool,
    detach: bool,
    given: Option<&PathBuf>,
) -> Result<Option<ConsoleSocket>> {
    if !terminal || detach || given.is_some() {
        return Ok(None);
    }
    ConsoleSocket::new()
        .map(Some)
        .map_err(|source| RuntimeError::Io {
            op: "create a console socket for the container's terminal in",
            path: std::env::temp_dir(),
            source,
        })
}

pub fn receive_console(sock: &ConsoleSocket) -> Result<OwnedFd> {
    sock.receive_master().map_err(|source| RuntimeError::Io {
        op: "receive the container's pty master on",
        path: sock.path(),
        source,
    })
}

fn receive_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut name = [0u8; 4096];
    let mut iov = [io::IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            let mut owned: Vec<OwnedFd> = fds
                .into_iter()
                // SAFETY: SCM_RIGHTS just installed these descriptors in this
                // process; nothing else owns them.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            if owned.len() == 1 {
                return Ok(owned.remove(0));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "the container's process sent no pty master on the console socket",
    ))
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size of the caller's terminal (stdin, else stdout), if it has one.
pub fn caller_winsize() -> Option<libc::winsize> {
    [0, 1]
        .into_iter()
        .find(|fd| is_tty(*fd))
        .and_then(|fd| get_winsize(fd).ok())
}

fn get_winsize(fd: RawFd) -> io::Result<libc::winsize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the pointer, which points at one.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ws)
}

/// Sets the window size of a pty (either side); the kernel then sends SIGWINCH to
/// the pty's foreground process group.
pub fn set_winsize(fd: RawFd, ws: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points at one.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The caller's terminal in raw mode; its previous settings are put back on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let saved = tcgetattr(fd)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(fd, SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: fd 0 stays open for the whole life of stasis; the borrow ends here.
        let stdin = unsafe { BorrowedFd::borrow_raw(0) };
        // Output already written is sent first (TCSADRAIN), as a shell does.
        let _ = tcsetattr(stdin, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The relay between the caller's stdio and a pty master, running in a thread.
pub struct Relay {
    master: std::sync::Arc<OwnedFd>,
    /// The terminal whose window size the pty follows (stdin, else stdout).
    size_from: Option<RawFd>,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<io::Result<()>>>,
    raw: Option<RawMode>,
}

impl Relay {
    /// Starts relaying. Call it with every signal blocked in this thread: the relay
    /// thread inherits the mask, so signals keep going to the caller's wait loop.
    /// A terminal that cannot be put in raw mode is a warning, not a failure.
    pub fn start(master: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_truncate(fcntl(master.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(
            master.as_raw_fd(),
            FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK),
        )?;
        let size_from = [0, 1].into_iter().find(|fd| is_tty(*fd));
        let mut relay = Self {
            master: std::sync::Arc::new(master),
            size_from,
            stop: None,
            thread: None,
            raw: None,
        };
        relay.resize();
        if is_tty(0) {
            // SAFETY: fd 0 stays open for the whole life of stasis.
            let stdin = unsafe { BorrowedFd::borrow_raw(0) };
            match RawMode::enter(stdin) {
                Ok(raw) => relay.raw = Some(raw),
                Err(e) => eprintln!(
                    "stasis: warning: cannot put the terminal on stdin in raw mode ({e}); \
                     keys are relayed as the terminal delivers them"
                ),
            }
        }
        let (stop_r, stop_w) = nix::unistd::pipe()?;
        let master = relay.master.clone();
        relay.thread = Some(
            std::thread::Builder::new()
                .name("tty-relay".into())
                .spawn(move || copy_loop(master.as_fd(), stop_r))?,
        );
        relay.stop = Some(stop_w);
        Ok(relay)
    }

    /// Copies the caller's window size to the pty (on SIGWINCH).
    pub fn resize(&self) {
        if let Some(fd) = self.size_from {
            // Fails only when the caller's terminal went away: nothing to follow.
            if let Ok(ws) = get_winsize(fd) {
                let _ = set_winsize(self.master.as_raw_fd(), &ws);
            }
        }
    }

    /// Once the process has exited: copies what the pty still holds, stops the
    /// relay and puts the caller's terminal back.
    pub fn finish(mut self) -> io::Result<()> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> io::Result<()> {
        // Closing the write end wakes the relay thread (its poll sees POLLHUP).
        drop(self.stop.take());
        let r = match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the terminal relay thread panicked")),
            None => Ok(()),
        };
        drop(self.raw.take());
        r
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.stop_thread();
    }
}

/// Whether a read or write returned "try again later".
fn again(e: Errno) -> bool {
    e == Errno::EAGAIN || e == Errno::EINTR
}

/// Writes all of `data` to `fd`, waiting for room when it is non-blocking.
fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(e) if again(e) => {
                let mut p = [PollFd::new(fd, PollFlags::POLLOUT)];
                poll(&mut p, PollTimeout::NONE)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The relay thread: stdin -> master, master -> stdout, until the pty reaches end
/// of file or, once `stop` is closed, goes quiet.
fn copy_loop(master: BorrowedFd<'_>, stop: OwnedFd) -> io::Result<()> {
    // SAFETY: fds 0 and 1 stay open for the whole life of stasis.
    let (stdin, stdout) = unsafe { (BorrowedFd::borrow_raw(0), BorrowedFd::borrow_raw(1)) };
    let mut buf = vec![0u8; 32 * 1024];
    // Input read from stdin that the pty has no room for yet: stdin is not read
    // again until it is written, so a container that does not read its input
    // cannot make the relay block.
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_open = true;
    let mut draining = false;
    loop {
        let mut want_master = PollFlags::POLLIN;
        if !pending.is_empty() && !draining {
            want_master |= PollFlags::POLLOUT;
        }
        let mut fds = vec![PollFd::new(master, want_master)];
        if !draining {
            fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
            if stdin_open && pending.is_empty() {
                fds.push(PollFd::new(stdin, PollFlags::POLLIN));
            }
        }
        let timeout = if draining {
            PollTimeout::try_from(DRAIN_QUIET).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if again(e) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .unwrap_or(PollFlags::empty())
        };
        let (m, s, i) = (ready(0), ready(1), ready(2));
        if !m.is_empty() {
            if m.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                match nix::unistd::read(master.as_raw_fd(), &mut buf) {
                    // End of file: every holder of the pty's other side closed it.
                    Ok(0) | Err(Errno::EIO) => return Ok(()),
                    Ok(n) => write_all(stdout, &buf[..n])?,
                    Err(e) if again(e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if m.contains(PollFlags::POLLOUT) && !pending.is_empty() {
                match nix::unistd::write(master, &pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) if again(e) => {}
                    Err(Errno::EIO) => pending.clear(),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !s.is_empty() {
            draining = true;
            pending.clear();
        }
        if !i.is_empty() && !draining {
            match nix::unistd::read(stdin.as_raw_fd(), &mut buf) {
                Ok(0) => stdin_open = false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
                Err(e) if again(e) => {}
                // A stdin that cannot be read (closed terminal) ends the input only.
                Err(_) => stdin_open = false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_the_fd_sent_on_the_socket() {
        let sock = ConsoleSocket::new().unwrap();
        let client = UnixStream::connect(sock.path()).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let fds = [pty.master.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(
            client.as_raw_fd(),
            &[io::IoSlice::new(b"/dev/ptmx")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let got = sock.receive_master().unwrap();
        // The received descriptor is the same pty master: a size set through it
        // shows on the slave.
        let ws = libc::winsize {
            ws_row: 33,
            ws_col: 77,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        assert_eq!(
            unsafe { libc::ioctl(got.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
            0
        );
        let mut back = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize to a valid pointer.
        assert_eq!(
            unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut back) },
            0
        );
        assert_eq!((back.ws_row, back.ws_col), (33, 77));
    }

    #[test]
    fn nothing_sent_is_an_error_not_a_hang() {
        let sock = ConsoleSocket::new().unwrap();
        assert!(sock.receive_master().is_err(), "no connection");
        let client = UnixStream::connect(sock.path()).unwrap();
        drop(client);
        let e = sock.receive_master().unwrap_err();
        assert!(e.to_string().contains("no pty master"), "{e}");
    }
}
