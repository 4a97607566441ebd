//! Writing and reading content-addressed blobs under `blobs/sha256/`. A blob is
//! written to a fresh `tmp/` file (O_EXCL) while being hashed, fsynced, made
//! read-only, renamed to its digest and the directory fsynced (restic's recipe), so a
//! crash leaves at most an unreferenced temp file or blob. Reads verify the digest.
//! This module never deletes a published blob; only `gc` does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::error::{io_err, Result, StoreError};
use super::format::limits::json_limit;
use super::ids::BlobDigest;

/// A directory of blobs named by their hex sha256 (`blobs/sha256` of a store, or an
/// import's staging directory).
#[derive(Clone, Debug)]
pub(crate) struct BlobDir {
    pub(crate) dir: PathBuf,
}

impl BlobDir {
    pub(crate) fn new(dir: PathBuf) -> Self {
        BlobDir { dir }
    }

    pub(crate) fn path(&self, d: &BlobDigest) -> PathBuf {
        self.dir.join(d.to_hex())
    }

    pub(crate) fn open(&self, d: &BlobDigest) -> Result<File> {
        let p = self.path(d);
        File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::MissingBlob {
                    digest: d.to_string(),
                    path: p.clone(),
                }
            } else {
                io_err("open", &p)(e)
            }
        })
    }

    /// Reads a whole JSON blob (manifest, config) and checks its digest (and, when
    /// given, its size). `what` names the blob kind in the error ("manifest", ...).
    /// Blobs larger than `limits::json_limit(what)` are refused before a byte is read.
    pub(crate) fn read_verified(
        &self,
        d: &BlobDigest,
        expect_size: Option<u64>,
        what: &'static str,
    ) -> Result<Vec<u8>> {
        let p = self.path(d);
        let f = self.open(d)?;
        let len = f.metadata().map_err(io_err("stat", &p))?.len();
        let max = json_limit(what);
        check_len(&p, what, len, expect_size, Some(max))?;
        let mut buf = Vec::with_capacity(len as usize);
        f.take(max + 1)
            .read_to_end(&mut buf)
            .map_err(io_err("read", &p))?;
        check_len(&p, what, buf.len() as u64, expect_size, Some(max))?;
        let got = BlobDigest::of(&buf);
        if got != *d {
            return Err(StoreError::Format {
                what,
                path: p,
                reason: format!("content digest is {got}, not {d}"),
            });
        }
        Ok(buf)
    }

    /// Opens a blob of any size, checks its size (when given) and its digest by
    /// streaming it once, and returns it positioned at its start, for readers that
    /// decode it as a stream (page tables, files blobs).
    pub(crate) fn open_verified(
        &self,
        d: &BlobDigest,
        expect_size: Option<u64>,
        what: &'static str,
    ) -> Result<File> {
        let p = self.path(d);
        let f = self.open(d)?;
        let len = f.metadata().map_err(io_err("stat", &p))?.len();
        check_len(&p, what, len, expect_size, None)?;
        let mut r = HashingReader::new(&f);
        io::copy(&mut r, &mut io::sink()).map_err(io_err("read", &p))?;
        let got = BlobDigest::from_hasher(r.hasher);
        if got != *d || r.count != len {
            return Err(StoreError::Format {
                what,
                path: p,
                reason: format!("content digest is {got}, not {d}"),
            });
        }
        let mut f = f;
        f.seek(io::SeekFrom::Start(0)).map_err(io_err("seek", &p))?;
        Ok(f)
    }
}

