//! Per-container state owned by stasis: the id rule, the state file under
//! `--root/<id>/stasis.json` (written atomically), the per-container lock and the
//! one table of legal status transitions. It knows nothing about how containers
//! are created; `core` does that.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::RuntimeError;

/// Name of our state file inside the container directory. libcontainer keeps its own
/// `state.json` and `config.json` next to it.
pub const STATE_FILE: &str = "stasis.json";
const LOCK_DIR: &str = ".locks";

/// Room kept free in NAME_MAX for what stasis adds to an id in a name (22
/// bytes, the length of `stasis-checkpoint-.log`, the kept CRIU log's name before
/// those logs got random names): more than any name it makes now, the
/// directories `<id>` (under `--root`, `--root/.copies`, the store's
/// `cache/copies`), the lock `--root/.locks/<id>`, the cgroup `:youki:<id>`
/// (libcontainer's name when the spec sets no cgroupsPath), the stat cache
/// `<id>.json` and a copy's `<prefix>-<n>`. Kept so the id limit stays 233.
const LONGEST_ID_NAME: &str = "stasis-checkpoint-.log";
/// NAME_MAX of Linux filesystems: the longest single path component.
const NAME_MAX: usize = 255;
/// Longest id: every name made from it must fit in NAME_MAX.
pub const MAX_ID_LEN: usize = NAME_MAX - LONGEST_ID_NAME.len();

/// Validates a container id with runc's rule, `^[\w+\-.]+$` and not `.` or `..`,
/// plus two of our own: no leading `.` (stasis keeps its private entries in
/// `--root` under dot names: `.locks`, `.copies`), and at most [`MAX_ID_LEN`] bytes
/// so that every file, directory and cgroup named after it fits NAME_MAX (runc has
/// no limit of its own and fails in mkdir with "file name too long"). A valid id
/// is always a single path component below `--root` that names no private entry.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let bad = |reason: &str| RuntimeError::InvalidId {
        id: id.to_string(),
        reason: reason.to_string(),
    };
    if id.is_empty() {
        return Err(bad("it is empty"));
    }
    if id == "." || id == ".." {
        return Err(bad("it is a relative path component"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(RuntimeError::InvalidId {
            // The whole id would bury the reason: name its start and length.
            id: format!("{}...", id.chars().take(32).collect::<String>()),
            reason: format!(
                "it is {} bytes long; ids are at most {MAX_ID_LEN} bytes (stasis names files \
                 after them, and a file name is at most {NAME_MAX} bytes)",
                id.len()
            ),
        });
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.')))
    {
        return Err(bad(&format!(
            "character {c:?} is not allowed (use letters, digits, '_', '+', '-', '.')"
        )));
    }
    if id.starts_with('.') {
        return Err(bad(
            "it starts with '.', which stasis reserves for its own entries in --root \
             (.locks, .copies); start it with a letter, digit, '_', '+' or '-'",
        ));
    }
    Ok(())
}

/// Lifecycle status, as the OCI runtime spec and runc name them, plus
/// `restoring`: a CRIU restore into this id is under way (or its restorer died).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Restoring,
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Restoring => "restoring",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operations that move a container between statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Pause,
    Resume,
    Kill,
    Exec,
    Update,
    Delete,
    ForceDelete,
    Checkpoint,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Kill => "kill",
            Op::Exec => "exec",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::ForceDelete => "delete --force",
            Op::Checkpoint => "checkpoint",
        }
    }
}

/// The one place that lists legal transitions: `Some(next)` when `op` is allowed
/// from `from`, `None` when it is not. `Kill`, `Exec`, `Update` and `Checkpoint`
/// keep the status (the process may exit later; the next read sees that).
/// Mirrors runc's `transition()` and youki's `can_*()` checks.
pub fn transition(from: Status, op: Op) -> Option<Status> {
    use Op::*;
    use Status::*;
    match (from, op) {
        (Created, Start) => Some(Running),
        (Running, Pause) => Some(Paused),
        (Paused, Resume) => Some(Running),
        (Created | Running | Paused, Kill) => Some(from),
        (Running, Exec) => Some(Running),
        (Created | Running | Paused, Update) => Some(from),
        (Running | Paused, Checkpoint) => Some(from),
        // runc and crun delete a created container without --force (they kill it).
        (Stopped | Created, Delete) => Some(Stopped),
        (_, ForceDelete) => Some(Stopped),
        _ => None,
    }
}

