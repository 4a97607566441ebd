//! verify finds every kind of damage and lists all of it; materialize refuses
//! damaged data and leaves nothing behind.

use std::fs;

use super::*;
use crate::store::format::PREFIX_LEN;
use crate::store::{Level, StoreError};

#[test]
fn verify_lists_every_problem() {
    let fx = Fixture::new();
    let ids: Vec<SnapshotId> = (0..4u64)
        .map(|i| {
            let img = fx.image(&format!("img{i}"), 100 + i, 512);
            fx.ingest(&img, &[&format!("s{i}")]).id
        })
        .collect();
    assert!(fx.store.verify(true).expect("verify").is_empty());
    // Each snapshot's own pack is the last one it lists that the earlier ones don't.
    let own_pack = |i: usize| {
        let earlier: Vec<PathBuf> = ids[..i].iter().flat_map(|id| fx.packs(id)).collect();
        fx.packs(&ids[i])
            .into_iter()
            .find(|p| !earlier.contains(p))
            .expect("own pack")
    };
    // 0: a flipped byte inside the first frame of its pack.
    let p0 = own_pack(0);
    flip(&p0, PREFIX_LEN as u64 + 20);
    // 1: a truncated pack.
    let p1 = own_pack(1);
    writable(&p1);
    let len = fs::metadata(&p1).expect("stat").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&p1)
        .expect("open")
        .set_len(len - 100)
        .expect("truncate");
    // 2: a deleted page table.
    let t2 = fx.layers(&ids[2], layout::MT_PAGE_TABLE).remove(0);
    fs::remove_file(&t2).expect("rm");
    // 3: an edited manifest (still valid JSON).
    let e3 = fx.store.entry(&ids[3]).expect("entry");
    let m3 = fx.store.blobs().path(&e3.manifest);
    writable(&m3);
    let text = fs::read_to_string(&m3)
        .expect("read")
        .replace("\"ctr1\"", "\"ctr2\"");
    fs::write(&m3, text).expect("write");

    let all = fx.store.verify(true).expect("verify");
    let errors: Vec<&crate::store::Finding> =
        all.iter().filter(|f| f.level == Level::Error).collect();
    let hex = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let has = |needle: &str, also: &str| {
        errors
            .iter()
            .any(|f| f.what.contains(needle) && f.what.contains(also))
    };
    assert!(
        has(&format!("snapshot {} (s0:latest)", ids[0]), &hex(&p0)),
        "{errors:#?}"
    );
    assert!(
        has(&format!("snapshot {}", ids[0]), "page digest mismatch")
            || has(&format!("snapshot {}", ids[0]), "does not decompress"),
        "{errors:#?}"
    );
    assert!(
        has(&format!("snapshot {}", ids[1]), "is truncated"),
        "{errors:#?}"
    );
    assert!(
        has(
            &format!("snapshot {}", ids[2]),
            &format!("page table sha256:{} is missing", hex(&t2))
        ),
        "{errors:#?}"
    );
    assert!(
        has(&format!("snapshot {}", ids[3]), "manifest")
            && has(&format!("snapshot {}", ids[3]), "is corrupt"),
        "{errors:#?}"
    );
    assert!(
        errors.iter().all(|f| f.hint.contains("stasis snapshot rm")),
        "{errors:#?}"
    );

    // Without reading data, the flipped byte inside a frame goes unnoticed.
    let quick = fx.errors(false);
    assert!(
        !quick
            .iter()
            .any(|f| f.what.contains(&format!("snapshot {}", ids[0]))),
        "{quick:#?}"
    );
    for id in &ids[1..] {
        assert!(
            quick
                .iter()
                .any(|f| f.what.contains(&format!("snapshot {id}"))),
            "{id}: {quick:#?}"
        );
    }

    // Nothing damaged can be materialized; nothing is left behind.
    for (i, id) in ids.iter().enumerate() {
        let dest = fx.path(&format!("out{i}"));
        let e = fx.store.materialize(id, &dest, false).expect_err("damaged");
        assert!(!dest.exists(), "{i}: {e}");
    }
}

#[test]
fn materialize_refuses_a_corrupt_frame_and_says_where() {
    let fx = Fixture::new();
    let img = fx.image("img", 8, 256);
    let r = fx.ingest(&img, &["x"]);
    let pack = fx.packs(&r.id).remove(0);
    flip(&pack, PREFIX_LEN as u64 + 40);
    let dest = fx.path("dest");
    let e = fx
        .store
        .materialize(&r.id, &dest, false)
        .expect_err("corrupt");
    let msg = e.to_string();
    let blob = format!(
        "sha256:{}",
        pack.file_name().expect("name").to_string_lossy()
    );
    assert!(matches!(e, StoreError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains(&format!(
            "in snapshot {}, file pages-1.img at offset 0 (blob {blob})",
            r.id
        )),
        "{msg}"
    );
    assert!(!dest.exists());

    // An existing empty destination stays, empty.
    fs::create_dir(&dest).expect("mkdir");
    assert!(fx.store.materialize(&r.id, &dest, false).is_err());
    assert!(fs::read_dir(&dest).expect("read").next().is_none());
}

#[test]
fn materialize_refuses_a_corrupt_files_blob_and_page_table() {
    let fx = Fixture::new();
    let img = fx.image("img", 9, 64);
    let r = fx.ingest(&img, &[]);
    let files = fx.layers(&r.id, layout::MT_FILES).remove(0);
    flip(&files, 30);
    let dest = fx.path("dest");
    let e = fx
        .store
        .materialize(&r.id, &dest, false)
        .expect_err("corrupt");
    assert!(e.to_string().contains("files blob"), "{e}");
    assert!(!dest.exists());
    flip(&files, 30);
    let table = fx.layers(&r.id, layout::MT_PAGE_TABLE).remove(0);
    flip(&table, 20);
    let e = fx
        .store
        .materialize(&r.id, &dest, false)
        .expect_err("corrupt");
    assert!(e.to_string().starts_with("bad page table"), "{e}");
    assert!(!dest.exists());
    flip(&table, 20);
    fx.store.materialize(&r.id, &dest, false).expect("repaired");
    assert_eq!(dir_contents(&dest), dir_contents(&img));
}

#[test]
fn unknown_major_version_is_refused() {
    let fx = Fixture::new();
    let img = fx.image("img", 10, 32);
    let r = fx.ingest(&img, &[]);
    let pack = fx.packs(&r.id).remove(0);
    writable(&pack);
    let mut b = fs::read(&pack).expect("read");
    b[8..12].copy_from_slice(&(2u32 << 16).to_le_bytes());
    fs::write(&pack, b).expect("write");
    let e = fx
        .store
        .materialize(&r.id, &fx.path("d"), false)
        .expect_err("v2");
    assert!(
        e.to_string()
            .ends_with("is a pack of format version 2.0; this stasis reads major version 1 only"),
        "{e}"
    );
}
