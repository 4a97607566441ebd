//! The store's private directories under faults: staging left by a
//! killed checkpoint is removed by the next checkpoint and by gc; a /dev/shm too
//! small for the image sends staging to the store's disk; damaged, incomplete and
//! half-built cache entries are rebuilt or removed (verify and gc see them); a
//! running restore pins its snapshot against `rm` and gc; `--copies` is bounded;
//! `prewarm` stops on SIGINT/SIGTERM and removes its container; an ingest that
//! fails on a full disk names a restore command that works, and with
//! `--leave-running` leaves nothing in /dev/shm.
//!
//! Interruptions use fault points (`STASIS_FAULT=NAME:kill|stop`), never sleeps.
//! Tests that look at /dev/shm run stasis in a private mount namespace with its
//! own tmpfs there, so other tests staging at the same time do not disturb them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{cgroups_named, unique_id, wait_stopped_at_fault, Out};
use crate::store_flows::{
    assert_fails, left_in_root, mounts_under, names_in, run_cmd, Sx, CMD, COUNTER,
};

/// Runs the shell `body` in a private mount namespace whose /dev/shm is a fresh
/// tmpfs of `size`; in `body`, `"$@"` is stasis with this test's root, CRIU and
/// `store`.
fn in_private_shm(sx: &Sx, store: &Path, size: &str, body: &str) -> Out {
    let script =
        format!("mount -t tmpfs -o size={size} stasis-test-shm /dev/shm || exit 99; {body}");
    let real = sx.command(Some(store), &[]);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ])
    .arg(real.get_program())
    .args(real.get_args());
    let out = run_cmd(cmd, CMD);
    assert_ne!(
        out.code,
        Some(99),
        "could not mount a private /dev/shm: {out:#?}"
    );
    out
}

fn staging_names(listing: &str) -> Vec<&str> {
    listing
        .lines()
        .filter(|l| l.contains("stasis-staging"))
        .collect()
}

/// A stasis command started in the background with stdout/stderr to files.
struct Bg {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Bg {
    fn spawn(sx: &Sx, env: &[(&str, &str)], args: &[&str]) -> Bg {
        let n = unique_id("bg");
        let (out, err) = (sx.path(&format!("{n}.out")), sx.path(&format!("{n}.err")));
        let mut cmd = sx.command(Some(&sx.store), args);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let child = cmd.spawn().expect("spawn stasis");
        Bg { child, out, err }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the exit: (code, stdout, stderr).
    fn wait(mut self) -> (Option<i32>, String, String) {
        let st = self.child.wait().expect("wait");
        (
            st.code(),
            fs::read_to_string(&self.out).unwrap_or_default(),
            fs::read_to_string(&self.err).unwrap_or_default(),
        )
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// The staging directory an error message names (`.../stasis-staging-XXXX`).
fn kept_staging(stderr: &str) -> Option<PathBuf> {
    let at = stderr.find("stasis-staging-")?;
    let start = stderr[..at]
        .rfind(|c: char| c.is_whitespace())
        .map_or(0, |i| i + 1);
    let end = at
        + stderr[at..]
            .find(|c: char| c == '/' || c.is_whitespace())
            .unwrap_or(stderr.len() - at);
    Some(PathBuf::from(&stderr[start..end]))
}

/// Removes a directory when dropped (a kept staging directory in /dev/shm).
struct RmDir(Option<PathBuf>);

impl Drop for RmDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = fs::remove_dir_all(d);
        }
    }
}

// ---------------------------------------------------------------------------
// Staging

#[test]
fn staging_left_by_a_killed_checkpoint_is_removed_by_the_next_checkpoint() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("fs-stage");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let body = format!(
        "STASIS_FAULT=staging.created:kill \"$@\" checkpoint --leave-running --tag a {id}; \
         echo killed=$?; ls -A /dev/shm; echo ---; \
         \"$@\" checkpoint --leave-running --tag b {id} >/dev/null || exit 3; ls -A /dev/shm"
    );
    let out = in_private_shm(&sx, &sx.store, "512m", &body);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let (before, after) = out.stdout.split_once("---").unwrap();
    assert!(before.contains("killed=137"), "{out:#?}");
    assert_eq!(staging_names(before).len(), 1, "{out:#?}");
    assert!(staging_names(after).is_empty(), "{out:#?}");
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
    assert_eq!(sx.ls().len(), 1);
}

