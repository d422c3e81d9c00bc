// Per-row statistics of logits, reduced on the GPU so full logits are never read back.
// One workgroup per row. For each row r it writes 4 floats to out[r]:
//   [0] NLL of targets[r] under softmax(z)          (log-sum-exp(z) − z[target])
//   [1] KL(softmax(z_ref) ‖ softmax(z))             (KL mode; else 0)
//   [2] argmax z      [3] argmax z_ref (KL mode; else argmax z), as exact f32 integers
// Ties in argmax go to the lower index, as torch.argmax does.
//
// Specialized by the host: WG (threads per row), KL (bool).

struct Params {
    rows: u32,
    v: u32,        // vocabulary (row length)
    z_off: u32,    // element offset of row 0 in the logits chunk (and the ref chunk)
    row_base: u32, // index of row 0 in targets / out
    wg_base: u32,  // workgroup index offset (dispatches are split at the device limit)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> z: array<f32>;
@group(0) @binding(2) var<storage, read> zr: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const WG: u32 = {{WG}}u;
const KL: bool = {{KL}};

var<workgroup> sm: array<f32, WG>;   // running max (model)
var<workgroup> ss: array<f32, WG>;   // running sum (model)
var<workgroup> rm: array<f32, WG>;   // running max (ref)
var<workgroup> rs: array<f32, WG>;   // running sum (ref)
var<workgroup> bv: array<f32, WG>;   // best value (model)
var<workgroup> bi: array<u32, WG>;   // best index (model)
var<workgroup> rbv: array<f32, WG>;  // best value (ref)
var<workgroup> rbi: array<u32, WG>;  // best index (ref)
var<workgroup> cross: array<f32, WG>; // Σ p_ref (z_ref − z) partials

fn better(v1: f32, i1: u32, v2: f32, i2: u32) -> bool {
    return v2 > v1 || (v2 == v1 && i2 < i1);
}

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = p.wg_base + wid.x;
    let live = r < p.rows;
    let base = p.z_off + min(r, p.rows - 1u) * p.v;
    let t = lid.x;

    // Pass 1: online log-sum-exp and argmax, per thread over a strided slice.
    var m = -3.0e38;
    var s = 0.0;
    var best = -3.0e38;
    var besti = 0xffffffffu;
    var m2 = -3.0e38;
    var s2 = 0.0;
    var best2 = -3.0e38;
    var besti2 = 0xffffffffu;
    for (var c = t; c < p.v; c = c + WG) {
        let x = z[base + c];
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s = s + exp(x - m);
        }
        if (better(best, besti, x, c)) {
            best = x;
            besti = c;
        }
        if (KL) {
            let y = zr[base + c];
            if (y > m2) {
                s2 = s2 * exp(m2 - y) + 1.0;
                m2 = y;
            } else {
                s2 = s2 + exp(y - m2);
            }
            if (better(best2, besti2, y, c)) {
                best2 = y;
                besti2 = c;
            }
        }
    }
    sm[t] = m;
    ss[t] = s;
    bv[t] = best;
    bi[t] = besti;
    rm[t] = m2;
    rs[t] = s2;
    rbv[t] = best2;
    rbi[t] = besti2;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            let mo = sm[t + stride];
            let mn = max(sm[t], mo);
            ss[t] = ss[t] * exp(sm[t] - mn) + ss[t + stride] * exp(mo - mn);
            sm[t] = mn;
            if (better(bv[t], bi[t], bv[t + stride], bi[t + stride])) {
                bv[t] = bv[t + stride];
                bi[t] = bi[t + stride];
            }
            if (KL) {
                let mo2 = rm[t + stride];
                let mn2 = max(rm[t], mo2);
                rs[t] = rs[t] * exp(rm[t] - mn2) + rs[t + stride] * exp(mo2 - mn2);
                rm[t] = mn2;
                if (better(rbv[t], rbi[t], rbv[t + stride], rbi[t + stride])) {
                    rbv[t] = rbv[t + stride];
                    rbi[t] = rbi[t + stride];
                }
            }
        }
        workgroupBarrier();
    }
    let lse = sm[0] + log(ss[0]);
    let lse_ref = rm[0] + log(rs[0]);

    // Pass 2 (KL): Σ p_ref (z_ref − z); KL = that + lse − lse_ref.
    var cr = 0.0;
    if (KL) {
        for (var c = t; c < p.v; c = c + WG) {
            let y = zr[base + c];
            cr = cr + exp(y - lse_ref) * (y - z[base + c]);
        }
    }
    cross[t] = cr;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            cross[t] = cross[t] + cross[t + stride];
        }
        workgroupBarrier();
    }
    if (live && t == 0u) {
        let o = (p.row_base + r) * 4u;
        let tgt = targets[p.row_base + r];
        out[o] = lse - z[base + min(tgt, p.v - 1u)];
        if (KL) {
            out[o + 1u] = max(cross[0] + lse - lse_ref, 0.0);
            out[o + 3u] = f32(rbi[0]);
        } else {
            out[o + 1u] = 0.0;
            out[o + 3u] = f32(bi[0]);
        }
        out[o + 2u] = f32(bi[0]);
    }
}
