// Voting across exits (Edge-LLM's adaptive layer tuning): per row, the log of the element-wise
// maximum of the exits' softmax, accumulated one exit at a time:
//   out[r, c] = max(out[r, c], z[r, c] − lse(z[r, :]))      (FIRST: out[r, c] = z − lse)
// Renormalization is left to whoever reads `out` as logits: log-softmax(log max_e p_e) is
// exactly the renormalized vote. One workgroup per row.
//
// Specialized by the host: WG (threads per row, a power of two), FIRST (bool).

struct Params {
    rows: u32,
    v: u32,        // vocabulary (row length)
    wg_base: u32,  // workgroup index offset (dispatches are split at the device limit)
    _pad0: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = {{WG}}u;
const FIRST: bool = {{FIRST}};

var<workgroup> sm: array<f32, WG>;
var<workgroup> ss: array<f32, WG>;

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = p.wg_base + wid.x;
    let live = r < p.rows;
    let base = min(r, p.rows - 1u) * p.v;
    let t = lid.x;

    // Online log-sum-exp over a strided slice, then a tree reduction.
    var m = -3.0e38;
    var s = 0.0;
    for (var c = t; c < p.v; c = c + WG) {
        let x = z[base + c];
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s = s + exp(x - m);
        }
    }
    sm[t] = m;
    ss[t] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            let mo = sm[t + stride];
            let mn = max(sm[t], mo);
            ss[t] = ss[t] * exp(sm[t] - mn) + ss[t + stride] * exp(mo - mn);
            sm[t] = mn;
        }
        workgroupBarrier();
    }
    let lse = sm[0] + log(ss[0]);
    if (!live) {
        return;
    }
    for (var c = t; c < p.v; c = c + WG) {
        let lp = z[base + c] - lse;
        if (FIRST) {
            out[base + c] = lp;
        } else {
            out[base + c] = max(out[base + c], lp);
        }
    }
}
