//! stasis: an OCI container runtime built around warm starts.
//!
//! Module map (dependencies point down only):
//! `cli` -> `runtime`. Later: `cli` -> `workflows` -> {`runtime`, `store`},
//! `runtime` -> `criu`.

pub mod cli;
pub mod criu;
pub mod runtime;
pub mod store;