/// What stasis records about a container. Written atomically on every change.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ContainerState {
    pub id: String,
    pub status: Status,
    /// Init process pid in the host pid namespace; 0 before it exists.
    pub pid: i32,
    /// Start time of the init process (field 22 of /proc/PID/stat), so a reused
    /// pid is never taken for the container's init.
    pub pid_start_time: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: DateTime<Utc>,
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::HashMap<String, String>>,
    /// Cgroup path of the container as given to the cgroup manager.
    #[serde(default)]
    pub cgroup_path: PathBuf,
    /// A directory created for this container (overlay, volumes, bundle of a
    /// restored copy) that `delete` unmounts and removes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_dir: Option<PathBuf>,
    /// The stasis command checkpointing the container right now, recorded before
    /// it freezes the container and cleared when it is done: when that command
    /// died, the next command on the container thaws it (`Runtime::recover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointer: Option<Worker>,
    /// With status `restoring`: the stasis command restoring the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restorer: Option<Worker>,
}

/// A stasis command working on a container (checkpointing or restoring it) and
/// the CRIU it spawned, each as pid + start time (field 22 of /proc/PID/stat) so
/// a reused pid is never taken for them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: i32,
    pub start_time: u64,
    /// CRIU, once spawned (0 before): it outlives a killed stasis until its next
    /// notification, and re-freezes the container when it rolls back.
    #[serde(default)]
    pub criu_pid: i32,
    #[serde(default)]
    pub criu_start_time: u64,
    /// True when stasis freezes the container for the dump (it was running);
    /// false when the user had paused it, which must stay paused.
    pub freezes: bool,
}

impl Worker {
    /// This process, about to checkpoint or restore a container (`freezes`: see
    /// the field; false for a restore).
    pub fn this_process(freezes: bool) -> Self {
        let pid = std::process::id() as i32;
        Self {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
            criu_pid: 0,
            criu_start_time: 0,
            freezes,
        }
    }

    /// Whether the checkpointing stasis process still runs.
    pub fn stasis_alive(&self) -> bool {
        process_alive(self.pid, self.start_time)
    }

    /// Whether its CRIU still runs (it may still thaw or re-freeze the container).
    pub fn criu_alive(&self) -> bool {
        process_alive(self.criu_pid, self.criu_start_time)
    }
}

impl ContainerState {
    pub fn path(container_dir: &Path) -> PathBuf {
        container_dir.join(STATE_FILE)
    }

    pub fn load(container_dir: &Path) -> Result<Self, RuntimeError> {
        let path = Self::path(container_dir);
        let bytes = fs::read(&path).map_err(|source| RuntimeError::Io {
            op: "read state file",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| RuntimeError::StateCorrupt { path, source })
    }

    /// Writes the state file atomically: temp file, fsync, rename, fsync the directory.
    pub fn save(&self, container_dir: &Path) -> Result<(), RuntimeError> {
        let bytes = serde_json::to_vec(self).map_err(|source| RuntimeError::StateCorrupt {
            path: Self::path(container_dir),
            source,
        })?;
        write_atomic(&Self::path(container_dir), &bytes)
    }

    /// The status as it is now: a recorded live status turns into `stopped` when the
    /// init process is gone (or its pid was reused by another process). A
    /// `restoring` container stays so until its restorer records it running, or,
    /// when the restorer died, until `delete --force` removes what it left.
    pub fn live_status(&self) -> Status {
        match self.status {
            Status::Created | Status::Running | Status::Paused => {
                if process_alive(self.pid, self.pid_start_time) {
                    self.status
                } else {
                    Status::Stopped
                }
            }
            other => other,
        }
    }
}

/// Writes `bytes` to `path` so that readers see either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Unique per write: several threads of one process may write the same file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| RuntimeError::Io {
            op,
            path: p,
            source,
        }
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create temp state file", &tmp))?;
    f.write_all(bytes)
        .map_err(io("write temp state file", &tmp))?;
    f.sync_all().map_err(io("fsync temp state file", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        RuntimeError::Io {
            op: "rename state file into place",
            path: path.to_path_buf(),
            source: e,
        }
    })?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync state directory", dir))?;
    Ok(())
}

