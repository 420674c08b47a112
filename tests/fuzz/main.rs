//! Property tests ("fuzz targets") run as ordinary tests with a bounded case count: config
//! parsing, routing against a naive reference, hop-by-hop header handling, and raw requests
//! through both request paths to a recording backend (`wire`). One test binary,
//! one module per target.
//!
//! `PROPTEST_CASES` raises the count (`scripts/fuzz.sh` does, for a bounded time). A failure
//! prints the minimal input proptest shrank it to.

mod config;
mod headers;
mod routing;
mod wire;

use proptest::test_runner::Config as ProptestConfig;

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

/// The proptest settings every target uses.
fn cfg() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Failures are reported in the test output; no files written into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
