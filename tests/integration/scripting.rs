//! The snapshot commands as scripts use them: archives streamed through pipes
//! (`snapshot export -o -`, `snapshot import -`) and `--format json` output read
//! back as typed records (`scripting::json_output_of_checkpoint_ls_verify_gc_prune`).

use std::fs;
use std::process::Command;

use crate::common::unique_id;
use crate::store_flows::{entry_with_tag, printed_snapshot_id, run_cmd, Sx, CMD, COUNTER};

fn setup(test: &str) -> Option<Sx> {
    Sx::setup(test)
}

/// `export -o - | import -` moves a snapshot between stores through a pipe (as
/// over ssh or through zstd); no file named "-" appears anywhere.
#[test]
fn export_to_stdout_piped_into_import_from_stdin() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sc-pipe");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let short = printed_snapshot_id(&sx.ok(&["checkpoint", "--tag", "piped:v1", &id]));

    let store2 = sx.path("store2");
    let cwd = sx.path("cwd");
    fs::create_dir_all(&cwd).unwrap();
    let quote = |c: Command| {
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| format!("'{}'", a.to_str().unwrap()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let export = quote(sx.command(
        Some(&sx.store),
        &["snapshot", "export", "piped:v1", "-o", "-"],
    ));
    let import = quote(sx.command(Some(&store2), &["snapshot", "import", "-"]));
    let mut sh = Command::new("bash");
    sh.current_dir(&cwd)
        .arg("-c")
        .arg(format!("set -o pipefail; {export} | {import}"));
    let out = run_cmd(sh, CMD).expect_ok();
    assert!(
        out.stdout.contains(&format!("imported {short}")),
        "import does not name {short}: {out:#?}"
    );
    assert!(
        out.stderr.contains("exported piped:v1 to standard output"),
        "{out:#?}"
    );
    assert!(
        fs::read_dir(&cwd).unwrap().next().is_none(),
        "export wrote a file into the working directory"
    );
    let ls2 = sx.ls_in(&store2);
    assert_eq!(ls2.len(), 1, "{ls2:#?}");
    assert_eq!(entry_with_tag(&ls2, "piped:v1")["id"], short.as_str());
    sx.run_in(&store2, &["snapshot", "verify", "--read-data"])
        .expect_ok();

    let id2 = unique_id("sc-pipe2");
    let _g2 = sx.guard(&id2);
    sx.restore_from_in(&store2, "piped:v1", &id2, &[])
        .expect_ok();
    sx.assert_carries_on(&id2, &before);

    // A truncated stream (the exporter died) is refused and adds nothing.
    let store3 = sx.path("store3");
    let import3 = quote(sx.command(Some(&store3), &["snapshot", "import", "-"]));
    let mut sh = Command::new("bash");
    sh.current_dir(&cwd)
        .arg("-c")
        .arg(format!("{export} | head -c 5000 | {import3}"));
    let out = run_cmd(sh, CMD);
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("standard input"), "{out:#?}");
    assert!(sx.ls_in(&store3).is_empty());
}

/// `checkpoint --tag --format json`, as a script reads it.
#[derive(serde::Deserialize, Debug)]
struct CheckpointRecord {
    id: String,
    short_id: String,
    tags: Vec<String>,
    image_bytes: u64,
    pages_total: u64,
    bytes_added: u64,
    dump_ms: u64,
    criu: std::collections::BTreeMap<String, u64>,
}

#[derive(serde::Deserialize, Debug)]
struct LsRecord {
    id: String,
    digest: String,
    tags: Vec<String>,
}

#[derive(serde::Deserialize, Debug)]
struct VerifyRecord {
    errors: usize,
    findings: Vec<serde_json::Value>,
}

#[derive(serde::Deserialize, Debug)]
struct GcRecord {
    dry_run: bool,
    blobs_removed: u64,
    bytes_freed: u64,
}

#[derive(serde::Deserialize, Debug)]
struct PruneRecord {
    dry_run: bool,
    forgotten: Vec<String>,
}

#[track_caller]
fn parse<T: serde::de::DeserializeOwned>(out: &crate::common::Out) -> T {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:#?}"))
}

/// `--format json` of checkpoint --tag, snapshot ls (with the full digest), verify,
/// gc and prune: one JSON record each, nothing else on stdout.
#[test]
fn json_output_of_checkpoint_ls_verify_gc_prune() {
    let Some(sx) = setup(test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sc-json");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    let args = [
        "checkpoint",
        "--leave-running",
        "--tag",
        "j:v1",
        "--format",
        "json",
    ];
    let c1: CheckpointRecord = parse(&sx.ok(&[&args[..], &[id.as_str()]].concat()));
    assert!(c1.id.starts_with("sha256:") && c1.id.len() == 71, "{c1:?}");
    assert!(c1.id[7..].starts_with(&c1.short_id), "{c1:?}");
    assert_eq!(c1.tags, ["j:v1"]);
    assert!(
        c1.image_bytes > 0 && c1.pages_total > 0 && c1.bytes_added > 0,
        "{c1:?}"
    );
    assert!(
        c1.criu.contains_key("frozen_time") && c1.dump_ms > 0,
        "{c1:?}"
    );
    sx.wait_counter(&id, "reached 10", |n| n >= 10);
    let args2 = ["checkpoint", "--tag", "j:v2", "--format", "json"];
    let c2: CheckpointRecord = parse(&sx.ok(&[&args2[..], &[id.as_str()]].concat()));
    assert_ne!(c1.id, c2.id);

    let ls: Vec<LsRecord> = parse(&sx.ok(&["snapshot", "ls", "--format", "json"]));
    assert_eq!(ls.len(), 2, "{ls:?}");
    for (c, tag) in [(&c1, "j:v1"), (&c2, "j:v2")] {
        let row = ls.iter().find(|r| r.tags.iter().any(|t| t == tag)).unwrap();
        assert_eq!(row.digest, c.id, "{row:?}");
        assert_eq!(row.id, c.short_id, "{row:?}");
    }

    let v: VerifyRecord = parse(&sx.ok(&["snapshot", "verify", "--format", "json"]));
    assert_eq!(v.errors, 0, "{v:?}");
    assert!(v.findings.is_empty(), "{v:?}");

    let p: PruneRecord = parse(&sx.ok(&[
        "snapshot",
        "prune",
        "--keep-last",
        "1",
        "--dry-run",
        "--format",
        "json",
    ]));
    assert!(p.dry_run);
    assert!(
        p.forgotten.iter().all(|f| f.starts_with("sha256:")),
        "{p:?}"
    );
    sx.ok(&["snapshot", "rm", "j:v1"]);
    let dry: GcRecord = parse(&sx.ok(&["snapshot", "gc", "--dry-run", "--format", "json"]));
    assert!(dry.dry_run && dry.blobs_removed > 0, "{dry:?}");
    let gc: GcRecord = parse(&sx.ok(&["snapshot", "gc", "--format", "json"]));
    assert!(!gc.dry_run, "{gc:?}");
    assert_eq!(gc.blobs_removed, dry.blobs_removed, "{gc:?} vs {dry:?}");
    assert!(
        gc.bytes_freed >= dry.bytes_freed && gc.bytes_freed > 0,
        "{gc:?}"
    );
    let v: VerifyRecord = parse(&sx.ok(&["snapshot", "verify", "--format", "json"]));
    assert_eq!(v.errors, 0, "{v:?}");
}
