//! Placeholder, replaced by the router benchmarks.
fn main() {}
