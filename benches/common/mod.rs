//! Helpers shared by the bench binaries that include this module (`#[path]`):
//! settings from the environment, min/median, the stasis binary, and `main`'s
//! contract (do nothing unless run by `cargo bench`; `BENCH_STRICT=1` turns a
//! missed goal into a failing exit code).

use std::path::PathBuf;
use std::process::ExitCode;

/// `name` from the environment, parsed; `default` when unset or empty.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a valid number")),
        _ => Ok(default),
    }
}

/// Minimum and (lower, for an even count) median.
pub fn min_median(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some((v[0], v[(v.len() - 1) / 2]))
}

/// Two decimals, for the JSON lines.
pub fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The release build of stasis (`STASIS_BIN` overrides).
pub fn stasis_bin() -> Result<PathBuf, String> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = match std::env::var_os("STASIS_BIN") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest.join("target"))
            .join("release/stasis"),
    };
    if !bin.is_file() {
        return Err(format!(
            "stasis binary {} is missing: `cargo build --release` first, or set STASIS_BIN",
            bin.display()
        ));
    }
    Ok(bin)
}

/// Runs `bench` (which returns whether every goal was met) when started by
/// `cargo bench --bench NAME`; `cargo test --benches` runs us without `--bench`
/// and gets a one-line note.
pub fn bench_main(name: &str, bench: fn() -> Result<bool, String>) -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: run it with `cargo bench --bench {name}`");
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) if std::env::var("BENCH_STRICT").as_deref() == Ok("1") => ExitCode::FAILURE,
        Ok(false) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e}");
            ExitCode::FAILURE
        }
    }
}
