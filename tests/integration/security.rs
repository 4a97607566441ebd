//! The security boundary around snapshots, with real containers, CRIU
//! and an unprivileged user: `nobody` can read nothing and execute nothing from
//! the store, its caches, a checkpoint's staging directory on /dev/shm or
//! `--root` (where a restored copy's overlay lives), even with a setuid-root
//! binary in the snapshot's rootfs; an old store and root left 0755 are made
//! private on first use. Foreign snapshots (crafted archives with valid digests,
//! built here by re-digesting an export): their config.json's hook does not run
//! on restore unless `--trust-snapshot-config`, the bundle path they record is
//! not used, and config file names that are paths are refused at import.
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
    parked.wait(CMD).expect_ok();
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
        run_cmd(c, CMD).expect_ok()
    };
    // A store is created only by commands that write (`snapshot ls` of a
    // missing store creates none): `import` creates it before it finds that its
    // archive is missing.
    let missing = env.path("missing.tar");
    let mut c = Command::new(&env.bin);
    c.arg("--root").arg(&env.root).arg("--store").arg(&store);
    c.args(["snapshot", "import", missing.to_str().unwrap()]);
    let out = run_cmd(c, CMD);
    assert!(
        out.code != Some(0) && out.stderr.contains("missing.tar"),
        "{out:#?}"
    );
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
    let import: &[&str] = &["snapshot", "import", missing.to_str().unwrap()];
    for args in [import, &["snapshot", "ls"][..], &["list"][..]] {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("umask 0; exec \"$0\" \"$@\"")
            .arg(&env.bin)
            .arg("--root")
            .arg(env.path("root2"))
            .arg("--store")
            .arg(&store2)
            .args(args);
        let out = run_cmd(c, CMD);
        if args == import {
            assert!(out.stderr.contains("missing.tar"), "{out:#?}");
        } else {
            out.expect_ok();
        }
    }
    for d in [store2.clone(), store2.join("tmp"), env.path("root2")] {
        assert_eq!(mode(&d), 0o700, "{} under umask 0", d.display());
    }
    assert_eq!(mode(&store2.join("index.json")), 0o600);
}

// ---------------------------------------------------------------------------
// Foreign snapshots: a crafted archive with valid digests

/// sha256 of `b` as `sha256:<hex>` and as bare hex.
fn digest(b: &[u8]) -> (String, String) {
    use sha2::{Digest, Sha256};
    let h = hex::encode(Sha256::digest(b));
    (format!("sha256:{h}"), h)
}

/// The snapshot id rule of FORMAT.md ("Snapshot id"), over a config blob's
/// `files` and `configJson`.
fn snapshot_id(cfg: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let mut files: Vec<(String, u64, Vec<u8>)> = cfg["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["size"].as_u64().unwrap(),
                hex::decode(f["sha256"].as_str().unwrap()).unwrap(),
            )
        })
        .collect();
    files.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    h.update(b"stasis-snapshot-id-v1\n");
    h.update((files.len() as u32).to_le_bytes());
    for (name, size, d) in &files {
        h.update((name.len() as u32).to_le_bytes());
        h.update(name.as_bytes());
        h.update(size.to_le_bytes());
        h.update(d);
    }
    let cj = &cfg["configJson"];
    h.update(cj["size"].as_u64().unwrap().to_le_bytes());
    h.update(hex::decode(cj["sha256"].as_str().unwrap()).unwrap());
    hex::encode(h.finalize())
}

fn write_blob(blobs: &Path, bytes: &[u8]) -> (String, u64) {
    let (d, h) = digest(bytes);
    fs::write(blobs.join(h), bytes).unwrap();
    (d, bytes.len() as u64)
}

