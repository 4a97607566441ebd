//! Every verb and every legal state transition, checked through the CLI.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::common::{add_bind, cgroup_dir, cgroups_named, read_trim, unique_id, wait_until, Env};

#[test]
fn spec_writes_default_config_and_refuses_to_overwrite() {
    requires!(root);
    let env = Env::new();
    let b = env.path("specb");
    fs::create_dir_all(&b).unwrap();
    env.ok(&["spec", "--bundle", b.to_str().unwrap()]);
    let cfg = b.join("config.json");
    let v: Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    assert!(v["ociVersion"].is_string(), "{v}");
    assert_eq!(v["root"]["path"], "rootfs");
    assert!(v["process"]["args"].is_array(), "{v}");
    let nss: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(
        !nss.contains(&"user"),
        "a root spec has no user namespace: {nss:?}"
    );

    // A second spec must not touch the existing file.
    fs::write(&cfg, b"{\"mine\": true}").unwrap();
    let out = env.run(&["spec", "--bundle", b.to_str().unwrap()]);
    out.fails_with_one_line(&["config.json"]);
    assert_eq!(fs::read(&cfg).unwrap(), b"{\"mine\": true}");

    // Without --bundle it writes into the current directory (short flag form -b too).
    let c = env.path("cwd");
    fs::create_dir_all(&c).unwrap();
    let out = std::process::Command::new(&env.bin)
        .arg("--root")
        .arg(&env.root)
        .arg("spec")
        .current_dir(&c)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(c.join("config.json").is_file());
}

#[test]
fn spec_rootless_maps_the_caller() {
    requires!(root);
    let env = Env::new();
    let b = env.path("rl");
    fs::create_dir_all(&b).unwrap();
    env.ok(&["spec", "--rootless", "--bundle", b.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&fs::read(b.join("config.json")).unwrap()).unwrap();
    let nss: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(nss.contains(&"user"), "{nss:?}");
    assert!(
        !nss.contains(&"network"),
        "rootless has no network ns: {nss:?}"
    );
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!(v["linux"]["uidMappings"][0]["hostID"], uid);
    assert_eq!(v["linux"]["uidMappings"][0]["size"], 1);
    assert_eq!(v["linux"]["gidMappings"][0]["hostID"], gid);
}

#[test]
fn create_start_pause_resume_kill_delete() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("life");
    let _c = env.create(&b, &id);

    let st = env.state(&id);
    assert_eq!(st["status"], "created");
    assert_eq!(st["id"], id.as_str());
    let pid = st["pid"].as_i64().unwrap() as i32;
    assert!(pid > 0, "{st}");
    assert!(fs::metadata(format!("/proc/{pid}")).is_ok());
    let memcg = cgroup_dir(pid, "memory");
    assert!(memcg.is_dir(), "{}", memcg.display());

    env.ok(&["start", &id]);
    assert_eq!(env.status(&id), "running");
    assert_eq!(env.pid(&id), pid, "start keeps the init pid");

    env.ok(&["pause", &id]);
    assert_eq!(env.status(&id), "paused");
    let freezer = cgroup_dir(pid, "freezer");
    assert_eq!(read_trim(&freezer.join("freezer.state")), "FROZEN");

    env.ok(&["resume", &id]);
    assert_eq!(env.status(&id), "running");
    assert_eq!(read_trim(&freezer.join("freezer.state")), "THAWED");

    env.ok(&["kill", &id, "KILL"]);
    env.wait_status(&id, "stopped");
    assert_eq!(
        env.state(&id)["pid"],
        0,
        "a stopped container reports pid 0"
    );

    env.ok(&["delete", &id]);
    let out = env.run(&["state", &id]);
    out.fails_with_one_line(&[&id]);
    assert_eq!(env.root_entries(), Vec::<String>::new());
    assert!(
        !memcg.exists(),
        "cgroup {} survived delete",
        memcg.display()
    );
    assert_eq!(cgroups_named(&id), Vec::<std::path::PathBuf>::new());
}

#[test]
fn delete_created_container_without_force() {
    // runc and crun delete a created (never started) container without --force.
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("delcreated");
    let _c = env.create(&b, &id);
    let pid = env.pid(&id);
    env.ok(&["delete", &id]);
    wait_until("init gone", Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
    });
    assert_eq!(env.root_entries(), Vec::<String>::new());
}

