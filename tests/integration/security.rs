//! The security boundary around snapshots (issue 11), with real containers, CRIU
//! and an unprivileged user: `nobody` can read nothing and execute nothing from
//! the store, its caches, a checkpoint's staging directory on /dev/shm or
//! `--root` (where a restored copy's overlay lives), even with a setuid-root
//! binary in the snapshot's rootfs; an old store and root left 0755 are made
//! private on first use.
//!
//! The test's scratch directory is opened up (0755) first, so only the modes
//! stasis gives its own directories stand between `nobody` and the data.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{unique_id, wait_stopped_at_fault, Env};
use crate::store_flows::{run_cmd, Proc, Sx, CMD, COUNTER};

/// `Sx::setup` with the test's name; returns from the test when it skips.
macro_rules! setup {
    () => {{
        let name = $crate::test_name!();
        match Sx::setup(name) {
            Some(s) => s,
            None => return,
        }
    }};
}

/// Every path under `dir` (not following symlinks): (regular files, executable
/// regular files, directories).
fn walk(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut exes, mut dirs) = (Vec::new(), Vec::new(), vec![dir.to_path_buf()]);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                dirs.push(p.clone());
                stack.push(p);
            } else if m.is_file() {
                if m.mode() & 0o111 != 0 {
                    exes.push(p.clone());
                }
                files.push(p);
            }
        }
    }
    (files, exes, dirs)
}

/// What `nobody` (uid 65534, gid 65534, no groups) managed to do: one line per
/// file it read, file it executed or directory it listed. `enter_mnt_of` runs it
/// in that process's mount namespace (to see a private /dev/shm).
fn as_nobody(scratch: &Path, targets: &[PathBuf], enter_mnt_of: Option<u32>) -> Vec<String> {
    let (mut files, mut exes, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
    // Paths as the namespace sees them, walked through /proc/PID/root from here.
    let ns_root = enter_mnt_of.map(|pid| PathBuf::from(format!("/proc/{pid}/root")));
    let unmap = |v: Vec<PathBuf>| -> Vec<PathBuf> {
        match &ns_root {
            Some(r) => v
                .into_iter()
                .map(|p| Path::new("/").join(p.strip_prefix(r).unwrap()))
                .collect(),
            None => v,
        }
    };
    for t in targets {
        let here = match &ns_root {
            Some(r) => r.join(t.strip_prefix("/").unwrap()),
            None => t.clone(),
        };
        let (f, x, d) = walk(&here);
        files.extend(unmap(f));
        exes.extend(unmap(x));
        dirs.extend(unmap(d));
    }
    assert!(!files.is_empty(), "nothing to try under {targets:?}");
    let write_list = |name: &str, v: &[PathBuf]| {
        let p = scratch.join(name);
        let text: String = v.iter().map(|p| format!("{}\n", p.display())).collect();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let (lf, lx, ld) = (
        write_list("read.list", &files),
        write_list("exec.list", &exes),
        write_list("dirs.list", &dirs),
    );
    // A shell returns 126 when execve fails with EACCES; anything else means the
    // file was reached (and, for a setuid binary, ran as root).
    let script = format!(
        "while IFS= read -r f; do cat -- \"$f\" >/dev/null 2>&1 && echo \"READ $f\"; done < '{}'; \
         while IFS= read -r f; do \"$f\" </dev/null >/dev/null 2>&1; rc=$?; \
           [ $rc -eq 126 ] || echo \"EXEC($rc) $f\"; done < '{}'; \
         while IFS= read -r f; do ls -- \"$f\" >/dev/null 2>&1 && echo \"LIST $f\"; done < '{}'; \
         echo done",
        lf.display(),
        lx.display(),
        ld.display()
    );
    let mut cmd = match enter_mnt_of {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--mount=/proc/{pid}/ns/mnt"))
                .arg("--")
                .arg("setpriv");
            c
        }
        None => Command::new("setpriv"),
    };
    cmd.args([
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
        "/bin/sh",
        "-c",
    ])
    .arg(&script);
    let out = run_cmd(cmd, CMD);
    assert!(
        out.code == Some(0) && out.stdout.ends_with("done\n"),
        "the check as nobody did not run: {out:#?}"
    );
    out.stdout
        .lines()
        .filter(|l| *l != "done")
        .map(str::to_string)
        .collect()
}

/// The mode bits of a path.
fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

#[test]
fn nobody_can_read_or_run_nothing_of_store_caches_staging_or_root() {
    let sx = setup!();
    let scratch = sx.env.dir.path();
    fs::set_permissions(scratch, fs::Permissions::from_mode(0o755)).unwrap();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    // A setuid-root copy of busybox as /usr/local/bin/id in the rootfs.
    let suid = b.join("rootfs/usr/local/bin");
    fs::create_dir_all(&suid).unwrap();
    fs::copy(b.join("rootfs/bin/busybox"), suid.join("id")).unwrap();
    fs::set_permissions(suid.join("id"), fs::Permissions::from_mode(0o4755)).unwrap();
    let id = unique_id("sec-src");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "sec:v1", &id]);
    let id2 = unique_id("sec-copy");
    let _g2 = sx.restore_from("sec:v1", &id2, &[]);
    sx.wait_counter(&id2, "readable", |_| true);
    let merged = sx.env.root.join(".copies").join(&id2).join("merged");
    assert!(
        mode(&merged.join("usr/local/bin/id")) & 0o4000 != 0,
        "the copy lost its setuid binary, the test proves nothing"
    );

    // A second checkpoint parked after its dump, the image in staging on a
    // private /dev/shm.
    let mut real = sx.command(
        Some(&sx.store),
        &["checkpoint", "--leave-running", "--tag", "sec:v2", &id2],
    );
    real.env("STASIS_FAULT", "checkpoint.before-ingest:stop");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs stasis-test-shm /dev/shm || exit 99; exec \"$0\" \"$@\"",
    ])
    .arg(real.get_program())
    .args(real.get_args());
    for (k, v) in real.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let parked = Proc::spawn(cmd, true);
    let pid = parked.pid();
    wait_stopped_at_fault(pid, Duration::from_secs(60));
    let shm = PathBuf::from(format!("/proc/{pid}/root/dev/shm"));
    let staging: Vec<PathBuf> = fs::read_dir(&shm)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("stasis-staging-")
        })
        .collect();
    assert_eq!(staging.len(), 1, "no staging directory on /dev/shm");
    let in_ns: Vec<PathBuf> = staging
        .iter()
        .map(|p| Path::new("/dev/shm").join(p.file_name().unwrap()))
        .collect();
    let staged = as_nobody(scratch, &in_ns, Some(pid));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGCONT,
    );
    parked.wait(CMD).ok();
    assert_eq!(
        staged,
        Vec::<String>::new(),
        "nobody reached the staging dir"
    );

    for (what, p) in [("store", sx.store.clone()), ("--root", sx.env.root.clone())] {
        assert_eq!(mode(&p), 0o700, "{what} {}", p.display());
    }
    let cache = sx.store.join("cache");
    let img = fs::read_dir(cache.join("img")).unwrap().count();
    let base = fs::read_dir(cache.join("fs")).unwrap().count();
    assert!(img > 0 && base > 0, "no cached image or rootfs to try");
    let reached = as_nobody(scratch, &[sx.store.clone(), sx.env.root.clone()], None);
    assert_eq!(reached, Vec::<String>::new(), "nobody reached these");
}

