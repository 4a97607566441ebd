//! export/import: a good round trip into a second store, and hostile archives that
//! must all be rejected with the store unchanged.

use std::fs;
use std::io::Read;

use super::*;
use crate::store::ids::BlobDigest;
use crate::store::StoreError;

/// The entries of a tar as (path, type, link, data).
type Entry = (Vec<u8>, tar::EntryType, Vec<u8>, Vec<u8>);

fn read_tar(p: &Path) -> Vec<Entry> {
    let mut ar = tar::Archive::new(fs::File::open(p).expect("open"));
    ar.entries()
        .expect("entries")
        .map(|e| {
            let mut e = e.expect("entry");
            let path = e.path_bytes().into_owned();
            let link = e
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            let t = e.header().entry_type();
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            (path, t, link, data)
        })
        .collect()
}

/// Writes entries with raw names (the tar crate's path checks are bypassed on
/// purpose: hostile archives have names it would refuse to write).
fn write_tar(p: &Path, entries: &[Entry]) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, t, link, data) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(*t);
        h.set_cksum();
        b.append(&h, &data[..]).expect("append");
    }
    fs::write(p, b.into_inner().expect("finish")).expect("write");
}

fn blob_entry(entries: &[Entry], pred: impl Fn(&[u8]) -> bool) -> usize {
    entries
        .iter()
        .position(|(p, _, _, d)| p.starts_with(b"blobs/sha256/") && pred(d))
        .expect("blob entry")
}

fn is_pack(d: &[u8]) -> bool {
    d.starts_with(b"STASPACK")
}

fn set(entries: &mut [Entry], name: &[u8], data: Vec<u8>) {
    let e = entries.iter_mut().find(|e| e.0 == name).expect("entry");
    e.3 = data;
}

#[test]
fn export_then_import_into_another_store() {
    let fx = Fixture::new();
    let img = fx.image("img", 60, 512);
    let r = fx.ingest(&img, &["app:v1"]);
    let tarball = fx.path("snap.tar");
    fx.store.export("app:v1", &tarball).expect("export");
    let names: Vec<String> = read_tar(&tarball)
        .iter()
        .map(|e| String::from_utf8_lossy(&e.0).into_owned())
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("oci-layout"));
    assert_eq!(names.last().map(String::as_str), Some("index.json"));

    let other = Store::open(&fx.path("other")).expect("open");
    assert_eq!(other.import(&tarball).expect("import"), vec![r.id]);
    assert_eq!(other.resolve("app:v1").expect("tag"), r.id);
    let out = fx.path("out");
    other.materialize(&r.id, &out, false).expect("materialize");
    assert_eq!(dir_contents(&out), dir_contents(&img));
    assert!(other.verify(true).expect("verify").is_empty());
    // Importing again changes nothing but is fine.
    assert_eq!(other.import(&tarball).expect("again"), vec![r.id]);
    assert_eq!(other.list().expect("list").len(), 1);

    // Export by id gives an untagged root.
    let by_id = fx.path("byid.tar");
    fx.store
        .export(&r.id.short(), &by_id)
        .expect("export by id");
    let third = Store::open(&fx.path("third")).expect("open");
    third.import(&by_id).expect("import");
    assert!(third.list().expect("list")[0].tags.is_empty());
}

