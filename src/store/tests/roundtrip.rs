//! Ingest + materialize round trips and deduplication.

use std::fs;

use super::*;
use crate::store::pack::PAGE_SIZE;

#[test]
fn round_trip_is_byte_exact() {
    let fx = Fixture::new();
    let img = fx.image("img", 1, 1024);
    let r = fx.ingest(&img, &["redis"]);
    let raw: u64 = dir_contents(&img).values().map(|v| v.len() as u64).sum();
    assert_eq!(r.image_bytes, raw);
    assert_eq!(r.pages_total, 1024);
    assert_eq!(r.pages_new + r.pages_reused, 1024);
    assert!(!r.existed);
    // Zero pages dedup within the snapshot; random pages don't compress.
    assert!(r.pages_reused > 100, "{r:?}");
    assert!(r.bytes_added < raw * 6 / 10, "{r:?}");

    let out = fx.path("out");
    fx.store
        .materialize(&r.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));

    assert_eq!(
        fx.store.config_json(&r.id).expect("config.json"),
        CONFIG_JSON
    );
    let cfg = fx.store.config(&r.id).expect("config");
    assert_eq!(cfg["container"], "ctr1");
    assert_eq!(cfg["metadata"]["criu"]["version"], "4.2");
    assert_eq!(cfg["files"].as_array().map(|a| a.len()), Some(5));
    assert_eq!(cfg["sizes"]["pagesTotal"], 1024);

    let list = fx.store.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].tags, vec!["redis:latest".to_string()]);
    assert_eq!(list[0].container, "ctr1");
    assert_eq!(list[0].image_bytes, raw);
    assert_eq!(list[0].added_bytes, r.bytes_added);
    assert!(fx.errors(true).is_empty());
    assert!(fx.store.verify(true).expect("verify").is_empty());
    assert!(tmp_is_empty(&fx.store));
}

#[test]
fn partial_last_page_and_empty_files() {
    let fx = Fixture::new();
    let img = fx.path("img");
    fs::create_dir_all(&img).expect("mkdir");
    let mut data = super::pages(5, 10);
    data.truncate(9 * PAGE_SIZE + 123);
    fs::write(img.join("pages-1.img"), &data).expect("write");
    fs::write(img.join("pages-2.img"), b"").expect("write");
    fs::write(img.join("pages-3.img"), b"short").expect("write");
    write_small(&img, 5);
    let r = fx.ingest(&img, &[]);
    assert_eq!(r.pages_total, 10 + 1);
    let out = fx.path("out");
    fx.store
        .materialize(&r.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
    assert!(fx.errors(true).is_empty());
}

#[test]
fn same_image_twice_adds_nothing() {
    let fx = Fixture::new();
    let img = fx.image("img", 2, 1024);
    let a = fx.ingest(&img, &["a"]);
    let packs = fx.pack_bytes();
    let b = fx.ingest(&img, &["b"]);
    assert_eq!(b.id, a.id);
    assert!(b.existed);
    assert_eq!(b.bytes_added, 0);
    assert_eq!(b.pages_new, 0);
    assert_eq!(fx.pack_bytes(), packs);
    let list = fx.store.list().expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].tags,
        vec!["a:latest".to_string(), "b:latest".to_string()]
    );

    // Same pages, a different small file: a new snapshot that adds no pack bytes.
    fs::write(img.join("core-1.img"), b"another core").expect("write");
    let c = fx.ingest(&img, &[]);
    assert_ne!(c.id, a.id);
    assert_eq!(c.pages_new, 0);
    assert_eq!(c.pages_reused, 1024);
    assert_eq!(fx.pack_bytes(), packs);
    assert!(c.bytes_added < 16 * 1024, "{c:?}");
    let out = fx.path("out");
    fx.store
        .materialize(&c.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
}

