//! A private full copy of a directory tree, for `restore --copy-rootfs` where an
//! overlay cannot be used: every file is reflinked (FICLONE, shares blocks until
//! written, as `cp --reflink=auto` does) where the filesystem can, else copied
//! extent by extent so holes stay holes. Modes, owners, times, xattrs, symlinks,
//! hard links, device nodes, fifos and empty directories are kept.
//!
//! Reads only `src`; writes only under `dst`, which must not exist yet.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::fsutil::{apply_meta, io, make_node, read_xattrs, Meta};
use super::Result;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    /// Files whose blocks are shared with the source (FICLONE).
    pub reflinked: u64,
    /// Bytes of data copied (not reflinked, holes not counted).
    pub bytes_copied: u64,
}

/// Copies the tree at `src` to `dst` (created; its parent must exist).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, fs::Metadata, PathBuf)> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(rel) = stack.pop() {
        let from = src.join(&rel);
        let to = dst.join(&rel);
        let meta = fs::symlink_metadata(&from).map_err(io("stat", &from))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(io("create directory", &to))?;
            for d in fs::read_dir(&from).map_err(io("read directory", &from))? {
                let d = d.map_err(io("read directory", &from))?;
                stack.push(rel.join(d.file_name()));
            }
            // Applied deepest first once the tree is built, so read-only
            // directories and their mtimes stick.
            dirs.push((to, meta, from));
            continue;
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    fs::hard_link(first, &to).map_err(io("create hard link", &to))?;
                    continue;
                }
                links.insert(key, to.clone());
            }
            stats.files += 1;
            if copy_file(&from, &to, meta.len(), &mut buf, &mut stats)? {
                stats.reflinked += 1;
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io("read link", &from))?;
            std::os::unix::fs::symlink(&target, &to).map_err(io("create symlink", &to))?;
        } else {
            let kind = if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else if ft.is_block_device() {
                nix::sys::stat::SFlag::S_IFBLK
            } else if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else if ft.is_socket() {
                nix::sys::stat::SFlag::S_IFSOCK
            } else {
                continue;
            };
            make_node(&to, kind, meta.mode(), meta.rdev())?;
        }
        apply_meta(&to, &Meta::of(&meta, read_xattrs(&from)))?;
    }
    for (to, meta, from) in dirs.iter().rev() {
        apply_meta(to, &Meta::of(meta, read_xattrs(from)))?;
    }
    Ok(stats)
}

/// Reflinks `from` to `to`, else copies its data extents (holes stay holes).
/// Returns whether the blocks are shared.
fn copy_file(
    from: &Path,
    to: &Path,
    len: u64,
    buf: &mut [u8],
    stats: &mut CopyStats,
) -> Result<bool> {
    let mut src = File::open(from).map_err(io("open", from))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(io("create", to))?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both
    // descriptors are open for the duration of the call and no memory is passed.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    // Not a reflink-capable filesystem (EOPNOTSUPP, EXDEV across filesystems,
    // EINVAL, ENOTTY): a plain copy of the data extents.
    let mut pos = 0u64;
    while pos < len {
        let (start, end) = match data_extent(&src, pos) {
            Some(x) => x,
            None => break,
        };
        let end = end.min(len);
        src.seek(SeekFrom::Start(start)).map_err(io("seek", from))?;
        dst.seek(SeekFrom::Start(start)).map_err(io("seek", to))?;
        let mut left = end.saturating_sub(start);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..n]).map_err(io("read", from))?;
            dst.write_all(&buf[..n]).map_err(io("write", to))?;
            left -= n as u64;
            stats.bytes_copied += n as u64;
        }
        pos = end;
    }
    dst.set_len(len).map_err(io("truncate", to))?;
    Ok(false)
}

/// The next data extent at or after `pos` (SEEK_DATA / SEEK_HOLE), or the rest
/// of the file where the filesystem cannot tell; None past the last data.
fn data_extent(f: &File, pos: u64) -> Option<(u64, u64)> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let fd = f.as_raw_fd();
    let start = match lseek(fd, pos as libc::off_t, Whence::SeekData) {
        Ok(start) => start,
        // No data after pos.
        Err(Errno::ENXIO) => return None,
        // No hole support: copy it all.
        Err(_) => return Some((pos, u64::MAX)),
    };
    let end = lseek(fd, start, Whence::SeekHole).map_or(u64::MAX, |end| end as u64);
    Some((start as u64, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn copy_keeps_links_holes_modes_and_xattrs() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("a/empty")).unwrap();
        fs::write(src.join("a/small"), b"hello").unwrap();
        fs::hard_link(src.join("a/small"), src.join("link")).unwrap();
        std::os::unix::fs::symlink("a/small", src.join("sym")).unwrap();
        let mut f = File::create(src.join("sparse")).unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        drop(f);
        fs::set_permissions(src.join("a/small"), fs::Permissions::from_mode(0o4751)).unwrap();
        let xr = xattr::set(src.join("a/small"), "user.k", b"v");
        nix::unistd::mkfifo(
            &src.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o555)).unwrap();
        let dst = t.path().join("dst");
        let st = copy_tree(&src, &dst).unwrap();
        assert_eq!(st.files, 2);
        assert_eq!(fs::read(dst.join("a/small")).unwrap(), b"hello");
        let (a, b) = (
            fs::metadata(dst.join("a/small")).unwrap(),
            fs::metadata(dst.join("link")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.mode() & 0o7777, 0o4751);
        assert_eq!(fs::metadata(dst.join("a")).unwrap().mode() & 0o7777, 0o555);
        assert!(dst.join("a/empty").is_dir());
        assert_eq!(
            fs::read_link(dst.join("sym")).unwrap(),
            Path::new("a/small")
        );
        let sp = fs::metadata(dst.join("sparse")).unwrap();
        assert_eq!(sp.len(), (32 << 20) + 4);
        assert!(
            sp.blocks() * 512 < 1 << 20,
            "holes were filled: {}",
            sp.blocks()
        );
        assert!(fs::symlink_metadata(dst.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        if xr.is_ok() {
            let v = xattr::get(dst.join("a/small"), "user.k").unwrap();
            assert_eq!(v.as_deref(), Some(&b"v"[..]));
        }
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(dst.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
    }
}
