//! Property tests over the filesystem manifest (`fs-manifest.json`, stored data
//! like any other): arbitrary and mutated bytes parse or fail with a clear error,
//! and a manifest whose file extents claim more than the data file holds is
//! refused before anything is written.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::*;

/// A real capture of a small tree: (scratch dir, manifest, data file).
fn captured() -> (tempfile::TempDir, Manifest, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    fs::create_dir_all(src.join("a")).expect("mkdir");
    fs::write(src.join("a/small"), b"hello").expect("write");
    fs::write(src.join("big"), vec![7u8; 3 * 4096 + 5]).expect("write");
    let out = t.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    let m = capture(
        &[Source {
            role: "rootfs",
            dest: "/".into(),
            path: src,
            exclude: vec![],
        }],
        &out,
    )
    .expect("capture");
    (t, m, out.join(DATA_FILE))
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn manifest_parser_is_total(
        raw in proptest::collection::vec(any::<u8>(), 0..512),
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in any::<usize>(),
    ) {
        let label = Path::new("m");
        if let Err(e) = parse_manifest(&raw, label) {
            prop_assert!(e.to_string().contains(" m"), "{e}");
        }
        let (_t, m, _) = captured();
        let mut b = serde_json::to_vec(&m).expect("json");
        for (i, x) in &flips {
            let n = b.len();
            b[i % n] ^= x;
        }
        b.truncate(b.len() - cut % 4);
        let _ = parse_manifest(&b, label);
    }

    /// Any file entry's size or offset set huge: materialize refuses the tree
    /// before creating anything, whatever the claim.
    #[test]
    fn extents_beyond_the_data_file_are_refused(
        which in any::<usize>(),
        size in prop_oneof![Just(u64::MAX), Just(10u64 << 30), 1u64 << 20..1u64 << 40],
        offset in prop_oneof![Just(None), Just(Some(u64::MAX - 1)), (0u64..1 << 40).prop_map(Some)],
    ) {
        let (t, mut m, data) = captured();
        let files: Vec<usize> = m.trees[0]
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == Kind::File)
            .map(|(i, _)| i)
            .collect();
        let i = files[which % files.len()];
        m.trees[0].entries[i].size = size;
        if offset.is_some() {
            m.trees[0].entries[i].offset = offset;
        }
        let dst = t.path().join("dst");
        let e = materialize(&m, 0, &data, &dst).expect_err("refused");
        prop_assert!(e.to_string().contains("beyond the"), "{e}");
        prop_assert!(!dst.exists(), "materialize created {}", dst.display());
    }
}