#[test]
fn run_detached_then_list_table_json_quiet() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id1 = unique_id("lista");
    let id2 = unique_id("listb");
    let _c1 = env.run_detached(&b, &id1);
    let _c2 = env.create(&b, &id2);
    assert_eq!(env.status(&id1), "running");

    let table = env.ok(&["list"]).stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"]
    );
    let row1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row1[0], id1);
    assert_eq!(row1[1], env.pid(&id1).to_string());
    assert_eq!(row1[2], "running");
    assert_eq!(row1[3], b.canonicalize().unwrap().to_str().unwrap());
    assert_eq!(row1[5], "root");
    let row2: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!((row2[0], row2[2]), (id2.as_str(), "created"));

    let json = env.ok(&["list", "--format", "json"]).json();
    let arr = json.as_array().expect("list json is an array");
    let ids: Vec<&str> = arr.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id1.as_str(), id2.as_str()]);
    assert_eq!(arr[0]["status"], "running");
    assert_eq!(arr[1]["status"], "created");
    assert_eq!(arr[0]["owner"], "root");

    let quiet = env.ok(&["list", "--quiet"]).stdout;
    assert_eq!(quiet, format!("{id1}\n{id2}\n"));

    // An empty root lists a header only / an empty JSON array.
    let empty = Env::new();
    let t = empty.ok(&["list"]).stdout;
    assert_eq!(t.lines().count(), 1, "{t}");
    let j = empty.ok(&["list", "--format", "json"]).json();
    assert!(
        j.as_array().map(|a| a.is_empty()).unwrap_or(j.is_null()),
        "empty list json: {j}"
    );
}

#[test]
fn run_foreground_returns_exit_code_and_forwards_stdout() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle(
        "b",
        &["sh", "-c", "echo hello from inside; echo err >&2; exit 3"],
    );
    let id = unique_id("fg");
    let _c = env.guard(&id);
    let out = env
        .run(&["run", "--bundle", b.to_str().unwrap(), &id])
        .code_is(3);
    assert_eq!(out.stdout, "hello from inside\n");
    assert_eq!(out.stderr, "err\n");
    // A foreground run deletes its container.
    assert_eq!(env.root_entries(), Vec::<String>::new());
    assert_eq!(cgroups_named(&id), Vec::<std::path::PathBuf>::new());

    let b0 = env.bundle("b0", &["true"]);
    let id0 = unique_id("fg0");
    let _c0 = env.guard(&id0);
    env.run(&["run", "--bundle", b0.to_str().unwrap(), &id0])
        .code_is(0);
}

#[test]
fn run_foreground_killed_by_signal_exits_128_plus_n() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("fgsig");
    let _c = env.guard(&id);
    let run = env.spawn(&["run", "--bundle", b.to_str().unwrap(), &id], None);
    wait_until("container running", Duration::from_secs(10), || {
        env.run(&["state", &id]).stdout.contains("\"running\"")
    });
    env.ok(&["kill", &id, "9"]);
    run.wait(Duration::from_secs(10)).code_is(128 + 9);
    assert_eq!(env.root_entries(), Vec::<String>::new());
}

#[test]
fn run_foreground_forwards_sigterm() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done",
        ],
    );
    let id = unique_id("fwd");
    let _c = env.guard(&id);
    let run = env.spawn(&["run", "--bundle", b.to_str().unwrap(), &id], None);
    // "ready" is printed after the trap is set: a TERM before that would be
    // ignored by the container's init.
    wait_until("container ready", Duration::from_secs(10), || {
        run.stdout_so_far().contains("ready")
    });
    // SAFETY: kill(2) on the pid of our own child.
    let rc = unsafe { libc::kill(run.pid(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    run.wait(Duration::from_secs(10)).code_is(42);
}

#[test]
fn kill_by_name_number_and_default_sigterm() {
    requires!(root, busybox);
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    let b = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'echo usr1 >> /data/log' USR1; trap 'echo usr2 >> /data/log' USR2; \
             trap 'echo term >> /data/log; exit 0' TERM; echo ready > /data/ready; \
             while true; do sleep 0.05; done",
        ],
    );
    add_bind(&b, &data, "/data");
    let id = unique_id("kill");
    let _c = env.run_detached(&b, &id);
    wait_until("traps set", Duration::from_secs(10), || {
        data.join("ready").exists()
    });
    let log = || fs::read_to_string(data.join("log")).unwrap_or_default();

    env.ok(&["kill", &id, "USR1"]);
    wait_until("usr1 by name", Duration::from_secs(5), || log() == "usr1\n");
    env.ok(&["kill", &id, "SIGUSR2"]);
    wait_until("usr2 by SIG name", Duration::from_secs(5), || {
        log() == "usr1\nusr2\n"
    });
    env.ok(&["kill", &id, "10"]);
    wait_until("usr1 by number", Duration::from_secs(5), || {
        log() == "usr1\nusr2\nusr1\n"
    });
    assert_eq!(env.status(&id), "running");
    env.ok(&["kill", &id]);
    wait_until("term by default", Duration::from_secs(5), || {
        log().ends_with("term\n")
    });
    env.wait_status(&id, "stopped");
    env.ok(&["delete", &id]);
}

