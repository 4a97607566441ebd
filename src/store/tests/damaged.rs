//! Damaged stores: a checkpoint never commits a snapshot that
//! references data no longer matching its digest; import and repair replace
//! damaged blobs with good copies; a lost index.json is damage, not garbage.

use std::fs;

use super::super::format::PREFIX_LEN;
use super::super::{IngestOptions, SnapshotInput};
use super::*;

/// Ingests `image` with a config.json of its own (a different snapshot id for
/// the same pages and small files).
fn ingest_with_config(fx: &Fixture, image: &Path, config: &[u8], tag: &str) -> IngestReport {
    fx.store
        .ingest(
            SnapshotInput {
                image_dir: image,
                config_json: config,
                container_id: "ctr2",
                metadata: serde_json::json!({}),
                tags: vec![tag.to_string()],
            },
            &IngestOptions::default(),
        )
        .expect("ingest")
}

fn restores_as(fx: &Fixture, name: &str, image: &Path) {
    let id = fx.store.resolve(name).expect("resolve");
    let dest = fx.path(&format!("restored-{name}"));
    let _ = fs::remove_dir_all(&dest);
    fx.store
        .materialize(&id, &dest, false)
        .unwrap_or_else(|e| panic!("{name} does not restore: {e}"));
    assert_eq!(dir_contents(&dest), dir_contents(image), "{name}");
}

#[test]
fn a_damaged_pack_is_not_reused_its_pages_are_stored_again() {
    let fx = Fixture::new();
    let img = fx.image("img", 21, 512);
    let a = fx.ingest(&img, &["a"]);
    let pack = fx.packs(&a.id).remove(0);
    flip(&pack, PREFIX_LEN as u64 + 40);
    mutate(&img, 5, 99);
    let b = fx.ingest(&img, &["b"]);
    let digest = format!(
        "sha256:{}",
        pack.file_name().expect("name").to_string_lossy()
    );
    assert_eq!(
        b.damaged_packs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>(),
        vec![digest.clone()]
    );
    assert!(b.pages_new > 400, "pages stored again: {}", b.pages_new);
    assert!(
        !fx.manifest(&b.id).layers.iter().any(|l| l.digest == digest),
        "the new snapshot references the damaged pack"
    );
    restores_as(&fx, "b", &img);
    // A later ingest reuses the fresh copies instead of storing them once more.
    mutate(&img, 5, 97);
    let c = fx.ingest(&img, &["c"]);
    assert!(c.pages_new <= 10, "stored again: {}", c.pages_new);
    restores_as(&fx, "c", &img);
    // Only the old snapshot is damaged.
    let errors = fx.errors(true);
    assert!(!errors.is_empty());
    let short = a.id.to_string();
    assert!(errors.iter().all(|f| f.what.contains(&short)), "{errors:?}");
}

#[test]
fn same_content_as_a_damaged_snapshot_repairs_it() {
    let fx = Fixture::new();
    let img = fx.image("img", 22, 256);
    let a = fx.ingest(&img, &["a"]);
    let pack = fx.packs(&a.id).remove(0);
    flip(&pack, PREFIX_LEN as u64 + 40);
    // The same pages packed again make the same pack: the damaged copy is
    // replaced by the fresh one, and the snapshot is sound again.
    let b = fx.ingest(&img, &["b"]);
    assert_eq!(a.id, b.id);
    assert_eq!(b.damaged_packs.len(), 1);
    restores_as(&fx, "a", &img);
    restores_as(&fx, "b", &img);
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));

    // A damaged manifest: the snapshot gets a new, sound one, and every tag of
    // it moves there instead of being pointed at the damaged one.
    let entry = fx.store.entry(&a.id).expect("entry");
    flip(&fx.store.blobs().path(&entry.manifest), 10);
    let c = fx.ingest(&img, &["c"]);
    assert!(!c.existed, "pointed a tag at the damaged snapshot");
    for t in ["a", "b", "c"] {
        restores_as(&fx, t, &img);
    }
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
    // An intact snapshot is still simply reused.
    let d = fx.ingest(&img, &["d"]);
    assert!(d.existed && d.damaged_packs.is_empty());
}

