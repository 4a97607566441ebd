//! Property tests (proptest) over every parser of stored data: page tables, files
//! blobs, pack indexes, the config, manifest and index JSON, and import's tar.
//! Inputs are arbitrary bytes and mutations of a real serialisation (bytes flipped,
//! truncated, extended; counts and sizes set huge, inside the compressed body too).
//! Each parser must return a value or a clear error: no panic, and no allocation
//! beyond a small constant (`Meter` counts this thread's heap bytes while it runs).
//! Cases are few (64 each) so the whole file runs in a few seconds.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io;

use proptest::prelude::*;

use super::*;
use crate::store::archive::{ArchiveReader, ArchiveWriter};
use crate::store::config::SnapshotConfig;
use crate::store::ids::PageDigest;
use crate::store::pack::{self, PackWriter, PAGE_SIZE};
use crate::store::pagetable::{self, PageTable, TableReader};

/// Counts the heap bytes each thread holds, and their peak, so a test can see
/// what one call allocated.
struct Meter;

thread_local! {
    static HELD: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn held(delta: isize) {
    let _ = HELD.try_with(|h| {
        let v = h.get().saturating_add_signed(delta);
        h.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping only touches const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            held(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            held(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) };
        held(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            held(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static METER: Meter = Meter;

/// Most a parser may allocate on its thread for one input of a few KiB.
const BOUND: usize = 8 << 20;

/// Runs `f` and returns its result with the peak of heap bytes it added.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = HELD.with(|h| h.get());
    PEAK.with(|p| p.set(start));
    let r = f();
    (r, PEAK.with(|p| p.get()) - start)
}

/// One change to a serialisation.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Extend(Vec<u8>),
    /// Overwrite 8 bytes at an offset with a (often huge) number.
    SetU64(usize, u64),
    SetU32(usize, u32),
}

fn huge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        Just(u64::MAX),
        Just(1u64 << 40),
        Just((1u64 << 40) + 1),
        Just(1u64 << 28),
        Just(10u64 << 30),
        0u64..70_000,
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (any::<usize>(), huge_u64()).prop_map(|(i, v)| Mutation::SetU64(i, v)),
        (
            any::<usize>(),
            prop_oneof![any::<u32>(), Just(u32::MAX), Just(1u32 << 20)]
        )
            .prop_map(|(i, v)| Mutation::SetU32(i, v)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(mutation(), 1..4)
}

fn apply(bytes: &mut Vec<u8>, ms: &[Mutation]) {
    for m in ms {
        let len = bytes.len().max(1);
        match m {
            Mutation::Flip(i, x) => {
                if let Some(b) = bytes.get_mut(i % len) {
                    *b ^= x;
                }
            }
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Extend(e) => bytes.extend_from_slice(e),
            Mutation::SetU64(i, v) => put(bytes, i % len, &v.to_le_bytes()),
            Mutation::SetU32(i, v) => put(bytes, i % len, &v.to_le_bytes()),
        }
    }
}

fn put(bytes: &mut [u8], at: usize, v: &[u8]) {
    let end = (at + v.len()).min(bytes.len());
    bytes[at..end].copy_from_slice(&v[..end - at]);
}

fn cfg() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A valid page table: its prefix and its decompressed body.
fn table_body() -> Vec<u8> {
    let t = PageTable {
        file_size: 5 * PAGE_SIZE as u64 + 7,
        digests: (0..6u8).map(|i| PageDigest::of(&[i])).collect(),
    };
    let bytes = pagetable::encode(&t, 3).expect("encode");
    zstd::stream::decode_all(&bytes[16..]).expect("body")
}

fn with_prefix(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut out = crate::store::format::prefix(magic).to_vec();
    out.extend(zstd::bulk::compress(body, 1).expect("compress"));
    out
}

/// Reads a whole page table through the streaming reader.
fn read_table(bytes: &[u8]) -> Result<u64, crate::store::StoreError> {
    let mut r = TableReader::new(bytes, Path::new("t"))?;
    let mut chunk = Vec::new();
    let mut n = 0u64;
    while r.next_chunk(&mut chunk)? {
        n += chunk.len() as u64;
    }
    Ok(n)
}

/// A valid files blob's decompressed body (three entries).
fn files_body() -> Vec<u8> {
    let mut w = ArchiveWriter::new(Vec::new(), 1, 3).expect("new");
    w.add("core-1.img", &[7u8; 5000]).expect("add");
    w.add("fs-manifest.json", b"{\"version\":1,\"trees\":[]}")
        .expect("add");
    w.add("inventory.img", b"inv").expect("add");
    let bytes = w.finish().expect("finish");
    zstd::stream::decode_all(&bytes[16..]).expect("body")
}

/// Walks every entry of a files blob, streaming each entry's content.
fn read_files(bytes: &[u8]) -> Result<u64, crate::store::StoreError> {
    let mut r = ArchiveReader::new(bytes, Path::new("f"))?;
    let mut total = 0u64;
    while let Some((_, size)) = r.next_entry()? {
        total += io::copy(&mut r.content(size), &mut io::sink()).unwrap_or(0);
    }
    Ok(total)
}

/// A valid pack of three frames.
fn pack_bytes() -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = PackWriter::create(dir.path()).expect("create");
    for seed in 0..3u64 {
        let data = pages(seed, 3);
        let ds: Vec<_> = data.chunks(PAGE_SIZE).map(PageDigest::of).collect();
        w.add_frame(&zstd::bulk::compress(&data, 1).expect("compress"), &ds)
            .expect("add");
    }
    let (pending, _) = w.finish().expect("finish");
    fs::read(pending.tmp_path().expect("tmp")).expect("read")
}

fn read_pack(bytes: &[u8]) -> Result<usize, crate::store::StoreError> {
    let f = tempfile::tempfile().expect("tempfile");
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0).expect("write");
    let idx = pack::read_index(&f, bytes.len() as u64, Path::new("p"))?;
    Ok(pack::check_frames(&f, &idx).len())
}

/// A real snapshot's config, manifest and index.json, and an export tar of it.
struct Real {
    _fx: Fixture,
    config: Vec<u8>,
    manifest: Vec<u8>,
    index: Vec<u8>,
    tar: Vec<u8>,
}

fn real() -> &'static Real {
    static REAL: std::sync::OnceLock<Real> = std::sync::OnceLock::new();
    REAL.get_or_init(|| {
        let fx = Fixture::new();
        let img = fx.image("img", 71, 24);
        let r = fx.ingest(&img, &["app"]);
        let m = fx.manifest(&r.id);
        let manifest = serde_json::to_vec(&m).expect("manifest");
        let config = fs::read(fx.blob_path(&m.config.digest)).expect("config");
        let index = fs::read(fx.store.root().join("index.json")).expect("index");
        let out = fx.path("app.tar");
        fx.store.export("app", &out).expect("export");
        let tar = fs::read(&out).expect("tar");
        Real {
            _fx: fx,
            config,
            manifest,
            index,
            tar,
        }
    })
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn page_table_reader_is_total_and_bounded(
        raw in proptest::collection::vec(any::<u8>(), 0..256),
        ms in mutations(),
        in_body in any::<bool>(),
    ) {
        let (_, peak) = peak_during(|| read_table(&raw));
        prop_assert!(peak < BOUND, "arbitrary bytes: {peak} bytes");
        let bytes = if in_body {
            let mut body = table_body();
            apply(&mut body, &ms);
            with_prefix(crate::store::format::PAGE_TABLE_MAGIC, &body)
        } else {
            let mut b = with_prefix(crate::store::format::PAGE_TABLE_MAGIC, &table_body());
            apply(&mut b, &ms);
            b
        };
        let (r, peak) = peak_during(|| read_table(&bytes));
        prop_assert!(peak < BOUND, "{ms:?}: {peak} bytes");
        if let Err(e) = r {
            prop_assert!(e.to_string().starts_with("bad page table t:") || e.to_string().contains("format version"), "{e}");
        }
    }

    #[test]
    fn files_blob_reader_is_total_and_bounded(
        raw in proptest::collection::vec(any::<u8>(), 0..256),
        ms in mutations(),
        in_body in any::<bool>(),
    ) {
        let (_, peak) = peak_during(|| read_files(&raw));
        prop_assert!(peak < BOUND, "arbitrary bytes: {peak} bytes");
        let bytes = if in_body {
            let mut body = files_body();
            apply(&mut body, &ms);
            with_prefix(crate::store::format::FILES_MAGIC, &body)
        } else {
            let mut b = with_prefix(crate::store::format::FILES_MAGIC, &files_body());
            apply(&mut b, &ms);
            b
        };
        let (r, peak) = peak_during(|| read_files(&bytes));
        prop_assert!(peak < BOUND, "{ms:?}: {peak} bytes");
        if let Err(e) = r {
            prop_assert!(e.to_string().starts_with("bad files blob f:") || e.to_string().contains("format version"), "{e}");
        }
    }

    #[test]
    fn pack_index_reader_is_total_and_bounded(
        raw in proptest::collection::vec(any::<u8>(), 0..512),
        ms in mutations(),
    ) {
        let (_, peak) = peak_during(|| read_pack(&raw));
        prop_assert!(peak < BOUND, "arbitrary bytes: {peak} bytes");
        let mut b = pack_bytes();
        apply(&mut b, &ms);
        let (r, peak) = peak_during(|| read_pack(&b));
        prop_assert!(peak < BOUND, "{ms:?}: {peak} bytes");
        if let Err(e) = r {
            let s = e.to_string();
            prop_assert!(s.starts_with("bad pack") || s.contains("format version"), "{s}");
        }
    }

    #[test]
    fn json_documents_parse_or_fail_cleanly(
        raw in proptest::collection::vec(any::<u8>(), 0..256),
        ms in mutations(),
        which in 0usize..3,
    ) {
        let real = real();
        let mut b = [&real.config, &real.manifest, &real.index][which].clone();
        apply(&mut b, &ms);
        for input in [&raw, &b] {
            let (_, peak) = peak_during(|| {
                let _ = SnapshotConfig::parse(input).map(|c| c.computed_id());
                let _ = serde_json::from_slice::<layout::Manifest>(input);
                let _ = serde_json::from_slice::<layout::Index>(input);
            });
            prop_assert!(peak < BOUND, "{ms:?}: {peak} bytes");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..cfg() })]

    /// Import of a mutated export: verified and published, or refused with the
    /// store unchanged and nothing left in tmp/.
    #[test]
    fn import_of_a_mutated_archive_is_total(ms in mutations()) {
        let real = real();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("open");
        let mut b = real.tar.clone();
        apply(&mut b, &ms);
        let p = dir.path().join("x.tar");
        fs::write(&p, &b).expect("write");
        let before = fs::read(store.root().join("index.json")).expect("index");
        let (r, peak) = peak_during(|| store.import(&p));
        prop_assert!(peak < 64 << 20, "{ms:?}: {peak} bytes");
        let left: Vec<_> = fs::read_dir(store.root().join("tmp")).expect("tmp").collect();
        prop_assert!(left.is_empty(), "{ms:?}: tmp/ not empty");
        match r {
            Ok(ids) => prop_assert!(!ids.is_empty()),
            Err(e) => {
                let s = e.to_string();
                prop_assert!(s.contains("rejected") || s.starts_with("bad "), "{s}");
                prop_assert!(!s.chars().any(|c| c.is_control()), "control characters in {s:?}");
                let after = fs::read(store.root().join("index.json")).expect("index");
                prop_assert_eq!(before, after);
            }
        }
    }
}

