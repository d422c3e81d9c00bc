// Round-to-nearest quantization: one invocation per (row, group) computes the group's grid
// from its min/max (or, with clip, the least-squares best of the shrunk ranges) and writes unpacked codes (one u32 per weight) and f32 scales/zeros (already
// f16-rounded). W may be f32/f16/bf16 (OPERANDS: binding 1, load_w1); COMMON is
// quant/common.wgsl.

struct Params {
    rows: u32,
    n: u32,
    g: u32,        // group length
    ng: u32,       // groups per row
    maxq: f32,
    kind: u32,
    sz_row0: u32,  // index of this dispatch's first row in scales / zeros
    w_off: u32,    // element offset of the first row in the weight chunk
    c_off: u32,    // element offset of the first row in the codes chunk
    clip: u32,     // 1: least-squares search over shrunk ranges (see grid_params' callers)
    smax: f32,     // k grids: largest sub-block scale / minimum
    k_len: u32,    // k grids: kparams values per row
};

@group(0) @binding(0) var<uniform> p: Params;
{{COMMON}}
{{OPERANDS}}
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
@group(0) @binding(3) var<storage, read_write> scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> zeros: array<f32>;
@group(0) @binding(5) var<storage, read_write> kparams: array<f32>; // k grids: [rows, k_len]

// The values choose_grid (quant/common.wgsl) reads: W through its operand loader.
fn group_value(i: u32) -> f32 {
    return load_w1(i);
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let gi = gid.x;
    let r = gid.y + gid.z * 65535u;
    if (p.kind == GRID_K || p.kind == GRID_KS) {
        // One invocation per (row, super-block of 256 columns).
        if (gi >= p.n / 256u || r >= p.rows) {
            return;
        }
        let c0 = gi * 256u;
        let g0 = (p.sz_row0 + r) * p.ng + c0 / p.g;
        let k0 = (p.sz_row0 + r) * p.k_len + gi * (2u + 2u * (256u / p.g));
        if (p.kind == GRID_K) {
            k_super(p.w_off + r * p.n + c0, g0, k0, p.g, p.maxq, p.smax, p.clip != 0u);
        } else {
            ks_super(p.w_off + r * p.n + c0, g0, k0, p.g, p.maxq, p.smax, p.clip != 0u);
        }
        for (var c = c0; c < c0 + 256u; c = c + 1u) {
            let gs = g0 + (c - c0) / p.g;
            let x = load_w1(p.w_off + r * p.n + c);
            let sz = vec2<f32>(scales[gs], zeros[gs]);
            codes[p.c_off + r * p.n + c] = u32(code_of(x, sz, p.maxq, p.kind));
        }
        return;
    }
    if (gi >= p.ng || r >= p.rows) {
        return;
    }
    let c0 = gi * p.g;
    let c1 = min(c0 + p.g, p.n);
    let row0 = p.w_off + r * p.n;
    let sz = choose_grid(row0 + c0, row0 + c1, p.maxq, p.kind, p.clip != 0u);
    scales[(p.sz_row0 + r) * p.ng + gi] = sz.x;
    zeros[(p.sz_row0 + r) * p.ng + gi] = sz.y;
    for (var c = c0; c < c1; c = c + 1u) {
        codes[p.c_off + r * p.n + c] = u32(code_of(load_w1(p.w_off + r * p.n + c), sz, p.maxq, p.kind));
    }
}
