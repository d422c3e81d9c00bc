// Causal self-attention with grouped-query heads, one invocation per (query row, head).
//
// Keys are streamed in blocks of KB with an online softmax (running max m, running sum l and
// an HD-wide accumulator rescaled once per block), so memory is O(T·d): no T×T score matrix
// ever exists. Query i of a sequence has position q_pos0 + i and sees keys j ≤ its position
// (and, with a sliding window w > 0, j > position − w).
//
// One dispatch covers the keys [k_begin, k_end) only, so the host can bound the loop
// iterations of an invocation (Mesa's CPU drivers silently end an invocation's loops after
// 65,535 iterations in all): a dispatch that is not the first resumes (m, l) from `st` and the
// unnormalized accumulator from `o`; one that is not the last leaves them there; the last
// writes softmax · v.
//
// Layouts (row-major, chunk-local element offsets):
//   q, out: [nseq · t, heads · HD]
//   k, v:   key j of sequence b is row b · kv_seq_stride + j · kv_pos_stride, [.., kv_heads · HD]
//           (contiguous sequences: strides (s, 1); an interleaved KV cache of nseq sequences:
//           strides (1, nseq))
//   st:     [nseq · t, heads, 2] running (m, l) between dispatches
// Specialized by the host: HD (head dim), KB (keys per block), VW (4 when HD is a multiple of
// 4: head vectors are handled as HD/4 vec4s; else 1) with VT, LOADV, DOTV to match.

struct Params {
    rows: u32,     // nseq · t query rows in this dispatch
    t: u32,        // queries per sequence
    s: u32,        // keys per sequence visible at most (causal limit)
    heads: u32,
    kv_heads: u32,
    q_pos0: u32,   // position of query 0
    window: u32,   // sliding window (0: none)
    scale: f32,    // 1 / sqrt(HD)
    q_off: u32,
    k_off: u32,
    o_off: u32,
    kv_seq_stride: u32, // rows between sequences in k/v
    kv_pos_stride: u32, // rows between positions in k/v
    k_begin: u32,  // first key position this dispatch handles
    k_end: u32,    // one past the last
    flags: u32,    // bit 0: first dispatch of the row range; bit 1: last
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> st: array<f32>;

const HD: u32 = {{HD}}u;
const KB: u32 = {{KB}}u;
const VW: u32 = {{VW}}u;
const HV: u32 = HD / VW;
alias VT = {{VT}};

fn load_q(i: u32) -> VT {
    return {{LOADV_Q}};
}
fn load_k(i: u32) -> VT {
    return {{LOADV_K}};
}
fn load_v(i: u32) -> VT {
    return {{LOADV_V}};
}
fn load_o(i: u32) -> VT {
    return {{LOADV_O}};
}
fn dotv(a: VT, b: VT) -> f32 {
    return {{DOTV}};
}
fn store_o(i: u32, x: VT) {
    {{STOREV}}
}

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    let head = gid.y;
    if (row >= p.rows || head >= p.heads) {
        return;
    }
    let seq = row / p.t;
    let i = row % p.t;
    let pos = p.q_pos0 + i;
    let kvh = head / (p.heads / p.kv_heads);
    let q_base = p.q_off + row * p.heads * HD + head * HD;
    let o_base = p.o_off + row * p.heads * HD + head * HD;
    let kv_stride = p.kv_heads * HD;
    let kv_base = p.k_off + seq * p.kv_seq_stride * kv_stride + kvh * HD;
    let kv_step = p.kv_pos_stride * kv_stride;
    let si = (row * p.heads + head) * 2u;
    let first = (p.flags & 1u) != 0u;
    let last = (p.flags & 2u) != 0u;

    var qv: array<VT, HV>;
    var acc: array<VT, HV>;
    var m = -3.0e38;
    var l = 0.0;
    if (first) {
        for (var d = 0u; d < HV; d = d + 1u) {
            qv[d] = load_q(q_base + d * VW) * p.scale;
            acc[d] = VT(0.0);
        }
    } else {
        for (var d = 0u; d < HV; d = d + 1u) {
            qv[d] = load_q(q_base + d * VW) * p.scale;
            acc[d] = load_o(o_base + d * VW);
        }
        m = st[si];
        l = st[si + 1u];
    }
    var start = p.k_begin;
    if (p.window > 0u && pos + 1u > p.window) {
        start = max(start, pos + 1u - p.window);
    }
    let end = min(min(pos + 1u, p.s), p.k_end);
    var scores: array<f32, KB>;
    for (var j0 = start; j0 < end; j0 = j0 + KB) {
        let nb = min(KB, end - j0);
        var bm = m;
        for (var jj = 0u; jj < nb; jj = jj + 1u) {
            let kb = kv_base + (j0 + jj) * kv_step;
            var sc = 0.0;
            for (var d = 0u; d < HV; d = d + 1u) {
                sc = sc + dotv(qv[d], load_k(kb + d * VW));
            }
            scores[jj] = sc;
            bm = max(bm, sc);
        }
        let corr = exp(m - bm);
        l = l * corr;
        for (var d = 0u; d < HV; d = d + 1u) {
            acc[d] = acc[d] * corr;
        }
        for (var jj = 0u; jj < nb; jj = jj + 1u) {
            let w = exp(scores[jj] - bm);
            l = l + w;
            let vb = kv_base + (j0 + jj) * kv_step;
            for (var d = 0u; d < HV; d = d + 1u) {
                acc[d] = acc[d] + w * load_v(vb + d * VW);
            }
        }
        m = bm;
    }
    if (last) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var d = 0u; d < HV; d = d + 1u) {
            store_o(o_base + d * VW, acc[d] * inv);
        }
    } else {
        for (var d = 0u; d < HV; d = d + 1u) {
            store_o(o_base + d * VW, acc[d]);
        }
        st[si] = m;
        st[si + 1u] = l;
    }
}
