// RMSNorm over each row: y = w ⊙ x / sqrt(mean(x²) + eps), f32 throughout (as transformers
// computes it in float32). One workgroup per row; the sum of squares is reduced in workgroup
// memory.
//
// Specialized by the host: OPERANDS (binding 2, the weight vector, load_w1), WG (threads).

struct Params {
    rows: u32,
    h: u32,
    eps: f32,
    row_base: u32, // workgroup index offset (dispatches are split at the device limit)
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
{{OPERANDS}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = {{WG}}u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let r = p.row_base + wid.x;
    // Uniform per workgroup, so the barriers below stay in uniform control flow.
    let live = r < p.rows;
    let base = min(r, p.rows - 1u) * p.h;
    var s = 0.0;
    for (var c = lid.x; c < p.h; c = c + WG) {
        let v = x[base + c];
        s = s + v * v;
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.x < stride) {
            partial[lid.x] = partial[lid.x] + partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.h) + p.eps);
    if (live) {
        for (var c = lid.x; c < p.h; c = c + WG) {
            y[base + c] = load_w1(c) * (x[base + c] * inv);
        }
    }
}
