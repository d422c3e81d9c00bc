// Causal GQA attention backward, second kernel: one invocation per (sequence, key row, kv
// head), over the query rows that see the key (i ≥ j, within the window) and the query heads
// sharing the kv head, with (L, D) from attn_grad_q.wgsl:
//   dk_j = scale · Σ P_ij (dO_i · v_j − D_i) q_i,   dv_j = Σ P_ij dO_i
// No atomics: each invocation owns its key row.
//
// Per-invocation state is written out by the host, as in attn_grad_q.wgsl.
//
// Specialized by the host: VT, DOTV, LOAD, STEP, STORE (generated). Offsets in units of VT.

struct Params {
    nseq: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    window: u32,
    scale: f32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    do_off: u32,
    dk_off: u32,
    dv_off: u32,
    st_off: u32,
    group_x: u32,
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<{{VT}}>;
@group(0) @binding(2) var<storage, read> k: array<{{VT}}>;
@group(0) @binding(3) var<storage, read> v: array<{{VT}}>;
@group(0) @binding(4) var<storage, read> dout: array<{{VT}}>;
@group(0) @binding(5) var<storage, read> st: array<f32>;
@group(0) @binding(6) var<storage, read_write> dk: array<{{VT}}>;
@group(0) @binding(7) var<storage, read_write> dv: array<{{VT}}>;

const HV: u32 = {{HV}}u;

fn dotv(a: {{VT}}, b: {{VT}}) -> f32 {
    return {{DOTV}};
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.group_x;
    if (idx >= p.nseq * p.t * p.kv_heads) {
        return;
    }
    let kh = idx % p.kv_heads;
    let j = (idx / p.kv_heads) % p.t;
    let b = idx / (p.kv_heads * p.t);
    let group = p.heads / p.kv_heads;
    let krow = b * p.t + j;
    let kb = p.k_off + (krow * p.kv_heads + kh) * HV;
    let vb = p.v_off + (krow * p.kv_heads + kh) * HV;
{{LOAD}}
    // Queries i see key j when j ≤ i and (no window or i < j + window).
    let hi = select(p.t, min(p.t, j + p.window), p.window > 0u);
    for (var hh = 0u; hh < group; hh = hh + 1u) {
        let head = kh * group + hh;
        for (var i = j; i < hi; i = i + 1u) {
            let row = b * p.t + i;
            let qb = p.q_off + (row * p.heads + head) * HV;
            let gb = p.do_off + (row * p.heads + head) * HV;
            let si = (p.st_off + row * p.heads + head) * 2u;
{{STEP}}
        }
    }
    let ko = p.dk_off + (krow * p.kv_heads + kh) * HV;
    let vo = p.dv_off + (krow * p.kv_heads + kh) * HV;
{{STORE}}
}
