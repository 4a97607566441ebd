//! The snapshot commands as scripts use them: archives streamed through pipes
//! (`snapshot export -o -`, `snapshot import -`) and `--format json` output read
//! back as typed records.

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
    let out = run_cmd(sh, CMD).ok();
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
        .ok();

    let id2 = unique_id("sc-pipe2");
    let _g2 = sx.guard(&id2);
    sx.restore_from_in(&store2, "piped:v1", &id2, &[]).ok();
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
