// Partial sums of squares of `n` f32 values at `off`: workgroup w writes Σ x² over its
// elements (strided by the whole grid) to out[out_off + w]; the host adds the partials in f64
// (the global gradient norm for clipping).

struct Params {
    n: u32,
    off: u32,
    out_off: u32,
    _pad: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const WG: u32 = {{WG}}u;
var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG, 1, 1)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    var s = 0.0;
    for (var i = wid.x * WG + lid.x; i < p.n; i = i + nwg.x * WG) {
        let v = x[p.off + i];
        s = s + v * v;
    }
    part[lid.x] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid.x < stride) {
            part[lid.x] = part[lid.x] + part[lid.x + stride];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u) {
        out[p.out_off + wid.x] = part[0];
    }
}
