//! Damaged stores through the CLI with real containers and CRIU: a
//! flipped byte in a pack never lets a checkpoint commit a snapshot that fails
//! to restore; re-import and `snapshot verify --repair` put good copies back; a
//! lost index.json is reported as damage, gc refuses, and `snapshot verify
//! --rebuild-index` finds the snapshots again.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common::unique_id;
use crate::store_flows::{printed_snapshot_id, COUNTER};

/// The blob path of the first pack of the snapshot tagged `tag` (`NAME:VER`).
#[track_caller]
fn first_pack(store: &Path, tag: &str) -> PathBuf {
    let index: Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let desc = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no {tag} in index.json: {index:#}"));
    let hex = |d: &Value| {
        d["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_string()
    };
    let blobs = store.join("blobs/sha256");
    let m: Value = serde_json::from_slice(&fs::read(blobs.join(hex(desc))).unwrap()).unwrap();
    let pack = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.stasis.pack.v1")
        .unwrap_or_else(|| panic!("no pack layer in {m:#}"));
    blobs.join(hex(pack))
}

/// Flips one byte in the middle of a pack's frames (its index stays intact).
/// Returns the byte's offset.
fn flip_in_frames(path: &Path) -> usize {
    let mut data = fs::read(path).unwrap();
    assert_eq!(&data[..8], b"STASPACK");
    let t = data.len() - 64;
    let index_offset = u64::from_le_bytes(data[t..t + 8].try_into().unwrap()) as usize;
    let at = (16 + index_offset) / 2;
    data[at] ^= 0xff;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(path, &data).unwrap();
    at
}

fn hex_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn checkpoint_over_a_damaged_pack_commits_a_snapshot_that_restores() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("ds-ckpt");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let first =
        printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "first", &id]));
    let pack = first_pack(&sx.store, "first:latest");
    flip_in_frames(&pack);

    // Without --leave-running: the container goes, so its snapshot must restore.
    let before = sx.wait_counter(&id, "readable", |_| true);
    let out = sx.ok(&["checkpoint", "--tag", "second", &id]);
    let second = printed_snapshot_id(&out);
    assert_ne!(first, second);
    assert!(
        out.stderr.contains(&hex_of(&pack)) && out.stderr.contains("verify --repair"),
        "no warning about the damaged pack: {out:#?}"
    );
    assert_ne!(
        first_pack(&sx.store, "second:latest"),
        pack,
        "the new snapshot uses the damaged pack"
    );
    let id2 = unique_id("ds-ckpt2");
    let _g2 = sx.restore_from("second", &id2, &[]);
    sx.assert_carries_on(&id2, &before);

    // Only the first snapshot is reported damaged.
    let v = sx.run(&["snapshot", "verify", "--read-data"]);
    assert_ne!(v.code, Some(0), "{v:#?}");
    let errors: Vec<&str> = v
        .stdout
        .lines()
        .filter(|l| l.starts_with("error"))
        .collect();
    assert!(
        !errors.is_empty() && errors.iter().all(|l| l.contains(&first)),
        "{v:#?}"
    );
}

#[test]
fn reimport_and_verify_repair_put_good_copies_back() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("ds-repair");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let first =
        printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "first", &id]));
    let tar = sx.path("first.tar");
    sx.ok(&["snapshot", "export", "first", "-o", tar.to_str().unwrap()]);
    let pack = first_pack(&sx.store, "first:latest");
    let damaged = |what: &str| {
        let v = sx.run(&["snapshot", "verify", "--read-data"]);
        assert_ne!(v.code, Some(0), "{what}: verify passed: {v:#?}");
        assert!(v.stdout.contains(&hex_of(&pack)), "{what}: {v:#?}");
        assert!(
            v.stdout.contains("verify --repair"),
            "{what}: no hint: {v:#?}"
        );
    };

    // Re-importing a good export replaces the damaged pack.
    flip_in_frames(&pack);
    damaged("flipped");
    let out = sx.ok(&["snapshot", "import", tar.to_str().unwrap()]);
    assert!(out.stdout.contains("imported"), "{out:#?}");
    sx.ok(&["snapshot", "verify", "--read-data"]);

    // So does verify --repair --from the export.
    flip_in_frames(&pack);
    damaged("flipped again");
    let out = sx.ok(&[
        "snapshot",
        "verify",
        "--repair",
        "--from",
        tar.to_str().unwrap(),
    ]);
    assert!(
        out.stdout
            .contains(&format!("repaired pack sha256:{}", hex_of(&pack))),
        "{out:#?}"
    );
    sx.ok(&["snapshot", "verify", "--read-data"]);

    // Without an archive and with no other copy of the pages, it says so.
    flip_in_frames(&pack);
    let out = sx.run(&["snapshot", "verify", "--repair"]);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("could not repair pack") && out.stdout.contains(&first),
        "{out:#?}"
    );
    // A later checkpoint stores the pages again; then the pack is rebuilt.
    sx.ok(&["checkpoint", "--tag", "second", &id]);
    let out = sx.ok(&["snapshot", "verify", "--repair", "--read-data"]);
    assert!(out.stdout.contains("repaired pack"), "{out:#?}");
    let id2 = unique_id("ds-repair2");
    let _g2 = sx.restore_from("first", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
}

#[test]
fn lost_index_json_is_reported_gc_refuses_and_rebuild_index_restores_it() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("ds-index");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let first =
        printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "first", &id]));
    let before = sx.wait_counter(&id, "readable", |_| true);
    let second =
        printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "second:v2", &id]));
    let blobs = || fs::read_dir(sx.store.join("blobs/sha256")).unwrap().count();
    let n = blobs();

    fs::remove_file(sx.store.join("index.json")).unwrap();
    let v = sx.run(&["snapshot", "verify"]);
    assert_ne!(v.code, Some(0), "verify passed without index.json: {v:#?}");
    assert!(
        v.stdout.contains("index.json") && v.stdout.contains("--rebuild-index"),
        "{v:#?}"
    );
    let gc = sx.run(&["snapshot", "gc"]);
    assert_ne!(gc.code, Some(0), "gc ran without index.json: {gc:#?}");
    assert!(gc.stderr.contains("--rebuild-index"), "{gc:#?}");
    assert_eq!(blobs(), n, "gc deleted blobs");
    assert!(!sx.store.join("index.json").exists());
    // A checkpoint refuses before it touches the container.
    let ck = sx.run(&["checkpoint", "--tag", "third", &id]);
    assert_ne!(
        ck.code,
        Some(0),
        "checkpoint into a store without index: {ck:#?}"
    );
    assert!(ck.stderr.contains("--rebuild-index"), "{ck:#?}");
    assert_eq!(sx.state(&id).expect("container gone")["status"], "running");

    let out = sx.ok(&["snapshot", "verify", "--rebuild-index", "--read-data"]);
    assert!(out.stdout.contains("2 snapshot(s)"), "{out:#?}");
    assert!(out.stdout.contains("no errors found"), "{out:#?}");
    let ls = sx.ls();
    let tags_of = |short: &str| {
        ls.iter()
            .find(|e| e["id"] == short)
            .unwrap_or_else(|| panic!("{short} not listed: {ls:#?}"))["tags"]
            .clone()
    };
    assert_eq!(tags_of(&first), serde_json::json!(["first:latest"]));
    assert_eq!(tags_of(&second), serde_json::json!(["second:v2"]));
    let gc = sx.ok(&["snapshot", "gc"]);
    assert!(gc.stdout.contains("removed 0 blob"), "{gc:#?}");
    let id2 = unique_id("ds-index2");
    let _g2 = sx.restore_from("second:v2", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
}
