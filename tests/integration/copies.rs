//! Restoring copies from snapshots through the CLI with real containers and CRIU:
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

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{cgroups_named, edit_config, unique_id, wait_until, Container};
use crate::store_flows::{
    assert_fails, assert_one_line, http_get, mounts_under, names_in, run_cmd, Proc, Sx, CMD,
    COUNTER,
};

/// `stasis exec ID sh -c CMD` on this test's root, stdout trimmed.
#[track_caller]
fn sh_in(sx: &Sx, id: &str, cmd: &str) -> String {
    sx.ok(&["exec", id, "sh", "-c", cmd])
        .stdout
        .trim()
        .to_string()
}

/// Lazily unmounts a mount point when dropped (also when the test fails).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
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

#[test]
fn a_copy_that_fails_inside_criu_restore_leaves_no_state_overlay_or_cgroup() {
    let sx = setup!();
    // A prestart hook (run at CRIU's setup-namespaces step, after the copy's
    // overlay, bundle and cgroup exist) that refuses exactly one copy id.
    let prefix = unique_id("cp-hook");
    let ids: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    let hook = sx.path("refuse.sh");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nif grep -q '\"{}\"'; then echo refused >&2; exit 3; fi\nexit 0\n",
            ids[1]
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    edit_config(&b, |c| {
        c["hooks"] = serde_json::json!({"prestart": [{"path": hook, "args": ["refuse.sh"]}]});
    });
    let id = unique_id("cp-orig");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--tag", "hk", &id]);
    let _guards: Vec<Container> = ids.iter().map(|i| sx.guard(i)).collect();
    let out = Proc::spawn(
        sx.command(
            Some(&sx.store),
            &[
                "restore",
                "-d",
                "--from",
                "hk",
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
            &format!("{}: ", ids[1]),
            "prestart",
            &format!("restored and left running: {}, {}", ids[0], ids[2]),
        ],
    );
    let listed: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(listed, vec![ids[0].as_str(), ids[2].as_str()], "{out:#?}");
    sx.assert_carries_on(&ids[0], &before);
    sx.assert_carries_on(&ids[2], &before);
    // The failed copy left nothing: no state, no private dir, no overlay, no cgroup.
    assert!(sx.state(&ids[1]).is_none());
    assert!(!sx.env.root.join(&ids[1]).exists());
    assert_eq!(copies_of(&sx), vec![ids[0].clone(), ids[2].clone()]);
    let mounts = mounts_under(&sx.env.root);
    assert!(!mounts.iter().any(|m| m.contains(&ids[1])), "{mounts:?}");
    assert!(
        cgroups_named(&ids[1]).is_empty(),
        "{:?}",
        cgroups_named(&ids[1])
    );
    assert!(!cgroups_named(&ids[0]).is_empty());
}

// ---------------------------------------------------------------------------
// Overlay not usable: --copy-rootfs

/// Mounts an overlay at `at` (layers under `layers`): a directory on it cannot be
/// the upper layer of another overlay.
fn mount_overlay_at(at: &Path, layers: &Path) -> Unmount {
    let (l, u, w) = (layers.join("l"), layers.join("u"), layers.join("w"));
    for d in [&l, &u, &w, &at.to_path_buf()] {
        fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.display(),
        u.display(),
        w.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(at)
        .status()
        .unwrap();
    assert!(st.success(), "mount an overlay at {}", at.display());
    Unmount(at.to_path_buf())
}

#[test]
fn copy_rootfs_restores_onto_a_private_full_copy_where_overlay_cannot_be_used() {
    let sx = setup!();
    // The state root (where each copy's upper layer would go) is itself an
    // overlayfs, which overlayfs refuses as an upper layer. Mounted before any
    // container exists and unmounted after every guard below ran.
    let _root = mount_overlay_at(&sx.env.root, &sx.path("root-layers"));
    let b = sx.bundle(
        "b",
        &[
            "sh",
            "-c",
            &format!("mkdir -p /data; echo checkpointed > /data/f; {COUNTER}"),
        ],
    );
    edit_config(&b, |c| c["root"]["readonly"] = serde_json::json!(false));
    let id = unique_id("cp-orig");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "cr", &id]);

    // An overlay: a clear error that names the way out, nothing left behind.
    let id2 = unique_id("cp-copy");
    let g2 = sx.guard(&id2);
    let out = sx.restore_from_in(&sx.store, "cr", &id2, &[]);
    assert_one_line(&out, &["mount overlay at", &id2, "--copy-rootfs"]);
    assert!(!sx.env.root.join(&id2).exists(), "state of {id2} left");
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    assert!(mounts_under(&sx.env.root).is_empty());
    assert!(cgroups_named(&id2).is_empty());

    // --copy-rootfs: the copy runs on its own full copy of the snapshot's rootfs.
    sx.restore_from_in(&sx.store, "cr", &id2, &["--copy-rootfs"])
        .expect_ok();
    sx.assert_carries_on(&id2, &before);
    // On the store's filesystem (where the base is, so FICLONE can reflink), not
    // under --root.
    let private = sx.store.join("cache/copies").join(&id2);
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    let st = sx.state(&id2).unwrap();
    assert_eq!(
        Path::new(st["bundle"].as_str().unwrap()),
        private.join("bundle")
    );
    assert!(
        mounts_under(&sx.env.root).is_empty(),
        "no overlay for a copy"
    );
    assert_eq!(
        fs::read_to_string(private.join("rootfs/data/f")).unwrap(),
        "checkpointed\n"
    );
    // Its writes are its own: not in the original, not in the cached base, not in
    // a second copy.
    assert_eq!(sh_in(&sx, &id2, "echo mine > /data/f; cat /data/f"), "mine");
    assert_eq!(
        fs::read_to_string(b.join("rootfs/data/f")).unwrap(),
        "checkpointed\n"
    );
    let bases: Vec<PathBuf> = fs::read_dir(sx.store.join("cache/fs"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("rootfs/data/f"))
        .collect();
    assert_eq!(bases.len(), 1, "{bases:?}");
    assert_eq!(fs::read_to_string(&bases[0]).unwrap(), "checkpointed\n");
    let id3 = unique_id("cp-copy3");
    let g3 = sx.restore_from("cr", &id3, &["--copy-rootfs"]);
    assert_eq!(sh_in(&sx, &id3, "cat /data/f"), "checkpointed");
    // delete removes each copy's private rootfs and bundle.
    sx.ok(&["delete", "--force", &id2]);
    sx.ok(&["delete", "--force", &id3]);
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    let left = names_in(&sx.store.join("cache/copies"));
    assert!(left.is_empty(), "{left:?}");
    drop((g2, g3));
}

// ---------------------------------------------------------------------------
// --netns PATH

/// A network namespace made with `ip netns add`, removed with `ip netns del`.
struct Netns(String);

impl Netns {
    fn add(name: &str) -> Netns {
        let out = run_cmd(
            {
                let mut c = Command::new("ip");
                c.args(["netns", "add", name]);
                c
            },
            CMD,
        );
        assert_eq!(out.code, Some(0), "ip netns add {name}: {out:#?}");
        let ns = Netns(name.to_string());
        let out = run_cmd(
            {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", name, "ip", "link", "set", "lo", "up"]);
                c
            },
            CMD,
        );
        assert_eq!(out.code, Some(0), "lo up in {name}: {out:#?}");
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// HTTP GET of 127.0.0.1:`port` from inside the network namespace at `ns`.
fn http_get_in(ns: &Path, port: u16) -> Result<(u16, String), String> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let f = fs::File::open(&ns).map_err(|e| format!("open {}: {e}", ns.display()))?;
        // SAFETY: setns on a descriptor we own; it moves only this thread.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "setns {}: {}",
                ns.display(),
                std::io::Error::last_os_error()
            ));
        }
        http_get(SocketAddr::from(([127, 0, 0, 1], port)))
    })
    .join()
    .unwrap_or_else(|_| Err("connect thread panicked".into()))
}

