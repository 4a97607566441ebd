//! Filesystem helpers shared by fstree (capture, materialize) and copytree: the
//! `io` error adapter, C paths, extended attributes and applying an entry's
//! metadata (owner, mode, xattrs, times).

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use base64::Engine;

use super::fstree::{Entry, Kind};
use super::{Result, WorkflowError};

pub(super) fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> WorkflowError {
    let path = path.to_path_buf();
    move |source| WorkflowError::Io { op, path, source }
}

/// The extended attributes of `path` itself (not following a symlink), as raw
/// names and values; attributes that vanish while being read are left out.
pub(super) fn read_xattrs(path: &Path) -> Vec<(std::ffi::CString, Vec<u8>)> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Vec::new();
    };
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: llistxattr writes at most names.len() bytes into names.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut val = vec![0u8; 64 << 10];
    let mut out = Vec::new();
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        // SAFETY: lgetxattr writes at most val.len() bytes into val.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m >= 0 {
            out.push((cname, val[..m as usize].to_vec()));
        }
    }
    out
}

/// Sets one extended attribute on `path` itself (not following a symlink).
pub(super) fn set_xattr(
    path: &std::ffi::CStr,
    name: &std::ffi::CStr,
    val: &[u8],
) -> std::io::Result<()> {
    // SAFETY: valid path, name and value buffers for the duration of the call.
    let r = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            val.as_ptr().cast(),
            val.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn cpath(p: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| WorkflowError::Io {
        op: "encode path",
        path: p.to_path_buf(),
        source: std::io::Error::other("path contains a NUL byte"),
    })
}

pub(super) fn set_meta(p: &Path, e: &Entry) -> Result<()> {
    let c = cpath(p)?;
    // SAFETY: lchown/utimensat take a valid NUL-terminated path we own.
    unsafe {
        libc::lchown(c.as_ptr(), e.uid, e.gid);
    }
    if e.kind != Kind::Symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(e.mode)).map_err(io("chmod", p))?;
    }
    for (k, v) in &e.xattrs {
        let Ok(val) = base64::engine::general_purpose::STANDARD.decode(v) else {
            continue;
        };
        let Ok(ck) = std::ffi::CString::new(k.as_bytes()) else {
            continue;
        };
        // Best effort, as tar does: a filesystem that refuses an attribute
        // (e.g. trusted.* without CAP_SYS_ADMIN in its user namespace) loses it.
        let _ = set_xattr(&c, &ck, &val);
    }
    let ts = [
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_nsec as libc::c_long,
        },
        libc::timespec {
            tv_sec: e.mtime as libc::time_t,
            tv_nsec: e.mtime_nsec as libc::c_long,
        },
    ];
    // SAFETY: ts is a valid two-element array; the path is NUL-terminated.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}

/// Owner, mode (after the owner: chown clears set-id bits), xattrs and times.
pub(super) fn copy_meta(from: &Path, to: &Path, meta: &fs::Metadata) -> Result<()> {
    let c = cpath(to)?;
    // SAFETY: lchown takes a valid NUL-terminated path we own.
    if unsafe { libc::lchown(c.as_ptr(), meta.uid(), meta.gid()) } != 0 {
        return Err(WorkflowError::Io {
            op: "chown",
            path: to.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    if !meta.file_type().is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io("chmod", to))?;
    }
    copy_xattrs(from, to)?;
    let ts = [
        libc::timespec {
            tv_sec: meta.atime() as libc::time_t,
            tv_nsec: meta.atime_nsec() as libc::c_long,
        },
        libc::timespec {
            tv_sec: meta.mtime() as libc::time_t,
            tv_nsec: meta.mtime_nsec() as libc::c_long,
        },
    ];
    // SAFETY: ts is a valid two-element array; the path is NUL-terminated.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    Ok(())
}

fn copy_xattrs(from: &Path, to: &Path) -> Result<()> {
    let ct = cpath(to)?;
    for (name, val) in read_xattrs(from) {
        if let Err(e) = set_xattr(&ct, &name, &val) {
            // A filesystem without that namespace (e.g. trusted.* of an overlay
            // base on a filesystem that refuses it) loses only that attribute.
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                continue;
            }
            return Err(WorkflowError::Io {
                op: "set xattr on",
                path: to.to_path_buf(),
                source: std::io::Error::other(format!("{}: {e}", name.to_string_lossy())),
            });
        }
    }
    Ok(())
}
