// Causal self-attention with grouped-query heads. One invocation per (sequence, block of QR
// consecutive query rows, head): every key and value it loads serves its QR rows.
//
// Keys are streamed one at a time with an online softmax per row (running max m, running sum
// l and an HD-wide accumulator, rescaled when the max grows), so memory is O(T·d): no T×T
// score matrix ever exists. Query i of a sequence has position q_pos0 + i and sees keys
// j ≤ its position (and, with a sliding window w > 0, j > position − w); a key a row may not
// see gets weight exp(−∞) = 0.
//
// The per-row state (q, accumulator, m, l) is written out by the host (src/gpu/ops.rs) as one
// variable per vector: arrays indexed in loops the shader compiler does not unroll live in
// memory, which on CPU adapters costs a per-lane loop for every access.
//
// One dispatch covers the keys [k_begin, k_end) only, so the host can bound the loop
// iterations of an invocation (Mesa's CPU drivers silently end an invocation's loops after
// 65,535 iterations in all): a dispatch that is not the first resumes (m, l) from `st` and the
// unnormalized accumulator from `o`; one that is not the last leaves them there; the last
// writes softmax · v.
//
// Layouts (row-major, chunk-local offsets in units of VT: vec4 when HD is a multiple of 4,
// else f32):
//   q, out: [nseq · t, heads · HD]
//   k, v:   key j of sequence b is row b · kv_seq_stride + j · kv_pos_stride, [.., kv_heads · HD]
//           (contiguous sequences: strides (s, 1); an interleaved KV cache of nseq sequences:
//           strides (1, nseq))
//   st:     [nseq · t, heads, 2] running (m, l) between dispatches
// Specialized by the host: HD, VW (4 or 1), VT, DOTV, QR and the written-out blocks. With
// SG = S > 0 (CPU adapters with one fixed subgroup size; src/gpu/ops.rs attention_lanes) a
// workgroup is one subgroup of S blocks of the same sequence and head, the lanes load each key
// and value once between them and share it with subgroupBroadcast (LIVE, RANGE: no early
// return, the union of the lanes' key ranges; a key outside a row's range weighs nothing).

struct Params {
    rows: u32,     // nseq · t query rows in this dispatch
    t: u32,        // queries per sequence
    s: u32,        // keys per sequence visible at most (causal limit)
    heads: u32,
    kv_heads: u32,
    q_pos0: u32,   // position of query 0
    window: u32,   // sliding window (0: none)
    scale: f32,    // 1 / sqrt(HD)
    q_off: u32,    // in VT units
    k_off: u32,
    o_off: u32,
    kv_seq_stride: u32, // rows between sequences in k/v
    kv_pos_stride: u32, // rows between positions in k/v
    k_begin: u32,  // first key position this dispatch handles
    k_end: u32,    // one past the last
    flags: u32,    // bit 0: first dispatch of the row range; bit 1: last
    blocks: u32,   // row blocks per sequence: ceil(t / QR)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

alias VT = {{VT}};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<VT>;
@group(0) @binding(2) var<storage, read> k: array<VT>;
@group(0) @binding(3) var<storage, read> v: array<VT>;
@group(0) @binding(4) var<storage, read_write> o: array<VT>;
@group(0) @binding(5) var<storage, read_write> st: array<f32>;

const HD: u32 = {{HD}}u;
const VW: u32 = {{VW}}u;
const HV: u32 = HD / VW;
const QR: u32 = {{QR}}u;

fn dotv(a: VT, b: VT) -> f32 {
    return {{DOTV}};
}

@compute @workgroup_size({{WG}}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>{{SG_ARGS}}) {
    let head = gid.y;
    {{LIVE}}
    let i0 = (gid.x % p.blocks) * QR;
    let kvh = head / (p.heads / p.kv_heads);
    let kv_stride = p.kv_heads * HV;
    let kv_base = p.k_off + seq * p.kv_seq_stride * kv_stride + kvh * HV;
    let kv_step = p.kv_pos_stride * kv_stride;
    let first = (p.flags & 1u) != 0u;
    let last = (p.flags & 2u) != 0u;
    // Row r of the block: query i0 + r of the sequence (rows past t are computed on the last
    // row's data and never stored).
{{SETUP}}
    // Keys up to the last row's causal limit, from the first row's window start.
    var start = p.k_begin;
    let pos_first = p.q_pos0 + i0;
    if (p.window > 0u && pos_first + 1u > p.window) {
        start = max(start, pos_first + 1u - p.window);
    }
    let end = min(min(pos_last + 1u, p.s), p.k_end);
    {{RANGE}}
    for (var j = k_lo; j < k_hi; j = j + 1u) {
        let kb = kv_base + j * kv_step;
{{STEP}}
    }
{{FINISH}}
}
