//! Store tests on temp directories (no root): fake CRIU image directories with a
//! pages file of mixed memory (zero, text, records, random pages) and a few small
//! files. Split by concern: round trips and dedup, integrity (verify/materialize),
//! gc/crash/concurrency, export/import, catalog.

mod catalog;
mod damaged;
mod fuzz;
mod gc_crash;
mod integrity;
mod names;
mod prune;
mod roundtrip;
mod transfer;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::layout::{self, Manifest};
use super::pack::PAGE_SIZE;
use super::{IngestOptions, IngestReport, SnapshotId, SnapshotInput, Store};

pub(super) const CONFIG_JSON: &[u8] =
    b"{\"ociVersion\":\"1.0.2\",\"process\":{\"args\":[\"redis-server\"]}}\n";

/// xorshift64*: deterministic, fast, good enough for test data.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "checkpoint",
    "restore",
    "container",
    "memory",
    "page",
    "redis",
    "key",
    "value",
    "the",
    "of",
    "and",
    "process",
    "socket",
    "mapping",
    "stack",
    "heap",
    "snapshot",
    "store",
    "frame",
    "pack",
];

/// One page of "memory" of the kind chosen by `kind` (0 zero, 1 text, 2 records, 3 random).
pub(super) fn page(rng: &mut Rng, kind: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    match kind {
        0 => {}
        1 => {
            let mut s = String::new();
            while s.len() < PAGE_SIZE {
                s.push_str(WORDS[(rng.next() % WORDS.len() as u64) as usize]);
                s.push(' ');
            }
            p.copy_from_slice(&s.as_bytes()[..PAGE_SIZE]);
        }
        2 => {
            for (i, r) in p.chunks_mut(64).enumerate() {
                r[..8].copy_from_slice(&(rng.next() % 100_000).to_le_bytes());
                r[8..12].copy_from_slice(&(i as u32).to_le_bytes());
                let name = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
                r[16..16 + name.len()].copy_from_slice(name);
            }
        }
        _ => rng.fill(&mut p),
    }
    p
}

/// Mixed memory: ~15% zero, 30% text, 25% records, 30% random pages.
pub(super) fn pages(seed: u64, n: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n * PAGE_SIZE);
    for _ in 0..n {
        let k = match rng.next() % 100 {
            0..=14 => 0,
            15..=44 => 1,
            45..=69 => 2,
            _ => 3,
        };
        out.extend(page(&mut rng, k));
    }
    out
}

/// A fake CRIU image directory: pages-1.img (`n` pages) and small files.
pub(super) fn fake_image(dir: &Path, seed: u64, n: usize) -> PathBuf {
    fs::create_dir_all(dir).expect("mkdir image");
    fs::write(dir.join("pages-1.img"), pages(seed, n)).expect("write pages");
    write_small(dir, seed);
    dir.to_path_buf()
}

pub(super) fn write_small(dir: &Path, seed: u64) {
    let mut rng = Rng::new(seed ^ 0xabc);
    let mut core = vec![0u8; 3000];
    rng.fill(&mut core);
    fs::write(dir.join("inventory.img"), b"\x01\x02\x03inventory").expect("write");
    fs::write(dir.join("core-1.img"), core).expect("write");
    fs::write(dir.join("pagemap-1.img"), format!("pagemap {seed}")).expect("write");
    fs::write(dir.join("fdinfo-2.img"), b"").expect("write");
}

/// Overwrites `count` pages (chosen by `seed`) of pages-1.img with random data.
pub(super) fn mutate(dir: &Path, count: usize, seed: u64) {
    let path = dir.join("pages-1.img");
    let mut data = fs::read(&path).expect("read");
    let n = data.len() / PAGE_SIZE;
    let mut rng = Rng::new(seed);
    for _ in 0..count {
        let i = (rng.next() % n as u64) as usize;
        rng.fill(&mut data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
    }
    fs::write(&path, data).expect("write");
}

pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) store: Store,
}

impl Fixture {
    pub(super) fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open(&dir.path().join("store")).expect("open store");
        store.set_lock_timeout(Duration::from_secs(20));
        Fixture { dir, store }
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(super) fn image(&self, name: &str, seed: u64, n: usize) -> PathBuf {
        fake_image(&self.path(name), seed, n)
    }

    pub(super) fn ingest(&self, image: &Path, tags: &[&str]) -> IngestReport {
        self.try_ingest(image, tags).expect("ingest")
    }

    pub(super) fn try_ingest(
        &self,
        image: &Path,
        tags: &[&str],
    ) -> Result<IngestReport, super::StoreError> {
        self.store.ingest(
            SnapshotInput {
                image_dir: image,
                config_json: CONFIG_JSON,
                container_id: "ctr1",
                metadata: serde_json::json!({"criu": {"version": "4.2"}}),
                tags: tags.iter().map(|s| s.to_string()).collect(),
            },
            &IngestOptions::default(),
        )
    }

    pub(super) fn manifest(&self, id: &SnapshotId) -> Manifest {
        self.store.manifest(id).expect("manifest")
    }

    pub(super) fn blob_path(&self, digest: &str) -> PathBuf {
        let d = super::BlobDigest::parse(digest).expect("digest");
        self.store.blobs().path(&d)
    }

    /// Blob paths of the layers of `id` with media type `mt`.
    pub(super) fn layers(&self, id: &SnapshotId, mt: &str) -> Vec<PathBuf> {
        self.manifest(id)
            .layers
            .iter()
            .filter(|l| l.media_type == mt)
            .map(|l| self.blob_path(&l.digest))
            .collect()
    }

    pub(super) fn packs(&self, id: &SnapshotId) -> Vec<PathBuf> {
        self.layers(id, layout::MT_PACK)
    }

    /// Total bytes of all pack blobs in the store.
    pub(super) fn pack_bytes(&self) -> u64 {
        let index = self.store.read_index().expect("index");
        let mut packs = std::collections::BTreeSet::new();
        for e in super::catalog::entries(&index) {
            for p in self.packs(&e.id) {
                packs.insert(p);
            }
        }
        packs
            .iter()
            .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// Every file below the store except tmp/ and locks, with contents.
    pub(super) fn snapshot_of_store(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        walk(self.store.root(), self.store.root(), &mut out);
        out
    }

    pub(super) fn errors(&self, read_data: bool) -> Vec<super::Finding> {
        self.store
            .verify(read_data)
            .expect("verify")
            .into_iter()
            .filter(|f| f.level == super::Level::Error)
            .collect()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for e in fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .expect("prefix")
            .to_string_lossy()
            .into_owned();
        if rel == "tmp" || rel == "lock" || rel == "index.lock" {
            continue;
        }
        if p.is_dir() {
            walk(root, &p, out);
        } else {
            out.insert(rel, fs::read(&p).expect("read"));
        }
    }
}

/// The files of a directory with contents.
pub(super) fn dir_contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

pub(super) fn writable(p: &Path) {
    fs::set_permissions(p, fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// Flips one byte of a (read-only) blob.
pub(super) fn flip(p: &Path, offset: u64) {
    writable(p);
    let mut b = fs::read(p).expect("read");
    b[offset as usize] ^= 0x5a;
    fs::write(p, b).expect("write");
}

pub(super) fn tmp_is_empty(store: &Store) -> bool {
    fs::read_dir(store.root().join("tmp"))
        .expect("tmp")
        .next()
        .is_none()
}
