//! The ground floor: small utilities every other module may use and that use nothing of
//! pumice but `Error`: the seeded random numbers ([`rng`]), atomic file writes ([`atomic`]),
//! output directories written whole or not at all ([`outdir`]) and SHA-256 helpers ([`hash`]).
//!
//! Invariant: nothing here knows about models, GPUs or formats.

pub mod atomic;
pub mod hash;
pub mod outdir;
pub mod rng;
