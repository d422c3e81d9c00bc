//! General matrix multiply on the GPU: `C (+)= A · B` or `C (+)= A · Bᵀ`, with A and B stored as
//! f32, f16 or bf16 and f32 accumulation and output.
//!
//! Chunked operands: A and C are walked chunk against chunk over the rows they share. For
//! `A · B`, B's chunks are ranges of the contraction (k), so they are accumulated one after the
//! other into C; for `A · Bᵀ`, B's chunks are ranges of C's columns and write disjoint blocks.

use std::ops::Range;

use crate::error::{Error, Result};

use super::batch::Batch;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::{aligned, operand_wgsl};
use super::pipeline::{Kernel, Spec};

/// The kernel's template (part of the tuning cache's key).
pub(crate) const KERNEL_SOURCE: &str = include_str!("../../shaders/linalg/gemm.wgsl");

const KERNEL: Kernel = Kernel {
    name: "gemm",
    template: KERNEL_SOURCE,
    expand: Some(expand),
};

/// Output tile per workgroup: each invocation computes `tm`×`tn` elements (`tn` a multiple of
/// 4), a workgroup (`tm`·`wg_y`)×(`tn`·`wg_x`). With `sg`, the lanes of a subgroup share the
/// loads of A (each loads one row in S, the others take it by broadcast; with `tm` = 1, four
/// of every 4·S contraction values instead) where the adapter has one fixed subgroup size S,
/// `wg_y` is 1, S divides `wg_x`, and `tm` is 1 or a multiple of S; elsewhere `sg` is
/// ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    pub wg_x: u32,
    pub wg_y: u32,
    pub tm: u32,
    pub tn: u32,
    pub sg: bool,
}

impl GemmConfig {
    /// The adapter's configuration for products of many rows: `PUMICE_GEMM_TILE` when set,
    /// else the tuned one (see [`super::tune`]).
    pub fn for_gpu(gpu: &Gpu) -> GemmConfig {
        if let Some(c) = Self::tile_override() {
            return c;
        }
        gpu.tuning().gemm
    }
    /// The configuration for a product of `m` rows and `n` columns on `gpu`:
    /// [`GemmConfig::for_gpu`]; for one row (decode) the tuned one-row configuration; for a
    /// few rows — fewer than the tile, which would compute TM − m clamped rows for nothing —
    /// one or a few rows per invocation in a wider workgroup of the same size; for fewer
    /// columns than the tile (a low-rank factor's k) a narrower, taller workgroup of the same
    /// size. `PUMICE_GEMM_TILE` is taken as it is.
    pub fn for_product(gpu: &Gpu, m: usize, n: usize) -> GemmConfig {
        let base = Self::for_gpu(gpu);
        if Self::tile_override().is_some() {
            return base;
        }
        if m <= 1 {
            return gpu.tuning().gemv;
        }
        if m < base.tile_m() {
            let tm = (m.next_power_of_two() as u32).min(base.tm);
            let wg_x = (base.wg_x * base.wg_y * base.tm / tm)
                .min(gpu.caps().max_invocations)
                .max(1);
            return GemmConfig {
                wg_x,
                wg_y: 1,
                tm,
                ..base
            };
        }
        if n < base.tile_n() {
            let wg_x = (n.div_ceil(base.tn as usize).next_power_of_two() as u32).min(base.wg_x);
            return GemmConfig {
                wg_x,
                wg_y: base.wg_y * base.wg_x / wg_x,
                ..base
            };
        }
        base
    }

    /// `PUMICE_GEMM_TILE` (used for tuning), read once per process: every product asks.
    fn tile_override() -> Option<GemmConfig> {
        static TILE: std::sync::OnceLock<Option<GemmConfig>> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| {
            std::env::var("PUMICE_GEMM_TILE")
                .ok()
                .and_then(|v| Self::parse(&v))
        })
    }

    /// `WGXxWGYxTM[xTN][+sg]`, e.g. `8x1x8` or `8x1x32x8+sg` (the `PUMICE_GEMM_TILE` override
    /// used for tuning; TN defaults to 4).
    pub fn parse(s: &str) -> Option<GemmConfig> {
        let (dims, sg) = match s.trim().strip_suffix("+sg") {
            Some(d) => (d, true),
            None => (s, false),
        };
        let (wg_x, wg_y, tm, tn) = match super::tune::parse_dims(dims)?[..] {
            [wg_x, wg_y, tm] => (wg_x, wg_y, tm, 4),
            [wg_x, wg_y, tm, tn] => (wg_x, wg_y, tm, tn),
            _ => return None,
        };
        let fits = wg_x > 0
            && wg_y > 0
            && (1..=32).contains(&tm)
            && tn.is_multiple_of(4)
            && (4..=32).contains(&tn);
        fits.then_some(GemmConfig {
            wg_x,
            wg_y,
            tm,
            tn,
            sg,
        })
    }
    /// Subgroup lanes the kernel shares A's rows across on `gpu`: S where `sg` takes effect
    /// (see [`GemmConfig`]), else 0.
    pub fn subgroup_lanes(&self, gpu: &Gpu) -> u32 {
        match gpu.caps().fixed_subgroup() {
            Some(s)
                if self.sg
                    && self.wg_y == 1
                    && self.wg_x.is_multiple_of(s)
                    && (self.tm == 1 || self.tm.is_multiple_of(s)) =>
            {
                s
            }
            _ => 0,
        }
    }
    pub fn tile_m(&self) -> usize {
        (self.tm * self.wg_y) as usize
    }
    pub fn tile_n(&self) -> usize {
        (self.tn * self.wg_x) as usize
    }
}