/// A busybox httpd on port 8080 serving /tmp/www; /tmp/ready once it listens.
const HTTPD: &str = "mkdir -p /tmp/www; echo hello-from-httpd > /tmp/www/index.html; \
     httpd -f -p 8080 -h /tmp/www & sleep 1; touch /tmp/ready; wait";

#[test]
fn netns_restores_copies_into_the_given_network_namespace() {
    let sx = setup!();
    let ns = Netns::add(&unique_id("stasis-ns"));
    let b = sx.bundle("b", &["sh", "-c", HTTPD]);
    let id = unique_id("cp-web");
    let _g = sx.run_d(&b, &id);
    wait_until("httpd ready", Duration::from_secs(15), || {
        sx.run(&["exec", &id, "test", "-f", "/tmp/ready"]).code == Some(0)
    });
    sx.ok(&["checkpoint", "--leave-running", "--tag", "web", &id]);

    // One copy: it lives in the given namespace and answers there.
    let id2 = unique_id("cp-in-ns");
    let g2 = sx.restore_from("web", &id2, &["--netns", ns.path().to_str().unwrap()]);
    let pid = sx.pid(&id2);
    assert_eq!(
        fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino(),
        fs::metadata(ns.path()).unwrap().ino(),
        "the copy is not in {}",
        ns.path().display()
    );
    let (code, body) = http_get_in(&ns.path(), 8080).expect("GET in the netns");
    assert_eq!((code, body.as_str()), (200, "hello-from-httpd\n"));
    let st = sx.state(&id2).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(
        &fs::read(Path::new(st["bundle"].as_str().unwrap()).join("config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        cfg["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network" && n["path"] == ns.path().to_str().unwrap()),
        "{cfg:#}"
    );
    sx.ok(&["delete", "--force", &id2]);
    drop(g2);

    // Two copies share the namespace: both are restored into it (CRIU binds the
    // restored listening sockets in repair mode, so both hold port 8080, and
    // connections reach one of them).
    let prefix = unique_id("cp-two");
    let ids: Vec<String> = (0..2).map(|i| format!("{prefix}-{i}")).collect();
    let _guards: Vec<Container> = ids.iter().map(|i| sx.guard(i)).collect();
    sx.run_starting(
        &sx.store,
        &[
            "restore",
            "-d",
            "--from",
            "web",
            "--copies",
            "2",
            "--name-prefix",
            &prefix,
            "--netns",
            ns.path().to_str().unwrap(),
        ],
    )
    .expect_ok();
    let ns_ino = fs::metadata(ns.path()).unwrap().ino();
    for c in &ids {
        let pid = sx.pid(c);
        assert_eq!(
            fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino(),
            ns_ino,
            "{c} is not in {}",
            ns.path().display()
        );
    }
    let (code, body) = http_get_in(&ns.path(), 8080).expect("GET in the netns");
    assert_eq!((code, body.as_str()), (200, "hello-from-httpd\n"));
    // The original is still in its own namespace.
    let opid = sx.pid(&id);
    assert_ne!(
        fs::metadata(format!("/proc/{opid}/ns/net")).unwrap().ino(),
        ns_ino
    );
}

// ---------------------------------------------------------------------------
// A snapshot without filesystem state onto a bundle

#[test]
fn ignore_rootfs_snapshot_is_refused_onto_a_rootfs_whose_open_file_changed() {
    let sx = setup!();
    let b = sx.bundle(
        "b",
        &["sh", "-c", &format!("exec 3< /data/held; {COUNTER}")],
    );
    fs::create_dir_all(b.join("rootfs/data")).unwrap();
    fs::write(b.join("rootfs/data/held"), "as at the checkpoint\n").unwrap();
    let id = unique_id("cp-held");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--ignore-rootfs", "--tag", "held", &id]);
    let cfg = sx
        .ok(&["snapshot", "inspect", "--format", "json", "held"])
        .json();
    let open = cfg["metadata"]["open_files"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        open.iter()
            .any(|f| f["path"] == "data/held" && f["size"] == 21 && f["sha256"].as_str().is_some()),
        "data/held not recorded: {open:#?}"
    );

    // Changed since: refused before CRIU runs, naming the file; nothing left.
    fs::write(b.join("rootfs/data/held"), "changed after the checkpoint\n").unwrap();
    let id2 = unique_id("cp-held2");
    let g2 = sx.guard(&id2);
    let bundle = ["--bundle", b.to_str().unwrap()];
    let out = sx.restore_from_in(&sx.store, "held", &id2, &bundle);
    assert_one_line(
        &out,
        &[
            "file /data/held",
            "changed since the checkpoint (size 21 -> 29)",
            "restore the rootfs or checkpoint again",
        ],
    );
    assert!(sx.state(&id2).is_none());
    assert!(!sx.env.root.join(&id2).exists());
    assert!(cgroups_named(&id2).is_empty());
    // Same size, other content: named too.
    fs::write(b.join("rootfs/data/held"), "AS AT THE CHECKPOINT\n").unwrap();
    let out = sx.restore_from_in(&sx.store, "held", &id2, &bundle);
    assert_one_line(&out, &["file /data/held", "same size, sha256"]);

    // Put back as it was: the restore goes through and the workload carries on.
    fs::write(b.join("rootfs/data/held"), "as at the checkpoint\n").unwrap();
    sx.restore_from_in(&sx.store, "held", &id2, &bundle)
        .expect_ok();
    sx.assert_carries_on(&id2, &before);
    drop(g2);
}

// ---------------------------------------------------------------------------
// Volumes

#[test]
fn volume_comes_back_as_at_the_checkpoint_and_a_missing_source_is_named() {
    let sx = setup!();
    let vol = sx.path("vol");
    fs::create_dir_all(&vol).unwrap();
    fs::write(vol.join("state"), "before\n").unwrap();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    crate::common::add_bind(&b, &vol, "/vol");
    let id = unique_id("cp-vol");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 3", |n| n >= 3);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "vol", &id]);
    // The original writes to its volume after the checkpoint.
    sh_in(&sx, &id, "echo after > /vol/state");

    // The copy has the checkpoint-time content in a volume of its own.
    let id2 = unique_id("cp-vol2");
    let g2 = sx.restore_from("vol", &id2, &[]);
    sx.assert_carries_on(&id2, &before);
    assert_eq!(sh_in(&sx, &id2, "cat /vol/state"), "before");
    sh_in(&sx, &id2, "echo copy > /vol/state; echo new > /vol/new");
    assert_eq!(fs::read_to_string(vol.join("state")).unwrap(), "after\n");
    assert!(!vol.join("new").exists());
    assert_eq!(sh_in(&sx, &id, "cat /vol/state"), "after");
    drop(g2);

    // Without the volume in the snapshot, its source must exist at restore.
    sx.ok(&["checkpoint", "--ignore-volumes", "--tag", "novol", &id]);
    fs::remove_dir_all(&vol).unwrap();
    let id3 = unique_id("cp-vol3");
    let _g3 = sx.guard(&id3);
    let out = sx.restore_from_in(&sx.store, "novol", &id3, &[]);
    assert_one_line(
        &out,
        &[
            &format!(
                "the source {} of the volume mounted at /vol is gone",
                vol.display()
            ),
            "--ignore-volumes",
        ],
    );
    assert!(sx.state(&id3).is_none());
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    assert!(mounts_under(&sx.env.root).is_empty());
    assert!(cgroups_named(&id3).is_empty());
}

// ---------------------------------------------------------------------------
// A full disk while the base is materialised

/// Sum of the sizes of the regular files under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[test]
fn a_full_disk_while_materialising_the_base_is_named_and_leaves_no_partial_base() {
    let sx = setup!();
    // 12 MiB of random data in the rootfs: the blobs and the verified image fit
    // in the small store below, the materialised base does not.
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let mut data = vec![0u8; 12 << 20];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .unwrap();
    fs::write(b.join("rootfs/big"), &data).unwrap();
    let id = unique_id("cp-full");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    sx.ok(&["checkpoint", "--tag", "big", &id]);
    let tar = sx.path("big.tar");
    sx.ok(&["snapshot", "export", "big", "-o", tar.to_str().unwrap()]);
    let cfg = sx
        .ok(&["snapshot", "inspect", "--format", "json", "big"])
        .json();
    let image: u64 = cfg["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["size"].as_u64())
        .sum();
    let blobs = du(&sx.store.join("blobs"));
    let base = data.len() as u64;
    let size = blobs + image + base / 2;

    let small = sx.path("small-store");
    fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mount a {size}-byte tmpfs at {}",
        small.display()
    );
    let _m = Unmount(small.clone());
    sx.run_in(&small, &["snapshot", "import", tar.to_str().unwrap()])
        .expect_ok();
    let id2 = unique_id("cp-full2");
    let _g2 = sx.guard(&id2);
    let out = sx.restore_from_in(&small, "big", &id2, &[]);
    let fs_cache = small.join("cache/fs");
    assert_fails(
        &out,
        &[
            "No space left on device",
            "materialise the root filesystem of snapshot",
            &fs_cache.display().to_string(),
            "the partial copy was removed",
        ],
    );
    // The image was materialised (it fit); nothing of the base is left.
    let img_done: Vec<PathBuf> = fs::read_dir(small.join("cache/img"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join(".complete-image"))
        .collect();
    assert!(
        img_done.len() == 1 && img_done[0].exists(),
        "the verified image was not materialised: {img_done:?}"
    );
    let left: Vec<String> = fs::read_dir(&fs_cache)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|e| names_in(&e.path()))
        .filter(|n| n != ".lock")
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", fs_cache.display());
    assert!(sx.state(&id2).is_none());
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    assert!(mounts_under(&sx.env.root).is_empty());
}

// ---------------------------------------------------------------------------
// Tree-walk round trip

/// What a tree walk compares of one entry.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Files only (directory sizes depend on the filesystem).
    size: u64,
    nlink: u64,
    target: Option<PathBuf>,
    rdev: u64,
    xattrs: Vec<(String, Vec<u8>)>,
    /// Files only: fewer than 1 MiB of blocks allocated.
    small_alloc: bool,
}

fn user_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    // A filesystem without xattrs lists none.
    let Ok(names) = xattr::list(p) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = names
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.starts_with("user."))
        .map(|n| {
            let v = xattr::get(p, &n)
                .unwrap_or_else(|e| panic!("getxattr {n} {}: {e}", p.display()))
                .unwrap_or_default();
            (n, v)
        })
        .collect();
    out.sort();
    out
}

