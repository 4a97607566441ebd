//! stasis: an OCI container runtime built around warm starts.
//!
//! Module map (dependencies point down only):
//! `cli` -> `workflows` -> {`runtime`, `store`}, `runtime` -> `criu`; plain runc
//! verbs go from `cli` straight to `runtime`. `store` and `criu` import nothing
//! else of ours.

pub mod cli;
pub mod criu;
pub mod runtime;
pub mod store;
pub mod workflows;