#[test]
fn two_percent_changed_adds_about_two_percent() {
    let fx = Fixture::new();
    let img = fx.image("img", 3, 2048);
    let a = fx.ingest(&img, &[]);
    mutate(&img, 41, 99); // 2% of 2048 pages
    let b = fx.ingest(&img, &[]);
    assert!(b.pages_new >= 35 && b.pages_new <= 41, "{b:?}");
    let raw = 2048 * PAGE_SIZE as u64;
    assert!(
        b.bytes_added <= raw * 3 / 100,
        "added {} of raw {raw}",
        b.bytes_added
    );
    assert!(a.bytes_added > 10 * b.bytes_added);

    let d = fx.store.diff(&a.id, &b.id).expect("diff");
    let pf = d
        .files
        .iter()
        .find(|f| f.name == "pages-1.img")
        .expect("pages file");
    assert_eq!(pf.change, crate::store::FileChange::Changed);
    let p = pf.pages.as_ref().expect("page diff");
    assert_eq!(p.changed, b.pages_new);
    assert_eq!((p.added, p.removed), (0, 0));
    assert!(d
        .files
        .iter()
        .filter(|f| f.name != "pages-1.img")
        .all(|f| f.change == crate::store::FileChange::Unchanged));

    let out = fx.path("out");
    fx.store
        .materialize(&b.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
}

#[test]
fn pages_shifted_by_one_page_still_dedup() {
    let fx = Fixture::new();
    let img = fx.image("img", 4, 1024);
    fx.ingest(&img, &[]);
    let before = fx.pack_bytes();
    let p = img.join("pages-1.img");
    let mut data = fs::read(&p).expect("read");
    let mut rng = Rng::new(77);
    let mut fresh = vec![0u8; PAGE_SIZE];
    rng.fill(&mut fresh);
    data.splice(0..0, fresh);
    fs::write(&p, &data).expect("write");
    let b = fx.ingest(&img, &[]);
    assert_eq!(b.pages_total, 1025);
    assert_eq!(b.pages_new, 1);
    assert!(fx.pack_bytes() - before < 3 * PAGE_SIZE as u64);
    let out = fx.path("out");
    fx.store
        .materialize(&b.id, &out, false)
        .expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
}

#[test]
fn bad_image_dirs_are_refused() {
    let fx = Fixture::new();
    let img = fx.image("img", 6, 16);
    fs::create_dir(img.join("sub")).expect("mkdir");
    let e = fx.try_ingest(&img, &[]).expect_err("subdirectory");
    assert_eq!(
        e.to_string(),
        format!(
            "image directory {}: sub is a directory; an image directory holds regular files only",
            img.display()
        )
    );
    fs::remove_dir(img.join("sub")).expect("rmdir");
    let e = fx.try_ingest(&img, &["bad tag"]).expect_err("bad tag");
    assert!(e.to_string().starts_with("invalid tag \"bad tag\""), "{e}");
    let empty = fx.path("empty");
    fs::create_dir(&empty).expect("mkdir");
    assert!(fx.try_ingest(&empty, &[]).is_err());
    assert!(fx.store.list().expect("list").is_empty());
}

#[test]
fn materialize_needs_an_empty_destination() {
    let fx = Fixture::new();
    let img = fx.image("img", 7, 64);
    let r = fx.ingest(&img, &[]);
    let dest = fx.path("dest");
    fs::create_dir(&dest).expect("mkdir");
    fs::write(dest.join("x"), b"x").expect("write");
    let e = fx
        .store
        .materialize(&r.id, &dest, false)
        .expect_err("non-empty");
    assert_eq!(
        e.to_string(),
        format!("destination {}: is not empty", dest.display())
    );
    fs::remove_file(dest.join("x")).expect("rm");
    fx.store
        .materialize(&r.id, &dest, false)
        .expect("empty dir ok");
    assert_eq!(dir_contents(&dest), dir_contents(&img));
}

#[test]
fn one_file_of_a_snapshot_reads_back_verified_and_new_pages_count_what_it_added() {
    let f = Fixture::new();
    let img = f.image("a", 7, 64);
    let fsdata = pages(8, 16);
    fs::write(img.join("fsdata-0.bin"), &fsdata).unwrap();
    // fsdata-0.bin is the caller's page-stored file; pages-N.img always are.
    let opts = IngestOptions {
        page_stored: vec!["fsdata-0.bin".into()],
        ..IngestOptions::default()
    };
    let ingest = |tag: &str| {
        f.store
            .ingest(
                SnapshotInput {
                    image_dir: &img,
                    config_json: CONFIG_JSON,
                    container_id: "ctr1",
                    metadata: serde_json::json!({}),
                    tags: vec![tag.to_string()],
                },
                &opts,
            )
            .unwrap()
            .id
    };
    let a = ingest("a");
    mutate(&img, 3, 99);
    let b = ingest("b");
    let kinds: Vec<(String, bool)> = f
        .store
        .files(&b)
        .unwrap()
        .into_iter()
        .map(|x| (x.name, x.page_stored))
        .filter(|(n, _)| n.ends_with(".bin") || n.starts_with("pages-"))
        .collect();
    assert_eq!(
        kinds,
        [("fsdata-0.bin".into(), true), ("pages-1.img".into(), true)]
    );

    let core = fs::read(img.join("core-1.img")).unwrap();
    assert_eq!(f.store.read_file(&b, "core-1.img").unwrap(), core);
    let e = f
        .store
        .read_file(&b, "pages-1.img")
        .unwrap_err()
        .to_string();
    assert!(e.contains("page by page"), "{e}");
    let e = f.store.read_file(&b, "nope.img").unwrap_err().to_string();
    assert!(e.contains("has no file \"nope.img\""), "{e}");

    let out = f.path("one");
    let p = f.store.materialize_file(&a, "fsdata-0.bin", &out).unwrap();
    assert_eq!(fs::read(&p).unwrap(), fsdata);
    let p = f.store.materialize_file(&b, "pages-1.img", &out).unwrap();
    assert_eq!(
        fs::read(&p).unwrap(),
        fs::read(img.join("pages-1.img")).unwrap()
    );
    let p = f.store.materialize_file(&b, "core-1.img", &out).unwrap();
    assert_eq!(fs::read(&p).unwrap(), core);

    let (total, new) = f.store.new_pages(&b, "pages-1.img").unwrap();
    assert_eq!(total, 64);
    assert!((1..=3).contains(&new), "{new}");
    assert_eq!(f.store.new_pages(&b, "fsdata-0.bin").unwrap(), (16, 0));
    assert_eq!(f.store.new_pages(&b, "core-1.img").unwrap(), (0, 0));
    // Without the option the same name goes to the files blob.
    mutate(&img, 1, 5);
    let c = f.ingest(&img, &["c"]).id;
    let e = f.store.read_file(&c, "fsdata-0.bin").unwrap();
    assert!(
        e == fsdata,
        "{} bytes read back, {} written",
        e.len(),
        fsdata.len()
    );
}
