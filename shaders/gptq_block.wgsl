// One lazy block of GPTQ/LDLQ: one invocation per row of W (rows are independent; they share
// only U). For each column i of the block [i1, i1 + bw), in order:
//   - at a group's first column, the group's grid from its current (error-updated) values;
//   - q = code(w_i); e = (w_i − deq(q)) / U_ii;  w_j −= e · U_ij for the block's later columns;
//   - the negated error −e goes to E, so the host's GEMM W[:, i1+bw:] += E · U[block, i1+bw:]
//     applies the lazy update to the rest of the row.
// W is updated in place (f32, processing column order). COMMON is quant_common.wgsl.

struct Params {
    rows: u32,
    n: u32,
    i1: u32,       // first column of the block
    bw: u32,       // block width
    g: u32,        // group length
    ng: u32,
    maxq: f32,
    symmetric: u32,
    w_off: u32,    // element offset of this dispatch's first row in the W / codes chunks
    s_row0: u32,   // first row of this dispatch within the scales / zeros chunks
    e_row0: u32,   // first row of this dispatch within the E chunk
    clip: u32,     // 1: least-squares search over shrunk ranges (src/quant/grid.rs)
};

@group(0) @binding(0) var<uniform> p: Params;
{{COMMON}}
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;      // [bw, bw] diagonal block of U
@group(0) @binding(3) var<storage, read_write> codes: array<u32>;
@group(0) @binding(4) var<storage, read_write> scales: array<f32>;
@group(0) @binding(5) var<storage, read_write> zeros: array<f32>;
@group(0) @binding(6) var<storage, read_write> e_out: array<f32>; // [rows, bw]

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) {
        return;
    }
    let base = p.w_off + r * p.n;
    let srow = (p.s_row0 + r) * p.ng;
    for (var i = 0u; i < p.bw; i = i + 1u) {
        let col = p.i1 + i;
        let gi = col / p.g;
        if (col % p.g == 0u) {
            let end = min(col + p.g, p.n);
            var lo = 0.0;
            var hi = 0.0;
            for (var c = col; c < end; c = c + 1u) {
                lo = min(lo, w[base + c]);
                hi = max(hi, w[base + c]);
            }
            var sz = grid_params(lo, hi, p.maxq, p.symmetric != 0u);
            if (p.clip != 0u) {
                var best = 3.4e38;
                for (var t = 0u; t < CLIP_STEPS; t = t + 1u) {
                    let f = clip_factor(t);
                    let cand = grid_params(lo * f, hi * f, p.maxq, p.symmetric != 0u);
                    var err = 0.0;
                    for (var c = col; c < end; c = c + 1u) {
                        let x = w[base + c];
                        let d = x - cand.x * (code_of(x, cand, p.maxq) - cand.y);
                        err = err + d * d;
                    }
                    if (err < best) {
                        best = err;
                        sz = cand;
                    }
                }
            }
            scales[srow + gi] = sz.x;
            zeros[srow + gi] = sz.y;
        }
        let sz = vec2<f32>(scales[srow + gi], zeros[srow + gi]);
        let x = w[base + col];
        let q = code_of(x, sz, p.maxq);
        codes[base + col] = u32(q);
        let e = (x - sz.x * (q - sz.y)) / u[i * p.bw + i];
        for (var j = i + 1u; j < p.bw; j = j + 1u) {
            w[base + p.i1 + j] = w[base + p.i1 + j] - e * u[i * p.bw + j];
        }
        e_out[(p.e_row0 + r) * p.bw + i] = -e;
    }
}
