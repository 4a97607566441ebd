//! Fault matrix of checkpoint: `stasis checkpoint` SIGKILLs itself at a fault
//! point (`STASIS_FAULT=NAME:kill`), with and without --leave-running and --tag,
//! and afterwards the container must run on, thawed, with its workload's state
//! (the next command on it undoes the freeze of the dead checkpointer), or a
//! committed snapshot must restore it with the same data; a new checkpoint and
//! restore must work.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{cgroup_dir, read_trim, unique_id, wait_until, Container, Out};
use crate::store_flows::{printed_snapshot_id, Proc, Sx, CMD, COUNTER};

/// The command that first touches the container after the killed checkpoint.
#[derive(Debug, Clone, Copy)]
enum Touch {
    State,
    List,
    Resume,
    Exec,
}

fn setup(test: &str) -> Option<Sx> {
    Sx::setup(test)
}

/// Runs `stasis ARGS` on the test's store with `STASIS_FAULT=FAULT`.
fn run_with_fault(sx: &Sx, fault: &str, args: &[&str]) -> Out {
    let mut cmd: Command = sx.command(Some(&sx.store), args);
    cmd.env("STASIS_FAULT", fault);
    Proc::spawn(cmd, true).wait(CMD)
}

/// `freezer.state` of the cgroup of `pid` ("THAWED", "FROZEN", "FREEZING").
fn freezer_state(pid: i32) -> String {
    read_trim(&cgroup_dir(pid, "freezer").join("freezer.state"))
}

/// Starts the counter workload as `id` and waits until it counts.
fn start_counter(sx: &Sx, tag: &str) -> (PathBuf, String, Container, i32) {
    let bundle = sx.bundle(&format!("b-{tag}"), &["sh", "-c", COUNTER]);
    let id = unique_id(tag);
    let g = sx.run_d(&bundle, &id);
    sx.wait_counter(&id, "started", |n| n > 2);
    let pid = sx.pid(&id);
    (bundle, id, g, pid)
}

/// Touches container `id` with `how`, asserting the command succeeds.
#[track_caller]
fn touch(sx: &Sx, id: &str, how: Touch) {
    match how {
        Touch::State => {
            sx.ok(&["state", id]);
        }
        Touch::List => {
            let out = sx.ok(&["list", "--format", "json"]);
            let v = out.json();
            let found = v
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c["id"] == id && c["status"] == "running"));
            assert!(found, "list does not show {id} running: {v}");
        }
        Touch::Resume => {
            sx.ok(&["resume", id]);
        }
        Touch::Exec => {
            sx.ok(&["exec", id, "true"]);
        }
    }
}

/// After a killed checkpoint that left the container frozen: `how` thaws it, it
/// runs on with its own counter, and `state`/`list` say running.
#[track_caller]
fn assert_recovered(sx: &Sx, id: &str, pid: i32, how: Touch) {
    assert_eq!(
        freezer_state(pid),
        "FROZEN",
        "the killed checkpoint should have left {id} frozen (did the fault point fire?)"
    );
    touch(sx, id, how);
    assert_eq!(
        freezer_state(pid),
        "THAWED",
        "{how:?} did not thaw the container a dead checkpointer froze"
    );
    let st = sx.state(id).expect("container still exists");
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["pid"].as_i64(), Some(pid as i64), "{st}");
    let seen = sx.wait_counter(id, "readable", |_| true);
    sx.wait_counter(id, "advancing after the thaw", |n| n > seen.1);
    // The record is gone: `resume` of a running container is refused again.
    let out = sx.run(&["resume", id]);
    assert_ne!(out.code, Some(0), "resume of a running container: {out:?}");
}

/// A fresh checkpoint of `id` (stopping it) and a restore under a new id carry
/// the workload on.
#[track_caller]
fn assert_checkpoint_restore_works(sx: &Sx, bundle: &Path, id: &str, tagged: bool) {
    let before = sx.wait_counter(id, "readable", |_| true);
    let id2 = format!("{id}-r");
    let g2 = sx.guard(&id2);
    if tagged {
        let out = sx.ok(&["checkpoint", "--tag", "again", id]);
        printed_snapshot_id(&out);
        sx.run_starting(&sx.store, &["restore", "-d", "--from", "again", &id2])
            .expect_ok();
    } else {
        let img = sx.path(&format!("img-again-{id}"));
        sx.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), id]);
        let args = [
            "restore",
            "-d",
            "--image-path",
            img.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            &id2,
        ];
        sx.run_starting(&sx.store, &args).expect_ok();
    }
    assert!(sx.state(id).is_none(), "{id} still exists after checkpoint");
    sx.assert_carries_on(&id2, &before);
    drop(g2);
}

