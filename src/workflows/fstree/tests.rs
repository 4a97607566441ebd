//! Round trips, the stat cache and the refusals of crafted manifests.

use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::manifest::safe_join;
use super::*;

#[test]
fn round_trip_keeps_types_modes_links_and_holes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("a/empty")).unwrap();
    fs::write(src.join("a/small"), b"hello").unwrap();
    let mut big = vec![7u8; 3 * 4096 + 5];
    big[4096..8192].fill(0);
    fs::write(src.join("big"), &big).unwrap();
    fs::hard_link(src.join("a/small"), src.join("a/link")).unwrap();
    std::os::unix::fs::symlink("a/small", src.join("sym")).unwrap();
    fs::set_permissions(src.join("a/small"), fs::Permissions::from_mode(0o640)).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let m = capture(
        &[Source {
            role: "rootfs",
            dest: "/".into(),
            path: src.clone(),
            exclude: vec![],
        }],
        &out,
    )
    .unwrap();
    assert_eq!(fs::metadata(out.join(DATA_FILE)).unwrap().len() % ALIGN, 0);
    let m2 = read_manifest(&out).unwrap().unwrap();
    assert_eq!(m.trees[0].entries.len(), m2.trees[0].entries.len());
    let dst = t.path().join("dst");
    materialize(&m2, 0, &out.join(DATA_FILE), &dst).unwrap();
    assert_eq!(fs::read(dst.join("a/small")).unwrap(), b"hello");
    assert_eq!(fs::read(dst.join("big")).unwrap(), big);
    assert!(dst.join("a/empty").is_dir());
    assert_eq!(
        fs::read_link(dst.join("sym")).unwrap(),
        Path::new("a/small")
    );
    let (a, b) = (
        fs::metadata(dst.join("a/small")).unwrap(),
        fs::metadata(dst.join("a/link")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert!(fs::symlink_metadata(dst.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

fn rootfs(src: &Path) -> Vec<Source> {
    vec![Source {
        role: "rootfs",
        dest: "/".into(),
        path: src.to_path_buf(),
        exclude: vec![],
    }]
}

fn quick() -> CaptureOptions<'static> {
    CaptureOptions {
        racy_margin: std::time::Duration::ZERO,
        ..Default::default()
    }
}

/// Captures `src` into a fresh `out` with `cache`; `previous` is the data file
/// unchanged files fall back to.
fn cap(src: &Path, out: &Path, cache: Option<&StatCache>, previous: Option<&Path>) -> Capture {
    fs::create_dir_all(out).unwrap();
    let o = CaptureOptions { cache, ..quick() };
    let mut c = capture_frozen(&rootfs(src), out, &o).unwrap();
    c.finish(&mut |_| Ok(previous.expect("no fallback expected").to_path_buf()))
        .unwrap();
    c
}

fn content(c: &Capture, out: &Path, path: &str) -> Vec<u8> {
    let e = c.manifest.trees[0]
        .entries
        .iter()
        .find(|e| e.path == path)
        .unwrap();
    let data = fs::read(out.join(DATA_FILE)).unwrap();
    let at = e.offset.unwrap() as usize;
    data[at..at + e.size as usize].to_vec()
}

/// Past the kernel's coarse ctime clock tick, so a rewrite gets a new ctime.
fn tick() {
    std::thread::sleep(std::time::Duration::from_millis(30));
}

#[test]
fn stat_cache_reads_only_changed_and_added_files() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("same"), vec![1u8; 10000]).unwrap();
    fs::write(src.join("d/changed"), b"old").unwrap();
    fs::write(src.join("gone"), b"bye").unwrap();
    let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
    let c1 = cap(&src, &o1, None, None);
    assert_eq!(c1.stats.files_read_frozen, 3);
    assert_eq!(c1.stats.files_unchanged, 0);
    let cache = c1.stat_cache("snap1");
    assert_eq!(cache.trees[0].files.len(), 3);
    tick();
    fs::write(src.join("d/changed"), b"newer").unwrap();
    fs::remove_file(src.join("gone")).unwrap();
    fs::write(src.join("added"), b"hi").unwrap();
    let c2 = cap(&src, &o2, Some(&cache), None);
    assert_eq!(c2.stats.files_unchanged, 1);
    assert_eq!(c2.stats.bytes_unchanged, 10000);
    assert_eq!(c2.stats.files_read_frozen, 2);
    assert_eq!(c2.stats.bytes_read_frozen, 5 + 2);
    assert_eq!(c2.stats.files_from_previous, 0);
    assert_eq!(content(&c2, &o2, "same"), vec![1u8; 10000]);
    assert_eq!(content(&c2, &o2, "d/changed"), b"newer");
    assert!(!c2.manifest.trees[0]
        .entries
        .iter()
        .any(|e| e.path == "gone"));
    // The unchanged file keeps its digest; the manifest on disk agrees.
    let m = read_manifest(&o2).unwrap().unwrap();
    let digest = |m: &Manifest, p: &str| {
        m.trees[0]
            .entries
            .iter()
            .find(|e| e.path == p)
            .unwrap()
            .sha256
            .clone()
    };
    assert_eq!(digest(&m, "same"), digest(&c1.manifest, "same"));
    assert!(digest(&m, "same").is_some());
    // And the next cache has the moved offsets of this capture.
    let next = c2.stat_cache("snap2");
    assert_eq!(next.snapshot, "snap2");
    assert_eq!(
        next.trees[0].files["same"].offset,
        c2.manifest.trees[0]
            .entries
            .iter()
            .find(|e| e.path == "same")
            .unwrap()
            .offset
            .unwrap()
    );
    let dst = t.path().join("dst");
    materialize(&m, 0, &o2.join(DATA_FILE), &dst).unwrap();
    assert_eq!(fs::read(dst.join("same")).unwrap(), vec![1u8; 10000]);
    assert_eq!(fs::read(dst.join("added")).unwrap(), b"hi");
}

#[test]
fn same_size_and_mtime_but_new_ctime_is_read_again() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"aaaa").unwrap();
    let mtime = fs::metadata(src.join("f")).unwrap().modified().unwrap();
    let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
    let c1 = cap(&src, &o1, None, None);
    let cache = c1.stat_cache("s");
    tick();
    fs::write(src.join("f"), b"bbbb").unwrap();
    let f = File::options().write(true).open(src.join("f")).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let m = fs::metadata(src.join("f")).unwrap();
    let old = cache.trees[0].files["f"].key;
    assert_eq!(
        (m.size(), m.mtime(), m.mtime_nsec()),
        (old.size, old.mtime, old.mtime_nsec)
    );
    assert_ne!((m.ctime(), m.ctime_nsec()), (old.ctime, old.ctime_nsec));
    let c2 = cap(&src, &o2, Some(&cache), None);
    assert_eq!(c2.stats.files_unchanged, 0);
    assert_eq!(c2.stats.files_read_frozen, 1);
    assert_eq!(content(&c2, &o2, "f"), b"bbbb");
}

