//! The fixed 16-byte prefix every binary blob starts with (magic, version, flags),
//! readable without decoding the body, and the version check that refuses unknown
//! major versions (Firecracker's lesson: never decode a body to learn its version).

use std::path::Path;

use super::error::{format_err, Result, StoreError};

pub(crate) const PREFIX_LEN: usize = 16;

/// Major and minor version written into new blobs; readers accept any minor of
/// `MAJOR` and refuse every other major.
pub(crate) const MAJOR: u16 = 1;
pub(crate) const MINOR: u16 = 0;

pub(crate) const PACK_MAGIC: &[u8; 8] = b"STASPACK";
pub(crate) const PAGE_TABLE_MAGIC: &[u8; 8] = b"STASPTBL";
pub(crate) const FILES_MAGIC: &[u8; 8] = b"STASFILE";

/// Limits on what stored data may claim (FORMAT.md "Limits"). Everything read from
/// a blob or an archive is checked against these and against the real size of what
/// holds it before any memory is sized by it, so a hostile blob cannot make a reader
/// allocate more than a constant.
pub(crate) mod limits {
    /// Largest JSON document (manifest, config blob, index.json, oci-layout) read
    /// into memory and parsed. Real ones are a few KiB to a few MiB.
    pub(crate) const MAX_JSON: u64 = 16 << 20;
    /// Largest config blob: it holds free-form metadata parsed into a
    /// `serde_json::Value` (up to ~32 bytes of memory per byte of JSON), so it gets
    /// a tighter bound than the typed documents. Ingest refuses to write a larger one.
    pub(crate) const MAX_CONFIG: u64 = 4 << 20;

    /// The limit for a whole-read JSON blob of kind `what`.
    pub(crate) fn json_limit(what: &str) -> u64 {
        if what == "config" {
            MAX_CONFIG
        } else {
            MAX_JSON
        }
    }
    /// Largest file kept in the files blob (CRIU's small images, fs-manifest.json);
    /// its content is streamed, never buffered whole.
    pub(crate) const MAX_SMALL_FILE: u64 = 1 << 30;
    /// Largest small file `Store::read_file` returns in memory.
    pub(crate) const MAX_READ_FILE: u64 = 256 << 20;
    /// Largest pages file a page table may describe.
    pub(crate) const MAX_PAGES_FILE: u64 = 1 << 40;
    /// Most blobs one import archive may hold (a 1 TiB snapshot has ~16k packs).
    pub(crate) const MAX_IMPORT_BLOBS: usize = 1 << 17;
}

/// `magic[8] | version u32 LE (major << 16 | minor) | flags u32 LE (0)`.
pub(crate) fn prefix(magic: &[u8; 8]) -> [u8; PREFIX_LEN] {
    let mut p = [0u8; PREFIX_LEN];
    p[..8].copy_from_slice(magic);
    let version = (u32::from(MAJOR) << 16) | u32::from(MINOR);
    p[8..12].copy_from_slice(&version.to_le_bytes());
    p
}

/// Checks magic and major version; returns (major, minor).
pub(crate) fn check_prefix(
    bytes: &[u8],
    magic: &[u8; 8],
    what: &'static str,
    path: &Path,
) -> Result<(u16, u16)> {
    if bytes.len() < PREFIX_LEN {
        return Err(format_err(
            what,
            path,
            format!("only {} bytes long", bytes.len()),
        ));
    }
    if &bytes[..8] != magic {
        return Err(format_err(
            what,
            path,
            format!(
                "wrong magic {:?} (expected {:?})",
                String::from_utf8_lossy(&bytes[..8]),
                String::from_utf8_lossy(magic)
            ),
        ));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
    if major != MAJOR {
        return Err(StoreError::UnsupportedVersion {
            what,
            path: path.to_path_buf(),
            major,
            minor,
            supported: MAJOR,
        });
    }
    Ok((major, minor))
}

/// Little-endian field readers over a byte slice that fail instead of panicking.
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    pub(crate) fn digest(&mut self) -> Option<[u8; 32]> {
        let b = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(b);
        Some(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unknown_major() {
        let p = Path::new("x");
        let mut b = prefix(PACK_MAGIC);
        assert_eq!(check_prefix(&b, PACK_MAGIC, "pack", p).ok(), Some((1, 0)));
        b[8..12].copy_from_slice(&((2u32 << 16) | 3).to_le_bytes());
        let e = check_prefix(&b, PACK_MAGIC, "pack", p)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("x is a pack of format version 2.3; this stasis reads major version 1 only")
        );
        b[8..12].copy_from_slice(&((1u32 << 16) | 7).to_le_bytes());
        assert!(check_prefix(&b, PACK_MAGIC, "pack", p).is_ok());
        assert!(check_prefix(&b, FILES_MAGIC, "files blob", p).is_err());
    }
}