/// `checkpoint [--leave-running] (--tag T | --image-path P) ID` killed at `point`.
fn kill_checkpoint_at(sx: &Sx, point: &str, id: &str, leave_running: bool, tagged: bool) {
    let img = sx.path(&format!("img-{id}"));
    let mut args = vec!["checkpoint"];
    if leave_running {
        args.push("--leave-running");
    }
    if tagged {
        args.extend(["--tag", "killed"]);
    } else {
        args.extend(["--image-path", img.to_str().unwrap()]);
    }
    args.push(id);
    let out = run_with_fault(sx, &format!("{point}:kill"), &args);
    assert_eq!(out.code, Some(137), "not killed at {point}: {out:?}");
}

/// The whole case: kill at `point`, recover with `how`, checkpoint and restore.
fn case(test: &str, point: &str, leave_running: bool, tagged: bool, how: Touch) {
    let Some(sx) = setup(test) else {
        return;
    };
    let (bundle, id, _g, pid) = start_counter(&sx, "fk");
    kill_checkpoint_at(&sx, point, &id, leave_running, tagged);
    assert_recovered(&sx, &id, pid, how);
    if tagged {
        let ls = sx.ls();
        assert!(ls.is_empty(), "a snapshot was committed: {ls:?}");
    }
    assert_checkpoint_restore_works(&sx, &bundle, &id, tagged);
}

#[test]
fn killed_while_frozen_is_thawed_by_state() {
    case(
        test_name!(),
        "checkpoint.frozen",
        false,
        false,
        Touch::State,
    );
}

#[test]
fn killed_while_frozen_leave_running_is_thawed_by_list() {
    case(test_name!(), "checkpoint.frozen", true, false, Touch::List);
}

#[test]
fn killed_while_frozen_tagged_is_thawed_by_resume() {
    case(
        test_name!(),
        "checkpoint.frozen",
        false,
        true,
        Touch::Resume,
    );
}

#[test]
fn killed_while_frozen_tagged_leave_running_is_thawed_by_exec() {
    case(test_name!(), "checkpoint.frozen", true, true, Touch::Exec);
}

#[test]
fn killed_after_dump_leave_running_is_thawed_by_resume() {
    case(
        test_name!(),
        "checkpoint.after-dump",
        true,
        false,
        Touch::Resume,
    );
}

#[test]
fn killed_after_dump_tagged_leave_running_is_thawed_by_state() {
    case(
        test_name!(),
        "checkpoint.after-dump",
        true,
        true,
        Touch::State,
    );
}

/// A user's `pause` is not a checkpointer's freeze: a paused container whose
/// checkpoint was killed stays paused until the user resumes it.
#[test]
fn killed_checkpoint_of_paused_container_stays_paused() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (_bundle, id, _g, pid) = start_counter(&sx, "fp");
    sx.ok(&["pause", &id]);
    kill_checkpoint_at(&sx, "checkpoint.after-dump", &id, true, false);
    sx.ok(&["state", &id]);
    assert_eq!(freezer_state(pid), "FROZEN");
    assert_eq!(sx.state(&id).expect("exists")["status"], "paused");
    sx.ok(&["resume", &id]);
    assert_eq!(freezer_state(pid), "THAWED");
    let seen = sx.wait_counter(&id, "readable", |_| true);
    sx.wait_counter(&id, "advancing after resume", |n| n > seen.1);
}

/// Without --leave-running and --tag, CRIU itself stops the tasks once the image
/// is complete: killed after that, the container is gone but its image restores.
#[test]
fn killed_after_dump_without_leave_running_keeps_a_restorable_image() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (bundle, id, _g, _pid) = start_counter(&sx, "fi");
    let before = sx.wait_counter(&id, "readable", |_| true);
    kill_checkpoint_at(&sx, "checkpoint.after-dump", &id, false, false);
    let st = sx.state(&id).expect("the record stays until delete");
    assert_eq!(st["status"], "stopped", "{st}");
    sx.ok(&["delete", &id]);
    let img = sx.path(&format!("img-{id}"));
    let id2 = format!("{id}-r");
    let _g2 = sx.guard(&id2);
    let args = [
        "restore",
        "-d",
        "--image-path",
        img.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        &id2,
    ];
    sx.run_starting(&sx.store, &args).expect_ok();
    sx.assert_carries_on(&id2, &before);
}

