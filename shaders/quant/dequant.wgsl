// Dequantize packed codes to f32: out[r, perm[j]] = scale[r, j / g] · (code[r, j] − zero[r, j / g]),
// or scale[r, j / g] · IQ4NL_LEVELS[code[r, j]] for the iq4nl grid (kind 3), or
// scale · code − zero for k grids (kind 4).
// Codes are a little-endian bit stream per row of `words` u32; scales/zeros may be f16 or f32
// (OPERANDS: bindings 2 and 3, load_s1 / load_z1). Without act-order, perm is the identity.
// Pruned matrices (SPARSE_DECL/SPARSE_BODY filled in by the host) keep only the codes of kept
// weights: mask bit j of row r says whether weight j is kept, and prefix[r, j / 32] counts the
// kept weights before word j / 32, so the code index of a kept weight is
// prefix + popcount(mask word below bit j); pruned weights are 0.

struct Params {
    rows: u32,
    n: u32,
    words: u32,    // u32 words per packed row
    bits: u32,
    g: u32,
    ng: u32,
    c_off: u32,    // element offset of this dispatch's first row in the codes chunk
    o_off: u32,    // element offset of this dispatch's first row in the output chunk
    sz_row0: u32,  // index of this dispatch's first row in scales / zeros
    has_perm: u32,
    m_off: u32,    // element offset of this dispatch's first row in the mask / prefix chunks
    kind: u32,     // GridKind::wgsl
};

{{LEVELS}}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> codes: array<u32>;
{{OPERANDS}}
@group(0) @binding(4) var<storage, read> perm: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
{{SPARSE_DECL}}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let r = gid.y + gid.z * 65535u;
    if (j >= p.n || r >= p.rows) {
        return;
    }
    var k = j;
{{SPARSE_BODY}}
    let bit = k * p.bits;
    let wi = p.c_off + r * p.words + bit / 32u;
    let o = bit % 32u;
    var v = codes[wi] >> o;
    if (o + p.bits > 32u) {
        v = v | (codes[wi + 1u] << (32u - o));
    }
    let q = f32(v & ((1u << p.bits) - 1u));
    let gi = (p.sz_row0 + r) * p.ng + j / p.g;
    var x = 0.0;
    if (p.kind == 3u) {
        x = load_s1(gi) * IQ4NL_LEVELS[u32(q)];
    } else if (p.kind == 4u) {
        // k grids: scale a, zero b, value a·q − b (the reader computes these on the host, in
        // ggml's f32 operations, since a GPU may fuse this into one rounding).
        x = load_s1(gi) * q - load_z1(gi);
    } else if (p.kind == 6u) {
        // affine: f16 step and f16 minimum.
        x = load_s1(gi) * q + load_z1(gi);
    } else {
        x = load_s1(gi) * (q - load_z1(gi));
    }
    var col = j;
    if (p.has_perm != 0u) {
        col = perm[j];
    }
    out[p.o_off + r * p.n + col] = x;
}
