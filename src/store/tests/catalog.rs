//! open(), resolve, tags and removal.

use std::fs;

use super::*;
use crate::store::catalog;
use crate::store::layout::{Descriptor, Index};
use crate::store::StoreError;

#[test]
fn open_refuses_a_directory_that_is_not_a_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("notastore");
    fs::create_dir(&p).expect("mkdir");
    fs::write(p.join("notes.txt"), b"hi").expect("write");
    let e = Store::open(&p).expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!("{} is not a stasis store: the directory is not empty and has no oci-layout file (it holds notes.txt)", p.display())
    );
    let f = dir.path().join("file");
    fs::write(&f, b"x").expect("write");
    let e = Store::open(&f).expect_err("a file");
    assert_eq!(
        e.to_string(),
        format!(
            "{} is not a stasis store: it is not a directory",
            f.display()
        )
    );
    fs::write(p.join("oci-layout"), b"{\"imageLayoutVersion\":\"2.0.0\"}").expect("write");
    assert!(Store::open(&p).is_err());

    // Missing and empty directories become stores; reopening works.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    for root in [dir.path().join("new/nested"), empty] {
        Store::open(&root).expect("create");
        for f in ["oci-layout", "index.json", "blobs/sha256", "tmp", "cache"] {
            assert!(root.join(f).exists(), "{f}");
        }
        let s = Store::open(&root).expect("reopen");
        assert!(s.list().expect("list").is_empty());
        assert!(s.verify(true).expect("verify").is_empty());
    }
}

#[test]
fn default_root_follows_the_environment() {
    // Only checks the fallback shape; the env var is process-wide.
    let p = Store::default_root();
    assert!(p.is_absolute() || std::env::var_os("STASIS_STORE").is_some());
}

fn fake_index(ids: &[&str], tags: &[Option<&str>]) -> Index {
    let mut index = Index::empty();
    for (hexid, tag) in ids.iter().zip(tags) {
        let id = format!("{hexid:0<64}");
        let mut d = Descriptor::new(
            layout::MT_MANIFEST,
            &crate::store::BlobDigest::of(id.as_bytes()),
            10,
        );
        d.annotations.insert(layout::A_ID.into(), id);
        if let Some(t) = tag {
            d.annotations
                .insert(layout::A_REF_NAME.into(), t.to_string());
        }
        index.manifests.push(d);
    }
    index
}

#[test]
fn resolve_tags_prefixes_and_errors() {
    let index = fake_index(
        &["abcd1", "abcd2", "ef01"],
        &[Some("redis:latest"), Some("redis:v2"), None],
    );
    let id = |s: &str| crate::store::SnapshotId::parse(&format!("{s:0<64}")).expect("id");
    assert_eq!(catalog::resolve(&index, "redis").ok(), Some(id("abcd1")));
    assert_eq!(catalog::resolve(&index, "redis:v2").ok(), Some(id("abcd2")));
    assert_eq!(catalog::resolve(&index, "abcd2").ok(), Some(id("abcd2")));
    assert_eq!(catalog::resolve(&index, "ef01").ok(), Some(id("ef01")));
    assert_eq!(
        catalog::resolve(&index, &format!("sha256:{:0<64}", "ef01")).ok(),
        Some(id("ef01"))
    );

    let e = catalog::resolve(&index, "abcd").expect_err("ambiguous");
    assert!(matches!(e, StoreError::AmbiguousId { .. }));
    assert_eq!(
        e.to_string(),
        "snapshot id prefix \"abcd\" is ambiguous, it matches: abcd10000000 (redis:latest), abcd20000000 (redis:v2)"
    );
    let e = catalog::resolve(&index, "redis:v3").expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "no snapshot \"redis:v3\" in the store; tags named redis: redis:latest, redis:v2"
    );
    let e = catalog::resolve(&index, "postgres").expect_err("unknown");
    assert_eq!(
        e.to_string(),
        "no snapshot \"postgres\" in the store; known tags: redis:latest, redis:v2"
    );
    let e = catalog::resolve(&index, "abc").expect_err("short");
    assert_eq!(
        e.to_string(),
        "no snapshot \"abc\" in the store; an id prefix needs at least 4 hex characters"
    );
    let e = catalog::resolve(&Index::empty(), "x").expect_err("empty");
    assert_eq!(
        e.to_string(),
        "no snapshot \"x\" in the store; the store has no snapshots"
    );
}