/// Every entry under `root` by relative path, and the hard-link groups (paths
/// sharing an inode, each group sorted).
fn walk(root: &Path) -> (BTreeMap<String, Node>, Vec<Vec<String>>) {
    use std::os::unix::fs::FileTypeExt;
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap().flatten() {
                stack.push(rel.join(e.file_name()));
            }
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let name = rel.to_string_lossy().into_owned();
        if kind == "file" && m.nlink() > 1 {
            inodes
                .entry((m.dev(), m.ino()))
                .or_default()
                .push(name.clone());
        }
        nodes.insert(
            name,
            Node {
                kind,
                mode: if kind == "symlink" {
                    0
                } else {
                    m.mode() & 0o7777
                },
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == "file" { m.len() } else { 0 },
                nlink: if kind == "dir" { 0 } else { m.nlink() },
                target: (kind == "symlink").then(|| fs::read_link(&p).unwrap()),
                rdev: m.rdev(),
                xattrs: if kind == "symlink" {
                    Vec::new()
                } else {
                    user_xattrs(&p)
                },
                small_alloc: kind == "file" && m.blocks() * 512 < 1 << 20,
            },
        );
    }
    let mut groups: Vec<Vec<String>> = inodes
        .into_values()
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    groups.sort();
    (nodes, groups)
}