#[test]
fn a_file_changed_after_the_thaw_comes_from_the_previous_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("db"), vec![3u8; 9000]).unwrap();
    fs::write(src.join("other"), b"x").unwrap();
    let (o1, o2) = (t.path().join("o1"), t.path().join("o2"));
    let c1 = cap(&src, &o1, None, None);
    let cache = c1.stat_cache("s");
    fs::create_dir_all(&o2).unwrap();
    let mut c2 = capture_frozen(
        &rootfs(&src),
        &o2,
        &CaptureOptions {
            cache: Some(&cache),
            ..quick()
        },
    )
    .unwrap();
    assert_eq!(c2.stats.files_unchanged, 2);
    // Thawed: the container rewrites the file before the copy.
    tick();
    fs::write(src.join("db"), vec![4u8; 9000]).unwrap();
    let prev = o1.join(DATA_FILE);
    let mut asked = 0;
    c2.finish(&mut |_| {
        asked += 1;
        Ok(prev.clone())
    })
    .unwrap();
    assert_eq!(asked, 1);
    assert_eq!(c2.stats.files_from_previous, 1);
    assert_eq!(c2.stats.bytes_from_previous, 9000);
    assert_eq!(content(&c2, &o2, "db"), vec![3u8; 9000]);
    assert_eq!(content(&c2, &o2, "other"), b"x");
}