#[test]
fn kill_all_signals_every_process() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sh", "-c", "sleep 100 & sleep 100 & wait"]);
    let id = unique_id("killall");
    let _c = env.run_detached(&b, &id);
    wait_until("three processes", Duration::from_secs(10), || {
        env.pids(&id).len() == 3
    });
    let pids = env.pids(&id);
    env.ok(&["kill", "--all", &id, "KILL"]);
    env.wait_status(&id, "stopped");
    wait_until("every process gone", Duration::from_secs(5), || {
        pids.iter().all(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true)
        })
    });
    env.ok(&["delete", &id]);
}

#[test]
fn delete_force_running_and_missing() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("delf");
    let _c = env.run_detached(&b, &id);
    let pid = env.pid(&id);
    let memcg = cgroup_dir(pid, "memory");
    env.ok(&["delete", "--force", &id]);
    assert_eq!(env.root_entries(), Vec::<String>::new());
    assert!(!memcg.exists(), "{} survived", memcg.display());
    wait_until("init gone", Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
    });

    // Missing: --force succeeds quietly, without it fails naming the id.
    let out = env.ok(&["delete", "--force", "never-existed"]);
    assert_eq!(out.stderr, "");
    env.run(&["delete", "never-existed"])
        .fails_with_one_line(&["never-existed"]);
}

#[test]
fn ps_table_and_json() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("ps");
    let _c = env.run_detached(&b, &id);
    let pid = env.pid(&id);
    assert_eq!(env.pids(&id), [pid as i64]);

    let table = env.ok(&["ps", &id]).stdout;
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert!(header.split_whitespace().any(|c| c == "PID"), "{table}");
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 1, "{table}");
    assert!(
        rows[0].split_whitespace().any(|c| c == pid.to_string()),
        "{table}"
    );
    let table = env.ok(&["ps", "--format", "table", &id]).stdout;
    assert!(table.contains("sleep"), "{table}");

    env.ok(&["exec", "--detach", &id, "sleep", "50"]);
    wait_until("exec'd process in ps", Duration::from_secs(5), || {
        env.pids(&id).len() == 2
    });
}

#[test]
fn exec_args_stdout_and_exit_code() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("exec");
    let _c = env.run_detached(&b, &id);
    let out = env
        .run(&["exec", &id, "sh", "-c", "echo out; echo err >&2; exit 7"])
        .code_is(7);
    assert_eq!(out.stdout, "out\n");
    assert_eq!(out.stderr, "err\n");
    // Arguments that look like flags belong to the command.
    let out = env.ok(&["exec", &id, "echo", "-n", "--all", "x y"]);
    assert_eq!(out.stdout, "--all x y");
    // The exec'd process sees the container's pid namespace and hostname.
    let out = env.ok(&["exec", &id, "sh", "-c", "echo $$; hostname"]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_ne!(lines[0], "1");
    assert_eq!(lines[1], "stasis");
}

#[test]
fn exec_process_file() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execp");
    let _c = env.run_detached(&b, &id);
    let proc_file = env.path("process.json");
    let process = serde_json::json!({
        "terminal": false,
        "user": {"uid": 65534, "gid": 65534},
        "args": ["sh", "-c", "echo $GREETING; pwd; id -u; id -g; exit 5"],
        "env": ["PATH=/bin:/usr/bin", "GREETING=from-process-file"],
        "cwd": "/tmp"
    });
    fs::write(&proc_file, serde_json::to_vec(&process).unwrap()).unwrap();
    let out = env
        .run(&["exec", "--process", proc_file.to_str().unwrap(), &id])
        .code_is(5);
    assert_eq!(out.stdout, "from-process-file\n/tmp\n65534\n65534\n");
}