// ---------------------------------------------------------------------------
// `checkpoint --tag` without --leave-running: the container is stopped only after
// the snapshot is committed; until then it stays frozen, and a dead checkpointer's
// freeze is undone by the next command.

#[test]
fn killed_after_dump_tagged_keeps_the_container_and_is_thawed_by_state() {
    case(
        test_name!(),
        "checkpoint.after-dump",
        false,
        true,
        Touch::State,
    );
}

#[test]
fn killed_during_ingest_tagged_keeps_the_container_and_the_store_valid() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (bundle, id, _g, pid) = start_counter(&sx, "fg");
    kill_checkpoint_at(&sx, "checkpoint.ingest", &id, false, true);
    assert_recovered(&sx, &id, pid, Touch::Exec);
    let ls = sx.ls();
    assert!(ls.is_empty(), "a snapshot was committed: {ls:?}");
    sx.ok(&["snapshot", "verify"]);
    assert_checkpoint_restore_works(&sx, &bundle, &id, true);
    sx.ok(&["snapshot", "verify"]);
}

/// Killed after the commit, before the stop: the snapshot exists and restores the
/// workload; the original container is left frozen, then thawed by the next
/// command and runs on (two instances: acceptable, the snapshot is not lost).
#[test]
fn killed_after_commit_tagged_leaves_a_restorable_snapshot() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (_bundle, id, _g, pid) = start_counter(&sx, "fc");
    let before = sx.wait_counter(&id, "readable", |_| true);
    kill_checkpoint_at(&sx, "checkpoint.after-commit", &id, false, true);
    let ls = sx.ls();
    assert_eq!(ls.len(), 1, "the committed snapshot: {ls:?}");
    sx.ok(&["snapshot", "verify"]);
    assert_recovered(&sx, &id, pid, Touch::State);
    let id2 = format!("{id}-r");
    let _g2 = sx.restore_from("killed", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
}

/// An ingest that fails (a store on a full tmpfs) no longer costs the container:
/// it was never stopped and runs on, and the error says so.
#[test]
fn failed_ingest_without_leave_running_keeps_the_container_running() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let store = sx.path("small-store");
    std::fs::create_dir_all(&store).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(st.success(), "mount a small tmpfs at {}", store.display());
    let _m = Unmount(store.clone());
    // Incompressible memory the 4 MiB store cannot hold.
    let script = format!("head -c 8388608 /dev/urandom > /dev/shm/blob; {COUNTER}");
    let bundle = sx.bundle("b", &["sh", "-c", &script]);
    let id = unique_id("fn");
    let _g = sx.run_d(&bundle, &id);
    let seen = sx.wait_counter(&id, "started", |n| n > 2);
    let out = sx.run_in(&store, &["checkpoint", "--tag", "full", &id]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("runs on") && out.stderr.contains(&id),
        "the error does not say the container runs on: {out:?}"
    );
    let st = sx.state(&id).expect("the container still exists");
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(freezer_state(sx.pid(&id)), "THAWED");
    sx.wait_counter(&id, "advancing after the failed checkpoint", |n| n > seen.1);
}

/// Lazily unmounts a test's tmpfs even when the test fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `kill` reaches a container a dead checkpointer froze: frozen tasks would keep
/// the signal pending forever, so it is thawed first and the signal stops it.
#[test]
fn killed_while_frozen_then_kill_stops_it() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (_bundle, id, _g, pid) = start_counter(&sx, "fs");
    kill_checkpoint_at(&sx, "checkpoint.frozen", &id, false, true);
    assert_eq!(freezer_state(pid), "FROZEN");
    sx.ok(&["kill", &id, "KILL"]);
    crate::common::wait_until(
        "the killed container to stop",
        std::time::Duration::from_secs(10),
        || sx.state(&id).is_some_and(|s| s["status"] == "stopped"),
    );
    sx.ok(&["delete", &id]);
    assert!(sx.state(&id).is_none());
}

