//! Damaged stores (issue 10): a checkpoint never commits a snapshot that
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
