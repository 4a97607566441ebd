//! The command line: the only module that knows clap. It parses runc's global flags
//! and verbs, turns them into option structs, makes one library call per command,
//! and logs an error once, here, in runc's text or JSON log format.

mod cr;
mod docs;
mod inspect;
mod oci;
mod parse;
mod report;
mod snapshot;
mod warm;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The help heading of the flags every command accepts (runc and podman list
/// them apart from a command's own).
const GLOBAL: &str = "Global options";

#[derive(Parser, Debug)]
#[command(
    name = "stasis",
    version = concat!(env!("CARGO_PKG_VERSION"), "\nspec: 1.0.2-dev\nlibcontainer: 0.7.0"),
    about = "An OCI container runtime built around warm starts (runc-compatible)",
    // Go-flag clients repeat flags (podman 4.3 sends `checkpoint ... --leave-running
    // ... --leave-running`); runc takes the last, so do we.
    args_override_self = true
)]
pub struct Cli {
    /// Directory for container state (tmpfs recommended)
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        default_value = "/run/stasis",
        env = "STASIS_ROOT"
    )]
    pub root: PathBuf,
    /// Write log lines to this file instead of stderr
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub log: Option<PathBuf>,
    /// Log format: text or json (runc's JSON lines, read by containerd)
    #[arg(long, global = true, help_heading = GLOBAL, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log debug output
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub debug: bool,
    /// Use systemd to manage cgroups (not supported yet: refused with a clear error)
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub systemd_cgroup: bool,
    /// Path to the criu binary used for checkpoint and restore
    #[arg(long, global = true, help_heading = GLOBAL, default_value = "criu")]
    pub criu: PathBuf,
    /// Snapshot store directory (an OCI image layout)
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "STASIS_STORE",
        default_value = "/var/lib/stasis"
    )]
    pub store: PathBuf,
    /// Accepted for runc compatibility; stasis never uses rootless-specific paths
    #[arg(long, global = true, hide = true)]
    pub rootless: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write a default config.json (an OCI runtime spec) into a bundle
    Spec(oci::SpecArgs),
    /// Create a container from a bundle, ready for `start`
    Create(oci::CreateArgs),
    /// Run the user process of a created container
    Start(oci::IdArg),
    /// Create and start a container
    Run(oci::RunArgs),
    /// Print a container's state as JSON
    State(oci::IdArg),
    /// List containers
    List(oci::ListArgs),
    /// Send a signal to a container's init process (or every process with --all)
    Kill(oci::KillArgs),
    /// Delete a container and its resources
    Delete(oci::DeleteArgs),
    /// List the processes of a container
    Ps(oci::PsArgs),
    /// Run a process in a running container
    Exec(oci::ExecArgs),
    /// Freeze every process of a container
    Pause(oci::IdArg),
    /// Thaw a paused container
    Resume(oci::IdArg),
    /// Change a running container's resource limits
    Update(oci::UpdateArgs),
    /// Print a container's events and resource usage as JSON
    Events(oci::EventsArgs),
    /// Print the features this runtime supports as JSON
    Features,
    /// Checkpoint a running container with CRIU (into the store with --tag)
    Checkpoint(cr::CheckpointArgs),
    /// Restore a container from a checkpoint (or from the store with --from)
    Restore(cr::RestoreArgs),
    /// Manage snapshots in the store
    Snapshot(snapshot::SnapshotArgs),
    /// Run a bundle until ready, checkpoint it into the store, stop it
    Prewarm(warm::PrewarmArgs),
    /// Restore on request: relay connections to restored copies of a snapshot
    Serve(warm::ServeArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completion(docs::CompletionArgs),
    /// Write man pages (stasis.1 and one per command) into a directory
    Man(docs::ManArgs),
}

