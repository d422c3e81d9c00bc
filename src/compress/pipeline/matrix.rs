//! One linear weight quantized on one adapter — the part of a layer's work that is
//! independent per matrix, so the matrices of an input group (q/k/v, gate/up) may run on
//! several adapters at once — and the fixed assignment of a group's matrices to adapters.

use crate::dtype::DType;
use crate::error::Result;
use crate::gpu::quant::{self as gq};
use crate::gpu::{Gpu, GpuMatrix};
use crate::lowrank::caldera::{decompose, CalderaOptions};
use crate::model::{Checkpoint, LinearSpec};
use crate::quant::reference::{PreparedHessian, Quantized};
use crate::quant::rht::{rotate_weight, Rht};
use crate::quant::{GptqOptions, Grid};

use crate::format::PackedMatrix;

use super::layer::weighted_errors;
use super::{layout::*, options::*};

/// What every matrix of an input group shares.
pub(crate) struct GroupInput<'a> {
    /// H (rotated by `tn` when there is one), n×n f64.
    pub h: &'a [f64],
    pub n: usize,
    /// H prepared for GPTQ/LDLQ (GPTQ and CALDERA).
    pub prep: Option<&'a PreparedHessian>,
    /// The input transform (`--rht`).
    pub tn: Option<&'a Rht>,
}

/// What the stored weight is made of, for dequantizing it where the layer propagates:
/// codes, or CALDERA's Q, Lᵀ and R.
pub(crate) enum Values {
    Plain(Quantized),
    LowRank(Box<[Quantized; 3]>),
}

/// One quantized linear weight.
pub(crate) struct MatrixOut {
    pub rank: usize,
    pub grid: Grid,
    /// The output transform (`--rht`).
    pub tm: Option<Rht>,
    pub packed: PackedMatrix,
    pub values: Values,
    pub relative_error: Option<f64>,
    /// The dequantized weight on the adapter that computed it (plain methods).
    pub dequantized: Option<GpuMatrix>,
}

/// The seed of an `--rht` transform: FNV-1a of "seed:layer:what".
pub(crate) fn rht_seed(seed: u64, layer: usize, what: &str) -> u64 {
    let tag = format!("{seed}:{layer}:{what}");
    tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Quantize linear `lin` of layer `l` on `gpu` with `recipe`. `hm` is H on `gpu` (plain
/// methods report their weighted error with it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_matrix(
    gpu: &Gpu,
    ck: &Checkpoint,
    gptq: GptqOptions,
    seed: u64,
    l: usize,
    lin: &LinearSpec,
    recipe: &LayerRecipe,
    g: &GroupInput<'_>,
    hm: Option<&GpuMatrix>,
) -> Result<MatrixOut> {
    let mut wv = ck.tensor(&lin.weight.name)?.to_f32()?;
    let (m, n) = (lin.out_features, lin.in_features);
    let tm =
        g.tn.map(|_| Rht::new(m, rht_seed(seed, l, &lin.weight.name)));
    if let (Some(tm), Some(tn)) = (&tm, g.tn) {
        wv = rotate_weight(&wv, m, n, tm, tn);
    }
    // The grid this matrix gets (a k grid falls back on widths that are not whole
    // super-blocks).
    let grid = recipe.grid.for_cols(n);
    if recipe.method == Method::Caldera {
        let cs = &recipe.caldera;
        let rank = cs.rank_for(&grid, m, n)?;
        let co = CalderaOptions {
            rank,
            q_grid: grid,
            lr_grid: cs.lr_grid()?,
            outer_iters: cs.outer_iters,
            inner_iters: cs.inner_iters,
            patience: cs.patience,
            warm_start: false,
            gptq,
            oversample: 10,
            power_iters: 2,
            seed,
            placement: cs.placement,
        };
        let d = decompose(gpu, &wv, m, n, g.h, &co)?;
        let mut packed = pack(&d.q)?;
        if rank > 0 {
            packed.factors = Some(Box::new((pack(&d.lt)?, pack(&d.r)?)));
        }
        return Ok(MatrixOut {
            rank,
            grid,
            tm,
            packed,
            values: Values::LowRank(Box::new([d.q, d.lt, d.r])),
            relative_error: Some(d.relative_error),
            dequantized: None,
        });
    }
    let q = match g.prep {
        Some(p) => {
            gq::sparse_gptq(gpu, &wv, m, n, p, grid, gptq.block, recipe.sparsity)?.download(gpu)?
        }
        None => {
            let wm = GpuMatrix::from_f32(gpu, m, n, DType::F32, &wv)?;
            gq::rtn(gpu, &wm, grid)?.download(gpu)?
        }
    };
    let packed = pack(&q)?;
    let deq = dequantize_in_memory(gpu, &packed, &q)?;
    let rel = match hm {
        Some(hm) => {
            let (err, norm) = weighted_errors(gpu, &wv, &deq, hm)?;
            (norm > 0.0).then(|| err / norm)
        }
        None => None,
    };
    Ok(MatrixOut {
        rank: 0,
        grid,
        tm,
        packed,
        values: Values::Plain(q),
        relative_error: rel,
        dequantized: Some(deq),
    })
}

/// Which adapter (of `devices`) computes each of a group's matrices, by their sizes: the
/// largest first, each to the adapter with the least assigned so far (ties to the lower
/// index). Fixed by the shapes, so a run is reproducible.
pub(crate) fn assign_devices(sizes: &[usize], devices: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut load = vec![0usize; devices.max(1)];
    let mut out = vec![0; sizes.len()];
    for i in order {
        let d = (0..load.len())
            .min_by_key(|&d| (load[d], d))
            .expect("one adapter at least");
        out[i] = d;
        load[d] += sizes[i];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_balanced_over_adapters_the_same_way_every_time() {
        // q, k, v of a GQA layer: q alone on one adapter, k and v on the other.
        assert_eq!(assign_devices(&[9, 3, 3], 2), vec![0, 1, 1]);
        assert_eq!(assign_devices(&[4, 4], 2), vec![0, 1]);
        assert_eq!(assign_devices(&[4], 3), vec![0]);
        assert_eq!(assign_devices(&[2, 2, 2], 1), vec![0, 0, 0]);
        assert_eq!(assign_devices(&[1, 5, 2, 2], 2), vec![1, 0, 1, 1]);
    }
}