#[test]
fn staging_on_the_store_disk_left_by_a_killed_checkpoint_is_removed_by_gc() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("fs-stagegc");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    // A 1 MiB /dev/shm has no room: staging goes to the store's tmp/.
    let body = format!(
        "STASIS_FAULT=staging.created:kill \"$@\" checkpoint --leave-running --tag a {id}; \
         echo killed=$?; ls -A /dev/shm"
    );
    let out = in_private_shm(&sx, &sx.store, "1m", &body);
    assert!(out.stdout.contains("killed=137"), "{out:#?}");
    assert!(staging_names(&out.stdout).is_empty(), "{out:#?}");
    let tmp = sx.store_tmp(&sx.store);
    assert!(
        tmp.len() == 1 && tmp[0].starts_with("stasis-staging-"),
        "{tmp:?}"
    );
    let gc = sx.ok(&["snapshot", "gc"]);
    assert!(gc.stdout.contains("1 temp file(s)"), "{gc:#?}");
    assert!(sx.store_tmp(&sx.store).is_empty());
    sx.ok(&["snapshot", "verify"]);
}

#[test]
fn a_checkpoint_larger_than_dev_shm_stages_on_the_store_disk() {
    let sx = setup!();
    // 40 MiB of random data in the container's own tmpfs: the image holds it.
    let b = sx.bundle(
        "b",
        &[
            "sh",
            "-c",
            &format!("head -c 41943040 /dev/urandom > /dev/shm/blob; {COUNTER}"),
        ],
    );
    let id = unique_id("fs-bigshm");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let body =
        format!("\"$@\" checkpoint --leave-running --tag big {id} || exit 3; ls -A /dev/shm");
    let out = in_private_shm(&sx, &sx.store, "16m", &body);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("(big)"), "{out:#?}");
    assert!(staging_names(&out.stdout).is_empty(), "{out:#?}");
    assert!(sx.store_tmp(&sx.store).is_empty());
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
}

// ---------------------------------------------------------------------------
// Caches

/// The one entry directory under `cache/<kind>/`.
fn cache_entry(sx: &Sx, kind: &str) -> PathBuf {
    let dir = sx.store.join("cache").join(kind);
    let names = names_in(&dir);
    assert_eq!(names.len(), 1, "cache/{kind}: {names:?}");
    assert_eq!(names[0].len(), 64, "keyed by the full id: {names:?}");
    dir.join(&names[0])
}

/// `checkpoint --leave-running --tag TAG` of a counter container; its guard.
fn tagged_counter(sx: &Sx, what: &str, tag: &str) -> crate::common::Container {
    let b = sx.bundle(what, &["sh", "-c", COUNTER]);
    let id = unique_id(what);
    let g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--leave-running", "--tag", tag, &id]);
    g
}

/// Restores `tag` as a new copy, checks it runs, deletes it.
#[track_caller]
fn restore_runs(sx: &Sx, tag: &str) {
    let id = unique_id("fs-copy");
    let g = sx.restore_from(tag, &id, &[]);
    sx.wait_counter(&id, "advanced", |n| n > 0);
    drop(g);
}

#[test]
fn damaged_cache_entries_are_rebuilt_and_verify_reports_them() {
    let sx = setup!();
    let _g = tagged_counter(&sx, "fs-cache", "c");
    restore_runs(&sx, "c");
    let img = cache_entry(&sx, "img");
    let base = cache_entry(&sx, "fs");
    // A deleted image, a deleted rootfs base: rebuilt by the next restore.
    fs::remove_dir_all(img.join("image")).unwrap();
    restore_runs(&sx, "c");
    fs::remove_dir_all(base.join("rootfs")).unwrap();
    restore_runs(&sx, "c");
    // A tampered image file: the restore rebuilds the entry instead of handing
    // CRIU a bad image.
    let pages = img.join("image/pages-1.img");
    let mut bytes = fs::read(&pages).unwrap();
    bytes[..16].copy_from_slice(&[0xAA; 16]);
    fs::write(&pages, &bytes).unwrap();
    restore_runs(&sx, "c");
    // Tampered again: verify finds it, removes the entry and says so.
    let mut bytes = fs::read(&pages).unwrap();
    bytes[..16].copy_from_slice(&[0x55; 16]);
    fs::write(&pages, &bytes).unwrap();
    let v = sx.ok(&["snapshot", "verify"]);
    assert!(
        v.stdout.contains("cached image of snapshot") && v.stdout.contains("was damaged"),
        "{v:#?}"
    );
    assert!(!img.join("image").exists() && !img.join(".complete-image").exists());
    restore_runs(&sx, "c");
    // A healthy cache verifies clean, its data too.
    let v = sx.ok(&["snapshot", "verify", "--read-data"]);
    assert!(!v.stdout.contains("cache"), "{v:#?}");
}

