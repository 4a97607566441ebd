//! Why a container's process could not start, side by side with runc: a command
//! that does not exist exits 127, one that cannot be executed 126 (podman's and
//! Docker's codes; runc 1.1 exits 255 from `exec` and 1 from `run`), with one
//! plain line naming the cause in runc's words (Docker and podman read those
//! words to pick the same codes); an exec the pids limit has no room for says so.

use crate::common::{edit_config, unique_id, wait_until, Env, CMD_TIMEOUT};

/// (command, stasis's exit code, the phrase stasis and runc both print)
const CASES: &[(&str, i32, &str)] = &[
    ("nosuchcmd", 127, "executable file not found in $PATH"),
    ("/nonexist/x", 127, "no such file or directory"),
    ("/etc/passwd", 126, "permission denied"),
    ("/etc", 126, "permission denied"),
];

#[test]
fn exec_of_a_missing_or_non_executable_command_exits_127_or_126() {
    requires!(root, busybox, runc);
    let stasis = Env::new();
    let runc = Env::runc();
    let b = stasis.bundle("b", &["sleep", "1000"]);
    let (sid, rid) = (unique_id("code-s"), unique_id("code-r"));
    let _gs = stasis.run_detached(&b, &sid);
    let _gr = runc.run_detached(&b, &rid);
    for &(cmd, code, phrase) in CASES {
        let s = stasis.run(&["exec", &sid, cmd]);
        let line = s.fails_with_one_line(&[cmd, phrase, &sid]);
        assert!(!line.contains("failed to create container"), "{line}");
        assert_eq!(s.code, Some(code), "stasis exec {cmd}: {line}");
        let r = runc.run(&["exec", &rid, cmd]);
        assert!(r.stderr.contains(phrase), "runc exec {cmd}: {}", r.stderr);
        assert_ne!(r.code, Some(0), "runc exec {cmd}");
    }
    // The container is unharmed.
    stasis.ok(&["exec", &sid, "true"]);
}

#[test]
fn run_of_a_missing_or_non_executable_command_exits_127_or_126() {
    requires!(root, busybox, runc);
    let stasis = Env::new();
    let runc = Env::runc();
    for (n, &(cmd, code, phrase)) in CASES.iter().enumerate() {
        let b = stasis.bundle(&format!("b{n}"), &[cmd]);
        let (sid, rid) = (unique_id("run-s"), unique_id("run-r"));
        let (_gs, _gr) = (stasis.guard(&sid), runc.guard(&rid));
        let bundle = b.to_str().unwrap();
        let s = stasis.run(&["run", "--bundle", bundle, &sid]);
        s.fails_with_one_line(&[cmd, phrase, &sid]);
        assert_eq!(s.code, Some(code), "stasis run {cmd}: {}", s.stderr);
        stasis.assert_nothing_left(&sid, Some(&b));
        let r = runc.run(&["run", "--bundle", bundle, &rid]);
        assert!(r.stderr.contains(phrase), "runc run {cmd}: {}", r.stderr);
        assert_ne!(r.code, Some(0), "runc run {cmd}");
    }
}

#[test]
fn exec_without_room_under_the_pids_limit_names_the_limit() {
    requires!(root, busybox);
    let stasis = Env::new();
    let b = stasis.bundle("b", &["sh", "-c", "sleep 1000 & exec sleep 1000"]);
    edit_config(&b, |c| {
        c["linux"]["resources"]["pids"] = serde_json::json!({"limit": 2})
    });
    let id = unique_id("pids");
    let _g = stasis.run_detached(&b, &id);
    wait_until("both sleeps", CMD_TIMEOUT, || stasis.pids(&id).len() == 2);
    let out = stasis.run(&["exec", &id, "true"]);
    let line = out.fails_with_one_line(&[&id, "pids limit of 2", "--pids-limit"]);
    assert!(!line.contains("intermediate process error"), "{line}");
    // With room again, exec works. (Room for more than 2: libcontainer clones an
    // exec's intermediate process as a sibling of stasis, so the failed one stays
    // a zombie in the cgroup until this test process, its parent, exits.)
    stasis.ok(&["update", "--pids-limit", "10", &id]);
    stasis.ok(&["exec", &id, "true"]);

    // A limit of 1 can never start the process: refused before anything is made.
    let stasis = Env::new();
    let b1 = stasis.bundle("b1", &["true"]);
    edit_config(&b1, |c| {
        c["linux"]["resources"]["pids"] = serde_json::json!({"limit": 1})
    });
    let id1 = unique_id("pids1");
    let _g1 = stasis.guard(&id1);
    let out = stasis.run(&["run", "--bundle", b1.to_str().unwrap(), &id1]);
    out.fails_with_one_line(&["pids.limit is 1", "at least 2"]);
    stasis.assert_nothing_left(&id1, Some(&b1));
}
