//! Hostile input: crafted snapshots, tiny on disk, whose page table or
//! files blob claims far more than it holds. Each is imported from an archive and
//! also planted directly into a store (as an older stasis could have imported it),
//! then `snapshot import`, `snapshot inspect` and `restore` run with the stasis
//! process's address space bounded (setrlimit RLIMIT_AS): each must fail with one
//! clear line, never die of an allocation, and leave nothing in the store's tmp/.
//! Also: errors about a file that is not a tar quote none of its bytes raw.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::common::{runtime_bin, unique_id};

/// Address-space limit for stasis in these tests: far above what it needs (a
/// store command runs in well under 128 MiB), far below what the bombs claim.
const AS_LIMIT: u64 = 512 << 20;
const CRIU: &str = "/usr/local/sbin/criu";

/// One test's scratch directory and store.
struct Hx {
    dir: tempfile::TempDir,
    store: PathBuf,
}

/// How a bounded stasis command ended.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
}

impl Ran {
    /// Exited non-zero on its own (no signal, no allocation failure), with exactly
    /// one stderr line naming every needle.
    #[track_caller]
    fn fails_cleanly(&self, needles: &[&str]) -> String {
        assert_eq!(self.signal, None, "killed by a signal: {self:#?}");
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected failure: {self:#?}"
        );
        assert!(
            !self.stderr.contains("memory allocation"),
            "ran out of memory: {self:#?}"
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "expected one stderr line: {self:#?}");
        for n in needles {
            assert!(
                lines[0].contains(n),
                "stderr does not name {n:?}: {self:#?}"
            );
        }
        lines[0].to_string()
    }
}