#[test]
fn a_restore_killed_while_building_the_cache_leaves_a_temp_that_gc_and_verify_remove() {
    let sx = setup!();
    let _g = tagged_counter(&sx, "fs-cachekill", "k");
    for cleaner in [&["snapshot", "gc"][..], &["snapshot", "verify"][..]] {
        let id = unique_id("fs-killed");
        let _c = sx.guard(&id);
        let bg = Bg::spawn(
            &sx,
            &[("STASIS_FAULT", "cache.before-commit:kill")],
            &["restore", "-d", "--from", "k", &id],
        );
        let (code, _, err) = bg.wait();
        assert_eq!(code, None, "killed at the fault point: {err}");
        let img = cache_entry(&sx, "img");
        let temps: Vec<String> = names_in(&img)
            .into_iter()
            .filter(|n| n.starts_with(".tmp-image-"))
            .collect();
        assert_eq!(temps.len(), 1, "{:?}", names_in(&img));
        let out = sx.ok(cleaner);
        let left: Vec<String> = names_in(&img)
            .into_iter()
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(left.is_empty(), "{left:?} after {cleaner:?}: {out:#?}");
    }
    restore_runs(&sx, "k");
}

// ---------------------------------------------------------------------------
// Restore pins its snapshot

#[test]
fn a_running_restore_pins_its_snapshot_against_rm_and_gc() {
    let sx = setup!();
    let _g = tagged_counter(&sx, "fs-pin", "p");
    let id = unique_id("fs-pinned");
    let _c = sx.guard(&id);
    let bg = Bg::spawn(
        &sx,
        &[("STASIS_FAULT", "restore.after-prepare:stop")],
        &["restore", "-d", "--from", "p", &id],
    );
    wait_stopped_at_fault(bg.pid().as_raw() as u32, Duration::from_secs(30));
    // While the restore is parked, rm and gc wait for it (and time out here).
    for args in [&["snapshot", "rm", "p"][..], &["snapshot", "gc"][..]] {
        let mut cmd = sx.command(Some(&sx.store), args);
        cmd.env("STASIS_LOCK_TIMEOUT", "1");
        let out = run_cmd(cmd, CMD);
        assert_fails(&out, &["timed out", "lock"]);
    }
    kill(bg.pid(), Signal::SIGCONT).unwrap();
    let (code, _, err) = bg.wait();
    assert_eq!(code, Some(0), "{err}");
    sx.wait_counter(&id, "advanced", |n| n > 0);
    // Afterwards they go through.
    sx.ok(&["snapshot", "rm", "p"]);
    sx.ok(&["snapshot", "gc"]);
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
}

// ---------------------------------------------------------------------------
// --copies

#[test]
fn copies_out_of_range_are_refused_and_leave_nothing() {
    let sx = setup!();
    for n in ["0", "100000"] {
        let id = unique_id("fs-copies");
        let out = sx.run(&["restore", "-d", "--from", "nosuch", "--copies", n, &id]);
        assert_fails(
            &out,
            &[&format!("--copies {n} is out of range"), "1 to 1000"],
        );
        assert!(sx.state(&id).is_none() && sx.state(&format!("{id}-0")).is_none());
    }
    assert!(
        names_in(&sx.env.root).iter().all(|n| n.starts_with('.')),
        "{:?}",
        names_in(&sx.env.root)
    );
}

/// Removes a cgroup directory when dropped (once its processes are gone).
struct RmCgroup(PathBuf);

