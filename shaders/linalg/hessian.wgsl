// H += Xᵀ X over the rows of X (tokens × features), upper triangle only.
//
// Accuracy scheme: every invocation owns a (4·BI)×(4·BJ) block of H. It sums BLOCK rows at a time in
// plain f32 registers, adds each block sum into a compensated (TwoSum) register pair, and at
// the end merges that pair into the stored compensated pair (hi, lo). The error of a long sum
// is then that of a BLOCK-term f32 sum, not of one with 10⁵ terms; the host reads hi + lo in
// f64. Blocks entirely below the diagonal exit at once; the host mirrors the upper triangle.
//
// Specialized by the host (src/gpu/hessian.rs): OPERANDS (binding 1, X, with
// load_x4/load_x1), WG_X, WG_Y, BLOCK, BI, BJ and the written-out register block.

struct Params {
    f: u32,      // features (columns of X, size of H)
    t: u32,      // rows of X in this dispatch
    x_off: u32,  // element offset of the first row of X in its chunk
    h_row0: u32, // first row of H held by the bound H chunk
    h_rows: u32, // rows of H held by the bound H chunk
    one_a: f32,  // 1.0 and 1.0, opaque to the compiler: they keep TwoSum from being
    one_b: f32,  // simplified away (see two_sum)
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
{{OPERANDS}}
@group(0) @binding(2) var<storage, read_write> h_hi: array<f32>;
@group(0) @binding(3) var<storage, read_write> h_lo: array<f32>;

const WG_X: u32 = {{WG_X}}u;
const WG_Y: u32 = {{WG_Y}}u;
const BLOCK: u32 = {{BLOCK}}u;
// Row groups of four and column groups of four per invocation.
const BI: u32 = {{BI}}u;
const BJ: u32 = {{BJ}}u;

// Four features j0..j0+3 of one row, clamped to f-1 (clamped results are never stored).
fn load_feats(row_base: u32, j0: u32) -> vec4<f32> {
    return load_x4_clamped(row_base, j0, p.f);
}

// Knuth's TwoSum: s + e == a + b exactly.
struct Pair {
    s: vec4<f32>,
    e: vec4<f32>,
};

// Shader compilers may treat float arithmetic as associative (Mesa's NIR folds (a + b) - a to b
// and x - (x - a) to a), which turns the error term into zero. Two different views of s, each
// scaled by a runtime 1.0 the compiler cannot see through, leave nothing to fold.
fn two_sum(a: vec4<f32>, b: vec4<f32>) -> Pair {
    let s = a + b;
    let bb = s * p.one_a - a;
    let e = (a - (s * p.one_b - bb)) + (b - bb);
    return Pair(s, e);
}

fn store(i: u32, j0: u32, s: vec4<f32>, e: vec4<f32>) {
    if (i - p.h_row0 >= p.h_rows || i >= p.f) {
        return;
    }
    let base = (i - p.h_row0) * p.f + j0;
    for (var c = 0u; c < 4u; c = c + 1u) {
        if (j0 + c < p.f && j0 + c >= i) {
            let a = h_hi[base + c];
            let b = s[c];
            let q = two_sum(vec4<f32>(a), vec4<f32>(b));
            let sum = q.s.x;
            let err = q.e.x;
            h_hi[base + c] = sum;
            h_lo[base + c] = h_lo[base + c] + (err + e[c]);
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // Rows i0..i0+4·BI of H (in BI groups of four); column group G at j0 + 4·G·WG_X (the
    // groups of neighbouring invocations interleave).
    let ri = (wid.y * WG_Y + lid.y) * 4u * BI;
    let i0 = p.h_row0 + ri;
    let j0 = wid.x * WG_X * 4u * BJ + lid.x * 4u;
    // Outside H, or a block strictly below the diagonal (every j < every i).
    if (ri >= p.h_rows || i0 >= p.f || j0 >= p.f || j0 + 4u * (BJ - 1u) * WG_X + 3u < i0) {
        return;
    }
    // The register block is written out by the host (src/gpu/hessian.rs), one variable per
    // accumulator (an array indexed in a loop the compiler does not unroll lives in memory):
    // for row R and column group G, bR_G is the current BLOCK's f32 sum, sR_G + eR_G the
    // compensated total.
{{SETUP}}
    var t = 0u;
    loop {
        if (t >= p.t) {
            break;
        }
        let t_end = min(t + BLOCK, p.t);
{{ZERO}}
        for (; t < t_end; t = t + 1u) {
            let row = p.x_off + t * p.f;
{{STEP}}
        }
{{MERGE}}
    }
{{STORES}}
}
