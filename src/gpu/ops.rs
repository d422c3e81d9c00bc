//! Host side of the transformer kernels: embedding gather, RMSNorm, RoPE, attention,
//! elementwise ops and per-row logit statistics. Each records dispatches into a [`Batch`] and
//! walks the row chunks of its operands.

use std::ops::Range;

use crate::error::{Error, Result};

use super::batch::Batch;
use super::buffer::GpuBuffer;
use super::context::Gpu;
use super::matrix::GpuMatrix;
use super::operand::operand_wgsl;
use super::pipeline::{Kernel, Spec};

pub use super::reduce::{logit_stats, top_k, transpose, vote, MAX_TOP_K};
pub use super::rope::{rope, rope_backward, RopeTable};

const EMBED: Kernel = Kernel {
    name: "embed",
    template: include_str!("../../shaders/nn/embed.wgsl"),
    expand: None,
};
const RMSNORM: Kernel = Kernel {
    name: "rmsnorm",
    template: include_str!("../../shaders/nn/rmsnorm.wgsl"),
    expand: None,
};
const ATTENTION: Kernel = Kernel {
    name: "attention",
    template: include_str!("../../shaders/nn/attention.wgsl"),
    expand: Some(attention_blocks),
};
const ELEMENTWISE: Kernel = Kernel {
    name: "elementwise",
    template: include_str!("../../shaders/nn/elementwise.wgsl"),
    expand: None,
};

/// Rows per dispatch dimension for kernels that index rows as gid.y + gid.z · 65535.
pub(crate) const ROWS_Y: usize = 65535;

/// Workgroup grid for kernels with 64-wide workgroups over `cols` and one row per (y, z) index
/// (embed, rope, rtn, dequant).
pub(crate) fn row_grid(cols: usize, rows: usize) -> [u32; 3] {
    [
        cols.div_ceil(64) as u32,
        rows.min(ROWS_Y) as u32,
        rows.div_ceil(ROWS_Y) as u32,
    ]
}

/// Workgroup size for per-row reductions: wide on GPUs, narrow on CPU adapters where each
/// barrier is expensive.
pub(super) fn reduce_wg(gpu: &Gpu) -> u32 {
    if gpu.caps().is_cpu {
        32
    } else {
        256.min(gpu.caps().max_invocations).max(32)
    }
}

pub(super) fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Shape(msg()))
    }
}

