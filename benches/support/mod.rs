//! Shared by the benchmarks.

/// Deterministic pseudo-random values (xorshift) uniform in [-0.5, 0.5): the ones `pumice bench`
/// uses.
#[allow(unused_imports)]
pub use pumice::bench::values;