/// Re-signs an exported archive after `edit` changed its snapshot's config
/// blob: new snapshot id, config and manifest digests, index.json (which also
/// claims `io.stasis.origin: local`). Every digest is valid; the content is the
/// attacker's.
fn craft(sx: &Sx, tar: &Path, out: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let dir = sx.path(&format!(
        "craft-{}",
        out.file_stem().unwrap().to_string_lossy()
    ));
    fs::create_dir_all(&dir).unwrap();
    let untar = Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(&dir)
        .status()
        .unwrap();
    assert!(untar.success());
    let blobs = dir.join("blobs/sha256");
    let read = |d: &str| -> serde_json::Value {
        let p = blobs.join(d.strip_prefix("sha256:").unwrap());
        let v = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        fs::remove_file(p).unwrap();
        v
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let mut cfg = read(manifest["config"]["digest"].as_str().unwrap());
    edit(&mut cfg);
    let id = snapshot_id(&cfg);
    cfg["snapshotId"] = id.clone().into();
    let (cd, cn) = write_blob(&blobs, &serde_json::to_vec(&cfg).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cn.into();
    manifest["annotations"]["io.stasis.snapshot.id"] = id.clone().into();
    let (md, mn) = write_blob(&blobs, &serde_json::to_vec(&manifest).unwrap());
    let root = &mut index["manifests"][0];
    root["digest"] = md.into();
    root["size"] = mn.into();
    root["annotations"]["io.stasis.snapshot.id"] = id.clone().into();
    root["annotations"]["io.stasis.origin"] = "local".into();
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let tarred = Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(&dir)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .unwrap();
    assert!(tarred.success());
    id
}

/// Sets the stored config.json of a config blob to `f(config.json)`.
fn edit_config_json(cfg: &mut serde_json::Value, f: impl FnOnce(&mut serde_json::Value)) {
    let cj = &mut cfg["configJson"];
    assert_eq!(cj["encoding"], "utf8");
    let mut spec: serde_json::Value = serde_json::from_str(cj["data"].as_str().unwrap()).unwrap();
    f(&mut spec);
    let bytes = serde_json::to_vec(&spec).unwrap();
    cj["size"] = (bytes.len() as u64).into();
    cj["sha256"] = digest(&bytes).1.into();
    cj["data"] = String::from_utf8(bytes).unwrap().into();
}

#[test]
fn a_foreign_snapshot_hook_does_not_run_unless_trusted() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sec-evil");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "mine:v1", &id]);
    let ls = sx.ls();
    assert_eq!(ls[0]["origin"], "local", "{ls:#?}");
    let tar = sx.path("mine.tar");
    sx.ok(&["snapshot", "export", "mine:v1", "-o", tar.to_str().unwrap()]);
    assert_eq!(
        mode(&tar),
        0o600,
        "the exported archive is readable by others"
    );

    let pwned = sx.path("PWNED");
    let hook_cmd = format!("id > {}", pwned.display());
    let evil = sx.path("evil.tar");
    let hook = serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", hook_cmd]}]);
    craft(&sx, &tar, &evil, |cfg| {
        edit_config_json(cfg, |spec| spec["hooks"]["createRuntime"] = hook.clone())
    });
    let store2 = sx.path("store2");
    sx.run_in(&store2, &["snapshot", "import", evil.to_str().unwrap()])
        .expect_ok();
    sx.run_in(&store2, &["snapshot", "tag", "mine:v1", "evil:v1"])
        .expect_ok();
    sx.run_in(&store2, &["snapshot", "verify", "--read-data"])
        .expect_ok();
    let ls2 = sx.ls_in(&store2);
    assert_eq!(ls2.len(), 1, "{ls2:#?}");
    assert_eq!(
        ls2[0]["origin"], "imported",
        "the archive's claim was taken: {ls2:#?}"
    );
    let text = sx
        .run_in(&store2, &["snapshot", "inspect", "mine:v1"])
        .expect_ok();
    assert!(text.stdout.contains("origin: imported"), "{text:#?}");

    let x = unique_id("sec-x");
    let gx = sx.guard(&x);
    let out = sx.restore_from_in(&store2, "evil:v1", &x, &[]).expect_ok();
    assert!(
        out.stderr
            .contains("hooks.createRuntime[0] = /bin/sh -c id > ")
            && out.stderr.contains("--trust-snapshot-config"),
        "the skipped hook is not named: {out:#?}"
    );
    assert!(
        !pwned.exists(),
        "the foreign snapshot's hook ran on the host"
    );
    sx.wait_counter(&x, "readable", |_| true);
    drop(gx);

    let y = unique_id("sec-y");
    let _gy = sx.guard(&y);
    let out = sx
        .restore_from_in(&store2, "evil:v1", &y, &["--trust-snapshot-config"])
        .expect_ok();
    assert!(out.stderr.contains("used whole"), "{out:#?}");
    let got = fs::read_to_string(&pwned).unwrap_or_default();
    assert!(
        got.starts_with("uid=0"),
        "with the flag the hook did not run: {got:?}"
    );
}

#[test]
fn an_archive_naming_a_path_is_refused_at_import() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sec-name");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "n:v1", &id]);
    let tar = sx.path("n.tar");
    sx.ok(&["snapshot", "export", "n:v1", "-o", tar.to_str().unwrap()]);
    for (i, bad) in ["../../x", "/tmp/x"].iter().enumerate() {
        let evil = sx.path(&format!("names{i}.tar"));
        craft(&sx, &tar, &evil, |cfg| {
            let f = cfg["files"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|f| f["kind"] == "file")
                .unwrap();
            f["name"] = (*bad).into();
        });
        let store2 = sx.path(&format!("store-names{i}"));
        let out = sx.run_in(&store2, &["snapshot", "import", evil.to_str().unwrap()]);
        crate::store_flows::assert_fails(&out, &[bad, "is not allowed"]);
        assert!(sx.ls_in(&store2).is_empty());
    }
}