impl std::fmt::Display for GemmConfig {
    /// `WGXxWGYxTMxTN`, as [`GemmConfig::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}x{}", self.wg_x, self.wg_y, self.tm, self.tn)?;
        if self.sg {
            f.write_str("+sg")?;
        }
        Ok(())
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    accumulate: u32,
    alpha: f32,
    _pad1: u32,
}

/// Which product to form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmOp {
    /// C = A · B, B stored [k, n].
    NN,
    /// C = A · Bᵀ, B stored [n, k] (a linear layer's weight).
    NT,
}

impl GemmOp {
    /// Columns of op(B), i.e. of C.
    pub fn out_cols(self, b: &GpuMatrix) -> usize {
        match self {
            GemmOp::NN => b.cols(),
            GemmOp::NT => b.rows(),
        }
    }
}

/// Record `C (+)= A · op(B)` into `batch`. C must be f32 with shape [A.rows, n].
pub fn gemm(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    accumulate: bool,
) -> Result<()> {
    if c.rows() != a.rows() || c.cols() != op.out_cols(b) {
        return Err(Error::Shape(format!(
            "gemm {op:?}: A {:?}, B {:?}, C {:?}",
            a.shape(),
            b.shape(),
            c.shape()
        )));
    }
    gemm_rows(batch, a, 0..a.rows(), b, op, c, 0, accumulate)
}

/// Record `C[c_row0 + i] (+)= A[a_rows.start + i] · op(B)` for `i < a_rows.len()`: a product
/// over a range of A's rows written at an offset in C (e.g. new tokens into a KV cache, or the
/// LM head over a block of positions). C must be f32.
#[allow(clippy::too_many_arguments)]
pub fn gemm_rows(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    accumulate: bool,
) -> Result<()> {
    if c.cols() != op.out_cols(b) {
        return Err(Error::Shape(format!(
            "gemm_rows: C has {} columns, op(B) {}",
            c.cols(),
            op.out_cols(b)
        )));
    }
    gemm_region(batch, a, a_rows, b, op, c, c_row0, 0, accumulate)
}

/// Like [`gemm_rows`], writing the product into the columns `c_col0..c_col0 + n` of C (C may
/// be wider than op(B)); e.g. GPTQ's lazy update of the columns after a block.
#[allow(clippy::too_many_arguments)]
pub fn gemm_region(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    c_col0: usize,
    accumulate: bool,
) -> Result<()> {
    // Checked again (and empty products skipped) in gemm_with_config.
    let m = a_rows.len();
    let n = match op {
        GemmOp::NN => b.cols(),
        GemmOp::NT => b.rows(),
    };
    let cfg = GemmConfig::for_product(batch.gpu(), m, n);
    gemm_with_config(batch, a, a_rows, b, op, c, c_row0, c_col0, accumulate, cfg)
}

/// `C (+)= alpha · A · op(B)` over all rows (the gradients' scaled products: LoRA's α/r).
pub fn gemm_scaled(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    accumulate: bool,
    alpha: f32,
) -> Result<()> {
    let cfg = GemmConfig::for_product(batch.gpu(), a.rows(), op.out_cols(b));
    gemm_impl(
        batch,
        a,
        0..a.rows(),
        b,
        op,
        c,
        0,
        0,
        accumulate,
        cfg,
        alpha,
    )
}

/// [`gemm_region`] with the configuration given (tuning and the tests of every candidate).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with_config(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    c_col0: usize,
    accumulate: bool,
    cfg: GemmConfig,
) -> Result<()> {
    gemm_impl(
        batch, a, a_rows, b, op, c, c_row0, c_col0, accumulate, cfg, 1.0,
    )
}