#[test]
fn huge_claims_are_refused_before_reading() {
    // A page table claiming more than 1 TiB, and one whose count disagrees with
    // its size: refused from the 16-byte header.
    let mut body = (1u64 << 41).to_le_bytes().to_vec();
    body.extend_from_slice(&(1u64 << 29).to_le_bytes());
    let e = read_table(&with_prefix(crate::store::format::PAGE_TABLE_MAGIC, &body))
        .expect_err("too big");
    assert!(e.to_string().contains("1 TiB"), "{e}");
    // 2^28 pages announced, 6 present: cut short, after reading what is there.
    let mut body = (1u64 << 40).to_le_bytes().to_vec();
    body.extend_from_slice(&(1u64 << 28).to_le_bytes());
    body.extend_from_slice(&[0u8; 6 * 32]);
    let (r, peak) =
        peak_during(|| read_table(&with_prefix(crate::store::format::PAGE_TABLE_MAGIC, &body)));
    assert!(r
        .expect_err("short")
        .to_string()
        .contains("268435456 pages announced"));
    assert!(peak < BOUND, "{peak} bytes");
}

#[test]
fn json_blobs_over_the_limit_are_refused_unread() {
    let fx = Fixture::new();
    let img = fx.image("img", 72, 8);
    let r = fx.ingest(&img, &["app"]);
    let m = fx.manifest(&r.id);
    // Replace the config blob's content by 5 MiB (its name no longer matches, but
    // the size is checked first: nothing is read).
    let p = fx.blob_path(&m.config.digest);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(&p, vec![b' '; 5 << 20]).expect("write");
    let d = crate::store::BlobDigest::parse(&m.config.digest).expect("digest");
    let (e, peak) = peak_during(|| {
        fx.store
            .blobs()
            .read_verified(&d, None, "config")
            .expect_err("over the limit")
    });
    assert!(
        e.to_string()
            .contains("more than the 4194304-byte limit for a config"),
        "{e}"
    );
    assert!(peak < 1 << 20, "{peak} bytes");
    let e = fx.store.config(&r.id).expect_err("config");
    assert!(e.to_string().contains("descriptor says"), "{e}");
}

