// C (+)= alpha · A · op(B), f32 accumulation, register-tiled.
//
// Each invocation computes a TM×(4·TN4) block of C held in TM·TN4 vec4 registers; a workgroup
// of WG_X × WG_Y invocations covers a (TM·WG_Y) × (4·TN4·WG_X) tile. Operands are read straight from
// storage with vec4 loads (no workgroup memory: on CPU adapters barriers cost more than they
// save). The host picks the shape per adapter: on CPU adapters (lavapipe) WG_Y = 1, so all
// invocations of a workgroup compute the same rows of C. Mesa's CPU drivers still load a
// value every lane needs once per lane (a loop over the lanes for every load), so with
// SG = S > 0 (subgroups of one fixed size S) lane l loads rows l, S + l, … of A and the
// others take them with subgroupBroadcast: TM/S loads of A per step instead of TM; with one
// row per invocation (decode), lane l loads A's elements 4l..4l+3 of every 4·S instead.
//
// Specialized by the host (src/gpu/gemm.rs):
//   OPERANDS  bindings 1 (A) and 2 (B) plus load_a4/load_a1/load_b4/load_b1, which decode
//                 f32, f16 or bf16 storage to f32; the *4 loads assume 4-element alignment
//                 when the host picked the aligned variant.
//   WG_X, WG_Y  workgroup shape; TM rows of C per invocation.
//   B_T      true: C = A · Bᵀ with B stored [n, k]; false: C = A · B with B stored [k, n].
//   SG_ARGS, EARLY_EXIT  with SG: the subgroup_invocation_id argument, and no early return
//                 (every lane must reach the broadcasts; out-of-range lanes load clamped
//                 indices and store nothing).
//
// All offsets are element offsets into the bound chunk buffers, so one pipeline serves every
// (chunk of A, chunk of B, chunk of C) combination.

struct Params {
    m: u32,          // rows of C computed by this dispatch
    n: u32,          // columns of C computed by this dispatch
    k: u32,          // length of the contraction
    lda: u32,        // row stride of A (elements)
    ldb: u32,        // row stride of B
    ldc: u32,        // row stride of C
    a_off: u32,      // element offset of A[0, 0] of this dispatch
    b_off: u32,      // element offset of op(B)[0, 0]
    c_off: u32,      // element offset of C[0, 0]
    accumulate: u32, // 1: C += alpha·A·op(B); 0: C = alpha·A·op(B)
    alpha: f32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
{{OPERANDS}}
@group(0) @binding(3) var<storage, read_write> c_data: array<f32>;

const WG_X: u32 = {{WG_X}}u;
const WG_Y: u32 = {{WG_Y}}u;
const TM: u32 = {{TM}}u;
// Column groups of four per invocation: TN = 4·TN4 columns of C.
const TN4: u32 = {{TN4}}u;
const B_T: bool = {{B_T}};

fn store(i: u32, j0: u32, v: vec4<f32>) {
    if (i >= p.m) {
        return;
    }
    let base = p.c_off + i * p.ldc + j0;
    for (var c = 0u; c < 4u; c = c + 1u) {
        if (j0 + c < p.n) {
            var x = p.alpha * v[c];
            if (p.accumulate != 0u) {
                x = x + c_data[base + c];
            }
            c_data[base + c] = x;
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>{{SG_ARGS}}) {
    let i0 = (wid.y * WG_Y + lid.y) * TM;
    // Column group g of this invocation starts at j0 + 4·g·WG_X: the groups of neighbouring
    // invocations interleave, so a workgroup covers 4·TN4·WG_X consecutive columns.
    let j0 = wid.x * WG_X * 4u * TN4 + lid.x * 4u;
{{EARLY_EXIT}}
    // Rows past m and columns past n are clamped for loading; their results are discarded in
    // store().
    let last_i = p.m - 1u;
    let last_j = p.n - 1u;
    let k4 = p.k & ~3u;
    // The TM × TN4 register block is written out by the host (src/gpu/gemm.rs), one variable
    // per accumulator: an array indexed in a loop the shader compiler does not unroll lives
    // in memory, which on CPU adapters costs a per-lane loop for every access.
    // a_R: offset of row R of A; acc_R_G: C[i0 + R, column group G].
{{SETUP}}
    // With the contraction shared across a subgroup (one row per invocation), k < kw runs in
    // wide steps of 4·S (each lane loads four of A's values, all take them by broadcast);
    // otherwise kw = 0.
    let kw = {{WIDE_END}};
    if (B_T) {
        // B rows are C columns; both operands are contiguous along k.
        // bG: the offsets of the four B rows of column group G.
{{NT_SETUP}}
{{NT_WIDE}}
        for (var kk = kw; kk < k4; kk = kk + 4u) {
            // yG: mat4x4 whose column c is B[j + c, kk..kk+3]; x · yG = (x·y0, …, x·y3).
{{NT_STEP}}
        }
        for (var kk = k4; kk < p.k; kk = kk + 1u) {
{{NT_TAIL}}
        }
    } else {
        // A contiguous along k, B contiguous along n: four rank-1 updates per step.
{{NN_WIDE}}
        for (var kk = kw; kk < k4; kk = kk + 4u) {
            // yG: mat4x4 whose column t is B[kk + t, j..j+3]; yG · x = Σ_t x_t · B[kk + t, j..].
{{NN_STEP}}
        }
        for (var kk = k4; kk < p.k; kk = kk + 1u) {
{{NN_TAIL}}
        }
    }
{{STORES}}
}
