use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::cache::gc_fs_cache;
use super::private_fs::{check_volume_sources, source_bundle};
use super::statcache::usable_stat_cache;
use crate::store::{IngestOptions, SnapshotId, SnapshotInput, Store};
use crate::workflows::meta::SnapshotMeta;
use crate::workflows::{fstree, WorkflowError};

fn small_image(dir: &Path, seed: u8) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("inventory.img"), [seed; 64]).unwrap();
    fs::write(dir.join("core-1.img"), [seed ^ 0x55; 300]).unwrap();
    dir.to_path_buf()
}

fn ingest(store: &Store, image: &Path) -> SnapshotId {
    store
        .ingest(
            SnapshotInput {
                image_dir: image,
                config_json: b"{}",
                container_id: "c1",
                metadata: json!({}),
                tags: Vec::new(),
            },
            &IngestOptions::default(),
        )
        .unwrap()
        .id
}

fn stat_cache_of(sid: &str) -> fstree::StatCache {
    fstree::StatCache {
        version: fstree::STAT_CACHE_VERSION,
        snapshot: sid.to_string(),
        trees: Vec::new(),
    }
}

#[test]
fn relative_bind_sources_resolve_against_the_given_bundle() {
    let t = tempfile::tempdir().unwrap();
    let (orig, given) = (t.path().join("orig"), t.path().join("given"));
    fs::create_dir_all(given.join("shared")).unwrap();
    fs::create_dir_all(&orig).unwrap();
    let meta = SnapshotMeta {
        bundle: Some(orig.clone()),
        ..SnapshotMeta::default()
    };
    let spec = json!({"mounts": [
        {"destination": "/data", "type": "bind", "source": "carried-vol", "options": ["rbind"]},
        {"destination": "/shared", "type": "bind", "source": "shared", "options": ["rbind"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
    ]});
    assert_eq!(source_bundle(Some(&given), &meta), Some(given.as_path()));
    assert_eq!(source_bundle(None, &meta), Some(orig.as_path()));
    // With --bundle: its own relative source, found; the carried volume's
    // source (replaced by the copy's own) is not looked for.
    let mut cfg = spec.clone();
    check_volume_sources(
        "s1",
        &mut cfg,
        source_bundle(Some(&given), &meta),
        &["/data"],
    )
    .unwrap();
    assert_eq!(cfg["mounts"][1]["source"], json!(given.join("shared")));
    assert_eq!(cfg["mounts"][0]["source"], json!("carried-vol"));
    // Without it: relative to the original bundle, where it is missing.
    let mut cfg = spec.clone();
    let e =
        check_volume_sources("s1", &mut cfg, source_bundle(None, &meta), &["/data"]).unwrap_err();
    match e {
        WorkflowError::VolumeMissing { path, dest, .. } => {
            assert_eq!((path, dest.as_str()), (orig.join("shared"), "/shared"));
        }
        e => panic!("{e}"),
    }
}

#[test]
fn gc_removes_stat_caches_whose_snapshot_is_gone() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(&t.path().join("store")).unwrap();
    let live = ingest(&store, &small_image(&t.path().join("a"), 1));
    let gone = ingest(&store, &small_image(&t.path().join("b"), 2));
    store.remove(&format!("sha256:{}", gone.full())).unwrap();
    let (keep, stale, bad) = (
        store.stat_cache_path("kept"),
        store.stat_cache_path("serve-7000-1-3"),
        store.stat_cache_path("garbage"),
    );
    stat_cache_of(&live.full()).save(&keep).unwrap();
    stat_cache_of(&gone.full()).save(&stale).unwrap();
    fs::write(&bad, b"not json").unwrap();
    let dir = keep.parent().unwrap().to_path_buf();
    let names = || {
        let mut v: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let (_, dry) = gc_fs_cache(&store, true).unwrap();
    assert!(dry > 0);
    assert_eq!(
        names(),
        ["garbage.json", "kept.json", "serve-7000-1-3.json"]
    );
    let (_, freed) = gc_fs_cache(&store, false).unwrap();
    assert_eq!(freed, dry);
    assert_eq!(names(), ["kept.json"]);
    assert!(usable_stat_cache(&store, &keep).is_some());
}

#[test]
fn generations_are_random_hex_ids() {
    let (a, b) = (
        super::new_generation().unwrap(),
        super::new_generation().unwrap(),
    );
    assert_eq!(a.len(), 16);
    assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    assert_ne!(a, "0".repeat(16));
    assert_ne!(a, b);
}
