//! Runtime-spec options from config.json, checked from inside the container
//! (its own output through `run` in the foreground, or `exec`) and on the host.

use std::fs;

use serde_json::json;

use crate::common::{add_bind, cgroup_dir, edit_config, read_trim, unique_id, Env};

/// Runs `cmd` in the foreground in a fresh busybox container after `edit`, and
/// returns (exit code, stdout).
fn run_with(
    env: &Env,
    tag: &str,
    cmd: &[&str],
    edit: impl FnOnce(&mut serde_json::Value),
) -> (i32, String) {
    let b = env.bundle(tag, cmd);
    edit_config(&b, edit);
    let id = unique_id(tag);
    let _c = env.guard(&id);
    let out = env.run(&["run", "--bundle", b.to_str().unwrap(), &id]);
    (
        out.code.expect("exit code"),
        format!("{}{}", out.stdout, out.stderr),
    )
}

#[test]
fn memory_limit_is_applied_and_enforced_by_oom_kill() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let limit: u64 = 64 << 20;
    edit_config(&b, |c| {
        c["linux"]["resources"]["memory"] = json!({"limit": limit, "swap": limit});
    });
    let id = unique_id("mem");
    let _c = env.run_detached(&b, &id);
    let mem = cgroup_dir(env.pid(&id), "memory");
    assert_eq!(
        read_trim(&mem.join("memory.limit_in_bytes")),
        limit.to_string()
    );
    let memsw = mem.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        assert_eq!(read_trim(&memsw), limit.to_string());
    }
    // busybox tail keeps a line without newline in memory: 200 MiB of anonymous
    // memory against a 64 MiB limit (no swap) must be OOM-killed (SIGKILL).
    let out = env.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "head -c 200m /dev/zero | tail > /dev/null; echo status=$?",
    ]);
    assert!(
        out.stdout.contains("status=137"),
        "expected the allocation to be OOM-killed: {out:?}"
    );
    let oom = fs::read_to_string(mem.join("memory.oom_control")).unwrap();
    let kills: u64 = oom
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no oom_kill in memory.oom_control: {oom}"));
    assert!(kills > 0, "memory.oom_control counts no OOM kill: {oom}");
    assert_eq!(env.status(&id), "running", "only the allocator was killed");
}

#[test]
fn pids_limit_stops_a_fork_loop() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    // The subshell forks until fork fails (ash then exits it with 2); the count uses
    // a builtin glob because the container cannot fork any more at that point.
    let (code, out) = run_with(
        &env,
        "pids",
        &[
            "sh",
            "-c",
            "(while true; do sleep 5 & done) 2>/dev/null; echo sub=$?; set -- /proc/[0-9]*; echo procs=$#",
        ],
        |c| c["linux"]["resources"]["pids"] = json!({"limit": 10}),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sub=2"), "fork loop was not stopped: {out}");
    let procs: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no process count: {out}"));
    assert!(
        (2..=10).contains(&procs),
        "{procs} processes with pids.max 10"
    );
}

#[test]
fn rlimit_nofile() {
    requires!(root, busybox);
    let env = Env::new();
    let (code, out) = run_with(&env, "rlim", &["sh", "-c", "ulimit -n; ulimit -Hn"], |c| {
        c["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 777, "hard": 888}]);
    });
    assert_eq!((code, out.as_str()), (0, "777\n888\n"));
}

#[test]
fn readonly_root() {
    requires!(root, busybox);
    let env = Env::new();
    let (code, out) = run_with(
        &env,
        "ro",
        &[
            "sh",
            "-c",
            "touch /newfile; echo rc=$?; touch /tmp/ok && echo tmp-ok",
        ],
        |c| c["root"]["readonly"] = json!(true),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("rc=1"), "{out}");
    assert!(out.contains("tmp-ok"), "tmpfs mounts stay writable: {out}");
    assert!(!env.path("ro/rootfs/newfile").exists());

    // And writable when readonly is false.
    let (code, out) = run_with(&env, "rw", &["sh", "-c", "touch /newfile"], |c| {
        c["root"]["readonly"] = json!(false)
    });
    assert_eq!(code, 0, "{out}");
    assert!(env.path("rw/rootfs/newfile").exists());
}

#[test]
fn process_user_uid_gid_and_additional_gids() {
    requires!(root, busybox);
    let env = Env::new();
    let (code, out) = run_with(&env, "user", &["sh", "-c", "id -u; id -g; id -G"], |c| {
        c["process"]["user"] = json!({"uid": 1234, "gid": 2345, "additionalGids": [3456]});
    });
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1234", "{out}");
    assert_eq!(lines[1], "2345", "{out}");
    let groups: Vec<&str> = lines[2].split_whitespace().collect();
    assert!(groups.contains(&"3456"), "{out}");
}

#[test]
fn read_write_bind_mount() {
    requires!(root, busybox);
    let env = Env::new();
    let host = env.path("hostdir");
    fs::create_dir_all(&host).unwrap();
    fs::write(host.join("from-host"), "hello\n").unwrap();
    let b = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "cat /data/from-host; echo written-inside > /data/from-container",
        ],
    );
    add_bind(&b, &host, "/data");
    let id = unique_id("bind");
    let _c = env.guard(&id);
    let out = env.run(&["run", "--bundle", b.to_str().unwrap(), &id]).ok();
    assert_eq!(out.stdout, "hello\n");
    assert_eq!(
        fs::read_to_string(host.join("from-container")).unwrap(),
        "written-inside\n"
    );
}

#[test]
fn env_cwd_and_hostname() {
    requires!(root, busybox);
    let env = Env::new();
    let (code, out) = run_with(
        &env,
        "envcwd",
        &["sh", "-c", "pwd; echo $FOO; echo $EMPTY.; hostname"],
        |c| {
            c["process"]["env"]
                .as_array_mut()
                .unwrap()
                .extend([json!("FOO=bar=baz qux"), json!("EMPTY=")]);
            c["process"]["cwd"] = json!("/tmp");
            c["hostname"] = json!("myhost");
        },
    );
    assert_eq!((code, out.as_str()), (0, "/tmp\nbar=baz qux\n.\nmyhost\n"));
}
