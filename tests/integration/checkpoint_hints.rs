//! Failures that need a hint to be actionable: a non-root container
//! on a host whose root lacks CAP_SYS_RESOURCE (CRIU: "Can't get rlimit 0"), and
//! `restore --copies N` without `-d`.

use std::fs;

use serde_json::Value;

use crate::common::unique_id;
use crate::store_flows::{assert_fails, assert_one_line, Sx, COUNTER};

/// True when this process lacks CAP_SYS_RESOURCE (bit 24 of CapEff).
fn lacks_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24) == 0
}

#[test]
fn checkpoint_of_a_non_root_container_without_cap_sys_resource_says_what_to_do() {
    let Some(sx) = Sx::setup(test_name!()) else {
        return;
    };
    if !lacks_cap_sys_resource() {
        eprintln!("skip: root here has CAP_SYS_RESOURCE, CRIU reads the rlimits");
        return;
    }
    let b = sx.bundle("b", &["sleep", "1000"]);
    let cfg_path = b.join("config.json");
    let mut cfg: Value = serde_json::from_str(&fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let id = unique_id("hint-rl");
    let _g = sx.run_d(&b, &id);
    // An image directory of the test's own (the default is ./checkpoint).
    let img = sx.path("img");
    let img = img.to_str().unwrap();
    for args in [
        &["checkpoint", "--leave-running", "--image-path", img, &id][..],
        &["checkpoint", "--leave-running", "--tag", "nr:v1", &id],
    ] {
        let out = sx.run(args);
        assert_fails(
            &out,
            &[
                "Can't get rlimit",
                "CAP_SYS_RESOURCE",
                "user namespace",
                "images/",
            ],
        );
        assert_eq!(sx.state(&id).unwrap()["status"], "running", "{out:#?}");
    }
}

#[test]
fn restore_of_several_copies_in_the_foreground_is_refused() {
    let Some(sx) = Sx::setup(test_name!()) else {
        return;
    };
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("hint-cp");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "fg:v1", &id]);
    let prefix = unique_id("hint-cpx");
    let (_g0, _g1) = (
        sx.guard(&format!("{prefix}-0")),
        sx.guard(&format!("{prefix}-1")),
    );
    let out = sx.run_starting(
        &sx.store,
        &[
            "restore",
            "--from",
            "fg:v1",
            "--copies",
            "2",
            "--name-prefix",
            &prefix,
        ],
    );
    assert_one_line(&out, &["--copies 2", "-d"]);
    for i in 0..2 {
        assert!(
            sx.state(&format!("{prefix}-{i}")).is_none(),
            "copy {i} was restored"
        );
    }
}

/// `restore --help` documents what lazy-pages.pid holds ("PID
/// STARTTIME", so `kill -0 $(cat ...)` does not work as README implied).
#[test]
fn restore_help_documents_the_lazy_pages_pid_file() {
    let Some(sx) = Sx::setup(test_name!()) else {
        return;
    };
    let help = sx.ok(&["restore", "--help"]).stdout;
    assert!(
        help.contains("lazy-pages.pid") && help.contains("PID STARTTIME"),
        "{help}"
    );
}
