//! gc keeps exactly what is reachable; injected crashes at every publish step
//! leave a valid store; concurrent ingests; prune.

use std::fs;
use std::time::Duration;

use super::*;
use crate::store::error::FAULT;
use crate::store::StoreError;

#[test]
fn gc_keeps_reachable_and_removes_the_rest() {
    let fx = Fixture::new();
    let a = fx.ingest(&fx.image("a", 20, 512), &["a"]);
    let b = fx.ingest(&fx.image("b", 21, 512), &["b"]);
    let junk = fx.store.root().join("tmp").join("pack-junk");
    fs::write(&junk, b"half a pack").expect("write");
    assert_eq!(fx.store.gc(false).expect("gc").blobs_removed, 0);
    assert!(!junk.exists());

    assert_eq!(
        fx.store.remove("b").expect("rm"),
        vec!["b:latest".to_string(), b.id.to_string()]
    );
    let dry = fx.store.gc(true).expect("dry run");
    assert!(
        dry.dry_run && dry.blobs_removed >= 4 && dry.bytes_freed > 0,
        "{dry:?}"
    );
    let before = fx.snapshot_of_store();
    let real = fx.store.gc(false).expect("gc");
    assert_eq!(
        (real.blobs_removed, real.bytes_freed),
        (dry.blobs_removed, dry.bytes_freed)
    );
    let after = fx.snapshot_of_store();
    assert_eq!(before.len() - after.len(), real.blobs_removed as usize);
    // Everything a still references is there.
    assert!(fx.store.verify(true).expect("verify").is_empty());
    let out = fx.path("out");
    fx.store
        .materialize(&a.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&fx.path("a")));
    assert_eq!(fx.store.gc(false).expect("gc again").blobs_removed, 0);
}

#[test]
fn gc_refuses_when_a_root_is_unreadable() {
    let fx = Fixture::new();
    let a = fx.ingest(&fx.image("a", 22, 64), &["a"]);
    let m = fx
        .store
        .blobs()
        .path(&fx.store.entry(&a.id).expect("entry").manifest);
    fs::remove_file(&m).expect("rm");
    let e = fx.store.gc(false).expect_err("damaged");
    assert!(
        e.to_string().contains("gc would lose track of its blobs"),
        "{e}"
    );
    fx.store.remove(&a.id.full()).expect("rm by id");
    fx.store.gc(false).expect("gc after rm");
    assert!(fx.store.verify(true).expect("verify").is_empty());
}

