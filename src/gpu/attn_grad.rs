//! Causal GQA attention backward for prefill batches (shaders/grad/attn_grad_{q,kv}.wgsl):
//! gradients of q, k and v from the output's gradient, recomputing the probabilities (the
//! row's log-sum-exp in a first pass over its keys), so memory stays O(T·d) as in the forward.
//! Two kernels, no atomics: one invocation per (query row, head) forms dq and stores (L, D =
//! dO·O) per row and head; one per (key row, kv head) forms dk and dv over the queries that see
//! the key and the heads sharing it. f64 reference: [`crate::cpu::grad::attention_backward`].

use crate::dtype::DType;
use crate::error::Result;

use super::batch::Batch;
use super::matrix::GpuMatrix;
use super::ops::{check, head_vector};
use super::pipeline::{Kernel, Spec};

const ATTN_GRAD_Q: Kernel = Kernel {
    name: "attn_grad_q",
    template: include_str!("../../shaders/grad/attn_grad_q.wgsl"),
    expand: Some(expand_q),
};
const ATTN_GRAD_KV: Kernel = Kernel {
    name: "attn_grad_kv",
    template: include_str!("../../shaders/grad/attn_grad_kv.wgsl"),
    expand: Some(expand_kv),
};

fn spec(head_dim: usize) -> Spec {
    let (vw, vt, dotv) = head_vector(head_dim);
    Spec::new()
        .set("HD", head_dim)
        .set("HV", head_dim / vw)
        .set("VT", vt)
        .set("DOTV", dotv)
}

fn lanes(spec: &Spec) -> Result<(usize, &'static str)> {
    let hd = spec.number("HD")? as usize;
    let (vw, vt, _) = head_vector(hd);
    Ok((hd / vw, vt))
}

fn sum(terms: impl Iterator<Item = String>) -> String {
    terms.collect::<Vec<_>>().join(" + ")
}

/// The dq kernel's per-row state and steps, written out (see the shader).
fn expand_q(spec: &Spec) -> Result<Vec<(&'static str, String)>> {
    let (hv, vt) = lanes(spec)?;
    let mut load = String::new();
    let (mut acc, mut store) = (String::new(), String::new());
    for d in 0..hv {
        load += &format!(
            "    let q{d} = q[qb + {d}u] * p.scale;\n    let g{d} = dout[gb + {d}u];\n    var a{d} = {vt}(0.0);\n"
        );
        acc += &format!("        a{d} = a{d} + ds * k[kb + {d}u];\n");
        store += &format!("    dq[qo + {d}u] = a{d} * p.scale;\n");
    }
    load += &format!(
        "    let dd = {};\n",
        sum((0..hv).map(|d| format!("dotv(g{d}, o[ob + {d}u])")))
    );
    let score = format!(
        "        let s = {};\n        let dp = {};\n",
        sum((0..hv).map(|d| format!("dotv(q{d}, k[kb + {d}u])"))),
        sum((0..hv).map(|d| format!("dotv(g{d}, v[vb + {d}u])")))
    );
    Ok(vec![
        ("LOAD", load),
        ("SCORE", score),
        ("ACC", acc),
        ("STORE", store),
    ])
}

/// The dk/dv kernel's per-key state and step, written out (see the shader).
fn expand_kv(spec: &Spec) -> Result<Vec<(&'static str, String)>> {
    let (hv, vt) = lanes(spec)?;
    let (mut load, mut step, mut store) = (String::new(), String::new(), String::new());
    for d in 0..hv {
        load += &format!(
            "    let k{d} = k[kb + {d}u];\n    let v{d} = v[vb + {d}u];\n    var ak{d} = {vt}(0.0);\n    var av{d} = {vt}(0.0);\n"
        );
        step += &format!(
            "            let x{d} = q[qb + {d}u];\n            let y{d} = dout[gb + {d}u];\n"
        );
        store += &format!("    dk[ko + {d}u] = ak{d} * p.scale;\n    dv[vo + {d}u] = av{d};\n");
    }
    step += &format!(
        "            let pr = exp(({}) * p.scale - st[si]);\n            let ds = pr * (({}) - st[si + 1u]);\n",
        sum((0..hv).map(|d| format!("dotv(x{d}, k{d})"))),
        sum((0..hv).map(|d| format!("dotv(y{d}, v{d})")))
    );
    for d in 0..hv {
        step += &format!(
            "            ak{d} = ak{d} + ds * x{d};\n            av{d} = av{d} + pr * y{d};\n"
        );
    }
    Ok(vec![("LOAD", load), ("STEP", step), ("STORE", store)])
}