/// `u32` values in a storage buffer (token ids, targets, positions).
pub fn upload_u32(gpu: &Gpu, values: &[u32]) -> Result<GpuBuffer> {
    gpu.upload(bytemuck::cast_slice(values))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EmbedParams {
    n: u32,
    h: u32,
    row0: u32,
    rows: u32,
    ids_off: u32,
    out_off: u32,
    _pad: [u32; 2],
}

/// `out[r] = table[ids[r]]` for every row of `out` (ids has out.rows() entries). Ids outside
/// the table leave their row untouched; callers validate ids against the vocabulary first.
pub fn embed(
    batch: &mut Batch<'_>,
    ids: &GpuBuffer,
    table: &GpuMatrix,
    out: &GpuMatrix,
) -> Result<()> {
    let h = table.cols();
    check(
        out.cols() == h && ids.len() >= 4 * out.rows() as u64,
        || {
            format!(
                "embed: table {:?}, out {:?}, {} id bytes",
                table.shape(),
                out.shape(),
                ids.len()
            )
        },
    )?;
    let gpu = batch.gpu();
    for oc in out.chunks() {
        for tc in table.chunks() {
            let spec = Spec::new().set("OPERANDS", operand_wgsl("e", 2, table.dtype(), false));
            let pipeline = gpu.pipeline(&EMBED, &spec)?;
            let mut r = 0;
            while r < oc.rows {
                let n = (oc.rows - r).min(ROWS_Y * ROWS_Y);
                let params = EmbedParams {
                    n: n as u32,
                    h: h as u32,
                    row0: tc.row0 as u32,
                    rows: tc.rows as u32,
                    ids_off: (oc.row0 + r) as u32,
                    out_off: (r * h) as u32,
                    _pad: [0; 2],
                };
                let wg = row_grid(h, n);
                batch.dispatch(pipeline.clone(), &params, &[ids, &tc.buf, &oc.buf], wg)?;
                r += n;
            }
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    rows: u32,
    h: u32,
    eps: f32,
    row_base: u32,
}

/// `y = rmsnorm(x) ⊙ w` row by row. `w` is a 1×h matrix of any dtype; x and y share a layout.
pub fn rms_norm(
    batch: &mut Batch<'_>,
    x: &GpuMatrix,
    w: &GpuMatrix,
    eps: f32,
    y: &GpuMatrix,
) -> Result<()> {
    let h = x.cols();
    check(
        w.rows() == 1 && w.cols() == h && y.cols() == h && x.same_layout(y),
        || {
            format!(
                "rms_norm: x {:?}, w {:?}, y {:?}",
                x.shape(),
                w.shape(),
                y.shape()
            )
        },
    )?;
    let gpu = batch.gpu();
    let wg = reduce_wg(gpu);
    let spec = Spec::new()
        .set("OPERANDS", operand_wgsl("w", 2, w.dtype(), false))
        .set("WG", wg);
    let pipeline = gpu.pipeline(&RMSNORM, &spec)?;
    let max = gpu.caps().max_workgroups_per_dim as usize;
    for (xc, yc) in x.chunks().iter().zip(y.chunks()) {
        let mut r = 0;
        while r < xc.rows {
            let n = (xc.rows - r).min(max);
            let params = NormParams {
                rows: xc.rows as u32,
                h: h as u32,
                eps,
                row_base: r as u32,
            };
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[&xc.buf, &w.chunks()[0].buf, &yc.buf],
                [n as u32, 1, 1],
            )?;
            r += n;
        }
    }
    Ok(())
}

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query rows per sequence.
    pub t: usize,
    /// Key rows per sequence in k/v (row stride between sequences).
    pub s: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Position of the first query of each sequence (keys start at position 0).
    pub q_pos0: usize,
    /// Sliding window (0: none).
    pub window: usize,
    /// Where keys live in k/v.
    pub kv_layout: KvLayout,
}

/// Row layout of keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// Sequence b occupies rows [b·s, (b+1)·s) (a prefill batch).
    Contiguous,
    /// Key j of sequence b is row j·nseq + b (a KV cache of nseq sequences decoded in
    /// lockstep: the new tokens of one step are consecutive rows). k and v must be one chunk.
    Interleaved,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnParams {
    rows: u32,
    t: u32,
    s: u32,
    heads: u32,
    kv_heads: u32,
    q_pos0: u32,
    window: u32,
    scale: f32,
    q_off: u32,
    k_off: u32,
    o_off: u32,
    kv_seq_stride: u32,
    kv_pos_stride: u32,
    k_begin: u32,
    k_end: u32,
    flags: u32,
    blocks: u32,
    _pad: [u32; 3],
}

/// The attention kernel's specialization for a head dimension and `qr` query rows per
/// invocation: vec4 arithmetic when the head dimension is a multiple of 4, and the per-row
/// state written out as variables (see shaders/nn/attention.wgsl).
/// `sg`: subgroup lanes sharing each key and value (0: none; see [`attention_lanes`]).
fn attention_spec(head_dim: usize, qr: usize, sg: u32) -> Spec {
    let (vw, vt, dotv) = head_vector(head_dim);
    Spec::new()
        .set("HD", head_dim)
        .set("VW", vw)
        .set("VT", vt)
        .set("QR", qr)
        .set("DOTV", dotv)
        .set("SG", sg)
}

/// Lanes that share each key and value load (by subgroupBroadcast) in an attention of
/// `blocks` row blocks per sequence ([`attention_blocks_per_sequence`]), or 0. On a CPU
/// adapter with one fixed subgroup size S (Mesa's drivers load a value every lane needs once
/// per lane), when a sequence has at least S blocks: the blocks are then padded to a multiple
/// of S and a workgroup is one subgroup, so its lanes are blocks of the same sequence and
/// head, which read the same keys.
pub fn attention_lanes(gpu: &Gpu, blocks: usize) -> u32 {
    match gpu.caps().fixed_subgroup() {
        Some(s) if gpu.caps().is_cpu && blocks >= s as usize => s,
        _ => 0,
    }
}

/// How the attention kernels (forward and backward) hold a head of `head_dim` values in
/// registers: (elements per variable, its WGSL type, its dot product) — vec4 when the head
/// dimension is a multiple of 4.
pub(super) fn head_vector(head_dim: usize) -> (usize, &'static str, &'static str) {
    if head_dim.is_multiple_of(4) {
        (4, "vec4<f32>", "dot(a, b)")
    } else {
        (1, "f32", "a * b")
    }
}

/// Workgroups for `n` elements in 256-wide workgroups, folded into y at the device limit.
pub(super) fn flat_grid(gpu: &Gpu, n: usize) -> [u32; 3] {
    let groups = n.div_ceil(256).max(1);
    let gx = groups.min(gpu.caps().max_workgroups_per_dim as usize);
    [gx as u32, groups.div_ceil(gx) as u32, 1]
}

/// The per-row state written out for the spec's HD, VW and QR (run when a variant's pipeline
/// is built; see [`Kernel::expand`]).
fn attention_blocks(spec: &Spec) -> Result<Vec<(&'static str, String)>> {
    use std::fmt::Write;
    let (hd, qr) = (spec.number("HD")? as usize, spec.number("QR")? as usize);
    let sg = spec.number("SG")? as usize;
    let (vw, vt, _) = head_vector(hd);
    let hv = hd / vw;
    let (mut setup, mut step, mut finish) = (String::new(), String::new(), String::new());
    for r in 0..qr {
        let _ = write!(
            setup,
            "    let qi{r} = min(i0 + {r}u, p.t - 1u);\n\
             \x20   let row{r} = seq * p.t + qi{r};\n\
             \x20   let pos{r} = p.q_pos0 + qi{r};\n\
             \x20   let lo{r} = select(0u, pos{r} + 1u - p.window, p.window > 0u && pos{r} + 1u > p.window);\n\
             \x20   let qb{r} = p.q_off + (row{r} * p.heads + head) * HV;\n\
             \x20   let ob{r} = p.o_off + (row{r} * p.heads + head) * HV;\n\
             \x20   let si{r} = (row{r} * p.heads + head) * 2u;\n\
             \x20   var m{r} = -3.0e38;\n\
             \x20   var l{r} = 0.0;\n"
        );
        for d in 0..hv {
            let _ = writeln!(setup, "    let q{r}_{d} = q[qb{r} + {d}u] * p.scale;");
            let _ = writeln!(setup, "    var a{r}_{d} = {vt}(0.0);");
        }
        let _ = writeln!(setup, "    if (!first) {{");
        for d in 0..hv {
            let _ = writeln!(setup, "        a{r}_{d} = o[ob{r} + {d}u];");
        }
        let _ = writeln!(
            setup,
            "        m{r} = st[si{r}];\n        l{r} = st[si{r} + 1u];\n    }}"
        );
    }
    let _ = writeln!(setup, "    let pos_last = pos{};", qr - 1);
    if sg > 0 {
        // Lane l loads vectors l, S + l, … of the key and the value; all take them by
        // broadcast.
        for c in 0..hv.div_ceil(sg) {
            let i = format!("min({}u + sg_lane, {}u)", c * sg, hv - 1);
            let _ = writeln!(step, "        let kl{c} = k[kb + {i}];");
            let _ = writeln!(step, "        let vl{c} = v[kb + {i}];");
        }
        for d in 0..hv {
            let (c, l) = (d / sg, d % sg);
            let _ = writeln!(step, "        let k{d} = subgroupBroadcast(kl{c}, {l}u);");
            let _ = writeln!(step, "        let v{d} = subgroupBroadcast(vl{c}, {l}u);");
        }
    } else {
        for d in 0..hv {
            let _ = writeln!(step, "        let k{d} = k[kb + {d}u];");
        }
        for d in 0..hv {
            let _ = writeln!(step, "        let v{d} = v[kb + {d}u];");
        }
    }
    for r in 0..qr {
        let dots: Vec<String> = (0..hv).map(|d| format!("dotv(q{r}_{d}, k{d})")).collect();
        let _ = write!(
            step,
            "        {{\n\
             \x20           let vis = j <= pos{r} && j >= lo{r};\n\
             \x20           let sc = {};\n\
             \x20           let mn = select(m{r}, max(m{r}, sc), vis);\n\
             \x20           let c = exp(m{r} - mn);\n\
             \x20           let w = select(0.0, exp(sc - mn), vis);\n\
             \x20           l{r} = l{r} * c + w;\n\
             \x20           m{r} = mn;\n",
            dots.join(" + ")
        );
        for d in 0..hv {
            let _ = writeln!(step, "            a{r}_{d} = a{r}_{d} * c + w * v{d};");
        }
        let _ = writeln!(step, "        }}");
        let _ = writeln!(
            finish,
            "    if (live && i0 + {r}u < p.t) {{\n        if (last) {{"
        );
        let _ = writeln!(
            finish,
            "            let inv = select(0.0, 1.0 / l{r}, l{r} > 0.0);"
        );
        for d in 0..hv {
            let _ = writeln!(finish, "            o[ob{r} + {d}u] = a{r}_{d} * inv;");
        }
        let _ = writeln!(finish, "        }} else {{");
        for d in 0..hv {
            let _ = writeln!(finish, "            o[ob{r} + {d}u] = a{r}_{d};");
        }
        let _ = writeln!(
            finish,
            "            st[si{r}] = m{r};\n            st[si{r} + 1u] = l{r};\n        }}\n    }}"
        );
    }
    // With shared loads every lane of the subgroup runs every step (past the rows it may
    // see, a key weighs nothing): the key range is the union of the lanes', and a lane past
    // the last sequence computes on the last one and stores nothing.
    let (wg, args, live, range) = if sg > 0 {
        (
            sg.to_string(),
            ", @builtin(subgroup_invocation_id) sg_lane: u32",
            "let live = gid.x / p.blocks * p.t < p.rows;\n    let seq = select(p.rows / p.t - 1u, gid.x / p.blocks, live);",
            "let k_lo = subgroupMin(start);\n    let k_hi = subgroupMax(end);",
        )
    } else {
        (
            "64".to_string(),
            "",
            "let live = true;\n    let seq = gid.x / p.blocks;\n    if (seq * p.t >= p.rows) {\n        return;\n    }",
            "let k_lo = start;\n    let k_hi = end;",
        )
    };
    Ok(vec![
        ("SETUP", setup),
        ("STEP", step),
        ("FINISH", finish),
        ("WG", wg),
        ("SG_ARGS", args.into()),
        ("LIVE", live.into()),
        ("RANGE", range.into()),
    ])
}

/// Query rows per attention invocation for sequences of `t` queries: four for prefill (each
/// key and value loaded serves four rows; measured on lavapipe, see ARCHITECTURE.md), one for
/// decode. `PUMICE_ATTN_QR` overrides (tuning by hand).
fn attention_rows(t: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let o = *OVERRIDE.get_or_init(|| {
        std::env::var("PUMICE_ATTN_QR")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&q| (1..=16).contains(&q))
    });
    o.unwrap_or(if t >= 4 { 4 } else { 1 }).min(t.max(1))
}