impl Hx {
    fn new() -> Hx {
        let dir = tempfile::Builder::new()
            .prefix("stasis-hostile-")
            .tempdir()
            .expect("tempdir");
        let store = dir.path().join("store");
        Hx { dir, store }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `stasis --root R --criu C --store S ARGS` with RLIMIT_AS = `AS_LIMIT`.
    fn run(&self, args: &[&str]) -> Ran {
        let mut cmd = Command::new(runtime_bin());
        cmd.arg("--root")
            .arg(self.path("root"))
            .arg("--criu")
            .arg(CRIU)
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe setrlimit(2) runs,
        // on a stack value; no allocation, no lock.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: AS_LIMIT,
                    rlim_max: AS_LIMIT,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().expect("run stasis");
        Ran {
            code: out.status.code(),
            signal: out.status.signal(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Creates the (empty) store: `snapshot import` of a missing archive creates
    /// it, then fails on the file (read commands such as `ls` create no store).
    #[track_caller]
    fn create_store(&self) {
        let missing = self.path("no-such-archive.tar");
        let out = self.run(&["snapshot", "import", missing.to_str().unwrap()]);
        assert!(
            out.code == Some(1) && out.stderr.contains("no-such-archive.tar"),
            "{}",
            out.stderr
        );
        assert!(self.store.join("oci-layout").is_file(), "no store created");
    }

    /// The store's tmp/ is empty and it lists no snapshot.
    #[track_caller]
    fn store_unchanged(&self) {
        let tmp: Vec<String> = fs::read_dir(self.store.join("tmp"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
        let index: Value =
            serde_json::from_slice(&fs::read(self.store.join("index.json")).expect("index"))
                .expect("index json");
        assert_eq!(index["manifests"], json!([]), "{index}");
    }
}

// ---------------------------------------------------------------------------
// Crafting snapshots (FORMAT.md), without stasis's own code.

fn prefix(magic: &[u8; 8]) -> Vec<u8> {
    let mut p = magic.to_vec();
    p.extend_from_slice(&0x0001_0000u32.to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    p
}

/// A blob directory being filled: `blobs/sha256/<hex>` under `root`.
struct Layout {
    root: PathBuf,
}

/// A blob's hex digest and size.
type Blob = (String, u64);

/// Writes through to a file while hashing and counting.
struct Hashing<W: Write> {
    w: W,
    h: Sha256,
    n: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.w.write(b)?;
        self.h.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

impl Layout {
    fn new(root: PathBuf) -> Layout {
        fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { root }
    }

    /// Writes a blob produced by `fill` (streamed, so generated blobs never sit
    /// in memory) and names it by its digest.
    fn put_with(&self, fill: impl FnOnce(&mut dyn Write)) -> Blob {
        let tmp = self.root.join("partial");
        let mut w = Hashing {
            w: BufWriter::new(File::create(&tmp).unwrap()),
            h: Sha256::new(),
            n: 0,
        };
        fill(&mut w);
        w.flush().unwrap();
        let hex = hex::encode(w.h.finalize());
        fs::rename(&tmp, self.root.join("blobs/sha256").join(&hex)).unwrap();
        (hex, w.n)
    }

    fn put(&self, bytes: &[u8]) -> Blob {
        self.put_with(|w| w.write_all(bytes).unwrap())
    }
}

/// `times` copies of one zstd frame holding `chunk`: a zstd stream may be any
/// number of frames, so this decompresses to `chunk` repeated `times` times while
/// costing one compression and `times` small writes.
fn repeated_frames(w: &mut dyn Write, chunk: &[u8], times: u64) {
    let frame = zstd::bulk::compress(chunk, 19).unwrap();
    for _ in 0..times {
        w.write_all(&frame).unwrap();
    }
}

/// A file of the crafted snapshot: name, size, sha256 hex, and its page table
/// (pages files) or None (kept in the files blob).
struct Rec {
    name: &'static str,
    size: u64,
    sha256: String,
    table: Option<Blob>,
}

/// Writes config, manifest and index.json for `recs` (sorted by name), with the
/// page tables and files blob already in `l`; tags it `tag`. Returns the
/// descriptor index.json holds.
fn finish_snapshot(l: &Layout, recs: &[Rec], files_blob: Option<Blob>, tag: &str) -> Value {
    let config_json =
        br#"{"ociVersion":"1.0.2","process":{"args":["sh"]},"root":{"path":"rootfs"}}"#;
    let cj_sha = Sha256::digest(config_json);
    let mut h = Sha256::new();
    h.update(b"stasis-snapshot-id-v1\n");
    h.update((recs.len() as u32).to_le_bytes());
    for r in recs {
        h.update((r.name.len() as u32).to_le_bytes());
        h.update(r.name.as_bytes());
        h.update(r.size.to_le_bytes());
        h.update(hex::decode(&r.sha256).unwrap());
    }
    h.update((config_json.len() as u64).to_le_bytes());
    h.update(cj_sha);
    let id = hex::encode(h.finalize());
    let files: Vec<Value> = recs
        .iter()
        .map(|r| match &r.table {
            Some((t, _)) => json!({"name": r.name, "size": r.size, "sha256": r.sha256,
                                   "kind": "pages", "pageTable": format!("sha256:{t}")}),
            None => json!({"name": r.name, "size": r.size, "sha256": r.sha256, "kind": "file"}),
        })
        .collect();
    let created = "2026-01-01T00:00:00.000Z";
    let config = json!({
        "formatVersion": "1.0", "snapshotId": id, "created": created, "container": "evil",
        "files": files,
        "configJson": {"size": config_json.len(), "sha256": hex::encode(cj_sha),
                       "encoding": "utf8", "data": std::str::from_utf8(config_json).unwrap()},
        "sizes": {"imageBytes": 0, "pagesTotal": 0, "pagesNew": 0, "pagesReused": 0,
                  "bytesAdded": 0, "ingestMs": 0},
        "metadata": {}
    });
    let (cd, cs) = l.put(&serde_json::to_vec(&config).unwrap());
    let mut layers: Vec<Value> = recs
        .iter()
        .filter_map(|r| {
            r.table.as_ref().map(|(t, n)| {
                json!({"mediaType": "application/vnd.stasis.pagetable.v1",
                       "digest": format!("sha256:{t}"), "size": n,
                       "annotations": {"io.stasis.file": r.name}})
            })
        })
        .collect();
    if let Some((fd, fs_)) = &files_blob {
        layers.push(json!({"mediaType": "application/vnd.stasis.files.v1",
                           "digest": format!("sha256:{fd}"), "size": fs_}));
    }
    let annotations = json!({"io.stasis.snapshot.id": id, "io.stasis.created": created,
                             "org.opencontainers.image.created": created,
                             "io.stasis.container": "evil", "io.stasis.image-bytes": "0",
                             "io.stasis.added-bytes": "0"});
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.stasis.checkpoint.v1+json",
        "config": {"mediaType": "application/vnd.stasis.checkpoint.config.v1+json",
                   "digest": format!("sha256:{cd}"), "size": cs},
        "layers": layers,
        "annotations": annotations,
    });
    let (md, ms) = l.put(&serde_json::to_vec(&manifest).unwrap());
    let mut desc = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.stasis.checkpoint.v1+json",
        "digest": format!("sha256:{md}"), "size": ms,
        "annotations": annotations,
    });
    desc["annotations"]["org.opencontainers.image.ref.name"] = json!(tag);
    let index = json!({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [desc.clone()],
                       "annotations": {"io.stasis.store.version": "1"}});
    fs::write(
        l.root.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    desc
}

/// The layout as an export tar (ustar, the paths `import` accepts).
fn tar_of(l: &Layout, out: &Path) {
    let mut b = tar::Builder::new(BufWriter::new(File::create(out).unwrap()));
    let mut add = |name: &str, path: Option<&Path>| {
        let mut h = tar::Header::new_ustar();
        match path {
            Some(p) => {
                h.set_size(fs::metadata(p).unwrap().len());
                h.set_mode(0o444);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, name, File::open(p).unwrap()).unwrap();
            }
            None => {
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                b.append_data(&mut h, name, std::io::empty()).unwrap();
            }
        }
    };
    add("oci-layout", Some(&l.root.join("oci-layout")));
    add("blobs/", None);
    add("blobs/sha256/", None);
    let mut blobs: Vec<PathBuf> = fs::read_dir(l.root.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    blobs.sort();
    for p in &blobs {
        let name = format!("blobs/sha256/{}", p.file_name().unwrap().to_string_lossy());
        add(&name, Some(p));
    }
    add("index.json", Some(&l.root.join("index.json")));
    b.into_inner().unwrap().flush().unwrap();
}

/// Puts the crafted snapshot into an existing store as if an older stasis had
/// imported it: its blobs into blobs/sha256, its descriptor into index.json.
fn plant(l: &Layout, desc: &Value, store: &Path) {
    for e in fs::read_dir(l.root.join("blobs/sha256")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), store.join("blobs/sha256").join(e.file_name())).unwrap();
    }
    let p = store.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(desc.clone());
    fs::write(&p, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Page table of a 1 TiB pages file: 2^28 copies of one digest (no pack holds
/// it), 8 GiB decompressed, a few hundred KiB on disk.
fn page_table_bomb(l: &Layout) -> Rec {
    const SIZE: u64 = 1 << 40;
    let count = SIZE / 4096;
    let digest = [0x5au8; 32];
    let chunk: Vec<u8> = digest.repeat(1 << 15);
    let mut head = SIZE.to_le_bytes().to_vec();
    head.extend_from_slice(&count.to_le_bytes());
    let table = l.put_with(|w| {
        w.write_all(&prefix(b"STASPTBL")).unwrap();
        w.write_all(&zstd::bulk::compress(&head, 3).unwrap())
            .unwrap();
        repeated_frames(w, &chunk, count / (1 << 15));
    });
    Rec {
        name: "pages-1.img",
        size: SIZE,
        sha256: "ab".repeat(32),
        table: Some(table),
    }
}

/// Files blob holding `a-ghost.img`, a 10 GiB entry of zeros, then a real
/// `fs-manifest.json` (so `inspect`, which reads only the latter, walks past it).
fn files_blob_bomb(l: &Layout) -> (Vec<Rec>, Blob) {
    const BIG: u64 = 10 << 30;
    let manifest = br#"{"version":1,"trees":[]}"#;
    // sha256 of 10 GiB of zeros (python3: hashlib.sha256(bytes(10 << 30))).
    let big_sha = "732377e7f4a2abdc13ddfa1eb4c9c497fd2a2b294674d056cf51581b47dd586d".to_string();
    let blob = l.put_with(|w| {
        w.write_all(&prefix(b"STASFILE")).unwrap();
        let mut head = 2u32.to_le_bytes().to_vec();
        head.extend_from_slice(&11u16.to_le_bytes());
        head.extend_from_slice(b"a-ghost.img");
        head.extend_from_slice(&BIG.to_le_bytes());
        w.write_all(&zstd::bulk::compress(&head, 3).unwrap())
            .unwrap();
        repeated_frames(w, &vec![0u8; 1 << 20], BIG >> 20);
        let mut tail = 16u16.to_le_bytes().to_vec();
        tail.extend_from_slice(b"fs-manifest.json");
        tail.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
        tail.extend_from_slice(manifest);
        w.write_all(&zstd::bulk::compress(&tail, 3).unwrap())
            .unwrap();
    });
    let recs = vec![
        Rec {
            name: "a-ghost.img",
            size: BIG,
            sha256: big_sha,
            table: None,
        },
        Rec {
            name: "fs-manifest.json",
            size: manifest.len() as u64,
            sha256: hex::encode(Sha256::digest(manifest)),
            table: None,
        },
    ];
    (recs, blob)
}

/// Import, inspect and restore of one crafted snapshot under the memory bound:
/// import is refused (nothing left), then the planted copy fails to inspect
/// (when `inspect_fails`) and to restore with a clear error.
fn bounded_everywhere(
    hx: &Hx,
    l: &Layout,
    desc: &Value,
    import_needles: &[&str],
    inspect_fails: bool,
    restore_needles: &[&str],
) {
    let tar = hx.path("evil.tar");
    tar_of(l, &tar);
    let tar_len = fs::metadata(&tar).unwrap().len();
    assert!(tar_len < 4 << 20, "the crafted archive is {tar_len} bytes");
    hx.create_store();
    let ls = hx.run(&["snapshot", "ls"]);
    assert_eq!(ls.code, Some(0), "{ls:#?}");

    let t = tar.to_str().unwrap();
    let mut needles = vec![t];
    needles.extend_from_slice(import_needles);
    hx.run(&["snapshot", "import", t]).fails_cleanly(&needles);
    hx.store_unchanged();

    plant(l, desc, &hx.store);
    if inspect_fails {
        hx.run(&["snapshot", "inspect", "evil:v1"])
            .fails_cleanly(&restore_needles[..1]);
    }
    hx.run(&["snapshot", "verify", "--read-data"])
        .fails_cleanly(&["verify found"]);
    let id = unique_id("hostile");
    hx.run(&["restore", "-d", "--from", "evil:v1", &id])
        .fails_cleanly(restore_needles);
    let tmp: Vec<_> = fs::read_dir(hx.store.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "restore left files in tmp/");
}

#[test]
fn a_page_table_announcing_a_1_tib_file_costs_no_memory() {
    requires!(root);
    let hx = Hx::new();
    let l = Layout::new(hx.path("evil"));
    let rec = page_table_bomb(&l);
    let desc = finish_snapshot(&l, &[rec], None, "evil:v1");
    bounded_everywhere(
        &hx,
        &l,
        &desc,
        &["pages of pages-1.img are in none of the snapshot's packs (the first at offset 0)"],
        false,
        &["pages-1.img", "is in none of the snapshot's packs"],
    );
}

#[test]
fn a_files_blob_entry_of_10_gib_is_refused_unread() {
    requires!(root);
    let hx = Hx::new();
    let l = Layout::new(hx.path("evil"));
    let (recs, blob) = files_blob_bomb(&l);
    let desc = finish_snapshot(&l, &recs, Some(blob), "evil:v1");
    bounded_everywhere(
        &hx,
        &l,
        &desc,
        &[
            "a-ghost.img",
            "10737418240 bytes, more than the 1073741824-byte limit",
        ],
        true,
        &["10737418240 bytes, more than the 1073741824-byte limit"],
    );
}

/// An `fs-manifest.json` of 300 MiB (zeros: within the 1 GiB files-blob limit,
/// beyond the 256 MiB that inspect and restore read into memory): inspect must
/// refuse to buffer it, and restore, which materialises it to disk (streamed),
/// must refuse to parse it.
#[test]
fn a_filesystem_manifest_over_256_mib_is_refused_unread() {
    requires!(root);
    const BIG: u64 = 300 << 20;
    let hx = Hx::new();
    let l = Layout::new(hx.path("evil"));
    let zeros = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    for _ in 0..BIG >> 20 {
        h.update(&zeros);
    }
    let sha = hex::encode(h.finalize());
    let blob = l.put_with(|w| {
        w.write_all(&prefix(b"STASFILE")).unwrap();
        let mut head = 1u32.to_le_bytes().to_vec();
        head.extend_from_slice(&16u16.to_le_bytes());
        head.extend_from_slice(b"fs-manifest.json");
        head.extend_from_slice(&BIG.to_le_bytes());
        w.write_all(&zstd::bulk::compress(&head, 3).unwrap())
            .unwrap();
        repeated_frames(w, &zeros, BIG >> 20);
    });
    let rec = Rec {
        name: "fs-manifest.json",
        size: BIG,
        sha256: sha,
        table: None,
    };
    let desc = finish_snapshot(&l, &[rec], Some(blob), "evil:v1");
    hx.create_store();
    assert_eq!(hx.run(&["snapshot", "ls"]).code, Some(0));
    plant(&l, &desc, &hx.store);
    hx.run(&["snapshot", "inspect", "evil:v1"])
        .fails_cleanly(&["314572800 bytes, more than the 268435456-byte limit"]);
    let id = unique_id("hostile");
    hx.run(&["restore", "-d", "--from", "evil:v1", &id])
        .fails_cleanly(&["fs-manifest.json", "more than the 268435456-byte limit"]);
    let left: Vec<_> = fs::read_dir(hx.store.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "restore left files in tmp/");
}

/// A pack holding one page of 0x5a bytes: (pack blob, the page's digest).
fn one_page_pack(l: &Layout) -> (Blob, [u8; 32]) {
    let page = vec![0x5au8; 4096];
    let digest: [u8; 32] = Sha256::digest(&page).into();
    let frame = zstd::bulk::compress(&page, 3).unwrap();
    let mut index = 16u64.to_le_bytes().to_vec();
    index.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    index.extend_from_slice(&1u32.to_le_bytes());
    index.extend_from_slice(&digest);
    let mut pack = prefix(b"STASPACK");
    pack.extend_from_slice(&frame);
    let index_offset = pack.len() as u64;
    pack.extend_from_slice(&index);
    pack.extend_from_slice(&index_offset.to_le_bytes());
    pack.extend_from_slice(&(index.len() as u64).to_le_bytes());
    pack.extend_from_slice(&1u32.to_le_bytes());
    pack.extend_from_slice(&1u32.to_le_bytes());
    pack.extend_from_slice(&Sha256::digest(&index));
    pack.extend_from_slice(b"STASPEND");
    (l.put(&pack), digest)
}

/// A valid snapshot (every page is in its pack, so import accepts it) whose page
/// table repeats that one page for more bytes than the disk has free: restore
/// must refuse before writing, not fill the disk.
#[test]
fn a_pages_file_larger_than_the_free_disk_is_refused_before_writing() {
    requires!(root);
    let hx = Hx::new();
    let st = nix::sys::statvfs::statvfs(hx.dir.path()).expect("statvfs");
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let size = (2 * free).next_power_of_two().max(1 << 30);
    if size > 1 << 40 {
        eprintln!("SKIP: {free} bytes free, more than a page table may describe");
        return;
    }
    let l = Layout::new(hx.path("evil"));
    let (pack, digest) = one_page_pack(&l);
    let count = size / 4096;
    let per = (1u64 << 15).min(count);
    let mut head = size.to_le_bytes().to_vec();
    head.extend_from_slice(&count.to_le_bytes());
    let table = l.put_with(|w| {
        w.write_all(&prefix(b"STASPTBL")).unwrap();
        w.write_all(&zstd::bulk::compress(&head, 3).unwrap())
            .unwrap();
        repeated_frames(w, &digest.repeat(per as usize), count / per);
    });
    let rec = Rec {
        name: "pages-1.img",
        size,
        sha256: "cd".repeat(32),
        table: Some(table),
    };
    let mut desc = finish_snapshot(&l, &[rec], None, "evil:v1");
    // finish_snapshot lists no pack: add it to the manifest, rewrite index.json.
    let mpath = l
        .root
        .join("blobs/sha256")
        .join(&desc["digest"].as_str().unwrap()[7..]);
    let mut m: Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    m["layers"].as_array_mut().unwrap().push(json!({
        "mediaType": "application/vnd.stasis.pack.v1",
        "digest": format!("sha256:{}", pack.0), "size": pack.1}));
    fs::remove_file(&mpath).unwrap();
    let (md, ms) = l.put(&serde_json::to_vec(&m).unwrap());
    desc["digest"] = json!(format!("sha256:{md}"));
    desc["size"] = json!(ms);
    let index = json!({"schemaVersion": 2,
                       "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [desc],
                       "annotations": {"io.stasis.store.version": "1"}});
    fs::write(
        l.root.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();

    let tar = hx.path("evil.tar");
    tar_of(&l, &tar);
    assert_eq!(hx.run(&["snapshot", "ls"]).code, Some(0));
    let imported = hx.run(&["snapshot", "import", tar.to_str().unwrap()]);
    assert_eq!(
        imported.code,
        Some(0),
        "a valid snapshot is imported: {imported:#?}"
    );
    let id = unique_id("hostile");
    hx.run(&["restore", "-d", "--from", "evil:v1", &id])
        .fails_cleanly(&["needs", "are free there"]);
    let left: Vec<_> = fs::read_dir(hx.store.join("tmp")).unwrap().collect();
    assert!(left.is_empty(), "restore left files in tmp/");
}

/// Bytes of an error line a terminal would act on: C0 controls but none of the
/// line itself, DEL, and C1 controls.
fn control_chars(s: &str) -> Vec<char> {
    s.chars().filter(|c| c.is_control() && *c != '\n').collect()
}

#[test]
fn errors_about_a_non_tar_file_quote_no_raw_bytes() {
    requires!(root);
    let hx = Hx::new();
    assert_eq!(hx.run(&["snapshot", "ls"]).code, Some(0));
    // A zstd file, and a "tar" whose header checksum field holds an escape
    // sequence (the tar crate quotes that field in its error).
    let zst = hx.path("snap.tar.zst");
    let mut inside = Vec::new();
    let mut x = 0x9e37_79b9u32;
    for _ in 0..4096 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        inside.push(x as u8);
        inside.extend_from_slice(b"\x1b]0;pwned\x07");
    }
    fs::write(&zst, zstd::bulk::compress(&inside, 3).unwrap()).unwrap();
    let mut header = vec![b'a'; 1024];
    header[..7].copy_from_slice(b"\x1b]0;x\x07\x1b");
    header[148..156].copy_from_slice(b"\x1b[31m\x07\x9b\x1b");
    let bad = hx.path("bad.tar");
    fs::write(&bad, &header).unwrap();
    for f in [&zst, &bad] {
        let ran = hx.run(&["snapshot", "import", f.to_str().unwrap()]);
        let line = ran.fails_cleanly(&[f.to_str().unwrap(), "not a tar file"]);
        assert_eq!(
            control_chars(&ran.stderr),
            Vec::<char>::new(),
            "raw bytes in {line:?}"
        );
    }
    hx.store_unchanged();
}
