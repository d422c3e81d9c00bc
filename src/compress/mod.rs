//! Compression: calibration data ([`calib`]) and the layer-by-layer pipeline ([`pipeline`])
//! that collects Hessians, quantizes every linear layer and writes a compressed checkpoint
//! (format: `model::compressed`).

pub mod calib;
pub mod hessdir;
pub mod pipeline;
pub mod review;
pub mod workdir;
pub mod xtx;