#[test]
fn a_damaged_page_table_or_files_blob_of_the_same_content_is_rewritten() {
    let fx = Fixture::new();
    let img = fx.image("img", 23, 64);
    let a = fx.ingest(&img, &["a"]);
    let table = fx.layers(&a.id, layout::MT_PAGE_TABLE).remove(0);
    let files = fx.layers(&a.id, layout::MT_FILES).remove(0);
    flip(&table, 20);
    flip(&files, 30);
    // Same pages and small files, another config.json: the same page table and
    // files blob are written again and must replace the damaged copies.
    let b = ingest_with_config(&fx, &img, b"{\"other\":1}\n", "b");
    assert_ne!(a.id, b.id);
    restores_as(&fx, "b", &img);
    restores_as(&fx, "a", &img);
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
}

#[test]
fn reimport_replaces_a_damaged_blob_with_the_archives_copy() {
    let fx = Fixture::new();
    let img = fx.image("img", 24, 256);
    let a = fx.ingest(&img, &["a"]);
    let tar = fx.path("a.tar");
    fx.store.export("a", &tar).expect("export");
    let pack = fx.packs(&a.id).remove(0);
    flip(&pack, PREFIX_LEN as u64 + 40);
    let files = fx.layers(&a.id, layout::MT_FILES).remove(0);
    flip(&files, 30);
    assert!(!fx.errors(true).is_empty());
    assert_eq!(fx.store.import(&tar).expect("import"), vec![a.id]);
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
    restores_as(&fx, "a", &img);
}

#[test]
fn repair_from_an_archive_puts_back_every_blob_it_holds() {
    let fx = Fixture::new();
    let img = fx.image("img", 25, 256);
    let a = fx.ingest(&img, &["a"]);
    let tar = fx.path("a.tar");
    fx.store.export("a", &tar).expect("export");
    // The manifest hides the rest until it is repaired.
    let pack = fx.packs(&a.id).remove(0);
    let table = fx.layers(&a.id, layout::MT_PAGE_TABLE).remove(0);
    let manifest = fx
        .store
        .blobs()
        .path(&fx.store.entry(&a.id).expect("entry").manifest);
    flip(&pack, PREFIX_LEN as u64 + 40);
    flip(&table, 20);
    fs::remove_file(&manifest).expect("rm manifest");
    let r = fx.store.repair(Some(&tar)).expect("repair");
    assert_eq!(r.repaired.len(), 3, "{r:?}");
    assert!(r.unrepaired.is_empty(), "{r:?}");
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
    restores_as(&fx, "a", &img);
    // Nothing left to do.
    assert_eq!(fx.store.repair(None).expect("repair"), Default::default());
}

#[test]
fn repair_rebuilds_a_pack_from_the_pages_a_later_checkpoint_stored_again() {
    let fx = Fixture::new();
    let img = fx.image("img", 26, 512);
    let a = fx.ingest(&img, &["a"]);
    let a_img = fx.path("img-a");
    fs::create_dir_all(&a_img).expect("mkdir");
    for (name, bytes) in dir_contents(&img) {
        fs::write(a_img.join(name), bytes).expect("copy");
    }
    let pack = fx.packs(&a.id).remove(0);
    flip(&pack, PREFIX_LEN as u64 + 40);
    // Nothing has the damaged frame's pages yet: repair says so.
    let r = fx.store.repair(None).expect("repair");
    assert!(r.repaired.is_empty(), "{r:?}");
    assert_eq!(r.unrepaired.len(), 1, "{r:?}");
    assert!(
        r.unrepaired[0].contains("pack") && r.unrepaired[0].contains(&a.id.to_string()),
        "{r:?}"
    );
    // A later checkpoint (a few pages changed) stores the pages again.
    mutate(&img, 5, 98);
    fx.ingest(&img, &["b"]);
    let r = fx.store.repair(None).expect("repair");
    assert_eq!(r.repaired.len(), 1, "{r:?}");
    assert!(r.unrepaired.is_empty(), "{r:?}");
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
    restores_as(&fx, "a", &a_img);
}

