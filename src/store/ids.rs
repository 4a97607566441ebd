//! Typed ids: `PageDigest` (sha256 of one 4 KiB page), `BlobDigest` (sha256 naming a
//! blob under `blobs/sha256/`) and `SnapshotId` (the content digest of a snapshot's
//! files). They are distinct types so one can never be passed where another is
//! expected (rustic's id newtypes). Nothing here touches the filesystem.

use std::fmt;

use sha2::{Digest, Sha256};

/// Number of hex characters a snapshot id is shown with.
pub const SHORT_ID_LEN: usize = 12;

/// Shortest id prefix `resolve` accepts.
pub const MIN_PREFIX_LEN: usize = 4;

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// sha256 of one page of a `pages-N.img` file (the last partial page zero-padded).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageDigest(pub(crate) [u8; 32]);

impl PageDigest {
    /// Digest of one page.
    pub fn of(page: &[u8]) -> PageDigest {
        PageDigest(Sha256::digest(page).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for PageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PageDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageDigest({})", self.to_hex())
    }
}

/// sha256 of a whole blob; shown as `sha256:<64 hex>` like an OCI descriptor digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobDigest(pub(crate) [u8; 32]);

impl BlobDigest {
    pub fn of(bytes: &[u8]) -> BlobDigest {
        BlobDigest(Sha256::digest(bytes).into())
    }

    pub(crate) fn from_hasher(h: Sha256) -> BlobDigest {
        BlobDigest(h.finalize().into())
    }

    /// Parses `sha256:<64 lowercase hex>` (an OCI descriptor digest).
    pub fn parse(s: &str) -> Option<BlobDigest> {
        parse_hex32(s.strip_prefix("sha256:")?).map(BlobDigest)
    }

    /// Parses a bare 64-hex name (a file name under `blobs/sha256/`).
    pub fn from_hex(s: &str) -> Option<BlobDigest> {
        parse_hex32(s).map(BlobDigest)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex characters, for messages where the full digest is noise.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(SHORT_ID_LEN);
        s
    }
}

impl fmt::Display for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for BlobDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobDigest({})", self.to_hex())
    }
}

/// A snapshot's id: sha256 over its files' (name, size, sha256) and its config.json
/// digest (see FORMAT.md). `Display` shows the 12-hex short form; `full()` gives 64.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub(crate) [u8; 32]);

impl SnapshotId {
    /// Parses the full 64-hex form (with or without a `sha256:` prefix).
    pub fn parse(s: &str) -> Option<SnapshotId> {
        parse_hex32(s.strip_prefix("sha256:").unwrap_or(s)).map(SnapshotId)
    }

    /// All 64 hex characters.
    pub fn full(&self) -> String {
        hex::encode(self.0)
    }

    /// The 12-hex form shown to people.
    pub fn short(&self) -> String {
        let mut s = self.full();
        s.truncate(SHORT_ID_LEN);
        s
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.full())
    }
}

impl serde::Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_show() {
        let d = BlobDigest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(BlobDigest::parse(&d.to_string()), Some(d));
        assert_eq!(BlobDigest::parse(&d.to_hex()), None);
        assert_eq!(BlobDigest::from_hex(&d.to_hex().to_uppercase()), None);
        let id = SnapshotId(d.0);
        assert_eq!(id.to_string(), "ba7816bf8f01");
        assert_eq!(SnapshotId::parse(&id.full()), Some(id));
        assert_eq!(
            SnapshotId::parse(&format!("sha256:{}", id.full())),
            Some(id)
        );
    }
}