/// A blob's length against its descriptor's size and a limit.
fn check_len(
    p: &Path,
    what: &'static str,
    len: u64,
    expect: Option<u64>,
    max: Option<u64>,
) -> Result<()> {
    let reason = match (expect, max) {
        (Some(n), _) if len != n => format!("{len} bytes, its descriptor says {n}"),
        (_, Some(m)) if len > m => {
            format!("{len} bytes, more than the {m}-byte limit for a {what}")
        }
        _ => return Ok(()),
    };
    Err(StoreError::Format {
        what,
        path: p.to_path_buf(),
        reason,
    })
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates a new, empty file in `tmp_dir` with O_EXCL and a unique name starting
/// with `kind`.
pub(crate) fn create_temp(tmp_dir: &Path, kind: &str) -> Result<(File, PathBuf)> {
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = tmp_dir.join(format!("{kind}-{}-{n}-{nanos:08x}", std::process::id()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(super::util::PRIVATE_FILE)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create temp file", &path)(e)),
        }
    }
}

/// fsync a directory so a rename or unlink in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// A blob being written: hashed and counted as bytes go in.
pub(crate) struct BlobWriter {
    file: Option<BufWriter<File>>,
    tmp: PathBuf,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub(crate) fn create(tmp_dir: &Path, kind: &str) -> Result<BlobWriter> {
        let (file, tmp) = create_temp(tmp_dir, kind)?;
        Ok(BlobWriter {
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes and fsyncs the temp file. The blob is not visible until `publish`.
    pub(crate) fn finish(mut self) -> Result<PendingBlob> {
        let Some(w) = self.file.take() else {
            return Err(StoreError::Invalid("blob writer finished twice".into()));
        };
        let file = w
            .into_inner()
            .map_err(|e| io_err("write", &self.tmp)(e.into_error()))?;
        file.sync_all().map_err(io_err("fsync", &self.tmp))?;
        let hasher = std::mem::take(&mut self.hasher);
        Ok(PendingBlob {
            tmp: Some(std::mem::take(&mut self.tmp)),
            digest: BlobDigest::from_hasher(hasher),
            len: self.len,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("blob writer already finished"));
        };
        let n = f.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A complete, fsynced temp file with its digest, not yet renamed into place.
/// Dropped without `publish`, the temp file is removed.
#[derive(Debug)]
pub(crate) struct PendingBlob {
    tmp: Option<PathBuf>,
    pub(crate) digest: BlobDigest,
    pub(crate) len: u64,
}

impl PendingBlob {
    pub(crate) fn tmp_path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }

    /// Makes the blob visible: chmod 0400 (read-only, root's alone), rename to
    /// `blobs/sha256/<hex>`, fsync the directory. Returns true when the blob was
    /// written (it was not in the store, or the copy there was damaged and has
    /// been replaced by this one).
    pub(crate) fn publish(mut self, blobs: &BlobDir) -> Result<bool> {
        let Some(tmp) = self.tmp.take() else {
            return Err(StoreError::Invalid("blob published twice".into()));
        };
        let target = blobs.path(&self.digest);
        if is_intact(&target, &self.digest, self.len) {
            fs::remove_file(&tmp).map_err(io_err("remove", &tmp))?;
            return Ok(false);
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o400))
            .map_err(io_err("chmod", &tmp))?;
        fs::rename(&tmp, &target).map_err(io_err("rename into place", &target))?;
        sync_dir(&blobs.dir)?;
        Ok(true)
    }
}

impl Drop for PendingBlob {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = fs::remove_file(t);
        }
    }
}

/// Whether the blob at `path` exists with `len` bytes whose sha256 is `digest`.
/// A published blob is skipped only when this holds: the same name and size is
/// not enough, a damaged copy must be replaced by a good one (ingest, import).
pub(crate) fn is_intact(path: &Path, digest: &BlobDigest, len: u64) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == len)
        && hash_file(path).is_ok_and(|(d, n)| d == *digest && n == len)
}

/// Writes `bytes` as a blob and publishes it. Returns (digest, size, newly added).
pub(crate) fn put_bytes(
    tmp_dir: &Path,
    blobs: &BlobDir,
    kind: &str,
    bytes: &[u8],
) -> Result<(BlobDigest, u64, bool)> {
    let mut w = BlobWriter::create(tmp_dir, kind)?;
    w.write_all(bytes)
        .map_err(|e| io_err("write", w.tmp_path())(e))?;
    let p = w.finish()?;
    let (d, n) = (p.digest, p.len);
    let added = p.publish(blobs)?;
    Ok((d, n, added))
}

/// A reader that hashes and counts what passes through it.
pub(crate) struct HashingReader<R> {
    pub(crate) inner: R,
    pub(crate) hasher: Sha256,
    pub(crate) count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes a whole file (streaming). Returns (digest, length).
pub(crate) fn hash_file(path: &Path) -> Result<(BlobDigest, u64)> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut r = HashingReader::new(f);
    io::copy(&mut r, &mut io::sink()).map_err(io_err("read", path))?;
    Ok((BlobDigest::from_hasher(r.hasher), r.count))
}
