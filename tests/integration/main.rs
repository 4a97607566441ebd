//! The integration suite of the runtime core: drives the built `stasis` binary
//! (`CARGO_BIN_EXE_stasis`, or `STASIS_TEST_RUNTIME`) with a private `--root` per
//! test, on real namespaces and cgroups. Needs root; `requires!` prints why a test
//! skips, and `STASIS_REQUIRE_ALL=1` (CI) turns every skip into a failure.
//!
//! Modules: `lifecycle` (every verb and legal transition), `spec_options`
//! (runtime-spec options checked from inside the container), `errors` (illegal
//! transitions and bad input: one stderr line, nothing left behind), `runc_compat`
//! (the same bundle through runc and stasis, outputs compared field by field),
//! `exec_security` (what an exec'd process may do, against runc), `faults_store`
//! (the store's staging and caches under kills, full disks and signals).

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