/// Shape of a prefill batch: `nseq` sequences of `t` positions (queries at positions 0..t
/// attend to keys 0..=i, within `window` when it is not 0).
#[derive(Clone, Copy, Debug)]
pub struct AttnGradShape {
    pub nseq: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    nseq: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    window: u32,
    scale: f32,
    offs: [u32; 7],
    group_x: u32,
    _pad: [u32; 2],
}

/// dq, dk, dv (written) of o = attention(q, k, v) for the output gradient `dout`; q, o, dout,
/// dq are [nseq·t, heads·d], k, v, dk, dv [nseq·t, kv_heads·d], all f32, each sequence within
/// one chunk of every operand (allocate with `GpuMatrix::uninit_grouped(.., t)`).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    batch: &mut Batch<'_>,
    shape: AttnGradShape,
    q: &GpuMatrix,
    k: &GpuMatrix,
    v: &GpuMatrix,
    o: &GpuMatrix,
    dout: &GpuMatrix,
    dq: &GpuMatrix,
    dk: &GpuMatrix,
    dv: &GpuMatrix,
) -> Result<()> {
    let AttnGradShape {
        nseq,
        t,
        heads,
        kv_heads,
        head_dim: hd,
        window,
    } = shape;
    let rows = nseq * t;
    let all = [q, k, v, o, dout, dq, dk, dv];
    check(
        kv_heads > 0
            && heads.is_multiple_of(kv_heads)
            && [q, o, dout, dq]
                .iter()
                .all(|m| m.shape() == [rows, heads * hd])
            && [k, v, dk, dv]
                .iter()
                .all(|m| m.shape() == [rows, kv_heads * hd])
            && all.iter().all(|m| m.dtype() == DType::F32),
        || {
            format!(
                "attention_backward {shape:?}: q {:?}, k {:?}, v {:?}, o {:?}, dout {:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                o.shape(),
                dout.shape()
            )
        },
    )?;
    if rows == 0 {
        return Ok(());
    }
    let gpu = batch.gpu();
    // Loop iterations per invocation: two passes over ≤ t keys; group × t queries.
    let group = heads / kv_heads;
    let span = if window > 0 { window.min(t) } else { t };
    let iterations = (2 * span).max(group * span) as u64 + 64;
    check(iterations <= gpu.caps().loop_budget(), || {
        format!(
            "attention_backward: {span} positions × {group} heads per kv head need {iterations} \
             loop iterations per invocation, more than this adapter runs ({})",
            gpu.caps().loop_budget()
        )
    })?;
    let (vw, _, _) = head_vector(hd);
    let stats = gpu.storage(8 * (rows * heads) as u64, false)?;
    let sp = spec(hd);
    let (pq, pkv) = (
        gpu.pipeline(&ATTN_GRAD_Q, &sp)?,
        gpu.pipeline(&ATTN_GRAD_KV, &sp)?,
    );
    let max = gpu.caps().max_workgroups_per_dim as usize;
    let scale = 1.0 / (hd as f32).sqrt();
    for (range, parts) in GpuMatrix::common_segments(&all, 0..rows) {
        check(
            range.start.is_multiple_of(t) && range.end.is_multiple_of(t),
            || {
                format!(
                    "attention_backward: rows {range:?} split a sequence of {t} across chunks \
                     (allocate with uninit_grouped)"
                )
            },
        )?;
        let seqs = range.len() / t;
        let off = |i: usize, width: usize| (parts[i].1 * width / vw) as u32;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let grid = |invocations: usize| {
            let groups = invocations.div_ceil(64);
            let gx = groups.min(max);
            ((gx * 64) as u32, [gx as u32, groups.div_ceil(gx) as u32, 1])
        };
        let st_off = (range.start * heads) as u32;
        let (gx, wg) = grid(seqs * t * heads);
        let params = Params {
            nseq: seqs as u32,
            t: t as u32,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            window: window as u32,
            scale,
            // q, k, v, o, dout, dq, stats.
            offs: [
                off(0, qw),
                off(1, kw),
                off(2, kw),
                off(3, qw),
                off(4, qw),
                off(5, qw),
                st_off,
            ],
            group_x: gx,
            _pad: [0; 2],
        };
        let b = |i: usize| &parts[i].0.buf;
        batch.dispatch(
            pq.clone(),
            &params,
            &[b(0), b(1), b(2), b(3), b(4), b(5), &stats],
            wg,
        )?;
        let (gx, wg) = grid(seqs * t * kv_heads);
        let params = Params {
            // q, k, v, dout, dk, dv, stats.
            offs: [
                off(0, qw),
                off(1, kw),
                off(2, kw),
                off(4, qw),
                off(6, kw),
                off(7, kw),
                st_off,
            ],
            group_x: gx,
            ..params
        };
        batch.dispatch(
            pkv.clone(),
            &params,
            &[b(0), b(1), b(2), b(4), &stats, b(6), b(7)],
            wg,
        )?;
    }
    Ok(())
}
