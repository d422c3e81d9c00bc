// C (+)= A · op(B), f32 accumulation, register-tiled.
//
// Each invocation computes a TM×4 block of C held in TM vec4 registers; a workgroup of
// WG_X × WG_Y invocations covers a (TM·WG_Y) × (4·WG_X) tile. Operands are read straight from
// storage with vec4 loads (no workgroup memory: on CPU adapters barriers cost more than they
// save). The host picks the shape per adapter: on CPU adapters (lavapipe) WG_Y = 1 makes the
// rows of A uniform across the SIMD lanes, so its loads are broadcasts and only B is gathered.
//
// Specialized by the host (src/gpu/gemm.rs):
//   OPERANDS  bindings 1 (A) and 2 (B) plus load_a4/load_a1/load_b4/load_b1, which decode
//                 f32, f16 or bf16 storage to f32; the *4 loads assume 4-element alignment
//                 when the host picked the aligned variant.
//   WG_X, WG_Y  workgroup shape; TM rows of C per invocation.
//   B_T      true: C = A · Bᵀ with B stored [n, k]; false: C = A · B with B stored [k, n].
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
    accumulate: u32, // 1: C += A·op(B); 0: C = A·op(B)
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
{{OPERANDS}}
@group(0) @binding(3) var<storage, read_write> c_data: array<f32>;

const WG_X: u32 = {{WG_X}}u;
const WG_Y: u32 = {{WG_Y}}u;
const TM: u32 = {{TM}}u;
const B_T: bool = {{B_T}};

// Four consecutive columns j0..j0+3 of row `row_base` of B (B stored [k, n]); columns past n
// are clamped to n-1 (their results are never stored).
fn load_b_cols(row_base: u32, j0: u32) -> vec4<f32> {
    return load_b4_clamped(row_base, j0, p.n);
}

fn store(i: u32, j0: u32, v: vec4<f32>) {
    if (i >= p.m) {
        return;
    }
    let base = p.c_off + i * p.ldc + j0;
    for (var c = 0u; c < 4u; c = c + 1u) {
        if (j0 + c < p.n) {
            var x = v[c];
            if (p.accumulate != 0u) {
                x = x + c_data[base + c];
            }
            c_data[base + c] = x;
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let i0 = (wid.y * WG_Y + lid.y) * TM;
    let j0 = (wid.x * WG_X + lid.x) * 4u;
    if (i0 >= p.m || j0 >= p.n) {
        return;
    }
    // Rows past m are clamped for loading; their results are discarded in store().
    let last_i = p.m - 1u;
    var a_row: array<u32, TM>;
    var acc: array<vec4<f32>, TM>;
    for (var r = 0u; r < TM; r = r + 1u) {
        a_row[r] = p.a_off + min(i0 + r, last_i) * p.lda;
        acc[r] = vec4<f32>(0.0);
    }
    let k4 = p.k & ~3u;

    if (B_T) {
        // B rows are C columns; both operands are contiguous along k.
        let last_j = p.n - 1u;
        let b0 = p.b_off + min(j0, last_j) * p.ldb;
        let b1 = p.b_off + min(j0 + 1u, last_j) * p.ldb;
        let b2 = p.b_off + min(j0 + 2u, last_j) * p.ldb;
        let b3 = p.b_off + min(j0 + 3u, last_j) * p.ldb;
        for (var kk = 0u; kk < k4; kk = kk + 4u) {
            let y0 = load_b4(b0 + kk);
            let y1 = load_b4(b1 + kk);
            let y2 = load_b4(b2 + kk);
            let y3 = load_b4(b3 + kk);
            for (var r = 0u; r < TM; r = r + 1u) {
                let x = load_a4(a_row[r] + kk);
                acc[r] = acc[r] + vec4<f32>(dot(x, y0), dot(x, y1), dot(x, y2), dot(x, y3));
            }
        }
        for (var kk = k4; kk < p.k; kk = kk + 1u) {
            let y = vec4<f32>(load_b1(b0 + kk), load_b1(b1 + kk), load_b1(b2 + kk), load_b1(b3 + kk));
            for (var r = 0u; r < TM; r = r + 1u) {
                acc[r] = acc[r] + load_a1(a_row[r] + kk) * y;
            }
        }
    } else {
        // A contiguous along k, B contiguous along n: four rank-1 updates per step.
        for (var kk = 0u; kk < k4; kk = kk + 4u) {
            let rb = p.b_off + kk * p.ldb;
            let y0 = load_b_cols(rb, j0);
            let y1 = load_b_cols(rb + p.ldb, j0);
            let y2 = load_b_cols(rb + 2u * p.ldb, j0);
            let y3 = load_b_cols(rb + 3u * p.ldb, j0);
            for (var r = 0u; r < TM; r = r + 1u) {
                let x = load_a4(a_row[r] + kk);
                acc[r] = acc[r] + x.x * y0 + x.y * y1 + x.z * y2 + x.w * y3;
            }
        }
        for (var kk = k4; kk < p.k; kk = kk + 1u) {
            let y = load_b_cols(p.b_off + kk * p.ldb, j0);
            for (var r = 0u; r < TM; r = r + 1u) {
                acc[r] = acc[r] + load_a1(a_row[r] + kk) * y;
            }
        }
    }
    for (var r = 0u; r < TM; r = r + 1u) {
        store(i0 + r, j0, acc[r]);
    }
}
