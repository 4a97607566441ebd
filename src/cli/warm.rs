//! Warm-start commands: `prewarm` (and later `serve`).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::oci::parse_duration;
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
        ready: a.ready.clone(),
        ready_timeout: a.ready_timeout,
        warmup: a
            .warmup
            .as_ref()
            .map(|w| w.split_whitespace().map(str::to_string).collect()),
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
        if let Some(f) = r.checkpoint.stats.get("frozen_time") {
            writeln!(out, "frozen_time_us: {f}")?;
        }
        writeln!(out, "image_bytes: {}", rep.image_bytes)?;
        writeln!(out, "bytes_added: {}", rep.bytes_added)?;
    }
    Ok(0)
}
