//! Illegal transitions and bad input: each exits non-zero with one stderr line that
//! names what and where, changes nothing, and (for create/run) leaves nothing behind.

use std::fs;
use std::path::Path;

use crate::common::{cgroups_named, edit_config, unique_id, wait_until, Env};

#[test]
fn illegal_transitions_are_refused_and_change_nothing() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("illegal");
    let _c = env.create(&b, &id);

    // exec, pause and resume need a running container.
    env.run(&["pause", &id])
        .fails_with_one_line(&[&id, "created"]);
    env.run(&["resume", &id])
        .fails_with_one_line(&[&id, "created"]);
    env.run(&["exec", &id, "true"])
        .fails_with_one_line(&[&id, "created"]);
    assert_eq!(env.status(&id), "created");

    env.ok(&["start", &id]);
    // start twice
    env.run(&["start", &id])
        .fails_with_one_line(&[&id, "running"]);
    // delete a running one without --force
    env.run(&["delete", &id])
        .fails_with_one_line(&[&id, "running", "--force"]);
    assert_eq!(env.status(&id), "running");
    // resume a running one
    env.run(&["resume", &id])
        .fails_with_one_line(&[&id, "running"]);
    assert_eq!(env.status(&id), "running");

    env.ok(&["pause", &id]);
    // pause a paused one
    env.run(&["pause", &id])
        .fails_with_one_line(&[&id, "paused"]);
    // exec in a paused one
    env.run(&["exec", &id, "true"])
        .fails_with_one_line(&[&id, "paused"]);
    // start a paused one
    env.run(&["start", &id])
        .fails_with_one_line(&[&id, "paused"]);
    assert_eq!(env.status(&id), "paused");
    env.ok(&["resume", &id]);

    env.ok(&["kill", &id, "KILL"]);
    env.wait_status(&id, "stopped");
    // kill a stopped one
    env.run(&["kill", &id, "KILL"])
        .fails_with_one_line(&[&id, "stopped"]);
    // start, pause, exec on a stopped one
    env.run(&["start", &id])
        .fails_with_one_line(&[&id, "stopped"]);
    env.run(&["pause", &id])
        .fails_with_one_line(&[&id, "stopped"]);
    env.run(&["exec", &id, "true"])
        .fails_with_one_line(&[&id, "stopped"]);
    env.run(&["ps", &id]).fails_with_one_line(&[&id, "stopped"]);
    assert_eq!(env.status(&id), "stopped");
    // and a stopped one can be deleted without --force
    env.ok(&["delete", &id]);
    assert_eq!(env.root_entries(), Vec::<String>::new());
}

#[test]
fn verbs_on_a_missing_container_name_it() {
    requires!(root);
    let env = Env::new();
    for args in [
        &["start", "ghost"][..],
        &["state", "ghost"],
        &["kill", "ghost"],
        &["pause", "ghost"],
        &["resume", "ghost"],
        &["ps", "ghost"],
        &["exec", "ghost", "true"],
        &["update", "--pids-limit", "5", "ghost"],
        &["events", "--stats", "ghost"],
        &["delete", "ghost"],
    ] {
        env.run(args).fails_with_one_line(&["ghost"]);
    }
    assert_eq!(env.root_entries(), Vec::<String>::new());
}

/// Runs `create` and then `run` on `bundle` with a fresh id; both must fail with
/// one line containing `needles`, and leave nothing behind.
fn create_and_run_fail(env: &Env, bundle: &Path, needles: &[&str]) {
    for verb in [&["create"][..], &["run", "-d"], &["run"]] {
        let id = unique_id("bad");
        let _g = env.guard(&id);
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--bundle", bundle.to_str().unwrap(), &id]);
        env.run(&args).fails_with_one_line(needles);
        env.assert_nothing_left(&id, Some(bundle));
    }
}