#[test]
fn exec_detach_writes_pid_file() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execd");
    let _c = env.run_detached(&b, &id);
    let pid_file = env.path("exec.pid");
    env.ok(&[
        "exec",
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        &id,
        "sleep",
        "77",
    ]);
    let pid: i64 = read_trim(&pid_file)
        .parse()
        .expect("pid file holds a number");
    assert!(pid > 0);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert_eq!(cmdline, b"sleep\x0077\x00");
    assert!(env.pids(&id).contains(&pid), "exec'd pid in ps");

    // create --pid-file records the init pid.
    let id2 = unique_id("createpid");
    let pf2 = env.path("init.pid");
    let _c2 = env.guard(&id2);
    env.ok(&[
        "create",
        "--pid-file",
        pf2.to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        &id2,
    ]);
    assert_eq!(read_trim(&pf2), env.pid(&id2).to_string());
}

#[test]
fn exec_cwd_env_user() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execopts");
    let _c = env.run_detached(&b, &id);
    let out = env.ok(&[
        "exec",
        "--cwd",
        "/tmp",
        "--env",
        "FOO=bar baz",
        "-e",
        "TWO=2",
        "--user",
        "1000:1001",
        &id,
        "sh",
        "-c",
        "pwd; echo $FOO; echo $TWO; id -u; id -g",
    ]);
    assert_eq!(out.stdout, "/tmp\nbar baz\n2\n1000\n1001\n");
    // The container's own env stays visible next to --env.
    let out = env.ok(&["exec", "-e", "X=1", &id, "sh", "-c", "echo $TERM$X"]);
    assert_eq!(out.stdout, "xterm1\n");
}

#[test]
fn pause_stops_the_process_and_resume_continues_it() {
    requires!(root, busybox);
    let env = Env::new();
    let data = env.path("data");
    fs::create_dir_all(&data).unwrap();
    let b = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /data/c.tmp; mv /data/c.tmp /data/c; sleep 0.02; done",
        ],
    );
    add_bind(&b, &data, "/data");
    let id = unique_id("pause");
    let _c = env.run_detached(&b, &id);
    let count = || -> u64 {
        fs::read_to_string(data.join("c"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until("counter starts", Duration::from_secs(10), || count() > 2);

    env.ok(&["pause", &id]);
    let a = count();
    std::thread::sleep(Duration::from_millis(400));
    let b2 = count();
    assert_eq!(a, b2, "counter moved while paused");
    assert_eq!(env.status(&id), "paused");

    env.ok(&["resume", &id]);
    wait_until(
        "counter advances after resume",
        Duration::from_secs(5),
        || count() > b2 + 2,
    );
    assert_eq!(env.status(&id), "running");
}

#[test]
fn update_memory_and_pids_flags() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("upd");
    let _c = env.run_detached(&b, &id);
    let pid = env.pid(&id);
    let mem = cgroup_dir(pid, "memory");
    let pids = cgroup_dir(pid, "pids");
    env.ok(&["update", "--memory", "64m", "--pids-limit", "20", &id]);
    assert_eq!(read_trim(&mem.join("memory.limit_in_bytes")), "67108864");
    assert_eq!(read_trim(&pids.join("pids.max")), "20");

    env.ok(&["update", "--memory", "100m", "--memory-swap", "200m", &id]);
    assert_eq!(read_trim(&mem.join("memory.limit_in_bytes")), "104857600");
    let memsw = mem.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        assert_eq!(read_trim(&memsw), "209715200");
    }
    // pids limit unchanged by a memory-only update.
    assert_eq!(read_trim(&pids.join("pids.max")), "20");
    env.ok(&["update", "--pids-limit", "-1", &id]);
    assert_eq!(read_trim(&pids.join("pids.max")), "max");
}

#[test]
fn update_resources_file_and_stdin() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("updr");
    let _c = env.run_detached(&b, &id);
    let pid = env.pid(&id);
    let mem = cgroup_dir(pid, "memory");
    let pids = cgroup_dir(pid, "pids");

    let file = env.path("res.json");
    fs::write(
        &file,
        br#"{"memory": {"limit": 134217728}, "pids": {"limit": 33}}"#,
    )
    .unwrap();
    env.ok(&["update", "--resources", file.to_str().unwrap(), &id]);
    assert_eq!(read_trim(&mem.join("memory.limit_in_bytes")), "134217728");
    assert_eq!(read_trim(&pids.join("pids.max")), "33");

    env.run_stdin(
        &["update", "--resources", "-", &id],
        br#"{"memory": {"limit": 83886080}, "pids": {"limit": 44}}"#,
    )
    .expect_ok();
    assert_eq!(read_trim(&mem.join("memory.limit_in_bytes")), "83886080");
    assert_eq!(read_trim(&pids.join("pids.max")), "44");

    // A flag wins over the file.
    env.ok(&[
        "update",
        "--resources",
        file.to_str().unwrap(),
        "--pids-limit",
        "55",
        &id,
    ]);
    assert_eq!(read_trim(&pids.join("pids.max")), "55");
    assert_eq!(read_trim(&mem.join("memory.limit_in_bytes")), "134217728");

    // The container still works under the new limits.
    env.ok(&["exec", &id, "true"]);
}

