//! Small helpers shared by the store's modules: scoped-thread parallel map (the
//! machines this runs on have few cores; hashing and zstd are the hot loops), the
//! progress bar, the RFC 3339 clock, and private (0700) directory creation.

use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory the store creates: snapshots hold process memory and
/// root filesystems, so nobody but root may read them or reach into them.
pub(crate) const PRIVATE_DIR: u32 = 0o700;
/// Mode of every file the store creates (blobs are made read-only: 0400).
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` (and missing parents inside the store) as 0700 at mkdir(2) time,
/// never readable in between; an existing directory is left as it is. The mode
/// does not depend on the umask (which can only clear bits).
pub(crate) fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)
}

/// Creates `dir` as 0700 and fails if it exists (for directories that are ours
/// only when we made them).
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(PRIVATE_DIR).create(dir)
}

/// Takes group and other permissions off an existing directory (a store made by
/// an older stasis with 0755). One stat when it is already private; another
/// user's directory is left alone (its owner tightens it).
pub(crate) fn tighten_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(dir)?;
    let ours = m.uid() == nix::unistd::geteuid().as_raw();
    if ours && m.is_dir() && m.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR))?;
    }
    Ok(())
}

use indicatif::{ProgressBar, ProgressStyle};

/// Worker threads for CPU-bound loops: the available cores, at most 8.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

/// Maps `f` over `items` on up to `threads()` scoped threads, in order. Each thread
/// gets its own state from `init` (a zstd context, say). Small inputs run inline.
pub(crate) fn par_map<T, S, R, I, F>(items: &[T], init: I, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, &T) -> R + Sync,
{
    par_map_n(threads(), items, init, f)
}

/// `par_map` on at most `threads` threads.
pub(crate) fn par_map_n<T, S, R, I, F>(threads: usize, items: &[T], init: I, f: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, &T) -> R + Sync,
{
    let n = threads.min(items.len());
    if n <= 1 {
        let mut s = init();
        return items.iter().map(|t| f(&mut s, t)).collect();
    }
    let chunk = items.len().div_ceil(n);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                let (init, f) = (&init, &f);
                scope.spawn(move || {
                    let mut s = init();
                    part.iter().map(|t| f(&mut s, t)).collect::<Vec<R>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(v) => out.extend(v),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        out
    })
}

/// A byte progress bar on stderr when `enabled` and stderr is a terminal; hidden
/// (free) otherwise.
pub(crate) fn progress(enabled: bool, total: u64, msg: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_string());
    bar
}

/// `s` with every character that could drive a terminal (C0/C1 controls such as
/// ESC, and the invisible bidi and zero-width formatting characters) written as a
/// `\u{..}` escape, for error messages that quote bytes read from a file.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let format_char = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || format_char {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Now, as RFC 3339 UTC with milliseconds (sorts lexically).
pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Test hook for the fault-matrix tests. `STASIS_FAULT=NAME:kill` makes the process
/// SIGKILL itself when it reaches fault point NAME, `NAME:stop` stops it with
/// SIGSTOP until a SIGCONT (so a test can act while it is parked at a known
/// moment). Several entries are comma-separated. Unset (always, outside tests): a
/// no-op. The store keeps its own copy because it imports nothing else of ours.
pub fn fault_point(name: &str) {
    use nix::sys::signal::{raise, Signal};
    let spec = std::env::var("STASIS_FAULT").unwrap_or_default();
    for (point, action) in spec.split(',').filter_map(|i| i.split_once(':')) {
        let sig = match action {
            "kill" => Signal::SIGKILL,
            "stop" => Signal::SIGSTOP,
            _ => continue,
        };
        if point == name {
            let _ = raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_escapes_what_drives_a_terminal() {
        let s = "ok \u{1b}[2J\u{7}\r\n\u{9b}1m \u{202e}txt.exe caf\u{e9} \u{fffd}";
        assert_eq!(
            super::printable(s),
            "ok \\u{1b}[2J\\u{7}\\u{d}\\u{a}\\u{9b}1m \\u{202e}txt.exe caf\u{e9} \u{fffd}"
        );
    }
}
