//! `stasis snapshot ...`: list, inspect, tag, rm, verify, diff, gc, prune, export,
//! import — restic/git-style management of the snapshot store.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use super::parse::{parse_duration, Format};
use super::report;
use crate::store::{DiffReport, FileChange, Level, SnapshotId, Store};
use crate::workflows::fstree;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub cmd: SnapshotCmd,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// List snapshots
    Ls {
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Summarise a snapshot: id, tags, origin, container, created, sizes, host,
    /// CRIU, timings, filesystem (`--format json`: the full stored record)
    Inspect {
        /// Output format (json: the whole config record with id, tags, origin
        /// and the filesystem summary)
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Tag (NAME[:VER]) or id
        snapshot: String,
    },
    /// Add a tag to a snapshot
    Tag {
        /// Tag or id of the snapshot
        snapshot: String,
        /// New tag NAME[:VER]
        tag: String,
    },
    /// Remove a tag (or, given an id, the snapshot's every tag); `gc` frees the data
    Rm {
        /// Tags (NAME[:VER]) or ids of the snapshots
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Check the store's integrity and list every problem found; with --repair,
    /// first put good copies back in place of damaged or missing blobs
    Verify {
        /// Also decompress and check every stored page
        #[arg(long)]
        read_data: bool,
        /// Replace damaged or missing blobs with good copies: a damaged pack is
        /// rebuilt from its intact frames and the same pages in other packs (a
        /// later checkpoint stores them again); with --from, any blob the export
        /// ARCHIVE holds is copied from it. Says what it could not repair
        #[arg(long)]
        repair: bool,
        /// With --repair: an export (`snapshot export`) holding good copies
        #[arg(long, value_name = "ARCHIVE", requires = "repair")]
        from: Option<PathBuf>,
        /// Rebuild a missing or unparseable index.json from the snapshot
        /// manifests in blobs/ (tags as recorded when each was checkpointed;
        /// the damaged file is kept as index.json.damaged)
        #[arg(long)]
        rebuild_index: bool,
        /// Output format (json: the findings and the repair report as one record)
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Compare two snapshots: files and pages changed
    Diff {
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
        /// The older snapshot: tag (NAME[:VER]) or id
        a: String,
        /// The newer snapshot: tag (NAME[:VER]) or id
        b: String,
    },
    /// Remove blobs no snapshot references, and stale temp files
    Gc {
        /// Report what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Forget old snapshots per series, then gc
    ///
    /// A series is the repository name of a tag: redis:v1 ... redis:v5 are the
    /// series "redis", whatever container they came from; an untagged snapshot
    /// is in the series of its container id; a snapshot with tags of several
    /// names is in each of them and is kept if any of its series keeps it. A
    /// snapshot tagged NAME:latest (what `--from NAME` restores) is always
    /// kept. A forgotten snapshot loses all its tags; `--dry-run` lists them.
    /// Example: `prune --keep-last 1` over redis:v1..v5 forgets v1..v4.
    Prune {
        /// Keep the N newest snapshots of each series
        #[arg(long)]
        keep_last: Option<usize>,
        /// Keep snapshots newer than this in every series (e.g. 24h, 30m)
        #[arg(long, value_parser = parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// Report what would be forgotten, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Output format
        #[arg(long, short = 'f', value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Write a snapshot as an OCI layout tar, or (`--format podman`) as a
    /// checkpoint archive for `podman container restore --import`
    Export {
        /// Tag (NAME[:VER]) or id of the snapshot
        snapshot: String,
        /// File to write the archive to, or - for standard output
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Archive format
        #[arg(long, value_enum, default_value_t = ExportFormat::Oci)]
        format: ExportFormat,
        /// With --format podman: full id of the base image in the importing
        /// podman's storage (`podman image inspect --format '{{.Id}}' IMAGE`);
        /// the snapshot's captured rootfs is unpacked over it
        #[arg(long, required_if_eq("format", "podman"))]
        podman_image_id: Option<String>,
        /// With --format podman: that image's name (default: its id)
        #[arg(long)]
        podman_image: Option<String>,
        /// With --format podman: the container name recorded in the archive
        /// (default: the snapshot's container id; `restore --name` overrides it)
        #[arg(long)]
        podman_name: Option<String>,
        /// With --format podman: the restored container's cgroup parent
        #[arg(long)]
        podman_cgroup_parent: Option<String>,
        /// With --format podman: the runtime as the importing podman names it
        /// (its --runtime value; podman refuses an archive made for another)
        #[arg(long, default_value = "stasis")]
        podman_runtime: String,
    },
    /// Import snapshots from an OCI layout tar (verified before anything is added)
    Import {
        /// An archive written by `snapshot export`, or - for standard input
        file: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout tar (`snapshot import` reads it)
    Oci,
    /// A podman checkpoint archive (tar.zst)
    Podman,
}

/// What `snapshot verify --rebuild-index` found.
fn print_rebuild(out: &mut impl Write, r: &crate::store::RebuildReport) -> Result<()> {
    if let Some(p) = &r.kept_damaged {
        writeln!(out, "kept the damaged index as {}", p.display())?;
    }
    writeln!(
        out,
        "rebuilt index.json: {} snapshot(s) found in blobs/",
        r.snapshots.len()
    )?;
    for (id, tags) in &r.snapshots {
        let tags = if tags.is_empty() {
            "untagged".to_string()
        } else {
            tags.join(", ")
        };
        writeln!(out, "  {} ({tags})", id.short())?;
    }
    if !r.snapshots.is_empty() {
        writeln!(
            out,
            "their origin is unknown (only the lost index recorded it): restores treat them as foreign"
        )?;
    }
    Ok(())
}

/// `snapshot verify [--read-data] [--repair [--from ARCHIVE]] [--format json]`:
/// repairs first, then verifies; fails when verify finds errors or something was
/// left damaged.
fn verify(
    store: &Store,
    out: &mut impl Write,
    read_data: bool,
    repair: bool,
    from: Option<&std::path::Path>,
    format: Format,
) -> Result<()> {
    let repaired = if repair {
        Some(store.repair(from)?)
    } else {
        None
    };
    let findings = store.verify(read_data)?;
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    if format == Format::Json {
        let v = report::Verify::new(store.root(), &findings, repaired.as_ref());
        report::print(out, &v)?;
    } else {
        if let Some(r) = &repaired {
            for l in &r.repaired {
                writeln!(out, "repaired {l}")?;
            }
            for l in &r.unrepaired {
                writeln!(out, "could not repair {l}")?;
            }
            if r.repaired.is_empty() && r.unrepaired.is_empty() {
                writeln!(out, "nothing to repair")?;
            }
        }
        for f in &findings {
            writeln!(out, "{}", crate::store::printable(&f.to_string()))?;
        }
    }
    if errors > 0 {
        bail!(
            "verify found {errors} error(s) in store {}",
            store.root().display()
        );
    }
    let unrepaired = repaired.map_or(0, |r| r.unrepaired.len());
    if unrepaired > 0 {
        bail!(
            "{unrepaired} damaged or missing blob(s) in store {} could not be repaired: \
             import an export that holds them (`stasis snapshot verify --repair --from EXPORT.tar`), \
             or remove the snapshots named above with `stasis snapshot rm`",
            store.root().display()
        );
    }
    if format != Format::Json {
        writeln!(out, "no errors found")?;
    }
    Ok(())
}

/// Runs `cmd` on the store at `root`. Only `import` (which adds snapshots)
/// creates a missing store; every other subcommand needs an existing one and
/// names the path when there is none, so a mistyped `--store` is not mistaken
/// for an empty store. `ls` of a missing store lists nothing and says so on
/// stderr (exit 0: scripts listing a store not yet used keep working).
pub fn run_at(
    root: &Path,
    a: &SnapshotArgs,
    rt: impl Fn() -> Result<crate::runtime::Runtime>,
) -> Result<i32> {
    let store = match &a.cmd {
        SnapshotCmd::Import { .. } => Store::open(root)?,
        cmd => match Store::open_existing(root) {
            Err(e @ crate::store::StoreError::NoStore { .. }) => {
                let SnapshotCmd::Ls { format } = cmd else {
                    return Err(e.into());
                };
                eprintln!("stasis: {e}");
                if *format == Format::Json {
                    report::print(&mut std::io::stdout().lock(), &Vec::<report::LsRow>::new())?;
                }
                return Ok(0);
            }
            r => r?,
        },
    };
    run(&store, a, rt)
}

/// A byte count as people read it: `512 B`, `1.50 MiB` (powers of 1024).
fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

pub fn run(
    store: &Store,
    a: &SnapshotArgs,
    rt: impl Fn() -> Result<crate::runtime::Runtime>,
) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    match &a.cmd {
        SnapshotCmd::Ls { format } => {
            let list = store.list()?;
            if *format == Format::Json {
                let rows: Vec<report::LsRow> = list.iter().map(Into::into).collect();
                report::print(&mut out, &rows)?;
            } else {
                writeln!(
                    out,
                    "{:<14}{:<28}{:<32}{:<16}{:>12}{:>12}  ORIGIN",
                    "ID", "TAGS", "CREATED", "CONTAINER", "SIZE", "ADDED"
                )?;
                for s in list {
                    let tags = if s.tags.is_empty() {
                        "-".into()
                    } else {
                        s.tags.join(",")
                    };
                    writeln!(
                        out,
                        "{:<14}{:<28}{:<32}{:<16}{:>12}{:>12}  {}",
                        s.id.short(),
                        tags,
                        s.created,
                        s.container,
                        human(s.image_bytes),
                        human(s.added_bytes),
                        s.origin
                    )?;
                }
            }
        }
        SnapshotCmd::Inspect { format, snapshot } => {
            let id = store.resolve(snapshot)?;
            let cfg = store.config(&id)?;
            let fs = super::inspect::fs_summary(store, &id, &cfg)?;
            // This store's record (tags, origin), not the archive's.
            let entry = super::inspect::entry(store, &id)?;
            if *format == Format::Json {
                let v = super::inspect::json(&entry, cfg, serde_json::to_value(&fs)?);
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                super::inspect::summary(&mut out, &entry, &cfg, human)?;
                super::inspect::print_fs_summary(&mut out, fs.as_ref())?;
            }
        }
        SnapshotCmd::Tag { snapshot, tag } => store.tag(snapshot, tag)?,
        SnapshotCmd::Rm { snapshots } => {
            for s in snapshots {
                for removed in store.remove(s)? {
                    writeln!(out, "removed {removed}")?;
                }
            }
        }
        SnapshotCmd::Verify {
            read_data,
            repair,
            from,
            rebuild_index,
            format,
        } => {
            if *rebuild_index {
                let r = store.rebuild_index()?;
                // JSON output stays one document: the account goes to stderr.
                if *format == Format::Json {
                    print_rebuild(&mut std::io::stderr().lock(), &r)?;
                } else {
                    print_rebuild(&mut out, &r)?;
                }
            }
            verify(
                store,
                &mut out,
                *read_data,
                *repair,
                from.as_deref(),
                *format,
            )?
        }
        SnapshotCmd::Diff { format, a, b } => {
            let (ia, ib) = (store.resolve(a)?, store.resolve(b)?);
            let d = store.diff(&ia, &ib)?;
            let fs = fs_diff(store, &ia, &ib)?;
            if *format == Format::Json {
                let mut v = serde_json::to_value(&d)?;
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("filesystem".into(), serde_json::to_value(&fs)?);
                }
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                print_diff(&mut out, &d)?;
                print_fs_diff(&mut out, &fs)?;
            }
        }
        SnapshotCmd::Gc { dry_run, format } => {
            let r = store.gc(*dry_run)?;
            let (dirs, cache_bytes) = crate::workflows::snapshot::gc_fs_cache(store, *dry_run)?;
            if *format == Format::Json {
                report::print(&mut out, &report::Gc::new(&r, dirs, cache_bytes))?;
                return Ok(0);
            }
            let verb = if *dry_run { "would remove" } else { "removed" };
            writeln!(
                out,
                "{verb} {} blob(s), {} temp file(s), {} cached image(s) or rootfs base(s), freeing {}",
                r.blobs_removed,
                r.tmp_removed,
                dirs,
                human(r.bytes_freed + cache_bytes)
            )?;
        }
        SnapshotCmd::Prune {
            keep_last,
            keep_within,
            dry_run,
            format,
        } => {
            if keep_last.is_none() && keep_within.is_none() {
                bail!("prune needs --keep-last N and/or --keep-within DURATION");
            }
            let removed = store.prune(*keep_last, *keep_within, *dry_run)?;
            crate::workflows::snapshot::gc_fs_cache(store, *dry_run)?;
            if *format == Format::Json {
                report::print(&mut out, &report::Prune::new(*dry_run, &removed))?;
                return Ok(0);
            }
            let verb = if *dry_run { "would forget" } else { "forgot" };
            for id in &removed {
                writeln!(out, "{verb} {}", id.short())?;
            }
            writeln!(out, "{verb} {} snapshot(s)", removed.len())?;
        }
        SnapshotCmd::Export {
            snapshot,
            output,
            format,
            podman_image_id,
            podman_image,
            podman_name,
            podman_cgroup_parent,
            podman_runtime,
        } => {
            let podman = || crate::workflows::podman::PodmanExport {
                image_id: podman_image_id.clone().unwrap_or_default(),
                image_name: podman_image.clone(),
                name: podman_name.clone(),
                cgroup_parent: podman_cgroup_parent.clone(),
                runtime: podman_runtime.clone(),
            };
            if output.as_os_str() == "-" {
                if out.is_terminal() {
                    bail!(
                        "snapshot export -o -: standard output is a terminal; \
                         redirect it to a file or a pipe (or use -o FILE)"
                    );
                }
                match format {
                    ExportFormat::Oci => store.export_to(snapshot, &mut out, Path::new(STDOUT))?,
                    ExportFormat::Podman => {
                        podman_to_stdout(&rt()?, store, snapshot, &podman(), &mut out)?
                    }
                }
                eprintln!("exported {snapshot} to standard output");
                return Ok(0);
            }
            match format {
                ExportFormat::Oci => store.export(snapshot, output)?,
                ExportFormat::Podman => {
                    crate::workflows::podman::export(&rt()?, store, snapshot, output, &podman())?
                }
            }
            writeln!(out, "exported {snapshot} to {}", output.display())?;
        }
        SnapshotCmd::Import { file } => {
            let ids = if file.as_os_str() == "-" {
                if std::io::stdin().is_terminal() {
                    bail!("snapshot import -: standard input is a terminal; pipe or redirect an archive into it");
                }
                store.import_from(&mut std::io::stdin().lock(), Path::new(STDIN))?
            } else {
                store.import(file)?
            };
            for id in ids {
                writeln!(out, "imported {}", id.short())?;
            }
        }
    }
    Ok(0)
}

/// How errors name the standard streams given as `-`.
const STDOUT: &str = "standard output";
const STDIN: &str = "standard input";

/// A podman archive is written to a file (it is built in place); for `-o -` that
/// file is in a private temp directory, then copied to `out`.
fn podman_to_stdout(
    rt: &crate::runtime::Runtime,
    store: &Store,
    snapshot: &str,
    o: &crate::workflows::podman::PodmanExport,
    out: &mut impl Write,
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("stasis-export-")
        .tempdir()
        .context("create a temp directory for the podman archive")?;
    let path = dir.path().join("checkpoint.tar.zst");
    crate::workflows::podman::export(rt, store, snapshot, &path, o)?;
    let mut f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    std::io::copy(&mut f, out).context("write the archive to standard output")?;
    out.flush()
        .context("write the archive to standard output")?;
    Ok(())
}

/// Progress bars only on a terminal.
pub fn progress_wanted() -> bool {
    std::io::stderr().is_terminal()
}

fn print_diff(out: &mut impl Write, d: &DiffReport) -> Result<()> {
    writeln!(out, "a: {} ({})", d.a.short(), human(d.image_bytes_a))?;
    writeln!(out, "b: {} ({})", d.b.short(), human(d.image_bytes_b))?;
    for f in &d.files {
        let mark = match f.change {
            FileChange::Added => "+",
            FileChange::Removed => "-",
            FileChange::Changed => "M",
            FileChange::Unchanged => continue,
        };
        let sizes = match (f.size_a, f.size_b) {
            (Some(a), Some(b)) => format!("{} -> {}", human(a), human(b)),
            (None, Some(b)) => human(b),
            (Some(a), None) => human(a),
            (None, None) => String::new(),
        };
        match &f.pages {
            Some(p) => writeln!(
                out,
                "{mark} {:<24} {sizes}  pages: {} changed, {} added, {} removed, {} new",
                f.name, p.changed, p.added, p.removed, p.new_content
            )?,
            None => writeln!(out, "{mark} {:<24} {sizes}", f.name)?,
        }
    }
    let p = &d.pages;
    writeln!(
        out,
        "pages: {} -> {}; {} changed in place, {} added, {} removed, {} with new content",
        p.pages_a, p.pages_b, p.changed, p.added, p.removed, p.new_content
    )?;
    Ok(())
}

/// File-level changes between the filesystems of two snapshots (empty when
/// neither carries one; everything added or removed when only one does).
fn fs_diff(store: &Store, a: &SnapshotId, b: &SnapshotId) -> Result<Vec<fstree::FileDelta>> {
    let ma = fstree::snapshot_manifest(store, a)?.unwrap_or_default();
    let mb = fstree::snapshot_manifest(store, b)?.unwrap_or_default();
    Ok(fstree::diff_manifests(&ma, &mb))
}

fn print_fs_diff(out: &mut impl Write, fs: &[fstree::FileDelta]) -> Result<()> {
    let (mut added, mut changed, mut removed) = (0, 0, 0);
    let mut tree = None;
    for f in fs {
        if tree != Some(&f.tree) {
            writeln!(out, "filesystem {}:", f.tree)?;
            tree = Some(&f.tree);
        }
        let path = format!("/{}", f.path);
        match (f.change, f.size_a, f.size_b) {
            ("added", _, b) => {
                added += 1;
                writeln!(out, "  + {path}  {}", b.map(human).unwrap_or_default())?
            }
            ("removed", a, _) => {
                removed += 1;
                writeln!(out, "  - {path}  {}", a.map(human).unwrap_or_default())?
            }
            (_, a, b) => {
                changed += 1;
                let sizes = match (a, b) {
                    (Some(a), Some(b)) => format!("{} -> {}", human(a), human(b)),
                    _ => String::new(),
                };
                writeln!(
                    out,
                    "  M {path}  {sizes}  ({})",
                    f.what.unwrap_or("content")
                )?
            }
        }
    }
    writeln!(
        out,
        "filesystem: {added} added, {changed} changed, {removed} removed"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.50 KiB");
        assert_eq!(human(64 << 20), "64.00 MiB");
        assert_eq!(human(u64::MAX), "16.00 EiB");
    }
}
