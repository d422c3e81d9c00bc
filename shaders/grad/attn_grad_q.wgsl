// Causal GQA attention backward, first kernel: one invocation per (sequence, query row, head)
// of a prefill batch (t queries per sequence at positions 0..t, keys = the same positions,
// optional sliding window). Recomputes the row's log-sum-exp L over its keys (no T × T
// probabilities are stored: O(T·d) memory, like the forward), D = dO · O, then
//   dq = scale · Σ_j P_j (dO · v_j − D) k_j,  P_j = exp(scale q · k_j − L)
// and stores (L, D) per (row, head) for the key/value kernel (attn_grad_kv.wgsl).
//
// Per-invocation state is written out by the host (src/gpu/attn_grad.rs: one variable per
// element or vec4 of the head, no loops over the head dimension), so only the key loops count
// against Mesa's per-invocation loop limit and nothing lives in scratch memory.
//
// Specialized by the host: VT (f32 or vec4<f32>), DOTV (its dot product), LOAD, SCORE, ACC,
// STORE (generated). Offsets below are in units of VT.

struct Params {
    nseq: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    window: u32,
    scale: f32,
    q_off: u32,   // element offsets of the segment's first row in each operand's chunk
    k_off: u32,
    v_off: u32,
    o_off: u32,
    do_off: u32,
    dq_off: u32,
    st_off: u32,  // (row, head) index of the segment's first row into st
    group_x: u32, // invocations per y step of the grid
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<{{VT}}>;
@group(0) @binding(2) var<storage, read> k: array<{{VT}}>;
@group(0) @binding(3) var<storage, read> v: array<{{VT}}>;
@group(0) @binding(4) var<storage, read> o: array<{{VT}}>;
@group(0) @binding(5) var<storage, read> dout: array<{{VT}}>;
@group(0) @binding(6) var<storage, read_write> dq: array<{{VT}}>;
@group(0) @binding(7) var<storage, read_write> st: array<f32>;

const HV: u32 = {{HV}}u;

fn dotv(a: {{VT}}, b: {{VT}}) -> f32 {
    return {{DOTV}};
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let idx = gid.x + gid.y * p.group_x;
    if (idx >= p.nseq * p.t * p.heads) {
        return;
    }
    let head = idx % p.heads;
    let i = (idx / p.heads) % p.t;
    let b = idx / (p.heads * p.t);
    let kh = head / (p.heads / p.kv_heads);
    let row = b * p.t + i;
    let qb = p.q_off + (row * p.heads + head) * HV;
    let ob = p.o_off + (row * p.heads + head) * HV;
    let gb = p.do_off + (row * p.heads + head) * HV;
    let lo = select(0u, i + 1u - p.window, p.window > 0u && i + 1u > p.window);
{{LOAD}}
    var m = -3.0e38;
    var l = 0.0;
    for (var j = lo; j <= i; j = j + 1u) {
        let kb = p.k_off + ((b * p.t + j) * p.kv_heads + kh) * HV;
        let vb = p.v_off + ((b * p.t + j) * p.kv_heads + kh) * HV;
{{SCORE}}
        let mn = max(m, s);
        l = l * exp(m - mn) + exp(s - mn);
        m = mn;
    }
    let lse = m + log(l);
    for (var j = lo; j <= i; j = j + 1u) {
        let kb = p.k_off + ((b * p.t + j) * p.kv_heads + kh) * HV;
        let vb = p.v_off + ((b * p.t + j) * p.kv_heads + kh) * HV;
{{SCORE}}
        let ds = exp(s - lse) * (dp - dd);
{{ACC}}
    }
    let qo = p.dq_off + (row * p.heads + head) * HV;
{{STORE}}
    let si = (p.st_off + row * p.heads + head) * 2u;
    st[si] = lse;
    st[si + 1u] = dd;
}
