//! The restore side of issue 5 through the CLI with real containers and CRIU:
//! `restore --from --copies N` when one copy fails (reported per copy, the failed
//! one cleaned up, the rest kept), `--copy-rootfs` where overlayfs cannot be used,
//! `--netns PATH`, a snapshot without filesystem state restored onto a rootfs whose
//! open files changed, volumes (checkpoint-time content, a missing source), a disk
//! that fills up while the base is materialised, and a tree-walk round trip of
//! hard links, symlinks, sparse files, xattrs, device nodes and odd modes.
//!
//! Every test has a private `--root` and `--store` (`Sx`); guards delete the
//! containers, and mounts and network namespaces are removed in `Drop`, also when
//! the test fails.

use std::fs;

use crate::common::{unique_id, Container};
use crate::store_flows::{assert_fails, mounts_under, names_in, Proc, Sx, CMD, COUNTER};

/// `Sx::setup` with the test's name; returns from the test when it skips.
macro_rules! setup {
    () => {{
        fn here() {}
        fn name_of<T>(_: T) -> &'static str {
            std::any::type_name::<T>()
        }
        let name = name_of(here);
        let name = name.strip_suffix("::here").unwrap_or(name);
        let name = name.split_once("::").map_or(name, |(_, rest)| rest);
        match Sx::setup(name) {
            Some(s) => s,
            None => return,
        }
    }};
}

/// Ids of the restored copies' private directories under `--root/.copies`.
fn copies_of(sx: &Sx) -> Vec<String> {
    let mut v = names_in(&sx.env.root.join(".copies"));
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Many copies, one fails

#[test]
fn a_copy_that_fails_is_reported_and_cleaned_up_while_the_others_keep_running() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("cp-orig");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "pc", &id]);

    // Copy 1's id is taken by another running container.
    let prefix = unique_id("cp-part");
    let ids: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    let other = sx.bundle("other", &["sh", "-c", COUNTER]);
    let _taken = sx.run_d(&other, &ids[1]);
    let taken = sx.wait_counter(&ids[1], "reached 1", |n| n >= 1);
    let _guards: Vec<Container> = [&ids[0], &ids[2]].iter().map(|i| sx.guard(i)).collect();

    let out = Proc::spawn(
        sx.command(
            Some(&sx.store),
            &[
                "restore",
                "-d",
                "--from",
                "pc",
                "--copies",
                "3",
                "--name-prefix",
                &prefix,
            ],
        ),
        true,
    )
    .wait(CMD);
    assert_fails(
        &out,
        &[
            "1 of 3 copies",
            &format!("{}: container", ids[1]),
            "already exists",
            &format!("restored and left running: {}, {}", ids[0], ids[2]),
        ],
    );
    // The copies that came up are listed on stdout as on success, and run.
    let listed: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(listed, vec![ids[0].as_str(), ids[2].as_str()], "{out:#?}");
    sx.assert_carries_on(&ids[0], &before);
    sx.assert_carries_on(&ids[2], &before);
    // The container that held the id is untouched: its own token, its own bundle.
    sx.assert_carries_on(&ids[1], &taken);
    let st = sx.state(&ids[1]).unwrap();
    assert_eq!(
        fs::canonicalize(st["bundle"].as_str().unwrap()).unwrap(),
        fs::canonicalize(&other).unwrap()
    );
    // Nothing was built for the failed copy: no private directory, no overlay.
    assert_eq!(copies_of(&sx), vec![ids[0].clone(), ids[2].clone()]);
    let mounts = mounts_under(&sx.env.root.join(".copies"));
    assert_eq!(mounts.len(), 2, "{mounts:?}");
    assert!(
        !mounts.iter().any(|m| m.contains(&format!("/{}/", ids[1]))),
        "{mounts:?}"
    );
}