/// Long flags that Go-style clients may send with a single dash (the containerd
/// shim sends `-no-subreaper`); they are rewritten to `--name` before parsing.
const SINGLE_DASH_LONG: &[&str] = &[
    "no-subreaper",
    "no-pivot",
    "no-new-keyring",
    "detach",
    "pid-file",
    "console-socket",
    "bundle",
    "root",
    "log",
    "log-format",
    "debug",
    "systemd-cgroup",
    "criu",
    "format",
    "force",
    "all",
    "quiet",
    "image-path",
    "work-path",
    "resources",
    "process",
    "preserve-fds",
];

fn normalise_args(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut done = false;
    for a in args {
        if !done {
            if let Some(s) = a.to_str() {
                if s == "--" {
                    done = true;
                } else if s.len() > 2 && s.starts_with('-') && !s.starts_with("--") {
                    let name = s[1..].split('=').next().unwrap_or("");
                    if SINGLE_DASH_LONG.contains(&name) {
                        out.push(OsString::from(format!("-{s}")));
                        continue;
                    }
                }
            }
        }
        out.push(a);
    }
    out
}

/// Where log lines go: the `--log` file, or stderr.
struct Logger {
    file: Option<std::fs::File>,
    format: LogFormat,
    debug: bool,
}

impl Logger {
    fn new(path: Option<&PathBuf>, format: LogFormat, debug: bool) -> Self {
        let file = path.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Self {
            file,
            format,
            debug,
        }
    }

    pub fn log(&mut self, level: &str, msg: &str) {
        if level == "debug" && !self.debug {
            return;
        }
        let line = match self.format {
            LogFormat::Json => {
                let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
                format!(
                    "{}\n",
                    serde_json::json!({"level": level, "msg": msg, "time": time})
                )
            }
            LogFormat::Text => format!("stasis: {level}: {msg}\n"),
        };
        match &mut self.file {
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }
}

/// `--debug`: library debug output (libcontainer's tracing) goes where runc's goes,
/// to the `--log` file when there is one (never stderr, which podman's exec shows to
/// the user), in runc's JSON line shape with `--log-format json` (a line of any other
/// shape in log.json makes containerd's shim drop the error it looks for).
fn init_debug_log(path: Option<&PathBuf>, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::new("debug");
    let file = path.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let Some(file) = file else {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
        return;
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file));
    let _ = match format {
        LogFormat::Json => builder.event_format(RuncJson).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Formats tracing events as runc's JSON log lines: `{"level","msg","time"}`.
struct RuncJson;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for RuncJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::FormatFields as _;
        let mut msg = String::new();
        ctx.format_fields(
            tracing_subscriber::fmt::format::Writer::new(&mut msg),
            event,
        )?;
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        writeln!(
            writer,
            "{}",
            serde_json::json!({"level": level, "msg": msg, "time": time})
        )
    }
}

/// The error and its causes on one line, skipping a cause whose text the message
/// already contains (our error types quote their source in their message), with
/// control characters escaped: an error may quote bytes of a hostile file, and
/// those must not reach the terminal as escape sequences.
fn error_chain(e: &anyhow::Error) -> String {
    crate::store::printable(&raw_error_chain(e))
}

