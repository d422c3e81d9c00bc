// One lazy block of GPTQ/LDLQ: one invocation per row of W (rows are independent; they share
// only U). For each column i of the block [i1, i1 + bw), in order:
//   - at a group's first column, the group's grid from its current (error-updated) values;
//   - q = code(w_i); e = (w_i − deq(q)) / U_ii;  w_j −= e · U_ij for the block's later columns;
//   - the negated error −e goes to E, so the host's GEMM W[:, i1+bw:] += E · U[block, i1+bw:]
//     applies the lazy update to the rest of the row.
// W is updated in place (f32, processing column order). COMMON is quant/common.wgsl.

struct Params {
    rows: u32,
    n: u32,
    i1: u32,       // first column of the block
    bw: u32,       // block width
    g: u32,        // group length
    ng: u32,
    maxq: f32,
    kind: u32,
    w_off: u32,    // element offset of this dispatch's first row in the W / codes chunks
    s_row0: u32,   // first row of this dispatch within the scales / zeros chunks
    e_row0: u32,   // first row of this dispatch within the E chunk
    clip: u32,     // 1: least-squares search over shrunk ranges (src/quant/grid.rs)
    sparse: u32,   // 0 dense, 1 2:4, 2 unstructured (src/quant/sparsity.rs)
    prune: u32,    // unstructured: weights pruned per row in this block
    smax: f32,     // k grids: largest sub-block scale / minimum
    k_len: u32,    // k grids: kparams values per row
};

const PRUNED: u32 = 0xFFFFFFFFu;

fn is_pruned(m: array<u32, 4>, i: u32) -> bool {
    return (m[i / 32u] & (1u << (i % 32u))) != 0u;
}

@group(0) @binding(0) var<uniform> p: Params;
{{COMMON}}
@group(0) @binding(1) var<storage, read_write> w: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;      // [bw, bw] diagonal block of U
@group(0) @binding(3) var<storage, read_write> codes: array<u32>;
@group(0) @binding(4) var<storage, read_write> scales: array<f32>;
@group(0) @binding(5) var<storage, read_write> zeros: array<f32>;
@group(0) @binding(6) var<storage, read_write> e_out: array<f32>; // [rows, bw]
@group(0) @binding(7) var<storage, read_write> kparams: array<f32>; // k grids: [rows, k_len]

// The values choose_grid (quant/common.wgsl) reads: the working row of W.
fn group_value(i: u32) -> f32 {
    return w[i];
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.rows) {
        return;
    }
    let base = p.w_off + r * p.n;
    let srow = (p.s_row0 + r) * p.ng;
    // Pruning mask of the block's columns (bw ≤ 128), SparseGPT score w² / U_ii².
    var mask = array<u32, 4>(0u, 0u, 0u, 0u);
    if (p.sparse == 2u) {
        var sc: array<f32, 128>;
        for (var i = 0u; i < p.bw; i = i + 1u) {
            let x = w[base + p.i1 + i];
            let d = u[i * p.bw + i];
            sc[i] = x * x / (d * d);
        }
        for (var t = 0u; t < p.prune; t = t + 1u) {
            var best = 0u;
            var bv = 3.4e38;
            var found = false;
            for (var i = 0u; i < p.bw; i = i + 1u) {
                if (!is_pruned(mask, i) && (!found || sc[i] < bv)) {
                    best = i;
                    bv = sc[i];
                    found = true;
                }
            }
            mask[best / 32u] = mask[best / 32u] | (1u << (best % 32u));
        }
    }
    for (var i = 0u; i < p.bw; i = i + 1u) {
        let col = p.i1 + i;
        if (p.sparse == 1u && col % 4u == 0u) {
            let end = min(col + 4u, p.n);
            let cnt = (end - col) / 2u;
            for (var t = 0u; t < cnt; t = t + 1u) {
                var best = 0u;
                var bv = 3.4e38;
                var found = false;
                for (var j = col; j < end; j = j + 1u) {
                    let k = j - p.i1;
                    if (k < p.bw && !is_pruned(mask, k)) {
                        let x = w[base + j];
                        let d = u[k * p.bw + k];
                        let s = x * x / (d * d);
                        if (!found || s < bv) {
                            best = k;
                            bv = s;
                            found = true;
                        }
                    }
                }
                if (found) {
                    mask[best / 32u] = mask[best / 32u] | (1u << (best % 32u));
                }
            }
        }
        let gi = col / p.g;
        if (p.kind == GRID_K || p.kind == GRID_KS) {
            if (col % 256u == 0u) {
                let k0 = (p.s_row0 + r) * p.k_len + (col / 256u) * (2u + 2u * (256u / p.g));
                if (p.kind == GRID_K) {
                    k_super(base + col, srow + gi, k0, p.g, p.maxq, p.smax, p.clip != 0u);
                } else {
                    ks_super(base + col, srow + gi, k0, p.g, p.maxq, p.smax, p.clip != 0u);
                }
            }
        } else if (col % p.g == 0u) {
            let end = min(col + p.g, p.n);
            let sz = choose_grid(base + col, base + end, p.maxq, p.kind, p.clip != 0u);
            scales[srow + gi] = sz.x;
            zeros[srow + gi] = sz.y;
        }
        let sz = vec2<f32>(scales[srow + gi], zeros[srow + gi]);
        let x = w[base + col];
        var v = 0.0;
        if (is_pruned(mask, i)) {
            codes[base + col] = PRUNED;
        } else {
            let q = code_of(x, sz, p.maxq, p.kind);
            codes[base + col] = u32(q);
            v = level_value(q, sz, p.kind);
        }
        let e = (x - v) / u[i * p.bw + i];
        for (var j = i + 1u; j < p.bw; j = j + 1u) {
            w[base + p.i1 + j] = w[base + p.i1 + j] - e * u[i * p.bw + j];
        }
        e_out[(p.e_row0 + r) * p.bw + i] = -e;
    }
}
