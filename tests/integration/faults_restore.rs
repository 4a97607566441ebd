//! Fault matrix of restore: `stasis restore --from` SIGKILLs itself at a fault
//! point (`STASIS_FAULT=NAME:kill`). Afterwards the half-restored container is
//! either listed (status `restoring`) and `delete --force` removes everything it
//! left (processes in its cgroup, mounts, cgroups, directories), or nothing was
//! recorded yet and the next restore under the same id cleans up and succeeds.

use std::fs;
use std::path::PathBuf;

use crate::common::{cgroups_named, unique_id, Container, Out};
use crate::store_flows::{left_in_root, mounts_under, Proc, Sx, CMD, COUNTER};

/// A running counter container checkpointed (left running) as snapshot `snap`.
fn snapshot_of_counter(sx: &Sx) -> (String, Container, (String, u64)) {
    let bundle = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("fr");
    let g = sx.run_d(&bundle, &id);
    let before = sx.wait_counter(&id, "started", |n| n > 2);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "snap", &id]);
    (id, g, before)
}

/// `restore -d --from snap ID` with `STASIS_FAULT=POINT:kill`, asserting it died.
fn killed_restore(sx: &Sx, point: &str, id: &str) {
    let mut cmd = sx.command(Some(&sx.store), &["restore", "-d", "--from", "snap", id]);
    cmd.env("STASIS_FAULT", format!("{point}:kill"));
    let out: Out = Proc::spawn(cmd, false).wait(CMD);
    assert_eq!(out.code, Some(137), "not killed at {point}: {out:?}");
}

/// Pids in the cgroups named after `id` (memory and pids hierarchies).
fn pids_in_cgroups_of(id: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = cgroups_named(id)
        .iter()
        .flat_map(|d| {
            fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Nothing of `id` is left: no state, directory, mount, cgroup or process.
#[track_caller]
fn assert_nothing_left(sx: &Sx, id: &str, pids: &[i32]) {
    assert!(sx.state(id).is_none(), "{id} still exists");
    let left: Vec<String> = left_in_root(sx)
        .into_iter()
        .filter(|n| n.contains(id))
        .collect();
    assert!(left.is_empty(), "left in --root: {left:?}");
    let mounts = mounts_under(&sx.env.root);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let cgroups = cgroups_named(id);
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    for p in pids {
        assert!(
            !PathBuf::from(format!("/proc/{p}")).exists()
                || fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| s
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))),
            "process {p} of the killed restore still runs"
        );
    }
}

/// Killed at `point` after the container was recorded: it is listed as
/// restoring, `delete --force` removes all it left, and a new restore under the
/// same id carries the workload on.
fn recorded_case(test: &str, point: &str, expect_processes: Option<bool>) {
    let Some(sx) = Sx::setup(test) else {
        return;
    };
    let (id, _g, before) = snapshot_of_counter(&sx);
    let id2 = format!("{id}-r");
    let _guard = sx.guard(&id2);
    killed_restore(&sx, point, &id2);
    let st = sx.state(&id2).expect("the killed restore is recorded");
    assert_eq!(st["status"], "restoring", "{st}");
    let list = sx.ok(&["list", "--format", "json"]).json();
    let listed = list.as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c["id"] == id2.as_str() && c["status"] == "restoring")
    });
    assert!(listed, "list does not show {id2} restoring: {list}");
    let pids = pids_in_cgroups_of(&id2);
    if let Some(want) = expect_processes {
        assert_eq!(
            !pids.is_empty(),
            want,
            "processes in the cgroups of {id2}: {pids:?}"
        );
    }
    // Refused without --force, with a hint.
    let out = sx.run(&["delete", &id2]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("delete --force"), "{out:?}");
    sx.ok(&["delete", "--force", &id2]);
    assert_nothing_left(&sx, &id2, &pids);
    // The id is free again.
    let g2 = sx.restore_from("snap", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
    drop(g2);
}

#[test]
fn killed_before_criu_is_listed_and_force_deleted() {
    recorded_case(test_name!(), "restore.before-criu", Some(false));
}

#[test]
fn killed_after_criu_is_listed_and_force_deleted_with_its_processes() {
    recorded_case(test_name!(), "restore.after-criu", Some(true));
}

/// Killed at CRIU's post-restore notification, while CRIU waits for the answer.
#[test]
fn killed_during_criu_is_listed_and_force_deleted() {
    recorded_case(test_name!(), "restore.during-criu", None);
}

/// Killed after the overlay was mounted, before the container was recorded: the
/// next restore under that id removes the leftover and succeeds.
#[test]
fn killed_after_overlay_the_next_restore_of_the_id_works() {
    let Some(sx) = Sx::setup(test_name!()) else {
        return;
    };
    let (id, _g, before) = snapshot_of_counter(&sx);
    let id2 = format!("{id}-r");
    let _guard = sx.guard(&id2);
    killed_restore(&sx, "restore.after-overlay", &id2);
    assert!(
        !mounts_under(&sx.env.root).is_empty(),
        "the killed restore should have left its overlay mounted"
    );
    let g2 = sx.restore_from("snap", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
    sx.ok(&["delete", "--force", &id2]);
    assert_nothing_left(&sx, &id2, &[]);
    drop(g2);
}

/// Killed after the overlay was mounted, before the container was recorded:
/// `list` (which shows no such container) removes the orphaned overlay and
/// private directory; nothing is left for an operator to find by hand.
#[test]
fn killed_after_overlay_the_orphan_is_removed_by_list() {
    let Some(sx) = Sx::setup(test_name!()) else {
        return;
    };
    let (_id, _g, _before) = snapshot_of_counter(&sx);
    let id2 = unique_id("fr-orphan");
    let _guard = sx.guard(&id2);
    killed_restore(&sx, "restore.after-overlay", &id2);
    assert!(
        !mounts_under(&sx.env.root).is_empty(),
        "the killed restore should have left its overlay mounted"
    );
    let list = sx.ok(&["list", "-q"]);
    assert!(!list.stdout.contains(&id2), "{list:#?}");
    assert_nothing_left(&sx, &id2, &[]);
}
