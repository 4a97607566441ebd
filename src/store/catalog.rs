//! The snapshot catalog held in `index.json`: grouping manifest descriptors into
//! snapshots, tag syntax, resolving a tag or id prefix, and the pure edits of the
//! index (tag, untag, add or drop a root). Reading and writing the file, and the
//! locks around it, belong to `layout` and `Store`.

use std::collections::BTreeMap;

use super::error::{Result, StoreError};
use super::ids::{BlobDigest, SnapshotId, MIN_PREFIX_LEN};
use super::layout::{
    Descriptor, Index, A_ADDED_BYTES, A_CONTAINER, A_CREATED, A_IMAGE_BYTES, A_ORIGIN, A_REF_NAME,
    ORIGIN_IMPORTED, ORIGIN_LOCAL,
};
use super::Origin;

/// One snapshot as index.json describes it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) id: SnapshotId,
    pub(crate) manifest: BlobDigest,
    /// The descriptor of its manifest (annotations included), without a tag.
    pub(crate) descriptor: Descriptor,
    pub(crate) tags: Vec<String>,
    pub(crate) created: String,
    pub(crate) container: String,
    pub(crate) image_bytes: u64,
    pub(crate) added_bytes: u64,
    /// Local only when every descriptor of the snapshot says so.
    pub(crate) origin: Origin,
}

/// The origin a root descriptor records (see `layout::A_ORIGIN`).
pub(crate) fn origin_of(d: &Descriptor) -> Origin {
    match d.annotation(A_ORIGIN) {
        ORIGIN_LOCAL => Origin::Local,
        ORIGIN_IMPORTED => Origin::Imported,
        _ => Origin::Unknown,
    }
}

/// Snapshots in index.json, oldest first. Descriptors without a stasis snapshot id
/// (foreign manifests) are not snapshots; gc still treats them as roots.
pub(crate) fn entries(index: &Index) -> Vec<Entry> {
    let mut by_id: BTreeMap<SnapshotId, Entry> = BTreeMap::new();
    for d in &index.manifests {
        let (Some(id), Some(manifest)) = (d.snapshot_id(), d.blob()) else {
            continue;
        };
        let e = by_id.entry(id).or_insert_with(|| {
            let mut descriptor = d.clone();
            descriptor.annotations.remove(A_REF_NAME);
            Entry {
                id,
                manifest,
                descriptor,
                tags: Vec::new(),
                created: d.annotation(A_CREATED).to_string(),
                container: d.annotation(A_CONTAINER).to_string(),
                image_bytes: d.annotation(A_IMAGE_BYTES).parse().unwrap_or(0),
                added_bytes: d.annotation(A_ADDED_BYTES).parse().unwrap_or(0),
                origin: origin_of(d),
            }
        });
        if origin_of(d) != Origin::Local {
            e.origin = e.origin.min(origin_of(d));
        }
        if let Some(t) = d.tag() {
            e.tags.push(t.to_string());
        }
    }
    let mut v: Vec<Entry> = by_id.into_values().collect();
    for e in &mut v {
        e.tags.sort();
        e.tags.dedup();
    }
    v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    v
}