#[test]
fn damaged_previous_data_is_replaced_by_a_verified_copy_or_refused() {
    let t = tempfile::tempdir().unwrap();
    // A first capture (its data file is the previous snapshot's, `good`), a
    // damaged copy of that data (`bad`, a cached image gone bad), and a second
    // capture whose one file changes after the thaw, so it must come from
    // the previous data.
    let setup = |name: &str| {
        let src = t.path().join(name);
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("db"), vec![3u8; 9000]).unwrap();
        let o1 = t.path().join(format!("{name}-o1"));
        let c1 = cap(&src, &o1, None, None);
        let cache = c1.stat_cache("s");
        let good = o1.join(DATA_FILE);
        let bad = t.path().join(format!("{name}-bad.bin"));
        let mut bytes = fs::read(&good).unwrap();
        bytes[100] ^= 0x55;
        fs::write(&bad, &bytes).unwrap();
        let o2 = t.path().join(format!("{name}-o2"));
        fs::create_dir_all(&o2).unwrap();
        let c2 = capture_frozen(
            &rootfs(&src),
            &o2,
            &CaptureOptions {
                cache: Some(&cache),
                ..quick()
            },
        )
        .unwrap();
        assert_eq!(c2.stats.files_unchanged, 1);
        tick();
        fs::write(src.join("db"), vec![4u8; 9000]).unwrap();
        (c2, o2, good, bad)
    };
    // Cached copy damaged, store copy good: the good bytes are captured.
    let (mut c2, o2, good, bad) = setup("a");
    let mut asked = Vec::new();
    c2.finish(&mut |fresh| {
        asked.push(fresh);
        Ok(if fresh { good.clone() } else { bad.clone() })
    })
    .unwrap();
    assert_eq!(asked, vec![false, true]);
    assert_eq!(content(&c2, &o2, "db"), vec![3u8; 9000]);
    // Both damaged: refused, not captured wrong.
    let (mut c3, _, _, bad) = setup("b");
    let e = c3.finish(&mut |_| Ok(bad.clone())).unwrap_err();
    assert!(e.to_string().contains("damaged"), "{e}");
}

#[test]
fn recent_and_mapped_files_stay_out_of_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("fresh"), b"1").unwrap();
    fs::write(src.join("mapped"), b"2").unwrap();
    let out = t.path().join("o");
    fs::create_dir_all(&out).unwrap();
    let meta = fs::metadata(src.join("mapped")).unwrap();
    let mut mapped = Mapped::default();
    let (maj, min) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    mapped.add_maps(&format!(
        "7f0000000000-7f0000001000 rw-s 00000000 {maj:x}:{min:x} {} /x/mapped\n\
         7f0000001000-7f0000002000 rw-p 00000000 00:00 0 \n",
        meta.ino()
    ));
    // The default margin: a file written just now is racy.
    let mut c = capture_frozen(
        &rootfs(&src),
        &out,
        &CaptureOptions {
            mapped,
            ..Default::default()
        },
    )
    .unwrap();
    c.finish(&mut |_| unreachable!()).unwrap();
    assert_eq!(c.stats.files_mapped, 1);
    assert!(c.stat_cache("s").trees[0].files.is_empty());
    let mut mapped = Mapped::default();
    mapped.add_maps("7f0000000000-7f0000001000 rw-s 00000000 00:05 9 /x/y z\n");
    assert!(mapped.paths.contains(Path::new("/x/y z")));
    mapped.add_maps("7f0000000000-7f0000001000 r--s 00000000 00:05 10 /ro\n");
    assert!(!mapped.paths.contains(Path::new("/ro")));
}