#[test]
fn malformed_config_json() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    fs::write(
        b.join("config.json"),
        "{\"ociVersion\": \"1.0.2\", \"process\": ",
    )
    .unwrap();
    let cfg = b.join("config.json");
    create_and_run_fail(&env, &b, &[cfg.to_str().unwrap()]);

    // Valid JSON of the wrong shape.
    fs::write(&cfg, "{\"ociVersion\": 5}").unwrap();
    create_and_run_fail(&env, &b, &[cfg.to_str().unwrap()]);
}

#[test]
fn missing_config_json() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    fs::remove_file(b.join("config.json")).unwrap();
    create_and_run_fail(&env, &b, &[b.to_str().unwrap(), "config.json"]);
}

#[test]
fn missing_rootfs() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    fs::remove_dir_all(b.join("rootfs")).unwrap();
    create_and_run_fail(&env, &b, &[b.join("rootfs").to_str().unwrap()]);
}

#[test]
fn missing_bundle_and_bundle_that_is_a_file() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let file = env.path("not-a-dir");
    fs::write(&file, "x").unwrap();
    create_and_run_fail(&env, &file, &[file.to_str().unwrap(), "not a directory"]);
    let gone = env.path("no-such-bundle");
    create_and_run_fail(&env, &gone, &[gone.to_str().unwrap()]);
}

#[test]
fn missing_executable_leaves_nothing() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["/no/such/binary"]);
    for verb in [&["create"][..], &["run", "-d"], &["run"]] {
        let id = unique_id("noexe");
        let _g = env.guard(&id);
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &id]);
        env.run(&args).fails_with_one_line(&["/no/such/binary"]);
        env.assert_nothing_left(&id, Some(&b));
    }
}

#[test]
fn bad_mount_leaves_nothing() {
    // A failure deep inside container setup (after namespaces and cgroups exist).
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    let missing = env.path("no-such-source");
    edit_config(&b, |c| {
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/data", "type": "bind",
            "source": missing.to_str().unwrap(), "options": ["rbind"]
        }));
    });
    create_and_run_fail(&env, &b, &["no-such-source"]);
}

#[test]
fn unknown_signal_is_refused() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("badsig");
    let _c = env.run_detached(&b, &id);
    for sig in ["SIGNOPE", "NOPE", "0", "65", "9x", "SIGRTMIN+99"] {
        let out = env.run(&["kill", &id, sig]);
        out.fails_with_one_line(&[sig]);
    }
    assert_eq!(env.status(&id), "running");
}

#[test]
fn duplicate_id_is_refused_and_the_first_is_untouched() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("dup");
    let _c = env.run_detached(&b, &id);
    let before = env.state(&id);
    for verb in [&["create"][..], &["run", "-d"], &["run"]] {
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &id]);
        env.run(&args).fails_with_one_line(&[&id, "exists"]);
    }
    assert_eq!(env.state(&id), before);
    assert_eq!(env.pids(&id).len(), 1);
    assert_eq!(env.root_entries(), vec![id.clone()]);
}

#[test]
fn ids_with_slash_or_dotdot_are_refused() {
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    // A unique marker in each id, so a cgroup or directory made from it can be found.
    let u = unique_id("esc");
    let ids = [
        format!("a/{u}"),
        format!("../{u}"),
        format!("x/../{u}"),
        format!("{u}/"),
        format!("{u} sp"),
        "..".to_string(),
        ".".to_string(),
        String::new(),
    ];
    for id in &ids {
        let id = id.as_str();
        for verb in [&["create"][..], &["run", "-d"], &["run"]] {
            let mut args: Vec<&str> = verb.to_vec();
            args.extend(["--bundle", b.to_str().unwrap(), id]);
            let line = env.run(&args).fails_with_one_line(&["id"]);
            assert!(line.contains(&format!("{id:?}")), "names the id: {line}");
        }
        // Other verbs refuse it too, without touching anything.
        for verb in [
            &["state"][..],
            &["start"],
            &["delete"],
            &["delete", "--force"],
            &["kill"],
        ] {
            let mut args: Vec<&str> = verb.to_vec();
            args.push(id);
            env.run(&args).fails_with_one_line(&["id"]);
        }
    }
    env.assert_nothing_left(&u, Some(&b));
    assert!(!env.path(&u).exists(), "escaped --root");
    for ctl in ["memory", "pids"] {
        assert!(!std::path::Path::new("/sys/fs/cgroup")
            .join(ctl)
            .join(&u)
            .exists());
    }
    let locks = env.root.join(".locks");
    if locks.exists() {
        let names: Vec<String> = fs::read_dir(&locks)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, Vec::<String>::new(), "lock files for invalid ids");
    }
}

