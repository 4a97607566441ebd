//! Warm-start commands: `prewarm` (and later `serve`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::parse::parse_duration;
use super::Cli;
use crate::runtime::Runtime;
use crate::store::Store;
use crate::workflows::prewarm::{prewarm, PrewarmOptions, Probe};

#[derive(Args, Debug)]
pub struct PrewarmArgs {
    /// Bundle of the service
    #[arg(long, short = 'b')]
    pub bundle: PathBuf,
    /// Readiness probe: tcp:HOST:PORT, exec:CMD ARGS, http://HOST:PORT/PATH, log:REGEX, file:PATH
    #[arg(long, value_parser = Probe::parse)]
    pub ready: Probe,
    /// With an exec: probe, pass only when a line of the command's stdout matches REGEX
    /// (e.g. --ready 'exec:redis-cli ping' --ready-output PONG: redis-cli exits 0
    /// with "LOADING" while Redis loads its data)
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub ready_output: Option<regex::Regex>,
    /// How long to wait for the probe to pass
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Command run inside once ready, before the checkpoint (split on spaces)
    #[arg(long)]
    pub warmup: Option<String>,
    /// Tag NAME[:VER] of the snapshot (repeatable)
    #[arg(long, required = true)]
    pub tag: Vec<String>,
    /// Container id while warming (default prewarm-<pid>)
    #[arg(long)]
    pub id: Option<String>,
    /// Keep the container running after the checkpoint
    #[arg(long)]
    pub keep_running: bool,
    /// zstd level for new pages
    #[arg(long, default_value_t = 3)]
    pub compress_level: i32,
    /// Print cold-start-to-ready and checkpoint times
    #[arg(long)]
    pub print_stats: bool,
}

pub fn prewarm_cmd(cli: &Cli, rt: &Runtime, a: &PrewarmArgs) -> Result<i32> {
    let ready = match &a.ready_output {
        Some(re) => a
            .ready
            .clone()
            .require_output(re.clone())
            .map_err(anyhow::Error::msg)?,
        None => a.ready.clone(),
    };
    let store = Store::open(&cli.store)?;
    let self_exe = std::env::current_exe().context("find the stasis binary")?;
    let global_args = vec![
        "--root".to_string(),
        cli.root.display().to_string(),
        "--criu".to_string(),
        cli.criu.display().to_string(),
    ];
    let opts = PrewarmOptions {
        bundle: a.bundle.clone(),
        id: a
            .id
            .clone()
            .unwrap_or_else(|| format!("prewarm-{}", std::process::id())),
        ready,
        ready_timeout: a.ready_timeout,
        warmup: a
            .warmup
            .as_ref()
            .map(|w| crate::workflows::prewarm::split_command(w))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--warmup: {e}"))?,
        tags: a.tag.clone(),
        keep_running: a.keep_running,
        compress_level: a.compress_level,
        progress: super::snapshot::progress_wanted(),
        self_exe,
        global_args,
    };
    let r = prewarm(rt, &store, &opts)?;
    let mut out = std::io::stdout().lock();
    let rep = &r.checkpoint.report;
    writeln!(out, "snapshot {} ({})", rep.id.short(), a.tag.join(", "))?;
    super::cr::warn_damaged_packs(rep);
    if let Some(e) = &r.cache_error {
        eprintln!(
            "stasis: warning: the snapshot is stored, but its restore caches were not built (the first restore builds them): {e}"
        );
    }
    if a.print_stats {
        writeln!(
            out,
            "cold_start_to_ready_ms: {}",
            r.cold_to_ready.as_millis()
        )?;
        writeln!(out, "warmup_ms: {}", r.warmup.as_millis())?;
        writeln!(out, "checkpoint_ms: {}", r.checkpoint_time.as_millis())?;
        writeln!(out, "dump_ms: {}", r.checkpoint.dump_ms)?;
        writeln!(out, "ingest_ms: {}", r.checkpoint.ingest_ms)?;
        match &r.cache_error {
            None => writeln!(out, "cache_ms: {}", r.cache_ms)?,
            Some(e) => writeln!(out, "cache: failed ({e})")?,
        }
        if let Some(f) = r.checkpoint.stats.get("frozen_time") {
            writeln!(out, "frozen_time_us: {f}")?;
        }
        writeln!(out, "image_bytes: {}", rep.image_bytes)?;
        writeln!(out, "bytes_added: {}", rep.bytes_added)?;
    }
    Ok(0)
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Snapshot to serve: tag NAME[:VER] or id
    #[arg(long, required_unless_present = "status")]
    pub from: Option<String>,
    /// Address to listen on, e.g. 127.0.0.1:7000
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Port inside each copy's network namespace to relay to
    #[arg(long, required_unless_present = "status")]
    pub port: Option<u16>,
    /// Ready copies to keep restored ahead of requests
    #[arg(long, default_value_t = 1)]
    pub pool: usize,
    /// Discard (or --persist) a copy after this long without connections
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Most copies alive at once
    #[arg(long, default_value_t = 4)]
    pub max: usize,
    /// Checkpoint idle copies back into the store under this tag; later copies
    /// restore from it
    #[arg(long)]
    pub persist: Option<String>,
    /// When a restore fails, start the bundle cold instead (and log it)
    #[arg(long)]
    pub fallback_cold: bool,
    /// Restore copies with CRIU's lazy pages (userfaultfd): a copy runs as soon
    /// as its tasks exist and its memory is copied in while it runs.
    #[arg(long)]
    pub lazy_pages: bool,
    /// Command run inside each pool copy before it takes connections (split on
    /// spaces), e.g. a query that does a first session's one-time work
    #[arg(long, value_parser = non_empty_command)]
    pub warmup: Option<String>,
    /// Bundle for restores and cold starts (default: the one recorded in the snapshot)
    #[arg(long, short = 'b')]
    pub bundle: Option<PathBuf>,
    /// Counters file (default: --root/.serve-ADDR-PORT.json)
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
    /// Print the counters of the server listening on --listen and exit
    #[arg(long)]
    pub status: bool,
}

