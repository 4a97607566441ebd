//! Runtime-spec options from config.json, checked from inside the container
//! (its own output through `run` in the foreground, or `exec`) and on the host.

use std::fs;

use serde_json::json;

use std::time::Duration;

use crate::common::{add_bind, cgroup_dir, cgroups_named, edit_config, read_trim, unique_id, Env};

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
    let out = env
        .run(&["run", "--bundle", b.to_str().unwrap(), &id])
        .expect_ok();
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

/// A hook that appends `<name> <state JSON from stdin>` to `log`.
fn hook(name: &str, log: &str) -> serde_json::Value {
    json!({"path": "/bin/sh", "args": ["sh", "-c", format!("read -r s; echo \"{name} $s\" >> {log}")]})
}

#[test]
fn hooks_run_in_order_with_the_state_on_stdin() {
    requires!(root, busybox);
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    let host_log = data.join("hooks");
    let hl = host_log.to_str().unwrap().to_string();
    let b = env.bundle("b", &["sh", "-c", "echo main >> /data/hooks"]);
    add_bind(&b, &data, "/data");
    edit_config(&b, |c| {
        c["hooks"] = json!({
            "prestart": [hook("prestart", &hl)],
            "createRuntime": [hook("createRuntime", &hl)],
            // createContainer runs in the container's mount namespace before
            // pivot_root (runc and youki alike), so host paths still resolve;
            // startContainer runs inside the container: its log is the bind mount.
            "createContainer": [hook("createContainer", &hl)],
            "startContainer": [hook("startContainer", "/data/hooks")],
            "poststart": [hook("poststart", &hl)],
            "poststop": [hook("poststop", &hl)],
        });
    });
    let id = unique_id("hooks");
    let _c = env.guard(&id);
    env.run(&["run", "--bundle", b.to_str().unwrap(), &id])
        .expect_ok();
    let text = fs::read_to_string(&host_log).unwrap();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    // poststart runs after the process started, so it may come before or after
    // "main"; everything else is ordered.
    let without_poststart: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| *n != "poststart")
        .collect();
    assert_eq!(
        without_poststart,
        [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "main",
            "poststop"
        ],
        "{text}"
    );
    assert!(names.contains(&"poststart"), "{text}");
    for l in text.lines().filter(|l| !l.starts_with("main")) {
        let (name, s) = l.split_once(' ').unwrap();
        let st: serde_json::Value = serde_json::from_str(s)
            .unwrap_or_else(|e| panic!("{name}: state on stdin is not JSON ({e}): {s}"));
        assert_eq!(st["id"], id.as_str(), "{name}: {st}");
        assert_eq!(
            st["bundle"],
            b.canonicalize().unwrap().to_str().unwrap(),
            "{name}: {st}"
        );
    }
}

#[test]
fn failing_create_runtime_hook_fails_create_and_leaves_nothing() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    edit_config(&b, |c| {
        c["hooks"] = json!({"createRuntime": [
            {"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}
        ]});
    });
    for verb in [&["create"][..], &["run"]] {
        let id = unique_id("hookfail");
        let _c = env.guard(&id);
        let mut args = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &id]);
        env.run(&args).fails_with_one_line(&[&id, "hook"]);
        env.assert_nothing_left(&id, Some(&b));
    }
}

#[test]
#[ignore = "libcontainer 0.7 runs startContainer hooks in the container's init after \
            `start` returned and reports a failure only through tracing: stasis exits 255 \
            with nothing on stderr (runc exits 1 naming the hook)"]
fn failing_start_container_hook_is_reported() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["echo", "main"]);
    edit_config(&b, |c| {
        c["hooks"] = json!({"startContainer": [
            {"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}
        ]});
    });
    let id = unique_id("starthook");
    let _c = env.guard(&id);
    let out = env.run(&["run", "--bundle", b.to_str().unwrap(), &id]);
    assert!(
        !out.stdout.contains("main"),
        "the process must not run: {out:?}"
    );
    // runc exits 1 and its error names the hook.
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains("hook"),
        "error does not name the hook: {out:?}"
    );
}

#[test]
fn hooks_that_do_not_read_their_stdin_never_kill_stasis() {
    // libcontainer writes the state to each hook's stdin and expects EPIPE when the
    // hook exits first; with SIGPIPE at its default, stasis died of it (141, nothing
    // on stderr, the container left behind) about one time in ten.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let ok = env.bundle("ok", &["true"]);
    edit_config(&ok, |c| {
        let t = json!([{"path": "/bin/true"}]);
        c["hooks"] = json!({"prestart": t, "createRuntime": t, "poststart": t, "poststop": t});
    });
    let bad = env.bundle("bad", &["true"]);
    edit_config(&bad, |c| {
        c["hooks"] = json!({"createRuntime": [{"path": "/bin/false"}]});
    });
    for _ in 0..10 {
        let id = unique_id("hookpipe");
        let _c = env.guard(&id);
        env.run(&["run", "--bundle", ok.to_str().unwrap(), &id])
            .expect_ok();
        env.assert_nothing_left(&id, Some(&ok));
        let id = unique_id("hookpipebad");
        let _c = env.guard(&id);
        env.run(&["create", "--bundle", bad.to_str().unwrap(), &id])
            .fails_with_one_line(&[&id, "hook"]);
        env.assert_nothing_left(&id, Some(&bad));
    }
}

