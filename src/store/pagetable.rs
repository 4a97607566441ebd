//! Page-table blobs: for one `pages-N.img`, its size and the digest of every page in
//! file order (the last partial page zero-padded). Owns encoding them and reading
//! them back as a bounded stream (`TableReader`: a table is untrusted and may
//! announce up to 1 TiB of pages, so it is never held whole); which pack holds a
//! page is the packs' business, not the table's.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::blob::BlobDir;
use super::error::{format_err, Result};
use super::format::{self, limits::MAX_PAGES_FILE, Cursor, PAGE_TABLE_MAGIC, PREFIX_LEN};
use super::ids::{BlobDigest, PageDigest};
use super::pack::PAGE_SIZE;

const WHAT: &str = "page table";

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageTable {
    pub(crate) file_size: u64,
    pub(crate) digests: Vec<PageDigest>,
}

pub(crate) fn pages_for(size: u64) -> u64 {
    size.div_ceil(PAGE_SIZE as u64)
}

/// `prefix | zstd( file_size u64 | page_count u64 | digest[32] * page_count )`.
pub(crate) fn encode(t: &PageTable, level: i32) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(16 + t.digests.len() * 32);
    body.extend_from_slice(&t.file_size.to_le_bytes());
    body.extend_from_slice(&(t.digests.len() as u64).to_le_bytes());
    for d in &t.digests {
        body.extend_from_slice(d.as_bytes());
    }
    let mut out = format::prefix(PAGE_TABLE_MAGIC).to_vec();
    out.extend(zstd::bulk::compress(&body, level)?);
    Ok(out)
}

/// Streams a page table's digests in file order, a bounded chunk at a time: the
/// header's count is checked against the 1 TiB limit and the file size, and then
/// only ever trusted as far as the decompressed stream really holds digests, so a
/// table announcing a huge file costs time proportional to what it holds, never
/// memory.
pub(crate) struct TableReader<R: Read> {
    dec: zstd::stream::read::Decoder<'static, BufReader<R>>,
    pub(crate) file_size: u64,
    pub(crate) count: u64,
    left: u64,
    buf: Vec<u8>,
    path: PathBuf,
}

/// Digests handed out per `next_chunk` at most (32 KiB of digests).
pub(crate) const CHUNK: usize = 1024;

impl<R: Read> TableReader<R> {
    pub(crate) fn new(mut r: R, path: &Path) -> Result<Self> {
        let mut p = [0u8; PREFIX_LEN];
        r.read_exact(&mut p)
            .map_err(|e| format_err(WHAT, path, format!("cannot read prefix: {e}")))?;
        format::check_prefix(&p, PAGE_TABLE_MAGIC, WHAT, path)?;
        let mut dec = zstd::stream::read::Decoder::new(r)
            .map_err(|e| format_err(WHAT, path, format!("zstd: {e}")))?;
        let mut head = [0u8; 16];
        dec.read_exact(&mut head)
            .map_err(|e| format_err(WHAT, path, format!("cannot decompress header: {e}")))?;
        let mut c = Cursor::new(&head);
        let (Some(file_size), Some(count)) = (c.u64(), c.u64()) else {
            return Err(format_err(WHAT, path, "short header"));
        };
        if file_size > MAX_PAGES_FILE {
            return Err(format_err(
                WHAT,
                path,
                format!("file size {file_size} is beyond the {MAX_PAGES_FILE}-byte (1 TiB) limit"),
            ));
        }
        if count != pages_for(file_size) {
            return Err(format_err(
                WHAT,
                path,
                format!("{count} pages cannot describe a file of {file_size} bytes"),
            ));
        }
        Ok(TableReader {
            dec,
            file_size,
            count,
            left: count,
            buf: Vec::new(),
            path: path.to_path_buf(),
        })
    }

