//! Parsers and value types the commands share: runc's sizes and durations,
//! UID[:GID], and the table/json output format.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;

/// `--format` of the commands that print a table or JSON.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Parses runc's sizes: bytes, or a number with k/m/g/t (powers of 1024); -1 passes.
pub fn parse_size(s: &str) -> Result<i64, String> {
    if s == "-1" {
        return Ok(-1);
    }
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (num, mult) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1i64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        Some('t') => (&lower[..lower.len() - 1], 1 << 40),
        _ => (lower, 1),
    };
    num.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}: use bytes or a number with k, m, g or t"))
}

/// Parses a duration as runc and Go do (`5s`, `500ms`, `1m30s`, `2h45m`; humantime
/// also takes `1h 30m`, `2days`) or a bare number of seconds (`2`, `0.5`). Too large
/// a value is an error, never a panic.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = |why: &dyn std::fmt::Display| {
        format!("invalid duration {s:?}: {why} (use e.g. 5s, 500ms, 1m30s, 2h)")
    };
    if s.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && s.chars().all(|c| c.is_ascii_digit() || c == '.')
    {
        let secs: f64 = s.parse().map_err(|e| bad(&e))?;
        return Duration::try_from_secs_f64(secs).map_err(|e| bad(&e));
    }
    humantime::parse_duration(s).map_err(|e| bad(&e))
}

pub fn parse_user(s: &str) -> Result<(u32, Option<u32>)> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = u
        .parse()
        .with_context(|| format!("--user {s:?}: uid must be a number (UID[:GID])"))?;
    let gid = match g {
        Some(g) => Some(
            g.parse()
                .with_context(|| format!("--user {s:?}: gid must be a number (UID[:GID])"))?,
        ),
        None => None,
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("-1").unwrap(), -1);
        assert!(parse_size("x").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    /// Go-style compound durations, as runc accepts them.
    #[test]
    fn go_style_durations() {
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h45m").unwrap(), Duration::from_secs(9900));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    }

    /// `--interval 99999999999999999999h` panicked in Duration::from_secs_f64 (with
    /// panic=abort, the process died); it is a usage error now.
    #[test]
    fn huge_duration_is_an_error_not_a_panic() {
        for s in ["99999999999999999999h", "99999999999999999999999", "1e400"] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains("invalid duration"), "{s}: {e}");
        }
        let e = <super::super::Cli as clap::Parser>::try_parse_from([
            "stasis",
            "events",
            "--interval",
            "99999999999999999999h",
            "x",
        ])
        .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
    }
}
