//! The snapshot store as the command line presents it: `snapshot
//! inspect`'s summary and JSON record, a mistyped `--store` named instead of
//! silently created, and `snapshot prune` acting per series of tags.

use std::fs;

use serde_json::Value;

use crate::common::unique_id;
use crate::store_flows::{assert_one_line, printed_snapshot_id, Sx, COUNTER};

fn setup(test: &str) -> Option<Sx> {
    Sx::setup(test)
}

/// The summary shows id, tags, origin, container, created, sizes, host, CRIU,
/// timings and the filesystem in a screenful; `--format json` is the whole
/// record with the tags.
#[test]
fn inspect_summarises_and_shows_the_tags() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sc-insp");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    let short =
        printed_snapshot_id(&sx.ok(&["checkpoint", "--leave-running", "--tag", "web:v1", &id]));
    sx.ok(&["snapshot", "tag", "web:v1", "web:stable"]);

    let text = sx.ok(&["snapshot", "inspect", "web:v1"]).stdout;
    let line = |key: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} line in:\n{text}"))
            .to_string()
    };
    assert!(line("snapshot ").contains(&short), "{text}");
    let tags = line("tags: ");
    assert!(
        tags.contains("web:v1") && tags.contains("web:stable"),
        "{text}"
    );
    assert!(line("origin: ").contains("local"), "{text}");
    assert!(line("container: ").contains(&id), "{text}");
    assert!(line("created: ").contains('T'), "{text}");
    assert!(line("size: ").contains("CRIU image files"), "{text}");
    assert!(line("host: ").contains("kernel"), "{text}");
    assert!(line("criu: ").contains("4."), "{text}");
    assert!(line("timings: ").contains("dump"), "{text}");
    assert!(line("filesystem: ").contains("files"), "{text}");
    // A summary, not the raw record: no per-file dump of the CRIU image.
    assert!(!text.contains("inventory.img"), "{text}");
    assert!(
        text.lines().count() < 30,
        "{} lines:\n{text}",
        text.lines().count()
    );

    let v = sx
        .ok(&["snapshot", "inspect", "--format", "json", "web:v1"])
        .json();
    let tags: Vec<&str> = v["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags in {v:#}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tags.contains(&"web:v1") && tags.contains(&"web:stable"),
        "{tags:?}"
    );
    assert!(v["id"].as_str().unwrap().starts_with(&short), "{v:#}");
    assert_eq!(v["origin"], "local");
    assert!(v["files"].as_array().is_some_and(|f| !f.is_empty()));
    assert!(v["metadata"]["criu"]["version"].is_string(), "{v:#}");
}

/// A mistyped `--store`: read commands name the path and create nothing there;
/// `restore --from` says which snapshot and which store; `checkpoint --tag`
/// still creates a new store.
#[test]
fn a_missing_store_is_named_and_not_created() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let typo = sx.path("stroe");
    let t = typo.to_str().unwrap();
    for args in [
        &["snapshot", "inspect", "x"][..],
        &["snapshot", "verify"],
        &["snapshot", "gc"],
        &["snapshot", "prune", "--keep-last", "1"],
        &["snapshot", "rm", "x"],
        &["snapshot", "tag", "x", "y"],
    ] {
        assert_one_line(&sx.run_in(&typo, args), &[t, "no stasis store", "--store"]);
        assert!(!typo.exists(), "{args:?} created {t}");
    }
    let id = unique_id("sc-typo");
    let _g = sx.guard(&id);
    let out = sx.restore_from_in(&typo, "web:v1", &id, &[]);
    assert_one_line(&out, &[t, "\"web:v1\"", "no stasis store"]);
    assert!(!typo.exists(), "restore --from created {t}");

    // ls lists nothing, says why on stderr, and creates nothing.
    let out = sx
        .run_in(&typo, &["snapshot", "ls", "--format", "json"])
        .expect_ok();
    assert_eq!(out.json(), Value::Array(vec![]), "{out:#?}");
    assert!(out.stderr.contains(t), "{out:#?}");
    assert!(!typo.exists(), "ls created {t}");

    // An existing store that lacks the snapshot names itself too.
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id1 = unique_id("sc-typo1");
    let _g1 = sx.run_d(&b, &id1);
    sx.wait_counter(&id1, "reached 2", |n| n >= 2);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "web:v1", &id1]);
    let store = sx.store.to_str().unwrap();
    let out = sx.restore_from_in(&sx.store, "web:v2", &id, &[]);
    assert_one_line(&out, &["\"web:v2\"", store, "web:v1"]);
    assert!(fs::metadata(&sx.store).unwrap().is_dir());
}

/// `prune --keep-last 1` over tagged checkpoints web:v1..v3 forgets v1 and v2
/// (tagged snapshots were once kept forever, so it forgot nothing),
/// and the help says how snapshots are grouped.
#[test]
fn prune_keep_last_acts_per_tag_series() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sc-prune");
    let _g = sx.run_d(&b, &id);
    let mut ids = Vec::new();
    for v in 1..=3 {
        sx.wait_counter(&id, "advanced", |n| n >= v);
        let tag = format!("web:v{v}");
        ids.push(printed_snapshot_id(&sx.ok(&[
            "checkpoint",
            "--leave-running",
            "--tag",
            &tag,
            &id,
        ])));
    }
    let out = sx.ok(&["snapshot", "prune", "--keep-last", "1"]);
    assert!(out.stdout.contains("forgot 2 snapshot(s)"), "{out:#?}");
    let ls = sx.ls();
    assert_eq!(ls.len(), 1, "{ls:#?}");
    assert_eq!(ls[0]["id"], ids[2].as_str());
    sx.ok(&["snapshot", "verify", "--read-data"]);
    let id2 = unique_id("sc-prune2");
    let _g2 = sx.restore_from("web:v3", &id2, &[]);

    let help = sx.ok(&["snapshot", "prune", "--help"]).stdout;
    assert!(
        help.contains("series") && help.contains("redis:v1"),
        "{help}"
    );
}
