//! The integration suite of the runtime core: drives the built `stasis` binary
//! (`CARGO_BIN_EXE_stasis`, or `STASIS_TEST_RUNTIME`) with a private `--root` per
//! test, on real namespaces and cgroups. Needs root; `requires!` prints why a test
//! skips, and `STASIS_REQUIRE_ALL=1` (CI) turns every skip into a failure.
//!
//! Modules (`common` is the shared harness: `requires!`, `test_name!`, `Env`,
//! the `Container` guard, `wait_until`, `wait_stopped_at_fault`):
//! - `lifecycle`: every verb and legal transition;
//! - `spec_options`: runtime-spec options checked from inside the container;
//! - `errors`: illegal transitions and bad input: one stderr line, nothing left behind;
//! - `exit_codes`: why a process could not start (127/126), against runc;
//! - `runc_compat`: the same bundle through runc and stasis, outputs compared field by field;
//! - `exec_security`: what an exec'd process may do, against runc;
//! - `terminal`: `exec -t` and `process.terminal` under a real pty, against runc;
//! - `clients`: podman and containerd (`ctr`) driving stasis as their runtime;
//! - `docker`: dockerd (private data root) driving stasis as its runtime;
//! - `cr`: checkpoint/restore round trips (pipes, pty, bind mounts, sockets);
//! - `store_flows`: the snapshot store through the CLI (tags, dedup, corruption);
//! - `store_cli`: `snapshot inspect`, a mistyped `--store`, `prune` per series;
//! - `checkpoint_hints`: failures whose error carries a hint (rlimits, `--copies` without `-d`);
//! - `copies`: `restore --from --copies N` and `--copy-rootfs`;
//! - `warm`: `prewarm` with each probe kind, then `restore --from`;
//! - `databases`: warm starts of Redis and PostgreSQL;
//! - `scripting`: archives through pipes and `--format json` output;
//! - `faults_checkpoint`, `faults_restore`: checkpoint and restore killed at each fault point;
//! - `faults_maintenance`: `snapshot gc`, `prune` and `import` killed at a fault point;
//! - `faults_store`: the store's staging and caches under kills, full disks and signals;
//! - `damaged_store`: flipped bytes, re-import and `snapshot verify --repair`;
//! - `security`: what an unprivileged user can read or execute around snapshots;
//! - `hostile`: crafted snapshots whose tables claim more than they hold.

#[macro_use]
mod common;

mod checkpoint_hints;
mod clients;
mod copies;
mod cr;
mod damaged_store;
mod databases;
mod docker;
mod errors;
mod exec_security;
mod exit_codes;
mod faults_checkpoint;
mod faults_maintenance;
mod faults_restore;
mod faults_store;
mod hostile;
mod lifecycle;
mod runc_compat;
mod scripting;
mod security;
mod spec_options;
mod store_cli;
mod store_flows;
mod terminal;
mod warm;
