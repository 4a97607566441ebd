//! Filesystem helpers shared by fstree (capture, materialize) and copytree: the
//! `io` error adapter, extended attributes and applying an entry's metadata
//! (owner, mode, xattrs, times) to a created entry.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::fcntl::AtFlags;
use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};

use super::{Result, WorkflowError};

pub(super) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError {
    let path = path.to_path_buf();
    move |source| WorkflowError::Io { op, path, source }
}

/// The extended attributes of `path` itself (not following a symlink), as raw
/// names and values; attributes that vanish while being read are left out, and
/// a filesystem without xattr support has none.
pub(super) fn read_xattrs(path: &Path) -> Vec<(OsString, Vec<u8>)> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    names
        .filter_map(|name| {
            let val = xattr::get(path, &name).ok()??;
            Some((name, val))
        })
        .collect()
}

/// What `apply_meta` sets on a created entry.
pub(super) struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (and set-id, sticky); ignored for a symlink.
    pub mode: u32,
    pub symlink: bool,
    /// (seconds, nanoseconds) since the epoch.
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub xattrs: Vec<(OsString, Vec<u8>)>,
}

impl Meta {
    /// The metadata of an existing entry (what `copy_tree` copies).
    pub fn of(meta: &fs::Metadata, xattrs: Vec<(OsString, Vec<u8>)>) -> Meta {
        Meta {
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.mode(),
            symlink: meta.file_type().is_symlink(),
            atime: (meta.atime(), meta.atime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            xattrs,
        }
    }
}

/// Sets owner, mode (after the owner: chown clears set-id bits), xattrs and
/// times on `p` itself (never through a symlink).
///
/// One policy for restore (fstree) and copy (copytree): a failed chown or utimes
/// is an error, since stasis restores as root and a tree with the wrong owner
/// must not pass silently (files the container's user cannot write, or root's
/// files it can). An extended attribute the target filesystem does not support
/// (ENOTSUP) or will not let us set (EPERM, e.g. trusted.* in a user namespace)
/// is left out with a warning, as tar does; any other xattr failure is an error.
pub(super) fn apply_meta(p: &Path, m: &Meta) -> Result<()> {
    fchownat(
        None,
        p,
        Some(Uid::from_raw(m.uid)),
        Some(Gid::from_raw(m.gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| WorkflowError::Io {
        op: "chown",
        path: p.to_path_buf(),
        source: std::io::Error::other(format!(
            "to {}:{}: {e}; restoring a tree's owners needs root and a writable filesystem that keeps owners",
            m.uid, m.gid
        )),
    })?;
    if !m.symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(m.mode & 0o7777))
            .map_err(io("chmod", p))?;
    }
    for (name, val) in &m.xattrs {
        if let Err(e) = xattr::set(p, name, val) {
            if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) {
                tracing::warn!(path = %p.display(), xattr = %name.to_string_lossy(), error = %e, "extended attribute not restored");
                continue;
            }
            return Err(WorkflowError::Io {
                op: "set xattr on",
                path: p.to_path_buf(),
                source: std::io::Error::other(format!("{}: {e}", name.to_string_lossy())),
            });
        }
    }
    let ts = |(s, ns): (i64, i64)| TimeSpec::new(s, ns);
    utimensat(
        None,
        p,
        &ts(m.atime),
        &ts(m.mtime),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| WorkflowError::Io {
        op: "set the times of",
        path: p.to_path_buf(),
        source: e.into(),
    })
}

/// Creates the device node, FIFO or socket `p` (`mode`'s permission bits, less
/// the umask, until `apply_meta` sets them).
pub(super) fn make_node(p: &Path, kind: SFlag, mode: u32, rdev: u64) -> Result<()> {
    mknod(
        p,
        kind,
        Mode::from_bits_truncate(mode & 0o7777),
        rdev as libc::dev_t,
    )
    .map_err(|e| WorkflowError::Io {
        op: "mknod",
        path: p.to_path_buf(),
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, umount2, MntFlags, MsFlags};

    fn meta(symlink: bool, xattrs: Vec<(OsString, Vec<u8>)>) -> Meta {
        Meta {
            uid: 1234,
            gid: 1234,
            mode: 0o640,
            symlink,
            atime: (1_000_000, 5),
            mtime: (1_000_000, 5),
            xattrs,
        }
    }

    /// Unmounts on drop, so a failed assertion leaves no mount behind.
    struct Mounted<'a>(&'a Path);
    impl Drop for Mounted<'_> {
        fn drop(&mut self) {
            let _ = umount2(self.0, MntFlags::MNT_DETACH);
        }
    }

    /// Before the one policy, materialize ignored a failed lchown: a symlink
    /// (no chmod) on a read-only filesystem "restored" without its owner.
    #[test]
    fn a_failed_chown_is_an_error_even_for_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("m");
        fs::create_dir(&m).unwrap();
        mount(
            Some("tmpfs"),
            &m,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let _guard = Mounted(&m);
        std::os::unix::fs::symlink("target", m.join("l")).unwrap();
        let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, &m, None::<&str>, ro, None::<&str>).unwrap();
        let e = apply_meta(&m.join("l"), &meta(true, Vec::new())).unwrap_err();
        assert!(e.to_string().contains("chown"), "{e}");
    }

    #[test]
    fn an_unsupported_xattr_is_skipped_and_any_other_failure_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        // No such namespace: EOPNOTSUPP, the attribute alone is lost.
        let odd = vec![("nonamespace.k".into(), b"v".to_vec())];
        apply_meta(&f, &meta(false, odd)).unwrap();
        let md = fs::metadata(&f).unwrap();
        assert_eq!((md.uid(), md.mode() & 0o7777), (1234, 0o640));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000, 5));
        // Larger than any xattr may be (E2BIG): refused, not silently lost.
        let big = vec![("user.big".into(), vec![7u8; 70_000])];
        let e = apply_meta(&f, &meta(false, big)).unwrap_err();
        assert!(e.to_string().contains("user.big"), "{e}");
    }
}