#[allow(clippy::too_many_arguments)]
fn gemm_impl(
    batch: &mut Batch<'_>,
    a: &GpuMatrix,
    a_rows: Range<usize>,
    b: &GpuMatrix,
    op: GemmOp,
    c: &GpuMatrix,
    c_row0: usize,
    c_col0: usize,
    accumulate: bool,
    cfg: GemmConfig,
    alpha: f32,
) -> Result<()> {
    let k = a.cols();
    let (kb, n) = match op {
        GemmOp::NN => (b.rows(), b.cols()),
        GemmOp::NT => (b.cols(), b.rows()),
    };
    let m = a_rows.len();
    let ldc = c.cols();
    if kb != k || c_col0 + n > ldc || a_rows.end > a.rows() || c_row0 + m > c.rows() {
        return Err(Error::Shape(format!(
            "gemm {op:?}: A {:?} rows {a_rows:?}, B {:?}, C {:?} from row {c_row0}",
            a.shape(),
            b.shape(),
            c.shape()
        )));
    }
    if c.dtype() != crate::dtype::DType::F32 {
        return Err(Error::Shape(format!(
            "gemm output must be f32, not {}",
            c.dtype()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::Shape(
            "gemm with an empty contraction (k = 0)".into(),
        ));
    }
    if !cfg.tn.is_multiple_of(4) || cfg.tn == 0 || cfg.tm == 0 || cfg.wg_x * cfg.wg_y == 0 {
        return Err(Error::InvalidArgument(format!("gemm configuration {cfg}")));
    }
    let gpu = batch.gpu();
    let max_wg = gpu.caps().max_workgroups_per_dim as usize;
    let rows_per_dispatch = max_wg * cfg.tile_m();
    let cols_per_dispatch = max_wg * cfg.tile_n();
    // Contraction per dispatch within the loop budget: the register block is written out,
    // so a step of four is one loop iteration and a tail step one more; each of the TM·TN4
    // stores loops over four columns.
    let stores = cfg.tm as u64 * (cfg.tn / 4) as u64 * 5;
    let k_span = (gpu.caps().loop_budget().saturating_sub(stores + 8) * 4).max(4) as usize;
    // Row i of A (in a_rows) goes to row i + shift of C.
    let shift = c_row0 as isize - a_rows.start as isize;

    for ac in a.chunks() {
        let ar0 = ac.row0.max(a_rows.start);
        let ar1 = (ac.row0 + ac.rows).min(a_rows.end);
        for cc in c.chunks() {
            // The A rows of this chunk pair, in A's coordinates.
            let r0 = ar0.max((cc.row0 as isize - shift).max(0) as usize);
            let r1 = ar1.min(((cc.row0 + cc.rows) as isize - shift).max(0) as usize);
            if r0 >= r1 {
                continue;
            }
            for (bi, bc) in b.chunks().iter().enumerate() {
                // (first column of C, columns, first k, contraction length, accumulate)
                let (col0, ncols, k0, kc, acc) = match op {
                    GemmOp::NT => (bc.row0, bc.rows, 0, k, accumulate),
                    GemmOp::NN => (0, n, bc.row0, bc.rows, accumulate || bi > 0),
                };
                let mut rs = r0;
                while rs < r1 {
                    let rn = (r1 - rs).min(rows_per_dispatch);
                    let c_local = (rs as isize + shift) as usize - cc.row0;
                    let mut cs = 0;
                    while cs < ncols {
                        let cn = (ncols - cs).min(cols_per_dispatch);
                        let mut ks = 0;
                        while ks < kc {
                            let kn = (kc - ks).min(k_span);
                            let a_off = (rs - ac.row0) * k + k0 + ks;
                            let b_off = match op {
                                GemmOp::NT => cs * k + ks,
                                GemmOp::NN => cs + ks * b.cols(),
                            };
                            let params = GemmParams {
                                m: rn as u32,
                                n: cn as u32,
                                k: kn as u32,
                                lda: k as u32,
                                ldb: b.cols() as u32,
                                ldc: ldc as u32,
                                a_off: a_off as u32,
                                b_off: b_off as u32,
                                c_off: (c_local * ldc + c_col0 + col0 + cs) as u32,
                                accumulate: (acc || ks > 0) as u32,
                                alpha,
                                _pad1: 0,
                            };
                            let a_al = aligned(a_off, k);
                            let b_al = aligned(b_off, b.cols());
                            let spec = Spec::new()
                                .set(
                                    "OPERANDS",
                                    format!(
                                        "{}{}",
                                        operand_wgsl("a", 1, a.dtype(), a_al),
                                        operand_wgsl("b", 2, b.dtype(), b_al)
                                    ),
                                )
                                .set("WG_X", cfg.wg_x)
                                .set("WG_Y", cfg.wg_y)
                                .set("TM", cfg.tm)
                                .set("TN4", cfg.tn / 4)
                                .set("B_T", op == GemmOp::NT)
                                .set("SG", cfg.subgroup_lanes(gpu));
                            let pipeline = gpu.pipeline(&KERNEL, &spec)?;
                            let wg = [
                                cn.div_ceil(cfg.tile_n()) as u32,
                                rn.div_ceil(cfg.tile_m()) as u32,
                                1,
                            ];
                            batch.dispatch(pipeline, &params, &[&ac.buf, &bc.buf, &cc.buf], wg)?;
                            ks += kn;
                        }
                        cs += cn;
                    }
                    rs += rn;
                }
            }
        }
    }
    Ok(())
}

/// The kernel's register block written out (see shaders/linalg/gemm.wgsl) from the spec's
/// WG_X, WG_Y, TM, TN4 and SG: set-up, the shared wide step, one contraction step of four and
/// a tail step for each orientation, and the stores (run when a variant's pipeline is built;
/// see [`Kernel::expand`]).
fn expand(spec: &Spec) -> Result<Vec<(&'static str, String)>> {
    let sg = spec.number("SG")?;
    Ok(write_unrolled(
        GemmConfig {
            wg_x: spec.number("WG_X")?,
            wg_y: spec.number("WG_Y")?,
            tm: spec.number("TM")?,
            tn: 4 * spec.number("TN4")?,
            sg: sg > 0,
        },
        sg,
    ))
}

fn write_unrolled(cfg: GemmConfig, sg: u32) -> Vec<(&'static str, String)> {
    use std::fmt::Write;
    let tm = cfg.tm;
    // Subgroup sharing (see GemmConfig): of A's rows (TM a multiple of S), or, for one row,
    // of A's contraction: lane l loads elements 4l..4l+3 of each 4·S, a wide step of S.
    let share_rows = sg > 0 && tm.is_multiple_of(sg);
    let share_k = sg > 0 && tm == 1;
    // Column j of group g (WGSL expression).
    let col = |g: u32| format!("(j0 + {}u)", 4 * g * cfg.wg_x);
    let mut setup = String::new();
    if share_rows {
        for q in 0..tm / sg {
            let _ = writeln!(
                setup,
                "    let as_{q} = p.a_off + min(i0 + {}u + sg_lane, last_i) * p.lda;",
                q * sg
            );
        }
    }
    for r in 0..tm {
        let _ = writeln!(
            setup,
            "    let a_{r} = p.a_off + min(i0 + {r}u, last_i) * p.lda;"
        );
        for g in 0..cfg.tn / 4 {
            let _ = writeln!(setup, "    var acc_{r}_{g} = vec4<f32>(0.0);");
        }
    }
    let mut nt_setup = String::new();
    for g in 0..cfg.tn / 4 {
        let j = col(g);
        let _ = writeln!(
            nt_setup,
            "        let b{g} = p.b_off + min(vec4<u32>({j}, {j} + 1u, {j} + 2u, {j} + 3u), vec4<u32>(last_j)) * p.ldb;"
        );
    }
    let broadcast_rows = |r: u32| format!("subgroupBroadcast(xs{}, {}u)", r / sg, r % sg);
    let load_rows = |r: u32| format!("load_a4(a_{r} + kk)");
    let step_x: &dyn Fn(u32) -> String = if share_rows {
        &broadcast_rows
    } else {
        &load_rows
    };
    let mut row_loads = String::new();
    if share_rows {
        for q in 0..tm / sg {
            let _ = writeln!(row_loads, "            let xs{q} = load_a4(as_{q} + kk);");
        }
    }
    let nt_step = row_loads.clone() + &step_body(cfg, true, "kk", step_x);
    let nn_step = row_loads + &step_body(cfg, false, "kk", step_x);
    // The wide step (one row, contraction shared): S sub-steps, each in its own block.
    let (mut nt_wide, mut nn_wide) = (String::new(), String::new());
    if share_k {
        for (out, b_t) in [(&mut nt_wide, true), (&mut nn_wide, false)] {
            let _ = writeln!(
                out,
                "        for (var kk = 0u; kk < kw; kk = kk + {}u) {{\n            let xs = load_a4(a_0 + kk + 4u * sg_lane);",
                4 * sg
            );
            for t in 0..sg {
                let k = format!("(kk + {}u)", 4 * t);
                let x = |_r: u32| format!("subgroupBroadcast(xs, {t}u)");
                let _ = writeln!(
                    out,
                    "            {{\n{}            }}",
                    step_body(cfg, b_t, &k, &x)
                );
            }
            out.push_str("        }");
        }
    }
    let mut nt_tail = String::new();
    let mut nn_tail = String::new();
    for g in 0..cfg.tn / 4 {
        let j = col(g);
        let _ = writeln!(
            nt_tail,
            "            let y{g} = vec4<f32>(load_b1(b{g}.x + kk), load_b1(b{g}.y + kk), load_b1(b{g}.z + kk), load_b1(b{g}.w + kk));"
        );
        let _ = writeln!(
            nn_tail,
            "            let y{g} = load_b4_clamped(p.b_off + kk * p.ldb, {j}, p.n);"
        );
    }
    for r in 0..tm {
        for tail in [&mut nt_tail, &mut nn_tail] {
            let _ = writeln!(tail, "            let x{r} = load_a1(a_{r} + kk);");
            for g in 0..cfg.tn / 4 {
                let _ = writeln!(tail, "            acc_{r}_{g} = acc_{r}_{g} + x{r} * y{g};");
            }
        }
    }
    let mut stores = String::new();
    for r in 0..tm {
        for g in 0..cfg.tn / 4 {
            let _ = writeln!(stores, "    store(i0 + {r}u, {}, acc_{r}_{g});", col(g));
        }
    }
    let (args, exit) = if sg > 0 {
        (", @builtin(subgroup_invocation_id) sg_lane: u32", "")
    } else {
        (
            "",
            "    if (i0 >= p.m || j0 >= p.n) {\n        return;\n    }",
        )
    };
    let wide_end = if share_k {
        format!("p.k - p.k % {}u", 4 * sg)
    } else {
        "0u".into()
    };
    vec![
        ("SG_ARGS", args.into()),
        ("EARLY_EXIT", exit.into()),
        ("SETUP", setup),
        ("WIDE_END", wide_end),
        ("NT_SETUP", nt_setup),
        ("NT_WIDE", nt_wide),
        ("NT_STEP", nt_step),
        ("NT_TAIL", nt_tail),
        ("NN_WIDE", nn_wide),
        ("NN_STEP", nn_step),
        ("NN_TAIL", nn_tail),
        ("STORES", stores),
    ]
}

/// One contraction step of four at `k` (a WGSL expression): B's TN columns over k..k+3 as
/// mat4x4s, row r of A's four values from `x(r)`, TM·TN/4 products into the accumulators.
fn step_body(cfg: GemmConfig, b_t: bool, k: &str, x: &dyn Fn(u32) -> String) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !b_t {
        let _ = writeln!(out, "            let rb = p.b_off + {k} * p.ldb;");
    }
    for g in 0..cfg.tn / 4 {
        let j = format!("(j0 + {}u)", 4 * g * cfg.wg_x);
        let _ = if b_t {
            writeln!(
                out,
                "            let y{g} = mat4x4<f32>(load_b4(b{g}.x + {k}), load_b4(b{g}.y + {k}), load_b4(b{g}.z + {k}), load_b4(b{g}.w + {k}));"
            )
        } else {
            writeln!(
                out,
                "            let y{g} = mat4x4<f32>(load_b4_clamped(rb, {j}, p.n), load_b4_clamped(rb + p.ldb, {j}, p.n), load_b4_clamped(rb + 2u * p.ldb, {j}, p.n), load_b4_clamped(rb + 3u * p.ldb, {j}, p.n));"
            )
        };
    }
    for r in 0..cfg.tm {
        let _ = writeln!(out, "            let x{r} = {};", x(r));
        for g in 0..cfg.tn / 4 {
            // NT: yG's column c is B[j + c, k..k+3], so x · yG = (x·y0, …, x·y3); NN: yG's
            // column t is B[k + t, j..j+3], so yG · x = Σ_t x_t · B[k + t, j..].
            let prod = if b_t {
                format!("x{r} * y{g}")
            } else {
                format!("y{g} * x{r}")
            };
            let _ = writeln!(out, "            acc_{r}_{g} = acc_{r}_{g} + {prod};");
        }
    }
    out
}

/// `A · op(B)` into a new f32 matrix, submitted at once.
pub fn matmul(gpu: &Gpu, a: &GpuMatrix, b: &GpuMatrix, op: GemmOp) -> Result<GpuMatrix> {
    let c = GpuMatrix::uninit(gpu, a.rows(), op.out_cols(b))?;
    let mut batch = Batch::new(gpu);
    gemm(&mut batch, a, b, op, &c, false)?;
    batch.submit()?;
    Ok(c)
}