#[test]
fn events_stats_and_features_are_json() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("events");
    let _c = env.run_detached(&b, &id);
    let out = env.ok(&["events", "--stats", &id]);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    let ev: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], id.as_str());
    assert!(ev["data"]["memory"].is_object(), "{ev}");
    assert!(
        ev["data"]["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "memory usage of a live container: {ev}"
    );
    assert_eq!(ev["data"]["pids"]["current"], 1, "{ev}");
    assert!(ev["data"]["cpu"].is_object(), "{ev}");

    let f = env.ok(&["features"]).json();
    assert!(f["ociVersionMin"].is_string(), "{f}");
    assert!(f["ociVersionMax"].is_string(), "{f}");
    assert!(f["linux"]["namespaces"].is_array(), "{f}");
}

#[test]
fn events_streams_until_the_container_stops() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("evstream");
    let _c = env.run_detached(&b, &id);
    let ev = env.spawn(&["events", "--interval", "100ms", &id], None);
    wait_until("two stats records", Duration::from_secs(10), || {
        ev.stdout_so_far().lines().count() >= 2
    });
    env.ok(&["kill", &id, "KILL"]);
    let out = ev.wait(Duration::from_secs(10)).expect_ok();
    for l in out.stdout.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["type"], "stats");
    }
}

#[test]
fn exec_killed_by_signal_exits_128_plus_n() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execsig");
    let _c = env.run_detached(&b, &id);
    // Not the container's init, so SIGKILL from inside is delivered.
    env.run(&["exec", &id, "sh", "-c", "kill -9 $$"])
        .code_is(128 + 9);
    env.run(&["exec", &id, "sh", "-c", "kill -TERM $$"])
        .code_is(128 + 15);
    assert_eq!(env.status(&id), "running");
}

#[test]
fn relative_and_default_bundle_are_recorded_absolute() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let abs = b.canonicalize().unwrap();
    let id1 = unique_id("relb");
    let id2 = unique_id("defb");
    let _g1 = env.guard(&id1);
    let _g2 = env.guard(&id2);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&env.bin)
            .arg("--root")
            .arg(&env.root)
            .args(args)
            .current_dir(env.dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(out.success(), "{args:?}");
    };
    run(&["create", "--bundle", "b", &id1]);
    assert_eq!(env.state(&id1)["bundle"], abs.to_str().unwrap());
    assert_eq!(
        env.state(&id1)["rootfs"],
        abs.join("rootfs").to_str().unwrap()
    );
    // Without --bundle the current directory is the bundle.
    let out = std::process::Command::new(&env.bin)
        .arg("--root")
        .arg(&env.root)
        .args(["create", &id2])
        .current_dir(&b)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(out.success());
    assert_eq!(env.state(&id2)["bundle"], abs.to_str().unwrap());
}

#[test]
fn run_detached_pid_file() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("runpid");
    let pf = env.path("run.pid");
    let _c = env.guard(&id);
    env.ok(&[
        "run",
        "-d",
        "--pid-file",
        pf.to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        &id,
    ]);
    assert_eq!(read_trim(&pf), env.pid(&id).to_string());
}

#[test]
fn container_that_exits_by_itself_is_stopped_and_deletable() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sh", "-c", "exit 0"]);
    let id = unique_id("selfexit");
    let _c = env.run_detached(&b, &id);
    env.wait_status(&id, "stopped");
    assert_eq!(env.state(&id)["pid"], 0);
    let listed = env.ok(&["list", "--format", "json"]).json();
    assert_eq!(listed[0]["status"], "stopped");
    env.ok(&["delete", &id]);
    env.assert_nothing_left(&id, Some(&b));
}

#[test]
fn concurrent_starts_one_wins() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("race");
    let _c = env.create(&b, &id);
    let starts: Vec<_> = (0..4).map(|_| env.spawn(&["start", &id], None)).collect();
    let codes: Vec<Option<i32>> = starts
        .into_iter()
        .map(|s| s.wait(Duration::from_secs(30)).code)
        .collect();
    let wins = codes.iter().filter(|c| **c == Some(0)).count();
    assert_eq!(wins, 1, "exactly one start succeeds: {codes:?}");
    assert_eq!(env.status(&id), "running");
    assert_eq!(env.pids(&id).len(), 1);
}

