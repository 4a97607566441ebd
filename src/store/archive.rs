//! The "files" blob: every CRIU image file that is not a `pages-N.img` (inventory,
//! core, pagemap, fdinfo, ...), together in one zstd stream (measured: ~20 KB per
//! container, not worth deduplicating). A length-prefixed archive of name, size,
//! bytes; owns writing and reading it, and nothing about where the files come from.

use std::io::{self, Read, Write};
use std::path::Path;

use super::error::{format_err, Result};
use super::format::{self, limits::MAX_SMALL_FILE, FILES_MAGIC, PREFIX_LEN};

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
        if bytes.len() as u64 > MAX_SMALL_FILE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "file {name} is {} bytes, more than the {MAX_SMALL_FILE}-byte limit for a file kept in the files blob",
                    bytes.len()
                ),
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
    /// The previous entry's name: names must be strictly increasing.
    last: Option<String>,
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
            last: None,
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
        if self
            .last
            .as_ref()
            .is_some_and(|l| l.as_bytes() >= name.as_bytes())
        {
            return Err(format_err(
                WHAT,
                self.path,
                format!("entry {name:?} is out of order or repeated"),
            ));
        }
        let size = u64::from_le_bytes(s);
        if size > MAX_SMALL_FILE {
            return Err(format_err(
                WHAT,
                self.path,
                format!(
                    "entry {name:?} claims {size} bytes, more than the {MAX_SMALL_FILE}-byte limit"
                ),
            ));
        }
        self.last = Some(name.clone());
        Ok(Some((name, size)))
    }

    /// A reader over the current entry's bytes (the caller checks it got `size`;
    /// `size` is at most `MAX_SMALL_FILE`, and the caller streams it).
    pub(crate) fn content(&mut self, size: u64) -> impl Read + '_ {
        (&mut self.dec).take(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        // Entries in name order, as FORMAT.md requires and ingest writes them.
        let mut w = ArchiveWriter::new(Vec::new(), 3, 2).expect("new");
        w.add("core-1.img", &[7u8; 10000]).expect("add");
        w.add("inventory.img", b"inv").expect("add");
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
        assert_eq!(got[0].0, "core-1.img");
        assert_eq!(got[0].1, vec![7u8; 10000]);
    }

    #[test]
    fn refuses_unordered_repeated_and_oversized_entries() {
        let p = Path::new("f");
        let first_error = |bytes: &[u8]| -> String {
            let mut r = ArchiveReader::new(bytes, p).expect("reader");
            loop {
                match r.next_entry() {
                    Ok(Some((_, size))) => {
                        io::copy(&mut r.content(size), &mut io::sink()).expect("content");
                    }
                    Ok(None) => return String::new(),
                    Err(e) => return e.to_string(),
                }
            }
        };
        for names in [["b", "a"], ["a", "a"]] {
            let mut w = ArchiveWriter::new(Vec::new(), 3, 2).expect("new");
            for n in names {
                w.add(n, b"x").expect("add");
            }
            let e = first_error(&w.finish().expect("finish"));
            assert!(e.contains("out of order or repeated"), "{names:?}: {e}");
        }
        // An entry header claiming 10 GiB is refused before a byte is read.
        let mut raw = Vec::new();
        raw.extend_from_slice(&1u32.to_le_bytes());
        raw.extend_from_slice(&1u16.to_le_bytes());
        raw.extend_from_slice(b"a");
        raw.extend_from_slice(&(10u64 << 30).to_le_bytes());
        let mut blob = format::prefix(FILES_MAGIC).to_vec();
        blob.extend(zstd::bulk::compress(&raw, 3).expect("compress"));
        let e = first_error(&blob);
        assert!(e.contains("more than the 1073741824-byte limit"), "{e}");
    }
}
