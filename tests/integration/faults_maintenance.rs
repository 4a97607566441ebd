//! Store maintenance under faults (the fault matrix): `snapshot gc`, `prune`
//! and `import` SIGKILLed at a fault point (`STASIS_FAULT=NAME:kill`, never a
//! sleep) leave a store that verifies, whose snapshots restore with their data,
//! where the next gc frees what the killed command left, and where the same
//! command then succeeds.

use std::path::Path;

use crate::common::{unique_id, Out};
use crate::store_flows::{run_cmd, Sx, CMD, COUNTER};

/// Runs `stasis ARGS` on `store` with `STASIS_FAULT=point:kill` and asserts it
/// died of SIGKILL there (the harness reports a signal N as 128+N).
#[track_caller]
fn killed_at(sx: &Sx, store: &Path, point: &str, args: &[&str]) {
    let mut cmd = sx.command(Some(store), args);
    cmd.env("STASIS_FAULT", format!("{point}:kill"));
    let out: Out = run_cmd(cmd, CMD);
    assert_eq!(out.code, Some(137), "not killed at {point}: {out:#?}");
}

/// A running counter container checkpointed as `keep` (it runs on); returns its
/// guard and the counter it had before the checkpoint.
fn kept_counter(sx: &Sx, what: &str) -> (crate::common::Container, String, (String, u64)) {
    let b = sx.bundle(what, &["sh", "-c", COUNTER]);
    let id = unique_id(what);
    let g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "keep", &id]);
    (g, id, before)
}

/// `keep` restores from `store` and its counter carries on from `before`.
#[track_caller]
fn restores_with_its_data(sx: &Sx, store: &Path, before: &(String, u64)) {
    let id = unique_id("fm-copy");
    let g = sx.guard(&id);
    sx.restore_from_in(store, "keep", &id, &[]).expect_ok();
    sx.assert_carries_on(&id, before);
    drop(g);
}

#[test]
fn gc_killed_while_removing_leaves_a_store_that_verifies_and_restores() {
    let sx = setup!();
    let (_g, id, before) = kept_counter(&sx, "fm-gc");
    // A second snapshot, then removed: its own blobs become garbage.
    sx.wait_counter(&id, "advanced", |n| n > before.1 + 2);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "gone", &id]);
    sx.ok(&["snapshot", "rm", "gone"]);
    killed_at(&sx, &sx.store, "gc.removing", &["snapshot", "gc"]);
    sx.ok(&["snapshot", "verify", "--read-data"]);
    let gc = sx.ok(&["snapshot", "gc"]);
    assert!(gc.stdout.contains("removed"), "{gc:#?}");
    sx.ok(&["snapshot", "verify", "--read-data"]);
    assert!(sx.store_tmp(&sx.store).is_empty());
    restores_with_its_data(&sx, &sx.store, &before);
    // And the store takes new snapshots.
    sx.ok(&["checkpoint", "--leave-running", "--tag", "again", &id]);
}

#[test]
fn import_killed_before_its_index_update_leaves_a_store_that_imports_again() {
    let sx = setup!();
    let (_g, _id, before) = kept_counter(&sx, "fm-imp");
    let archive = sx.path("keep.tar");
    sx.ok(&[
        "snapshot",
        "export",
        "keep",
        "-o",
        archive.to_str().unwrap(),
    ]);
    let other = sx.path("other-store");
    let a = archive.to_str().unwrap();
    // Create the other store with a first snapshot so its index exists.
    sx.run_in(&other, &["snapshot", "import", a]).expect_ok();
    sx.run_in(&other, &["snapshot", "rm", "keep"]).expect_ok();
    killed_at(
        &sx,
        &other,
        "import.before-index",
        &["snapshot", "import", a],
    );
    // Nothing half-imported is listed; what it wrote is garbage for gc.
    assert!(sx.ls_in(&other).is_empty());
    sx.run_in(&other, &["snapshot", "verify"]).expect_ok();
    sx.run_in(&other, &["snapshot", "gc"]).expect_ok();
    assert!(sx.store_tmp(&other).is_empty());
    sx.run_in(&other, &["snapshot", "import", a]).expect_ok();
    sx.run_in(&other, &["snapshot", "verify", "--read-data"])
        .expect_ok();
    restores_with_its_data(&sx, &other, &before);
}

#[test]
fn prune_killed_before_its_gc_leaves_the_kept_snapshot_restorable() {
    let sx = setup!();
    let (_g, id, _) = kept_counter(&sx, "fm-prune");
    for v in ["web:v1", "web:v2"] {
        sx.ok(&["checkpoint", "--leave-running", "--tag", v, &id]);
    }
    let before = sx.wait_counter(&id, "readable", |_| true);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "web:v3", &id]);
    killed_at(
        &sx,
        &sx.store,
        "prune.before-gc",
        &["snapshot", "prune", "--keep-last", "1"],
    );
    // The index was rewritten before the kill: web:v1 and web:v2 are gone, their
    // data is garbage that verify reports and gc frees.
    let tags: Vec<String> = sx
        .ls()
        .iter()
        .flat_map(|s| s["tags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect();
    assert!(
        tags.iter().any(|t| t == "web:v3") && !tags.iter().any(|t| t == "web:v1"),
        "{tags:?}"
    );
    sx.ok(&["snapshot", "verify"]);
    sx.ok(&["snapshot", "gc"]);
    sx.ok(&["snapshot", "verify", "--read-data"]);
    let copy = unique_id("fm-copy");
    let g = sx.guard(&copy);
    sx.restore_from_in(&sx.store, "web:v3", &copy, &[])
        .expect_ok();
    sx.assert_carries_on(&copy, &before);
    drop(g);
}
