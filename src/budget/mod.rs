//! Layer-adaptive budgets: how important each decoder layer is, measured on calibration data.
//!
//! [`importance`] holds LSAQ's top-k Jaccard importance.

pub mod allocate;
pub mod candidates;
pub mod importance;
pub mod measure;
pub mod measurement;
pub mod plan;
pub mod report;
pub mod sensitivity;