/// A failing hook first, then one that logs `<name> <state>` to `log`.
fn failing_then_logging(name: &str, log: &str) -> serde_json::Value {
    json!([{"path": "/bin/sh", "args": ["sh", "-c", "exit 3"]}, hook(name, log)])
}

#[test]
fn failing_poststop_hook_warns_and_delete_removes_the_container() {
    // libcontainer stopped at the first failing poststop hook before removing the
    // container: `delete` and `delete --force` exited 1 forever. The runtime spec
    // makes it a warning, and the remaining hooks still run.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let log = env.path("poststop.log");
    let l = log.to_str().unwrap().to_string();
    let b = env.bundle("b", &["sleep", "100"]);
    edit_config(&b, |c| {
        c["hooks"] = json!({"poststop": failing_then_logging("second", &l)});
    });
    // delete --force of a running container, and delete of a stopped one.
    for force in [true, false] {
        let _ = fs::remove_file(&log);
        let id = unique_id("poststop");
        let _c = env.run_detached(&b, &id);
        if !force {
            env.ok(&["kill", &id, "KILL"]);
            env.wait_status(&id, "stopped");
        }
        let args: &[&str] = if force {
            &["delete", "--force", &id]
        } else {
            &["delete", &id]
        };
        let out = env.ok(args);
        assert!(
            out.stderr.contains("warning") && out.stderr.contains("poststop"),
            "no warning naming the hook: {out:?}"
        );
        let text = fs::read_to_string(&log).expect("the second poststop hook did not run");
        let st: serde_json::Value = serde_json::from_str(text.trim().split_once(' ').unwrap().1)
            .unwrap_or_else(|e| panic!("state on stdin is not JSON ({e}): {text}"));
        assert_eq!(
            (st["id"].as_str(), st["status"].as_str()),
            (Some(id.as_str()), Some("stopped"))
        );
        env.run(&["state", &id]).fails_with_one_line(&[&id]);
        env.assert_nothing_left(&id, Some(&b));
        // A foreground run deletes its container the same way.
        let id = unique_id("poststoprun");
        let _c = env.guard(&id);
        let b2 = env.bundle(&format!("fg{force}"), &["true"]);
        edit_config(&b2, |c| {
            c["hooks"] = json!({"poststop": failing_then_logging("second", &l)});
        });
        env.ok(&["run", "--bundle", b2.to_str().unwrap(), &id]);
        env.assert_nothing_left(&id, Some(&b2));
    }
    // runc (which fails the delete but removes the container first) leaves nothing
    // behind either.
    if crate::common::runc_bin().is_some() {
        let runc = Env::runc();
        let id = unique_id("poststop-runc");
        let _c = runc.run_detached(&b, &id);
        let _ = runc.run(&["delete", "--force", &id]);
        runc.run(&["state", &id])
            .fails_with_one_line(&["does not exist"]);
    }
}

#[test]
fn failing_poststart_hook_warns_and_start_succeeds() {
    // The runtime spec: a failing poststart hook is a warning, the remaining hooks
    // run and the lifecycle continues. libcontainer failed `start` (and `run`) at
    // the first one, with the process already running.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let log = env.path("poststart.log");
    let l = log.to_str().unwrap().to_string();
    let b = env.bundle("b", &["sleep", "100"]);
    edit_config(&b, |c| {
        c["hooks"] = json!({"poststart": failing_then_logging("second", &l)});
    });
    for verb in ["start", "run"] {
        let _ = fs::remove_file(&log);
        let id = unique_id("poststart");
        let _c = env.guard(&id);
        let out = if verb == "start" {
            env.ok(&["create", "--bundle", b.to_str().unwrap(), &id]);
            env.ok(&["start", &id])
        } else {
            env.ok(&["run", "-d", "--bundle", b.to_str().unwrap(), &id])
        };
        assert!(
            out.stderr.contains("warning") && out.stderr.contains("poststart"),
            "{verb}: no warning naming the hook: {out:?}"
        );
        assert_eq!(env.status(&id), "running", "{verb}");
        let text = fs::read_to_string(&log).expect("the second poststart hook did not run");
        assert!(text.starts_with("second "), "{text}");
        // The record keeps its hooks: poststart hooks do not run again, and the
        // container deletes cleanly.
        env.ok(&["delete", "--force", &id]);
        assert_eq!(fs::read_to_string(&log).unwrap(), text);
        env.assert_nothing_left(&id, Some(&b));
    }
}