#[test]
fn exec_errors_name_what_is_wrong() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("execerr");
    let _c = env.run_detached(&b, &id);
    let missing = env.path("no-process.json");
    env.run(&["exec", "--process", missing.to_str().unwrap(), &id])
        .fails_with_one_line(&[missing.to_str().unwrap()]);
    env.run(&["exec", &id]).fails_with_one_line(&["command"]);
    env.run(&["exec", "--env", "NOEQUALS", &id, "true"])
        .fails_with_one_line(&["NOEQUALS"]);
    env.run(&["exec", "--user", "bob", &id, "true"])
        .fails_with_one_line(&["bob"]);
    env.run(&["exec", &id, "/no/such/binary"])
        .fails_with_one_line(&["/no/such/binary"]);
    // None of this disturbed the container, and no failed process stayed in it.
    assert_eq!(env.status(&id), "running");
    let pids = env.pids(&id);
    let cmds: Vec<String> = pids
        .iter()
        .map(|p| fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
        .collect();
    assert_eq!(pids, [env.pid(&id) as i64], "{cmds:?}");
}

#[test]
fn update_errors() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let id = unique_id("upderr");
    let _c = env.run_detached(&b, &id);
    let bad = env.path("bad.json");
    fs::write(&bad, "{nope").unwrap();
    env.run(&["update", "--resources", bad.to_str().unwrap(), &id])
        .fails_with_one_line(&["--resources"]);
    let gone = env.path("gone.json");
    env.run(&["update", "--resources", gone.to_str().unwrap(), &id])
        .fails_with_one_line(&[gone.to_str().unwrap()]);
    env.run_stdin(&["update", "--resources", "-", &id], b"[1,2")
        .fails_with_one_line(&["--resources"]);
    assert_eq!(env.status(&id), "running");
}

#[test]
fn stopped_container_events_stats_fails() {
    requires!(root, busybox);
    let env = Env::new();
    let b = env.bundle("b", &["true"]);
    let id = unique_id("evstop");
    let _c = env.run_detached(&b, &id);
    wait_until("exit", std::time::Duration::from_secs(10), || {
        env.status(&id) == "stopped"
    });
    env.run(&["events", "--stats", &id])
        .fails_with_one_line(&[&id, "stopped"]);
}

