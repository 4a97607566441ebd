//! Names a snapshot records (config file names, the page tables' file
//! annotations) are single path components, checked at import, verify and
//! restore: a crafted `../../x` or `/tmp/x` never becomes a path. Also the
//! origin mark: `local` at ingest, `imported` at import whatever the archive
//! says, and private modes of what the store creates.

use std::os::unix::fs::MetadataExt;

use super::*;
use crate::store::blob::put_bytes;
use crate::store::config::{SnapshotConfig, KIND_FILE};
use crate::store::layout::{Descriptor, A_ID, A_ORIGIN};
use crate::store::Origin;

/// Rewrites snapshot `id` in place as a crafted copy would be: `edit` changes
/// its config and manifest, the id, digests and index.json are made consistent.
fn rewrite(
    fx: &Fixture,
    id: &SnapshotId,
    edit: impl FnOnce(&mut SnapshotConfig, &mut Manifest),
) -> SnapshotId {
    let (mut cfg, mut m) = fx.store.snapshot_config(id).expect("config");
    edit(&mut cfg, &mut m);
    let new_id = cfg.computed_id().expect("id");
    cfg.snapshot_id = new_id.full();
    let (tmp, blobs) = (fx.store.paths.tmp(), fx.store.blobs());
    let bytes = serde_json::to_vec(&cfg).expect("json");
    let (cd, cn, _) = put_bytes(&tmp, &blobs, "config", &bytes).expect("put");
    m.config = Descriptor::new(layout::MT_CONFIG, &cd, cn);
    m.annotations.insert(A_ID.into(), new_id.full());
    let bytes = serde_json::to_vec(&m).expect("json");
    let (md, mn, _) = put_bytes(&tmp, &blobs, "manifest", &bytes).expect("put");
    fx.store
        .update_index(|idx| {
            for d in idx.manifests.iter_mut() {
                if d.snapshot_id() == Some(*id) {
                    d.digest = md.to_string();
                    d.size = mn;
                    d.annotations.insert(A_ID.into(), new_id.full());
                }
            }
            Ok(())
        })
        .expect("index");
    new_id
}

fn is_name_error(e: &str) -> bool {
    e.contains("is not allowed")
}

#[test]
fn crafted_file_names_are_refused_by_verify_restore_and_import() {
    for bad in ["../../x", "/tmp/x", "a/b", "..", ""] {
        let fx = Fixture::new();
        let img = fx.image("img", 90, 64);
        let r = fx.ingest(&img, &["app"]);
        let id = rewrite(&fx, &r.id, |cfg, _| {
            let f = cfg
                .files
                .iter_mut()
                .find(|f| f.kind == KIND_FILE)
                .expect("a small file");
            f.name = bad.to_string();
        });
        let errors = fx.errors(false);
        assert!(
            errors.iter().any(|f| is_name_error(&f.what)),
            "verify accepts {bad:?}: {errors:#?}"
        );
        let dest = fx.path("out/a/b");
        let e = fx
            .store
            .materialize(&id, &dest, false)
            .expect_err("materialize")
            .to_string();
        assert!(is_name_error(&e), "restore of {bad:?}: {e}");
        assert!(!fx.path("out/x").exists() && !Path::new("/tmp/x").exists());

        let tar = fx.path("evil.tar");
        fx.store.export("app", &tar).expect("export");
        let other = Store::open(&fx.path("other")).expect("open");
        let e = other.import(&tar).expect_err("import").to_string();
        assert!(is_name_error(&e), "import of {bad:?}: {e}");
        assert!(other.list().expect("list").is_empty());
    }
}

#[test]
fn a_page_table_naming_a_path_is_a_verify_error() {
    let fx = Fixture::new();
    let img = fx.image("img", 91, 64);
    let r = fx.ingest(&img, &["app"]);
    rewrite(&fx, &r.id, |_, m| {
        let l = m
            .layers
            .iter_mut()
            .find(|l| l.media_type == layout::MT_PAGE_TABLE)
            .expect("a page table");
        l.annotations
            .insert(layout::A_FILE.into(), "../pages-1.img".into());
    });
    let errors = fx.errors(false);
    assert!(errors.iter().any(|f| is_name_error(&f.what)), "{errors:#?}");
}

#[test]
fn origin_is_local_at_ingest_and_imported_at_import_whatever_the_archive_says() {
    let fx = Fixture::new();
    let img = fx.image("img", 92, 32);
    let r = fx.ingest(&img, &["app"]);
    assert_eq!(fx.store.origin(&r.id).expect("origin"), Origin::Local);
    let tar = fx.path("snap.tar");
    fx.store.export("app", &tar).expect("export");
    // The archive claims to be local (a crafted index.json).
    let mut ar = tar::Archive::new(fs::File::open(&tar).expect("open"));
    let dir = fx.path("x");
    ar.unpack(&dir).expect("unpack");
    let idx_path = dir.join("index.json");
    let mut idx: serde_json::Value =
        serde_json::from_slice(&fs::read(&idx_path).expect("read")).expect("json");
    assert!(
        idx["manifests"][0]["annotations"].get(A_ORIGIN).is_none(),
        "export leaks the origin"
    );
    idx["manifests"][0]["annotations"][A_ORIGIN] = "local".into();
    fs::write(&idx_path, serde_json::to_vec(&idx).expect("json")).expect("write");
    let claimed = fx.path("claimed.tar");
    let mut b = tar::Builder::new(fs::File::create(&claimed).expect("create"));
    b.append_path_with_name(dir.join("oci-layout"), "oci-layout")
        .expect("tar");
    b.append_path_with_name(&idx_path, "index.json")
        .expect("tar");
    b.append_dir_all("blobs", dir.join("blobs")).expect("tar");
    b.finish().expect("tar");
    drop(b);
    let other = Store::open(&fx.path("other")).expect("open");
    let ids = other.import(&claimed).expect("import");
    assert_eq!(other.origin(&ids[0]).expect("origin"), Origin::Imported);
    assert_eq!(other.list().expect("list")[0].origin, Origin::Imported);
    // Re-importing its own snapshot does not make a local one foreign.
    fx.store.import(&claimed).expect("import");
    assert_eq!(fx.store.origin(&r.id).expect("origin"), Origin::Local);
}

#[test]
fn what_the_store_creates_is_private() {
    let fx = Fixture::new();
    let img = fx.image("img", 93, 32);
    let r = fx.ingest(&img, &["app"]);
    let root = fx.store.root().to_path_buf();
    for d in ["", "blobs", "blobs/sha256", "tmp", "cache"] {
        let m = fs::metadata(root.join(d)).expect("stat").mode() & 0o777;
        assert_eq!(m, 0o700, "{d}");
    }
    for f in ["index.json", "oci-layout", "lock"] {
        let m = fs::metadata(root.join(f)).expect("stat").mode() & 0o777;
        assert_eq!(m, 0o600, "{f}");
    }
    for e in fs::read_dir(root.join("blobs/sha256"))
        .expect("read")
        .flatten()
    {
        assert_eq!(e.metadata().expect("stat").mode() & 0o777, 0o400);
    }
    let dest = fx.path("restored");
    fx.store
        .materialize(&r.id, &dest, false)
        .expect("materialize");
    assert_eq!(fs::metadata(&dest).expect("stat").mode() & 0o777, 0o700);
    for e in fs::read_dir(&dest).expect("read").flatten() {
        assert_eq!(
            e.metadata().expect("stat").mode() & 0o777,
            0o600,
            "{:?}",
            e.path()
        );
    }
}