/// The `oom_kill_disable` value of `pid`'s v1 memory cgroup.
fn oom_kill_disable(pid: i32) -> String {
    let text = fs::read_to_string(cgroup_dir(pid, "memory").join("memory.oom_control")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill_disable "))
        .unwrap_or_else(|| panic!("no oom_kill_disable in memory.oom_control: {text}"))
        .trim()
        .to_string()
}

#[test]
fn disable_oom_killer_is_applied_and_kept_by_update() {
    // libcontainer 0.7 applied every cgroup with the OOM killer enabled, whatever
    // linux.resources.memory.disableOOMKiller said; runc honours it on cgroup v1.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    edit_config(&b, |c| {
        c["linux"]["resources"]["memory"] =
            json!({"limit": 64 * 1024 * 1024, "disableOOMKiller": true});
    });
    for verb in [&["run", "-d"][..], &["create"]] {
        let id = unique_id("nooom");
        let _c = env.guard(&id);
        let mut args = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &id]);
        env.ok(&args);
        // Set before `start` runs the user's process.
        assert_eq!(oom_kill_disable(env.pid(&id)), "1", "{verb:?}");
        env.ok(&["update", "--memory", "80m", &id]);
        assert_eq!(oom_kill_disable(env.pid(&id)), "1", "update re-enabled it");
    }
    // Without the setting the OOM killer stays on.
    let on = env.bundle("on", &["sleep", "100"]);
    edit_config(&on, |c| {
        c["linux"]["resources"]["memory"] = json!({"limit": 64 * 1024 * 1024});
    });
    let id = unique_id("oom");
    let _c = env.run_detached(&on, &id);
    assert_eq!(oom_kill_disable(env.pid(&id)), "0");
    if crate::common::runc_bin().is_some() {
        let runc = Env::runc();
        let id = unique_id("nooom-runc");
        let _c = runc.run_detached(&b, &id);
        assert_eq!(oom_kill_disable(runc.pid(&id)), "1", "runc");
    }
}

/// A v1 freezer cgroup of the test's own, frozen by a hook; thawed, emptied and
/// removed on drop.
struct TestFreezer(std::path::PathBuf);

impl TestFreezer {
    fn thaw(&self) {
        let _ = fs::write(self.0.join("freezer.state"), "THAWED");
    }
}

impl Drop for TestFreezer {
    fn drop(&mut self) {
        self.thaw();
        if let Ok(procs) = fs::read_to_string(self.0.join("cgroup.procs")) {
            for p in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) with a pid and a signal number; no memory involved.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        crate::common::wait_until(
            "the test freezer cgroup to empty",
            Duration::from_secs(10),
            || {
                fs::read_to_string(self.0.join("cgroup.procs"))
                    .map_or(true, |t| t.trim().is_empty())
            },
        );
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn failed_create_removes_its_cgroups_even_when_they_stay_busy() {
    // On a failed create (here a failing createRuntime hook) libcontainer makes one
    // SIGKILL pass over the container's cgroups, retries rmdir for ~100 ms, gives
    // up at the first hierarchy still busy and removes the container directory,
    // the only record of the cgroup: a process that had not exited by then (the
    // killed init on a loaded host) left `:youki:<id>` cgroups in the memory and
    // pids hierarchies. Here the hook puts a process that cannot die yet (frozen
    // in a freezer cgroup of the test's) into them; stasis must notice, keep
    // killing and wait, and remove them once the process is gone.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    let id = unique_id("busycg");
    let freezer =
        TestFreezer(std::path::Path::new("/sys/fs/cgroup/freezer").join(format!("test-{id}")));
    fs::create_dir(&freezer.0).unwrap();
    let fz = freezer.0.display().to_string();
    let hook = format!(
        "read -r s; sleep 100 & p=$!\n\
         for c in memory pids; do echo $p > /sys/fs/cgroup/$c/:youki:{id}/cgroup.procs || exit 9; done\n\
         echo $p > {fz}/cgroup.procs && echo FROZEN > {fz}/freezer.state || exit 9\n\
         until grep -qx FROZEN {fz}/freezer.state; do :; done\n\
         exit 3"
    );
    edit_config(&b, |c| {
        c["hooks"] = json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", hook]}]});
    });
    let _c = env.guard(&id);
    let stderr = env.path("create.err");
    let mut child = std::process::Command::new(&env.bin)
        .arg("--root")
        .arg(&env.root)
        .args(["create", "--bundle", b.to_str().unwrap(), &id])
        .env("STASIS_FAULT", "cgroup-remove.busy:stop")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Proceed whatever happens, so that a failed assertion cannot leave it stopped.
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
        }
    }
    let cont = Cont(pid);
    // libcontainer's own cleanup failed: stasis is retrying, the cgroups are there.
    crate::common::wait_stopped_at_fault(pid, Duration::from_secs(60));
    let left = cgroups_named(&id);
    assert!(!left.is_empty(), "the busy cgroups are already gone");
    freezer.thaw();
    drop(cont);
    let status = child.wait().unwrap();
    let err = fs::read_to_string(&stderr).unwrap();
    assert!(
        !status.success() && err.contains("hook"),
        "{status:?}: {err}"
    );
    env.assert_nothing_left(&id, Some(&b));
}