/// Names of the lock files under `--root/.locks` (empty when there is none).
fn lock_files(env: &Env) -> Vec<String> {
    match fs::read_dir(env.root.join(".locks")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn ids_naming_private_entries_of_the_root_are_refused() {
    // stasis keeps `.locks` and `.copies` (restored copies' upper layers and
    // bundles) in --root: `delete --force .copies` wiped every copy's data,
    // `delete --force .locks` the lock directory, `run -d .hidden` made a container
    // that `list` never showed.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let u = unique_id("dot");
    let copy_data = env.root.join(".copies").join(&u).join("upper");
    fs::create_dir_all(&copy_data).unwrap();
    fs::write(copy_data.join("data"), "kept").unwrap();
    fs::create_dir_all(env.root.join(".locks")).unwrap();
    for id in [".copies", ".locks"] {
        for verb in [
            &["delete", "--force"][..],
            &["delete"],
            &["kill"],
            &["state"],
        ] {
            let mut args: Vec<&str> = verb.to_vec();
            args.push(id);
            let line = env.run(&args).fails_with_one_line(&[id, "'.'"]);
            assert!(line.contains("reserves"), "{line}");
        }
    }
    assert_eq!(fs::read_to_string(copy_data.join("data")).unwrap(), "kept");
    assert!(env.root.join(".locks").is_dir());
    let hidden = format!(".{u}");
    for verb in [&["create"][..], &["run", "-d"], &["run"]] {
        let _g = env.guard(&u); // in case the dot was dropped somewhere
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &hidden]);
        env.run(&args).fails_with_one_line(&[&hidden, "'.'"]);
    }
    let mut entries = env.root_entries();
    entries.sort();
    assert_eq!(entries, [".copies"], "left in --root");
    assert_eq!(cgroups_named(&u), Vec::<std::path::PathBuf>::new());
    assert_eq!(lock_files(&env), Vec::<String>::new());
    // restore --from checks its ids (and --name-prefix's) before it opens the store.
    let store = env.path("store");
    for args in [
        &["restore", "--from", "nosuch", "-d", &hidden][..],
        &[
            "restore",
            "--from",
            "nosuch",
            "--name-prefix",
            &hidden,
            "--copies",
            "2",
        ],
    ] {
        let mut full = vec!["--store", store.to_str().unwrap()];
        full.extend(args);
        env.run(&full).fails_with_one_line(&[&hidden, "'.'"]);
    }
    assert!(!store.exists(), "the store was created for a refused id");
}

#[test]
fn ids_too_long_for_a_file_name_are_refused_before_anything_is_created() {
    // Ids of 256-1024 bytes passed validation and then failed in mkdir with "File
    // name too long"; stasis also names files `stasis-checkpoint-<id>.log`, so the
    // limit is NAME_MAX (255) less what it adds.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["sleep", "100"]);
    let u = unique_id("long");
    let longest = format!("{u}{}", "a".repeat(233 - u.len()));
    for n in [234, 255, 256, 1024, 1025] {
        let id = format!("{u}{}", "a".repeat(n - u.len()));
        for verb in [&["create"][..], &["run", "-d"], &["run"]] {
            let _g = env.guard(&longest);
            let mut args: Vec<&str> = verb.to_vec();
            args.extend(["--bundle", b.to_str().unwrap(), &id]);
            let line = env
                .run(&args)
                .fails_with_one_line(&[&format!("{n} bytes"), "at most 233 bytes"]);
            assert!(line.len() < 400, "the error buries its reason: {line}");
        }
        let store = env.path("store");
        let s = store.to_str().unwrap();
        env.run(&["--store", s, "restore", "--from", "nosuch", "-d", &id])
            .fails_with_one_line(&[&format!("{n} bytes")]);
        // A prefix that fits while PREFIX-9 does not.
        let prefix = &id[..n.min(233) - 1];
        env.run(&[
            "--store",
            s,
            "restore",
            "--from",
            "nosuch",
            "--copies",
            "10",
            "--name-prefix",
            prefix,
        ])
        .fails_with_one_line(&["234 bytes"]);
        assert!(!store.exists(), "the store was created for a refused id");
        env.assert_nothing_left(&u, Some(&b));
        assert_eq!(lock_files(&env), Vec::<String>::new());
    }
    // The longest valid id works from create to delete.
    let _c = env.run_detached(&b, &longest);
    assert_eq!(env.status(&longest), "running");
    env.ok(&["delete", "--force", &longest]);
    env.assert_nothing_left(&u, Some(&b));
}