fn set_user_xattr(p: &Path, name: &str, value: &[u8]) {
    xattr::set(p, name, value)
        .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
}

#[test]
fn links_sparse_files_xattrs_devices_and_modes_round_trip() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let fx = b.join("rootfs/fixture");
    fs::create_dir_all(fx.join("sub")).unwrap();
    fs::create_dir_all(fx.join("empty")).unwrap();
    fs::create_dir_all(fx.join("sticky")).unwrap();
    fs::write(fx.join("plain"), "hello\n").unwrap();
    fs::hard_link(fx.join("plain"), fx.join("link-to-plain")).unwrap();
    fs::hard_link(fx.join("plain"), fx.join("sub/link2")).unwrap();
    fs::write(fx.join("suid"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("plain", fx.join("sym")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", fx.join("dangling")).unwrap();
    let sparse = fs::File::create(fx.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, b"x", 32 << 20).unwrap();
    drop(sparse);
    nix::sys::stat::mknod(
        &fx.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    nix::unistd::mkfifo(
        &fx.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o620),
    )
    .unwrap();
    set_user_xattr(&fx.join("plain"), "user.stasis", b"value\0with nul");
    set_user_xattr(&fx.join("sub"), "user.dir", b"d");
    for (p, mode) in [
        ("plain", 0o640),
        ("suid", 0o4755),
        ("empty", 0o700),
        ("sticky", 0o1777),
        ("sub", 0o2751),
    ] {
        let p = fx.join(p);
        nix::unistd::chown(&p, Some(1234.into()), Some(5678.into())).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    nix::unistd::fchownat(
        None,
        &fx.join("sym"),
        Some(42.into()),
        Some(43.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let (want, want_groups) = walk(&fx);
    assert_eq!(want_groups.len(), 1, "{want_groups:?}");
    assert!(
        want["sparse"].small_alloc,
        "the fixture's sparse file is not sparse"
    );

    let id = unique_id("cp-tree");
    let _g = sx.run_d(&b, &id);
    sx.wait_counter(&id, "reached 2", |n| n >= 2);
    sx.ok(&["checkpoint", "--leave-running", "--tag", "tree", &id]);
    for (name, extra) in [
        ("cp-tree-ovl", &[][..]),
        ("cp-tree-copy", &["--copy-rootfs"][..]),
    ] {
        let id2 = unique_id(name);
        let _g2 = sx.restore_from("tree", &id2, extra);
        // From the host, through the restored process's root.
        let pid = sx.pid(&id2);
        let (got, got_groups) = walk(&Path::new(&format!("/proc/{pid}/root")).join("fixture"));
        assert_eq!(got_groups, want_groups, "hard-link groups ({name})");
        let keys: Vec<&String> = got.keys().collect();
        assert_eq!(keys, want.keys().collect::<Vec<_>>(), "entries ({name})");
        for (k, w) in &want {
            assert_eq!(&got[k], w, "{k} ({name})");
        }
        assert_eq!(
            fs::read(format!("/proc/{pid}/root/fixture/sub/link2")).unwrap(),
            b"hello\n"
        );
    }
}

// ---------------------------------------------------------------------------
// Lazy restore from the store

/// `restore --from --lazy-pages`: stasis runs CRIU's lazy-pages daemon for the
/// store's image; the copy's memory (the shell's random id and counter) comes in
/// through userfaultfd and the counter carries on; a checkpoint right after the
/// restore waits for the daemon and works; the daemon is gone afterwards.
#[test]
fn lazy_restore_from_the_store_carries_on_and_can_be_checkpointed_again() {
    let sx = setup!();
    let lazy = Command::new("criu")
        .args(["check", "--feature", "uffd-noncoop"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !lazy {
        assert!(
            std::env::var_os("STASIS_REQUIRE_ALL").is_none(),
            "CRIU lacks uffd-noncoop (lazy pages) on this host"
        );
        eprintln!("skipping: CRIU lacks uffd-noncoop (lazy pages) on this host");
        return;
    }
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    let id = unique_id("cp-lazy");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 5", |n| n >= 5);
    sx.ok(&["checkpoint", "--tag", "lazy", &id]);

    let id2 = unique_id("cp-lazy2");
    let g2 = sx.restore_from("lazy", &id2, &["--lazy-pages"]);
    sx.assert_carries_on(&id2, &before);
    // The daemon ran in the copy's CRIU work directory and logged there.
    assert!(sx.env.root.join(&id2).join("criu/lazy-pages.log").is_file());
    sx.ok(&["checkpoint", "--leave-running", "--tag", "lazy:again", &id2]);
    let id3 = unique_id("cp-lazy3");
    let _g3 = sx.restore_from("lazy:again", &id3, &["--lazy-pages"]);
    sx.assert_carries_on(&id3, &before);
    drop(g2);
    wait_until(
        "no lazy-pages daemon of this test",
        Duration::from_secs(30),
        || {
            fs::read_dir("/proc").unwrap().flatten().all(|e| {
                fs::read_to_string(e.path().join("cmdline"))
                    .map(|c| !(c.contains("lazy-pages") && c.contains(&id2)))
                    .unwrap_or(true)
            })
        },
    );
}

/// A container with a user namespace: the kernel lets its tasks open a
/// userfaultfd only with vm.unprivileged_userfaultfd=1. With the knob off,
/// `--lazy-pages` is refused up front, naming it, and leaves nothing; with it on,
/// the lazy restore works.
#[test]
fn lazy_restore_of_a_user_namespace_container_needs_the_sysctl() {
    let sx = setup!();
    let b = sx.bundle("b", &["sh", "-c", COUNTER]);
    edit_config(&b, |c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        let map = serde_json::json!([{"containerID": 0, "hostID": 0, "size": 65536}]);
        c["linux"]["uidMappings"] = map.clone();
        c["linux"]["gidMappings"] = map;
    });
    let id = unique_id("cp-lazyns");
    let _g = sx.run_d(&b, &id);
    let before = sx.wait_counter(&id, "reached 5", |n| n >= 5);
    sx.ok(&["checkpoint", "--tag", "lazyns", &id]);
    let knob = fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    let id2 = unique_id("cp-lazyns2");
    if knob.trim() == "1" {
        eprintln!("vm.unprivileged_userfaultfd=1 here: checking that the lazy restore works");
        let _g2 = sx.restore_from("lazyns", &id2, &["--lazy-pages"]);
        sx.assert_carries_on(&id2, &before);
        return;
    }
    let _g2 = sx.env.guard(&id2);
    let out = sx.run(&["restore", "-d", "--from", "lazyns", "--lazy-pages", &id2]);
    assert_fails(
        &out,
        &[
            "--lazy-pages",
            "user namespace",
            "vm.unprivileged_userfaultfd=1",
        ],
    );
    assert!(sx.state(&id2).is_none());
    assert!(copies_of(&sx).is_empty(), "{:?}", copies_of(&sx));
    assert!(cgroups_named(&id2).is_empty());
}