/// Start time (in clock ticks since boot) of `pid`, or None when it does not exist
/// or is a zombie.
pub fn process_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is the state (field 3), start time is field 22 -> index 19.
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

pub fn process_alive(pid: i32, start_time: u64) -> bool {
    match process_start_time(pid) {
        Some(t) => start_time == 0 || t == start_time,
        None => false,
    }
}

/// An exclusive `flock(2)` on `--root/.locks/<id>`, held for the length of one
/// command on one container. The kernel drops it when the holder dies, so it never
/// goes stale. The file exists only while its container does (or a command holds
/// it): the holder removes it when it lets go and there is no container `<id>`, so
/// a failed `create` or a `kill` of a missing id leaves nothing.
pub struct ContainerLock {
    file: File,
    path: PathBuf,
    /// The container's directory: when it is gone at release, so is the lock file.
    container_dir: PathBuf,
}

impl ContainerLock {
    pub fn acquire(root: &Path, id: &str, timeout: Duration) -> Result<Self, RuntimeError> {
        let dir = root.join(LOCK_DIR);
        let path = dir.join(id);
        let deadline = Instant::now() + timeout;
        loop {
            fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
                op: "create lock directory",
                path: dir.clone(),
                source,
            })?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|source| RuntimeError::Io {
                    op: "open lock file",
                    path: path.clone(),
                    source,
                })?;
            flock_until(&file, &path, id, deadline, timeout)?;
            // The holder we waited for may have removed the file (its container
            // was gone) before it let go: our lock is then on a file nobody else
            // will open, and a newcomer may hold one on a new file at `path`.
            // Only a lock on the file that `path` names now counts.
            if same_file(&file, &path) {
                return Ok(Self {
                    file,
                    path,
                    container_dir: root.join(id),
                });
            }
        }
    }

    /// Removes the lock file (used by delete, while still holding the lock).
    pub fn remove_file(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Takes an exclusive flock on `file`, retrying until `deadline`.
fn flock_until(
    file: &File,
    path: &Path,
    id: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), RuntimeError> {
    loop {
        // SAFETY: flock on a valid, owned file descriptor; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(RuntimeError::Io {
                op: "lock",
                path: path.to_path_buf(),
                source: err,
            });
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::LockTimeout {
                id: id.to_string(),
                path: path.to_path_buf(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `path` names the open `file` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for ContainerLock {
    fn drop(&mut self) {
        // Still holding the lock: no other command is between its check and use.
        if !self.container_dir.exists() {
            self.remove_file();
        }
        // SAFETY: unlocking our own valid descriptor; closing it would unlock too.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runc_rule() {
        for ok in ["a", "abc-123", "a.b_c+d", "A9"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", ".", "..", "a/b", "../x", "a b", "x\0y", "é", ".copies", ".locks", ".x",
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        // Every name stasis makes from the longest id fits NAME_MAX; one byte more
        // is refused, naming the limit.
        let longest = "a".repeat(MAX_ID_LEN);
        assert!(validate_id(&longest).is_ok());
        assert!(format!("stasis-checkpoint-{longest}.log").len() <= 255);
        for n in [MAX_ID_LEN + 1, 256, 1024, 1025] {
            let err = validate_id(&"a".repeat(n)).unwrap_err().to_string();
            assert!(err.contains(&format!("{n} bytes")), "{err}");
            assert!(err.contains(&MAX_ID_LEN.to_string()), "{err}");
            assert!(err.len() < 300, "{err}");
        }
        let err = validate_id("a/b").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid container id \"a/b\": character '/' is not allowed (use letters, digits, '_', '+', '-', '.')"
        );
    }

    #[test]
    fn transitions_table() {
        assert_eq!(
            transition(Status::Created, Op::Start),
            Some(Status::Running)
        );
        assert_eq!(transition(Status::Running, Op::Start), None);
        assert_eq!(transition(Status::Running, Op::Delete), None);
        assert_eq!(
            transition(Status::Running, Op::ForceDelete),
            Some(Status::Stopped)
        );
        assert_eq!(transition(Status::Paused, Op::Pause), None);
        assert_eq!(
            transition(Status::Paused, Op::Resume),
            Some(Status::Running)
        );
        assert_eq!(transition(Status::Stopped, Op::Kill), None);
        assert_eq!(transition(Status::Paused, Op::Exec), None);
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn own_process_is_alive_and_start_time_guards_reuse() {
        let me = std::process::id() as i32;
        let t = process_start_time(me).unwrap();
        assert!(process_alive(me, t));
        assert!(!process_alive(me, t + 1));
        assert!(!process_alive(0, 0));
    }

    #[test]
    fn lock_file_lives_only_as_long_as_its_container() {
        let dir = tempfile::tempdir().unwrap();
        let lock_file = dir.path().join(LOCK_DIR).join("c1");
        // No container c1: the file goes with the lock.
        let l = ContainerLock::acquire(dir.path(), "c1", Duration::from_secs(1)).unwrap();
        assert!(lock_file.exists());
        drop(l);
        assert!(!lock_file.exists());
        // A container c1: the file stays.
        fs::create_dir(dir.path().join("c1")).unwrap();
        drop(ContainerLock::acquire(dir.path(), "c1", Duration::from_secs(1)).unwrap());
        assert!(lock_file.exists());
    }

    #[test]
    fn a_lock_on_a_removed_file_is_not_taken() {
        // A waiter that opened the file before the holder removed it must not
        // come away holding a lock on the unlinked file while another command
        // locks the new one.
        let dir = tempfile::tempdir().unwrap();
        let first = ContainerLock::acquire(dir.path(), "c1", Duration::from_secs(1)).unwrap();
        let root = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            ContainerLock::acquire(&root, "c1", Duration::from_secs(5)).map(|l| {
                let ok = same_file(&l.file, &l.path);
                drop(l);
                ok
            })
        });
        std::thread::sleep(Duration::from_millis(100));
        drop(first); // no container: removes the file, then unlocks
        assert!(matches!(waiter.join().unwrap(), Ok(true)));
    }

    #[test]
    fn checkpointer_record_is_optional_and_tells_dead_from_alive() {
        // A state file written before the record existed still loads.
        let old = r#"{"id":"c","status":"running","pid":1,"pid_start_time":0,"bundle":"/b",
            "rootfs":"/b/rootfs","created":"2026-01-01T00:00:00Z","owner":"root"}"#;
        let st: ContainerState = serde_json::from_str(old).unwrap();
        assert!(st.checkpointer.is_none());
        let me = Worker::this_process(true);
        assert!(me.stasis_alive());
        assert!(!me.criu_alive(), "no CRIU recorded yet");
        let dead = Worker {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(!dead.stasis_alive(), "a reused pid is not the checkpointer");
    }

    #[test]
    fn lock_times_out_with_holder_named() {
        let dir = tempfile::tempdir().unwrap();
        let _held = ContainerLock::acquire(dir.path(), "c1", Duration::from_secs(1)).unwrap();
        let err = match ContainerLock::acquire(dir.path(), "c1", Duration::from_millis(50)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("second lock succeeded"),
        };
        assert!(err.contains("c1"), "{err}");
    }
}
