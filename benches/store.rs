//! Snapshot store benchmark (being written).
fn main() {}
