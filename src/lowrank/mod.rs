//! Low-rank machinery for CALDERA: randomized SVD with GPU products ([`rsvd`]).

pub mod caldera;
pub mod fit;
pub mod rsvd;

pub use rsvd::{rsvd, rsvd_host, RsvdOptions, Svd};
