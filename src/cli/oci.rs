//! runc's verbs: argument structs with runc's flags, and one runtime call each.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use super::{Cli, Command, Logger};
use crate::runtime::{self, CreateOptions, ExecOptions, OciState, ResourceOverrides, Runtime};

#[derive(Args, Debug)]
pub struct IdArg {
    /// Container id
    pub id: String,
}

#[derive(Args, Debug)]
pub struct SpecArgs {
    /// Path to the bundle directory to write config.json into
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    // The global `--rootless` (runc's, taking a value) has the same id, so this must
    // be an optional string too: a `bool` here made clap panic on every `spec`
    // ("mismatch between definition and access of `rootless`").
    /// Generate a configuration for a rootless container
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub rootless: Option<String>,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Path to the bundle directory
    #[arg(long, short = 'b', default_value = ".")]
    pub bundle: PathBuf,
    /// File to write the container's init pid to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// AF_UNIX socket that receives the pty master when terminal is true
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Do not use pivot_root to jail the process inside the rootfs
    #[arg(long)]
    pub no_pivot: bool,
    /// Do not create a new session keyring (stasis never creates one)
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Pass N additional file descriptors (3 .. 3+N-1) to the container
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// Container id
    pub id: String,
}

impl From<&CreateArgs> for CreateOptions {
    fn from(a: &CreateArgs) -> Self {
        CreateOptions {
            id: a.id.clone(),
            bundle: a.bundle.clone(),
            pid_file: a.pid_file.clone(),
            console_socket: a.console_socket.clone(),
            no_pivot: a.no_pivot,
            no_new_keyring: a.no_new_keyring,
            preserve_fds: a.preserve_fds,
            keep: false,
        }
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub create: CreateArgs,
    /// Detach from the container's process
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Keep the container after it exits (ignored in detached mode)
    #[arg(long)]
    pub keep: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Print only container ids
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Send the signal to every process in the container
    #[arg(long, short = 'a')]
    pub all: bool,
    /// Container id
    pub id: String,
    /// Signal name or number
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Kill the container if it is running; succeed if it does not exist
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Container id
    pub id: String,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Container id
    pub id: String,
    /// Options passed to ps(1) (default -ef)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// JSON file describing the process (OCI process object)
    #[arg(long, short = 'p')]
    pub process: Option<PathBuf>,
    /// Detach from the process
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// File to write the process pid to
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Allocate a pseudo-TTY
    #[arg(long, short = 't')]
    pub tty: bool,
    /// AF_UNIX socket that receives the pty master
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory inside the container
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Environment variable KEY=VALUE (repeatable)
    #[arg(long, short = 'e')]
    pub env: Vec<String>,
    /// UID[:GID] to run as
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Additional group id (repeatable)
    #[arg(long, short = 'g')]
    pub additional_gids: Vec<u32>,
    /// Add a capability (repeatable)
    #[arg(long, short = 'c')]
    pub cap: Vec<String>,
    /// Set no_new_privileges for the process
    #[arg(long)]
    pub no_new_privs: bool,
    /// Pass N additional file descriptors to the process
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: i32,
    /// Container id
    pub id: String,
    /// Command and arguments
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// JSON file with OCI LinuxResources, or - for stdin
    #[arg(long, short = 'r')]
    pub resources: Option<String>,
    /// Memory limit (bytes, or with k/m/g suffix)
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<i64>,
    /// Memory plus swap limit (-1 for unlimited)
    #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
    pub memory_swap: Option<i64>,
    /// Memory soft limit
    #[arg(long, value_parser = parse_size)]
    pub memory_reservation: Option<i64>,
    /// Maximum number of pids (-1 for unlimited)
    #[arg(long, allow_hyphen_values = true)]
    pub pids_limit: Option<i64>,
    /// CPU shares (relative weight)
    #[arg(long)]
    pub cpu_shares: Option<u64>,
    /// CPU CFS quota in microseconds
    #[arg(long, allow_hyphen_values = true)]
    pub cpu_quota: Option<i64>,
    /// CPU CFS period in microseconds
    #[arg(long)]
    pub cpu_period: Option<u64>,
    /// CPUs allowed (e.g. 0-1)
    #[arg(long)]
    pub cpuset_cpus: Option<String>,
    /// Memory nodes allowed
    #[arg(long)]
    pub cpuset_mems: Option<String>,
    /// Block IO weight (10-1000)
    #[arg(long)]
    pub blkio_weight: Option<u16>,
    /// Container id
    pub id: String,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Print one stats record and exit
    #[arg(long)]
    pub stats: bool,
    /// Interval between stats records (e.g. 5s, 500ms)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Container id
    pub id: String,
}

/// Parses runc's sizes: bytes, or a number with k/m/g/t (powers of 1024); -1 passes.
fn parse_size(s: &str) -> Result<i64, String> {
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

fn print_json<T: serde::Serialize>(v: &T, pretty: bool) -> Result<()> {
    let s = if pretty {
        serde_json::to_string_pretty(v)?
    } else {
        serde_json::to_string(v)?
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    Ok(())
}

fn print_table(states: &[OciState]) -> Result<()> {
    let rows: Vec<[String; 6]> = states
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.pid.to_string(),
                s.status.clone(),
                s.bundle.display().to_string(),
                s.created.clone(),
                s.owner.clone(),
            ]
        })
        .collect();
    let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
    // Like Go's tabwriter with minwidth 12, padding 3 (runc list).
    let mut widths = [12usize; 6];
    for r in std::iter::once(&header).chain(rows.iter()) {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len() + 3);
        }
    }
    let mut out = std::io::stdout().lock();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i == r.len() - 1 {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}", w = widths[i]));
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn parse_user(s: &str) -> Result<(u32, Option<u32>)> {
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

pub fn dispatch(cli: &Cli, _log: &mut Logger) -> Result<i32> {
    let rt = || Runtime::new(&cli.root, cli.systemd_cgroup).map(|r| r.with_criu(&cli.criu));
    match &cli.command {
        Command::Spec(a) => {
            let rootless = match a.rootless.as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(v) => bail!("spec --rootless {v:?}: expected true or false"),
            };
            runtime::info::write_spec(&a.bundle, rootless)?;
        }
        Command::Checkpoint(a) => return super::cr::checkpoint(&rt()?, &cli.store, a),
        Command::Restore(a) => return super::cr::restore(&rt()?, &cli.store, a),
        Command::Prewarm(a) => return super::warm::prewarm_cmd(cli, &rt()?, a),
        Command::Serve(a) => return super::warm::serve_cmd(cli, rt()?, a),
        Command::Snapshot(a) => {
            return super::snapshot::run(&crate::store::Store::open(&cli.store)?, a, || Ok(rt()?))
        }
        Command::Completion(a) => super::docs::completion(a.shell, &mut std::io::stdout().lock()),
        Command::Man(a) => super::docs::man(&a.dir)?,
        Command::Features => print_json(&runtime::info::features(), true)?,
        Command::Create(a) => {
            rt()?.create(&a.into())?;
        }
        Command::Start(a) => rt()?.start(&a.id)?,
        Command::Run(a) => {
            let opts = CreateOptions {
                keep: a.keep,
                ..(&a.create).into()
            };
            return Ok(rt()?.run(&opts, a.detach)?);
        }
        Command::State(a) => {
            // runc leaves `owner` empty in `state` and fills it in `list`.
            let mut st = rt()?.state(&a.id)?;
            st.owner.clear();
            print_json(&st, true)?
        }
        Command::List(a) => {
            let states = rt()?.list()?;
            if a.quiet {
                let mut out = std::io::stdout().lock();
                for s in &states {
                    writeln!(out, "{}", s.id)?;
                }
            } else if a.format == Format::Json {
                print_json(&states, false)?;
            } else {
                print_table(&states)?;
            }
        }
        Command::Kill(a) => rt()?.kill(&a.id, &a.signal, a.all)?,
        Command::Delete(a) => rt()?.delete(&a.id, a.force)?,
        Command::Pause(a) => rt()?.pause(&a.id)?,
        Command::Resume(a) => rt()?.resume(&a.id)?,
        Command::Ps(a) => ps(&rt()?, a)?,
        Command::Exec(a) => {
            let opts = ExecOptions {
                id: a.id.clone(),
                process: a.process.clone(),
                args: a.command.clone(),
                detach: a.detach,
                pid_file: a.pid_file.clone(),
                tty: a.tty,
                console_socket: a.console_socket.clone(),
                cwd: a.cwd.clone(),
                env: a.env.clone(),
                user: a.user.as_deref().map(parse_user).transpose()?,
                additional_gids: a.additional_gids.clone(),
                caps: a.cap.clone(),
                no_new_privs: a.no_new_privs,
                preserve_fds: a.preserve_fds,
            };
            return Ok(rt()?.exec(&opts)?);
        }
        Command::Update(a) => {
            let json = match a.resources.as_deref() {
                None => Vec::new(),
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("read --resources from stdin")?;
                    b
                }
                Some(p) => std::fs::read(p).with_context(|| format!("read --resources {p}"))?,
            };
            let o = ResourceOverrides {
                memory: a.memory,
                memory_swap: a.memory_swap,
                memory_reservation: a.memory_reservation,
                pids_limit: a.pids_limit,
                cpu_shares: a.cpu_shares,
                cpu_quota: a.cpu_quota,
                cpu_period: a.cpu_period,
                cpuset_cpus: a.cpuset_cpus.clone(),
                cpuset_mems: a.cpuset_mems.clone(),
                blkio_weight: a.blkio_weight,
            };
            rt()?.update(&a.id, &json, &o)?;
        }
        Command::Events(a) => {
            let mut failed = None;
            rt()?.events(&a.id, a.interval, a.stats, |v| {
                if failed.is_none() {
                    failed = print_json(v, false).err();
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }
    Ok(0)
}

fn ps(rt: &Runtime, a: &PsArgs) -> Result<()> {
    let pids = rt.pids(&a.id)?;
    if a.format == Format::Json {
        return print_json(&pids, false);
    }
    let args: Vec<String> = if a.ps_args.is_empty() {
        vec!["-ef".into()]
    } else {
        a.ps_args.clone()
    };
    let out = std::process::Command::new("ps")
        .args(&args)
        .output()
        .context("run ps(1) (install procps)")?;
    if !out.status.success() {
        bail!(
            "ps {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let pid_col = header
        .split_whitespace()
        .position(|c| c == "PID")
        .context("ps output has no PID column: pass options that print it")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{header}")?;
    for line in lines {
        let pid: Option<i32> = line
            .split_whitespace()
            .nth(pid_col)
            .and_then(|p| p.parse().ok());
        if pid.is_some_and(|p| pids.contains(&p)) {
            writeln!(stdout, "{line}")?;
        }
    }
    Ok(())
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
