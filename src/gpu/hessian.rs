//! Accumulating H = Σ XᵀX over many batches of activations on the GPU.
//!
//! H is held as two f32 matrices (hi, lo) forming a compensated sum (see shaders/linalg/hessian.wgsl);
//! [`HessianAccumulator::read`] returns hi + lo in f64 with the lower triangle mirrored. Each
//! dispatch covers at most [`ROWS_PER_DISPATCH`] rows of X, which bounds the run time of one
//! dispatch (watchdogs) and keeps the per-dispatch f32 sums short.

use crate::dtype::DType;
use crate::error::{Error, Result};

use super::batch::Batch;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::{aligned, operand_wgsl};
use super::pipeline::{Kernel, Spec};

/// The kernel's template (part of the tuning cache's key).
pub(crate) const KERNEL_SOURCE: &str = include_str!("../../shaders/linalg/hessian.wgsl");

const KERNEL: Kernel = Kernel {
    name: "hessian",
    template: KERNEL_SOURCE,
    expand: Some(expand),
};

/// Rows of X summed in plain f32 before a compensated merge.
const BLOCK: u32 = 32;
/// Rows of X one dispatch walks.
pub const ROWS_PER_DISPATCH: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct HessianParams {
    f: u32,
    t: u32,
    x_off: u32,
    h_row0: u32,
    h_rows: u32,
    one_a: f32,
    one_b: f32,
    _pad: u32,
}

/// The register block and workgroup of the accumulation: each invocation owns a
/// (4·`bi`)×(4·`bj`) block of H, a workgroup `wg_x`×`wg_y` invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HessianConfig {
    pub wg_x: u32,
    pub wg_y: u32,
    pub bi: u32,
    pub bj: u32,
}

impl HessianConfig {
    /// `PUMICE_HESSIAN_TILE` (`WGXxWGYxBIxBJ`, for tuning by hand), else the adapter's tuned
    /// configuration (see [`super::tune`]; candidates per class there).
    /// Two loads of four features feed 16 FMAs per row of X in a 4×4 block, four loads 64 in
    /// an 8×8 one. Measured on lavapipe at 1024 features (seconds per 1024 rows; seconds to
    /// compile): 4×4 blocks in 8×8 workgroups 0.336 / 0.3, 8×8 in 8×1 0.174 / 1.1, 16×8
    /// 0.139 / 3.5, 16×16 0.116 / 13 — compile time grows faster than the gain. In the asset
    /// model's GPTQ run (64 × 256 tokens) 16×8 takes the Hessians from 6.7 s to 5.5 s.
    pub fn for_gpu(gpu: &Gpu) -> HessianConfig {
        static OVERRIDE: std::sync::OnceLock<Option<HessianConfig>> = std::sync::OnceLock::new();
        let o = OVERRIDE.get_or_init(|| {
            std::env::var("PUMICE_HESSIAN_TILE")
                .ok()
                .and_then(|v| HessianConfig::parse(&v))
        });
        match o {
            Some(c) => *c,
            None => gpu.tuning().hessian,
        }
    }

    /// `WGXxWGYxBIxBJ`, as Display writes it.
    pub fn parse(s: &str) -> Option<HessianConfig> {
        match super::tune::parse_dims(s)?[..] {
            [wg_x, wg_y, bi, bj]
                if wg_x * wg_y > 0 && (1..=8).contains(&bi) && (1..=8).contains(&bj) =>
            {
                Some(HessianConfig { wg_x, wg_y, bi, bj })
            }
            _ => None,
        }
    }

    fn tile_i(&self) -> usize {
        (4 * self.bi * self.wg_y) as usize
    }
    fn tile_j(&self) -> usize {
        (4 * self.bj * self.wg_x) as usize
    }
}

impl std::fmt::Display for HessianConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}", self.wg_x, self.wg_y, self.bi, self.bj)
    }
}

/// The written-out register block, from the spec's WG_X, WG_Y, BI and BJ (run when a
/// variant's pipeline is built; see [`Kernel::expand`]).
fn expand(spec: &Spec) -> Result<Vec<(&'static str, String)>> {
    Ok(unrolled(HessianConfig {
        wg_x: spec.number("WG_X")?,
        wg_y: spec.number("WG_Y")?,
        bi: spec.number("BI")?,
        bj: spec.number("BJ")?,
    }))
}

/// The kernel's register block written out for `cfg` (see shaders/linalg/hessian.wgsl).
fn unrolled(cfg: HessianConfig) -> Vec<(&'static str, String)> {
    use std::fmt::Write;
    let rows = 4 * cfg.bi;
    let (mut setup, mut zero, mut step, mut merge, mut stores) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    for r in 0..rows {
        for g in 0..cfg.bj {
            let _ = writeln!(
                setup,
                "    var s{r}_{g} = vec4<f32>(0.0);\n    var e{r}_{g} = vec4<f32>(0.0);"
            );
            let _ = writeln!(zero, "        var b{r}_{g} = vec4<f32>(0.0);");
            let _ = writeln!(
                merge,
                "        {{ let q = two_sum(s{r}_{g}, b{r}_{g}); s{r}_{g} = q.s; e{r}_{g} = e{r}_{g} + q.e; }}"
            );
            let _ = writeln!(
                stores,
                "    store(i0 + {r}u, j0 + {}u, s{r}_{g}, e{r}_{g});",
                4 * g * cfg.wg_x
            );
        }
    }
    for a in 0..cfg.bi {
        let _ = writeln!(
            step,
            "            let xi{a} = load_feats(row, i0 + {}u);",
            4 * a
        );
    }
    for g in 0..cfg.bj {
        let _ = writeln!(
            step,
            "            let xj{g} = load_feats(row, j0 + {}u);",
            4 * g * cfg.wg_x
        );
    }
    const C: [&str; 4] = ["x", "y", "z", "w"];
    for r in 0..rows {
        for g in 0..cfg.bj {
            let _ = writeln!(
                step,
                "            b{r}_{g} = b{r}_{g} + xi{}.{} * xj{g};",
                r / 4,
                C[(r % 4) as usize]
            );
        }
    }
    vec![
        ("SETUP", setup),
        ("ZERO", zero),
        ("STEP", step),
        ("MERGE", merge),
        ("STORES", stores),
    ]
}