impl Drop for RmCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn many_copies_restore_in_a_pids_limited_cgroup() {
    let sx = setup!();
    let _g = tagged_counter(&sx, "fs-pids", "m");
    let cg = Path::new("/sys/fs/cgroup/pids").join(unique_id("stasis-test-pids"));
    fs::create_dir(&cg).unwrap();
    let _cg = RmCgroup(cg.clone());
    fs::write(cg.join("pids.max"), "30").unwrap();
    let prefix = unique_id("fs-many");
    let ids: Vec<String> = (0..12).map(|i| format!("{prefix}-{i}")).collect();
    let guards: Vec<_> = ids.iter().map(|i| sx.guard(i)).collect();
    let real = sx.command(
        Some(&sx.store),
        &[
            "restore",
            "-d",
            "--from",
            "m",
            "--copies",
            "12",
            "--name-prefix",
            &prefix,
        ],
    );
    let script = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cg.display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh"])
        .arg(real.get_program())
        .args(real.get_args());
    let out = crate::store_flows::Proc::spawn(cmd, false).wait(CMD);
    // Restored 4 at a time, all fit (unbounded, 5 of 12 failed with EAGAIN
    // spawning CRIU; with more copies, spawning threads panicked).
    assert_eq!(out.code, Some(0), "{out:#?}");
    for id in &ids {
        assert_eq!(sx.state(id).expect(id)["status"], "running", "{id}");
    }
    drop(guards);
    let left: Vec<String> = left_in_root(&sx)
        .into_iter()
        .filter(|n| n.contains(&prefix))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(mounts_under(&sx.env.root).is_empty());
}

// ---------------------------------------------------------------------------
// prewarm and signals

#[test]
fn prewarm_stops_on_sigint_and_sigterm_and_removes_its_container() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        let id = unique_id("fs-prewarm");
        let _c = sx.guard(&id);
        let bg = Bg::spawn(
            &sx,
            &[("STASIS_FAULT", "prewarm.started:stop")],
            &[
                "prewarm",
                "--bundle",
                b.to_str().unwrap(),
                "--ready",
                "file:/never",
                "--ready-timeout",
                "60s",
                "--tag",
                "w",
                "--id",
                &id,
            ],
        );
        wait_stopped_at_fault(bg.pid().as_raw() as u32, Duration::from_secs(30));
        assert_eq!(sx.state(&id).unwrap()["status"], "running");
        kill(bg.pid(), sig).unwrap();
        kill(bg.pid(), Signal::SIGCONT).unwrap();
        let (code, _, err) = bg.wait();
        assert_eq!(code, Some(1), "{sig:?}: {err}");
        assert!(
            err.contains(&format!("stopped by {}", sig.as_str())),
            "{err}"
        );
        assert!(sx.state(&id).is_none(), "{id} left after {sig:?}");
        assert!(cgroups_named(&id).is_empty(), "cgroups of {id} left");
    }
    assert!(sx.ls().is_empty());
}

#[test]
fn prewarm_stopped_during_its_warmup_kills_it_and_removes_the_container() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", "while :; do sleep 1000; done"]);
    let id = unique_id("fs-warmup");
    let _c = sx.guard(&id);
    let bg = Bg::spawn(
        &sx,
        &[],
        &[
            "prewarm",
            "--bundle",
            b.to_str().unwrap(),
            "--ready",
            "file:/",
            "--warmup",
            "sleep 1001",
            "--tag",
            "w",
            "--id",
            &id,
        ],
    );
    let warming = || {
        sx.state(&id).is_some()
            && sx.env.pids(&id).iter().any(|p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.windows(4).any(|w| w == b"1001"))
            })
    };
    crate::common::wait_until("the warm-up to run", Duration::from_secs(30), warming);
    kill(bg.pid(), Signal::SIGTERM).unwrap();
    let (code, _, err) = bg.wait();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "{err}");
    assert!(sx.state(&id).is_none(), "{id} left");
    assert!(cgroups_named(&id).is_empty(), "cgroups of {id} left");
    assert!(sx.ls().is_empty());
}

// ---------------------------------------------------------------------------
// An ingest that fails on a full disk

/// Unmounts the small tmpfs even when the test fails.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A 4 MiB tmpfs as a store, and a running container with 8 MiB of random data
/// in memory: its snapshot cannot fit.
fn full_store_and_container(sx: &Sx, what: &str) -> (PathBuf, TmpfsMount, String, PathBuf) {
    let store = sx.path(&format!("{what}-store"));
    fs::create_dir_all(&store).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&store)
        .status()
        .unwrap();
    assert!(st.success(), "mount a small tmpfs at {}", store.display());
    let m = TmpfsMount(store.clone());
    let b = sx.bundle(
        what,
        &[
            "sh",
            "-c",
            &format!("head -c 8388608 /dev/urandom > /dev/shm/blob; {COUNTER}"),
        ],
    );
    let id = unique_id(what);
    (store, m, id, b)
}

