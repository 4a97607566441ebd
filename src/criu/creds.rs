//! The capabilities CRIU gives restored processes: CRIU restores each task's
//! credentials from its image (`core-<tid>.img`: `core_entry.thread_core.creds`,
//! CRIU 4.x core.proto and creds.proto), so a snapshot made elsewhere decides
//! them, whatever the container's config.json says. Owns reading them; a small
//! bounded protobuf walk, no generated types.

use std::fs;
use std::path::Path;

use super::{varint, CriuError};

/// Capability names by number (linux/capability.h); also the list `features`
/// reports.
pub const CAP_NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A core image is a few KiB; anything this large is not one.
const MAX_CORE_IMAGE: u64 = 16 << 20;

/// The names of every capability any task of the image in `dir` would hold
/// after a restore, in any of its sets (inheritable, permitted, effective,
/// bounding, ambient), sorted by number. Unknown bits are named `CAP_<n>`.
pub fn image_capabilities(dir: &Path) -> Result<Vec<String>, CriuError> {
    let io = |source| CriuError::Io {
        op: "read image",
        source,
    };
    let mut mask: u128 = 0;
    for e in fs::read_dir(dir).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("core-") && name.ends_with(".img")) {
            continue;
        }
        let path = e.path();
        let bad = |reason: String| CriuError::Image {
            path: path.clone(),
            reason,
        };
        let len = e.metadata().map_err(io)?.len();
        if len > MAX_CORE_IMAGE {
            return Err(bad(format!("{len} bytes, larger than any core image")));
        }
        let b = fs::read(&path).map_err(io)?;
        mask |= core_caps(&b).ok_or_else(|| bad("not a CRIU core image".into()))?;
    }
    Ok((0..128)
        .filter(|i| mask & (1u128 << i) != 0)
        .map(|i| {
            CAP_NAMES
                .get(i)
                .map_or_else(|| format!("CAP_{i}"), |n| (*n).to_string())
        })
        .collect())
}

/// The union of the capability sets of one core image (two magics, a u32 size,
/// a `core_entry`).
fn core_caps(b: &[u8]) -> Option<u128> {
    let size = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    let core = b.get(12..12usize.checked_add(size)?)?;
    let mut mask = 0;
    // core_entry.thread_core = 5; thread_core_entry.creds = 10.
    for thread_core in fields(core, 5)? {
        for creds in fields(thread_core, 10)? {
            mask |= creds_caps(creds)?;
        }
    }
    Some(mask)
}

/// creds_entry: cap_inh 9, cap_prm 10, cap_eff 11, cap_bnd 12, cap_amb 19, each a
/// repeated uint32 of 32-bit words (unpacked or packed).
fn creds_caps(b: &[u8]) -> Option<u128> {
    let mut mask = 0u128;
    let mut word = [0usize; 20];
    let mut i = 0;
    while i < b.len() {
        let (key, n) = varint(&b[i..])?;
        i += n;
        let (num, wt) = ((key >> 3) as usize, key & 7);
        let is_cap = matches!(num, 9..=12 | 19);
        match wt {
            0 => {
                let (v, n) = varint(&b[i..])?;
                i += n;
                if is_cap {
                    mask |= add_word(v, &mut word[num]);
                }
            }
            2 => {
                let (len, n) = varint(&b[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let body = b.get(i..end)?;
                i = end;
                if is_cap {
                    let mut j = 0;
                    while j < body.len() {
                        let (v, n) = varint(&body[j..])?;
                        j += n;
                        mask |= add_word(v, &mut word[num]);
                    }
                }
            }
            1 => i = i.checked_add(8)?,
            5 => i = i.checked_add(4)?,
            _ => return None,
        }
    }
    (i == b.len()).then_some(mask)
}

/// Word `*k` of a capability set as bits of the mask; advances `*k`.
fn add_word(v: u64, k: &mut usize) -> u128 {
    let shift = 32 * *k;
    *k += 1;
    if shift >= 128 {
        return 0;
    }
    u128::from(v & 0xffff_ffff) << shift
}

/// The bodies of every length-delimited field `want` of a message.
fn fields(b: &[u8], want: u64) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (key, n) = varint(&b[i..])?;
        i += n;
        match key & 7 {
            0 => i += varint(&b[i..])?.1,
            1 => i = i.checked_add(8)?,
            5 => i = i.checked_add(4)?,
            2 => {
                let (len, n) = varint(&b[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?)?;
                let body = b.get(i..end)?;
                if key >> 3 == want {
                    out.push(body);
                }
                i = end;
            }
            _ => return None,
        }
    }
    (i == b.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(num: u64, wt: u64) -> u8 {
        (num << 3 | wt) as u8
    }

    fn len_field(num: u64, body: &[u8]) -> Vec<u8> {
        let mut v = vec![key(num, 2), body.len() as u8];
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn caps_of_every_set_unpacked_and_packed() {
        // uid 0, cap_eff [1 << 5 (KILL)], cap_bnd packed [1 << 21 (SYS_ADMIN), 1 (MAC_OVERRIDE)].
        let mut creds = vec![key(1, 0), 0, key(11, 0), 0x20];
        creds.extend(len_field(12, &[0x80, 0x80, 0x80, 0x01, 0x01]));
        let thread_core = len_field(10, &creds);
        let core = len_field(5, &thread_core);
        let mut img = vec![0u8; 8];
        img.extend((core.len() as u32).to_le_bytes());
        img.extend(&core);
        let mask = core_caps(&img).expect("parse");
        assert_eq!(mask, (1 << 5) | (1 << 21) | (1 << 32));
        assert!(
            core_caps(&img[..img.len() - 1]).is_none(),
            "truncated accepted"
        );
    }
}
