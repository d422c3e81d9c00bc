// Gradient of y = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps), with respect to x, one workgroup per
// row (the forward's reduction order):
//   dx_j = r·w_j·dy_j − x_j · r³ · (Σ_c w_c·dy_c·x_c) / h
// written to dx (ACC 0) or added to it (ACC 1: the residual stream's gradient), and r stored
// per row (global row index) for the weight gradient.
//
// Specialized by the host: OPERANDS (binding 3, the weight vector, load_w1), WG, ACC.

struct Params {
    rows: u32,     // rows in this dispatch
    h: u32,
    eps: f32,
    x_off: u32,    // element offset of the first row in x's, dy's and dx's chunks
    dy_off: u32,
    dx_off: u32,
    row0: u32,     // global index of the first row (into r_out)
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
{{OPERANDS}}
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;
@group(0) @binding(5) var<storage, read_write> r_out: array<f32>;

const WG: u32 = {{WG}}u;
const ACC: u32 = {{ACC}}u;
var<workgroup> ss: array<f32, WG>;
var<workgroup> sd: array<f32, WG>;

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = wid.x + wid.y * 65535u;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    let live = r < p.rows;
    let rr = min(r, p.rows - 1u);
    let xb = p.x_off + rr * p.h;
    let db = p.dy_off + rr * p.h;
    var s = 0.0;
    var d = 0.0;
    for (var c = lid.x; c < p.h; c = c + WG) {
        let v = x[xb + c];
        s = s + v * v;
        d = d + load_w1(c) * dy[db + c] * v;
    }
    ss[lid.x] = s;
    sd[lid.x] = d;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.x < stride) {
            ss[lid.x] = ss[lid.x] + ss[lid.x + stride];
            sd[lid.x] = sd[lid.x] + sd[lid.x + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(ss[0] / f32(p.h) + p.eps);
    let k = inv * inv * inv * sd[0] / f32(p.h);
    if (live) {
        let ob = p.dx_off + rr * p.h;
        for (var c = lid.x; c < p.h; c = c + WG) {
            let g = inv * load_w1(c) * dy[db + c] - x[xb + c] * k;
            if (ACC == 1u) {
                dx[ob + c] = dx[ob + c] + g;
            } else {
                dx[ob + c] = g;
            }
        }
        if (lid.x == 0u) {
            r_out[p.row0 + rr] = inv;
        }
    }
}