#[test]
fn a_failed_ingest_with_leave_running_leaves_nothing_in_dev_shm() {
    let sx = setup!();
    let (store, _m, id, b) = full_store_and_container(&sx, "fs-fullrun");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let body =
        format!("\"$@\" checkpoint --leave-running --tag full {id}; echo rc=$?; ls -A /dev/shm");
    let out = in_private_shm(&sx, &store, "512m", &body);
    assert!(out.stdout.contains("rc=1"), "{out:#?}");
    assert!(
        out.stderr.contains("No space left on device")
            && out.stderr.contains("runs on (nothing was stored)"),
        "{out:#?}"
    );
    assert!(staging_names(&out.stdout).is_empty(), "{out:#?}");
    assert_eq!(sx.state(&id).unwrap()["status"], "running");
}

#[test]
fn a_failed_ingest_names_a_restore_command_that_works() {
    let sx = setup!();
    let (store, _m, id, b) = full_store_and_container(&sx, "fs-fullstop");
    let g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    // --link-remap: CRIU itself stops the tasks at the end of the dump (stasis
    // defers the stop until the commit only without it), so the image is all
    // that is left of the container when the ingest fails.
    let out = sx.run_in(
        &store,
        &["checkpoint", "--link-remap", "--tag", "full", &id],
    );
    // Removed at the end even when an assertion fails.
    let kept = RmDir(kept_staging(&out.stderr));
    assert_fails(&out, &["No space left on device", "--bundle"]);
    // `stasis delete ID && stasis restore --image-path IMAGE --bundle BUNDLE ID`,
    // then remove DIR.
    let cmd = out
        .stderr
        .split('`')
        .nth(1)
        .expect("a command in backticks");
    let named = out
        .stderr
        .rsplit_once("then remove ")
        .map(|(_, d)| PathBuf::from(d.trim()));
    assert_eq!(named, kept.0, "{out:#?}");
    let (delete, restore) = cmd.split_once("&&").expect("two commands");
    let delete: Vec<&str> = delete.split_whitespace().collect();
    let restore: Vec<&str> = restore.split_whitespace().collect();
    assert_eq!(delete, ["stasis", "delete", id.as_str()], "{cmd}");
    assert_eq!(&restore[..2], ["stasis", "restore"], "{cmd}");
    assert_eq!(restore.last(), Some(&id.as_str()), "{cmd}");
    assert_eq!(
        sx.state(&id).unwrap()["status"],
        "stopped",
        "the dump stopped {id}"
    );
    sx.ok(&delete[1..]);
    // Detached, so the test does not wait for the container to exit.
    let mut args = vec!["restore", "-d"];
    args.extend_from_slice(&restore[2..]);
    sx.run_starting(&store, &args).expect_ok();
    sx.assert_carries_on(&id, &before);
    let kept_dir = kept.0.clone().expect("a directory to remove");
    assert!(kept_dir.join("image").is_dir(), "{}", kept_dir.display());
    drop(g);
}

#[test]
fn killed_during_ingest_after_criu_stopped_the_tasks_keeps_the_image_for_verify_and_restore() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("fs-ownstop");
    let g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    // --link-remap: CRIU itself stops the tasks once the image is complete, so
    // from then on the image is all that is left of the container.
    let bg = Bg::spawn(
        &sx,
        &[("STASIS_FAULT", "checkpoint.ingest:kill")],
        &["checkpoint", "--link-remap", "--tag", "own", &id],
    );
    let (code, _, err) = bg.wait();
    assert_eq!(code, None, "killed at the fault point: {err}");
    // verify lists the kept image with the command that restores it; gc keeps it.
    let v = sx.run(&["snapshot", "verify"]);
    let kept = RmDir(kept_staging(&v.stdout));
    let dir = kept
        .0
        .clone()
        .unwrap_or_else(|| panic!("no kept image: {v:#?}"));
    assert!(v.stdout.contains("restore it with"), "{v:#?}");
    sx.ok(&["snapshot", "gc"]);
    assert!(dir.join("image").is_dir(), "gc removed {}", dir.display());
    // Restored from it, the workload carries on.
    sx.run(&["delete", "--force", &id]).expect_ok();
    let img = dir.join("image");
    let args = [
        "restore",
        "-d",
        "--image-path",
        img.to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        &id,
    ];
    sx.run_starting(&sx.store, &args).expect_ok();
    sx.assert_carries_on(&id, &before);
    drop(g);
}