#[test]
fn import_refuses_long_names_and_pax_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("store")).expect("open");
    let p = dir.path().join("long.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    let long = format!("blobs/sha256/{}", "a".repeat(200));
    b.append_data(&mut h, &long, &b"x"[..]).expect("append");
    fs::write(&p, b.into_inner().expect("finish")).expect("write");
    let e = store.import(&p).expect_err("long name");
    assert!(e.to_string().contains("././@LongLink"), "{e}");
    assert!(fs::read_dir(store.root().join("tmp"))
        .expect("tmp")
        .next()
        .is_none());
}

/// The worst config the limit lets through (4 MiB of `0,` in its metadata, the
/// densest JSON for a `serde_json::Value`) parses within a bounded amount of
/// memory: the limit, not the document, sets what inspect and restore can use.
#[test]
fn a_config_at_the_limit_parses_in_bounded_memory() {
    let real = real();
    let mut v: serde_json::Value = serde_json::from_slice(&real.config).expect("config");
    v.as_object_mut().expect("object").remove("metadata");
    let mut head = serde_json::to_vec(&v).expect("json");
    head.truncate(head.len() - 1); // drop the final '}'
    head.extend_from_slice(b",\"metadata\":[");
    let limit = crate::store::format::limits::MAX_CONFIG as usize;
    while head.len() + 2 < limit {
        head.extend_from_slice(b"0,");
    }
    head.extend_from_slice(b"0]}");
    assert!(head.len() <= limit + 2);
    let (r, peak) = peak_during(|| serde_json::from_slice::<serde_json::Value>(&head).map(drop));
    r.expect("parses");
    let (r, peak_cfg) = peak_during(|| SnapshotConfig::parse(&head).map(drop));
    r.expect("parses");
    eprintln!("4 MiB config: Value peak {peak} bytes, SnapshotConfig peak {peak_cfg} bytes");
    assert!(peak.max(peak_cfg) < 96 << 20, "{peak} / {peak_cfg} bytes");
}
