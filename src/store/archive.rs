//! The "files" blob: every CRIU image file that is not a `pages-N.img` (inventory,
//! core, pagemap, fdinfo, ...), together in one zstd stream (STORE.md: ~20 KB per
//! container, not worth deduplicating). A length-prefixed archive of name, size,
//! bytes; owns writing and reading it, and nothing about where the files come from.

use std::io::{self, Read, Write};
use std::path::Path;

use super::error::{format_err, Result};
use super::format::{self, FILES_MAGIC, PREFIX_LEN};

const WHAT: &str = "files blob";
/// Longest file name accepted (a single path component).
pub(crate) const MAX_NAME: usize = 255;

/// Whether `name` is acceptable as an image file name: one path component, no NUL.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

/// Writes `prefix | zstd( count u32 | { name_len u16 | name | size u64 | bytes } * count )`.
pub(crate) struct ArchiveWriter<W: Write> {
    enc: zstd::stream::write::Encoder<'static, W>,
}

impl<W: Write> ArchiveWriter<W> {
    pub(crate) fn new(mut w: W, level: i32, count: u32) -> io::Result<Self> {
        w.write_all(&format::prefix(FILES_MAGIC))?;
        let mut enc = zstd::stream::write::Encoder::new(w, level)?;
        enc.write_all(&count.to_le_bytes())?;
        Ok(ArchiveWriter { enc })
    }

    pub(crate) fn add(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad file name {name:?}"),
            ));
        }
        self.enc.write_all(&(name.len() as u16).to_le_bytes())?;
        self.enc.write_all(name.as_bytes())?;
        self.enc.write_all(&(bytes.len() as u64).to_le_bytes())?;
        self.enc.write_all(bytes)
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        self.enc.finish()
    }
}

/// Streams entries out of a files blob.
pub(crate) struct ArchiveReader<'p, R: Read> {
    dec: zstd::stream::read::Decoder<'static, io::BufReader<R>>,
    remaining: u32,
    path: &'p Path,
}

impl<'p, R: Read> ArchiveReader<'p, R> {
    pub(crate) fn new(mut r: R, path: &'p Path) -> Result<Self> {
        let mut p = [0u8; PREFIX_LEN];
        r.read_exact(&mut p)
            .map_err(|e| format_err(WHAT, path, format!("cannot read prefix: {e}")))?;
        format::check_prefix(&p, FILES_MAGIC, WHAT, path)?;
        let mut dec = zstd::stream::read::Decoder::new(r)
            .map_err(|e| format_err(WHAT, path, format!("zstd: {e}")))?;
        let mut c = [0u8; 4];
        dec.read_exact(&mut c)
            .map_err(|e| format_err(WHAT, path, format!("cannot decompress: {e}")))?;
        Ok(ArchiveReader {
            dec,
            remaining: u32::from_le_bytes(c),
            path,
        })
    }

    /// The next entry's name and size; its bytes must then be read with `content`
    /// (exactly `size` bytes) before the next call.
    pub(crate) fn next_entry(&mut self) -> Result<Option<(String, u64)>> {
        if self.remaining == 0 {
            let mut extra = [0u8; 1];
            return match self.dec.read(&mut extra) {
                Ok(0) => Ok(None),
                Ok(_) => Err(format_err(
                    WHAT,
                    self.path,
                    "trailing data after the last entry",
                )),
                Err(e) => Err(format_err(
                    WHAT,
                    self.path,
                    format!("cannot decompress: {e}"),
                )),
            };
        }
        self.remaining -= 1;
        let bad = |e: io::Error| {
            format_err(
                WHAT,
                self.path,
                format!("cannot decompress entry header: {e}"),
            )
        };
        let mut l = [0u8; 2];
        self.dec.read_exact(&mut l).map_err(bad)?;
        let mut name = vec![0u8; u16::from_le_bytes(l) as usize];
        self.dec.read_exact(&mut name).map_err(bad)?;
        let mut s = [0u8; 8];
        self.dec.read_exact(&mut s).map_err(bad)?;
        let name = String::from_utf8(name)
            .ok()
            .filter(|n| valid_name(n))
            .ok_or_else(|| format_err(WHAT, self.path, "entry with an invalid file name"))?;
        Ok(Some((name, u64::from_le_bytes(s))))
    }

    /// A reader over the current entry's bytes (the caller checks it got `size`).
    pub(crate) fn content(&mut self, size: u64) -> impl Read + '_ {
        (&mut self.dec).take(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = ArchiveWriter::new(Vec::new(), 3, 2).expect("new");
        w.add("inventory.img", b"inv").expect("add");
        w.add("core-1.img", &[7u8; 10000]).expect("add");
        assert!(w.add("../x", b"").is_err());
        let bytes = w.finish().expect("finish");
        let p = Path::new("f");
        let mut r = ArchiveReader::new(&bytes[..], p).expect("reader");
        let mut got = Vec::new();
        while let Some((name, size)) = r.next_entry().expect("entry") {
            let mut b = Vec::new();
            r.content(size).read_to_end(&mut b).expect("read");
            got.push((name, b));
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, "core-1.img");
        assert_eq!(got[1].1, vec![7u8; 10000]);
    }
}