#[test]
fn crash_at_every_publish_step_leaves_a_valid_store() {
    let fx = Fixture::new();
    let base = fx.ingest(&fx.image("base", 30, 256), &["base"]);
    let img = fx.image("img", 31, 256);
    for point in [
        "pack",
        "packs",
        "page-tables",
        "files",
        "config",
        "manifest",
        "index-rename",
    ] {
        FAULT.with(|f| f.set(Some(point)));
        let e = fx.try_ingest(&img, &["new", "base"]).expect_err("injected");
        FAULT.with(|f| f.set(None));
        assert!(
            matches!(e, StoreError::Injected(p) if p == point),
            "{point}: {e}"
        );
        assert!(fx.errors(true).is_empty(), "{point}: {:?}", fx.errors(true));
        let list = fx.store.list().expect("list");
        assert_eq!(list.len(), 1, "{point}");
        assert_eq!(fx.store.resolve("base").expect("base"), base.id, "{point}");
        assert!(fx.store.resolve("new").is_err());
        fx.store.gc(false).expect("gc");
        assert!(fx.store.verify(true).expect("verify").is_empty(), "{point}");
    }
    let r = fx.ingest(&img, &["new"]);
    let out = fx.path("out");
    fx.store
        .materialize(&r.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
}

#[test]
fn concurrent_ingests_from_two_threads() {
    let fx = Fixture::new();
    let imgs: Vec<PathBuf> = (0..2)
        .map(|i| fx.image(&format!("img{i}"), 40 + i, 512))
        .collect();
    fx.ingest(&fx.image("seed", 39, 128), &[]);
    let reports: Vec<IngestReport> = std::thread::scope(|s| {
        let hs: Vec<_> = imgs
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let fx = &fx;
                s.spawn(move || fx.ingest(img, &[&format!("t{i}"), "shared"]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert_eq!(fx.store.list().expect("list").len(), 3);
    assert!(fx.store.verify(true).expect("verify").is_empty());
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(fx.store.resolve(&format!("t{i}")).expect("tag"), r.id);
        let out = fx.path(&format!("out{i}"));
        fx.store
            .materialize(&r.id, &out, false)
            .expect("materialize");
        assert_eq!(dir_contents(&out), dir_contents(&imgs[i]));
    }
    let shared = fx.store.resolve("shared").expect("shared");
    assert!(reports.iter().any(|r| r.id == shared));
}

#[test]
fn gc_waits_for_ingest_and_times_out_with_a_clear_message() {
    let fx = Fixture::new();
    let mut quick = fx.store.clone();
    quick.set_lock_timeout(Duration::from_millis(100));
    let held = fx.store.locks.shared().expect("shared");
    let e = quick.gc(false).expect_err("locked");
    assert!(
        e.to_string().contains("waiting for the exclusive lock on"),
        "{e}"
    );
    assert!(
        e.to_string().contains("another stasis process holds it"),
        "{e}"
    );
    drop(held);
    quick.gc(false).expect("gc");
}

#[test]
fn prune_keeps_tagged_newest_and_recent() {
    let fx = Fixture::new();
    let ids: Vec<SnapshotId> = (0..4u64)
        .map(|i| {
            let img = fx.image(&format!("img{i}"), 50 + i, 64);
            let tags: &[&str] = if i == 0 { &["keep"] } else { &[] };
            let id = fx.ingest(&img, tags).id;
            std::thread::sleep(Duration::from_millis(5));
            id
        })
        .collect();
    let dry = fx.store.prune(Some(1), None, true).expect("dry");
    assert_eq!(dry, vec![ids[2], ids[1]]);
    assert_eq!(fx.store.list().expect("list").len(), 4);
    assert!(fx
        .store
        .prune(None, Some(Duration::from_secs(3600)), false)
        .expect("within")
        .is_empty());
    let gone = fx.store.prune(Some(1), None, false).expect("prune");
    assert_eq!(gone, vec![ids[2], ids[1]]);
    let left: Vec<SnapshotId> = fx
        .store
        .list()
        .expect("list")
        .iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(left, vec![ids[0], ids[3]]);
    assert!(fx.store.verify(true).expect("verify").is_empty());
    assert!(fx.store.prune(None, None, false).is_err());
}

/// Run by `concurrent_ingests_from_two_processes` in a child process.
#[test]
#[ignore = "helper: runs only as a child of concurrent_ingests_from_two_processes"]
fn child_ingest_helper() {
    let (Some(root), Some(image), Some(tag)) = (
        std::env::var_os("STASIS_TEST_STORE"),
        std::env::var_os("STASIS_TEST_IMAGE"),
        std::env::var("STASIS_TEST_TAG").ok(),
    ) else {
        return;
    };
    let store = Store::open(Path::new(&root)).expect("open");
    store
        .ingest(
            SnapshotInput {
                image_dir: Path::new(&image),
                config_json: CONFIG_JSON,
                container_id: "child",
                metadata: serde_json::Value::Null,
                tags: vec![tag],
            },
            &IngestOptions::default(),
        )
        .expect("child ingest");
}

#[test]
fn concurrent_ingests_from_two_processes() {
    let fx = Fixture::new();
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<_> = (0..2)
        .map(|i| {
            let img = fx.image(&format!("img{i}"), 80 + i, 256);
            std::process::Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "store::tests::gc_crash::child_ingest_helper",
                    "--test-threads=1",
                ])
                .env("STASIS_TEST_STORE", fx.store.root())
                .env("STASIS_TEST_IMAGE", &img)
                .env("STASIS_TEST_TAG", format!("p{i}"))
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for mut c in children {
        assert!(c.wait().expect("wait").success());
    }
    assert_eq!(fx.store.list().expect("list").len(), 2);
    assert!(fx.store.verify(true).expect("verify").is_empty());
    for i in 0..2 {
        let id = fx.store.resolve(&format!("p{i}")).expect("tag");
        let out = fx.path(&format!("out{i}"));
        fx.store.materialize(&id, &out, false).expect("materialize");
        assert_eq!(
            dir_contents(&out),
            dir_contents(&fx.path(&format!("img{i}")))
        );
    }
}
