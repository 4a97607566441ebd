//! Page-table blobs: for one `pages-N.img`, its size and the digest of every page in
//! file order (the last partial page zero-padded). Owns encoding and decoding them;
//! which pack holds a page is the packs' business, not the table's.

use std::io::Read;
use std::path::Path;

use super::error::{format_err, Result};
use super::format::{self, Cursor, PAGE_TABLE_MAGIC, PREFIX_LEN};
use super::ids::PageDigest;
use super::pack::PAGE_SIZE;

const WHAT: &str = "page table";
/// Largest pages file a table may describe (bounds what a hostile table can make
/// us allocate).
const MAX_FILE_SIZE: u64 = 1 << 40;

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

pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<PageTable> {
    format::check_prefix(bytes, PAGE_TABLE_MAGIC, WHAT, path)?;
    let mut dec = zstd::stream::read::Decoder::new(&bytes[PREFIX_LEN..])
        .map_err(|e| format_err(WHAT, path, format!("zstd: {e}")))?;
    let mut head = [0u8; 16];
    dec.read_exact(&mut head)
        .map_err(|e| format_err(WHAT, path, format!("cannot decompress: {e}")))?;
    let mut c = Cursor::new(&head);
    let (Some(file_size), Some(count)) = (c.u64(), c.u64()) else {
        return Err(format_err(WHAT, path, "short header"));
    };
    if file_size > MAX_FILE_SIZE {
        return Err(format_err(
            WHAT,
            path,
            format!("file size {file_size} is beyond the 1 TiB limit"),
        ));
    }
    if count != pages_for(file_size) {
        return Err(format_err(
            WHAT,
            path,
            format!("{count} pages cannot describe a file of {file_size} bytes"),
        ));
    }
    // Read what the header announces, never more: a hostile table cannot make us
    // allocate beyond its own decompressed size.
    let mut body = Vec::new();
    (&mut dec)
        .take(count.saturating_mul(32))
        .read_to_end(&mut body)
        .map_err(|e| format_err(WHAT, path, format!("cannot decompress: {e}")))?;
    if body.len() as u64 != count * 32 {
        return Err(format_err(
            WHAT,
            path,
            format!(
                "{count} pages announced, {} digests present",
                body.len() / 32
            ),
        ));
    }
    let mut extra = [0u8; 1];
    if matches!(dec.read(&mut extra), Ok(n) if n > 0) {
        return Err(format_err(WHAT, path, "trailing data after the digests"));
    }
    let digests = body
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            PageDigest(d)
        })
        .collect();
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
