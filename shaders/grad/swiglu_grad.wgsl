// Gradient of y = silu(g) ⊙ u: dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g))), du = dy ⊙ silu(g), over
// `n` elements at the given offsets of each operand's chunk.

struct Params {
    n: u32,
    g_off: u32,
    u_off: u32,
    dy_off: u32,
    dg_off: u32,
    du_off: u32,
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dg: array<f32>;
@group(0) @binding(5) var<storage, read_write> du: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let gv = g[p.g_off + i];
    let uv = u[p.u_off + i];
    let d = dy[p.dy_off + i];
    let sig = 1.0 / (1.0 + exp(-gv));
    dg[p.dg_off + i] = d * uv * sig * (1.0 + gv * (1.0 - sig));
    du[p.du_off + i] = d * gv * sig;
}