#[test]
fn failed_commands_leave_no_lock_files() {
    // A failed `create` and a `kill` of a missing id each left an empty file in
    // --root/.locks (`kill NOPE KILL` one named "KILL").
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let b = env.bundle("b", &["/no/such/binary"]);
    let id = unique_id("nolock");
    for verb in [&["create"][..], &["run", "-d"], &["run"]] {
        let _g = env.guard(&id);
        let mut args: Vec<&str> = verb.to_vec();
        args.extend(["--bundle", b.to_str().unwrap(), &id]);
        env.run(&args).fails_with_one_line(&["/no/such/binary"]);
    }
    env.run(&["kill", "NOPE", "KILL"])
        .fails_with_one_line(&["NOPE"]);
    for args in [
        &["kill", "ghost"][..],
        &["start", "ghost"],
        &["pause", "ghost"],
        &["exec", "ghost", "true"],
        &["delete", "ghost"],
        &["delete", "--force", "ghost"],
    ] {
        let _ = env.run(args);
    }
    env.assert_nothing_left(&id, Some(&b));
    assert_eq!(lock_files(&env), Vec::<String>::new());
    // A live container keeps its lock file until it is deleted.
    let ok = env.bundle("ok", &["sleep", "100"]);
    let _c = env.run_detached(&ok, &id);
    env.ok(&["kill", &id, "KILL"]);
    assert_eq!(lock_files(&env), vec![id.clone()]);
    env.ok(&["delete", "--force", &id]);
    assert_eq!(lock_files(&env), Vec::<String>::new());
}

#[test]
fn process_fields_libcontainer_cannot_take_are_named() {
    // `process.args: []` made libcontainer panic with a backtrace; a relative
    // `process.cwd` failed with "failed to unix syscall". runc refuses both.
    requires!(root, busybox, cgroup_v1);
    let env = Env::new();
    let cases: [(&str, serde_json::Value, &str); 3] = [
        ("args", serde_json::json!({"args": []}), "process.args"),
        ("relcwd", serde_json::json!({"cwd": "tmp"}), "process.cwd"),
        ("emptycwd", serde_json::json!({"cwd": ""}), "process.cwd"),
    ];
    // Refused by the kernel under libcontainer with "EINVAL" and "io error".
    let more: [(&str, serde_json::Value, &str); 2] = [
        (
            "rlimit",
            serde_json::json!({"rlimits": [{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 100}]}),
            "process.rlimits",
        ),
        (
            "oomadj",
            serde_json::json!({"oomScoreAdj": 5000}),
            "process.oomScoreAdj",
        ),
    ];
    for (tag, patch, needle) in cases.iter().chain(&more) {
        let b = env.bundle(tag, &["true"]);
        edit_config(&b, |c| {
            for (k, v) in patch.as_object().unwrap() {
                c["process"][k] = v.clone();
            }
        });
        let line = {
            let id = unique_id("badproc");
            let _g = env.guard(&id);
            env.run(&["run", "--bundle", b.to_str().unwrap(), &id])
                .fails_with_one_line(&[needle])
        };
        assert!(!line.contains("panicked"), "{line}");
        create_and_run_fail(&env, &b, &[needle, "config.json"]);
        if crate::common::runc_bin().is_some() {
            let runc = Env::runc();
            let id = unique_id("badproc-runc");
            let _g = runc.guard(&id);
            let out = runc.run(&["run", "--bundle", b.to_str().unwrap(), &id]);
            assert_ne!(out.code, Some(0), "runc accepted {tag}: {out:?}");
        }
    }
    // exec: the same fields from --process, and a relative --cwd.
    let b = env.bundle("live", &["sleep", "100"]);
    let id = unique_id("badexec");
    let _c = env.run_detached(&b, &id);
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(b.join("config.json")).unwrap()).unwrap();
    for (tag, patch, needle) in &cases {
        let mut p = spec["process"].clone();
        for (k, v) in patch.as_object().unwrap() {
            p[k] = v.clone();
        }
        let file = env.path(&format!("{tag}.json"));
        fs::write(&file, serde_json::to_vec(&p).unwrap()).unwrap();
        // exec's own words: "has no args", "cwd ... is not an absolute path".
        let field = needle.trim_start_matches("process.");
        env.run(&["exec", "--process", file.to_str().unwrap(), &id])
            .fails_with_one_line(&[field, file.to_str().unwrap()]);
    }
    env.run(&["exec", "--cwd", "tmp", &id, "pwd"])
        .fails_with_one_line(&["--cwd", "absolute"]);
    assert_eq!(env.pids(&id), [env.pid(&id) as i64]);
}