#[test]
fn tag_move_and_remove() {
    let fx = Fixture::new();
    let a = fx.ingest(&fx.image("a", 70, 32), &["app:v1"]);
    let b = fx.ingest(&fx.image("b", 71, 32), &[]);
    assert_eq!(fx.store.resolve(&b.id.short()).expect("by id"), b.id);
    assert_eq!(fx.store.resolve(&b.id.full()[..6]).expect("prefix"), b.id);

    fx.store.tag("app:v1", "app").expect("tag");
    fx.store.tag(&b.id.short(), "app:v1").expect("move v1");
    assert_eq!(fx.store.resolve("app:v1").expect("v1"), b.id);
    assert_eq!(fx.store.resolve("app").expect("latest"), a.id);
    assert!(fx.store.tag("app", "bad tag").is_err());

    // Moving a snapshot's last tag away keeps it as an untagged root.
    fx.store.tag(&b.id.short(), "app").expect("move latest");
    let list = fx.store.list().expect("list");
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|s| s.id == a.id && s.tags.is_empty()));

    // Removing the last tag removes the snapshot; removing one of two keeps it.
    assert_eq!(
        fx.store.remove("app:v1").expect("rm"),
        vec!["app:v1".to_string()]
    );
    assert_eq!(fx.store.resolve("app").expect("still"), b.id);
    assert_eq!(
        fx.store.remove("app").expect("rm"),
        vec!["app:latest".to_string(), b.id.to_string()]
    );
    assert_eq!(
        fx.store.remove(&a.id.short()).expect("rm id"),
        vec![a.id.to_string()]
    );
    assert!(fx.store.list().expect("list").is_empty());
    let e = fx.store.remove("app").expect_err("gone");
    // The error names the store, so a mistyped --store shows.
    let want = format!("no snapshot \"app\" in store {}", fx.store.root().display());
    assert!(e.to_string().starts_with(&want), "{e}");
}

#[test]
fn concurrent_opens_of_a_new_store_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("s");
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| Store::open(&root))).collect();
        for h in hs {
            h.join().expect("thread").expect("open");
        }
    });
    let s = Store::open(&root).expect("reopen");
    assert!(s.verify(true).expect("verify").is_empty());
}

#[test]
fn a_pin_keeps_snapshots_from_rm_and_gc_but_not_reads_or_ingests() {
    let mut f = Fixture::new();
    let a = f.ingest(&f.image("a", 1, 8), &["a"]).id;
    let pin = f.store.pin().expect("pin");
    // This process's own work under the pin goes on (no self-deadlock).
    let b = f.ingest(&f.image("b", 2, 8), &["b"]).id;
    assert!(f.store.config(&a).is_ok());
    f.store
        .materialize_file(&a, "core-1.img", &f.path("one"))
        .expect("read a file");
    // Removal and gc wait for the pin, and time out while it is held.
    f.store
        .set_lock_timeout(std::time::Duration::from_millis(50));
    let e = f.store.remove("a").expect_err("remove waits for the pin");
    assert!(matches!(e, StoreError::LockTimeout { .. }), "{e}");
    assert!(matches!(
        f.store.gc(false),
        Err(StoreError::LockTimeout { .. })
    ));
    assert_eq!(f.store.resolve("a").expect("a still there"), a);
    drop(pin);
    f.store.remove("a").expect("remove after the pin");
    f.store.gc(false).expect("gc after the pin");
    assert_eq!(f.store.resolve("b").expect("b"), b);
}
