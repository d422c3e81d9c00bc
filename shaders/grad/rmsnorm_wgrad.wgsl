// Gradient of y = w ⊙ x · r with respect to w: dw_c += Σ_rows dy[row, c] · x[row, c] · r[row],
// r from rmsnorm_grad. One invocation per column, rows in order (one dispatch per row chunk;
// dw accumulates across them).

struct Params {
    rows: u32,
    h: u32,
    x_off: u32,
    dy_off: u32,
    row0: u32,     // global index of the first row (into r)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read> r_in: array<f32>;
@group(0) @binding(4) var<storage, read_write> dw: array<f32>;

@compute @workgroup_size(64, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.h) {
        return;
    }
    var s = 0.0;
    for (var r = 0u; r < p.rows; r = r + 1u) {
        s = s + dy[p.dy_off + r * p.h + c] * x[p.x_off + r * p.h + c] * r_in[p.row0 + r];
    }
    dw[c] = dw[c] + s;
}
