// Loss and logit gradient of softmax(z) per row, in place: one workgroup per row of a block of
// logits z (rows × v). The objective (KL 0: cross-entropy against targets; KL 1: KL(p_t ‖ p)
// against a teacher's logits zt of the same layout):
//   CE: loss = lse(z) − z[target],  dz = scale · (softmax(z) − onehot(target))
//   KL: loss = Σ p_t (log p_t − log p) with p_t = softmax(zt),  dz = scale · (softmax(z) − p_t)
// A target of 0xffffffff is ignored (loss 0, dz 0). loss[row0 + r] is written per row; the host
// adds the rows in f64.
//
// Specialized by the host: WG (threads per row), KL (bool).

struct Params {
    rows: u32,
    v: u32,
    z_off: u32,    // element offset of row 0 in z's chunk
    t_off: u32,    // ... in the teacher's chunk
    row0: u32,     // index of row 0 in targets / loss
    wg_base: u32,  // workgroup index offset (dispatches are split at the device limit)
    scale: f32,
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read> zt: array<f32>;
@group(0) @binding(3) var<storage, read_write> z: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;

const WG: u32 = {{WG}}u;
const KL: bool = {{KL}};

var<workgroup> sm: array<f32, WG>;
var<workgroup> ss: array<f32, WG>;
var<workgroup> tm: array<f32, WG>;
var<workgroup> ts: array<f32, WG>;
var<workgroup> cr: array<f32, WG>;

// Merge running (max, sum of exp(x − max)) pairs.
fn merged_sum(m1: f32, s1: f32, m2: f32, s2: f32) -> f32 {
    let m = max(m1, m2);
    return s1 * exp(m1 - m) + s2 * exp(m2 - m);
}

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = p.wg_base + wid.x;
    let live = r < p.rows;
    let rr = min(r, p.rows - 1u);
    let zb = p.z_off + rr * p.v;
    let tb = p.t_off + rr * p.v;
    let t = lid.x;
    let tgt = targets[p.row0 + rr];
    // The target's logit, read before this row is overwritten with its gradient.
    let z_target = z[zb + min(tgt, p.v - 1u)];
    var m = -3.0e38;
    var s = 0.0;
    var m2 = -3.0e38;
    var s2 = 0.0;
    for (var c = t; c < p.v; c = c + WG) {
        let x = z[zb + c];
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s = s + exp(x - m);
        }
        if (KL) {
            let y = zt[tb + c];
            if (y > m2) {
                s2 = s2 * exp(m2 - y) + 1.0;
                m2 = y;
            } else {
                s2 = s2 + exp(y - m2);
            }
        }
    }
    sm[t] = m;
    ss[t] = s;
    tm[t] = m2;
    ts[t] = s2;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            ss[t] = merged_sum(sm[t], ss[t], sm[t + stride], ss[t + stride]);
            sm[t] = max(sm[t], sm[t + stride]);
            ts[t] = merged_sum(tm[t], ts[t], tm[t + stride], ts[t + stride]);
            tm[t] = max(tm[t], tm[t + stride]);
        }
        workgroupBarrier();
    }
    let lse = sm[0] + log(ss[0]);
    let lse_t = tm[0] + log(ts[0]);
    workgroupBarrier();
    // Σ p_t (zt − z) for the KL, and the gradient, in one more pass.
    var c_sum = 0.0;
    let ignored = !KL && tgt == 0xffffffffu;
    for (var c = t; c < p.v; c = c + WG) {
        let x = z[zb + c];
        var g = exp(x - lse);
        if (KL) {
            let y = zt[tb + c];
            let pt = exp(y - lse_t);
            c_sum = c_sum + pt * (y - x);
            g = g - pt;
        } else if (c == tgt) {
            g = g - 1.0;
        }
        if (live) {
            z[zb + c] = select(p.scale * g, 0.0, ignored);
        }
    }
    cr[t] = c_sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (t < stride) {
            cr[t] = cr[t] + cr[t + stride];
        }
        workgroupBarrier();
    }
    if (live && t == 0u) {
        var l = 0.0;
        if (KL) {
            // Σ p_t (log p_t − log p) = Σ p_t (zt − z) − lse_t + lse.
            l = cr[0] - lse_t + lse;
        } else if (!ignored) {
            l = lse - z_target;
        }
        loss[p.row0 + rr] = l;
    }
}