#[test]
fn a_lost_index_is_damage_and_is_rebuilt_from_the_manifests() {
    let fx = Fixture::new();
    let img = fx.image("img", 27, 64);
    let a = fx.ingest(&img, &["a", "keep:v1"]);
    mutate(&img, 3, 1);
    let b = fx.ingest(&img, &[]);
    mutate(&img, 3, 2);
    let c = fx.ingest(&img, &["a"]); // moves `a` to c
    let root = fx.store.root().to_path_buf();
    let blobs_before = fs::read_dir(root.join("blobs/sha256")).expect("ls").count();
    assert!(fx.store.rebuild_index().is_err(), "rebuilt an intact index");

    fs::remove_file(root.join("index.json")).expect("rm index.json");
    // Reopening does not paper over it with an empty index.
    let store = Store::open(&root).expect("reopen");
    assert!(!root.join("index.json").exists());
    let e = store.list().expect_err("list without index");
    assert!(e.to_string().contains("--rebuild-index"), "{e}");
    let findings = store.verify(false).expect("verify");
    assert!(
        findings
            .iter()
            .any(|f| f.level == crate::store::Level::Error && f.hint.contains("--rebuild-index")),
        "{findings:?}"
    );
    let e = store.gc(false).expect_err("gc without index");
    assert!(e.to_string().contains("--rebuild-index"), "{e}");
    assert!(store.prune(Some(0), None, false).is_err());
    assert_eq!(
        fs::read_dir(root.join("blobs/sha256")).expect("ls").count(),
        blobs_before
    );

    let r = store.rebuild_index().expect("rebuild");
    assert_eq!(r.kept_damaged, None);
    let got: Vec<_> = r.snapshots.iter().map(|(id, _)| *id).collect();
    assert_eq!(got, vec![a.id, b.id, c.id]);
    assert_eq!(store.resolve("a").expect("a"), c.id);
    assert_eq!(store.resolve("keep:v1").expect("keep"), a.id);
    let tagless: Vec<_> = store
        .list()
        .expect("list")
        .into_iter()
        .filter(|s| s.tags.is_empty())
        .map(|s| s.id)
        .collect();
    assert_eq!(tagless, vec![b.id]);
    assert!(fx.errors(true).is_empty(), "{:?}", fx.errors(true));
    assert_eq!(store.gc(false).expect("gc").blobs_removed, 0);
}

#[test]
fn an_unparseable_index_is_kept_aside_and_rebuilt() {
    let fx = Fixture::new();
    let img = fx.image("img", 28, 32);
    let a = fx.ingest(&img, &["a"]);
    let root = fx.store.root().to_path_buf();
    fs::write(root.join("index.json"), b"{\"schemaVersion\": 2, \"manif").expect("write");
    let store = Store::open(&root).expect("a damaged index still opens");
    assert!(store.gc(true).is_err());
    let r = store.rebuild_index().expect("rebuild");
    assert_eq!(r.kept_damaged, Some(root.join("index.json.damaged")));
    assert_eq!(r.snapshots, vec![(a.id, vec!["a:latest".to_string()])]);
    restores_as(&fx, "a", &img);
}

#[test]
fn repair_from_something_that_is_not_an_archive_says_so() {
    let fx = Fixture::new();
    let img = fx.image("img", 29, 32);
    let a = fx.ingest(&img, &["a"]);
    flip(&fx.packs(&a.id).remove(0), PREFIX_LEN as u64 + 40);
    let junk = fx.path("junk.tar");
    fs::write(&junk, vec![7u8; 1500]).expect("write");
    let e = fx.store.repair(Some(&junk)).expect_err("junk archive");
    let msg = e.to_string();
    assert!(
        msg.contains("cannot repair from") && msg.contains("junk.tar"),
        "{msg}"
    );
}

#[test]
fn rebuilt_snapshots_are_not_trusted_as_local() {
    let fx = Fixture::new();
    let img = fx.image("img", 30, 32);
    fx.ingest(&img, &["a"]);
    let root = fx.store.root().to_path_buf();
    fs::remove_file(root.join("index.json")).expect("rm");
    let store = Store::open(&root).expect("reopen");
    store.rebuild_index().expect("rebuild");
    let index = store.read_index().expect("index");
    let e = &super::super::catalog::entries(&index)[0];
    assert_eq!(e.origin, crate::store::Origin::Unknown);
}