#[test]
fn stat_cache_survives_a_save_and_refuses_other_versions() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"abc").unwrap();
    let c = cap(&src, &t.path().join("o"), None, None);
    let p = t.path().join("cache/c.json");
    c.stat_cache("s").save(&p).unwrap();
    let back = StatCache::load(&p).unwrap();
    assert_eq!(
        back.trees[0].files["f"],
        c.stat_cache("s").trees[0].files["f"]
    );
    fs::write(&p, br#"{"version":9,"snapshot":"s","trees":[]}"#).unwrap();
    assert!(StatCache::load(&p).is_none());
    fs::write(&p, b"garbage").unwrap();
    assert!(StatCache::load(&p).is_none());
}

#[test]
fn diff_lists_added_changed_and_removed_files_per_tree() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("same"), b"s").unwrap();
    fs::write(src.join("d/f"), b"old").unwrap();
    fs::write(src.join("gone"), b"g").unwrap();
    let c1 = cap(&src, &t.path().join("o1"), None, None);
    tick();
    fs::write(src.join("d/f"), b"new!").unwrap();
    fs::remove_file(src.join("gone")).unwrap();
    fs::write(src.join("d/added"), b"aa").unwrap();
    let c2 = cap(&src, &t.path().join("o2"), None, None);
    let d = diff_manifests(&c1.manifest, &c2.manifest);
    let got: Vec<(&str, &str, Option<u64>, Option<u64>)> = d
        .iter()
        .map(|x| (x.path.as_str(), x.change, x.size_a, x.size_b))
        .collect();
    assert_eq!(
        got,
        vec![
            ("d/added", "added", None, Some(2)),
            ("d/f", "changed", Some(3), Some(4)),
            ("gone", "removed", Some(1), None),
        ]
    );
    assert!(d.iter().all(|x| x.tree == "/"));
    assert_eq!(d[1].what, Some("content"));
    assert!(diff_manifests(&c2.manifest, &c2.manifest).is_empty());
}

#[test]
fn manifest_paths_cannot_escape() {
    assert!(safe_join(Path::new("/x"), "../etc").is_err());
    assert!(safe_join(Path::new("/x"), "/etc").is_err());
    assert!(safe_join(Path::new("/x"), "a/b").is_ok());
}

#[test]
fn materialize_never_goes_through_a_symlink() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"host").unwrap();
    let data = t.path().join("data");
    fs::write(&data, vec![0u8; 4096]).unwrap();
    let entry = |path: &str, kind: Kind, target: Option<String>| Entry {
        path: path.into(),
        kind,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        size: 0,
        offset: None,
        target,
        rdev: 0,
        xattrs: Vec::new(),
        sha256: None,
    };
    let root = entry("", Kind::Dir, None);
    let sym = entry("a", Kind::Symlink, Some(outside.display().to_string()));
    let cases = [
        // a file, a directory and a device through the symlink
        vec![root.clone(), sym.clone(), entry("a/x", Kind::File, None)],
        vec![root.clone(), sym.clone(), entry("a/d", Kind::Dir, None)],
        // a hard link to a host file through the symlink
        vec![
            root.clone(),
            sym.clone(),
            entry("l", Kind::Hardlink, Some("a/secret".into())),
        ],
        // a child listed before its parent directory
        vec![root.clone(), entry("b/x", Kind::File, None)],
    ];
    for (i, entries) in cases.into_iter().enumerate() {
        let m = Manifest {
            version: 1,
            trees: vec![Tree {
                role: "rootfs".into(),
                dest: "/".into(),
                source: PathBuf::from("/"),
                entries,
            }],
        };
        let dest = t.path().join(format!("dest{i}"));
        let err = materialize(&m, 0, &data, &dest).unwrap_err().to_string();
        assert!(err.contains("refusing it"), "case {i}: {err}");
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        1,
        "nothing written outside"
    );
}