#[test]
fn a_foreign_snapshot_without_filesystem_needs_the_operators_bundle() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("sec-nofs");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--ignore-rootfs", "--tag", "nofs", &id]);
    let tar = sx.path("nofs.tar");
    sx.ok(&["snapshot", "export", "nofs", "-o", tar.to_str().unwrap()]);
    let store2 = sx.path("store2");
    sx.run_in(&store2, &["snapshot", "import", tar.to_str().unwrap()])
        .expect_ok();
    // The bundle path it records exists on this host, but it names it: unused.
    let id2 = unique_id("sec-nofs2");
    let _g2 = sx.guard(&id2);
    let out = sx.restore_from_in(&store2, "nofs", &id2, &[]);
    crate::store_flows::assert_one_line(&out, &["foreign", "--bundle"]);
    assert!(sx.state(&id2).is_none());
    sx.restore_from_in(&store2, "nofs", &id2, &["--bundle", b.to_str().unwrap()])
        .expect_ok();
    sx.wait_counter(&id2, "readable", |_| true);
}

#[test]
fn a_foreign_image_with_capabilities_beyond_the_default_set_is_refused() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    crate::common::edit_config(&b, |c| {
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set]
                .as_array_mut()
                .unwrap()
                .push("CAP_SYS_ADMIN".into());
        }
    });
    let id = unique_id("sec-caps");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "caps", &id]);
    let tar = sx.path("caps.tar");
    sx.ok(&["snapshot", "export", "caps", "-o", tar.to_str().unwrap()]);
    let store2 = sx.path("store2");
    sx.run_in(&store2, &["snapshot", "import", tar.to_str().unwrap()])
        .expect_ok();
    let id2 = unique_id("sec-caps2");
    let _g2 = sx.guard(&id2);
    // Neither the config it carries nor the operator's bundle changes what CRIU
    // restores: refused either way.
    for extra in [&[][..], &["--bundle", b.to_str().unwrap()][..]] {
        let out = sx.restore_from_in(&store2, "caps", &id2, extra);
        crate::store_flows::assert_fails(
            &out,
            &["CAP_SYS_ADMIN", "foreign", "--trust-snapshot-config"],
        );
        assert!(sx.state(&id2).is_none());
    }
    sx.restore_from_in(&store2, "caps", &id2, &["--trust-snapshot-config"])
        .expect_ok();
    sx.wait_counter(&id2, "readable", |_| true);
    // Made here, the same snapshot restores as before.
    let id3 = unique_id("sec-caps3");
    let _g3 = sx.restore_from("caps", &id3, &[]);
    sx.wait_counter(&id3, "readable", |_| true);
}

#[test]
fn device_nodes_of_a_foreign_snapshot_are_not_created() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    nix::sys::stat::mknod(
        &b.join("rootfs/disk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(7, 0),
    )
    .unwrap();
    let id = unique_id("sec-dev");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "dev", &id]);
    // Made here: the node comes back (under 0700 directories).
    let local = unique_id("sec-dev-local");
    let _gl = sx.restore_from("dev", &local, &[]);
    let merged = |id: &str| sx.env.root.join(".copies").join(id).join("merged");
    assert!(fs::symlink_metadata(merged(&local).join("disk")).is_ok());

    let tar = sx.path("dev.tar");
    sx.ok(&["snapshot", "export", "dev", "-o", tar.to_str().unwrap()]);
    let store2 = sx.path("store2");
    sx.run_in(&store2, &["snapshot", "import", tar.to_str().unwrap()])
        .expect_ok();
    let id2 = unique_id("sec-dev2");
    let _g2 = sx.guard(&id2);
    let out = sx.restore_from_in(&store2, "dev", &id2, &[]).expect_ok();
    assert!(
        out.stderr.contains("device node disk (block 7:0)"),
        "the skipped node is not named: {out:#?}"
    );
    sx.wait_counter(&id2, "readable", |_| true);
    assert!(
        fs::symlink_metadata(merged(&id2).join("disk")).is_err(),
        "a foreign snapshot's device node was created"
    );
}
