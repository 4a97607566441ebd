//! Cache lifecycle tests on temp directories: keys, reuse, rebuild after
//! damage, dropped builds, dead temps, verify's deep and data checks.

use super::*;

fn sid(b: u8) -> SnapshotId {
    SnapshotId::parse(&hex::encode([b; 32])).unwrap()
}

fn build(store: &Store, kind: CacheKind, id: &SnapshotId) -> PathBuf {
    match store.cache_lookup(kind, id).unwrap() {
        CacheLookup::Ready(_) => panic!("expected a build"),
        CacheLookup::Build(b) => {
            fs::create_dir_all(b.path().join("bin")).unwrap();
            fs::write(b.path().join("bin/sh"), b"#!").unwrap();
            fs::write(b.path().join("core-1.img"), [7u8; 100]).unwrap();
            b.commit().unwrap()
        }
    }
}

#[test]
fn entries_are_keyed_by_the_full_id_and_reused_when_complete() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let id = sid(1);
    let dir = store.cache_dir(CacheKind::Image, &id);
    assert!(dir.ends_with(format!("cache/img/{}", id.full())));
    let p = build(&store, CacheKind::Image, &id);
    assert_eq!(p, dir.join("image"));
    assert!(matches!(
        store.cache_lookup(CacheKind::Image, &id).unwrap(),
        CacheLookup::Ready(r) if r == p
    ));
}

#[test]
fn a_damaged_or_incomplete_entry_is_rebuilt() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let id = sid(2);
    // A removed file, a changed file, a removed tree, a missing marker.
    let damage: [&dyn Fn(&Path); 4] = [
        &|p| fs::remove_file(p.join("core-1.img")).unwrap(),
        // (Another size: a rewrite within the same clock tick as the build
        // can keep the ctime.)
        &|p| fs::write(p.join("core-1.img"), [8u8; 99]).unwrap(),
        &|p| fs::remove_dir_all(p).unwrap(),
        &|p| fs::remove_file(p.with_file_name(".complete-image")).unwrap(),
    ];
    let mut p = build(&store, CacheKind::Image, &id);
    for d in damage {
        d(&p);
        // `build` panics unless the lookup asks for a rebuild.
        p = build(&store, CacheKind::Image, &id);
    }
    // A rootfs's top level is checked at lookup: a removed /bin/sh changes
    // /bin.
    let p = build(&store, CacheKind::Rootfs, &id);
    fs::remove_file(p.join("bin/sh")).unwrap();
    build(&store, CacheKind::Rootfs, &id);
}

#[test]
fn verify_read_data_finds_a_cached_image_that_differs_from_its_snapshot() {
    let fx = crate::store::tests::Fixture::new();
    let r = fx.ingest(&fx.image("a", 1, 8), &["a"]);
    let CacheLookup::Build(b) = fx.store.cache_lookup(CacheKind::Image, &r.id).unwrap() else {
        panic!("expected a build")
    };
    fx.store.materialize(&r.id, b.path(), false).unwrap();
    let image = b.commit().unwrap();
    let cached = |f: &Finding| f.what.contains("cached image");
    assert!(!fx.store.verify(true).unwrap().iter().any(cached));
    // A byte changed and the marker rewritten to match: a change the
    // lookup's size and ctime check cannot see.
    let pages = image.join("pages-1.img");
    let mut bytes = fs::read(&pages).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&pages, &bytes).unwrap();
    let dir = image.parent().unwrap();
    let marker = Marker {
        version: MARKER_VERSION,
        snapshot: r.id.full(),
        files: list_tree(&image).unwrap(),
    };
    fs::write(
        marker_path(dir, CacheKind::Image),
        serde_json::to_vec(&marker).unwrap(),
    )
    .unwrap();
    fs::write(
        listing_path(dir, CacheKind::Image),
        serde_json::to_vec(&marker.files).unwrap(),
    )
    .unwrap();
    assert!(fx.store.cache_ready(CacheKind::Image, &r.id).is_some());
    assert!(!fx.store.verify(false).unwrap().iter().any(cached));
    let found = fx.store.verify(true).unwrap();
    let f = found.iter().find(|f| cached(f)).expect("a finding");
    assert_eq!(f.level, Level::Warning);
    assert!(f.what.contains("pages-1.img does not match"), "{f}");
    // Removed: the next restore rebuilds it.
    assert!(fx.store.cache_ready(CacheKind::Image, &r.id).is_none());
    assert!(!image.exists());
}

#[test]
fn a_rootfs_changed_below_its_top_level_is_found_by_verify() {
    let fx = crate::store::tests::Fixture::new();
    let r = fx.ingest(&fx.image("a", 2, 4), &["a"]);
    let p = build(&fx.store, CacheKind::Rootfs, &r.id);
    // Only the top level is checked at lookup (a listing of every file is
    // for verify): a rewritten /bin/sh passes the lookup.
    fs::write(p.join("bin/sh"), b"#!/bin/evil").unwrap();
    assert!(fx.store.cache_ready(CacheKind::Rootfs, &r.id).is_some());
    let found = fx.store.verify(false).unwrap();
    assert!(
        found
            .iter()
            .any(|f| f.what.contains("cached rootfs") && f.what.contains("bin/sh")),
        "{found:?}"
    );
    assert!(fx.store.cache_ready(CacheKind::Rootfs, &r.id).is_none());
}

#[test]
fn dropped_builds_leave_nothing_and_dead_temps_are_collected() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path()).unwrap();
    let id = sid(3);
    let CacheLookup::Build(b) = store.cache_lookup(CacheKind::Image, &id).unwrap() else {
        panic!("expected a build")
    };
    fs::create_dir_all(b.path()).unwrap();
    let tmp = b.path().to_path_buf();
    drop(b);
    assert!(!tmp.exists());
    // A temp entry of a killed builder (pid 1 is never us).
    let dir = store.cache_dir(CacheKind::Image, &id);
    let dead = dir.join(".tmp-image-1");
    fs::create_dir_all(&dead).unwrap();
    fs::write(dead.join("pages-1.img"), [0u8; 4096]).unwrap();
    // No snapshot with this id: gc removes the whole entry.
    let r = store.gc_caches(false).unwrap();
    assert_eq!(r.entries_removed, 1);
    assert!(r.bytes_freed >= 4096);
    assert!(!dir.exists());
}
