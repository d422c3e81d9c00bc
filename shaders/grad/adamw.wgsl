// One AdamW step (decoupled weight decay, as torch.optim.AdamW) over `n` f32 parameters, the
// gradient scaled first by `scale` (gradient clipping and accumulation averaging):
//   g ← scale·grad;  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
//   θ ← θ − lr·wd·θ − lr · (m / bc1) / (sqrt(v / bc2) + eps)
// with bc1 = 1 − β1^t, bc2 = 1 − β2^t computed on the host in f64.

struct Params {
    n: u32,
    g_off: u32,   // element offsets of the first element in each operand's chunk
    t_off: u32,
    m_off: u32,
    v_off: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    wd: f32,
    scale: f32,
    bc1: f32,
    bc2: f32,
    _pad0: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> theta: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n) {
        return;
    }
    let g = p.scale * grad[p.g_off + i];
    let mj = p.beta1 * m[p.m_off + i] + (1.0 - p.beta1) * g;
    let vj = p.beta2 * v[p.v_off + i] + (1.0 - p.beta2) * g * g;
    m[p.m_off + i] = mj;
    v[p.v_off + i] = vj;
    let t = theta[p.t_off + i];
    theta[p.t_off + i] = t - p.lr * p.wd * t - p.lr * (mj / p.bc1) / (sqrt(vj / p.bc2) + p.eps);
}
