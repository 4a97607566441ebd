//! The snapshot config blob (`application/vnd.stasis.checkpoint.config.v1+json`):
//! what the snapshot holds (every file's name, size, sha256, page table), the
//! container's config.json bytes, the caller's metadata and the sizes; and the
//! snapshot id computed from it. Owns their JSON shape and the id rule.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ids::SnapshotId;

/// Version of the config JSON; readers refuse another major.
pub(crate) const CONFIG_VERSION: &str = "1.0";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SnapshotConfig {
    pub(crate) format_version: String,
    /// Full 64-hex snapshot id.
    pub(crate) snapshot_id: String,
    /// RFC 3339 UTC.
    pub(crate) created: String,
    pub(crate) container: String,
    /// Every file of the CRIU image directory, sorted by name.
    pub(crate) files: Vec<FileRecord>,
    pub(crate) config_json: ConfigJson,
    pub(crate) sizes: Sizes,
    /// Free-form, from the caller: CRIU options and version, dump stats, host, timings.
    #[serde(default)]
    pub(crate) metadata: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileRecord {
    pub(crate) name: String,
    pub(crate) size: u64,
    /// Hex sha256 of the whole file.
    pub(crate) sha256: String,
    /// "pages" (a pages-N.img, stored as a page table + packs) or "file" (in the
    /// files blob).
    pub(crate) kind: String,
    /// For "pages": the page table blob's digest (`sha256:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) page_table: Option<String>,
}

pub(crate) const KIND_PAGES: &str = "pages";
pub(crate) const KIND_FILE: &str = "file";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConfigJson {
    pub(crate) size: u64,
    pub(crate) sha256: String,
    /// "utf8": `data` is the text itself; "base64": standard base64 with padding.
    pub(crate) encoding: String,
    pub(crate) data: String,
}

impl ConfigJson {
    pub(crate) fn new(bytes: &[u8]) -> ConfigJson {
        let (encoding, data) = match std::str::from_utf8(bytes) {
            Ok(s) => ("utf8", s.to_string()),
            Err(_) => (
                "base64",
                base64::engine::general_purpose::STANDARD.encode(bytes),
            ),
        };
        ConfigJson {
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
            encoding: encoding.to_string(),
            data,
        }
    }

    /// The exact bytes, checked against size and sha256.
    pub(crate) fn bytes(&self) -> Result<Vec<u8>, String> {
        let b = match self.encoding.as_str() {
            "utf8" => self.data.as_bytes().to_vec(),
            "base64" => base64::engine::general_purpose::STANDARD
                .decode(&self.data)
                .map_err(|e| format!("config.json is not valid base64: {e}"))?,
            other => return Err(format!("unknown config.json encoding {other:?}")),
        };
        if b.len() as u64 != self.size || hex::encode(Sha256::digest(&b)) != self.sha256 {
            return Err("config.json does not match its recorded size and sha256".into());
        }
        Ok(b)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Sizes {
    /// Sum of all file sizes of the image directory.
    pub(crate) image_bytes: u64,
    pub(crate) pages_total: u64,
    /// Pages stored by this snapshot (new to the store, each counted once).
    pub(crate) pages_new: u64,
    pub(crate) pages_reused: u64,
    /// Bytes of packs, page tables and files blob this snapshot added to the store
    /// (its own config and manifest, < 4 KiB, are not counted).
    pub(crate) bytes_added: u64,
    /// Time from the start of ingest to writing this config.
    pub(crate) ingest_ms: u64,
}

/// The snapshot id (FORMAT.md "Snapshot id"): sha256 of
/// `"stasis-snapshot-id-v1\n" | count u32 | { name_len u32 | name | size u64 | sha256[32] }
/// sorted by name | config_size u64 | config_sha256[32]`.
pub(crate) fn snapshot_id(
    files: &[(String, u64, [u8; 32])],
    config_json: (u64, [u8; 32]),
) -> SnapshotId {
    let mut sorted: Vec<&(String, u64, [u8; 32])> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = Sha256::new();
    h.update(b"stasis-snapshot-id-v1\n");
    h.update((sorted.len() as u32).to_le_bytes());
    for (name, size, digest) in sorted {
        h.update((name.len() as u32).to_le_bytes());
        h.update(name.as_bytes());
        h.update(size.to_le_bytes());
        h.update(digest);
    }
    h.update(config_json.0.to_le_bytes());
    h.update(config_json.1);
    SnapshotId(h.finalize().into())
}

impl SnapshotConfig {
    /// Recomputes the id from the recorded files and config.json digest.
    pub(crate) fn computed_id(&self) -> Result<SnapshotId, String> {
        let mut files = Vec::with_capacity(self.files.len());
        for f in &self.files {
            let mut d = [0u8; 32];
            hex::decode_to_slice(&f.sha256, &mut d)
                .map_err(|_| format!("file {} has a malformed sha256", f.name))?;
            files.push((f.name.clone(), f.size, d));
        }
        let mut c = [0u8; 32];
        hex::decode_to_slice(&self.config_json.sha256, &mut c)
            .map_err(|_| "config.json has a malformed sha256".to_string())?;
        Ok(snapshot_id(&files, (self.config_json.size, c)))
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<SnapshotConfig, String> {
        let c: SnapshotConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let major = c.format_version.split('.').next().unwrap_or("");
        if major != "1" {
            return Err(format!(
                "config format version {} is not supported (this stasis reads 1.x)",
                c.format_version
            ));
        }
        for f in &c.files {
            check_file_name(&f.name)?;
        }
        Ok(c)
    }
}

/// A file name of a CRIU image directory as a snapshot may record it: one path
/// component (not empty, no `/`, not `.` or `..`, no NUL). Names come from
/// archives too, and become paths under a restore's directory.
pub(crate) fn check_file_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("file name {name:?} is not allowed: {why}"));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.contains('/') {
        return bad("it holds a '/' (one path component only)");
    }
    if name == "." || name == ".." {
        return bad("it names a directory");
    }
    if name.contains('\0') {
        return bad("it holds a NUL byte");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_order_independent_and_config_sensitive() {
        let a = ("a".to_string(), 1, [1u8; 32]);
        let b = ("b".to_string(), 2, [2u8; 32]);
        let c = (0, [0u8; 32]);
        assert_eq!(
            snapshot_id(&[a.clone(), b.clone()], c),
            snapshot_id(&[b.clone(), a.clone()], c)
        );
        assert_ne!(
            snapshot_id(&[a.clone(), b.clone()], c),
            snapshot_id(&[a, b], (1, [0u8; 32]))
        );
    }

    #[test]
    fn only_single_component_file_names() {
        for ok in ["pages-1.img", "fs-manifest.json", "..x", ".hidden"] {
            assert_eq!(check_file_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "../../x", "/tmp/x", "a/b", ".", "..", "a\0b"] {
            assert!(check_file_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn config_json_exact_bytes() {
        for bytes in [&b"{\"a\": 1}\n"[..], &[0xff, 0xfe, 0x00][..]] {
            let c = ConfigJson::new(bytes);
            assert_eq!(c.bytes().expect("bytes"), bytes);
        }
        assert_eq!(ConfigJson::new(&[0xff]).encoding, "base64");
    }
}