/// Running XᵀX for one linear layer's input (features = the layer's input width).
pub struct HessianAccumulator {
    features: usize,
    hi: GpuMatrix,
    lo: GpuMatrix,
    rows_seen: u64,
}

impl HessianAccumulator {
    pub fn new(gpu: &Gpu, features: usize) -> Result<Self> {
        if features == 0 {
            return Err(Error::Shape("Hessian of zero features".into()));
        }
        Ok(HessianAccumulator {
            features,
            hi: GpuMatrix::zeros(gpu, features, features)?,
            lo: GpuMatrix::zeros(gpu, features, features)?,
            rows_seen: 0,
        })
    }

    pub fn features(&self) -> usize {
        self.features
    }

    /// Rows (tokens) accumulated so far.
    pub fn rows_seen(&self) -> u64 {
        self.rows_seen
    }

    /// Record `H += XᵀX` for a batch X of shape [tokens, features] into `batch`.
    pub fn accumulate(&mut self, batch: &mut Batch<'_>, x: &GpuMatrix) -> Result<()> {
        let cfg = HessianConfig::for_gpu(batch.gpu());
        self.accumulate_with(batch, x, cfg)
    }

    /// [`HessianAccumulator::accumulate`] with the configuration given (tuning and the tests of
    /// every candidate).
    pub fn accumulate_with(
        &mut self,
        batch: &mut Batch<'_>,
        x: &GpuMatrix,
        cfg: HessianConfig,
    ) -> Result<()> {
        let f = self.features;
        if x.cols() != f {
            return Err(Error::Shape(format!(
                "activations have {} features, the Hessian {f}",
                x.cols()
            )));
        }
        let gpu = batch.gpu();
        for xc in x.chunks() {
            let mut t0 = 0;
            while t0 < xc.rows {
                let t = (xc.rows - t0).min(ROWS_PER_DISPATCH);
                let x_off = t0 * f;
                let spec = Spec::new()
                    .set(
                        "OPERANDS",
                        operand_wgsl("x", 1, x.dtype(), aligned(x_off, f)),
                    )
                    .set("WG_X", cfg.wg_x)
                    .set("WG_Y", cfg.wg_y)
                    .set("BI", cfg.bi)
                    .set("BJ", cfg.bj)
                    .set("BLOCK", BLOCK);
                let pipeline = gpu.pipeline(&KERNEL, &spec)?;
                for (hc, lc) in self.hi.chunks().iter().zip(self.lo.chunks()) {
                    let params = HessianParams {
                        f: f as u32,
                        t: t as u32,
                        x_off: x_off as u32,
                        h_row0: hc.row0 as u32,
                        h_rows: hc.rows as u32,
                        one_a: 1.0,
                        one_b: 1.0,
                        _pad: 0,
                    };
                    let wg = [
                        f.div_ceil(cfg.tile_j()) as u32,
                        hc.rows.div_ceil(cfg.tile_i()) as u32,
                        1,
                    ];
                    batch.dispatch(pipeline.clone(), &params, &[&xc.buf, &hc.buf, &lc.buf], wg)?;
                }
                t0 += t;
            }
        }
        self.rows_seen += x.rows() as u64;
        Ok(())
    }

    /// Convenience: upload host activations (f32, row-major [tokens, features]) and accumulate.
    pub fn accumulate_host(&mut self, gpu: &Gpu, x: &[f32]) -> Result<()> {
        let f = self.features;
        if !x.len().is_multiple_of(f) {
            return Err(Error::Shape(format!(
                "{} values are not rows of {f} features",
                x.len()
            )));
        }
        let xm = GpuMatrix::from_f32(gpu, x.len() / f, f, DType::F32, x)?;
        let mut batch = Batch::new(gpu);
        self.accumulate(&mut batch, &xm)?;
        batch.submit()
    }

    /// The full symmetric H = Σ XᵀX (not divided by the row count), row-major, in f64.
    pub fn read(&self, gpu: &Gpu) -> Result<Vec<f64>> {
        let f = self.features;
        let hi = self.hi.to_f32(gpu)?;
        let lo = self.lo.to_f32(gpu)?;
        let mut h = vec![0.0f64; f * f];
        for i in 0..f {
            for j in i..f {
                let v = hi[i * f + j] as f64 + lo[i * f + j] as f64;
                h[i * f + j] = v;
                h[j * f + i] = v;
            }
        }
        Ok(h)
    }
}