#[test]
fn hostile_imports_are_rejected_and_change_nothing() {
    let fx = Fixture::new();
    let img = fx.image("img", 61, 256);
    let r = fx.ingest(&img, &["app"]);
    let good = fx.path("good.tar");
    fx.store.export("app", &good).expect("export");
    let entries = read_tar(&good);

    // The victim store already holds a different snapshot.
    let victim = Store::open(&fx.path("victim")).expect("open");
    let other_img = fake_image(&fx.path("other-img"), 62, 64);
    victim
        .ingest(
            SnapshotInput {
                image_dir: &other_img,
                config_json: b"{}",
                container_id: "c",
                metadata: serde_json::Value::Null,
                tags: vec!["app".into()],
            },
            &IngestOptions::default(),
        )
        .expect("ingest");
    let victim_fx = Fixture {
        dir: tempfile::tempdir().expect("tmp"),
        store: victim.clone(),
    };
    let before = victim_fx.snapshot_of_store();

    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    let mut case = |name: &'static str, expect: &'static str, f: &dyn Fn(&mut Vec<Entry>)| {
        let mut e = entries.clone();
        f(&mut e);
        let p = fx.path(&format!("{name}.tar"));
        write_tar(&p, &e);
        cases.push((name, p, expect));
    };
    case("digest-mismatch", "digest mismatch", &|e| {
        let i = blob_entry(e, is_pack);
        e[i].3[100] ^= 1;
    });
    case("dotdot", "climbs out of the archive", &|e| {
        e.insert(
            1,
            (
                b"../x".to_vec(),
                tar::EntryType::Regular,
                vec![],
                b"x".to_vec(),
            ),
        )
    });
    case("dotdot-inside", "climbs out of the archive", &|e| {
        e.insert(
            1,
            (
                b"blobs/../../x".to_vec(),
                tar::EntryType::Regular,
                vec![],
                b"x".to_vec(),
            ),
        )
    });
    case("absolute", "has an absolute path", &|e| {
        e.insert(
            1,
            (
                b"/tmp/x".to_vec(),
                tar::EntryType::Regular,
                vec![],
                b"x".to_vec(),
            ),
        )
    });
    case("symlink", "is a symlink", &|e| {
        let i = blob_entry(e, is_pack);
        e[i].1 = tar::EntryType::Symlink;
        e[i].2 = b"/etc/passwd".to_vec();
        e[i].3.clear();
    });
    case("hardlink", "is a hard link", &|e| {
        let i = blob_entry(e, is_pack);
        e[i].1 = tar::EntryType::Link;
        e[i].2 = b"oci-layout".to_vec();
        e[i].3.clear();
    });
    case("device", "is a device", &|e| {
        e.insert(
            1,
            (
                b"blobs/sha256/".to_vec(),
                tar::EntryType::Char,
                vec![],
                vec![],
            ),
        )
    });
    case("missing-blob", "is missing", &|e| {
        let i = blob_entry(e, is_pack);
        e.remove(i);
    });
    case("missing-index", "index.json is missing", &|e| {
        e.pop();
    });
    case("unexpected-file", "unexpected entry", &|e| {
        e.insert(
            1,
            (
                b"evil.sh".to_vec(),
                tar::EntryType::Regular,
                vec![],
                b"x".to_vec(),
            ),
        )
    });
    case("oversized-blob", "its descriptor says", &|e| {
        // A manifest whose pack descriptor is one byte short of the real blob,
        // re-hashed so every digest is consistent.
        let mi = blob_entry(e, |d| {
            d.starts_with(b"{") && String::from_utf8_lossy(d).contains(layout::MT_PACK)
        });
        let mut m: Manifest = serde_json::from_slice(&e[mi].3).expect("manifest");
        let l = m
            .layers
            .iter_mut()
            .find(|l| l.media_type == layout::MT_PACK)
            .expect("pack layer");
        l.size -= 1;
        let bytes = serde_json::to_vec(&m).expect("json");
        let d = BlobDigest::of(&bytes);
        e[mi] = (
            format!("blobs/sha256/{}", d.to_hex()).into_bytes(),
            tar::EntryType::Regular,
            vec![],
            bytes.clone(),
        );
        let mut idx: layout::Index =
            serde_json::from_slice(&e.last().expect("index").3).expect("index");
        idx.manifests[0].digest = d.to_string();
        idx.manifests[0].size = bytes.len() as u64;
        set(e, b"index.json", serde_json::to_vec(&idx).expect("json"));
    });
    case("index-points-at-nothing", "not in the archive", &|e| {
        let mut idx: layout::Index =
            serde_json::from_slice(&e.last().expect("index").3).expect("index");
        idx.manifests[0].digest = BlobDigest::of(b"nothing").to_string();
        set(e, b"index.json", serde_json::to_vec(&idx).expect("json"));
    });
    case("bad-tag", "invalid tag", &|e| {
        let mut idx: layout::Index =
            serde_json::from_slice(&e.last().expect("index").3).expect("index");
        idx.manifests[0]
            .annotations
            .insert(layout::A_REF_NAME.into(), "../../etc".into());
        set(e, b"index.json", serde_json::to_vec(&idx).expect("json"));
    });
    // Truncated: the good archive cut in the middle of a blob.
    let truncated = fx.path("truncated.tar");
    let bytes = fs::read(&good).expect("read");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    cases.push(("truncated", truncated, "truncated"));
    let not_tar = fx.path("not.tar");
    fs::write(&not_tar, vec![0x42u8; 1000]).expect("write");
    cases.push(("not-tar", not_tar, "rejected"));

    for (name, path, expect) in &cases {
        let e = victim.import(path).expect_err(name);
        assert!(
            matches!(e, StoreError::ImportRejected { .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains(expect), "{name}: {e}");
        assert_eq!(
            victim_fx.snapshot_of_store(),
            before,
            "{name} changed the store"
        );
        assert!(tmp_is_empty(&victim), "{name} left files in tmp/");
    }
    assert_eq!(victim.resolve("app").expect("app").to_string().len(), 12);
    assert_ne!(victim.resolve("app").expect("app"), r.id);
    // The good archive does not take the victim's own tag over (an import never
    // moves a tag); once the operator frees the tag it imports.
    let e = victim.import(&good).expect_err("moved a tag");
    assert!(e.to_string().contains("already names snapshot"), "{e}");
    victim.remove("app").expect("free the tag");
    victim.import(&good).expect("good import");
    assert_eq!(victim.resolve("app").expect("app"), r.id);
    assert!(victim
        .verify(true)
        .expect("verify")
        .iter()
        .all(|f| f.level != crate::store::Level::Error));
}

#[test]
fn an_import_never_moves_a_tag_of_this_store() {
    let fx = Fixture::new();
    let img = fx.image("img", 61, 64);
    fx.ingest(&img, &["app:v1"]);
    let tarball = fx.path("foreign.tar");
    fx.store.export("app:v1", &tarball).expect("export");
    // Another store has its own app:v1, a different snapshot.
    let other = Store::open(&fx.path("other")).expect("open");
    let mine = other
        .ingest(
            crate::store::SnapshotInput {
                image_dir: &fx.image("mine", 62, 64),
                config_json: b"{}",
                container_id: "c",
                metadata: serde_json::json!({}),
                tags: vec!["app:v1".into()],
            },
            &crate::store::IngestOptions::default(),
        )
        .expect("ingest")
        .id;
    let err = other.import(&tarball).expect_err("moved a tag").to_string();
    assert!(
        err.contains("app:v1") && err.contains(&mine.short()),
        "{err}"
    );
    assert_eq!(other.resolve("app:v1").expect("tag"), mine);
    assert_eq!(other.list().expect("list").len(), 1);
    // Once the operator frees the tag, the import goes through.
    other.remove("app:v1").expect("rm");
    other.import(&tarball).expect("import");
    assert_ne!(other.resolve("app:v1").expect("tag"), mine);
}