fn raw_error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// Runs the parsed command: one call into the command's module, which makes one
/// library call. Returns the exit code.
fn dispatch(cli: &Cli) -> anyhow::Result<i32> {
    let rt = || {
        crate::runtime::Runtime::new(&cli.root, cli.systemd_cgroup).map(|r| r.with_criu(&cli.criu))
    };
    match &cli.command {
        Command::Spec(a) => oci::spec_cmd(a)?,
        Command::Checkpoint(a) => return cr::checkpoint(&rt()?, &cli.store, a),
        Command::Restore(a) => return cr::restore(&rt()?, &cli.store, a),
        Command::Prewarm(a) => return warm::prewarm_cmd(cli, &rt()?, a),
        Command::Serve(a) => return warm::serve_cmd(cli, rt()?, a),
        Command::Snapshot(a) => return snapshot::run_at(&cli.store, a, || Ok(rt()?)),
        Command::Completion(a) => docs::completion(a.shell, &mut std::io::stdout().lock()),
        Command::Man(a) => docs::man(&a.dir)?,
        Command::Features => oci::print_json(&crate::runtime::info::features(), true)?,
        Command::Create(a) => {
            rt()?.create(&a.into())?;
        }
        Command::Start(a) => rt()?.start(&a.id)?,
        Command::Run(a) => return oci::run_cmd(&rt()?, a),
        Command::State(a) => oci::state_cmd(&rt()?, a)?,
        Command::List(a) => oci::list_cmd(&rt()?, a)?,
        Command::Kill(a) => rt()?.kill(&a.id, &a.signal, a.all)?,
        Command::Delete(a) => rt()?.delete(&a.id, a.force)?,
        Command::Pause(a) => rt()?.pause(&a.id)?,
        Command::Resume(a) => rt()?.resume(&a.id)?,
        Command::Ps(a) => oci::ps(&rt()?, a)?,
        Command::Exec(a) => return oci::exec_cmd(&rt()?, a),
        Command::Update(a) => oci::update_cmd(&rt()?, a)?,
        Command::Events(a) => oci::events_cmd(&rt()?, a)?,
    }
    Ok(0)
}

/// Parses `args`, runs the command and returns the process exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    // Internal: empties a container's output pipe (see runtime/stdio.rs).
    if args.get(1).is_some_and(|a| a == "__drain") {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        return 0;
    }
    let cli = match Cli::try_parse_from(normalise_args(args)) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if cli.debug {
        init_debug_log(cli.log.as_ref(), cli.log_format);
    }
    let mut logger = Logger::new(cli.log.as_ref(), cli.log_format, cli.debug);
    match dispatch(&cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = error_chain(&e);
            logger.log("error", &msg);
            if logger.file.is_some() {
                // runc prints fatal errors on stderr as well as in the log file.
                eprintln!("stasis: {msg}");
            }
            // 127/126 for a command that does not exist / cannot be executed.
            e.downcast_ref::<crate::runtime::RuntimeError>()
                .map_or(1, crate::runtime::RuntimeError::exit_code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command and subcommand has a description and every visible argument
    /// a help text (`stasis --help` once listed 15 commands with none).
    #[test]
    fn every_command_and_argument_is_described() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{p}: no description"));
                }
                for a in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                    if a.get_help().is_none() {
                        missing.push(format!("{p} {}: no help", a.get_id()));
                    }
                }
                walk(sub, &p, missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "stasis", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
        let top = cmd.render_help().to_string();
        assert!(!top.contains("Flags shared"), "{top}");
    }

    /// A command's help lists the global flags under their own heading, after its own.
    #[test]
    fn global_flags_have_their_own_heading() {
        let e = Cli::try_parse_from(["stasis", "checkpoint", "--help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = e.to_string();
        let (own, global) = help
            .split_once(&format!("{GLOBAL}:"))
            .unwrap_or_else(|| panic!("no {GLOBAL:?} heading in:\n{help}"));
        assert!(
            own.contains("--leave-running") && !own.contains("--store"),
            "{help}"
        );
        assert!(
            global.contains("--store") && global.contains("--root"),
            "{help}"
        );
        assert!(help.starts_with("Checkpoint a running container"), "{help}");
    }

    /// `stasis help` and `stasis help run` print help, as runc's and podman's do.
    #[test]
    fn help_subcommand_prints_help() {
        let e = Cli::try_parse_from(["stasis", "help"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        let e = Cli::try_parse_from(["stasis", "help", "run"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(
            e.to_string().contains("Create and start a container"),
            "{e}"
        );
        let e = Cli::try_parse_from(["stasis", "snapshot", "help", "export"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn single_dash_long_flags_are_rewritten() {
        let v: Vec<OsString> = [
            "stasis",
            "restore",
            "-no-subreaper",
            "-d",
            "x",
            "--",
            "-all",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out: Vec<String> = normalise_args(v)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            out,
            [
                "stasis",
                "restore",
                "--no-subreaper",
                "-d",
                "x",
                "--",
                "-all"
            ]
        );
    }
}