/// Row blocks per sequence of `t` queries (before any padding to whole subgroups).
pub fn attention_blocks_per_sequence(t: usize) -> usize {
    t.div_ceil(attention_rows(t))
}

/// Keys one attention dispatch may cover so that no invocation runs more than `budget` loop
/// iterations: the per-row work is written out, so a key is one iteration.
pub fn attention_keys_per_dispatch(_head_dim: usize, budget: u64) -> usize {
    (budget.saturating_sub(8) as usize).max(1)
}

/// Causal GQA attention: `out = softmax(q kᵀ / √d + causal mask) v` per sequence and head.
/// q/out chunks must hold whole sequences of `t` rows; k/v chunks the matching sequences of
/// `s` rows (allocate with [`GpuMatrix::uninit_grouped`]). The keys are split over as many
/// dispatches as the device's loop budget requires ([`attention_keys_per_dispatch`]).
pub fn attention(
    batch: &mut Batch<'_>,
    q: &GpuMatrix,
    k: &GpuMatrix,
    v: &GpuMatrix,
    out: &GpuMatrix,
    sh: AttentionShape,
) -> Result<()> {
    let qd = sh.heads * sh.head_dim;
    let kd = sh.kv_heads * sh.head_dim;
    let nseq = q.rows() / sh.t.max(1);
    check(
        sh.t > 0
            && sh.head_dim > 0
            && q.rows().is_multiple_of(sh.t)
            && q.cols() == qd
            && out.cols() == qd
            && q.same_layout(out)
            && k.cols() == kd
            && v.cols() == kd
            && k.same_layout(v)
            && (sh.kv_layout == KvLayout::Interleaved || k.rows() >= nseq * sh.s)
            && (sh.kv_layout == KvLayout::Contiguous
                || (k.chunks().len() == 1 && k.rows() >= nseq * sh.s))
            && sh.kv_heads > 0
            && sh.heads.is_multiple_of(sh.kv_heads)
            && sh.q_pos0 + sh.t <= sh.s,
        || {
            format!(
                "attention: q {:?}, k {:?}, v {:?}, out {:?}, {sh:?}",
                q.shape(),
                k.shape(),
                v.shape(),
                out.shape()
            )
        },
    )?;
    let gpu = batch.gpu();
    let qr = attention_rows(sh.t);
    let vw = if sh.head_dim.is_multiple_of(4) { 4 } else { 1 };
    let blocks = attention_blocks_per_sequence(sh.t);
    let sg = attention_lanes(gpu, blocks);
    // With shared loads, each sequence's blocks are padded to whole subgroups.
    let blocks = if sg > 0 {
        blocks.next_multiple_of(sg as usize)
    } else {
        blocks
    };
    let wg_size = if sg > 0 { sg as usize } else { 64 };
    let pipeline = gpu.pipeline(&ATTENTION, &attention_spec(sh.head_dim, qr, sg))?;
    let span = attention_keys_per_dispatch(sh.head_dim, gpu.caps().loop_budget());
    // Keys the longest row can see: the split only needs to cover those.
    let k_first = if sh.window > 0 {
        (sh.q_pos0 + 1).saturating_sub(sh.window)
    } else {
        0
    };
    let segments: Vec<(usize, usize)> = (k_first..sh.s)
        .step_by(span)
        .map(|b| (b, (b + span).min(sh.s)))
        .collect();
    let segments = if segments.is_empty() {
        vec![(0, sh.s)]
    } else {
        segments
    };
    // Running (m, l) per (row, head) carried between the dispatches of a split, shared by the
    // q chunks (their dispatches run in order). Unread with one dispatch: a minimal binding.
    let max_rows = q.chunks().iter().map(|c| c.rows).max().unwrap_or(0);
    let state_bytes = if segments.len() > 1 {
        (max_rows * sh.heads * 2 * 4) as u64
    } else {
        16
    };
    let state = gpu.storage(state_bytes.max(16), false)?;
    for (qc, oc) in q.chunks().iter().zip(out.chunks()) {
        check(qc.row0 % sh.t == 0 && qc.rows % sh.t == 0, || {
            "attention: a q chunk splits a sequence".into()
        })?;
        let seq0 = qc.row0 / sh.t;
        let nseq_c = qc.rows / sh.t;
        let (kc, vc, k_off, seq_stride, pos_stride) = match sh.kv_layout {
            KvLayout::Contiguous => {
                // The k/v chunk holding these sequences.
                let kv0 = seq0 * sh.s;
                let (kc, vc) = k
                    .chunks()
                    .iter()
                    .zip(v.chunks())
                    .find(|(kc, _)| kc.row0 <= kv0 && kv0 + nseq_c * sh.s <= kc.row0 + kc.rows)
                    .ok_or_else(|| {
                        Error::Shape("attention: k/v chunks do not hold whole sequences".into())
                    })?;
                (kc, vc, (kv0 - kc.row0) * kd, sh.s, 1)
            }
            KvLayout::Interleaved => (&k.chunks()[0], &v.chunks()[0], seq0 * kd, 1, nseq),
        };
        let wg = [
            (nseq_c * blocks).div_ceil(wg_size) as u32,
            sh.heads as u32,
            1,
        ];
        for (n, &(kb, ke)) in segments.iter().enumerate() {
            let flags = (n == 0) as u32 | (((n + 1 == segments.len()) as u32) << 1);
            let params = AttnParams {
                rows: qc.rows as u32,
                t: sh.t as u32,
                s: sh.s as u32,
                heads: sh.heads as u32,
                kv_heads: sh.kv_heads as u32,
                q_pos0: sh.q_pos0 as u32,
                window: sh.window as u32,
                scale: 1.0 / (sh.head_dim as f32).sqrt(),
                q_off: 0,
                k_off: (k_off / vw) as u32,
                o_off: 0,
                kv_seq_stride: seq_stride as u32,
                kv_pos_stride: pos_stride as u32,
                k_begin: kb as u32,
                k_end: ke as u32,
                flags,
                blocks: blocks as u32,
                _pad: [0; 3],
            };
            batch.dispatch(
                pipeline.clone(),
                &params,
                &[&qc.buf, &kc.buf, &vc.buf, &oc.buf, &state],
                wg,
            )?;
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct EltParams {
    n: u32,
    cols: u32,
    y_off: u32,
    x_off: u32,
}

fn elementwise(
    batch: &mut Batch<'_>,
    op: u32,
    y: &GpuMatrix,
    rows: Range<usize>,
    x: &GpuMatrix,
    x_is_bias: bool,
) -> Result<()> {
    let gpu = batch.gpu();
    let spec = Spec::new()
        .set("OPERANDS", operand_wgsl("x", 1, x.dtype(), false))
        .set("OP", op);
    let pipeline = gpu.pipeline(&ELEMENTWISE, &spec)?;
    let cols = y.cols();
    for (yc, local0, n, global0) in y.segments(rows) {
        let xbuf = if x_is_bias {
            &x.chunks()[0].buf
        } else {
            // Same layout as y: the chunk with the same index covers the same rows.
            let xc = x
                .chunks()
                .iter()
                .find(|c| c.row0 <= global0 && global0 + n <= c.row0 + c.rows)
                .ok_or_else(|| {
                    Error::Shape("elementwise: operands are chunked differently".into())
                })?;
            check(xc.row0 == yc.row0, || {
                "elementwise: operands are chunked differently".into()
            })?;
            &xc.buf
        };
        let total = n * cols;
        let params = EltParams {
            n: total as u32,
            cols: cols as u32,
            y_off: (local0 * cols) as u32,
            x_off: (local0 * cols) as u32,
        };
        batch.dispatch(
            pipeline.clone(),
            &params,
            &[xbuf, &yc.buf],
            flat_grid(gpu, total),
        )?;
    }
    Ok(())
}

/// `y += x` (residual connection).
pub fn add(batch: &mut Batch<'_>, y: &GpuMatrix, x: &GpuMatrix) -> Result<()> {
    check(y.shape() == x.shape() && y.same_layout(x), || {
        format!("add: {:?} += {:?}", y.shape(), x.shape())
    })?;
    elementwise(batch, 0, y, 0..y.rows(), x, false)
}

/// `gate = silu(gate) ⊙ up` (SwiGLU), in place in `gate`.
pub fn swiglu(batch: &mut Batch<'_>, gate: &GpuMatrix, up: &GpuMatrix) -> Result<()> {
    check(gate.shape() == up.shape() && gate.same_layout(up), || {
        format!("swiglu: {:?} vs {:?}", gate.shape(), up.shape())
    })?;
    elementwise(batch, 1, gate, 0..gate.rows(), up, false)
}

/// `y[r] += bias` for r in `rows`; `bias` is 1×cols of any dtype.
pub fn add_bias(
    batch: &mut Batch<'_>,
    y: &GpuMatrix,
    rows: Range<usize>,
    bias: &GpuMatrix,
) -> Result<()> {
    check(
        bias.rows() == 1 && bias.cols() == y.cols() && rows.end <= y.rows(),
        || {
            format!(
                "add_bias: y {:?} rows {rows:?}, bias {:?}",
                y.shape(),
                bias.shape()
            )
        },
    )?;
    elementwise(batch, 2, y, rows, bias, true)
}