    /// Replaces `out` with the next (at most `CHUNK`) digests; returns false once
    /// every digest was handed out and the stream is checked to end there.
    pub(crate) fn next_chunk(&mut self, out: &mut Vec<PageDigest>) -> Result<bool> {
        out.clear();
        if self.left == 0 {
            let mut extra = [0u8; 1];
            return match self.dec.read(&mut extra) {
                Ok(0) => Ok(false),
                Ok(_) => Err(format_err(
                    WHAT,
                    &self.path,
                    "trailing data after the digests",
                )),
                Err(e) => Err(format_err(
                    WHAT,
                    &self.path,
                    format!("cannot decompress: {e}"),
                )),
            };
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.buf.resize(n * 32, 0);
        if let Err(e) = self.dec.read_exact(&mut self.buf) {
            let have = self.count - self.left;
            return Err(format_err(
                WHAT,
                &self.path,
                format!(
                    "{} pages announced, fewer present (cut short after {have}): {e}",
                    self.count
                ),
            ));
        }
        self.left -= n as u64;
        out.extend(self.buf.chunks_exact(32).map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            PageDigest(d)
        }));
        Ok(true)
    }

    /// Calls `f(page index, digest)` for every digest in order.
    pub(crate) fn for_each(
        mut self,
        mut f: impl FnMut(u64, &PageDigest) -> Result<()>,
    ) -> Result<()> {
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut i = 0u64;
        while self.next_chunk(&mut chunk)? {
            for d in &chunk {
                f(i, d)?;
                i += 1;
            }
        }
        Ok(())
    }
}

impl<R: Read> TableReader<R> {
    /// The index and digest of the first page matching `pred`, reading no further
    /// than it; None when no page matches (the whole table then checked to its end).
    pub(crate) fn find(
        mut self,
        mut pred: impl FnMut(&PageDigest) -> bool,
    ) -> Result<Option<(u64, PageDigest)>> {
        let mut chunk = Vec::with_capacity(CHUNK);
        let mut i = 0u64;
        while self.next_chunk(&mut chunk)? {
            if let Some(k) = chunk.iter().position(&mut pred) {
                return Ok(Some((i + k as u64, chunk[k])));
            }
            i += chunk.len() as u64;
        }
        Ok(None)
    }
}

/// Opens page-table blob `d`, checks its digest (streaming) and starts reading it.
pub(crate) fn open(blobs: &BlobDir, d: &BlobDigest) -> Result<TableReader<File>> {
    let f = blobs.open_verified(d, None, WHAT)?;
    TableReader::new(f, &blobs.path(d))
}

/// The whole table in memory: tests only (readers stream with `TableReader`).
#[cfg(test)]
pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<PageTable> {
    let mut r = TableReader::new(bytes, path)?;
    let file_size = r.file_size;
    let mut digests = Vec::new();
    let mut chunk = Vec::new();
    while r.next_chunk(&mut chunk)? {
        digests.extend_from_slice(&chunk);
    }
    Ok(PageTable { file_size, digests })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let t = PageTable {
            file_size: 3 * 4096 + 5,
            digests: (0..4u8).map(|i| PageDigest::of(&[i])).collect(),
        };
        let b = encode(&t, 3).expect("encode");
        let p = Path::new("t");
        assert_eq!(decode(&b, p).expect("decode"), t);
        let huge = PageTable {
            file_size: 1 << 41,
            digests: Vec::new(),
        };
        let e = decode(&encode(&huge, 3).expect("encode"), p).expect_err("too big");
        assert!(e.to_string().contains("1 TiB"), "{e}");
        let bad = PageTable {
            file_size: 4096,
            ..t.clone()
        };
        let e = decode(&encode(&bad, 3).expect("encode"), p).expect_err("mismatch");
        assert_eq!(
            e.to_string(),
            "bad page table t: 4 pages cannot describe a file of 4096 bytes"
        );
        assert!(decode(&b[..b.len() - 3], p).is_err());
    }
}