pub fn serve_cmd(cli: &Cli, rt: Runtime, a: &ServeArgs) -> Result<i32> {
    use crate::workflows::serve::{default_stats_file, serve, ServeOptions};
    let stats_file = a
        .stats_file
        .clone()
        .unwrap_or_else(|| default_stats_file(&cli.root, &a.listen));
    if a.status {
        let text = std::fs::read_to_string(&stats_file).with_context(|| {
            format!(
                "read {}: is `stasis serve --listen {}` running with the same --root?",
                stats_file.display(),
                a.listen
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parse {}", stats_file.display()))?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let (Some(from), Some(port)) = (a.from.clone(), a.port) else {
        anyhow::bail!("serve needs --from NAME and --port P");
    };
    if a.max == 0 || a.pool > a.max {
        anyhow::bail!(
            "--pool ({}) must not exceed --max ({}), and --max must be >= 1",
            a.pool,
            a.max
        );
    }
    let store = Store::open_existing(&cli.store)?;
    let self_exe = std::env::current_exe().context("find the stasis binary")?;
    let opts = ServeOptions {
        from,
        listen: a.listen,
        port,
        pool: a.pool,
        idle: a.idle,
        max: a.max,
        persist: a.persist.clone(),
        fallback_cold: a.fallback_cold,
        lazy_pages: a.lazy_pages,
        warmup: a
            .warmup
            .as_ref()
            .map(|w| crate::workflows::prewarm::split_command(w))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--warmup: {e}"))?,
        bundle: a.bundle.clone(),
        stats_file,
        json_log: cli.log_format == super::LogFormat::Json,
        self_exe,
        global_args: vec![
            "--root".into(),
            cli.root.display().to_string(),
            "--criu".into(),
            cli.criu.display().to_string(),
        ],
    };
    serve(rt, store, opts)?;
    Ok(0)
}

fn parse_regex(s: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(s).map_err(|e| format!("bad regex: {e}"))
}

/// `--warmup` must name a command.
fn non_empty_command(s: &str) -> std::result::Result<String, String> {
    if s.split_whitespace().next().is_none() {
        return Err("needs a command, e.g. --warmup 'psql -l'".into());
    }
    Ok(s.to_string())
}