/// SIGKILL from outside while CRIU writes the memory image: CRIU outlives stasis
/// until its next notification, rolls the dump back and re-freezes the cgroup it
/// found frozen. `state` waits for that CRIU (recorded in the state file), then
/// thaws the container, which carries on.
#[test]
fn sigkill_mid_dump_is_thawed_once_the_orphaned_criu_is_done() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    // ~200 MiB of memory, so the dump takes long enough to be caught writing.
    let script =
        format!("x=$(head -c 150000000 /dev/urandom | base64); echo ready > /tmp/ready; {COUNTER}");
    let bundle = sx.bundle("b", &["sh", "-c", &script]);
    let id = unique_id("fm");
    let _g = sx.run_d(&bundle, &id);
    sx.wait_counter(&id, "started", |n| n > 2);
    let pid = sx.pid(&id);
    let checkpoint = Proc::spawn(
        sx.command(Some(&sx.store), &["checkpoint", "--tag", "mid", &id]),
        true,
    );
    // CRIU's pid, from the checkpointer record, then a pages image it is writing.
    let state_file = sx.env.root.join(&id).join("stasis.json");
    let mut criu_pid = 0;
    wait_until("the checkpointer to record its CRIU", CMD, || {
        let v: serde_json::Value = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        criu_pid = v["checkpointer"]["criu_pid"].as_i64().unwrap_or(0) as i32;
        criu_pid > 0
    });
    wait_until("CRIU to write 20 MB of pages", CMD, || {
        std::fs::read_dir(format!("/proc/{criu_pid}/fd"))
            .map(|rd| {
                rd.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| {
                        t.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
                            && std::fs::metadata(&t).is_ok_and(|m| m.len() > 20 << 20)
                    })
                })
            })
            .unwrap_or(false)
    });
    // SAFETY: kill(2) of our own child's pid (not yet reaped, so not reused).
    unsafe { libc::kill(checkpoint.pid() as i32, libc::SIGKILL) };
    let out = checkpoint.wait(CMD);
    assert_eq!(out.code, Some(137), "{out:?}");
    let st = sx.state(&id).expect("the container is still there");
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(freezer_state(pid), "THAWED");
    let seen = sx.wait_counter(&id, "readable", |_| true);
    sx.wait_counter(&id, "advancing after the thaw", |n| n > seen.1);
    assert!(sx.ls().is_empty(), "no snapshot was committed");
}

/// With --tcp-established CRIU stops the tasks itself (it unlocks the network
/// at the end of a leave-running dump); the image is still ingested before the
/// container is removed, and the snapshot restores.
#[test]
fn tagged_tcp_established_checkpoint_lets_criu_stop_the_tasks_and_restores() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let (_bundle, id, _g, _pid) = start_counter(&sx, "ft");
    let before = sx.wait_counter(&id, "readable", |_| true);
    sx.ok(&["checkpoint", "--tcp-established", "--tag", "tcp", &id]);
    assert!(
        sx.state(&id).is_none(),
        "{id} still exists after checkpoint"
    );
    let id2 = format!("{id}-r");
    let _g2 = sx.restore_from("tcp", &id2, &["--tcp-established"]);
    sx.assert_carries_on(&id2, &before);
}

/// A filesystem capture that fails while the container is frozen (here: the
/// host directory of its volume is renamed after the dump) is reported as that,
/// naming the container and saying nothing was stored; the container is thawed
/// and runs on, and no snapshot is committed.
#[test]
fn a_failed_capture_names_the_container_and_leaves_it_running() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use std::process::Stdio;
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let vol = sx.path("vol-cf");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("f"), b"x").unwrap();
    let bundle = sx.bundle("b-cf", &["sh", "-c", COUNTER]);
    crate::common::add_bind(&bundle, &vol, "/data");
    let id = unique_id("cf");
    let _g = sx.run_d(&bundle, &id);
    let before = sx.wait_counter(&id, "started", |n| n > 2);
    let mut cmd = sx.command(Some(&sx.store), &["checkpoint", "--tag", "cf", &id]);
    cmd.env("STASIS_FAULT", "checkpoint.after-dump:stop")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn stasis");
    let pid = child.id();
    crate::common::wait_stopped_at_fault(pid, std::time::Duration::from_secs(60));
    // The capture that follows the dump stats the volume's host directory.
    std::fs::rename(&vol, sx.path("vol-cf-moved")).unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    let out = child.wait_with_output().expect("wait for stasis");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the checkpoint succeeded: {err}");
    assert!(
        err.contains(&format!(
            "checkpoint of container {id}: capturing its filesystem while it was frozen failed"
        )) && err.contains("nothing was stored"),
        "{err}"
    );
    assert!(
        sx.ls().is_empty(),
        "a snapshot was committed: {:?}",
        sx.ls()
    );
    sx.wait_counter(&id, "advancing after the failed capture", |n| n > before.1);
}