/// Checks `NAME[:VER]` and returns `NAME:VER` (VER defaults to `latest`). NAME:
/// letters, digits, `.`, `_`, `-`, `/`, starting with a letter or digit, at most
/// 128; VER: letters, digits, `.`, `_`, `-`, not starting with `.` or `-`, at most 128.
pub(crate) fn normalize_tag(tag: &str) -> Result<String> {
    let bad = |reason: &str| StoreError::InvalidTag {
        tag: tag.to_string(),
        reason: reason.to_string(),
    };
    let (name, ver) = match tag.split_once(':') {
        Some((n, v)) => (n, v),
        None => (tag, "latest"),
    };
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if name.len() > 128 || ver.len() > 128 {
        return Err(bad("name and version are at most 128 characters each"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(bad("the name must start with a letter or digit"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(bad(
            "the name may hold only letters, digits, '.', '_', '-' and '/'",
        ));
    }
    if name == "sha256" {
        return Err(bad("\"sha256\" is reserved for ids"));
    }
    if ver.is_empty() {
        return Err(bad("the version after ':' is empty"));
    }
    if ver.starts_with(['.', '-'])
        || !ver
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad("the version may hold only letters, digits, '.', '_' and '-', and not start with '.' or '-'"));
    }
    Ok(format!("{name}:{ver}"))
}

fn describe(e: &Entry) -> String {
    if e.tags.is_empty() {
        format!("{} (untagged, {})", e.id, e.created)
    } else {
        format!("{} ({})", e.id, e.tags.join(", "))
    }
}

/// Resolves a tag (`NAME` = `NAME:latest`, or `NAME:VER`) or an id prefix of at least
/// 4 hex characters (optionally `sha256:`-prefixed). Tags win over id prefixes.
pub(crate) fn resolve(index: &Index, q: &str) -> Result<SnapshotId> {
    let all = entries(index);
    let q = q.trim();
    let unknown = |hint: String| StoreError::UnknownSnapshot {
        name: q.to_string(),
        hint,
        store: None,
    };
    let (id_only, prefix) = match q.strip_prefix("sha256:") {
        Some(rest) => (true, rest),
        None => (false, q),
    };
    if !id_only {
        if let Ok(tag) = normalize_tag(q) {
            if let Some(e) = all.iter().find(|e| e.tags.contains(&tag)) {
                return Ok(e.id);
            }
        }
    }
    let is_hex = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hex && prefix.len() >= MIN_PREFIX_LEN {
        let p = prefix.to_ascii_lowercase();
        let hits: Vec<&Entry> = all.iter().filter(|e| e.id.full().starts_with(&p)).collect();
        match hits.len() {
            1 => return Ok(hits[0].id),
            0 => {}
            _ => {
                return Err(StoreError::AmbiguousId {
                    prefix: q.to_string(),
                    candidates: hits.iter().map(|e| describe(e)).collect(),
                })
            }
        }
    }
    // Not found: say what is there.
    let name = q.split_once(':').map(|(n, _)| n).unwrap_or(q);
    let same_name: Vec<&String> = all
        .iter()
        .flat_map(|e| e.tags.iter())
        .filter(|t| t.split_once(':').map(|(n, _)| n) == Some(name))
        .collect();
    let hint = if !same_name.is_empty() {
        format!(
            "; tags named {name}: {}",
            same_name
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else if is_hex && prefix.len() < MIN_PREFIX_LEN && !id_only {
        format!("; an id prefix needs at least {MIN_PREFIX_LEN} hex characters")
    } else if all.is_empty() {
        "; the store has no snapshots".to_string()
    } else {
        let mut tags: Vec<&str> = all
            .iter()
            .flat_map(|e| e.tags.iter().map(String::as_str))
            .collect();
        tags.sort_unstable();
        let more = tags.len().saturating_sub(10);
        tags.truncate(10);
        let mut s = if tags.is_empty() {
            format!(
                "; it holds {} untagged snapshot(s), see `stasis snapshot ls`",
                all.len()
            )
        } else {
            format!("; known tags: {}", tags.join(", "))
        };
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        s
    };
    Err(unknown(hint))
}

/// Removes `tag` from whatever holds it. A snapshot left without descriptors keeps
/// an untagged root (moving a tag never loses a snapshot).
fn detach_tag(index: &mut Index, tag: &str) {
    let Some(pos) = index.manifests.iter().position(|d| d.tag() == Some(tag)) else {
        return;
    };
    let old = index.manifests.remove(pos);
    let id = old.snapshot_id();
    if id.is_some() && !index.manifests.iter().any(|d| d.snapshot_id() == id) {
        let mut root = old;
        root.annotations.remove(A_REF_NAME);
        index.manifests.insert(pos, root);
    }
}

/// Points `tag` (normalized) at the snapshot described by `root` (a descriptor
/// without a tag). Replaces the snapshot's untagged root if it had one.
pub(crate) fn set_tag(index: &mut Index, root: &Descriptor, tag: &str) {
    detach_tag(index, tag);
    let id = root.snapshot_id();
    index
        .manifests
        .retain(|d| !(d.snapshot_id() == id && d.tag().is_none()));
    let mut d = root.clone();
    d.annotations
        .insert(A_REF_NAME.to_string(), tag.to_string());
    index.manifests.push(d);
}

/// Adds an untagged root for the snapshot unless it already has a descriptor.
pub(crate) fn add_root(index: &mut Index, root: &Descriptor) {
    let id = root.snapshot_id();
    if !index.manifests.iter().any(|d| d.snapshot_id() == id) {
        let mut d = root.clone();
        d.annotations.remove(A_REF_NAME);
        index.manifests.push(d);
    }
}

/// Drops every descriptor of a snapshot; returns the tags it had.
/// Points every descriptor of snapshot `id` (each tag and the untagged root) at
/// the manifest `root` names instead, keeping the tags. Used when a snapshot's
/// manifest is rewritten (a damaged one replaced by an equivalent, sound one).
pub(crate) fn replace_root(index: &mut Index, id: &SnapshotId, root: &Descriptor) {
    for d in index.manifests.iter_mut() {
        if d.snapshot_id().as_ref() == Some(id) {
            let tag = d.tag().map(String::from);
            *d = root.clone();
            d.annotations.remove(A_REF_NAME);
            if let Some(t) = tag {
                d.annotations.insert(A_REF_NAME.to_string(), t);
            }
        }
    }
}

pub(crate) fn drop_snapshot(index: &mut Index, id: &SnapshotId) -> Vec<String> {
    let mut tags = Vec::new();
    index.manifests.retain(|d| {
        if d.snapshot_id().as_ref() == Some(id) {
            if let Some(t) = d.tag() {
                tags.push(t.to_string());
            }
            false
        } else {
            true
        }
    });
    tags.sort();
    tags
}

/// Removes one tag. Returns the snapshot it pointed at and whether that snapshot
/// has any descriptor left.
pub(crate) fn drop_tag(index: &mut Index, tag: &str) -> Option<(SnapshotId, bool)> {
    let pos = index.manifests.iter().position(|d| d.tag() == Some(tag))?;
    let d = index.manifests.remove(pos);
    let id = d.snapshot_id()?;
    let left = index.manifests.iter().any(|d| d.snapshot_id() == Some(id));
    Some((id, left))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_rules() {
        assert_eq!(normalize_tag("redis").ok().as_deref(), Some("redis:latest"));
        assert_eq!(
            normalize_tag("a/b.c_d-e:v1.2").ok().as_deref(),
            Some("a/b.c_d-e:v1.2")
        );
        for bad in [
            "", ":x", "-a", "a:", "a:-x", "a b", "a:b:c", "sha256", "a:b/c",
        ] {
            assert!(normalize_tag(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            normalize_tag("a b").err().map(|e| e.to_string()).as_deref(),
            Some("invalid tag \"a b\": the name may hold only letters, digits, '.', '_', '-' and '/'")
        );
    }
}