#[test]
fn corrupt_state_file_is_named_and_delete_force_cleans_up() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("corrupt");
    let _c = env.run_detached(&b, &id);
    let pid = env.pid(&id);
    let memcg = cgroup_dir(pid, "memory");
    let state_file = env.root.join(&id).join("stasis.json");
    assert!(state_file.is_file(), "{}", state_file.display());
    fs::write(&state_file, "{garbage").unwrap();
    env.run(&["state", &id])
        .fails_with_one_line(&[state_file.to_str().unwrap()]);
    env.ok(&["delete", "--force", &id]);
    assert_eq!(env.root_entries(), Vec::<String>::new());
    assert!(!memcg.exists(), "{} survived", memcg.display());
    wait_until("init gone", Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
    });
}

#[test]
fn run_foreground_keep_leaves_a_stopped_container() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sh", "-c", "exit 4"]);
    let id = unique_id("keep");
    let _c = env.guard(&id);
    env.run(&["run", "--keep", "--bundle", b.to_str().unwrap(), &id])
        .code_is(4);
    let st = env.state(&id);
    assert_eq!(
        (st["status"].as_str(), st["pid"].as_i64()),
        (Some("stopped"), Some(0))
    );
    env.ok(&["delete", &id]);
    env.assert_nothing_left(&id, Some(&b));
}

#[test]
fn exec_foreground_forwards_sigterm() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execfwd");
    let _c = env.run_detached(&b, &id);
    let ex = env.spawn(
        &[
            "exec",
            &id,
            "sh",
            "-c",
            "trap 'exit 43' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        None,
    );
    wait_until("exec ready", Duration::from_secs(10), || {
        ex.stdout_so_far().contains("ready")
    });
    // SAFETY: kill(2) on the pid of our own child.
    assert_eq!(unsafe { libc::kill(ex.pid(), libc::SIGTERM) }, 0);
    ex.wait(Duration::from_secs(10)).code_is(43);
    assert_eq!(env.status(&id), "running", "only the exec'd process exited");
}

#[test]
fn log_file_in_json_format() {
    requires!(root);
    let env = Env::new();
    let log = env.path("log.json");
    let out = env.run(&[
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "state",
        "ghost",
    ]);
    out.fails_with_one_line(&["ghost"]);
    let text = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["level"], "error");
    assert!(v["msg"].as_str().unwrap().contains("ghost"), "{v}");
    assert!(
        chrono::DateTime::parse_from_rfc3339(v["time"].as_str().unwrap()).is_ok(),
        "{v}"
    );
}

#[test]
fn run_foreground_sigterm_during_setup_is_not_lost() {
    // SIGTERM sent again and again from the moment `run` takes its lock: stasis must
    // never die of it (leaving the container behind) but forward it once the
    // container runs.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle(
        "b",
        &[
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.05; done",
        ],
    );
    let id = unique_id("earlyterm");
    let _c = env.guard(&id);
    let mut run = env.spawn(&["run", "--bundle", b.to_str().unwrap(), &id], None);
    wait_until("run took its lock", Duration::from_secs(10), || {
        env.root.join(".locks").exists()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while run.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "run did not exit");
        // SAFETY: kill(2) on the pid of our own (not yet reaped) child.
        unsafe { libc::kill(run.pid(), libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(10));
    }
    run.wait(Duration::from_secs(1)).code_is(42);
    env.assert_nothing_left(&id, Some(&b));
}

#[test]
fn parallel_create_and_delete_force_leave_nothing() {
    // A killed init keeps its v1 cgroup busy until the host's init reaps it; under
    // load that took longer than libcgroups' ~100 ms of rmdir retries and
    // `delete --force` failed, leaving the container and its cgroups.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (env, b) = (&env, &b);
            s.spawn(move || {
                for i in 0..8 {
                    let id = unique_id(&format!("par{t}x{i}"));
                    let _g = env.guard(&id);
                    env.ok(&["create", "--bundle", b.to_str().unwrap(), &id]);
                    env.ok(&["delete", "--force", &id]);
                    assert_eq!(
                        crate::common::cgroups_named(&id),
                        Vec::<std::path::PathBuf>::new()
                    );
                }
            });
        }
    });
    assert_eq!(env.root_entries(), Vec::<String>::new());
}