#[test]
fn an_old_0755_store_and_root_are_made_private_on_first_use() {
    crate::requires!(root);
    let env = Env::new();
    let store = env.path("store");
    let run = |args: &[&str]| {
        let mut c = Command::new(&env.bin);
        c.arg("--root").arg(&env.root).arg("--store").arg(&store);
        c.args(args);
        run_cmd(c, CMD).ok()
    };
    run(&["snapshot", "ls"]);
    run(&["list"]);
    let dirs = [
        store.clone(),
        store.join("blobs"),
        store.join("blobs/sha256"),
        store.join("tmp"),
        store.join("cache"),
        env.root.clone(),
    ];
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{} was created open", d.display());
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    for f in ["index.json", "oci-layout"] {
        assert_eq!(mode(&store.join(f)), 0o600, "{f}");
    }
    run(&["snapshot", "ls"]);
    run(&["list"]);
    for d in &dirs {
        assert_eq!(mode(d), 0o700, "{} was not made private", d.display());
    }
    // Under a 0 umask too: modes are set at creation, not left to the umask.
    let store2 = env.path("store2");
    for args in [&["snapshot", "ls"][..], &["list"][..]] {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("umask 0; exec \"$0\" \"$@\"")
            .arg(&env.bin)
            .arg("--root")
            .arg(env.path("root2"))
            .arg("--store")
            .arg(&store2)
            .args(args);
        run_cmd(c, CMD).ok();
    }
    for d in [store2.clone(), store2.join("tmp"), env.path("root2")] {
        assert_eq!(mode(&d), 0o700, "{} under umask 0", d.display());
    }
    assert_eq!(mode(&store2.join("index.json")), 0o600);
}
